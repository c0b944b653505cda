//! A worker's connections to one upstream: at most `max_connections` open,
//! at most `max_idle` kept idle for `idle_timeout`, reused last-in first-out;
//! plus the worker's balancing state (round-robin weights, requests in flight).
//!
//! [`UpConn`] is the checkout guard: dropped, it either returns its stream to
//! the idle list (when the exchange ended cleanly) or closes it, and frees
//! its slot for the next waiter either way.

use std::{
    cell::{Cell, OnceCell, RefCell},
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use monoio::net::TcpStream;

use crate::runtime::clock;
use crate::{
    buf::{BufPool, Received, RecvRing, RingRecv},
    transport::Stream,
};

use super::{balance, health::now_ms, UpstreamShared};
use crate::{
    config::Balance,
    metrics::{registry, UpstreamShard},
    runtime::{deadline, waitq::WaitQueue},
};

/// A worker's pool for one upstream.
pub struct UpstreamPool {
    /// Settings, endpoints and health, shared with the other workers.
    pub shared: Arc<UpstreamShared>,
    idle: RefCell<Vec<Idle>>,
    /// Requests waiting for a connection slot or an idle connection.
    waiters: WaitQueue,
    /// Smooth weighted round-robin state.
    rr: RefCell<balance::SmoothRr>,
    /// Requests in flight per endpoint (for least_requests).
    inflight: RefCell<Vec<u32>>,
    /// Tie-breaker rotation for least_requests.
    turn: Cell<usize>,
    /// Counters for /metrics and /stats; `open` and `idle` are also the
    /// pool's own bookkeeping.
    pub stats: Arc<UpstreamShard>,
    /// This worker's TLS client (its own session cache), with `tls` on.
    tls: Option<crate::tls::ClientTls>,
    /// The worker's buffer pool, which TLS streams draw on.
    bufs: BufPool,
    /// `max_connections`, or its automatic value (see [`auto_max_connections`]).
    max_connections: usize,
    /// The worker's receive ring, once it has one.
    ring: OnceCell<RecvRing>,
}

/// `max_connections` when the configuration leaves it out: half of the open-files limit
/// (each stream is a client and an upstream descriptor), shared by the workers, and never
/// under 512. An AI gateway holds thousands of long-lived streams per worker; the pool's
/// `buffers_per_worker` and the descriptor limit are the real bounds then, not a slot count.
pub fn auto_max_connections(workers: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let per_worker = (nofile / 2) / workers.max(1) as u64;
    usize::try_from(per_worker).unwrap_or(usize::MAX).max(512)
}

struct Idle {
    idx: usize,
    addr: SocketAddr,
    stream: Stream,
    since: Instant,
    /// A receive through the worker's ring, armed while the connection waits (plain TCP
    /// with a ring): a close or stray bytes complete it, and, still pending at reuse, it
    /// reads the answer to the next request.
    armed: Option<RingRecv>,
}

/// Why no upstream connection could be had.
#[derive(Debug)]
pub enum CheckoutError {
    /// No endpoint address is known (DNS has not resolved any).
    NoEndpoint,
    /// Every resolved endpoint is ejected as unhealthy.
    AllDown,
    /// Every slot stayed busy for `connect_timeout`.
    NoSlot,
    /// The connection attempt to endpoint `.0` failed.
    Connect(usize, io::Error),
    /// The connection attempt to endpoint `.0` took longer than `connect_timeout`.
    ConnectTimeout(usize),
    /// The TLS handshake with endpoint `.0` failed (verification, protocol).
    Tls(usize),
}

/// What the balancer may use to pick.
pub struct Pick<'a> {
    /// Endpoints already tried for this request.
    pub exclude: &'a [usize],
    /// The request's hash key, for `balance = "hash"`.
    pub hash_key: Option<u64>,
}

impl UpstreamPool {
    /// An empty pool for worker `worker`.
    pub fn new(
        shared: Arc<UpstreamShared>,
        worker: usize,
        workers: usize,
        bufs: &BufPool,
    ) -> Rc<Self> {
        let n = shared.conf.endpoints.len();
        let max_connections = shared
            .conf
            .max_connections
            .unwrap_or_else(|| auto_max_connections(workers));
        let stats = registry().upstream_shard(&shared.conf.name, worker);
        Rc::new(Self {
            tls: shared.tls.as_ref().map(|t| t.for_worker()),
            bufs: bufs.clone(),
            max_connections,
            shared,
            idle: RefCell::new(Vec::new()),
            waiters: WaitQueue::default(),
            rr: RefCell::new(balance::SmoothRr::default()),
            inflight: RefCell::new(vec![0; n]),
            turn: Cell::new(0),
            stats,
            ring: OnceCell::new(),
        })
    }

