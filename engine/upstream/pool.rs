//! A worker's connections to one upstream: at most `max_connections` open,
//! at most `max_idle` kept idle for `idle_timeout`, reused last-in first-out.
//!
//! [`UpConn`] is the checkout guard: dropped, it either returns its stream to
//! the idle list (when the exchange ended cleanly) or closes it, and frees
//! its slot for the next waiter either way.

use crate::runtime::deadline;
use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::poll_fn,
    io,
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    task::{Poll, Waker},
};

use monoio::net::TcpStream;
use std::time::Instant;

use super::UpstreamShared;

/// A worker's pool for one upstream.
pub struct UpstreamPool {
    /// Settings and resolved endpoints, shared with the other workers.
    pub shared: Arc<UpstreamShared>,
    idle: RefCell<Vec<Idle>>,
    /// Open connections, idle ones included.
    open: Cell<usize>,
    /// Requests waiting for a connection slot.
    waiters: RefCell<VecDeque<Waker>>,
    /// Round-robin position.
    next: Cell<usize>,
    /// Connections made since start (not reused), for /stats.
    connects: Cell<u64>,
}

struct Idle {
    addr: SocketAddr,
    stream: TcpStream,
    since: Instant,
}

/// Why no upstream connection could be had.
#[derive(Debug)]
pub enum CheckoutError {
    /// No endpoint address is known (DNS has not resolved any).
    NoEndpoint,
    /// Every slot stayed busy for `connect_timeout`.
    NoSlot,
    /// The connection attempt failed.
    Connect(io::Error),
    /// The connection attempt took longer than `connect_timeout`.
    ConnectTimeout,
}

impl UpstreamPool {
    /// An empty pool.
    pub fn new(shared: Arc<UpstreamShared>) -> Rc<Self> {
        Rc::new(Self {
            shared,
            idle: RefCell::new(Vec::new()),
            open: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            next: Cell::new(0),
            connects: Cell::new(0),
        })
    }

    /// Open connections (busy and idle).
    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Idle connections.
    pub fn idle(&self) -> usize {
        self.idle.borrow().len()
    }

    /// Connections made since start.
    pub fn connects(&self) -> u64 {
        self.connects.get()
    }

    /// The next endpoint by weighted round robin.
    fn pick(&self) -> Option<SocketAddr> {
        let addrs = self.shared.addrs.load();
        if addrs.is_empty() {
            return None;
        }
        let i = self.next.get();
        self.next.set(i.wrapping_add(1));
        Some(addrs[i % addrs.len()])
    }

