//! The process-wide limiter table for `scope = "local"`: fixed-size, lock-free on the hot path,
//! exact across cores.
//!
//! # Layout
//!
//! `slots` is a power-of-two array of 32-byte slots, grouped into aligned buckets of
//! [`BUCKET`] slots. A counter, named by `(key_hash, period_ms)`, lives in one slot of the bucket
//! its name hashes to (open addressing with a probe of exactly one bucket). A slot holds:
//!
//! - `tag`: the counter's name (0 = never used);
//! - `state`: one `AtomicU64` packing `gen:8 | window:24 | count:32`; every admission is one CAS
//!   on this word;
//! - `period`: the owner's period, so another key can tell whether the owner's window is over;
//! - `last_used`: the `now_ms` of the last access, the LRU tick for eviction.
//!
//! # Exactness
//!
//! Admission is a CAS loop on `state`: read, check `count + cost <= limit` for the current
//! window, write `count + cost`. Concurrent callers on one counter are serialised by that CAS, so
//! **a counter never admits more than `limit` per window in total, whatever the number of
//! threads.** Windows only move forward: a caller whose `now_ms` lags by up to one window (workers
//! read the clock at slightly different times) counts against the newer window already stored
//! rather than resetting it, so a window cannot flip back and forth and be refilled.
//!
//! Changing which counter a slot holds (claiming an empty or expired slot, or evicting) is rare
//! and happens under a per-bucket spin lock, so one counter can never be installed twice in one
//! bucket. The claim bumps `gen` to an odd value while it rewrites the slot and to the next even
//! value when done (a seqlock): a hot-path CAS started against the previous owner fails, and a
//! reader never pairs one owner's tag with another's count.
//!
//! **The one caveat: eviction.** When all [`BUCKET`] slots of a bucket hold counters whose window
//! is still running, a new counter evicts the least recently used of them
//! ([`LocalTable::evictions`] counts these), and the evicted key starts again from 0 the next time
//! it is seen: it may admit up to `limit` more in that window. Size the table by `max_keys` (the
//! number of keys expected to be active within one window) so this stays rare. The table adds 2×
//! headroom, but buckets fill unevenly: with exactly `max_keys` live keys an average bucket holds
//! 2 to 4 of its 8 slots and a small fraction of buckets overflow (and evict their least recently
//! used key). Give `max_keys` a margin over the expected active keys (2× keeps overflow rare).
//!
//! # Limits of the packing
//!
//! - Counts are 32 bits: a limit above `u32::MAX` (4,294,967,295 per window) is treated as
//!   `u32::MAX`, and [`LocalTable::charge`] saturates there.
//! - The window index is kept modulo 2^24: a counter untouched for exactly a multiple of 2^24
//!   windows (194 days for per-second windows) could be read as current for one window; this is
//!   only possible when its slot was never reused in between.
//! - `gen` is 8 bits: a hot-path CAS would have to stall across 128 complete claims of its slot to
//!   be fooled.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::window::{index_start, reset_after_ms, reset_after_next_ms, window_index};

/// Slots per bucket: the probe length. One bucket is 256 bytes (four cache lines).
pub const BUCKET: usize = 8;

/// The most slots a table allocates (32 GiB of slots), whatever `max_keys` asks for.
const MAX_SLOTS: usize = 1 << 30;

const EMPTY: u64 = 0;
const GEN_SHIFT: u32 = 56;
const WIN_SHIFT: u32 = 32;
const WIN_MASK: u64 = (1 << 24) - 1;
const COUNT_MASK: u64 = u32::MAX as u64;
/// The largest count a slot holds; larger limits are clamped to it.
pub const MAX_COUNT: u64 = u32::MAX as u64;

fn gen_of(s: u64) -> u64 {
    s >> GEN_SHIFT
}
fn win_of(s: u64) -> u64 {
    (s >> WIN_SHIFT) & WIN_MASK
}
fn count_of(s: u64) -> u64 {
    s & COUNT_MASK
}
fn pack(gen: u64, window: u64, count: u64) -> u64 {
    ((gen & 0xFF) << GEN_SHIFT) | ((window & WIN_MASK) << WIN_SHIFT) | (count & COUNT_MASK)
}

