//! What a run measured: the live counters every device task bumps, latency
//! histograms, CPU time from /proc, and the final report as text or JSON — with its
//! sections for the scenarios (handshakes, connections held, round trips, the storm
//! and the hub's usage during it), for `--flap`, and the failures tallied by message.
//! Plain data beside every layer: it imports only [`crate::values`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::values::{Scenario, StormMode};

/// Counters shared by every device task and read by the progress line.
#[derive(Debug, Default)]
pub struct Counters {
    /// Devices connected now.
    pub connected: AtomicU64,
    /// Connection attempts refused or failed.
    pub connect_failed: AtomicU64,
    /// Messages written to the socket.
    pub sent: AtomicU64,
    /// Messages the broker acknowledged (QoS 1).
    pub acked: AtomicU64,
    /// Messages that will never be acknowledged (connection lost, drain timeout).
    pub failed: AtomicU64,
    /// Connections lost after they were established.
    pub disconnects: AtomicU64,
    /// Direct methods answered (device-sdk path).
    pub methods: AtomicU64,
    /// Twin reported patches acknowledged (device-sdk path).
    pub twin_reports: AtomicU64,
    /// C2D messages completed (device-sdk path).
    pub c2d: AtomicU64,
    /// Set during `--warmup`: latencies are not recorded.
    pub warming: std::sync::atomic::AtomicBool,
    /// C2D messages received (device-sdk path).
    pub c2d_received: AtomicU64,
    /// Desired-property patches received (device-sdk path).
    pub desired: AtomicU64,
    /// Writable-property acknowledgements reported (device-sdk path).
    pub desired_acks: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The counts now, as plain numbers.
    pub fn snapshot(&self) -> Counts {
        let get = Self::get;
        Counts {
            connect_failed: get(&self.connect_failed),
            sent: get(&self.sent),
            acked: get(&self.acked),
            failed: get(&self.failed),
            disconnects: get(&self.disconnects),
            methods: get(&self.methods),
            twin_reports: get(&self.twin_reports),
            c2d: get(&self.c2d),
            c2d_received: get(&self.c2d_received),
            desired: get(&self.desired),
            desired_acks: get(&self.desired_acks),
        }
    }

    /// Counters holding the sums of `groups`' (a moment's totals for the progress
    /// line and the report).
    pub fn sum(groups: &[std::sync::Arc<Counters>]) -> Counters {
        let total = Counters::default();
        for g in groups {
            for (into, from) in [
                (&total.connected, &g.connected),
                (&total.connect_failed, &g.connect_failed),
                (&total.sent, &g.sent),
                (&total.acked, &g.acked),
                (&total.failed, &g.failed),
                (&total.disconnects, &g.disconnects),
                (&total.methods, &g.methods),
                (&total.twin_reports, &g.twin_reports),
                (&total.c2d, &g.c2d),
                (&total.c2d_received, &g.c2d_received),
                (&total.desired, &g.desired),
                (&total.desired_acks, &g.desired_acks),
            ] {
                into.fetch_add(Self::get(from), Ordering::Relaxed);
            }
        }
        total
    }
}

/// A group's counts at the end of the run (see [`Counters`] for each).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Connection attempts that failed.
    pub connect_failed: u64,
    /// Messages sent.
    pub sent: u64,
    /// Messages acknowledged (QoS 1).
    pub acked: u64,
    /// Messages never acknowledged (QoS 1).
    pub failed: u64,
    /// Connections lost during the run.
    pub disconnects: u64,
    /// Direct methods answered.
    pub methods: u64,
    /// Twin reported patches acknowledged.
    pub twin_reports: u64,
    /// C2D messages completed.
    pub c2d: u64,
    /// C2D messages received.
    pub c2d_received: u64,
    /// Desired-property patches received.
    pub desired: u64,
    /// Writable-property acknowledgements reported.
    pub desired_acks: u64,
}

/// One scenario group's part of the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupReport {
    /// The group's name.
    pub name: String,
    /// `lean` or `sdk`.
    pub path: String,
    /// Its devices.
    pub devices: u64,
    /// Those that connected.
    pub connected: u64,
    /// Its telemetry QoS.
    pub qos: u8,
    /// Acknowledged (QoS 1) or sent (QoS 0) messages per second.
    pub msgs_per_sec: f64,
    /// Its counts.
    #[serde(flatten)]
    pub counts: Counts,
    /// Its publish → PUBACK latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub puback_ms: Option<Latency>,
}

