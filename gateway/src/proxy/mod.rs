//! The request pipeline. `handle` runs DESIGN.md's phases 1–6 in order over one per-request
//! context (`RequestCtx`); each phase is a function that answers `handle` with what it found —
//! `Accepted`, a route, a consumer, a limit decision, the cache's or the upstream's answer — and
//! never calls the next phase. Errors become responses in `handle` only. Phases 7–9 run from the
//! response body's completion (`body::Completion`): it fires when the body ends, fails or is
//! dropped, and counts, logs and exports the request; the store (`cached::fill`) and the
//! settle (`meter`) ride the same body and finish with it.
//!
//! One file answers each question:
//! - where the key is chosen: `cached` (`choose_key`, policy then plugin); `cache::key` builds it
//! - where the TTL and storability are decided: `cache::policy::decide` (policy then plugin)
//! - where limits are checked and their headers built: `limit` (phase 3 and, for
//!   `count: misses`, in `send::upstream`)
//! - where the payer is chosen and the lease reserved, settled and guarded: `meter`
//! - where errors become responses: `handle` (rendered by `error`)
//! - where the upstream request leaves: `send::upstream`
//!
//! Files in phase order: `canonical` and `headers` (1), `context`, `cached` (4–8: `respond`,
//! `fill`, `invalidate`), `forward` and `tunnel` (6–7 without a cache), `send` (6), `meter`
//! (6, 9), `body` (7–9).

pub(crate) mod body;
mod cached;
pub mod canonical;
mod context;
mod forward;
pub mod headers;
mod meter;
mod send;
#[cfg(test)]
mod tests;
mod tunnel;

pub use cached::ops::{explain, warm, MAX_WARM_PATHS};
pub use context::{ConnHold, ConnInfo, Hop, PeerText, Purpose, RequestCtx};
pub(crate) use send::{content_length, empty, finish_response, request_body, upstream};

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use self::body::ClientBody;
use self::canonical::Canonical;
use self::headers::header_bytes;
use crate::config::{ConsumerFrom, ConsumerSource};
use crate::error::{ConsumerMissing, GatewayError};
use crate::limit::Decision;
use crate::observe::{Ids, Record, X_REQUEST_ID};
use crate::router::RouteMatch;
use crate::runtime::{Gateway, RouteRuntime, Runtime};
use crate::Body;

