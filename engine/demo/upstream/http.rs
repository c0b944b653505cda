//! HTTP/1.1 for the demo upstream: one request at a time off a blocking socket (the head parsed
//! by httparse, a Content-Length or chunked body, every size bounded), and responses written
//! whole or as an event stream.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use httparse::Status;

/// Request bodies above this are refused with 413 (read incrementally, never buffered past it).
pub const MAX_BODY: usize = 16 << 20;
/// Request heads (and trailer sections) above this are refused with 431.
pub const MAX_HEAD: usize = 64 << 10;
/// Header fields in one head or trailer section; httparse needs the room up front.
const MAX_HEADERS: usize = 128;
/// A chunk-size line longer than this is malformed (400).
const MAX_CHUNK_LINE: usize = 4096;
/// Reads time out this often so connection threads notice the stop flag promptly.
const POLL: Duration = Duration::from_millis(200);
/// A connection that makes no read progress for this long is closed (idle keep-alive included).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After an error that leaves unread request bytes, drain them this long before closing, so the
/// kernel does not answer them with a RST that could destroy our error response in flight.
const LINGER: Duration = Duration::from_secs(2);
/// One socket read; also the size of the discard buffer.
const READ_SIZE: usize = 64 * 1024;

/// An HTTP error found while reading a request; the connection is closed after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpError {
    /// The status to answer.
    pub status: u16,
    /// Human-readable, for the error body's `message`.
    pub message: &'static str,
    /// Machine-readable, for the error body's `code`.
    pub code: &'static str,
}

const fn http_err(status: u16, message: &'static str, code: &'static str) -> HttpError {
    HttpError {
        status,
        message,
        code,
    }
}

const fn bad(message: &'static str) -> HttpError {
    http_err(400, message, "bad_request")
}

const BAD_CHUNK: HttpError = http_err(400, "malformed chunked request body", "bad_chunk");
const HEAD_TOO_LARGE: HttpError =
    http_err(431, "request header fields too large", "header_too_large");
const BODY_TOO_LARGE: HttpError = http_err(413, "request body exceeds 16 MiB", "request_too_large");

/// Why a request could not be read.
pub enum ConnError {
    /// Answer with this error, then close.
    Http(HttpError),
    /// The peer went away or timed out: just close.
    Gone,
}

impl From<HttpError> for ConnError {
    fn from(e: HttpError) -> Self {
        ConnError::Http(e)
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// What a response must say about the connection, from the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnMode {
    /// The connection stays open after this response.
    pub keep_alive: bool,
    /// The client spoke HTTP/1.0: no chunked encoding, and keep-alive must be announced.
    pub http10: bool,
}

impl ConnMode {
    /// For answers to requests that could not be read: close afterwards.
    pub const CLOSE: ConnMode = ConnMode {
        keep_alive: false,
        http10: false,
    };
}

/// What happens to the connection once a response is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    KeepAlive,
    /// Send FIN and close.
    Close,
    /// Drop the socket as it is: a fault already decided how the connection ends.
    Abandon,
}

/// One parsed request head.
#[derive(Debug)]
pub struct Request {
    /// The method, as sent.
    pub method: String,
    /// The target without its query string.
    pub path: String,
    /// How the response must treat the connection.
    pub mode: ConnMode,
    /// The client waits for `100 Continue` before sending the body.
    expect_continue: bool,
    framing: Framing,
    /// Every header, name lowercased, so handlers can read the ones they care about.
    headers: Vec<(String, Vec<u8>)>,
}

