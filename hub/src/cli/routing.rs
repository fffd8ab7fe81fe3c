//! `hub routing get|set FILE|test FILE`: the routing configuration through the REST
//! API (`/configuration/routing`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use hub::auth::service::Scope;
use reqwest::Method;
use serde_json::Value;

use super::Target;
use super::client::ApiClient;

/// Routing commands.
#[derive(Subcommand, Debug)]
pub enum RoutingCommand {
    /// Print the routing configuration (Azure's routing JSON).
    Get {
        #[command(flatten)]
        target: Target,
    },
    /// Put the configuration in FILE (Azure's routing JSON) in force; `-` reads stdin.
    Set {
        /// The JSON file.
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Which routes the sample message in FILE takes: `{"routingSource":
    /// "DeviceMessages", "message": {"body", "appProperties", "systemProperties"},
    /// "twin": {…}}`; `-` reads stdin.
    Test {
        /// The JSON file.
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
}

fn read(file: &PathBuf) -> Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut out)?;
        return Ok(out);
    }
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

/// Runs a routing command.
pub async fn routing(command: RoutingCommand) -> Result<()> {
    let answer = match command {
        RoutingCommand::Get { target } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryRead])?;
            client
                .send(client.request(Method::GET, "/configuration/routing"))
                .await?
                .json::<Value>()
                .await?
        }
        RoutingCommand::Set { file, target } => {
            let body = read(&file)?;
            let client = ApiClient::connect(&target, &[Scope::RegistryWrite])?;
            let request = client
                .request(Method::PUT, "/configuration/routing")
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            client.send(request).await?.json::<Value>().await?
        }
        RoutingCommand::Test { file, target } => {
            let body = read(&file)?;
            let client = ApiClient::connect(&target, &[Scope::RegistryRead])?;
            let request = client
                .request(Method::POST, "/configuration/routing/test")
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            client.send(request).await?.json::<Value>().await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}
