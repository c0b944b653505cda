//! The request head for one attempt of an AI request: the head was written for the route's
//! upstream (its key and Host, or the client's credentials); an attempt on another upstream
//! (picked by `models`, or a fallback), or with another key of the same one, gets its own
//! credential lines and Host.

use super::{error, request::KeyUse, request::Plan};
use crate::runtime::Shared;
use crate::upstream::keys::ANTHROPIC_VERSION_LINE;

/// Which key the attempt takes from the upstream's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyChoice {
    /// The key already in the head, when it is for this upstream.
    Keep,
    /// A key that is neither cooling nor removed (a retry after a 429).
    Usable,
    /// Any key: the usable ones first, else the one whose cooldown ends first.
    Any,
}

/// Rewrites the credential and Host lines of `head` (request line and header lines, without
/// the blank line that ends it) for upstream `up`, records the key chosen in `plan.key` and
/// moves `plan.upstream` to `up`. Fails when `up` has no key to give.
pub(super) fn for_upstream(
    head: &mut Vec<u8>,
    shared: &Shared,
    plan: &mut Plan,
    up: usize,
    choice: KeyChoice,
) -> Result<(), error::Reject> {
    let pool_of = |i: usize| shared.key_pools.get(i).and_then(Option::as_ref);
    let old = pool_of(plan.upstream);
    let new = pool_of(up);
    let same = up == plan.upstream;
    if same && (choice == KeyChoice::Keep || new.is_none()) {
        return Ok(());
    }
    let host_of = |i: usize| {
        let conf = &shared.upstreams[i].conf;
        conf.endpoints
            .first()
            .and_then(|e| conf.host_header_for(&e.address))
    };
    // A fixed Host replaces the line; else the line the head has goes on.
    let new_host = if same { None } else { host_of(up) };
    let old_name = old.map(|p| p.kind.header_name());
    let new_name = new.map(|p| p.kind.header_name());
    let added_version = plan.key.is_some_and(|k| k.added_version);
    let mut out = Vec::with_capacity(head.len() + 128);
    let mut client_version = false;
    for (n, line) in head.split_inclusive(|&b| b == b'\n').enumerate() {
        let name = match memchr::memchr(b':', line) {
            Some(c) if n > 0 => &line[..c],
            _ => {
                out.extend_from_slice(line);
                continue;
            }
        };
        let is = |h: &str| name.eq_ignore_ascii_case(h.as_bytes());
        let credential = is("authorization")
            || is("x-api-key")
            || is("api-key")
            || old_name.is_some_and(is)
            || new_name.is_some_and(is);
        if credential || (added_version && is("anthropic-version")) {
            continue;
        }
        if new_host.is_some() && is("host") {
            continue;
        }
        client_version |= is("anthropic-version");
        out.extend_from_slice(line);
    }
    if let Some(h) = new_host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    plan.key = None;
    plan.upstream = up;
    if let Some(p) = new {
        let now = crate::upstream::health::now_ms();
        let i = match choice {
            KeyChoice::Usable => p.pick_usable(now),
            KeyChoice::Keep | KeyChoice::Any => p.pick(now),
        }
        .ok_or(error::NO_KEY)?;
        out.extend_from_slice(p.line(i));
        let route_sets = shared
            .routes
            .get(plan.route)
            .request_headers
            .sets("anthropic-version");
        let added_version =
            p.kind == crate::config::CredentialKind::Anthropic && !client_version && !route_sets;
        if added_version {
            out.extend_from_slice(ANTHROPIC_VERSION_LINE);
        }
        plan.key = Some(KeyUse {
            upstream: up as u32,
            index: i as u32,
            added_version,
        });
    }
    *head = out;
    Ok(())
}
