//! Device twins in the replicated KV bucket `hub-twins`: one key per device
//! (`keys::encode(device id)`), the twin document as JSON, compare-and-set on the
//! key's revision, and a watch that tells every hub node about every change.
//!
//! A stored value is the twin document plus two fields of the store's own: the
//! desired patch that produced the document's desired version (`$desiredPatch`,
//! which each node pushes to its devices when its watch sees the change) and the
//! write's unique id (`$write`). A write whose answer was lost (a leader change cut
//! it off) is sent again with the same id as its JetStream message id, so the
//! server drops a second copy, and a retry that meets a newer revision checks
//! whether that revision is its own write before it calls the race lost. So a change
//! is neither lost nor applied twice.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{self, Operation};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{NatsStore, keys};
use crate::registry::DeviceId;
use crate::storage::StoreError;
use crate::twins::document::TwinDocument;
use crate::twins::{
    PutError, Revision, StoredTwin, TwinChange, TwinSnapshot, TwinStore, TwinWrite,
};

/// The bucket's name.
pub const BUCKET: &str = "hub-twins";
/// The stream behind the bucket (its leader takes the writes).
pub const STREAM: &str = "KV_hub-twins";

const DESIRED_PATCH: &str = "$desiredPatch";
const WRITE_ID: &str = "$write";
/// Changes the watch may hold for the twin service before it waits.
const WATCH_BUFFER: usize = 4096;
/// How long loading the bucket may wait for the next entry.
const LOAD_STALL: Duration = Duration::from_secs(10);
/// The first and longest pause before a broken watch is opened again.
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Twins on JetStream KV.
pub struct NatsTwins {
    store: NatsStore,
    bucket: kv::Store,
    writes: AtomicU64,
}

impl std::fmt::Debug for NatsTwins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsTwins")
    }
}

impl NatsTwins {
    /// Opens (creating) the bucket.
    pub async fn open(store: &NatsStore) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            bucket: store.bucket(BUCKET, 1).await?,
            writes: AtomicU64::new(0),
        })
    }

    fn subject(key: &str) -> String {
        format!("$KV.{BUCKET}.{key}")
    }

    /// One try of a conditional write: the ack's revision, or the publish error.
    async fn publish(
        &self,
        key: &str,
        write_id: &str,
        value: Bytes,
        expected: Revision,
    ) -> Result<Revision, async_nats::jetstream::context::PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        headers.insert(async_nats::header::NATS_MESSAGE_ID, write_id);
        let ack = self
            .store
            .jetstream()
            .publish_with_headers(Self::subject(key), headers, value)
            .await?
            .await?;
        Ok(ack.sequence)
    }
}

/// A stored value's bytes.
fn encode(id: &DeviceId, write: &TwinWrite, write_id: &str) -> Result<Bytes, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        table: BUCKET,
        key: id.to_string(),
        reason,
    };
    let mut value = serde_json::to_value(&write.twin).map_err(|err| corrupt(err.to_string()))?;
    let Value::Object(map) = &mut value else {
        return Err(corrupt("a twin is not a JSON object".into()));
    };
    if let Some(patch) = &write.desired_patch {
        map.insert(DESIRED_PATCH.into(), patch.clone());
    }
    map.insert(WRITE_ID.into(), Value::String(write_id.to_string()));
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|err| corrupt(err.to_string()))
}

/// A stored value: the twin, its desired patch and the id of the write.
fn decode(
    key: &str,
    bytes: &[u8],
) -> Result<(TwinDocument, Option<Value>, Option<String>), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        table: BUCKET,
        key: key.to_string(),
        reason,
    };
    let mut value: Value = serde_json::from_slice(bytes).map_err(|err| corrupt(err.to_string()))?;
    let Value::Object(map) = &mut value else {
        return Err(corrupt("not a JSON object".into()));
    };
    let patch = map.remove(DESIRED_PATCH);
    let write_id = match map.remove(WRITE_ID) {
        Some(Value::String(id)) => Some(id),
        _ => None,
    };
    let twin = serde_json::from_value(value).map_err(|err| corrupt(err.to_string()))?;
    Ok((twin, patch, write_id))
}

/// The device a key names, or `None` for a key the hub never writes.
fn device_of(key: &str) -> Option<DeviceId> {
    DeviceId::parse(&keys::decode(key)?).ok()
}

