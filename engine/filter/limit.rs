//! `rate-limit`: requests per window by key, exact across workers (a
//! process-wide table of atomic counters) or across replicas (Redis leases,
//! see [`super::cluster`]).

use std::net::IpAddr;

use ringway_filters::{
    key_hash,
    limit::{
        window::{LimitHeaders, Unit},
        Decision, LocalTable, Match, Rule, RuleMatcher,
    },
};

use super::cluster::{self, ClusterLimit};
use super::ledger::{Ledger, Totals};
use crate::{
    config::{self, FailureMode, KeySource, Scope},
    metrics::SharedCounter,
    upstream::{balance::hash_bytes, health::now_ms},
};

/// Most limit checks one request carries (limit filters on one route).
pub const MAX_CHECKS: usize = 4;
/// Longest key value kept verbatim for Redis; longer values are hashed.
const KEY_BYTES: usize = 96;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `rate-limit`: requests.
    Requests,
    /// `token-limit`: tokens.
    Tokens,
    /// `cost-limit`: micro-dollars.
    Cost,
}

/// A compiled `rate-limit` filter; shared by all workers and kept across
/// reloads while its settings do not change.
pub struct RateLimit {
    /// The filter's name (metrics, Redis keys).
    pub name: String,
    /// Mixed into local key hashes so filters never share counters.
    id: u32,
    /// The settings.
    pub conf: config::LimitConf,
    /// A `token-limit` or `cost-limit` (reserved before forwarding, settled with the usage)
    /// rather than a `rate-limit`.
    pub tokens: bool,
    /// A `cost-limit`: its units are micro-dollars.
    pub cost: bool,
    rules: RuleMatcher,
    /// Counters for `scope = "local"`, and for `failure_mode = "local"`.
    table: LocalTable,
    /// Leases for `scope = "cluster"`.
    pub cluster: Option<ClusterLimit>,
    /// Admitted requests.
    pub allowed: SharedCounter,
    /// Rejected requests.
    pub rejected: SharedCounter,
    /// Requests a shadow limit would have rejected.
    pub shadow_rejected: SharedCounter,
    /// Requests admitted or rejected by the failure mode while Redis was unreachable.
    pub failure_decisions: SharedCounter,
    /// What each key used in its current windows (token-limit and cost-limit).
    pub ledger: Ledger,
}

impl RateLimit {
    /// Compiles a filter.
    pub fn new(
        name: &str,
        id: u32,
        conf: &config::LimitConf,
        has_redis: bool,
        kind: Kind,
    ) -> Result<Self, String> {
        let key_is_ip = conf.key == KeySource::Ip;
        let mut rules = Vec::with_capacity(conf.rules.len());
        let mut most_windows = 1;
        for r in &conf.rules {
            let matcher = match &r.matcher {
                config::RuleMatch::Exact(s) => Match::parse(s, key_is_ip)?,
                config::RuleMatch::Prefix(p) => Match::Prefix(p.clone()),
                config::RuleMatch::Any => Match::Any,
                config::RuleMatch::Regex(re) => Match::Regex(re.clone()),
                config::RuleMatch::Cidr { addr, prefix } => Match::Cidr {
                    addr: *addr,
                    prefix: *prefix,
                },
            };
            most_windows = most_windows.max(r.windows.len());
            rules.push(Rule {
                matcher,
                windows: r
                    .windows
                    .iter()
                    .map(|w| (w.period.as_millis() as u64, w.limit))
                    .collect(),
            });
        }
        let rules = RuleMatcher::new(rules).map_err(|e| format!("filter {name}: {e}"))?;
        let cluster = match conf.scope {
            Scope::Cluster if has_redis => Some(ClusterLimit::new(conf.max_keys)),
            Scope::Cluster => {
                return Err(format!(
                    "filter {name}: scope = \"cluster\" needs a [redis] section"
                ))
            }
            Scope::Local => None,
        };
        Ok(Self {
            name: name.to_string(),
            id,
            table: LocalTable::with_windows(conf.max_keys, most_windows),
            conf: conf.clone(),
            tokens: kind != Kind::Requests,
            cost: kind == Kind::Cost,
            rules,
            cluster,
            allowed: SharedCounter::default(),
            rejected: SharedCounter::default(),
            shadow_rejected: SharedCounter::default(),
            failure_decisions: SharedCounter::default(),
            ledger: Ledger::new(conf.max_keys),
        })
    }

    /// Keys evicted from the local table.
    pub fn evictions(&self) -> u64 {
        self.table.evictions() + self.cluster.as_ref().map_or(0, |c| c.evictions())
    }

    /// The check this request owes, if a rule matches `value`.
    pub fn check_for(&self, filter: usize, value: &[u8], ip: IpAddr) -> Option<LimitCheck> {
        let hit = self.rules.find(value, Some(ip))?;
        let mut key = [0u8; KEY_BYTES];
        let key_len = if value.len() <= KEY_BYTES {
            key[..value.len()].copy_from_slice(value);
            value.len()
        } else {
            // Too long to keep: a stable hash names it in Redis instead.
            let h = format!("#{:016x}", hash_bytes(value));
            key[..h.len()].copy_from_slice(h.as_bytes());
            h.len()
        };
        Some(LimitCheck {
            filter: filter as u16,
            rule: hit.rule as u16,
            key_hash: key_hash(self.id, value),
            key,
            key_len: key_len as u8,
        })
    }

    /// Counts one request against the check's windows at once where no Redis lease is
    /// involved (local scope, or no window); `None`: a cluster-scope check, for
    /// [`acquire`](Self::acquire).
    pub fn acquire_local(&self, check: &LimitCheck, cost: u64, now: u64) -> Option<Decision> {
        let windows = self.rules.windows(check.rule as usize);
        if windows.is_empty() {
            return Some(Decision::UNLIMITED);
        }
        if self.cluster.is_some() {
            return None;
        }
        Some(
            self.table
                .try_acquire_all(check.key_hash, windows, cost, now),
        )
    }

