//! One device's registration through the Device Provisioning Service contract over
//! MQTT (DESIGN section 8), as Azure's provisioning SDKs make it: CONNECT as
//! `{idScope}/registrations/{id}/…` with a SAS token signed by the key derived from
//! the enrollment group's key, subscribe to `$dps/registrations/res/#`, PUT
//! `iotdps-register`, then poll `iotdps-get-operationstatus` after each
//! `retry-after` until the registration is `assigned` (a 429 is waited out the same
//! way). The answer is the device's hub, device id and key.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe};
use serde_json::{Value, json};

use crate::device::{CONNECT_TIMEOUT, DeviceError, Identity};

/// The provisioning API version the SDKs name in the CONNECT username.
pub const API_VERSION: &str = "2019-03-31";
/// How long one registration may take, throttling included.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// The wait when an answer names no `retry-after` (the SDKs' default polling interval).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);
/// The longest `retry-after` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Lifetime of the registration token (the connection lasts seconds).
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The answers' topic filter.
const RESPONSE_FILTER: &str = "$dps/registrations/res/#";
/// The answers' topic prefix.
const RESPONSE_PREFIX: &str = "$dps/registrations/res/";

/// Why a registration did not end `assigned`.
#[derive(Debug, thiserror::Error)]
pub enum DpsError {
    /// The connection failed or was refused (a wrong key is a CONNACK refusal).
    #[error(transparent)]
    Connection(#[from] DeviceError),
    /// The token could not be signed (the group key is not base64).
    #[error("cannot sign the registration of {0}: {1}")]
    Credential(String, String),
    /// The service answered a request with an error status.
    #[error("registration of {id} refused: HTTP {status} {message}")]
    Refused {
        /// The registration id.
        id: String,
        /// The answer's status.
        status: u16,
        /// Its errorCode and message.
        message: String,
    },
    /// The operation ended `disabled` or `failed`.
    #[error("registration of {id} ended {status}: {message}")]
    Outcome {
        /// The registration id.
        id: String,
        /// `disabled` or `failed`.
        status: String,
        /// The registration state's error message.
        message: String,
    },
    /// An answer that is not the contract's.
    #[error("registration of {0}: unexpected answer: {1}")]
    Protocol(String, String),
    /// The service closed the connection before the registration was assigned.
    #[error("registration of {0}: connection closed before it was assigned")]
    Closed(String),
    /// Not assigned within [`REGISTRATION_TIMEOUT`].
    #[error("registration of {0}: not assigned within {1:?}")]
    Timeout(String, Duration),
}

/// A symmetric-key enrollment group as a device of it knows it.
#[derive(Debug, Clone)]
pub struct GroupEnrollment {
    /// The ID scope.
    pub id_scope: String,
    /// The group's primary key (base64); each device signs with its derived key.
    pub group_key: String,
}

/// An assigned registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    /// The hub the device was assigned to (`assignedHub`).
    pub hub: String,
    /// Its device id there.
    pub device_id: String,
    /// The key it signs its hub tokens with (derived from the group key).
    pub key: String,
    /// 429 answers waited out on the way.
    pub throttled: u32,
    /// Operation-status polls made.
    pub polls: u32,
}

/// One answer on `$dps/registrations/res/{status}/?$rid=…[&retry-after=…]`.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    status: u16,
    rid: String,
    retry_after: Duration,
    body: Value,
}

/// Registers `registration_id` with `enrollment` at the MQTT listener `addr` (from
/// `bind` when given).
pub async fn register(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    enrollment: &GroupEnrollment,
    registration_id: &str,
) -> Result<Assigned, DpsError> {
    let id = registration_id.to_string();
    let credential = |err: device_sdk::Error| DpsError::Credential(id.clone(), err.to_string());
    let key = device_sdk::credentials::derive_device_key(&enrollment.group_key, registration_id)
        .map_err(credential)?;
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(TOKEN_TTL)
        .as_secs();
    let password = device_sdk::credentials::provisioning_sas_token(
        &enrollment.id_scope,
        registration_id,
        &key,
        expiry,
    )
    .map_err(credential)?;
    let identity = Identity {
        client_id: id.clone(),
        login: Some((
            format!(
                "{}/registrations/{registration_id}/api-version={API_VERSION}&ClientVersion=firmware-sim",
                enrollment.id_scope
            ),
            password,
        )),
        topic: String::new(),
        bind,
    };
    let attempt = async {
        let (conn, _) = crate::wire::open(addr, bind, &identity, 60, CONNECT_TIMEOUT).await?;
        let mut session = Session {
            conn,
            id: id.clone(),
            next_rid: 0,
            next_pkid: 0,
        };
        let result = session.run(key).await;
        session.conn.close().await;
        result
    };
    tokio::time::timeout(REGISTRATION_TIMEOUT, attempt)
        .await
        .map_err(|_| DpsError::Timeout(id.clone(), REGISTRATION_TIMEOUT))?
}

/// One provisioning connection's request ids and packet ids.
struct Session {
    conn: crate::wire::Conn,
    id: String,
    next_rid: u32,
    next_pkid: u16,
}

