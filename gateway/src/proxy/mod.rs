//! The request path: phases run top to bottom for every client request.
//!
//! 1. limits    — request head size (431 JSON beyond `server.max_header_bytes`)
//! 2. route     — host / path / method → a route, or 404 `no_route` / 405
//! 3. consumer  — (rate limits, budgets: later) who pays and whether they may
//! 4. cache     — (`cached`) key, lookup, hit / stale / revalidate / coalesced miss, store
//! 5. forward   — hop-by-hop removal, forwarding headers, upstream choice, one retry
//!    for idempotent requests that failed to connect, timeouts, streaming both ways
//! 6. respond   — hop-by-hop removal, `Via`, WebSocket tunnel on 101
//!
//! Every error is a `GatewayError`, rendered in exactly one place (`handle`).

pub(crate) mod body;
mod cached;
pub mod headers;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use self::body::{IdleTimeout, IdleTimeoutError};
use self::headers::{add_via, header_bytes, set_forwarding, strip_hop_by_hop, upgrade_protocol};
use crate::error::GatewayError;
use crate::router::RouteMatch;
use crate::runtime::{Gateway, RouteRuntime, Runtime};
use crate::Body;

/// What the listener knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub scheme: &'static str,
    /// The peer's address as text, formatted once per connection (forwarding headers need it
    /// on every request; formatting it each time was a measurable share of proxying).
    pub peer_ip: PeerText,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr, scheme: &'static str) -> ConnInfo {
        ConnInfo { peer, local, scheme, peer_ip: PeerText::of(peer.ip().to_canonical()) }
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

/// Entry point from the listeners. Never fails: errors become JSON responses here and only here.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let rt = gw.runtime();
    // Cheap clones (no allocation), kept for the error log.
    let method = req.method().clone();
    let uri = req.uri().clone();
    let (route, result) = proxy(&rt, req, conn).await;
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(%method, path = uri.path(), peer = %conn.peer, error = %e, "request failed");
            e.into_response()
        }
    };
    let counters = route.map_or(&rt.no_route_requests, |i| &rt.routes[i].requests);
    counters.inc(resp.status().as_u16());
    resp
}

/// The host the client addressed: the URI authority (HTTP/2, absolute-form) or `Host`.
/// Routing, cache keys and write invalidation all use this one answer.
pub(crate) fn request_host<'a>(uri: &'a Uri, headers: &'a http::HeaderMap) -> Option<&'a str> {
    uri.authority().map(|a| a.as_str()).or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// Runs the phases; also says which route answered (for metrics).
async fn proxy(
    rt: &Arc<Runtime>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> (Option<usize>, Result<Response<Body>, GatewayError>) {
    match route_and_serve(rt, req, conn).await {
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
) -> Result<(usize, Result<Response<Body>, GatewayError>), GatewayError> {
    // Phase 1: limits.
    let limit = rt.config.server.max_header_bytes;
    let size = header_bytes(req.headers());
    if size > limit {
        return Err(GatewayError::HeadersTooLarge { size, limit });
    }

    // Phase 2: route.
    let host = request_host(req.uri(), req.headers());
    let idx = match rt.router.route(host, req.uri().path(), req.method()) {
        RouteMatch::Found(i) => i,
        RouteMatch::MethodNotAllowed(allow) => {
            return Err(GatewayError::MethodNotAllowed { method: req.method().clone(), allow })
        }
        RouteMatch::NotFound => {
            return Err(GatewayError::NoRoute {
                method: req.method().clone(),
                host: host.unwrap_or_default().to_string(),
                path: req.uri().path().to_string(),
            })
        }
    };
    let route = &rt.routes[idx];

    let trusted = rt.config.server.trusted_proxies.iter().any(|n| n.contains(&conn.peer.ip().to_canonical()));
    // Phase 3 (consumer: rate limits, budgets) arrives with its issue. Phase 4: cache.
    if let Some(cfg) = &route.route.cache {
        return Ok((idx, cached::serve(rt, idx, cfg, req, conn, trusted).await));
    }
    // Phases 5–6: forward and respond (a write on a route with `invalidate:` then purges).
    if route.route.invalidate.is_some() {
        return Ok((idx, cached::forward_and_invalidate(rt, idx, req, conn, trusted).await));
    }
    Ok((idx, forward(route, req, conn, trusted).await))
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
        Ok(Err(e)) if e.is_connect() => Err(SendError::Connect(error_chain(&e))),
        Ok(Err(e)) => Err(SendError::Other(classify_send_error(&e, route, upstream()))),
    }
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

async fn forward(
    route: &RouteRuntime,
    mut req: Request<Incoming>,
    conn: ConnInfo,
    trusted: bool,
) -> Result<Response<Body>, GatewayError> {
    // WebSocket and other upgrades are tunnelled on uncached HTTP/1.1 routes only.
    let upgrade = (req.version() == Version::HTTP_11 && route.route.cache.is_none())
        .then(|| upgrade_protocol(req.headers()))
        .flatten();
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    if let (Some(limit), Some(len)) = (route.route.max_request_body, content_length(&parts.headers)) {
        if len > limit {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
    }
    prepare_head(&mut parts, conn, trusted, upgrade.as_ref());
    let (body, no_body) = request_body(route, body);
    let mut resp = send_upstream(route, parts, body, no_body).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_on) = client_upgrade {
            return Ok(tunnel(client_on, &mut resp));
        }
    }
    Ok(finish_response(route, resp))
}

/// The client's body for the upstream: idle-timed, limited by the route; `true` when empty.
fn request_body(route: &RouteRuntime, body: Incoming) -> (Body, bool) {
    if body.is_end_stream() {
        return (empty(), true);
    }
    let idle = route.route.timeouts.idle;
    let b = match route.route.max_request_body {
        Some(limit) => IdleTimeout::new(Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)), idle).boxed(),
        None => IdleTimeout::new(body, idle).boxed(),
    };
    (b, false)
}

