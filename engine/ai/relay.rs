//! The response side of an AI route: the body is forwarded as it arrives
//! while its usage is watched. Event streams are parsed frame by frame and,
//! when Ringway itself asked for usage, the usage-only chunk is removed —
//! only a frame still incomplete at the end of a read is held back, never
//! more than [`MAX_SSE_FRAME`] bytes. Other bodies (JSON) go out verbatim
//! while a streaming scan finds their `usage`. A body the upstream compressed
//! (although asked for `identity`) goes out verbatim too, and a decoded copy
//! of it is what the scans read.

use crate::transport::Stream;
use std::{
    future::Future,
    ops::Range,
    time::{Duration, Instant},
};

use monoio::{
    buf::{IoBuf, Slice},
    io::AsyncReadRent,
    BufResult,
};
use ringway_filters::{
    coding::ContentCoding,
    sse::{FrameSink, SseEvent, SseItem, SseParser},
    usage::{usage_member, EventOutcome, UsageTracker},
};

use super::account::{AiCtx, MAX_SSE_FRAME};
use crate::runtime::clock;
use crate::{
    buf::{BufPool, PoolBuf, RecvRing},
    h1::{BodyKind, ChunkedDecoder},
    proxy::{
        response::RespPlan,
        transfer::{wait_bare, write_range, Side, Waited, WriteWhole, XferError},
    },
    runtime::{deadline, Generation},
};

/// How the upstream frames the body.
enum Reader {
    Length(u64),
    Chunked(ChunkedDecoder),
    Eof,
}

/// The SSE comment written during upstream silence (`sse_keepalive`).
const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// Longest chunk-size line Ringway writes: eight hex digits and CRLF.
const CHUNK_LINE_MAX: usize = 10;

