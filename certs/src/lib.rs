//! Development PKI for the hub: a certificate authority, server certificates and
//! device certificates, all generated with `rcgen`.
//!
//! Data flow: [`Ca::generate`] (or [`Ca::from_pem`] for one already on disk) is the
//! issuer; [`Ca::issue_server`] signs a TLS server certificate for a set of
//! [`SubjectAltNames`]; [`Ca::issue_device`] signs a client certificate whose common
//! name is the device id, which the hub's TLS listener accepts as an X.509 device
//! credential. Every issued item is a [`CertifiedKey`]: PEM certificate plus PEM
//! private key (PKCS#8, ECDSA P-256).
//!
//! Files: [`Ca::write`] / [`Ca::read`] and [`CertifiedKey::write`] store PEM pairs
//! next to each other (`name.pem` + `name.key`, key files mode 0600).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Failures of the development PKI.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused to generate, sign or parse a certificate or key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// A PEM file exists but does not hold what it should.
    #[error("{path}: not a valid PEM {what}: {reason}")]
    InvalidPem {
        /// The file concerned.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// What rcgen said.
        reason: String,
    },
    /// A subject alternative name is neither an IP address nor a valid DNS name.
    #[error("invalid subject alternative name {0:?}")]
    InvalidName(String),
    /// A device id that is not a device id, or that cannot safely name a file.
    #[error("invalid device name {name:?}: {reason}")]
    InvalidDeviceName {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// The punctuation a device id may hold besides ASCII letters and digits (the
/// registry's rule, Azure IoT Hub's).
const DEVICE_ID_PUNCTUATION: &str = "-:.+%_#*?!(),=@;$'";

/// File stems the PKI writes for itself; a device named like one would overwrite it.
const RESERVED_STEMS: [&str; 2] = ["ca", "server"];

/// Checks that `device_id` is a device id (1–128 ASCII letters, digits and
/// `- : . + % _ # * ? ! ( ) , = @ ; $ '`) that can name a file in a certificate
/// directory: not `.` or `..` (which would leave the directory), and not a name the PKI
/// uses for its own files (`ca`, `server`, in any letter case, for case-insensitive
/// file systems). The character set already excludes `/`, `\` and NUL.
pub fn check_device_name(device_id: &str) -> Result<(), CertError> {
    let refuse = |reason| {
        Err(CertError::InvalidDeviceName {
            name: device_id.to_string(),
            reason,
        })
    };
    if device_id.is_empty() {
        return refuse("must not be empty");
    }
    if device_id.len() > 128 {
        return refuse("longer than 128 characters");
    }
    if !device_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || DEVICE_ID_PUNCTUATION.contains(c))
    {
        return refuse("allowed are ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '");
    }
    if device_id == "." || device_id == ".." {
        return refuse("names a directory, not a file");
    }
    if RESERVED_STEMS
        .iter()
        .any(|stem| device_id.eq_ignore_ascii_case(stem))
    {
        return refuse("is the name of the CA's or the server's own files");
    }
    Ok(())
}

/// How long development certificates stay valid.
const CA_VALIDITY: Duration = Duration::days(3650);
const LEAF_VALIDITY: Duration = Duration::days(825);
/// Backdating absorbs small clock differences between the hub and its devices.
const BACKDATE: Duration = Duration::hours(1);

/// A PEM certificate and its PEM private key.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The certificate, PEM encoded.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM encoded. Never log it.
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertifiedKey {
    /// Writes `stem.pem` and `stem.key` (mode 0600) into `dir`, creating it.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), CertError> {
        fs::create_dir_all(dir).map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(&dir.join(format!("{stem}.pem")), &self.cert_pem, false)?;
        write_file(&dir.join(format!("{stem}.key")), &self.key_pem, true)
    }

    /// Reads `stem.pem` and `stem.key` from `dir`; `Ok(None)` if either is absent.
    pub fn read(dir: &Path, stem: &str) -> Result<Option<Self>, CertError> {
        let (Some(cert_pem), Some(key_pem)) = (
            read_optional(&dir.join(format!("{stem}.pem")))?,
            read_optional(&dir.join(format!("{stem}.key")))?,
        ) else {
            return Ok(None);
        };
        Ok(Some(Self { cert_pem, key_pem }))
    }
}

