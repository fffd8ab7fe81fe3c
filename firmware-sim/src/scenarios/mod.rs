//! The scenarios besides telemetry (`--scenario`): what each measures, the report
//! section they share, the argument checks that concern them, and the dispatch.
//!
//! - [`connections`]: connections held (hub RSS before, held, end) and the connect
//!   rate (handshakes with latency percentiles and CPU on every side).
//! - [`round_trips`]: direct-method and twin reported-patch round trips.
//! - [`storm`]: every connection dropped at once (or a hub restart), and the time
//!   until all are back.
//!
//! `--flap` is [`crate::flap`]'s (telemetry while devices drop and reconnect).

pub mod connections;
pub mod round_trips;
pub mod storm;

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cli::Args;
use crate::probe::HubUsage;
use crate::report::{Cpu, Latency, Report, decode_histogram, encode_histogram};
use crate::run::{Fleet, RunError};

/// What a run measures.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Devices send telemetry (the default).
    Telemetry,
    /// Connect N devices and hold them for --hold; hub RSS before, held and at the end.
    Connections,
    /// --total handshakes (CONNECT→CONNACK→DISCONNECT), --connect-inflight at once.
    ConnectRate,
    /// Direct-method round trips through the service API, --inflight per device.
    Methods,
    /// Twin reported-patch round trips over MQTT, --inflight per device.
    Twin,
    /// Connect N, drop every connection at once, time until all are back.
    Storm,
}

/// How the storm loses its connections.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StormMode {
    /// The simulator drops every connection at the same instant.
    #[default]
    Drop,
    /// The hub drops them (a script restarts it); devices retry until it is back.
    Restart,
}

/// Checks the scenario flags against each other and the rest.
pub fn validate(args: &Args) -> Result<(), String> {
    let telemetry = args.scenario == Scenario::Telemetry;
    if !telemetry && args.flap.is_some() {
        return Err(
            "--flap drops devices that send telemetry: it goes with the telemetry scenario only"
                .into(),
        );
    }
    if (!telemetry || args.flap.is_some()) && args.groups().iter().any(|g| args.uses_tls(g.auth)) {
        return Err("--tls and --auth x509 run with the telemetry scenario (without --flap); the other scenarios connect over plain TCP".into());
    }
    if (!telemetry || args.flap.is_some()) && args.uses_sdk() {
        return Err("--sdk, --twin-every and the method flags belong to the telemetry scenario (without --flap)".into());
    }
    if (!telemetry || args.flap.is_some()) && args.verify {
        return Err(
            "--verify reads telemetry back: it goes with the telemetry scenario (without --flap)"
                .into(),
        );
    }
    if matches!(args.scenario, Scenario::Methods | Scenario::Twin) && args.target.is_some() {
        return Err(format!(
            "the {} scenario needs the hub's $iothub topics{}; a plain MQTT --target has none",
            if args.scenario == Scenario::Methods {
                "methods"
            } else {
                "twin"
            },
            if args.scenario == Scenario::Methods {
                " and service API"
            } else {
                ""
            }
        ));
    }
    if args.ramp.is_some() && (!telemetry || args.flap.is_some()) {
        return Err("--ramp paces the telemetry scenario's connects; the other scenarios connect --connect-inflight at a time".into());
    }
    if args.total.is_some() && args.scenario != Scenario::ConnectRate {
        return Err("--total is the connect-rate scenario's number of handshakes".into());
    }
    if args.scenario != Scenario::Storm && args.storm != StormMode::Drop {
        return Err("--storm restart goes with --scenario storm".into());
    }
    if !args.warmup.is_zero() && args.uses_sdk() {
        return Err(
            "--warmup is measured on the lean path; drop it or the device-sdk flags".into(),
        );
    }
    if args.workers.is_some_and(|k| k > args.devices) {
        return Err(format!(
            "--workers {} is more processes than the {} devices to share out",
            args.workers.unwrap_or(0),
            args.devices
        ));
    }
    if args.workers.is_some_and(|k| k > 1) && args.verify {
        return Err("--verify with --workers is not supported: run --verify in one process".into());
    }
    if args.workers.is_some_and(|k| k > 1) && args.storm == StormMode::Restart {
        return Err("--storm restart waits for one hub restart: run it in one process".into());
    }
    Ok(())
}

