//! SAS tokens: `SharedAccessSignature sr=<url-encoded resource>&sig=<url-encoded
//! base64 HMAC-SHA256>&se=<unix expiry>` (fields in any order), signed with a device's
//! primary or secondary key over `sr` exactly as received, `"\n"`, and `se`.
//! Service tokens of shared access policies have the same form plus `skn=<policy>`;
//! [`crate::auth::policy`] checks them with the pieces exposed here.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;

/// Why a SAS token was refused. The variants are logged and counted; the token
/// itself never is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// Not of the form `SharedAccessSignature k=v&…` with `sr`, `sig` and `se`.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// Signed with a policy key (`skn`), which devices may not use.
    #[error("SAS tokens with a policy name (skn) are not accepted from devices")]
    PolicyKey,
    /// `se` has passed.
    #[error("SAS token expired")]
    Expired,
    /// `sr` names another hub or device.
    #[error("SAS token resource does not match this device")]
    WrongResource,
    /// The signature matches neither key.
    #[error("SAS signature does not match the device keys")]
    BadSignature,
    /// `se` is further in the future than the hub accepts (`mqtt.sas_max_lifetime_secs`).
    #[error("SAS token expiry is more than {0} s away, the hub's limit")]
    LifetimeTooLong(u64),
}

/// A parsed SAS token.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as received (still URL-encoded): the signed text.
    sr_raw: String,
    /// `se` exactly as received.
    se_raw: String,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: u64,
    signature: Vec<u8>,
    /// `skn`, the policy name, when present.
    policy: Option<String>,
}

impl std::fmt::Debug for SasToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasToken")
            .field("sr", &self.sr_raw)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

impl SasToken {
    /// Parses the password field of a CONNECT.
    pub fn parse(password: &str) -> Result<Self, SasError> {
        let fields = password
            .trim()
            .strip_prefix("SharedAccessSignature ")
            .ok_or(SasError::Malformed("missing SharedAccessSignature prefix"))?;
        let (mut sr, mut sig, mut se, mut policy) = (None, None, None, None);
        for field in fields.split('&') {
            let (key, value) = field
                .split_once('=')
                .ok_or(SasError::Malformed("field without ="))?;
            match key {
                "sr" => sr = Some(value),
                "sig" => sig = Some(value),
                "se" => se = Some(value),
                "skn" => policy = Some(value),
                _ => {}
            }
        }
        let sr_raw = sr.ok_or(SasError::Malformed("missing sr"))?.to_string();
        let se_raw = se.ok_or(SasError::Malformed("missing se"))?.to_string();
        let expiry = se_raw
            .parse::<u64>()
            .map_err(|_| SasError::Malformed("se is not a unix time"))?;
        let sig = percent_decode_str(sig.ok_or(SasError::Malformed("missing sig"))?)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sig is not UTF-8"))?;
        let signature = STANDARD
            .decode(sig.as_bytes())
            .map_err(|_| SasError::Malformed("sig is not base64"))?;
        let policy = policy
            .map(|raw| {
                percent_decode_str(raw)
                    .decode_utf8()
                    .map(|name| name.into_owned())
                    .map_err(|_| SasError::Malformed("skn is not UTF-8"))
            })
            .transpose()?;
        Ok(Self {
            sr_raw,
            se_raw,
            expiry,
            signature,
            policy,
        })
    }

    /// `skn`: the shared access policy that signed the token, if any.
    pub fn policy(&self) -> Option<&str> {
        self.policy.as_deref()
    }

    /// `sr`, URL-decoded: the resource the token grants.
    pub fn resource(&self) -> Result<String, SasError> {
        percent_decode_str(&self.sr_raw)
            .decode_utf8()
            .map(|resource| resource.into_owned())
            .map_err(|_| SasError::Malformed("sr is not UTF-8"))
    }

    /// Which of `keys` (raw, base64-decoded) signed `sr` as received, `"\n"` and
    /// `se`, if any. Each comparison is constant-time.
    pub fn signed_by(&self, keys: &[&[u8]]) -> Option<usize> {
        let message = format!("{}\n{}", self.sr_raw, self.se_raw);
        keys.iter().position(|key| {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                return false;
            };
            mac.update(message.as_bytes());
            // verify_slice compares in constant time.
            mac.verify_slice(&self.signature).is_ok()
        })
    }

    /// Verifies the token for `device_id` on `hostname` at `now` (Unix seconds)
    /// against the device's base64-decoded keys; returns the expiry.
    pub fn verify(
        &self,
        hostname: &str,
        device_id: &str,
        keys: &[&[u8]],
        now: u64,
    ) -> Result<u64, SasError> {
        self.verify_key(hostname, device_id, keys, now)
            .map(|(expiry, _)| expiry)
    }

    /// As [`SasToken::verify`], and also says which of `keys` signed the token (its
    /// index), so a connection can later tell whether that key was rotated away.
    pub fn verify_key(
        &self,
        hostname: &str,
        device_id: &str,
        keys: &[&[u8]],
        now: u64,
    ) -> Result<(u64, usize), SasError> {
        if self.policy.is_some() {
            return Err(SasError::PolicyKey);
        }
        if self.expiry <= now {
            return Err(SasError::Expired);
        }
        if !resource_matches(&self.resource()?, hostname, device_id) {
            return Err(SasError::WrongResource);
        }
        self.signed_by(keys)
            .map(|index| (self.expiry, index))
            .ok_or(SasError::BadSignature)
    }
}

