//! Which rule of a limit filter applies to a key value.
//!
//! Rules are tried in configuration order and the first match wins. Exact rules count all
//! requests for that value on one counter; `*`, prefix, regex and CIDR rules give each distinct
//! value its own counter ([`RuleHit::per_value`]).

use std::net::IpAddr;

use regex::bytes::{Regex, RegexBuilder};

/// Upper bound on one compiled `regex:` rule, so a configuration cannot make the matcher grow
/// without bound (the regex crate's default is 10 MiB per regex).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How a rule matches a key value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The value equals this string byte for byte. All requests with it share one counter.
    Exact(String),
    /// The value starts with this string (`"prefix*"` in the configuration).
    Prefix(String),
    /// Any value (`"*"`).
    Any,
    /// The value matches this regular expression (`"regex:…"`), unanchored: write `^…$` to match
    /// the whole value.
    Regex(String),
    /// The client address lies in `addr/prefix` (only for `key = "ip"`). IPv4-mapped IPv6 client
    /// addresses (`::ffff:a.b.c.d`) match IPv4 networks.
    Cidr {
        /// The network address; host bits are ignored.
        addr: IpAddr,
        /// The prefix length: at most 32 for IPv4, 128 for IPv6.
        prefix: u8,
    },
}

impl Match {
    /// Parses a configuration `match` string: `"*"`, `"prefix*"`, `"regex:…"`, for `key = "ip"`
    /// a CIDR (`"10.0.0.0/8"`) or an address (kept as an exact match on its canonical text), else
    /// an exact value.
    pub fn parse(s: &str, key_is_ip: bool) -> Result<Match, String> {
        if s == "*" {
            return Ok(Match::Any);
        }
        if let Some(re) = s.strip_prefix("regex:") {
            return Ok(Match::Regex(re.to_string()));
        }
        if let Some(prefix) = s.strip_suffix('*') {
            return Ok(Match::Prefix(prefix.to_string()));
        }
        if key_is_ip {
            if let Some((addr, len)) = s.split_once('/') {
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("invalid CIDR address in {s:?}"))?;
                let prefix: u8 = len
                    .parse()
                    .map_err(|_| format!("invalid CIDR prefix in {s:?}"))?;
                return Ok(Match::Cidr { addr, prefix });
            }
            if let Ok(addr) = s.parse::<IpAddr>() {
                return Ok(Match::Exact(addr.to_canonical().to_string()));
            }
        }
        Ok(Match::Exact(s.to_string()))
    }
}

/// One configured rule: how it matches, and its windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// How the rule matches the key value.
    pub matcher: Match,
    /// `(period_ms, limit)` pairs, all enforced (e.g. per minute and per day). Empty means the
    /// matched values are not limited: an exemption rule placed before a broader one.
    pub windows: Vec<(u64, u64)>,
}

/// The rule a value matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleHit {
    /// Index of the rule in configuration order.
    pub rule: usize,
    /// True when each distinct value gets its own counter (`*`, prefix, regex, CIDR); false for an
    /// exact rule, whose single counter the engine may name by the rule instead of the value.
    pub per_value: bool,
}

#[derive(Debug)]
enum Compiled {
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Any,
    Regex(Regex),
    Cidr { net: u128, mask: u128, v4: bool },
}

/// The rules of one filter, compiled once per configuration.
#[derive(Debug)]
pub struct RuleMatcher {
    rules: Vec<(Compiled, Vec<(u64, u64)>)>,
}

impl RuleMatcher {
    /// Compiles the rules. Errors (the engine reports them as configuration errors, naming the
    /// rule) for an invalid or oversized regex, a CIDR prefix longer than its address, and a window
    /// with `period_ms = 0`.
    pub fn new(rules: impl IntoIterator<Item = Rule>) -> Result<Self, String> {
        let mut out = Vec::new();
        for (i, rule) in rules.into_iter().enumerate() {
            if rule.windows.iter().any(|&(period, _)| period == 0) {
                return Err(format!(
                    "rule {i}: a window period must be greater than zero"
                ));
            }
            let compiled = match rule.matcher {
                Match::Exact(s) => Compiled::Exact(s.into_bytes().into_boxed_slice()),
                Match::Prefix(s) => Compiled::Prefix(s.into_bytes().into_boxed_slice()),
                Match::Any => Compiled::Any,
                Match::Regex(re) => Compiled::Regex(
                    RegexBuilder::new(&re)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .map_err(|e| format!("rule {i}: invalid regex {re:?}: {e}"))?,
                ),
                Match::Cidr { addr, prefix } => {
                    let (bits, v4) = ip_bits(addr);
                    let width = if v4 { 32 } else { 128 };
                    if u32::from(prefix) > width {
                        return Err(format!(
                            "rule {i}: CIDR prefix /{prefix} is longer than {width} bits"
                        ));
                    }
                    let mask = prefix_mask(prefix, v4);
                    Compiled::Cidr {
                        net: bits & mask,
                        mask,
                        v4,
                    }
                }
            };
            out.push((compiled, rule.windows));
        }
        Ok(RuleMatcher { rules: out })
    }

    /// The first rule matching `value` (and, for CIDR rules, `ip`: the client address when
    /// `key = "ip"`, else `None`, which no CIDR rule matches).
    pub fn find(&self, value: &[u8], ip: Option<IpAddr>) -> Option<RuleHit> {
        let ip = ip.map(|ip| ip_bits(ip.to_canonical()));
        self.rules.iter().enumerate().find_map(|(rule, (m, _))| {
            let (hit, per_value) = match m {
                Compiled::Exact(e) => (**e == *value, false),
                Compiled::Prefix(p) => (value.starts_with(p), true),
                Compiled::Any => (true, true),
                Compiled::Regex(re) => (re.is_match(value), true),
                Compiled::Cidr { net, mask, v4 } => (
                    ip.is_some_and(|(bits, is_v4)| is_v4 == *v4 && bits & mask == *net),
                    true,
                ),
            };
            hit.then_some(RuleHit { rule, per_value })
        })
    }

