//! Provisioning records in the replicated KV bucket `hub-provisioning` (cluster mode):
//! enrollment groups under `g.{id}`, individual enrollments under `e.{id}`,
//! registrations under `r.{id}` (ids through [`keys::encode`]), JSON values, and the
//! cluster's ID scope under `scope`. A write
//! is a compare-and-set on the KV revision of the entry whose record carries the
//! version the capability expects, so every hub node registers against the same
//! enrollments and no two nodes both win a race for one registration.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{NatsStore, keys};
use crate::provisioning::{
    Enrollment, EnrollmentKind, IdScope, ProvisioningStore, ProvisioningStoreError, Registration,
};
use crate::storage::StoreError;

/// The bucket's name.
pub const BUCKET: &str = "hub-provisioning";

/// Provisioning records on JetStream KV.
pub struct NatsProvisioning {
    store: NatsStore,
    bucket: kv::Store,
}

impl std::fmt::Debug for NatsProvisioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsProvisioning")
    }
}

fn prefix(kind: EnrollmentKind) -> &'static str {
    match kind {
        EnrollmentKind::Group => "g.",
        EnrollmentKind::Individual => "e.",
    }
}

const REGISTRATIONS: &str = "r.";
/// The cluster's ID scope (every node answers the same one).
const SCOPE_KEY: &str = "scope";

/// A record with the version the capability compares.
trait Versioned: Serialize + DeserializeOwned {
    fn version(&self) -> u64;
}

impl Versioned for Enrollment {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for Registration {
    fn version(&self) -> u64 {
        self.version
    }
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
        table: BUCKET,
        key: key.to_string(),
        reason: err.to_string(),
    })
}

impl NatsProvisioning {
    /// Opens (creating) the bucket.
    pub async fn open(store: &NatsStore) -> Result<Self, StoreError> {
        Ok(Self {
            store: store.clone(),
            bucket: store.bucket(BUCKET, 1).await?,
        })
    }

    /// The cluster's ID scope: `local` (this node's, from its data dir) if the cluster
    /// has none yet, else the cluster's, which then replaces this node's file at
    /// `path` so that `hub dps scope` prints what devices must use.
    pub async fn adopt_scope(
        &self,
        local: IdScope,
        path: &std::path::Path,
    ) -> Result<IdScope, StoreError> {
        let value = Bytes::from(local.as_str().to_string());
        let created = self
            .store
            .retrying("publish the ID scope", || async {
                match self.bucket.create(SCOPE_KEY, value.clone()).await {
                    Ok(_) => Ok(true),
                    Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                    Err(err) => Err(err),
                }
            })
            .await?;
        if created {
            return Ok(local);
        }
        let stored = self
            .entry(SCOPE_KEY)
            .await?
            .ok_or_else(|| StoreError::Backend("the cluster's ID scope vanished".into()))?;
        let scope = std::str::from_utf8(&stored.value)
            .ok()
            .and_then(IdScope::parse)
            .ok_or_else(|| StoreError::Corrupt {
                table: BUCKET,
                key: SCOPE_KEY.into(),
                reason: "not an ID scope".into(),
            })?;
        if scope != local {
            certs::write_atomically(path, format!("{scope}\n").as_bytes(), true)
                .map_err(|err| StoreError::Backend(format!("{}: {err}", path.display())))?;
            tracing::info!(%scope, "adopted the cluster's provisioning ID scope");
        }
        Ok(scope)
    }

    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, StoreError> {
        let entry = self
            .store
            .retrying("read a provisioning record", || self.bucket.entry(key))
            .await?;
        Ok(entry.filter(|entry| entry.operation == kv::Operation::Put))
    }

    async fn get<T: Versioned>(&self, key: &str) -> Result<Option<T>, ProvisioningStoreError> {
        Ok(self
            .entry(key)
            .await?
            .map(|entry| decode(key, &entry.value))
            .transpose()?)
    }

