//! The registry's storage trait: what any backend (embedded redb, NATS KV) must do
//! for device identities, with compare-and-swap on the record version.

use async_trait::async_trait;

use super::{Device, DeviceId};
use crate::store::StoreError;

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

/// Device identities, keyed by id, ordered by id.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Stores a new device; [`RegistryStoreError::AlreadyExists`] if the id is taken.
    async fn insert(&self, device: Device) -> Result<(), RegistryStoreError>;

    /// The device with `id`, if any.
    async fn get(&self, id: &DeviceId) -> Result<Option<Device>, RegistryStoreError>;

    /// Replaces the stored device if its version is `expected_version`.
    async fn replace(
        &self,
        device: Device,
        expected_version: u64,
    ) -> Result<(), RegistryStoreError>;

    /// Removes the device if its version is `expected_version` (any, when `None`);
    /// returns what was removed.
    async fn remove(
        &self,
        id: &DeviceId,
        expected_version: Option<u64>,
    ) -> Result<Device, RegistryStoreError>;

    /// Up to `limit` devices with ids greater than `after`, in id order.
    async fn list(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Device>, RegistryStoreError>;
}
