//! Provider key pools: a weighted choice among an upstream's keys per request, a cooldown for a
//! key the provider answered 429, and removal (until the next reload) of a key answered 401/403.
//!
//! A pool is shared by every worker. Its state is atomics only: choosing a key is a few relaxed
//! loads and one counter increment, with no lock on the request path. The per-key state lives in
//! the metrics registry so that counters survive a reload while cooldowns and removals do not.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{CredentialKind, Credentials};

/// Cooldown of a key answered 429 without any hint of when to come back.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);
/// Longest cooldown honoured: a provider's (or a broken proxy's) `retry-after` of a day must
/// not take a key out for a day.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

/// The `anthropic-version` sent to an Anthropic upstream whose client sent none.
pub const ANTHROPIC_VERSION_LINE: &[u8] = b"anthropic-version: 2023-06-01\r\n";

/// Shared state of one key position of one upstream: counters and its standing.
#[derive(Default)]
pub struct KeyState {
    /// Requests sent with this key.
    pub requests: AtomicU64,
    /// Responses by status class: 2xx, 3xx, 4xx, 5xx.
    pub responses: [AtomicU64; 4],
    /// Unix milliseconds until which the key is cooling (0: not cooling).
    pub cool_until_ms: AtomicU64,
    /// Answered 401/403: not used until the next reload.
    pub disabled: AtomicBool,
}

impl KeyState {
    /// Whether the key is cooling at `now_ms`.
    pub fn cooling(&self, now_ms: u64) -> bool {
        self.cool_until_ms.load(Ordering::Relaxed) > now_ms
    }
}

struct PoolKey {
    /// The whole header line, `name: value\r\n`, written as is into the upstream head (one
    /// copy, no formatting per request). A `Secret`, so it is zeroed on drop.
    line: crate::config::secret::Secret,
    weight: u64,
    state: Arc<KeyState>,
}

/// The keys of one upstream, compiled at start and on every reload.
pub struct KeyPool {
    /// The upstream's name (metrics and log lines).
    pub upstream: String,
    /// The header that carries a key.
    pub kind: CredentialKind,
    keys: Box<[PoolKey]>,
}

impl std::fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPool({}, {} keys)", self.upstream, self.keys.len())
    }
}

impl KeyPool {
    /// Compiles `creds` of upstream `upstream`. Cooldowns and removals start clear: a reload
    /// is how an operator puts a revoked key back after fixing it.
    pub fn new(upstream: &str, creds: &Credentials) -> Self {
        let name = creds.kind.header_name().as_bytes();
        let keys = creds
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let v = k.secret.expose();
                let mut line = Vec::with_capacity(name.len() + v.len() + 12);
                line.extend_from_slice(name);
                line.extend_from_slice(b": ");
                if creds.kind == CredentialKind::Bearer {
                    line.extend_from_slice(b"Bearer ");
                }
                line.extend_from_slice(v);
                line.extend_from_slice(b"\r\n");
                let state = crate::metrics::registry().key_state(upstream, i);
                state.cool_until_ms.store(0, Ordering::Relaxed);
                state.disabled.store(false, Ordering::Relaxed);
                PoolKey {
                    line: crate::config::secret::Secret::new(line),
                    weight: u64::from(k.weight.max(1)),
                    state,
                }
            })
            .collect();
        KeyPool {
            upstream: upstream.to_string(),
            kind: creds.kind.clone(),
            keys,
        }
    }

    /// How many keys the pool has.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the pool has no key (never, for a checked configuration).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The header line of key `idx` (`""` for an index from another configuration).
    pub fn line(&self, idx: usize) -> &[u8] {
        self.keys.get(idx).map_or(&[], |k| k.line.expose())
    }

    /// Chooses a key for one request and counts it: weighted among the keys neither cooling nor
    /// removed; when every usable key cools, the one whose cooldown ends first; `None` when
    /// every key was removed (401/403).
    pub fn pick(&self, now_ms: u64) -> Option<usize> {
        let i = choose(
            self.keys.iter().map(|k| {
                (
                    k.weight,
                    k.state.disabled.load(Ordering::Relaxed),
                    k.state.cool_until_ms.load(Ordering::Relaxed),
                )
            }),
            now_ms,
            next_random(),
        )?;
        self.keys[i].state.requests.fetch_add(1, Ordering::Relaxed);
        Some(i)
    }

    /// Like [`pick`](Self::pick), but only among keys neither cooling nor removed.
    pub fn pick_usable(&self, now_ms: u64) -> Option<usize> {
        if !self.has_usable(now_ms) {
            return None;
        }
        self.pick(now_ms)
    }

    /// Whether some key is neither cooling nor removed.
    pub fn has_usable(&self, now_ms: u64) -> bool {
        self.keys.iter().any(|k| {
            !k.state.disabled.load(Ordering::Relaxed)
                && k.state.cool_until_ms.load(Ordering::Relaxed) <= now_ms
        })
    }

    /// Records the provider's answer to a request sent with key `idx`: a 429 cools the key for
    /// `cooldown`, a 401/403 removes it until the next reload (logged by position).
    pub fn report(
        &self,
        idx: usize,
        status: u16,
        cooldown: impl FnOnce() -> Duration,
        now_ms: u64,
    ) {
        let Some(k) = self.keys.get(idx) else { return };
        let class = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            500..=599 => 3,
            _ => return,
        };
        k.state.responses[class].fetch_add(1, Ordering::Relaxed);
        match status {
            429 => {
                let d = cooldown().min(MAX_COOLDOWN);
                let until = now_ms.saturating_add(d.as_millis() as u64);
                k.state.cool_until_ms.fetch_max(until, Ordering::Relaxed);
            }
            // Position only: the value never reaches a log line.
            401 | 403 if !k.state.disabled.swap(true, Ordering::Relaxed) => {
                crate::log::warn(&format!(
                    "upstream {}: key {idx} was answered {status}; it is not used until the next reload",
                    self.upstream
                ));
            }
            _ => {}
        }
    }
}

