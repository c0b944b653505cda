//! Hot reload: SIGHUP or `POST /reload` re-reads the file the process was
//! started with. An invalid file is refused and the running configuration
//! kept; a valid one is published, and every worker switches to it for new
//! requests within one tick while requests in flight finish on the old one.
//! Upstreams that did not change keep their pools and resolved endpoints.

use std::{
    path::PathBuf,
    sync::{Mutex, OnceLock},
};

use crate::{cli, config, log, metrics::registry, runtime};

static SOURCE: OnceLock<Option<PathBuf>> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

/// Remembers where the configuration came from (`None`: the embedded one).
pub fn set_source(path: Option<PathBuf>) {
    let _ = SOURCE.set(path);
}

/// Settings a running process cannot change; a reload that changes them is
/// applied without them, and says so.
fn restart_only(old: &config::Config, new: &config::Config) -> Vec<&'static str> {
    let (a, b) = (&old.server, &new.server);
    let mut out = Vec::new();
    if a.workers != b.workers {
        out.push("server.workers");
    }
    if a.buffer_size != b.buffer_size || a.buffers_per_worker != b.buffers_per_worker {
        out.push("server.buffer_size/buffers_per_worker");
    }
    if a.pin_cores != b.pin_cores || a.driver != b.driver {
        out.push("server.pin_cores/driver");
    }
    if a.buffer_ring != b.buffer_ring {
        out.push("server.buffer_ring");
    }
    if old.admin != new.admin {
        out.push("admin.listen");
    }
    out
}

/// Reloads the configuration; returns a summary or every error found.
pub fn reload() -> Result<String, String> {
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let res = reload_locked();
    match &res {
        Ok(msg) => {
            registry().reloads.add(1);
            log::info(&format!("reload: {msg}"));
        }
        Err(e) => {
            registry().reload_errors.add(1);
            log::error(&format!(
                "reload refused, keeping the running configuration: {e}"
            ));
        }
    }
    res
}

fn reload_locked() -> Result<String, String> {
    let source = SOURCE.get().cloned().flatten();
    let cfg = match &source {
        Some(p) => config::load_file(p),
        None => config::load_str(config::EMBEDDED, "conf/ringway.toml (embedded)"),
    }
    .map_err(|e| e.to_string())?;
    for w in &cfg.warnings {
        log::warn(&w.to_string());
    }
    cli::check_supported(&cfg).map_err(|errs| errs.join("\n"))?;
    let current = runtime::current().ok_or("the gateway is not running yet")?;
    for l in &cfg.listeners {
        let bound = current.cfg.listeners.iter().any(|o| o.address == l.address);
        if !bound {
            runtime::listen::check_free(&l.name, l.address)?;
        }
    }
    let kept = restart_only(&current.cfg, &cfg);
    crate::accesslog::configure(&cfg.log.access)?;
    let shared = runtime::Shared::build(cfg, Some(&current))?;
    runtime::publish(shared);
    let mut msg = format!(
        "applied {}",
        source
            .as_ref()
            .map_or("the embedded configuration".into(), |p| p
                .display()
                .to_string())
    );
    if !kept.is_empty() {
        msg.push_str(&format!(
            "; a restart is needed to change {}",
            kept.join(", ")
        ));
    }
    Ok(msg)
}
