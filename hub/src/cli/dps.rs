//! `hub dps …`: the provisioning ID scope (read from the data dir), enrollment groups,
//! individual enrollments and registrations (through the REST API's provisioning
//! routes), and `device-key`, which derives a group member's key offline.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hub::auth::service::Scope;
use hub::config::Overrides;
use hub::provisioning::scope::{IdScope, scope_path};
use hub::provisioning::{EnrollmentKind, derive_device_key};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::{ApiClient, path_segment};
use super::{HubLocation, Target};

/// `hub dps …`.
#[derive(Subcommand, Debug)]
pub enum DpsCommand {
    /// Print the provisioning ID scope (generated on the hub's first start).
    Scope {
        /// The hub's config file and data dir, as `hub serve` takes them.
        #[command(flatten)]
        location: HubLocation,
    },
    /// Enrollment groups (symmetric key: device keys derived from the group key).
    #[command(subcommand)]
    Group(EnrollmentCommand),
    /// Individual enrollments (one registration id, its own symmetric key).
    #[command(subcommand)]
    Enrollment(EnrollmentCommand),
    /// Print the device key an enrollment group gives REGISTRATION_ID (its primary
    /// key, or the secondary with --secondary).
    DeviceKey {
        /// The enrollment group.
        group: String,
        /// The registration id.
        registration_id: String,
        /// Derive from the group's secondary key.
        #[arg(long)]
        secondary: bool,
        /// Where the hub is.
        #[command(flatten)]
        target: Target,
    },
    /// List registrations (of one group with --group).
    Registrations {
        /// Only this group's.
        #[arg(long)]
        group: Option<String>,
        /// Where the hub is.
        #[command(flatten)]
        target: Target,
    },
}

/// `hub dps group|enrollment …`.
#[derive(Subcommand, Debug)]
pub enum EnrollmentCommand {
    /// Create or replace one; keys are generated unless given.
    Create(CreateArgs),
    /// Print one.
    Get {
        /// The group id or registration id.
        id: String,
        /// Where the hub is.
        #[command(flatten)]
        target: Target,
    },
    /// List all.
    List {
        /// Where the hub is.
        #[command(flatten)]
        target: Target,
    },
    /// Delete one (its registrations and devices stay).
    Delete {
        /// The group id or registration id.
        id: String,
        /// Where the hub is.
        #[command(flatten)]
        target: Target,
    },
}

/// `hub dps group|enrollment create` arguments.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The group id or registration id.
    id: String,
    /// Primary key (base64 of 16 to 64 bytes); generated when absent.
    #[arg(long)]
    primary_key: Option<String>,
    /// Secondary key; generated when absent.
    #[arg(long)]
    secondary_key: Option<String>,
    /// Create it disabled: registrations answer `disabled`.
    #[arg(long)]
    disabled: bool,
    /// Initial twin as JSON: `{"tags": {…}, "properties": {"desired": {…}}}`.
    #[arg(long)]
    initial_twin: Option<String>,
    /// Reset the twin to the initial twin when a device registers again
    /// (reprovisionPolicy.migrateDeviceData = false).
    #[arg(long)]
    reset_on_reprovision: bool,
    /// Mark the devices as IoT Edge devices (capabilities.iotEdge).
    #[arg(long)]
    iot_edge: bool,
    /// Where the hub is.
    #[command(flatten)]
    target: Target,
}

fn collection(kind: EnrollmentKind) -> &'static str {
    match kind {
        EnrollmentKind::Group => "/enrollmentGroups",
        EnrollmentKind::Individual => "/enrollments",
    }
}

