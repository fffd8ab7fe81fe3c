//! What a run is asked to do: every flag ([`Args`], which clap parses and `--help`
//! describes), the device groups the flags or a scenario file make ([`Group`]), and
//! what follows from the flags (the device-sdk path, TLS, device ids). The checks
//! that need more than one flag are the command line's (`crate::cli`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::template::{Template, parse_payload};
use crate::values::{
    Auth, Provision, Rate, Scenario, StormMode, parse_duration, parse_fraction, parse_positive_f64,
    parse_rate, parse_target,
};

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
    /// How the fleet gets its identities: `api` (created through the service API) or
    /// `dps` (each device registers through the provisioning contract with a key
    /// derived from enrollment group `--group`, and the report gains registrations/s).
    #[arg(long, value_enum, default_value_t = Provision::Api)]
    pub provision: Provision,
    /// With `--provision dps`: the symmetric-key enrollment group the devices belong to.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// With `--provision dps`: the group's primary key (default: read through the
    /// provisioning service API with the token).
    #[arg(
        long,
        value_name = "KEY",
        env = "FIRMWARE_SIM_GROUP_KEY",
        hide_env_values = true
    )]
    pub group_key: Option<String>,
    /// With `--provision dps`: the ID scope (default: DATA_DIR/dps-scope).
    #[arg(long, value_name = "SCOPE")]
    pub id_scope: Option<String>,
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

/// A group of devices that behave alike, resolved from the file and the flags.
#[derive(Debug, Clone)]
pub struct Group {
    /// The group's name in the report.
    pub name: String,
    /// Its devices.
    pub devices: u32,
    /// Device ids are PREFIX0, PREFIX1, …
    pub prefix: String,
    /// Messages per second per device.
    pub rate: Rate,
    /// Telemetry QoS.
    pub qos: u8,
    /// QoS 1 messages awaiting PUBACK per device.
    pub inflight: u16,
    /// The payload.
    pub payload: Template,
    /// Reported-properties period (device-sdk path).
    pub twin_every: Option<Duration>,
    /// Delay before answering a method.
    pub method_delay: Duration,
    /// Fraction of methods answered with 500.
    pub method_fail_rate: f64,
    /// How the devices authenticate.
    pub auth: Auth,
    /// Whether they run on device-sdk.
    pub sdk: bool,
}

impl Group {
    /// Device `i`'s id.
    pub fn device_id(&self, i: u32) -> String {
        format!("{}{i}", self.prefix)
    }
}

impl Args {
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

    /// The groups of the run: the scenario's, or one named `default` made of the flags.
    pub fn groups(&self) -> Vec<Group> {
        if !self.scenario_groups.is_empty() {
            return self.scenario_groups.clone();
        }
        vec![Group {
            name: "default".into(),
            devices: self.devices,
            prefix: self.prefix.clone(),
            rate: self.rate,
            qos: self.qos,
            inflight: self.inflight,
            payload: self.payload.clone(),
            twin_every: self.twin_every,
            method_delay: Duration::from_millis(self.method_delay_ms),
            method_fail_rate: self.method_fail_rate,
            auth: self.auth,
            sdk: self.uses_sdk(),
        }]
    }
}
