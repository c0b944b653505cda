//! The TLS keys: listeners, upstreams and Redis; certificate problems name key, line and file.

use std::path::Path;

use super::*;
use crate::tls::testpki::TestPki;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Loads `src` with relative paths starting at `base`, at time `now`.
fn load_in(src: &str, base: &Path, now: i64) -> Result<Config, ConfigErrors> {
    let var = |_: &str| None;
    load_at(
        src,
        "t.toml",
        &validate::Env {
            base,
            now,
            var: &var,
        },
    )
}

fn ok_in(src: &str, base: &Path) -> Config {
    match load_in(src, base, now()) {
        Ok(c) => c,
        Err(e) => panic!("expected no errors, got:\n{e}"),
    }
}

fn one_in(src: &str, base: &Path, at: i64) -> ConfigError {
    match load_in(src, base, at) {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(mut e) => {
            assert_eq!(e.0.len(), 1, "expected one error, got {e}");
            e.0.remove(0)
        }
    }
}

/// MIN with its listener made a TLS listener by `tls` (lines of a `[listeners.tls]` table).
fn tls_listener(tls: &str) -> String {
    MIN.replacen(
        "address = \"127.0.0.1:8080\"\n",
        &format!("address = \"127.0.0.1:8080\"\n[listeners.tls]\n{tls}\n"),
        1,
    )
}

#[test]
fn listener_tls_loads_certs_relative_to_the_file() {
    let pki = TestPki::new();
    pki.leaf("api", "api", &["DNS:api.example.com"], 30);
    pki.leaf(
        "wild",
        "wild",
        &["DNS:*.example.com", "DNS:Example.com"],
        30,
    );
    let src = tls_listener(
        "certs = [ { cert = \"api.pem\", key = \"api.key\" }, { cert = \"wild.pem\", key = \"wild.key\" } ]\n\
         min_version = \"1.3\"\n\
         client_auth = { ca = \"ca.pem\", mode = \"optional\" }",
    );
    let c = ok_in(&src, &pki.dir);
    let t = c.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(t.certs.len(), 2);
    assert_eq!(t.certs[0].cert, pki.path("api.pem"));
    assert_eq!(t.certs[0].loaded.names, ["api.example.com"]);
    assert_eq!(t.certs[1].loaded.names, ["*.example.com", "example.com"]);
    assert!(t.certs[0].loaded.subject.contains("CN=api"));
    assert_eq!(t.min_version, TlsVersion::V1_3);
    let auth = t.client_auth.as_ref().expect("client auth");
    assert_eq!(auth.mode, ClientAuthMode::Optional);
    assert_eq!(auth.roots.certs.len(), 1);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    // Defaults: TLS 1.2 and up; a client_auth table without mode requires certificates.
    let src = tls_listener(
        "certs = [ { cert = \"api.pem\", key = \"api.key\" } ]\nclient_auth = { ca = \"ca.pem\" }",
    );
    let t = ok_in(&src, &pki.dir).listeners[0].tls.clone().expect("tls");
    assert_eq!(t.min_version, TlsVersion::V1_2);
    assert_eq!(
        t.client_auth.map(|a| a.mode),
        Some(ClientAuthMode::Required)
    );
    // No [listeners.tls]: plain.
    assert!(ok(MIN).listeners[0].tls.is_none());
}