impl Request {
    /// The first value of header `name` (lowercase), if the request has it.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` while it is incomplete, else the
/// request and the head's length.
fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut storage);
    let len = match parsed.parse(buf) {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return Ok(None),
        Err(e) => return Err(head_error(e)),
    };
    if len > MAX_HEAD {
        return Err(HEAD_TOO_LARGE);
    }
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(bad("malformed request line"));
    };
    let http10 = version == 0;
    let mut content_length: Option<usize> = None;
    let mut transfer_encoding: Option<String> = None;
    let (mut conn_close, mut conn_keep_alive, mut expect_continue) = (false, false, false);
    let mut headers = Vec::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        // Values we act on must be text; others are kept as bytes and never interpreted here.
        let text = std::str::from_utf8(h.value);
        match name.as_str() {
            "content-length" => {
                let text = text.map_err(|_| bad("invalid Content-Length"))?;
                // A list such as "5, 5" is allowed only if every element agrees (RFC 9110 §8.6).
                for v in text.split(',') {
                    let n = parse_length(v.trim())?;
                    if content_length.is_some_and(|c| c != n) {
                        return Err(bad("conflicting Content-Length headers"));
                    }
                    content_length = Some(n);
                }
            }
            "transfer-encoding" => {
                let text = text.map_err(|_| bad("unsupported Transfer-Encoding (only chunked)"))?;
                let te = transfer_encoding.get_or_insert_with(String::new);
                if !te.is_empty() {
                    te.push(',');
                }
                te.push_str(text);
            }
            "connection" => {
                for tok in text.unwrap_or("").split(',').map(str::trim) {
                    conn_close |= tok.eq_ignore_ascii_case("close");
                    conn_keep_alive |= tok.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" => {
                expect_continue = text.is_ok_and(|t| t.eq_ignore_ascii_case("100-continue"))
            }
            _ => {}
        }
        headers.push((name, h.value.to_vec()));
    }
    let framing = match (transfer_encoding, content_length) {
        // Both at once is the classic smuggling ambiguity: refuse rather than guess.
        (Some(_), Some(_)) => return Err(bad("both Content-Length and Transfer-Encoding")),
        (Some(te), None) if http10 || !te.trim().eq_ignore_ascii_case("chunked") => {
            return Err(bad("unsupported Transfer-Encoding (only chunked)"));
        }
        (Some(_), None) => Framing::Chunked,
        (None, Some(n)) if n > MAX_BODY => return Err(BODY_TOO_LARGE),
        (None, Some(0) | None) => Framing::None,
        (None, Some(n)) => Framing::Length(n),
    };
    let keep_alive = if http10 {
        conn_keep_alive && !conn_close
    } else {
        !conn_close
    };
    let request = Request {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or("").to_string(),
        mode: ConnMode { keep_alive, http10 },
        // HTTP/1.0 has no interim responses.
        expect_continue: expect_continue && !http10,
        framing,
        headers,
    };
    Ok(Some((request, len)))
}

/// One Content-Length element: digits only; a value past `usize` counts as too large.
fn parse_length(v: &str) -> Result<usize, HttpError> {
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("invalid Content-Length"));
    }
    let n: u64 = v.parse().map_err(|_| bad("invalid Content-Length"))?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// The answer to a head httparse refused.
fn head_error(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::Version => http_err(505, "HTTP version not supported", "bad_version"),
        httparse::Error::TooManyHeaders => HEAD_TOO_LARGE,
        // A line starting with whitespace (obs-fold, an old smuggling vector, RFC 9112 §5.2)
        // lands here too: httparse takes it for a header name.
        httparse::Error::HeaderName => bad("malformed header line"),
        httparse::Error::HeaderValue => bad("malformed header value"),
        _ => bad("malformed request line"),
    }
}

/// The read side of one connection: a buffer of bytes read but not yet consumed.
pub struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Set when the server stops; every wait on the socket checks it.
    stop: &'a AtomicBool,
}

enum ReadOutcome {
    Data,
    Eof,
}

