//! Counters for /metrics and /stats.
//!
//! Every counter has exactly one writer (a worker), so it is bumped with a
//! relaxed load and store — no locked instruction, no shared cache line.
//! Readers (the admin thread) sum the shards when scraped. Shards are found
//! through a process-wide registry of weak references: a shard dropped with
//! an old configuration simply disappears from the next scrape.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, Weak,
    },
    time::Duration,
};

/// A counter with one writer.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (only ever called by the owning worker).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Subtracts `n` (for gauges).
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    /// Sets the value (for gauges).
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A counter many threads add to (rare events: drops, evictions).
#[derive(Default)]
pub struct SharedCounter(AtomicU64);

impl SharedCounter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the request duration histogram, in seconds.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the overhead histogram, in seconds: Ringway's own time is microseconds.
pub const OVERHEAD_BUCKETS: [f64; 13] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

/// Lowest status code counted.
const STATUS_MIN: usize = 100;
/// Status codes counted: 100..=599.
const STATUS_SLOTS: usize = 500;

/// One worker's counters for one route.
pub struct RouteShard {
    /// Requests answered, by status code.
    status: Box<[Counter]>,
    /// Request duration histogram buckets (cumulative on export).
    buckets: [Counter; DURATION_BUCKETS.len() + 1],
    /// Sum of durations in microseconds.
    duration_us: Counter,
    /// Bytes received from clients (heads and bodies).
    pub bytes_in: Counter,
    /// Bytes sent to clients.
    pub bytes_out: Counter,
    /// Ringway's own time per request: histogram buckets (cumulative on export).
    overhead: [Counter; OVERHEAD_BUCKETS.len() + 1],
    /// Sum of overheads in nanoseconds.
    overhead_ns: Counter,
}

impl Default for RouteShard {
    fn default() -> Self {
        Self {
            status: (0..STATUS_SLOTS).map(|_| Counter::default()).collect(),
            buckets: Default::default(),
            duration_us: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            overhead: Default::default(),
            overhead_ns: Counter::default(),
        }
    }
}

impl RouteShard {
    /// Records one request's own time in Ringway.
    pub fn observe_overhead(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let b = OVERHEAD_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(OVERHEAD_BUCKETS.len());
        self.overhead[b].add(1);
        self.overhead_ns.add(d.as_nanos() as u64);
    }

    /// Records one answered request.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let idx = (status as usize)
            .saturating_sub(STATUS_MIN)
            .min(STATUS_SLOTS - 1);
        self.status[idx].add(1);
        let secs = elapsed.as_secs_f64();
        let b = DURATION_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[b].add(1);
        self.duration_us.add(elapsed.as_micros() as u64);
    }
}

/// One worker's counters for one upstream.
#[derive(Default)]
pub struct UpstreamShard {
    /// Connections open (busy and idle).
    pub open: Counter,
    /// Idle connections kept.
    pub idle: Counter,
    /// Connections made.
    pub connects: Counter,
    /// Failed connection attempts.
    pub connect_errors: Counter,
    /// Requests retried on another endpoint or a fresh connection.
    pub retries: Counter,
    /// Requests that found every connection slot busy for `connect_timeout` (503 `upstream_busy`).
    pub busy: Counter,
    /// Attempts by route name and outcome (see [`ATTEMPT_OUTCOMES`]). A lock this worker
    /// alone takes, but for the scrape: routes are few and change on reload.
    attempts: Mutex<Vec<(Box<str>, [u64; ATTEMPT_OUTCOMES.len()])>>,
}

/// The `outcome` labels of `ringway_upstream_attempts_total`: `ok` is an answer the client
/// got that was not a failure; the others are failures (retried, or the last attempt's).
pub const ATTEMPT_OUTCOMES: [&str; 7] = [
    "ok",
    "status_429",
    "status_4xx",
    "status_5xx",
    "connect",
    "timeout",
    "reset",
];

