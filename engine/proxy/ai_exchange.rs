//! One request on an AI route: body scanned and edited, tokens reserved,
//! upstream picked by model, response relayed while usage is watched, and
//! the request settled (reservations reconciled, metrics, access log).

use super::{
    conn::{Handoff, Last, Next},
    error,
    failover::{self, head_without_framing, Served, Unserved},
    headers::ExtraHeaders,
    park::Kept,
    record::Record,
    reject::{reject, reject_with},
    request::Plan,
    response::RespPlan,
};
use ringway_filters::limit::window::LimitHeaders;

use crate::{
    ai::{
        self,
        account::AiCtx,
        request::{capture, AiRequest, Fail, ModelSlot},
    },
    buf::PoolBuf,
    config::Unpriced,
    filter::Filter,
    runtime::{Generation, Worker},
    transport::Stream,
    upstream::{health::now_ms, UpConn},
};

/// Output tokens reserved when the request names no `max_tokens`.
const DEFAULT_OUTPUT_RESERVE: u64 = 1024;

/// Serves one AI request after its head and request limits passed, up to its upstream's
/// answer; the response goes on in a stage of its own ([`relay_stage`]).
///
/// A plain `fn` around an `async move` block, not an `async fn`: an `async fn`
/// moves its arguments into locals, which kept the plan, record and extra
/// headers (1 KiB) twice in this state.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
pub(super) fn exchange<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    mut plan: Plan,
    cbuf: PoolBuf,
    mut record: Record<'a>,
    mut extra: ExtraHeaders,
) -> impl std::future::Future<Output = Handoff<'a>> + 'a {
    async move {
        let route_ai = ai::route(&g.shared, plan.route);
        // The request's accounting, written here once by `prepare`: returned inside its
        // result, it was copied with that result at every step to the relay (456 bytes, eight
        // times per request).
        let mut ctx = None;
        let prepared = prepare(
            w,
            g,
            client,
            &mut plan,
            cbuf,
            &mut record,
            &mut extra,
            route_ai,
            &mut ctx,
        );
        // The refusal is taken out of the result in a statement of its own: matched where it
        // is answered, the whole result (1 KiB) was kept across the answer's wait, beside
        // the state of `prepare`.
        let refusal = match prepared.await {
            Ok(prepared) => {
                // `prepare` sets the context before it can succeed.
                let Some(ctx) = ctx.take() else {
                    return Handoff::Done(Next::Close);
                };
                let relaying = answered(g, &plan, &mut record, prepared, ctx);
                // An open stream then holds the relay's state alone, not the plan, the
                // extra headers and the attempts' state as well.
                return Handoff::Then(Last::stage(|| relay_stage(w, g, client, record, relaying)));
            }
            Err(Refusal::Done(next)) => return Handoff::Done(next),
            Err(r) => r,
        };
        // Boxed, as every answer of a failure: rare, and inline it would size every
        // request's state.
        let answer = refuse(
            w,
            g,
            client,
            plan.is_head,
            &mut record,
            &extra,
            refusal,
            ctx.take(),
        );
        Handoff::Done(Box::pin(answer).await)
    }
}

/// Relays an answered AI request's response while its usage is watched, then settles it:
/// reservations reconciled (a client that left is charged what was streamed), the record
/// completed, the upstream connection kept or closed.
///
/// A plain `fn` around an `async move` block, so its arguments are held once; the
/// relay's fields are used in place. The block captures only the fields of `r` it uses, so
/// each one must be used in it: a field it never names would be dropped when this `fn`
/// returns, before the relay runs.
#[allow(clippy::manual_async_fn)]
pub(super) fn relay_stage<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    mut record: Record<'a>,
    mut r: Relaying,
) -> impl std::future::Future<Output = Next> + 'a {
    async move {
        let idle = r.conn.response_timeout();
        let relayed = ai::relay::relay(
            g,
            w.ring.get(),
            client,
            r.conn.stream(),
            r.ubuf,
            &r.rp,
            &mut r.ctx,
            idle,
        )
        .await;
        // The whole record is moved in, not only the fields set here (copies: the record
        // itself would then be dropped, and its access-log line written, before the relay).
        let record = &mut record;
        if let Some(u) = r.ctx.settle() {
            if r.ctx.answered() {
                record.tokens = Some((
                    u.input,
                    u.output,
                    u.source == ringway_filters::usage::UsageSource::Estimated,
                ));
            }
        }
        record.overhead = Some(r.ctx.busy);
        match relayed {
            Ok((bytes, clean)) => {
                record.bytes_out = bytes;
                failover::after_relay(r.conn, &r.rp, clean, r.pipelined.map(|b| *b))
            }
            Err(_) => Next::Close,
        }
    }
}

