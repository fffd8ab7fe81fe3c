//! The provisioning capability's storage port: enrollment groups, individual
//! enrollments and registrations, each keyed by its id, written with compare-and-set
//! on the record's version. Backends implement it natively (redb tables embedded).

use async_trait::async_trait;

use super::enrollment::{Enrollment, EnrollmentKind};
use super::registration::Registration;
use crate::storage::StoreError;

/// Failures of a provisioning backend.
#[derive(Debug, thiserror::Error)]
pub enum ProvisioningStoreError {
    /// The stored version is not the expected one (or a record exists where none was
    /// expected): someone else wrote first.
    #[error("the record was modified concurrently")]
    VersionConflict,
    /// The backend failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Enrollments and registrations.
#[async_trait]
pub trait ProvisioningStore: Send + Sync + 'static {
    /// The enrollment of `kind` with `id`, if any.
    async fn enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
    ) -> Result<Option<Enrollment>, ProvisioningStoreError>;

    /// Every enrollment of `kind`, by id.
    async fn enrollments(
        &self,
        kind: EnrollmentKind,
    ) -> Result<Vec<Enrollment>, ProvisioningStoreError>;

    /// Stores `enrollment` if the stored one has version `expected` (`None`: if
    /// there is none).
    async fn put_enrollment(
        &self,
        kind: EnrollmentKind,
        enrollment: Enrollment,
        expected: Option<u64>,
    ) -> Result<Enrollment, ProvisioningStoreError>;

    /// Removes the enrollment (when its version is `expected`, if given); returns
    /// what was removed.
    async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
        expected: Option<u64>,
    ) -> Result<Option<Enrollment>, ProvisioningStoreError>;

    /// The registration of `registration_id`, if any.
    async fn registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<Registration>, ProvisioningStoreError>;

    /// Every registration, by id.
    async fn registrations(&self) -> Result<Vec<Registration>, ProvisioningStoreError>;

    /// Stores `registration` if the stored one has version `expected` (`None`: if
    /// there is none).
    async fn put_registration(
        &self,
        registration: Registration,
        expected: Option<u64>,
    ) -> Result<Registration, ProvisioningStoreError>;

    /// Removes a registration record; returns what was removed.
    async fn delete_registration(
        &self,
        registration_id: &str,
    ) -> Result<Option<Registration>, ProvisioningStoreError>;
}
