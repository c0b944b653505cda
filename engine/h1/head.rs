//! Request and response head parsing, plus the framing decisions of RFC 9112 §6.
//!
//! Syntax is checked by httparse in its strict default configuration; this
//! module adds what httparse lets through (LF-only line endings) and the
//! semantic checks a proxy needs to avoid request smuggling: one exact
//! Content-Length, a Transfer-Encoding of exactly `chunked`, never both.

use std::mem::MaybeUninit;

use httparse::{Header, ParserConfig, Status};

use super::error::HeadError;

/// The most distinct Connection tokens a head may carry; more is
/// [`HeadError::TooManyConnectionTokens`]. Real clients send one or two; the
/// bound only keeps the token table on the stack (32, as other list limits).
pub const MAX_CONNECTION_TOKENS: usize = 32;

/// Size limits for one message head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest accepted head, request line through the empty line, in bytes.
    pub max_header_bytes: usize,
    /// Most header fields; the caller's header storage has this length.
    pub max_headers: usize,
}

impl Default for Limits {
    /// 16 KiB of head and 100 fields.
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
        }
    }
}

/// How the message body is framed (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body: no framing header on a request, or a response that cannot have one.
    None,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// The chunked transfer coding; decode with `ChunkedDecoder`.
    Chunked,
    /// Responses only: "the message body length is determined by the number of
    /// octets received prior to the server closing the connection."
    CloseDelimited,
}

/// The tokens of all Connection fields of a head, in order, without duplicates.
///
/// It borrows the head's fields rather than holding a table of tokens: a table (32 slices,
/// 520 bytes) was copied with every head through the parse and the proxy's plan, five times
/// per request head and again per response head. The tokens are read again from the fields
/// when asked; a head carries one or two.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnTokens<'b, 'h> {
    /// The head's fields from its first Connection field to its last (empty when it has
    /// none).
    fields: &'h [Header<'b>],
    /// How many distinct tokens they hold, at most [`MAX_CONNECTION_TOKENS`].
    len: u8,
}

impl<'b, 'h> ConnTokens<'b, 'h> {
    /// Every token of `fields`' Connection fields, duplicates included, in order.
    fn all(fields: &'h [Header<'b>]) -> impl Iterator<Item = &'b [u8]> + 'h {
        fields
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .map(trim_ows)
            // RFC 9110 §5.6.1: recipients accept empty list elements.
            .filter(|t| !t.is_empty())
    }

    /// Counts the distinct tokens of `fields` (checked to be tokens by the caller). The
    /// distinct ones are kept in a table on this call's stack only, so a field repeating
    /// one token many times costs one compare per token and table entry.
    fn count(fields: &'h [Header<'b>]) -> Result<Self, HeadError> {
        let mut seen: [&[u8]; MAX_CONNECTION_TOKENS] = [&[]; MAX_CONNECTION_TOKENS];
        let mut len = 0usize;
        for token in Self::all(fields) {
            if seen[..len].iter().any(|t| t.eq_ignore_ascii_case(token)) {
                continue;
            }
            *seen
                .get_mut(len)
                .ok_or(HeadError::TooManyConnectionTokens)? = token;
            len += 1;
        }
        Ok(ConnTokens {
            fields,
            // At most MAX_CONNECTION_TOKENS (32), so it fits.
            len: u8::try_from(len).unwrap_or(u8::MAX),
        })
    }

    /// Iterates over the distinct tokens, in the order they first appeared.
    pub fn iter(&self) -> impl Iterator<Item = &'b [u8]> + 'h {
        let fields = self.fields;
        Self::all(fields).enumerate().filter_map(move |(i, t)| {
            let first = !Self::all(fields).take(i).any(|u| u.eq_ignore_ascii_case(t));
            first.then_some(t)
        })
    }

    /// The number of distinct tokens.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True when no Connection field (or only empty ones) was present.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when `name` is one of the tokens (ASCII case-insensitive); a proxy
    /// drops the header fields so named.
    pub fn contains(&self, name: &str) -> bool {
        self.len != 0 && Self::all(self.fields).any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// A parsed request head borrowing the read buffer (`'b`) and header storage (`'h`).
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'b, 'h> {
    /// The method token, case-sensitive.
    pub method: &'b str,
    /// The request target, origin-form, absolute-form `http://` or `*`.
    pub target: &'b str,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// All header fields, in order, values with surrounding whitespace trimmed.
    pub headers: &'h [Header<'b>],
    /// Bytes of the head including the final empty line; the body starts here.
    pub head_len: usize,
    /// The body framing; `None` when there is no Content-Length or Transfer-Encoding.
    pub body: BodyKind,
    /// Whether the connection may be reused: the version default, then
    /// `close` / `keep-alive` Connection tokens (`close` wins).
    pub keep_alive: bool,
    /// The Connection field has the `upgrade` token and an Upgrade field is present.
    pub upgrade: bool,
    /// `Expect: 100-continue` on HTTP/1.1 (ignored on HTTP/1.0 per RFC 9110 §10.1.1).
    pub expect_continue: bool,
    /// The Host value, syntax-checked; `None` only on HTTP/1.0 without Host.
    pub host: Option<&'b [u8]>,
    /// The Connection tokens, so the proxy can drop the fields they name.
    pub connection_tokens: ConnTokens<'b, 'h>,
}