/// What an AI request holds once an upstream answered: all its relay needs but its
/// accounting context.
struct Prepared {
    served: Served,
    /// Bytes the client sent after this request.
    pipelined: Option<PoolBuf>,
    /// Length of the body sent upstream (after edits).
    body_len: usize,
    /// The model slot of the serving upstream, when the route maps models.
    slot: Option<ModelSlot>,
    /// Ringway's own time up to the end of the body scan.
    own_before: std::time::Duration,
    /// When the body scan ended.
    captured_at: std::time::Instant,
}

/// What the relay of an answered AI request needs.
pub(super) struct Relaying {
    ctx: AiCtx,
    conn: UpConn,
    rp: RespPlan,
    ubuf: PoolBuf,
    /// Bytes the client sent after this request (boxed: rare, and inline its 40 bytes kept
    /// every relay's state a size class up).
    pipelined: Option<Box<PoolBuf>>,
}

/// Books an answered request (the record; the price and the model it is charged under) and
/// keeps only what its relay needs. Bound in the exchange, the rest of [`Prepared`] (the model
/// slot, the times) stayed in its state for the whole relay, an open stream's too.
fn answered(
    g: &Generation,
    plan: &Plan,
    record: &mut Record<'_>,
    p: Prepared,
    mut ctx: AiCtx,
) -> Relaying {
    let Prepared {
        served:
            Served {
                conn,
                rp,
                ubuf,
                sent_at,
                first_sent_at,
                attempts,
            },
        pipelined,
        body_len,
        slot,
        own_before,
        captured_at,
    } = p;
    ctx.sent_at = sent_at;
    // Charged at the price of the model the serving upstream was sent.
    if let Some(p) = slot
        .as_ref()
        .and_then(|s| g.shared.cfg.prices.find(&s.sent))
    {
        ctx.price = Some(p);
    }
    record.sent_to(conn.addr, plan.upstream, attempts);
    record.bytes_in += body_len as u64;
    // Usage is charged under the name the serving upstream was sent.
    if let Some(s) = slot {
        ctx.model = Some(s.sent.clone());
        record.model = Some(s.sent);
    }
    record.status = rp.status;
    record.upstream_time = Some(ctx.sent_at.elapsed());
    ctx.status = rp.status;
    // Ringway's own time up to the answer's head; the relay adds its own.
    ctx.busy = own_before + first_sent_at.saturating_duration_since(captured_at) + rp.head_time;
    Relaying {
        ctx,
        conn,
        rp,
        ubuf,
        pipelined: pipelined.map(Box::new),
    }
}

