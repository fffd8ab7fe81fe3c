//! `hub device create|get|list|delete|disable|enable`: registry operations over the
//! REST API; results print as JSON on stdout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use hub::auth::service::Scope;
use reqwest::Method;
use serde_json::{Value, json};

use super::Target;
use super::client::{ApiClient, path_segment};

/// Device registry commands.
#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Create a device; SAS keys are generated unless given.
    Create {
        /// The device id.
        id: String,
        /// How the device authenticates.
        #[arg(long, value_enum, default_value_t = AuthKind::Sas)]
        auth: AuthKind,
        /// Primary symmetric key (base64); generated when absent.
        #[arg(long)]
        primary_key: Option<String>,
        /// Secondary symmetric key (base64); generated when absent.
        #[arg(long)]
        secondary_key: Option<String>,
        /// Certificate thumbprint (hex SHA-256 or SHA-1), for self-signed devices.
        #[arg(long)]
        thumbprint: Option<String>,
        /// PEM public key file for ES256/RS256 device JWTs (repeatable).
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
        /// Create the device disabled.
        #[arg(long)]
        disabled: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print a device.
    Get {
        /// The device id.
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print every device (follows continuation tokens).
    List {
        /// Page size used when fetching.
        #[arg(long, default_value_t = 100)]
        page_size: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a device.
    Delete {
        /// The device id.
        id: String,
        /// Delete only if the device's etag is this one.
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Disable a device: it is refused and its connection closed.
    Disable {
        /// The device id.
        id: String,
        /// Why (stored as statusReason).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Print a SAS token for a device (signed with its primary key) and the MQTT
    /// username to use with it.
    Sas {
        /// The device id.
        id: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Host name the device connects to (the hub's `hostname`).
        #[arg(long, default_value = "localhost")]
        hostname: String,
        #[command(flatten)]
        target: Target,
    },
    /// Enable a device.
    Enable {
        /// The device id.
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Authentication types on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum AuthKind {
    /// SAS tokens (symmetric keys).
    Sas,
    /// Device-signed JWTs.
    Jwt,
    /// X.509 with a registered thumbprint.
    SelfSigned,
    /// X.509 signed by the hub's device CA.
    Ca,
}

impl AuthKind {
    fn api_name(self) -> &'static str {
        match self {
            AuthKind::Sas => "sas",
            AuthKind::Jwt => "jwt",
            AuthKind::SelfSigned => "selfSigned",
            AuthKind::Ca => "certificateAuthority",
        }
    }
}

/// Runs a device command.
pub async fn device(command: DeviceCommand) -> Result<()> {
    match command {
        DeviceCommand::Create {
            id,
            auth,
            primary_key,
            secondary_key,
            thumbprint,
            public_keys,
            disabled,
            target,
        } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryWrite])?;
            let public_keys = public_keys
                .iter()
                .map(|path| {
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut authentication = json!({ "type": auth.api_name() });
            if primary_key.is_some() || secondary_key.is_some() {
                authentication["symmetricKey"] =
                    json!({ "primaryKey": primary_key, "secondaryKey": secondary_key });
            }
            if !public_keys.is_empty() {
                authentication["publicKeys"] = json!(public_keys);
            }
            if let Some(thumbprint) = thumbprint {
                authentication["x509Thumbprint"] = json!({ "primaryThumbprint": thumbprint });
            }
            let body = json!({
                "deviceId": id,
                "status": if disabled { "disabled" } else { "enabled" },
                "authentication": authentication,
            });
            let request = client.request(Method::PUT, &device_path(&id)).json(&body);
            print_json(&client.send(request).await?.json().await?)
        }
        DeviceCommand::Get { id, target } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryRead])?;
            let response = client
                .send(client.request(Method::GET, &device_path(&id)))
                .await?;
            print_json(&response.json().await?)
        }
        DeviceCommand::List { page_size, target } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryRead])?;
            let all = client
                .all_pages(|| {
                    client
                        .request(Method::GET, "/devices")
                        .header("x-ms-max-item-count", page_size.to_string())
                })
                .await?;
            print_json(&Value::Array(all))
        }
        DeviceCommand::Delete { id, etag, target } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryWrite])?;
            let mut request = client.request(Method::DELETE, &device_path(&id));
            if let Some(etag) = etag {
                request = request.header("If-Match", format!("\"{etag}\""));
            }
            client.send(request).await?;
            eprintln!("deleted {id}");
            Ok(())
        }
        DeviceCommand::Disable { id, reason, target } => {
            set_status(&target, &id, "disabled", reason).await
        }
        DeviceCommand::Enable { id, target } => set_status(&target, &id, "enabled", None).await,
        DeviceCommand::Sas {
            id,
            ttl,
            hostname,
            target,
        } => {
            let client = ApiClient::connect(&target, &[Scope::RegistryRead])?;
            let device: Value = client
                .send(client.request(Method::GET, &device_path(&id)))
                .await?
                .json()
                .await?;
            let key = device["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .context("the device has no symmetric key (it is not a SAS device)")?;
            let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, key)
                .context("the device key is not base64")?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let token = hub::auth::sas::sign(&hostname, &id, &key, now + ttl);
            print_json(&json!({
                "clientId": id,
                "username": format!("{hostname}/{id}/?api-version=2021-04-12"),
                "password": token,
            }))
        }
    }
}

fn device_path(id: &str) -> String {
    format!("/devices/{}", path_segment(id))
}

/// Reads the device's etag, then updates its status under that etag.
async fn set_status(target: &Target, id: &str, status: &str, reason: Option<String>) -> Result<()> {
    let client = ApiClient::connect(target, &[Scope::RegistryRead, Scope::RegistryWrite])?;
    let current: Value = client
        .send(client.request(Method::GET, &device_path(id)))
        .await?
        .json()
        .await?;
    let etag = current
        .get("etag")
        .and_then(Value::as_str)
        .context("the hub's answer has no etag")?;
    let mut body = json!({ "deviceId": id, "status": status });
    if let Some(reason) = reason {
        body["statusReason"] = json!(reason);
    }
    let request = client
        .request(Method::PUT, &device_path(id))
        .header("If-Match", format!("\"{etag}\""))
        .json(&body);
    print_json(&client.send(request).await?.json().await?)
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
