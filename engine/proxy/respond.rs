//! The upstream's answer: reading its head (relaying interim responses)
//! and relaying its body to the client.

use crate::transport::Stream;
use std::{
    future::Future,
    time::{Duration, Instant},
};

use monoio::{buf::IoBufMut as _, io::AsyncReadRent};

use super::{
    error::{self, Reject},
    headers::ExtraHeaders,
    request::{Plan, HEADROOM},
    response::{plan_response, RespPlan},
    transfer::{self, Route, Side, XferError},
};
use crate::runtime::{clock, either::Either};
use crate::{
    buf::{PoolBuf, Received, RecvRing, RingRecv},
    h1::{BodyKind, ChunkedDecoder, Parsed},
    runtime::{deadline, shutdown, Generation, Worker},
    upstream::UpConn,
};

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
///
/// A plain `fn` around an `async move` block, so its arguments are held once (an
/// `async fn` keeps them twice), in every request state that awaits it.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
pub(super) fn read_response_head<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    conn: &'a mut UpConn,
    mut ubuf: PoolBuf,
    plan: &'a Plan,
    extra: &'a ExtraHeaders,
    inspect_sse: bool,
) -> impl std::future::Future<Output = Result<(RespPlan, PoolBuf), RespError>> + 'a {
    async move {
        let conf = &g.upstream(plan.upstream).shared.conf;
        let deadline = clock::now() + conf.response_timeout;
        ubuf.clear();
        let _ = ubuf.put(&[0u8; HEADROOM]);
        let mut got_any = false;
        // Set by each read: a head already in the buffer was not waited for here.
        let mut read_at: Option<Instant> = None;
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
                        // Boxed: rare, and inline the write's state would size every
                        // request's wait for its answer.
                        if rp.status != 100 && plan.version == 1 {
                            let r = rp.head_start..rp.head_end;
                            ubuf = Box::pin(write_all(client, ubuf, r, g.server.body_timeout))
                                .await
                                .map_err(|()| RespError::Client)?;
                        }
                        ubuf.consume(rp.head_end - HEADROOM);
                        ubuf[..HEADROOM].fill(0);
                        continue;
                    }
                    Ok(Parsed::Complete(mut rp)) => {
                        rp.head_time = read_at.map_or(Duration::ZERO, |t| t.elapsed());
                        return Ok((rp, ubuf));
                    }
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
            let armed = if got_any { None } else { conn.take_armed() };
            let first = if got_any {
                None
            } else {
                conn.stream().tcp_mut()
            };
            let read = match first {
                // Nothing of the answer yet, on plain TCP: the wait may be long (a model
                // thinking), so it holds no buffer (at once through the ring, else after a tick).
                Some(tcp) => {
                    match first_read(w, tcp, armed, ubuf, deadline, conf.connect_timeout).await {
                        FirstRead::Read(r, b) => Ok((r, b)),
                        FirstRead::TimedOut => Err(()),
                        FirstRead::NoAnswer => return Err(RespError::NoAnswer),
                        FirstRead::NoBuffer => {
                            return Err(RespError::Reject(error::NO_BUFFER.closing_if(true)))
                        }
                    }
                }
                None => {
                    deadline::timeout_at(deadline, conn.stream().read(ubuf.slice_mut(len..cap)))
                        .await
                        .map(|(r, s)| (r, s.into_inner()))
                        .map_err(|_| ())
                }
            };
            match read {
                Ok((Ok(0), _)) | Ok((Err(_), _)) if !got_any => return Err(RespError::NoAnswer),
                Ok((Ok(0), _)) | Ok((Err(_), _)) => {
                    return Err(RespError::Reject(error::BAD_GATEWAY.closing_if(true)))
                }
                Err(()) => return Err(RespError::Reject(error::RESPONSE_TIMEOUT)),
                Ok((Ok(_), b)) => {
                    got_any = true;
                    ubuf = b;
                    read_at = Some(Instant::now());
                }
            }
        }
    }
}

/// How long the first read of an answer keeps its buffer before waiting without one, off
/// the receive ring. Most answers start sooner; the deadline wheel's tick is the cheapest
/// timer there is, and the cancel that ends the wait costs an operation.
const HOLD_BUFFER_FOR: Duration = deadline::TICK;

