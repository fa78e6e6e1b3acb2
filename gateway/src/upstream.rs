//! Upstream selection and connections: round robin over a route's URLs, passive health (an
//! upstream that refused a connection is skipped for a cool-down), and a pool of keep-alive
//! connections per target.
//!
//! The pool is Weir's own rather than hyper-util's legacy `Client`: that client keys its pool by
//! `(Scheme, Authority)` and hashes the authority with SipHash on every checkout and check-in,
//! goes through a checkout/connect race and, for HTTP/1, spawns a task per request to wait for
//! the connection to become idle — about 9,500 instructions of a 54,000-instruction proxied
//! request (callgrind, `bench/gate.py`). A route already knows its targets by index, so here a
//! checkout is a lock and a `Vec::pop` on that target's idle list, and a connection goes back
//! when the response body it carried has been read to its end (an abandoned body closes it).
//! HTTP/2 upstreams (ALPN `h2`) share one multiplexed connection per target.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::{Body, BoxError};

#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// How long an upstream that failed to connect is skipped.
pub const COOL_DOWN: Duration = Duration::from_secs(10);

/// How long a keep-alive connection may sit unused before the pool closes it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often idle connections past `IDLE_TIMEOUT` (or closed by the upstream) are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Target {
    url: UpstreamUrl,
    /// `scheme://authority/`, what the connector dials.
    dial: Uri,
    /// Milliseconds since `UpstreamPool::epoch` until which the target is skipped; 0 = healthy.
    down_until_ms: AtomicU64,
}

/// One target's connections not in use.
#[derive(Default)]
struct Idle {
    /// HTTP/1 connections, most recently used last.
    h1: Vec<(http1::SendRequest<Body>, Instant)>,
    /// The target's HTTP/2 connection, shared by every request.
    h2: Option<http2::SendRequest<Body>>,
}

impl Idle {
    /// Forgets the HTTP/2 connection once it has closed.
    fn drop_closed_h2(&mut self) {
        if self.h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
            self.h2 = None;
        }
    }
}

/// Whether an idle HTTP/1 connection may carry another request: the upstream has not closed
/// it and it has not sat unused past `IDLE_TIMEOUT`.
fn reusable(tx: &http1::SendRequest<Body>, since: Instant) -> bool {
    !tx.is_closed() && since.elapsed() < IDLE_TIMEOUT
}

/// Every target's idle connections, shared with the bodies that bring theirs back and with
/// the sweeper.
struct Conns {
    targets: Vec<Mutex<Idle>>,
    /// Dropped with the pool's connections: its sweeper ends then, not at its next tick.
    _gone: tokio::sync::oneshot::Sender<()>,
}

impl Conns {
    fn lock(&self, i: usize) -> MutexGuard<'_, Idle> {
        // A panic while holding the lock leaves a valid `Idle`: keep using it.
        self.targets[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_in(&self, i: usize, tx: http1::SendRequest<Body>) {
        if !tx.is_closed() {
            self.lock(i).h1.push((tx, Instant::now()));
        }
    }

    /// Drops idle connections that the upstream closed or that sat unused too long.
    fn sweep(&self) {
        for i in 0..self.targets.len() {
            let mut idle = self.lock(i);
            idle.h1.retain(|(tx, since)| reusable(tx, *since));
            idle.drop_closed_h2();
        }
    }
}

pub struct UpstreamPool {
    targets: Vec<Target>,
    next: AtomicUsize,
    epoch: Instant,
    connector: HttpsConnector<HttpConnector>,
    conns: Arc<Conns>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// The sweeper's end of `Conns::_gone`, taken when the first connection is made.
    sweeper: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// `timeouts.connect`: for the whole connection, TLS and HTTP/2 handshakes included.
    connect_timeout: Duration,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool").field("targets", &self.targets).finish_non_exhaustive()
    }
}

/// Why a request did not get a response head from the upstream.
#[derive(Debug)]
pub enum SendFailure {
    /// No connection: refused, timed out, DNS, or the TLS handshake.
    Connect(BoxError),
    /// The connection failed while the request was sent or the response awaited.
    Request(hyper::Error),
}

