//! The embedded backend's [`ProvisioningStore`]: enrollment groups, individual
//! enrollments and registrations in three redb tables of the hub's store (JSON
//! values keyed by id), each write a compare-and-set on the record's version inside
//! one write transaction.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::embedded::EmbeddedStore;
use crate::provisioning::{
    Enrollment, EnrollmentKind, ProvisioningStore, ProvisioningStoreError, Registration,
};
use crate::storage::StoreError;

/// Enrollment groups by group id.
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("dps_groups");
/// Individual enrollments by registration id.
const ENROLLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("dps_enrollments");
/// Registrations by registration id.
const REGISTRATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("dps_registrations");

/// Provisioning records in the embedded redb store.
#[derive(Clone)]
pub struct EmbeddedProvisioning {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedProvisioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedProvisioning")
    }
}

fn table_of(
    kind: EnrollmentKind,
) -> (
    TableDefinition<'static, &'static str, &'static [u8]>,
    &'static str,
) {
    match kind {
        EnrollmentKind::Group => (GROUPS, "dps_groups"),
        EnrollmentKind::Individual => (ENROLLMENTS, "dps_enrollments"),
    }
}

/// Something stored with a version.
trait Versioned: Serialize + DeserializeOwned + Send + 'static {
    fn key(&self) -> &str;
    fn version(&self) -> u64;
}

impl Versioned for Enrollment {
    fn key(&self) -> &str {
        &self.id
    }
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for Registration {
    fn key(&self) -> &str {
        &self.registration_id
    }
    fn version(&self) -> u64 {
        self.version
    }
}

fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|err| StoreError::Corrupt {
        table,
        key: key.to_string(),
        reason: err.to_string(),
    })
}

impl EmbeddedProvisioning {
    /// The provisioning tables of `store`, created when missing.
    pub fn open(store: &EmbeddedStore) -> Result<Self, StoreError> {
        let db = store.database();
        let txn = db.begin_write()?;
        txn.open_table(GROUPS)?;
        txn.open_table(ENROLLMENTS)?;
        txn.open_table(REGISTRATIONS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, ProvisioningStoreError> + Send + 'static,
    ) -> Result<T, ProvisioningStoreError> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(|err| StoreError::Task(err.to_string()))?
    }

    async fn get<T: Versioned>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        name: &'static str,
        key: &str,
    ) -> Result<Option<T>, ProvisioningStoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(StoreError::from)?;
            let table = txn.open_table(table).map_err(StoreError::from)?;
            let found = table.get(key.as_str()).map_err(StoreError::from)?;
            Ok(found
                .map(|bytes| decode(name, &key, bytes.value()))
                .transpose()?)
        })
        .await
    }

    async fn all<T: Versioned>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        name: &'static str,
    ) -> Result<Vec<T>, ProvisioningStoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(StoreError::from)?;
            let table = txn.open_table(table).map_err(StoreError::from)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(StoreError::from)? {
                let (key, value) = entry.map_err(StoreError::from)?;
                out.push(decode(name, key.value(), value.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn put<T: Versioned>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        name: &'static str,
        record: T,
        expected: Option<u64>,
    ) -> Result<T, ProvisioningStoreError> {
        self.blocking(move |db| {
            let bytes = serde_json::to_vec(&record).map_err(|err| StoreError::Corrupt {
                table: name,
                key: record.key().to_string(),
                reason: err.to_string(),
            })?;
            let txn = db.begin_write().map_err(StoreError::from)?;
            {
                let mut table = txn.open_table(table).map_err(StoreError::from)?;
                let stored = match table.get(record.key()).map_err(StoreError::from)? {
                    Some(bytes) => Some(decode::<T>(name, record.key(), bytes.value())?.version()),
                    None => None,
                };
                if stored != expected {
                    return Err(ProvisioningStoreError::VersionConflict);
                }
                table
                    .insert(record.key(), bytes.as_slice())
                    .map_err(StoreError::from)?;
            }
            txn.commit().map_err(StoreError::from)?;
            Ok(record)
        })
        .await
    }

    async fn remove<T: Versioned>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        name: &'static str,
        key: &str,
        expected: Option<u64>,
    ) -> Result<Option<T>, ProvisioningStoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(StoreError::from)?;
            let removed = {
                let mut table = txn.open_table(table).map_err(StoreError::from)?;
                let stored = match table.get(key.as_str()).map_err(StoreError::from)? {
                    Some(bytes) => Some(decode::<T>(name, &key, bytes.value())?),
                    None => None,
                };
                match (&stored, expected) {
                    (None, _) => return Ok(None),
                    (Some(stored), Some(expected)) if stored.version() != expected => {
                        return Err(ProvisioningStoreError::VersionConflict);
                    }
                    _ => {}
                }
                table.remove(key.as_str()).map_err(StoreError::from)?;
                stored
            };
            txn.commit().map_err(StoreError::from)?;
            Ok(removed)
        })
        .await
    }
}

#[async_trait]
impl ProvisioningStore for EmbeddedProvisioning {
    async fn enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
    ) -> Result<Option<Enrollment>, ProvisioningStoreError> {
        let (table, name) = table_of(kind);
        self.get(table, name, id).await
    }

    async fn enrollments(
        &self,
        kind: EnrollmentKind,
    ) -> Result<Vec<Enrollment>, ProvisioningStoreError> {
        let (table, name) = table_of(kind);
        self.all(table, name).await
    }

    async fn put_enrollment(
        &self,
        kind: EnrollmentKind,
        enrollment: Enrollment,
        expected: Option<u64>,
    ) -> Result<Enrollment, ProvisioningStoreError> {
        let (table, name) = table_of(kind);
        self.put(table, name, enrollment, expected).await
    }

    async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
        expected: Option<u64>,
    ) -> Result<Option<Enrollment>, ProvisioningStoreError> {
        let (table, name) = table_of(kind);
        self.remove(table, name, id, expected).await
    }

    async fn registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<Registration>, ProvisioningStoreError> {
        self.get(REGISTRATIONS, "dps_registrations", registration_id)
            .await
    }

    async fn registrations(&self) -> Result<Vec<Registration>, ProvisioningStoreError> {
        self.all(REGISTRATIONS, "dps_registrations").await
    }

    async fn put_registration(
        &self,
        registration: Registration,
        expected: Option<u64>,
    ) -> Result<Registration, ProvisioningStoreError> {
        self.put(REGISTRATIONS, "dps_registrations", registration, expected)
            .await
    }

    async fn delete_registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<Registration>, ProvisioningStoreError> {
        self.remove(REGISTRATIONS, "dps_registrations", registration_id, None)
            .await
    }
}
