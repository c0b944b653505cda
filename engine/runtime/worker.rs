//! A worker's state and its main loop: accept, spawn one task per connection.
//!
//! Configuration comes in generations: the process publishes a new compiled
//! [`Shared`] on reload, and each worker's watcher task notices within one
//! tick, builds its own [`Generation`] (keeping the pools of upstreams that did
//! not change) and binds or closes listeners. Requests take the generation in
//! force when they start and finish on it.

use crate::transport::Stream;
use std::{
    cell::{Cell, OnceCell, RefCell},
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    task::Waker,
    time::Duration,
};

use arc_swap::ArcSwap;
use monoio::net::{ListenerOpts, TcpListener};

use super::{accept, deadline, shutdown};
use crate::{
    accesslog,
    buf::{BufPool, PipePool, RecvRing},
    config::{self, Config},
    filter::Filters,
    h1, log,
    metrics::{registry, RouteShard, WorkerShard},
    proxy,
    route::RouteTable,
    upstream::{UpstreamPool, UpstreamShared},
};

/// What all workers share for one configuration: read-only.
pub struct Shared {
    /// The configuration in force.
    pub cfg: Config,
    /// Compiled routes.
    pub routes: RouteTable,
    /// Upstream settings and resolved endpoints.
    pub upstreams: Vec<Arc<UpstreamShared>>,
    /// Compiled filters, and each route's list.
    pub filters: Filters,
    /// What each route does with AI traffic.
    pub ai_routes: Vec<crate::ai::AiRoute>,
    /// Each listener's TLS server settings, by listener index.
    pub listener_tls: Vec<Option<crate::tls::ServerTls>>,
    /// Each upstream's provider key pool (`credentials`), by upstream index; rebuilt on every
    /// reload, which is what puts a key removed after a 401/403 back.
    pub key_pools: Vec<Option<crate::upstream::keys::KeyPool>>,
}

