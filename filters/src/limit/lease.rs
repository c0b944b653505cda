//! `scope = "cluster"`: quota leased from Redis in batches, so no request waits on Redis.
//!
//! Redis holds `used` per (key, window) under [`redis_key`]. At each flush tick the control core
//! sends one [`GRANT_LUA`] call for the keys that need quota; each grant is `min(ask, limit -
//! used)`, added to `used` atomically, so **the grants of all replicas together never exceed the
//! limit**: that, not the ask size, is what makes cluster limits exact. Workers admit by taking
//! from a [`LeaseSlot`] (one CAS); what a slot still holds near the window's end is
//! [`LeaseSlot::drain`]ed and given back with [`RETURN_LUA`] so other replicas can use it.
//!
//! The ask size ([`lease_ask`]) is about fairness and waste: a lease held by a replica is quota
//! no other replica can use until it is returned.
//!
//! Redis Cluster: all `KEYS` of one `EVAL` must hash to one slot (`CROSSSLOT` otherwise). The
//! `{filter:key}` hash tag puts all windows of one key on one slot, so the control core groups a
//! flush's keys by hash slot (or sends one call per key, pipelined).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// How much quota to ask Redis for, for one key and window.
///
/// `ask = clamp(2 × recent_rate_per_flush, 1, (limit - used_known) / (2 × replicas))`, and 0 only
/// when `used_known >= limit` (nothing left to ask for).
///
/// Why: `2 × rate` covers the next flush interval with slack, so a busy key rarely runs dry between
/// flushes. The cap gives each of `replicas` replicas at most half of an equal share of what is
/// left, so outstanding leases never hold more than half the room and the room left roughly halves
/// each round as the window fills: asks shrink geometrically until they reach 1 near the limit,
/// where each replica takes one unit at a time and no replica sits on quota another could use.
/// The floor of 1 keeps a replica able to make progress while any room remains (Redis still grants
/// at most `limit - used`, so a stale `used_known` can only make an ask too large, never
/// over-admit).
pub fn lease_ask(
    limit: u64,
    used_known: u64,
    replicas_hint: u32,
    recent_rate_per_flush: u64,
) -> u64 {
    let room = limit.saturating_sub(used_known);
    if room == 0 {
        return 0;
    }
    let share = room / (2 * u64::from(replicas_hint.max(1)));
    recent_rate_per_flush
        .saturating_mul(2)
        .clamp(1, share.max(1))
}

/// Sentinel window for a slot that has never been filled.
const NO_WINDOW: u64 = u64::MAX;

/// The worker-side lease of one (key, period): granted quota not yet spent, for one window.
/// Shared by all workers (atomics); filled and drained only by the control core.
#[derive(Debug)]
pub struct LeaseSlot {
    /// Units granted and not yet taken.
    remaining: AtomicU64,
    /// The start (Unix ms) of the window `remaining` belongs to; takes for another window fail.
    window: AtomicU64,
}

impl Default for LeaseSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseSlot {
    /// An empty slot: every take fails until the first refill.
    pub fn new() -> Self {
        LeaseSlot {
            remaining: AtomicU64::new(0),
            window: AtomicU64::new(NO_WINDOW),
        }
    }

    /// Takes `cost` units for window `window_start_ms` (from the worker's own clock). False when
    /// the slot holds another window's lease or fewer than `cost` units: the request then waits for
    /// the next refill or is refused, per the filter's policy.
    ///
    /// Never over-spends: units are taken by CAS, and a drain swaps them out atomically, so units
    /// taken plus units drained never exceed units granted.
    pub fn take(&self, cost: u64, window_start_ms: u64) -> bool {
        // Acquire pairs with refill's release: a worker that sees the new window also sees the
        // old window's units already swapped out, so it cannot spend them.
        if self.window.load(Ordering::Acquire) != window_start_ms {
            return false;
        }
        self.remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(cost))
            .is_ok()
    }

    /// Adds a grant for window `window_start_ms`. Within the same window the grant tops the slot
    /// up; for a new window the slot switches to it, and what the previous window still held is
    /// returned so the control core can give it back to Redis (a window that ended without a
    /// drain). Control core only (a single writer).
    ///
    /// A worker racing the switch with the old window may spend a unit of the new grant: that unit
    /// is counted in the new window in Redis, so the new window's limit still holds.
    #[must_use]
    pub fn refill(&self, window_start_ms: u64, granted: u64) -> u64 {
        if self.window.load(Ordering::Acquire) == window_start_ms {
            self.remaining.fetch_add(granted, Ordering::AcqRel);
            return 0;
        }
        let leftover = self.remaining.swap(0, Ordering::AcqRel);
        self.window.store(window_start_ms, Ordering::Release);
        self.remaining.fetch_add(granted, Ordering::AcqRel);
        leftover
    }

    /// Takes back everything the slot holds for window `window_start_ms` (0 if it holds another
    /// window), for the control core to return with [`RETURN_LUA`] before the window ends.
    /// Workers' takes fail from then on until the next refill.
    pub fn drain(&self, window_start_ms: u64) -> u64 {
        if self.window.load(Ordering::Acquire) != window_start_ms {
            return 0;
        }
        self.remaining.swap(0, Ordering::AcqRel)
    }

    /// Returns `n` units a worker took but did not use (a token reservation
    /// larger than the real usage), if the slot still holds window
    /// `window_start_ms`; otherwise they are lost with their window. Safe from
    /// any thread: it only adds within the current window.
    pub fn give_back(&self, window_start_ms: u64, n: u64) -> bool {
        if self.window.load(Ordering::Acquire) != window_start_ms {
            return false;
        }
        self.remaining.fetch_add(n, Ordering::AcqRel);
        true
    }

    /// Units left (a snapshot).
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }
}

