//! The operator's certificates (`[tls]`): loading the server certificate chain and
//! key and the device CA bundle, and reloading them on SIGHUP or when the files'
//! modification times change. A reload swaps the material behind the shared
//! [`ServerCert`] and [`DeviceCa`] handles, so new handshakes and new X.509 checks use
//! it while established connections stay up; a file that does not load is logged and
//! the previous material stays.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::auth::x509::{DeviceCa, X509Error};
use crate::config::TlsConfig;
use crate::gateway::tls::{ServerCert, TlsError};

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

/// How often the files' modification times are compared.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why operator certificate files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// A file could not be read.
    #[error("cannot read {key} {path}: {source}")]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The server certificate or key does not parse or they do not match.
    #[error("tls.server_cert / tls.server_key: {0}")]
    Server(#[from] TlsError),
    /// The device CA bundle is unusable (or holds a private key).
    #[error("tls.device_ca_bundle: {0}")]
    DeviceCa(#[from] X509Error),
}

fn read(key: &'static str, path: &Path) -> Result<String, CertificateError> {
    std::fs::read_to_string(path).map_err(|source| CertificateError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the operator's server certificate, if configured.
pub fn load_server_cert(tls: &TlsConfig) -> Result<Option<ServerCert>, CertificateError> {
    match (&tls.server_cert, &tls.server_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read("tls.server_cert", cert)?;
            let key_pem = read("tls.server_key", key)?;
            Ok(Some(ServerCert::from_pem(&cert_pem, &key_pem)?))
        }
        // validate() refuses one without the other.
        _ => Ok(None),
    }
}

/// Loads the operator's device CA bundle, if configured.
pub fn load_device_ca(tls: &TlsConfig) -> Result<Option<DeviceCa>, CertificateError> {
    match &tls.device_ca_bundle {
        Some(path) => Ok(Some(DeviceCa::from_bundle_pem(&read(
            "tls.device_ca_bundle",
            path,
        )?)?)),
        None => Ok(None),
    }
}

/// Reloads the operator's files into the live handles.
#[derive(Debug, Clone)]
pub struct Reloader {
    tls: TlsConfig,
    server_cert: Option<ServerCert>,
    device_ca: Option<DeviceCa>,
}

impl Reloader {
    /// A reloader for whichever of the handles the configuration names files for.
    pub fn new(
        tls: TlsConfig,
        server_cert: Option<ServerCert>,
        device_ca: Option<DeviceCa>,
    ) -> Self {
        Self {
            tls,
            server_cert,
            device_ca,
        }
    }

    /// Whether there is anything to reload.
    pub fn is_active(&self) -> bool {
        self.server_cert.is_some() || self.device_ca.is_some()
    }

    /// Re-reads the files and swaps in what loads; what does not is logged and the old
    /// material stays.
    pub fn reload(&self) {
        if let Some(live) = &self.server_cert {
            match load_server_cert(&self.tls) {
                Ok(Some(fresh)) => {
                    live.replace(&fresh);
                    tracing::info!("server certificate reloaded");
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "server certificate not reloaded; keeping the old one");
                }
            }
        }
        if let Some(live) = &self.device_ca {
            match load_device_ca(&self.tls) {
                Ok(Some(fresh)) => {
                    live.replace(&fresh);
                    tracing::info!("device CA bundle reloaded");
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "device CA bundle not reloaded; keeping the old one");
                }
            }
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        [
            &self.tls.server_cert,
            &self.tls.server_key,
            &self.tls.device_ca_bundle,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    fn modified(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .iter()
            .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Installs the SIGHUP handler now and spawns the task that reloads on every
    /// SIGHUP and whenever a file's modification time changes, until aborted.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        #[cfg(unix)]
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!(error = %err, "no SIGHUP handler; reloading on file changes only");
                None
            }
        };
        #[cfg(not(unix))]
        let hangup: Option<Hangup> = None;
        tokio::spawn(self.run(hangup))
    }

    async fn run(self, mut hangup: Option<Hangup>) {
        let mut seen = self.modified();
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    #[cfg(unix)]
                    Some(signal) => signal.recv().await,
                    #[cfg(not(unix))]
                    Some(_) => std::future::pending::<Option<()>>().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hup => {
                    tracing::info!("SIGHUP: reloading certificates");
                    seen = self.modified();
                    self.reload();
                }
                _ = poll.tick() => {
                    let now = self.modified();
                    if now != seen {
                        seen = now;
                        self.reload();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_bundle_with_a_private_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::Ca::generate("operator device CA").unwrap();
        let server = ca
            .issue_server(&certs::SubjectAltNames::for_hub("localhost", []))
            .unwrap();
        let bundle = format!("{}{}", ca.cert_pem(), server.key_pem);
        let tls = TlsConfig {
            device_ca_bundle: Some(write(dir.path(), "bundle.pem", &bundle)),
            ..TlsConfig::default()
        };
        assert!(matches!(
            load_device_ca(&tls),
            Err(CertificateError::DeviceCa(X509Error::PrivateKeyInBundle))
        ));
        let tls = TlsConfig {
            device_ca_bundle: Some(write(dir.path(), "ok.pem", ca.cert_pem())),
            ..TlsConfig::default()
        };
        assert!(load_device_ca(&tls).unwrap().is_some());
    }

    #[test]
    fn a_bad_file_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::Ca::generate("operator CA").unwrap();
        let server = ca
            .issue_server(&certs::SubjectAltNames::for_hub("localhost", []))
            .unwrap();
        let tls = TlsConfig {
            server_cert: Some(write(dir.path(), "server.pem", &server.cert_pem)),
            server_key: Some(write(dir.path(), "server.key", &server.key_pem)),
            device_ca_bundle: None,
        };
        let live = load_server_cert(&tls).unwrap().unwrap();
        let original = live.leaf().unwrap();
        let reloader = Reloader::new(tls.clone(), Some(live.clone()), None);
        write(dir.path(), "server.pem", "not a certificate");
        assert!(load_server_cert(&tls).is_err());
        reloader.reload();
        assert_eq!(live.leaf().unwrap(), original, "the old certificate stays");
        // A key from another CA does not match the first certificate: refused too.
        let other = certs::Ca::generate("other CA")
            .unwrap()
            .issue_server(&certs::SubjectAltNames::for_hub("localhost", []))
            .unwrap();
        write(dir.path(), "server.pem", &server.cert_pem);
        write(dir.path(), "server.key", &other.key_pem);
        assert!(matches!(
            load_server_cert(&tls),
            Err(CertificateError::Server(_))
        ));
        reloader.reload();
        assert_eq!(live.leaf().unwrap(), original);

        // A good pair is swapped in.
        write(dir.path(), "server.pem", &other.cert_pem);
        reloader.reload();
        assert_ne!(live.leaf().unwrap(), original);
    }
}
