//! Checks for `[[routes]]`: match conditions and references to listeners, upstreams, filters.

use std::collections::{HashMap, HashSet};

use super::header_rules::{header_rules, Side};
use super::raw::{OrderedMap, RawFallbackOn, RawMatch, RawRoute, S};
use super::toml_key;
use super::types::*;
use super::validate::{is_token, Ck};

/// Resolves every route against the already resolved listeners, upstreams and filters.
pub(crate) fn routes(
    ck: &mut Ck,
    raw: &[RawRoute],
    listeners: &[Listener],
    upstreams: &[Upstream],
    filters: &[FilterConf],
) -> Vec<Route> {
    let mut names = HashMap::new();
    let upstream_names: HashSet<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
    let must_be_upstream = |ck: &mut Ck, key: String, v: &S<String>| {
        if !upstream_names.contains(v.get_ref().as_str()) {
            ck.err(
                key,
                v.span(),
                format!("no upstream named {:?} in [[upstreams]]", v.get_ref()),
            );
        }
    };
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let k = |f: &str| format!("routes[{i}].{f}");
        ck.unique(&mut names, "route", &k("name"), &r.name);

        if let Some(l) = &r.listener {
            if !listeners.iter().any(|x| &x.name == l.get_ref()) {
                ck.err(
                    k("listener"),
                    l.span(),
                    format!("no listener named {:?} in [[listeners]]", l.get_ref()),
                );
            }
        }
        must_be_upstream(ck, k("upstream"), &r.upstream);

        let mut seen = HashSet::new();
        for (j, f) in r.filters.iter().enumerate() {
            let name = f.get_ref();
            if !filters.iter().any(|x| &x.name == name) {
                ck.err(
                    format!("routes[{i}].filters[{j}]"),
                    f.span(),
                    format!("no filter named {name:?} in [[filters]]"),
                );
            } else if !seen.insert(name) {
                ck.err(
                    format!("routes[{i}].filters[{j}]"),
                    f.span(),
                    format!("filter {name:?} is listed twice"),
                );
            }
        }

        let matcher = route_match(ck, i, &r.matcher);
        if let Some(s) = &r.strip_prefix {
            if *s.get_ref() && matcher.path_prefix.is_none() {
                ck.err(
                    k("strip_prefix"),
                    s.span(),
                    "strip_prefix = true needs match.path_prefix",
                );
            }
        }

        for (glob, up) in &r.models.0 {
            must_be_upstream(ck, format!("routes[{i}].models.{}", toml_key(glob)), up);
        }
        check_globs(ck, &format!("routes[{i}].models"), &r.models);
        check_model_map(ck, &k("model_map"), &r.model_map);
        let request_headers =
            header_rules(ck, &k("request_headers"), Side::Request, &r.request_headers);
        let response_headers = header_rules(
            ck,
            &k("response_headers"),
            Side::Response,
            &r.response_headers,
        );

        for (j, f) in r.fallbacks.iter().enumerate() {
            must_be_upstream(ck, format!("routes[{i}].fallbacks[{j}]"), f);
        }
        let fallbacks = fallbacks(ck, i, r);
        let fallback_on = fallback_on(ck, i, &r.fallback_on);
        let max_attempts = match &r.max_attempts {
            None => DEFAULT_MAX_ATTEMPTS,
            Some(v) if (1..=i64::from(MAX_ATTEMPTS)).contains(v.get_ref()) => *v.get_ref() as u32,
            Some(v) => {
                ck.err(
                    k("max_attempts"),
                    v.span(),
                    format!("must be 1 to {MAX_ATTEMPTS}, got {}", v.get_ref()),
                );
                DEFAULT_MAX_ATTEMPTS
            }
        };

        // A rule that sets the header the upstream's key goes in would send two of it.
        let reachable = std::iter::once(r.upstream.get_ref())
            .chain(r.models.0.iter().map(|(_, u)| u.get_ref()))
            .chain(r.fallbacks.iter().map(|u| u.get_ref()));
        for up in reachable {
            let Some(c) = upstreams
                .iter()
                .find(|u| &u.name == up)
                .and_then(|u| u.credentials.as_ref())
            else {
                continue;
            };
            let name = c.kind.header_name();
            if let Some((n, v)) = r.request_headers.as_ref().and_then(|h| {
                h.get_ref()
                    .set
                    .0
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
            }) {
                ck.err(
                    format!("routes[{i}].request_headers.set.{}", toml_key(n)),
                    v.span(),
                    format!("upstream {up:?} sends its provider key in {name:?}; a rule cannot set it too"),
                );
                break;
            }
        }

        out.push(Route {
            name: r.name.get_ref().clone(),
            listener: r.listener.as_ref().map(|l| l.get_ref().clone()),
            matcher,
            upstream: r.upstream.get_ref().clone(),
            filters: r.filters.iter().map(|f| f.get_ref().clone()).collect(),
            strip_prefix: r.strip_prefix.as_ref().is_some_and(|s| *s.get_ref()),
            models: pairs(&r.models),
            model_map: pairs(&r.model_map),
            include_usage: r.include_usage.unwrap_or(true),
            sse_keepalive: r.sse_keepalive.as_ref().map(|d| {
                let key = format!("routes[{i}].sse_keepalive");
                ck.dur(&key, &r.sse_keepalive, d.get_ref().0)
            }),
            server_timing: r.server_timing.unwrap_or(false),
            request_headers,
            response_headers,
            fallbacks,
            fallback_on,
            max_attempts,
        });
    }
    out
}

