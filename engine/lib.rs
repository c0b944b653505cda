//! Ringway: an io_uring, thread-per-core API and AI gateway.
//!
//! # Layout (in the order a request meets it)
//!
//! - [`config`]: the TOML file, validated, every error naming key and line.
//! - [`runtime`]: worker threads, one monoio runtime each, their listeners.
//! - [`transport`]: the streams under the codec: plain TCP or TLS.
//! - [`proxy`]: one client connection: heads, routing, bodies, responses.
//! - [`h1`]: the sans-IO HTTP/1.1 codec (head parsing, chunked framing).
//! - [`route`]: matching a request to a route.
//! - [`upstream`]: resolved endpoints and per-worker connection pools.
//! - [`buf`]: the fixed buffer pool and splice pipes.
//! - [`tls`]: rustls over pool buffers, for TLS listeners and upstreams.
//! - [`control`]: the control core, the only thread that may block.
//! - [`admin`], [`reload`], [`metrics`]: operating a running gateway.

pub mod accesslog;
pub mod admin;
pub mod ai;
pub mod buf;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod filter;
pub mod h1;
pub mod log;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod tls;
pub mod transport;
pub mod upstream;
pub mod usage_api;
