//! The embedded backend: one redb database (`DIR/hub.redb`) holding every capability's
//! tables. Values are JSON so records can gain fields without a migration; a `meta`
//! table records the schema version and refuses files from a newer hub.
//!
//! redb calls block (a commit is an fsync), so every operation runs on tokio's
//! blocking pool.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::commands::c2d::{
    C2dMessage, CommandStore, EnqueueError, FeedbackLock, FeedbackRecord, FeedbackStatus, Removed,
};
use crate::delivery::{SessionStore, StoredSession};
use crate::registry::{Device, DeviceId, RegistryStore, RegistryStoreError};
use crate::storage::{StoreError, StoreHealth};
use crate::telemetry::CheckpointStore;
use crate::twins::document::TwinDocument;

/// Schema version this build writes; a file with a higher one is refused, a file with
/// a lower one is migrated at open. 2: the C2D expiry index (`c2d_expiry`).
const SCHEMA_VERSION: u64 = 2;

/// redb's page cache (reads, and the write buffer within half of it). redb's default
/// is 1 GiB, kept until full: every page ever read stays, so the start-up scans of the
/// registry and the twins made the whole database resident, ~0.7 KiB per registered
/// device (issue 28). The registry and the twins keep their own in-memory copies, so
/// redb's cache serves writes and the few reads they miss; 4 MiB holds the upper
/// levels of every table.
const PAGE_CACHE_BYTES: usize = 4 << 20;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Cloud-to-device queues: `{device}\0{seq, 20 digits}` → JSON message.
const C2D: TableDefinition<&str, &[u8]> = TableDefinition::new("c2d");
/// The C2D expiry index: (expiry as Unix nanoseconds, device, seq) → (). Written in
/// the same transaction as the queue entry, so the sweep reads only what is due.
const C2D_EXPIRY: TableDefinition<(i128, &str, u64), ()> = TableDefinition::new("c2d_expiry");
/// Feedback records: sequence → JSON record.
const FEEDBACK: TableDefinition<u64, &[u8]> = TableDefinition::new("feedback");
/// Device twins: device id → JSON twin document.
const TWINS: TableDefinition<&str, &[u8]> = TableDefinition::new("twins");
/// Consumer-group checkpoints: `{partition}/{group}` → next offset to read.
const CHECKPOINTS: TableDefinition<&str, u64> = TableDefinition::new("checkpoints");
/// MQTT sessions of CleanSession=0 devices: device id → JSON list of subscriptions.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// The embedded redb store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    /// Feedback batches handed out and not yet acknowledged: token → (record keys,
    /// lock end). In memory: one process serves this store, and a lock that a restart
    /// forgets only offers its records again sooner.
    feedback_locks: Arc<Mutex<FeedbackLocks>>,
}

type FeedbackLocks = HashMap<String, (Vec<u64>, Instant)>;

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the database at `path` and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        let db = Database::builder()
            .set_cache_size(PAGE_CACHE_BYTES)
            .create(path)
            .map_err(|err| open_err(err.to_string()))?;
        let txn = db.begin_write().map_err(|err| open_err(err.to_string()))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|err| open_err(err.to_string()))?;
            let stored = meta
                .get("schema_version")
                .map_err(|err| open_err(err.to_string()))?
                .map(|v| v.value());
            match stored {
                Some(version) if version > SCHEMA_VERSION => {
                    return Err(open_err(format!(
                        "schema version {version} is newer than this hub's {SCHEMA_VERSION}"
                    )));
                }
                // Schema 1 had no expiry index: build it from the queues, in the
                // transaction that records the new version.
                Some(version) if version < 2 => {
                    index_expiries(&txn).map_err(|err| open_err(err.to_string()))?;
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|err| open_err(err.to_string()))?;
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|err| open_err(err.to_string()))?;
                }
            }
            txn.open_table(DEVICES)
                .map_err(|err| open_err(err.to_string()))?;
            txn.open_table(SESSIONS)
                .map_err(|err| open_err(err.to_string()))?;
            txn.open_table(CHECKPOINTS)
                .map_err(|err| open_err(err.to_string()))?;
            txn.open_table(TWINS)
                .map_err(|err| open_err(err.to_string()))?;
            txn.open_table(C2D)
                .map_err(|err| open_err(err.to_string()))?;
            txn.open_table(FEEDBACK)
                .map_err(|err| open_err(err.to_string()))?;
            txn.open_table(C2D_EXPIRY)
                .map_err(|err| open_err(err.to_string()))?;
        }
        txn.commit().map_err(|err| open_err(err.to_string()))?;
        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
            feedback_locks: Arc::default(),
        })
    }

    /// The database, for the backend's other tables (provisioning).
    pub(crate) fn database(&self) -> Arc<Database> {
        Arc::clone(&self.db)
    }

    async fn blocking<T, E>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(|err| E::from(StoreError::Task(err.to_string())))?
    }
}

