//! The response head phase: parse the upstream's head, decide framing for
//! both sides, and rewrite the head for the client in place.

use std::mem::MaybeUninit;

use crate::{
    buf::PoolBuf,
    h1::{self, BodyKind, Parsed},
    proxy::{
        error::{self, Reject},
        request::{Plan, HEADROOM, MAX_HEADERS_CAP},
    },
    runtime::{Generation, Worker},
};

/// What the client side needs to know about a response.
#[derive(Debug, Clone, Copy)]
pub struct RespPlan {
    /// The upstream's status.
    pub status: u16,
    /// The body's framing as the upstream sends it.
    pub body: BodyKind,
    /// The upstream allows another request on this connection.
    pub upstream_keep_alive: bool,
    /// The client connection closes after this response.
    pub client_close: bool,
    /// The body is chunked but the client speaks HTTP/1.0: send payload only.
    pub dechunk: bool,
    /// An interim response (1xx other than 101): forward and read the next head.
    pub interim: bool,
    /// A `text/event-stream` body.
    pub sse: bool,
    /// The upstream named a Content-Encoding (the AI relay reads which only then).
    pub coded: bool,
    /// Ringway frames the body for the client itself (chunked, or
    /// close-delimited for HTTP/1.0): an inspected event stream, whose frames
    /// it may remove.
    pub reframe: bool,
    /// The client speaks HTTP/1.0.
    pub http10: bool,
    /// An error answer's `retry-after`.
    pub retry_after: Option<std::time::Duration>,
    /// From the upstream's last head bytes arriving to the head rewritten for the client.
    pub head_time: std::time::Duration,
    /// Where the rewritten head starts in the upstream buffer.
    pub head_start: usize,
    /// Where it ends; body bytes read with the head follow here.
    pub head_end: usize,
}

impl RespPlan {
    /// A reframed body goes to an HTTP/1.0 client close-delimited, not chunked.
    pub fn client_close_http10(&self) -> bool {
        self.reframe && self.client_close && self.http10
    }
}

/// Reports a final status against the provider key the request was sent with: a 429 cools
/// the key (for as long as the provider's headers say), a 401/403 removes it.
fn report_key(g: &Generation, req: &Plan, status: u16, headers: &[httparse::Header<'_>]) {
    let Some(k) = req.key else { return };
    let Some(pool) = g
        .shared
        .key_pools
        .get(k.upstream as usize)
        .and_then(Option::as_ref)
    else {
        return;
    };
    let now = crate::upstream::health::now_ms();
    pool.report(
        k.index as usize,
        status,
        || crate::upstream::keys::cooldown_from(headers, now / 1000),
        now,
    );
}

/// Parses the head in `buf[HEADROOM..]` and rewrites it for the client.
pub fn plan_response(
    w: &Worker,
    g: &Generation,
    buf: &mut PoolBuf,
    req: &Plan,
    draining: bool,
    extra: &[u8],
    inspect_sse: bool,
) -> Result<Parsed<RespPlan>, Reject> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let max_headers = g.limits.max_headers.min(MAX_HEADERS_CAP);
    let mut scratch = w.scratch.borrow_mut();
    scratch.clear();

    let (plan, old_end) = {
        let data = &buf[HEADROOM..];
        let head =
            match h1::parse_response(data, &mut storage[..max_headers], &g.limits, req.is_head) {
                Ok(Parsed::Complete(h)) => h,
                Ok(Parsed::Partial) => return Ok(Parsed::Partial),
                Err(_) => return Err(error::BAD_RESPONSE),
            };
        let status = head.status;
        let switching = status == 101;
        if switching && !req.upgrade {
            return Err(error::BAD_RESPONSE);
        }
        let interim = (100..200).contains(&status) && !switching;
        let sse = head.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("content-type")
                && h.value.len() >= 17
                && h.value[..17].eq_ignore_ascii_case(b"text/event-stream")
        });
        let coded = head
            .headers
            .iter()
            .any(|h| h.name.len() == 16 && h.name.eq_ignore_ascii_case("content-encoding"));
        let reframe = inspect_sse && sse && !interim && !matches!(head.body, BodyKind::None);
        let chunked = matches!(head.body, BodyKind::Chunked);
        let dechunk = chunked && req.version == 0;
        let close_delimited = matches!(head.body, BodyKind::CloseDelimited);
        let client_close = !interim
            && (!req.keep_alive
                || close_delimited
                || dechunk
                || draining
                || (reframe && req.version == 0))
            && !switching;

        if !interim {
            report_key(g, req, status, head.headers);
        }
        let retry_after = if status >= 400 {
            head.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("retry-after"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(|v| {
                    let now = crate::upstream::health::now_ms() / 1000;
                    crate::upstream::keys::retry_after(v.trim(), now)
                })
        } else {
            None
        };
        let rules = &g.shared.routes.get(req.route).response_headers;

        let out = &mut *scratch;
        out.extend_from_slice(b"HTTP/1.1 ");
        let mut code = itoa::Buffer::new();
        out.extend_from_slice(code.format(status).as_bytes());
        out.push(b' ');
        // An upstream that sent no reason phrase gets the standard one.
        let reason = match head.reason {
            "" => error::reason(status),
            r => r,
        };
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in head.headers {
            let name = h.name;
            if h1::is_hop_by_hop(name) {
                if !(switching && name.eq_ignore_ascii_case("upgrade")) {
                    continue;
                }
            } else if head.connection_tokens.contains(name) {
                continue;
            }
            if reframe && name.eq_ignore_ascii_case("content-length") {
                // Ringway frames this body itself.
                continue;
            }
            if rules.drops(name) {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        if reframe {
            if req.version == 1 {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
        } else if chunked && !dechunk {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !interim {
            out.extend_from_slice(extra);
            out.extend_from_slice(rules.lines());
        }
        if switching {
            out.extend_from_slice(b"connection: upgrade\r\n");
        } else if !interim {
            if client_close {
                out.extend_from_slice(b"connection: close\r\n");
            } else if req.version == 0 {
                out.extend_from_slice(b"connection: keep-alive\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        let plan = RespPlan {
            status,
            body: head.body,
            upstream_keep_alive: head.keep_alive && !close_delimited,
            client_close,
            dechunk,
            interim,
            sse,
            coded,
            reframe,
            http10: req.version == 0,
            retry_after,
            head_time: std::time::Duration::ZERO,
            head_start: 0,
            head_end: 0,
        };
        (plan, HEADROOM + head.head_len)
    };

    let new_len = scratch.len();
    if new_len > old_end {
        return Err(error::BAD_RESPONSE);
    }
    let start = old_end - new_len;
    buf[start..old_end].copy_from_slice(&scratch);
    Ok(Parsed::Complete(RespPlan {
        head_start: start,
        head_end: old_end,
        ..plan
    }))
}
