//! Token usage: read it from what the upstream reports, or estimate it when it reports nothing.
//!
//! - [`UsageTracker`] is fed the events of a streamed response ([`crate::sse`]) and understands
//!   OpenAI chat completions chunks, the OpenAI Responses API and Anthropic Messages.
//! - [`is_usage_only_chunk`] recognises the OpenAI chunk that `stream_options.include_usage`
//!   adds, so the engine can remove it when the gateway (not the client) asked for it.
//! - [`JsonUsageScanner`] finds the top-level `usage` (and `model`) of a non-streamed JSON
//!   response of any size without holding the body.
//! - [`RequestEstimator`] reads a request body of any size for an input-token estimate and the
//!   fields token limiting and `include_usage` injection need.
//!
//! `serde_json` only ever parses bounded slices here: one SSE frame's data (at most the SSE
//! parser's `max_frame`) or a captured `usage` object (at most [`MAX_USAGE_BYTES`]).
//!
//! # What the numbers mean
//!
//! Providers disagree on whether cached prompt tokens are part of "input". [`Usage::input`] is
//! always *all* prompt tokens the upstream processed, cache reads and writes included (OpenAI's
//! `prompt_tokens`/`input_tokens` as is; Anthropic's `input_tokens + cache_creation_input_tokens +
//! cache_read_input_tokens`), so `input + output` is comparable across providers. `cache_read` and
//! `cache_write` are the cached subsets, for statistics and pricing.

use serde_json::Value;

use crate::json_scan::{Kind, Scanner, Sink, SmallBuf, MAX_DEPTH};
use crate::model::{ModelScan, ModelScanner};
use crate::sse::SseEvent;

/// Largest top-level `usage` object [`JsonUsageScanner`] captures; real ones are a few hundred
/// bytes, so anything larger is not a usage object worth trusting and is ignored.
pub const MAX_USAGE_BYTES: usize = 4096;

/// Longest top-level `model` captured from a response (longer is ignored).
pub const MAX_MODEL_BYTES: usize = 256;

/// Tokens counted per message for role and framing, on top of its text (OpenAI's published
/// counting recipe uses 3–4 per message).
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 4;

/// Tokens counted for each image part. Its bytes are never counted as text (a 6 MB base64 image
/// is not 1.5M tokens); 765 is what OpenAI bills a 1024×1024 high-detail image, a middle guess.
pub const IMAGE_TOKENS: u64 = 765;

/// Where a [`Usage`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// The upstream reported input and final output counts.
    Reported,
    /// At least one count is an estimate (the upstream sent no usage, or the stream was cut).
    Estimated,
}

/// Token counts for one request. See the module documentation for what `input` includes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    /// All prompt tokens, cached ones included.
    pub input: u64,
    /// Generated tokens.
    pub output: u64,
    /// Prompt tokens served from the provider's cache (a subset of `input`).
    pub cache_read: u64,
    /// Prompt tokens written to the provider's cache (a subset of `input`).
    pub cache_write: u64,
    /// Reported or estimated.
    pub source: UsageSource,
}

/// The fields of a usage object that [`Counts`] reads; any other is read past unparsed.
#[derive(Default)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    /// `prompt_tokens_details.cached_tokens`.
    prompt_tokens_details: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    /// `input_tokens_details.cached_tokens`.
    input_tokens_details: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// The keys [`RawUsage`] reads, in its field order; the details objects' `cached_tokens` last.
const USAGE_KEYS: [&str; 9] = [
    "prompt_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "input_tokens",
    "output_tokens",
    "input_tokens_details",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cached_tokens",
];

impl<'de> serde::Deserialize<'de> for RawUsage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawUsage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<RawUsage, A::Error> {
                // As with `Value::get`, the last of repeated keys wins.
                let mut u = RawUsage::default();
                while let Some(Key(k)) = a.next_key()? {
                    let slot = match k {
                        0 => &mut u.prompt_tokens,
                        1 => &mut u.completion_tokens,
                        2 => &mut u.prompt_tokens_details,
                        3 => &mut u.input_tokens,
                        4 => &mut u.output_tokens,
                        5 => &mut u.input_tokens_details,
                        6 => &mut u.cache_creation_input_tokens,
                        7 => &mut u.cache_read_input_tokens,
                        _ => {
                            a.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = if k == 2 || k == 5 {
                        a.next_value::<Count<true>>()?.0
                    } else {
                        a.next_value::<Count<false>>()?.0
                    };
                }
                Ok(u)
            }
        }
        d.deserialize_map(V)
    }
}

/// A token count: a non-negative integer, or (`DETAILS`) an object's `cached_tokens`; any other
/// value is read past and counts as absent, as `Value::as_u64` and `Value::get` have it.
struct Count<const DETAILS: bool>(Option<u64>);

impl<'de, const DETAILS: bool> serde::Deserialize<'de> for Count<DETAILS> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct V<const DETAILS: bool>;
        impl<'de, const DETAILS: bool> Visitor<'de> for V<DETAILS> {
            type Value = Count<DETAILS>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Count(Some(v).filter(|_| !DETAILS)))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Count(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Count(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Count(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Count(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut cached = None;
                while let Some(Key(k)) = a.next_key()? {
                    if DETAILS && k == USAGE_KEYS.len() - 1 {
                        cached = a.next_value::<Count<false>>()?.0;
                    } else {
                        a.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Count(cached))
            }
        }
        d.deserialize_any(V::<DETAILS>)
    }
}

/// A key, as its index in [`USAGE_KEYS`] (its length: another key), read without allocating
/// whether escaped or not.
struct Key(usize);

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(USAGE_KEYS
                    .iter()
                    .position(|k| *k == v)
                    .unwrap_or(USAGE_KEYS.len())))
            }
        }
        d.deserialize_identifier(V)
    }
}

/// Estimated tokens for `chars` characters of text: `ceil(chars / 4)`.
///
/// Four characters per token is OpenAI's published rule of thumb for English with BPE
/// tokenizers; it overestimates code and underestimates CJK text, which is acceptable for a
/// reservation that is reconciled with the real usage whenever the upstream reports it.
pub fn estimate_tokens_from_chars(chars: u64) -> u64 {
    chars.div_ceil(4)
}

/// Characters in a piece of UTF-8: every byte that is not a continuation byte starts one, so
/// pieces can be counted separately even when a character spans two of them.
fn count_chars(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count() as u64
}

/// Counts found in one usage object; `None` where the object did not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
}

impl Counts {
    /// Normalises any provider's usage object (see the module documentation).
    fn from_usage(u: &Value) -> Option<Counts> {
        let u = u.as_object()?;
        let num = |k: &str| u.get(k).and_then(Value::as_u64);
        let mut c = Counts::default();
        if let Some(p) = num("prompt_tokens") {
            // OpenAI chat: prompt_tokens already includes cached tokens.
            c.input = Some(p);
            c.output = num("completion_tokens");
            c.cache_read = u
                .get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens"))
                .and_then(Value::as_u64);
        } else {
            let openai_cached = u
                .get("input_tokens_details")
                .and_then(|d| d.get("cached_tokens"))
                .and_then(Value::as_u64);
            let cw = num("cache_creation_input_tokens");
            let cr = num("cache_read_input_tokens");
            // Responses API: input_tokens includes cached ones. Anthropic: it excludes them.
            c.input = num("input_tokens").map(|i| i + cw.unwrap_or(0) + cr.unwrap_or(0));
            c.output = num("output_tokens").or_else(|| num("completion_tokens"));
            c.cache_read = openai_cached.or(cr);
            c.cache_write = cw;
        }
        (c != Counts::default()).then_some(c)
    }

    /// [`from_usage`](Self::from_usage) read straight from the usage object's bytes, without a
    /// JSON tree: the same fields, with the same tolerance for values of another type (they
    /// count as absent). `None` where the bytes are not one JSON object.
    fn from_usage_json(bytes: &[u8]) -> Option<Counts> {
        // Checked as UTF-8 once, whole: `from_slice` checks each key it reads again. A value
        // it skips is not checked there, so an object with invalid UTF-8 in a skipped value
        // is now refused (its usage estimated), as the JSON-tree path refuses it.
        let text = std::str::from_utf8(bytes).ok()?;
        Self::from_raw(serde_json::from_str(text).ok()?)
    }

    /// [`from_usage`](Self::from_usage) of a usage object read into a [`RawUsage`].
    fn from_raw(u: RawUsage) -> Option<Counts> {
        let mut c = Counts::default();
        if let Some(p) = u.prompt_tokens {
            c.input = Some(p);
            c.output = u.completion_tokens;
            c.cache_read = u.prompt_tokens_details;
        } else {
            let openai_cached = u.input_tokens_details;
            let cw = u.cache_creation_input_tokens;
            let cr = u.cache_read_input_tokens;
            c.input = u
                .input_tokens
                .map(|i| i + cw.unwrap_or(0) + cr.unwrap_or(0));
            c.output = u.output_tokens.or(u.completion_tokens);
            c.cache_read = openai_cached.or(cr);
            c.cache_write = cw;
        }
        (c != Counts::default()).then_some(c)
    }

    /// Merges a later report. Output: the later count wins (Anthropic sends a provisional count
    /// in `message_start` and the cumulative one in each `message_delta`). Input and cache
    /// counts: the larger wins, as they do not change during a response and some
    /// Anthropic-compatible servers send `"input_tokens": 0` in `message_delta` after the real
    /// count in `message_start`.
    fn merge(&mut self, o: Counts) {
        let larger = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.input = larger(self.input, o.input);
        self.output = o.output.or(self.output);
        self.cache_read = larger(self.cache_read, o.cache_read);
        self.cache_write = larger(self.cache_write, o.cache_write);
    }
}

/// What one event meant, for the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventOutcome {
    /// This event carried the first generated content of the response (time to first token).
    pub first_content: bool,
    /// Characters of generated content in this event.
    pub content_chars: u64,
    /// This event carried usage.
    pub usage: bool,
    /// An OpenAI usage-only chunk (`choices: []` with a usage object): the engine removes this
    /// frame when the gateway injected `include_usage` itself.
    pub usage_only: bool,
    /// Offset in the event's data of a `,"usage":null` (the last one, when `usage_nulls > 1`),
    /// which the engine removes when the client did not ask for usage.
    pub usage_null_at: Option<usize>,
    /// How many `,"usage":null` the data holds, when the fast path read it; `None` when not
    /// known (a full parse, or data that is not JSON): the engine then searches itself.
    pub usage_nulls: Option<u8>,
}

/// Follows one streamed response's events and accumulates usage and generated text length.
#[derive(Debug, Default)]
pub struct UsageTracker {
    counts: Counts,
    /// Final output usage was reported (not Anthropic's provisional `message_start` count).
    final_output: bool,
    content_chars: u64,
    content_seen: bool,
    events: u64,
    unparsable: u64,
    /// Streaming scan of the current oversized event's data (see `on_oversized_data`).
    oversized: Option<Box<JsonUsageScanner>>,
    /// The shape of the last event the fast path read (see [`FrameTemplate`]).
    template: FrameTemplate,
}

/// What [`UsageTracker::template_frames`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateRun {
    /// Bytes of the whole frames it took.
    pub len: usize,
    /// One of them carried the response's first generated content.
    pub first_content: bool,
}

/// The last fast-path event, cut around its one counted string: `prefix` ends with the
/// string's opening quote, `suffix` starts after its closing quote. The events of one stream
/// differ mostly in that string (the id, model and field order repeat), so an event that starts
/// with `prefix` and, after its string, ends with `suffix` has byte for byte the keys the full
/// scan found last time: only its string needs reading. Exact, not a guess — any other change
/// takes the scan.
#[derive(Debug, Default)]
struct FrameTemplate {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    /// Offset in `suffix` of its one `,"usage":null`, if it has one.
    usage_null_in_suffix: Option<usize>,
}

impl UsageTracker {
    /// A tracker for one response.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one event. Events that are not JSON (`[DONE]`, pings) or not understood are
    /// ignored.
    pub fn on_event(&mut self, ev: &SseEvent<'_>) -> EventOutcome {
        self.events += 1;
        let data = ev.data.trim_ascii();
        if !data.starts_with(b"{") {
            return EventOutcome::default();
        }
        let found = match self.templated_event(data) {
            Some(out) => Some(out),
            None => self.fast_event(data),
        };
        if let Some(mut out) = found {
            // Offsets are reported in the event's data as given, not trimmed.
            let lead = ev.data.len() - ev.data.trim_ascii_start().len();
            out.usage_null_at = out.usage_null_at.map(|at| at + lead);
            return out;
        }
        if let Some(out) = self.usage_chunk_event(data, ev.event) {
            return out;
        }
        self.full_event(data, ev.event)
    }

    /// The chunk `stream_options.include_usage` adds (`"choices":[]` and a usage object, once
    /// per stream), read into the few fields [`full_event`](Self::full_event) would take from
    /// it, without a JSON tree. Any other shape, or any doubt, is `None`: the full parse.
    fn usage_chunk_event(&mut self, data: &[u8], event: &[u8]) -> Option<EventOutcome> {
        if event_shape(event) != EventShape::Chat || !has_usage_object(data) {
            return None;
        }
        let chunk: RawChunk = serde_json::from_slice(data).ok()?;
        // A typed event, or choices that may hold content: the full parse counts them.
        if chunk.typed || chunk.choices.is_some_and(|n| n > 0) {
            return None;
        }
        let mut out = EventOutcome::default();
        if let Some(c) = chunk.usage.and_then(Counts::from_raw) {
            self.counts.merge(c);
            self.final_output |= c.output.is_some();
            out.usage = true;
            out.usage_only = chunk.choices == Some(0);
        }
        Some(out)
    }

