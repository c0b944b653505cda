//! One client connection: requests in order, each forwarded to its upstream
//! and answered, until either side ends the connection.
//!
//! Buffers: an idle connection holds none. A request holds the client buffer
//! (its head, the first body bytes, pipelined bytes after it) and, while the
//! response is read, the upstream buffer. Nothing else is allocated per request.

use crate::runtime::{deadline, shutdown};
use std::{io::Write as _, net::SocketAddr, rc::Rc, time::Duration};

use ringway_filters::limit::window::LimitHeaders;

use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt},
    net::TcpStream,
};
use std::time::Instant;

use crate::{
    accesslog,
    buf::PoolBuf,
    filter::Filter,
    h1::{BodyKind, ChunkError, ChunkedDecoder, Parsed},
    proxy::headers::ExtraHeaders,
    proxy::{
        error::{self, Reject},
        request::{plan_request, Plan, RequestId, HEADROOM},
        response::{plan_response, RespPlan},
        transfer::{self, Route, Side, XferError},
    },
    runtime::{Generation, Worker},
    upstream::health::now_ms,
    upstream::{pool::Pick, CheckoutError, UpConn},
};

/// What happens to the client connection after one exchange.
pub(super) enum Next {
    /// Serve the next request; the buffer holds pipelined bytes, if any.
    KeepAlive(Option<PoolBuf>),
    /// Close the connection.
    Close,
    /// Switch to a byte tunnel with this upstream stream.
    Tunnel(TcpStream, PoolBuf, PoolBuf),
}

