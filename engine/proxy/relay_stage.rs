//! A plain route's response, once its head is read: relayed to the client, then the
//! upstream connection kept or closed. A body still to come is relayed in a stage of
//! its own, so that an open stream holds only what relaying needs, not the state of
//! the request's head, connect and send (768 bytes of every open stream's state).

use crate::transport::Stream;
use std::time::Duration;

use super::{
    conn::Next,
    record::Record,
    reject::linger,
    respond::{relay_response, Relayed},
    response::RespPlan,
    transfer::XferError,
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
// Not boxed: the relay moves once, into its stage's allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Forwarded {
    /// The request is answered; what happens to the connection.
    Done(Next),
    /// The response head is read and its body is still to come.
    Relay(Relay),
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

/// What happens to the client connection after a response.
pub(super) enum Then {
    /// It serves its next request.
    KeepAlive,
    /// It closes.
    Close,
    /// It drains what the client still sends for a moment, then closes: the upstream
    /// answered before the whole request body was sent, and a close at once could meet
    /// a reset that discards the answer (RFC 9112 §9.6).
    Linger,
}

/// What follows a relayed response: the bytes counted, the upstream connection back to
/// its pool when it can serve again, and what the client connection does.
/// (Not a `Next`: the caller keeps the pipelined bytes and builds its answer where it returns.)
pub(super) fn after(
    record: &mut Record<'_>,
    conn: UpConn,
    rp: &RespPlan,
    early: bool,
    relayed: Result<Relayed, XferError>,
) -> Then {
    let Ok(r) = relayed else {
        return Then::Close;
    };
    record.bytes_out = r.bytes;
    // An upstream that answered early may still be reading the body: never reused.
    release_upstream(conn, rp, r.upstream_clean && !early);
    if early {
        Then::Linger
    } else if rp.client_close {
        Then::Close
    } else {
        Then::KeepAlive
    }
}

/// Lets a relayed response's upstream connection go: back to its pool when the upstream
/// keeps it alive and `clean` (it sent exactly that response), closed otherwise.
pub(super) fn release_upstream(mut conn: UpConn, rp: &RespPlan, clean: bool) {
    if rp.upstream_keep_alive && clean {
        conn.set_reusable();
    }
}

/// The stage that relays a response body still to come; what happens to the client
/// connection then.
///
/// A plain `fn` around an `async move` block, so the relay and the record are held once
/// (an `async fn` keeps its arguments twice); the relay's fields are used in place.
#[allow(clippy::manual_async_fn)]
pub(super) fn respond<'a>(
    w: &'a Worker,
    g: &'a Generation,
    client: &'a mut Stream,
    mut record: Record<'a>,
    mut relay: Relay,
) -> impl std::future::Future<Output = Next> + 'a {
    async move {
        let relayed = relay_response(
            w,
            g,
            client,
            &mut relay.conn,
            relay.ubuf,
            &relay.rp,
            relay.up_idle,
        )
        .await;
        match after(&mut record, relay.conn, &relay.rp, relay.early, relayed) {
            Then::KeepAlive => Next::KeepAlive(relay.cbuf),
            Then::Close => Next::Close,
            Then::Linger => {
                linger(w, client).await;
                Next::Close
            }
        }
    }
}
