//! The control core: the one thread allowed to block. Today it re-resolves
//! upstream endpoint names and swaps the results in for every worker; Redis
//! leases, health checks, the access log and reloads join it later.

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crate::{log, runtime::Shared, upstream::resolve};

/// Starts the control thread, pinned to `core` when given.
pub fn spawn(
    shared: Arc<Shared>,
    core: Option<core_affinity::CoreId>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("ringway-control".into())
        .spawn(move || {
            if let Some(c) = core {
                core_affinity::set_for_current(c);
            }
            run(shared)
        })
}

fn run(shared: Arc<Shared>) {
    let dns: Vec<_> = shared
        .upstreams
        .iter()
        .filter(|u| resolve::needs_dns(&u.conf))
        .cloned()
        .collect();
    if dns.is_empty() {
        // Nothing to do yet: park for good (the process exits around us).
        loop {
            thread::park();
        }
    }
    let mut due: Vec<Instant> = dns
        .iter()
        .map(|u| Instant::now() + u.conf.resolve_interval)
        .collect();
    loop {
        let next = due.iter().min().copied().unwrap_or_else(Instant::now);
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        for (i, u) in dns.iter().enumerate() {
            if due[i] > Instant::now() {
                continue;
            }
            due[i] = Instant::now() + u.conf.resolve_interval.max(Duration::from_secs(1));
            match resolve::resolve_all(&u.conf) {
                Ok(addrs) => {
                    if **u.addrs.load() != addrs {
                        log::info(&format!(
                            "upstream {}: endpoints now {addrs:?}",
                            u.conf.name
                        ));
                        u.addrs.store(Arc::new(addrs));
                    }
                }
                // Keep the last good addresses while DNS is failing.
                Err(e) => log::warn(&e),
            }
        }
    }
}