    /// Arms a receive through `ring` on every connection that goes idle from now on.
    pub fn use_ring(&self, ring: &RecvRing) {
        let _ = self.ring.set(ring.clone());
    }

    /// Picks an endpoint: resolved, not ejected, not excluded.
    fn pick(&self, p: &Pick<'_>) -> Result<(usize, SocketAddr), CheckoutError> {
        let addrs = self.shared.addrs.load();
        let active = self.shared.conf.health.is_some();
        let now = now_ms();
        let weights = &self.shared.conf.endpoints;
        let resolved = |i: usize| addrs.get(i).copied().flatten().is_some();
        if !(0..addrs.len()).any(resolved) {
            return Err(CheckoutError::NoEndpoint);
        }
        let usable = |i: usize| {
            resolved(i) && !p.exclude.contains(&i) && self.shared.health[i].is_usable(active, now)
        };
        let candidates = (0..addrs.len())
            .filter(|&i| usable(i))
            .map(|i| (i, weights[i].weight));
        let idx = match (self.shared.conf.balance, p.hash_key) {
            (Balance::Hash, Some(key)) => self.shared.ring.pick(key, usable),
            (Balance::LeastRequests, _) => {
                let t = self.turn.get();
                self.turn.set(t.wrapping_add(1));
                balance::least_requests(candidates, &self.inflight.borrow(), t)
            }
            _ => self.rr.borrow_mut().pick(candidates),
        };
        match idx.and_then(|i| addrs[i].map(|a| (i, a))) {
            Some(v) => Ok(v),
            None => Err(CheckoutError::AllDown),
        }
    }

