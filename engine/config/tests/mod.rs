//! Tests for the whole loader: shipped files, defaults, and the key and line of every error.

use std::path::Path;
use std::time::Duration;

use super::*;

mod checks;
mod credentials;
mod tls;

/// The smallest valid file: one listener, one upstream, one route.
const MIN: &str = r#"[[listeners]]
name = "l"
address = "127.0.0.1:8080"

[[upstreams]]
name = "u"
endpoints = ["127.0.0.1:9000"]

[[routes]]
name = "r"
upstream = "u"
"#;

fn ok(src: &str) -> Config {
    match load_str(src, "t.toml") {
        Ok(c) => c,
        Err(e) => panic!("expected no errors, got:\n{e}"),
    }
}

fn errs(src: &str) -> Vec<ConfigError> {
    match load_str(src, "t.toml") {
        Ok(_) => panic!("expected errors for:\n{src}"),
        Err(e) => e.0,
    }
}

/// The single error a file produces.
fn one(src: &str) -> ConfigError {
    let mut e = errs(src);
    assert_eq!(e.len(), 1, "expected one error, got {e:#?}");
    e.remove(0)
}

/// 1-based line of the only line containing `needle`, found by text so the expectation does
/// not depend on spans.
fn line(src: &str, needle: &str) -> Option<usize> {
    let hits: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(hits.len(), 1, "{needle:?} must occur on exactly one line");
    Some(hits[0])
}

fn assert_err(e: &ConfigError, key: &str, line: Option<usize>, fragment: &str) {
    assert_eq!(e.key, key, "{e}");
    assert_eq!(e.line, line, "{e}");
    assert!(
        e.message.contains(fragment),
        "{e:?} should mention {fragment:?}"
    );
}

// ---- shipped files ----

#[test]
fn embedded_default_loads() {
    let c = ok(EMBEDDED);
    assert_eq!(c.listeners[0].address.to_string(), "0.0.0.0:8080");
    assert_eq!(c.upstreams[0].name, "backend");
    assert_eq!(c.upstreams[0].endpoints[0].address, "127.0.0.1:9000");
    assert_eq!(c.routes[0].matcher.path_prefix.as_deref(), Some("/"));
    assert_eq!(
        c.admin.map(|a| a.listen.to_string()).as_deref(),
        Some("127.0.0.1:9901")
    );
    assert!(c.redis.is_none() && c.filters.is_empty());
}

#[test]
fn every_shipped_file_loads() {
    // The provider example reads its keys from the environment; none are shipped. These names
    // are used by no other test, and std's environment lock makes the writes safe.
    for var in [
        "OPENAI_KEY_A",
        "OPENAI_KEY_B",
        "ANTHROPIC_KEY",
        "AZURE_OPENAI_KEY",
        "TOGETHER_KEY",
    ] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "sk-test-placeholder");
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["conf", "conf/examples"] {
        let entries = std::fs::read_dir(root.join(dir)).expect("conf dir");
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).expect("read example");
                let res = if text.contains("\"tls/") {
                    load_with_test_certs(&path, &text)
                } else {
                    load_file(&path).map_err(|e| e.to_string())
                };
                if let Err(e) = res {
                    panic!("{} does not load:\n{e}", path.display());
                }
                n += 1;
            }
        }
    }
    assert!(n >= 5, "found only {n} files");
}

/// Loads an example that names certificate files under `tls/` (none are shipped: key material
/// is made at test time) from a copy next to freshly made ones of those names.
fn load_with_test_certs(path: &Path, text: &str) -> Result<Config, String> {
    let pki = crate::tls::testpki::TestPki::new();
    let tls = pki.path("tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    for (name, san) in [
        ("api", "DNS:api.example.com"),
        ("wild", "DNS:*.example.com"),
    ] {
        let (pem, key) = pki.leaf(name, san.trim_start_matches("DNS:"), &[san], 365);
        std::fs::copy(pem, tls.join(format!("{name}.pem"))).expect("copy cert");
        std::fs::copy(key, tls.join(format!("{name}.key"))).expect("copy key");
    }
    std::fs::copy(pki.path("ca.pem"), tls.join("clients.pem")).expect("copy ca");
    let copy = pki.path(
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("example.toml"),
    );
    std::fs::write(&copy, text).expect("write copy");
    load_file(&copy).map_err(|e| e.to_string())
}

