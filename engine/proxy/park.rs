//! A request's bytes kept outside the buffer pool while it waits for its upstream
//! connection.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use crate::buf::{BufPool, PoolBuf};

/// Longest run of bytes [`parked_during`] moves out of a pool buffer.
pub(super) const PARK_MAX: usize = 4096;

/// A request's bytes: in their pool buffer, or parked outside the pool.
pub(super) enum Kept {
    /// Still in the buffer they were read into.
    Buf(PoolBuf),
    /// `bytes` were `buf[at..]` of a buffer of `pool`, given back.
    Parked {
        pool: BufPool,
        bytes: Box<[u8]>,
        at: usize,
    },
}

/// Runs `wait`. When it does not finish at its first poll (a new connection, a queue for a
/// connection slot, a TLS handshake), `kept`'s bytes from `from` on, up to [`PARK_MAX`], move
/// into an allocation of their own size and the buffer goes back to the pool while `wait`
/// runs. A burst of new requests then holds pool buffers only while each is read and sent,
/// not through the round trips of thousands of connects (2,000 streams opened at once: 1,800
/// buffers, and the page each touched, held at the peak). A connection from the idle list
/// comes at the first poll, so a request that gets one copies nothing.
///
/// A future of its own rather than an `async fn`: one would keep `wait` in its state twice
/// (as the argument and as the pinned local), and every request awaits this.
pub(super) fn parked_during<F: Future>(
    kept: &mut Kept,
    from: usize,
    wait: F,
) -> ParkedDuring<'_, F> {
    ParkedDuring { wait, kept, from }
}

/// The future of [`parked_during`].
pub(super) struct ParkedDuring<'a, F> {
    wait: F,
    kept: &'a mut Kept,
    from: usize,
}

impl<F: Future> Future for ParkedDuring<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: `wait` is pinned with `self`: it is never moved out or handed out unpinned,
        // this type has no `Drop` and is not `Unpin` unless `F` is.
        let this = unsafe { self.get_unchecked_mut() };
        let wait = unsafe { Pin::new_unchecked(&mut this.wait) };
        let polled = wait.poll(cx);
        if polled.is_pending() {
            this.kept.park(this.from);
        }
        polled
    }
}

/// `buf[from..]` parked, when it is short and the buffer a single slot (so a buffer taken
/// later holds it at the same offsets).
fn parked(buf: &PoolBuf, from: usize) -> Option<Kept> {
    let pool = buf.pool();
    let bytes = buf.get(from..)?;
    (bytes.len() <= PARK_MAX && buf.capacity() == pool.slot_size()).then(|| Kept::Parked {
        pool,
        bytes: bytes.into(),
        at: from,
    })
}

impl Kept {
    /// Moves `buf[from..]` out of the pool now, when it is short and the buffer a single
    /// slot (see [`parked_during`]); otherwise, or when already parked, nothing changes.
    pub(super) fn park(&mut self, from: usize) {
        if let Kept::Buf(b) = self {
            if let Some(parked) = parked(b, from) {
                // The buffer goes back to the pool as the old value drops.
                *self = parked;
            }
        }
    }

    /// The filled length of the buffer they are (or were) in: where they start plus their length.
    pub(super) fn len(&self) -> usize {
        match self {
            Kept::Buf(b) => b.len(),
            Kept::Parked { bytes, at, .. } => at + bytes.len(),
        }
    }

    /// The bytes in a pool buffer again (see [`Kept::into_buffer`]), here.
    pub(super) async fn in_pool(&mut self, limit: Duration) -> Option<&mut PoolBuf> {
        if let Kept::Parked { pool, bytes, at } = self {
            let b = bytes_in_buffer(pool, bytes, *at, limit).await?;
            *self = Kept::Buf(b);
        }
        match self {
            Kept::Buf(b) => Some(b),
            Kept::Parked { .. } => None,
        }
    }

    /// The bytes in a pool buffer again, at the offsets they had. Waits up to `limit` for
    /// a buffer, as any reader does; `None` when none came.
    pub(super) async fn into_buffer(self, limit: Duration) -> Option<PoolBuf> {
        match self {
            Kept::Buf(b) => Some(b),
            Kept::Parked { pool, bytes, at } => bytes_in_buffer(&pool, &bytes, at, limit).await,
        }
    }
}

/// A buffer of `pool` holding `bytes` at offset `at` (what precedes them is zeros); waits up
/// to `limit` for one, and is `None` when none came or they do not fit.
pub(super) async fn bytes_in_buffer(
    pool: &BufPool,
    bytes: &[u8],
    at: usize,
    limit: Duration,
) -> Option<PoolBuf> {
    const ZEROS: [u8; 256] = [0; 256];
    let mut b = pool.acquire_within(at + bytes.len(), limit).await.ok()?;
    b.clear();
    let mut left = at;
    while left > 0 {
        let k = left.min(ZEROS.len());
        b.put(&ZEROS[..k]).ok()?;
        left -= k;
    }
    b.put(bytes).ok()?;
    Some(b)
}
