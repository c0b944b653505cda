//! The request head phase: parse, check framing, route, and rewrite the head
//! for the upstream — synchronously, with no allocation.
//!
//! The client's head is read at [`HEADROOM`] into its buffer. The rewritten
//! head is built in the worker's scratch and copied back so that it ends
//! exactly where the original ended: the head and the first body bytes then
//! leave in one write.

use std::{io::Write as _, mem::MaybeUninit, net::IpAddr};

use crate::{
    buf::PoolBuf,
    config::KeySource,
    filter::{Filter, LimitChecks},
    h1::{self, BodyKind, HeadError, Parsed},
    proxy::error::{self, Reject},
    route::RequestView,
    runtime::{Generation, Shared, Worker},
    tls::TlsStream,
    upstream::{balance::hash_bytes, cookie_value, keys::ANTHROPIC_VERSION_LINE, HashSource},
};
use ringway_filters::auth::KeyFrom;

/// Bytes kept free before every head, so a rewritten head that grew still
/// fits in front of the body that follows it.
pub const HEADROOM: usize = 512;

/// Most header slots a parse may use; `server.max_headers` is at most this.
pub const MAX_HEADERS_CAP: usize = 256;

/// A request id kept for the access log (longer client ids are cut).
#[derive(Debug, Clone, Copy)]
pub struct RequestId {
    bytes: [u8; 48],
    len: u8,
}

impl RequestId {
    pub fn new(v: &[u8]) -> Self {
        let mut bytes = [0u8; 48];
        let len = v.len().min(48);
        bytes[..len].copy_from_slice(&v[..len]);
        Self {
            bytes,
            len: len as u8,
        }
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// What the rest of the exchange needs to know about a request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Index of the matched route.
    pub route: usize,
    /// Index of its upstream.
    pub upstream: usize,
    /// The request body's framing.
    pub body: BodyKind,
    /// Whether the client wants the connection kept open.
    pub keep_alive: bool,
    /// 0 for an HTTP/1.0 client, 1 for HTTP/1.1.
    pub version: u8,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// A `Connection: upgrade` request (WebSocket).
    pub upgrade: bool,
    /// HEAD: the response has no body whatever its headers say.
    pub is_head: bool,
    /// Safe to send twice (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// The key `balance = "hash"` places this request by.
    pub hash_key: Option<u64>,
    /// The request id sent upstream (the client's or a new one).
    pub request_id: RequestId,
    /// The consumer key auth identified.
    pub consumer: Option<u32>,
    /// Limits to check before the request goes upstream.
    pub limits: LimitChecks,
    /// Token limits to reserve against (AI routes).
    pub tokens: LimitChecks,
    /// An OpenAI chat completions path (where `include_usage` may be added).
    pub chat: bool,
    /// The provider key written into the head, to report the response against.
    pub key: Option<KeyUse>,
    /// Where the rewritten head starts in the client buffer.
    pub head_start: usize,
    /// Where it ends; body bytes read with the head follow here.
    pub head_end: usize,
}

/// Which provider key a request was sent with: the head is written before the response
/// arrives, so the choice travels with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyUse {
    /// Index of the upstream whose pool it is.
    pub upstream: u32,
    /// Position of the key in that pool.
    pub index: u32,
    /// Ringway added `anthropic-version` (the client sent none).
    pub added_version: bool,
}

/// What the filters found while the head was at hand.
struct Filtered<'s> {
    consumer: Option<u32>,
    limits: LimitChecks,
    tokens: LimitChecks,
    /// Where key auth found the consumer's key: removed before forwarding.
    key_from: Option<KeyFrom>,
    /// The query parameter key auth reads, when it found the key there.
    key_param: &'s str,
}

/// Maps a head parse error to the response the client gets.
pub fn reject_for(e: HeadError) -> Rejected {
    Rejected {
        reject: Reject::closing(e.status(), "invalid_request", e.message()),
        head_end: None,
        route: None,
    }
}

