//! Command line: `ringway [--conf FILE]`, `ringway check --conf FILE`.

use std::{path::PathBuf, thread};

use crate::{admin, config, control, log, reload, runtime};

const USAGE: &str =
    "usage: ringway [--conf FILE]          run (the embedded default config without --conf)
       ringway check --conf FILE    validate a config file, print every error
       ringway --version";

enum Command {
    Run(Option<PathBuf>),
    Demo(String),
    Check(Option<PathBuf>),
    Version,
}

fn parse(args: &[String]) -> Result<Command, String> {
    let mut conf = None;
    let mut check = false;
    let mut demo = false;
    let mut listen = "127.0.0.1:8080".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "check" => check = true,
            "demo" => demo = true,
            "--listen" => listen = it.next().ok_or("--listen needs an address")?.clone(),
            "--conf" | "-c" => {
                let v = it.next().ok_or("--conf needs a file")?;
                conf = Some(PathBuf::from(v));
            }
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument: {other}")),
        }
    }
    Ok(if demo {
        Command::Demo(listen)
    } else if check {
        Command::Check(conf)
    } else {
        Command::Run(conf)
    })
}

/// Runs the command line; returns the exit code.
pub fn main(args: Vec<String>) -> i32 {
    let cmd = match parse(&args) {
        Ok(c) => c,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("ringway: {msg}");
            }
            eprintln!("{USAGE}");
            return 2;
        }
    };
    match cmd {
        Command::Version => {
            println!("ringway {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Command::Check(path) => match load(path.as_deref()) {
            Ok(cfg) => match warn_all(&cfg, |w| eprintln!("warning: {w}")) {
                Ok(()) => {
                    println!("ok");
                    0
                }
                Err(msgs) => {
                    for m in msgs {
                        eprintln!("{m}");
                    }
                    1
                }
            },
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        // Signals are blocked before any thread starts (the demo upstream's
        // threads included), so none of them can be killed by SIGTERM.
        Command::Demo(_) | Command::Run(_)
            if runtime::shutdown::install_signal_thread().is_err() =>
        {
            eprintln!("ringway: cannot start the signal thread");
            1
        }
        Command::Demo(listen) => match crate::demo::prepare(&listen) {
            Ok((cfg, _upstream)) => run(cfg),
            Err(e) => {
                eprintln!("ringway demo: {e}");
                1
            }
        },
        Command::Run(path) => match load(path.as_deref()) {
            Ok(cfg) => {
                reload::set_source(path);
                run(cfg)
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
    }
}

fn load(path: Option<&std::path::Path>) -> Result<config::Config, config::ConfigErrors> {
    match path {
        Some(p) => config::load_file(p),
        None => config::load_str(config::EMBEDDED, "conf/ringway.toml (embedded)"),
    }
}

/// Refuses settings this build accepts in the file but cannot honour yet,
/// rather than silently ignoring them.
pub fn check_supported(cfg: &config::Config) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        for (kind, what) in [(false, "rate-limit"), (true, "token-limit and cost-limit")] {
            let n =
                r.filters
                    .iter()
                    .filter(|n| {
                        cfg.filter(n).is_some_and(|f| match &f.kind {
                            config::FilterKind::RateLimit(_) => !kind,
                            config::FilterKind::TokenLimit(_)
                            | config::FilterKind::CostLimit(_) => kind,
                            _ => false,
                        })
                    })
                    .count();
            if n > crate::filter::limit::MAX_CHECKS {
                errs.push(format!(
                    "routes[{i}].filters: at most {} {what} filters per route",
                    crate::filter::limit::MAX_CHECKS
                ));
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Reports every warning of a loaded config, then checks what this build supports.
fn warn_all(
    cfg: &config::Config,
    mut report: impl FnMut(&config::ConfigError),
) -> Result<(), Vec<String>> {
    for w in &cfg.warnings {
        report(w);
    }
    check_supported(cfg)
}

fn run(cfg: config::Config) -> i32 {
    log::set_level(&cfg.log.level);
    for w in &cfg.warnings {
        log::warn(&w.to_string());
    }
    if let Err(msgs) = check_supported(&cfg) {
        for m in msgs {
            log::error(&m);
        }
        return 1;
    }
    if let Err(e) = runtime::hugepages::disable() {
        log::warn(&format!("cannot turn transparent huge pages off: {e}"));
    }
    // One descriptor per client and per upstream connection: a soft limit
    // of 1024 from a login shell must not cap the gateway; the hard one does.
    match runtime::nofile::raise() {
        Ok((before, after)) if after > before => {
            log::info(&format!("open files limit raised from {before} to {after}"))
        }
        Ok(_) => {}
        Err(e) => log::warn(&format!("cannot raise the open files limit: {e}")),
    }
    for l in &cfg.listeners {
        if let Err(e) = runtime::listen::check_free(&l.name, l.address) {
            log::error(&e);
            return 1;
        }
    }
    let workers = cfg.server.workers;
    let pin = cfg.server.pin_cores;
    let want = cfg.server.driver;
    let listeners: Vec<_> = cfg
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.address))
        .collect();
    let shared = match runtime::Shared::build(cfg, None) {
        Ok(s) => s,
        Err(e) => {
            log::error(&e);
            return 1;
        }
    };
    runtime::publish(shared.clone());
    let cores = if pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let core_for = |i: usize| {
        if cores.is_empty() {
            None
        } else {
            Some(cores[i % cores.len()])
        }
    };

    if let Err(e) = crate::accesslog::configure(&shared.cfg.log.access) {
        log::error(&e);
        return 1;
    }
    if let Some(a) = &shared.cfg.admin {
        if let Err(e) = admin::spawn(a.listen) {
            log::error(&e);
            return 1;
        }
    }
    if let Err(e) = crate::filter::cluster::start(core_for(workers)) {
        log::error(&format!("cannot start the redis thread: {e}"));
        return 1;
    }
    if let Err(e) = control::spawn(core_for(workers)) {
        log::error(&format!("cannot start the control thread: {e}"));
        return 1;
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(usize, &'static str), String>>();
    let mut handles = Vec::with_capacity(workers);
    for i in 0..workers {
        let shared = shared.clone();
        let core = core_for(i);
        let tx = ready_tx.clone();
        let spawned = thread::Builder::new()
            .name(format!("ringway-w{i}"))
            .spawn(move || {
                if let Some(c) = core {
                    core_affinity::set_for_current(c);
                }
                let tx2 = tx.clone();
                let driver =
                    std::rc::Rc::new(std::cell::Cell::new(runtime::driver::DriverInUse::Epoll));
                let chosen = driver.clone();
                let res = runtime::driver::run(
                    want,
                    move |d| {
                        chosen.set(d);
                        let _ = tx2.send(Ok((i, d.name())));
                    },
                    move || {
                        let w = runtime::Worker::new(i, shared);
                        w.stats.driver.set(match driver.get() {
                            runtime::driver::DriverInUse::IoUringCoop => 2,
                            runtime::driver::DriverInUse::IoUring => 1,
                            runtime::driver::DriverInUse::Epoll => 0,
                        });
                        std::rc::Rc::new(w).run()
                    },
                );
                if let Err(e) = res {
                    let _ = tx.send(Err(format!("worker {i}: cannot start a runtime: {e}")));
                }
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                log::error(&format!("cannot start worker {i}: {e}"));
                return 1;
            }
        }
    }
    drop(ready_tx);
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok((i, driver))) => log::info(&format!("worker {i}: driver {driver}")),
            Ok(Err(e)) => {
                log::error(&e);
                return 1;
            }
            Err(_) => break,
        }
    }
    for (name, addr) in &listeners {
        log::info(&format!(
            "listener {name}: listening on {addr} with {workers} workers"
        ));
    }
    for h in handles {
        let _ = h.join();
    }
    log::info("drained; exiting");
    0
}
