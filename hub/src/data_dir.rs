//! The data directory: its layout, the lock that keeps a second hub out, first-start
//! creation of the development CA and server certificate, and `endpoints.json`.
//!
//! ```text
//! DIR/hub.lock         held (flock) while a hub runs on DIR
//! DIR/hub.redb         the embedded store
//! DIR/service.key      owner key for service tokens (Ed25519, PKCS#8 PEM, 0600)
//! DIR/policies.json    shared access policies and their keys (0600)
//! DIR/certs/ca.pem     development CA (+ ca.key)
//! DIR/certs/server.pem server certificate (+ server.key, + server.sans: its names)
//! DIR/endpoints.json   bound addresses, written atomically once ready
//! ```
//!
//! Modes: the directory and every directory in it are 0700, every file 0600, except
//! the public ones (certificates `*.pem`, `server.sans`, `endpoints.json`), which keep
//! the umask's mode behind the 0700 directory. Looser modes found at start-up (a data
//! dir from an older hub, or one an operator created) are tightened and logged.

use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use certs::{Ca, CertError, CertifiedKey, SubjectAltNames};
use serde::Serialize;

/// Why the data directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The path exists and is not a directory.
    #[error("data dir {0} exists and is not a directory")]
    NotADirectory(PathBuf),
    /// Creating, reading or writing a file failed.
    #[error("data dir {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error("data dir {0} is in use by another hub (hub.lock is held)")]
    Locked(PathBuf),
    /// A certificate or key file is corrupt, or generation failed.
    #[error("data dir certificates: {0}")]
    Certs(#[from] CertError),
}

/// An open, locked data directory.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    // Held for the hub's lifetime; the OS releases the lock when the process ends.
    _lock: File,
}