/// Where a stored window stands relative to the caller's current window.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rel {
    /// The caller's current window.
    Same,
    /// The next one: another caller's clock is a little ahead; count against it.
    Ahead,
    /// Any other: the window is over, the count is 0.
    Stale,
}

fn relation(stored: u64, current: u64) -> Rel {
    if stored == current & WIN_MASK {
        Rel::Same
    } else if stored == current.wrapping_add(1) & WIN_MASK {
        Rel::Ahead
    } else {
        Rel::Stale
    }
}

/// The result of an acquire (or a peek).
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// True when the cost was counted and the request may go on.
    pub admitted: bool,
    /// What is left in the binding window (after this request when admitted).
    pub remaining: u64,
    /// Milliseconds until the binding window resets: when refused, the earliest a retry can pass.
    pub reset_ms: u64,
    /// The binding window's limit (as enforced: clamped to [`MAX_COUNT`]), for
    /// `x-ratelimit-limit-*`.
    pub limit: u64,
}

impl Decision {
    /// The decision for a rule without windows: always admitted, nothing to report.
    pub const UNLIMITED: Decision = Decision {
        admitted: true,
        remaining: u64::MAX,
        reset_ms: 0,
        limit: u64::MAX,
    };
}

/// One counter. 32-byte aligned so a slot never straddles a cache line.
#[repr(C, align(32))]
#[derive(Default)]
struct Slot {
    /// The counter's name, from [`slot_tag`]; [`EMPTY`] when never used.
    tag: AtomicU64,
    /// `gen:8 | window:24 | count:32`; see the module docs.
    state: AtomicU64,
    /// The owner's period in ms: lets a claimer judge whether the owner's window is over.
    period: AtomicU64,
    /// The `now_ms` of the last access; the LRU tick for eviction (ties go to probe order).
    last_used: AtomicU64,
}

/// What a state transition decided: write a new state word, or leave it.
enum Step<R> {
    Write(u64, R),
    Keep(R),
}

/// The process-wide table of limiter counters. `Sync`: the engine shares one in an `Arc` among
/// all workers. Memory is fixed at construction.
pub struct LocalTable {
    /// All counters; the length is a power of two and a multiple of [`BUCKET`].
    slots: Box<[Slot]>,
    /// One spin lock per bucket, taken only to change which counter a slot holds.
    locks: Box<[AtomicU32]>,
    /// `buckets - 1`, to map a tag to its bucket.
    bucket_mask: usize,
    /// Live counters evicted to make room; see the module docs.
    evictions: AtomicU64,
}

impl std::fmt::Debug for LocalTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTable")
            .field("capacity", &self.capacity())
            .field("evictions", &self.evictions())
            .finish()
    }
}

/// Mixes the key hash with the period into a slot name: the windows of one rule are separate
/// counters. SplitMix64's finaliser spreads the bits so bucket selection uses all of them.
fn slot_tag(key_hash: u64, period_ms: u64) -> u64 {
    let mut z = key_hash ^ period_ms.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z == EMPTY {
        1
    } else {
        z
    }
}

struct BucketGuard<'a>(&'a AtomicU32);

impl Drop for BucketGuard<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

impl LocalTable {
    /// A table for `max_keys` keys with one window each; see [`LocalTable::with_windows`].
    pub fn new(max_keys: usize) -> Self {
        Self::with_windows(max_keys, 1)
    }

    /// A table for `max_keys` keys with up to `windows_per_key` windows each (a rule with per-minute
    /// and per-day limits has two). Allocates `2 × max_keys × windows_per_key` slots rounded up to
    /// a power of two (at least one bucket, at most 2^30), 32 bytes each, once; the headroom keeps
    /// buckets from overflowing (evicting) while the table holds fewer than `max_keys` keys.
    pub fn with_windows(max_keys: usize, windows_per_key: usize) -> Self {
        let wanted = max_keys
            .max(1)
            .saturating_mul(windows_per_key.max(1))
            .saturating_mul(2);
        let slots = wanted.min(MAX_SLOTS).next_power_of_two().max(BUCKET);
        let buckets = slots / BUCKET;
        LocalTable {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            locks: (0..buckets).map(|_| AtomicU32::new(0)).collect(),
            bucket_mask: buckets - 1,
            evictions: AtomicU64::new(0),
        }
    }

