//! The keys every hub node of a cluster must share: the owner key (`service.key`,
//! which signs service tokens: a back end may call any node) and the development CA
//! (`certs/ca.pem` and `certs/ca.key`: a device on TLS may land on any node, and
//! device certificates are checked against it). They live in the replicated KV bucket
//! `hub-cluster-secrets` under one key, written once by the first node to start
//! (create-if-absent, so two first starts cannot both win) and adopted by every other
//! node into its data directory (keys mode 0600) before anything reads them.
//!
//! The shared access policies (`policies.json`) live in the same bucket under a key of
//! their own, because unlike the owner key they change while the cluster runs: `hub
//! policy rotate` on any node rewrites that node's file, the node's file watch puts
//! the new set into the bucket, and every node watches the key, swapping the set into
//! its live [`Policies`] and its own file (so `hub connection-string` on any node
//! prints the current key).

use std::path::{Path, PathBuf};

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::NatsStore;
use crate::auth::policy::{Policies, PolicySet};
use crate::auth::service::ServiceKey;
use crate::data_dir::DataDir;
use crate::storage::StoreError;

/// The bucket's name.
pub const BUCKET: &str = "hub-cluster-secrets";
/// The one key holding every shared file (one value, so they are adopted together).
const KEY: &str = "v1";
/// The key holding the shared access policies (`policies.json`).
const POLICIES_KEY: &str = "policies";
/// Pauses between attempts to re-open a broken watch of the policies.
const WATCH_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// The shared files' contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Shared {
    service_key: String,
    ca_pem: String,
    ca_key: String,
}

fn files(data_dir: &DataDir) -> [PathBuf; 3] {
    let certs = data_dir.certs_dir();
    [
        data_dir.service_key_path(),
        certs.join("ca.pem"),
        certs.join("ca.key"),
    ]
}

fn io_error(path: &Path, err: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        reason: err.to_string(),
    }
}

fn read_local(data_dir: &DataDir) -> Result<Shared, StoreError> {
    let [service_key, ca_pem, ca_key] = files(data_dir);
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|err| io_error(path, err));
    Ok(Shared {
        service_key: read(&service_key)?,
        ca_pem: read(&ca_pem)?,
        ca_key: read(&ca_key)?,
    })
}

/// Makes this node's owner key and CA the cluster's: publishes the local ones if the
/// cluster has none yet, otherwise writes the cluster's into the data directory
/// (re-issuing the server certificate when the CA changed). Runs before the data
/// directory's CA and key are loaded.
pub async fn adopt(store: &NatsStore, data_dir: &DataDir) -> Result<(), StoreError> {
    let bucket = store.bucket(BUCKET, 1).await?;
    let shared = match read_shared(store, &bucket).await? {
        Some(shared) => shared,
        None => {
            // First node: its own (created if missing) become the cluster's, unless
            // another first node won the race.
            data_dir
                .ensure_ca()
                .map_err(|err| io_error(&data_dir.certs_dir(), err))?;
            ServiceKey::load_or_create(&data_dir.service_key_path())
                .map_err(|err| io_error(&data_dir.service_key_path(), err))?;
            let local = read_local(data_dir)?;
            let value = Bytes::from(
                serde_json::to_vec(&local)
                    .map_err(|err| StoreError::Backend(format!("encode secrets: {err}")))?,
            );
            let created = store
                .retrying("publish the cluster's keys", || async {
                    match bucket.create(KEY, value.clone()).await {
                        Ok(_) => Ok(true),
                        Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                        Err(err) => Err(err),
                    }
                })
                .await?;
            if created {
                tracing::info!("this node's owner key and CA are now the cluster's");
                return Ok(());
            }
            read_shared(store, &bucket)
                .await?
                .ok_or_else(|| StoreError::Backend("the cluster's keys vanished".into()))?
        }
    };
    let local = read_local(data_dir).ok();
    if local.as_ref() == Some(&shared) {
        return Ok(());
    }
    if local.is_some() {
        tracing::warn!(
            "this node's owner key or CA differ from the cluster's; adopting the cluster's"
        );
    }
    let [service_key, ca_pem, ca_key] = files(data_dir);
    // The CA certificate is public, as on a single node; the keys are private (0600).
    for (path, contents, private) in [
        (&service_key, &shared.service_key, true),
        (&ca_pem, &shared.ca_pem, false),
        (&ca_key, &shared.ca_key, true),
    ] {
        certs::write_atomically(path, contents.as_bytes(), private)
            .map_err(|err| io_error(path, err))?;
    }
    // The server certificate was issued by the previous CA: forgetting its names makes
    // the start-up issue a new one from the adopted CA.
    let sans = data_dir.certs_dir().join("server.sans");
    if let Err(err) = std::fs::remove_file(&sans)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        return Err(io_error(&sans, err));
    }
    tracing::info!("adopted the cluster's owner key and CA");
    Ok(())
}

