//! `ringway demo`: the gateway in front of a built-in OpenAI- and
//! Anthropic-compatible upstream on loopback, for a first look with no API
//! key and no network.

pub mod upstream;

use crate::config;

/// The demo configuration for an upstream at `upstream` and a gateway on `listen`.
pub fn config_text(listen: &str, upstream: std::net::SocketAddr) -> String {
    format!(
        r#"# ringway demo: the gateway in front of its built-in OpenAI-compatible upstream.
[server]
workers = 1
pin_cores = false
buffers_per_worker = 1024

[admin]
listen = "127.0.0.1:9901"

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
    let text = config_text(listen, up.addr);
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
  curl -s http://127.0.0.1:9901/metrics | grep ringway_requests_total
  curl -s http://127.0.0.1:9901/stats

Ctrl-C drains and stops.
"#,
        up_addr = up.addr
    );
    Ok((cfg, up))
}