fn encode(device: &Device) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(device).map_err(|err| StoreError::Corrupt {
        table: "devices",
        key: device.device_id.to_string(),
        reason: err.to_string(),
    })
}

fn decode(key: &str, bytes: &[u8]) -> Result<Device, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
        table: "devices",
        key: key.to_string(),
        reason: err.to_string(),
    })
}

/// Reads the version of the stored device `id` inside a write transaction.
fn stored_version(table: &redb::Table<&str, &[u8]>, id: &str) -> Result<Option<u64>, StoreError> {
    match table.get(id)? {
        Some(bytes) => Ok(Some(decode(id, bytes.value())?.version)),
        None => Ok(None),
    }
}

#[async_trait]
impl StoreHealth for EmbeddedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            txn.open_table(META)?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl RegistryStore for EmbeddedStore {
    async fn insert(&self, device: Device) -> Result<Device, RegistryStoreError> {
        self.blocking(move |db| {
            let bytes = encode(&device)?;
            let txn = db.begin_write().map_err(StoreError::from)?;
            {
                let mut table = txn.open_table(DEVICES).map_err(StoreError::from)?;
                if table
                    .get(device.device_id.as_str())
                    .map_err(StoreError::from)?
                    .is_some()
                {
                    return Err(RegistryStoreError::AlreadyExists);
                }
                table
                    .insert(device.device_id.as_str(), bytes.as_slice())
                    .map_err(StoreError::from)?;
            }
            txn.commit().map_err(StoreError::from)?;
            Ok(device)
        })
        .await
    }

    async fn get(&self, id: &DeviceId) -> Result<Option<Device>, RegistryStoreError> {
        let id = id.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(StoreError::from)?;
            let table = txn.open_table(DEVICES).map_err(StoreError::from)?;
            let found = table.get(id.as_str()).map_err(StoreError::from)?;
            Ok(found
                .map(|bytes| decode(id.as_str(), bytes.value()))
                .transpose()?)
        })
        .await
    }

    async fn replace(
        &self,
        device: Device,
        expected_version: u64,
    ) -> Result<Device, RegistryStoreError> {
        self.blocking(move |db| {
            let bytes = encode(&device)?;
            let txn = db.begin_write().map_err(StoreError::from)?;
            {
                let mut table = txn.open_table(DEVICES).map_err(StoreError::from)?;
                match stored_version(&table, device.device_id.as_str())? {
                    None => return Err(RegistryStoreError::NotFound),
                    Some(version) if version != expected_version => {
                        return Err(RegistryStoreError::VersionConflict);
                    }
                    Some(_) => {}
                }
                table
                    .insert(device.device_id.as_str(), bytes.as_slice())
                    .map_err(StoreError::from)?;
            }
            txn.commit().map_err(StoreError::from)?;
            Ok(device)
        })
        .await
    }

    async fn remove(
        &self,
        id: &DeviceId,
        expected_version: Option<u64>,
    ) -> Result<crate::registry::Removed, RegistryStoreError> {
        let id = id.clone();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(StoreError::from)?;
            let removed = {
                let mut table = txn.open_table(DEVICES).map_err(StoreError::from)?;
                let current = match table.get(id.as_str()).map_err(StoreError::from)? {
                    Some(bytes) => decode(id.as_str(), bytes.value())?,
                    None => return Err(RegistryStoreError::NotFound),
                };
                if expected_version.is_some_and(|v| v != current.version) {
                    return Err(RegistryStoreError::VersionConflict);
                }
                table.remove(id.as_str()).map_err(StoreError::from)?;
                // The device's twin, queued messages and MQTT session go with it.
                drop_queue(&txn, &id)?;
                txn.open_table(TWINS)
                    .map_err(StoreError::from)?
                    .remove(id.as_str())
                    .map_err(StoreError::from)?;
                txn.open_table(SESSIONS)
                    .map_err(StoreError::from)?
                    .remove(id.as_str())
                    .map_err(StoreError::from)?;
                current
            };
            txn.commit().map_err(StoreError::from)?;
            Ok(crate::registry::Removed {
                version: removed.version,
                device: removed,
            })
        })
        .await
    }

    async fn list(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Device>, RegistryStoreError> {
        let after = after.cloned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(StoreError::from)?;
            let table = txn.open_table(DEVICES).map_err(StoreError::from)?;
            let lower = match &after {
                Some(id) => Bound::Excluded(id.as_str()),
                None => Bound::Unbounded,
            };
            let mut devices = Vec::new();
            for entry in table
                .range::<&str>((lower, Bound::Unbounded))
                .map_err(StoreError::from)?
                .take(limit)
            {
                let (key, value) = entry.map_err(StoreError::from)?;
                devices.push(decode(key.value(), value.value())?);
            }
            Ok(devices)
        })
        .await
    }
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn load(&self, device: &DeviceId) -> Result<Option<StoredSession>, StoreError> {
        // A point read of a small record from redb's page cache: cheaper inline than a
        // hop to the blocking pool on every CONNECT.
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SESSIONS)?;
        let Some(bytes) = table.get(device.as_str())? else {
            return Ok(None);
        };
        StoredSession::decode(bytes.value())
            .map(Some)
            .map_err(|err| StoreError::Corrupt {
                table: "sessions",
                key: device.to_string(),
                reason: err.to_string(),
            })
    }

    async fn save(&self, device: &DeviceId, session: &StoredSession) -> Result<(), StoreError> {
        let id = device.clone();
        let bytes = serde_json::to_vec(session).map_err(|err| StoreError::Corrupt {
            table: "sessions",
            key: id.to_string(),
            reason: err.to_string(),
        })?;
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(SESSIONS)?
                .insert(id.as_str(), bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn remove(&self, device: &DeviceId) -> Result<(), StoreError> {
        // Most CleanSession=1 connects have no stored session: an inline read answers
        // that without a durable write (which would serialise every connect on redb's
        // single writer and an fsync).
        let exists = self
            .db
            .begin_read()?
            .open_table(SESSIONS)?
            .get(device.as_str())?
            .is_some();
        if !exists {
            return Ok(());
        }
        let id = device.clone();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(SESSIONS)?.remove(id.as_str())?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl CheckpointStore for EmbeddedStore {
    async fn checkpoint(&self, group: &str, partition: u32) -> Result<Option<u64>, StoreError> {
        let key = format!("{partition}/{group}");
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(CHECKPOINTS)?;
            Ok(table.get(key.as_str())?.map(|v| v.value()))
        })
        .await
    }

    async fn set_checkpoint(
        &self,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StoreError> {
        let key = format!("{partition}/{group}");
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(CHECKPOINTS)?.insert(key.as_str(), offset)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

fn queue_range(device: &DeviceId) -> (String, String) {
    (format!("{device}\u{0}"), format!("{device}\u{1}"))
}

fn queue_key(device: &DeviceId, seq: u64) -> String {
    format!("{device}\u{0}{seq:020}")
}

/// The sequence number in a queue key.
fn seq_of(key: &str) -> Option<u64> {
    key.rsplit('\u{0}').next().and_then(|s| s.parse().ok())
}

/// A message's entry in the expiry index.
fn expiry_key<'a>(device: &'a str, message: &C2dMessage) -> (i128, &'a str, u64) {
    (message.expiry.unix_timestamp_nanos(), device, message.seq)
}

fn corrupt(table: &'static str, key: String, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        key,
        reason: err.to_string(),
    }
}

fn decode_message(key: &str, bytes: &[u8]) -> Result<C2dMessage, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("c2d", key.to_string(), e))
}

