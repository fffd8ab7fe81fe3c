//! Connections held and the connect rate: what MQTT connections cost the broker.
//! `held` opens the fleet (`--connect-inflight` handshakes at once), holds it for
//! `--hold` and reads the hub's RSS before, once held, half-way and at the end;
//! `rate` makes `--total` handshakes (TCP connect → CONNECT → CONNACK → DISCONNECT →
//! close), connection i as device i mod N, and reports handshakes/s, CONNACK latency
//! percentiles and the CPU of the simulator, the hub and the rest of the machine.
//! Connections use keep-alive 0: a held connection costs the broker nothing but its
//! state, which is what is measured.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::Mutex;

use crate::device::Identity;
use crate::probe::{CpuMark, rss_kib};
use crate::report::{
    Counters, Errors, Handshakes, Held, Report, ScenarioReport, cpu_secs, histogram, latency,
};
use crate::run::{Fleet, Progress, RunError, run_id, shell};
use crate::settings::Args;
use crate::values::Scenario;
use crate::wire::{self, Conn};

/// How long one handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens every identity, `in_flight` at once; the open connections (in no particular
/// order), the latency histogram and the failures. Stops early when `stop` resolves.
pub async fn open_all(
    addr: std::net::SocketAddr,
    identities: &[Identity],
    in_flight: usize,
    counters: &Counters,
    stop: impl std::future::Future<Output = ()>,
) -> (Vec<Conn>, hdrhistogram::Histogram<u64>, Errors, bool) {
    let mut conns = Vec::with_capacity(identities.len());
    let mut latencies = histogram();
    let mut errors = Errors::default();
    let mut attempts = futures_util::stream::iter(identities)
        .map(|identity| wire::open(addr, identity.bind, identity, 0, HANDSHAKE_TIMEOUT))
        .buffer_unordered(in_flight.max(1));
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            next = attempts.next() => match next {
                Some(Ok((conn, took))) => {
                    let _ = latencies.record((took.as_micros() as u64).max(1));
                    Counters::bump(&counters.connected);
                    conns.push(conn);
                }
                Some(Err(err)) => {
                    Counters::bump(&counters.connect_failed);
                    errors.add(&err);
                }
                None => return (conns, latencies, errors, false),
            },
            () = &mut stop => return (conns, latencies, errors, true),
        }
    }
}

/// Closes every connection, many at once.
pub async fn close_all(conns: Vec<Conn>) {
    futures_util::stream::iter(conns)
        .for_each_concurrent(256, Conn::close)
        .await;
}

fn handshakes(
    attempted: u64,
    ok: u64,
    failed: u64,
    in_flight: u64,
    secs: f64,
    h: &hdrhistogram::Histogram<u64>,
) -> Handshakes {
    let (latency_ms, hdr) = latency(h);
    Handshakes {
        attempted,
        ok,
        failed,
        in_flight,
        secs,
        per_sec: ok as f64 / secs.max(1e-9),
        latency_ms,
        hdr,
    }
}