    /// A connection to the next endpoint: an idle one when there is one,
    /// else a new one. `fresh` skips the idle list (a retry after a stale one).
    pub async fn checkout(
        self: &Rc<Self>,
        p: &Pick<'_>,
        fresh: bool,
    ) -> Result<UpConn, CheckoutError> {
        let (idx, addr) = self.pick(p)?;
        if !fresh {
            if let Some((stream, armed)) = self.take_idle(idx, addr) {
                return Ok(UpConn::new(self.clone(), stream, idx, addr, true, armed));
            }
        }
        let conf = &self.shared.conf;
        let deadline_at = clock::now() + conf.connect_timeout;
        if let Some((stream, armed)) = self.reserve_slot(idx, addr, fresh, deadline_at).await? {
            // While waiting, a connection to this endpoint came back idle.
            return Ok(UpConn::new(self.clone(), stream, idx, addr, true, armed));
        }
        // The slot is ours from here on: a guard gives it back on every failure.
        let slot = SlotGuard(self);
        let connect = TcpStream::connect_addr(addr);
        let stream = match deadline::timeout_at(deadline_at, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.stats.connect_errors.add(1);
                return Err(CheckoutError::Connect(idx, e));
            }
            Err(_) => {
                self.stats.connect_errors.add(1);
                return Err(CheckoutError::ConnectTimeout(idx));
            }
        };
        let _ = stream.set_nodelay(true);
        let stream = match &self.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                // The handshake counts toward `connect_timeout`.
                let endpoint = &conf.endpoints[idx].address;
                // Boxed: the TLS state and its handshake (about 2.4 KB) would otherwise
                // size every request's state that can connect, plain ones too.
                let handshake = Box::pin(async {
                    let mut s = tls.connect(stream, endpoint, &self.bufs)?;
                    s.handshake().await.map(|()| s)
                });
                match deadline::timeout_at(deadline_at, handshake).await {
                    Ok(Ok(s)) => {
                        crate::metrics::upstream_tls_handshake(&conf.name, s.resumed());
                        Stream::Tls(Box::new(s))
                    }
                    Ok(Err(e)) => {
                        self.stats.connect_errors.add(1);
                        crate::log::warn(&format!(
                            "upstream {}: TLS with {endpoint} ({addr}) failed: {e}",
                            conf.name
                        ));
                        return Err(CheckoutError::Tls(idx));
                    }
                    Err(_) => {
                        self.stats.connect_errors.add(1);
                        return Err(CheckoutError::ConnectTimeout(idx));
                    }
                }
            }
        };
        std::mem::forget(slot);
        self.stats.connects.add(1);
        Ok(UpConn::new(self.clone(), stream, idx, addr, false, None))
    }

    /// Records a failure of endpoint `idx` (connect error, reset, 5xx).
    pub fn report_failure(&self, idx: usize) {
        let h = &self.shared.health[idx];
        if h.failure(self.shared.unhealthy_after(), now_ms()) {
            crate::log::warn(&format!(
                "upstream {}: endpoint {} ejected after {} failures in a row",
                self.shared.conf.name,
                self.shared.conf.endpoints[idx].address,
                self.shared.unhealthy_after()
            ));
        }
    }

    /// Records a success of endpoint `idx`.
    pub fn report_success(&self, idx: usize) {
        self.shared.health[idx].success();
    }

    /// Pops the most recently used live idle connection to `idx` at `addr`, with the
    /// receive armed on it, if any.
    fn take_idle(&self, idx: usize, addr: SocketAddr) -> Option<(Stream, Option<RingRecv>)> {
        let ttl = self.shared.conf.idle_timeout;
        let mut idle = self.idle.borrow_mut();
        while let Some(pos) = idle.iter().rposition(|c| c.idx == idx) {
            let mut c = idle.remove(pos);
            self.stats.idle.sub(1);
            if c.addr == addr && clock::since(c.since) < ttl && c.stream.is_clean() {
                match c.armed.as_mut().map(RingRecv::try_now) {
                    // Still pending: nothing came while idle, not even a close.
                    Some(None) => return Some((c.stream, c.armed)),
                    // The ring was empty: the receive ended without a word on the
                    // connection, which the peek then checks.
                    Some(Some(Received::NoBuffer)) | None => {
                        if idle_is_clean(&c.stream) {
                            return Some((c.stream, None));
                        }
                    }
                    // A close, an error or stray bytes.
                    Some(Some(_)) => {}
                }
            }
            // Expired, the name now resolves elsewhere, or closed or
            // written to by the upstream while idle: close it.
            self.stats.open.sub(1);
        }
        None
    }

    /// Takes a connection slot, or waits (until `deadline_at`) for one to
    /// free up. A connection to `idx` returned idle meanwhile is taken
    /// instead (`Some`); an idle connection to another endpoint is closed to
    /// make room.
    async fn reserve_slot(
        &self,
        idx: usize,
        addr: SocketAddr,
        fresh: bool,
        deadline_at: Instant,
    ) -> Result<Option<(Stream, Option<RingRecv>)>, CheckoutError> {
        let max = self.max_connections as u64;
        let mut waited = false;
        loop {
            // Queue order is kept: only the woken waiter (or a newcomer when
            // nobody waits) takes what a release freed.
            if waited || self.waiters.is_empty() {
                if waited && !fresh {
                    if let Some(s) = self.take_idle(idx, addr) {
                        return Ok(Some(s));
                    }
                }
                if self.stats.open.get() < max {
                    self.stats.open.add(1);
                    return Ok(None);
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
                    self.stats.idle.sub(1);
                    return Ok(None);
                }
            }
            if deadline::timeout_at(deadline_at, self.waiters.wait())
                .await
                .is_err()
            {
                self.stats.busy.add(1);
                return Err(CheckoutError::NoSlot);
            }
            waited = true;
        }
    }

    fn release_slot(&self) {
        self.stats.open.sub(1);
        self.wake_one();
    }

    fn wake_one(&self) {
        self.waiters.wake_one();
    }

    /// Closes idle connections older than `idle_timeout`; run periodically.
    pub fn sweep(&self) {
        let ttl = self.shared.conf.idle_timeout;
        let mut idle = self.idle.borrow_mut();
        let before = idle.len();
        // An armed receive that completed saw a close or stray bytes: closed too (one
        // that found the ring empty says nothing: the peek at reuse decides then).
        idle.retain_mut(|c| {
            if clock::since(c.since) >= ttl {
                return false;
            }
            match c.armed.as_mut().map(RingRecv::try_now) {
                Some(None) | None => true,
                Some(Some(Received::NoBuffer)) => {
                    c.armed = None;
                    true
                }
                Some(Some(_)) => false,
            }
        });
        let closed = before - idle.len();
        drop(idle);
        if closed > 0 {
            self.stats.idle.sub(closed as u64);
            self.stats.open.sub(closed as u64);
            for _ in 0..closed {
                self.wake_one();
            }
        }
    }

    fn put_idle(&self, idx: usize, addr: SocketAddr, stream: Stream, armed: Option<RingRecv>) {
        let mut idle = self.idle.borrow_mut();
        // Bytes read ahead (past the response, on a TLS stream) would answer the
        // next request: such a connection is closed, never pooled.
        if idle.len() >= self.shared.conf.max_idle || !stream.is_clean() {
            drop(idle);
            drop(stream);
            self.release_slot();
            return;
        }
        // The receive an exchange left unused stays; else one is armed now, unless the
        // ring is empty (it would only end at once with nothing to say).
        let armed = armed.or_else(|| {
            let ring = self.ring.get().filter(|r| r.held() > 0)?;
            Some(ring.recv(stream.tcp()?))
        });
        idle.push(Idle {
            idx,
            addr,
            stream,
            armed,
            since: clock::now(),
        });
        drop(idle);
        self.stats.idle.add(1);
        // A waiter that needs a slot can now evict or reuse.
        self.wake_one();
    }
}

