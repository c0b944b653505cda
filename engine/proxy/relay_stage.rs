//! A plain route's response, once its head is read: relayed to the client, then the
//! upstream connection kept or closed. A body still to come is relayed in a stage of
//! its own, so that an open stream holds only what relaying needs, not the state of
//! the request's head, connect and send (768 bytes of every open stream's state).

use crate::transport::Stream;
use std::{borrow::BorrowMut, time::Duration};

use super::{
    conn::Next, record::Record, reject::linger, respond::relay_response, response::RespPlan,
};
use crate::{
    buf::PoolBuf,
    h1::BodyKind,
    runtime::{Generation, Worker},
    upstream::UpConn,
};

/// What relaying a response owns: its upstream connection, the buffer holding its
/// head (and the body bytes read with it), and what the client connection keeps.
pub(super) struct Relay {
    pub(super) conn: UpConn,
    pub(super) ubuf: PoolBuf,
    pub(super) rp: RespPlan,
    /// Pipelined client bytes, for the connection's next request.
    pub(super) cbuf: Option<PoolBuf>,
    pub(super) up_idle: Duration,
    /// The upstream answered before the whole request body was sent.
    pub(super) early: bool,
}

/// How forwarding a request ended: answered, or with a response body to relay.
pub(super) enum Forwarded {
    /// The request is answered; what happens to the connection.
    Done(Next),
    /// The response head is read and its body is still to come.
    Relay(Relay),
    /// The response head is read, its whole body with it.
    InHand(Relay),
}

impl From<Next> for Forwarded {
    fn from(next: Next) -> Self {
        Forwarded::Done(next)
    }
}

/// Whether the response's whole body came with its head (nothing more to wait for).
pub(super) fn body_in_hand(rp: &RespPlan, ubuf: &PoolBuf) -> bool {
    match rp.body {
        BodyKind::None => true,
        BodyKind::Length(n) => n <= (ubuf.len() - rp.head_end) as u64,
        BodyKind::Chunked | BodyKind::CloseDelimited => false,
    }
}

/// Relays the response, then lets the upstream connection go back to its pool (or
/// close); returns what happens to the client connection. `record` is the request's
/// own (a stage of its own) or borrowed from the caller's state.
///
/// A plain `fn` around an `async move` block, so the relay is held once (an `async fn`
/// keeps its arguments twice); its fields are used in place, never bound again.
#[allow(clippy::manual_async_fn)]
pub(super) fn respond<'a, 'r, R: BorrowMut<Record<'r>> + 'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    mut record: R,
    mut relay: Relay,
) -> impl std::future::Future<Output = Next> + use<'a, 'r, R> {
    async move {
        let relayed = relay_response(
            w,
            g,
            client,
            &mut relay.conn,
            relay.ubuf,
            &relay.rp,
            relay.up_idle,
        );
        match relayed.await {
            Ok(r) => {
                record.borrow_mut().bytes_out = r.bytes;
                if relay.rp.upstream_keep_alive && r.upstream_clean && !relay.early {
                    relay.conn.set_reusable();
                }
            }
            Err(_) => return Next::Close,
        }
        drop(relay.conn);
        if relay.early {
            // The unread rest of the body is drained for a moment first, so the
            // client does not meet a reset that discards the answer (RFC 9112 §9.6).
            linger(w, client).await;
            return Next::Close;
        }
        if relay.rp.client_close {
            return Next::Close;
        }
        Next::KeepAlive(relay.cbuf)
    }
}
