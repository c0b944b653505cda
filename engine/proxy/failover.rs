//! Failover: one request sent upstream until an attempt succeeds — the first upstream, other
//! keys and endpoints of it, then the route's `fallbacks` — while attempts fail in a way
//! `fallback_on` lists, before any response byte has reached the client, at most
//! `max_attempts` requests in all. [`Attempts`] decides where the next attempt goes; this
//! module does the IO. AI routes send every request this way (their bodies are held in the
//! pool, so they can be sent again); plain routes with `fallbacks` send requests without a
//! body this way.

use std::{
    os::fd::AsRawFd,
    rc::Rc,
    time::{Duration, Instant},
};

use super::{
    ai_creds::KeyChoice,
    attempts::{Attempts, Failure, Left, Step},
    early::{EarlyWatch, Watched},
    error,
    headers::ExtraHeaders,
    park::{parked_during, Kept},
    request::Plan,
    respond::{read_response_head, RespError},
    response::RespPlan,
    retry::{connect, Tried},
};
use crate::{
    ai::request::ModelSlot,
    buf::{HeadAndBody, PoolBuf},
    runtime::{deadline, Generation, Worker},
    transport::Stream,
    upstream::{health::now_ms, keys::next_random, pool::Pick, UpConn, UpstreamPool},
};

/// How long a response head may keep a client waiting before Ringway watches for the client
/// leaving. On the deadline wheel, the watch starts at the first tick past it: 50 to 150 ms
/// in, under the 200 ms in which an abandoned request's upstream must be closed.
const WATCH_AFTER: Duration = Duration::from_millis(50);

/// The request every attempt sends.
pub(super) struct Request<'a> {
    /// The head's lines, without framing fields and the blank line ([`head_without_framing`]);
    /// rewritten for each attempt's upstream and key.
    pub head: &'a mut Vec<u8>,
    /// The whole body, when the request has one: out of the pool while an attempt waits
    /// for its connection or its answer (see [`super::park`]).
    pub body: &'a mut Option<Kept>,
    /// Where the body names the model, renamed for each upstream's `model_map`.
    pub slot: Option<&'a mut ModelSlot>,
    /// The first attempt's upstream.
    pub first: usize,
    /// Ask for an uncompressed reply (an accounted route).
    pub identity: bool,
    /// Event streams are inspected (passed on to the response head's plan).
    pub inspect_sse: bool,
    /// Headers added to the client's response.
    pub extra: &'a ExtraHeaders,
}

/// The attempt whose answer the client gets.
pub(super) struct Served {
    /// Its connection, the response body still to read.
    pub conn: UpConn,
    /// Its response head, rewritten for the client.
    pub rp: RespPlan,
    /// The buffer holding that head and the body bytes read with it.
    pub ubuf: PoolBuf,
    /// When the request was sent.
    pub sent_at: Instant,
    /// When the first attempt was sent (Ringway's own time ends there).
    pub first_sent_at: Instant,
    /// Attempts made, this one included.
    pub attempts: u32,
}

/// No upstream answer goes to the client.
pub(super) enum Unserved {
    /// The client went away.
    ClientGone,
    /// Answer this (and close).
    Reject(error::Reject),
}