impl Session {
    async fn run(&mut self, key: String) -> Result<Assigned, DpsError> {
        let mut subscribe = Subscribe::new(RESPONSE_FILTER, QoS::AtLeastOnce);
        subscribe.pkid = self.pkid();
        self.conn.send(Packet::Subscribe(subscribe)).await?;
        loop {
            match self.conn.read().await? {
                Some(Packet::SubAck(_)) => break,
                Some(_) => {}
                None => return Err(DpsError::Closed(self.id.clone())),
            }
        }
        let (mut throttled, mut polls) = (0u32, 0u32);
        let mut operation: Option<String> = None;
        let body = json!({ "registrationId": self.id }).to_string();
        // Register until the service takes the request (429: wait and send again).
        let mut answer = loop {
            let rid = self.rid();
            let topic = format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}");
            self.publish(topic, body.clone()).await?;
            let answer = self.answer(&rid).await?;
            if answer.status == 429 {
                throttled += 1;
                tokio::time::sleep(answer.retry_after).await;
                continue;
            }
            break answer;
        };
        loop {
            if !(200..300).contains(&answer.status) {
                return Err(DpsError::Refused {
                    id: self.id.clone(),
                    status: answer.status,
                    message: format!("{} {}", answer.body["errorCode"], answer.body["message"]),
                });
            }
            match answer.body["status"].as_str() {
                Some("assigned") => {
                    let state = &answer.body["registrationState"];
                    let field = |name: &str| {
                        state[name].as_str().map(str::to_string).ok_or_else(|| {
                            DpsError::Protocol(
                                self.id.clone(),
                                format!(
                                    "assigned without registrationState.{name}: {}",
                                    answer.body
                                ),
                            )
                        })
                    };
                    return Ok(Assigned {
                        hub: field("assignedHub")?,
                        device_id: field("deviceId")?,
                        key,
                        throttled,
                        polls,
                    });
                }
                Some("assigning" | "unassigned") => {}
                Some(status @ ("disabled" | "failed")) => {
                    return Err(DpsError::Outcome {
                        id: self.id.clone(),
                        status: status.to_string(),
                        message: answer.body["registrationState"]["errorMessage"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    });
                }
                _ => {
                    return Err(DpsError::Protocol(self.id.clone(), answer.body.to_string()));
                }
            }
            // A poll's answer may leave the operation out: the last one named stands.
            if let Some(named) = answer.body["operationId"].as_str() {
                operation = Some(named.to_string());
            }
            let operation = operation.clone().ok_or_else(|| {
                DpsError::Protocol(self.id.clone(), format!("no operationId: {}", answer.body))
            })?;
            // Poll after the wait the service asked for; a 429 is waited out and the
            // same poll made again.
            let mut wait = answer.retry_after;
            answer = loop {
                tokio::time::sleep(wait).await;
                let rid = self.rid();
                let topic = format!(
                    "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={operation}"
                );
                self.publish(topic, String::new()).await?;
                polls += 1;
                let next = self.answer(&rid).await?;
                if next.status == 429 {
                    throttled += 1;
                    wait = next.retry_after;
                    continue;
                }
                break next;
            };
        }
    }

    fn rid(&mut self) -> String {
        self.next_rid += 1;
        self.next_rid.to_string()
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    async fn publish(&mut self, topic: String, body: String) -> Result<(), DpsError> {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, Bytes::from(body));
        publish.pkid = self.pkid();
        Ok(self.conn.send(Packet::Publish(publish)).await?)
    }

    /// The answer to request `rid` (others are skipped; QoS 1 answers acknowledged).
    async fn answer(&mut self, rid: &str) -> Result<Answer, DpsError> {
        loop {
            let publish = match self.conn.read().await? {
                Some(Packet::Publish(publish)) => publish,
                Some(_) => continue,
                None => return Err(DpsError::Closed(self.id.clone())),
            };
            if publish.qos == QoS::AtLeastOnce {
                self.conn
                    .send(Packet::PubAck(PubAck::new(publish.pkid)))
                    .await?;
            }
            let topic = publish.topic.clone();
            let answer = parse_answer(&topic, &publish.payload)
                .ok_or_else(|| DpsError::Protocol(self.id.clone(), format!("answer on {topic}")))?;
            if answer.rid == rid {
                return Ok(answer);
            }
        }
    }
}

/// Reads `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]` and its body.
fn parse_answer(topic: &str, payload: &[u8]) -> Option<Answer> {
    let rest = topic.strip_prefix(RESPONSE_PREFIX)?;
    let (status, query) = rest.split_once("/?")?;
    let status = status.parse().ok()?;
    let mut rid = None;
    let mut retry_after = DEFAULT_RETRY_AFTER;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("$rid", value)) => rid = Some(value.to_string()),
            Some(("retry-after", value)) => {
                if let Ok(seconds) = value.parse::<u64>() {
                    retry_after = Duration::from_secs(seconds).min(MAX_RETRY_AFTER);
                }
            }
            _ => {}
        }
    }
    let body = if payload.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(payload).unwrap_or(Value::Null)
    };
    Some(Answer {
        status,
        rid: rid?,
        retry_after,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_the_topic_and_body() {
        let answer = parse_answer(
            "$dps/registrations/res/202/?$rid=7&retry-after=3",
            br#"{"operationId":"op","status":"assigning"}"#,
        )
        .unwrap();
        assert_eq!(answer.status, 202);
        assert_eq!(answer.rid, "7");
        assert_eq!(answer.retry_after, Duration::from_secs(3));
        assert_eq!(answer.body["operationId"], "op");
        let throttled = parse_answer("$dps/registrations/res/429/?$rid=8", b"").unwrap();
        assert_eq!(throttled.retry_after, DEFAULT_RETRY_AFTER);
        assert_eq!(throttled.body, Value::Null);
        let capped = parse_answer(
            "$dps/registrations/res/202/?$rid=9&retry-after=86400",
            b"{}",
        )
        .unwrap();
        assert_eq!(capped.retry_after, MAX_RETRY_AFTER);
        assert!(parse_answer("$dps/registrations/res/abc/?$rid=1", b"").is_none());
        assert!(parse_answer("$dps/registrations/res/200/?retry-after=1", b"").is_none());
        assert!(parse_answer("devices/d/messages/devicebound/", b"").is_none());
    }
}
