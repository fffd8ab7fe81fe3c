//! `--workers K`: the parent splits the fleet into K slices, runs a child
//! firmware-sim per slice (same arguments, its `--devices` and hidden
//! `--first-device`, `--json`, and its own source addresses), and merges their JSON
//! reports: counters add up, histograms travel serialized (HDR V2, base64) and are
//! merged as distributions, rates add up (the children run side by side), times are
//! the longest child's, and the hub's CPU and RSS (which every child sees whole) are
//! the largest reading, not a sum.

use std::ffi::OsString;
use std::net::IpAddr;
use std::process::Stdio;

use crate::report::{
    Cpu, Errors, FlapReport, Handshakes, Held, Report, RoundTrips, ScenarioReport, Storm, merge_hdr,
};
use crate::run::RunError;
use crate::settings::Args;
use crate::values::{Scenario, resolve};

/// Flags the parent sets per child, with whether they take a value.
const PER_CHILD: &[(&str, bool)] = &[
    ("--workers", true),
    ("--devices", true),
    ("--first-device", true),
    ("--source-addrs", true),
    ("--total", true),
    ("--json", false),
];

/// The parent's arguments without the flags it sets per child.
pub fn child_base_args(argv: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut argv = argv.into_iter();
    while let Some(arg) = argv.next() {
        let text = arg.to_string_lossy();
        let per_child = PER_CHILD.iter().find(|(flag, _)| {
            text == *flag
                || text
                    .strip_prefix(flag)
                    .is_some_and(|rest| rest.starts_with('='))
        });
        match per_child {
            // `--flag value`: skip the value too.
            Some((flag, true)) if text == *flag => {
                argv.next();
            }
            Some(_) => {}
            None => out.push(arg),
        }
    }
    out
}

/// Device slices: (first device, count) for each of `workers` children.
pub fn slices(devices: u32, workers: u32) -> Vec<(u32, u32)> {
    let (base, extra) = (devices / workers, devices % workers);
    let mut first = 0;
    (0..workers)
        .map(|j| {
            let count = base + u32::from(j < extra);
            let slice = (first, count);
            first += count;
            slice
        })
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Each child's source addresses: an explicit list dealt out round-robin (a child
/// gets at least one), else — for a loopback target whose fleet needs more ports than
/// one address has — disjoint runs of 127.0.0.x so children never share ports.
pub fn child_sources(
    explicit: Option<&[IpAddr]>,
    target_is_loopback: bool,
    counts: &[u64],
) -> Vec<Option<Vec<IpAddr>>> {
    let k = counts.len();
    if let Some(list) = explicit.filter(|l| !l.is_empty()) {
        return (0..k)
            .map(|j| {
                let mine: Vec<IpAddr> = list.iter().copied().skip(j).step_by(k).collect();
                Some(if mine.is_empty() {
                    vec![list[j % list.len()]]
                } else {
                    mine
                })
            })
            .collect();
    }
    let usable = u64::from(crate::net::ephemeral_ports()) * 3 / 4;
    if !target_is_loopback || counts.iter().sum::<u64>() <= usable {
        return vec![None; k];
    }
    let mut next = u32::from(std::net::Ipv4Addr::new(127, 0, 0, 1));
    counts
        .iter()
        .map(|&n| {
            let need = n.div_ceil(usable.max(1)).max(1) as u32;
            let mine = (next..next + need)
                .map(|a| IpAddr::V4(std::net::Ipv4Addr::from(a)))
                .collect();
            next += need;
            Some(mine)
        })
        .collect()
}

/// Whether the MQTT target is a loopback address, as far as the arguments tell.
fn target_is_loopback(args: &Args) -> bool {
    if let Some(addr) = args.target {
        return addr.ip().is_loopback();
    }
    if let Some(mqtt) = &args.mqtt {
        return resolve(mqtt).is_ok_and(|a| a.ip().is_loopback());
    }
    if let Some(dir) = &args.data_dir {
        return crate::api::read_endpoints(dir)
            .ok()
            .and_then(|e| e.mqtt)
            .is_some_and(|a| a.ip().is_loopback());
    }
    false
}

/// Runs the children and merges their reports.
pub async fn run(
    args: Args,
    workers: u32,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let exe = std::env::current_exe()
        .map_err(|err| RunError::Config(format!("cannot find my own executable: {err}")))?;
    let base = child_base_args(std::env::args_os().skip(1));
    let slices = slices(args.devices, workers);
    let per_child_connections: Vec<u64> = slices
        .iter()
        .map(|&(_, count)| match (args.scenario, args.total) {
            (Scenario::ConnectRate, Some(total)) => {
                total * u64::from(count) / u64::from(args.devices)
            }
            _ => u64::from(count),
        })
        .collect();
    let sources = child_sources(
        args.source_addrs.as_ref().map(|s| s.0.as_slice()),
        target_is_loopback(&args),
        &per_child_connections,
    );
    let mut children = Vec::with_capacity(slices.len());
    for (j, &(first, count)) in slices.iter().enumerate() {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(&base)
            .arg("--devices")
            .arg(count.to_string())
            .arg("--first-device")
            .arg((args.first_device + first).to_string())
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Their own process group: a terminal's Ctrl-C reaches the parent alone,
            // which passes exactly one SIGINT on (a second one would make a child
            // quit at once, without its report).
            .process_group(0)
            .kill_on_drop(true);
        if let (Scenario::ConnectRate, Some(_)) = (args.scenario, args.total) {
            // The handshakes are shared out like the devices.
            command
                .arg("--total")
                .arg(per_child_connections[j].max(1).to_string());
        }
        if let Some(Some(addrs)) = sources.get(j) {
            let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
            command.arg("--source-addrs").arg(list.join(","));
        }
        let child = command
            .spawn()
            .map_err(|err| RunError::Config(format!("cannot start worker {j}: {err}")))?;
        children.push(child);
    }
    let pids: Vec<Option<u32>> = children.iter().map(tokio::process::Child::id).collect();
    let outputs = futures_util::future::join_all(
        children
            .into_iter()
            .map(tokio::process::Child::wait_with_output),
    );
    let mut outputs = std::pin::pin!(outputs);
    let mut interrupt = std::pin::pin!(interrupt);
    let outputs = tokio::select! {
        outputs = &mut outputs => outputs,
        () = &mut interrupt => {
            // Every child ends with its partial report.
            for pid in pids.iter().flatten() {
                if let Ok(pid) = i32::try_from(*pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGINT);
                }
            }
            outputs.await
        }
    };
    let mut reports = Vec::with_capacity(outputs.len());
    for (j, output) in outputs.into_iter().enumerate() {
        let output =
            output.map_err(|err| RunError::Config(format!("worker {j} did not run: {err}")))?;
        if !output.status.success() {
            return Err(RunError::Config(format!(
                "worker {j} failed ({}); its error is above",
                output.status
            )));
        }
        let report: Report = serde_json::from_slice(&output.stdout)
            .map_err(|err| RunError::Config(format!("worker {j} wrote no JSON report: {err}")))?;
        reports.push(report);
    }
    let mut merged = merge(reports).map_err(RunError::Config)?;
    merged.workers = Some(workers);
    merged.devices = u64::from(args.devices);
    Ok(merged)
}

