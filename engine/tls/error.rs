//! What can go wrong with TLS, building a config or on a connection.

use std::{fmt, io};

use crate::buf::PoolError;

use super::certs::CertError;

/// A TLS failure; on a connection, every one of them ends it.
#[derive(Debug)]
pub enum TlsError {
    /// The socket failed.
    Io(io::Error),
    /// The peer closed the TCP connection before the handshake finished.
    HandshakeEof,
    /// rustls refused the peer (bad record, alert, verification, no common ALPN or version).
    Protocol(rustls::Error),
    /// An earlier operation on this connection was cancelled (a timeout) or failed; its state
    /// is unknown, so the connection must be closed.
    Poisoned,
    /// No pool buffer could be had for the record.
    Buffers(PoolError),
    /// The peer's record or handshake message is larger than Ringway buffers.
    TooLarge(usize),
    /// Data was read or written before `handshake` completed.
    NotReady,
    /// A write after this side sent close_notify.
    Closed,
    /// A certificate, key or CA file could not be used.
    Cert(CertError),
    /// The upstream's TLS name is not a valid DNS name or IP address.
    BadServerName(String),
    /// rustls refused the configuration (e.g. a CA without a usable trust anchor).
    Config(String),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Io(e) => write!(f, "tls: socket error: {e}"),
            TlsError::HandshakeEof => f.write_str("tls: peer closed during the handshake"),
            TlsError::Protocol(e) => write!(f, "tls: {e}"),
            TlsError::Poisoned => {
                f.write_str("tls: connection unusable after a cancelled or failed operation")
            }
            TlsError::Buffers(e) => write!(f, "tls: no buffer: {e:?}"),
            TlsError::TooLarge(n) => write!(f, "tls: a {n}-byte record or message is too large"),
            TlsError::NotReady => f.write_str("tls: the handshake has not completed"),
            TlsError::Closed => f.write_str("tls: write after close_notify"),
            TlsError::Cert(e) => write!(f, "tls: {e}"),
            TlsError::BadServerName(n) => write!(f, "tls: {n:?} is not a valid server name"),
            TlsError::Config(m) => write!(f, "tls: {m}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl From<io::Error> for TlsError {
    fn from(e: io::Error) -> Self {
        TlsError::Io(e)
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Protocol(e)
    }
}

impl From<CertError> for TlsError {
    fn from(e: CertError) -> Self {
        TlsError::Cert(e)
    }
}

/// For callers that speak `io::Error` (the proxy's transfer code).
impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> Self {
        match e {
            TlsError::Io(e) => e,
            TlsError::HandshakeEof => io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()),
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}
