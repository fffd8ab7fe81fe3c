//! The device identity record (what the registry stores) and the request shape that
//! creates or updates it.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::DeviceId;

/// Whether a device may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// The device may connect.
    Enabled,
    /// The device is refused, and its live connection is closed.
    Disabled,
}

/// How a device proves its identity when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthType {
    /// SAS tokens signed with a symmetric key (and HS256 device JWTs).
    Sas,
    /// Device JWTs: ES256/RS256 against `publicKeys`, or HS256 with the symmetric key.
    Jwt,
    /// An X.509 client certificate with a registered thumbprint.
    SelfSigned,
    /// An X.509 client certificate with CN = device id, signed by the hub's device CA.
    CertificateAuthority,
}

/// The two symmetric keys of a device, base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    /// Primary key, base64.
    pub primary_key: String,
    /// Secondary key, base64 (for rotation).
    pub secondary_key: String,
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

/// Registered certificate thumbprints (hex SHA-256 or SHA-1, lower case, no colons).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    /// The primary thumbprint.
    pub primary_thumbprint: Option<String>,
    /// The secondary thumbprint (for rotation).
    pub secondary_thumbprint: Option<String>,
}

/// A device's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    /// Which credential the device connects with.
    #[serde(rename = "type")]
    pub kind: AuthType,
    /// Symmetric keys (`sas` and `jwt` devices).
    pub symmetric_key: Option<SymmetricKey>,
    /// PEM public keys for ES256/RS256 device JWTs.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// Registered thumbprints (`selfSigned` devices).
    #[serde(default)]
    pub x509_thumbprint: X509Thumbprint,
}

/// A device identity as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// The id.
    pub device_id: DeviceId,
    /// Distinguishes this device from an earlier one deleted under the same id.
    pub generation_id: String,
    /// Bumped on every write; the etag is derived from it.
    pub version: u64,
    /// Enabled or disabled.
    pub status: DeviceStatus,
    /// Free text saying why the status was set.
    pub status_reason: Option<String>,
    /// When `status` last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub status_updated_time: OffsetDateTime,
    /// Credentials.
    pub authentication: Authentication,
}

impl Device {
    /// The entity tag: opaque, changes with every write (Azure's are base64 too).
    pub fn etag(&self) -> String {
        STANDARD_NO_PAD.encode(self.version.to_string())
    }
}

/// The body of `PUT /devices/{id}`: what a client may set. Read-only fields
/// (`etag`, `generationId`, `connectionState`, …) are not listed and so ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// Must equal the id in the path when present.
    pub device_id: Option<String>,
    /// Defaults to enabled on create; kept on update when absent.
    pub status: Option<DeviceStatus>,
    /// Free text.
    pub status_reason: Option<String>,
    /// Defaults to `sas` with generated keys on create; kept on update when absent.
    pub authentication: Option<AuthenticationSpec>,
}

/// The credentials part of a [`DeviceSpec`]; absent parts are generated or kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationSpec {
    /// Defaults to `sas`.
    #[serde(rename = "type")]
    pub kind: Option<AuthType>,
    /// Keys to use instead of generated ones.
    pub symmetric_key: Option<SymmetricKeySpec>,
    /// PEM public keys (`jwt` devices).
    pub public_keys: Option<Vec<String>>,
    /// Thumbprints (`selfSigned` devices).
    pub x509_thumbprint: Option<X509Thumbprint>,
}

/// Symmetric keys in a request; each absent one is generated (or kept on update). An
/// empty string counts as absent: Azure's service SDKs send `""` for "generate one"
/// (Node's `registry.create` fills in `{primaryKey: '', secondaryKey: ''}`).
#[derive(Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeySpec {
    /// Primary key, base64 of 16 to 64 bytes.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub primary_key: Option<String>,
    /// Secondary key, base64 of 16 to 64 bytes.
    #[serde(default, deserialize_with = "empty_as_none")]
    pub secondary_key: Option<String>,
}

fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(d)?;
    Ok(value.filter(|key| !key.is_empty()))
}

impl std::fmt::Debug for SymmetricKeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKeySpec(<redacted>)")
    }
}

/// A new random symmetric key: 32 bytes from the OS-seeded CSPRNG, base64.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    STANDARD.encode(bytes)
}

/// Checks a client-supplied symmetric key: base64 of 16 to 64 bytes.
pub fn validate_key(field: &str, key: &str) -> Result<(), String> {
    match STANDARD.decode(key) {
        Ok(bytes) if (16..=64).contains(&bytes.len()) => Ok(()),
        Ok(bytes) => Err(format!(
            "{field} must decode to 16 to 64 bytes, not {}",
            bytes.len()
        )),
        Err(_) => Err(format!("{field} is not valid base64")),
    }
}

/// Normalises a thumbprint (drops `:` and spaces, lower-cases) and checks it is hex of
/// a SHA-1 (40) or SHA-256 (64) digest.
pub fn normalise_thumbprint(field: &str, raw: &str) -> Result<String, String> {
    let hex: String = raw
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if (hex.len() == 40 || hex.len() == 64) && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!(
            "{field} must be the hex SHA-1 or SHA-256 thumbprint of a certificate"
        ))
    }
}

/// Checks that a PEM holds a public key usable for ES256 or RS256.
pub fn validate_public_key(index: usize, pem: &str) -> Result<(), String> {
    let bytes = pem.as_bytes();
    if jsonwebtoken::DecodingKey::from_ec_pem(bytes).is_ok()
        || jsonwebtoken::DecodingKey::from_rsa_pem(bytes).is_ok()
    {
        Ok(())
    } else {
        Err(format!(
            "authentication.publicKeys[{index}] is not a PEM EC (P-256) or RSA public key"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_32_random_bytes() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(STANDARD.decode(&a).unwrap().len(), 32);
        validate_key("k", &a).unwrap();
    }

    #[test]
    fn short_or_non_base64_keys_are_refused() {
        assert!(validate_key("k", &STANDARD.encode([1u8; 8])).is_err());
        assert!(validate_key("k", "not base64!").is_err());
    }

    #[test]
    fn thumbprints_are_normalised() {
        let sha1 = "AB:CD:".to_string() + &"0".repeat(36);
        assert_eq!(
            normalise_thumbprint("t", &sha1).unwrap(),
            "abcd".to_string() + &"0".repeat(36)
        );
        assert!(normalise_thumbprint("t", "xyz").is_err());
    }

    #[test]
    fn etags_change_with_the_version() {
        let mut device = Device {
            device_id: DeviceId::parse("d").unwrap(),
            generation_id: "g".into(),
            version: 1,
            status: DeviceStatus::Enabled,
            status_reason: None,
            status_updated_time: OffsetDateTime::UNIX_EPOCH,
            authentication: Authentication {
                kind: AuthType::CertificateAuthority,
                symmetric_key: None,
                public_keys: vec![],
                x509_thumbprint: X509Thumbprint::default(),
            },
        };
        let first = device.etag();
        device.version += 1;
        assert_ne!(first, device.etag());
    }
}