/// An AI request up to its upstream's answer: body captured and edited, tokens and dollars
/// reserved, attempts made. A failure is returned as a [`Refusal`], which [`exchange`]
/// answers.
///
/// Its own future, awaited once by [`exchange`]: its locals (the request's scan, 208
/// bytes; the reservations' headers; the attempt's head and body) are borrowed on the way,
/// which would keep them in the exchange's state for the whole relay. A plain `fn` around
/// an `async move` block, so its arguments are held once.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn prepare<'a, 'r>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    plan: &'a mut Plan,
    cbuf: PoolBuf,
    record: &'a mut Record<'r>,
    extra: &'a mut ExtraHeaders,
    route_ai: &'a ai::AiRoute,
    ctx_out: &'a mut Option<AiCtx>,
) -> impl std::future::Future<Output = Result<Prepared, Refusal>> + use<'a, 'r> {
    async move {
        // The head goes upstream with its framing fields replaced by the body's
        // final length, known once the body is captured and edited. An accounted
        // route asks for an uncompressed reply, whatever the client accepts (the
        // official SDKs send `gzip, deflate`), so its usage can be read.
        let identity = route_ai.accounts();
        let mut head = head_without_framing(&cbuf[plan.head_start..plan.head_end], identity);
        let before_capture = record.since_head(std::time::Instant::now());
        // Boxed: inline, the capture's state would sit beside the reservations' and the
        // request's in this state, which every AI request keeps while waiting for its answer.
        let capture = Box::pin(captured(w, g, client, cbuf, plan, route_ai, record));
        let (ctx, pipelined, captured_at, own_before);
        // The request's scan (208 bytes) lives in this block only, so it is not kept across
        // the waits after it (a local that was borrowed keeps its place in the state until
        // its scope ends). What the rest needs of it leaves as the block's value: assigned
        // inside, while the scan is alive, each part would take a place of its own beside it.
        let (mut body, mut slot, first, input_estimate, max_tokens, asks_nothing) = {
            let (mut req, pipe) = match capture.await {
                Ok(v) => v,
                Err(next) => return Err(Refusal::Done(next)),
            };
            pipelined = pipe;
            // One clock read less on the common path: the scan just ended.
            captured_at = req.scanned_at.unwrap_or_else(std::time::Instant::now);
            own_before = before_capture + req.scan_time;
            // Nothing was asked of a model: nothing to price (a GET of /v1/models).
            let asks_nothing = req.model.is_none() && !req.has_body;
            let model = req.model.take();
            record.model = model.clone();
            let consumer = plan
                .consumer
                .and_then(|c| g.shared.filters.auth.consumer_shared(c as usize));
            ctx = ctx_out.insert(AiCtx::new(
                &g.shared.routes.get(plan.route).name,
                consumer,
                model,
                req.injected,
                req.input_estimate,
                route_ai.stats,
                captured_at,
            ));
            ctx.keepalive = route_ai.sse_keepalive;
            (
                req.body.take().map(Kept::Buf),
                req.slot.take(),
                req.upstream.unwrap_or(plan.upstream),
                req.input_estimate,
                req.max_tokens,
                asks_nothing,
            )
        };

        // Reserve tokens and dollars before anything goes upstream. A budget needs the price
        // of the model the request names (as the first upstream will be sent it), before any
        // budget is consulted.
        ctx.price = priced_name(&slot, &ctx.model).and_then(|m| g.shared.cfg.prices.find(m));
        // In a block of its own, so the loop's locals are not kept across the attempts' wait.
        {
            // Tightest headers per unit (requests are not reserved here; tokens and dollars are).
            let mut tightest: [Option<LimitHeaders>; 2] = [None, None];
            ctx.expect_reservations(plan.tokens.iter().count());
            for check in plan.tokens.iter() {
                let Filter::TokenLimit(rl) = &g.shared.filters.list[check.filter as usize] else {
                    continue;
                };
                let want = if rl.cost {
                    match ctx.price {
                        Some(p) => p.reserve_micro(
                            input_estimate,
                            max_tokens.unwrap_or(rl.conf.max_output_reserve),
                        ),
                        None if asks_nothing => continue,
                        None if rl.conf.unpriced == Unpriced::Allow => {
                            unpriced_allowed(priced_name(&slot, &ctx.model));
                            continue;
                        }
                        None => {
                            ctx.release_all();
                            record.status = 400;
                            let rej = error::MODEL_NOT_PRICED.closing_if(!plan.keep_alive);
                            let keep = if rej.close { None } else { pipelined };
                            return Err(Refusal::Reject {
                                rej,
                                keep,
                                with_extra: false,
                            });
                        }
                    }
                } else {
                    input_estimate + max_tokens.unwrap_or(DEFAULT_OUTPUT_RESERVE)
                };
                let cost = want
                    .min(rl.conf.max_reserve.unwrap_or(u64::MAX))
                    .min(rl.max_cost(check))
                    .max(1);
                // Read per filter: an acquire can wait (a cluster lease), and windows follow the clock.
                let now = now_ms();
                // A cluster-scope acquire (which may wait for a lease) is boxed, for the same
                // reason as the capture.
                let d = match rl.acquire_local(check, cost, now) {
                    Some(d) => d,
                    None => Box::pin(rl.acquire(check, cost, now, redis_timeout(g))).await,
                };
                let unit = usize::from(rl.cost);
                if let Some(h) = rl.headers(&d) {
                    if tightest[unit].is_none_or(|t| h.remaining < t.remaining || !d.admitted) {
                        tightest[unit] = Some(h);
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
                    for h in tightest.iter().flatten() {
                        let _ = extra.push_limit(h);
                    }
                    if let Some(h) = tightest[unit] {
                        let _ = h.write_retry_after(extra);
                    }
                    record.status = 429;
                    let rej = if rl.cost {
                        error::BUDGET_EXCEEDED
                    } else {
                        error::RATE_LIMITED
                    };
                    let rej = rej.closing_if(!plan.keep_alive);
                    let keep = if rej.close { None } else { pipelined };
                    return Err(Refusal::Reject {
                        rej,
                        keep,
                        with_extra: true,
                    });
                }
            }
            for h in tightest.iter().flatten() {
                let _ = extra.push_limit(h);
            }
        }

        if g.shared.routes.get(plan.route).server_timing {
            let until = std::time::Instant::now();
            let own = own_before + until.saturating_duration_since(captured_at);
            super::headers::server_timing(extra, own);
        }
        let tries = failover::Request {
            head: &mut head,
            body: &mut body,
            slot: slot.as_mut(),
            first,
            identity,
            inspect_sse: ctx.injected,
            extra,
        };
        // The attempts' state (1.5 KiB) is boxed apart and freed before the
        // relay, so a stream being relayed does not keep it.
        let served = super::in_place(|| failover::run(w, g, client, plan, tries)).await;
        let served = match served {
            Ok(s) => s,
            Err(why) => return Err(Refusal::Unserved(why)),
        };
        Ok(Prepared {
            served,
            pipelined,
            body_len: body.as_ref().map_or(0, Kept::len),
            slot,
            own_before,
            captured_at,
        })
    }
}

/// How long a cluster-scope acquire waits for Redis.
fn redis_timeout(g: &Generation) -> std::time::Duration {
    g.shared
        .cfg
        .redis
        .as_ref()
        .map_or(std::time::Duration::from_millis(200), |r| r.timeout)
}

/// The model a request is priced under: the name the first upstream will be sent (its
/// model slot's), else the one the request named.
fn priced_name<'s>(slot: &'s Option<ModelSlot>, model: &'s Option<String>) -> Option<&'s str> {
    slot.as_ref().map(|s| s.sent.as_str()).or(model.as_deref())
}

/// How an AI request ends before its relay. [`prepare`] returns it and [`exchange`] answers
/// it: awaited in `prepare`, each answer was a wait its locals (the AI context, the request's
/// scan) were kept across, which sized every request's state while it waited for its answer.
enum Refusal {
    /// What happens to the connection, already decided (a capture that failed was answered).
    Done(Next),
    /// Answer `rej`; with the limit headers gathered in the extra headers when `with_extra`.
    Reject {
        rej: error::Reject,
        keep: Option<PoolBuf>,
        with_extra: bool,
    },
    /// No attempt served the request.
    Unserved(Unserved),
}

/// Answers a [`Refusal`] (`ctx`: the request's accounting, once `prepare` made it); what
/// happens to the connection then.
#[allow(clippy::too_many_arguments)]
async fn refuse(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    head_only: bool,
    record: &mut Record<'_>,
    extra: &ExtraHeaders,
    r: Refusal,
    ctx: Option<AiCtx>,
) -> Next {
    match r {
        Refusal::Done(next) => next,
        Refusal::Reject {
            rej,
            keep,
            with_extra,
        } => {
            let extra = if with_extra { extra.as_str() } else { "" };
            reject_with(w, g, client, rej, head_only, keep, extra).await
        }
        Refusal::Unserved(why) => match ctx {
            Some(mut ctx) => unserved(w, g, client, &mut ctx, record, head_only, Some(why)).await,
            // `prepare` sets the context before any attempt.
            None => Next::Close,
        },
    }
}

/// Logs, once per process and model, that a budget let an unpriced model through at no cost.
fn unpriced_allowed(model: Option<&str>) {
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    let model = model.unwrap_or("(none)");
    let seen = SEEN.get_or_init(Default::default);
    let Ok(mut seen) = seen.lock() else { return };
    // Bounded: a client can name any model.
    if seen.len() < 1024 && seen.insert(model.to_string()) {
        crate::log::warn(&format!(
            "cost-limit: no [[prices]] entry for model {model:?}; counted at $0 (unpriced = \"allow\")"
        ));
    }
}

/// The request's body, captured, scanned and edited: boxed apart and freed once read (inline,
/// its 1.8 KiB would stay in every open stream's state). A capture that failed is answered
/// here, and what happens to the connection then is the error.
///
/// Its own future, so the capture's result (248 bytes) lives in it only: awaited in
/// [`prepare`] itself, the result took a slot of its own there, beside every later wait.
async fn captured(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    cbuf: PoolBuf,
    plan: &Plan,
    route_ai: &ai::AiRoute,
    record: &mut Record<'_>,
) -> Result<(AiRequest, Option<PoolBuf>), Next> {
    let captured = super::in_place(|| capture(w, g, client, cbuf, plan, route_ai, plan.chat)).await;
    match captured {
        Ok(v) => Ok(v),
        Err(Fail::Reject(rej)) => {
            record.status = rej.status;
            // Boxed: rare, and inline it would size every request's state.
            Err(Box::pin(reject(w, g, client, rej, plan.is_head, None)).await)
        }
        Err(Fail::Gone) => Err(Next::Close),
    }
}

/// Answers a request no attempt served (`None`: one was); what happens to the connection
/// then.
async fn unserved(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    ctx: &mut AiCtx,
    record: &mut Record<'_>,
    head_only: bool,
    unserved: Option<Unserved>,
) -> Next {
    match unserved {
        Some(Unserved::Reject(rej)) => give_up(w, g, client, ctx, record, rej, head_only).await,
        Some(Unserved::ClientGone) | None => {
            ctx.settle();
            Next::Close
        }
    }
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