/// A connection taken from the pool or just made.
enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl UpstreamPool {
    /// A pool over `urls`: a connection must be made (TCP, TLS, HTTP/2 handshake) within
    /// `connect`; `https://` ones use `tls`.
    pub fn new(urls: &[UpstreamUrl], connect: Duration, tls: &crate::tls::UpstreamTls) -> UpstreamPool {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect));
        http.set_nodelay(true);
        http.enforce_http(false);
        let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((*tls.config).clone()).https_or_http();
        let b = match &tls.server_name {
            Some(n) => b.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(n.clone())),
            None => b,
        };
        let connector = if tls.http2 {
            b.enable_all_versions().wrap_connector(http)
        } else {
            b.enable_http1().wrap_connector(http)
        };
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        let targets: Vec<Target> = urls
            .iter()
            .map(|u| Target {
                url: u.clone(),
                dial: Uri::builder()
                    .scheme(u.scheme.clone())
                    .authority(u.authority.clone())
                    .path_and_query("/")
                    .build()
                    .unwrap_or_default(),
                down_until_ms: AtomicU64::new(0),
            })
            .collect();
        let (gone, sweeper) = tokio::sync::oneshot::channel();
        UpstreamPool {
            conns: Arc::new(Conns {
                targets: targets.iter().map(|_| Mutex::new(Idle::default())).collect(),
                _gone: gone,
            }),
            targets,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            connector,
            h1: http1::Builder::new(),
            h2,
            sweeper: Mutex::new(Some(sweeper)),
            connect_timeout: connect,
        }
    }
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn url(&self, i: usize) -> &UpstreamUrl {
        &self.targets[i].url
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Next healthy target in round-robin order, never `avoid`; when all are cooling down, the
    /// round-robin choice anyway (a request must go somewhere).
    pub fn pick(&self, avoid: Option<usize>) -> usize {
        let n = self.targets.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = self.now_ms();
        let mut fallback = None;
        for k in 0..n {
            let i = (start + k) % n;
            if Some(i) == avoid {
                continue;
            }
            if self.targets[i].down_until_ms.load(Ordering::Relaxed) <= now {
                return i;
            }
            fallback.get_or_insert(i);
        }
        fallback.unwrap_or(start)
    }

    pub fn mark_down(&self, i: usize) {
        let until = self.now_ms() + u64::try_from(COOL_DOWN.as_millis()).unwrap_or(10_000);
        self.targets[i].down_until_ms.store(until, Ordering::Relaxed);
        tracing::warn!(upstream = %self.targets[i].url, "upstream failed to connect; skipping it for {COOL_DOWN:?}");
    }

    pub fn mark_up(&self, i: usize) {
        // Read first: keep the common healthy path free of writes to a shared cache line.
        if self.targets[i].down_until_ms.load(Ordering::Relaxed) != 0 {
            self.targets[i].down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Sends a request head and body to target `i` and returns its response head; the body
    /// brings the connection back to the pool when it has been read to its end.
    ///
    /// The request's URI is made here: origin-form (`/path?query`) on HTTP/1, absolute on
    /// HTTP/2. A request that a reused connection refused before sending anything (the upstream
    /// closed it while idle) goes again on another connection, as hyper-util's client does.
    pub async fn send(&self, i: usize, mut parts: Parts, body: Body) -> Result<Response<Pooled>, SendFailure> {
        let url = &self.targets[i].url;
        let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        if !parts.headers.contains_key(HOST) {
            if let Ok(v) = HeaderValue::from_str(url.authority.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
        let mut req = Request::from_parts(parts, body);
        loop {
            let (conn, reused) = match self.check_out(i).await {
                Some(c) => (c, true),
                // Boxed: the handshakes' futures are large, and every request's future (a hit's
                // too) would carry their size and be copied with it.
                None => (Box::pin(self.connect(i)).await.map_err(SendFailure::Connect)?, false),
            };
            let back = match conn {
                Conn::H1(mut tx) => {
                    *req.uri_mut() = Uri::from(pq.clone());
                    if req.version() != Version::HTTP_10 {
                        *req.version_mut() = Version::HTTP_11;
                    }
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(self.pooled(i, resp, Some(tx))),
                        Err(mut e) => (e.take_message(), e.into_error()),
                    }
                }
                Conn::H2(mut tx) => {
                    *req.uri_mut() = absolute(url, &pq);
                    *req.version_mut() = Version::HTTP_2;
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(self.pooled(i, resp, None)),
                        Err(mut e) => {
                            self.conns.lock(i).drop_closed_h2();
                            (e.take_message(), e.into_error())
                        }
                    }
                }
            };
            match back {
                (Some(unsent), _) if reused => req = unsent,
                (_, error) => return Err(SendFailure::Request(error)),
            }
        }
    }

    fn pooled(&self, i: usize, resp: Response<Incoming>, tx: Option<http1::SendRequest<Body>>) -> Response<Pooled> {
        // A connection that switched protocols belongs to its tunnel.
        let back = tx.filter(|_| resp.status() != StatusCode::SWITCHING_PROTOCOLS).map(|tx| Back {
            conns: self.conns.clone(),
            target: i,
            tx,
        });
        resp.map(|inner| Pooled { inner, back, ended: false })
    }

    /// An idle connection to target `i` that is ready for a request, if there is one.
    async fn check_out(&self, i: usize) -> Option<Conn> {
        loop {
            let (tx, since) = {
                let mut idle = self.conns.lock(i);
                idle.drop_closed_h2();
                if let Some(h2) = &idle.h2 {
                    return Some(Conn::H2(h2.clone()));
                }
                idle.h1.pop()?
            };
            if !reusable(&tx, since) {
                continue;
            }
            let mut tx = tx;
            // Its last response was read to the end; the connection's task may not have
            // noticed yet.
            if tx.is_ready() || tx.ready().await.is_ok() {
                return Some(Conn::H1(tx));
            }
        }
    }

    async fn connect(&self, i: usize) -> Result<Conn, BoxError> {
        match tokio::time::timeout(self.connect_timeout, self.handshake(i)).await {
            Ok(c) => c,
            Err(_) => {
                Err(format!("no connection within {:?} (TCP, TLS and HTTP/2 handshakes)", self.connect_timeout).into())
            }
        }
    }

    async fn handshake(&self, i: usize) -> Result<Conn, BoxError> {
        use tower_service::Service as _;
        if let Some(gone) = self.sweeper.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            tokio::spawn(sweep(Arc::downgrade(&self.conns), gone));
        }
        let io = self.connector.clone().call(self.targets[i].dial.clone()).await?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = self.h2.handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            self.conns.lock(i).h2 = Some(tx.clone());
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = self.h1.handshake(io).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Conn::H1(tx))
        }
    }
}

