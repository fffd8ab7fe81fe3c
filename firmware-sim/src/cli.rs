//! The command line (DESIGN section 5) and the parsers of its value types: rates,
//! durations, payloads, targets. Checks that need more than one flag live in
//! [`Args::validate`], so every bad combination is refused before anything connects.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::scenario_file::Group;
use crate::template::Template;

/// Simulates a fleet of devices against the hub (or a plain MQTT broker) and reports
/// throughput and latency.
#[derive(Parser, Debug, Clone)]
#[command(name = "firmware-sim", version, about, long_about = None)]
pub struct Args {
    /// The hub's service API (`http://host:port`). Default: the `http` address in
    /// DATA_DIR/endpoints.json.
    #[arg(long, value_name = "URL")]
    pub hub: Option<String>,
    /// The hub's data directory: endpoints.json (API and MQTT addresses) and the owner
    /// key from which `hub token` mints a service token.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A service token (scopes registry:read, registry:write, service:connect) instead
    /// of minting one from DATA_DIR.
    #[arg(long, env = "FIRMWARE_SIM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The `hub` binary used to mint a token from DATA_DIR (default: the one next to
    /// firmware-sim, else `hub` on PATH).
    #[arg(long, value_name = "PATH")]
    pub hub_bin: Option<PathBuf>,
    /// Where devices connect over MQTT/TCP (default: the `mqtt` address in
    /// endpoints.json, else port 1883 on the API's host).
    #[arg(long, value_name = "HOST:PORT")]
    pub mqtt: Option<String>,
    /// A plain MQTT broker (`mqtt://host:port`, e.g. Mosquitto) instead of the hub: no
    /// service API, devices are bare client ids, no credentials. With `--tls` and
    /// `--ca-file` the port is the broker's MQTT-over-TLS listener.
    #[arg(long, value_name = "mqtt://HOST:PORT", value_parser = parse_target, conflicts_with_all = ["hub", "data_dir", "token"])]
    pub target: Option<SocketAddr>,
    /// With `--target` and `--tls`: the CA certificate (PEM) the broker's certificate
    /// chains to; the broker's name is `--hostname`.
    #[arg(long, value_name = "FILE", requires_all = ["target", "tls"])]
    pub ca_file: Option<PathBuf>,
    /// Devices from a file instead of provisioning them: per line an Azure device
    /// connection string (`HostName=…;DeviceId=…;SharedAccessKey=…`) or `DEVICE_ID
    /// KEY`; the first --devices of them connect (to --mqtt, or the data dir's MQTT
    /// address). The service API is then needed only for --verify.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["target", "scenario_file"])]
    pub credentials: Option<PathBuf>,
    /// The host name signed into SAS tokens (the hub's `hostname` setting).
    #[arg(long, default_value = "localhost")]
    pub hostname: String,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub devices: u32,
    /// Device ids are PREFIX0, PREFIX1, …
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// Messages per second per device, or `max` (as fast as PUBACKs allow with
    /// `--inflight` outstanding per device).
    #[arg(long, default_value = "1", value_parser = parse_rate)]
    pub rate: Rate,
    /// QoS 1 messages each device may have awaiting their PUBACK.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=65_000))]
    pub inflight: u16,
    /// Payload: a size in bytes (a JSON record padded to that size), or a template
    /// with `{run}`, `{device}`, `{seq}`, `{time_ns}` placeholders.
    #[arg(long, default_value = "256", value_parser = parse_payload)]
    pub payload: Template,
    /// MQTT QoS of telemetry.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// How long devices send after all of them connected (`30s`, `2m`, `500ms`, or
    /// seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Connections opened per second (default: as fast as the broker accepts them).
    #[arg(long, value_name = "PER_SEC", value_parser = parse_positive_f64)]
    pub ramp: Option<f64>,
    /// How devices authenticate with the hub.
    #[arg(long, value_enum, default_value_t = Auth::Sas)]
    pub auth: Auth,
    /// Read the telemetry back through the service API after the run and count lost
    /// and duplicated messages and the end-to-end latency.
    #[arg(long)]
    pub verify: bool,
    /// Print the final report as JSON (on stdout).
    #[arg(long)]
    pub json: bool,
    /// Measure this process's CPU time (the hub's) over the run, from /proc/PID/stat.
    #[arg(long, value_name = "PID")]
    pub hub_pid: Option<u32>,
    /// Run devices through device-sdk with full behaviour (twin, methods, C2D) instead
    /// of the lean publish path. Implied by `--twin-every` and the method flags.
    #[arg(long)]
    pub sdk: bool,
    /// Report twin properties every so often (device-sdk path).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub twin_every: Option<Duration>,
    /// How long a device takes to answer a direct method (device-sdk path).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub method_delay_ms: u64,
    /// Fraction (0..=1) of direct methods answered with status 500 (device-sdk path).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub method_fail_rate: f64,
    /// How long to wait for outstanding PUBACKs once sending stops.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,