impl<'a> Conn<'a> {
    /// Wraps an accepted socket, with short read timeouts so waits can notice `stop`.
    pub fn new(stream: TcpStream, stop: &'a AtomicBool) -> io::Result<Conn<'a>> {
        // Nagle would merge our small SSE chunks and hide the streaming the demo is meant to show.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(POLL))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            stop,
        })
    }

    /// The socket, for writing a response.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Reads one whole request. `Ok(None)`: the peer closed (or went quiet) between requests,
    /// or left mid-head, where there is nobody to answer.
    pub fn read_request(&mut self) -> Result<Option<(Request, Vec<u8>)>, ConnError> {
        let Some(req) = self.read_head()? else {
            return Ok(None);
        };
        let body = self.read_body(&req)?;
        Ok(Some((req, body)))
    }

    /// Answers an error for a request we could not read whole, then closes with a short linger.
    pub fn fail_and_close(mut self, answer: &Response) {
        if answer.write(&mut self.stream, ConnMode::CLOSE).is_err() {
            return;
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        self.discard_until_eof(LINGER);
    }

    /// Reads and throws away what the peer sends until it closes, `limit` passes or the server
    /// stops.
    pub fn discard_until_eof(&mut self, limit: Duration) {
        self.buf.clear();
        let deadline = Instant::now() + limit;
        let mut sink = [0u8; READ_SIZE];
        while Instant::now() < deadline && !self.stop.load(Ordering::SeqCst) {
            match self.stream.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if is_retry(&e) => {}
                Err(_) => return,
            }
        }
    }

    /// Reads more bytes into `buf`. Times out after `IDLE_TIMEOUT` without progress and gives
    /// up early when the server is stopping.
    fn fill(&mut self) -> io::Result<ReadOutcome> {
        let started = Instant::now();
        let mut tmp = [0u8; READ_SIZE];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(tmp.get(..n).unwrap_or_default());
                    return Ok(ReadOutcome::Data);
                }
                Err(e) if is_retry(&e) => {
                    if self.stop.load(Ordering::SeqCst) || started.elapsed() >= IDLE_TIMEOUT {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "idle"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `fill`, for places inside a request where any end of input means the peer is gone.
    fn fill_or_gone(&mut self) -> Result<(), ConnError> {
        match self.fill() {
            Ok(ReadOutcome::Data) => Ok(()),
            Ok(ReadOutcome::Eof) | Err(_) => Err(ConnError::Gone),
        }
    }

    fn read_head(&mut self) -> Result<Option<Request>, ConnError> {
        loop {
            if let Some((req, len)) = parse_head(&self.buf)? {
                self.buf.drain(..len);
                return Ok(Some(req));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(HEAD_TOO_LARGE.into());
            }
            match self.fill() {
                Ok(ReadOutcome::Data) => {}
                Ok(ReadOutcome::Eof) | Err(_) => return Ok(None),
            }
        }
    }

    /// Reads the whole request body into memory, incrementally, refusing it past `MAX_BODY`.
    fn read_body(&mut self, req: &Request) -> Result<Vec<u8>, ConnError> {
        if req.expect_continue && req.framing != Framing::None {
            // curl waits a second for this before sending a large body.
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|_| ConnError::Gone)?;
        }
        let mut body = Vec::new();
        match req.framing {
            Framing::None => {}
            Framing::Length(n) => {
                body.reserve(n.min(1 << 20));
                self.take_into(n, &mut body)?;
            }
            Framing::Chunked => loop {
                let size = self.chunk_size()?;
                if size == 0 {
                    self.skip_trailers()?;
                    break;
                }
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if body.len().saturating_add(size) > MAX_BODY {
                    return Err(BODY_TOO_LARGE.into());
                }
                self.take_into(size, &mut body)?;
                self.expect_crlf()?;
            },
        }
        Ok(body)
    }

    /// Moves exactly `n` bytes from the connection into `out`.
    fn take_into(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), ConnError> {
        loop {
            let take = n.min(self.buf.len());
            out.extend(self.buf.drain(..take));
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.fill_or_gone()?;
        }
    }

    /// Reads one chunk-size line (extensions ignored) and returns the size.
    fn chunk_size(&mut self) -> Result<u64, ConnError> {
        loop {
            // httparse reads an empty size line as 0; a size needs at least one digit.
            if self.buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                return Err(BAD_CHUNK.into());
            }
            match httparse::parse_chunk_size(&self.buf) {
                Ok(Status::Complete((used, size))) => {
                    self.buf.drain(..used);
                    return Ok(size);
                }
                Ok(Status::Partial) if self.buf.len() > MAX_CHUNK_LINE => {
                    return Err(BAD_CHUNK.into())
                }
                Ok(Status::Partial) => self.fill_or_gone()?,
                Err(_) => return Err(BAD_CHUNK.into()),
            }
        }
    }

    /// Consumes the trailer section after the last chunk (trailers are ignored), bounded like a
    /// head.
    fn skip_trailers(&mut self) -> Result<(), ConnError> {
        loop {
            let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(&self.buf, &mut storage) {
                Ok(Status::Complete((used, _))) => {
                    self.buf.drain(..used);
                    return Ok(());
                }
                Ok(Status::Partial) if self.buf.len() > MAX_HEAD => {
                    return Err(
                        http_err(431, "request trailers too large", "header_too_large").into(),
                    )
                }
                Ok(Status::Partial) => self.fill_or_gone()?,
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(
                        http_err(431, "request trailers too large", "header_too_large").into(),
                    )
                }
                Err(_) => return Err(BAD_CHUNK.into()),
            }
        }
    }

    /// Consumes the CRLF that ends a chunk's data.
    fn expect_crlf(&mut self) -> Result<(), ConnError> {
        while self.buf.len() < 2 {
            self.fill_or_gone()?;
        }
        if !self.buf.starts_with(b"\r\n") {
            return Err(BAD_CHUNK.into());
        }
        self.buf.drain(..2);
        Ok(())
    }
}

