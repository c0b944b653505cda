//! A rewritten head and a body (pooled, or parked on the heap) that leave in
//! one `writev`, so an edited request costs one write instead of two.
//!
//! Write it with [`HeadAndBody::write_all`], not monoio's
//! `write_vectored_all`: that one hands the ring only a copy of the iovecs
//! and keeps the buffers in its own future, so a timeout that drops the
//! future frees them while the kernel may still read them. Here the
//! operation owns the buffers until it completes.

use monoio::io::AsyncWriteRent;

use super::PoolBuf;

/// Bytes whose address holds while the value lives and is not mutated: a heap
/// block owned by the value, so a write in flight may point into it.
///
/// # Safety
/// `deref` must return the same pointer and length for as long as the value is
/// neither dropped nor mutated, wherever the value itself moves.
pub unsafe trait StableBytes: std::ops::Deref<Target = [u8]> + Unpin + 'static {}

// SAFETY: a pool buffer's memory is its own Vec's heap block.
unsafe impl StableBytes for PoolBuf {}
// SAFETY: a boxed slice's memory is its heap block.
unsafe impl StableBytes for Box<[u8]> {}

/// Owns both buffers while the write is in flight.
pub struct HeadAndBody<B: StableBytes> {
    head: Vec<u8>,
    body: B,
    /// On the heap, so its address holds while the runtime owns the value.
    iov: Box<[libc::iovec; 2]>,
}

impl<B: StableBytes> HeadAndBody<B> {
    /// `head` then `body[..]`.
    pub fn new(head: Vec<u8>, body: B) -> Self {
        let iov = Box::new([
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut libc::c_void,
                iov_len: body.len(),
            },
        ]);
        Self { head, body, iov }
    }

    /// Bytes not yet written.
    pub fn remaining(&self) -> usize {
        self.iov.iter().map(|v| v.iov_len).sum()
    }

    /// Drops the first `n` bytes (a partial write).
    fn advance(&mut self, mut n: usize) {
        for v in self.iov.iter_mut() {
            let k = n.min(v.iov_len);
            v.iov_base = (v.iov_base as *mut u8).wrapping_add(k) as *mut libc::c_void;
            v.iov_len -= k;
            n -= k;
        }
    }

    /// Writes everything, resubmitting after partial writes; the buffers come
    /// back either way, so a failed request can be sent again elsewhere.
    pub async fn write_all<W: AsyncWriteRent>(
        mut self,
        w: &mut W,
    ) -> (std::io::Result<usize>, (Vec<u8>, B)) {
        let total = self.remaining();
        while self.remaining() > 0 {
            let (r, back) = w.writev(self).await;
            self = back;
            match r {
                Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), self.into_parts()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), self.into_parts()),
            }
        }
        (Ok(total), self.into_parts())
    }

    /// The head and the body, whole again (the write position is forgotten).
    fn into_parts(self) -> (Vec<u8>, B) {
        (self.head, self.body)
    }
}

// SAFETY: both iovecs point into heap blocks this value owns (the Vec's and
// the body's, `StableBytes`), which neither move nor change while it lives:
// nothing mutates `head` or `body` after `new`, and `advance` only moves the
// pointers forward within them. The iovec array itself is boxed.
unsafe impl<B: StableBytes> monoio::buf::IoVecBuf for HeadAndBody<B> {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        // Keep the fields alive and read: they back the pointers above.
        let _ = (&self.head, &self.body);
        self.iov.len()
    }
}

#[cfg(test)]
mod tests {
    use super::HeadAndBody;
    use crate::buf::BufPool;
    use monoio::io::AsyncReadRentExt;

    #[monoio::test(driver = "legacy", enable_timer = true)]
    async fn head_and_body_arrive_whole_and_in_order() {
        let l = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let pool = BufPool::new(64 * 1024, 4);
        let mut body = pool.try_acquire().expect("a buffer");
        let payload: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
        body.put(&payload).expect("fits");
        let head = b"POST / HTTP/1.1\r\ncontent-length: 60000\r\n\r\n".to_vec();
        let want: Vec<u8> = head.iter().chain(payload.iter()).copied().collect();
        let reader = monoio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let (r, got) = s.read_exact(vec![0u8; want.len()]).await;
            r.expect("read");
            assert_eq!(got, want);
        });
        let mut c = monoio::net::TcpStream::connect(addr)
            .await
            .expect("connect");
        let buf = HeadAndBody::new(head, body);
        assert_eq!(buf.remaining(), 42 + 60_000);
        let (r, (head, body)) = buf.write_all(&mut c).await;
        assert_eq!(r.expect("writev"), 42 + 60_000);
        assert_eq!((head.len(), body.len()), (42, 60_000));
        reader.await;
    }

    #[test]
    fn a_partial_write_moves_across_both_buffers() {
        let pool = BufPool::new(1024, 1);
        let mut body = pool.try_acquire().expect("a buffer");
        body.put(b"world").expect("fits");
        let mut buf = HeadAndBody::new(b"hello ".to_vec(), body);
        buf.advance(4);
        assert_eq!(buf.remaining(), 7);
        buf.advance(3);
        assert_eq!(buf.iov[0].iov_len, 0);
        // SAFETY: the second iovec points into `body`, 1 byte in, 4 bytes long.
        let rest = unsafe { std::slice::from_raw_parts(buf.iov[1].iov_base as *const u8, 4) };
        assert_eq!(rest, b"orld");
    }
}
