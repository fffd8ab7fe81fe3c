//! The lean publish path: one task per device speaking MQTT 3.1.1 directly on
//! rumqttc's packet codec over TCP or TLS (rustls) — CONNECT, then QoS 0/1 PUBLISH at
//! a rate or as fast as PUBACKs allow with K in flight — so the load source costs a
//! fraction of the CPU of a full client and is not the bottleneck. [`Inflight`] pairs
//! PUBACKs with send times without I/O; [`run_device`] is the thin async loop around
//! it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Login, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};
use tokio::time::{Instant as TokioInstant, MissedTickBehavior};
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::device::{CONNECT_TIMEOUT, DeviceError, Identity};
use crate::report::{Counters, histogram};
use crate::template::Template;
use crate::values::Rate;

/// The body of a QoS 0 device's closing QoS 1 message (see [`Outcome::fenced_at`]).
pub const FENCE_BODY: &[u8] = b"{\"firmware-sim\":\"fence\"}";
/// Largest packet accepted from the broker.
const MAX_INCOMING: usize = 1 << 20;
/// MQTT keep-alive; an idle device pings at half of it.
const KEEP_ALIVE_SECS: u16 = 60;

/// Where the run is; device tasks watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Devices connect and wait.
    Connecting,
    /// Devices send.
    Running,
    /// Devices stop sending, wait for outstanding PUBACKs, and disconnect.
    Stopping,
}

/// A device's connection: plain TCP, or TLS over it (boxed: rustls' state is large
/// and plain devices should not carry its size).
type DeviceStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// How a group's devices speak TLS.
#[derive(Debug, Clone)]
pub struct PlanTls {
    /// The CA to trust (the hub's, or `--ca-file`'s) and, for x509, the issuer of
    /// the device certificates.
    pub tls: Arc<crate::tls::Tls>,
    /// Whether each device presents its own certificate (`--auth x509`).
    pub x509: bool,
    /// The name the server certificate must carry (`--hostname`).
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// What every device does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Broker address (its MQTT-over-TLS listener when `tls` is set).
    pub addr: SocketAddr,
    /// TLS, or plain TCP.
    pub tls: Option<PlanTls>,
    /// Telemetry QoS (0 or 1).
    pub qos: u8,
    /// Send rate.
    pub rate: Rate,
    /// QoS 1 messages awaiting PUBACK at most.
    pub inflight: u16,
    /// Payload template.
    pub template: Arc<Template>,
    /// Run id stamped into payloads.
    pub run: Arc<str>,
    /// How long to wait for outstanding PUBACKs after sending stops.
    pub drain: Duration,
}

/// QoS 1 packet ids awaiting their PUBACK, with their send times (no I/O).
#[derive(Debug)]
pub struct Inflight {
    sent_at: HashMap<u16, (Instant, u64)>,
    next: u16,
    limit: usize,
}

impl Inflight {
    /// Room for `limit` outstanding messages (at most 65,000, below the 65,535 ids).
    pub fn new(limit: u16) -> Self {
        Self {
            sent_at: HashMap::with_capacity(usize::from(limit)),
            next: 1,
            limit: usize::from(limit.clamp(1, 65_000)),
        }
    }

    /// Whether another message may be sent.
    pub fn has_room(&self) -> bool {
        self.sent_at.len() < self.limit
    }

