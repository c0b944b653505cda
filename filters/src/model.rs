//! Finding a request body's top-level `"model"` without holding the body.
//!
//! [`ModelScanner`] is fed the body in slices of any size and keeps fixed state (the tokenizer,
//! the current top-level key, at most [`MAX_MODEL_LEN`] bytes of value), so a `"model"` that comes
//! after an 8 MB base64 image costs the same memory as one that comes first. Only the top-level
//! object's own `"model"` counts: one nested in a message, a tool schema or a string does not.
//!
//! [`glob_match`] is the pattern rule for route `models` and `model_map` keys.

use std::ops::Range;

use crate::json_scan::{JsonError, Kind, Scanner, Sink, SmallBuf};

/// Longest `"model"` value accepted, in decoded bytes. Longer is [`ModelScan::Invalid`]: no real
/// model name comes close, and the bound keeps the scanner's memory fixed.
pub const MAX_MODEL_LEN: usize = 256;

/// What the scan knows so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelScan {
    /// No top-level `"model"` yet; feed more of the body.
    NeedMore,
    /// The top-level `"model"` string.
    Found {
        /// The decoded value (escapes resolved).
        value: String,
        /// Absolute byte offsets, in the body, of the string's raw content between its quotes
        /// (escapes still encoded), so the engine can replace exactly those bytes to rewrite it.
        value_range: Range<u64>,
    },
    /// The body is complete and valid JSON, and its top level has no `"model"` (or is not an
    /// object).
    NotFound,
    /// The body is not valid JSON, or `"model"` is not a string, is longer than
    /// [`MAX_MODEL_LEN`], or appears twice at the top level; see [`ModelScanner::invalid_reason`].
    Invalid,
}

/// The scanner's callbacks and what they found.
#[derive(Debug, Default)]
pub(crate) struct ModelSink {
    /// The top-level key being read (only its first bytes matter).
    key: SmallBuf<8>,
    /// The last completed top-level key was `model`.
    key_is_model: bool,
    /// Inside the top-level `"model"` string value.
    capturing: bool,
    value: SmallBuf<MAX_MODEL_LEN>,
    value_start: u64,
    pub(crate) found: Option<(String, Range<u64>)>,
    pub(crate) problem: Option<&'static str>,
    top_level_end: Option<u64>,
}

impl Sink for ModelSink {
    fn key_start(&mut self, depth: usize) {
        if depth == 1 {
            self.key.clear();
        }
    }

    fn string_bytes(&mut self, key: bool, bytes: &[u8]) {
        if key {
            // Nested keys also arrive here; `key_end` only reads the buffer at depth 1, and
            // `key_start` clears it at depth 1, so a nested key never leaks into the decision.
            self.key.push(bytes);
        } else if self.capturing {
            self.value.push(bytes);
        }
    }

    fn key_end(&mut self, depth: usize) {
        if depth == 1 {
            self.key_is_model = self.key.get() == Some(b"model");
        }
    }

    fn value_start(&mut self, kind: Kind, depth: usize, at: u64) {
        if depth != 1 || !self.key_is_model {
            return;
        }
        if self.found.is_some() {
            // Duplicate keys: many JSON parsers upstream keep the last one, so routing on the
            // first would let a client pick a route for one model and run another.
            self.problem.get_or_insert("duplicate top-level \"model\"");
        } else if kind != Kind::String {
            self.problem.get_or_insert("\"model\" is not a string");
        } else {
            self.capturing = true;
            self.value.clear();
            self.value_start = at + 1;
        }
    }

    fn value_end(&mut self, kind: Kind, depth: usize, end: u64) {
        if depth == 0 && kind == Kind::Object {
            self.top_level_end = Some(end - 1);
        }
        if depth != 1 || !self.capturing {
            return;
        }
        self.capturing = false;
        match self.value.get().map(|v| String::from_utf8(v.to_vec())) {
            Some(Ok(s)) => self.found = Some((s, self.value_start..end - 1)),
            Some(Err(_)) => {
                self.problem.get_or_insert("\"model\" is not valid UTF-8");
            }
            None => {
                self.problem.get_or_insert("\"model\" is too long");
            }
        }
    }
}

