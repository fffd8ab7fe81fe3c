//! The per-connection MQTT session as a state machine without I/O: it takes packets,
//! authentication results, deliveries and the current time, and returns
//! [`Action`]s (packets to send, work to hand to the capability services, a close).
//! The async task in [`super::connection`] executes the actions; everything here is
//! deterministic and tested without sockets.
//!
//! States: awaiting CONNECT (10 s deadline) → authenticating → connected → closed.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, LastWill, Packet, PubAck, Publish, SubAck, Subscribe,
    SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use tokio::time::Instant;

use super::topic::{self, DevicePublish};
use crate::delivery::{Delivery, DeliveryId, Subscription};
use crate::properties::PropertyBag;
use crate::registry::DeviceId;
use crate::twins::TwinOp;

/// Limits a session enforces.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Time from accept to CONNECT.
    pub connect_timeout: Duration,
    /// Largest telemetry message (body + properties).
    pub max_telemetry_bytes: usize,
    /// QoS 1 messages sent to the device and not yet acknowledged.
    pub outbound_inflight: usize,
    /// Messages waiting for an inflight slot; beyond this a delivery is refused.
    pub outbound_queue: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            max_telemetry_bytes: 256 * 1024,
            outbound_inflight: 16,
            outbound_queue: 64,
        }
    }
}

/// What the device asked for in CONNECT, for the authenticator.
#[derive(Clone)]
pub struct ConnectRequest {
    /// The MQTT client id (the device id).
    pub client_id: String,
    /// The MQTT username, if any.
    pub username: Option<String>,
    /// The MQTT password, if any (a SAS token or JWT). Never logged.
    pub password: Option<String>,
    /// CleanSession flag.
    pub clean_session: bool,
}

impl std::fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("clean_session", &self.clean_session)
            .finish()
    }
}

/// A successful authentication, with the session state restored for the device.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The authenticated device.
    pub device_id: DeviceId,
    /// When the credential expires (SAS `se`, JWT `exp`), if it does.
    pub expires_at: Option<Instant>,
    /// Whether a stored session was resumed (CleanSession=0 and one existed).
    pub session_present: bool,
    /// Subscriptions restored from the stored session.
    pub subscriptions: BTreeSet<Subscription>,
}

/// Why a connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// No CONNECT within the deadline.
    ConnectTimeout,
    /// No packet within 1.5 × keep-alive.
    KeepAliveTimeout,
    /// The SAS token or JWT expired.
    CredentialExpired,
    /// CONNECT refused (CONNACK already sent).
    Refused(ConnectReturnCode),
    /// A packet the protocol does not allow here.
    ProtocolViolation(&'static str),
    /// A PUBLISH to a topic outside the device's contract.
    TopicNotAllowed,
    /// A PUBLISH with QoS 2.
    QoS2,
    /// Telemetry over the size limit.
    TooLarge,
    /// Undecodable bytes.
    Malformed(String),
    /// The client sent DISCONNECT.
    ClientDisconnected,
    /// The peer closed the socket.
    PeerClosed,
    /// Another connection of the same device took over.
    Replaced,
    /// The device was disabled or deleted.
    DeviceRevoked,
    /// The credential the connection authenticated with was changed or removed.
    CredentialRevoked,
    /// The device does not read fast enough.
    SlowConsumer,
    /// Storing telemetry failed; the message was not acknowledged.
    IngestFailed,
    /// A socket error.
    Io(String),
    /// The hub is shutting down.
    Shutdown,
}

impl CloseReason {
    /// Whether the close was the client's own orderly DISCONNECT (no will).
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            CloseReason::ClientDisconnected | CloseReason::Refused(_)
        )
    }
}

