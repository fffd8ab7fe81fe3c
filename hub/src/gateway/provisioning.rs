//! Provisioning clients on the MQTT listeners (TCP, TLS, WebSocket): a CONNECT whose
//! username is `{idScope}/registrations/{registrationId}/…` is a DPS client, not a
//! device. It may only subscribe to `$dps/registrations/res/#` and publish register
//! and operation-status requests; answers go to `$dps/registrations/res/{status}/
//! ?$rid={rid}[&retry-after=N]`. [`DpsSession`] is the protocol without I/O; [`serve`]
//! is the thin task around it, which calls [`crate::provisioning::Provisioning`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::GatewayContext;
use super::codec::{self, Decoded};
use super::connection::{Transport, read_some};
use crate::provisioning::device::{DeviceReply, parse_register_body};
use crate::provisioning::{Attested, IdScope, Provisioning, ProvisioningError};

/// The only filter a provisioning client may subscribe to.
const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
/// Register requests.
const REGISTER_PREFIX: &str = "$dps/registrations/PUT/iotdps-register/";
/// Operation status requests.
const STATUS_PREFIX: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";
/// Longest request id echoed back.
const MAX_RID_LEN: usize = 128;
/// How long a provisioning connection may stay open at most (a registration takes
/// a few seconds; the SDKs disconnect once assigned).
const MAX_CONNECTION: Duration = Duration::from_secs(300);
/// How long a write may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// `(idScope, registrationId)` when `username` is a provisioning client's.
pub fn provisioning_username(username: &str) -> Option<(&str, &str)> {
    let mut parts = username.splitn(4, '/');
    let scope = parts.next()?;
    IdScope::parse(scope)?;
    if parts.next()? != "registrations" {
        return None;
    }
    let registration_id = parts.next()?;
    (!registration_id.is_empty() && !registration_id.starts_with('?'))
        .then_some((scope, registration_id))
}

/// Whether the first packet in `buf` is a provisioning client's CONNECT (`buf` is
/// left as it is).
pub fn is_provisioning_connect(buf: &BytesMut, max_packet_size: usize) -> bool {
    let mut probe = buf.clone();
    match codec::decode(&mut probe, max_packet_size, true) {
        Ok(Decoded::Packet(Packet::Connect(connect))) => connect
            .login
            .as_ref()
            .is_some_and(|login| provisioning_username(&login.username).is_some()),
        _ => false,
    }
}

/// A request the session hands to the capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DpsRequest {
    /// `PUT iotdps-register`.
    Register {
        /// The request id to echo.
        rid: String,
        /// The body.
        body: Bytes,
    },
    /// `GET iotdps-get-operationstatus`.
    Status {
        /// The request id to echo.
        rid: String,
        /// The operation polled.
        operation_id: String,
    },
}

