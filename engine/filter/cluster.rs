//! `scope = "cluster"`: limits exact across replicas, through Redis leases.
//!
//! Redis holds the truth: per key and clock-aligned window, the units
//! granted to all replicas. The Redis thread (part of the control core)
//! batches lease requests every `redis.flush_interval` into one atomic Lua
//! call that grants `min(ask, limit - used)`; workers admit while their
//! process's lease lasts. Asks shrink as the window fills, down to 1, so the
//! cluster never admits more than the limit. Unspent leases are returned
//! shortly before their window ends so other replicas can use them.
//!
//! A worker waits for Redis only when its key has no lease, and then at
//! most `redis.timeout`; when Redis is unreachable, the filter's
//! `failure_mode` decides.

use std::{
    collections::{hash_map::Entry, HashMap},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc, Mutex, OnceLock,
    },
    task::{Context, Poll, Waker},
    thread,
    time::{Duration, Instant},
};

use ringway_filters::limit::{
    lease::{lease_ask, redis_key, LeaseSlot, CHARGE_LUA, GRANT_LUA, RETURN_LUA},
    window::{reset_after_ms, window_end, window_start},
    Decision,
};

use super::ledger::{self, Totals};
use super::limit::{LimitCheck, RateLimit};
use crate::{config, log, metrics::SharedCounter, runtime::deadline, upstream::health::now_ms};

/// Shards of the per-filter key map (fewer lock collisions between workers).
const SHARDS: usize = 16;
/// Lease requests queued to the Redis thread before requests fail over.
const QUEUE: usize = 8192;
/// Most windows a rule may have.
const MAX_WINDOWS: usize = 4;
/// How long a refused request waits before asking Redis once more.
const RECHECK_AFTER: Duration = Duration::from_millis(20);
/// How long a key Redis refused is refused locally before asking again.
const EXHAUSTED_MS: u64 = 200;

/// Redis could not answer in time (or is down): apply `failure_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// One key's leases, one per window of its rule.
pub struct KeyLeases {
    key: Vec<u8>,
    windows: [WindowLease; MAX_WINDOWS],
    last_used_ms: AtomicU64,
}

#[derive(Default)]
struct WindowLease {
    slot: LeaseSlot,
    /// The last grant and the window it was for: a key that keeps coming
    /// back in one window gets leases that double, so a hot key costs a
    /// handful of Redis calls per window instead of one per few requests.
    last_grant: AtomicU64,
    last_grant_window: AtomicU64,
    /// Units Redis reported granted to all replicas after our last grant.
    used_known: AtomicU64,
    /// Until when (ms) Redis is known to have nothing left for this key:
    /// refuse without asking again. Short, because returned units (a token
    /// reservation settled lower, another replica's leftovers) free room.
    exhausted_until: AtomicU64,
}

/// The process-wide lease state of one cluster filter, bounded by `max_keys`.
pub struct ClusterLimit {
    shards: Vec<Mutex<HashMap<u64, Arc<KeyLeases>>>>,
    per_shard: usize,
    evictions: AtomicU64,
}