/// The weighted choice over `(weight, removed, cool_until_ms)`, with `rand` any random number.
fn choose(
    keys: impl Iterator<Item = (u64, bool, u64)> + Clone,
    now_ms: u64,
    rand: u64,
) -> Option<usize> {
    let usable = |&(_, removed, until): &(u64, bool, u64)| !removed && until <= now_ms;
    let total: u64 = keys.clone().filter(usable).map(|k| k.0).sum();
    if total > 0 {
        let mut r = rand % total;
        for (i, k) in keys.clone().enumerate() {
            if !usable(&k) {
                continue;
            }
            if r < k.0 {
                return Some(i);
            }
            r -= k.0;
        }
    }
    keys.enumerate()
        .filter(|(_, k)| !k.1)
        .min_by_key(|(_, k)| k.2)
        .map(|(i, _)| i)
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // Differs per thread and per process; the choice only needs to spread, not be secret.
    let t = crate::upstream::health::now_ms();
    let here = &t as *const u64 as u64;
    splitmix(t ^ here.rotate_left(32))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A per-thread pseudo-random number (no shared state, no lock).
pub(crate) fn next_random() -> u64 {
    RNG.with(|c| {
        let v = c.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        c.set(v);
        splitmix(v)
    })
}

/// How long a key answered 429 cools, from the response's headers: `retry-after` (seconds or
/// an HTTP date), else the longer of `x-ratelimit-reset-requests` / `-tokens` (OpenAI's
/// durations such as "6m0s" or "20ms"), else [`DEFAULT_COOLDOWN`].
pub fn cooldown_from(headers: &[httparse::Header<'_>], now_unix_s: u64) -> Duration {
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    if let Some(d) = get("retry-after").and_then(|v| retry_after(v, now_unix_s)) {
        return d;
    }
    let reset = ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .iter()
        .filter_map(|n| get(n).and_then(openai_duration))
        .max();
    reset.unwrap_or(DEFAULT_COOLDOWN)
}

/// `retry-after`: delay-seconds or an IMF-fixdate (RFC 9110 §10.2.3).
pub fn retry_after(v: &str, now_unix_s: u64) -> Option<Duration> {
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    // Some providers send fractional seconds.
    if let Ok(f) = v.parse::<f64>() {
        if f.is_finite() && f >= 0.0 {
            return Some(Duration::from_secs_f64(f.min(MAX_COOLDOWN.as_secs_f64())));
        }
    }
    let at = http_date(v)?;
    Some(Duration::from_secs(at.saturating_sub(now_unix_s)))
}

/// Unix seconds of an IMF-fixdate such as "Sun, 06 Nov 1994 08:49:37 GMT".
pub fn http_date(v: &str) -> Option<u64> {
    let mut it = v.split_ascii_whitespace();
    let _weekday = it.next()?.strip_suffix(',')?;
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day as i64);
    u64::try_from(days * 86400)
        .ok()
        .map(|d| d + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// OpenAI's reset durations: numbers with units h, m, s, ms (and us/ns), in sequence, such as
/// "1h2m3.5s", "6m0s" or "20ms".
pub fn openai_duration(v: &str) -> Option<Duration> {
    let b = v.as_bytes();
    let mut i = 0;
    let mut total = 0f64;
    if b.is_empty() {
        return None;
    }
    while i < b.len() {
        let start = i;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let n: f64 = v.get(start..i)?.parse().ok()?;
        let ustart = i;
        while i < b.len() && b[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = match v.get(ustart..i)? {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * unit;
    }
    (total.is_finite() && total >= 0.0)
        .then(|| Duration::from_secs_f64(total.min(MAX_COOLDOWN.as_secs_f64())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_choice_follows_weights() {
        let keys = [(1u64, false, 0u64), (3, false, 0)];
        let mut counts = [0u32; 2];
        for r in 0..4000u64 {
            let i = choose(keys.iter().copied(), 100, splitmix(r)).unwrap_or(9);
            counts[i] += 1;
        }
        assert!((800..1200).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn cooling_and_removed_keys_are_skipped() {
        // Key 0 cools until 500, key 1 is removed, key 2 is usable.
        let keys = [(5u64, false, 500u64), (5, true, 0), (1, false, 0)];
        for r in 0..200u64 {
            assert_eq!(choose(keys.iter().copied(), 100, r), Some(2));
        }
        // Every usable key cools: the one whose cooldown ends first.
        let keys = [(1u64, false, 900u64), (1, false, 300), (1, true, 0)];
        assert_eq!(choose(keys.iter().copied(), 100, 7), Some(1));
        // Every key removed: none.
        let keys = [(1u64, true, 0u64)];
        assert_eq!(choose(keys.iter().copied(), 100, 7), None);
        // A cooldown that ended makes the key usable again.
        let keys = [(1u64, false, 100u64)];
        assert_eq!(choose(keys.iter().copied(), 100, 7), Some(0));
    }

    #[test]
    fn openai_durations() {
        let ms = |v: &str| openai_duration(v).map(|d| d.as_millis());
        assert_eq!(ms("6m0s"), Some(360_000));
        assert_eq!(ms("20ms"), Some(20));
        assert_eq!(ms("1.5s"), Some(1500));
        assert_eq!(ms("2m3s"), Some(123_000));
        assert_eq!(ms("2h"), Some(3_600_000), "capped at MAX_COOLDOWN");
        assert_eq!(ms(""), None);
        assert_eq!(ms("5"), None);
        assert_eq!(ms("5x"), None);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(retry_after("7", 0), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("0.5", 0), Some(Duration::from_millis(500)));
        assert_eq!(
            http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        let now = 784_111_777 - 30;
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now + 100),
            Some(Duration::ZERO),
            "a date in the past: no cooldown"
        );
        assert_eq!(retry_after("soon", 0), None);
    }

    #[test]
    fn cooldown_prefers_retry_after_then_reset_headers_then_default() {
        let h =
            |pairs: &'static [(&'static str, &'static [u8])]| -> Vec<httparse::Header<'static>> {
                pairs
                    .iter()
                    .map(|(n, v)| httparse::Header { name: n, value: v })
                    .collect()
            };
        let both = h(&[("x-ratelimit-reset-requests", b"2s"), ("Retry-After", b"5")]);
        assert_eq!(cooldown_from(&both, 0), Duration::from_secs(5));
        let resets = h(&[
            ("x-ratelimit-reset-requests", b"20ms"),
            ("x-ratelimit-reset-tokens", b"6m0s"),
        ]);
        assert_eq!(cooldown_from(&resets, 0), Duration::from_secs(360));
        assert_eq!(cooldown_from(&h(&[]), 0), DEFAULT_COOLDOWN);
        assert_eq!(
            cooldown_from(&h(&[("retry-after", b"junk")]), 0),
            DEFAULT_COOLDOWN
        );
    }
}
