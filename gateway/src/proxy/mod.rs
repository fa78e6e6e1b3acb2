//! The request path, in DESIGN.md's nine phases (numbered the same way everywhere):
//!
//! 1. accept (`server::listener`) and limits — head size (431 JSON); the **canonical request**
//!    (`canonical`) is computed once and put in the per-request context (`RequestCtx`)
//! 2. route — host / path / method → a route, or 404 `no_route` / 405; the route's body limit
//! 3. consumer and `count: all` rate limits — (with their issue)
//! 4. cache key and lookup — (`cached`) L1 → L2
//! 5. hit — served from the entry (`cached::respond`)
//! 6. miss / bypass — every upstream request leaves through one function, `upstream`: the client's
//!    miss, a coalesced fetch, a stale refresh, a revalidation, a pass-through, a write, a tunnel
//! 7. response — storage decision and store (`cached::fill`); streaming back, `Via`, upgrades
//! 8. mutation — a write's invalidation on every tier and instance (`cached::invalidate`)
//! 9. settle and log — (budgets with their issue); metrics in `handle`
//!
//! Every error is a `GatewayError`, rendered in exactly one place (`handle`).

pub(crate) mod body;
mod cached;
pub use cached::ops::{explain, warm, MAX_WARM_PATHS};
pub mod canonical;
pub mod headers;
mod meter;
mod tunnel;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use self::body::{ClientBody, IdleTimeout, IdleTimeoutError, WithPermit};
use self::canonical::Canonical;
use self::headers::{add_via, header_bytes, set_forwarding, strip_hop_by_hop};
use crate::config::{ConsumerFrom, ConsumerSource};
use crate::error::{ConsumerMissing, GatewayError};
use crate::observe::{Ids, Record, TRACEPARENT, X_REQUEST_ID};
use crate::router::RouteMatch;
use crate::runtime::{Gateway, RouteRuntime, Runtime};
use crate::Body;

/// What the listener knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
    /// How the connection's TLS was set up (`None`: plain HTTP).
    pub tls: Option<Arc<crate::tls::TlsConn>>,
    /// The peer's address as text, formatted once per connection (forwarding headers need it
    /// on every request; formatting it each time was a measurable share of proxying).
    pub peer_ip: PeerText,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr, scheme: &'static str) -> ConnInfo {
        ConnInfo { peer, local, scheme, tls: None, peer_ip: PeerText::of(peer.ip().to_canonical()) }
    }

    pub fn with_tls(self, tls: crate::tls::TlsConn) -> ConnInfo {
        ConnInfo { scheme: "https", tls: Some(Arc::new(tls)), ..self }
    }
}

/// An IP address as text in a fixed buffer (IPv6 text is at most 45 bytes), so `ConnInfo` stays `Copy`.
#[derive(Clone, Copy)]
pub struct PeerText {
    buf: [u8; 48],
    len: u8,
}

impl PeerText {
    fn of(ip: std::net::IpAddr) -> PeerText {
        let text = ip.to_string();
        let mut buf = [0u8; 48];
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        PeerText { buf, len: u8::try_from(n).unwrap_or(0) }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for PeerText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The per-request context: created once in phase 1–2 and handed to every later phase, which
/// read what earlier phases learned instead of re-deriving it. (The consumer and budget phases
/// extend it.)
#[derive(Debug)]
pub struct RequestCtx {
    pub rt: Arc<Runtime>,
    pub conn: ConnInfo,
    /// The peer is in `server.trusted_proxies`.
    pub trusted: bool,
    /// The client's address: the peer, or the first untrusted hop behind trusted proxies.
    pub client_ip: std::net::IpAddr,
    pub canon: Canonical,
    /// Index of the matched route in `rt.routes`.
    pub route: usize,
    /// The consumer identified in phase 3 (its id), if the route names a source and the key is known.
    pub consumer: Option<String>,
    /// What the consumer's budget had left after this request's call (`Weir-Budget-Remaining`).
    pub budget_remaining: std::sync::OnceLock<i64>,
    /// The request's own upstream call (not a background refresh's), for the access log.
    pub hop: std::sync::OnceLock<Hop>,
    /// Request body bytes read so far (counted only when the access log is on).
    pub bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The cache key the lookup used (Vary variant included), for `Weir-Debug-Key`: kept only
    /// when `debug`.
    pub cache_key: std::sync::OnceLock<String>,
    /// The request carried the right `Weir-Debug` token.
    pub debug: bool,
    /// Weir's own request (an admin warm-up): no consumer, no rate limit, budgets charge
    /// `_system`.
    pub system: bool,
}

/// One upstream call: which target answered, with what, how fast (to the response head).
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub target: usize,
    pub status: u16,
    pub took: Duration,
}

impl RequestCtx {
    pub fn route(&self) -> &RouteRuntime {
        &self.rt.routes[self.route]
    }

