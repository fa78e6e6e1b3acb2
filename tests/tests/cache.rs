//! End-to-end HTTP cache behaviour (RFC 9111 as a shared cache, Cache-Status per RFC 9211),
//! counting what reaches a real origin through the real `weir` binary.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use weir_e2e::*;

/// An origin scripted by the request: `x-respond-status`, `x-respond-delay-ms`, and every other
/// `x-respond-NAME: V` comes back as `NAME: V`. The body names the path and how many times the
/// origin has answered it, so a test can tell a cached answer from a fresh one.
async fn scripted_origin() -> (Origin, Arc<Mutex<HashMap<String, u32>>>) {
    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let c = counts.clone();
    let origin = Origin::start(move |req| {
        let counts = c.clone();
        async move {
            let pq = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let n = {
                let mut m = counts.lock().unwrap();
                let e = m.entry(pq.clone()).or_insert(0);
                *e += 1;
                *e
            };
            let mut status = 200u16;
            let mut delay = 0u64;
            let mut headers = Vec::new();
            for (k, v) in req.headers() {
                let Some(name) = k.as_str().strip_prefix("x-respond-") else { continue };
                let v = v.to_str().unwrap().to_string();
                match name {
                    "status" => status = v.parse().unwrap(),
                    "delay-ms" => delay = v.parse().unwrap(),
                    _ => headers.push((name.to_string(), v)),
                }
            }
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            let text = if body.is_empty() {
                format!("{pq} n={n}")
            } else {
                format!("{pq} n={n} body={}", String::from_utf8_lossy(&body))
            };
            let mut r = weir_e2e::text(status, &text);
            for (k, v) in headers {
                r.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            r
        }
    })
    .await;
    (origin, counts)
}

fn config(origin: &Origin, cache: &str, extra: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\ncache:\n  l1_max_bytes: 16MiB\n  max_object_bytes: 1MiB\nroutes:\n  - name: api\n    upstream: {}\n    cache: {cache}\n    forward_headers: [\"x-respond-*\"]\n{extra}",
        origin.url()
    )
}

async fn call(gw: &Gateway, method: Method, path: &str, headers: &[(&str, &str)]) -> Got {
    call_body(gw, method, path, headers, "").await
}

async fn call_body(gw: &Gateway, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Got {
    let mut b = Request::builder().method(method).uri(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(full(body.to_string())).unwrap()).await
}

fn status(g: &Got) -> &str {
    g.header("cache-status").unwrap_or("<none>")
}

const CC: &str = "x-respond-cache-control";

#[tokio::test(flavor = "multi_thread")]
async fn miss_then_hit_with_age() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let a = call(&gw, Method::GET, "/p/1", &[(CC, "public, max-age=60")]).await;
    assert_eq!(status(&a), "weir; fwd=miss; stored");
    assert_eq!(a.text(), "/p/1 n=1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = call(&gw, Method::GET, "/p/1", &[(CC, "public, max-age=60")]).await;
    assert_eq!(status(&b), "weir; hit; detail=l1");
    assert_eq!(b.text(), "/p/1 n=1");
    assert!(b.header("age").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(origin.count(), 1);
    // The query is order-insensitive in the key.
    call(&gw, Method::GET, "/q?a=1&b=2", &[(CC, "max-age=60")]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/q?b=2&a=1", &[]).await), "weir; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread")]
async fn freshness_from_origin_headers() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    // cache: {} (no ttl) stores only what the origin allows.
    call(&gw, Method::GET, "/silent", &[]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/silent", &[]).await), "weir; fwd=miss; detail=no-freshness");
    // s-maxage wins over max-age.
    call(&gw, Method::GET, "/smax", &[(CC, "max-age=0, s-maxage=60")]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/smax", &[]).await), "weir; hit; detail=l1");
    // Expires relative to Date.
    let now = std::time::SystemTime::now();
    let date = httpdate(now);
    let exp = httpdate(now + Duration::from_secs(60));
    call(&gw, Method::GET, "/exp", &[("x-respond-date", &date), ("x-respond-expires", &exp)]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/exp", &[]).await), "weir; hit; detail=l1");
    // Heuristic freshness from Last-Modified (10 % of its age).
    let lm = httpdate(now - Duration::from_secs(3600));
    call(&gw, Method::GET, "/lm", &[("x-respond-last-modified", &lm)]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/lm", &[]).await), "weir; hit; detail=l1");
    // ...but not for a status that is not heuristically cacheable.
    call(
        &gw,
        Method::GET,
        "/lm302",
        &[("x-respond-last-modified", &lm), ("x-respond-status", "302"), ("x-respond-location", "/x")],
    )
    .await;
    assert!(status(&call(&gw, Method::GET, "/lm302", &[]).await).contains("fwd=miss"));
    // max-age expiry.
    call(&gw, Method::GET, "/short", &[(CC, "max-age=1")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let g = call(&gw, Method::GET, "/short", &[(CC, "max-age=1")]).await;
    assert!(status(&g).starts_with("weir; fwd=stale"), "{}", status(&g));
    assert_eq!(g.text(), "/short n=2");
}

fn httpdate(t: std::time::SystemTime) -> String {
    // RFC 9110 IMF-fixdate without a date crate in the test harness.
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86_400;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // civil-from-days (Howard Hinnant)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][(mo - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {h:02}:{m:02}:{s:02} GMT")
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_that_must_not_be_shared() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s }", ""));
    for (path, headers, detail) in [
        ("/ns", vec![(CC, "no-store")], "no-store"),
        ("/priv", vec![(CC, "private, max-age=60")], "private"),
        ("/sc", vec![("x-respond-set-cookie", "session=1")], "set-cookie"),
        ("/vs", vec![("x-respond-vary", "*")], "vary-star"),
    ] {
        let a = call(&gw, Method::GET, path, &headers).await;
        assert_eq!(status(&a), format!("weir; fwd=miss; detail={detail}"), "{path}");
        let b = call(&gw, Method::GET, path, &[]).await;
        assert!(!status(&b).contains("hit"), "{path}: {}", status(&b));
    }
    // Requests with Cookie or Authorization never read from the cache...
    call(&gw, Method::GET, "/shared", &[(CC, "max-age=60")]).await;
    let c = call(&gw, Method::GET, "/shared", &[("cookie", "s=1")]).await;
    assert_eq!(status(&c), "weir; fwd=bypass; detail=cookie");
    assert_eq!(c.text(), "/shared n=2");
    let a = call(&gw, Method::GET, "/shared", &[("authorization", "Bearer t")]).await;
    assert_eq!(status(&a), "weir; fwd=bypass; detail=authorization");
    // ...and an authenticated response is stored only when it says it may be (§3.5).
    let auth = call(&gw, Method::GET, "/authd", &[("authorization", "Bearer t")]).await;
    assert_eq!(status(&auth), "weir; fwd=bypass; detail=authorization");
    assert!(status(&call(&gw, Method::GET, "/authd", &[]).await).contains("fwd=miss"));
    let pubd = call(&gw, Method::GET, "/pub", &[("authorization", "Bearer t"), (CC, "public, max-age=60")]).await;
    assert_eq!(status(&pubd), "weir; fwd=bypass; detail=authorization; stored");
    assert_eq!(status(&call(&gw, Method::GET, "/pub", &[]).await), "weir; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread")]
async fn share_private_stores_but_never_keeps_set_cookie() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s, share_private: true }", ""));
    let a = call(&gw, Method::GET, "/me", &[("cookie", "s=1"), ("x-respond-set-cookie", "session=abc")]).await;
    assert_eq!(status(&a), "weir; fwd=miss; stored");
    let b = call(&gw, Method::GET, "/me", &[("cookie", "s=1")]).await;
    assert_eq!(status(&b), "weir; hit; detail=l1");
    assert!(b.header("set-cookie").is_none(), "a stored copy must not keep Set-Cookie");
}

#[tokio::test(flavor = "multi_thread")]
async fn override_mode_uses_the_policy_ttl() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s, origin_headers: override }", ""));
    call(&gw, Method::GET, "/o", &[(CC, "max-age=0, no-cache")]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/o", &[]).await), "weir; hit; detail=l1");
    call(&gw, Method::GET, "/op", &[(CC, "private")]).await;
    assert!(!status(&call(&gw, Method::GET, "/op", &[]).await).contains("hit"));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_directives() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    call(&gw, Method::GET, "/r", &[(CC, "max-age=60")]).await;
    let nc = call(&gw, Method::GET, "/r", &[("cache-control", "no-cache")]).await;
    assert_eq!(status(&nc), "weir; fwd=request; detail=no-freshness");
    call(&gw, Method::GET, "/r2", &[(CC, "max-age=60")]).await;
    let ma0 = call(&gw, Method::GET, "/r2", &[("cache-control", "max-age=0"), (CC, "max-age=60")]).await;
    assert_eq!(status(&ma0), "weir; fwd=request; stored");
    let mf = call(&gw, Method::GET, "/r2", &[("cache-control", "min-fresh=3600"), (CC, "max-age=60")]).await;
    assert!(status(&mf).starts_with("weir; fwd=request"), "{}", status(&mf));
    // only-if-cached: 504 when nothing is stored, a hit otherwise.
    let oic = call(&gw, Method::GET, "/never", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(oic.status, 504);
    assert_eq!(oic.json()["error"], "not_cached");
    assert_eq!(
        status(&call(&gw, Method::GET, "/r2", &[("cache-control", "only-if-cached")]).await),
        "weir; hit; detail=l1"
    );
    // no-store: nothing stored.
    call(&gw, Method::GET, "/r3", &[("cache-control", "no-store"), (CC, "max-age=60")]).await;
    assert!(status(&call(&gw, Method::GET, "/r3", &[]).await).contains("fwd=miss"));
    // max-stale accepts a stale entry without going forward.
    call(&gw, Method::GET, "/r4", &[(CC, "max-age=1")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let ms = call(&gw, Method::GET, "/r4", &[("cache-control", "max-stale=60")]).await;
    assert!(status(&ms).starts_with("weir; hit; ttl=-"), "{}", status(&ms));
    assert_eq!(ms.text(), "/r4 n=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn conditional_requests_and_revalidation() {
    let (origin, counts) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let etag = "\"v1\"";
    call(&gw, Method::GET, "/c", &[(CC, "max-age=60"), ("x-respond-etag", etag)]).await;
    let inm = call(&gw, Method::GET, "/c", &[("if-none-match", "\"zz\", W/\"v1\"")]).await;
    assert_eq!(inm.status, 304);
    assert_eq!(status(&inm), "weir; hit; detail=l1");
    assert!(inm.body.is_empty());
    let other = call(&gw, Method::GET, "/c", &[("if-none-match", "\"v2\"")]).await;
    assert_eq!(other.status, 200);
    // no-cache responses are stored but revalidated on every use: origin answers 304.
    call(&gw, Method::GET, "/nc", &[(CC, "no-cache"), ("x-respond-etag", etag), ("x-respond-x-version", "1")]).await;
    let r = call(
        &gw,
        Method::GET,
        "/nc",
        &[("x-respond-status", "304"), ("x-respond-etag", etag), ("x-respond-x-version", "2"), (CC, "no-cache")],
    )
    .await;
    assert_eq!(r.status, 200, "the client did not ask conditionally");
    assert_eq!(status(&r), "weir; fwd=stale; fwd-status=304; stored");
    assert_eq!(r.text(), "/nc n=1", "body comes from the stored entry");
    assert_eq!(r.header("x-version"), Some("2"), "304 updates stored headers");
    let seen = origin.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.headers["if-none-match"], etag, "revalidation is conditional");
    assert_eq!(counts.lock().unwrap()["/nc"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn vary_selects_variants() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let v = [(CC, "max-age=60"), ("x-respond-vary", "Accept-Language")];
    let en = call(&gw, Method::GET, "/v", &[v[0], v[1], ("accept-language", "en")]).await;
    assert_eq!(status(&en), "weir; fwd=miss; stored");
    let fr = call(&gw, Method::GET, "/v", &[v[0], v[1], ("accept-language", "fr")]).await;
    assert_eq!(status(&fr), "weir; fwd=vary-miss; stored");
    let en2 = call(&gw, Method::GET, "/v", &[("accept-language", "en")]).await;
    assert_eq!(status(&en2), "weir; hit; detail=l1");
    assert_eq!(en2.text(), en.text());
    let fr2 = call(&gw, Method::GET, "/v", &[("accept-language", "fr")]).await;
    assert_eq!(fr2.text(), fr.text());
    assert_ne!(en.text(), fr.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn head_and_range_are_served_from_the_get_entry() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    // Misses pass through and are never stored as the whole response.
    let head_miss = call(&gw, Method::HEAD, "/h", &[(CC, "max-age=60")]).await;
    assert_eq!(status(&head_miss), "weir; fwd=miss; detail=method");
    let range_miss = call(
        &gw,
        Method::GET,
        "/rg",
        &[
            (CC, "max-age=60"),
            ("range", "bytes=0-3"),
            ("x-respond-status", "206"),
            ("x-respond-content-range", "bytes 0-3/99"),
        ],
    )
    .await;
    assert_eq!(range_miss.status, 206);
    assert_eq!(status(&range_miss), "weir; fwd=miss; detail=partial");
    assert!(status(&call(&gw, Method::GET, "/rg", &[(CC, "max-age=60")]).await).contains("fwd=miss"));
    // An origin that ignores Range answers 200 whole: stored, and the client still gets its range.
    let whole = call(&gw, Method::GET, "/rg2", &[(CC, "max-age=60"), ("range", "bytes=0-3")]).await;
    assert_eq!(whole.status, 206);
    assert_eq!(status(&whole), "weir; fwd=miss; stored");

    let full = call(&gw, Method::GET, "/h", &[(CC, "max-age=60")]).await;
    let head = call(&gw, Method::HEAD, "/h", &[]).await;
    assert_eq!(status(&head), "weir; hit; detail=l1");
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length").unwrap(), full.body.len().to_string());
    let part = call(&gw, Method::GET, "/h", &[("range", "bytes=1-3")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, full.body.slice(1..4));
    assert_eq!(part.header("content-range").unwrap(), format!("bytes 1-3/{}", full.body.len()));
    let bad = call(&gw, Method::GET, "/h", &[("range", "bytes=999-")]).await;
    assert_eq!(bad.status, 416);
    let before = origin.count();
    call(&gw, Method::GET, "/h", &[("range", "bytes=-2")]).await;
    assert_eq!(origin.count(), before, "ranges of a cached entry never reach the origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn unsafe_methods_invalidate_uri_location_and_tags() {
    let (origin, _) = scripted_origin().await;
    let extra = "    invalidate:\n      methods: [POST, PUT, DELETE]\n      tags: [catalog]\n";
    let gw = Gateway::start(&config(&origin, "{}", extra));
    for p in ["/items/1", "/items/2", "/items?page=1", "/other"] {
        call(&gw, Method::GET, p, &[(CC, "max-age=60")]).await;
        assert_eq!(status(&call(&gw, Method::GET, p, &[]).await), "weir; hit; detail=l1");
    }
    // A failed write invalidates nothing.
    call(&gw, Method::PUT, "/items/1", &[("x-respond-status", "500")]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/items/1", &[]).await), "weir; hit; detail=l1");
    // PUT /items/1: its URI; the route's static tag `catalog` covers every entry of the route.
    let w = call(&gw, Method::PUT, "/items/1", &[]).await;
    assert_eq!(status(&w), "weir; fwd=bypass; detail=method");
    for p in ["/items/1", "/items/2", "/items?page=1", "/other"] {
        assert!(status(&call(&gw, Method::GET, p, &[(CC, "max-age=60")]).await).contains("fwd=miss"), "{p} survived");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn location_header_of_a_write_is_invalidated() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    call(&gw, Method::GET, "/things/9", &[(CC, "max-age=60")]).await;
    call(&gw, Method::GET, "/things/8", &[(CC, "max-age=60")]).await;
    call(&gw, Method::POST, "/things", &[("x-respond-status", "201"), ("x-respond-location", "/things/9")]).await;
    assert!(status(&call(&gw, Method::GET, "/things/9", &[(CC, "max-age=60")]).await).contains("fwd=miss"));
    assert_eq!(status(&call(&gw, Method::GET, "/things/8", &[]).await), "weir; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_purge_by_key_tag_and_prefix() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    for (p, tag) in [("/a/1", "t1"), ("/a/2", "t2"), ("/b/1", "t2"), ("/c/1", "t3")] {
        call(&gw, Method::GET, p, &[(CC, "max-age=60"), ("x-respond-surrogate-key", tag)]).await;
    }
    let purge = |body: &'static str| {
        let url = gw.admin_url("/cache/purge");
        async move {
            send(&client(), Request::post(url).header("content-type", "application/json").body(full(body)).unwrap())
                .await
        }
    };
    assert_eq!(purge(r#"{"keys": ["/a/1"]}"#).await.json()["purged"], 1);
    assert_eq!(purge(r#"{"tags": ["t2"]}"#).await.json()["purged"], 2);
    assert_eq!(purge(r#"{"prefixes": ["/c/"]}"#).await.json()["purged"], 1);
    for p in ["/a/1", "/a/2", "/b/1", "/c/1"] {
        assert!(status(&call(&gw, Method::GET, p, &[]).await).contains("fwd=miss"), "{p} survived");
    }
    let bad = purge(r#"{"nope": 1}"#).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "bad_request");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_wins_over_a_fetch_already_in_flight() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let url = gw.url("/slowly");
    let inflight = tokio::spawn(async move {
        send(
            &client(),
            Request::get(url).header(CC, "max-age=60").header("x-respond-delay-ms", "800").body(full("")).unwrap(),
        )
        .await
    });
    while origin.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let purged = send(
        &client(),
        Request::post(gw.admin_url("/cache/purge"))
            .header("content-type", "application/json")
            .body(full(r#"{"keys": ["/slowly"]}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(purged.status, 200);
    let first = inflight.await.unwrap();
    assert_eq!(status(&first), "weir; fwd=miss; detail=purged");
    assert!(status(&call(&gw, Method::GET, "/slowly", &[(CC, "max-age=60")]).await).contains("fwd=miss"));
}

#[tokio::test(flavor = "multi_thread")]
async fn post_is_cached_by_body_only_when_enabled() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s, methods: [POST], max_key_body_bytes: 64 }", ""));
    let q1 = r#"{"query":"a"}"#;
    let a = call_body(&gw, Method::POST, "/graphql", &[], q1).await;
    assert_eq!(status(&a), "weir; fwd=miss; stored");
    let b = call_body(&gw, Method::POST, "/graphql", &[], q1).await;
    assert_eq!(status(&b), "weir; hit; detail=l1");
    assert_eq!(b.text(), a.text());
    let c = call_body(&gw, Method::POST, "/graphql", &[], r#"{"query":"b"}"#).await;
    assert_eq!(status(&c), "weir; fwd=miss; stored");
    assert!(c.text().contains(r#"body={"query":"b"}"#), "the origin gets the body: {}", c.text());
    let big = "x".repeat(200);
    let d = call_body(&gw, Method::POST, "/graphql", &[], &big).await;
    assert_eq!(status(&d), "weir; fwd=bypass; detail=body-too-large");
    assert!(d.text().ends_with(&big), "an oversized body still reaches the origin whole");
    // Without `methods: [POST]` a POST is a write.
    let (origin2, _) = scripted_origin().await;
    let gw2 = Gateway::start(&config(&origin2, "{ ttl: 60s }", ""));
    call_body(&gw2, Method::POST, "/graphql", &[], q1).await;
    assert_eq!(status(&call_body(&gw2, Method::POST, "/graphql", &[], q1).await), "weir; fwd=bypass; detail=method");
}

#[tokio::test(flavor = "multi_thread")]
async fn deception_paths_key_what_is_forwarded() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s }", ""));
    // Dot segments are resolved and the origin is asked for the resolved path.
    let a = call(&gw, Method::GET, "/static/%2e%2e/account", &[]).await;
    assert_eq!(origin.seen().last().unwrap().uri.path(), "/account");
    assert_eq!(status(&call(&gw, Method::GET, "/account", &[]).await), "weir; hit; detail=l1");
    assert_eq!(a.text(), "/account n=1");
    // An encoded slash is not a slash: different key, forwarded as sent.
    call(&gw, Method::GET, "/a%2fb", &[]).await;
    assert!(status(&call(&gw, Method::GET, "/a/b", &[]).await).contains("fwd=miss"));
    // `..%2f` does not climb.
    call(&gw, Method::GET, "/x/..%2fsecret", &[]).await;
    assert_eq!(origin.seen().last().unwrap().uri.path(), "/x/..%2Fsecret");
    // Path parameters are part of the key.
    call(&gw, Method::GET, "/acct;x.css", &[]).await;
    assert!(status(&call(&gw, Method::GET, "/acct", &[]).await).contains("fwd=miss"));
    // Malformed escapes are refused: no route, key or origin ever sees them.
    let n = origin.count();
    let bad = call(&gw, Method::GET, "/bad%zz", &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "bad_request");
    assert_eq!(origin.count(), n);
    // Host case and trailing dot do not split the key.
    call(&gw, Method::GET, "/h", &[("host", "Shop.Example.")]).await;
    assert_eq!(status(&call(&gw, Method::GET, "/h", &[("host", "shop.example")]).await), "weir; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_requests_for_a_cold_key_make_one_origin_request() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s }", ""));
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let c = c.clone();
        let url = gw.url("/cold");
        tasks.push(tokio::spawn(async move {
            send(&c, Request::get(url).header("x-respond-delay-ms", "300").body(full("")).unwrap()).await
        }));
    }
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.status, 200);
        assert_eq!(g.text(), "/cold n=1");
        *outcomes.entry(status(&g).to_string()).or_default() += 1;
    }
    assert_eq!(origin.count(), 1, "outcomes: {outcomes:?}");
    assert_eq!(outcomes.get("weir; fwd=miss; stored"), Some(&1), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn waiters_of_an_uncacheable_or_failed_leader_go_upstream_themselves() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s }", ""));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let url = gw.url("/flaky");
        tasks.push(tokio::spawn(async move {
            // The first request leads and gets a 500 (not storable); the others wait, then go.
            let status = if i == 0 { "500" } else { "200" };
            let delay = if i == 0 { "1000" } else { "0" };
            send(
                &client(),
                Request::get(url)
                    .header("x-respond-status", status)
                    .header("x-respond-delay-ms", delay)
                    .body(full(""))
                    .unwrap(),
            )
            .await
        }));
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let g = tokio::time::timeout(Duration::from_secs(10), t).await.expect("a waiter hung").unwrap();
        assert_eq!(g.status, if i == 0 { 500 } else { 200 }, "request {i}: {}", status(&g));
        if i > 0 {
            assert_ne!(g.text(), "/flaky n=1", "a waiter was served the leader's 500");
        }
    }
    // The leader, then the released waiters, each on its own (one may find another's answer).
    assert!((3..=5).contains(&origin.count()), "origin asked {} times", origin.count());
}

#[tokio::test(flavor = "multi_thread")]
async fn coalesced_waiters_with_other_vary_values_fetch_their_own() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ ttl: 60s }", ""));
    let mut tasks = Vec::new();
    for lang in ["en", "en", "fr", "en", "fr"] {
        let url = gw.url("/lang");
        tasks.push(tokio::spawn(async move {
            let r = Request::get(url)
                .header("accept-language", lang)
                .header("x-respond-vary", "accept-language")
                .header("x-respond-content-language", lang)
                .header("x-respond-delay-ms", "300")
                .body(full(""))
                .unwrap();
            (lang, send(&client(), r).await)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        let (lang, g) = t.await.unwrap();
        assert_eq!(g.header("content-language"), Some(lang), "a waiter got another variant: {}", status(&g));
        if lang == "en" {
            assert_eq!(g.text(), "/lang n=1", "the en waiters share the leader's fetch");
        }
    }
    // One fetch for en (the leader), one or two for fr (its waiters were released to fetch).
    assert!((2..=3).contains(&origin.count()), "origin asked {} times", origin.count());
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let (origin, counts) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{ stale_while_revalidate: 30s }", ""));
    call(&gw, Method::GET, "/swr", &[(CC, "max-age=1")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = gw.url("/swr");
        tasks.push(tokio::spawn(async move {
            // The refresh is slow, so every one of these requests meets the stale entry; the
            // refreshed copy lives long enough to be seen fresh afterwards.
            let r =
                Request::get(url).header(CC, "max-age=60").header("x-respond-delay-ms", "1500").body(full("")).unwrap();
            send(&client(), r).await
        }));
    }
    for t in tasks {
        let g = t.await.unwrap();
        assert!(status(&g).starts_with("weir; hit; ttl=-"), "{}", status(&g));
        assert_eq!(g.text(), "/swr n=1");
    }
    let mut refreshed = None;
    for _ in 0..100 {
        let g = call(&gw, Method::GET, "/swr", &[]).await;
        if g.text() == "/swr n=2" {
            refreshed = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = refreshed.expect("the background refresh never landed");
    assert_eq!(status(&fresh), "weir; hit; detail=l1");
    assert_eq!(counts.lock().unwrap()["/swr"], 2, "exactly one background refresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_if_error_serves_stale_when_the_origin_fails() {
    let (origin, _) = scripted_origin().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    cache: {{ stale_if_error: 60s }}\n    forward_headers: [\"x-respond-*\"]\n",
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    call(&gw, Method::GET, "/sie", &[(CC, "max-age=1")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Origin answers 503: the stale copy is served.
    let g = call(&gw, Method::GET, "/sie", &[("x-respond-status", "503")]).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.text(), "/sie n=1");
    assert!(status(&g).starts_with("weir; fwd=stale; fwd-status=503; ttl=-"), "{}", status(&g));
    // must-revalidate forbids it.
    call(&gw, Method::GET, "/mr", &[(CC, "max-age=1, must-revalidate")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let g = call(&gw, Method::GET, "/mr", &[("x-respond-status", "503")]).await;
    assert_eq!(g.status, 503);
    // Origin down entirely: reload onto a dead upstream, keep the cache.
    std::fs::write(&gw.config_path, yaml.replace(&origin.url(), &dead)).unwrap();
    let r = gw.reload().await;
    assert_eq!(r.status, 200);
    let g = call(&gw, Method::GET, "/sie", &[]).await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert!(status(&g).starts_with("weir; fwd=stale; fwd-status=502"), "{}", status(&g));
}

#[tokio::test(flavor = "multi_thread")]
async fn large_objects_stream_through_uncached() {
    let origin = Origin::start(|_req| async {
        let mut r = Response::new(full(Bytes::from(vec![b'z'; 3 << 20])));
        r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let g = call(&gw, Method::GET, "/big", &[]).await;
    assert_eq!(g.body.len(), 3 << 20);
    assert_eq!(status(&g), "weir; fwd=miss; detail=too-large");
    call(&gw, Method::GET, "/big", &[]).await;
    assert_eq!(origin.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn l1_never_exceeds_its_byte_bound() {
    let origin = Origin::start(|_req| async {
        let mut r = Response::new(full(Bytes::from(vec![b'q'; 100 << 10])));
        r.headers_mut().insert("cache-control", "max-age=600".parse().unwrap());
        r
    })
    .await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\ncache:\n  l1_max_bytes: 1MiB\nroutes:\n  - name: api\n    upstream: {}\n    cache: {{}}\n",
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    // 10× the capacity.
    for i in 0..100 {
        let g = send(&c, Request::get(gw.url(&format!("/obj/{i}"))).body(full("")).unwrap()).await;
        assert_eq!(g.status, 200);
    }
    let health = get(&gw.admin_url("/health")).await.json();
    let bytes = health["l1"]["bytes"].as_u64().unwrap();
    let entries = health["l1"]["entries"].as_u64().unwrap();
    assert!(bytes <= 1 << 20, "L1 holds {bytes} bytes, bound is 1 MiB");
    assert!((1..=10).contains(&entries), "{entries} entries of 100 KiB in 1 MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_requests_and_cache_outcomes() {
    let (origin, _) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    call(&gw, Method::GET, "/m", &[(CC, "max-age=60")]).await;
    call(&gw, Method::GET, "/m", &[]).await;
    call(&gw, Method::GET, "/m", &[]).await;
    call(&gw, Method::PUT, "/m", &[]).await;
    let text = get(&gw.admin_url("/metrics")).await.text();
    for line in [
        "weir_requests_total{route=\"api\",status=\"200\"} 4",
        "weir_cache_hits_total{route=\"api\",level=\"l1\"} 2",
        "weir_cache_misses_total{route=\"api\"} 1",
        "weir_cache_invalidations_total{route=\"api\",kind=\"key\"} 1",
        "weir_upstream_duration_seconds_count 2",
        "weir_l1_entries 0",
        "weir_redis_up 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("weir_l1_bytes ")), "{text}");
}

/// RFC 9110 §5.6.7 HTTP-date forms for `Expires` (IMF-fixdate, RFC 850, asctime, any case).
fn date_forms(t: std::time::SystemTime) -> [String; 4] {
    let imf = httpdate(t); // "Sun, 06 Nov 1994 08:49:37 GMT"
    let p: Vec<&str> = imf.split(' ').collect();
    let (wd, d, mon, y, hms) = (p[0].trim_end_matches(','), p[1], p[2], p[3], p[4]);
    let full = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
        .into_iter()
        .find(|f| f.starts_with(wd))
        .unwrap();
    let rfc850 = format!("{full}, {d}-{mon}-{} {hms} GMT", &y[2..]);
    let asctime = format!("{wd} {mon} {:>2} {hms} {y}", d.trim_start_matches('0'));
    [imf.clone(), rfc850, asctime, imf.to_lowercase()]
}

/// Conformance edge cases (RFC 9111): `Age` lists and repeated lines, any status with explicit
/// freshness, and `Expires` in every HTTP-date form.
#[tokio::test(flavor = "multi_thread")]
async fn age_lists_any_status_and_every_expires_form() {
    let (origin, counts) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let n = |p: &str| counts.lock().unwrap().get(p).copied().unwrap_or(0);
    // `Age: 7200, 0`: 7200 s old, so max-age=3600 is already stale (a list counts by its first
    // member); two Age lines: the first counts; an invalid Age is ignored.
    call(&gw, Method::GET, "/age-list", &[(CC, "max-age=3600"), ("x-respond-age", "7200, 0")]).await;
    call(&gw, Method::GET, "/age-list", &[]).await;
    assert_eq!(n("/age-list"), 2, "a stale entry is not a hit");
    call(&gw, Method::GET, "/age-lines", &[(CC, "max-age=3600"), ("x-respond-age", "7200"), ("x-respond-age", "0")])
        .await;
    call(&gw, Method::GET, "/age-lines", &[]).await;
    assert_eq!(n("/age-lines"), 2);
    for bad in ["abc", "-5", "1.5"] {
        let p = format!("/age-bad{}", bad.len());
        call(&gw, Method::GET, &p, &[(CC, "max-age=3600"), ("x-respond-age", bad)]).await;
        assert_eq!(status(&call(&gw, Method::GET, &p, &[]).await), "weir; hit; detail=l1", "Age `{bad}` is ignored");
    }
    // Any final status with explicit freshness is reused (200 is not special); without it, a
    // status that is not heuristically cacheable is not stored.
    for code in ["299", "400", "500", "503"] {
        let p = format!("/status-{code}");
        call(&gw, Method::GET, &p, &[(CC, "max-age=60"), ("x-respond-status", code)]).await;
        let g = call(&gw, Method::GET, &p, &[]).await;
        assert_eq!((g.status.as_u16().to_string(), status(&g)), (code.to_string(), "weir; hit; detail=l1"), "{code}");
    }
    call(&gw, Method::GET, "/status-500-bare", &[("x-respond-status", "500")]).await;
    call(&gw, Method::GET, "/status-500-bare", &[]).await;
    assert_eq!(n("/status-500-bare"), 2);
    // Expires in each form, a minute ahead: fresh. An invalid Expires means already expired.
    let now = std::time::SystemTime::now();
    let date = httpdate(now);
    for (i, exp) in date_forms(now + Duration::from_secs(60)).iter().enumerate() {
        let p = format!("/expires-{i}");
        call(&gw, Method::GET, &p, &[("x-respond-date", &date), ("x-respond-expires", exp)]).await;
        assert_eq!(status(&call(&gw, Method::GET, &p, &[]).await), "weir; hit; detail=l1", "Expires: {exp}");
    }
    call(&gw, Method::GET, "/expires-bad", &[("x-respond-date", &date), ("x-respond-expires", "tomorrow")]).await;
    call(&gw, Method::GET, "/expires-bad", &[]).await;
    assert_eq!(n("/expires-bad"), 2);

    // If-Modified-Since on a fresh entry without Last-Modified is judged by its Date (§4.3.2).
    let then = httpdate(now - Duration::from_secs(10));
    call(&gw, Method::GET, "/no-lm", &[(CC, "max-age=60"), ("x-respond-date", &then)]).await;
    let g = call(&gw, Method::GET, "/no-lm", &[("if-modified-since", &date)]).await;
    assert_eq!((g.status.as_u16(), status(&g)), (304, "weir; hit; detail=l1"));
    let earlier = httpdate(now - Duration::from_secs(3600));
    let g = call(&gw, Method::GET, "/no-lm", &[("if-modified-since", &earlier)]).await;
    assert_eq!(g.status, 200, "changed since then, as far as the cache knows");
    assert_eq!(n("/no-lm"), 1);
}

/// A request, then the same path again without the scripting headers (a hit if it was stored).
async fn twice(gw: &Gateway, p: &str, h: &[(&str, &str)]) -> Got {
    let first = call(gw, Method::GET, p, h).await;
    call(gw, Method::GET, p, &[]).await;
    first
}

#[tokio::test(flavor = "multi_thread")]
async fn targeted_fields_replace_cache_control_and_expires() {
    let (origin, counts) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let n = |p: &str| counts.lock().unwrap().get(p).copied().unwrap_or(0);
    const CDN: &str = "x-respond-cdn-cache-control";
    // CDN-Cache-Control (RFC 9213) decides for Weir over Cache-Control, both ways, and is
    // forwarded downstream unchanged.
    let g = twice(&gw, "/cdn-store", &[(CC, "no-store"), (CDN, "max-age=60")]).await;
    assert_eq!(g.header("cdn-cache-control"), Some("max-age=60"));
    assert_eq!(g.header("cache-control"), Some("no-store"));
    assert_eq!(n("/cdn-store"), 1, "the targeted field's max-age stores it despite Cache-Control: no-store");
    twice(&gw, "/cdn-nostore", &[(CC, "max-age=60"), (CDN, "no-store")]).await;
    assert_eq!(n("/cdn-nostore"), 2);
    twice(&gw, "/cdn-private", &[(CC, "public, max-age=60"), (CDN, "private")]).await;
    assert_eq!(n("/cdn-private"), 2);
    // It replaces Expires too: a far Expires does not outlive the targeted max-age=0.
    let far = httpdate(std::time::SystemTime::now() + Duration::from_secs(3600));
    twice(&gw, "/cdn-expires", &[("x-respond-expires", &far), (CDN, "max-age=0")]).await;
    assert_eq!(n("/cdn-expires"), 2);
    // An invalid dictionary is ignored, as if absent: Cache-Control decides again.
    twice(&gw, "/cdn-invalid", &[(CC, "no-store"), (CDN, "max-age=60,,")]).await;
    assert_eq!(n("/cdn-invalid"), 2);
    twice(&gw, "/cdn-badtype", &[(CC, "max-age=60"), (CDN, "max-age=\"60\"")]).await;
    assert_eq!(n("/cdn-badtype"), 2, "a valid field with only a mistyped max-age has no freshness");
    // The most specific field in `cache.targeted_fields` wins: Weir-Cache-Control first.
    twice(&gw, "/cdn-weir", &[("x-respond-weir-cache-control", "max-age=60"), (CDN, "no-store")]).await;
    assert_eq!(n("/cdn-weir"), 1);
    // The Age check applies to its max-age.
    twice(&gw, "/cdn-age", &[(CDN, "max-age=3600"), ("x-respond-age", "7200")]).await;
    assert_eq!(n("/cdn-age"), 2);
    // Its stale directives count: an entry past max-age within stale-if-error is served when the
    // origin fails.
    call(&gw, Method::GET, "/cdn-sie", &[(CC, "no-store"), (CDN, "max-age=1, stale-if-error=300")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let g = call(&gw, Method::GET, "/cdn-sie", &[("x-respond-status", "503")]).await;
    assert_eq!((g.status.as_u16(), g.text()), (200, "/cdn-sie n=1".to_string()));

    // With the list set to nothing, CDN-Cache-Control is just a header.
    let plain = Gateway::start(&config(&origin, "{}", "").replace("cache:\n", "cache:\n  targeted_fields: []\n"));
    for _ in 0..2 {
        call(&plain, Method::GET, "/cdn-off", &[(CC, "no-store"), (CDN, "max-age=60")]).await;
    }
    assert_eq!(n("/cdn-off"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn must_understand_and_interim_responses() {
    let (origin, counts) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let n = |p: &str| counts.lock().unwrap().get(p).copied().unwrap_or(0);
    // must-understand with a status Weir implements overrides no-store; with one it does not
    // know (299), nothing is stored even with explicit freshness.
    for (p, code, want) in [("/mu-200", "200", 1), ("/mu-404", "404", 1), ("/mu-299", "299", 2)] {
        call(&gw, Method::GET, p, &[(CC, "must-understand, no-store, max-age=60"), ("x-respond-status", code)]).await;
        call(&gw, Method::GET, p, &[]).await;
        assert_eq!(n(p), want, "{p}");
    }

    // An origin that sends 103 Early Hints before its final answer: the final response is what
    // is served and stored, with none of the interim response's fields.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = served.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut c, _)) = listener.accept().await else { return };
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let answer = "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nX-Interim: 1\r\n\r\n\
                                      HTTP/1.1 100 Continue\r\nX-Interim: 2\r\n\r\n\
                                      HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 5\r\n\r\nfinal";
                        if c.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            });
        }
    });
    let hints = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: hints\n    upstream: http://{addr}\n    cache: {{}}\n"
    ));
    let a = get(&hints.url("/page")).await;
    assert_eq!((a.status.as_u16(), a.text()), (200, "final".to_string()));
    assert_eq!((a.header("link"), a.header("x-interim")), (None, None), "no interim field is merged");
    let b = get(&hints.url("/page")).await;
    assert_eq!((b.text(), status(&b)), ("final".to_string(), "weir; hit; detail=l1"));
    assert_eq!((b.header("link"), b.header("x-interim")), (None, None));
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Negotiation lists in `Vary` keys: case, spacing and `q=1` do not split variants; member
/// order and weights do (an origin may break equal weights by order).
#[tokio::test(flavor = "multi_thread")]
async fn vary_on_negotiation_lists_ignores_case_spacing_and_unit_weights_not_order() {
    let (origin, counts) = scripted_origin().await;
    let gw = Gateway::start(&config(&origin, "{}", ""));
    let n = |p: &str| counts.lock().unwrap().get(p).copied().unwrap_or(0);
    let vary = [(CC, "max-age=60"), ("x-respond-vary", "Accept-Language, Accept-Encoding")];
    let ask = |lang: &'static str, enc: &'static str| {
        let gw = &gw;
        async move {
            let mut h = vary.to_vec();
            h.push(("accept-language", lang));
            h.push(("accept-encoding", enc));
            call(gw, Method::GET, "/neg", &h).await
        }
    };
    let first = ask("en-US, fr;q=0.5, de;q=0.5", "gzip, br").await;
    assert_eq!(status(&first), "weir; fwd=miss; stored");
    // The same preferences written differently select the same variant.
    for (lang, enc) in [("EN-us , fr; q=0.50,de;q=0.5", "GZIP ,BR"), ("en-us;q=1.0, fr;q=0.500, de;q=0.5", "gzip,br")] {
        let g = ask(lang, enc).await;
        assert_eq!((status(&g), g.text()), ("weir; hit; detail=l1", "/neg n=1".to_string()), "{lang} / {enc}");
    }
    assert_eq!(n("/neg"), 1);
    // Another order or other weights are a different request: never served the other's variant.
    for (lang, enc) in [
        ("de;q=0.5, en-US, fr;q=0.5", "gzip, br"),
        ("en-US, fr;q=0.5, de;q=0.5", "br, gzip"),
        ("en-US, fr;q=0.5, de;q=0.5", "gzip;q=0, br"),
    ] {
        let g = ask(lang, enc).await;
        assert_eq!(status(&g), "weir; fwd=vary-miss; stored", "{lang} / {enc}");
    }
    assert_eq!(n("/neg"), 4);
}
