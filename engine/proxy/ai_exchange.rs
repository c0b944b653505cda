//! One request on an AI route: body scanned and edited, tokens reserved,
//! upstream picked by model, response relayed while usage is watched, and
//! the request settled (reservations reconciled, metrics, access log).

use crate::transport::Stream;
use monoio::io::AsyncWriteRentExt;

use super::{
    conn::Next,
    early::{EarlyWatch, Watched},
    error,
    headers::ExtraHeaders,
    record::Record,
    reject::{reject, reject_with},
    request::Plan,
    respond::{read_response_head, RespError},
    retry::{connect, Tried},
};
use crate::{
    ai::{
        self,
        account::AiCtx,
        request::{capture, Fail},
    },
    buf::{HeadAndBody, PoolBuf},
    filter::Filter,
    runtime::{deadline, Generation, Worker},
    upstream::health::now_ms,
};

/// Output tokens reserved when the request names no `max_tokens`.
const DEFAULT_OUTPUT_RESERVE: u64 = 1024;

/// Serves one AI request after its head and request limits passed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    plan: Plan,
    cbuf: PoolBuf,
    mut record: Record<'_>,
    mut extra: ExtraHeaders,
) -> Next {
    let mut plan = plan;
    let route_ai = ai::route(&g.shared, plan.route);
    // The head goes upstream with its framing fields replaced by the body's
    // final length, known once the body is captured and edited. An accounted
    // route asks for an uncompressed reply, whatever the client accepts (the
    // official SDKs send `gzip, deflate`), so its usage can be read.
    let identity = route_ai.accounts();
    let mut head = head_without_framing(&cbuf[plan.head_start..plan.head_end], identity);
    let (req, pipelined) = match capture(w, g, client, cbuf, &plan, route_ai, plan.chat).await {
        Ok(v) => v,
        Err(Fail::Gone) => return Next::Close,
        Err(Fail::Reject(rej)) => {
            record.status = rej.status;
            return reject(w, g, client, rej, plan.is_head, None).await;
        }
    };
    record.model = req.model.clone();
    let consumer = plan
        .consumer
        .map(|c| g.shared.filters.auth.consumer_name(c as usize));
    let mut ctx = AiCtx::new(
        &g.shared.routes.get(plan.route).name,
        consumer,
        req.model.clone(),
        req.injected,
        req.input_estimate,
        route_ai.stats,
    );
    ctx.keepalive = route_ai.sse_keepalive;

    // Reserve tokens before anything goes upstream.
    let redis_timeout = g
        .shared
        .cfg
        .redis
        .as_ref()
        .map_or(std::time::Duration::from_millis(200), |r| r.timeout);
    let mut tightest = None;
    for check in plan.tokens.iter() {
        let Filter::TokenLimit(rl) = &g.shared.filters.list[check.filter as usize] else {
            continue;
        };
        let want = req.input_estimate + req.max_tokens.unwrap_or(DEFAULT_OUTPUT_RESERVE);
        let cost = want
            .min(rl.conf.max_reserve.unwrap_or(u64::MAX))
            .min(rl.max_cost(check))
            .max(1);
        let now = now_ms();
        let d = rl.acquire(check, cost, now, redis_timeout).await;
        if let Some(h) = rl.headers(&d) {
            if tightest.is_none_or(|t: ringway_filters::limit::window::LimitHeaders| {
                h.remaining < t.remaining || !d.admitted
            }) {
                tightest = Some(h);
            }
        }
        if d.admitted {
            rl.allowed.add(1);
            ctx.reserved(rl.clone(), *check, cost, now);
        } else if rl.conf.shadow {
            rl.shadow_rejected.add(1);
        } else {
            rl.rejected.add(1);
            ctx.release_all();
            if let Some(h) = tightest {
                let _ = h.write_to(&mut extra);
                let _ = h.write_retry_after(&mut extra);
            }
            record.status = 429;
            let rej = error::RATE_LIMITED.closing_if(!plan.keep_alive);
            let keep = if rej.close { None } else { pipelined };
            return reject_with(w, g, client, rej, plan.is_head, keep, extra.as_str()).await;
        }
    }
    if let Some(h) = tightest {
        let _ = h.write_to(&mut extra);
    }

    // Connect: the model's upstream, or the route's.
    let up = req.upstream.unwrap_or(plan.upstream);
    if let Err(rej) = super::ai_creds::for_upstream(&mut head, &g.shared, &mut plan, up) {
        ctx.release_all();
        record.status = rej.status;
        let rej = rej.closing_if(!plan.keep_alive);
        let keep = if rej.close { None } else { pipelined };
        return reject(w, g, client, rej, plan.is_head, keep).await;
    }
    let pool = g.upstream(up);
    let mut tried = Tried::default();
    let mut conn = match connect(pool, &plan, &mut tried).await {
        Ok(c) => c,
        Err(rej) => {
            ctx.release_all();
            record.status = rej.status;
            let rej = rej.closing_if(!plan.keep_alive);
            let keep = if rej.close { None } else { pipelined };
            return reject(w, g, client, rej, plan.is_head, keep).await;
        }
    };
    record.upstream = Some(conn.addr);

    // Head with the body's real length, then the body.
    let body_len = req.body.as_ref().map_or(0, |b| b.len());
    end_head(&mut head, req.body.is_some().then_some(body_len), identity);
    record.bytes_in += body_len as u64;
    let idle = pool.shared.conf.response_timeout;
    let sent = async {
        match req.body {
            // One writev: the rewritten head and the pooled body.
            Some(body) => HeadAndBody::new(head, body)
                .write_all(conn.stream())
                .await
                .map(drop),
            None => conn.stream().write_all(head).await.0.map(drop),
        }
    };
    if !matches!(deadline::timeout(idle, sent).await, Ok(Ok(()))) {
        pool.report_failure(conn.idx);
        return give_up(
            w,
            g,
            client,
            &mut ctx,
            &mut record,
            error::BAD_GATEWAY,
            plan.is_head,
        )
        .await;
    }
    ctx.sent_at = std::time::Instant::now();

    let ubuf = match w
        .pool
        .acquire_within(w.pool.slot_size(), pool.shared.conf.connect_timeout)
        .await
    {
        Ok(b) => b,
        Err(_) => {
            return give_up(
                w,
                g,
                client,
                &mut ctx,
                &mut record,
                error::NO_BUFFER,
                plan.is_head,
            )
            .await
        }
    };
    // A client that leaves while the model thinks: the upstream connection
    // closes at once (the provider stops generating) and the reservation is
    // released, instead of waiting for an answer nobody will read.
    let watch = EarlyWatch::on_socket(client);
    let head = read_response_head(w, g, client, &mut conn, ubuf, &plan, &extra, ctx.injected);
    let head = match &watch {
        Some(watch) => match watch.run_until_closed(head).await {
            Watched::Done(r) => r,
            Watched::Answered => {
                drop(conn);
                ctx.settle();
                return Next::Close;
            }
        },
        None => head.await,
    };
    drop(watch);
    let (rp, ubuf) = match head {
        Ok(v) => v,
        Err(RespError::Client) => return Next::Close,
        Err(RespError::NoAnswer) => {
            pool.report_failure(conn.idx);
            return give_up(
                w,
                g,
                client,
                &mut ctx,
                &mut record,
                error::BAD_GATEWAY,
                plan.is_head,
            )
            .await;
        }
        Err(RespError::Reject(rej)) => {
            if rej.status >= 502 {
                pool.report_failure(conn.idx);
            }
            return give_up(w, g, client, &mut ctx, &mut record, rej, plan.is_head).await;
        }
    };
    record.status = rp.status;
    record.upstream_time = Some(ctx.sent_at.elapsed());
    // A provider endpoint that keeps answering 429 is as unusable as one that
    // fails: after `unhealthy_after` in a row it rests for the passive cooldown.
    // Not a lone endpoint: resting it would turn a rate limit (often on one
    // key) into an outage for every consumer; key cooldowns handle that case.
    let limited = rp.status == 429 && pool.shared.conf.endpoints.len() > 1;
    if rp.status >= 500 || limited {
        pool.report_failure(conn.idx);
    } else {
        pool.report_success(conn.idx);
    }
    ctx.status = rp.status;

    let relayed = ai::relay::relay(g, client, conn.stream(), ubuf, &rp, &mut ctx, idle).await;
    // Settled on every path: a client that left is charged what was streamed.
    if let Some(u) = ctx.settle() {
        if ctx.answered() {
            record.tokens = Some((
                u.input,
                u.output,
                u.source == ringway_filters::usage::UsageSource::Estimated,
            ));
        }
    }
    match relayed {
        Ok((bytes, clean)) => {
            record.bytes_out = bytes;
            if rp.upstream_keep_alive && clean {
                conn.set_reusable();
            }
        }
        Err(_) => return Next::Close,
    }
    drop(conn);
    if rp.client_close {
        return Next::Close;
    }
    Next::KeepAlive(pipelined)
}

