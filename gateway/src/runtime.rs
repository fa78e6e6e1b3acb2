//! The running state built from one validated configuration, swapped atomically on reload.
//! In-flight requests keep the `Runtime` they started with; new ones see the new one.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::cache::l2::{self, L2};
use crate::cache::{Cache, Storage};
use crate::config::{self, Config, ConfigError, Route};
use crate::metrics::{LevelLabel, Metrics, RouteCacheMetrics, RouteRequests};
use crate::redis::Shared;
use crate::router::Router;
use crate::upstream::UpstreamPool;

#[derive(Debug)]
pub struct RouteRuntime {
    pub route: Route,
    pub upstreams: UpstreamPool,
    /// The route's name as a metrics label (shared, not copied, per request).
    pub label: Arc<String>,
    pub cache_metrics: Option<RouteCacheMetrics>,
    pub requests: RouteRequests,
    /// `weir_request_duration_seconds` and `weir_response_bytes_total` of this route.
    pub stats: crate::metrics::RouteStats,
    pub metrics: Arc<Metrics>,
    /// `max_upstream_connections`: one permit per upstream request in flight.
    pub upstream_slots: Arc<tokio::sync::Semaphore>,
    /// `RateLimit-Policy`, computed once, for the `count: all` policies (`[0]`) and the
    /// `count: misses` ones (`[1]`): each for admitted responses (policies with `headers: true`)
    /// and for a 429 (every policy).
    pub ratelimit_policy: [[Option<http::HeaderValue>; 2]; 2],
    /// The start of this route's primary cache keys (`cache::key::prefix`): `[0]` for the GET
    /// class, `[1]` for POST.
    pub key_prefix: [String; 2],
}

#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    pub routes: Vec<RouteRuntime>,
    /// Shared by every configuration generation: a reload keeps what is cached.
    pub cache: Arc<Cache>,
    /// Shared by every configuration generation, like the cache.
    pub metrics: Arc<Metrics>,
    /// Rate-limit state, shared by every configuration generation (a reload keeps the counts).
    pub limits: Arc<crate::limit::Limiter>,
    /// Budget state (embedded mode) and scripts, shared by every configuration generation.
    pub budgets: Arc<crate::budget::Budgets>,
    /// Label for requests that matched no route, and for admin actions.
    pub no_route: Arc<String>,
    pub no_route_requests: RouteRequests,
    pub no_route_stats: crate::metrics::RouteStats,
}

impl Runtime {
    pub fn build(
        config: Config,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        limits: Arc<crate::limit::Limiter>,
        budgets: Arc<crate::budget::Budgets>,
    ) -> Runtime {
        let router = Router::from_table(
            config.routes.iter().map(|r| (r.host.clone(), r.path.clone(), r.methods.clone())).collect(),
        );
        for p in config.routes.iter().filter_map(|r| r.plugin.as_ref()?.loaded.as_ref()) {
            p.set_sink(metrics.clone());
        }
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let label = Arc::new(r.name.clone());
                RouteRuntime {
                    route: r.clone(),
                    upstreams: UpstreamPool::new(&r.upstreams, r.timeouts.connect, &r.upstream_tls),
                    cache_metrics: r.cache.as_ref().map(|_| metrics.route_cache(&label)),
                    requests: metrics.route_requests(&label),
                    stats: metrics.route_stats(&label),
                    label,
                    metrics: metrics.clone(),
                    upstream_slots: Arc::new(tokio::sync::Semaphore::new(r.max_upstream_connections)),
                    ratelimit_policy: [&r.rate_limit, &r.rate_limit_misses]
                        .map(|p| [crate::limit::policy_header(p, false), crate::limit::policy_header(p, true)]),
                    key_prefix: ["GET", "POST"].map(|class| crate::cache::key::prefix(&r.name, class)),
                }
            })
            .collect();
        let no_route = Arc::new(String::new());
        let no_route_requests = metrics.route_requests(&no_route);
        let no_route_stats = metrics.route_stats(&no_route);
        Runtime {
            config: Arc::new(config),
            router,
            routes,
            cache,
            metrics,
            limits,
            budgets,
            no_route,
            no_route_requests,
            no_route_stats,
        }
    }
}

