//! Header lines Ringway adds to a response (limit headers), built on the
//! stack: no allocation per request.

use std::fmt;

/// Room for a few added header lines.
const CAP: usize = 512;

/// Added `name: value\r\n` lines.
#[derive(Clone, Copy)]
pub struct ExtraHeaders {
    buf: [u8; CAP],
    len: usize,
}

impl Default for ExtraHeaders {
    fn default() -> Self {
        Self {
            buf: [0; CAP],
            len: 0,
        }
    }
}

impl ExtraHeaders {
    /// The lines, as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The lines, as text (they are only ever written as ASCII).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// Forgets the lines.
    pub fn clear(&mut self) {
        self.len = 0;
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
        let b = s.as_bytes();
        if self.len + b.len() > CAP {
            return Err(fmt::Error);
        }
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
        Ok(())
    }
}
