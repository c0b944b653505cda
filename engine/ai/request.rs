//! The request side of an AI route: the body is read into one pool buffer
//! (bounded by the pool: a body larger than the free budget waits, one
//! larger than the whole budget is refused), scanned without building a
//! tree, edited (model rename, `include_usage`), then sent with a corrected
//! Content-Length. This is the "scan then replay" design: the model that
//! picks the upstream may come after an 8 MB image, so the body must be held
//! before the upstream is chosen — in pool memory, which the pool bounds.

use crate::transport::Stream;
use std::time::Duration;

use monoio::io::AsyncReadRent;
use ringway_filters::{
    model::{glob_match, ModelScan, ModelScanner},
    usage::RequestEstimator,
};

use super::AiRoute;
use crate::{
    buf::PoolBuf,
    h1::{BodyKind, ChunkedDecoder},
    proxy::{
        error::{self, Reject},
        request::Plan,
    },
    runtime::{deadline, Generation, Worker},
};

/// Room kept after the body for the edits (a longer model name, the
/// `stream_options` injection).
const EDIT_ROOM: usize = 512;

/// What the scan of a request body found, and the body to send.
pub struct AiRequest {
    /// The top-level `model`, as the client sent it.
    pub model: Option<String>,
    /// The upstream picked by `models`, when the route has that map.
    pub upstream: Option<usize>,
    /// `stream: true`.
    pub stream: bool,
    /// Ringway made the upstream report usage the client did not ask for
    /// (`stream_options.include_usage` added, or switched to `true`), and so
    /// removes that usage from the response.
    pub injected: bool,
    /// `max_tokens` (or its newer names).
    pub max_tokens: Option<u64>,
    /// Input tokens estimated from the body's text.
    pub input_estimate: u64,
    /// The body to send, at `[0..len]` (None when the request has no body).
    pub body: Option<PoolBuf>,
    /// Where the model name sits in the body, to rename it for another upstream.
    pub slot: Option<ModelSlot>,
    /// The request had a body.
    pub has_body: bool,
    /// Time spent scanning and editing the body (Ringway's own, not the client's upload).
    pub scan_time: Duration,
    /// When the scan ended (the body was whole before it began).
    pub scanned_at: Option<std::time::Instant>,
}

/// The body's model name: what the route's `model_map` made of it, what was written for the
/// upstream (after that upstream's `model_map`), and where it is in the body.
#[derive(Debug, Clone)]
pub struct ModelSlot {
    /// The name after the route's `model_map` (the client's when none matched).
    pub routed: String,
    /// The name in the body now.
    pub sent: String,
    /// The JSON string's content (between the quotes) in the body.
    pub at: std::ops::Range<usize>,
}

impl ModelSlot {
    /// Renames the model in `body` for upstream `up`: its `model_map` applied to the
    /// route's name. Fails when the body has no room left for a longer name.
    pub fn remodel(&mut self, body: &mut PoolBuf, map: &[(String, String)]) -> Result<(), Reject> {
        let new = map_model(map, &self.routed).unwrap_or(&self.routed);
        if new == self.sent {
            return Ok(());
        }
        let escaped = json_escape(new);
        if !replace(body, self.at.clone(), escaped.as_bytes()) {
            return Err(error::BODY_TOO_LARGE);
        }
        self.at = self.at.start..self.at.start + escaped.len();
        self.sent = new.to_string();
        Ok(())
    }
}

/// The first `glob → name` of `map` that matches `model`.
fn map_model<'m>(map: &'m [(String, String)], model: &str) -> Option<&'m str> {
    map.iter()
        .find(|(glob, _)| glob_match(glob, model))
        .map(|(_, new)| new.as_str())
}

/// Why no AI request could be prepared.
pub enum Fail {
    /// Answer this and close.
    Reject(Reject),
    /// The client went away.
    Gone,
}

