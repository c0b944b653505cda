//! The resolved configuration: defaults applied, names checked, units converted.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole gateway configuration, as the engine consumes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Process-wide settings from `[server]`.
    pub server: Server,
    /// The admin endpoint, if `[admin]` is present.
    pub admin: Option<Admin>,
    /// The Redis that cluster-scoped limits share, if `[redis]` is present.
    pub redis: Option<Redis>,
    /// Logging settings from `[log]`.
    pub log: Log,
    /// Sockets the gateway accepts on.
    pub listeners: Vec<Listener>,
    /// Backend pools that routes forward to.
    pub upstreams: Vec<Upstream>,
    /// Known API consumers and their keys.
    pub consumers: Vec<Consumer>,
    /// Named filter instances that routes refer to.
    pub filters: Vec<FilterConf>,
    /// Routes, in file order: the first match wins.
    pub routes: Vec<Route>,
    /// `[[prices]]`: the price of each model, first match in the order written.
    pub prices: ringway_filters::price::PriceTable,
    /// Problems that do not stop the gateway (a certificate about to expire,
    /// `insecure_skip_verify`); printed by `ringway check`, logged at start and reload.
    pub warnings: Vec<super::ConfigError>,
}

impl Config {
    /// The upstream with this name.
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The listener with this name.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The filter with this name.
    pub fn filter(&self, name: &str) -> Option<&FilterConf> {
        self.filters.iter().find(|f| f.name == name)
    }

    /// The consumer that owns this API key.
    pub fn consumer_by_key(&self, key: &str) -> Option<&Consumer> {
        self.consumers
            .iter()
            .find(|c| c.keys.iter().any(|k| k == key))
    }
}

/// `[server]`: workers, buffers, protocol limits and timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Worker threads; "auto" is resolved to one per core minus the control core.
    pub workers: usize,
    /// Pin worker i to core i and the control thread to its own core.
    pub pin_cores: bool,
    /// Which I/O driver to use.
    pub driver: Driver,
    /// Receive into an io_uring provided-buffer ring where the kernel has one (5.19+), so
    /// a waiting receive holds no buffer and needs no readiness wait; false keeps the
    /// readiness wait everywhere. Read when a worker starts.
    pub buffer_ring: bool,
    /// Bytes in one pool buffer.
    pub buffer_size: usize,
    /// Pool bound per worker: memory cap = workers * buffers_per_worker * buffer_size.
    pub buffers_per_worker: usize,
    /// Content-Length bodies at least this large are spliced when no filter reads them.
    pub splice_min: usize,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// Most header fields accepted in one request head.
    pub max_headers: usize,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// Time allowed to receive a whole request head.
    pub header_timeout: Duration,
    /// How long an idle client connection is kept open.
    pub keepalive_timeout: Duration,
    /// Client inactivity allowed while reading a request body.
    pub body_timeout: Duration,
    /// How long a shutdown or reload waits for requests in flight.
    pub drain_timeout: Duration,
    /// Pool buffers no request needed for this long go back to the allocator, and the
    /// allocator returns its free pages to the kernel.
    pub memory_release_after: Duration,
}

/// The "auto" worker count: every core but the one the control thread takes.
pub fn auto_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(1).max(1)
}

impl Default for Server {
    fn default() -> Self {
        Server {
            workers: auto_workers(),
            pin_cores: true,
            driver: Driver::Auto,
            buffer_ring: true,
            buffer_size: 16 * 1024,
            buffers_per_worker: 4096,
            splice_min: 64 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 1 << 30,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            memory_release_after: Duration::from_secs(10),
        }
    }
}

/// The I/O driver: io_uring where the kernel allows it, else epoll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// io_uring if available, else epoll.
    Auto,
    /// io_uring only; fail to start without it.
    IoUring,
    /// epoll only.
    Epoll,
}

/// `[admin]`: health, metrics and stats endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Address the admin endpoint listens on.
    pub listen: SocketAddr,
}

/// `[redis]`: the shared store for cluster-scoped limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redis {
    /// A single Redis, e.g. "redis://127.0.0.1:6379/0"; exclusive with `cluster_nodes`.
    pub url: Option<String>,
    /// Redis Cluster seed nodes; exclusive with `url`.
    pub cluster_nodes: Vec<String>,
    /// How often leases and usage are batched to Redis.
    pub flush_interval: Duration,
    /// Time allowed for one Redis round trip.
    pub timeout: Duration,
    /// TLS settings for `rediss://` addresses (`[redis] tls`); absent: public roots only.
    pub tls: Option<RedisTls>,
}

/// `[redis] tls`: how a `rediss://` Redis is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// A private CA bundle (PEM) trusted instead of the public roots; resolved against the
    /// config file's directory and checked when the config loads.
    pub ca: Option<PathBuf>,
}

