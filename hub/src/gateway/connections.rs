//! The table of live device connections: one per device (a newer connection replaces
//! the older), each with a bounded delivery queue and a close signal. Other
//! capabilities deliver messages and cut devices off through it. Each entry remembers
//! the credential its connection proved (a digest, never a key), so a registry change
//! closes exactly the connections whose credential it took away.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::session::{CloseReason, MAX_TOPIC_BYTES, Outbound};
use crate::auth::device::Credential;
use crate::delivery::{Delivery, DeviceLinks};
use crate::registry::DeviceId;

/// Why a delivery did not reach a connection's queue (the delivery port's error).
pub use crate::delivery::DeliveryError as QueueError;

/// State shared between a connection task and the table; the table's entry of the
/// device is this (the connection's id and credential live here rather than beside it
/// in the table, whose slots are paid for about twice over: issue 28).
#[derive(Debug)]
pub struct Mailbox {
    connection: u64,
    credential: Credential,
    state: Mutex<MailboxState>,
    wake: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct MailboxState {
    queue: VecDeque<Outbound>,
    close: Option<CloseReason>,
}

impl Mailbox {
    fn new(connection: u64, credential: Credential, capacity: usize) -> Self {
        Self {
            connection,
            credential,
            state: Mutex::new(MailboxState::default()),
            wake: Notify::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MailboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `message`; a full queue closes the connection instead.
    pub fn push(&self, message: Outbound) -> Result<(), QueueError> {
        let mut state = self.lock();
        if state.close.is_some() {
            return Err(QueueError::NotConnected);
        }
        if state.queue.len() >= self.capacity {
            state.close = Some(CloseReason::SlowConsumer);
            drop(state);
            self.wake.notify_one();
            return Err(QueueError::SlowConsumer);
        }
        state.queue.push_back(message);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Asks the connection to close (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        self.lock().close.get_or_insert(reason);
        self.wake.notify_one();
    }

    /// Waits until something was queued or a close was asked for.
    pub async fn wait(&self) {
        self.wake.notified().await;
    }

    /// Takes what is queued and the close request, if any.
    pub fn drain(&self) -> (Vec<Outbound>, Option<CloseReason>) {
        let mut state = self.lock();
        (state.queue.drain(..).collect(), state.close.clone())
    }
}

/// Live connections by device.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    inner: Arc<Mutex<HashMap<DeviceId, Arc<Mailbox>>>>,
    next_id: Arc<AtomicU64>,
}

/// A connection's place in the table; [`Connections::unregister`] takes it back.
#[derive(Debug)]
pub struct Registration {
    /// Unique id of the connection.
    pub connection: u64,
    /// Its mailbox.
    pub mailbox: Arc<Mailbox>,
}

/// Capacity of a connection's delivery queue.
const MAILBOX_CAPACITY: usize = 128;

impl Connections {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Arc<Mailbox>>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection of `device` that proved `credential`, closing the
    /// one it replaces.
    pub fn register(&self, device: &DeviceId, credential: Credential) -> Registration {
        let connection = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::new(connection, credential, MAILBOX_CAPACITY));
        let previous = self.lock().insert(device.clone(), Arc::clone(&mailbox));
        if let Some(previous) = previous {
            previous.close(CloseReason::Replaced);
        }
        Registration {
            connection,
            mailbox,
        }
    }

    /// Removes the entry of `device` if it is still `connection`'s.
    pub fn unregister(&self, device: &DeviceId, connection: u64) -> bool {
        self.unregister_with(device, connection, || {})
    }

    /// Removes the entry of `device` if it is still `connection`'s and then, still
    /// holding the table, runs `removed`: a newer connection of the device cannot
    /// register in between, so what `removed` records (presence) is not reordered
    /// after what the newer connection records.
    pub fn unregister_with(
        &self,
        device: &DeviceId,
        connection: u64,
        removed: impl FnOnce(),
    ) -> bool {
        let mut table = self.lock();
        if table
            .get(device)
            .is_some_and(|e| e.connection == connection)
        {
            table.remove(device);
            removed();
            true
        } else {
            false
        }
    }

    /// Closes `device`'s live connection with `reason` if `revoked` says its
    /// credential is no longer good; returns whether it did.
    pub fn close_if(
        &self,
        device: &DeviceId,
        reason: CloseReason,
        revoked: impl FnOnce(&Credential) -> bool,
    ) -> bool {
        match self.lock().get(device) {
            Some(entry) if revoked(&entry.credential) => {
                entry.close(reason);
                true
            }
            _ => false,
        }
    }

    /// Queues `message` for `device`'s live connection.
    pub fn deliver(&self, device: &DeviceId, message: Outbound) -> Result<(), QueueError> {
        let mailbox = self
            .lock()
            .get(device)
            .map(Arc::clone)
            .ok_or(QueueError::NotConnected)?;
        mailbox.push(message)
    }

    /// Closes `device`'s live connection, if any.
    pub fn close(&self, device: &DeviceId, reason: CloseReason) -> bool {
        match self.lock().get(device) {
            Some(entry) => {
                entry.close(reason);
                true
            }
            None => false,
        }
    }

    /// Closes `device`'s live connection with `reason` if it is still `connection`
    /// (a newer connection of the device is left alone); returns whether it did.
    pub fn close_connection(
        &self,
        device: &DeviceId,
        connection: u64,
        reason: CloseReason,
    ) -> bool {
        match self.lock().get(device) {
            Some(entry) if entry.connection == connection => {
                entry.close(reason);
                true
            }
            _ => false,
        }
    }

    /// Whether `device` has a live connection.
    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.lock().contains_key(device)
    }