/// Relays the response whose head is `ubuf[rp.head_start..rp.head_end]`.
/// Returns the bytes written to the client and whether the upstream ended
/// cleanly (its connection reusable).
///
/// The head leaves with the first body bytes (one write, as on plain routes),
/// or alone at once when none came with it. Forwarded verbatim, the body is
/// written straight from `ubuf`; re-framed, the kept frames are gathered into
/// one vector per read, behind room for the head and chunk-size line.
///
/// A plain `fn` around an `async move` block: an `async fn` holds its arguments twice in
/// its state, which every AI request (an open stream's too) allocates.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
pub fn relay<'a>(
    g: &'a Generation,
    ring: Option<&'a RecvRing>,
    client: &'a mut Stream,
    up: &'a mut Stream,
    mut ubuf: PoolBuf,
    rp: &'a RespPlan,
    ctx: &'a mut AiCtx,
    up_idle: std::time::Duration,
) -> impl Future<Output = Result<(u64, bool), XferError>> + 'a {
    async move {
        let client_idle = g.server.body_timeout;
        let head = rp.head_start..rp.head_end;
        let mut reader = match rp.body {
            BodyKind::None => {
                let len = head.len() as u64;
                let buf = write_range(client, ubuf, head, client_idle, Side::Client).await?;
                return Ok((len, buf.len() == rp.head_end));
            }
            BodyKind::Length(n) => Reader::Length(n),
            BodyKind::Chunked => Reader::Chunked(ChunkedDecoder::new(u64::MAX)),
            BodyKind::CloseDelimited => Reader::Eof,
        };
        // Content-Encoding is end to end, so it is still in the head rewritten for the client.
        let coding = if rp.coded {
            content_coding(&ubuf[head.clone()])
        } else {
            ContentCoding::Identity
        };
        ctx.decoder = coding.decoder().map(Box::new);
        // A coding Ringway cannot read: the body is only measured, for an estimate
        // from its length, and (being unread) never edited.
        ctx.streamed = rp.sse && coding != ContentCoding::Unsupported;
        if ctx.streamed {
            ctx.sse = Some(Box::new(SseParser::new(MAX_SSE_FRAME)));
        }
        let rechunk = rp.reframe && !rp.client_close_http10();
        let mut written = 0u64;
        // Not yet written: the head, at the front of `ubuf` until the first write.
        let mut head_left = Some(head);
        // Where the body bytes start in `ubuf` (after the head on the first pass).
        let mut at = rp.head_end;
        let mut held: Vec<u8> = Vec::new();
        let mut out: Vec<u8> = Vec::new();
        let mut pieces: Vec<Range<usize>> = Vec::new();
        let mut clean = true;
        // The last read did not fill the buffer: the upstream is likely drained.
        let mut drained = true;
        loop {
            // Ringway's own time on this read's bytes, until they are handed to the client.
            let turn = std::time::Instant::now();
            // Payload ranges (absolute in `ubuf`) and the bytes the framing consumed.
            pieces.clear();
            let (consumed, done) = match &mut reader {
                Reader::Length(rem) => {
                    let avail = ubuf.len() - at;
                    let take = (*rem).min(avail as u64) as usize;
                    if take > 0 {
                        pieces.push(at..at + take);
                    }
                    *rem -= take as u64;
                    if avail > take {
                        clean = false;
                    }
                    (take, *rem == 0)
                }
                Reader::Chunked(dec) => {
                    let p = dec
                        .decode(&ubuf[at..], &mut |r| pieces.push(at + r.start..at + r.end))
                        .map_err(|e| XferError::Chunk(Side::Upstream, e))?;
                    if p.done && at + p.consumed < ubuf.len() {
                        clean = false;
                    }
                    (p.consumed, p.done)
                }
                Reader::Eof => {
                    let avail = ubuf.len() - at;
                    if avail > 0 {
                        pieces.push(at..at + avail);
                    }
                    (avail, false)
                }
            };
            let kept = if rp.reframe {
                // Room in front for the head (first pass) and a chunk-size line.
                let head_len = head_left.as_ref().map_or(0, Range::len);
                let room = head_len + if rechunk { CHUNK_LINE_MAX } else { 0 };
                out.clear();
                // What the read becomes: at most the read plus framing (a held frame
                // aside), reserved at once rather than grown step by step.
                let read_len: usize = pieces.iter().map(Range::len).sum();
                out.reserve(room + read_len + held.len() + 2 * CHUNK_LINE_MAX);
                out.resize(room, 0);
                if ctx.decoder.is_none() && pieces.len() > 1 {
                    // One payload per read, not one per upstream chunk: the frames of many
                    // chunks are then read and copied out in one pass (ranges only move left,
                    // over the chunk lines already decoded).
                    let mut to = pieces[0].end;
                    for r in &pieces[1..] {
                        ubuf.copy_within(r.clone(), to);
                        to += r.len();
                    }
                    let whole = pieces[0].start..to;
                    pieces.clear();
                    pieces.push(whole);
                }
                for r in &pieces {
                    if ctx.decoder.is_some() {
                        // Coded frames cannot be edited: they go as they came (re-framed only),
                        // and their decoded copy is watched.
                        observe(ctx, &ubuf[r.clone()]);
                        out.extend_from_slice(&ubuf[r.clone()]);
                    } else {
                        inspect_sse(ctx, &ubuf[r.clone()], &mut held, &mut out);
                    }
                }
                if done {
                    // The upstream is done: settle before the client sees the end,
                    // so returned tokens reach Redis before its next request can.
                    finish(ctx);
                    // An incomplete last frame is forwarded as it is.
                    out.append(&mut held);
                }
                let payload = out.len() - room;
                let mut start = room;
                if rechunk && payload > 0 {
                    let mut line = [0u8; CHUNK_LINE_MAX];
                    let n = chunk_line(payload, &mut line);
                    start -= n;
                    out[start..room].copy_from_slice(&line[..n]);
                    out.extend_from_slice(b"\r\n");
                }
                if done && rechunk {
                    // The last chunk leaves with the data, not in a write of its own.
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                ctx.busy += turn.elapsed();
                if let Some(h) = head_left.take() {
                    if start < out.len() {
                        start -= h.len();
                        out[start..start + h.len()].copy_from_slice(&ubuf[h]);
                    } else {
                        // Nothing to send with it: the head goes now, alone.
                        written += h.len() as u64;
                        ubuf = write_range(client, ubuf, h, client_idle, Side::Client).await?;
                    }
                }
                // The read is all in `out` now: when nothing is left in `ubuf` and no more is
                // there yet, the buffer goes back before the write, which under load waits a loop
                // turn (see `transfer::small_write`).
                ubuf.consume(at + consumed);
                let kept = release_if(ubuf, drained || done);
                if start < out.len() {
                    written += (out.len() - start) as u64;
                    out = write_from(client, out, start, client_idle).await?;
                    out.clear();
                }
                kept
            } else {
                for r in &pieces {
                    observe(ctx, &ubuf[r.clone()]);
                }
                if done {
                    finish(ctx);
                }
                let mut end = at + consumed;
                if rp.dechunk {
                    // An HTTP/1.0 client cannot read chunked framing: only the
                    // payload goes, packed behind the head (ranges only move left).
                    let mut to = at;
                    for r in &pieces {
                        ubuf.copy_within(r.clone(), to);
                        to += r.len();
                    }
                    end = to;
                }
                ctx.busy += turn.elapsed();
                let from = head_left.take().map_or(at, |h| h.start);
                if end > from {
                    written += (end - from) as u64;
                    ubuf = write_range(client, ubuf, from..end, client_idle, Side::Client).await?;
                }
                ubuf.consume(at + consumed);
                release_if(ubuf, drained)
            };
            at = 0;
            if done {
                return Ok((written, clean));
            }
            let keepalive = ctx.keepalive.filter(|_| rp.reframe);
            // Between events of a stream: wait without a buffer (see `wait_bare`),
            // and without the output vector a large read left behind.
            if kept.is_err() {
                out = Vec::new();
            }
            // No tuple of `kept` and `keepalive` matched here: it would stay in the state
            // across these waits.
            ubuf = if let Some(every) = keepalive {
                let times = (every, up_idle, client_idle);
                // Boxed: inline, its state would size the relay's for every stream, also
                // those whose route sends no keep-alives.
                written += Box::pin(quiet(ctx, &held, up, client, rechunk, times)).await?;
                match kept {
                    Ok(b) => b,
                    Err(pool) => pool
                        .acquire_within(pool.slot_size(), up_idle)
                        .await
                        .map_err(|_| XferError::NoBuffer(Side::Upstream))?,
                }
            } else {
                match kept {
                    Ok(b) => b,
                    Err(pool) => match wait_bare(up, ring, pool, up_idle, Side::Upstream).await? {
                        Waited::Empty(b) => b,
                        Waited::Filled { buf, at: data } => {
                            drained = buf.spare() > 0;
                            (ubuf, at) = (buf, data);
                            continue;
                        }
                        Waited::Eof if matches!(reader, Reader::Eof) => break,
                        Waited::Eof => return Err(XferError::Eof(Side::Upstream)),
                    },
                }
            };
            // Read more from the upstream.
            let len = ubuf.len();
            let cap = ubuf.capacity();
            match deadline::timeout(
                up_idle,
                up.read(monoio::buf::IoBufMut::slice_mut(ubuf, len..cap)),
            )
            .await
            {
                Ok((Ok(0), _)) => {
                    if matches!(reader, Reader::Eof) {
                        break;
                    }
                    return Err(XferError::Eof(Side::Upstream));
                }
                Ok((Ok(n), s)) => {
                    drained = n < cap - len;
                    ubuf = s.into_inner();
                }
                Ok((Err(e), _)) => return Err(XferError::Io(Side::Upstream, e)),
                Err(_) => return Err(XferError::Timeout(Side::Upstream)),
            }
        }
        // A close-delimited body ended. An incomplete last frame is forwarded as it is.
        finish(ctx);
        let mut tail = Vec::new();
        if rechunk {
            if !held.is_empty() {
                let mut line = [0u8; CHUNK_LINE_MAX];
                let n = chunk_line(held.len(), &mut line);
                tail.extend_from_slice(&line[..n]);
                tail.append(&mut held);
                tail.extend_from_slice(b"\r\n");
            }
            tail.extend_from_slice(b"0\r\n\r\n");
        } else {
            tail.append(&mut held);
        }
        if !tail.is_empty() {
            written += tail.len() as u64;
            write_from(client, tail, 0, client_idle).await?;
        }
        // A close-delimited upstream connection is never reused.
        Ok((written, false))
    }
}

