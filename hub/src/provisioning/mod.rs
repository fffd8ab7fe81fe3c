//! Provisioning: Azure Device Provisioning Service's contract on this hub (DESIGN
//! section 8). Enrollment groups (device keys derived from the group key) and
//! individual enrollments; registrations that create or find the registry device,
//! apply the initial twin and answer `assignedHub` = this hub.
//!
//! The edges hand device requests in transport-neutral form ([`device`]): the MQTT
//! gateway (`$dps/registrations/…` topics) and the REST API (HTTPS device routes and
//! the service API) both call [`Provisioning`]. Storage is the [`ProvisioningStore`]
//! port; the ID scope lives in the data dir ([`scope`]).

pub mod admission;
pub mod device;
pub mod enrollment;
pub mod registration;
pub mod scope;
pub mod store;

use std::sync::Arc;

use time::OffsetDateTime;

use crate::auth::sas::{SasError, SasToken};
use crate::registry::{
    AuthType, Authentication, AuthenticationSpec, DeviceId, DeviceSpec, IfMatch, Registry,
    RegistryError, SymmetricKeySpec, X509Thumbprint,
};
use crate::twins::{TwinError, Twins};
pub use enrollment::{Enrollment, EnrollmentKind, EnrollmentSpec, derive_device_key};
pub use registration::{Registration, RegistrationStatus, Source, Substatus};
pub use scope::IdScope;
pub use store::{ProvisioningStore, ProvisioningStoreError};

pub use admission::{MAX_CONCURRENT_REGISTRATIONS, MAX_REGISTRATION_WAIT};
/// Largest register request body (`registrationId` and the device's `payload`).
pub const MAX_REGISTER_BODY_BYTES: usize = 16 * 1024;
/// Most enrollment groups: a symmetric-key registration tries each enabled group's
/// derived key, so this bounds the work of one CONNECT.
pub const MAX_ENROLLMENT_GROUPS: usize = 1000;
/// Seconds a device is told to wait before polling or retrying.
pub const RETRY_AFTER_SECS: u32 = 1;

/// Why a provisioning request failed; each maps to Azure's status and errorCode
/// ([`ProvisioningError::status`], [`ProvisioningError::error_code`]).
#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    /// The request body or an id is not acceptable.
    #[error("{0}")]
    BadRequest(String),
    /// The registration id is not a valid device id.
    #[error("registration id {id:?} is not a valid device id: {reason}")]
    InvalidRegistrationId {
        /// The id as sent.
        id: String,
        /// Why.
        reason: String,
    },
    /// The ID scope, the key or the token is wrong (or no enrollment matches).
    #[error("{0}")]
    Unauthorized(String),
    /// No such enrollment, registration or operation.
    #[error("{0}")]
    NotFound(String),
    /// If-Match did not match, or the record changed while being written.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Too many registrations at once.
    #[error("too many registrations in progress; retry after {RETRY_AFTER_SECS} s")]
    Throttled,
    /// A limit of the hub (enrollment groups).
    #[error("{0}")]
    Limit(String),
    /// The store, the registry or the twins failed; nothing was left half done.
    #[error("{0}")]
    Internal(String),
}

impl ProvisioningError {
    /// The HTTP (and `$dps/registrations/res/{status}`) status.
    pub fn status(&self) -> u16 {
        match self {
            ProvisioningError::BadRequest(_) | ProvisioningError::InvalidRegistrationId { .. } => {
                400
            }
            ProvisioningError::Unauthorized(_) => 401,
            ProvisioningError::NotFound(_) => 404,
            ProvisioningError::PreconditionFailed(_) => 412,
            ProvisioningError::Throttled => 429,
            ProvisioningError::Limit(_) => 403,
            ProvisioningError::Internal(_) => 500,
        }
    }

    /// Azure-style six-digit error code: the status and a number within it.
    pub fn error_code(&self) -> u32 {
        match self {
            ProvisioningError::BadRequest(_) => 400_004,
            ProvisioningError::InvalidRegistrationId { .. } => 400_005,
            ProvisioningError::Unauthorized(_) => 401_002,
            ProvisioningError::NotFound(_) => 404_001,
            ProvisioningError::PreconditionFailed(_) => 412_002,
            ProvisioningError::Throttled => 429_001,
            ProvisioningError::Limit(_) => 403_001,
            ProvisioningError::Internal(_) => 500_000,
        }
    }
}

