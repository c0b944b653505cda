//! The built-in upstream behind `ringway demo`: a small OpenAI- and Anthropic-compatible
//! HTTP/1.1 server on loopback, so a first look at Ringway needs no API key and no network.
//!
//! It deliberately lives outside the io_uring workers: it runs on its own std threads (one
//! accept thread, one thread per connection), so it can never block or perturb the data path
//! it is there to demonstrate. It is std-only (no serde_json in the engine), so JSON is read
//! by a tiny bounded parser and written by hand with proper escaping.
//!
//! Endpoints:
//! - `POST /v1/chat/completions` (OpenAI chat; `stream`, `stream_options.include_usage`)
//! - `POST /v1/messages` (Anthropic Messages; `stream`)
//! - `GET /v1/models`, `GET /healthz`
//! - anything else: 404 with a JSON error body.
//!
//! The answer is deterministic: `Ringway demo reply to: <first 40 chars of the last user
//! message>` (whitespace collapsed), or `Ringway demo reply to: (empty prompt)`. Token counts
//! are documented estimates, not a tokenizer:
//! - prompt tokens `P = ceil(C_in / 4)`, where `C_in` is the number of Unicode scalar values
//!   in the text of every message (plus Anthropic's top-level `system`);
//! - completion tokens `C` = the number of whitespace-separated words in the reply, which is
//!   also the number of content deltas a streamed reply carries.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Request bodies above this are refused with 413 (read incrementally, never buffered past it).
const MAX_BODY: usize = 16 << 20;
/// Request heads above this are refused with 431.
const MAX_HEAD: usize = 64 << 10;
/// A chunk-size line or trailer line longer than this is malformed (400).
const MAX_CHUNK_LINE: usize = 4096;
/// Thread-per-connection must still be bounded: past this many live connections, 503.
const MAX_CONNECTIONS: usize = 1024;
/// Reads time out this often so connection threads notice the stop flag promptly.
const POLL: Duration = Duration::from_millis(200);
/// A connection that makes no read progress for this long is closed (idle keep-alive included).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After an error that leaves unread request bytes, drain them this long before closing, so the
/// kernel does not answer them with a RST that could destroy our error response in flight.
const LINGER: Duration = Duration::from_secs(2);
/// Pause between streamed words, so streaming is visible in a terminal.
const WORD_DELAY: Duration = Duration::from_millis(20);
/// Model name used when a request names none.
const DEFAULT_MODEL: &str = "demo-1";
/// How much of the prompt the canned reply echoes, in chars.
const SNIPPET_CHARS: usize = 40;
/// Nesting bound for the JSON parser: recursion depth must not be attacker-controlled.
const MAX_JSON_DEPTH: usize = 128;

/// A running demo upstream. Dropping it (or calling [`DemoUpstream::shutdown`]) stops it:
/// the accept thread is joined, and connection threads exit within about 200 ms (a stream in
/// progress finishes its current write first).
pub struct DemoUpstream {
    /// The loopback address it listens on (`127.0.0.1:<ephemeral port>`).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl DemoUpstream {
    /// Binds 127.0.0.1:0 and serves in background threads.
    pub fn start() -> io::Result<DemoUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            stop: stop.clone(),
            live: AtomicUsize::new(0),
        });
        let accept = thread::Builder::new()
            .name("ringway-demo-accept".into())
            .spawn(move || accept_loop(listener, shared))?;
        Ok(DemoUpstream {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// Stops the server and waits for the accept thread (same as dropping it).
    pub fn shutdown(self) {}
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // accept() has no timeout; a throwaway connection wakes it so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

struct Shared {
    stop: Arc<AtomicBool>,
    live: AtomicUsize,
}

/// Decrements the live-connection count however the connection thread ends.
struct LiveGuard(Arc<Shared>);
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // EMFILE and friends are transient; back off instead of spinning.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.live.fetch_sub(1, Ordering::SeqCst);
            let body = openai_error(
                "too many connections to the demo upstream",
                "server_error",
                "overloaded",
            );
            let _ = write_response(
                &mut stream,
                503,
                "application/json",
                body.as_bytes(),
                false,
                true,
            );
            continue;
        }
        let guard = LiveGuard(shared.clone());
        let spawned = thread::Builder::new()
            .name("ringway-demo-conn".into())
            .spawn(move || {
                let guard = guard;
                serve_connection(stream, &guard.0);
            });
        // On spawn failure the closure (and with it the guard and the stream) is dropped,
        // which closes the socket and fixes the count.
        drop(spawned);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 server side
// ---------------------------------------------------------------------------------------------

/// An HTTP error detected while reading a request; the connection is closed after it.
struct HttpError {
    status: u16,
    message: &'static str,
    code: &'static str,
}

fn http_err(status: u16, message: &'static str, code: &'static str) -> HttpError {
    HttpError {
        status,
        message,
        code,
    }
}

struct Request {
    method: String,
    path: String,
    http10: bool,
    keep_alive: bool,
    expect_continue: bool,
    framing: Framing,
}

enum Framing {
    None,
    Length(usize),
    Chunked,
}

/// The read side of one connection: a buffer of bytes read but not yet consumed.
struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: &'a Shared,
}

enum ReadOutcome {
    Data,
    Eof,
}

