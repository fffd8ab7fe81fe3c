//! `hub c2d send|purge|feedback` and `hub invoke`: cloud-to-device messages and
//! direct methods through the REST API.

use anyhow::{Context, Result};
use clap::Subcommand;
use hub::auth::service::Scope;
use reqwest::Method;
use serde_json::{Value, json};

use super::Target;
use super::client::{ApiClient, path_segment};

/// Cloud-to-device commands.
#[derive(Subcommand, Debug)]
pub enum C2dCommand {
    /// Queue a message for a device.
    Send {
        /// The device id.
        id: String,
        /// The message body (text).
        body: String,
        /// Application property `key=value` (repeatable).
        #[arg(long = "prop", value_parser = parse_property)]
        properties: Vec<(String, String)>,
        /// Feedback wanted: none, positive, negative or full.
        #[arg(long, default_value = "none")]
        ack: String,
        /// Time to live in seconds (default 3600).
        #[arg(long)]
        ttl: Option<u64>,
        /// Message id (generated when absent).
        #[arg(long)]
        message_id: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete every queued message of a device.
    Purge {
        /// The device id.
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Wait for a batch of feedback records, print it and acknowledge it.
    Feedback {
        /// How long to wait, milliseconds.
        #[arg(long, default_value_t = 10_000)]
        wait_ms: u64,
        #[command(flatten)]
        target: Target,
    },
}

fn parse_property(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{raw:?} is not key=value"))
}

/// Runs a C2D command.
pub async fn c2d(command: C2dCommand) -> Result<()> {
    match command {
        C2dCommand::Send {
            id,
            body,
            properties,
            ack,
            ttl,
            message_id,
            target,
        } => {
            let client = ApiClient::connect(&target, &[Scope::ServiceConnect])?;
            let mut request = json!({
                "body": body,
                "properties": properties
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect::<serde_json::Map<String, Value>>(),
                "ack": ack,
            });
            if let Some(ttl) = ttl {
                request["ttlSeconds"] = json!(ttl);
            }
            if let Some(message_id) = message_id {
                request["messageId"] = json!(message_id);
            }
            let path = format!("/devices/{}/messages/deviceBound", path_segment(&id));
            let answer: Value = client
                .send(client.request(Method::POST, &path).json(&request))
                .await?
                .json()
                .await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        C2dCommand::Purge { id, target } => {
            let client = ApiClient::connect(&target, &[Scope::ServiceConnect])?;
            let path = format!("/devices/{}/commands", path_segment(&id));
            let answer: Value = client
                .send(client.request(Method::DELETE, &path))
                .await?
                .json()
                .await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        C2dCommand::Feedback { wait_ms, target } => {
            let client = ApiClient::connect(&target, &[Scope::ServiceConnect])?;
            let path = format!(
                "/messages/serviceBound/feedback?waitMs={}",
                wait_ms.min(30_000)
            );
            let response = client.send(client.request(Method::GET, &path)).await?;
            if response.status() == reqwest::StatusCode::NO_CONTENT {
                eprintln!("no feedback");
                return Ok(());
            }
            let batch: Value = response.json().await?;
            println!("{}", serde_json::to_string_pretty(&batch)?);
            let token = batch["lockToken"]
                .as_str()
                .context("no lockToken in the answer")?;
            let path = format!("/messages/serviceBound/feedback/{}", path_segment(token));
            client.send(client.request(Method::DELETE, &path)).await?;
        }
    }
    Ok(())
}

/// `hub invoke` arguments.
#[derive(clap::Args, Debug)]
pub struct InvokeArgs {
    /// The device id.
    id: String,
    /// The method name.
    method: String,
    /// JSON payload (default none).
    payload: Option<String>,
    /// Seconds to wait for the answer (5–300).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Seconds to wait for the device to come online (0–300).
    #[arg(long, default_value_t = 0)]
    connect_timeout: u64,
    #[command(flatten)]
    target: Target,
}

/// `hub invoke ID METHOD [PAYLOAD]`: prints `{status, payload}`.
pub async fn invoke(args: InvokeArgs) -> Result<()> {
    let client = ApiClient::connect(&args.target, &[Scope::ServiceConnect])?;
    let payload: Value = match &args.payload {
        Some(text) => serde_json::from_str(text).context("the payload is not JSON")?,
        None => Value::Null,
    };
    let request = json!({
        "methodName": args.method,
        "payload": payload,
        "responseTimeoutInSeconds": args.timeout,
        "connectTimeoutInSeconds": args.connect_timeout,
    });
    let path = format!("/twins/{}/methods", path_segment(&args.id));
    // The hub may take connect + response timeout to answer; the client's own
    // timeout must not cut that short.
    let timeout = super::client::invoke_timeout(args.connect_timeout, args.timeout);
    let answer: Value = client
        .send(
            client
                .request(Method::POST, &path)
                .timeout(timeout)
                .json(&request),
        )
        .await?
        .json()
        .await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}
