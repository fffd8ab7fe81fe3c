//! The data directory: its layout, the lock that keeps a second hub out, first-start
//! creation of the development CA and server certificate, and `endpoints.json`.
//!
//! ```text
//! DIR/hub.lock         held (flock) while a hub runs on DIR
//! DIR/hub.redb         the embedded store
//! DIR/service.key      owner key for service tokens (Ed25519, PKCS#8 PEM, 0600)
//! DIR/certs/ca.pem     development CA (+ ca.key)
//! DIR/certs/server.pem server certificate (+ server.key, + server.sans: its names)
//! DIR/endpoints.json   bound addresses, written atomically once ready
//! ```

use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, SocketAddr};
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
        fs::create_dir_all(root).map_err(|source| DataDirError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let lock_path = root.join("hub.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
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
        Ok(Self {
            root: root.to_path_buf(),
            _lock: lock,
        })
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
        };
        data.write_endpoints(&endpoints).unwrap();
        assert_eq!(Endpoints::read(dir.path()).unwrap(), endpoints);
        assert_eq!(
            endpoints.ready_line(),
            "hub ready mqtt=127.0.0.1:1883 http=[::1]:8080"
        );
    }
}
