//! Device JWTs: signed by the device with ES256 or RS256 (against a registered public
//! key) or HS256 (with its symmetric key). `sub` must be the device id; `exp` and
//! `iat` are required; the lifetime is capped and a small clock skew is allowed;
//! `aud`, when present, must be the hub's hostname.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a device JWT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not a JWT, or its header does not parse.
    #[error("malformed JWT")]
    Malformed,
    /// An algorithm other than ES256, RS256 or HS256 (including `none`).
    #[error("JWT algorithm not accepted")]
    Algorithm,
    /// No registered key of the token's algorithm verifies its signature.
    #[error("JWT signature does not match a device key")]
    BadSignature,
    /// `exp` has passed (beyond the allowed skew).
    #[error("JWT expired")]
    Expired,
    /// `sub`, `iat`, `exp` or `aud` missing or wrong.
    #[error("JWT claims invalid: {0}")]
    Claims(&'static str),
    /// `exp - iat` exceeds the cap.
    #[error("JWT lifetime exceeds the limit")]
    TooLong,
}

/// The device keys a JWT may be checked against.
#[derive(Debug, Default)]
pub struct JwtKeys<'a> {
    /// Base64-decoded symmetric keys (HS256).
    pub symmetric: Vec<&'a [u8]>,
    /// PEM public keys (ES256, RS256).
    pub public_pems: Vec<&'a str>,
}

/// Limits on device JWTs.
#[derive(Debug, Clone, Copy)]
pub struct JwtPolicy {
    /// Longest accepted `exp - iat`.
    pub max_lifetime: Duration,
    /// Clock skew allowed on `exp` and `iat`.
    pub skew: Duration,
}

impl Default for JwtPolicy {
    fn default() -> Self {
        Self {
            max_lifetime: Duration::from_secs(24 * 3600),
            skew: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    iat: Option<u64>,
    aud: Option<serde_json::Value>,
}

/// Which of the [`JwtKeys`] verified a token (an index into its list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtKeyUsed {
    /// `symmetric[i]` (HS256).
    Symmetric(usize),
    /// `public_pems[i]` (ES256, RS256).
    Public(usize),
}

/// Verifies `token` for `device_id` at `now` (Unix seconds); returns its expiry.
pub fn verify(
    token: &str,
    device_id: &str,
    hostname: &str,
    keys: &JwtKeys<'_>,
    policy: JwtPolicy,
    now: u64,
) -> Result<u64, JwtError> {
    verify_key(token, device_id, hostname, keys, policy, now).map(|(exp, _)| exp)
}

/// As [`verify`], and also says which key verified the token, so a connection can
/// later tell whether that key was rotated away.
pub fn verify_key(
    token: &str,
    device_id: &str,
    hostname: &str,
    keys: &JwtKeys<'_>,
    policy: JwtPolicy,
    now: u64,
) -> Result<(u64, JwtKeyUsed), JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
    let public = |parse: fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>| {
        keys.public_pems
            .iter()
            .enumerate()
            .filter_map(|(i, pem)| {
                parse(pem.as_bytes())
                    .ok()
                    .map(|k| (JwtKeyUsed::Public(i), k))
            })
            .collect::<Vec<_>>()
    };
    let decoding: Vec<(JwtKeyUsed, DecodingKey)> = match header.alg {
        Algorithm::HS256 => keys
            .symmetric
            .iter()
            .enumerate()
            .map(|(i, k)| (JwtKeyUsed::Symmetric(i), DecodingKey::from_secret(k)))
            .collect(),
        Algorithm::ES256 => public(DecodingKey::from_ec_pem),
        Algorithm::RS256 => public(DecodingKey::from_rsa_pem),
        _ => return Err(JwtError::Algorithm),
    };
    let mut validation = Validation::new(header.alg);
    // Expiry and the other claims are checked below against `now`, so the check is
    // deterministic in tests; here only the signature is verified.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let (used, claims) = decoding
        .iter()
        .find_map(|(used, key)| {
            jsonwebtoken::decode::<Claims>(token, key, &validation)
                .ok()
                .map(|data| (*used, data.claims))
        })
        .ok_or(JwtError::BadSignature)?;

