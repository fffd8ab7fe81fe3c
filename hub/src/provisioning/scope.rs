//! The ID scope (`0ne` + 8 hex digits): generated on first start, kept in the data
//! dir (`DIR/dps-scope`, 0600), the same on every later start.

use std::io;
use std::path::{Path, PathBuf};

/// Why the scope file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file holds something else than a scope.
    #[error("{0}: not an ID scope (expected 0ne followed by 8 hex digits)")]
    Invalid(PathBuf),
}

/// A provisioning ID scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdScope(String);

impl IdScope {
    /// Parses `0ne` + 8 hex digits (case-insensitive; kept as written).
    pub fn parse(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        let digits = raw
            .get(..3)?
            .eq_ignore_ascii_case("0ne")
            .then(|| &raw[3..])?;
        (digits.len() == 8 && digits.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| Self(raw.to_string()))
    }

    /// A fresh random scope.
    pub fn generate() -> Self {
        let value: u32 = rand::random();
        Self(format!("0ne{value:08X}"))
    }

    /// The scope.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads the scope at `path`, or generates one and writes it there (0600).
    pub fn load_or_create(path: &Path) -> Result<Self, ScopeError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).ok_or_else(|| ScopeError::Invalid(path.to_path_buf())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let scope = Self::generate();
                certs::write_atomically(path, format!("{}\n", scope.0).as_bytes(), true).map_err(
                    |source| ScopeError::Io {
                        path: path.to_path_buf(),
                        source,
                    },
                )?;
                Ok(scope)
            }
            Err(source) => Err(ScopeError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

impl std::fmt::Display for IdScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a data dir keeps its scope.
pub fn scope_path(data_dir: &Path) -> PathBuf {
    data_dir.join("dps-scope")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_generate_in_azures_shape() {
        let scope = IdScope::generate();
        assert_eq!(scope.as_str().len(), 11);
        assert_eq!(IdScope::parse(scope.as_str()), Some(scope));
        assert!(IdScope::parse("0ne0012ABCD").is_some());
        assert!(IdScope::parse("0ne0012ABC").is_none());
        assert!(IdScope::parse("1ne0012ABCD").is_none());
        assert!(IdScope::parse("0ne0012ABCG").is_none());
    }

    #[test]
    fn the_scope_is_kept_across_starts_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = scope_path(dir.path());
        let first = IdScope::load_or_create(&path).unwrap();
        assert_eq!(IdScope::load_or_create(&path).unwrap(), first);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            IdScope::load_or_create(&path),
            Err(ScopeError::Invalid(_))
        ));
    }
}
