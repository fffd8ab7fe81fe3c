//! Device identities: ids, credentials, status and etags, and the [`Registry`]
//! service that validates requests and applies them to a [`RegistryStore`] with
//! optimistic concurrency (If-Match). Live connection state is in [`Presence`].

mod device;
mod device_id;
mod presence;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::broadcast;

pub use device::{
    AuthType, Authentication, AuthenticationSpec, Device, DeviceSpec, DeviceStatus, SymmetricKey,
    SymmetricKeySpec, X509Thumbprint, generate_key, validate_key,
};
pub use device_id::{DeviceId, DeviceIdError};
pub use presence::{DevicePresence, Presence, PresenceObserver};
pub use store::{RegistryStore, RegistryStoreError, Removed};

use crate::storage::StoreError;

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
        // Azure's service SDKs send the wildcard quoted (`If-Match: "*"`) by default.
        if raw == "*" {
            return IfMatch::Any;
        }
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

/// How long a mirrored registry waits for its feed to make progress towards the
/// store's latest write before a listing (or the start) fails.
const MIRROR_CATCH_UP: Duration = Duration::from_secs(10);

/// A change to the stored registry as a store's change feed delivers it, in the
/// store's version order (cluster mode: the KV watch of the registry bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredChange {
    /// The device was written; its `version` is the store's version of that write.
    Put(Device),
    /// The device was deleted by the write with version `version`.
    Deleted {
        /// The device.
        id: DeviceId,
        /// The store's version of the deletion.
        version: u64,
    },
}

/// The registry service.
#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn RegistryStore>,
    presence: Presence,
    events: broadcast::Sender<RegistryEvent>,
    observers: Arc<std::sync::RwLock<Vec<Arc<dyn RegistryObserver>>>>,
    /// Copy of stored devices: every CONNECT reads its device. Embedded: read-through,
    /// kept current by the writes, which all go through this registry. Cluster mode:
    /// a mirror of the whole bucket fed by the store's change feed (writes through
    /// other hubs arrive there) and by this hub's own writes.
    cache: Arc<std::sync::Mutex<DeviceCache>>,
    /// Held from applying a change to the cache until its events are told, so that
    /// observers and the gateway hear the changes of a device in their order even
    /// when the feed and a local write apply them concurrently.
    announcing: Arc<std::sync::Mutex<()>>,
    /// Cluster mode: the store version up to which the feed has applied every change.
    fed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Where a change to a mirrored cache comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The store's change feed: every change, in version order.
    Feed,
    /// The ack of a write made through this hub: may arrive before or after the feed
    /// delivers the same change.
    Local,
}

/// The registry's copy of stored devices, with a count of writes so a read that
/// raced a write does not put a stale device back.
#[derive(Debug, Default)]
struct DeviceCache {
    devices: BTreeMap<DeviceId, Device>,
    writes: u64,
    /// Cluster mode: the cache mirrors the store (see [`Mirror`]).
    mirror: Option<Mirror>,
}

/// What a mirrored cache knows beyond its devices. The invariant: every change up to
/// `applied` is reflected, and a device's entry is never replaced by an older version,
/// so the writer of version `v` finds `v` or newer in its own cache once its write
/// returns (read-your-writes) and every change is applied — and announced — once.
#[derive(Debug, Default)]
struct Mirror {
    /// The feed's position: the store version of the last change it delivered.
    applied: u64,
    /// Deletions made through this hub that the feed has not delivered yet, by the
    /// version of the deletion: an older write arriving later must not bring the
    /// device back. Dropped once the feed passes them (the position then rejects
    /// anything older).
    deleted: HashMap<DeviceId, u64>,
}

/// A change a mirrored cache applied: the device's previous entry (none when it was
/// absent).
type Applied = Option<Device>;

impl DeviceCache {
    fn put(&mut self, device: Device) {
        self.writes += 1;
        self.devices.insert(device.device_id.clone(), device);
    }

    fn forget(&mut self, id: &DeviceId) {
        self.writes += 1;
        self.devices.remove(id);
    }

    /// Whether a change with `version` to `id` is older than what the mirror holds.
    fn is_stale(mirror: &Mirror, current: Option<&Device>, id: &DeviceId, version: u64) -> bool {
        current.is_some_and(|current| current.version >= version)
            || mirror.deleted.get(id).is_some_and(|&gone| gone >= version)
    }

