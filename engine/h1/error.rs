//! Errors of the HTTP/1.1 codec: `Copy` enums with static messages.

use std::fmt;

/// Why a request or response head was rejected.
///
/// [`HeadError::status`] is the status to answer a client with when the
/// *request* head is bad. For a bad *response* head the proxy answers 502
/// whatever the variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadError {
    /// The head is longer than `Limits::max_header_bytes` (431).
    HeadTooLarge,
    /// More header fields than `Limits::max_headers` (431).
    TooManyHeaders,
    /// The head is not valid HTTP/1.x syntax: bad token, bare CR, NUL, obs-fold,
    /// whitespace before a colon, empty field name, bad version (400).
    Malformed,
    /// A line ends in LF without CR; rejected as ambiguous across parsers (400).
    BareLineFeed,
    /// Content-Length is not `1*DIGIT` without leading zeros fitting in u64 (400).
    InvalidContentLength,
    /// More than one Content-Length field, even with equal values (400).
    DuplicateContentLength,
    /// Both Content-Length and Transfer-Encoding are present (400).
    ContentLengthWithTransferEncoding,
    /// The Transfer-Encoding list is anything other than exactly `chunked` (400).
    UnsupportedTransferEncoding,
    /// A Transfer-Encoding list that ends in `chunked` but also names another
    /// coding (`gzip, chunked`): well framed, not implemented (501).
    UnimplementedTransferCoding,
    /// A request line with an HTTP major version other than 1 (505).
    VersionNotSupported,
    /// Transfer-Encoding in an HTTP/1.0 message, whose framing is then faulty (400).
    TransferEncodingOnHttp10,
    /// An HTTP/1.1 request without a Host field (400).
    MissingHost,
    /// A request with more than one Host field (400).
    DuplicateHost,
    /// A Host value with a byte outside the authority grammar (400).
    InvalidHost,
    /// A request target that is not origin-form, absolute-form `http://`, or
    /// `*` with OPTIONS (400).
    InvalidTarget,
    /// CONNECT (authority-form) is not implemented by this gateway (501).
    UnsupportedMethod,
    /// A Connection element that is not a token (400).
    InvalidConnection,
    /// More than [`MAX_CONNECTION_TOKENS`](super::MAX_CONNECTION_TOKENS) distinct Connection tokens (400).
    TooManyConnectionTokens,
    /// A request field named `Content_Length` or `Transfer_Encoding` (any case):
    /// CGI-style upstreams map `_` to `-` and would frame the body differently (400).
    UnderscoreFraming,
    /// A response status code below 100 (response only; the proxy answers 502).
    InvalidStatus,
}

impl HeadError {
    /// The HTTP status to answer the client with for a bad request head.
    pub fn status(self) -> u16 {
        match self {
            HeadError::HeadTooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UnsupportedMethod | HeadError::UnimplementedTransferCoding => 501,
            HeadError::VersionNotSupported => 505,
            HeadError::InvalidStatus => 502,
            HeadError::Malformed
            | HeadError::BareLineFeed
            | HeadError::InvalidContentLength
            | HeadError::DuplicateContentLength
            | HeadError::ContentLengthWithTransferEncoding
            | HeadError::UnsupportedTransferEncoding
            | HeadError::TransferEncodingOnHttp10
            | HeadError::MissingHost
            | HeadError::DuplicateHost
            | HeadError::InvalidHost
            | HeadError::InvalidTarget
            | HeadError::InvalidConnection
            | HeadError::TooManyConnectionTokens
            | HeadError::UnderscoreFraming => 400,
        }
    }

    /// A short static description, suitable for logs and error bodies.
    pub fn message(self) -> &'static str {
        match self {
            HeadError::HeadTooLarge => "message head too large",
            HeadError::TooManyHeaders => "too many header fields",
            HeadError::Malformed => "malformed message head",
            HeadError::BareLineFeed => "line ending without CR",
            HeadError::InvalidContentLength => "invalid Content-Length",
            HeadError::DuplicateContentLength => "more than one Content-Length",
            HeadError::ContentLengthWithTransferEncoding => {
                "both Content-Length and Transfer-Encoding"
            }
            HeadError::UnsupportedTransferEncoding => "unsupported Transfer-Encoding",
            HeadError::TransferEncodingOnHttp10 => "Transfer-Encoding in an HTTP/1.0 message",
            HeadError::UnimplementedTransferCoding => "transfer coding not implemented",
            HeadError::VersionNotSupported => "HTTP version not supported",
            HeadError::MissingHost => "missing Host",
            HeadError::DuplicateHost => "more than one Host",
            HeadError::InvalidHost => "invalid Host",
            HeadError::InvalidTarget => "invalid request target",
            HeadError::UnsupportedMethod => "method not implemented",
            HeadError::InvalidConnection => "invalid Connection header",
            HeadError::TooManyConnectionTokens => "too many Connection options",
            HeadError::UnderscoreFraming => "Content-Length or Transfer-Encoding spelled with '_'",
            HeadError::InvalidStatus => "invalid response status",
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for HeadError {}

/// Why a chunked body was rejected; the connection cannot be reused after one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkError {
    /// The chunk-size line has no hex digit or a byte that is not allowed there.
    InvalidSize,
    /// The chunk size has more than 16 hex digits or does not fit in u64.
    SizeOverflow,
    /// A chunk extension is not `token [= token / quoted-string]`.
    InvalidExtension,
    /// The extensions of one chunk-size line exceed
    /// [`CHUNK_EXTENSIONS_LIMIT`](super::CHUNK_EXTENSIONS_LIMIT) bytes.
    ExtensionTooLong,
    /// A line does not end in CRLF (bare LF, bare CR), or chunk data is not
    /// followed by CRLF.
    MissingCrlf,
    /// A trailer field is not `token ":" value` (obs-fold, bad byte, empty name).
    InvalidTrailer,
    /// The trailer section exceeds [`TRAILERS_LIMIT`](super::TRAILERS_LIMIT) bytes.
    TrailerTooLong,
    /// The payload would exceed the decoder's `max_body`.
    BodyTooLarge,
}

impl ChunkError {
    /// A short static description, suitable for logs.
    pub fn message(self) -> &'static str {
        match self {
            ChunkError::InvalidSize => "invalid chunk size",
            ChunkError::SizeOverflow => "chunk size too large",
            ChunkError::InvalidExtension => "invalid chunk extension",
            ChunkError::ExtensionTooLong => "chunk extensions too long",
            ChunkError::MissingCrlf => "missing CRLF in chunked body",
            ChunkError::InvalidTrailer => "invalid trailer field",
            ChunkError::TrailerTooLong => "trailer section too long",
            ChunkError::BodyTooLarge => "body too large",
        }
    }
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for ChunkError {}
