//! TLS for devices (`--tls`, `--auth x509`): the hub's MQTT-over-TLS address and
//! development CA from its data dir, device certificates that CA signs with the
//! device id as common name (the hub's `certificateAuthority` devices), and the
//! rustls client configurations the lean path dials with.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The data dir (or `--ca-file`) has no usable CA.
    #[error("cannot use the CA in {dir}: {reason}")]
    Ca {
        /// The certificate directory or file.
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
    /// The CA that signs device certificates (read from the data dir); none for a
    /// plain broker, whose CA certificate alone is known.
    ca: Option<certs::Ca>,
    /// The lean path's configuration for devices without a certificate, made once.
    shared: OnceLock<Arc<rustls::ClientConfig>>,
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
            ca: Some(ca),
            shared: OnceLock::new(),
        }))
    }

    /// A plain broker's TLS listener at `addr`, trusting the CA certificate in
    /// `ca_file` (no device certificates: x509 needs the hub's CA key).
    pub fn trusting(ca_file: &Path, addr: SocketAddr) -> Result<Arc<Self>, TlsError> {
        let ca_pem = std::fs::read_to_string(ca_file).map_err(|err| TlsError::Ca {
            dir: ca_file.display().to_string(),
            reason: err.to_string(),
        })?;
        Ok(Arc::new(Self {
            mqtts: addr,
            ca_pem,
            ca: None,
            shared: OnceLock::new(),
        }))
    }

    /// A certificate and key for `device` (ECDSA P-256, CN = the id), as device-sdk
    /// credentials.
    pub fn device_credentials(&self, device: &str) -> Result<device_sdk::Credentials, String> {
        let (cert_pem, key_pem) = self.issue(device)?;
        Ok(device_sdk::Credentials::X509 { cert_pem, key_pem })
    }

    /// The lean path's client configuration: trusting the hub's CA, with `device`'s
    /// certificate when it authenticates with one (x509); the one without is shared.
    pub fn client_config(
        &self,
        x509_device: Option<&str>,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let Some(device) = x509_device else {
            if let Some(shared) = self.shared.get() {
                return Ok(Arc::clone(shared));
            }
            let made = Arc::new(self.builder()?.with_no_client_auth());
            return Ok(Arc::clone(self.shared.get_or_init(|| made)));
        };
        let (cert_pem, key_pem) = self.issue(device)?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("{device}'s certificate: {err}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| format!("{device}'s key: {err}"))?;
        let config = self
            .builder()?
            .with_client_auth_cert(chain, key)
            .map_err(|err| format!("{device}'s certificate: {err}"))?;
        Ok(Arc::new(config))
    }

    fn issue(&self, device: &str) -> Result<(String, String), String> {
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| format!("no CA key to issue {device}'s certificate with"))?;
        let issued = ca
            .issue_device(device)
            .map_err(|err| format!("cannot issue a certificate for {device}: {err}"))?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    /// A client configuration trusting only the hub's CA (ring, TLS 1.2 and 1.3).
    fn builder(
        &self,
    ) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String>
    {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|err| format!("the hub's CA: {err}"))?;
            roots
                .add(cert)
                .map_err(|err| format!("the hub's CA: {err}"))?;
        }
        Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(roots))
    }
}
