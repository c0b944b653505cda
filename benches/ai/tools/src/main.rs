//! Helpers for benches/ai/run.sh (issue 13), one thread each, epoll through mio:
//!
//!   aibench mock --port P [--chunks 50] [--interval-ms 20]
//!   aibench streams --port P [--streams 2000] [--chunks 50] [--timeout 60] [--pids PID,...]
//!                   [--path /v1/chat/completions] [--key sk-bench] [--model gpt-mock]
//!
//! `mock`: an OpenAI-compatible provider. `POST …/chat/completions` without `"stream": true`
//! gets a fixed chat completion (~560 B JSON, Content-Length) with `usage`; with it, a
//! `text/event-stream` (chunked) of CHUNKS `chat.completion.chunk` frames of one word each
//! (~200 B), the first with the head and then one every INTERVAL ms, then a usage-only frame
//! when the request has `"include_usage": true` (as OpenAI does), then `data: [DONE]`; one HTTP
//! chunk and one write per frame. Paced frames come from a millisecond timer wheel (every
//! stream due in a slot is written by the same wake-up). `GET` anything: `200 ok`. Keep-alive.
//!
//! `streams`: opens N streamed chat completions together (N non-blocking connects started at
//! t0; each sends its request once connected) and reads them to the end. Per stream: status,
//! time to first chunk (first `"delta"` in the de-chunked body, from t0), `"delta"` frames,
//! `data: [DONE]`. Every 10 ms: RSS (VmRSS summed over the --pids process trees) and streams
//! open (head received, [DONE] not yet). CPU (utime+stime of the trees) from t0 to the end, per
//! 1,000 chunks delivered (content frames received, at most CHUNKS per stream).
//! Prints one JSON object.
//!
//! Why not Python: 2,000 streams at 20 ms are 100,000 frames a second; an asyncio mock and client
//! (uvloop) needed ~16 µs of CPU per frame between them, more than the one core they share.

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opts = parse_opts(&args[2.min(args.len())..]);
    match args.get(1).map(String::as_str) {
        Some("mock") => mock(&opts),
        Some("streams") => streams(&opts),
        _ => {
            eprintln!("usage: aibench mock --port P [--chunks N] [--interval-ms MS]\n       aibench streams --port P [--streams N] [--chunks N] [--timeout S] [--pids P,...]");
            std::process::exit(2);
        }
    }
}

fn parse_opts(a: &[String]) -> HashMap<String, String> {
    let mut m = HashMap::new();
    let mut i = 0;
    while i < a.len() {
        let k = a[i].trim_start_matches("--").to_string();
        let v = a.get(i + 1).cloned().unwrap_or_default();
        m.insert(k, v);
        i += 2;
    }
    m
}

fn opt<T: std::str::FromStr>(m: &HashMap<String, String>, k: &str, d: T) -> T {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    h.windows(n.len()).position(|w| w == n)
}

fn count(h: &[u8], n: &[u8]) -> usize {
    if h.len() < n.len() {
        return 0;
    }
    let (mut i, mut c) = (0, 0);
    while i + n.len() <= h.len() {
        if &h[i..i + n.len()] == n {
            c += 1;
            i += n.len();
        } else {
            i += 1;
        }
    }
    c
}

fn lower(b: &[u8]) -> Vec<u8> {
    b.iter().map(|c| c.to_ascii_lowercase()).collect()
}

fn header_value(lower_head: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut pat = b"\r\n".to_vec();
    pat.extend_from_slice(name);
    pat.push(b':');
    let i = find(lower_head, &pat)? + pat.len();
    let rest = &lower_head[i..];
    let j = find(rest, b"\r\n").unwrap_or(rest.len());
    Some(rest[..j].iter().copied().filter(|c| !c.is_ascii_whitespace()).collect())
}

// ------------------------------------------------------------------------------------------ mock

const COMPLETION: &str = concat!(
    r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"gpt-mock","#,
    r#""system_fingerprint":"fp_mock","choices":[{"index":0,"message":{"role":"assistant","#,
    r#""content":"Ringway benchmark reply: this mock provider answers every chat completion with "#,
    r#"the same short text so that gateways are compared on equal work.","refusal":null},"#,
    r#""logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":32,"#,
    r#""total_tokens":49,"prompt_tokens_details":{"cached_tokens":0},"#,
    r#""completion_tokens_details":{"reasoning_tokens":0}}}"#
);
const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
const RESP_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
const RESP_404: &[u8] = b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\nnot found\n";

