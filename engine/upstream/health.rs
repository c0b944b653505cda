//! Endpoint health, shared by every worker and the control core.
//!
//! Passive: workers count consecutive connect failures and 5xx answers (and
//! 429s on AI routes, where a provider endpoint that keeps refusing must rest); at
//! `unhealthy_after` the endpoint is ejected and every worker skips it.
//! Active: the control core probes `health.path` and ejects or restores by
//! `unhealthy_after` / `healthy_after`. Without active checks an ejected
//! endpoint is tried again after [`PASSIVE_COOLDOWN_MS`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// How long a passively ejected endpoint rests when nothing probes it.
pub const PASSIVE_COOLDOWN_MS: u64 = 10_000;

/// One endpoint's health.
#[derive(Default)]
pub struct EndpointHealth {
    ejected: AtomicBool,
    /// Consecutive failures seen by workers.
    fails: AtomicU32,
    /// When it was ejected (ms since the Unix epoch).
    ejected_at_ms: AtomicU64,
}

impl EndpointHealth {
    /// Whether workers should skip it now. Without active checks, an
    /// ejected endpoint comes back on trial after the cooldown.
    pub fn is_usable(&self, active_checks: bool, now_ms: u64) -> bool {
        if !self.ejected.load(Ordering::Relaxed) {
            return true;
        }
        if !active_checks
            && now_ms.saturating_sub(self.ejected_at_ms.load(Ordering::Relaxed))
                >= PASSIVE_COOLDOWN_MS
        {
            // On trial: one more failure ejects it again.
            self.ejected.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Whether it is ejected (for metrics and the control core).
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// A request to it went well.
    pub fn success(&self) {
        // Read first: the common case writes nothing, keeping the line shared.
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failure or a 5xx; returns true if this ejected it.
    pub fn failure(&self, unhealthy_after: u32, now_ms: u64) -> bool {
        let n = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= unhealthy_after && !self.ejected.swap(true, Ordering::Relaxed) {
            self.ejected_at_ms.store(now_ms, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The control core's verdict from active probes.
    pub fn set_ejected(&self, ejected: bool, now_ms: u64) {
        if ejected {
            if !self.ejected.swap(true, Ordering::Relaxed) {
                self.ejected_at_ms.store(now_ms, Ordering::Relaxed);
            }
        } else {
            self.fails.store(0, Ordering::Relaxed);
            self.ejected.store(false, Ordering::Relaxed);
        }
    }
}

/// Milliseconds since the Unix epoch, by this turn's clock (see `runtime::clock`).
pub fn now_ms() -> u64 {
    crate::runtime::clock::wall_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_failures_eject_and_success_resets() {
        let h = EndpointHealth::default();
        assert!(!h.failure(3, 0));
        h.success();
        assert!(!h.failure(3, 0));
        assert!(!h.failure(3, 0));
        assert!(h.failure(3, 5));
        assert!(!h.is_usable(true, 1_000_000));
        assert!(!h.is_usable(false, 5 + PASSIVE_COOLDOWN_MS - 1));
        assert!(h.is_usable(false, 5 + PASSIVE_COOLDOWN_MS));
    }
}