/// Builds the expiry index of a queue table written before it existed (schema 1).
fn index_expiries(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let queue = txn.open_table(C2D)?;
    let mut index = txn.open_table(C2D_EXPIRY)?;
    for entry in queue.iter()? {
        let (key, value) = entry?;
        let key = key.value();
        let message = decode_message(key, value.value())?;
        let device = key
            .split('\u{0}')
            .next()
            .ok_or_else(|| corrupt("c2d", key.to_string(), "no device in the key"))?;
        index.insert(expiry_key(device, &message), ())?;
    }
    Ok(())
}

/// A write transaction's view of the queues: the messages, their expiry index and
/// the feedback log, kept consistent by going through these methods only.
struct QueueTables<'txn> {
    queue: redb::Table<'txn, &'static str, &'static [u8]>,
    expiry: redb::Table<'txn, (i128, &'static str, u64), ()>,
    feedback: redb::Table<'txn, u64, &'static [u8]>,
}

impl<'txn> QueueTables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            queue: txn.open_table(C2D)?,
            expiry: txn.open_table(C2D_EXPIRY)?,
            feedback: txn.open_table(FEEDBACK)?,
        })
    }

    /// Removes message `seq` of `device` (and its index entry); `None` when it is not
    /// queued.
    fn remove(&mut self, device: &DeviceId, seq: u64) -> Result<Option<C2dMessage>, StoreError> {
        let key = queue_key(device, seq);
        let message = match self.queue.remove(key.as_str())? {
            Some(value) => decode_message(&key, value.value())?,
            None => return Ok(None),
        };
        self.expiry.remove(expiry_key(device.as_str(), &message))?;
        Ok(Some(message))
    }

    /// Removes messages `seqs` with a feedback record of `status` where asked.
    fn finish(
        &mut self,
        device: &DeviceId,
        seqs: impl IntoIterator<Item = u64>,
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError> {
        let mut removed = Removed::default();
        let mut records = Vec::new();
        for seq in seqs {
            if let Some(message) = self.remove(device, seq)? {
                removed.messages += 1;
                records.extend(message.feedback(device, status, status.description()));
            }
        }
        removed.feedback = records.len();
        self.append_feedback(&records)?;
        Ok(removed)
    }

    fn append_feedback(&mut self, records: &[FeedbackRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let first = self.feedback.last()?.map_or(0, |(k, _)| k.value()) + 1;
        for (key, record) in (first..).zip(records) {
            let bytes =
                serde_json::to_vec(record).map_err(|e| corrupt("feedback", key.to_string(), e))?;
            self.feedback.insert(key, bytes.as_slice())?;
        }
        Ok(())
    }

    /// Sequence numbers of `device`'s queued messages (keys only, no values read).
    fn seqs(&self, device: &DeviceId) -> Result<Vec<u64>, StoreError> {
        let (from, to) = queue_range(device);
        let mut seqs = Vec::new();
        for entry in self.queue.range::<&str>(from.as_str()..to.as_str())? {
            let (key, _) = entry?;
            let key = key.value();
            seqs.push(seq_of(key).ok_or_else(|| corrupt("c2d", key.to_string(), "bad key"))?);
        }
        Ok(seqs)
    }
}

/// Deletes `device`'s queue and its index entries inside `txn` (the device is going).
fn drop_queue(txn: &redb::WriteTransaction, device: &DeviceId) -> Result<(), StoreError> {
    let mut tables = QueueTables::open(txn)?;
    for seq in tables.seqs(device)? {
        tables.remove(device, seq)?;
    }
    Ok(())
}

/// The C2D queues, synchronously: the [`CommandStore`] implementation runs these on
/// the blocking pool; benchmarks and tests call them directly.
impl EmbeddedStore {
    /// [`CommandStore::enqueue`], on the calling thread.
    pub fn enqueue(
        &self,
        device: &DeviceId,
        mut message: C2dMessage,
        max: usize,
    ) -> Result<C2dMessage, EnqueueError> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        {
            let mut tables = QueueTables::open(&txn)?;
            let (from, to) = queue_range(device);
            // Keys only: a count and the last key, no message is decoded.
            let count = tables
                .queue
                .range::<&str>(from.as_str()..to.as_str())
                .map_err(StoreError::from)?
                .count();
            if count >= max {
                return Err(EnqueueError::QueueFull(max));
            }
            let last_seq = match tables
                .queue
                .range::<&str>(from.as_str()..to.as_str())
                .map_err(StoreError::from)?
                .next_back()
            {
                Some(entry) => seq_of(entry.map_err(StoreError::from)?.0.value()).unwrap_or(0),
                None => 0,
            };
            // Sequence numbers keep growing (also across purges): a delivery id never
            // names two messages.
            let mut meta = txn.open_table(META).map_err(StoreError::from)?;
            let counter_key = format!("c2d-seq/{device}");
            let stored = meta
                .get(counter_key.as_str())
                .map_err(StoreError::from)?
                .map(|v| v.value())
                .unwrap_or(0);
            message.seq = stored.max(last_seq) + 1;
            meta.insert(counter_key.as_str(), message.seq)
                .map_err(StoreError::from)?;
            let bytes =
                serde_json::to_vec(&message).map_err(|e| corrupt("c2d", device.to_string(), e))?;
            tables
                .queue
                .insert(queue_key(device, message.seq).as_str(), bytes.as_slice())
                .map_err(StoreError::from)?;
            tables
                .expiry
                .insert(expiry_key(device.as_str(), &message), ())
                .map_err(StoreError::from)?;
        }
        txn.commit().map_err(StoreError::from)?;
        Ok(message)
    }

    /// [`CommandStore::count`], on the calling thread.
    pub fn count(&self, device: &DeviceId) -> Result<usize, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(C2D)?;
        let (from, to) = queue_range(device);
        let mut count = 0;
        for entry in queue.range::<&str>(from.as_str()..to.as_str())? {
            entry?;
            count += 1;
        }
        Ok(count)
    }

    /// [`CommandStore::pending`], on the calling thread.
    pub fn pending(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(C2D)?;
        let from = queue_key(device, after.saturating_add(1));
        let (_, to) = queue_range(device);
        let mut out = Vec::new();
        for entry in queue.range::<&str>(from.as_str()..to.as_str())?.take(limit) {
            let (key, value) = entry?;
            out.push(decode_message(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// [`CommandStore::record_delivery`], on the calling thread.
    pub fn record_delivery(&self, device: &DeviceId, seq: u64) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut queue = txn.open_table(C2D)?;
            let key = queue_key(device, seq);
            let mut message = match queue.get(key.as_str())? {
                Some(value) => decode_message(&key, value.value())?,
                // Completed meanwhile: it stays completed.
                None => return Ok(false),
            };
            message.delivery_count = message.delivery_count.saturating_add(1);
            let bytes = serde_json::to_vec(&message).map_err(|e| corrupt("c2d", key.clone(), e))?;
            queue.insert(key.as_str(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(true)
    }

    /// [`CommandStore::complete`], on the calling thread.
    pub fn complete(
        &self,
        device: &DeviceId,
        seqs: &[u64],
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = QueueTables::open(&txn)?.finish(device, seqs.iter().copied(), status)?;
        txn.commit()?;
        Ok(removed)
    }

    /// [`CommandStore::purge`], on the calling thread.
    pub fn purge(&self, device: &DeviceId, status: FeedbackStatus) -> Result<Removed, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut tables = QueueTables::open(&txn)?;
            let seqs = tables.seqs(device)?;
            tables.finish(device, seqs, status)?
        };
        txn.commit()?;
        Ok(removed)
    }

    /// [`CommandStore::expire`], on the calling thread.
    pub fn expire(&self, now: OffsetDateTime, limit: usize) -> Result<Removed, StoreError> {
        // Everything with an expiry at or before `now`: the smallest key after it is
        // (now + 1 ns, "", 0).
        let upper = (now.unix_timestamp_nanos() + 1, "", 0u64);
        // Most sweeps find nothing due: answer that from a read transaction, without
        // taking the writer or paying for a commit.
        {
            let txn = self.db.begin_read()?;
            let index = txn.open_table(C2D_EXPIRY)?;
            if index.range(..upper)?.next().is_none() {
                return Ok(Removed::default());
            }
        }
        let txn = self.db.begin_write()?;
        let removed = {
            let mut tables = QueueTables::open(&txn)?;
            let mut due: Vec<(DeviceId, u64)> = Vec::new();
            for entry in tables.expiry.range(..upper)?.take(limit) {
                let (key, _) = entry?;
                let (_, device, seq) = key.value();
                let device = DeviceId::parse(device)
                    .map_err(|e| corrupt("c2d_expiry", device.to_string(), e))?;
                due.push((device, seq));
            }
            let mut removed = Removed::default();
            for (device, seq) in due {
                removed += tables.finish(&device, [seq], FeedbackStatus::Expired)?;
            }
            removed
        };
        txn.commit()?;
        Ok(removed)
    }

    /// [`CommandStore::feedback`], on the calling thread.
    pub fn feedback(&self) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FEEDBACK)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let record = serde_json::from_slice(value.value())
                .map_err(|e| corrupt("feedback", key.value().to_string(), e))?;
            out.push((key.value(), record));
        }
        Ok(out)
    }

    /// [`CommandStore::remove_feedback`], on the calling thread.
    pub fn remove_feedback(&self, keys: &[u64]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(FEEDBACK)?;
            for key in keys {
                table.remove(*key)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[async_trait]
impl CommandStore for EmbeddedStore {
    async fn enqueue(
        &self,
        device: &DeviceId,
        message: C2dMessage,
        max: usize,
    ) -> Result<C2dMessage, EnqueueError> {
        let (store, device) = (self.clone(), device.clone());
        tokio::task::spawn_blocking(move || store.enqueue(&device, message, max))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))?
    }

    async fn count(&self, device: &DeviceId) -> Result<usize, StoreError> {
        let device = device.clone();
        self.c2d_blocking(move |store| store.count(&device)).await
    }

    async fn counts(&self, devices: &[DeviceId]) -> Result<Vec<usize>, StoreError> {
        let devices = devices.to_vec();
        self.c2d_blocking(move |store| devices.iter().map(|d| store.count(d)).collect())
            .await
    }

    async fn pending(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<C2dMessage>, StoreError> {
        let device = device.clone();
        self.c2d_blocking(move |store| store.pending(&device, after, limit))
            .await
    }

    async fn record_delivery(&self, device: &DeviceId, seq: u64) -> Result<bool, StoreError> {
        let device = device.clone();
        self.c2d_blocking(move |store| store.record_delivery(&device, seq))
            .await
    }

    async fn complete(
        &self,
        device: &DeviceId,
        seqs: &[u64],
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError> {
        let (device, seqs) = (device.clone(), seqs.to_vec());
        self.c2d_blocking(move |store| store.complete(&device, &seqs, status))
            .await
    }

    async fn purge(
        &self,
        device: &DeviceId,
        status: FeedbackStatus,
    ) -> Result<Removed, StoreError> {
        let device = device.clone();
        self.c2d_blocking(move |store| store.purge(&device, status))
            .await
    }

    async fn drop_queue(&self, device: &DeviceId) -> Result<(), StoreError> {
        // Removing the device already dropped its queue in the same transaction; this
        // finds an empty range.
        let device = device.clone();
        self.c2d_blocking(move |store| {
            let txn = store.db.begin_write()?;
            drop_queue(&txn, &device)?;
            txn.commit()?;
            Ok(())
        })
        .await
    }

    async fn expire(&self, now: OffsetDateTime, limit: usize) -> Result<Removed, StoreError> {
        self.c2d_blocking(move |store| store.expire(now, limit))
            .await
    }

    async fn feedback(&self) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
        self.c2d_blocking(|store| store.feedback()).await
    }

    async fn remove_feedback(&self, keys: &[u64]) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.c2d_blocking(move |store| store.remove_feedback(&keys))
            .await
    }

    async fn lock_feedback(&self, max: usize, lock: Duration) -> Result<FeedbackLock, StoreError> {
        let stored = self.c2d_blocking(|store| store.feedback()).await?;
        let now = Instant::now();
        let mut locks = self
            .feedback_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        locks.retain(|_, (_, until)| *until > now);
        let locked: HashSet<u64> = locks
            .values()
            .flat_map(|(keys, _)| keys.iter().copied())
            .collect();
        let free: Vec<(u64, FeedbackRecord)> = stored
            .into_iter()
            .filter(|(key, _)| !locked.contains(key))
            .take(max)
            .collect();
        if free.is_empty() {
            // Locked batches come back after their lock.
            let retry = locks.values().map(|(_, until)| *until).min();
            return Ok(FeedbackLock::Empty { retry });
        }
        let token = crate::commands::random_hex(16);
        let keys = free.iter().map(|(k, _)| *k).collect();
        locks.insert(token.clone(), (keys, now + lock));
        Ok(FeedbackLock::Locked {
            token,
            records: free.into_iter().map(|(_, r)| r).collect(),
        })
    }

    async fn acknowledge_feedback(&self, token: &str) -> Result<bool, StoreError> {
        let keys = {
            let mut locks = self
                .feedback_locks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match locks.remove(token) {
                Some((keys, until)) if until > Instant::now() => keys,
                _ => return Ok(false),
            }
        };
        self.c2d_blocking(move |store| store.remove_feedback(&keys))
            .await?;
        Ok(true)
    }

    async fn abandon_feedback(&self, token: &str) -> Result<bool, StoreError> {
        let mut locks = self
            .feedback_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The records were never removed: dropping the lock frees them.
        Ok(matches!(locks.remove(token), Some((_, until)) if until > Instant::now()))
    }
}

