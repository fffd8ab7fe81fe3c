//! Which devices are connected right now and when each was last active: live state
//! the gateway writes and the registry and twin views read. Not persisted. An
//! observer (routing's connection-state events) learns of connects and disconnects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use time::OffsetDateTime;

use super::DeviceId;

/// A device's live state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePresence {
    /// Whether a connection of the device is open.
    pub connected: bool,
    /// Last time the device sent anything.
    pub last_activity: OffsetDateTime,
}

/// Told synchronously when a device connects or disconnects (it must not block:
/// the gateway calls this while it holds its connection table).
pub trait PresenceObserver: Send + Sync + 'static {
    /// `id` connected (`true`) or disconnected (`false`) at `at`.
    fn connection_changed(&self, id: &DeviceId, connected: bool, at: OffsetDateTime);
}

/// Shared, cheap to clone table of device presence.
#[derive(Clone, Default)]
pub struct Presence {
    devices: Arc<Mutex<HashMap<DeviceId, DevicePresence>>>,
    observer: Arc<std::sync::OnceLock<Arc<dyn PresenceObserver>>>,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").finish_non_exhaustive()
    }
}

impl Presence {
    /// Sets the observer of connects and disconnects (once; later calls are ignored).
    pub fn observe(&self, observer: Arc<dyn PresenceObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Records that `id` connected (or sent something) at `now`.
    pub fn connected(&self, id: &DeviceId, now: OffsetDateTime) {
        self.lock().insert(
            id.clone(),
            DevicePresence {
                connected: true,
                last_activity: now,
            },
        );
        if let Some(observer) = self.observer.get() {
            observer.connection_changed(id, true, now);
        }
    }

    /// Records that `id` was active at `now` without changing its connection state.
    pub fn touch(&self, id: &DeviceId, now: OffsetDateTime) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.last_activity = now;
        }
    }

    /// Records that `id` disconnected.
    pub fn disconnected(&self, id: &DeviceId) {
        let was_connected = match self.lock().get_mut(id) {
            Some(entry) => std::mem::replace(&mut entry.connected, false),
            None => false,
        };
        if was_connected && let Some(observer) = self.observer.get() {
            observer.connection_changed(id, false, OffsetDateTime::now_utc());
        }
    }

    /// Forgets `id` (the device was deleted).
    pub fn forget(&self, id: &DeviceId) {
        self.lock().remove(id);
    }

    /// The live state of `id`, if it has connected since the hub started.
    pub fn get(&self, id: &DeviceId) -> Option<DevicePresence> {
        self.lock().get(id).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, DevicePresence>> {
        // The map holds plain values; a panic elsewhere cannot leave it inconsistent.
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_connect_activity_and_disconnect() {
        let presence = Presence::default();
        let id = DeviceId::parse("d1").unwrap();
        assert_eq!(presence.get(&id), None);
        let t0 = OffsetDateTime::UNIX_EPOCH;
        presence.connected(&id, t0);
        let t1 = t0 + time::Duration::seconds(5);
        presence.touch(&id, t1);
        presence.disconnected(&id);
        assert_eq!(
            presence.get(&id),
            Some(DevicePresence {
                connected: false,
                last_activity: t1
            })
        );
        presence.forget(&id);
        assert_eq!(presence.get(&id), None);
    }
}
