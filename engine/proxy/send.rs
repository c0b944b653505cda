//! Sending a planned request upstream: head, then body by its framing.

use crate::transport::Stream;
use std::{future::Future, pin::Pin, time::Duration};

use super::{
    early::{EarlyWatch, Watched},
    error::{self, Reject},
    park::PARK_MAX,
    request::{Plan, HEADROOM},
    respond::{write_all, write_head},
    transfer::{self, Route, Side, XferError},
};
use crate::{
    buf::PoolBuf,
    h1::{BodyKind, ChunkError, ChunkedDecoder},
    runtime::{deadline, Generation, Worker},
    upstream::UpConn,
};

/// Where the client buffer stands once the request is sent.
pub(super) enum Sent {
    /// The rewritten head is still in place (a retry may resend it).
    HeadKept(PoolBuf),
    /// The rewritten head, copied out of its pool buffer (see [`Sent::head_copied`]).
    HeadCopied(Box<[u8]>),
    /// Only pipelined bytes remain, behind the headroom (or nothing).
    Pipelined(Option<PoolBuf>),
    /// The upstream answered, closed or reset before the body was all sent:
    /// its answer (if any) is relayed, then both connections close, since
    /// the rest of the client's body was never read.
    Early,
}

impl Sent {
    /// The pipelined bytes once the request's head is no longer needed.
    pub(super) fn into_pipelined(self, plan: &Plan) -> Option<PoolBuf> {
        match self {
            Sent::HeadKept(b) => keep_pipelined(b, plan),
            Sent::Pipelined(p) => p,
            Sent::HeadCopied(_) | Sent::Early => None,
        }
    }

    /// A head kept for a replay, with nothing pipelined behind it, moves out of its pool
    /// buffer into an allocation of its own size, and the buffer goes back. The wait for
    /// the answer is the long part of a request to a model (seconds to the first token):
    /// kept in place, each waiting request held a pool buffer and the page its head touched
    /// (1,000 requests waiting for their heads: 1,000 buffers in use, 8.4 KB of RSS each).
    /// Heads longer than [`PARK_MAX`] stay where they are, so what lives outside the pool's
    /// budget stays small; a resend puts the head back with [`super::park::bytes_in_buffer`].
    pub(super) fn head_copied(self, plan: &Plan) -> Sent {
        let Sent::HeadKept(b) = &self else {
            return self;
        };
        match b.get(plan.head_start..plan.head_end) {
            Some(head) if b.len() == plan.head_end && head.len() <= PARK_MAX => {
                Sent::HeadCopied(head.into())
            }
            _ => self,
        }
    }
}

pub(super) enum SendError {
    /// The client went away.
    Client,
    /// Answer the client with this.
    Reject(Reject),
}

/// What the chunked body bytes that came with the head say, checked before anything
/// goes upstream (strict framing: an invalid chunk line there is answered 400 with nothing
/// sent, not found after the head has left).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Buffered {
    /// Not a chunked body, or its framing is valid so far.
    Partial,
    /// The whole chunked body, last chunk and trailers included, is in the buffer.
    Whole,
}

/// Decodes the chunked framing already in `cbuf` behind the head of `plan`.
pub(super) fn check_buffered_chunks(
    cbuf: &PoolBuf,
    plan: &Plan,
    max_body: u64,
) -> Result<Buffered, Reject> {
    if plan.body != BodyKind::Chunked {
        return Ok(Buffered::Partial);
    }
    let bytes = &cbuf[plan.head_end..];
    match ChunkedDecoder::new(max_body).decode(bytes, &mut |_| {}) {
        Ok(p) if p.done => Ok(Buffered::Whole),
        Ok(_) => Ok(Buffered::Partial),
        // A size past max_body is reported at its first digit too many; one that is no
        // size at all (17 hex digits, a letter after them) is bad framing, not a big body.
        Err(ChunkError::BodyTooLarge) => {
            match ChunkedDecoder::new(u64::MAX).decode(bytes, &mut |_| {}) {
                Err(ChunkError::BodyTooLarge) | Ok(_) => Err(error::BODY_TOO_LARGE),
                Err(_) => Err(error::BAD_BODY),
            }
        }
        Err(_) => Err(error::BAD_BODY),
    }
}