    /// Devices with a live connection.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.lock().keys().cloned().collect()
    }

    /// Number of live (authenticated) connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no device is connected.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// The delivery port on one node: capabilities reach the live connections here.
impl DeviceLinks for Connections {
    fn send(&self, device: &DeviceId, delivery: Delivery) -> Result<(), QueueError> {
        self.deliver(device, Outbound::to_device(device, delivery))
    }

    fn admits(&self, device: &DeviceId, delivery: &Delivery) -> Result<(), String> {
        let Delivery::CloudToDevice { properties, .. } = delivery else {
            return Ok(());
        };
        // The properties travel percent-encoded in the topic, whose length MQTT caps.
        let topic = super::topic::cloud_to_device(device.as_str(), properties);
        if topic.len() > MAX_TOPIC_BYTES {
            return Err(format!(
                "the properties make the devicebound topic {} bytes; MQTT allows {MAX_TOPIC_BYTES}",
                topic.len()
            ));
        }
        Ok(())
    }

    fn replaced_elsewhere(&self, device: &DeviceId, connection: u64) -> bool {
        self.close_connection(device, connection, CloseReason::Replaced)
    }

    fn connected_devices(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::device::Proof;
    use bytes::Bytes;
    use rumqttc::mqttbytes::QoS;

    fn credential(generation: &str) -> Credential {
        Credential {
            generation_id: generation.into(),
            proof: Proof::DeviceCa,
        }
    }

    fn message(id: u64) -> Outbound {
        Outbound {
            topic: "t".into(),
            payload: Bytes::new(),
            qos: QoS::AtLeastOnce,
            requires: None,
            id,
        }
    }

    #[test]
    fn a_second_connection_replaces_the_first() {
        let table = Connections::default();
        let device = DeviceId::parse("d").unwrap();
        let first = table.register(&device, credential("g"));
        let second = table.register(&device, credential("g"));
        assert_eq!(first.mailbox.drain().1, Some(CloseReason::Replaced));
        assert_eq!(second.mailbox.drain().1, None);
        // The replaced connection's late unregister leaves the new one in place.
        assert!(!table.unregister(&device, first.connection));
        assert!(table.is_connected(&device));
        assert!(table.unregister(&device, second.connection));
        assert!(!table.is_connected(&device));
    }

    #[test]
    fn a_full_mailbox_closes_the_slow_connection() {
        let table = Connections::default();
        let device = DeviceId::parse("d").unwrap();
        let registration = table.register(&device, credential("g"));
        for id in 0..MAILBOX_CAPACITY as u64 {
            table.deliver(&device, message(id)).unwrap();
        }
        assert_eq!(
            table.deliver(&device, message(999)),
            Err(QueueError::SlowConsumer)
        );
        let (queued, close) = registration.mailbox.drain();
        assert_eq!(queued.len(), MAILBOX_CAPACITY);
        assert_eq!(close, Some(CloseReason::SlowConsumer));
        assert_eq!(
            table.deliver(&DeviceId::parse("other").unwrap(), message(1)),
            Err(QueueError::NotConnected)
        );
    }

    #[test]
    fn close_if_closes_only_when_the_credential_is_revoked() {
        let table = Connections::default();
        let device = DeviceId::parse("d").unwrap();
        let registration = table.register(&device, credential("g1"));
        assert!(
            !table.close_if(&device, CloseReason::CredentialRevoked, |c| {
                c.generation_id != "g1"
            })
        );
        assert_eq!(registration.mailbox.drain().1, None);
        assert!(
            table.close_if(&device, CloseReason::CredentialRevoked, |c| {
                c.generation_id != "g2"
            })
        );
        assert_eq!(
            registration.mailbox.drain().1,
            Some(CloseReason::CredentialRevoked)
        );
        assert!(!table.close_if(
            &DeviceId::parse("other").unwrap(),
            CloseReason::CredentialRevoked,
            |_| true
        ));
    }
}
