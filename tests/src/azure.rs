//! What the tests running Azure's own SDKs share: a Python with the device SDK
//! ([`azure_python`]); the pinned npm packages (one
//! `node_modules` for the device and the service SDK), installed into
//! `target/azure-node` when missing, and a hub on a loopback address of its own whose
//! MQTT/TLS listener is on 8883 and HTTPS listener on 443 — the ports Azure's SDKs
//! always dial — named by that address (`--hostname`).

use std::path::{Path, PathBuf};

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::{Hub, HubOptions};

/// The SDK packages the Node tests pin (the same list `.ci/run` installs): Azure's
/// device SDK with its MQTT transport, its service SDK, the Event Hubs SDK that reads
/// the Event Hub-compatible endpoint, and the provisioning device client with the MQTT
/// and HTTP transports, the symmetric-key security client, and the provisioning
/// service SDK.
pub const NODE_SDK_PACKAGES: [&str; 9] = [
    "azure-iot-device@1.18.4",
    "azure-iot-device-mqtt@1.16.4",
    "azure-iothub@1.16.6",
    "@azure/event-hubs@6.0.4",
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
/// SDKs always dial), whose AMQP/TLS listener is on 127.0.0.N:5671 (where the service
/// SDK's `Amqp` transport and the Event Hubs SDKs dial) and, with `https`, whose HTTPS listener is on 127.0.0.N:443
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
            .amqps(&format!("{host}:5671"))
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

/// Runs `tests/compat/SCRIPT` with node and the Azure SDKs, the hub's CA `ca` trusted,
/// and `args`. See [`run_steps`].
pub async fn run_node_script(
    script: &str,
    args: &[&str],
    ca: &Path,
    timeout: Duration,
) -> Result<Vec<String>> {
    let modules = azure_node_modules().await?;
    let mut command = Command::new("node");
    command
        .arg(workspace().join("tests/compat").join(script))
        .args(args)
        .env("NODE_PATH", &modules)
        // The SDKs have no CA option: Node adds this file to its trust store.
        .env("NODE_EXTRA_CA_CERTS", ca);
    run_steps(command, script, timeout).await
}

/// Runs `tests/compat/SCRIPT` with the Python that has `azure-eventhub`
/// ([`azure_eventhub_python`]) and `args`. See [`run_steps`].
pub async fn run_python_script(
    script: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Vec<String>> {
    let python = azure_eventhub_python().await?;
    let mut command = Command::new(python);
    command
        .arg(workspace().join("tests/compat").join(script))
        .args(args);
    run_steps(command, script, timeout).await
}

/// Runs `command` (a script named `script`), which prints one JSON object a line
/// (`{"event":"step","name"}`, `{"event":"done"}`, `{"event":"error"}`), within
/// `timeout`. Returns the steps it finished; fails at its error or when it does not
/// finish.
pub async fn run_steps(
    mut command: Command,
    script: &str,
    timeout: Duration,
) -> Result<Vec<String>> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {script} (is its interpreter installed?)"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut steps = Vec::new();
    let mut done = false;
    let deadline = tokio::time::Instant::now() + timeout;
    while let Some(line) = tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .with_context(|| format!("{script} did not finish; steps {steps:?}"))??
    {
        let event: Value =
            serde_json::from_str(&line).with_context(|| format!("{script} said {line:?}"))?;
        match event["event"].as_str() {
            Some("step") => steps.push(event["name"].as_str().unwrap_or_default().to_string()),
            Some("done") => done = true,
            Some("error") => bail!("{script} failed after steps {steps:?}: {}", event["error"]),
            _ => bail!("unexpected output from {script}: {line}"),
        }
    }
    let status = tokio::time::timeout_at(deadline, child.wait()).await??;
    anyhow::ensure!(status.success(), "{script} exited with {status}");
    anyhow::ensure!(done, "{script} ended without finishing; steps {steps:?}");
    Ok(steps)
}

/// The Python packages the Event Hubs test pins (the same `.ci/run` installs into
/// `target/azure-venv`): Azure's Event Hubs SDK, and paho-mqtt to publish telemetry;
/// with the device SDK the venv is shared with (`azure_sdk_compat.rs`), so a venv
/// created here serves that test too.
pub const PYTHON_EVENTHUB_PACKAGES: [&str; 3] = [
    "azure-eventhub==5.15.1",
    "paho-mqtt==1.6.1",
    "azure-iot-device>=2.12,<3",
];

/// A Python with `azure-eventhub` and `paho-mqtt`: `$HUB_AZURE_PYTHON`, or
/// `target/azure-venv` (created when missing; the packages installed from PyPI when
/// they do not import). Fails saying how to install them.
pub async fn azure_eventhub_python() -> Result<PathBuf> {
    let python = match std::env::var_os("HUB_AZURE_PYTHON") {
        Some(python) => PathBuf::from(python),
        None => workspace().join("target/azure-venv/bin/python3"),
    };
    let hint = || {
        format!(
            "the Event Hubs compatibility test needs Python 3 with Azure's Event Hubs SDK; \
             install it with\n  python3 -m venv target/azure-venv && target/azure-venv/bin/pip install {}\n\
             (.ci/run does this; apt-get install python3-venv if venv is missing), or point \
             HUB_AZURE_PYTHON at such an interpreter",
            PYTHON_EVENTHUB_PACKAGES.map(|p| format!("'{p}'")).join(" ")
        )
    };
    let imports = || async {
        Command::new(&python)
            .args(["-c", "import azure.eventhub, paho.mqtt"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|status| status.success())
    };
    if imports().await {
        return Ok(python);
    }
    if std::env::var_os("HUB_AZURE_PYTHON").is_none() {
        let venv = workspace().join("target/azure-venv");
        if !python.exists() {
            let created = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .await;
            if !matches!(created, Ok(status) if status.success()) {
                bail!("{}", hint());
            }
        }
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(PYTHON_EVENTHUB_PACKAGES)
            .status()
            .await;
        if matches!(installed, Ok(status) if status.success()) && imports().await {
            return Ok(python);
        }
    }
    bail!("{}", hint())
}