/// Runs a `hub dps` command.
pub async fn dps(command: DpsCommand) -> Result<()> {
    match command {
        DpsCommand::Scope { location } => {
            let config = location.load(Overrides::default())?;
            let scope = IdScope::load_or_create(&scope_path(&config.data_dir))?;
            println!("{scope}");
            Ok(())
        }
        DpsCommand::Group(command) => enrollment(EnrollmentKind::Group, command).await,
        DpsCommand::Enrollment(command) => enrollment(EnrollmentKind::Individual, command).await,
        DpsCommand::DeviceKey {
            group,
            registration_id,
            secondary,
            target,
        } => {
            let client = ApiClient::connect(&target, &[Scope::ProvisioningRead])?;
            let path = format!("/enrollmentGroups/{}", path_segment(&group));
            let group: Value = client
                .send(client.request(Method::GET, &path))
                .await?
                .json()
                .await?;
            let slot = if secondary {
                "secondaryKey"
            } else {
                "primaryKey"
            };
            let key = group["attestation"]["symmetricKey"][slot]
                .as_str()
                .context("the group has no symmetric key")?;
            match derive_device_key(key, &registration_id) {
                Some(derived) => {
                    println!("{derived}");
                    Ok(())
                }
                None => bail!("the group key is not base64"),
            }
        }
        DpsCommand::Registrations { group, target } => {
            let client = ApiClient::connect(&target, &[Scope::ProvisioningRead])?;
            let groups: Vec<String> = match group {
                Some(group) => vec![group],
                None => {
                    let all: Vec<Value> = client
                        .send(
                            client
                                .request(Method::POST, "/enrollmentGroups/query")
                                .json(&json!({"query": "*"})),
                        )
                        .await?
                        .json()
                        .await?;
                    all.iter()
                        .filter_map(|g| g["enrollmentGroupId"].as_str().map(str::to_string))
                        .collect()
                }
            };
            let mut registrations = Vec::new();
            for group in groups {
                let path = format!("/registrations/{}/query", path_segment(&group));
                let page: Vec<Value> = client
                    .send(
                        client
                            .request(Method::POST, &path)
                            .json(&json!({"query": "*"})),
                    )
                    .await?
                    .json()
                    .await?;
                registrations.extend(page);
            }
            print_json(&Value::Array(registrations))
        }
    }
}

async fn enrollment(kind: EnrollmentKind, command: EnrollmentCommand) -> Result<()> {
    let base = collection(kind);
    match command {
        EnrollmentCommand::Create(args) => {
            let client = ApiClient::connect(&args.target, &[Scope::ProvisioningWrite])?;
            let mut body = json!({
                "attestation": {
                    "type": "symmetricKey",
                    "symmetricKey": {
                        "primaryKey": args.primary_key.unwrap_or_default(),
                        "secondaryKey": args.secondary_key.unwrap_or_default(),
                    }
                },
                "provisioningStatus": if args.disabled { "disabled" } else { "enabled" },
                "reprovisionPolicy": {
                    "updateHubAssignment": true,
                    "migrateDeviceData": !args.reset_on_reprovision,
                },
                "capabilities": { "iotEdge": args.iot_edge },
            });
            if let Some(twin) = &args.initial_twin {
                body["initialTwin"] =
                    serde_json::from_str(twin).context("--initial-twin is not JSON")?;
            }
            let path = format!("{base}/{}", path_segment(&args.id));
            let response = client
                .send(client.request(Method::PUT, &path).json(&body))
                .await?;
            print_json(&response.json().await?)
        }
        EnrollmentCommand::Get { id, target } => {
            let client = ApiClient::connect(&target, &[Scope::ProvisioningRead])?;
            let path = format!("{base}/{}", path_segment(&id));
            print_json(
                &client
                    .send(client.request(Method::GET, &path))
                    .await?
                    .json()
                    .await?,
            )
        }
        EnrollmentCommand::List { target } => {
            let client = ApiClient::connect(&target, &[Scope::ProvisioningRead])?;
            let request = client
                .request(Method::POST, &format!("{base}/query"))
                .json(&json!({"query": "*"}));
            print_json(&client.send(request).await?.json().await?)
        }
        EnrollmentCommand::Delete { id, target } => {
            let client = ApiClient::connect(&target, &[Scope::ProvisioningWrite])?;
            let path = format!("{base}/{}", path_segment(&id));
            client.send(client.request(Method::DELETE, &path)).await?;
            eprintln!("deleted {id}");
            Ok(())
        }
    }
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
