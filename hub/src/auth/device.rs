//! Device authentication at CONNECT: picks the credential the device presented (SAS
//! token, JWT, or TLS client certificate), checks the username, looks the device up
//! in the registry, and verifies. Refusal reasons are typed so they can be logged and
//! counted; secrets never appear in them.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use super::jwt::{self, JwtError, JwtKeyUsed, JwtKeys, JwtPolicy};
use super::sas::{SasError, SasToken};
use super::unix_now;
use super::x509::{self, DeviceCa, X509Error};
use crate::registry::{AuthType, Device, DeviceId, DeviceStatus, Registry, RegistryError};

/// How a device proved its identity (stamped on its telemetry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// SAS token.
    Sas,
    /// Device-signed JWT.
    Jwt,
    /// Client certificate issued by the device CA.
    X509Ca,
    /// Client certificate with a registered thumbprint.
    X509Thumbprint,
}

impl AuthMethod {
    /// Every method, for lookups by [`AuthMethod::tag`].
    pub const ALL: [AuthMethod; 4] = [
        AuthMethod::Sas,
        AuthMethod::Jwt,
        AuthMethod::X509Ca,
        AuthMethod::X509Thumbprint,
    ];

    /// A short name (the stamp's `type`), as stored with each telemetry record.
    pub fn tag(self) -> &'static str {
        match self {
            AuthMethod::Sas => "sas",
            AuthMethod::Jwt => "jwt",
            AuthMethod::X509Ca => "x509Certificate",
            AuthMethod::X509Thumbprint => "x509Thumbprint",
        }
    }

    /// The method named by [`AuthMethod::tag`].
    pub fn from_tag(tag: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|method| method.tag() == tag)
    }

    /// The `iothub-connection-auth-method` stamp, in Azure's shape.
    pub fn stamp(self) -> &'static str {
        match self {
            AuthMethod::Sas => r#"{"scope":"device","type":"sas","issuer":"iothub"}"#,
            AuthMethod::Jwt => r#"{"scope":"device","type":"jwt","issuer":"device"}"#,
            AuthMethod::X509Ca => {
                r#"{"scope":"device","type":"x509Certificate","issuer":"iothub"}"#
            }
            AuthMethod::X509Thumbprint => {
                r#"{"scope":"device","type":"x509Thumbprint","issuer":"iothub"}"#
            }
        }
    }
}

/// Why a CONNECT was refused (answered with CONNACK 5).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No such device.
    #[error("unknown device")]
    UnknownDevice,
    /// The device is disabled.
    #[error("device disabled")]
    Disabled,
    /// The username's device path is not the client id.
    #[error("username does not match the client id")]
    UsernameMismatch,
    /// Neither a password nor a client certificate.
    #[error("no credential presented")]
    NoCredential,
    /// The credential kind does not fit the device's authentication type.
    #[error("credential type not allowed for this device")]
    WrongCredentialType,
    /// The SAS token was refused.
    #[error(transparent)]
    Sas(#[from] SasError),
    /// The JWT was refused.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// The client certificate was refused.
    #[error(transparent)]
    X509(#[from] X509Error),
    /// The credential the connection proved is no longer registered for the device
    /// (its key, public key or thumbprint was changed, or its authentication type),
    /// or the device was deleted and created again.
    #[error("credential no longer registered for the device")]
    CredentialRevoked,
    /// The registry could not be read.
    #[error("registry unavailable")]
    Store,
}

impl AuthFailure {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::UnknownDevice => "unknown_device",
            AuthFailure::Disabled => "disabled",
            AuthFailure::UsernameMismatch => "username_mismatch",
            AuthFailure::NoCredential => "no_credential",
            AuthFailure::WrongCredentialType => "wrong_credential_type",
            AuthFailure::Sas(SasError::Expired) | AuthFailure::Jwt(JwtError::Expired) => "expired",
            AuthFailure::Sas(SasError::BadSignature) | AuthFailure::Jwt(JwtError::BadSignature) => {
                "bad_signature"
            }
            AuthFailure::Sas(SasError::LifetimeTooLong(_)) => "token_lifetime_too_long",
            AuthFailure::CredentialRevoked => "credential_revoked",
            AuthFailure::Sas(_) => "sas_invalid",
            AuthFailure::Jwt(_) => "jwt_invalid",
            AuthFailure::X509(_) => "x509_invalid",
            AuthFailure::Store => "store_error",
        }
    }
}

