//! Moving body bytes from one socket to another, by framing.
//!
//! Every function here holds at most one pool buffer (or one pipe), never
//! reads past the end of the message it moves (pipelined bytes stay where the
//! next request will find them), and reports which side failed.

use crate::runtime::deadline;
use crate::transport::Stream;
use std::{
    future::Future,
    io,
    ops::Range,
    os::fd::AsRawFd,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use monoio::{
    buf::{IoBuf, IoBufMut, Slice},
    io::{
        splice::{SpliceDestination, SpliceSource},
        AsyncReadRent, AsyncWriteRentExt, Splitable,
    },
    BufResult,
};

use crate::{
    buf::{BufPool, PipePool, PoolBuf, Received, RecvRing},
    h1::{ChunkError, ChunkedDecoder},
};

/// Which connection a transfer error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The downstream client.
    Client,
    /// The upstream server.
    Upstream,
}

/// What went wrong while moving bytes.
#[derive(Debug)]
pub enum XferError {
    /// A read or write failed.
    Io(Side, io::Error),
    /// The source closed before the message ended.
    Eof(Side),
    /// No progress within the allowed time.
    Timeout(Side),
    /// The chunked framing from this side is invalid.
    Chunk(Side, ChunkError),
    /// Bytes from this side were ready, but no pool buffer came free to read
    /// them into within the allowed time.
    NoBuffer(Side),
}

impl XferError {
    /// The side at fault.
    pub fn side(&self) -> Side {
        match self {
            XferError::Io(s, _)
            | XferError::Eof(s)
            | XferError::Timeout(s)
            | XferError::Chunk(s, _)
            | XferError::NoBuffer(s) => *s,
        }
    }
}

/// One direction of a transfer: where bytes come from and go to.
///
/// Each side has its own inactivity limit: a response body waits on the
/// upstream by `response_timeout` but on the client by `body_timeout`, so a
/// client that stops reading is cut by the client's limit, not the
/// upstream's.
pub struct Route<'a> {
    /// The socket read from.
    pub src: &'a mut Stream,
    /// The worker's receive ring, for the waits between reads of `src` (see [`wait_bare`]).
    pub ring: Option<&'a RecvRing>,
    /// Who `src` is.
    pub src_side: Side,
    /// Longest wait for any single read from `src`.
    pub src_idle: Duration,
    /// The socket written to.
    pub dst: &'a mut Stream,
    /// Who `dst` is.
    pub dst_side: Side,
    /// Longest wait for any single write to `dst`.
    pub dst_idle: Duration,
}

impl Route<'_> {
    /// Both legs are kernel sockets carrying plaintext, so bytes can move
    /// between them with splice.
    pub fn can_splice(&self) -> bool {
        self.src.tcp().is_some() && self.dst.tcp().is_some()
    }
}

/// Reads into `buf`'s spare capacity, at most `max` bytes; returns the count (0 at EOF).
///
/// On error the buffer is gone (a timed-out read is cancelled with the buffer
/// inside it): every caller closes the connection then.
pub async fn read_some(
    stream: &mut Stream,
    buf: PoolBuf,
    max: usize,
    idle: Duration,
    side: Side,
) -> Result<(usize, PoolBuf), XferError> {
    let start = buf.len();
    let end = start + max.min(buf.capacity() - start);
    match deadline::timeout(idle, stream.read(buf.slice_mut(start..end))).await {
        Ok((Ok(n), slice)) => Ok((n, slice.into_inner())),
        Ok((Err(e), _)) => Err(XferError::Io(side, e)),
        Err(_) => Err(XferError::Timeout(side)),
    }
}

/// What a wait without a buffer ([`wait_bare`]) ended with.
pub enum Waited {
    /// The stream is readable: read into this (empty) buffer.
    Empty(PoolBuf),
    /// Bytes came through the receive ring: `buf[at..]` is the data.
    Filled { buf: PoolBuf, at: usize },
    /// The peer closed its side.
    Eof,
}