    /// `Canonical::plugin_parts` with the consumer phase 3 found.
    pub fn plugin_parts<'a>(&'a self, body: Option<&'a [u8]>) -> crate::plugin::RequestParts<'a> {
        self.canon.plugin_parts(body).with_consumer(self.consumer.as_deref())
    }

    /// The upstream request head, from the canonical request: its method, `path?query`, `Host`
    /// and end-to-end headers, plus Weir's forwarding headers and `Via`. Callers may only take
    /// away (conditionals of a cache fill) or add validators; the target is never changed.
    pub(crate) fn upstream_head(&self) -> Parts {
        let mut req = Request::new(());
        *req.method_mut() = self.canon.method.clone();
        if let Ok(uri) = Uri::builder().path_and_query(self.canon.path_query.as_str()).build() {
            *req.uri_mut() = uri;
        }
        let mut parts = req.into_parts().0;
        parts.headers = self.canon.headers.clone();
        set_forwarding(&mut parts.headers, &self.conn, Some(&self.canon.authority), self.trusted);
        add_via(&mut parts.headers, self.canon.version);
        parts
    }
}

/// Why a request goes upstream. Phase 6 decides by it who is charged (the client, or `_system`
/// for refreshes and revalidations) once limits and budgets attach to `upstream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An uncached route, or a method the cache does not serve.
    Forward,
    /// A cache miss led by this request (its waiters pay nothing).
    Miss,
    /// The cache asked the origin about a stale entry on behalf of this request.
    Revalidate,
    /// A background stale-while-revalidate refresh.
    Refresh,
    /// A request the cache stays out of (credentials, bodies, plugin bypass, overrides).
    PassThrough,
    /// A WebSocket (or other allowed) upgrade.
    Tunnel,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Forward => "forward",
            Purpose::Miss => "miss",
            Purpose::Revalidate => "revalidate",
            Purpose::Refresh => "refresh",
            Purpose::PassThrough => "pass-through",
            Purpose::Tunnel => "tunnel",
        }
    }
}

