//! Checks for a route's `request_headers` and `response_headers`: names are tokens, values fit
//! in one header line, and no rule touches a header that frames or routes the message.

use super::raw::{RawHeaderRules, S};
use super::toml_key;
use super::types::HeaderRules;
use super::validate::{is_token, Ck};

/// Hop-by-hop and framing headers: Ringway decides these itself on each leg (no header rule
/// and no provider key may name them).
pub(crate) const FRAMING: [&str; 9] = [
    "connection",
    "transfer-encoding",
    "content-length",
    "host",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-connection",
    "trailer",
];

/// Request headers Ringway writes itself; a rule on them would duplicate or lose them.
const WRITTEN_UPSTREAM: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-request-id"];

/// Which leg the rules are for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// `request_headers`.
    Request,
    /// `response_headers`.
    Response,
}

/// Resolves rules at `key` (`routes[i].request_headers`).
pub(crate) fn header_rules(
    ck: &mut Ck,
    key: &str,
    side: Side,
    raw: &Option<S<RawHeaderRules>>,
) -> HeaderRules {
    let Some(raw) = raw else {
        return HeaderRules::default();
    };
    let r = raw.get_ref();
    let mut out = HeaderRules::default();
    for (name, v) in &r.set.0 {
        let k = format!("{key}.set.{}", toml_key(name));
        let lower = name.to_ascii_lowercase();
        if check_name(ck, &k, v.span(), &lower, side) {
            if out.set.iter().any(|(n, _)| *n == lower) {
                ck.err(k, v.span(), format!("{lower:?} is set twice"));
                continue;
            }
            let value = v.get_ref();
            let bad = value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
                || value.starts_with([' ', '\t'])
                || value.ends_with([' ', '\t']);
            if bad {
                ck.err(
                    k,
                    v.span(),
                    "a header value must be one line without control characters or surrounding whitespace",
                );
                continue;
            }
            out.set.push((lower, value.clone()));
        }
    }
    for (j, v) in r.remove.iter().enumerate() {
        let k = format!("{key}.remove[{j}]");
        let lower = v.get_ref().to_ascii_lowercase();
        if check_name(ck, &k, v.span(), &lower, side) {
            if out.set.iter().any(|(n, _)| *n == lower) {
                ck.err(
                    k,
                    v.span(),
                    format!("{lower:?} is both set and removed; set already replaces it"),
                );
                continue;
            }
            if !out.remove.contains(&lower) {
                out.remove.push(lower);
            }
        }
    }
    out
}

fn check_name(
    ck: &mut Ck,
    key: &str,
    span: std::ops::Range<usize>,
    name: &str,
    side: Side,
) -> bool {
    if !is_token(name) {
        ck.err(key, span, format!("{name:?} is not a valid header name"));
        return false;
    }
    if FRAMING.contains(&name) {
        ck.err(
            key,
            span,
            format!(
                "{name:?} is a hop-by-hop or framing header; Ringway sets it on each leg itself"
            ),
        );
        return false;
    }
    if side == Side::Request && WRITTEN_UPSTREAM.contains(&name) {
        ck.err(
            key,
            span,
            format!("{name:?} is written by Ringway itself on every forwarded request"),
        );
        return false;
    }
    true
}
