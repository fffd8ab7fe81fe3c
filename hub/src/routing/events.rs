//! Device events as Azure emits them (non-telemetry event schema): lifecycle
//! (created, deleted), connection state (connected, disconnected) and twin changes,
//! each a JSON message with Azure's application properties. The capabilities tell
//! [`EventSink`] synchronously (registry, presence and twin observers); a bounded
//! queue carries the events to a writer that appends them to the durable
//! device-events stream, which routing reads like telemetry.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::config::Source;
use crate::auth::device::AuthMethod;
use crate::properties::PropertyBag;
use crate::registry::{DeviceId, PresenceObserver, RegistryObserver};
use crate::telemetry::{Telemetry, TelemetryIngest, TelemetryMessage};
use crate::twins::document::TwinDocument;
use crate::twins::{TwinChangeKind, TwinObserver, Twins, WeakTwins};

/// The application property naming an event's schema.
pub const SCHEMA_PROPERTY: &str = "iothub-message-schema";
/// The application property naming an event's operation.
pub const OP_TYPE_PROPERTY: &str = "opType";

/// One device event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `createDeviceIdentity`.
    Created,
    /// `deleteDeviceIdentity`.
    Deleted,
    /// `deviceConnected`.
    Connected,
    /// `deviceDisconnected`.
    Disconnected,
    /// `updateTwin`.
    TwinUpdated,
    /// `replaceTwin`.
    TwinReplaced,
}

impl EventKind {
    const ALL: [EventKind; 6] = [
        EventKind::Created,
        EventKind::Deleted,
        EventKind::Connected,
        EventKind::Disconnected,
        EventKind::TwinUpdated,
        EventKind::TwinReplaced,
    ];

    /// Azure's `opType`.
    pub fn op_type(self) -> &'static str {
        match self {
            EventKind::Created => "createDeviceIdentity",
            EventKind::Deleted => "deleteDeviceIdentity",
            EventKind::Connected => "deviceConnected",
            EventKind::Disconnected => "deviceDisconnected",
            EventKind::TwinUpdated => "updateTwin",
            EventKind::TwinReplaced => "replaceTwin",
        }
    }

    /// The kind an `opType` names.
    pub fn from_op_type(op: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.op_type() == op)
    }

    /// The routing source the event belongs to.
    pub fn source(self) -> Source {
        match self {
            EventKind::Created | EventKind::Deleted => Source::DeviceLifecycleEvents,
            EventKind::Connected | EventKind::Disconnected => Source::DeviceConnectionStateEvents,
            EventKind::TwinUpdated | EventKind::TwinReplaced => Source::TwinChangeEvents,
        }
    }

    /// Azure's `iothub-message-schema`.
    pub fn schema(self) -> &'static str {
        match self.source() {
            Source::DeviceLifecycleEvents => "deviceLifecycleNotification",
            Source::DeviceConnectionStateEvents => "deviceConnectionStateNotification",
            _ => "twinChangeNotification",
        }
    }

    /// Azure's `iothub-message-source`.
    pub fn message_source(self) -> &'static str {
        match self.source() {
            Source::DeviceLifecycleEvents => "deviceLifecycleEvents",
            Source::DeviceConnectionStateEvents => "deviceConnectionStateEvents",
            _ => "twinChangeEvents",
        }
    }

    /// Event Grid's event type.
    pub fn event_grid_type(self) -> &'static str {
        match self {
            EventKind::Created => "Microsoft.Devices.DeviceCreated",
            EventKind::Deleted => "Microsoft.Devices.DeviceDeleted",
            EventKind::Connected => "Microsoft.Devices.DeviceConnected",
            EventKind::Disconnected => "Microsoft.Devices.DeviceDisconnected",
            EventKind::TwinUpdated | EventKind::TwinReplaced => {
                "Microsoft.Devices.DeviceTwinChanged"
            }
        }
    }
}

fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Builds the stored message of an event: a JSON body, content type and encoding,
/// and Azure's application properties.
pub fn event_message(
    hub_name: &str,
    device: &DeviceId,
    kind: EventKind,
    body: &Value,
    at: OffsetDateTime,
) -> TelemetryMessage {
    let properties = vec![
        ("$.ct".to_string(), "application/json".to_string()),
        ("$.ce".to_string(), "utf-8".to_string()),
        ("hubName".to_string(), hub_name.to_string()),
        ("deviceId".to_string(), device.to_string()),
        ("operationTimestamp".to_string(), rfc3339(at)),
        (SCHEMA_PROPERTY.to_string(), kind.schema().to_string()),
        (OP_TYPE_PROPERTY.to_string(), kind.op_type().to_string()),
    ];
    TelemetryMessage {
        device_id: device.clone(),
        // Events have no connection; the record format needs a method tag.
        auth_method: AuthMethod::Sas,
        properties: PropertyBag(properties),
        body: Bytes::from(body.to_string()),
        enqueued_at: at,
        model_id: None,
    }
}

/// The twin body of a lifecycle event (Azure sends the device's twin).
fn lifecycle_body(device: &DeviceId, twin: &TwinDocument) -> Value {
    json!({
        "deviceId": device.as_str(),
        "etag": crate::twins::etag(twin),
        "version": twin.version,
        "tags": twin.tags,
        "properties": {
            "desired": twin.desired.to_json(true),
            "reported": twin.reported.to_json(true),
        },
    })
}

/// Strictly increasing, string-comparable connection sequence numbers (Azure: 256
/// bits of hex): the time in nanoseconds, bumped past the last one given.
#[derive(Debug, Default)]
struct Sequence(Mutex<u128>);

impl Sequence {
    fn next(&self, at: OffsetDateTime) -> String {
        let now = u128::try_from(at.unix_timestamp_nanos()).unwrap_or(0);
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = now.max(*last + 1);
        format!("{:032X}{:032X}", *last, 0)
    }
}

/// A bounded queue of events to the writer; full, it drops and counts.
pub struct EventQueue {
    hub_name: String,
    queue: mpsc::Sender<TelemetryMessage>,
    sequence: Sequence,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Events queued.
    pub emitted: AtomicU64,
}

impl EventQueue {
    /// Events of hub `hub_name` into `queue`.
    pub fn new(hub_name: String, queue: mpsc::Sender<TelemetryMessage>) -> Self {
        Self {
            hub_name,
            queue,
            sequence: Sequence::default(),
            dropped: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
        }
    }

    /// Queues an event; when the queue is full it is dropped and counted (an
    /// observer must never block the registry, the gateway or the twins).
    pub fn emit(&self, device: &DeviceId, kind: EventKind, body: &Value, at: OffsetDateTime) {
        let message = event_message(&self.hub_name, device, kind, body, at);
        match self.queue.try_send(message) {
            Ok(()) => {
                self.emitted.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %device, op = kind.op_type(), "device event queue full: event dropped");
            }
        }
    }

    /// Whether every queued event has been taken by the writer.
    pub fn drained(&self) -> bool {
        self.queue.capacity() == self.queue.max_capacity()
    }

    /// Prometheus text.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP hub_routing_events_total Device events queued for the device-events stream.\n\
             # TYPE hub_routing_events_total counter\n\
             hub_routing_events_total {}\n\
             # HELP hub_routing_events_dropped_total Device events dropped because their queue (routing.event_queue) was full.\n\
             # TYPE hub_routing_events_dropped_total counter\n\
             hub_routing_events_dropped_total {}\n",
            self.emitted.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// Where the capabilities' observers put events: the queue, and the twins that
/// lifecycle events carry.
pub struct EventSink {
    /// The queue to the writer.
    pub queue: EventQueue,
    /// Weak: the twins and the registry hold this sink as their observer.
    twins: WeakTwins,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

impl EventSink {
    /// A sink whose writer appends to `log`; `capacity` bounds the queue.
    pub fn start(
        hub_name: String,
        twins: Twins,
        log: Arc<Telemetry>,
        capacity: usize,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        let sink = Arc::new(Self {
            queue: EventQueue::new(hub_name, queue),
            twins: twins.downgrade(),
        });
        let writer = tokio::spawn(write_events(receiver, log));
        (sink, writer)
    }

    fn emit(&self, device: &DeviceId, kind: EventKind, body: &Value, at: OffsetDateTime) {
        self.queue.emit(device, kind, body, at);
    }