    /// Takes a free packet id for message `seq` sent at `now`.
    pub fn start(&mut self, now: Instant, seq: u64) -> u16 {
        // Ids still awaiting a PUBACK are skipped; with the limit below 65,535 a free
        // one is always found.
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if let std::collections::hash_map::Entry::Vacant(slot) = self.sent_at.entry(id) {
                slot.insert((now, seq));
                return id;
            }
        }
    }

    /// The send time and sequence number of the message `pkid` acknowledges; `None`
    /// for an unknown id.
    pub fn ack(&mut self, pkid: u16) -> Option<(Instant, u64)> {
        self.sent_at.remove(&pkid)
    }

    /// Messages awaiting their PUBACK.
    pub fn outstanding(&self) -> usize {
        self.sent_at.len()
    }

    /// Forgets every outstanding message; returns how many there were.
    pub fn abandon(&mut self) -> u64 {
        let n = self.sent_at.len() as u64;
        self.sent_at.clear();
        n
    }
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Connects one device; `Ok(None)` when the run stopped first.
async fn connect(
    plan: &Plan,
    identity: &Identity,
    phase: &mut watch::Receiver<Phase>,
    buf: &mut BytesMut,
) -> Result<Option<DeviceStream>, DeviceError> {
    let id = &identity.client_id;
    let attempt = async {
        let tcp = crate::net::connect(plan.addr, identity.bind)
            .await
            .map_err(|err| DeviceError::Io(id.clone(), err))?;
        tcp.set_nodelay(true)
            .map_err(|err| DeviceError::Io(id.clone(), err))?;
        let mut stream = match &plan.tls {
            None => Either::Left(tcp),
            Some(tls) => {
                let config = tls
                    .tls
                    .client_config(tls.x509.then_some(id.as_str()))
                    .map_err(|err| DeviceError::Tls(id.clone(), err))?;
                let connected = tokio_rustls::TlsConnector::from(config)
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|err| DeviceError::Io(id.clone(), err))?;
                Either::Right(Box::new(connected))
            }
        };
        let mut connect = Connect::new(id.clone());
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.clean_session = true;
        if let Some((user, pass)) = &identity.login {
            connect.login = Some(Login::new(user.clone(), pass.clone()));
        }
        let mut out = BytesMut::new();
        Packet::Connect(connect)
            .write(&mut out, usize::MAX)
            .map_err(|err| DeviceError::Protocol(id.clone(), err.to_string()))?;
        write_packets(&mut stream, &out)
            .await
            .map_err(|err| DeviceError::Io(id.clone(), err))?;
        loop {
            match Packet::read(buf, MAX_INCOMING) {
                Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                    return Ok(stream);
                }
                Ok(Packet::ConnAck(ack)) => return Err(DeviceError::Refused(id.clone(), ack.code)),
                Ok(other) => {
                    return Err(DeviceError::Protocol(
                        id.clone(),
                        format!("expected CONNACK, got {other:?}"),
                    ));
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(err) => return Err(DeviceError::Protocol(id.clone(), err.to_string())),
            }
            match stream.read_buf(buf).await {
                Ok(0) => {
                    return Err(DeviceError::Protocol(
                        id.clone(),
                        "closed before CONNACK".into(),
                    ));
                }
                Ok(_) => {}
                Err(err) => return Err(DeviceError::Io(id.clone(), err)),
            }
        }
    };
    tokio::select! {
        // Cancelling a half-made connection is safe: it is dropped and never counted.
        result = tokio::time::timeout(CONNECT_TIMEOUT, attempt) => match result {
            Ok(result) => result.map(Some),
            Err(_) => Err(DeviceError::Timeout(id.clone())),
        },
        _ = phase.wait_for(|p| *p == Phase::Stopping) => Ok(None),
    }
}

/// What one device did.
#[derive(Debug)]
pub struct Outcome {
    /// Publish → PUBACK latencies, µs.
    pub latencies: Histogram<u64>,
    /// Per sequence number: acknowledged (QoS 1) or written (QoS 0). What `--verify`
    /// expects to read back.
    pub delivered: Vec<bool>,
    /// QoS 0 runs: when the broker acknowledged the device's closing QoS 1 message
    /// (the fence), i.e. had taken in everything the device sent before it.
    pub fenced_at: Option<Instant>,
}

/// One device: connects, reports the outcome on `connected`, sends while the phase is
/// `Running`, drains its PUBACKs once it is `Stopping`, and returns what it measured.
pub async fn run_device(
    plan: Arc<Plan>,
    identity: Identity,
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
    let mut buf = BytesMut::with_capacity(4096);
    let connecting = connect(&plan, &identity, &mut phase, &mut buf).await;
    // The handshake is over: let the next device connect.
    drop(permit);
    let stream = match connecting {
        Ok(Some(stream)) => {
            Counters::bump(&counters.connected);
            let _ = connected.send(Ok(()));
            stream
        }
        Ok(None) => return outcome,
        Err(err) => {
            Counters::bump(&counters.connect_failed);
            let _ = connected.send(Err(err));
            return outcome;
        }
    };
    drop(connected);
    if let Err(err) = publish(
        &plan,
        &identity,
        &counters,
        &mut phase,
        stream,
        buf,
        &mut outcome,
    )
    .await
    {
        log_lost(&err);
        Counters::bump(&counters.disconnects);
    }
    counters
        .connected
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    outcome
}

/// Connection losses go to stderr once each; the report counts them.
fn log_lost(err: &DeviceError) {
    eprintln!("firmware-sim: {err}");
}

