//! What the tests running Azure's own SDKs share: a Python with the device SDK
//! ([`azure_python`]); the pinned npm packages (one
//! `node_modules` for the device and the service SDK), installed into
//! `target/azure-node` when missing, and a hub on a loopback address of its own whose
//! MQTT/TLS listener is on 8883 and HTTPS listener on 443 — the ports Azure's SDKs
//! always dial — named by that address (`--hostname`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde_json::Value;
use tokio::process::Command;

use crate::{Hub, HubOptions};

/// The SDK packages the Node tests pin (the same list `.ci/run` installs): Azure's
/// device SDK with its MQTT transport, its service SDK, and its provisioning device
/// client with the MQTT and HTTP transports, the symmetric-key security client, and
/// its provisioning service SDK.
pub const NODE_SDK_PACKAGES: [&str; 8] = [
    "azure-iot-device@1.18.4",
    "azure-iot-device-mqtt@1.16.4",
    "azure-iothub@1.16.6",
    "azure-iot-provisioning-device@1.9.1",
    "azure-iot-provisioning-device-mqtt@1.8.1",
    "azure-iot-provisioning-device-http@1.9.1",
    "azure-iot-security-symmetric-key@1.8.2",
    "azure-iot-provisioning-service@1.11.2",
];

/// The Python packages the tests running Azure's Python device SDK pin (the same
/// `.ci/run` installs into `target/azure-venv`).
pub const PYTHON_SDK_PACKAGES: [&str; 2] = ["azure-iot-device>=2.12,<3", "paho-mqtt==1.6.1"];

/// A Python with Azure's device SDK: `$HUB_AZURE_PYTHON`, or `target/azure-venv`,
/// created from PyPI when it does not exist yet (`.ci/run` creates it beforehand).
/// Fails saying how to install it.
pub async fn azure_python() -> Result<PathBuf> {
    if let Some(python) = std::env::var_os("HUB_AZURE_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let venv = workspace().join("target/azure-venv");
    let python = venv.join("bin/python3");
    let install_hint = || {
        format!(
            "the Azure SDK compatibility tests need Python 3 with Azure's device SDK; create it with\n  \
             python3 -m venv target/azure-venv && target/azure-venv/bin/pip install '{}' '{}'\n\
             (.ci/run does this), or point HUB_AZURE_PYTHON at such an interpreter",
            PYTHON_SDK_PACKAGES[0], PYTHON_SDK_PACKAGES[1]
        )
    };
    if !python.exists() {
        let created = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .await;
        let installed = match created {
            Ok(status) if status.success() => {
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet"])
                    .args(PYTHON_SDK_PACKAGES)
                    .status()
                    .await
            }
            other => other,
        };
        if !matches!(installed, Ok(status) if status.success()) {
            bail!("{}", install_hint());
        }
    }
    let check = Command::new(&python)
        .args(["-c", "import azure.iot.device, paho.mqtt"])
        .status()
        .await;
    if !matches!(check, Ok(status) if status.success()) {
        bail!(
            "{} has no azure-iot-device: {}",
            python.display(),
            install_hint()
        );
    }
    Ok(python)
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The `node_modules` holding the SDKs: `$HUB_AZURE_NODE_MODULES`, or
/// `target/azure-node/node_modules`, installed from the npm registry (pinned) when a
/// package is missing or of another version. Fails saying how to install them.
pub async fn azure_node_modules() -> Result<PathBuf> {
    if let Some(modules) = std::env::var_os("HUB_AZURE_NODE_MODULES") {
        return Ok(PathBuf::from(modules));
    }
    let prefix = workspace().join("target/azure-node");
    let modules = prefix.join("node_modules");
    let install_hint = || {
        format!(
            "the Azure Node SDK compatibility tests need node, npm and Azure's SDKs; \
             install them with\n  npm install --prefix target/azure-node --no-audit --no-fund --save-exact {}\n\
             (.ci/run does this), or point HUB_AZURE_NODE_MODULES at such a node_modules",
            NODE_SDK_PACKAGES.join(" ")
        )
    };
    let installed = |modules: &Path| {
        NODE_SDK_PACKAGES.iter().all(|package| {
            let (name, version) = package.rsplit_once('@').unwrap_or((package, ""));
            std::fs::read_to_string(modules.join(name).join("package.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                .is_some_and(|manifest| manifest["version"] == version)
        })
    };
    if !installed(&modules) {
        std::fs::create_dir_all(&prefix)?;
        let status = Command::new("npm")
            .arg("install")
            .arg("--prefix")
            .arg(&prefix)
            .args(["--no-audit", "--no-fund", "--save-exact"])
            .args(NODE_SDK_PACKAGES)
            .status()
            .await;
        if !matches!(status, Ok(status) if status.success()) || !installed(&modules) {
            bail!("{}", install_hint());
        }
    }
    Ok(modules)
}

/// Starts a hub whose MQTT/TLS listener is on 127.0.0.N:8883 (the port the device
/// SDKs always dial) and, with `https`, whose HTTPS listener is on 127.0.0.N:443
/// (where `MqttWs` and the service SDKs dial), named `--hostname 127.0.0.N`. N's third
/// octet starts at `third` and a few are tried in case one is taken; each test picks
/// its own range (DECISIONS.md, "HTTPS listener and MQTT over WebSockets") so tests
/// running at once do not collide. Returns the hub and its host name.
pub async fn start_hub_on_loopback(dir: &Path, third: u32, https: bool) -> Result<(Hub, String)> {
    let base = 2 + (std::process::id() % 200);
    let mut last = None;
    for i in 0..10 {
        let host = format!("127.0.{}.{}", third + i, base);
        let mut options = HubOptions::new(dir)
            .mqtts(&format!("{host}:8883"))
            .args(["--hostname", host.as_str()]);
        if https {
            options = options.args(["--https", &format!("{host}:443")]);
        }
        match options.start().await {
            Ok(hub) => return Ok((hub, host)),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no address to try")))
}
