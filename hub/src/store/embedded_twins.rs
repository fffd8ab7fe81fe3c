//! The embedded backend's [`TwinStore`]: compare-and-set against the newest accepted
//! revision of each twin, and a group committer that writes accepted twins to redb
//! in batches.
//!
//! One process writes the data directory, so the newest accepted revision of every
//! twin is known here: a [`TwinStore::put`] is checked and accepted (queued) at
//! once, under one lock, and its caller waits for the batch commit that makes it
//! durable. Many devices' changes share one fsync. The revision is the twin's
//! version, which every change bumps. If a commit fails, every queued change is
//! refused (later ones may build on the lost one) and the revisions are reloaded
//! from the file, so no change the file lost is ever acknowledged or built on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::embedded::EmbeddedStore;
use crate::registry::DeviceId;
use crate::storage::StoreError;
use crate::twins::document::TwinDocument;
use crate::twins::{
    PutError, Revision, StoredTwin, TwinChange, TwinSnapshot, TwinStore, TwinWrite,
};

/// Most twin changes committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Twins in the embedded redb store.
#[derive(Clone)]
pub struct EmbeddedTwins {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EmbeddedTwins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedTwins")
    }
}

struct Shared {
    store: EmbeddedStore,
    state: Mutex<State>,
}

struct State {
    latest: HashMap<DeviceId, Latest>,
    queue: mpsc::UnboundedSender<Write>,
}

/// The newest accepted revision of a twin, and its document while the commit that
/// makes it durable is still to come.
#[derive(Debug, Clone)]
struct Latest {
    revision: Revision,
    pending: Option<Arc<TwinDocument>>,
}

struct Write {
    device: DeviceId,
    twin: Arc<TwinDocument>,
    done: oneshot::Sender<Result<(), String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl EmbeddedTwins {
    /// The twins of `store`, with their committer thread started.
    pub fn open(store: EmbeddedStore) -> Result<Self, StoreError> {
        let (queue, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            store,
            state: Mutex::new(State {
                latest: HashMap::new(),
                queue,
            }),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("twin-committer".into())
            .spawn(move || commit_loop(rx, weak))
            .map_err(|err| {
                StoreError::Backend(format!("cannot start the twin committer: {err}"))
            })?;
        Ok(Self { shared })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || op(&shared.store))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))?
    }
}

fn stored(twin: TwinDocument) -> StoredTwin {
    StoredTwin {
        revision: twin.version,
        twin,
        desired_patch: None,
    }
}

#[async_trait]
impl TwinStore for EmbeddedTwins {
    async fn load_all(&self) -> Result<TwinSnapshot, StoreError> {
        let twins = self.blocking(|store| store.load_twins()).await?;
        let mut state = self.shared.lock();
        for (id, twin) in &twins {
            state.latest.entry(id.clone()).or_insert(Latest {
                revision: twin.version,
                pending: None,
            });
        }
        Ok(TwinSnapshot {
            twins: twins
                .into_iter()
                .map(|(id, twin)| (id, stored(twin)))
                .collect(),
            revision: 0,
        })
    }

    async fn get(&self, id: &DeviceId) -> Result<Option<StoredTwin>, StoreError> {
        {
            let state = self.shared.lock();
            match state.latest.get(id) {
                None => return Ok(None),
                Some(Latest {
                    pending: Some(twin),
                    ..
                }) => return Ok(Some(stored((**twin).clone()))),
                Some(_) => {}
            }
        }
        // A point read of a small record from redb's page cache: cheaper inline than
        // a hop to the blocking pool, and only needed after a lost race.
        Ok(self.shared.store.read_twin(id)?.map(stored))
    }

    async fn put(
        &self,
        id: &DeviceId,
        write: TwinWrite,
        expected: Revision,
    ) -> Result<Revision, PutError> {
        let twin = Arc::new(write.twin);
        let revision = twin.version;
        let (done, committed) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            let current = state.latest.get(id).map_or(0, |latest| latest.revision);
            if current != expected || revision <= current {
                return Err(PutError::Conflict);
            }
            // Queued under the lock, so the committer sees a twin's changes in the
            // order they were accepted.
            state
                .queue
                .send(Write {
                    device: id.clone(),
                    twin: Arc::clone(&twin),
                    done,
                })
                .map_err(|_| StoreError::Backend("twin committer stopped".into()))?;
            state.latest.insert(
                id.clone(),
                Latest {
                    revision,
                    pending: Some(twin),
                },
            );
        }
        match committed.await {
            Ok(Ok(())) => Ok(revision),
            Ok(Err(message)) => Err(StoreError::Backend(message).into()),
            Err(_) => Err(StoreError::Backend("twin committer stopped".into()).into()),
        }
    }

    fn created(&self, id: &DeviceId) {
        // A new device has no twin yet; a write of an earlier device under the id
        // that is still queued must not be committed.
        self.shared.lock().latest.remove(id);
    }

    fn deleted(&self, id: &DeviceId, _known: Revision) {
        // The registry deleted the stored twin with the device.
        self.shared.lock().latest.remove(id);
    }

    async fn watch(
        &self,
        _after: Revision,
    ) -> Result<Option<mpsc::Receiver<TwinChange>>, StoreError> {
        // This process is the only writer: its cache is authoritative.
        Ok(None)
    }
}

