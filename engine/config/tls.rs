//! Checks for the TLS keys: `[listeners.tls]`, `[[upstreams]] tls` and `[redis] tls`.
//!
//! Certificate, key and CA files are read here, so that a bad file is a config error naming the
//! key, the line and the file (at start, at reload, and in `ringway check`), and the engine gets
//! material that is already known to work.

use std::ops::Range;
use std::path::PathBuf;

use rustls::pki_types::ServerName;

use super::raw::{RawCertPair, RawListenerTls, RawRedis, RawUpstreamTls, S};
use super::types::*;
use super::validate::Ck;
use crate::tls::certs::{self, CaCerts, CertError, LoadedCert};

/// A certificate expiring sooner than this is warned about.
const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

pub(crate) fn listener_tls(ck: &mut Ck, key: &str, raw: &S<RawListenerTls>) -> Option<ListenerTls> {
    let t = raw.get_ref();
    let mut ok = true;
    let mut pairs = Vec::new();
    if t.certs.get_ref().is_empty() {
        ck.err(
            format!("{key}.certs"),
            t.certs.span(),
            "needs at least one { cert = \"….pem\", key = \"….key\" }",
        );
        ok = false;
    }
    for (j, p) in t.certs.get_ref().iter().enumerate() {
        let pk = format!("{key}.certs[{j}]");
        match cert_pair(ck, &pk, p.get_ref()) {
            Some(pair) => {
                if j > 0 && pair.loaded.names.is_empty() {
                    ck.warn(
                        format!("{pk}.cert"),
                        p.get_ref().cert.span(),
                        format!(
                            "{} has no DNS name in subjectAltName: SNI never selects it, only the first certificate is the default",
                            pair.cert.display()
                        ),
                    );
                }
                pairs.push(pair);
            }
            None => ok = false,
        }
    }
    let min_version = match &t.min_version {
        None => TlsVersion::V1_2,
        Some(v) => match v.get_ref().as_str() {
            "1.2" => TlsVersion::V1_2,
            "1.3" => TlsVersion::V1_3,
            other => {
                ck.err(
                    format!("{key}.min_version"),
                    v.span(),
                    format!("expected \"1.2\" or \"1.3\", got {other:?}"),
                );
                ok = false;
                TlsVersion::V1_2
            }
        },
    };
    let client_auth = match &t.client_auth {
        None => None,
        Some(ca_raw) => {
            let c = ca_raw.get_ref();
            let mode = match &c.mode {
                // A table that names a CA but no mode means the operator wants certificates.
                None => ClientAuthMode::Required,
                Some(m) => match m.get_ref().as_str() {
                    "optional" => ClientAuthMode::Optional,
                    "required" => ClientAuthMode::Required,
                    other => {
                        ck.err(
                            format!("{key}.client_auth.mode"),
                            m.span(),
                            format!("expected \"optional\" or \"required\", got {other:?}"),
                        );
                        ok = false;
                        ClientAuthMode::Required
                    }
                },
            };
            match ca(ck, &format!("{key}.client_auth.ca"), &c.ca) {
                Some((path, roots)) => Some(ClientAuth {
                    ca: path,
                    roots,
                    mode,
                }),
                None => {
                    ok = false;
                    None
                }
            }
        }
    };
    ok.then_some(ListenerTls {
        certs: pairs,
        min_version,
        client_auth,
    })
}

pub(crate) fn upstream_tls(ck: &mut Ck, key: &str, raw: &S<RawUpstreamTls>) -> Option<UpstreamTls> {
    let t = raw.get_ref();
    if !t.enabled {
        return None;
    }
    let mut out = UpstreamTls {
        sni: None,
        roots: Roots::Webpki,
        ca: None,
        client_cert: None,
        insecure_skip_verify: false,
    };
    let Some(table) = &t.table else {
        return Some(out);
    };
    if let Some(sni) = &table.sni {
        let v = sni.get_ref();
        if ServerName::try_from(v.as_str()).is_err() {
            ck.err(
                format!("{key}.sni"),
                sni.span(),
                format!("{v:?} is not a valid DNS name or IP address"),
            );
        }
        out.sni = Some(v.clone());
    }
    if let Some(r) = &table.roots {
        out.roots = match r.get_ref().as_str() {
            "webpki" => Roots::Webpki,
            "system" => {
                if !std::path::Path::new(certs::SYSTEM_BUNDLE).exists() {
                    ck.err(
                        format!("{key}.roots"),
                        r.span(),
                        format!(
                            "\"system\" reads {}, which does not exist here (install ca-certificates, or use \"webpki\")",
                            certs::SYSTEM_BUNDLE
                        ),
                    );
                }
                Roots::System
            }
            other => {
                ck.err(
                    format!("{key}.roots"),
                    r.span(),
                    format!("expected \"webpki\" or \"system\", got {other:?}"),
                );
                Roots::Webpki
            }
        };
    }
    if let Some(c) = &table.ca {
        out.ca = ca(ck, &format!("{key}.ca"), c);
    }
    match (&table.client_cert, &table.client_key) {
        (Some(cert), Some(k)) => {
            let pair = RawCertPair {
                cert: cert.clone(),
                key: k.clone(),
            };
            out.client_cert = cert_pair_keys(
                ck,
                (&format!("{key}.client_cert"), &pair.cert),
                (&format!("{key}.client_key"), &pair.key),
            );
        }
        (Some(c), None) => ck.err(
            format!("{key}.client_key"),
            c.span(),
            "client_cert needs client_key",
        ),
        (None, Some(k)) => ck.err(
            format!("{key}.client_cert"),
            k.span(),
            "client_key needs client_cert",
        ),
        (None, None) => {}
    }
    if let Some(v) = &table.insecure_skip_verify {
        out.insecure_skip_verify = *v.get_ref();
        if out.insecure_skip_verify {
            ck.warn(
                format!("{key}.insecure_skip_verify"),
                v.span(),
                "the upstream's certificate is not verified: anyone on the path can read and change this traffic",
            );
        }
    }
    Some(out)
}