impl EmbeddedStore {
    /// Runs a synchronous queue operation on the blocking pool.
    async fn c2d_blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))?
    }
}

/// The twins table, for [`super::embedded_twins`]: called on blocking threads.
impl EmbeddedStore {
    /// Every stored twin.
    pub(crate) fn load_twins(&self) -> Result<Vec<(DeviceId, TwinDocument)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TWINS)?;
        let mut twins = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let corrupt = |reason: String| StoreError::Corrupt {
                table: "twins",
                key: key.value().to_string(),
                reason,
            };
            let id = DeviceId::parse(key.value()).map_err(|err| corrupt(err.to_string()))?;
            let twin =
                serde_json::from_slice(value.value()).map_err(|err| corrupt(err.to_string()))?;
            twins.push((id, twin));
        }
        Ok(twins)
    }

    /// The stored twin of `id`.
    pub(crate) fn read_twin(&self, id: &DeviceId) -> Result<Option<TwinDocument>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TWINS)?;
        let Some(value) = table.get(id.as_str())? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|err| StoreError::Corrupt {
                table: "twins",
                key: id.to_string(),
                reason: err.to_string(),
            })
    }

    /// Writes a batch of twins in one durable transaction.
    pub(crate) fn write_twins(
        &self,
        twins: &[(DeviceId, Arc<TwinDocument>)],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(TWINS)?;
            for (id, twin) in twins {
                let bytes = serde_json::to_vec(&**twin).map_err(|err| StoreError::Corrupt {
                    table: "twins",
                    key: id.to_string(),
                    reason: err.to_string(),
                })?;
                table.insert(id.as_str(), bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Subscription;

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err().to_string();
        assert!(err.starts_with("cannot open store"), "{err}");
        assert!(err.contains("hub.redb"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 99)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = EmbeddedStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[tokio::test]
    async fn sessions_persist_and_go_with_their_device() {
        use crate::registry::RegistryStore as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let id = DeviceId::parse("d1").unwrap();
        let subs = StoredSession {
            generation_id: "g".into(),
            subscriptions: [Subscription::Methods, Subscription::CloudToDevice].into(),
        };
        {
            let store = EmbeddedStore::open(&path).unwrap();
            assert_eq!(store.load(&id).await.unwrap(), None);
            store.save(&id, &subs).await.unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.load(&id).await.unwrap(), Some(subs.clone()));
        SessionStore::remove(&store, &id).await.unwrap();
        assert_eq!(store.load(&id).await.unwrap(), None);
        // A record of an earlier version (a bare subscription list) still loads.
        {
            let bare = serde_json::to_vec(&subs.subscriptions).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(SESSIONS)
                .unwrap()
                .insert("d1", bare.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let legacy = store.load(&id).await.unwrap().expect("a legacy session");
        assert!(legacy.belongs_to("any generation"));
        // Deleting a device deletes its session.
        store.save(&id, &subs).await.unwrap();
        let device: Device = serde_json::from_value(serde_json::json!({
            "deviceId": "d1", "generationId": "g", "version": 1, "status": "enabled",
            "statusReason": null, "statusUpdatedTime": "2026-01-01T00:00:00Z",
            "authentication": {"type": "certificateAuthority", "symmetricKey": null}
        }))
        .unwrap();
        store.insert(device).await.unwrap();
        RegistryStore::remove(&store, &id, None).await.unwrap();
        assert_eq!(store.load(&id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn ping_answers_on_an_open_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        store.ping().await.unwrap();
    }

    fn c2d_message(id: &str, expiry: OffsetDateTime) -> C2dMessage {
        use crate::commands::c2d::AckMode;
        C2dMessage {
            seq: 0,
            message_id: id.to_string(),
            correlation_id: None,
            content_type: None,
            content_encoding: None,
            properties: Vec::new(),
            body: bytes::Bytes::from_static(b"payload"),
            enqueued: OffsetDateTime::now_utc(),
            expiry,
            ack: AckMode::Negative,
            delivery_count: 0,
            generation_id: String::new(),
        }
    }

    /// Overwrites every queued message except those of `keep` with bytes that are not
    /// a message: any operation that decodes one of them fails with `Corrupt`.
    fn poison_queues_except(store: &EmbeddedStore, keep: &DeviceId) {
        let txn = store.db.begin_write().unwrap();
        {
            let mut queue = txn.open_table(C2D).unwrap();
            let keys: Vec<String> = queue
                .iter()
                .unwrap()
                .map(|e| e.unwrap().0.value().to_string())
                .filter(|k| !k.starts_with(&format!("{keep}\u{0}")))
                .collect();
            for key in keys {
                queue
                    .insert(key.as_str(), b"not a message".as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// 20 devices × 50 messages due in an hour, and one device with one message that
    /// is already due; then every message that is not due is made unreadable.
    fn fleet_with_one_due(store: &EmbeddedStore) -> (Vec<DeviceId>, DeviceId) {
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let devices: Vec<DeviceId> = (0..20)
            .map(|d| DeviceId::parse(&format!("dev-{d:02}")).unwrap())
            .collect();
        for device in &devices {
            for n in 0..50 {
                store
                    .enqueue(device, c2d_message(&format!("m{n}"), later), 50)
                    .unwrap();
            }
        }
        let due = DeviceId::parse("due").unwrap();
        let past = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        store.enqueue(&due, c2d_message("gone", past), 50).unwrap();
        poison_queues_except(store, &due);
        (devices, due)
    }

    #[tokio::test]
    async fn the_expiry_sweep_and_queue_lengths_read_no_message_that_is_not_due() {
        // Issue 11: the sweep decoded every queued message of every device, and a
        // queue length decoded the whole queue. Here 1,000 messages that are not due
        // cannot be decoded at all: the sweep must still remove the one due message
        // (with its feedback), and the lengths must still be counted.
        use crate::commands::{CommandLimits, Commands};
        use crate::gateway::connections::Connections;
        use crate::registry::{Presence, Registry};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let (devices, due) = fleet_with_one_due(&store);
        let commands = Commands::new(
            Arc::new(store.clone()),
            Registry::new(Arc::new(store.clone()), Presence::default()),
            Arc::new(Connections::default()),
            CommandLimits::default(),
        );
        commands.expire().await;
        assert_eq!(commands.queue_length(&due).await.unwrap(), 0);
        let feedback = store.feedback().unwrap();
        assert_eq!(feedback.len(), 1, "{feedback:?}");
        assert_eq!(feedback[0].1.original_message_id, "gone");
        assert_eq!(feedback[0].1.status_code, FeedbackStatus::Expired);
        for device in &devices {
            assert_eq!(commands.queue_length(device).await.unwrap(), 50);
        }
    }

    #[test]
    fn expire_reads_only_the_index_entries_that_are_due() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let (_, due) = fleet_with_one_due(&store);
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            store.expire(now, 1_000).unwrap(),
            Removed {
                messages: 1,
                feedback: 1
            }
        );
        assert_eq!(store.count(&due).unwrap(), 0);
        // Nothing else is due: the next sweep removes nothing (and decodes nothing).
        assert_eq!(store.expire(now, 1_000).unwrap(), Removed::default());
        // The batch limit holds: with everything due, one call removes `limit`.
        let later = now + time::Duration::hours(2);
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let device = DeviceId::parse("d").unwrap();
        for n in 0..5 {
            store
                .enqueue(&device, c2d_message(&format!("m{n}"), now), 50)
                .unwrap();
        }
        assert_eq!(store.expire(later, 3).unwrap().messages, 3);
        assert_eq!(store.expire(later, 3).unwrap().messages, 2);
        assert_eq!(store.count(&device).unwrap(), 0);
    }

    #[test]
    fn completion_and_delivery_find_messages_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        let device = DeviceId::parse("d").unwrap();
        let seqs: Vec<u64> = (0..10)
            .map(|n| {
                store
                    .enqueue(&device, c2d_message(&format!("m{n}"), later), 50)
                    .unwrap()
                    .seq
            })
            .collect();
        // Make every message but the 6th and later unreadable.
        {
            let txn = store.db.begin_write().unwrap();
            {
                let mut queue = txn.open_table(C2D).unwrap();
                for seq in &seqs[..5] {
                    queue
                        .insert(queue_key(&device, *seq).as_str(), b"x".as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        // Delivery reads only what follows the cursor.
        let pending = store.pending(&device, seqs[4], 50).unwrap();
        let ids: Vec<&str> = pending.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(ids, ["m5", "m6", "m7", "m8", "m9"]);
        assert_eq!(store.pending(&device, seqs[4], 2).unwrap().len(), 2);
        assert!(store.record_delivery(&device, seqs[7]).unwrap());
        assert_eq!(
            store.pending(&device, seqs[6], 1).unwrap()[0].delivery_count,
            1
        );
        // A PUBACK removes its message only; a second one removes nothing.
        assert_eq!(
            store
                .complete(&device, &[seqs[7]], FeedbackStatus::Expired)
                .unwrap(),
            Removed {
                messages: 1,
                feedback: 1
            }
        );
        assert_eq!(
            store
                .complete(&device, &[seqs[7]], FeedbackStatus::Expired)
                .unwrap(),
            Removed::default()
        );
        assert!(!store.record_delivery(&device, seqs[7]).unwrap());
        assert_eq!(store.count(&device).unwrap(), 9);
    }

    #[test]
    fn purge_and_device_removal_clear_the_expiry_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
        let soon = OffsetDateTime::now_utc() + time::Duration::seconds(10);
        let device = DeviceId::parse("d").unwrap();
        for n in 0..3 {
            store
                .enqueue(&device, c2d_message(&format!("m{n}"), soon), 50)
                .unwrap();
        }
        assert_eq!(
            store.purge(&device, FeedbackStatus::Purged).unwrap(),
            Removed {
                messages: 3,
                feedback: 3
            }
        );
        let index_len = |store: &EmbeddedStore| {
            let txn = store.db.begin_read().unwrap();
            redb::ReadableTableMetadata::len(&txn.open_table(C2D_EXPIRY).unwrap()).unwrap()
        };
        assert_eq!(index_len(&store), 0);
        // A later sweep finds nothing of the purged messages.
        let later = soon + time::Duration::hours(1);
        assert_eq!(store.expire(later, 100).unwrap(), Removed::default());
        // Sequence numbers keep growing across a purge.
        let next = store.enqueue(&device, c2d_message("m3", soon), 50).unwrap();
        assert_eq!(next.seq, 4);
        assert_eq!(index_len(&store), 1);
        // The queue cap holds.
        for n in 0..49 {
            store
                .enqueue(&device, c2d_message(&format!("f{n}"), soon), 50)
                .unwrap();
        }
        assert!(matches!(
            store.enqueue(&device, c2d_message("over", soon), 50),
            Err(EnqueueError::QueueFull(50))
        ));
        let txn = store.db.begin_write().unwrap();
        drop_queue(&txn, &device).unwrap();
        txn.commit().unwrap();
        assert_eq!(index_len(&store), 0);
        assert_eq!(store.count(&device).unwrap(), 0);
    }

    #[test]
    fn a_schema_1_file_gets_its_expiry_index_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let device = DeviceId::parse("old").unwrap();
        let now = OffsetDateTime::now_utc();
        {
            // What a schema-1 hub left behind: queued messages, no index.
            let store = EmbeddedStore::open(&path).unwrap();
            store.enqueue(&device, c2d_message("due", now), 50).unwrap();
            store
                .enqueue(
                    &device,
                    c2d_message("later", now + time::Duration::hours(1)),
                    50,
                )
                .unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.delete_table(C2D_EXPIRY).unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let version = store
            .db
            .begin_read()
            .unwrap()
            .open_table(META)
            .unwrap()
            .get("schema_version")
            .unwrap()
            .map(|v| v.value());
        assert_eq!(version, Some(SCHEMA_VERSION));
        assert_eq!(store.expire(now, 100).unwrap().messages, 1);
        assert_eq!(store.count(&device).unwrap(), 1);
        assert_eq!(
            store.pending(&device, 0, 50).unwrap()[0].message_id,
            "later"
        );
    }
}
