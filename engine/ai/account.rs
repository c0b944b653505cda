//! Settling an AI request: usage (reported or estimated), token
//! reservations reconciled with it, `ai-stats` metrics, and the numbers the
//! access log shows. Settlement runs when the request's context drops, so a
//! client that leaves mid-stream is still charged the estimate for what was
//! streamed.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ringway_filters::{
    coding::Decoder,
    sse::SseParser,
    usage::{estimate_tokens_from_chars, JsonUsageScanner, Usage, UsageSource, UsageTracker},
};

use ringway_filters::price::Price;

use super::series;
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

    /// Makes room for `n` reservations at once. Pushed one by one, the list grew to four
    /// (544 bytes, a 640-byte block) for the two a budgeted route takes, and an open stream
    /// keeps it until it settles.
    pub fn expect_reservations(&mut self, n: usize) {
        self.reservations.reserve_exact(n);
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
            let key = (
                &*self.route,
                self.model.as_deref().unwrap_or("unknown"),
                self.consumer.as_deref().unwrap_or("anonymous"),
            );
            let timing = series::Timing {
                sent_at: self.sent_at,
                first_token: self.first_token,
                done_at: self.done_at,
            };
            series::record(key, self.status, &usage, cost, &timing);
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