impl Shared {
    /// Compiles a loaded configuration, keeping the resolved endpoints of
    /// unchanged upstreams from `previous`; resolves new names (blocking, so
    /// only ever called off the workers).
    pub fn build(cfg: Config, previous: Option<&Shared>) -> Result<Arc<Self>, String> {
        let routes = RouteTable::build(&cfg)?;
        let upstreams = cfg
            .upstreams
            .iter()
            .map(
                |u| match previous.and_then(|p| p.upstreams.iter().find(|old| old.conf == *u)) {
                    Some(old) => Ok(old.clone()),
                    None => UpstreamShared::new(u.clone()),
                },
            )
            .collect::<Result<_, _>>()?;
        // Rebuilt on every reload, so certificate files are read again; open
        // connections keep the configuration they were accepted with.
        let listener_tls = cfg
            .listeners
            .iter()
            .map(|l| match &l.tls {
                Some(t) => crate::tls::ServerTls::new(t)
                    .map(Some)
                    .map_err(|e| format!("listeners.{}.tls: {e}", l.name)),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let filters = Filters::build(&cfg)?;
        let ai_routes = crate::ai::AiRoute::build_all(&cfg, &filters);
        let key_pools = cfg
            .upstreams
            .iter()
            .map(|u| {
                u.credentials
                    .as_ref()
                    .map(|c| crate::upstream::keys::KeyPool::new(&u.name, c))
            })
            .collect();
        Ok(Arc::new(Self {
            key_pools,
            cfg,
            routes,
            upstreams,
            filters,
            ai_routes,
            listener_tls,
        }))
    }
}

struct Current {
    shared: ArcSwap<Shared>,
    generation: AtomicU64,
}

static CURRENT: OnceLock<Current> = OnceLock::new();

/// Makes `shared` the configuration in force; workers pick it up within a tick.
pub fn publish(shared: Arc<Shared>) {
    let cur = CURRENT.get_or_init(|| Current {
        shared: ArcSwap::new(shared.clone()),
        generation: AtomicU64::new(0),
    });
    cur.shared.store(shared);
    cur.generation.fetch_add(1, Ordering::Release);
}

/// The configuration in force.
pub fn current() -> Option<Arc<Shared>> {
    CURRENT.get().map(|c| c.shared.load_full())
}

fn current_generation() -> u64 {
    CURRENT
        .get()
        .map_or(0, |c| c.generation.load(Ordering::Acquire))
}

/// One worker's view of one configuration.
pub struct Generation {
    /// The shared, compiled configuration.
    pub shared: Arc<Shared>,
    /// Which publication this is.
    pub number: u64,
    /// `[server]` settings (timeouts).
    pub server: config::Server,
    /// Head limits for the parser.
    pub limits: h1::Limits,
    /// `max_body_bytes`.
    pub max_body: u64,
    /// `splice_min`, comparable with body lengths.
    pub splice_min: u64,
    /// Whether requests write access-log lines.
    pub access_log: bool,
    /// Connection pools, by upstream index.
    upstreams: Vec<Rc<UpstreamPool>>,
    /// Metrics, by route index.
    routes: Vec<Arc<RouteShard>>,
}

impl Generation {
    fn build(
        worker: usize,
        pool: &BufPool,
        shared: Arc<Shared>,
        number: u64,
        previous: Option<&Generation>,
        ring: Option<&RecvRing>,
    ) -> Self {
        let s = &shared.cfg.server;
        let upstreams = shared
            .upstreams
            .iter()
            .map(|u| {
                previous
                    .and_then(|p| p.upstreams.iter().find(|old| Arc::ptr_eq(&old.shared, u)))
                    .cloned()
                    .unwrap_or_else(|| {
                        let p = UpstreamPool::new(u.clone(), worker, s.workers, pool);
                        if let Some(r) = ring {
                            p.use_ring(r);
                        }
                        p
                    })
            })
            .collect();
        let routes = (0..shared.routes.len())
            .map(|i| {
                let name = &shared.routes.get(i).name;
                previous
                    .and_then(|p| p.route_shard_by_name(name))
                    .unwrap_or_else(|| registry().route_shard(name, worker))
            })
            .collect();
        Self {
            server: s.clone(),
            limits: h1::Limits {
                max_header_bytes: s.max_header_bytes,
                max_headers: s.max_headers,
            },
            max_body: s.max_body_bytes,
            splice_min: s.splice_min as u64,
            access_log: shared.cfg.log.access != config::AccessLog::Off,
            upstreams,
            routes,
            number,
            shared,
        }
    }

    fn route_shard_by_name(&self, name: &str) -> Option<Arc<RouteShard>> {
        (0..self.shared.routes.len())
            .find(|&i| *self.shared.routes.get(i).name == *name)
            .map(|i| self.routes[i].clone())
    }

    /// The pool for upstream `idx`.
    pub fn upstream(&self, idx: usize) -> &Rc<UpstreamPool> {
        &self.upstreams[idx]
    }

    /// Metrics for route `idx`.
    pub fn route_metrics(&self, idx: usize) -> &RouteShard {
        &self.routes[idx]
    }

    /// Index of the listener bound to `addr` in this configuration.
    pub fn listener_index(&self, addr: SocketAddr) -> Option<usize> {
        self.shared
            .cfg
            .listeners
            .iter()
            .position(|l| l.address == addr)
    }
}

/// Tells one accept loop to stop.
#[derive(Default)]
struct Stop {
    stopped: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Stop {
    fn fire(&self) {
        self.stopped.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.stopped.get() {
                return std::task::Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }
}

/// One worker's state, owned by its thread.
pub struct Worker {
    /// Worker index, 0-based.
    pub id: usize,
    gen: RefCell<Rc<Generation>>,
    /// The fixed buffer pool.
    pub pool: BufPool,
    /// The provided-buffer ring client reads go through, where the driver and
    /// kernel have one and `server.buffer_ring` allows it; set when the worker starts.
    pub ring: OnceCell<RecvRing>,
    /// Reusable splice pipes.
    pub pipes: PipePool,
    /// Where rewritten heads are built (never held across an await).
    pub scratch: RefCell<Vec<u8>>,
    /// Counters for /stats and metrics.
    pub stats: Arc<WorkerShard>,
    /// Access-log lines not yet handed to the log thread.
    pub access: RefCell<Vec<u8>>,
    listeners: RefCell<Vec<(SocketAddr, Rc<Stop>)>>,
    /// The first half of every request id of this worker, in hex, formatted once.
    request_id_seed: [u8; 16],
    request_seq: Cell<u64>,
}

impl Worker {
    /// A worker for the configuration in force; nothing is bound yet.
    pub fn new(id: usize, shared: Arc<Shared>) -> Self {
        let s = &shared.cfg.server;
        let pool = BufPool::new(s.buffer_size, s.buffers_per_worker);
        let scratch = RefCell::new(Vec::with_capacity(s.max_header_bytes + 1024));
        let stats = registry().worker_shard(id);
        stats.buffers_capacity.set(s.buffers_per_worker as u64);
        // No ring yet: it is registered once the worker's runtime runs (`start_ring`).
        let gen = Generation::build(id, &pool, shared, current_generation(), None, None);
        Self {
            id,
            gen: RefCell::new(Rc::new(gen)),
            pool,
            ring: OnceCell::new(),
            pipes: PipePool::new(),
            scratch,
            stats,
            access: RefCell::new(Vec::new()),
            listeners: RefCell::new(Vec::new()),
            request_id_seed: hex16(seed(id)),
            request_seq: Cell::new(0),
        }
    }

    /// The configuration generation new requests use.
    pub fn generation(&self) -> Rc<Generation> {
        self.gen.borrow().clone()
    }

    /// Appends a fresh 32-hex-digit request id: unique per process run
    /// (seeded per worker) and free of allocation.
    pub fn next_request_id(&self, out: &mut Vec<u8>) {
        let seq = self.request_seq.get().wrapping_add(1);
        self.request_seq.set(seq);
        out.extend_from_slice(&self.request_id_seed);
        out.extend_from_slice(&hex16(seq));
    }

    /// Hands a batch of access-log lines to the log thread (never blocks;
    /// a batch the thread cannot take is dropped and counted).
    pub fn flush_access(&self, batch: Vec<u8>) {
        if let Some(mut back) = accesslog::submit(batch) {
            // Keep the allocation for the next batch.
            back.clear();
            let mut cur = self.access.borrow_mut();
            if cur.is_empty() {
                *cur = back;
            }
        }
    }

    fn flush_access_now(&self) {
        let batch = {
            let mut cur = self.access.borrow_mut();
            if cur.is_empty() {
                return;
            }
            std::mem::take(&mut *cur)
        };
        self.flush_access(batch);
    }

    /// Picks up a newly published configuration, if any.
    fn refresh(self: &Rc<Self>) {
        let number = current_generation();
        if number == self.gen.borrow().number {
            return;
        }
        let Some(shared) = current() else { return };
        let next = Generation::build(
            self.id,
            &self.pool,
            shared,
            number,
            Some(&self.gen.borrow()),
            self.ring.get(),
        );
        *self.gen.borrow_mut() = Rc::new(next);
        self.sync_listeners();
    }

    /// Binds listeners the configuration added and stops those it removed.
    fn sync_listeners(self: &Rc<Self>) {
        if shutdown::is_draining() {
            return;
        }
        let gen = self.generation();
        let wanted: Vec<SocketAddr> = gen.shared.cfg.listeners.iter().map(|l| l.address).collect();
        let mut current = self.listeners.borrow_mut();
        current.retain(|(addr, stop)| {
            let keep = wanted.contains(addr);
            if !keep {
                stop.fire();
            }
            keep
        });
        for addr in wanted {
            if current.iter().any(|(a, _)| *a == addr) {
                continue;
            }
            match bind(addr) {
                Ok(listener) => {
                    let stop = Rc::new(Stop::default());
                    current.push((addr, stop.clone()));
                    monoio::spawn(accept_loop(self.clone(), listener, addr, stop));
                }
                Err(e) => log::error(&format!("worker {}: cannot bind {addr}: {e}", self.id)),
            }
        }
    }

    /// Sets up the provided-buffer ring client reads go through, where allowed, and
    /// logs which receive path this worker uses.
    fn start_ring(&self) {
        let path = if !self.generation().shared.cfg.server.buffer_ring {
            "readiness wait, then read (server.buffer_ring = false)".to_string()
        } else {
            match RecvRing::register(&self.pool, proxy::request::HEADROOM) {
                Ok(ring) => {
                    let path = format!("buffer ring of {} buffers", ring.entries());
                    self.stats.receive.set(1);
                    for p in self.generation().upstreams.iter() {
                        p.use_ring(&ring);
                    }
                    let _ = self.ring.set(ring);
                    path
                }
                Err(e) => format!("readiness wait, then read (no buffer ring: {e})"),
            }
        };
        log::info(&format!("worker {}: receive path: {path}", self.id));
    }

    /// Binds this worker's listeners and serves until the process drains.
    pub async fn run(self: Rc<Self>) {
        super::clock::install();
        monoio::spawn(deadline::install());
        self.start_ring();
        self.sync_listeners();
        if self.listeners.borrow().is_empty() {
            log::error(&format!("worker {}: no listener could be bound", self.id));
            std::process::exit(1);
        }
        let watcher = self.clone();
        monoio::spawn(async move {
            let mut ticks = 0u32;
            loop {
                monoio::time::sleep(deadline::TICK).await;
                watcher.refresh();
                watcher.flush_access_now();
                // The ring's buffers are the worker's, not any connection's.
                let in_ring = watcher.ring.get().map_or(0, RecvRing::held);
                watcher
                    .stats
                    .buffers_in_use
                    .set(watcher.pool.in_use().saturating_sub(in_ring) as u64);
                watcher.stats.buffers_in_ring.set(in_ring as u64);
                if let Some(ring) = watcher.ring.get() {
                    let (received, dry, dry_reads) = ring.receives();
                    watcher.stats.ring_receives.set(received);
                    watcher.stats.ring_empty.set(dry);
                    watcher.stats.ring_dry_reads.set(dry_reads);
                }
                watcher.stats.buffers_peak.set(watcher.pool.peak() as u64);
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(10) {
                    for p in watcher.generation().upstreams.iter() {
                        p.sweep();
                    }
                }
            }
        });
        monoio::spawn(release_memory(self.clone()));
        shutdown::drained().await;
        for (_, stop) in self.listeners.borrow_mut().drain(..) {
            stop.fire();
        }
        // Draining: listeners are closed; wait for connections to finish.
        let drain = self.generation().server.drain_timeout;
        let limit = std::time::Instant::now() + drain;
        while self.stats.connections.get() > 0 && std::time::Instant::now() < limit {
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        self.flush_access_now();
        if self.stats.connections.get() > 0 {
            log::warn(&format!(
                "worker {}: drain_timeout passed with {} connections open",
                self.id,
                self.stats.connections.get()
            ));
        }
    }
}

/// Gives a burst's memory back: every `memory_release_after`, the pool buffers no request
/// needed during the whole period are freed, and when any were, this thread's allocator
/// heap returns its empty pages to the kernel (DESIGN.md: memory returns to its baseline
/// when traffic stops).
async fn release_memory(w: Rc<Worker>) {
    loop {
        monoio::time::sleep(w.generation().server.memory_release_after).await;
        if shutdown::is_draining() {
            return;
        }
        if w.pool.trim() > 0 {
            // SAFETY: mi_collect takes no pointers; it only walks this thread's own heap.
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
    }
}

/// A SO_REUSEPORT listener: every worker binds its own, and the kernel spreads
/// connections between them.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let opts = ListenerOpts::new()
        .reuse_port(true)
        .reuse_addr(true)
        .backlog(4096);
    TcpListener::bind_with_config(addr, &opts)
}

/// The most connections taken from a listener's queue at once after an accept completes,
/// before the loop yields to the requests already running.
const ACCEPT_BURST: usize = 256;

async fn accept_loop(w: Rc<Worker>, listener: TcpListener, addr: SocketAddr, stop: Rc<Stop>) {
    // Shared by every connection it accepts (an idle connection keeps 8 bytes, not 32).
    let shared_addr = Rc::new(addr);
    // On io_uring an accept operation takes one connection, and the next is submitted only
    // at the next turn of the loop: under load (long turns) a burst of new connections was
    // taken at one per turn, and the last waited a second in the queue. Those already
    // queued are taken now, as epoll's accept loop does.
    let uring = w.stats.driver.get() > 0;
    loop {
        let accepted = monoio::select! {
            a = listener.accept() => a,
            _ = stop.wait() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                serve_accepted(&w, stream, peer, addr, &shared_addr);
                if uring {
                    for _ in 1..ACCEPT_BURST {
                        let Some((stream, peer)) = accept::queued(&listener) else {
                            break;
                        };
                        serve_accepted(&w, stream, peer, addr, &shared_addr);
                    }
                }
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                log::warn(&format!("worker {}: accept failed: {e}", w.id));
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Starts serving an accepted connection, on the listener's TLS settings as of now: a
/// reload that changes certificates leaves this connection on the old ones.
fn serve_accepted(
    w: &Rc<Worker>,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    addr: SocketAddr,
    shared_addr: &Rc<SocketAddr>,
) {
    w.stats.accepted.add(1);
    let tls = {
        let g = w.generation();
        g.listener_index(addr)
            .and_then(|i| g.shared.listener_tls.get(i).cloned().flatten())
    };
    match tls {
        None => {
            monoio::spawn(proxy::serve(
                w.clone(),
                Stream::Plain(stream),
                peer,
                shared_addr.clone(),
                None,
            ));
        }
        Some(tls) => {
            monoio::spawn(proxy::serve_tls(
                w.clone(),
                stream,
                tls,
                peer,
                shared_addr.clone(),
            ));
        }
    }
}

/// `v` as sixteen lowercase hex digits.
fn hex16(v: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

fn seed(id: usize) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(id);
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.write_u32(std::process::id());
    h.finish()
}
