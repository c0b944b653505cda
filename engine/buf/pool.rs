//! The per-worker buffer pool: a fixed budget of `buffer_size` slots.
//!
//! Every byte a worker reads or writes on the data path lives in a [`PoolBuf`].
//! The pool never allocates past `buffers_per_worker × buffer_size`: when the
//! budget is spent, [`BufPool::acquire`] waits, and the connection stops reading
//! (backpressure). Buffers go back to the pool when dropped, on every path,
//! including a task dropped mid-operation (monoio keeps the buffer alive until
//! the kernel lets go of it, then drops it here).

use crate::runtime::{deadline, waitq::WaitQueue};
use std::{
    cell::{Cell, RefCell},
    ops::{Deref, DerefMut},
    rc::Rc,
    time::Duration,
};

/// A worker's buffer pool; cheap to clone (an `Rc`).
#[derive(Clone)]
pub struct BufPool {
    inner: Rc<PoolInner>,
}

struct PoolInner {
    /// Size of one slot; ordinary buffers are exactly one slot.
    slot_size: usize,
    /// The budget, in slots (with the receive ring's, once it has one).
    slots_total: Cell<usize>,
    /// Slots handed out (ordinary and large buffers together).
    slots_used: Cell<usize>,
    /// Ordinary buffers returned and kept for reuse, so steady traffic never
    /// reaches the allocator.
    free: RefCell<Vec<Vec<u8>>>,
    /// Tasks waiting for a slot, woken one per release in arrival order.
    waiters: WaitQueue,
    /// Highest `slots_used` seen, for /stats.
    peak: Cell<usize>,
    /// Fewest buffers `free` held since the last [`BufPool::trim`]: that many were
    /// not needed for the whole period, so they can go back to the allocator.
    free_low: Cell<usize>,
}

/// Why a buffer could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// The pool stayed empty for the whole wait.
    Exhausted,
    /// The request is larger than the whole budget.
    TooLarge,
}

impl BufPool {
    /// A pool of `slots` buffers of `slot_size` bytes; nothing is allocated yet.
    pub fn new(slot_size: usize, slots: usize) -> Self {
        Self {
            inner: Rc::new(PoolInner {
                slot_size,
                slots_total: Cell::new(slots),
                slots_used: Cell::new(0),
                free: RefCell::new(Vec::new()),
                waiters: WaitQueue::default(),
                peak: Cell::new(0),
                free_low: Cell::new(0),
            }),
        }
    }

    /// Size of one ordinary buffer.
    pub fn slot_size(&self) -> usize {
        self.inner.slot_size
    }

    /// Adds `slots` to the budget for the receive ring's buffers: lent to the kernel, they
    /// must not shrink what requests have (a burst of requests each holding one buffer
    /// and waiting for a second would otherwise find fewer than it did without a ring).
    pub fn add_ring_slots(&self, slots: usize) {
        let total = &self.inner.slots_total;
        total.set(total.get() + slots);
    }

    /// Whether tasks wait for a buffer now: a lender that could wait (the receive ring's
    /// refill) leaves what is freed to them rather than jump their queue.
    pub fn has_waiters(&self) -> bool {
        !self.inner.waiters.is_empty()
    }

    /// Slots in use now.
    pub fn in_use(&self) -> usize {
        self.inner.slots_used.get()
    }

    /// The budget, in slots.
    pub fn capacity(&self) -> usize {
        self.inner.slots_total.get()
    }

    /// Highest number of slots in use at once since start.
    pub fn peak(&self) -> usize {
        self.inner.peak.get()
    }

    /// Ordinary buffers kept for reuse now.
    pub fn kept(&self) -> usize {
        self.inner.free.borrow().len()
    }

