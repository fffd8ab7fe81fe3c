//! Device identities in the replicated KV bucket `hub-registry` (key: the encoded
//! device id, value: the device's JSON), with compare-and-set on the KV revision,
//! and the bucket's change feed that keeps every hub's registry mirror current.
//!
//! A device's `version` (its etag) is the revision of its KV entry: the JSON's own
//! `version` field is whatever the writer guessed and is overwritten on every read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{NatsStore, keys, sessions};
use crate::registry::{
    Device, DeviceId, Registry, RegistryStore, RegistryStoreError, Removed, StoredChange,
};
use crate::storage::StoreError;

/// The bucket's name.
pub const BUCKET: &str = "hub-registry";

/// The first and the longest pause before the change feed is opened again after it
/// failed (a NATS node or the bucket's leader went away).
const FEED_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// How often the feed compares its position with the bucket's last revision.
const STALL_CHECK: Duration = Duration::from_secs(1);
/// How long the feed may stay behind the bucket without progress before it reopens.
const STALL_LIMIT: Duration = Duration::from_secs(2);

/// The registry on JetStream KV.
#[derive(Clone)]
pub struct NatsRegistry {
    store: NatsStore,
    bucket: kv::Store,
    /// Deleting a device deletes its persistent MQTT session too.
    sessions: kv::Store,
}

impl std::fmt::Debug for NatsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsRegistry")
    }
}

/// What one try of a compare-and-set write found.
enum Cas<T> {
    /// Written (or found written by an earlier try of this call).
    Done(T),
    /// The key is not at the expected revision.
    Conflict,
    /// The key holds no device.
    Missing,
}

impl NatsRegistry {
    /// Opens (creating) the registry bucket and the sessions bucket.
    pub async fn open(store: &NatsStore) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            // One revision per key: compare-and-set needs only the latest, and the
            // feed resumes from a revision (older revisions of a key are superseded).
            bucket: store.bucket(BUCKET, 1).await?,
            sessions: store.bucket(sessions::BUCKET, 1).await?,
        })
    }

    /// Feeds `registry` every change of the bucket, in revision order, from its feed
    /// position on: the whole bucket at start, then every write through any hub. The
    /// feed reopens itself (from where it stopped) after a failure, or when it stalls
    /// behind the bucket; the task runs until aborted.
    pub fn follow(&self, registry: Registry) -> tokio::task::JoinHandle<()> {
        let bucket = self.bucket.clone();
        tokio::spawn(async move {
            let mut pause = FEED_BACKOFF.0;
            loop {
                let from = registry.feed_position() + 1;
                match bucket.watch_all_from_revision(from).await {
                    Ok(watch) => {
                        if drain(&bucket, &registry, watch).await {
                            pause = FEED_BACKOFF.0;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, from, "cannot open the registry change feed");
                    }
                }
                // A backoff between reopenings, not a synchronisation: the feed
                // resumes from its position whenever it comes back.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(FEED_BACKOFF.1);
            }
        })
    }

    /// Compare-and-set of `key` from `expected` (0: the key is absent or deleted) to
    /// `value`. A try that failed in transit may have been written anyway; when a
    /// later try then finds the key moved on, the entry holding exactly `value` is
    /// this call's own write.
    async fn compare_and_set(
        &self,
        what: &str,
        key: &str,
        value: &Bytes,
        expected: Option<u64>,
    ) -> Result<Cas<u64>, StoreError> {
        let retried = AtomicBool::new(false);
        self.store
            .retrying(what, || async {
                let again = retried.swap(true, Ordering::Relaxed);
                let written = match expected {
                    Some(revision) => self
                        .bucket
                        .update(key, value.clone(), revision)
                        .await
                        .map_err(|err| {
                            (err.kind() == kv::UpdateErrorKind::WrongLastRevision)
                                .then_some(())
                                .ok_or_else(|| err.to_string())
                        }),
                    None => self.bucket.create(key, value.clone()).await.map_err(|err| {
                        (err.kind() == kv::CreateErrorKind::AlreadyExists)
                            .then_some(())
                            .ok_or_else(|| err.to_string())
                    }),
                };
                match written {
                    Ok(revision) => Ok(Cas::Done(revision)),
                    // Transient: tried again.
                    Err(Err(err)) => Err(err),
                    // A conflict is never retried: it is the caller's answer.
                    Err(Ok(())) => match self.bucket.entry(key).await.map_err(|e| e.to_string())? {
                        Some(entry) if entry.operation == kv::Operation::Put => {
                            if again && entry.value == *value {
                                Ok(Cas::Done(entry.revision))
                            } else {
                                Ok(Cas::Conflict)
                            }
                        }
                        _ if expected.is_some() => Ok(Cas::Missing),
                        // Absent when created, yet the create conflicted: a racing
                        // write in between; the caller sees it as a conflict.
                        _ => Ok(Cas::Conflict),
                    },
                }
            })
            .await
    }

    /// Writes the delete marker of `key` if its latest revision is `revision`; the
    /// marker's revision. (The client's `delete_expect_revision` does not return it,
    /// and a mirror orders the deletion against other writes by it.)
    async fn delete_at(&self, key: &str, revision: u64) -> Result<Cas<u64>, StoreError> {
        let subject = format!("$KV.{BUCKET}.{key}");
        let retried = AtomicBool::new(false);
        self.store
            .retrying("delete device", || async {
                let again = retried.swap(true, Ordering::Relaxed);
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("KV-Operation", "DEL");
                headers.insert(
                    async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    revision.to_string(),
                );
                let acked = match self
                    .store
                    .jetstream()
                    .publish_with_headers(subject.clone(), headers, Bytes::new())
                    .await
                {
                    Ok(ack) => ack.await,
                    Err(err) => Err(err),
                };
                match acked {
                    Ok(ack) => Ok(Cas::Done(ack.sequence)),
                    Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                        match self.bucket.entry(key).await.map_err(|e| e.to_string())? {
                            // An earlier try of this call deleted it (or another
                            // deletion won): the device is gone either way.
                            Some(entry) if entry.operation != kv::Operation::Put && again => {
                                Ok(Cas::Done(entry.revision))
                            }
                            Some(entry) if entry.operation == kv::Operation::Put => {
                                Ok(Cas::Conflict)
                            }
                            _ => Ok(Cas::Missing),
                        }
                    }
                    Err(err) => Err(err.to_string()),
                }
            })
            .await
    }

    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, StoreError> {
        let entry = self
            .store
            .retrying("read device", || self.bucket.entry(key))
            .await?;
        Ok(entry.filter(|entry| entry.operation == kv::Operation::Put))
    }

    /// Deletes the device's persistent session; a failure is logged, not returned
    /// (the device is gone; a stale session is replaced at its next CleanSession=0
    /// connect and removed at its next CleanSession=1 one).
    async fn forget_session(&self, key: &str) {
        let deleted = self
            .store
            .retrying("delete session", || async {
                match self.sessions.entry(key).await.map_err(|e| e.to_string())? {
                    Some(entry) if entry.operation == kv::Operation::Put => {
                        self.sessions.delete(key).await.map_err(|e| e.to_string())
                    }
                    _ => Ok(()),
                }
            })
            .await;
        if let Err(err) = deleted {
            tracing::warn!(key, error = %err, "cannot delete the session of a deleted device");
        }
    }
}

