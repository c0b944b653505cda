//! One client connection: requests in order, each forwarded to its upstream
//! and answered, until either side ends the connection.
//!
//! Buffers: an idle connection holds none. A request holds the client buffer
//! (its head, the first body bytes, pipelined bytes after it) and, while the
//! response is read, the upstream buffer. Nothing else is allocated per request.

use std::{net::SocketAddr, rc::Rc, time::Duration};

use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
    time::Instant,
};

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
                match monoio::time::timeout(wait, client.readable(false)).await {
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
        match exchange(&w, &mut client, peer, listener, buf).await {
            Next::KeepAlive(p) => pending = p,
            Next::Close => {
                let _ = client.shutdown().await;
                return;
            }
            Next::Tunnel(up, cbuf, ubuf) => {
                transfer::tunnel(client, up, cbuf, ubuf, w.server.keepalive_timeout).await;
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
        Err(Some(rej)) => return reject(w, client, rej, false).await,
        Err(None) => return Next::Close,
    };
    let has_body = !matches!(plan.body, BodyKind::None | BodyKind::Length(0));

    let pool = w.upstream(plan.upstream);
    let mut conn = match pool.checkout(false).await {
        Ok(c) => c,
        Err(e) => {
            let mut rej = match e {
                CheckoutError::NoEndpoint => error::NO_ENDPOINT,
                CheckoutError::NoSlot => error::NO_SLOT,
                CheckoutError::Connect(_) => error::CONNECT_FAILED,
                CheckoutError::ConnectTimeout => error::CONNECT_TIMEOUT,
            };
            // An unread body cannot stay on the connection.
            rej.close |= has_body || !plan.keep_alive;
            return reject(w, client, rej, plan.is_head).await;
        }
    };

    // A request that can be sent twice keeps its head until the response
    // starts, in case the pooled connection turns out to be closed.
    let retryable = conn.reused && plan.idempotent && !has_body && !plan.upgrade;

    // Send the head, then the body by its framing.
    let sent = send_request(w, client, &mut conn, cbuf, &plan).await;
    let leftover = match sent {
        Ok(b) => b,
        Err(SendError::Upstream) => {
            return reject(w, client, error::BAD_GATEWAY.closing_if(true), plan.is_head).await
        }
        Err(SendError::Client) => return Next::Close,
        Err(SendError::Reject(rej)) => return reject(w, client, rej, plan.is_head).await,
    };
    let mut cbuf: Option<PoolBuf> = leftover;

    // Read the response head (interim 1xx responses are relayed on the way).
    let ubuf = match w
        .pool
        .acquire_within(w.pool.slot_size(), pool.shared.conf.connect_timeout)
        .await
    {
        Ok(b) => b,
        Err(_) => return reject(w, client, error::NO_BUFFER.closing_if(true), plan.is_head).await,
    };
    let head = read_response_head(w, client, &mut conn, ubuf, &plan, retryable).await;
    let (rp, ubuf) = match head {
        Ok(v) => v,
        Err(RespError::Stale) if retryable => {
            // The pooled connection was closed under us: once more, fresh.
            let Some(b) = cbuf.take() else {
                return Next::Close;
            };
            let b = match retry_fresh(w, &mut conn, b, &plan).await {
                Ok(b) => b,
                Err(rej) => return reject(w, client, rej, plan.is_head).await,
            };
            cbuf = b;
            let ubuf = match w
                .pool
                .acquire_within(w.pool.slot_size(), pool.shared.conf.connect_timeout)
                .await
            {
                Ok(b) => b,
                Err(_) => {
                    return reject(w, client, error::NO_BUFFER.closing_if(true), plan.is_head).await
                }
            };
            match read_response_head(w, client, &mut conn, ubuf, &plan, false).await {
                Ok(v) => v,
                Err(RespError::Reject(rej)) => {
                    return reject(w, client, rej.closing_if(true), plan.is_head).await
                }
                Err(RespError::Stale) => {
                    return reject(w, client, error::BAD_GATEWAY.closing_if(true), plan.is_head)
                        .await
                }
                Err(RespError::Client) => return Next::Close,
            }
        }
        Err(RespError::Stale) => {
            return reject(w, client, error::BAD_GATEWAY.closing_if(true), plan.is_head).await
        }
        Err(RespError::Reject(rej)) => {
            return reject(w, client, rej.closing_if(true), plan.is_head).await
        }
        Err(RespError::Client) => return Next::Close,
    };
    // The head may still be held for a retry; its job is done now.
    let cbuf = cbuf.and_then(|b| keep_pipelined(b, plan.head_end, &plan));

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

    match relay_response(
        w,
        client,
        &mut conn,
        ubuf,
        &rp,
        pool.shared.conf.response_timeout,
    )
    .await
    {
        Ok(()) => {}
        Err(_) => return Next::Close,
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

/// Reads until a whole head is in the buffer and planned.
/// `Err(None)`: the client went away or timed out (close silently).
async fn read_request_head(
    w: &Worker,
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: usize,
    mut buf: PoolBuf,
) -> Result<(Plan, PoolBuf), Option<Reject>> {
    let deadline = Instant::now() + w.server.header_timeout;
    loop {
        if buf.len() > HEADROOM {
            match plan_request(w, &mut buf, listener, peer.ip()) {
                Ok(Parsed::Complete(plan)) => return Ok((plan, buf)),
                Ok(Parsed::Partial) => {}
                Err(rej) => return Err(Some(rej)),
            }
        }
        if buf.spare() == 0 {
            buf = grow(w, buf, deadline).await?;
        }
        let (len, cap) = (buf.len(), buf.capacity());
        match monoio::time::timeout_at(deadline, client.read(buf.slice_mut(len..cap))).await {
            Ok((Ok(0), _)) | Ok((Err(_), _)) | Err(_) => return Err(None),
            Ok((Ok(_), s)) => buf = s.into_inner(),
        }
    }
}

/// Moves a head that outgrew one buffer into a buffer of `max_header_bytes`.
async fn grow(w: &Worker, buf: PoolBuf, deadline: Instant) -> Result<PoolBuf, Option<Reject>> {
    let want = HEADROOM + w.limits.max_header_bytes + 1;
    if buf.capacity() >= want {
        return Err(Some(Reject::closing(
            431,
            "header_too_large",
            "request head exceeds max_header_bytes",
        )));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let mut big = w
        .pool
        .acquire_within(want, left)
        .await
        .map_err(|_| Some(error::NO_BUFFER.closing_if(true)))?;
    let _ = big.put(&buf);
    Ok(big)
}

enum SendError {
    /// Writing the head failed (maybe a stale pooled connection); the head
    /// is lost with the buffer, so a retry rebuilds nothing: it fails over.
    Upstream,
    /// The client went away.
    Client,
    /// Answer the client with this.
    Reject(Reject),
}

/// Sends the planned head and the body. Returns the client buffer when it
/// must be kept: for a retry (head still in place) or for pipelined bytes.
async fn send_request(
    w: &Worker,
    client: &mut TcpStream,
    conn: &mut UpConn,
    mut cbuf: PoolBuf,
    plan: &Plan,
) -> Result<Option<PoolBuf>, SendError> {
    let up_idle = w.upstream(plan.upstream).shared.conf.response_timeout;
    let in_buf = cbuf.len() - plan.head_end;
    match plan.body {
        BodyKind::None | BodyKind::CloseDelimited => {
            // Keep the head: a retry resends it. `write_range` only loses the
            // buffer on timeout, which is no stale-connection symptom.
            match transfer::write_range(
                conn.stream(),
                cbuf,
                plan.head_start..plan.head_end,
                up_idle,
                Side::Upstream,
            )
            .await
            {
                Ok(b) => Ok(Some(b)),
                Err(_) => Err(SendError::Upstream),
            }
        }
        BodyKind::Length(n) => {
            let first = (n.min(in_buf as u64)) as usize;
            let end = plan.head_end + first;
            cbuf = write_all(conn.stream(), cbuf, plan.head_start..end, up_idle)
                .await
                .map_err(|()| SendError::Reject(error::BAD_GATEWAY.closing_if(true)))?;
            let remaining = n - first as u64;
            if remaining == 0 {
                return Ok(Some(cbuf));
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
            let res = if remaining >= w.splice_min {
                drop(cbuf);
                transfer::splice_exact(&mut route, &w.pipes, remaining)
                    .await
                    .map(|()| None)
            } else {
                cbuf.clear();
                transfer::copy_exact(&mut route, cbuf, remaining)
                    .await
                    .map(|_| None)
            };
            res.map_err(request_body_error)
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
            Ok(rebase(rest))
        }
    }
}

/// The client buffer after a request: pipelined bytes moved behind the
/// headroom, or nothing when there are none.
fn keep_pipelined(mut buf: PoolBuf, head_end: usize, plan: &Plan) -> Option<PoolBuf> {
    let body_in_buf = match plan.body {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    let from = head_end.saturating_add(body_in_buf as usize);
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
    match monoio::time::timeout(idle, client.write_all(CONTINUE)).await {
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
) -> Result<Option<PoolBuf>, Reject> {
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
    match write_all(conn.stream(), cbuf, plan.head_start..plan.head_end, idle).await {
        Ok(b) => Ok(Some(b)),
        Err(()) => Err(error::BAD_GATEWAY.closing_if(true)),
    }
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
            match plan_response(w, &mut ubuf, plan, false) {
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
        match monoio::time::timeout_at(deadline, conn.stream().read(ubuf.slice_mut(len..cap))).await
        {
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

/// Writes a rejection and decides the connection's fate.
async fn reject(w: &Worker, client: &mut TcpStream, rej: Reject, head_only: bool) -> Next {
    let bytes = rej.render(head_only, "");
    let ok = matches!(
        monoio::time::timeout(w.server.body_timeout, client.write_all(bytes)).await,
        Ok((Ok(_), _))
    );
    if !ok {
        return Next::Close;
    }
    if rej.close {
        linger(w, client).await;
        return Next::Close;
    }
    Next::KeepAlive(None)
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
        match monoio::time::timeout_at(deadline, client.read(buf.slice_mut(0..cap))).await {
            Ok((Ok(n), b)) if n > 0 => {
                total += n;
                buf = b.into_inner();
            }
            _ => return,
        }
    }
}
