//! The connect storm: connect the fleet, then lose every connection at once and time
//! how long until every device is connected again, sampling the hub's RSS and CPU
//! from /proc meanwhile. `--storm drop`: the simulator drops them all at one instant
//! (no DISCONNECT: a network outage as the hub sees it) and every device reconnects
//! at once. `--storm restart`: the simulator waits for the hub to drop them (a script
//! restarts it; `--hub-pid-file` follows the new process) and devices retry until it
//! accepts them again. Failed attempts are retried after a jittered backoff (50 ms
//! doubling to 1 s), as firmware does, so a refusing hub is not hammered in lockstep.
//! `--duration` bounds the wait for the fleet to come back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::connections::{HANDSHAKE_TIMEOUT, close_all, open_all};
use crate::device::Identity;
use crate::probe::{HubProcess, Sampler};
use crate::report::{Counters, Errors, Report, ScenarioReport, Storm};
use crate::run::{Fleet, Progress, RunError, run_id, shell};
use crate::settings::Args;
use crate::values::{Scenario, StormMode};
use crate::wire::{self, Conn};

/// First retry delay after a failed reconnect.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Reconnects `identity` until it succeeds or `stop` is set; counts attempts and
/// failures.
pub(crate) async fn reconnect(
    addr: std::net::SocketAddr,
    identity: &Identity,
    attempts: &AtomicU64,
    failed: &AtomicU64,
    errors: &std::sync::Mutex<Errors>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Conn> {
    let mut backoff = BACKOFF_START;
    loop {
        if *stop.borrow() {
            return None;
        }
        attempts.fetch_add(1, Ordering::Relaxed);
        match wire::open(addr, identity.bind, identity, 0, HANDSHAKE_TIMEOUT).await {
            Ok((conn, _)) => return Some(conn),
            Err(err) => {
                failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut errors) = errors.lock() {
                    errors.add(&err);
                }
            }
        }
        let pause = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// The storm scenario.
pub async fn run(
    args: Args,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let mut interrupt = std::pin::pin!(interrupt);
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(vec![Arc::clone(&counters)], u64::from(args.devices));
    let (conns, _, errors, interrupted) = open_all(
        fleet.mqtt,
        &fleet.identities,
        args.connect_inflight as usize,
        &counters,
        &mut interrupt,
    )
    .await;
    let before = conns.len() as u64;
    if before == 0 {
        progress.finish();
        return Err(RunError::NoneConnected(
            errors.top().into_keys().next().unwrap_or_default(),
        ));
    }
    let mut report = shell(&args, &fleet, run_id());
    report.connected = before;
    report.connect_failed = Counters::get(&counters.connect_failed);
    if interrupted {
        progress.finish();
        report.interrupted = true;
        wire_close(conns).await;
        return Ok(report);
    }
    eprintln!(
        "firmware-sim: storm: {before} devices connected; {}",
        match args.storm {
            StormMode::Drop => "dropping every connection now",
            StormMode::Restart => "waiting for the hub to drop them",
        }
    );

    let identities: std::collections::HashMap<String, Identity> = fleet
        .identities
        .iter()
        .map(|i| (i.client_id.clone(), i.clone()))
        .collect();
    let attempts = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(errors));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (drop_tx, drop_rx) = watch::channel(false);
    // Each device reports when it lost its connection and when it is back.
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<Instant>();
    let (back_tx, mut back_rx) = mpsc::unbounded_channel::<Instant>();
    let sampler =
        HubProcess::from_flags(args.hub_pid_file.as_deref(), args.hub_pid).map(Sampler::start);
    let mut tasks = Vec::with_capacity(conns.len());
    for conn in conns {
        let Some(identity) = identities.get(conn.client_id()).cloned() else {
            continue;
        };
        let (attempts, failed, errors, mut stop, mut drop_now, lost, back, counters) = (
            Arc::clone(&attempts),
            Arc::clone(&failed),
            Arc::clone(&errors),
            stop_rx.clone(),
            drop_rx.clone(),
            lost_tx.clone(),
            back_tx.clone(),
            Arc::clone(&counters),
        );
        let (addr, mode) = (fleet.mqtt, args.storm);
        tasks.push(tokio::spawn(async move {
            let mut conn = conn;
            let stopped = match mode {
                StormMode::Drop => tokio::select! {
                    _ = drop_now.wait_for(|d| *d) => false,
                    _ = stop.wait_for(|s| *s) => true,
                },
                StormMode::Restart => tokio::select! {
                    // Anything but an orderly packet stream ends the wait: EOF, a
                    // reset, garbage.
                    _ = async { while let Ok(Some(_)) = conn.read().await {} } => false,
                    _ = stop.wait_for(|s| *s) => true,
                },
            };
            if stopped {
                return Some(conn);
            }
            // Dropping the socket closes it at once, without DISCONNECT.
            drop(conn);
            let _ = lost.send(Instant::now());
            counters.connected.fetch_sub(1, Ordering::Relaxed);
            let conn = reconnect(addr, &identity, &attempts, &failed, &errors, &mut stop).await?;
            Counters::bump(&counters.connected);
            let _ = back.send(Instant::now());
            Some(conn)
        }));
    }
    drop((lost_tx, back_tx));
    let storm_started = match args.storm {
        StormMode::Drop => {
            let at = Instant::now();
            let _ = drop_tx.send(true);
            Some(at)
        }
        StormMode::Restart => None,
    };
    let deadline = tokio::time::Instant::now() + args.duration;
    let mut first_lost = storm_started;
    let (mut lost, mut back) = (0u64, 0u64);
    let mut all_back_at = None;
    let mut interrupted = false;
    while back < before {
        tokio::select! {
            Some(at) = lost_rx.recv() => {
                lost += 1;
                first_lost.get_or_insert(at);
            }
            Some(at) = back_rx.recv() => {
                back += 1;
                if back == before {
                    all_back_at = Some(at);
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
            () = &mut interrupt => {
                interrupted = true;
                break;
            }
        }
    }
    let hub = sampler.map(Sampler::finish);
    let _ = stop_tx.send(true);
    let mut open = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(Some(conn)) = task.await {
            open.push(conn);
        }
    }
    wire_close(open).await;
    progress.finish();
    let _ = lost;
    let storm = Storm {
        mode: args.storm,
        connected_before: before,
        back,
        secs_to_all_back: match (first_lost, all_back_at) {
            (Some(from), Some(to)) => Some(to.duration_since(from).as_secs_f64()),
            _ => None,
        },
        reconnect_attempts: attempts.load(Ordering::Relaxed),
        reconnect_failed: failed.load(Ordering::Relaxed),
        hub,
    };
    let mut scenario = ScenarioReport::new(Scenario::Storm);
    scenario.storm = Some(storm);
    scenario.errors = errors.lock().map(|e| e.top()).unwrap_or_default();
    report.interrupted = interrupted;
    report.elapsed_secs = first_lost.map_or(0.0, |at| at.elapsed().as_secs_f64());
    report.scenario = Some(scenario);
    Ok(report)
}

async fn wire_close(conns: Vec<Conn>) {
    close_all(conns).await;
}
