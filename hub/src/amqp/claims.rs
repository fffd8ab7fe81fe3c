//! What a connection may do: the claims its CBS put-tokens (or SASL PLAIN) granted,
//! each an audience (a `host/path` scope) valid until its token's expiry. A put-token
//! for the same audience renews it.

use std::sync::Mutex;

use super::address;
use crate::auth::service::Scope;

/// Most claims one connection holds (one per audience; Event Hubs clients put one
/// per partition link).
pub const MAX_CLAIMS: usize = 256;

/// One granted audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The scope, normalized (`host/path`).
    pub audience: String,
    /// The policy that signed it.
    pub policy: String,
    /// Its scopes.
    pub scopes: &'static [Scope],
    /// Unix seconds after which it no longer counts.
    pub expiry: u64,
}

/// Why an attach or message is not covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// No claim names the resource (no put-token yet, or for another audience).
    #[error("no CBS token covers this address; put a token on $cbs first")]
    Missing,
    /// The only covering claims have expired.
    #[error("the CBS token for this address has expired; put a new one")]
    Expired,
    /// The covering claim's policy lacks ServiceConnect.
    #[error("the shared access policy lacks ServiceConnect")]
    NotPermitted,
    /// Too many claims on this connection.
    #[error("too many CBS tokens on one connection (at most {MAX_CLAIMS})")]
    TooMany,
}

/// The claims of one connection.
#[derive(Debug, Default)]
pub struct Claims {
    inner: Mutex<Vec<Claim>>,
}

impl Claims {
    /// Adds `claim`, replacing one with the same audience (a renewal); expired claims
    /// are dropped on the way.
    pub fn add(&self, claim: Claim, now: u64) -> Result<(), ClaimError> {
        let mut claims = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        claims.retain(|c| c.expiry > now && c.audience != claim.audience);
        if claims.len() >= MAX_CLAIMS {
            return Err(ClaimError::TooMany);
        }
        claims.push(claim);
        Ok(())
    }

    /// Whether a live claim with ServiceConnect covers `resource` (normalized).
    pub fn check(&self, resource: &str, now: u64) -> Result<(), ClaimError> {
        let claims = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut result = Err(ClaimError::Missing);
        for claim in claims
            .iter()
            .filter(|c| address::covers(&c.audience, resource))
        {
            if claim.expiry <= now {
                result = result.or(Err(ClaimError::Expired));
                continue;
            }
            if !claim.scopes.contains(&Scope::ServiceConnect) {
                result = Err(ClaimError::NotPermitted);
                continue;
            }
            return Ok(());
        }
        result
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(audience: &str, expiry: u64) -> Claim {
        Claim {
            audience: audience.into(),
            policy: "service".into(),
            scopes: &[Scope::ServiceConnect],
            expiry,
        }
    }

    #[test]
    fn claims_cover_expire_and_renew() {
        let claims = Claims::default();
        assert_eq!(
            claims.check("h/messages/devicebound", 10),
            Err(ClaimError::Missing)
        );
        claims.add(claim("h", 20), 10).unwrap();
        assert_eq!(claims.check("h/messages/devicebound", 10), Ok(()));
        assert_eq!(
            claims.check("h/messages/devicebound", 20),
            Err(ClaimError::Expired)
        );
        claims.add(claim("h", 30), 10).unwrap();
        assert_eq!(claims.check("h/messages/devicebound", 20), Ok(()));
        assert_eq!(claims.check("other/x", 20), Err(ClaimError::Missing));
        let read_only = Claim {
            scopes: &[Scope::RegistryRead],
            ..claim("r", 100)
        };
        claims.add(read_only, 10).unwrap();
        assert_eq!(claims.check("r/hub", 20), Err(ClaimError::NotPermitted));
    }
}
