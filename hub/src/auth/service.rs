//! Service tokens: the owner key (Ed25519, `DIR/service.key`) that mints them, and
//! their verification (signature, `exp` with zero leeway, scope).
//!
//! A token is a JWT with `alg: EdDSA` and claims `{sub, iat, exp, scope}`, where
//! `scope` is a space-separated list of [`Scope`] names (OAuth style).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::unix_now;

/// A permission a service token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Read devices, twins and streams.
    RegistryRead,
    /// Create, update and delete devices and twins.
    RegistryWrite,
    /// Talk to devices: C2D messages, direct methods, telemetry reads.
    ServiceConnect,
    /// Read enrollments, enrollment groups and registrations (provisioning).
    ProvisioningRead,
    /// Create, update and delete enrollments, groups and registrations.
    ProvisioningWrite,
}

impl Scope {
    /// Every scope, e.g. for an owner token.
    pub const ALL: [Scope; 5] = [
        Scope::RegistryRead,
        Scope::RegistryWrite,
        Scope::ServiceConnect,
        Scope::ProvisioningRead,
        Scope::ProvisioningWrite,
    ];

    /// The name used in tokens and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::RegistryRead => "registry:read",
            Scope::RegistryWrite => "registry:write",
            Scope::ServiceConnect => "service:connect",
            Scope::ProvisioningRead => "provisioning:read",
            Scope::ProvisioningWrite => "provisioning:write",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scope {s:?} (expected registry:read, registry:write, \
                     service:connect, provisioning:read or provisioning:write)"
                )
            })
    }
}

/// Why the owner key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum ServiceKeyError {
    /// The key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The key file does not exist (only when loading without creating).
    #[error("no service key at {0} (start `hub serve` on this data dir once to create it)")]
    Missing(PathBuf),
    /// The key file does not hold an Ed25519 private key.
    #[error("{path}: not an Ed25519 private key in PKCS#8 PEM: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// Generating a new key failed.
    #[error("cannot generate a service key: {0}")]
    Generate(String),
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// Malformed, wrong algorithm, bad signature or missing claims.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign token: {0}")]
pub struct MintError(String);

/// The claims of a service token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceClaims {
    /// Who the token was minted for.
    pub sub: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Space-separated scope names.
    pub scope: String,
}

impl ServiceClaims {
    /// Whether the token grants `scope`. Unknown names in the claim are ignored.
    pub fn has(&self, scope: Scope) -> bool {
        self.scope.split_whitespace().any(|s| s == scope.as_str())
    }
}

/// The owner key: signs and verifies service tokens.
pub struct ServiceKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceKey(<redacted>)")
    }
}

impl ServiceKey {
    /// Loads the key at `path`, or generates one and writes it there (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, ServiceKeyError> {
        match Self::load(path) {
            Err(ServiceKeyError::Missing(_)) => {
                let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                    .map_err(|err| ServiceKeyError::Generate(err.to_string()))?
                    .serialize_pem();
                write_private(path, &pem)?;
                Self::from_pem(path, &pem)
            }
            other => other,
        }
    }

    /// Loads the key at `path`; [`ServiceKeyError::Missing`] if there is none.
    pub fn load(path: &Path) -> Result<Self, ServiceKeyError> {
        match std::fs::read_to_string(path) {
            Ok(pem) => Self::from_pem(path, &pem),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(ServiceKeyError::Missing(path.to_path_buf()))
            }
            Err(source) => Err(ServiceKeyError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn from_pem(path: &Path, pem: &str) -> Result<Self, ServiceKeyError> {
        let invalid = |reason: String| ServiceKeyError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let pair = rcgen::KeyPair::from_pem(pem).map_err(|err| invalid(err.to_string()))?;
        if !pair.is_compatible(&rcgen::PKCS_ED25519) {
            return Err(invalid("the key is not Ed25519".into()));
        }
        let encoding =
            EncodingKey::from_ed_pem(pem.as_bytes()).map_err(|err| invalid(err.to_string()))?;
        let decoding = DecodingKey::from_ed_pem(pair.public_key_pem().as_bytes())
            .map_err(|err| invalid(err.to_string()))?;
        Ok(Self { encoding, decoding })
    }

    /// Mints a token for `scopes`, valid for `ttl` from now.
    pub fn mint(
        &self,
        subject: &str,
        scopes: &[Scope],
        ttl: Duration,
    ) -> Result<String, MintError> {
        let iat = unix_now();
        let claims = ServiceClaims {
            sub: subject.to_string(),
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            scope: scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .map_err(|err| MintError(err.to_string()))
    }

    /// Verifies signature, algorithm and expiry (zero leeway) and returns the claims.
    pub fn verify(&self, token: &str) -> Result<ServiceClaims, TokenError> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        match jsonwebtoken::decode::<ServiceClaims>(token, &self.decoding, &validation) {
            Ok(data) => Ok(data.claims),
            Err(err) => match err.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Err(TokenError::Expired),
                _ => Err(TokenError::Invalid(err.to_string())),
            },
        }
    }
}

fn write_private(path: &Path, contents: &str) -> Result<(), ServiceKeyError> {
    certs::write_atomically(path, contents.as_bytes(), true).map_err(|source| ServiceKeyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (tempfile::TempDir, ServiceKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = ServiceKey::load_or_create(&dir.path().join("service.key")).unwrap();
        (dir, key)
    }

    #[test]
    fn minted_tokens_verify_and_carry_their_scopes() {
        let (_dir, key) = key();
        let token = key
            .mint(
                "owner",
                &[Scope::RegistryRead, Scope::ServiceConnect],
                Duration::from_secs(60),
            )
            .unwrap();
        let claims = key.verify(&token).unwrap();
        assert!(claims.has(Scope::RegistryRead));
        assert!(claims.has(Scope::ServiceConnect));
        assert!(!claims.has(Scope::RegistryWrite));
        assert_eq!(claims.scope, "registry:read service:connect");
    }

    #[test]
    fn the_key_survives_a_reload_and_another_key_is_refused() {
        let (dir, key) = key();
        let token = key
            .mint("owner", &Scope::ALL, Duration::from_secs(60))
            .unwrap();
        let reloaded = ServiceKey::load(&dir.path().join("service.key")).unwrap();
        reloaded.verify(&token).unwrap();

        let (_other_dir, other) = self::key();
        assert!(matches!(other.verify(&token), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn expired_tokens_are_refused_without_leeway() {
        let (_dir, key) = key();
        let now = unix_now();
        let claims = ServiceClaims {
            sub: "owner".into(),
            iat: now - 10,
            exp: now - 1,
            scope: "registry:read".into(),
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key.encoding).unwrap();
        assert_eq!(key.verify(&token), Err(TokenError::Expired));
    }

    #[test]
    fn garbage_and_unsigned_tokens_are_invalid() {
        let (_dir, key) = key();
        assert!(matches!(
            key.verify("not.a.jwt"),
            Err(TokenError::Invalid(_))
        ));
        // {"alg":"none"} with valid claims and no signature.
        let unsigned = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJvd25lciIsImlhdCI6MSwiZXhwIjo5OTk5OTk5OTk5LCJzY29wZSI6InJlZ2lzdHJ5OnJlYWQifQ.";
        assert!(matches!(key.verify(unsigned), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn a_corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.key");
        std::fs::write(&path, "garbage").unwrap();
        let err = ServiceKey::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("service.key"), "{err}");
        assert!(err.contains("Ed25519"), "{err}");
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>().unwrap(), scope);
        }
        assert!("registry:admin".parse::<Scope>().is_err());
    }
}
