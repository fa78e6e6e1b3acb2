//! Phase 4 for routes with a `cache` block: key, lookup, and then exactly one of
//! fresh hit · stale hit (max-stale, or stale-while-revalidate plus one background refresh) ·
//! revalidation or refetch (coalesced; stale-if-error on failure) · coalesced miss · bypass.
//! Unsafe methods are forwarded and then invalidate the target URI, `Location`,
//! `Content-Location` (RFC 9111 §4.4) and the route's `invalidate.tags`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use super::body::IdleTimeout;
use super::headers::{add_via, strip_hop_by_hop};
use super::{
    clone_head, content_length, empty, finish_response, forward, prepare_head, request_host, send_upstream, ConnInfo,
};
use crate::cache::entry::{Entry, Object};
use crate::cache::flight::{self, FlightGuard, FlightResult, Join};
use crate::cache::key;
use crate::cache::policy::{self, Lifetime, NotStored, RequestFacts};
use crate::cache::status::{BypassReason, Level, Outcome};
use crate::cache::{Cache, Purge};
use crate::config::RouteCache;
use crate::error::GatewayError;
use crate::plugin::{KeyDecision, Loaded, RequestParts};
use crate::runtime::{RouteRuntime, Runtime};
use crate::{Body, BoxError};

static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// Bounds on tags taken from response headers, so an origin cannot bloat the index.
const MAX_TAGS: usize = 64;
const MAX_TAG_LEN: usize = 256;

/// Everything the phases below need about one request; owned, so a background refresh can
/// take a copy.
struct Ctx {
    rt: Arc<Runtime>,
    idx: usize,
    cfg: Arc<RouteCache>,
    cache: Arc<Cache>,
    /// The client's head (original headers: conditionals, Range, Vary values).
    client: Parts,
    conn: ConnInfo,
    trusted: bool,
    facts: RequestFacts,
    primary: String,
    path_query: String,
    /// The buffered body of a cached POST.
    body: Option<Bytes>,
}

impl Ctx {
    fn route(&self) -> &RouteRuntime {
        &self.rt.routes[self.idx]
    }

    /// The upstream's head, built only when the cache has to go forward: the normalised path
    /// (what the key names), prepared headers, and no client conditionals or ranges.
    fn upstream_head(&self) -> Parts {
        let mut up = clone_head(&self.client);
        let path = key::normalize_path(self.client.uri.path()).unwrap_or_else(|_| self.client.uri.path().to_string());
        let pq = match self.client.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        if let Ok(uri) = http::Uri::builder().path_and_query(pq).build() {
            up.uri = uri;
        }
        prepare_head(&mut up, self.conn, self.trusted, None);
        for h in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE, header::IF_RANGE, header::RANGE] {
            up.headers.remove(h);
        }
        up
    }

    fn duplicate(&self) -> Ctx {
        Ctx {
            rt: self.rt.clone(),
            idx: self.idx,
            cfg: self.cfg.clone(),
            cache: self.cache.clone(),
            client: clone_head(&self.client),
            conn: self.conn,
            trusted: self.trusted,
            facts: self.facts.clone(),
            primary: self.primary.clone(),
            path_query: self.path_query.clone(),
            body: self.body.clone(),
        }
    }
}

/// A response from the upstream path, and what happened to the cache on the way.
struct Fetched {
    resp: Response<Body>,
    stored: Result<(), NotStored>,
    fwd_status: u16,
    /// The origin failed and this is a stale entry served under stale-if-error.
    stale_if_error: Option<i64>,
}

/// Sets `Cache-Status` and counts the outcome: the one place both happen.
fn with_status(route: &RouteRuntime, mut resp: Response<Body>, outcome: &Outcome) -> Response<Body> {
    if let Some(m) = &route.cache_metrics {
        m.record(outcome);
    }
    resp.headers_mut().insert(CACHE_STATUS.clone(), outcome.header_value());
    resp
}

