//! Clock-aligned fixed windows and the headers that describe them.
//!
//! A window of `period_ms` starts at every multiple of `period_ms` since the Unix epoch
//! (`floor(now / period)`), so every core and every replica agrees on window boundaries without
//! talking to each other. A `period_ms` of 0 is treated as 1 (rules reject 0; this only keeps the
//! arithmetic total).

use std::fmt;

/// The period of a calendar-month window (UTC). Not a length: months are 28 to 31 days, so no
/// fixed period stands for them; every window function here recognises this marker. Windows of
/// it start at 00:00:00 UTC on the first of each month, and are numbered by months since
/// January 1970.
pub const MONTH: u64 = u64::MAX;

const DAY_MS: u64 = 86_400_000;

/// The start (Unix ms) of the window containing `now_ms`.
pub fn window_start(now_ms: u64, period_ms: u64) -> u64 {
    if period_ms == MONTH {
        return month_start(month_index(now_ms));
    }
    let period = period_ms.max(1);
    now_ms - now_ms % period
}

/// The index of the window containing `now_ms` (`floor(now / period)`; months since January
/// 1970 for [`MONTH`]).
pub fn window_index(now_ms: u64, period_ms: u64) -> u64 {
    if period_ms == MONTH {
        return month_index(now_ms);
    }
    now_ms / period_ms.max(1)
}

/// The start (Unix ms) of window number `index`.
pub fn index_start(index: u64, period_ms: u64) -> u64 {
    if period_ms == MONTH {
        return month_start(index);
    }
    index.saturating_mul(period_ms.max(1))
}

/// The end (Unix ms, exclusive) of the window that starts at or contains `at_ms`.
pub fn window_end(at_ms: u64, period_ms: u64) -> u64 {
    if period_ms == MONTH {
        return month_start(month_index(at_ms) + 1);
    }
    window_start(at_ms, period_ms).saturating_add(period_ms.max(1))
}

/// Milliseconds from `now_ms` until the window containing it ends; always in `1..=period_ms`.
pub fn reset_after_ms(now_ms: u64, period_ms: u64) -> u64 {
    window_end(now_ms, period_ms) - now_ms
}

/// Milliseconds from `now_ms` until the end of the window after the one containing it (for a
/// counter another clock already moved into the next window).
pub fn reset_after_next_ms(now_ms: u64, period_ms: u64) -> u64 {
    let end = window_end(now_ms, period_ms);
    window_end(end, period_ms) - now_ms
}

/// Months since January 1970 of the UTC date containing `ms`.
fn month_index(ms: u64) -> u64 {
    let (y, m, _) = civil_from_days(ms / DAY_MS);
    (y - 1970) * 12 + (m - 1)
}

/// Unix ms of 00:00 UTC on the first day of month `index` (months since January 1970).
fn month_start(index: u64) -> u64 {
    let (y, m) = (1970 + index / 12, index % 12 + 1);
    days_from_civil(y, m, 1).saturating_mul(DAY_MS)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm, for dates
/// from 1970 on).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// The (year, month, day) of `days` since 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The ISO 8601 text (`2026-12-05T00:00:00Z`) of Unix ms `ms`, to the second.
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days(secs / 86_400);
    let t = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
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
        self.write_to(f)
    }
}

impl ResetDuration {
    /// Writes the duration; numbers through `itoa`, since every limited route formats one per
    /// response.
    fn write_to(&self, f: &mut impl fmt::Write) -> fmt::Result {
        let ms = self.0;
        if ms == 0 {
            return f.write_str("0s");
        }
        let mut n = itoa::Buffer::new();
        if ms < 1000 {
            f.write_str(n.format(ms))?;
            return f.write_str("ms");
        }
        let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        if h > 0 {
            f.write_str(n.format(h))?;
            f.write_str("h")?;
        }
        if h > 0 || m > 0 {
            f.write_str(n.format(m))?;
            f.write_str("m")?;
        }
        f.write_str(n.format(s))?;
        if frac > 0 {
            // Three digits, then drop trailing zeros: 500 → ".5", 040 → ".04".
            let digits = n.format(frac);
            f.write_str(&".00"[..4 - digits.len()])?;
            f.write_str(digits.trim_end_matches('0'))?;
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
    /// `cost-limit` filters: `x-ratelimit-*-usd`, counted in micro-dollars, written in dollars.
    Usd,
}

impl Unit {
    /// `x-ratelimit-limit-requests` or `x-ratelimit-limit-tokens`.
    pub fn limit_header(self) -> &'static str {
        match self {
            Unit::Requests => "x-ratelimit-limit-requests",
            Unit::Tokens => "x-ratelimit-limit-tokens",
            Unit::Usd => "x-ratelimit-limit-usd",
        }
    }

    /// `x-ratelimit-remaining-requests` or `x-ratelimit-remaining-tokens`.
    pub fn remaining_header(self) -> &'static str {
        match self {
            Unit::Requests => "x-ratelimit-remaining-requests",
            Unit::Tokens => "x-ratelimit-remaining-tokens",
            Unit::Usd => "x-ratelimit-remaining-usd",
        }
    }

