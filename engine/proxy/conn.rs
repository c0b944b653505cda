//! One client connection: requests in order, each forwarded to its upstream
//! and answered, until either side ends the connection.
//!
//! Buffers: an idle connection holds none. A request holds the client buffer
//! (its head, the first body bytes, pipelined bytes after it) and, while the
//! response is read, the upstream buffer (not while an answer slow to start is
//! awaited: `respond::first_read`). Beside the buffers, a request allocates its stages'
//! states (a route's exchange, an AI request's attempts and relay) and only what it uses
//! (an event stream's parser, a TLS connection's log facts).

use crate::transport::Stream;
use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    rc::Rc,
    time::{Duration, Instant},
};

use monoio::{io::AsyncWriteRent, net::TcpStream};

use super::{
    error::{self},
    head::{read_request_head, HeadFail},
    headers::ExtraHeaders,
    limits::check_limits,
    park::{bytes_in_buffer, parked_during, Kept},
    record::{Record, TlsFacts},
    reject::{linger, reject, reject_with},
    relay_stage::{after, body_in_hand, respond, Forwarded, Relay, Then},
    request::{Plan, HEADROOM},
    respond::{read_response_head, relay_response, write_all, RespError},
    retry::{connect, resend, Resend, Tried},
    send::{
        body_buffered, check_buffered_chunks, keep_pipelined, parked_whole, send_head, send_parked,
        send_request, SendError, Sent,
    },
    transfer::{self},
};
use crate::runtime::clock;
use crate::{
    buf::{PoolBuf, Received},
    h1::BodyKind,
    runtime::{deadline, Generation, Worker},
    tls::ServerTls,
    upstream::{UpConn, UpstreamPool},
};

/// What happens to the client connection after one exchange.
pub(super) enum Next {
    /// Serve the next request; the buffer holds pipelined bytes, if any.
    KeepAlive(Option<PoolBuf>),
    /// Close the connection.
    Close,
    /// Switch to a byte tunnel with this upstream stream.
    Tunnel(Stream, PoolBuf, PoolBuf),
}

