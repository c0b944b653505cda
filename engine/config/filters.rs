//! Checks for `[[filters]]`: which keys fit which kind, limit keys and rules.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use super::raw::{RawFilter, RawKind, RawRule, S};
use super::types::*;
use super::validate::{is_token, Ck};
use ringway_filters::{limit::window, price};

/// Resolves every filter; `have_redis` decides whether `scope = "cluster"` is allowed.
pub(crate) fn filters(ck: &mut Ck, raw: &[RawFilter], have_redis: bool) -> Vec<FilterConf> {
    let mut names = HashMap::new();
    let mut out = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        ck.unique(&mut names, "filter", &format!("filters[{i}].name"), &f.name);
        let kind = *f.kind.get_ref();
        reject_foreign_keys(ck, i, f, kind);
        let kind = match kind {
            RawKind::KeyAuth => FilterKind::KeyAuth(KeyAuthConf {
                query_param: f.query_param.as_ref().map(|q| {
                    if q.get_ref().is_empty() {
                        ck.err(
                            format!("filters[{i}].query_param"),
                            q.span(),
                            "must not be empty",
                        );
                    }
                    q.get_ref().clone()
                }),
            }),
            RawKind::RateLimit => FilterKind::RateLimit(limit(ck, i, f, kind, have_redis)),
            RawKind::TokenLimit => FilterKind::TokenLimit(limit(ck, i, f, kind, have_redis)),
            RawKind::CostLimit => FilterKind::CostLimit(limit(ck, i, f, kind, have_redis)),
            RawKind::AiStats => FilterKind::AiStats(AiStatsConf {}),
        };
        out.push(FilterConf {
            name: f.name.get_ref().clone(),
            kind,
        });
    }
    out
}

/// The keys each kind accepts, beyond `name` and `kind`; anything else set is reported.
fn reject_foreign_keys(ck: &mut Ck, i: usize, f: &RawFilter, kind: RawKind) {
    let limit = matches!(
        kind,
        RawKind::RateLimit | RawKind::TokenLimit | RawKind::CostLimit
    );
    let cost = kind == RawKind::CostLimit;
    let set: [(&str, Option<std::ops::Range<usize>>, bool); 11] = [
        (
            "query_param",
            f.query_param.as_ref().map(S::span),
            kind == RawKind::KeyAuth,
        ),
        ("scope", f.scope.as_ref().map(S::span), limit),
        ("key", f.key.as_ref().map(S::span), limit),
        ("rules", f.rules.as_ref().map(S::span), limit),
        ("failure_mode", f.failure_mode.as_ref().map(S::span), limit),
        ("replicas", f.replicas.as_ref().map(S::span), limit),
        ("shadow", f.shadow.as_ref().map(S::span), limit),
        ("max_keys", f.max_keys.as_ref().map(S::span), limit),
        (
            "max_reserve",
            f.max_reserve.as_ref().map(S::span),
            kind == RawKind::TokenLimit,
        ),
        ("unpriced", f.unpriced.as_ref().map(S::span), cost),
        (
            "max_output_reserve",
            f.max_output_reserve.as_ref().map(S::span),
            cost,
        ),
    ];
    for (key, span, allowed) in set {
        if let (Some(span), false) = (span, allowed) {
            ck.err(
                format!("filters[{i}].{key}"),
                span,
                format!("{key} does not apply to kind = \"{}\"", kind.as_str()),
            );
        }
    }
}