/// The names a server certificate is valid for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubjectAltNames {
    /// DNS names, lower-cased, sorted, without duplicates.
    pub dns: Vec<String>,
    /// IP addresses, sorted, without duplicates.
    pub ips: Vec<IpAddr>,
}

impl SubjectAltNames {
    /// The set for a hub: `hostname`, `localhost`, `127.0.0.1`, `::1`, and `extra_ips`
    /// (the addresses the listeners bind; unspecified addresses are skipped).
    /// A hostname that parses as an IP address is filed as one.
    pub fn for_hub(hostname: &str, extra_ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut names = Self::default();
        names.add(hostname);
        names.add("localhost");
        names.ips.push(IpAddr::from([127, 0, 0, 1]));
        names.ips.push(IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1u16]));
        names
            .ips
            .extend(extra_ips.into_iter().filter(|ip| !ip.is_unspecified()));
        names.normalise();
        names
    }

    fn add(&mut self, name: &str) {
        match name.parse::<IpAddr>() {
            Ok(ip) => self.ips.push(ip),
            Err(_) => self.dns.push(name.to_ascii_lowercase()),
        }
    }

    fn normalise(&mut self) {
        self.dns.sort();
        self.dns.dedup();
        self.ips.sort();
        self.ips.dedup();
    }

    /// One name per line (`dns:NAME` or `ip:ADDR`): the form kept beside a server
    /// certificate so the hub can tell when the set changed.
    pub fn to_lines(&self) -> String {
        let mut out = String::new();
        for dns in &self.dns {
            out.push_str(&format!("dns:{dns}\n"));
        }
        for ip in &self.ips {
            out.push_str(&format!("ip:{ip}\n"));
        }
        out
    }

    fn to_rcgen(&self) -> Result<Vec<SanType>, CertError> {
        let mut sans = Vec::with_capacity(self.dns.len() + self.ips.len());
        for dns in &self.dns {
            let name = dns
                .clone()
                .try_into()
                .map_err(|_| CertError::InvalidName(dns.clone()))?;
            sans.push(SanType::DnsName(name));
        }
        sans.extend(self.ips.iter().copied().map(SanType::IpAddress));
        Ok(sans)
    }
}

/// A certificate authority able to sign server and device certificates.
pub struct Ca {
    pem: CertifiedKey,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("pem", &self.pem).finish()
    }
}

impl Ca {
    /// Generates a new self-signed CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        let pem = CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(pem: CertifiedKey) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(&pem.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&pem.cert_pem, key)?;
        Ok(Self { pem, issuer })
    }

    /// Reads `stem.pem` + `stem.key` from `dir`; `Ok(None)` if absent.
    pub fn read(dir: &Path, stem: &str) -> Result<Option<Self>, CertError> {
        let Some(pem) = CertifiedKey::read(dir, stem)? else {
            return Ok(None);
        };
        Self::from_pem(pem)
            .map(Some)
            .map_err(|err| CertError::InvalidPem {
                path: dir.join(format!("{stem}.pem")),
                what: "CA certificate and key",
                reason: err.to_string(),
            })
    }

    /// Writes `stem.pem` + `stem.key` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<(), CertError> {
        self.pem.write(dir, stem)
    }

    /// The CA certificate, PEM encoded (what devices and clients trust).
    pub fn cert_pem(&self) -> &str {
        &self.pem.cert_pem
    }

    /// Signs a TLS server certificate valid for `names`.
    pub fn issue_server(&self, names: &SubjectAltNames) -> Result<CertifiedKey, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let common_name = names
            .dns
            .first()
            .cloned()
            .unwrap_or_else(|| "hub".to_string());
        params.distinguished_name = name(&common_name);
        params.subject_alt_names = names.to_rcgen()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a TLS client certificate for `device_id` (its common name) and writes it
    /// as `dir/<device_id>.pem` + `.key`, after [`check_device_name`] (a name like
    /// `../x` or `ca` is refused before anything is written).
    pub fn issue_device_into(&self, dir: &Path, device_id: &str) -> Result<PathBuf, CertError> {
        check_device_name(device_id)?;
        self.issue_device(device_id)?.write(dir, device_id)?;
        Ok(dir.join(format!("{device_id}.pem")))
    }

    /// Signs a TLS client certificate for `device_id` (its common name).
    pub fn issue_device(&self, device_id: &str) -> Result<CertifiedKey, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(device_id);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
}