    /// The number of slots (counters) the table holds; fixed for its lifetime.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// How many counters were evicted while their window was still running. Each is a key that
    /// starts again from 0; a rising value means `max_keys` is too small.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Counts `cost` against one window of a key if that keeps it within `limit`.
    ///
    /// Exact: concurrent callers never admit more than `limit` per window in total. `cost = 0`
    /// admits without counting (unless the window is already over its limit through
    /// [`LocalTable::charge`]). A `cost` above `limit` is always refused: the engine should cap a
    /// token reservation at the limit if it wants large requests to pass an empty window.
    pub fn try_acquire(
        &self,
        key_hash: u64,
        period_ms: u64,
        limit: u64,
        cost: u64,
        now_ms: u64,
    ) -> Decision {
        self.acquire(key_hash, period_ms, limit, cost, now_ms).0
    }

    /// Counts `cost` against every window of a rule, all or nothing.
    ///
    /// Windows are taken in order; when one refuses, the ones already taken are given back (to the
    /// window they were counted in) and the request is refused. Between the take and the give-back
    /// another caller may be refused because of this request's brief hold: conservative, never
    /// over-admitting. The result reports the binding window: when admitted, the one with the
    /// least remaining; when refused, the refusing one, with `reset_ms` the latest reset among the
    /// windows that would refuse this cost. No windows: [`Decision::UNLIMITED`].
    pub fn try_acquire_all(
        &self,
        key_hash: u64,
        windows: &[(u64, u64)],
        cost: u64,
        now_ms: u64,
    ) -> Decision {
        let mut small = [0u64; 8];
        let mut large = Vec::new();
        let taken: &mut [u64] = if windows.len() <= small.len() {
            &mut small[..windows.len()]
        } else {
            large.resize(windows.len(), 0);
            &mut large
        };
        let mut best: Option<Decision> = None;
        for (i, &(period, limit)) in windows.iter().enumerate() {
            let (d, window) = self.acquire(key_hash, period, limit, cost, now_ms);
            if !d.admitted {
                for (&(p, _), &w) in windows.iter().zip(taken.iter()).take(i) {
                    self.release_window(key_hash, p, cost, w);
                }
                let mut refused = d;
                for &(p, l) in &windows[i + 1..] {
                    let peek = self.peek(key_hash, p, l, now_ms);
                    if peek.remaining < cost {
                        refused.reset_ms = refused.reset_ms.max(peek.reset_ms);
                    }
                }
                return refused;
            }
            if let Some(slot) = taken.get_mut(i) {
                *slot = window;
            }
            best = Some(match best {
                Some(b)
                    if (b.remaining, u64::MAX - b.reset_ms)
                        <= (d.remaining, u64::MAX - d.reset_ms) =>
                {
                    b
                }
                _ => d,
            });
        }
        best.unwrap_or(Decision::UNLIMITED)
    }

    /// Gives `cost` back to the window containing `acquired_ms` (pass the time of the acquire),
    /// never below 0. A no-op once that window is no longer the stored one (a later window has
    /// started), or when the key is no longer in the table: quota of a past window cannot be
    /// given back, and reconciliation must not refill a new window.
    pub fn release(&self, key_hash: u64, period_ms: u64, cost: u64, acquired_ms: u64) {
        self.release_window(
            key_hash,
            period_ms,
            cost,
            window_index(acquired_ms, period_ms),
        );
    }

    /// [`LocalTable::release`] for every window of a rule.
    pub fn release_all(&self, key_hash: u64, windows: &[(u64, u64)], cost: u64, acquired_ms: u64) {
        for &(period, _) in windows {
            self.release(key_hash, period, cost, acquired_ms);
        }
    }

