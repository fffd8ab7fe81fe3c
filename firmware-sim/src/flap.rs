//! `--flap P`: devices send telemetry at `--rate` (QoS 0/1, `--inflight` awaiting
//! PUBACK) while, each second, each one drops its connection with probability P (no
//! DISCONNECT, as a network loss looks to the hub) and reconnects at once, retrying
//! with backoff until the hub takes it back. QoS 1 messages outstanding at a drop
//! count as failed, so sent = acked + failed still holds; the report adds drops,
//! reconnects and failed reconnect attempts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::device::{DeviceError, Identity};
use crate::lean::{Inflight, unix_ns};
use crate::probe::CpuMark;
use crate::report::{Counters, Errors, FlapReport, Latency, Report, encode_histogram, histogram};
use crate::run::{Fleet, Progress, RunError, run_id, shell};
use crate::scenarios::connections::open_all;
use crate::settings::Args;
use crate::template::Template;
use crate::values::Rate;
use crate::wire::Conn;

/// Counters the flapping devices share.
#[derive(Default)]
struct Flaps {
    drops: AtomicU64,
    reconnects: AtomicU64,
    attempts: AtomicU64,
    failed: AtomicU64,
    not_back: AtomicU64,
}

/// What every flapping device does.
struct Plan {
    addr: std::net::SocketAddr,
    qos: QoS,
    rate: Rate,
    inflight: u16,
    probability: f64,
    template: Template,
    run: String,
    drain: Duration,
}

