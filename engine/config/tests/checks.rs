//! Semantic checks: each reports its key and line, and all of them are reported together.

use std::net::IpAddr;

use super::*;

// ---- semantic checks, one error each ----

#[test]
fn semantic_checks() {
    // (text appended to MIN, key, line of the error within that text, message fragment)
    let appended = [
        ("[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:8081\"\n", "listeners[1].name", 2, "duplicate listener"),
        ("[[listeners]]\nname = \"l2\"\naddress = \"127.0.0.1:8080\"\n", "listeners[1].address", 3, "already used"),
        ("[admin]\nlisten = \"127.0.0.1:8080\"\n", "admin.listen", 2, "already used"),
        ("[[upstreams]]\nname = \"u\"\nendpoints = [\"a:1\"]\n", "upstreams[1].name", 2, "duplicate upstream"),
        ("[[upstreams]]\nname = \"v\"\nendpoints = [\"a:1\"]\nbalance = \"hash\"\n", "upstreams[1].hash_key", 4, "needs hash_key"),
        ("[[upstreams]]\nname = \"v\"\nendpoints = [\"a:1\"]\nbalance = \"hash\"\nhash_key = \"body\"\n", "upstreams[1].hash_key", 5, "header:NAME"),
        ("[[upstreams]]\nname = \"v\"\nendpoints = [\"a:1\"]\nhash_key = \"ip\"\n", "upstreams[1].hash_key", 4, "only used with"),
        ("[[upstreams]]\nname = \"v\"\nendpoints = [\"a:1\"]\nmax_idle = 10\nmax_connections = 5\n", "upstreams[1].max_idle", 4, "must not exceed"),
        ("[[upstreams]]\nname = \"v\"\nendpoints = [\"a:1\"]\nhealth = { path = \"hz\", interval = \"1s\" }\n", "upstreams[1].health.path", 4, "start with"),
        ("[[upstreams]]\nname = \"v\"\nendpoints = [\"a:1\", \"a:1\"]\n", "upstreams[1].endpoints[1]", 3, "duplicate endpoint"),
        ("[[upstreams]]\nname = \"bad name\"\nendpoints = [\"a:1\"]\n", "upstreams[1].name", 2, "may contain only"),
        ("[redis]\nflush_interval = \"5ms\"\n", "redis", 1, "url"),
        ("[redis]\nurl = \"redis://a:1\"\ncluster_nodes = [\"redis://b:1\"]\n", "redis.cluster_nodes", 3, "not both"),
        ("[redis]\nurl = \"http://a:1\"\n", "redis.url", 2, "redis://"),
        ("[log]\nlevel = \"trace\"\n", "log.level", 2, "debug"),
        ("[[consumers]]\nname = \"a\"\nkeys = []\n", "consumers[0].keys", 3, "at least one"),
        ("[[consumers]]\nname = \"a\"\nkeys = [\"k1\"]\n[[consumers]]\nname = \"b\"\nkeys = [\"k2\", \"k1\"]\n", "consumers[1].keys[1]", 6, "consumer \"a\""),
        ("[[filters]]\nname = \"a\"\nkind = \"key-auth\"\nscope = \"local\"\n", "filters[0].scope", 4, "does not apply"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nkey = \"ip\"\nmax_reserve = 5\nrules = [{ match = \"*\", requests_per_second = 1 }]\n", "filters[0].max_reserve", 5, "does not apply"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nkey = \"body\"\nrules = [{ match = \"*\", requests_per_second = 1 }]\n", "filters[0].key", 4, "header:NAME"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nrules = [{ match = \"*\", requests_per_second = 1 }]\n", "filters[0].key", 2, "needs key"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nkey = \"ip\"\nrules = []\n", "filters[0].rules", 5, "at least one rule"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nkey = \"ip\"\nrules = [{ match = \"*\", tokens_per_minute = 1 }]\n", "filters[0].rules[0].tokens_per_minute", 5, "requests_per_second|minute|hour|day"),
        ("[[filters]]\nname = \"a\"\nkind = \"token-limit\"\nkey = \"ip\"\nrules = [{ match = \"*\", requests_per_minute = 1 }]\n", "filters[0].rules[0].requests_per_minute", 5, "tokens_per_second|minute|hour|day"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nkey = \"ip\"\nrules = [{ match = \"a*b\", requests_per_minute = 1 }]\n", "filters[0].rules[0].match", 5, "only allowed at the end"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nkey = \"ip\"\nrules = [{ match = \"10.0.0.0/33\", requests_per_minute = 1 }]\n", "filters[0].rules[0].match", 5, "prefix length"),
        ("[[filters]]\nname = \"a\"\nkind = \"rate-limit\"\nkey = \"ip\"\nreplicas = 0\nrules = [{ match = \"*\", requests_per_minute = 1 }]\n", "filters[0].replicas", 5, "at least 1"),
    ];
    let base = MIN.lines().count();
    for (extra, key, line_in_extra, fragment) in appended {
        let src = format!("{MIN}{extra}");
        assert_err(&one(&src), key, Some(base + line_in_extra), fragment);
    }
}

#[test]
fn route_checks() {
    // (route lines added after `upstream = "u"`, key, line marker, message fragment)
    let cases = [
        (
            "listener = \"nope\"",
            "routes[0].listener",
            "nope",
            "no listener",
        ),
        (
            "filters = [\"ghost\"]",
            "routes[0].filters[0]",
            "ghost",
            "no filter",
        ),
        (
            "match = { path = \"/a\", path_prefix = \"/b\" }",
            "routes[0].match.path",
            "path =",
            "not both",
        ),
        (
            "match = { path_prefix = \"v1/\" }",
            "routes[0].match.path_prefix",
            "v1/",
            "start with",
        ),
        (
            "match = { path = \"v1\" }",
            "routes[0].match.path",
            "v1",
            "start with",
        ),
        (
            "match = { methods = [\"GE T\"] }",
            "routes[0].match.methods[0]",
            "GE T",
            "HTTP method",
        ),
        (
            "match = { headers = { \"x y\" = \"1\" } }",
            "routes[0].match.headers.\"x y\"",
            "x y",
            "header name",
        ),
        (
            "strip_prefix = true",
            "routes[0].strip_prefix",
            "strip_prefix",
            "path_prefix",
        ),
        (
            "models = { \"gpt-*\" = \"u\", \"claude-*\" = \"nope\" }",
            "routes[0].models.\"claude-*\"",
            "claude",
            "no upstream",
        ),
        (
            "model_map = { \"a\" = \"\" }",
            "routes[0].model_map.a",
            "model_map",
            "must not be empty",
        ),
        (
            "fallbacks = [\"ghost\"]",
            "routes[0].fallbacks[0]",
            "ghost",
            "no upstream",
        ),
        (
            "fallbacks = [\"u\"]",
            "routes[0].fallbacks[0]",
            "fallbacks",
            "already the route's upstream",
        ),
        (
            "fallback_on = [429, 200]",
            "routes[0].fallback_on[1]",
            "fallback_on",
            "not an error status",
        ),
        (
            "fallback_on = [\"sometimes\"]",
            "routes[0].fallback_on[0]",
            "sometimes",
            "\"connect\" or \"timeout\"",
        ),
        (
            "max_attempts = 0",
            "routes[0].max_attempts",
            "max_attempts",
            "1 to 10",
        ),
    ];
    for (extra, key, marker, fragment) in cases {
        let src = MIN.replace("upstream = \"u\"", &format!("upstream = \"u\"\n{extra}"));
        assert_err(&one(&src), key, line(&src, marker), fragment);
    }
    let src = MIN.replace("upstream = \"u\"", "upstream = \"nope\"");
    assert_err(
        &one(&src),
        "routes[0].upstream",
        line(&src, "nope"),
        "no upstream named \"nope\"",
    );
}

#[test]
fn fallback_keys_and_their_defaults() {
    let c = ok(MIN);
    let r = &c.routes[0];
    assert!(r.fallbacks.is_empty());
    assert_eq!(r.max_attempts, 3);
    assert_eq!(r.fallback_on.statuses, [429, 500, 502, 503, 504, 529]);
    assert!(r.fallback_on.connect && r.fallback_on.timeout);
    let src = MIN.replace("[[routes]]", "[[upstreams]]\nname = \"b\"\nendpoints = [\"127.0.0.1:9001\"]\n\n[[routes]]")
        .replace(
            "upstream = \"u\"",
            "upstream = \"u\"\nfallbacks = [\"b\"]\nfallback_on = [503, \"timeout\"]\nmax_attempts = 5",
        );
    let c = ok(&src);
    let r = &c.routes[0];
    assert_eq!(r.fallbacks, ["b"]);
    assert_eq!(r.max_attempts, 5);
    assert_eq!(r.fallback_on.statuses, [503]);
    assert!(!r.fallback_on.connect && r.fallback_on.timeout);
}

#[test]
fn empty_file_needs_listener_and_route() {
    let e = errs("");
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_err(&e[0], "listeners", None, "at least one");
    assert_err(&e[1], "routes", None, "at least one");
}

// ---- several errors at once ----

#[test]
fn all_semantic_errors_are_reported_in_file_order() {
    let src = r#"[server]
max_headers = 1000

[[listeners]]
name = "l"
address = "127.0.0.1:8080"

[[upstreams]]
name = "u"
endpoints = ["nohost"]

[[filters]]
name = "rl"
kind = "rate-limit"
scope = "cluster"
key = "ip"
rules = [ { match = "*", requests_per_minute = 5 } ]

[[routes]]
name = "r"
upstream = "missing"
filters = ["rl", "absent"]
"#;
    let e = errs(src);
    let got: Vec<(&str, Option<usize>)> = e.iter().map(|e| (e.key.as_str(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("server.max_headers", Some(2)),
            ("upstreams[0].endpoints[0]", Some(10)),
            ("filters[0].scope", Some(15)),
            ("routes[0].upstream", Some(21)),
            ("routes[0].filters[1]", Some(22)),
        ]
    );
    let text = ConfigErrors(e).to_string();
    assert_eq!(text.lines().count(), 5);
    assert!(
        text.starts_with("t.toml:2: server.max_headers: must be between 1 and 256"),
        "{text}"
    );
}

#[test]
fn cluster_scope_needs_redis() {
    let src = format!(
        "{MIN}[[filters]]\nname = \"t\"\nkind = \"token-limit\"\nscope = \"cluster\"\nkey = \"consumer\"\n\
         rules = [ {{ match = \"*\", tokens_per_minute = 100 }} ]\n"
    );
    let e = one(&src);
    assert_err(
        &e,
        "filters[0].scope",
        line(&src, "cluster"),
        "add a [redis] section",
    );
    assert!(
        e.message.contains("url") && e.message.contains("cluster_nodes"),
        "{e}"
    );

    let with_redis = format!("{src}[redis]\ncluster_nodes = [\"redis://a:1\", \"redis://b:1\"]\n");
    let c = ok(&with_redis);
    assert_eq!(c.redis.map(|r| r.cluster_nodes.len()), Some(2));
}

// ---- limit keys and rule matchers ----

#[test]
fn key_sources_and_rule_matchers() {
    // (key, match, expected matcher)
    let v4: IpAddr = "10.0.0.0".parse().expect("ip");
    let cases = [
        (
            "ip",
            "10.0.0.0/8",
            RuleMatch::Cidr {
                addr: v4,
                prefix: 8,
            },
        ),
        (
            "consumer",
            "10.0.0.0/8",
            RuleMatch::Exact("10.0.0.0/8".into()),
        ),
        ("consumer", "*", RuleMatch::Any),
        ("consumer", "team-*", RuleMatch::Prefix("team-".into())),
        ("consumer", "regex:^a.+$", RuleMatch::Regex("^a.+$".into())),
        (
            "ip",
            "::1/128",
            RuleMatch::Cidr {
                addr: "::1".parse().expect("ip"),
                prefix: 128,
            },
        ),
    ];
    for (key, m, want) in cases {
        let src = format!(
            "{MIN}[[filters]]\nname = \"f\"\nkind = \"rate-limit\"\nkey = \"{key}\"\n\
             rules = [ {{ match = \"{m}\", requests_per_hour = 1 }} ]\n"
        );
        let c = ok(&src);
        let FilterKind::RateLimit(l) = &c.filters[0].kind else {
            panic!("rate-limit")
        };
        assert_eq!(l.rules[0].matcher, want, "{key} {m}");
    }
    // (written, parsed)
    let keys = [
        ("consumer", KeySource::Consumer),
        ("ip", KeySource::Ip),
        ("route", KeySource::Route),
        ("global", KeySource::Global),
        ("client_cert", KeySource::ClientCert),
        ("header:X-Tenant", KeySource::Header("x-tenant".into())),
        ("query:api_key", KeySource::Query("api_key".into())),
        ("cookie:sid", KeySource::Cookie("sid".into())),
    ];
    for (written, want) in keys {
        let src = format!(
            "{MIN}[[filters]]\nname = \"f\"\nkind = \"rate-limit\"\nkey = \"{written}\"\n\
             rules = [ {{ match = \"*\", requests_per_day = 1 }} ]\n"
        );
        let FilterKind::RateLimit(l) = ok(&src).filters.remove(0).kind else {
            panic!()
        };
        assert_eq!(l.key, want, "{written}");
    }
}

#[test]
fn route_match_is_normalised() {
    let src = MIN.replace(
        "upstream = \"u\"",
        "upstream = \"u\"\nmatch = { host = \"API.Example.com:8443\", path_prefix = \"/v1/\", \
         methods = [\"post\", \"Get\"], headers = { \"X-Env\" = \"Prod\", \"a\" = \"1\" } }\nstrip_prefix = true",
    );
    let m = ok(&src).routes.remove(0).matcher;
    assert_eq!(m.host.as_deref(), Some("api.example.com"));
    assert_eq!(m.methods, ["POST", "GET"]);
    assert_eq!(
        m.headers,
        [
            ("x-env".to_string(), "Prod".to_string()),
            ("a".to_string(), "1".to_string())
        ]
    );
}