/// A parsed response head borrowing the read buffer (`'b`) and header storage (`'h`).
#[derive(Clone, Copy, Debug)]
pub struct ResponseHead<'b, 'h> {
    /// The status code, 100..=999.
    pub status: u16,
    /// The reason phrase; empty when absent or not ASCII.
    pub reason: &'b str,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// All header fields, in order, values with surrounding whitespace trimmed.
    pub headers: &'h [Header<'b>],
    /// Bytes of the head including the final empty line; the body starts here.
    pub head_len: usize,
    /// The body framing, given the status and whether the request was HEAD.
    pub body: BodyKind,
    /// Whether the upstream connection may be reused; false for close-delimited bodies.
    pub keep_alive: bool,
    /// The Connection tokens, so the proxy can drop the fields they name.
    pub connection_tokens: ConnTokens<'b, 'h>,
}

/// The outcome of parsing a possibly incomplete head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The whole head was in the buffer.
    Complete(T),
    /// More bytes are needed; nothing in the buffer is wrong so far.
    Partial,
}

/// Parses a request head from the start of `buf`.
///
/// `headers` is caller storage of length `limits.max_headers` (a stack array
/// sliced to that length); a longer slice is cut to `max_headers`.
pub fn parse_request<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<Header<'b>>],
    limits: &Limits,
) -> Result<Parsed<RequestHead<'b, 'h>>, HeadError> {
    let n = limits.max_headers.min(headers.len());
    let storage = &mut headers[..n];
    let mut req = httparse::Request::new(&mut []);
    let status =
        match ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, storage) {
            Ok(s) => s,
            // The version is judged on the whole request line: `HTTP/1.2` or `HTTP/2.0` cut
            // before its line ends is not malformed yet.
            Err(httparse::Error::Version) if memchr::memchr2(b'\r', b'\n', buf).is_none() => {
                if buf.len() > limits.max_header_bytes {
                    return Err(HeadError::HeadTooLarge);
                }
                return Ok(Parsed::Partial);
            }
            Err(httparse::Error::Version) => return Err(classify_version(buf)),
            Err(e) => return Err(from_httparse(e)),
        };
    let head_len = match check_status(status, buf, limits)? {
        Some(len) => len,
        None => return Ok(Parsed::Partial),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed);
    };
    let headers: &'h [Header<'b>] = req.headers;
    check_target(method, target)?;
    let facts = Facts::scan(headers, Role::Request)?;
    let body = facts.body_framing(version)?;
    if version == 1 && facts.host.is_none() {
        return Err(HeadError::MissingHost);
    }
    Ok(Parsed::Complete(RequestHead {
        method,
        target,
        version,
        headers,
        head_len,
        body,
        keep_alive: facts.keep_alive(version),
        upgrade: facts.upgrade_field && facts.conn.contains("upgrade"),
        expect_continue: version == 1 && facts.expect_continue,
        host: facts.host,
        connection_tokens: facts.conn,
    }))
}

/// Parses a response head from the start of `buf`.
///
/// `request_method_head`: the request was HEAD; `status` 1xx/204/304 and HEAD
/// mean [`BodyKind::None`]; no Content-Length or Transfer-Encoding means
/// [`BodyKind::CloseDelimited`].
pub fn parse_response<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<Header<'b>>],
    limits: &Limits,
    request_method_head: bool,
) -> Result<Parsed<ResponseHead<'b, 'h>>, HeadError> {
    let n = limits.max_headers.min(headers.len());
    let storage = &mut headers[..n];
    let mut res = httparse::Response::new(&mut []);
    let status = ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, storage)
        .map_err(from_httparse)?;
    let head_len = match check_status(status, buf, limits)? {
        Some(len) => len,
        None => return Ok(Parsed::Partial),
    };
    let (Some(code), Some(version)) = (res.code, res.version) else {
        return Err(HeadError::Malformed);
    };
    if code < 100 {
        return Err(HeadError::InvalidStatus);
    }
    let reason = res.reason.unwrap_or("");
    let headers: &'h [Header<'b>] = res.headers;
    let facts = Facts::scan(headers, Role::Response)?;
    let framing = facts.body_framing(version)?;
    // RFC 9112 §6.3 items 1 and 3-7; 101 switches protocols and has no body either.
    let body = if request_method_head || (100..200).contains(&code) || code == 204 || code == 304 {
        BodyKind::None
    } else if framing == BodyKind::None {
        BodyKind::CloseDelimited
    } else {
        framing
    };
    Ok(Parsed::Complete(ResponseHead {
        status: code,
        reason,
        version,
        headers,
        head_len,
        body,
        keep_alive: facts.keep_alive(version) && body != BodyKind::CloseDelimited,
        connection_tokens: facts.conn,
    }))
}