/// Entry point from the listeners: phases 1–6, the one place errors become responses, and the
/// completion (7–9) attached to the response body. Never fails.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let started = std::time::Instant::now();
    let rt = gw.runtime();
    // A cheap clone (no allocation for a standard method), kept for the log.
    let method = req.method().clone();
    let peer = conn.peer;
    let hsts = conn.tls.as_ref().and_then(|t| t.hsts.clone());
    let tls_version = conn.tls.as_ref().map(|t| t.version);
    // The listener is draining: an HTTP/1.1 client is told to leave this connection after the
    // answer (HTTP/2 gets GOAWAY), not left to meet the close with its next request.
    let close = conn.hold.as_ref().is_some_and(|h| h.closing()) && req.version() <= http::Version::HTTP_11;
    let trusted = rt.config.server.trusted_proxies.iter().any(|n| n.contains(&conn.peer.ip().to_canonical()));
    let spans = gw.span_exporter();
    let access = gw.access_log();
    let sinks =
        (access.is_some() || spans.is_some()).then(|| body::Sinks { log: access.cloned(), spans: spans.cloned() });
    let ids = Ids::of(req.headers(), trusted, sinks.as_ref().map(|_| spans.is_some()));
    let started_at = sinks.as_ref().map(|_| std::time::SystemTime::now());

    let mut served = phases(&rt, req, conn, trusted, &ids, sinks.is_some()).await;

    // Errors become responses here, and only here. On a cached route an error of phases 4–6
    // also says what the cache did, and is annotated like any answer of those phases.
    let cached_route = served.ctx.as_ref().is_some_and(|c| c.route().route.cache.is_some());
    let mut failed_upstream = None;
    let mut resp = match served.result {
        Ok(resp) => resp,
        Err(e) => {
            failed_upstream = e.upstream().map(str::to_string);
            let path = match (&served.ctx, &served.uri) {
                (Some(c), _) => c.canon.path(),
                (None, Some(u)) => u.path(),
                (None, None) => "",
            };
            if failed_upstream.is_some() {
                // The client's answer names no upstream: the address and the cause are logged.
                tracing::warn!(%method, path, %peer, error = %e, "upstream request failed");
            } else {
                tracing::debug!(%method, path, %peer, error = %e, "request failed");
            }
            let status = (cached_route && served.annotate.is_some()).then(|| cached::error_status(&e)).flatten();
            let mut r = e.into_response();
            match status {
                Some(v) => {
                    r.headers_mut().insert(cached::CACHE_STATUS.clone(), v);
                }
                None => served.annotate = None,
            }
            r
        }
    };
    if let (Some(ctx), Some(limit_headers)) = (&served.ctx, served.annotate) {
        annotate(ctx, &mut resp, limit_headers).await;
    }
    // Every response Weir made itself carries its error code; an upstream's never does.
    let error = resp.extensions().get::<crate::error::Code>().map(|c| c.0);
    if let Some(v) = hsts {
        resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, v);
    }
    // (Not on a `101`: the connection becomes the tunnel's.)
    if close && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if !served.ctx.as_ref().is_some_and(|c| c.id_answered.load(std::sync::atomic::Ordering::Relaxed)) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), ids.request_id.clone());
    }

    // Phases 7–9: the completion counts, logs and exports when the body is done.
    let route = served.ctx.as_ref().map(|c| c.route);
    let (counters, stats) = match route {
        Some(i) => (&rt.routes[i].requests, &rt.routes[i].stats),
        None => (&rt.no_route_requests, &rt.no_route_stats),
    };
    counters.inc(resp.status().as_u16());
    stats.duration.observe(started.elapsed().as_secs_f64());
    let record = sinks.map(|sinks| {
        let ctx = served.ctx.as_deref();
        let hop = ctx.and_then(|c| c.hop.get().copied());
        // With a sink there is always an early trace; the context's is the same one.
        let trace = ctx
            .and_then(|c| c.trace.get().copied())
            .or(ids.trace)
            .unwrap_or_else(|| crate::observe::Trace::of(&http::HeaderMap::new(), false));
        let upstream = ctx.zip(hop).map(|(c, h)| c.route().upstreams.url(h.target).to_string()).or(failed_upstream);
        let client_ip = Some(ctx.map_or_else(|| peer.ip().to_canonical(), |c| c.client_ip));
        let bytes_in = ctx.and_then(|c| c.bytes_in.clone());
        // The record takes the context's strings: moved when nothing else holds the context
        // (a hit, an error), copied otherwise (a body still streaming from a fill holds it).
        let (authority, mut path, consumer) = match (&mut served.ctx, served.target) {
            (Some(c), _) => match Arc::get_mut(c) {
                Some(c) => {
                    (std::mem::take(&mut c.canon.authority), std::mem::take(&mut c.canon.path_query), c.consumer.take())
                }
                None => (c.canon.authority.clone(), c.canon.path_query.clone(), c.consumer.clone()),
            },
            (None, Some((a, p))) => (a, p, None),
            (None, None) => served.uri.as_ref().map_or_else(Default::default, |u| {
                (u.authority().map(|a| a.to_string()).unwrap_or_default(), u.path().to_string(), None)
            }),
        };
        if !sinks.log.as_ref().is_some_and(|l| l.query) {
            if let Some(q) = path.find('?') {
                path.truncate(q);
            }
        }
        (
            sinks,
            Box::new(Record {
                ts: started_at.unwrap_or_else(std::time::SystemTime::now),
                request_id: ids.request_id.clone(),
                route: route.map(|i| rt.routes[i].label.clone()),
                method,
                authority,
                path,
                status: resp.status().as_u16(),
                cache: resp.headers().get(&cached::CACHE_STATUS).cloned(),
                upstream,
                upstream_status: hop.map(|h| h.status),
                upstream_time: hop.map(|h| h.took),
                duration: std::time::Duration::ZERO,
                bytes_in: 0,
                bytes_out: 0,
                client_ip,
                consumer,
                tls: tls_version,
                error,
                trace,
            }),
            bytes_in,
        )
    });
    // A body of known size with no log line to write is counted now (a hit, an error);
    // anything else is counted as it streams.
    let exact = resp.body().size_hint().exact();
    match (record, exact) {
        (None, Some(n)) => {
            stats.response_bytes.inc_by(n);
            resp
        }
        (record, _) => {
            let bytes = stats.response_bytes.clone();
            resp.map(|b| body::Counting::new(b, body::Completion::new(started, bytes, record)).boxed())
        }
    }
}

/// What phases 1–6 answered, and the context they built (from phase 2 on).
struct Served {
    ctx: Option<Arc<RequestCtx>>,
    /// Phase 1 finished but no route was found: the canonical authority and `path?query`, for
    /// the log (kept only when it is on).
    target: Option<(String, String)>,
    /// Phase 1 refused the head: its target as received, for the log.
    uri: Option<http::Uri>,
    /// The request got past phase 3: the rate-limit fields its answer carries.
    annotate: Option<Vec<(http::HeaderName, HeaderValue)>>,
    result: Result<Response<Body>, GatewayError>,
}