    /// Applies a write of `device` (at version `device.version`) to a mirror;
    /// `None` when the mirror already holds that version or a newer one.
    fn apply_put(&mut self, device: Device, source: Source) -> Option<Applied> {
        let mirror = self.mirror.as_mut()?;
        let version = device.version;
        let stale = (source == Source::Local && version <= mirror.applied)
            || Self::is_stale(
                mirror,
                self.devices.get(&device.device_id),
                &device.device_id,
                version,
            );
        let applied = if stale {
            None
        } else {
            mirror.deleted.remove(&device.device_id);
            self.writes += 1;
            Some(self.devices.insert(device.device_id.clone(), device))
        };
        if source == Source::Feed {
            self.advance(version);
        }
        applied
    }

    /// Applies the deletion of `id` at `version` to a mirror; `None` when the mirror
    /// already holds that change or a newer one.
    fn apply_delete(&mut self, id: &DeviceId, version: u64, source: Source) -> Option<Applied> {
        let mirror = self.mirror.as_mut()?;
        let stale = (source == Source::Local && version <= mirror.applied)
            || Self::is_stale(mirror, self.devices.get(id), id, version);
        let applied = if stale {
            None
        } else {
            if source == Source::Local {
                mirror.deleted.insert(id.clone(), version);
            }
            self.writes += 1;
            Some(self.devices.remove(id))
        };
        if source == Source::Feed {
            self.advance(version);
        }
        applied
    }

    /// Moves the feed's position to `version` (the feed delivers in version order).
    fn advance(&mut self, version: u64) {
        if let Some(mirror) = self.mirror.as_mut() {
            mirror.applied = mirror.applied.max(version);
            let applied = mirror.applied;
            mirror.deleted.retain(|_, gone| *gone > applied);
        }
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
        Self::with_cache(store, presence, DeviceCache::default())
    }

    /// A registry over a store that other hubs write too (cluster mode): its cache
    /// mirrors the store and must be fed every change, in order, through
    /// [`Registry::apply_from_feed`]; reads miss to the store until the feed caught up.
    pub fn mirrored(store: Arc<dyn RegistryStore>, presence: Presence) -> Self {
        Self::with_cache(
            store,
            presence,
            DeviceCache {
                mirror: Some(Mirror::default()),
                ..DeviceCache::default()
            },
        )
    }