/// A latency histogram in microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .expect("constant bounds that hdrhistogram accepts")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest sample.
    pub max: f64,
}

impl Latency {
    /// Percentiles of a histogram in µs; `None` when it is empty.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms  ({} samples)",
            self.p50, self.p90, self.p99, self.p99_9, self.max, self.count
        )
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

/// This process's CPU seconds.
pub fn own_cpu_secs() -> Option<f64> {
    cpu_secs(std::process::id())
}

fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name is parenthesised and may hold spaces: fields count from
    // after the last `)`. utime and stime are fields 14 and 15 of the line.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux configuration the kernel exposes to user space.
    Some(ticks / 100.0)
}

/// CPU used over the send window and the drain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cpu {
    /// The simulator's CPU seconds.
    pub sim_secs: f64,
    /// The simulator's average cores.
    pub sim_cores: f64,
    /// The hub's CPU seconds (with `--hub-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_secs: Option<f64>,
    /// The hub's average cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_cores: Option<f64>,
    /// Busy CPU seconds of the whole machine (/proc/stat) over the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_secs: Option<f64>,
    /// Machine − simulator − hub: CPU other processes took (a quiet machine shows ~0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_secs: Option<f64>,
}

impl Cpu {
    /// One line: simulator, hub, machine and others.
    pub fn text(&self) -> String {
        let mut text = format!(
            "simulator {:.2} s ({:.2} cores)",
            self.sim_secs, self.sim_cores
        );
        if let (Some(secs), Some(cores)) = (self.hub_secs, self.hub_cores) {
            text.push_str(&format!("; hub {secs:.2} s ({cores:.2} cores)"));
        }
        if let (Some(machine), Some(other)) = (self.machine_secs, self.other_secs) {
            text.push_str(&format!("; machine {machine:.2} s, others {other:.2} s"));
        }
        text
    }
}

/// A histogram as base64 of its HDR V2 serialization (uncompressed: the report is
/// read by a parent process, not stored).
pub fn encode_histogram(h: &Histogram<u64>) -> Option<String> {
    use base64::Engine;
    use hdrhistogram::serialization::Serializer;
    let mut bytes = Vec::new();
    hdrhistogram::serialization::V2Serializer::new()
        .serialize(h, &mut bytes)
        .ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The histogram [`encode_histogram`] wrote.
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>, String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|err| format!("histogram is not base64: {err}"))?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|err| format!("histogram does not deserialize: {err:?}"))
}

/// What `--verify` found in the stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verification {
    /// Messages of this run read back (duplicates included).
    pub read: u64,
    /// Distinct messages of this run read back.
    pub distinct: u64,
    /// Acknowledged messages that were not read back.
    pub lost: u64,
    /// Extra copies of messages read back.
    pub duplicated: u64,
    /// Messages of this run that were read back although never acknowledged (QoS 0,
    /// or PUBACKs lost with their connection): not an error.
    pub unacked_read: u64,
    /// Bodies stamped with this run but naming a device or sequence number it never
    /// sent (corruption, or another simulator with the same run id).
    pub unexpected: u64,
    /// Send → enqueued latency (the body's send time against `enqueuedTime`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_to_end_ms: Option<Latency>,
}

