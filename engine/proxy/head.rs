//! Reading a request head until it is whole and planned.

use crate::transport::Stream;
use std::{net::SocketAddr, time::Instant};

use monoio::{buf::IoBufMut as _, io::AsyncReadRent};

use super::{
    error::{self, Reject},
    request::{plan_request, Plan, RequestId, HEADROOM},
    send::keep_from,
};
use crate::runtime::clock;
use crate::{
    buf::PoolBuf,
    h1::{self, HeadError, Parsed},
    runtime::{deadline, Generation, Worker},
};

/// Why no request head could be planned.
pub(super) enum HeadFail {
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
pub(super) async fn read_request_head(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
    peer: SocketAddr,
    listener: usize,
    mut buf: PoolBuf,
) -> Result<(Plan, PoolBuf), HeadFail> {
    let deadline = clock::now() + g.server.header_timeout;
    loop {
        if buf.len() > HEADROOM {
            match plan_request(w, g, &mut buf, listener, peer.ip(), client.tls()) {
                Ok(Parsed::Complete(plan)) => return Ok((plan, buf)),
                Ok(Parsed::Partial) => {}
                Err(rejected) => {
                    // HTTP/1.2 and up are served as HTTP/1.1 (RFC 9112 §2.3):
                    // httparse knows only 1.0 and 1.1, so the digit is
                    // rewritten and the head parsed again.
                    if rejected.reject.message == HeadError::Malformed.message() {
                        if let Some(at) = h1::newer_minor_version(&buf[HEADROOM..]) {
                            buf[HEADROOM + at] = b'1';
                            continue;
                        }
                    }
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
pub(super) async fn grow(
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
    let left = deadline.saturating_duration_since(clock::now());
    let mut big = w
        .pool
        .acquire_within(want, left)
        .await
        .map_err(|_| error::NO_BUFFER.closing_if(true))?;
    let _ = big.put(&buf);
    Ok(big)
}
