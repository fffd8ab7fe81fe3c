//! `hub connection-string` and `hub policy list|rotate`: the shared access policies in
//! the data dir, read and rotated in the file itself (a running hub picks a rotation up
//! within a second; in cluster mode it hands it on to the other nodes).

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use hub::auth::policy::{self, KeySlot, PolicyFileError, PolicySet};
use hub::config::Overrides;
use hub::data_dir;

use super::HubLocation;

/// `hub connection-string` arguments: the data dir and hostname come from the same
/// flags, variables and file as `hub serve`'s, so the string names the hub that runs.
#[derive(Args, Debug)]
pub struct ConnectionStringArgs {
    /// The policy whose primary key signs.
    #[arg(long, default_value = "iothubowner")]
    policy: String,
    /// Print the secondary key instead of the primary.
    #[arg(long, value_enum, default_value_t = Slot::Primary)]
    key: Slot,
    /// The provisioning service's connection string (Azure's provisioning service
    /// SDKs): the `provisioningserviceowner` policy.
    #[arg(long, conflicts_with = "policy")]
    provisioning: bool,
    /// The hub's config file and data dir, as `hub serve` takes them.
    #[command(flatten)]
    location: HubLocation,
    /// The hub's host name, as in `hub serve --hostname` (default localhost).
    #[arg(long, env = "HUB_HOSTNAME")]
    hostname: Option<String>,
    /// Print the Event Hub-compatible connection string (for `@azure/event-hubs`,
    /// `azure-eventhub` and other Event Hubs clients reading telemetry over AMQP)
    /// instead of the IoT Hub one.
    #[arg(long)]
    event_hub: bool,
}

/// Which key of a policy.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Slot {
    /// The primary key.
    Primary,
    /// The secondary key.
    Secondary,
}

impl From<Slot> for KeySlot {
    fn from(slot: Slot) -> Self {
        match slot {
            Slot::Primary => KeySlot::Primary,
            Slot::Secondary => KeySlot::Secondary,
        }
    }
}

/// `hub policy …`.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// List the shared access policies and their permissions.
    List {
        /// The hub's config file and data dir, as `hub serve` takes them.
        #[command(flatten)]
        location: HubLocation,
    },
    /// Replace a policy's key with a new random one; tokens it signed are refused
    /// from then on.
    Rotate {
        /// The policy.
        #[arg(long, default_value = "iothubowner")]
        policy: String,
        /// Which key.
        #[arg(long, value_enum, default_value_t = Slot::Primary)]
        key: Slot,
        /// The hub's config file and data dir, as `hub serve` takes them.
        #[command(flatten)]
        location: HubLocation,
    },
}

/// `hub connection-string`: prints the connection string and nothing else.
pub fn connection_string(args: &ConnectionStringArgs) -> Result<()> {
    let config = args.location.load(Overrides {
        hostname: args.hostname.clone(),
        ..Overrides::default()
    })?;
    let set = PolicySet::load(&data_dir::policies_path(&config.data_dir))?;
    let name = match args.provisioning {
        true => "provisioningserviceowner",
        false => args.policy.as_str(),
    };
    let keys = set
        .get(name)
        .ok_or_else(|| PolicyFileError::UnknownPolicy(name.to_string()))?;
    let key = keys.key(args.key.into());
    if args.event_hub {
        println!(
            "{}",
            policy::event_hub_connection_string(
                &config.hostname,
                name,
                key,
                &config.event_hub_name()
            )
        );
    } else {
        println!("{}", policy::connection_string(&config.hostname, name, key));
    }
    Ok(())
}

/// `hub policy list|rotate`.
pub fn policy(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::List { location } => {
            let data_dir = location.load(Overrides::default())?.data_dir;
            let set = PolicySet::load(&data_dir::policies_path(&data_dir))?;
            for (name, _) in set.iter() {
                let scopes = policy::scopes_of(name)
                    .unwrap_or_default()
                    .iter()
                    .map(|scope| scope.as_str())
                    .collect::<Vec<_>>()
                    .join(",");
                println!("{name}\t{scopes}");
            }
            Ok(())
        }
        PolicyCommand::Rotate {
            policy,
            key,
            location,
        } => {
            let data_dir = location.load(Overrides::default())?.data_dir;
            let path = data_dir::policies_path(&data_dir);
            let mut set = PolicySet::load(&path)?;
            set.rotate(&policy, key.into())?;
            set.write(&path)
                .with_context(|| format!("cannot rotate {policy}'s key"))?;
            Ok(())
        }
    }
}
