//! The admin listener (`[admin] listen`): `/healthz`, `/ready`, `/metrics`
//! (Prometheus text), `/stats` (JSON per worker) and `POST /reload`.
//!
//! It runs on its own thread with blocking sockets, one request per
//! connection: it is for operators and scrapers, never on the data path.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use crate::{log, metrics::registry, reload, runtime};

/// Binds the admin address and serves it on a new thread.
pub fn spawn(addr: SocketAddr) -> Result<(), String> {
    let listener =
        TcpListener::bind(addr).map_err(|e| format!("admin.listen: cannot bind {addr}: {e}"))?;
    thread::Builder::new()
        .name("ringway-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = serve(s) {
                            log::debug(&format!("admin: {e}"));
                        }
                    }
                    Err(e) => {
                        log::warn(&format!("admin: accept failed: {e}"));
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the admin thread: {e}"))?;
    Ok(())
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let (method, path) = loop {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                );
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return respond(&mut s, 400, "text/plain", "bad request\n"),
        }
    };
    let (path, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
    match (method.as_str(), path) {
        ("GET", "/usage") => {
            let (status, body) = crate::usage_api::answer(query);
            respond(&mut s, status, "application/json", &body)
        }
        ("GET", "/healthz") => respond(&mut s, 200, "text/plain", "ok\n"),
        ("GET", "/ready") => {
            if runtime::shutdown::is_draining() {
                respond(&mut s, 503, "text/plain", "draining\n")
            } else if runtime::current().is_some() {
                respond(&mut s, 200, "text/plain", "ready\n")
            } else {
                respond(&mut s, 503, "text/plain", "starting\n")
            }
        }
        ("GET", "/metrics") => {
            let mut out = String::with_capacity(16 * 1024);
            registry().render(&mut out);
            crate::filter::render_metrics(&mut out);
            crate::ai::series::render_metrics(&mut out);
            respond(
                &mut s,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &out,
            )
        }
        ("GET", "/stats") => respond(&mut s, 200, "application/json", &stats_json()),
        ("POST", "/reload") => match reload::reload() {
            Ok(msg) => respond(
                &mut s,
                200,
                "application/json",
                &format!("{{\"status\":\"ok\",\"message\":{}}}\n", json_str(&msg)),
            ),
            Err(e) => respond(
                &mut s,
                400,
                "application/json",
                &format!("{{\"status\":\"error\",\"message\":{}}}\n", json_str(&e)),
            ),
        },
        _ => respond(&mut s, 404, "text/plain", "not found\n"),
    }
}

fn respond(s: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = crate::proxy::error::reason(status);
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}

/// `/stats`: per-worker connections, buffers, driver; per-worker pool sizes.
fn stats_json() -> String {
    let r = registry();
    let mut out = String::from("{\"workers\":[");
    for (i, (id, w)) in r.worker_stats().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"id\":{id},\"driver\":{},\"connections\":{},\"accepted\":{},\"buffers_in_use\":{},\"buffers_capacity\":{},\"buffers_peak\":{},\"buffers_in_ring\":{},\"ring_receives\":{},\"ring_empty\":{},\"ring_dry_reads\":{},\"receive\":{}}}",
            json_str(w.driver),
            w.connections,
            w.accepted,
            w.buffers_in_use,
            w.buffers_capacity,
            w.buffers_peak,
            w.buffers_in_ring,
            w.ring_receives,
            w.ring_empty,
            w.ring_dry_reads,
            json_str(w.receive)
        );
    }
    out.push_str("],\"upstreams\":[");
    for (i, (name, worker, open, idle, connects)) in r.upstream_stats().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"name\":{},\"worker\":{worker},\"open\":{open},\"idle\":{idle},\"connects\":{connects}}}",
            json_str(name)
        );
    }
    let _ = writeln!(out, "],\"draining\":{}}}", runtime::shutdown::is_draining());
    out
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