    /// Counts one request against the check's windows, waiting for a Redis
    /// lease if the key has none (cluster scope).
    pub async fn acquire(
        &self,
        check: &LimitCheck,
        cost: u64,
        now: u64,
        redis_timeout: std::time::Duration,
    ) -> Decision {
        let windows = self.rules.windows(check.rule as usize);
        if windows.is_empty() {
            return Decision::UNLIMITED;
        }
        let Some(cl) = &self.cluster else {
            return self
                .table
                .try_acquire_all(check.key_hash, windows, cost, now);
        };
        match cl
            .acquire(self, check, windows, cost, now, redis_timeout)
            .await
        {
            Ok(d) => d,
            Err(cluster::Unavailable) => {
                self.failure_decisions.add(1);
                match self.conf.failure_mode {
                    FailureMode::Open => Decision::UNLIMITED,
                    FailureMode::Closed => Decision {
                        admitted: false,
                        remaining: 0,
                        reset_ms: 1000,
                        limit: windows[0].1,
                    },
                    FailureMode::Local => {
                        // Each replica enforces its share of the limit.
                        let share = self.conf.replicas.max(1) as u64;
                        let mut local = [(0u64, 0u64); 8];
                        let n = windows.len().min(local.len());
                        for (dst, &(p, l)) in local.iter_mut().zip(windows) {
                            *dst = (p, (l / share).max(1));
                        }
                        self.table
                            .try_acquire_all(check.key_hash, &local[..n], 1, now)
                    }
                }
            }
        }
    }

    /// The most one request can cost on this check: the tightest window's
    /// limit (a cost above it could never be admitted).
    pub fn max_cost(&self, check: &LimitCheck) -> u64 {
        self.rules
            .windows(check.rule as usize)
            .iter()
            .map(|&(_, l)| l)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Settles a reservation taken at `taken_ms` with what was really used:
    /// the difference goes back to (or is charged to) the same windows.
    pub fn reconcile(&self, check: &LimitCheck, reserved: u64, used: u64, taken_ms: u64) {
        let windows = self.rules.windows(check.rule as usize);
        if windows.is_empty() || reserved == used {
            return;
        }
        match &self.cluster {
            None => {
                if used < reserved {
                    self.table
                        .release_all(check.key_hash, windows, reserved - used, taken_ms);
                } else {
                    self.table
                        .charge_all(check.key_hash, windows, used - reserved, now_ms());
                }
            }
            Some(cl) => cl.reconcile(&self.name, check, windows, reserved, used, taken_ms),
        }
    }

    /// The `(period, limit)` windows of rule `rule`.
    pub fn windows(&self, rule: usize) -> &[(u64, u64)] {
        self.rules.windows(rule)
    }

    /// The rule a key value falls under, if any (for `/usage?key=`).
    pub fn rule_for(&self, value: &[u8]) -> Option<usize> {
        self.rules.find(value, None).map(|h| h.rule)
    }

    /// Records a settled request's use of `check`'s key: in this process's ledger, and for a
    /// cluster filter in Redis (batched by the Redis thread), per window of its rule.
    pub fn record_usage(&self, check: &LimitCheck, totals: &Totals, now: u64) {
        let windows = self.rules.windows(check.rule as usize);
        if windows.is_empty() {
            return;
        }
        self.ledger.record(check.key(), windows, now, totals);
        if self.cluster.is_some() {
            for &(period, _) in windows {
                cluster::submit_usage(
                    &self.name,
                    check.key(),
                    period,
                    ringway_filters::limit::window::window_start(now, period),
                    *totals,
                );
            }
        }
    }

    /// Headers describing a decision.
    pub fn headers(&self, d: &Decision) -> Option<LimitHeaders> {
        (d.limit != u64::MAX).then_some(LimitHeaders {
            unit: match (self.cost, self.tokens) {
                (true, _) => Unit::Usd,
                (false, true) => Unit::Tokens,
                (false, false) => Unit::Requests,
            },
            limit: d.limit,
            remaining: d.remaining,
            reset_ms: d.reset_ms,
        })
    }
}

/// One limit a request must pass: which filter and rule, and its key.
#[derive(Debug, Clone, Copy)]
pub struct LimitCheck {
    /// Index of the filter in the configuration.
    pub filter: u16,
    /// Index of the matching rule.
    pub rule: u16,
    /// The key's hash for the local table.
    pub key_hash: u64,
    key: [u8; KEY_BYTES],
    key_len: u8,
}

impl LimitCheck {
    /// The key value (or its stable hash when too long), for Redis.
    pub fn key(&self) -> &[u8] {
        &self.key[..self.key_len as usize]
    }
}

/// The limit checks of one request. On the heap, and only when there are any: a request
/// plan is moved several times on its way, and most routes check no limit.
#[derive(Debug, Clone, Default)]
pub struct LimitChecks {
    items: Vec<LimitCheck>,
}

impl LimitChecks {
    /// Adds a check (a route with more limit filters than [`MAX_CHECKS`]
    /// is refused by the config check).
    pub fn push(&mut self, c: LimitCheck) {
        if self.items.len() < MAX_CHECKS {
            if self.items.is_empty() {
                self.items.reserve_exact(MAX_CHECKS);
            }
            self.items.push(c);
        }
    }

    /// The checks, in filter order.
    pub fn iter(&self) -> impl Iterator<Item = &LimitCheck> {
        self.items.iter()
    }

    /// True when there is nothing to check.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
