//! Phase 6: where every upstream request leaves — the client's miss, a coalesced leader's fetch,
//! a stale refresh, a revalidation, a pass-through, a write, a tunnel. `count: misses` limits,
//! the route's connection slots and the payer's budget lease all attach in `upstream`, so no
//! path reaches the origin around them.

use bytes::Bytes;
use http::header;
use http::request::Parts;
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Limited};

use super::body::{self, ClientBody, IdleTimeout, IdleTimeoutError, WithPermit};
use super::context::{Hop, Purpose, RequestCtx};
use super::headers::{add_via, strip_hop_by_hop};
use super::meter;
use crate::error::GatewayError;
use crate::runtime::RouteRuntime;
use crate::upstream::{Pooled, SendFailure};
use crate::Body;

/// Set when an upstream connection starts writing the request.
type Asked = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// Phase 6: **every** upstream request leaves through here — the client's miss, a coalesced
/// leader's fetch, a stale refresh, a revalidation, a pass-through, a write, a tunnel — so the
/// limits and budgets that attach here cannot be bypassed by a path nobody thought of.
///
/// A request whose body was never sent (`body: None`) and that is idempotent is replayed once
/// on another upstream when the first refused the connection.
pub(crate) async fn upstream(
    ctx: &std::sync::Arc<RequestCtx>,
    purpose: Purpose,
    parts: Parts,
    body: Option<Body>,
) -> Result<Response<Body>, GatewayError> {
    let route = ctx.route();
    // `count: misses` limits: charged for every request that reaches the origin on a client's
    // behalf — an upgrade included, whatever the origin answers (a tunnel is never a way around
    // a limit). Only Weir's own background refreshes are not the client's.
    if !route.route.rate_limit_misses.is_empty() && !ctx.system && purpose != Purpose::Refresh {
        super::limits(ctx, true).await?;
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
    let (sent, metered, permit) = match meter::upstream_budget(ctx, purpose).await? {
        None => (send_timed(ctx, purpose, parts, body, None).await, None, permit),
        Some((_, guard)) => {
            // A budgeted call, once it leaves, runs to its answer in a task of its own, even if
            // the client hangs up: the origin's answer decides what is charged. Cut short, the
            // request could reach the origin's socket and never be served (a server drops a
            // request whose connection closed before it read it), or be served and never known.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut guard = guard;
                // The guard learns whether the request reached a connection: a call that never
                // did (the upstream was refused, say) is not charged.
                let asked = guard.asked_flag();
                let sent = send_timed(&ctx, purpose, parts, body, Some(&asked)).await;
                let Some(b) = &ctx.route().route.budget else { return };
                let metered = meter::at_head(&ctx, b, guard, sent.as_ref().ok().map(|r| r.status().as_u16())).await;
                // The connection slot stays with the call until it ends, answered or not.
                if let Err((Ok(resp), Some(guard), permit)) = tx.send((sent, metered, permit)) {
                    // The client left and the call is priced from its body: a metered body
                    // dropped unread reads the rest itself and prices it (`body::Metered`), so the
                    // price is the answer's, not `max_cost`.
                    let idle = ctx.route().route.timeouts.idle;
                    drop(meter::meter(
                        &ctx,
                        guard,
                        resp.map(|b| WithPermit::new(IdleTimeout::new(b, idle), permit).boxed()),
                    ));
                }
            });
            match rx.await {
                Ok(answer) => answer,
                // The task ended without answering: the runtime is shutting down.
                Err(_) => {
                    return Err(GatewayError::UpstreamUnavailable {
                        upstream: route.upstreams.url(0).to_string(),
                        reason: "the upstream call was cut short".into(),
                    })
                }
            }
        }
    };
    match sent {
        Ok(resp) => {
            let idle = route.route.timeouts.idle;
            let resp = if purpose == Purpose::Tunnel {
                // A tunnel keeps the slot for its whole life: one clone for the body (an answer
                // that is not 101), one for the tunnel's task (`forward`).
                let permit = std::sync::Arc::new(permit);
                let mut resp = resp.map(|b| WithPermit::new(IdleTimeout::new(b, idle), permit.clone()).boxed());
                resp.extensions_mut().insert(UpstreamSlot { _permit: permit });
                resp
            } else {
                resp.map(|b| WithPermit::new(IdleTimeout::new(b, idle), permit).boxed())
            };
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

/// `send_with_retry`, with the hop it made recorded for the log.
async fn send_timed(
    ctx: &RequestCtx,
    purpose: Purpose,
    parts: Parts,
    body: Option<Body>,
    asked: Option<&Asked>,
) -> Result<Response<crate::upstream::Pooled>, GatewayError> {
    let started = std::time::Instant::now();
    send_with_retry(ctx.route(), parts, body, asked).await.map(|(target, resp)| {
        if purpose != Purpose::Refresh {
            let _ = ctx.hop.set(Hop { target, status: resp.status().as_u16(), took: started.elapsed() });
        }
        resp
    })
}

/// The route's upstream connection slot an upgrade answer carries to its tunnel.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamSlot {
    _permit: std::sync::Arc<tokio::sync::OwnedSemaphorePermit>,
}

/// The response and which target gave it.
async fn send_with_retry(
    route: &RouteRuntime,
    parts: Parts,
    body: Option<Body>,
    asked: Option<&Asked>,
) -> Result<(usize, Response<Pooled>), GatewayError> {
    let no_body = body.is_none();
    let body = body.unwrap_or_else(empty);
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    let retry_head = (no_body && idempotent && route.upstreams.len() > 1).then(|| clone_head(&parts));
    let first = route.upstreams.pick(None);
    match send(route, first, parts, body, asked).await {
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
            match send(route, second, head, empty(), asked).await {
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

enum SendError {
    Connect(String),
    Other(GatewayError),
}

async fn send(
    route: &RouteRuntime,
    i: usize,
    mut parts: Parts,
    body: Body,
    asked: Option<&Asked>,
) -> Result<Response<Pooled>, SendError> {
    if route.route.upstream_host_own {
        // A SaaS upstream routes by its own name, not the gateway's.
        if let Ok(v) = http::HeaderValue::from_str(route.upstreams.url(i).authority.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let after = route.route.timeouts.response;
    // The upstream's name is formatted only for an error: it is not free on the hot path.
    let upstream = || route.upstreams.url(i).to_string();
    let started = std::time::Instant::now();
    let body = match asked {
        Some(flag) => crate::upstream::AskedBody::new(body, flag.clone()).boxed(),
        None => body,
    };
    match tokio::time::timeout(after, route.upstreams.send(i, parts, body)).await {
        Err(_) => Err(SendError::Other(GatewayError::UpstreamTimeout { upstream: upstream(), after })),
        Ok(Ok(resp)) => {
            route.metrics.upstream(started.elapsed());
            route.upstreams.mark_up(i);
            Ok(resp)
        }
        Ok(Err(SendFailure::Connect(e))) if tls_failure(&*e) => {
            // The reason is for the operator, not the client.
            tracing::warn!(upstream = %upstream(), "TLS to the upstream failed: {}", error_chain(&*e));
            Err(SendError::Other(GatewayError::UpstreamTls { upstream: upstream() }))
        }
        Ok(Err(SendFailure::Connect(e))) => Err(SendError::Connect(error_chain(&*e))),
        Ok(Err(SendFailure::Request(e))) => Err(SendError::Other(classify_send_error(&e, route, upstream()))),
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

pub(crate) fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

pub(crate) fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}