    /// `x-ratelimit-reset-requests` or `x-ratelimit-reset-tokens`.
    pub fn reset_header(self) -> &'static str {
        match self {
            Unit::Requests => "x-ratelimit-reset-requests",
            Unit::Tokens => "x-ratelimit-reset-tokens",
            Unit::Usd => "x-ratelimit-reset-usd",
        }
    }
}

/// Micro-dollars written as dollars with six decimals (`4250000` → `4.250000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usd(pub u64);

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

impl Usd {
    /// Writes dollars with six decimals, without `core::fmt`.
    fn write_to(&self, f: &mut impl fmt::Write) -> fmt::Result {
        let mut n = itoa::Buffer::new();
        f.write_str(n.format(self.0 / 1_000_000))?;
        let frac = n.format(self.0 % 1_000_000);
        f.write_str(&".000000"[..7 - frac.len()])?;
        f.write_str(frac)
    }
}

/// Room for the three limit lines: the longest name is 30 bytes, a value at most 20 digits
/// (a `u64`, or dollars with six decimals), a reset about 20 characters.
const LINES_CAP: usize = 192;

/// The limit header lines of one [`LimitHeaders`] (see [`LimitHeaders::lines`]).
pub struct HeaderLines(StackLines);

impl HeaderLines {
    /// The lines, each `name: value\r\n`.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// ASCII text built on the stack; a write past its room fails (`fmt::Error`).
struct StackLines {
    buf: [u8; LINES_CAP],
    len: usize,
}

impl Default for StackLines {
    fn default() -> Self {
        Self {
            buf: [0; LINES_CAP],
            len: 0,
        }
    }
}

impl StackLines {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn as_str(&self) -> &str {
        // Only `&str`s are ever copied in, whole.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl fmt::Write for StackLines {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
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
    ///
    /// The lines are put together on the stack and handed to `out` in one write: `out` is
    /// usually a growable header list, and some twenty small writes cost more than the
    /// formatting itself (every limited request writes these).
    pub fn write_to(&self, out: &mut impl fmt::Write) -> fmt::Result {
        out.write_str(self.lines()?.0.as_str())
    }

