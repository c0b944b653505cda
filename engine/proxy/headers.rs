//! Header lines Ringway adds to a response (limit headers, server-timing).

use std::fmt;

use ringway_filters::limit::window::LimitHeaders;

/// Most bytes of added lines (a few headers).
const CAP: usize = 512;

/// Added `name: value\r\n` lines. Empty costs nothing: the bytes are
/// allocated with the first line, so a request's state does not carry 512
/// bytes of room that most routes never use (it sized every open stream).
#[derive(Clone, Default)]
pub struct ExtraHeaders {
    buf: Vec<u8>,
}

impl ExtraHeaders {
    /// The lines, as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The lines, as text (they are only ever written as ASCII).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// Forgets the lines.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// Adds a limit's three header lines. They are built from text, so taken as bytes:
    /// through `fmt::Write` they were checked as UTF-8 again on every limited request.
    pub fn push_limit(&mut self, h: &LimitHeaders) -> fmt::Result {
        self.push(h.lines()?.as_bytes())
    }

    fn push(&mut self, b: &[u8]) -> fmt::Result {
        if self.buf.len() + b.len() > CAP {
            return Err(fmt::Error);
        }
        if self.buf.capacity() == 0 {
            // One allocation for the usual few lines (limit headers: ~100-250 bytes).
            self.buf.reserve_exact(b.len().max(256));
        }
        self.buf.extend_from_slice(b);
        Ok(())
    }
}

/// Adds `server-timing: ringway;dur=<ms>` (Ringway's time before the request went upstream).
pub fn server_timing(extra: &mut ExtraHeaders, d: std::time::Duration) {
    use fmt::Write as _;
    let _ = write!(
        extra,
        "server-timing: ringway;dur={:.3}\r\n",
        d.as_secs_f64() * 1000.0
    );
}

impl fmt::Write for ExtraHeaders {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes())
    }
}
