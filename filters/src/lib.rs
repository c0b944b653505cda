//! Sans-IO decision logic for Ringway.
//!
//! Stream parsers in this crate are state machines fed arbitrary slices: no IO, no clock, no
//! whole-body buffering, memory bounded by configuration rather than by body size.
//! `sse` frames `text/event-stream` bodies, `usage` extracts and estimates token usage, `model`
//! finds a request body's top-level `"model"`; all body scanning builds on `json_scan`.

pub mod model;
pub mod sse;
pub mod usage;

mod json_scan;