/// `[log]`: access log and log level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Where access-log records go.
    pub access: AccessLog,
    /// One of "error", "warn", "info", "debug".
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            access: AccessLog::Off,
            level: "info".to_string(),
        }
    }
}

/// Access-log destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    /// Standard output.
    Stdout,
    /// No access log.
    Off,
    /// Appended to this file.
    Path(PathBuf),
}

/// `[[listeners]]`: one accepting socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Unique name, referred to by `routes.listener`.
    pub name: String,
    /// Address to bind.
    pub address: SocketAddr,
    /// TLS termination (`[listeners.tls]`); plain HTTP when absent.
    pub tls: Option<ListenerTls>,
}

/// `[listeners.tls]`: certificates and client authentication of a TLS listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    /// Certificates chosen by SNI (exact name, then `*.` wildcard); the first is the default.
    pub certs: Vec<CertPair>,
    /// Oldest protocol version accepted.
    pub min_version: TlsVersion,
    /// Client certificates (mTLS); off when absent.
    pub client_auth: Option<ClientAuth>,
}

/// A certificate chain file and its key file, already loaded and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CertPair {
    /// The PEM certificate chain, leaf first (resolved path).
    pub cert: PathBuf,
    /// The PEM private key (resolved path).
    pub key: PathBuf,
    /// What the two files hold; the key matches the leaf.
    pub loaded: crate::tls::certs::LoadedCert,
}

/// A TLS protocol version, as written in `min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// "1.2": TLS 1.2 and 1.3.
    V1_2,
    /// "1.3": TLS 1.3 only.
    V1_3,
}

/// `client_auth`: which client certificates a listener asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAuth {
    /// The CA bundle client certificates must chain to (resolved path).
    pub ca: PathBuf,
    /// The CA certificates, loaded.
    pub roots: crate::tls::certs::CaCerts,
    /// Whether a client without a certificate is let in.
    pub mode: ClientAuthMode,
}

/// `client_auth.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    /// A certificate is verified if sent; clients without one are accepted.
    Optional,
    /// Clients without a valid certificate fail the handshake.
    Required,
}

/// `[[upstreams]]`: a pool of backend endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// Unique name, referred to by routes.
    pub name: String,
    /// Backend endpoints; never empty.
    pub endpoints: Vec<Endpoint>,
    /// How an endpoint is picked.
    pub balance: Balance,
    /// What `Balance::Hash` hashes: "header:NAME", "ip", "cookie:NAME" or "consumer".
    pub hash_key: Option<String>,
    /// Connections per worker to this upstream; `None`: sized from the open-files limit.
    pub max_connections: Option<usize>,
    /// Idle keep-alive connections kept per worker.
    pub max_idle: usize,
    /// How long an idle upstream connection is kept.
    pub idle_timeout: Duration,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for the response head to arrive.
    pub response_timeout: Duration,
    /// Retries on another endpoint when a request could not have reached the upstream.
    pub retries: u32,
    /// Active health checks, if configured.
    pub health: Option<Health>,
    /// How often host names in endpoints are resolved again.
    pub resolve_interval: Duration,
    /// TLS to the endpoints (`tls = true` or a table); plain TCP when absent.
    pub tls: Option<UpstreamTls>,
    /// What the forwarded `Host` header carries.
    pub host_header: HostHeader,
    /// The provider's keys and how they are sent (`credentials`); the client's own
    /// credentials are passed on when absent.
    pub credentials: Option<Credentials>,
    /// Model glob → model name sent to this upstream, applied after the route's `model_map`.
    pub model_map: Vec<(String, String)>,
}

/// `credentials`: the keys Ringway sends to a provider in place of the client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Which header carries a key.
    pub kind: CredentialKind,
    /// The key pool; never empty.
    pub keys: Vec<ProviderKey>,
}

/// `credentials.kind`: how a provider wants its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// `authorization: Bearer KEY` (OpenAI and most OpenAI-compatible providers).
    Bearer,
    /// `x-api-key: KEY`, plus `anthropic-version: 2023-06-01` unless the client sent one.
    Anthropic,
    /// `api-key: KEY` (Azure OpenAI).
    Azure,
    /// `NAME: KEY` with this header name (lowercased), e.g. `x-goog-api-key`.
    Header(String),
}

impl CredentialKind {
    /// The header name that carries the key.
    pub fn header_name(&self) -> &str {
        match self {
            CredentialKind::Bearer => "authorization",
            CredentialKind::Anthropic => "x-api-key",
            CredentialKind::Azure => "api-key",
            CredentialKind::Header(n) => n,
        }
    }
}

/// One key of a pool: where it was read from, its share of requests, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderKey {
    /// The variable or file it was read from (safe to print).
    pub source: super::secret::SecretSource,
    /// Relative share of requests; at least 1.
    pub weight: u32,
    /// The key itself; its `Debug` prints nothing of it.
    pub secret: super::secret::Secret,
}