    // Scenarios, faults and scale-out (crate::scenarios, crate::flap, crate::workers).
    /// What to measure: telemetry (default), connections (hold N for --hold),
    /// connect-rate (--total handshakes), methods or twin (round trips for
    /// --duration), storm (drop every connection at once, time until all are back).
    #[arg(long, value_enum, default_value_t = Scenario::Telemetry)]
    pub scenario: Scenario,
    /// How long the connections scenario holds the fleet open.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Handshakes the connect-rate scenario makes (default: --devices); connection i
    /// connects as device i mod N.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub total: Option<u64>,
    /// Handshakes in flight at once in the connections, connect-rate and storm
    /// scenarios.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connect_inflight: u32,
    /// Time sent and measured apart before the measured window (telemetry, methods,
    /// twin): first connections, caches and pools warm up unrecorded.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// How the storm scenario loses its connections: `drop` (the simulator closes
    /// every one at once) or `restart` (it waits for the hub to drop them, e.g. a
    /// script restarting it).
    #[arg(long, value_enum, default_value_t = StormMode::Drop)]
    pub storm: StormMode,
    /// A file holding the hub's pid, reread at every sample (a restarted hub has a new
    /// one); instead of --hub-pid.
    #[arg(long, value_name = "PATH", conflicts_with = "hub_pid")]
    pub hub_pid_file: Option<PathBuf>,
    /// Each second each device drops its connection and reconnects with this
    /// probability (0..=1), sending telemetry at --rate meanwhile.
    #[arg(long, value_name = "P", value_parser = parse_fraction)]
    pub flap: Option<f64>,
    /// Split the fleet over K child processes (one process may hold only so many open
    /// files) and merge their reports.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: Option<u32>,
    /// Loopback source addresses to spread connections over (`127.0.0.2-127.0.0.9`,
    /// or a comma-separated list); default: 127.0.0.1 onwards when one address's
    /// ephemeral ports cannot hold the connections.
    #[arg(long, value_name = "ADDRS", value_parser = parse_source_addrs)]
    pub source_addrs: Option<SourceAddrs>,
    /// (For --workers children.) The index of this process's first device.
    #[arg(long, hide = true, default_value_t = 0)]
    pub first_device: u32,
    /// Device groups from a TOML file (see firmware-sim/scenarios/); flags given here
    /// override the file's globals (duration, ramp, drain, seed) and are the defaults
    /// of keys a group leaves out.
    /// Telemetry only (`--scenario telemetry`), in one process.
    #[arg(long, value_name = "FILE")]
    pub scenario_file: Option<PathBuf>,
    /// Seed of the generated payload fields ({walk:…}, {sine:…}): the same seed gives
    /// each device the same values (default: random, shown in the report).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Connect over MQTT/TLS (the `mqtts` address in endpoints.json), trusting the
    /// hub's CA from DATA_DIR/certs (on the lean path and on device-sdk alike).
    #[arg(long)]
    pub tls: bool,
    /// Lifetime of the SAS tokens (and device JWTs) of device-sdk devices, which
    /// reconnect with a fresh one at 80 % of it. Implies the device-sdk path.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub sas_ttl: Option<Duration>,
    /// The scenario's groups, once read (`scenario_file::apply`).
    #[arg(skip)]
    pub scenario_groups: Vec<Group>,
}

