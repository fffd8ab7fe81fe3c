//! Persistent MQTT sessions (the subscriptions of CleanSession=0 devices) in the
//! replicated KV bucket `hub-sessions` (key: the encoded device id, value: the
//! subscriptions' JSON), so a session survives a hub restart and follows its device
//! to whichever hub it reconnects to.

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;

use super::{NatsStore, keys};
use crate::delivery::{SessionStore, StoredSession};
use crate::registry::DeviceId;
use crate::storage::StoreError;

/// The bucket's name.
pub const BUCKET: &str = "hub-sessions";

/// Sessions on JetStream KV.
#[derive(Clone)]
pub struct NatsSessions {
    store: NatsStore,
    bucket: kv::Store,
}

impl std::fmt::Debug for NatsSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsSessions")
    }
}

impl NatsSessions {
    /// Opens (creating) the bucket.
    pub async fn open(store: &NatsStore) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            bucket: store.bucket(BUCKET, 1).await?,
        })
    }
}

#[async_trait]
impl SessionStore for NatsSessions {
    async fn load(&self, device: &DeviceId) -> Result<Option<StoredSession>, StoreError> {
        let key = keys::encode(device.as_str());
        let value = self
            .store
            .retrying("read session", || self.bucket.get(key.as_str()))
            .await?;
        value
            .map(|bytes| {
                StoredSession::decode(&bytes).map_err(|err| StoreError::Corrupt {
                    table: BUCKET,
                    key: device.to_string(),
                    reason: err.to_string(),
                })
            })
            .transpose()
    }

    async fn save(&self, device: &DeviceId, session: &StoredSession) -> Result<(), StoreError> {
        let key = keys::encode(device.as_str());
        let value =
            Bytes::from(
                serde_json::to_vec(session).map_err(|err| StoreError::Corrupt {
                    table: BUCKET,
                    key: device.to_string(),
                    reason: err.to_string(),
                })?,
            );
        // Last writer wins: a device holds one connection at a time, and the newest
        // connection's subscriptions are the session.
        self.store
            .retrying("write session", || {
                self.bucket.put(key.as_str(), value.clone())
            })
            .await
            .map(drop)
    }

    async fn remove(&self, device: &DeviceId) -> Result<(), StoreError> {
        let key = keys::encode(device.as_str());
        // Most CleanSession=1 connects have no stored session: a read answers that
        // without writing a delete marker on every connect.
        let exists = self
            .store
            .retrying("read session", || self.bucket.get(key.as_str()))
            .await?
            .is_some();
        if !exists {
            return Ok(());
        }
        self.store
            .retrying("delete session", || self.bucket.delete(key.as_str()))
            .await
    }
}