/// Read errors that only mean "nothing yet": the poll timeout, or a signal.
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A whole response, sent with Content-Length in one write (head and body together).
pub struct Response {
    status: u16,
    content_type: &'static str,
    /// Extra header lines, e.g. `retry-after` on a 429.
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
}

impl Response {
    /// A JSON response with `value` serialized as the body.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> io::Result<Response> {
        Ok(Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: serde_json::to_vec(value).map_err(io::Error::other)?,
        })
    }

    /// A plain-text response.
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain",
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    /// The same response with one more header line.
    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Response {
        self.headers.push((name, value));
        self
    }

    /// Writes the response; says whether the connection may carry another request.
    pub fn write(&self, w: &mut impl Write, mode: ConnMode) -> io::Result<After> {
        let conn = match (mode.keep_alive, mode.http10) {
            (false, _) => "Connection: close\r\n",
            (true, true) => "Connection: keep-alive\r\n",
            (true, false) => "",
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: ringway-demo\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            crate::proxy::error::reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(conn);
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        w.write_all(&out)?;
        Ok(if mode.keep_alive {
            After::KeepAlive
        } else {
            After::Close
        })
    }
}

/// A streamed (`text/event-stream`) response: chunked on HTTP/1.1, close-delimited on 1.0
/// (which has no chunked encoding). Every `frame` goes out as its own chunk.
pub struct EventStream<'a, W: Write> {
    w: &'a mut W,
    chunked: bool,
    keep_alive: bool,
}

impl<'a, W: Write> EventStream<'a, W> {
    /// Writes the response head.
    pub fn start(w: &'a mut W, mode: ConnMode) -> io::Result<Self> {
        let chunked = !mode.http10;
        let framing = if chunked {
            "Transfer-Encoding: chunked\r\n"
        } else {
            "Connection: close\r\n"
        };
        let conn = if chunked && !mode.keep_alive {
            "Connection: close\r\n"
        } else {
            ""
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: ringway-demo\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{framing}{conn}\r\n"
        );
        w.write_all(head.as_bytes())?;
        Ok(EventStream {
            w,
            chunked,
            keep_alive: chunked && mode.keep_alive,
        })
    }

