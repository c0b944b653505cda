//! The proxy: one task per client connection, from head to response.

pub mod ai_exchange;
pub mod conn;
pub mod error;
pub mod headers;
pub mod request;
pub mod response;
pub mod transfer;

pub use conn::serve;
