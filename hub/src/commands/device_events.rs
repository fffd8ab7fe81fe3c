//! What a device edge tells the commands capability: answers to direct methods
//! ([`MethodResponses`]), acknowledged deliveries ([`DeliveryAcks`]), and which
//! devices are connected and subscribed to what ([`ConnectionEvents`]).

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::delivery::{DeliveryId, Subscription};
use crate::registry::DeviceId;

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
