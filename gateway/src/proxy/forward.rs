//! Phases 6–7 for a route without a cache: forward, stream back, and splice an allowed upgrade
//! (the tunnel's bounds are in `tunnel`).

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::ClientBody;
use super::context::{ConnHold, Purpose, RequestCtx};
use super::headers::strip_hop_by_hop;
use super::send::{empty, finish_response, request_body, upstream, UpstreamSlot};
use super::tunnel;
use crate::error::GatewayError;
use crate::limit::{TunnelRefusal, TunnelSlot};
use crate::Body;

/// Phases 6–7 for a route without a cache: forward, stream back, tunnel an allowed upgrade.
pub(super) async fn forward(
    ctx: &Arc<RequestCtx>,
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
    // A tunnel's place in the caps, taken before the origin is asked.
    let slot = match &tunnel_to {
        Some(_) => {
            let server = &ctx.rt.config.server;
            match ctx.rt.limits.tunnels.acquire(ctx.client_ip, server.max_tunnels, server.max_tunnels_per_address) {
                Ok(s) => Some(s),
                Err(TunnelRefusal::Full) => return Err(GatewayError::TunnelsBusy),
                Err(TunnelRefusal::PerAddress) => return Err(GatewayError::TooManyTunnels),
            }
        }
        None => None,
    };
    let body = request_body(ctx, body);
    let mut resp = upstream(ctx, purpose, head, body).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let (Some((client_on, _)), Some(slot)) = (tunnel_to, slot) {
            // Everything the tunnel holds, for as long as it lives: its place in the caps, the
            // client connection's slot (`server.max_connections`), the route's upstream slot
            // (`max_upstream_connections`), and a unit of `weir_connections{state="tunnel"}`.
            let held = Held {
                _slot: slot,
                _conn: ctx.conn.hold.clone(),
                _upstream: resp.extensions_mut().remove::<UpstreamSlot>(),
                _gauge: ctx.conn.hold.as_ref().map(|h| crate::metrics::Held::new(&h.tunnels)),
            };
            return Ok(tunnel(
                route.route.timeouts.idle,
                ctx.rt.config.server.max_tunnel_bytes,
                client_on,
                &mut resp,
                held,
            ));
        }
    }
    Ok(finish_response(resp))
}

/// What a tunnel's task holds until it ends.
struct Held {
    _slot: TunnelSlot,
    _conn: Option<std::sync::Arc<ConnHold>>,
    _upstream: Option<UpstreamSlot>,
    _gauge: Option<crate::metrics::Held>,
}

/// Answers 101 to the client and splices the two upgraded connections together, for as long
/// as bytes keep flowing (the route's idle timeout) and up to `server.max_tunnel_bytes`.
fn tunnel(
    idle: Duration,
    cap: u64,
    client_on: OnUpgrade,
    upstream_resp: &mut Response<Body>,
    held: Held,
) -> Response<Body> {
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
        let _held = held;
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