    /// A connection to the next endpoint: an idle one when there is one,
    /// else a new one. `fresh` skips the idle list (a retry after a stale one).
    pub async fn checkout(self: &Rc<Self>, fresh: bool) -> Result<UpConn, CheckoutError> {
        let addr = self.pick().ok_or(CheckoutError::NoEndpoint)?;
        if !fresh {
            if let Some(stream) = self.take_idle(addr) {
                return Ok(UpConn::new(self.clone(), stream, addr, true));
            }
        }
        let conf = &self.shared.conf;
        let deadline = Instant::now() + conf.connect_timeout;
        self.reserve_slot(deadline).await?;
        // The slot is ours from here on: a guard gives it back on every failure.
        let slot = SlotGuard(self);
        let connect = TcpStream::connect_addr(addr);
        let stream = match deadline::timeout_at(deadline, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CheckoutError::Connect(e)),
            Err(_) => return Err(CheckoutError::ConnectTimeout),
        };
        std::mem::forget(slot);
        let _ = stream.set_nodelay(true);
        self.connects.set(self.connects.get() + 1);
        Ok(UpConn::new(self.clone(), stream, addr, false))
    }

    /// Pops the most recently used live idle connection to `addr`.
    fn take_idle(&self, addr: SocketAddr) -> Option<TcpStream> {
        let ttl = self.shared.conf.idle_timeout;
        let mut idle = self.idle.borrow_mut();
        while let Some(pos) = idle.iter().rposition(|c| c.addr == addr) {
            let c = idle.remove(pos);
            if c.since.elapsed() < ttl {
                return Some(c.stream);
            }
            self.open.set(self.open.get() - 1);
        }
        None
    }

    /// Takes a connection slot, closing an idle connection to another endpoint
    /// if that is what stands in the way, or waiting until `deadline`.
    async fn reserve_slot(&self, deadline: Instant) -> Result<(), CheckoutError> {
        let max = self.shared.conf.max_connections;
        loop {
            if self.open.get() < max {
                self.open.set(self.open.get() + 1);
                return Ok(());
            }
            let evicted = {
                let mut idle = self.idle.borrow_mut();
                if idle.is_empty() {
                    false
                } else {
                    idle.remove(0);
                    true
                }
            };
            if evicted {
                // The evicted stream closed; its slot is now ours.
                return Ok(());
            }
            let mut registered = false;
            let wait = poll_fn(|cx| {
                if registered {
                    return Poll::Ready(());
                }
                registered = true;
                self.waiters.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            });
            if deadline::timeout_at(deadline, wait).await.is_err() {
                return Err(CheckoutError::NoSlot);
            }
        }
    }

    fn release_slot(&self) {
        self.open.set(self.open.get() - 1);
        self.wake_one();
    }

    fn wake_one(&self) {
        if let Some(w) = self.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }

    /// Closes idle connections older than `idle_timeout`; run periodically.
    pub fn sweep(&self) {
        let ttl = self.shared.conf.idle_timeout;
        let mut idle = self.idle.borrow_mut();
        let before = idle.len();
        idle.retain(|c| c.since.elapsed() < ttl);
        let closed = before - idle.len();
        drop(idle);
        if closed > 0 {
            self.open.set(self.open.get() - closed);
            for _ in 0..closed {
                self.wake_one();
            }
        }
    }

    fn put_idle(&self, addr: SocketAddr, stream: TcpStream) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() >= self.shared.conf.max_idle {
            drop(idle);
            drop(stream);
            self.release_slot();
            return;
        }
        idle.push(Idle {
            addr,
            stream,
            since: Instant::now(),
        });
        drop(idle);
        // A waiter that needs a slot can now evict or reuse.
        self.wake_one();
    }
}

/// Returns a reserved slot if a connect attempt fails.
struct SlotGuard<'a>(&'a UpstreamPool);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.release_slot();
    }
}

/// An upstream connection checked out for one exchange.
pub struct UpConn {
    pool: Rc<UpstreamPool>,
    stream: Option<TcpStream>,
    /// The endpoint this connection goes to.
    pub addr: SocketAddr,
    /// Whether it came from the idle list (it may have been closed meanwhile).
    pub reused: bool,
    reusable: bool,
}

impl UpConn {
    fn new(pool: Rc<UpstreamPool>, stream: TcpStream, addr: SocketAddr, reused: bool) -> Self {
        Self {
            pool,
            stream: Some(stream),
            addr,
            reused,
            reusable: false,
        }
    }

    /// The socket.
    pub fn stream(&mut self) -> &mut TcpStream {
        // Only `into_stream` takes it, and that consumes the guard.
        match self.stream.as_mut() {
            Some(s) => s,
            None => unreachable!("UpConn stream taken"),
        }
    }

    /// Marks the exchange complete and the connection fit for reuse.
    pub fn set_reusable(&mut self) {
        self.reusable = true;
    }

    /// Takes the socket out of the pool for good (an upgraded connection);
    /// its slot is freed now.
    pub fn into_stream(mut self) -> Option<TcpStream> {
        self.reusable = false;
        self.stream.take()
    }
}

impl Drop for UpConn {
    fn drop(&mut self) {
        match self.stream.take() {
            Some(stream) if self.reusable => self.pool.put_idle(self.addr, stream),
            _ => self.pool.release_slot(),
        }
    }
}
