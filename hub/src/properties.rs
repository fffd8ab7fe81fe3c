//! A message's properties as Azure's contract carries them between devices, the hub
//! and back ends: an ordered bag of (key, value) pairs, system properties (`$.mid`,
//! `$.cid`, …) beside application ones, URL-encoded where they travel in a topic.
//! Telemetry and cloud-to-device messages both carry one, and every edge reads and
//! writes the same type.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Characters escaped in property bag keys and values: everything but unreserved
/// URL characters, as Azure IoT Hub writes them. So `/` is always `%2F` and `$` is
/// always `%24`: system properties go out as `%24.mid`, `%24.to`, …, which is the
/// only form Azure's C and Embedded C SDKs recognise as system properties (they land
/// among the application properties otherwise); the SDKs that decode keys first
/// (Python, Node) read them as `$.mid` either way.
pub const BAG_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// An ordered list of (key, value) properties, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyBag(pub Vec<(String, String)>);

/// Why a property bag does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("property bag is not valid URL-encoded UTF-8")]
pub struct BagError;

impl PropertyBag {
    /// Parses `k=v&k2=v2` (a leading `?` tolerated; keys and values percent-decoded;
    /// a key without `=` has an empty value).
    pub fn parse(raw: &str) -> Result<Self, BagError> {
        let raw = raw.strip_prefix('?').unwrap_or(raw);
        let mut pairs = Vec::new();
        for field in raw.split('&').filter(|f| !f.is_empty()) {
            let (key, value) = field.split_once('=').unwrap_or((field, ""));
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| BagError)
            };
            pairs.push((decode(key)?, decode(value)?));
        }
        Ok(Self(pairs))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Encodes as `k=v&k2=v2` with every reserved character (including `/`) escaped.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.extend(utf8_percent_encode(key, BAG_ESCAPE));
            out.push('=');
            out.extend(utf8_percent_encode(value, BAG_ESCAPE));
        }
        out
    }

    /// Approximate size in bytes, for the telemetry size limit.
    pub fn byte_len(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}
