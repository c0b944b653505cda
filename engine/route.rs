//! Route matching: the first `[[routes]]` entry whose match holds wins.

use crate::config;

/// A route compiled for matching: lowercased host, method list, header pairs.
#[derive(Debug)]
pub struct Route {
    /// The route's name, for logs and metrics (shared: every AI request's context holds it
    /// without a copy).
    pub name: std::sync::Arc<str>,
    /// Index into the listener list, or `None` for every listener.
    pub listener: Option<usize>,
    /// Lowercased host without port.
    host: Option<String>,
    path: PathMatch,
    /// Uppercased methods; empty means any.
    methods: Vec<String>,
    /// Lowercased header names with the exact value required.
    headers: Vec<(String, Vec<u8>)>,
    /// Index into the upstream list.
    pub upstream: usize,
    /// Bytes of the path to remove before forwarding (the matched prefix).
    pub strip: usize,
    /// `request_headers`, compiled.
    pub request_headers: crate::proxy::rules::HeadRewrite,
    /// `response_headers`, compiled.
    pub response_headers: crate::proxy::rules::HeadRewrite,
    /// Upstream indices tried after the route's own, in order (`fallbacks`).
    pub fallbacks: Vec<usize>,
    /// What moves a request on to another attempt (`fallback_on`).
    pub fallback_on: crate::config::FallbackOn,
    /// Requests sent upstream in all (`max_attempts`).
    pub max_attempts: u32,
    /// Add `server-timing` to responses.
    pub server_timing: bool,
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
}

/// All routes, in file order.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// What a request offers for matching.
pub struct RequestView<'a> {
    /// Index of the listener the request arrived on.
    pub listener: usize,
    /// The Host header value (may include a port).
    pub host: Option<&'a [u8]>,
    /// The request method.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The request's headers.
    pub headers: &'a [httparse::Header<'a>],
}

impl RouteTable {
    /// Compiles the routes; names were checked by the config loader.
    pub fn build(cfg: &config::Config) -> Result<Self, String> {
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for r in &cfg.routes {
            let listener = match &r.listener {
                None => None,
                Some(name) => Some(
                    cfg.listeners
                        .iter()
                        .position(|l| &l.name == name)
                        .ok_or_else(|| format!("route {}: unknown listener {name}", r.name))?,
                ),
            };
            let upstream = cfg
                .upstreams
                .iter()
                .position(|u| u.name == r.upstream)
                .ok_or_else(|| format!("route {}: unknown upstream {}", r.name, r.upstream))?;
            let m = &r.matcher;
            let path = match (&m.path, &m.path_prefix) {
                (Some(p), _) => PathMatch::Exact(p.clone()),
                (None, Some(p)) if p != "/" => PathMatch::Prefix(p.clone()),
                _ => PathMatch::Any,
            };
            let strip = match (&path, r.strip_prefix) {
                (PathMatch::Prefix(p), true) => p.trim_end_matches('/').len(),
                _ => 0,
            };
            let fallbacks = r
                .fallbacks
                .iter()
                .map(|f| {
                    cfg.upstreams
                        .iter()
                        .position(|u| &u.name == f)
                        .ok_or_else(|| format!("route {}: unknown upstream {f}", r.name))
                })
                .collect::<Result<Vec<_>, _>>()?;
            routes.push(Route {
                fallbacks,
                fallback_on: r.fallback_on.clone(),
                max_attempts: r.max_attempts,
                server_timing: r.server_timing,
                name: r.name.as_str().into(),
                listener,
                host: m.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path,
                methods: m.methods.iter().map(|s| s.to_ascii_uppercase()).collect(),
                headers: m
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
                    .collect(),
                upstream,
                strip,
                request_headers: crate::proxy::rules::HeadRewrite::new(&r.request_headers),
                response_headers: crate::proxy::rules::HeadRewrite::new(&r.response_headers),
            });
        }
        Ok(Self { routes })
    }

    /// The index of the first route that matches.
    pub fn find(&self, req: &RequestView<'_>) -> Option<usize> {
        self.routes.iter().position(|r| r.matches(req))
    }

    /// The route at `idx`.
    pub fn get(&self, idx: usize) -> &Route {
        &self.routes[idx]
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl Route {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(l) = self.listener {
            if l != req.listener {
                return false;
            }
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => req.path.starts_with(p.as_str()),
            PathMatch::Exact(p) => req.path == p,
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return false;
        }
        if let Some(want) = &self.host {
            let Some(host) = req.host else { return false };
            if !host_eq(host, want.as_bytes()) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| {
            req.headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case(name) && h.value == value.as_slice())
        })
    }
}

/// Compares a Host header (which may carry a port) with a configured host.
fn host_eq(header: &[u8], want: &[u8]) -> bool {
    let bare = strip_port(header);
    bare.eq_ignore_ascii_case(want)
}

fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        // [v6]:port
        return match memchr::memchr(b']', host) {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match memchr::memrchr(b':', host) {
        Some(i) if host[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_is_ignored_when_matching() {
        assert!(host_eq(b"Example.com:8080", b"example.com"));
        assert!(host_eq(b"example.com", b"example.com"));
        assert!(!host_eq(b"example.org", b"example.com"));
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
    }
}