async fn publish(
    plan: &Plan,
    identity: &Identity,
    counters: &Counters,
    phase: &mut watch::Receiver<Phase>,
    mut stream: DeviceStream,
    mut buf: BytesMut,
    outcome: &mut Outcome,
) -> Result<(), DeviceError> {
    let Outcome {
        latencies,
        delivered,
        fenced_at,
    } = outcome;
    let id = &identity.client_id;
    let io = |err| DeviceError::Io(id.clone(), err);
    if phase
        .wait_for(|p| *p != Phase::Connecting)
        .await
        .map(|p| *p == Phase::Stopping)
        .unwrap_or(true)
    {
        let _ = disconnect(&mut stream).await;
        return Ok(());
    }
    let qos = if plan.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut inflight = Inflight::new(plan.inflight);
    let mut seq: u64 = 0;
    let mut out = BytesMut::with_capacity(16 * 1024);
    // Devices start at a random point of their period so a fleet does not send in
    // lockstep.
    let mut ticker = send_ticker(plan.rate);
    let mut keep_alive = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2));
    keep_alive.tick().await;
    let mut last_write = Instant::now();
    let mut drain_deadline: Option<TokioInstant> = None;
    let max_rate = ticker.is_none();
    // The device's generated-field state, made once: rendering then allocates only
    // the body.
    let mut fields = plan.template.fields(id);
    // QoS 0 messages have no acknowledgement, and written is not received: bytes wait
    // in socket buffers. A QoS 0 device therefore ends with one QoS 1 message, the
    // fence; brokers handle a connection's packets in order, so its PUBACK says
    // everything before it was taken in, and the run's rate counts up to there.
    let mut fence: Option<u16> = None;
    let mut encode =
        |out: &mut BytesMut, inflight: &mut Inflight, seq: &mut u64, delivered: &mut Vec<bool>| {
            let payload =
                Bytes::from(
                    plan.template
                        .render_with(&mut fields, &plan.run, id, *seq, unix_ns()),
                );
            let mut publish = Publish::from_bytes(identity.topic.clone(), qos, payload);
            if qos == QoS::AtLeastOnce {
                publish.pkid = inflight.start(Instant::now(), *seq);
            }
            // QoS 0 has no acknowledgement: a written message is expected in the stream.
            delivered.push(qos == QoS::AtMostOnce);
            *seq += 1;
            Packet::Publish(publish)
                .write(out, usize::MAX)
                .map_err(|err| DeviceError::Protocol(id.clone(), err.to_string()))
        };
    let result = 'session: loop {
        let stopping = drain_deadline.is_some();
        let mut batch = 0u64;
        if max_rate && !stopping {
            // QoS 0 has no PUBACK to wait for: a batch of `inflight` per turn keeps
            // the socket busy and lets the loop notice the phase change.
            let limit = usize::from(plan.inflight);
            while (qos == QoS::AtMostOnce && (batch as usize) < limit)
                || (qos == QoS::AtLeastOnce && inflight.has_room())
            {
                if let Err(err) = encode(&mut out, &mut inflight, &mut seq, delivered) {
                    break 'session Err(err);
                }
                batch += 1;
            }
        }
        if batch > 0 {
            if let Err(err) = flush(&mut stream, &mut out, counters, batch, qos).await {
                break Err(io(err));
            }
            last_write = Instant::now();
        }
        if stopping && inflight.outstanding() == 0 {
            break Ok(());
        }
        tokio::select! {
            biased;
            // `changed` and `read_buf` are cancel-safe: nothing is lost when another
            // branch wins.
            changed = phase.changed(), if !stopping => {
                if changed.is_err() || *phase.borrow() == Phase::Stopping {
                    drain_deadline = Some(TokioInstant::now() + plan.drain);
                    if qos == QoS::AtMostOnce {
                        // Not a message of the run: no sequence number, not counted as
                        // sent, a body `--verify` does not take for one of the run's.
                        let mut publish = Publish::from_bytes(identity.topic.clone(), QoS::AtLeastOnce, Bytes::from_static(FENCE_BODY));
                        let pkid = inflight.start(Instant::now(), u64::MAX);
                        publish.pkid = pkid;
                        fence = Some(pkid);
                        if let Err(err) = Packet::Publish(publish).write(&mut out, usize::MAX) {
                            break 'session Err(DeviceError::Protocol(id.clone(), err.to_string()));
                        }
                        if let Err(err) = flush(&mut stream, &mut out, counters, 0, QoS::AtLeastOnce).await {
                            break Err(io(err));
                        }
                    }
                }
            }
            read = stream.read_buf(&mut buf) => {
                match read {
                    Ok(0) => break Err(DeviceError::Protocol(id.clone(), "closed by the broker".into())),
                    Ok(_) => {}
                    Err(err) => break Err(io(err)),
                }
                loop {
                    match Packet::read(&mut buf, MAX_INCOMING) {
                        Ok(Packet::PubAck(ack)) => {
                            if let Some((at, seq)) = inflight.ack(ack.pkid) {
                                if let Some(slot) = delivered.get_mut(seq as usize) {
                                    *slot = true;
                                }
                                if fence == Some(ack.pkid) {
                                    *fenced_at = Some(Instant::now());
                                } else {
                                    if !counters.warming.load(std::sync::atomic::Ordering::Relaxed) {
                                        let _ = latencies.record((at.elapsed().as_micros() as u64).max(1));
                                    }
                                    Counters::bump(&counters.acked);
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(err) => return fail(counters, &mut inflight, DeviceError::Protocol(id.clone(), err.to_string())),
                    }
                }
            }
            _ = sleep_until_opt(drain_deadline), if stopping => {
                counters.failed.fetch_add(inflight.abandon(), std::sync::atomic::Ordering::Relaxed);
                break Ok(());
            }
            _ = tick_opt(&mut ticker), if !stopping && !max_rate => {
                if qos == QoS::AtMostOnce || inflight.has_room() {
                    if let Err(err) = encode(&mut out, &mut inflight, &mut seq, delivered) {
                        break 'session Err(err);
                    }
                    if let Err(err) = flush(&mut stream, &mut out, counters, 1, qos).await {
                        break Err(io(err));
                    }
                    last_write = Instant::now();
                }
            }
            _ = keep_alive.tick() => {
                if last_write.elapsed() >= Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2) {
                    out.clear();
                    let _ = Packet::PingReq.write(&mut out, usize::MAX);
                    if let Err(err) = write_packets(&mut stream, &out).await {
                        break Err(io(err));
                    }
                    out.clear();
                    last_write = Instant::now();
                }
            }
            // QoS 0 at `max` rate: always ready, so the loop sends the next batch once
            // nothing else is pending (the branches above come first).
            _ = std::future::ready(()), if max_rate && qos == QoS::AtMostOnce && !stopping => {}
        }
    };
    match result {
        Ok(()) => {
            let _ = disconnect(&mut stream).await;
            Ok(())
        }
        Err(err) => fail(counters, &mut inflight, err),
    }
}