/// A KV entry as a twin change (`None`: not a twin key, or an unreadable value,
/// which is logged and skipped rather than stopping every node's watch).
fn change_of(entry: &kv::Entry) -> Option<TwinChange> {
    let Some(device) = device_of(&entry.key) else {
        tracing::warn!(key = %entry.key, "ignoring a key in {BUCKET} that names no device");
        return None;
    };
    let twin = match entry.operation {
        Operation::Put => match decode(&entry.key, &entry.value) {
            Ok((twin, desired_patch, _)) => Some(StoredTwin {
                twin,
                revision: entry.revision,
                desired_patch,
            }),
            Err(err) => {
                tracing::warn!(error = %err, "ignoring an unreadable twin");
                return None;
            }
        },
        Operation::Delete | Operation::Purge => None,
    };
    Some(TwinChange {
        device,
        revision: entry.revision,
        twin,
    })
}

/// How one try of a put ended, other than with a transient error.
enum Outcome {
    Stored(Revision),
    Conflict,
}

#[async_trait]
impl TwinStore for NatsTwins {
    async fn load_all(&self) -> Result<TwinSnapshot, StoreError> {
        self.store
            .retrying("load twins", || async {
                let stream = self
                    .store
                    .jetstream()
                    .get_stream(STREAM)
                    .await
                    .map_err(|e| e.to_string())?;
                let state = stream.cached_info().state.clone();
                let mut snapshot = TwinSnapshot {
                    twins: Vec::new(),
                    revision: state.last_sequence,
                };
                if state.messages == 0 {
                    return Ok(snapshot);
                }
                let mut twins = std::collections::BTreeMap::new();
                let mut watch = self
                    .bucket
                    .watch_all_from_revision(state.first_sequence.max(1))
                    .await
                    .map_err(|e| e.to_string())?;
                loop {
                    let entry = tokio::time::timeout(LOAD_STALL, watch.next())
                        .await
                        .map_err(|_| "the bucket stopped answering".to_string())?
                        .ok_or_else(|| "the watch ended".to_string())?
                        .map_err(|e| e.to_string())?;
                    snapshot.revision = snapshot.revision.max(entry.revision);
                    if let Some(change) = change_of(&entry) {
                        match change.twin {
                            Some(twin) => twins.insert(change.device, twin),
                            None => twins.remove(&change.device),
                        };
                    }
                    // Caught up with the stream: later changes come through `watch`.
                    if entry.delta == 0 {
                        break;
                    }
                }
                snapshot.twins = twins.into_iter().collect();
                Ok::<_, String>(snapshot)
            })
            .await
    }