#[test]
fn ai_gateway_example_has_what_it_shows() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/examples/ai-gateway.toml");
    let c = load_file(&path).expect("example loads");
    let FilterKind::RateLimit(rpm) = &c.filter("rpm").expect("rpm").kind else {
        panic!("rpm is a rate-limit");
    };
    assert_eq!(rpm.scope, Scope::Cluster);
    assert_eq!(rpm.rules[0].matcher, RuleMatch::Exact("batch-jobs".into()));
    assert_eq!(rpm.rules[1].windows.len(), 2);
    let chat = &c.routes[0];
    let globs: Vec<&str> = chat.models.iter().map(|(g, _)| g.as_str()).collect();
    assert_eq!(
        globs,
        ["gpt-4o*", "claude-*", "llama-*", "*"],
        "file order is kept"
    );
    assert_eq!(
        c.consumer_by_key("sk-batch-1").map(|c| c.name.as_str()),
        Some("batch-jobs")
    );
}

// ---- defaults ----

#[test]
fn defaults_from_minimal_file() {
    let c = ok(MIN);
    let s = &c.server;
    assert!(s.workers >= 1);
    assert_eq!(s.workers, auto_workers());
    assert!(s.pin_cores);
    assert_eq!(s.driver, Driver::Auto);
    assert_eq!(s.buffer_size, 16 * 1024);
    assert_eq!(s.buffers_per_worker, 4096);
    assert_eq!(s.splice_min, 64 * 1024);
    assert_eq!(s.max_header_bytes, 32 * 1024);
    assert_eq!(s.max_headers, 100);
    assert_eq!(s.max_body_bytes, 1 << 30);
    assert_eq!(s.header_timeout, Duration::from_secs(10));
    assert_eq!(s.keepalive_timeout, Duration::from_secs(60));
    assert_eq!(s.body_timeout, Duration::from_secs(60));
    assert_eq!(s.drain_timeout, Duration::from_secs(30));
    assert!(c.admin.is_none() && c.redis.is_none());
    assert_eq!(
        c.log,
        Log {
            access: AccessLog::Off,
            level: "info".into()
        }
    );

    let u = &c.upstreams[0];
    assert_eq!(
        u.endpoints,
        [Endpoint {
            address: "127.0.0.1:9000".into(),
            weight: 1
        }]
    );
    assert_eq!(u.balance, Balance::RoundRobin);
    assert_eq!(u.hash_key, None);
    assert_eq!((u.max_connections, u.max_idle, u.retries), (None, 64, 1));
    assert_eq!(u.idle_timeout, Duration::from_secs(60));
    assert_eq!(u.connect_timeout, Duration::from_secs(2));
    assert_eq!(u.response_timeout, Duration::from_secs(60));
    assert_eq!(u.resolve_interval, Duration::from_secs(30));
    assert!(u.health.is_none());

    let r = &c.routes[0];
    assert_eq!(r.matcher, RouteMatch::default());
    assert!(r.listener.is_none() && r.filters.is_empty() && r.models.is_empty());
    assert!(!r.strip_prefix && r.include_usage);
}

