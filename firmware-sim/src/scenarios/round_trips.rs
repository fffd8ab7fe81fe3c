//! Round trips through the hub, `--inflight` outstanding per device, for `--warmup`
//! unrecorded and then `--duration` measured:
//!
//! - methods: lean devices subscribed to `$iothub/methods/POST/#` answer every call at
//!   once (status 200, the payload echoed); callers invoke them through the service
//!   API (`POST /twins/{id}/methods`). A round trip is the whole REST call.
//! - twin: each device PATCHes its reported properties over MQTT
//!   (`$iothub/twin/PATCH/properties/reported/?$rid=N`); a round trip ends with the
//!   hub's `$iothub/twin/res/204/?$rid=N…`, which it sends once the change is durable.
//!
//! Every request ends answered or failed (sent = answered + failed): callers wait for
//! their call's answer or timeout; patches unanswered by the end of `--drain` fail.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish, Subscribe, SubscribeFilter};
use serde_json::json;
use tokio::sync::{Mutex, watch};

use super::connections::{HANDSHAKE_TIMEOUT, open_all};
use crate::device::DeviceError;
use crate::probe::CpuMark;
use crate::report::{
    Counters, Cpu, Errors, Report, RoundTrips, ScenarioReport, histogram, latency,
};
use crate::run::{Fleet, Progress, RunError, run_id, shell};
use crate::settings::Args;
use crate::values::Scenario;
use crate::wire::Conn;

/// How long the hub may take to answer a method call (it waits for the device).
const METHOD_TIMEOUT_SECS: u64 = 10;

/// Where the round trips are: warming up, measured, or winding down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Warmup,
    Measured,
    Stopping,
}

/// What the stages share with the requesters.
struct Shared {
    counters: Arc<Counters>,
    recording: AtomicBool,
    measured: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
    errors: Mutex<Errors>,
}