    /// [`on_event`](Self::on_event) through a JSON tree: every shape, and every usage object.
    fn full_event(&mut self, data: &[u8], event: &[u8]) -> EventOutcome {
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            self.unparsable += 1;
            return EventOutcome::default();
        };
        let mut out = EventOutcome::default();
        let ty = v
            .get("type")
            .and_then(Value::as_str)
            .map(str::as_bytes)
            .unwrap_or(event);
        match event_shape(ty) {
            EventShape::MessageStart => {
                if let Some(c) = v.pointer("/message/usage").and_then(Counts::from_usage) {
                    self.counts.merge(c);
                    out.usage = true;
                }
            }
            EventShape::MessageDelta => {
                if let Some(c) = v.get("usage").and_then(Counts::from_usage) {
                    self.counts.merge(c);
                    self.final_output |= c.output.is_some();
                    out.usage = true;
                }
            }
            EventShape::ContentBlockDelta => {
                if let Some(d) = v.get("delta") {
                    for k in ["text", "thinking", "partial_json"] {
                        out.content_chars += str_chars(d.get(k));
                    }
                }
            }
            EventShape::ResponseDone => {
                if let Some(c) = v.pointer("/response/usage").and_then(Counts::from_usage) {
                    self.counts.merge(c);
                    self.final_output |= c.output.is_some();
                    out.usage = true;
                }
            }
            EventShape::ResponseDelta => {
                // output_text, reasoning summaries, function-call arguments: all generated.
                out.content_chars += str_chars(v.get("delta"));
            }
            EventShape::Chat => self.chat_chunk(&v, &mut out),
        }
        self.content_chars += out.content_chars;
        if out.content_chars > 0 && !self.content_seen {
            self.content_seen = true;
            out.first_content = true;
        }
        out
    }

    /// A piece of the data of an event too large for the SSE parser to hold
    /// ([`crate::sse::SseItem::OversizedData`]). The pieces are scanned as they pass, keeping at
    /// most [`MAX_USAGE_BYTES`] of a `usage` object, so usage in a huge Responses API
    /// `response.completed` (which repeats the whole output) is still found.
    pub fn on_oversized_data(&mut self, piece: &[u8]) {
        self.oversized
            .get_or_insert_with(|| Box::new(JsonUsageScanner::for_event()))
            .feed(piece);
    }

    /// The oversized event whose data came through [`on_oversized_data`](Self::on_oversized_data)
    /// ended (an `End` with `oversized: true`). Its content characters are not counted; its
    /// usage is.
    pub fn on_oversized_end(&mut self) -> EventOutcome {
        let mut out = EventOutcome::default();
        let Some(mut s) = self.oversized.take() else {
            return out;
        };
        s.finish();
        if let Some(c) = s.counts {
            self.counts.merge(c);
            // Anthropic's `message_start` output count is provisional; every other usage is final.
            if s.sink.ty.get() != Some(b"message_start") {
                self.final_output |= c.output.is_some();
            }
            out.usage = true;
        }
        out
    }

    /// The common events without a JSON tree: OpenAI chat chunks with no usage object, Anthropic
    /// `content_block_delta` and Responses API `*.delta` events — nearly every frame of a stream.
    /// One multi-pattern pass finds the keys that matter (see [`FrameKey`]); generated text is
    /// the string values of the content keys for the event's kind, counted in place. Anything
    /// else (a usage object, an unknown shape, text where it is not expected) returns `None` and
    /// takes the full parse, so usage itself is always read by `serde_json`.
    fn fast_event(&mut self, data: &[u8]) -> Option<EventOutcome> {
        let mut out = EventOutcome {
            usage_nulls: Some(0),
            ..Default::default()
        };
        // Backslashes inside the counted strings; any other one (an escape in a key or another
        // value) sends the event to the full parse, so an escaped key can never hide from the
        // search (`"\u0075sage"` is `"usage"`).
        let mut escapes_seen = 0usize;
        // The top-level `type`, when it is the object's first key (Anthropic and the Responses
        // API always put it first); `None`: an OpenAI chat chunk.
        let mut ty: Option<&[u8]> = None;
        let mut is_chunk = false;
        // The counted strings: how many, and where the last one's contents start and end.
        let mut strings = 0u32;
        let mut string_at = (0usize, 0usize);
        for m in frame_keys().find_iter(data) {
            // Patterns leave out the opening quote (see `frame_keys`).
            let start = m.start().checked_sub(1)?;
            if data[start] != b'"' {
                continue;
            }
            if start > 0 && data[start - 1] == b'\\' {
                // An escaped quote inside a string, not a key's opening quote.
                return None;
            }
            let Some(v) = key_value(data, m.end()) else {
                // A string value that happens to equal a key name, not a key.
                continue;
            };
            let key = FrameKey::ALL[m.pattern().as_usize()];
            let first_key = data[1..start].iter().all(u8::is_ascii_whitespace);
            if key == FrameKey::Type && first_key {
                ty = Some(string_value(v)?);
                continue;
            }
            let counted = match (ty, key) {
                (_, FrameKey::Usage) => {
                    if !v.starts_with(b"null") {
                        return None;
                    }
                    if start > 0
                        && data.get(start - 1..start - 1 + USAGE_NULL.len()) == Some(USAGE_NULL)
                    {
                        out.usage_null_at = Some(start - 1);
                        out.usage_nulls = out.usage_nulls.map(|n| n.saturating_add(1));
                    }
                    false
                }
                // Choices in a typed event: an unknown shape.
                (Some(_), FrameKey::Choices) => return None,
                (None, FrameKey::Object) => {
                    is_chunk = v.starts_with(b"\"chat.completion.chunk\"");
                    false
                }
                (None, FrameKey::Content)
                | (None, FrameKey::ReasoningContent)
                | (None, FrameKey::Refusal)
                | (None, FrameKey::Arguments) => true,
                // Other event shapes in a chunk (legacy completions' `text`, a `type` that is
                // not first) take the full parse.
                (None, FrameKey::Type) | (None, FrameKey::Text) => return None,
                (Some(b"content_block_delta"), FrameKey::Text)
                | (Some(b"content_block_delta"), FrameKey::Thinking)
                | (Some(b"content_block_delta"), FrameKey::PartialJson) => true,
                (Some(t), FrameKey::Delta) => is_response_delta(t),
                _ => false,
            };
            if counted && v.first() == Some(&b'"') {
                let body_at = data.len() - v.len() + 1;
                let (chars, len) = json_string(&data[body_at..])?;
                out.content_chars += chars;
                escapes_seen += memchr::memchr_iter(b'\\', &data[body_at..body_at + len]).count();
                strings += 1;
                string_at = (body_at, body_at + len);
            }
        }
        if memchr::memchr_iter(b'\\', data).count() != escapes_seen {
            return None;
        }
        match ty {
            None if !is_chunk => return None,
            // Events whose usage the full parse reads.
            Some(b"message_start" | b"message_delta")
            | Some(b"response.completed" | b"response.incomplete" | b"response.failed") => {
                return None
            }
            _ => {}
        }
        self.remember(data, strings, string_at, &out);
        self.content_chars += out.content_chars;
        if out.content_chars > 0 && !self.content_seen {
            self.content_seen = true;
            out.first_content = true;
        }
        Some(out)
    }

    /// Keeps `data` as the template when it has one counted string and at most one
    /// `,"usage":null`, after that string.
    fn remember(&mut self, data: &[u8], strings: u32, (a, b): (usize, usize), out: &EventOutcome) {
        let t = &mut self.template;
        t.prefix.clear();
        t.suffix.clear();
        let null_after = match (out.usage_nulls, out.usage_null_at) {
            (Some(0), _) => None,
            (Some(1), Some(at)) if at > b => Some(at - (b + 1)),
            _ => return,
        };
        if strings != 1 {
            return;
        }
        t.prefix.extend_from_slice(&data[..a]);
        t.suffix.extend_from_slice(&data[b + 1..]);
        t.usage_null_in_suffix = null_after;
    }

    /// The fast path's answer for an event shaped like the template, reading only its string.
    fn templated_event(&mut self, data: &[u8]) -> Option<EventOutcome> {
        let t = &self.template;
        if t.prefix.is_empty() || !data.starts_with(&t.prefix) {
            return None;
        }
        let body_at = t.prefix.len();
        let (chars, len) = json_string(&data[body_at..])?;
        let end = body_at + len;
        if data[end + 1..] != t.suffix[..] {
            return None;
        }
        let mut out = EventOutcome {
            content_chars: chars,
            usage_nulls: Some(0),
            ..Default::default()
        };
        if let Some(at) = t.usage_null_in_suffix {
            out.usage_null_at = Some(end + 1 + at);
            out.usage_nulls = Some(1);
        }
        self.content_chars += chars;
        if chars > 0 && !self.content_seen {
            self.content_seen = true;
            out.first_content = true;
        }
        Some(out)
    }

    /// Reads whole SSE frames from `input[at..]` for as long as each is exactly `data:` (and
    /// one optional space), an event shaped like the template (see [`FrameTemplate`]), and a
    /// blank line `\n\n` — no longer than `max_frame`. For those frames the SSE parser and
    /// [`on_event`](Self::on_event) would give what this gives, without splitting lines or
    /// comparing again what the template already holds. `usage_null` gets the offset in
    /// `input` of each frame's `,"usage":null` (when the template has one) and the frame's end.
    pub fn template_frames(
        &mut self,
        input: &[u8],
        at: usize,
        max_frame: usize,
        usage_null: &mut impl FnMut(Option<usize>, usize),
    ) -> TemplateRun {
        let t = &self.template;
        let mut run = TemplateRun {
            len: 0,
            first_content: false,
        };
        if t.prefix.is_empty() {
            return run;
        }
        let mut i = at;
        let mut chars_total = 0u64;
        loop {
            let rest = &input[i..];
            let Some(after) = rest.strip_prefix(b"data:") else {
                break;
            };
            let value_at = 5 + usize::from(after.first() == Some(&b' '));
            let value = &rest[value_at..];
            if !value.starts_with(&t.prefix) {
                break;
            }
            let body_at = value_at + t.prefix.len();
            // No control byte in the string, so it cannot run over a line end.
            let Some((chars, len)) = json_string(&rest[body_at..]) else {
                break;
            };
            let suffix_at = body_at + len + 1;
            let end = suffix_at + t.suffix.len() + 2;
            if end > max_frame
                || rest.get(suffix_at..end - 2) != Some(&t.suffix[..])
                || rest.get(end - 2..end) != Some(b"\n\n")
            {
                break;
            }
            usage_null(t.usage_null_in_suffix.map(|n| i + suffix_at + n), i + end);
            chars_total += chars;
            if chars > 0 && !self.content_seen {
                self.content_seen = true;
                run.first_content = true;
            }
            self.events += 1;
            i += end;
        }
        self.content_chars += chars_total;
        run.len = i - at;
        run
    }

    fn chat_chunk(&mut self, v: &Value, out: &mut EventOutcome) {
        let choices = v.get("choices").and_then(Value::as_array);
        for ch in choices.into_iter().flatten() {
            out.content_chars += str_chars(ch.get("text"));
            if let Some(d) = ch.get("delta") {
                for k in ["content", "reasoning_content", "refusal"] {
                    out.content_chars += str_chars(d.get(k));
                }
                // Legacy `function_call` (before tool calls).
                out.content_chars += str_chars(d.pointer("/function_call/arguments"));
                for tc in d
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.content_chars += str_chars(tc.pointer("/function/arguments"));
                }
            }
        }
        // `"usage": null` in ordinary chunks (some servers send it in every one) is no usage.
        if let Some(c) = v.get("usage").and_then(Counts::from_usage) {
            self.counts.merge(c);
            self.final_output |= c.output.is_some();
            out.usage = true;
            out.usage_only = choices.is_some_and(Vec::is_empty);
        }
    }

    /// Characters of generated content seen so far.
    pub fn content_chars(&self) -> u64 {
        self.content_chars
    }

    /// Events whose data looked like JSON but did not parse (for statistics).
    pub fn unparsable_events(&self) -> u64 {
        self.unparsable
    }

    /// The usage to account. Reported when the upstream reported input and final output;
    /// otherwise each missing count is estimated: input from `estimated_input` (the request's
    /// [`RequestEstimator::estimated_input_tokens`]), output from the generated characters (never
    /// less than a provisional reported count).
    pub fn usage(&self, estimated_input: u64) -> Usage {
        let c = self.counts;
        let reported = self.final_output && c.input.is_some();
        let output = if self.final_output {
            c.output.unwrap_or(0)
        } else {
            c.output
                .unwrap_or(0)
                .max(estimate_tokens_from_chars(self.content_chars))
        };
        Usage {
            input: c.input.unwrap_or(estimated_input),
            output,
            cache_read: c.cache_read.unwrap_or(0),
            cache_write: c.cache_write.unwrap_or(0),
            source: if reported {
                UsageSource::Reported
            } else {
                UsageSource::Estimated
            },
        }
    }
}

