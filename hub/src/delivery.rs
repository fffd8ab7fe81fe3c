//! Reaching a connected device: what the capabilities send to a device
//! ([`Delivery`]: a C2D message, a desired-properties patch, a direct method request),
//! the port that carries it ([`DeviceLinks`], implemented by the device edge's table
//! of live connections; another hub node is reached through the commands
//! capability's cluster routing), the kinds of delivery a device subscribes to
//! ([`Subscription`]) and the session that keeps them across connections
//! ([`SessionStore`], implemented by the storage backends).
//!
//! Capabilities speak in these terms only: how a delivery is written on the wire
//! (an MQTT topic and QoS) is the edge's business.

use std::collections::BTreeSet;

use async_trait::async_trait;
use bytes::Bytes;

use crate::properties::PropertyBag;
use crate::registry::DeviceId;
use crate::storage::StoreError;

/// Identifies a delivery to its sender, reported back when the device acknowledges.
pub type DeliveryId = u64;

/// The kinds of delivery a device may subscribe to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub enum Subscription {
    /// Cloud-to-device messages (`devices/{id}/messages/devicebound/#`).
    CloudToDevice,
    /// Answers to the device's twin requests (`$iothub/twin/res/#`).
    TwinResponses,
    /// Desired-property patches (`$iothub/twin/PATCH/properties/desired/#`).
    DesiredPatches,
    /// Direct method requests (`$iothub/methods/POST/#`).
    Methods,
}

/// Something a capability sends to a connected device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A cloud-to-device message, delivered at least once; the device's
    /// acknowledgement comes back as `id` (the commands capability's
    /// `DeliveryAcks`).
    CloudToDevice {
        /// Reported back when the device acknowledges.
        id: DeliveryId,
        /// System and application properties, as the device receives them.
        properties: PropertyBag,
        /// The body.
        body: Bytes,
    },
    /// A desired-properties patch (containing its `$version`), delivered at least
    /// once; a device that misses it reads the twin when it comes back.
    DesiredPatch {
        /// The desired version the patch brings the device to.
        version: u64,
        /// The JSON patch.
        patch: Bytes,
    },
    /// A direct method request, delivered at most once; the device answers with the
    /// request id (the commands capability's `MethodResponses`).
    MethodRequest {
        /// The method's name, as the caller gave it.
        method: String,
        /// The request id the answer must carry.
        rid: String,
        /// The JSON (or empty) payload.
        payload: Bytes,
    },
}

impl Delivery {
    /// The subscription a device must hold to receive this delivery.
    pub fn requires(&self) -> Subscription {
        match self {
            Delivery::CloudToDevice { .. } => Subscription::CloudToDevice,
            Delivery::DesiredPatch { .. } => Subscription::DesiredPatches,
            Delivery::MethodRequest { .. } => Subscription::Methods,
        }
    }
}

/// Why a delivery did not reach a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The device has no live connection here.
    #[error("device not connected")]
    NotConnected,
    /// The connection's queue is full: it is being closed as a slow consumer.
    #[error("connection too slow; closed")]
    SlowConsumer,
}

/// The live connections of this hub node, as the capabilities reach them.
pub trait DeviceLinks: Send + Sync + 'static {
    /// Queues `delivery` for `device`'s live connection on this node.
    fn send(&self, device: &DeviceId, delivery: Delivery) -> Result<(), DeliveryError>;

    /// Whether a delivery of this shape can be carried to `device` at all (a C2D
    /// message's properties travel in a topic of bounded length); the reason
    /// otherwise. Asked before a message is queued, so a message no connection could
    /// carry is refused instead of stored.
    fn admits(&self, device: &DeviceId, delivery: &Delivery) -> Result<(), String>;

    /// `device` connected to another hub node after connection `connection` here:
    /// closes that connection (a newer one here is left alone); returns whether it did.
    fn replaced_elsewhere(&self, device: &DeviceId, connection: u64) -> bool;

    /// How many devices have a live connection on this node.
    fn connected_devices(&self) -> usize;
}

/// A persisted device session: the subscriptions, and the `generationId` of the
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

/// Persisted sessions of devices that keep theirs across connections
/// (MQTT CleanSession=0).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The stored session, if one exists.
    async fn load(&self, device: &DeviceId) -> Result<Option<StoredSession>, StoreError>;
    /// Stores the session (creating it).
    async fn save(&self, device: &DeviceId, session: &StoredSession) -> Result<(), StoreError>;
    /// Forgets the session (CleanSession=1).
    async fn remove(&self, device: &DeviceId) -> Result<(), StoreError>;
}
