//! The file as serde reads it: every key optional where the contract has a default, and
//! `Spanned` kept on values that later checks must point at.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::types::{Balance, Driver, FailureMode, Scope};
use super::units::{Dur, Size, Workers};

/// Short alias: nearly every value carries its span.
pub(crate) type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    pub redis: Option<RawRedis>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub consumers: Vec<RawConsumer>,
    #[serde(default)]
    pub filters: Vec<RawFilter>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub prices: Vec<RawPrice>,
}

/// One `[[prices]]` entry: US dollars per million tokens.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrice {
    pub model: S<String>,
    pub input: S<f64>,
    pub output: S<f64>,
    pub cached_input: Option<S<f64>>,
    pub cache_write: Option<S<f64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub workers: Option<S<Workers>>,
    pub pin_cores: Option<bool>,
    pub driver: Option<Driver>,
    pub buffer_ring: Option<bool>,
    pub buffer_size: Option<S<Size>>,
    pub buffers_per_worker: Option<S<u64>>,
    pub splice_min: Option<S<Size>>,
    pub max_header_bytes: Option<S<Size>>,
    pub max_headers: Option<S<u64>>,
    pub max_body_bytes: Option<S<Size>>,
    pub header_timeout: Option<S<Dur>>,
    pub keepalive_timeout: Option<S<Dur>>,
    pub body_timeout: Option<S<Dur>>,
    pub drain_timeout: Option<S<Dur>>,
    pub memory_release_after: Option<S<Dur>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub listen: S<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    pub url: Option<S<String>>,
    pub cluster_nodes: Option<S<Vec<S<String>>>>,
    pub flush_interval: Option<S<Dur>>,
    pub timeout: Option<S<Dur>>,
    pub tls: Option<S<RawRedisTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedisTls {
    pub ca: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub access: Option<S<String>>,
    pub level: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: S<String>,
    pub address: S<SocketAddr>,
    pub tls: Option<S<RawListenerTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub certs: S<Vec<S<RawCertPair>>>,
    pub min_version: Option<S<String>>,
    pub client_auth: Option<S<RawClientAuth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertPair {
    pub cert: S<String>,
    pub key: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClientAuth {
    pub ca: S<String>,
    pub mode: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub name: S<String>,
    pub endpoints: S<Vec<S<RawEndpoint>>>,
    pub balance: Option<S<Balance>>,
    pub hash_key: Option<S<String>>,
    pub max_connections: Option<S<u64>>,
    pub max_idle: Option<S<u64>>,
    pub idle_timeout: Option<S<Dur>>,
    pub connect_timeout: Option<S<Dur>>,
    pub response_timeout: Option<S<Dur>>,
    pub retries: Option<u32>,
    pub health: Option<RawHealth>,
    pub resolve_interval: Option<S<Dur>>,
    pub tls: Option<S<RawUpstreamTls>>,
    pub host_header: Option<S<String>>,
    pub credentials: Option<S<RawCredentials>>,
    #[serde(default)]
    pub model_map: OrderedMap<S<String>>,
}

/// `credentials = { kind = …, name = …, keys = [ … ] }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCredentials {
    pub kind: S<String>,
    pub name: Option<S<String>>,
    pub keys: S<Vec<S<RawKey>>>,
}

/// One key: `{ env = "VAR" }` or `{ file = "/path" }`, with an optional `weight`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKey {
    pub env: Option<S<String>>,
    pub file: Option<S<String>>,
    pub weight: Option<S<u32>>,
}

/// `request_headers` / `response_headers = { set = { … }, remove = [ … ] }`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeaderRules {
    #[serde(default)]
    pub set: OrderedMap<S<String>>,
    #[serde(default)]
    pub remove: Vec<S<String>>,
}

