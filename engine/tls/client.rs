//! The rustls client configuration of one TLS upstream.

use std::sync::Arc;

use monoio::net::TcpStream;
use rustls::client::{Resumption, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};

use super::certs::{self, SYSTEM_BUNDLE};
use super::verify::AcceptAnyCert;
use super::{provider, TlsError, TlsStream};
use crate::buf::BufPool;
use crate::config::{Roots, UpstreamTls};

/// Sessions remembered per worker and upstream for resumption (rustls keeps up to 8 TLS 1.3
/// tickets per server name within this).
const SESSION_CACHE: usize = 256;

/// A TLS upstream's settings. Clone per worker with [`ClientTls::for_worker`].
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// `tls.sni`, when set: sent and verified instead of the endpoint's host.
    sni: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Builds the rustls config from a checked `[[upstreams]] tls` (files already loaded;
    /// `roots = "system"` reads the system bundle here).
    pub fn new(conf: &UpstreamTls) -> Result<Self, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = if conf.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert::new(provider())))
        } else {
            let mut roots = RootCertStore::empty();
            match conf.roots {
                Roots::Webpki => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                Roots::System => {
                    let system = certs::load_certs(std::path::Path::new(SYSTEM_BUNDLE))?;
                    roots.add_parsable_certificates(system);
                }
            }
            if let Some((path, ca)) = &conf.ca {
                if ca.add_to(&mut roots) == 0 {
                    return Err(TlsError::Config(format!(
                        "{} holds no usable CA certificate",
                        path.display()
                    )));
                }
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match &conf.client_cert {
            None => builder.with_no_client_auth(),
            Some(pair) => builder
                .with_client_auth_cert(pair.loaded.key.cert.clone(), load_key(&pair.key)?)
                .map_err(|e| TlsError::Config(e.to_string()))?,
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let sni = match &conf.sni {
            Some(s) => Some(server_name(s)?),
            None => None,
        };
        Ok(ClientTls {
            config: Arc::new(config),
            sni,
        })
    }

    /// A copy with its own session cache, for one worker: resumption state stays on the core
    /// whose pool holds the connections, and no lock is shared between workers.
    pub fn for_worker(&self) -> ClientTls {
        let mut config = (*self.config).clone();
        config.resumption = Resumption::in_memory_sessions(SESSION_CACHE);
        ClientTls {
            config: Arc::new(config),
            sni: self.sni.clone(),
        }
    }

    /// The rustls config.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The name to send and verify for an endpoint ("host:port", "[v6]:port" or a bare host):
    /// `tls.sni` if set, else the endpoint's host; an IP address sends no SNI.
    pub fn server_name(&self, endpoint: &str) -> Result<ServerName<'static>, TlsError> {
        match &self.sni {
            Some(n) => Ok(n.clone()),
            None => server_name(endpoint_host(endpoint)),
        }
    }

    /// Wraps a connected socket to `endpoint`; the caller runs [`TlsStream::handshake`] under
    /// a deadline.
    pub fn connect(
        &self,
        tcp: TcpStream,
        endpoint: &str,
        pool: &BufPool,
    ) -> Result<TlsStream, TlsError> {
        let name = self.server_name(endpoint)?;
        let conn = UnbufferedClientConnection::new(self.config.clone(), name)?;
        Ok(TlsStream::client(tcp, conn, pool))
    }
}

/// The host part of "host:port", "[v6]:port", or a bare host.
pub fn endpoint_host(endpoint: &str) -> &str {
    if let Some(rest) = endpoint.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match endpoint.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((h, _)) if !h.contains(':') => h,
        _ => endpoint,
    }
}

fn server_name(s: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(s.to_string()).map_err(|_| TlsError::BadServerName(s.to_string()))
}

/// The client key again: rustls's client builder wants the DER, and the config keeps only the
/// signer built from it.
fn load_key(path: &std::path::Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_file(path)
        .map_err(|_| TlsError::Cert(certs::CertError::NoKey(path.to_path_buf())))
}
