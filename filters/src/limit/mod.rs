//! Request and token limits: which rule applies, the window arithmetic, the process-wide counter
//! table (`scope = "local"`) and the cluster lease policy (`scope = "cluster"`).
//!
//! # Token reconciliation
//!
//! A token limit reserves before forwarding and settles at the end of the response:
//! `try_acquire_all(key, windows, reserved, now_ms)`; then, with the real usage `used`, either
//! `release_all(key, windows, reserved - used, acquired_ms)` (gives back only while the
//! reservation's window is still the current one) or `charge_all(key, windows, used - reserved,
//! now_ms)` (counts the overrun against the window it happens in, even past the limit).

pub mod lease;
pub mod rule;
pub mod table;
pub mod window;

pub use rule::{Match, Rule, RuleHit, RuleMatcher};
pub use table::{Decision, LocalTable};