impl Shared {
    fn new(counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Self {
            counters,
            recording: AtomicBool::new(false),
            measured: AtomicU64::new(0),
            latencies: Mutex::new(histogram()),
            errors: Mutex::new(Errors::default()),
        })
    }

    fn answered(&self, took: Duration, local: &mut Histogram<u64>) {
        Counters::bump(&self.counters.acked);
        if self.recording.load(Ordering::Relaxed) {
            let _ = local.record((took.as_micros() as u64).max(1));
            self.measured.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Subscribes `conn` to `filter` and waits for the SUBACK.
async fn subscribe(conn: &mut Conn, id: &str, filter: &str) -> Result<(), DeviceError> {
    let mut subscribe =
        Subscribe::new_many([SubscribeFilter::new(filter.to_string(), QoS::AtMostOnce)]);
    subscribe.pkid = 1;
    conn.send(Packet::Subscribe(subscribe)).await?;
    let wait = async {
        loop {
            match conn.read().await? {
                Some(Packet::SubAck(_)) => return Ok(()),
                Some(_) => {}
                None => {
                    return Err(DeviceError::Protocol(
                        id.to_string(),
                        "closed before SUBACK".into(),
                    ));
                }
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, wait)
        .await
        .map_err(|_| DeviceError::Timeout(id.to_string()))?
}

/// Connects the fleet and subscribes every device to `filter`; the devices that made it.
async fn connect_and_subscribe(
    args: &Args,
    fleet: &Fleet,
    counters: &Counters,
    filter: &str,
) -> Result<Vec<(String, Conn)>, RunError> {
    let (conns, _, errors, _) = open_all(
        fleet.mqtt,
        &fleet.identities,
        args.connect_inflight as usize,
        counters,
        std::future::pending(),
    )
    .await;
    let mut ready = Vec::with_capacity(conns.len());
    let mut first_failure = errors.top().into_keys().next();
    for mut conn in conns {
        // open_all returns connections in completion order: each knows its device.
        let id = conn.client_id().to_string();
        match subscribe(&mut conn, &id, filter).await {
            Ok(()) => ready.push((id, conn)),
            Err(err) => {
                Counters::bump(&counters.connect_failed);
                first_failure.get_or_insert_with(|| err.to_string());
            }
        }
    }
    if ready.is_empty() {
        return Err(RunError::NoneConnected(first_failure.unwrap_or_default()));
    }
    Ok(ready)
}

/// Drives the stages: warm-up, measured window, stopping; returns the measured
/// window's length and whether Ctrl-C ended it.
async fn stages(
    args: &Args,
    shared: &Shared,
    stage: &watch::Sender<Stage>,
    interrupt: impl std::future::Future<Output = ()>,
) -> (f64, bool, Option<Cpu>) {
    let mut interrupt = std::pin::pin!(interrupt);
    let mut interrupted = false;
    if !args.warmup.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(args.warmup) => {}
            () = &mut interrupt => interrupted = true,
        }
    }
    let cpu = CpuMark::now(args.hub_pid);
    let started = Instant::now();
    if !interrupted {
        shared.recording.store(true, Ordering::Relaxed);
        let _ = stage.send(Stage::Measured);
        tokio::select! {
            () = tokio::time::sleep(args.duration) => {}
            () = &mut interrupt => interrupted = true,
        }
    }
    shared.recording.store(false, Ordering::Relaxed);
    let window = started.elapsed().as_secs_f64();
    let cpu = cpu.since(args.hub_pid);
    let _ = stage.send(Stage::Stopping);
    (window, interrupted, cpu)
}

async fn finish(
    args: &Args,
    fleet: &Fleet,
    name: Scenario,
    shared: &Shared,
    (window, interrupted, cpu): (f64, bool, Option<Cpu>),
    device_answered: Option<u64>,
) -> Report {
    let counters = &shared.counters;
    let measured = shared.measured.load(Ordering::Relaxed);
    let (latency_ms, hdr) = latency(&*shared.latencies.lock().await);
    let mut scenario = ScenarioReport::new(name);
    scenario.round_trips = Some(RoundTrips {
        in_flight_per_device: u64::from(args.inflight),
        sent: Counters::get(&counters.sent),
        answered: Counters::get(&counters.acked),
        failed: Counters::get(&counters.failed),
        device_answered,
        measured,
        secs: window,
        per_sec: measured as f64 / window.max(1e-9),
        latency_ms,
        hdr,
    });
    scenario.cpu = cpu;
    scenario.errors = shared.errors.lock().await.top();
    let mut report = shell(args, fleet, run_id());
    report.connected = Counters::get(&counters.connected);
    report.connect_failed = Counters::get(&counters.connect_failed);
    report.elapsed_secs = window;
    report.warmup_secs = args.warmup.as_secs_f64();
    report.interrupted = interrupted;
    report.scenario = Some(scenario);
    report
}

/// The methods scenario.
pub async fn methods(
    args: Args,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let api = fleet
        .api
        .clone()
        .ok_or_else(|| RunError::Config("the methods scenario needs the service API".into()))?;
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(vec![Arc::clone(&counters)], u64::from(args.devices));
    let devices = connect_and_subscribe(&args, &fleet, &counters, "$iothub/methods/POST/#").await;
    let devices = match devices {
        Ok(devices) => devices,
        Err(err) => {
            progress.finish();
            return Err(err);
        }
    };
    let device_answered = Arc::new(AtomicU64::new(0));
    let mut answerers = Vec::with_capacity(devices.len());
    let mut ids = Vec::with_capacity(devices.len());
    for (id, conn) in devices {
        ids.push(id);
        answerers.push(tokio::spawn(answer_methods(
            conn,
            Arc::clone(&device_answered),
        )));
    }
    let shared = Shared::new(Arc::clone(&counters));
    let (stage_tx, stage_rx) = watch::channel(Stage::Warmup);
    let mut callers = Vec::new();
    for id in &ids {
        for _ in 0..args.inflight {
            let (api, id, shared, mut stage) = (
                api.clone(),
                id.clone(),
                Arc::clone(&shared),
                stage_rx.clone(),
            );
            callers.push(tokio::spawn(async move {
                let mut local = histogram();
                let mut n: u64 = 0;
                while *stage.borrow_and_update() != Stage::Stopping {
                    Counters::bump(&shared.counters.sent);
                    let started = Instant::now();
                    match api
                        .invoke_method(&id, "ping", &json!({"n": n}), METHOD_TIMEOUT_SECS)
                        .await
                    {
                        Ok((200, payload)) if payload["n"] == n => {
                            shared.answered(started.elapsed(), &mut local)
                        }
                        Ok((status, payload)) => {
                            Counters::bump(&shared.counters.failed);
                            shared
                                .errors
                                .lock()
                                .await
                                .add(&format!("{id}: method answered {status} with {payload}"));
                        }
                        Err(err) => {
                            Counters::bump(&shared.counters.failed);
                            shared.errors.lock().await.add(&format!("{id}: {err}"));
                        }
                    }
                    n += 1;
                }
                let _ = shared.latencies.lock().await.add(&local);
            }));
        }
    }
    let outcome = stages(&args, &shared, &stage_tx, interrupt).await;
    for caller in callers {
        let _ = caller.await;
    }
    for answerer in answerers {
        answerer.abort();
    }
    progress.finish();
    let answered_by_devices = device_answered.load(Ordering::Relaxed);
    Ok(finish(
        &args,
        &fleet,
        Scenario::Methods,
        &shared,
        outcome,
        Some(answered_by_devices),
    )
    .await)
}

/// A device answering every method at once: 200 with the request's payload.
async fn answer_methods(mut conn: Conn, answered: Arc<AtomicU64>) {
    while let Ok(Some(packet)) = conn.read().await {
        let Packet::Publish(request) = packet else {
            continue;
        };
        let Some(rid) = rid(&request.topic) else {
            continue;
        };
        let answer = Publish::new(
            format!("$iothub/methods/res/200/?$rid={rid}"),
            QoS::AtMostOnce,
            request.payload.to_vec(),
        );
        // Counted before the answer is written: the caller may have its result (and
        // the run may stop this task) before the write's await returns here.
        answered.fetch_add(1, Ordering::Relaxed);
        if conn.send(Packet::Publish(answer)).await.is_err() {
            answered.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    }
}

/// The `$rid` of an `$iothub/…?$rid=…` topic.
fn rid(topic: &str) -> Option<&str> {
    topic
        .split_once('?')?
        .1
        .split('&')
        .find_map(|field| field.strip_prefix("$rid="))
}

/// The status of a `$iothub/twin/res/{status}/?…` topic.
fn twin_status(topic: &str) -> Option<u16> {
    topic
        .strip_prefix("$iothub/twin/res/")?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// The twin scenario.
pub async fn twin(
    args: Args,
    fleet: Fleet,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Report, RunError> {
    let counters = Arc::new(Counters::default());
    let progress = Progress::start(vec![Arc::clone(&counters)], u64::from(args.devices));
    let devices = connect_and_subscribe(&args, &fleet, &counters, "$iothub/twin/res/#").await;
    let devices = match devices {
        Ok(devices) => devices,
        Err(err) => {
            progress.finish();
            return Err(err);
        }
    };
    let shared = Shared::new(Arc::clone(&counters));
    let (stage_tx, stage_rx) = watch::channel(Stage::Warmup);
    let tasks: Vec<_> = devices
        .into_iter()
        .map(|(id, conn)| {
            tokio::spawn(patch_reported(
                id,
                conn,
                usize::from(args.inflight),
                args.drain,
                Arc::clone(&shared),
                stage_rx.clone(),
            ))
        })
        .collect();
    let outcome = stages(&args, &shared, &stage_tx, interrupt).await;
    for task in tasks {
        let _ = task.await;
    }
    progress.finish();
    Ok(finish(&args, &fleet, Scenario::Twin, &shared, outcome, None).await)
}

/// One device keeping `in_flight` reported patches outstanding until the stage is
/// Stopping, then waiting up to `drain` for the last answers.
async fn patch_reported(
    id: String,
    mut conn: Conn,
    in_flight: usize,
    drain: Duration,
    shared: Arc<Shared>,
    mut stage: watch::Receiver<Stage>,
) {
    let mut local = histogram();
    let mut pending: HashMap<u64, Instant> = HashMap::with_capacity(in_flight);
    let mut next: u64 = 1;
    let mut deadline: Option<tokio::time::Instant> = None;
    let outcome: Result<(), DeviceError> = async {
        loop {
            if deadline.is_none() {
                while pending.len() < in_flight {
                    let body = json!({"simulator": {"patch": next}}).to_string();
                    conn.queue(Packet::Publish(Publish::new(
                        format!("$iothub/twin/PATCH/properties/reported/?$rid={next}"),
                        QoS::AtMostOnce,
                        body.into_bytes(),
                    )))?;
                    pending.insert(next, Instant::now());
                    Counters::bump(&shared.counters.sent);
                    next += 1;
                }
                conn.flush().await?;
            } else if pending.is_empty() {
                return Ok(());
            }
            tokio::select! {
                changed = stage.changed(), if deadline.is_none() => {
                    if changed.is_err() || *stage.borrow() == Stage::Stopping {
                        deadline = Some(tokio::time::Instant::now() + drain);
                    }
                }
                () = crate::lean::sleep_until_opt(deadline), if deadline.is_some() => return Ok(()),
                packet = conn.read() => match packet? {
                    Some(Packet::Publish(answer)) => {
                        let Some(rid) = rid(&answer.topic).and_then(|r| r.parse::<u64>().ok()) else {
                            continue;
                        };
                        let Some(sent) = pending.remove(&rid) else { continue };
                        match twin_status(&answer.topic) {
                            Some(204) => shared.answered(sent.elapsed(), &mut local),
                            // 429: the hub's per-device twin limits (fewer in flight helps).
                            status => {
                                Counters::bump(&shared.counters.failed);
                                let status = status.map_or_else(|| answer.topic.to_string(), |s| s.to_string());
                                shared.errors.lock().await.add(&format!("{id}: twin answered status {status}"));
                            }
                        }
                    }
                    Some(_) => {}
                    None => return Err(DeviceError::Protocol(id.clone(), "closed by the hub".into())),
                },
            }
        }
    }
    .await;
    if let Err(err) = outcome {
        Counters::bump(&shared.counters.disconnects);
        shared.errors.lock().await.add(&err);
    }
    // Unanswered patches (drain over, or the connection lost) fail.
    shared
        .counters
        .failed
        .fetch_add(pending.len() as u64, Ordering::Relaxed);
    let _ = shared.latencies.lock().await.add(&local);
    conn.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_and_statuses_come_from_the_topic() {
        assert_eq!(rid("$iothub/methods/POST/ping/?$rid=42"), Some("42"));
        assert_eq!(rid("$iothub/twin/res/204/?$rid=7&$version=3"), Some("7"));
        assert_eq!(rid("$iothub/twin/res/204/"), None);
        assert_eq!(
            twin_status("$iothub/twin/res/204/?$rid=7&$version=3"),
            Some(204)
        );
        assert_eq!(twin_status("$iothub/twin/res/400/?$rid=7"), Some(400));
        assert_eq!(twin_status("devices/x/messages/devicebound/"), None);
    }
}