/// What the control core remembers about one lease between flush ticks.
#[derive(Debug, Clone, Copy)]
struct LeaseEntry {
    /// The window this entry describes.
    window_start_ms: u64,
    /// `used` as Redis last reported it for that window.
    used_known: u64,
    /// The slot's remaining right after the last refill or plan, to measure consumption.
    last_remaining: u64,
    /// Units consumed per flush interval, decaying: the demand estimate for [`lease_ask`].
    rate: u64,
}

/// The control core's view of its leases: per lease id (the engine's `key_hash` of key and
/// period), the window, Redis's `used`, and the recent consumption rate. Used by the control core
/// thread only, so plain fields; bounded by `max_entries`.
#[derive(Debug)]
pub struct LeaseBook {
    entries: HashMap<u64, LeaseEntry>,
    /// Entries kept at most; past that, new leases are planned without history (rate 0).
    max_entries: usize,
}

impl LeaseBook {
    /// A book holding at most `max_entries` leases (the filter's `max_keys` × windows).
    pub fn new(max_entries: usize) -> Self {
        LeaseBook {
            entries: HashMap::new(),
            max_entries,
        }
    }

    /// At a flush tick: the ask for lease `id` in window `window_start_ms` (0: do not ask). Asks
    /// only when the slot holds less than the next interval is expected to need.
    pub fn plan(
        &mut self,
        id: u64,
        slot: &LeaseSlot,
        window_start_ms: u64,
        limit: u64,
        replicas_hint: u32,
    ) -> u64 {
        let now_remaining = if slot.window.load(Ordering::Acquire) == window_start_ms {
            slot.remaining()
        } else {
            0
        };
        if !self.entries.contains_key(&id) && self.entries.len() >= self.max_entries {
            self.forget_before(window_start_ms);
        }
        if !self.entries.contains_key(&id) && self.entries.len() >= self.max_entries {
            return if now_remaining == 0 {
                lease_ask(limit, 0, replicas_hint, 0)
            } else {
                0
            };
        }
        let e = self.entries.entry(id).or_insert(LeaseEntry {
            window_start_ms,
            used_known: 0,
            last_remaining: now_remaining,
            rate: 0,
        });
        if e.window_start_ms != window_start_ms {
            *e = LeaseEntry {
                window_start_ms,
                used_known: 0,
                last_remaining: now_remaining,
                rate: e.rate,
            };
        }
        let consumed = e.last_remaining.saturating_sub(now_remaining);
        // Follow a rise at once, let a fall decay by half per tick.
        e.rate = consumed.max(e.rate / 2);
        e.last_remaining = now_remaining;
        if now_remaining >= e.rate.max(1) {
            return 0;
        }
        lease_ask(limit, e.used_known, replicas_hint, e.rate)
    }

    /// Applies one grant from [`GRANT_LUA`] (`granted`, and Redis's `used` after it). Returns
    /// units of a previous window found in the slot, to give back with [`RETURN_LUA`].
    #[must_use]
    pub fn on_grant(
        &mut self,
        id: u64,
        slot: &LeaseSlot,
        window_start_ms: u64,
        granted: u64,
        used: u64,
    ) -> u64 {
        let leftover = slot.refill(window_start_ms, granted);
        if let Some(e) = self.entries.get_mut(&id) {
            if e.window_start_ms == window_start_ms {
                e.used_known = e.used_known.max(used);
                e.last_remaining = slot.remaining();
            }
        }
        leftover
    }