/// Sends the head of a request without a body: [`send_request`]'s first case,
/// callable alone, so a bodiless request's state need not make room for a body's.
pub(super) async fn send_head(
    g: &Generation,
    conn: &mut UpConn,
    cbuf: PoolBuf,
    plan: &Plan,
) -> Result<Sent, SendError> {
    let up_idle = g.upstream(plan.upstream).shared.conf.response_timeout;
    // A write to a pooled connection the upstream already closed still
    // succeeds (the reset comes later), so failing here is a real upstream
    // failure, not a stale connection. A failed write may still leave an
    // answer to read (an upstream that refused the request and closed): the
    // response reader decides between relaying it and a 502. The head is kept
    // all the same: with no answer, a request that can be sent again goes to
    // another endpoint (an endpoint dying as it accepted the connection).
    Ok(
        match write_head(conn.stream(), cbuf, plan.head_start..plan.head_end, up_idle).await {
            Ok(b) | Err(Some(b)) => Sent::HeadKept(b),
            Err(None) => Sent::Early,
        },
    )
}

/// True when `bytes`, parked from `plan.head_start` (see [`super::park`]), are the whole
/// request: its head and a body of known length all there, nothing pipelined behind them.
pub(super) fn parked_whole(plan: &Plan, bytes: &[u8]) -> bool {
    let body = match plan.body {
        BodyKind::None => 0,
        BodyKind::Length(n) => n,
        BodyKind::Chunked | BodyKind::CloseDelimited => return false,
    };
    let head = (plan.head_end - plan.head_start) as u64;
    !plan.upgrade && !plan.expect_continue && head + body == bytes.len() as u64
}

/// Sends a whole request parked outside the pool ([`parked_whole`]) from where it is: a
/// request that waited for a new connection takes no pool buffer again to be sent. What is
/// left is what [`send_head`] and [`send_request`] leave: the head (copied out) when the
/// request may be sent again, even after a failed write; after a body, or a timeout, nothing.
pub(super) async fn send_parked(
    g: &Generation,
    conn: &mut UpConn,
    bytes: Box<[u8]>,
    plan: &Plan,
    replayable: bool,
) -> Sent {
    let up_idle = g.upstream(plan.upstream).shared.conf.response_timeout;
    let bodiless = plan.body == BodyKind::None;
    match deadline::timeout(up_idle, conn.stream().write_all(bytes)).await {
        Ok((res, bytes)) if bodiless || res.is_ok() => {
            if replayable {
                Sent::HeadCopied(bytes)
            } else {
                Sent::Pipelined(None)
            }
        }
        Ok(_) | Err(_) => Sent::Early,
    }
}

