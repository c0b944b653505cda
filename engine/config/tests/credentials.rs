//! `credentials`, upstream `model_map` and header rules: errors name the key and line, and no
//! secret ever appears in an error or in a `Debug` of the configuration.

use std::ffi::OsString;
use std::path::Path;

use super::{assert_err, line};
use crate::config::{load_at, validate, Config, ConfigError, CredentialKind};

const SECRET: &str = "sk-test-SECRET-value-123";

fn load(src: &str) -> Result<Config, Vec<ConfigError>> {
    let var = |n: &str| match n {
        "PROVIDER_KEY" => Some(OsString::from(format!("{SECRET}\n"))),
        "OTHER_KEY" => Some(OsString::from("sk-other-SECRET")),
        "BAD_KEY" => Some(OsString::from(format!("{SECRET}\r\nx-evil: 1"))),
        _ => None,
    };
    let env = validate::Env {
        base: Path::new("/"),
        now: 0,
        var: &var,
    };
    load_at(src, "t.toml", &env).map_err(|e| e.0)
}

fn with_upstream(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:8080\"\n\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:9000\"]\n{extra}\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n"
    )
}

fn with_route(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:8080\"\n\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:9000\"]\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n{extra}\n"
    )
}

fn one_err(src: &str) -> ConfigError {
    match load(src) {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(mut e) => {
            assert_eq!(e.len(), 1, "{e:#?}");
            let e = e.remove(0);
            assert!(!e.to_string().contains("SECRET"), "secret in {e}");
            e
        }
    }
}

#[test]
fn keys_are_read_trimmed_weighted_and_never_printed() {
    let src = with_upstream(
        "credentials = { kind = \"bearer\", keys = [ { env = \"PROVIDER_KEY\" }, { env = \"OTHER_KEY\", weight = 3 } ] }\nmodel_map = { \"gpt-4o\" = \"gpt-4o-2024-08-06\" }",
    );
    let c = load(&src).unwrap_or_else(|e| panic!("{e:?}"));
    let u = &c.upstreams[0];
    let creds = u.credentials.as_ref().expect("credentials");
    assert_eq!(creds.kind, CredentialKind::Bearer);
    assert_eq!(creds.keys[0].secret.expose(), SECRET.as_bytes());
    assert_eq!(creds.keys[1].weight, 3);
    assert_eq!(
        u.model_map,
        [("gpt-4o".to_string(), "gpt-4o-2024-08-06".to_string())]
    );
    let debug = format!("{c:?}");
    assert!(!debug.contains("SECRET"), "Debug leaks a key");
    assert!(
        debug.contains("PROVIDER_KEY"),
        "the variable name is fine to print"
    );
}

#[test]
fn every_kind_and_header_name() {
    for (kind, want) in [
        ("anthropic", CredentialKind::Anthropic),
        ("azure", CredentialKind::Azure),
    ] {
        let src = with_upstream(&format!(
            "credentials = {{ kind = \"{kind}\", keys = [ {{ env = \"PROVIDER_KEY\" }} ] }}"
        ));
        let c = load(&src).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            c.upstreams[0].credentials.as_ref().map(|c| &c.kind),
            Some(&want)
        );
    }
    let src = with_upstream(
        "credentials = { kind = \"header\", name = \"X-Goog-Api-Key\", keys = [ { env = \"PROVIDER_KEY\" } ] }",
    );
    let c = load(&src).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        c.upstreams[0].credentials.as_ref().map(|c| &c.kind),
        Some(&CredentialKind::Header("x-goog-api-key".into()))
    );
}

#[test]
fn an_unset_variable_names_the_variable_key_and_line() {
    let src =
        with_upstream("credentials = { kind = \"bearer\", keys = [ { env = \"MISSING_KEY\" } ] }");
    let e = one_err(&src);
    assert_err(
        &e,
        "upstreams[0].credentials.keys[0].env",
        line(&src, "MISSING_KEY"),
        "environment variable MISSING_KEY is not set",
    );
}

#[test]
fn an_unreadable_file_names_the_file() {
    let src = with_upstream(
        "credentials = { kind = \"bearer\", keys = [ { file = \"/nonexistent/openai_key\" } ] }",
    );
    let e = one_err(&src);
    assert_err(
        &e,
        "upstreams[0].credentials.keys[0].file",
        line(&src, "openai_key"),
        "/nonexistent/openai_key",
    );
}