/// What an OpenAI-compatible upstream adds to every chunk once asked for usage.
const USAGE_NULL: &[u8] = b",\"usage\":null";

/// Keys [`UsageTracker::fast_event`] looks for, in the order of [`FrameKey::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameKey {
    Usage,
    Content,
    ReasoningContent,
    Refusal,
    Arguments,
    Text,
    Thinking,
    PartialJson,
    Delta,
    Type,
    Object,
    Choices,
}

impl FrameKey {
    const ALL: [FrameKey; 12] = [
        FrameKey::Usage,
        FrameKey::Content,
        FrameKey::ReasoningContent,
        FrameKey::Refusal,
        FrameKey::Arguments,
        FrameKey::Text,
        FrameKey::Thinking,
        FrameKey::PartialJson,
        FrameKey::Delta,
        FrameKey::Type,
        FrameKey::Object,
        FrameKey::Choices,
    ];

    /// The key with its quotes. In valid JSON a quote inside a string is escaped, so a quoted
    /// name followed by a colon is always a key (never text inside a value), and one pass finds
    /// every key that matters at any depth.
    fn quoted(self) -> &'static [u8] {
        match self {
            FrameKey::Usage => b"\"usage\"",
            FrameKey::Content => b"\"content\"",
            FrameKey::ReasoningContent => b"\"reasoning_content\"",
            FrameKey::Refusal => b"\"refusal\"",
            FrameKey::Arguments => b"\"arguments\"",
            FrameKey::Text => b"\"text\"",
            FrameKey::Thinking => b"\"thinking\"",
            FrameKey::PartialJson => b"\"partial_json\"",
            FrameKey::Delta => b"\"delta\"",
            FrameKey::Type => b"\"type\"",
            FrameKey::Object => b"\"object\"",
            FrameKey::Choices => b"\"choices\"",
        }
    }
}

/// The multi-pattern SIMD ("Teddy") searcher for [`FrameKey`]s, built once.
fn frame_keys() -> &'static aho_corasick::packed::Searcher {
    static KEYS: std::sync::OnceLock<aho_corasick::packed::Searcher> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let mut b = aho_corasick::packed::Config::new()
            .match_kind(aho_corasick::packed::MatchKind::LeftmostFirst)
            .builder();
        // Without the opening quote: a first byte shared by every pattern would leave the
        // SIMD fingerprints nothing to tell them apart by. The caller checks the quote.
        for k in FrameKey::ALL {
            b.add(&k.quoted()[1..]);
        }
        b.build()
            .unwrap_or_else(|| unreachable!("fixed key patterns fit the packed searcher"))
    })
}

/// The value after a key that ends at `at` (`"name"` then optional spaces, a colon, spaces);
/// `None` when no colon follows (the quoted name was a value, not a key).
fn key_value(data: &[u8], at: usize) -> Option<&[u8]> {
    let rest = data.get(at..)?.trim_ascii_start();
    Some(rest.strip_prefix(b":")?.trim_ascii_start())
}

/// The contents of a string value without escapes (event types never have any).
fn string_value(v: &[u8]) -> Option<&[u8]> {
    let body = v.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', body)?;
    (body[end] == b'"').then(|| &body[..end])
}

/// A Responses API event carrying generated text in its `delta` (output text, reasoning
/// summaries, function-call arguments).
fn is_response_delta(t: &[u8]) -> bool {
    t.starts_with(b"response.") && t.ends_with(b".delta")
}

/// How [`UsageTracker::full_event`] reads an event, by its `type` (or, without one, its SSE
/// event name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventShape {
    /// Anthropic `message_start`: usage at `message.usage`.
    MessageStart,
    /// Anthropic `message_delta`: usage at `usage`.
    MessageDelta,
    /// Anthropic `content_block_delta`: generated text in `delta`.
    ContentBlockDelta,
    /// Responses API `response.completed|incomplete|failed`: usage at `response.usage`.
    ResponseDone,
    /// Responses API `response.*.delta`: generated text in `delta`.
    ResponseDelta,
    /// Anything else: an OpenAI chat (or legacy completions) chunk.
    Chat,
}

fn event_shape(ty: &[u8]) -> EventShape {
    match ty {
        b"message_start" => EventShape::MessageStart,
        b"message_delta" => EventShape::MessageDelta,
        b"content_block_delta" => EventShape::ContentBlockDelta,
        b"response.completed" | b"response.incomplete" | b"response.failed" => {
            EventShape::ResponseDone
        }
        t if is_response_delta(t) => EventShape::ResponseDelta,
        _ => EventShape::Chat,
    }
}

/// True when some `"usage"` in `data` is followed by `:` and an object (at any depth: the
/// parse decides what it is).
fn has_usage_object(data: &[u8]) -> bool {
    static USAGE: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    let usage = USAGE.get_or_init(|| memchr::memmem::Finder::new(b"\"usage\""));
    usage.find_iter(data).any(|at| {
        let rest = data[at + 7..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(b"{"))
    })
}

/// The top level of a chat chunk, as [`UsageTracker::usage_chunk_event`] reads it.
#[derive(Default)]
struct RawChunk {
    /// A `type` member: not a chat chunk.
    typed: bool,
    /// `choices`: how many it holds (counted up to one); `None` when absent.
    choices: Option<usize>,
    /// `usage`, when an object.
    usage: Option<RawUsage>,
}

impl<'de> serde::Deserialize<'de> for RawChunk {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawChunk;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chat chunk")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<RawChunk, A::Error> {
                // As with `Value::get`, the last of repeated keys wins.
                let mut c = RawChunk::default();
                while let Some(k) = a.next_key::<ChunkKey>()? {
                    match k {
                        ChunkKey::Type => {
                            c.typed = true;
                            a.next_value::<IgnoredAny>()?;
                        }
                        ChunkKey::Choices => c.choices = Some(a.next_value::<SeqLen>()?.0),
                        // Not an object: the full parse reads no usage from it either, and
                        // this one cannot tell, so it gives up.
                        ChunkKey::Usage => c.usage = Some(a.next_value::<RawUsage>()?),
                        ChunkKey::Other => {
                            a.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_map(V)
    }
}

/// A top-level key of a chat chunk that [`RawChunk`] tells apart.
enum ChunkKey {
    Type,
    Choices,
    Usage,
    Other,
}

impl<'de> serde::Deserialize<'de> for ChunkKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ChunkKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<ChunkKey, E> {
                Ok(match v {
                    "type" => ChunkKey::Type,
                    "choices" => ChunkKey::Choices,
                    "usage" => ChunkKey::Usage,
                    _ => ChunkKey::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// An array's length, counted up to one (the rest is read past). Any other value is an error:
/// the chunk then takes the full parse.
struct SeqLen(usize);

impl<'de> serde::Deserialize<'de> for SeqLen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SeqLen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<SeqLen, A::Error> {
                let mut n = 0;
                while a.next_element::<IgnoredAny>()?.is_some() {
                    n = 1;
                }
                Ok(SeqLen(n))
            }
        }
        d.deserialize_seq(V)
    }
}

/// Characters of a JSON string whose opening quote was just passed, up to
/// its closing quote, as `str::chars` counts the decoded text (an escape is
/// one character, a `\uD83D\uDE00` surrogate pair too), and the offset of
/// its closing quote. `None` if the string does not end in `body`.
#[inline]
fn json_string(body: &[u8]) -> Option<(u64, usize)> {
    let mut n = 0u64;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => return Some((n, i)),
            b'\\' => {
                if body.get(i + 1) == Some(&b'u') {
                    // A high surrogate and the low one after it are one character.
                    let high = body
                        .get(i + 2..i + 6)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u16::from_str_radix(h, 16).ok())
                        .is_some_and(|v| (0xD800..0xDC00).contains(&v));
                    if !high {
                        n += 1;
                    }
                    i += 6;
                } else {
                    n += 1;
                    i += 2;
                }
                continue;
            }
            // Not valid in a JSON string (the full parse rejects it too).
            b if b < 0x20 => return None,
            // Count UTF-8 lead bytes only: one per character.
            b if b & 0xC0 != 0x80 => n += 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn str_chars(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_str)
        .map_or(0, |s| s.chars().count() as u64)
}

/// True for an OpenAI chat chunk whose `usage` is a non-null object and whose `choices` is an
/// empty array: the chunk `stream_options.include_usage` adds. `data` is one SSE event's data
/// (bounded by the SSE parser).
pub fn is_usage_only_chunk(data: &[u8]) -> bool {
    // Cheap rejection first: almost every chunk is content.
    if memchr::memmem::find(data, b"\"usage\"").is_none() {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    v.get("usage").is_some_and(Value::is_object)
        && v.get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
}

/// Where the top-level `usage` member of one event's data is, as the range to remove so the
/// object stays valid JSON without it: the member with the comma before it, or (when it is the
/// first member) with the comma and blanks after it. `None` when the data is not a JSON object
/// with a `usage` member.
///
/// Gemini-compatible servers asked for `include_usage` put the usage on the last content chunk
/// (non-empty `choices`); when the gateway asked, the engine removes the member and keeps the
/// chunk. Only frames that carry usage are scanned (once or twice per stream), and `data` is
/// bounded by the SSE parser.
pub fn usage_member(data: &[u8]) -> Option<std::ops::Range<usize>> {
    #[derive(Default)]
    struct Find {
        key: SmallBuf<8>,
        is_usage: bool,
        object: bool,
        /// Where the previous member's value ended (or just past the object's `{`).
        prev_end: u64,
        /// No member came before the current one.
        first: bool,
        /// The usage member: from the previous member's end to its value's end, and whether
        /// it was the first member.
        found: Option<(u64, u64, bool)>,
    }
    impl Sink for Find {
        fn key_start(&mut self, depth: usize) {
            if depth == 1 {
                self.key.clear();
            }
        }
        fn string_bytes(&mut self, key: bool, bytes: &[u8]) {
            if key {
                self.key.push(bytes);
            }
        }
        fn key_end(&mut self, depth: usize) {
            if depth == 1 {
                self.is_usage = self.key.get() == Some(b"usage");
            }
        }
        fn value_start(&mut self, kind: Kind, depth: usize, at: u64) {
            if depth == 0 {
                self.object = kind == Kind::Object;
                self.prev_end = at + 1;
                self.first = true;
            }
        }
        fn value_end(&mut self, _kind: Kind, depth: usize, end: u64) {
            if depth != 1 {
                return;
            }
            if self.is_usage && self.found.is_none() {
                self.found = Some((self.prev_end, end, self.first));
            }
            self.is_usage = false;
            self.prev_end = end;
            self.first = false;
        }
    }
    let mut f = Find::default();
    let mut scan = Scanner::new();
    scan.feed(data, &mut f).ok()?;
    scan.finish(&mut f).ok()?;
    let (from, to, first) = f.found?;
    if !f.object {
        return None;
    }
    // Both offsets lie within `data`.
    let (from, mut to) = (from as usize, to as usize);
    if !first {
        // `,"usage":{…}` from the end of the member before it.
        return Some(from..to);
    }
    // The first member: from after `{` through the comma that follows, and the blanks after it.
    let rest = &data[to..];
    let skip = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
    if rest.get(skip) == Some(&b',') {
        to += skip + 1;
        to += data[to..]
            .iter()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
    }
    Some(from..to)
}

/// Top-level keys of a response body that [`JsonUsageScanner`] wants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum RespKey {
    #[default]
    Other,
    Usage,
    Model,
    Type,
    /// `response` or `message`: an SSE event's envelope holding `usage` one level down.
    Envelope,
}

#[derive(Debug, Default)]
struct RespSink {
    /// Also look for `response.usage` / `message.usage` (an SSE event's data, not a body).
    nested: bool,
    key: SmallBuf<24>,
    cur: RespKey,
    /// The current depth-2 key is `usage`.
    key2_usage: bool,
    /// Absolute offsets of the `usage` object being captured (end once seen), and its depth.
    usage_start: Option<u64>,
    usage_end: Option<u64>,
    usage_depth: usize,
    in_model: bool,
    model: SmallBuf<MAX_MODEL_BYTES>,
    model_done: bool,
    in_type: bool,
    ty: SmallBuf<64>,
}

impl Sink for RespSink {
    fn key_start(&mut self, depth: usize) {
        if depth <= 2 {
            self.key.clear();
        }
    }
    fn string_bytes(&mut self, key: bool, bytes: &[u8]) {
        if key {
            self.key.push(bytes);
        } else if self.in_model {
            self.model.push(bytes);
        } else if self.in_type {
            self.ty.push(bytes);
        }
    }
    fn key_end(&mut self, depth: usize) {
        if depth == 1 {
            self.cur = match self.key.get() {
                Some(b"usage") => RespKey::Usage,
                Some(b"model") => RespKey::Model,
                Some(b"type") => RespKey::Type,
                Some(b"response" | b"message") if self.nested => RespKey::Envelope,
                _ => RespKey::Other,
            };
        } else if depth == 2 {
            self.key2_usage = self.key.get() == Some(b"usage");
        }
    }
    fn value_start(&mut self, kind: Kind, depth: usize, at: u64) {
        let usage_here = match depth {
            1 => self.cur == RespKey::Usage,
            2 => self.cur == RespKey::Envelope && self.key2_usage,
            _ => false,
        };
        // The first usage object wins; `"usage": null` is skipped.
        if usage_here && kind == Kind::Object && self.usage_start.is_none() {
            self.usage_start = Some(at);
            self.usage_depth = depth;
        }
        if depth == 1 && kind == Kind::String {
            if self.cur == RespKey::Model && !self.model_done {
                self.model.clear();
                self.in_model = true;
            } else if self.cur == RespKey::Type {
                self.ty.clear();
                self.in_type = true;
            }
        }
    }
    fn skips(&mut self, depth: usize) -> bool {
        // Only the top level (and an SSE event's envelope) holds what is wanted; the usage
        // object's place is all the capture needs, and serde_json reads (and checks) it whole.
        depth >= 2 || (depth == 1 && !(self.nested && self.cur == RespKey::Envelope))
    }
    fn value_end(&mut self, _kind: Kind, depth: usize, end: u64) {
        if self.usage_start.is_some() && self.usage_end.is_none() && depth == self.usage_depth {
            self.usage_end = Some(end);
        }
        if depth == 1 {
            if self.in_model {
                self.in_model = false;
                self.model_done = true;
            }
            self.in_type = false;
        }
    }
}

/// Streaming scan of a non-streamed JSON response (any size) for its top-level `usage` and
/// `model`. Only the `usage` object's bytes are kept (at most [`MAX_USAGE_BYTES`]) and parsed.
#[derive(Debug, Default)]
pub struct JsonUsageScanner {
    scan: Scanner,
    sink: RespSink,
    /// Raw bytes of the `usage` object, copied as they pass.
    captured: Vec<u8>,
    too_big: bool,
    counts: Option<Counts>,
    invalid: bool,
}

impl JsonUsageScanner {
    /// A scanner at the start of a response body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next slice of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.invalid {
            return;
        }
        let base = self.scan.offset();
        if self.scan.feed(chunk, &mut self.sink).is_err() {
            self.invalid = true;
        }
        self.capture(base, chunk);
    }

    /// Copies the part of `chunk` (which starts at absolute offset `base`) inside the usage
    /// object. Offsets come from the tokenizer, so no byte is looked at twice.
    fn capture(&mut self, base: u64, chunk: &[u8]) {
        let Some(start) = self.sink.usage_start else {
            return;
        };
        if self.counts.is_some() || self.too_big {
            return;
        }
        let end_abs = base + chunk.len() as u64;
        let from = start.max(base);
        let to = self.sink.usage_end.unwrap_or(end_abs).min(end_abs);
        if from < to {
            // Both lie within `chunk`, so the differences fit in usize.
            let piece = &chunk[(from - base) as usize..(to - base) as usize];
            if self.captured.is_empty()
                && from == start
                && self.sink.usage_end == Some(to)
                && piece.len() <= MAX_USAGE_BYTES
            {
                // The whole object is in this chunk: read in place, nothing copied.
                self.counts = Counts::from_usage_json(piece);
                return;
            }
            if self.captured.len() + piece.len() > MAX_USAGE_BYTES {
                self.too_big = true;
                self.captured = Vec::new();
                return;
            }
            self.captured.extend_from_slice(piece);
        }
        if self.sink.usage_end.is_some() {
            self.counts = Counts::from_usage_json(&self.captured);
            self.captured = Vec::new();
        }
    }

    /// Marks the end of the body.
    pub fn finish(&mut self) {
        if !self.invalid && self.scan.finish(&mut self.sink).is_err() {
            self.invalid = true;
        }
    }

    /// A scanner for one SSE event's data too large for the SSE parser to hold: it also finds
    /// `response.usage` and `message.usage`, and the top-level `type`.
    fn for_event() -> Self {
        let mut s = Self::default();
        s.sink.nested = true;
        s
    }

    /// The reported usage, once the whole `usage` object has passed. Counts it lacks are 0.
    pub fn usage(&self) -> Option<Usage> {
        self.counts.map(|c| Usage {
            input: c.input.unwrap_or(0),
            output: c.output.unwrap_or(0),
            cache_read: c.cache_read.unwrap_or(0),
            cache_write: c.cache_write.unwrap_or(0),
            source: UsageSource::Reported,
        })
    }

    /// The top-level `model` string, once complete (None if absent or longer than
    /// [`MAX_MODEL_BYTES`]).
    pub fn model(&self) -> Option<&str> {
        if !self.sink.model_done {
            return None;
        }
        self.sink
            .model
            .get()
            .and_then(|m| std::str::from_utf8(m).ok())
    }

    /// The body is not valid JSON where it was read: its top level (and an SSE event's
    /// envelope); values below are skipped, not checked. A `usage` that passed before the error
    /// is still reported.
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }
}