/// A device that passed authentication.
#[derive(Debug, Clone)]
pub struct AuthenticatedDevice {
    /// The registry record.
    pub device: Device,
    /// How it authenticated.
    pub method: AuthMethod,
    /// When the credential expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
    /// Which registered credential it proved.
    pub credential: Credential,
}

/// SHA-256 of a key: names a registered key without holding it (the key itself is
/// never stored with a connection nor logged).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDigest(..)")
    }
}

/// What a connection proved at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// A SAS token signed with the symmetric key of this digest.
    SasKey(KeyDigest),
    /// An HS256 JWT signed with the symmetric key of this digest.
    JwtSymmetricKey(KeyDigest),
    /// An ES256/RS256 JWT verified with the registered public key (PEM) of this digest.
    JwtPublicKey(KeyDigest),
    /// A client certificate with these (lower-case hex) SHA-256 and SHA-1 thumbprints.
    Thumbprint {
        /// SHA-256 thumbprint.
        sha256: String,
        /// SHA-1 thumbprint.
        sha1: String,
    },
    /// A client certificate issued by the device CA with CN = the device id.
    DeviceCa,
}

/// The credential a connection authenticated with, in a form that can be checked
/// against a later version of the device: a registry change that takes it away
/// closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The device's generation: a device deleted and created again under the same id
    /// is another device.
    pub generation_id: String,
    /// What was proved.
    pub proof: Proof,
}

impl Credential {
    /// Whether `device` (a current registry record) still accepts this credential:
    /// the same generation, enabled, and the key, public key or thumbprint still
    /// registered under an authentication type that allows it.
    pub fn check(&self, device: &Device) -> Result<(), AuthFailure> {
        if device.generation_id != self.generation_id {
            return Err(AuthFailure::CredentialRevoked);
        }
        if device.status != DeviceStatus::Enabled {
            return Err(AuthFailure::Disabled);
        }
        let auth = &device.authentication;
        let symmetric = |digest: &KeyDigest| {
            symmetric_keys(device)
                .iter()
                .any(|key| KeyDigest::of(key) == *digest)
        };
        let valid = match &self.proof {
            Proof::SasKey(digest) => auth.kind == AuthType::Sas && symmetric(digest),
            Proof::JwtSymmetricKey(digest) => {
                matches!(auth.kind, AuthType::Sas | AuthType::Jwt) && symmetric(digest)
            }
            Proof::JwtPublicKey(digest) => {
                auth.kind == AuthType::Jwt
                    && auth
                        .public_keys
                        .iter()
                        .any(|pem| KeyDigest::of(pem.as_bytes()) == *digest)
            }
            Proof::Thumbprint { sha256, sha1 } => {
                auth.kind == AuthType::SelfSigned
                    && [
                        &auth.x509_thumbprint.primary_thumbprint,
                        &auth.x509_thumbprint.secondary_thumbprint,
                    ]
                    .into_iter()
                    .flatten()
                    .any(|t| t == sha256 || t == sha1)
            }
            Proof::DeviceCa => auth.kind == AuthType::CertificateAuthority,
        };
        if valid {
            Ok(())
        } else {
            Err(AuthFailure::CredentialRevoked)
        }
    }
}

/// What the device presented.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    /// MQTT client id.
    pub client_id: &'a str,
    /// MQTT username.
    pub username: Option<&'a str>,
    /// MQTT password.
    pub password: Option<&'a str>,
    /// TLS client certificate chain (end entity first); empty over plain TCP.
    pub certificates: &'a [CertificateDer<'static>],
}

/// Authenticates devices against the registry.
#[derive(Debug, Clone)]
pub struct DeviceAuthenticator {
    registry: Registry,
    hostname: String,
    device_ca: DeviceCa,
    jwt_policy: JwtPolicy,
    sas_max_lifetime: Duration,
}

impl DeviceAuthenticator {
    /// An authenticator for a hub reached as `hostname`; SAS tokens whose `se` is
    /// more than `sas_max_lifetime` away are refused.
    pub fn new(
        registry: Registry,
        hostname: String,
        device_ca: DeviceCa,
        jwt_policy: JwtPolicy,
        sas_max_lifetime: Duration,
    ) -> Self {
        Self {
            registry,
            hostname,
            device_ca,
            jwt_policy,
            sas_max_lifetime,
        }
    }