pub(crate) fn redis_tls(ck: &mut Ck, r: &RawRedis) -> Option<RedisTls> {
    let t = r.tls.as_ref()?;
    let uses_tls = r
        .url
        .as_ref()
        .is_some_and(|u| u.get_ref().starts_with("rediss://"))
        || r.cluster_nodes.as_ref().is_some_and(|n| {
            n.get_ref()
                .iter()
                .any(|u| u.get_ref().starts_with("rediss://"))
        });
    if !uses_tls {
        ck.err(
            "redis.tls",
            t.span(),
            "applies to rediss:// addresses only; write the url (or cluster_nodes) as rediss://…",
        );
    }
    let ca = t
        .get_ref()
        .ca
        .as_ref()
        .and_then(|c| ca(ck, "redis.tls.ca", c))
        .map(|(p, _)| p);
    Some(RedisTls { ca })
}

/// Loads `{ cert, key }`; reports the problem on whichever key the bad file belongs to.
fn cert_pair(ck: &mut Ck, key: &str, p: &RawCertPair) -> Option<CertPair> {
    cert_pair_keys(
        ck,
        (&format!("{key}.cert"), &p.cert),
        (&format!("{key}.key"), &p.key),
    )
}

fn cert_pair_keys(
    ck: &mut Ck,
    (cert_key, cert): (&str, &S<String>),
    (key_key, key): (&str, &S<String>),
) -> Option<CertPair> {
    let cert_path = ck.path(cert.get_ref());
    let key_path = ck.path(key.get_ref());
    match certs::load_pair(&cert_path, &key_path) {
        Ok(loaded) => {
            check_expiry(ck, cert_key, cert.span(), &cert_path, &loaded);
            Some(CertPair {
                cert: cert_path,
                key: key_path,
                loaded,
            })
        }
        Err(e) => {
            let on_key = match &e {
                CertError::KeyMismatch { .. }
                | CertError::NoKey(_)
                | CertError::UnsupportedKey(_) => true,
                CertError::Missing(p) | CertError::Unreadable(p, _) | CertError::BadPem(p, _) => {
                    *p == key_path && key_path != cert_path
                }
                CertError::NoCert(_) => false,
            };
            if on_key {
                ck.err(key_key, key.span(), e.to_string());
            } else {
                ck.err(cert_key, cert.span(), e.to_string());
            }
            None
        }
    }
}

fn check_expiry(
    ck: &mut Ck,
    key: &str,
    span: Range<usize>,
    path: &std::path::Path,
    c: &LoadedCert,
) {
    let left = c.not_after - ck.now;
    if left < 0 {
        ck.err(
            key,
            span,
            format!(
                "the certificate in {} expired on {}",
                path.display(),
                certs::date(c.not_after)
            ),
        );
    } else if left < EXPIRY_WARNING_SECS {
        ck.warn(
            key,
            span,
            format!(
                "the certificate in {} expires on {} (in {} days)",
                path.display(),
                certs::date(c.not_after),
                left / 86_400
            ),
        );
    }
}

fn ca(ck: &mut Ck, key: &str, v: &S<String>) -> Option<(PathBuf, CaCerts)> {
    let path = ck.path(v.get_ref());
    match certs::load_ca(&path) {
        Ok(c) => Some((path, c)),
        Err(e) => {
            ck.err(key, v.span(), e.to_string());
            None
        }
    }
}