/// `max_attempts` when the route sets none.
pub(crate) const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The most attempts a route may allow: each costs a provider request.
pub(crate) const MAX_ATTEMPTS: u32 = 10;

/// `fallbacks`: known upstreams, none twice, not the route's own.
fn fallbacks(ck: &mut Ck, i: usize, r: &RawRoute) -> Vec<String> {
    let mut seen: HashSet<&str> = HashSet::from([r.upstream.get_ref().as_str()]);
    let mut out = Vec::new();
    for (j, f) in r.fallbacks.iter().enumerate() {
        let name = f.get_ref().as_str();
        if !seen.insert(name) {
            ck.err(
                format!("routes[{i}].fallbacks[{j}]"),
                f.span(),
                format!("upstream {name:?} is already the route's upstream or an earlier fallback"),
            );
            continue;
        }
        out.push(name.to_string());
    }
    out
}

/// `fallback_on`: status codes 400-599 and the words "connect" and "timeout".
fn fallback_on(ck: &mut Ck, i: usize, v: &Option<S<Vec<S<RawFallbackOn>>>>) -> FallbackOn {
    let Some(list) = v else {
        return FallbackOn::default();
    };
    let mut out = FallbackOn {
        statuses: Vec::new(),
        connect: false,
        timeout: false,
    };
    for (j, item) in list.get_ref().iter().enumerate() {
        let key = format!("routes[{i}].fallback_on[{j}]");
        match item.get_ref() {
            RawFallbackOn::Status(s) if (400..=599).contains(s) => out.statuses.push(*s as u16),
            RawFallbackOn::Status(s) => ck.err(
                key,
                item.span(),
                format!("{s} is not an error status (400 to 599)"),
            ),
            RawFallbackOn::Word(w) if w == "connect" => out.connect = true,
            RawFallbackOn::Word(w) if w == "timeout" => out.timeout = true,
            RawFallbackOn::Word(w) => ck.err(
                key,
                item.span(),
                format!("{w:?} is not a status code, \"connect\" or \"timeout\""),
            ),
        }
    }
    out
}

/// A `model_map` (a route's or an upstream's): non-empty globs to non-empty names.
pub(crate) fn check_model_map(ck: &mut Ck, key: &str, m: &OrderedMap<S<String>>) {
    check_globs(ck, key, m);
    for (glob, model) in &m.0 {
        if model.get_ref().is_empty() {
            ck.err(
                format!("{key}.{}", toml_key(glob)),
                model.span(),
                "the new model name must not be empty",
            );
        }
    }
}

pub(crate) fn pairs(m: &OrderedMap<S<String>>) -> Vec<(String, String)> {
    m.0.iter()
        .map(|(k, v)| (k.clone(), v.get_ref().clone()))
        .collect()
}

fn check_globs(ck: &mut Ck, key: &str, m: &OrderedMap<S<String>>) {
    for (glob, v) in &m.0 {
        if glob.is_empty() {
            ck.err(
                format!("{key}.\"\""),
                v.span(),
                "a model glob must not be empty; use \"*\" for any model",
            );
        }
    }
}

fn route_match(ck: &mut Ck, i: usize, m: &RawMatch) -> RouteMatch {
    let k = |f: &str| format!("routes[{i}].match.{f}");
    let host = m.host.as_ref().map(|h| {
        let v = h.get_ref().to_ascii_lowercase();
        // Requests are matched on the Host header without its port.
        let v = match v.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
            _ => v,
        };
        if v.is_empty() {
            ck.err(k("host"), h.span(), "must not be empty");
        }
        v
    });
    let mut slash = |f: &str, v: &Option<S<String>>| {
        v.as_ref().map(|p| {
            if !p.get_ref().starts_with('/') {
                ck.err(
                    k(f),
                    p.span(),
                    format!("must start with \"/\", got {:?}", p.get_ref()),
                );
            }
            p.get_ref().clone()
        })
    };
    let path_prefix = slash("path_prefix", &m.path_prefix);
    let path = slash("path", &m.path);
    if let (Some(_), Some(p)) = (&m.path_prefix, &m.path) {
        ck.err(
            k("path"),
            p.span(),
            "set either path or path_prefix, not both",
        );
    }
    let methods = m
        .methods
        .iter()
        .enumerate()
        .map(|(j, v)| {
            if !is_token(v.get_ref()) {
                ck.err(
                    format!("routes[{i}].match.methods[{j}]"),
                    v.span(),
                    format!("{:?} is not an HTTP method", v.get_ref()),
                );
            }
            v.get_ref().to_ascii_uppercase()
        })
        .collect();
    let headers = m
        .headers
        .0
        .iter()
        .map(|(name, v)| {
            if !is_token(name) {
                ck.err(
                    format!("routes[{i}].match.headers.{}", toml_key(name)),
                    v.span(),
                    format!("{name:?} is not a valid header name"),
                );
            }
            (name.to_ascii_lowercase(), v.get_ref().clone())
        })
        .collect();
    RouteMatch {
        host,
        path_prefix,
        path,
        methods,
        headers,
    }
}
