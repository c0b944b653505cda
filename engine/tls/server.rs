//! The rustls server configuration of one TLS listener.

use std::sync::{Arc, OnceLock};

use monoio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::server::{NoServerSessionStorage, ProducesTickets, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use super::sni::SniResolver;
use super::{provider, TlsError, TlsStream};
use crate::buf::BufPool;
use crate::config::{ClientAuthMode, ListenerTls, TlsVersion};

/// A TLS listener's settings, built once per config and shared by every worker.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    /// `client_auth` with mode "required".
    requires_client_cert: bool,
    /// `client_auth` is on (optional or required).
    verifies_clients: bool,
}

impl ServerTls {
    /// Builds the rustls config from a checked `[listeners.tls]` (files already loaded).
    pub fn new(conf: &ListenerTls) -> Result<Self, TlsError> {
        let versions: &[&'static rustls::SupportedProtocolVersion] = match conf.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &conf.client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => {
                let mut roots = RootCertStore::empty();
                if auth.roots.add_to(&mut roots) == 0 {
                    return Err(TlsError::Config(format!(
                        "{} holds no usable CA certificate",
                        auth.ca.display()
                    )));
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let v = match auth.mode {
                    ClientAuthMode::Optional => v.allow_unauthenticated(),
                    ClientAuthMode::Required => v,
                };
                let verifier = v.build().map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let resolver = SniResolver::new(
            conf.certs
                .iter()
                .map(|c| (c.loaded.key.clone(), c.loaded.names.clone()))
                .collect(),
        )
        .ok_or_else(|| TlsError::Config("a TLS listener needs a certificate".into()))?;
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        // Ringway speaks HTTP/1.1 only: a client offering only h2 is refused with
        // no_application_protocol instead of failing later on a protocol it cannot speak.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // A resumed session keeps the client certificate it was issued with, unchecked
        // (rustls restores it from the ticket). So a listener that verifies client
        // certificates gets a ticket key of its own, new on every build: tickets from another
        // listener, or from before a reload that changed `client_auth`, never resume on it.
        config.ticketer = match &conf.client_auth {
            None => ticketer()?,
            Some(_) => rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| TlsError::Config(e.to_string()))?,
        };
        // Tickets carry the session; a server-side cache would be one Mutex shared by every
        // worker, and SO_REUSEPORT sends a client's reconnect to any worker anyway.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(ServerTls {
            config: Arc::new(config),
            requires_client_cert: conf
                .client_auth
                .as_ref()
                .is_some_and(|a| a.mode == ClientAuthMode::Required),
            verifies_clients: conf.client_auth.is_some(),
        })
    }

    /// Whether every client must present a verified certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.requires_client_cert
    }

    /// The rustls config (shared; cheap to clone).
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Wraps an accepted socket; the caller runs [`TlsStream::handshake`] under a deadline.
    pub fn accept(&self, tcp: TcpStream, pool: &BufPool) -> Result<TlsStream, TlsError> {
        let conn = UnbufferedServerConnection::new(self.config.clone())?;
        // A client sending its certificate chain may need the full room; one that sends
        // none never does.
        let limit = if self.verifies_clients {
            super::stream::MAX_INCOMING
        } else {
            super::stream::PRE_AUTH_INCOMING
        };
        Ok(TlsStream::server(tcp, conn, pool, limit))
    }
}

/// One ticket key rotator for the listeners without client certificates: every worker and
/// every reload share it, so a ticket issued by one worker resumes on any other, and tickets
/// outlive a reload (such tickets carry no client identity).
fn ticketer() -> Result<Arc<dyn ProducesTickets>, TlsError> {
    static TICKETER: OnceLock<Result<Arc<dyn ProducesTickets>, String>> = OnceLock::new();
    TICKETER
        .get_or_init(|| rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string()))
        .clone()
        .map_err(TlsError::Config)
}