    if claims.sub.as_deref() != Some(device_id) {
        return Err(JwtError::Claims("sub must be the device id"));
    }
    let exp = claims.exp.ok_or(JwtError::Claims("exp is required"))?;
    let iat = claims.iat.ok_or(JwtError::Claims("iat is required"))?;
    let skew = policy.skew.as_secs();
    if exp.saturating_add(skew) <= now {
        return Err(JwtError::Expired);
    }
    if iat > now.saturating_add(skew) {
        return Err(JwtError::Claims("iat is in the future"));
    }
    if exp.saturating_sub(iat) > policy.max_lifetime.as_secs() {
        return Err(JwtError::TooLong);
    }
    if let Some(aud) = claims.aud {
        let matches =
            |v: &serde_json::Value| v.as_str().is_some_and(|a| a.eq_ignore_ascii_case(hostname));
        let ok = match &aud {
            serde_json::Value::Array(values) => values.iter().any(matches),
            other => matches(other),
        };
        if !ok {
            return Err(JwtError::Claims("aud must be the hub hostname"));
        }
    }
    Ok((exp, used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn hs256(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn keys() -> JwtKeys<'static> {
        JwtKeys {
            symmetric: vec![SECRET],
            public_pems: vec![],
        }
    }

    #[test]
    fn a_valid_hs256_token_verifies() {
        let token = hs256(json!({"sub": "d1", "iat": 1000, "exp": 2000, "aud": "hub"}));
        assert_eq!(
            verify(&token, "d1", "hub", &keys(), JwtPolicy::default(), 1500),
            Ok(2000)
        );
    }

    #[test]
    fn claims_are_checked() {
        let policy = JwtPolicy::default();
        let check = |claims| verify(&hs256(claims), "d1", "hub", &keys(), policy, 1500);
        assert_eq!(
            check(json!({"sub": "d2", "iat": 1000, "exp": 2000})),
            Err(JwtError::Claims("sub must be the device id"))
        );
        assert!(matches!(
            check(json!({"sub": "d1", "exp": 2000})),
            Err(JwtError::Claims(_))
        ));
        assert!(matches!(
            check(json!({"sub": "d1", "iat": 1000})),
            Err(JwtError::Claims(_))
        ));
        assert_eq!(
            check(json!({"sub": "d1", "iat": 1000, "exp": 1400})),
            Err(JwtError::Expired)
        );
        // Within the skew, an expired token still passes.
        assert_eq!(
            check(json!({"sub": "d1", "iat": 1000, "exp": 1450})),
            Ok(1450)
        );
        assert_eq!(
            check(json!({"sub": "d1", "iat": 1000, "exp": 1000 + 90_000})),
            Err(JwtError::TooLong)
        );
        assert!(matches!(
            check(json!({"sub": "d1", "iat": 1000, "exp": 2000, "aud": "elsewhere"})),
            Err(JwtError::Claims(_))
        ));
        assert!(matches!(
            check(json!({"sub": "d1", "iat": 9000, "exp": 9100})),
            Err(JwtError::Claims(_))
        ));
    }

    #[test]
    fn wrong_keys_and_algorithms_are_refused() {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "d1", "iat": 1000, "exp": 2000}),
            &EncodingKey::from_secret(b"another key entirely, 32 bytes!!"),
        )
        .unwrap();
        assert_eq!(
            verify(&token, "d1", "hub", &keys(), JwtPolicy::default(), 1500),
            Err(JwtError::BadSignature)
        );
        // alg none: header {"alg":"none"}.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkMSIsImlhdCI6MTAwMCwiZXhwIjoyMDAwfQ.";
        assert!(verify(none, "d1", "hub", &keys(), JwtPolicy::default(), 1500).is_err());
        // An ES256 token when the device has no public key.
        let es = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkMSJ9.c2ln";
        assert_eq!(
            verify(es, "d1", "hub", &keys(), JwtPolicy::default(), 1500),
            Err(JwtError::BadSignature)
        );
        assert_eq!(
            verify("garbage", "d1", "hub", &keys(), JwtPolicy::default(), 1500),
            Err(JwtError::Malformed)
        );
    }
}