/// Waits until `stream` has bytes without holding a buffer (the caller gave its
/// empty one back to `pool`). An open stream between its events (a
/// model that thinks) then holds no pool memory. Through the worker's receive
/// ring (plain TCP, where there is one) the kernel takes a buffer only when
/// the bytes arrive, so thousands of streams whose events land together hold
/// the ring's few buffers, not one each, and no readiness wait precedes the
/// read. Otherwise, or when the ring is empty, the wait is for readiness and
/// a buffer is taken once bytes are there.
pub async fn wait_bare(
    stream: &mut Stream,
    ring: Option<&RecvRing>,
    pool: BufPool,
    idle: Duration,
    side: Side,
) -> Result<Waited, XferError> {
    if let (Some(ring), Some(tcp)) = (ring, stream.tcp_mut()) {
        match deadline::timeout(idle, ring.recv(tcp)).await {
            Ok(Received::Data(buf)) => {
                let at = ring.headroom();
                return Ok(Waited::Filled { buf, at });
            }
            Ok(Received::Eof) => return Ok(Waited::Eof),
            Ok(Received::Failed(e)) => return Err(XferError::Io(side, e)),
            // The pool is spent: wait for readiness and a buffer like any reader.
            Ok(Received::NoBuffer) => {}
            Err(_) => return Err(XferError::Timeout(side)),
        }
    }
    match deadline::timeout(idle, stream.readable(false)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(XferError::Io(side, e)),
        Err(_) => return Err(XferError::Timeout(side)),
    }
    let mut buf = pool
        .acquire_within(pool.slot_size(), idle)
        .await
        .map_err(|_| XferError::NoBuffer(side))?;
    // The ring ran dry (a loop turn too slow for the events landing): the bytes are taken
    // now, not through a queued read that would hold this buffer for another turn. Not on
    // the epoll driver, whose readiness cache must see its own reads.
    if let (Some(ring), Some(tcp)) = (ring, stream.tcp()) {
        let at = buf.len();
        return match ring.recv_now(&mut buf, tcp.as_raw_fd()) {
            Ok(Some(0)) => Ok(Waited::Eof),
            Ok(Some(_)) => Ok(Waited::Filled { buf, at }),
            Ok(None) => Ok(Waited::Empty(buf)),
            Err(e) => Err(XferError::Io(side, e)),
        };
    }
    Ok(Waited::Empty(buf))
}

/// Writes `buf[range]` whole. The deadline starts now, not at the first poll: await it at
/// once.
pub fn write_range(
    stream: &mut Stream,
    buf: PoolBuf,
    range: Range<usize>,
    idle: Duration,
    side: Side,
) -> WriteWhole<impl Future<Output = BufResult<usize, Slice<PoolBuf>>> + '_, PoolBuf> {
    if range.is_empty() {
        return WriteWhole::done(buf, side);
    }
    WriteWhole::new(stream.write_all(buf.slice(range)), idle, side)
}

pin_project_lite::pin_project! {
    /// A whole write within a deadline, ending as a relay step ends: the buffer back, or the
    /// error on `side`. A struct rather than an `async fn`, which would keep the buffer and
    /// its other arguments beside the write that already holds them, in the state of every
    /// relay awaiting one.
    pub struct WriteWhole<F, B> {
        #[pin]
        step: WriteStep<F, B>,
        side: Side,
    }
}

pin_project_lite::pin_project! {
    /// The write, or (nothing to write, or written) its buffer.
    #[project = WriteStepProj]
    enum WriteStep<F, B> {
        Writing { #[pin] write: deadline::Timeout<F> },
        Unsent { buf: Option<B> },
    }
}

impl<F: Future, B> WriteWhole<F, B> {
    /// `write` (a `write_all`), abandoned `idle` from now (not from the first poll).
    pub fn new(write: F, idle: Duration, side: Side) -> Self {
        Self {
            step: WriteStep::Writing {
                write: deadline::timeout(idle, write),
            },
            side,
        }
    }

    /// Nothing to write: `buf` comes back at once.
    pub fn done(buf: B, side: Side) -> Self {
        Self {
            step: WriteStep::Unsent { buf: Some(buf) },
            side,
        }
    }
}

impl<F, B> Future for WriteWhole<F, B>
where
    F: Future<Output = BufResult<usize, Slice<B>>>,
{
    type Output = Result<B, XferError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let side = *this.side;
        Poll::Ready(match this.step.project() {
            // Polled again once it ended, the buffer is gone.
            WriteStepProj::Unsent { buf } => buf.take().ok_or(XferError::Eof(side)),
            WriteStepProj::Writing { write } => match std::task::ready!(write.poll(cx)) {
                Ok((Ok(_), slice)) => Ok(slice.into_inner()),
                Ok((Err(e), _)) => Err(XferError::Io(side, e)),
                Err(_) => Err(XferError::Timeout(side)),
            },
        })
    }
}

/// Most bytes (head and body) [`gather`] puts in one buffer.
const GATHER_MAX: usize = 128 * 1024;