impl From<ProvisioningStoreError> for ProvisioningError {
    fn from(err: ProvisioningStoreError) -> Self {
        match err {
            ProvisioningStoreError::VersionConflict => ProvisioningError::PreconditionFailed(
                "the record was modified concurrently; read it again".into(),
            ),
            ProvisioningStoreError::Store(err) => ProvisioningError::Internal(err.to_string()),
        }
    }
}

/// A device that proved it holds an enrollment's key.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The registration id (also the hub device id unless the individual enrollment
    /// names another).
    pub registration_id: String,
    /// The enrollment it matched.
    pub enrollment: Enrollment,
    /// Group or individual.
    pub kind: EnrollmentKind,
    /// What the hub device is created with.
    pub credential: Credential,
    /// The token's (or certificate's) expiry (Unix seconds).
    pub expires_at: u64,
}

/// The credential a registered device connects to the hub with.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// SAS keys: the individual enrollment's, or derived from a group's.
    Keys {
        /// Primary key, base64.
        primary: String,
        /// Secondary key, base64.
        secondary: String,
    },
    /// The device certificate of an X.509 group (its SHA-256 thumbprint).
    Certificate {
        /// Lower-case hex SHA-256 of the device certificate.
        thumbprint: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Keys { .. } => f.write_str("Keys(<redacted>)"),
            Credential::Certificate { thumbprint } => write!(f, "Certificate({thumbprint})"),
        }
    }
}

impl Credential {
    fn spec(&self) -> AuthenticationSpec {
        match self {
            Credential::Keys { primary, secondary } => AuthenticationSpec {
                kind: Some(AuthType::Sas),
                symmetric_key: Some(SymmetricKeySpec {
                    primary_key: Some(primary.clone()),
                    secondary_key: Some(secondary.clone()),
                }),
                ..AuthenticationSpec::default()
            },
            Credential::Certificate { thumbprint } => AuthenticationSpec {
                kind: Some(AuthType::SelfSigned),
                x509_thumbprint: Some(X509Thumbprint {
                    primary_thumbprint: Some(thumbprint.clone()),
                    secondary_thumbprint: None,
                }),
                ..AuthenticationSpec::default()
            },
        }
    }

    /// Whether a stored device already authenticates with this credential.
    fn held_by(&self, auth: &Authentication) -> bool {
        match self {
            Credential::Keys { primary, secondary } => {
                auth.kind == AuthType::Sas
                    && auth
                        .symmetric_key
                        .as_ref()
                        .is_some_and(|k| k.primary_key == *primary && k.secondary_key == *secondary)
            }
            Credential::Certificate { thumbprint } => {
                auth.kind == AuthType::SelfSigned
                    && auth.x509_thumbprint.primary_thumbprint.as_deref() == Some(thumbprint)
            }
        }
    }
}

/// The request that puts `auth` back (undoing a credential change).
fn restore_spec(auth: Authentication) -> AuthenticationSpec {
    AuthenticationSpec {
        kind: Some(auth.kind),
        symmetric_key: auth.symmetric_key.map(|k| SymmetricKeySpec {
            primary_key: Some(k.primary_key),
            secondary_key: Some(k.secondary_key),
        }),
        public_keys: Some(auth.public_keys),
        x509_thumbprint: Some(auth.x509_thumbprint),
    }
}

/// The provisioning capability.
#[derive(Clone)]
pub struct Provisioning {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ProvisioningStore>,
    registry: Registry,
    twins: Twins,
    hostname: String,
    scope: IdScope,
    max_token_lifetime: std::time::Duration,
    registrations: admission::Admission,
}

impl std::fmt::Debug for Provisioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioning")
            .field("scope", &self.inner.scope)
            .finish_non_exhaustive()
    }
}