/// Streaming scan of a request body for its top-level `"model"`.
///
/// Feed every slice of the body in order with [`feed`](Self::feed), then call
/// [`finish`](Self::finish) at the end of the body. Results are sticky: once `Found`, later calls
/// keep answering `Found` (or `Invalid` if the rest of the body turns out broken). The engine may
/// stop feeding at the first `Found` if it only routes; it should keep feeding to the end when it
/// also needs [`top_level_end`](Self::top_level_end) or wants duplicate `"model"` keys rejected.
#[derive(Debug, Default)]
pub struct ModelScanner {
    scan: Scanner,
    pub(crate) sink: ModelSink,
    pub(crate) error: Option<JsonError>,
}

impl ModelScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next slice of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> ModelScan {
        if self.error.is_none() {
            if let Err(e) = self.scan.feed(chunk, &mut self.sink) {
                self.error = Some(e);
            }
        }
        self.state(false)
    }

    /// Marks the end of the body and gives the final answer (never `NeedMore`).
    pub fn finish(&mut self) -> ModelScan {
        if self.error.is_none() {
            if let Err(e) = self.scan.finish(&mut self.sink) {
                self.error = Some(e);
            }
        }
        self.state(true)
    }

    pub(crate) fn state(&self, end: bool) -> ModelScan {
        if self.error.is_some() || self.sink.problem.is_some() {
            return ModelScan::Invalid;
        }
        match &self.sink.found {
            Some((value, range)) => ModelScan::Found {
                value: value.clone(),
                value_range: range.clone(),
            },
            None if end || self.scan.is_done() => ModelScan::NotFound,
            None => ModelScan::NeedMore,
        }
    }

    /// Why the body was answered `Invalid` (for logs), if it was.
    pub fn invalid_reason(&self) -> Option<&'static str> {
        match self.error {
            Some(JsonError::Syntax { .. }) => Some("body is not valid JSON"),
            Some(JsonError::TooDeep { .. }) => Some("body nests too deeply"),
            Some(JsonError::Truncated) => Some("body ended inside its JSON value"),
            None => self.sink.problem,
        }
    }

    /// Absolute offset of the top-level object's closing `}`, once seen: where the engine inserts
    /// a member (see `usage::RequestEstimator::include_usage_injection`).
    pub fn top_level_end(&self) -> Option<u64> {
        self.sink.top_level_end
    }

    /// Bytes of the body consumed so far.
    pub fn offset(&self) -> u64 {
        self.scan.offset()
    }
}

