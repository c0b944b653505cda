//! AI traffic: what a route does with LLM requests and responses.
//!
//! - Request side ([`request`]): the JSON body is scanned (never parsed into
//!   a tree) for the top-level `model` (routing, `model_map`), `max_tokens`,
//!   `stream` and an input estimate; `stream_options.include_usage` is added
//!   to streamed chat requests that lack it.
//! - Response side ([`relay`]): SSE frames and JSON bodies are watched as they
//!   are forwarded, usage is taken from them (or estimated), and the usage-only
//!   chunk Ringway asked for is removed from what the client receives.
//! - End of request ([`account`]): token reservations are reconciled with the
//!   real usage, and `ai-stats` metrics and the access log get the numbers.

pub mod account;
pub mod relay;
pub mod request;
pub mod series;

use crate::{
    config,
    filter::{Filter, Filters},
    runtime::Shared,
};

/// What a route does with AI traffic (compiled once per configuration).
#[derive(Debug, Default, Clone)]
pub struct AiRoute {
    /// `ai-stats` is on the route.
    pub stats: bool,
    /// Indices of `token-limit` filters on the route.
    pub token_limits: Vec<usize>,
    /// `models`: glob → upstream index, in file order.
    pub models: Vec<(String, usize)>,
    /// `model_map`: glob → new model name.
    pub model_map: Vec<(String, String)>,
    /// Add `stream_options.include_usage` to streamed chat requests.
    pub include_usage: bool,
    /// `sse_keepalive`: a comment written during upstream silence on an event stream.
    pub sse_keepalive: Option<std::time::Duration>,
    /// An upstream the route can reach has its own `model_map`.
    pub upstream_model_map: bool,
}

impl AiRoute {
    /// Whether requests on this route need their body inspected.
    pub fn active(&self) -> bool {
        self.stats
            || !self.token_limits.is_empty()
            || !self.models.is_empty()
            || !self.model_map.is_empty()
            // Keep-alive comments need the event stream framed by Ringway.
            || self.sse_keepalive.is_some()
            || self.upstream_model_map
    }

    /// Whether requests on this route are accounted (token limits or `ai-stats`): their
    /// replies' usage must be readable, so the upstream is asked not to compress them.
    pub fn accounts(&self) -> bool {
        self.stats || !self.token_limits.is_empty()
    }

    /// Compiles every route's AI settings.
    pub fn build_all(cfg: &config::Config, filters: &Filters) -> Vec<AiRoute> {
        cfg.routes
            .iter()
            .enumerate()
            .map(|(ri, r)| {
                let mut ai = AiRoute {
                    include_usage: r.include_usage,
                    sse_keepalive: r.sse_keepalive,
                    ..Default::default()
                };
                for &fi in &filters.by_route[ri] {
                    match &filters.list[fi] {
                        Filter::AiStats => ai.stats = true,
                        Filter::TokenLimit(_) => ai.token_limits.push(fi),
                        _ => {}
                    }
                }
                ai.models = r
                    .models
                    .iter()
                    .filter_map(|(glob, up)| {
                        cfg.upstreams
                            .iter()
                            .position(|u| &u.name == up)
                            .map(|i| (glob.clone(), i))
                    })
                    .collect();
                ai.model_map = r.model_map.clone();
                let has_map =
                    |name: &str| cfg.upstream(name).is_some_and(|u| !u.model_map.is_empty());
                ai.upstream_model_map = has_map(&r.upstream)
                    || r.models.iter().any(|(_, up)| has_map(up))
                    || r.fallbacks.iter().any(|up| has_map(up));
                ai
            })
            .collect()
    }
}

/// The compiled AI settings of route `idx`.
pub fn route(shared: &Shared, idx: usize) -> &AiRoute {
    &shared.ai_routes[idx]
}