/// What [`first_read`] got.
enum FirstRead {
    /// The read's result and the buffer (filled behind what it held).
    Read(std::io::Result<usize>, PoolBuf),
    /// `response_timeout` passed with nothing read.
    TimedOut,
    /// The socket failed while it was awaited without a buffer.
    NoAnswer,
    /// No buffer came back within `connect_timeout` once the answer started.
    NoBuffer,
}

/// The first read of an answer into `ubuf` (which holds only the headroom). Through the
/// worker's receive ring where it has one ([`ring_first_read`]), else holding `ubuf` only
/// for a tick ([`held_first_read`]).
///
/// Two futures behind [`Either`], not one `async` block with both paths: rustc laid the ring
/// wait's locals out beside the held read's (not over them), and every request waiting for
/// its answer, an open stream's too, carried the sum (832 bytes, now about the larger one).
fn first_read<'a>(
    w: &'a Worker,
    tcp: &'a mut monoio::net::TcpStream,
    armed: Option<RingRecv>,
    ubuf: PoolBuf,
    deadline: Instant,
    acquire_limit: Duration,
) -> Either<impl Future<Output = FirstRead> + 'a, impl Future<Output = FirstRead> + 'a> {
    // A pooled connection comes with its receive already armed; else one is armed now.
    match armed.or_else(|| w.ring.get().map(|ring| ring.recv(tcp))) {
        Some(recv) => Either::Left {
            f: ring_first_read(w, tcp, recv, ubuf, deadline, acquire_limit),
        },
        None => Either::Right {
            f: held_first_read(w, tcp, ubuf, deadline, acquire_limit),
        },
    }
}

/// The first read through the receive ring: the kernel picks a buffer when the answer
/// starts, and `ubuf` goes back at once (no cancel needed).
///
/// A plain `fn` around an `async move` block, so its arguments are held once (an
/// `async fn` keeps them twice), in every request state that awaits it.
#[allow(clippy::manual_async_fn)]
fn ring_first_read<'a>(
    w: &'a Worker,
    tcp: &'a mut monoio::net::TcpStream,
    recv: RingRecv,
    ubuf: PoolBuf,
    deadline: Instant,
    acquire_limit: Duration,
) -> impl Future<Output = FirstRead> + 'a {
    async move {
        // The kernel picks a buffer when the answer starts, so `ubuf` goes back at once
        // (the pool's checkout already took any receive an idle connection completed):
        // a burst of requests waiting for their answers then holds only the ring's
        // buffers (holding `ubuf` for a tick, thousands of waiting requests touched a
        // page each). It is kept while requests queue for buffers: an answer that finds
        // the ring empty then reads into it, rather than wait in that queue behind
        // requests that cannot finish without buffers.
        let spare = if w.pool.has_waiters() {
            Some(ubuf)
        } else {
            // No cancel to wait for: the receive never held this buffer.
            drop(ubuf);
            None
        };
        let got = match deadline::timeout_at(deadline, recv).await {
            Ok(got) => got,
            Err(_) => return FirstRead::TimedOut,
        };
        match (got, spare) {
            (Received::Data(b), _) => FirstRead::Read(Ok(b.len() - HEADROOM), b),
            (Received::Eof, _) | (Received::Failed(_), _) => FirstRead::NoAnswer,
            // The ring was empty: read into the buffer kept, or wait for readiness and a
            // buffer.
            // Both waits are boxed: they are rare (the ring ran dry), and inline they would
            // size every request's state, an open stream's too.
            (Received::NoBuffer, Some(ubuf)) => {
                let (len, cap) = (ubuf.len(), ubuf.capacity());
                let read = deadline::timeout_at(deadline, tcp.read(ubuf.slice_mut(len..cap)));
                match Box::pin(read).await {
                    Ok((r, s)) => FirstRead::Read(r, s.into_inner()),
                    Err(_) => FirstRead::TimedOut,
                }
            }
            (Received::NoBuffer, None) => {
                Box::pin(read_when_readable(w, tcp, deadline, acquire_limit)).await
            }
        }
    }
}

