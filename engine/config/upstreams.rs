//! Checks for `[[upstreams]]`: endpoints, balancing, pool sizes and health checks.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::time::Duration;

use super::raw::{RawUpstream, S};
use super::types::*;
use super::validate::{is_token, usize_of, Ck};

/// Checks "host:port" / "[v6]:port"; the engine resolves host names later, on the control core.
pub(crate) fn check_host_port(s: &str) -> Result<(), String> {
    if s.contains("://") {
        return Err(format!("{s:?}: expected host:port without a scheme"));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?}: expected [ipv6]:port"))?;
        if h.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{s:?}: {h:?} is not an IPv6 address"));
        }
        (h, p)
    } else {
        let (h, p) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected host:port, the port is required"))?;
        let host_ok = !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !host_ok {
            return Err(format!("{s:?}: {h:?} is not a valid host"));
        }
        (h, p)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "{s:?}: port {port:?} of {host} must be a number from 1 to 65535"
        )),
    }
}

/// Normalises a `hash_key`, or says which forms are accepted.
fn hash_key(v: &str) -> Result<String, String> {
    let named = |prefix: &str, lower: bool| {
        v.strip_prefix(prefix).and_then(|n| {
            is_token(n).then(|| {
                let n = if lower {
                    n.to_ascii_lowercase()
                } else {
                    n.to_string()
                };
                format!("{prefix}{n}")
            })
        })
    };
    match v {
        "ip" | "consumer" => Ok(v.to_string()),
        _ => named("header:", true)
            .or_else(|| named("cookie:", false))
            .ok_or_else(|| {
                format!(
                    "expected \"header:NAME\", \"ip\", \"cookie:NAME\" or \"consumer\", got {v:?}"
                )
            }),
    }
}

