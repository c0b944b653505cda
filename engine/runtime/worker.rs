//! A worker's state and its main loop: accept, spawn one task per connection.

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    time::Duration,
};

use monoio::net::{ListenerOpts, TcpListener};

use super::shutdown;
use crate::{
    buf::{BufPool, PipePool},
    config::{self, Config},
    h1, log, proxy,
    route::RouteTable,
    stats::WorkerStats,
    upstream::{UpConn, UpstreamPool, UpstreamShared},
};

/// What all workers share for one configuration: read-only.
pub struct Shared {
    /// The configuration in force.
    pub cfg: Config,
    /// Compiled routes.
    pub routes: RouteTable,
    /// Upstream settings and resolved endpoints.
    pub upstreams: Vec<Arc<UpstreamShared>>,
}

impl Shared {
    /// Compiles a loaded configuration; resolves endpoint names (blocking,
    /// so only ever called off the workers).
    pub fn build(cfg: Config) -> Result<Arc<Self>, String> {
        let routes = RouteTable::build(&cfg)?;
        let upstreams = cfg
            .upstreams
            .iter()
            .cloned()
            .map(UpstreamShared::new)
            .collect();
        Ok(Arc::new(Self {
            cfg,
            routes,
            upstreams,
        }))
    }
}

/// One worker's state, owned by its thread.
pub struct Worker {
    /// Worker index, 0-based.
    pub id: usize,
    shared: Arc<Shared>,
    /// `[server]` settings (timeouts).
    pub server: config::Server,
    /// Head limits for the parser.
    pub limits: h1::Limits,
    /// `max_body_bytes`.
    pub max_body: u64,
    /// `splice_min`, as a byte count comparable with body lengths.
    pub splice_min: u64,
    /// The fixed buffer pool.
    pub pool: BufPool,
    /// Reusable splice pipes.
    pub pipes: PipePool,
    /// Connection pools, by upstream index.
    upstreams: Vec<Rc<UpstreamPool>>,
    /// Where rewritten heads are built (never held across an await).
    pub scratch: RefCell<Vec<u8>>,
    /// Counters for /stats and metrics.
    pub stats: WorkerStats,
    request_id_seed: u64,
    request_seq: Cell<u64>,
}

impl Worker {
    /// A worker for `shared`; nothing is bound yet.
    pub fn new(id: usize, shared: Arc<Shared>) -> Self {
        let s = &shared.cfg.server;
        let upstreams = shared
            .upstreams
            .iter()
            .cloned()
            .map(UpstreamPool::new)
            .collect();
        Self {
            id,
            server: s.clone(),
            limits: h1::Limits {
                max_header_bytes: s.max_header_bytes,
                max_headers: s.max_headers,
            },
            max_body: s.max_body_bytes,
            splice_min: s.splice_min as u64,
            pool: BufPool::new(s.buffer_size, s.buffers_per_worker),
            pipes: PipePool::new(),
            upstreams,
            scratch: RefCell::new(Vec::with_capacity(s.max_header_bytes + 1024)),
            stats: WorkerStats::default(),
            request_id_seed: seed(id),
            request_seq: Cell::new(0),
            shared,
        }
    }

    /// The configuration snapshot in force.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The pool for upstream `idx`.
    pub fn upstream(&self, idx: usize) -> &Rc<UpstreamPool> {
        &self.upstreams[idx]
    }

    /// All upstream pools.
    pub fn upstream_pools(&self) -> &[Rc<UpstreamPool>] {
        &self.upstreams
    }

    /// Idle time allowed while relaying a body from this connection's upstream.
    pub fn upstream_idle(&self, conn: &UpConn) -> Duration {
        let _ = conn;
        self.shared
            .upstreams
            .first()
            .map(|u| u.conf.response_timeout)
            .unwrap_or(Duration::from_secs(60))
    }

    /// Appends a fresh 32-hex-digit request id: unique per process run
    /// (seeded per worker) and free of allocation.
    pub fn next_request_id(&self, out: &mut Vec<u8>) {
        let seq = self.request_seq.get().wrapping_add(1);
        self.request_seq.set(seq);
        let mut hex = [0u8; 32];
        write_hex(&mut hex[..16], self.request_id_seed);
        write_hex(&mut hex[16..], seq);
        out.extend_from_slice(&hex);
    }

    /// Binds this worker's listeners and serves until the process exits.
    pub async fn run(self: Rc<Self>) {
        monoio::spawn(super::deadline::install());
        let sweeper = self.clone();
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(Duration::from_secs(1)).await;
                for p in sweeper.upstream_pools() {
                    p.sweep();
                }
            }
        });
        let listeners = self.shared.cfg.listeners.clone();
        let mut tasks = Vec::new();
        for (idx, l) in listeners.iter().enumerate() {
            let listener = match bind(l.address) {
                Ok(l) => l,
                Err(e) => {
                    log::error(&format!(
                        "worker {}: cannot bind {} ({}): {e}",
                        self.id, l.name, l.address
                    ));
                    std::process::exit(1);
                }
            };
            let w = self.clone();
            tasks.push(monoio::spawn(accept_loop(w, listener, idx)));
        }
        for t in tasks {
            t.await;
        }
        // Draining: listeners are closed; wait for connections to finish.
        let limit = std::time::Instant::now() + self.server.drain_timeout;
        while self.stats.connections() > 0 && std::time::Instant::now() < limit {
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.stats.connections() > 0 {
            log::warn(&format!(
                "worker {}: drain_timeout passed with {} connections open",
                self.id,
                self.stats.connections()
            ));
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

async fn accept_loop(w: Rc<Worker>, listener: TcpListener, idx: usize) {
    // One drain watcher for the loop's lifetime: it registers its waker once.
    let mut drain = std::pin::pin!(shutdown::drained());
    loop {
        let accepted = monoio::select! {
            a = listener.accept() => a,
            _ = &mut drain => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let w = w.clone();
                monoio::spawn(proxy::serve(w, stream, peer, idx));
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                log::warn(&format!("worker {}: accept failed: {e}", w.id));
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn write_hex(out: &mut [u8], v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
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