/// `[[upstreams]] tls`: how Ringway connects to and verifies a TLS upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// Server name sent and verified; the endpoint's host name when absent (no SNI for an IP).
    pub sni: Option<String>,
    /// Which public roots are trusted.
    pub roots: Roots,
    /// A private CA bundle trusted in addition to `roots`: resolved path and certificates.
    pub ca: Option<(PathBuf, crate::tls::certs::CaCerts)>,
    /// A client certificate for upstreams that require mTLS.
    pub client_cert: Option<CertPair>,
    /// Accept any server certificate (testing only; warned at every start and reload).
    pub insecure_skip_verify: bool,
}

/// `tls.roots`: the public trust anchors of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// Mozilla's roots compiled into the binary (`webpki-roots`).
    Webpki,
    /// The system bundle, /etc/ssl/certs/ca-certificates.crt.
    System,
}

/// `host_header`: the `Host` sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostHeader {
    /// The client's `Host`, unchanged.
    Client,
    /// The endpoint's host name, with ":port" unless the port is the scheme's default.
    Endpoint,
    /// This exact value.
    Literal(String),
}

impl Upstream {
    /// The `Host` value to send to `endpoint` (an address as written in `endpoints`), or
    /// `None` to pass the client's on.
    pub fn host_header_for<'a>(&'a self, endpoint: &'a str) -> Option<&'a str> {
        match &self.host_header {
            HostHeader::Client => None,
            HostHeader::Literal(v) => Some(v),
            HostHeader::Endpoint => {
                let default = if self.tls.is_some() { ":443" } else { ":80" };
                Some(endpoint.strip_suffix(default).unwrap_or(endpoint))
            }
        }
    }
}

/// One backend address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// "ip:port" or "host:port"; the port is always present.
    pub address: String,
    /// Relative share of traffic; at least 1.
    pub weight: u32,
}

/// Endpoint selection strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted round robin.
    RoundRobin,
    /// The endpoint with fewest requests in flight.
    LeastRequests,
    /// Consistent hash of `hash_key`.
    Hash,
}

/// Active health checking of an upstream's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Path probed with GET.
    pub path: String,
    /// Time between probes.
    pub interval: Duration,
    /// Time allowed for one probe.
    pub timeout: Duration,
    /// Consecutive successes that mark an endpoint healthy.
    pub healthy_after: u32,
    /// Consecutive failures that mark an endpoint unhealthy.
    pub unhealthy_after: u32,
}

/// `[[consumers]]`: an API client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// Unique name, used as the limit key for `key = "consumer"`.
    pub name: String,
    /// API keys that identify this consumer; unique across consumers.
    pub keys: Vec<String>,
}

/// `[[filters]]`: a named filter instance.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConf {
    /// Unique name, referred to by `routes.filters`.
    pub name: String,
    /// What the filter does, with its settings.
    pub kind: FilterKind,
}

/// The filter kinds and their settings.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterKind {
    /// `kind = "key-auth"`.
    KeyAuth(KeyAuthConf),
    /// `kind = "rate-limit"`: counts requests.
    RateLimit(LimitConf),
    /// `kind = "token-limit"`: counts AI tokens.
    TokenLimit(LimitConf),
    /// `kind = "cost-limit"`: counts money (micro-dollars) spent on AI tokens.
    CostLimit(LimitConf),
    /// `kind = "ai-stats"`.
    AiStats(AiStatsConf),
}

/// Settings of a key-auth filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAuthConf {
    /// Also read the key from this query parameter.
    pub query_param: Option<String>,
}

/// Settings of a rate-limit or token-limit filter.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitConf {
    /// Process-local or shared through Redis.
    pub scope: Scope,
    /// What requests are counted by.
    pub key: KeySource,
    /// Rules in file order; the first matching rule wins.
    pub rules: Vec<LimitRule>,
    /// What a cluster limit does while Redis is unreachable.
    pub failure_mode: FailureMode,
    /// Replica count, used to share a limit when failing over to local.
    pub replicas: u32,
    /// Count and report, but never reject.
    pub shadow: bool,
    /// Bound on the key table; least recently used keys are evicted.
    pub max_keys: usize,
    /// Most tokens reserved for one request (token-limit only).
    pub max_reserve: Option<u64>,
    /// A request for a model without a price (cost-limit only).
    pub unpriced: Unpriced,
    /// Output tokens reserved when the request names no maximum (cost-limit only).
    pub max_output_reserve: u64,
}

/// What a `cost-limit` does with a request for a model no `[[prices]]` entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unpriced {
    /// 400 `model_not_priced`, before any budget is consulted.
    #[default]
    Reject,
    /// Counted at 0 and logged.
    Allow,
}