/// Handshakes: the connections, connect-rate and storm scenarios.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Handshakes {
    /// Handshakes tried.
    pub attempted: u64,
    /// Handshakes that got a successful CONNACK.
    pub ok: u64,
    /// Handshakes that failed.
    pub failed: u64,
    /// Handshakes in flight at once (at most).
    pub in_flight: u64,
    /// From the first attempt to the last answer.
    pub secs: f64,
    /// Successful handshakes per second over `secs`.
    pub per_sec: f64,
    /// TCP connect → CONNACK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Latency>,
    /// The latency histogram, serialized (HDR V2, base64), for merging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdr: Option<String>,
}

/// Connections held (the connections scenario).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Held {
    /// Connections held.
    pub held: u64,
    /// Of those, still open at the end of the hold.
    pub open_after_hold: u64,
    /// How long they were held.
    pub hold_secs: f64,
    /// The hub's RSS before connecting, KiB (with --hub-pid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_rss_before_kib: Option<u64>,
    /// … once every device connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_rss_held_kib: Option<u64>,
    /// … half-way through the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_rss_mid_kib: Option<u64>,
    /// … at the end of the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_rss_end_kib: Option<u64>,
    /// (end − before) / held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_kib_per_connection: Option<f64>,
    /// The hub's CPU seconds while the fleet connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_cpu_ramp_secs: Option<f64>,
    /// … during the hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_cpu_hold_secs: Option<f64>,
}

/// Round trips: the methods and twin scenarios.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundTrips {
    /// Requests outstanding per device.
    pub in_flight_per_device: u64,
    /// Requests made (warm-up included).
    pub sent: u64,
    /// Requests answered with success (200 for a method, 204 for a patch).
    pub answered: u64,
    /// Requests that failed, timed out or were answered with an error.
    pub failed: u64,
    /// Methods: calls the devices received and answered (≥ `answered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_answered: Option<u64>,
    /// Answered within the measured window (the latency samples).
    pub measured: u64,
    /// The measured window.
    pub secs: f64,
    /// `measured` per second.
    pub per_sec: f64,
    /// Request → answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Latency>,
    /// The latency histogram, serialized (HDR V2, base64), for merging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdr: Option<String>,
}

/// The connect storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Storm {
    /// `drop` or `restart`.
    pub mode: StormMode,
    /// Devices connected when the storm began.
    pub connected_before: u64,
    /// Of those, connected again by the end.
    pub back: u64,
    /// From the drop (or the first lost connection) until every device was back;
    /// `None` when not all came back within --duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secs_to_all_back: Option<f64>,
    /// Reconnect attempts.
    pub reconnect_attempts: u64,
    /// Reconnect attempts that failed (and were retried).
    pub reconnect_failed: u64,
    /// The hub during the storm (with --hub-pid or --hub-pid-file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<HubUsage>,
}

/// What a scenario measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScenarioReport {
    /// The scenario.
    pub name: Scenario,
    /// Handshakes made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes: Option<Handshakes>,
    /// Connections held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// Method or twin round trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_trips: Option<RoundTrips>,
    /// The storm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<Storm>,
    /// CPU over the measured part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Failures by message (the five most frequent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
}

impl ScenarioReport {
    /// An empty report of `name`.
    pub fn new(name: Scenario) -> Self {
        Self {
            name,
            handshakes: None,
            held: None,
            round_trips: None,
            storm: None,
            cpu: None,
            errors: BTreeMap::new(),
        }
    }