/// Sends `req` until an attempt is served; `plan.upstream` and `plan.key` end as the
/// serving attempt's.
///
/// A plain `fn` around an `async move` block, so its arguments are held once: this state is
/// what every AI request waiting for its answer holds beside its exchange.
#[allow(clippy::manual_async_fn)]
pub(super) fn run<'a, 'r>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    plan: &'a mut Plan,
    mut req: Request<'r>,
) -> impl std::future::Future<Output = Result<Served, Unserved>> + use<'a, 'r> {
    async move {
        // Attempts: the model's upstream (or the route's), then other keys and endpoints of it
        // and the route's fallbacks, while attempts fail in a way `fallback_on` lists and no
        // response byte has reached the client.
        let route = g.shared.routes.get(plan.route);
        let mut attempts = Attempts::new(
            req.first,
            &route.fallbacks,
            &route.fallback_on,
            route.max_attempts,
        );
        let mut choice = KeyChoice::Keep;
        let mut tried = Tried::default();
        let mut sent_at = Instant::now();
        let mut first_sent_at = None;
        let (conn, rp, ubuf) = loop {
            let up = attempts.upstream();
            let keys = g.shared.key_pools.get(up).and_then(Option::as_ref);
            // Every key of this one cools or was refused: a later upstream may serve.
            if keys.is_some_and(|p| !p.has_usable(now_ms())) && attempts.skip() {
                (choice, tried) = (KeyChoice::Any, Tried::default());
                continue;
            }
            let pool = g.upstream(up).clone();
            // The model is renamed in place, in a pool buffer (a parked body goes back into one).
            let body = match (&req.slot, req.body.as_mut()) {
                (Some(_), Some(b)) => match b.in_pool(pool.shared.conf.connect_timeout).await {
                    Some(b) => Some(b),
                    None => return Err(Unserved::Reject(error::NO_BUFFER)),
                },
                _ => None,
            };
            let prepared = super::ai_creds::for_upstream(req.head, &g.shared, plan, up, choice)
                .and_then(|()| match (&mut req.slot, body) {
                    (Some(s), Some(b)) => s.remodel(b, &pool.shared.conf.model_map),
                    _ => Ok(()),
                });
            attempts.begin();
            let end = match prepared {
                Ok(()) => {
                    let end = attempt(w, g, client, plan, &mut req, &mut tried, &mut sent_at).await;
                    first_sent_at.get_or_insert(sent_at);
                    end
                }
                Err(rej) => Err(Failed {
                    failure: Failure::Connect,
                    reject: rej,
                    endpoint: None,
                    replayable: true,
                }),
            };
            let (failure, endpoint, last) = match end {
                Ok(Attempted::ClientGone) => return Err(Unserved::ClientGone),
                Ok(Attempted::Answer(conn, rp, ubuf)) => {
                    if !attempts.retries_status(rp.status) {
                        pool.stats.attempt(&route.name, "ok");
                        break (conn, rp, ubuf);
                    }
                    let failure = Failure::Status {
                        status: rp.status,
                        retry_after: rp.retry_after,
                    };
                    (failure, Some(conn.idx), Last::Answer(conn, rp, ubuf))
                }
                Err(f) => {
                    let last = if f.replayable {
                        Last::Reject(f.reject)
                    } else {
                        Last::Final(f.reject)
                    };
                    (f.failure, f.endpoint, last)
                }
            };
            pool.stats.attempt(&route.name, failure.outcome());
            let step = match &last {
                Last::Final(_) => Step::Stop,
                _ => {
                    let left = Left {
                        other_key: keys.is_some_and(|p| p.has_usable(now_ms())),
                        other_endpoint: pool.shared.conf.endpoints.len() > tried.len() + 1,
                    };
                    // Read here, not kept from before the attempt: a local would stay in the
                    // state of every request waiting for its answer.
                    let limit = pool.shared.conf.response_timeout;
                    attempts.after(failure, left, limit, next_random())
                }
            };
            let Step::Retry {
                upstream,
                delay,
                new_key,
                new_endpoint,
            } = step
            else {
                match last {
                    Last::Answer(conn, rp, ubuf) => break (conn, rp, ubuf),
                    Last::Reject(rej) | Last::Final(rej) => return Err(Unserved::Reject(rej)),
                }
            };
            // The failed answer is not relayed: its connection closes with it.
            drop(last);
            pool.stats.retries.add(1);
            if !delay.is_zero() {
                // Boxed, as below: a rare wait that should not size every request's state.
                Box::pin(monoio::time::sleep(delay)).await;
            }
            if upstream != up {
                (choice, tried) = (KeyChoice::Any, Tried::default());
            } else if new_key {
                choice = KeyChoice::Usable;
            } else if new_endpoint {
                if let Some(i) = endpoint {
                    tried.push(i);
                }
                choice = KeyChoice::Keep;
            } else {
                (choice, tried) = (KeyChoice::Keep, Tried::default());
            }
        };
        Ok(Served {
            conn,
            rp,
            ubuf,
            sent_at,
            first_sent_at: first_sent_at.unwrap_or(sent_at),
            attempts: attempts.made(),
        })
    }
}