/// The connections scenario.
pub async fn held(
    args: Args,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let mut interrupt = std::pin::pin!(interrupt);
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(vec![Arc::clone(&counters)], u64::from(args.devices));
    let hub = args.hub_pid;
    let sample = |pid: Option<u32>| pid.and_then(|p| Some((rss_kib(p)?, cpu_secs(p)?)));
    let before = sample(hub);
    let started = Instant::now();
    let (conns, latencies, errors, mut interrupted) = open_all(
        fleet.mqtt,
        &fleet.identities,
        args.connect_inflight as usize,
        &counters,
        &mut interrupt,
    )
    .await;
    let ramp_secs = started.elapsed().as_secs_f64();
    let connected = conns.len() as u64;
    if connected == 0 && !interrupted {
        progress.finish();
        return Err(RunError::NoneConnected(
            errors.top().into_keys().next().unwrap_or_default(),
        ));
    }
    eprintln!(
        "firmware-sim: {connected} connections open; holding them {:.1} s",
        args.hold.as_secs_f64()
    );
    let at_held = sample(hub);
    let hold_started = Instant::now();
    let mut mid = None;
    if !interrupted {
        tokio::select! {
            () = tokio::time::sleep(args.hold / 2) => {
                mid = sample(hub);
                tokio::select! {
                    () = tokio::time::sleep(args.hold - args.hold / 2) => {}
                    () = &mut interrupt => interrupted = true,
                }
            }
            () = &mut interrupt => interrupted = true,
        }
    }
    let end = sample(hub);
    let hold_secs = hold_started.elapsed().as_secs_f64();
    let open_after_hold = conns.iter().filter(|c| c.is_open()).count() as u64;
    close_all(conns).await;
    progress.finish();

    let mut held = Held {
        held: connected,
        open_after_hold,
        hold_secs,
        ..Held::default()
    };
    if let (Some(before), Some(at_held), Some(end)) = (before, at_held, end) {
        held.hub_rss_before_kib = Some(before.0);
        held.hub_rss_held_kib = Some(at_held.0);
        held.hub_rss_mid_kib = mid.map(|m| m.0);
        held.hub_rss_end_kib = Some(end.0);
        held.hub_kib_per_connection =
            Some((end.0 as f64 - before.0 as f64) / connected.max(1) as f64);
        held.hub_cpu_ramp_secs = Some(at_held.1 - before.1);
        held.hub_cpu_hold_secs = Some(end.1 - at_held.1);
    }
    let failed = Counters::get(&counters.connect_failed);
    let mut scenario = ScenarioReport::new(Scenario::Connections);
    scenario.handshakes = Some(handshakes(
        connected + failed,
        connected,
        failed,
        u64::from(args.connect_inflight),
        ramp_secs,
        &latencies,
    ));
    scenario.held = Some(held);
    scenario.errors = errors.top();
    let mut report = shell(&args, &fleet, run_id());
    report.connected = connected;
    report.connect_failed = failed;
    report.connect_secs = ramp_secs;
    report.connect_rate = connected as f64 / ramp_secs.max(1e-9);
    report.disconnects = connected - open_after_hold;
    report.interrupted = interrupted;
    report.scenario = Some(scenario);
    Ok(report)
}

/// The connect-rate scenario.
pub async fn rate(
    args: Args,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let total = args.total.unwrap_or(u64::from(args.devices));
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(vec![Arc::clone(&counters)], total);
    let next = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(Mutex::new(Errors::default()));
    let identities = Arc::new(fleet.identities.clone());
    let cpu = CpuMark::now(args.hub_pid);
    let started = Instant::now();
    let workers = (0..u64::from(args.connect_inflight).min(total)).map(|_| {
        let (next, latencies, errors, identities, counters) = (
            Arc::clone(&next),
            Arc::clone(&latencies),
            Arc::clone(&errors),
            Arc::clone(&identities),
            Arc::clone(&counters),
        );
        let addr = fleet.mqtt;
        tokio::spawn(async move {
            let mut mine = histogram();
            let mut my_errors = Errors::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let identity = &identities[(i % identities.len() as u64) as usize];
                match wire::open(addr, identity.bind, identity, 0, HANDSHAKE_TIMEOUT).await {
                    Ok((conn, took)) => {
                        let _ = mine.record((took.as_micros() as u64).max(1));
                        Counters::bump(&counters.acked);
                        // The goodbye does not count against the handshake.
                        conn.close().await;
                    }
                    Err(err) => {
                        Counters::bump(&counters.connect_failed);
                        my_errors.add(&err);
                    }
                }
                Counters::bump(&counters.sent);
            }
            let _ = latencies.lock().await.add(&mine);
            errors.lock().await.merge(my_errors.0);
        })
    });
    let workers: Vec<_> = workers.collect();
    let mut interrupt = std::pin::pin!(interrupt);
    let mut interrupted = false;
    let all = futures_util::future::join_all(workers);
    tokio::select! {
        _ = all => {}
        () = &mut interrupt => {
            interrupted = true;
            // Workers stop taking new handshakes; those under way finish or time out.
            next.store(total, Ordering::Relaxed);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.since(args.hub_pid);
    progress.finish();
    let latencies = latencies.lock().await.clone();
    let ok = latencies.len();
    let failed = Counters::get(&counters.connect_failed);
    let mut scenario = ScenarioReport::new(Scenario::ConnectRate);
    scenario.handshakes = Some(handshakes(
        ok + failed,
        ok,
        failed,
        u64::from(args.connect_inflight).min(total),
        secs,
        &latencies,
    ));
    scenario.cpu = cpu;
    scenario.errors = errors.lock().await.top();
    let mut report = shell(&args, &fleet, run_id());
    report.connect_failed = failed;
    report.connect_secs = secs;
    report.connect_rate = ok as f64 / secs.max(1e-9);
    report.interrupted = interrupted;
    report.scenario = Some(scenario);
    if ok == 0 && !interrupted {
        return Err(RunError::NoneConnected(
            report
                .scenario
                .as_ref()
                .and_then(|s| s.errors.keys().next().cloned())
                .unwrap_or_default(),
        ));
    }
    Ok(report)
}
