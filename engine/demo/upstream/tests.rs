//! Whole-server tests: a real `DemoUpstream` on loopback, spoken to with raw bytes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{MAX_BODY, MAX_HEAD};
use super::DemoUpstream;

/// The top-level keys of a JSON object in wire order (`Value` sorts them).
fn keys(body: &[u8]) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        m.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(k);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Keys>(body).unwrap().0
}

fn parse_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("bad JSON {e}: {}", String::from_utf8_lossy(bytes)))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

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
    fn json(&self) -> Value {
        parse_json(&self.body)
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

    /// A POST with extra header lines (each ending in CRLF).
    fn post_with(&mut self, path: &str, headers: &str, body: &str) -> Resp {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: demo\r\n{headers}Content-Length: {}\r\n\r\n{body}",
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

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{k}: expected string in {v}"))
}
fn n(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{k}: expected number in {v}"))
}
fn arr<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{k}: expected array in {v}"))
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
        keys(&r.body),
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
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|(_, d)| parse_json(d.as_bytes()))
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
            Some(&Value::Null),
            "chunk {i} must carry usage:null"
        );
        assert_eq!(choices.len(), 1);
        let delta = choices[0].get("delta").unwrap();
        if i == 0 {
            assert_eq!(s(delta, "role"), "assistant");
        }
        if i == chunks.len() - 2 {
            assert_eq!(s(&choices[0], "finish_reason"), "stop");
            assert_eq!(delta, &json!({}));
        } else {
            assert_eq!(choices[0].get("finish_reason"), Some(&Value::Null));
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
        let ch = parse_json(d.as_bytes());
        assert_eq!(
            ch.get("usage"),
            None,
            "no usage field at all without include_usage"
        );
        assert_eq!(arr(&ch, "choices").len(), 1);
    }
    let last = parse_json(frames[frames.len() - 2].1.as_bytes());
    assert_eq!(s(&arr(&last, "choices")[0], "finish_reason"), "stop");
    // The connection stays usable after a chunked stream.
    assert_eq!(c.get("/healthz").text(), "ok");
}