/// The first read without a receive ring: an answer that has not started within
/// [`HOLD_BUFFER_FOR`] gives the buffer back to the pool while it is awaited, then takes one
/// again when bytes are there: thousands of requests waiting on a slow upstream hold no
/// pool memory. The read is cancelled through monoio's cancel handle, which hands back
/// whatever the kernel completed (a plain drop could lose bytes received in the meantime).
///
/// A plain `fn` around an `async move` block, as [`ring_first_read`].
#[allow(clippy::manual_async_fn)]
fn held_first_read<'a>(
    w: &'a Worker,
    tcp: &'a mut monoio::net::TcpStream,
    ubuf: PoolBuf,
    deadline: Instant,
    acquire_limit: Duration,
) -> impl Future<Output = FirstRead> + 'a {
    async move {
        use monoio::io::{CancelableAsyncReadRent, Canceller};
        // In a block of its own: what it binds is not kept in this state across the wait
        // after it.
        {
            let (len, cap) = (ubuf.len(), ubuf.capacity());
            let canceller = Canceller::new();
            let read = tcp.cancelable_read(ubuf.slice_mut(len..cap), canceller.handle());
            let mut read = std::pin::pin!(read);
            let (res, s) = match deadline::timeout(HOLD_BUFFER_FOR, &mut read).await {
                Ok(done) => done,
                Err(_) => {
                    drop(canceller.cancel());
                    read.await
                }
            };
            if !matches!(&res, Err(e) if e.raw_os_error() == Some(libc::ECANCELED)) {
                return FirstRead::Read(res, s.into_inner());
            }
        }
        // Cancelled with nothing read: the buffer went back while the upstream thinks
        // (boxed, as above: the upstream was slow, an allocation is nothing beside that).
        Box::pin(read_when_readable(w, tcp, deadline, acquire_limit)).await
    }
}

/// The first read of an answer once the socket is readable, into a buffer taken then.
async fn read_when_readable(
    w: &Worker,
    tcp: &mut monoio::net::TcpStream,
    deadline: Instant,
    acquire_limit: Duration,
) -> FirstRead {
    match deadline::timeout_at(deadline, tcp.readable(false)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return FirstRead::NoAnswer,
        Err(_) => return FirstRead::TimedOut,
    }
    let mut ubuf = match w
        .pool
        .acquire_within(w.pool.slot_size(), acquire_limit)
        .await
    {
        Ok(b) => b,
        Err(_) => return FirstRead::NoBuffer,
    };
    ubuf.clear();
    let _ = ubuf.put(&[0u8; HEADROOM]);
    // The ring ran dry: the answer is taken now (see `transfer::wait_bare`).
    if let Some(ring) = w.ring.get() {
        match ring.recv_now(&mut ubuf, std::os::fd::AsRawFd::as_raw_fd(tcp)) {
            Ok(Some(n)) => return FirstRead::Read(Ok(n), ubuf),
            Ok(None) => {}
            Err(e) => return FirstRead::Read(Err(e), ubuf),
        }
    }
    let (len, cap) = (ubuf.len(), ubuf.capacity());
    match deadline::timeout_at(deadline, tcp.read(ubuf.slice_mut(len..cap))).await {
        Ok((r, s)) => FirstRead::Read(r, s.into_inner()),
        Err(_) => FirstRead::TimedOut,
    }
}

/// The route of a response body: from the upstream (each read bounded by `up_idle`, the
/// waits between reads through the worker's receive ring where it has one) to the client (each
/// write bounded by `client_idle`).
fn download<'a>(
    up: &'a mut Stream,
    client: &'a mut Stream,
    ring: Option<&'a RecvRing>,
    up_idle: Duration,
    client_idle: Duration,
) -> Route<'a> {
    Route {
        src: up,
        ring,
        src_side: Side::Upstream,
        src_idle: up_idle,
        dst: client,
        dst_side: Side::Client,
        dst_idle: client_idle,
    }
}

