//! The capability traits the gateway hands device traffic to. The gateway never
//! touches storage: telemetry goes to a [`TelemetryIngest`], twin requests to
//! [`TwinRequests`], method answers to [`MethodResponses`], delivery acks to
//! [`DeliveryAcks`], and sessions to a [`SessionStore`].

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use time::OffsetDateTime;

use super::session::{DeliveryId, TwinOp};
use super::topic::{PropertyBag, Subscription};
use crate::auth::device::AuthMethod;
use crate::registry::DeviceId;
use crate::store::StoreError;

/// A telemetry message as the gateway received it.
#[derive(Debug, Clone)]
pub struct TelemetryMessage {
    /// The sending device.
    pub device_id: DeviceId,
    /// How the connection authenticated.
    pub auth_method: AuthMethod,
    /// The topic's property bag (system properties `$.…` and application ones).
    pub properties: PropertyBag,
    /// The body.
    pub body: Bytes,
    /// When the gateway received it.
    pub enqueued_at: OffsetDateTime,
    /// The Plug and Play model id the device named in its CONNECT username
    /// (`model-id=dtmi:…`), stamped on the message as `dt-dataschema`.
    pub model_id: Option<String>,
}

/// Why telemetry was not stored; the message is not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No telemetry store is available.
    #[error("telemetry storage is not available")]
    Unavailable,
    /// The telemetry log failed to commit.
    #[error("telemetry commit failed: {0}")]
    Commit(String),
    /// The hub is shutting down.
    #[error("telemetry storage is shutting down")]
    Closed,
}

/// Completes once a submitted message is durable (then, and only then, its PUBACK
/// goes out).
pub type Durable =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), IngestError>> + Send>>;

/// Stores telemetry durably.
#[async_trait]
pub trait TelemetryIngest: Send + Sync + 'static {
    /// Queues `messages` (one device's, in the order received) behind everything this
    /// connection submitted before (so a device's messages keep their order) and
    /// returns a future that completes when all of them are durable. Waits while the
    /// store is behind: that is the backpressure that stops the connection reading.
    async fn submit(&self, messages: Vec<TelemetryMessage>) -> Result<Durable, IngestError>;
}

/// The answer to a twin request, sent on `$iothub/twin/res/{status}/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinReply {
    /// 200 (GET), 204 (PATCH), 400, 429 or 500.
    pub status: u16,
    /// The response body (the twin for GET; empty or an error for others).
    pub body: Bytes,
    /// The new reported version after a PATCH.
    pub version: Option<u64>,
}

impl TwinReply {
    /// A refusal as Azure IoT Hub answers it: `status` on the topic and the body
    /// `{"errorCode": <Azure code>, "message": …}`. The Node SDK decides success or
    /// failure by the `errorCode` in the body, not by the status in the topic, so
    /// an error without it would reach the device as a success.
    pub fn error(status: u16, error_code: u32, message: &str) -> Self {
        Self {
            status,
            body: Bytes::from(
                serde_json::json!({ "errorCode": error_code, "message": message }).to_string(),
            ),
            version: None,
        }
    }
}

/// Azure's error codes in twin refusals (the same numbers the REST API uses).
pub mod twin_error_code {
    /// 400: the patch is not JSON, too large, too deep, or has a bad key.
    pub const INVALID: u32 = 400_004;
    /// 429: too many requests; try again later.
    pub const THROTTLED: u32 = 429_001;
    /// 500: the hub failed; nothing was changed.
    pub const INTERNAL: u32 = 500_001;
}

/// Serves twin requests from devices.
#[async_trait]
pub trait TwinRequests: Send + Sync + 'static {
    /// Answers `op` for `device`.
    async fn request(&self, device: &DeviceId, op: TwinOp) -> TwinReply;
}

/// Receives devices' answers to direct methods.
pub trait MethodResponses: Send + Sync + 'static {
    /// The device answered request `rid` with `status` and `payload`.
    fn respond(&self, device: &DeviceId, rid: &str, status: i32, payload: Bytes);
}

/// Learns when a device acknowledged a QoS 1 delivery.
pub trait DeliveryAcks: Send + Sync + 'static {
    /// `device` acknowledged delivery `id`.
    fn delivered(&self, device: &DeviceId, id: DeliveryId);
}

/// Learns which devices are connected and subscribed to what (C2D delivery and
/// direct methods need it).
pub trait ConnectionEvents: Send + Sync + 'static {
    /// Connection `connection` of `device` now holds `subscriptions` (told after the
    /// CONNACK and after every change).
    fn subscriptions(
        &self,
        device: &DeviceId,
        connection: u64,
        subscriptions: &BTreeSet<Subscription>,
    );
    /// Connection `connection` of `device` ended.
    fn disconnected(&self, device: &DeviceId, connection: u64);
}