impl UpstreamShard {
    /// Counts one attempt of a request on `route`.
    pub fn attempt(&self, route: &str, outcome: &str) {
        let Some(o) = ATTEMPT_OUTCOMES.iter().position(|x| *x == outcome) else {
            return;
        };
        if let Ok(mut t) = self.attempts.lock() {
            match t.iter_mut().find(|e| &*e.0 == route) {
                Some(e) => e.1[o] += 1,
                None => {
                    let mut v = [0; ATTEMPT_OUTCOMES.len()];
                    v[o] = 1;
                    t.push((route.into(), v));
                }
            }
        }
    }
}

/// One worker's process-level counters.
#[derive(Default)]
pub struct WorkerShard {
    /// Client connections open now.
    pub connections: Counter,
    /// Client connections accepted since start.
    pub accepted: Counter,
    /// Pool buffers in use now.
    pub buffers_in_use: Counter,
    /// Pool capacity, in buffers.
    pub buffers_capacity: Counter,
    /// Highest pool use seen.
    pub buffers_peak: Counter,
    /// 0 epoll, 1 io_uring, 2 io_uring with COOP_TASKRUN/SINGLE_ISSUER.
    pub driver: Counter,
    /// Pool buffers lent to the provided-buffer ring now.
    pub buffers_in_ring: Counter,
    /// 0 readiness wait then read, 1 provided-buffer ring.
    pub receive: Counter,
    /// Receives through the ring that completed with data, since start.
    pub ring_receives: Counter,
    /// Receives through the ring that found it empty (then waited for readiness), since start.
    pub ring_empty: Counter,
    /// Reads tried after such a wait, since start.
    pub ring_dry_reads: Counter,
    /// Requests Ringway answered itself, by reason.
    pub rejected: Counter,
}

