//! The response side of an AI route: the body is forwarded as it arrives
//! while its usage is watched. Event streams are parsed frame by frame and,
//! when Ringway itself asked for usage, the usage-only chunk is removed —
//! only a frame still incomplete at the end of a read is held back, never
//! more than [`MAX_SSE_FRAME`] bytes. Other bodies (JSON) go out verbatim
//! while a streaming scan finds their `usage`.

use std::{ops::Range, time::Instant};

use monoio::{
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};
use ringway_filters::sse::{SseItem, SseParser};

use super::account::{AiCtx, MAX_SSE_FRAME};
use crate::{
    buf::PoolBuf,
    h1::{BodyKind, ChunkedDecoder},
    proxy::{
        response::RespPlan,
        transfer::{Side, XferError},
    },
    runtime::{deadline, Generation},
};

/// How the upstream frames the body.
enum Reader {
    Length(u64),
    Chunked(ChunkedDecoder),
    Eof,
}

/// Relays the response whose head is `ubuf[rp.head_start..rp.head_end]`.
/// Returns the bytes written to the client and whether the upstream ended
/// cleanly (its connection reusable).
pub async fn relay(
    g: &Generation,
    client: &mut TcpStream,
    up: &mut TcpStream,
    mut ubuf: PoolBuf,
    rp: &RespPlan,
    ctx: &mut AiCtx,
    up_idle: std::time::Duration,
) -> Result<(u64, bool), XferError> {
    let client_idle = g.server.body_timeout;
    let head = ubuf[rp.head_start..rp.head_end].to_vec();
    let mut written = head.len() as u64;
    let mut reader = match rp.body {
        BodyKind::None => {
            write(client, head, client_idle).await?;
            return Ok((written, ubuf.len() == rp.head_end));
        }
        BodyKind::Length(n) => Reader::Length(n),
        BodyKind::Chunked => Reader::Chunked(ChunkedDecoder::new(u64::MAX)),
        BodyKind::CloseDelimited => Reader::Eof,
    };
    write(client, head, client_idle).await?;
    ctx.streamed = rp.sse;
    if rp.sse {
        ctx.sse = Some(SseParser::new(MAX_SSE_FRAME));
    }
    // Bytes already read with the head come first.
    ubuf.consume(rp.head_end);
    let rechunk = rp.reframe && !rp.client_close_http10();
    let mut held: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::with_capacity(ubuf.capacity() + 64);
    let mut pieces: Vec<Range<usize>> = Vec::new();
    let mut clean = true;
    loop {
        // Payload ranges of what is in `ubuf`, and how much of it is framing-consumed.
        pieces.clear();
        let (consumed, done) = match &mut reader {
            Reader::Length(rem) => {
                let take = (*rem).min(ubuf.len() as u64) as usize;
                if take > 0 {
                    pieces.push(0..take);
                }
                *rem -= take as u64;
                if ubuf.len() > take {
                    clean = false;
                }
                (take, *rem == 0)
            }
            Reader::Chunked(dec) => {
                let p = dec
                    .decode(&ubuf, &mut |r| pieces.push(r))
                    .map_err(|e| XferError::Chunk(Side::Upstream, e))?;
                if p.done && p.consumed < ubuf.len() {
                    clean = false;
                }
                (p.consumed, p.done)
            }
            Reader::Eof => {
                if !ubuf.is_empty() {
                    pieces.push(0..ubuf.len());
                }
                (ubuf.len(), false)
            }
        };
        // What goes to the client.
        out.clear();
        if rp.reframe {
            for r in &pieces {
                inspect_sse(ctx, &ubuf[r.clone()], &mut held, &mut out);
            }
        } else {
            for r in &pieces {
                observe(ctx, &ubuf[r.clone()]);
            }
            out.extend_from_slice(&ubuf[..consumed]);
        }
        if done && !rechunk {
            // The upstream is done: settle before the client sees the end,
            // so returned tokens reach Redis before its next request can.
            finish(ctx);
        }
        if !out.is_empty() {
            let framed = if rechunk {
                chunk(&out)
            } else {
                std::mem::take(&mut out)
            };
            written += framed.len() as u64;
            out = write(client, framed, client_idle).await?;
        }
        ubuf.consume(consumed);
        if done {
            break;
        }
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
            Ok((Ok(_), s)) => ubuf = s.into_inner(),
            Ok((Err(e), _)) => return Err(XferError::Io(Side::Upstream, e)),
            Err(_) => return Err(XferError::Timeout(Side::Upstream)),
        }
    }
    // An incomplete last frame is forwarded as it is.
    let mut tail = std::mem::take(&mut held);
    finish(ctx);
    if rechunk {
        if !tail.is_empty() {
            tail = chunk(&tail);
        }
        tail.extend_from_slice(b"0\r\n\r\n");
    }
    if !tail.is_empty() {
        written += tail.len() as u64;
        write(client, tail, client_idle).await?;
    }
    Ok((written, clean && !matches!(reader, Reader::Eof)))
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
    ctx.json.finish();
    ctx.done_at = Some(Instant::now());
    let _ = ctx.settle();
}