    /// Counts `cost` against the window containing `now_ms` without checking the limit
    /// (saturating at [`MAX_COUNT`]): for token usage that turned out larger than reserved, so the
    /// overrun is paid for by later requests of the same window.
    pub fn charge(&self, key_hash: u64, period_ms: u64, cost: u64, now_ms: u64) {
        let tag = slot_tag(key_hash, period_ms);
        let cur = window_index(now_ms, period_ms);
        self.with_counter(tag, period_ms, now_ms, true, |s| {
            let (window, n) = match relation(win_of(s), cur) {
                Rel::Same => (cur, count_of(s)),
                Rel::Ahead => (cur.wrapping_add(1), count_of(s)),
                Rel::Stale => (cur, 0),
            };
            Step::Write(
                pack(gen_of(s), window, n.saturating_add(cost).min(MAX_COUNT)),
                (),
            )
        });
    }

    /// [`LocalTable::charge`] for every window of a rule.
    pub fn charge_all(&self, key_hash: u64, windows: &[(u64, u64)], cost: u64, now_ms: u64) {
        for &(period, _) in windows {
            self.charge(key_hash, period, cost, now_ms);
        }
    }

    /// The state of one window without counting anything (for headers on paths that do not
    /// acquire). `admitted` says whether a cost of 1 would pass now.
    pub fn peek(&self, key_hash: u64, period_ms: u64, limit: u64, now_ms: u64) -> Decision {
        let tag = slot_tag(key_hash, period_ms);
        let cur = window_index(now_ms, period_ms);
        let lim = limit.min(MAX_COUNT);
        let fresh = Decision {
            admitted: lim > 0,
            remaining: lim,
            reset_ms: reset_after_ms(now_ms, period_ms),
            limit: lim,
        };
        self.with_counter(tag, period_ms, now_ms, false, |s| {
            let (ahead, n) = match relation(win_of(s), cur) {
                Rel::Same => (0, count_of(s)),
                Rel::Ahead => (1, count_of(s)),
                Rel::Stale => return Step::Keep(fresh),
            };
            let remaining = lim.saturating_sub(n);
            let reset_ms = if ahead == 0 {
                reset_after_ms(now_ms, period_ms)
            } else {
                reset_after_next_ms(now_ms, period_ms)
            };
            Step::Keep(Decision {
                admitted: remaining > 0,
                remaining,
                reset_ms,
                limit: lim,
            })
        })
        .unwrap_or(fresh)
    }

    /// The acquire itself; also returns the full window index the cost was counted in (the
    /// current one, or the next when another caller's clock already moved the counter there).
    fn acquire(
        &self,
        key_hash: u64,
        period_ms: u64,
        limit: u64,
        cost: u64,
        now_ms: u64,
    ) -> (Decision, u64) {
        let tag = slot_tag(key_hash, period_ms);
        let cur = window_index(now_ms, period_ms);
        let lim = limit.min(MAX_COUNT);
        let reset = reset_after_ms(now_ms, period_ms);
        let reset_next = reset_after_next_ms(now_ms, period_ms);
        let refused = Decision {
            admitted: false,
            remaining: lim,
            reset_ms: reset,
            limit: lim,
        };
        self.with_counter(tag, period_ms, now_ms, true, |s| {
            let (ahead, n) = match relation(win_of(s), cur) {
                Rel::Same => (0, count_of(s)),
                Rel::Ahead => (1, count_of(s)),
                Rel::Stale => (0, 0),
            };
            let window = cur.wrapping_add(ahead);
            let reset_ms = if ahead == 0 { reset } else { reset_next };
            if cost <= lim && n <= lim - cost {
                let n = n + cost;
                let d = Decision {
                    admitted: true,
                    remaining: lim - n,
                    reset_ms,
                    limit: lim,
                };
                Step::Write(pack(gen_of(s), window, n), (d, window))
            } else {
                let d = Decision {
                    admitted: false,
                    remaining: lim.saturating_sub(n),
                    reset_ms,
                    limit: lim,
                };
                Step::Keep((d, window))
            }
        })
        // Only reachable without insertion; acquire always inserts.
        .unwrap_or((refused, cur))
    }

    /// Gives `cost` back to full window index `window`, if that is still the stored window.
    fn release_window(&self, key_hash: u64, period_ms: u64, cost: u64, window: u64) {
        let tag = slot_tag(key_hash, period_ms);
        let now_in_window = index_start(window, period_ms);
        self.with_counter(tag, period_ms, now_in_window, false, |s| {
            if relation(win_of(s), window) == Rel::Same {
                Step::Write(
                    pack(gen_of(s), window, count_of(s).saturating_sub(cost)),
                    (),
                )
            } else {
                Step::Keep(())
            }
        });
    }

