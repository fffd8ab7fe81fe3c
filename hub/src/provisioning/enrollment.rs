//! Enrollment groups and individual enrollments in the shapes of Azure's provisioning
//! service (api-version 2021-10-01): what a client may send, what is stored, and the
//! checks a request passes before it is stored.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::registry::{DeviceId, generate_key, validate_key};

/// Longest enrollment group id (Azure: 128 characters).
pub const MAX_GROUP_ID_LEN: usize = 128;
/// Largest initial twin (tags and desired properties, as JSON).
pub const MAX_INITIAL_TWIN_BYTES: usize = 32 * 1024;

/// Whether an enrollment may register devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisioningStatus {
    /// Devices register.
    #[default]
    Enabled,
    /// Registrations answer `disabled`; no device is created.
    Disabled,
}

/// What happens to a device that registers again (Azure's `reprovisionPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    /// Azure moves the device to the hub the allocation picks; one hub here, so the
    /// assignment never changes. Kept and shown for the service SDKs.
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    /// Keep the device's twin on re-registration (`true`), or reset it to the
    /// enrollment's initial twin (`false`).
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

impl Default for ReprovisionPolicy {
    fn default() -> Self {
        Self {
            update_hub_assignment: true,
            migrate_device_data: true,
        }
    }
}

/// A symmetric key pair (base64); either may be left empty in a request to have
/// one generated.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeys {
    /// Primary key, base64 of 16 to 64 bytes.
    #[serde(default)]
    pub primary_key: String,
    /// Secondary key, base64 of 16 to 64 bytes.
    #[serde(default)]
    pub secondary_key: String,
}

impl std::fmt::Debug for SymmetricKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKeys(<redacted>)")
    }
}

/// How devices of an enrollment prove who they are: `symmetricKey`, or (enrollment
/// groups) `x509` with a signing (CA) certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attestation {
    /// `symmetricKey` or `x509`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeys>,
    /// The CA certificates of an X.509 enrollment group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
}

/// `x509` of an enrollment group: `{"signingCertificates": {"primary": {"certificate": PEM}}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    /// The CA certificates a device certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
}

/// A primary and optional secondary certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct X509Certificates {
    /// The primary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509Certificate>,
    /// The secondary certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509Certificate>,
}

/// One certificate, PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct X509Certificate {
    /// The PEM text.
    #[serde(default)]
    pub certificate: String,
}

impl Attestation {
    /// The CA certificates (PEM) of an X.509 group.
    pub fn signing_certificates(&self) -> Vec<&str> {
        let Some(certs) = self
            .x509
            .as_ref()
            .and_then(|x| x.signing_certificates.as_ref())
        else {
            return Vec::new();
        };
        [&certs.primary, &certs.secondary]
            .into_iter()
            .flatten()
            .map(|c| c.certificate.as_str())
            .filter(|pem| !pem.trim().is_empty())
            .collect()
    }
}

/// The twin a device gets when it is first registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwin {
    /// Tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// `{"desired": {…}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<InitialTwinProperties>,
}

/// The properties part of an [`InitialTwin`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwinProperties {
    /// Desired properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
}

impl InitialTwin {
    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.tags.as_ref().is_none_or(Map::is_empty)
            && self
                .properties
                .as_ref()
                .and_then(|p| p.desired.as_ref())
                .is_none_or(Map::is_empty)
    }

    /// The body of a service twin patch that applies it.
    pub fn as_patch(&self) -> Value {
        let mut patch = Map::new();
        if let Some(tags) = &self.tags {
            patch.insert("tags".into(), Value::Object(tags.clone()));
        }
        if let Some(desired) = self.properties.as_ref().and_then(|p| p.desired.as_ref()) {
            patch.insert(
                "properties".into(),
                serde_json::json!({ "desired": desired }),
            );
        }
        Value::Object(patch)
    }
}

/// `capabilities`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Whether devices of this enrollment are IoT Edge devices.
    #[serde(default)]
    pub iot_edge: bool,
}

/// The settings an enrollment group and an individual enrollment share, as a client
/// sends them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentSpec {
    /// The group id (enrollment groups; must equal the path's when present).
    pub enrollment_group_id: Option<String>,
    /// The registration id (individual enrollments; must equal the path's).
    pub registration_id: Option<String>,
    /// The hub device id of an individual enrollment (defaults to the registration id).
    pub device_id: Option<String>,
    /// The attestation; symmetric keys are generated when absent.
    pub attestation: Option<Attestation>,
    /// Enabled unless given.
    pub provisioning_status: Option<ProvisioningStatus>,
    /// The initial twin.
    pub initial_twin: Option<InitialTwin>,
    /// The reprovision policy.
    pub reprovision_policy: Option<ReprovisionPolicy>,
    /// IoT Edge capability.
    pub capabilities: Option<Capabilities>,
    /// The etag the client holds (also accepted as `If-Match`).
    pub etag: Option<String>,
}