/// Upstream silence on an event stream: until it speaks again, keep-alive
/// comments go out between whole events, one per `every` (each counts as
/// written output, not as upstream progress: `response_timeout` still bounds
/// the silence). Returns the bytes written.
async fn quiet(
    ctx: &AiCtx,
    held: &[u8],
    up: &mut Stream,
    client: &mut Stream,
    rechunk: bool,
    (every, up_idle, client_idle): (Duration, Duration, Duration),
) -> Result<u64, XferError> {
    let quiet_since = clock::now();
    let mut written = 0;
    loop {
        let between_events =
            held.is_empty() && ctx.sse.as_ref().is_some_and(|p| p.pending_len() == 0);
        let left = up_idle.saturating_sub(clock::since(quiet_since));
        let wait = if between_events {
            every.min(left)
        } else {
            left
        };
        match deadline::timeout(wait, up.readable(false)).await {
            Ok(_) => return Ok(written),
            Err(_) if !between_events || clock::since(quiet_since) >= up_idle => {
                return Err(XferError::Timeout(Side::Upstream));
            }
            Err(_) => {}
        }
        // The head already left on the first pass (re-framed bodies always send it).
        let mut ping = Vec::with_capacity(24);
        if rechunk {
            ping.extend_from_slice(b"e\r\n");
            ping.extend_from_slice(KEEPALIVE);
            ping.extend_from_slice(b"\r\n");
        } else {
            ping.extend_from_slice(KEEPALIVE);
        }
        written += ping.len() as u64;
        write_from(client, ping, 0, client_idle).await?;
    }
}