fn max_f(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, f64::max)
}

fn opt_max<T: PartialOrd + Copy>(values: impl Iterator<Item = Option<T>>) -> Option<T> {
    values.flatten().fold(None, |acc: Option<T>, v| match acc {
        Some(a) if a >= v => Some(a),
        _ => Some(v),
    })
}

fn opt_min<T: PartialOrd + Copy>(values: impl Iterator<Item = Option<T>>) -> Option<T> {
    values.flatten().fold(None, |acc: Option<T>, v| match acc {
        Some(a) if a <= v => Some(a),
        _ => Some(v),
    })
}

fn merge_cpu(cpus: &[&Cpu]) -> Option<Cpu> {
    if cpus.is_empty() {
        return None;
    }
    let sim_secs = cpus.iter().map(|c| c.sim_secs).sum();
    let hub_secs = opt_max(cpus.iter().map(|c| c.hub_secs));
    let machine_secs = opt_max(cpus.iter().map(|c| c.machine_secs));
    Some(Cpu {
        sim_secs,
        sim_cores: cpus.iter().map(|c| c.sim_cores).sum(),
        hub_secs,
        hub_cores: opt_max(cpus.iter().map(|c| c.hub_cores)),
        machine_secs,
        other_secs: machine_secs.map(|m| (m - sim_secs - hub_secs.unwrap_or(0.0)).max(0.0)),
    })
}