    /// The `(period_ms, limit)` windows of rule `rule`; empty for an index out of range.
    pub fn windows(&self, rule: usize) -> &[(u64, u64)] {
        self.rules.get(rule).map_or(&[], |(_, w)| w.as_slice())
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when there are no rules (nothing is limited).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The address as a right-aligned integer and whether it is IPv4.
fn ip_bits(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), true),
        IpAddr::V6(v6) => (u128::from(v6), false),
    }
}

fn prefix_mask(prefix: u8, v4: bool) -> u128 {
    let width = if v4 { 32 } else { 128 };
    let host = width - u32::from(prefix);
    let all = if v4 { u128::from(u32::MAX) } else { u128::MAX };
    // checked_shl: a /0 shifts by the full width, which plain << rejects.
    all.checked_shl(host).unwrap_or(0) & all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(specs: &[(&str, bool)]) -> RuleMatcher {
        let rules = specs.iter().map(|(s, ip)| Rule {
            matcher: Match::parse(s, *ip).unwrap_or(Match::Any),
            windows: vec![(60_000, 10)],
        });
        match RuleMatcher::new(rules) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn parse_reads_every_configuration_form() {
        let cases: &[(&str, bool, Match)] = &[
            ("*", false, Match::Any),
            ("gpt-4o*", false, Match::Prefix("gpt-4o".into())),
            (
                "regex:^sk-[a-z]+$",
                false,
                Match::Regex("^sk-[a-z]+$".into()),
            ),
            ("alice", false, Match::Exact("alice".into())),
            ("10.0.0.0/8", false, Match::Exact("10.0.0.0/8".into())),
            (
                "10.0.0.0/8",
                true,
                Match::Cidr {
                    addr: [10, 0, 0, 0].into(),
                    prefix: 8,
                },
            ),
            ("::ffff:1.2.3.4", true, Match::Exact("1.2.3.4".into())),
        ];
        for (s, is_ip, want) in cases {
            assert_eq!(Match::parse(s, *is_ip).as_ref(), Ok(want), "{s}");
        }
        assert!(Match::parse("10.0.0.0/x", true).is_err());
        assert!(Match::parse("nope/8", true).is_err());
    }

    #[test]
    fn each_match_kind_and_first_match_wins() {
        let m = matcher(&[
            ("alice", false),
            ("regex:^team-[0-9]+$", false),
            ("team-*", false),
            ("*", false),
        ]);
        let cases: &[(&[u8], usize, bool)] = &[
            (b"alice", 0, false),
            (b"team-42", 1, true),
            (b"team-x", 2, true),
            (b"alicex", 3, true),
            (b"", 3, true),
        ];
        for (v, rule, per_value) in cases {
            assert_eq!(
                m.find(v, None),
                Some(RuleHit {
                    rule: *rule,
                    per_value: *per_value
                })
            );
        }
        let no_any = matcher(&[("alice", false), ("bob*", false)]);
        assert_eq!(no_any.find(b"carol", None), None);
        assert_eq!(no_any.windows(0), &[(60_000, 10)]);
        assert_eq!(no_any.windows(9), &[] as &[(u64, u64)]);
    }

    #[test]
    fn cidr_rules_match_v4_v6_and_mapped_addresses() {
        let m = matcher(&[
            ("10.1.0.0/16", true),
            ("2001:db8::/32", true),
            ("0.0.0.0/0", true),
        ]);
        let cases: &[(&str, Option<usize>)] = &[
            ("10.1.2.3", Some(0)),
            ("::ffff:10.1.2.3", Some(0)),
            ("10.2.0.1", Some(2)),
            ("2001:db8::1", Some(1)),
            ("2001:db9::1", None),
            ("::1", None),
        ];
        for (addr, want) in cases {
            assert_eq!(
                m.find(addr.as_bytes(), ip(addr)).map(|h| h.rule),
                *want,
                "{addr}"
            );
        }
        // Without a client address no CIDR rule matches.
        assert_eq!(m.find(b"10.1.2.3", None), None);
        let all6 = matcher(&[("::/0", true), ("1.2.3.4/32", true)]);
        assert_eq!(all6.find(b"", ip("fe80::1")).map(|h| h.rule), Some(0));
        assert_eq!(all6.find(b"", ip("1.2.3.4")).map(|h| h.rule), Some(1));
        assert_eq!(all6.find(b"", ip("1.2.3.5")), None);
    }

    #[test]
    fn invalid_rules_are_configuration_errors() {
        let bad = [
            Rule {
                matcher: Match::Regex("(unclosed".into()),
                windows: vec![],
            },
            Rule {
                matcher: Match::Regex("a{1000}{1000}".into()),
                windows: vec![],
            },
            Rule {
                matcher: Match::Cidr {
                    addr: [1, 2, 3, 4].into(),
                    prefix: 33,
                },
                windows: vec![],
            },
            Rule {
                matcher: Match::Any,
                windows: vec![(0, 5)],
            },
        ];
        for rule in bad {
            let shown = format!("{rule:?}");
            assert!(RuleMatcher::new([rule]).is_err(), "{shown}");
        }
    }
}
