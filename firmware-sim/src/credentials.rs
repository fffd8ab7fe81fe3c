//! Device passwords for the hub: SAS tokens (signed by device-sdk, the one place that
//! knows how) and device JWTs (HS256 over the same symmetric key, DESIGN section 3
//! "Device JWTs").

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::values::Auth;

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

/// One device from a credentials file (`--credentials`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDevice {
    /// The device id.
    pub id: String,
    /// Its symmetric key (base64).
    pub key: String,
    /// The hub host name the connection string names (signed into its tokens).
    pub hostname: Option<String>,
}

/// Reads a credentials file: per line either an Azure device connection string
/// (`HostName=…;DeviceId=…;SharedAccessKey=…`) or `DEVICE_ID KEY`; blank lines and
/// `#` comments are skipped. Errors name the line.
pub fn read_file(path: &std::path::Path) -> Result<Vec<FileDevice>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    parse_file(&text).map_err(|err| format!("{}: {err}", path.display()))
}

fn parse_file(text: &str) -> Result<Vec<FileDevice>, String> {
    let mut devices = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let device = if line.contains('=') && line.contains(';') {
            let field = |name: &str| {
                line.split(';').find_map(|part| {
                    let (key, value) = part.split_once('=')?;
                    key.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| value.trim().to_string())
                })
            };
            FileDevice {
                id: field("DeviceId").ok_or_else(|| format!("line {}: no DeviceId", n + 1))?,
                key: field("SharedAccessKey")
                    .ok_or_else(|| format!("line {}: no SharedAccessKey", n + 1))?,
                hostname: field("HostName"),
            }
        } else {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(id), Some(key), None) => FileDevice {
                    id: id.to_string(),
                    key: key.to_string(),
                    hostname: None,
                },
                _ => {
                    return Err(format!(
                        "line {}: neither a device connection string nor `DEVICE_ID KEY`",
                        n + 1
                    ));
                }
            }
        };
        if STANDARD.decode(&device.key).is_err() {
            return Err(format!(
                "line {}: the key of {} is not base64",
                n + 1,
                device.id
            ));
        }
        devices.push(device);
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {

    #[test]
    fn credentials_files_take_connection_strings_and_id_key_pairs() {
        let text =
            "# fleet\n\nHostName=hub.example;DeviceId=d1;SharedAccessKey=a2V5\n d2   a2V5 \n";
        let devices = parse_file(text).unwrap();
        assert_eq!(
            devices,
            vec![
                FileDevice {
                    id: "d1".into(),
                    key: "a2V5".into(),
                    hostname: Some("hub.example".into()),
                },
                FileDevice {
                    id: "d2".into(),
                    key: "a2V5".into(),
                    hostname: None,
                },
            ]
        );
        assert!(
            parse_file("HostName=h;DeviceId=d1\n")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(parse_file("d1\n").unwrap_err().contains("line 1"));
        assert!(
            parse_file("ok a2V5\nd2 not*base64\n")
                .unwrap_err()
                .contains("line 2")
        );
    }

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