fn commit_loop(mut rx: mpsc::UnboundedReceiver<Write>, shared: Weak<Shared>) {
    let mut batch: Vec<Write> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let rows = rows_to_write(&batch, &shared.lock().latest);
        match shared.store.write_twins(&rows) {
            Ok(()) => {
                {
                    // Durable now: reads go to the file again.
                    let mut state = shared.lock();
                    for (id, twin) in &rows {
                        if let Some(latest) = state.latest.get_mut(id)
                            && latest.revision == twin.version
                        {
                            latest.pending = None;
                        }
                    }
                }
                // Let go of the store before answering: once the last writer has its
                // answer and drops the twins, the database file must be closed.
                drop(shared);
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
                // Under the lock nothing new is accepted: refuse what is queued (it
                // may build on the lost change), then reload the durable revisions.
                let mut state = shared.lock();
                while let Ok(write) = rx.try_recv() {
                    let _ = write.done.send(Err(message.clone()));
                }
                match shared.store.load_twins() {
                    Ok(stored) => {
                        state.latest = stored
                            .into_iter()
                            .map(|(id, twin)| {
                                let latest = Latest {
                                    revision: twin.version,
                                    pending: None,
                                };
                                (id, latest)
                            })
                            .collect();
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "cannot reload twins after a failed commit");
                        // Nothing is known to be durable beyond what was: accept no
                        // change until a reload succeeds (every put conflicts and
                        // reads the file again).
                        for latest in state.latest.values_mut() {
                            latest.pending = None;
                            latest.revision = u64::MAX;
                        }
                    }
                }
            }
        }
    }
}

/// The rows a batch writes: the last change of each device in the batch (it carries
/// the earlier ones), unless the device was deleted meanwhile (no accepted revision)
/// or deleted and created again (its accepted revision is older than the queued
/// change): a late write must not bring back a deleted device's twin.
fn rows_to_write(
    batch: &[Write],
    latest: &HashMap<DeviceId, Latest>,
) -> Vec<(DeviceId, Arc<TwinDocument>)> {
    let mut last: HashMap<&DeviceId, &Arc<TwinDocument>> = HashMap::new();
    for write in batch {
        last.insert(&write.device, &write.twin);
    }
    last.into_iter()
        .filter(|(id, twin)| {
            latest
                .get(*id)
                .is_some_and(|current| current.revision >= twin.version)
        })
        .map(|(id, twin)| (id.clone(), Arc::clone(twin)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: &str, version: u64) -> Write {
        let (done, _) = oneshot::channel();
        Write {
            device: DeviceId::parse(id).unwrap(),
            twin: Arc::new(TwinDocument {
                version,
                ..TwinDocument::new()
            }),
            done,
        }
    }

    fn latest(entries: &[(&str, u64)]) -> HashMap<DeviceId, Latest> {
        entries
            .iter()
            .map(|(id, revision)| {
                let latest = Latest {
                    revision: *revision,
                    pending: None,
                };
                (DeviceId::parse(id).unwrap(), latest)
            })
            .collect()
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
        let accepted = latest(&[("a", 3), ("reborn", 1)]);
        let rows = rows_to_write(&batch, &accepted);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0.as_str(), "a");
        assert_eq!(rows[0].1.version, 3);
    }

    fn twin(version: u64) -> TwinWrite {
        TwinWrite {
            twin: TwinDocument {
                version,
                ..TwinDocument::new()
            },
            desired_patch: None,
        }
    }

    #[tokio::test]
    async fn a_put_on_a_stale_revision_conflicts_and_the_newest_twin_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let id = DeviceId::parse("d1").unwrap();
        {
            let twins = EmbeddedTwins::open(EmbeddedStore::open(&path).unwrap()).unwrap();
            assert!(twins.load_all().await.unwrap().twins.is_empty());
            assert_eq!(twins.put(&id, twin(2), 0).await.unwrap(), 2);
            // Another writer read the twin before that change: it loses.
            assert!(matches!(
                twins.put(&id, twin(2), 0).await,
                Err(PutError::Conflict)
            ));
            let current = twins.get(&id).await.unwrap().unwrap();
            assert_eq!(current.revision, 2);
            assert_eq!(twins.put(&id, twin(3), current.revision).await.unwrap(), 3);
            // Concurrent writers on the same revision: exactly one wins.
            let (a, b) = tokio::join!(twins.put(&id, twin(4), 3), twins.put(&id, twin(4), 3));
            assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
        }
        let twins = EmbeddedTwins::open(EmbeddedStore::open(&path).unwrap()).unwrap();
        let loaded = twins.load_all().await.unwrap().twins;
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].1.revision, 4);
        assert!(matches!(
            twins.put(&id, twin(4), 3).await,
            Err(PutError::Conflict)
        ));
        // A deleted device's twin is gone; one created again starts afresh.
        twins.deleted(&id, 4);
        assert_eq!(twins.get(&id).await.unwrap(), None);
        twins.created(&id);
        assert_eq!(twins.put(&id, twin(2), 0).await.unwrap(), 2);
    }
}
