//! Consumer-group checkpoints in the replicated KV bucket `hub-checkpoints`, one key
//! per partition and group (`{partition}.{encoded group}`).

use async_nats::jetstream::kv;
use async_trait::async_trait;

use super::{NatsStore, keys};
use crate::storage::StoreError;
use crate::telemetry::CheckpointStore;

/// The bucket's name.
pub const BUCKET: &str = "hub-checkpoints";

/// Checkpoints on JetStream KV.
#[derive(Clone)]
pub struct NatsCheckpoints {
    store: NatsStore,
    bucket: kv::Store,
}

impl std::fmt::Debug for NatsCheckpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsCheckpoints")
    }
}

impl NatsCheckpoints {
    /// Opens (creating) the bucket.
    pub async fn open(store: &NatsStore) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            bucket: store.bucket(BUCKET, 1).await?,
        })
    }
}

impl NatsCheckpoints {
    /// The highest checkpoint of any group, per partition that has one (read when
    /// a partition's stream is created, see `telemetry_streams`).
    pub async fn highest_per_partition(
        &self,
    ) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
        use futures_util::TryStreamExt;
        let keys: Vec<String> = self
            .store
            .retrying("list checkpoints", || async {
                let keys = self.bucket.keys().await.map_err(|err| err.to_string())?;
                keys.try_collect::<Vec<String>>()
                    .await
                    .map_err(|err| err.to_string())
            })
            .await?;
        let mut highest = std::collections::BTreeMap::new();
        for key in keys {
            let Some(partition) = key.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let value = self
                .store
                .retrying("read checkpoint", || self.bucket.get(key.as_str()))
                .await?;
            let Some(offset) =
                value.and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse::<u64>().ok())
            else {
                continue;
            };
            let entry = highest.entry(partition).or_insert(offset);
            *entry = (*entry).max(offset);
        }
        Ok(highest)
    }
}

fn key(group: &str, partition: u32) -> String {
    format!("{partition}.{}", keys::encode(group))
}

#[async_trait]
impl CheckpointStore for NatsCheckpoints {
    async fn checkpoint(&self, group: &str, partition: u32) -> Result<Option<u64>, StoreError> {
        let key = key(group, partition);
        let value = self
            .store
            .retrying("read checkpoint", || self.bucket.get(key.as_str()))
            .await?;
        value
            .map(|bytes| {
                std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| StoreError::Corrupt {
                        table: BUCKET,
                        key: key.clone(),
                        reason: "not an offset".into(),
                    })
            })
            .transpose()
    }

    async fn set_checkpoint(
        &self,
        group: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StoreError> {
        let key = key(group, partition);
        let value = bytes::Bytes::from(offset.to_string());
        self.store
            .retrying("write checkpoint", || {
                self.bucket.put(key.as_str(), value.clone())
            })
            .await
            .map(drop)
    }
}
