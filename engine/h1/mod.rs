//! Sans-IO HTTP/1.1 codec: message heads and body framing, no IO and no allocation.
//!
//! # Layout
//!
//! - `head`: request and response head parsing plus framing validation.
//! - `decode`: the chunked transfer-coding decoder state machine.
//! - `error`: the `Copy` error enums of this layer.

mod decode;
mod error;
mod head;

pub use decode::{
    ChunkedDecoder, Progress, CHUNK_EXTENSIONS_LIMIT, CHUNK_SIZE_MAX_DIGITS, TRAILERS_LIMIT,
};
pub use error::{ChunkError, HeadError};
pub use head::{
    is_hop_by_hop, newer_minor_version, parse_request, parse_response, split_absolute_form,
    BodyKind, ConnTokens, Limits, Parsed, RequestHead, ResponseHead, MAX_CONNECTION_TOKENS,
};

#[cfg(test)]
mod tests;