/// A message whose Content-Length body did not all come with its head, when the rest is
/// already in the socket of `src`: `buf[sent]` (the head and the body's first part) and that
/// rest, taken without waiting, go into one bulk buffer, so the message leaves in one write
/// rather than two (and its reader is woken once). The buffer and how many body bytes it
/// took; `None` leaves the message to the usual path: a TLS source, a message over
/// [`GATHER_MAX`], no bulk buffer to spare, nothing waiting in the socket yet.
pub fn gather(
    src: &Stream,
    buf: &PoolBuf,
    sent: Range<usize>,
    remaining: u64,
) -> Option<(PoolBuf, u64)> {
    let tcp = src.tcp()?;
    let rest = usize::try_from(remaining).ok()?;
    let total = sent.len().checked_add(rest).filter(|&t| t <= GATHER_MAX)?;
    let mut whole = buf.try_bulk(total)?;
    whole.put(buf.get(sent)?).ok()?;
    // Capped at the body: what follows it (a pipelined request) stays in the socket.
    match whole.recv_now_max(tcp.as_raw_fd(), rest) {
        Ok(Some(got)) if got > 0 => Some((whole, got as u64)),
        // Nothing there yet, the peer gone or failed: the usual path sees it too.
        _ => None,
    }
}

/// Most slots one bulk transfer takes (64 KiB with 16 KiB slots).
const BULK_SLOTS: usize = 4;

/// Moves exactly `n` bytes with a read/write loop through `buf`. A body larger than `buf`
/// moves through one buffer of up to [`BULK_SLOTS`] slots instead, when the pool can spare
/// them (see [`PoolBuf::try_bulk`]), in fewer reads and writes: a 64 KiB POST body costs a
/// quarter of the operations. The buffer the bytes went through comes back, emptied.
pub async fn copy_exact(r: &mut Route<'_>, buf: PoolBuf, n: u64) -> Result<PoolBuf, XferError> {
    let cap = buf.capacity();
    if n > cap as u64 {
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        if let Some(bulk) = buf.try_bulk(want.min(BULK_SLOTS * cap.max(1))) {
            // Its slot goes back at once: the transfer holds one buffer, not two.
            drop(buf);
            return copy_through(r, bulk, n).await;
        }
    }
    copy_through(r, buf, n).await
}

/// [`copy_exact`]'s loop, through `buf` as it is.
async fn copy_through(
    r: &mut Route<'_>,
    mut buf: PoolBuf,
    mut n: u64,
) -> Result<PoolBuf, XferError> {
    while n > 0 {
        buf.clear();
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        let (got, b) = read_some(r.src, buf, want, r.src_idle, r.src_side).await?;
        if got == 0 {
            return Err(XferError::Eof(r.src_side));
        }
        n -= got as u64;
        let len = b.len();
        buf = write_range(r.dst, b, 0..len, r.dst_idle, r.dst_side).await?;
    }
    buf.clear();
    Ok(buf)
}

/// Moves everything until `src` closes (a close-delimited body); returns the byte count.
pub async fn copy_to_eof(r: &mut Route<'_>, mut buf: PoolBuf) -> Result<u64, XferError> {
    let mut total = 0u64;
    loop {
        buf.clear();
        let cap = buf.capacity();
        let (got, b) = read_some(r.src, buf, cap, r.src_idle, r.src_side).await?;
        if got == 0 {
            return Ok(total);
        }
        total += got as u64;
        let len = b.len();
        buf = write_range(r.dst, b, 0..len, r.dst_idle, r.dst_side).await?;
    }
}

/// Moves exactly `n` bytes with splice through a pooled pipe, up to its capacity at a time.
pub async fn splice_exact(
    r: &mut Route<'_>,
    pipes: &PipePool,
    mut n: u64,
) -> Result<(), XferError> {
    let (Some(src), Some(dst)) = (r.src.tcp_mut(), r.dst.tcp_mut()) else {
        // Callers ask `can_splice` first; a TLS leg never gets here.
        return Err(XferError::Io(r.dst_side, io::ErrorKind::Unsupported.into()));
    };
    let mut pipe = pipes.take().map_err(|e| XferError::Io(r.dst_side, e))?;
    while n > 0 {
        let want = n.min(u64::from(pipe.capacity())) as u32;
        let got =
            match deadline::timeout(r.src_idle, src.splice_to_pipe(&mut pipe.write, want)).await {
                Ok(Ok(0)) => return Err(XferError::Eof(r.src_side)),
                Ok(Ok(got)) => got,
                Ok(Err(e)) => return Err(XferError::Io(r.src_side, e)),
                Err(_) => return Err(XferError::Timeout(r.src_side)),
            };
        let mut left = got;
        while left > 0 {
            match deadline::timeout(r.dst_idle, dst.splice_from_pipe(&mut pipe.read, left)).await {
                Ok(Ok(0)) => return Err(XferError::Eof(r.dst_side)),
                Ok(Ok(put)) => left -= put,
                Ok(Err(e)) => return Err(XferError::Io(r.dst_side, e)),
                Err(_) => return Err(XferError::Timeout(r.dst_side)),
            }
        }
        n -= u64::from(got);
    }
    // Only a drained pipe goes back; every error path above drops it.
    pipes.give_back(pipe);
    Ok(())
}

