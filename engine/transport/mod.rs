//! The byte streams under the HTTP/1.1 code: plain TCP or TLS, behind one
//! type, so the codec, transfers, the AI relay and tunnels are written once.
//!
//! What differs stays here: splice needs kernel sockets carrying plaintext
//! ([`Stream::tcp_mut`] is `Some` only for those), and readiness on a TLS
//! stream also counts plaintext already decrypted. Kernel TLS, where it
//! exists, would be one more variant that hands out its socket for splice.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
};

use monoio::{
    buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut},
    io::{AsyncReadRent, AsyncWriteRent},
    net::TcpStream,
    BufResult,
};

/// A client or upstream connection.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
}

impl Stream {
    /// The TCP socket when the stream carries plaintext on it (splice and
    /// socket-level peeks need that).
    pub fn tcp_mut(&mut self) -> Option<&mut TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
        }
    }

    /// The TCP socket, read-only, when the stream carries plaintext on it.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
        }
    }

    /// The TCP socket underneath (carrying ciphertext, for TLS): its
    /// readiness is what an idle connection waits on, without a buffer.
    pub fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
        }
    }

    /// Whether the stream is TLS (`x-forwarded-proto: https`).
    pub fn is_tls(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
        }
    }

    /// Bytes already read and decrypted but not yet consumed: a reader has
    /// something without waiting on the socket.
    pub fn has_buffered(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
        }
    }

    /// Waits until a read would make progress.
    pub async fn readable(&self, relaxed: bool) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.readable(relaxed).await,
        }
    }

    /// Sets TCP_NODELAY on the socket underneath.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_nodelay(on),
        }
    }
}

impl AsRawFd for Stream {
    /// The TCP socket underneath (ciphertext, for a TLS stream).
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Plain(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncReadRent for Stream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for Stream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.shutdown().await,
        }
    }
}
