//! `ringway demo`: the gateway in front of a built-in OpenAI- and
//! Anthropic-compatible upstream on loopback, for a first look with no API
//! key and no network.

pub mod upstream;

use crate::config;

/// The admin address: 127.0.0.1:9901, or a free port when that one is taken
/// (a demo should start wherever it is tried).
fn admin_addr() -> String {
    let preferred = "127.0.0.1:9901";
    if std::net::TcpListener::bind(preferred).is_ok() {
        return preferred.to_string();
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or_else(|_| preferred.to_string(), |a| a.to_string())
}

/// The demo's two built-in upstreams. Dropping it stops both.
pub struct Upstreams {
    /// `demo`, the route's upstream: fails when a request asks (`x-demo-fail`).
    pub primary: upstream::DemoUpstream,
    /// `demo-backup`: always answers, for a fallback to go to.
    pub backup: upstream::DemoUpstream,
}

/// The demo configuration for a flaky upstream at `primary`, a healthy one at
/// `backup`, a gateway on `listen` and the admin endpoint on `admin`.
pub fn config_text(
    listen: &str,
    primary: std::net::SocketAddr,
    backup: std::net::SocketAddr,
    admin: &str,
) -> String {
    format!(
        r#"# ringway demo: the gateway in front of its built-in OpenAI-compatible upstreams.
[server]
workers = 1
pin_cores = false
buffers_per_worker = 1024

[admin]
listen = "{admin}"

[[listeners]]
name = "public"
address = "{listen}"

# Fails when a request asks, with the header x-demo-fail.
[[upstreams]]
name = "demo"
endpoints = ["{primary}"]
response_timeout = "3s"

# Always answers (it ignores x-demo-fail).
[[upstreams]]
name = "demo-backup"
endpoints = ["{backup}"]

# Token counts by model in /metrics (and the request body held, so a failed
# attempt can be sent again).
[[filters]]
name = "stats"
kind = "ai-stats"

[[routes]]
name = "openai"
match = {{ path_prefix = "/v1/" }}
upstream = "demo"
filters = ["stats"]
# A 429, a 5xx, a refused connection or 3 s of silence from demo: demo-backup answers.
fallbacks = ["demo-backup"]
"#
    )
}

/// Starts the demo upstreams and returns the configuration to run, printing
/// what to try.
pub fn prepare(listen: &str) -> Result<(config::Config, Upstreams), String> {
    let primary =
        upstream::DemoUpstream::start_flaky().map_err(|e| format!("demo upstream: {e}"))?;
    let backup = upstream::DemoUpstream::start().map_err(|e| format!("demo upstream: {e}"))?;
    let admin = admin_addr();
    let text = config_text(listen, primary.addr, backup.addr, &admin);
    let cfg = config::load_str(&text, "demo").map_err(|e| e.to_string())?;
    let base = format!("http://{listen}");
    println!(
        r#"Ringway demo: gateway on {base}, built-in OpenAI-compatible upstreams:
  demo         on {primary_addr}  the route's upstream; fails when a request asks (x-demo-fail)
  demo-backup  on {backup_addr}  always answers

Try:
  curl -s {base}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo-1","messages":[{{"role":"user","content":"Hello, Ringway"}}]}}'
  curl -sN {base}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo-1","stream":true,"messages":[{{"role":"user","content":"Stream to me"}}]}}'
  curl -s {base}/v1/messages -H 'content-type: application/json' \
    -d '{{"model":"claude-demo","max_tokens":64,"messages":[{{"role":"user","content":"Hi"}}]}}'
  # make demo fail (x-demo-fail: 429, 500, 502, 503, 504, 529, stall or reset):
  # demo-backup answers instead
  curl -si {base}/v1/chat/completions -H 'content-type: application/json' -H 'x-demo-fail: 503' \
    -d '{{"model":"demo-1","messages":[{{"role":"user","content":"Hello, Ringway"}}]}}'
  curl -s http://{admin}/metrics | grep -E 'ringway_requests_total|ringway_upstream_attempts_total|ringway_ai_tokens_total'

  curl -s http://{admin}/stats

Ctrl-C drains and stops.
"#,
        primary_addr = primary.addr,
        backup_addr = backup.addr,
        admin = admin
    );
    Ok((cfg, Upstreams { primary, backup }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo configuration loads, declares the flaky `demo` and the healthy
    /// `demo-backup`, and routes `/v1/` to `demo`, falling back to `demo-backup`.
    #[test]
    fn demo_config_declares_primary_and_backup() {
        let (p, b) = (
            "127.0.0.1:1001".parse().unwrap(),
            "127.0.0.1:1002".parse().unwrap(),
        );
        let text = config_text("127.0.0.1:8080", p, b, "127.0.0.1:9901");
        let cfg = config::load_str(&text, "demo")
            .map_err(|e| e.to_string())
            .unwrap();
        let addr = |name| cfg.upstream(name).map(|u| u.endpoints[0].address.clone());
        assert_eq!(addr("demo").as_deref(), Some("127.0.0.1:1001"));
        assert_eq!(addr("demo-backup").as_deref(), Some("127.0.0.1:1002"));
        assert_eq!(cfg.routes.len(), 1);
        assert_eq!(cfg.routes[0].upstream, "demo");
        assert_eq!(cfg.routes[0].fallbacks, ["demo-backup"]);
    }
}
