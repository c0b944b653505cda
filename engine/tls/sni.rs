//! Picking the server certificate from the client's SNI.
//!
//! rustls's own `ResolvesServerCertUsingSni` matches exact names only and fails the handshake
//! without SNI; a gateway wants wildcards and a default.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Certificates by name: exact names, then one-label wildcards, then the first certificate.
#[derive(Debug)]
pub(crate) struct SniResolver {
    /// Every certificate, in config order; the first is the default.
    certs: Vec<Arc<CertifiedKey>>,
    /// Lowercased exact name → index into `certs`.
    exact: HashMap<String, usize>,
    /// Lowercased parent of a `*.parent` name → index into `certs`.
    wildcard: HashMap<String, usize>,
}

impl SniResolver {
    /// Builds the maps from each certificate's subjectAltName DNS names; an earlier certificate
    /// keeps a name that a later one repeats. `None` when `certs` is empty.
    pub(crate) fn new(certs: Vec<(Arc<CertifiedKey>, Vec<String>)>) -> Option<Self> {
        if certs.is_empty() {
            return None;
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut keys = Vec::with_capacity(certs.len());
        for (i, (key, names)) in certs.into_iter().enumerate() {
            for n in names {
                let n = n.to_ascii_lowercase();
                match n.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(n).or_insert(i),
                };
            }
            keys.push(key);
        }
        Some(SniResolver {
            certs: keys,
            exact,
            wildcard,
        })
    }

    /// The certificate for this SNI name (or for no SNI).
    pub(crate) fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let i = sni
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase())
            .and_then(|name| {
                self.exact.get(&name).copied().or_else(|| {
                    // A wildcard covers exactly one label: "a.example.com", not "example.com"
                    // and not "a.b.example.com".
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        &self.certs[i]
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}
