//! Device twins (DESIGN sections 2–3): one document per registered device with
//! tags, desired and reported properties, their versions and `$metadata`.
//!
//! The service keeps a cache of every twin with the store revision it was read at
//! (queries scan it). A change reads the cached `(twin, revision)`, applies itself,
//! and asks the store to [`TwinStore::put`] the result *if the stored revision is
//! still the one it read* (compare-and-set). On success the cache takes the new
//! revision (read-your-writes) and the caller gets its answer (REST 200, device
//! 204); on a conflict the change reads the twin from the store and applies itself
//! again, a bounded number of times. So writers in different hub processes sharing
//! one store never lose each other's updates.
//!
//! In embedded mode this process is the only writer: the cache is authoritative and
//! the store commits in groups (`store::embedded`). In cluster mode the store also
//! [`TwinStore::watch`]es the changes every writer makes: they refresh the cache
//! and every node pushes desired-property patches to the devices connected to it.

pub mod document;
pub mod query;
pub mod requests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::delivery::{Delivery, DeviceLinks};
use crate::registry::{
    AuthType, Device, DeviceId, IfMatch, Registry, RegistryError, RegistryObserver,
};
use crate::storage::StoreError;
use document::{PatchError, TwinDocument, TwinLimits};
pub use requests::{TwinOp, TwinReply, TwinRequests, twin_error_code};

/// A twin's revision in its store: grows with every stored change of the twin; `0`
/// means "never stored" (a new device's twin). Only the store interprets it.
pub type Revision = u64;

/// A twin as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTwin {
    /// The document.
    pub twin: TwinDocument,
    /// Its revision.
    pub revision: Revision,
    /// The desired patch that produced `twin.desired.version`, when the store keeps
    /// it (cluster mode: every node pushes it to its own devices).
    pub desired_patch: Option<Value>,
}

/// One change to store.
#[derive(Debug, Clone)]
pub struct TwinWrite {
    /// The new document.
    pub twin: TwinDocument,
    /// The desired patch this change made, if it changed desired properties.
    pub desired_patch: Option<Value>,
}

/// Why a [`TwinStore::put`] did not store the twin.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The stored revision is not the expected one: another writer changed (or
    /// deleted) the twin since it was read. Nothing was written.
    #[error("the twin was changed by another writer")]
    Conflict,
    /// The store failed; nothing was written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A change to a stored twin, seen by [`TwinStore::watch`].
#[derive(Debug, Clone)]
pub struct TwinChange {
    /// The device.
    pub device: DeviceId,
    /// The revision of the change.
    pub revision: Revision,
    /// The new twin, or `None` when the twin was deleted.
    pub twin: Option<StoredTwin>,
}

/// What [`TwinStore::load_all`] returns.
#[derive(Debug, Default)]
pub struct TwinSnapshot {
    /// Every stored twin.
    pub twins: Vec<(DeviceId, StoredTwin)>,
    /// The store's position at the snapshot: a watch from here misses nothing.
    pub revision: Revision,
}

/// Where twins are stored: a document per device with compare-and-set on its
/// revision.
#[async_trait]
pub trait TwinStore: Send + Sync + 'static {
    /// Every stored twin.
    async fn load_all(&self) -> Result<TwinSnapshot, StoreError>;
    /// The stored twin of `id` (as of the newest accepted write), if any.
    async fn get(&self, id: &DeviceId) -> Result<Option<StoredTwin>, StoreError>;
    /// Stores `write` if the twin's stored revision is still `expected` (`0`: no
    /// twin is stored), returning the new revision once the write is durable.
    async fn put(
        &self,
        id: &DeviceId,
        write: TwinWrite,
        expected: Revision,
    ) -> Result<Revision, PutError>;
    /// `id` was created (its twin starts afresh). In cluster mode every hub hears
    /// of every creation.
    fn created(&self, id: &DeviceId);
    /// `id` was deleted; its twin goes with it. `known` is the newest revision of
    /// the twin this process knows (`0`: none): in cluster mode every hub hears of
    /// every deletion, and a store deletes only that revision, so a late deletion
    /// never removes the twin of a device created again under the id.
    fn deleted(&self, id: &DeviceId, known: Revision);
    /// The changes every writer makes after `after`, for a store shared by several
    /// processes; `None` when this process is the store's only writer.
    async fn watch(
        &self,
        after: Revision,
    ) -> Result<Option<mpsc::Receiver<TwinChange>>, StoreError>;
}