/// Serves one accepted client connection to its end.
/// `first_wait` cuts the first request's wait (to what is left of
/// `header_timeout` after a TLS handshake).
///
/// An `async` block, not an `async fn`: an `async fn` keeps every argument twice in
/// its state (as given and as moved into its body), 168 of the 760 bytes an idle
/// connection's task held. What the block captures stays in an idle task's state
/// for its whole life, so it captures little: the worker once (inside the guard
/// that counts the connection), the listener as a shared address, the peer as its
/// address and port, the first wait in whole milliseconds: 336 bytes, so the task
/// (with monoio's header) fits mimalloc's 384-byte size class.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    w: Rc<Worker>,
    mut client: Stream,
    peer: SocketAddr,
    listener: Rc<SocketAddr>,
    first_wait: Option<Duration>,
) -> impl std::future::Future<Output = ()> {
    let first_wait_ms = first_wait.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
    let conn = ConnGuard::new(w);
    // Address and port alone (20 bytes, not a `SocketAddr`'s 32): an IPv6 peer's flow
    // label and scope id are not needed past the accept.
    let (peer_ip, peer_port) = (peer.ip(), peer.port());
    async move {
        let _ = client.set_nodelay(true);
        // The worker through the guard each time: a `&Worker` kept across the waits
        // would take another 8 bytes of every idle task.
        let mut pending: Option<PoolBuf> = None;
        let mut first = true;
        loop {
            // Not a `match` on `pending.take()`: its scrutinee would keep a second
            // `Option<PoolBuf>` in every idle task.
            if pending.is_none() {
                // Wait with no buffer held: an idle keep-alive costs no pool memory.
                let wait = {
                    let g = conn.worker().generation();
                    if first {
                        first_wait_ms.map_or(g.server.header_timeout, |ms| {
                            Duration::from_millis(u64::from(ms))
                        })
                    } else {
                        g.server.keepalive_timeout
                    }
                };
                // An idle wait also ends when the worker starts draining.
                if let (Some(ring), Stream::Plain(tcp)) = (conn.worker().ring.get(), &client) {
                    // One receive into a buffer the kernel picks when bytes arrive.
                    match deadline::idle_timeout(wait, ring.recv(tcp)).await {
                        Ok(Received::Data(b)) => pending = Some(b),
                        // The ring is empty (the pool is spent): wait as below.
                        Ok(Received::NoBuffer) => {}
                        _ => return,
                    }
                }
                if pending.is_none() {
                    if !client.has_buffered() {
                        // Boxed: inline, this wait (104 bytes) would set the size of every
                        // idle task, past mimalloc's 384-byte class, on the ring path too.
                        let ready = Box::pin(client.socket().readable(false));
                        match deadline::idle_timeout(wait, ready).await {
                            Ok(Ok(())) => {}
                            _ => return,
                        }
                    }
                    let mut b = conn.worker().pool.acquire().await;
                    b.clear();
                    let _ = b.put(&[0u8; HEADROOM]);
                    // The ring ran dry: the head is taken now (see `wait_bare`).
                    if let (Some(ring), Stream::Plain(tcp)) = (conn.worker().ring.get(), &client) {
                        if let Ok(Some(0)) | Err(_) = ring.recv_now(&mut b, tcp.as_raw_fd()) {
                            return;
                        }
                    }
                    pending = Some(b);
                }
            }
            let Some(buf) = pending.take() else {
                return;
            };
            first = false;
            // A request runs on the configuration in force when it starts.
            let g = conn.worker().generation();
            let Some(listener_idx) = g.listener_index(*listener) else {
                // The listener was removed by a reload: finish with this connection.
                return;
            };
            // Each stage is boxed: its state is large and lives only while it runs, so an
            // idle connection's task stays a few hundred bytes, and an AI stream holds only
            // its own stage's state, not the head's.
            let mut stage: Stage<'_> = super::in_place(|| {
                exchange(
                    conn.worker(),
                    &g,
                    &mut client,
                    SocketAddr::new(peer_ip, peer_port),
                    listener_idx,
                    buf,
                )
            });
            // A loop, not a `match` awaiting in its arms: the scrutinee (with a `Next`, 160
            // bytes) would stay in every idle task.
            let next = loop {
                match stage.await {
                    Handoff::Then(s) => stage = s,
                    Handoff::Done(next) => break next,
                }
            };
            let idle = g.server.keepalive_timeout;
            drop(g);
            match next {
                Next::KeepAlive(p) => pending = p,
                // Boxed, with the `Next` moved in: a closing connection's state (a TLS
                // close_notify, an upgrade's tunnel) must not grow every idle task.
                end => return Box::pin(end_connection(client, end, idle)).await,
            }
        }
    }
}

/// Ends a connection after its last exchange: a clean close, or the byte tunnel an
/// upgrade asked for.
async fn end_connection(mut client: Stream, next: Next, idle: Duration) {
    match next {
        Next::Tunnel(up, cbuf, ubuf) => transfer::tunnel(client, up, cbuf, ubuf, idle).await,
        Next::KeepAlive(_) | Next::Close => {
            let _ = client.shutdown().await;
        }
    }
}

/// Serves a connection accepted on a TLS listener: the handshake (inside
/// `header_timeout`), then requests as on any connection. Plain HTTP sent to
/// the port gets a plaintext 400, as nginx answers it.
pub async fn serve_tls(
    w: Rc<Worker>,
    tcp: TcpStream,
    tls: ServerTls,
    peer: SocketAddr,
    listener: Rc<SocketAddr>,
) {
    let (name, header_timeout) = {
        let g = w.generation();
        let name = g
            .listener_index(*listener)
            .and_then(|i| g.shared.cfg.listeners.get(i))
            .map(|l| l.name.clone())
            .unwrap_or_default();
        (name, g.server.header_timeout)
    };
    let until = clock::now() + header_timeout;
    // What the first byte says, before any buffer or TLS state is taken.
    match deadline::timeout_at(until, tcp.readable(false)).await {
        Ok(Ok(())) => {}
        _ => return tls_failed(&name, "timeout"),
    }
    match first_byte(&tcp) {
        Some(TLS_HANDSHAKE_RECORD) => {}
        Some(b) if b.is_ascii_uppercase() => {
            let g = w.generation();
            let mut client = Stream::Plain(tcp);
            let _ = reject(&w, &g, &mut client, error::PLAIN_HTTP_TO_TLS, false, None).await;
            return tls_failed(&name, "plaintext");
        }
        _ => return tls_failed(&name, "failed"),
    }
    let mut stream = match tls.accept(tcp, &w.pool) {
        Ok(s) => s,
        Err(_) => return tls_failed(&name, "failed"),
    };
    match deadline::timeout_at(until, stream.handshake()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return tls_failed(&name, "failed"),
        Err(_) => return tls_failed(&name, "timeout"),
    }
    if tls.requires_client_cert() && stream.client_subject().is_none() {
        // The verifier already demands one; this guards against a session resumed
        // without it, whatever rustls restores from a ticket.
        return tls_failed(&name, "failed");
    }
    crate::metrics::tls_handshake(&name, "ok", stream.protocol_version().unwrap_or("unknown"));
    drop(name);
    let left = until.saturating_duration_since(clock::now());
    serve(w, Stream::Tls(Box::new(stream)), peer, listener, Some(left)).await
}