/// Request keys the estimator distinguishes; one byte each in a per-depth table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ReqKey {
    #[default]
    Other,
    /// `messages`, `input`, `prompt`, `system`, `instructions` at the top level: the prompt.
    Messages,
    PromptText,
    /// Keys whose string value is prompt text inside the prompt: `content`, `text`, `input`,
    /// `arguments`, `output`.
    TextField,
    /// `type`: its value tells an image part.
    Type,
    MaxTokens,
    Stream,
    StreamOptions,
    IncludeUsage,
}

fn classify(key: Option<&[u8]>, depth: usize) -> ReqKey {
    let Some(k) = key else {
        return ReqKey::Other;
    };
    if depth == 1 {
        return match k {
            b"messages" => ReqKey::Messages,
            b"input" | b"prompt" | b"system" | b"instructions" => ReqKey::PromptText,
            b"max_tokens" | b"max_completion_tokens" | b"max_output_tokens" => ReqKey::MaxTokens,
            b"stream" => ReqKey::Stream,
            b"stream_options" => ReqKey::StreamOptions,
            _ => ReqKey::Other,
        };
    }
    match k {
        b"content" | b"text" | b"input" | b"arguments" | b"output" => ReqKey::TextField,
        b"type" => ReqKey::Type,
        b"include_usage" if depth == 2 => ReqKey::IncludeUsage,
        _ => ReqKey::Other,
    }
}

#[derive(Debug)]
struct ReqSink {
    key: SmallBuf<24>,
    /// `keys[d]`: the key of the member being read at depth `d`.
    keys: [ReqKey; MAX_DEPTH + 1],
    /// `in_array[d]`: the value at depth `d` is an array element.
    in_array: [bool; MAX_DEPTH + 1],
    /// The current string value counts as prompt text.
    counting: bool,
    /// Inside a `"type"` string value: its bytes go to `type_buf`.
    in_type: bool,
    type_buf: SmallBuf<16>,
    scalar: SmallBuf<24>,
    chars: u64,
    messages: u64,
    images: u64,
    max_tokens: Option<u64>,
    stream: Option<bool>,
    /// The top-level `stream_options` value's range (the last one, as JSON parsers keep the
    /// last of duplicate keys), its end once complete.
    stream_options: Option<(u64, Option<u64>)>,
    /// That value is an object.
    so_object: bool,
    /// Members of that object.
    so_members: u32,
    /// `stream_options.include_usage`, if its (last) value is a boolean.
    include_usage: Option<bool>,
    /// The range of that (last) value, whatever it is.
    include_usage_at: Option<(u64, Option<u64>)>,
    top_is_object: bool,
    top_level_end: Option<u64>,
}

impl Default for ReqSink {
    fn default() -> Self {
        Self {
            key: SmallBuf::default(),
            keys: [ReqKey::Other; MAX_DEPTH + 1],
            in_array: [false; MAX_DEPTH + 1],
            counting: false,
            in_type: false,
            type_buf: SmallBuf::default(),
            scalar: SmallBuf::default(),
            chars: 0,
            messages: 0,
            images: 0,
            max_tokens: None,
            stream: None,
            stream_options: None,
            so_object: false,
            so_members: 0,
            include_usage: None,
            include_usage_at: None,
            top_is_object: false,
            top_level_end: None,
        }
    }
}

impl ReqSink {
    /// Is a string value at `depth` prompt text? Within a top-level prompt key: the value itself
    /// (`"prompt": "…"`), a direct element of it (`"input": ["…", "…"]`), or any string under a
    /// text-carrying key (`content`, `text`, …). Never `url`, `data`, `image_url`, `file_data`:
    /// that is where base64 lives.
    fn counts_text(&self, depth: usize) -> bool {
        if depth == 0 || !matches!(self.keys[1], ReqKey::Messages | ReqKey::PromptText) {
            return false;
        }
        depth == 1
            || (depth == 2 && self.in_array[2])
            || (!self.in_array[depth] && self.keys[depth] == ReqKey::TextField)
    }
}

impl Sink for ReqSink {
    fn key_start(&mut self, _depth: usize) {
        self.key.clear();
    }
    fn key_end(&mut self, depth: usize) {
        if depth <= MAX_DEPTH {
            self.keys[depth] = classify(self.key.get(), depth);
        }
        // Keys at depth 2 under `stream_options` exist only when its value is an object.
        if depth == 2 && self.keys[1] == ReqKey::StreamOptions {
            self.so_members += 1;
        }
    }
    fn string_bytes(&mut self, key: bool, bytes: &[u8]) {
        if key {
            self.key.push(bytes);
        } else if self.counting {
            self.chars += count_chars(bytes);
        } else if self.in_type {
            self.type_buf.push(bytes);
        }
    }
    fn scalar_bytes(&mut self, bytes: &[u8]) {
        self.scalar.push(bytes);
    }
    fn value_start(&mut self, kind: Kind, depth: usize, at: u64) {
        let key = if self.in_array[depth] {
            ReqKey::Other
        } else {
            self.keys[depth]
        };
        match kind {
            Kind::Object | Kind::Array => {
                if depth == 0 {
                    self.top_is_object = kind == Kind::Object;
                }
                if depth < MAX_DEPTH {
                    self.in_array[depth + 1] = kind == Kind::Array;
                    self.keys[depth + 1] = ReqKey::Other;
                }
                if depth == 2 && self.in_array[2] && self.keys[1] == ReqKey::Messages {
                    self.messages += 1;
                }
            }
            Kind::String => {
                self.counting = self.counts_text(depth);
                self.in_type = !self.counting && key == ReqKey::Type;
                self.type_buf.clear();
            }
            _ => self.scalar.clear(),
        }
        if depth == 1 && key == ReqKey::StreamOptions {
            self.stream_options = Some((at, None));
            self.so_object = kind == Kind::Object;
            self.so_members = 0;
            self.include_usage = None;
            self.include_usage_at = None;
        }
        if depth == 2 && self.keys[1] == ReqKey::StreamOptions && key == ReqKey::IncludeUsage {
            self.include_usage_at = Some((at, None));
        }
    }
    fn value_end(&mut self, kind: Kind, depth: usize, end: u64) {
        let key = if self.in_array[depth] {
            ReqKey::Other
        } else {
            self.keys[depth]
        };
        match kind {
            Kind::String => {
                if self.in_type
                    && matches!(
                        self.type_buf.get(),
                        Some(b"image_url" | b"image" | b"input_image")
                    )
                    && matches!(self.keys[1], ReqKey::Messages | ReqKey::PromptText)
                {
                    self.images += 1;
                }
                self.counting = false;
                self.in_type = false;
            }
            Kind::Number if depth == 1 && key == ReqKey::MaxTokens => {
                self.max_tokens = self
                    .scalar
                    .get()
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse().ok());
            }
            Kind::True | Kind::False if depth == 1 && key == ReqKey::Stream => {
                self.stream = Some(kind == Kind::True);
            }
            Kind::Object if depth == 0 => self.top_level_end = Some(end - 1),
            _ => {}
        }
        if depth == 1 && key == ReqKey::StreamOptions {
            if let Some((s, None)) = self.stream_options {
                self.stream_options = Some((s, Some(end)));
            }
        }
        if depth == 2 && self.keys[1] == ReqKey::StreamOptions && key == ReqKey::IncludeUsage {
            self.include_usage = match kind {
                Kind::True => Some(true),
                Kind::False => Some(false),
                _ => None,
            };
            if let Some((s, None)) = self.include_usage_at {
                self.include_usage_at = Some((s, Some(end)));
            }
        }
    }
}

/// The edit of a request body that makes the upstream report usage in a stream: replace
/// `range` with `bytes` (an empty range inserts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    /// Absolute body range to replace.
    pub range: std::ops::Range<u64>,
    /// What goes there instead.
    pub bytes: &'static [u8],
}

/// The `stream_options` member of a request, if present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Absolute byte range of its value (`{…}` or whatever the client sent).
    pub range: std::ops::Range<u64>,
    /// `stream_options.include_usage`, if the client set it to a boolean.
    pub include_usage: Option<bool>,
}

/// Streaming scan of a request body (any size) for an input-token estimate and the fields
/// token limiting needs.
///
/// Estimation method: characters of prompt text (see [`estimate_tokens_from_chars`]) counted
/// in the string values of the top-level `messages`, `input`, `prompt`, `system` and
/// `instructions` — the values themselves, their direct array elements, and strings under
/// `content`/`text`/`input`/`arguments`/`output` keys inside them — plus
/// [`MESSAGE_OVERHEAD_TOKENS`] per message and [`IMAGE_TOKENS`] per image part. Base64 payloads
/// live under `url`/`image_url`/`data`/`file_data` and are never counted.
#[derive(Debug, Default)]
pub struct RequestEstimator {
    scan: Scanner,
    sink: Box<ReqSink>,
    invalid: bool,
}