/// What the task must do.
#[derive(Debug)]
pub enum Step {
    /// Write this packet.
    Send(Packet),
    /// Answer this request (then [`DpsSession::reply`]).
    Request(DpsRequest),
    /// Close the connection (after writing what was sent).
    Close(&'static str),
}

/// A provisioning client's session after its CONNECT was accepted.
#[derive(Debug)]
pub struct DpsSession {
    keep_alive: Option<Duration>,
    last_received: Instant,
    subscribed: bool,
}

impl DpsSession {
    /// A session whose CONNECT (with `keep_alive` seconds) was accepted at `now`.
    pub fn new(keep_alive: u16, now: Instant) -> Self {
        Self {
            keep_alive: (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive))),
            last_received: now,
            subscribed: false,
        }
    }

    /// When the keep-alive runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.keep_alive.map(|k| self.last_received + k.mul_f64(1.5))
    }

    /// Handles a packet received at `now`.
    pub fn on_packet(&mut self, packet: Packet, now: Instant, out: &mut Vec<Step>) {
        self.last_received = now;
        match packet {
            Packet::Subscribe(subscribe) => {
                let codes = subscribe
                    .filters
                    .iter()
                    .map(|filter| {
                        if filter.path == RESPONSE_FILTER {
                            self.subscribed = true;
                            SubscribeReasonCode::Success(match filter.qos {
                                QoS::AtMostOnce => QoS::AtMostOnce,
                                _ => QoS::AtLeastOnce,
                            })
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                out.push(Step::Send(Packet::SubAck(SubAck::new(
                    subscribe.pkid,
                    codes,
                ))));
            }
            Packet::Unsubscribe(unsubscribe) => {
                if unsubscribe.topics.iter().any(|t| t == RESPONSE_FILTER) {
                    self.subscribed = false;
                }
                out.push(Step::Send(Packet::UnsubAck(UnsubAck::new(
                    unsubscribe.pkid,
                ))));
            }
            Packet::Publish(publish) => self.on_publish(publish, out),
            Packet::PingReq => out.push(Step::Send(Packet::PingResp)),
            Packet::Disconnect => out.push(Step::Close("client disconnected")),
            // Answers go out at QoS 0: nothing of ours awaits an acknowledgement.
            Packet::PubAck(_) => {}
            _ => out.push(Step::Close(
                "packet not allowed on a provisioning connection",
            )),
        }
    }

    fn on_publish(&mut self, publish: Publish, out: &mut Vec<Step>) {
        if publish.qos == QoS::ExactlyOnce {
            out.push(Step::Close("QoS 2 is not supported"));
            return;
        }
        let Some(request) = parse_request(&publish.topic, publish.payload) else {
            out.push(Step::Close("topic outside the provisioning contract"));
            return;
        };
        if publish.qos == QoS::AtLeastOnce {
            out.push(Step::Send(Packet::PubAck(PubAck::new(publish.pkid))));
        }
        out.push(Step::Request(request));
    }

    /// The packet answering request `rid` (none when the client is not subscribed).
    pub fn reply(&self, rid: &str, reply: &DeviceReply) -> Option<Packet> {
        if !self.subscribed {
            return None;
        }
        let mut topic = format!("$dps/registrations/res/{}/?$rid={rid}", reply.status);
        if let Some(seconds) = reply.retry_after {
            topic.push_str(&format!("&retry-after={seconds}"));
        }
        Some(Packet::Publish(Publish::new(
            topic,
            QoS::AtMostOnce,
            reply.body_bytes(),
        )))
    }
}

/// Parses a request topic (`…/?$rid=…[&operationId=…]`).
fn parse_request(topic: &str, body: Bytes) -> Option<DpsRequest> {
    let (path, query) = topic.split_once('?')?;
    let mut rid = None;
    let mut operation_id = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "$rid" => rid = Some(value),
            "operationId" => operation_id = Some(value),
            _ => {}
        }
    }
    let rid = rid.filter(|r| valid_token(r))?.to_string();
    match path {
        REGISTER_PREFIX => Some(DpsRequest::Register { rid, body }),
        STATUS_PREFIX => Some(DpsRequest::Status {
            rid,
            operation_id: operation_id.filter(|o| valid_token(o))?.to_string(),
        }),
        _ => None,
    }
}

