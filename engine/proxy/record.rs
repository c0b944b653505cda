//! The record of one request: route metrics and its access-log line,
//! written when the exchange ends, on every path.

use std::{io::Write as _, net::SocketAddr, rc::Rc, time::Instant};

use super::request::{Plan, RequestId, HEADROOM};
use crate::{
    accesslog,
    runtime::{Generation, Worker},
    transport::Stream,
};

/// Counts a request in its route's metrics, and writes its access-log line,
/// when the exchange ends — on every path: 499 (as nginx logs it) when the
/// client left before an answer.
pub(super) struct Record<'a> {
    w: &'a Worker,
    g: &'a Generation,
    route: usize,
    start: Instant,
    pub(super) status: u16,
    peer: SocketAddr,
    request_id: RequestId,
    consumer: Option<u32>,
    pub(super) upstream: Option<SocketAddr>,
    /// The upstream (index) that served the request, and the attempts it took.
    served: Option<(usize, u32)>,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) upstream_time: Option<std::time::Duration>,
    /// The model an AI request asked for.
    pub(super) model: Option<String>,
    /// Input and output tokens, and whether they were estimated.
    pub(super) tokens: Option<(u64, u64, bool)>,
    /// The client connection's TLS: version, SNI, client certificate subject (boxed: 48
    /// bytes a plain connection's requests never use, in every request's state).
    pub(super) tls: Option<Box<TlsFacts>>,
    /// Ringway's own time on the request, once it went upstream.
    pub(super) overhead: Option<std::time::Duration>,
}

/// What the access log says of a TLS client connection.
pub(super) struct TlsFacts {
    version: &'static str,
    sni: Option<Rc<str>>,
    client_cert: Option<Rc<str>>,
}

impl TlsFacts {
    /// The facts of `client`, when it is TLS.
    pub(super) fn of(client: &Stream) -> Option<Box<Self>> {
        let t = client.tls()?;
        Some(Box::new(Self {
            version: t.protocol_version().unwrap_or("unknown"),
            sni: t.sni_shared(),
            client_cert: t.client_subject_shared(),
        }))
    }
}

impl<'a> Record<'a> {
    /// Notes the endpoint `addr` of upstream `upstream` that got the request, on attempt
    /// `attempts`.
    pub(super) fn sent_to(&mut self, addr: SocketAddr, upstream: usize, attempts: u32) {
        self.upstream = Some(addr);
        self.served = Some((upstream, attempts));
    }

    /// A record for a request answered before a plan existed.
    pub(super) fn bare(
        w: &'a Worker,
        g: &'a Generation,
        route: usize,
        peer: SocketAddr,
        request_id: RequestId,
        head_len: usize,
    ) -> Self {
        Self {
            w,
            g,
            route,
            start: Instant::now(),
            status: 499,
            peer,
            request_id,
            consumer: None,
            upstream: None,
            served: None,
            bytes_in: head_len as u64,
            bytes_out: 0,
            upstream_time: None,
            model: None,
            tokens: None,
            tls: None,
            overhead: None,
        }
    }

    /// Time since the request head arrived, at `at`.
    pub(super) fn since_head(&self, at: Instant) -> std::time::Duration {
        at.saturating_duration_since(self.start)
    }

    pub(super) fn new(w: &'a Worker, g: &'a Generation, plan: &Plan, peer: SocketAddr) -> Self {
        Self {
            w,
            g,
            route: plan.route,
            start: Instant::now(),
            status: 499,
            peer,
            request_id: plan.request_id,
            consumer: plan.consumer,
            upstream: None,
            served: None,
            bytes_in: (plan.head_end - HEADROOM) as u64,
            bytes_out: 0,
            upstream_time: None,
            model: None,
            tokens: None,
            tls: None,
            overhead: None,
        }
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        // Read now, not from the turn clock: `start` is an exact reading (the overhead
        // metric needs one), and a turn-clock end would report up to a turn less, and 0
        // for a request answered within the turn it arrived in.
        let elapsed = self.start.elapsed();
        let m = self.g.route_metrics(self.route);
        m.observe(self.status, elapsed);
        m.bytes_in.add(self.bytes_in);
        m.bytes_out.add(self.bytes_out);
        if let Some(d) = self.overhead {
            m.observe_overhead(d);
        }
        if !self.g.access_log {
            return;
        }
        let mut out = self.w.access.borrow_mut();
        out.extend_from_slice(b"{\"time\":\"");
        accesslog::push_time(&mut out, std::time::SystemTime::now() - elapsed);
        out.extend_from_slice(b"\",\"request_id\":");
        accesslog::push_json_str(&mut out, self.request_id.as_bytes());
        let _ = write!(out, ",\"client\":\"{}\",\"route\":", self.peer.ip());
        accesslog::push_json_str(
            &mut out,
            self.g.shared.routes.get(self.route).name.as_bytes(),
        );
        match self.upstream {
            Some(a) => {
                let _ = write!(out, ",\"upstream\":\"{a}\"");
            }
            None => out.extend_from_slice(b",\"upstream\":null"),
        }
        match self.served {
            Some((up, n)) => {
                out.extend_from_slice(b",\"upstream_name\":");
                let name = self.g.shared.upstreams.get(up).map_or("", |u| &u.conf.name);
                accesslog::push_json_str(&mut out, name.as_bytes());
                let _ = write!(out, ",\"attempts\":{n}");
            }
            None => out.extend_from_slice(b",\"upstream_name\":null,\"attempts\":0"),
        }
        let _ = write!(
            out,
            ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3}",
            self.status,
            self.bytes_in,
            self.bytes_out,
            elapsed.as_secs_f64() * 1000.0
        );
        match self.upstream_time {
            Some(t) => {
                let _ = write!(out, ",\"upstream_ms\":{:.3}", t.as_secs_f64() * 1000.0);
            }
            None => out.extend_from_slice(b",\"upstream_ms\":null"),
        }
        out.extend_from_slice(b",\"consumer\":");
        match self.consumer {
            Some(c) => accesslog::push_json_str(
                &mut out,
                self.g
                    .shared
                    .filters
                    .auth
                    .consumer_name(c as usize)
                    .as_bytes(),
            ),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"model\":");
        match &self.model {
            Some(m) => accesslog::push_json_str(&mut out, m.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        match &self.tls {
            Some(t) => {
                let _ = write!(out, ",\"tls_version\":\"{}\",\"sni\":", t.version);
                match &t.sni {
                    Some(s) => accesslog::push_json_str(&mut out, s.as_bytes()),
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"client_cert\":");
                match &t.client_cert {
                    Some(s) => accesslog::push_json_str(&mut out, s.as_bytes()),
                    None => out.extend_from_slice(b"null"),
                }
            }
            None => {
                out.extend_from_slice(b",\"tls_version\":null,\"sni\":null,\"client_cert\":null")
            }
        }
        match self.tokens {
            Some((i, o, est)) => {
                let _ = writeln!(
                    out,
                    ",\"tokens\":{{\"input\":{i},\"output\":{o},\"estimated\":{est}}}}}"
                );
            }
            None => out.extend_from_slice(b",\"tokens\":null}\n"),
        }
        if out.len() >= accesslog::FLUSH_BYTES {
            let batch = std::mem::take(&mut *out);
            drop(out);
            self.w.flush_access(batch);
        }
    }
}