/// Watches a non-SSE body (or an SSE body forwarded verbatim).
fn observe(ctx: &mut AiCtx, payload: &[u8]) {
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
            ctx.json.feed(payload)
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
    let tracker = &mut ctx.tracker;
    let first = &mut ctx.first_token;
    let injected = ctx.injected;
    let mut prev = 0usize;
    let mut ends: [(usize, bool); 64] = [(0, false); 64];
    let mut n = 0usize;
    let mut overflow = false;
    p.feed_items(payload, &mut |item| match item {
        SseItem::End(f) => {
            let mut drop_it = false;
            if let Some(ev) = f.event {
                let o = tracker.on_event(&ev);
                if o.first_content && first.is_none() {
                    *first = Some(Instant::now());
                }
                drop_it = injected && o.usage_only;
            } else if f.oversized {
                let _ = tracker.on_oversized_end();
            }
            if n < ends.len() {
                ends[n] = (f.end, drop_it);
                n += 1;
            } else {
                overflow = true;
            }
        }
        SseItem::OversizedData(d) => tracker.on_oversized_data(d),
    });
    if overflow || !injected {
        // Nothing to remove (or more frames than tracked in one read, where
        // removal is skipped for that read): forward as is.
        out.append(held);
        out.extend_from_slice(payload);
        return;
    }
    for &(end, drop_it) in &ends[..n] {
        if !drop_it {
            // The client did not ask for usage: take away the `"usage":null`
            // the upstream adds to every chunk once asked, so the client
            // gets exactly what a direct connection would give it.
            let start = out.len();
            out.append(held);
            out.extend_from_slice(&payload[prev..end]);
            strip_usage_null(out, start);
        }
        held.clear();
        prev = end;
    }
    let in_oversized = p.in_oversized_frame();
    if in_oversized || held.len() + (payload.len() - prev) > MAX_SSE_FRAME {
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
    let f = NEEDLE.get_or_init(|| memchr::memmem::Finder::new(b",\"usage\":null"));
    while let Some(at) = f.find(&out[from..]) {
        let at = from + at;
        out.drain(at..at + f.needle().len());
    }
}

/// One chunk of the chunked coding around `data`.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 16);
    let _ = std::io::Write::write_fmt(&mut v, format_args!("{:x}\r\n", data.len()));
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

/// Writes `data` whole; hands the (emptied) vector back for reuse.
async fn write(
    client: &mut TcpStream,
    data: Vec<u8>,
    idle: std::time::Duration,
) -> Result<Vec<u8>, XferError> {
    match deadline::timeout(idle, client.write_all(data)).await {
        Ok((Ok(_), mut v)) => {
            v.clear();
            Ok(v)
        }
        Ok((Err(e), _)) => Err(XferError::Io(Side::Client, e)),
        Err(_) => Err(XferError::Timeout(Side::Client)),
    }
}