/// The first byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Peeks at the first byte the client sent; `None` at EOF or on an error.
fn first_byte(tcp: &TcpStream) -> Option<u8> {
    let mut b = 0u8;
    // SAFETY: a non-blocking one-byte peek into a local.
    let n = unsafe {
        libc::recv(
            tcp.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    (n == 1).then_some(b)
}

fn tls_failed(listener: &str, result: &'static str) {
    crate::metrics::tls_handshake(listener, result, "none");
}

/// Counts an open client connection in the worker's gauge.
/// Counts an open client connection while it lives, and holds its worker.
pub(super) struct ConnGuard(Rc<Worker>);

impl ConnGuard {
    fn new(w: Rc<Worker>) -> Self {
        w.stats.connections.add(1);
        Self(w)
    }

    fn worker(&self) -> &Rc<Worker> {
        &self.0
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.stats.connections.sub(1);
    }
}

/// One stage of a request's exchange, boxed (see [`super::in_place`]).
type Stage<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Handoff<'a>> + 'a>>;

/// How a stage ends: the request is done, or goes on in another stage, which starts
/// once this one's state is freed.
pub(super) enum Handoff<'a> {
    /// The request is answered; what happens to the connection.
    Done(Next),
    /// The request goes on there.
    Then(Stage<'a>),
}

pin_project_lite::pin_project! {
    /// The last stage of a request: an exchange, its answer handed on as [`Handoff::Done`].
    /// A struct, not an `async` block around the exchange, which would hold its arguments
    /// twice.
    pub(super) struct Last<'a, F> {
        #[pin]
        exchange: F,
        life: std::marker::PhantomData<&'a ()>,
    }
}

impl<'a, F: std::future::Future<Output = Next> + 'a> Last<'a, F> {
    pub(super) fn stage(f: impl FnOnce() -> F) -> Stage<'a> {
        super::in_place(|| Last {
            exchange: f(),
            life: std::marker::PhantomData,
        })
    }
}

impl<'a, F: std::future::Future<Output = Next>> std::future::Future for Last<'a, F> {
    type Output = Handoff<'a>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Handoff<'a>> {
        self.project().exchange.poll(cx).map(Handoff::Done)
    }
}

/// Reads one request head and checks its limits, then forwards a plain route's
/// request here; an AI route's, or one with fallbacks, goes on in a stage of its own.
///
/// A plain `fn` around an `async move` block: an `async fn` holds its arguments twice
/// in its state (as given and as moved into its body), and this state is what every
/// request, an open stream's too, allocates.
#[allow(clippy::manual_async_fn)]
fn exchange<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    peer: SocketAddr,
    listener: usize,
    buf: PoolBuf,
) -> impl std::future::Future<Output = Handoff<'a>> + 'a {
    async move {
        let (mut plan, cbuf) = match request_head(w, g, client, peer, listener, buf).await {
            Ok(v) => v,
            Err(next) => return Handoff::Done(next),
        };
        let mut record = Record::new(w, g, &plan, peer);
        if g.access_log {
            record.tls = TlsFacts::of(client);
        }

        // Limits, before anything goes upstream.
        let mut extra = ExtraHeaders::default();
        if !plan.limits.is_empty() {
            if let Err(rej) = check_limits(g, &plan, &mut extra).await {
                record.status = rej.status;
                let rej = rej.closing_if(unread_body(&plan, &cbuf) || !plan.keep_alive);
                let keep = if rej.close {
                    None
                } else {
                    keep_pipelined(cbuf, &plan)
                };
                let next = reject_with(w, g, client, rej, plan.is_head, keep, extra.as_str()).await;
                return Handoff::Done(next);
            }
        }
        if crate::ai::route(&g.shared, plan.route).active() {
            return Handoff::Then(super::in_place(|| {
                super::ai_exchange::exchange(w, g, client, plan, cbuf, record, extra)
            }));
        }
        // Only a request without a body can be sent again: a plain route does not hold bodies.
        let has_body = !matches!(plan.body, BodyKind::None | BodyKind::Length(0));
        if !has_body && !plan.upgrade && !g.shared.routes.get(plan.route).fallbacks.is_empty() {
            return Handoff::Then(Last::stage(|| {
                super::fallback_exchange::exchange(w, g, client, plan, cbuf, record, extra)
            }));
        }
        match forward(w, g, client, &mut plan, cbuf, &mut record, &mut extra).await {
            Forwarded::Done(next) => Handoff::Done(next),
            // A body still to come is relayed in a stage of its own: an open stream does
            // not keep this state (the head's, the connect's and the send's), only the relay's.
            Forwarded::Relay(relay) => {
                Handoff::Then(Last::stage(|| respond(w, g, client, record, relay)))
            }
        }
    }
}