/// Forwards a chunked body whose first bytes (already read) are `buf[at..]`;
/// `buf[from..at]` (a head not yet sent) leaves with them, or alone at once
/// when none came with it. Nothing is moved to the front to get there. On
/// success the buffer comes back with whatever followed the body (pipelined bytes),
/// or is `None` when nothing did and it already went back to the pool.
///
/// With `dechunk`, only the payload is written (for HTTP/1.0 clients, who
/// cannot read chunked framing); otherwise the validated bytes go verbatim.
pub async fn forward_chunked(
    r: &mut Route<'_>,
    mut buf: PoolBuf,
    mut from: usize,
    mut at: usize,
    decoder: &mut ChunkedDecoder,
    dechunk: bool,
) -> Result<Option<PoolBuf>, XferError> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    // The last read did not fill the buffer: the source is likely drained, so
    // the next wait is one without a buffer.
    let mut drained = true;
    loop {
        let left = if buf.len() > at {
            ranges.clear();
            let progress = decoder
                .decode(&buf[at..], &mut |range| {
                    if dechunk {
                        ranges.push(range)
                    }
                })
                .map_err(|e| XferError::Chunk(r.src_side, e))?;
            let consumed = at + progress.consumed;
            let end = if dechunk {
                // Pack the payload ranges behind what goes before them (they
                // only move left), write them, then drop the consumed input.
                let mut to = at;
                for range in &ranges {
                    let len = range.len();
                    buf.copy_within(at + range.start..at + range.end, to);
                    to += len;
                }
                to
            } else {
                consumed
            };
            if (drained || progress.done) && consumed == buf.len() && end > from {
                // All that was read goes out now, and more is not there yet (an event
                // stream between events) or the body ends: see `small_write`.
                let left = small_write(r, buf, from..end).await?;
                (from, at) = (0, 0);
                if progress.done {
                    return Ok(match left {
                        Left::Kept(b) => Some(b),
                        Left::Released(_) => None,
                    });
                }
                left
            } else {
                if end > from {
                    buf = write_range(r.dst, buf, from..end, r.dst_idle, r.dst_side).await?;
                }
                buf.consume(consumed);
                (from, at) = (0, 0);
                if progress.done {
                    return Ok(Some(buf));
                }
                Left::Kept(buf)
            }
        } else if from < at {
            buf = write_range(r.dst, buf, from..at, r.dst_idle, r.dst_side).await?;
            buf.consume(at);
            (from, at) = (0, 0);
            Left::Kept(buf)
        } else {
            Left::Kept(buf)
        };
        let pool = match left {
            Left::Kept(b) if decoder.is_done() => return Ok(Some(b)),
            Left::Kept(b) if !(drained && b.is_empty()) => {
                let spare = b.spare();
                let (got, b) = read_some(r.src, b, spare, r.src_idle, r.src_side).await?;
                if got == 0 {
                    return Err(XferError::Eof(r.src_side));
                }
                drained = got < spare;
                buf = b;
                continue;
            }
            Left::Kept(b) => {
                let pool = b.pool();
                drop(b);
                pool
            }
            Left::Released(pool) => pool,
        };
        match wait_bare(r.src, r.ring, pool, r.src_idle, r.src_side).await? {
            Waited::Empty(b) => {
                let spare = b.spare();
                let (got, b) = read_some(r.src, b, spare, r.src_idle, r.src_side).await?;
                if got == 0 {
                    return Err(XferError::Eof(r.src_side));
                }
                drained = got < spare;
                (buf, from, at) = (b, 0, 0);
            }
            Waited::Filled { buf: b, at: data } => {
                drained = b.spare() > 0;
                (buf, from, at) = (b, data, data);
            }
            Waited::Eof => return Err(XferError::Eof(r.src_side)),
        }
    }
}

