//! Request limits checked before a request goes upstream.

use std::time::Duration;

use ringway_filters::limit::window::LimitHeaders;

use super::{
    error::{self, Reject},
    headers::ExtraHeaders,
    request::Plan,
};
use crate::{filter::Filter, runtime::Generation, upstream::health::now_ms};

/// Runs the request's limit checks; on a refusal, the 429 to send. Limit
/// headers for the response (allowed or not) go into `extra`.
pub(super) async fn check_limits(
    g: &Generation,
    plan: &Plan,
    extra: &mut ExtraHeaders,
) -> Result<(), Reject> {
    let redis_timeout = g
        .shared
        .cfg
        .redis
        .as_ref()
        .map_or(Duration::from_millis(200), |r| r.timeout);
    let mut tightest: Option<LimitHeaders> = None;
    let mut refused = false;
    for check in plan.limits.iter() {
        let Filter::RateLimit(rl) = &g.shared.filters.list[check.filter as usize] else {
            continue;
        };
        let d = rl.acquire(check, 1, now_ms(), redis_timeout).await;
        if let Some(h) = rl.headers(&d) {
            if tightest.is_none_or(|t| h.remaining < t.remaining || !d.admitted) {
                tightest = Some(h);
            }
        }
        if d.admitted {
            rl.allowed.add(1);
        } else if rl.conf.shadow {
            // Counted and reported, never enforced.
            rl.shadow_rejected.add(1);
        } else {
            rl.rejected.add(1);
            refused = true;
            break;
        }
    }
    if let Some(h) = tightest {
        let _ = extra.push_limit(&h);
        if refused {
            let _ = h.write_retry_after(extra);
        }
    }
    if refused {
        return Err(error::RATE_LIMITED);
    }
    Ok(())
}
