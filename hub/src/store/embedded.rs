//! The embedded backend: one redb database (`DIR/hub.redb`) holding every capability's
//! tables. Values are JSON so records can gain fields without a migration; a `meta`
//! table records the schema version and refuses files from a newer hub.
//!
//! redb calls block (a commit is an fsync), so every operation runs on tokio's
//! blocking pool.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{StoreError, StoreHealth};
use crate::commands::c2d::{C2dMessage, CommandStore, EnqueueError, FeedbackRecord};
use crate::gateway::services::SessionStore;
use crate::gateway::topic::Subscription;
use crate::registry::{Device, DeviceId, RegistryStore, RegistryStoreError, Removed};
use crate::telemetry::CheckpointStore;
use crate::twins::document::TwinDocument;

/// Schema version this build writes; a file with a higher one is refused.
const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// Cloud-to-device queues: `{device}\0{seq, 20 digits}` → JSON message.
const C2D: TableDefinition<&str, &[u8]> = TableDefinition::new("c2d");
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
}

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
        let db = Database::create(path).map_err(|err| open_err(err.to_string()))?;
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
        }
        txn.commit().map_err(|err| open_err(err.to_string()))?;
        Ok(Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
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
    ) -> Result<Removed, RegistryStoreError> {
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
                {
                    let mut queue = txn.open_table(C2D).map_err(StoreError::from)?;
                    let (from, to) = queue_range(&id);
                    let keys: Vec<String> = queue
                        .range::<&str>(from.as_str()..to.as_str())
                        .map_err(StoreError::from)?
                        .filter_map(|e| e.ok().map(|(k, _)| k.value().to_string()))
                        .collect();
                    for key in keys {
                        queue.remove(key.as_str()).map_err(StoreError::from)?;
                    }
                }
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
            Ok(Removed {
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
    async fn load(&self, device: &DeviceId) -> Result<Option<BTreeSet<Subscription>>, StoreError> {
        // A point read of a small record from redb's page cache: cheaper inline than a
        // hop to the blocking pool on every CONNECT.
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SESSIONS)?;
        let Some(bytes) = table.get(device.as_str())? else {
            return Ok(None);
        };
        serde_json::from_slice(bytes.value())
            .map(Some)
            .map_err(|err| StoreError::Corrupt {
                table: "sessions",
                key: device.to_string(),
                reason: err.to_string(),
            })
    }

    async fn save(
        &self,
        device: &DeviceId,
        subscriptions: &BTreeSet<Subscription>,
    ) -> Result<(), StoreError> {
        let id = device.clone();
        let bytes = serde_json::to_vec(subscriptions).map_err(|err| StoreError::Corrupt {
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

fn corrupt(table: &'static str, key: String, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        key,
        reason: err.to_string(),
    }
}

impl CommandStore for EmbeddedStore {
    fn enqueue(
        &self,
        device: &DeviceId,
        mut message: C2dMessage,
        max: usize,
    ) -> Result<C2dMessage, EnqueueError> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        {
            let mut queue = txn.open_table(C2D).map_err(StoreError::from)?;
            let (from, to) = queue_range(device);
            let mut count = 0usize;
            let mut last_seq = 0u64;
            for entry in queue
                .range::<&str>(from.as_str()..to.as_str())
                .map_err(StoreError::from)?
            {
                let (key, _) = entry.map_err(StoreError::from)?;
                count += 1;
                if let Some(seq) = key
                    .value()
                    .rsplit('\u{0}')
                    .next()
                    .and_then(|s| s.parse().ok())
                {
                    last_seq = last_seq.max(seq);
                }
            }
            if count >= max {
                return Err(EnqueueError::QueueFull(max));
            }
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
            queue
                .insert(queue_key(device, message.seq).as_str(), bytes.as_slice())
                .map_err(StoreError::from)?;
        }
        txn.commit().map_err(StoreError::from)?;
        Ok(message)
    }

    fn queued(&self, device: &DeviceId) -> Result<Vec<C2dMessage>, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(C2D)?;
        let (from, to) = queue_range(device);
        let mut out = Vec::new();
        for entry in queue.range::<&str>(from.as_str()..to.as_str())? {
            let (key, value) = entry?;
            out.push(
                serde_json::from_slice(value.value())
                    .map_err(|e| corrupt("c2d", key.value().to_string(), e))?,
            );
        }
        Ok(out)
    }

    fn all_queued(&self) -> Result<Vec<(DeviceId, C2dMessage)>, StoreError> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(C2D)?;
        let mut out = Vec::new();
        for entry in queue.iter()? {
            let (key, value) = entry?;
            let key = key.value().to_string();
            let device = key
                .split('\u{0}')
                .next()
                .and_then(|d| DeviceId::parse(d).ok())
                .ok_or_else(|| corrupt("c2d", key.clone(), "bad key"))?;
            let message = serde_json::from_slice(value.value())
                .map_err(|e| corrupt("c2d", key.clone(), e))?;
            out.push((device, message));
        }
        Ok(out)
    }

    fn update(&self, device: &DeviceId, message: &C2dMessage) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut queue = txn.open_table(C2D)?;
            let key = queue_key(device, message.seq);
            // A message completed meanwhile stays completed.
            if queue.get(key.as_str())?.is_some() {
                let bytes =
                    serde_json::to_vec(message).map_err(|e| corrupt("c2d", key.clone(), e))?;
                queue.insert(key.as_str(), bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn complete(
        &self,
        device: &DeviceId,
        seqs: &[u64],
        feedback: &[FeedbackRecord],
    ) -> Result<Vec<C2dMessage>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut removed = Vec::new();
        {
            let mut queue = txn.open_table(C2D)?;
            for seq in seqs {
                let key = queue_key(device, *seq);
                if let Some(value) = queue.remove(key.as_str())? {
                    removed.push(
                        serde_json::from_slice(value.value())
                            .map_err(|e| corrupt("c2d", key.clone(), e))?,
                    );
                }
            }
            let mut table = txn.open_table(FEEDBACK)?;
            let first = table.last()?.map_or(0, |(k, _)| k.value()) + 1;
            for (key, record) in (first..).zip(feedback) {
                let bytes = serde_json::to_vec(record)
                    .map_err(|e| corrupt("feedback", key.to_string(), e))?;
                table.insert(key, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(removed)
    }

    fn feedback(&self) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
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

    fn remove_feedback(&self, keys: &[u64]) -> Result<(), StoreError> {
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
        let subs: BTreeSet<Subscription> =
            [Subscription::Methods, Subscription::CloudToDevice].into();
        {
            let store = EmbeddedStore::open(&path).unwrap();
            assert_eq!(store.load(&id).await.unwrap(), None);
            store.save(&id, &subs).await.unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.load(&id).await.unwrap(), Some(subs.clone()));
        SessionStore::remove(&store, &id).await.unwrap();
        assert_eq!(store.load(&id).await.unwrap(), None);
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
}
