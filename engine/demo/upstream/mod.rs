//! The built-in upstream behind `ringway demo`: a small OpenAI- and Anthropic-compatible
//! HTTP/1.1 server on loopback, so a first look at Ringway needs no API key and no network.
//!
//! It deliberately lives outside the io_uring workers: it runs on its own std threads (one
//! accept thread, one thread per connection), so it can never block or perturb the data path
//! it is there to demonstrate.
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
//!
//! An instance started with [`DemoUpstream::start_flaky`] fails on demand, so the demo can
//! show a fallback to a second provider. It obeys a request header `x-demo-fail`:
//! - `429`: 429 with a rate-limit error body and `Retry-After: 1`;
//! - `500`, `502`, `503`, `504`, `529`: that status with a JSON error body;
//! - `stall`: reads the request, then sends nothing until the client closes or 60 s pass;
//! - `reset`: closes the connection with a TCP reset, without answering;
//! - anything else: 400 naming the header.
//!
//! Error bodies take OpenAI's shape, or Anthropic's on `/v1/messages`. An instance started
//! with [`DemoUpstream::start`] ignores the header: a fallback forwards it to every provider
//! it tries, and only the flaky one may act on it.
//!
//! # Layout
//!
//! - this file: [`DemoUpstream`] (start, stop), the accept loop, one request at a time per
//!   connection, and routing by method and path.
//! - `http`: reading requests (httparse heads, Content-Length and chunked bodies, bounded
//!   sizes) and writing responses and event streams.
//! - `prompt`: what is read from a chat request body (serde_json).
//! - `reply`: the reply text, its stream deltas and token counts.
//! - `openai`, `anthropic`: each API's bodies, streams and error shape.
//! - `faults`: the failures a flaky instance produces on demand.

mod anthropic;
mod faults;
mod http;
mod openai;
mod prompt;
mod reply;
#[cfg(test)]
mod tests;

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use faults::Faults;
use http::{After, Conn, ConnError, ConnMode, Request, Response};

/// Thread-per-connection must still be bounded: past this many live connections, 503.
const MAX_CONNECTIONS: usize = 1024;

/// A running demo upstream. Dropping it (or calling [`DemoUpstream::shutdown`]) stops it:
/// the accept thread is joined, and connection threads exit within about 200 ms (a stream in
/// progress finishes its current write first).
pub struct DemoUpstream {
    /// The loopback address it listens on (`127.0.0.1:<ephemeral port>`).
    pub addr: SocketAddr,
    /// Tells the accept and connection threads to stop.
    stop: Arc<AtomicBool>,
    /// Joined on drop, so the listener is closed when `drop` returns.
    accept: Option<JoinHandle<()>>,
}

impl DemoUpstream {
    /// Binds 127.0.0.1:0 and serves in background threads, as a healthy provider.
    pub fn start() -> io::Result<DemoUpstream> {
        Self::start_with(Faults::Ignore)
    }

    /// As [`DemoUpstream::start`], but failing on demand: it obeys `x-demo-fail`.
    pub fn start_flaky() -> io::Result<DemoUpstream> {
        Self::start_with(Faults::OnDemand)
    }

    fn start_with(faults: Faults) -> io::Result<DemoUpstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            stop: stop.clone(),
            live: AtomicUsize::new(0),
            faults,
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

/// What the accept thread shares with the connection threads.
struct Shared {
    /// Set on drop; connection threads poll it between reads.
    stop: Arc<AtomicBool>,
    /// Live connections, for the `MAX_CONNECTIONS` bound.
    live: AtomicUsize,
    /// Whether requests may ask for failures.
    faults: Faults,
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
            let e = openai::ErrorBody::new(
                "too many connections to the demo upstream",
                "server_error",
                "overloaded",
            );
            if let Ok(answer) = Response::json(503, &e) {
                let _ = answer.write(&mut stream, ConnMode::CLOSE);
            }
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

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let Ok(mut conn) = Conn::new(stream, &shared.stop) else {
        return;
    };
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let (req, body) = match conn.read_request() {
            Ok(Some(r)) => r,
            Ok(None) | Err(ConnError::Gone) => return,
            Err(ConnError::Http(e)) => {
                let body = openai::ErrorBody::new(e.message, "invalid_request_error", e.code);
                if let Ok(answer) = Response::json(e.status, &body) {
                    conn.fail_and_close(&answer);
                }
                return;
            }
        };
        match respond(&mut conn, &req, &body, shared.faults) {
            Ok(After::KeepAlive) => {}
            Ok(After::Abandon) => return,
            Ok(After::Close) | Err(_) => {
                let _ = conn.stream().shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

/// Answers one request, or fails it as it asks when `faults` allows.
fn respond(conn: &mut Conn<'_>, req: &Request, body: &[u8], faults: Faults) -> io::Result<After> {
    if faults == Faults::OnDemand {
        if let Some(done) = faults::inject(conn, req) {
            return done;
        }
    }
    let (w, mode) = (conn.stream(), req.mode);
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/chat/completions") => openai::chat_completions(w, mode, body),
        ("POST", "/v1/messages") => anthropic::messages(w, mode, body),
        ("GET", "/v1/models") => openai::models(w, mode),
        ("GET", "/healthz") => Response::text(200, "ok").write(w, mode),
        (m, p) => {
            let message = format!("Invalid URL ({m} {p})");
            let e = openai::ErrorBody::new(&message, "invalid_request_error", "not_found");
            Response::json(404, &e)?.write(w, mode)
        }
    }
}