    fn with_cache(store: Arc<dyn RegistryStore>, presence: Presence, cache: DeviceCache) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            store,
            presence,
            events,
            observers: Arc::default(),
            cache: Arc::new(std::sync::Mutex::new(cache)),
            announcing: Arc::default(),
            fed: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, DeviceCache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_mirrored(&self) -> bool {
        self.cache().mirror.is_some()
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

    /// Tells observers and the gateway what a change did to a device: `previous` was
    /// its entry before, `next` is its entry after (none when deleted).
    fn announce(&self, previous: Option<&Device>, next: Option<&Device>) {
        let id = match (previous, next) {
            (_, Some(device)) | (Some(device), None) => device.device_id.clone(),
            (None, None) => return,
        };
        // A deletion, or a re-creation under the id that the feed shows as one write
        // (the deletion was compacted away), ends the old device.
        let ended = match (previous, next) {
            (_, None) => true,
            (Some(previous), Some(next)) => previous.generation_id != next.generation_id,
            (None, Some(_)) => false,
        };
        if ended {
            for observer in self.observers() {
                observer.deleted(&id);
            }
            self.emit(RegistryEvent::Revoked(id.clone()));
            self.presence.forget(&id);
        }
        let Some(next) = next else { return };
        let previous = previous.filter(|_| !ended);
        if previous.is_none() {
            for observer in self.observers() {
                observer.created(&id);
            }
        }
        if next.status == DeviceStatus::Disabled {
            self.emit(RegistryEvent::Revoked(id));
        } else if previous.is_some_and(|previous| previous.authentication != next.authentication) {
            self.emit(RegistryEvent::CredentialsChanged(id));
        }
    }

    /// Records a write made through this hub: `read` is the entry it was based on,
    /// `stored` the device as the store now holds it.
    fn record_put(&self, read: Option<&Device>, stored: &Device) {
        let _order = self.announcing();
        let applied = {
            let mut cache = self.cache();
            if cache.mirror.is_some() {
                cache.apply_put(stored.clone(), Source::Local)
            } else {
                cache.put(stored.clone());
                Some(read.cloned())
            }
        };
        if let Some(previous) = applied {
            self.announce(previous.as_ref(), Some(stored));
        }
    }

    /// Records a deletion made through this hub.
    fn record_delete(&self, removed: &store::Removed) {
        let _order = self.announcing();
        let id = &removed.device.device_id;
        let applied = {
            let mut cache = self.cache();
            if cache.mirror.is_some() {
                cache.apply_delete(id, removed.version, Source::Local)
            } else {
                cache.forget(id);
                Some(Some(removed.device.clone()))
            }
        };
        if let Some(previous) = applied {
            // Announced even when this hub never saw the device: a connection made
            // with a read that missed the mirror must close too.
            self.announce(previous.as_ref().or(Some(&removed.device)), None);
        }
    }

    fn announcing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.announcing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a change delivered by the store's change feed (cluster mode), in the
    /// store's version order, and announces it unless this hub's own write already
    /// did. A change written through another hub reaches the gateway (revocations)
    /// and the observers (twins) of this one here.
    pub fn apply_from_feed(&self, change: StoredChange) {
        let _order = self.announcing();
        let (version, applied, next) = {
            let mut cache = self.cache();
            match change {
                StoredChange::Put(device) => {
                    let version = device.version;
                    let applied = cache.apply_put(device.clone(), Source::Feed);
                    (version, applied, Some(device))
                }
                StoredChange::Deleted { id, version } => {
                    let applied = cache.apply_delete(&id, version, Source::Feed);
                    (version, applied, None)
                }
            }
        };
        if let Some(previous) = applied {
            self.announce(previous.as_ref(), next.as_ref());
        }
        self.fed.send_modify(|fed| *fed = (*fed).max(version));
    }

    /// Moves the feed's position past a change it could not apply (a record that does
    /// not decode, already logged by the feed).
    pub fn skip_in_feed(&self, version: u64) {
        self.cache().advance(version);
        self.fed.send_modify(|fed| *fed = (*fed).max(version));
    }

    /// The store version up to which the feed has applied every change (0 before the
    /// first, and always in the embedded mode).
    pub fn feed_position(&self) -> u64 {
        *self.fed.borrow()
    }

    /// Waits until a mirrored registry's feed has applied the store's latest write (as
    /// of this call): from then on the mirror holds everything written before. Returns
    /// at once for a store without a feed.
    pub async fn catch_up(&self) -> Result<(), RegistryError> {
        let Some(head) = self.store.head().await? else {
            return Ok(());
        };
        let mut fed = self.fed.subscribe();
        let mut seen = self.feed_position();
        loop {
            match tokio::time::timeout(MIRROR_CATCH_UP, fed.wait_for(|&fed| fed >= head)).await {
                Ok(Ok(_)) => return Ok(()),
                // A large bucket replayed at start may take longer than one period:
                // waiting goes on while the feed makes progress.
                Err(_) if self.feed_position() > seen => seen = self.feed_position(),
                Ok(Err(_)) | Err(_) => {
                    return Err(RegistryError::Store(StoreError::Backend(format!(
                        "the registry's change feed is stuck at version {} of {head}",
                        self.feed_position()
                    ))));
                }
            }
        }
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
        match self.store.insert(device).await {
            Ok(stored) => {
                self.record_put(None, &stored);
                Ok(stored)
            }
            Err(RegistryStoreError::AlreadyExists) => Err(RegistryError::AlreadyExists(id)),
            Err(err) => Err(err.into()),
        }
    }

    /// The device as the store holds it, bypassing the cache (after a lost race, or to
    /// judge an etag a mirror may not have seen yet).
    async fn get_stored(&self, id: &DeviceId) -> Result<Device, RegistryError> {
        self.store
            .get(id)
            .await?
            .ok_or_else(|| RegistryError::NotFound(id.clone()))
    }

    /// Updates a device: fields present in `spec` replace the stored ones.
    pub async fn update(
        &self,
        id: DeviceId,
        spec: DeviceSpec,
        if_match: IfMatch,
    ) -> Result<Device, RegistryError> {
        check_body_id(&id, &spec)?;
        let mirrored = self.is_mirrored();
        // Read from the store instead of the cache once the cache proved behind.
        let mut fresh = false;
        for _ in 0..UNCONDITIONAL_RETRIES {
            let current = if fresh {
                self.get_stored(&id).await?
            } else {
                self.get(&id).await?
            };
            if let Err(mismatch) = if_match.check(&current) {
                // A mirror may lag a write through another hub whose etag the client
                // already holds: only the store can refuse it.
                if mirrored && !fresh {
                    fresh = true;
                    continue;
                }
                return Err(mismatch);
            }
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
            let replaced = self.store.replace(next, current.version).await;
            if replaced.is_err() && !mirrored {
                self.cache().forget(&id);
            }
            match replaced {
                Ok(stored) => {
                    self.record_put(Some(&current), &stored);
                    return Ok(stored);
                }
                Err(RegistryStoreError::NotFound) => return Err(RegistryError::NotFound(id)),
                // Someone wrote between our read and write. An etag-conditional update
                // has lost; an unconditional one reads again.
                Err(RegistryStoreError::VersionConflict) => {
                    fresh = true;
                    continue;
                }
                Err(err) => return Err(err.into()),
            }
        }
        let current = self.get_stored(&id).await?;
        Err(RegistryError::EtagMismatch {
            current: current.etag(),
        })
    }

    /// The device with `id`.
    pub async fn get(&self, id: &DeviceId) -> Result<Device, RegistryError> {
        let (writes, mirrored) = {
            let cache = self.cache();
            if let Some(device) = cache.devices.get(id) {
                return Ok(device.clone());
            }
            (cache.writes, cache.mirror.is_some())
        };
        let device = self.get_stored(id).await?;
        // A mirror is filled by its feed only: a device read here (written through
        // another hub a moment ago) arrives there soon, and is announced then.
        if !mirrored {
            let mut cache = self.cache();
            // A write since the read may have changed or deleted the device.
            if cache.writes == writes {
                cache.devices.insert(id.clone(), device.clone());
            }
        }
        Ok(device)
    }

    /// The device with `id` as a client asking through this hub should see it: in
    /// cluster mode the stored entry (a direct get; a write through another hub a
    /// moment ago may not have reached this hub's mirror yet), the mirrored one if the
    /// store does not answer. Embedded mode reads the cache, which every write passes.
    pub async fn current(&self, id: &DeviceId) -> Result<Device, RegistryError> {
        if !self.is_mirrored() {
            return self.get(id).await;
        }
        match self.get_stored(id).await {
            Err(RegistryError::Store(err)) => {
                // Only the mirror: `get` would ask the store again for a device it
                // does not hold.
                let mirrored = self.cache().devices.get(id).cloned();
                match mirrored {
                    Some(device) => {
                        tracing::warn!(%id, error = %err, "registry read failed; answering from the mirror");
                        Ok(device)
                    }
                    None => Err(RegistryError::Store(err)),
                }
            }
            read => read,
        }
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
                let mut current = self.get(id).await?;
                if precondition.check(&current).is_err() && self.is_mirrored() {
                    // The mirror may lag the write whose etag the client holds.
                    current = self.get_stored(id).await?;
                }
                precondition.check(&current)?;
                Some(current.version)
            }
        };
        let removed = self.store.remove(id, expected_version).await;
        if removed.is_err() && !self.is_mirrored() {
            // Whatever happened, the next read goes to the store.
            self.cache().forget(id);
        }
        match removed {
            Ok(removed) => {
                self.record_delete(&removed);
                Ok(removed.device)
            }
            Err(RegistryStoreError::NotFound) => Err(RegistryError::NotFound(id.clone())),
            Err(RegistryStoreError::VersionConflict) => {
                let current = self.get_stored(id).await?;
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
        let mut devices = if self.is_mirrored() {
            // The store has no ordered scan; the mirror is ordered and, once caught up
            // with the store's latest write, holds every device written before this
            // call, through any hub.
            self.catch_up().await?;
            let cache = self.cache();
            let lower = match after {
                Some(id) => Bound::Excluded(id),
                None => Bound::Unbounded,
            };
            cache
                .devices
                .range::<DeviceId, _>((lower, Bound::Unbounded))
                .take(limit + 1)
                .map(|(_, device)| device.clone())
                .collect()
        } else {
            self.store.list(after, limit + 1).await?
        };
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

    #[test]
    fn if_match_takes_the_wildcard_quoted_or_not() {
        for raw in ["*", "\"*\"", " \"*\" ", "W/\"*\""] {
            assert_eq!(IfMatch::parse(raw), IfMatch::Any, "{raw}");
        }
        assert_eq!(IfMatch::parse("\"AAAAAQ\""), IfMatch::Etag("AAAAAQ".into()));
    }

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

    fn stored(name: &str, version: u64, status: DeviceStatus) -> Device {
        Device {
            device_id: id(name),
            generation_id: "g1".into(),
            version,
            status,
            status_reason: None,
            status_updated_time: OffsetDateTime::UNIX_EPOCH,
            authentication: Authentication {
                kind: AuthType::CertificateAuthority,
                symmetric_key: None,
                public_keys: Vec::new(),
                x509_thumbprint: X509Thumbprint::default(),
            },
        }
    }

    fn mirror() -> DeviceCache {
        DeviceCache {
            mirror: Some(Mirror::default()),
            ..DeviceCache::default()
        }
    }

    #[test]
    fn a_mirror_applies_only_newer_versions_from_either_source() {
        let enabled = DeviceStatus::Enabled;
        let mut cache = mirror();
        assert!(
            cache
                .apply_put(stored("m", 5, enabled), Source::Feed)
                .is_some()
        );
        // A local ack older than what the feed delivered, or equal to it, is stale.
        assert!(
            cache
                .apply_put(stored("m", 3, enabled), Source::Local)
                .is_none()
        );
        assert!(
            cache
                .apply_put(stored("m", 5, enabled), Source::Local)
                .is_none()
        );
        // The writer's own ack arrives before the feed: applied once, by the ack.
        let previous = cache.apply_put(stored("m", 7, enabled), Source::Local);
        assert_eq!(previous.unwrap().unwrap().version, 5);
        assert!(
            cache
                .apply_put(stored("m", 7, enabled), Source::Feed)
                .is_none()
        );
        assert_eq!(cache.devices[&id("m")].version, 7);
        // Another device's write the feed delivers in between moves the position.
        assert!(
            cache
                .apply_put(stored("o", 8, enabled), Source::Feed)
                .is_some()
        );
        // A local deletion leaves a mark no older write can cross...
        assert!(cache.apply_delete(&id("m"), 10, Source::Local).is_some());
        assert!(
            cache
                .apply_put(stored("m", 9, enabled), Source::Feed)
                .is_none()
        );
        assert!(!cache.devices.contains_key(&id("m")));
        // ...until the feed delivers the deletion itself, which is not applied twice.
        assert!(cache.apply_delete(&id("m"), 10, Source::Feed).is_none());
        assert!(cache.mirror.as_ref().unwrap().deleted.is_empty());
        assert_eq!(cache.mirror.as_ref().unwrap().applied, 10);
        // A late local ack the feed already passed is dropped; a re-creation is not.
        assert!(
            cache
                .apply_put(stored("m", 6, enabled), Source::Local)
                .is_none()
        );
        assert!(
            cache
                .apply_put(stored("m", 11, enabled), Source::Feed)
                .is_some()
        );
        assert_eq!(cache.devices[&id("m")].version, 11);
    }

    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<String>>);

    impl RegistryObserver for Recorded {
        fn created(&self, id: &DeviceId) {
            self.0.lock().unwrap().push(format!("created {id}"));
        }
        fn deleted(&self, id: &DeviceId) {
            self.0.lock().unwrap().push(format!("deleted {id}"));
        }
    }

    #[tokio::test]
    async fn changes_from_the_feed_are_announced_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let registry = Registry::mirrored(Arc::new(store), Presence::default());
        let observer = Arc::new(Recorded::default());
        registry.observe(observer.clone());
        let mut events = registry.subscribe();

        registry.apply_from_feed(StoredChange::Put(stored("f", 1, DeviceStatus::Enabled)));
        assert_eq!(registry.get(&id("f")).await.unwrap().version, 1);
        let disabled = stored("f", 2, DeviceStatus::Disabled);
        registry.apply_from_feed(StoredChange::Put(disabled.clone()));
        assert_eq!(events.try_recv().unwrap(), RegistryEvent::Revoked(id("f")));
        // The same change again (the writer's ack after the feed) announces nothing.
        registry.record_put(None, &disabled);
        assert!(events.try_recv().is_err());

        let mut rekeyed = stored("f", 3, DeviceStatus::Enabled);
        rekeyed.authentication.kind = AuthType::SelfSigned;
        registry.apply_from_feed(StoredChange::Put(rekeyed));
        assert_eq!(
            events.try_recv().unwrap(),
            RegistryEvent::CredentialsChanged(id("f"))
        );
        registry.apply_from_feed(StoredChange::Deleted {
            id: id("f"),
            version: 4,
        });
        assert_eq!(events.try_recv().unwrap(), RegistryEvent::Revoked(id("f")));
        assert!(matches!(
            registry.get(&id("f")).await,
            Err(RegistryError::NotFound(_))
        ));
        assert_eq!(registry.feed_position(), 4);
        assert_eq!(
            *observer.0.lock().unwrap(),
            ["created f", "deleted f"].map(String::from)
        );
        let page = registry.list(None, 10).await.unwrap();
        assert!(page.devices.is_empty());
    }