fn read_optional(path: &Path) -> Result<Option<String>, CertError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `contents` to `path` through a temporary file, an fsync and a rename, so a
/// crash never leaves half a file behind. With `private` the file gets mode 0600 (keys).
pub fn write_atomically(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    write_atomically(path, contents.as_bytes(), secret).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn parse(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }

    #[test]
    fn server_certificate_carries_every_name_and_chains_to_the_ca() {
        let ca = Ca::generate("test CA").unwrap();
        let names = SubjectAltNames::for_hub("hub.example", ["10.1.2.3".parse().unwrap()]);
        let server = ca.issue_server(&names).unwrap();

        let der = parse(&server.cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let rendered: Vec<String> = san
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(dns) => dns.to_string(),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()).to_string(),
                    _ => IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()).to_string(),
                },
                other => format!("{other:?}"),
            })
            .collect();
        for expected in ["hub.example", "localhost", "127.0.0.1", "::1", "10.1.2.3"] {
            assert!(
                rendered.iter().any(|n| n == expected),
                "{expected} in {rendered:?}"
            );
        }

        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn device_certificate_common_name_is_the_device_id() {
        let ca = Ca::generate("test CA").unwrap();
        let device = ca.issue_device("sensor-42").unwrap();
        let der = parse(&device.cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "sensor-42");
    }

    #[test]
    fn a_ca_written_and_read_back_still_signs_chaining_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA").unwrap();
        ca.write(dir.path(), "ca").unwrap();
        let loaded = Ca::read(dir.path(), "ca").unwrap().unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());

        let device = loaded.issue_device("d1").unwrap();
        let der = parse(&device.cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn absent_files_read_as_none_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Ca::read(dir.path(), "ca").unwrap().is_none());
        fs::write(dir.path().join("ca.pem"), "not a pem").unwrap();
        fs::write(dir.path().join("ca.key"), "not a key").unwrap();
        let err = Ca::read(dir.path(), "ca").unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        Ca::generate("test CA")
            .unwrap()
            .write(dir.path(), "ca")
            .unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn device_names_that_escape_the_directory_or_hit_the_pki_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA").unwrap();
        ca.write(dir.path(), "ca").unwrap();
        let ca_key = fs::read_to_string(dir.path().join("ca.key")).unwrap();
        let devices = dir.path().join("devices");
        for bad in [
            "../x", "..", ".", "ca", "CA", "server", "a/b", "a\0b", "", "a b", "é",
        ] {
            let err = ca.issue_device_into(&devices, bad).unwrap_err();
            assert!(
                matches!(err, CertError::InvalidDeviceName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(check_device_name(&"d".repeat(129)).is_err());
        assert!(!dir.path().join("x.pem").exists(), "nothing escaped");
        assert!(!devices.exists(), "nothing written for a refused name");
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.key")).unwrap(),
            ca_key,
            "the CA key is untouched"
        );
        // Every character the registry allows still works, dots included.
        for good in ["sensor-42", "a.b", "...", "ca.1", "x:y+z%_#*?!(),=@;$'"] {
            let path = ca.issue_device_into(&devices, good).unwrap();
            assert_eq!(path, devices.join(format!("{good}.pem")));
            assert!(path.exists(), "{good}");
        }
    }

    #[test]
    fn san_set_is_normalised_so_it_compares_stably() {
        let a = SubjectAltNames::for_hub("LOCALHOST", ["127.0.0.1".parse().unwrap()]);
        let b = SubjectAltNames::for_hub("localhost", []);
        assert_eq!(a, b);
        assert_eq!(a.to_lines(), "dns:localhost\nip:127.0.0.1\nip:::1\n");
    }
}
