//! Admin operations that run a request through the data path without a client:
//! `POST /cache/warm` (fetch and store) and `GET /cache/explain` (what the cache would do).
//! Both build the request the way a client's is built — the canonical request, the router, the
//! route's key (policy or plugin) — so what they report is what a client would get.

use std::sync::Arc;
use std::time::SystemTime;

use futures_util::StreamExt as _;
use http::{HeaderMap, Method, Request};
use http_body_util::BodyExt as _;

use super::{choose_key, credential_bypass, serve, CACHE_STATUS};
use crate::cache::entry::Object;
use crate::cache::key;
use crate::cache::policy::RequestFacts;
use crate::cache::status::BypassReason;
use crate::config::OriginHeaders;
use crate::error::GatewayError;
use crate::proxy::body::ClientBody;
use crate::proxy::canonical::Canonical;
use crate::proxy::{ConnInfo, RequestCtx};
use crate::runtime::Runtime;

/// Warm-ups run at once, at most.
const WARM_CONCURRENCY: usize = 8;
/// Paths one warm call may name.
pub const MAX_WARM_PATHS: usize = 10_000;

/// A request made by Weir itself, as the router and the cache see it. A bare path (no
/// absolute URL, no `Host` header) addresses `default` (`localhost:PORT` of the first listener:
/// what `curl localhost:PORT/path` sends).
fn synthetic(
    rt: &Arc<Runtime>,
    method: Method,
    target: &str,
    headers: &HeaderMap,
    consumer: Option<String>,
    default: &(&'static str, String),
) -> Result<Arc<RequestCtx>, GatewayError> {
    let mut b = Request::builder().method(method).uri(target);
    for (k, v) in headers {
        b = b.header(k, v);
    }
    let (mut parts, ()) =
        b.body(()).map_err(|e| GatewayError::BadRequest(format!("invalid request `{target}`: {e}")))?.into_parts();
    let mut scheme = if parts.uri.scheme_str() == Some("https") { "https" } else { "http" };
    if parts.uri.authority().is_none() && !parts.headers.contains_key(http::header::HOST) {
        let host = http::HeaderValue::from_str(&default.1)
            .map_err(|_| GatewayError::BadRequest(format!("invalid default host `{}`", default.1)))?;
        parts.headers.insert(http::header::HOST, host);
        scheme = default.0;
    }
    let mut canon = Canonical::from_head(&mut parts, scheme, false, &rt.config.server.upgrade_protocols)?;
    // As phase 3 forwards a verified consumer: a cache keyed by consumer is warmed for this one.
    if let Some(v) = consumer.as_deref().and_then(|c| http::HeaderValue::from_str(c).ok()) {
        canon.headers.insert(crate::proxy::WEIR_CONSUMER.clone(), v);
    }
    let route = crate::proxy::route_of(rt, &canon)?;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let conn = ConnInfo::new(loopback, loopback, scheme);
    // Weir's own request: no consumer phase, no rate limit, budgets charge `_system`.
    Ok(Arc::new(RequestCtx {
        consumer,
        system: true,
        ..RequestCtx::new(rt.clone(), conn, false, canon, route, false, false)
    }))
}

/// `POST /cache/warm`: each path fetched through the cache path of its route (coalesced with
/// client misses, keyed by the policy or the plugin, charged to `_system`), a few at a time.
/// `stored` in each result: the path is in the cache now (stored by this call, or already).
pub async fn warm(
    rt: &Arc<Runtime>,
    paths: Vec<String>,
    headers: &HeaderMap,
    consumer: Option<String>,
    default: &(&'static str, String),
) -> Vec<serde_json::Value> {
    futures_util::stream::iter(paths)
        .map(|path| {
            let consumer = consumer.clone();
            async move {
                let (stored, reason, status, authority) = match warm_one(rt, &path, headers, consumer, default).await {
                    Ok(r) => r,
                    Err(e) => (false, e.code().to_string(), None, None),
                };
                serde_json::json!({"path": path, "authority": authority, "stored": stored, "reason": reason, "status": status})
            }
        })
        .buffered(WARM_CONCURRENCY)
        .collect()
        .await
}

async fn warm_one(
    rt: &Arc<Runtime>,
    path: &str,
    headers: &HeaderMap,
    consumer: Option<String>,
    default: &(&'static str, String),
) -> Result<(bool, String, Option<u16>, Option<String>), GatewayError> {
    let ctx = synthetic(rt, Method::GET, path, headers, consumer, default)?;
    let authority = Some(ctx.canon.authority.clone());
    let Some(cfg) = ctx.route().route.cache.clone() else {
        return Ok((false, "route has no cache".into(), None, authority));
    };
    let resp = serve(ctx, &cfg, ClientBody::Empty).await?;
    let status = resp.status().as_u16();
    let cache_status = resp.headers().get(&CACHE_STATUS).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    // Read to the end: a fill completes with its body.
    let _ = resp.into_body().collect().await;
    let fields: Vec<&str> = cache_status.split(';').map(str::trim).collect();
    let detail = fields.iter().find_map(|f| f.strip_prefix("detail=")).unwrap_or("");
    let (stored, reason) = if fields.contains(&"hit") {
        (true, "already cached".into())
    } else if fields.contains(&"stored") {
        (true, "stored".into())
    } else if fields.contains(&"collapsed") {
        // Answered by a concurrent fetch of the same key (another path of this call, or a
        // client's miss), which a waiter only shares when it was stored.
        (true, "coalesced".into())
    } else {
        (false, if detail.is_empty() { "not stored".into() } else { detail.to_string() })
    };
    Ok((stored, reason, Some(status), authority))
}

/// `GET /cache/explain`: the route, the canonical request, the key and who chose it, the
/// lifetime rules, and the entry in each tier now (read without promoting or refreshing it).
pub async fn explain(
    rt: &Arc<Runtime>,
    method: Method,
    url: &str,
    headers: &HeaderMap,
    consumer: Option<String>,
    default: &(&'static str, String),
) -> Result<serde_json::Value, GatewayError> {
    let ctx = synthetic(rt, method, url, headers, consumer, default)?;
    let route = ctx.route();
    let c = &ctx.canon;
    let canonical = serde_json::json!({
        "method": c.method.as_str(),
        "scheme": c.scheme,
        "authority": c.authority,
        "path": c.path(),
        "query": c.query(),
    });
    let mut out = serde_json::json!({"route": route.route.name, "canonical": canonical});
    let Some(cfg) = route.route.cache.clone() else {
        out["cache"] = serde_json::Value::Null;
        out["reason"] = "the route has no `cache` block: requests are proxied".into();
        return Ok(out);
    };
    let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs());
    out["rules"] = serde_json::json!({
        "ttl_s": secs(cfg.ttl),
        "origin_headers": if cfg.origin_headers == OriginHeaders::Respect { "respect" } else { "override" },
        "stale_while_revalidate_s": secs(cfg.stale_while_revalidate),
        "stale_if_error_s": secs(cfg.stale_if_error),
        "share_private": cfg.share_private,
        "methods": cfg.methods.iter().map(Method::as_str).collect::<Vec<_>>(),
        "targeted_fields": cfg.targeted_fields.iter().map(http::HeaderName::as_str).collect::<Vec<_>>(),
    });
    out["tags"] = route.route.invalidate.as_ref().map(|i| i.tags.clone()).unwrap_or_default().into();
    let facts = RequestFacts::of(&c.method, &c.headers);
    let bypass = credential_bypass(&facts, &cfg)
        .or_else(|| (!(c.method == Method::GET || c.method == Method::HEAD)).then_some(BypassReason::Method));
    let chosen = choose_key(&ctx, &cfg, None, bypass.is_none());
    out["bypass"] = bypass.map(|b| b.as_str().to_string()).or(chosen.plugin_bypass.clone()).into();
    out["decided_by"] = chosen.by.into();
    out["primary_key"] = chosen.primary.clone().into();
    let now = SystemTime::now();
    let describe = |obj: Option<Object>| -> (serde_json::Value, Option<Arc<[http::HeaderName]>>) {
        match obj {
            None => (serde_json::json!({"cached": false}), None),
            Some(Object::Vary { headers, .. }) => (serde_json::json!({"cached": false, "vary": true}), Some(headers)),
            Some(Object::Response(e)) => (
                serde_json::json!({
                    "cached": true,
                    "status": e.status.as_u16(),
                    "age_s": e.age(now).as_secs(),
                    "ttl_s": e.ttl_secs(now),
                    "fresh": e.is_fresh(now),
                    "stale_while_revalidate_s": e.stale_while_revalidate.as_secs(),
                    "stale_if_error_s": e.stale_if_error.as_secs(),
                    "tags": e.tags,
                    "bytes": e.body.len(),
                }),
                None,
            ),
        }
    };
    // L1, then the variant a Vary marker points this request to.
    let l1 = &rt.cache.l1;
    let (mut l1_view, vary) = describe(l1.lookup(&chosen.primary));
    let mut full_key = chosen.primary.clone();
    if let Some(names) = &vary {
        full_key = key::secondary(&chosen.primary, names, &c.headers);
        l1_view = describe(l1.lookup(&full_key)).0;
        l1_view["vary"] = names.iter().map(http::HeaderName::as_str).collect::<Vec<_>>().into();
    }
    out["l1"] = l1_view;
    out["l2"] = match &rt.cache.l2 {
        None => serde_json::json!({"configured": false}),
        Some(l2) => {
            let get = |k: String| async move { l2.get(&k).await };
            match get(chosen.primary.clone()).await {
                Ok(obj) => {
                    let (mut v, vary2) = describe(obj);
                    if let Some(names) = vary2 {
                        full_key = key::secondary(&chosen.primary, &names, &c.headers);
                        v = match get(full_key.clone()).await {
                            Ok(o) => describe(o).0,
                            Err(e) => serde_json::json!({"error": e.to_string()}),
                        };
                    }
                    v
                }
                Err(e) => serde_json::json!({"error": e.to_string()}),
            }
        }
    };
    out["key"] = full_key.into();
    Ok(out)
}