/// A request answered by Ringway itself.
#[derive(Debug)]
pub struct Rejected {
    /// The answer.
    pub reject: Reject,
    /// End of the request head in the buffer, when the connection may go on
    /// (bytes after it are the next pipelined request).
    pub head_end: Option<usize>,
    /// The route the request matched, when one did (for metrics and the access log).
    pub route: Option<Box<(usize, RequestId, usize)>>,
}

impl From<Reject> for Rejected {
    fn from(reject: Reject) -> Self {
        Rejected {
            reject,
            head_end: None,
            route: None,
        }
    }
}

/// Parses the head in `buf[HEADROOM..]`, routes it, and rewrites it in place;
/// `tls`: the client connection's TLS, when it is TLS.
/// `Partial` means more bytes are needed.
pub fn plan_request(
    w: &Worker,
    g: &Generation,
    buf: &mut PoolBuf,
    listener: usize,
    peer: IpAddr,
    tls: Option<&TlsStream>,
) -> Result<Parsed<Plan>, Rejected> {
    let shared = &*g.shared;
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let max_headers = g.limits.max_headers.min(MAX_HEADERS_CAP);
    let mut scratch = w.scratch.borrow_mut();
    scratch.clear();

    let (plan, old_end) = {
        let data = &buf[HEADROOM..];
        let head = match h1::parse_request(data, &mut storage[..max_headers], &g.limits) {
            Ok(Parsed::Complete(h)) => h,
            Ok(Parsed::Partial) => return Ok(Parsed::Partial),
            Err(e) => return Err(reject_for(e)),
        };
        if let BodyKind::Length(n) = head.body {
            if n > g.max_body {
                return Err(error::BODY_TOO_LARGE.into());
            }
        }
        // Absolute-form: the authority replaces Host (RFC 9112 §3.2.2).
        let (target, authority) = match h1::split_absolute_form(head.target) {
            Some((auth, path)) => (path, Some(auth)),
            None => (head.target, None),
        };
        // OPTIONS about the server as a whole (RFC 9112 §3.2.4): the asterisk
        // form, or an absolute form with an empty path, which the last proxy
        // turns into the asterisk form. It is routed as the path "/".
        let asterisk = head.method == "OPTIONS"
            && (head.target == "*"
                || authority.is_some_and(|a| head.target.len() == "http://".len() + a.len()));
        let path = match memchr::memchr(b'?', target.as_bytes()) {
            _ if asterisk => "/",
            Some(q) => &target[..q],
            None => target,
        };
        let host = authority.map(str::as_bytes).or(head.host);
        let view = RequestView {
            listener,
            host,
            method: head.method,
            path,
            headers: head.headers,
        };
        // A Connection header must not make a proxy drop the framing or Host.
        if head.connection_tokens.contains("content-length")
            || head.connection_tokens.contains("host")
        {
            return Err(Reject::closing(
                400,
                "invalid_request",
                "Connection names a header a proxy must keep",
            )
            .into());
        }
        let route_idx = match shared.routes.find(&view) {
            Some(r) => r,
            None => {
                let body = !matches!(head.body, BodyKind::None | BodyKind::Length(0));
                let reject = error::NO_ROUTE.closing_if(body || !head.keep_alive);
                let body_len = match head.body {
                    BodyKind::Length(n) => n as usize,
                    _ => 0,
                };
                return Err(Rejected {
                    reject,
                    head_end: Some(HEADROOM + head.head_len + body_len),
                    route: None,
                });
            }
        };
        let route = shared.routes.get(route_idx);
        let upstream = &shared.upstreams[route.upstream];
        let has_body = !matches!(head.body, BodyKind::None | BodyKind::Length(0));
        let query = memchr::memchr(b'?', target.as_bytes()).map(|q| &target.as_bytes()[q + 1..]);
        let client_cert = tls.and_then(|t| t.client_subject());
        let filtered =
            run_filters(shared, route_idx, &head, query, peer, client_cert).map_err(|rej| {
                let id = head
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("x-request-id"))
                    .map(|h| RequestId::new(h.value))
                    .unwrap_or_else(|| {
                        let mut v = Vec::with_capacity(32);
                        w.next_request_id(&mut v);
                        RequestId::new(&v)
                    });
                Rejected {
                    reject: rej.closing_if(has_body || !head.keep_alive),
                    head_end: Some(HEADROOM + head.head_len),
                    route: Some(Box::new((route_idx, id, head.head_len))),
                }
            })?;
        let Filtered {
            consumer,
            limits,
            tokens,
            key_from,
            key_param,
        } = filtered;
        let pool = shared
            .key_pools
            .get(route.upstream)
            .and_then(Option::as_ref);
        let key = match pool {
            Some(p) => match p.pick(crate::upstream::health::now_ms()) {
                Some(i) => Some(i),
                None => {
                    return Err(Rejected {
                        reject: error::NO_KEY.closing_if(has_body || !head.keep_alive),
                        head_end: Some(HEADROOM + head.head_len),
                        route: None,
                    })
                }
            },
            None => None,
        };

        // Request line, with the route's prefix stripped.
        let out = &mut *scratch;
        out.extend_from_slice(head.method.as_bytes());
        out.push(b' ');
        if asterisk {
            out.push(b'*');
        } else {
            let rest = &target[route.strip.min(target.len())..];
            if !rest.starts_with('/') {
                out.push(b'/');
            }
            match (key_from, memchr::memchr(b'?', rest.as_bytes())) {
                // The consumer's key came in the query: everything but that parameter goes on.
                (Some(KeyFrom::Query), Some(q)) => {
                    out.extend_from_slice(&rest.as_bytes()[..q]);
                    out.push(b'?');
                    let q_at = out.len();
                    if !ringway_filters::auth::write_query_without(
                        &rest.as_bytes()[q + 1..],
                        key_param,
                        out,
                    ) {
                        out.truncate(q_at - 1);
                    }
                }
                _ => out.extend_from_slice(rest.as_bytes()),
            }
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");

        // `host_header`: the upstream's own name (the first endpoint's, for
        // "endpoint") or a literal replaces the client's Host.
        let fixed_host = upstream
            .conf
            .endpoints
            .first()
            .and_then(|e| upstream.conf.host_header_for(&e.address));
        let mut request_id: Option<RequestId> = None;
        let mut has_xff = false;
        let mut client_version = false;
        let provider_name = pool.map(|p| p.kind.header_name());
        for h in head.headers {
            let name = h.name;
            // With provider credentials, none of the client's own credentials go on (SDKs
            // send either header, depending on version and options).
            if let Some(pname) = provider_name {
                if name.eq_ignore_ascii_case("authorization")
                    || name.eq_ignore_ascii_case("x-api-key")
                    || name.eq_ignore_ascii_case("api-key")
                    || name.eq_ignore_ascii_case(pname)
                {
                    continue;
                }
            }
            // The header that carried the consumer's Ringway key never leaves.
            match key_from {
                Some(KeyFrom::Authorization) if name.eq_ignore_ascii_case("authorization") => {
                    continue
                }
                Some(KeyFrom::XApiKey) if name.eq_ignore_ascii_case("x-api-key") => continue,
                _ => {}
            }
            if route.request_headers.drops(name) {
                continue;
            }
            if h1::is_hop_by_hop(name) {
                // An upgrade keeps its Upgrade header; Connection is rewritten below.
                if !(head.upgrade && name.eq_ignore_ascii_case("upgrade")) {
                    continue;
                }
            } else if head.connection_tokens.contains(name) {
                continue;
            }
            if name.eq_ignore_ascii_case("expect") && head.expect_continue {
                // Ringway answers 100 Continue itself.
                continue;
            }
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                // Merged with the client address below.
                has_xff = true;
                continue;
            }
            if name.eq_ignore_ascii_case("x-forwarded-proto") {
                continue;
            }
            if name.eq_ignore_ascii_case("host") && (authority.is_some() || fixed_host.is_some()) {
                continue;
            }
            if name.eq_ignore_ascii_case("x-request-id") {
                request_id = Some(RequestId::new(h.value));
            }
            if name.eq_ignore_ascii_case("anthropic-version") {
                client_version = true;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(h) = fixed_host {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        } else if let Some(auth) = authority {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(auth.as_bytes());
            out.extend_from_slice(b"\r\n");
        } else if head.host.is_none() {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(upstream.default_host.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if matches!(head.body, BodyKind::Chunked) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if has_xff {
            // Every earlier hop, in order, then this client.
            for h in head
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
            {
                out.extend_from_slice(h.value);
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(ip_text(peer, &mut [0u8; IP_TEXT_MAX]));
        out.extend_from_slice(if tls.is_some() {
            b"\r\nx-forwarded-proto: https\r\n".as_slice()
        } else {
            b"\r\nx-forwarded-proto: http\r\n"
        });
        if request_id.is_none() {
            out.extend_from_slice(b"x-request-id: ");
            let at = out.len();
            w.next_request_id(out);
            request_id = Some(RequestId::new(&out[at..]));
            out.extend_from_slice(b"\r\n");
        }
        let mut key_use = None;
        if let (Some(p), Some(i)) = (pool, key) {
            out.extend_from_slice(p.line(i));
            // A route rule that sets anthropic-version decides it, as a client's would.
            let added_version = p.kind == crate::config::CredentialKind::Anthropic
                && !client_version
                && !route.request_headers.sets("anthropic-version");
            if added_version {
                out.extend_from_slice(ANTHROPIC_VERSION_LINE);
            }
            key_use = Some(KeyUse {
                upstream: route.upstream as u32,
                index: i as u32,
                added_version,
            });
        }
        out.extend_from_slice(route.request_headers.lines());
        if head.upgrade {
            out.extend_from_slice(b"connection: upgrade\r\n");
        }
        out.extend_from_slice(b"\r\n");

        let hash_key = upstream.hash_source.as_ref().and_then(|src| match src {
            HashSource::Ip => Some(hash_ip(peer)),
            HashSource::Header(name) => head
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| hash_bytes(h.value)),
            HashSource::Cookie(name) => head
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
                .find_map(|h| cookie_value(h.value, name))
                .map(hash_bytes),
            HashSource::Consumer => consumer
                .map(|c| hash_bytes(shared.filters.auth.consumer_name(c as usize).as_bytes())),
        });
        let method = head.method;
        let plan = Plan {
            key: key_use,
            chat: path.ends_with("/chat/completions"),
            consumer,
            limits,
            tokens,
            request_id: request_id.unwrap_or(RequestId::new(b"")),
            hash_key,
            route: route_idx,
            upstream: route.upstream,
            body: head.body,
            keep_alive: head.keep_alive,
            version: head.version,
            expect_continue: head.expect_continue,
            upgrade: head.upgrade,
            is_head: method == "HEAD",
            idempotent: matches!(
                method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
            head_start: 0,
            head_end: 0,
        };
        (plan, HEADROOM + head.head_len)
    };

    let new_len = scratch.len();
    if new_len > old_end {
        return Err(Reject::closing(
            431,
            "header_too_large",
            "request head too large after rewriting",
        )
        .into());
    }
    let start = old_end - new_len;
    buf[start..old_end].copy_from_slice(&scratch);
    Ok(Parsed::Complete(Plan {
        head_start: start,
        head_end: old_end,
        ..plan
    }))
}

/// The hash of a client address, for `hash_key = "ip"`.
/// Longest address [`ip_text`] writes (an IPv6 address is at most 45 characters).
const IP_TEXT_MAX: usize = 64;

/// `ip` as text, written into `buf`: IPv4 (every request's `x-forwarded-for`) without
/// `core::fmt`.
fn ip_text(ip: IpAddr, buf: &mut [u8; IP_TEXT_MAX]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                let mut digits = itoa::Buffer::new();
                let d = digits.format(o).as_bytes();
                buf[n..n + d.len()].copy_from_slice(d);
                n += d.len();
            }
            &buf[..n]
        }
        IpAddr::V6(_) => {
            let mut cur = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cur, "{ip}");
            let n = cur.position() as usize;
            &buf[..n]
        }
    }
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// Key auth and limit keys, while the head is at hand: the consumer, and the
/// limit checks the request owes (run later: a cluster limit may wait).
fn run_filters<'s>(
    shared: &'s Shared,
    route: usize,
    head: &h1::RequestHead<'_, '_>,
    query: Option<&[u8]>,
    peer: IpAddr,
    client_cert: Option<&str>,
) -> Result<Filtered<'s>, Reject> {
    let mut consumer: Option<u32> = None;
    let mut key_from = None;
    let mut key_param = "";
    let mut limits = LimitChecks::default();
    let mut tokens = LimitChecks::default();
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    for &fi in &shared.filters.by_route[route] {
        match &shared.filters.list[fi] {
            Filter::KeyAuth { query_param } => {
                let key = ringway_filters::auth::presented_key_from(
                    header("authorization"),
                    header("x-api-key"),
                    query_param.as_ref().and(query),
                    query_param.as_deref().unwrap_or(""),
                );
                match key.and_then(|(k, from)| Some((shared.filters.auth.lookup(&k)?, from))) {
                    Some((c, from)) => {
                        consumer = Some(c as u32);
                        key_from = Some(from);
                        key_param = query_param.as_deref().unwrap_or("");
                    }
                    None => return Err(error::UNAUTHORIZED),
                }
            }
            Filter::AiStats => {}
            Filter::RateLimit(rl) | Filter::TokenLimit(rl) => {
                let mut ip_buf = [0u8; IP_TEXT_MAX];
                let value: Option<&[u8]> = match &rl.conf.key {
                    KeySource::Consumer => {
                        consumer.map(|c| shared.filters.auth.consumer_name(c as usize).as_bytes())
                    }
                    KeySource::Ip => Some(ip_text(peer, &mut ip_buf)),
                    KeySource::Header(name) => header(name),
                    KeySource::Query(name) => query
                        .and_then(|q| ringway_filters::auth::query_param(q, name))
                        .and_then(|v| match v {
                            std::borrow::Cow::Borrowed(b) => Some(b),
                            // A percent-encoded value is rare; count it raw.
                            std::borrow::Cow::Owned(_) => None,
                        }),
                    KeySource::Cookie(name) => head
                        .headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
                        .find_map(|h| cookie_value(h.value, name)),
                    KeySource::Route => Some(shared.routes.get(route).name.as_bytes()),
                    KeySource::Global => Some(b"global".as_slice()),
                    KeySource::ClientCert => client_cert.map(str::as_bytes),
                };
                // A request without the key part is not limited by this filter.
                if let Some(v) = value {
                    if let Some(c) = rl.check_for(fi, v, peer) {
                        if rl.tokens {
                            tokens.push(c);
                        } else {
                            limits.push(c);
                        }
                    }
                }
            }
        }
    }
    Ok(Filtered {
        consumer,
        limits,
        tokens,
        key_from,
        key_param,
    })
}

#[cfg(test)]
mod tests {
    use super::{ip_text, IP_TEXT_MAX};
    use std::net::IpAddr;

    /// Addresses are written as `Display` writes them, v4 and v6.
    #[test]
    fn ip_text_is_the_display_form() {
        for a in [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.12.1",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            let mut buf = [0u8; IP_TEXT_MAX];
            assert_eq!(ip_text(ip, &mut buf), ip.to_string().as_bytes(), "{a}");
        }
    }
}
