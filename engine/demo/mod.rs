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

/// The demo configuration for an upstream at `upstream`, a gateway on
/// `listen` and the admin endpoint on `admin`.
pub fn config_text(listen: &str, upstream: std::net::SocketAddr, admin: &str) -> String {
    format!(
        r#"# ringway demo: the gateway in front of its built-in OpenAI-compatible upstream.
[server]
workers = 1
pin_cores = false
buffers_per_worker = 1024

[admin]
listen = "{admin}"

[[listeners]]
name = "public"
address = "{listen}"

[[upstreams]]
name = "demo"
endpoints = ["{upstream}"]

[[routes]]
name = "openai"
match = {{ path_prefix = "/v1/" }}
upstream = "demo"
"#
    )
}

/// Starts the demo upstream and returns the configuration to run, printing
/// what to try.
pub fn prepare(listen: &str) -> Result<(config::Config, upstream::DemoUpstream), String> {
    let up = upstream::DemoUpstream::start().map_err(|e| format!("demo upstream: {e}"))?;
    let admin = admin_addr();
    let text = config_text(listen, up.addr, &admin);
    let cfg = config::load_str(&text, "demo").map_err(|e| e.to_string())?;
    let base = format!("http://{listen}");
    println!(
        r#"Ringway demo: gateway on {base}, built-in OpenAI-compatible upstream on {up_addr}.

Try:
  curl -s {base}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo-1","messages":[{{"role":"user","content":"Hello, Ringway"}}]}}'
  curl -sN {base}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model":"demo-1","stream":true,"messages":[{{"role":"user","content":"Stream to me"}}]}}'
  curl -s {base}/v1/messages -H 'content-type: application/json' \
    -d '{{"model":"claude-demo","max_tokens":64,"messages":[{{"role":"user","content":"Hi"}}]}}'
  curl -s http://{admin}/metrics | grep ringway_requests_total
  curl -s http://{admin}/stats

Ctrl-C drains and stops.
"#,
        up_addr = up.addr,
        admin = admin
    );
    Ok((cfg, up))
}
