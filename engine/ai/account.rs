//! Settling an AI request: usage (reported or estimated), token
//! reservations reconciled with it, `ai-stats` metrics, and the numbers the
//! access log shows. Settlement runs when the request's context drops, so a
//! client that leaves mid-stream is still charged the estimate for what was
//! streamed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use ringway_filters::{
    coding::Decoder,
    sse::SseParser,
    usage::{estimate_tokens_from_chars, JsonUsageScanner, Usage, UsageSource, UsageTracker},
};

use ringway_filters::{limit::window::Usd, price::Price};

use crate::filter::{ledger::Totals, LimitCheck, RateLimit};

/// Bytes of a JSON completion that are not generated text, for estimates.
const ENVELOPE_BYTES: u64 = 256;

/// Largest SSE frame parsed; longer frames are forwarded untouched.
pub const MAX_SSE_FRAME: usize = 64 * 1024;

/// A token reservation: the filter, its check, tokens reserved, when (ms).
type Reservation = (Arc<RateLimit>, LimitCheck, u64, u64);

/// One AI request's accounting state.
pub struct AiCtx {
    /// Route name (metrics label), shared with the route.
    pub route: Arc<str>,
    /// Consumer name, if authenticated (shared with the key table).
    pub consumer: Option<Arc<str>>,
    /// The model the client asked for.
    pub model: Option<String>,
    /// Ringway added `include_usage`: the usage-only chunk is removed.
    pub injected: bool,
    /// Input tokens estimated from the request body.
    pub input_estimate: u64,
    /// Whether `ai-stats` is on the route.
    pub stats: bool,
    /// On the heap, as many as the route's limits take: inline, they were 544 bytes of every
    /// open stream's state.
    reservations: Vec<Reservation>,
    /// Usage from SSE frames.
    pub tracker: UsageTracker,
    /// SSE framing, when the response is an event stream (boxed: 144 bytes a JSON answer
    /// never needs, which kept every AI relay's state a size class up).
    pub sse: Option<Box<SseParser>>,
    /// Usage from a JSON body; made when the first non-SSE body bytes arrive (boxed: an event
    /// stream, held open for minutes, never needs its 592 bytes).
    json: Option<Box<JsonUsageScanner>>,
    /// Decodes a body the upstream compressed although asked for `identity`: the client gets
    /// the coded bytes, the usage scanners this decoder's output (boxed: rare).
    pub decoder: Option<Box<Decoder>>,
    /// Bytes of a non-streamed body, decoded when it was coded (for an estimate when it
    /// reports no usage).
    pub json_bytes: u64,
    /// The response was an event stream.
    pub streamed: bool,
    /// When the request was sent upstream (until then, when its body was read).
    pub sent_at: Instant,
    /// When the first generated content arrived.
    pub first_token: Option<Instant>,
    /// When the response ended.
    pub done_at: Option<Instant>,
    /// The upstream's status, once its response head arrived; 0 before. A
    /// request the upstream never answered is not counted.
    pub status: u16,
    /// The route's `sse_keepalive`.
    pub keepalive: Option<std::time::Duration>,
    /// Ringway's own time on the request: up to the answer's head, then processing the
    /// response body (parsing, usage, re-framing).
    pub busy: Duration,
    /// The price of the model the serving upstream was sent, when one matches: cost-limit
    /// reservations settle with it, and `ai-stats` counts spend by it.
    pub price: Option<Price>,
    settled: Option<Usage>,
}

impl AiCtx {
    /// A context for a request on `route`.
    pub fn new(
        route: &Arc<str>,
        consumer: Option<&Arc<str>>,
        model: Option<String>,
        injected: bool,
        input_estimate: u64,
        stats: bool,
        sent_at: Instant,
    ) -> Self {
        Self {
            route: route.clone(),
            consumer: consumer.cloned(),
            model,
            injected,
            input_estimate,
            stats,
            reservations: Vec::new(),
            tracker: UsageTracker::new(),
            sse: None,
            json: None,
            decoder: None,
            json_bytes: 0,
            streamed: false,
            sent_at,
            first_token: None,
            done_at: None,
            status: 0,
            keepalive: None,
            busy: Duration::ZERO,
            price: None,
            settled: None,
        }
    }

    /// Remembers a reservation to settle later.
    pub fn reserved(&mut self, rl: Arc<RateLimit>, check: LimitCheck, tokens: u64, taken_ms: u64) {
        self.reservations.push((rl, check, tokens, taken_ms));
    }

    /// Scans more of a non-SSE body for its usage.
    pub fn json_feed(&mut self, payload: &[u8]) {
        self.json
            .get_or_insert_with(|| Box::new(JsonUsageScanner::new()))
            .feed(payload);
    }

    /// The non-SSE body ended.
    pub fn json_finish(&mut self) {
        if let Some(j) = self.json.as_mut() {
            j.finish();
        }
    }

    /// The usage a JSON body reported, if it was scanned and had one.
    fn json_usage(&self) -> Option<Usage> {
        self.json.as_ref().and_then(|j| j.usage())
    }

    /// Gives every reservation back in full (the request never went upstream).
    pub fn release_all(&mut self) {
        for (rl, check, tokens, taken) in std::mem::take(&mut self.reservations) {
            rl.reconcile(&check, tokens, 0, taken);
        }
    }

