//! Size and duration values as written in the config file.
//!
//! The parse errors come out of the `Deserialize` impls so that toml attaches the value's span,
//! which is how a bad unit gets a line number.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Size units, longest first so that "KiB" is not read as "K" + "iB".
const SIZE_UNITS: &[(&str, u64)] = &[
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("b", 1),
];

/// Milliseconds per duration unit.
const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Splits "16KiB" / "16 KiB" into its number and its unit.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim_start()))
}

/// Parses a byte size: a plain integer, or an integer with B, KB, KiB, MB, MiB, GB, GiB, TB, TiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size {s:?}: expected bytes as an integer or an integer with a unit \
             (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB), e.g. \"16KiB\""
        )
    };
    let (n, unit) = split_number(s).ok_or_else(bad)?;
    let mult = if unit.is_empty() {
        1
    } else {
        // Case does not change the meaning of a byte unit, so "16kib" is accepted.
        let unit = unit.to_ascii_lowercase();
        SIZE_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration: a plain integer (seconds), or an integer with ms, s, m, h or d.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration {s:?}: expected seconds as an integer or an integer with a unit \
             (ms, s, m, h, d), e.g. \"250ms\" or \"10s\""
        )
    };
    let (n, unit) = split_number(s).ok_or_else(bad)?;
    // Units stay case-sensitive: "M" could as well mean months as minutes.
    let ms_per = if unit.is_empty() {
        1_000
    } else {
        DURATION_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// A byte size read from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"16KiB\" or an integer number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration read from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"10s\" or an integer number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Ok(Dur(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                u64::try_from(v)
                    .map(|s| Dur(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("duration must not be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `server.workers`: a count, or "auto".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workers {
    Auto,
    Count(u64),
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a number of workers")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Workers, E> {
                Ok(Workers::Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Workers, E> {
                u64::try_from(v)
                    .map(Workers::Count)
                    .map_err(|_| E::custom(format!("workers must not be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Workers, E> {
                match v {
                    "auto" => Ok(Workers::Auto),
                    _ => Err(E::custom(format!(
                        "expected \"auto\" or an integer, got {v:?}"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every size form, and what it is worth in bytes.
    #[test]
    fn sizes() {
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("512", 512),
            ("512B", 512),
            ("1KiB", 1024),
            ("16KiB", 16 * 1024),
            ("16 KiB", 16 * 1024),
            ("16kib", 16 * 1024),
            ("64KB", 64_000),
            ("1MiB", 1 << 20),
            ("2MB", 2_000_000),
            ("1GiB", 1 << 30),
            ("3GB", 3_000_000_000),
            ("1TiB", 1 << 40),
            ("1TB", 1_000_000_000_000),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(*want), "{s}");
        }
        let bad = [
            "",
            "KiB",
            "16XB",
            "16 KiBs",
            "1.5MiB",
            "-1",
            "16K",
            "abc",
            "99999999999TiB",
        ];
        for s in bad {
            assert!(parse_size(s).is_err(), "{s} should be rejected");
        }
    }

    // Every duration form, and what it is worth.
    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("10", Duration::from_secs(10)),
            ("250ms", Duration::from_millis(250)),
            ("10s", Duration::from_secs(10)),
            ("1m", Duration::from_secs(60)),
            ("2h", Duration::from_secs(7200)),
            ("1d", Duration::from_secs(86_400)),
            (" 5 s ", Duration::from_secs(5)),
        ];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(*want), "{s}");
        }
        let bad = [
            "",
            "s",
            "5 minutes",
            "1.5s",
            "10S",
            "5M",
            "-3s",
            "1w",
            "18446744073709551615d",
        ];
        for s in bad {
            assert!(parse_duration(s).is_err(), "{s} should be rejected");
        }
    }
}
