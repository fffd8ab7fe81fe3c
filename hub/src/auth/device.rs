//! Device authentication at CONNECT: picks the credential the device presented (SAS
//! token, JWT, or TLS client certificate), checks the username, looks the device up
//! in the registry, and verifies. Refusal reasons are typed so they can be logged and
//! counted; secrets never appear in them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::pki_types::CertificateDer;

use super::jwt::{self, JwtError, JwtKeys, JwtPolicy};
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
}

impl DeviceAuthenticator {
    /// An authenticator for a hub reached as `hostname`.
    pub fn new(
        registry: Registry,
        hostname: String,
        device_ca: DeviceCa,
        jwt_policy: JwtPolicy,
    ) -> Self {
        Self {
            registry,
            hostname,
            device_ca,
            jwt_policy,
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
        let (method, expires_at) = match presented.password {
            Some(password) if password.starts_with("SharedAccessSignature") => {
                if username_kind == UsernameKind::BareId || auth.kind != AuthType::Sas {
                    return Err(AuthFailure::WrongCredentialType);
                }
                let keys = symmetric_keys(&device);
                let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                let expiry = SasToken::parse(password)?.verify(
                    &self.hostname,
                    id.as_str(),
                    &key_refs,
                    now,
                )?;
                (AuthMethod::Sas, Some(expiry))
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
                let expiry = jwt::verify(
                    token,
                    id.as_str(),
                    &self.hostname,
                    &jwt_keys,
                    self.jwt_policy,
                    now,
                )?;
                (AuthMethod::Jwt, Some(expiry))
            }
            None if presented.certificates.is_empty() => return Err(AuthFailure::NoCredential),
            None => match auth.kind {
                AuthType::CertificateAuthority => {
                    x509::verify_ca_issued(presented.certificates, id.as_str(), &self.device_ca)?;
                    (AuthMethod::X509Ca, None)
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
                    (AuthMethod::X509Thumbprint, None)
                }
                AuthType::Sas | AuthType::Jwt => return Err(AuthFailure::WrongCredentialType),
            },
        };
        Ok(AuthenticatedDevice {
            device,
            method,
            expires_at,
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
}
