//! `hub twin get|patch|query`: device twins through the REST API.

use anyhow::{Context, Result};
use clap::Subcommand;
use hub::auth::service::Scope;
use reqwest::Method;
use serde_json::{Value, json};

use super::Target;
use super::client::{ApiClient, path_segment};

/// Twin commands.
#[derive(Subcommand, Debug)]
pub enum TwinCommand {
    /// Print a device's twin.
    Get {
        /// The device id.
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Merge-patch tags and desired properties: `{"tags": {…}, "properties": {"desired": {…}}}`.
    Patch {
        /// The device id.
        id: String,
        /// The patch, JSON.
        patch: String,
        /// Apply only if the twin's etag is this one.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Run a query (`SELECT … FROM devices …`) and print every result.
    Query {
        /// The query.
        query: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Runs a twin command.
pub async fn twin(command: TwinCommand) -> Result<()> {
    let answer = match command {
        TwinCommand::Get { id, target } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryRead])?;
            let path = format!("/twins/{}", path_segment(&id));
            client
                .send(client.request(Method::GET, &path))
                .await?
                .json::<Value>()
                .await?
        }
        TwinCommand::Patch {
            id,
            patch,
            etag,
            target,
        } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryWrite])?;
            let patch: Value = serde_json::from_str(&patch).context("the patch is not JSON")?;
            let mut request = client
                .request(Method::PATCH, &format!("/twins/{}", path_segment(&id)))
                .json(&patch);
            if let Some(etag) = etag {
                request = request.header("If-Match", format!("\"{etag}\""));
            }
            client.send(request).await?.json::<Value>().await?
        }
        TwinCommand::Query { query, target } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryRead])?;
            let all = client
                .all_pages(|| {
                    client
                        .request(Method::POST, "/devices/query")
                        .json(&json!({ "query": query }))
                })
                .await?;
            Value::Array(all)
        }
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}