/// Why a twin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    /// No such device.
    #[error("device {0} not found")]
    NotFound(DeviceId),
    /// The request breaks a rule (shape, key, size, depth).
    #[error(transparent)]
    Invalid(#[from] PatchError),
    /// A request body that is not what the operation takes.
    #[error("{0}")]
    BadRequest(String),
    /// If-Match does not match the twin's etag.
    #[error("etag mismatch: the twin was modified (current etag {0})")]
    EtagMismatch(String),
    /// The change lost the race against other writers of the twin too many times.
    #[error("the twin of {0} is being changed by too many writers at once; try again")]
    Contended(DeviceId),
    /// The store failed to commit; nothing was changed.
    #[error("twin store: {0}")]
    Store(String),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A query scanned for longer than its time budget and was stopped.
    #[error("the query did not finish within its time budget of {0:?}")]
    QueryBudget(std::time::Duration),
}

/// A twin with the registry fields the REST document shows.
#[derive(Debug, Clone)]
pub struct TwinView {
    /// The device.
    pub device: Device,
    /// Its twin.
    pub twin: TwinDocument,
}

/// The twin etag: changes with every twin change. It is made of the twin's version,
/// which is part of the stored document, so every hub sharing a store computes the
/// same etag for the same twin.
pub fn etag(twin: &TwinDocument) -> String {
    STANDARD_NO_PAD.encode(twin.version.to_string())
}

/// A cached twin and the revision it was stored at.
#[derive(Debug, Clone)]
struct Cached {
    twin: Arc<TwinDocument>,
    revision: Revision,
    /// Drawn anew whenever the device's entry appears: a change that started on an
    /// earlier incarnation of the device (deleted and created again under the same
    /// id) must not land on the new one.
    epoch: u64,
}

/// A new device's twin, as the base of a change. One document shared by every
/// device that never had a change (a change replaces the `Arc`, never edits through
/// it): a registered device costs its map entry, not a document (issue 28).
fn fresh() -> (Arc<TwinDocument>, Revision) {
    static FRESH: std::sync::LazyLock<Arc<TwinDocument>> =
        std::sync::LazyLock::new(|| Arc::new(TwinDocument::new()));
    (Arc::clone(&FRESH), 0)
}

struct Inner {
    twins: Mutex<HashMap<DeviceId, Cached>>,
    epochs: std::sync::atomic::AtomicU64,
    store: Arc<dyn TwinStore>,
    /// Several processes write the store (cluster mode): reads go to the store, and
    /// desired patches are pushed by the watch, not by the writer.
    shared: bool,
    registry: Registry,
    links: Arc<dyn DeviceLinks>,
    limits: TwinLimits,
    /// Bounds the queries scanning at once.
    query_slots: tokio::sync::Semaphore,
    /// Told of every change made through this hub (routing's twin change events).
    observer: std::sync::OnceLock<Arc<dyn TwinObserver>>,
}

/// How a twin was changed, in Azure's twin change events' `opType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinChangeKind {
    /// A merge patch of tags, desired or reported properties (`updateTwin`).
    Update,
    /// Tags and desired properties replaced (`replaceTwin`).
    Replace,
}

/// Told synchronously after a change made through this hub is stored; it must not
/// block.
pub trait TwinObserver: Send + Sync + 'static {
    /// `id`'s twin is now `twin`; `changed` holds what the change set, in the twin's
    /// shape (`{"tags": …, "properties": {"desired"|"reported": …}}`).
    fn changed(&self, id: &DeviceId, kind: TwinChangeKind, twin: &TwinDocument, changed: Value);
}

/// The twin service.
#[derive(Clone)]
pub struct Twins {
    inner: Arc<Inner>,
}

/// A handle on the twin service that does not keep it alive: for an observer the
/// twins (or the registry they hold) keep, which would otherwise form a cycle that
/// never frees the store.
#[derive(Clone)]
pub struct WeakTwins(std::sync::Weak<Inner>);

impl WeakTwins {
    /// The twin service, while it exists.
    pub fn upgrade(&self) -> Option<Twins> {
        self.0.upgrade().map(|inner| Twins { inner })
    }
}

impl std::fmt::Debug for Twins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twins").finish_non_exhaustive()
    }
}

/// How often a change is applied again after losing a compare-and-set race before
/// it gives up ([`TwinError::Contended`]).
const MAX_CONFLICTS: usize = 64;

/// A change applied to a twin: edits it at `now` and returns the desired patch it
/// made, if any. Applied again from the newer twin when the first try lost a race.
type Change<'a> =
    dyn FnMut(&mut TwinDocument, &str) -> Result<Option<Value>, TwinError> + Send + 'a;