/// Source addresses, as `--source-addrs` lists them.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceAddrs(pub Vec<std::net::IpAddr>);

fn parse_source_addrs(text: &str) -> Result<SourceAddrs, String> {
    crate::net::parse_source_addrs(text).map(SourceAddrs)
}

pub use crate::scenarios::{Scenario, StormMode};

/// How fast each device sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second per device.
    PerSec(f64),
    /// As fast as PUBACKs (QoS 1) or the socket (QoS 0) allow.
    Max,
}

/// How devices authenticate.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// SAS tokens signed with the device's primary key.
    Sas,
    /// Device JWTs (HS256) signed with the device's primary key.
    Jwt,
    /// TLS client certificates signed by the hub's development CA (DATA_DIR/certs),
    /// CN = device id; devices are provisioned as `certificateAuthority`. Implies
    /// `--tls`.
    X509,
}

impl Args {
    /// Checks the combinations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.target.is_some() && self.verify {
            return Err("--verify reads the stream through the hub's service API; a plain MQTT --target has none".into());
        }
        if self.target.is_some() && self.uses_sdk() {
            return Err("--sdk, --twin-every and the method flags need the hub's twin and method topics; a plain MQTT --target has none".into());
        }
        if self.target.is_some() && self.groups().iter().any(|g| g.auth == Auth::X509) {
            return Err("--auth x509 needs the hub's CA key to issue device certificates; a plain MQTT --target has none".into());
        }
        if self.target.is_some() && self.tls && self.ca_file.is_none() {
            return Err("--tls with a plain MQTT --target needs --ca-file: the CA its certificate chains to".into());
        }
        // Devices from a file need the service API only to read telemetry back.
        let needs_api = self.target.is_none() && (self.credentials.is_none() || self.verify);
        if self.credentials.is_some() && self.mqtt.is_none() && self.data_dir.is_none() {
            return Err("--credentials needs to know where devices connect: --mqtt HOST:PORT or --data-dir DIR".into());
        }
        if self.credentials.is_some() && (self.tls || self.auth == Auth::X509) {
            return Err(
                "--credentials holds symmetric keys for plain MQTT: drop --tls and --auth x509"
                    .into(),
            );
        }
        if needs_api && self.hub.is_none() && self.data_dir.is_none() {
            return Err("say where the hub is: --hub URL or --data-dir DIR (or --target mqtt://HOST:PORT for a plain broker)".into());
        }
        if needs_api && self.token.is_none() && self.data_dir.is_none() {
            return Err("the service API needs a token: --token TOKEN, or --data-dir DIR to mint one with `hub token`".into());
        }
        if self.prefix.is_empty() {
            return Err("--prefix must not be empty".into());
        }
        let x509 = self.groups().iter().any(|g| g.auth == Auth::X509);
        if (self.tls || x509) && self.data_dir.is_none() && self.target.is_none() {
            return Err("--tls and --auth x509 need --data-dir DIR: the hub's CA (DIR/certs) and its mqtts address".into());
        }
        if self.scenario_file.is_some() {
            if self.scenario != Scenario::Telemetry || self.flap.is_some() {
                return Err("--scenario-file describes telemetry device groups; it does not combine with another --scenario or --flap".into());
            }
            if self.workers.is_some_and(|k| k > 1) {
                return Err("--scenario-file runs in one process; drop --workers".into());
            }
        }
        // Per group: with no scenario file, the one group made of the flags.
        crate::scenario_file::validate_groups(self, &self.groups())?;
        crate::scenarios::validate(self)
    }

    /// Whether devices run through device-sdk.
    pub fn uses_sdk(&self) -> bool {
        self.sdk
            || self.twin_every.is_some()
            || self.method_delay_ms > 0
            || self.method_fail_rate > 0.0
            || self.implies_sdk()
    }

    /// Whether devices need device-sdk whatever their behaviour: the lean path signs
    /// one token per connection and never renews it (`--sas-ttl`). It speaks TLS and
    /// x509 itself.
    pub fn implies_sdk(&self) -> bool {
        self.sas_ttl.is_some()
    }

    /// Whether devices authenticating with `auth` connect over TLS.
    pub fn uses_tls(&self, auth: Auth) -> bool {
        self.tls || auth == Auth::X509
    }

    /// Device `i`'s id.
    pub fn device_id(&self, i: u32) -> String {
        format!("{}{i}", self.prefix)
    }

    /// The ids of this process's devices (a --workers child has a slice).
    pub fn device_ids(&self) -> Vec<String> {
        (0..self.devices)
            .map(|i| self.device_id(self.first_device.saturating_add(i)))
            .collect()
    }
}

