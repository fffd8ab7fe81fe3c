//! Device ids: up to 128 ASCII letters, digits and `- : . + % _ # * ? ! ( ) , = @ ; $ '`
//! (Azure IoT Hub's rule), validated once at the edge and carried as [`DeviceId`].

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest device id accepted.
pub const MAX_LEN: usize = 128;

/// The punctuation allowed in device ids besides ASCII letters and digits.
const ALLOWED_PUNCTUATION: &str = "-:.+%_#*?!(),=@;$'";

/// A validated device id. Cheap to clone: the copies in the registry, the twins, the
/// presence and connection tables and each connection share one allocation (issue
/// 28: bytes per device).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(Arc<str>);

/// Why a string is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    /// Empty string.
    #[error("device id must not be empty")]
    Empty,
    /// More than [`MAX_LEN`] characters.
    #[error("device id is {0} characters long; the limit is 128")]
    TooLong(usize),
    /// A character outside the allowed set.
    #[error(
        "device id contains {0:?}; allowed are ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '"
    )]
    BadChar(char),
}

impl DeviceId {
    /// Validates `id`.
    pub fn parse(id: &str) -> Result<Self, DeviceIdError> {
        if id.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        let len = id.chars().count();
        if len > MAX_LEN {
            return Err(DeviceIdError::TooLong(len));
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || ALLOWED_PUNCTUATION.contains(*c)))
        {
            return Err(DeviceIdError::BadChar(bad));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        DeviceId::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let id = "aZ09-:.+%_#*?!(),=@;$'";
        assert_eq!(DeviceId::parse(id).unwrap().as_str(), id);
        assert!(DeviceId::parse(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn refuses_paths_spaces_long_and_empty_ids() {
        assert_eq!(DeviceId::parse("../x"), Err(DeviceIdError::BadChar('/')));
        assert_eq!(DeviceId::parse("a b"), Err(DeviceIdError::BadChar(' ')));
        assert_eq!(
            DeviceId::parse(&"x".repeat(129)),
            Err(DeviceIdError::TooLong(129))
        );
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(DeviceId::parse("é"), Err(DeviceIdError::BadChar('é')));
        assert_eq!(
            DeviceId::parse("a\u{0}"),
            Err(DeviceIdError::BadChar('\u{0}'))
        );
    }
}