/// An enrollment as stored (a group, or an individual enrollment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enrollment {
    /// The group id, or the registration id of an individual enrollment.
    pub id: String,
    /// An individual enrollment's hub device id.
    pub device_id: Option<DeviceId>,
    /// The attestation (with keys).
    pub attestation: Attestation,
    /// Enabled or disabled.
    pub provisioning_status: ProvisioningStatus,
    /// Applied when a device is first registered.
    pub initial_twin: InitialTwin,
    /// On re-registration.
    pub reprovision_policy: ReprovisionPolicy,
    /// IoT Edge capability, given to the devices it creates.
    pub capabilities: Capabilities,
    /// Bumped on every write; the etag is derived from it.
    pub version: u64,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Last written.
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

/// Which kind of enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentKind {
    /// An enrollment group: any registration id whose key derives from the group's.
    Group,
    /// One registration id with its own key.
    Individual,
}

impl Enrollment {
    /// The entity tag (changes with every write).
    pub fn etag(&self) -> String {
        STANDARD_NO_PAD.encode(self.version.to_string())
    }

    /// The symmetric keys (every stored enrollment has them).
    pub fn keys(&self) -> Option<&SymmetricKeys> {
        self.attestation.symmetric_key.as_ref()
    }

    /// Azure's JSON shape of this enrollment.
    pub fn to_json(&self, kind: EnrollmentKind) -> Value {
        let mut json = serde_json::json!({
            "attestation": self.attestation,
            "capabilities": self.capabilities,
            "etag": self.etag(),
            "provisioningStatus": self.provisioning_status,
            "reprovisionPolicy": self.reprovision_policy,
            "allocationPolicy": "static",
            "initialTwin": self.initial_twin,
            "createdDateTimeUtc": rfc3339(self.created),
            "lastUpdatedDateTimeUtc": rfc3339(self.updated),
        });
        match kind {
            EnrollmentKind::Group => json["enrollmentGroupId"] = Value::String(self.id.clone()),
            EnrollmentKind::Individual => {
                json["registrationId"] = Value::String(self.id.clone());
                if let Some(device) = &self.device_id {
                    json["deviceId"] = Value::String(device.to_string());
                }
            }
        }
        json
    }

    /// Builds the enrollment to store from a request: `current` is the stored one
    /// (an update keeps its creation time and any key the request leaves empty).
    pub fn from_spec(
        id: &str,
        kind: EnrollmentKind,
        spec: EnrollmentSpec,
        current: Option<&Enrollment>,
        now: OffsetDateTime,
    ) -> Result<Self, String> {
        let (field, body_id) = match kind {
            EnrollmentKind::Group => ("enrollmentGroupId", &spec.enrollment_group_id),
            EnrollmentKind::Individual => ("registrationId", &spec.registration_id),
        };
        if let Some(body_id) = body_id
            && body_id != id
        {
            return Err(format!(
                "{field} {body_id:?} in the body does not match {id:?} in the path"
            ));
        }
        let device_id = match (kind, &spec.device_id) {
            (EnrollmentKind::Individual, Some(device)) if !device.is_empty() => {
                Some(DeviceId::parse(device).map_err(|err| format!("deviceId: {err}"))?)
            }
            _ => None,
        };
        let attestation = spec.attestation.unwrap_or(Attestation {
            kind: "symmetricKey".into(),
            symmetric_key: None,
            x509: None,
        });
        let x509 = match (attestation.kind.as_str(), kind) {
            ("symmetricKey", _) => None,
            ("x509", EnrollmentKind::Group) => {
                let pems = attestation.signing_certificates();
                if pems.is_empty() {
                    return Err("an x509 enrollment group needs \
                         x509.signingCertificates.primary.certificate (PEM)"
                        .into());
                }
                for pem in &pems {
                    crate::auth::x509::DeviceCa::from_pem(pem)
                        .map_err(|err| format!("x509.signingCertificates: {err}"))?;
                }
                attestation.x509.clone()
            }
            (other, _) => {
                return Err(format!(
                    "attestation type {other:?} is not supported here \
                     (symmetricKey; x509 for enrollment groups)"
                ));
            }
        };
        let given = attestation.symmetric_key.clone().unwrap_or_default();
        let kept = current.and_then(Enrollment::keys);
        let mut keys = SymmetricKeys::default();
        for (field, given, kept, slot) in [
            (
                "primaryKey",
                &given.primary_key,
                kept.map(|k| &k.primary_key),
                &mut keys.primary_key,
            ),
            (
                "secondaryKey",
                &given.secondary_key,
                kept.map(|k| &k.secondary_key),
                &mut keys.secondary_key,
            ),
        ] {
            *slot = if !given.is_empty() {
                validate_key(field, given)?;
                given.clone()
            } else {
                kept.cloned().unwrap_or_else(generate_key)
            };
        }
        let initial_twin = spec.initial_twin.unwrap_or_default();
        let size = serde_json::to_vec(&initial_twin)
            .map(|bytes| bytes.len())
            .unwrap_or(usize::MAX);
        if size > MAX_INITIAL_TWIN_BYTES {
            return Err(format!(
                "initialTwin is {size} bytes; the limit is {MAX_INITIAL_TWIN_BYTES}"
            ));
        }
        let attestation = match x509 {
            Some(x509) => Attestation {
                kind: "x509".into(),
                symmetric_key: None,
                x509: Some(x509),
            },
            None => Attestation {
                kind: "symmetricKey".into(),
                symmetric_key: Some(keys),
                x509: None,
            },
        };
        Ok(Self {
            id: id.to_string(),
            device_id,
            attestation,
            provisioning_status: spec.provisioning_status.unwrap_or_default(),
            initial_twin,
            reprovision_policy: spec.reprovision_policy.unwrap_or_default(),
            capabilities: spec.capabilities.unwrap_or_default(),
            version: current.map_or(1, |c| c.version + 1),
            created: current.map_or(now, |c| c.created),
            updated: now,
        })
    }
}