impl RequestEstimator {
    /// An estimator at the start of a request body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next slice of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.invalid && self.scan.feed(chunk, &mut *self.sink).is_err() {
            self.invalid = true;
        }
    }

    /// Marks the end of the body.
    pub fn finish(&mut self) {
        if !self.invalid && self.scan.finish(&mut *self.sink).is_err() {
            self.invalid = true;
        }
    }

    /// Reads a whole body (then [`finish`](Self::finish) is done) and finds its model in the
    /// same tokenizer pass. The model is what a fresh `model` scanner's [`ModelScanner::feed`]
    /// of the body answers, or its [`ModelScanner::finish`] when that was `NeedMore`: a body
    /// whose model was found reads as such even if its JSON is then cut short.
    pub fn feed_whole_with_model(&mut self, body: &[u8], model: &mut ModelScanner) -> ModelScan {
        if self.invalid {
            return model.state(true);
        }
        let mut both = (&mut *self.sink, &mut model.sink);
        if let Err(e) = self.scan.feed(body, &mut both) {
            self.invalid = true;
            model.error = Some(e);
            return model.state(true);
        }
        // What `ModelScanner::feed` would answer now is not `NeedMore`.
        let decided = both.1.problem.is_some() || both.1.found.is_some() || self.scan.is_done();
        if let Err(e) = self.scan.finish(&mut both) {
            self.invalid = true;
            if !decided {
                model.error = Some(e);
            }
        }
        model.state(true)
    }

    /// The body is not valid JSON (estimates then cover only what came before the error).
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }

    /// Characters of prompt text counted so far.
    pub fn prompt_chars(&self) -> u64 {
        self.sink.chars
    }

    /// Estimated input tokens (see the type documentation for the method).
    pub fn estimated_input_tokens(&self) -> u64 {
        estimate_tokens_from_chars(self.sink.chars)
            + self.sink.messages * MESSAGE_OVERHEAD_TOKENS
            + self.sink.images * IMAGE_TOKENS
    }

    /// `max_tokens`, `max_completion_tokens` or `max_output_tokens` at the top level (the last
    /// one present), when a non-negative integer.
    pub fn max_tokens(&self) -> Option<u64> {
        self.sink.max_tokens
    }

    /// Top-level `stream`, when a boolean.
    pub fn stream(&self) -> Option<bool> {
        self.sink.stream
    }

    /// Top-level `stream_options`, once its value is complete.
    pub fn stream_options(&self) -> Option<StreamOptions> {
        match self.sink.stream_options {
            Some((s, Some(e))) => Some(StreamOptions {
                range: s..e,
                include_usage: self.sink.include_usage,
            }),
            _ => None,
        }
    }

    /// Absolute offset of the top-level object's closing `}`, once seen.
    pub fn top_level_end(&self) -> Option<u64> {
        self.sink.top_level_end
    }

    /// The edit that makes the upstream add a usage chunk to the stream, so usage is always
    /// reported: only once the top-level value is a complete, valid object with `"stream": true`
    /// whose `stream_options.include_usage` is not already `true`. A client's `stream_options`
    /// cannot switch accounting off:
    ///
    /// - absent: `,"stream_options":{"include_usage":true}` before the closing `}`;
    /// - not an object (`null`, `false`, …): replaced by `{"include_usage":true}`;
    /// - an object with `include_usage` (`false`, `null`, …): that value becomes `true`;
    /// - an object without it: `"include_usage":true` is its first member, the others kept.
    ///
    /// `None` when the client asked for usage itself: then it also gets the usage chunk. Some
    /// edit means the client did not ask, and the engine removes the usage it was not shown
    /// directly.
    ///
    /// It becomes `Some` during the [`feed`](Self::feed) of the slice holding the closing `}`
    /// (the body's last non-whitespace byte); [`finish`](Self::finish) is not required.
    pub fn include_usage_injection(&self) -> Option<Injection> {
        let s = &self.sink;
        if self.invalid || !s.top_is_object || s.stream != Some(true) {
            return None;
        }
        let end = s.top_level_end?;
        let Some((start, so_end)) = s.stream_options else {
            // `"stream": true` is a member, so the object is never empty: a comma always leads.
            return Some(Injection {
                range: end..end,
                bytes: br#","stream_options":{"include_usage":true}"#,
            });
        };
        let so_end = so_end?;
        if s.include_usage == Some(true) {
            return None;
        }
        let (range, bytes): (_, &'static [u8]) = if !s.so_object {
            (start..so_end, br#"{"include_usage":true}"#)
        } else if let Some((a, Some(b))) = s.include_usage_at {
            (a..b, b"true")
        } else if s.so_members == 0 {
            (start + 1..start + 1, br#""include_usage":true"#)
        } else {
            (start + 1..start + 1, br#""include_usage":true,"#)
        };
        Some(Injection { range, bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::fixtures::*;
    use crate::sse::{SseItem, SseParser};

    /// Final usage, total content chars, index of the first-content event, indices of the
    /// usage-only events.
    type Outcome = (Usage, u64, Option<usize>, Vec<usize>);

    fn track(stream: &[u8], cuts: &[usize]) -> Outcome {
        track_max(stream, cuts, 8192)
    }

    /// Drives parser and tracker the way the engine does.
    fn track_max(stream: &[u8], cuts: &[usize], max: usize) -> Outcome {
        let mut p = SseParser::new(max);
        let mut t = UsageTracker::new();
        let (mut n, mut first, mut only) = (0, None, Vec::new());
        let mut on = |t: &mut UsageTracker, e: SseEvent<'_>| {
            let o = t.on_event(&e);
            assert_eq!(o.usage_only, is_usage_only_chunk(e.data));
            if o.first_content {
                assert!(first.is_none());
                first = Some(n);
            }
            if o.usage_only {
                only.push(n);
            }
            n += 1;
        };
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
            p.feed_items(&stream[prev..c], &mut |item| match item {
                SseItem::OversizedData(d) => t.on_oversized_data(d),
                SseItem::End(f) => match f.event {
                    Some(e) => on(&mut t, e),
                    None if f.oversized => {
                        t.on_oversized_end();
                    }
                    None => {}
                },
            });
            prev = c;
        }
        p.finish(&mut |e| on(&mut t, e));
        (t.usage(1000), t.content_chars(), first, only)
    }

    #[test]
    fn usage_is_found_even_when_its_frame_exceeds_max_frame() {
        for s in ALL {
            let want = track(s.as_bytes(), &[]).0;
            for max in [1, 40, 100, 200] {
                let (got, ..) = track_max(s.as_bytes(), &[], max);
                assert_eq!(got.source, want.source);
                assert_eq!(
                    (got.input, got.cache_read, got.cache_write),
                    (want.input, want.cache_read, want.cache_write)
                );
                if want.source == UsageSource::Reported {
                    assert_eq!(got.output, want.output, "max {max}");
                }
                let bytes: Vec<usize> = (1..s.len()).collect();
                assert_eq!(track_max(s.as_bytes(), &bytes, max).0, got);
            }
        }
    }

    #[test]
    fn huge_response_completed_frame_still_reports_usage() {
        let text = "lorem ipsum ".repeat(20_000);
        let stream = format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"content\":[{{\"text\":\"{text}\"}}]}}],\"usage\":{{\"input_tokens\":10,\"output_tokens\":60000}}}}}}\n\n"
        );
        let (u, chars, ..) = track_max(stream.as_bytes(), &[1000, 70_000, 150_001], 16 * 1024);
        assert_eq!(u, reported(10, 60_000, 0, 0));
        assert_eq!(chars, 2);
    }

    fn shotgun(stream: &str) -> Outcome {
        let s = stream.as_bytes();
        let whole = track(s, &[]);
        for k in 0..=s.len() {
            assert_eq!(track(s, &[k]), whole, "split at {k}");
        }
        let bytes: Vec<usize> = (1..s.len()).collect();
        assert_eq!(track(s, &bytes), whole, "byte at a time");
        whole
    }

    fn reported(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Usage {
        Usage {
            input,
            output,
            cache_read,
            cache_write,
            source: UsageSource::Reported,
        }
    }

    #[test]
    fn openai_include_usage_stream() {
        let (u, chars, first, only) = shotgun(OPENAI_INCLUDE_USAGE);
        assert_eq!(u, reported(19, 3, 4, 0));
        assert_eq!((chars, first, only), (11, Some(1), vec![4]));
    }

    #[test]
    fn openai_usage_null_in_every_chunk() {
        let (u, chars, first, only) = shotgun(OPENAI_USAGE_NULL);
        assert_eq!(u, reported(7, 2, 0, 0));
        assert_eq!((chars, first, only), (8, Some(0), vec![3]));
    }

    #[test]
    fn responses_api_stream() {
        let (u, chars, first, only) = shotgun(RESPONSES);
        assert_eq!(u, reported(36, 87, 0, 0));
        assert_eq!((chars, first, only), (9, Some(1), vec![]));
    }

    #[test]
    fn anthropic_stream_with_cache_tokens() {
        let (u, chars, first, _) = shotgun(ANTHROPIC);
        // input_tokens + cache writes + cache reads; output from the last message_delta.
        assert_eq!(u, reported(2125, 15, 2000, 100));
        assert_eq!((chars, first), (6, Some(3)));
    }

    /// Anthropic-compatible servers that send `"input_tokens": 0` (and zero cache counts) in
    /// `message_delta`: the input `message_start` reported stands, the output is the delta's.
    #[test]
    fn message_delta_with_zero_input_keeps_message_start_input() {
        let zeroed = ANTHROPIC.replace(
            "\"usage\":{\"output_tokens\":15}",
            "\"usage\":{\"input_tokens\":0,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":15}",
        );
        assert_ne!(zeroed, ANTHROPIC);
        assert_eq!(shotgun(&zeroed).0, reported(2125, 15, 2000, 100));
        // A delta that repeats the real count (Anthropic's own API does) changes nothing.
        let repeated = ANTHROPIC.replace(
            "\"usage\":{\"output_tokens\":15}",
            "\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":15}",
        );
        assert_eq!(shotgun(&repeated).0, reported(2125, 15, 2000, 100));
    }

    /// The usage member comes out of a content chunk whatever its place, and what is left is
    /// the same object without it.
    #[test]
    fn usage_member_is_cut_from_a_content_chunk() {
        let cases = [
            r#"{"id":"x","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":3,"completion_tokens":1},"id":"x","choices":[{"delta":{}}]}"#,
            r#"{"id":"x","usage":{"prompt_tokens":3,"nested":{"usage":1}},"choices":[]}"#,
            r#"{ "id" : "x" , "usage" : { "prompt_tokens" : 3 } , "choices" : [ ] }"#,
            r#"{ "usage" : null ,  "id" : "x" }"#,
            r#"{"usage":{"prompt_tokens":3},"id":"x"}"#,
            r#"{"usage":{"prompt_tokens":3}}"#,
        ];
        for c in cases {
            let Some(r) = usage_member(c.as_bytes()) else {
                panic!("no usage member found in {c}");
            };
            let cut = format!("{}{}", &c[..r.start], &c[r.end..]);
            let (Ok(mut want), Ok(got)) = (
                serde_json::from_str::<Value>(c),
                serde_json::from_str::<Value>(&cut),
            ) else {
                panic!("{c} -> {cut}: not JSON");
            };
            if let Some(o) = want.as_object_mut() {
                o.remove("usage");
            }
            assert_eq!(got, want, "{c} -> {cut}");
        }
        for none in [
            r#"{"id":"x","choices":[{"usage":1}]}"#,
            r#"[{"usage":1}]"#,
            r#"{"usage":"#,
            "[DONE]",
        ] {
            assert_eq!(usage_member(none.as_bytes()), None, "{none}");
        }
    }

    #[test]
    fn crlf_and_comment_streams() {
        assert_eq!(shotgun(CRLF).0, reported(5, 2, 0, 0));
        assert_eq!(shotgun(COMMENTS).0, reported(1, 1, 0, 0));
    }

    #[test]
    fn no_usage_is_estimated() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\"abcdefghi\"}}]}\n\ndata: [DONE]\n\n";
        let (u, chars, _, _) = shotgun(s);
        assert_eq!(chars, 9);
        assert_eq!(
            u,
            Usage {
                input: 1000,
                output: 3,
                cache_read: 0,
                cache_write: 0,
                source: UsageSource::Estimated
            }
        );
        // Anthropic cut after message_start: input is reported, output is not final.
        let cut = ANTHROPIC
            .split("event: message_delta")
            .next()
            .unwrap_or_default();
        let (u, ..) = shotgun(cut);
        assert_eq!(
            (u.input, u.output, u.source),
            (2125, 2, UsageSource::Estimated)
        );
    }

    #[test]
    fn usage_only_chunk_detection() {
        assert!(is_usage_only_chunk(
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(!is_usage_only_chunk(br#"{"choices":[],"usage":null}"#));
        assert!(!is_usage_only_chunk(
            br#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(!is_usage_only_chunk(br#"{"usage":{"prompt_tokens":1}}"#));
        assert!(!is_usage_only_chunk(b"[DONE]"));
        assert!(!is_usage_only_chunk(br#"{"choices":[],"usage":{"#));
    }

    #[test]
    fn estimate_is_ceil_quarter() {
        assert_eq!(
            [0, 1, 4, 5, 8].map(estimate_tokens_from_chars),
            [0, 1, 1, 2, 2]
        );
    }

    fn scan_body(body: &[u8], cuts: &[usize]) -> (Option<Usage>, Option<String>, bool) {
        let mut s = JsonUsageScanner::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            s.feed(&body[prev..c]);
            prev = c;
        }
        s.finish();
        (s.usage(), s.model().map(str::to_owned), s.is_invalid())
    }

    fn scan_shotgun(body: &[u8]) -> (Option<Usage>, Option<String>, bool) {
        let whole = scan_body(body, &[]);
        for k in 0..=body.len() {
            assert_eq!(scan_body(body, &[k]), whole, "split at {k}");
        }
        let bytes: Vec<usize> = (1..body.len()).collect();
        assert_eq!(scan_body(body, &bytes), whole, "byte at a time");
        whole
    }

    #[test]
    fn non_streamed_usage_for_each_provider() {
        let chat = br#"{"id":"c","model":"gpt-4o","choices":[{"message":{"role":"assistant","content":"x","usage":{"prompt_tokens":999}}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":2}}}"#;
        assert_eq!(
            scan_shotgun(chat),
            (Some(reported(12, 3, 2, 0)), Some("gpt-4o".into()), false)
        );
        let resp = br#"{"id":"r","object":"response","model":"gpt-4.1","usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":6},"output_tokens":87}}"#;
        assert_eq!(scan_shotgun(resp).0, Some(reported(36, 87, 6, 0)));
        let anth = br#"{"type":"message","usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":15},"model":"claude"}"#;
        assert_eq!(
            scan_shotgun(anth),
            (
                Some(reported(2125, 15, 2000, 100)),
                Some("claude".into()),
                false
            )
        );
        assert_eq!(scan_shotgun(br#"{"usage":null,"x":1}"#).0, None);
        assert_eq!(
            scan_shotgun(br#"{"a":{"usage":{"prompt_tokens":1}}}"#).0,
            None
        );
        assert!(scan_shotgun(br#"{"usage":{"prompt_tokens":1}"#).2);
    }

    #[test]
    fn usage_after_a_1mb_string() {
        let mut body = br#"{"id":"c","choices":[{"message":{"content":""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', 1 << 20));
        body.extend_from_slice(br#""}}],"usage":{"prompt_tokens":7,"completion_tokens":262144}}"#);
        for size in [1, 3, 4096, 65536, body.len()] {
            let mut s = JsonUsageScanner::new();
            for c in body.chunks(size) {
                s.feed(c);
            }
            s.finish();
            assert_eq!(
                s.usage(),
                Some(reported(7, 262_144, 0, 0)),
                "chunks of {size}"
            );
            assert!(s.captured.capacity() <= MAX_USAGE_BYTES);
        }
    }

    #[test]
    fn oversized_usage_is_ignored() {
        let body = format!(
            r#"{{"usage":{{"prompt_tokens":1,"pad":"{}"}}}}"#,
            "p".repeat(MAX_USAGE_BYTES)
        );
        assert_eq!(scan_body(body.as_bytes(), &[]).0, None);
    }

    fn estimate(body: &[u8], cuts: &[usize]) -> RequestEstimator {
        let mut e = RequestEstimator::new();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&body.len())) {
            e.feed(&body[prev..c]);
            prev = c;
        }
        e.finish();
        e
    }

    type EstView = (
        u64,
        u64,
        Option<u64>,
        Option<bool>,
        Option<StreamOptions>,
        Option<Injection>,
        bool,
    );

    fn view(e: &RequestEstimator) -> EstView {
        (
            e.prompt_chars(),
            e.estimated_input_tokens(),
            e.max_tokens(),
            e.stream(),
            e.stream_options(),
            e.include_usage_injection(),
            e.is_invalid(),
        )
    }

    fn est_shotgun(body: &[u8]) -> EstView {
        let whole = view(&estimate(body, &[]));
        for k in 0..=body.len() {
            assert_eq!(view(&estimate(body, &[k])), whole, "split at {k}");
        }
        whole
    }

    #[test]
    fn chat_request_fields_and_injection() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi \u00e9"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],"max_completion_tokens":256,"stream":true}"#;
        let (chars, tokens, max, stream, so, inj, invalid) = est_shotgun(body);
        // "Be brief." (9) + "Hi é" (4) = 13 chars → 4 tokens; 2 messages; 1 image.
        assert_eq!(chars, 13);
        assert_eq!(tokens, 4 + 2 * MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS);
        assert_eq!(
            (max, stream, so, invalid),
            (Some(256), Some(true), None, false)
        );
        let inj = inj.expect("stream without stream_options gets an injection");
        let end = body.len() as u64 - 1;
        assert_eq!(inj.range, end..end);
        let v = edited(body, &inj);
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
    }

    /// `body` with `inj` applied, parsed.
    fn edited(body: &[u8], inj: &Injection) -> Value {
        let (a, b) = (inj.range.start as usize, inj.range.end as usize);
        let mut out = body[..a].to_vec();
        out.extend_from_slice(inj.bytes);
        out.extend_from_slice(&body[b..]);
        serde_json::from_slice(&out).unwrap_or(Value::Null)
    }

    #[test]
    fn injection_is_known_while_feeding_the_closing_brace() {
        let body = b"{\"stream\":true,\"messages\":[]}\r\n";
        let mut e = RequestEstimator::new();
        e.feed(&body[..body.len() - 3]);
        assert_eq!(e.include_usage_injection(), None);
        e.feed(&body[body.len() - 3..]);
        let inj = e.include_usage_injection();
        let end = body.len() as u64 - 3;
        assert_eq!(inj.map(|i| i.range), Some(end..end));
        let mut e = RequestEstimator::new();
        e.feed(b"{}");
        assert_eq!(e.include_usage_injection(), None, "no stream: true");
    }

    /// Whatever `stream_options` a streamed request carries, the upstream is asked for usage:
    /// `include_usage` ends up `true` and every other member is kept. Only a client that asked
    /// for usage itself gets no edit.
    #[test]
    fn client_stream_options_cannot_switch_usage_off() {
        let body =
            br#"{"stream":true,"stream_options":{"include_usage":false},"prompt":["ab","cd"]}"#;
        let (chars, _, _, _, so, inj, _) = est_shotgun(body);
        assert_eq!(chars, 4);
        assert_eq!(
            so,
            Some(StreamOptions {
                range: 32..55,
                include_usage: Some(false)
            })
        );
        assert_eq!(&body[32..55], br#"{"include_usage":false}"#);
        assert_eq!(
            inj,
            Some(Injection {
                range: 49..54,
                bytes: b"true"
            })
        );
        for (client, want) in [
            (r#"{"include_usage":false}"#, r#"{"include_usage":true}"#),
            (r#"{"include_usage":null}"#, r#"{"include_usage":true}"#),
            (r#"{ "include_usage" : "no" }"#, r#"{"include_usage":true}"#),
            (r#"null"#, r#"{"include_usage":true}"#),
            (r#"false"#, r#"{"include_usage":true}"#),
            (r#"[]"#, r#"{"include_usage":true}"#),
            (r#"{}"#, r#"{"include_usage":true}"#),
            (r#"{ }"#, r#"{"include_usage":true}"#),
            (
                r#"{"include_obfuscation":false}"#,
                r#"{"include_usage":true,"include_obfuscation":false}"#,
            ),
            (
                r#"{"include_obfuscation":false,"include_usage":false}"#,
                r#"{"include_obfuscation":false,"include_usage":true}"#,
            ),
            // Duplicate keys: parsers keep the last one, so the last one is what is edited.
            (
                r#"{"include_usage":true,"include_usage":false}"#,
                r#"{"include_usage":true,"include_usage":true}"#,
            ),
        ] {
            let body = format!(r#"{{"model":"m","stream_options":{client},"stream":true}}"#);
            let inj = est_shotgun(body.as_bytes()).5;
            let Some(inj) = inj else {
                panic!("stream_options {client}: no edit");
            };
            let v = edited(body.as_bytes(), &inj);
            let want: Value = serde_json::from_str(want).unwrap_or(Value::Null);
            assert_eq!(v["stream_options"], want, "stream_options {client}");
            // The edited text itself, for the duplicate case a tree cannot show.
            let (a, b) = (inj.range.start as usize, inj.range.end as usize);
            let text = format!(
                "{}{}{}",
                &body[..a],
                String::from_utf8_lossy(inj.bytes),
                &body[b..]
            )
            .replace(' ', "");
            assert!(text.contains(r#""include_usage":true"#), "{text}");
            for off in [
                r#""include_usage":false"#,
                r#""include_usage":null"#,
                r#""include_usage":"no""#,
            ] {
                assert!(!text.contains(off), "{text}");
            }
        }
        // A duplicate stream_options: the last one counts.
        let body =
            br#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":null}"#;
        let inj = est_shotgun(body).5;
        let null_at = body.len() as u64 - 5;
        assert_eq!(inj.map(|i| i.range), Some(null_at..null_at + 4));
        // The client asked: nothing to edit, and it gets the usage chunk.
        for client in [
            r#"{"include_usage":true}"#,
            r#"{"include_usage":false,"include_usage":true}"#,
        ] {
            let body = format!(r#"{{"stream":true,"stream_options":{client}}}"#);
            assert_eq!(est_shotgun(body.as_bytes()).5, None, "{client}");
        }
        assert_eq!(est_shotgun(br#"{"stream":false}"#).5, None);
        assert_eq!(
            est_shotgun(br#"{"stream":false,"stream_options":null}"#).5,
            None
        );
        assert_eq!(est_shotgun(br#"{"stream":true"#).5, None);
        assert_eq!(est_shotgun(br#"{"stream":true,"stream_options":{"#).5, None);
    }

    #[test]
    fn anthropic_and_responses_requests() {
        let body = br#"{"system":[{"type":"text","text":"sys"}],"max_tokens":100,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"QUJD"}},{"type":"text","text":"what"}]}]}"#;
        let (chars, tokens, max, ..) = est_shotgun(body);
        assert_eq!((chars, max), (7, Some(100)));
        assert_eq!(tokens, 2 + MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS);
        let body = br#"{"model":"gpt-4.1","instructions":"abcd","input":[{"role":"user","content":[{"type":"input_text","text":"efgh"},{"type":"input_image","image_url":"data:image/png;base64,QUJD"}]}],"max_output_tokens":9}"#;
        let (chars, _, max, ..) = est_shotgun(body);
        assert_eq!((chars, max), (8, Some(9)));
        assert_eq!(est_shotgun(br#"{"input":"abcdefgh"}"#).0, 8);
    }

    #[test]
    fn six_mb_base64_image_is_not_text() {
        let mut body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"describe"},{"type":"image_url","image_url":{"url":"data:image/jpeg;base64,"#.to_vec();
        body.extend(std::iter::repeat_n(b'Q', 6 << 20));
        body.extend_from_slice(br#""}}]}],"stream":true}"#);
        let mut e = RequestEstimator::new();
        for c in body.chunks(16 * 1024) {
            e.feed(c);
        }
        e.finish();
        assert_eq!(e.prompt_chars(), 8);
        assert_eq!(
            e.estimated_input_tokens(),
            2 + MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS
        );
        assert!(!e.is_invalid());
        assert!(e.include_usage_injection().is_some());
    }

    /// Tiny xorshift so the fuzz inputs are the same on every run.
    /// `json_string` counts what `str::chars` counts of the decoded string, and finds its end,
    /// whatever mix of ASCII, multi-byte UTF-8 and escapes it holds.
    #[test]
    fn json_string_counts_decoded_characters() {
        let parts = [
            "a",
            "é",
            "中",
            "😀",
            "\\n",
            "\\\"",
            "\\u00e9",
            "\\ud83d\\ude00",
            "xxxxxxxxx",
            " ",
        ];
        let mut rng = Rng(0x0DDB_1A5E_5BAD_5EED);
        for _ in 0..5_000 {
            let text: String = (0..rng.below(12))
                .map(|_| parts[rng.below(parts.len())])
                .collect();
            let decoded: String = serde_json::from_str(&format!("\"{text}\"")).unwrap_or_default();
            let body = format!("{text}\",\"next\":1}}");
            assert_eq!(
                json_string(body.as_bytes()),
                Some((decoded.chars().count() as u64, text.len())),
                "{text}"
            );
            // Unterminated, or with a control byte: no string.
            assert_eq!(json_string(text.as_bytes()), None, "{text}");
            let broken = format!("{text}\u{1}\"");
            assert_eq!(json_string(broken.as_bytes()), None, "{text}");
        }
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// 10k pseudo-random inputs (random bytes from a JSON/SSE-heavy alphabet, and mutated
    /// fixtures) into every parser: none may panic, bounds must hold, and each answer must not
    /// depend on where the input was split.
    #[test]
    fn fuzz_no_panic_and_split_independent() {
        const ALPHABET: &[u8] =
            b"{}[]:,\"\\ \r\nu0123456789abcdeflmnorstuy-+.eE:dat\xC3\xA9\xEF\xBB\xBF\x00";
        let seeds: Vec<&[u8]> = ALL
            .iter()
            .map(|s| s.as_bytes())
            .chain([
                &br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#
                    [..],
                br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"model":"m"}"#,
                br#"{"a":"\ud83d\ude00","b":[1.5e3,-0,true,null]}"#,
            ])
            .collect();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..10_000 {
            let input: Vec<u8> = if round % 2 == 0 {
                let n = rng.below(200);
                (0..n)
                    .map(|_| ALPHABET[rng.below(ALPHABET.len())])
                    .collect()
            } else {
                let mut v = seeds[rng.below(seeds.len())].to_vec();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(v.len() + 1);
                    let b = ALPHABET[rng.below(ALPHABET.len())];
                    match rng.below(3) {
                        0 if at < v.len() => v[at] = b,
                        1 if at < v.len() => {
                            v.remove(at);
                        }
                        _ => v.insert(at, b),
                    }
                }
                v
            };
            let cut = rng.below(input.len() + 1);
            let cuts: &[usize] = &[cut];

            let max = 1 + rng.below(300);
            let sse = |cuts: &[usize]| {
                let mut p = SseParser::new(max);
                let mut t = UsageTracker::new();
                let mut seen = Vec::new();
                let mut prev = 0;
                for &c in cuts.iter().chain(std::iter::once(&input.len())) {
                    p.feed_items(&input[prev..c], &mut |item| match item {
                        SseItem::OversizedData(d) => t.on_oversized_data(d),
                        SseItem::End(f) => {
                            if let Some(e) = f.event {
                                t.on_event(&e);
                                let _ = is_usage_only_chunk(e.data);
                                seen.push((e.event.to_vec(), e.data.to_vec(), e.raw_len));
                            } else if f.oversized {
                                t.on_oversized_end();
                            }
                        }
                    });
                    assert!(p.held_bytes() <= max);
                    prev = c;
                }
                p.finish(&mut |e| seen.push((e.event.to_vec(), e.data.to_vec(), e.raw_len)));
                (seen, p.unparsed_frames(), t.usage(0), t.content_chars())
            };
            assert_eq!(sse(cuts), sse(&[]), "sse round {round}");

            let model = |cuts: &[usize]| {
                let mut m = crate::model::ModelScanner::new();
                let mut prev = 0;
                for &c in cuts.iter().chain(std::iter::once(&input.len())) {
                    m.feed(&input[prev..c]);
                    prev = c;
                }
                (m.finish(), m.top_level_end())
            };
            assert_eq!(model(cuts), model(&[]), "model round {round}");
            assert_eq!(
                scan_body(&input, cuts),
                scan_body(&input, &[]),
                "usage round {round}"
            );
            assert_eq!(
                view(&estimate(&input, cuts)),
                view(&estimate(&input, &[])),
                "estimator round {round}"
            );
            // One pass for both gives what the two passes give.
            let mut both = RequestEstimator::new();
            let mut m = crate::model::ModelScanner::new();
            let found = both.feed_whole_with_model(&input, &mut m);
            let mut alone = crate::model::ModelScanner::new();
            let want = match alone.feed(&input) {
                crate::model::ModelScan::NeedMore => alone.finish(),
                other => other,
            };
            assert_eq!(found, want, "one-pass model round {round}");
            assert_eq!(
                view(&both),
                view(&estimate(&input, &[])),
                "one-pass estimator round {round}"
            );
            assert_eq!(
                both.is_invalid(),
                estimate(&input, &[]).is_invalid(),
                "one-pass validity round {round}"
            );
        }
    }

    /// Nesting at, just under and just over the tokenizer's limit, in every container shape:
    /// the per-depth tables of the scanners must never be indexed out of range.
    #[test]
    fn nesting_at_the_depth_limit_does_not_panic() {
        for depth in [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
            for (open, close, leaf) in [
                (r#"{"messages":"#, "}", r#"{"content":"x","stream":true}"#),
                ("[", "]", r#""content""#),
                (r#"{"content":"#, "}", "1"),
            ] {
                let body = format!("{}{}{}", open.repeat(depth), leaf, close.repeat(depth));
                let b = body.as_bytes();
                let _ = view(&estimate(b, &[]));
                let _ = scan_body(b, &[]);
                let mut m = crate::model::ModelScanner::new();
                m.feed(b);
                let _ = m.finish();
            }
        }
    }

    /// The usage read from its bytes is the usage read through a JSON tree, for every shape
    /// and for values of the wrong type, repeated keys, escapes and nesting.
    #[test]
    fn usage_read_from_bytes_matches_the_json_tree() {
        let cases = [
            r#"{"prompt_tokens":9,"completion_tokens":512,"total_tokens":521}"#,
            r#"{"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":40,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":3}}"#,
            r#"{"input_tokens":10,"cache_creation_input_tokens":7,"cache_read_input_tokens":3,"output_tokens":20}"#,
            r#"{"input_tokens":10,"input_tokens_details":{"cached_tokens":4},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":12}"#,
            r#"{"completion_tokens":8,"input_tokens":1}"#,
            r#"{"prompt_tokens":"9","completion_tokens":1.5,"prompt_tokens_details":null}"#,
            r#"{"prompt_tokens":-1,"completion_tokens":true}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2,"completion_tokens":[1,2],"prompt_tokens_details":{"cached_tokens":{"cached_tokens":5}}}"#,
            r#"{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
            r#"{"prompt_tokens":3,"prompt_tokens_details":7}"#,
            r#"{"prompt_tokens":3,"prompt_tokens_details":[{"cached_tokens":1}]}"#,
            r#"{"prompt\u005ftokens":6,"completion_tokens":1e2}"#,
            r#"{"prompt_tokens":18446744073709551615,"x":{"y":[{"z":null}]}}"#,
            r#"{"prompt_tokens":184467440737095516150}"#,
            r#"{}"#,
            r#"{"other":1}"#,
            r#"[1,2]"#,
            r#"7"#,
            r#"null"#,
            r#"{"prompt_tokens":1"#,
        ];
        for c in cases {
            let tree = serde_json::from_str::<Value>(c)
                .ok()
                .and_then(|v| Counts::from_usage(&v));
            assert_eq!(Counts::from_usage_json(c.as_bytes()), tree, "{c}");
        }
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    /// The byte scan counts what the full parse counts, on chunks with
    /// escapes, non-ASCII text, tool arguments and `"usage":null`.
    #[test]
    fn fast_chat_chunk_counts_like_the_full_parse() {
        let chunks: [&[u8]; 4] = [
            br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"h\u00e9 \"q\" \\ ok"}}],"usage":null}"#,
            "{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"delta\":{\"content\":\"naïve café 😀\"}}]}".as_bytes(),
            br#"{"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\":1}"}}]}}],"usage":null}"#,
            br#"{"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"reasoning_content":"think","content":null}}]}"#,
        ];
        for data in chunks {
            let mut fast = UsageTracker::new();
            let f = fast.fast_event(data).expect("fast path taken");
            let mut full = UsageTracker::new();
            let v: Value = serde_json::from_slice(data).unwrap();
            let mut o = EventOutcome::default();
            full.chat_chunk(&v, &mut o);
            // Surrogate pairs count as one escape each in the scan; none here.
            assert_eq!(
                f.content_chars,
                o.content_chars,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    /// Every event of every recorded stream, plus shapes the fast path must leave alone: where
    /// the fast path answers, it answers what the full parse does; usage always takes the full
    /// parse.
    #[test]
    fn fast_event_agrees_with_the_full_parse() {
        let extra: [&[u8]; 8] = [
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm \"x\""}}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"a\": 1"}}"#,
            br#"{"type":"response.function_call_arguments.delta","item_id":"fc_1","delta":"{\"q\":"}"#,
            br#"{"type": "ping"}"#,
            br#"{"choices":[{"text":"legacy","index":0}],"object":"text_completion"}"#,
            br#"{"object":"chat.completion.chunk","choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":1}}"#,
            br#"{"object" : "chat.completion.chunk" , "choices":[{"delta":{"content" : "spaced"}}], "usage" : null}"#,
            br#"{"object":"chat.completion.chunk","choices":[{"delta":{"content":"type"}}],"usage":null,"x":"text"}"#,
        ];
        let mut events: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for stream in crate::sse::fixtures::ALL {
            let mut p = crate::sse::SseParser::new(1 << 20);
            p.feed(stream.as_bytes(), &mut |e| {
                events.push((e.event.to_vec(), e.data.to_vec()))
            });
        }
        events.extend(extra.iter().map(|d| (Vec::new(), d.to_vec())));
        let mut fast_taken = 0;
        for (event, data) in &events {
            let data = data.trim_ascii();
            if !data.starts_with(b"{") {
                continue;
            }
            let full = UsageTracker::new().full_event(data, event);
            let Some(fast) = UsageTracker::new().fast_event(data) else {
                continue;
            };
            fast_taken += 1;
            let text = String::from_utf8_lossy(data);
            assert!(!full.usage, "usage must take the full parse: {text}");
            assert_eq!(fast.content_chars, full.content_chars, "{text}");
            assert_eq!(fast.first_content, full.first_content, "{text}");
        }
        assert!(fast_taken >= 15, "fast path taken {fast_taken} times");
    }

    /// One tracker over a whole stream (so the template is in play): every event's answer is
    /// the full parse's, and `usage_null_at` points at the field, also when frames change shape
    /// (a role, escapes, a finish reason, a tool call) between equal-looking ones.
    #[test]
    fn templated_events_agree_with_the_full_parse() {
        let pre = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"#;
        let bodies = [
            r#""role":"assistant","content":""}"#,
            r#""content":"Hello"}"#,
            r#""content":" w\u00f6rld \"q\""}"#,
            r#""content":"naïve 😀"}"#,
            r#""content":"x"}"#,
            r#""content":"x\\"}"#,
            r#""content":"same"}"#,
            r#""tool_calls":[{"index":0,"function":{"arguments":"{\"a\":"}}]}"#,
            r#""content":"after tool"}"#,
            r#""content":"end"}"#,
            r#"}"#,
        ];
        let mut frames: Vec<String> = Vec::new();
        for (i, b) in bodies.iter().enumerate() {
            let finish = if i == 9 { r#""stop""# } else { "null" };
            frames.push(format!(
                r#"{pre}{b},"logprobs":null,"finish_reason":{finish}}}],"usage":null}}"#
            ));
        }
        frames.push(format!(r#"{pre}"content":"no usage field"}}}}]}}"#));
        frames.push(format!(r#"{pre}"content":"again"}}}}],"usage":null}}"#));
        let finder = memchr::memmem::Finder::new(b",\"usage\":null");
        let mut t = UsageTracker::new();
        let mut total = 0;
        for f in &frames {
            let data = f.as_bytes();
            let ev = SseEvent {
                event: b"",
                data,
                raw_len: 0,
            };
            let got = t.on_event(&ev);
            let want = UsageTracker::new().full_event(data, b"");
            assert_eq!(got.content_chars, want.content_chars, "{f}");
            assert_eq!(got.usage_null_at, finder.find(data), "{f}");
            total += want.content_chars;
        }
        assert_eq!(t.content_chars(), total);
    }

    /// xorshift: random test inputs, reproducible without a dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }
    }

    /// Thousands of pseudo-random streams of chat chunks and Anthropic deltas whose shape drifts
    /// from frame to frame (strings with escapes and non-ASCII text, optional role, finish
    /// reasons, tool calls, `"usage":null` present or not, spaces around colons, a usage frame):
    /// through one tracker (template and key scan in play) every frame's answer equals the full
    /// parse's, and `usage_null_at` always points at `,"usage":null`.
    #[test]
    fn drifting_streams_agree_with_the_full_parse() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let strings = [
            "",
            "a",
            "Hello",
            " w\\u00f6rld",
            "\\\"q\\\"",
            "x\\\\",
            "naïve 😀",
            "tab\\tnl\\n",
            "content",
            "\\\"usage\\\":null",
            "type",
            "{\\\"a\\\":1}",
        ];
        let finder = memchr::memmem::Finder::new(b",\"usage\":null");
        for _ in 0..2000 {
            let mut t = UsageTracker::new();
            let mut total = 0u64;
            let id = rng.below(3);
            for _ in 0..rng.below(30) + 1 {
                let text = strings[rng.below(strings.len())];
                let colon = if rng.below(10) == 0 { " : " } else { ":" };
                let data = match rng.below(12) {
                    0 => format!(
                        r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text"{colon}"{text}"}}}}"#
                    ),
                    1 => format!(
                        r#"{{"id":"c{id}","object":"chat.completion.chunk","choices":[],"usage":{{"prompt_tokens":3,"completion_tokens":{}}}}}"#,
                        rng.below(50)
                    ),
                    k => {
                        let role = if k == 2 { r#""role":"assistant","# } else { "" };
                        let delta = if k == 3 {
                            format!(
                                r#"{{"tool_calls":[{{"index":0,"function":{{"arguments"{colon}"{text}"}}}}]}}"#
                            )
                        } else if k == 4 {
                            "{}".to_string()
                        } else {
                            format!(r#"{{{role}"content"{colon}"{text}"}}"#)
                        };
                        let finish = if k == 5 { r#""stop""# } else { "null" };
                        let usage = if k == 6 { "" } else { r#","usage":null"# };
                        format!(
                            r#"{{"id":"c{id}","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]{usage}}}"#
                        )
                    }
                };
                let d = data.as_bytes();
                assert!(
                    serde_json::from_slice::<Value>(d).is_ok(),
                    "generated invalid JSON: {data}"
                );
                let ev = SseEvent {
                    event: b"",
                    data: d,
                    raw_len: 0,
                };
                let got = t.on_event(&ev);
                let want = UsageTracker::new().full_event(d, b"");
                assert_eq!(got.content_chars, want.content_chars, "{data}");
                assert_eq!(got.usage, want.usage, "{data}");
                assert_eq!(got.usage_only, want.usage_only, "{data}");
                if let Some(at) = got.usage_null_at {
                    assert_eq!(Some(at), finder.find(d), "{data}");
                }
                total += want.content_chars;
            }
            assert_eq!(t.content_chars(), total);
        }
    }

    /// What one way of reading a stream saw: per frame its end and the place of its
    /// `,"usage":null` (absolute offsets in the stream; `None` when the data was not read in
    /// place), and after each read the tracker's content characters and events, and the read
    /// in which the first content came.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Reading {
        frames: Vec<(usize, Option<usize>)>,
        totals: Vec<(u64, u64)>,
        first_in_read: Option<usize>,
    }

    /// Reads `stream` in the pieces `cuts` makes, frame by frame through the parser, or with
    /// runs of template-shaped frames taken by [`UsageTracker::template_frames`].
    fn read_stream(stream: &[u8], cuts: &[usize], max: usize, runs: bool) -> (Reading, usize) {
        use crate::sse::{FrameSink, SseItem, SseParser};
        struct Sink<'a> {
            t: &'a mut UsageTracker,
            base: usize,
            input: &'a [u8],
            runs: bool,
            max: usize,
            first: bool,
            frames: &'a mut Vec<(usize, Option<usize>)>,
            taken: usize,
        }
        impl FrameSink for Sink<'_> {
            fn item(&mut self, item: SseItem<'_>) {
                match item {
                    SseItem::End(f) => {
                        let mut null = None;
                        if let Some(ev) = f.event {
                            let o = self.t.on_event(&ev);
                            self.first |= o.first_content;
                            let data_at = (ev.data.as_ptr() as usize)
                                .wrapping_sub(self.input.as_ptr() as usize);
                            let in_place =
                                self.input.get(data_at..data_at.wrapping_add(ev.data.len()))
                                    == Some(ev.data);
                            if let (true, Some(1), Some(i)) =
                                (in_place, o.usage_nulls, o.usage_null_at)
                            {
                                null = Some(self.base + data_at + i);
                            }
                        } else if f.oversized {
                            self.first |= self.t.on_oversized_end().first_content;
                        }
                        self.frames.push((self.base + f.end, null));
                    }
                    SseItem::OversizedData(d) => self.t.on_oversized_data(d),
                }
            }
            fn run(&mut self, input: &[u8], at: usize) -> usize {
                if !self.runs {
                    return 0;
                }
                let before = self.frames.len();
                let (base, frames) = (self.base, &mut *self.frames);
                let r = self
                    .t
                    .template_frames(input, at, self.max, &mut |null, end| {
                        frames.push((base + end, null.map(|i| base + i)));
                    });
                self.first |= r.first_content;
                self.taken += self.frames.len() - before;
                r.len
            }
        }
        let mut p = SseParser::new(max);
        let mut t = UsageTracker::new();
        let mut seen = Reading::default();
        let mut taken = 0;
        let mut from = 0;
        for (k, &to) in cuts.iter().chain([stream.len()].iter()).enumerate() {
            let input = &stream[from..to];
            let mut sink = Sink {
                t: &mut t,
                base: from,
                input,
                runs,
                max,
                first: false,
                frames: &mut seen.frames,
                taken: 0,
            };
            p.feed_sink(input, &mut sink);
            taken += sink.taken;
            if sink.first {
                assert!(seen.first_in_read.is_none());
                seen.first_in_read = Some(k);
            }
            seen.totals.push((t.content_chars(), t.events));
            from = to;
        }
        (seen, taken)
    }

    /// Thousands of random chat streams (frames that drift in shape, `data:` with and without
    /// its space, CRLF endings, `event:` lines, comments, a data value over two lines, frames
    /// over the parser's bound), cut into random reads: reading runs of template-shaped frames
    /// at once gives, frame for frame and read for read, what the parser and `on_event` give.
    #[test]
    fn template_runs_read_as_the_parser_does() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let texts = [
            "",
            "a",
            "Hello",
            " w\\u00f6rld",
            "\\\"q\\\"",
            "naïve 😀",
            "tab\\t",
            "x\\\\",
        ];
        let (mut runs_taken, mut frames) = (0, 0);
        for _ in 0..3000 {
            let mut stream = String::new();
            for _ in 0..rng.below(40) + 1 {
                let text = texts[rng.below(texts.len())];
                let role = if rng.below(8) == 0 {
                    r#""role":"assistant","#
                } else {
                    ""
                };
                let finish = if rng.below(10) == 0 {
                    r#""stop""#
                } else {
                    "null"
                };
                let usage = if rng.below(6) == 0 {
                    ""
                } else {
                    r#","usage":null"#
                };
                let long = if rng.below(60) == 0 {
                    "z".repeat(300)
                } else {
                    String::new()
                };
                let data = match rng.below(20) {
                    0 => r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#.to_string(),
                    1 => "[DONE]".to_string(),
                    _ => format!(
                        r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m{long}","choices":[{{"index":0,"delta":{{{role}"content":"{text}"}},"finish_reason":{finish}}}]{usage}}}"#
                    ),
                };
                let field = if rng.below(5) == 0 { "data:" } else { "data: " };
                match rng.below(16) {
                    0 => stream.push_str(": ping\n"),
                    1 => stream.push_str("event: message\n"),
                    _ => {}
                }
                if rng.below(25) == 0 {
                    // The same data split over two lines: joined with `\n`, so it is not JSON.
                    let cut = data.len() / 2;
                    stream.push_str(&format!("{field}{}\ndata: {}", &data[..cut], &data[cut..]));
                } else {
                    stream.push_str(&format!("{field}{data}"));
                }
                stream.push_str(if rng.below(12) == 0 {
                    "\r\n\r\n"
                } else {
                    "\n\n"
                });
            }
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(bytes.len())).collect();
            cuts.sort_unstable();
            let max = [256, 512, 8192][rng.below(3)];
            let (slow, _) = read_stream(bytes, &cuts, max, false);
            let (fast, taken) = read_stream(bytes, &cuts, max, true);
            assert_eq!(fast, slow, "{stream:?} cut at {cuts:?}, max {max}");
            runs_taken += taken;
            frames += fast.frames.len();
        }
        // Runs take a good share (the shapes drift often here); the parser reads the rest.
        assert!(runs_taken * 5 > frames, "{runs_taken} of {frames}");
    }

    /// The fast run takes whole frames only when the template is set, and stops at the
    /// first frame of another shape.
    #[test]
    fn template_runs_take_only_template_frames() {
        let frame = |text: &str| {
            format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n"
            )
        };
        let mut t = UsageTracker::new();
        let (a, b) = (frame("Hi"), frame(" there"));
        let input = format!("{a}{b}data: [DONE]\n\n");
        let mut nulls = Vec::new();
        // No template yet: nothing is taken.
        let r = t.template_frames(input.as_bytes(), 0, 8192, &mut |n, e| nulls.push((n, e)));
        assert_eq!(r.len, 0);
        let ev = SseEvent {
            event: b"",
            data: &a.as_bytes()[6..a.len() - 2],
            raw_len: 0,
        };
        assert!(t.on_event(&ev).first_content);
        let r = t.template_frames(input.as_bytes(), a.len(), 8192, &mut |n, e| {
            nulls.push((n, e))
        });
        assert_eq!(r.len, b.len());
        assert!(!r.first_content);
        let null_at = a.len() + b.find(",\"usage\":null").unwrap_or(0);
        assert_eq!(nulls, vec![(Some(null_at), a.len() + b.len())]);
        assert_eq!(t.content_chars(), 2 + 6);
        // A frame longer than the parser's bound is the parser's (it is skipped unread there).
        let r = t.template_frames(input.as_bytes(), a.len(), b.len() - 1, &mut |_, _| {});
        assert_eq!(r.len, 0);
    }

    /// Review findings: inputs where the fast path once disagreed with the full parse or
    /// reported a `,"usage":null` that was not there.
    #[test]
    fn fast_path_regressions() {
        let ev = |data: &'static [u8]| SseEvent {
            event: b"",
            data,
            raw_len: 0,
        };
        // A space after the colon: not the exact bytes, so no offset to cut at.
        let spaced: &[u8] = br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage": null}"#;
        let o = UsageTracker::new().on_event(&ev(spaced));
        assert_eq!(o.usage_null_at, None);
        assert_eq!(o.content_chars, 2);
        // A frame the full parse reads: whether it holds `,"usage":null` is not known, so the
        // engine searches for it itself.
        let tool: &[u8] = br#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]},"finish_reason":null}],"usage":null}"#;
        assert_eq!(UsageTracker::new().on_event(&ev(tool)).usage_nulls, None);
        // Escapes outside the counted strings take the full parse: an escaped quote that looks
        // like a key's, and a key spelled with a \u escape (usage must never be missed).
        let cases: [(&[u8], u64, bool); 4] = [
            (br#"{"object":"chat.completion.chunk","choices":[{"delta":{"x\"content":"abcdef"}}]}"#, 0, false),
            (br#"{"object":"chat.completion.chunk","choices":[],"\u0075sage":{"prompt_tokens":3,"completion_tokens":5}}"#, 0, true),
            (br#"{"object":"chat.completion.chunk","choices":[{"delta":{"function_call":{"arguments":"{\"loc"}}}]}"#, 5, false),
            (br#"{"object":"chat.completion.chunk","choices":[{"delta":{"content":"\ud83d\ude00!"}}],"usage":null}"#, 2, false),
        ];
        for (data, chars, usage) in cases {
            let text = String::from_utf8_lossy(data);
            let full = UsageTracker::new().full_event(data, b"");
            assert_eq!(
                (full.content_chars, full.usage),
                (chars, usage),
                "full: {text}"
            );
            let got = UsageTracker::new().on_event(&ev(data));
            assert_eq!(
                (got.content_chars, got.usage),
                (chars, usage),
                "on_event: {text}"
            );
        }
    }

    #[test]
    fn usage_null_offset_is_where_the_field_is() {
        let data = br#" {"object":"chat.completion.chunk","choices":[{"delta":{"content":"a"}}],"usage":null}"#;
        let mut t = UsageTracker::new();
        let ev = SseEvent {
            event: b"",
            data,
            raw_len: 0,
        };
        let o = t.on_event(&ev);
        let at = o.usage_null_at.expect("found");
        assert_eq!(&data[at..at + 13], b",\"usage\":null");
        assert_eq!(o.usage_nulls, Some(1));
    }

    #[test]
    fn chunks_with_usage_take_the_full_parse() {
        let mut t = UsageTracker::new();
        let data = br#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#;
        assert!(t.fast_event(data).is_none());
    }

    /// Where the usage-chunk path answers (the chunk `include_usage` adds), it answers what the
    /// full parse does: the same outcome and the same counts after it; every shape it must
    /// leave alone (content beside the usage, a `type`, an Anthropic event name, usage that is
    /// no object, choices that are no array, bad JSON) goes to the full parse.
    #[test]
    fn usage_chunks_read_as_the_full_parse_does() {
        let taken: [&[u8]; 7] = [
            br#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":200,"total_tokens":209}}"#,
            br#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":4}}}"#,
            br#"{ "choices" : [ ] , "usage" : { "prompt_tokens" : 1 , "completion_tokens" : 2 } }"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":2},"choices":[]}"#,
            br#"{"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"x":[1,{"y":null}]},"id":"c"}"#,
            br#"{"choices":[],"usage":{}}"#,
        ];
        let left: [(&[u8], &[u8]); 9] = [
            (b"", br#"{"choices":null,"usage":{"prompt_tokens":1,"completion_tokens":2}}"#),
            (b"", br#"{"choices":[{"delta":{"content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#),
            (b"", br#"{"type":"message_delta","usage":{"output_tokens":7}}"#),
            (b"message_delta", br#"{"usage":{"output_tokens":7}}"#),
            (b"response.output_text.delta", br#"{"usage":{"output_tokens":7}}"#),
            (b"", br#"{"choices":[],"usage":null,"meta":{"usage":{"prompt_tokens":1}}}"#),
            (b"", br#"{"choices":[],"usage":{"prompt_tokens":1},"usage":null}"#),
            (b"", br#"{"choices":[],"usage":{"prompt_tokens":1}"#),
            (b"", br#"{"choices":[],"usage":{"prompt_tokens":1}} x"#),
        ];
        let agree = |event: &[u8], data: &[u8], want_taken: bool| {
            let text = String::from_utf8_lossy(data).into_owned();
            let mut fast = UsageTracker::new();
            let got = fast.usage_chunk_event(data, event);
            assert_eq!(got.is_some(), want_taken, "{text}");
            let mut full = UsageTracker::new();
            let want = full.full_event(data, event);
            if let Some(got) = got {
                assert_eq!(got, want, "{text}");
                assert_eq!(fast.usage(0), full.usage(0), "{text}");
                assert_eq!(fast.final_output, full.final_output, "{text}");
            }
        };
        for data in taken {
            agree(b"", data, true);
        }
        for (event, data) in left {
            agree(event, data, false);
        }
        // Through `on_event` (as the relay calls it), the usage-only chunk is found and read.
        let mut t = UsageTracker::new();
        let o = t.on_event(&SseEvent {
            event: b"",
            data: taken[0],
            raw_len: taken[0].len() + 8,
        });
        assert!(o.usage && o.usage_only);
        assert_eq!((t.usage(0).input, t.usage(0).output), (9, 200));
    }
}
