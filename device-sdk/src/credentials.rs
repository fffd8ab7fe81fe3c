//! How the device proves its identity: SAS tokens signed with its key (renewed before
//! they expire), device JWTs from a signer, or an X.509 certificate and key.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;

use crate::Error;

/// Signs a device JWT for `(device id, now)`; returns the token.
pub type JwtSigner = Arc<dyn Fn(&str, SystemTime) -> Result<String, String> + Send + Sync>;

/// A device credential.
#[derive(Clone)]
pub enum Credentials {
    /// SAS tokens signed with the base64 symmetric key, each valid for `ttl`.
    Sas {
        /// The device key, base64.
        key: String,
        /// Token lifetime; the client reconnects with a fresh token before it ends.
        ttl: Duration,
    },
    /// Device JWTs from `signer`, each valid for `ttl`.
    Jwt {
        /// Makes a token.
        signer: JwtSigner,
        /// Token lifetime, as the signer sets `exp`.
        ttl: Duration,
    },
    /// A TLS client certificate.
    X509 {
        /// Certificate chain, PEM.
        cert_pem: String,
        /// Private key, PEM.
        key_pem: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::Sas { .. } => "Credentials::Sas(<redacted>)",
            Credentials::Jwt { .. } => "Credentials::Jwt(<signer>)",
            Credentials::X509 { .. } => "Credentials::X509(<redacted>)",
        })
    }
}

impl Credentials {
    /// The MQTT password for a connection made at `now`, and how long it is valid.
    pub fn password(
        &self,
        host: &str,
        device: &str,
        now: SystemTime,
    ) -> Result<Option<(String, Duration)>, Error> {
        match self {
            Credentials::Sas { key, ttl } => {
                let expiry = now.duration_since(UNIX_EPOCH).unwrap_or_default() + *ttl;
                Ok(Some((
                    sas_token(host, device, key, expiry.as_secs())?,
                    *ttl,
                )))
            }
            Credentials::Jwt { signer, ttl } => signer(device, now)
                .map(|token| Some((token, *ttl)))
                .map_err(Error::Credentials),
            Credentials::X509 { .. } => Ok(None),
        }
    }
}

/// A SAS token for `device` on `host`, expiring at `expiry` (Unix seconds).
pub fn sas_token(host: &str, device: &str, key_b64: &str, expiry: u64) -> Result<String, Error> {
    resource_token(&format!("{host}/devices/{device}"), key_b64, expiry, None)
}

/// The SAS token a device registering with the Device Provisioning Service signs
/// (`sr` = `{idScope}/registrations/{registrationId}`, `skn=registration`), as Azure's
/// provisioning SDKs make it.
pub fn provisioning_sas_token(
    id_scope: &str,
    registration_id: &str,
    key_b64: &str,
    expiry: u64,
) -> Result<String, Error> {
    resource_token(
        &format!("{id_scope}/registrations/{registration_id}"),
        key_b64,
        expiry,
        Some("registration"),
    )
}

/// A device's key under an enrollment group: base64 of HMAC-SHA256 over the
/// registration id, keyed with the base64-decoded group key (Azure's derivation).
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, Error> {
    Ok(STANDARD.encode(sign(group_key_b64, registration_id)?))
}

/// `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]` over `resource`.
fn resource_token(
    resource: &str,
    key_b64: &str,
    expiry: u64,
    key_name: Option<&str>,
) -> Result<String, Error> {
    let resource = utf8_percent_encode(resource, NON_ALPHANUMERIC).to_string();
    let signature = STANDARD.encode(sign(key_b64, &format!("{resource}\n{expiry}"))?);
    let signature = utf8_percent_encode(&signature, NON_ALPHANUMERIC);
    let key_name = key_name.map_or(String::new(), |name| format!("&skn={name}"));
    Ok(format!(
        "SharedAccessSignature sr={resource}&sig={signature}&se={expiry}{key_name}"
    ))
}

/// HMAC-SHA256 of `text` keyed with the base64-decoded `key_b64`.
fn sign(key_b64: &str, text: &str) -> Result<Vec<u8>, Error> {
    let key = STANDARD
        .decode(key_b64)
        .map_err(|_| Error::Credentials("the key is not base64".into()))?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|err| Error::Credentials(err.to_string()))?;
    mac.update(text.as_bytes());
    Ok(mac.finalize().into_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_tokens_have_the_azure_shape() {
        let token = sas_token("hub", "d1", &STANDARD.encode([7u8; 32]), 1_900_000_000).unwrap();
        assert!(
            token.starts_with("SharedAccessSignature sr=hub%2Fdevices%2Fd1&sig="),
            "{token}"
        );
        assert!(token.ends_with("&se=1900000000"));
        assert!(sas_token("hub", "d1", "not base64!", 1).is_err());
    }

    #[test]
    fn provisioning_tokens_and_derived_keys_match_azure() {
        // Azure's documented derivation: base64(HMAC-SHA256(base64dec(group), id)),
        // the value the hub's provisioning tests check against the Python SDK.
        let group = STANDARD.encode(b"a group key of enough length....");
        let derived = derive_device_key(&group, "dev-1").unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"a group key of enough length....").unwrap();
        mac.update(b"dev-1");
        assert_eq!(derived, STANDARD.encode(mac.finalize().into_bytes()));
        assert!(derive_device_key("not base64!", "dev-1").is_err());
        let token =
            provisioning_sas_token("0ne00000001", "dev-1", &derived, 1_900_000_000).unwrap();
        assert!(
            token
                .starts_with("SharedAccessSignature sr=0ne00000001%2Fregistrations%2Fdev%2D1&sig="),
            "{token}"
        );
        assert!(
            token.ends_with("&se=1900000000&skn=registration"),
            "{token}"
        );
    }

    #[test]
    fn passwords_follow_the_credential_kind() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let sas = Credentials::Sas {
            key: STANDARD.encode([1u8; 32]),
            ttl: Duration::from_secs(60),
        };
        let (token, ttl) = sas.password("hub", "d", now).unwrap().unwrap();
        assert!(token.ends_with("&se=1060"));
        assert_eq!(ttl, Duration::from_secs(60));
        let x509 = Credentials::X509 {
            cert_pem: String::new(),
            key_pem: String::new(),
        };
        assert!(x509.password("hub", "d", now).unwrap().is_none());
    }
}
