//! `GET /usage` on the admin listener: what each key of every token-limit and cost-limit used in
//! its current windows. A local filter answers from this process's ledger; a cluster filter
//! reads Redis (from the admin thread, never a worker), so every replica answers the same.
//!
//! `remaining` is the limit less what settled requests used; requests in flight hold a
//! reservation the limit counts but the ledger does not yet.

use std::{collections::HashMap, fmt::Write as _, sync::Mutex};

use ringway_filters::limit::window::{iso8601, window_start};

use crate::{
    admin::json_str,
    filter::{
        cluster::Conn,
        ledger::{redis_hash, redis_index, totals_from_hash, window_name, Row},
        Filter, RateLimit,
    },
    runtime::current,
    upstream::health::now_ms,
};

/// The answer to `GET /usage?<query>`: status and JSON body.
pub fn answer(query: &str) -> (u16, String) {
    let Some(shared) = current() else {
        return (503, error("starting"));
    };
    let param = |name: &str| {
        ringway_filters::auth::query_param(query.as_bytes(), name)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    let (want_filter, want_key) = (param("filter"), param("key"));
    let limits: Vec<&RateLimit> = shared
        .filters
        .list
        .iter()
        .filter_map(|f| match f {
            Filter::TokenLimit(rl) => Some(&**rl),
            _ => None,
        })
        .filter(|rl| want_filter.as_ref().is_none_or(|n| *n == rl.name))
        .collect();
    if let (Some(name), true) = (&want_filter, limits.is_empty()) {
        return (
            404,
            error(&format!(
                "no token-limit or cost-limit filter named {name:?}"
            )),
        );
    }
    let now = now_ms();
    let mut out = String::from("{\"filters\":[");
    for (i, rl) in limits.iter().enumerate() {
        let rows = if rl.cluster.is_some() {
            match cluster_rows(shared.cfg.redis.as_ref(), rl, want_key.as_deref(), now) {
                Ok(rows) => rows,
                Err(e) => return (503, error(&format!("redis: {e}"))),
            }
        } else {
            rl.ledger.rows(want_key.as_deref().map(str::as_bytes), now)
        };
        if i > 0 {
            out.push(',');
        }
        write_filter(&mut out, rl, &rows);
    }
    out.push_str("]}\n");
    (200, out)
}

fn error(msg: &str) -> String {
    format!("{{\"error\":{{\"message\":{}}}}}\n", json_str(msg))
}

fn write_filter(out: &mut String, rl: &RateLimit, rows: &[Row]) {
    let kind = if rl.cost { "cost-limit" } else { "token-limit" };
    let scope = if rl.cluster.is_some() {
        "cluster"
    } else {
        "local"
    };
    let _ = write!(
        out,
        "{{\"filter\":{},\"kind\":\"{kind}\",\"scope\":\"{scope}\",\"keys\":[",
        json_str(&rl.name)
    );
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let t = &r.totals;
        let _ = write!(
            out,
            "{{\"key\":{},\"window\":\"{}\",\"window_start\":\"{}\",\"requests\":{},\
             \"input_tokens\":{},\"output_tokens\":{},\"cached_tokens\":{},",
            json_str(&String::from_utf8_lossy(&r.key)),
            window_name(r.period),
            iso8601(r.window_start),
            t.requests,
            t.input,
            t.output,
            t.cached
        );
        if rl.cost {
            let _ = write!(
                out,
                "\"spend_micro_usd\":{},\"limit_micro_usd\":{},\"remaining_micro_usd\":{},",
                t.spend_micro,
                r.limit,
                r.limit.saturating_sub(t.spend_micro)
            );
        } else {
            let used = t.input + t.output;
            let _ = write!(
                out,
                "\"limit_tokens\":{},\"remaining_tokens\":{},",
                r.limit,
                r.limit.saturating_sub(used)
            );
        }
        let _ = write!(out, "\"estimated\":{}}}", t.estimated);
    }
    out.push_str("]}");
}

/// The admin thread's own Redis connection, opened on first use and again after an error.
static CONN: Mutex<Option<Conn>> = Mutex::new(None);

/// The rows of a cluster filter, read from the usage hashes in Redis.
fn cluster_rows(
    conf: Option<&crate::config::Redis>,
    rl: &RateLimit,
    key: Option<&str>,
    now: u64,
) -> Result<Vec<Row>, String> {
    let conf = conf.ok_or("no [redis] section")?;
    let mut guard = CONN.lock().map_err(|_| "lock poisoned".to_string())?;
    if guard.is_none() {
        *guard = Some(Conn::open(conf).map_err(|e| e.to_string())?);
    }
    let Some(conn) = guard.as_mut() else {
        return Err("not connected".into());
    };
    let res = read_rows(conn, rl, key, now);
    if res.is_err() {
        *guard = None;
    }
    res.map_err(|e| e.to_string())
}

fn read_rows(
    c: &mut Conn,
    rl: &RateLimit,
    key: Option<&str>,
    now: u64,
) -> redis::RedisResult<Vec<Row>> {
    // The keys to show: the one asked for, or every key named in the index of each period.
    let mut keys: Vec<Vec<u8>> = match key {
        Some(k) => vec![k.as_bytes().to_vec()],
        None => {
            let mut periods: Vec<u64> = (0..rl.conf.rules.len())
                .flat_map(|r| rl.windows(r).iter().map(|w| w.0))
                .collect();
            periods.sort_unstable();
            periods.dedup();
            let mut all = Vec::new();
            for p in periods {
                let idx = redis_index(&rl.name, p, window_start(now, p));
                let members: Vec<Vec<u8>> = c.query(redis::cmd("SMEMBERS").arg(&idx))?;
                all.extend(members);
            }
            all
        }
    };
    keys.sort();
    keys.dedup();
    let mut rows = Vec::new();
    for k in keys {
        let Some(rule) = rl.rule_for(&k) else {
            continue;
        };
        for &(period, limit) in rl.windows(rule) {
            let ws = window_start(now, period);
            let fields: HashMap<String, i64> =
                c.query(redis::cmd("HGETALL").arg(redis_hash(&rl.name, &k, period, ws)))?;
            rows.push(Row {
                key: k.clone(),
                period,
                window_start: ws,
                limit,
                totals: totals_from_hash(&fields),
            });
        }
    }
    Ok(rows)
}