impl DataDir {
    /// Creates `root` if needed and takes its lock.
    pub fn open(root: &Path) -> Result<Self, DataDirError> {
        if root.exists() && !root.is_dir() {
            return Err(DataDirError::NotADirectory(root.to_path_buf()));
        }
        create_private_dir_all(root).map_err(|source| DataDirError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let lock_path = root.join("hub.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&lock_path)
            .map_err(|source| DataDirError::Io {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Locked(root.to_path_buf()));
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(DataDirError::Io {
                    path: lock_path,
                    source,
                });
            }
        }
        tighten_modes(root)?;
        // Created here, before the PKI and the store create them with the umask's mode.
        let certs = root.join("certs");
        create_private_dir_all(&certs).map_err(|source| DataDirError::Io {
            path: certs,
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// Creates the store's file empty with mode 0600 when it does not exist yet, so the
    /// store (which holds every device key) is never readable by others, not even for
    /// the moment between its creation and a chmod. redb initialises an empty file.
    pub fn prepare_store_file(&self) -> Result<PathBuf, DataDirError> {
        let path = self.store_path();
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(|source| DataDirError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The embedded store's file.
    pub fn store_path(&self) -> PathBuf {
        self.root.join("hub.redb")
    }

    /// The owner key's file.
    pub fn service_key_path(&self) -> PathBuf {
        service_key_path(&self.root)
    }

    /// The shared access policies' file.
    pub fn policies_path(&self) -> PathBuf {
        policies_path(&self.root)
    }

    /// The certificates directory.
    pub fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }

    /// Loads the development CA, creating it on first start.
    pub fn ensure_ca(&self) -> Result<Ca, DataDirError> {
        let dir = self.certs_dir();
        if let Some(ca) = Ca::read(&dir, "ca")? {
            return Ok(ca);
        }
        let ca = Ca::generate("hub development CA")?;
        ca.write(&dir, "ca")?;
        tracing::info!(path = %dir.join("ca.pem").display(), "created development CA");
        Ok(ca)
    }

    /// Loads the server certificate, issuing a new one when there is none or when
    /// `names` differ from the names it was issued for.
    pub fn ensure_server_cert(
        &self,
        ca: &Ca,
        names: &SubjectAltNames,
    ) -> Result<CertifiedKey, DataDirError> {
        let dir = self.certs_dir();
        let sans_path = dir.join("server.sans");
        let wanted = names.to_lines();
        let recorded = match fs::read_to_string(&sans_path) {
            Ok(text) => Some(text),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(DataDirError::Io {
                    path: sans_path,
                    source,
                });
            }
        };
        if recorded.as_deref() == Some(wanted.as_str())
            && let Some(existing) = CertifiedKey::read(&dir, "server")?
        {
            return Ok(existing);
        }
        let issued = ca.issue_server(names)?;
        issued.write(&dir, "server")?;
        write_atomically(&sans_path, wanted.as_bytes())?;
        tracing::info!(path = %dir.join("server.pem").display(), "issued server certificate");
        Ok(issued)
    }

    /// Writes `endpoints.json` atomically (temporary file, then rename).
    pub fn write_endpoints(&self, endpoints: &Endpoints) -> Result<(), DataDirError> {
        let json = serde_json::to_vec_pretty(endpoints).unwrap_or_default();
        write_atomically(&endpoints_path(&self.root), &json)
    }
}

/// `DIR/service.key` for a data dir that need not be open (the CLI reads it).
pub fn service_key_path(root: &Path) -> PathBuf {
    root.join("service.key")
}

/// `DIR/policies.json` for a data dir that need not be open (the CLI reads it).
pub fn policies_path(root: &Path) -> PathBuf {
    root.join("policies.json")
}

/// `DIR/endpoints.json` for a data dir that need not be open (the CLI reads it).
pub fn endpoints_path(root: &Path) -> PathBuf {
    root.join("endpoints.json")
}

/// The addresses the hub actually bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Endpoints {
    /// MQTT over TCP, when bound.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mqtt: Option<SocketAddr>,
    /// MQTT over TLS, when bound.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mqtts: Option<SocketAddr>,
    /// The service REST API.
    pub http: SocketAddr,
    /// The service REST API over TLS and MQTT over WebSocket, when bound.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub https: Option<SocketAddr>,
    /// AMQP over TLS, when bound.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub amqps: Option<SocketAddr>,
    /// Plain AMQP, when bound.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub amqp: Option<SocketAddr>,
}

impl Endpoints {
    /// The line printed on stdout once the hub is ready.
    pub fn ready_line(&self) -> String {
        let mut line = String::from("hub ready");
        if let Some(addr) = self.mqtt {
            line.push_str(&format!(" mqtt={addr}"));
        }
        if let Some(addr) = self.mqtts {
            line.push_str(&format!(" mqtts={addr}"));
        }
        line.push_str(&format!(" http={}", self.http));
        if let Some(addr) = self.amqps {
            line.push_str(&format!(" amqps={addr}"));
        }
        if let Some(addr) = self.https {
            line.push_str(&format!(" https={addr}"));
        }
        if let Some(addr) = self.amqp {
            line.push_str(&format!(" amqp={addr}"));
        }
        line
    }

    /// Reads `endpoints.json` of a data dir.
    pub fn read(root: &Path) -> Result<Self, DataDirError> {
        let path = endpoints_path(root);
        let bytes = fs::read(&path).map_err(|source| DataDirError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|err| DataDirError::Io {
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, err),
        })
    }
}

/// The IPs of the listeners, for the server certificate's names.
pub fn listener_ips(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<IpAddr> {
    addrs.into_iter().map(|addr| addr.ip()).collect()
}

/// Mode of every directory in the data dir.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every non-public file in the data dir.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// `mkdir -p` with mode 0700 for every directory it creates (an existing one keeps
/// its mode; [`DataDir::open`] tightens those).
pub fn create_private_dir_all(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
}

/// Files readable by anyone who can enter the directory: certificates and addresses,
/// no secrets.
fn is_public_file(name: &str) -> bool {
    name.ends_with(".pem") || name == "server.sans" || name == "endpoints.json"
}

/// Walks the data dir (without following symbolic links) and removes group and other
/// permissions from every directory and non-public file, logging each change.
fn tighten_modes(root: &Path) -> Result<(), DataDirError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataDirError::Io { path, source }
    };
    // An explicit stack: the walk's depth is bounded by the layout, not by recursion.
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(io_err(&path))? {
                pending.push(entry.map_err(io_err(&path))?.path());
            }
            mode & PRIVATE_DIR_MODE
        } else if meta.is_file() {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if is_public_file(name) {
                continue;
            }
            mode & PRIVATE_FILE_MODE
        } else {
            continue;
        };
        if wanted != mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(wanted))
                .map_err(io_err(&path))?;
            tracing::warn!(
                path = %path.display(),
                from = format!("{mode:o}"),
                to = format!("{wanted:o}"),
                "tightened the permissions of a data dir entry"
            );
        }
    }
    Ok(())
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    certs::write_atomically(path, contents, false).map_err(|source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DataDir::open(dir.path()).unwrap();
        assert!(matches!(
            DataDir::open(dir.path()),
            Err(DataDirError::Locked(_))
        ));
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_data_dir_is_private() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("data");
        let data = DataDir::open(&root).unwrap();
        let store = data.prepare_store_file().unwrap();
        data.ensure_ca().unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("certs")), 0o700);
        assert_eq!(mode(&root.join("hub.lock")), 0o600);
        assert_eq!(mode(&store), 0o600);
        assert_eq!(mode(&root.join("certs/ca.key")), 0o600);
    }

    #[test]
    fn looser_modes_of_an_existing_data_dir_are_tightened() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("data");
        fs::create_dir_all(root.join("telemetry/p0")).unwrap();
        for (file, contents) in [
            ("hub.redb", "db"),
            ("service.key", "key"),
            ("telemetry/p0/00000000000000000000.log", ""),
            ("endpoints.json", "{}"),
        ] {
            fs::write(root.join(file), contents).unwrap();
            fs::set_permissions(root.join(file), fs::Permissions::from_mode(0o644)).unwrap();
        }
        for dir in ["", "telemetry", "telemetry/p0"] {
            fs::set_permissions(root.join(dir), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let _data = DataDir::open(&root).unwrap();
        for dir in ["", "telemetry", "telemetry/p0"] {
            assert_eq!(mode(&root.join(dir)), 0o700, "{dir:?}");
        }
        for file in [
            "hub.redb",
            "service.key",
            "telemetry/p0/00000000000000000000.log",
        ] {
            assert_eq!(mode(&root.join(file)), 0o600, "{file}");
        }
        assert_eq!(mode(&root.join("endpoints.json")), 0o644, "public");
    }

    #[test]
    fn a_file_in_place_of_the_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            DataDir::open(&file),
            Err(DataDirError::NotADirectory(_))
        ));
    }

    #[test]
    fn certificates_are_reused_and_reissued_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        let ca = data.ensure_ca().unwrap();
        let names = SubjectAltNames::for_hub("localhost", []);
        let first = data.ensure_server_cert(&ca, &names).unwrap();
        let again = data
            .ensure_server_cert(&data.ensure_ca().unwrap(), &names)
            .unwrap();
        assert_eq!(first.cert_pem, again.cert_pem);

        let other = SubjectAltNames::for_hub("hub.lan", []);
        let reissued = data.ensure_server_cert(&ca, &other).unwrap();
        assert_ne!(first.cert_pem, reissued.cert_pem);
    }

    #[test]
    fn endpoints_round_trip_and_render_the_ready_line() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        let endpoints = Endpoints {
            mqtt: Some("127.0.0.1:1883".parse().unwrap()),
            mqtts: None,
            http: "[::1]:8080".parse().unwrap(),
            https: None,
            amqps: None,
            amqp: None,
        };
        data.write_endpoints(&endpoints).unwrap();
        assert_eq!(Endpoints::read(dir.path()).unwrap(), endpoints);
        assert_eq!(
            endpoints.ready_line(),
            "hub ready mqtt=127.0.0.1:1883 http=[::1]:8080"
        );
        let endpoints = Endpoints {
            https: Some("127.0.0.1:443".parse().unwrap()),
            ..endpoints
        };
        data.write_endpoints(&endpoints).unwrap();
        assert_eq!(Endpoints::read(dir.path()).unwrap(), endpoints);
        assert_eq!(
            endpoints.ready_line(),
            "hub ready mqtt=127.0.0.1:1883 http=[::1]:8080 https=127.0.0.1:443"
        );
        let endpoints = Endpoints {
            amqps: Some("127.0.0.1:5671".parse().unwrap()),
            amqp: Some("127.0.0.1:5672".parse().unwrap()),
            ..endpoints
        };
        data.write_endpoints(&endpoints).unwrap();
        assert_eq!(Endpoints::read(dir.path()).unwrap(), endpoints);
        assert_eq!(
            endpoints.ready_line(),
            "hub ready mqtt=127.0.0.1:1883 http=[::1]:8080 amqps=127.0.0.1:5671 \
             https=127.0.0.1:443 amqp=127.0.0.1:5672"
        );
    }
}