/// `ubuf` back to its pool when it is empty and `drained` (no more bytes likely there yet),
/// for a wait without it; otherwise kept for the next read.
fn release_if(ubuf: PoolBuf, drained: bool) -> Result<PoolBuf, BufPool> {
    if drained && ubuf.is_empty() {
        Err(ubuf.pool())
    } else {
        Ok(ubuf)
    }
}

/// The upstream's body ended: final usage, then the request is settled
/// (once; later calls do nothing).
fn finish(ctx: &mut AiCtx) {
    if ctx.done_at.is_some() {
        return;
    }
    if let Some(p) = ctx.sse.as_mut() {
        let tracker = &mut ctx.tracker;
        p.finish(&mut |ev| {
            let _ = tracker.on_event(&ev);
        });
    }
    ctx.json_finish();
    ctx.done_at = Some(Instant::now());
    let _ = ctx.settle();
}

/// The coding named by the `Content-Encoding` fields of a response head.
fn content_coding(head: &[u8]) -> ContentCoding {
    const NAME: &[u8] = b"content-encoding:";
    ContentCoding::from_fields(
        head.split(|&b| b == b'\n')
            .skip(1)
            .filter(|line| {
                line.get(..NAME.len())
                    .is_some_and(|n| n.eq_ignore_ascii_case(NAME))
            })
            .map(|line| &line[NAME.len()..]),
    )
}

/// Watches a non-SSE body (or an SSE body forwarded verbatim); a coded body
/// through its decoder.
fn observe(ctx: &mut AiCtx, payload: &[u8]) {
    let Some(mut d) = ctx.decoder.take() else {
        return observe_plain(ctx, payload);
    };
    if d.feed(payload, &mut |plain| observe_plain(ctx, plain))
        .is_err()
    {
        // Corrupt: what was decoded stays counted; the rest is only measured
        // (its coded length stands in for an estimate).
        ctx.json_bytes += payload.len() as u64;
    }
    // Kept after an error too: it marks the body as coded, never to be edited.
    ctx.decoder = Some(d);
}

/// Watches the plain bytes of a body.
fn observe_plain(ctx: &mut AiCtx, payload: &[u8]) {
    match ctx.sse.as_mut() {
        Some(p) => {
            let tracker = &mut ctx.tracker;
            let first = &mut ctx.first_token;
            p.feed_items(payload, &mut |item| match item {
                SseItem::End(f) => {
                    if let Some(ev) = f.event {
                        let o = tracker.on_event(&ev);
                        if o.first_content && first.is_none() {
                            *first = Some(Instant::now());
                        }
                    } else if f.oversized {
                        let _ = tracker.on_oversized_end();
                    }
                }
                SseItem::OversizedData(d) => tracker.on_oversized_data(d),
            });
        }
        None => {
            ctx.json_bytes += payload.len() as u64;
            ctx.json_feed(payload)
        }
    }
}

/// What to remove from a kept frame.
#[derive(Clone, Copy)]
enum Cut {
    /// Nothing.
    None,
    /// `,"usage":null` at this offset of the payload.
    At(usize),
    /// Find every `,"usage":null` in the frame (its data was not read in place).
    Search,
    /// A usage member on a content chunk, at this range of the payload.
    Member(usize, usize),
    /// The same, its data not read in place: find `member[a..b]` in the frame.
    FindMember(usize, usize),
}

/// `,"usage":null`: what the upstream adds to every chunk once asked for usage.
const USAGE_NULL: &[u8] = b",\"usage\":null";