    /// Frees the kept buffers that no acquire needed since the previous call (the free
    /// list's low-water mark over the period), so memory taken by a burst goes back to
    /// the allocator once the burst is over while steady traffic keeps what it uses.
    /// Returns how many were freed.
    pub fn trim(&self) -> usize {
        let inner = &self.inner;
        let mut free = inner.free.borrow_mut();
        let unused = inner.free_low.get().min(free.len());
        let keep = free.len() - unused;
        free.truncate(keep);
        free.shrink_to_fit();
        inner.free_low.set(free.len());
        unused
    }

    /// Takes one ordinary buffer now, if the budget allows.
    pub fn try_acquire(&self) -> Option<PoolBuf> {
        self.try_acquire_bytes(self.inner.slot_size)
    }

    /// Takes a buffer of at least `bytes` bytes now, if the budget allows.
    /// Buffers larger than one slot cost several slots and are freed on drop.
    pub fn try_acquire_bytes(&self, bytes: usize) -> Option<PoolBuf> {
        let inner = &self.inner;
        let slots = bytes.div_ceil(inner.slot_size).max(1);
        let used = inner.slots_used.get();
        if used + slots > inner.slots_total.get() {
            return None;
        }
        inner.slots_used.set(used + slots);
        if used + slots > inner.peak.get() {
            inner.peak.set(used + slots);
        }
        let data = if slots == 1 {
            let mut free = inner.free.borrow_mut();
            let data = free.pop();
            if free.len() < inner.free_low.get() {
                inner.free_low.set(free.len());
            }
            data.unwrap_or_else(|| Vec::with_capacity(inner.slot_size))
        } else {
            Vec::with_capacity(slots * inner.slot_size)
        };
        Some(PoolBuf {
            data,
            slots,
            pool: self.inner.clone(),
        })
    }

    /// Waits until one ordinary buffer is free.
    pub async fn acquire(&self) -> PoolBuf {
        // Newcomers queue behind waiters, so a release goes to the oldest.
        if self.inner.waiters.is_empty() {
            if let Some(buf) = self.try_acquire() {
                return buf;
            }
        }
        loop {
            self.inner.waiters.wait().await;
            if let Some(buf) = self.try_acquire() {
                return buf;
            }
        }
    }

    /// Waits up to `limit` for a buffer of at least `bytes` bytes.
    pub async fn acquire_within(
        &self,
        bytes: usize,
        limit: Duration,
    ) -> Result<PoolBuf, PoolError> {
        if bytes.div_ceil(self.inner.slot_size) > self.inner.slots_total.get() {
            return Err(PoolError::TooLarge);
        }
        if self.inner.waiters.is_empty() {
            if let Some(buf) = self.try_acquire_bytes(bytes) {
                return Ok(buf);
            }
        }
        let wait = async {
            loop {
                self.inner.waiters.wait().await;
                if let Some(buf) = self.try_acquire_bytes(bytes) {
                    return buf;
                }
            }
        };
        deadline::timeout(limit, wait)
            .await
            .map_err(|_| PoolError::Exhausted)
    }
}

/// A buffer owned by one connection until dropped; its length is the bytes
/// filled so far and its capacity never changes.
pub struct PoolBuf {
    data: Vec<u8>,
    slots: usize,
    pool: Rc<PoolInner>,
}

impl PoolBuf {
    /// The pool this buffer comes from (and goes back to).
    pub fn pool(&self) -> BufPool {
        BufPool {
            inner: self.pool.clone(),
        }
    }

    /// Total bytes this buffer can hold.
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    /// Bytes still free after the filled part.
    pub fn spare(&self) -> usize {
        self.data.capacity() - self.data.len()
    }

    /// Forgets the contents.
    pub fn clear(&mut self) {
        self.data.clear();
    }

    /// Drops the first `n` filled bytes, moving the rest to the front.
    pub fn consume(&mut self, n: usize) {
        if n >= self.data.len() {
            self.data.clear();
        } else {
            self.data.drain(..n);
        }
    }

