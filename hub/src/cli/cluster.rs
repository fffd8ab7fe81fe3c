//! `hub cluster status`: the live hub nodes with their device counts, the NATS nodes and, per stream and bucket, the leader and
//! each replica's state, as the hub reports them (`GET /cluster`).

use anyhow::{Context, Result};
use clap::Subcommand;
use hub::auth::service::Scope;
use reqwest::Method;
use serde_json::Value;

use super::Target;
use super::client::ApiClient;

/// Cluster commands.
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Hub nodes and their devices, NATS nodes, stream and bucket leaders and replicas, lag.
    Status {
        /// Print the hub's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// Runs a cluster command.
pub async fn cluster(command: ClusterCommand) -> Result<()> {
    let ClusterCommand::Status { json, target } = command;
    let client = ApiClient::connect(&target, &[Scope::ServiceConnect])?;
    let status: Value = client
        .send(client.request(Method::GET, "/cluster"))
        .await?
        .json()
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status)?);
    }
    Ok(())
}

/// The status as a table.
fn render(status: &Value) -> Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    if status["mode"] != "cluster" {
        writeln!(
            out,
            "embedded mode: this hub keeps its state in its data directory"
        )?;
        return Ok(out);
    }
    let nodes: Vec<&str> = status["nats_nodes"]
        .as_array()
        .context("nats_nodes")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    writeln!(
        out,
        "hub node      {}",
        status["hub_node"].as_str().unwrap_or("?")
    )?;
    writeln!(
        out,
        "connected to  {}",
        status["connected_to"].as_str().unwrap_or("?")
    )?;
    writeln!(out, "NATS nodes    {}", nodes.join(", "))?;
    writeln!(out)?;
    let hubs = status["hub_nodes"].as_array().cloned().unwrap_or_default();
    writeln!(
        out,
        "{:<24} {:>8}  {:<22} {:<22} started",
        "hub node", "devices", "http", "mqtt"
    )?;
    for hub in &hubs {
        writeln!(
            out,
            "{:<24} {:>8}  {:<22} {:<22} {}",
            hub["node"].as_str().unwrap_or("?"),
            hub["devices"],
            hub["http"].as_str().unwrap_or("?"),
            hub["mqtt"].as_str().unwrap_or("?"),
            hub["started"].as_str().unwrap_or("?"),
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<22} {:>10} {:>12}  {:<10} replicas (lag)",
        "stream", "messages", "bytes", "leader"
    )?;
    for stream in status["streams"].as_array().context("streams")? {
        let peers: Vec<String> = stream["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let name = p["node"].as_str().unwrap_or("?");
                let state = if p["offline"] == true {
                    "offline".to_string()
                } else if p["current"] == true {
                    "current".to_string()
                } else {
                    format!("behind {}", p["lag"])
                };
                format!("{name} {state}")
            })
            .collect();
        writeln!(
            out,
            "{:<22} {:>10} {:>12}  {:<10} {}",
            stream["name"].as_str().unwrap_or("?"),
            stream["messages"],
            stream["bytes"],
            stream["leader"].as_str().unwrap_or("(none)"),
            peers.join(", ")
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_names_leaders_and_lagging_replicas() {
        let status = json!({
            "mode": "cluster", "hub_node": "h1", "connected_to": "n0 (2.15.1)",
            "nats_nodes": ["n0", "n1", "n2"],
            "hub_nodes": [{"node": "h1", "devices": 12, "http": "127.0.0.1:8080",
                "mqtt": "127.0.0.1:1883", "started": "2026-01-01T00:00:00Z"}],
            "streams": [{"name": "telemetry", "messages": 5, "bytes": 900, "replicas": 3,
                "leader": "n1", "peers": [
                    {"node": "n1", "leader": true, "current": true, "offline": false, "lag": 0},
                    {"node": "n0", "leader": false, "current": false, "offline": false, "lag": 7},
                    {"node": "n2", "leader": false, "current": false, "offline": true, "lag": 0}]}]
        });
        let table = render(&status).expect("renders");
        assert!(table.contains("NATS nodes    n0, n1, n2"), "{table}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("h1") && l.contains(" 12 ") && l.contains("127.0.0.1:1883")),
            "{table}"
        );
        assert!(
            table.contains("telemetry") && table.contains("n1 current, n0 behind 7, n2 offline"),
            "{table}"
        );
        assert!(
            render(&json!({"mode": "embedded"}))
                .expect("renders")
                .contains("embedded")
        );
    }
}
