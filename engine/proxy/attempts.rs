//! Where a request goes after an attempt failed: another key (at once) or endpoint (after a
//! backoff) of the same upstream, else the next upstream in the route's `fallbacks` — at most
//! `max_attempts` requests in all. Decisions only; the exchange does the IO.

use std::time::Duration;

use crate::config::FallbackOn;

/// First backoff between two attempts on one upstream; doubles with each retry.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest backoff (a provider's `retry-after` may ask for longer, up to `response_timeout`).
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection (every endpoint refused or timed out, none healthy, or no key left).
    Connect,
    /// No response head within `response_timeout`.
    Timeout,
    /// The connection closed or reset before a response.
    Reset,
    /// The upstream answered with an error status.
    Status {
        status: u16,
        /// The provider's `retry-after`.
        retry_after: Option<Duration>,
    },
}

impl Failure {
    /// The `outcome` label of `ringway_upstream_attempts_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Reset => "reset",
            Failure::Status { status: 429, .. } => "status_429",
            Failure::Status { status, .. } if *status >= 500 => "status_5xx",
            Failure::Status { .. } => "status_4xx",
        }
    }

    /// Whether `on` lists this failure (a reset counts as a 502, which is what it becomes).
    fn listed(&self, on: &FallbackOn) -> bool {
        match self {
            Failure::Connect => on.connect,
            Failure::Timeout => on.timeout,
            Failure::Reset => on.status(502),
            Failure::Status { status, .. } => on.status(*status),
        }
    }
}

/// What the failed attempt's upstream still offers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Left {
    /// A key neither cooling nor removed.
    pub other_key: bool,
    /// An endpoint not tried yet for this request.
    pub other_endpoint: bool,
}

/// The next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// No more: the client gets this attempt's answer.
    Stop,
    /// Try again on `upstream`, after `delay`.
    Retry {
        upstream: usize,
        delay: Duration,
        /// The same upstream with another key.
        new_key: bool,
        /// The same upstream on an endpoint not tried yet.
        new_endpoint: bool,
    },
}

/// One request's attempts.
#[derive(Debug)]
pub(crate) struct Attempts<'r> {
    first: usize,
    fallbacks: &'r [usize],
    /// Position in `[first, fallbacks..]`.
    pos: usize,
    on: &'r FallbackOn,
    max: u32,
    made: u32,
    /// Retries on the current upstream after a backoff (the backoff's exponent).
    backoffs: u32,
}

impl<'r> Attempts<'r> {
    /// Attempts starting at `first`, then `fallbacks` in order.
    pub(crate) fn new(first: usize, fallbacks: &'r [usize], on: &'r FallbackOn, max: u32) -> Self {
        Self {
            first,
            fallbacks,
            pos: 0,
            on,
            max: max.max(1),
            made: 0,
            backoffs: 0,
        }
    }

    /// The upstream the next attempt goes to.
    pub(crate) fn upstream(&self) -> usize {
        match self.pos {
            0 => self.first,
            p => self.fallbacks[p - 1],
        }
    }

    /// Whether an upstream follows the current one.
    pub(crate) fn has_next_upstream(&self) -> bool {
        self.pos < self.fallbacks.len()
    }

    /// Moves to the next upstream without an attempt (it had nothing to try with).
    pub(crate) fn skip(&mut self) -> bool {
        if !self.has_next_upstream() {
            return false;
        }
        self.pos += 1;
        self.backoffs = 0;
        true
    }

    /// Counts an attempt about to be made.
    pub(crate) fn begin(&mut self) {
        self.made += 1;
    }

    /// Attempts made so far.
    pub(crate) fn made(&self) -> u32 {
        self.made
    }

    /// Whether `status` from the upstream is a failure to try elsewhere.
    pub(crate) fn retries_status(&self, status: u16) -> bool {
        self.on.status(status)
    }

    /// Decides after a failed attempt. `left`: what its upstream still offers;
    /// `limit`: the longest wait (the upstream's `response_timeout`); `rand`: any random number.
    pub(crate) fn after(&mut self, f: Failure, left: Left, limit: Duration, rand: u64) -> Step {
        if !f.listed(self.on) || self.made >= self.max {
            return Step::Stop;
        }
        let here = self.upstream();
        // A rate-limited key: another key of the same provider, at once.
        if matches!(f, Failure::Status { status: 429, .. }) && left.other_key {
            return Step::Retry {
                upstream: here,
                delay: Duration::ZERO,
                new_key: true,
                new_endpoint: false,
            };
        }
        let retry_after = match f {
            Failure::Status { retry_after, .. } => retry_after,
            _ => None,
        };
        // A provider that asks for a longer wait than a response may take is not waited for.
        let too_long = retry_after.is_some_and(|r| r > limit);
        // Connecting already walked the endpoints: another endpoint helps the other failures.
        if left.other_endpoint && f != Failure::Connect && !too_long {
            return Step::Retry {
                upstream: here,
                delay: self.backoff(retry_after, limit, rand),
                new_key: false,
                new_endpoint: true,
            };
        }
        // Else the next upstream, at once. The same endpoint with the same key is not asked
        // again: it just failed, and its failures count towards its ejection.
        if self.skip() {
            return Step::Retry {
                upstream: self.upstream(),
                delay: Duration::ZERO,
                new_key: false,
                new_endpoint: false,
            };
        }
        Step::Stop
    }

