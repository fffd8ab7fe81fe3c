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
    let key = STANDARD
        .decode(key_b64)
        .map_err(|_| Error::Credentials("the device key is not base64".into()))?;
    let resource =
        utf8_percent_encode(&format!("{host}/devices/{device}"), NON_ALPHANUMERIC).to_string();
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|err| Error::Credentials(err.to_string()))?;
    mac.update(format!("{resource}\n{expiry}").as_bytes());
    let signature = STANDARD.encode(mac.finalize().into_bytes());
    let signature = utf8_percent_encode(&signature, NON_ALPHANUMERIC);
    Ok(format!(
        "SharedAccessSignature sr={resource}&sig={signature}&se={expiry}"
    ))
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
