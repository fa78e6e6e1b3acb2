//! Upstream selection: one pooled, keep-alive client per route, round robin over its URLs, and
//! passive health (an upstream that refused a connection is skipped for a cool-down).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::Body;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

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

#[derive(Debug)]
struct Target {
    url: UpstreamUrl,
    /// Milliseconds since `UpstreamPool::epoch` until which the target is skipped; 0 = healthy.
    down_until_ms: AtomicU64,
}

#[derive(Debug)]
pub struct UpstreamPool {
    pub client: HttpClient,
    targets: Vec<Target>,
    next: AtomicUsize,
    epoch: Instant,
}

impl UpstreamPool {
    /// A pool over `urls`: connections time out after `connect`; `https://` ones use `tls`.
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
        let https = if tls.http2 {
            b.enable_all_versions().wrap_connector(http)
        } else {
            b.enable_http1().wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        UpstreamPool {
            client,
            targets: urls.iter().map(|u| Target { url: u.clone(), down_until_ms: AtomicU64::new(0) }).collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
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
}