/// Runs `--flap`.
pub async fn run(
    args: Args,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let mut interrupt = std::pin::pin!(interrupt);
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(vec![Arc::clone(&counters)], u64::from(args.devices));
    let connect_started = Instant::now();
    let (conns, _, errors, mut interrupted) = open_all(
        fleet.mqtt,
        &fleet.identities,
        args.connect_inflight as usize,
        &counters,
        &mut interrupt,
    )
    .await;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let connected = conns.len() as u64;
    if connected == 0 && !interrupted {
        progress.finish();
        return Err(RunError::NoneConnected(
            errors.top().into_keys().next().unwrap_or_default(),
        ));
    }
    let run = run_id();
    let plan = Arc::new(Plan {
        addr: fleet.mqtt,
        qos: if args.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        },
        rate: args.rate,
        inflight: args.inflight,
        probability: args.flap.unwrap_or(0.0),
        template: args.payload.clone(),
        run: run.clone(),
        drain: args.drain,
    });
    let identities: std::collections::HashMap<String, Identity> = fleet
        .identities
        .iter()
        .map(|i| (i.client_id.clone(), i.clone()))
        .collect();
    let flaps = Arc::new(Flaps::default());
    let errors = Arc::new(std::sync::Mutex::new(errors));
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpu = CpuMark::now(args.hub_pid);
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .filter_map(|conn| {
            let identity = identities.get(conn.client_id())?.clone();
            Some(tokio::spawn(device(
                Arc::clone(&plan),
                identity,
                conn,
                Arc::clone(&counters),
                Arc::clone(&flaps),
                Arc::clone(&errors),
                stop_rx.clone(),
            )))
        })
        .collect();
    if !interrupted {
        tokio::select! {
            () = tokio::time::sleep(args.duration) => {}
            () = &mut interrupt => interrupted = true,
        }
    }
    let window = started.elapsed().as_secs_f64().max(1e-9);
    let _ = stop_tx.send(true);
    let mut latencies = histogram();
    for task in tasks {
        if let Ok(h) = task.await {
            let _ = latencies.add(&h);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu.since(args.hub_pid);
    progress.finish();

    let mut report = shell(&args, &fleet, run);
    report.connected = connected;
    report.connect_failed = Counters::get(&counters.connect_failed);
    report.connect_secs = connect_secs;
    report.connect_rate = connected as f64 / connect_secs.max(1e-9);
    report.sent = Counters::get(&counters.sent);
    report.acked = Counters::get(&counters.acked);
    report.failed = Counters::get(&counters.failed);
    report.disconnects = Counters::get(&counters.disconnects);
    report.elapsed_secs = window;
    report.drain_secs = (elapsed - window).max(0.0);
    report.msgs_per_sec = if args.qos == 0 {
        report.sent
    } else {
        report.acked
    } as f64
        / window;
    report.puback_ms = Latency::from_histogram(&latencies);
    report.puback_hdr = encode_histogram(&latencies);
    report.cpu = cpu;
    report.interrupted = interrupted;
    report.flap = Some(FlapReport {
        probability: plan.probability,
        drops: flaps.drops.load(Ordering::Relaxed),
        reconnects: flaps.reconnects.load(Ordering::Relaxed),
        reconnect_failed: flaps.failed.load(Ordering::Relaxed),
        not_back: flaps.not_back.load(Ordering::Relaxed),
    });
    Ok(report)
}

/// One flapping device; returns its publish→PUBACK latencies.
async fn device(
    plan: Arc<Plan>,
    identity: Identity,
    mut conn: Conn,
    counters: Arc<Counters>,
    flaps: Arc<Flaps>,
    errors: Arc<std::sync::Mutex<Errors>>,
    mut stop: watch::Receiver<bool>,
) -> Histogram<u64> {
    let mut latencies = histogram();
    let mut inflight = Inflight::new(plan.inflight);
    let mut seq: u64 = 0;
    let mut ticker = crate::lean::send_ticker(plan.rate);
    // The coin is tossed once a second, each device at its own offset.
    let mut coin = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs_f64(rand::random::<f64>()),
        Duration::from_secs(1),
    );
    coin.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deadline: Option<tokio::time::Instant> = None;
    let topic = identity.topic.clone();
    let publish = |conn: &mut Conn, inflight: &mut Inflight, seq: &mut u64| {
        let body = plan
            .template
            .render(&plan.run, &identity.client_id, *seq, unix_ns());
        let mut message = Publish::from_bytes(topic.clone(), plan.qos, Bytes::from(body));
        if plan.qos == QoS::AtLeastOnce {
            message.pkid = inflight.start(Instant::now(), *seq);
        }
        *seq += 1;
        Counters::bump(&counters.sent);
        conn.queue(Packet::Publish(message))
    };
    let outcome: Result<(), DeviceError> = async {
        loop {
            let stopping = deadline.is_some();
            if !stopping && ticker.is_none() {
                let mut batch = 0;
                while (plan.qos == QoS::AtLeastOnce && inflight.has_room())
                    || (plan.qos == QoS::AtMostOnce && batch < plan.inflight)
                {
                    publish(&mut conn, &mut inflight, &mut seq)?;
                    batch += 1;
                }
                conn.flush().await?;
            }
            if stopping && inflight.outstanding() == 0 {
                return Ok(());
            }
            tokio::select! {
                biased;
                changed = stop.changed(), if !stopping => {
                    if changed.is_err() || *stop.borrow() {
                        deadline = Some(tokio::time::Instant::now() + plan.drain);
                    }
                }
                () = crate::lean::sleep_until_opt(deadline), if stopping => {
                    counters.failed.fetch_add(inflight.abandon(), Ordering::Relaxed);
                    return Ok(());
                }
                packet = conn.read() => match packet? {
                    Some(Packet::PubAck(ack)) => {
                        if let Some((at, _)) = inflight.ack(ack.pkid) {
                            let _ = latencies.record((at.elapsed().as_micros() as u64).max(1));
                            Counters::bump(&counters.acked);
                        }
                    }
                    Some(_) => {}
                    None => return Err(DeviceError::Protocol(identity.client_id.clone(), "closed by the broker".into())),
                },
                _ = crate::lean::tick_opt(&mut ticker), if ticker.is_some() && !stopping => {
                    if plan.qos == QoS::AtMostOnce || inflight.has_room() {
                        publish(&mut conn, &mut inflight, &mut seq)?;
                        conn.flush().await?;
                    }
                }
                _ = coin.tick(), if !stopping => {
                    if rand::random::<f64>() < plan.probability {
                        counters.failed.fetch_add(inflight.abandon(), Ordering::Relaxed);
                        flaps.drops.fetch_add(1, Ordering::Relaxed);
                        counters.connected.fetch_sub(1, Ordering::Relaxed);
                        // The old socket closes without DISCONNECT (a lost connection as
                        // the hub sees it) before the new one opens.
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut conn.stream).await;
                        let back = crate::scenarios::storm::reconnect(
                            plan.addr, &identity, &flaps.attempts, &flaps.failed, &errors, &mut stop,
                        ).await;
                        match back {
                            Some(new) => {
                                conn = new;
                                flaps.reconnects.fetch_add(1, Ordering::Relaxed);
                                Counters::bump(&counters.connected);
                            }
                            None => {
                                flaps.not_back.fetch_add(1, Ordering::Relaxed);
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
    }
    .await;
    if let Err(err) = outcome {
        counters
            .failed
            .fetch_add(inflight.abandon(), Ordering::Relaxed);
        Counters::bump(&counters.disconnects);
        if let Ok(mut errors) = errors.lock() {
            errors.add(&err);
        }
        return latencies;
    }
    conn.close().await;
    latencies
}
