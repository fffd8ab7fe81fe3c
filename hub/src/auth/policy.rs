//! Shared access policies, as Azure IoT Hub has them: `iothubowner`, `service`,
//! `registryRead` and `registryReadWrite` (and Azure's provisioning service's
//! `provisioningserviceowner`), each with a primary and a secondary key
//! (32 random bytes, base64), kept in `DIR/policies.json` (0600); their mapping onto
//! the service [`Scope`]s; and the check of a service SAS token
//! `SharedAccessSignature sr=<host>&sig=<sig>&se=<expiry>&skn=<policy>`.
//!
//! [`PolicySet`] is the data (file format, generation, rotation), [`Policies`] the
//! live copy the REST API checks against: swapped whole when the file changes (a
//! rotation by `hub policy rotate`) or, in cluster mode, when another node rotates
//! (`store::nats::secrets`).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::sas::{SasError, SasToken};
use super::service::Scope;

/// The policies a hub has, Azure's built-in ones, with the scopes each grants.
/// Azure's `iothubowner` also has "device connect", which is no service scope here
/// (devices authenticate with their own keys).
pub const POLICIES: [(&str, &[Scope]); 5] = [
    (
        "iothubowner",
        &[
            Scope::RegistryRead,
            Scope::RegistryWrite,
            Scope::ServiceConnect,
        ],
    ),
    ("service", &[Scope::ServiceConnect]),
    ("registryRead", &[Scope::RegistryRead]),
    (
        "registryReadWrite",
        &[Scope::RegistryRead, Scope::RegistryWrite],
    ),
    // Azure's provisioning service has this policy of its own; here it signs for the
    // provisioning routes of the same REST API.
    (
        "provisioningserviceowner",
        &[Scope::ProvisioningRead, Scope::ProvisioningWrite],
    ),
];

/// Policies added after policy files were first written (issue 25). A set without
/// one gets it, with keys derived from the set's `iothubowner` keys, so that every
/// reader of the same old set (each node of a cluster, the CLI, the hub) completes it
/// identically without writing anything; a rotation later gives it random keys.
const ADDED_LATER: [&str; 1] = ["provisioningserviceowner"];

/// The key a policy added later gets in an older set: base64 of HMAC-SHA256 over
/// `"{policy}/{slot}"` under the decoded `iothubowner` key of that slot.
fn derived_key(owner_key: &str, policy: &str, slot: &str) -> Option<String> {
    use hmac::{Hmac, Mac};
    let key = STANDARD.decode(owner_key).ok()?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{policy}/{slot}").as_bytes());
    Some(STANDARD.encode(mac.finalize().into_bytes()))
}

/// The scopes of policy `name`, if it is one of [`POLICIES`].
pub fn scopes_of(name: &str) -> Option<&'static [Scope]> {
    POLICIES
        .iter()
        .find(|(policy, _)| *policy == name)
        .map(|(_, scopes)| *scopes)
}

/// Which key of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    /// `primaryKey`.
    Primary,
    /// `secondaryKey`.
    Secondary,
}

/// Why the policies file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file does not exist (only when loading without creating).
    #[error(
        "no shared access policies at {0} (start `hub serve` on this data dir once to create them)"
    )]
    Missing(PathBuf),
    /// The file is not a valid policy set.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No such policy.
    #[error(
        "unknown policy {0:?} (expected iothubowner, service, registryRead, registryReadWrite \
         or provisioningserviceowner)"
    )]
    UnknownPolicy(String),
}

/// One policy's keys, base64 as in Azure's portal and connection strings.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyKeys {
    /// The primary key.
    pub primary_key: String,
    /// The secondary key.
    pub secondary_key: String,
}

impl std::fmt::Debug for PolicyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyKeys(<redacted>)")
    }
}

impl PolicyKeys {
    fn generate() -> Self {
        Self {
            primary_key: generate_key(),
            secondary_key: generate_key(),
        }
    }