impl ClusterLimit {
    /// Room for `max_keys` keys.
    pub fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            evictions: AtomicU64::new(0),
        }
    }

    /// Keys evicted to stay within `max_keys`.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn leases(&self, check: &LimitCheck, now: u64) -> Arc<KeyLeases> {
        let shard = &self.shards[(check.key_hash as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = map.get(&check.key_hash) {
            if k.key == check.key() {
                k.last_used_ms.store(now, Ordering::Relaxed);
                return k.clone();
            }
        }
        if map.len() >= self.per_shard {
            // Evict the least recently used key of this shard. Its unspent
            // lease simply expires with its window in Redis.
            if let Some((&victim, _)) = map
                .iter()
                .min_by_key(|(_, k)| k.last_used_ms.load(Ordering::Relaxed))
            {
                map.remove(&victim);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let k = Arc::new(KeyLeases {
            key: check.key().to_vec(),
            windows: Default::default(),
            last_used_ms: AtomicU64::new(now),
        });
        match map.entry(check.key_hash) {
            Entry::Occupied(mut e) => {
                e.insert(k.clone());
            }
            Entry::Vacant(e) => {
                e.insert(k.clone());
            }
        }
        k
    }

    /// Takes one unit from every window's lease, asking Redis for more when
    /// a lease is empty.
    pub async fn acquire(
        &self,
        rl: &RateLimit,
        check: &LimitCheck,
        windows: &[(u64, u64)],
        cost: u64,
        now: u64,
        timeout: Duration,
    ) -> Result<Decision, Unavailable> {
        let leases = self.leases(check, now);
        let mut tightest = Decision::UNLIMITED;
        for (i, &(period, limit)) in windows.iter().enumerate().take(MAX_WINDOWS) {
            let ws = window_start(now, period);
            let w = &leases.windows[i];
            let reset = reset_after_ms(now, period);
            let refused = Decision {
                admitted: false,
                remaining: 0,
                reset_ms: reset,
                limit,
            };
            let mut asked = 0;
            let mut recheck = false;
            loop {
                // Units in hand first: a spent window may still have some
                // here from an earlier grant.
                if w.slot.take(cost, ws) {
                    let used = w.used_known.load(Ordering::Relaxed);
                    let remaining = limit.saturating_sub(used) + w.slot.remaining();
                    if remaining < tightest.remaining {
                        tightest = Decision {
                            admitted: true,
                            remaining,
                            reset_ms: reset,
                            limit,
                        };
                    }
                    break;
                }
                if now_ms() < w.exhausted_until.load(Ordering::Relaxed) {
                    // A partial grant too small for this reservation would
                    // sit unused here: give it back for every replica.
                    if rl.tokens {
                        let left = w.slot.drain(ws);
                        if left > 0 {
                            submit_return(redis_key(&rl.name, &leases.key, ws), left);
                        }
                    }
                    return Ok(refused);
                }
                // Several waiters may share one grant; a few rounds at most.
                if asked == 3 {
                    if rl.tokens {
                        let left = w.slot.drain(ws);
                        if left > 0 {
                            submit_return(redis_key(&rl.name, &leases.key, ws), left);
                        }
                    }
                    return Ok(refused);
                }
                asked += 1;
                let reply = Arc::new(Reply::default());
                let req = LeaseRequest {
                    demand: cost,
                    tokens: rl.tokens,
                    leases: leases.clone(),
                    index: i,
                    filter: rl.name.clone(),
                    window_start: ws,
                    period,
                    limit,
                    replicas: rl.conf.replicas.max(1),
                    reply: reply.clone(),
                };
                if !submit_lease(req) {
                    return Err(Unavailable);
                }
                match deadline::timeout(timeout, WaitReply(&reply)).await {
                    Ok(REPLY_GRANTED) => continue,
                    Ok(REPLY_EXHAUSTED) if rl.tokens && !recheck => {
                        // Another replica may be returning a settled token
                        // reservation right now: ask once more, a little later.
                        recheck = true;
                        // Boxed: monoio's `Sleep` (640 bytes, aligned to 128) inline
                        // would pad the state of every request with a limit.
                        Box::pin(monoio::time::sleep(RECHECK_AFTER)).await;
                        w.exhausted_until.store(0, Ordering::Relaxed);
                        continue;
                    }
                    Ok(REPLY_EXHAUSTED) => continue,
                    _ => return Err(Unavailable),
                }
            }
        }
        Ok(tightest)
    }
}

impl ClusterLimit {
    /// Settles a reservation: unused units go back to Redis (for every
    /// replica); extra usage is taken from this process's lease as far as it
    /// goes (the overshoot is bounded by one reservation).
    pub fn reconcile(
        &self,
        filter: &str,
        check: &LimitCheck,
        windows: &[(u64, u64)],
        reserved: u64,
        used: u64,
        taken_ms: u64,
    ) {
        let leases = self.leases(check, now_ms());
        for (i, &(period, _)) in windows.iter().enumerate().take(MAX_WINDOWS) {
            let ws = window_start(taken_ms, period);
            let slot = &leases.windows[i].slot;
            if used < reserved {
                // Back to Redis, so every replica can use them this window.
                submit_return(redis_key(filter, &leases.key, ws), reserved - used);
            } else {
                // The overrun comes out of this process's lease when it holds enough, else it
                // is charged to Redis: spent is spent, whatever the lease.
                let extra = used - reserved;
                let now = now_ms();
                let ws_now = window_start(now, period);
                if !slot.take(extra, ws_now) {
                    let ttl = window_end(ws_now, period).saturating_sub(now) + 5_000;
                    submit(Msg::Charge {
                        redis_key: redis_key(filter, &leases.key, ws_now),
                        units: extra,
                        ttl,
                    });
                }
            }
        }
    }
}

const REPLY_PENDING: u8 = 0;
const REPLY_GRANTED: u8 = 1;
const REPLY_EXHAUSTED: u8 = 2;
const REPLY_UNAVAILABLE: u8 = 3;

/// The Redis thread's answer to one lease request, waking the worker task.
#[derive(Default)]
struct Reply {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl Reply {
    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        let w = self.waker.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = w {
            w.wake();
        }
    }
}

struct WaitReply<'a>(&'a Reply);

impl Future for WaitReply<'_> {
    type Output = u8;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u8> {
        let s = self.0.state.load(Ordering::Acquire);
        if s != REPLY_PENDING {
            return Poll::Ready(s);
        }
        if let Ok(mut w) = self.0.waker.lock() {
            *w = Some(cx.waker().clone());
        }
        // The reply may have landed between the check and the registration.
        match self.0.state.load(Ordering::Acquire) {
            REPLY_PENDING => Poll::Pending,
            s => Poll::Ready(s),
        }
    }
}

