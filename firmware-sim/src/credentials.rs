//! Device passwords for the hub: SAS tokens (signed by device-sdk, the one place that
//! knows how) and device JWTs (HS256 over the same symmetric key, DESIGN section 3
//! "Device JWTs").

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::cli::Auth;

/// Lifetime of the tokens the lean path connects with: it does not reconnect, so
/// one token covers the run (the hub caps JWT lifetimes at 24 h by default).
pub const LEAN_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Lifetime of device-sdk tokens; device-sdk renews them at 80 %.
pub const SDK_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A credential that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The device key is not base64.
    #[error("the key of {0} is not base64")]
    Key(String),
    /// Signing failed.
    #[error("cannot sign a token for {0}: {1}")]
    Sign(String, String),
}

/// A device JWT (HS256 with the base64-decoded `key`) valid from `now` for `ttl`.
pub fn device_jwt(
    hostname: &str,
    device: &str,
    key_b64: &str,
    now: SystemTime,
    ttl: Duration,
) -> Result<String, CredentialError> {
    let key = STANDARD
        .decode(key_b64)
        .map_err(|_| CredentialError::Key(device.to_string()))?;
    let iat = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let claims = serde_json::json!({
        "sub": device,
        "aud": hostname,
        "iat": iat,
        "exp": iat + ttl.as_secs(),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&key),
    )
    .map_err(|err| CredentialError::Sign(device.to_string(), err.to_string()))
}

/// The lean path's CONNECT password for `device`.
pub fn password(
    auth: Auth,
    hostname: &str,
    device: &str,
    key_b64: &str,
) -> Result<String, CredentialError> {
    let now = SystemTime::now();
    match auth {
        Auth::Sas => {
            let expiry = now
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .saturating_add(LEAN_TOKEN_TTL)
                .as_secs();
            device_sdk::credentials::sas_token(hostname, device, key_b64, expiry)
                .map_err(|err| CredentialError::Sign(device.to_string(), err.to_string()))
        }
        Auth::Jwt => device_jwt(hostname, device, key_b64, now, LEAN_TOKEN_TTL),
        // The certificate is the credential; the password stays empty.
        Auth::X509 => Ok(String::new()),
    }
}

/// device-sdk credentials for `device`.
/// Tokens live `ttl` (default [`SDK_TOKEN_TTL`]); device-sdk renews them at 80 %.
pub fn sdk_credentials(
    auth: Auth,
    hostname: &str,
    key_b64: String,
    ttl: Option<Duration>,
) -> device_sdk::Credentials {
    let ttl = ttl.unwrap_or(SDK_TOKEN_TTL);
    match auth {
        Auth::Sas | Auth::X509 => device_sdk::Credentials::Sas { key: key_b64, ttl },
        Auth::Jwt => {
            let hostname = hostname.to_string();
            device_sdk::Credentials::Jwt {
                signer: Arc::new(move |device: &str, now: SystemTime| {
                    device_jwt(&hostname, device, &key_b64, now, ttl).map_err(|err| err.to_string())
                }),
                ttl,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_jwts_carry_the_claims_the_hub_checks() {
        let key = STANDARD.encode([9u8; 32]);
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = device_jwt("localhost", "d1", &key, now, Duration::from_secs(60)).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.validate_exp = false;
        validation.set_audience(&["localhost"]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(&[9u8; 32]),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.claims["sub"], "d1");
        assert_eq!(decoded.claims["iat"], 1_000_000);
        assert_eq!(decoded.claims["exp"], 1_000_060);
        assert!(device_jwt("h", "d1", "not base64!", now, Duration::from_secs(1)).is_err());
        let sas = password(Auth::Sas, "localhost", "d1", &key).unwrap();
        assert!(sas.starts_with("SharedAccessSignature "), "{sas}");
    }
}