/// The final report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// `hub` or `mqtt`.
    pub target: String,
    /// `lean` or `sdk`.
    pub path: String,
    /// The run id stamped into every payload.
    pub run: String,
    /// Devices asked for.
    pub devices: u64,
    /// Devices that connected.
    pub connected: u64,
    /// Connection attempts that failed.
    pub connect_failed: u64,
    /// Time from the first connection attempt to the last CONNACK.
    pub connect_secs: f64,
    /// Connections per second over `connect_secs`.
    pub connect_rate: f64,
    /// Telemetry QoS.
    pub qos: u8,
    /// Messages sent.
    pub sent: u64,
    /// Messages acknowledged (QoS 1).
    pub acked: u64,
    /// Messages never acknowledged (QoS 1).
    pub failed: u64,
    /// Connections lost during the run.
    pub disconnects: u64,
    /// Length of the send window (`--duration`, or until Ctrl-C).
    pub elapsed_secs: f64,
    /// From the end of the window until every device drained and disconnected.
    pub drain_secs: f64,
    /// Acknowledged (QoS 1) or sent (QoS 0) messages per second.
    pub msgs_per_sec: f64,
    /// Publish → PUBACK latency (QoS 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub puback_ms: Option<Latency>,
    /// CPU over the publish phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Direct methods answered (device-sdk path).
    pub methods: u64,
    /// Twin reported patches acknowledged (device-sdk path).
    pub twin_reports: u64,
    /// C2D messages completed (device-sdk path).
    pub c2d: u64,
    /// C2D messages received (device-sdk path).
    #[serde(default)]
    pub c2d_received: u64,
    /// Desired-property patches received (device-sdk path).
    #[serde(default)]
    pub desired: u64,
    /// Writable-property acknowledgements reported (`{"value", "ac", "av"}`).
    #[serde(default)]
    pub desired_acks: u64,
    /// Ended early by Ctrl-C.
    pub interrupted: bool,
    /// `--verify` results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verification>,
    /// Warm-up before the measured window (`--warmup`): its messages count in sent
    /// and acked but not in the rate or the latencies.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup_secs: f64,
    /// The publish→PUBACK histogram, serialized (HDR V2, base64), so `--workers`
    /// merges distributions, not percentiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub puback_hdr: Option<String>,
    /// What a scenario other than telemetry measured (`--scenario`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<ScenarioReport>,
    /// Reconnects under `--flap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flap: Option<FlapReport>,
    /// How many processes the report merges (`--workers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// The seed of the generated payload fields (`--seed` repeats them).
    #[serde(default)]
    pub seed: u64,
    /// Per group, with `--scenario-file` (the totals above are their sums).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupReport>,
    /// The fleet's registrations through the provisioning contract (`--provision dps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<ProvisioningReport>,
}

/// How the fleet registered through the Device Provisioning Service contract.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProvisioningReport {
    /// The enrollment group.
    pub group: String,
    /// Registrations made.
    pub attempted: u64,
    /// Registrations that ended `assigned`.
    pub registered: u64,
    /// Registrations that did not.
    pub failed: u64,
    /// 429 answers waited out (the hub's registration flood limit).
    pub throttled: u64,
    /// Operation-status polls.
    pub polls: u64,
    /// Registrations in flight at once (at most).
    pub in_flight: u64,
    /// From the first CONNECT to the last registration's answer.
    pub secs: f64,
    /// Registrations assigned per second over `secs`.
    pub per_sec: f64,
    /// One registration, CONNECT to `assigned` (retry-after waits included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Latency>,
    /// Failures by message.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
}

impl ProvisioningReport {
    /// Lines for the text report.
    pub fn text(&self) -> String {
        let mut out = format!(
            "provision  dps group {}: {} assigned of {} ({} failed) in {:.2} s, {:.0} registrations/s; {} in flight, {} throttled (429), {} polls\n",
            self.group,
            self.registered,
            self.attempted,
            self.failed,
            self.secs,
            self.per_sec,
            self.in_flight,
            self.throttled,
            self.polls
        );
        if let Some(latency) = &self.latency_ms {
            out.push_str(&format!("register   {}\n", latency.line()));
        }
        for (error, count) in &self.errors {
            out.push_str(&format!("  {count} × {error}\n"));
        }
        out
    }
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

impl Report {
    /// The report as text for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "firmware-sim run {} against {} ({} path){}",
            self.run,
            self.target,
            self.path,
            if self.interrupted {
                " — interrupted, partial report"
            } else {
                ""
            }
        ));
        if let Some(provisioning) = &self.provisioning {
            line(provisioning.text().trim_end().to_string());
        }
        if let Some(scenario) = &self.scenario {
            // A scenario has no telemetry: its own section says what it measured.
            if let Some(workers) = self.workers {
                line(format!("workers    {workers} processes, reports merged"));
            }
            out.push_str(&scenario.text());
            return out;
        }
        line(format!(
            "devices    {} connected of {} ({} failed) in {:.2} s, {:.0} connects/s",
            self.connected, self.devices, self.connect_failed, self.connect_secs, self.connect_rate
        ));
        line(format!(
            "messages   sent {}  acked {}  failed {}  (QoS {}) in {:.2} s (+{:.2} s drain): {:.0} msgs/s; {} disconnects",
            self.sent,
            self.acked,
            self.failed,
            self.qos,
            self.elapsed_secs,
            self.drain_secs,
            self.msgs_per_sec,
            self.disconnects
        ));
        if let Some(latency) = &self.puback_ms {
            line(format!("puback     {}", latency.line()));
        }
        if let Some(cpu) = &self.cpu {
            line(format!("cpu        {}", cpu.text()));
        }
        if let Some(workers) = self.workers {
            line(format!("workers    {workers} processes, reports merged"));
        }
        if let Some(flap) = &self.flap {
            line(flap.text());
        }
        if self.path != "lean" {
            line(format!(
                "behaviour  {} methods answered, {} twin reports, {} of {} C2D completed, {} desired patches, {} acknowledged",
                self.methods,
                self.twin_reports,
                self.c2d,
                self.c2d_received,
                self.desired,
                self.desired_acks
            ));
        }
        for g in &self.groups {
            let c = &g.counts;
            line(format!(
                "group {}  {} path, {} connected of {}; sent {}  acked {}  failed {}  (QoS {}): {:.0} msgs/s; {} methods, {} twin reports, {} C2D",
                g.name,
                g.path,
                g.connected,
                g.devices,
                c.sent,
                c.acked,
                c.failed,
                g.qos,
                g.msgs_per_sec,
                c.methods,
                c.twin_reports,
                c.c2d
            ));
        }
        if let Some(v) = &self.verify {
            line(format!(
                "verify     read {} ({} distinct): {} lost, {} duplicated, {} read although unacked, {} unexpected",
                v.read, v.distinct, v.lost, v.duplicated, v.unacked_read, v.unexpected
            ));
            if let Some(latency) = &v.end_to_end_ms {
                line(format!("end-to-end {}", latency.line()));
            }
        }
        out
    }
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

