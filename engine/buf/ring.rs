//! A worker's provided-buffer ring (io_uring, Linux 5.19+): a few pool buffers
//! lent to the kernel, which fills one only when a receive's data arrives.
//!
//! A connection waiting for bytes then holds no buffer and needs no readiness
//! wait before its read: one ring operation where a poll and a receive were
//! two. The ring is refilled from the pool as its buffers are taken, so it
//! costs a fixed few buffers per worker, never one per connection. Where the
//! driver is epoll, the kernel has no rings, or the ring is empty (the pool
//! is spent), callers keep the readiness wait.

use std::{
    alloc::Layout,
    cell::{Cell, RefCell},
    future::Future,
    io,
    os::fd::RawFd,
    pin::Pin,
    ptr::NonNull,
    rc::{Rc, Weak},
    sync::atomic::{AtomicU16, Ordering},
    task::{Context, Poll, Waker},
};

use monoio::{buf::provided, net::TcpStream};

use super::{BufPool, PoolBuf};

/// The buffer group id; each worker has its own io_uring, so one group each.
const GROUP: u16 = 0;
/// Most buffers a ring lends out: enough for a burst of completions between
/// two refills, small beside any pool.
const MAX_ENTRIES: usize = 64;
/// Size of one `io_uring_buf` slot: address, length, id, and a reserved field
/// that, in slot 0, is the ring's tail.
const SLOT: usize = 16;
/// The kernel wants the ring page-aligned.
const PAGE: usize = 4096;
/// What a buffer's head room is filled with before the kernel writes after it.
const ZEROS: [u8; 1024] = [0; 1024];

/// What a receive through the ring gave.
pub enum Received {
    /// Bytes, in a buffer that is the caller's now: the head room, then the data.
    Data(PoolBuf),
    /// The peer closed its side.
    Eof,
    /// The ring was empty (the pool is spent): wait for readiness and a pool buffer instead.
    NoBuffer,
    /// The receive failed.
    Failed(io::Error),
}

/// A worker's ring; it lives as long as the worker, on the worker's thread. Cheap to
/// clone (two `Rc`s): the upstream pools hold it too.
#[derive(Clone)]
pub struct RecvRing {
    inner: Rc<RingInner>,
    /// Handed to every receive: a buffer filled for a receive nobody awaits
    /// anymore (a timed-out idle connection) goes back into the ring.
    orphan: provided::OrphanBuffer,
}

struct RingInner {
    /// `entries` slots of `SLOT` bytes, shared with the kernel.
    mem: NonNull<u8>,
    layout: Layout,
    mask: u16,
    /// Our copy of the tail; the kernel sees it once published.
    tail: Cell<u16>,
    /// The buffer lent under each id, `None` while the caller has it or the pool had none.
    slots: RefCell<Vec<Option<PoolBuf>>>,
    /// Ids left empty because the pool was spent when they were to be refilled.
    empty: RefCell<Vec<u16>>,
    /// Buffers lent to the kernel now.
    held: Cell<usize>,
    /// Receives that completed with data, since start (for /stats).
    received: Cell<u64>,
    /// Receives that found the ring empty (`Received::NoBuffer`), since start.
    dry: Cell<u64>,
    /// Reads tried straight on a socket found readable after the ring ran dry, since start.
    dry_reads: Cell<u64>,
    pool: BufPool,
    headroom: usize,
}

impl RecvRing {
    /// Ring size for a pool of `buffers`: a sixteenth of it, a power of two,
    /// 1 to 64, so a small pool keeps most of its buffers for requests.
    pub fn entries_for(buffers: usize) -> usize {
        let want = (buffers / 16).clamp(1, MAX_ENTRIES);
        // The largest power of two not above `want`.
        1 << (usize::BITS - 1 - want.leading_zeros())
    }