/// Reads a request head; a head that fails is answered (or the connection closed)
/// here, and what happens to the connection then is the error.
///
/// The answer is awaited in here, not in a `match` arm of the caller: there, the head's
/// result (232 bytes) would stay in the caller's state for the rest of the request.
async fn request_head(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    peer: SocketAddr,
    listener: usize,
    buf: PoolBuf,
) -> Result<(Plan, PoolBuf), Next> {
    let fail = match read_request_head(w, g, client, peer, listener, buf).await {
        Ok(v) => return Ok(v),
        Err(f) => f,
    };
    let HeadFail::Reject(rej, keep, route) = fail else {
        return Err(Next::Close);
    };
    w.stats.rejected.add(1);
    let _record = route.map(|b| {
        let (r, id, head_len) = *b;
        let mut rec = Record::bare(w, g, r, peer, id, head_len);
        if g.access_log {
            rec.tls = TlsFacts::of(client);
        }
        rec.status = rej.status;
        rec
    });
    Err(reject(w, g, client, rej, false, keep).await)
}

/// Whether a body follows the head that has not all arrived with it. A rejected
/// request whose body already arrived whole is skipped and the connection kept (a
/// 429 then costs the client no reconnect); a body still on the wire cannot stay
/// on the connection.
fn unread_body(plan: &Plan, cbuf: &PoolBuf) -> bool {
    let has_body = !matches!(plan.body, BodyKind::None | BodyKind::Length(0));
    has_body && !body_buffered(cbuf, plan)
}

