//! Trying again elsewhere: endpoints already tried, and resending a kept
//! head on a new connection.

use std::rc::Rc;

use super::{
    error::{self, Reject},
    request::Plan,
    respond::write_head,
};
use crate::{
    buf::PoolBuf,
    runtime::Generation,
    upstream::{pool::Pick, CheckoutError, UpConn, UpstreamPool},
};

/// Endpoints a request has already failed on (bounded: retries are few).
#[derive(Default)]
pub(super) struct Tried {
    idx: [usize; 16],
    len: usize,
}

impl Tried {
    pub(super) fn as_slice(&self) -> &[usize] {
        &self.idx[..self.len]
    }
    pub(super) fn len(&self) -> usize {
        self.len
    }
    /// Adds `i`; false when full.
    pub(super) fn push(&mut self, i: usize) -> bool {
        if self.len == self.idx.len() {
            return false;
        }
        self.idx[self.len] = i;
        self.len += 1;
        true
    }
}

/// Why a head could not be sent again.
pub(super) enum Resend {
    /// Connecting to endpoint `.0` failed; the head comes back for the next try.
    Connect(usize, Reject, PoolBuf),
    /// Give up with this answer.
    Reject(Reject),
}

/// Sends the kept head again on a new connection: to any endpoint after a
/// stale pooled connection, else to one not tried yet.
pub(super) async fn resend(
    g: &Generation,
    conn: &mut UpConn,
    cbuf: PoolBuf,
    plan: &Plan,
    tried: &[usize],
    stale: bool,
) -> Result<PoolBuf, Resend> {
    let pool = g.upstream(plan.upstream);
    let pick = Pick {
        exclude: if stale { &[] } else { tried },
        hash_key: plan.hash_key,
    };
    let fresh = match pool.checkout(&pick, true).await {
        Ok(c) => c,
        Err(CheckoutError::ConnectTimeout(idx)) => {
            return Err(Resend::Connect(idx, error::CONNECT_TIMEOUT, cbuf))
        }
        Err(CheckoutError::Connect(idx, _)) => {
            return Err(Resend::Connect(idx, error::CONNECT_FAILED, cbuf))
        }
        Err(CheckoutError::Tls(idx)) => {
            return Err(Resend::Connect(idx, error::UPSTREAM_TLS_ERROR, cbuf))
        }
        Err(CheckoutError::NoSlot) => return Err(Resend::Reject(error::NO_SLOT)),
        Err(CheckoutError::AllDown) => return Err(Resend::Reject(error::ALL_DOWN)),
        Err(CheckoutError::NoEndpoint) => return Err(Resend::Reject(error::NO_ENDPOINT)),
    };
    // The old guard drops here, closing the failed stream.
    let idx = fresh.idx;
    *conn = fresh;
    let idle = pool.shared.conf.response_timeout;
    match write_head(conn.stream(), cbuf, plan.head_start..plan.head_end, idle).await {
        Ok(b) => Ok(b),
        // The fresh connection broke before it took the head (an endpoint dying as it
        // accepted): that endpoint failed, as if it had refused the connection.
        Err(Some(b)) => Err(Resend::Connect(idx, error::BAD_GATEWAY, b)),
        Err(None) => Err(Resend::Reject(error::BAD_GATEWAY.closing_if(true))),
    }
}

/// A connection for `plan`'s upstream, moving on to another endpoint after
/// a connect failure, `retries` times; the answer to give when none works.
pub(super) async fn connect(
    pool: &Rc<UpstreamPool>,
    plan: &Plan,
    tried: &mut Tried,
) -> Result<UpConn, Reject> {
    let retries = pool.shared.conf.retries as usize;
    loop {
        let pick = Pick {
            exclude: tried.as_slice(),
            hash_key: plan.hash_key,
        };
        let err = match pool.checkout(&pick, false).await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        if let CheckoutError::Connect(idx, _)
        | CheckoutError::ConnectTimeout(idx)
        | CheckoutError::Tls(idx) = err
        {
            pool.report_failure(idx);
            if tried.len() < retries && tried.push(idx) {
                pool.stats.retries.add(1);
                continue;
            }
        }
        return Err(rejection(&err));
    }
}

/// The answer for a connection that could not be had.
pub(super) fn rejection(err: &CheckoutError) -> Reject {
    match err {
        CheckoutError::NoEndpoint => error::NO_ENDPOINT,
        CheckoutError::AllDown => error::ALL_DOWN,
        CheckoutError::NoSlot => error::NO_SLOT,
        CheckoutError::Connect(..) => error::CONNECT_FAILED,
        CheckoutError::ConnectTimeout(_) => error::CONNECT_TIMEOUT,
        CheckoutError::Tls(_) => error::UPSTREAM_TLS_ERROR,
    }
}
