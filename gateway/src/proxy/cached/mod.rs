//! Phases 4–8 for routes with a `cache` block. This file decides what to do with a request and
//! an entry: key, lookup, and then exactly one of fresh hit · stale hit (max-stale, or
//! stale-while-revalidate plus one background refresh) · revalidation or refetch (coalesced;
//! stale-if-error on failure) · coalesced miss · bypass. The other files answer one question each:
//! - `respond` — how a stored entry becomes the client's answer (304, 206, HEAD);
//! - `fill` — how an upstream answer is judged, stored and shared with coalesced waiters;
//! - `invalidate` — what a write purges.
//!
//! Every read of the request goes through the canonical request in `RequestCtx`.

mod fill;
mod invalidate;
pub(crate) mod ops;
mod respond;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use crate::proxy::body::ClientBody;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Response};
use http_body::Body as _;

use self::fill::{buffered, collect, fetch, Collected, Mode};
use self::respond::{answer, serve_entry};
use crate::cache::entry::{Entry, Object};
use crate::cache::flight::{self, FlightResult, Join};
use crate::cache::key;
use crate::cache::l2::{FillLock, Turn, FILL_LOCK_TTL};
use crate::cache::policy::{NotStored, RequestFacts};
use crate::cache::status::{BypassReason, Level, Outcome};
use crate::cache::Cache;
use crate::config::RouteCache;
use crate::error::GatewayError;
use crate::plugin::{KeyDecision, Loaded};
use crate::proxy::body::is_length_limit;
use crate::proxy::{finish_response, request_body, upstream, Purpose, RequestCtx};
use crate::runtime::RouteRuntime;
use crate::Body;

pub(super) use self::invalidate::forward_and_invalidate;

pub(super) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How many times waiters take over a failed fill (one leader at a time) before each goes alone.
const HANDOFFS: usize = 3;