/// Forwards a plain route's request, its head read and its limits passed, to its
/// upstream and reads the response head. A response whose whole body came with its head
/// is relayed here; one whose body is still to come goes back as a [`Relay`], for a stage
/// of its own. The request's plan, record and headers stay in the caller's state: owned
/// here too, they would take that room twice.
///
/// Like [`exchange`], a plain `fn` around an `async move` block, so the arguments are held
/// once; and no `match` arm awaits while its scrutinee is large (a connection's result,
/// 208 bytes, or a response head's): the scrutinee would stay in the state of every later
/// wait, an open stream's too. Failures are answered in helpers that own their result.
#[allow(clippy::manual_async_fn)]
fn forward<'a, 'r>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    plan: &'a mut Plan,
    cbuf: PoolBuf,
    record: &'a mut Record<'r>,
    extra: &'a mut ExtraHeaders,
) -> impl std::future::Future<Output = Forwarded> + use<'a, 'r> {
    async move {
        let has_body = !matches!(plan.body, BodyKind::None | BodyKind::Length(0));
        let unread_body = unread_body(plan, &cbuf);
        // Chunk lines that came with the head are checked before a connection is even taken.
        let buffered = match check_buffered_chunks(&cbuf, plan, g.max_body) {
            Ok(b) => b,
            Err(rej) => {
                record.status = rej.status;
                return reject(w, g, client, rej, plan.is_head, None).await.into();
            }
        };
        let pool = g.upstream(plan.upstream);
        let retries = pool.shared.conf.retries as usize;
        let mut tried = Tried::default();

        // Connect, moving on to another endpoint on failure, `retries` times.
        let conn = connect_or_reject(
            w,
            g,
            client,
            pool,
            plan,
            record,
            &mut tried,
            cbuf,
            unread_body,
        );
        let (mut conn, kept) = match conn.await {
            Ok(v) => v,
            Err(next) => return next.into(),
        };

        record.sent_to(conn.addr, plan.upstream, 1);
        let sent_at = Instant::now();
        let before_upstream = record.since_head(sent_at);
        if g.shared.routes.get(plan.route).server_timing {
            super::headers::server_timing(extra, before_upstream);
        }
        record.bytes_in += match plan.body {
            BodyKind::Length(n) => n,
            _ => 0,
        };

        // A request that can be sent twice keeps its head until the response
        // starts, in case the connection fails before answering.
        let replayable = plan.idempotent && !has_body && !plan.upgrade;

        // Sending a body is boxed apart (`super::in_place`) and freed when done:
        // inline, its 4 KiB sized this state for the whole exchange, so an open
        // stream kept them. (The stale-connection resend below is boxed for the
        // same reason.) A head alone is small enough to send inline. A request that
        // waited for its connection outside the pool, and came whole, leaves from there.
        let sent = match kept {
            Kept::Parked { bytes, .. } if parked_whole(plan, &bytes) => {
                Ok(send_parked(g, &mut conn, bytes, plan, replayable).await)
            }
            kept => {
                let Some(cbuf) = kept.into_buffer(pool.shared.conf.connect_timeout).await else {
                    record.status = 503;
                    let rej = error::NO_BUFFER.closing_if(true);
                    return reject(w, g, client, rej, plan.is_head, None).await.into();
                };
                if matches!(plan.body, BodyKind::None | BodyKind::CloseDelimited) {
                    send_head(g, &mut conn, cbuf, plan).await
                } else {
                    let send = || send_request(w, g, client, &mut conn, cbuf, plan, buffered);
                    super::in_place(send).await
                }
            }
        };
        // The upstream answered before the whole body was sent: the client
        // connection closes after that answer, whatever the client asked.
        let early = matches!(sent, Ok(Sent::Early));
        // Changed in place, not rebound: a second `Plan` would stay in this state (192 bytes)
        // for the whole response, an open stream's too.
        if early {
            plan.keep_alive = false;
        }
        let mut cbuf = match sent_or_reject(w, g, client, plan, record, sent, replayable).await {
            Ok(sent) => sent.head_copied(plan),
            Err(next) => return next.into(),
        };

        let up_idle = pool.shared.conf.response_timeout;
        let mut stale_retry_left = true;
        let (rp, ubuf, in_hand) = loop {
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
                    .await
                    .into();
                }
            };
            let failed =
                match read_response_head(w, g, client, &mut conn, ubuf, plan, extra, false).await {
                    // Tested here: a later borrow of `ubuf` would keep a second slot for it
                    // in this state, beside the relay's.
                    Ok((rp, ubuf)) => {
                        let in_hand = body_in_hand(&rp, &ubuf);
                        break (rp, ubuf, in_hand);
                    }
                    Err(e) => e,
                };
            let rej = match failed {
                RespError::Client => return Next::Close.into(),
                RespError::Reject(rej) => {
                    // A garbage head or a timeout is the endpoint's failure.
                    if rej.status >= 502 && rej != error::NO_BUFFER.closing_if(true) {
                        pool.report_failure(conn.idx);
                    }
                    rej
                }
                RespError::NoAnswer => {
                    // Closed or reset before a single response byte. A pooled
                    // connection the upstream had already closed is replaced once
                    // for free; otherwise that endpoint failed and, for a request
                    // that can be replayed, another one gets it.
                    let stale = conn.reused && stale_retry_left;
                    if !stale {
                        pool.report_failure(conn.idx);
                    }
                    let again = match &cbuf {
                        Sent::HeadKept(_) | Sent::HeadCopied(_) if stale => {
                            stale_retry_left = false;
                            true
                        }
                        Sent::HeadKept(_) | Sent::HeadCopied(_) => {
                            tried.len() < retries && tried.push(conn.idx)
                        }
                        Sent::Pipelined(_) | Sent::Early => false,
                    };
                    if !again {
                        error::BAD_GATEWAY
                    } else {
                        pool.stats.retries.add(1);
                        let mut b = match cbuf {
                            Sent::HeadKept(b) => b,
                            Sent::HeadCopied(head) => match bytes_in_buffer(
                                &w.pool,
                                &head,
                                plan.head_start,
                                pool.shared.conf.connect_timeout,
                            )
                            .await
                            {
                                Some(b) => b,
                                None => {
                                    record.status = 503;
                                    let rej = error::NO_BUFFER.closing_if(true);
                                    return reject(w, g, client, rej, plan.is_head, None)
                                        .await
                                        .into();
                                }
                            },
                            Sent::Pipelined(_) | Sent::Early => return Next::Close.into(),
                        };
                        // A replacement that cannot connect is a connect failure
                        // like any other: that endpoint is out, try the next.
                        let mut fresh_stale = stale;
                        let outcome = loop {
                            let again =
                                || resend(g, &mut conn, b, plan, tried.as_slice(), fresh_stale);
                            match super::in_place(again).await {
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
                                cbuf = Sent::HeadKept(kept).head_copied(plan);
                                continue;
                            }
                            Err(rej) => rej,
                        }
                    }
                }
            };
            record.status = rej.status;
            return reject(w, g, client, rej.closing_if(true), plan.is_head, None)
                .await
                .into();
        };
        // The head was only kept for a retry; its job is done now.
        let cbuf = cbuf.into_pipelined(plan);
        record.status = rp.status;
        record.sent_to(conn.addr, plan.upstream, 1 + tried.len() as u32);
        record.upstream_time = Some(sent_at.elapsed());
        record.overhead = Some(before_upstream + rp.head_time);
        if rp.status >= 500 {
            pool.report_failure(conn.idx);
        } else {
            pool.report_success(conn.idx);
        }

        if rp.status == 101 {
            let Some(up) = conn.into_stream() else {
                return Next::Close.into();
            };
            let end = ubuf.len();
            let Ok(mut ubuf) =
                write_all(client, ubuf, rp.head_start..end, g.server.body_timeout).await
            else {
                return Next::Close.into();
            };
            ubuf.clear();
            let cbuf = match cbuf {
                Some(mut b) => {
                    b.consume(HEADROOM);
                    b
                }
                None => match w.pool.try_acquire() {
                    Some(b) => b,
                    None => return Next::Close.into(),
                },
            };
            return Next::Tunnel(up, cbuf, ubuf).into();
        }

        if !in_hand {
            // The body is relayed in a stage of its own (see `relay_stage`).
            return Forwarded::Relay(Relay {
                conn,
                ubuf,
                rp,
                cbuf,
                up_idle,
                early,
            });
        }
        // Nothing more to wait for: answered here, with no stage of its own to allocate.
        let relayed = relay_response(w, g, client, &mut conn, ubuf, &rp, up_idle).await;
        match after(record, conn, &rp, early, relayed) {
            Then::KeepAlive => Next::KeepAlive(cbuf).into(),
            Then::Close => Next::Close.into(),
            Then::Linger => {
                linger(w, client).await;
                Next::Close.into()
            }
        }
    }
}

