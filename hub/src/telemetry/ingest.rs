//! What a device edge hands the telemetry capability: a [`TelemetryMessage`] as
//! received, submitted through [`TelemetryIngest`], and the [`Durable`] future that
//! completes once it is on disk (only then may the edge acknowledge it).

use async_trait::async_trait;
use bytes::Bytes;
use time::OffsetDateTime;

use crate::auth::device::AuthMethod;
use crate::properties::PropertyBag;
use crate::registry::DeviceId;
use crate::storage::StoreError;

/// A telemetry message as a device edge received it.
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
    /// When the edge received it.
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
