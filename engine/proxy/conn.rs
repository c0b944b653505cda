//! One client connection: requests in order, each forwarded to its upstream
//! and answered, until either side ends the connection.
//!
//! Buffers: an idle connection holds none. A request holds the client buffer
//! (its head, the first body bytes, pipelined bytes after it) and, while the
//! response is read, the upstream buffer. Nothing else is allocated per request.

use crate::runtime::{deadline, shutdown};
use std::{net::SocketAddr, rc::Rc, time::Duration};

use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
};
use std::time::Instant;

use crate::{
    buf::PoolBuf,
    h1::{BodyKind, ChunkError, ChunkedDecoder, Parsed},
    proxy::{
        error::{self, Reject},
        request::{plan_request, Plan, HEADROOM},
        response::{plan_response, RespPlan},
        transfer::{self, Route, Side, XferError},
    },
    runtime::Worker,
    upstream::{CheckoutError, UpConn},
};

/// What happens to the client connection after one exchange.
enum Next {
    /// Serve the next request; the buffer holds pipelined bytes, if any.
    KeepAlive(Option<PoolBuf>),
    /// Close the connection.
    Close,
    /// Switch to a byte tunnel with this upstream stream.
    Tunnel(TcpStream, PoolBuf, PoolBuf),
}

/// Serves one accepted client connection to its end.
pub async fn serve(w: Rc<Worker>, mut client: TcpStream, peer: SocketAddr, listener: usize) {
    let _ = client.set_nodelay(true);
    let _conn = w.stats.connection();
    let mut pending: Option<PoolBuf> = None;
    let mut first = true;
    loop {
        let buf = match pending.take() {
            Some(b) => b,
            None => {
                // Wait with no buffer held: an idle keep-alive costs no pool memory.
                let wait = if first {
                    w.server.header_timeout
                } else {
                    w.server.keepalive_timeout
                };
                // An idle wait also ends when the worker starts draining.
                match deadline::idle_timeout(wait, client.readable(false)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
                let mut b = w.pool.acquire().await;
                b.clear();
                let _ = b.put(&[0u8; HEADROOM]);
                b
            }
        };
        first = false;
        // Boxed: the exchange's state is large and lives only while a request
        // is in flight, so an idle connection's task stays a few hundred bytes.
        match Box::pin(exchange(&w, &mut client, peer, listener, buf)).await {
            Next::KeepAlive(p) => pending = p,
            Next::Close => {
                let _ = client.shutdown().await;
                return;
            }
            Next::Tunnel(up, cbuf, ubuf) => {
                Box::pin(transfer::tunnel(
                    client,
                    up,
                    cbuf,
                    ubuf,
                    w.server.keepalive_timeout,
                ))
                .await;
                return;
            }
        }
    }
}

/// Reads one request head, forwards the request, relays the response.
async fn exchange(
    w: &Worker,
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: usize,
    buf: PoolBuf,
) -> Next {
    let (plan, cbuf) = match read_request_head(w, client, peer, listener, buf).await {
        Ok(v) => v,
        Err(HeadFail::Reject(rej, keep)) => return reject(w, client, rej, false, keep).await,
        Err(HeadFail::Gone) => return Next::Close,
    };
    let has_body = !matches!(plan.body, BodyKind::None | BodyKind::Length(0));
    let pool = w.upstream(plan.upstream);

    let mut conn = match pool.checkout(false).await {
        Ok(c) => c,
        Err(e) => {
            let rej = match e {
                CheckoutError::NoEndpoint => error::NO_ENDPOINT,
                CheckoutError::NoSlot => error::NO_SLOT,
                CheckoutError::Connect(_) => error::CONNECT_FAILED,
                CheckoutError::ConnectTimeout => error::CONNECT_TIMEOUT,
            };
            // An unread body cannot stay on the connection.
            let rej = rej.closing_if(has_body || !plan.keep_alive);
            let keep = if rej.close {
                None
            } else {
                keep_pipelined(cbuf, &plan)
            };
            return reject(w, client, rej, plan.is_head, keep).await;
        }
    };

    // A request that can be sent twice keeps its head until the response
    // starts, in case the pooled connection turns out to be closed.
    let retryable = conn.reused && plan.idempotent && !has_body && !plan.upgrade;

    let mut cbuf = match send_request(w, client, &mut conn, cbuf, &plan).await {
        Ok(Sent::HeadKept(b)) if retryable => Sent::HeadKept(b),
        Ok(Sent::HeadKept(b)) => Sent::Pipelined(keep_pipelined(b, &plan)),
        Ok(sent) => sent,
        Err(SendError::Client) => return Next::Close,
        Err(SendError::Reject(rej)) => return reject(w, client, rej, plan.is_head, None).await,
    };

    let up_idle = pool.shared.conf.response_timeout;
    let mut stale_ok = retryable;
    let (rp, ubuf) = loop {
        let ubuf = match w
            .pool
            .acquire_within(w.pool.slot_size(), pool.shared.conf.connect_timeout)
            .await
        {
            Ok(b) => b,
            Err(_) => {
                return reject(
                    w,
                    client,
                    error::NO_BUFFER.closing_if(true),
                    plan.is_head,
                    None,
                )
                .await
            }
        };
        match read_response_head(w, client, &mut conn, ubuf, &plan, stale_ok).await {
            Ok(v) => break v,
            Err(RespError::Stale) => {
                // The pooled connection was closed under us: once more, fresh.
                stale_ok = false;
                let Sent::HeadKept(b) = cbuf else {
                    return Next::Close;
                };
                cbuf = match retry_fresh(w, &mut conn, b, &plan).await {
                    Ok(b) => Sent::HeadKept(b),
                    Err(rej) => {
                        return reject(w, client, rej.closing_if(true), plan.is_head, None).await
                    }
                };
            }
            Err(RespError::Reject(rej)) => {
                return reject(w, client, rej.closing_if(true), plan.is_head, None).await
            }
            Err(RespError::Client) => return Next::Close,
        }
    };
    // The head was only kept for a retry; its job is done now.
    let cbuf = match cbuf {
        Sent::HeadKept(b) => keep_pipelined(b, &plan),
        Sent::Pipelined(p) => p,
    };

    if rp.status == 101 {
        let Some(up) = conn.into_stream() else {
            return Next::Close;
        };
        let end = ubuf.len();
        let Ok(mut ubuf) = write_all(client, ubuf, rp.head_start..end, w.server.body_timeout).await
        else {
            return Next::Close;
        };
        ubuf.clear();
        let cbuf = match cbuf {
            Some(mut b) => {
                b.consume(HEADROOM);
                b
            }
            None => match w.pool.try_acquire() {
                Some(b) => b,
                None => return Next::Close,
            },
        };
        return Next::Tunnel(up, cbuf, ubuf);
    }

    if relay_response(w, client, &mut conn, ubuf, &rp, up_idle)
        .await
        .is_err()
    {
        return Next::Close;
    }
    if rp.upstream_keep_alive {
        conn.set_reusable();
    }
    drop(conn);
    if rp.client_close {
        return Next::Close;
    }
    Next::KeepAlive(cbuf)
}

/// Where the client buffer stands once the request is sent.
enum Sent {
    /// The rewritten head is still in place (a retry may resend it).
    HeadKept(PoolBuf),
    /// Only pipelined bytes remain, behind the headroom (or nothing).
    Pipelined(Option<PoolBuf>),
}

/// Why no request head could be planned.
enum HeadFail {
    /// Answer this; keep the connection with these pipelined bytes if the
    /// rejection allows it.
    Reject(Reject, Option<PoolBuf>),
    /// The client went away or timed out: close silently.
    Gone,
}

/// Reads until a whole head is in the buffer and planned.
async fn read_request_head(
    w: &Worker,
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: usize,
    mut buf: PoolBuf,
) -> Result<(Plan, PoolBuf), HeadFail> {
    let deadline = Instant::now() + w.server.header_timeout;
    loop {
        if buf.len() > HEADROOM {
            match plan_request(w, &mut buf, listener, peer.ip()) {
                Ok(Parsed::Complete(plan)) => return Ok((plan, buf)),
                Ok(Parsed::Partial) => {}
                Err(rejected) => {
                    let keep = match rejected.head_end {
                        Some(end) if !rejected.reject.close => keep_from(buf, end),
                        _ => None,
                    };
                    return Err(HeadFail::Reject(rejected.reject, keep));
                }
            }
        }
        if buf.spare() == 0 {
            buf = grow(w, buf, deadline)
                .await
                .map_err(|rej| HeadFail::Reject(rej, None))?;
        }
        let (len, cap) = (buf.len(), buf.capacity());
        match deadline::timeout_at(deadline, client.read(buf.slice_mut(len..cap))).await {
            Ok((Ok(0), _)) | Ok((Err(_), _)) | Err(_) => return Err(HeadFail::Gone),
            Ok((Ok(_), s)) => buf = s.into_inner(),
        }
    }
}

/// Moves a head that outgrew one buffer into a buffer of `max_header_bytes`.
async fn grow(w: &Worker, buf: PoolBuf, deadline: Instant) -> Result<PoolBuf, Reject> {
    let want = HEADROOM + w.limits.max_header_bytes + 1;
    if buf.capacity() >= want {
        return Err(Reject::closing(
            431,
            "header_too_large",
            "request head exceeds max_header_bytes",
        ));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let mut big = w
        .pool
        .acquire_within(want, left)
        .await
        .map_err(|_| error::NO_BUFFER.closing_if(true))?;
    let _ = big.put(&buf);
    Ok(big)
}

enum SendError {
    /// The client went away.
    Client,
    /// Answer the client with this.
    Reject(Reject),
}

/// Sends the planned head and the body.
async fn send_request(
    w: &Worker,
    client: &mut TcpStream,
    conn: &mut UpConn,
    mut cbuf: PoolBuf,
    plan: &Plan,
) -> Result<Sent, SendError> {
    let up_idle = w.upstream(plan.upstream).shared.conf.response_timeout;
    let in_buf = cbuf.len() - plan.head_end;
    match plan.body {
        BodyKind::None | BodyKind::CloseDelimited => {
            // A write to a pooled connection the upstream already closed
            // still succeeds (the reset comes later), so failing here is a
            // real upstream failure, not a stale connection.
            write_all(conn.stream(), cbuf, plan.head_start..plan.head_end, up_idle)
                .await
                .map(Sent::HeadKept)
                .map_err(|()| SendError::Reject(error::BAD_GATEWAY.closing_if(true)))
        }
        BodyKind::Length(n) => {
            let first = (n.min(in_buf as u64)) as usize;
            let end = plan.head_end + first;
            cbuf = write_all(conn.stream(), cbuf, plan.head_start..end, up_idle)
                .await
                .map_err(|()| SendError::Reject(error::BAD_GATEWAY.closing_if(true)))?;
            let remaining = n - first as u64;
            if remaining == 0 {
                return Ok(Sent::HeadKept(cbuf));
            }
            if plan.expect_continue {
                continue_100(client, w.server.body_timeout).await?;
            }
            let mut route = Route {
                src: client,
                src_side: Side::Client,
                dst: conn.stream(),
                dst_side: Side::Upstream,
                idle: w.server.body_timeout,
            };
            // The body did not fit with the head, so nothing follows it yet.
            let res = if remaining >= w.splice_min {
                drop(cbuf);
                transfer::splice_exact(&mut route, &w.pipes, remaining).await
            } else {
                cbuf.clear();
                transfer::copy_exact(&mut route, cbuf, remaining)
                    .await
                    .map(drop)
            };
            res.map(|()| Sent::Pipelined(None))
                .map_err(request_body_error)
        }
        BodyKind::Chunked => {
            cbuf = write_all(conn.stream(), cbuf, plan.head_start..plan.head_end, up_idle)
                .await
                .map_err(|()| SendError::Reject(error::BAD_GATEWAY.closing_if(true)))?;
            if plan.expect_continue && in_buf == 0 {
                continue_100(client, w.server.body_timeout).await?;
            }
            cbuf.consume(plan.head_end);
            let mut decoder = ChunkedDecoder::new(w.max_body);
            let mut route = Route {
                src: client,
                src_side: Side::Client,
                dst: conn.stream(),
                dst_side: Side::Upstream,
                idle: w.server.body_timeout,
            };
            let rest = transfer::forward_chunked(&mut route, cbuf, &mut decoder, false)
                .await
                .map_err(request_body_error)?;
            // Pipelined bytes after the body go back behind the headroom.
            Ok(Sent::Pipelined(rebase(rest)))
        }
    }
}

/// The client buffer after a request whose head (and Content-Length body,
/// if any) is still in it: what follows is pipelined.
fn keep_pipelined(buf: PoolBuf, plan: &Plan) -> Option<PoolBuf> {
    let body_in_buf = match plan.body {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    keep_from(buf, plan.head_end.saturating_add(body_in_buf as usize))
}

/// Keeps `buf[from..]` behind a fresh headroom, or nothing when it is empty.
fn keep_from(mut buf: PoolBuf, from: usize) -> Option<PoolBuf> {
    if buf.len() <= from {
        return None;
    }
    buf.consume(from - HEADROOM);
    buf[..HEADROOM].fill(0);
    Some(buf)
}

/// Puts bytes at the front of `buf` behind a fresh headroom.
fn rebase(mut buf: PoolBuf) -> Option<PoolBuf> {
    if buf.is_empty() {
        return None;
    }
    let len = buf.len();
    if len + HEADROOM > buf.capacity() {
        // Cannot happen for pipelined bytes (they were read into this buffer
        // behind the headroom); drop them rather than grow.
        return None;
    }
    let _ = buf.put(&[0u8; HEADROOM]);
    buf.copy_within(0..len, HEADROOM);
    Some(buf)
}

fn request_body_error(e: XferError) -> SendError {
    match e {
        XferError::Chunk(Side::Client, ChunkError::BodyTooLarge) => {
            SendError::Reject(error::BODY_TOO_LARGE)
        }
        XferError::Chunk(Side::Client, _) => SendError::Reject(error::BAD_BODY),
        e if e.side() == Side::Client => SendError::Client,
        _ => SendError::Reject(error::BAD_GATEWAY.closing_if(true)),
    }
}

async fn continue_100(client: &mut TcpStream, idle: Duration) -> Result<(), SendError> {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    match deadline::timeout(idle, client.write_all(CONTINUE)).await {
        Ok((Ok(_), _)) => Ok(()),
        _ => Err(SendError::Client),
    }
}

/// Replaces a stale pooled connection with a fresh one and resends the head.
async fn retry_fresh(
    w: &Worker,
    conn: &mut UpConn,
    cbuf: PoolBuf,
    plan: &Plan,
) -> Result<PoolBuf, Reject> {
    let pool = w.upstream(plan.upstream);
    let fresh = match pool.checkout(true).await {
        Ok(c) => c,
        Err(CheckoutError::ConnectTimeout) => return Err(error::CONNECT_TIMEOUT),
        Err(CheckoutError::NoSlot) => return Err(error::NO_SLOT),
        Err(_) => return Err(error::CONNECT_FAILED),
    };
    // The old guard drops here, closing the stale stream.
    *conn = fresh;
    let idle = pool.shared.conf.response_timeout;
    write_all(conn.stream(), cbuf, plan.head_start..plan.head_end, idle)
        .await
        .map_err(|()| error::BAD_GATEWAY.closing_if(true))
}

enum RespError {
    /// Nothing came back on a reused connection: it was likely closed.
    Stale,
    /// Answer the client with this.
    Reject(Reject),
    /// The client went away while interim responses were relayed.
    Client,
}

/// Reads the upstream's response head within `response_timeout`, relaying
/// interim (1xx) responses to the client on the way.
async fn read_response_head(
    w: &Worker,
    client: &mut TcpStream,
    conn: &mut UpConn,
    mut ubuf: PoolBuf,
    plan: &Plan,
    may_be_stale: bool,
) -> Result<(RespPlan, PoolBuf), RespError> {
    let conf = &w.upstream(plan.upstream).shared.conf;
    let deadline = Instant::now() + conf.response_timeout;
    ubuf.clear();
    let _ = ubuf.put(&[0u8; HEADROOM]);
    let mut got_any = false;
    loop {
        if ubuf.len() > HEADROOM {
            match plan_response(w, &mut ubuf, plan, shutdown::is_draining()) {
                Ok(Parsed::Complete(rp)) if rp.interim => {
                    // 100 Continue was already answered by Ringway; others
                    // (103 Early Hints) go to HTTP/1.1 clients.
                    if rp.status != 100 && plan.version == 1 {
                        let r = rp.head_start..rp.head_end;
                        ubuf = write_all(client, ubuf, r, w.server.body_timeout)
                            .await
                            .map_err(|()| RespError::Client)?;
                    }
                    ubuf.consume(rp.head_end - HEADROOM);
                    ubuf[..HEADROOM].fill(0);
                    continue;
                }
                Ok(Parsed::Complete(rp)) => return Ok((rp, ubuf)),
                Ok(Parsed::Partial) => {}
                Err(rej) => return Err(RespError::Reject(rej)),
            }
        }
        if ubuf.spare() == 0 {
            let want = HEADROOM + w.limits.max_header_bytes + 1;
            if ubuf.capacity() >= want {
                return Err(RespError::Reject(error::BAD_RESPONSE));
            }
            let mut big = w
                .pool
                .acquire_within(want, conf.connect_timeout)
                .await
                .map_err(|_| RespError::Reject(error::NO_BUFFER.closing_if(true)))?;
            let _ = big.put(&ubuf);
            ubuf = big;
        }
        let (len, cap) = (ubuf.len(), ubuf.capacity());
        match deadline::timeout_at(deadline, conn.stream().read(ubuf.slice_mut(len..cap))).await {
            Ok((Ok(0), _)) | Ok((Err(_), _)) if may_be_stale && !got_any => {
                return Err(RespError::Stale)
            }
            Ok((Ok(0), _)) | Ok((Err(_), _)) => {
                return Err(RespError::Reject(error::BAD_GATEWAY.closing_if(true)))
            }
            Err(_) => return Err(RespError::Reject(error::RESPONSE_TIMEOUT)),
            Ok((Ok(_), s)) => {
                got_any = true;
                ubuf = s.into_inner();
            }
        }
    }
}

/// Sends the response head and body to the client.
async fn relay_response(
    w: &Worker,
    client: &mut TcpStream,
    conn: &mut UpConn,
    mut ubuf: PoolBuf,
    rp: &RespPlan,
    idle: Duration,
) -> Result<(), XferError> {
    let in_buf = ubuf.len() - rp.head_end;
    let write_err = |()| XferError::Eof(Side::Client);
    match rp.body {
        BodyKind::None => {
            write_all(
                client,
                ubuf,
                rp.head_start..rp.head_end,
                w.server.body_timeout,
            )
            .await
            .map_err(write_err)?;
            if in_buf > 0 {
                // Bytes after a body-less response: the upstream is confused.
                return Err(XferError::Eof(Side::Upstream));
            }
            Ok(())
        }
        BodyKind::Length(n) => {
            let first = n.min(in_buf as u64) as usize;
            ubuf = write_all(
                client,
                ubuf,
                rp.head_start..rp.head_end + first,
                w.server.body_timeout,
            )
            .await
            .map_err(write_err)?;
            if in_buf as u64 > n {
                return Err(XferError::Eof(Side::Upstream));
            }
            let remaining = n - first as u64;
            if remaining == 0 {
                return Ok(());
            }
            let mut route = Route {
                src: conn.stream(),
                src_side: Side::Upstream,
                dst: client,
                dst_side: Side::Client,
                idle,
            };
            if remaining >= w.splice_min {
                drop(ubuf);
                transfer::splice_exact(&mut route, &w.pipes, remaining).await
            } else {
                ubuf.clear();
                transfer::copy_exact(&mut route, ubuf, remaining)
                    .await
                    .map(|_| ())
            }
        }
        BodyKind::Chunked => {
            ubuf = write_all(
                client,
                ubuf,
                rp.head_start..rp.head_end,
                w.server.body_timeout,
            )
            .await
            .map_err(write_err)?;
            ubuf.consume(rp.head_end);
            let mut decoder = ChunkedDecoder::new(u64::MAX);
            let mut route = Route {
                src: conn.stream(),
                src_side: Side::Upstream,
                dst: client,
                dst_side: Side::Client,
                idle,
            };
            let rest =
                transfer::forward_chunked(&mut route, ubuf, &mut decoder, rp.dechunk).await?;
            if !rest.is_empty() {
                return Err(XferError::Eof(Side::Upstream));
            }
            Ok(())
        }
        BodyKind::CloseDelimited => {
            let end = ubuf.len();
            ubuf = write_all(client, ubuf, rp.head_start..end, w.server.body_timeout)
                .await
                .map_err(write_err)?;
            ubuf.clear();
            let mut route = Route {
                src: conn.stream(),
                src_side: Side::Upstream,
                dst: client,
                dst_side: Side::Client,
                idle,
            };
            transfer::copy_to_eof(&mut route, ubuf).await.map(|_| ())
        }
    }
}

/// Writes `buf[range]` whole and hands the buffer back; on failure the
/// buffer is gone and the caller closes the connection.
async fn write_all(
    stream: &mut TcpStream,
    buf: PoolBuf,
    range: std::ops::Range<usize>,
    idle: Duration,
) -> Result<PoolBuf, ()> {
    transfer::write_range(stream, buf, range, idle, Side::Client)
        .await
        .map_err(|_| ())
}

/// Writes a rejection and decides the connection's fate; `keep` holds the
/// pipelined bytes that follow the rejected request, if it stays open.
async fn reject(
    w: &Worker,
    client: &mut TcpStream,
    rej: Reject,
    head_only: bool,
    keep: Option<PoolBuf>,
) -> Next {
    let bytes = rej.render(head_only, "");
    let ok = matches!(
        deadline::timeout(w.server.body_timeout, client.write_all(bytes)).await,
        Ok((Ok(_), _))
    );
    if !ok {
        return Next::Close;
    }
    if rej.close {
        drop(keep);
        linger(w, client).await;
        return Next::Close;
    }
    Next::KeepAlive(keep)
}

/// Half-closes and discards what the client still sends for a moment, so the
/// error response is not destroyed by a reset (unread data at close() makes
/// the kernel send RST, and the client may lose the response with it).
async fn linger(w: &Worker, client: &mut TcpStream) {
    let _ = client.shutdown().await;
    let Some(buf) = w.pool.try_acquire() else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = buf;
    let mut total = 0usize;
    while total < 1 << 20 {
        let cap = buf.capacity();
        buf.clear();
        match deadline::timeout_at(deadline, client.read(buf.slice_mut(0..cap))).await {
            Ok((Ok(n), b)) if n > 0 => {
                total += n;
                buf = b.into_inner();
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, Fut>(_: impl Fn(A, B, C, D) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn connection_task_stays_small() {
        let serve_size = future_size(serve);
        // An idle keep-alive connection is this future plus its socket.
        assert!(serve_size <= 768, "serve future grew to {serve_size} bytes");
    }
}