    /// The embedded store as another node sees it: a change feed position to catch up
    /// to, and reads by id that fail while `down` is set.
    struct Remote(EmbeddedStore, u64, std::sync::atomic::AtomicBool);

    impl Remote {
        fn new(store: EmbeddedStore, head: u64) -> Self {
            Self(store, head, std::sync::atomic::AtomicBool::new(false))
        }
    }

    #[async_trait::async_trait]
    impl RegistryStore for Remote {
        async fn insert(&self, device: Device) -> Result<Device, RegistryStoreError> {
            self.0.insert(device).await
        }
        async fn get(&self, id: &DeviceId) -> Result<Option<Device>, RegistryStoreError> {
            if self.2.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(RegistryStoreError::Store(StoreError::Backend(
                    "no answer".into(),
                )));
            }
            self.0.get(id).await
        }
        async fn replace(&self, device: Device, v: u64) -> Result<Device, RegistryStoreError> {
            self.0.replace(device, v).await
        }
        async fn remove(
            &self,
            id: &DeviceId,
            v: Option<u64>,
        ) -> Result<Removed, RegistryStoreError> {
            self.0.remove(id, v).await
        }
        async fn list(
            &self,
            after: Option<&DeviceId>,
            limit: usize,
        ) -> Result<Vec<Device>, RegistryStoreError> {
            self.0.list(after, limit).await
        }
        async fn head(&self) -> Result<Option<u64>, RegistryStoreError> {
            Ok(Some(self.1))
        }
    }

    #[tokio::test]
    async fn a_mirrored_listing_waits_for_the_feed_to_reach_the_stores_last_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let registry = Registry::mirrored(Arc::new(Remote::new(store, 3)), Presence::default());
        let listing = tokio::spawn({
            let registry = registry.clone();
            async move { registry.list(None, 10).await }
        });
        for (version, name) in [(1, "b"), (2, "a")] {
            tokio::task::yield_now().await;
            assert!(!listing.is_finished());
            registry.apply_from_feed(StoredChange::Put(stored(
                name,
                version,
                DeviceStatus::Enabled,
            )));
        }
        registry.apply_from_feed(StoredChange::Deleted {
            id: id("b"),
            version: 3,
        });
        let page = listing.await.unwrap().unwrap();
        let ids: Vec<_> = page
            .devices
            .iter()
            .map(|d| d.device_id.to_string())
            .collect();
        assert_eq!(ids, ["a"]);
    }

    #[tokio::test]
    async fn a_mirrored_registry_answers_a_read_by_id_from_the_store_and_else_from_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let remote = Arc::new(Remote::new(store, 0));
        let registry = Registry::mirrored(remote.clone(), Presence::default());
        let first = remote
            .0
            .insert(stored("m", 1, DeviceStatus::Enabled))
            .await
            .unwrap();
        registry.apply_from_feed(StoredChange::Put(first.clone()));
        // Another hub writes; this hub's feed has not delivered the change yet.
        let mut second = first.clone();
        second.version = 2;
        second.status_reason = Some("through another hub".into());
        remote.0.replace(second.clone(), 1).await.unwrap();
        assert_eq!(registry.get(&id("m")).await.unwrap(), first);
        assert_eq!(registry.current(&id("m")).await.unwrap(), second);

        remote.2.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(registry.current(&id("m")).await.unwrap(), first);
        assert!(matches!(
            registry.current(&id("absent")).await,
            Err(RegistryError::Store(_))
        ));
        remote.2.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(
            registry.current(&id("absent")).await,
            Err(RegistryError::NotFound(_))
        ));
    }

    #[test]
    fn if_match_accepts_quoted_bare_weak_and_star() {
        assert_eq!(IfMatch::parse("*"), IfMatch::Any);
        assert_eq!(IfMatch::parse("\"abc\""), IfMatch::Etag("abc".into()));
        assert_eq!(IfMatch::parse("abc"), IfMatch::Etag("abc".into()));
        assert_eq!(IfMatch::parse("W/\"abc\""), IfMatch::Etag("abc".into()));
    }
}