/// The device an entry holds, its `version` set to the entry's revision.
fn decode(key: &str, value: &[u8], revision: u64) -> Result<Device, StoreError> {
    let mut device: Device = serde_json::from_slice(value).map_err(|err| StoreError::Corrupt {
        table: BUCKET,
        key: key.to_string(),
        reason: err.to_string(),
    })?;
    device.version = revision;
    Ok(device)
}

fn encode(device: &Device) -> Result<Bytes, StoreError> {
    serde_json::to_vec(device)
        .map(Bytes::from)
        .map_err(|err| StoreError::Corrupt {
            table: BUCKET,
            key: device.device_id.to_string(),
            reason: err.to_string(),
        })
}

/// Applies `watch` to `registry` until it fails or stalls; whether it delivered
/// anything.
///
/// The watch is an ordered consumer that lives on one NATS node; when that node dies
/// the client notices only after two missed 5 s heartbeats. Meanwhile revocations
/// through other hubs would not arrive, so the feed compares its position with the
/// bucket's last revision every [`STALL_CHECK`] and reopens itself when it has been
/// behind without progress for [`STALL_LIMIT`].
async fn drain(bucket: &kv::Store, registry: &Registry, mut watch: kv::Watch) -> bool {
    let mut delivered = false;
    let mut checks = tokio::time::interval(STALL_CHECK);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut behind_since: Option<Instant> = None;
    loop {
        tokio::select! {
            // Cancel-safe: an entry not yet taken stays in the subscription.
            entry = watch.next() => match entry {
                Some(Ok(entry)) => {
                    delivered = true;
                    behind_since = None;
                    apply(registry, entry);
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "registry change feed failed; reopening");
                    return delivered;
                }
                None => return delivered,
            },
            // Cancel-safe: a tick not taken is taken at the next poll.
            _ = checks.tick() => {
                let head = tokio::time::timeout(STALL_CHECK, bucket.stream.get_info()).await;
                match head {
                    Ok(Ok(info)) if info.state.last_sequence > registry.feed_position() => {
                        let since = *behind_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= STALL_LIMIT {
                            tracing::warn!(
                                position = registry.feed_position(),
                                head = info.state.last_sequence,
                                "registry change feed stalled; reopening"
                            );
                            return delivered;
                        }
                    }
                    Ok(Ok(_)) => behind_since = None,
                    // No answer (an election): judged at the next check.
                    Ok(Err(_)) | Err(_) => {}
                }
            }
        }
    }
}