struct LeaseRequest {
    /// Units this request needs (1, or a token reservation).
    demand: u64,
    /// A token reservation: ask exactly the demand (see `flush_grants`).
    tokens: bool,
    leases: Arc<KeyLeases>,
    index: usize,
    filter: String,
    window_start: u64,
    period: u64,
    limit: u64,
    replicas: u32,
    reply: Arc<Reply>,
}

/// Counters of the Redis thread.
#[derive(Default)]
pub struct RedisStats {
    /// Calls made to Redis (one per flush on a single Redis).
    pub calls: SharedCounter,
    /// Flushes that failed (Redis down, timeout, error reply).
    pub errors: SharedCounter,
    /// Units granted.
    pub granted: SharedCounter,
    /// Unspent units returned before their window ended.
    pub returned: SharedCounter,
}

/// The Redis thread's counters.
pub fn stats() -> &'static RedisStats {
    static S: OnceLock<RedisStats> = OnceLock::new();
    S.get_or_init(RedisStats::default)
}

/// Work for the Redis thread.
enum Msg {
    /// A key needs a lease.
    Lease(LeaseRequest),
    /// Units taken but not used (a token reservation settled lower): give
    /// them back to Redis so every replica can use them.
    Return { redis_key: String, units: u64 },
    /// Units used beyond a reservation that no lease covered.
    Charge {
        redis_key: String,
        units: u64,
        ttl: u64,
    },
    /// A settled request's use, added to its key's usage hash for `/usage`.
    Usage {
        hash: String,
        index: String,
        member: Vec<u8>,
        expire_at: u64,
        totals: Totals,
    },
}

/// Queues a settled request's use of one key and window for the usage hash in Redis (see
/// [`super::ledger`]); dropped when the queue is full, as a return is.
pub fn submit_usage(filter: &str, key: &[u8], period: u64, window_start: u64, totals: Totals) {
    // Kept a day past the window, for a /usage that asks just after it ended.
    let expire_at = window_end(window_start, period).saturating_add(86_400_000);
    submit(Msg::Usage {
        hash: ledger::redis_hash(filter, key, period, window_start),
        index: ledger::redis_index(filter, period, window_start),
        member: key.to_vec(),
        expire_at,
        totals,
    });
}

static QUEUE_TX: OnceLock<SyncSender<Msg>> = OnceLock::new();

/// Queues work that needs no answer; dropped when the queue is full.
fn submit(m: Msg) {
    if let Some(tx) = QUEUE_TX.get() {
        let _ = tx.try_send(m);
    }
}