/// After the served answer was relayed whole (`clean`: nothing followed it): its connection
/// goes back to the pool when the upstream keeps it alive, and the client's goes on unless the
/// answer closes it.
pub(super) fn after_relay(
    conn: UpConn,
    rp: &RespPlan,
    clean: bool,
    pipelined: Option<PoolBuf>,
) -> super::conn::Next {
    super::relay_stage::release_upstream(conn, rp, clean);
    if rp.client_close {
        super::conn::Next::Close
    } else {
        super::conn::Next::KeepAlive(pipelined)
    }
}

/// What one attempt came to, when it did not fail in a way that moves on.
// Not boxed: it lives for one step of one request, in a future already on the heap.
#[allow(clippy::large_enum_variant)]
enum Attempted {
    /// The upstream's response head (any status), read and rewritten for the client.
    Answer(UpConn, RespPlan, PoolBuf),
    /// The client went away before the answer.
    ClientGone,
}

/// An attempt that failed before any response.
struct Failed {
    failure: Failure,
    /// The answer the client gets when no attempt follows.
    reject: error::Reject,
    /// The endpoint that failed, when one was reached.
    endpoint: Option<usize>,
    /// The request is intact for another attempt (a send that timed out lost it).
    replayable: bool,
}

/// The last failed attempt's result, for the client when no attempt follows.
#[allow(clippy::large_enum_variant)]
enum Last {
    /// The upstream's own error answer (passed through, body and all).
    Answer(UpConn, RespPlan, PoolBuf),
    /// No answer: this one instead.
    Reject(error::Reject),
    /// No answer, and the request can not be sent again.
    Final(error::Reject),
}

/// How the wait for an answer's head ended.
enum Answer {
    /// The head was read (or failed).
    Read(Result<(RespPlan, PoolBuf), RespError>),
    /// The client left while the model was thinking.
    ClientGone,
}

/// Reads an answer's head. A client that leaves while the model thinks ends the wait: the
/// upstream connection then closes at once (the provider stops generating) and the
/// reservation is released, instead of waiting for an answer nobody will read. Most answers
/// come sooner than a client gives up: the watch (a duplicated socket and a readiness wait)
/// is armed only for an answer that keeps the client waiting past `WATCH_AFTER`; a timer
/// costs no system call.
///
/// Its own future, not inline in [`attempt`]: the pinned read lives across three awaits, and
/// rustc gives such a local a slot of its own beside the connect's and the send's states, so
/// every AI request waiting for its answer held all three (a plain `fn` around an `async
/// move` block, so its arguments are held once).
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn answer<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    conn: &'a mut UpConn,
    ubuf: PoolBuf,
    plan: &'a Plan,
    extra: &'a ExtraHeaders,
    inspect_sse: bool,
) -> impl std::future::Future<Output = Answer> + 'a {
    async move {
        let client_fd = client.socket().as_raw_fd();
        let read = read_response_head(w, g, client, conn, ubuf, plan, extra, inspect_sse);
        let mut read = std::pin::pin!(read);
        // The quick answer is returned from inside the `if let`, so it is not held across
        // the waits below (as a `let` binding, it kept 120 bytes in this state). Timed on the
        // worker's deadline wheel (40 bytes, in place): monoio's `Sleep` is 640 bytes aligned
        // to 128, an allocation beside every AI request waiting for its answer.
        if let Ok(r) = deadline::timeout(WATCH_AFTER, &mut read).await {
            return Answer::Read(r);
        }
        // The watch and its run are boxed: only an answer slower than `WATCH_AFTER` takes
        // them, and inline they would grow the state of every AI request waiting for its
        // answer.
        let watched = async move {
            match EarlyWatch::on_fd(client_fd) {
                Some(watch) => watch.run_until_closed(read).await,
                None => Watched::Done(read.await),
            }
        };
        match Box::pin(watched).await {
            Watched::Done(r) => Answer::Read(r),
            Watched::Answered => Answer::ClientGone,
        }
    }
}

