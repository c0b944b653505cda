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

use crate::{runtime::deadline, tls::TlsStream};
use monoio::{
    buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut},
    io::{AsyncReadRent, AsyncWriteRent},
    net::TcpStream,
    BufResult,
};

/// Longest wait for a TLS close (close_notify, then the TCP shutdown).
const TLS_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A client or upstream connection.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS in user space (rustls over pool buffers); boxed, so a plain
    /// connection's task does not carry the TLS state's size.
    Tls(Box<TlsStream>),
}

impl Stream {
    /// The TCP socket when the stream carries plaintext on it (splice and
    /// socket-level peeks need that).
    pub fn tcp_mut(&mut self) -> Option<&mut TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) => None,
        }
    }

    /// The TCP socket, read-only, when the stream carries plaintext on it.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(_) => None,
        }
    }

    /// The TLS state, for the access log and limit keys.
    pub fn tls(&self) -> Option<&TlsStream> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => Some(t),
        }
    }

    /// The TCP socket underneath (carrying ciphertext, for TLS): its
    /// readiness is what an idle connection waits on, without a buffer.
    pub fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.tcp(),
        }
    }

    /// Whether the stream is TLS (`x-forwarded-proto: https`).
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Bytes already read and decrypted but not yet consumed: a reader has
    /// something without waiting on the socket.
    pub fn has_buffered(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.has_buffered(),
        }
    }

    /// Nothing read ahead and no failed operation: the stream may wait idle in
    /// a pool (a TLS stream can hold bytes its socket no longer shows).
    pub fn is_clean(&self) -> bool {
        match self {
            Stream::Plain(_) => true,
            Stream::Tls(t) => !t.is_poisoned() && !t.has_buffered(),
        }
    }

    /// Waits until a read would make progress.
    pub async fn readable(&self, relaxed: bool) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.readable(relaxed).await,
            Stream::Tls(t) if t.has_buffered() => Ok(()),
            Stream::Tls(t) => t.tcp().readable(relaxed).await,
        }
    }

    /// Sets TCP_NODELAY on the socket underneath.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.socket().set_nodelay(on)
    }
}

impl AsRawFd for Stream {
    /// The TCP socket underneath (ciphertext, for a TLS stream).
    fn as_raw_fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }
}

// The TLS operations are boxed: inline, their state (about 900 bytes: rustls's
// record step) would size every read and write future of a plain stream too, and
// so every request's state that holds one across an await, open streams included.
// One allocation per TLS operation costs little beside its cryptography.
impl AsyncReadRent for Stream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(t) => {
                let (res, buf) = Box::pin(t.read_buf(buf)).await;
                (res.map_err(io::Error::from), buf)
            }
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.readv(buf).await,
            // Nothing here reads vectored; a TLS read fills one region.
            Stream::Tls(_) => (Err(io::ErrorKind::Unsupported.into()), buf),
        }
    }
}

impl AsyncWriteRent for Stream {
    /// On TLS, everything is encrypted and sent before this returns: a
    /// write is never short.
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.write(buf).await,
            Stream::Tls(t) => {
                // SAFETY: an IoBuf's first `bytes_init` bytes at `read_ptr` are initialised
                // and stay put while we own `buf`.
                let data = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
                let res = Box::pin(t.write_slice(data)).await.map(|()| data.len());
                (res.map_err(io::Error::from), buf)
            }
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Stream::Plain(s) => s.writev(buf).await,
            Stream::Tls(t) => {
                let all = async {
                    let mut total = 0;
                    for i in 0..buf.read_iovec_len() {
                        // SAFETY: the IoVecBuf holds `read_iovec_len` valid iovecs whose
                        // memory stays put while we own `buf`.
                        let data = unsafe {
                            let v = *buf.read_iovec_ptr().add(i);
                            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                        };
                        t.write_slice(data).await?;
                        total += data.len();
                    }
                    Ok(total)
                };
                let res = Box::pin(all)
                    .await
                    .map_err(|e: crate::tls::TlsError| e.into());
                (res, buf)
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
            Stream::Tls(_) => Ok(()),
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.shutdown().await,
            // close_notify is a courtesy: a peer that stopped reading must not hold
            // the task (and a buffer) past a second.
            Stream::Tls(t) => match Box::pin(deadline::timeout(TLS_CLOSE_WAIT, t.shutdown())).await
            {
                Ok(r) => r.map_err(io::Error::from),
                Err(_) => Err(io::ErrorKind::TimedOut.into()),
            },
        }
    }
}