/// Process-wide gateway state shared by listeners, the admin API and signal handlers.
#[derive(Debug)]
pub struct Gateway {
    runtime: ArcSwap<Runtime>,
    pub started: Instant,
    /// The shared tier's connection, when `redis` is configured (it needs a restart to change).
    pub redis: Option<Arc<Shared>>,
    /// Each TLS listener's acceptor, by listener index (set once the listeners are bound);
    /// a reload hands them the new certificates.
    tls: std::sync::OnceLock<Vec<(usize, Arc<crate::tls::Acceptor>)>>,
    /// One reload at a time, whatever asked for it (SIGHUP, `POST /reload`, a certificate
    /// file change).
    reloading: std::sync::Mutex<()>,
    /// The access log's writer (set once at start; absent when `log.access.format: off`).
    access: std::sync::OnceLock<Arc<crate::observe::AccessLog>>,
    /// The OTLP span exporter (set once at start, when `tracing.otlp` is).
    spans: std::sync::OnceLock<Arc<crate::observe::SpanExporter>>,
    /// Every listener is bound and serving (`/readyz`).
    pub ready: std::sync::atomic::AtomicBool,
    /// The first listener's scheme and bound port (set once bound): the host an admin warm-up
    /// or explain of a bare path addresses.
    first_listener: std::sync::OnceLock<(&'static str, u16)>,
    /// Shutting down or handing over to a new process: `/readyz` fails from here on.
    pub draining: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// The cache is sized from this first configuration; `cache.*` sizes need a restart to change.
    /// `redis`: the connected shared tier (see `Shared::connect`); its L2 cache and the
    /// invalidation subscriber start here.
    pub fn new(config: Config, redis: Option<Arc<Shared>>) -> Arc<Gateway> {
        let metrics = Metrics::new();
        let l2 = redis.as_ref().map(|r| Arc::new(L2::new(r.clone())));
        let cache = Cache::new(
            config.cache.l1_max_bytes,
            config.cache.max_object_bytes,
            config.cache.max_fill_bytes,
            l2.clone().map(|l| l as Arc<dyn Storage>),
            l2.clone().filter(|l| l.redis.settings.fill_lock),
            metrics.cache_errors.get_or_create_owned(&LevelLabel { level: "l2" }),
        );
        if let (Some(l2), Some(r)) = (l2, &redis) {
            r.spawn_supervisor();
            l2::spawn_subscriber(Arc::downgrade(&cache), l2);
        }
        let instances = config.redis.as_ref().map_or(1, |r| r.instances);
        let limits = Arc::new(crate::limit::Limiter::new(redis.clone(), instances, config.server.rate_limit_keys));
        let budgets = Arc::new(crate::budget::Budgets::new(redis.clone()));
        if budgets.embedded() && !config.budgets.is_empty() {
            tracing::warn!(
                "budgets are kept in memory (no `redis`): spend is lost on restart and not shared between instances"
            );
        }
        let runtime = Runtime::build(config, cache, metrics, limits, budgets);
        Arc::new(Gateway {
            runtime: ArcSwap::from_pointee(runtime),
            started: Instant::now(),
            redis,
            tls: std::sync::OnceLock::new(),
            reloading: std::sync::Mutex::new(()),
            access: std::sync::OnceLock::new(),
            spans: std::sync::OnceLock::new(),
            ready: std::sync::atomic::AtomicBool::new(false),
            first_listener: std::sync::OnceLock::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// `reload` on a blocking thread: compiling changed plugins stays off the request path.
    pub async fn reload_off_thread(self: &Arc<Self>) -> Result<(), ConfigError> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.reload()).await {
            Ok(r) => r,
            Err(e) => Err(ConfigError {
                problems: vec![crate::config::Problem {
                    file: self.runtime().config.source.clone(),
                    pos: crate::config::Pos { line: 1, col: 1 },
                    message: format!("reload task failed: {e}"),
                }],
            }),
        }
    }

    /// Cache (lookups, hits) so far, over every route.
    pub fn cache_totals(&self) -> (u64, u64) {
        self.runtime()
            .routes
            .iter()
            .filter_map(|r| r.cache_metrics.as_ref())
            .map(RouteCacheMetrics::totals)
            .fold((0, 0), |(l, h), (a, b)| (l + a, h + b))
    }

    /// The access log (once, at start).
    pub fn set_access_log(&self, log: Arc<crate::observe::AccessLog>) {
        let _ = self.access.set(log);
    }

    pub fn access_log(&self) -> Option<&Arc<crate::observe::AccessLog>> {
        self.access.get()
    }

    pub fn set_span_exporter(&self, e: Arc<crate::observe::SpanExporter>) {
        let _ = self.spans.set(e);
    }

    pub fn span_exporter(&self) -> Option<&Arc<crate::observe::SpanExporter>> {
        self.spans.get()
    }

    /// `/readyz`: serving, not draining, and Redis reachable where `redis.required`.
    pub fn readiness(&self) -> Result<(), &'static str> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.draining.load(Relaxed) {
            return Err("draining");
        }
        if !self.ready.load(Relaxed) {
            return Err("starting");
        }
        let required = self.runtime().config.redis.as_ref().is_some_and(|r| r.required);
        if required && !self.redis.as_ref().is_some_and(|r| r.is_up()) {
            return Err("redis unreachable");
        }
        Ok(())
    }