impl Conn<'_> {
    /// Reads more bytes into `buf`. Times out after `IDLE_TIMEOUT` without progress and gives
    /// up early when the server is stopping.
    fn fill(&mut self) -> io::Result<ReadOutcome> {
        let started = Instant::now();
        let mut tmp = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return Ok(ReadOutcome::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(ReadOutcome::Data);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.stop.load(Ordering::SeqCst) || started.elapsed() >= IDLE_TIMEOUT
                    {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "idle"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills until a CRLF-terminated line is buffered; returns the line (without CRLF).
    fn read_line(&mut self, max: usize) -> Result<Vec<u8>, ConnError> {
        loop {
            if let Some(pos) = find(&self.buf, b"\r\n") {
                let line = self.buf[..pos].to_vec();
                self.buf.drain(..pos + 2);
                return Ok(line);
            }
            if self.buf.len() > max {
                return Err(ConnError::Http(http_err(
                    400,
                    "malformed chunked request body",
                    "bad_chunk",
                )));
            }
            match self.fill() {
                Ok(ReadOutcome::Data) => {}
                _ => return Err(ConnError::Gone),
            }
        }
    }

    /// Moves exactly `n` bytes from the connection into `out`.
    fn read_exact_into(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), ConnError> {
        loop {
            let take = n.min(self.buf.len());
            out.extend_from_slice(&self.buf[..take]);
            self.buf.drain(..take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            match self.fill() {
                Ok(ReadOutcome::Data) => {}
                _ => return Err(ConnError::Gone),
            }
        }
    }
}

enum ConnError {
    /// Answer with this error, then close.
    Http(HttpError),
    /// The peer went away or timed out: just close.
    Gone,
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    // Nagle would merge our small SSE chunks and hide the streaming the demo is meant to show.
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        shared,
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let req = match read_head(&mut conn) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(ConnError::Gone) => return,
            Err(ConnError::Http(e)) => return fail_and_close(&mut conn, e),
        };
        let body = match read_body(&mut conn, &req) {
            Ok(b) => b,
            Err(ConnError::Gone) => return,
            Err(ConnError::Http(e)) => return fail_and_close(&mut conn, e),
        };
        match route(&mut conn.stream, &req, &body) {
            Ok(()) if req.keep_alive => {}
            _ => {
                let _ = conn.stream.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Sends an error for a request we could not read whole, then closes with a short linger.
fn fail_and_close(conn: &mut Conn<'_>, e: HttpError) {
    let body = openai_error(e.message, "invalid_request_error", e.code);
    if write_response(
        &mut conn.stream,
        e.status,
        "application/json",
        body.as_bytes(),
        false,
        false,
    )
    .is_err()
    {
        return;
    }
    let _ = conn.stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 64 * 1024];
    while Instant::now() < deadline {
        match conn.stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Reads and parses one request head. `Ok(None)`: the peer closed cleanly between requests.
fn read_head(conn: &mut Conn<'_>) -> Result<Option<Request>, ConnError> {
    let mut scanned = 0;
    let end = loop {
        if let Some(pos) = find(&conn.buf[scanned..], b"\r\n\r\n") {
            break scanned + pos;
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(ConnError::Http(http_err(
                431,
                "request header fields too large",
                "header_too_large",
            )));
        }
        // Re-scan only the last 3 bytes: the terminator may straddle two reads.
        scanned = conn.buf.len().saturating_sub(3);
        match conn.fill() {
            Ok(ReadOutcome::Data) => {}
            // Between requests this is a normal close; mid-head there is nobody to answer.
            Ok(ReadOutcome::Eof) | Err(_) => return Ok(None),
        }
    };
    if end > MAX_HEAD {
        return Err(ConnError::Http(http_err(
            431,
            "request header fields too large",
            "header_too_large",
        )));
    }
    let head: Vec<u8> = conn.buf.drain(..end + 4).collect();
    parse_head(&head[..end]).map(Some).map_err(ConnError::Http)
}

fn parse_head(head: &[u8]) -> Result<Request, HttpError> {
    let bad = |m| http_err(400, m, "bad_request");
    let text = std::str::from_utf8(head).map_err(|_| bad("request head is not valid UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(bad("malformed request line")),
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(http_err(505, "HTTP version not supported", "bad_version")),
    };
    let mut content_length: Option<usize> = None;
    let mut too_large = false;
    let mut transfer_encoding: Option<String> = None;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    for line in lines {
        if line.starts_with(' ') || line.starts_with('\t') {
            // obs-fold is an old request-smuggling vector (RFC 9112 §5.2); refuse it.
            return Err(bad("obsolete header line folding"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("malformed header line"))?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(bad("malformed header name"));
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        let lname = name.to_ascii_lowercase();
        match lname.as_str() {
            "content-length" => {
                // A list such as "5, 5" is allowed only if every element agrees (RFC 9110 §8.6).
                for v in value.split(',') {
                    let v = v.trim();
                    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad("invalid Content-Length"));
                    }
                    let n: u64 = v.parse().map_err(|_| bad("invalid Content-Length"))?;
                    let n = usize::try_from(n).unwrap_or(usize::MAX);
                    if content_length.is_some_and(|c| c != n) {
                        return Err(bad("conflicting Content-Length headers"));
                    }
                    content_length = Some(n);
                    too_large |= n > MAX_BODY;
                }
            }
            "transfer-encoding" => {
                let t = transfer_encoding.get_or_insert_with(String::new);
                if !t.is_empty() {
                    t.push(',');
                }
                t.push_str(value);
            }
            "connection" => {
                for tok in value.split(',') {
                    let tok = tok.trim();
                    conn_close |= tok.eq_ignore_ascii_case("close");
                    conn_keep_alive |= tok.eq_ignore_ascii_case("keep-alive");
                }
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    let framing = match (transfer_encoding, content_length) {
        // Both at once is the classic smuggling ambiguity: refuse rather than guess.
        (Some(_), Some(_)) => return Err(bad("both Content-Length and Transfer-Encoding")),
        (Some(te), None) => {
            if http10 || !te.trim().eq_ignore_ascii_case("chunked") {
                return Err(bad("unsupported Transfer-Encoding (only chunked)"));
            }
            Framing::Chunked
        }
        (None, Some(_)) if too_large => {
            return Err(http_err(
                413,
                "request body exceeds 16 MiB",
                "request_too_large",
            ));
        }
        (None, Some(0)) | (None, None) => Framing::None,
        (None, Some(n)) => Framing::Length(n),
    };
    let keep_alive = if http10 {
        conn_keep_alive && !conn_close
    } else {
        !conn_close
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    Ok(Request {
        method: method.to_string(),
        path,
        http10,
        keep_alive,
        expect_continue: expect_continue && !http10,
        framing,
    })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads the whole request body into memory, incrementally, refusing it past `MAX_BODY`.
fn read_body(conn: &mut Conn<'_>, req: &Request) -> Result<Vec<u8>, ConnError> {
    if req.expect_continue && !matches!(req.framing, Framing::None) {
        // curl waits a second for this before sending a large body.
        conn.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| ConnError::Gone)?;
    }
    let mut body = Vec::new();
    match req.framing {
        Framing::None => {}
        Framing::Length(n) => {
            body.reserve(n.min(1 << 20));
            conn.read_exact_into(n, &mut body)?;
        }
        Framing::Chunked => loop {
            let line = conn.read_line(MAX_CHUNK_LINE)?;
            let size_part = line.split(|&b| b == b';').next().unwrap_or(&[]);
            let size_str = std::str::from_utf8(size_part)
                .unwrap_or("")
                .trim_matches(|c| c == ' ' || c == '\t');
            let bad_chunk =
                || ConnError::Http(http_err(400, "malformed chunked request body", "bad_chunk"));
            if size_str.is_empty()
                || size_str.len() > 16
                || !size_str.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(bad_chunk());
            }
            let size = u64::from_str_radix(size_str, 16).map_err(|_| bad_chunk())?;
            if size == 0 {
                // Trailers (ignored) up to the empty line; bounded like a head.
                let mut trailer_bytes = 0;
                loop {
                    let t = conn.read_line(MAX_CHUNK_LINE)?;
                    if t.is_empty() {
                        break;
                    }
                    trailer_bytes += t.len();
                    if trailer_bytes > MAX_HEAD {
                        return Err(ConnError::Http(http_err(
                            431,
                            "request trailers too large",
                            "header_too_large",
                        )));
                    }
                }
                break;
            }
            if (body.len() as u64).saturating_add(size) > MAX_BODY as u64 {
                return Err(ConnError::Http(http_err(
                    413,
                    "request body exceeds 16 MiB",
                    "request_too_large",
                )));
            }
            conn.read_exact_into(size as usize, &mut body)?;
            if !conn.read_line(2)?.is_empty() {
                return Err(bad_chunk());
            }
        },
    }
    Ok(body)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes a whole response with Content-Length in one write (head and body together).
fn write_response(
    w: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    http10: bool,
) -> io::Result<()> {
    let conn = match (keep_alive, http10) {
        (false, _) => "Connection: close\r\n",
        (true, true) => "Connection: keep-alive\r\n",
        (true, false) => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: ringway-demo\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{conn}\r\n",
        crate::proxy::error::reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)
}

/// A streamed (`text/event-stream`) response: chunked on HTTP/1.1, close-delimited on 1.0
/// (which has no chunked encoding). Every `frame` goes out as its own chunk.
struct EventStream<'a> {
    w: &'a mut TcpStream,
    chunked: bool,
}

impl<'a> EventStream<'a> {
    fn start(w: &'a mut TcpStream, req: &Request) -> io::Result<Self> {
        let chunked = !req.http10;
        let framing = if chunked {
            "Transfer-Encoding: chunked\r\n"
        } else {
            "Connection: close\r\n"
        };
        let conn = if chunked && !req.keep_alive {
            "Connection: close\r\n"
        } else {
            ""
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: ringway-demo\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n{framing}{conn}\r\n"
        );
        w.write_all(head.as_bytes())?;
        Ok(EventStream { w, chunked })
    }

    fn frame(&mut self, data: &str) -> io::Result<()> {
        if self.chunked {
            let mut out = format!("{:x}\r\n", data.len()).into_bytes();
            out.extend_from_slice(data.as_bytes());
            out.extend_from_slice(b"\r\n");
            self.w.write_all(&out)
        } else {
            self.w.write_all(data.as_bytes())
        }
    }

    fn finish(self) -> io::Result<()> {
        if self.chunked {
            self.w.write_all(b"0\r\n\r\n")
        } else {
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

fn route(w: &mut TcpStream, req: &Request, body: &[u8]) -> io::Result<()> {
    let (ka, h10) = (req.keep_alive, req.http10);
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/chat/completions") => match parse_prompt(body, false) {
            Ok(p) => chat_completions(w, req, &p),
            Err(msg) => {
                let body = openai_error(&msg, "invalid_request_error", "invalid_request");
                write_response(w, 400, "application/json", body.as_bytes(), ka, h10)
            }
        },
        ("POST", "/v1/messages") => match parse_prompt(body, true) {
            Ok(p) => messages(w, req, &p),
            Err(msg) => {
                // Anthropic clients expect Anthropic's error shape on this endpoint.
                let body = format!(
                    r#"{{"type":"error","error":{{"type":"invalid_request_error","message":{}}}}}"#,
                    js(&msg)
                );
                write_response(w, 400, "application/json", body.as_bytes(), ka, h10)
            }
        },
        ("GET", "/v1/models") => {
            let mut data = Vec::new();
            for id in ["demo-1", "demo-2"] {
                data.push(format!(
                    r#"{{"id":{},"object":"model","created":1700000000,"owned_by":"ringway"}}"#,
                    js(id)
                ));
            }
            let body = format!(r#"{{"object":"list","data":[{}]}}"#, data.join(","));
            write_response(w, 200, "application/json", body.as_bytes(), ka, h10)
        }
        ("GET", "/healthz") => write_response(w, 200, "text/plain", b"ok", ka, h10),
        (m, p) => {
            let body = openai_error(
                &format!("Invalid URL ({m} {p})"),
                "invalid_request_error",
                "not_found",
            );
            write_response(w, 404, "application/json", body.as_bytes(), ka, h10)
        }
    }
}

/// An error body in OpenAI's shape.
fn openai_error(message: &str, kind: &str, code: &str) -> String {
    format!(
        r#"{{"error":{{"message":{},"type":{},"param":null,"code":{}}}}}"#,
        js(message),
        js(kind),
        js(code)
    )
}

/// What the demo needs from a chat request.
#[derive(Debug)]
struct Prompt {
    model: String,
    stream: bool,
    include_usage: bool,
    last_user: String,
    prompt_chars: usize,
}

impl Prompt {
    fn reply(&self) -> String {
        let snippet: String = self.last_user.chars().take(SNIPPET_CHARS).collect();
        let snippet = snippet.split_whitespace().collect::<Vec<_>>().join(" ");
        if snippet.is_empty() {
            "Ringway demo reply to: (empty prompt)".to_string()
        } else {
            format!("Ringway demo reply to: {snippet}")
        }
    }

    fn prompt_tokens(&self) -> usize {
        self.prompt_chars.div_ceil(4)
    }
}

/// The reply split into stream deltas: one per word, each after the first with its leading
/// space, so the deltas concatenate to exactly the non-streamed reply.
fn deltas(reply: &str) -> Vec<String> {
    reply
        .split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

fn parse_prompt(body: &[u8], anthropic: bool) -> Result<Prompt, String> {
    let v = parse_json(body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    if !matches!(v, Json::Obj(_)) {
        return Err("the request body must be a JSON object".into());
    }
    let model = match v.get("model") {
        None | Some(Json::Null) => DEFAULT_MODEL.to_string(),
        Some(Json::Str(s)) => s.clone(),
        Some(_) => return Err("'model' must be a string".into()),
    };
    let stream = match v.get("stream") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => return Err("'stream' must be a boolean".into()),
    };
    let include_usage = !anthropic
        && matches!(
            v.get("stream_options").and_then(|o| o.get("include_usage")),
            Some(Json::Bool(true))
        );
    let msgs = match v.get("messages") {
        Some(Json::Arr(a)) => a,
        _ => return Err("'messages' is a required property and must be an array".into()),
    };
    let mut prompt_chars = 0;
    if anthropic {
        if let Some(sys) = v.get("system") {
            prompt_chars += content_text(sys).chars().count();
        }
    }
    let mut last_user = String::new();
    for m in msgs {
        let text = m.get("content").map(content_text).unwrap_or_default();
        prompt_chars += text.chars().count();
        if matches!(m.get("role"), Some(Json::Str(r)) if r == "user") {
            last_user = text;
        }
    }
    Ok(Prompt {
        model,
        stream,
        include_usage,
        last_user,
        prompt_chars,
    })
}

/// The text of a message `content`: a string, or the `text` of each part of an array
/// (OpenAI content parts and Anthropic content blocks both use `text`), joined by newlines.
fn content_text(c: &Json) -> String {
    match c {
        Json::Str(s) => s.clone(),
        Json::Arr(parts) => parts
            .iter()
            .filter_map(|p| match p.get("text") {
                Some(Json::Str(s)) => Some(s.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn chat_completions(w: &mut TcpStream, req: &Request, p: &Prompt) -> io::Result<()> {
    let id = format!("chatcmpl-ringwaydemo{}", next_id());
    let created = now_secs();
    let reply = p.reply();
    let (pt, ct) = (p.prompt_tokens(), deltas(&reply).len());
    let usage = format!(
        r#"{{"prompt_tokens":{pt},"completion_tokens":{ct},"total_tokens":{}}}"#,
        pt + ct
    );
    if !p.stream {
        let body = format!(
            r#"{{"id":{},"object":"chat.completion","created":{created},"model":{},"choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"logprobs":null,"finish_reason":"stop"}}],"usage":{usage}}}"#,
            js(&id),
            js(&p.model),
            js(&reply)
        );
        return write_response(
            w,
            200,
            "application/json",
            body.as_bytes(),
            req.keep_alive,
            req.http10,
        );
    }
    // Exactly OpenAI's convention: with include_usage every chunk carries "usage":null and one
    // extra chunk with empty choices carries the numbers; without it no chunk has the field.
    let usage_null = if p.include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let chunk = |choices: &str, tail: &str| {
        format!(
            "data: {{\"id\":{},\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{},\"system_fingerprint\":null,\"choices\":[{choices}]{tail}}}\n\n",
            js(&id),
            js(&p.model)
        )
    };
    let mut s = EventStream::start(w, req)?;
    // OpenAI's first chunk carries the role and an empty content.
    s.frame(&chunk(r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}"#, usage_null))?;
    for (i, d) in deltas(&reply).iter().enumerate() {
        if i > 0 {
            thread::sleep(WORD_DELAY);
        }
        let choice = format!(
            r#"{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}"#,
            js(d)
        );
        s.frame(&chunk(&choice, usage_null))?;
    }
    s.frame(&chunk(
        r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}"#,
        usage_null,
    ))?;
    if p.include_usage {
        s.frame(&chunk("", &format!(r#","usage":{usage}"#)))?;
    }
    s.frame("data: [DONE]\n\n")?;
    s.finish()
}

fn messages(w: &mut TcpStream, req: &Request, p: &Prompt) -> io::Result<()> {
    let id = format!("msg_ringwaydemo{}", next_id());
    let reply = p.reply();
    let (pt, ct) = (p.prompt_tokens(), deltas(&reply).len());
    if !p.stream {
        let body = format!(
            r#"{{"id":{},"type":"message","role":"assistant","model":{},"content":[{{"type":"text","text":{}}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{{"input_tokens":{pt},"output_tokens":{ct}}}}}"#,
            js(&id),
            js(&p.model),
            js(&reply)
        );
        return write_response(
            w,
            200,
            "application/json",
            body.as_bytes(),
            req.keep_alive,
            req.http10,
        );
    }
    let ev = |name: &str, data: &str| format!("event: {name}\ndata: {data}\n\n");
    let mut s = EventStream::start(w, req)?;
    // As Anthropic does: input tokens in message_start (output_tokens starts at 1), the final
    // output count in message_delta.
    s.frame(&ev(
        "message_start",
        &format!(
            r#"{{"type":"message_start","message":{{"id":{},"type":"message","role":"assistant","model":{},"content":[],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":{pt},"output_tokens":1}}}}}}"#,
            js(&id),
            js(&p.model)
        ),
    ))?;
    s.frame(&ev(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    ))?;
    for (i, d) in deltas(&reply).iter().enumerate() {
        if i > 0 {
            thread::sleep(WORD_DELAY);
        }
        let data = format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#,
            js(d)
        );
        s.frame(&ev("content_block_delta", &data))?;
    }
    s.frame(&ev(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    ))?;
    s.frame(&ev(
        "message_delta",
        &format!(
            r#"{{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{ct}}}}}"#
        ),
    ))?;
    s.frame(&ev("message_stop", r#"{"type":"message_stop"}"#))?;
    s.finish()
}

// ---------------------------------------------------------------------------------------------
// JSON: a bounded reader and a string escaper
// ---------------------------------------------------------------------------------------------

/// A parsed JSON value. Numbers are kept as their source text: the demo never computes with them.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Object member lookup; the last duplicate wins (as with most JSON readers).
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

fn parse_json(bytes: &[u8]) -> Result<Json, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    let mut p = JsonParser { text, i: 0 };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != text.len() {
        return Err(format!("unexpected trailing data at byte {}", p.i));
    }
    Ok(v)
}

struct JsonParser<'a> {
    text: &'a str,
    i: usize,
}

impl JsonParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.i).copied()
    }

    fn rest(&self) -> &[u8] {
        self.text.as_bytes().get(self.i..).unwrap_or(&[])
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at byte {}", self.i))
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > MAX_JSON_DEPTH {
            return self.err("nesting too deep");
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => self.err("unexpected character"),
            None => self.err("unexpected end of input"),
        }
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.rest().starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err("invalid literal")
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.i;
        self.eat(b'-');
        if !self.eat(b'0') && self.digits() == 0 {
            return self.err("invalid number");
        }
        if self.eat(b'.') && self.digits() == 0 {
            return self.err("invalid number");
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return self.err("invalid number");
            }
        }
        // Every byte consumed is ASCII, so both ends are char boundaries; get() keeps it panic-free.
        Ok(Json::Num(
            self.text.get(start..self.i).unwrap_or("0").to_string(),
        ))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let s = self
            .text
            .get(self.i..self.i + 4)
            .ok_or_else(|| format!("bad \\u escape at byte {}", self.i))?;
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return self.err("bad \\u escape");
        }
        self.i += 4;
        u32::from_str_radix(s, 16).map_err(|_| "bad \\u escape".to_string())
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let start = self.i;
            while matches!(self.peek(), Some(b) if b != b'"' && b != b'\\' && b >= 0x20) {
                self.i += 1;
            }
            // The run stops at an ASCII byte or the end: a char boundary.
            out.push_str(self.text.get(start..self.i).unwrap_or(""));
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let esc = self.peek();
                    self.i += 1;
                    match esc {
                        Some(b'"') => out.push('"'),
                        Some(b'\\') => out.push('\\'),
                        Some(b'/') => out.push('/'),
                        Some(b'b') => out.push('\u{8}'),
                        Some(b'f') => out.push('\u{c}'),
                        Some(b'n') => out.push('\n'),
                        Some(b'r') => out.push('\r'),
                        Some(b't') => out.push('\t'),
                        Some(b'u') => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi)
                                && self.rest().starts_with(b"\\u")
                            {
                                let save = self.i;
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                } else {
                                    // Not a pair: keep the second escape for the next round.
                                    self.i = save;
                                    0xFFFD
                                }
                            } else {
                                hi
                            };
                            // Lone surrogates become U+FFFD: tolerant, as the demo should be.
                            out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                        }
                        _ => {
                            self.i -= 1;
                            return self.err("invalid escape");
                        }
                    }
                }
                Some(_) => return self.err("control character in string"),
                None => return self.err("unterminated string"),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.eat(b']') {
            return Ok(Json::Arr(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth + 1)?);
            self.ws();
            if self.eat(b']') {
                return Ok(Json::Arr(items));
            }
            if !self.eat(b',') {
                return self.err("expected ',' or ']'");
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json, String> {
        self.i += 1;
        let mut members = Vec::new();
        self.ws();
        if self.eat(b'}') {
            return Ok(Json::Obj(members));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return self.err("expected a string key");
            }
            let k = self.string()?;
            self.ws();
            if !self.eat(b':') {
                return self.err("expected ':'");
            }
            self.ws();
            let v = self.value(depth + 1)?;
            members.push((k, v));
            self.ws();
            if self.eat(b'}') {
                return Ok(Json::Obj(members));
            }
            if !self.eat(b',') {
                return self.err("expected ',' or '}'");
            }
        }
    }
}

/// `s` as a quoted JSON string. Escapes `"`, `\` and every control character; everything else
/// (non-ASCII included) is valid as-is in UTF-8 JSON.
fn js(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// A response as a raw-socket client sees it. `chunks` keeps the chunk boundaries, so tests
    /// can check that every SSE frame went out as its own chunk.
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        chunks: Vec<Vec<u8>>,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn json(&self) -> Json {
            parse_json(&self.body)
                .unwrap_or_else(|e| panic!("bad JSON {e}: {}", String::from_utf8_lossy(&self.body)))
        }
        fn text(&self) -> String {
            String::from_utf8(self.body.clone()).unwrap()
        }
    }

    struct Client {
        s: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        fn connect(srv: &DemoUpstream) -> Client {
            let s = TcpStream::connect(srv.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client { s, buf: Vec::new() }
        }

        fn fill(&mut self) -> bool {
            let mut tmp = [0u8; 65536];
            let n = self.s.read(&mut tmp).unwrap();
            self.buf.extend_from_slice(&tmp[..n]);
            n > 0
        }

        fn line(&mut self) -> String {
            loop {
                if let Some(p) = find(&self.buf, b"\r\n") {
                    let l = String::from_utf8(self.buf[..p].to_vec()).unwrap();
                    self.buf.drain(..p + 2);
                    return l;
                }
                assert!(self.fill(), "eof while reading a line");
            }
        }

        fn take(&mut self, n: usize) -> Vec<u8> {
            while self.buf.len() < n {
                assert!(self.fill(), "eof while reading a body");
            }
            self.buf.drain(..n).collect()
        }

        fn send(&mut self, raw: &[u8]) {
            self.s.write_all(raw).unwrap();
        }

        fn post(&mut self, path: &str, body: &str) -> Resp {
            let req = format!(
                "POST {path} HTTP/1.1\r\nHost: demo\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            self.send(req.as_bytes());
            self.read()
        }

        fn get(&mut self, path: &str) -> Resp {
            self.send(format!("GET {path} HTTP/1.1\r\nHost: demo\r\n\r\n").as_bytes());
            self.read()
        }

        fn read(&mut self) -> Resp {
            let (status, headers) = loop {
                let status_line = self.line();
                let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
                let mut headers = Vec::new();
                loop {
                    let l = self.line();
                    if l.is_empty() {
                        break;
                    }
                    let (k, v) = l.split_once(':').unwrap();
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
                if status != 100 {
                    break (status, headers);
                }
            };
            let mut r = Resp {
                status,
                headers,
                body: Vec::new(),
                chunks: Vec::new(),
            };
            if let Some(n) = r.header("content-length") {
                let n: usize = n.parse().unwrap();
                r.body = self.take(n);
            } else if r.header("transfer-encoding") == Some("chunked") {
                loop {
                    let size = usize::from_str_radix(&self.line(), 16).unwrap();
                    if size == 0 {
                        assert_eq!(self.line(), "");
                        break;
                    }
                    let c = self.take(size);
                    assert_eq!(self.take(2), b"\r\n");
                    r.body.extend_from_slice(&c);
                    r.chunks.push(c);
                }
            } else {
                while self.fill() {}
                r.body = std::mem::take(&mut self.buf);
            }
            r
        }

        /// True when the server closed the connection.
        fn closed(&mut self) -> bool {
            let mut b = [0u8; 1];
            matches!(self.s.read(&mut b), Ok(0) | Err(_))
        }
    }

    fn s<'a>(v: &'a Json, k: &str) -> &'a str {
        match v.get(k) {
            Some(Json::Str(s)) => s,
            other => panic!("{k}: expected string, got {other:?}"),
        }
    }
    fn n(v: &Json, k: &str) -> u64 {
        match v.get(k) {
            Some(Json::Num(s)) => s.parse().unwrap(),
            other => panic!("{k}: expected number, got {other:?}"),
        }
    }
    fn arr<'a>(v: &'a Json, k: &str) -> &'a [Json] {
        match v.get(k) {
            Some(Json::Arr(a)) => a,
            other => panic!("{k}: expected array, got {other:?}"),
        }
    }
    fn keys(v: &Json) -> Vec<&str> {
        match v {
            Json::Obj(m) => m.iter().map(|(k, _)| k.as_str()).collect(),
            other => panic!("expected object, got {other:?}"),
        }
    }

    /// Splits an SSE body into (event name, data) frames; also checks each frame was one chunk.
    fn sse_frames(r: &Resp) -> Vec<(Option<String>, String)> {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let mut frames = Vec::new();
        for c in &r.chunks {
            let text = std::str::from_utf8(c).unwrap();
            assert!(
                text.ends_with("\n\n"),
                "chunk is not exactly one frame: {text:?}"
            );
            let frame = &text[..text.len() - 2];
            assert!(!frame.contains("\n\n"), "two frames in one chunk: {text:?}");
            let mut event = None;
            let mut data = None;
            for line in frame.split('\n') {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(d.to_string());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            frames.push((event, data.unwrap()));
        }
        frames
    }

    const HELLO: &str = r#"{"model":"gpt-demo","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello there, \"gateway\"!\nHow are you today, my friend? Tell me more please."}]"#;

    fn body_with(extra: &str) -> String {
        format!("{HELLO}{extra}}}")
    }

    fn expected_reply() -> &'static str {
        // First 40 chars of the last user message, whitespace collapsed.
        "Ringway demo reply to: Hello there, \"gateway\"! How are you toda"
    }

    fn expected_prompt_tokens() -> u64 {
        let chars = "Be brief.".chars().count()
            + "Hello there, \"gateway\"!\nHow are you today, my friend? Tell me more please."
                .chars()
                .count();
        chars.div_ceil(4) as u64
    }

    #[test]
    fn chat_non_stream_shape_and_usage() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let r = c.post("/v1/chat/completions", &body_with(""));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        assert_eq!(
            keys(&v),
            ["id", "object", "created", "model", "choices", "usage"]
        );
        assert!(s(&v, "id").starts_with("chatcmpl-"));
        assert_eq!(s(&v, "object"), "chat.completion");
        assert!(n(&v, "created") > 1_600_000_000);
        assert_eq!(s(&v, "model"), "gpt-demo");
        let choices = arr(&v, "choices");
        assert_eq!(choices.len(), 1);
        assert_eq!(n(&choices[0], "index"), 0);
        assert_eq!(s(&choices[0], "finish_reason"), "stop");
        let msg = choices[0].get("message").unwrap();
        assert_eq!(s(msg, "role"), "assistant");
        assert_eq!(s(msg, "content"), expected_reply());
        let u = v.get("usage").unwrap();
        let words = expected_reply().split_whitespace().count() as u64;
        assert_eq!(n(u, "prompt_tokens"), expected_prompt_tokens());
        assert_eq!(n(u, "completion_tokens"), words);
        assert_eq!(n(u, "total_tokens"), expected_prompt_tokens() + words);
    }

    #[test]
    fn chat_default_model_and_content_parts() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let body = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"abc"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        let v = c.post("/v1/chat/completions", body).json();
        assert_eq!(s(&v, "model"), "demo-1");
        let msg = arr(&v, "choices")[0].get("message").unwrap();
        assert_eq!(s(msg, "content"), "Ringway demo reply to: abc");
        assert_eq!(n(v.get("usage").unwrap(), "prompt_tokens"), 1);
        // No user message at all still answers.
        let v = c.post("/v1/chat/completions", r#"{"messages":[]}"#).json();
        let msg = arr(&v, "choices")[0].get("message").unwrap();
        assert_eq!(s(msg, "content"), "Ringway demo reply to: (empty prompt)");
        assert_eq!(n(v.get("usage").unwrap(), "prompt_tokens"), 0);
    }

    #[test]
    fn chat_stream_with_include_usage() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let r = c.post(
            "/v1/chat/completions",
            &body_with(r#","stream":true,"stream_options":{"include_usage":true}"#),
        );
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        let frames = sse_frames(&r);
        let words = expected_reply().split_whitespace().count();
        // role chunk + one per word + stop chunk + usage chunk + [DONE]
        assert_eq!(frames.len(), words + 4);
        assert_eq!(frames.last().unwrap(), &(None, "[DONE]".to_string()));
        let chunks: Vec<Json> = frames[..frames.len() - 1]
            .iter()
            .map(|(_, d)| parse_json(d.as_bytes()).unwrap())
            .collect();
        let id = s(&chunks[0], "id").to_string();
        let mut content = String::new();
        for (i, ch) in chunks.iter().enumerate() {
            assert_eq!(s(ch, "object"), "chat.completion.chunk");
            assert_eq!(s(ch, "id"), id);
            assert_eq!(s(ch, "model"), "gpt-demo");
            let choices = arr(ch, "choices");
            if i == chunks.len() - 1 {
                assert!(choices.is_empty());
                let u = ch.get("usage").unwrap();
                assert_eq!(n(u, "prompt_tokens"), expected_prompt_tokens());
                assert_eq!(n(u, "completion_tokens"), words as u64);
                assert_eq!(
                    n(u, "total_tokens"),
                    expected_prompt_tokens() + words as u64
                );
                continue;
            }
            assert_eq!(
                ch.get("usage"),
                Some(&Json::Null),
                "chunk {i} must carry usage:null"
            );
            assert_eq!(choices.len(), 1);
            let delta = choices[0].get("delta").unwrap();
            if i == 0 {
                assert_eq!(s(delta, "role"), "assistant");
            }
            if i == chunks.len() - 2 {
                assert_eq!(s(&choices[0], "finish_reason"), "stop");
                assert_eq!(delta, &Json::Obj(vec![]));
            } else {
                assert_eq!(choices[0].get("finish_reason"), Some(&Json::Null));
                content.push_str(s(delta, "content"));
            }
        }
        assert_eq!(content, expected_reply());
    }

    #[test]
    fn chat_stream_without_include_usage() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let r = c.post("/v1/chat/completions", &body_with(r#","stream":true"#));
        let frames = sse_frames(&r);
        let words = expected_reply().split_whitespace().count();
        assert_eq!(frames.len(), words + 3);
        assert_eq!(frames.last().unwrap().1, "[DONE]");
        for (_, d) in &frames[..frames.len() - 1] {
            let ch = parse_json(d.as_bytes()).unwrap();
            assert_eq!(
                ch.get("usage"),
                None,
                "no usage field at all without include_usage"
            );
            assert_eq!(arr(&ch, "choices").len(), 1);
        }
        let last = parse_json(frames[frames.len() - 2].1.as_bytes()).unwrap();
        assert_eq!(s(&arr(&last, "choices")[0], "finish_reason"), "stop");
        // The connection stays usable after a chunked stream.
        assert_eq!(c.get("/healthz").text(), "ok");
    }

    #[test]
    fn anthropic_non_stream() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let body = r#"{"model":"claude-demo","max_tokens":64,"system":"Be brief.","messages":[{"role":"user","content":[{"type":"text","text":"Hi Claude"}]}]}"#;
        let v = c.post("/v1/messages", body).json();
        assert_eq!(
            keys(&v),
            [
                "id",
                "type",
                "role",
                "model",
                "content",
                "stop_reason",
                "stop_sequence",
                "usage"
            ]
        );
        assert!(s(&v, "id").starts_with("msg_"));
        assert_eq!(s(&v, "type"), "message");
        assert_eq!(s(&v, "role"), "assistant");
        assert_eq!(s(&v, "model"), "claude-demo");
        assert_eq!(s(&v, "stop_reason"), "end_turn");
        let content = arr(&v, "content");
        assert_eq!(content.len(), 1);
        assert_eq!(s(&content[0], "type"), "text");
        assert_eq!(s(&content[0], "text"), "Ringway demo reply to: Hi Claude");
        let u = v.get("usage").unwrap();
        assert_eq!(
            n(u, "input_tokens"),
            ("Be brief.".len() + "Hi Claude".len()).div_ceil(4) as u64
        );
        assert_eq!(n(u, "output_tokens"), 6);
    }

    #[test]
    fn anthropic_stream() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let body = r#"{"model":"claude-demo","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hi Claude, stream please"}]}"#;
        let r = c.post("/v1/messages", body);
        let frames = sse_frames(&r);
        let names: Vec<&str> = frames.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
        let reply = "Ringway demo reply to: Hi Claude, stream please";
        let words = reply.split_whitespace().count();
        let mut expected = vec!["message_start", "content_block_start"];
        expected.extend(std::iter::repeat_n("content_block_delta", words));
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected);
        let data: Vec<Json> = frames
            .iter()
            .map(|(_, d)| parse_json(d.as_bytes()).unwrap())
            .collect();
        for (name, d) in names.iter().zip(&data) {
            assert_eq!(s(d, "type"), *name, "data.type matches the event name");
        }
        let msg = data[0].get("message").unwrap();
        assert_eq!(s(msg, "model"), "claude-demo");
        assert_eq!(
            n(msg.get("usage").unwrap(), "input_tokens"),
            ("Hi Claude, stream please".len() as u64).div_ceil(4)
        );
        let block = data[1].get("content_block").unwrap();
        assert_eq!(s(block, "type"), "text");
        let mut text = String::new();
        for d in &data[2..2 + words] {
            let delta = d.get("delta").unwrap();
            assert_eq!(s(delta, "type"), "text_delta");
            text.push_str(s(delta, "text"));
        }
        assert_eq!(text, reply);
        let md = &data[data.len() - 2];
        assert_eq!(s(md.get("delta").unwrap(), "stop_reason"), "end_turn");
        assert_eq!(n(md.get("usage").unwrap(), "output_tokens"), words as u64);
    }

    #[test]
    fn bad_json_is_400_in_openai_shape_and_keeps_the_connection() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        for bad in [
            "{\"messages\": [",
            "not json",
            "[]",
            r#"{"messages":"x"}"#,
            r#"{"messages":[],"stream":"yes"}"#,
            "\u{0}",
        ] {
            let r = c.post("/v1/chat/completions", bad);
            assert_eq!(r.status, 400, "{bad:?}");
            let v = r.json();
            assert_eq!(keys(&v), ["error"]);
            let e = v.get("error").unwrap();
            assert!(!s(e, "message").is_empty());
            assert_eq!(s(e, "type"), "invalid_request_error");
            assert!(!s(e, "code").is_empty());
        }
        // Anthropic's own error shape on its endpoint.
        let v = c.post("/v1/messages", "{").json();
        assert_eq!(s(&v, "type"), "error");
        assert_eq!(s(v.get("error").unwrap(), "type"), "invalid_request_error");
        // Invalid UTF-8 body.
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n\xff\xfe");
        assert_eq!(c.read().status, 400);
        assert_eq!(c.get("/healthz").status, 200);
    }

    #[test]
    fn keep_alive_two_requests_on_one_connection_and_pipelining() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let r1 = c.post(
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"one"}]}"#,
        );
        assert_eq!(r1.status, 200);
        assert_eq!(r1.header("connection"), None);
        // Second request on the same socket, with a chunked body split mid-chunk.
        let body = r#"{"messages":[{"role":"user","content":"two"}]}"#;
        let (a, b) = body.split_at(10);
        c.send(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
                a.len(),
                b.len()
            )
            .as_bytes(),
        );
        let r2 = c.read();
        let msg = arr(&r2.json(), "choices")[0]
            .get("message")
            .unwrap()
            .clone();
        assert_eq!(s(&msg, "content"), "Ringway demo reply to: two");
        // Two pipelined requests in one write.
        c.send(
            b"GET /healthz HTTP/1.1\r\n\r\nGET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(c.read().text(), "ok");
        let m = c.read();
        assert_eq!(m.header("connection"), Some("close"));
        let v = m.json();
        assert_eq!(s(&v, "object"), "list");
        assert_eq!(s(&arr(&v, "data")[0], "id"), "demo-1");
        assert!(c.closed());
    }

    #[test]
    fn http10_and_expect_continue() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        c.send(b"GET /healthz HTTP/1.0\r\n\r\n");
        let r = c.read();
        assert_eq!((r.status, r.header("connection")), (200, Some("close")));
        assert!(c.closed());
        // HTTP/1.0 stream: close-delimited, no chunked.
        let mut c = Client::connect(&srv);
        let body = r#"{"stream":true,"messages":[{"role":"user","content":"x"}]}"#;
        c.send(
            format!(
                "POST /v1/chat/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let r = c.read();
        assert!(r.text().ends_with("data: [DONE]\n\n"));
        // Expect: 100-continue gets an interim 100 before the body is sent.
        let mut c = Client::connect(&srv);
        c.send(format!("POST /v1/chat/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
        assert_eq!(c.line(), "HTTP/1.1 100 Continue");
        assert_eq!(c.line(), "");
        c.send(body.as_bytes());
        assert!(c.read().text().contains("[DONE]"));
    }

    #[test]
    fn limits_and_framing_errors() {
        let srv = DemoUpstream::start().unwrap();
        // Content-Length over the cap: 413 at once, before any body byte.
        let mut c = Client::connect(&srv);
        c.send(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            )
            .as_bytes(),
        );
        let r = c.read();
        assert_eq!(r.status, 413);
        assert_eq!(
            s(r.json().get("error").unwrap(), "code"),
            "request_too_large"
        );
        // Chunked over the cap: 413 once the running total passes it; the response survives
        // the unread remainder thanks to the linger.
        let mut c = Client::connect(&srv);
        let mut w = c.s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let _ =
                w.write_all(b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..17 {
                let _ = w.write_all(b"100000\r\n");
                let _ = w.write_all(&chunk);
                let _ = w.write_all(b"\r\n");
            }
            let _ = w.write_all(b"0\r\n\r\n");
        });
        assert_eq!(c.read().status, 413);
        writer.join().unwrap();
        // Ambiguous or malformed framing: 400 and close.
        for raw in [
            "POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "POST /v1/messages HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "GET /healthz HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            let mut c = Client::connect(&srv);
            c.send(raw.as_bytes());
            let r = c.read();
            assert_eq!(r.status, 400, "{raw:?}");
            assert_eq!(r.header("connection"), Some("close"));
            assert!(c.closed());
        }
        // Oversized head: 431.
        let mut c = Client::connect(&srv);
        c.send(
            format!(
                "GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n",
                "a".repeat(MAX_HEAD + 10)
            )
            .as_bytes(),
        );
        assert_eq!(c.read().status, 431);
    }

    #[test]
    fn models_health_and_404() {
        let srv = DemoUpstream::start().unwrap();
        let mut c = Client::connect(&srv);
        let h = c.get("/healthz");
        assert_eq!((h.status, h.text().as_str()), (200, "ok"));
        let v = c.get("/v1/models?x=1").json();
        assert_eq!(arr(&v, "data").len(), 2);
        let r = c.get("/nope");
        assert_eq!(r.status, 404);
        let e = r.json();
        assert_eq!(
            s(e.get("error").unwrap(), "message"),
            "Invalid URL (GET /nope)"
        );
        // Wrong method on a known path is "anything else" too.
        assert_eq!(c.get("/v1/chat/completions").status, 404);
    }

    #[test]
    fn stop_on_drop() {
        let srv = DemoUpstream::start().unwrap();
        let addr = srv.addr;
        let mut c = Client::connect(&srv);
        assert_eq!(c.get("/healthz").status, 200);
        let t = Instant::now();
        drop(srv);
        assert!(t.elapsed() < Duration::from_secs(2));
        // The idle keep-alive connection is closed within a poll interval.
        assert!(c.closed());
        assert!(TcpStream::connect(addr).is_err());
    }

    #[test]
    fn json_parser_and_escaper() {
        let v = parse_json(br#" {"a":[1,-2.5e3,true,false,null],"s":"q\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00\ud800x","a":0} "#).unwrap();
        assert_eq!(
            v.get("a"),
            Some(&Json::Num("0".into())),
            "last duplicate wins"
        );
        assert_eq!(s(&v, "s"), "q\"\\/\u{8}\u{c}\n\r\té😀\u{FFFD}x");
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\" 1}",
            "01x",
            "1.",
            "-",
            "\"\\x\"",
            "\"\u{1}\"",
            "\"abc",
            "tru",
            "{}{}",
            "\"\\ud83d\\u12\"",
        ] {
            assert!(parse_json(bad.as_bytes()).is_err(), "{bad:?}");
        }
        // Deep nesting is an error, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(parse_json(deep.as_bytes()).is_err());
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert!(parse_json(ok.as_bytes()).is_ok());
        // Round trip through the escaper.
        let tricky = "a\"b\\c\nd\u{1}\u{1f}\u{7f}é😀</script>";
        assert_eq!(
            js(tricky),
            "\"a\\\"b\\\\c\\nd\\u0001\\u001f\\u007fé😀</script>\""
        );
        assert_eq!(
            parse_json(js(tricky).as_bytes()).unwrap(),
            Json::Str(tricky.into())
        );
    }
}
