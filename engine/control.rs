//! The control core: the one thread allowed to block. It re-resolves
//! upstream endpoint names and runs active health checks, always against the
//! configuration in force (so reloads need no restart of it).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    log, runtime,
    upstream::{health::now_ms, resolve, UpstreamShared},
};

/// How often the control loop wakes.
const STEP: Duration = Duration::from_millis(50);

/// Starts the control thread, pinned to `core` when given.
pub fn spawn(core: Option<core_affinity::CoreId>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("ringway-control".into())
        .spawn(move || {
            if let Some(c) = core {
                core_affinity::set_for_current(c);
            }
            run()
        })
}

/// Probe results in a row for one endpoint.
#[derive(Default)]
struct ProbeState {
    ok: u32,
    failed: u32,
    due: Option<Instant>,
}

fn run() {
    // Keyed by the upstream's shared state (pointer) and endpoint index, so
    // a reload that keeps an upstream keeps its probe history.
    let mut probes: HashMap<(usize, usize), ProbeState> = HashMap::new();
    let mut dns_due: HashMap<usize, Instant> = HashMap::new();
    loop {
        thread::sleep(STEP);
        let Some(shared) = runtime::current() else {
            continue;
        };
        let now = Instant::now();
        for u in &shared.upstreams {
            let key = Arc::as_ptr(u) as usize;
            if resolve::needs_dns(&u.conf) {
                let due = dns_due.entry(key).or_insert(now + u.conf.resolve_interval);
                if now >= *due {
                    *due = now + u.conf.resolve_interval.max(Duration::from_secs(1));
                    refresh_dns(u);
                }
            }
            if u.conf.health.is_some() {
                for idx in 0..u.conf.endpoints.len() {
                    probe_if_due(u, idx, probes.entry((key, idx)).or_default(), now);
                }
            }
        }
        // Forget state of upstreams no longer configured.
        let live: Vec<usize> = shared
            .upstreams
            .iter()
            .map(|u| Arc::as_ptr(u) as usize)
            .collect();
        probes.retain(|(k, _), _| live.contains(k));
        dns_due.retain(|k, _| live.contains(k));
    }
}

fn refresh_dns(u: &UpstreamShared) {
    let old = u.addrs.load_full();
    let mut next = resolve::resolve_each(&u.conf);
    // Keep the last good address of a name that fails to resolve now.
    for (i, a) in next.iter_mut().enumerate() {
        if a.is_none() {
            *a = old.get(i).copied().flatten();
        }
    }
    if *old != next {
        log::info(&format!("upstream {}: endpoints now {next:?}", u.conf.name));
        u.addrs.store(Arc::new(next));
    }
}

fn probe_if_due(u: &UpstreamShared, idx: usize, st: &mut ProbeState, now: Instant) {
    let Some(h) = &u.conf.health else { return };
    if st.due.is_some_and(|d| now < d) {
        return;
    }
    st.due = Some(now + h.interval);
    let addr = u.addrs.load().get(idx).copied().flatten();
    let ok = addr.is_some_and(|a| probe(a, &h.path, &u.conf.endpoints[idx].address, h.timeout));
    let health = &u.health[idx];
    if ok {
        st.ok += 1;
        st.failed = 0;
        if health.is_ejected() && st.ok >= h.healthy_after.max(1) {
            health.set_ejected(false, now_ms());
            log::info(&format!(
                "upstream {}: endpoint {} healthy again",
                u.conf.name, u.conf.endpoints[idx].address
            ));
        }
    } else {
        st.failed += 1;
        st.ok = 0;
        if !health.is_ejected() && st.failed >= h.unhealthy_after.max(1) {
            health.set_ejected(true, now_ms());
            log::warn(&format!(
                "upstream {}: endpoint {} failed {} health checks, ejected",
                u.conf.name, u.conf.endpoints[idx].address, st.failed
            ));
        }
    }
}

/// One HTTP/1.1 GET; healthy when the status is 2xx or 3xx within `timeout`.
fn probe(addr: SocketAddr, path: &str, host: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let _ = s.set_write_timeout(Some(left()));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringway-health\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let _ = s.set_read_timeout(Some(left()));
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    // "HTTP/1.x NNN"
    buf.starts_with(b"HTTP/1.") && matches!(buf[9], b'2' | b'3')
}