    /// The key in `slot`.
    pub fn key(&self, slot: KeySlot) -> &str {
        match slot {
            KeySlot::Primary => &self.primary_key,
            KeySlot::Secondary => &self.secondary_key,
        }
    }
}

/// 32 bytes from the OS-seeded CSPRNG, base64.
fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    STANDARD.encode(bytes)
}

/// Every policy's keys: the contents of `DIR/policies.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PolicySet {
    policies: BTreeMap<String, PolicyKeys>,
}

impl PolicySet {
    /// Fresh keys for every policy.
    pub fn generate() -> Self {
        Self {
            policies: POLICIES
                .iter()
                .map(|(name, _)| (name.to_string(), PolicyKeys::generate()))
                .collect(),
        }
    }

    /// Policy `name`'s keys.
    pub fn get(&self, name: &str) -> Option<&PolicyKeys> {
        self.policies.get(name)
    }

    /// The policies, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PolicyKeys)> {
        self.policies
            .iter()
            .map(|(name, keys)| (name.as_str(), keys))
    }

    /// Replaces the key in `slot` of policy `name` with a new random one.
    pub fn rotate(&mut self, name: &str, slot: KeySlot) -> Result<(), PolicyFileError> {
        let keys = self
            .policies
            .get_mut(name)
            .ok_or_else(|| PolicyFileError::UnknownPolicy(name.to_string()))?;
        match slot {
            KeySlot::Primary => keys.primary_key = generate_key(),
            KeySlot::Secondary => keys.secondary_key = generate_key(),
        }
        Ok(())
    }

    /// Parses and checks a policy set: every built-in policy present (those added
    /// later are completed, see [`ADDED_LATER`]), no other, and every key base64 of
    /// at least 16 bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let mut set: Self = serde_json::from_slice(bytes).map_err(|err| err.to_string())?;
        if let Some(owner) = set.policies.get("iothubowner").cloned() {
            for name in ADDED_LATER {
                if set.policies.contains_key(name) {
                    continue;
                }
                if let (Some(primary_key), Some(secondary_key)) = (
                    derived_key(&owner.primary_key, name, "primary"),
                    derived_key(&owner.secondary_key, name, "secondary"),
                ) {
                    set.policies.insert(
                        name.to_string(),
                        PolicyKeys {
                            primary_key,
                            secondary_key,
                        },
                    );
                }
            }
        }
        for (name, _) in POLICIES {
            if !set.policies.contains_key(name) {
                return Err(format!("policy {name} is missing"));
            }
        }
        for (name, keys) in &set.policies {
            if scopes_of(name).is_none() {
                return Err(format!("unknown policy {name:?}"));
            }
            for key in [&keys.primary_key, &keys.secondary_key] {
                match STANDARD.decode(key) {
                    Ok(raw) if raw.len() >= 16 => {}
                    _ => return Err(format!("policy {name}: a key is not base64 of 16+ bytes")),
                }
            }
        }
        Ok(set)
    }

    /// The JSON written to the file.
    pub fn to_json(&self) -> Vec<u8> {
        // A map of strings always serializes.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Loads `path`; [`PolicyFileError::Missing`] if there is none.
    pub fn load(path: &Path) -> Result<Self, PolicyFileError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::from_json(&bytes).map_err(|reason| PolicyFileError::Invalid {
                path: path.to_path_buf(),
                reason,
            }),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(PolicyFileError::Missing(path.to_path_buf()))
            }
            Err(source) => Err(PolicyFileError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Loads `path`, or generates a set and writes it there.
    pub fn load_or_create(path: &Path) -> Result<Self, PolicyFileError> {
        match Self::load(path) {
            Err(PolicyFileError::Missing(_)) => {
                let set = Self::generate();
                set.write(path)?;
                Ok(set)
            }
            other => other,
        }
    }

    /// Writes the set to `path` atomically, mode 0600.
    pub fn write(&self, path: &Path) -> Result<(), PolicyFileError> {
        certs::write_atomically(path, &self.to_json(), true).map_err(|source| PolicyFileError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// `HostName=<hostname>;SharedAccessKeyName=<policy>;SharedAccessKey=<key>`.
pub fn connection_string(hostname: &str, policy: &str, key: &str) -> String {
    format!("HostName={hostname};SharedAccessKeyName={policy};SharedAccessKey={key}")
}

/// `Endpoint=sb://<hostname>/;SharedAccessKeyName=<policy>;SharedAccessKey=<key>;EntityPath=<entity>`:
/// the Event Hub-compatible endpoint's connection string.
pub fn event_hub_connection_string(
    hostname: &str,
    policy: &str,
    key: &str,
    entity: &str,
) -> String {
    format!(
        "Endpoint=sb://{hostname}/;SharedAccessKeyName={policy};SharedAccessKey={key};EntityPath={entity}"
    )
}

/// Why a service SAS token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not a SAS token, or one without `skn`.
    #[error("malformed shared access signature: {0}")]
    Malformed(String),
    /// `skn` names no policy of this hub.
    #[error("unknown shared access policy {0:?}")]
    UnknownPolicy(String),
    /// `se` has passed.
    #[error("the shared access signature has expired")]
    Expired,
    /// `sr` names another hub, or a path the request is not under.
    #[error("the shared access signature's resource (sr) is not this hub")]
    WrongResource,
    /// Neither of the policy's keys made the signature.
    #[error("the shared access signature does not match the policy's keys")]
    BadSignature,
}

/// `resource` (decoded `sr`) must be the hub's hostname (case-insensitive), or the
/// hostname and a path the request's path lies under, segment by segment (Azure lets
/// a token be narrowed to e.g. `<host>/devices`).
fn resource_matches(resource: &str, hostname: &str, request_path: &str) -> bool {
    let resource = resource.trim_end_matches('/');
    let (host, prefix) = resource.split_once('/').unwrap_or((resource, ""));
    if !host.eq_ignore_ascii_case(hostname) {
        return false;
    }
    let path = request_path.trim_start_matches('/');
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// What a verified policy token grants (see [`Policies::verify_any_resource`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyGrant {
    /// The policy (`skn`).
    pub policy: String,
    /// Its scopes.
    pub scopes: &'static [Scope],
    /// `sr`, URL-decoded.
    pub resource: String,
    /// `se`, Unix seconds.
    pub expiry: u64,
}

/// The live policies a hub checks service SAS tokens against.
#[derive(Debug)]
pub struct Policies {
    hostname: String,
    current: RwLock<Arc<PolicySet>>,
}

/// A token whose policy is known and which has not expired (see `Policies::check`).
struct Checked {
    token: SasToken,
    name: String,
    keys: PolicyKeys,
    scopes: &'static [Scope],
    resource: String,
}

impl Policies {
    /// Policies for a hub named `hostname`.
    pub fn new(hostname: &str, set: PolicySet) -> Self {
        Self {
            hostname: hostname.to_string(),
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// The current set.
    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Swaps in `set` (after a rotation); tokens signed with keys no longer in it are
    /// refused from now on. Returns whether anything changed.
    pub fn replace(&self, set: PolicySet) -> bool {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if **guard == set {
            return false;
        }
        *guard = Arc::new(set);
        true
    }

    /// What every verification starts with: the token parsed, its policy known, not
    /// expired, and its resource decoded; the signature is the caller's to check.
    fn check(&self, token: &str, now: u64) -> Result<Checked, PolicyError> {
        let token = SasToken::parse(token).map_err(|err| match err {
            SasError::Malformed(reason) => PolicyError::Malformed(reason.to_string()),
            other => PolicyError::Malformed(other.to_string()),
        })?;
        let name = token
            .policy()
            .ok_or_else(|| PolicyError::Malformed("missing skn".into()))?
            .to_string();
        let set = self.current();
        let (Some(keys), Some(scopes)) = (set.get(&name), scopes_of(&name)) else {
            return Err(PolicyError::UnknownPolicy(name));
        };
        if token.expiry <= now {
            return Err(PolicyError::Expired);
        }
        let resource = token
            .resource()
            .map_err(|err| PolicyError::Malformed(err.to_string()))?;
        Ok(Checked {
            keys: keys.clone(),
            token,
            name,
            scopes,
            resource,
        })
    }

    /// Checks `token` (the Authorization header's value) for a request to
    /// `request_path` at `now` (Unix seconds); returns the policy's name and scopes.
    pub fn verify(
        &self,
        token: &str,
        request_path: &str,
        now: u64,
    ) -> Result<(String, &'static [Scope]), PolicyError> {
        let Checked {
            token,
            name,
            keys,
            scopes,
            resource,
        } = self.check(token, now)?;
        if !resource_matches(&resource, &self.hostname, request_path) {
            return Err(PolicyError::WrongResource);
        }
        // Keys were checked to be base64 when the set was loaded; one that is not
        // (impossible) simply matches nothing.
        let decoded: Vec<Vec<u8>> = [&keys.primary_key, &keys.secondary_key]
            .into_iter()
            .filter_map(|key| STANDARD.decode(key).ok())
            .collect();
        let raw: Vec<&[u8]> = decoded.iter().map(Vec::as_slice).collect();
        match token.signed_by(&raw) {
            Some(_) => Ok((name, scopes)),
            None => Err(PolicyError::BadSignature),
        }
    }

    /// Checks a shared access policy's SAS token as AMQP clients send it (CBS
    /// put-token, SASL PLAIN, a `$management` `security_token`) at `now` (Unix
    /// seconds): the signature may be made with the policy key base64-decoded (Azure's
    /// IoT SDKs) or with the key string's UTF-8 bytes (the Event Hubs SDKs), and `sr`
    /// may be any resource, checked by the caller against what is asked (an
    /// `sb://HOST/…` or `HOST/…` path). Returns the policy's grant.
    pub fn verify_any_resource(&self, token: &str, now: u64) -> Result<PolicyGrant, PolicyError> {
        let Checked {
            token,
            name,
            keys,
            scopes,
            resource,
        } = self.check(token, now)?;
        let mut candidates: Vec<Vec<u8>> = Vec::with_capacity(4);
        for key in [&keys.primary_key, &keys.secondary_key] {
            if let Ok(decoded) = STANDARD.decode(key) {
                candidates.push(decoded);
            }
            candidates.push(key.as_bytes().to_vec());
        }
        let raw: Vec<&[u8]> = candidates.iter().map(Vec::as_slice).collect();
        match token.signed_by(&raw) {
            Some(_) => Ok(PolicyGrant {
                policy: name,
                scopes,
                resource,
                expiry: token.expiry,
            }),
            None => Err(PolicyError::BadSignature),
        }
    }

    /// The hub's hostname, as tokens' `sr` must name it.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Polls `path` every `interval` and swaps in its contents when its modification
    /// time or size changes (`hub policy rotate` rewrites it while the hub runs). A
    /// bad file is logged and the current keys stay. `on_change` sees every set
    /// taken from the file (cluster mode publishes it to the other nodes).
    pub fn spawn_file_watch(
        self: &Arc<Self>,
        path: PathBuf,
        interval: Duration,
        on_change: impl Fn(PolicySet) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let policies = Arc::clone(self);
        tokio::spawn(async move {
            // The first look always reads the file: it may have changed between the
            // load at start-up and this task's first run.
            let mut seen = None;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let now = stamp(&path);
                if seen == Some(now) {
                    continue;
                }
                seen = Some(now);
                match PolicySet::load(&path) {
                    Ok(set) => {
                        if policies.replace(set.clone()) {
                            tracing::info!(path = %path.display(), "shared access policies reloaded");
                        }
                        on_change(set);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "shared access policies not reloaded; keeping the current keys")
                    }
                }
            }
        })
    }
}

/// What tells a rewritten file apart: modification time and size (an atomic
/// rename gives a new mtime).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Signs a service SAS token for `resource` with a policy's base64 `key` (what
/// Azure's service SDKs do); for tests and tools. `None` if the key is not base64.
pub fn sign(resource: &str, policy: &str, key: &str, expiry: u64) -> Option<String> {
    let raw = STANDARD.decode(key).ok()?;
    let policy = percent_encoding::utf8_percent_encode(policy, percent_encoding::NON_ALPHANUMERIC);
    Some(format!(
        "{}&skn={policy}",
        super::sas::sign_resource(resource, &raw, expiry)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "hub.example";
    const NOW: u64 = 1_000_000;

    fn policies() -> (Policies, PolicySet) {
        let set = PolicySet::generate();
        (Policies::new(HOST, set.clone()), set)
    }

    fn token(set: &PolicySet, policy: &str, slot: KeySlot, resource: &str, se: u64) -> String {
        sign(resource, policy, set.get(policy).unwrap().key(slot), se).unwrap()
    }

    #[test]
    fn a_set_from_before_the_provisioning_policy_is_completed_the_same_way_everywhere() {
        let set = PolicySet::generate();
        let mut old: serde_json::Value = serde_json::from_slice(&set.to_json()).unwrap();
        old.as_object_mut()
            .unwrap()
            .remove("provisioningserviceowner");
        let old = serde_json::to_vec(&old).unwrap();
        let first = PolicySet::from_json(&old).unwrap();
        let again = PolicySet::from_json(&old).unwrap();
        assert_eq!(first, again, "every reader completes it identically");
        let added = first.get("provisioningserviceowner").unwrap();
        let owner = first.get("iothubowner").unwrap();
        assert_ne!(added.primary_key, owner.primary_key);
        assert_ne!(added.primary_key, added.secondary_key);
        assert_eq!(
            scopes_of("provisioningserviceowner"),
            Some(&[Scope::ProvisioningRead, Scope::ProvisioningWrite][..])
        );
        // A fresh set has random keys of its own for it.
        assert_ne!(
            set.get("provisioningserviceowner").unwrap().primary_key,
            added.primary_key
        );
    }

    #[test]
    fn either_key_of_a_policy_signs_and_its_scopes_come_back() {
        let (policies, set) = policies();
        for slot in [KeySlot::Primary, KeySlot::Secondary] {
            let t = token(&set, "registryRead", slot, HOST, NOW + 60);
            assert_eq!(
                policies.verify(&t, "/devices", NOW),
                Ok(("registryRead".to_string(), &[Scope::RegistryRead][..]))
            );
        }
        let t = token(
            &set,
            "iothubowner",
            KeySlot::Primary,
            "HUB.Example",
            NOW + 60,
        );
        let (_, scopes) = policies.verify(&t, "/twins/d", NOW).unwrap();
        assert_eq!(
            scopes,
            &[
                Scope::RegistryRead,
                Scope::RegistryWrite,
                Scope::ServiceConnect
            ][..]
        );
    }

    #[test]
    fn a_wrong_key_is_refused() {
        let (policies, set) = policies();
        // Another policy's key under this policy's name.
        let t = sign(
            HOST,
            "service",
            set.get("registryRead").unwrap().key(KeySlot::Primary),
            NOW + 60,
        )
        .unwrap();
        assert_eq!(
            policies.verify(&t, "/devices", NOW),
            Err(PolicyError::BadSignature)
        );
        // The same key from another hub's set.
        let other = PolicySet::generate();
        let t = token(&other, "service", KeySlot::Primary, HOST, NOW + 60);
        assert_eq!(
            policies.verify(&t, "/devices", NOW),
            Err(PolicyError::BadSignature)
        );
    }

    #[test]
    fn an_expired_token_is_refused() {
        let (policies, set) = policies();
        let t = token(&set, "iothubowner", KeySlot::Primary, HOST, NOW);
        assert_eq!(
            policies.verify(&t, "/devices", NOW),
            Err(PolicyError::Expired)
        );
        assert!(policies.verify(&t, "/devices", NOW - 1).is_ok());
    }

    #[test]
    fn a_wrong_resource_is_refused() {
        let (policies, set) = policies();
        for resource in ["other.example", "hub.example.evil", "hub.exampl"] {
            let t = token(&set, "iothubowner", KeySlot::Primary, resource, NOW + 60);
            assert_eq!(
                policies.verify(&t, "/devices", NOW),
                Err(PolicyError::WrongResource),
                "{resource}"
            );
        }
        // A path prefix narrows the token to the requests under it.
        let t = token(
            &set,
            "iothubowner",
            KeySlot::Primary,
            "hub.example/devices",
            NOW + 60,
        );
        assert!(policies.verify(&t, "/devices", NOW).is_ok());
        assert!(policies.verify(&t, "/devices/d1", NOW).is_ok());
        assert_eq!(
            policies.verify(&t, "/twins/d1", NOW),
            Err(PolicyError::WrongResource)
        );
        assert_eq!(
            policies.verify(&t, "/devicesX", NOW),
            Err(PolicyError::WrongResource)
        );
    }

    #[test]
    fn an_unknown_policy_is_refused() {
        let (policies, set) = policies();
        let key = set.get("iothubowner").unwrap().key(KeySlot::Primary);
        let t = sign(HOST, "admin", key, NOW + 60).unwrap();
        assert_eq!(
            policies.verify(&t, "/devices", NOW),
            Err(PolicyError::UnknownPolicy("admin".into()))
        );
        // A device-style token without skn is not a policy token.
        let t = crate::auth::sas::sign_resource(HOST, b"0123456789abcdef", NOW + 60);
        assert!(matches!(
            policies.verify(&t, "/devices", NOW),
            Err(PolicyError::Malformed(_))
        ));
    }

    #[test]
    fn a_rotated_key_is_refused_and_the_other_key_still_signs() {
        let (policies, mut set) = policies();
        let old = token(&set, "service", KeySlot::Primary, HOST, NOW + 60);
        let secondary = token(&set, "service", KeySlot::Secondary, HOST, NOW + 60);
        set.rotate("service", KeySlot::Primary).unwrap();
        assert!(policies.replace(set.clone()));
        assert_eq!(
            policies.verify(&old, "/devices", NOW),
            Err(PolicyError::BadSignature)
        );
        assert!(policies.verify(&secondary, "/devices", NOW).is_ok());
        let new = token(&set, "service", KeySlot::Primary, HOST, NOW + 60);
        assert!(policies.verify(&new, "/devices", NOW).is_ok());
        assert!(matches!(
            set.rotate("admin", KeySlot::Primary),
            Err(PolicyFileError::UnknownPolicy(_))
        ));
    }

    #[test]
    fn the_file_round_trips_with_mode_0600_and_bad_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.json");
        let created = PolicySet::load_or_create(&path).unwrap();
        assert_eq!(PolicySet::load_or_create(&path).unwrap(), created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for key in created
            .iter()
            .flat_map(|(_, k)| [&k.primary_key, &k.secondary_key])
        {
            assert_eq!(STANDARD.decode(key).unwrap().len(), 32);
        }
        std::fs::write(
            &path,
            br#"{"iothubowner": {"primaryKey": "x", "secondaryKey": "y"}}"#,
        )
        .unwrap();
        assert!(matches!(
            PolicySet::load(&path),
            Err(PolicyFileError::Invalid { .. })
        ));
    }

    #[tokio::test]
    async fn a_rewritten_file_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policies.json");
        let mut set = PolicySet::load_or_create(&path).unwrap();
        let policies = Arc::new(Policies::new(HOST, set.clone()));
        let old = token(&set, "iothubowner", KeySlot::Primary, HOST, u64::MAX);
        let watch = policies.spawn_file_watch(path.clone(), Duration::from_millis(10), |_| {});
        set.rotate("iothubowner", KeySlot::Primary).unwrap();
        set.write(&path).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while policies.verify(&old, "/devices", NOW).is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "rotation not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*policies.current(), set);
        watch.abort();
    }
}
