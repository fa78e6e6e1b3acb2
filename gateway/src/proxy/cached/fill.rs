//! Phases 6–7 for a cached route: go upstream (through `proxy::upstream`), decide whether the
//! answer may be stored and for how long (policy, then plugin), store it, release coalesced
//! waiters; on failure serve a stale entry within its stale-if-error window.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::Frame;

use super::respond::serve_entry;
use super::{route_plugin, Ctx, Fetched, Fwd, CACHE_STATUS};
use crate::cache::entry::Entry;
use crate::cache::flight::{FlightGuard, FlightResult};
use crate::cache::key;
use crate::cache::policy::{self, Lifetime, NotStored};
use crate::error::GatewayError;
use crate::proxy::headers::{add_via, via_hop};
use crate::proxy::{content_length, upstream, Purpose};
use crate::{Body, BoxError};

static SURROGATE_KEY: header::HeaderName = header::HeaderName::from_static("surrogate-key");
static CACHE_TAG: header::HeaderName = header::HeaderName::from_static("cache-tag");

/// Bounds on tags taken from response headers, so an origin cannot bloat the index.
const MAX_TAGS: usize = 64;
const MAX_TAG_LEN: usize = 256;

/// How a fill goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A miss (or a client-directed refetch): stored when it may be.
    Fill,
    /// HEAD or Range miss: the client's `Range` goes along; a 206 is never stored.
    PassRange,
    /// Credentials: never served from the cache, stored only where RFC 9111 §3.5 allows.
    Credentialed,
}

