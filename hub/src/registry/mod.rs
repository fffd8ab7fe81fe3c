//! Device identities: ids, credentials, status and etags, and the [`Registry`]
//! service that validates requests and applies them to a [`RegistryStore`] with
//! optimistic concurrency (If-Match). Live connection state is in [`Presence`].

mod device;
mod device_id;
mod presence;
mod store;

use std::sync::Arc;

use time::OffsetDateTime;
use tokio::sync::broadcast;

pub use device::{
    AuthType, Authentication, AuthenticationSpec, Device, DeviceSpec, DeviceStatus, SymmetricKey,
    SymmetricKeySpec, X509Thumbprint,
};
pub use device_id::{DeviceId, DeviceIdError};
pub use presence::{DevicePresence, Presence};
pub use store::{RegistryStore, RegistryStoreError};

use crate::store::StoreError;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No device with that id.
    #[error("device {0} not found")]
    NotFound(DeviceId),
    /// A device with that id exists.
    #[error("device {0} already exists")]
    AlreadyExists(DeviceId),
    /// The If-Match etag is not the device's current one.
    #[error("etag mismatch: the device was modified (current etag {current})")]
    EtagMismatch {
        /// The device's current etag.
        current: String,
    },
    /// The request is invalid; the message says which field and why.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryStoreError> for RegistryError {
    fn from(err: RegistryStoreError) -> Self {
        match err {
            RegistryStoreError::Store(err) => RegistryError::Store(err),
            // The callers below map the other variants with the id in hand; reaching
            // this arm means a backend reported a state the call cannot produce.
            other => RegistryError::Store(StoreError::Backend(other.to_string())),
        }
    }
}

/// An `If-Match` precondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: apply whatever the current version.
    Any,
    /// Apply only if the current etag is this one.
    Etag(String),
}

impl IfMatch {
    /// Parses a header value: `*`, a quoted etag, a bare etag, or a weak `W/"…"` one.
    pub fn parse(raw: &str) -> Self {
        let raw = raw.trim();
        if raw == "*" {
            return IfMatch::Any;
        }
        let raw = raw.strip_prefix("W/").unwrap_or(raw);
        let raw = raw
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .unwrap_or(raw);
        IfMatch::Etag(raw.to_string())
    }

    fn check(&self, device: &Device) -> Result<(), RegistryError> {
        match self {
            IfMatch::Any => Ok(()),
            IfMatch::Etag(etag) if *etag == device.etag() => Ok(()),
            IfMatch::Etag(_) => Err(RegistryError::EtagMismatch {
                current: device.etag(),
            }),
        }
    }
}

/// One page of a device listing.
#[derive(Debug, Clone)]
pub struct DevicePage {
    /// The devices, in id order.
    pub devices: Vec<Device>,
    /// The last id of this page when more may follow.
    pub next_after: Option<DeviceId>,
}

/// A change other capabilities react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// The device was disabled or deleted: its live connection must close.
    Revoked(DeviceId),
    /// The device's credentials changed (keys, public keys, thumbprints or the
    /// authentication type): a live connection whose credential is no longer
    /// registered must close.
    CredentialsChanged(DeviceId),
}

/// Told synchronously, before the registry call returns, when devices come and go:
/// for capabilities that keep something per device (twins).
pub trait RegistryObserver: Send + Sync + 'static {
    /// `id` was created.
    fn created(&self, id: &DeviceId);
    /// `id` was deleted.
    fn deleted(&self, id: &DeviceId);
}

/// How often an unconditional (`If-Match: *`) update retries a lost race.
const UNCONDITIONAL_RETRIES: usize = 8;

/// The registry service.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn RegistryStore>,
    presence: Presence,
    events: broadcast::Sender<RegistryEvent>,
    observers: Arc<std::sync::RwLock<Vec<Arc<dyn RegistryObserver>>>>,
    /// Read-through copy of stored devices: every CONNECT reads its device, and
    /// every write goes through this registry, which keeps the copy current.
    cache: Arc<std::sync::Mutex<DeviceCache>>,
}