impl Served {
    fn failed(e: GatewayError) -> Served {
        Served { ctx: None, target: None, uri: None, annotate: None, result: Err(e) }
    }
}

/// Phases 1–6, in order. Each phase answers with what it found; an error ends the request.
async fn phases(
    rt: &Arc<Runtime>,
    req: Request<Incoming>,
    conn: ConnInfo,
    trusted: bool,
    ids: &Ids,
    logging: bool,
) -> Served {
    // Phase 1: limits on the head, the canonical request.
    let (mut parts, body) = req.into_parts();
    let body = ClientBody::Incoming(body);
    let Accepted { canon, debug } = match accept(rt, &mut parts, &conn, trusted) {
        Ok(a) => a,
        Err(e) => return Served { uri: Some(parts.uri), ..Served::failed(e) },
    };

    // Phase 2: the route. From here on every phase reads and extends one context.
    let idx = match route_of(rt, &canon) {
        Ok(i) => i,
        Err(e) => {
            let target = logging.then(|| (canon.authority.clone(), canon.path_query.clone()));
            return Served { target, uri: Some(parts.uri), ..Served::failed(e) };
        }
    };
    let route = &rt.routes[idx];
    let mut ctx = RequestCtx::new(rt.clone(), conn, trusted, canon, idx, debug, logging);
    ctx.request_id = Some(ids.request_id.clone());
    if let Some(t) = ids.trace {
        // A log line or a span names this trace: the upstream hop continues it.
        let _ = ctx.trace.set(t);
    }
    let admitted = admit_route(&ctx);
    // Upgrades are tunnelled on uncached routes only.
    let on_upgrade = match (&ctx.canon.upgrade, &route.route.cache) {
        (Some(_), None) if admitted.is_ok() => parts.extensions.remove::<OnUpgrade>(),
        _ => None,
    };

    // Phase 3: the consumer first (an unknown key on a required route never gets a quota),
    // then the `count: all` rate limits, all or nothing, before the cache (a hit counts too).
    let failed = match admitted.and_then(|()| consumer(&mut ctx)) {
        Ok(id) => {
            ctx.consumer = id;
            None
        }
        Err(e) => Some(e),
    };
    let ctx = Arc::new(ctx);
    if let Some(e) = failed {
        return Served { ctx: Some(ctx), ..Served::failed(e) };
    }
    let limit_headers = match limits(&ctx, false).await {
        Ok(h) => h,
        Err(e) => return Served { ctx: Some(ctx), ..Served::failed(e) },
    };

    // Phases 4–6: the cache's answer (lookup, hit, or a miss through `send::upstream`), or the
    // upstream's. Their phases 7–8 (store, invalidate) finish with the body.
    let result = if let Some(cfg) = &route.route.cache {
        cached::serve(ctx.clone(), cfg, body).await
    } else if route.route.invalidate.is_some() {
        // A write on an uncached route with `invalidate:` still purges (phase 8).
        cached::forward_and_invalidate(&ctx, body).await
    } else {
        forward::forward(&ctx, body, on_upgrade).await
    };
    Served { ctx: Some(ctx), target: None, uri: None, annotate: Some(limit_headers), result }
}

/// What phase 1 made of the request head.
struct Accepted {
    canon: Canonical,
    /// The request carried the right `Weir-Debug` token.
    debug: bool,
}

/// Phase 1: the head's size limit, the canonical request (a client's `X-Request-Id` out of it),
/// `Weir-Debug`, and a TLS connection's hold on the host it may serve.
fn accept(rt: &Runtime, parts: &mut Parts, conn: &ConnInfo, trusted: bool) -> Result<Accepted, GatewayError> {
    let server = &rt.config.server;
    let size = header_bytes(&parts.headers);
    if size > server.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge { size, limit: server.max_header_bytes });
    }
    let mut canon = Canonical::from_head(parts, conn.scheme, trusted, &server.upgrade_protocols)?;
    // The request's id and Weir's span go with the upstream head (`RequestCtx::upstream_head`);
    // a client's own id is never forwarded.
    if canon.request_id_header {
        canon.headers.remove(&X_REQUEST_ID);
    }
    // `Weir-Debug` never goes upstream; with the right token the answer explains itself.
    let asked = if canon.debug_header { canon.headers.remove(&WEIR_DEBUG) } else { None };
    let debug = match (asked, &rt.config.debug_token) {
        (Some(v), Some(token)) if token.matches(v.as_bytes()) => true,
        (Some(_), Some(_)) => {
            rt.metrics.debug_rejected.inc();
            false
        }
        _ => false,
    };
    if let Some(tls) = &conn.tls {
        // A connection opened for one name carries requests for the names its certificate
        // covers (HTTP/2 coalescing), no others. Without SNI (an IP address) there is no name
        // to hold the request to.
        if tls.sni.is_some() && !tls.cert.covers(canon.host()) {
            return Err(GatewayError::Misdirected { host: canon.host().to_string() });
        }
        if tls.revoked() {
            return Err(GatewayError::ClientCertRevoked);
        }
        if let Some(v) = tls.client.as_ref().and_then(|c| c.header.clone()) {
            canon.headers.insert(canonical::WEIR_CLIENT_CERT.clone(), v);
        }
    }
    Ok(Accepted { canon, debug })
}