/// Connects for `forward`; on failure, answers the client (the error is what happens to
/// the connection then). The request's bytes come back with the connection, parked
/// outside the pool when the connection took a wait (see [`parked_during`]).
#[allow(clippy::too_many_arguments)]
async fn connect_or_reject(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    pool: &Rc<UpstreamPool>,
    plan: &Plan,
    record: &mut Record<'_>,
    tried: &mut Tried,
    cbuf: PoolBuf,
    unread_body: bool,
) -> Result<(UpConn, Kept), Next> {
    let limit = pool.shared.conf.connect_timeout;
    let mut kept = Kept::Buf(cbuf);
    let got = parked_during(&mut kept, plan.head_start, connect(pool, plan, tried)).await;
    let (rej, keep) = match got {
        Ok(c) => return Ok((c, kept)),
        Err(rej) => {
            let rej = rej.closing_if(unread_body || !plan.keep_alive);
            if rej.close {
                (rej, None)
            } else {
                // Pipelined bytes stay for the next request; with no buffer to hold
                // them, the connection closes after this answer.
                match kept.into_buffer(limit).await {
                    Some(b) => (rej, keep_pipelined(b, plan)),
                    None => (rej.closing_if(true), None),
                }
            }
        }
    };
    record.status = rej.status;
    Err(reject(w, g, client, rej, plan.is_head, keep).await)
}