/// True for the connection-specific fields a proxy must not forward
/// (RFC 9110 §7.6.1): Connection, Keep-Alive, Proxy-Connection, TE,
/// Transfer-Encoding, Upgrade.
///
/// Trailer and Proxy-Authenticate are end-to-end in RFC 9110 and stay; fields
/// named by Connection tokens are dropped separately via [`ConnTokens`].
pub fn is_hop_by_hop(name: &str) -> bool {
    const HOP_BY_HOP: [&str; 6] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ];
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Splits an absolute-form target `http://authority[/path]` into authority and
/// path (`"/"` when empty).
///
/// Only the `http` scheme (any case) is accepted; `None` for other schemes,
/// userinfo (`@`), an empty or invalid authority, or a query or fragment
/// directly after the authority (the path could not be rewritten without a copy).
pub fn split_absolute_form(target: &str) -> Option<(&str, &str)> {
    const SCHEME: &str = "http://";
    let scheme = target.get(..SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &target[SCHEME.len()..];
    let end = rest
        .bytes()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || !authority.bytes().all(is_authority_byte) {
        return None;
    }
    match path.as_bytes().first() {
        None => Some((authority, "/")),
        Some(b'/') => Some((authority, path)),
        Some(_) => None,
    }
}

/// Which side a head comes from; only requests carry Host and Expect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Request,
    Response,
}

/// What one pass over the header fields learned.
#[derive(Default)]
struct Facts<'b, 'h> {
    /// The single Content-Length value, if any.
    content_length: Option<u64>,
    /// A Transfer-Encoding field was present (and its list was exactly `chunked`).
    transfer_encoding: bool,
    /// The Host value (requests only).
    host: Option<&'b [u8]>,
    /// An Upgrade field was present.
    upgrade_field: bool,
    /// `Expect: 100-continue` was present (requests only).
    expect_continue: bool,
    /// All Connection tokens.
    conn: ConnTokens<'b, 'h>,
}

impl<'b, 'h> Facts<'b, 'h> {
    /// Checks every framing-relevant field in one pass.
    fn scan(headers: &'h [Header<'b>], role: Role) -> Result<Self, HeadError> {
        let mut facts = Facts::default();
        // The indexes of the first and last Connection fields, if any.
        let mut conn_fields: Option<(usize, usize)> = None;
        // Elements of the combined Transfer-Encoding list across all fields.
        let mut te_elements = 0usize;
        // How many of them are `chunked`, whether the last one is, and
        // whether another (well-formed) coding is in the list.
        let mut te_chunked = 0usize;
        let mut te_last_chunked = false;
        let mut te_other = false;
        for (i, h) in headers.iter().enumerate() {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                if facts.content_length.is_some() {
                    return Err(HeadError::DuplicateContentLength);
                }
                facts.content_length = Some(parse_content_length(h.value)?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                facts.transfer_encoding = true;
                for element in h.value.split(|&b| b == b',') {
                    te_elements += 1;
                    let coding = trim_ows(element);
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        te_chunked += 1;
                        te_last_chunked = true;
                    } else if !coding.is_empty() && coding.iter().all(|&b| is_token_byte(b)) {
                        te_other = true;
                        te_last_chunked = false;
                    } else {
                        return Err(HeadError::UnsupportedTransferEncoding);
                    }
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for element in h.value.split(|&b| b == b',') {
                    if !trim_ows(element).iter().all(|&b| is_token_byte(b)) {
                        return Err(HeadError::InvalidConnection);
                    }
                }
                conn_fields = Some((conn_fields.map_or(i, |(first, _)| first), i));
            } else if name.eq_ignore_ascii_case("upgrade") {
                facts.upgrade_field = true;
            } else if role == Role::Request && is_underscore_framing(name) {
                return Err(HeadError::UnderscoreFraming);
            } else if role == Role::Request && name.eq_ignore_ascii_case("host") {
                if facts.host.is_some() {
                    return Err(HeadError::DuplicateHost);
                }
                if !h.value.iter().all(|&b| is_authority_byte(b)) {
                    return Err(HeadError::InvalidHost);
                }
                facts.host = Some(h.value);
            } else if role == Role::Request && name.eq_ignore_ascii_case("expect") {
                facts.expect_continue |= h.value.eq_ignore_ascii_case(b"100-continue");
            }
        }
        if facts.transfer_encoding && (te_elements != 1 || te_chunked != 1) {
            // A coding list that ends in exactly one `chunked` is well framed
            // but asks for a coding Ringway does not implement: 501 (RFC 9112
            // §6.1). Anything else (chunked twice or not last) is bad framing.
            if te_other && te_chunked == 1 && te_last_chunked {
                return Err(HeadError::UnimplementedTransferCoding);
            }
            return Err(HeadError::UnsupportedTransferEncoding);
        }
        if let Some((first, last)) = conn_fields {
            facts.conn = ConnTokens::count(&headers[first..=last])?;
        }
        Ok(facts)
    }

    /// The framing the fields announce, before status-based rules.
    fn body_framing(&self, version: u8) -> Result<BodyKind, HeadError> {
        match (self.transfer_encoding, self.content_length) {
            (true, Some(_)) => Err(HeadError::ContentLengthWithTransferEncoding),
            // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
            (true, None) if version == 0 => Err(HeadError::TransferEncodingOnHttp10),
            (true, None) => Ok(BodyKind::Chunked),
            (false, Some(len)) => Ok(BodyKind::Length(len)),
            (false, None) => Ok(BodyKind::None),
        }
    }

    /// The version default for persistence, then the Connection tokens.
    fn keep_alive(&self, version: u8) -> bool {
        if self.conn.contains("close") {
            false
        } else {
            version == 1 || self.conn.contains("keep-alive")
        }
    }
}