fn http_chunk(frame: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", frame.len()).into_bytes();
    v.extend_from_slice(frame);
    v.extend_from_slice(b"\r\n");
    v
}

struct Frames {
    json: Vec<u8>,
    content: Vec<Vec<u8>>,
    usage: Vec<u8>,
    done: Vec<u8>,
}

fn build_frames(n: usize) -> Frames {
    let mut content = Vec::with_capacity(n);
    for i in 0..n {
        let fin = if i + 1 == n { r#""stop""# } else { "null" };
        let f = format!(
            concat!(
                r#"data: {{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,"#,
                r#""model":"gpt-mock","system_fingerprint":"fp_mock","choices":[{{"index":0,"delta":"#,
                r#"{{"content":"tok{} "}},"logprobs":null,"finish_reason":{}}}]}}"#,
                "\n\n"
            ),
            i, fin
        );
        content.push(http_chunk(f.as_bytes()));
    }
    let u = format!(
        concat!(
            r#"data: {{"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1700000000,"#,
            r#""model":"gpt-mock","system_fingerprint":"fp_mock","choices":[],"usage":"#,
            r#"{{"prompt_tokens":17,"completion_tokens":{},"total_tokens":{}}}}}"#,
            "\n\n"
        ),
        n,
        n + 17
    );
    let mut done = http_chunk(b"data: [DONE]\n\n");
    done.extend_from_slice(b"0\r\n\r\n");
    let mut json = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        COMPLETION.len()
    )
    .into_bytes();
    json.extend_from_slice(COMPLETION.as_bytes());
    Frames { json, content, usage: http_chunk(u.as_bytes()), done }
}

struct MConn {
    s: TcpStream,
    id: u64,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    streaming: bool,
    usage: bool,
}

