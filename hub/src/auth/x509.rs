//! X.509 device credentials: a client certificate chaining to the hub's device CA
//! with CN = device id, or one whose SHA-256 (or SHA-1) thumbprint is registered for
//! the device. The TLS layer only proves the client holds the certificate's key;
//! which device it may be is decided here, at CONNECT.

use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Why a client certificate does not authenticate the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    /// The connection presented no certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate does not chain to the device CA.
    #[error("client certificate not issued by the device CA")]
    UntrustedIssuer,
    /// Its common name is not the device id.
    #[error("client certificate common name is not the device id")]
    WrongCommonName,
    /// Its thumbprint is not registered for the device.
    #[error("client certificate thumbprint not registered for the device")]
    ThumbprintMismatch,
    /// The device CA could not be loaded.
    #[error("device CA unusable: {0}")]
    Ca(String),
    /// The device CA bundle holds a private key: only CA certificates belong there.
    #[error("device CA bundle contains a private key; it must hold certificates only")]
    PrivateKeyInBundle,
}

/// Checks certificate chains against the hub's device CA. Clones share one handle, so
/// [`DeviceCa::replace`] (a reload) reaches every holder: checks after it use the new
/// CAs, and connections already authenticated are untouched.
#[derive(Clone)]
pub struct DeviceCa {
    verifier: Arc<RwLock<Arc<dyn ClientCertVerifier>>>,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCa")
    }
}

impl DeviceCa {
    /// Builds the checker from the CA certificate (PEM).
    pub fn from_pem(ca_pem: &str) -> Result<Self, X509Error> {
        Ok(Self {
            verifier: Arc::new(RwLock::new(Self::verifier(ca_pem)?)),
        })
    }

    /// Builds the checker from an operator's bundle of CA certificates (PEM), refusing
    /// a bundle with a private key in it (a CA key has no business on the hub) or
    /// without any certificate.
    pub fn from_bundle_pem(bundle_pem: &str) -> Result<Self, X509Error> {
        let has_key = bundle_pem.lines().any(|line| {
            let line = line.trim();
            line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----")
        });
        if has_key {
            return Err(X509Error::PrivateKeyInBundle);
        }
        Self::from_pem(bundle_pem)
    }

    /// Makes every clone check against `other`'s CAs from now on.
    pub fn replace(&self, other: &DeviceCa) {
        let next = match other.verifier.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        match self.verifier.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    fn verifier(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, X509Error> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|err| X509Error::Ca(err.to_string()))?;
            roots
                .add(cert)
                .map_err(|err| X509Error::Ca(err.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|err| X509Error::Ca(err.to_string()))?;
        Ok(verifier)
    }

    /// Whether `chain` (end entity first) chains to the CA and is valid now.
    pub fn issued(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return false;
        };
        // A poisoned lock still holds a complete verifier (writers only swap an Arc).
        let verifier = match self.verifier.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .is_ok()
    }
}

/// Lower-case hex SHA-256 and SHA-1 thumbprints of a DER certificate.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    (hex(&Sha256::digest(der)), hex(&Sha1::digest(der)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A CA-issued certificate must name the device as its CN.
pub fn verify_ca_issued(
    chain: &[CertificateDer<'_>],
    device_id: &str,
    ca: &DeviceCa,
) -> Result<(), X509Error> {
    let leaf = chain.first().ok_or(X509Error::NoCertificate)?;
    if !ca.issued(chain) {
        return Err(X509Error::UntrustedIssuer);
    }
    match common_name(leaf) {
        Some(cn) if cn == device_id => Ok(()),
        _ => Err(X509Error::WrongCommonName),
    }
}

/// A self-signed (or any) certificate must have a registered thumbprint.
pub fn verify_thumbprint(
    chain: &[CertificateDer<'_>],
    registered: &[&str],
) -> Result<(), X509Error> {
    let leaf = chain.first().ok_or(X509Error::NoCertificate)?;
    let (sha256, sha1) = thumbprints(leaf);
    if registered.iter().any(|t| *t == sha256 || *t == sha1) {
        Ok(())
    } else {
        Err(X509Error::ThumbprintMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn ca_issued_certificates_with_the_right_cn_pass() {
        let ca = certs::Ca::generate("device CA").unwrap();
        let checker = DeviceCa::from_pem(ca.cert_pem()).unwrap();
        let device = ca.issue_device("cam-1").unwrap();
        let chain = [der(&device.cert_pem)];
        assert_eq!(verify_ca_issued(&chain, "cam-1", &checker), Ok(()));
        assert_eq!(
            verify_ca_issued(&chain, "cam-2", &checker),
            Err(X509Error::WrongCommonName)
        );

        let other_ca = certs::Ca::generate("other CA").unwrap();
        let foreign = [der(&other_ca.issue_device("cam-1").unwrap().cert_pem)];
        assert_eq!(
            verify_ca_issued(&foreign, "cam-1", &checker),
            Err(X509Error::UntrustedIssuer)
        );
        assert_eq!(
            verify_ca_issued(&[], "cam-1", &checker),
            Err(X509Error::NoCertificate)
        );
    }

    #[test]
    fn thumbprints_match_sha256_or_sha1() {
        let ca = certs::Ca::generate("any").unwrap();
        let cert = der(&ca.issue_device("d").unwrap().cert_pem);
        let (sha256, sha1) = thumbprints(&cert);
        assert_eq!(sha256.len(), 64);
        assert_eq!(sha1.len(), 40);
        let chain = [cert];
        assert_eq!(verify_thumbprint(&chain, &[sha256.as_str()]), Ok(()));
        assert_eq!(verify_thumbprint(&chain, &["00", sha1.as_str()]), Ok(()));
        assert_eq!(
            verify_thumbprint(&chain, &["00"]),
            Err(X509Error::ThumbprintMismatch)
        );
    }
}
