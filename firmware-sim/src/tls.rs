//! TLS for device-sdk devices (`--tls`, `--auth x509`): the hub's MQTT-over-TLS
//! address and development CA from its data dir, and device certificates that CA
//! signs with the device id as common name (the hub's `certificateAuthority` devices).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The data dir has no usable CA.
    #[error("cannot use the hub's CA in {dir}: {reason}")]
    Ca {
        /// The certificate directory.
        dir: String,
        /// Why.
        reason: String,
    },
    /// The hub did not bind MQTT over TLS.
    #[error("endpoints.json names no mqtts address (start the hub with --mqtts)")]
    NoListener,
}

/// What TLS devices need: where to dial, what to trust, who signs their certificates.
pub struct Tls {
    /// The hub's MQTT-over-TLS listener.
    pub mqtts: SocketAddr,
    /// The CA certificate devices trust (PEM).
    pub ca_pem: String,
    /// The CA that signs device certificates (read from the data dir).
    ca: certs::Ca,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mqtts", &self.mqtts)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads `DATA_DIR/certs/ca.pem` and `ca.key`; `mqtts` from endpoints.json.
    pub fn load(data_dir: &Path, mqtts: Option<SocketAddr>) -> Result<Arc<Self>, TlsError> {
        let dir = data_dir.join("certs");
        let fail = |reason: String| TlsError::Ca {
            dir: dir.display().to_string(),
            reason,
        };
        let ca = certs::Ca::read(&dir, "ca")
            .map_err(|err| fail(err.to_string()))?
            .ok_or_else(|| fail("no ca.pem and ca.key".into()))?;
        Ok(Arc::new(Self {
            mqtts: mqtts.ok_or(TlsError::NoListener)?,
            ca_pem: ca.cert_pem().to_string(),
            ca,
        }))
    }

    /// A certificate and key for `device` (ECDSA P-256, CN = the id), as device-sdk
    /// credentials.
    pub fn device_credentials(&self, device: &str) -> Result<device_sdk::Credentials, String> {
        let issued = self
            .ca
            .issue_device(device)
            .map_err(|err| format!("cannot issue a certificate for {device}: {err}"))?;
        Ok(device_sdk::Credentials::X509 {
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        })
    }
}