/// `max` or a positive number of messages per second.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    if text.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    let rate = parse_positive_f64(text.trim_end_matches("/s"))
        .map_err(|_| format!("{text:?} is neither `max` nor a positive rate per second"))?;
    Ok(Rate::PerSec(rate))
}

/// A duration: `250ms`, `30s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    if !value.is_finite() || value < 0.0 || value * scale > 1e9 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// `mqtt://host:port` (the host must resolve to an address).
pub fn parse_target(text: &str) -> Result<SocketAddr, String> {
    let rest = text
        .strip_prefix("mqtt://")
        .ok_or_else(|| format!("{text:?} is not mqtt://HOST:PORT"))?;
    resolve(rest.trim_end_matches('/'))
}

/// Resolves `host:port` to its first address.
pub fn resolve(host_port: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    host_port
        .to_socket_addrs()
        .map_err(|err| format!("{host_port:?}: {err}"))?
        .next()
        .ok_or_else(|| format!("{host_port:?} resolves to no address"))
}

/// A payload size or template.
pub fn parse_payload(text: &str) -> Result<Template, String> {
    match text.parse::<usize>() {
        Ok(size) if size > 256 * 1024 => Err(format!(
            "{size} bytes is more than the hub's 256 KiB telemetry limit"
        )),
        Ok(size) => Ok(Template::sized(size)),
        Err(_) if text.len() > 64 * 1024 => {
            Err("a payload template may be at most 64 KiB".to_string())
        }
        Err(_) => Template::parse(text).map_err(|err| err.to_string()),
    }
}

fn parse_positive_f64(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("{text:?} is not a positive number")),
    }
}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!("{text:?} is not a fraction between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, String> {
        let argv = std::iter::once("firmware-sim").chain(extra.iter().copied());
        let args = Args::try_parse_from(argv).map_err(|err| err.to_string())?;
        args.validate()?;
        Ok(args)
    }

    #[test]
    fn rates_durations_and_targets_parse() {
        assert_eq!(parse_rate("max").unwrap(), Rate::Max);
        assert_eq!(parse_rate("2.5").unwrap(), Rate::PerSec(2.5));
        assert_eq!(parse_rate("10/s").unwrap(), Rate::PerSec(10.0));
        assert!(parse_rate("0").is_err() && parse_rate("fast").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("-1s").is_err() && parse_duration("soon").is_err());
        assert_eq!(
            parse_target("mqtt://127.0.0.1:1883").unwrap(),
            "127.0.0.1:1883".parse().unwrap()
        );
        assert!(parse_target("http://127.0.0.1:1883").is_err());
    }

    #[test]
    fn bad_combinations_are_refused_with_a_reason() {
        assert!(args(&["--target", "mqtt://127.0.0.1:1883"]).is_ok());
        let err = args(&["--target", "mqtt://127.0.0.1:1883", "--verify"]).unwrap_err();
        assert!(err.contains("--verify"), "{err}");
        let err = args(&["--devices", "5"]).unwrap_err();
        assert!(err.contains("--hub"), "{err}");
        let err = args(&["--hub", "http://127.0.0.1:1"]).unwrap_err();
        assert!(err.contains("token"), "{err}");
        assert!(args(&["--hub", "http://x", "--token", "t", "--qos", "2"]).is_err());
        assert!(args(&["--hub", "http://x", "--token", "t", "--devices", "0"]).is_err());
        let err = args(&[
            "--hub",
            "http://x",
            "--token",
            "t",
            "--payload",
            "{\"v\":1}",
            "--verify",
        ])
        .unwrap_err();
        assert!(err.contains("{seq}"), "{err}");
        assert!(args(&["--hub", "http://x", "--token", "t", "--twin-every", "5s"]).is_ok());
    }
}
