//! Reading certificates and keys from PEM files, and checking that they belong together.
//!
//! Everything here runs when a configuration is loaded (start, reload, `ringway check`), never
//! on a worker's data path. Errors name the file and never carry key material.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use x509_parser::extensions::GeneralName;

use super::provider;

/// The system's CA bundle on Debian-like systems, for `roots = "system"`.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why a certificate, key or CA file could not be used.
#[derive(Debug)]
pub enum CertError {
    /// The file does not exist.
    Missing(PathBuf),
    /// The file exists but could not be read.
    Unreadable(PathBuf, std::io::Error),
    /// The file holds no PEM `CERTIFICATE` section.
    NoCert(PathBuf),
    /// The file holds no PEM private key section (PKCS#8, PKCS#1 or SEC1).
    NoKey(PathBuf),
    /// A PEM section or the DER inside it is malformed.
    BadPem(PathBuf, String),
    /// The key file's key is of a kind the crypto provider cannot sign with.
    UnsupportedKey(PathBuf),
    /// The private key is not the one the certificate was issued for.
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertError::Missing(p) => write!(f, "file {} does not exist", p.display()),
            CertError::Unreadable(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            CertError::NoCert(p) => write!(f, "no PEM CERTIFICATE found in {}", p.display()),
            CertError::NoKey(p) => write!(
                f,
                "no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) found in {}",
                p.display()
            ),
            CertError::BadPem(p, why) => write!(f, "{} is not valid PEM: {why}", p.display()),
            CertError::UnsupportedKey(p) => {
                write!(
                    f,
                    "the private key in {} is of an unsupported kind",
                    p.display()
                )
            }
            CertError::KeyMismatch { cert, key } => write!(
                f,
                "the key in {} does not match the certificate in {}",
                key.display(),
                cert.display()
            ),
        }
    }
}

impl std::error::Error for CertError {}

/// A certificate chain with its private key, ready for rustls, plus the fields Ringway reads.
#[derive(Clone)]
pub struct LoadedCert {
    /// Chain and signing key; shared by every handshake that picks this certificate.
    pub key: Arc<CertifiedKey>,
    /// DNS names from the leaf's subjectAltName, lowercased (`*.example.com` kept as written).
    pub names: Vec<String>,
    /// End of validity of the leaf, in Unix seconds.
    pub not_after: i64,
    /// The leaf's subject, RFC 4514 style ("CN=api.example.com, O=Example").
    pub subject: String,
}

// The private key stays out of every debug print.
impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("subject", &self.subject)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

// Two loads are the same when the chains are: a matching key is checked on load, so the same
// chain implies the same key pair.
impl PartialEq for LoadedCert {
    fn eq(&self, other: &Self) -> bool {
        self.key.cert == other.key.cert
    }
}

/// Trusted CA certificates read from one PEM file (client-auth or upstream `ca`).
#[derive(Clone, PartialEq)]
pub struct CaCerts {
    /// The certificates, in file order.
    pub certs: Arc<Vec<CertificateDer<'static>>>,
}

impl fmt::Debug for CaCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaCerts({} certificates)", self.certs.len())
    }
}

impl CaCerts {
    /// Adds these certificates to `store`; returns how many were accepted as trust anchors.
    pub fn add_to(&self, store: &mut RootCertStore) -> usize {
        let (added, _ignored) = store.add_parsable_certificates(self.certs.iter().cloned());
        added
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CertError::Missing(path.to_path_buf()),
        _ => CertError::Unreadable(path.to_path_buf(), e),
    })
}

/// Every certificate in a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&pem) {
        match item {
            Ok(c) => certs.push(c),
            Err(e) => return Err(CertError::BadPem(path.to_path_buf(), e.to_string())),
        }
    }
    if certs.is_empty() {
        return Err(CertError::NoCert(path.to_path_buf()));
    }
    Ok(certs)
}

/// The private key in a PEM file.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey(path.to_path_buf()),
        // The parser's own message could quote a line of the file; a key file's lines are secret.
        _ => CertError::BadPem(path.to_path_buf(), "malformed private key section".into()),
    })
}

/// Loads a certificate chain and its key, and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<LoadedCert, CertError> {
    let chain = load_certs(cert)?;
    let info = leaf_info(&chain[0]).map_err(|why| CertError::BadPem(cert.to_path_buf(), why))?;
    let der = load_key(key)?;
    let signer = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|_| CertError::UnsupportedKey(key.to_path_buf()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|_| CertError::KeyMismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    })?;
    Ok(LoadedCert {
        key: Arc::new(ck),
        names: info.names,
        not_after: info.not_after,
        subject: info.subject,
    })
}

/// Loads a CA bundle: every certificate in the file must parse, and there must be one.
pub fn load_ca(path: &Path) -> Result<CaCerts, CertError> {
    let certs = load_certs(path)?;
    let mut probe = RootCertStore::empty();
    for c in &certs {
        if let Err(e) = probe.add(c.clone()) {
            return Err(CertError::BadPem(
                path.to_path_buf(),
                format!("a certificate cannot be used as a trust anchor: {e}"),
            ));
        }
    }
    Ok(CaCerts {
        certs: Arc::new(certs),
    })
}

/// The fields of a leaf certificate that rustls does not expose.
struct LeafInfo {
    names: Vec<String>,
    not_after: i64,
    subject: String,
}

fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(LeafInfo {
        names,
        not_after: cert.validity().not_after.timestamp(),
        subject: cert.subject().to_string(),
    })
}

/// The subject of a DER certificate as "CN=…, O=…", or `None` when it does not parse.
pub fn subject_of(der: &[u8]) -> Option<String> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.subject().to_string())
}

/// A Unix time as "YYYY-MM-DD" (UTC), for messages about expiry.
pub fn date(unix: i64) -> String {
    match u64::try_from(unix) {
        Ok(secs) => {
            let mut d = ringway_filters::limit::window::iso8601(secs.saturating_mul(1000));
            d.truncate(10);
            d
        }
        Err(_) => "before 1970".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_767_225_599), "2025-12-31");
    }
}
