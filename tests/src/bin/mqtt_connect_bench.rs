//! `mqtt_connect_bench`: measures what MQTT 3.1.1 connections cost a broker (the hub or
//! Mosquitto) over raw TCP on rumqttc's packet codec. `idle` holds N connections open
//! and reads the server's RSS, `rate` measures CONNECT→CONNACK handshakes per second
//! and their latency, `provision` registers devices on the hub and writes their SAS
//! credentials for the other two.
//!
//! ```text
//! mqtt_connect_bench provision --http http://127.0.0.1:8080 --token TOKEN --count 15000 \
//!     [--prefix bench-] [--hostname localhost] [--ttl-days 30] [--in-flight 32] --out FILE
//! mqtt_connect_bench idle --addr 127.0.0.1:1883 --connections 15000 [--sas-file FILE] \
//!     [--hold-secs 20] [--in-flight 100] [--server-pid PID] [--keep-alive 0] [--clean-session 1]
//! mqtt_connect_bench rate --addr 127.0.0.1:1883 --total 50000 [--in-flight 100] \
//!     [--sas-file FILE] [--server-pid PID] [--keep-alive 0] [--clean-session 1]
//! ```
//!
//! The SAS file has one line per device: `device_id<TAB>username<TAB>password`.
//! Connection `i` uses line `i % lines`; without a file it connects as `bench-{i}`
//! with no credentials. Every phase is bounded by `--timeout-secs` per handshake and
//! `--max-secs` overall.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest packet accepted from the server (a CONNACK is 4 bytes).
const MAX_PACKET: usize = 64 * 1024;
/// MQTT DISCONNECT: fixed header 0xE0, remaining length 0.
const DISCONNECT: [u8; 2] = [0xE0, 0x00];
/// File descriptors kept free for stdio, the runtime and the like.
const SPARE_FDS: u64 = 64;

const USAGE: &str =
    "usage: mqtt_connect_bench <provision|idle|rate> --key value ... (see the crate docs)";

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().context(USAGE)?;
    let rest: Vec<String> = args.collect();
    match mode.as_str() {
        "provision" => provision(Opts::parse(&rest, &[PROVISION_KEYS])?).await,
        "idle" => idle(Opts::parse(&rest, &[IDLE_KEYS, CONNECT_KEYS])?).await,
        "rate" => rate(Opts::parse(&rest, &[RATE_KEYS, CONNECT_KEYS])?).await,
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown mode {other:?}; {USAGE}"),
    }
}

// ---------------------------------------------------------------------------------
// Options

const PROVISION_KEYS: &[&str] = &[
    "http",
    "token",
    "count",
    "prefix",
    "hostname",
    "ttl-days",
    "in-flight",
    "out",
];
const CONNECT_KEYS: &[&str] = &[
    "addr",
    "sas-file",
    "in-flight",
    "server-pid",
    "keep-alive",
    "clean-session",
    "timeout-secs",
    "max-secs",
];
const IDLE_KEYS: &[&str] = &["connections", "hold-secs"];
const RATE_KEYS: &[&str] = &["total"];

/// `--key value` pairs.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String], allowed: &[&[&str]]) -> Result<Self> {
        let allowed = |key: &str| allowed.iter().any(|keys| keys.contains(&key));
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let key = arg
                .strip_prefix("--")
                .with_context(|| format!("expected --option, got {arg:?}; {USAGE}"))?;
            if !allowed(key) {
                bail!("unknown option --{key} for this mode; {USAGE}");
            }
            let value = it
                .next()
                .with_context(|| format!("--{key} needs a value"))?;
            map.insert(key.to_string(), value.clone());
        }
        Ok(Self(map))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn required(&self, key: &str) -> Result<&str> {
        self.get(key)
            .with_context(|| format!("--{key} is required; {USAGE}"))
    }

    fn num<T>(&self, key: &str, default: Option<T>) -> Result<T>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match (self.get(key), default) {
            (Some(raw), _) => raw.parse().map_err(|err| anyhow!("--{key} {raw:?}: {err}")),
            (None, Some(default)) => Ok(default),
            (None, None) => bail!("--{key} is required; {USAGE}"),
        }
    }
}

/// What `idle` and `rate` share.
struct ConnectOpts {
    addr: SocketAddr,
    credentials: Arc<Credentials>,
    in_flight: usize,
    server_pid: Option<u32>,
    keep_alive: u16,
    clean_session: bool,
    timeout: Duration,
    max: Duration,
}