/// A request id or operation id we echo in a topic: short, no topic or query syntax.
fn valid_token(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_RID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The CONNACK refusal for a failed attestation.
fn refusal(err: &ProvisioningError) -> ConnectReturnCode {
    match err {
        ProvisioningError::InvalidRegistrationId { .. } => ConnectReturnCode::BadClientId,
        ProvisioningError::Unauthorized(_) => ConnectReturnCode::NotAuthorized,
        ProvisioningError::BadRequest(_) => ConnectReturnCode::BadUserNamePassword,
        _ => ConnectReturnCode::ServiceUnavailable,
    }
}

/// Serves a provisioning client whose CONNECT is at the front of `rbuf`, until it
/// disconnects, its keep-alive or token runs out, or the hub shuts down.
pub async fn serve<S: Transport>(
    mut stream: S,
    mut rbuf: BytesMut,
    certificates: Vec<CertificateDer<'static>>,
    ctx: Arc<GatewayContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(provisioning) = ctx.provisioning.clone() else {
        return;
    };
    let connect = match codec::decode(&mut rbuf, ctx.max_packet_size, true) {
        Ok(Decoded::Packet(Packet::Connect(connect))) => connect,
        _ => return,
    };
    let mut wbuf = BytesMut::new();
    let attested = match attest(&provisioning, &connect, &certificates).await {
        Ok(attested) => attested,
        Err(err) => {
            tracing::info!(client = %connect.client_id, error = %err, "refused provisioning CONNECT");
            let _ = codec::encode(
                &Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: refusal(&err),
                }),
                &mut wbuf,
            );
            let _ = write(&mut stream, &mut wbuf).await;
            return;
        }
    };
    tracing::debug!(registration = %attested.registration_id, "provisioning client connected");
    let _ = codec::encode(
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
        }),
        &mut wbuf,
    );
    let started = Instant::now();
    let token_left =
        Duration::from_secs(attested.expires_at.saturating_sub(crate::auth::unix_now()));
    // The token's remaining life is bounded before it is added: no Instant overflow.
    let hard_end = started + MAX_CONNECTION.min(token_left);
    let mut session = DpsSession::new(connect.keep_alive, started);
    let mut steps = Vec::new();
    loop {
        // Handle every complete packet read so far.
        loop {
            match codec::decode(&mut rbuf, ctx.max_packet_size, false) {
                Ok(Decoded::Packet(packet)) => {
                    session.on_packet(packet, Instant::now(), &mut steps)
                }
                Ok(Decoded::Incomplete(needed)) => {
                    rbuf.reserve(needed);
                    break;
                }
                Ok(Decoded::UnsupportedProtocol(_)) | Err(_) => {
                    steps.push(Step::Close("undecodable bytes"));
                    break;
                }
            }
        }
        let mut close = None;
        for step in std::mem::take(&mut steps) {
            match step {
                Step::Send(packet) => {
                    let _ = codec::encode(&packet, &mut wbuf);
                }
                Step::Request(request) => {
                    let (rid, reply) = answer(&provisioning, &attested, request).await;
                    if let Some(packet) = session.reply(&rid, &reply) {
                        let _ = codec::encode(&packet, &mut wbuf);
                    }
                }
                Step::Close(reason) => {
                    close = Some(reason);
                    break;
                }
            }
        }
        if write(&mut stream, &mut wbuf).await.is_err() {
            return;
        }
        if let Some(reason) = close {
            tracing::debug!(registration = %attested.registration_id, reason, "provisioning connection closed");
            return;
        }
        let deadline = session.deadline().map_or(hard_end, |d| d.min(hard_end));
        tokio::select! {
            // Cancel-safe: read_buf loses nothing, the others are plain signals.
            _ = shutdown.changed() => return,
            () = tokio::time::sleep_until(deadline) => return,
            read = read_some(&mut stream, &mut rbuf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

async fn attest(
    provisioning: &Provisioning,
    connect: &Connect,
    certificates: &[CertificateDer<'static>],
) -> Result<Attested, ProvisioningError> {
    let login = connect
        .login
        .as_ref()
        .ok_or_else(|| ProvisioningError::Unauthorized("no credentials".into()))?;
    let (scope, registration_id) = provisioning_username(&login.username)
        .ok_or_else(|| ProvisioningError::BadRequest("not a provisioning username".into()))?;
    if connect.client_id != registration_id {
        return Err(ProvisioningError::InvalidRegistrationId {
            id: connect.client_id.clone(),
            reason: "the client id must be the registration id of the username".into(),
        });
    }
    // No password: an X.509 device, proven by the TLS handshake's certificate.
    if login.password.is_empty() {
        return provisioning
            .attest_certificate(scope, registration_id, certificates)
            .await;
    }
    provisioning
        .attest(
            scope,
            registration_id,
            &login.password,
            crate::auth::unix_now(),
        )
        .await
}

/// Runs one request against the capability; returns the request id and the answer.
async fn answer(
    provisioning: &Provisioning,
    attested: &Attested,
    request: DpsRequest,
) -> (String, DeviceReply) {
    match request {
        DpsRequest::Register { rid, body } => {
            let reply = match parse_register_body(&body, &attested.registration_id) {
                Ok(payload) => match provisioning.register(attested, payload).await {
                    Ok(registration) => DeviceReply::assigning(&registration),
                    Err(err) => DeviceReply::error(&err),
                },
                Err(err) => DeviceReply::error(&err),
            };
            (rid, reply)
        }
        DpsRequest::Status { rid, operation_id } => {
            let reply = match provisioning.operation(attested, &operation_id).await {
                Ok(registration) => DeviceReply::outcome(&registration),
                Err(err) => DeviceReply::error(&err),
            };
            (rid, reply)
        }
    }
}

async fn write<S: Transport>(stream: &mut S, wbuf: &mut BytesMut) -> std::io::Result<()> {
    if wbuf.is_empty() {
        return Ok(());
    }
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(wbuf).await?;
        stream.flush().await
    })
    .await;
    wbuf.clear();
    match written {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "write timed out",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter};

    #[test]
    fn provisioning_usernames_are_told_from_device_ones() {
        assert_eq!(
            provisioning_username(
                "0ne0012ABCD/registrations/dev-1/api-version=2019-03-31&ClientVersion=x"
            ),
            Some(("0ne0012ABCD", "dev-1"))
        );
        assert_eq!(
            provisioning_username("hub.local/dev-1/?api-version=2021-04-12"),
            None
        );
        assert_eq!(provisioning_username("0ne0012ABCD/registrations/"), None);
        assert_eq!(
            provisioning_username("0ne0012ABCD/registrations/?api-version=1"),
            None
        );
        assert_eq!(provisioning_username("0ne0012ABCD/devices/x/y"), None);
    }

    #[test]
    fn requests_are_parsed_and_answered_on_the_response_topic() {
        let now = Instant::now();
        let mut session = DpsSession::new(30, now);
        let mut out = Vec::new();
        session.on_packet(
            Packet::Subscribe(Subscribe {
                pkid: 1,
                filters: vec![
                    SubscribeFilter::new(RESPONSE_FILTER.into(), QoS::AtLeastOnce),
                    SubscribeFilter::new(
                        "devices/x/messages/devicebound/#".into(),
                        QoS::AtLeastOnce,
                    ),
                ],
            }),
            now,
            &mut out,
        );
        match out.remove(0) {
            Step::Send(Packet::SubAck(ack)) => assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReasonCode::Success(QoS::AtLeastOnce),
                    SubscribeReasonCode::Failure
                ]
            ),
            other => panic!("{other:?}"),
        }
        let mut publish = Publish::new(
            "$dps/registrations/PUT/iotdps-register/?$rid=abc-1",
            QoS::AtLeastOnce,
            br#"{"registrationId":"dev-1"}"#.to_vec(),
        );
        publish.pkid = 7;
        session.on_packet(Packet::Publish(publish), now, &mut out);
        assert!(matches!(&out[0], Step::Send(Packet::PubAck(ack)) if ack.pkid == 7));
        assert!(
            matches!(&out[1], Step::Request(DpsRequest::Register { rid, .. }) if rid == "abc-1")
        );
        out.clear();
        let publish = Publish::new(
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=5.ab.cd",
            QoS::AtMostOnce,
            b" ".to_vec(),
        );
        session.on_packet(Packet::Publish(publish), now, &mut out);
        assert!(matches!(
            &out[0],
            Step::Request(DpsRequest::Status { rid, operation_id }) if rid == "2" && operation_id == "5.ab.cd"
        ));
        let reply = DeviceReply {
            status: 202,
            body: serde_json::json!({"operationId": "5.ab.cd", "status": "assigning"}),
            retry_after: Some(1),
        };
        match session.reply("abc-1", &reply) {
            Some(Packet::Publish(p)) => {
                assert_eq!(
                    p.topic,
                    "$dps/registrations/res/202/?$rid=abc-1&retry-after=1"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn anything_outside_the_contract_closes() {
        let now = Instant::now();
        for topic in [
            "devices/dev-1/messages/events/",
            "$dps/registrations/PUT/iotdps-register/",
            "$dps/registrations/PUT/iotdps-register/?$rid=a/b",
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1",
        ] {
            let mut session = DpsSession::new(0, now);
            let mut out = Vec::new();
            session.on_packet(
                Packet::Publish(Publish::new(topic, QoS::AtMostOnce, Vec::new())),
                now,
                &mut out,
            );
            assert!(
                matches!(out.as_slice(), [Step::Close(_)]),
                "{topic}: {out:?}"
            );
        }
        assert_eq!(DpsSession::new(0, now).deadline(), None);
    }
}