/// Entry point from the listeners. Never fails: errors become JSON responses here and only here.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let started = std::time::Instant::now();
    let rt = gw.runtime();
    // Cheap clones (no allocation), kept for the error log.
    let method = req.method().clone();
    let uri = req.uri().clone();
    let peer = conn.peer;
    let hsts = conn.tls.as_ref().and_then(|t| t.hsts.clone());
    let tls_version = conn.tls.as_ref().map(|t| t.version);
    let trusted = rt.config.server.trusted_proxies.iter().any(|n| n.contains(&conn.peer.ip().to_canonical()));
    let spans = gw.span_exporter();
    let ids = Ids::of(req.headers(), trusted, spans.is_some());
    let access = gw.access_log();
    let sinks =
        (access.is_some() || spans.is_some()).then(|| body::Sinks { log: access.cloned(), spans: spans.cloned() });
    let started_at = sinks.as_ref().map(|_| std::time::SystemTime::now());
    let mut seen = sinks.as_ref().map(|_| Seen::default());
    let (route, result) = proxy(&rt, req, conn, trusted, &ids, seen.as_mut()).await;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(%method, path = uri.path(), %peer, error = %e, "request failed");
            e.into_response()
        }
    };
    // Every response Weir made itself carries its error code (cached routes turn their errors
    // into responses before they get here); an upstream's never does.
    let error = resp.extensions().get::<crate::error::Code>().map(|c| c.0);
    if let Some(v) = hsts {
        resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, v);
    }
    resp.headers_mut().insert(X_REQUEST_ID.clone(), ids.request_id.clone());
    let (counters, stats) = match route {
        Some(i) => (&rt.routes[i].requests, &rt.routes[i].stats),
        None => (&rt.no_route_requests, &rt.no_route_stats),
    };
    counters.inc(resp.status().as_u16());
    stats.duration.observe(started.elapsed().as_secs_f64());
    let record = sinks.map(|sinks| {
        let seen = seen.unwrap_or_default();
        let mut path = seen.path.unwrap_or_else(|| uri.path().to_string());
        if !sinks.log.as_ref().is_some_and(|l| l.query) {
            if let Some(q) = path.find('?') {
                path.truncate(q);
            }
        }
        let authority = seen.authority.or_else(|| uri.authority().map(|a| a.to_string())).unwrap_or_default();
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
                upstream: seen.upstream,
                upstream_status: seen.hop.map(|h| h.status),
                upstream_time: seen.hop.map(|h| h.took),
                duration: Duration::ZERO,
                bytes_in: 0,
                bytes_out: 0,
                client_ip: Some(seen.client_ip.unwrap_or_else(|| peer.ip().to_canonical())),
                consumer: seen.consumer,
                tls: tls_version,
                traceparent: ids.traceparent.clone(),
                error,
                trace: Some(ids.trace),
            }),
            seen.bytes_in,
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
            resp.map(|b| body::Counting::new(b, body::Sent::new(started, bytes, record)).boxed())
        }
    }
}