struct Entry<T> {
    labels: Vec<(&'static str, String)>,
    shard: Weak<T>,
}

/// Every live shard, for scraping.
#[derive(Default)]
pub struct Registry {
    routes: Mutex<Vec<Entry<RouteShard>>>,
    upstreams: Mutex<Vec<Entry<UpstreamShard>>>,
    workers: Mutex<Vec<Entry<WorkerShard>>>,
    /// Access-log lines dropped because the writer could not keep up or write.
    pub access_log_dropped: SharedCounter,
    /// Successful reloads.
    pub reloads: SharedCounter,
    /// Refused reloads.
    pub reload_errors: SharedCounter,
    /// TLS handshakes on listeners: (listener, result, version) → count.
    tls_handshakes: Mutex<Vec<(String, &'static str, &'static str, u64)>>,
    /// TLS handshakes with upstreams: (upstream, resumed) → count.
    upstream_tls_handshakes: Mutex<Vec<(String, bool, u64)>>,
    /// Provider key states by (upstream, key position); weak, so a key that no configuration
    /// holds any more leaves the next scrape.
    keys: Mutex<Vec<(String, usize, Weak<crate::upstream::keys::KeyState>)>>,
}

/// Counts a listener's TLS handshake. One lock per connection: next to the
/// handshake's own crypto it costs nothing, and the table stays small
/// (listeners × results × versions).
pub fn tls_handshake(listener: &str, result: &'static str, version: &'static str) {
    if let Ok(mut t) = registry().tls_handshakes.lock() {
        match t
            .iter_mut()
            .find(|e| e.0 == listener && e.1 == result && e.2 == version)
        {
            Some(e) => e.3 += 1,
            None => t.push((listener.to_owned(), result, version, 1)),
        }
    }
}

/// Counts a TLS handshake with an upstream, resumed or full.
pub fn upstream_tls_handshake(upstream: &str, resumed: bool) {
    if let Ok(mut t) = registry().upstream_tls_handshakes.lock() {
        match t.iter_mut().find(|e| e.0 == upstream && e.1 == resumed) {
            Some(e) => e.2 += 1,
            None => t.push((upstream.to_owned(), resumed, 1)),
        }
    }
}

/// The process registry.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

fn push<T>(list: &Mutex<Vec<Entry<T>>>, labels: Vec<(&'static str, String)>, shard: &Arc<T>) {
    if let Ok(mut l) = list.lock() {
        l.retain(|e| e.shard.strong_count() > 0);
        l.push(Entry {
            labels,
            shard: Arc::downgrade(shard),
        });
    }
}

impl Registry {
    /// A new route shard for `route` on `worker`.
    pub fn route_shard(&self, route: &str, worker: usize) -> Arc<RouteShard> {
        let s = Arc::new(RouteShard::default());
        push(
            &self.routes,
            vec![("route", route.to_string()), ("worker", worker.to_string())],
            &s,
        );
        s
    }

    /// A new upstream shard for `upstream` on `worker`.
    pub fn upstream_shard(&self, upstream: &str, worker: usize) -> Arc<UpstreamShard> {
        let s = Arc::new(UpstreamShard::default());
        push(
            &self.upstreams,
            vec![
                ("upstream", upstream.to_string()),
                ("worker", worker.to_string()),
            ],
            &s,
        );
        s
    }

    /// The shared state of key `pos` of `upstream`: the live one when a configuration still
    /// holds it (so counters run on across a reload), else a new one. Called at start and on
    /// reload only.
    pub fn key_state(&self, upstream: &str, pos: usize) -> Arc<crate::upstream::keys::KeyState> {
        let Ok(mut l) = self.keys.lock() else {
            return Arc::default();
        };
        l.retain(|e| e.2.strong_count() > 0);
        if let Some(s) = l
            .iter()
            .find(|e| e.0 == upstream && e.1 == pos)
            .and_then(|e| e.2.upgrade())
        {
            return s;
        }
        let s = Arc::new(crate::upstream::keys::KeyState::default());
        l.push((upstream.to_string(), pos, Arc::downgrade(&s)));
        s
    }

    fn render_keys(&self, out: &mut String) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let mut live = Vec::new();
        if let Ok(l) = self.keys.lock() {
            for (up, pos, w) in l.iter() {
                if let Some(s) = w.upgrade() {
                    live.push((esc(up), *pos, s));
                }
            }
        }
        live.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let now = crate::upstream::health::now_ms();
        let _ = writeln!(
            out,
            "# HELP ringway_upstream_key_requests_total Requests sent with each provider key, by upstream and key position."
        );
        let _ = writeln!(out, "# TYPE ringway_upstream_key_requests_total counter");
        for (up, pos, s) in &live {
            let _ = writeln!(
                out,
                "ringway_upstream_key_requests_total{{upstream=\"{up}\",key=\"{pos}\"}} {}",
                s.requests.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringway_upstream_key_responses_total Provider responses to each key, by status class."
        );
        let _ = writeln!(out, "# TYPE ringway_upstream_key_responses_total counter");
        for (up, pos, s) in &live {
            for (i, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "ringway_upstream_key_responses_total{{upstream=\"{up}\",key=\"{pos}\",class=\"{class}\"}} {}",
                    s.responses[i].load(Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringway_upstream_key_cooling 1 while a provider key cools down after a 429."
        );
        let _ = writeln!(out, "# TYPE ringway_upstream_key_cooling gauge");
        for (up, pos, s) in &live {
            let _ = writeln!(
                out,
                "ringway_upstream_key_cooling{{upstream=\"{up}\",key=\"{pos}\"}} {}",
                u8::from(s.cooling(now))
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringway_upstream_key_disabled 1 for a provider key answered 401/403, unused until the next reload."
        );
        let _ = writeln!(out, "# TYPE ringway_upstream_key_disabled gauge");
        for (up, pos, s) in &live {
            let _ = writeln!(
                out,
                "ringway_upstream_key_disabled{{upstream=\"{up}\",key=\"{pos}\"}} {}",
                u8::from(s.disabled.load(Relaxed))
            );
        }
    }

    /// A new process shard for `worker`.
    pub fn worker_shard(&self, worker: usize) -> Arc<WorkerShard> {
        let s = Arc::new(WorkerShard::default());
        push(&self.workers, vec![("worker", worker.to_string())], &s);
        s
    }

    /// Per-worker snapshots for /stats.
    pub fn worker_stats(&self) -> Vec<(usize, WorkerSnapshot)> {
        let mut out = Vec::new();
        if let Ok(l) = self.workers.lock() {
            for e in l.iter() {
                let Some(s) = e.shard.upgrade() else { continue };
                let id = e.labels[0].1.parse().unwrap_or(0);
                out.push((
                    id,
                    WorkerSnapshot {
                        connections: s.connections.get(),
                        accepted: s.accepted.get(),
                        buffers_in_use: s.buffers_in_use.get(),
                        buffers_capacity: s.buffers_capacity.get(),
                        buffers_peak: s.buffers_peak.get(),
                        buffers_in_ring: s.buffers_in_ring.get(),
                        ring_receives: s.ring_receives.get(),
                        ring_empty: s.ring_empty.get(),
                        ring_dry_reads: s.ring_dry_reads.get(),
                        receive: if s.receive.get() == 1 {
                            "buffer_ring"
                        } else {
                            "readiness"
                        },
                        driver: match s.driver.get() {
                            2 => "io_uring (coop_taskrun, single_issuer)",
                            1 => "io_uring",
                            _ => "epoll",
                        },
                    },
                ));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        out
    }

    /// Per-worker, per-upstream pool sizes for /stats.
    pub fn upstream_stats(&self) -> Vec<(String, usize, u64, u64, u64)> {
        let mut out = Vec::new();
        if let Ok(l) = self.upstreams.lock() {
            for e in l.iter() {
                let Some(s) = e.shard.upgrade() else { continue };
                let worker = e.labels[1].1.parse().unwrap_or(0);
                out.push((
                    e.labels[0].1.clone(),
                    worker,
                    s.open.get(),
                    s.idle.get(),
                    s.connects.get(),
                ));
            }
        }
        out
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        self.render_keys(out);
        // Routes: summed over workers, keyed by route name.
        let mut routes: Vec<RouteSum> = Vec::new();
        if let Ok(l) = self.routes.lock() {
            for e in l.iter() {
                let Some(s) = e.shard.upgrade() else { continue };
                let name = &e.labels[0].1;
                let idx = match routes.iter().position(|r| &r.0 == name) {
                    Some(i) => i,
                    None => {
                        routes.push((
                            name.clone(),
                            vec![0; STATUS_SLOTS],
                            vec![0; DURATION_BUCKETS.len() + 1],
                            0,
                            0,
                            0,
                        ));
                        routes.len() - 1
                    }
                };
                let r = &mut routes[idx];
                for (i, c) in s.status.iter().enumerate() {
                    r.1[i] += c.get();
                }
                for (i, c) in s.buckets.iter().enumerate() {
                    r.2[i] += c.get();
                }
                r.3 += s.duration_us.get();
                r.4 += s.bytes_in.get();
                r.5 += s.bytes_out.get();
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringway_requests_total Requests answered, by route and status."
        );
        let _ = writeln!(out, "# TYPE ringway_requests_total counter");
        for r in &routes {
            for (i, &n) in r.1.iter().enumerate() {
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "ringway_requests_total{{route=\"{}\",status=\"{}\"}} {n}",
                        esc(&r.0),
                        i + STATUS_MIN
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringway_request_duration_seconds Time from request head to end of response."
        );
        let _ = writeln!(out, "# TYPE ringway_request_duration_seconds histogram");
        for r in &routes {
            let mut cum = 0;
            for (i, le) in DURATION_BUCKETS.iter().enumerate() {
                cum += r.2[i];
                let _ = writeln!(
                    out,
                    "ringway_request_duration_seconds_bucket{{route=\"{}\",le=\"{le}\"}} {cum}",
                    esc(&r.0)
                );
            }
            cum += r.2[DURATION_BUCKETS.len()];
            let _ = writeln!(
                out,
                "ringway_request_duration_seconds_bucket{{route=\"{}\",le=\"+Inf\"}} {cum}",
                esc(&r.0)
            );
            let _ = writeln!(
                out,
                "ringway_request_duration_seconds_sum{{route=\"{}\"}} {}",
                esc(&r.0),
                r.3 as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "ringway_request_duration_seconds_count{{route=\"{}\"}} {cum}",
                esc(&r.0)
            );
        }
        // Ringway's own time, summed over workers, per route.
        let mut overhead: Vec<(String, Vec<u64>, u64)> = Vec::new();
        if let Ok(l) = self.routes.lock() {
            for e in l.iter() {
                let Some(s) = e.shard.upgrade() else { continue };
                let name = &e.labels[0].1;
                let idx = match overhead.iter().position(|r| &r.0 == name) {
                    Some(i) => i,
                    None => {
                        overhead.push((name.clone(), vec![0; OVERHEAD_BUCKETS.len() + 1], 0));
                        overhead.len() - 1
                    }
                };
                let r = &mut overhead[idx];
                for (i, c) in s.overhead.iter().enumerate() {
                    r.1[i] += c.get();
                }
                r.2 += s.overhead_ns.get();
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringway_overhead_seconds Time a request spends in Ringway itself: request head received to head sent upstream (limits and the upstream connection included), response head received to head sent to the client, and body processing on AI routes."
        );
        let _ = writeln!(out, "# TYPE ringway_overhead_seconds histogram");
        for r in &overhead {
            let mut cum = 0;
            for (i, le) in OVERHEAD_BUCKETS.iter().enumerate() {
                cum += r.1[i];
                let _ = writeln!(
                    out,
                    "ringway_overhead_seconds_bucket{{route=\"{}\",le=\"{le}\"}} {cum}",
                    esc(&r.0)
                );
            }
            cum += r.1[OVERHEAD_BUCKETS.len()];
            let _ = writeln!(
                out,
                "ringway_overhead_seconds_bucket{{route=\"{}\",le=\"+Inf\"}} {cum}",
                esc(&r.0)
            );
            let _ = writeln!(
                out,
                "ringway_overhead_seconds_sum{{route=\"{}\"}} {}",
                esc(&r.0),
                r.2 as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "ringway_overhead_seconds_count{{route=\"{}\"}} {cum}",
                esc(&r.0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringway_request_bytes_total Bytes received from clients, by route."
        );
        let _ = writeln!(out, "# TYPE ringway_request_bytes_total counter");
        for r in &routes {
            let _ = writeln!(
                out,
                "ringway_request_bytes_total{{route=\"{}\"}} {}",
                esc(&r.0),
                r.4
            );
        }
        let _ = writeln!(
            out,
            "# HELP ringway_response_bytes_total Bytes sent to clients, by route."
        );
        let _ = writeln!(out, "# TYPE ringway_response_bytes_total counter");
        for r in &routes {
            let _ = writeln!(
                out,
                "ringway_response_bytes_total{{route=\"{}\"}} {}",
                esc(&r.0),
                r.5
            );
        }

        // Upstreams, summed over workers.
        let mut ups: Vec<(String, [u64; 6])> = Vec::new();
        let mut attempts: Vec<(String, String, [u64; ATTEMPT_OUTCOMES.len()])> = Vec::new();
        if let Ok(l) = self.upstreams.lock() {
            for e in l.iter() {
                let Some(s) = e.shard.upgrade() else { continue };
                let name = &e.labels[0].1;
                if let Ok(t) = s.attempts.lock() {
                    for (route, v) in t.iter() {
                        match attempts
                            .iter_mut()
                            .find(|a| &a.0 == name && *a.1 == **route)
                        {
                            Some(a) => a.2.iter_mut().zip(v).for_each(|(x, y)| *x += y),
                            None => attempts.push((name.clone(), route.to_string(), *v)),
                        }
                    }
                }
                let idx = match ups.iter().position(|u| &u.0 == name) {
                    Some(i) => i,
                    None => {
                        ups.push((name.clone(), [0; 6]));
                        ups.len() - 1
                    }
                };
                let v = &mut ups[idx].1;
                v[0] += s.open.get();
                v[1] += s.idle.get();
                v[2] += s.connects.get();
                v[3] += s.connect_errors.get();
                v[4] += s.retries.get();
                v[5] += s.busy.get();
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringway_upstream_connections Upstream connections open, by state."
        );
        let _ = writeln!(out, "# TYPE ringway_upstream_connections gauge");
        for (name, v) in &ups {
            let _ = writeln!(
                out,
                "ringway_upstream_connections{{upstream=\"{}\",state=\"active\"}} {}",
                esc(name),
                v[0].saturating_sub(v[1])
            );
            let _ = writeln!(
                out,
                "ringway_upstream_connections{{upstream=\"{}\",state=\"idle\"}} {}",
                esc(name),
                v[1]
            );
        }
        for (metric, help, i) in [
            (
                "ringway_upstream_connects_total",
                "Upstream connections made.",
                2,
            ),
            (
                "ringway_upstream_connect_errors_total",
                "Failed upstream connection attempts.",
                3,
            ),
            ("ringway_upstream_retries_total", "Requests retried.", 4),
            (
                "ringway_upstream_busy_total",
                "Requests answered 503 upstream_busy: every connection slot stayed busy.",
                5,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}");
            let _ = writeln!(out, "# TYPE {metric} counter");
            for (name, v) in &ups {
                let _ = writeln!(out, "{metric}{{upstream=\"{}\"}} {}", esc(name), v[i]);
            }
        }

        let _ = writeln!(
            out,
            "# HELP ringway_upstream_attempts_total Requests sent upstream (attempts), by route, upstream and outcome."
        );
        let _ = writeln!(out, "# TYPE ringway_upstream_attempts_total counter");
        attempts.sort();
        for (up, route, v) in &attempts {
            for (o, n) in ATTEMPT_OUTCOMES.iter().zip(v) {
                let _ = writeln!(
                    out,
                    "ringway_upstream_attempts_total{{route=\"{}\",upstream=\"{}\",outcome=\"{o}\"}} {n}",
                    esc(route),
                    esc(up)
                );
            }
        }

        // Workers.
        let workers = self.worker_stats();
        for (metric, help, kind, get) in [
            (
                "ringway_connections",
                "Client connections open.",
                "gauge",
                (|s: &WorkerSnapshot| s.connections) as fn(&WorkerSnapshot) -> u64,
            ),
            (
                "ringway_connections_accepted_total",
                "Client connections accepted.",
                "counter",
                |s| s.accepted,
            ),
            (
                "ringway_buffer_pool_in_use",
                "Pool buffers in use.",
                "gauge",
                |s| s.buffers_in_use,
            ),
            (
                "ringway_buffer_pool_capacity",
                "Pool buffers available at most.",
                "gauge",
                |s| s.buffers_capacity,
            ),
            (
                "ringway_buffer_pool_peak",
                "Most pool buffers in use at once.",
                "gauge",
                |s| s.buffers_peak,
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}");
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (id, s) in &workers {
                let _ = writeln!(out, "{metric}{{worker=\"{id}\"}} {}", get(s));
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringway_driver_info The I/O driver each worker runs on."
        );
        let _ = writeln!(out, "# TYPE ringway_driver_info gauge");
        for (id, s) in &workers {
            let _ = writeln!(
                out,
                "ringway_driver_info{{worker=\"{id}\",driver=\"{}\"}} 1",
                s.driver
            );
        }
        for (metric, help, v) in [
            (
                "ringway_access_log_dropped_total",
                "Access-log lines dropped.",
                self.access_log_dropped.get(),
            ),
            (
                "ringway_reloads_total",
                "Configuration reloads applied.",
                self.reloads.get(),
            ),
            (
                "ringway_reload_errors_total",
                "Configuration reloads refused.",
                self.reload_errors.get(),
            ),
        ] {
            let _ = writeln!(out, "# HELP {metric} {help}");
            let _ = writeln!(out, "# TYPE {metric} counter");
            let _ = writeln!(out, "{metric} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP ringway_tls_handshakes_total TLS handshakes on listeners, by result and version."
        );
        let _ = writeln!(out, "# TYPE ringway_tls_handshakes_total counter");
        if let Ok(t) = self.tls_handshakes.lock() {
            for (listener, result, version, n) in t.iter() {
                let _ = writeln!(
                    out,
                    "ringway_tls_handshakes_total{{listener=\"{listener}\",result=\"{result}\",version=\"{version}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP ringway_upstream_tls_handshakes_total TLS handshakes with upstreams, full or resumed."
        );
        let _ = writeln!(out, "# TYPE ringway_upstream_tls_handshakes_total counter");
        if let Ok(t) = self.upstream_tls_handshakes.lock() {
            for (upstream, resumed, n) in t.iter() {
                let _ = writeln!(
                    out,
                    "ringway_upstream_tls_handshakes_total{{upstream=\"{upstream}\",resumed=\"{resumed}\"}} {n}"
                );
            }
        }
        render_process(out);
    }
}

/// One route summed over workers: name, statuses, buckets, duration µs, bytes in, bytes out.
type RouteSum = (String, Vec<u64>, Vec<u64>, u64, u64, u64);

/// A worker's figures at one moment.
pub struct WorkerSnapshot {
    /// Client connections open.
    pub connections: u64,
    /// Client connections accepted.
    pub accepted: u64,
    /// Pool buffers in use.
    pub buffers_in_use: u64,
    /// Pool capacity.
    pub buffers_capacity: u64,
    /// Pool high-water mark.
    pub buffers_peak: u64,
    /// Pool buffers lent to the provided-buffer ring.
    pub buffers_in_ring: u64,
    /// Receives through the ring that completed with data.
    pub ring_receives: u64,
    /// Receives through the ring that found it empty.
    pub ring_empty: u64,
    /// Reads tried after a wait that found the ring empty.
    pub ring_dry_reads: u64,
    /// The receive path: "buffer_ring" or "readiness".
    pub receive: &'static str,
    /// Driver name.
    pub driver: &'static str,
}

/// Escapes a label value for the text format.
pub fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The standard `process_*` metrics, read from /proc.
fn render_process(out: &mut String) {
    use std::fmt::Write;
    let ticks = 100.0; // USER_HZ is 100 on every Linux ABI Ringway runs on.
    let page = 4096.0;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces).
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
            let f: Vec<&str> = rest.split(' ').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // rest[0] is field 3 (state): utime=14, stime=15, starttime=22, vsize=23, rss=24.
            let cpu = (num(11) + num(12)) / ticks;
            let _ = writeln!(
                out,
                "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds."
            );
            let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
            let _ = writeln!(out, "process_cpu_seconds_total {cpu}");
            let _ = writeln!(
                out,
                "# HELP process_virtual_memory_bytes Virtual memory size in bytes."
            );
            let _ = writeln!(out, "# TYPE process_virtual_memory_bytes gauge");
            let _ = writeln!(out, "process_virtual_memory_bytes {}", num(20));
            let _ = writeln!(
                out,
                "# HELP process_resident_memory_bytes Resident memory size in bytes."
            );
            let _ = writeln!(out, "# TYPE process_resident_memory_bytes gauge");
            let _ = writeln!(out, "process_resident_memory_bytes {}", num(21) * page);
            if let Some(boot) = boot_time() {
                let _ = writeln!(out, "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.");
                let _ = writeln!(out, "# TYPE process_start_time_seconds gauge");
                let _ = writeln!(out, "process_start_time_seconds {}", boot + num(19) / ticks);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors."
        );
        let _ = writeln!(out, "# TYPE process_open_fds gauge");
        let _ = writeln!(out, "process_open_fds {}", dir.count());
    }
}

fn boot_time() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}