fn is_unsafe(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

pub(super) async fn serve(
    rt: &Arc<Runtime>,
    idx: usize,
    cfg: &Arc<RouteCache>,
    req: Request<Incoming>,
    conn: ConnInfo,
    trusted: bool,
) -> Result<Response<Body>, GatewayError> {
    match serve_inner(rt, idx, cfg, req, conn, trusted).await {
        Ok(r) => Ok(r),
        // Errors keep their JSON body and also say what the cache did.
        Err(e) => {
            let detail = format!("weir; fwd=miss; detail={}", e.code());
            let mut r = e.into_response();
            if let Ok(v) = HeaderValue::from_str(&detail) {
                r.headers_mut().insert(CACHE_STATUS.clone(), v);
            }
            Ok(r)
        }
    }
}

async fn serve_inner(
    rt: &Arc<Runtime>,
    idx: usize,
    cfg: &Arc<RouteCache>,
    req: Request<Incoming>,
    conn: ConnInfo,
    trusted: bool,
) -> Result<Response<Body>, GatewayError> {
    let route = &rt.routes[idx];
    let method = req.method().clone();
    let cacheable = method == Method::GET
        || method == Method::HEAD
        || (method == Method::POST && cfg.methods.contains(&Method::POST));
    if !cacheable {
        let resp = Box::pin(forward_and_invalidate(rt, idx, req, conn, trusted)).await?;
        return Ok(with_status(route, resp, &Outcome::Bypass { reason: BypassReason::Method, stored: false }));
    }

    let (client, body) = req.into_parts();
    let facts = RequestFacts::of(&method, &client.headers);
    let idle = route.route.timeouts.idle;

    // A cached POST is keyed by its body: buffer it, bounded.
    let mut post_body = None;
    let mut passthrough = None;
    if method == Method::POST {
        match Box::pin(collect(body, cfg.max_key_body_bytes, idle)).await {
            Collected::Complete(b) => post_body = Some(b),
            Collected::TooLarge(replay) => passthrough = Some(replay),
            Collected::Failed(e) => return Err(GatewayError::BadRequest(format!("request body: {e}"))),
        }
    } else if !body.is_end_stream() {
        passthrough = Some(IdleTimeout::new(body, idle).boxed());
    }

    let class = if method == Method::POST { "POST" } else { "GET" };
    let hash = post_body.as_deref().map(key::body_hash);
    let keyed = key::primary(
        &route.route.name,
        class,
        conn.scheme,
        request_host(&client.uri, &client.headers).unwrap_or_default(),
        client.uri.path(),
        client.uri.query(),
        hash.as_deref(),
    );
    let kp = match (keyed, passthrough) {
        (Ok(kp), None) => kp,
        (keyed, passthrough) => {
            // Malformed escapes, an oversized POST body or a GET with a body: the cache stays out.
            let reason = if keyed.is_err() { BypassReason::Uri } else { BypassReason::BodyTooLarge };
            let resp = Box::pin(pass_through(route, &client, conn, trusted, passthrough)).await?;
            return Ok(with_status(route, resp, &Outcome::Bypass { reason, stored: false }));
        }
    };

    let bypass = if facts.cookie && !cfg.share_private {
        Some(BypassReason::Cookie)
    } else if facts.authorization && !cfg.share_private {
        Some(BypassReason::Authorization)
    } else {
        None
    };
    // The plugin may change the key (never the sharing rules above), or keep the cache out.
    let mut primary = kp.primary;
    let mut plugin_bypass = None;
    if let (Some(plugin), None) = (route_plugin(route), &bypass) {
        let host = request_host(&client.uri, &client.headers).unwrap_or_default();
        let parts = RequestParts::new(
            method.as_str(),
            conn.scheme,
            host,
            &kp.path_query,
            &client.headers,
            post_body.as_deref(),
        );
        match plugin.cache_key(&parts) {
            Ok(KeyDecision::Key(k)) => primary = plugin_key(&route.route.name, class, &k),
            Ok(KeyDecision::Bypass(reason)) => plugin_bypass = Some(reason),
            // A failed call on a route that shares credentialed responses: the policy's key
            // would mix what the plugin keeps apart (tenants, say), so the cache stays out.
            Err(f) if cfg.share_private => plugin_bypass = Some(format!("failed ({})", f.as_str())),
            // `Policy`, or a failed call: the policy's key.
            Ok(KeyDecision::Policy) | Err(_) => {}
        }
    }
    let ctx = Ctx {
        rt: rt.clone(),
        idx,
        cfg: cfg.clone(),
        cache: rt.cache.clone(),
        client,
        conn,
        trusted,
        facts,
        primary,
        path_query: kp.path_query,
        body: post_body,
    };
    if let Some(reason) = plugin_bypass {
        // Neither read nor stored: the request goes through as the client sent it.
        let resp = Box::pin(pass_through(ctx.route(), &ctx.client, conn, trusted, buffered(ctx.body.as_ref()))).await?;
        return Ok(with_status(ctx.route(), resp, &Outcome::PluginBypass { reason }));
    }
    if let Some(reason) = bypass {
        // Credentials: never served from the cache; stored only where RFC 9111 §3.5 allows.
        let f = Box::pin(fetch(&ctx, None, None, false)).await?;
        return Ok(with_status(ctx.route(), f.resp, &Outcome::Bypass { reason, stored: f.stored.is_ok() }));
    }
    lookup_and_serve(&ctx).await
}

/// Looks up the primary key and, for a `Vary` marker, the request's variant: the entry and the
/// tier it came from, whether a Vary marker was found without the variant, and the full key.
async fn lookup(ctx: &Ctx) -> (Option<(Arc<Entry>, Level)>, bool, String) {
    match ctx.cache.get(&ctx.primary).await {
        Some((Object::Response(e), level)) => (Some((e, level)), false, ctx.primary.clone()),
        Some((Object::Vary { headers, .. }, _)) => {
            let sk = key::secondary(&ctx.primary, &headers, &ctx.client.headers);
            match ctx.cache.get(&sk).await {
                Some((Object::Response(e), level)) if e.key == sk => (Some((e, level)), false, sk),
                _ => (None, true, sk),
            }
        }
        None => (None, false, ctx.primary.clone()),
    }
}

async fn lookup_and_serve(ctx: &Ctx) -> Result<Response<Body>, GatewayError> {
    let now = SystemTime::now();
    let (found, vary_miss, full_key) = lookup(ctx).await;
    let d = &ctx.facts.directives;
    let head_or_range = ctx.client.method == Method::HEAD || ctx.client.headers.contains_key(header::RANGE);

    if let Some((e, level)) = found {
        let age = e.age(now);
        let meets_request =
            d.max_age.is_none_or(|m| age <= m) && d.min_fresh.is_none_or(|mf| e.fresh_for.saturating_sub(age) >= mf);
        let fresh = e.is_fresh(now);
        if fresh && meets_request && !d.no_cache {
            return Ok(with_status(ctx.route(), serve_entry(ctx, &e, now), &Outcome::Hit { level }));
        }
        let staleness = e.staleness(now);
        let may_be_stale = !fresh && !d.no_cache && !e.stale_forbidden && !e.revalidate_always;
        // The client accepts staleness explicitly (max-stale).
        if may_be_stale && d.max_stale.is_some_and(|ms| ms.is_none_or(|m| staleness <= m)) {
            return Ok(with_status(
                ctx.route(),
                serve_entry(ctx, &e, now),
                &Outcome::StaleHit { ttl: e.ttl_secs(now) },
            ));
        }
        // stale-while-revalidate: answer now, refresh once in the background.
        if may_be_stale && staleness < e.stale_while_revalidate && d.max_age.is_none() && d.min_fresh.is_none() {
            spawn_refresh(ctx, &full_key, &e);
            return Ok(with_status(
                ctx.route(),
                serve_entry(ctx, &e, now),
                &Outcome::StaleHit { ttl: e.ttl_secs(now) },
            ));
        }
        if d.only_if_cached {
            return Ok(with_status(ctx.route(), GatewayError::NotCached.into_response(), &Outcome::NotCached));
        }
        // The miss paths are boxed: a hit's future stays small (it is moved and polled often).
        let f = Box::pin(fetch_coalesced(ctx, &full_key, Some(&e))).await?;
        let outcome = match (f.stale_if_error, fresh) {
            (Some(ttl), _) => Outcome::StaleIfError { fwd_status: f.fwd_status, ttl },
            (None, true) => Outcome::Request { stored: f.stored },
            (None, false) => Outcome::Revalidated { fwd_status: f.fwd_status, stored: f.stored },
        };
        let outcome = if f.fwd_status == 0 { Outcome::Collapsed } else { outcome };
        return Ok(with_status(ctx.route(), f.resp, &outcome));
    }

    if d.only_if_cached {
        return Ok(with_status(ctx.route(), GatewayError::NotCached.into_response(), &Outcome::NotCached));
    }
    if head_or_range {
        // HEAD and Range misses are not coalesced; a 206 or a HEAD answer is never stored, but
        // an origin that ignores Range answers 200 with the whole body, which may be.
        let f = Box::pin(fetch(ctx, None, None, true)).await?;
        return Ok(with_status(ctx.route(), f.resp, &Outcome::Miss { vary: vary_miss, stored: f.stored }));
    }
    let f = Box::pin(fetch_coalesced(ctx, &full_key, None)).await?;
    let outcome =
        if f.fwd_status == 0 { Outcome::Collapsed } else { Outcome::Miss { vary: vary_miss, stored: f.stored } };
    Ok(with_status(ctx.route(), f.resp, &outcome))
}

/// One upstream fetch per key: lead it, or wait for the leader and use its response when it
/// matches this request (Vary). `fwd_status == 0` in the result marks a collapsed answer.
async fn fetch_coalesced(ctx: &Ctx, full_key: &str, stale: Option<&Arc<Entry>>) -> Result<Fetched, GatewayError> {
    match ctx.cache.flights.join(full_key) {
        Join::Leader(guard) => fetch(ctx, stale, Some(guard), false).await,
        Join::Waiter(rx) => {
            let t = ctx.route().route.timeouts;
            match flight::wait(rx, t.response + t.idle).await {
                FlightResult::Stored(e) if waiter_matches(ctx, &e) => {
                    let resp = serve_entry(ctx, &e, SystemTime::now());
                    Ok(Fetched { resp, stored: Ok(()), fwd_status: 0, stale_if_error: None })
                }
                _ => fetch(ctx, stale, None, false).await,
            }
        }
    }
}

fn waiter_matches(ctx: &Ctx, e: &Entry) -> bool {
    if e.vary.is_empty() {
        e.key == ctx.primary
    } else {
        e.key == key::secondary(&ctx.primary, &e.vary, &ctx.client.headers)
    }
}

fn spawn_refresh(ctx: &Ctx, full_key: &str, e: &Arc<Entry>) {
    if let Join::Leader(guard) = ctx.cache.flights.join(full_key) {
        let c = ctx.duplicate();
        let e = e.clone();
        tokio::spawn(async move {
            match fetch(&c, Some(&e), Some(guard), false).await {
                Ok(f) => {
                    tracing::debug!(key = %c.primary, status = f.fwd_status, stored = f.stored.is_ok(), "background refresh done")
                }
                Err(err) => tracing::debug!(key = %c.primary, error = %err, "background refresh failed"),
            }
        });
    }
}

/// Goes upstream (conditionally when `stale` has validators), stores what may be stored, and
/// releases coalesced waiters; on failure serves `stale` within its stale-if-error window.
async fn fetch(
    ctx: &Ctx,
    stale: Option<&Arc<Entry>>,
    guard: Option<FlightGuard>,
    pass_range: bool,
) -> Result<Fetched, GatewayError> {
    let generation = ctx.cache.generation();
    let mut head = ctx.upstream_head();
    if pass_range {
        for h in [header::RANGE, header::IF_RANGE] {
            if let Some(v) = ctx.client.headers.get(&h) {
                head.headers.insert(h, v.clone());
            }
        }
    }
    if let Some(e) = stale {
        if let Some(v) = e.etag() {
            head.headers.insert(header::IF_NONE_MATCH, v.clone());
        }
        if let Some(v) = e.last_modified() {
            head.headers.insert(header::IF_MODIFIED_SINCE, v.clone());
        }
    }
    let (body, no_body) = match buffered(ctx.body.as_ref()) {
        Some(b) => (b, false),
        None => (empty(), true),
    };
    let now = SystemTime::now();
    let sie = stale.filter(|e| !e.is_fresh(now) && e.staleness(now) <= e.stale_if_error && !e.stale_if_error.is_zero());
    let route = ctx.route();
    let resp = match send_upstream(route, head, body, no_body).await {
        Ok(r) => r,
        Err(err) => {
            drop(guard);
            return match sie {
                Some(e) => Ok(stale_answer(ctx, e, err.status().as_u16())),
                None => Err(err),
            };
        }
    };
    let status = resp.status();
    if status.is_server_error() {
        if let Some(e) = sie {
            drop(guard);
            return Ok(stale_answer(ctx, e, status.as_u16()));
        }
    }
    let now = SystemTime::now();
    let (mut rp, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);

    if status == StatusCode::NOT_MODIFIED {
        if let Some(e) = stale {
            return Ok(revalidated(ctx, e, &rp.headers, guard, generation, now).await);
        }
    }

    let (lifetime, plugin_tags) = decide(ctx, status, &rp.headers, now);
    let too_large = content_length(&rp.headers).is_some_and(|n| n > ctx.cache.max_object_bytes);
    let lifetime = match lifetime {
        Ok(_) if too_large => Err(NotStored::TooLarge),
        other => other,
    };
    let idle = route.route.timeouts.idle;
    let l = match lifetime {
        Ok(l) => l,
        Err(reason) => {
            drop(guard);
            add_via(&mut rp.headers, rp.version);
            let resp = Response::from_parts(rp, IdleTimeout::new(rbody, idle).boxed());
            return Ok(Fetched { resp, stored: Err(reason), fwd_status: status.as_u16(), stale_if_error: None });
        }
    };
    match collect(rbody, ctx.cache.max_object_bytes, idle).await {
        Collected::Complete(bytes) => {
            let entry = Arc::new(build_entry(ctx, status, rp.headers, bytes, &l, now, plugin_tags));
            let stored = ctx.cache.store(&ctx.primary, entry.clone(), generation).await;
            if let Some(g) = guard {
                g.finish(if stored { FlightResult::Stored(entry.clone()) } else { FlightResult::NotShared });
            }
            let resp = serve_entry(ctx, &entry, now);
            Ok(Fetched {
                resp,
                stored: if stored { Ok(()) } else { Err(NotStored::Purged) },
                fwd_status: status.as_u16(),
                stale_if_error: None,
            })
        }
        Collected::TooLarge(body) => {
            drop(guard);
            add_via(&mut rp.headers, rp.version);
            Ok(Fetched {
                resp: Response::from_parts(rp, body),
                stored: Err(NotStored::TooLarge),
                fwd_status: status.as_u16(),
                stale_if_error: None,
            })
        }
        Collected::Failed(reason) => {
            drop(guard);
            Err(GatewayError::UpstreamUnavailable { upstream: route.upstreams.url(0).to_string(), reason })
        }
    }
}

fn stale_answer(ctx: &Ctx, e: &Arc<Entry>, fwd_status: u16) -> Fetched {
    let now = SystemTime::now();
    Fetched {
        resp: serve_entry(ctx, e, now),
        stored: Err(NotStored::Status),
        fwd_status,
        stale_if_error: Some(e.ttl_secs(now)),
    }
}

/// A 304 refreshes the stored entry: its headers updated from the 304 (RFC 9111 §4.3.4).
async fn revalidated(
    ctx: &Ctx,
    e: &Arc<Entry>,
    fresh: &HeaderMap,
    guard: Option<FlightGuard>,
    generation: crate::cache::Generation,
    now: SystemTime,
) -> Fetched {
    let mut headers = e.headers.clone();
    for name in fresh.keys() {
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::CONTENT_ENCODING | header::CONTENT_TYPE | header::TRANSFER_ENCODING
        ) {
            continue;
        }
        headers.remove(name);
        for v in fresh.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    let (decided, plugin_tags) = decide(ctx, e.status, &headers, now);
    match decided {
        Ok(l) => {
            let mut next = build_entry(ctx, e.status, headers, e.body.clone(), &l, now, plugin_tags);
            next.key = e.key.clone();
            let next = Arc::new(next);
            let stored = ctx.cache.store(&ctx.primary, next.clone(), generation).await;
            if let Some(g) = guard {
                g.finish(if stored { FlightResult::Stored(next.clone()) } else { FlightResult::NotShared });
            }
            Fetched {
                resp: serve_entry(ctx, &next, now),
                stored: if stored { Ok(()) } else { Err(NotStored::Purged) },
                fwd_status: 304,
                stale_if_error: None,
            }
        }
        Err(reason) => {
            drop(guard);
            let mut once = (**e).clone();
            once.headers = headers;
            Fetched { resp: serve_entry(ctx, &once, now), stored: Err(reason), fwd_status: 304, stale_if_error: None }
        }
    }
}

/// Sends the client's request upstream past the cache, with Weir's forwarding headers.
async fn pass_through(
    route: &RouteRuntime,
    client: &Parts,
    conn: ConnInfo,
    trusted: bool,
    body: Option<Body>,
) -> Result<Response<Body>, GatewayError> {
    let mut up = clone_head(client);
    prepare_head(&mut up, conn, trusted, None);
    let (b, none) = match body {
        Some(b) => (b, false),
        None => (empty(), true),
    };
    let resp = send_upstream(route, up, b, none).await?;
    Ok(finish_response(route, resp))
}

/// A buffered request body (a cached POST's) to send again; `None` when there is none.
fn buffered(body: Option<&Bytes>) -> Option<Body> {
    body.filter(|b| !b.is_empty()).map(|b| Full::new(b.clone()).map_err(|never| match never {}).boxed())
}

/// The route's plugin, when it has one.
fn route_plugin(route: &RouteRuntime) -> Option<&Arc<Loaded>> {
    route.route.plugin.as_ref().and_then(|p| p.loaded.as_ref())
}

/// A plugin's key, namespaced by route and method class; never equal to a policy key (those
/// continue with the scheme).
fn plugin_key(route: &str, class: &str, k: &str) -> String {
    // Not `format!`: this runs on every hit of a plugin-keyed route.
    let mut s = String::with_capacity(route.len() + class.len() + k.len() + 9);
    for part in [route, "|", class, "|plugin:", k] {
        s.push_str(part);
    }
    s
}

/// The policy's storage decision, then the plugin's `ttl` hook: the plugin wins on lifetimes
/// and adds tags, but cannot store what the sharing rules forbid (RFC 9111 §3, DESIGN.md).
fn decide(
    ctx: &Ctx,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> (Result<Lifetime, NotStored>, Vec<String>) {
    let decided = policy::decide(&ctx.cfg, &ctx.facts, status, headers, now);
    let Some(plugin) = route_plugin(ctx.route()) else {
        return (decided, Vec::new());
    };
    let base = match decided {
        Ok(l) => Some(l),
        Err(NotStored::NoFreshness) => None,
        Err(other) => return (Err(other), Vec::new()),
    };
    let resp = crate::plugin::response_for(plugin, status.as_u16(), headers, None);
    let host = request_host(&ctx.client.uri, &ctx.client.headers).unwrap_or_default();
    let parts = RequestParts::new(
        ctx.client.method.as_str(),
        ctx.conn.scheme,
        host,
        &ctx.path_query,
        &ctx.client.headers,
        ctx.body.as_deref(),
    );
    let d = match plugin.ttl(&plugin.request(&parts), &resp) {
        Ok(Some(d)) => d,
        // No opinion, or a failed call: the policy's decision.
        Ok(None) | Err(_) => return (base.ok_or(NotStored::NoFreshness), Vec::new()),
    };
    if !d.store {
        return (Err(NotStored::Plugin), Vec::new());
    }
    let secs = |s: Option<u32>| s.map(|s| Duration::from_secs(u64::from(s)));
    let l = match (base, secs(d.ttl)) {
        (Some(mut l), ttl) => {
            if let Some(t) = ttl {
                l.fresh_for = t;
            }
            if !l.stale_forbidden {
                l.stale_while_revalidate = secs(d.stale_while_revalidate).unwrap_or(l.stale_while_revalidate);
                l.stale_if_error = secs(d.stale_if_error).unwrap_or(l.stale_if_error);
            }
            l
        }
        (None, Some(t)) => Lifetime {
            fresh_for: t,
            initial_age: Duration::ZERO,
            stale_while_revalidate: secs(d.stale_while_revalidate)
                .or(ctx.cfg.stale_while_revalidate)
                .unwrap_or_default(),
            stale_if_error: secs(d.stale_if_error).or(ctx.cfg.stale_if_error).unwrap_or_default(),
            revalidate_always: false,
            stale_forbidden: false,
        },
        (None, None) => return (Err(NotStored::NoFreshness), Vec::new()),
    };
    (Ok(l), d.tags)
}

fn build_entry(
    ctx: &Ctx,
    status: StatusCode,
    mut headers: HeaderMap,
    body: Bytes,
    l: &Lifetime,
    now: SystemTime,
    plugin_tags: Vec<String>,
) -> Entry {
    let vary = key::vary_names(&headers);
    let key =
        if vary.is_empty() { ctx.primary.clone() } else { key::secondary(&ctx.primary, &vary, &ctx.client.headers) };
    for h in [header::SET_COOKIE, header::AGE] {
        headers.remove(h);
    }
    headers.remove(&CACHE_STATUS);
    // Stored as served: our `Via` hop and the exact length (hits then only add `Age`).
    if !headers.get_all(header::VIA).iter().any(|v| v.to_str().is_ok_and(|s| s.ends_with("weir"))) {
        add_via(&mut headers, Version::HTTP_11);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    // Placeholders a hit overwrites in place: the cloned map never has to grow.
    headers.insert(header::AGE, HeaderValue::from_static("0"));
    headers.insert(CACHE_STATUS.clone(), HeaderValue::from_static("weir"));
    let mut tags: Vec<String> = ctx.route().route.invalidate.as_ref().map(|i| i.tags.clone()).unwrap_or_default();
    let from_headers = headers
        .get_all(&SURROGATE_KEY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(str::split_whitespace)
        .chain(
            headers
                .get_all(&CACHE_TAG)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|s| s.split(','))
                .map(str::trim),
        )
        .filter(|t| !t.is_empty() && t.len() <= MAX_TAG_LEN)
        .map(str::to_string);
    tags.extend(from_headers);
    tags.extend(plugin_tags);
    tags.sort();
    tags.dedup();
    tags.truncate(MAX_TAGS);
    Entry {
        key,
        status,
        headers,
        body,
        stored_at: now,
        initial_age: l.initial_age,
        fresh_for: l.fresh_for,
        stale_while_revalidate: l.stale_while_revalidate,
        stale_if_error: l.stale_if_error,
        revalidate_always: l.revalidate_always,
        stale_forbidden: l.stale_forbidden,
        tags,
        path: ctx.path_query.clone(),
        vary: vary.into(),
    }
}

/// A body read up to a bound: request bodies of cached POSTs, and responses being stored.
enum Collected {
    Complete(Bytes),
    /// Past the object bound: what was read so far, then the rest, streamed.
    TooLarge(Body),
    Failed(String),
}

async fn collect(body: Incoming, limit: u64, idle: Duration) -> Collected {
    let mut body = Box::pin(IdleTimeout::new(body, idle));
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Collected::Complete(buf.freeze()),
            Some(Err(e)) => return Collected::Failed(e.to_string()),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
                if buf.len() as u64 > limit {
                    return Collected::TooLarge(replay(buf.freeze(), body));
                }
            }
        }
    }
}