/// What a step of a relay left: its buffer, or only the pool it went back to.
enum Left {
    Kept(PoolBuf),
    Released(BufPool),
}

/// Longest write [`small_write`] makes from a copy.
pub const SMALL_WRITE: usize = 2048;

/// Writes `buf[range]`, the last of what `buf` holds. Up to [`SMALL_WRITE`] bytes go from
/// a copy, and the buffer back to the pool before the write: a write waits a loop turn for
/// its completion, and under load that turn is long, so thousands of open streams whose
/// events land together would each hold a pool buffer (and the page its event touched)
/// for an event of a few hundred bytes. Longer writes go from `buf` itself.
async fn small_write(
    r: &mut Route<'_>,
    buf: PoolBuf,
    range: Range<usize>,
) -> Result<Left, XferError> {
    if range.len() > SMALL_WRITE {
        let mut buf = write_range(r.dst, buf, range, r.dst_idle, r.dst_side).await?;
        buf.clear();
        return Ok(Left::Kept(buf));
    }
    let pool = buf.pool();
    let bytes = buf[range].to_vec();
    drop(buf);
    match deadline::timeout(r.dst_idle, r.dst.write_all(bytes)).await {
        Ok((Ok(_), _)) => Ok(Left::Released(pool)),
        Ok((Err(e), _)) => Err(XferError::Io(r.dst_side, e)),
        Err(_) => Err(XferError::Timeout(r.dst_side)),
    }
}

