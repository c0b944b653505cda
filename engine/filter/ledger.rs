//! What each key of a token-limit or cost-limit used in its current windows: requests,
//! tokens, spend. It answers `GET /usage` and the spend gauge.
//!
//! A request is recorded when it settles, under one short lock per limit (an AI request already
//! takes a few). In `scope = "local"` this process's ledger is the answer. In `scope =
//! "cluster"` each settled request is also added to a Redis hash per key and window, batched by
//! the Redis thread (never on the request path), and `/usage` reads Redis from the admin thread,
//! so every replica answers the same.

use std::{collections::HashMap, fmt::Write as _, sync::Mutex};

use ringway_filters::limit::window::{self, window_start};

/// Most windows a rule may have (as in the cluster leases).
const MAX_WINDOWS: usize = 4;

/// One key's use in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Requests settled.
    pub requests: u64,
    /// Prompt tokens, cached ones included.
    pub input: u64,
    /// Generated tokens.
    pub output: u64,
    /// Prompt tokens read from the provider's cache.
    pub cached: u64,
    /// Spend in micro-dollars (cost-limit filters).
    pub spend_micro: u64,
    /// Some request's usage was estimated, not reported.
    pub estimated: bool,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.input += o.input;
        self.output += o.output;
        self.cached += o.cached;
        self.spend_micro += o.spend_micro;
        self.estimated |= o.estimated;
    }
}

/// One row of `/usage`: a key in one window of its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The key value.
    pub key: Vec<u8>,
    /// The window's period (ms, or [`window::MONTH`]).
    pub period: u64,
    /// When the window started (Unix ms).
    pub window_start: u64,
    /// The window's limit (tokens or micro-dollars).
    pub limit: u64,
    /// What the key used in it.
    pub totals: Totals,
}

struct Entry {
    /// Per window of the key's rule: (period, window start, limit, totals).
    windows: [(u64, u64, u64, Totals); MAX_WINDOWS],
    n: usize,
    last_ms: u64,
}

impl Entry {
    /// Adds one settled request to each window of the rule (`(period, limit)` pairs) that
    /// contains `now_ms`; a window that ended is started afresh.
    fn add(&mut self, windows: &[(u64, u64)], now_ms: u64, t: &Totals) {
        self.last_ms = now_ms;
        self.n = windows.len().min(MAX_WINDOWS);
        for (slot, &(period, limit)) in self.windows.iter_mut().zip(windows) {
            let start = window_start(now_ms, period);
            if slot.0 != period || slot.1 != start {
                *slot = (period, start, limit, Totals::default());
            }
            slot.2 = limit;
            slot.3.add(t);
        }
    }
}

/// Locks of a ledger that holds many keys: workers settling different keys rarely meet.
const SHARDS: usize = 16;
/// Entries looked at to choose one to evict: an approximate LRU in constant time.
const EVICT_SAMPLE: usize = 8;

/// The ledger of one filter, bounded by its `max_keys`.
pub struct Ledger {
    shards: Vec<Mutex<HashMap<Box<[u8]>, Entry>>>,
    per_shard: usize,
}

impl Ledger {
    /// An empty ledger of at most `max_keys` keys (the least recently used go first).
    pub fn new(max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        // A small bound keeps one shard, so it is exact.
        let n = if max_keys >= 64 * SHARDS { SHARDS } else { 1 };
        Self {
            shards: (0..n).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(n),
        }
    }

