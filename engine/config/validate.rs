//! Second pass: defaults, units, names and cross-references. Every error is collected, so a
//! user fixes a file in one round instead of one error per run.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::types::*;
use super::units::{Dur, Size, Workers};
use super::{line_of, ConfigError};

/// Collects errors while the raw file is turned into a [`Config`].
pub(crate) struct Ck<'a> {
    src: &'a str,
    origin: &'a str,
    /// Directory that relative file paths (certificates, keys) are resolved against.
    base: &'a Path,
    /// Unix seconds; certificate expiry is judged against it.
    pub now: i64,
    /// Environment lookup for secrets.
    pub var: &'a dyn Fn(&str) -> Option<std::ffi::OsString>,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Ck<'_> {
    /// Records a problem that does not make the file invalid.
    pub fn warn(&mut self, key: impl Into<String>, span: Range<usize>, msg: impl Into<String>) {
        self.warnings.push(ConfigError {
            origin: self.origin.to_string(),
            key: key.into(),
            line: Some(line_of(self.src, span.start)),
            message: msg.into(),
        });
    }

    /// A file path as written, resolved against the config file's directory.
    pub fn path(&self, written: &str) -> PathBuf {
        let p = Path::new(written);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub fn err_line(
        &mut self,
        key: impl Into<String>,
        line: Option<usize>,
        msg: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            origin: self.origin.to_string(),
            key: key.into(),
            line,
            message: msg.into(),
        });
    }

    pub fn err(&mut self, key: impl Into<String>, span: Range<usize>, msg: impl Into<String>) {
        let line = Some(line_of(self.src, span.start));
        self.err_line(key, line, msg);
    }

    /// Line of a `[table]` header, for errors about a table that has no value to point at.
    fn header_line(&self, table: &str) -> Option<usize> {
        self.src
            .lines()
            .position(|l| {
                let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
                l.starts_with(&format!("[{table}]"))
            })
            .map(|i| i + 1)
    }

    pub fn dur(&mut self, key: &str, v: &Option<S<Dur>>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => {
                let d = s.get_ref().0;
                if d.is_zero() {
                    self.err(key, s.span(), "must be greater than zero");
                }
                d
            }
        }
    }

    pub fn size(&mut self, key: &str, v: &Option<S<Size>>, default: u64, min: u64) -> u64 {
        match v {
            None => default,
            Some(s) => {
                let n = s.get_ref().0;
                if n < min {
                    let msg = match min {
                        1 => "must be greater than zero".to_string(),
                        1024 => "must be at least 1KiB".to_string(),
                        _ => format!("must be at least {min} bytes"),
                    };
                    self.err(key, s.span(), msg);
                }
                n
            }
        }
    }

    pub fn count(
        &mut self,
        key: &str,
        v: &Option<S<u64>>,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        match v {
            None => default,
            Some(s) => {
                let n = *s.get_ref();
                if n < min || n > max {
                    let msg = if max == u64::MAX {
                        format!("must be at least {min}, got {n}")
                    } else {
                        format!("must be between {min} and {max}, got {n}")
                    };
                    self.err(key, s.span(), msg);
                }
                n
            }
        }
    }

    /// Records `name` under `what` and reports a duplicate.
    pub fn unique(
        &mut self,
        seen: &mut HashMap<String, String>,
        what: &str,
        key: &str,
        name: &S<String>,
    ) {
        let n = name.get_ref();
        if n.is_empty() {
            self.err(key, name.span(), format!("{what} name must not be empty"));
            return;
        }
        // Names end up in metric labels and Redis keys; keep them plain.
        if !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            self.err(
                key,
                name.span(),
                format!(
                    "{what} name {n:?} may contain only letters, digits, '-', '_', '.' and '@'"
                ),
            );
        }
        if let Some(first) = seen.get(n) {
            self.err(
                key,
                name.span(),
                format!("duplicate {what} name {n:?}, first defined at {first}"),
            );
        } else {
            seen.insert(n.clone(), key.to_string());
        }
    }
}

pub(crate) fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// True for an HTTP token (header names, methods).
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Where a file is read from and when: the context of checks that touch files and the clock.
pub(crate) struct Env<'a> {
    /// Directory relative paths are resolved against.
    pub base: &'a Path,
    /// Unix seconds, for certificate expiry.
    pub now: i64,
    /// Environment lookup for `credentials` keys (`std::env::var_os`, or a table in tests).
    pub var: &'a dyn Fn(&str) -> Option<std::ffi::OsString>,
}