#[test]
fn section_defaults() {
    let src = format!(
        "{MIN}
[redis]
url = \"redis://127.0.0.1:6379/0\"

[[upstreams]]
name = \"h\"
endpoints = [\"a.internal:80\"]
health = {{ path = \"/hz\", interval = \"2s\" }}

[[filters]]
name = \"f\"
kind = \"token-limit\"
scope = \"cluster\"
key = \"consumer\"
rules = [ {{ match = \"*\", tokens_per_minute = 10 }} ]
"
    );
    let c = ok(&src);
    let r = c.redis.as_ref().expect("redis");
    assert_eq!(r.flush_interval, Duration::from_millis(5));
    assert_eq!(r.timeout, Duration::from_millis(200));
    let h = c.upstreams[1].health.as_ref().expect("health");
    assert_eq!(h.timeout, Duration::from_secs(1));
    assert_eq!((h.healthy_after, h.unhealthy_after), (2, 3));
    let FilterKind::TokenLimit(l) = &c.filters[0].kind else {
        panic!("token-limit")
    };
    assert_eq!(l.failure_mode, FailureMode::Local);
    assert_eq!(
        (l.replicas, l.max_keys, l.shadow, l.max_reserve),
        (1, 100_000, false, None)
    );
    assert_eq!(
        l.rules[0].windows,
        [Window {
            period: Duration::from_secs(60),
            limit: 10
        }]
    );
}

// ---- sizes and durations as written in the file ----

#[test]
fn size_and_duration_forms_in_file() {
    type Get = fn(&Server) -> u64;
    // (server line, what to read back, expected value)
    let cases: &[(&str, Get, u64)] = &[
        ("buffer_size = \"16KiB\"", |s| s.buffer_size as u64, 16384),
        ("buffer_size = \"2MiB\"", |s| s.buffer_size as u64, 2 << 20),
        ("buffer_size = 4096", |s| s.buffer_size as u64, 4096),
        ("buffer_size = \"64KB\"", |s| s.buffer_size as u64, 64_000),
        ("buffer_size = \"2048B\"", |s| s.buffer_size as u64, 2048),
        ("max_body_bytes = \"1GiB\"", |s| s.max_body_bytes, 1 << 30),
        (
            "max_body_bytes = \"5GB\"",
            |s| s.max_body_bytes,
            5_000_000_000,
        ),
        (
            "header_timeout = \"250ms\"",
            |s| s.header_timeout.as_millis() as u64,
            250,
        ),
        (
            "header_timeout = \"10s\"",
            |s| s.header_timeout.as_millis() as u64,
            10_000,
        ),
        (
            "header_timeout = \"1m\"",
            |s| s.header_timeout.as_millis() as u64,
            60_000,
        ),
        (
            "drain_timeout = \"2h\"",
            |s| s.drain_timeout.as_secs(),
            7200,
        ),
        (
            "drain_timeout = \"1d\"",
            |s| s.drain_timeout.as_secs(),
            86_400,
        ),
        ("drain_timeout = 7", |s| s.drain_timeout.as_secs(), 7),
        ("workers = 3", |s| s.workers as u64, 3),
        (
            "driver = \"io_uring\"",
            |s| (s.driver == Driver::IoUring) as u64,
            1,
        ),
        (
            "driver = \"epoll\"",
            |s| (s.driver == Driver::Epoll) as u64,
            1,
        ),
    ];
    for (line, get, want) in cases {
        let c = ok(&format!("[server]\n{line}\n{MIN}"));
        assert_eq!(get(&c.server), *want, "{line}");
    }
}

#[test]
fn bad_units_report_key_and_line() {
    // (server line, key, message fragment)
    let cases = [
        (
            "buffer_size = \"16XB\"",
            "server.buffer_size",
            "invalid size",
        ),
        (
            "buffer_size = \"1.5MiB\"",
            "server.buffer_size",
            "invalid size",
        ),
        ("max_body_bytes = -1", "server.max_body_bytes", "negative"),
        (
            "header_timeout = \"5 minutes\"",
            "server.header_timeout",
            "invalid duration",
        ),
        (
            "drain_timeout = \"10S\"",
            "server.drain_timeout",
            "invalid duration",
        ),
        (
            "keepalive_timeout = true",
            "server.keepalive_timeout",
            "duration",
        ),
        ("workers = \"many\"", "server.workers", "auto"),
        ("driver = \"kqueue\"", "server.driver", "kqueue"),
    ];
    for (bad, key, fragment) in cases {
        let src = format!("{MIN}\n[server]\npin_cores = true\n{bad}\n");
        assert_err(&one(&src), key, line(&src, bad), fragment);
    }
    // Deeper in the file: an upstream's timeout and a health interval.
    let src = format!(
        "{MIN}[[upstreams]]\nname = \"x\"\nendpoints = [\"a:1\"]\nconnect_timeout = \"2 s\"\n\
         health = {{ path = \"/\", interval = \"2x\" }}\n"
    );
    assert_err(
        &one(&src),
        "upstreams[1].health.interval",
        line(&src, "interval = \"2x\""),
        "invalid duration",
    );
}

#[test]
fn zero_and_range_checks() {
    // (server line, key, message fragment)
    let cases = [
        (
            "buffer_size = \"512B\"",
            "server.buffer_size",
            "at least 1KiB",
        ),
        (
            "buffers_per_worker = 0",
            "server.buffers_per_worker",
            "at least 1",
        ),
        ("workers = 0", "server.workers", "at least 1"),
        ("max_headers = 0", "server.max_headers", "between 1 and 256"),
        (
            "max_headers = 257",
            "server.max_headers",
            "between 1 and 256",
        ),
        (
            "max_header_bytes = 100",
            "server.max_header_bytes",
            "at least 1KiB",
        ),
        (
            "header_timeout = 0",
            "server.header_timeout",
            "greater than zero",
        ),
        (
            "keepalive_timeout = \"0ms\"",
            "server.keepalive_timeout",
            "greater than zero",
        ),
        (
            "body_timeout = \"0s\"",
            "server.body_timeout",
            "greater than zero",
        ),
        (
            "drain_timeout = 0",
            "server.drain_timeout",
            "greater than zero",
        ),
    ];
    for (bad, key, fragment) in cases {
        let src = format!("[server]\n{bad}\n{MIN}");
        assert_err(&one(&src), key, line(&src, bad), fragment);
    }
}

// ---- unknown keys ----

#[test]
fn unknown_keys_report_path_and_line() {
    // (file, key path, line marker)
    let two_upstreams =
        format!("{MIN}[[upstreams]]\nname = \"v\"\nendpoints = [\"a:1\"]\nbogus = 1\n");
    let cases = [
        (format!("bogus = 1\n{MIN}"), "bogus", "bogus"),
        (format!("[server]\nworkers = 2\nbuffer_sise = \"1KiB\"\n{MIN}"), "server.buffer_sise", "buffer_sise"),
        (format!("{MIN}[admin]\nlisten = \"127.0.0.1:1\"\nport = 2\n"), "admin.port", "port"),
        (two_upstreams, "upstreams[1].bogus", "bogus"),
        (
            MIN.replace("upstream = \"u\"", "upstream = \"u\"\nmatch = { path_prefix = \"/\", paht = \"/x\" }"),
            "routes[0].match.paht",
            "paht",
        ),
        (
            MIN.replace("[\"127.0.0.1:9000\"]", "[\"a:1\",\n  { address = \"b:2\", wieght = 2 }]"),
            "upstreams[0].endpoints[1].wieght",
            "wieght",
        ),
        (
            format!("{MIN}[[filters]]\nname = \"f\"\nkind = \"rate-limit\"\nkey = \"ip\"\nrules = [ {{ match = \"*\", requests_per_minute = 1, per = 2 }} ]\n"),
            "filters[0].rules[0].per",
            "per = 2",
        ),
    ];
    for (src, key, marker) in &cases {
        assert_err(&one(src), key, line(src, marker), "unknown key");
    }
}

#[test]
fn wrong_types_and_missing_fields() {
    let src = MIN.replace("address = \"127.0.0.1:8080\"", "address = \"localhost\"");
    assert_err(
        &one(&src),
        "listeners[0].address",
        line(&src, "localhost"),
        "socket address",
    );

    let src = MIN.replace("name = \"u\"\n", "");
    let e = one(&src);
    assert_eq!(e.key, "upstreams[0]");
    assert!(e.message.contains("missing key `name`"), "{e}");
    assert!(e.line.is_some());

    let src = format!("{MIN}[[filters]]\nname = \"f\"\nkind = \"jwt-auth\"\n");
    assert_err(
        &one(&src),
        "filters[0].kind",
        line(&src, "jwt-auth"),
        "unknown variant",
    );

    // A syntax error has no key; its message stays on one line.
    let e = one("[[listeners]\nname = 1\n");
    assert_eq!((e.key.as_str(), e.line), ("", Some(1)));
    assert!(!e.to_string().contains('\n'), "{e}");
}

// ---- endpoints ----

#[test]
fn endpoint_forms() {
    let src = MIN.replace(
        "[\"127.0.0.1:9000\"]",
        "[\"10.0.0.1:80\", { address = \"api.internal:8443\", weight = 3 }, \"[::1]:9000\", { address = \"h:1\" }]",
    );
    let c = ok(&src);
    let e = &c.upstreams[0].endpoints;
    assert_eq!(
        e[0],
        Endpoint {
            address: "10.0.0.1:80".into(),
            weight: 1
        }
    );
    assert_eq!(
        e[1],
        Endpoint {
            address: "api.internal:8443".into(),
            weight: 3
        }
    );
    assert_eq!(
        e[2],
        Endpoint {
            address: "[::1]:9000".into(),
            weight: 1
        }
    );
    assert_eq!(e[3].weight, 1);

    // (endpoint as written, message fragment)
    let bad = [
        ("\"10.0.0.1\"", "port is required"),
        ("\"10.0.0.1:0\"", "port"),
        ("\"10.0.0.1:70000\"", "port"),
        ("\"http://a:80\"", "scheme"),
        ("\"a b:80\"", "not a valid host"),
        ("\"[::zz]:80\"", "IPv6"),
        ("{ address = \"a:1\", weight = 0 }", "at least 1"),
    ];
    for (ep, fragment) in bad {
        let src =
            format!("{MIN}[[upstreams]]\nname = \"v\"\nendpoints = [\n  \"ok:1\",\n  {ep},\n]\n");
        let e = one(&src);
        assert!(e.key.starts_with("upstreams[1].endpoints[1]"), "{e}");
        assert_eq!(e.line, line(&src, ep), "{e}");
        assert!(e.message.contains(fragment), "{e}");
    }
    let src = format!("{MIN}[[upstreams]]\nname = \"v\"\nendpoints = []\n");
    assert_err(
        &one(&src),
        "upstreams[1].endpoints",
        line(&src, "endpoints = []"),
        "at least one",
    );
}

// ---- messages ----

#[test]
fn display_and_read_errors() {
    let e = ConfigError {
        origin: "gw.toml".into(),
        key: "server.buffer_size".into(),
        line: Some(4),
        message: "must be at least 1KiB".into(),
    };
    assert_eq!(
        e.to_string(),
        "gw.toml:4: server.buffer_size: must be at least 1KiB"
    );
    let e = ConfigError { line: None, ..e };
    assert_eq!(
        e.to_string(),
        "gw.toml: server.buffer_size: must be at least 1KiB"
    );

    let missing = Path::new("/nonexistent/ringway.toml");
    let e = load_file(missing).expect_err("missing file");
    assert_eq!(e.0.len(), 1);
    assert_eq!((e.0[0].key.as_str(), e.0[0].line), ("", None));
    assert!(
        e.to_string()
            .starts_with("/nonexistent/ringway.toml: cannot read"),
        "{e}"
    );
}

// ---- other TOML spellings of the same file ----

#[test]
fn dotted_keys_and_table_headers_work_too() {
    let src = r#"server.workers = 2

[[listeners]]
name = "l"
address = "127.0.0.1:8080"

[[upstreams]]
name = "u"
[[upstreams.endpoints]]
address = "a:1"
weight = 2
[upstreams.health]
path = "/h"
interval = "1s"

[[filters]]
name = "f"
kind = "rate-limit"
key = "ip"
[[filters.rules]]
match = "*"
requests_per_second = 3

[[routes]]
name = "r"
upstream = "u"
match.path_prefix = "/x/"
match.headers.X-A = "1"
[routes.models]
"b*" = "u"
"a*" = "u"
"#;
    let c = ok(src);
    assert_eq!(c.server.workers, 2);
    assert_eq!(c.upstreams[0].endpoints[0].weight, 2);
    assert_eq!(
        c.upstreams[0].health.as_ref().map(|h| h.path.as_str()),
        Some("/h")
    );
    let r = &c.routes[0];
    assert_eq!(r.matcher.path_prefix.as_deref(), Some("/x/"));
    assert_eq!(r.matcher.headers, [("x-a".to_string(), "1".to_string())]);
    assert_eq!(r.models[0].0, "b*");

    // Errors inside header-style tables still point at their line.
    let bad = src.replace(
        "requests_per_second = 3",
        "requests_per_second = 3\ntokens_per_day = 1",
    );
    assert_err(
        &one(&bad),
        "filters[0].rules[0].tokens_per_day",
        line(&bad, "tokens_per_day"),
        "does not apply",
    );
}
