//! Device twins (DESIGN sections 2–3): one document per registered device with
//! tags, desired and reported properties, their versions and `$metadata`.
//!
//! The twins of all devices live in memory (the authoritative copy for reads and
//! queries) and are written behind to the store by a group committer: a change is
//! applied in memory under the twin lock, queued, and committed in a batch with
//! others; only then does the caller get its answer (REST 200, device 204) and the
//! device its desired-property push. If a commit fails, every queued change is
//! refused and the twins are reloaded from the store, so memory never keeps a change
//! the store lost.

pub mod document;
pub mod query;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::gateway::connections::Connections;
use crate::gateway::services::{TwinReply, TwinRequests};
use crate::gateway::session::{Outbound, TwinOp};
use crate::gateway::topic::{self, Subscription};
use crate::registry::{Device, DeviceId, IfMatch, Registry, RegistryError, RegistryObserver};
use crate::store::StoreError;
use document::{PatchError, TwinDocument, TwinLimits};

/// Where twins are stored. Called from the committer's blocking thread.
pub trait TwinStore: Send + Sync + 'static {
    /// Every stored twin.
    fn load_all(&self) -> Result<Vec<(DeviceId, TwinDocument)>, StoreError>;
    /// Writes a batch of twins in one durable transaction.
    fn write_batch(&self, twins: &[(DeviceId, TwinDocument)]) -> Result<(), StoreError>;
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

/// The twin etag: changes with every twin change.
pub fn etag(twin: &TwinDocument) -> String {
    STANDARD_NO_PAD.encode(twin.version.to_string())
}

struct Write {
    device: DeviceId,
    twin: TwinDocument,
    done: oneshot::Sender<Result<(), String>>,
}

struct Inner {
    twins: Mutex<HashMap<DeviceId, Arc<TwinDocument>>>,
    queue: mpsc::UnboundedSender<Write>,
    registry: Registry,
    connections: Connections,
    limits: TwinLimits,
    /// Bounds the queries scanning at once.
    query_slots: tokio::sync::Semaphore,
}

/// The twin service.
#[derive(Clone)]
pub struct Twins {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Twins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twins").finish_non_exhaustive()
    }
}

/// Most twin changes committed in one transaction.
const MAX_BATCH: usize = 1024;