    /// Runs the state transition `f` on counter `tag` until it sticks, finding (and with
    /// `insert`, creating) its slot. `None` when the counter is absent and `insert` is false.
    fn with_counter<R>(
        &self,
        tag: u64,
        period_ms: u64,
        now_ms: u64,
        insert: bool,
        mut f: impl FnMut(u64) -> Step<R>,
    ) -> Option<R> {
        loop {
            let i = self.locate(tag, period_ms, now_ms, insert)?;
            // `i` comes from `locate`, which only returns indexes inside `slots`.
            let slot = self.slots.get(i)?;
            if let Some(r) = Self::on_slot(slot, tag, &mut f) {
                slot.last_used.store(now_ms, Ordering::Relaxed);
                return Some(r);
            }
            // The slot was re-claimed between finding and using it: look again.
        }
    }

    /// One CAS loop on a slot that should hold `tag`. `None` when it does not (any more), or is
    /// being rewritten.
    fn on_slot<R>(slot: &Slot, tag: u64, f: &mut impl FnMut(u64) -> Step<R>) -> Option<R> {
        let mut s = slot.state.load(Ordering::Acquire);
        // State first, then tag: with the claimer's release stores this pairs the tag with the
        // generation in `s` (see the module docs).
        if gen_of(s) & 1 == 1 || slot.tag.load(Ordering::Acquire) != tag {
            return None;
        }
        loop {
            match f(s) {
                Step::Keep(r) => return Some(r),
                Step::Write(new, r) => {
                    match slot.state.compare_exchange_weak(
                        s,
                        new,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return Some(r),
                        // Same generation: only the count or window moved; the owner is unchanged.
                        Err(now) if gen_of(now) == gen_of(s) => s = now,
                        Err(_) => return None,
                    }
                }
            }
        }
    }

    /// The slot index holding `tag`; with `insert`, claims one when absent.
    fn locate(&self, tag: u64, period_ms: u64, now_ms: u64, insert: bool) -> Option<usize> {
        let bucket = (tag as usize) & self.bucket_mask;
        let base = bucket * BUCKET;
        let range = base..base + BUCKET;
        let slots = self.slots.get(range.clone())?;
        // Lock-free fast path: the counter is usually there.
        if let Some(j) = slots
            .iter()
            .position(|s| s.tag.load(Ordering::Acquire) == tag)
        {
            return Some(base + j);
        }
        if !insert {
            return None;
        }
        let _guard = self.lock_bucket(bucket)?;
        // Under the lock tags cannot change: look again, another thread may just have added it.
        if let Some(j) = slots
            .iter()
            .position(|s| s.tag.load(Ordering::Acquire) == tag)
        {
            return Some(base + j);
        }
        let mut stale = None;
        let mut lru: Option<(u64, usize)> = None;
        for (j, s) in slots.iter().enumerate() {
            if s.tag.load(Ordering::Acquire) == EMPTY {
                stale = Some(j);
                break;
            }
            let owner_window = window_index(now_ms, s.period.load(Ordering::Relaxed));
            if relation(win_of(s.state.load(Ordering::Acquire)), owner_window) == Rel::Stale {
                stale.get_or_insert(j);
                continue;
            }
            let used = s.last_used.load(Ordering::Relaxed);
            if lru.is_none_or(|(t, _)| used < t) {
                lru = Some((used, j));
            }
        }
        let victim = match (stale, lru) {
            (Some(j), _) => j,
            (None, Some((_, j))) => {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                j
            }
            (None, None) => return None,
        };
        let slot = slots.get(victim)?;
        // Odd generation: in-flight CASes against the old owner fail from here on.
        let old = slot.state.fetch_add(1 << GEN_SHIFT, Ordering::AcqRel);
        slot.period.store(period_ms, Ordering::Relaxed);
        slot.last_used.store(now_ms, Ordering::Relaxed);
        // Release: a reader that sees this tag also sees the odd generation (its CAS fails).
        slot.tag.store(tag, Ordering::Release);
        let fresh = pack(
            gen_of(old).wrapping_add(2),
            window_index(now_ms, period_ms),
            0,
        );
        slot.state.store(fresh, Ordering::Release);
        Some(base + victim)
    }