/// Where a limit's counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One process, all cores.
    Local,
    /// All replicas, through Redis.
    Cluster,
}

/// What a limit counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The authenticated consumer's name.
    Consumer,
    /// The client IP address.
    Ip,
    /// A request header; the name is lowercased.
    Header(String),
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
    /// The route's name.
    Route,
    /// One counter for everything.
    Global,
    /// The subject of the client certificate verified on a TLS listener
    /// with `client_auth` (requests without one are not limited by it).
    ClientCert,
}

/// One limit rule: which key values it applies to, and its windows.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitRule {
    /// Which key values this rule applies to.
    pub matcher: RuleMatch,
    /// Limits per window; at least one, shortest period first.
    pub windows: Vec<Window>,
}

/// How a rule matches a key value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleMatch {
    /// Exactly this value.
    Exact(String),
    /// Values starting with this (written "abc*").
    Prefix(String),
    /// Every value, each with its own counter (written "*").
    Any,
    /// A regular expression (written "regex:…"), stored unchecked.
    Regex(String),
    /// An IP network; only with `key = "ip"`.
    Cidr {
        /// Network address.
        addr: IpAddr,
        /// Prefix length in bits.
        prefix: u8,
    },
}

/// A limit over one clock-aligned window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// 1s, 60s, 3600s or 86400s; a calendar month is `Duration::from_millis(window::MONTH)`
    /// (see [`ringway_filters::limit::window::MONTH`]).
    pub period: Duration,
    /// Requests or tokens allowed per period.
    pub limit: u64,
}

/// Behaviour of a cluster limit while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Admit everything.
    Open,
    /// Reject everything.
    Closed,
    /// Each replica enforces its share of the limit.
    Local,
}

/// Settings of an ai-stats filter (none yet).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AiStatsConf {}

/// `[[routes]]`: which requests go where, through which filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Unique name, used in metrics and as the limit key for `key = "route"`.
    pub name: String,
    /// Only requests on this listener; all listeners when absent.
    pub listener: Option<String>,
    /// What the request must look like (TOML key `match`).
    pub matcher: RouteMatch,
    /// Default upstream.
    pub upstream: String,
    /// Filters run in this order.
    pub filters: Vec<String>,
    /// Strip the matched `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Model glob → upstream name, by the body's "model", in file order.
    pub models: Vec<(String, String)>,
    /// Model glob → model name written into the forwarded body.
    pub model_map: Vec<(String, String)>,
    /// Ask the upstream for usage in streamed responses.
    pub include_usage: bool,
    /// During upstream silence on an event stream, write `: keep-alive` this often.
    pub sse_keepalive: Option<std::time::Duration>,
    /// Add `server-timing: ringway;dur=<ms>` to responses (`server_timing`).
    pub server_timing: bool,
    /// Header rules applied to the request sent upstream (`request_headers`).
    pub request_headers: HeaderRules,
    /// Header rules applied to the response sent to the client (`response_headers`).
    pub response_headers: HeaderRules,
    /// Upstreams tried in order after the route's own (`fallbacks`).
    pub fallbacks: Vec<String>,
    /// Failures that move a request on to another key, endpoint or upstream (`fallback_on`).
    pub fallback_on: FallbackOn,
    /// Requests sent upstream in all, across keys, endpoints and fallbacks (`max_attempts`).
    pub max_attempts: u32,
}

/// `fallback_on`: which failures of an attempt make Ringway try again elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackOn {
    /// Response statuses retried elsewhere.
    pub statuses: Vec<u16>,
    /// No connection could be made (or the upstream has no healthy endpoint).
    pub connect: bool,
    /// No response head within `response_timeout`.
    pub timeout: bool,
}

impl Default for FallbackOn {
    fn default() -> Self {
        Self {
            statuses: vec![429, 500, 502, 503, 504, 529],
            connect: true,
            timeout: true,
        }
    }
}

impl FallbackOn {
    /// Whether a response with `status` is retried elsewhere.
    pub fn status(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }
}

/// `request_headers` / `response_headers`: headers replaced or dropped on the way through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderRules {
    /// Lowercased name → the one value every header of that name is replaced with.
    pub set: Vec<(String, String)>,
    /// Lowercased names dropped.
    pub remove: Vec<String>,
}

impl HeaderRules {
    /// No rule at all.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// Conditions a request must meet for a route; absent ones match everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatch {
    /// Host, lowercased, without port.
    pub host: Option<String>,
    /// Path starts with this.
    pub path_prefix: Option<String>,
    /// Path is exactly this.
    pub path: Option<String>,
    /// One of these methods, uppercased; any when empty.
    pub methods: Vec<String>,
    /// Header (lowercased name) must have exactly this value.
    pub headers: Vec<(String, String)>,
}
