//! The end-to-end test harness: starts the real `hub` binary on ephemeral loopback
//! ports with a data dir of the test's choosing, waits for its `hub ready` line, and
//! hands out clients. Tests live in `tests/tests/`, one file per behaviour.
//!
//! The binary is the one cargo built next to the test executables
//! (`target/<profile>/hub`; `cargo test --workspace` builds it), or `$HUB_BIN`.
//!
//! [`inproc`] runs the hub through the library instead, with recording capability
//! services, [`mqtt`] is a raw MQTT test client, and [`nats`] starts a real NATS
//! JetStream cluster (loopback, free ports, temp dirs) for the cluster-mode tests.
//! [`azure`] holds what the tests running Azure's Node.js SDKs share.
//! [`webhook`] runs a webhook receiver process for the routing tests.

pub mod amqp;
pub mod azure;
pub mod haproxy;
pub mod inproc;
pub mod mqtt;
pub mod nats;
pub mod webhook;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// How long a hub may take to print `hub ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a hub may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Path of the `hub` binary under test.
pub fn hub_binary() -> Result<PathBuf> {
    workspace_binary("hub", "HUB_BIN")
}

/// Path of the `firmware-sim` binary under test (`$FIRMWARE_SIM_BIN` overrides).
pub fn firmware_sim_binary() -> Result<PathBuf> {
    workspace_binary("firmware-sim", "FIRMWARE_SIM_BIN")
}

/// A binary cargo built next to the test executables, or the path in `$env_var`.
fn workspace_binary(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    // target/<profile>/deps/<test-exe> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("unexpected test executable location")?;
    let binary = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !binary.exists() {
        bail!(
            "no {name} binary at {}: run the suite with `cargo test --workspace` (which builds it), \
             or `cargo build -p {name}` first, or set {env_var}",
            binary.display()
        );
    }
    Ok(binary)
}

/// A `hub` command with the test environment (no inherited `HUB_*` variables).
pub fn hub_command() -> Result<Command> {
    let mut command = Command::new(hub_binary()?);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HUB_") {
            command.env_remove(&key);
        }
    }
    command.kill_on_drop(true);
    Ok(command)
}

