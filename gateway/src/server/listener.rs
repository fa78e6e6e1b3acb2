//! Phase 1, accept: one task per listener accepts TCP connections and serves HTTP/1.1 and
//! HTTP/2 (prior knowledge) on each with upgrades enabled; graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ServerSettings;
use crate::proxy::ConnInfo;
use crate::Body;

/// hyper's own read buffer: Weir's JSON 431 (`server.max_header_bytes`, ≤ 60 KiB) triggers first.
const HYPER_MAX_BUF: usize = 64 << 10;

pub fn http_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(HYPER_MAX_BUF)
        .max_headers(256);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(HYPER_MAX_BUF).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    b
}

/// Accepts until `shutdown` flips, then lets open connections finish for up to `drain`.
pub async fn serve<H, F>(
    listener: TcpListener,
    builder: Arc<auto::Builder<TokioExecutor>>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    handler: H,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no local address");
            return;
        }
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let info = ConnInfo::new(peer, local, "http");
                let h = handler.clone();
                let svc = service_fn(move |req| {
                    let fut = h(req, info);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(%local, "all connections drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(%local, "drain timeout reached; closing remaining connections"),
    }
}