    async fn get(&self, id: &DeviceId) -> Result<Option<StoredTwin>, StoreError> {
        let key = keys::encode(id.as_str());
        let entry = self
            .store
            .retrying("read twin", || self.bucket.entry(key.as_str()))
            .await?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => {
                let (twin, desired_patch, _) = decode(&key, &entry.value)?;
                Ok(Some(StoredTwin {
                    twin,
                    revision: entry.revision,
                    desired_patch,
                }))
            }
            _ => Ok(None),
        }
    }

    async fn put(
        &self,
        id: &DeviceId,
        write: TwinWrite,
        expected: Revision,
    ) -> Result<Revision, PutError> {
        let key = keys::encode(id.as_str());
        let write_id = format!(
            "twin-{}-{}",
            self.store.node_id(),
            self.writes.fetch_add(1, Ordering::Relaxed)
        );
        let value = encode(id, &write, &write_id)?;
        // Set from the second try on: an earlier try (failed without a clear answer,
        // or given up when the NATS connection was replaced) may have been stored.
        let unsure = AtomicBool::new(false);
        let tries = AtomicUsize::new(0);
        let outcome = self
            .store
            .retrying("write twin", || async {
                if tries.fetch_add(1, Ordering::Relaxed) > 0 {
                    unsure.store(true, Ordering::Relaxed);
                }
                let mut expected = expected;
                // At most twice: a first write after a delete learns the delete
                // marker's revision and goes again.
                for _ in 0..2 {
                    match self.publish(&key, &write_id, value.clone(), expected).await {
                        Ok(revision) => return Ok(Outcome::Stored(revision)),
                        Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {}
                        Err(err) => {
                            unsure.store(true, Ordering::Relaxed);
                            return Err(err.to_string());
                        }
                    }
                    let current = self
                        .bucket
                        .entry(key.as_str())
                        .await
                        .map_err(|err| err.to_string())?;
                    match current {
                        Some(entry) if entry.operation == Operation::Put => {
                            let ours = unsure.load(Ordering::Relaxed)
                                && decode(&key, &entry.value)
                                    .is_ok_and(|(_, _, id)| id.as_deref() == Some(&write_id));
                            return Ok(if ours {
                                Outcome::Stored(entry.revision)
                            } else {
                                Outcome::Conflict
                            });
                        }
                        // Deleted: "no twin stored" is what the writer expected.
                        Some(entry) if expected == 0 => expected = entry.revision,
                        _ => return Ok(Outcome::Conflict),
                    }
                }
                Ok(Outcome::Conflict)
            })
            .await?;
        match outcome {
            Outcome::Stored(revision) => Ok(revision),
            Outcome::Conflict => Err(PutError::Conflict),
        }
    }

    fn created(&self, id: &DeviceId) {
        // Other nodes learn of the device's twin (for their queries) through the
        // watch. A twin already stored is either a change made meanwhile or one left
        // by an earlier device under the id whose delete failed; both stay.
        let key = keys::encode(id.as_str());
        let fresh = TwinWrite {
            twin: TwinDocument::new(),
            desired_patch: None,
        };
        let write_id = format!("twin-{}-created-{id}", self.store.node_id());
        let Ok(value) = encode(id, &fresh, &write_id) else {
            return;
        };
        let (store, bucket) = (self.store.clone(), self.bucket.clone());
        tokio::spawn(async move {
            let created = store
                .retrying("create twin", || async {
                    match bucket.create(key.as_str(), value.clone()).await {
                        Ok(_) => Ok(()),
                        Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                        Err(err) => Err(err),
                    }
                })
                .await;
            if let Err(err) = created {
                tracing::warn!(%err, "cannot store a new device's twin; it appears on other nodes with its first change");
            }
        });
    }

    fn deleted(&self, id: &DeviceId, known: Revision) {
        if known == 0 {
            // This hub never saw the twin stored: a hub that did deletes it.
            return;
        }
        let key = keys::encode(id.as_str());
        let (store, bucket) = (self.store.clone(), self.bucket.clone());
        let id = id.clone();
        tokio::spawn(async move {
            let deleted = store
                .retrying("delete twin", || async {
                    match bucket
                        .delete_expect_revision(key.as_str(), Some(known))
                        .await
                    {
                        // Another hub deleted it, or it changed since: a hub that
                        // knows the newer revision deletes that.
                        Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(()),
                        other => other,
                    }
                })
                .await;
            if let Err(err) = deleted {
                tracing::error!(%id, %err, "cannot delete a deleted device's twin");
            }
        });
    }

    async fn watch(
        &self,
        after: Revision,
    ) -> Result<Option<mpsc::Receiver<TwinChange>>, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(follow(self.bucket.clone(), after + 1, tx));
        Ok(Some(rx))
    }
}

/// Sends every change from revision `next` on to `tx`, opening the watch again
/// (from the revision after the last one sent) whenever it breaks, until the
/// receiver is gone.
async fn follow(bucket: kv::Store, mut next: Revision, tx: mpsc::Sender<TwinChange>) {
    let mut pause = WATCH_BACKOFF.0;
    loop {
        match bucket.watch_all_from_revision(next).await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(err) => {
                            tracing::warn!(%err, "twin watch failed; opening it again");
                            break;
                        }
                    };
                    pause = WATCH_BACKOFF.0;
                    next = entry.revision + 1;
                    if let Some(change) = change_of(&entry)
                        && tx.send(change).await.is_err()
                    {
                        return;
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "cannot watch twins; trying again"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(WATCH_BACKOFF.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stored_value_is_the_twin_document_with_the_patch_and_write_id_beside_it() {
        let id = DeviceId::parse("d.1").unwrap();
        let mut twin = TwinDocument::new();
        twin.version = 7;
        twin.tags.insert("site".into(), json!("x"));
        let write = TwinWrite {
            twin: twin.clone(),
            desired_patch: Some(json!({"fan": true})),
        };
        let bytes = encode(&id, &write, "w-1").unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["version"], 7);
        assert_eq!(value["tags"]["site"], "x");
        let (decoded, patch, write_id) = decode("d=2E1", &bytes).unwrap();
        assert_eq!(decoded, twin);
        assert_eq!(patch, Some(json!({"fan": true})));
        assert_eq!(write_id.as_deref(), Some("w-1"));
        assert_eq!(device_of(&keys::encode("d.1")), Some(id));
        assert_eq!(device_of("=ZZ"), None);
    }
}
