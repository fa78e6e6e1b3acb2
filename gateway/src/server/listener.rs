//! Phase 1, accept: one task per listener accepts TCP connections and serves HTTP/1.1 and
//! HTTP/2 (prior knowledge) on each with upgrades enabled; graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::ServerSettings;
use crate::metrics::Held;
use crate::proxy::{ConnHold, ConnInfo};
use crate::tls::Acceptor;
use crate::Body;

/// How long after it stops accepting a listener lets just-accepted connections send their
/// first request before draining.
const SETTLE: Duration = Duration::from_millis(500);

/// hyper's own read buffer: Weir's JSON 431 (`server.max_header_bytes`, ≤ 60 KiB) triggers first.
const HYPER_MAX_BUF: usize = 64 << 10;

pub fn http_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(HYPER_MAX_BUF)
        .max_headers(256);
    let h2 = &settings.http2;
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(HYPER_MAX_BUF).unwrap_or(u32::MAX))
        .max_concurrent_streams(h2.max_concurrent_streams)
        .max_pending_accept_reset_streams(h2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(h2.max_local_error_reset_streams)
        .keep_alive_interval(h2.keep_alive_interval)
        .keep_alive_timeout(h2.keep_alive_timeout);
    b
}

/// How a listener serves: the HTTP builder, the stop signal, how long open connections may
/// finish after it, the connection slots, and its `weir_connections` gauges.
pub struct Serving {
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    pub shutdown: watch::Receiver<bool>,
    pub drain: Duration,
    pub slots: Arc<Semaphore>,
    pub gauges: crate::metrics::ConnGauges,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").field("drain", &self.drain).field("gauges", &self.gauges).finish_non_exhaustive()
    }
}

/// Accepts until `shutdown` flips, then lets open connections finish for up to `drain`. A
/// connection is accepted only with a permit of `slots` (`server.max_connections`, shared by
/// every listener): beyond it new connections wait in the kernel's accept queue. With `tls`, the
/// handshake runs in the connection's own task (a slow client never holds up `accept`).
pub async fn serve<H, F>(listener: TcpListener, tls: Option<Arc<Acceptor>>, serving: Serving, handler: H)
where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let Serving { builder, mut shutdown, drain, slots, gauges } = serving;
    let graceful = GracefulShutdown::new();
    // Set when the listener stops accepting: from then on an HTTP/1.1 answer says
    // `Connection: close` (`proxy::handle`), so a client busy on a kept-alive connection closes
    // it itself after that answer instead of the connection being closed under it when the
    // drain begins (a request sent at that moment would find it closed: the keep-alive race).
    let closing = Arc::new(AtomicBool::new(false));
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "listener has no local address");
            return;
        }
    };
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
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
                // The slot lives as long as the connection and any tunnel made of it.
                let info = ConnInfo::new(peer, local, "http").with_hold(ConnHold::new(permit, gauges.tunnel.clone(), closing.clone()));
                let (h, b, watcher) = (handler.clone(), builder.clone(), graceful.watcher());
                match &tls {
                    None => {
                        // Watched at once: a plain connection is drained like any other.
                        let fut = watcher.watch(connection(&b, TokioIo::new(stream), info, h));
                        let open = Held::new(&gauges.open);
                        tokio::spawn(async move {
                            let _open = open;
                            if let Err(e) = fut.await {
                                tracing::debug!(%peer, error = %e, "connection ended with an error");
                            }
                        });
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        let gauges = gauges.clone();
                        tokio::spawn(async move {
                            let handshake = Held::new(&gauges.handshake);
                            let accepted = acceptor.accept(stream).await;
                            drop(handshake);
                            match accepted {
                                Ok((tls_stream, conn)) => {
                                    let _open = Held::new(&gauges.open);
                                    let io = TokioIo::new(tls_stream);
                                    let fut = watcher.watch(connection(&b, io, info.with_tls(conn), h));
                                    if let Err(e) = fut.await {
                                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                                    }
                                }
                                Err((why, detail)) => {
                                    acceptor.failed(why);
                                    tracing::debug!(%peer, reason = why.as_str(), "TLS handshake failed: {detail}");
                                }
                            }
                        });
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    closing.store(true, Ordering::Relaxed);
    // A connection accepted just now may not have had its first request read yet, and a
    // graceful shutdown closes a connection with no request in flight: let such requests
    // arrive (keep-alive connections keep being served meanwhile) before asking connections
    // to finish.
    tokio::time::sleep(SETTLE.min(drain)).await;
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(%local, "all connections drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(%local, "drain timeout reached; closing remaining connections"),
    }
}

/// One connection's HTTP/1.1 or HTTP/2 (by preface; over TLS, ALPN offers both) with upgrades.
fn connection<I, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    info: ConnInfo,
    handler: H,
) -> impl hyper_util::server::graceful::GracefulConnection<Error = Box<dyn std::error::Error + Send + Sync>> + Send + 'static
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    // `map`, not `async move { Ok(fut.await) }`: an async block would copy the request's
    // future once more, into its `.await`, on every request (callgrind: 700 instructions a hit).
    let svc = service_fn(move |req| futures_util::FutureExt::map(handler(req, info.clone()), Ok::<_, Infallible>));
    builder.serve_connection_with_upgrades(io, svc).into_owned()
}