/// Checks an enrollment group id: 1 to 128 of ASCII letters, digits and `-._:`.
pub fn validate_group_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_GROUP_ID_LEN {
        return Err(format!(
            "enrollment group id must be 1 to {MAX_GROUP_ID_LEN} characters"
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(format!(
            "enrollment group id {id:?} may hold only ASCII letters, digits and -._:"
        ));
    }
    Ok(())
}

/// Azure's timestamp format (RFC 3339, UTC).
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The device key an enrollment group gives registration id `registration_id`:
/// base64 of HMAC-SHA256 over the id, keyed with the base64-decoded group key.
pub fn derive_device_key(group_key: &str, registration_id: &str) -> Option<String> {
    use hmac::{Hmac, Mac};
    let key = STANDARD.decode(group_key).ok()?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
    mac.update(registration_id.as_bytes());
    Some(STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_key_matches_azures_reference_computation() {
        // `az iot dps enrollment-group compute-device-key --key <group> --registration-id dev-1`
        // computes base64(HMAC-SHA256(base64dec(group), "dev-1")); checked here
        // against an independent HMAC computation of the same bytes.
        let group = STANDARD.encode([7u8; 32]);
        let derived = derive_device_key(&group, "dev-1").unwrap();
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&[7u8; 32]).unwrap();
        mac.update(b"dev-1");
        assert_eq!(derived, STANDARD.encode(mac.finalize().into_bytes()));
        assert_ne!(derived, derive_device_key(&group, "dev-2").unwrap());
        assert!(derive_device_key("not base64!", "dev-1").is_none());
    }

    #[test]
    fn a_spec_without_keys_gets_generated_ones_and_an_update_keeps_them() {
        let now = OffsetDateTime::now_utc();
        let first = Enrollment::from_spec(
            "g",
            EnrollmentKind::Group,
            EnrollmentSpec::default(),
            None,
            now,
        )
        .unwrap();
        let keys = first.keys().unwrap().clone();
        assert!(!keys.primary_key.is_empty() && keys.primary_key != keys.secondary_key);
        let spec = EnrollmentSpec {
            provisioning_status: Some(ProvisioningStatus::Disabled),
            ..EnrollmentSpec::default()
        };
        let second =
            Enrollment::from_spec("g", EnrollmentKind::Group, spec, Some(&first), now).unwrap();
        assert_eq!(second.keys(), Some(&keys));
        assert_eq!(second.version, 2);
        assert_ne!(second.etag(), first.etag());
    }

    #[test]
    fn bad_specs_are_refused_with_the_field() {
        let now = OffsetDateTime::now_utc();
        let spec = EnrollmentSpec {
            enrollment_group_id: Some("other".into()),
            ..EnrollmentSpec::default()
        };
        let err = Enrollment::from_spec("g", EnrollmentKind::Group, spec, None, now).unwrap_err();
        assert!(err.contains("enrollmentGroupId"), "{err}");
        let spec = EnrollmentSpec {
            attestation: Some(Attestation {
                kind: "tpm".into(),
                symmetric_key: None,
                x509: None,
            }),
            ..EnrollmentSpec::default()
        };
        assert!(Enrollment::from_spec("g", EnrollmentKind::Group, spec, None, now).is_err());
        assert!(validate_group_id("ok-group_1").is_ok());
        assert!(validate_group_id("bad/group").is_err());
        assert!(validate_group_id("").is_err());
    }
}