/// What the phases learned that the access log reports (filled only when it is on).
#[derive(Debug, Default)]
pub struct Seen {
    pub authority: Option<String>,
    pub path: Option<String>,
    pub consumer: Option<String>,
    pub client_ip: Option<std::net::IpAddr>,
    pub upstream: Option<String>,
    pub hop: Option<Hop>,
    pub bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Runs the phases; also says which route answered (for metrics).
async fn proxy(
    rt: &Arc<Runtime>,
    req: Request<Incoming>,
    conn: ConnInfo,
    trusted: bool,
    ids: &Ids,
    seen: Option<&mut Seen>,
) -> (Option<usize>, Result<Response<Body>, GatewayError>) {
    match route_and_serve(rt, req, conn, trusted, ids, seen).await {
        Ok((idx, resp)) => (Some(idx), resp),
        Err(e) => (None, Err(e)),
    }
}

/// Phases 1–2 fail before a route is known (`Err`); after that the route index comes back with
/// whatever the later phases answered.
async fn route_and_serve(
    rt: &Arc<Runtime>,
    req: Request<Incoming>,
    conn: ConnInfo,
    trusted: bool,
    ids: &Ids,
    mut seen: Option<&mut Seen>,
) -> Result<(usize, Result<Response<Body>, GatewayError>), GatewayError> {
    // Phase 1: limits, then the canonical request.
    let server = &rt.config.server;
    let size = header_bytes(req.headers());
    if size > server.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge { size, limit: server.max_header_bytes });
    }
    let (mut parts, body) = req.into_parts();
    let body = ClientBody::Incoming(body);
    let mut canon = Canonical::from_head(&mut parts, conn.scheme, trusted, &server.upgrade_protocols)?;
    // The request's id and Weir's span go upstream (the client's own were replaced; its
    // `tracestate` passes unchanged).
    canon.headers.reserve(2);
    canon.headers.insert(X_REQUEST_ID.clone(), ids.request_id.clone());
    canon.headers.insert(TRACEPARENT.clone(), ids.traceparent.clone());
    // `Weir-Debug` never goes upstream; with the right token the answer explains itself.
    let debug = match (canon.headers.remove(&WEIR_DEBUG), &rt.config.debug_token) {
        (Some(v), Some(token)) if token.matches(v.as_bytes()) => true,
        (Some(_), Some(_)) => {
            rt.metrics.debug_rejected.inc();
            false
        }
        _ => false,
    };
    if let Some(s) = seen.as_deref_mut() {
        s.authority = Some(canon.authority.clone());
        s.path = Some(canon.path_query.clone());
    }
    if let Some(tls) = &conn.tls {
        // A connection opened for one name carries requests for the names its certificate
        // covers (HTTP/2 coalescing), no others. Without SNI (an IP address) there is no name
        // to hold the request to.
        if tls.sni.is_some() && !tls.cert.covers(canon.host()) {
            return Err(GatewayError::Misdirected { host: canon.host().to_string() });
        }
        if let Some(v) = tls.client.as_ref().and_then(|c| c.header.clone()) {
            canon.headers.insert(canonical::WEIR_CLIENT_CERT.clone(), v);
        }
    }

    // Phase 2: route, and the route's body limit.
    let idx = route_of(rt, &canon)?;
    let route = &rt.routes[idx];
    if route.route.https_only && conn.tls.is_none() {
        return Ok((idx, Err(GatewayError::HttpsRequired)));
    }
    if let (Some(limit), Some(len)) = (route.route.max_request_body, content_length(&canon.headers)) {
        if len > limit {
            return Ok((idx, Err(GatewayError::PayloadTooLarge { limit })));
        }
    }
    // Upgrades are tunnelled on uncached routes only.
    let on_upgrade = match (&canon.upgrade, &route.route.cache) {
        (Some(_), None) => parts.extensions.remove::<OnUpgrade>(),
        _ => None,
    };
    // Phase 3: the consumer first (an unknown key on a required route never gets a quota).
    // The client's address, found once: limits, failed credentials and the access log read it.
    let client_ip = headers::client_addr(conn.peer.ip(), &server.trusted_proxies, &canon.headers);
    let mut canon = canon;
    let consumer = match &route.route.consumer {
        None => None,
        Some(from) => match identify(rt, route, &conn, from, &mut canon) {
            Ok(Some(id)) => Some(id),
            Ok(None) if from.required => {
                // Failed credentials are counted per client address: a guesser gets 429 once
                // past `server.auth_failures`, and never reaches the origin either way.
                let now_us = crate::clock::unix_us(std::time::SystemTime::now());
                if let Err(retry_us) = rt.limits.auth_failure(client_ip, &server.auth_failures, now_us) {
                    let retry_after_s = retry_us.div_ceil(1_000_000).max(1);
                    return Ok((idx, Err(GatewayError::AuthFailures { retry_after_s })));
                }
                let missing = match &from.source {
                    ConsumerSource::Header(h) => ConsumerMissing::Header(h.to_string()),
                    ConsumerSource::Plugin => ConsumerMissing::Plugin,
                    ConsumerSource::ClientCert => ConsumerMissing::ClientCert,
                };
                return Ok((idx, Err(GatewayError::UnknownConsumer { missing })));
            }
            Err(outcome) if from.required => {
                return Ok((idx, Err(GatewayError::IdentifyUnavailable { outcome })));
            }
            Ok(None) | Err(_) => None,
        },
    };
    let ctx = Arc::new(RequestCtx {
        rt: rt.clone(),
        conn,
        trusted,
        client_ip,
        canon,
        route: idx,
        consumer,
        budget_remaining: std::sync::OnceLock::new(),
        hop: std::sync::OnceLock::new(),
        bytes_in: seen.as_ref().map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0))),
        cache_key: std::sync::OnceLock::new(),
        debug,
        system: false,
    });
    if let Some(s) = seen.as_deref_mut() {
        s.consumer = ctx.consumer.clone();
        s.client_ip = Some(ctx.client_ip);
        s.bytes_in = ctx.bytes_in.clone();
    }

    // Then `count: all` rate limits, all or nothing, before the cache (a hit counts too).
    let limit_headers = if route.route.rate_limit.is_empty() {
        Vec::new()
    } else {
        match rt.limits.admit(&ctx).await {
            Ok(h) => h,
            Err(e) => return Ok((idx, Err(e))),
        }
    };
    let mut result = if let Some(cfg) = &route.route.cache {
        // Phases 4–8 for cached routes.
        cached::serve(ctx.clone(), cfg, body).await
    } else if route.route.invalidate.is_some() {
        // A write on an uncached route with `invalidate:` still purges (phase 8).
        cached::forward_and_invalidate(&ctx, body).await
    } else {
        forward(&ctx, body, on_upgrade).await
    };
    if debug {
        if let Ok(resp) = &mut result {
            debug_headers(&ctx, resp).await;
        }
    }
    if let (Some(s), Some(hop)) = (seen, ctx.hop.get()) {
        s.upstream = Some(route.upstreams.url(hop.target).to_string());
        s.hop = Some(*hop);
    }
    // Weir's own quota, not the origin's (an origin's RateLimit fields are never stored either).
    if let Ok(resp) = &mut result {
        for (k, v) in limit_headers {
            resp.headers_mut().insert(k, v);
        }
        // Added after the cache: a stored entry never carries one consumer's balance.
        if let (Some(b), Some(units)) = (&route.route.budget, ctx.budget_remaining.get()) {
            if b.headers {
                if let Ok(v) = http::HeaderValue::from_str(&crate::budget::amount(*units).to_string()) {
                    resp.headers_mut().insert(WEIR_BUDGET_REMAINING.clone(), v);
                }
            }
        }
    }
    Ok((idx, result))
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

