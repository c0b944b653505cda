//! The `ai-stats` series: what settled AI requests count per (route, model, consumer), and
//! their Prometheus text.
//!
//! Each thread records into a shard of its own, so settling takes one uncontended lock and no
//! lock is shared between workers; the metrics page sums the shards. A request of the same
//! series as the one before on its thread (the common case) finds it by comparing the three
//! names, without hashing them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use ringway_filters::{
    limit::window::Usd,
    usage::{Usage, UsageSource},
};

/// When a settled request was sent, and when its first content and its end came.
pub(super) struct Timing {
    pub sent_at: Instant,
    pub first_token: Option<Instant>,
    pub done_at: Option<Instant>,
}

/// Most (route, model, consumer) series kept; later ones share "other".
const MAX_SERIES: usize = 10_000;

/// Upper bounds of the time-to-first-token histogram, in seconds.
const TTFT_BUCKETS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
];

/// Most distinct statuses counted per series (there are only a few in
/// practice); later ones are counted under the last slot's status.
const MAX_STATUSES: usize = 16;

#[derive(Default, Clone)]
struct Series {
    /// Requests by the upstream's status, in order of first appearance.
    requests: Vec<(u16, u64)>,
    input: [u64; 2],
    output: [u64; 2],
    cache_read: u64,
    /// Spend in micro-dollars, at the prices in force when each request settled.
    cost_micro: u64,
    ttft: [u64; TTFT_BUCKETS.len() + 1],
    ttft_sum: f64,
    ttft_count: u64,
    tps_sum: f64,
    tps_count: u64,
}

/// (route, model, consumer).
type SeriesKey = (String, String, String);

/// A series key looked up by borrowed parts, so a request whose series
/// exists allocates nothing (see [`record`]).
trait KeyParts {
    fn parts(&self) -> (&str, &str, &str);
}

impl KeyParts for SeriesKey {
    fn parts(&self) -> (&str, &str, &str) {
        (&self.0, &self.1, &self.2)
    }
}

impl KeyParts for (&str, &str, &str) {
    fn parts(&self) -> (&str, &str, &str) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for SeriesKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

// Hashes as the owned tuple does (`(A, B, C)` hashes its fields in order),
// which `Borrow` requires.
impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.parts().hash(h);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, o: &Self) -> bool {
        self.parts() == o.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl Series {
    /// Adds another thread's counts of the same series.
    fn merge(&mut self, o: &Series) {
        for &(status, n) in &o.requests {
            self.count_status(status, n);
        }
        for d in 0..2 {
            self.input[d] += o.input[d];
            self.output[d] += o.output[d];
        }
        self.cache_read += o.cache_read;
        self.cost_micro += o.cost_micro;
        for (a, b) in self.ttft.iter_mut().zip(&o.ttft) {
            *a += b;
        }
        self.ttft_sum += o.ttft_sum;
        self.ttft_count += o.ttft_count;
        self.tps_sum += o.tps_sum;
        self.tps_count += o.tps_count;
    }

    fn count_status(&mut self, status: u16, n: u64) {
        match self.requests.iter().position(|(st, _)| *st == status) {
            Some(i) => self.requests[i].1 += n,
            None if self.requests.len() < MAX_STATUSES => self.requests.push((status, n)),
            None => {
                if let Some((_, c)) = self.requests.last_mut() {
                    *c += n;
                }
            }
        }
    }
}

/// One thread's series.
#[derive(Default)]
struct Shard {
    /// In the order they first appeared; `index` finds them by key.
    entries: Vec<(SeriesKey, Series)>,
    index: HashMap<SeriesKey, usize>,
    /// The entry recorded last.
    last: usize,
}

impl Shard {
    /// The series of `key`, created if new (past [`MAX_SERIES`], the route's "other").
    fn series(
        &mut self,
        key: (&str, &str, &str),
        admitted: &Mutex<HashSet<SeriesKey>>,
    ) -> Option<&mut Series> {
        let i = match self.entries.get(self.last) {
            Some((k, _)) if k.parts() == key => self.last,
            _ => match self.index.get(&key as &dyn KeyParts) {
                Some(&i) => i,
                None => {
                    // Owned strings only for a series not seen yet: past the cap, a stream
                    // of new model names all land in "other" without allocating.
                    let key = if admit(admitted, key) {
                        key
                    } else {
                        (key.0, "other", "other")
                    };
                    match self.index.get(&key as &dyn KeyParts) {
                        Some(&i) => i,
                        None => {
                            let owned: SeriesKey = (key.0.into(), key.1.into(), key.2.into());
                            self.index.insert(owned.clone(), self.entries.len());
                            self.entries.push((owned, Series::default()));
                            self.entries.len() - 1
                        }
                    }
                }
            },
        };
        self.last = i;
        self.entries.get_mut(i).map(|(_, s)| s)
    }
}

/// Every thread's shard, for the metrics page.
static SHARDS: Mutex<Vec<Arc<Mutex<Shard>>>> = Mutex::new(Vec::new());

/// The series admitted in the whole process: [`MAX_SERIES`] counts distinct keys, as when one map
/// held them all, and a key admitted is counted under its own labels on every thread. Asked
/// only the first time a thread meets a series.
static ADMITTED: LazyLock<Mutex<HashSet<SeriesKey>>> = LazyLock::new(Mutex::default);

/// Whether `key` has (or now gets) a series of its own; false past the cap.
fn admit(admitted: &Mutex<HashSet<SeriesKey>>, key: (&str, &str, &str)) -> bool {
    let mut set = locked(admitted);
    if set.contains(&key as &dyn KeyParts) {
        return true;
    }
    if set.len() >= MAX_SERIES {
        return false;
    }
    set.insert((key.0.into(), key.1.into(), key.2.into()))
}

/// A lock's guard, also after a panic elsewhere poisoned it: counters stay usable.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// This thread's shard, registered on its first record.
    static MINE: Arc<Mutex<Shard>> = {
        let shard = Arc::new(Mutex::new(Shard::default()));
        locked(&SHARDS).push(Arc::clone(&shard));
        shard
    };
}

