//! The full-behaviour path: each device is a device-sdk client, as real firmware
//! would be — telemetry with up to K sends awaiting durability, reported twin
//! properties every so often, direct methods answered after a delay (some failing
//! on purpose), C2D messages completed. Slower per message than [`crate::lean`], and
//! meant for behaviour, not peak throughput.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::device::{DeviceError, Identity};
use crate::lean::{Outcome, Phase, Plan, sleep_until_opt, tick_opt, unix_ns};
use crate::report::{Counters, histogram};
use crate::values::Auth;

/// How long a device-sdk client may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a device does besides telemetry.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// The host name signed into SAS tokens.
    pub hostname: String,
    /// How devices authenticate.
    pub auth: Auth,
    /// Reported-properties period.
    pub twin_every: Option<Duration>,
    /// Delay before answering a method.
    pub method_delay: Duration,
    /// Fraction of methods answered with 500.
    pub method_fail_rate: f64,
    /// Token lifetime (`--sas-ttl`), default [`crate::credentials::SDK_TOKEN_TTL`].
    pub token_ttl: Option<Duration>,
    /// With `--tls` or x509: the hub's TLS address, CA, and device certificates.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// One device-sdk device: connects, reports the outcome, behaves while the phase is
/// `Running`, waits for its outstanding sends once it is `Stopping`, closes.
#[allow(clippy::too_many_arguments)]
pub async fn run_device(
    plan: Arc<Plan>,
    identity: Identity,
    key: String,
    behaviour: Behaviour,
    counters: Arc<Counters>,
    mut phase: watch::Receiver<Phase>,
    connected: mpsc::UnboundedSender<Result<(), DeviceError>>,
    permit: Option<OwnedSemaphorePermit>,
) -> Outcome {
    let mut outcome = Outcome {
        latencies: histogram(),
        delivered: Vec::new(),
        fenced_at: None,
    };
    let id = identity.client_id.clone();
    let credentials = match (&behaviour.tls, behaviour.auth) {
        // Issued here, in the device's own task, so a large fleet's key generation
        // spreads over the connect ramp instead of delaying the start.
        (Some(tls), Auth::X509) => match tls.device_credentials(&id) {
            Ok(credentials) => credentials,
            Err(err) => {
                Counters::bump(&counters.connect_failed);
                let _ = connected.send(Err(DeviceError::Sdk(id, err)));
                return outcome;
            }
        },
        _ => crate::credentials::sdk_credentials(
            behaviour.auth,
            &behaviour.hostname,
            key,
            behaviour.token_ttl,
        ),
    };
    let options = device_sdk::ClientOptions::new(&behaviour.hostname, &id, credentials);
    let options = match &behaviour.tls {
        Some(tls) => options
            .with_endpoint(&tls.mqtts.ip().to_string(), tls.mqtts.port())
            .with_ca(&tls.ca_pem),
        None => options
            .with_endpoint(&plan.addr.ip().to_string(), plan.addr.port())
            .without_tls(),
    };
    let (client, mut events) = match device_sdk::DeviceClient::start(options) {
        Ok(started) => started,
        Err(err) => {
            Counters::bump(&counters.connect_failed);
            let _ = connected.send(Err(DeviceError::Sdk(id, err.to_string())));
            return outcome;
        }
    };
    let up = tokio::select! {
        up = client.connected(CONNECT_TIMEOUT) => up,
        () = stopped(&mut phase) => {
            client.close().await;
            return outcome;
        }
    };
    drop(permit);
    if let Err(err) = up {
        Counters::bump(&counters.connect_failed);
        let _ = connected.send(Err(DeviceError::Sdk(id, err.to_string())));
        client.close().await;
        return outcome;
    }
    Counters::bump(&counters.connected);
    let _ = connected.send(Ok(()));
    drop(connected);
    let running = phase
        .wait_for(|p| *p != Phase::Connecting)
        .await
        .map(|p| *p == Phase::Running)
        .unwrap_or(false);
    if running {
        behave(
            &plan,
            &id,
            &client,
            &mut events,
            &behaviour,
            &counters,
            &mut phase,
            &mut outcome,
        )
        .await;
    }
    client.close().await;
    counters
        .connected
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn behave(
    plan: &Plan,
    id: &str,
    client: &device_sdk::DeviceClient,
    events: &mut device_sdk::DeviceEvents,
    behaviour: &Behaviour,
    counters: &Arc<Counters>,
    phase: &mut watch::Receiver<Phase>,
    outcome: &mut Outcome,
) {
    let limit = usize::from(plan.inflight);
    let mut sends = FuturesUnordered::new();
    let mut seq: u64 = 0;
    let mut fields = plan.template.fields(id);
    let mut send = |seq: u64| {
        let body = plan
            .template
            .render_with(&mut fields, &plan.run, id, seq, unix_ns());
        let client = client.clone();
        async move {
            let at = Instant::now();
            let result = client.send_telemetry(device_sdk::Message::new(body)).await;
            (seq, at, result)
        }
    };
    let mut ticker = crate::lean::send_ticker(plan.rate);
    let mut twin = behaviour.twin_every.map(|every| {
        let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    let mut reports: u64 = 0;
    let mut drain_deadline = None;
    loop {
        let stopping = drain_deadline.is_some();
        if ticker.is_none() && !stopping {
            while sends.len() < limit {
                counters
                    .sent
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                outcome.delivered.push(false);
                sends.push(send(seq));
                seq += 1;
            }
        }
        if stopping && sends.is_empty() {
            return;
        }
        tokio::select! {
            // Every branch is cancel-safe: receivers, ticks and FuturesUnordered::next
            // lose nothing when another branch wins.
            changed = phase.changed(), if !stopping => {
                if changed.is_err() || *phase.borrow() == Phase::Stopping {
                    drain_deadline = Some(tokio::time::Instant::now() + plan.drain);
                }
            }
            Some((seq, at, result)) = sends.next(), if !sends.is_empty() => match result {
                Ok(()) => {
                    let _ = outcome.latencies.record((at.elapsed().as_micros() as u64).max(1));
                    if let Some(slot) = outcome.delivered.get_mut(seq as usize) {
                        *slot = true;
                    }
                    Counters::bump(&counters.acked);
                }
                Err(_) => Counters::bump(&counters.failed),
            },
            () = sleep_until_opt(drain_deadline), if stopping => {
                counters.failed.fetch_add(sends.len() as u64, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            _ = tick_opt(&mut ticker), if ticker.is_some() && !stopping => {
                if sends.len() < limit {
                    counters.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    outcome.delivered.push(false);
                    sends.push(send(seq));
                    seq += 1;
                }
            }
            _ = tick_opt(&mut twin), if twin.is_some() && !stopping => {
                reports += 1;
                // Reported in the background: a slow twin answer must not hold telemetry.
                let (client, counters) = (client.clone(), Arc::clone(counters));
                tokio::spawn(async move {
                    let patch = json!({"simulator": {"reports": reports, "at_ns": unix_ns().to_string()}});
                    if client.patch_reported(&patch).await.is_ok() {
                        Counters::bump(&counters.twin_reports);
                    }
                });
            }
            Some(call) = events.methods.recv() => {
                let (delay, fail) = (behaviour.method_delay, rand::random::<f64>() < behaviour.method_fail_rate);
                let counters = Arc::clone(counters);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let (status, body) = if fail {
                        (500, json!({"error": "simulated failure"}))
                    } else {
                        (200, json!({"method": call.name, "payload": call.payload}))
                    };
                    if call.respond(status, &body).await.is_ok() {
                        Counters::bump(&counters.methods);
                    }
                });
            }
            Some(message) = events.messages.recv() => {
                Counters::bump(&counters.c2d_received);
                if message.complete().await.is_ok() {
                    Counters::bump(&counters.c2d);
                }
            }
            Some(update) = events.desired.recv() => {
                let desired = match update {
                    device_sdk::DesiredUpdate::Patch(patch) => {
                        Counters::bump(&counters.desired);
                        patch
                    }
                    // After a (re)connect: what may have changed while offline.
                    device_sdk::DesiredUpdate::Full(desired) => desired,
                };
                if let Some(ack) = writable_ack(&desired) {
                    // In the background, like the periodic reports.
                    let (client, counters) = (client.clone(), Arc::clone(counters));
                    tokio::spawn(async move {
                        if client.patch_reported(&ack).await.is_ok() {
                            Counters::bump(&counters.desired_acks);
                        }
                    });
                }
            }
        }
    }
}

/// The reported patch that accepts every property of a desired patch (or the whole
/// desired section), as Azure IoT Plug and Play devices acknowledge writable
/// properties: `{"prop": {"value": v, "ac": 200, "ad": …, "av": <desired $version>}}`.
/// `None` when there is nothing to acknowledge (only `$` metadata).
pub fn writable_ack(desired: &serde_json::Value) -> Option<serde_json::Value> {
    let properties = desired.as_object()?;
    let version = desired
        .get("$version")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let ack: serde_json::Map<String, serde_json::Value> = properties
        .iter()
        .filter(|(key, _)| !key.starts_with('$'))
        .map(|(key, value)| {
            (
                key.clone(),
                json!({"value": value, "ac": 200, "ad": "applied by firmware-sim", "av": version}),
            )
        })
        .collect();
    (!ack.is_empty()).then_some(serde_json::Value::Object(ack))
}

/// Resolves once the run is stopping (or its controller is gone).
async fn stopped(phase: &mut watch::Receiver<Phase>) {
    // The guard `wait_for` returns is dropped here, before any later await.
    let _ = phase.wait_for(|p| *p == Phase::Stopping).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_patches_are_acknowledged_with_value_status_and_version() {
        let ack =
            writable_ack(&json!({"interval": 30, "mode": {"eco": true}, "$version": 7})).unwrap();
        assert_eq!(ack["interval"]["value"], 30);
        assert_eq!(ack["interval"]["ac"], 200);
        assert_eq!(ack["interval"]["av"], 7);
        assert_eq!(ack["mode"]["value"]["eco"], true);
        assert!(ack.get("$version").is_none());
        assert!(writable_ack(&json!({"$version": 3})).is_none());
        assert!(writable_ack(&json!(null)).is_none());
    }
}