pub(crate) fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Upstream request head for target `i`; the request path is forwarded as the client sent it.
fn upstream_uri(route: &RouteRuntime, i: usize, parts: &Parts) -> Result<Uri, GatewayError> {
    let target = route.upstreams.url(i);
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|e| GatewayError::BadRequest(format!("cannot build upstream URI: {e}")))
}

enum SendError {
    Connect(String),
    Other(GatewayError),
}

async fn send(route: &RouteRuntime, i: usize, mut parts: Parts, body: Body) -> Result<Response<Incoming>, SendError> {
    parts.uri = upstream_uri(route, i, &parts).map_err(SendError::Other)?;
    if route.route.upstream_host_own {
        // A SaaS upstream routes by its own name, not the gateway's.
        if let Ok(v) = http::HeaderValue::from_str(route.upstreams.url(i).authority.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let req = Request::from_parts(parts, body);
    let after = route.route.timeouts.response;
    // The upstream's name is formatted only for an error: it is not free on the hot path.
    let upstream = || route.upstreams.url(i).to_string();
    let started = std::time::Instant::now();
    match tokio::time::timeout(after, route.upstreams.client.request(req)).await {
        Err(_) => Err(SendError::Other(GatewayError::UpstreamTimeout { upstream: upstream(), after })),
        Ok(Ok(resp)) => {
            route.metrics.upstream(started.elapsed());
            route.upstreams.mark_up(i);
            Ok(resp)
        }
        Ok(Err(e)) if e.is_connect() && tls_failure(&e) => {
            // The reason is for the operator, not the client.
            tracing::warn!(upstream = %upstream(), "TLS to the upstream failed: {}", error_chain(&e));
            Err(SendError::Other(GatewayError::UpstreamTls { upstream: upstream() }))
        }
        Ok(Err(e)) if e.is_connect() => Err(SendError::Connect(error_chain(&e))),
        Ok(Err(e)) => Err(SendError::Other(classify_send_error(&e, route, upstream()))),
    }
}

/// Whether a connect error came from the TLS handshake (a certificate problem, say).
/// `io::Error::source` skips the error it wraps (and hyper-rustls wraps tokio-rustls' io::Error
/// in another), so io errors are looked into with `get_ref`.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        cur = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// A failure while sending: the client's body broke a limit or stalled, or the upstream failed.
fn classify_send_error(e: &(dyn std::error::Error + 'static), route: &RouteRuntime, upstream: String) -> GatewayError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return GatewayError::PayloadTooLarge { limit: route.route.max_request_body.unwrap_or(0) };
        }
        if let Some(idle) = err.downcast_ref::<IdleTimeoutError>() {
            return GatewayError::BadRequest(format!("request body stalled: {idle}"));
        }
        cur = err.source();
    }
    GatewayError::UpstreamUnavailable { upstream, reason: error_chain(e) }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

pub(crate) fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// Phases 6–7 for a route without a cache: forward, stream back, tunnel an allowed upgrade.
async fn forward(
    ctx: &RequestCtx,
    body: ClientBody,
    on_upgrade: Option<OnUpgrade>,
) -> Result<Response<Body>, GatewayError> {
    let route = ctx.route();
    let mut head = ctx.upstream_head();
    let tunnel_to = on_upgrade.and_then(|on| ctx.canon.upgrade.clone().map(|proto| (on, proto)));
    let purpose = if let Some((_, proto)) = &tunnel_to {
        head.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        head.headers.insert(header::UPGRADE, proto.clone());
        Purpose::Tunnel
    } else {
        Purpose::Forward
    };
    let body = request_body(ctx, body);
    let mut resp = upstream(ctx, purpose, head, body).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some((client_on, _)) = tunnel_to {
            return Ok(tunnel(route.route.timeouts.idle, ctx.rt.config.server.max_tunnel_bytes, client_on, &mut resp));
        }
    }
    Ok(finish_response(resp))
}

/// The client's body for the upstream: idle-timed and limited by the route's
/// `max_request_body`; `None` when it is empty.
pub(crate) fn request_body(ctx: &RequestCtx, body: ClientBody) -> Option<Body> {
    if body.is_end_stream() {
        return None;
    }
    let route = ctx.route();
    let idle = route.route.timeouts.idle;
    let body = match route.route.max_request_body {
        Some(limit) => IdleTimeout::new(Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)), idle).boxed(),
        None => IdleTimeout::new(body, idle).boxed(),
    };
    Some(match &ctx.bytes_in {
        Some(n) => body::Counting::new(body, n.clone()).boxed(),
        None => body,
    })
}