    /// Checks `credential` against the registry's current record of `id`: used after
    /// a connection registered (a change that landed between the CONNECT's registry
    /// read and the registration is seen here) and when the device changes.
    pub async fn recheck(&self, id: &DeviceId, credential: &Credential) -> Result<(), AuthFailure> {
        match self.registry.get(id).await {
            Ok(device) => credential.check(&device),
            Err(RegistryError::NotFound(_)) => Err(AuthFailure::UnknownDevice),
            Err(_) => Err(AuthFailure::Store),
        }
    }

    /// Checks `presented`; the device must exist, be enabled, and prove its identity.
    pub async fn authenticate(
        &self,
        presented: Presented<'_>,
    ) -> Result<AuthenticatedDevice, AuthFailure> {
        let id = DeviceId::parse(presented.client_id).map_err(|_| AuthFailure::UnknownDevice)?;
        let username_kind = check_username(presented.username, presented.client_id)?;
        let device = match self.registry.get(&id).await {
            Ok(device) => device,
            Err(RegistryError::NotFound(_)) => return Err(AuthFailure::UnknownDevice),
            Err(_) => return Err(AuthFailure::Store),
        };
        if device.status != DeviceStatus::Enabled {
            return Err(AuthFailure::Disabled);
        }
        let now = unix_now();
        let auth = &device.authentication;
        let (method, expires_at, proof) = match presented.password {
            Some(password) if password.starts_with("SharedAccessSignature") => {
                if username_kind == UsernameKind::BareId || auth.kind != AuthType::Sas {
                    return Err(AuthFailure::WrongCredentialType);
                }
                let keys = symmetric_keys(&device);
                let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                let (expiry, index) = SasToken::parse(password)?.verify_key(
                    &self.hostname,
                    id.as_str(),
                    &key_refs,
                    now,
                )?;
                // A token valid for ever (`se` near u64::MAX) cannot be revoked short of
                // rotating the key, and overflows deadline arithmetic: refuse it.
                let max = self.sas_max_lifetime.as_secs();
                if expiry.saturating_sub(now) > max {
                    return Err(AuthFailure::Sas(SasError::LifetimeTooLong(max)));
                }
                (
                    AuthMethod::Sas,
                    Some(expiry),
                    Proof::SasKey(KeyDigest::of(key_refs[index])),
                )
            }
            Some(token) => {
                let keys = symmetric_keys(&device);
                let jwt_keys = JwtKeys {
                    symmetric: match auth.kind {
                        AuthType::Sas | AuthType::Jwt => keys.iter().map(Vec::as_slice).collect(),
                        _ => return Err(AuthFailure::WrongCredentialType),
                    },
                    public_pems: auth.public_keys.iter().map(String::as_str).collect(),
                };
                let (expiry, used) = jwt::verify_key(
                    token,
                    id.as_str(),
                    &self.hostname,
                    &jwt_keys,
                    self.jwt_policy,
                    now,
                )?;
                let proof = match used {
                    JwtKeyUsed::Symmetric(i) => {
                        Proof::JwtSymmetricKey(KeyDigest::of(jwt_keys.symmetric[i]))
                    }
                    JwtKeyUsed::Public(i) => {
                        Proof::JwtPublicKey(KeyDigest::of(jwt_keys.public_pems[i].as_bytes()))
                    }
                };
                (AuthMethod::Jwt, Some(expiry), proof)
            }
            None if presented.certificates.is_empty() => return Err(AuthFailure::NoCredential),
            None => match auth.kind {
                AuthType::CertificateAuthority => {
                    x509::verify_ca_issued(presented.certificates, id.as_str(), &self.device_ca)?;
                    (AuthMethod::X509Ca, None, Proof::DeviceCa)
                }
                AuthType::SelfSigned => {
                    let registered: Vec<&str> = [
                        auth.x509_thumbprint.primary_thumbprint.as_deref(),
                        auth.x509_thumbprint.secondary_thumbprint.as_deref(),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    x509::verify_thumbprint(presented.certificates, &registered)?;
                    let (sha256, sha1) = presented
                        .certificates
                        .first()
                        .map(|leaf| x509::thumbprints(leaf))
                        .ok_or(AuthFailure::X509(X509Error::NoCertificate))?;
                    (
                        AuthMethod::X509Thumbprint,
                        None,
                        Proof::Thumbprint { sha256, sha1 },
                    )
                }
                AuthType::Sas | AuthType::Jwt => return Err(AuthFailure::WrongCredentialType),
            },
        };
        let credential = Credential {
            generation_id: device.generation_id.clone(),
            proof,
        };
        Ok(AuthenticatedDevice {
            device,
            method,
            expires_at,
            credential,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsernameKind {
    /// No username.
    Absent,
    /// `<host>/<device id>[/…]`, as Azure SDKs send.
    HostPath,
    /// Just `<device id>` (JWT and X.509 devices).
    BareId,
}

/// `<host>/<id>/?api-version=…` (or without `?`, or just `<host>/<id>`), or `<id>`.
fn check_username(username: Option<&str>, client_id: &str) -> Result<UsernameKind, AuthFailure> {
    let Some(username) = username else {
        return Ok(UsernameKind::Absent);
    };
    match username.split_once('/') {
        Some((_host, rest)) => {
            let id = rest.split('/').next().unwrap_or_default();
            if id == client_id {
                Ok(UsernameKind::HostPath)
            } else {
                Err(AuthFailure::UsernameMismatch)
            }
        }
        None if username == client_id => Ok(UsernameKind::BareId),
        None => Err(AuthFailure::UsernameMismatch),
    }
}

fn symmetric_keys(device: &Device) -> Vec<Vec<u8>> {
    device
        .authentication
        .symmetric_key
        .iter()
        .flat_map(|k| [&k.primary_key, &k.secondary_key])
        .filter_map(|k| STANDARD.decode(k).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_in_every_sdk_shape() {
        assert_eq!(
            check_username(
                Some("hub/d1/?api-version=2021-04-12&DeviceClientType=x"),
                "d1"
            ),
            Ok(UsernameKind::HostPath)
        );
        assert_eq!(
            check_username(Some("hub/d1/api-version=2018-06-30"), "d1"),
            Ok(UsernameKind::HostPath)
        );
        assert_eq!(
            check_username(Some("hub/d1"), "d1"),
            Ok(UsernameKind::HostPath)
        );
        assert_eq!(check_username(Some("d1"), "d1"), Ok(UsernameKind::BareId));
        assert_eq!(check_username(None, "d1"), Ok(UsernameKind::Absent));
        assert_eq!(
            check_username(Some("hub/d2/?api-version=1"), "d1"),
            Err(AuthFailure::UsernameMismatch)
        );
        assert_eq!(
            check_username(Some("d2"), "d1"),
            Err(AuthFailure::UsernameMismatch)
        );
    }

    mod with_registry {
        use std::sync::Arc;

        use super::*;
        use crate::registry::{
            AuthenticationSpec, DeviceSpec, IfMatch, Presence, SymmetricKeySpec, X509Thumbprint,
        };
        use crate::store::embedded::EmbeddedStore;

        async fn authenticator(
            dir: &tempfile::TempDir,
            sas_max_lifetime: Duration,
        ) -> (Registry, DeviceAuthenticator, Device) {
            let store = EmbeddedStore::open(&dir.path().join("hub.redb")).unwrap();
            let registry = Registry::new(Arc::new(store), Presence::default());
            let device = registry
                .create(DeviceId::parse("d1").unwrap(), DeviceSpec::default())
                .await
                .unwrap();
            let ca = certs::Ca::generate("test CA").unwrap();
            let auth = DeviceAuthenticator::new(
                registry.clone(),
                "hub".into(),
                DeviceCa::from_pem(ca.cert_pem()).unwrap(),
                JwtPolicy::default(),
                sas_max_lifetime,
            );
            (registry, auth, device)
        }

        fn token(key_b64: &str, expiry: u64) -> String {
            crate::auth::sas::sign("hub", "d1", &STANDARD.decode(key_b64).unwrap(), expiry)
        }

        async fn connect(
            auth: &DeviceAuthenticator,
            password: &str,
        ) -> Result<AuthenticatedDevice, AuthFailure> {
            auth.authenticate(Presented {
                client_id: "d1",
                username: Some("hub/d1/?api-version=1"),
                password: Some(password),
                certificates: &[],
            })
            .await
        }

        #[tokio::test]
        async fn sas_tokens_beyond_the_lifetime_cap_are_refused_with_their_own_reason() {
            let dir = tempfile::tempdir().unwrap();
            let (_registry, auth, device) = authenticator(&dir, Duration::from_secs(3600)).await;
            let keys = device.authentication.symmetric_key.unwrap();
            let now = unix_now();
            for expiry in [u64::MAX, u64::MAX - 1, now + 3600 + 120] {
                let refused = connect(&auth, &token(&keys.primary_key, expiry))
                    .await
                    .unwrap_err();
                assert_eq!(refused, AuthFailure::Sas(SasError::LifetimeTooLong(3600)));
                assert_eq!(refused.label(), "token_lifetime_too_long");
            }
            let accepted = connect(&auth, &token(&keys.primary_key, now + 3000))
                .await
                .unwrap();
            assert_eq!(accepted.expires_at, Some(now + 3000));
        }

        #[tokio::test]
        async fn a_credential_stays_valid_until_its_own_key_is_rotated_away() {
            let dir = tempfile::tempdir().unwrap();
            let (registry, auth, device) = authenticator(&dir, Duration::from_secs(3600)).await;
            let id = device.device_id.clone();
            let keys = device.authentication.symmetric_key.clone().unwrap();
            let expiry = unix_now() + 600;
            let primary = connect(&auth, &token(&keys.primary_key, expiry))
                .await
                .unwrap()
                .credential;
            let secondary = connect(&auth, &token(&keys.secondary_key, expiry))
                .await
                .unwrap()
                .credential;
            assert_ne!(primary, secondary);
            let debug = format!("{primary:?}");
            assert!(!debug.contains(&keys.primary_key), "{debug}");

            let update = |spec: AuthenticationSpec| {
                let registry = registry.clone();
                let id = id.clone();
                async move {
                    let spec = DeviceSpec {
                        authentication: Some(spec),
                        ..DeviceSpec::default()
                    };
                    registry.update(id, spec, IfMatch::Any).await.unwrap()
                }
            };
            // Primary and secondary swapped: both keys still registered.
            let swapped = update(AuthenticationSpec {
                symmetric_key: Some(SymmetricKeySpec {
                    primary_key: Some(keys.secondary_key.clone()),
                    secondary_key: Some(keys.primary_key.clone()),
                }),
                ..AuthenticationSpec::default()
            })
            .await;
            assert_eq!(primary.check(&swapped), Ok(()));
            assert_eq!(secondary.check(&swapped), Ok(()));
            // The key that signed `primary` replaced: only it is revoked.
            let rotated = update(AuthenticationSpec {
                symmetric_key: Some(SymmetricKeySpec {
                    secondary_key: Some(STANDARD.encode([5u8; 32])),
                    ..SymmetricKeySpec::default()
                }),
                ..AuthenticationSpec::default()
            })
            .await;
            assert_eq!(primary.check(&rotated), Err(AuthFailure::CredentialRevoked));
            assert_eq!(secondary.check(&rotated), Ok(()));
            assert_eq!(
                auth.recheck(&id, &primary).await,
                Err(AuthFailure::CredentialRevoked)
            );
            // Another authentication type takes every SAS credential away.
            let thumbprint = "ab".repeat(32);
            let x509 = update(AuthenticationSpec {
                kind: Some(AuthType::SelfSigned),
                x509_thumbprint: Some(X509Thumbprint {
                    primary_thumbprint: Some(thumbprint.clone()),
                    secondary_thumbprint: None,
                }),
                ..AuthenticationSpec::default()
            })
            .await;
            assert_eq!(secondary.check(&x509), Err(AuthFailure::CredentialRevoked));
            let by_thumbprint = Credential {
                generation_id: x509.generation_id.clone(),
                proof: Proof::Thumbprint {
                    sha256: thumbprint,
                    sha1: "00".repeat(20),
                },
            };
            assert_eq!(by_thumbprint.check(&x509), Ok(()));
            // A device created again under the same id is another device.
            registry.delete(&id, None).await.unwrap();
            assert_eq!(
                auth.recheck(&id, &secondary).await,
                Err(AuthFailure::UnknownDevice)
            );
            let again = registry
                .create(id.clone(), DeviceSpec::default())
                .await
                .unwrap();
            let stale = Credential {
                generation_id: device.generation_id.clone(),
                proof: by_thumbprint.proof.clone(),
            };
            assert_eq!(stale.check(&again), Err(AuthFailure::CredentialRevoked));
        }
    }
}