pub(crate) fn upstreams(ck: &mut Ck, raw: &[RawUpstream]) -> Vec<Upstream> {
    let mut names = HashMap::new();
    let mut out = Vec::new();
    for (i, u) in raw.iter().enumerate() {
        let k = |f: &str| format!("upstreams[{i}].{f}");
        ck.unique(&mut names, "upstream", &k("name"), &u.name);

        if u.endpoints.get_ref().is_empty() {
            ck.err(
                k("endpoints"),
                u.endpoints.span(),
                "needs at least one endpoint",
            );
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for (j, e) in u.endpoints.get_ref().iter().enumerate() {
            let ek = format!("upstreams[{i}].endpoints[{j}]");
            let raw_e = e.get_ref();
            if let Err(m) = check_host_port(&raw_e.address) {
                ck.err(ek.as_str(), e.span(), m);
            } else if endpoints.iter().any(|x| x.address == raw_e.address) {
                ck.err(
                    ek.as_str(),
                    e.span(),
                    format!("duplicate endpoint {:?}", raw_e.address),
                );
            }
            let weight = raw_e.weight.unwrap_or(1);
            if weight == 0 {
                ck.err(format!("{ek}.weight"), e.span(), "must be at least 1");
            }
            endpoints.push(Endpoint {
                address: raw_e.address.clone(),
                weight,
            });
        }

        let balance = u
            .balance
            .as_ref()
            .map_or(Balance::RoundRobin, |b| *b.get_ref());
        let hash = u
            .hash_key
            .as_ref()
            .and_then(|h| match hash_key(h.get_ref()) {
                Ok(v) => Some(v),
                Err(m) => {
                    ck.err(k("hash_key"), h.span(), m);
                    None
                }
            });
        match (&u.balance, &u.hash_key) {
            (Some(b), None) if balance == Balance::Hash => ck.err(
                k("hash_key"),
                b.span(),
                "balance = \"hash\" needs hash_key = \"header:NAME\" | \"ip\" | \"cookie:NAME\" | \"consumer\"",
            ),
            (_, Some(h)) if balance != Balance::Hash => ck.err(
                k("hash_key"),
                h.span(),
                "hash_key is only used with balance = \"hash\"",
            ),
            _ => {}
        }

        let max_connections = u
            .max_connections
            .as_ref()
            .map(|_| ck.count(&k("max_connections"), &u.max_connections, 512, 1, u64::MAX));
        let max_idle = ck.count(&k("max_idle"), &u.max_idle, 64, 0, u64::MAX);
        if let Some(max_connections) = max_connections.filter(|&m| max_idle > m) {
            let (key, span) = match (&u.max_idle, &u.max_connections) {
                (Some(s), _) => (k("max_idle"), s.span()),
                (None, Some(s)) => (k("max_connections"), s.span()),
                (None, None) => (k("max_idle"), u.name.span()),
            };
            ck.err(
                key,
                span,
                format!(
                    "max_idle ({max_idle}) must not exceed max_connections ({max_connections})"
                ),
            );
        }

        let health = u.health.as_ref().map(|h| {
            let hk = |f: &str| format!("upstreams[{i}].health.{f}");
            if !h.path.get_ref().starts_with('/') {
                ck.err(hk("path"), h.path.span(), "must start with \"/\"");
            }
            let interval = h.interval.get_ref().0;
            if interval.is_zero() {
                ck.err(
                    hk("interval"),
                    h.interval.span(),
                    "must be greater than zero",
                );
            }
            let timeout = ck.dur(&hk("timeout"), &h.timeout, Duration::from_secs(1));
            if let Some(t) = &h.timeout {
                if !interval.is_zero() && timeout > interval {
                    ck.err(
                        hk("timeout"),
                        t.span(),
                        "must not exceed the health interval",
                    );
                }
            }
            let mut at_least_one = |f: &str, v: &Option<S<u32>>, d: u32| match v {
                Some(s) if *s.get_ref() == 0 => {
                    ck.err(hk(f), s.span(), "must be at least 1");
                    0
                }
                Some(s) => *s.get_ref(),
                None => d,
            };
            Health {
                path: h.path.get_ref().clone(),
                interval,
                timeout,
                healthy_after: at_least_one("healthy_after", &h.healthy_after, 2),
                unhealthy_after: at_least_one("unhealthy_after", &h.unhealthy_after, 3),
            }
        });

        let tls = u
            .tls
            .as_ref()
            .and_then(|t| super::tls::upstream_tls(ck, &k("tls"), t));
        let host_header = host_header(ck, &k("host_header"), &u.host_header, tls.is_some());
        // The head is written before an endpoint is picked, so "endpoint" can only name
        // one host: endpoints under different names need an explicit choice.
        if host_header == HostHeader::Endpoint {
            let mut hosts = endpoints.iter().map(|e| {
                (
                    crate::tls::client::endpoint_host(&e.address),
                    e.address.rsplit(':').next(),
                )
            });
            if let Some(first) = hosts.next() {
                if hosts.any(|h| h != first) {
                    let span = u
                        .host_header
                        .as_ref()
                        .map_or(u.endpoints.span(), |h| h.span());
                    ck.err(
                        k("host_header"),
                        span,
                        "\"endpoint\" (the default with tls) needs every endpoint under one \
                         host name and port; set host_header = \"client\" or a literal host",
                    );
                }
            }
        }
        let credentials = u
            .credentials
            .as_ref()
            .and_then(|c| super::credentials::credentials(ck, &k("credentials"), c));
        super::routes::check_model_map(ck, &k("model_map"), &u.model_map);

        out.push(Upstream {
            name: u.name.get_ref().clone(),
            endpoints,
            balance,
            hash_key: hash,
            max_connections: max_connections.map(usize_of),
            max_idle: usize_of(max_idle),
            idle_timeout: ck.dur(&k("idle_timeout"), &u.idle_timeout, Duration::from_secs(60)),
            connect_timeout: ck.dur(
                &k("connect_timeout"),
                &u.connect_timeout,
                Duration::from_secs(2),
            ),
            response_timeout: ck.dur(
                &k("response_timeout"),
                &u.response_timeout,
                Duration::from_secs(60),
            ),
            retries: u.retries.unwrap_or(1),
            health,
            resolve_interval: ck.dur(
                &k("resolve_interval"),
                &u.resolve_interval,
                Duration::from_secs(30),
            ),
            tls,
            host_header,
            credentials,
            model_map: super::routes::pairs(&u.model_map),
        });
    }
    out
}

/// `host_header`: "client", "endpoint" or a literal host; the default follows `tls`.
fn host_header(ck: &mut Ck, key: &str, v: &Option<S<String>>, tls: bool) -> HostHeader {
    let Some(v) = v else {
        // A TLS upstream is usually a provider on its own name (api.openai.com), which rejects
        // the gateway's host; a plain one is usually a backend that wants the client's.
        return if tls {
            HostHeader::Endpoint
        } else {
            HostHeader::Client
        };
    };
    match v.get_ref().as_str() {
        "client" => HostHeader::Client,
        "endpoint" => HostHeader::Endpoint,
        lit => {
            let ok = !lit.is_empty()
                && lit
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
            if !ok {
                ck.err(
                    key,
                    v.span(),
                    format!("expected \"client\", \"endpoint\" or a host name (with an optional :port), got {lit:?}"),
                );
            }
            HostHeader::Literal(lit.to_string())
        }
    }
}