/// Merges the children's reports into one.
pub fn merge(reports: Vec<Report>) -> Result<Report, String> {
    let first = reports.first().ok_or("no worker reported")?.clone();
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let connected = sum(|r| r.connected);
    let connect_secs = max_f(reports.iter().map(|r| r.connect_secs));
    let puback = merge_hdr(reports.iter().filter_map(|r| r.puback_hdr.as_ref()))?;
    let cpus: Vec<&Cpu> = reports.iter().filter_map(|r| r.cpu.as_ref()).collect();
    let flaps: Vec<&FlapReport> = reports.iter().filter_map(|r| r.flap.as_ref()).collect();
    let scenarios: Vec<&ScenarioReport> =
        reports.iter().filter_map(|r| r.scenario.as_ref()).collect();
    Ok(Report {
        target: first.target.clone(),
        path: first.path.clone(),
        run: reports
            .iter()
            .map(|r| r.run.as_str())
            .collect::<Vec<_>>()
            .join("+"),
        devices: sum(|r| r.devices),
        connected,
        connect_failed: sum(|r| r.connect_failed),
        connect_secs,
        connect_rate: connected as f64 / connect_secs.max(1e-9),
        qos: first.qos,
        sent: sum(|r| r.sent),
        acked: sum(|r| r.acked),
        failed: sum(|r| r.failed),
        disconnects: sum(|r| r.disconnects),
        elapsed_secs: max_f(reports.iter().map(|r| r.elapsed_secs)),
        drain_secs: max_f(reports.iter().map(|r| r.drain_secs)),
        msgs_per_sec: reports.iter().map(|r| r.msgs_per_sec).sum(),
        puback_ms: puback.0,
        cpu: merge_cpu(&cpus),
        methods: sum(|r| r.methods),
        twin_reports: sum(|r| r.twin_reports),
        c2d: sum(|r| r.c2d),
        c2d_received: sum(|r| r.c2d_received),
        desired: sum(|r| r.desired),
        desired_acks: sum(|r| r.desired_acks),
        interrupted: reports.iter().any(|r| r.interrupted),
        verify: None,
        seed: first.seed,
        // A scenario file runs in one process (`Args::validate`): no groups to merge.
        groups: Vec::new(),
        warmup_secs: first.warmup_secs,
        puback_hdr: puback.1,
        scenario: if scenarios.is_empty() {
            None
        } else {
            Some(merge_scenarios(&scenarios)?)
        },
        flap: (!flaps.is_empty()).then(|| FlapReport {
            probability: flaps[0].probability,
            drops: flaps.iter().map(|f| f.drops).sum(),
            reconnects: flaps.iter().map(|f| f.reconnects).sum(),
            reconnect_failed: flaps.iter().map(|f| f.reconnect_failed).sum(),
            not_back: flaps.iter().map(|f| f.not_back).sum(),
        }),
        workers: None,
        // `--provision dps` runs in one process (`Args::validate`).
        provisioning: None,
    })
}