    fn shard(&self, key: &[u8]) -> &Mutex<HashMap<Box<[u8]>, Entry>> {
        let i = crate::upstream::balance::hash_bytes(key) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Adds one settled request of `key` to each window of its rule (`(period, limit)` pairs)
    /// that contains `now_ms`; a window that ended is started afresh.
    pub fn record(&self, key: &[u8], windows: &[(u64, u64)], now_ms: u64, t: &Totals) {
        let Ok(mut map) = self.shard(key).lock() else {
            return;
        };
        // A key seen before is updated in place: one hash, no allocation per request.
        if let Some(e) = map.get_mut(key) {
            e.add(windows, now_ms, t);
            return;
        }
        if map.len() >= self.per_shard {
            // The least recently used of a few entries (the map's order is arbitrary):
            // a full ledger costs the same per new key as an empty one.
            if let Some(oldest) = map
                .iter()
                .take(EVICT_SAMPLE)
                .min_by_key(|(_, e)| e.last_ms)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let mut e = Entry {
            windows: [(0, 0, 0, Totals::default()); MAX_WINDOWS],
            n: 0,
            last_ms: now_ms,
        };
        e.add(windows, now_ms, t);
        map.insert(key.into(), e);
    }

    /// The rows of the windows that contain `now_ms` (a key idle since an earlier window shows
    /// zeros), for `key` only when given.
    pub fn rows(&self, key: Option<&[u8]>, now_ms: u64) -> Vec<Row> {
        let shards = match key {
            Some(k) => std::slice::from_ref(self.shard(k)),
            None => &self.shards[..],
        };
        let mut out = Vec::new();
        for map in shards {
            let Ok(map) = map.lock() else { continue };
            Self::rows_of(&map, key, now_ms, &mut out);
        }
        out.sort_by(|a, b| (&a.key, a.period).cmp(&(&b.key, b.period)));
        out
    }

    fn rows_of(
        map: &HashMap<Box<[u8]>, Entry>,
        key: Option<&[u8]>,
        now_ms: u64,
        out: &mut Vec<Row>,
    ) {
        for (k, e) in map.iter() {
            if key.is_some_and(|want| want != &k[..]) {
                continue;
            }
            for &(period, start, limit, totals) in &e.windows[..e.n] {
                let current = window_start(now_ms, period);
                out.push(Row {
                    key: k.to_vec(),
                    period,
                    window_start: current,
                    limit,
                    totals: if start == current {
                        totals
                    } else {
                        Totals::default()
                    },
                });
            }
        }
    }
}

/// The window's name in `/usage`: `second`, `minute`, `hour`, `day`, `month`.
pub fn window_name(period: u64) -> String {
    match period {
        1_000 => "second".into(),
        60_000 => "minute".into(),
        3_600_000 => "hour".into(),
        86_400_000 => "day".into(),
        window::MONTH => "month".into(),
        ms => format!("{ms}ms"),
    }
}

/// The Redis hash of one key's use in one window:
/// `ringway:usage:{<filter>:<key>}:<period>:<window_start>` (the hash tag of the lease keys, so
/// a key's hashes live on its lease keys' slot).
pub fn redis_hash(filter: &str, key: &[u8], period: u64, window_start: u64) -> String {
    let mut out = String::with_capacity(48 + filter.len() + key.len());
    let _ = write!(out, "ringway:usage:{{{filter}:");
    out.push_str(&String::from_utf8_lossy(key));
    let _ = write!(out, "}}:{period}:{window_start}");
    out
}

/// The Redis set naming the keys with a hash in one window of a filter:
/// `ringway:usage-keys:{<filter>}:<period>:<window_start>`.
pub fn redis_index(filter: &str, period: u64, window_start: u64) -> String {
    format!("ringway:usage-keys:{{{filter}}}:{period}:{window_start}")
}

/// Adds one flush's use to a usage hash. `KEYS[1]`: [`redis_hash`]; `ARGV`: requests, input,
/// output, cached, spend (micro-dollars), estimated (0 or 1), expiry (Unix ms).
pub const USAGE_LUA: &str = r#"
local k = KEYS[1]
redis.call('HINCRBY', k, 'r', ARGV[1])
redis.call('HINCRBY', k, 'i', ARGV[2])
redis.call('HINCRBY', k, 'o', ARGV[3])
redis.call('HINCRBY', k, 'c', ARGV[4])
redis.call('HINCRBY', k, 's', ARGV[5])
if ARGV[6] == '1' then redis.call('HSET', k, 'e', 1) end
redis.call('PEXPIREAT', k, ARGV[7])
return 1
"#;

/// Reads a hash written by the Redis thread (fields `r`, `i`, `o`, `c`, `s`, `e`).
pub fn totals_from_hash(fields: &HashMap<String, i64>) -> Totals {
    let get = |f: &str| fields.get(f).copied().unwrap_or(0).max(0) as u64;
    Totals {
        requests: get("r"),
        input: get("i"),
        output: get("o"),
        cached: get("c"),
        spend_micro: get("s"),
        estimated: get("e") > 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(requests: u64, spend: u64) -> Totals {
        Totals {
            requests,
            input: 10 * requests,
            output: 2 * requests,
            cached: 0,
            spend_micro: spend,
            estimated: false,
        }
    }

    #[test]
    fn windows_add_up_and_restart() {
        let l = Ledger::new(10);
        let windows = [(60_000, 5_000_000), (window::MONTH, 100_000_000)];
        l.record(b"alice", &windows, 61_000, &t(1, 700));
        l.record(b"alice", &windows, 62_000, &t(1, 800));
        let rows = l.rows(Some(b"alice"), 63_000);
        assert_eq!(rows.len(), 2);
        let minute = rows.iter().find(|r| r.period == 60_000).map(|r| r.totals);
        assert_eq!(minute.map(|t| (t.requests, t.spend_micro)), Some((2, 1500)));
        // The next minute starts at zero; the month goes on.
        let rows = l.rows(None, 121_000);
        let minute = rows.iter().find(|r| r.period == 60_000).map(|r| r.totals);
        assert_eq!(minute, Some(Totals::default()));
        l.record(b"alice", &windows, 121_000, &t(1, 900));
        let rows = l.rows(None, 121_000);
        let month = rows
            .iter()
            .find(|r| r.period == window::MONTH)
            .map(|r| r.totals);
        assert_eq!(month.map(|t| (t.requests, t.spend_micro)), Some((3, 2400)));
        let minute = rows.iter().find(|r| r.period == 60_000).map(|r| r.totals);
        assert_eq!(minute.map(|t| t.spend_micro), Some(900));
        assert_eq!(window_name(60_000), "minute");
        assert_eq!(window_name(window::MONTH), "month");
    }

    /// A large ledger is sharded and stays within its bound, however many keys come.
    #[test]
    fn a_large_ledger_stays_bounded() {
        let l = Ledger::new(2048);
        let w = [(60_000, 10)];
        for i in 0..10_000u32 {
            l.record(&i.to_be_bytes(), &w, u64::from(i), &t(1, 0));
        }
        let n = l.rows(None, 10_000).len();
        assert!((2048 - SHARDS..=2048).contains(&n), "{n} keys kept");
        // The newest key is there, and can be asked for alone.
        assert_eq!(l.rows(Some(&9_999u32.to_be_bytes()), 10_000).len(), 1);
    }

    #[test]
    fn the_least_recent_key_makes_room() {
        let l = Ledger::new(2);
        let w = [(60_000, 10)];
        l.record(b"a", &w, 1, &t(1, 0));
        l.record(b"b", &w, 2, &t(1, 0));
        l.record(b"c", &w, 3, &t(1, 0));
        let keys: Vec<Vec<u8>> = l.rows(None, 3).into_iter().map(|r| r.key).collect();
        assert_eq!(keys, [b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(
            redis_hash("budget", b"alice", 60_000, 120_000),
            "ringway:usage:{budget:alice}:60000:120000"
        );
    }
}
