//! TLS for both legs: rustls (aws-lc-rs provider) driven by Ringway's own small driver over the
//! worker's pool buffers.
//!
//! # Layout
//!
//! - [`certs`]: PEM certificates, keys and CA bundles, checked when the config loads.
//! - [`server`]: one rustls `ServerConfig` per TLS listener: SNI certificate choice, ALPN
//!   `http/1.1`, stateless tickets, optional client certificates.
//! - [`client`]: one rustls `ClientConfig` per TLS upstream, cloned per worker so that each
//!   worker resumes sessions from its own cache.
//! - [`stream`]: [`TlsStream`], a TCP connection speaking TLS, read and written through pool
//!   buffers; the proxy uses it where it would use a `TcpStream`.
//! - `hello`: the SNI name read from a ClientHello (rustls's unbuffered server does not expose it).
//! - `sni`: the certificate resolver.
//! - `verify`: the accept-anything verifier behind `insecure_skip_verify`.
//!
//! Splice needs kernel sockets carrying plaintext, so a userspace TLS leg always takes the copy
//! path. The seam for kernel TLS later is [`TlsStream`]: after the handshake it can hand its
//! connection to the kernel (`dangerous_into_kernel_connection`), which the unbuffered API
//! allows.

pub mod certs;
pub mod client;
mod error;
mod hello;
pub mod server;
mod sni;
pub mod stream;
mod verify;

#[cfg(test)]
pub(crate) mod testpki;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use client::ClientTls;
pub use error::TlsError;
pub use server::ServerTls;
pub use stream::TlsStream;

/// The one crypto provider every Ringway TLS config uses (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let p = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            // Libraries that build their own config (the redis client) ask rustls for the
            // process default; make it this one. Fails only if one is already installed.
            let _ = CryptoProvider::install_default(p.as_ref().clone());
            p
        })
        .clone()
}