/// What a finished `hub` invocation printed.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `hub ARGS…` to completion.
pub async fn run_hub(args: &[&str]) -> Result<Output> {
    let output = hub_command()?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run hub")?;
    Ok(Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Options for starting a hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    data_dir: PathBuf,
    wrapper: Vec<String>,
    http: String,
    mqtt: String,
    mqtts: String,
    amqps: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl HubOptions {
    /// A hub on `data_dir` with every listener on an ephemeral loopback port.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            wrapper: Vec::new(),
            http: "127.0.0.1:0".to_string(),
            mqtt: "127.0.0.1:0".to_string(),
            mqtts: "127.0.0.1:0".to_string(),
            amqps: "127.0.0.1:0".to_string(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Runs the hub through `program args… hub serve …` (e.g. `prlimit`).
    pub fn wrapped_in<I, S>(mut self, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.wrapper = command.into_iter().map(Into::into).collect();
        self
    }

    /// Listens for AMQP over TLS on `addr` instead of an ephemeral port.
    pub fn amqps(mut self, addr: &str) -> Self {
        self.amqps = addr.to_string();
        self
    }

    /// Listens for MQTT over TLS on `addr` instead of an ephemeral port.
    pub fn mqtts(mut self, addr: &str) -> Self {
        self.mqtts = addr.to_string();
        self
    }

    /// Listens for MQTT on `addr` instead of an ephemeral port (a restarted hub that
    /// devices must find again).
    pub fn mqtt(mut self, addr: &str) -> Self {
        self.mqtt = addr.to_string();
        self
    }

    /// Listens for HTTP on `addr` instead of an ephemeral port.
    pub fn http(mut self, addr: &str) -> Self {
        self.http = addr.to_string();
        self
    }

    /// Adds arguments after `hub serve`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the hub.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn command(&self) -> Result<Command> {
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = hub_command()?;
                let hub = hub_binary()?;
                let std_command = command.as_std_mut();
                let mut wrapped = std::process::Command::new(program);
                wrapped.args(args).arg(hub);
                for (key, _) in std_command.get_envs() {
                    wrapped.env_remove(key);
                }
                let mut command = Command::from(wrapped);
                command.kill_on_drop(true);
                command
            }
            None => hub_command()?,
        };
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--http", &self.http])
            .args(["--mqtt", &self.mqtt, "--mqtts", &self.mqtts])
            .args(["--amqps", &self.amqps])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        Ok(command)
    }

    /// Starts the hub and waits for its `hub ready` line.
    pub async fn start(self) -> Result<Hub> {
        let mut child = self.command()?.spawn().context("cannot start hub")?;
        let stderr_log = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(collect(stderr, Arc::clone(&stderr_log)));
        }
        let stdout = child.stdout.take().context("hub stdout not captured")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("hub ready") {
                    return Ok::<_, std::io::Error>(Some(rest.to_string()));
                }
            }
            Ok(None)
        })
        .await;
        let log = || stderr_log.lock().map(|s| s.clone()).unwrap_or_default();
        let fields = match ready {
            Ok(Ok(Some(fields))) => fields,
            Ok(Ok(None)) => {
                let status = child.wait().await?;
                // Give the stderr collector a moment to drain the pipe.
                tokio::time::sleep(Duration::from_millis(50)).await;
                bail!(
                    "hub exited ({status}) before it was ready; stderr:\n{}",
                    log()
                );
            }
            Ok(Err(err)) => bail!("reading hub stdout: {err}"),
            Err(_) => bail!("hub not ready after {READY_TIMEOUT:?}; stderr:\n{}", log()),
        };
        // Keep draining stdout so the hub never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let endpoints = parse_ready(&fields)?;
        Ok(Hub {
            child,
            data_dir: self.data_dir,
            endpoints,
            stderr: stderr_log,
            http: reqwest::Client::new(),
        })
    }

    /// Runs the hub expecting it to fail start-up; returns its output.
    pub async fn start_expecting_failure(self) -> Result<Output> {
        let child = self.command()?.spawn().context("cannot start hub")?;
        let output = tokio::time::timeout(READY_TIMEOUT, child.wait_with_output())
            .await
            .context("hub neither failed nor exited")??;
        let out = Output {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        if out.stdout.contains("hub ready") {
            bail!(
                "hub started although it should have failed:\n{}",
                out.stdout
            );
        }
        Ok(out)
    }
}

async fn collect(stream: impl AsyncRead + Unpin, sink: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(mut sink) = sink.lock() {
            sink.push_str(&line);
            sink.push('\n');
        }
    }
}

/// Parses ` mqtt=ADDR mqtts=ADDR http=ADDR` (the part after `hub ready`).
pub fn parse_ready(fields: &str) -> Result<HashMap<String, SocketAddr>> {
    fields
        .split_whitespace()
        .map(|field| {
            let (key, addr) = field
                .split_once('=')
                .with_context(|| format!("malformed ready field {field:?}"))?;
            let addr = addr
                .parse()
                .with_context(|| format!("malformed address in {field:?}"))?;
            Ok((key.to_string(), addr))
        })
        .collect()
}

/// A running hub process; killed when dropped.
#[derive(Debug)]
pub struct Hub {
    child: Child,
    data_dir: PathBuf,
    endpoints: HashMap<String, SocketAddr>,
    stderr: Arc<Mutex<String>>,
    http: reqwest::Client,
}

impl Hub {
    /// Starts a hub on `data_dir` with default options.
    pub async fn start(data_dir: &Path) -> Result<Self> {
        HubOptions::new(data_dir).start().await
    }

    /// The hub's process id (for CPU measurements from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A bound address from the ready line (`http`, `mqtt`, `mqtts`).
    pub fn endpoint(&self, name: &str) -> Option<SocketAddr> {
        self.endpoints.get(name).copied()
    }