    /// The first listener as bound (once, at start).
    pub fn set_first_listener(&self, scheme: &'static str, port: u16) {
        let _ = self.first_listener.set((scheme, port));
    }

    /// What `curl localhost:PORT` sends to the first listener: its scheme and `localhost:PORT`
    /// (the port left out when it is the scheme's default, as clients do).
    pub fn default_authority(&self) -> (&'static str, String) {
        match self.first_listener.get() {
            Some(&(scheme, port)) if (scheme, port) != ("http", 80) && (scheme, port) != ("https", 443) => {
                (scheme, format!("localhost:{port}"))
            }
            Some(&(scheme, _)) => (scheme, "localhost".into()),
            None => ("http", "localhost".into()),
        }
    }

    /// The TLS listeners' acceptors (once, at start).
    pub fn set_tls(&self, acceptors: Vec<(usize, Arc<crate::tls::Acceptor>)>) {
        let _ = self.tls.set(acceptors);
    }

    /// Every TLS listener's certificates now: name and seconds until expiry.
    pub fn tls_expiry(&self) -> Vec<(String, i64)> {
        let now = crate::clock::unix_s(std::time::SystemTime::now());
        let mut out: Vec<(String, i64)> = Vec::new();
        for (_, a) in self.tls.get().map_or(&[][..], Vec::as_slice) {
            for c in a.certs().all().iter() {
                if !out.iter().any(|(n, _)| n == &c.name) {
                    out.push((c.name.clone(), c.not_after - now));
                }
            }
        }
        out
    }

    /// Every TLS listener's client CRLs now: issuer and seconds until `nextUpdate`.
    pub fn crl_expiry(&self) -> Vec<(String, i64)> {
        let now = crate::clock::unix_s(std::time::SystemTime::now());
        let mut out: Vec<(String, i64)> = Vec::new();
        let rt = self.runtime();
        for crl in rt.config.listeners.iter().filter_map(|l| l.tls.as_ref()?.client_crl.as_ref()) {
            for (issuer, next) in &crl.issuers {
                if let Some(next) = next {
                    if !out.iter().any(|(i, _)| i == issuer) {
                        out.push((issuer.clone(), next - now));
                    }
                }
            }
        }
        out
    }

    /// Reads the configuration file again, validates it whole and swaps it in. On error the old
    /// configuration keeps serving. Listener and admin addresses need a restart to change.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let _one = self.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = self.reload_now();
        self.runtime().metrics.config_reload(result.is_ok());
        if let Some(log) = self.access.get() {
            // `logrotate` moved the file: the next line goes to a new one.
            log.reopen();
        }
        result
    }

    fn reload_now(&self) -> Result<(), ConfigError> {
        let current = self.runtime();
        let next = config::load(&current.config.source)?;
        let old_addrs: Vec<_> = current.config.listeners.iter().map(|l| l.addr).collect();
        let new_addrs: Vec<_> = next.listeners.iter().map(|l| l.addr).collect();
        if old_addrs != new_addrs
            || current.config.admin.as_ref().map(|a| a.addr) != next.admin.as_ref().map(|a| a.addr)
        {
            tracing::warn!("listener or admin addresses changed: they take effect after a restart");
        }
        if current.config.redis.as_ref().map(|r| &r.urls) != next.redis.as_ref().map(|r| &r.urls) {
            tracing::warn!("redis settings changed: they take effect after a restart");
        }
        for w in &next.warnings {
            tracing::warn!("{w}");
        }
        // New certificates for new handshakes; open connections keep theirs.
        for (i, acceptor) in self.tls.get().map_or(&[][..], Vec::as_slice) {
            match next.listeners.get(*i).and_then(|l| l.tls.as_ref()) {
                Some(s) => match acceptor.update(s) {
                    Ok(true) => tracing::info!(
                        listener = *i,
                        "client CA or client_auth changed: TLS ticket keys and session cache replaced"
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        return Err(ConfigError {
                            problems: vec![crate::config::Problem {
                                file: next.source.clone(),
                                pos: crate::config::Pos { line: 1, col: 1 },
                                message: format!("listen[{i}].tls: {e}"),
                            }],
                        })
                    }
                },
                None => tracing::warn!(listener = *i, "TLS removed from a listener: that takes effect after a restart"),
            }
        }
        let routes = next.routes.len();
        self.runtime.store(Arc::new(Runtime::build(
            next,
            current.cache.clone(),
            current.metrics.clone(),
            current.limits.clone(),
            current.budgets.clone(),
        )));
        tracing::info!(routes, "configuration reloaded");
        Ok(())
    }
}