/// Sends the response head and body to the client. `up_idle` bounds each
/// wait on the upstream; each wait on the client is bounded by `body_timeout`.
///
/// A plain `fn` around an `async move` block, so its arguments are held once (an
/// `async fn` keeps them twice), in every request state that awaits it.
#[allow(clippy::manual_async_fn)]
pub(super) fn relay_response<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    conn: &'a mut UpConn,
    mut ubuf: PoolBuf,
    rp: &'a RespPlan,
    up_idle: Duration,
) -> impl std::future::Future<Output = Result<Relayed, XferError>> + 'a {
    async move {
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
                let mut remaining = n - first as u64;
                let (mut start, mut end) = (rp.head_start, rp.head_end + first);
                // A body a little larger than the first read (a 16 KiB answer) leaves with its
                // head in one write when the rest is already there.
                if remaining > 0 && remaining < g.splice_min {
                    if let Some((whole, got)) =
                        transfer::gather(conn.stream(), &ubuf, start..end, remaining)
                    {
                        let len = whole.len();
                        (ubuf, start, end) = (whole, 0, len);
                        remaining -= got;
                    }
                }
                ubuf = write_all(client, ubuf, start..end, client_idle)
                    .await
                    .map_err(write_err)?;
                let relayed = Relayed {
                    bytes: head_len + n,
                    upstream_clean: in_buf as u64 <= n,
                };
                if remaining == 0 {
                    return Ok(relayed);
                }
                let mut r = download(conn.stream(), client, w.ring.get(), up_idle, client_idle);
                if remaining >= g.splice_min && r.can_splice() {
                    drop(ubuf);
                    transfer::splice_exact(&mut r, &w.pipes, remaining).await?;
                } else {
                    ubuf.clear();
                    transfer::copy_exact(&mut r, ubuf, remaining).await?;
                }
                Ok(relayed)
            }
            BodyKind::Chunked => {
                let mut decoder = ChunkedDecoder::new(u64::MAX);
                let mut r = download(conn.stream(), client, w.ring.get(), up_idle, client_idle);
                let (head_start, head_end) = (rp.head_start, rp.head_end);
                let rest = transfer::forward_chunked(
                    &mut r,
                    ubuf,
                    head_start,
                    head_end,
                    &mut decoder,
                    rp.dechunk,
                )
                .await?;
                Ok(Relayed {
                    bytes: head_len + decoder.body_bytes(),
                    upstream_clean: rest.as_ref().is_none_or(|b| b.is_empty()),
                })
            }
            BodyKind::CloseDelimited => {
                let end = ubuf.len();
                ubuf = write_all(client, ubuf, rp.head_start..end, client_idle)
                    .await
                    .map_err(write_err)?;
                ubuf.clear();
                let mut r = download(conn.stream(), client, w.ring.get(), up_idle, client_idle);
                let n = transfer::copy_to_eof(&mut r, ubuf).await?;
                Ok(Relayed {
                    bytes: (end - rp.head_start) as u64 + n,
                    upstream_clean: false,
                })
            }
        }
    }
}

/// What a relayed response amounted to.
pub(super) struct Relayed {
    /// Bytes written to the client (head and body).
    pub(super) bytes: u64,
    /// The upstream sent exactly one response: its connection may be reused.
    pub(super) upstream_clean: bool,
}

/// Writes `buf[range]` whole and hands the buffer back; on failure the
/// buffer is gone and the caller closes the connection.
pub(super) async fn write_all(
    stream: &mut Stream,
    buf: PoolBuf,
    range: std::ops::Range<usize>,
    idle: Duration,
) -> Result<PoolBuf, ()> {
    write_head(stream, buf, range, idle).await.map_err(|_| ())
}

/// [`write_all`], giving the buffer back when the write fails (`None` after a timeout:
/// the kernel may still hold it), so a head can be sent to another upstream.
pub(super) async fn write_head(
    stream: &mut Stream,
    buf: PoolBuf,
    range: std::ops::Range<usize>,
    idle: Duration,
) -> Result<PoolBuf, Option<PoolBuf>> {
    use monoio::buf::IoBuf;
    if range.is_empty() {
        return Ok(buf);
    }
    match deadline::timeout(idle, stream.write_all(buf.slice(range))).await {
        Ok((Ok(_), s)) => Ok(s.into_inner()),
        Ok((Err(_), s)) => Err(Some(s.into_inner())),
        Err(_) => Err(None),
    }
}
