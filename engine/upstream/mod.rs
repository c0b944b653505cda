//! Upstreams: resolved endpoints and their health (shared by every worker,
//! updated by the control core and by workers' passive checks), and each
//! worker's connection pool.

pub mod balance;
pub mod health;
pub mod keys;
pub mod pool;
pub mod resolve;

use std::{net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;

use crate::config;

pub use health::EndpointHealth;
pub use pool::{CheckoutError, UpConn, UpstreamPool};

/// The part of an upstream every worker shares: its settings, the current
/// endpoint addresses (re-resolved by the control core and swapped whole),
/// the hash ring, and each endpoint's health.
pub struct UpstreamShared {
    /// The upstream's settings.
    pub conf: config::Upstream,
    /// Address of each configured endpoint, by index; `None` until it resolves.
    pub addrs: ArcSwap<Vec<Option<SocketAddr>>>,
    /// Health of each configured endpoint, by index.
    pub health: Box<[EndpointHealth]>,
    /// Consistent-hash ring over endpoint indices (for `balance = "hash"`).
    pub ring: balance::Ring,
    /// A Host value for requests that arrive without one (HTTP/1.0).
    pub default_host: String,
    /// Where `balance = "hash"` takes its key from.
    pub hash_source: Option<HashSource>,
    /// The TLS client settings (`tls`); each worker's pool takes its own
    /// copy, with its own session cache.
    pub tls: Option<crate::tls::ClientTls>,
}

/// The request part that `balance = "hash"` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    /// A header's value (name lowercased).
    Header(String),
    /// The client address.
    Ip,
    /// A cookie's value.
    Cookie(String),
    /// The authenticated consumer's name.
    Consumer,
}

impl HashSource {
    /// Parses `header:NAME`, `ip`, `cookie:NAME` or `consumer`.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(h) = s.strip_prefix("header:") {
            return Some(HashSource::Header(h.to_ascii_lowercase()));
        }
        if let Some(c) = s.strip_prefix("cookie:") {
            return Some(HashSource::Cookie(c.to_string()));
        }
        match s {
            "ip" => Some(HashSource::Ip),
            "consumer" => Some(HashSource::Consumer),
            _ => None,
        }
    }
}

/// The value of cookie `name` in a Cookie header value.
pub fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii_start();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

impl UpstreamShared {
    /// Builds the shared state with whatever resolves now; fails only when
    /// the TLS settings cannot make a client configuration.
    pub fn new(conf: config::Upstream) -> Result<Arc<Self>, String> {
        let tls = match &conf.tls {
            Some(t) => Some(
                crate::tls::ClientTls::new(t)
                    .map_err(|e| format!("upstreams.{}.tls: {e}", conf.name))?,
            ),
            None => None,
        };
        let addrs = resolve::resolve_each(&conf);
        let default_host = conf
            .endpoints
            .first()
            .map(|e| e.address.clone())
            .unwrap_or_default();
        let ring = balance::Ring::new(
            conf.endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| (i, e.weight, e.address.clone())),
        );
        let health = conf
            .endpoints
            .iter()
            .map(|_| EndpointHealth::default())
            .collect();
        let hash_source = match conf.balance {
            config::Balance::Hash => conf.hash_key.as_deref().and_then(HashSource::parse),
            _ => None,
        };
        Ok(Arc::new(Self {
            hash_source,
            conf,
            addrs: ArcSwap::from_pointee(addrs),
            health,
            ring,
            default_host,
            tls,
        }))
    }

    /// Failures in a row that eject an endpoint.
    pub fn unhealthy_after(&self) -> u32 {
        self.conf
            .health
            .as_ref()
            .map_or(3, |h| h.unhealthy_after.max(1))
    }
}
