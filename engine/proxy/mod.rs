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
pub mod record;
pub mod reject;
pub mod request;
pub mod respond;
pub mod response;
pub mod retry;
pub mod rules;
pub mod send;
pub mod transfer;

pub use conn::{serve, serve_tls};