/// Writes a batch; counts it as sent (and, for QoS 0, a failed write as failed).
async fn flush(
    stream: &mut DeviceStream,
    out: &mut BytesMut,
    counters: &Counters,
    batch: u64,
    qos: QoS,
) -> std::io::Result<()> {
    counters
        .sent
        .fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
    let result = write_packets(stream, out).await;
    out.clear();
    if result.is_err() && qos == QoS::AtMostOnce {
        counters
            .failed
            .fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
    }
    result
}

/// A lost connection: its outstanding QoS 1 messages will never be acknowledged.
fn fail(counters: &Counters, inflight: &mut Inflight, err: DeviceError) -> Result<(), DeviceError> {
    counters
        .failed
        .fetch_add(inflight.abandon(), std::sync::atomic::Ordering::Relaxed);
    Err(err)
}

async fn disconnect(stream: &mut DeviceStream) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    let _ = Packet::Disconnect.write(&mut out, usize::MAX);
    write_packets(stream, &out).await?;
    stream.shutdown().await
}

/// Writes encoded packets and pushes them out: over TLS, `write_all` may leave the
/// last record in the session until a flush (a no-op on TCP).
async fn write_packets(stream: &mut DeviceStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The send clock of a device at `rate`: `None` at `max`. Devices start at a random
/// point of their period so a fleet does not send in lockstep; a late tick is skipped.
pub(crate) fn send_ticker(rate: Rate) -> Option<tokio::time::Interval> {
    match rate {
        Rate::PerSec(rate) => {
            let period = Duration::from_secs_f64(1.0 / rate);
            let offset = period.mul_f64(rand::random::<f64>());
            let mut ticker = tokio::time::interval_at(TokioInstant::now() + offset, period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
            Some(ticker)
        }
        Rate::Max => None,
    }
}

pub(crate) async fn sleep_until_opt(deadline: Option<TokioInstant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn tick_opt(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_pairs_acks_with_sends_and_never_reuses_a_pending_id() {
        let mut inflight = Inflight::new(2);
        let t0 = Instant::now();
        let a = inflight.start(t0, 0);
        let b = inflight.start(t0, 1);
        assert_ne!(a, b);
        assert!(!inflight.has_room());
        assert_eq!(inflight.ack(a), Some((t0, 0)));
        assert_eq!(
            inflight.ack(a),
            None,
            "a second PUBACK for one id counts once"
        );
        assert!(inflight.has_room());
        // Wrap around: ids run 1..=65535 and skip the one still pending.
        for _ in 0..70_000 {
            let id = inflight.start(t0, 2);
            assert_ne!(id, 0);
            assert_ne!(id, b);
            inflight.ack(id);
        }
        assert_eq!(inflight.outstanding(), 1);
        assert_eq!(inflight.abandon(), 1);
        assert_eq!(inflight.outstanding(), 0);
    }
}