impl Provisioning {
    /// The capability for this hub (`hostname` is what devices are assigned to;
    /// registration tokens valid for longer than `max_token_lifetime` are refused, as
    /// device tokens are by `mqtt.sas_max_lifetime_secs`).
    pub fn new(
        store: Arc<dyn ProvisioningStore>,
        registry: Registry,
        twins: Twins,
        hostname: String,
        scope: IdScope,
        max_token_lifetime: std::time::Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                registry,
                twins,
                hostname,
                scope,
                max_token_lifetime,
                registrations: admission::Admission::default(),
            }),
        }
    }

    /// The ID scope devices name.
    pub fn scope(&self) -> &IdScope {
        &self.inner.scope
    }

    // ---- enrollments (service API) ----

    /// The enrollment of `kind` with `id`.
    pub async fn enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
    ) -> Result<Enrollment, ProvisioningError> {
        self.inner
            .store
            .enrollment(kind, id)
            .await?
            .ok_or_else(|| not_found(kind, id))
    }

    /// Every enrollment of `kind`.
    pub async fn enrollments(
        &self,
        kind: EnrollmentKind,
    ) -> Result<Vec<Enrollment>, ProvisioningError> {
        Ok(self.inner.store.enrollments(kind).await?)
    }

    /// Creates or replaces an enrollment (`PUT`), honouring `if_match` (header or
    /// body etag).
    pub async fn put_enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
        mut spec: EnrollmentSpec,
        if_match: Option<IfMatch>,
    ) -> Result<Enrollment, ProvisioningError> {
        match kind {
            EnrollmentKind::Group => enrollment::validate_group_id(id),
            EnrollmentKind::Individual => DeviceId::parse(id)
                .map(|_| ())
                .map_err(|err| format!("registration id: {err}")),
        }
        .map_err(ProvisioningError::BadRequest)?;
        let if_match = if_match.or_else(|| spec.etag.take().map(|etag| IfMatch::parse(&etag)));
        let current = self.inner.store.enrollment(kind, id).await?;
        match (&if_match, &current) {
            (Some(IfMatch::Etag(etag)), Some(current)) if *etag != current.etag() => {
                return Err(ProvisioningError::PreconditionFailed(format!(
                    "etag mismatch: the enrollment was modified (current etag {})",
                    current.etag()
                )));
            }
            (Some(IfMatch::Etag(_)), None) => return Err(not_found(kind, id)),
            _ => {}
        }
        if kind == EnrollmentKind::Group && current.is_none() {
            let groups = self.inner.store.enrollments(kind).await?.len();
            if groups >= MAX_ENROLLMENT_GROUPS {
                return Err(ProvisioningError::Limit(format!(
                    "this hub holds at most {MAX_ENROLLMENT_GROUPS} enrollment groups"
                )));
            }
        }
        let next =
            Enrollment::from_spec(id, kind, spec, current.as_ref(), OffsetDateTime::now_utc())
                .map_err(ProvisioningError::BadRequest)?;
        let stored = self
            .inner
            .store
            .put_enrollment(kind, next, current.map(|c| c.version))
            .await?;
        Ok(stored)
    }

    /// Deletes an enrollment (its registrations and devices stay).
    pub async fn delete_enrollment(
        &self,
        kind: EnrollmentKind,
        id: &str,
        if_match: Option<IfMatch>,
    ) -> Result<Enrollment, ProvisioningError> {
        let expected = match if_match {
            Some(IfMatch::Etag(etag)) => {
                let current = self.enrollment(kind, id).await?;
                if current.etag() != etag {
                    return Err(ProvisioningError::PreconditionFailed(format!(
                        "etag mismatch: the enrollment was modified (current etag {})",
                        current.etag()
                    )));
                }
                Some(current.version)
            }
            _ => None,
        };
        self.inner
            .store
            .delete_enrollment(kind, id, expected)
            .await?
            .ok_or_else(|| not_found(kind, id))
    }

    /// The registration of `registration_id`.
    pub async fn registration(
        &self,
        registration_id: &str,
    ) -> Result<Registration, ProvisioningError> {
        self.inner
            .store
            .registration(registration_id)
            .await?
            .ok_or_else(|| registration_not_found(registration_id))
    }

    /// Every registration (of group `group`, when given).
    pub async fn registrations(
        &self,
        group: Option<&str>,
    ) -> Result<Vec<Registration>, ProvisioningError> {
        let all = self.inner.store.registrations().await?;
        Ok(match group {
            Some(group) => all
                .into_iter()
                .filter(|r| matches!(&r.source, Source::Group(g) if g == group))
                .collect(),
            None => all,
        })
    }

    /// Deletes a registration record (the device stays in the registry).
    pub async fn delete_registration(
        &self,
        registration_id: &str,
    ) -> Result<Registration, ProvisioningError> {
        self.inner
            .store
            .delete_registration(registration_id)
            .await?
            .ok_or_else(|| registration_not_found(registration_id))
    }

    // ---- the device contract ----

    /// Checks a device's ID scope, registration id and SAS token (`sr` =
    /// `{scope}/registrations/{id}`, signed with the individual enrollment's key or
    /// a key derived from an enabled-or-disabled group's key) at `now` (Unix seconds).
    pub async fn attest(
        &self,
        scope: &str,
        registration_id: &str,
        token: &str,
        now: u64,
    ) -> Result<Attested, ProvisioningError> {
        if !scope.eq_ignore_ascii_case(self.inner.scope.as_str()) {
            return Err(ProvisioningError::Unauthorized(format!(
                "unknown ID scope {scope:?}"
            )));
        }
        DeviceId::parse(registration_id).map_err(|err| {
            ProvisioningError::InvalidRegistrationId {
                id: registration_id.to_string(),
                reason: err.to_string(),
            }
        })?;
        let unauthorized =
            |err: SasError| ProvisioningError::Unauthorized(format!("registration refused: {err}"));
        let token = SasToken::parse(token).map_err(unauthorized)?;
        if token.expiry <= now {
            return Err(unauthorized(SasError::Expired));
        }
        let max = self.inner.max_token_lifetime.as_secs();
        if token.expiry.saturating_sub(now) > max {
            return Err(unauthorized(SasError::LifetimeTooLong(max)));
        }
        let expected = format!("{}/registrations/{registration_id}", self.inner.scope);
        let resource = token.resource().map_err(unauthorized)?;
        if !resource
            .trim_end_matches('/')
            .eq_ignore_ascii_case(&expected)
        {
            return Err(unauthorized(SasError::WrongResource));
        }
        let decode = |key: &str| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(key)
                .unwrap_or_default()
        };
        // An individual enrollment takes precedence over the groups (as in Azure).
        if let Some(enrollment) = self
            .inner
            .store
            .enrollment(EnrollmentKind::Individual, registration_id)
            .await?
            && let Some(keys) = enrollment.keys()
        {
            let (primary, secondary) = (decode(&keys.primary_key), decode(&keys.secondary_key));
            if token.signed_by(&[&primary, &secondary]).is_some() {
                let credential = Credential::Keys {
                    primary: keys.primary_key.clone(),
                    secondary: keys.secondary_key.clone(),
                };
                return Ok(Attested {
                    registration_id: registration_id.to_string(),
                    enrollment,
                    kind: EnrollmentKind::Individual,
                    credential,
                    expires_at: token.expiry,
                });
            }
        }
        for group in self.inner.store.enrollments(EnrollmentKind::Group).await? {
            let Some(keys) = group.keys() else { continue };
            let (Some(primary), Some(secondary)) = (
                derive_device_key(&keys.primary_key, registration_id),
                derive_device_key(&keys.secondary_key, registration_id),
            ) else {
                continue;
            };
            if token
                .signed_by(&[&decode(&primary), &decode(&secondary)])
                .is_some()
            {
                return Ok(Attested {
                    registration_id: registration_id.to_string(),
                    enrollment: group,
                    kind: EnrollmentKind::Group,
                    credential: Credential::Keys { primary, secondary },
                    expires_at: token.expiry,
                });
            }
        }
        Err(unauthorized(SasError::BadSignature))
    }

    /// Checks a device that presented an X.509 certificate chain (end entity first) at
    /// the TLS handshake: its CN must be the registration id and the chain must lead
    /// to the signing certificate of an X.509 enrollment group, valid now.
    pub async fn attest_certificate(
        &self,
        scope: &str,
        registration_id: &str,
        chain: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Result<Attested, ProvisioningError> {
        if !scope.eq_ignore_ascii_case(self.inner.scope.as_str()) {
            return Err(ProvisioningError::Unauthorized(format!(
                "unknown ID scope {scope:?}"
            )));
        }
        DeviceId::parse(registration_id).map_err(|err| {
            ProvisioningError::InvalidRegistrationId {
                id: registration_id.to_string(),
                reason: err.to_string(),
            }
        })?;
        let leaf = chain.first().ok_or_else(|| {
            ProvisioningError::Unauthorized("no client certificate and no SAS token".into())
        })?;
        if crate::auth::x509::common_name(leaf).as_deref() != Some(registration_id) {
            return Err(ProvisioningError::Unauthorized(
                "the certificate's CN is not the registration id".into(),
            ));
        }
        let expires_at = x509_parser::parse_x509_certificate(leaf)
            .ok()
            .map(|(_, cert)| cert.validity().not_after.timestamp())
            .and_then(|at| u64::try_from(at).ok())
            .unwrap_or(0);
        for group in self.inner.store.enrollments(EnrollmentKind::Group).await? {
            let issued = group.attestation.signing_certificates().iter().any(|pem| {
                crate::auth::x509::DeviceCa::from_pem(pem).is_ok_and(|ca| ca.issued(chain))
            });
            if issued {
                let (thumbprint, _) = crate::auth::x509::thumbprints(leaf);
                return Ok(Attested {
                    registration_id: registration_id.to_string(),
                    enrollment: group,
                    kind: EnrollmentKind::Group,
                    credential: Credential::Certificate { thumbprint },
                    expires_at,
                });
            }
        }
        Err(ProvisioningError::Unauthorized(
            "the certificate chains to no X.509 enrollment group".into(),
        ))
    }

    /// Registers an attested device: creates (or finds) its registry device with
    /// the enrollment's keys, applies the initial twin to a new device (or resets it,
    /// per the reprovision policy), and stores the registration with a new operation
    /// id. A disabled enrollment stores a `disabled` registration and creates nothing.
    /// On a failure nothing this call created is left behind.
    pub async fn register(
        &self,
        attested: &Attested,
        payload: Option<serde_json::Value>,
    ) -> Result<Registration, ProvisioningError> {
        let _slot = self.inner.registrations.admit().await?;
        let id = &attested.registration_id;
        let previous = self.inner.store.registration(id).await?;
        let now = OffsetDateTime::now_utc();
        let source = match attested.kind {
            EnrollmentKind::Group => Source::Group(attested.enrollment.id.clone()),
            EnrollmentKind::Individual => Source::Individual,
        };
        let mut record = Registration {
            registration_id: id.clone(),
            device_id: previous.as_ref().and_then(|p| p.device_id.clone()),
            assigned_hub: previous.as_ref().and_then(|p| p.assigned_hub.clone()),
            status: RegistrationStatus::Assigned,
            substatus: None,
            error_code: None,
            error_message: None,
            source,
            operation_id: registration::new_operation_id(),
            payload,
            version: previous.as_ref().map_or(1, |p| p.version + 1),
            created: previous.as_ref().map_or(now, |p| p.created),
            updated: now,
        };
        if attested.enrollment.provisioning_status == enrollment::ProvisioningStatus::Disabled {
            record.status = RegistrationStatus::Disabled;
            record.error_code = Some(401_004);
            record.error_message = Some(format!(
                "the {} is disabled",
                match attested.kind {
                    EnrollmentKind::Group => format!("enrollment group {}", attested.enrollment.id),
                    EnrollmentKind::Individual => "enrollment".to_string(),
                }
            ));
            return Ok(self
                .inner
                .store
                .put_registration(record, previous.map(|p| p.version))
                .await?);
        }
        let device_id = match &attested.enrollment.device_id {
            Some(device) => device.clone(),
            None => {
                DeviceId::parse(id).map_err(|err| ProvisioningError::InvalidRegistrationId {
                    id: id.clone(),
                    reason: err.to_string(),
                })?
            }
        };
        let (created, reset) = self.ensure_device(&device_id, attested).await?;
        let initial = &attested.enrollment.initial_twin;
        let reprovisioned = previous
            .as_ref()
            .is_some_and(|p| p.status == RegistrationStatus::Assigned);
        let reset_twin =
            reprovisioned && !attested.enrollment.reprovision_policy.migrate_device_data;
        if (created || reset_twin) && !initial.is_empty() {
            let applied = if created {
                self.inner
                    .twins
                    .patch(&device_id, initial.as_patch(), None)
                    .await
            } else {
                self.inner
                    .twins
                    .replace(&device_id, initial.as_patch(), None)
                    .await
            };
            if let Err(err) = applied {
                self.undo(&device_id, created, reset).await;
                return Err(twin_failed(err));
            }
        }
        record.device_id = Some(device_id.clone());
        record.assigned_hub = Some(self.inner.hostname.clone());
        record.substatus = Some(match (reprovisioned, reset_twin) {
            (false, _) => Substatus::InitialAssignment,
            (true, false) => Substatus::DeviceDataMigrated,
            (true, true) => Substatus::DeviceDataReset,
        });
        match self
            .inner
            .store
            .put_registration(record, previous.map(|p| p.version))
            .await
        {
            Ok(stored) => Ok(stored),
            Err(err) => {
                self.undo(&device_id, created, reset).await;
                Err(err.into())
            }
        }
    }

    /// The registration state a device polls with `operation_id`.
    pub async fn operation(
        &self,
        attested: &Attested,
        operation_id: &str,
    ) -> Result<Registration, ProvisioningError> {
        match self
            .inner
            .store
            .registration(&attested.registration_id)
            .await?
        {
            Some(record) if record.operation_id == operation_id => Ok(record),
            _ => Err(ProvisioningError::NotFound(format!(
                "operation {operation_id} not found"
            ))),
        }
    }

    /// Makes sure the registry holds `device_id` with the attested credential.
    /// Returns whether it was created, and its credentials before if they were
    /// replaced.
    async fn ensure_device(
        &self,
        device_id: &DeviceId,
        attested: &Attested,
    ) -> Result<(bool, Option<Authentication>), ProvisioningError> {
        let spec = || DeviceSpec {
            authentication: Some(attested.credential.spec()),
            ..DeviceSpec::default()
        };
        let registry = &self.inner.registry;
        for _ in 0..2 {
            let existing = match registry.get(device_id).await {
                Ok(device) => Some(device),
                Err(RegistryError::NotFound(_)) => None,
                Err(err) => return Err(registry_failed(err)),
            };
            let Some(existing) = existing else {
                match registry.create(device_id.clone(), spec()).await {
                    Ok(_) => return Ok((true, None)),
                    // Another registration of the same id won the race: find it.
                    Err(RegistryError::AlreadyExists(_)) => continue,
                    Err(err) => return Err(registry_failed(err)),
                }
            };
            if attested.credential.held_by(&existing.authentication) {
                return Ok((false, None));
            }
            registry
                .update(device_id.clone(), spec(), IfMatch::Etag(existing.etag()))
                .await
                .map_err(registry_failed)?;
            return Ok((false, Some(existing.authentication)));
        }
        Err(ProvisioningError::Internal(format!(
            "device {device_id} changed while being registered; retry"
        )))
    }

    /// Takes back what a failed registration did to the registry.
    async fn undo(&self, device_id: &DeviceId, created: bool, replaced: Option<Authentication>) {
        let registry = &self.inner.registry;
        let undone = if created {
            registry.delete(device_id, None).await.map(|_| ())
        } else if let Some(previous) = replaced {
            let spec = DeviceSpec {
                authentication: Some(restore_spec(previous)),
                ..DeviceSpec::default()
            };
            registry
                .update(device_id.clone(), spec, IfMatch::Any)
                .await
                .map(|_| ())
        } else {
            Ok(())
        };
        if let Err(err) = undone {
            tracing::warn!(device = %device_id, error = %err, "cannot undo a failed registration");
        }
    }
}

fn not_found(kind: EnrollmentKind, id: &str) -> ProvisioningError {
    ProvisioningError::NotFound(match kind {
        EnrollmentKind::Group => format!("enrollment group {id} not found"),
        EnrollmentKind::Individual => format!("enrollment {id} not found"),
    })
}

/// The refusal for a registration id the store does not hold.
fn registration_not_found(registration_id: &str) -> ProvisioningError {
    ProvisioningError::NotFound(format!("registration {registration_id} not found"))
}

fn registry_failed(err: RegistryError) -> ProvisioningError {
    match err {
        RegistryError::Invalid(reason) => ProvisioningError::BadRequest(reason),
        other => ProvisioningError::Internal(format!("registry: {other}")),
    }
}

fn twin_failed(err: TwinError) -> ProvisioningError {
    match err {
        TwinError::Invalid(reason) => {
            ProvisioningError::BadRequest(format!("the enrollment's initial twin: {reason}"))
        }
        TwinError::BadRequest(reason) => {
            ProvisioningError::BadRequest(format!("the enrollment's initial twin: {reason}"))
        }
        other => ProvisioningError::Internal(format!("twin: {other}")),
    }
}