impl ConnectOpts {
    fn parse(opts: &Opts) -> Result<Self> {
        let addr = opts.required("addr")?;
        let addr = addr
            .parse()
            .with_context(|| format!("--addr {addr:?}: expected IP:PORT"))?;
        let credentials = match opts.get("sas-file") {
            Some(path) => Credentials::load(Path::new(path))?,
            None => Credentials::Anonymous,
        };
        let in_flight: usize = opts.num("in-flight", Some(100))?;
        if in_flight == 0 {
            bail!("--in-flight must be ≥ 1");
        }
        Ok(Self {
            addr,
            credentials: Arc::new(credentials),
            in_flight,
            server_pid: opts
                .get("server-pid")
                .map(|_| opts.num("server-pid", None))
                .transpose()?,
            keep_alive: opts.num("keep-alive", Some(0))?,
            clean_session: opts.num::<u8>("clean-session", Some(1))? != 0,
            timeout: Duration::from_secs(opts.num("timeout-secs", Some(30))?),
            max: Duration::from_secs(opts.num("max-secs", Some(600))?),
        })
    }

    /// The encoded CONNECT of connection `i`.
    fn connect_packet(&self, i: usize) -> Result<BytesMut> {
        let mut connect = match &*self.credentials {
            Credentials::Anonymous => Connect::new(format!("bench-{i}")),
            Credentials::Sas(lines) => {
                let line = &lines[i % lines.len()];
                let mut connect = Connect::new(line.device_id.as_str());
                connect.login = Some(Login::new(line.username.as_str(), line.password.as_str()));
                connect
            }
        };
        connect.keep_alive = self.keep_alive;
        connect.clean_session = self.clean_session;
        let mut out = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut out, usize::MAX)
            .map_err(|err| anyhow!("cannot encode CONNECT: {err}"))?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------
// Credentials

struct SasLine {
    device_id: String,
    username: String,
    password: String,
}

enum Credentials {
    Anonymous,
    Sas(Vec<SasLine>),
}

impl Credentials {
    fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut lines = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let mut fields = line.split('\t');
            let (Some(device_id), Some(username), Some(password), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                bail!(
                    "{}:{}: expected device_id<TAB>username<TAB>password",
                    path.display(),
                    n + 1
                );
            };
            lines.push(SasLine {
                device_id: device_id.to_string(),
                username: username.to_string(),
                password: password.to_string(),
            });
        }
        if lines.is_empty() {
            bail!("{} has no credentials", path.display());
        }
        Ok(Self::Sas(lines))
    }
}

// ---------------------------------------------------------------------------------
// provision

async fn provision(opts: Opts) -> Result<()> {
    let http = opts.required("http")?.trim_end_matches('/').to_string();
    let token = opts.required("token")?.to_string();
    let count: usize = opts.num("count", None)?;
    let prefix = opts.get("prefix").unwrap_or("bench-").to_string();
    let hostname = opts.get("hostname").unwrap_or("localhost").to_string();
    let ttl_days: u64 = opts.num("ttl-days", Some(30))?;
    let in_flight: usize = opts.num("in-flight", Some(32))?;
    let out = opts.required("out")?.to_string();
    let expiry = unix_now() + ttl_days * 24 * 3600;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let job = Arc::new(ProvisionJob {
        client,
        http,
        token,
        prefix,
        hostname,
        expiry,
    });
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let job = Arc::clone(&job);
        let next = Arc::clone(&next);
        workers.spawn(async move {
            let mut lines = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(lines);
                }
                lines.push((i, job.device(i).await?));
            }
        });
    }
    let mut lines = BTreeMap::new();
    while let Some(joined) = workers.join_next().await {
        match joined.context("provisioning task failed")? {
            Ok(done) => lines.extend(done),
            Err(err) => {
                // Stop the others: one failure means the hub or the token is wrong.
                workers.abort_all();
                return Err(err);
            }
        }
    }
    let elapsed = started.elapsed();
    let mut text = String::with_capacity(lines.len() * 200);
    for line in lines.values() {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&out, text).with_context(|| format!("cannot write {out}"))?;
    println!(
        "provision: {count} devices in {:.1} s ({:.0}/s), SAS valid {ttl_days} days, written to {out}",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64().max(1e-9),
    );
    Ok(())
}

