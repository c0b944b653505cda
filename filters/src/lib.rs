//! Sans-IO decision logic for Ringway.
//!
//! Everything here is a pure function of its inputs: no sockets, no runtime, no threads spawned,
//! and no clock reads. Time comes in as `now_ms: u64` (Unix milliseconds) from the engine, which
//! owns the clock, so every decision is reproducible in a test with a manual clock.
//!
//! The only process-wide shared state is made of atomics ([`limit::LocalTable`],
//! [`limit::lease::LeaseSlot`]); the engine puts those in an `Arc` and hands them to its workers.
//!
//! # Layout
//!
//! - [`auth`]: API-key authentication. Where a key is read from (`Authorization: Bearer`,
//!   `x-api-key`, a query parameter) and the constant-time consumer lookup.
//! - [`limit`]: request and token limits.
//!   - [`limit::rule`]: which rule of a filter applies to a key value (exact, prefix, `*`,
//!     `regex:`, CIDR); first match wins.
//!   - [`limit::window`]: clock-aligned fixed windows and the OpenAI-style response headers.
//!   - [`limit::table`]: the process-wide, fixed-size table of atomic counters for
//!     `scope = "local"` (exact across cores).
//!   - [`limit::lease`]: `scope = "cluster"`: lease sizing, the worker-side lease slot, the
//!     control core's lease book, the Redis key format and the Lua scripts.
//! - [`key_hash`]: the one hash the engine uses to name a limiter key.
//! - [`coding`]: content codings (gzip, deflate, br) of response bodies, decoded as a stream so
//!   usage is read from replies an upstream compressed.
//! - [`sse`]: `text/event-stream` framing, frames split anywhere across reads.
//! - [`usage`]: token usage from SSE frames and JSON bodies, and estimation when none is reported.
//! - [`model`]: the request body's top-level `"model"`, found by a streaming scan.
//! - [`price`]: prices per model and the cost of a request in integer micro-dollars.
//!
//! Stream parsers here are state machines fed arbitrary slices: memory is bounded by
//! configuration, never by body size; all body scanning builds on one push JSON tokenizer.

pub mod auth;
pub mod coding;
pub mod limit;
pub mod model;
pub mod price;
pub mod sse;
pub mod usage;

mod json_scan;

use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::OnceLock;

/// The hash that names a limiter key in [`limit::LocalTable`]: SipHash-1-3 over the filter id and
/// the key value.
///
/// The SipHash keys are random per process (std's `RandomState`, drawn once and shared by every
/// worker), not fixed. The table is process-local, so nothing needs the hash to be stable across
/// processes (Redis keys use the raw value, see [`limit::lease::redis_key`]); a secret key means a
/// client cannot compute which table bucket its key values land in, so it cannot pick values that
/// crowd a victim key's bucket and force its counter out (eviction resets a counter to 0).
///
/// Collisions: two different values with the same 64-bit hash share one counter. With a secret
/// key that needs about 2^32 values *in one process lifetime* to happen by chance between any
/// two, and a chosen collision against a given victim is a 2^64 search; the effect of one is that
/// both values are limited together (stricter, never looser), so it is accepted.
pub fn key_hash(filter_id: u32, value: &[u8]) -> u64 {
    static STATE: OnceLock<RandomState> = OnceLock::new();
    let mut h = STATE.get_or_init(RandomState::new).build_hasher();
    // The id is fixed-width and comes first, so (id, value) pairs never alias each other.
    h.write_u32(filter_id);
    h.write(value);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::key_hash;

    #[test]
    fn key_hash_is_stable_within_the_process_and_mixes_the_filter_id() {
        assert_eq!(key_hash(1, b"alice"), key_hash(1, b"alice"));
        assert_ne!(key_hash(1, b"alice"), key_hash(2, b"alice"));
        assert_ne!(key_hash(1, b"alice"), key_hash(1, b"bob"));
        // The same hash from another thread: the key is process-wide, not per thread.
        let other = std::thread::spawn(|| key_hash(1, b"alice")).join().ok();
        assert_eq!(other, Some(key_hash(1, b"alice")));
    }
}