/// Reads the frames of one read and, when Ringway asked for usage itself, builds what the
/// client gets as they end: the kept bytes are copied in spans, broken only where something
/// is cut, so a read of many frames costs one copy per cut, not per frame.
struct FrameWatch<'a> {
    tracker: &'a mut UsageTracker,
    first: &'a mut Option<Instant>,
    /// Edit the frames (Ringway injected `include_usage`); otherwise they are only read.
    injected: bool,
    max_frame: usize,
    payload: &'a [u8],
    /// The start of the first frame, from earlier reads.
    held: &'a mut Vec<u8>,
    out: &'a mut Vec<u8>,
    /// Payload from here to `prev` is kept and not yet in `out`.
    span: usize,
    /// Where the last completed frame ended in the payload.
    prev: usize,
    /// Usage members to find, in frames whose data was not read in place.
    member: Vec<u8>,
}

impl FrameWatch<'_> {
    /// The frame `held ++ payload[prev..end]` ended: keep it with `cut` made, or drop it.
    fn frame(&mut self, end: usize, drop_it: bool, cut: Cut) {
        let prev = self.prev;
        self.prev = end;
        if !self.injected {
            return;
        }
        let payload = self.payload;
        if drop_it {
            self.out.extend_from_slice(&payload[self.span..prev]);
            self.held.clear();
            self.span = end;
            return;
        }
        // Only the read's first frame can have held bytes, and they go before it.
        let held_len = self.held.len();
        if held_len > 0 {
            self.out.extend_from_slice(&payload[self.span..prev]);
            self.span = prev;
            self.out.append(self.held);
        }
        match cut {
            Cut::None => {}
            Cut::At(i) if (prev..end).contains(&i) => {
                self.out.extend_from_slice(&payload[self.span..i]);
                self.span = i + USAGE_NULL.len();
            }
            Cut::Member(a, b) if prev <= a && b <= end => {
                self.out.extend_from_slice(&payload[self.span..a]);
                self.span = b;
            }
            _ => {
                // Not read in place: the whole frame goes to `out`, and is cut there.
                self.out.extend_from_slice(&payload[self.span..prev]);
                let start = self.out.len() - held_len;
                self.out.extend_from_slice(&payload[prev..end]);
                self.span = end;
                if let Cut::FindMember(a, b) = cut {
                    let member = &self.member[a..b];
                    // A member split over several `data:` lines is not found and stays.
                    if let Some(at) = memchr::memmem::find(&self.out[start..], member) {
                        let at = start + at;
                        self.out.drain(at..at + member.len());
                    }
                } else {
                    strip_usage_null(self.out, start);
                }
            }
        }
    }
}

impl FrameSink for FrameWatch<'_> {
    fn item(&mut self, item: SseItem<'_>) {
        match item {
            SseItem::End(f) => {
                let mut drop_it = false;
                let mut cut = Cut::None;
                if let Some(ev) = f.event {
                    let o = self.tracker.on_event(&ev);
                    if o.first_content && self.first.is_none() {
                        *self.first = Some(Instant::now());
                    }
                    drop_it = self.injected && o.usage_only;
                    if self.injected && !drop_it {
                        cut = self.cut(&ev, &o);
                    }
                } else if f.oversized {
                    let _ = self.tracker.on_oversized_end();
                }
                self.frame(f.end, drop_it, cut);
            }
            SseItem::OversizedData(d) => self.tracker.on_oversized_data(d),
        }
    }

    fn run(&mut self, input: &[u8], at: usize) -> usize {
        // A run starts where a frame does, so nothing of it is held.
        debug_assert!(self.held.is_empty());
        let FrameWatch {
            tracker,
            injected,
            out,
            span,
            ..
        } = self;
        let run = tracker.template_frames(input, at, self.max_frame, &mut |null_at, _end| {
            if let (true, Some(i)) = (*injected, null_at) {
                out.extend_from_slice(&input[*span..i]);
                *span = i + USAGE_NULL.len();
            }
        });
        if run.first_content && self.first.is_none() {
            *self.first = Some(Instant::now());
        }
        if run.len > 0 {
            self.prev = at + run.len;
        }
        run.len
    }
}