/// Serves one accepted client connection to its end.
pub async fn serve(w: Rc<Worker>, mut client: TcpStream, peer: SocketAddr, listener: SocketAddr) {
    let _ = client.set_nodelay(true);
    let _conn = ConnGuard::new(&w);
    let mut pending: Option<PoolBuf> = None;
    let mut first = true;
    loop {
        let buf = match pending.take() {
            Some(b) => b,
            None => {
                // Wait with no buffer held: an idle keep-alive costs no pool memory.
                let wait = {
                    let g = w.generation();
                    if first {
                        g.server.header_timeout
                    } else {
                        g.server.keepalive_timeout
                    }
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
        // A request runs on the configuration in force when it starts.
        let g = w.generation();
        let Some(listener_idx) = g.listener_index(listener) else {
            // The listener was removed by a reload: finish with this connection.
            return;
        };
        // Boxed: the exchange's state is large and lives only while a request
        // is in flight, so an idle connection's task stays a few hundred bytes.
        match Box::pin(exchange(&w, &g, &mut client, peer, listener_idx, buf)).await {
            Next::KeepAlive(p) => pending = p,
            Next::Close => {
                let _ = client.shutdown().await;
                return;
            }
            Next::Tunnel(up, cbuf, ubuf) => {
                let idle = g.server.keepalive_timeout;
                drop(g);
                Box::pin(transfer::tunnel(client, up, cbuf, ubuf, idle)).await;
                return;
            }
        }
    }
}

/// Counts an open client connection in the worker's gauge.
struct ConnGuard(Rc<Worker>);

impl ConnGuard {
    fn new(w: &Rc<Worker>) -> Self {
        w.stats.connections.add(1);
        Self(w.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.stats.connections.sub(1);
    }
}

/// Reads one request head, forwards the request, relays the response.
async fn exchange(
    w: &Worker,
    g: &Generation,
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: usize,
    buf: PoolBuf,
) -> Next {
    let (plan, cbuf) = match read_request_head(w, g, client, peer, listener, buf).await {
        Ok(v) => v,
        Err(HeadFail::Reject(rej, keep, route)) => {
            w.stats.rejected.add(1);
            let _record = route.map(|b| {
                let (r, id, head_len) = *b;
                let mut rec = Record::bare(w, g, r, peer, id, head_len);
                rec.status = rej.status;
                rec
            });
            return reject(w, g, client, rej, false, keep).await;
        }
        Err(HeadFail::Gone) => return Next::Close,
    };
    let mut record = Record::new(w, g, &plan, peer);
    let has_body = !matches!(plan.body, BodyKind::None | BodyKind::Length(0));

    // Limits, before anything goes upstream.
    let mut extra = ExtraHeaders::default();
    if !plan.limits.is_empty() {
        if let Err(rej) = check_limits(g, &plan, &mut extra).await {
            record.status = rej.status;
            let rej = rej.closing_if(has_body || !plan.keep_alive);
            let keep = if rej.close {
                None
            } else {
                keep_pipelined(cbuf, &plan)
            };
            return reject_with(w, g, client, rej, plan.is_head, keep, extra.as_str()).await;
        }
    }
    if crate::ai::route(&g.shared, plan.route).active() {
        return super::ai_exchange::exchange(w, g, client, plan, cbuf, record, extra).await;
    }
    let pool = g.upstream(plan.upstream);
    let retries = pool.shared.conf.retries as usize;
    let mut tried = Tried::default();

    // Connect, moving on to another endpoint on failure, `retries` times.
    let mut conn = loop {
        let pick = Pick {
            exclude: tried.as_slice(),
            hash_key: plan.hash_key,
        };
        let err = match pool.checkout(&pick, false).await {
            Ok(c) => break c,
            Err(e) => e,
        };
        if let CheckoutError::Connect(idx, _) | CheckoutError::ConnectTimeout(idx) = err {
            pool.report_failure(idx);
            if tried.len() < retries && tried.push(idx) {
                pool.stats.retries.add(1);
                continue;
            }
        }
        let rej = match err {
            CheckoutError::NoEndpoint => error::NO_ENDPOINT,
            CheckoutError::AllDown => error::ALL_DOWN,
            CheckoutError::NoSlot => error::NO_SLOT,
            CheckoutError::Connect(..) => error::CONNECT_FAILED,
            CheckoutError::ConnectTimeout(_) => error::CONNECT_TIMEOUT,
        };
        // An unread body cannot stay on the connection.
        let rej = rej.closing_if(has_body || !plan.keep_alive);
        let keep = if rej.close {
            None
        } else {
            keep_pipelined(cbuf, &plan)
        };
        record.status = rej.status;
        return reject(w, g, client, rej, plan.is_head, keep).await;
    };

    record.upstream = Some(conn.addr);
    let sent_at = Instant::now();
    record.bytes_in += match plan.body {
        BodyKind::Length(n) => n,
        _ => 0,
    };

    // A request that can be sent twice keeps its head until the response
    // starts, in case the connection fails before answering.
    let replayable = plan.idempotent && !has_body && !plan.upgrade;

    let mut cbuf = match send_request(w, g, client, &mut conn, cbuf, &plan).await {
        Ok(Sent::HeadKept(b)) if replayable => Sent::HeadKept(b),
        Ok(Sent::HeadKept(b)) => Sent::Pipelined(keep_pipelined(b, &plan)),
        Ok(sent) => sent,
        Err(SendError::Client) => return Next::Close,
        Err(SendError::Reject(rej)) => {
            record.status = rej.status;
            return reject(w, g, client, rej, plan.is_head, None).await;
        }
    };

    let up_idle = pool.shared.conf.response_timeout;
    let mut stale_retry_left = true;
    let (rp, ubuf) = loop {
        let ubuf = match w
            .pool
            .acquire_within(w.pool.slot_size(), pool.shared.conf.connect_timeout)
            .await
        {
            Ok(b) => b,
            Err(_) => {
                record.status = 503;
                return reject(
                    w,
                    g,
                    client,
                    error::NO_BUFFER.closing_if(true),
                    plan.is_head,
                    None,
                )
                .await;
            }
        };
        let rej = match read_response_head(w, g, client, &mut conn, ubuf, &plan, &extra, false)
            .await
        {
            Ok(v) => break v,
            Err(RespError::Client) => return Next::Close,
            Err(RespError::Reject(rej)) => {
                // A garbage head or a timeout is the endpoint's failure.
                if rej.status >= 502 && rej != error::NO_BUFFER.closing_if(true) {
                    pool.report_failure(conn.idx);
                }
                rej
            }
            Err(RespError::NoAnswer) => {
                // Closed or reset before a single response byte. A pooled
                // connection the upstream had already closed is replaced once
                // for free; otherwise that endpoint failed and, for a request
                // that can be replayed, another one gets it.
                let stale = conn.reused && stale_retry_left;
                if !stale {
                    pool.report_failure(conn.idx);
                }
                let again = match &cbuf {
                    Sent::HeadKept(_) if stale => {
                        stale_retry_left = false;
                        true
                    }
                    Sent::HeadKept(_) => tried.len() < retries && tried.push(conn.idx),
                    Sent::Pipelined(_) => false,
                };
                if !again {
                    error::BAD_GATEWAY
                } else {
                    pool.stats.retries.add(1);
                    let Sent::HeadKept(mut b) = cbuf else {
                        return Next::Close;
                    };
                    // A replacement that cannot connect is a connect failure
                    // like any other: that endpoint is out, try the next.
                    let mut fresh_stale = stale;
                    let outcome = loop {
                        match resend(g, &mut conn, b, &plan, tried.as_slice(), fresh_stale).await {
                            Ok(kept) => break Ok(kept),
                            Err(Resend::Connect(idx, rej, kept)) => {
                                pool.report_failure(idx);
                                fresh_stale = false;
                                if tried.len() < retries && tried.push(idx) {
                                    pool.stats.retries.add(1);
                                    b = kept;
                                    continue;
                                }
                                break Err(rej);
                            }
                            Err(Resend::Reject(rej)) => break Err(rej),
                        }
                    };
                    match outcome {
                        Ok(kept) => {
                            cbuf = Sent::HeadKept(kept);
                            continue;
                        }
                        Err(rej) => rej,
                    }
                }
            }
        };
        record.status = rej.status;
        return reject(w, g, client, rej.closing_if(true), plan.is_head, None).await;
    };
    // The head was only kept for a retry; its job is done now.
    let cbuf = match cbuf {
        Sent::HeadKept(b) => keep_pipelined(b, &plan),
        Sent::Pipelined(p) => p,
    };
    record.status = rp.status;
    record.upstream = Some(conn.addr);
    record.upstream_time = Some(sent_at.elapsed());
    if rp.status >= 500 {
        pool.report_failure(conn.idx);
    } else {
        pool.report_success(conn.idx);
    }

    if rp.status == 101 {
        let Some(up) = conn.into_stream() else {
            return Next::Close;
        };
        let end = ubuf.len();
        let Ok(mut ubuf) = write_all(client, ubuf, rp.head_start..end, g.server.body_timeout).await
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

    match relay_response(w, g, client, &mut conn, ubuf, &rp, up_idle).await {
        Ok(r) => {
            record.bytes_out = r.bytes;
            if rp.upstream_keep_alive && r.upstream_clean {
                conn.set_reusable();
            }
        }
        Err(_) => return Next::Close,
    }
    drop(conn);
    if rp.client_close {
        return Next::Close;
    }
    Next::KeepAlive(cbuf)
}

/// Endpoints a request has already failed on (bounded: retries are few).
#[derive(Default)]
pub(super) struct Tried {
    idx: [usize; 16],
    len: usize,
}

impl Tried {
    pub(super) fn as_slice(&self) -> &[usize] {
        &self.idx[..self.len]
    }
    pub(super) fn len(&self) -> usize {
        self.len
    }
    /// Adds `i`; false when full.
    pub(super) fn push(&mut self, i: usize) -> bool {
        if self.len == self.idx.len() {
            return false;
        }
        self.idx[self.len] = i;
        self.len += 1;
        true
    }
}

/// Counts a request in its route's metrics, and writes its access-log line,
/// when the exchange ends — on every path: 499 (as nginx logs it) when the
/// client left before an answer.
pub(super) struct Record<'a> {
    w: &'a Worker,
    g: &'a Generation,
    route: usize,
    start: Instant,
    pub(super) status: u16,
    peer: SocketAddr,
    request_id: RequestId,
    consumer: Option<u32>,
    pub(super) upstream: Option<SocketAddr>,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) upstream_time: Option<std::time::Duration>,
    /// The model an AI request asked for.
    pub(super) model: Option<String>,
    /// Input and output tokens, and whether they were estimated.
    pub(super) tokens: Option<(u64, u64, bool)>,
}

impl<'a> Record<'a> {
    /// A record for a request answered before a plan existed.
    fn bare(
        w: &'a Worker,
        g: &'a Generation,
        route: usize,
        peer: SocketAddr,
        request_id: RequestId,
        head_len: usize,
    ) -> Self {
        Self {
            w,
            g,
            route,
            start: Instant::now(),
            status: 499,
            peer,
            request_id,
            consumer: None,
            upstream: None,
            bytes_in: head_len as u64,
            bytes_out: 0,
            upstream_time: None,
            model: None,
            tokens: None,
        }
    }

    fn new(w: &'a Worker, g: &'a Generation, plan: &Plan, peer: SocketAddr) -> Self {
        Self {
            w,
            g,
            route: plan.route,
            start: Instant::now(),
            status: 499,
            peer,
            request_id: plan.request_id,
            consumer: plan.consumer,
            upstream: None,
            bytes_in: (plan.head_end - HEADROOM) as u64,
            bytes_out: 0,
            upstream_time: None,
            model: None,
            tokens: None,
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let m = self.g.route_metrics(self.route);
        m.observe(self.status, elapsed);
        m.bytes_in.add(self.bytes_in);
        m.bytes_out.add(self.bytes_out);
        if !self.g.access_log {
            return;
        }
        let mut out = self.w.access.borrow_mut();
        out.extend_from_slice(b"{\"time\":\"");
        accesslog::push_time(&mut out, std::time::SystemTime::now() - elapsed);
        out.extend_from_slice(b"\",\"request_id\":");
        accesslog::push_json_str(&mut out, self.request_id.as_bytes());
        let _ = write!(out, ",\"client\":\"{}\",\"route\":", self.peer.ip());
        accesslog::push_json_str(
            &mut out,
            self.g.shared.routes.get(self.route).name.as_bytes(),
        );
        match self.upstream {
            Some(a) => {
                let _ = write!(out, ",\"upstream\":\"{a}\"");
            }
            None => out.extend_from_slice(b",\"upstream\":null"),
        }
        let _ = write!(
            out,
            ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3}",
            self.status,
            self.bytes_in,
            self.bytes_out,
            elapsed.as_secs_f64() * 1000.0
        );
        match self.upstream_time {
            Some(t) => {
                let _ = write!(out, ",\"upstream_ms\":{:.3}", t.as_secs_f64() * 1000.0);
            }
            None => out.extend_from_slice(b",\"upstream_ms\":null"),
        }
        out.extend_from_slice(b",\"consumer\":");
        match self.consumer {
            Some(c) => accesslog::push_json_str(
                &mut out,
                self.g
                    .shared
                    .filters
                    .auth
                    .consumer_name(c as usize)
                    .as_bytes(),
            ),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"model\":");
        match &self.model {
            Some(m) => accesslog::push_json_str(&mut out, m.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        match self.tokens {
            Some((i, o, est)) => {
                let _ = writeln!(
                    out,
                    ",\"tokens\":{{\"input\":{i},\"output\":{o},\"estimated\":{est}}}}}"
                );
            }
            None => out.extend_from_slice(b",\"tokens\":null}\n"),
        }
        if out.len() >= accesslog::FLUSH_BYTES {
            let batch = std::mem::take(&mut *out);
            drop(out);
            self.w.flush_access(batch);
        }
    }
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
    /// rejection allows it. The route, request id and head length when a
    /// route matched (the rejection is then logged and counted on it).
    Reject(
        Reject,
        Option<PoolBuf>,
        Option<Box<(usize, RequestId, usize)>>,
    ),
    /// The client went away or timed out: close silently.
    Gone,
}

/// Reads until a whole head is in the buffer and planned.
async fn read_request_head(
    w: &Worker,
    g: &Generation,
    client: &mut TcpStream,
    peer: SocketAddr,
    listener: usize,
    mut buf: PoolBuf,
) -> Result<(Plan, PoolBuf), HeadFail> {
    let deadline = Instant::now() + g.server.header_timeout;
    loop {
        if buf.len() > HEADROOM {
            match plan_request(w, g, &mut buf, listener, peer.ip()) {
                Ok(Parsed::Complete(plan)) => return Ok((plan, buf)),
                Ok(Parsed::Partial) => {}
                Err(rejected) => {
                    let keep = match rejected.head_end {
                        Some(end) if !rejected.reject.close => keep_from(buf, end),
                        _ => None,
                    };
                    return Err(HeadFail::Reject(rejected.reject, keep, rejected.route));
                }
            }
        }
        if buf.spare() == 0 {
            buf = grow(w, g, buf, deadline)
                .await
                .map_err(|rej| HeadFail::Reject(rej, None, None))?;
        }
        let (len, cap) = (buf.len(), buf.capacity());
        match deadline::timeout_at(deadline, client.read(buf.slice_mut(len..cap))).await {
            Ok((Ok(0), _)) | Ok((Err(_), _)) | Err(_) => return Err(HeadFail::Gone),
            Ok((Ok(_), s)) => buf = s.into_inner(),
        }
    }
}

/// Moves a head that outgrew one buffer into a buffer of `max_header_bytes`.
async fn grow(
    w: &Worker,
    g: &Generation,
    buf: PoolBuf,
    deadline: Instant,
) -> Result<PoolBuf, Reject> {
    let want = HEADROOM + g.limits.max_header_bytes + 1;
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
    g: &Generation,
    client: &mut TcpStream,
    conn: &mut UpConn,
    mut cbuf: PoolBuf,
    plan: &Plan,
) -> Result<Sent, SendError> {
    let up_idle = g.upstream(plan.upstream).shared.conf.response_timeout;
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
                continue_100(client, g.server.body_timeout).await?;
            }
            let mut route = Route {
                src: client,
                src_side: Side::Client,
                dst: conn.stream(),
                dst_side: Side::Upstream,
                idle: g.server.body_timeout,
            };
            // The body did not fit with the head, so nothing follows it yet.
            let res = if remaining >= g.splice_min {
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
                continue_100(client, g.server.body_timeout).await?;
            }
            cbuf.consume(plan.head_end);
            let mut decoder = ChunkedDecoder::new(g.max_body);
            let mut route = Route {
                src: client,
                src_side: Side::Client,
                dst: conn.stream(),
                dst_side: Side::Upstream,
                idle: g.server.body_timeout,
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
pub(super) fn keep_pipelined(buf: PoolBuf, plan: &Plan) -> Option<PoolBuf> {
    let body_in_buf = match plan.body {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    keep_from(buf, plan.head_end.saturating_add(body_in_buf as usize))
}

/// Keeps `buf[from..]` behind a fresh headroom, or nothing when it is empty.
pub(super) fn keep_from(mut buf: PoolBuf, from: usize) -> Option<PoolBuf> {
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

/// Why a head could not be sent again.
enum Resend {
    /// Connecting to endpoint `.0` failed; the head comes back for the next try.
    Connect(usize, Reject, PoolBuf),
    /// Give up with this answer.
    Reject(Reject),
}

/// Sends the kept head again on a new connection: to any endpoint after a
/// stale pooled connection, else to one not tried yet.
async fn resend(
    g: &Generation,
    conn: &mut UpConn,
    cbuf: PoolBuf,
    plan: &Plan,
    tried: &[usize],
    stale: bool,
) -> Result<PoolBuf, Resend> {
    let pool = g.upstream(plan.upstream);
    let pick = Pick {
        exclude: if stale { &[] } else { tried },
        hash_key: plan.hash_key,
    };
    let fresh = match pool.checkout(&pick, true).await {
        Ok(c) => c,
        Err(CheckoutError::ConnectTimeout(idx)) => {
            return Err(Resend::Connect(idx, error::CONNECT_TIMEOUT, cbuf))
        }
        Err(CheckoutError::Connect(idx, _)) => {
            return Err(Resend::Connect(idx, error::CONNECT_FAILED, cbuf))
        }
        Err(CheckoutError::NoSlot) => return Err(Resend::Reject(error::NO_SLOT)),
        Err(CheckoutError::AllDown) => return Err(Resend::Reject(error::ALL_DOWN)),
        Err(CheckoutError::NoEndpoint) => return Err(Resend::Reject(error::NO_ENDPOINT)),
    };
    // The old guard drops here, closing the failed stream.
    *conn = fresh;
    let idle = pool.shared.conf.response_timeout;
    write_all(conn.stream(), cbuf, plan.head_start..plan.head_end, idle)
        .await
        .map_err(|()| Resend::Reject(error::BAD_GATEWAY.closing_if(true)))
}

pub(super) enum RespError {
    /// The connection closed or reset before a single response byte.
    NoAnswer,
    /// Answer the client with this.
    Reject(Reject),
    /// The client went away while interim responses were relayed.
    Client,
}

/// Reads the upstream's response head within `response_timeout`, relaying
/// interim (1xx) responses to the client on the way.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read_response_head(
    w: &Worker,
    g: &Generation,
    client: &mut TcpStream,
    conn: &mut UpConn,
    mut ubuf: PoolBuf,
    plan: &Plan,
    extra: &ExtraHeaders,
    inspect_sse: bool,
) -> Result<(RespPlan, PoolBuf), RespError> {
    let conf = &g.upstream(plan.upstream).shared.conf;
    let deadline = Instant::now() + conf.response_timeout;
    ubuf.clear();
    let _ = ubuf.put(&[0u8; HEADROOM]);
    let mut got_any = false;
    loop {
        if ubuf.len() > HEADROOM {
            match plan_response(
                w,
                g,
                &mut ubuf,
                plan,
                shutdown::is_draining(),
                extra.as_bytes(),
                inspect_sse,
            ) {
                Ok(Parsed::Complete(rp)) if rp.interim => {
                    // 100 Continue was already answered by Ringway; others
                    // (103 Early Hints) go to HTTP/1.1 clients.
                    if rp.status != 100 && plan.version == 1 {
                        let r = rp.head_start..rp.head_end;
                        ubuf = write_all(client, ubuf, r, g.server.body_timeout)
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
            let want = HEADROOM + g.limits.max_header_bytes + 1;
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
            Ok((Ok(0), _)) | Ok((Err(_), _)) if !got_any => return Err(RespError::NoAnswer),
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
    g: &Generation,
    client: &mut TcpStream,
    conn: &mut UpConn,
    mut ubuf: PoolBuf,
    rp: &RespPlan,
    idle: Duration,
) -> Result<Relayed, XferError> {
    let in_buf = ubuf.len() - rp.head_end;
    let head_len = (rp.head_end - rp.head_start) as u64;
    let write_err = |()| XferError::Eof(Side::Client);
    let client_idle = g.server.body_timeout;
    match rp.body {
        BodyKind::None => {
            write_all(client, ubuf, rp.head_start..rp.head_end, client_idle)
                .await
                .map_err(write_err)?;
            // Bytes after a body-less response mean a confused upstream.
            Ok(Relayed {
                bytes: head_len,
                upstream_clean: in_buf == 0,
            })
        }
        BodyKind::Length(n) => {
            let first = n.min(in_buf as u64) as usize;
            ubuf = write_all(
                client,
                ubuf,
                rp.head_start..rp.head_end + first,
                client_idle,
            )
            .await
            .map_err(write_err)?;
            let remaining = n - first as u64;
            let relayed = Relayed {
                bytes: head_len + n,
                upstream_clean: in_buf as u64 <= n,
            };
            if remaining == 0 {
                return Ok(relayed);
            }
            let mut r = Route {
                src: conn.stream(),
                src_side: Side::Upstream,
                dst: client,
                dst_side: Side::Client,
                idle,
            };
            if remaining >= g.splice_min {
                drop(ubuf);
                transfer::splice_exact(&mut r, &w.pipes, remaining).await?;
            } else {
                ubuf.clear();
                transfer::copy_exact(&mut r, ubuf, remaining).await?;
            }
            Ok(relayed)
        }
        BodyKind::Chunked => {
            ubuf = write_all(client, ubuf, rp.head_start..rp.head_end, client_idle)
                .await
                .map_err(write_err)?;
            ubuf.consume(rp.head_end);
            let mut decoder = ChunkedDecoder::new(u64::MAX);
            let mut r = Route {
                src: conn.stream(),
                src_side: Side::Upstream,
                dst: client,
                dst_side: Side::Client,
                idle,
            };
            let rest = transfer::forward_chunked(&mut r, ubuf, &mut decoder, rp.dechunk).await?;
            Ok(Relayed {
                bytes: head_len + decoder.body_bytes(),
                upstream_clean: rest.is_empty(),
            })
        }
        BodyKind::CloseDelimited => {
            let end = ubuf.len();
            ubuf = write_all(client, ubuf, rp.head_start..end, client_idle)
                .await
                .map_err(write_err)?;
            ubuf.clear();
            let mut r = Route {
                src: conn.stream(),
                src_side: Side::Upstream,
                dst: client,
                dst_side: Side::Client,
                idle,
            };
            let n = transfer::copy_to_eof(&mut r, ubuf).await?;
            Ok(Relayed {
                bytes: (end - rp.head_start) as u64 + n,
                upstream_clean: false,
            })
        }
    }
}

/// What a relayed response amounted to.
struct Relayed {
    /// Bytes written to the client (head and body).
    bytes: u64,
    /// The upstream sent exactly one response: its connection may be reused.
    upstream_clean: bool,
}

/// Writes `buf[range]` whole and hands the buffer back; on failure the
/// buffer is gone and the caller closes the connection.
pub(super) async fn write_all(
    stream: &mut TcpStream,
    buf: PoolBuf,
    range: std::ops::Range<usize>,
    idle: Duration,
) -> Result<PoolBuf, ()> {
    transfer::write_range(stream, buf, range, idle, Side::Client)
        .await
        .map_err(|_| ())
}

/// Runs the request's limit checks; on a refusal, the 429 to send. Limit
/// headers for the response (allowed or not) go into `extra`.
pub(super) async fn check_limits(
    g: &Generation,
    plan: &Plan,
    extra: &mut ExtraHeaders,
) -> Result<(), Reject> {
    let redis_timeout = g
        .shared
        .cfg
        .redis
        .as_ref()
        .map_or(Duration::from_millis(200), |r| r.timeout);
    let mut tightest: Option<LimitHeaders> = None;
    let mut refused = false;
    for check in plan.limits.iter() {
        let Filter::RateLimit(rl) = &g.shared.filters.list[check.filter as usize] else {
            continue;
        };
        let d = rl.acquire(check, 1, now_ms(), redis_timeout).await;
        if let Some(h) = rl.headers(&d) {
            if tightest.is_none_or(|t| h.remaining < t.remaining || !d.admitted) {
                tightest = Some(h);
            }
        }
        if d.admitted {
            rl.allowed.add(1);
        } else if rl.conf.shadow {
            // Counted and reported, never enforced.
            rl.shadow_rejected.add(1);
        } else {
            rl.rejected.add(1);
            refused = true;
            break;
        }
    }
    if let Some(h) = tightest {
        let _ = h.write_to(extra);
        if refused {
            let _ = h.write_retry_after(extra);
        }
    }
    if refused {
        return Err(error::RATE_LIMITED);
    }
    Ok(())
}

/// Writes a rejection and decides the connection's fate; `keep` holds the
/// pipelined bytes that follow the rejected request, if it stays open.
pub(super) async fn reject(
    w: &Worker,
    g: &Generation,
    client: &mut TcpStream,
    rej: Reject,
    head_only: bool,
    keep: Option<PoolBuf>,
) -> Next {
    reject_with(w, g, client, rej, head_only, keep, "").await
}

/// [`reject`] with added header lines.
pub(super) async fn reject_with(
    w: &Worker,
    g: &Generation,
    client: &mut TcpStream,
    rej: Reject,
    head_only: bool,
    keep: Option<PoolBuf>,
    extra: &str,
) -> Next {
    let bytes = rej.render(head_only, extra);
    let ok = matches!(
        deadline::timeout(g.server.body_timeout, client.write_all(bytes)).await,
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