#[test]
fn certificate_problems_name_key_line_and_file() {
    let pki = TestPki::new();
    pki.leaf("a", "a", &["DNS:a.test"], 30);
    pki.leaf("b", "b", &["DNS:b.test"], 30);
    std::fs::write(pki.path("empty.pem"), "not pem at all\n").expect("write");
    let t = now();
    // (certs entry, key, message fragment)
    let cases = [
        (
            "{ cert = \"nope.pem\", key = \"a.key\" }",
            "certs[0].cert",
            "nope.pem does not exist",
        ),
        (
            "{ cert = \"a.pem\", key = \"nope.key\" }",
            "certs[0].key",
            "nope.key does not exist",
        ),
        (
            "{ cert = \"empty.pem\", key = \"a.key\" }",
            "certs[0].cert",
            "no PEM CERTIFICATE found in",
        ),
        (
            "{ cert = \"a.key\", key = \"a.key\" }",
            "certs[0].cert",
            "no PEM CERTIFICATE",
        ),
        (
            "{ cert = \"a.pem\", key = \"a.pem\" }",
            "certs[0].key",
            "no PEM private key",
        ),
        (
            "{ cert = \"a.pem\", key = \"b.key\" }",
            "certs[0].key",
            "does not match the certificate in",
        ),
    ];
    for (entry, key, fragment) in cases {
        let src = tls_listener(&format!("certs = [ {entry} ]"));
        let e = one_in(&src, &pki.dir, t);
        assert_err(
            &e,
            &format!("listeners[0].tls.{key}"),
            line(&src, "certs = ["),
            fragment,
        );
    }
    // The unreadable file is named in the message (the key's contents never are).
    let src = tls_listener("certs = [ { cert = \"a.pem\", key = \"b.key\" } ]");
    let msg = one_in(&src, &pki.dir, t).message;
    assert!(msg.contains("b.key") && msg.contains("a.pem"), "{msg}");
    assert!(!msg.contains("PRIVATE"), "{msg}");

    // Other listener TLS keys.
    let good = "certs = [ { cert = \"a.pem\", key = \"a.key\" } ]";
    let cases = [
        (
            "certs = []",
            "listeners[0].tls.certs",
            "certs = []",
            "at least one",
        ),
        (
            &*format!("{good}\nmin_version = \"1.1\""),
            "listeners[0].tls.min_version",
            "min_version",
            "\"1.2\" or \"1.3\"",
        ),
        (
            &*format!("{good}\nclient_auth = {{ ca = \"ca.pem\", mode = \"maybe\" }}"),
            "listeners[0].tls.client_auth.mode",
            "client_auth",
            "\"optional\" or \"required\"",
        ),
        (
            &*format!("{good}\nclient_auth = {{ ca = \"missing-ca.pem\" }}"),
            "listeners[0].tls.client_auth.ca",
            "client_auth",
            "missing-ca.pem does not exist",
        ),
    ];
    for (tls, key, needle, fragment) in cases {
        let src = tls_listener(tls);
        assert_err(
            &one_in(&src, &pki.dir, t),
            key,
            line(&src, needle),
            fragment,
        );
    }
}

#[test]
fn expired_is_an_error_and_expiring_soon_a_warning() {
    let pki = TestPki::new();
    pki.leaf("short", "short", &["DNS:s.test"], 5);
    let src = tls_listener("certs = [ { cert = \"short.pem\", key = \"short.key\" } ]");
    let c = ok_in(&src, &pki.dir);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = &c.warnings[0];
    assert_eq!(w.key, "listeners[0].tls.certs[0].cert");
    assert_eq!(w.line, line(&src, "certs = ["));
    assert!(
        w.message.contains("expires on") && w.message.contains("short.pem"),
        "{w}"
    );

    let later = now() + 10 * 86_400;
    let e = one_in(&src, &pki.dir, later);
    assert_err(
        &e,
        "listeners[0].tls.certs[0].cert",
        line(&src, "certs = ["),
        "expired on",
    );
}

#[test]
fn every_tls_error_is_reported_at_once() {
    let pki = TestPki::new();
    let src = format!(
        "{}[[upstreams]]\nname = \"v\"\nendpoints = [\"a:443\"]\ntls = {{ ca = \"gone.pem\", roots = \"mine\" }}\n",
        tls_listener("certs = [ { cert = \"x.pem\", key = \"x.key\" } ]\nmin_version = \"2\"")
    );
    let e = load_in(&src, &pki.dir, now()).expect_err("errors");
    let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "listeners[0].tls.certs[0].cert",
            "listeners[0].tls.min_version",
            "upstreams[1].tls.roots",
            "upstreams[1].tls.ca",
        ]
    );
}