/// The hub over a stretch of time, sampled every 100 ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HubUsage {
    /// Samples taken.
    pub samples: u64,
    /// RSS at the first sample, KiB.
    pub rss_start_kib: u64,
    /// Largest RSS seen, KiB.
    pub rss_peak_kib: u64,
    /// RSS at the last sample, KiB.
    pub rss_end_kib: u64,
    /// CPU seconds the hub used between samples (across a restart: both processes'
    /// shares that the samples saw).
    pub cpu_secs: f64,
    /// Largest CPU use over one sampling interval, in cores.
    pub cpu_peak_cores: f64,
}

/// What flapping did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FlapReport {
    /// The per-device, per-second drop probability.
    pub probability: f64,
    /// Connections dropped on purpose.
    pub drops: u64,
    /// Reconnects that succeeded.
    pub reconnects: u64,
    /// Reconnect attempts that failed (and were retried).
    pub reconnect_failed: u64,
    /// Devices still reconnecting when the run ended.
    pub not_back: u64,
}

impl FlapReport {
    /// One line for the text report.
    pub fn text(&self) -> String {
        format!(
            "flap       P={}: {} drops, {} reconnects, {} failed reconnect attempts, {} not back at the end",
            self.probability, self.drops, self.reconnects, self.reconnect_failed, self.not_back
        )
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
    let mut merged = histogram();
    for text in encoded {
        merged
            .add(decode_histogram(text)?)
            .map_err(|err| format!("cannot merge histograms: {err:?}"))?;
    }
    Ok(latency(&merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces() {
        let stat = "42 (my (odd) cmd) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0";
        assert_eq!(parse_stat_cpu(stat), Some(3.0));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert!(own_cpu_secs().is_some());
    }

    #[test]
    fn histograms_survive_serialization_and_merge_exactly() {
        let (mut a, mut b) = (histogram(), histogram());
        for us in 1..=500u64 {
            a.record(us).unwrap();
            b.record(us * 1000).unwrap();
        }
        let mut merged = decode_histogram(&encode_histogram(&a).unwrap()).unwrap();
        merged
            .add(decode_histogram(&encode_histogram(&b).unwrap()).unwrap())
            .unwrap();
        let mut direct = a.clone();
        direct.add(&b).unwrap();
        assert_eq!(merged.len(), 1000);
        assert_eq!(
            merged.value_at_quantile(0.99),
            direct.value_at_quantile(0.99)
        );
        assert!(decode_histogram("not base64!").is_err());
    }

    #[test]
    fn latency_percentiles_come_from_the_histogram() {
        let mut h = histogram();
        assert!(Latency::from_histogram(&h).is_none());
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let latency = Latency::from_histogram(&h).unwrap();
        assert_eq!(latency.count, 1000);
        assert!((latency.p50 - 500.0).abs() < 1.0, "{latency:?}");
        assert!((latency.max - 1000.0).abs() < 1.0, "{latency:?}");
    }
}
