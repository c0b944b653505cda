//! The proxy: one task per client connection, from head to response.

mod ai_creds;
pub mod ai_exchange;
mod attempts;
pub mod conn;
mod early;
pub mod error;
mod failover;
mod fallback_exchange;
pub mod head;
pub mod headers;
pub mod limits;
mod park;
pub mod record;
pub mod reject;
mod relay_stage;
pub mod request;
pub mod respond;
pub mod response;
pub mod retry;
pub mod rules;
pub mod send;
pub mod transfer;

pub use conn::{serve, serve_tls};

/// Boxes the future `make` builds, written straight into its allocation: `Box::pin(f)` builds
/// the whole state machine (KiBs, sized for its largest state) on the stack and copies
/// it, once per request, although only its arguments are set. With the allocation made first,
/// the optimizer builds the value in place (an optimization, not a language guarantee:
/// `benches/instructions.sh` shows the copy if it comes back, as about 19k instructions).
#[inline(always)]
pub(crate) fn in_place<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    let mut slot = Box::<F>::new_uninit();
    slot.write(make());
    // SAFETY: `write` initialized the value.
    Box::into_pin(unsafe { slot.assume_init() })
}
