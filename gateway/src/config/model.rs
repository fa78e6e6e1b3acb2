//! Validated configuration: the types the gateway runs on. Built only by `config::load`.

use std::net::SocketAddr;
use std::path::PathBuf;

// The domain types a configuration is made of live with their modules; `config` builds them.
pub use crate::budget::{BudgetDef, BudgetWindow, FailMode, RouteBudget};
pub use crate::cache::policy::{default_targeted_fields, OriginHeaders, RouteCache};
pub use crate::limit::{Algorithm, LimitFail, LimitKey, LimitOverride, RateLimit};
pub use crate::redis::{BreakerSettings, RedisSettings};
pub use crate::upstream::UpstreamUrl;
use std::time::Duration;

use http::header::HeaderName;
use http::Method;
use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct Config {
    /// The root file this configuration was loaded from (reloads read it again).
    pub source: PathBuf,
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    pub redis: Option<crate::redis::RedisSettings>,
    pub cache: CacheSettings,
    pub server: ServerSettings,
    pub routes: Vec<Route>,
    /// API-key digest (SHA-256) → consumer id.
    pub consumers: std::sync::Arc<std::collections::HashMap<[u8; 32], String>>,
    /// Consumer id → policy name → its own rate and burst (`consumers[].limits`).
    pub consumer_limits: std::sync::Arc<std::collections::HashMap<String, Vec<LimitOverride>>>,
    /// Consumer id -> budget name -> the consumer's own limit in units (`consumers[].budgets`).
    pub consumer_budgets: std::sync::Arc<std::collections::HashMap<String, std::collections::HashMap<String, i64>>>,
    /// Named budgets (`budgets:`), by name.
    pub budgets: std::sync::Arc<std::collections::BTreeMap<String, std::sync::Arc<BudgetDef>>>,
    /// What is accepted but deserves attention (a certificate about to expire), as
    /// `FILE:LINE:COL: message`; logged at start and reload, printed by `weir validate`.
    pub warnings: Vec<String>,
    /// `log:` (read at start; a reload reopens the access-log file).
    pub log: crate::observe::LogSettings,
    /// `debug.token_env`: the digest of the token that unlocks `Weir-Debug` on the data plane.
    pub debug_token: Option<std::sync::Arc<super::values::Token>>,
    /// `tracing.otlp`: export a span per request (read at start).
    pub tracing: Option<crate::observe::TraceSettings>,
}

impl Config {
    /// `consumer`'s limit for budget `def`: its own (`consumers[].budgets`), else the budget's.
    pub fn budget_limit(&self, def: &BudgetDef, consumer: &str) -> i64 {
        if consumer == crate::budget::SYSTEM {
            return def.system_limit_units.unwrap_or(def.limit_units);
        }
        self.consumer_budgets.get(consumer).and_then(|m| m.get(&def.name)).copied().unwrap_or(def.limit_units)
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    /// Certificates loaded and checked at validation.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// Where the admin bearer token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminToken {
    /// `admin.token_env`: an environment variable.
    Env(String),
    /// `admin.token_file`: a file (a container secret, say); one trailing line break is not
    /// part of the token.
    File(std::path::PathBuf),
}

impl AdminToken {
    /// The token now, or why there is none.
    pub fn read(&self) -> Result<String, String> {
        match self {
            AdminToken::Env(var) => match std::env::var(var) {
                Ok(t) if !t.is_empty() => Ok(t),
                _ => Err(format!("admin.token_env names `{var}`, but that environment variable is not set (or empty)")),
            },
            AdminToken::File(path) => match std::fs::read_to_string(path) {
                Ok(t) => {
                    let t = t.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&t);
                    if t.is_empty() {
                        Err(format!("admin.token_file `{}` is empty", path.display()))
                    } else {
                        Ok(t.to_string())
                    }
                }
                Err(e) => Err(format!("admin.token_file `{}` cannot be read: {e}", path.display())),
            },
        }
    }
}