/// Sends the request (the head's lines in `head`, the body in `body`) to `plan.upstream` and
/// reads the response head. A pooled connection the upstream closed meanwhile is replaced by
/// a fresh one once. `head` and `body` are left intact for another attempt.
async fn attempt(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    plan: &mut Plan,
    req: &mut Request<'_>,
    tried: &mut Tried,
    sent_at: &mut Instant,
) -> Result<Attempted, Failed> {
    let pool = g.upstream(plan.upstream).clone();
    let failed = |failure, reject, endpoint, replayable| Failed {
        failure,
        reject,
        endpoint,
        replayable,
    };
    let connect = connect(&pool, plan, tried);
    let connected = match req.body.as_mut() {
        Some(body) => parked_during(body, 0, connect).await,
        None => connect.await,
    };
    let mut conn = connected.map_err(|rej| failed(Failure::Connect, rej, None, true))?;
    let idle = pool.shared.conf.response_timeout;
    let mut stale_retry = true;
    loop {
        let sent = send(conn.stream(), req.head, req.body, req.identity, idle).await;
        let stale = conn.reused && stale_retry;
        match sent {
            Ok(()) => {}
            Err(false) => {
                pool.report_failure(conn.idx);
                return Err(failed(
                    Failure::Timeout,
                    error::RESPONSE_TIMEOUT,
                    Some(conn.idx),
                    false,
                ));
            }
            Err(true) if stale => {
                stale_retry = false;
                conn = fresh(&pool, plan)
                    .await
                    .map_err(|rej| failed(Failure::Connect, rej, None, true))?;
                continue;
            }
            Err(true) => {
                pool.report_failure(conn.idx);
                return Err(failed(
                    Failure::Reset,
                    error::BAD_GATEWAY,
                    Some(conn.idx),
                    true,
                ));
            }
        }
        *sent_at = Instant::now();
        // Kept only for another attempt: out of the pool while the model thinks.
        if let Some(body) = req.body.as_mut() {
            body.park(0);
        }
        let ubuf = match w
            .pool
            .acquire_within(w.pool.slot_size(), pool.shared.conf.connect_timeout)
            .await
        {
            Ok(b) => b,
            Err(_) => return Err(failed(Failure::Connect, error::NO_BUFFER, None, false)),
        };
        let read = match answer(
            w,
            g,
            client,
            &mut conn,
            ubuf,
            plan,
            req.extra,
            req.inspect_sse,
        )
        .await
        {
            Answer::Read(r) => r,
            Answer::ClientGone => return Ok(Attempted::ClientGone),
        };
        return match read {
            Ok((rp, ubuf)) => {
                // A provider endpoint that keeps answering 429 is as unusable as one that
                // fails: after `unhealthy_after` in a row it rests for the passive cooldown.
                // Not a lone endpoint: resting it would turn a rate limit (often on one key)
                // into an outage for every consumer; key cooldowns handle that case.
                let limited = rp.status == 429 && pool.shared.conf.endpoints.len() > 1;
                if rp.status >= 500 || limited {
                    pool.report_failure(conn.idx);
                } else {
                    pool.report_success(conn.idx);
                }
                Ok(Attempted::Answer(conn, rp, ubuf))
            }
            Err(RespError::Client) => Ok(Attempted::ClientGone),
            Err(RespError::NoAnswer) if stale => {
                stale_retry = false;
                conn = fresh(&pool, plan)
                    .await
                    .map_err(|rej| failed(Failure::Connect, rej, None, true))?;
                continue;
            }
            Err(RespError::NoAnswer) => {
                pool.report_failure(conn.idx);
                Err(failed(
                    Failure::Reset,
                    error::BAD_GATEWAY,
                    Some(conn.idx),
                    true,
                ))
            }
            Err(RespError::Reject(rej)) => {
                if rej.status >= 502 {
                    pool.report_failure(conn.idx);
                }
                let failure = match rej.status {
                    504 => Failure::Timeout,
                    502 => Failure::Reset,
                    _ => return Err(failed(Failure::Reset, rej, Some(conn.idx), false)),
                };
                Err(failed(failure, rej, Some(conn.idx), true))
            }
        };
    }
}