/// Glob match used for route `models` and `model_map` keys: `*` matches any run of bytes
/// (including none) and may appear anywhere, any number of times; every other byte matches itself,
/// case-sensitively. `"*"` matches every name, including the empty one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and which name byte it is currently assumed to end before: on a
    // mismatch the star swallows one more byte. Linear backtracking, no recursion.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_split(body: &[u8], cuts: &[usize]) -> ModelScan {
        let mut s = ModelScanner::new();
        let mut prev = 0;
        for &c in cuts {
            s.feed(&body[prev..c]);
            prev = c;
        }
        s.feed(&body[prev..]);
        s.finish()
    }

    /// The answer must not depend on how the body was cut.
    fn scan(body: &[u8]) -> ModelScan {
        let whole = scan_split(body, &[]);
        for k in 0..=body.len() {
            assert_eq!(scan_split(body, &[k]), whole, "split at {k}");
        }
        let bytes: Vec<usize> = (1..body.len()).collect();
        assert_eq!(scan_split(body, &bytes), whole, "byte at a time");
        whole
    }

    fn found(value: &str, range: Range<u64>) -> ModelScan {
        ModelScan::Found {
            value: value.into(),
            value_range: range,
        }
    }

    #[test]
    fn model_as_first_and_last_key() {
        assert_eq!(
            scan(br#"{"model":"gpt-4o","messages":[]}"#),
            found("gpt-4o", 10..16)
        );
        let body = br#"{ "messages" : [ {"role":"user","content":"hi"} ] , "model" : "claude-3" }"#;
        let r = scan(body);
        let ModelScan::Found { value_range, .. } = &r else {
            panic!("{r:?}")
        };
        assert_eq!(
            &body[value_range.start as usize..value_range.end as usize],
            b"claude-3"
        );
    }

    #[test]
    fn nested_model_is_ignored() {
        assert_eq!(
            scan(br#"{"metadata":{"model":"evil"},"messages":[{"model":"x"}],"m":"model"}"#),
            ModelScan::NotFound
        );
        assert_eq!(
            scan(br#"{"metadata":{"model":"evil"},"model":"good"}"#),
            found("good", 38..42)
        );
    }

    #[test]
    fn escapes_in_keys_and_values() {
        // `\"model\"` inside a string is not a key; an escaped key still names `model`.
        let body = br#"{"a":"\"model\":\"no\"","mod\u0065l":"g\"p\u0074"}"#;
        let r = scan(body);
        assert_eq!(r, found("g\"pt", 38..48));
        assert_eq!(&body[38..48], br#"g\"p\u0074"#);
    }

    #[test]
    fn model_after_8mb_base64_with_bounded_memory() {
        let mut body = Vec::with_capacity(9 << 20);
        body.extend_from_slice(br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,"#);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..(8 << 20) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.push(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(x % 64) as usize],
            );
        }
        body.extend_from_slice(br#""}}]}],"model":"gpt-4o-mini"}"#);
        let mut s = ModelScanner::new();
        let mut last = ModelScan::NeedMore;
        for chunk in body.chunks(16 * 1024) {
            last = s.feed(chunk);
        }
        assert!(matches!(&last, ModelScan::Found { value, .. } if value == "gpt-4o-mini"));
        // The scanner is a fixed-size value: no heap buffer grew with the body.
        assert!(std::mem::size_of::<ModelScanner>() < 1024);
        let ModelScan::Found { value_range, .. } = s.finish() else {
            panic!()
        };
        assert_eq!(
            &body[value_range.start as usize..value_range.end as usize],
            b"gpt-4o-mini"
        );
        assert_eq!(s.top_level_end(), Some(body.len() as u64 - 1));
    }

    #[test]
    fn invalid_bodies() {
        for body in [
            &br#"{"model":"a""#[..],
            br#"{"model":"a",}"#,
            br#"{"model":5}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"a"} x"#,
            br#"{"model":"\ud800\u"}"#,
        ] {
            assert_eq!(
                scan(body),
                ModelScan::Invalid,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_LEN + 1));
        assert_eq!(scan_split(long.as_bytes(), &[]), ModelScan::Invalid);
        let ok = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_LEN));
        assert!(matches!(
            scan_split(ok.as_bytes(), &[]),
            ModelScan::Found { .. }
        ));
    }

    #[test]
    fn not_found_cases() {
        assert_eq!(scan(b"[]"), ModelScan::NotFound);
        assert_eq!(scan(b"{}"), ModelScan::NotFound);
        assert_eq!(scan(br#""model""#), ModelScan::NotFound);
    }

    #[test]
    fn feed_reports_need_more_then_found() {
        let mut s = ModelScanner::new();
        assert_eq!(s.feed(br#"{"messages":[],"mo"#), ModelScan::NeedMore);
        assert_eq!(s.feed(br#"del":"x"#), ModelScan::NeedMore);
        assert_eq!(s.feed(br#"y","#), found("xy", 24..26));
        assert_eq!(s.feed(br#""n":1}"#), found("xy", 24..26));
        assert_eq!(s.finish(), found("xy", 24..26));
        assert_eq!(s.top_level_end(), Some(33));
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("gpt-4o*", "gpt-4o-mini"));
        assert!(glob_match("gpt-4o*", "gpt-4o"));
        assert!(!glob_match("gpt-4o*", "gpt-4"));
        assert!(glob_match("claude-*", "claude-3-5-sonnet"));
        assert!(glob_match("*-mini", "gpt-4o-mini"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(glob_match("a*b*c", "abbbc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("**", "x"));
    }
}