    /// Registers a ring on the current thread's io_uring and fills it from
    /// `pool`; every buffer it hands out starts with `headroom` zero bytes,
    /// the data after them. Fails on the epoll driver and on kernels without
    /// buffer rings (older than 5.19).
    pub fn register(pool: &BufPool, headroom: usize) -> io::Result<RecvRing> {
        if !provided::supported() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the epoll driver has no buffer rings",
            ));
        }
        if headroom > ZEROS.len() || headroom >= pool.slot_size() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the head room does not fit a buffer",
            ));
        }
        let entries = Self::entries_for(pool.capacity());
        let layout = Layout::from_size_align(entries * SLOT, PAGE)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let mem = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or(io::ErrorKind::OutOfMemory)?;
        // SAFETY: `mem` is page-aligned and holds `entries` zeroed slots; it is freed
        // only after the group is unregistered (or never, see `Drop`). `entries` is a
        // power of two no larger than 64, so the cast is exact.
        if let Err(e) =
            unsafe { provided::register_buf_ring(mem.as_ptr() as u64, entries as u16, GROUP) }
        {
            // SAFETY: allocated above with this layout and never shared.
            unsafe { std::alloc::dealloc(mem.as_ptr(), layout) };
            return Err(e);
        }
        pool.add_ring_slots(entries);
        let inner = Rc::new(RingInner {
            mem,
            layout,
            mask: (entries - 1) as u16,
            tail: Cell::new(0),
            slots: RefCell::new((0..entries).map(|_| None).collect()),
            empty: RefCell::new(Vec::new()),
            held: Cell::new(0),
            received: Cell::new(0),
            dry: Cell::new(0),
            dry_reads: Cell::new(0),
            pool: pool.clone(),
            headroom,
        });
        for id in 0..entries as u16 {
            inner.lend_new(id);
        }
        inner.publish();
        let weak: Weak<RingInner> = Rc::downgrade(&inner);
        let orphan: provided::OrphanBuffer = Rc::new(move |id| {
            if let Some(ring) = weak.upgrade() {
                ring.relend(id);
            }
        });
        Ok(RecvRing { inner, orphan })
    }

    /// Buffers the ring can lend (its size).
    pub fn entries(&self) -> usize {
        usize::from(self.inner.mask) + 1
    }

    /// Zero bytes in front of the data in every buffer a receive gives.
    pub fn headroom(&self) -> usize {
        self.inner.headroom
    }

    /// Buffers lent to the kernel now: part of the pool's use, but no connection's.
    pub fn held(&self) -> usize {
        self.inner.held.get()
    }

    /// Since start: receives completed with data, receives that found the ring empty, and
    /// the reads those waits then tried themselves once readable ([`recv_now`](Self::recv_now),
    /// counted whether or not bytes were there). Every wait that went through the ring ended
    /// in a receive or in one of those reads.
    pub fn receives(&self) -> (u64, u64, u64) {
        let r = &self.inner;
        (r.received.get(), r.dry.get(), r.dry_reads.get())
    }

    /// The ring ran dry and the socket `fd` is readable: its bytes are taken into `buf` at
    /// once (see [`PoolBuf::recv_now`]). Counted as tried, whether or not bytes were there.
    pub fn recv_now(&self, buf: &mut PoolBuf, fd: RawFd) -> io::Result<Option<usize>> {
        self.inner.dry_reads.set(self.inner.dry_reads.get() + 1);
        buf.recv_now(fd)
    }

    /// Receives on `tcp` into a buffer the kernel takes from the ring when data arrives.
    /// The receive is in the kernel from this call on, whether or not the future is
    /// polled: an idle pooled connection keeps one armed, so a close or stray bytes show
    /// as a completed receive, and the same receive then reads the answer.
    pub fn recv(&self, tcp: &TcpStream) -> RingRecv {
        self.inner.refill();
        RingRecv {
            op: tcp.recv_select(GROUP, self.orphan.clone()),
            ring: self.inner.clone(),
        }
    }
}

/// A receive through the ring (see [`RecvRing::recv`]).
pub struct RingRecv {
    op: provided::RecvSelectFuture,
    ring: Rc<RingInner>,
}