async fn read_shared(store: &NatsStore, bucket: &kv::Store) -> Result<Option<Shared>, StoreError> {
    let value = store
        .retrying("read the cluster's keys", || bucket.get(KEY))
        .await?;
    value
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|err| StoreError::Corrupt {
                table: BUCKET,
                key: KEY.to_string(),
                reason: err.to_string(),
            })
        })
        .transpose()
}

/// Makes the cluster's shared access policies this node's: publishes the local ones
/// (created if missing) when the cluster has none yet, otherwise writes the cluster's
/// into the data directory. Returns the set now in force.
pub async fn adopt_policies(
    store: &NatsStore,
    data_dir: &DataDir,
) -> Result<PolicySet, StoreError> {
    let path = data_dir.policies_path();
    let bucket = store.bucket(BUCKET, 1).await?;
    let shared = match read_policies(store, &bucket).await? {
        Some(shared) => shared,
        None => {
            let local = PolicySet::load_or_create(&path).map_err(|err| io_error(&path, err))?;
            let value = Bytes::from(local.to_json());
            let created = store
                .retrying("publish the cluster's policies", || async {
                    match bucket.create(POLICIES_KEY, value.clone()).await {
                        Ok(_) => Ok(true),
                        Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                        Err(err) => Err(err),
                    }
                })
                .await?;
            if created {
                tracing::info!("this node's shared access policies are now the cluster's");
                return Ok(local);
            }
            read_policies(store, &bucket)
                .await?
                .ok_or_else(|| StoreError::Backend("the cluster's policies vanished".into()))?
        }
    };
    if PolicySet::load(&path).ok().as_ref() != Some(&shared) {
        shared.write(&path).map_err(|err| io_error(&path, err))?;
        tracing::info!("adopted the cluster's shared access policies");
    }
    Ok(shared)
}

async fn read_policies(
    store: &NatsStore,
    bucket: &kv::Store,
) -> Result<Option<PolicySet>, StoreError> {
    let value = store
        .retrying("read the cluster's policies", || bucket.get(POLICIES_KEY))
        .await?;
    value
        .map(|bytes| {
            PolicySet::from_json(&bytes).map_err(|reason| StoreError::Corrupt {
                table: BUCKET,
                key: POLICIES_KEY.to_string(),
                reason,
            })
        })
        .transpose()
}

/// Publishes a set read from this node's file (a rotation here) to the other nodes,
/// unless the bucket holds it already (the file was written from the bucket).
pub async fn publish_policies(store: &NatsStore, set: PolicySet) -> Result<(), StoreError> {
    let bucket = store.bucket(BUCKET, 1).await?;
    if read_policies(store, &bucket).await?.as_ref() == Some(&set) {
        return Ok(());
    }
    let value = Bytes::from(set.to_json());
    store
        .retrying("publish rotated policies", || {
            bucket.put(POLICIES_KEY, value.clone())
        })
        .await?;
    tracing::info!("published rotated shared access policies to the cluster");
    Ok(())
}

/// Follows the bucket's policies key for the hub's lifetime: every new value is
/// swapped into `policies` and written to `path` (when it differs), re-opening the
/// watch whenever it breaks.
pub fn spawn_policy_watch(
    store: &NatsStore,
    policies: Arc<Policies>,
    path: PathBuf,
) -> tokio::task::JoinHandle<()> {
    let store = store.clone();
    tokio::spawn(async move {
        let mut pause = WATCH_BACKOFF.0;
        loop {
            let watch = match store.bucket(BUCKET, 1).await {
                Ok(bucket) => bucket
                    .watch(POLICIES_KEY)
                    .await
                    .map_err(|err| err.to_string()),
                Err(err) => Err(err.to_string()),
            };
            match watch {
                Ok(mut watch) => {
                    while let Some(entry) = watch.next().await {
                        let entry = match entry {
                            Ok(entry) => entry,
                            Err(err) => {
                                tracing::warn!(%err, "policy watch failed; opening it again");
                                break;
                            }
                        };
                        pause = WATCH_BACKOFF.0;
                        if entry.operation != kv::Operation::Put {
                            continue;
                        }
                        match PolicySet::from_json(&entry.value) {
                            Ok(set) => {
                                if policies.replace(set.clone()) {
                                    tracing::info!("shared access policies changed in the cluster");
                                }
                                if PolicySet::load(&path).ok().as_ref() != Some(&set)
                                    && let Err(err) = set.write(&path)
                                {
                                    tracing::warn!(%err, "cannot write the cluster's policies to the data dir");
                                }
                            }
                            Err(reason) => {
                                tracing::warn!(%reason, "the cluster's policies are invalid; keeping the current keys")
                            }
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot watch the cluster's policies; trying again")
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(WATCH_BACKOFF.1);
        }
    })
}