/// True when an idle upstream connection can carry a new request: nothing
/// to read and not closed.
///
/// Bytes waiting on an idle connection are a response nobody asked for (a
/// confused upstream): sent a request, the connection would hand them over
/// as the answer, to another client. EOF or an error means the upstream
/// closed it, typically its keep-alive timeout being shorter than ours: a
/// request sent on it fails, and one with a body cannot be sent again. One
/// non-blocking peek costs a syscall per reuse and spares both.
fn idle_is_clean(stream: &impl AsRawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: the descriptor is an open socket borrowed from `stream`; recv
    // writes at most one byte into `byte`; MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    // Only "nothing to read yet" is clean; data (n > 0), EOF (0) and every
    // other error are not.
    n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
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
    stream: Option<Stream>,
    /// Index of the endpoint in the upstream's list.
    pub idx: usize,
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// Whether it came from the idle list (it may have been closed meanwhile).
    pub reused: bool,
    reusable: bool,
    /// The receive armed while it was idle: the first read of the answer.
    armed: Option<RingRecv>,
}

impl UpConn {
    /// The `response_timeout` of its upstream: the longest wait for each read of an answer.
    pub fn response_timeout(&self) -> std::time::Duration {
        self.pool.shared.conf.response_timeout
    }

    fn new(
        pool: Rc<UpstreamPool>,
        stream: Stream,
        idx: usize,
        addr: SocketAddr,
        reused: bool,
        armed: Option<RingRecv>,
    ) -> Self {
        if let Some(n) = pool.inflight.borrow_mut().get_mut(idx) {
            *n += 1;
        }
        Self {
            pool,
            stream: Some(stream),
            idx,
            addr,
            reused,
            reusable: false,
            armed,
        }
    }

    /// The receive armed while the connection was idle, to read the answer with; the
    /// caller must not read the socket any other way while it is pending.
    pub fn take_armed(&mut self) -> Option<RingRecv> {
        self.armed.take()
    }

    /// Cancels the armed receive before anything is sent, for an exchange that watches
    /// the socket itself (a streamed request body, see `EarlyWatch`).
    pub fn disarm(&mut self) {
        self.armed = None;
    }

    /// The socket.
    pub fn stream(&mut self) -> &mut Stream {
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
    pub fn into_stream(mut self) -> Option<Stream> {
        self.reusable = false;
        self.stream.take()
    }
}

impl Drop for UpConn {
    fn drop(&mut self) {
        if let Some(n) = self.pool.inflight.borrow_mut().get_mut(self.idx) {
            *n = n.saturating_sub(1);
        }
        match self.stream.take() {
            Some(stream) if self.reusable => {
                self.pool
                    .put_idle(self.idx, self.addr, stream, self.armed.take())
            }
            _ => self.pool.release_slot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::idle_is_clean;
    use std::{
        io::Write,
        net::{Shutdown, TcpListener, TcpStream},
        thread,
        time::Duration,
    };

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ours = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (theirs, _) = l.accept().expect("accept");
        (ours, theirs)
    }

    /// Waits for what the peer did to reach our socket (loopback: at once).
    fn settle() {
        thread::sleep(Duration::from_millis(50));
    }

    #[test]
    fn a_quiet_open_connection_is_clean() {
        let (ours, _theirs) = pair();
        assert!(idle_is_clean(&ours));
        // Peeking never blocks, even when called again.
        assert!(idle_is_clean(&ours));
    }

    #[test]
    fn unread_bytes_make_an_idle_connection_unusable() {
        let (ours, mut theirs) = pair();
        theirs
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL")
            .expect("write");
        settle();
        assert!(!idle_is_clean(&ours));
    }

    #[test]
    fn a_connection_the_upstream_closed_is_unusable() {
        let (ours, theirs) = pair();
        theirs.shutdown(Shutdown::Write).expect("shutdown");
        settle();
        assert!(!idle_is_clean(&ours));
        drop(theirs);
        settle();
        assert!(!idle_is_clean(&ours));
    }
}