impl RingRecv {
    /// What the receive gave, if it has completed; never waits.
    pub fn try_now(&mut self) -> Option<Received> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(self).poll(&mut cx) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }
}

impl Future for RingRecv {
    type Output = Received;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Received> {
        let (res, id) = std::task::ready!(Pin::new(&mut self.op).poll(cx));
        // A buffer taken comes out of the ring whatever the result, or it would be lost.
        let buf = id.and_then(|id| self.ring.take(id));
        Poll::Ready(match (res, buf) {
            (Ok(0), _) => Received::Eof,
            (Ok(n), Some(mut b)) => {
                let len = self.ring.headroom + n;
                if len > b.capacity() {
                    return Poll::Ready(Received::Failed(io::Error::other(
                        "a receive overran its buffer",
                    )));
                }
                // SAFETY: the head room was written when the buffer was lent, and the
                // kernel wrote `n` bytes right after it.
                unsafe { b.assume_filled(len) };
                self.ring.received.set(self.ring.received.get() + 1);
                Received::Data(b)
            }
            (Ok(_), None) => {
                Received::Failed(io::Error::other("a receive came back without its buffer"))
            }
            (Err(e), _) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                self.ring.dry.set(self.ring.dry.get() + 1);
                Received::NoBuffer
            }
            (Err(e), _) => Received::Failed(e),
        })
    }
}

impl RingInner {
    /// Lends a fresh pool buffer under `id`, or notes the id empty when the pool is spent
    /// or requests wait for buffers: under pressure the ring shrinks, and a receive that
    /// finds it empty waits in the pool's queue like any request (`Received::NoBuffer`).
    fn lend_new(&self, id: u16) {
        let fresh = if self.pool.has_waiters() {
            None
        } else {
            self.pool.try_acquire()
        };
        match fresh {
            Some(mut b) => {
                b.clear();
                let _ = b.put(&ZEROS[..self.headroom]);
                self.lend(id, b);
            }
            None => self.empty.borrow_mut().push(id),
        }
    }

    /// Writes `b`'s slot at the tail; the kernel sees it at the next `publish`.
    fn lend(&self, id: u16, mut b: PoolBuf) {
        let addr = b.as_mut_ptr().wrapping_add(self.headroom) as u64;
        let len = u32::try_from(b.capacity() - self.headroom).unwrap_or(u32::MAX);
        let tail = self.tail.get();
        let at = usize::from(tail & self.mask) * SLOT;
        // SAFETY: `at + 14` is inside the ring (slot index masked below `entries`), the
        // memory is 16-byte aligned, and the kernel does not read a slot past the
        // published tail. The reserved field at +14 is left alone: in slot 0 it is the tail.
        unsafe {
            let slot = self.mem.as_ptr().add(at);
            slot.cast::<u64>().write(addr);
            slot.add(8).cast::<u32>().write(len);
            slot.add(12).cast::<u16>().write(id);
        }
        self.slots.borrow_mut()[usize::from(id)] = Some(b);
        self.held.set(self.held.get() + 1);
        self.tail.set(tail.wrapping_add(1));
    }

    /// Shows the kernel every slot written so far.
    fn publish(&self) {
        // SAFETY: the tail is the u16 at offset 14 of the page-aligned ring, which the
        // kernel reads atomically; nothing else writes it.
        let tail = unsafe { AtomicU16::from_ptr(self.mem.as_ptr().add(14).cast::<u16>()) };
        tail.store(self.tail.get(), Ordering::Release);
    }

    /// The buffer the kernel filled under `id`, now the caller's; a new one takes its place.
    fn take(&self, id: u16) -> Option<PoolBuf> {
        let b = self.slots.borrow_mut().get_mut(usize::from(id))?.take()?;
        self.held.set(self.held.get() - 1);
        self.lend_new(id);
        self.publish();
        Some(b)
    }

