//! The telemetry scenario (the default): connect the fleet at the ramp rate — lean
//! or device-sdk devices, per group — let it send for the warm-up and the measured
//! window (or until interrupted), drain, optionally verify through the stream, and
//! measure CPU on both sides; the report counts per group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};

use crate::lean::{self, Outcome, Phase, Plan, PlanTls};
use crate::probe::machine_busy_secs;
use crate::report::{
    Counters, Cpu, GroupReport, Latency, Report, cpu_secs, encode_histogram, histogram,
    own_cpu_secs,
};
use crate::run::{Fleet, Progress, RunError, run_id};
use crate::sdk;
use crate::settings::{Args, Group};
use crate::template::Template;
use crate::values::Auth;
use crate::verify;

/// How many devices may be between TCP connect and CONNACK at once when no ramp is
/// given: more would overflow the broker's accept backlog and turn speed into
/// refusals.
const CONNECTING_AT_ONCE: usize = 256;

/// Runs the telemetry scenario on a provisioned fleet of `groups`; `interrupt` ends
/// it early (Ctrl-C) with a partial report.
pub async fn run(
    args: Args,
    groups: Vec<Group>,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let mut interrupt = std::pin::pin!(interrupt);
    let mut interrupted = false;
    let seed = args.seed.unwrap_or_else(rand::random);
    let start_offsets = match (&fleet.api, args.verify) {
        (Some(api), true) => Some(verify::start_offsets(&api.partitions().await?)),
        _ => None,
    };
    let run = run_id();
    // Each group counts for itself; the totals are their sums.
    let counters: Vec<Arc<Counters>> = groups
        .iter()
        .map(|_| Arc::new(Counters::default()))
        .collect();
    let (phase_tx, phase_rx) = watch::channel(Phase::Connecting);
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel();
    let run_arc: Arc<str> = run.clone().into();
    let server_name = rustls::pki_types::ServerName::try_from(args.hostname.clone())
        .map_err(|err| RunError::Config(format!("--hostname {:?}: {err}", args.hostname)))?;
    let plans: Vec<Arc<Plan>> = groups
        .iter()
        .map(|g| {
            // TLS groups dial the hub's MQTT-over-TLS listener.
            let tls = match (&fleet.tls, args.uses_tls(g.auth)) {
                (Some(tls), true) => Some(PlanTls {
                    tls: Arc::clone(tls),
                    x509: g.auth == Auth::X509,
                    server_name: server_name.clone(),
                }),
                _ => None,
            };
            Arc::new(Plan {
                addr: tls.as_ref().map_or(fleet.mqtt, |t| t.tls.mqtts),
                tls,
                qos: g.qos,
                rate: g.rate,
                inflight: g.inflight,
                template: Arc::new(g.payload.clone().with_seed(seed)),
                run: Arc::clone(&run_arc),
                drain: args.drain,
            })
        })
        .collect();
    let owners: Vec<usize> = groups
        .iter()
        .enumerate()
        .flat_map(|(i, g)| std::iter::repeat_n(i, g.devices as usize))
        .collect();
    let progress = Progress::start(counters.clone(), u64::from(args.devices));

    // Connect phase: at most CONNECTING_AT_ONCE handshakes, paced by --ramp.
    let connect_started = Instant::now();
    let slots = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let spawn_all = {
        let (plans, counters, phase_rx, slots) = (
            plans.clone(),
            counters.clone(),
            phase_rx.clone(),
            Arc::clone(&slots),
        );
        let identities = fleet.identities.clone();
        let keys = fleet.keys.clone();
        let behaviours: Vec<sdk::Behaviour> = groups
            .iter()
            .map(|g| {
                let mut behaviour = behaviour(&args, g);
                if args.uses_tls(g.auth) {
                    behaviour.tls.clone_from(&fleet.tls);
                }
                behaviour
            })
            .collect();
        let use_sdk: Vec<bool> = groups.iter().map(|g| g.sdk).collect();
        let owners = owners.clone();
        let ramp = args
            .ramp
            .map(|per_sec| Duration::from_secs_f64(1.0 / per_sec));
        tokio::spawn(async move {
            let mut handles = Vec::with_capacity(identities.len());
            let mut next = tokio::time::Instant::now();
            for (i, identity) in identities.into_iter().enumerate() {
                if let Some(period) = ramp {
                    tokio::time::sleep_until(next).await;
                    next += period;
                }
                let permit = Arc::clone(&slots).acquire_owned().await.ok();
                let g = owners.get(i).copied().unwrap_or(0);
                let (plan, counters, phase, connected) = (
                    Arc::clone(&plans[g]),
                    Arc::clone(&counters[g]),
                    phase_rx.clone(),
                    connected_tx.clone(),
                );
                let handle = if use_sdk[g] {
                    let key = keys.get(i).cloned().unwrap_or_default();
                    let behaviour = behaviours[g].clone();
                    tokio::spawn(async move {
                        sdk::run_device(
                            plan, identity, key, behaviour, counters, phase, connected, permit,
                        )
                        .await
                    })
                } else {
                    tokio::spawn(lean::run_device(
                        plan, identity, counters, phase, connected, permit,
                    ))
                };
                handles.push(handle);
            }
            handles
        })
    };
    let mut first_failure = None;
    let mut answered = 0u64;
    while answered < u64::from(args.devices) {
        tokio::select! {
            outcome = connected_rx.recv() => match outcome {
                Some(Ok(())) => answered += 1,
                Some(Err(err)) => {
                    answered += 1;
                    first_failure.get_or_insert_with(|| err.to_string());
                }
                None => break,
            },
            () = &mut interrupt, if !interrupted => {
                interrupted = true;
                break;
            }
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let connected_per_group: Vec<u64> = counters
        .iter()
        .map(|c| Counters::get(&c.connected))
        .collect();
    let connected: u64 = connected_per_group.iter().sum();
    if connected == 0 && !interrupted {
        let _ = phase_tx.send(Phase::Stopping);
        progress.finish();
        return Err(RunError::NoneConnected(
            first_failure.unwrap_or_else(|| "none reported".into()),
        ));
    }

    // Publish phase: the warm-up (sent, not measured), then the measured window.
    // QoS 0 groups count what they wrote, QoS 1 groups what was acknowledged.
    let rate_counts = || -> Vec<u64> {
        groups
            .iter()
            .zip(&counters)
            .map(|(g, c)| Counters::get(if g.qos == 0 { &c.sent } else { &c.acked }))
            .collect()
    };
    let mut before_window = vec![0; groups.len()];
    if !interrupted && !args.warmup.is_zero() {
        let warming = |on: bool| {
            for c in &counters {
                c.warming.store(on, std::sync::atomic::Ordering::Relaxed);
            }
        };
        warming(true);
        let _ = phase_tx.send(Phase::Running);
        tokio::select! {
            () = tokio::time::sleep(args.warmup) => {}
            () = &mut interrupt => interrupted = true,
        }
        warming(false);
        before_window = rate_counts();
    }
    let sim_cpu_start = own_cpu_secs();
    let hub_cpu_start = args.hub_pid.and_then(cpu_secs);
    let started = Instant::now();
    let machine_start = machine_busy_secs();
    if !interrupted {
        let _ = phase_tx.send(Phase::Running);
        tokio::select! {
            () = tokio::time::sleep(args.duration) => {}
            () = &mut interrupt => interrupted = true,
        }
    }
    let _ = phase_tx.send(Phase::Stopping);
    // Rates are over the send window: the drain (last PUBACKs, DISCONNECTs) is
    // reported apart so a large fleet's shutdown does not dilute them.
    let window = started.elapsed().as_secs_f64().max(1e-9);
    let handles = spawn_all.await.unwrap_or_default();
    let mut latencies = histogram();
    let mut group_latencies: Vec<_> = groups.iter().map(|_| histogram()).collect();
    let mut delivered = Vec::with_capacity(handles.len());
    // QoS 0 on the lean path: the rate runs until the last device's fence (see
    // `lean::Outcome::fenced_at`); without every fence, until everything ended.
    let mut last_fence: Option<Instant> = None;
    let mut unfenced = false;
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.await {
            Ok(Outcome {
                latencies: h,
                delivered: d,
                fenced_at,
            }) => {
                let _ = latencies.add(&h);
                if let Some(group) = owners.get(i).and_then(|&g| group_latencies.get_mut(g)) {
                    let _ = group.add(&h);
                }
                match fenced_at {
                    Some(at) => last_fence = last_fence.max(Some(at)),
                    None => unfenced |= !d.is_empty(),
                }
                delivered.push(d);
            }
            // A panicked device task delivered nothing we can vouch for.
            Err(_) => delivered.push(Vec::new()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let drain_secs = (elapsed - window).max(0.0);
    // Only a fleet that is all lean QoS 0 is timed by its fences.
    let fenced = groups.iter().all(|g| g.qos == 0 && !g.sdk);
    let window = match (fenced, last_fence, unfenced) {
        (true, Some(fence), false) => (fence - started).as_secs_f64().max(1e-9),
        (true, _, _) => elapsed,
        (false, _, _) => window,
    };
    let cpu = sim_cpu_start.and_then(|start| {
        let sim_secs = own_cpu_secs()? - start;
        let hub_secs = match (args.hub_pid, hub_cpu_start) {
            (Some(pid), Some(start)) => cpu_secs(pid).map(|end| end - start),
            _ => None,
        };
        let machine_secs = machine_start.and_then(|start| Some(machine_busy_secs()? - start));
        Some(Cpu {
            machine_secs,
            other_secs: machine_secs.map(|m| (m - sim_secs - hub_secs.unwrap_or(0.0)).max(0.0)),
            sim_secs,
            sim_cores: sim_secs / elapsed,
            hub_secs,
            hub_cores: hub_secs.map(|s| s / elapsed),
        })
    });
    progress.finish();

    // Each group's messages counted in the measured window.
    let measured: Vec<u64> = rate_counts()
        .iter()
        .zip(&before_window)
        .map(|(all, warm_up)| all - warm_up)
        .collect();
    let rate_count: u64 = measured.iter().sum();
    let group_reports: Vec<GroupReport> = if args.scenario_groups.is_empty() {
        Vec::new()
    } else {
        groups
            .iter()
            .zip(&counters)
            .zip(&group_latencies)
            .zip(&connected_per_group)
            .zip(&measured)
            .map(|((((g, c), h), &connected), &measured)| GroupReport {
                name: g.name.clone(),
                path: if g.sdk { "sdk" } else { "lean" }.to_string(),
                devices: u64::from(g.devices),
                connected,
                qos: g.qos,
                msgs_per_sec: measured as f64 / window,
                counts: c.snapshot(),
                puback_ms: Latency::from_histogram(h),
            })
            .collect()
    };
    let counters = Counters::sum(&counters);
    let use_sdk = groups.iter().any(|g| g.sdk);
    let sent = Counters::get(&counters.sent);
    let acked = Counters::get(&counters.acked);
    let qos = groups.iter().map(|g| g.qos).max().unwrap_or(args.qos);
    let mut report = Report {
        target: fleet.target.to_string(),
        path: match (use_sdk, groups.iter().all(|g| g.sdk)) {
            (true, true) => "sdk",
            (true, false) => "mixed",
            _ => "lean",
        }
        .to_string(),
        run: run.clone(),
        devices: u64::from(args.devices),
        connected,
        connect_failed: Counters::get(&counters.connect_failed),
        connect_secs,
        connect_rate: connected as f64 / connect_secs.max(1e-9),
        qos,
        sent,
        acked,
        failed: Counters::get(&counters.failed),
        disconnects: Counters::get(&counters.disconnects),
        elapsed_secs: window,
        drain_secs,
        msgs_per_sec: rate_count as f64 / window,
        puback_ms: Latency::from_histogram(&latencies),
        cpu,
        methods: Counters::get(&counters.methods),
        twin_reports: Counters::get(&counters.twin_reports),
        c2d: Counters::get(&counters.c2d),
        c2d_received: Counters::get(&counters.c2d_received),
        desired: Counters::get(&counters.desired),
        desired_acks: Counters::get(&counters.desired_acks),
        interrupted,
        verify: None,
        seed,
        groups: group_reports,
        warmup_secs: args.warmup.as_secs_f64(),
        puback_hdr: encode_histogram(&latencies),
        scenario: None,
        flap: None,
        workers: None,
        provisioning: fleet.provisioning.clone(),
    };
    if let (Some(api), Some(from)) = (&fleet.api, start_offsets) {
        let devices: HashMap<String, usize> = fleet
            .identities
            .iter()
            .enumerate()
            .map(|(i, identity)| (identity.client_id.clone(), i))
            .collect();
        let templates: Vec<&Template> = plans.iter().map(|p| &*p.template).collect();
        let tally = verify::read_back(api, from, &templates, &run, &devices, &delivered).await?;
        report.verify = Some(tally.verdict(&delivered));
    }
    Ok(report)
}

/// What a group's device-sdk devices do besides telemetry.
fn behaviour(args: &Args, group: &Group) -> sdk::Behaviour {
    sdk::Behaviour {
        hostname: args.hostname.clone(),
        auth: group.auth,
        twin_every: group.twin_every,
        method_delay: group.method_delay,
        method_fail_rate: group.method_fail_rate,
        token_ttl: args.sas_ttl,
        tls: None,
    }
}