/// What the connection task must do.
#[derive(Debug)]
pub enum Action {
    /// Write this packet.
    Send(Packet),
    /// Authenticate this CONNECT, then call [`Session::on_auth`].
    Authenticate(ConnectRequest),
    /// Store telemetry; send PUBACK `ack` once durable.
    Ingest {
        /// The property bag from the topic.
        properties: PropertyBag,
        /// The body.
        payload: Bytes,
        /// Packet id to acknowledge once durable (QoS 1).
        ack: Option<u16>,
        /// Whether this is the connection's will message.
        will: bool,
    },
    /// A twin request; answer on `$iothub/twin/res/…` to this connection only.
    Twin {
        /// The request id to echo.
        rid: String,
        /// GET or PATCH.
        op: TwinOp,
    },
    /// The device answered a direct method.
    MethodResponse {
        /// The request id of the call.
        rid: String,
        /// The device's status.
        status: i32,
        /// The body.
        payload: Bytes,
    },
    /// The device acknowledged a QoS 1 delivery.
    Delivered(DeliveryId),
    /// The subscriptions changed; persist them (CleanSession=0 only).
    SaveSubscriptions(BTreeSet<Subscription>),
    /// Close the connection.
    Close(CloseReason),
}

/// A message for the device.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Full topic.
    pub topic: String,
    /// Body.
    pub payload: Bytes,
    /// QoS 0 or 1.
    pub qos: QoS,
    /// The subscription the device must hold to receive it; `None` for twin
    /// responses, which go to the asking connection regardless.
    pub requires: Option<Subscription>,
    /// Reported in [`Action::Delivered`] when a QoS 1 delivery is acknowledged.
    pub id: DeliveryId,
}

impl Outbound {
    /// How a capability's delivery to `device` is written on its topics: C2D and
    /// desired patches at QoS 1, method requests at QoS 0 (the caller's timeout, not a
    /// redelivery, covers a lost one).
    pub fn to_device(device: &DeviceId, delivery: Delivery) -> Self {
        let requires = Some(delivery.requires());
        let (topic, payload, qos, id) = match delivery {
            Delivery::CloudToDevice {
                id,
                properties,
                body,
            } => (
                topic::cloud_to_device(device.as_str(), &properties),
                body,
                QoS::AtLeastOnce,
                id,
            ),
            Delivery::DesiredPatch { version, patch } => {
                (topic::desired_patch(version), patch, QoS::AtLeastOnce, 0)
            }
            Delivery::MethodRequest {
                method,
                rid,
                payload,
            } => (
                topic::method_request(&method, &rid),
                payload,
                QoS::AtMostOnce,
                0,
            ),
        };
        Outbound {
            topic,
            payload,
            qos,
            requires,
            id,
        }
    }
}

/// Why a delivery was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// The session is not connected.
    #[error("not connected")]
    NotConnected,
    /// The device has not subscribed to the topic's kind.
    #[error("not subscribed")]
    NotSubscribed,
    /// The outbound queue is full.
    #[error("outbound queue full")]
    QueueFull,
    /// The topic does not fit MQTT's two-byte length: it could only be written as a
    /// malformed frame.
    #[error("topic of {0} bytes exceeds MQTT's 65,535")]
    TopicTooLong(usize),
}

/// The longest topic an MQTT frame can carry (its length is two bytes).
pub const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

#[derive(Debug)]
struct Connected {
    device_id: DeviceId,
    clean_session: bool,
    keep_alive: Option<Duration>,
    last_received: Instant,
    expires_at: Option<Instant>,
    subscriptions: BTreeSet<Subscription>,
    will: Option<LastWill>,
    inflight: VecDeque<(u16, Outbound)>,
    queued: VecDeque<Outbound>,
    next_pkid: u16,
}

#[derive(Debug)]
enum State {
    AwaitingConnect {
        deadline: Instant,
    },
    Authenticating {
        deadline: Instant,
        pending: Box<PendingConnect>,
    },
    Connected(Box<Connected>),
    Closed,
}

#[derive(Debug)]
struct PendingConnect {
    clean_session: bool,
    keep_alive: u16,
    will: Option<LastWill>,
}

/// One connection's MQTT session.
#[derive(Debug)]
pub struct Session {
    limits: SessionLimits,
    state: State,
}

impl Session {
    /// A session for a connection accepted at `now`.
    pub fn new(limits: SessionLimits, now: Instant) -> Self {
        Self {
            limits,
            state: State::AwaitingConnect {
                deadline: now + limits.connect_timeout,
            },
        }
    }

    /// The device, once authenticated.
    pub fn device_id(&self) -> Option<&DeviceId> {
        match &self.state {
            State::Connected(c) => Some(&c.device_id),
            _ => None,
        }
    }