/// The registry's copy of stored devices, with a count of writes so a read that
/// raced a write does not put a stale device back.
#[derive(Debug, Default)]
struct DeviceCache {
    devices: std::collections::HashMap<DeviceId, Device>,
    writes: u64,
}

impl DeviceCache {
    fn put(&mut self, device: Device) {
        self.writes += 1;
        self.devices.insert(device.device_id.clone(), device);
    }

    fn forget(&mut self, id: &DeviceId) {
        self.writes += 1;
        self.devices.remove(id);
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry over `store`, reading live state from `presence`.
    pub fn new(store: Arc<dyn RegistryStore>, presence: Presence) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            store,
            presence,
            events,
            observers: Arc::default(),
            cache: Arc::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DeviceCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers an observer of device creation and deletion.
    pub fn observe(&self, observer: Arc<dyn RegistryObserver>) {
        self.observers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(observer);
    }

    fn observers(&self) -> Vec<Arc<dyn RegistryObserver>> {
        self.observers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Changes other capabilities react to (revocations).
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    fn emit(&self, event: RegistryEvent) {
        // No receiver (no gateway running) is fine.
        let _ = self.events.send(event);
    }

    /// Live connection state of devices.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// Creates a device from `spec`; missing keys are generated.
    pub async fn create(&self, id: DeviceId, spec: DeviceSpec) -> Result<Device, RegistryError> {
        check_body_id(&id, &spec)?;
        let now = OffsetDateTime::now_utc();
        let device = Device {
            device_id: id.clone(),
            generation_id: new_generation_id(),
            version: 1,
            status: spec.status.unwrap_or(DeviceStatus::Enabled),
            status_reason: spec.status_reason,
            status_updated_time: now,
            authentication: build_authentication(spec.authentication.unwrap_or_default(), None)?,
        };
        match self.store.insert(device.clone()).await {
            Ok(()) => {
                self.cache().put(device.clone());
                for observer in self.observers() {
                    observer.created(&id);
                }
                Ok(device)
            }
            Err(RegistryStoreError::AlreadyExists) => Err(RegistryError::AlreadyExists(id)),
            Err(err) => Err(err.into()),
        }
    }

    /// Updates a device: fields present in `spec` replace the stored ones.
    pub async fn update(
        &self,
        id: DeviceId,
        spec: DeviceSpec,
        if_match: IfMatch,
    ) -> Result<Device, RegistryError> {
        check_body_id(&id, &spec)?;
        for _ in 0..UNCONDITIONAL_RETRIES {
            let current = self.get(&id).await?;
            if_match.check(&current)?;
            let mut next = current.clone();
            next.version = current.version + 1;
            if let Some(status) = spec.status {
                if status != current.status {
                    next.status_updated_time = OffsetDateTime::now_utc();
                }
                next.status = status;
            }
            if spec.status_reason.is_some() {
                next.status_reason.clone_from(&spec.status_reason);
            }
            if let Some(auth) = spec.authentication.clone() {
                next.authentication = build_authentication(auth, Some(&current.authentication))?;
            }
            let replaced = self.store.replace(next.clone(), current.version).await;
            match &replaced {
                Ok(()) => self.cache().put(next.clone()),
                Err(_) => self.cache().forget(&id),
            }
            match replaced {
                Ok(()) => {
                    if next.status == DeviceStatus::Disabled {
                        self.emit(RegistryEvent::Revoked(id.clone()));
                    } else if next.authentication != current.authentication {
                        self.emit(RegistryEvent::CredentialsChanged(id.clone()));
                    }
                    return Ok(next);
                }
                Err(RegistryStoreError::NotFound) => return Err(RegistryError::NotFound(id)),
                // Someone wrote between our read and write. An etag-conditional update
                // has lost; an unconditional one reads again.
                Err(RegistryStoreError::VersionConflict) => continue,
                Err(err) => return Err(err.into()),
            }
        }
        let current = self.get(&id).await?;
        Err(RegistryError::EtagMismatch {
            current: current.etag(),
        })
    }

    /// The device with `id`.
    pub async fn get(&self, id: &DeviceId) -> Result<Device, RegistryError> {
        let writes = {
            let cache = self.cache();
            if let Some(device) = cache.devices.get(id) {
                return Ok(device.clone());
            }
            cache.writes
        };
        let device = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(id.clone()))?;
        let mut cache = self.cache();
        // A write since the read may have changed or deleted the device.
        if cache.writes == writes {
            cache.devices.insert(id.clone(), device.clone());
        }
        Ok(device)
    }

    /// Deletes the device, if `if_match` (when given) matches its etag.
    pub async fn delete(
        &self,
        id: &DeviceId,
        if_match: Option<IfMatch>,
    ) -> Result<Device, RegistryError> {
        let expected_version = match &if_match {
            None | Some(IfMatch::Any) => None,
            Some(precondition) => {
                let current = self.get(id).await?;
                precondition.check(&current)?;
                Some(current.version)
            }
        };
        let removed = self.store.remove(id, expected_version).await;
        // Whatever happened, the next read goes to the store.
        self.cache().forget(id);
        match removed {
            Ok(device) => {
                for observer in self.observers() {
                    observer.deleted(id);
                }
                self.emit(RegistryEvent::Revoked(id.clone()));
                self.presence.forget(id);
                Ok(device)
            }
            Err(RegistryStoreError::NotFound) => Err(RegistryError::NotFound(id.clone())),
            Err(RegistryStoreError::VersionConflict) => {
                let current = self.get(id).await?;
                Err(RegistryError::EtagMismatch {
                    current: current.etag(),
                })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Up to `limit` devices after `after`, in id order.
    pub async fn list(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<DevicePage, RegistryError> {
        // One extra row tells whether another page follows.
        let mut devices = self.store.list(after, limit + 1).await?;
        let next_after = if devices.len() > limit {
            devices.truncate(limit);
            devices.last().map(|d| d.device_id.clone())
        } else {
            None
        };
        Ok(DevicePage {
            devices,
            next_after,
        })
    }
}

fn check_body_id(id: &DeviceId, spec: &DeviceSpec) -> Result<(), RegistryError> {
    match &spec.device_id {
        Some(body_id) if body_id != id.as_str() => Err(RegistryError::Invalid(format!(
            "deviceId {body_id:?} in the body differs from {id:?} in the path"
        ))),
        _ => Ok(()),
    }
}

/// A generation id: distinguishes devices re-created under the same id.
fn new_generation_id() -> String {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let salt: u16 = rand::random();
    format!("{nanos}{salt:05}")
}

/// Builds the credentials from a request, keeping `current` keys the request leaves out.
fn build_authentication(
    spec: AuthenticationSpec,
    current: Option<&Authentication>,
) -> Result<Authentication, RegistryError> {
    let kind = spec
        .kind
        .or(current.map(|c| c.kind))
        .unwrap_or(AuthType::Sas);
    let invalid = RegistryError::Invalid;

    let symmetric_key = match kind {
        AuthType::Sas | AuthType::Jwt => {
            let given = spec.symmetric_key.unwrap_or_default();
            let kept = current.and_then(|c| c.symmetric_key.clone());
            let pick = |given: Option<String>, kept: Option<String>, field: &str| match given {
                Some(key) => device::validate_key(field, &key).map(|()| key),
                None => Ok(kept.unwrap_or_else(device::generate_key)),
            };
            Some(SymmetricKey {
                primary_key: pick(
                    given.primary_key,
                    kept.as_ref().map(|k| k.primary_key.clone()),
                    "authentication.symmetricKey.primaryKey",
                )
                .map_err(invalid)?,
                secondary_key: pick(
                    given.secondary_key,
                    kept.map(|k| k.secondary_key),
                    "authentication.symmetricKey.secondaryKey",
                )
                .map_err(invalid)?,
            })
        }
        AuthType::SelfSigned | AuthType::CertificateAuthority => None,
    };

    let public_keys = match kind {
        AuthType::Jwt => {
            let keys = spec
                .public_keys
                .or_else(|| current.map(|c| c.public_keys.clone()))
                .unwrap_or_default();
            for (index, pem) in keys.iter().enumerate() {
                device::validate_public_key(index, pem).map_err(invalid)?;
            }
            keys
        }
        _ => Vec::new(),
    };

    let x509_thumbprint = match kind {
        AuthType::SelfSigned => {
            let given = spec
                .x509_thumbprint
                .or_else(|| current.map(|c| c.x509_thumbprint.clone()))
                .unwrap_or_default();
            let primary = given.primary_thumbprint.ok_or_else(|| {
                invalid("authentication.x509Thumbprint.primaryThumbprint is required for selfSigned devices".into())
            })?;
            X509Thumbprint {
                primary_thumbprint: Some(
                    device::normalise_thumbprint(
                        "authentication.x509Thumbprint.primaryThumbprint",
                        &primary,
                    )
                    .map_err(invalid)?,
                ),
                secondary_thumbprint: given
                    .secondary_thumbprint
                    .map(|t| {
                        device::normalise_thumbprint(
                            "authentication.x509Thumbprint.secondaryThumbprint",
                            &t,
                        )
                    })
                    .transpose()
                    .map_err(invalid)?,
            }
        }
        _ => X509Thumbprint::default(),
    };

    Ok(Authentication {
        kind,
        symmetric_key,
        public_keys,
        x509_thumbprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        (dir, Registry::new(Arc::new(store), Presence::default()))
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn create_generates_sas_keys_and_refuses_duplicates() {
        let (_dir, registry) = registry();
        let device = registry
            .create(id("d1"), DeviceSpec::default())
            .await
            .unwrap();
        assert_eq!(device.authentication.kind, AuthType::Sas);
        let keys = device.authentication.symmetric_key.clone().unwrap();
        assert_ne!(keys.primary_key, keys.secondary_key);
        assert_eq!(device.status, DeviceStatus::Enabled);
        assert!(matches!(
            registry.create(id("d1"), DeviceSpec::default()).await,
            Err(RegistryError::AlreadyExists(_))
        ));
    }

    #[tokio::test]
    async fn update_checks_the_etag_and_keeps_keys() {
        let (_dir, registry) = registry();
        let device = registry
            .create(id("d1"), DeviceSpec::default())
            .await
            .unwrap();
        let disable = DeviceSpec {
            status: Some(DeviceStatus::Disabled),
            ..DeviceSpec::default()
        };
        let stale = IfMatch::Etag("stale".into());
        assert!(matches!(
            registry.update(id("d1"), disable.clone(), stale).await,
            Err(RegistryError::EtagMismatch { .. })
        ));
        let updated = registry
            .update(
                id("d1"),
                disable,
                IfMatch::parse(&format!("\"{}\"", device.etag())),
            )
            .await
            .unwrap();
        assert_eq!(updated.status, DeviceStatus::Disabled);
        assert_ne!(updated.etag(), device.etag());
        assert_eq!(updated.authentication, device.authentication);
        assert_eq!(registry.get(&id("d1")).await.unwrap(), updated);
    }

    #[tokio::test]
    async fn concurrent_unconditional_updates_all_apply() {
        let (_dir, registry) = registry();
        registry
            .create(id("d1"), DeviceSpec::default())
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for n in 0..4 {
            let registry = registry.clone();
            tasks.push(tokio::spawn(async move {
                let spec = DeviceSpec {
                    status_reason: Some(format!("writer {n}")),
                    ..DeviceSpec::default()
                };
                registry.update(id("d1"), spec, IfMatch::Any).await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(registry.get(&id("d1")).await.unwrap().version, 5);
    }

    #[tokio::test]
    async fn self_signed_devices_need_a_thumbprint() {
        let (_dir, registry) = registry();
        let spec = DeviceSpec {
            authentication: Some(AuthenticationSpec {
                kind: Some(AuthType::SelfSigned),
                ..AuthenticationSpec::default()
            }),
            ..DeviceSpec::default()
        };
        let err = registry.create(id("x"), spec).await.unwrap_err();
        assert!(err.to_string().contains("primaryThumbprint"), "{err}");
    }

    #[tokio::test]
    async fn delete_with_a_stale_etag_is_refused_and_listing_pages() {
        let (_dir, registry) = registry();
        for n in 0..5 {
            registry
                .create(id(&format!("d{n}")), DeviceSpec::default())
                .await
                .unwrap();
        }
        assert!(matches!(
            registry
                .delete(&id("d0"), Some(IfMatch::Etag("x".into())))
                .await,
            Err(RegistryError::EtagMismatch { .. })
        ));
        registry.delete(&id("d0"), None).await.unwrap();
        assert!(matches!(
            registry.delete(&id("d0"), None).await,
            Err(RegistryError::NotFound(_))
        ));

        let first = registry.list(None, 3).await.unwrap();
        let ids: Vec<_> = first
            .devices
            .iter()
            .map(|d| d.device_id.to_string())
            .collect();
        assert_eq!(ids, ["d1", "d2", "d3"]);
        let second = registry.list(first.next_after.as_ref(), 3).await.unwrap();
        let ids: Vec<_> = second
            .devices
            .iter()
            .map(|d| d.device_id.to_string())
            .collect();
        assert_eq!(ids, ["d4"]);
        assert!(second.next_after.is_none());
    }

    #[tokio::test]
    async fn the_device_cache_follows_every_write() {
        let (_dir, registry) = registry();
        registry
            .create(id("c1"), DeviceSpec::default())
            .await
            .unwrap();
        let cached = registry.get(&id("c1")).await.unwrap();
        let disable = DeviceSpec {
            status: Some(DeviceStatus::Disabled),
            ..DeviceSpec::default()
        };
        registry
            .update(id("c1"), disable, IfMatch::Any)
            .await
            .unwrap();
        let updated = registry.get(&id("c1")).await.unwrap();
        assert_eq!(updated.status, DeviceStatus::Disabled);
        assert_ne!(updated.etag(), cached.etag());
        registry.delete(&id("c1"), None).await.unwrap();
        assert!(matches!(
            registry.get(&id("c1")).await,
            Err(RegistryError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn credential_changes_are_announced_and_other_updates_are_not() {
        let (_dir, registry) = registry();
        registry
            .create(id("k1"), DeviceSpec::default())
            .await
            .unwrap();
        let mut events = registry.subscribe();
        let reason = DeviceSpec {
            status_reason: Some("maintenance".into()),
            ..DeviceSpec::default()
        };
        registry
            .update(id("k1"), reason, IfMatch::Any)
            .await
            .unwrap();
        assert!(events.try_recv().is_err());
        let rotate = DeviceSpec {
            authentication: Some(AuthenticationSpec {
                symmetric_key: Some(SymmetricKeySpec {
                    primary_key: Some(device::generate_key()),
                    secondary_key: None,
                }),
                ..AuthenticationSpec::default()
            }),
            ..DeviceSpec::default()
        };
        registry
            .update(id("k1"), rotate, IfMatch::Any)
            .await
            .unwrap();
        assert_eq!(
            events.try_recv().unwrap(),
            RegistryEvent::CredentialsChanged(id("k1"))
        );
    }

    #[test]
    fn if_match_accepts_quoted_bare_weak_and_star() {
        assert_eq!(IfMatch::parse("*"), IfMatch::Any);
        assert_eq!(IfMatch::parse("\"abc\""), IfMatch::Etag("abc".into()));
        assert_eq!(IfMatch::parse("abc"), IfMatch::Etag("abc".into()));
        assert_eq!(IfMatch::parse("W/\"abc\""), IfMatch::Etag("abc".into()));
    }
}
