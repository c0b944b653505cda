//! Provider credentials on an AI route whose `models` map sent the request to another upstream
//! than the route's: the head was written for the route's upstream (its key, or the client's
//! credentials), so the credential lines are redone for the upstream that will get it.

use super::{error, request::KeyUse, request::Plan};
use crate::runtime::Shared;
use crate::upstream::keys::ANTHROPIC_VERSION_LINE;

/// Rewrites the credential lines of `head` (request line and header lines, without the blank
/// line that ends it) for upstream `up`, and records the key chosen in `plan.key`. Fails when
/// every key of `up` was refused by the provider.
pub(super) fn for_upstream(
    head: &mut Vec<u8>,
    shared: &Shared,
    plan: &mut Plan,
    up: usize,
) -> Result<(), error::Reject> {
    let pool_of = |i: usize| shared.key_pools.get(i).and_then(Option::as_ref);
    let old = pool_of(plan.upstream);
    let new = pool_of(up);
    if up == plan.upstream || (old.is_none() && new.is_none()) {
        return Ok(());
    }
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
        client_version |= is("anthropic-version");
        out.extend_from_slice(line);
    }
    plan.key = None;
    if let Some(p) = new {
        let i = p
            .pick(crate::upstream::health::now_ms())
            .ok_or(error::NO_KEY)?;
        out.extend_from_slice(p.line(i));
        let added_version = p.kind == crate::config::CredentialKind::Anthropic && !client_version;
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