    /// Base URL of the REST API.
    pub fn url(&self) -> String {
        match self.endpoint("http") {
            Some(addr) => format!("http://{addr}"),
            None => String::from("http://no-http-endpoint"),
        }
    }

    /// A plain HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// What the hub wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Mints a token with `hub token` for `scopes` (comma-separated).
    pub async fn token(&self, scopes: &str) -> Result<String> {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let out = run_hub(&[
            "token",
            "--data-dir",
            &data_dir,
            "--scope",
            scopes,
            "--ttl",
            "600",
        ])
        .await?;
        if !out.status.success() {
            bail!("hub token failed: {}", out.stderr);
        }
        Ok(out.stdout.trim().to_string())
    }

    /// A token with every scope.
    pub async fn owner_token(&self) -> Result<String> {
        self.token("registry:read,registry:write,service:connect")
            .await
    }

    /// Runs a CLI command (`hub ARGS… --data-dir DIR`) against this hub.
    pub async fn cli(&self, args: &[&str]) -> Result<Output> {
        let data_dir = self.data_dir.to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--data-dir", &data_dir]);
        run_hub(&all).await
    }

    /// Creates a SAS device through the REST API; returns its primary key (base64).
    pub async fn create_device(&self, token: &str, id: &str) -> Result<String> {
        let response = self
            .http
            .put(format!("{}/devices/{id}", self.url()))
            .bearer_auth(token)
            .json(&serde_json::json!({}))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("creating device {id}: {}", response.status());
        }
        let device: serde_json::Value = response.json().await?;
        device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .map(str::to_string)
            .context("the created device has no primary key")
    }

    /// Connects `id` over MQTT/TCP with a SAS token signed with `key`; fails unless the
    /// CONNACK is 0.
    pub async fn connect_device(
        &self,
        id: &str,
        key: &str,
        clean_session: bool,
    ) -> Result<mqtt::RawClient<tokio::net::TcpStream>> {
        let mut client = mqtt::tcp(self.endpoint("mqtt").context("no mqtt endpoint")?).await?;
        let token = mqtt::sas("localhost", id, key, 600)?;
        let ack = client
            .connect(
                id,
                Some(&mqtt::azure_username("localhost", id)),
                Some(&token),
                clean_session,
            )
            .await?;
        if ack.code != rumqttc::mqttbytes::v4::ConnectReturnCode::Success {
            bail!("{id} refused: {:?}", ack.code);
        }
        Ok(client)
    }

    /// `GET path` on the service API with `token`; the JSON answer of a 2xx.
    pub async fn get_json(&self, token: &str, path: &str) -> Result<serde_json::Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url()))
            .bearer_auth(token)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "GET {path}: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        Ok(response.json().await?)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.url()))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Every telemetry message of every partition, from the earliest offset.
    pub async fn read_telemetry(&self, token: &str) -> Result<Vec<serde_json::Value>> {
        let info = self.get_json(token, "/streams/telemetry").await?;
        let partitions = info["partitionCount"]
            .as_u64()
            .context("no partitionCount")?;
        let mut all = Vec::new();
        for partition in 0..partitions {
            let mut from = 0u64;
            loop {
                let path = format!(
                    "/streams/telemetry/partitions/{partition}/messages?from={from}&max=1000"
                );
                let page = self.get_json(token, &path).await?;
                let messages = page["messages"]
                    .as_array()
                    .with_context(|| format!("no messages array in {page}"))?;
                if messages.is_empty() {
                    break;
                }
                all.extend(messages.iter().cloned());
                from = page["nextOffset"].as_u64().context("no nextOffset")?;
            }
        }
        Ok(all)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn stop(mut self) -> Result<ExitStatus> {
        let pid = self.child.id().context("hub already exited")?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .context("cannot signal hub")?;
        tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .context("hub did not exit after SIGTERM")?
            .context("cannot wait for hub")
    }

    /// Kills the hub with SIGKILL (no shutdown) and waits for it.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("cannot kill hub")
    }
}