#[test]
fn upstream_tls_forms_and_host_header_defaults() {
    let pki = TestPki::new();
    pki.leaf("client", "gateway", &[], 30);
    let up = |extra: &str| {
        format!(
            "{MIN}[[upstreams]]\nname = \"v\"\nendpoints = [\"api.example.com:443\"]\n{extra}\n"
        )
    };
    let c = ok_in(&up("tls = true"), &pki.dir);
    let v = c.upstream("v").expect("v");
    let t = v.tls.as_ref().expect("tls on");
    assert_eq!(
        (t.sni.as_deref(), t.roots, t.insecure_skip_verify),
        (None, Roots::Webpki, false)
    );
    assert_eq!(v.host_header, HostHeader::Endpoint);
    assert_eq!(
        v.host_header_for("api.example.com:443"),
        Some("api.example.com")
    );
    assert_eq!(
        v.host_header_for("api.example.com:8443"),
        Some("api.example.com:8443")
    );
    assert_eq!(v.host_header_for("[::1]:443"), Some("[::1]"));
    // Plain upstreams pass the client's Host by default.
    assert_eq!(c.upstream("u").expect("u").host_header, HostHeader::Client);
    let c = ok_in(
        &up("tls = false\nhost_header = \"api.internal:8443\""),
        &pki.dir,
    );
    let v = c.upstream("v").expect("v");
    assert!(v.tls.is_none());
    assert_eq!(
        v.host_header,
        HostHeader::Literal("api.internal:8443".into())
    );
    assert_eq!(v.host_header_for("10.0.0.1:80"), Some("api.internal:8443"));
    let mut plain = v.clone();
    plain.host_header = HostHeader::Endpoint;
    assert_eq!(plain.host_header_for("backend:80"), Some("backend"));
    assert_eq!(plain.host_header_for("backend:443"), Some("backend:443"));

    let c = ok_in(
        &up("tls = { sni = \"internal.test\", ca = \"ca.pem\", client_cert = \"client.pem\", client_key = \"client.key\" }\nhost_header = \"client\""),
        &pki.dir,
    );
    let v = c.upstream("v").expect("v");
    let t = v.tls.as_ref().expect("tls");
    assert_eq!(t.sni.as_deref(), Some("internal.test"));
    assert_eq!(
        t.ca.as_ref().map(|(p, _)| p.clone()),
        Some(pki.path("ca.pem"))
    );
    assert!(t.client_cert.is_some());
    assert_eq!(v.host_header, HostHeader::Client);

    // insecure_skip_verify is a warning every time the file is loaded.
    let src = up("tls = { insecure_skip_verify = true }");
    let c = ok_in(&src, &pki.dir);
    assert_eq!(c.warnings.len(), 1);
    assert_eq!(c.warnings[0].key, "upstreams[1].tls.insecure_skip_verify");
    assert_eq!(c.warnings[0].line, line(&src, "insecure_skip_verify"));

    let t = now();
    let cases = [
        (
            "tls = { sni = \"not a name\" }",
            "upstreams[1].tls.sni",
            "not a valid DNS name",
        ),
        (
            "tls = { client_cert = \"client.pem\" }",
            "upstreams[1].tls.client_key",
            "needs client_key",
        ),
        (
            "tls = { client_key = \"client.key\" }",
            "upstreams[1].tls.client_cert",
            "needs client_cert",
        ),
        (
            "tls = { bogus = 1 }",
            "upstreams[1].tls.bogus",
            "unknown key",
        ),
        (
            "tls = \"yes\"",
            "upstreams[1].tls",
            "true, false or a table",
        ),
        (
            "host_header = \"a b\"",
            "upstreams[1].host_header",
            "\"client\", \"endpoint\"",
        ),
    ];
    for (extra, key, fragment) in cases {
        let src = up(extra);
        let e = one_in(&src, &pki.dir, t);
        assert_eq!(e.key, key, "{e}");
        assert!(e.message.contains(fragment), "{e}");
        let needle = extra.split(" = ").next().unwrap_or(extra);
        assert_eq!(e.line, line(&src, &format!("{needle} =")), "{e}");
    }
}

#[test]
fn endpoint_host_header_needs_one_host_name() {
    let pki = TestPki::new();
    let src = format!(
        "{MIN}[[upstreams]]\nname = \"v\"\nendpoints = [\"a.example.com:443\", \"b.example.com:443\"]\ntls = true\n"
    );
    let e = one_in(&src, &pki.dir, now());
    assert_eq!(e.key, "upstreams[1].host_header");
    assert!(e.message.contains("one host name"), "{}", e.message);
    // One name on several ports is two hosts too; a literal or "client" is fine.
    let two_ports = src.replace("b.example.com:443", "a.example.com:8443");
    assert_eq!(
        one_in(&two_ports, &pki.dir, now()).key,
        "upstreams[1].host_header"
    );
    ok_in(&format!("{src}host_header = \"client\"\n"), &pki.dir);
    let one = format!(
        "{MIN}[[upstreams]]\nname = \"v\"\nendpoints = [\"a.example.com:443\"]\ntls = true\n"
    );
    ok_in(&one, &pki.dir);
}

#[test]
fn redis_tls_needs_rediss_and_a_readable_ca() {
    let pki = TestPki::new();
    let c = ok_in(
        &format!("{MIN}[redis]\nurl = \"rediss://r:6380\"\ntls = {{ ca = \"ca.pem\" }}\n"),
        &pki.dir,
    );
    let r = c.redis.expect("redis");
    assert_eq!(r.tls.and_then(|t| t.ca), Some(pki.path("ca.pem")));
    let c = ok_in(
        &format!("{MIN}[redis]\ncluster_nodes = [\"rediss://a:1\", \"rediss://b:1\"]\n"),
        &pki.dir,
    );
    assert!(c.redis.expect("redis").tls.is_none());

    let src = format!("{MIN}[redis]\nurl = \"redis://r:6379\"\ntls = {{ ca = \"ca.pem\" }}\n");
    assert_err(
        &one_in(&src, &pki.dir, now()),
        "redis.tls",
        line(&src, "tls ="),
        "rediss://",
    );
    let src = format!("{MIN}[redis]\nurl = \"rediss://r:6379\"\ntls = {{ ca = \"nope.pem\" }}\n");
    assert_err(
        &one_in(&src, &pki.dir, now()),
        "redis.tls.ca",
        line(&src, "tls ="),
        "does not exist",
    );
}