/// Adds one settled request to its series: `key` is (route, model, consumer), `status` the
/// upstream's, `cost_micro` its spend.
pub(super) fn record(
    key: (&str, &str, &str),
    status: u16,
    u: &Usage,
    cost_micro: u64,
    timing: &Timing,
) {
    // `try_with`: a request context dropped while this thread's locals are torn down is not
    // counted, rather than a panic in a destructor.
    let _ = MINE.try_with(|shard| {
        let mut shard = locked(shard);
        let Some(s) = shard.series(key, &ADMITTED) else {
            return;
        };
        s.count_status(status, 1);
        let est = usize::from(u.source == UsageSource::Estimated);
        s.input[est] += u.input;
        s.output[est] += u.output;
        s.cache_read += u.cache_read;
        s.cost_micro += cost_micro;
        if let Some(first) = timing.first_token {
            let ttft = first
                .saturating_duration_since(timing.sent_at)
                .as_secs_f64();
            let b = TTFT_BUCKETS
                .iter()
                .position(|&le| ttft <= le)
                .unwrap_or(TTFT_BUCKETS.len());
            s.ttft[b] += 1;
            s.ttft_sum += ttft;
            s.ttft_count += 1;
            if let Some(done) = timing.done_at {
                let gen = done
                    .saturating_duration_since(first)
                    .max(Duration::from_millis(1));
                s.tps_sum += u.output as f64 / gen.as_secs_f64();
                s.tps_count += 1;
            }
        }
    });
}

/// Every thread's series summed, by key.
fn merged() -> BTreeMap<SeriesKey, Series> {
    let mut all = BTreeMap::new();
    let shards = locked(&SHARDS);
    for shard in shards.iter() {
        let shard = locked(shard);
        for (k, s) in &shard.entries {
            match all.get_mut(k) {
                Some(sum) => Series::merge(sum, s),
                None => {
                    all.insert(k.clone(), s.clone());
                }
            }
        }
    }
    all
}

