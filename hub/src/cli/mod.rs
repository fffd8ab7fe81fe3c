//! The admin CLI: `hub token`, `hub device …`, `hub twin …`, `hub c2d …`, `hub invoke`,
//! `hub routing …`
//! `hub cluster status` and `hub tail` (clients of the REST API, authorized with short-lived tokens minted from the data dir's owner key), and
//! `hub dps …` (provisioning: the ID scope from the data dir, enrollments and
//! registrations through the REST API), `hub cert device`, and `hub connection-string` and `hub policy …` (the shared access
//! policies in the data dir).

mod client;
mod cluster;
mod commands;
mod device;
mod dps;
mod policy;
mod routing;
mod tail;
mod twin;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use hub::auth::service::{Scope, ServiceKey};
use hub::config::{Config, ConfigError, Overrides};
use hub::data_dir;

pub use cluster::{ClusterCommand, cluster};
pub use commands::{C2dCommand, InvokeArgs, c2d, invoke};
pub use device::{DeviceCommand, device};
pub use dps::{DpsCommand, dps};
pub use policy::{ConnectionStringArgs, PolicyCommand, connection_string, policy};
pub use routing::{RoutingCommand, routing};
pub use tail::{TailArgs, tail};
pub use twin::{TwinCommand, twin};

/// Where a hub's configuration and data dir are: the flags (and `HUB_*` variables)
/// `hub serve` takes, shared with the commands that read the data dir themselves
/// (`connection-string`, `policy`), so they find the directory the hub uses.
#[derive(Args, Debug, Clone)]
pub struct HubLocation {
    /// TOML config file.
    #[arg(long, env = "HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (default ./hub-data).
    #[arg(long, env = "HUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl HubLocation {
    /// The effective configuration (defaults < file < environment < flags) with
    /// `overrides` beyond the data dir (the other commands' own flags).
    pub fn load(&self, overrides: Overrides) -> Result<Config, ConfigError> {
        let overrides = Overrides {
            data_dir: self.data_dir.clone(),
            ..overrides
        };
        Config::load(self.config.as_deref(), &overrides)
    }
}

/// Where the CLI finds the hub: the data dir (owner key, endpoints.json) and
/// optionally an explicit API URL.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Data directory of the hub (default ./hub-data).
    #[arg(
        long,
        env = "HUB_DATA_DIR",
        default_value = "./hub-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// REST API base URL (default: the http address in DATA_DIR/endpoints.json).
    #[arg(long, env = "HUB_URL", global = true)]
    pub url: Option<String>,
}

/// `hub token` arguments.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Data directory holding service.key.
    #[arg(long, env = "HUB_DATA_DIR", default_value = "./hub-data")]
    data_dir: PathBuf,
    /// Scopes, comma- or space-separated: registry:read, registry:write, service:connect.
    #[arg(long, default_value = "registry:read,registry:write,service:connect")]
    scope: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

/// Parses a comma- or space-separated scope list.
fn parse_scopes(raw: &str) -> Result<Vec<Scope>> {
    let scopes = raw
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<Scope>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(!scopes.is_empty(), "--scope names no scope");
    Ok(scopes)
}

/// `hub token`: prints a bearer token and nothing else.
pub fn token(args: &TokenArgs) -> Result<()> {
    let scopes = parse_scopes(&args.scope)?;
    anyhow::ensure!(args.ttl > 0, "--ttl must be at least 1 second");
    let key = ServiceKey::load(&data_dir::service_key_path(&args.data_dir))?;
    println!(
        "{}",
        key.mint("owner", &scopes, Duration::from_secs(args.ttl))?
    );
    Ok(())
}

/// `hub cert …`.
#[derive(clap::Subcommand, Debug)]
pub enum CertCommand {
    /// Issue a device certificate (CN = ID) from the data dir's CA into OUT/ID.pem + ID.key.
    Device {
        /// The device id.
        id: String,
        /// Data directory holding certs/ca.pem.
        #[arg(long, env = "HUB_DATA_DIR", default_value = "./hub-data")]
        data_dir: PathBuf,
        /// Output directory (default: DATA_DIR/certs/devices).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `hub cert device ID`.
pub fn cert(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Device { id, data_dir, out } => {
            let id = hub::registry::DeviceId::parse(&id)?;
            let ca_dir = data_dir.join("certs");
            let ca = certs::Ca::read(&ca_dir, "ca")?.with_context(|| {
                format!(
                    "no CA in {} (start `hub serve` once to create it)",
                    ca_dir.display()
                )
            })?;
            let out = out.unwrap_or_else(|| ca_dir.join("devices"));
            // A valid device id may still be `..` or `ca`: the file-name check refuses
            // those before anything is written.
            let path = ca.issue_device_into(&out, id.as_str())?;
            println!("{}", path.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_from_commas_or_spaces() {
        assert_eq!(
            parse_scopes("registry:read, registry:write").unwrap(),
            vec![Scope::RegistryRead, Scope::RegistryWrite]
        );
        assert!(parse_scopes("registry:read,admin").is_err());
        assert!(parse_scopes(",").is_err());
    }
}