/// Where the minor version digit of the request line is, when that line
/// ends in `HTTP/1.x` with `x` above 1: RFC 9112 §2.3 has a recipient treat a
/// higher minor version as the highest it implements, so the caller rewrites
/// that digit to `1` and parses again.
pub fn newer_minor_version(buf: &[u8]) -> Option<usize> {
    let line_end = memchr::memchr(b'\r', buf)?;
    let line = &buf[..line_end];
    let v = line.len().checked_sub(8)?;
    match &line[v..] {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', d] if (b'2'..=b'9').contains(d) => {
            Some(v + 7).filter(|_| line[..v].ends_with(b" "))
        }
        _ => None,
    }
}

/// httparse refused the version: `HTTP/d.d` with another major version is
/// 505 (RFC 9110 §15.6.6); anything else in that place is malformed.
fn classify_version(buf: &[u8]) -> HeadError {
    let line_end = memchr::memchr(b'\r', buf).unwrap_or(buf.len());
    let line = &buf[..line_end];
    match line.get(line.len().saturating_sub(9)..) {
        Some([b' ', b'H', b'T', b'T', b'P', b'/', major, b'.', minor])
            if major.is_ascii_digit() && minor.is_ascii_digit() && *major != b'1' =>
        {
            HeadError::VersionNotSupported
        }
        _ => HeadError::Malformed,
    }
}

/// Maps an httparse error: too many fields is 431, anything else is malformed.
fn from_httparse(err: httparse::Error) -> HeadError {
    match err {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        _ => HeadError::Malformed,
    }
}

/// Applies the size limit and line-ending checks; `Some(head_len)` when complete.
fn check_status(
    status: Status<usize>,
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<usize>, HeadError> {
    match status {
        Status::Complete(len) => {
            if len > limits.max_header_bytes {
                return Err(HeadError::HeadTooLarge);
            }
            check_line_endings(buf.get(..len).ok_or(HeadError::Malformed)?, true)?;
            Ok(Some(len))
        }
        Status::Partial => {
            if buf.len() > limits.max_header_bytes {
                return Err(HeadError::HeadTooLarge);
            }
            check_line_endings(buf, false)?;
            Ok(None)
        }
    }
}

/// Rejects LF without a preceding CR, and CR without a following LF (a CR at
/// the very end of an incomplete head may still get its LF).
fn check_line_endings(head: &[u8], complete: bool) -> Result<(), HeadError> {
    for i in memchr::memchr_iter(b'\n', head) {
        if i == 0 || head[i - 1] != b'\r' {
            return Err(HeadError::BareLineFeed);
        }
    }
    for i in memchr::memchr_iter(b'\r', head) {
        match head.get(i + 1) {
            Some(b'\n') => {}
            None if !complete => {}
            _ => return Err(HeadError::Malformed),
        }
    }
    Ok(())
}

/// Checks the request target form for the method (RFC 9112 §3.2).
fn check_target(method: &str, target: &str) -> Result<(), HeadError> {
    if method == "CONNECT" {
        return Err(HeadError::UnsupportedMethod);
    }
    match target.as_bytes() {
        [b'/', ..] => Ok(()),
        b"*" if method == "OPTIONS" => Ok(()),
        _ if split_absolute_form(target).is_some() => Ok(()),
        _ => Err(HeadError::InvalidTarget),
    }
}

/// True for `Content_Length` or `Transfer_Encoding` (any case): not framing
/// fields here, but CGI-style upstreams (WSGI, PHP) turn `_` into `-` and
/// would read one as framing, so a request carrying one is refused.
fn is_underscore_framing(name: &str) -> bool {
    name.contains('_')
        && (name.eq_ignore_ascii_case("content_length")
            || name.eq_ignore_ascii_case("transfer_encoding"))
}

/// Parses `1*DIGIT` without sign, whitespace, list or leading zeros into u64.
fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    match value {
        [] => Err(HeadError::InvalidContentLength),
        [b'0'] => Ok(0),
        [b'0', ..] => Err(HeadError::InvalidContentLength),
        digits => digits.iter().try_fold(0u64, |acc, &b| {
            if !b.is_ascii_digit() {
                return Err(HeadError::InvalidContentLength);
            }
            acc.checked_mul(10)
                .and_then(|acc| acc.checked_add(u64::from(b - b'0')))
                .ok_or(HeadError::InvalidContentLength)
        }),
    }
}