/// A persisted MQTT session: the subscriptions, and the `generationId` of the
/// device that made them. A device deleted and created again under the id has
/// another generation: a session written for the earlier one (a CONNECT racing the
/// delete) is not its session.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredSession {
    /// The generation of the device the session belongs to (empty in records written
    /// before generations were kept).
    #[serde(default)]
    pub generation_id: String,
    /// The subscriptions.
    pub subscriptions: BTreeSet<Subscription>,
}

impl StoredSession {
    /// Decodes a stored session, including the bare subscription lists that earlier
    /// versions stored.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Current(StoredSession),
            Bare(BTreeSet<Subscription>),
        }
        Ok(match serde_json::from_slice(bytes)? {
            Stored::Current(session) => session,
            Stored::Bare(subscriptions) => StoredSession {
                generation_id: String::new(),
                subscriptions,
            },
        })
    }

    /// Whether the session belongs to the device of `generation_id`.
    pub fn belongs_to(&self, generation_id: &str) -> bool {
        self.generation_id.is_empty() || self.generation_id == generation_id
    }
}

/// Persisted MQTT sessions of CleanSession=0 devices.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The stored session, if one exists.
    async fn load(&self, device: &DeviceId) -> Result<Option<StoredSession>, StoreError>;
    /// Stores the session (creating it).
    async fn save(&self, device: &DeviceId, session: &StoredSession) -> Result<(), StoreError>;
    /// Forgets the session (CleanSession=1).
    async fn remove(&self, device: &DeviceId) -> Result<(), StoreError>;
}

/// The services a gateway hands traffic to.
#[derive(Clone)]
pub struct DeviceServices {
    /// Telemetry storage.
    pub telemetry: Arc<dyn TelemetryIngest>,
    /// Twin documents.
    pub twins: Arc<dyn TwinRequests>,
    /// Direct method answers.
    pub methods: Arc<dyn MethodResponses>,
    /// Delivery acknowledgements (C2D completion).
    pub deliveries: Arc<dyn DeliveryAcks>,
    /// Connection and subscription changes.
    pub events: Arc<dyn ConnectionEvents>,
}

impl std::fmt::Debug for DeviceServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceServices")
    }
}

/// The services of a hub whose telemetry, twin and command capabilities are not
/// built yet: telemetry is refused (never acknowledged), twin requests get 500,
/// method answers and acks are logged and dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotYetAvailable;

#[async_trait]
impl TelemetryIngest for NotYetAvailable {
    async fn submit(&self, _messages: Vec<TelemetryMessage>) -> Result<Durable, IngestError> {
        Err(IngestError::Unavailable)
    }
}

#[async_trait]
impl TwinRequests for NotYetAvailable {
    async fn request(&self, _device: &DeviceId, _op: TwinOp) -> TwinReply {
        TwinReply::error(
            500,
            twin_error_code::INTERNAL,
            "twins are not available yet",
        )
    }
}

impl MethodResponses for NotYetAvailable {
    fn respond(&self, device: &DeviceId, rid: &str, _status: i32, _payload: Bytes) {
        tracing::warn!(%device, ?rid, "method response dropped: no method calls are pending");
    }
}

impl DeliveryAcks for NotYetAvailable {
    fn delivered(&self, device: &DeviceId, id: DeliveryId) {
        tracing::debug!(%device, id, "delivery acknowledged");
    }
}

impl ConnectionEvents for NotYetAvailable {
    fn subscriptions(
        &self,
        _device: &DeviceId,
        _connection: u64,
        _subscriptions: &BTreeSet<Subscription>,
    ) {
    }
    fn disconnected(&self, _device: &DeviceId, _connection: u64) {}
}

impl DeviceServices {
    /// Services for a hub without telemetry, twin and command capabilities yet.
    pub fn not_yet_available() -> Self {
        let none = Arc::new(NotYetAvailable);
        Self {
            telemetry: none.clone(),
            twins: none.clone(),
            methods: none.clone(),
            deliveries: none.clone(),
            events: none,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twin_refusals_carry_azures_error_code() {
        let reply = TwinReply::error(400, twin_error_code::INVALID, "key \"a.b\" is not allowed");
        assert_eq!(reply.status, 400);
        assert_eq!(reply.version, None);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON body");
        assert_eq!(
            body,
            serde_json::json!({"errorCode": 400004, "message": "key \"a.b\" is not allowed"})
        );
    }
}