    /// Sends one SSE frame (already terminated by its blank line).
    pub fn frame(&mut self, data: &str) -> io::Result<()> {
        if self.chunked {
            let mut out = format!("{:x}\r\n", data.len()).into_bytes();
            out.extend_from_slice(data.as_bytes());
            out.extend_from_slice(b"\r\n");
            self.w.write_all(&out)
        } else {
            self.w.write_all(data.as_bytes())
        }
    }

    /// Ends the stream; a close-delimited one ends only when the connection closes.
    pub fn finish(self) -> io::Result<After> {
        if self.chunked {
            self.w.write_all(b"0\r\n\r\n")?;
        }
        Ok(if self.keep_alive {
            After::KeepAlive
        } else {
            After::Close
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<(Request, usize)>, HttpError> {
        parse_head(raw.as_bytes())
    }

    fn status_of(raw: &str) -> u16 {
        match head(raw) {
            Err(e) => e.status,
            Ok(Some(_)) => 200,
            Ok(None) => 0,
        }
    }

    #[test]
    fn head_parses_framing_keep_alive_and_headers() {
        let raw =
            "POST /v1/x?q=1 HTTP/1.1\r\nContent-Length: 5, 5\r\nX-Demo-Fail: 503\r\n\r\nhello";
        let (r, len) = head(raw).ok().flatten().unwrap();
        assert_eq!(
            len,
            raw.len() - "hello".len(),
            "the body is left in the buffer"
        );
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/x"));
        assert_eq!(r.framing, Framing::Length(5));
        assert!(r.mode.keep_alive && !r.mode.http10);
        assert_eq!(r.header("x-demo-fail"), Some(&b"503"[..]));
        let (r, _) = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .ok()
            .flatten()
            .unwrap();
        assert_eq!(
            r.mode,
            ConnMode {
                keep_alive: true,
                http10: true
            }
        );
        let (r, _) =
            head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
                .ok()
                .flatten()
                .unwrap();
        assert!(r.expect_continue && r.framing == Framing::Chunked);
        assert!(
            head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none(),
            "partial"
        );
    }

    #[test]
    fn head_refusals() {
        // Ambiguous or malformed framing and heads: 400.
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert_eq!(status_of(raw), 400, "{raw:?}");
        }
        assert_eq!(status_of("GET / HTTP/2.0\r\n\r\n"), 505);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(status_of(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let cl = format!(
            "POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(status_of(&cl), 413);
        assert_eq!(
            status_of("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            400,
            "more than 19 digits"
        );
    }

    #[test]
    fn responses_and_streams_frame_as_asked() {
        let mut out = Vec::new();
        let after = Response::text(200, "ok")
            .with_header("Retry-After", "1")
            .write(
                &mut out,
                ConnMode {
                    keep_alive: true,
                    http10: true,
                },
            )
            .unwrap();
        assert_eq!(after, After::KeepAlive);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nServer: ringway-demo\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nRetry-After: 1\r\nConnection: keep-alive\r\n\r\nok"
        );
        let mut out = Vec::new();
        let mut s = EventStream::start(
            &mut out,
            ConnMode {
                keep_alive: true,
                http10: false,
            },
        )
        .unwrap();
        s.frame("data: x\n\n").unwrap();
        assert_eq!(s.finish().unwrap(), After::KeepAlive);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("\r\n\r\n9\r\ndata: x\n\n\r\n0\r\n\r\n"));
        // HTTP/1.0 has no chunked encoding: the stream ends with the connection, even when the
        // client asked for keep-alive.
        let mut out = Vec::new();
        let mut s = EventStream::start(
            &mut out,
            ConnMode {
                keep_alive: true,
                http10: true,
            },
        )
        .unwrap();
        s.frame("data: x\n\n").unwrap();
        assert_eq!(s.finish().unwrap(), After::Close);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("Connection: close\r\n\r\ndata: x\n\n"));
    }
}
