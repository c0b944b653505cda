//! Request filters as the engine runs them: key auth and request limits.
//!
//! The decisions themselves live in the sans-IO `ringway-filters` crate; this
//! module compiles a configuration's filters once (off the workers), keeps
//! process-wide limiter state alive across reloads, and applies filters to a
//! request: key auth and limit keys synchronously while the head is parsed,
//! limit checks (which may wait for a Redis lease) before the upstream is
//! contacted.

pub mod cluster;
pub mod ledger;
pub mod limit;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ringway_filters::auth::KeyAuth;

use crate::config::{self, FilterKind};

pub use limit::{LimitCheck, LimitChecks, RateLimit};

/// One compiled filter.
pub enum Filter {
    /// `key-auth`: the consumer must present a known key.
    KeyAuth {
        /// Also read keys from this query parameter.
        query_param: Option<String>,
    },
    /// `rate-limit`: requests per window by key.
    RateLimit(Arc<RateLimit>),
    /// `token-limit` (tokens) or `cost-limit` (micro-dollars) per window by key, reserved
    /// before the request goes upstream and reconciled with the real usage.
    TokenLimit(Arc<RateLimit>),
    /// `ai-stats`: token and latency metrics.
    AiStats,
}

/// A configuration's filters, compiled.
pub struct Filters {
    /// By filter index in the file.
    pub list: Vec<Filter>,
    /// By route index: the route's filters, in order.
    pub by_route: Vec<Vec<usize>>,
    /// Every consumer's keys.
    pub auth: Arc<KeyAuth>,
}

/// Limiter state kept across reloads: the same filter name with the same
/// settings keeps its counters.
static KEPT: Mutex<Option<Kept>> = Mutex::new(None);

/// Rate-limit filters by name, with the settings they were built from.
type Kept = HashMap<String, (config::LimitConf, Arc<RateLimit>)>;

impl Filters {
    /// Compiles the filters of `cfg`.
    pub fn build(cfg: &config::Config) -> Result<Self, String> {
        let auth = Arc::new(KeyAuth::new(
            cfg.consumers
                .iter()
                .map(|c| (c.name.clone(), c.keys.clone())),
        ));
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        let kept = kept.get_or_insert_with(HashMap::new);
        let mut list = Vec::with_capacity(cfg.filters.len());
        for (i, f) in cfg.filters.iter().enumerate() {
            list.push(match &f.kind {
                FilterKind::KeyAuth(k) => Filter::KeyAuth {
                    query_param: k.query_param.clone(),
                },
                FilterKind::RateLimit(l) | FilterKind::TokenLimit(l) | FilterKind::CostLimit(l) => {
                    let kind = match f.kind {
                        FilterKind::TokenLimit(_) => limit::Kind::Tokens,
                        FilterKind::CostLimit(_) => limit::Kind::Cost,
                        _ => limit::Kind::Requests,
                    };
                    let rl = match kept.get(&f.name) {
                        Some((conf, rl))
                            if conf == l
                                && rl.tokens == (kind != limit::Kind::Requests)
                                && rl.cost == (kind == limit::Kind::Cost) =>
                        {
                            rl.clone()
                        }
                        _ => {
                            let rl = Arc::new(RateLimit::new(
                                &f.name,
                                i as u32,
                                l,
                                cfg.redis.is_some(),
                                kind,
                            )?);
                            kept.insert(f.name.clone(), (l.clone(), rl.clone()));
                            rl
                        }
                    };
                    // A cost-limit is reserved and settled as a token-limit is, in its own unit.
                    if rl.tokens {
                        Filter::TokenLimit(rl)
                    } else {
                        Filter::RateLimit(rl)
                    }
                }
                FilterKind::AiStats(_) => Filter::AiStats,
            });
        }
        kept.retain(|name, _| cfg.filters.iter().any(|f| &f.name == name));
        let by_route = cfg
            .routes
            .iter()
            .map(|r| {
                r.filters
                    .iter()
                    .filter_map(|name| cfg.filters.iter().position(|f| &f.name == name))
                    .collect()
            })
            .collect();
        Ok(Self {
            list,
            by_route,
            auth,
        })
    }
}