    /// The request's usage: reported by the upstream, else estimated.
    pub fn usage(&self) -> Usage {
        if self.streamed {
            return self.tracker.usage(self.input_estimate);
        }
        match self.json_usage() {
            Some(u) => u,
            // No usage in a JSON reply: its generated text is most of the
            // body, so the body less a typical envelope (~256 bytes of ids,
            // roles and field names) stands in for it.
            None => Usage {
                input: self.input_estimate,
                output: estimate_tokens_from_chars(self.json_bytes.saturating_sub(ENVELOPE_BYTES)),
                cache_read: 0,
                cache_write: 0,
                source: UsageSource::Estimated,
            },
        }
    }

    /// The usage of an answer that is not a success (a 429, a 5xx, a 400):
    /// providers bill nothing for a refused request, so it counts zero tokens
    /// (not an estimate), unless its body reported usage.
    fn refused_usage(&self) -> Usage {
        let reported = if self.streamed {
            Some(self.tracker.usage(0)).filter(|u| u.source == UsageSource::Reported)
        } else {
            self.json_usage()
        };
        reported.unwrap_or(Usage {
            input: 0,
            output: 0,
            cache_read: 0,
            cache_write: 0,
            source: UsageSource::Reported,
        })
    }

    /// What `usage` costs at the request's price, in micro-dollars (0 when unpriced).
    pub fn cost_micro(&self, usage: &Usage) -> u64 {
        self.price.map_or(0, |p| p.cost_micro(usage))
    }

    /// Whether the upstream answered (a response head arrived).
    pub fn answered(&self) -> bool {
        self.status != 0
    }

    /// Settles once: reconciles reservations and records metrics. Returns
    /// the usage (for the access log).
    pub fn settle(&mut self) -> Option<Usage> {
        if self.settled.is_some() {
            return self.settled;
        }
        let usage = match self.status {
            200..=299 => self.usage(),
            0 => Usage {
                input: 0,
                output: 0,
                cache_read: 0,
                cache_write: 0,
                source: UsageSource::Estimated,
            },
            _ => self.refused_usage(),
        };
        let tokens_used = usage.input + usage.output;
        let cost = self.cost_micro(&usage);
        let totals = Totals {
            requests: 1,
            input: usage.input,
            output: usage.output,
            cached: usage.cache_read,
            spend_micro: cost,
            estimated: usage.source == UsageSource::Estimated,
        };
        let now = crate::upstream::health::now_ms();
        for (rl, check, reserved, taken) in std::mem::take(&mut self.reservations) {
            let used = if rl.cost { cost } else { tokens_used };
            rl.reconcile(&check, reserved, used, taken);
            if self.answered() {
                rl.record_usage(&check, &totals, now);
            }
        }
        if self.stats && self.answered() {
            record(self, &usage);
        }
        self.settled = Some(usage);
        self.settled
    }
}

impl Drop for AiCtx {
    fn drop(&mut self) {
        let _ = self.settle();
    }
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

#[derive(Default)]
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

fn store() -> &'static Mutex<HashMap<SeriesKey, Series>> {
    static S: OnceLock<Mutex<HashMap<SeriesKey, Series>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Adds one settled request to the `ai-stats` series (one lock per AI
/// request, which is tiny next to the request itself).
fn record(ctx: &AiCtx, u: &Usage) {
    let Ok(mut map) = store().lock() else { return };
    let model = ctx.model.as_deref().unwrap_or("unknown");
    let consumer = ctx.consumer.as_deref().unwrap_or("anonymous");
    let key: (&str, &str, &str) = (&ctx.route, model, consumer);
    // One hash of the key on the common path (its series exists).
    let s = match map.get_mut(&key as &dyn KeyParts) {
        Some(s) => s,
        None => {
            let key = if map.len() >= MAX_SERIES {
                (&*ctx.route, "other", "other")
            } else {
                key
            };
            // Owned strings only for a series not seen yet: past the cap, a stream of new
            // model names all land in "other" without allocating.
            if !map.contains_key(&key as &dyn KeyParts) {
                map.insert(
                    (key.0.into(), key.1.into(), key.2.into()),
                    Series::default(),
                );
            }
            let Some(s) = map.get_mut(&key as &dyn KeyParts) else {
                return;
            };
            s
        }
    };
    let est = usize::from(u.source == UsageSource::Estimated);
    match s.requests.iter().position(|(st, _)| *st == ctx.status) {
        Some(i) => s.requests[i].1 += 1,
        None if s.requests.len() < MAX_STATUSES => s.requests.push((ctx.status, 1)),
        None => {
            if let Some((_, n)) = s.requests.last_mut() {
                *n += 1;
            }
        }
    }
    s.input[est] += u.input;
    s.output[est] += u.output;
    s.cache_read += u.cache_read;
    s.cost_micro += ctx.cost_micro(u);
    if let Some(first) = ctx.first_token {
        let ttft = first.saturating_duration_since(ctx.sent_at).as_secs_f64();
        let b = TTFT_BUCKETS
            .iter()
            .position(|&le| ttft <= le)
            .unwrap_or(TTFT_BUCKETS.len());
        s.ttft[b] += 1;
        s.ttft_sum += ttft;
        s.ttft_count += 1;
        if let Some(done) = ctx.done_at {
            let gen = done
                .saturating_duration_since(first)
                .max(Duration::from_millis(1));
            s.tps_sum += u.output as f64 / gen.as_secs_f64();
            s.tps_count += 1;
        }
    }
}

/// The `ai-stats` metrics, in Prometheus text.
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write;
    let Ok(map) = store().lock() else { return };
    let mut keys: Vec<&SeriesKey> = map.keys().collect();
    keys.sort();
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
    use super::{KeyParts, SeriesKey};
    use std::collections::HashMap;

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
}