    /// Exponential backoff with jitter (half to all of it), or the provider's `retry-after`
    /// when longer (callers pass one within `limit`).
    fn backoff(&mut self, retry_after: Option<Duration>, limit: Duration, rand: u64) -> Duration {
        let full = BACKOFF_BASE
            .saturating_mul(1 << self.backoffs.min(8))
            .min(BACKOFF_MAX);
        self.backoffs += 1;
        let half = full / 2;
        let jitter = Duration::from_nanos(rand % (half.as_nanos() as u64).max(1));
        (half + jitter)
            .max(retry_after.unwrap_or_default())
            .min(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(30);

    fn status(s: u16) -> Failure {
        Failure::Status {
            status: s,
            retry_after: None,
        }
    }

    fn up(step: Step) -> Option<usize> {
        match step {
            Step::Retry { upstream, .. } => Some(upstream),
            Step::Stop => None,
        }
    }

    #[test]
    fn a_rate_limited_key_is_replaced_at_once_on_the_same_upstream() {
        let on = FallbackOn::default();
        let mut a = Attempts::new(0, &[1], &on, 3);
        a.begin();
        let left = Left {
            other_key: true,
            other_endpoint: false,
        };
        let step = a.after(status(429), left, LIMIT, 7);
        assert_eq!(
            step,
            Step::Retry {
                upstream: 0,
                delay: Duration::ZERO,
                new_key: true,
                new_endpoint: false
            }
        );
    }

    #[test]
    fn fallbacks_follow_in_order_then_the_last_answer_stands() {
        let on = FallbackOn::default();
        let mut a = Attempts::new(5, &[7, 9], &on, 4);
        a.begin();
        assert_eq!(up(a.after(status(503), Left::default(), LIMIT, 1)), Some(7));
        a.begin();
        assert_eq!(
            up(a.after(Failure::Connect, Left::default(), LIMIT, 1)),
            Some(9)
        );
        a.begin();
        assert_eq!(
            a.after(Failure::Timeout, Left::default(), LIMIT, 1),
            Step::Stop
        );
        assert_eq!(a.made(), 3);
    }

    #[test]
    fn other_endpoints_of_the_upstream_come_before_fallbacks() {
        let on = FallbackOn::default();
        let mut a = Attempts::new(0, &[1], &on, 3);
        a.begin();
        let left = Left {
            other_key: false,
            other_endpoint: true,
        };
        match a.after(status(502), left, LIMIT, 0) {
            Step::Retry {
                upstream: 0,
                new_endpoint: true,
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        // A connect failure already walked the endpoints.
        a.begin();
        assert_eq!(up(a.after(Failure::Connect, left, LIMIT, 0)), Some(1));
    }

    #[test]
    fn unlisted_failures_and_spent_attempts_stop() {
        let on = FallbackOn {
            statuses: vec![503],
            connect: false,
            timeout: false,
        };
        let mut a = Attempts::new(0, &[1, 2], &on, 2);
        a.begin();
        assert_eq!(a.after(status(500), Left::default(), LIMIT, 0), Step::Stop);
        assert_eq!(
            a.after(Failure::Timeout, Left::default(), LIMIT, 0),
            Step::Stop
        );
        assert_eq!(up(a.after(status(503), Left::default(), LIMIT, 0)), Some(1));
        a.begin();
        assert_eq!(a.after(status(503), Left::default(), LIMIT, 0), Step::Stop);
    }

    #[test]
    fn retry_after_is_honoured_when_within_the_limit() {
        let on = FallbackOn::default();
        let other = Left {
            other_key: false,
            other_endpoint: true,
        };
        let mut a = Attempts::new(0, &[3], &on, 3);
        a.begin();
        let f = Failure::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(1)),
        };
        match a.after(f, other, LIMIT, 0) {
            Step::Retry {
                upstream: 0, delay, ..
            } => assert_eq!(delay, Duration::from_secs(1)),
            other => panic!("unexpected {other:?}"),
        }
        // A longer wait than a response may take moves the request on at once.
        a.begin();
        let f = Failure::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(120)),
        };
        assert_eq!(
            a.after(f, other, LIMIT, 0),
            Step::Retry {
                upstream: 3,
                delay: Duration::ZERO,
                new_key: false,
                new_endpoint: false
            }
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let on = FallbackOn::default();
        let mut a = Attempts::new(0, &[], &on, 10);
        let other = Left {
            other_key: false,
            other_endpoint: true,
        };
        let mut last = Duration::ZERO;
        for _ in 0..8 {
            a.begin();
            let Step::Retry { delay, .. } = a.after(Failure::Timeout, other, LIMIT, u64::MAX)
            else {
                panic!("stopped early");
            };
            assert!(delay >= last && delay <= BACKOFF_MAX);
            last = delay;
        }
        assert!(last >= BACKOFF_MAX / 2);
        // Nothing else to try: the answer stands.
        assert_eq!(
            a.after(Failure::Timeout, Left::default(), LIMIT, 0),
            Step::Stop
        );
    }
}