impl Twins {
    /// Loads every twin from `store` (and a new one for every registered device that
    /// never had a change) and starts the committer.
    pub async fn start(
        store: Arc<dyn TwinStore>,
        registry: Registry,
        connections: Connections,
        limits: TwinLimits,
    ) -> Result<Self, TwinError> {
        let loader = Arc::clone(&store);
        let stored = tokio::task::spawn_blocking(move || loader.load_all())
            .await
            .map_err(|err| TwinError::Store(err.to_string()))?
            .map_err(|err| TwinError::Store(err.to_string()))?;
        let mut twins: HashMap<DeviceId, Arc<TwinDocument>> = HashMap::new();
        let mut after = None;
        loop {
            let page = registry.list(after.as_ref(), 1000).await?;
            for device in &page.devices {
                twins.insert(device.device_id.clone(), Arc::new(TwinDocument::new()));
            }
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        // A stored twin of a device that no longer exists is dropped.
        for (id, twin) in stored {
            if let Some(slot) = twins.get_mut(&id) {
                *slot = Arc::new(twin);
            }
        }
        let (queue, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            twins: Mutex::new(twins),
            queue,
            registry: registry.clone(),
            connections,
            limits,
            query_slots: tokio::sync::Semaphore::new(CONCURRENT_QUERIES),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("twin-committer".into())
            .spawn(move || commit_loop(store, rx, weak))
            .map_err(|err| TwinError::Store(format!("cannot start the twin committer: {err}")))?;
        registry.observe(Arc::new(FollowRegistry(Arc::downgrade(&inner))));
        Ok(Self { inner })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Arc<TwinDocument>>> {
        self.inner.lock()
    }

    /// Every twin, sorted by device id (cheap: the documents are shared).
    pub fn snapshot(&self) -> Vec<(DeviceId, Arc<TwinDocument>)> {
        let mut all: Vec<(DeviceId, Arc<TwinDocument>)> = self
            .lock()
            .iter()
            .map(|(id, t)| (id.clone(), Arc::clone(t)))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The twin of `id` (a new one if the device never had a change).
    pub fn twin_of(&self, id: &DeviceId) -> TwinDocument {
        self.lock()
            .get(id)
            .map(|t| (**t).clone())
            .unwrap_or_default()
    }

    /// The REST view of `id`'s twin.
    pub async fn get(&self, id: &DeviceId) -> Result<TwinView, TwinError> {
        let device = self.device(id).await?;
        Ok(TwinView {
            twin: self.twin_of(id),
            device,
        })
    }

    async fn device(&self, id: &DeviceId) -> Result<Device, TwinError> {
        match self.inner.registry.get(id).await {
            Ok(device) => Ok(device),
            Err(RegistryError::NotFound(_)) => Err(TwinError::NotFound(id.clone())),
            Err(err) => Err(err.into()),
        }
    }

    /// Applies `change` to `id`'s twin in memory and commits it; the caller gets the
    /// result once durable. `change` returns the desired patch to push, if any.
    async fn change(
        &self,
        id: &DeviceId,
        change: impl FnOnce(&mut TwinDocument, &str) -> Result<Option<Value>, TwinError>,
    ) -> Result<TwinDocument, TwinError> {
        let now = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let (done, committed) = oneshot::channel();
        let (twin, push) = {
            let mut twins = self.lock();
            let mut twin = twins.get(id).map(|t| (**t).clone()).unwrap_or_default();
            let push = change(&mut twin, &now)?;
            twin.version += 1;
            // Queued under the lock, so the committer sees changes in the order they
            // were made.
            self.inner
                .queue
                .send(Write {
                    device: id.clone(),
                    twin: twin.clone(),
                    done,
                })
                .map_err(|_| TwinError::Store("twin committer stopped".into()))?;
            twins.insert(id.clone(), Arc::new(twin.clone()));
            (twin, push)
        };
        committed
            .await
            .map_err(|_| TwinError::Store("twin committer stopped".into()))?
            .map_err(TwinError::Store)?;
        if let Some(patch) = push {
            self.push_desired(id, twin.desired.version, patch);
        }
        Ok(twin)
    }

    fn push_desired(&self, id: &DeviceId, version: u64, mut patch: Value) {
        if let Value::Object(map) = &mut patch {
            map.insert("$version".into(), Value::from(version));
        }
        let message = Outbound {
            topic: topic::desired_patch(version),
            payload: Bytes::from(patch.to_string()),
            qos: QoS::AtLeastOnce,
            requires: Some(Subscription::DesiredPatches),
            id: 0,
        };
        // Not connected or not subscribed: the device GETs the twin when it comes back.
        let _ = self.inner.connections.deliver(id, message);
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
            .change(id, |twin, now| {
                check_etag(twin, if_match.as_ref())?;
                if let Some(tags) = &tags {
                    twin.patch_tags(tags, limits)?;
                }
                match desired {
                    Some(desired) => {
                        twin.desired.apply("desired", &desired, now, true, limits)?;
                        Ok(Some(Value::Object(desired)))
                    }
                    None => Ok(None),
                }
            })
            .await?;
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
        let twin = self
            .change(id, |twin, now| {
                check_etag(twin, if_match.as_ref())?;
                let tags = tags.unwrap_or_default();
                let mut replaced = TwinDocument {
                    tags: Map::new(),
                    ..twin.clone()
                };
                replaced.patch_tags(&tags, limits)?;
                let desired = desired.unwrap_or_default();
                replaced
                    .desired
                    .replace("desired", desired, now, true, limits)?;
                *twin = replaced;
                // A device sees the whole new desired section.
                Ok(Some(Value::Object(twin.desired.properties.clone())))
            })
            .await?;
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
            .change(id, |twin, now| {
                twin.reported
                    .apply("reported", &patch, now, false, limits)?;
                Ok(None)
            })
            .await?;
        Ok(twin.reported.version)
    }
}

/// Registry fields a query may filter on.
const DEVICE_FIELDS: [&str; 5] = [
    "status",
    "statusReason",
    "connectionState",
    "lastActivityTime",
    "generationId",
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

fn commit_loop(
    store: Arc<dyn TwinStore>,
    mut rx: mpsc::UnboundedReceiver<Write>,
    inner: std::sync::Weak<Inner>,
) {
    let mut batch: Vec<Write> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let rows = match inner.upgrade() {
            Some(inner) => rows_to_write(&batch, &inner.lock()),
            None => return,
        };
        match store.write_batch(&rows) {
            Ok(()) => {
                for write in batch.drain(..) {
                    let _ = write.done.send(Ok(()));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "twin commit failed; refusing queued changes and reloading");
                let message = err.to_string();
                for write in batch.drain(..) {
                    let _ = write.done.send(Err(message.clone()));
                }
                let Some(inner) = inner.upgrade() else { return };
                // Under the twin lock nothing new is queued: refuse what is queued
                // (it was built on the lost change), then reload the durable state.
                let mut twins = inner.lock();
                while let Ok(write) = rx.try_recv() {
                    let _ = write.done.send(Err(message.clone()));
                }
                match store.load_all() {
                    Ok(stored) => {
                        let stored: HashMap<DeviceId, TwinDocument> = stored.into_iter().collect();
                        for (id, twin) in twins.iter_mut() {
                            *twin = Arc::new(stored.get(id).cloned().unwrap_or_default());
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "cannot reload twins after a failed commit")
                    }
                }
            }
        }
    }
}

/// The rows a batch writes: the last change of each device in the batch (it carries
/// the earlier ones), unless the device was deleted meanwhile (no twin in memory) or
/// deleted and created again (its twin in memory is older than the queued change):
/// a late write must not bring back a deleted device's twin.
fn rows_to_write(
    batch: &[Write],
    twins: &HashMap<DeviceId, Arc<TwinDocument>>,
) -> Vec<(DeviceId, TwinDocument)> {
    let mut latest: HashMap<&DeviceId, &TwinDocument> = HashMap::new();
    for write in batch {
        latest.insert(&write.device, &write.twin);
    }
    latest
        .into_iter()
        .filter(|(id, twin)| {
            twins
                .get(*id)
                .is_some_and(|current| current.version >= twin.version)
        })
        .map(|(id, twin)| (id.clone(), twin.clone()))
        .collect()
}

/// Keeps one twin per registered device: a new device gets a fresh twin, a deleted
/// one loses its twin (so a device re-created under the id starts afresh).
struct FollowRegistry(std::sync::Weak<Inner>);

impl RegistryObserver for FollowRegistry {
    fn created(&self, id: &DeviceId) {
        if let Some(inner) = self.0.upgrade() {
            inner
                .lock()
                .entry(id.clone())
                .or_insert_with(|| Arc::new(TwinDocument::new()));
        }
    }

    fn deleted(&self, id: &DeviceId) {
        if let Some(inner) = self.0.upgrade() {
            inner.lock().remove(id);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, Arc<TwinDocument>>> {
        self.twins.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl TwinRequests for Twins {
    async fn request(&self, device: &DeviceId, op: TwinOp) -> TwinReply {
        match op {
            TwinOp::Get => TwinReply {
                status: 200,
                body: Bytes::from(self.twin_of(device).device_view().to_string()),
                version: None,
            },
            TwinOp::PatchReported(patch) => match self.patch_reported(device, &patch).await {
                Ok(version) => TwinReply {
                    status: 204,
                    body: Bytes::new(),
                    version: Some(version),
                },
                Err(err @ (TwinError::Invalid(_) | TwinError::BadRequest(_))) => TwinReply {
                    status: 400,
                    body: Bytes::from(json!({ "message": err.to_string() }).to_string()),
                    version: None,
                },
                Err(err) => {
                    tracing::warn!(%device, error = %err, "reported patch failed");
                    TwinReply {
                        status: 500,
                        body: Bytes::from(
                            json!({ "message": "the twin could not be stored" }).to_string(),
                        ),
                        version: None,
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: &str, version: u64) -> Write {
        let (done, _) = oneshot::channel();
        Write {
            device: DeviceId::parse(id).unwrap(),
            twin: TwinDocument {
                version,
                ..TwinDocument::new()
            },
            done,
        }
    }

    fn cache(entries: &[(&str, u64)]) -> HashMap<DeviceId, Arc<TwinDocument>> {
        entries
            .iter()
            .map(|(id, version)| {
                let twin = TwinDocument {
                    version: *version,
                    ..TwinDocument::new()
                };
                (DeviceId::parse(id).unwrap(), Arc::new(twin))
            })
            .collect()
    }

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

    #[test]
    fn a_batch_writes_each_twins_last_change_and_never_a_deleted_one() {
        let batch = [
            write("a", 2),
            write("a", 3),
            write("gone", 5),
            write("reborn", 9),
        ];
        // "gone" was deleted; "reborn" was deleted and created again (fresh twin, v1).
        let twins = cache(&[("a", 3), ("reborn", 1)]);
        let rows = rows_to_write(&batch, &twins);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0.as_str(), "a");
        assert_eq!(rows[0].1.version, 3);
    }
}
