//! Phase 8, writes: an unsafe method is forwarded; a 2xx or 3xx answer then invalidates the
//! target URI and same-origin `Location` / `Content-Location` (RFC 9111 §4.4), and a 2xx also
//! runs the route's `invalidate.tags` and the plugin's `invalidate` hook.
//!
//! A URL is purged as the keys a GET for it was stored under: on this request's host, under both
//! schemes (a route has one origin whichever listener a request came in on, so a write over
//! `http` changes what `https` readers were served: the reliability soak found HTTPS readers
//! served the old body for the whole entry's TTL), on the route that GET would match (routes
//! are often split by method), with the key that route computes (its plugin's, or the
//! policy's). A write to `/products` on one host never touches another host's `/products`, and
//! never ranges over an index of paths.

use crate::proxy::body::ClientBody;
use http::header;
use http::{Method, Response};

use super::{is_unsafe, route_plugin};
use crate::cache::{key, Purge};
use crate::error::GatewayError;
use crate::plugin::{KeyDecision, RequestParts};
use crate::proxy::canonical::{normalize_authority, normalize_path, normalize_query};
use crate::proxy::{finish_response, request_body, upstream, Purpose, RequestCtx};
use crate::router::RouteMatch;
use crate::Body;

/// Forwards a request that the cache does not serve; after a successful unsafe method,
/// invalidates what RFC 9111 §4.4 names, the route's `invalidate.tags` and the plugin's choice.
pub(in crate::proxy) async fn forward_and_invalidate(
    req: &std::sync::Arc<RequestCtx>,
    body: ClientBody,
) -> Result<Response<Body>, GatewayError> {
    let route = req.route();
    let c = &req.canon;
    let method = c.method.clone();
    let plugin = route_plugin(route).filter(|_| is_unsafe(&method));
    let preq = plugin.map(|p| p.request(&req.plugin_parts(None)));
    let resp = upstream(req, Purpose::Forward, req.upstream_head(), request_body(req, body)).await?;
    let resp = finish_response(resp);
    let status = resp.status();
    if !is_unsafe(&method) || !(status.is_success() || status.is_redirection()) {
        return Ok(resp);
    }
    let mut purge = Purge::default();
    // The URLs (`path?query`) purged; each is one invalidation in the metrics, whatever number of
    // keys (schemes, plugin keys) it stands for.
    let mut urls = vec![c.path_query.clone()];
    for h in [header::LOCATION, header::CONTENT_LOCATION] {
        if let Some(pq) = resp.headers().get(&h).and_then(|v| v.to_str().ok()).and_then(|v| same_origin(v, req)) {
            urls.push(pq);
        }
    }
    // Tags and the plugin's invalidations are the write's effects: only a success has them.
    if status.is_success() {
        if let Some(inv) = &route.route.invalidate {
            if inv.methods.contains(&method) {
                purge.tags.extend(inv.tags.iter().cloned());
            }
        }
        if let (Some(p), Some(preq)) = (plugin, &preq) {
            let presp = crate::plugin::response_for(p, status.as_u16(), resp.headers(), None);
            if let Ok(inv) = p.invalidate(preq, &presp) {
                // A plugin names its own keys (as its cache-key hook returns them) or URL paths.
                for k in &inv.keys {
                    if k.starts_with('/') {
                        if let Some(pq) = normalize_target(k) {
                            urls.push(pq);
                        }
                    } else {
                        purge.keys.push(key::plugin(&route.route.name, "GET", k));
                    }
                }
                purge.tags.extend(inv.tags);
                purge.prefixes.extend(inv.prefixes.iter().filter_map(|p| normalize_path(p).ok()));
            }
        }
    }
    urls.sort();
    urls.dedup();
    // The plugin's own keys, one invalidation each, then every URL's keys.
    let mut invalidated = purge.keys.len();
    for pq in &urls {
        let keys = get_keys(req, pq);
        invalidated += usize::from(!keys.is_empty());
        purge.keys.extend(keys);
    }
    purge.keys.sort();
    purge.keys.dedup();
    if !purge.is_empty() {
        let rt = &req.rt;
        rt.metrics.invalidations(&route.label, "key", invalidated);
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

/// The keys a GET for `path_query` on this request's host was stored under, over HTTP and over
/// HTTPS: on the route that GET matches, when it caches — the policy's key, and the plugin's
/// when it keys.
fn get_keys(req: &RequestCtx, path_query: &str) -> Vec<String> {
    let rt = &req.rt;
    let c = &req.canon;
    let path = path_query.split('?').next().unwrap_or(path_query);
    let RouteMatch::Found(i) = rt.router.route(Some(c.host()), path, &Method::GET) else { return Vec::new() };
    let route = &rt.routes[i];
    if route.route.cache.is_none() {
        return Vec::new();
    }
    let name = &route.route.name;
    let mut keys = Vec::with_capacity(4);
    for scheme in ["http", "https"] {
        keys.push(key::primary_after(&route.key_prefix[0], scheme, &c.authority, path_query, None));
        if let Some(p) = route_plugin(route) {
            let parts = RequestParts::new("GET", scheme, &c.authority, path_query, &c.headers, None)
                .with_consumer(req.consumer.as_deref());
            if let Ok(KeyDecision::Key(k)) = p.cache_key(&parts) {
                keys.push(key::plugin(name, "GET", &k));
            }
        }
    }
    keys
}

/// A normalised `path?query`, or `None` when it cannot be normalised.
fn normalize_target(v: &str) -> Option<String> {
    let (path, query) = v.split_once('?').map_or((v, None), |(p, q)| (p, Some(q)));
    let mut out = normalize_path(path).ok()?;
    if let Some(q) = query.map(normalize_query).transpose().ok()?.filter(|q| !q.is_empty()) {
        out.push('?');
        out.push_str(&q);
    }
    Some(out)
}

/// The normalised target of a `Location`-style value when it points at this request's origin.
fn same_origin(v: &str, req: &RequestCtx) -> Option<String> {
    let uri: http::Uri = v.parse().ok()?;
    // Either scheme: both are purged (see the module's note); the host must be this one.
    let scheme = match uri.scheme_str() {
        None => req.canon.scheme,
        Some(s) if s.eq_ignore_ascii_case("http") => "http",
        Some(s) if s.eq_ignore_ascii_case("https") => "https",
        Some(_) => return None,
    };
    if let Some(a) = uri.authority() {
        if normalize_authority(a.as_str(), scheme).ok()? != req.canon.authority {
            return None;
        }
    }
    let pq = uri.path_and_query()?.as_str();
    // A relative reference (`Location: 2`) is left alone: only absolute paths are purged.
    if !pq.starts_with('/') {
        return None;
    }
    normalize_target(pq)
}