/// The `ai-stats` metrics, in Prometheus text.
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write;
    let map = merged();
    // Sorted: a `BTreeMap`'s keys.
    let keys: Vec<&SeriesKey> = map.keys().collect();
    let lbl = |k: &SeriesKey| {
        format!(
            "route=\"{}\",model=\"{}\",consumer=\"{}\"",
            esc(&k.0),
            esc(&k.1),
            esc(&k.2)
        )
    };
    let _ = writeln!(
        out,
        "# HELP ringway_ai_requests_total AI requests the upstream answered, by route, model, consumer and the upstream's status."
    );
    let _ = writeln!(out, "# TYPE ringway_ai_requests_total counter");
    for k in &keys {
        let mut by_status = map[*k].requests.clone();
        by_status.sort_unstable();
        for (status, n) in by_status {
            let _ = writeln!(
                out,
                "ringway_ai_requests_total{{{},status=\"{status}\"}} {n}",
                lbl(k)
            );
        }
    }
    let _ = writeln!(out, "# HELP ringway_ai_tokens_total Tokens by route, model, consumer and direction; estimated=\"true\" when the upstream reported none.");
    let _ = writeln!(out, "# TYPE ringway_ai_tokens_total counter");
    for k in &keys {
        let s = &map[*k];
        for (dir, v) in [("input", s.input), ("output", s.output)] {
            for (e, n) in [("false", v[0]), ("true", v[1])] {
                if n > 0 || e == "false" {
                    let _ = writeln!(
                        out,
                        "ringway_ai_tokens_total{{{},direction=\"{dir}\",estimated=\"{e}\"}} {n}",
                        lbl(k)
                    );
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP ringway_ai_cost_usd_total Spend in US dollars by route, model and consumer, at the [[prices]] of the model each request was sent (unpriced models count 0)."
    );
    let _ = writeln!(out, "# TYPE ringway_ai_cost_usd_total counter");
    for k in &keys {
        let _ = writeln!(
            out,
            "ringway_ai_cost_usd_total{{{}}} {}",
            lbl(k),
            Usd(map[*k].cost_micro)
        );
    }
    let _ = writeln!(out, "# HELP ringway_ai_cache_read_tokens_total Input tokens served from the provider's prompt cache.");
    let _ = writeln!(out, "# TYPE ringway_ai_cache_read_tokens_total counter");
    for k in &keys {
        let _ = writeln!(
            out,
            "ringway_ai_cache_read_tokens_total{{{}}} {}",
            lbl(k),
            map[*k].cache_read
        );
    }
    let _ = writeln!(out, "# HELP ringway_ai_time_to_first_token_seconds Time from sending the request to the first generated content.");
    let _ = writeln!(
        out,
        "# TYPE ringway_ai_time_to_first_token_seconds histogram"
    );
    for k in &keys {
        let s = &map[*k];
        let mut cum = 0;
        for (i, le) in TTFT_BUCKETS.iter().enumerate() {
            cum += s.ttft[i];
            let _ = writeln!(
                out,
                "ringway_ai_time_to_first_token_seconds_bucket{{{},le=\"{le}\"}} {cum}",
                lbl(k)
            );
        }
        cum += s.ttft[TTFT_BUCKETS.len()];
        let _ = writeln!(
            out,
            "ringway_ai_time_to_first_token_seconds_bucket{{{},le=\"+Inf\"}} {cum}",
            lbl(k)
        );
        let _ = writeln!(
            out,
            "ringway_ai_time_to_first_token_seconds_sum{{{}}} {}",
            lbl(k),
            s.ttft_sum
        );
        let _ = writeln!(
            out,
            "ringway_ai_time_to_first_token_seconds_count{{{}}} {}",
            lbl(k),
            s.ttft_count
        );
    }
    let _ = writeln!(out, "# HELP ringway_ai_output_tokens_per_second Output tokens per second of generation, summed over streamed requests (divide by _count).");
    let _ = writeln!(out, "# TYPE ringway_ai_output_tokens_per_second summary");
    for k in &keys {
        let s = &map[*k];
        let _ = writeln!(
            out,
            "ringway_ai_output_tokens_per_second_sum{{{}}} {}",
            lbl(k),
            s.tps_sum
        );
        let _ = writeln!(
            out,
            "ringway_ai_output_tokens_per_second_count{{{}}} {}",
            lbl(k),
            s.tps_count
        );
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A series inserted under its owned key is found by borrowed parts (the
    /// two hash alike), and only the exact parts match.
    #[test]
    fn series_found_by_borrowed_parts() {
        let mut map: HashMap<SeriesKey, u32> = HashMap::new();
        for (i, (r, m, c)) in [("chat", "gpt-4o", "alice"), ("chat", "gpt-4o", "bob")]
            .into_iter()
            .enumerate()
        {
            map.insert((r.into(), m.into(), c.into()), i as u32);
        }
        let key = ("chat", "gpt-4o", "bob");
        assert_eq!(map.get(&key as &dyn KeyParts), Some(&1));
        let other = ("chat", "gpt-4o", "carol");
        assert_eq!(map.get(&other as &dyn KeyParts), None);
        // Field boundaries count: ("ab", "c") is not ("a", "bc").
        map.insert(("r".into(), "ab".into(), "c".into()), 7);
        let shifted = ("r", "a", "bc");
        assert_eq!(map.get(&shifted as &dyn KeyParts), None);
    }

    fn usage() -> Usage {
        Usage {
            input: 10,
            output: 5,
            cache_read: 2,
            cache_write: 0,
            source: UsageSource::Reported,
        }
    }

    /// Three threads record the same two series, each in its own shard; the metrics page
    /// shows their sums.
    #[test]
    fn threads_record_apart_and_the_page_sums_them() {
        let threads: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(|| {
                    let timing = Timing {
                        sent_at: Instant::now(),
                        first_token: None,
                        done_at: None,
                    };
                    for i in 0..4 {
                        let consumer = if i % 2 == 0 { "alice" } else { "bob" };
                        let status = if i == 3 { 429 } else { 200 };
                        record(("sums", "m", consumer), status, &usage(), 7, &timing);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        let all = merged();
        let alice = &all[&("sums".into(), "m".into(), "alice".into())];
        assert_eq!(alice.requests, vec![(200, 6)]);
        assert_eq!(
            (alice.input[0], alice.output[0], alice.cache_read),
            (60, 30, 12)
        );
        assert_eq!(alice.cost_micro, 42);
        let bob = &all[&("sums".into(), "m".into(), "bob".into())];
        assert_eq!(bob.requests, vec![(200, 3), (429, 3)]);
        let mut page = String::new();
        render_metrics(&mut page);
        assert!(
            page.contains(
                "ringway_ai_requests_total{route=\"sums\",model=\"m\",consumer=\"bob\",status=\"429\"} 3"
            ),
            "{page}"
        );
    }

    /// The series recorded last is found again by its names; others by the index; past the
    /// process's cap a new one is the route's "other", on every thread.
    #[test]
    fn a_shard_finds_its_series_and_caps_them() {
        let mut shard = Shard::default();
        let admitted = Mutex::default();
        for i in 0..MAX_SERIES {
            let model = format!("m{i}");
            if let Some(s) = shard.series(("r", &model, "c"), &admitted) {
                s.cost_micro += 1;
            }
        }
        assert_eq!(shard.entries.len(), MAX_SERIES);
        // The last one, then an earlier one, then one past the cap.
        for key in [("r", "m9999", "c"), ("r", "m3", "c"), ("r", "new", "c")] {
            if let Some(s) = shard.series(key, &admitted) {
                s.cost_micro += 10;
            }
        }
        assert_eq!(shard.entries.len(), MAX_SERIES + 1);
        let cost = |k: (&str, &str, &str)| {
            shard
                .index
                .get(&k as &dyn KeyParts)
                .map(|&i| shard.entries[i].1.cost_micro)
        };
        assert_eq!(cost(("r", "m9999", "c")), Some(11));
        assert_eq!(cost(("r", "m3", "c")), Some(11));
        assert_eq!(cost(("r", "new", "c")), None);
        assert_eq!(cost(("r", "other", "other")), Some(10));
        // The cap is the process's: another thread's shard counts a key admitted here under
        // its own labels, and a new one under "other".
        let mut other_thread = Shard::default();
        for key in [("r", "m3", "c"), ("r", "newer", "c")] {
            if let Some(s) = other_thread.series(key, &admitted) {
                s.cost_micro += 5;
            }
        }
        let names: Vec<&SeriesKey> = other_thread.entries.iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                &("r".into(), "m3".into(), "c".into()),
                &("r".into(), "other".into(), "other".into())
            ]
        );
    }
}
