//! Endpoint name resolution, run only off the workers (at start and by the
//! control core), because `getaddrinfo` blocks.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::config;

/// Whether any endpoint needs DNS (an IP:port never does).
pub fn needs_dns(conf: &config::Upstream) -> bool {
    conf.endpoints
        .iter()
        .any(|e| e.address.parse::<SocketAddr>().is_err())
}

/// Resolves every endpoint, repeating each address by its weight.
/// Endpoints that fail to resolve are left out; the error names them.
pub fn resolve_all(conf: &config::Upstream) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for e in &conf.endpoints {
        let addr = match e.address.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => match e.address.to_socket_addrs() {
                // Prefer IPv4, as most backends listen there first.
                Ok(list) => {
                    let list: Vec<SocketAddr> = list.collect();
                    list.iter().find(|a| a.is_ipv4()).or(list.first()).copied()
                }
                Err(_) => None,
            },
        };
        match addr {
            Some(a) => {
                for _ in 0..e.weight.max(1) {
                    out.push(a);
                }
            }
            None => failed.push(e.address.clone()),
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else if out.is_empty() {
        Err(format!(
            "upstream {}: cannot resolve {}",
            conf.name,
            failed.join(", ")
        ))
    } else {
        log::warn(&format!(
            "upstream {}: cannot resolve {}",
            conf.name,
            failed.join(", ")
        ));
        Ok(out)
    }
}

use crate::log;