#[test]
fn anthropic_non_stream() {
    let srv = DemoUpstream::start().unwrap();
    let mut c = Client::connect(&srv);
    let body = r#"{"model":"claude-demo","max_tokens":64,"system":"Be brief.","messages":[{"role":"user","content":[{"type":"text","text":"Hi Claude"}]}]}"#;
    let r = c.post("/v1/messages", body);
    let v = r.json();
    assert_eq!(
        keys(&r.body),
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
    let data: Vec<Value> = frames
        .iter()
        .map(|(_, d)| parse_json(d.as_bytes()))
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
        assert_eq!(keys(&r.body), ["error"]);
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
    c.send(b"GET /healthz HTTP/1.1\r\n\r\nGET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n");
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
        let _ = w.write_all(b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
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

/// What the hand-written parser and escaper guaranteed, now from serde_json: escapes decoded on
/// the way in, control characters escaped on the way out, duplicate keys resolved to the last,
/// and deep nesting refused with a 400 rather than a stack overflow.
#[test]
fn json_round_trips_and_hostile_json_is_refused() {
    let srv = DemoUpstream::start().unwrap();
    let mut c = Client::connect(&srv);
    let tricky = "a\"b\\c\nd\u{1}\u{1f}\u{7f}é😀</script>";
    let body = json!({"messages": "x", "model": tricky}).to_string();
    // The later "messages" wins over the string above.
    let body = format!(
        r#"{},"messages":[{{"role":"user","content":"q\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"}}]}}"#,
        body.trim_end_matches('}')
    );
    let r = c.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // Control characters go out escaped (DEL is legal JSON as it is).
    assert!(
        r.text().contains("d\\u0001\\u001f\u{7f}é😀</script>"),
        "{}",
        r.text()
    );
    let v = r.json();
    assert_eq!(s(&v, "model"), tricky);
    let msg = arr(&v, "choices")[0].get("message").unwrap();
    assert_eq!(s(msg, "content"), "Ringway demo reply to: q\"\\/\u{8} é😀");
    let deep = format!(r#"{{"messages":[],"x":{}}}"#, "[".repeat(100_000));
    let r = c.post("/v1/chat/completions", &deep);
    assert_eq!(r.status, 400);
    assert!(s(r.json().get("error").unwrap(), "message").contains("recursion limit"));
    assert_eq!(c.get("/healthz").status, 200);
}

const CHAT: &str = r#"{"model":"demo-1","messages":[{"role":"user","content":"Hi"}]}"#;
const MESSAGES: &str =
    r#"{"model":"claude-demo","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

/// A flaky instance answers each error status it is asked for, in OpenAI's shape on chat, with
/// `Retry-After: 1` on 429 only, and keeps the connection for the next request.
#[test]
fn flaky_answers_each_status_in_openai_shape() {
    let srv = DemoUpstream::start_flaky().unwrap();
    let mut c = Client::connect(&srv);
    for (status, kind, code) in [
        (429, "requests", "rate_limit_exceeded"),
        (500, "server_error", "internal_error"),
        (502, "server_error", "bad_gateway"),
        (503, "server_error", "service_unavailable"),
        (504, "server_error", "timeout"),
        (529, "server_error", "overloaded"),
    ] {
        let r = c.post_with(
            "/v1/chat/completions",
            &format!("x-demo-fail: {status}\r\n"),
            CHAT,
        );
        assert_eq!(r.status, status);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let retry_after = (status == 429).then_some("1");
        assert_eq!(r.header("retry-after"), retry_after, "{status}");
        assert_eq!(keys(&r.body), ["error"]);
        let e = r.json()["error"].clone();
        // OpenAI's field order, exactly.
        let tail = format!(r#"","type":"{kind}","param":null,"code":"{code}"}}}}"#);
        assert!(
            r.text().starts_with(r#"{"error":{"message":""#),
            "{}",
            r.text()
        );
        assert!(r.text().ends_with(&tail), "{}", r.text());
        assert_eq!((s(&e, "type"), s(&e, "code")), (kind, code), "{status}");
        assert!(s(&e, "message").contains(&format!("x-demo-fail: {status}")));
        assert_eq!(e["param"], Value::Null);
    }
    // Without the header the flaky instance is a normal provider, on the same connection.
    let r = c.post("/v1/chat/completions", CHAT);
    assert_eq!(r.status, 200);
    assert_eq!(c.get("/healthz").text(), "ok");
}

/// On Anthropic's endpoint the failures come in Anthropic's error shape.
#[test]
fn flaky_answers_in_anthropic_shape_on_messages() {
    let srv = DemoUpstream::start_flaky().unwrap();
    let mut c = Client::connect(&srv);
    for (status, kind) in [
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ] {
        let r = c.post_with(
            "/v1/messages",
            &format!("X-Demo-Fail: {status}\r\n"),
            MESSAGES,
        );
        assert_eq!(r.status, status);
        assert_eq!(r.header("retry-after"), (status == 429).then_some("1"));
        let v = r.json();
        assert_eq!(keys(&r.body), ["type", "error"]);
        assert_eq!(s(&v, "type"), "error");
        assert_eq!(s(&v["error"], "type"), kind, "{status}");
        assert!(!s(&v["error"], "message").is_empty());
    }
}

/// An unknown value is a 400 that names the header, in the endpoint's shape.
#[test]
fn flaky_refuses_an_unknown_value_naming_the_header() {
    let srv = DemoUpstream::start_flaky().unwrap();
    let mut c = Client::connect(&srv);
    let r = c.post_with("/v1/chat/completions", "x-demo-fail: 418\r\n", CHAT);
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(s(e, "param"), "x-demo-fail");
    assert_eq!(s(e, "type"), "invalid_request_error");
    assert_eq!(
        s(e, "message"),
        "Unknown x-demo-fail value \"418\": use 429, 500, 502, 503, 504, 529, stall or reset."
    );
    let r = c.post_with("/v1/messages", "x-demo-fail: sometimes\r\n", MESSAGES);
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(s(&v["error"], "type"), "invalid_request_error");
    assert!(s(&v["error"], "message").contains("x-demo-fail"));
    // Still usable afterwards.
    assert_eq!(c.post("/v1/chat/completions", CHAT).status, 200);
}

/// `stall` reads the request and sends nothing; when the client closes its side, the server
/// closes too, still without a byte.
#[test]
fn flaky_stall_sends_nothing_until_the_client_leaves() {
    let srv = DemoUpstream::start_flaky().unwrap();
    let mut c = Client::connect(&srv);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nx-demo-fail: stall\r\nContent-Length: {}\r\n\r\n{CHAT}",
            CHAT.len()
        )
        .as_bytes(),
    );
    c.s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 1];
    let e = c.s.read(&mut b).unwrap_err();
    assert!(matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.s.read(&mut b).unwrap(), 0, "closed without an answer");
    // A stall in progress does not hold up a stop.
    let mut c = Client::connect(&srv);
    c.send(b"GET /healthz HTTP/1.1\r\nx-demo-fail: stall\r\n\r\n");
    c.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(c.s.read(&mut b).is_err());
    let t = Instant::now();
    drop(srv);
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(c.s.read(&mut b).unwrap(), 0);
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// `reset` reads the request and resets the connection without answering.
#[test]
fn flaky_reset_closes_without_answering() {
    let srv = DemoUpstream::start_flaky().unwrap();
    let mut c = Client::connect(&srv);
    c.send(b"GET /v1/models HTTP/1.1\r\nx-demo-fail: reset\r\n\r\n");
    let mut b = [0u8; 1];
    let e = c.s.read(&mut b).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    // The server itself carries on.
    assert_eq!(Client::connect(&srv).get("/healthz").status, 200);
}

/// A healthy instance ignores the header, whatever its value: on a fallback it is forwarded
/// to every provider tried.
#[test]
fn healthy_ignores_x_demo_fail() {
    let srv = DemoUpstream::start().unwrap();
    let mut c = Client::connect(&srv);
    for value in ["429", "503", "stall", "reset", "nonsense"] {
        let h = format!("x-demo-fail: {value}\r\n");
        let r = c.post_with("/v1/chat/completions", &h, CHAT);
        assert_eq!(r.status, 200, "{value}");
        assert_eq!(r.header("retry-after"), None);
        assert_eq!(
            c.post_with("/v1/messages", &h, MESSAGES).status,
            200,
            "{value}"
        );
    }
}