/// Reads the whole body of `plan` (its start is in `cbuf` after the head),
/// scans and edits it. Returns the prepared request and the bytes that
/// followed the body (pipelined), behind the headroom, if any.
pub async fn capture(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    mut cbuf: PoolBuf,
    plan: &Plan,
    ai: &AiRoute,
    path_is_chat: bool,
) -> Result<(AiRequest, Option<PoolBuf>), Fail> {
    let idle = g.server.body_timeout;
    let body_start = plan.head_end;
    let (body, leftover_from) = match plan.body {
        BodyKind::None | BodyKind::CloseDelimited | BodyKind::Length(0) => (None, body_start),
        BodyKind::Length(n) => {
            let n = n as usize;
            let mut body = acquire(w, n + EDIT_ROOM, idle).await?;
            let in_buf = (cbuf.len() - body_start).min(n);
            let _ = body.put(&cbuf[body_start..body_start + in_buf]);
            if in_buf < n && plan.expect_continue {
                continue_100(client, idle).await?;
            }
            while body.len() < n {
                let (len, end) = (body.len(), n);
                match deadline::timeout(
                    idle,
                    client.read(monoio::buf::IoBufMut::slice_mut(body, len..end)),
                )
                .await
                {
                    Ok((Ok(got), s)) if got > 0 => body = s.into_inner(),
                    _ => return Err(Fail::Gone),
                }
            }
            (Some(body), body_start + in_buf)
        }
        BodyKind::Chunked => {
            if plan.expect_continue && cbuf.len() == body_start {
                continue_100(client, idle).await?;
            }
            let (body, rest, consumed_to) = read_chunked(w, g, client, cbuf, body_start).await?;
            cbuf = rest;
            (Some(body), consumed_to)
        }
    };
    let pipelined = keep_from(cbuf, leftover_from);

    let mut req = AiRequest {
        model: None,
        upstream: None,
        stream: false,
        injected: false,
        max_tokens: None,
        input_estimate: 0,
        has_body: body.is_some(),
        body,
        slot: None,
        scan_time: Duration::ZERO,
        scanned_at: None,
    };
    let Some(body) = req.body.as_mut() else {
        if !ai.models.is_empty() {
            return Err(Fail::Reject(MODEL_REQUIRED));
        }
        return Ok((req, pipelined));
    };

    let scan_start = std::time::Instant::now();
    let mut est = RequestEstimator::new();
    let found = est.feed_whole_with_model(body, &mut ModelScanner::new());
    let (model, model_range) = match found {
        ModelScan::Found { value, value_range } => (Some(value), Some(value_range)),
        ModelScan::NotFound | ModelScan::NeedMore => (None, None),
        ModelScan::Invalid => {
            if !ai.models.is_empty() || !ai.model_map.is_empty() || ai.upstream_model_map {
                return Err(Fail::Reject(INVALID_JSON));
            }
            (None, None)
        }
    };
    if !ai.models.is_empty() {
        let Some(m) = &model else {
            return Err(Fail::Reject(MODEL_REQUIRED));
        };
        req.upstream = ai
            .models
            .iter()
            .find(|(glob, _)| glob_match(glob, m))
            .map(|(_, u)| *u);
    }
    req.stream = est.stream() == Some(true);
    req.max_tokens = est.max_tokens();
    req.input_estimate = est.estimated_input_tokens();
    let injection = if ai.include_usage && path_is_chat {
        est.include_usage_injection()
    } else {
        None
    };

    // Edits, the later one in the body first so the other's offsets stay valid.
    // The route's `model_map`, then the upstream's, on the name the route's left.
    let up_map = &g.shared.upstreams[req.upstream.unwrap_or(plan.upstream)]
        .conf
        .model_map;
    let routed = model
        .as_deref()
        .map(|m| map_model(&ai.model_map, m).unwrap_or(m));
    let sent = routed.map(|r| map_model(up_map, r).unwrap_or(r));
    let rename = match (&model, sent, model_range.clone()) {
        (Some(m), Some(new), Some(range)) if new != m => {
            Some((range.start as usize..range.end as usize, json_escape(new)))
        }
        _ => None,
    };
    let usage_edit = injection.map(|i| (i.range.start as usize..i.range.end as usize, i.bytes));
    let usage_first = match (&usage_edit, &rename) {
        (Some((u, _)), Some((m, _))) => u.start > m.start,
        _ => true,
    };
    let mut apply_usage = |body: &mut PoolBuf| {
        if let Some((range, bytes)) = usage_edit.clone() {
            // Out of room (never with EDIT_ROOM): the request goes unedited and
            // its usage is estimated.
            req.injected = replace(body, range, bytes);
        }
    };
    if usage_first {
        apply_usage(body);
    }
    if let Some((range, new)) = &rename {
        if !replace(body, range.clone(), new.as_bytes()) {
            return Err(Fail::Reject(error::BODY_TOO_LARGE));
        }
    }
    if !usage_first {
        apply_usage(body);
    }
    if let (Some(routed), Some(sent), Some(range)) = (routed, sent, model_range) {
        let (start, end) = (range.start as usize, range.end as usize);
        let len = rename.as_ref().map_or(end - start, |(_, new)| new.len());
        // The usage edit moved the name when it came before it.
        let shift = match &usage_edit {
            Some((u, bytes)) if req.injected && u.end <= start => {
                bytes.len() as isize - u.len() as isize
            }
            _ => 0,
        };
        let at = (start as isize + shift) as usize;
        req.slot = Some(ModelSlot {
            routed: routed.to_string(),
            sent: sent.to_string(),
            at: at..at + len,
        });
    }
    req.model = model;
    let scanned_at = std::time::Instant::now();
    req.scan_time = scanned_at.saturating_duration_since(scan_start);
    req.scanned_at = Some(scanned_at);
    Ok((req, pipelined))
}