/// Turns the client's request head into the upstream's: hop-by-hop removal, `Host` as the
/// client addressed it, forwarding headers, `Via`, and the upgrade headers when tunnelling.
pub(crate) fn prepare_head(parts: &mut Parts, conn: ConnInfo, trusted: bool, upgrade: Option<&HeaderValue>) {
    // HTTP/2 clients send no Host; the upstream must still see the host the client addressed.
    let host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    strip_hop_by_hop(&mut parts.headers);
    if let Some(h) = &host {
        parts.headers.insert(header::HOST, h.clone());
    }
    set_forwarding(&mut parts.headers, &conn, host.as_ref().and_then(|h| h.to_str().ok()), trusted);
    add_via(&mut parts.headers, parts.version);
    if let Some(proto) = upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
}

/// Sends to an upstream of the route; a request whose body was never sent (`no_body`) and that
/// is idempotent is replayed once on another upstream when the first refused the connection.
pub(crate) async fn send_upstream(
    route: &RouteRuntime,
    parts: Parts,
    body: Body,
    no_body: bool,
) -> Result<Response<Incoming>, GatewayError> {
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let retry_head = (no_body && idempotent && route.upstreams.len() > 1).then(|| clone_head(&parts));
    let first = route.upstreams.pick(None);
    match send(route, first, parts, body).await {
        Ok(r) => Ok(r),
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
                Ok(r) => Ok(r),
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

/// The upstream's response as the client gets it: hop-by-hop removed, `Via`, idle-timed body.
pub(crate) fn finish_response(route: &RouteRuntime, resp: Response<Incoming>) -> Response<Body> {
    let (mut rparts, rbody) = resp.into_parts();
    let version = rparts.version;
    strip_hop_by_hop(&mut rparts.headers);
    add_via(&mut rparts.headers, version);
    rparts.extensions = http::Extensions::new();
    Response::from_parts(rparts, IdleTimeout::new(rbody, route.route.timeouts.idle).boxed())
}

pub(crate) fn clone_head(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Answers 101 to the client and splices the two upgraded connections together.
fn tunnel(client_on: hyper::upgrade::OnUpgrade, upstream_resp: &mut Response<Incoming>) -> Response<Body> {
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
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(error = %e, "upgraded connection closed with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    out
}