/// Resolves and checks the whole file.
pub(crate) fn build(
    raw: &RawConfig,
    src: &str,
    origin: &str,
    env: &Env<'_>,
) -> Result<Config, Vec<ConfigError>> {
    let mut ck = Ck {
        src,
        origin,
        base: env.base,
        now: env.now,
        var: env.var,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let server = server(&mut ck, &raw.server);
    let redis = raw.redis.as_ref().map(|r| redis(&mut ck, r));
    let log = log(&mut ck, &raw.log);
    let listeners = listeners(&mut ck, &raw.listeners);
    let admin = raw.admin.as_ref().map(|a| {
        let listen = *a.listen.get_ref();
        if let Some(l) = listeners.iter().find(|l| l.address == listen) {
            ck.err(
                "admin.listen",
                a.listen.span(),
                format!("address {listen} is already used by listener {:?}", l.name),
            );
        }
        Admin { listen }
    });
    let upstreams = super::upstreams::upstreams(&mut ck, &raw.upstreams);
    let consumers = consumers(&mut ck, &raw.consumers);
    let filters = super::filters::filters(&mut ck, &raw.filters, redis.is_some());
    let routes = super::routes::routes(&mut ck, &raw.routes, &listeners, &upstreams, &filters);
    let prices = super::prices::prices(&mut ck, &raw.prices);
    super::prices::check_budgets(&mut ck, &raw.routes, &filters, &prices);

    if raw.listeners.is_empty() {
        ck.err_line(
            "listeners",
            None,
            "at least one [[listeners]] entry is required",
        );
    }
    if raw.routes.is_empty() {
        ck.err_line("routes", None, "at least one [[routes]] entry is required");
    }

    if ck.errors.is_empty() {
        Ok(Config {
            server,
            admin,
            redis,
            log,
            listeners,
            upstreams,
            consumers,
            filters,
            routes,
            prices,
            warnings: ck.warnings,
        })
    } else {
        let mut errors = ck.errors;
        // File order reads best; errors without a line (missing sections) go last.
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        Err(errors)
    }
}

fn server(ck: &mut Ck, r: &RawServer) -> Server {
    let d = Server::default();
    let workers = match &r.workers {
        None => d.workers,
        Some(w) => match *w.get_ref() {
            Workers::Auto => d.workers,
            Workers::Count(0) => {
                ck.err(
                    "server.workers",
                    w.span(),
                    "must be at least 1, or \"auto\"",
                );
                1
            }
            Workers::Count(n) => usize_of(n),
        },
    };
    let kib = 1024;
    Server {
        workers,
        pin_cores: r.pin_cores.unwrap_or(d.pin_cores),
        driver: r.driver.unwrap_or(d.driver),
        buffer_ring: r.buffer_ring.unwrap_or(d.buffer_ring),
        buffer_size: usize_of(ck.size(
            "server.buffer_size",
            &r.buffer_size,
            d.buffer_size as u64,
            kib,
        )),
        buffers_per_worker: usize_of(ck.count(
            "server.buffers_per_worker",
            &r.buffers_per_worker,
            d.buffers_per_worker as u64,
            1,
            u64::MAX,
        )),
        splice_min: usize_of(ck.size("server.splice_min", &r.splice_min, d.splice_min as u64, 0)),
        max_header_bytes: usize_of(ck.size(
            "server.max_header_bytes",
            &r.max_header_bytes,
            d.max_header_bytes as u64,
            kib,
        )),
        max_headers: usize_of(ck.count(
            "server.max_headers",
            &r.max_headers,
            d.max_headers as u64,
            1,
            256,
        )),
        max_body_bytes: ck.size(
            "server.max_body_bytes",
            &r.max_body_bytes,
            d.max_body_bytes,
            0,
        ),
        header_timeout: ck.dur("server.header_timeout", &r.header_timeout, d.header_timeout),
        keepalive_timeout: ck.dur(
            "server.keepalive_timeout",
            &r.keepalive_timeout,
            d.keepalive_timeout,
        ),
        body_timeout: ck.dur("server.body_timeout", &r.body_timeout, d.body_timeout),
        drain_timeout: ck.dur("server.drain_timeout", &r.drain_timeout, d.drain_timeout),
        memory_release_after: ck.dur(
            "server.memory_release_after",
            &r.memory_release_after,
            d.memory_release_after,
        ),
    }
}

fn redis_url_ok(u: &str) -> bool {
    ["redis://", "rediss://"]
        .iter()
        .any(|p| u.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
}

fn redis(ck: &mut Ck, r: &RawRedis) -> Redis {
    let url = r.url.as_ref().map(|u| {
        if !redis_url_ok(u.get_ref()) {
            ck.err(
                "redis.url",
                u.span(),
                "must look like \"redis://host:port/db\" (or rediss://)",
            );
        }
        u.get_ref().clone()
    });
    let mut cluster_nodes = Vec::new();
    if let Some(nodes) = &r.cluster_nodes {
        if nodes.get_ref().is_empty() {
            ck.err("redis.cluster_nodes", nodes.span(), "must not be empty");
        }
        for (i, n) in nodes.get_ref().iter().enumerate() {
            if !redis_url_ok(n.get_ref()) {
                ck.err(
                    format!("redis.cluster_nodes[{i}]"),
                    n.span(),
                    "must look like \"redis://host:port\" (or rediss://)",
                );
            }
            cluster_nodes.push(n.get_ref().clone());
        }
    }
    match (&r.url, &r.cluster_nodes) {
        (Some(_), Some(n)) => ck.err(
            "redis.cluster_nodes",
            n.span(),
            "set either url or cluster_nodes, not both",
        ),
        (None, None) => {
            let line = ck.header_line("redis");
            ck.err_line(
                "redis",
                line,
                "needs url = \"redis://…\" or cluster_nodes = [\"redis://…\", …]",
            );
        }
        _ => {}
    }
    Redis {
        url,
        cluster_nodes,
        flush_interval: ck.dur(
            "redis.flush_interval",
            &r.flush_interval,
            Duration::from_millis(5),
        ),
        timeout: ck.dur("redis.timeout", &r.timeout, Duration::from_millis(200)),
        tls: super::tls::redis_tls(ck, r),
    }
}

fn log(ck: &mut Ck, r: &RawLog) -> Log {
    let d = Log::default();
    let access = match &r.access {
        None => d.access,
        Some(a) => match a.get_ref().as_str() {
            "stdout" => AccessLog::Stdout,
            "off" => AccessLog::Off,
            "" => {
                ck.err(
                    "log.access",
                    a.span(),
                    "expected \"stdout\", \"off\" or a file path",
                );
                AccessLog::Off
            }
            p => AccessLog::Path(PathBuf::from(p)),
        },
    };
    let level = match &r.level {
        None => d.level,
        Some(l) => {
            let v = l.get_ref();
            if !["error", "warn", "info", "debug"].contains(&v.as_str()) {
                ck.err(
                    "log.level",
                    l.span(),
                    format!("expected \"error\", \"warn\", \"info\" or \"debug\", got {v:?}"),
                );
            }
            v.clone()
        }
    };
    Log { access, level }
}

fn listeners(ck: &mut Ck, raw: &[RawListener]) -> Vec<Listener> {
    let mut names = HashMap::new();
    let mut addrs: HashMap<std::net::SocketAddr, String> = HashMap::new();
    let mut out = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        ck.unique(
            &mut names,
            "listener",
            &format!("listeners[{i}].name"),
            &l.name,
        );
        let addr = *l.address.get_ref();
        if let Some(first) = addrs.get(&addr) {
            ck.err(
                format!("listeners[{i}].address"),
                l.address.span(),
                format!("address {addr} is already used by listener {first:?}"),
            );
        } else {
            addrs.insert(addr, l.name.get_ref().clone());
        }
        let tls = l
            .tls
            .as_ref()
            .and_then(|t| super::tls::listener_tls(ck, &format!("listeners[{i}].tls"), t));
        out.push(Listener {
            name: l.name.get_ref().clone(),
            address: addr,
            tls,
        });
    }
    out
}

fn consumers(ck: &mut Ck, raw: &[RawConsumer]) -> Vec<Consumer> {
    let mut names = HashMap::new();
    let mut keys: HashMap<&str, (String, String)> = HashMap::new();
    let mut out = Vec::new();
    for (i, c) in raw.iter().enumerate() {
        ck.unique(
            &mut names,
            "consumer",
            &format!("consumers[{i}].name"),
            &c.name,
        );
        if c.keys.get_ref().is_empty() {
            ck.err(
                format!("consumers[{i}].keys"),
                c.keys.span(),
                "needs at least one key",
            );
        }
        for (j, key) in c.keys.get_ref().iter().enumerate() {
            let kk = format!("consumers[{i}].keys[{j}]");
            let v = key.get_ref().as_str();
            if v.is_empty() {
                ck.err(kk, key.span(), "must not be empty");
            } else if let Some((owner, at)) = keys.get(v) {
                // The key itself is a secret: point at both places instead of printing it.
                ck.err(
                    kk,
                    key.span(),
                    format!("this key is already given to consumer {owner:?} at {at}"),
                );
            } else {
                keys.insert(v, (c.name.get_ref().clone(), kk));
            }
        }
        out.push(Consumer {
            name: c.name.get_ref().clone(),
            keys: c
                .keys
                .get_ref()
                .iter()
                .map(|k| k.get_ref().clone())
                .collect(),
        });
    }
    out
}