impl FrameWatch<'_> {
    /// What to remove from a kept frame whose event is `ev`.
    fn cut(&mut self, ev: &SseEvent<'_>, o: &EventOutcome) -> Cut {
        let payload = self.payload;
        let base = payload.as_ptr() as usize;
        // The field's place in `payload`, when the data was read in place there.
        let data_at = (ev.data.as_ptr() as usize).wrapping_sub(base);
        let in_place = payload.get(data_at..data_at.wrapping_add(ev.data.len())) == Some(ev.data);
        let member = if o.usage && !o.usage_only {
            // Usage on a content chunk (Gemini-compatible servers): the
            // client did not ask for it, so the member goes, the chunk stays.
            usage_member(ev.data)
        } else {
            None
        };
        match (member, o.usage_nulls, o.usage_null_at) {
            (Some(r), ..) if in_place => Cut::Member(data_at + r.start, data_at + r.end),
            (Some(r), ..) => {
                let at = self.member.len();
                self.member.extend_from_slice(&ev.data[r]);
                Cut::FindMember(at, self.member.len())
            }
            (None, Some(0), _) => Cut::None,
            (None, Some(1), Some(i))
                if in_place && payload[data_at + i..].starts_with(USAGE_NULL) =>
            {
                Cut::At(data_at + i)
            }
            _ => Cut::Search,
        }
    }
}

/// Parses SSE payload; appends to `out` every byte the client should get:
/// whole frames, except the usage-only chunk Ringway asked for itself.
fn inspect_sse(ctx: &mut AiCtx, payload: &[u8], held: &mut Vec<u8>, out: &mut Vec<u8>) {
    let Some(p) = ctx.sse.as_mut() else {
        out.extend_from_slice(payload);
        return;
    };
    let injected = ctx.injected;
    let mut watch = FrameWatch {
        tracker: &mut ctx.tracker,
        first: &mut ctx.first_token,
        injected,
        max_frame: p.max_frame(),
        payload,
        held,
        out,
        span: 0,
        prev: 0,
        member: Vec::new(),
    };
    p.feed_sink(payload, &mut watch);
    let (span, prev) = (watch.span, watch.prev);
    if !injected {
        out.append(held);
        out.extend_from_slice(payload);
        return;
    }
    out.extend_from_slice(&payload[span..prev]);
    if p.in_oversized_frame() || held.len() + (payload.len() - prev) > MAX_SSE_FRAME {
        // Never hold more than one frame's bound: flush instead.
        out.append(held);
        out.extend_from_slice(&payload[prev..]);
    } else {
        held.extend_from_slice(&payload[prev..]);
    }
}

/// Removes `,"usage":null` from `out[from..]` (one frame).
fn strip_usage_null(out: &mut Vec<u8>, from: usize) {
    static NEEDLE: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
        std::sync::OnceLock::new();
    let f = NEEDLE.get_or_init(|| memchr::memmem::Finder::new(USAGE_NULL));
    while let Some(at) = f.find(&out[from..]) {
        let at = from + at;
        out.drain(at..at + f.needle().len());
    }
}

/// Writes the chunk-size line for `len` bytes into `line`; returns its length.
fn chunk_line(len: usize, line: &mut [u8; CHUNK_LINE_MAX]) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; CHUNK_LINE_MAX - 2];
    let mut n = 0;
    let mut v = len;
    loop {
        digits[n] = HEX[v & 0xf];
        n += 1;
        v >>= 4;
        if v == 0 || n == digits.len() {
            break;
        }
    }
    for (i, d) in digits[..n].iter().rev().enumerate() {
        line[i] = *d;
    }
    line[n..n + 2].copy_from_slice(b"\r\n");
    n + 2
}

/// Writes `data[from..]` whole; hands the vector back for reuse.
fn write_from(
    client: &mut Stream,
    data: Vec<u8>,
    from: usize,
    idle: std::time::Duration,
) -> WriteWhole<impl Future<Output = BufResult<usize, Slice<Vec<u8>>>> + '_, Vec<u8>> {
    let len = data.len();
    WriteWhole::new(client.write_all(data.slice(from..len)), idle, Side::Client)
}

#[cfg(test)]
mod tests {
    use super::{content_coding, ContentCoding};

    /// Content-Encoding is found in any case and over several fields; the
    /// status line and other fields are not read as one.
    #[test]
    fn content_coding_is_read_from_the_head() {
        let head =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Encoding: gzip\r\n\r\n";
        assert_eq!(content_coding(head), ContentCoding::Gzip);
        let head = b"HTTP/1.1 200 OK\r\nCONTENT-ENCODING: identity\r\ncontent-encoding:br\r\n\r\n";
        assert_eq!(content_coding(head), ContentCoding::Br);
        let head = b"HTTP/1.1 200 OK\r\nx-content-encoding: gzip\r\ncontent-length: 2\r\n\r\n";
        assert_eq!(content_coding(head), ContentCoding::Identity);
        let head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-encoding: br\r\n\r\n";
        assert_eq!(content_coding(head), ContentCoding::Unsupported);
    }
}