    /// Shortens the filled part to `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.data.truncate(len);
    }

    /// Lets `f` write into the free room after the filled part and keeps the bytes it reports
    /// written (none on error); for APIs that fill a `&mut [u8]` (TLS encryption). The room is
    /// zeroed first, because a `&mut [u8]` must not point at uninitialised memory.
    pub fn fill_with<T, E>(
        &mut self,
        f: impl FnOnce(&mut [u8]) -> Result<(usize, T), E>,
    ) -> Result<T, E> {
        let len = self.data.len();
        let cap = self.data.capacity();
        self.data.resize(cap, 0);
        let res = f(&mut self.data[len..]);
        let n = match &res {
            Ok((n, _)) => (*n).min(cap - len),
            Err(_) => 0,
        };
        self.data.truncate(len + n);
        res.map(|(_, t)| t)
    }

    /// Marks the first `len` bytes filled, after the kernel wrote them through a pointer
    /// taken from [`PoolBuf::as_mut_ptr`] (a provided-buffer receive).
    ///
    /// # Safety
    /// The first `len` bytes must be initialised, and `len` at most the capacity.
    pub unsafe fn assume_filled(&mut self, len: usize) {
        debug_assert!(len <= self.data.capacity());
        // SAFETY: the caller vouches that `len` bytes are initialised and fit.
        unsafe { self.data.set_len(len) }
    }

    /// Receives what the socket `fd` holds now into the spare capacity, without waiting:
    /// `Ok(Some(n))` for `n` bytes (0: the peer closed), `Ok(None)` when nothing is there.
    /// For a socket found readable: its bytes are in this buffer at once, rather than a
    /// loop turn later through a queued read holding it meanwhile.
    pub fn recv_now(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<Option<usize>> {
        self.recv_now_max(fd, usize::MAX)
    }

    /// [`PoolBuf::recv_now`], taking at most `max` bytes: what follows them in the socket
    /// (the next request) stays there.
    pub fn recv_now_max(
        &mut self,
        fd: std::os::fd::RawFd,
        max: usize,
    ) -> std::io::Result<Option<usize>> {
        let len = self.data.len();
        let spare = (self.data.capacity() - len).min(max);
        loop {
            // SAFETY: the kernel writes at most `spare` bytes into the vector's spare
            // capacity, which it owns for the call.
            let n = unsafe {
                libc::recv(
                    fd,
                    self.data.as_mut_ptr().add(len).cast(),
                    spare,
                    libc::MSG_DONTWAIT,
                )
            };
            if let Ok(n) = usize::try_from(n) {
                // SAFETY: the kernel initialised `n <= spare` bytes after `len`.
                unsafe { self.data.set_len(len + n) };
                return Ok(Some(n));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(None),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    /// The start of the buffer's memory, which never moves while the buffer lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.data.as_mut_ptr()
    }

    /// Appends `bytes` if they fit; never grows the buffer.
    pub fn put(&mut self, bytes: &[u8]) -> Result<(), Full> {
        if bytes.len() > self.spare() {
            return Err(Full);
        }
        self.data.extend_from_slice(bytes);
        Ok(())
    }
}

/// A [`PoolBuf::put`] that did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl PoolBuf {
    /// A buffer of at least `bytes` bytes from the same pool for a bulk transfer, only while
    /// half of the pool stays free after it: large bodies never crowd out ordinary requests.
    pub fn try_bulk(&self, bytes: usize) -> Option<PoolBuf> {
        let inner = &self.pool;
        let slots = bytes.div_ceil(inner.slot_size).max(1);
        if (inner.slots_used.get() + slots) * 2 > inner.slots_total.get() {
            return None;
        }
        BufPool {
            inner: inner.clone(),
        }
        .try_acquire_bytes(bytes)
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let pool = &self.pool;
        pool.slots_used.set(pool.slots_used.get() - self.slots);
        if self.slots == 1 {
            let mut data = std::mem::take(&mut self.data);
            data.clear();
            pool.free.borrow_mut().push(data);
        }
        // One waiter per released slot; a woken waiter that still finds too
        // little (a large head buffer) waits again at the back.
        for _ in 0..self.slots {
            pool.waiters.wake_one();
        }
    }
}

// SAFETY: the pointer is the Vec's heap block, which never moves or grows
// (every write is bounded by `capacity`), and `bytes_init` is its length.
unsafe impl monoio::buf::IoBuf for PoolBuf {
    fn read_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.data.len()
    }
}