/// Most keys per cost-limit in the spend gauge (a series per key).
const GAUGE_KEYS: usize = 1000;

/// Limiter and Redis metrics, in Prometheus text, for the configuration in force.
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write;
    let Some(shared) = crate::runtime::current() else {
        return;
    };
    let limits: Vec<&Arc<RateLimit>> = shared
        .filters
        .list
        .iter()
        .filter_map(|f| match f {
            Filter::RateLimit(rl) | Filter::TokenLimit(rl) => Some(rl),
            Filter::KeyAuth { .. } | Filter::AiStats => None,
        })
        .collect();
    let _ = writeln!(
        out,
        "# HELP ringway_limiter_decisions_total Limit decisions, by filter and outcome."
    );
    let _ = writeln!(out, "# TYPE ringway_limiter_decisions_total counter");
    for rl in &limits {
        for (outcome, v) in [
            ("allowed", rl.allowed.get()),
            ("rejected", rl.rejected.get()),
            ("shadow_rejected", rl.shadow_rejected.get()),
        ] {
            let _ = writeln!(
                out,
                "ringway_limiter_decisions_total{{filter=\"{}\",decision=\"{outcome}\"}} {v}",
                rl.name
            );
        }
    }
    let _ = writeln!(out, "# HELP ringway_limiter_failure_mode_total Decisions made by failure_mode while Redis was unreachable.");
    let _ = writeln!(out, "# TYPE ringway_limiter_failure_mode_total counter");
    for rl in &limits {
        let _ = writeln!(
            out,
            "ringway_limiter_failure_mode_total{{filter=\"{}\"}} {}",
            rl.name,
            rl.failure_decisions.get()
        );
    }
    let _ = writeln!(
        out,
        "# HELP ringway_limiter_evictions_total Limiter keys evicted to stay within max_keys."
    );
    let _ = writeln!(out, "# TYPE ringway_limiter_evictions_total counter");
    for rl in &limits {
        let _ = writeln!(
            out,
            "ringway_limiter_evictions_total{{filter=\"{}\"}} {}",
            rl.name,
            rl.evictions()
        );
    }
    // This process's view: /usage answers for the whole cluster.
    let _ = writeln!(
        out,
        "# HELP ringway_budget_spend_usd Spend in the current window of each cost-limit key, settled by this process (at most {GAUGE_KEYS} keys per filter; GET /usage has them all)."
    );
    let _ = writeln!(out, "# TYPE ringway_budget_spend_usd gauge");
    let now = crate::upstream::health::now_ms();
    for rl in limits.iter().filter(|rl| rl.cost) {
        for r in rl.ledger.rows(None, now).iter().take(GAUGE_KEYS) {
            let _ = writeln!(
                out,
                "ringway_budget_spend_usd{{filter=\"{}\",key=\"{}\",window=\"{}\"}} {}",
                rl.name,
                crate::metrics::esc(&String::from_utf8_lossy(&r.key)),
                ledger::window_name(r.period),
                ringway_filters::limit::window::Usd(r.totals.spend_micro)
            );
        }
    }
    let s = cluster::stats();
    for (name, help, v) in [
        (
            "ringway_redis_calls_total",
            "Calls made to Redis (batched lease grants and returns).",
            s.calls.get(),
        ),
        (
            "ringway_redis_errors_total",
            "Redis connection failures and failed calls.",
            s.errors.get(),
        ),
        (
            "ringway_redis_granted_total",
            "Units leased from Redis.",
            s.granted.get(),
        ),
        (
            "ringway_redis_returned_total",
            "Unspent leased units returned to Redis.",
            s.returned.get(),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {v}");
    }
}
