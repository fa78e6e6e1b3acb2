//! The per-request context: what the connection brought and what phases 1–3 learned (route,
//! consumer, client address), read by every later phase and by the completion (access log,
//! metrics) instead of being re-derived. `Purpose` says why a request goes upstream, which
//! decides who pays.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Request, Uri};

use super::canonical::Canonical;
use super::headers::{add_via, set_forwarding};
use crate::runtime::{RouteRuntime, Runtime};

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
    /// The connection's slot of `server.max_connections` and its listener's tunnel gauge: a
    /// tunnel keeps a clone, so an upgraded connection holds its slot for its whole life.
    pub hold: Option<Arc<ConnHold>>,
}

/// What a connection holds while it (or a tunnel made of it) lives.
#[derive(Debug)]
pub struct ConnHold {
    _slot: tokio::sync::OwnedSemaphorePermit,
    pub tunnels: prometheus_client::metrics::gauge::Gauge,
    /// The listener's: set once it stops accepting (its connections are about to be drained).
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl ConnHold {
    pub fn new(
        slot: tokio::sync::OwnedSemaphorePermit,
        tunnels: prometheus_client::metrics::gauge::Gauge,
        closing: Arc<std::sync::atomic::AtomicBool>,
    ) -> Arc<ConnHold> {
        Arc::new(ConnHold { _slot: slot, tunnels, closing })
    }

    /// The listener has stopped accepting: HTTP/1.1 answers ask the client to close.
    pub fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr, scheme: &'static str) -> ConnInfo {
        ConnInfo { peer, local, scheme, tls: None, peer_ip: PeerText::of(peer.ip().to_canonical()), hold: None }
    }

    pub fn with_hold(self, hold: Arc<ConnHold>) -> ConnInfo {
        ConnInfo { hold: Some(hold), ..self }
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
    /// The trace this request belongs to, with Weir's span: its `traceparent` goes upstream.
    /// Set early when a log line or a span names it, else made by the first upstream hop.
    pub trace: std::sync::OnceLock<crate::observe::Trace>,
    /// The request's id (`X-Request-Id`), written into the upstream head only: a hit never
    /// copies it into the request's headers. Weir's own requests have none.
    pub request_id: Option<http::HeaderValue>,
    /// The answer already carries `request_id` (a hit wrote it into the stored head's slot).
    pub id_answered: std::sync::atomic::AtomicBool,
}

/// One upstream call: which target answered, with what, how fast (to the response head).
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub target: usize,
    pub status: u16,
    pub took: Duration,
}

impl RequestCtx {
    /// The context of a request routed in phase 2 (the consumer comes in phase 3): the client's
    /// address is found here, once — limits, failed credentials and the log read it.
    pub fn new(
        rt: Arc<Runtime>,
        conn: ConnInfo,
        trusted: bool,
        canon: Canonical,
        route: usize,
        debug: bool,
        logging: bool,
    ) -> RequestCtx {
        RequestCtx {
            client_ip: super::headers::client_addr(
                conn.peer.ip(),
                trusted,
                &rt.config.server.trusted_proxies,
                &canon.headers,
            ),
            rt,
            conn,
            trusted,
            canon,
            route,
            consumer: None,
            budget_remaining: std::sync::OnceLock::new(),
            hop: std::sync::OnceLock::new(),
            bytes_in: logging.then(|| Arc::new(std::sync::atomic::AtomicU64::new(0))),
            cache_key: std::sync::OnceLock::new(),
            debug,
            system: false,
            trace: std::sync::OnceLock::new(),
            request_id: None,
            id_answered: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn route(&self) -> &RouteRuntime {
        &self.rt.routes[self.route]
    }

    /// Who this request is, for the keys of its rate limits.
    pub fn limit_subject(&self) -> crate::limit::Subject<'_> {
        let consumer = self.consumer.as_deref();
        crate::limit::Subject {
            route: &self.route().route.name,
            client_ip: self.client_ip,
            // The peer is the client and its text was formatted once per connection.
            peer_text: (!self.trusted && self.conn.peer.ip().to_canonical().is_ipv4())
                .then(|| self.conn.peer_ip.as_str()),
            consumer,
            headers: &self.canon.headers,
            own: consumer.and_then(|c| self.rt.config.consumer_limits.get(c)).map(Vec::as_slice),
        }
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
        let route = &self.route().route;
        // A cached route forwards an untrusted peer's headers from its allow list only: a header
        // the origin reflects but the key ignores would poison the shared entry.
        let allowed = (route.cache.is_some() && !self.trusted).then_some(&route.forward_headers);
        // One map sized for what is added below (the forwarding fields, `traceparent`,
        // `X-Request-Id`, `Via`): a clone is exactly as large as the client's, and growing it
        // reallocated both its tables on every request.
        parts.headers = http::HeaderMap::with_capacity(self.canon.headers.len() + 8);
        for (k, v) in &self.canon.headers {
            if allowed.is_none_or(|a| a.allows(k)) {
                parts.headers.append(k.clone(), v.clone());
            }
        }
        if let Some(id) = &self.request_id {
            parts.headers.insert(crate::observe::X_REQUEST_ID.clone(), id.clone());
        }
        // Weir's span is the upstream hop's parent (a client's own `traceparent` is replaced; its
        // `tracestate` passes unchanged).
        let trace = self.trace.get_or_init(|| crate::observe::Trace::of(&self.canon.headers, false));
        parts.headers.insert(crate::observe::TRACEPARENT.clone(), trace.traceparent());
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