    /// Whether the session still waits for its CONNECT.
    pub fn awaits_connect(&self) -> bool {
        matches!(self.state, State::AwaitingConnect { .. })
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The earliest moment [`Session::on_deadline`] must be called.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingConnect { deadline } | State::Authenticating { deadline, .. } => {
                Some(*deadline)
            }
            State::Connected(c) => {
                let keep_alive = c.keep_alive.map(|k| c.last_received + k.mul_f64(1.5));
                match (keep_alive, c.expires_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            State::Closed => None,
        }
    }

    /// Closes the session if a deadline has passed.
    pub fn on_deadline(&mut self, now: Instant, out: &mut Vec<Action>) {
        let reason = match &self.state {
            State::AwaitingConnect { deadline } | State::Authenticating { deadline, .. }
                if now >= *deadline =>
            {
                Some(CloseReason::ConnectTimeout)
            }
            State::Connected(c) if c.expires_at.is_some_and(|at| now >= at) => {
                Some(CloseReason::CredentialExpired)
            }
            State::Connected(c)
                if c.keep_alive
                    .is_some_and(|k| now >= c.last_received + k.mul_f64(1.5)) =>
            {
                Some(CloseReason::KeepAliveTimeout)
            }
            _ => None,
        };
        if let Some(reason) = reason {
            self.close(reason, out);
        }
    }

    /// Ends the session for `reason`; an unclean end of a connected session emits its
    /// will as telemetry.
    pub fn close(&mut self, reason: CloseReason, out: &mut Vec<Action>) {
        if let State::Connected(c) = std::mem::replace(&mut self.state, State::Closed)
            && !reason.is_clean()
            && let Some(will) = c.will
            && let Ok(DevicePublish::Telemetry(mut properties)) =
                topic::parse_publish(&will.topic, c.device_id.as_str())
        {
            properties
                .0
                .push(("iothub-MessageType".into(), "Will".into()));
            out.push(Action::Ingest {
                properties,
                payload: will.message,
                ack: None,
                will: true,
            });
        }
        self.state = State::Closed;
        out.push(Action::Close(reason));
    }

    /// The codec found a CONNECT of another protocol version.
    pub fn on_unsupported_protocol(&mut self, out: &mut Vec<Action>) {
        self.refuse(ConnectReturnCode::RefusedProtocolVersion, out);
    }

    fn refuse(&mut self, code: ConnectReturnCode, out: &mut Vec<Action>) {
        out.push(Action::Send(Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        })));
        self.state = State::Closed;
        out.push(Action::Close(CloseReason::Refused(code)));
    }

    /// Handles a packet from the device received at `now`.
    pub fn on_packet(&mut self, packet: Packet, now: Instant, out: &mut Vec<Action>) {
        match &mut self.state {
            State::AwaitingConnect { .. } => match packet {
                Packet::Connect(connect) => {
                    if connect.client_id.is_empty() || DeviceId::parse(&connect.client_id).is_err()
                    {
                        return self.refuse(ConnectReturnCode::BadClientId, out);
                    }
                    // A will may only be the device's own telemetry.
                    if let Some(will) = &connect.last_will
                        && !matches!(
                            topic::parse_publish(&will.topic, &connect.client_id),
                            Ok(DevicePublish::Telemetry(_))
                        )
                    {
                        return self.refuse(ConnectReturnCode::NotAuthorized, out);
                    }
                    let (username, password) = match connect.login {
                        Some(login) => (
                            Some(login.username).filter(|u| !u.is_empty()),
                            Some(login.password).filter(|p| !p.is_empty()),
                        ),
                        None => (None, None),
                    };
                    out.push(Action::Authenticate(ConnectRequest {
                        client_id: connect.client_id,
                        username,
                        password,
                        clean_session: connect.clean_session,
                    }));
                    let deadline = match self.state {
                        State::AwaitingConnect { deadline } => deadline,
                        _ => now,
                    };
                    self.state = State::Authenticating {
                        deadline,
                        pending: Box::new(PendingConnect {
                            clean_session: connect.clean_session,
                            keep_alive: connect.keep_alive,
                            will: connect.last_will,
                        }),
                    };
                }
                _ => self.close(
                    CloseReason::ProtocolViolation("first packet must be CONNECT"),
                    out,
                ),
            },
            State::Authenticating { .. } => {
                self.close(
                    CloseReason::ProtocolViolation("packet before CONNACK was decided"),
                    out,
                );
            }
            State::Connected(c) => {
                c.last_received = now;
                match packet {
                    Packet::Publish(publish) => self.on_publish(publish, out),
                    Packet::PubAck(ack) => self.on_puback(ack.pkid, out),
                    Packet::Subscribe(subscribe) => self.on_subscribe(subscribe, out),
                    Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(unsubscribe, out),
                    Packet::PingReq => out.push(Action::Send(Packet::PingResp)),
                    Packet::Disconnect => self.close(CloseReason::ClientDisconnected, out),
                    Packet::Connect(_) => {
                        self.close(CloseReason::ProtocolViolation("second CONNECT"), out)
                    }
                    Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                        self.close(CloseReason::QoS2, out)
                    }
                    _ => self.close(
                        CloseReason::ProtocolViolation("server-to-client packet from client"),
                        out,
                    ),
                }
            }
            State::Closed => {}
        }
    }

    /// The authenticator's verdict on the pending CONNECT.
    pub fn on_auth(
        &mut self,
        result: Result<Accepted, ConnectReturnCode>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let State::Authenticating { pending, .. } =
            std::mem::replace(&mut self.state, State::Closed)
        else {
            return;
        };
        let accepted = match result {
            Ok(accepted) => accepted,
            Err(code) => return self.refuse(code, out),
        };
        if accepted.expires_at.is_some_and(|at| at <= now) {
            return self.refuse(ConnectReturnCode::NotAuthorized, out);
        }
        out.push(Action::Send(Packet::ConnAck(ConnAck {
            session_present: accepted.session_present && !pending.clean_session,
            code: ConnectReturnCode::Success,
        })));
        let subscriptions = if pending.clean_session {
            BTreeSet::new()
        } else {
            accepted.subscriptions
        };
        self.state = State::Connected(Box::new(Connected {
            device_id: accepted.device_id,
            clean_session: pending.clean_session,
            keep_alive: (pending.keep_alive > 0)
                .then(|| Duration::from_secs(u64::from(pending.keep_alive))),
            last_received: now,
            expires_at: accepted.expires_at,
            subscriptions,
            will: pending.will,
            inflight: VecDeque::new(),
            queued: VecDeque::new(),
            next_pkid: 1,
        }));
    }

    fn connected(&mut self) -> Option<&mut Connected> {
        match &mut self.state {
            State::Connected(c) => Some(c),
            _ => None,
        }
    }

    fn on_publish(&mut self, publish: Publish, out: &mut Vec<Action>) {
        let max_telemetry = self.limits.max_telemetry_bytes;
        let Some(c) = self.connected() else { return };
        let ack = match publish.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some(publish.pkid),
            QoS::ExactlyOnce => return self.close(CloseReason::QoS2, out),
        };
        let request = match topic::parse_publish(&publish.topic, c.device_id.as_str()) {
            Ok(DevicePublish::Telemetry(properties)) => {
                if publish.payload.len() + properties.byte_len() > max_telemetry {
                    return self.close(CloseReason::TooLarge, out);
                }
                out.push(Action::Ingest {
                    properties,
                    payload: publish.payload,
                    ack,
                    will: false,
                });
                return;
            }
            Ok(DevicePublish::TwinGet { rid }) => Action::Twin {
                rid,
                op: TwinOp::Get,
            },
            Ok(DevicePublish::TwinPatchReported { rid }) => Action::Twin {
                rid,
                op: TwinOp::PatchReported(publish.payload),
            },
            Ok(DevicePublish::MethodResponse { status, rid }) => Action::MethodResponse {
                rid,
                status,
                payload: publish.payload,
            },
            Err(_) => return self.close(CloseReason::TopicNotAllowed, out),
        };
        // Twin and method messages are acknowledged on receipt: the answer (or, for
        // method responses, nothing) is the application-level acknowledgement.
        if let Some(pkid) = ack {
            out.push(Action::Send(Packet::PubAck(PubAck::new(pkid))));
        }
        out.push(request);
    }

    fn on_subscribe(&mut self, subscribe: Subscribe, out: &mut Vec<Action>) {
        let Some(c) = self.connected() else { return };
        let before = c.subscriptions.clone();
        let return_codes = subscribe
            .filters
            .iter()
            .map(
                |filter| match topic::parse_subscription(&filter.path, c.device_id.as_str()) {
                    Some(kind) => {
                        c.subscriptions.insert(kind);
                        // QoS 2 is granted as 1.
                        SubscribeReasonCode::Success(match filter.qos {
                            QoS::AtMostOnce => QoS::AtMostOnce,
                            _ => QoS::AtLeastOnce,
                        })
                    }
                    None => SubscribeReasonCode::Failure,
                },
            )
            .collect();
        out.push(Action::Send(Packet::SubAck(SubAck::new(
            subscribe.pkid,
            return_codes,
        ))));
        if !c.clean_session && c.subscriptions != before {
            out.push(Action::SaveSubscriptions(c.subscriptions.clone()));
        }
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe, out: &mut Vec<Action>) {
        let Some(c) = self.connected() else { return };
        let before = c.subscriptions.clone();
        for filter in &unsubscribe.topics {
            if let Some(kind) = topic::parse_subscription(filter, c.device_id.as_str()) {
                c.subscriptions.remove(&kind);
            }
        }
        out.push(Action::Send(Packet::UnsubAck(UnsubAck::new(
            unsubscribe.pkid,
        ))));
        if !c.clean_session && c.subscriptions != before {
            out.push(Action::SaveSubscriptions(c.subscriptions.clone()));
        }
    }

    fn on_puback(&mut self, pkid: u16, out: &mut Vec<Action>) {
        let Some(c) = self.connected() else { return };
        let Some(position) = c.inflight.iter().position(|(id, _)| *id == pkid) else {
            // An ack for nothing we sent (or a duplicate): harmless, ignored.
            return;
        };
        if let Some((_, delivered)) = c.inflight.remove(position) {
            out.push(Action::Delivered(delivered.id));
        }
        let window = self.limits.outbound_inflight;
        let Some(c) = self.connected() else { return };
        while c.inflight.len() < window {
            let Some(next) = c.queued.pop_front() else {
                break;
            };
            Self::send_outbound(c, next, out);
        }
    }

    /// The subscriptions of a connected session.
    pub fn subscriptions(&self) -> Option<&BTreeSet<Subscription>> {
        match &self.state {
            State::Connected(c) => Some(&c.subscriptions),
            _ => None,
        }
    }

    /// Whether the device currently holds `subscription`.
    pub fn is_subscribed(&self, subscription: Subscription) -> bool {
        match &self.state {
            State::Connected(c) => c.subscriptions.contains(&subscription),
            _ => false,
        }
    }

    /// Queues a message for the device; sends it at once if the window allows.
    pub fn deliver(
        &mut self,
        message: Outbound,
        out: &mut Vec<Action>,
    ) -> Result<(), DeliverError> {
        let limits = self.limits;
        if message.topic.len() > MAX_TOPIC_BYTES {
            return Err(DeliverError::TopicTooLong(message.topic.len()));
        }
        let Some(c) = self.connected() else {
            return Err(DeliverError::NotConnected);
        };
        if let Some(required) = message.requires
            && !c.subscriptions.contains(&required)
        {
            return Err(DeliverError::NotSubscribed);
        }
        if message.qos == QoS::AtMostOnce {
            let publish = Publish::new(message.topic, QoS::AtMostOnce, message.payload);
            out.push(Action::Send(Packet::Publish(publish)));
            return Ok(());
        }
        if c.inflight.len() < limits.outbound_inflight {
            Self::send_outbound(c, message, out);
            Ok(())
        } else if c.queued.len() < limits.outbound_queue {
            c.queued.push_back(message);
            Ok(())
        } else {
            Err(DeliverError::QueueFull)
        }
    }

    fn send_outbound(c: &mut Connected, message: Outbound, out: &mut Vec<Action>) {
        let pkid = loop {
            let candidate = c.next_pkid;
            c.next_pkid = c.next_pkid.checked_add(1).unwrap_or(1);
            if !c.inflight.iter().any(|(id, _)| *id == candidate) {
                break candidate;
            }
        };
        let mut publish = Publish::new(
            message.topic.clone(),
            QoS::AtLeastOnce,
            message.payload.clone(),
        );
        publish.pkid = pkid;
        out.push(Action::Send(Packet::Publish(publish)));
        c.inflight.push_back((pkid, message));
    }
}

#[cfg(test)]
mod tests;