/// A body that yields `head` and then the rest of `rest`.
fn replay<B>(head: Bytes, rest: B) -> Body
where
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
{
    let first = futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(head)) });
    let stream = first.chain(BodyStream::new(rest));
    BodyExt::boxed(StreamBody::new(SyncStream(std::sync::Mutex::new(Box::pin(stream)))))
}

/// `BoxBody` needs `Sync`; a stream that is only ever polled through `&mut` is made so by a mutex
/// that is never contended.
struct SyncStream<S>(std::sync::Mutex<std::pin::Pin<Box<S>>>);

impl<S: futures_util::Stream + Send> futures_util::Stream for SyncStream<S> {
    type Item = S::Item;
    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<S::Item>> {
        match self.get_mut().0.get_mut() {
            Ok(s) => s.as_mut().poll_next(cx),
            Err(p) => p.into_inner().as_mut().poll_next(cx),
        }
    }
}

/// Builds the client's answer from a stored entry: `Age`, `Via`, conditionals (304), `Range`
/// (206/416 from the complete entry), HEAD without body.
fn serve_entry(ctx: &Ctx, e: &Entry, now: SystemTime) -> Response<Body> {
    let ch = &ctx.client.headers;
    let mut headers = e.headers.clone();
    headers.insert(header::AGE, HeaderValue::from(e.age(now).as_secs()));
    let mut resp = Response::new(empty());
    if not_modified(&ctx.client.method, ch, e) {
        headers.remove(header::CONTENT_LENGTH);
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.headers_mut() = headers;
        return resp;
    }
    let mut status = e.status;
    let mut body = e.body.clone();
    if ctx.client.method == Method::GET && e.status == StatusCode::OK {
        if let Some(range) = ch.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            if if_range_ok(ch, e) {
                let len = e.body.len() as u64;
                match parse_range(range, len) {
                    Some(Ok((start, end))) => {
                        status = StatusCode::PARTIAL_CONTENT;
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end + 1 - start));
                        body = e.body.slice(usize::try_from(start).unwrap_or(0)..usize::try_from(end + 1).unwrap_or(0));
                        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                            headers.insert(header::CONTENT_RANGE, v);
                        }
                    }
                    Some(Err(())) => {
                        status = StatusCode::RANGE_NOT_SATISFIABLE;
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
                        body = Bytes::new();
                        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                            headers.insert(header::CONTENT_RANGE, v);
                        }
                    }
                    None => {}
                }
            }
        }
    }
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if ctx.client.method != Method::HEAD {
        *resp.body_mut() = Full::new(body).map_err(|never| match never {}).boxed();
    }
    resp
}