/// A new connection after a pooled one turned out closed.
async fn fresh(pool: &Rc<UpstreamPool>, plan: &Plan) -> Result<UpConn, error::Reject> {
    pool.stats.retries.add(1);
    let pick = Pick {
        exclude: &[],
        hash_key: plan.hash_key,
    };
    pool.checkout(&pick, true)
        .await
        .map_err(|e| super::retry::rejection(&e))
}

/// Writes the head (completed with the body's length) and the body, in one `writev`. `head`
/// and `body` come back as they were, unless the write timed out (`Err(false)`); `Err(true)`:
/// the connection failed.
async fn send(
    stream: &mut Stream,
    head: &mut Vec<u8>,
    body: &mut Option<Kept>,
    identity: bool,
    idle: std::time::Duration,
) -> Result<(), bool> {
    let lines = head.len();
    end_head(head, body.as_ref().map(Kept::len), identity);
    let h = std::mem::take(head);
    let r = match body.take() {
        Some(Kept::Buf(b)) => {
            match deadline::timeout(idle, HeadAndBody::new(h, b).write_all(stream)).await {
                Ok((r, (h, b))) => {
                    (*head, *body) = (h, Some(Kept::Buf(b)));
                    r.map(drop)
                }
                Err(_) => return Err(false),
            }
        }
        // Parked from offset 0 (the body starts its buffer), so `bytes` is all of it.
        Some(Kept::Parked { pool, bytes, at }) => {
            match deadline::timeout(idle, HeadAndBody::new(h, bytes).write_all(stream)).await {
                Ok((r, (h, bytes))) => {
                    (*head, *body) = (h, Some(Kept::Parked { pool, bytes, at }));
                    r.map(drop)
                }
                Err(_) => return Err(false),
            }
        }
        None => match deadline::timeout(idle, stream.write_all(h)).await {
            Ok((r, h)) => {
                *head = h;
                r.map(drop)
            }
            Err(_) => return Err(false),
        },
    };
    head.truncate(lines);
    r.map_err(|_| true)
}

/// The request head's lines, less Content-Length and Transfer-Encoding (and
/// Accept-Encoding when `identity`: [`end_head`] then asks for `identity`)
/// and the blank line that ends it; [`end_head`] completes it.
pub(super) fn head_without_framing(head: &[u8], identity: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 32);
    let lines = head.strip_suffix(b"\r\n").unwrap_or(head);
    // Kept lines are copied in runs: one copy per dropped line, not one per line.
    let mut kept = 0;
    let mut start = 0;
    for nl in memchr::memchr_iter(b'\n', lines).chain(std::iter::once(lines.len())) {
        let line = &lines[start..];
        let is = |name: &[u8]| {
            line.get(..name.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(name))
        };
        // Most lines are told apart by their first letter alone.
        let dropped = match line.first().map(u8::to_ascii_lowercase) {
            Some(b'c') => is(b"content-length:"),
            Some(b't') => is(b"transfer-encoding:"),
            Some(b'a') => identity && is(b"accept-encoding:"),
            _ => false,
        };
        let end = (nl + 1).min(lines.len());
        if dropped {
            out.extend_from_slice(&lines[kept..start]);
            kept = end;
        }
        start = end;
        if start == lines.len() {
            break;
        }
    }
    out.extend_from_slice(&lines[kept..]);
    out
}

/// Ends a head from [`head_without_framing`] with the body's length and, when
/// `identity`, an explicit `accept-encoding: identity` (RFC 9110 §12.5.3: a
/// request without the field accepts any coding).
pub(super) fn end_head(out: &mut Vec<u8>, len: Option<usize>, identity: bool) {
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
        // A framing field last, or the only field; a name that only starts like one stays.
        let head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-type: a\r\nCONTENT-LENGTH: 3\r\n\r\n";
        let out = with_length(head, None, false);
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-type: a\r\n\r\n"
        );
        let head = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        let out = with_length(head, Some(0), false);
        assert_eq!(out, b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        let head = b"POST / HTTP/1.1\r\ncontent-length-x: 1\r\n\r\n";
        assert_eq!(with_length(head, None, false), head);
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
