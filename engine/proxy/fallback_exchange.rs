//! A request without a body on a plain route with `fallbacks`: sent with [`failover::run`]
//! like an AI request, then relayed as any plain response. A request with a body is not
//! held whole on a plain route, so it goes the direct way and is never sent twice.

use super::{
    conn::Next,
    failover::{self, head_without_framing, Served, Unserved},
    headers::ExtraHeaders,
    record::Record,
    reject::reject,
    request::Plan,
    respond::relay_response,
    send::keep_pipelined,
};
use crate::{
    buf::PoolBuf,
    runtime::{Generation, Worker},
    transport::Stream,
};

/// Serves one body-less request on a route with fallbacks, after its limits passed.
///
/// Shaped as the AI exchange is, for the same reason (its state is what an open stream on
/// this route holds): a plain `fn` around an `async move` block, so the arguments are held
/// once; the attempts boxed apart and freed before the relay; and a failure answered after
/// the attempts' result is moved out whole, so the result is not kept through the relay.
// `unused_assignments`: the record is read by its `Drop` (the access-log line); rustc does not
// follow that through a captured variable of an `async move` block.
#[allow(clippy::manual_async_fn, unused_assignments)]
pub(super) fn exchange<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    mut plan: Plan,
    cbuf: PoolBuf,
    mut record: Record<'a>,
    mut extra: ExtraHeaders,
) -> impl std::future::Future<Output = Next> + 'a {
    async move {
        let mut head = head_without_framing(&cbuf[plan.head_start..plan.head_end], false);
        let mut pipelined = keep_pipelined(cbuf, &plan);
        let mut body = None;
        let before_upstream = record.since_head(std::time::Instant::now());
        if g.shared.routes.get(plan.route).server_timing {
            super::headers::server_timing(&mut extra, before_upstream);
        }
        let req = failover::Request {
            head: &mut head,
            body: &mut body,
            slot: None,
            first: plan.upstream,
            identity: false,
            inspect_sse: false,
            extra: &extra,
        };
        let served = super::in_place(|| failover::run(w, g, client, &mut plan, req)).await;
        let served = match served {
            Ok(s) => s,
            Err(_) => {
                let Some(Unserved::Reject(rej)) = served.err() else {
                    return Next::Close;
                };
                record.status = rej.status;
                let rej = rej.closing_if(!plan.keep_alive);
                let keep = if rej.close { None } else { pipelined.take() };
                return reject(w, g, client, rej, plan.is_head, keep).await;
            }
        };
        let Served {
            mut conn,
            rp,
            ubuf,
            sent_at,
            attempts,
            ..
        } = served;
        record.sent_to(conn.addr, plan.upstream, attempts);
        record.status = rp.status;
        record.upstream_time = Some(sent_at.elapsed());
        record.overhead = Some(before_upstream + rp.head_time);
        let up_idle = g.upstream(plan.upstream).shared.conf.response_timeout;
        match relay_response(w, g, client, &mut conn, ubuf, &rp, up_idle).await {
            Ok(r) => {
                record.bytes_out = r.bytes;
                failover::after_relay(conn, &rp, r.upstream_clean, pipelined)
            }
            Err(_) => Next::Close,
        }
    }
}
