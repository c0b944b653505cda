//! Upstreams: resolved endpoints (shared, swapped by the control core) and
//! each worker's connection pool.

pub mod pool;
pub mod resolve;

use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;

use crate::config;

pub use pool::{CheckoutError, UpConn, UpstreamPool};

/// The part of an upstream every worker shares: its settings and the current
/// endpoint addresses, which the control core re-resolves and swaps whole.
pub struct UpstreamShared {
    /// The upstream's settings.
    pub conf: config::Upstream,
    /// Endpoint addresses, each repeated by its weight, in config order.
    pub addrs: ArcSwap<Vec<SocketAddr>>,
    /// A Host value for requests that arrive without one (HTTP/1.0).
    pub default_host: String,
}

impl UpstreamShared {
    /// Builds the shared state with whatever resolves now.
    pub fn new(conf: config::Upstream) -> Arc<Self> {
        let addrs = resolve::resolve_all(&conf).unwrap_or_default();
        let default_host = conf
            .endpoints
            .first()
            .map(|e| e.address.clone())
            .unwrap_or_default();
        Arc::new(Self {
            conf,
            addrs: ArcSwap::from_pointee(addrs),
            default_host,
        })
    }
}