fn merge_scenarios(parts: &[&ScenarioReport]) -> Result<ScenarioReport, String> {
    let mut merged = ScenarioReport::new(parts[0].name);
    let handshakes: Vec<&Handshakes> = parts.iter().filter_map(|p| p.handshakes.as_ref()).collect();
    if !handshakes.is_empty() {
        let (latency_ms, hdr) = merge_hdr(handshakes.iter().filter_map(|h| h.hdr.as_ref()))?;
        let secs = max_f(handshakes.iter().map(|h| h.secs));
        let ok = handshakes.iter().map(|h| h.ok).sum::<u64>();
        merged.handshakes = Some(Handshakes {
            attempted: handshakes.iter().map(|h| h.attempted).sum(),
            ok,
            failed: handshakes.iter().map(|h| h.failed).sum(),
            in_flight: handshakes.iter().map(|h| h.in_flight).sum(),
            secs,
            per_sec: ok as f64 / secs.max(1e-9),
            latency_ms,
            hdr,
        });
    }
    let held: Vec<&Held> = parts.iter().filter_map(|p| p.held.as_ref()).collect();
    if !held.is_empty() {
        let total = held.iter().map(|h| h.held).sum::<u64>();
        let before = opt_min(held.iter().map(|h| h.hub_rss_before_kib));
        let end = opt_max(held.iter().map(|h| h.hub_rss_end_kib));
        merged.held = Some(Held {
            held: total,
            open_after_hold: held.iter().map(|h| h.open_after_hold).sum(),
            hold_secs: max_f(held.iter().map(|h| h.hold_secs)),
            hub_rss_before_kib: before,
            hub_rss_held_kib: opt_max(held.iter().map(|h| h.hub_rss_held_kib)),
            hub_rss_mid_kib: opt_max(held.iter().map(|h| h.hub_rss_mid_kib)),
            hub_rss_end_kib: end,
            hub_kib_per_connection: match (before, end) {
                (Some(b), Some(e)) => Some((e as f64 - b as f64) / total.max(1) as f64),
                _ => None,
            },
            hub_cpu_ramp_secs: opt_max(held.iter().map(|h| h.hub_cpu_ramp_secs)),
            hub_cpu_hold_secs: opt_max(held.iter().map(|h| h.hub_cpu_hold_secs)),
        });
    }
    let trips: Vec<&RoundTrips> = parts
        .iter()
        .filter_map(|p| p.round_trips.as_ref())
        .collect();
    if !trips.is_empty() {
        let (latency_ms, hdr) = merge_hdr(trips.iter().filter_map(|t| t.hdr.as_ref()))?;
        merged.round_trips = Some(RoundTrips {
            in_flight_per_device: trips[0].in_flight_per_device,
            sent: trips.iter().map(|t| t.sent).sum(),
            answered: trips.iter().map(|t| t.answered).sum(),
            failed: trips.iter().map(|t| t.failed).sum(),
            device_answered: trips.iter().map(|t| t.device_answered).sum::<Option<u64>>(),
            measured: trips.iter().map(|t| t.measured).sum(),
            secs: max_f(trips.iter().map(|t| t.secs)),
            per_sec: trips.iter().map(|t| t.per_sec).sum(),
            latency_ms,
            hdr,
        });
    }
    let storms: Vec<&Storm> = parts.iter().filter_map(|p| p.storm.as_ref()).collect();
    if !storms.is_empty() {
        let all_back = storms.iter().all(|s| s.secs_to_all_back.is_some());
        merged.storm = Some(Storm {
            mode: storms[0].mode,
            connected_before: storms.iter().map(|s| s.connected_before).sum(),
            back: storms.iter().map(|s| s.back).sum(),
            secs_to_all_back: if all_back {
                opt_max(storms.iter().map(|s| s.secs_to_all_back))
            } else {
                None
            },
            reconnect_attempts: storms.iter().map(|s| s.reconnect_attempts).sum(),
            reconnect_failed: storms.iter().map(|s| s.reconnect_failed).sum(),
            hub: storms
                .iter()
                .filter_map(|s| s.hub.clone())
                .max_by_key(|h| h.rss_peak_kib),
        });
    }
    let cpus: Vec<&Cpu> = parts.iter().filter_map(|p| p.cpu.as_ref()).collect();
    merged.cpu = merge_cpu(&cpus);
    let mut errors = Errors::default();
    for part in parts {
        errors.merge(part.errors.clone());
    }
    merged.errors = errors.top();
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn children_get_the_arguments_without_the_per_child_flags() {
        let base = child_base_args(os(&[
            "--data-dir",
            "d",
            "--workers",
            "2",
            "--devices=20",
            "--json",
            "--rate",
            "max",
            "--source-addrs",
            "127.0.0.2-127.0.0.3",
        ]));
        assert_eq!(base, os(&["--data-dir", "d", "--rate", "max"]));
    }

    #[test]
    fn slices_cover_the_fleet_once() {
        assert_eq!(slices(20, 2), vec![(0, 10), (10, 10)]);
        assert_eq!(slices(7, 3), vec![(0, 3), (3, 2), (5, 2)]);
        assert_eq!(slices(2, 4), vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn sources_are_dealt_out_without_sharing() {
        let list: Vec<IpAddr> = crate::net::parse_source_addrs("127.0.0.2-127.0.0.5").unwrap();
        let dealt = child_sources(Some(&list), true, &[10, 10]);
        assert_eq!(dealt[0].as_ref().unwrap().len(), 2);
        assert_eq!(dealt[1].as_ref().unwrap()[0], list[1]);
        assert_eq!(child_sources(None, true, &[10, 10]), vec![None, None]);
        let usable = u64::from(crate::net::ephemeral_ports()) * 3 / 4;
        let auto = child_sources(None, true, &[usable, usable + 1]);
        let (a, b) = (auto[0].as_ref().unwrap(), auto[1].as_ref().unwrap());
        assert_eq!(a.len(), 1);
        assert_eq!(b.len(), 2);
        assert!(!b.contains(&a[0]), "{a:?} {b:?}");
    }

    #[test]
    fn reports_merge_counts_and_histograms_not_percentiles() {
        let mut parts = Vec::new();
        for (scale, sent) in [(1u64, 100u64), (1000, 300)] {
            let mut h = crate::report::histogram();
            for i in 1..=sent {
                h.record(i * scale).unwrap();
            }
            let mut report: Report = serde_json::from_value(serde_json::json!({
                "target": "hub", "path": "lean", "run": "r", "devices": 10, "connected": 10,
                "connect_failed": 0, "connect_secs": 1.0, "connect_rate": 10.0, "qos": 1,
                "sent": sent, "acked": sent, "failed": 0, "disconnects": 0,
                "elapsed_secs": 2.0, "drain_secs": 0.1, "msgs_per_sec": sent as f64 / 2.0,
                "methods": 0, "twin_reports": 0, "c2d": 0, "interrupted": false
            }))
            .unwrap();
            report.puback_hdr = crate::report::encode_histogram(&h);
            parts.push(report);
        }
        let merged = merge(parts).unwrap();
        assert_eq!(merged.sent, 400);
        assert_eq!(merged.connected, 20);
        assert_eq!(merged.msgs_per_sec, 200.0);
        let puback = merged.puback_ms.unwrap();
        assert_eq!(puback.count, 400);
        // 3/4 of the samples are the slow child's: the merged median is among them.
        assert!(puback.p50 > 1.0, "{puback:?}");
    }
}