/// Answers `rej` after the request went upstream but before any of the
/// response did: the reservations go back in full, the connection closes.
async fn give_up(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    ctx: &mut AiCtx,
    record: &mut Record<'_>,
    rej: error::Reject,
    head_only: bool,
) -> Next {
    ctx.release_all();
    record.status = rej.status;
    reject(w, g, client, rej.closing_if(true), head_only, None).await
}

/// The request head's lines, less Content-Length and Transfer-Encoding (and
/// Accept-Encoding when `identity`: [`end_head`] then asks for `identity`)
/// and the blank line that ends it; [`end_head`] completes it.
fn head_without_framing(head: &[u8], identity: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 32);
    let lines = head.strip_suffix(b"\r\n").unwrap_or(head);
    for line in lines.split_inclusive(|&b| b == b'\n') {
        let is = |name: &[u8]| {
            line.get(..name.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(name))
        };
        let dropped = is(b"content-length:")
            || is(b"transfer-encoding:")
            || (identity && is(b"accept-encoding:"));
        if !dropped {
            out.extend_from_slice(line);
        }
    }
    out
}

/// Ends a head from [`head_without_framing`] with the body's length and, when
/// `identity`, an explicit `accept-encoding: identity` (RFC 9110 §12.5.3: a
/// request without the field accepts any coding).
fn end_head(out: &mut Vec<u8>, len: Option<usize>, identity: bool) {
    if identity {
        out.extend_from_slice(b"accept-encoding: identity\r\n");
    }
    if let Some(n) = len {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::{end_head, head_without_framing};

    fn with_length(head: &[u8], len: Option<usize>, identity: bool) -> Vec<u8> {
        let mut out = head_without_framing(head, identity);
        end_head(&mut out, len, identity);
        out
    }

    #[test]
    fn framing_headers_are_replaced_by_the_real_length() {
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nContent-Length: 10\r\ntransfer-encoding: chunked\r\nx-a: b\r\n\r\n";
        let out = with_length(head, Some(42), false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-a: b\r\ncontent-length: 42\r\n\r\n"
        );
    }

    /// An accounted route replaces the client's Accept-Encoding (every one of
    /// them) with `identity`, and adds it when the client sent none; other
    /// routes keep the client's.
    #[test]
    fn accounted_routes_ask_for_identity() {
        let head = b"POST /v1/chat/completions HTTP/1.1\r\nAccept-Encoding: gzip, deflate\r\nhost: x\r\naccept-encoding: br\r\n\r\n";
        let out = String::from_utf8(with_length(head, Some(2), true)).unwrap_or_default();
        assert_eq!(
            out,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\naccept-encoding: identity\r\ncontent-length: 2\r\n\r\n"
        );
        let bare = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n";
        let out = String::from_utf8(with_length(bare, None, true)).unwrap_or_default();
        assert_eq!(
            out,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\naccept-encoding: identity\r\n\r\n"
        );
        let kept = String::from_utf8(with_length(head, Some(2), false)).unwrap_or_default();
        assert!(
            kept.contains("Accept-Encoding: gzip, deflate\r\n")
                && kept.contains("accept-encoding: br\r\n")
        );
    }
}
