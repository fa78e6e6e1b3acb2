//! The admin API on its own listener: `/health` for anyone, everything else behind a bearer token
//! compared in constant time. Paths are contract (DESIGN.md); more arrive with their features.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::cache::Purge;
use crate::config::values::Token;
use crate::error::{json_response, GatewayError};
use crate::runtime::Gateway;
use crate::Body;

/// Admin state: the gateway and the token (`None` only on loopback, as validated at start-up).
#[derive(Debug)]
pub struct Admin {
    pub gateway: Arc<Gateway>,
    pub token: Option<Token>,
}

impl Admin {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        match &self.token {
            None => true,
            Some(t) => t.admits(req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)),
        }
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match self.route(req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    }

    /// Refuses what a browser could send for a page on the operator's machine: a request that
    /// carries `Origin` or a `Sec-Fetch-Site` other than `none` (a page's fetch or form), and a
    /// `Host` naming anything but an IP address, `localhost` or `admin.hosts` (DNS rebinding
    /// reaches a loopback listener only under a name the attacker controls).
    fn refuse_browsers(&self, req: &Request<Incoming>) -> Result<(), GatewayError> {
        let h = req.headers();
        if h.contains_key(header::ORIGIN) {
            return Err(GatewayError::Forbidden(
                "admin requests with an `Origin` header (from a web page) are refused".into(),
            ));
        }
        if let Some(site) = h.get("sec-fetch-site") {
            if site.as_bytes() != b"none" {
                return Err(GatewayError::Forbidden(
                    "admin requests a web page made (`Sec-Fetch-Site`) are refused".into(),
                ));
            }
        }
        let host = h.get(header::HOST).map(|v| v.to_str().unwrap_or("\u{0}")).or_else(|| req.uri().host());
        if let Some(host) = host {
            if !self.host_allowed(host) {
                return Err(GatewayError::Forbidden(format!(
                    "the admin API does not answer to `{host}`: use an IP address, `localhost`, or list the name in `admin.hosts`"
                )));
            }
        }
        Ok(())
    }

    fn host_allowed(&self, host: &str) -> bool {
        // The name without its port, as the data plane reads it (`[v6]` keeps its brackets).
        let name = crate::proxy::canonical::host_of(host);
        let ip = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
        if ip.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let rt = self.gateway.runtime();
        rt.config.admin.as_ref().is_some_and(|a| a.hosts.iter().any(|h| h.eq_ignore_ascii_case(name)))
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        self.refuse_browsers(&req)?;
        let path = req.uri().path().to_string();
        // Load balancers probe with HEAD as often as with GET (hyper sends no body for HEAD).
        if req.method() == Method::GET || req.method() == Method::HEAD {
            match path.as_str() {
                "/health" => return Ok(self.health().await),
                "/livez" => return Ok(json_response(StatusCode::OK, &serde_json::json!({"status": "alive"}))),
                "/readyz" => {
                    return Ok(match self.gateway.readiness() {
                        Ok(()) => json_response(StatusCode::OK, &serde_json::json!({"status": "ready"})),
                        Err(why) => json_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &serde_json::json!({"status": "not_ready", "reason": why}),
                        ),
                    })
                }
                _ => {}
            }
        }
        if !self.authorized(&req) {
            return Err(GatewayError::Unauthorized);
        }
        // A page can send `text/plain` (or nothing) without a preflight, never JSON.
        if matches!(*req.method(), Method::POST | Method::DELETE | Method::PUT | Method::PATCH) {
            let json = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(GatewayError::UnsupportedMediaType);
            }
        }
        match (req.method(), path.as_str()) {
            (&Method::POST, "/reload") => match self.gateway.reload_off_thread().await {
                Ok(()) => Ok(json_response(StatusCode::OK, &serde_json::json!({"status": "reloaded"}))),
                Err(e) => {
                    tracing::error!("reload rejected, the previous configuration keeps serving:\n{e}");
                    Err(GatewayError::InvalidConfig { message: e.to_string() })
                }
            },
            (&Method::POST, "/cache/purge") => self.purge(req).await,
            (&Method::POST, "/cache/warm") => self.warm(req).await,
            (&Method::GET, "/cache/explain") => {
                let query = req.uri().query().unwrap_or("").to_string();
                self.explain(&query).await
            }
            (&Method::GET, "/metrics") => Ok(self.metrics().await),
            (m @ (&Method::GET | &Method::DELETE), p) if p.starts_with("/ratelimits/") => {
                let query = req.uri().query().unwrap_or("").to_string();
                self.ratelimits(m == Method::DELETE, p, &query).await
            }
            (m @ (&Method::GET | &Method::DELETE), p) if p.starts_with("/budgets/") => {
                let query = req.uri().query().unwrap_or("").to_string();
                self.budgets(m == Method::DELETE, p, &query).await
            }
            (m, p) => Err(GatewayError::NotFound(format!("no admin endpoint {m} {p}"))),
        }
    }

    /// `GET /budgets/{consumer}?budget=NAME&from=&to=&by=hour|day` (Unix seconds; default the
    /// last 24 hours by hour): the current window's `spent`, `reserved`, `remaining`, `reset_at`
    /// and the settled `series`, amounts as decimal strings. `DELETE` forgets the current
    /// window's spend.
    async fn budgets(&self, delete: bool, path: &str, query: &str) -> Result<Response<Body>, GatewayError> {
        let consumer = percent_decode(path.trim_start_matches("/budgets/"))?;
        let mut params = std::collections::HashMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.insert(k.to_string(), percent_decode(v)?);
        }
        let rt = self.gateway.runtime();
        let name = params.get("budget").ok_or_else(|| GatewayError::BadRequest("expected ?budget=NAME".into()))?;
        let def = rt
            .config
            .budgets
            .get(name)
            .cloned()
            .ok_or_else(|| GatewayError::NotFound(format!("no budget `{name}`")))?;
        let unavailable = |_| GatewayError::BudgetUnavailable;
        if delete {
            rt.budgets.reset(&def, &consumer).await.map_err(unavailable)?;
            return Ok(json_response(StatusCode::OK, &serde_json::json!({"reset": true})));
        }
        let now = crate::clock::now_s();
        let time = |k: &str, default: i64| -> Result<i64, GatewayError> {
            match params.get(k) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| GatewayError::BadRequest(format!("`{k}` is Unix seconds, got `{v}`"))),
            }
        };
        let (from, to) = (time("from", now - 86_400)?, time("to", now)?);
        let by_hour = match params.get("by").map(String::as_str) {
            None | Some("hour") => true,
            Some("day") => false,
            Some(o) => return Err(GatewayError::BadRequest(format!("`by` is hour or day, got `{o}`"))),
        };
        let s = rt.budgets.status(&def, &consumer, from, to, by_hour).await.map_err(unavailable)?;
        let limit = rt.config.budget_limit(&def, &consumer);
        let money = |u: i64| crate::budget::amount(u).to_string();
        let series: Vec<serde_json::Value> = s
            .series
            .iter()
            .map(|(start, spent, n)| {
                serde_json::json!({"start": crate::clock::rfc3339(*start), "spent": money(*spent), "requests": n})
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({
                "consumer": consumer,
                "budget": def.name,
                "limit": crate::budget::amount(limit).to_string(),
                "window": {"start": crate::clock::rfc3339(s.window.0), "end": crate::clock::rfc3339(s.window.1)},
                "spent": money(s.spent),
                "reserved": money(s.reserved),
                "remaining": money((limit - s.spent - s.reserved).max(0)),
                "requests": s.requests,
                "reset_at": crate::clock::rfc3339(s.window.1),
                "by": if by_hour { "hour" } else { "day" },
                "series": series,
                "store": if rt.budgets.embedded() { "memory" } else { "redis" },
            }),
        ))
    }

    /// `GET /ratelimits/{route}/{key}[?kind=address|consumer|header]`: `{"route", "key",
    /// "kind", "policies": [{name, remaining, reset_seconds}]}`, read without consuming; `DELETE`
    /// forgets the key in every policy and says whether there was anything to forget. Without
    /// `kind` the key is read as each policy counts (an address, a consumer id, a header's
    /// value); `kind=address` names the address bucket (also the fallback of `header:` and
    /// `consumer` policies); `kind=header&sha256=HEX` names a header value by its digest, so a
    /// raw API key never sits in an admin URL (`/ratelimits/{route}?kind=header&sha256=...`).
    /// `{key}` is percent-decoded (an IPv6 address, a header value).
    async fn ratelimits(&self, delete: bool, path: &str, query: &str) -> Result<Response<Body>, GatewayError> {
        use crate::limit::AdminKey;
        let rest = path.trim_start_matches("/ratelimits/");
        let (route_name, raw_key) = match rest.split_once('/') {
            Some((r, k)) => (r, Some(percent_decode(k)?)),
            None => (rest, None),
        };
        let (mut kind, mut sha256) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("kind", v) => kind = Some(v.to_string()),
                ("sha256", v) => sha256 = Some(v.to_ascii_lowercase()),
                (other, _) => return Err(GatewayError::BadRequest(format!("unknown parameter `{other}`"))),
            }
        }
        let usage = "expected /ratelimits/{route}/{key}[?kind=address|consumer|header] or /ratelimits/{route}?kind=header&sha256=HEX";
        let key = match (kind.as_deref(), raw_key, sha256) {
            (None, Some(k), None) => AdminKey::Own(k),
            (Some("address"), Some(k), None) => AdminKey::Address(
                k.parse().map_err(|_| GatewayError::BadRequest(format!("`{k}` is not an IP address")))?,
            ),
            (Some("consumer"), Some(k), None) => AdminKey::Consumer(k),
            (Some("header"), None, Some(h)) => {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(GatewayError::BadRequest("`sha256` is 64 hex digits".into()));
                }
                AdminKey::HeaderSha256(h)
            }
            (Some("header"), Some(k), None) => AdminKey::header_value(k.as_bytes()),
            _ => return Err(GatewayError::BadRequest(usage.into())),
        };
        let shown = match &key {
            AdminKey::Own(k) | AdminKey::Consumer(k) => k.clone(),
            AdminKey::Address(ip) => ip.to_string(),
            AdminKey::HeaderSha256(h) => format!("sha256:{h}"),
        };
        let rt = self.gateway.runtime();
        let route = rt
            .config
            .routes
            .iter()
            .find(|r| r.name == route_name && !r.rate_limit.is_empty())
            .ok_or_else(|| GatewayError::NotFound(format!("no route `{route_name}` with a rate_limit")))?;
        if delete {
            let reset = rt
                .limits
                .reset(&route.name, &route.rate_limit, &key)
                .await
                .map_err(|_| GatewayError::RateLimitUnavailable)?;
            return Ok(json_response(StatusCode::OK, &serde_json::json!({"reset": reset, "key": shown})));
        }
        let policies: Vec<serde_json::Value> = rt
            .limits
            .peek(&route.name, &route.rate_limit, &key)
            .await
            .map_err(|_| GatewayError::RateLimitUnavailable)?
            .into_iter()
            .map(|(name, s)| {
                serde_json::json!({"name": name, "remaining": s.remaining, "reset_seconds": s.reset_us.div_ceil(1_000_000)})
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"route": route_name, "key": shown, "kind": kind, "policies": policies}),
        ))
    }

    /// `POST /cache/purge` `{"keys": [...], "tags": [...], "prefixes": [...]}` → `{"purged": n}`.
    async fn purge(&self, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        let purge: Purge =
            read_json(req, 1 << 20, "purge", r#"{"keys": [...], "tags": [...], "prefixes": [...]}"#).await?;
        if purge.is_empty() {
            return Err(GatewayError::BadRequest("nothing to purge: give keys, tags or prefixes".into()));
        }
        // URL paths and prefixes are normalised like request targets, so `/a/%7Eb/../c` purges
        // what a request for it stored.
        let purge = normalize_purge(purge)?;
        let rt = self.gateway.runtime();
        for (kind, n) in [("key", purge.keys.len()), ("tag", purge.tags.len()), ("prefix", purge.prefixes.len())] {
            rt.metrics.invalidations(&rt.no_route, kind, n);
        }
        let purged = rt.cache.purge(&purge).await.map_err(|e| GatewayError::BadRequest(e.to_string()))?;
        tracing::info!(?purge, purged, "admin purge");
        Ok(json_response(StatusCode::OK, &serde_json::json!({"purged": purged})))
    }

    /// `POST /cache/warm` `{"paths": [...], "headers": {...}, "consumer": "..."}`.
    async fn warm(&self, req: Request<Incoming>) -> Result<Response<Body>, GatewayError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Warm {
            paths: Vec<String>,
            #[serde(default)]
            headers: std::collections::BTreeMap<String, String>,
            consumer: Option<String>,
        }
        let w: Warm = read_json(req, 4 << 20, "warm", r#"{"paths": ["/a", ...], "headers": {...}}"#).await?;
        if w.paths.is_empty() || w.paths.len() > crate::proxy::MAX_WARM_PATHS {
            return Err(GatewayError::BadRequest(format!("give 1 to {} paths to warm", crate::proxy::MAX_WARM_PATHS)));
        }
        let headers = header_map(w.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        let rt = self.gateway.runtime();
        // A path named twice is warmed (and counted) once.
        let mut seen = std::collections::HashSet::new();
        let paths: Vec<String> = w.paths.into_iter().filter(|p| seen.insert(p.clone())).collect();
        let results = crate::proxy::warm(&rt, paths, &headers, w.consumer, &self.gateway.default_authority()).await;
        let stored = results.iter().filter(|r| r["stored"] == true).count();
        tracing::info!(paths = results.len(), stored, "admin cache warm-up");
        Ok(json_response(StatusCode::OK, &serde_json::json!({"stored": stored, "results": results})))
    }

    /// `GET /cache/explain?method=GET&url=/p?x=1&h=name:value&consumer=ID`.
    async fn explain(&self, query: &str) -> Result<Response<Body>, GatewayError> {
        let mut method = Method::GET;
        let mut url = None;
        let mut pairs = Vec::new();
        let mut consumer = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(&v.replace('+', " "))?;
            match k {
                "method" => {
                    method = Method::from_bytes(v.as_bytes())
                        .map_err(|_| GatewayError::BadRequest(format!("invalid method `{v}`")))?;
                }
                "url" => url = Some(v),
                "h" => {
                    let (n, val) = v
                        .split_once(':')
                        .ok_or_else(|| GatewayError::BadRequest(format!("`h` is name:value, got `{v}`")))?;
                    pairs.push((n.trim().to_string(), val.trim().to_string()));
                }
                "consumer" => consumer = Some(v),
                other => return Err(GatewayError::BadRequest(format!("unknown parameter `{other}`"))),
            }
        }
        let url = url.ok_or_else(|| GatewayError::BadRequest("expected ?url=/path or a full URL".into()))?;
        let headers = header_map(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        let doc = crate::proxy::explain(
            &self.gateway.runtime(),
            method,
            &url,
            &headers,
            consumer,
            &self.gateway.default_authority(),
        )
        .await?;
        Ok(json_response(StatusCode::OK, &doc))
    }

    /// `GET /metrics`: Prometheus text exposition (OpenMetrics).
    async fn metrics(&self) -> Response<Body> {
        let rt = self.gateway.runtime();
        rt.cache.l1.settle().await;
        let up = self.gateway.redis.as_ref().is_some_and(|r| r.is_up());
        let plugins: Vec<(String, usize)> = rt
            .config
            .routes
            .iter()
            .filter_map(|r| r.plugin.as_ref()?.loaded.as_ref())
            .map(|p| (p.name.clone(), p.live_instances()))
            .collect();
        rt.metrics.tls_expiry(&self.gateway.tls_expiry());
        rt.metrics.crl_expiry(&self.gateway.crl_expiry());
        let text = rt.metrics.render(rt.cache.stats(), up, &plugins, rt.limits.local_keys());
        let mut resp = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        resp
    }

    async fn health(&self) -> Response<Body> {
        let rt = self.gateway.runtime();
        // moka counts lazily: apply pending work so the numbers are current.
        rt.cache.l1.settle().await;
        let stats = rt.cache.stats();
        // One reading of the Redis state: `status` and `redis.connected` never disagree.
        // Degraded, not down: without Redis Weir serves from L1 and the origin.
        let (redis, status) = match &self.gateway.redis {
            None => (serde_json::json!({"configured": false, "connected": false}), "ok"),
            Some(r) => {
                let up = r.is_up();
                let json = serde_json::json!({
                    "configured": true,
                    "connected": up,
                    "breaker": r.breaker_state().as_str(),
                    "latency_ms": (r.latency().as_secs_f64() * 1e6).round() / 1e3,
                    "invalidations_subscribed": r.subscribed.load(std::sync::atomic::Ordering::Relaxed),
                    "cluster": r.settings.cluster,
                });
                (json, if up { "ok" } else { "degraded" })
            }
        };
        let (lookups, hits) = rt.metrics.recent.last_minute(self.gateway.cache_totals());
        #[allow(clippy::cast_precision_loss)]
        let ratio = (hits as f64 / lookups.max(1) as f64 * 1e4).round() / 1e4;
        json_response(
            StatusCode::OK,
            &serde_json::json!({
                "status": status,
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": self.gateway.started.elapsed().as_secs(),
                "ready": self.gateway.readiness().is_ok(),
                "routes": rt.routes.len(),
                // Lookups of the last minute answered from the cache (fresh or stale).
                "hit_rate": {
                    "window_seconds": 60,
                    "lookups": lookups,
                    "hits": hits,
                    "ratio": if lookups == 0 { serde_json::Value::Null } else { serde_json::json!(ratio) },
                },
                "l1": {"entries": stats.entries, "bytes": stats.bytes},
                "redis": redis,
                // Embedded budgets are lost on restart; say so where operators look.
                "budgets": if rt.config.budgets.is_empty() { "none" } else if rt.budgets.embedded() { "memory" } else { "redis" },
            }),
        )
    }
}

/// Normalises the URL paths (keys starting with `/`) and prefixes of an admin purge the way the
/// canonical request normalises targets; other keys are full cache keys and stay as given.
fn normalize_purge(mut p: Purge) -> Result<Purge, GatewayError> {
    use crate::proxy::canonical::{normalize_path, normalize_query};
    let target = |s: &str| -> Result<String, GatewayError> {
        let bad = |e: crate::proxy::canonical::MalformedTarget| GatewayError::BadRequest(e.to_string());
        let (path, query) = s.split_once('?').map_or((s, None), |(p, q)| (p, Some(q)));
        let mut out = normalize_path(path).map_err(bad)?;
        if let Some(q) = query {
            let q = normalize_query(q).map_err(bad)?;
            if !q.is_empty() {
                out.push('?');
                out.push_str(&q);
            }
        }
        Ok(out)
    };
    for k in p.keys.iter_mut().filter(|k| k.starts_with('/')) {
        *k = target(k)?;
    }
    for prefix in p.prefixes.iter_mut().filter(|k| k.starts_with('/')) {
        // A prefix may end inside a segment (`/products/1` covers `/products/12`): keep a
        // trailing `/` and do not resolve a final dot segment the user did not write.
        let slash = prefix.ends_with('/');
        let mut n = target(prefix)?;
        if slash && !n.ends_with('/') {
            n.push('/');
        }
        *prefix = n;
    }
    Ok(p)
}

/// `%XX` escapes decoded (the rest as is); invalid UTF-8 or a bad escape is a 400.
/// An admin call's JSON body, at most `limit` bytes; errors say what the body must look like.
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    what: &str,
    shape: &str,
) -> Result<T, GatewayError> {
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| GatewayError::BadRequest(format!("cannot read {what} request: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| GatewayError::BadRequest(format!("{what} body must be {shape}: {e}")))
}

fn header_map<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<http::HeaderMap, GatewayError> {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| GatewayError::BadRequest(format!("invalid header name `{k}`")))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| GatewayError::BadRequest(format!("invalid value for `{k}`")))?;
        h.append(name, value);
    }
    Ok(h)
}

fn percent_decode(s: &str) -> Result<String, GatewayError> {
    let bad = || GatewayError::BadRequest(format!("invalid escape in `{s}`"));
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}