    /// The three header lines of [`write_to`](Self::write_to), as ASCII bytes: for a sink
    /// that takes bytes, with no check that they are text (they are built from `&str`s).
    pub fn lines(&self) -> Result<HeaderLines, fmt::Error> {
        use fmt::Write as _;
        let mut lines = StackLines::default();
        let mut n = itoa::Buffer::new();
        for (name, value) in [
            (self.unit.limit_header(), self.limit),
            (self.unit.remaining_header(), self.remaining),
        ] {
            lines.write_str(name)?;
            lines.write_str(": ")?;
            if self.unit == Unit::Usd {
                Usd(value).write_to(&mut lines)?;
            } else {
                lines.write_str(n.format(value))?;
            }
            lines.write_str("\r\n")?;
        }
        lines.write_str(self.unit.reset_header())?;
        lines.write_str(": ")?;
        ResetDuration(self.reset_ms).write_to(&mut lines)?;
        lines.write_str("\r\n")?;
        Ok(HeaderLines(lines))
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

    /// Unix ms of a UTC date and time.
    fn at(y: u64, m: u64, d: u64, hh: u64, mm: u64, ss: u64) -> u64 {
        (days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss) * 1000
    }

    #[test]
    fn month_windows_follow_the_utc_calendar() {
        // December to January: the last millisecond of 2026 is in December's window.
        let dec = at(2026, 12, 31, 23, 59, 59) + 999;
        let jan = at(2027, 1, 1, 0, 0, 0);
        assert_eq!(window_start(dec, MONTH), at(2026, 12, 1, 0, 0, 0));
        assert_eq!(reset_after_ms(dec, MONTH), 1);
        assert_eq!(window_start(jan, MONTH), jan);
        assert_eq!(window_index(jan, MONTH), window_index(dec, MONTH) + 1);
        assert_eq!(reset_after_ms(jan, MONTH), 31 * 86_400_000);
        // February in a leap year has 29 days, in a common year 28.
        let feb_leap = at(2028, 2, 10, 12, 0, 0);
        assert_eq!(window_start(feb_leap, MONTH), at(2028, 2, 1, 0, 0, 0));
        assert_eq!(window_end(feb_leap, MONTH), at(2028, 3, 1, 0, 0, 0));
        assert_eq!(
            window_end(feb_leap, MONTH) - window_start(feb_leap, MONTH),
            29 * 86_400_000
        );
        let feb = at(2027, 2, 28, 23, 0, 0);
        assert_eq!(window_end(feb, MONTH), at(2027, 3, 1, 0, 0, 0));
        assert_eq!(reset_after_ms(feb, MONTH), 3_600_000);
        // 2100 is not a leap year.
        assert_eq!(
            window_end(at(2100, 2, 1, 0, 0, 0), MONTH),
            at(2100, 3, 1, 0, 0, 0)
        );
        assert_eq!(
            at(2100, 3, 1, 0, 0, 0) - at(2100, 2, 1, 0, 0, 0),
            28 * 86_400_000
        );
        // Index and start agree, and the window after the next one is a month further.
        let i = window_index(feb_leap, MONTH);
        assert_eq!(index_start(i, MONTH), window_start(feb_leap, MONTH));
        assert_eq!(
            reset_after_next_ms(dec, MONTH),
            1 + 31 * 86_400_000,
            "December's last ms, then all of January"
        );
        assert_eq!(window_index(0, MONTH), 0);
        assert_eq!(window_start(at(1970, 1, 15, 0, 0, 0), MONTH), 0);
        assert_eq!(iso8601(at(2026, 12, 5, 0, 0, 0)), "2026-12-05T00:00:00Z");
        assert_eq!(iso8601(feb_leap), "2028-02-10T12:00:00Z");
    }

    #[test]
    fn fixed_windows_end_and_restart() {
        assert_eq!(window_end(61_234, 60_000), 120_000);
        assert_eq!(index_start(2, 60_000), 120_000);
        assert_eq!(reset_after_next_ms(61_234, 60_000), 118_766);
    }

    #[test]
    fn dollars_have_six_decimals() {
        assert_eq!(Usd(4_250_000).to_string(), "4.250000");
        assert_eq!(Usd(0).to_string(), "0.000000");
        assert_eq!(Usd(1).to_string(), "0.000001");
        let h = LimitHeaders {
            unit: Unit::Usd,
            limit: 5_000_000,
            remaining: 4_250_000,
            reset_ms: 1500,
        };
        let mut out = String::new();
        assert!(h.write_to(&mut out).is_ok());
        assert_eq!(
            out,
            "x-ratelimit-limit-usd: 5.000000\r\nx-ratelimit-remaining-usd: 4.250000\r\n\
             x-ratelimit-reset-usd: 1.5s\r\n"
        );
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

    /// The largest values of every unit still fit the lines' stack room.
    #[test]
    fn the_longest_lines_fit() {
        for unit in [Unit::Requests, Unit::Tokens, Unit::Usd] {
            let h = LimitHeaders {
                unit,
                limit: u64::MAX,
                remaining: u64::MAX,
                reset_ms: u64::MAX - 1,
            };
            let mut out = String::new();
            assert!(h.write_to(&mut out).is_ok(), "{unit:?}");
            assert_eq!(out.matches("\r\n").count(), 3, "{out}");
            assert!(out.contains(&format!("{}", u64::MAX / 1_000_000)) || unit != Unit::Usd);
        }
    }
}