fn submit_lease(req: LeaseRequest) -> bool {
    let Some(tx) = QUEUE_TX.get() else {
        return false;
    };
    match tx.try_send(Msg::Lease(req)) {
        Ok(()) => true,
        Err(TrySendError::Full(Msg::Lease(r))) | Err(TrySendError::Disconnected(Msg::Lease(r))) => {
            r.reply.set(REPLY_UNAVAILABLE);
            false
        }
        Err(_) => false,
    }
}

/// Queues a return of `units` for a key's window; dropped (and left to expire
/// with the window) if the queue is full.
fn submit_return(redis_key: String, units: u64) {
    if let Some(tx) = QUEUE_TX.get() {
        let _ = tx.try_send(Msg::Return { redis_key, units });
    }
}

/// Starts the Redis thread (once); it follows `[redis]` of the configuration
/// in force.
pub fn start(core: Option<core_affinity::CoreId>) -> std::io::Result<()> {
    if QUEUE_TX.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let _ = QUEUE_TX.set(tx);
    thread::Builder::new()
        .name("ringway-redis".into())
        .spawn(move || {
            if let Some(c) = core {
                core_affinity::set_for_current(c);
            }
            run(rx)
        })?;
    Ok(())
}

/// A connection to the `[redis]` of the configuration: one server or a Redis Cluster.
pub(crate) enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    /// Connects, within `[redis] timeout`.
    pub(crate) fn open(conf: &config::Redis) -> redis::RedisResult<Conn> {
        // The redis client builds its rustls config from the process default provider.
        crate::tls::provider();
        let certs = tls_certs(conf)?;
        if let Some(url) = &conf.url {
            let c = match certs {
                Some(certs) => redis::Client::build_with_tls(url.as_str(), certs)?,
                None => redis::Client::open(url.as_str())?,
            };
            let con = c.get_connection_with_timeout(conf.timeout)?;
            con.set_read_timeout(Some(conf.timeout))?;
            con.set_write_timeout(Some(conf.timeout))?;
            Ok(Conn::Single(con))
        } else {
            let mut builder = redis::cluster::ClusterClient::builder(conf.cluster_nodes.clone())
                .connection_timeout(conf.timeout)
                .response_timeout(conf.timeout);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            Ok(Conn::Cluster(Box::new(builder.build()?.get_connection()?)))
        }
    }

    /// Runs one command.
    pub(crate) fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: &mut redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(con) => cmd.query(con),
            Conn::Cluster(con) => cmd.query(&mut **con),
        }
    }
}

/// `[redis] tls.ca`, read again at each connect (on this thread, which may block) so that a
/// renewed CA file is picked up; `None` keeps the compiled-in public roots for rediss://.
fn tls_certs(conf: &config::Redis) -> redis::RedisResult<Option<redis::TlsCertificates>> {
    let Some(path) = conf.tls.as_ref().and_then(|t| t.ca.as_ref()) else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "cannot read redis.tls.ca",
            format!("{}: {e}", path.display()),
        ))
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A lease granted for a window, to be returned if unspent near its end.
struct Outstanding {
    leases: Arc<KeyLeases>,
    index: usize,
    window_start: u64,
    return_at: u64,
}