    /// Lends `id`'s buffer again: the kernel filled it for a receive nobody awaits.
    fn relend(&self, id: u16) {
        let taken = self
            .slots
            .borrow_mut()
            .get_mut(usize::from(id))
            .and_then(Option::take);
        if let Some(b) = taken {
            self.held.set(self.held.get() - 1);
            self.lend(id, b);
            self.publish();
        }
    }

    /// Lends buffers under the ids left empty while the pool was spent.
    fn refill(&self) {
        if self.empty.borrow().is_empty() {
            return;
        }
        let ids = std::mem::take(&mut *self.empty.borrow_mut());
        for id in ids {
            self.lend_new(id);
        }
        self.publish();
    }
}

impl Drop for RingInner {
    fn drop(&mut self) {
        if provided::unregister_buf_ring(GROUP).is_ok() {
            // SAFETY: allocated in `register` with this layout; the kernel let go of it.
            unsafe { std::alloc::dealloc(self.mem.as_ptr(), self.layout) };
        } else {
            // The runtime is gone or refused: the kernel may still point at the ring
            // and its buffers, so both stay allocated (this happens only at exit).
            for b in self.slots.get_mut().drain(..).flatten() {
                std::mem::forget(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::{io::AsyncWriteRentExt, net::TcpListener, IoUringDriver, RuntimeBuilder};

    /// Runs `f` on an io_uring runtime with a ring over a pool of `buffers`; `None` where
    /// this kernel has no io_uring or no buffer rings (the readiness path is tested then).
    fn with_ring<F, Fut>(buffers: usize, f: F) -> Option<()>
    where
        F: FnOnce(BufPool, RecvRing) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut rt = RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()
            .ok()?;
        rt.block_on(async move {
            let pool = BufPool::new(4096, buffers);
            let ring = match RecvRing::register(&pool, 64) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("no buffer ring here ({e}): skipped");
                    return None;
                }
            };
            f(pool, ring).await;
            Some(())
        })
    }

    /// A connected pair over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = l.local_addr().expect("local addr");
        let c = TcpStream::connect(addr).await.expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    #[test]
    fn sizes_follow_the_pool() {
        assert_eq!(RecvRing::entries_for(16), 1);
        assert_eq!(RecvRing::entries_for(256), 16);
        assert_eq!(RecvRing::entries_for(300), 16);
        assert_eq!(RecvRing::entries_for(4096), 64);
        assert_eq!(RecvRing::entries_for(1), 1);
    }

    #[test]
    fn receives_land_after_the_head_room_and_the_ring_refills() {
        with_ring(64, |pool, ring| async move {
            assert_eq!(ring.entries(), 4);
            assert_eq!(ring.held(), 4);
            assert_eq!(
                pool.in_use(),
                4,
                "the ring's buffers count against the pool"
            );
            let (mut c, s) = pair().await;
            for round in 0..10u8 {
                let msg = vec![b'a' + round; 100 + usize::from(round)];
                let (r, _) = c.write_all(msg.clone()).await;
                r.expect("write");
                match ring.recv(&s).await {
                    Received::Data(b) => {
                        assert_eq!(&b[..64], &[0u8; 64][..], "the head room stays zeroed");
                        assert_eq!(&b[64..], &msg[..]);
                    }
                    _ => panic!("round {round}: no data"),
                }
                assert_eq!(ring.held(), 4, "a taken buffer is replaced at once");
            }
            assert_eq!(
                pool.in_use(),
                4,
                "every received buffer went back to the pool"
            );
            drop(c);
            assert!(matches!(ring.recv(&s).await, Received::Eof));
            assert_eq!(ring.held(), 4);
        })
        .unwrap_or_else(|| eprintln!("skipped: no buffer ring"));
    }

    #[test]
    fn a_dropped_receive_gives_its_buffer_back() {
        with_ring(64, |pool, ring| async move {
            let (mut c, s) = pair().await;
            {
                // Polled once (submitted), then dropped before any byte arrives.
                let recv = ring.recv(&s);
                let r = monoio::time::timeout(std::time::Duration::from_millis(20), recv).await;
                assert!(r.is_err(), "nothing was sent yet");
            }
            // The cancel reached the kernel before these bytes: the next receive gets them.
            let (r, _) = c.write_all(b"late".to_vec()).await;
            r.expect("write");
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            match ring.recv(&s).await {
                Received::Data(b) => assert_eq!(&b[64..], b"late"),
                _ => panic!("no data"),
            }
            assert_eq!(ring.held(), 4, "the ring is whole again");
            assert_eq!(pool.in_use(), 4);
        })
        .unwrap_or_else(|| eprintln!("skipped: no buffer ring"));
    }

    #[test]
    fn a_receive_completed_but_never_awaited_gives_its_buffer_back() {
        with_ring(64, |pool, ring| async move {
            let (mut c, s) = pair().await;
            // Boxed, so that dropping it below drops the receive itself.
            let mut recv = Box::pin(ring.recv(&s));
            // Polled once, so the receive is in the kernel; nothing to read yet.
            let r = monoio::time::timeout(std::time::Duration::from_millis(5), &mut recv).await;
            assert!(r.is_err());
            let (r, _) = c.write_all(b"taken".to_vec()).await;
            r.expect("write");
            // The runtime reaps the completion (a buffer taken) while this sleeps.
            monoio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(recv);
            assert_eq!(ring.held(), 4);
            assert_eq!(pool.in_use(), 4);
            // Four receives in one batch, their bytes already there: each needs a buffer
            // of the ring at once, so a buffer lost above would make one fail.
            let mut pairs = Vec::new();
            for i in 0..4u8 {
                let (mut c, s) = pair().await;
                let (r, _) = c.write_all(vec![b'0' + i; 10]).await;
                r.expect("write");
                pairs.push((c, s));
            }
            monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            let got = monoio::join!(
                ring.recv(&pairs[0].1),
                ring.recv(&pairs[1].1),
                ring.recv(&pairs[2].1),
                ring.recv(&pairs[3].1)
            );
            for (i, r) in [got.0, got.1, got.2, got.3].into_iter().enumerate() {
                match r {
                    Received::Data(b) => assert_eq!(&b[64..], &[b'0' + i as u8; 10][..]),
                    Received::NoBuffer => panic!("receive {i}: a buffer was lost"),
                    _ => panic!("receive {i}: no data"),
                }
            }
        })
        .unwrap_or_else(|| eprintln!("skipped: no buffer ring"));
    }

    #[test]
    fn an_empty_ring_says_so_and_refills_when_the_pool_has_room() {
        // A pool of 1, and 1 more for the ring: the ring lends one, a request holds the
        // other, the receive takes the ring's, nothing is left to refill.
        with_ring(1, |pool, ring| async move {
            assert_eq!(ring.entries(), 1);
            assert_eq!(
                pool.capacity(),
                2,
                "the ring's buffer is added to the budget"
            );
            let held = pool.try_acquire();
            assert!(held.is_some());
            let (mut c, s) = pair().await;
            let (r, _) = c.write_all(b"one".to_vec()).await;
            r.expect("write");
            let first = match ring.recv(&s).await {
                Received::Data(b) => b,
                _ => panic!("no data"),
            };
            assert_eq!(
                ring.held(),
                0,
                "the pool had no buffer to lend in its place"
            );
            let (r, _) = c.write_all(b"two".to_vec()).await;
            r.expect("write");
            assert!(matches!(ring.recv(&s).await, Received::NoBuffer));
            drop(first);
            assert_eq!(pool.in_use(), 1);
            match ring.recv(&s).await {
                Received::Data(b) => assert_eq!(&b[64..], b"two", "nothing was lost"),
                _ => panic!("no data after the refill"),
            }
        })
        .unwrap_or_else(|| eprintln!("skipped: no buffer ring"));
    }
}