/// Sends the planned head and the body; `buffered` is [`check_buffered_chunks`]'s answer.
pub(super) async fn send_request(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    conn: &mut UpConn,
    mut cbuf: PoolBuf,
    plan: &Plan,
    buffered: Buffered,
) -> Result<Sent, SendError> {
    let up_idle = g.upstream(plan.upstream).shared.conf.response_timeout;
    let in_buf = cbuf.len() - plan.head_end;
    match plan.body {
        BodyKind::None | BodyKind::CloseDelimited => send_head(g, conn, cbuf, plan).await,
        BodyKind::Length(n) => {
            let first = (n.min(in_buf as u64)) as usize;
            let end = plan.head_end + first;
            let watching = !client.is_tls() && n - first as u64 >= g.splice_min;
            if watching {
                // The watch peeks at the socket: no receive may take an early answer
                // first, so the one armed while idle goes before anything is sent.
                conn.disarm();
            }
            let mut remaining = n - first as u64;
            let (mut start, mut end, mut gathered) = (plan.head_start, end, false);
            if !watching && !plan.expect_continue && !plan.upgrade && remaining > 0 {
                if let Some((whole, got)) =
                    transfer::gather(client, &cbuf, plan.head_start..end, remaining)
                {
                    let len = whole.len();
                    (cbuf, start, end, gathered) = (whole, 0, len, true);
                    remaining -= got;
                }
            }
            cbuf = match write_all(conn.stream(), cbuf, start..end, up_idle).await {
                Ok(b) => b,
                Err(()) => return Ok(Sent::Early),
            };
            if remaining == 0 {
                // A gathered request left its pool buffer: nothing is kept to send again.
                return Ok(if gathered {
                    Sent::Pipelined(None)
                } else {
                    Sent::HeadKept(cbuf)
                });
            }
            // Not for a TLS client: stopping its body mid-read would poison its stream,
            // and the answer could not be relayed on it any more. Not for a body under
            // `splice_min` either: it goes out in a few writes that socket buffers absorb,
            // the answer is read right after, and the watch (a dup, a poll, its cancel and a
            // close) cost 10-25 µs per 64 KiB POST, a quarter of its CPU (benches/RESULTS.md).
            let watch = if watching {
                EarlyWatch::new(conn.stream())
            } else {
                None
            };
            let body = async {
                if plan.expect_continue {
                    continue_100(client, g.server.body_timeout).await?;
                }
                let mut route = upload(client, conn.stream(), g.server.body_timeout);
                // The body did not fit with the head, so nothing follows it yet.
                let res = if remaining >= g.splice_min && route.can_splice() {
                    drop(cbuf);
                    transfer::splice_exact(&mut route, &w.pipes, remaining).await
                } else {
                    cbuf.clear();
                    transfer::copy_exact(&mut route, cbuf, remaining)
                        .await
                        .map(drop)
                };
                res.map(|()| Sent::Pipelined(None))
                    .or_else(request_body_error)
            };
            watched(watch.as_ref(), body).await
        }
        BodyKind::Chunked => {
            // A body that arrived whole with the head needs no watch.
            let watching = buffered != Buffered::Whole && !client.is_tls();
            if watching {
                // As above: the armed receive goes before anything is sent.
                conn.disarm();
            }
            cbuf = match write_all(conn.stream(), cbuf, plan.head_start..plan.head_end, up_idle)
                .await
            {
                Ok(b) => b,
                Err(()) => return Ok(Sent::Early),
            };
            let watch = if watching {
                EarlyWatch::new(conn.stream())
            } else {
                None
            };
            let body = async {
                if plan.expect_continue && in_buf == 0 {
                    continue_100(client, g.server.body_timeout).await?;
                }
                let mut decoder = ChunkedDecoder::new(g.max_body);
                let mut route = upload(client, conn.stream(), g.server.body_timeout);
                let at = plan.head_end;
                match transfer::forward_chunked(&mut route, cbuf, at, at, &mut decoder, false).await
                {
                    // Pipelined bytes after the body go back behind the headroom.
                    Ok(rest) => Ok(Sent::Pipelined(rest.and_then(rebase))),
                    Err(e) => request_body_error(e),
                }
            };
            watched(watch.as_ref(), body).await
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

/// The request's whole body is already in `buf` (a Content-Length body that
/// arrived with the head), so [`keep_pipelined`] can step over it.
pub(super) fn body_buffered(buf: &PoolBuf, plan: &Plan) -> bool {
    match plan.body {
        BodyKind::None => true,
        BodyKind::Length(n) => usize::try_from(n)
            .ok()
            .and_then(|n| plan.head_end.checked_add(n))
            .is_some_and(|end| end <= buf.len()),
        _ => false,
    }
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
pub(super) fn rebase(mut buf: PoolBuf) -> Option<PoolBuf> {
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

/// What a failed request body transfer means for the exchange. A write to
/// the upstream that failed (reset, closed) may have a refusal behind it to
/// relay; one that timed out had none (the watch would have seen it).
pub(super) fn request_body_error(e: XferError) -> Result<Sent, SendError> {
    Err(match e {
        XferError::Chunk(Side::Client, ChunkError::BodyTooLarge) => {
            SendError::Reject(error::BODY_TOO_LARGE)
        }
        XferError::Chunk(Side::Client, _) => SendError::Reject(error::BAD_BODY),
        e if e.side() == Side::Client => SendError::Client,
        XferError::Io(..) | XferError::Eof(_) => return Ok(Sent::Early),
        _ => SendError::Reject(error::BAD_GATEWAY.closing_if(true)),
    })
}

/// The request body's way: client to upstream, each side waited on for at most `idle`.
fn upload<'a>(client: &'a mut Stream, up: &'a mut Stream, idle: Duration) -> Route<'a> {
    Route {
        src: client,
        ring: None,
        src_side: Side::Client,
        src_idle: idle,
        dst: up,
        dst_side: Side::Upstream,
        dst_idle: idle,
    }
}

/// Runs a body transfer under the upstream watch (when there is one).
///
/// A plain `fn` around an `async move` block, not an `async fn`: an `async fn`
/// moves its arguments into locals, which would keep `body` twice in the state.
#[allow(clippy::manual_async_fn)]
fn watched<'a, F: Future<Output = Result<Sent, SendError>> + 'a>(
    watch: Option<&'a EarlyWatch>,
    mut body: F,
) -> impl Future<Output = Result<Sent, SendError>> + 'a {
    async move {
        // Polled where it lies: moving `body` into a pinned local or an awaited
        // value would keep a second copy of it in this state (1.8 KiB).
        // SAFETY: `body` lives in this future's state, which is pinned once
        // polled; it is never moved again and is dropped in place.
        let body = unsafe { Pin::new_unchecked(&mut body) };
        match watch {
            None => body.await,
            Some(watch) => match watch.run(body).await {
                Watched::Done(r) => r,
                Watched::Answered => Ok(Sent::Early),
            },
        }
    }
}

pub(super) async fn continue_100(client: &mut Stream, idle: Duration) -> Result<(), SendError> {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    match deadline::timeout(idle, client.write_all(CONTINUE)).await {
        Ok((Ok(_), _)) => Ok(()),
        _ => Err(SendError::Client),
    }
}
