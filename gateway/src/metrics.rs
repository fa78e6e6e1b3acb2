//! Prometheus metrics (names are contract, DESIGN.md): one registry per process, kept across
//! reloads. Per-route cache counters are resolved once per configuration so a hit only
//! increments an atomic.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cache::status::{Level, Outcome};
use crate::cache::StorageStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: Arc<String>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLevel {
    pub route: Arc<String>,
    pub level: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteKind {
    pub route: Arc<String>,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabel {
    pub level: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginCall {
    pub plugin: String,
    pub hook: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoutePolicy {
    pub route: Arc<String>,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabel {
    pub issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub cache_hits: Family<RouteLevel, Counter>,
    pub cache_misses: Family<RouteLabel, Counter>,
    pub cache_stale: Family<RouteLabel, Counter>,
    pub cache_invalidations: Family<RouteKind, Counter>,
    pub cache_errors: Family<LevelLabel, Counter>,
    pub upstream_duration: Histogram,
    l1_bytes: Gauge,
    l1_entries: Gauge,
    redis_up: Gauge,
    /// `weir_runtime_tasks`: tokio tasks alive now (connections, requests, background loops).
    runtime_tasks: Gauge,
    pub plugin_calls: Family<PluginCall, Counter>,
    pub plugin_duration: Histogram,
    plugin_instances: Family<PluginLabel, Gauge>,
    ratelimit_rejected: Family<RoutePolicy, Counter>,
    ratelimit_fallback: Family<RouteLabel, Counter>,
    ratelimit_keys: Gauge,
    tls_handshakes: Family<KindLabel, Counter>,
    tls_handshake_errors: Family<ReasonLabel, Counter>,
    tls_cert_expiry: Family<NameLabel, Gauge>,
    tls_crl_expiry: Family<IssuerLabel, Gauge>,
    config_reloads: Family<ResultLabel, Counter>,
    budget_rejected: Family<RouteLabel, Counter>,
    budget_unmetered: Family<RouteLabel, Counter>,
    budget_spent: Family<BudgetLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    budget_unsettled: Family<ReasonLabel, Counter>,
    budget_clamped: Family<BudgetLabel, Counter>,
    pub request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub response_bytes: Family<RouteLabel, Counter>,
    connections: Family<ListenerState, Gauge>,
    pub access_log_dropped: Counter,
    pub debug_rejected: Counter,
    pub spans_dropped: Counter,
    /// Hits and lookups of the last minute, for `/health`.
    pub recent: HitWindow,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerState {
    pub listener: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

/// `weir_request_duration_seconds` buckets: 1 ms to 60 s.
const REQUEST_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS.iter().copied())
}

/// Cache lookups and hits over the last minute, for `/health`: a sampler reads the cache
/// counters once a second (`sample`), so a request pays nothing for it.
#[derive(Debug, Default)]
pub struct HitWindow {
    /// (when, lookups so far, hits so far), oldest first, about a minute of them.
    samples: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64, u64)>>,
}

impl HitWindow {
    pub fn sample(&self, lookups: u64, hits: u64) {
        let now = std::time::Instant::now();
        let mut s = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.push_back((now, lookups, hits));
        while s.front().is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(60)) {
            s.pop_front();
        }
    }

    /// (lookups, hits) between the oldest sample of the last minute and `now_totals`.
    pub fn last_minute(&self, now_totals: (u64, u64)) -> (u64, u64) {
        let s = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (_, l0, h0) = s.front().copied().unwrap_or((std::time::Instant::now(), 0, 0));
        (now_totals.0.saturating_sub(l0), now_totals.1.saturating_sub(h0))
    }
}

/// The `weir_connections` gauges of one listener (`open`, `handshake`, and `tunnel`: upgraded
/// connections spliced to an upstream).
#[derive(Debug, Clone)]
pub struct ConnGauges {
    pub open: Gauge,
    pub handshake: Gauge,
    pub tunnel: Gauge,
}

/// Holds one unit of a gauge while alive.
#[derive(Debug)]
pub struct Held(Gauge);

impl Held {
    pub fn new(g: &Gauge) -> Held {
        g.inc();
        Held(g.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabel {
    pub budget: String,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let requests = Family::default();
        let cache_hits = Family::default();
        let cache_misses = Family::default();
        let cache_stale = Family::default();
        let cache_invalidations = Family::default();
        let cache_errors = Family::default();
        // 0.5 ms .. ~16 s
        let upstream_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let (l1_bytes, l1_entries, redis_up) = (Gauge::default(), Gauge::default(), Gauge::default());
        let plugin_calls = Family::default();
        // 1 µs .. ~65 ms
        let plugin_duration = Histogram::new(exponential_buckets(0.000_001, 2.0, 17));
        // Counters get their `_total` suffix from the encoder.
        registry.register("weir_requests", "Requests answered, by route and status", requests.clone());
        registry.register("weir_cache_hits", "Cache hits, by route and tier", cache_hits.clone());
        registry.register("weir_cache_misses", "Requests the cache sent to the origin", cache_misses.clone());
        registry.register("weir_cache_stale", "Stale responses served", cache_stale.clone());
        registry.register("weir_cache_invalidations", "Invalidations requested, by kind", cache_invalidations.clone());
        registry.register("weir_cache_errors", "Cache tier errors, by tier", cache_errors.clone());
        registry.register(
            "weir_upstream_duration_seconds",
            "Time to the upstream response head",
            upstream_duration.clone(),
        );
        registry.register("weir_l1_bytes", "Bytes held by the in-process cache", l1_bytes.clone());
        registry.register("weir_l1_entries", "Objects held by the in-process cache", l1_entries.clone());
        registry.register("weir_redis_up", "1 when the shared Redis tier is connected", redis_up.clone());
        let runtime_tasks = Gauge::default();
        registry.register(
            "weir_runtime_tasks",
            "Tasks alive in the runtime now: one per connection and request in flight, plus a fixed set of background loops",
            runtime_tasks.clone(),
        );
        registry.register("weir_plugin_calls", "Plugin hook calls, by outcome", plugin_calls.clone());
        registry.register("weir_plugin_duration_seconds", "Time in plugin hook calls", plugin_duration.clone());
        let plugin_instances = Family::<PluginLabel, Gauge>::default();
        registry.register(
            "weir_plugin_instances",
            "Plugin instances in existence (warm or in a call), at most 16 per plugin",
            plugin_instances.clone(),
        );
        let ratelimit_rejected = Family::<RoutePolicy, Counter>::default();
        let ratelimit_fallback = Family::<RouteLabel, Counter>::default();
        let ratelimit_keys = Gauge::default();
        registry.register(
            "weir_ratelimit_rejected",
            "Requests refused by a rate-limit policy",
            ratelimit_rejected.clone(),
        );
        registry.register(
            "weir_ratelimit_fallback",
            "Rate-limit checks decided without Redis (its fail mode)",
            ratelimit_fallback.clone(),
        );
        registry.register("weir_ratelimit_keys", "Keys the local rate limiter tracks", ratelimit_keys.clone());
        let tls_handshakes = Family::<KindLabel, Counter>::default();
        let tls_handshake_errors = Family::<ReasonLabel, Counter>::default();
        let tls_cert_expiry = Family::<NameLabel, Gauge>::default();
        let tls_crl_expiry = Family::<IssuerLabel, Gauge>::default();
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register("weir_tls_handshakes", "TLS handshakes completed, full or resumed", tls_handshakes.clone());
        registry.register(
            "weir_tls_handshake_errors",
            "TLS handshakes that failed, by reason",
            tls_handshake_errors.clone(),
        );
        registry.register(
            "weir_tls_cert_expiry_seconds",
            "Seconds until each served certificate expires (negative: expired)",
            tls_cert_expiry.clone(),
        );
        registry.register(
            "weir_tls_crl_expiry_seconds",
            "Seconds until each client CRL's nextUpdate (negative: stale, and the certificates it covers are refused)",
            tls_crl_expiry.clone(),
        );
        registry.register(
            "weir_config_reloads",
            "Configuration reloads (SIGHUP, POST /reload, a certificate file change), by result",
            config_reloads.clone(),
        );
        let budget_rejected = Family::<RouteLabel, Counter>::default();
        let budget_unmetered = Family::<RouteLabel, Counter>::default();
        // A gauge, as DESIGN.md names it (`weir_budget_spent`, no `_total`): money settled since start.
        let budget_spent = Family::<BudgetLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register("weir_budget_rejected", "Calls refused because a budget was spent", budget_rejected.clone());
        registry.register(
            "weir_budget_unmetered",
            "Budgeted calls let through unmetered (Redis away, `fail: open`)",
            budget_unmetered.clone(),
        );
        registry.register(
            "weir_budget_spent",
            "Money settled per budget, as a float for dashboards (the admin API has the exact amount)",
            budget_spent.clone(),
        );
        let budget_unsettled = Family::<ReasonLabel, Counter>::default();
        let budget_clamped = Family::<BudgetLabel, Counter>::default();
        registry.register(
            "weir_budget_unsettled",
            "Calls settled at their reservation because the cost could not be computed, by reason",
            budget_unsettled.clone(),
        );
        registry.register(
            "weir_budget_clamped",
            "Calls whose computed cost was capped at max_cost",
            budget_clamped.clone(),
        );
        let request_duration =
            Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(request_histogram);
        registry.register(
            "weir_request_duration_seconds",
            "Time from the request head to the response head, by route",
            request_duration.clone(),
        );
        let response_bytes = Family::<RouteLabel, Counter>::default();
        registry.register(
            "weir_response_bytes",
            "Response body bytes sent to clients, by route",
            response_bytes.clone(),
        );
        let connections = Family::<ListenerState, Gauge>::default();
        registry.register(
            "weir_connections",
            "Client connections open now, by listener and state (handshake: TLS not done yet)",
            connections.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("weir_build_info", "1, labelled with the running version", build_info);
        let access_log_dropped = Counter::default();
        registry.register(
            "weir_access_log_dropped",
            "Access-log lines dropped because the writer was behind",
            access_log_dropped.clone(),
        );
        let debug_rejected = Counter::default();
        registry.register(
            "weir_debug_rejected",
            "Requests with a Weir-Debug header whose token was wrong (ignored)",
            debug_rejected.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "weir_trace_spans_dropped",
            "Spans not delivered to the OTLP collector (queue full, collector down)",
            spans_dropped.clone(),
        );
        Arc::new(Metrics {
            spans_dropped,
            request_duration,
            response_bytes,
            connections,
            access_log_dropped,
            debug_rejected,
            recent: HitWindow::default(),
            registry,
            budget_unsettled,
            budget_clamped,
            budget_rejected,
            budget_unmetered,
            budget_spent,
            requests,
            cache_hits,
            cache_misses,
            cache_stale,
            cache_invalidations,
            cache_errors,
            upstream_duration,
            l1_bytes,
            l1_entries,
            redis_up,
            runtime_tasks,
            plugin_calls,
            plugin_duration,
            plugin_instances,
            ratelimit_rejected,
            ratelimit_fallback,
            ratelimit_keys,
            tls_handshakes,
            tls_handshake_errors,
            tls_cert_expiry,
            tls_crl_expiry,
            config_reloads,
        })
    }

    /// Counters of one route's cache, resolved once.
    pub fn route_cache(&self, route: &Arc<String>) -> RouteCacheMetrics {
        // One statement per counter: `get_or_create` returns a read guard, and guards that live to
        // the end of one larger expression deadlock the next insert into the same family.
        let r = || route.clone();
        let hit_l1 = self.cache_hits.get_or_create_owned(&RouteLevel { route: r(), level: "l1" });
        let hit_l2 = self.cache_hits.get_or_create_owned(&RouteLevel { route: r(), level: "l2" });
        let miss = self.cache_misses.get_or_create_owned(&RouteLabel { route: r() });
        let stale = self.cache_stale.get_or_create_owned(&RouteLabel { route: r() });
        RouteCacheMetrics { hit_l1, hit_l2, miss, stale }
    }

    /// `weir_connections{listener,state}` of one listener.
    pub fn connections(&self, listener: &str) -> ConnGauges {
        let g = |state| self.connections.get_or_create_owned(&ListenerState { listener: listener.to_string(), state });
        let open = g("open");
        let handshake = g("handshake");
        let tunnel = g("tunnel");
        ConnGauges { open, handshake, tunnel }
    }

    /// `weir_request_duration_seconds` and `weir_response_bytes_total` of one route.
    pub fn route_stats(&self, route: &Arc<String>) -> RouteStats {
        let duration = self.request_duration.get_or_create_owned(&RouteLabel { route: route.clone() });
        let response_bytes = self.response_bytes.get_or_create_owned(&RouteLabel { route: route.clone() });
        RouteStats { duration, response_bytes }
    }

    /// `weir_requests_total` for one route, resolved lazily per status code.
    pub fn route_requests(self: &Arc<Self>, route: &Arc<String>) -> RouteRequests {
        RouteRequests {
            route: route.clone(),
            metrics: self.clone(),
            by_status: (0..500).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn invalidations(&self, route: &Arc<String>, kind: &'static str, n: usize) {
        if n > 0 {
            self.cache_invalidations.get_or_create(&RouteKind { route: route.clone(), kind }).inc_by(n as u64);
        }
    }

    pub fn upstream(&self, took: Duration) {
        self.upstream_duration.observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition, with gauges read now.
    pub fn ratelimit_rejected(&self, route: &Arc<String>, policy: &str) {
        self.ratelimit_rejected.get_or_create(&RoutePolicy { route: route.clone(), policy: policy.to_string() }).inc();
    }

    pub fn tls_handshake(&self, kind: &'static str) {
        self.tls_handshakes.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn tls_handshake_error(&self, reason: &'static str) {
        self.tls_handshake_errors.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn budget_rejected(&self, route: &Arc<String>) {
        self.budget_rejected.get_or_create(&RouteLabel { route: route.clone() }).inc();
    }

    pub fn budget_unmetered(&self, route: &Arc<String>) {
        self.budget_unmetered.get_or_create(&RouteLabel { route: route.clone() }).inc();
    }

    pub fn budget_spent(&self, budget: &str, units: i64) {
        // Float for dashboards only: precision loss is acceptable here, never in the stores.
        #[allow(clippy::cast_precision_loss)]
        let amount = units as f64 / 1e6;
        self.budget_spent.get_or_create(&BudgetLabel { budget: budget.to_string() }).inc_by(amount);
    }

    pub fn budget_unsettled(&self, reason: &'static str) {
        self.budget_unsettled.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn budget_clamped(&self, budget: &str) {
        self.budget_clamped.get_or_create(&BudgetLabel { budget: budget.to_string() }).inc();
    }

    pub fn config_reload(&self, ok: bool) {
        self.config_reloads.get_or_create(&ResultLabel { result: if ok { "ok" } else { "error" } }).inc();
    }

    /// `weir_tls_cert_expiry_seconds{name}` for the certificates served now.
    pub fn tls_expiry(&self, certs: &[(String, i64)]) {
        self.tls_cert_expiry.clear();
        for (name, left) in certs {
            self.tls_cert_expiry.get_or_create(&NameLabel { name: name.clone() }).set(*left);
        }
    }

    /// `weir_tls_crl_expiry_seconds{issuer}` for the client CRLs loaded now.
    pub fn crl_expiry(&self, lists: &[(String, i64)]) {
        self.tls_crl_expiry.clear();
        for (issuer, left) in lists {
            self.tls_crl_expiry.get_or_create(&IssuerLabel { issuer: issuer.clone() }).set(*left);
        }
    }

    pub fn ratelimit_fallback(&self, route: &Arc<String>) {
        self.ratelimit_fallback.get_or_create(&RouteLabel { route: route.clone() }).inc();
    }

    pub fn render(&self, l1: StorageStats, redis_up: bool, plugins: &[(String, usize)], ratelimit_keys: u64) -> String {
        self.ratelimit_keys.set(i64::try_from(ratelimit_keys).unwrap_or(i64::MAX));
        for (plugin, n) in plugins {
            self.plugin_instances
                .get_or_create(&PluginLabel { plugin: plugin.clone() })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.l1_bytes.set(i64::try_from(l1.bytes).unwrap_or(i64::MAX));
        self.l1_entries.set(i64::try_from(l1.entries).unwrap_or(i64::MAX));
        self.redis_up.set(i64::from(redis_up));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks.set(i64::try_from(rt.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// One route's request counters: after the first request with a status, counting it is one
/// atomic increment (the labelled lookup hashed and locked on every request: ~700 instructions).
#[derive(Debug)]
pub struct RouteRequests {
    route: Arc<String>,
    metrics: Arc<Metrics>,
    by_status: Vec<OnceLock<Counter>>,
}

impl RouteRequests {
    pub fn inc(&self, status: u16) {
        let Some(slot) = usize::from(status).checked_sub(100).and_then(|i| self.by_status.get(i)) else {
            self.metrics.requests.get_or_create(&RouteStatus { route: self.route.clone(), status }).inc();
            return;
        };
        slot.get_or_init(|| {
            self.metrics.requests.get_or_create_owned(&RouteStatus { route: self.route.clone(), status })
        })
        .inc();
    }
}

/// One route's latency and byte counters, resolved once.
#[derive(Debug, Clone)]
pub struct RouteStats {
    pub duration: Histogram,
    pub response_bytes: Counter,
}

/// One route's cache counters.
#[derive(Debug, Clone)]
pub struct RouteCacheMetrics {
    hit_l1: Counter,
    hit_l2: Counter,
    miss: Counter,
    stale: Counter,
}

impl RouteCacheMetrics {
    /// (lookups, hits) so far: fresh and stale hits, and misses (collapsed and revalidated
    /// ones too).
    pub fn totals(&self) -> (u64, u64) {
        let hits = self.hit_l1.get() + self.hit_l2.get() + self.stale.get();
        (hits + self.miss.get(), hits)
    }

    /// Labels an outcome the way `Outcome::label` names it.
    pub fn record(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Hit { level: Level::L1 } => self.hit_l1.inc(),
            Outcome::Hit { level: Level::L2 } => self.hit_l2.inc(),
            o if o.label() == "stale" => self.stale.inc(),
            o if matches!(o.label(), "miss" | "collapsed" | "revalidated") => self.miss.inc(),
            _ => 0,
        };
    }
}

impl crate::plugin::CallSink for Metrics {
    fn record(&self, plugin: &str, hook: &'static str, outcome: &'static str, took: Duration) {
        self.plugin_calls.get_or_create(&PluginCall { plugin: plugin.to_string(), hook, outcome }).inc();
        self.plugin_duration.observe(took.as_secs_f64());
    }
}