#[test]
fn a_key_file_is_trimmed() {
    let dir = std::env::temp_dir().join(format!("ringway-creds-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("key");
    std::fs::write(&path, format!("{SECRET}\n\n")).expect("write key");
    let src = with_upstream(&format!(
        "credentials = {{ kind = \"azure\", keys = [ {{ file = \"{}\", weight = 2 }} ] }}",
        path.display()
    ));
    let c = load(&src).unwrap_or_else(|e| panic!("{e:?}"));
    let k = &c.upstreams[0].credentials.as_ref().expect("creds").keys[0];
    assert_eq!(k.secret.expose(), SECRET.as_bytes());
    assert_eq!(k.weight, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_key_with_a_line_break_is_refused_without_echoing_it() {
    let src =
        with_upstream("credentials = { kind = \"bearer\", keys = [ { env = \"BAD_KEY\" } ] }");
    let e = one_err(&src);
    assert_err(
        &e,
        "upstreams[0].credentials.keys[0].env",
        line(&src, "BAD_KEY"),
        "control character",
    );
}

#[test]
fn credential_shape_errors() {
    let cases = [
        ("credentials = { kind = \"basic\", keys = [ { env = \"PROVIDER_KEY\" } ] }", "upstreams[0].credentials.kind", "expected \"bearer\""),
        ("credentials = { kind = \"header\", keys = [ { env = \"PROVIDER_KEY\" } ] }", "upstreams[0].credentials.name", "needs name"),
        ("credentials = { kind = \"bearer\", name = \"x-k\", keys = [ { env = \"PROVIDER_KEY\" } ] }", "upstreams[0].credentials.name", "only used with kind = \"header\""),
        ("credentials = { kind = \"header\", name = \"host\", keys = [ { env = \"PROVIDER_KEY\" } ] }", "upstreams[0].credentials.name", "frames or routes"),
        ("credentials = { kind = \"bearer\", keys = [] }", "upstreams[0].credentials.keys", "at least one key"),
        ("credentials = { kind = \"bearer\", keys = [ { env = \"PROVIDER_KEY\", file = \"/k\" } ] }", "upstreams[0].credentials.keys[0]", "exactly one of"),
        ("credentials = { kind = \"bearer\", keys = [ { env = \"PROVIDER_KEY\", weight = 0 } ] }", "upstreams[0].credentials.keys[0].weight", "at least 1"),
        ("model_map = { \"gpt-4o\" = \"\" }", "upstreams[0].model_map.gpt-4o", "must not be empty"),
    ];
    for (extra, key, fragment) in cases {
        let src = with_upstream(extra);
        let e = one_err(&src);
        assert_err(
            &e,
            key,
            line(&src, extra.split(" = ").next().unwrap_or(extra)),
            fragment,
        );
    }
    let src = with_upstream("credentials = { kind = \"bearer\", keys = [ { envv = \"X\" } ] }");
    let e = one_err(&src);
    assert!(e.message.contains("unknown key"), "{e}");
}

#[test]
fn header_rules_resolve_lowercased() {
    let src = with_route(
        "request_headers = { set = { \"X-Tenant\" = \"acme\" }, remove = [\"X-Debug\"] }\nresponse_headers = { set = { \"x-served-by\" = \"ringway\" }, remove = [\"openai-organization\"] }",
    );
    let c = load(&src).unwrap_or_else(|e| panic!("{e:?}"));
    let r = &c.routes[0];
    assert_eq!(
        r.request_headers.set,
        [("x-tenant".to_string(), "acme".to_string())]
    );
    assert_eq!(r.request_headers.remove, ["x-debug"]);
    assert_eq!(r.response_headers.remove, ["openai-organization"]);
}

#[test]
fn header_rules_refuse_framing_and_hop_by_hop_headers() {
    for name in [
        "connection",
        "Transfer-Encoding",
        "content-length",
        "host",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        "trailer",
    ] {
        let src = with_route(&format!("response_headers = {{ remove = [\"{name}\"] }}"));
        let e = one_err(&src);
        assert_err(
            &e,
            "routes[0].response_headers.remove[0]",
            line(&src, "response_headers"),
            "hop-by-hop or framing",
        );
        let src = with_route(&format!(
            "request_headers = {{ set = {{ \"{name}\" = \"v\" }} }}"
        ));
        let e = one_err(&src);
        assert_eq!(
            e.key,
            format!("routes[0].request_headers.set.{name}"),
            "{e}"
        );
        assert_eq!(e.line, line(&src, "request_headers"));
    }
    let cases = [
        (
            "request_headers = { set = { \"x-request-id\" = \"1\" } }",
            "routes[0].request_headers.set.x-request-id",
            "written by Ringway",
        ),
        (
            "request_headers = { set = { \"bad name\" = \"1\" } }",
            "routes[0].request_headers.set.\"bad name\"",
            "not a valid header name",
        ),
        (
            "request_headers = { set = { \"x-a\" = \"1\\r\\nx-b: 2\" } }",
            "routes[0].request_headers.set.x-a",
            "one line",
        ),
        (
            "response_headers = { set = { \"x-a\" = \"1\" }, remove = [\"X-A\"] }",
            "routes[0].response_headers.remove[0]",
            "both set and removed",
        ),
    ];
    for (extra, key, fragment) in cases {
        let src = with_route(extra);
        let e = one_err(&src);
        assert_err(&e, key, line(&src, extra), fragment);
    }
}

#[test]
fn a_rule_cannot_set_the_header_the_provider_key_goes_in() {
    let src = "[[listeners]]\nname = \"l\"\naddress = \"127.0.0.1:8080\"\n\n[[upstreams]]\nname = \"u\"\nendpoints = [\"127.0.0.1:9000\"]\ncredentials = { kind = \"bearer\", keys = [ { env = \"PROVIDER_KEY\" } ] }\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\nrequest_headers = { set = { \"Authorization\" = \"x\" } }\n";
    let e = one_err(src);
    assert_err(
        &e,
        "routes[0].request_headers.set.Authorization",
        line(src, "request_headers"),
        "sends its provider key in \"authorization\"",
    );
}