/// A model is needed to pick the upstream.
pub const MODEL_REQUIRED: Reject = Reject::closing(
    400,
    "model_required",
    "the request body has no top-level \"model\"",
);
/// The body is larger than the whole buffer pool of a worker, which is what
/// bounds the memory an inspected body may take.
pub const BODY_EXCEEDS_POOL: Reject = Reject::closing(
    413,
    "body_exceeds_buffer_pool",
    "request body is larger than the buffer pool (buffers_per_worker x buffer_size) an AI route may hold it in",
);
/// The body is not valid JSON.
pub const INVALID_JSON: Reject =
    Reject::closing(400, "invalid_json", "the request body is not valid JSON");

async fn acquire(w: &Worker, bytes: usize, wait: Duration) -> Result<PoolBuf, Fail> {
    match w.pool.acquire_within(bytes, wait).await {
        Ok(b) => Ok(b),
        Err(crate::buf::PoolError::TooLarge) => Err(Fail::Reject(BODY_EXCEEDS_POOL)),
        Err(crate::buf::PoolError::Exhausted) => {
            Err(Fail::Reject(error::NO_BUFFER.closing_if(true)))
        }
    }
}

async fn continue_100(client: &mut Stream, idle: Duration) -> Result<(), Fail> {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    match deadline::timeout(idle, client.write_all(CONTINUE)).await {
        Ok((Ok(_), _)) => Ok(()),
        _ => Err(Fail::Gone),
    }
}

/// Decodes a chunked body into one buffer, growing it (within the pool)
/// as needed. Returns the body and where the message ended in `cbuf`.
async fn read_chunked(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    mut cbuf: PoolBuf,
    start: usize,
) -> Result<(PoolBuf, PoolBuf, usize), Fail> {
    let idle = g.server.body_timeout;
    let mut decoder = ChunkedDecoder::new(g.max_body);
    let mut body = acquire(w, w.pool.slot_size(), idle).await?;
    let mut pos = start;
    loop {
        // Decode what is in `cbuf[pos..]`.
        let mut pieces: [std::ops::Range<usize>; 64] = std::array::from_fn(|_| 0..0);
        let mut n = 0;
        let mut overflow = false;
        let progress = decoder
            .decode(&cbuf[pos..], &mut |r| {
                if n < pieces.len() {
                    pieces[n] = r;
                    n += 1;
                } else {
                    overflow = true;
                }
            })
            .map_err(|e| {
                Fail::Reject(match e {
                    crate::h1::ChunkError::BodyTooLarge => error::BODY_TOO_LARGE,
                    _ => error::BAD_BODY,
                })
            })?;
        if overflow {
            // More than 64 chunks in one read: tiny chunks; refuse rather than loop.
            return Err(Fail::Reject(error::BAD_BODY));
        }
        let need: usize = pieces[..n].iter().map(|r| r.len()).sum();
        if body.spare() < need + EDIT_ROOM {
            let mut bigger = acquire(
                w,
                (body.capacity() * 2).max(body.len() + need + EDIT_ROOM),
                idle,
            )
            .await?;
            let _ = bigger.put(&body);
            body = bigger;
        }
        for r in &pieces[..n] {
            let _ = body.put(&cbuf[pos + r.start..pos + r.end]);
        }
        pos += progress.consumed;
        if progress.done {
            return Ok((body, cbuf, pos));
        }
        // Everything was consumed: read more into the client buffer.
        cbuf.truncate(start);
        pos = start;
        let cap = cbuf.capacity();
        match deadline::timeout(
            idle,
            client.read(monoio::buf::IoBufMut::slice_mut(cbuf, start..cap)),
        )
        .await
        {
            Ok((Ok(got), s)) if got > 0 => cbuf = s.into_inner(),
            _ => return Err(Fail::Gone),
        }
    }
}