    /// The report as text for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        if let Some(h) = &self.handshakes {
            line(format!(
                "handshakes {} ok of {} ({} failed), {} in flight, in {:.2} s: {:.0} handshakes/s",
                h.ok, h.attempted, h.failed, h.in_flight, h.secs, h.per_sec
            ));
            if let Some(latency) = &h.latency_ms {
                line(format!("connack    {}", latency.line()));
            }
        }
        if let Some(s) = &self.storm {
            line(format!(
                "storm      {}: {} of {} back {}; {} reconnect attempts, {} failed",
                match s.mode {
                    StormMode::Drop => "every connection dropped at once",
                    StormMode::Restart => "the hub restarted",
                },
                s.back,
                s.connected_before,
                s.secs_to_all_back
                    .map(|secs| format!("in {:.1} ms", secs * 1000.0))
                    .unwrap_or_else(|| "(not all within --duration)".into()),
                s.reconnect_attempts,
                s.reconnect_failed
            ));
            if let Some(hub) = &s.hub {
                line(format!(
                    "hub storm  RSS {} → peak {} → {} KiB; CPU {:.2} s (peak {:.2} cores over 100 ms; {} samples)",
                    hub.rss_start_kib,
                    hub.rss_peak_kib,
                    hub.rss_end_kib,
                    hub.cpu_secs,
                    hub.cpu_peak_cores,
                    hub.samples
                ));
            }
        }
        if let Some(h) = &self.held {
            line(format!(
                "held       {} connections for {:.1} s, {} still open at the end",
                h.held, h.hold_secs, h.open_after_hold
            ));
            if let (Some(before), Some(held), Some(end)) =
                (h.hub_rss_before_kib, h.hub_rss_held_kib, h.hub_rss_end_kib)
            {
                line(format!(
                    "hub rss    {before} KiB before, {held} KiB held, {end} KiB at the end: {:.2} KiB per connection; hub CPU {:.2} s connecting, {:.2} s holding",
                    h.hub_kib_per_connection.unwrap_or(0.0),
                    h.hub_cpu_ramp_secs.unwrap_or(0.0),
                    h.hub_cpu_hold_secs.unwrap_or(0.0)
                ));
            }
        }
        if let Some(r) = &self.round_trips {
            line(format!(
                "{:<10} sent {}  answered {}  failed {}{} ({} in flight per device); {} in {:.2} s: {:.0} round trips/s",
                match self.name {
                    Scenario::Methods => "methods",
                    _ => "twin",
                },
                r.sent,
                r.answered,
                r.failed,
                r.device_answered
                    .map(|n| format!("  devices answered {n}"))
                    .unwrap_or_default(),
                r.in_flight_per_device,
                r.measured,
                r.secs,
                r.per_sec
            ));
            if let Some(latency) = &r.latency_ms {
                line(format!("round trip {}", latency.line()));
            }
        }
        if let Some(cpu) = &self.cpu {
            line(format!("cpu        {}", cpu.text()));
        }
        for (message, count) in &self.errors {
            line(format!("error      {count}× {message}"));
        }
        out
    }
}

/// Failures counted by message (device ids stripped, so alike failures add up).
#[derive(Debug, Default)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    /// Counts one failure.
    pub fn add(&mut self, err: &dyn std::fmt::Display) {
        let text = err.to_string();
        // DeviceError messages start with "DEVICE: ".
        let key = text
            .split_once(": ")
            .map_or(text.as_str(), |(_, rest)| rest);
        *self.0.entry(key.to_string()).or_default() += 1;
    }

    /// Adds another tally.
    pub fn merge(&mut self, other: BTreeMap<String, u64>) {
        for (message, count) in other {
            *self.0.entry(message).or_default() += count;
        }
    }

    /// The five most frequent.
    pub fn top(&self) -> BTreeMap<String, u64> {
        let mut counted: Vec<_> = self.0.iter().collect();
        counted.sort_by(|a, b| b.1.cmp(a.1));
        counted
            .into_iter()
            .take(5)
            .map(|(m, c)| (m.clone(), *c))
            .collect()
    }
}