    /// Forgets leases of windows that started before `window_start_ms`.
    pub fn forget_before(&mut self, window_start_ms: u64) {
        self.entries
            .retain(|_, e| e.window_start_ms >= window_start_ms);
    }

    /// Leases remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no lease is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The Redis key of one (filter, key value, window): `ringway:{<filter>:<key>}:<window_start_ms>`.
///
/// Bytes outside `[A-Za-z0-9._~@+=/-]` in the filter name and the key are written `%XX`, so `{`,
/// `}`, `:` and `%` never appear raw: the hash tag is exactly `{filter:key}` whatever the key
/// value, and distinct values give distinct keys.
pub fn redis_key(filter: &str, key: &[u8], window_start_ms: u64) -> String {
    let mut out = String::with_capacity(16 + filter.len() + key.len() * 3 + 20);
    out.push_str("ringway:{");
    escape_into(&mut out, filter.as_bytes());
    out.push(':');
    escape_into(&mut out, key);
    // Writing to a String cannot fail.
    let _ = write!(out, "}}:{window_start_ms}");
    out
}

fn escape_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"._~@+=/-".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Grants quota for many keys in one atomic call.
///
/// `KEYS[i]`: [`redis_key`]s. `ARGV[1]`: TTL in ms (the window's remaining time plus a margin).
/// `ARGV[2i]`, `ARGV[2i+1]`: ask and limit for `KEYS[i]`. Per key: `used = GET or 0`,
/// `grant = max(0, min(ask, limit - used))`, `INCRBY` when positive, `PEXPIRE` when the key was
/// created by this call (or was back at 0: re-setting the TTL then is harmless). Returns a flat
/// array `[grant_1, used_1, grant_2, used_2, …]`, `used` after the grant.
pub const GRANT_LUA: &str = r#"
local ttl = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local ask = tonumber(ARGV[2 * i])
  local limit = tonumber(ARGV[2 * i + 1])
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  local grant = limit - used
  if grant > ask then grant = ask end
  if grant < 0 then grant = 0 end
  if grant > 0 then
    used = redis.call('INCRBY', KEYS[i], grant)
    if used == grant then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
  out[2 * i - 1] = grant
  out[2 * i] = used
end
return out
"#;

/// Gives unspent quota back. `KEYS[i]`: [`redis_key`]s; `ARGV[i]`: units to return for
/// `KEYS[i]`. Never goes below 0 and never creates a key (an expired window has nothing to give
/// back to). Returns `used` per key after the return.
pub const RETURN_LUA: &str = r#"
local out = {}
for i = 1, #KEYS do
  local n = tonumber(ARGV[i])
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if n > used then n = used end
  if n > 0 then used = redis.call('DECRBY', KEYS[i], n) end
  out[i] = used
end
return out
"#;

/// Charges units used beyond a reservation that no lease covered: added to `used` even past the
/// limit (the tokens were spent; the window's later grants see them). `KEYS[1]`: a
/// [`redis_key`]; `ARGV[1]`: units; `ARGV[2]`: TTL in ms for a key this creates.
pub const CHARGE_LUA: &str = r#"
local used = redis.call('INCRBY', KEYS[1], tonumber(ARGV[1]))
if used == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2])) end
return used
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ask_table() {
        // (limit, used, replicas, rate, ask)
        let cases = [
            (1000, 0, 1, 10, 20),
            (1000, 0, 1, 1000, 500),
            (1000, 0, 4, 1000, 125),
            (1000, 990, 1, 1000, 5),
            (1000, 999, 3, 1000, 1),
            (1000, 0, 0, 0, 1), // replicas 0 treated as 1; no history still asks 1
            (1000, 1000, 1, 10, 0),
            (1000, 2000, 1, 10, 0),
            (u64::MAX, 0, 1, u64::MAX, u64::MAX / 2),
        ];
        for (limit, used, replicas, rate, want) in cases {
            assert_eq!(
                lease_ask(limit, used, replicas, rate),
                want,
                "{limit} {used} {replicas} {rate}"
            );
        }
    }

    #[test]
    fn asks_shrink_to_one_and_grants_never_pass_the_limit() {
        // Three replicas with heavy demand, against a simulated GRANT_LUA.
        let (limit, replicas) = (1000u64, 3u32);
        let mut used = 0u64;
        let mut asks = Vec::new();
        while used < limit {
            for _ in 0..replicas {
                if used == limit {
                    break;
                }
                let ask = lease_ask(limit, used, replicas, 10_000);
                assert!(ask >= 1, "never ask 0 while room remains");
                asks.push(ask);
                used += ask.min(limit - used);
            }
        }
        assert_eq!(used, limit);
        assert!(
            asks.windows(2).all(|w| w[1] <= w[0]),
            "asks only shrink: {asks:?}"
        );
        assert_eq!(asks.last(), Some(&1));
        assert!(lease_ask(limit, used, replicas, 10_000) == 0);
    }

    #[test]
    fn lease_slot_take_refill_drain() {
        let s = LeaseSlot::new();
        assert!(!s.take(1, 0), "empty until the first refill");
        assert_eq!(s.refill(60_000, 3), 0);
        assert!(!s.take(1, 0), "another window's lease is never spent");
        assert!(s.take(2, 60_000));
        assert!(!s.take(2, 60_000));
        assert_eq!(s.refill(60_000, 4), 0);
        assert_eq!(s.remaining(), 5);
        assert_eq!(s.drain(0), 0);
        assert_eq!(s.drain(60_000), 5);
        assert!(!s.take(1, 60_000));
        assert_eq!(s.refill(60_000, 2), 0);
        assert_eq!(
            s.refill(120_000, 7),
            2,
            "switching windows hands back the old leftovers"
        );
        assert!(s.take(7, 120_000));
    }

    #[test]
    fn lease_slot_never_over_spends_across_threads() {
        let slot = LeaseSlot::new();
        let taken = AtomicU64::new(0);
        let (mut granted, mut returned) = (0u64, 0u64);
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for i in 0..50_000u64 {
                        let window = if i < 25_000 { 0 } else { 60_000 };
                        if slot.take(1 + i % 3, window) {
                            taken.fetch_add(1 + i % 3, Ordering::Relaxed);
                        }
                    }
                });
            }
            // The control core: refills, drains, and switches window halfway.
            for round in 0..2_000u64 {
                let window = if round < 1_000 { 0 } else { 60_000 };
                returned += slot.refill(window, 7);
                granted += 7;
                if round % 10 == 9 {
                    returned += slot.drain(window);
                }
                std::thread::yield_now();
            }
        });
        returned += slot.drain(60_000);
        assert_eq!(taken.load(Ordering::Relaxed) + returned, granted);
    }

    #[test]
    fn lease_book_asks_when_the_slot_runs_low() {
        let mut book = LeaseBook::new(2);
        let slot = LeaseSlot::new();
        assert_eq!(book.plan(1, &slot, 0, 100, 1), 1, "no history: ask 1");
        assert_eq!(book.on_grant(1, &slot, 0, 1, 1), 0);
        assert!(slot.take(1, 0));
        // One unit consumed per tick: ask 2 × 1.
        assert_eq!(book.plan(1, &slot, 0, 100, 1), 2);
        assert_eq!(book.on_grant(1, &slot, 0, 20, 21), 0);
        assert_eq!(
            book.plan(1, &slot, 0, 100, 1),
            0,
            "enough left for the next interval"
        );
        for _ in 0..19 {
            assert!(slot.take(1, 0));
        }
        // 19 consumed: ask 38, capped by (100 - 21) / 2 = 39.
        assert_eq!(book.plan(1, &slot, 0, 100, 1), 38);
        assert_eq!(book.plan(2, &LeaseSlot::new(), 0, 100, 1), 1);
        assert_eq!(book.len(), 2);
        assert_eq!(
            book.plan(3, &slot, 60_000, 100, 1),
            1,
            "a new window frees past entries"
        );
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn redis_keys_keep_the_hash_tag_intact() {
        let cases: &[(&str, &[u8], u64, &str)] = &[
            ("rpm", b"alice", 60_000, "ringway:{rpm:alice}:60000"),
            ("rpm", b"10.0.0.1", 0, "ringway:{rpm:10.0.0.1}:0"),
            ("rpm", b"a}b{c:d", 1, "ringway:{rpm:a%7Db%7Bc%3Ad}:1"),
            (
                "my filter",
                b"100%\xff",
                1,
                "ringway:{my%20filter:100%25%FF}:1",
            ),
            (
                "tpm",
                b"sk-A_b.c~d@e+f=g/h",
                2,
                "ringway:{tpm:sk-A_b.c~d@e+f=g/h}:2",
            ),
        ];
        for (filter, key, window, want) in cases {
            assert_eq!(redis_key(filter, key, *window), *want);
        }
    }

    #[test]
    fn lua_scripts_use_the_documented_calls() {
        for call in ["'GET'", "'INCRBY'", "'PEXPIRE'"] {
            assert!(GRANT_LUA.contains(call), "{call}");
        }
        assert!(RETURN_LUA.contains("'DECRBY'") && !RETURN_LUA.contains("INCRBY"));
    }
}