impl MConn {
    /// false: the connection failed and must be dropped.
    fn send(&mut self, b: &[u8]) -> bool {
        if !self.wbuf.is_empty() {
            self.wbuf.extend_from_slice(b);
            return true;
        }
        let mut off = 0;
        while off < b.len() {
            match self.s.write(&b[off..]) {
                Ok(0) => return false,
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.wbuf.extend_from_slice(&b[off..]);
        true
    }

    fn flush(&mut self) -> bool {
        let mut off = 0;
        while off < self.wbuf.len() {
            match self.s.write(&self.wbuf[off..]) {
                Ok(0) => return false,
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        self.wbuf.drain(..off);
        true
    }
}

enum Req {
    Incomplete,
    Bad,
    /// bytes consumed, method is POST, path ends with /chat/completions, stream, include_usage
    Done(usize, bool, bool, bool, bool),
}

fn parse_request(buf: &[u8]) -> Req {
    let end = match find(buf, b"\r\n\r\n") {
        Some(e) => e,
        None => return Req::Incomplete,
    };
    let head = &buf[..end];
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let mut parts = head[..line_end].split(|&c| c == b' ');
    let method = parts.next().unwrap_or(b"");
    let mut path = parts.next().unwrap_or(b"/");
    if let Some(q) = path.iter().position(|&c| c == b'?') {
        path = &path[..q];
    }
    let post = method == b"POST";
    let chat = path.ends_with(b"/chat/completions");
    let lh = lower(head);
    let mut pos = end + 4;
    let body: Vec<u8>;
    if let Some(cl) = header_value(&lh, b"content-length") {
        let cl: usize = match std::str::from_utf8(&cl).ok().and_then(|s| s.parse().ok()) {
            Some(v) => v,
            None => return Req::Bad,
        };
        if buf.len() < pos + cl {
            return Req::Incomplete;
        }
        body = buf[pos..pos + cl].to_vec();
        pos += cl;
    } else if header_value(&lh, b"transfer-encoding").map_or(false, |v| find(&v, b"chunked").is_some()) {
        let mut b = Vec::new();
        loop {
            let k = match find(&buf[pos..], b"\r\n") {
                Some(k) => pos + k,
                None => return Req::Incomplete,
            };
            let line = &buf[pos..k];
            let size_txt = line.split(|&c| c == b';').next().unwrap_or(b"");
            let size = match std::str::from_utf8(size_txt).ok().and_then(|s| usize::from_str_radix(s.trim(), 16).ok()) {
                Some(v) => v,
                None => return Req::Bad,
            };
            pos = k + 2;
            if size == 0 {
                loop {
                    let k = match find(&buf[pos..], b"\r\n") {
                        Some(k) => pos + k,
                        None => return Req::Incomplete,
                    };
                    if k == pos {
                        pos = k + 2;
                        break;
                    }
                    pos = k + 2;
                }
                break;
            }
            if buf.len() < pos + size + 2 {
                return Req::Incomplete;
            }
            b.extend_from_slice(&buf[pos..pos + size]);
            pos += size + 2;
        }
        body = b;
    } else {
        body = Vec::new();
    }
    let compact: Vec<u8> = body.iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
    let stream = find(&compact, br#""stream":true"#).is_some();
    let usage = find(&compact, br#""include_usage":true"#).is_some();
    Req::Done(pos, post, chat, stream, usage)
}

const LISTENER: Token = Token(usize::MAX);
const WHEEL: usize = 1 << 13; // slots of 1 ms: 8 s horizon

struct Wheel {
    slots: Vec<Vec<(usize, u64, usize)>>, // (token, conn id, next frame index)
    pending: usize,
    done_upto: u64, // every slot <= this has fired
}

impl Wheel {
    fn add(&mut self, slot: u64, e: (usize, u64, usize)) {
        let slot = slot.max(self.done_upto + 1);
        self.slots[(slot as usize) % WHEEL].push(e);
        self.pending += 1;
    }
}

fn mock(o: &HashMap<String, String>) {
    let port: u16 = opt(o, "port", 0);
    let nchunks: usize = opt(o, "chunks", 50usize).max(1);
    let interval: u64 = opt(o, "interval-ms", 20u64).max(1);
    let fr = build_frames(nchunks);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    sock.listen(8192).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut listener = TcpListener::from_std(sock.into());
    let mut poll = Poll::new().unwrap();
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE).unwrap();
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<Option<MConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut next_id: u64 = 1;
    let t_base = Instant::now();
    let now_ms = |t: Instant| t.duration_since(t_base).as_millis() as u64;
    let mut wheel = Wheel { slots: (0..WHEEL).map(|_| Vec::new()).collect(), pending: 0, done_upto: 0 };
    let mut rtmp = vec![0u8; 65536];
    println!("aibench mock on {port}: {nchunks} chunks {interval} ms apart");

    loop {
        let timeout = if wheel.pending > 0 {
            let next = Duration::from_millis(wheel.done_upto + 1);
            Some(next.saturating_sub(t_base.elapsed()))
        } else {
            None
        };
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("poll: {e}"),
        }
        let mut to_close: Vec<usize> = Vec::new();
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nodelay(true);
                            let t = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(&mut s, Token(t), Interest::READABLE | Interest::WRITABLE).unwrap();
                            conns[t] = Some(MConn { s, id: next_id, rbuf: Vec::new(), wbuf: Vec::new(), streaming: false, usage: false });
                            next_id += 1;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                continue;
            }
            let t = ev.token().0;
            let c = match conns.get_mut(t).and_then(|c| c.as_mut()) {
                Some(c) => c,
                None => continue,
            };
            if ev.is_writable() && !c.wbuf.is_empty() && !c.flush() {
                to_close.push(t);
                continue;
            }
            if ev.is_readable() || ev.is_read_closed() {
                let mut eof = false;
                loop {
                    match c.s.read(&mut rtmp) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => c.rbuf.extend_from_slice(&rtmp[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            eof = true;
                            break;
                        }
                    }
                }
                if eof {
                    to_close.push(t);
                    continue;
                }
                if !serve(c, t, &fr, &mut wheel, now_ms(Instant::now()) + interval) {
                    to_close.push(t);
                }
            }
        }
        // Paced frames whose slot has come.
        let now = now_ms(Instant::now());
        while wheel.done_upto < now && wheel.pending > 0 {
            let slot = wheel.done_upto + 1;
            let list = std::mem::take(&mut wheel.slots[(slot as usize) % WHEEL]);
            wheel.done_upto = slot;
            wheel.pending -= list.len();
            for (t, id, idx) in list {
                let c = match conns.get_mut(t).and_then(|c| c.as_mut()) {
                    Some(c) if c.id == id => c,
                    _ => continue,
                };
                if !c.send(&fr.content[idx]) {
                    to_close.push(t);
                    continue;
                }
                if idx + 1 < fr.content.len() {
                    wheel.add(slot + interval, (t, id, idx + 1));
                } else {
                    let ok = (!c.usage || c.send(&fr.usage)) && c.send(&fr.done);
                    c.streaming = false;
                    if !ok || !serve(c, t, &fr, &mut wheel, slot + interval) {
                        to_close.push(t);
                    }
                }
            }
        }
        if wheel.pending == 0 {
            wheel.done_upto = wheel.done_upto.max(now);
        }
        for t in to_close {
            if let Some(mut c) = conns[t].take() {
                let _ = poll.registry().deregister(&mut c.s);
                free.push(t);
            }
        }
    }
}

/// Answers the whole requests in c.rbuf (stops at a stream until it ends). false: close.
fn serve(c: &mut MConn, t: usize, fr: &Frames, wheel: &mut Wheel, first_slot: u64) -> bool {
    while !c.streaming {
        match parse_request(&c.rbuf) {
            Req::Incomplete => return true,
            Req::Bad => return false,
            Req::Done(n, post, chat, stream, usage) => {
                c.rbuf.drain(..n);
                let ok = if !post {
                    c.send(RESP_OK)
                } else if !chat {
                    c.send(RESP_404)
                } else if stream {
                    c.usage = usage;
                    let mut first = SSE_HEAD.to_vec();
                    first.extend_from_slice(&fr.content[0]);
                    if fr.content.len() == 1 {
                        if usage {
                            first.extend_from_slice(&fr.usage);
                        }
                        first.extend_from_slice(&fr.done);
                        c.send(&first)
                    } else {
                        c.streaming = true;
                        wheel.add(first_slot, (t, c.id, 1));
                        c.send(&first)
                    }
                } else {
                    c.send(&fr.json)
                };
                if !ok {
                    return false;
                }
            }
        }
    }
    true
}

// --------------------------------------------------------------------------------------- streams

#[derive(Clone, Copy, PartialEq)]
enum Body {
    Head,
    Chunked,
    Length(usize),
    Eof,
}

#[derive(Clone, Copy)]
enum Ck {
    Size,
    Data(usize),
    Crlf(u8),
    Trailer,
}

struct SConn {
    s: Option<TcpStream>,
    sent: bool,
    head: Vec<u8>,
    status: u16,
    body: Body,
    ck: Ck,
    line: Vec<u8>,
    carry: Vec<u8>,
    frames: u32,
    t_head: Option<f64>,
    t_first: Option<f64>,
    t_done: Option<f64>,
    t_end: Option<f64>,
    err: Option<&'static str>,
}

impl SConn {
    /// Decoded body bytes: count frames, see [DONE].
    fn body_bytes(&mut self, d: &[u8], now: f64, open: &mut i64) {
        let mut s = std::mem::take(&mut self.carry);
        s.extend_from_slice(d);
        let n = count(&s, br#""delta""#);
        if n > 0 {
            self.frames += n as u32;
            if self.t_first.is_none() {
                self.t_first = Some(now);
            }
        }
        if self.t_done.is_none() && find(&s, b"data: [DONE]").is_some() {
            self.t_done = Some(now);
            *open -= 1;
        }
        // `"delta"` is 7 bytes: a 6-byte carry never holds a whole (already counted) match, and
        // finds one split across two reads. ([DONE] split across reads: seen at the end anyway.)
        let keep = s.len().min(6);
        self.carry = s[s.len() - keep..].to_vec();
    }

    /// Feeds raw bytes; true when the response is complete.
    fn feed(&mut self, mut d: &[u8], now: f64, open: &mut i64) -> bool {
        if self.body == Body::Head {
            self.head.extend_from_slice(d);
            let e = match find(&self.head, b"\r\n\r\n") {
                Some(e) => e,
                None => return false,
            };
            let head = std::mem::take(&mut self.head);
            self.t_head = Some(now);
            *open += 1;
            self.status = std::str::from_utf8(&head[9..12.min(head.len())]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            let lh = lower(&head[..e]);
            self.body = if header_value(&lh, b"transfer-encoding").map_or(false, |v| find(&v, b"chunked").is_some()) {
                Body::Chunked
            } else if let Some(cl) = header_value(&lh, b"content-length") {
                Body::Length(std::str::from_utf8(&cl).ok().and_then(|s| s.parse().ok()).unwrap_or(0))
            } else {
                Body::Eof
            };
            let rest = head[e + 4..].to_vec();
            if let Body::Length(0) = self.body {
                return true;
            }
            return self.feed_body(&rest, now, open);
        }
        self.feed_body(std::mem::take(&mut d), now, open)
    }

    fn feed_body(&mut self, d: &[u8], now: f64, open: &mut i64) -> bool {
        match self.body {
            Body::Head => false,
            Body::Eof => {
                self.body_bytes(d, now, open);
                false
            }
            Body::Length(left) => {
                let take = d.len().min(left);
                self.body_bytes(&d[..take], now, open);
                self.body = Body::Length(left - take);
                left - take == 0
            }
            Body::Chunked => {
                let mut i = 0;
                while i < d.len() {
                    match self.ck {
                        Ck::Size => {
                            let b = d[i];
                            i += 1;
                            if b == b'\n' {
                                let txt = String::from_utf8_lossy(&self.line).to_string();
                                let size_txt = txt.trim().split(';').next().unwrap_or("").trim().to_string();
                                let size = usize::from_str_radix(&size_txt, 16).unwrap_or(0);
                                self.line.clear();
                                self.ck = if size == 0 { Ck::Trailer } else { Ck::Data(size) };
                            } else {
                                self.line.push(b);
                            }
                        }
                        Ck::Data(left) => {
                            let take = (d.len() - i).min(left);
                            self.body_bytes(&d[i..i + take], now, open);
                            i += take;
                            self.ck = if left == take { Ck::Crlf(2) } else { Ck::Data(left - take) };
                        }
                        Ck::Crlf(n) => {
                            i += 1;
                            self.ck = if n == 1 { Ck::Size } else { Ck::Crlf(n - 1) };
                        }
                        Ck::Trailer => {
                            let b = d[i];
                            i += 1;
                            if b == b'\n' {
                                let empty = self.line.iter().all(|&c| c == b'\r');
                                self.line.clear();
                                if empty {
                                    return true;
                                }
                            } else {
                                self.line.push(b);
                            }
                        }
                    }
                }
                false
            }
        }
    }
}

/// One readiness event for a stream. true: the stream ended (its socket is then dropped).
fn stream_event(c: &mut SConn, s: &mut TcpStream, ev: &mio::event::Event, now: f64, req: &[u8], rtmp: &mut [u8], open: &mut i64) -> bool {
    let end = |c: &mut SConn, err: Option<&'static str>, open: &mut i64| {
        c.err = err;
        c.t_end = Some(now);
        if c.t_head.is_some() && c.t_done.is_none() {
            *open -= 1;
        }
        true
    };
    if !c.sent {
        if !ev.is_writable() && !ev.is_error() {
            return false;
        }
        match s.take_error() {
            Ok(Some(_)) | Err(_) => return end(c, Some("connect"), open),
            Ok(None) => {}
        }
        if s.peer_addr().is_err() {
            if ev.is_error() || ev.is_write_closed() {
                return end(c, Some("connect"), open);
            }
            return false;
        }
        match s.write(req) {
            Ok(k) if k == req.len() => c.sent = true,
            _ => return end(c, Some("write"), open),
        }
    }
    if !(ev.is_readable() || ev.is_read_closed() || ev.is_error()) {
        return false;
    }
    loop {
        match s.read(rtmp) {
            Ok(0) => {
                let err = if c.body == Body::Eof { None } else { Some("closed") };
                return end(c, err, open);
            }
            Ok(k) => {
                if c.feed(&rtmp[..k], now, open) {
                    return end(c, None, open);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return end(c, Some("reset"), open),
        }
    }
}

fn proc_tree(roots: &[u32]) -> Vec<u32> {
    let mut kids: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            let pid: u32 = match name.to_str().and_then(|s| s.parse().ok()) {
                Some(p) => p,
                None => continue,
            };
            if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if let Some(r) = st.rfind(')') {
                    let f: Vec<&str> = st[r + 2..].split_whitespace().collect();
                    if let Some(pp) = f.get(1).and_then(|s| s.parse().ok()) {
                        kids.entry(pp).or_default().push(pid);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = roots.to_vec();
    while let Some(p) = todo.pop() {
        out.push(p);
        if let Some(k) = kids.get(&p) {
            todo.extend(k);
        }
    }
    out
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    let mut t = 0;
    for p in pids {
        if let Ok(st) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            if let Some(r) = st.rfind(')') {
                let f: Vec<&str> = st[r + 2..].split_whitespace().collect();
                t += f.get(11).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                t += f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    t
}

fn rss_kb(pids: &[u32]) -> u64 {
    let mut t = 0;
    for p in pids {
        if let Ok(st) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            for l in st.lines() {
                if let Some(v) = l.strip_prefix("VmRSS:") {
                    t += v.split_whitespace().next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                    break;
                }
            }
        }
    }
    t
}

fn pct(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let i = ((q / 100.0 * v.len() as f64 + 0.5).round() as isize - 1).clamp(0, v.len() as isize - 1);
    Some(v[i as usize])
}

fn jnum(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{:.3}", v),
        _ => "null".into(),
    }
}

fn ms_stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let ms = |x: Option<f64>| jnum(x.map(|s| s * 1000.0));
    let mean = if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) };
    format!(
        r#"{{"n": {}, "p50_ms": {}, "p90_ms": {}, "p99_ms": {}, "max_ms": {}, "mean_ms": {}}}"#,
        v.len(),
        ms(pct(&v, 50.0)),
        ms(pct(&v, 90.0)),
        ms(pct(&v, 99.0)),
        ms(v.last().copied()),
        ms(mean)
    )
}

fn streams(o: &HashMap<String, String>) {
    let port: u16 = opt(o, "port", 0);
    let n: usize = opt(o, "streams", 2000usize);
    let nchunks: u64 = opt(o, "chunks", 50u64);
    let timeout: f64 = opt(o, "timeout", 60.0f64);
    let path = o.get("path").cloned().unwrap_or_else(|| "/v1/chat/completions".into());
    let key = o.get("key").cloned().unwrap_or_else(|| "sk-bench".into());
    let model = o.get("model").cloned().unwrap_or_else(|| "gpt-mock".into());
    let roots: Vec<u32> = o.get("pids").map(|s| s.split(',').filter_map(|p| p.trim().parse().ok()).collect()).unwrap_or_default();
    let body = format!(
        r#"{{"model":"{model}","stream":true,"max_tokens":64,"messages":[{{"role":"user","content":"Stream a short answer to the benchmark."}}]}}"#
    );
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let procs = proc_tree(&roots);
    let idle = if roots.is_empty() { 0 } else { rss_kb(&procs) };
    let clk = 100.0f64; // CLK_TCK on Linux
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(4096);
    let mut conns: Vec<SConn> = Vec::with_capacity(n);
    let mut samples: Vec<(f64, i64, u64)> = Vec::new();
    let mut open: i64 = 0;
    let mut ended = 0usize;
    let c0 = cpu_ticks(&procs);
    let t0 = Instant::now();
    let el = |t0: Instant| t0.elapsed().as_secs_f64();
    for i in 0..n {
        let mut sc = SConn {
            s: TcpStream::connect(addr).ok(),
            sent: false,
            head: Vec::new(),
            status: 0,
            body: Body::Head,
            ck: Ck::Size,
            line: Vec::new(),
            carry: Vec::new(),
            frames: 0,
            t_head: None,
            t_first: None,
            t_done: None,
            t_end: None,
            err: None,
        };
        match sc.s.as_mut() {
            Some(s) => poll.registry().register(s, Token(i), Interest::READABLE | Interest::WRITABLE).unwrap(),
            None => {
                sc.err = Some("connect");
                sc.t_end = Some(el(t0));
                ended += 1;
            }
        }
        conns.push(sc);
    }
    let launch = el(t0);
    let mut rtmp = vec![0u8; 65536];
    let mut next_sample = 0.0f64;
    let mut timed_out = false;
    let batch: f64 = opt(o, "batch-ms", 0.0f64) / 1000.0;
    let mut last_poll = 0.0f64;
    while ended < n {
        let now = el(t0);
        if now >= timeout {
            timed_out = true;
            break;
        }
        if !roots.is_empty() && now >= next_sample {
            samples.push((now, open, rss_kb(&procs)));
            next_sample = now + 0.01;
        }
        if batch > 0.0 {
            // Let events gather: fewer, fuller epoll_waits (the client shares a core with the mock).
            let since = now - last_poll;
            if since < batch {
                std::thread::sleep(Duration::from_secs_f64(batch - since));
            }
            last_poll = el(t0);
        }
        let wait = if roots.is_empty() { 0.05 } else { (next_sample - now).max(0.0) };
        match poll.poll(&mut events, Some(Duration::from_secs_f64(wait.min(timeout - now)))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("poll: {e}"),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let c = &mut conns[i];
            if c.t_end.is_some() {
                continue;
            }
            let mut sock = match c.s.take() {
                Some(s) => s,
                None => continue,
            };
            let r = stream_event(c, &mut sock, ev, el(t0), &req, &mut rtmp, &mut open);
            if r {
                ended += 1;
                let _ = poll.registry().deregister(&mut sock);
                drop(sock);
            } else {
                c.s = Some(sock);
            }
        }
    }
    let wall = el(t0);
    let c1 = cpu_ticks(&procs);
    if timed_out {
        for c in conns.iter_mut() {
            if c.t_end.is_none() {
                c.err = Some("timeout");
                c.t_end = Some(wall);
            }
        }
    }
    let mut status: HashMap<u16, usize> = HashMap::new();
    let mut errors: HashMap<&str, usize> = HashMap::new();
    for c in &conns {
        *status.entry(c.status).or_default() += 1;
        if let Some(e) = c.err {
            *errors.entry(e).or_default() += 1;
        }
    }
    let good: Vec<&SConn> = conns.iter().filter(|c| c.status == 200 && c.t_done.is_some() && c.err.is_none()).collect();
    let frames: u64 = conns.iter().map(|c| c.frames as u64).sum();
    // Chunks the provider delivered through the gateway: each stream's content frames, at most
    // CHUNKS (LiteLLM adds a closing frame of its own); partly delivered streams count too.
    let chunks: u64 = conns.iter().map(|c| (c.frames as u64).min(nchunks)).sum();
    let ttft: Vec<f64> = conns.iter().filter_map(|c| c.t_first).collect();
    let dur: Vec<f64> = good.iter().filter_map(|c| Some(c.t_done? - c.t_first?)).collect();
    let cpu_us = (c1 - c0) as f64 / clk * 1e6;
    let jmap = |m: Vec<(String, usize)>| {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        format!("{{{}}}", parts.join(", "))
    };
    let mut st: Vec<(String, usize)> = status.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    st.sort();
    let mut er: Vec<(String, usize)> = errors.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    er.sort();
    let mut out = format!(
        concat!(
            r#"{{"mode": "streams", "port": {}, "streams": {}, "launch_s": {:.3}, "wall_s": {:.3}, "#,
            r#""status": {}, "errors": {}, "complete_200": {}, "non_200": {}, "frames": {}, "#,
            r#""frames_per_stream_min": {}, "frames_per_stream_max": {}, "ttft": {}, "first_to_done": {}, "#,
            r#""chunks": {}, "cpu_s": {}, "cpu_us_per_1000_chunks": {}, "pids": {:?}"#
        ),
        port,
        n,
        launch,
        wall,
        jmap(st),
        jmap(er),
        good.len(),
        conns.iter().filter(|c| c.status != 200).count(),
        frames,
        good.iter().map(|c| c.frames).min().unwrap_or(0),
        good.iter().map(|c| c.frames).max().unwrap_or(0),
        ms_stats(ttft),
        ms_stats(dur),
        chunks,
        if roots.is_empty() { "null".into() } else { format!("{:.3}", cpu_us / 1e6) },
        if roots.is_empty() || chunks == 0 { "null".into() } else { format!("{:.1}", cpu_us / (chunks as f64 / 1000.0)) },
        procs
    );
    if !roots.is_empty() && !samples.is_empty() {
        let mx = samples.iter().map(|s| s.1).max().unwrap_or(0);
        let at = samples.iter().find(|s| s.1 == mx).unwrap();
        let peak = samples.iter().map(|s| s.2).max().unwrap_or(0);
        let per = if mx > 0 { Some((at.2 as f64 - idle as f64) * 1024.0 / mx as f64) } else { None };
        out += &format!(
            r#", "rss_idle_kb": {}, "max_open": {}, "rss_at_max_open_kb": {}, "t_max_open_s": {:.3}, "rss_peak_kb": {}, "bytes_per_open_stream": {}"#,
            idle,
            mx,
            at.2,
            at.0,
            peak,
            per.map(|v| format!("{:.0}", v)).unwrap_or_else(|| "null".into())
        );
    }
    out += "}";
    println!("{out}");
}