    /// The device's twin for a lifecycle event (empty once the twins are gone).
    fn twin_of(&self, id: &DeviceId) -> TwinDocument {
        self.twins
            .upgrade()
            .map(|twins| twins.twin_of(id))
            .unwrap_or_default()
    }
}

/// Most events appended in one go.
const WRITE_BATCH: usize = 512;

/// Appends queued events to the device-events stream in queue order (so a device's
/// events keep theirs), waiting for each batch to be durable.
async fn write_events(mut receiver: mpsc::Receiver<TelemetryMessage>, log: Arc<Telemetry>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while receiver.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let mut pending = Vec::with_capacity(batch.len());
        for message in batch.drain(..) {
            match log.submit(vec![message]).await {
                Ok(durable) => pending.push(durable),
                Err(err) => tracing::error!(%err, "cannot store a device event"),
            }
        }
        for durable in pending {
            if let Err(err) = durable.await {
                tracing::error!(%err, "cannot store a device event");
            }
        }
    }
}

impl RegistryObserver for EventSink {
    fn created(&self, id: &DeviceId) {
        let body = lifecycle_body(id, &self.twin_of(id));
        self.emit(id, EventKind::Created, &body, OffsetDateTime::now_utc());
    }

    fn deleted(&self, id: &DeviceId) {
        let body = lifecycle_body(id, &self.twin_of(id));
        self.emit(id, EventKind::Deleted, &body, OffsetDateTime::now_utc());
    }
}

impl PresenceObserver for EventSink {
    fn connection_changed(&self, id: &DeviceId, connected: bool, at: OffsetDateTime) {
        let body = json!({ "sequenceNumber": self.queue.sequence.next(at) });
        let kind = match connected {
            true => EventKind::Connected,
            false => EventKind::Disconnected,
        };
        self.emit(id, kind, &body, at);
    }
}

impl TwinObserver for EventSink {
    fn changed(&self, id: &DeviceId, kind: TwinChangeKind, twin: &TwinDocument, changed: Value) {
        let mut body = json!({ "version": twin.version });
        if let (Value::Object(out), Value::Object(changed)) = (&mut body, changed) {
            for (key, value) in changed {
                out.insert(key, value);
            }
            if let Some(Value::Object(properties)) = out.get_mut("properties") {
                for (section, version) in [
                    ("desired", twin.desired.version),
                    ("reported", twin.reported.version),
                ] {
                    if let Some(Value::Object(section)) = properties.get_mut(section) {
                        section.insert("$version".into(), Value::from(version));
                    }
                }
            }
        }
        let kind = match kind {
            TwinChangeKind::Update => EventKind::TwinUpdated,
            TwinChangeKind::Replace => EventKind::TwinReplaced,
        };
        self.emit(id, kind, &body, OffsetDateTime::now_utc());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_increase_strictly_and_compare_as_strings() {
        let sequence = Sequence::default();
        let at = OffsetDateTime::now_utc();
        let a = sequence.next(at);
        let b = sequence.next(at);
        let c = sequence.next(at - time::Duration::seconds(5));
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (sender, _receiver) = mpsc::channel(16);
        let queue = EventQueue::new("hub".into(), sender);
        let device = DeviceId::parse("d1").unwrap();
        let at = OffsetDateTime::now_utc();
        for _ in 0..20 {
            queue.emit(&device, EventKind::Connected, &json!({}), at);
        }
        assert_eq!(queue.emitted.load(Ordering::Relaxed), 16);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 4);
        assert!(!queue.drained());
        assert!(
            queue
                .render_metrics()
                .contains("hub_routing_events_dropped_total 4")
        );
    }

    #[test]
    fn events_carry_azures_properties() {
        let device = DeviceId::parse("d1").unwrap();
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let message = event_message("hub", &device, EventKind::Connected, &json!({}), at);
        let bag: std::collections::BTreeMap<_, _> = message.properties.0.into_iter().collect();
        assert_eq!(bag["opType"], "deviceConnected");
        assert_eq!(bag[SCHEMA_PROPERTY], "deviceConnectionStateNotification");
        assert_eq!(bag["hubName"], "hub");
        assert_eq!(bag["$.ct"], "application/json");
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_op_type(kind.op_type()), Some(kind));
        }
    }
}