fn opaque(tag: &str) -> &str {
    tag.trim().trim_start_matches("W/")
}

/// RFC 9110 §13.1.2 / §13.1.3, evaluated against the stored response.
fn not_modified(method: &Method, ch: &HeaderMap, e: &Entry) -> bool {
    if let Some(inm) = ch.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        if inm.trim() == "*" {
            return true;
        }
        let Some(etag) = e.etag().and_then(|v| v.to_str().ok()) else { return false };
        return inm.split(',').any(|t| opaque(t) == opaque(etag));
    }
    if matches!(*method, Method::GET | Method::HEAD) {
        let ims = ch
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| httpdate::parse_http_date(s).ok());
        let lm = e.last_modified().and_then(|v| v.to_str().ok()).and_then(|s| httpdate::parse_http_date(s).ok());
        if let (Some(ims), Some(lm)) = (ims, lm) {
            return lm <= ims;
        }
    }
    false
}

fn if_range_ok(ch: &HeaderMap, e: &Entry) -> bool {
    let Some(ir) = ch.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else { return true };
    let ir = ir.trim();
    if ir.starts_with('"') {
        // Strong comparison: a weak stored ETag never matches.
        e.etag().and_then(|v| v.to_str().ok()).is_some_and(|t| t.trim() == ir)
    } else {
        e.last_modified().and_then(|v| v.to_str().ok()).is_some_and(|lm| lm.trim() == ir)
    }
}