/// Hands one entry of the change feed to the registry.
fn apply(registry: &Registry, entry: kv::Entry) {
    let revision = entry.revision;
    let Some(id) = keys::decode(&entry.key).and_then(|id| DeviceId::parse(&id).ok()) else {
        tracing::warn!(
            key = entry.key,
            "registry bucket holds a key that is no device id"
        );
        registry.skip_in_feed(revision);
        return;
    };
    let change = match entry.operation {
        kv::Operation::Put => match decode(&entry.key, &entry.value, revision) {
            Ok(device) if device.device_id == id => StoredChange::Put(device),
            Ok(_) | Err(_) => {
                tracing::warn!(key = entry.key, revision, "registry entry does not decode");
                registry.skip_in_feed(revision);
                return;
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => StoredChange::Deleted {
            id,
            version: revision,
        },
    };
    registry.apply_from_feed(change);
}

#[async_trait]
impl RegistryStore for NatsRegistry {
    async fn insert(&self, mut device: Device) -> Result<Device, RegistryStoreError> {
        let key = keys::encode(device.device_id.as_str());
        let value = encode(&device)?;
        match self
            .compare_and_set("create device", &key, &value, None)
            .await?
        {
            Cas::Done(revision) => {
                device.version = revision;
                Ok(device)
            }
            Cas::Conflict | Cas::Missing => Err(RegistryStoreError::AlreadyExists),
        }
    }

    async fn get(&self, id: &DeviceId) -> Result<Option<Device>, RegistryStoreError> {
        let key = keys::encode(id.as_str());
        let entry = self.entry(&key).await?;
        Ok(entry
            .map(|entry| decode(&key, &entry.value, entry.revision))
            .transpose()?)
    }

    async fn replace(
        &self,
        mut device: Device,
        expected_version: u64,
    ) -> Result<Device, RegistryStoreError> {
        let key = keys::encode(device.device_id.as_str());
        let value = encode(&device)?;
        match self
            .compare_and_set("update device", &key, &value, Some(expected_version))
            .await?
        {
            Cas::Done(revision) => {
                device.version = revision;
                Ok(device)
            }
            Cas::Conflict => Err(RegistryStoreError::VersionConflict),
            Cas::Missing => Err(RegistryStoreError::NotFound),
        }
    }

    async fn remove(
        &self,
        id: &DeviceId,
        expected_version: Option<u64>,
    ) -> Result<Removed, RegistryStoreError> {
        let key = keys::encode(id.as_str());
        // Deleting at the revision read returns exactly what was removed; without a
        // precondition, a write in between is read and deleted in turn.
        loop {
            let entry = self
                .entry(&key)
                .await?
                .ok_or(RegistryStoreError::NotFound)?;
            if expected_version.is_some_and(|expected| expected != entry.revision) {
                return Err(RegistryStoreError::VersionConflict);
            }
            let device = decode(&key, &entry.value, entry.revision)?;
            match self.delete_at(&key, entry.revision).await? {
                Cas::Done(version) => {
                    self.forget_session(&key).await;
                    return Ok(Removed { device, version });
                }
                Cas::Missing => return Err(RegistryStoreError::NotFound),
                Cas::Conflict if expected_version.is_some() => {
                    return Err(RegistryStoreError::VersionConflict);
                }
                Cas::Conflict => continue,
            }
        }
    }

    async fn list(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<Device>, RegistryStoreError> {
        // KV has no ordered scan: read every key, order the ids, read one page. The
        // registry lists from its mirror instead; this serves a store used alone.
        let mut keys: Vec<String> = self
            .store
            .retrying("list device keys", || async {
                let mut keys = Vec::new();
                let mut stream = self.bucket.keys().await.map_err(|e| e.to_string())?;
                while let Some(key) = stream.next().await {
                    keys.push(key.map_err(|e| e.to_string())?);
                }
                Ok::<_, String>(keys)
            })
            .await?;
        let mut ids: Vec<DeviceId> = keys
            .drain(..)
            .filter_map(|key| DeviceId::parse(&keys::decode(&key)?).ok())
            .filter(|id| after.is_none_or(|after| id > after))
            .collect();
        ids.sort_unstable();
        let mut devices = Vec::with_capacity(limit.min(ids.len()));
        for id in ids {
            if devices.len() == limit {
                break;
            }
            // Deleted since the key listing: skipped.
            if let Some(device) = self.get(&id).await? {
                devices.push(device);
            }
        }
        Ok(devices)
    }

    async fn head(&self) -> Result<Option<u64>, RegistryStoreError> {
        let info = self
            .store
            .retrying("read the registry's last revision", || {
                self.bucket.stream.get_info()
            })
            .await?;
        Ok(Some(info.state.last_sequence))
    }
}