/// `tls = true | false` or `tls = { sni = …, roots = …, … }`.
#[derive(Default)]
pub(crate) struct RawUpstreamTls {
    pub enabled: bool,
    pub table: Option<RawUpstreamTlsTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTlsTable {
    pub sni: Option<S<String>>,
    pub roots: Option<S<String>>,
    pub ca: Option<S<String>>,
    pub client_cert: Option<S<String>>,
    pub client_key: Option<S<String>>,
    pub insecure_skip_verify: Option<S<bool>>,
}

impl<'de> Deserialize<'de> for RawUpstreamTls {
    // Hand-written for the same reason as `RawEndpoint`: untagged enums lose spans.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawUpstreamTls;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or a table { sni, roots, ca, client_cert, client_key, insecure_skip_verify }")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawUpstreamTls, E> {
                Ok(RawUpstreamTls {
                    enabled: v,
                    table: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawUpstreamTls, A::Error> {
                let t =
                    RawUpstreamTlsTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawUpstreamTls {
                    enabled: true,
                    table: Some(t),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// An endpoint is written either as "host:port" or as `{ address = "host:port", weight = 3 }`.
pub(crate) struct RawEndpoint {
    pub address: String,
    pub weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpointTable {
    address: String,
    weight: Option<u32>,
}

impl<'de> Deserialize<'de> for RawEndpoint {
    // Hand-written instead of `#[serde(untagged)]`: untagged buffers the value and loses both the
    // span and the precise error for a bad key inside the table form.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"host:port\" or { address = \"host:port\", weight = N }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint {
                    address: v.to_string(),
                    weight: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawEndpoint, A::Error> {
                let t = RawEndpointTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawEndpoint {
                    address: t.address,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub path: S<String>,
    pub interval: S<Dur>,
    pub timeout: Option<S<Dur>>,
    pub healthy_after: Option<S<u32>>,
    pub unhealthy_after: Option<S<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConsumer {
    pub name: S<String>,
    pub keys: S<Vec<S<String>>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RawKind {
    KeyAuth,
    RateLimit,
    TokenLimit,
    CostLimit,
    AiStats,
}

impl RawKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RawKind::KeyAuth => "key-auth",
            RawKind::RateLimit => "rate-limit",
            RawKind::TokenLimit => "token-limit",
            RawKind::CostLimit => "cost-limit",
            RawKind::AiStats => "ai-stats",
        }
    }
}

// One flat table for every kind, rather than an internally tagged enum, because serde's tagged
// enums buffer their content and lose spans; keys that do not fit the kind are rejected later.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFilter {
    pub name: S<String>,
    pub kind: S<RawKind>,
    pub query_param: Option<S<String>>,
    pub scope: Option<S<Scope>>,
    pub key: Option<S<String>>,
    pub rules: Option<S<Vec<S<RawRule>>>>,
    pub failure_mode: Option<S<FailureMode>>,
    pub replicas: Option<S<u32>>,
    pub shadow: Option<S<bool>>,
    pub max_keys: Option<S<u64>>,
    pub max_reserve: Option<S<u64>>,
    pub unpriced: Option<S<String>>,
    pub max_output_reserve: Option<S<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    #[serde(rename = "match")]
    pub matcher: S<String>,
    pub requests_per_second: Option<S<u64>>,
    pub requests_per_minute: Option<S<u64>>,
    pub requests_per_hour: Option<S<u64>>,
    pub requests_per_day: Option<S<u64>>,
    pub tokens_per_second: Option<S<u64>>,
    pub tokens_per_minute: Option<S<u64>>,
    pub tokens_per_hour: Option<S<u64>>,
    pub tokens_per_day: Option<S<u64>>,
    pub usd_per_minute: Option<S<f64>>,
    pub usd_per_hour: Option<S<f64>>,
    pub usd_per_day: Option<S<f64>>,
    pub usd_per_month: Option<S<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: S<String>,
    pub listener: Option<S<String>>,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub upstream: S<String>,
    #[serde(default)]
    pub filters: Vec<S<String>>,
    pub strip_prefix: Option<S<bool>>,
    #[serde(default)]
    pub models: OrderedMap<S<String>>,
    #[serde(default)]
    pub model_map: OrderedMap<S<String>>,
    pub include_usage: Option<bool>,
    pub sse_keepalive: Option<S<Dur>>,
    pub server_timing: Option<bool>,
    pub request_headers: Option<S<RawHeaderRules>>,
    pub response_headers: Option<S<RawHeaderRules>>,
    #[serde(default)]
    pub fallbacks: Vec<S<String>>,
    pub fallback_on: Option<S<Vec<S<RawFallbackOn>>>>,
    pub max_attempts: Option<S<i64>>,
}

/// One entry of `fallback_on`: a status code or a word (`"connect"`, `"timeout"`).
pub(crate) enum RawFallbackOn {
    Status(i64),
    Word(String),
}

impl<'de> Deserialize<'de> for RawFallbackOn {
    // Hand-written: untagged enums lose spans and give a vague error.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawFallbackOn;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status code (429) or \"connect\" or \"timeout\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawFallbackOn, E> {
                Ok(RawFallbackOn::Status(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawFallbackOn, E> {
                Ok(RawFallbackOn::Status(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawFallbackOn, E> {
                Ok(RawFallbackOn::Word(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub path: Option<S<String>>,
    #[serde(default)]
    pub methods: Vec<S<String>>,
    #[serde(default)]
    pub headers: OrderedMap<S<String>>,
}

/// A TOML table read as a list, because `models` globs are tried in the order they are written.
pub(crate) struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}
