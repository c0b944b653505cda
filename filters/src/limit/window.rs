//! Clock-aligned fixed windows and the headers that describe them.
//!
//! A window of `period_ms` starts at every multiple of `period_ms` since the Unix epoch
//! (`floor(now / period)`), so every core and every replica agrees on window boundaries without
//! talking to each other. A `period_ms` of 0 is treated as 1 (rules reject 0; this only keeps the
//! arithmetic total).

use std::fmt;

/// The start (Unix ms) of the window containing `now_ms`.
pub fn window_start(now_ms: u64, period_ms: u64) -> u64 {
    let period = period_ms.max(1);
    now_ms - now_ms % period
}

/// The index of the window containing `now_ms` (`floor(now / period)`).
pub fn window_index(now_ms: u64, period_ms: u64) -> u64 {
    now_ms / period_ms.max(1)
}

/// Milliseconds from `now_ms` until the window containing it ends; always in `1..=period_ms`.
pub fn reset_after_ms(now_ms: u64, period_ms: u64) -> u64 {
    let period = period_ms.max(1);
    period - now_ms % period
}

/// The `retry-after` value in whole seconds for a reset `reset_ms` away: rounded up, and at least
/// 1 so a client never retries in a loop at once.
pub fn retry_after_secs(reset_ms: u64) -> u64 {
    reset_ms.div_ceil(1000).max(1)
}

/// A duration formatted the way OpenAI's `x-ratelimit-reset-*` headers are (Go's
/// `time.Duration` text) at millisecond precision: `"0s"`, `"250ms"`, `"1s"`, `"59.5s"`,
/// `"6m0s"`, `"1h2m3.004s"`. Under a second it is whole milliseconds; from a second up, hours and
/// minutes are shown once they are non-zero and seconds always, with the fraction's trailing zeros
/// dropped.
///
/// It implements `Display`, so the engine writes it straight into its header buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetDuration(pub u64);

impl fmt::Display for ResetDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms == 0 {
            return f.write_str("0s");
        }
        if ms < 1000 {
            return write!(f, "{ms}ms");
        }
        let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if h > 0 || m > 0 {
            write!(f, "{m}m")?;
        }
        write!(f, "{s}")?;
        if frac > 0 {
            // Three digits, then drop trailing zeros: 500 → ".5", 040 → ".04".
            let mut digits = [
                b'0' + (frac / 100) as u8,
                b'0' + (frac / 10 % 10) as u8,
                b'0' + (frac % 10) as u8,
            ];
            let mut len = 3;
            while len > 0 && digits[len - 1] == b'0' {
                len -= 1;
            }
            let digits = &mut digits[..len];
            f.write_str(".")?;
            f.write_str(std::str::from_utf8(digits).map_err(|_| fmt::Error)?)?;
        }
        f.write_str("s")
    }
}

/// What a limit counts, which picks the header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// `rate-limit` filters: `x-ratelimit-*-requests`.
    Requests,
    /// `token-limit` filters: `x-ratelimit-*-tokens`.
    Tokens,
}

impl Unit {
    /// `x-ratelimit-limit-requests` or `x-ratelimit-limit-tokens`.
    pub fn limit_header(self) -> &'static str {
        match self {
            Unit::Requests => "x-ratelimit-limit-requests",
            Unit::Tokens => "x-ratelimit-limit-tokens",
        }
    }

    /// `x-ratelimit-remaining-requests` or `x-ratelimit-remaining-tokens`.
    pub fn remaining_header(self) -> &'static str {
        match self {
            Unit::Requests => "x-ratelimit-remaining-requests",
            Unit::Tokens => "x-ratelimit-remaining-tokens",
        }
    }

    /// `x-ratelimit-reset-requests` or `x-ratelimit-reset-tokens`.
    pub fn reset_header(self) -> &'static str {
        match self {
            Unit::Requests => "x-ratelimit-reset-requests",
            Unit::Tokens => "x-ratelimit-reset-tokens",
        }
    }
}

/// The three `x-ratelimit-*` headers for one limit, sent on allowed and limited responses alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHeaders {
    /// Requests or tokens.
    pub unit: Unit,
    /// The binding window's limit.
    pub limit: u64,
    /// What is left in it after this request.
    pub remaining: u64,
    /// Milliseconds until it resets.
    pub reset_ms: u64,
}

impl LimitHeaders {
    /// Writes the three header lines, each `name: value\r\n`, lowercase names.
    pub fn write_to(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(out, "{}: {}\r\n", self.unit.limit_header(), self.limit)?;
        write!(
            out,
            "{}: {}\r\n",
            self.unit.remaining_header(),
            self.remaining
        )?;
        write!(
            out,
            "{}: {}\r\n",
            self.unit.reset_header(),
            ResetDuration(self.reset_ms)
        )
    }

    /// Writes `retry-after: <seconds>\r\n` for a limited response ([`retry_after_secs`]).
    pub fn write_retry_after(&self, out: &mut impl fmt::Write) -> fmt::Result {
        write!(out, "retry-after: {}\r\n", retry_after_secs(self.reset_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_to_the_epoch() {
        // (now, period, start, index, reset_after)
        let cases = [
            (0, 1000, 0, 0, 1000),
            (999, 1000, 0, 0, 1),
            (1000, 1000, 1000, 1, 1000),
            (61_234, 60_000, 60_000, 1, 58_766),
            (
                1_700_000_000_123,
                86_400_000,
                1_699_920_000_000,
                19_675,
                6_399_877,
            ),
            (5, 0, 5, 5, 1),
        ];
        for (now, period, start, index, reset) in cases {
            assert_eq!(window_start(now, period), start, "start {now} {period}");
            assert_eq!(window_index(now, period), index, "index {now} {period}");
            assert_eq!(reset_after_ms(now, period), reset, "reset {now} {period}");
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        for (ms, secs) in [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (59_500, 60)] {
            assert_eq!(retry_after_secs(ms), secs, "{ms}");
        }
    }

    #[test]
    fn reset_duration_uses_go_duration_text() {
        let cases = [
            (0, "0s"),
            (7, "7ms"),
            (999, "999ms"),
            (1000, "1s"),
            (1500, "1.5s"),
            (1040, "1.04s"),
            (1001, "1.001s"),
            (59_500, "59.5s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (61_001, "1m1.001s"),
            (3_600_000, "1h0m0s"),
            (3_723_004, "1h2m3.004s"),
            (86_400_000, "24h0m0s"),
        ];
        for (ms, want) in cases {
            assert_eq!(ResetDuration(ms).to_string(), want, "{ms}");
        }
    }

    #[test]
    fn headers_are_written_as_wire_lines() {
        let h = LimitHeaders {
            unit: Unit::Requests,
            limit: 60,
            remaining: 0,
            reset_ms: 59_500,
        };
        let mut out = String::new();
        assert!(h.write_to(&mut out).is_ok());
        assert!(h.write_retry_after(&mut out).is_ok());
        assert_eq!(
            out,
            "x-ratelimit-limit-requests: 60\r\nx-ratelimit-remaining-requests: 0\r\n\
             x-ratelimit-reset-requests: 59.5s\r\nretry-after: 60\r\n"
        );
        let t = LimitHeaders {
            unit: Unit::Tokens,
            limit: 20_000,
            remaining: 19_000,
            reset_ms: 6_000,
        };
        let mut out = String::new();
        assert!(t.write_to(&mut out).is_ok());
        assert_eq!(
            out,
            "x-ratelimit-limit-tokens: 20000\r\nx-ratelimit-remaining-tokens: 19000\r\n\
             x-ratelimit-reset-tokens: 6s\r\n"
        );
    }
}