// SAFETY: as above; the kernel writes at most `bytes_total` bytes and the
// runtime then reports how many were initialised.
unsafe impl monoio::buf::IoBufMut for PoolBuf {
    fn write_ptr(&mut self) -> *mut u8 {
        self.data.as_mut_ptr()
    }
    fn bytes_total(&mut self) -> usize {
        self.data.capacity()
    }
    unsafe fn set_init(&mut self, pos: usize) {
        self.data.set_len(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bulk buffer is granted only while half of the pool stays free after it.
    #[test]
    fn bulk_buffers_leave_half_the_pool_free() {
        let pool = BufPool::new(1024, 8);
        let a = pool.try_acquire().unwrap();
        // 1 + 4 slots would leave 3 of 8 free.
        assert!(a.try_bulk(4096).is_none());
        let b = a.try_bulk(3 * 1024).unwrap();
        assert!(b.capacity() >= 3 * 1024);
        assert_eq!(pool.in_use(), 4);
        assert!(a.try_bulk(1).is_none());
        drop(b);
        assert_eq!(pool.in_use(), 1);
        drop(a);
        assert!(pool.try_acquire().unwrap().try_bulk(3 * 1024).is_some());
    }

    #[test]
    fn budget_is_never_exceeded() {
        let pool = BufPool::new(1024, 3);
        let a = pool.try_acquire().unwrap();
        let b = pool.try_acquire_bytes(2048).unwrap();
        assert_eq!(pool.in_use(), 3);
        assert!(pool.try_acquire().is_none());
        drop(a);
        assert_eq!(pool.in_use(), 2);
        assert!(pool.try_acquire_bytes(2048).is_none());
        drop(b);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.peak(), 3);
    }

    #[test]
    fn trim_frees_what_a_period_did_not_use() {
        let pool = BufPool::new(64, 8);
        let burst: Vec<_> = (0..6).map(|_| pool.try_acquire()).collect();
        drop(burst);
        assert_eq!(pool.kept(), 6);
        // The burst's buffers were all taken during the first period: nothing was idle yet.
        assert_eq!(pool.trim(), 0);
        // Two in use through the next period: the other four were never needed.
        let steady: Vec<_> = (0..2).map(|_| pool.try_acquire()).collect();
        drop(steady);
        assert_eq!(pool.trim(), 4);
        assert_eq!(pool.kept(), 2);
        // A period without traffic frees the rest; buffers come back on demand.
        assert_eq!(pool.trim(), 2);
        assert_eq!(pool.kept(), 0);
        let again = pool.try_acquire();
        assert!(again.is_some_and(|b| b.capacity() == 64));
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn ordinary_buffers_are_reused() {
        let pool = BufPool::new(1024, 2);
        let mut a = pool.try_acquire().unwrap();
        a.put(b"hello").unwrap();
        let ptr = a.as_ptr();
        drop(a);
        let b = pool.try_acquire().unwrap();
        assert_eq!(b.as_ptr(), ptr);
        assert!(b.is_empty());
    }

    #[test]
    fn put_never_grows_the_buffer() {
        let pool = BufPool::new(8, 1);
        let mut a = pool.try_acquire().unwrap();
        assert_eq!(a.put(b"12345678"), Ok(()));
        assert_eq!(a.put(b"9"), Err(Full));
        assert_eq!(a.capacity(), 8);
        a.consume(3);
        assert_eq!(&a[..], b"45678");
    }
}