/// Phase 2, on the route found: `match.scheme: https` and the route's body limit.
fn admit_route(ctx: &RequestCtx) -> Result<(), GatewayError> {
    let route = &ctx.route().route;
    if route.https_only && ctx.conn.tls.is_none() {
        return Err(GatewayError::HttpsRequired);
    }
    if let Some(limit) = route.max_request_body {
        if content_length(&ctx.canon.headers).is_some_and(|len| len > limit) {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
    }
    Ok(())
}

/// Phase 3: the route's consumer, when it names a source. A required one that is not found is
/// 401 (or 429 once this address is past `server.auth_failures`); a plugin that cannot answer
/// is 503 where the consumer is required, anonymous otherwise.
fn consumer(ctx: &mut RequestCtx) -> Result<Option<String>, GatewayError> {
    // Disjoint borrows of the context: the canonical request is written (`Weir-Consumer`).
    let (rt, canon) = (&ctx.rt, &mut ctx.canon);
    let route = &rt.routes[ctx.route];
    let Some(from) = &route.route.consumer else { return Ok(None) };
    match identify(rt, route, &ctx.conn, from, canon) {
        Ok(Some(id)) => Ok(Some(id)),
        Ok(None) if from.required => {
            // Failed credentials are counted per client address: a guesser gets 429 once past
            // `server.auth_failures`, and never reaches the origin either way.
            if let Err(retry_us) = rt.limits.auth_failure(ctx.client_ip, &rt.config.server.auth_failures) {
                return Err(GatewayError::AuthFailures { retry_after_s: retry_us.div_ceil(1_000_000).max(1) });
            }
            let missing = match &from.source {
                ConsumerSource::Header(h) => ConsumerMissing::Header(h.to_string()),
                ConsumerSource::Plugin => ConsumerMissing::Plugin,
                ConsumerSource::ClientCert => ConsumerMissing::ClientCert,
            };
            Err(GatewayError::UnknownConsumer { missing })
        }
        Err(outcome) if from.required => Err(GatewayError::IdentifyUnavailable { outcome }),
        Ok(None) | Err(_) => Ok(None),
    }
}

/// Phase 3 (`misses: false`) and phase 6 (`misses: true`): the route's rate limits of that
/// kind, for this request. `Ok`: the `RateLimit` fields for the response.
pub(crate) async fn limits(
    ctx: &RequestCtx,
    misses: bool,
) -> Result<Vec<(http::HeaderName, HeaderValue)>, GatewayError> {
    let route = ctx.route();
    let (policies, header) = if misses {
        (&route.route.rate_limit_misses, &route.ratelimit_policy[1])
    } else {
        (&route.route.rate_limit, &route.ratelimit_policy[0])
    };
    if policies.is_empty() {
        return Ok(Vec::new());
    }
    let verdict = ctx.rt.limits.admit(policies, header, &ctx.limit_subject()).await;
    if verdict.fell_back {
        route.metrics.ratelimit_fallback(&route.label);
    }
    match verdict.decision {
        Decision::Allow { headers } => Ok(headers),
        Decision::Reject { policy, retry_after_s, headers } => {
            route.metrics.ratelimit_rejected(&route.label, &policy);
            Err(GatewayError::RateLimited { policy, retry_after_s, headers })
        }
        Decision::Unavailable => Err(GatewayError::RateLimitUnavailable),
    }
}

/// What the answer says about this request only, added after the cache (never stored): Weir's
/// own quota (not the origin's), the consumer's budget balance, the debug fields.
async fn annotate(ctx: &RequestCtx, resp: &mut Response<Body>, limit_headers: Vec<(http::HeaderName, HeaderValue)>) {
    if ctx.debug {
        debug_headers(ctx, resp).await;
    }
    if !limit_headers.is_empty() {
        // Room for them at once: one growth of the map, not one per field.
        resp.headers_mut().reserve(limit_headers.len());
        for (k, v) in limit_headers {
            resp.headers_mut().insert(k, v);
        }
    }
    if let (Some(b), Some(units)) = (&ctx.route().route.budget, ctx.budget_remaining.get()) {
        if b.headers {
            if let Ok(v) = HeaderValue::from_str(&crate::budget::amount(*units).to_string()) {
                resp.headers_mut().insert(WEIR_BUDGET_REMAINING.clone(), v);
            }
        }
    }
}

/// Phase 2: the route of a canonical request, or 404 `no_route` / 405.
pub(crate) fn route_of(rt: &Runtime, canon: &Canonical) -> Result<usize, GatewayError> {
    match rt.router.route(Some(canon.host()), canon.path(), &canon.method) {
        RouteMatch::Found(i) => Ok(i),
        RouteMatch::MethodNotAllowed(allow) => {
            Err(GatewayError::MethodNotAllowed { method: canon.method.clone(), allow })
        }
        RouteMatch::NotFound => Err(GatewayError::NoRoute {
            method: canon.method.clone(),
            host: canon.authority.clone(),
            path: canon.path().to_string(),
        }),
    }
}

static WEIR_DEBUG: http::HeaderName = http::HeaderName::from_static("weir-debug");

/// `Weir-Debug-Route`, `Weir-Debug-Key` (the key the lookup used) and `Weir-Debug-TTL` (seconds
/// of freshness left on the stored entry now, negative when stale, `none` when nothing is
/// stored) — added to this response only, after the cache (never stored).
async fn debug_headers(ctx: &RequestCtx, resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    let route = ctx.route();
    if let Ok(v) = HeaderValue::from_str(&route.route.name) {
        h.insert(http::HeaderName::from_static("weir-debug-route"), v);
    }
    let key = ctx.cache_key.get();
    let value = |s: &str| {
        HeaderValue::from_str(s).unwrap_or_else(|_| {
            HeaderValue::from_str(&crate::cache::key::body_hash(s.as_bytes())).unwrap_or(HeaderValue::from_static("?"))
        })
    };
    h.insert(http::HeaderName::from_static("weir-debug-key"), value(key.map_or("none", String::as_str)));
    let ttl = match key {
        Some(k) => match ctx.rt.cache.get(k).await {
            Some((crate::cache::entry::Object::Response(e), _)) => e.ttl_secs(std::time::SystemTime::now()).to_string(),
            _ => "none".to_string(),
        },
        None => "none".to_string(),
    };
    h.insert(http::HeaderName::from_static("weir-debug-ttl"), value(&ttl));
}

pub(crate) static WEIR_CONSUMER: http::HeaderName = http::HeaderName::from_static("weir-consumer");
static WEIR_BUDGET_REMAINING: http::HeaderName = http::HeaderName::from_static("weir-budget-remaining");

/// Finds the consumer: an API key header looked up by its SHA-256 digest, or the route plugin's
/// `identify` at the request's arrival time. Forwards the verified consumer as `Weir-Consumer` (a
/// client's own was stripped by the canonical request) and, with `hide_credentials`, drops the
/// key. `Err`: the plugin gave no answer (its failure outcome).
fn identify(
    rt: &Runtime,
    route: &RouteRuntime,
    conn: &ConnInfo,
    from: &ConsumerFrom,
    canon: &mut Canonical,
) -> Result<Option<String>, &'static str> {
    use sha2::Digest as _;
    let id = match &from.source {
        ConsumerSource::Header(h) => {
            let id = canon.headers.get(h).and_then(|v| {
                let digest: [u8; 32] = sha2::Sha256::digest(v.as_bytes()).into();
                rt.config.consumers.get(&digest).cloned()
            });
            if from.hide_credentials {
                canon.headers.remove(h);
            }
            id
        }
        ConsumerSource::Plugin => {
            // Validation makes `from: plugin` need a loaded plugin.
            let Some(plugin) = cached::route_plugin(route) else { return Err("missing") };
            let req = plugin.request(&canon.plugin_parts(None));
            plugin.identify(&req, std::time::SystemTime::now()).map_err(|f| f.as_str())?
        }
        ConsumerSource::ClientCert => conn.tls.as_ref().and_then(|t| t.client.as_ref()).and_then(|c| c.id.clone()),
    };
    if let Some(id) = &id {
        if let Ok(v) = http::HeaderValue::from_str(id) {
            canon.headers.insert(WEIR_CONSUMER.clone(), v);
        }
    }
    Ok(id)
}
