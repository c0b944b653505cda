//! The byte streams under the HTTP/1.1 code: plain TCP or TLS, behind one
//! type, so the codec, transfers, the AI relay and tunnels are written once.
//!
//! What differs stays here: splice needs kernel sockets carrying plaintext
//! ([`Stream::tcp_mut`] is `Some` only for those), and readiness on a TLS
//! stream also counts plaintext already decrypted. Kernel TLS, where it
//! exists, would be one more variant that hands out its socket for splice.

use std::{
    future::Future,
    io,
    os::fd::{AsRawFd, RawFd},
};

use crate::{
    runtime::{deadline, either::Either},
    tls::TlsStream,
};
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

impl Stream {
    /// Writes all of `buf` (a TLS write is never short). Found before monoio's
    /// `AsyncWriteRentExt::write_all`, which holds `buf` twice and the write's future
    /// beside it: this one holds only the write in flight, in every future that awaits it.
    #[allow(clippy::manual_async_fn)]
    pub fn write_all<T: IoBuf>(
        &mut self,
        buf: T,
    ) -> impl Future<Output = BufResult<usize, T>> + use<'_, T> {
        async move {
            let len = buf.bytes_init();
            let mut buf = buf;
            let mut written = 0;
            while written < len {
                let (res, slice) = self.write(buf.slice(written..len)).await;
                buf = slice.into_inner();
                match res {
                    Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                    Ok(n) => written += n,
                    Err(e) => return (Err(e), buf),
                }
            }
            (Ok(written), buf)
        }
    }
}

// A plain stream's operation is the `Left` future, a TLS stream's the `Right` one.
// The TLS operations are boxed: inline, their state (about 900 bytes: rustls's
// record step) would size every read and write future of a plain stream too, and
// so every request's state that holds one across an await, open streams included.
// One allocation per TLS operation costs little beside its cryptography.
impl AsyncReadRent for Stream {
    // Not an `async fn`: that would hold `buf` a second time beside the operation that
    // owns it, in every future awaiting a read.
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        match self {
            Stream::Plain(s) => Either::Left { f: s.read(buf) },
            Stream::Tls(t) => Either::Right {
                f: Box::pin(async move {
                    let (res, buf) = t.read_buf(buf).await;
                    (res.map_err(io::Error::from), buf)
                }),
            },
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
    // Not an `async fn`, as `read`.
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        match self {
            Stream::Plain(s) => Either::Left { f: s.write(buf) },
            Stream::Tls(t) => Either::Right {
                f: Box::pin(async move {
                    // SAFETY: an IoBuf's first `bytes_init` bytes at `read_ptr` are
                    // initialised and stay put while we own `buf`.
                    let data =
                        unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
                    let res = t.write_slice(data).await.map(|()| data.len());
                    (res.map_err(io::Error::from), buf)
                }),
            },
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

#[cfg(test)]
mod tests {
    use super::Stream;
    use monoio::{
        io::AsyncReadRent,
        net::{TcpListener, TcpStream},
        IoUringDriver, LegacyDriver, RuntimeBuilder,
    };

    /// Writes 8 MiB through `Stream::write_all` to a peer reading 4 KiB at a time (so
    /// the socket fills and writes come back short), and checks every byte, the count
    /// and the buffer handed back.
    async fn a_large_write_arrives_whole() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = l.local_addr().expect("local addr");
        let c = TcpStream::connect(addr).await.expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let want = data.clone();
        let reader = monoio::spawn(async move {
            let mut s = Stream::Plain(s);
            let mut got = Vec::with_capacity(8 << 20);
            let mut buf = vec![0u8; 4096];
            loop {
                buf.clear();
                let (r, b) = s.read(buf).await;
                buf = b;
                match r.expect("read") {
                    0 => break got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut c = Stream::Plain(c);
        let (r, back) = c.write_all(data).await;
        assert_eq!(r.expect("write_all"), 8 << 20);
        assert_eq!(back.len(), 8 << 20, "the buffer comes back whole");
        drop(c);
        let got = reader.await;
        assert!(
            got == want,
            "{} bytes arrived, not the 8 MiB written",
            got.len()
        );
    }

    #[test]
    fn write_all_writes_everything_on_io_uring() {
        match RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            Ok(mut rt) => rt.block_on(a_large_write_arrives_whole()),
            Err(e) => eprintln!("no io_uring here ({e}): skipped"),
        }
    }

    #[test]
    fn write_all_writes_everything_on_epoll() {
        let mut rt = RuntimeBuilder::<LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("epoll runtime");
        rt.block_on(a_large_write_arrives_whole());
    }
}