/// Goes upstream (conditionally when `stale` has validators), stores what may be stored, and
/// releases coalesced waiters; on failure serves `stale` within its stale-if-error window.
pub(super) async fn fetch(
    ctx: &Ctx,
    stale: Option<&Arc<Entry>>,
    guard: Option<FlightGuard>,
    mode: Mode,
    purpose: Purpose,
) -> Result<Fetched, GatewayError> {
    let generation = ctx.cache.generation();
    let req = &ctx.req.canon;
    let mut head = ctx.req.upstream_head();
    // The cache asks for the whole representation: the client's conditionals and ranges are
    // answered from what comes back (or passed on for HEAD / Range misses).
    // (`conditional`: the client sent one of them; without it none is there to take out.)
    if req.conditional {
        for h in [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE, header::IF_MATCH, header::IF_UNMODIFIED_SINCE] {
            head.headers.remove(h);
        }
        if mode != Mode::PassRange {
            head.headers.remove(header::RANGE);
            head.headers.remove(header::IF_RANGE);
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
    // (The clock is read only when there is a stale entry to judge: not on a plain miss.)
    let sie = stale.filter(|e| {
        let now = SystemTime::now();
        !e.is_fresh(now) && e.staleness(now) <= e.stale_if_error && !e.stale_if_error.is_zero()
    });
    let route = ctx.req.route();
    let resp = match upstream(&ctx.req, purpose, head, buffered(ctx.body.as_ref())).await {
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
    crate::proxy::headers::strip_hop_by_hop(&mut rp.headers);
    rp.extensions = http::Extensions::new();

    if status == StatusCode::NOT_MODIFIED {
        if let Some(e) = stale {
            return Ok(revalidated(ctx, e, &rp.headers, guard, generation, now).await);
        }
    }

    let (lifetime, plugin_tags) = decide(ctx, status, &rp.headers, now);
    let declared = content_length(&rp.headers);
    let too_large = declared.is_some_and(|n| n > ctx.cache.max_object_bytes);
    let lifetime = match lifetime {
        Ok(_) if too_large => Err(NotStored::TooLarge),
        other => other,
    };
    // What this fill may buffer, from the process-wide budget (`cache.max_fill_bytes`).
    let permit = match &lifetime {
        Ok(_) => match ctx.cache.fill_budget.reserve(declared.unwrap_or(ctx.cache.max_object_bytes)) {
            Some(p) => Ok(p),
            None => Err(NotStored::Busy),
        },
        Err(r) => Err(*r),
    };
    let (l, permit) = match (lifetime, permit) {
        (Ok(l), Ok(p)) => (l, p),
        (_, Err(reason)) | (Err(reason), _) => {
            // Not storable: waiters go upstream on their own, at once.
            if let Some(g) = guard {
                g.finish(FlightResult::NotShared);
            }
            add_via(&mut rp.headers, rp.version);
            let resp = Response::from_parts(rp, rbody);
            return Ok(Fetched { resp, stored: Err(reason), fwd: Fwd::Origin(status.as_u16()), stale_if_error: None });
        }
    };
    let collected = collect(rbody, ctx.cache.max_object_bytes).await;
    drop(permit);
    match collected {
        Collected::Complete(bytes) => {
            // The client whose request filled the entry keeps its own cookies (a stored copy
            // never has them, so nobody else gets them).
            let (entry, cookies) = build_entry(ctx, status, rp.headers, bytes, &l, now, plugin_tags);
            let entry = Arc::new(entry);
            let stored = ctx.cache.store(&ctx.primary, entry.clone(), generation).await;
            if let Some(g) = guard {
                g.finish(if stored { FlightResult::Stored(entry.clone()) } else { FlightResult::NotShared });
            }
            let mut resp = serve_entry(req, &entry, now);
            for c in cookies {
                resp.headers_mut().append(header::SET_COOKIE, c);
            }
            Ok(Fetched {
                resp,
                stored: if stored { Ok(()) } else { Err(NotStored::Purged) },
                fwd: Fwd::Origin(status.as_u16()),
                stale_if_error: None,
            })
        }
        Collected::TooLarge(body) => {
            if let Some(g) = guard {
                g.finish(FlightResult::NotShared);
            }
            add_via(&mut rp.headers, rp.version);
            Ok(Fetched {
                resp: Response::from_parts(rp, body),
                stored: Err(NotStored::TooLarge),
                fwd: Fwd::Origin(status.as_u16()),
                stale_if_error: None,
            })
        }
        Collected::Failed(reason) => {
            drop(guard);
            Err(GatewayError::UpstreamUnavailable {
                upstream: route.upstreams.url(0).to_string(),
                reason: reason.to_string(),
            })
        }
    }
}

fn stale_answer(ctx: &Ctx, e: &Arc<Entry>, fwd_status: u16) -> Fetched {
    let now = SystemTime::now();
    Fetched {
        resp: serve_entry(&ctx.req.canon, e, now),
        stored: Err(NotStored::Status),
        fwd: Fwd::Origin(fwd_status),
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
    let req = &ctx.req.canon;
    let (decided, plugin_tags) = decide(ctx, e.status, &headers, now);
    match decided {
        Ok(l) => {
            // (A 304's cookies are not passed on: the stored answer is served as it is.)
            let (mut next, _cookies) = build_entry(ctx, e.status, headers, e.body.clone(), &l, now, plugin_tags);
            next.key = e.key.clone();
            let next = Arc::new(next);
            let stored = ctx.cache.store(&ctx.primary, next.clone(), generation).await;
            if let Some(g) = guard {
                g.finish(if stored { FlightResult::Stored(next.clone()) } else { FlightResult::NotShared });
            }
            Fetched {
                resp: serve_entry(req, &next, now),
                stored: if stored { Ok(()) } else { Err(NotStored::Purged) },
                fwd: Fwd::Origin(304),
                stale_if_error: None,
            }
        }
        Err(reason) => {
            drop(guard);
            let mut once = (**e).clone();
            once.headers = headers;
            once.headers.remove(header::SET_COOKIE);
            Fetched {
                resp: serve_entry(req, &once, now),
                stored: Err(reason),
                fwd: Fwd::Origin(304),
                stale_if_error: None,
            }
        }
    }
}

/// A buffered request body (a cached POST's) to send again; `None` when there is none.
pub(super) fn buffered(body: Option<&Bytes>) -> Option<Body> {
    body.filter(|b| !b.is_empty()).map(|b| Full::new(b.clone()).map_err(|never| match never {}).boxed())
}

/// The policy's storage decision, then the plugin's `ttl` hook: the plugin wins on lifetimes
/// and adds tags, but cannot store what the sharing rules forbid (RFC 9111 §3, DESIGN.md).
pub(super) fn decide(
    ctx: &Ctx,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> (Result<Lifetime, NotStored>, Vec<String>) {
    let decided = policy::decide(&ctx.cfg, &ctx.facts, status, headers, now);
    let Some(plugin) = route_plugin(ctx.req.route()) else {
        return (decided, Vec::new());
    };
    let base = match decided {
        Ok(l) => Some(l),
        Err(NotStored::NoFreshness) => None,
        Err(other) => return (Err(other), Vec::new()),
    };
    let resp = crate::plugin::response_for(plugin, status.as_u16(), headers, None);
    let parts = ctx.req.plugin_parts(ctx.body.as_deref());
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
    headers: HeaderMap,
    body: Bytes,
    l: &Lifetime,
    now: SystemTime,
    plugin_tags: Vec<String>,
) -> (Entry, Vec<HeaderValue>) {
    let mut tags: Vec<String> = ctx.req.route().route.invalidate.as_ref().map(|i| i.tags.clone()).unwrap_or_default();
    // One pass over the origin's head: what is stored, the tags it names, whether it varies,
    // and its cookies (the filling client's own, handed back). Not stored: cookies; `Age`,
    // `Content-Length`, `Cache-Status` and `X-Request-Id` (written below: a hit overwrites the
    // placeholders in place, so the cloned map never grows; an origin's request id is never
    // replayed); an origin's quota fields (they describe the request that filled the entry).
    let (age, length, via) = (header::AGE, header::CONTENT_LENGTH, header::VIA);
    let mut pairs: Vec<(&HeaderName, &[u8])> = Vec::with_capacity(headers.len() + 5);
    let mut cookies = Vec::new();
    let (mut ours, mut varies) = (false, false);
    for (k, v) in &headers {
        if *k == header::SET_COOKIE {
            cookies.push(v.clone());
            continue;
        }
        if *k == age
            || *k == length
            || *k == CACHE_STATUS
            || *k == crate::observe::X_REQUEST_ID
            || k.as_str() == "ratelimit"
            || k.as_str() == "ratelimit-policy"
        {
            continue;
        }
        if *k == via {
            ours |= v.as_bytes().ends_with(b"weir");
        } else if *k == header::VARY {
            varies = true;
        } else if *k == SURROGATE_KEY {
            let found = v.to_str().ok().into_iter().flat_map(str::split_whitespace);
            tags.extend(found.filter(|t| t.len() <= MAX_TAG_LEN).map(str::to_string));
        } else if *k == CACHE_TAG {
            let found = v.to_str().ok().into_iter().flat_map(|s| s.split(',')).map(str::trim);
            tags.extend(found.filter(|t| !t.is_empty() && t.len() <= MAX_TAG_LEN).map(str::to_string));
        }
        pairs.push((k, v.as_bytes()));
    }
    let mut vary = if varies { key::vary_names(&headers) } else { Vec::new() };
    if ctx.cfg.by_consumer {
        // Keyed by the verified consumer (a client can never send its own `Weir-Consumer`):
        // a variant per consumer, so purges of the path still reach every consumer's copy.
        key::add_name(&mut vary, crate::proxy::WEIR_CONSUMER.clone());
    }
    let key =
        if vary.is_empty() { ctx.primary.clone() } else { key::secondary(&ctx.primary, &vary, &ctx.req.canon.headers) };
    tags.extend(plugin_tags);
    tags.sort();
    tags.dedup();
    tags.truncate(MAX_TAGS);
    // Stored as served: our `Via` hop (another value of the list) and the exact length.
    if !ours {
        pairs.push((&via, via_hop(Version::HTTP_11).as_bytes()));
    }
    let mut digits = itoa::Buffer::new();
    pairs.push((&length, digits.format(body.len()).as_bytes()));
    pairs.push((&age, b"0"));
    pairs.push((&CACHE_STATUS, b"weir"));
    pairs.push((&crate::observe::X_REQUEST_ID, b"-"));
    // Header values parsed by hyper are slices of the connection's read buffer: a stored copy
    // would keep that whole buffer alive. Stored: one exact-size map, values in one buffer.
    let headers = crate::cache::entry::compact_headers(&pairs);
    let entry = Entry {
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
        path: ctx.req.canon.path_query.clone(),
        vary: vary.into(),
    };
    (entry, cookies)
}

/// A body read up to a bound: request bodies of cached POSTs, and responses being stored.
pub(super) enum Collected {
    Complete(Bytes),
    /// Past the object bound: what was read so far, then the rest, streamed.
    TooLarge(Body),
    Failed(BoxError),
}

/// Reads `body` (already idle-timed) up to `limit` bytes.
pub(super) async fn collect(body: Body, limit: u64) -> Collected {
    // A body of declared size is read into one allocation of that size: growing by doubling
    // (and the exact-size copy after) took up to three times the object at once per fill.
    let declared =
        http_body::Body::size_hint(&body).exact().filter(|&n| n <= limit).and_then(|n| usize::try_from(n).ok());
    let mut body = Box::pin(body);
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0));
    loop {
        match body.frame().await {
            // An exact-size copy when the buffer grew past what it holds: a stored body keeps
            // its whole allocation alive.
            None if buf.capacity() > buf.len() + buf.len() / 8 + 64 => {
                return Collected::Complete(Bytes::copy_from_slice(&buf))
            }
            None => return Collected::Complete(buf.freeze()),
            Some(Err(e)) => return Collected::Failed(e),
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