/// What sending the request left for `forward`: the head kept only when the request may
/// be sent again. A failed send is answered here (the error as in [`connect_or_reject`]).
#[allow(clippy::too_many_arguments)]
async fn sent_or_reject(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    plan: &Plan,
    record: &mut Record<'_>,
    sent: Result<Sent, SendError>,
    replayable: bool,
) -> Result<Sent, Next> {
    let rej = match sent {
        Ok(Sent::HeadKept(b)) if replayable => return Ok(Sent::HeadKept(b)),
        Ok(Sent::HeadKept(b)) => return Ok(Sent::Pipelined(keep_pipelined(b, plan))),
        Ok(sent) => return Ok(sent),
        Err(SendError::Client) => return Err(Next::Close),
        Err(SendError::Reject(rej)) => rej,
    };
    record.status = rej.status;
    Err(reject(w, g, client, rej, plan.is_head, None).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, Fut>(_: impl Fn(A, B, C, D, E) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn connection_task_stays_small() {
        let serve_size = future_size(serve);
        // An idle keep-alive connection is this future plus its socket.
        assert!(serve_size <= 768, "serve future grew to {serve_size} bytes");
    }

    /// The state an exchange allocates, for a plain route's request (held until the
    /// response head is read).
    fn exchange_size<'a, Fut>(
        _: fn(&'a Worker, &'a Generation, &'a mut Stream, SocketAddr, usize, PoolBuf) -> Fut,
    ) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// The state an AI route's exchange allocates (held until its answer's head is read), or a
    /// fallback route's stage (its `Last` wrapper adds nothing).
    #[allow(clippy::type_complexity)]
    fn ai_exchange_size<'a, Fut>(
        _: fn(
            &'a Worker,
            &'a Generation,
            &'a mut Stream,
            Plan,
            PoolBuf,
            Record<'a>,
            ExtraHeaders,
        ) -> Fut,
    ) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// The state an AI route's response relay allocates: what an open stream holds.
    fn ai_relay_stage_size<'a, Fut>(
        _: fn(
            &'a Worker,
            &'a Generation,
            &'a mut Stream,
            Record<'a>,
            super::super::ai_exchange::Relaying,
        ) -> Fut,
    ) -> usize {
        std::mem::size_of::<Last<'a, Fut>>()
    }

    /// The state a plain route's response relay allocates: what an open stream holds.
    fn relay_stage_size<'a, Fut>(
        _: fn(&'a Worker, &'a Generation, &'a mut Stream, Record<'a>, Relay) -> Fut,
    ) -> usize {
        std::mem::size_of::<Last<'a, Fut>>()
    }

    /// An open event stream holds its route's relay stage, kept within mimalloc's 1,792-byte
    /// class on AI and plain routes, so that with the connection's task a stream comes to
    /// at most about 2.25 KiB. Before its answer's head an AI request holds its exchange
    /// and its attempts' state, 1,536 bytes each; a plain
    /// route's exchange stays within 2,560 bytes. The sizes are rustc's layout, so a change
    /// that grows them shows here, not only in a benchmark.
    #[test]
    fn an_open_stream_state_stays_within_3_kib() {
        let plain = exchange_size(exchange);
        assert!(
            plain <= 2560,
            "a plain exchange's state grew to {plain} bytes"
        );
        let relay = relay_stage_size(respond);
        assert!(
            relay <= 1792,
            "a plain route's relay stage grew to {relay} bytes"
        );
        // An AI request waiting for its answer holds its exchange and, beside it, its
        // attempts' state: 1,536 bytes each (mimalloc's size classes).
        let ai = ai_exchange_size(super::super::ai_exchange::exchange);
        assert!(ai <= 1536, "an AI exchange's state grew to {ai} bytes");
        let ai_relay = ai_relay_stage_size(super::super::ai_exchange::relay_stage);
        assert!(
            ai_relay <= 1792,
            "an AI route's relay stage grew to {ai_relay} bytes"
        );
        let fallback = ai_exchange_size(super::super::fallback_exchange::exchange);
        assert!(
            fallback <= 2560,
            "a fallback route's stage grew to {fallback} bytes"
        );
        let attempts = future_size(super::super::failover::run);
        assert!(
            attempts <= 1536,
            "the attempts' state grew to {attempts} bytes"
        );
    }
}