    async fn all<T: Versioned>(&self, prefix: &str) -> Result<Vec<T>, ProvisioningStoreError> {
        let listed = self
            .store
            .retrying("list provisioning records", || async {
                let mut names = self.bucket.keys().await.map_err(|err| err.to_string())?;
                let mut keys = Vec::new();
                while let Some(key) = names.next().await {
                    let key = key.map_err(|err| err.to_string())?;
                    if key.starts_with(prefix) {
                        keys.push(key);
                    }
                }
                Ok::<_, String>(keys)
            })
            .await?;
        let mut out = Vec::with_capacity(listed.len());
        for key in listed {
            if let Some(record) = self.get(&key).await? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Writes `record` under `key` if the stored record has version `expected`
    /// (`None`: none is stored).
    async fn put<T: Versioned>(
        &self,
        key: &str,
        record: T,
        expected: Option<u64>,
    ) -> Result<T, ProvisioningStoreError> {
        let value =
            Bytes::from(
                serde_json::to_vec(&record).map_err(|err| StoreError::Corrupt {
                    table: BUCKET,
                    key: key.to_string(),
                    reason: err.to_string(),
                })?,
            );
        let current = self.entry(key).await?;
        let revision = match (&current, expected) {
            (None, None) => None,
            (Some(entry), Some(expected))
                if decode::<T>(key, &entry.value)?.version() == expected =>
            {
                Some(entry.revision)
            }
            _ => return Err(ProvisioningStoreError::VersionConflict),
        };
        let retried = AtomicBool::new(false);
        let written = self
            .store
            .retrying("write a provisioning record", || async {
                let again = retried.swap(true, Ordering::Relaxed);
                let result = match revision {
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
                match result {
                    Ok(_) => Ok(true),
                    Err(Err(err)) => Err(err),
                    // A conflict: ours if an earlier try of this call wrote exactly
                    // this value (its answer was lost), someone else's otherwise.
                    Err(Ok(())) => match self.bucket.entry(key).await.map_err(|e| e.to_string())? {
                        Some(entry) if again && entry.value == value => Ok(true),
                        _ => Ok(false),
                    },
                }
            })
            .await?;
        match written {
            true => Ok(record),
            false => Err(ProvisioningStoreError::VersionConflict),
        }
    }

    async fn remove<T: Versioned>(
        &self,
        key: &str,
        expected: Option<u64>,
    ) -> Result<Option<T>, ProvisioningStoreError> {
        let Some(entry) = self.entry(key).await? else {
            return Ok(None);
        };
        let stored: T = decode(key, &entry.value)?;
        if expected.is_some_and(|expected| stored.version() != expected) {
            return Err(ProvisioningStoreError::VersionConflict);
        }
        self.store
            .retrying("delete a provisioning record", || {
                self.bucket
                    .delete_expect_revision(key, Some(entry.revision))
            })
            .await
            .map_err(|_| ProvisioningStoreError::VersionConflict)?;
        Ok(Some(stored))
    }
}

#[async_trait]
impl ProvisioningStore for NatsProvisioning {
    async fn enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
    ) -> Result<Option<Enrollment>, ProvisioningStoreError> {
        self.get(&format!("{}{}", prefix(kind), keys::encode(id)))
            .await
    }

    async fn enrollments(
        &self,
        kind: EnrollmentKind,
    ) -> Result<Vec<Enrollment>, ProvisioningStoreError> {
        let mut all: Vec<Enrollment> = self.all(prefix(kind)).await?;
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    async fn put_enrollment(
        &self,
        kind: EnrollmentKind,
        enrollment: Enrollment,
        expected: Option<u64>,
    ) -> Result<Enrollment, ProvisioningStoreError> {
        let key = format!("{}{}", prefix(kind), keys::encode(&enrollment.id));
        self.put(&key, enrollment, expected).await
    }

    async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
        expected: Option<u64>,
    ) -> Result<Option<Enrollment>, ProvisioningStoreError> {
        self.remove(&format!("{}{}", prefix(kind), keys::encode(id)), expected)
            .await
    }

    async fn registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<Registration>, ProvisioningStoreError> {
        self.get(&format!("{REGISTRATIONS}{}", keys::encode(registration_id)))
            .await
    }

    async fn registrations(&self) -> Result<Vec<Registration>, ProvisioningStoreError> {
        let mut all: Vec<Registration> = self.all(REGISTRATIONS).await?;
        all.sort_by(|a, b| a.registration_id.cmp(&b.registration_id));
        Ok(all)
    }

    async fn put_registration(
        &self,
        registration: Registration,
        expected: Option<u64>,
    ) -> Result<Registration, ProvisioningStoreError> {
        let key = format!(
            "{REGISTRATIONS}{}",
            keys::encode(&registration.registration_id)
        );
        self.put(&key, registration, expected).await
    }

    async fn delete_registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<Registration>, ProvisioningStoreError> {
        self.remove(
            &format!("{REGISTRATIONS}{}", keys::encode(registration_id)),
            None,
        )
        .await
    }
}
