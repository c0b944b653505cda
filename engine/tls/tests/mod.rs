//! The driver against rustls's own blocking streams on a std thread, over loopback.
//!
//! Certificates come from [`TestPki`] (the `openssl` command, at test time). The runtime is
//! monoio's legacy driver, so that a cancelled read releases its buffer at once and
//! `pool.in_use()` can be checked right after.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};
use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

use super::certs::{self, load_pair};
use super::testpki::TestPki;
use super::{provider, ClientTls, ServerTls, TlsError, TlsStream};
use crate::buf::BufPool;
use crate::config::{
    CertPair, ClientAuth, ClientAuthMode, ListenerTls, Roots, TlsVersion, UpstreamTls,
};
use crate::runtime::deadline;

mod handshake;
mod stream;

/// Sizes every echo test moves: 1 B up to 1 MiB, around the record and slot sizes.
const SIZES: &[usize] = &[1, 100, 16_383, 16_384, 16_385, 40_000, 65_536, 1 << 20];

use crate::runtime::deadline::tests::run;

fn pool() -> BufPool {
    BufPool::new(16 * 1024, 64)
}

/// A CA with two server certificates: "api" (api.test) and "wild" (*.wild.test).
struct Certs {
    pki: TestPki,
}

impl Certs {
    fn new() -> Self {
        let pki = TestPki::new();
        pki.leaf("api", "api", &["DNS:api.test"], 30);
        pki.leaf("wild", "wild", &["DNS:*.wild.test"], 30);
        pki.leaf("alice", "alice", &[], 30);
        Certs { pki }
    }

    fn pair(&self, name: &str) -> CertPair {
        let (cert, key) = (
            self.pki.path(&format!("{name}.pem")),
            self.pki.path(&format!("{name}.key")),
        );
        let loaded = load_pair(&cert, &key).expect("load pair");
        CertPair { cert, key, loaded }
    }

    fn listener(&self, min: TlsVersion, auth: Option<ClientAuthMode>) -> ServerTls {
        let conf = ListenerTls {
            certs: vec![self.pair("api"), self.pair("wild")],
            min_version: min,
            client_auth: auth.map(|mode| ClientAuth {
                ca: self.pki.path("ca.pem"),
                roots: certs::load_ca(&self.pki.path("ca.pem")).expect("ca"),
                mode,
            }),
        };
        ServerTls::new(&conf).expect("server config")
    }

    fn upstream(&self) -> ClientTls {
        let conf = UpstreamTls {
            sni: None,
            roots: Roots::Webpki,
            ca: Some((
                self.pki.path("ca.pem"),
                certs::load_ca(&self.pki.path("ca.pem")).expect("ca"),
            )),
            client_cert: None,
            insecure_skip_verify: false,
        };
        ClientTls::new(&conf).expect("client config")
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        certs::load_ca(&self.pki.path("ca.pem"))
            .expect("ca")
            .add_to(&mut roots);
        roots
    }

    /// A blocking rustls client config trusting the test CA.
    fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
        cert: Option<&str>,
    ) -> Arc<ClientConfig> {
        let b = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(self.roots());
        let mut c = match cert {
            None => b.with_no_client_auth(),
            Some(name) => {
                let p = self.pair(name);
                let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&p.key).expect("key");
                b.with_client_auth_cert(p.loaded.key.cert.clone(), key)
                    .expect("client cert")
            }
        };
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(c)
    }

    /// A blocking rustls server config with the "api" certificate.
    fn server_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ServerConfig> {
        let p = self.pair("api");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&p.key).expect("key");
        let c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(p.loaded.key.cert.clone(), key)
            .expect("server cert");
        Arc::new(c)
    }
}

use rustls::pki_types::pem::PemObject as _;

type Peer = JoinHandle<Result<Option<String>, String>>;

/// A std-thread rustls client: handshakes with SNI `name` and echoes `sizes` through the
/// server, then sends close_notify. Returns the subject of the certificate it was shown.
fn echo_client(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &'static str,
    sizes: &'static [usize],
) -> Peer {
    std::thread::spawn(move || {
        let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let server_name = ServerName::try_from(name).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(config, server_name).map_err(|e| e.to_string())?;
        let mut s = StreamOwned::new(conn, tcp);
        for &n in sizes {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
            for chunk in data.chunks(48 * 1024) {
                s.write_all(chunk).map_err(|e| format!("write {n}: {e}"))?;
                let mut back = vec![0; chunk.len()];
                s.read_exact(&mut back)
                    .map_err(|e| format!("read {n}: {e}"))?;
                if back != chunk {
                    return Err(format!("echo of {n} bytes differs"));
                }
            }
        }
        let subject = s
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| certs::subject_of(c.as_ref()));
        s.conn.send_close_notify();
        s.flush().map_err(|e| e.to_string())?;
        drain(&mut s.sock);
        Ok(subject)
    })
}

/// Reads until the server closes, so that closing this side never resets the connection
/// while the server still reads (unread bytes at close make the kernel send RST).
fn drain(sock: &mut std::net::TcpStream) {
    let _ = std::io::copy(sock, &mut std::io::sink());
}

/// Echoes whatever the stream reads until the peer closes; returns the byte count.
async fn echo(s: &mut TlsStream, pool: &BufPool) -> Result<u64, TlsError> {
    let mut total = 0;
    loop {
        s.readable().await?;
        let mut buf = pool.acquire().await;
        let n = s.read(&mut buf, usize::MAX).await?;
        if n == 0 {
            return Ok(total);
        }
        s.write_all(&buf, 0..n).await?;
        total += n as u64;
        drop(buf);
        // Between requests the connection holds nothing (unless bytes were read ahead).
        if !s.has_buffered() {
            assert_eq!(
                s.buffers_held(),
                0,
                "an idle TLS stream holds no pool buffer"
            );
        }
    }
}

async fn accept_one(listener: &TcpListener) -> TcpStream {
    let tcp = listener.accept().await.expect("accept").0;
    // As the gateway does: a record is sent when it is ready, not held for the next ACK.
    let _ = tcp.set_nodelay(true);
    tcp
}

fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

fn join(peer: Peer) -> Result<Option<String>, String> {
    peer.join()
        .unwrap_or_else(|_| Err("peer thread panicked".into()))
}