fn limit(ck: &mut Ck, i: usize, f: &RawFilter, kind: RawKind, have_redis: bool) -> LimitConf {
    let k = |field: &str| format!("filters[{i}].{field}");
    let scope = f.scope.as_ref().map_or(Scope::Local, |s| *s.get_ref());
    if let (Some(s), Scope::Cluster, false) = (&f.scope, scope, have_redis) {
        ck.err(
            k("scope"),
            s.span(),
            "scope = \"cluster\" needs Redis: add a [redis] section with url = \"redis://…\" \
             or cluster_nodes = [\"redis://…\", …], or use scope = \"local\"",
        );
    }
    let key = match &f.key {
        None => {
            ck.err(
                k("key"),
                f.name.span(),
                format!(
                    "a {} filter needs key = \"consumer\" | \"ip\" | \"header:NAME\" | \
                     \"query:NAME\" | \"cookie:NAME\" | \"route\" | \"global\"",
                    kind.as_str()
                ),
            );
            KeySource::Global
        }
        Some(s) => key_source(s.get_ref()).unwrap_or_else(|m| {
            ck.err(k("key"), s.span(), m);
            KeySource::Global
        }),
    };
    let mut rules = Vec::new();
    match &f.rules {
        None => ck.err(
            k("rules"),
            f.name.span(),
            format!(
                "a {} filter needs rules = [ {{ match = \"*\", … }} ]",
                kind.as_str()
            ),
        ),
        Some(rs) if rs.get_ref().is_empty() => {
            ck.err(k("rules"), rs.span(), "needs at least one rule")
        }
        Some(rs) => {
            for (j, r) in rs.get_ref().iter().enumerate() {
                rules.push(rule(ck, &format!("filters[{i}].rules[{j}]"), r, kind, &key));
            }
        }
    }
    let positive = |ck: &mut Ck, field: &str, v: Option<u64>, span| match (v, span) {
        (Some(0), Some(span)) => {
            ck.err(k(field), span, "must be at least 1");
            0
        }
        (v, _) => v.unwrap_or(0),
    };
    let replicas = f.replicas.as_ref().map_or(1, |r| *r.get_ref());
    positive(
        ck,
        "replicas",
        Some(u64::from(replicas)),
        f.replicas.as_ref().map(S::span),
    );
    let max_keys = f.max_keys.as_ref().map_or(100_000, |r| *r.get_ref());
    positive(
        ck,
        "max_keys",
        Some(max_keys),
        f.max_keys.as_ref().map(S::span),
    );
    let max_reserve = f.max_reserve.as_ref().map(|r| *r.get_ref());
    positive(
        ck,
        "max_reserve",
        max_reserve,
        f.max_reserve.as_ref().map(S::span),
    );
    let unpriced = match f
        .unpriced
        .as_ref()
        .map(|u| (u.get_ref().as_str(), u.span()))
    {
        None | Some(("reject", _)) => Unpriced::Reject,
        Some(("allow", _)) => Unpriced::Allow,
        Some((other, span)) => {
            ck.err(
                k("unpriced"),
                span,
                format!("expected \"reject\" or \"allow\", got {other:?}"),
            );
            Unpriced::Reject
        }
    };
    let max_output_reserve = f.max_output_reserve.as_ref().map_or(4096, |r| *r.get_ref());
    positive(
        ck,
        "max_output_reserve",
        Some(max_output_reserve),
        f.max_output_reserve.as_ref().map(S::span),
    );
    LimitConf {
        unpriced,
        max_output_reserve,
        scope,
        key,
        rules,
        failure_mode: f
            .failure_mode
            .as_ref()
            .map_or(FailureMode::Local, |m| *m.get_ref()),
        replicas,
        shadow: f.shadow.as_ref().is_some_and(|s| *s.get_ref()),
        max_keys: usize::try_from(max_keys).unwrap_or(usize::MAX),
        max_reserve,
    }
}

fn key_source(v: &str) -> Result<KeySource, String> {
    let named = |prefix: &str| v.strip_prefix(prefix).filter(|n| is_token(n));
    Ok(match v {
        "consumer" => KeySource::Consumer,
        "ip" => KeySource::Ip,
        "route" => KeySource::Route,
        "global" => KeySource::Global,
        "client_cert" => KeySource::ClientCert,
        _ => {
            if let Some(n) = named("header:") {
                KeySource::Header(n.to_ascii_lowercase())
            } else if let Some(n) = named("query:") {
                KeySource::Query(n.to_string())
            } else if let Some(n) = named("cookie:") {
                KeySource::Cookie(n.to_string())
            } else {
                return Err(format!(
                    "expected \"consumer\", \"ip\", \"header:NAME\", \"query:NAME\", \
                     \"cookie:NAME\", \"route\", \"global\" or \"client_cert\", got {v:?}"
                ));
            }
        }
    })
}

fn rule(ck: &mut Ck, rk: &str, r: &S<RawRule>, kind: RawKind, key: &KeySource) -> LimitRule {
    let raw = r.get_ref();
    let matcher = rule_match(raw.matcher.get_ref(), key).unwrap_or_else(|m| {
        ck.err(format!("{rk}.match"), raw.matcher.span(), m);
        RuleMatch::Any
    });
    let usd = [
        ("usd_per_minute", &raw.usd_per_minute, 60_000),
        ("usd_per_hour", &raw.usd_per_hour, 3_600_000),
        ("usd_per_day", &raw.usd_per_day, 86_400_000),
        ("usd_per_month", &raw.usd_per_month, window::MONTH),
    ];
    let usd_family = "usd_per_minute|hour|day|month";
    if kind == RawKind::CostLimit {
        return cost_rule(ck, rk, r, matcher, usd, usd_family);
    }
    for (name, v, _) in usd {
        if let Some(v) = v {
            ck.err(
                format!("{rk}.{name}"),
                v.span(),
                format!("{name} does not apply to a {} filter", kind.as_str()),
            );
        }
    }
    let requests = [
        ("requests_per_second", &raw.requests_per_second, 1),
        ("requests_per_minute", &raw.requests_per_minute, 60),
        ("requests_per_hour", &raw.requests_per_hour, 3600),
        ("requests_per_day", &raw.requests_per_day, 86_400),
    ];
    let tokens = [
        ("tokens_per_second", &raw.tokens_per_second, 1),
        ("tokens_per_minute", &raw.tokens_per_minute, 60),
        ("tokens_per_hour", &raw.tokens_per_hour, 3600),
        ("tokens_per_day", &raw.tokens_per_day, 86_400),
    ];
    let (mine, theirs, family) = if kind == RawKind::TokenLimit {
        (tokens, requests, "tokens_per_second|minute|hour|day")
    } else {
        (requests, tokens, "requests_per_second|minute|hour|day")
    };
    let mut wrong_family = false;
    for (name, v, _) in theirs {
        if let Some(v) = v {
            wrong_family = true;
            ck.err(
                format!("{rk}.{name}"),
                v.span(),
                format!(
                    "{name} does not apply to a {} filter, whose rules use {family}",
                    kind.as_str()
                ),
            );
        }
    }
    let windows: Vec<Window> = mine
        .iter()
        .filter_map(|(_, v, secs)| {
            v.as_ref().map(|v| Window {
                period: Duration::from_secs(*secs),
                limit: *v.get_ref(),
            })
        })
        .collect();
    // A rule written in the other family already has its error; one is enough.
    if windows.is_empty() && !wrong_family {
        ck.err(
            rk,
            r.span(),
            format!("a rule needs at least one of {family}"),
        );
    }
    LimitRule { matcher, windows }
}