/// One byte range against a body of `len`: `None` when absent, multiple or unparseable (the
/// full response is served), `Some(Err)` when unsatisfiable (416).
fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.trim().split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end: u64 =
            if b.is_empty() { len.saturating_sub(1) } else { b.parse::<u64>().ok()?.min(len.saturating_sub(1)) };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(range))
}

/// Forwards a request that the cache does not serve; after a successful unsafe method,
/// invalidates what RFC 9111 §4.4 names and the route's `invalidate.tags`.
pub(super) async fn forward_and_invalidate(
    rt: &Arc<Runtime>,
    idx: usize,
    req: Request<Incoming>,
    conn: ConnInfo,
    trusted: bool,
) -> Result<Response<Body>, GatewayError> {
    let route = &rt.routes[idx];
    let method = req.method().clone();
    let host = request_host(req.uri(), req.headers()).map(str::to_string);
    let target = key::primary("", "", "", "", req.uri().path(), req.uri().query(), None).ok().map(|k| k.path_query);
    let plugin = route_plugin(route).filter(|_| is_unsafe(&method));
    let preq = match (plugin, &target) {
        (Some(p), Some(pq)) => {
            let host = request_host(req.uri(), req.headers()).unwrap_or_default();
            Some(p.request(&RequestParts::new(method.as_str(), conn.scheme, host, pq, req.headers(), None)))
        }
        _ => None,
    };
    let resp = forward(route, req, conn, trusted).await?;
    if !is_unsafe(&method) || !(resp.status().is_success() || resp.status().is_redirection()) {
        return Ok(resp);
    }
    let mut purge = Purge::default();
    if route.route.cache.is_some() {
        purge.keys.extend(target);
        for h in [header::LOCATION, header::CONTENT_LOCATION] {
            if let Some(p) =
                resp.headers().get(&h).and_then(|v| v.to_str().ok()).and_then(|v| same_origin_path(v, host.as_deref()))
            {
                purge.keys.push(p);
            }
        }
    }
    if let Some(inv) = &route.route.invalidate {
        if inv.methods.contains(&method) {
            purge.tags.extend(inv.tags.iter().cloned());
        }
    }
    if let (Some(p), Some(preq)) = (plugin, &preq) {
        let presp = crate::plugin::response_for(p, resp.status().as_u16(), resp.headers(), None);
        if let Ok(inv) = p.invalidate(preq, &presp) {
            // A plugin names its own keys (as its cache-key hook returns them) or URL paths.
            purge.keys.extend(inv.keys.iter().map(|k| {
                if k.starts_with('/') {
                    k.clone()
                } else {
                    plugin_key(&route.route.name, "GET", k)
                }
            }));
            purge.tags.extend(inv.tags);
            purge.prefixes.extend(inv.prefixes);
        }
    }
    if !purge.is_empty() {
        rt.metrics.invalidations(&route.label, "key", purge.keys.len());
        rt.metrics.invalidations(&route.label, "tag", purge.tags.len());
        rt.metrics.invalidations(&route.label, "prefix", purge.prefixes.len());
        match rt.cache.purge(&purge).await {
            Ok(n) => {
                tracing::debug!(route = %route.route.name, %method, purged = n, "write invalidated cached entries")
            }
            Err(e) => tracing::warn!(route = %route.route.name, error = %e, "invalidation after a write failed"),
        }
    }
    Ok(resp)
}

/// The normalised path of a `Location`-style value when it points at the same origin.
fn same_origin_path(v: &str, host: Option<&str>) -> Option<String> {
    let uri: http::Uri = v.parse().ok()?;
    if let Some(a) = uri.authority() {
        if Some(a.as_str()) != host {
            return None;
        }
    }
    key::primary("", "", "", "", uri.path(), uri.query(), None).ok().map(|k| k.path_query)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=95-200", 100), Some(Ok((95, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