fn absolute(url: &UpstreamUrl, pq: &PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(url.scheme.clone());
    parts.authority = Some(url.authority.clone());
    parts.path_and_query = Some(pq.clone());
    Uri::from_parts(parts).unwrap_or_default()
}

/// Closes idle connections past their time, until the pool is gone (a reload replaced it and
/// the last response body that would bring a connection back has ended): then at once, so a
/// reload leaves no task behind.
async fn sweep(conns: Weak<Conns>, mut gone: tokio::sync::oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = &mut gone => return,
        }
        match conns.upgrade() {
            Some(c) => c.sweep(),
            None => return,
        }
    }
}

/// Where a response body takes its HTTP/1 connection back when it ends.
struct Back {
    conns: Arc<Conns>,
    target: usize,
    tx: http1::SendRequest<Body>,
}

pin_project_lite::pin_project! {
    /// An upstream response body. Read to its end, it returns its connection to the pool;
    /// dropped before, the connection closes (hyper will not reuse a connection with unread
    /// bytes).
    pub struct Pooled {
        #[pin]
        inner: Incoming,
        back: Option<Back>,
        ended: bool,
    }

    impl PinnedDrop for Pooled {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(b) = this.back.take() {
                if *this.ended || this.inner.is_end_stream() {
                    b.conns.check_in(b.target, b.tx);
                }
            }
        }
    }
}

impl HttpBody for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            *this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that says when the connection starts writing its request: hyper asks a
    /// body `is_end_stream` as it takes the request to encode its head, and never for a request
    /// whose sender gave up before (a canceled request is dropped unwritten). The budget's guard
    /// reads the flag: a call that was never written was never asked of the origin.
    pub struct AskedBody {
        #[pin]
        inner: Body,
        asked: Arc<AtomicBool>,
    }
}

impl AskedBody {
    pub fn new(inner: Body, asked: Arc<AtomicBool>) -> AskedBody {
        AskedBody { inner, asked }
    }
}

impl HttpBody for AskedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        this.asked.store(true, Ordering::SeqCst);
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.asked.store(true, Ordering::SeqCst);
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.asked.store(true, Ordering::SeqCst);
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    /// An HTTP/1 origin on an ephemeral port that answers `ok` on kept-alive connections.
    async fn origin() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from("ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn alive() -> usize {
        tokio::runtime::Handle::current().metrics().num_alive_tasks()
    }

    /// A pool a reload replaced takes its tasks with it when dropped: its pooled connections'
    /// and its sweeper (which used to live until its next tick, 30 s on).
    #[tokio::test]
    async fn a_dropped_pool_leaves_no_task_behind() {
        let addr = origin().await;
        let tls = crate::tls::upstream_tls(None, None, None, true, false).unwrap();
        let url = UpstreamUrl { scheme: Scheme::HTTP, authority: addr.to_string().parse().unwrap() };
        let before = alive();
        let pool = UpstreamPool::new(&[url], Duration::from_secs(5), &tls);
        let parts = Request::get("/").body(()).unwrap().into_parts().0;
        let resp = pool.send(0, parts, Empty::new().map_err(|e| match e {}).boxed()).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        // The connection's task, the origin's side of it and the sweeper.
        assert!(alive() >= before + 3, "{} tasks, {before} before the pool", alive());
        drop(pool);
        let mut left = alive();
        for _ in 0..100 {
            if left == before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            left = alive();
        }
        assert_eq!(left, before, "tasks alive a second after the pool was dropped");
    }
}