/// A `cost-limit` rule: budgets in dollars, kept in micro-dollars (exact to six decimals).
fn cost_rule(
    ck: &mut Ck,
    rk: &str,
    r: &S<RawRule>,
    matcher: RuleMatch,
    usd: [(&str, &Option<S<f64>>, u64); 4],
    family: &str,
) -> LimitRule {
    let raw = r.get_ref();
    let others = [
        ("requests_per_second", &raw.requests_per_second),
        ("requests_per_minute", &raw.requests_per_minute),
        ("requests_per_hour", &raw.requests_per_hour),
        ("requests_per_day", &raw.requests_per_day),
        ("tokens_per_second", &raw.tokens_per_second),
        ("tokens_per_minute", &raw.tokens_per_minute),
        ("tokens_per_hour", &raw.tokens_per_hour),
        ("tokens_per_day", &raw.tokens_per_day),
    ];
    let mut wrong_family = false;
    for (name, v) in others {
        if let Some(v) = v {
            wrong_family = true;
            ck.err(
                format!("{rk}.{name}"),
                v.span(),
                format!("{name} does not apply to a cost-limit filter, whose rules use {family}"),
            );
        }
    }
    let mut windows = Vec::new();
    for (name, v, period_ms) in usd {
        let Some(v) = v else { continue };
        match micro_usd(*v.get_ref()) {
            Ok(limit) => windows.push(Window {
                period: Duration::from_millis(period_ms),
                limit,
            }),
            Err(m) => ck.err(format!("{rk}.{name}"), v.span(), m),
        }
    }
    if windows.is_empty() && !wrong_family && usd.iter().all(|(_, v, _)| v.is_none()) {
        ck.err(
            rk,
            r.span(),
            format!("a rule needs at least one of {family}"),
        );
    }
    LimitRule { matcher, windows }
}

/// Dollars as written to micro-dollars, exactly: negative amounts and more than six decimals
/// are errors.
pub(crate) fn micro_usd(v: f64) -> Result<u64, String> {
    if !v.is_finite() {
        return Err("must be a finite number".to_string());
    }
    price::parse_millionths(&price::float_text(v))
}

/// Reads a rule's `match`; CIDR is only understood when the limit is keyed by IP.
fn rule_match(v: &str, key: &KeySource) -> Result<RuleMatch, String> {
    if v == "*" {
        return Ok(RuleMatch::Any);
    }
    if let Some(re) = v.strip_prefix("regex:") {
        if re.is_empty() {
            return Err("\"regex:\" needs a pattern after it".to_string());
        }
        return Ok(RuleMatch::Regex(re.to_string()));
    }
    if *key == KeySource::Ip {
        if let Some((a, p)) = v.split_once('/') {
            if let Ok(addr) = a.parse::<IpAddr>() {
                let max = if addr.is_ipv4() { 32 } else { 128 };
                return match p.parse::<u8>() {
                    Ok(prefix) if prefix <= max => Ok(RuleMatch::Cidr { addr, prefix }),
                    _ => Err(format!("{v:?}: prefix length must be 0 to {max}")),
                };
            }
        }
    }
    match v.find('*') {
        Some(i) if i + 1 == v.len() => Ok(RuleMatch::Prefix(v[..i].to_string())),
        Some(_) => Err(format!(
            "{v:?}: '*' is only allowed at the end; use \"regex:…\" for other patterns"
        )),
        None if v.is_empty() => Err("must not be empty; use \"*\" to match every value".into()),
        None => Ok(RuleMatch::Exact(v.to_string())),
    }
}