fn run(rx: Receiver<Msg>) {
    let grant = redis::Script::new(GRANT_LUA);
    let give_back = redis::Script::new(RETURN_LUA);
    let mut conn: Option<Conn> = None;
    let mut retry_at = Instant::now();
    let mut backoff = Duration::from_millis(100);
    // One entry per key and window (the Redis key names both), however
    // many grants it had: bounded by the keys leased in open windows.
    let mut outstanding: HashMap<String, Outstanding> = HashMap::new();
    let mut last_flush = Instant::now();
    loop {
        let conf = crate::runtime::current().and_then(|s| s.cfg.redis.clone());
        let flush = conf
            .as_ref()
            .map_or(Duration::from_millis(5), |c| c.flush_interval);
        // Wait for work, but wake regularly to return leases in time.
        let first = match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: Vec<LeaseRequest> = Vec::new();
        let mut returns: Vec<(String, u64)> = Vec::new();
        let mut charges: Vec<(String, u64, u64)> = Vec::new();
        let mut usage: HashMap<String, UsageAdd> = HashMap::new();
        if let Some(first) = first {
            // Batch: let requests gather until one flush interval after the last flush.
            let since = last_flush.elapsed();
            if since < flush {
                thread::sleep(flush - since);
            }
            let mut take = |m: Msg| match m {
                Msg::Lease(r) => batch.push(r),
                Msg::Return { redis_key, units } => {
                    match returns.iter_mut().find(|(k, _)| *k == redis_key) {
                        Some((_, n)) => *n += units,
                        None => returns.push((redis_key, units)),
                    }
                }
                Msg::Charge {
                    redis_key,
                    units,
                    ttl,
                } => match charges.iter_mut().find(|(k, _, _)| *k == redis_key) {
                    Some((_, n, _)) => *n += units,
                    None => charges.push((redis_key, units, ttl)),
                },
                Msg::Usage {
                    hash,
                    index,
                    member,
                    expire_at,
                    totals,
                } => {
                    let e = usage.entry(hash).or_insert_with(|| UsageAdd {
                        index,
                        member,
                        expire_at,
                        totals: Totals::default(),
                    });
                    e.totals.requests += totals.requests;
                    e.totals.input += totals.input;
                    e.totals.output += totals.output;
                    e.totals.cached += totals.cached;
                    e.totals.spend_micro += totals.spend_micro;
                    e.totals.estimated |= totals.estimated;
                }
            };
            take(first);
            while let Ok(m) = rx.try_recv() {
                take(m);
            }
        }
        let Some(conf) = conf else {
            for r in batch {
                r.reply.set(REPLY_UNAVAILABLE);
            }
            continue;
        };
        if conn.is_none() && Instant::now() >= retry_at {
            match Conn::open(&conf) {
                Ok(c) => {
                    log::info("redis: connected");
                    conn = Some(c);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    stats().errors.add(1);
                    log::warn(&format!(
                        "redis: cannot connect: {e}; retrying in {backoff:?}"
                    ));
                    retry_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            for r in batch {
                r.reply.set(REPLY_UNAVAILABLE);
            }
            continue;
        };
        let now = now_ms();
        let mut failed = false;
        // Returns first: the room they free is there for this flush's grants.
        for (k, n) in &returns {
            stats().returned.add(*n);
            stats().calls.add(1);
            let res: redis::RedisResult<Vec<i64>> = match c {
                Conn::Single(con) => give_back.key(k).arg(*n).invoke(con),
                Conn::Cluster(con) => give_back.key(k).arg(*n).invoke(&mut **con),
            };
            if res.is_err() {
                // A return that fails only leaves room unused until the window ends.
                stats().errors.add(1);
                failed = matches!(c, Conn::Single(_));
            }
        }
        if !failed && !charges.is_empty() {
            let charge = redis::Script::new(CHARGE_LUA);
            for (k, n, ttl) in &charges {
                stats().calls.add(1);
                let res: redis::RedisResult<i64> = match c {
                    Conn::Single(con) => charge.key(k).arg(*n).arg(*ttl).invoke(con),
                    Conn::Cluster(con) => charge.key(k).arg(*n).arg(*ttl).invoke(&mut **con),
                };
                if res.is_err() {
                    stats().errors.add(1);
                    failed = matches!(c, Conn::Single(_));
                }
            }
        }
        if !failed && !usage.is_empty() {
            if let Err(e) = write_usage(c, usage) {
                log::warn(&format!("redis: usage write failed: {e}"));
                failed = true;
            }
        }
        if !batch.is_empty() && !failed {
            last_flush = Instant::now();
            failed = flush_grants(c, &grant, batch, now, &mut outstanding).is_err();
        } else {
            for r in batch {
                r.reply.set(REPLY_UNAVAILABLE);
            }
        }
        if !failed {
            failed = return_leftovers(c, &give_back, &mut outstanding, now, flush).is_err();
        }
        if failed {
            stats().errors.add(1);
            log::warn("redis: call failed; reconnecting");
            conn = None;
            retry_at = Instant::now() + backoff;
        }
    }
}

/// One grant call for every key in `batch` (one call per key on a cluster,
/// whose keys live on different slots).
fn flush_grants(
    c: &mut Conn,
    script: &redis::Script,
    batch: Vec<LeaseRequest>,
    now: u64,
    outstanding: &mut HashMap<String, Outstanding>,
) -> redis::RedisResult<()> {
    // Merge requests for the same key and window: their count is the demand.
    let mut keys: Vec<(String, Vec<LeaseRequest>)> = Vec::new();
    for r in batch {
        let k = redis_key(&r.filter, &r.leases.key, r.window_start);
        match keys.iter_mut().find(|(key, _)| *key == k) {
            Some((_, v)) => v.push(r),
            None => keys.push((k, vec![r])),
        }
    }
    let plan: Vec<(u64, u64, u64)> = keys
        .iter()
        .map(|(_, reqs)| {
            let r = &reqs[0];
            let used = r.leases.windows[r.index].used_known.load(Ordering::Relaxed);
            let w = &r.leases.windows[r.index];
            let demand: u64 = reqs.iter().map(|r| r.demand).sum();
            // The policy's ask shrinks as the window fills; a key that used
            // up its last lease in this window gets twice as much, within
            // the same cap; and at least what the waiters need.
            let cap = ((r.limit.saturating_sub(used)) / (2 * u64::from(r.replicas.max(1)))).max(1);
            let grown = if w.last_grant_window.load(Ordering::Relaxed) == r.window_start {
                (2 * w.last_grant.load(Ordering::Relaxed)).min(cap)
            } else {
                0
            };
            // Token reservations ask for exactly what they reserve: their
            // unused part goes back to Redis when the request settles, and a
            // spare lease would sit unusable in one replica.
            let ask = if r.tokens {
                demand.min(r.limit)
            } else {
                lease_ask(r.limit, used, r.replicas, demand)
                    .max(grown)
                    .max(demand.min(r.limit))
            };
            // Expire a little after the window ends, so late returns find it.
            let ttl = window_end(r.window_start, r.period).saturating_sub(now) + 5_000;
            (ask, r.limit, ttl)
        })
        .collect();
    let mut keys = keys;
    let results: Vec<i64> = match c {
        Conn::Single(con) => {
            let mut inv = script.prepare_invoke();
            for (k, _) in &keys {
                inv.key(k);
            }
            inv.arg(plan.iter().map(|p| p.2).max().unwrap_or(60_000));
            for &(ask, limit, _) in &plan {
                inv.arg(ask).arg(limit);
            }
            stats().calls.add(1);
            match inv.invoke(con) {
                Ok(v) => v,
                Err(e) => {
                    fail_all(keys);
                    return Err(e);
                }
            }
        }
        Conn::Cluster(con) => {
            // One call per key (their slots differ); a key whose master is
            // down fails alone, and the others are granted as usual.
            let mut out = Vec::with_capacity(keys.len() * 2);
            let mut down = Vec::new();
            for (i, ((k, _), &(ask, limit, ttl))) in keys.iter().zip(&plan).enumerate() {
                stats().calls.add(1);
                match script
                    .key(k)
                    .arg(ttl)
                    .arg(ask)
                    .arg(limit)
                    .invoke::<Vec<i64>>(&mut **con)
                {
                    Ok(v) => out.extend(v),
                    Err(_) => {
                        stats().errors.add(1);
                        down.push(i);
                        out.extend([-1, -1]);
                    }
                }
            }
            if !down.is_empty() {
                let mut kept = Vec::with_capacity(keys.len());
                let mut results = Vec::with_capacity(out.len());
                for (i, entry) in keys.into_iter().enumerate() {
                    if down.contains(&i) {
                        for r in entry.1 {
                            r.reply.set(REPLY_UNAVAILABLE);
                        }
                    } else {
                        results.extend_from_slice(&out[2 * i..2 * i + 2]);
                        kept.push(entry);
                    }
                }
                keys = kept;
                out = results;
            }
            out
        }
    };
    for (i, (k, reqs)) in keys.into_iter().enumerate() {
        let granted = results.get(2 * i).copied().unwrap_or(0).max(0) as u64;
        let used = results.get(2 * i + 1).copied().unwrap_or(0).max(0) as u64;
        let r0 = &reqs[0];
        let w = &r0.leases.windows[r0.index];
        w.used_known.store(used, Ordering::Relaxed);
        let state = if granted > 0 {
            stats().granted.add(granted);
            w.last_grant.store(granted, Ordering::Relaxed);
            w.last_grant_window
                .store(r0.window_start, Ordering::Relaxed);
            // A previous window's leftover expired with it in Redis.
            let _ = w.slot.refill(r0.window_start, granted);
            // Unspent units go back shortly before the window ends, so other
            // replicas can use them; a grant made after that point is left
            // to the requests that asked for it (it expires with the window).
            let margin = (r0.period / 10).min(250);
            let return_at = window_end(r0.window_start, r0.period).saturating_sub(margin);
            if now < return_at {
                outstanding.entry(k).or_insert_with(|| Outstanding {
                    leases: r0.leases.clone(),
                    index: r0.index,
                    window_start: r0.window_start,
                    return_at,
                });
            }
            REPLY_GRANTED
        } else {
            let until = (now + EXHAUSTED_MS).min(window_end(r0.window_start, r0.period));
            w.exhausted_until.store(until, Ordering::Relaxed);
            REPLY_EXHAUSTED
        };
        for r in reqs {
            r.reply.set(state);
        }
    }
    Ok(())
}

/// One usage hash's additions in a flush.
struct UsageAdd {
    index: String,
    member: Vec<u8>,
    expire_at: u64,
    totals: Totals,
}

/// Adds a flush's settled use to the usage hashes, and names their keys in the window's index
/// set.
fn write_usage(c: &mut Conn, usage: HashMap<String, UsageAdd>) -> redis::RedisResult<()> {
    // A script per hash rather than a pipeline: a Redis Cluster connection takes no pipeline,
    // and one key's script runs on its slot's master like a lease grant.
    let add = redis::Script::new(ledger::USAGE_LUA);
    for (hash, u) in &usage {
        let t = &u.totals;
        let mut inv = add.prepare_invoke();
        inv.key(hash)
            .arg(t.requests)
            .arg(t.input)
            .arg(t.output)
            .arg(t.cached)
            .arg(t.spend_micro)
            .arg(u8::from(t.estimated))
            .arg(u.expire_at);
        stats().calls.add(2);
        let mut sadd = redis::cmd("SADD");
        sadd.arg(&u.index).arg(&u.member[..]);
        let mut expire = redis::cmd("PEXPIREAT");
        expire.arg(&u.index).arg(u.expire_at);
        match c {
            Conn::Single(con) => {
                inv.invoke::<()>(con)?;
            }
            Conn::Cluster(con) => {
                inv.invoke::<()>(&mut **con)?;
            }
        }
        c.query::<()>(&mut sadd)?;
        c.query::<()>(&mut expire)?;
    }
    Ok(())
}

fn fail_all(keys: Vec<(String, Vec<LeaseRequest>)>) {
    for (_, reqs) in keys {
        for r in reqs {
            r.reply.set(REPLY_UNAVAILABLE);
        }
    }
}

/// Gives back what is still unspent of leases whose window is about to end,
/// so other replicas can use it while the window lasts.
fn return_leftovers(
    c: &mut Conn,
    script: &redis::Script,
    outstanding: &mut HashMap<String, Outstanding>,
    now: u64,
    flush: Duration,
) -> redis::RedisResult<()> {
    let margin = flush.as_millis() as u64;
    let mut due = Vec::new();
    outstanding.retain(|k, o| {
        if now + margin < o.return_at {
            return true;
        }
        let n = o.leases.windows[o.index].slot.drain(o.window_start);
        if n > 0 {
            due.push((k.clone(), n));
        }
        false
    });
    for (k, n) in &due {
        stats().returned.add(*n);
        let _: Vec<i64> = match c {
            Conn::Single(con) => script.key(k).arg(*n).invoke(con)?,
            Conn::Cluster(con) => script.key(k).arg(*n).invoke(&mut **con)?,
        };
    }
    Ok(())
}