    /// Spins for the bucket's lock. Held only for a handful of stores; after a short spin the
    /// thread yields, in case the holder was preempted.
    fn lock_bucket(&self, bucket: usize) -> Option<BucketGuard<'_>> {
        let lock = self.locks.get(bucket)?;
        let mut spins = 0u32;
        while lock
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Some(BucketGuard(lock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    const MIN: u64 = 60_000;

    #[test]
    fn exact_under_concurrency_on_one_key() {
        let table = LocalTable::new(1000);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if table.try_acquire(42, MIN, 1000, 1, 5_000).admitted {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 1000);
        assert_eq!(table.peek(42, MIN, 1000, 5_000).remaining, 0);
    }

    #[test]
    fn exact_under_concurrency_on_many_keys() {
        const KEYS: usize = 300;
        // Sized with margin so no bucket overflows: this test is about exactness, not eviction.
        let table = LocalTable::new(KEYS * 4);
        let per_key: Vec<AtomicU64> = (0..KEYS).map(|_| AtomicU64::new(0)).collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (table, per_key) = (&table, &per_key);
                s.spawn(move || {
                    for round in 0..40 {
                        for k in 0..KEYS {
                            let k = (k + t * 37 + round) % KEYS;
                            if table
                                .try_acquire(k as u64 * 7919, MIN, 25, 1, 1_000)
                                .admitted
                            {
                                per_key[k].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        assert_eq!(table.evictions(), 0);
        for (k, n) in per_key.iter().enumerate() {
            assert_eq!(n.load(Ordering::Relaxed), 25, "key {k}");
        }
    }

    #[test]
    fn windows_roll_over_and_never_move_back() {
        let t = LocalTable::new(10);
        // (now_ms, admitted, remaining, reset_ms)
        let steps = [
            (0, true, 1, 1000),
            (500, true, 0, 500),
            (999, false, 0, 1),
            (1000, true, 1, 1000), // new window
            (999, true, 0, 1001),  // lagging clock: counts against the newer window
            (1500, false, 0, 500),
            (5000, true, 1, 1000), // several windows later
        ];
        for (now, admitted, remaining, reset_ms) in steps {
            let d = t.try_acquire(7, 1000, 2, 1, now);
            assert_eq!(
                (d.admitted, d.remaining, d.reset_ms, d.limit),
                (admitted, remaining, reset_ms, 2),
                "at {now}"
            );
        }
    }

    #[test]
    fn cost_limits_and_peek() {
        let t = LocalTable::new(10);
        // (cost, admitted, remaining)
        let steps = [
            (60, true, 40),
            (50, false, 40),
            (40, true, 0),
            (0, true, 0),
            (1, false, 0),
        ];
        for (cost, admitted, remaining) in steps {
            let d = t.try_acquire(1, MIN, 100, cost, 10);
            assert_eq!(
                (d.admitted, d.remaining),
                (admitted, remaining),
                "cost {cost}"
            );
        }
        assert!(
            !t.try_acquire(2, MIN, 100, 101, 10).admitted,
            "a cost above the limit never passes"
        );
        assert!(
            !t.try_acquire(3, MIN, 0, 1, 10).admitted,
            "limit 0 refuses everything"
        );
        let fresh = t.peek(4, MIN, 100, 10);
        assert_eq!(
            (fresh.admitted, fresh.remaining, fresh.reset_ms),
            (true, 100, MIN - 10)
        );
        let huge = t.try_acquire(5, MIN, u64::MAX, 1, 10);
        assert_eq!((huge.limit, huge.remaining), (MAX_COUNT, MAX_COUNT - 1));
    }

    #[test]
    fn release_gives_back_within_the_same_window_only() {
        let t = LocalTable::new(10);
        let _ = t.try_acquire(9, 1000, 10, 5, 100);
        t.release(9, 1000, 3, 100);
        assert_eq!(t.peek(9, 1000, 10, 200).remaining, 8);
        t.release(9, 1000, 100, 150);
        assert_eq!(t.peek(9, 1000, 10, 200).remaining, 10, "never below zero");
        let _ = t.try_acquire(9, 1000, 10, 4, 1100);
        t.release(9, 1000, 4, 100);
        assert_eq!(
            t.peek(9, 1000, 10, 1200).remaining,
            6,
            "a past window's reservation is not given to the new one"
        );
        t.release(12345, 1000, 4, 100); // unknown key: nothing happens, nothing is inserted
        assert_eq!(t.peek(12345, 1000, 10, 100).remaining, 10);
    }

    #[test]
    fn charge_counts_past_the_limit() {
        let t = LocalTable::new(10);
        let _ = t.try_acquire(3, MIN, 100, 50, 0);
        t.charge(3, MIN, 80, 10);
        let d = t.try_acquire(3, MIN, 100, 1, 20);
        assert_eq!((d.admitted, d.remaining), (false, 0));
        t.charge(3, MIN, u64::MAX, 30);
        assert_eq!(
            t.peek(3, MIN, u64::MAX, 40).remaining,
            0,
            "saturates at MAX_COUNT"
        );
        assert!(
            t.try_acquire(3, MIN, 100, 1, MIN).admitted,
            "the next window starts clean"
        );
    }

    #[test]
    fn multi_window_rolls_back_when_a_later_window_refuses() {
        let t = LocalTable::with_windows(10, 2);
        let windows = [(1000, 3), (MIN, 5)];
        let mut admitted = 0;
        for i in 0..10 {
            let d = t.try_acquire_all(1, &windows, 1, i * 400);
            admitted += u64::from(d.admitted);
        }
        assert_eq!(admitted, 5);
        // The second window refused; the per-second window was given back each time.
        let last = t.try_acquire_all(1, &windows, 1, 4_100);
        assert_eq!(
            (last.admitted, last.remaining, last.limit, last.reset_ms),
            (false, 0, 5, MIN - 4_100)
        );
        assert_eq!(t.peek(1, 1000, 3, 4_100).remaining, 3);
        // Admitted: the tightest window is reported.
        let d = t.try_acquire_all(2, &windows, 1, 0);
        assert_eq!(
            (d.admitted, d.remaining, d.limit, d.reset_ms),
            (true, 2, 3, 1000)
        );
        assert_eq!(t.try_acquire_all(2, &[], 1, 0), Decision::UNLIMITED);
    }

    #[test]
    fn multi_window_rollback_is_exact_under_concurrency() {
        let t = LocalTable::with_windows(10, 2);
        let windows = [(1000, 10_000), (MIN, 500)];
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..2_000 {
                        if t.try_acquire_all(77, &windows, 1, 100).admitted {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 500);
        assert_eq!(
            t.peek(77, 1000, 10_000, 100).remaining,
            9_500,
            "every rollback landed"
        );
    }

    #[test]
    fn capacity_is_fixed_and_evictions_are_counted() {
        let t = LocalTable::new(1000);
        let cap = t.capacity();
        assert_eq!(cap, 2048);
        let day = 86_400_000;
        for i in 0..200_000u64 {
            // One key stays hot: it is touched on every step, so LRU never picks it.
            assert!(t.try_acquire(u64::MAX, day, 1_000_000, 1, i).admitted);
            let _ = t.try_acquire(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), day, 10, 1, i);
        }
        assert_eq!(t.capacity(), cap);
        assert!(t.evictions() >= 200_000 - cap as u64, "{}", t.evictions());
        assert_eq!(
            t.peek(u64::MAX, day, 1_000_000, 200_000).remaining,
            1_000_000 - 200_000
        );
    }

    #[test]
    fn expired_slots_are_reused_without_eviction() {
        let t = LocalTable::new(4); // 8 slots, one bucket
        for k in 0..8 {
            let _ = t.try_acquire(k, 1000, 1, 1, 0);
        }
        for k in 100..108 {
            assert!(t.try_acquire(k, 1000, 1, 1, 2000).admitted);
        }
        assert_eq!(t.evictions(), 0);
        let _ = t.try_acquire(200, 1000, 1, 1, 2000);
        assert_eq!(t.evictions(), 1);
    }
}