/// Keeps `buf[from..]` behind a fresh headroom, or nothing when empty.
fn keep_from(mut buf: PoolBuf, from: usize) -> Option<PoolBuf> {
    use crate::proxy::request::HEADROOM;
    if buf.len() <= from {
        return None;
    }
    buf.consume(from - HEADROOM);
    buf[..HEADROOM].fill(0);
    Some(buf)
}

/// Replaces `range` with `with`, moving the tail; false when out of room.
fn replace(buf: &mut PoolBuf, range: std::ops::Range<usize>, with: &[u8]) -> bool {
    let len = buf.len();
    if range.end > len || range.start > range.end {
        return false;
    }
    let grow = with.len() as isize - range.len() as isize;
    if grow > 0 {
        if buf.spare() < grow as usize {
            return false;
        }
        let _ = buf.put(&vec_zeros(grow as usize));
        buf.copy_within(range.end..len, range.end + grow as usize);
    } else if grow < 0 {
        buf.copy_within(range.end..len, (range.end as isize + grow) as usize);
        buf.truncate((len as isize + grow) as usize);
    }
    buf[range.start..range.start + with.len()].copy_from_slice(with);
    true
}

fn vec_zeros(n: usize) -> Vec<u8> {
    vec![0; n]
}

/// A JSON string's content (no quotes), escaped.
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::ModelSlot;
    use crate::buf::BufPool;

    /// A fallback upstream's `model_map` renames the model where it sits, from the name the
    /// route's map left; an upstream without a match gets that name back.
    #[test]
    fn a_fallback_renames_the_model_from_the_routes_name() {
        let pool = BufPool::new(1024, 1);
        let Some(mut body) = pool.try_acquire() else {
            panic!("no buffer");
        };
        let text = br#"{"model":"gpt-4o-2024-08-06","messages":[]}"#;
        assert!(body.put(text).is_ok());
        let mut slot = ModelSlot {
            routed: "gpt-4o".into(),
            sent: "gpt-4o-2024-08-06".into(),
            at: 10..27,
        };
        let backup = [(
            "gpt-4o*".to_string(),
            "meta-llama/Llama-3.3-70B".to_string(),
        )];
        assert!(slot.remodel(&mut body, &backup).is_ok());
        assert_eq!(
            &body[..],
            br#"{"model":"meta-llama/Llama-3.3-70B","messages":[]}"#
        );
        assert_eq!(slot.sent, "meta-llama/Llama-3.3-70B");
        // An upstream with no map gets the route's name; a quote is escaped.
        assert!(slot.remodel(&mut body, &[]).is_ok());
        assert_eq!(&body[..], br#"{"model":"gpt-4o","messages":[]}"#);
        let quoted = [("*".to_string(), "a\"b".to_string())];
        assert!(slot.remodel(&mut body, &quoted).is_ok());
        assert_eq!(&body[..], br#"{"model":"a\"b","messages":[]}"#);
        assert_eq!(slot.at, 10..14);
    }
}
