//! Endpoint name resolution, run only off the workers (at start and by the
//! control core), because `getaddrinfo` blocks.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::{config, log};

/// Whether any endpoint needs DNS (an IP:port never does).
pub fn needs_dns(conf: &config::Upstream) -> bool {
    conf.endpoints
        .iter()
        .any(|e| e.address.parse::<SocketAddr>().is_err())
}

/// Resolves one endpoint address (IPv4 preferred: most backends listen there).
pub fn resolve_one(address: &str) -> Option<SocketAddr> {
    match address.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            let list: Vec<SocketAddr> = address.to_socket_addrs().ok()?.collect();
            list.iter().find(|a| a.is_ipv4()).or(list.first()).copied()
        }
    }
}

/// Resolves every endpoint, by index; failures are `None` and logged.
pub fn resolve_each(conf: &config::Upstream) -> Vec<Option<SocketAddr>> {
    conf.endpoints
        .iter()
        .map(|e| {
            let a = resolve_one(&e.address);
            if a.is_none() {
                log::warn(&format!(
                    "upstream {}: cannot resolve {}",
                    conf.name, e.address
                ));
            }
            a
        })
        .collect()
}