/// `resource` must be `<host>/devices/<id>` or a path-segment prefix of it; host
/// compared case-insensitively, id exactly.
fn resource_matches(resource: &str, hostname: &str, device_id: &str) -> bool {
    let resource = resource.trim_end_matches('/');
    let mut parts = resource.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    if !host.eq_ignore_ascii_case(hostname) {
        return false;
    }
    match (parts.next(), parts.next()) {
        (None, _) => true,
        (Some("devices"), None) => true,
        (Some("devices"), Some(id)) => id == device_id,
        _ => false,
    }
}

/// Signs a SAS token (what a device or the device SDK does); used by tests and
/// tools. `sr` is URL-encoded here.
pub fn sign(hostname: &str, device_id: &str, key: &[u8], expiry: u64) -> String {
    sign_resource(&format!("{hostname}/devices/{device_id}"), key, expiry)
}

/// Signs a SAS token for any resource (`sr`, URL-encoded here), without `skn`.
pub fn sign_resource(resource: &str, key: &[u8], expiry: u64) -> String {
    let sr = percent_encoding::utf8_percent_encode(resource, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        // HMAC accepts keys of any length.
        Err(_) => return String::new(),
    };
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = STANDARD.encode(mac.finalize().into_bytes());
    let sig = percent_encoding::utf8_percent_encode(&sig, percent_encoding::NON_ALPHANUMERIC);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER: &[u8] = b"fedcba9876543210fedcba9876543210";

    #[test]
    fn a_signed_token_verifies_with_either_key() {
        let token = SasToken::parse(&sign("Hub.Local", "dev-1", KEY, 2000)).unwrap();
        assert_eq!(token.verify("hub.local", "dev-1", &[KEY], 1000), Ok(2000));
        assert_eq!(
            token.verify("hub.local", "dev-1", &[OTHER, KEY], 1000),
            Ok(2000)
        );
        assert_eq!(
            token.verify("hub.local", "dev-1", &[OTHER], 1000),
            Err(SasError::BadSignature)
        );
        assert_eq!(
            token.verify_key("hub.local", "dev-1", &[OTHER, KEY], 1000),
            Ok((2000, 1))
        );
    }

    #[test]
    fn expiry_resource_and_policy_are_checked() {
        let token = SasToken::parse(&sign("hub", "dev-1", KEY, 2000)).unwrap();
        assert_eq!(
            token.verify("hub", "dev-1", &[KEY], 2000),
            Err(SasError::Expired)
        );
        assert_eq!(
            token.verify("hub", "dev-2", &[KEY], 1000),
            Err(SasError::WrongResource)
        );
        assert_eq!(
            token.verify("other", "dev-1", &[KEY], 1000),
            Err(SasError::WrongResource)
        );
        let with_policy = sign("hub", "dev-1", KEY, 2000) + "&skn=iothubowner";
        let token = SasToken::parse(&with_policy).unwrap();
        assert_eq!(
            token.verify("hub", "dev-1", &[KEY], 1000),
            Err(SasError::PolicyKey)
        );
    }

    #[test]
    fn resource_prefixes_follow_path_segments() {
        assert!(resource_matches("hub", "hub", "d"));
        assert!(resource_matches("HUB/devices", "hub", "d"));
        assert!(resource_matches("hub/devices/d", "hub", "d"));
        assert!(resource_matches("hub/devices/d/", "hub", "d"));
        assert!(!resource_matches("hub/devices/D", "hub", "d"));
        assert!(!resource_matches("hub/devices/d2", "hub", "d"));
        assert!(!resource_matches("hub/dev", "hub", "d"));
        assert!(!resource_matches("hubx/devices/d", "hub", "d"));
    }

    #[test]
    fn fields_may_come_in_any_order_and_the_signed_text_is_sr_as_received() {
        let signed = sign("hub", "dev-1", KEY, 2000);
        let fields = signed.strip_prefix("SharedAccessSignature ").unwrap();
        let mut parts: Vec<&str> = fields.split('&').collect();
        parts.reverse();
        let reordered = format!("SharedAccessSignature {}", parts.join("&"));
        let token = SasToken::parse(&reordered).unwrap();
        assert_eq!(token.verify("hub", "dev-1", &[KEY], 1000), Ok(2000));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "sr=a&sig=b&se=1",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sr=a&sig=%%%&se=1",
            "SharedAccessSignature sr=a&sig=YQ==&se=soon",
            "SharedAccessSignature garbage",
        ] {
            assert!(
                matches!(SasToken::parse(bad), Err(SasError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