/// Copies both directions until either side closes (an upgraded connection).
pub async fn tunnel(
    client: Stream,
    upstream: Stream,
    cbuf: PoolBuf,
    ubuf: PoolBuf,
    idle: Duration,
) {
    // Plain legs: each direction on its own half. A TLS leg's state cannot
    // be split that way, so one loop serves whichever side is readable.
    let (client, upstream) = match (client, upstream) {
        (Stream::Plain(c), Stream::Plain(u)) => (c, u),
        (c, u) => return tunnel_one_task(c, u, cbuf, ubuf, idle).await,
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = pump(&mut cr, &mut uw, cbuf, idle);
    let down = pump(&mut ur, &mut cw, ubuf, idle);
    // When one direction ends, the other is dropped with it: a half-closed
    // tunnel is closed whole, as proxies for WebSocket do.
    monoio::select! {
        _ = up => {},
        _ = down => {},
    }
}

/// The tunnel for a TLS leg: waits until either side is readable, moves
/// what it has to the other, until either closes or both stay quiet for
/// `idle`. A write blocks the other direction meanwhile, as one task must.
async fn tunnel_one_task(
    mut client: Stream,
    mut upstream: Stream,
    cbuf: PoolBuf,
    ubuf: PoolBuf,
    idle: Duration,
) {
    // Bytes that arrived with the handshake go first.
    let Ok(mut cbuf) = flush(&mut upstream, cbuf, idle).await else {
        return;
    };
    let Ok(mut ubuf) = flush(&mut client, ubuf, idle).await else {
        return;
    };
    loop {
        let from_client = {
            let ready = async {
                monoio::select! {
                    _ = client.readable(false) => true,
                    _ = upstream.readable(false) => false,
                }
            };
            match deadline::timeout(idle, ready).await {
                Ok(side) => side,
                Err(_) => return,
            }
        };
        if from_client {
            match relay_once(&mut client, &mut upstream, cbuf, idle).await {
                Ok(b) => cbuf = b,
                Err(()) => return,
            }
        } else {
            match relay_once(&mut upstream, &mut client, ubuf, idle).await {
                Ok(b) => ubuf = b,
                Err(()) => return,
            }
        }
    }
}

/// Writes what `buf` holds to `dst`; hands the emptied buffer back.
async fn flush(dst: &mut Stream, mut buf: PoolBuf, idle: Duration) -> Result<PoolBuf, ()> {
    if !buf.is_empty() {
        let len = buf.len();
        buf = match deadline::timeout(idle, dst.write_all(buf.slice(0..len))).await {
            Ok((Ok(_), s)) => s.into_inner(),
            _ => return Err(()),
        };
    }
    buf.clear();
    Ok(buf)
}

/// One read from `src` and its write to `dst`; `Err` when either ends.
async fn relay_once(
    src: &mut Stream,
    dst: &mut Stream,
    buf: PoolBuf,
    idle: Duration,
) -> Result<PoolBuf, ()> {
    let cap = buf.capacity();
    match deadline::timeout(idle, src.read(buf.slice_mut(0..cap))).await {
        Ok((Ok(n), s)) if n > 0 => flush(dst, s.into_inner(), idle).await,
        _ => Err(()),
    }
}

async fn pump<R: AsyncReadRent, W: AsyncWriteRentExt>(
    r: &mut R,
    w: &mut W,
    mut buf: PoolBuf,
    idle: Duration,
) {
    loop {
        if !buf.is_empty() {
            let len = buf.len();
            match deadline::timeout(idle, w.write_all(buf.slice(0..len))).await {
                Ok((Ok(_), s)) => buf = s.into_inner(),
                _ => return,
            }
            buf.clear();
        }
        let cap = buf.capacity();
        match deadline::timeout(idle, r.read(buf.slice_mut(0..cap))).await {
            Ok((Ok(n), s)) if n > 0 => buf = s.into_inner(),
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{buf::BufPool, runtime::deadline::tests::run};
    use monoio::net::TcpListener;
    use std::{io::Write as _, time::Instant};

    /// A body larger than the buffer it is given moves through a bulk buffer, byte for byte,
    /// and every slot goes back to the pool.
    #[test]
    fn a_large_body_moves_whole_through_a_bulk_buffer() {
        run(async {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            const N: usize = 200_000;
            let body: Vec<u8> = (0..N).map(|i| (i % 251) as u8).collect();
            let sent = body.clone();
            let feeder = std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).expect("connect");
                s.write_all(&sent).expect("write");
            });
            let (src, _) = listener.accept().await.expect("accept");
            let mut src = Stream::Plain(src);
            let reader = std::thread::spawn(move || {
                use std::io::Read as _;
                let mut s = std::net::TcpStream::connect(addr).expect("connect");
                let mut got = Vec::new();
                s.read_to_end(&mut got).expect("read");
                got
            });
            let (dst, _) = listener.accept().await.expect("accept");
            let mut dst = Stream::Plain(dst);
            let pool = BufPool::new(16 * 1024, 16);
            let buf = pool.try_acquire().expect("buffer");
            let mut route = Route {
                src: &mut src,
                ring: None,
                src_side: Side::Client,
                src_idle: Duration::from_secs(10),
                dst: &mut dst,
                dst_side: Side::Upstream,
                dst_idle: Duration::from_secs(10),
            };
            let back = copy_exact(&mut route, buf, N as u64).await.expect("copy");
            assert!(back.capacity() >= 4 * 16 * 1024, "a bulk buffer was used");
            drop(back);
            assert_eq!(pool.in_use(), 0);
            // Closing the destination ends the reader's read.
            drop(dst);
            assert_eq!(reader.join().expect("reader"), body);
            let _ = feeder.join();
        });
    }

    /// A response body whose client stops reading is cut by the client's
    /// limit (`dst_idle`), however long the upstream's (`src_idle`) is.
    #[test]
    fn a_stalled_destination_times_out_on_its_own_limit() {
        run(async {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            // The source: a peer that always has bytes to read.
            let feeder = std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).expect("connect");
                let block = [b'x'; 65536];
                while s.write_all(&block).is_ok() {}
            });
            let (src, _) = listener.accept().await.expect("accept");
            let mut src = Stream::Plain(src);
            // The destination: a peer that never reads.
            let idle_peer = std::net::TcpStream::connect(addr).expect("connect");
            let (dst, _) = listener.accept().await.expect("accept");
            let mut dst = Stream::Plain(dst);
            let pool = BufPool::new(16 * 1024, 1);
            let buf = pool.try_acquire().expect("buffer");
            let mut route = Route {
                src: &mut src,
                ring: None,
                src_side: Side::Upstream,
                src_idle: Duration::from_secs(60),
                dst: &mut dst,
                dst_side: Side::Client,
                dst_idle: Duration::from_millis(300),
            };
            let t0 = Instant::now();
            let res = copy_exact(&mut route, buf, 1 << 40).await;
            match res {
                Err(XferError::Timeout(Side::Client)) => {}
                Err(e) => panic!("expected the client's timeout, got {e:?}"),
                Ok(_) => panic!("the copy finished although the client never read"),
            }
            assert!(t0.elapsed() < Duration::from_secs(10));
            drop(idle_peer);
            drop(src);
            let _ = feeder.join();
        });
    }
}
