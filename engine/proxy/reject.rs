//! Answers Ringway gives itself, and closing after them without losing them.

use crate::transport::Stream;
use std::time::Duration;

use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent, AsyncWriteRent},
};

use super::{conn::Next, error::Reject};
use crate::runtime::clock;
use crate::{
    buf::PoolBuf,
    runtime::{deadline, Generation, Worker},
};

/// Writes a rejection and decides the connection's fate; `keep` holds the
/// pipelined bytes that follow the rejected request, if it stays open.
///
/// A plain `fn` handing on [`reject_with`]'s future: an `async fn` around it would hold
/// every argument once more in the states that await it.
pub(super) fn reject<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    rej: Reject,
    head_only: bool,
    keep: Option<PoolBuf>,
) -> impl std::future::Future<Output = Next> + 'a {
    reject_with(w, g, client, rej, head_only, keep, "")
}

/// [`reject`] with added header lines.
pub(super) async fn reject_with(
    w: &Worker,
    g: &Generation,
    client: &mut Stream,
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
pub(super) async fn linger(w: &Worker, client: &mut Stream) {
    let _ = client.shutdown().await;
    let Some(buf) = w.pool.try_acquire() else {
        return;
    };
    let deadline = clock::now() + Duration::from_secs(1);
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
