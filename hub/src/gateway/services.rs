//! The bundle of capability services a device edge hands traffic to. The gateway
//! never touches storage: telemetry goes to a [`TelemetryIngest`], twin requests to
//! [`TwinRequests`], method answers to [`MethodResponses`], delivery acks to
//! [`DeliveryAcks`]; each trait is owned by its capability.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::commands::{ConnectionEvents, DeliveryAcks, MethodResponses};
use crate::delivery::{DeliveryId, Subscription};
use crate::registry::DeviceId;
use crate::telemetry::{Durable, IngestError, TelemetryIngest, TelemetryMessage};
use crate::twins::{TwinOp, TwinReply, TwinRequests, twin_error_code};

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
