//! The registry's storage trait: what any backend (embedded redb, NATS KV) must do
//! for device identities, with compare-and-swap on the record version.

use async_trait::async_trait;

use super::{Device, DeviceId};
use crate::storage::StoreError;

/// Failures of a registry backend.
#[derive(Debug, thiserror::Error)]
pub enum RegistryStoreError {
    /// Insert of an id that exists.
    #[error("device exists")]
    AlreadyExists,
    /// The id is not stored.
    #[error("device not found")]
    NotFound,
    /// The stored version is not the expected one: someone else wrote first.
    #[error("device was modified concurrently")]
    VersionConflict,
    /// The backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`RegistryStore::remove`] took away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The device as it was stored.
    pub device: Device,
    /// The store's version of the deletion itself: in cluster mode the revision of the
    /// KV delete marker (later than the device's), in the embedded store the device's
    /// version. A copy of the registry fed by the store's changes orders it against
    /// writes by this number.
    pub version: u64,
}

/// Device identities, keyed by id, ordered by id.
///
/// A device's `version` is the store's: a backend may assign it on write (NATS KV
/// uses the entry's revision), so the writes return the device as stored.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Stores a new device and returns it as stored;
    /// [`RegistryStoreError::AlreadyExists`] if the id is taken.
    async fn insert(&self, device: Device) -> Result<Device, RegistryStoreError>;

    /// The device with `id`, if any.
    async fn get(&self, id: &DeviceId) -> Result<Option<Device>, RegistryStoreError>;

    /// Replaces the stored device if its version is `expected_version`; returns it as
    /// stored.
    async fn replace(
        &self,
        device: Device,
        expected_version: u64,
    ) -> Result<Device, RegistryStoreError>;

    /// Removes the device if its version is `expected_version` (any, when `None`);
    /// returns what was removed.
    async fn remove(
        &self,
        id: &DeviceId,
        expected_version: Option<u64>,
    ) -> Result<Removed, RegistryStoreError>;

    /// Up to `limit` devices with ids greater than `after`, in id order.
    async fn list(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Device>, RegistryStoreError>;

    /// The version of the store's latest write of any device, for a registry that
    /// mirrors the store through its change feed (cluster mode) and must catch up to
    /// it before answering a listing; `None` for a store without a feed (the default).
    async fn head(&self) -> Result<Option<u64>, RegistryStoreError> {
        Ok(None)
    }
}