/// Phase 6: **every** upstream request leaves through here — the client's miss, a coalesced
/// leader's fetch, a stale refresh, a revalidation, a pass-through, a write, a tunnel — so the
/// limits and budgets that attach here cannot be bypassed by a path nobody thought of.
///
/// A request whose body was never sent (`body: None`) and that is idempotent is replayed once
/// on another upstream when the first refused the connection.
pub(crate) async fn upstream(
    ctx: &RequestCtx,
    purpose: Purpose,
    parts: Parts,
    body: Option<Body>,
) -> Result<Response<Body>, GatewayError> {
    let route = ctx.route();
    // `count: misses` limits: charged for every request that reaches the origin on a client's
    // behalf — an upgrade included, whatever the origin answers (a tunnel is never a way around
    // a limit). Only Weir's own background refreshes are not the client's.
    if !route.route.rate_limit_misses.is_empty() && !ctx.system && purpose != Purpose::Refresh {
        ctx.rt.limits.admit_miss(ctx).await?;
    }
    // The route's connection slots (`max_upstream_connections`): a slot is held until the
    // response body ends, so a slow origin cannot take every socket the process has.
    let slots = route.upstream_slots.clone();
    let permit = match slots.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => match tokio::time::timeout(route.route.timeouts.connect, slots.acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(GatewayError::UpstreamBusy {
                    route: route.route.name.clone(),
                    limit: route.route.max_upstream_connections,
                })
            }
        },
    };
    // The budget (phase 6): reserved before the call leaves, by a guard that settles it exactly
    // once — at the head, at the body's end, or when dropped (`meter`).
    let budget = meter::upstream_budget(ctx, purpose).await?;
    let started = std::time::Instant::now();
    let sent = send_with_retry(route, parts, body).await.map(|(target, resp)| {
        if purpose != Purpose::Refresh {
            let _ = ctx.hop.set(Hop { target, status: resp.status().as_u16(), took: started.elapsed() });
        }
        resp
    });
    let metered = match budget {
        Some((b, guard)) => meter::at_head(ctx, b, guard, sent.as_ref().ok().map(|r| r.status().as_u16())).await,
        None => None,
    };
    match sent {
        Ok(resp) => {
            let idle = route.route.timeouts.idle;
            let resp = resp.map(|b| WithPermit::new(IdleTimeout::new(b, idle), permit).boxed());
            Ok(match metered {
                Some(guard) => meter::meter(ctx, guard, resp),
                None => resp,
            })
        }
        Err(e) => {
            tracing::debug!(route = %route.route.name, purpose = purpose.as_str(), error = %e, "upstream request failed");
            Err(e)
        }
    }
}