impl Twins {
    /// Loads every twin from `store` (and a new one for every registered device that
    /// never had a change) and, when the store is shared, starts following it.
    pub async fn start(
        store: Arc<dyn TwinStore>,
        registry: Registry,
        links: Arc<dyn DeviceLinks>,
        limits: TwinLimits,
    ) -> Result<Self, TwinError> {
        let stored = store
            .load_all()
            .await
            .map_err(|err| TwinError::Store(err.to_string()))?;
        let watch = store
            .watch(stored.revision)
            .await
            .map_err(|err| TwinError::Store(err.to_string()))?;
        let shared = watch.is_some();
        let mut twins: HashMap<DeviceId, (Arc<TwinDocument>, Revision)> = HashMap::new();
        let mut after = None;
        loop {
            let page = registry.list(after.as_ref(), 1000).await?;
            for device in &page.devices {
                twins.insert(device.device_id.clone(), fresh());
            }
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut desired_seen = HashMap::new();
        for (id, stored) in stored.twins {
            // A stored twin of a device that no longer exists is dropped. In a shared
            // store the twins are the truth (the deleting node deletes the twin), so
            // every stored twin is kept.
            if shared || twins.contains_key(&id) {
                desired_seen.insert(id.clone(), stored.twin.desired.version);
                twins.insert(id, (Arc::new(stored.twin), stored.revision));
            }
        }
        let twins = twins
            .into_iter()
            .enumerate()
            .map(|(epoch, (id, (twin, revision)))| {
                let epoch = epoch as u64;
                (
                    id,
                    Cached {
                        twin,
                        revision,
                        epoch,
                    },
                )
            })
            .collect::<HashMap<_, _>>();
        let inner = Arc::new(Inner {
            epochs: std::sync::atomic::AtomicU64::new(twins.len() as u64),
            twins: Mutex::new(twins),
            store,
            shared,
            registry: registry.clone(),
            links,
            limits,
            query_slots: tokio::sync::Semaphore::new(CONCURRENT_QUERIES),
            observer: std::sync::OnceLock::new(),
        });
        if let Some(changes) = watch {
            tokio::spawn(follow(Arc::downgrade(&inner), changes, desired_seen));
        }
        registry.observe(Arc::new(FollowRegistry(Arc::downgrade(&inner))));
        Ok(Self { inner })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Cached>> {
        self.inner.lock()
    }

    /// A handle that does not keep the service alive.
    pub fn downgrade(&self) -> WeakTwins {
        WeakTwins(Arc::downgrade(&self.inner))
    }

    /// Sets the observer of changes (once; later calls are ignored).
    pub fn observe(&self, observer: Arc<dyn TwinObserver>) {
        let _ = self.inner.observer.set(observer);
    }

    fn notify(&self, id: &DeviceId, kind: TwinChangeKind, twin: &TwinDocument, changed: Value) {
        if let Some(observer) = self.inner.observer.get() {
            observer.changed(id, kind, twin, changed);
        }
    }

    /// Every twin, sorted by device id (cheap: the documents are shared).
    pub fn snapshot(&self) -> Vec<(DeviceId, Arc<TwinDocument>)> {
        let mut all: Vec<(DeviceId, Arc<TwinDocument>)> = self
            .lock()
            .iter()
            .map(|(id, t)| (id.clone(), Arc::clone(&t.twin)))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The cached twin of `id` (a new one if the device never had a change).
    pub fn twin_of(&self, id: &DeviceId) -> TwinDocument {
        // Only the Arc is taken under the lock; the document is copied after it is
        // released, so a large twin never holds up other devices' twins.
        let shared = self.lock().get(id).map(|t| Arc::clone(&t.twin));
        shared.map(|t| (*t).clone()).unwrap_or_default()
    }

    /// The current twin of `id`: the cached one, or in cluster mode the stored one
    /// (another hub may have changed it a moment ago). If the store does not answer,
    /// the cached copy is the best answer there is.
    pub async fn current(&self, id: &DeviceId) -> TwinDocument {
        if !self.inner.shared {
            return self.twin_of(id);
        }
        match self.inner.store.get(id).await {
            Ok(Some(stored)) => {
                let twin = stored.twin.clone();
                self.inner.remember(id, stored.twin, stored.revision, None);
                twin
            }
            Ok(None) => self.twin_of(id),
            Err(err) => {
                tracing::warn!(%id, error = %err, "twin read failed; answering from the cache");
                self.twin_of(id)
            }
        }
    }

    /// The REST view of `id`'s twin.
    pub async fn get(&self, id: &DeviceId) -> Result<TwinView, TwinError> {
        let device = self.device(id).await?;
        Ok(TwinView {
            twin: self.current(id).await,
            device,
        })
    }

    /// The twin's device as the registry stores it now (in cluster mode a device
    /// created or changed through another hub a moment ago included).
    async fn device(&self, id: &DeviceId) -> Result<Device, TwinError> {
        match self.inner.registry.current(id).await {
            Ok(device) => Ok(device),
            Err(RegistryError::NotFound(_)) => Err(TwinError::NotFound(id.clone())),
            Err(err) => Err(err.into()),
        }
    }

    /// Applies `change` to `id`'s twin and stores the result if nobody changed the
    /// twin meanwhile; otherwise reads the newer twin and applies `change` again. The
    /// caller gets the result once it is durable.
    async fn change(
        &self,
        id: &DeviceId,
        change: &mut Change<'_>,
    ) -> Result<TwinDocument, TwinError> {
        let now = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let (mut base, epoch) = match self.lock().get(id) {
            Some(cached) => (
                (Arc::clone(&cached.twin), cached.revision),
                Some(cached.epoch),
            ),
            None => (fresh(), None),
        };
        // The cached copy may be behind the store (another writer, or in embedded
        // mode a change still being committed): a refusal based on it is checked
        // again against the store before it is final.
        let mut from_cache = true;
        let mut conflicts = 0;
        loop {
            let mut twin = (*base.0).clone();
            let push = match change(&mut twin, &now) {
                Ok(push) => push,
                Err(TwinError::EtagMismatch(_)) if from_cache => {
                    base = self.stored(id).await?;
                    from_cache = false;
                    continue;
                }
                Err(err) => return Err(err),
            };
            twin.version += 1;
            let write = TwinWrite {
                twin: twin.clone(),
                desired_patch: push.clone(),
            };
            match self.inner.store.put(id, write, base.1).await {
                Ok(revision) => {
                    self.inner.remember(id, twin.clone(), revision, epoch);
                    if !self.inner.shared
                        && let Some(patch) = push
                    {
                        self.inner.push_desired(id, twin.desired.version, patch);
                    }
                    return Ok(twin);
                }
                Err(PutError::Conflict) if conflicts < MAX_CONFLICTS => {
                    // Deleted (and maybe created again) meanwhile: the change was for
                    // a device that is gone.
                    if epoch.is_some() && self.lock().get(id).map(|c| c.epoch) != epoch {
                        return Err(TwinError::NotFound(id.clone()));
                    }
                    conflicts += 1;
                    tracing::debug!(%id, conflicts, "twin changed by another writer; applying the change again");
                    base = self.stored(id).await?;
                    from_cache = false;
                }
                Err(PutError::Conflict) => return Err(TwinError::Contended(id.clone())),
                Err(PutError::Store(err)) => return Err(TwinError::Store(err.to_string())),
            }
        }
    }

    /// The stored twin of `id` as a base for a change (a fresh one if none is
    /// stored).
    async fn stored(&self, id: &DeviceId) -> Result<(Arc<TwinDocument>, Revision), TwinError> {
        let stored = self
            .inner
            .store
            .get(id)
            .await
            .map_err(|err| TwinError::Store(err.to_string()))?;
        Ok(match stored {
            Some(stored) => (Arc::new(stored.twin), stored.revision),
            None => fresh(),
        })
    }

    /// `PATCH /twins/{id}`: merge `tags` and `properties.desired`.
    pub async fn patch(
        &self,
        id: &DeviceId,
        body: Value,
        if_match: Option<IfMatch>,
    ) -> Result<TwinView, TwinError> {
        let device = self.device(id).await?;
        let (tags, desired) = service_sections(body)?;
        let limits = self.inner.limits;
        let twin = self
            .change(id, &mut |twin, now| {
                check_etag(twin, if_match.as_ref())?;
                if let Some(tags) = &tags {
                    twin.patch_tags(tags, limits)?;
                }
                match &desired {
                    Some(desired) => {
                        twin.desired.apply("desired", desired, now, true, limits)?;
                        Ok(Some(Value::Object(desired.clone())))
                    }
                    None => Ok(None),
                }
            })
            .await?;
        let mut changed = Map::new();
        if let Some(tags) = tags {
            changed.insert("tags".into(), Value::Object(tags));
        }
        if let Some(desired) = desired {
            changed.insert("properties".into(), json!({ "desired": desired }));
        }
        self.notify(id, TwinChangeKind::Update, &twin, Value::Object(changed));
        Ok(TwinView { device, twin })
    }

    /// `PUT /twins/{id}`: replace tags and desired properties.
    pub async fn replace(
        &self,
        id: &DeviceId,
        body: Value,
        if_match: Option<IfMatch>,
    ) -> Result<TwinView, TwinError> {
        let device = self.device(id).await?;
        let (tags, desired) = service_sections(body)?;
        let limits = self.inner.limits;
        let tags = tags.unwrap_or_default();
        let desired = desired.unwrap_or_default();
        let twin = self
            .change(id, &mut |twin, now| {
                check_etag(twin, if_match.as_ref())?;
                let mut replaced = TwinDocument {
                    tags: Map::new(),
                    ..twin.clone()
                };
                replaced.patch_tags(&tags, limits)?;
                replaced
                    .desired
                    .replace("desired", desired.clone(), now, true, limits)?;
                *twin = replaced;
                // A device sees the whole new desired section.
                Ok(Some(Value::Object(twin.desired.properties.clone())))
            })
            .await?;
        let changed = json!({
            "tags": twin.tags,
            "properties": { "desired": twin.desired.properties },
        });
        self.notify(id, TwinChangeKind::Replace, &twin, changed);
        Ok(TwinView { device, twin })
    }

    /// A device's reported-properties patch; returns the new reported version.
    pub async fn patch_reported(&self, id: &DeviceId, patch: &[u8]) -> Result<u64, TwinError> {
        let patch: Value = serde_json::from_slice(patch)
            .map_err(|err| TwinError::BadRequest(format!("reported patch is not JSON: {err}")))?;
        let Value::Object(patch) = patch else {
            return Err(TwinError::Invalid(PatchError::NotAnObject {
                section: "reported",
            }));
        };
        let limits = self.inner.limits;
        let twin = self
            .change(id, &mut |twin, now| {
                twin.reported
                    .apply("reported", &patch, now, false, limits)?;
                Ok(None)
            })
            .await?;
        let changed = json!({ "properties": { "reported": patch } });
        self.notify(id, TwinChangeKind::Update, &twin, changed);
        Ok(twin.reported.version)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Cached>> {
        self.twins.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_epoch(&self) -> u64 {
        self.epochs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Puts `twin` at `revision` in the cache unless the cache already holds the same
    /// or a newer revision (answers and watch events arrive in any order). A writer
    /// passes the `epoch` of the entry its change started from: if the device was
    /// deleted (and perhaps created again) since, its answer is not cached.
    fn remember(&self, id: &DeviceId, twin: TwinDocument, revision: Revision, epoch: Option<u64>) {
        let mut twins = self.lock();
        match twins.get_mut(id) {
            Some(cached) if epoch.is_some_and(|e| e != cached.epoch) => {}
            Some(cached) if cached.revision >= revision => {}
            Some(cached) => {
                cached.twin = Arc::new(twin);
                cached.revision = revision;
            }
            // Deleted meanwhile: a late answer must not bring the twin back. Only a
            // shared store's twins appear without this node seeing the device created.
            None if epoch.is_some() || !self.shared => {}
            None => {
                let epoch = self.next_epoch();
                twins.insert(
                    id.clone(),
                    Cached {
                        twin: Arc::new(twin),
                        revision,
                        epoch,
                    },
                );
            }
        }
    }

    fn push_desired(&self, id: &DeviceId, version: u64, mut patch: Value) {
        if let Value::Object(map) = &mut patch {
            map.insert("$version".into(), Value::from(version));
        }
        let message = Delivery::DesiredPatch {
            version,
            patch: Bytes::from(patch.to_string()),
        };
        // Not connected or not subscribed: the device GETs the twin when it comes back.
        let _ = self.links.send(id, message);
    }
}

/// Follows a shared store: every writer's change refreshes the cache, and a change
/// of desired properties is pushed to the device if it is connected to this node.
/// `desired_seen` holds the desired version each device last had here, so a change
/// is pushed once, whoever made it.
async fn follow(
    inner: std::sync::Weak<Inner>,
    mut changes: mpsc::Receiver<TwinChange>,
    mut desired_seen: HashMap<DeviceId, u64>,
) {
    while let Some(change) = changes.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let Some(stored) = change.twin else {
            let mut twins = inner.lock();
            if twins
                .get(&change.device)
                .is_some_and(|cached| cached.revision < change.revision)
            {
                twins.remove(&change.device);
            }
            desired_seen.remove(&change.device);
            continue;
        };
        let version = stored.twin.desired.version;
        // A new twin starts at desired version 1, which no patch made.
        let seen = desired_seen
            .insert(change.device.clone(), version)
            .unwrap_or(1);
        if version > seen {
            // The stored patch made this version. If this node missed a version in
            // between (its watch was re-established), the whole desired section is
            // the patch: as for a PUT, the device gets every current key.
            let patch = match stored.desired_patch {
                Some(patch) if version == seen + 1 => patch,
                _ => Value::Object(stored.twin.desired.properties.clone()),
            };
            inner.push_desired(&change.device, version, patch);
        }
        inner.remember(&change.device, stored.twin, change.revision, None);
    }
}

/// Registry fields a query may filter on.
const DEVICE_FIELDS: [&str; 7] = [
    "status",
    "statusReason",
    "connectionState",
    "lastActivityTime",
    "generationId",
    "statusUpdateTime",
    "authenticationType",
];

/// One twin as a query row.
struct TwinRow<'a> {
    id: &'a DeviceId,
    twin: &'a TwinDocument,
    device: Option<&'a Device>,
    presence: &'a crate::registry::Presence,
}

impl query::Row for TwinRow<'_> {
    fn get(&self, path: &[String]) -> Option<Value> {
        let (first, rest) = path.split_first()?;
        let nested = |map: &Map<String, Value>| -> Option<Value> {
            if rest.is_empty() {
                Some(Value::Object(map.clone()))
            } else {
                query::lookup(map, rest).cloned()
            }
        };
        match first.as_str() {
            "deviceId" if rest.is_empty() => Some(Value::String(self.id.to_string())),
            "version" if rest.is_empty() => Some(Value::from(self.twin.version)),
            "etag" if rest.is_empty() => Some(Value::String(etag(self.twin))),
            "tags" => nested(&self.twin.tags),
            "properties" => {
                let (section, rest) = rest.split_first()?;
                let section = match section.as_str() {
                    "desired" => &self.twin.desired,
                    "reported" => &self.twin.reported,
                    _ => return None,
                };
                match rest {
                    [] => Some(section.to_json(false)),
                    [v] if v == "$version" => Some(Value::from(section.version)),
                    _ => query::lookup(&section.properties, rest).cloned(),
                }
            }
            field if rest.is_empty() && DEVICE_FIELDS.contains(&field) => {
                let view = device_fields(self.device?, self.presence);
                view.get(field).cloned().filter(|v| !v.is_null())
            }
            _ => None,
        }
    }
}

/// The registry part of a twin document.
fn device_fields(device: &Device, presence: &crate::registry::Presence) -> Map<String, Value> {
    let live = presence.get(&device.device_id);
    let mut out = Map::new();
    out.insert(
        "status".into(),
        serde_json::to_value(device.status).unwrap_or(Value::Null),
    );
    out.insert(
        "statusReason".into(),
        device
            .status_reason
            .clone()
            .map_or(Value::Null, Value::String),
    );
    out.insert(
        "generationId".into(),
        Value::String(device.generation_id.clone()),
    );
    out.insert(
        "connectionState".into(),
        Value::String(
            if live.is_some_and(|p| p.connected) {
                "Connected"
            } else {
                "Disconnected"
            }
            .into(),
        ),
    );
    out.insert(
        "lastActivityTime".into(),
        live.and_then(|p| {
            p.last_activity
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String),
    );
    // The rest of Azure's twin fields, so back ends reading them find them.
    out.insert(
        "statusUpdateTime".into(),
        device
            .status_updated_time
            .format(&time::format_description::well_known::Rfc3339)
            .map_or(Value::Null, Value::String),
    );
    out.insert(
        "authenticationType".into(),
        Value::String(
            match device.authentication.kind {
                // A JWT device holds symmetric keys too; Azure knows no JWT type.
                AuthType::Sas | AuthType::Jwt => "sas",
                AuthType::SelfSigned => "selfSigned",
                AuthType::CertificateAuthority => "certificateAuthority",
            }
            .into(),
        ),
    );
    let thumbprint = &device.authentication.x509_thumbprint;
    out.insert(
        "x509Thumbprint".into(),
        json!({
            "primaryThumbprint": thumbprint.primary_thumbprint,
            "secondaryThumbprint": thumbprint.secondary_thumbprint,
        }),
    );
    // No Plug and Play model is registered for a device through the service API, and
    // there are no IoT Edge devices: Azure's values for a plain device.
    out.insert("modelId".into(), Value::String(String::new()));
    out.insert("capabilities".into(), json!({ "iotEdge": false }));
    out
}

/// The REST twin document.
pub fn twin_json(
    device: &Device,
    twin: &TwinDocument,
    presence: &crate::registry::Presence,
) -> Value {
    let mut out = Map::new();
    out.insert(
        "deviceId".into(),
        Value::String(device.device_id.to_string()),
    );
    out.insert("etag".into(), Value::String(etag(twin)));
    out.insert("version".into(), Value::from(twin.version));
    out.extend(device_fields(device, presence));
    out.insert("tags".into(), Value::Object(twin.tags.clone()));
    out.insert(
        "properties".into(),
        json!({ "desired": twin.desired.to_json(true), "reported": twin.reported.to_json(true) }),
    );
    Value::Object(out)
}

/// One page of query results.
#[derive(Debug, Clone)]
pub struct QueryPage {
    /// The results.
    pub items: Vec<Value>,
    /// How many results to skip for the next page, when there is one.
    pub next_skip: Option<usize>,
}

/// What a query page holds before documents are built.
#[derive(Debug, Clone)]
pub enum QueryOutput {
    /// Finished rows: projections or aggregates.
    Rows(Vec<Value>),
    /// `SELECT *`: the devices whose whole twin documents are the results.
    Devices(Vec<DeviceId>),
}

/// How long one query may scan before it is stopped.
pub const QUERY_TIME_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);
/// Queries that scan at once; more wait for a slot (each scan holds a blocking thread).
const CONCURRENT_QUERIES: usize = 2;
/// Rows scanned between two looks at the clock.
const ROWS_PER_CLOCK_CHECK: usize = 256;

/// A query ran past its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlinePassed;

/// Runs `query` over `twins` (sorted by id), returning results `skip..skip + limit`
/// and the skip of the next page, if any, or [`DeadlinePassed`] once the scan runs
/// past `deadline`. `devices` holds the registry records when the query filters on
/// registry fields.
pub fn execute(
    query: &query::Query,
    twins: &[(DeviceId, Arc<TwinDocument>)],
    devices: &HashMap<DeviceId, Device>,
    presence: &crate::registry::Presence,
    skip: usize,
    limit: usize,
    deadline: std::time::Instant,
) -> Result<(QueryOutput, Option<usize>), DeadlinePassed> {
    let late = std::cell::Cell::new(false);
    let rows = twins
        .iter()
        .enumerate()
        .take_while(|(scanned, _)| {
            if scanned % ROWS_PER_CLOCK_CHECK == ROWS_PER_CLOCK_CHECK - 1
                && std::time::Instant::now() >= deadline
            {
                late.set(true);
            }
            !late.get()
        })
        .map(|(_, (id, twin))| TwinRow {
            id,
            twin,
            device: devices.get(id),
            presence,
        });
    let matching = rows.filter(|row| query::matches(query, row));
    let top = query.top.unwrap_or(usize::MAX);
    if query.is_aggregate() {
        let collected: Vec<TwinRow<'_>> = matching.collect();
        if late.get() {
            return Err(DeadlinePassed);
        }
        let results = query::aggregate(query, collected.iter().map(|r| r as &dyn query::Row));
        let total = results.len().min(top);
        let items: Vec<Value> = results
            .into_iter()
            .take(total)
            .skip(skip)
            .take(limit)
            .collect();
        let next = (skip + items.len() < total).then_some(skip + items.len());
        return Ok((QueryOutput::Rows(items), next));
    }
    let page: Vec<TwinRow<'_>> = matching.take(top).skip(skip).take(limit + 1).collect();
    if late.get() {
        return Err(DeadlinePassed);
    }
    let next = (page.len() > limit).then_some(skip + limit);
    let page = page.into_iter().take(limit);
    let output = match &query.selection {
        query::Selection::All => QueryOutput::Devices(page.map(|row| row.id.clone()).collect()),
        query::Selection::Items(selected) => {
            QueryOutput::Rows(page.map(|row| query::project(selected, &row)).collect())
        }
    };
    Ok((output, next))
}

impl Twins {
    /// Runs `query`, returning results `skip..skip + limit`.
    pub async fn query(
        &self,
        query: &query::Query,
        skip: usize,
        limit: usize,
    ) -> Result<QueryPage, TwinError> {
        let needs_devices = query
            .paths()
            .iter()
            .any(|p| p.len() == 1 && DEVICE_FIELDS.contains(&p[0].as_str()));
        let mut devices: HashMap<DeviceId, Device> = HashMap::new();
        if needs_devices {
            let mut after = None;
            loop {
                let page = self.inner.registry.list(after.as_ref(), 1000).await?;
                devices.extend(page.devices.into_iter().map(|d| (d.device_id.clone(), d)));
                match page.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        let presence = self.inner.registry.presence();
        // The scan is CPU-bound and its length is the caller's choice: it runs on the
        // blocking pool, a few at a time, and stops at its time budget.
        let _slot = self
            .inner
            .query_slots
            .acquire()
            .await
            .map_err(|_| TwinError::Store("the twin service is shutting down".into()))?;
        let scan = {
            let query = query.clone();
            let snapshot = self.snapshot();
            let presence = presence.clone();
            let deadline = std::time::Instant::now() + QUERY_TIME_BUDGET;
            tokio::task::spawn_blocking(move || {
                let result = execute(
                    &query, &snapshot, &devices, &presence, skip, limit, deadline,
                );
                (result, devices)
            })
        };
        let (result, mut devices) = scan
            .await
            .map_err(|err| TwinError::Store(format!("query task failed: {err}")))?;
        let (output, next_skip) = result.map_err(|DeadlinePassed| {
            tracing::info!(budget = ?QUERY_TIME_BUDGET, "query stopped at its time budget");
            TwinError::QueryBudget(QUERY_TIME_BUDGET)
        })?;
        let items = match output {
            QueryOutput::Rows(rows) => rows,
            QueryOutput::Devices(ids) => {
                let mut items = Vec::with_capacity(ids.len());
                for id in ids {
                    let device = match devices.remove(&id) {
                        Some(device) => device,
                        None => match self.inner.registry.get(&id).await {
                            Ok(device) => device,
                            // Deleted since the snapshot.
                            Err(RegistryError::NotFound(_)) => continue,
                            Err(err) => return Err(err.into()),
                        },
                    };
                    items.push(twin_json(&device, &self.twin_of(&id), presence));
                }
                items
            }
        };
        Ok(QueryPage { items, next_skip })
    }
}

fn check_etag(twin: &TwinDocument, if_match: Option<&IfMatch>) -> Result<(), TwinError> {
    match if_match {
        Some(IfMatch::Etag(expected)) if *expected != etag(twin) => {
            Err(TwinError::EtagMismatch(etag(twin)))
        }
        _ => Ok(()),
    }
}

type Sections = (Option<Map<String, Value>>, Option<Map<String, Value>>);

/// Splits a service body `{tags, properties: {desired}}` into its sections.
fn service_sections(body: Value) -> Result<Sections, TwinError> {
    let Value::Object(mut body) = body else {
        return Err(TwinError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    };
    let object = |value: Value, what: &'static str| match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(TwinError::Invalid(PatchError::NotAnObject {
            section: what,
        })),
    };
    let tags = body.remove("tags").map(|v| object(v, "tags")).transpose()?;
    let desired = match body.remove("properties") {
        None | Some(Value::Null) => None,
        Some(Value::Object(mut properties)) => {
            if properties.contains_key("reported") {
                return Err(TwinError::BadRequest(
                    "properties.reported is written by the device, not the service".into(),
                ));
            }
            properties
                .remove("desired")
                .map(|v| object(v, "desired"))
                .transpose()?
        }
        Some(_) => {
            return Err(TwinError::Invalid(PatchError::NotAnObject {
                section: "properties",
            }));
        }
    };
    Ok((tags, desired))
}

/// Keeps one twin per registered device: a new device gets a fresh twin, a deleted
/// one loses its twin (so a device re-created under the id starts afresh).
struct FollowRegistry(std::sync::Weak<Inner>);

impl RegistryObserver for FollowRegistry {
    fn created(&self, id: &DeviceId) {
        if let Some(inner) = self.0.upgrade() {
            let epoch = inner.next_epoch();
            inner.lock().entry(id.clone()).or_insert_with(|| Cached {
                twin: Arc::new(TwinDocument::new()),
                revision: 0,
                epoch,
            });
            inner.store.created(id);
        }
    }

    fn deleted(&self, id: &DeviceId) {
        if let Some(inner) = self.0.upgrade() {
            let known = inner.lock().remove(id).map_or(0, |cached| cached.revision);
            inner.store.deleted(id, known);
        }
    }
}

#[async_trait]
impl TwinRequests for Twins {
    async fn request(&self, device: &DeviceId, op: TwinOp) -> TwinReply {
        match op {
            TwinOp::Get => TwinReply {
                status: 200,
                body: Bytes::from(self.current(device).await.device_view().to_string()),
                version: None,
            },
            TwinOp::PatchReported(patch) => match self.patch_reported(device, &patch).await {
                Ok(version) => TwinReply {
                    status: 204,
                    body: Bytes::new(),
                    version: Some(version),
                },
                Err(err @ (TwinError::Invalid(_) | TwinError::BadRequest(_))) => {
                    TwinReply::error(400, twin_error_code::INVALID, &err.to_string())
                }
                // Lost the race against other writers too often: the device may
                // simply try again, which is what a 429 tells Azure's SDKs.
                Err(err @ TwinError::Contended(_)) => {
                    TwinReply::error(429, twin_error_code::THROTTLED, &err.to_string())
                }
                Err(err) => {
                    tracing::warn!(%device, error = %err, "reported patch failed");
                    TwinReply::error(
                        500,
                        twin_error_code::INTERNAL,
                        "the twin could not be stored",
                    )
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_past_its_deadline_stops_instead_of_finishing() {
        let twins: Vec<(DeviceId, Arc<TwinDocument>)> = (0..10_000)
            .map(|i| {
                let id = DeviceId::parse(&format!("d{i:05}")).expect("valid id");
                (id, Arc::new(TwinDocument::new()))
            })
            .collect();
        let presence = crate::registry::Presence::default();
        let devices = HashMap::new();
        let count = query::parse("SELECT COUNT() AS n FROM devices").expect("parses");
        let past = std::time::Instant::now();
        assert_eq!(
            execute(&count, &twins, &devices, &presence, 0, 100, past).map(|_| ()),
            Err(DeadlinePassed)
        );
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let Ok((QueryOutput::Rows(rows), None)) =
            execute(&count, &twins, &devices, &presence, 0, 100, later)
        else {
            panic!("the count finishes in time")
        };
        assert_eq!(rows, vec![json!({"n": 10_000})]);
    }
}