struct ProvisionJob {
    client: reqwest::Client,
    http: String,
    token: String,
    prefix: String,
    hostname: String,
    expiry: u64,
}

impl ProvisionJob {
    /// Creates device `i` (or reads it if it exists) and returns its SAS file line.
    async fn device(&self, i: usize) -> Result<String> {
        let id = format!("{}{i}", self.prefix);
        let url = format!("{}/devices/{id}", self.http);
        let response = self
            .client
            .put(&url)
            .bearer_auth(&self.token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .with_context(|| format!("PUT {url}"))?;
        let response = if response.status() == reqwest::StatusCode::CONFLICT {
            // Left over from an earlier run: reuse it.
            self.client
                .get(&url)
                .bearer_auth(&self.token)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?
        } else {
            response
        };
        let status = response.status();
        let body = response
            .text()
            .await
            .with_context(|| format!("reading the answer to {url}"))?;
        if !status.is_success() {
            bail!("{url}: HTTP {status}: {body}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("{url}: answer is not JSON: {body}"))?;
        let key_b64 = json
            .pointer("/authentication/symmetricKey/primaryKey")
            .and_then(serde_json::Value::as_str)
            .with_context(|| {
                format!("{url}: no authentication.symmetricKey.primaryKey in {body}")
            })?;
        let key = STANDARD
            .decode(key_b64)
            .with_context(|| format!("{url}: primaryKey is not base64"))?;
        let password = hub::auth::sas::sign(&self.hostname, &id, &key, self.expiry);
        let username = format!("{}/{id}/?api-version=2021-04-12", self.hostname);
        Ok(format!("{id}\t{username}\t{password}"))
    }
}

// ---------------------------------------------------------------------------------
// idle

async fn idle(opts: Opts) -> Result<()> {
    let connections: usize = opts.num("connections", None)?;
    let hold = Duration::from_secs(opts.num("hold-secs", Some(20))?);
    let copts = Arc::new(ConnectOpts::parse(&opts)?);

    let fd_limit = raise_fd_limit()?;
    if connections as u64 + SPARE_FDS > fd_limit {
        bail!("{connections} connections need more than the open-files limit {fd_limit} allows");
    }
    let before = ServerSample::take(copts.server_pid)?;
    let self_rss_before = rss_kib(std::process::id()).ok();

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..copts.in_flight.min(connections.max(1)) {
        let copts = Arc::clone(&copts);
        let next = Arc::clone(&next);
        workers.spawn(async move {
            let mut streams = Vec::new();
            let mut errors = Errors::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= connections {
                    return (streams, errors);
                }
                match open(&copts, i).await {
                    Ok((stream, _)) => streams.push(stream),
                    Err(err) => errors.add(&err),
                }
            }
        });
    }
    let mut streams = Vec::with_capacity(connections);
    let mut errors = Errors::default();
    let gathered = tokio::time::timeout(copts.max, async {
        while let Some(joined) = workers.join_next().await {
            let (done, errs) = joined.context("connect task failed")?;
            streams.extend(done);
            errors.merge(errs);
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match gathered {
        Ok(result) => result?,
        Err(_) => {
            workers.abort_all();
            bail!(
                "connecting {connections} did not finish within --max-secs {}",
                copts.max.as_secs()
            );
        }
    }
    let ramp = started.elapsed();
    let connected = streams.len();
    println!(
        "idle: {connected}/{connections} connected to {} in {:.1} s ({:.0}/s), {} failed{}; holding {} s",
        copts.addr,
        ramp.as_secs_f64(),
        connected as f64 / ramp.as_secs_f64().max(1e-9),
        errors.total(),
        errors.summary(),
        hold.as_secs(),
    );

    // Sample half-way and at the end: the RSS must be stable, not still settling.
    let held = ServerSample::take(copts.server_pid)?;
    tokio::time::sleep(hold / 2).await;
    let mid = ServerSample::take(copts.server_pid)?;
    tokio::time::sleep(hold - hold / 2).await;
    let end = ServerSample::take(copts.server_pid)?;
    let still_open = streams.iter().filter(|s| is_open(s)).count();
    let self_rss = rss_kib(std::process::id()).ok();

    let mut report = format!(
        "idle result: addr={} connections={connected} failed={} open_after_hold={still_open} ramp_secs={:.1}",
        copts.addr,
        errors.total(),
        ramp.as_secs_f64()
    );
    if let (Some(before), Some(held), Some(mid), Some(end)) = (before, held, mid, end) {
        let per_conn = |rss: u64| (rss as f64 - before.rss_kib as f64) / connected.max(1) as f64;
        report.push_str(&format!(
            " server_rss_before_kib={} server_rss_mid_kib={} server_rss_end_kib={} \
             server_kib_per_connection={:.2} server_cpu_secs_during_hold={:.2}",
            before.rss_kib,
            mid.rss_kib,
            end.rss_kib,
            per_conn(end.rss_kib),
            end.cpu_secs - held.cpu_secs,
        ));
        report.push_str(&format!(
            " server_cpu_secs_ramp={:.2}",
            held.cpu_secs - before.cpu_secs
        ));
    }
    if let (Some(a), Some(b)) = (self_rss_before, self_rss) {
        report.push_str(&format!(" client_rss_kib={b} (was {a})"));
    }
    println!("{report}");
    drop(streams);
    if errors.total() > 0 || still_open < connected {
        bail!(
            "{} connections failed, {} closed by the server during the hold",
            errors.total(),
            connected - still_open
        );
    }
    Ok(())
}

/// Whether the server has not closed `stream` (nothing to read, no EOF, no reset).
fn is_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.try_read(&mut byte) {
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => true,
        // Unexpected data (a PUBLISH?) still means open.
        Ok(n) => n > 0,
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------
// rate

async fn rate(opts: Opts) -> Result<()> {
    let total: usize = opts.num("total", None)?;
    let copts = Arc::new(ConnectOpts::parse(&opts)?);
    raise_fd_limit()?;

    let before = ServerSample::take(copts.server_pid)?;
    let client_before = client_cpu_secs()?;
    let machine_before = machine_busy_secs()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..copts.in_flight.min(total.max(1)) {
        let copts = Arc::clone(&copts);
        let next = Arc::clone(&next);
        workers.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Errors::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return (latencies, errors);
                }
                match once(&copts, i).await {
                    Ok(latency) => latencies.push(latency),
                    Err(err) => errors.add(&err),
                }
            }
        });
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = Errors::default();
    let gathered = tokio::time::timeout(copts.max, async {
        while let Some(joined) = workers.join_next().await {
            let (done, errs) = joined.context("handshake task failed")?;
            latencies.extend(done);
            errors.merge(errs);
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    match gathered {
        Ok(result) => result?,
        Err(_) => {
            workers.abort_all();
            bail!(
                "{total} handshakes did not finish within --max-secs {}",
                copts.max.as_secs()
            );
        }
    }
    let wall = started.elapsed();
    let client_cpu = client_cpu_secs()? - client_before;
    let machine_busy = machine_busy_secs()? - machine_before;
    let after = ServerSample::take(copts.server_pid)?;

    latencies.sort_unstable();
    let ms = |q: f64| percentile(&latencies, q).as_secs_f64() * 1e3;
    let mut report = format!(
        "rate result: addr={} total={total} ok={} failed={} in_flight={} clean_session={} wall_secs={:.2} \
         handshakes_per_sec={:.0} latency_ms p50={:.2} p90={:.2} p99={:.2} max={:.2} client_cpu_secs={client_cpu:.2}",
        copts.addr,
        latencies.len(),
        errors.total(),
        copts.in_flight,
        u8::from(copts.clean_session),
        wall.as_secs_f64(),
        latencies.len() as f64 / wall.as_secs_f64().max(1e-9),
        ms(0.50),
        ms(0.90),
        ms(0.99),
        ms(1.0),
    );
    report.push_str(&format!(" machine_busy_cpu_secs={machine_busy:.2}"));
    if let (Some(before), Some(after)) = (before, after) {
        let server_cpu = after.cpu_secs - before.cpu_secs;
        // What neither side used: other processes competing for the cores.
        report.push_str(&format!(
            " server_cpu_secs={server_cpu:.2} other_cpu_secs={:.2} server_rss_kib_after={}",
            machine_busy - client_cpu - server_cpu,
            after.rss_kib
        ));
    }
    println!("{report}");
    if errors.total() > 0 {
        println!("rate errors:{}", errors.summary());
        bail!("{} of {total} handshakes failed", errors.total());
    }
    Ok(())
}

/// One handshake: connect, CONNECT, CONNACK (timed up to here), DISCONNECT, close.
async fn once(copts: &ConnectOpts, i: usize) -> Result<Duration> {
    let (mut stream, latency) = open(copts, i).await?;
    // The handshake is done; how the goodbye goes does not count against it, but a
    // failure here is still reported.
    tokio::time::timeout(copts.timeout, async {
        stream.write_all(&DISCONNECT).await?;
        stream.shutdown().await
    })
    .await
    .context("DISCONNECT timed out")?
    .context("DISCONNECT")?;
    Ok(latency)
}

// ---------------------------------------------------------------------------------
// MQTT over TCP

/// Connects as connection `i` and waits for a successful CONNACK; returns the stream
/// and the time from the TCP connect to the CONNACK.
async fn open(copts: &ConnectOpts, i: usize) -> Result<(TcpStream, Duration)> {
    let connect = copts.connect_packet(i)?;
    let started = Instant::now();
    let stream = tokio::time::timeout(copts.timeout, async {
        let mut stream = TcpStream::connect(copts.addr)
            .await
            .context("TCP connect")?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        stream
            .write_all(&connect)
            .await
            .context("sending CONNECT")?;
        let mut buf = BytesMut::with_capacity(64);
        match read_packet(&mut stream, &mut buf).await? {
            Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(stream),
            Some(Packet::ConnAck(ack)) => bail!("CONNACK refused: {:?}", ack.code),
            Some(other) => bail!("expected CONNACK, got {other:?}"),
            None => bail!("closed before CONNACK"),
        }
    })
    .await
    .context("no CONNACK within --timeout-secs")??;
    Ok((stream, started.elapsed()))
}

/// The next packet from the server; `None` when it closed the connection.
async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Option<Packet>> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(packet) => return Ok(Some(packet)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(err) => bail!("undecodable packet from the server: {err}"),
        }
        if stream.read_buf(buf).await.context("reading")? == 0 {
            return Ok(None);
        }
    }
}

// ---------------------------------------------------------------------------------
// Measurements

/// Errors counted by message.
#[derive(Default)]
struct Errors(BTreeMap<String, usize>);

impl Errors {
    fn add(&mut self, err: &anyhow::Error) {
        *self.0.entry(format!("{err:#}")).or_default() += 1;
    }

    fn merge(&mut self, other: Errors) {
        for (message, count) in other.0 {
            *self.0.entry(message).or_default() += count;
        }
    }

    fn total(&self) -> usize {
        self.0.values().sum()
    }

    /// The five most frequent errors, or nothing.
    fn summary(&self) -> String {
        let mut counted: Vec<_> = self.0.iter().collect();
        counted.sort_by(|a, b| b.1.cmp(a.1));
        counted
            .iter()
            .take(5)
            .map(|(message, count)| format!(" [{count}× {message}]"))
            .collect()
    }
}

/// The `q` quantile (0..=1) of sorted durations, nearest rank.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The server's resident memory and CPU time at one moment.
#[derive(Clone, Copy)]
struct ServerSample {
    rss_kib: u64,
    cpu_secs: f64,
}

impl ServerSample {
    fn take(pid: Option<u32>) -> Result<Option<Self>> {
        let Some(pid) = pid else { return Ok(None) };
        Ok(Some(Self {
            rss_kib: rss_kib(pid)?,
            cpu_secs: cpu_secs(pid)?,
        }))
    }
}

/// `VmRSS` of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// User + system CPU seconds `pid` has used.
fn cpu_secs(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the parenthesised command name start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |n: usize| -> Result<u64> {
        fields
            .get(n)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("malformed {path}"))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks())
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux if that fails).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds all cores have spent busy since boot (`/proc/stat`: everything but
/// idle and iowait).
fn machine_busy_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().context("malformed /proc/stat"))
        .collect::<Result<_>>()?;
    let (Some(idle), Some(iowait)) = (ticks.get(3), ticks.get(4)) else {
        bail!("malformed /proc/stat: {line}");
    };
    let total: u64 = ticks.iter().sum();
    Ok((total - idle - iowait) as f64 / clock_ticks())
}

/// CPU seconds this process has used.
fn client_cpu_secs() -> Result<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).context("getrusage")?;
    let secs = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    Ok(secs(usage.user_time()) + secs(usage.system_time()))
}

/// Raises the soft open-files limit to the hard one; returns the soft limit in force.
fn raise_fd_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit")?;
        return Ok(hard);
    }
    Ok(soft)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