impl std::fmt::Display for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminToken::Env(var) => write!(f, "`{var}`"),
            AdminToken::File(path) => write!(f, "`{}`", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    /// Where the bearer token is read from at start (`admin.token_env` or `admin.token_file`).
    pub token: Option<AdminToken>,
    /// `admin.hosts`: the names (lowercase, no port) a `Host` may carry besides IP addresses
    /// and `localhost` — any other name is refused (DNS rebinding).
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub l1_max_bytes: u64,
    pub max_object_bytes: u64,
    /// Response bytes buffered for cache fills at once, over all requests; a miss that would
    /// pass it streams through uncached.
    pub max_fill_bytes: u64,
    pub targeted_fields: std::sync::Arc<[http::HeaderName]>,
    /// `cache.client_no_cache`: the default of every route's.
    pub client_no_cache: bool,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Total request header bytes Weir accepts; beyond it Weir answers 431 JSON.
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// After SIGTERM (or an upgrade hand-over) `/readyz` fails for this long before listeners
    /// stop accepting, so load balancers stop sending first.
    pub drain_delay: Duration,
    /// Where `weir run --upgrade` finds this instance (default: one per configuration file in
    /// the temporary directory).
    pub upgrade_socket: Option<PathBuf>,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are believed and extended.
    pub trusted_proxies: Vec<IpNet>,
    /// Client connections open at once, over every listener; beyond it new ones wait in the
    /// kernel's accept queue.
    pub max_connections: usize,
    /// Keys the local rate limiter tracks at once (a flood of distinct keys evicts the least
    /// used); read at start.
    pub rate_limit_keys: u64,
    /// `server.auth_failures`: how many failed credentials (401s) one client address may make,
    /// as a GCRA; past it, more failures get 429. A valid credential is never checked.
    pub auth_failures: crate::limit::gcra::Gcra,
    /// `Upgrade` protocols that are tunnelled (lower-case); any other is removed.
    pub upgrade_protocols: Vec<String>,
    /// Bytes one upgraded (WebSocket) connection may carry, both directions together.
    pub max_tunnel_bytes: u64,
    /// Tunnels this instance holds at once; past it an upgrade gets 503 `tunnels_busy`.
    pub max_tunnels: usize,
    /// Tunnels one client address (IPv6 by /64) holds at once; past it 429 `too_many_tunnels`.
    pub max_tunnels_per_address: usize,
    pub http2: Http2Settings,
}

/// Explicit HTTP/2 server limits (instead of library defaults): streams, keep-alive, and the
/// reset-flood defences (Rapid Reset, CVE-2023-44487; MadeYouReset, CVE-2025-8671).
#[derive(Debug, Clone, Copy)]
pub struct Http2Settings {
    pub max_concurrent_streams: u32,
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub host: Option<HostMatch>,
    /// Segment-aware path prefix, always starting with `/`.
    pub path: String,
    pub methods: Option<Vec<Method>>,
    /// `match.scheme: https`: a request on a plain listener gets 403 `https_required`.
    pub https_only: bool,
    pub upstreams: Vec<UpstreamUrl>,
    pub timeouts: Timeouts,
    pub max_request_body: Option<u64>,
    /// Upstream requests of this route in flight at once (each holds a connection).
    pub max_upstream_connections: usize,
    /// `forward_headers`: on a cached route, what untrusted peers' requests forward besides
    /// the default set (`cache::policy::ForwardHeaders`).
    pub forward_headers: crate::cache::policy::ForwardHeaders,
    /// TLS to `https://` upstreams (trust, client certificate, name, ALPN).
    pub upstream_tls: crate::tls::UpstreamTls,
    /// Send the upstream's own host as `Host` instead of the client's.
    pub upstream_host_own: bool,
    pub plugin: Option<PluginRef>,
    /// Shared (`Arc`) because every cached request holds it for its whole life.
    pub cache: Option<std::sync::Arc<RouteCache>>,
    pub invalidate: Option<Invalidate>,
    pub consumer: Option<ConsumerFrom>,
    /// The route's `count: all` policies, checked and consumed all or nothing (empty: none).
    pub rate_limit: Vec<RateLimit>,
    /// `count: misses` policies: charged where a request leaves for the origin.
    pub rate_limit_misses: Vec<RateLimit>,
    pub budget: Option<RouteBudget>,
}

pub use crate::router::HostMatch;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Time from sending the request to the upstream's response head.
    pub response: Duration,
    /// Longest silence between two body chunks, either direction.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: Duration::from_secs(5), response: Duration::from_secs(30), idle: Duration::from_secs(60) }
    }
}

#[derive(Debug, Clone)]
pub struct PluginRef {
    pub path: PathBuf,
    pub config: serde_json::Value,
    pub timeout: Duration,
    pub max_memory: u64,
    /// Cap on a response body handed to a plugin that asks for it.
    pub max_body_bytes: u64,
    /// Compiled, checked and initialised at load (`None` only when loading failed, which is a
    /// configuration error).
    pub loaded: Option<std::sync::Arc<crate::plugin::Loaded>>,
}

#[derive(Debug, Clone)]
pub struct Invalidate {
    pub methods: Vec<Method>,
    pub tags: Vec<String>,
}

/// How a route finds its consumer.
#[derive(Debug, Clone)]
pub struct ConsumerFrom {
    pub source: ConsumerSource,
    /// No consumer found: 401 `unknown_consumer` before anything else happens.
    pub required: bool,
    /// The key header is not forwarded upstream (`header:` sources only).
    pub hide_credentials: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerSource {
    /// An API key in this request header, looked up by its SHA-256 digest in `consumers:`.
    Header(HeaderName),
    /// The route plugin's `identify` hook (a verified token's claim, say).
    Plugin,
    /// The verified client certificate (mTLS): its subject's common name, else its first
    /// subjectAltName.
    ClientCert,
}
