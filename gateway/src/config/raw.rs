//! The configuration file as written: serde structs with `deny_unknown_fields`, scalars kept as text.
//! Nothing here is trusted; `validate` turns it into the domain types of `config::model`.

use serde::Deserialize;

use super::values::Text;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listen: Vec<RawListen>,
    pub admin: Option<RawAdmin>,
    pub redis: Option<RawRedis>,
    pub cache: Option<RawCacheGlobal>,
    pub server: Option<RawServer>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Known API consumers; keys only as SHA-256 digests or read from the environment.
    #[serde(default)]
    pub consumers: Vec<RawConsumer>,
    /// Named spend budgets; routes refer to them by name.
    #[serde(default)]
    pub budgets: std::collections::BTreeMap<String, RawBudgetDef>,
    pub log: Option<RawLog>,
    pub debug: Option<RawDebug>,
    pub tracing: Option<RawTracing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp: String,
    pub service_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub query: Option<bool>,
    pub access: Option<RawAccessLog>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub format: Option<String>,
    pub to: Option<String>,
    pub buffer: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDebug {
    pub token_env: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudgetDef {
    pub limit: Text,
    pub per: Text,
    pub fail: Option<String>,
    /// How long a reservation outlives an instance that died holding it (default 5m).
    pub lease_ttl: Option<Text>,
    /// How long hourly (default 48h) and daily (default 35d) history buckets are kept.
    pub history: Option<RawBudgetHistory>,
    /// `_system`'s own limit in this budget (Weir's refreshes, revalidations and warm-ups).
    pub system_limit: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudgetHistory {
    pub hourly: Option<Text>,
    pub daily: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    pub id: String,
    #[serde(default)]
    pub keys_sha256: Vec<String>,
    pub key_env: Option<String>,
    /// Per-policy overrides of a route's limits, by policy name.
    #[serde(default)]
    pub limits: std::collections::BTreeMap<String, RawLimitOverride>,
    /// The consumer's own limit for budgets of a name (`{llm-daily: "20.00"}`).
    #[serde(default)]
    pub budgets: std::collections::BTreeMap<String, Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimitOverride {
    pub rate: Text,
    pub burst: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumerRef {
    pub from: String,
    pub required: Option<bool>,
    pub hide_credentials: Option<bool>,
}

/// A file named by `include:` holds routes (and may include more).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteFile {
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub addr: String,
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certs: Vec<RawCert>,
    pub client_ca: Option<String>,
    /// Revocation lists (PEM `X509 CRL` blocks, or one DER list) for `client_ca`.
    pub client_crl: Option<String>,
    /// `required` (default with `client_ca`) | `optional`.
    pub client_auth: Option<String>,
    pub min_version: Option<String>,
    pub handshake_timeout: Option<Text>,
    /// `Strict-Transport-Security: max-age` on this listener's responses (e.g. `365d`).
    pub hsts: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub addr: String,
    pub token_env: Option<String>,
    /// A file holding the token (a container secret); instead of `token_env`.
    pub token_file: Option<String>,
    /// Names the admin API answers to in `Host` besides IP addresses and `localhost`.
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    pub key_secret_env: Option<String>,
    /// Instances sharing this Redis: a local rate-limit fallback admits `rate / instances`.
    pub instances: Option<Text>,
    pub cluster: Option<Vec<String>>,
    pub password_env: Option<String>,
    pub op_timeout: Option<Text>,
    pub max_object_bytes: Option<Text>,
    pub tls: Option<RawRedisTls>,
    pub breaker: Option<RawBreaker>,
    /// `/readyz` fails while Redis is unreachable.
    pub required: Option<bool>,
    /// One fill per key across every instance (a lock in Redis); default on.
    pub fill_lock: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisTls {
    /// PEM file of the CA that signed the Redis server certificate (private CAs).
    pub ca: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub failures: Option<u32>,
    pub window: Option<Text>,
    pub open_for: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthFailures {
    pub rate: Text,
    pub burst: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheGlobal {
    pub l1_max_bytes: Option<Text>,
    pub max_object_bytes: Option<Text>,
    pub max_fill_bytes: Option<Text>,
    pub targeted_fields: Option<Vec<String>>,
    pub client_no_cache: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub max_header_bytes: Option<Text>,
    pub header_read_timeout: Option<Text>,
    pub shutdown_timeout: Option<Text>,
    pub drain_delay: Option<Text>,
    pub upgrade_socket: Option<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub max_connections: Option<Text>,
    pub rate_limit_keys: Option<Text>,
    /// Failed credentials (401s) per client address: `{ rate: 60/m, burst: 100 }`.
    pub auth_failures: Option<RawAuthFailures>,
    pub upgrade_protocols: Option<Vec<String>>,
    pub max_tunnel_bytes: Option<Text>,
    pub max_tunnels: Option<Text>,
    pub max_tunnels_per_address: Option<Text>,
    pub http2: Option<RawHttp2>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp2 {
    pub max_concurrent_streams: Option<Text>,
    pub keep_alive_interval: Option<Text>,
    pub keep_alive_timeout: Option<Text>,
    pub max_pending_accept_reset_streams: Option<Text>,
    pub max_local_error_reset_streams: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    /// Absent: the route matches every host, path and method.
    #[serde(rename = "match", default)]
    pub match_: RawMatch,
    pub upstream: OneOrMany,
    pub timeouts: Option<RawTimeouts>,
    pub max_request_body: Option<Text>,
    pub max_upstream_connections: Option<Text>,
    /// Request headers a cached route forwards from untrusted peers besides the default set
    /// (`NAME`, or `PREFIX*`).
    #[serde(default)]
    pub forward_headers: Vec<String>,
    pub upstream_tls: Option<RawUpstreamTls>,
    /// Offer HTTP/2 (ALPN `h2`) to `https://` upstreams.
    pub upstream_http2: Option<bool>,
    /// `client` (the Host the client sent, default) | `upstream` (the upstream's own name).
    pub upstream_host: Option<String>,
    pub plugin: Option<RawPlugin>,
    pub cache: Option<RawRouteCache>,
    pub invalidate: Option<RawInvalidate>,
    pub consumer: Option<RawConsumerRef>,
    pub rate_limit: Option<RawRateLimits>,
    pub budget: Option<RawBudget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub server_name: Option<String>,
    pub verify: Option<bool>,
}

/// One policy (a map, named `default`) or several (a list).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawRateLimits {
    One(RawRateLimit),
    Many(Vec<RawRateLimit>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub host: Option<String>,
    pub path: Option<String>,
    pub methods: Option<Vec<String>>,
    /// `https`: the route answers only on TLS listeners.
    pub scheme: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<Text>,
    pub response: Option<Text>,
    pub idle: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    pub path: String,
    pub config: Option<serde_norway::Value>,
    pub timeout: Option<Text>,
    pub max_memory: Option<Text>,
    pub max_body_bytes: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    pub ttl: Option<Text>,
    pub origin_headers: Option<String>,
    pub stale_while_revalidate: Option<Text>,
    pub stale_if_error: Option<Text>,
    pub share_private: Option<bool>,
    pub shared_across_consumers: Option<bool>,
    pub client_no_cache: Option<String>,
    pub methods: Option<Vec<String>>,
    pub max_key_body_bytes: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInvalidate {
    pub methods: Option<Vec<String>>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub name: Option<String>,
    pub key: Option<String>,
    pub rate: Text,
    pub burst: Option<Text>,
    pub algorithm: Option<String>,
    pub count: Option<String>,
    pub fail: Option<String>,
    pub headers: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub name: String,
    /// A fixed decimal string, or `plugin`.
    pub cost: Text,
    pub reserve: Option<Text>,
    pub max_cost: Option<Text>,
    /// `2xx` (default), or a list of classes / codes: `[2xx, 4xx]`, `[200, 201]`.
    pub charge_status: Option<OneOrMany>,
    pub charge_hits: Option<bool>,
    /// `Weir-Budget-Remaining` on budgeted responses.
    pub headers: Option<bool>,
}