/// Trims optional whitespace (SP / HTAB) from both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `tchar` of RFC 9110 §5.6.2.
pub(crate) fn is_token_byte(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+'
        | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// Bytes of `uri-host [":" port]`: unreserved, pct-encoded, sub-delims, `:`, `[`, `]`.
fn is_authority_byte(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'-' | b'.' | b'_' | b'~' | b'%'
        | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
        | b':' | b'[' | b']')
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_header_bytes: 1024,
        max_headers: 16,
    };

    /// Storage for one parse: a stack array as the engine uses.
    fn storage<'b>() -> [MaybeUninit<Header<'b>>; 16] {
        [const { MaybeUninit::uninit() }; 16]
    }

    /// Parses a request that must be complete and valid, then runs `check` on it.
    fn req_ok(buf: &[u8], check: impl FnOnce(&RequestHead<'_, '_>)) {
        let mut h = storage();
        match parse_request(buf, &mut h, &LIMITS) {
            Ok(Parsed::Complete(head)) => check(&head),
            other => panic!("{:?}: expected complete, got {other:?}", show(buf)),
        }
    }

    /// Asserts that a request head is rejected with `want`.
    fn req_err(buf: &[u8], want: HeadError) {
        let mut h = storage();
        match parse_request(buf, &mut h, &LIMITS) {
            Err(got) => assert_eq!(got, want, "{:?}", show(buf)),
            Ok(other) => panic!("{:?}: expected {want:?}, got {other:?}", show(buf)),
        }
    }

    /// Asserts that a request head is incomplete.
    fn req_partial(buf: &[u8]) {
        let mut h = storage();
        match parse_request(buf, &mut h, &LIMITS) {
            Ok(Parsed::Partial) => {}
            other => panic!("{:?}: expected partial, got {other:?}", show(buf)),
        }
    }

    /// Parses a response that must be complete and valid, then runs `check` on it.
    fn res_ok(buf: &[u8], head_req: bool, check: impl FnOnce(&ResponseHead<'_, '_>)) {
        let mut h = storage();
        match parse_response(buf, &mut h, &LIMITS, head_req) {
            Ok(Parsed::Complete(head)) => check(&head),
            other => panic!("{:?}: expected complete, got {other:?}", show(buf)),
        }
    }

    /// Asserts that a response head is rejected with `want`.
    fn res_err(buf: &[u8], want: HeadError) {
        let mut h = storage();
        match parse_response(buf, &mut h, &LIMITS, false) {
            Err(got) => assert_eq!(got, want, "{:?}", show(buf)),
            Ok(other) => panic!("{:?}: expected {want:?}, got {other:?}", show(buf)),
        }
    }

    fn show(buf: &[u8]) -> String {
        String::from_utf8_lossy(buf).into_owned()
    }

    /// A valid HTTP/1.1 request with `extra` header lines (each ending in CRLF).
    fn req_with(extra: &str) -> Vec<u8> {
        format!("POST /up HTTP/1.1\r\nHost: a.example\r\n{extra}\r\n").into_bytes()
    }

    // Valid requests

    #[test]
    fn simple_get_is_parsed() {
        let buf = b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
        req_ok(buf, |r| {
            assert_eq!(r.method, "GET");
            assert_eq!(r.target, "/index.html?q=1");
            assert_eq!(r.version, 1);
            assert_eq!(r.headers.len(), 2);
            assert_eq!(r.head_len, buf.len());
            assert_eq!(r.body, BodyKind::None);
            assert!(r.keep_alive);
            assert!(!r.upgrade);
            assert!(!r.expect_continue);
            assert_eq!(r.host, Some(&b"example.com"[..]));
            assert!(r.connection_tokens.is_empty());
        });
    }

    #[test]
    fn head_len_excludes_pipelined_bytes() {
        let buf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n";
        req_ok(buf, |r| assert_eq!(r.head_len, 27));
    }

    #[test]
    fn post_with_content_length_has_length_body() {
        req_ok(&req_with("Content-Length: 42\r\n"), |r| {
            assert_eq!(r.body, BodyKind::Length(42))
        });
        req_ok(&req_with("Content-Length: 0\r\n"), |r| {
            assert_eq!(r.body, BodyKind::Length(0))
        });
        req_ok(&req_with("content-length: 18446744073709551615\r\n"), |r| {
            assert_eq!(r.body, BodyKind::Length(u64::MAX))
        });
    }

    #[test]
    fn chunked_request_is_case_insensitive_with_ows() {
        req_ok(&req_with("Transfer-Encoding: chunked\r\n"), |r| {
            assert_eq!(r.body, BodyKind::Chunked)
        });
        req_ok(&req_with("transfer-encoding:   ChUnKeD  \r\n"), |r| {
            assert_eq!(r.body, BodyKind::Chunked)
        });
    }

    #[test]
    fn absolute_form_target_is_accepted_and_split() {
        req_ok(
            b"GET http://api.example:8080/v1/x?y HTTP/1.1\r\nHost: other\r\n\r\n",
            |r| {
                assert_eq!(
                    split_absolute_form(r.target),
                    Some(("api.example:8080", "/v1/x?y"))
                )
            },
        );
        assert_eq!(split_absolute_form("HTTP://h"), Some(("h", "/")));
        assert_eq!(
            split_absolute_form("http://[::1]:80/"),
            Some(("[::1]:80", "/"))
        );
        assert_eq!(split_absolute_form("http://"), None);
        assert_eq!(split_absolute_form("http://u@h/"), None);
        assert_eq!(split_absolute_form("https://h/"), None);
        assert_eq!(split_absolute_form("http://h?q"), None);
        assert_eq!(split_absolute_form("/p"), None);
    }

    #[test]
    fn asterisk_target_is_only_for_options() {
        req_ok(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", |r| {
            assert_eq!(r.target, "*")
        });
        req_err(
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::InvalidTarget,
        );
    }

    #[test]
    fn http10_defaults_to_close_and_may_omit_host() {
        req_ok(b"GET / HTTP/1.0\r\n\r\n", |r| {
            assert_eq!(r.version, 0);
            assert!(!r.keep_alive);
            assert_eq!(r.host, None);
        });
    }

    #[test]
    fn http10_keep_alive_token_enables_reuse() {
        req_ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", |r| {
            assert!(r.keep_alive);
            assert!(r.connection_tokens.contains("keep-alive"));
        });
    }

    #[test]
    fn close_token_disables_reuse_on_http11() {
        req_ok(&req_with("Connection: keep-alive, close\r\n"), |r| {
            assert!(!r.keep_alive)
        });
    }

    #[test]
    fn connection_tokens_are_collected_across_fields() {
        req_ok(
            &req_with("Connection: X-Foo, ,x-bar\r\nConnection: x-foo\r\nX-Foo: 1\r\n"),
            |r| {
                let tokens: Vec<&[u8]> = r.connection_tokens.iter().collect();
                assert_eq!(tokens, [&b"X-Foo"[..], &b"x-bar"[..]]);
                assert!(r.connection_tokens.contains("x-foo"));
            },
        );
    }

    #[test]
    fn upgrade_needs_token_and_field() {
        req_ok(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            |r| assert!(r.upgrade),
        );
        req_ok(&req_with("Upgrade: websocket\r\n"), |r| assert!(!r.upgrade));
        req_ok(&req_with("Connection: upgrade\r\n"), |r| {
            assert!(!r.upgrade)
        });
    }

    #[test]
    fn expect_continue_is_case_insensitive_and_ignored_on_http10() {
        req_ok(&req_with("Expect: 100-Continue\r\n"), |r| {
            assert!(r.expect_continue)
        });
        req_ok(
            b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            |r| assert!(!r.expect_continue),
        );
    }

    #[test]
    fn leading_empty_line_is_skipped() {
        req_ok(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", |r| {
            assert_eq!(r.head_len, 29)
        });
    }

    #[test]
    fn hop_by_hop_fields_follow_rfc9110() {
        for name in [
            "Connection",
            "keep-alive",
            "Proxy-Connection",
            "TE",
            "transfer-encoding",
            "UPGRADE",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["Trailer", "Proxy-Authenticate", "Host", "Content-Length"] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    // Partial heads

    #[test]
    fn partial_heads_return_partial() {
        req_partial(b"");
        req_partial(b"GE");
        req_partial(b"GET / HTTP/1.1\r");
        req_partial(b"GET / HTTP/1.1\r\nHost: a\r\n");
        req_partial(b"GET / HTTP/1.1\r\nHost: a\r\n\r");
    }

    #[test]
    fn partial_head_over_the_limit_is_too_large() {
        let mut buf = b"GET / HTTP/1.1\r\nX: ".to_vec();
        buf.resize(LIMITS.max_header_bytes + 1, b'a');
        req_err(&buf, HeadError::HeadTooLarge);
    }

    #[test]
    fn complete_head_over_the_limit_is_too_large() {
        let long = "a".repeat(LIMITS.max_header_bytes);
        req_err(
            &req_with(&format!("X-Long: {long}\r\n")),
            HeadError::HeadTooLarge,
        );
    }

    #[test]
    fn too_many_headers_is_rejected() {
        req_err(&req_with(&"X: 1\r\n".repeat(16)), HeadError::TooManyHeaders);
        assert_eq!(HeadError::TooManyHeaders.status(), 431);
    }

    // Line endings and bytes that must not appear

    #[test]
    fn lf_only_line_endings_are_rejected() {
        req_err(b"GET / HTTP/1.1\nHost: a\n\n", HeadError::BareLineFeed);
        req_err(b"GET / HTTP/1.1\r\nHost: a\n\r\n", HeadError::BareLineFeed);
        req_err(b"GET / HTTP/1.1\r\nHost: a\r\n\n", HeadError::BareLineFeed);
        // Rejected before the head is complete.
        req_err(b"GET / HTTP/1.1\nHo", HeadError::BareLineFeed);
    }

    #[test]
    fn bare_cr_is_rejected() {
        req_err(b"GET / HTTP/1.1\rHost: a\r\n\r\n", HeadError::Malformed);
        req_err(
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            HeadError::Malformed,
        );
        req_err(b"GET / HTTP/1.1\r\nHost: a\r\n\rX", HeadError::Malformed);
    }

    #[test]
    fn nul_in_header_value_is_rejected() {
        req_err(&req_with("X-A: a\0b\r\n"), HeadError::Malformed);
    }

    #[test]
    fn obs_fold_is_rejected() {
        req_err(&req_with("X-A: a\r\n\tb\r\n"), HeadError::Malformed);
        req_err(&req_with("X-A: a\r\n b\r\n"), HeadError::Malformed);
    }

    #[test]
    fn tab_prefixed_transfer_encoding_continuation_is_rejected() {
        req_err(
            &req_with("X-A: a\r\n\tTransfer-Encoding: chunked\r\n"),
            HeadError::Malformed,
        );
    }

    #[test]
    fn space_before_colon_is_rejected() {
        req_err(
            &req_with("Transfer-Encoding : chunked\r\n"),
            HeadError::Malformed,
        );
    }

    #[test]
    fn empty_or_invalid_header_name_is_rejected() {
        req_err(&req_with(": value\r\n"), HeadError::Malformed);
        req_err(&req_with("X(A): 1\r\n"), HeadError::Malformed);
    }

    #[test]
    fn bad_request_line_is_rejected() {
        req_err(
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            HeadError::VersionNotSupported,
        );
        req_err(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", HeadError::Malformed);
        req_err(b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", HeadError::Malformed);
    }

    // Content-Length

    #[test]
    fn content_length_with_sign_is_rejected() {
        req_err(
            &req_with("Content-Length: +5\r\n"),
            HeadError::InvalidContentLength,
        );
        req_err(
            &req_with("Content-Length: -5\r\n"),
            HeadError::InvalidContentLength,
        );
    }

    #[test]
    fn content_length_with_leading_zero_is_rejected() {
        req_err(
            &req_with("Content-Length: 05\r\n"),
            HeadError::InvalidContentLength,
        );
        req_err(
            &req_with("Content-Length: 00\r\n"),
            HeadError::InvalidContentLength,
        );
    }

    #[test]
    fn content_length_list_is_rejected() {
        req_err(
            &req_with("Content-Length: 5, 5\r\n"),
            HeadError::InvalidContentLength,
        );
        req_err(
            &req_with("Content-Length: 5 5\r\n"),
            HeadError::InvalidContentLength,
        );
    }

    #[test]
    fn content_length_empty_hex_or_overflowing_is_rejected() {
        req_err(
            &req_with("Content-Length:\r\n"),
            HeadError::InvalidContentLength,
        );
        req_err(
            &req_with("Content-Length: 0x5\r\n"),
            HeadError::InvalidContentLength,
        );
        req_err(
            &req_with("Content-Length: 18446744073709551616\r\n"),
            HeadError::InvalidContentLength,
        );
    }

    #[test]
    fn two_content_lengths_are_rejected_even_if_equal() {
        req_err(
            &req_with("Content-Length: 5\r\ncontent-length: 5\r\n"),
            HeadError::DuplicateContentLength,
        );
    }

    #[test]
    fn content_length_with_transfer_encoding_is_rejected() {
        req_err(
            &req_with("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
            HeadError::ContentLengthWithTransferEncoding,
        );
        req_err(
            &req_with("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
            HeadError::ContentLengthWithTransferEncoding,
        );
    }

    // Transfer-Encoding

    #[test]
    fn transfer_encoding_other_than_chunked_is_rejected() {
        for te in [
            "xchunked",
            "chunked, identity",
            "identity",
            "",
            "chunked,",
            "chunked;q=1",
            "\"chunked\"",
        ] {
            req_err(
                &req_with(&format!("Transfer-Encoding: {te}\r\n")),
                HeadError::UnsupportedTransferEncoding,
            );
        }
    }

    #[test]
    fn an_unimplemented_coding_before_chunked_is_501() {
        for te in ["gzip, chunked", "deflate , chunked", "identity, chunked"] {
            req_err(
                &req_with(&format!("Transfer-Encoding: {te}\r\n")),
                HeadError::UnimplementedTransferCoding,
            );
        }
        req_err(
            &req_with("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
            HeadError::UnimplementedTransferCoding,
        );
        assert_eq!(HeadError::UnimplementedTransferCoding.status(), 501);
        // Chunked twice, or not last, is bad framing whatever else is listed.
        for te in [
            "chunked, gzip",
            "gzip, chunked, chunked",
            "gzip, \"x\", chunked",
        ] {
            req_err(
                &req_with(&format!("Transfer-Encoding: {te}\r\n")),
                HeadError::UnsupportedTransferEncoding,
            );
        }
    }

    #[test]
    fn higher_minor_versions_are_found_for_rewriting() {
        let raw = b"GET /test HTTP/1.2\r\nHost: a\r\n\r\n";
        req_err(raw, HeadError::Malformed);
        let at = newer_minor_version(raw).expect("minor version found");
        let mut fixed = raw.to_vec();
        fixed[at] = b'1';
        req_ok(&fixed, |r| assert_eq!(r.version, 1));
        assert_eq!(newer_minor_version(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(newer_minor_version(b"GET / HTTP/1.9"), None);
        assert_eq!(newer_minor_version(b"GET / XHTTP/1.2\r\n"), None);
    }

    #[test]
    fn a_version_cut_before_its_line_ends_waits_for_more() {
        let limits = Limits::default();
        for cut in [
            &b"GET /test HTTP/1.2"[..],
            b"GET / HTTP/2",
            b"GET / HTTP/2.0",
        ] {
            let mut storage = [const { MaybeUninit::<Header<'_>>::uninit() }; 16];
            match parse_request(cut, &mut storage, &limits) {
                Ok(Parsed::Partial) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(cut)),
            }
        }
    }

    #[test]
    fn other_major_versions_are_505() {
        for raw in [
            &b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
            b"GET / HTTP/3.0\r\n",
        ] {
            req_err(raw, HeadError::VersionNotSupported);
        }
        assert_eq!(HeadError::VersionNotSupported.status(), 505);
        req_err(b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", HeadError::Malformed);
        req_err(b"GET / HTTP/1.x\r\nHost: a\r\n\r\n", HeadError::Malformed);
    }

    #[test]
    fn two_transfer_encoding_fields_are_rejected() {
        req_err(
            &req_with("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
            HeadError::UnsupportedTransferEncoding,
        );
    }

    #[test]
    fn transfer_encoding_on_http10_is_rejected() {
        req_err(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::TransferEncodingOnHttp10,
        );
    }

    // Host

    #[test]
    fn http11_without_host_is_rejected() {
        req_err(
            b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
            HeadError::MissingHost,
        );
    }

    #[test]
    fn duplicate_host_is_rejected() {
        req_err(&req_with("Host: b.example\r\n"), HeadError::DuplicateHost);
    }

    #[test]
    fn host_with_invalid_bytes_is_rejected() {
        req_err(
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            HeadError::InvalidHost,
        );
        req_err(
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            HeadError::InvalidHost,
        );
    }

    // Targets and methods

    #[test]
    fn connect_is_not_implemented() {
        req_err(
            b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
            HeadError::UnsupportedMethod,
        );
        assert_eq!(HeadError::UnsupportedMethod.status(), 501);
    }

    #[test]
    fn authority_form_without_connect_is_rejected() {
        req_err(
            b"GET a.example:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::InvalidTarget,
        );
        req_err(
            b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::InvalidTarget,
        );
    }

    #[test]
    fn framing_fields_spelled_with_underscores_are_rejected_in_requests() {
        for field in [
            "Transfer_Encoding: chunked\r\n",
            "content_length: 5\r\n",
            "CONTENT_LENGTH: 5\r\n",
        ] {
            req_err(&req_with(field), HeadError::UnderscoreFraming);
        }
        assert_eq!(HeadError::UnderscoreFraming.status(), 400);
        // Other names with underscores are ordinary fields.
        req_ok(&req_with("X_Request_Id: 1\r\n"), |_| {});
    }

    // Connection

    #[test]
    fn too_many_connection_tokens_are_rejected() {
        let nine = "Connection: a, b, c, d, e, f, g, h, i\r\n";
        req_ok(&req_with(nine), |r| {
            assert_eq!(r.connection_tokens.len(), 9)
        });
        let list: Vec<String> = (0..=MAX_CONNECTION_TOKENS)
            .map(|i| format!("t{i}"))
            .collect();
        req_err(
            &req_with(&format!("Connection: {}\r\n", list.join(", "))),
            HeadError::TooManyConnectionTokens,
        );
        let fits = &list[..MAX_CONNECTION_TOKENS];
        req_ok(
            &req_with(&format!("Connection: {}\r\n", fits.join(","))),
            |r| assert_eq!(r.connection_tokens.len(), MAX_CONNECTION_TOKENS),
        );
        // Duplicates do not count.
        req_ok(
            &req_with("Connection: a, a, a, a, a, a, a, a, a, A\r\n"),
            |r| assert_eq!(r.connection_tokens.len(), 1),
        );
    }

    #[test]
    fn non_token_connection_element_is_rejected() {
        req_err(
            &req_with("Connection: keep alive\r\n"),
            HeadError::InvalidConnection,
        );
    }

    // Responses

    #[test]
    fn response_with_content_length_is_parsed() {
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        res_ok(buf, false, |r| {
            assert_eq!(r.status, 200);
            assert_eq!(r.reason, "OK");
            assert_eq!(r.version, 1);
            assert_eq!(r.head_len, buf.len() - 3);
            assert_eq!(r.body, BodyKind::Length(3));
            assert!(r.keep_alive);
        });
    }

    #[test]
    fn response_without_framing_is_close_delimited() {
        res_ok(b"HTTP/1.1 200 OK\r\n\r\n", false, |r| {
            assert_eq!(r.body, BodyKind::CloseDelimited);
            assert!(!r.keep_alive);
        });
    }

    #[test]
    fn chunked_response_is_parsed() {
        res_ok(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            |r| assert_eq!(r.body, BodyKind::Chunked),
        );
    }

    #[test]
    fn bodiless_statuses_and_head_have_no_body() {
        for status in [
            "100 Continue",
            "101 Switching Protocols",
            "204 No Content",
            "304 Not Modified",
        ] {
            let buf = format!("HTTP/1.1 {status}\r\nContent-Length: 10\r\n\r\n");
            res_ok(buf.as_bytes(), false, |r| {
                assert_eq!(r.body, BodyKind::None)
            });
        }
        res_ok(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            true,
            |r| assert_eq!(r.body, BodyKind::None),
        );
    }

    #[test]
    fn http10_response_keep_alive_follows_tokens() {
        res_ok(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
            |r| assert!(r.keep_alive),
        );
        res_ok(
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            false,
            |r| assert!(!r.keep_alive),
        );
    }

    #[test]
    fn response_framing_errors_are_rejected() {
        res_err(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            HeadError::DuplicateContentLength,
        );
        res_err(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::ContentLengthWithTransferEncoding,
        );
        res_err(
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            HeadError::InvalidContentLength,
        );
        res_err(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            HeadError::UnsupportedTransferEncoding,
        );
        res_err(
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::TransferEncodingOnHttp10,
        );
    }

    #[test]
    fn response_status_below_100_is_rejected() {
        res_err(b"HTTP/1.1 099 Odd\r\n\r\n", HeadError::InvalidStatus);
        res_err(b"HTTP/1.1 20 OK\r\n\r\n", HeadError::Malformed);
        res_ok(b"HTTP/1.1 999 Odd\r\n\r\n", false, |r| {
            assert_eq!(r.status, 999)
        });
    }

    #[test]
    fn response_lf_only_line_endings_are_rejected() {
        res_err(
            b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
            HeadError::BareLineFeed,
        );
    }

    #[test]
    fn partial_response_returns_partial() {
        let mut h = storage();
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-", &mut h, &LIMITS, false),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn errors_have_status_and_message() {
        assert_eq!(HeadError::Malformed.status(), 400);
        assert_eq!(HeadError::HeadTooLarge.status(), 431);
        assert_eq!(
            HeadError::MissingHost.to_string(),
            HeadError::MissingHost.message()
        );
    }
}