/// The response and which target gave it.
async fn send_with_retry(
    route: &RouteRuntime,
    parts: Parts,
    body: Option<Body>,
) -> Result<(usize, Response<Incoming>), GatewayError> {
    let no_body = body.is_none();
    let body = body.unwrap_or_else(empty);
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let retry_head = (no_body && idempotent && route.upstreams.len() > 1).then(|| clone_head(&parts));
    let first = route.upstreams.pick(None);
    match send(route, first, parts, body).await {
        Ok(r) => Ok((first, r)),
        Err(SendError::Connect(reason)) => {
            route.upstreams.mark_down(first);
            let Some(head) = retry_head else {
                return Err(GatewayError::UpstreamUnavailable {
                    upstream: route.upstreams.url(first).to_string(),
                    reason,
                });
            };
            let second = route.upstreams.pick(Some(first));
            tracing::info!(from = %route.upstreams.url(first), to = %route.upstreams.url(second), "retrying on another upstream");
            match send(route, second, head, empty()).await {
                Ok(r) => Ok((second, r)),
                Err(SendError::Connect(reason)) => {
                    route.upstreams.mark_down(second);
                    Err(GatewayError::UpstreamUnavailable { upstream: route.upstreams.url(second).to_string(), reason })
                }
                Err(SendError::Other(e)) => Err(e),
            }
        }
        Err(SendError::Other(e)) => Err(e),
    }
}

/// The upstream's response as the client gets it: hop-by-hop removed, `Via`.
pub(crate) fn finish_response(resp: Response<Body>) -> Response<Body> {
    let (mut rparts, rbody) = resp.into_parts();
    let version = rparts.version;
    strip_hop_by_hop(&mut rparts.headers);
    add_via(&mut rparts.headers, version);
    rparts.extensions = http::Extensions::new();
    Response::from_parts(rparts, rbody)
}

pub(crate) fn clone_head(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Answers 101 to the client and splices the two upgraded connections together, for as long
/// as bytes keep flowing (the route's idle timeout) and up to `server.max_tunnel_bytes`.
fn tunnel(idle: Duration, cap: u64, client_on: OnUpgrade, upstream_resp: &mut Response<Body>) -> Response<Body> {
    let upstream_on = hyper::upgrade::on(&mut *upstream_resp);
    let mut out = Response::new(empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = upstream_resp.headers().clone();
    let proto = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut headers);
    if let Some(p) = proto {
        headers.insert(header::UPGRADE, p);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    *out.headers_mut() = headers;
    tokio::spawn(async move {
        match tokio::try_join!(client_on, upstream_on) {
            Ok((c, u)) => {
                let meter = tunnel::Meter::new(cap);
                let mut c = tunnel::Metered::new(TokioIo::new(c), meter.clone());
                let mut u = tunnel::Metered::new(TokioIo::new(u), meter.clone());
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut c, &mut u) => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "upgraded connection closed with an error");
                        }
                    }
                    () = meter.idle_for(idle) => tracing::debug!(?idle, "upgraded connection idle: closed"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    out
}