/// What the cache phases know about one request, besides the request itself; cheap to clone,
/// so a background refresh can take a copy.
#[derive(Debug, Clone)]
pub(super) struct Ctx {
    req: Arc<RequestCtx>,
    cfg: Arc<RouteCache>,
    cache: Arc<Cache>,
    facts: RequestFacts,
    primary: String,
    /// The buffered body of a cached POST.
    body: Option<Bytes>,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fwd {
    /// The origin answered with this status.
    Origin(u16),
    /// Another request's fill (a coalesced leader) answered.
    Collapsed,
}

/// A response from the upstream path, and what happened to the cache on the way.
pub(super) struct Fetched {
    resp: Response<Body>,
    stored: Result<(), NotStored>,
    fwd: Fwd,
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

/// `only-if-cached` with nothing stored: counted here, answered 504 by `handle`.
fn not_cached(route: &RouteRuntime) -> GatewayError {
    if let Some(m) = &route.cache_metrics {
        m.record(&Outcome::NotCached);
    }
    GatewayError::NotCached
}

/// The `Cache-Status` of an error answered on a cached route (phases 4–6 failed).
pub(super) fn error_status(e: &GatewayError) -> Option<HeaderValue> {
    match e {
        GatewayError::NotCached => Some(Outcome::NotCached.header_value()),
        e => HeaderValue::from_str(&format!("weir; fwd=miss; detail={}", e.code())).ok(),
    }
}

pub(super) fn is_unsafe(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// The route's plugin, when it has one.
pub(super) fn route_plugin(route: &RouteRuntime) -> Option<&Arc<Loaded>> {
    route.route.plugin.as_ref().and_then(|p| p.loaded.as_ref())
}

/// Sends the request upstream past the cache, as the client sent it (canonical form).
async fn pass_through(req: &Arc<RequestCtx>, body: Option<Body>) -> Result<Response<Body>, GatewayError> {
    let resp = upstream(req, Purpose::PassThrough, req.upstream_head(), body).await?;
    Ok(finish_response(resp))
}

/// Phases 4–6 (and, through the body, 7–8) of a request on a cached route.
pub(super) async fn serve(
    req: Arc<RequestCtx>,
    cfg: &Arc<RouteCache>,
    body: ClientBody,
) -> Result<Response<Body>, GatewayError> {
    let route = req.route();
    let method = req.canon.method.clone();
    let cacheable = method == Method::GET
        || method == Method::HEAD
        || (method == Method::POST && cfg.methods.contains(&Method::POST));
    if !cacheable {
        let resp = Box::pin(forward_and_invalidate(&req, body)).await?;
        return Ok(with_status(route, resp, &Outcome::Bypass { reason: BypassReason::Method, stored: false }));
    }
    // A method override may make the origin answer as another method: keep the cache out.
    if req.canon.method_override {
        let resp = Box::pin(pass_through(&req, request_body(&req, body))).await?;
        return Ok(with_status(route, resp, &Outcome::Bypass { reason: BypassReason::MethodOverride, stored: false }));
    }

    // A head without any field the cache's request rules read skips their lookups.
    let facts = if req.canon.cache_fields {
        RequestFacts::of(&method, &req.canon.headers)
    } else {
        RequestFacts::of(&method, &http::HeaderMap::new())
    };
    // A cached POST is keyed by its body: buffer it, bounded by the key limit and the route's
    // `max_request_body`. A GET or HEAD with a body goes past the cache.
    let mut post_body = None;
    if method == Method::POST {
        let body = request_body(&req, body);
        let collected = match body {
            None => Collected::Complete(Bytes::new()),
            Some(b) => Box::pin(collect(b, cfg.max_key_body_bytes)).await,
        };
        match collected {
            Collected::Complete(b) => post_body = Some(b),
            Collected::TooLarge(replay) => {
                let resp = Box::pin(pass_through(&req, Some(replay))).await?;
                let outcome = Outcome::Bypass { reason: BypassReason::BodyTooLarge, stored: false };
                return Ok(with_status(route, resp, &outcome));
            }
            Collected::Failed(e) if is_length_limit(&*e) => {
                return Err(GatewayError::PayloadTooLarge { limit: route.route.max_request_body.unwrap_or(0) })
            }
            Collected::Failed(e) => return Err(GatewayError::BadRequest(format!("request body: {e}"))),
        }
    } else if !body.is_end_stream() {
        let resp = Box::pin(pass_through(&req, request_body(&req, body))).await?;
        return Ok(with_status(route, resp, &Outcome::Bypass { reason: BypassReason::Body, stored: false }));
    }

    let bypass = credential_bypass(&facts, cfg);
    let chosen = choose_key(&req, cfg, post_body.as_deref(), bypass.is_none());
    let (primary, plugin_bypass) = (chosen.primary, chosen.plugin_bypass);
    let ctx = Ctx { req: req.clone(), cfg: cfg.clone(), cache: req.rt.cache.clone(), facts, primary, body: post_body };
    if let Some(reason) = plugin_bypass {
        // Neither read nor stored: the request goes through as the client sent it.
        let resp = Box::pin(pass_through(&req, buffered(ctx.body.as_ref()))).await?;
        return Ok(with_status(route, resp, &Outcome::PluginBypass { reason }));
    }
    if let Some(reason) = bypass {
        // Credentials: never served from the cache; stored only where RFC 9111 §3.5 allows.
        let f = Box::pin(fetch(&ctx, None, None, Mode::Credentialed, Purpose::PassThrough)).await?;
        return Ok(with_status(route, f.resp, &Outcome::Bypass { reason, stored: f.stored.is_ok() }));
    }
    lookup_and_serve(&ctx).await
}

/// Credentials keep the cache out unless the route shares private responses.
pub(crate) fn credential_bypass(facts: &RequestFacts, cfg: &RouteCache) -> Option<BypassReason> {
    if facts.cookie && !cfg.share_private {
        Some(BypassReason::Cookie)
    } else if facts.authorization && !cfg.share_private {
        Some(BypassReason::Authorization)
    } else {
        None
    }
}

/// The primary key of a request, and who chose it.
pub(crate) struct KeyChoice {
    pub primary: String,
    /// `policy` or `plugin`.
    pub by: &'static str,
    /// The plugin kept the cache out (its reason), or failed where that must keep it out.
    pub plugin_bypass: Option<String>,
}

/// The policy's key (route, method class, scheme, authority, `path?query`, body hash), unless
/// the route's plugin (asked only when `ask_plugin`) names its own or keeps the cache out.
pub(crate) fn choose_key(req: &RequestCtx, cfg: &RouteCache, body: Option<&[u8]>, ask_plugin: bool) -> KeyChoice {
    let route = req.route();
    let post = req.canon.method == Method::POST;
    let class = if post { "POST" } else { "GET" };
    let hash = body.map(key::body_hash);
    let c = &req.canon;
    let prefix = &route.key_prefix[usize::from(post)];
    let mut choice = KeyChoice {
        primary: key::primary_after(prefix, c.scheme, &c.authority, &c.path_query, hash.as_deref()),
        by: "policy",
        plugin_bypass: None,
    };
    // The plugin may change the key (never the sharing rules), or keep the cache out.
    let Some(plugin) = route_plugin(route).filter(|_| ask_plugin) else { return choice };
    match plugin.cache_key(&req.plugin_parts(body)) {
        Ok(KeyDecision::Key(k)) => {
            choice.primary = key::plugin(&route.route.name, class, &k);
            choice.by = "plugin";
        }
        Ok(KeyDecision::Bypass(reason)) => choice.plugin_bypass = Some(reason),
        // A failed call on a route that shares credentialed responses: the policy's key
        // would mix what the plugin keeps apart (tenants, say), so the cache stays out.
        Err(f) if cfg.share_private => choice.plugin_bypass = Some(format!("failed ({})", f.as_str())),
        // `Policy`, or a failed call: the policy's key.
        Ok(KeyDecision::Policy) | Err(_) => {}
    }
    choice
}

/// Looks up the primary key and, for a `Vary` marker, the request's variant: the entry and the
/// tier it came from, whether a Vary marker was found without the variant, and the full key.
pub(crate) async fn lookup(ctx: &Ctx) -> (Option<(Arc<Entry>, Level)>, bool, Cow<'_, str>) {
    match ctx.cache.get(&ctx.primary).await {
        Some((Object::Response(e), level)) => (Some((e, level)), false, Cow::Borrowed(&ctx.primary)),
        Some((Object::Vary { headers, .. }, _)) => {
            let sk = key::secondary(&ctx.primary, &headers, &ctx.req.canon.headers);
            match ctx.cache.get(&sk).await {
                Some((Object::Response(e), level)) if e.key == sk => (Some((e, level)), false, Cow::Owned(sk)),
                _ => (None, true, Cow::Owned(sk)),
            }
        }
        None => (None, false, Cow::Borrowed(&ctx.primary)),
    }
}

/// A hit's answer (`respond::answer`), counted like `with_status`. The request's id is in it:
/// `handle` does not write it again.
fn hit(ctx: &Ctx, e: &Entry, now: SystemTime, outcome: &Outcome) -> Response<Body> {
    let route = ctx.req.route();
    if let Some(m) = &route.cache_metrics {
        m.record(outcome);
    }
    let id = ctx.req.request_id.as_ref();
    let resp = answer(&ctx.req.canon, e, now, Some(outcome.header_value()), id);
    if id.is_some() {
        ctx.req.id_answered.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    resp
}

async fn lookup_and_serve(ctx: &Ctx) -> Result<Response<Body>, GatewayError> {
    let now = SystemTime::now();
    let (found, vary_miss, full_key) = lookup(ctx).await;
    if ctx.req.debug {
        let _ = ctx.req.cache_key.set(full_key.to_string());
    }
    // `client_no_cache: ignore`: what the client's own directives would force (no-cache,
    // max-age, min-fresh) is not asked of the origin; the request is served like any other.
    let ignored;
    let d = if ctx.cfg.client_no_cache {
        &ctx.facts.directives
    } else {
        ignored = ctx.facts.directives.without_forcing();
        &ignored
    };
    let req = &ctx.req.canon;
    let route = ctx.req.route();
    // `Range` is only looked up where the canonical survey saw a conditional or range field.
    let head_or_range = req.method == Method::HEAD || (req.conditional && req.headers.contains_key(header::RANGE));
    let charges_hits = route.route.budget.as_ref().is_some_and(|b| b.charge_hits);

    if let Some((e, level)) = found {
        let age = e.age(now);
        let meets_request =
            d.max_age.is_none_or(|m| age <= m) && d.min_fresh.is_none_or(|mf| e.fresh_for.saturating_sub(age) >= mf);
        let fresh = e.is_fresh(now);
        if fresh && meets_request && !d.no_cache {
            if charges_hits {
                // Boxed: a hit's future stays small on routes that do not charge hits.
                Box::pin(crate::proxy::meter::charge_hit(&ctx.req)).await?;
            }
            return Ok(hit(ctx, &e, now, &Outcome::Hit { level }));
        }
        let staleness = e.staleness(now);
        let may_be_stale = !fresh && !d.no_cache && !e.stale_forbidden && !e.revalidate_always;
        // The client accepts staleness explicitly (max-stale).
        if may_be_stale && d.max_stale.is_some_and(|ms| ms.is_none_or(|m| staleness <= m)) {
            if charges_hits {
                // Boxed: a hit's future stays small on routes that do not charge hits.
                Box::pin(crate::proxy::meter::charge_hit(&ctx.req)).await?;
            }
            return Ok(hit(ctx, &e, now, &Outcome::StaleHit { ttl: e.ttl_secs(now) }));
        }
        // stale-while-revalidate: answer now, refresh once in the background.
        if may_be_stale && staleness < e.stale_while_revalidate && d.max_age.is_none() && d.min_fresh.is_none() {
            if charges_hits {
                // Boxed: a hit's future stays small on routes that do not charge hits.
                Box::pin(crate::proxy::meter::charge_hit(&ctx.req)).await?;
            }
            spawn_refresh(ctx, &full_key, &e);
            return Ok(hit(ctx, &e, now, &Outcome::StaleHit { ttl: e.ttl_secs(now) }));
        }
        if d.only_if_cached {
            return Err(not_cached(route));
        }
        // Who pays: a refetch the client's own directives force (the entry would have served
        // it otherwise) is the client's miss; a stale entry's revalidation is Weir's own.
        let purpose = if d.no_cache || !meets_request { Purpose::Miss } else { Purpose::Revalidate };
        // The miss paths are boxed: a hit's future stays small (it is moved and polled often).
        let f = Box::pin(fetch_coalesced(ctx, &full_key, Some(&e), purpose)).await?;
        let outcome = match (f.fwd, f.stale_if_error, fresh) {
            (Fwd::Collapsed, _, _) => Outcome::Collapsed,
            (Fwd::Origin(fwd_status), Some(ttl), _) => Outcome::StaleIfError { fwd_status, ttl },
            (Fwd::Origin(_), None, true) => Outcome::Request { stored: f.stored },
            (Fwd::Origin(fwd_status), None, false) => Outcome::Revalidated { fwd_status, stored: f.stored },
        };
        return Ok(with_status(route, f.resp, &outcome));
    }

    if d.only_if_cached {
        return Err(not_cached(route));
    }
    if head_or_range {
        // HEAD and Range misses are not coalesced; a 206 or a HEAD answer is never stored, but
        // an origin that ignores Range answers 200 with the whole body, which may be.
        let f = Box::pin(fetch(ctx, None, None, Mode::PassRange, Purpose::Miss)).await?;
        return Ok(with_status(route, f.resp, &Outcome::Miss { vary: vary_miss, stored: f.stored }));
    }
    let f = Box::pin(fetch_coalesced(ctx, &full_key, None, Purpose::Miss)).await?;
    let outcome = match f.fwd {
        Fwd::Collapsed => Outcome::Collapsed,
        Fwd::Origin(_) => Outcome::Miss { vary: vary_miss, stored: f.stored },
    };
    Ok(with_status(route, f.resp, &outcome))
}

/// One upstream fetch per key: lead it, or wait for the leader and use its response when it
/// matches this request (Vary). When the leader fails, leadership passes to one waiter (the
/// first to join again) instead of every waiter going to the origin at once.
async fn fetch_coalesced(
    ctx: &Ctx,
    full_key: &str,
    stale: Option<&Arc<Entry>>,
    purpose: Purpose,
) -> Result<Fetched, GatewayError> {
    let t = ctx.req.route().route.timeouts;
    for _ in 0..HANDOFFS {
        match ctx.cache.flights.join(full_key) {
            Join::Leader(guard) => {
                // This instance's one fetch; across instances, one too (`redis.fill_lock`). Boxed:
                // a miss without the lock carries none of its state.
                if ctx.cache.fill_locks.is_some() {
                    return Box::pin(lead_fleet(ctx, full_key, stale, guard, purpose)).await;
                }
                return fetch(ctx, stale, Some(guard), Mode::Fill, purpose).await;
            }
            Join::Waiter(w) => match flight::wait(w, t.response + t.idle).await {
                FlightResult::Stored(e) if waiter_matches(ctx, &e) => {
                    let resp = serve_entry(&ctx.req.canon, &e, SystemTime::now());
                    return Ok(Fetched { resp, stored: Ok(()), fwd: Fwd::Collapsed, stale_if_error: None });
                }
                // The leader failed: take over (one of us leads, the rest wait again).
                FlightResult::Failed => continue,
                // Nothing to share (not storable, another variant, a wait past the timeouts).
                _ => break,
            },
        }
    }
    fetch(ctx, stale, None, Mode::Fill, purpose).await
}

/// This instance's leader with fill locks on: the fleet's turn (`fleet_turn`), then the fill
/// under the lock — extended while it runs, released (and announced) when dropped, however the
/// fill ends — or the other instance's entry.
async fn lead_fleet(
    ctx: &Ctx,
    full_key: &str,
    stale: Option<&Arc<Entry>>,
    guard: flight::FlightGuard,
    purpose: Purpose,
) -> Result<Fetched, GatewayError> {
    let t = ctx.req.route().route.timeouts;
    let lock = match fleet_turn(ctx, full_key, stale, t.connect + t.response).await {
        FleetTurn::Filled(e) => {
            guard.finish(FlightResult::Stored(e.clone()));
            let resp = serve_entry(&ctx.req.canon, &e, SystemTime::now());
            return Ok(Fetched { resp, stored: Ok(()), fwd: Fwd::Collapsed, stale_if_error: None });
        }
        FleetTurn::Fill(None) => return fetch(ctx, stale, Some(guard), Mode::Fill, purpose).await,
        FleetTurn::Fill(Some(lock)) => lock,
    };
    let fill = fetch(ctx, stale, Some(guard), Mode::Fill, purpose);
    tokio::pin!(fill);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + FILL_LOCK_TTL / 3, FILL_LOCK_TTL / 3);
    loop {
        tokio::select! {
            f = &mut fill => return f,
            _ = beat.tick() => lock.extend(),
        }
    }
}

/// How long a waiting instance waits for another's fill before it looks again (L2, the lock,
/// the breaker).
const FILL_WAIT_SLICE: std::time::Duration = std::time::Duration::from_millis(250);

/// Whose turn it is to fill a key across the instances sharing Redis.
enum FleetTurn {
    /// This instance's: with the lock, or without one (no `redis.fill_lock`, Redis away, or
    /// waiting took longer than `within`).
    Fill(Option<FillLock>),
    /// Another instance filled it: its entry, read from L2.
    Filled(Arc<Entry>),
}

/// Takes the fleet's fill lock for `full_key`, or waits for the instance that holds it and
/// reads what it stored. A holder that stores nothing (not storable, failed) hands the turn to
/// one waiter, not all: each takes the lock in turn. A dead holder's lock expires within
/// `FILL_LOCK_TTL`. Without Redis nothing is waited for (nor after a call to it timed out, until
/// one answers), and a breaker that opens ends a wait within `FILL_WAIT_SLICE`.
async fn fleet_turn(ctx: &Ctx, full_key: &str, stale: Option<&Arc<Entry>>, within: std::time::Duration) -> FleetTurn {
    let Some(l2) = &ctx.cache.fill_locks else { return FleetTurn::Fill(None) };
    let deadline = tokio::time::Instant::now() + within;
    loop {
        // Redis away, or its last call timed out (this request's own lookup, say): no wait.
        if !l2.redis.is_up() || !l2.redis.answering() {
            return FleetTurn::Fill(None);
        }
        let mut wait = match l2.fill_turn(full_key).await {
            Ok(Turn::Mine(lock)) => return FleetTurn::Fill(Some(lock)),
            Ok(Turn::Theirs(wait)) => wait,
            Err(_) => return FleetTurn::Fill(None),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return FleetTurn::Fill(None);
        }
        // Until the holder announces it is done — or a slice, then look again: an announcement
        // is lost when Redis fails under the holder (its release cannot get through), and a
        // breaker that opened meanwhile ends the wait.
        wait.done(left.min(FILL_WAIT_SLICE)).await;
        drop(wait);
        if let (Some((e, _)), _, _) = lookup(ctx).await {
            // What the holder stored: fresh, this request's variant, and not the stale entry
            // this request already had.
            let new = stale.is_none_or(|s| s.stored_at != e.stored_at);
            if new && e.is_fresh(SystemTime::now()) && waiter_matches(ctx, &e) {
                return FleetTurn::Filled(e);
            }
        }
    }
}

fn waiter_matches(ctx: &Ctx, e: &Entry) -> bool {
    if e.vary.is_empty() {
        e.key == ctx.primary
    } else {
        e.key == key::secondary(&ctx.primary, &e.vary, &ctx.req.canon.headers)
    }
}

fn spawn_refresh(ctx: &Ctx, full_key: &str, e: &Arc<Entry>) {
    if let Join::Leader(guard) = ctx.cache.flights.join(full_key) {
        let c = ctx.clone();
        let e = e.clone();
        tokio::spawn(async move {
            match fetch(&c, Some(&e), Some(guard), Mode::Fill, Purpose::Refresh).await {
                Ok(f) => {
                    tracing::debug!(key = %c.primary, fwd = ?f.fwd, stored = f.stored.is_ok(), "background refresh done")
                }
                Err(err) => tracing::debug!(key = %c.primary, error = %err, "background refresh failed"),
            }
        });
    }
}