/// Latency percentiles and the serialized histogram.
pub fn latency(h: &Histogram<u64>) -> (Option<Latency>, Option<String>) {
    (Latency::from_histogram(h), encode_histogram(h))
}

/// Merges serialized histograms; the percentiles and the merged serialization.
pub fn merge_hdr<'a>(
    encoded: impl Iterator<Item = &'a String>,
) -> Result<(Option<Latency>, Option<String>), String> {
    let mut merged = crate::report::histogram();
    for text in encoded {
        merged
            .add(decode_histogram(text)?)
            .map_err(|err| format!("cannot merge histograms: {err:?}"))?;
    }
    Ok(latency(&merged))
}

/// A report with no telemetry in it, for a scenario to fill.
pub fn shell(args: &Args, fleet: &Fleet, run: String) -> Report {
    Report {
        target: fleet.target.to_string(),
        path: "lean".to_string(),
        run,
        devices: u64::from(args.devices),
        connected: 0,
        connect_failed: 0,
        connect_secs: 0.0,
        connect_rate: 0.0,
        qos: args.qos,
        sent: 0,
        acked: 0,
        failed: 0,
        disconnects: 0,
        elapsed_secs: 0.0,
        drain_secs: 0.0,
        msgs_per_sec: 0.0,
        puback_ms: None,
        cpu: None,
        methods: 0,
        twin_reports: 0,
        c2d: 0,
        c2d_received: 0,
        desired: 0,
        desired_acks: 0,
        interrupted: false,
        verify: None,
        seed: 0,
        groups: Vec::new(),
        warmup_secs: 0.0,
        puback_hdr: None,
        scenario: None,
        flap: None,
        workers: None,
    }
}

/// CPU of the simulator, the hub and the machine between two [`CpuMark`]s.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    sim: Option<f64>,
    hub: Option<f64>,
    machine: Option<f64>,
    at: std::time::Instant,
}

impl CpuMark {
    /// Now, with the hub's pid if known.
    pub fn now(hub_pid: Option<u32>) -> Self {
        Self {
            sim: crate::report::own_cpu_secs(),
            hub: hub_pid.and_then(crate::report::cpu_secs),
            machine: crate::probe::machine_busy_secs(),
            at: std::time::Instant::now(),
        }
    }

    /// CPU used since `self`.
    pub fn since(&self, hub_pid: Option<u32>) -> Option<Cpu> {
        let end = Self::now(hub_pid);
        let secs = end.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let sim_secs = end.sim? - self.sim?;
        let hub_secs = match (self.hub, end.hub) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let machine_secs = match (self.machine, end.machine) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        Some(Cpu {
            sim_secs,
            sim_cores: sim_secs / secs,
            hub_secs,
            hub_cores: hub_secs.map(|s| s / secs),
            machine_secs,
            other_secs: machine_secs.map(|m| (m - sim_secs - hub_secs.unwrap_or(0.0)).max(0.0)),
        })
    }
}

/// Runs the scenario `args` names (or `--flap`) on a provisioned fleet.
pub async fn run(
    args: Args,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    if args.flap.is_some() {
        return crate::flap::run(args, fleet, interrupt).await;
    }
    match args.scenario {
        Scenario::Connections => connections::held(args, fleet, interrupt).await,
        Scenario::ConnectRate => connections::rate(args, fleet, interrupt).await,
        Scenario::Methods => round_trips::methods(args, fleet, interrupt).await,
        Scenario::Twin => round_trips::twin(args, fleet, interrupt).await,
        Scenario::Storm => storm::run(args, fleet, interrupt).await,
        Scenario::Telemetry => Err(RunError::Config(
            "the telemetry scenario runs in crate::run".into(),
        )),
    }
}
