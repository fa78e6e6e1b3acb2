//! The cache-poisoning holes and resource bounds of the hardening issue, each against the real
//! binary and an origin that records what it was really asked. Every test here failed on the
//! code before the canonical request.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use weir_e2e::*;

/// An origin that answers `host=H pq=P n=N foo=F`, with `Vary: X-Foo`, `Cache-Control: max-age=60`
/// and whatever `x-respond-NAME` asks for; a write answers `x-respond-status` (default 200).
async fn echo() -> (Origin, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let o = Origin::start(move |req| {
        let n = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let h = req.headers();
            let v = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
            let body = format!(
                "host={} pq={} n={n} foo={}",
                v("host"),
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                v("x-foo")
            );
            let mut status = 200;
            let mut extra = Vec::new();
            for (k, val) in h {
                if let Some(name) = k.as_str().strip_prefix("x-respond-") {
                    let val = val.to_str().unwrap().to_string();
                    if name == "status" {
                        status = val.parse().unwrap();
                    } else {
                        extra.push((name.to_string(), val));
                    }
                }
            }
            let _ = req.into_body().collect().await;
            let mut r = text(status, &body);
            r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
            r.headers_mut().insert("vary", "X-Foo".parse().unwrap());
            for (k, val) in extra {
                r.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), val.parse().unwrap());
            }
            r
        }
    })
    .await;
    (o, n)
}

fn gateway(origin: &Origin, route_extra: &str, top_extra: &str) -> Gateway {
    Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\n{top_extra}routes:\n  - name: api\n    upstream: {}\n    cache: {{ ttl: 60s }}\n    forward_headers: [x-foo, \"x-respond-*\"]\n{route_extra}",
        origin.url()
    ))
}

/// One raw HTTP/1.1 request on its own connection; the response head and body as text.
async fn raw_req(gw: &Gateway, head: &str) -> String {
    raw(gw.addr(), format!("{head}\r\nConnection: close\r\n\r\n").as_bytes(), Duration::from_secs(10)).await
}

async fn call(gw: &Gateway, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> Got {
    let mut b = Request::builder().method(method).uri(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(full(body.to_string())).unwrap()).await
}

fn cs(g: &Got) -> String {
    g.header("cache-status").unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_form_target_replaces_host() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    let first = raw_req(&gw, "GET http://victim.example/x HTTP/1.1\r\nHost: evil.example").await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The origin answered for the host the entry is keyed by.
    assert_eq!(origin.seen()[0].headers["host"], "victim.example");
    let plain = raw_req(&gw, "GET /x HTTP/1.1\r\nHost: victim.example").await;
    assert!(plain.contains("host=victim.example"), "{plain}");
    assert!(!plain.contains("evil"), "{plain}");
    // A plaintext client cannot write https entries; Host rules.
    for bad in [
        "GET https://victim.example/x HTTP/1.1\r\nHost: victim.example",
        "GET /x HTTP/1.1",
        "GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example",
        "GET /x HTTP/1.1\r\nHost: user@victim.example",
        "GET /bad%zz HTTP/1.1\r\nHost: h",
    ] {
        let got = raw_req(&gw, bad).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{bad:?} → {got}");
        assert!(got.contains("\"bad_request\""), "{got}");
    }
    assert_eq!(origin.count(), 1, "a refused request reached the origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_host_must_agree_with_authority() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    let req = Request::get(gw.url("/h2")).header("host", "other.example").body(full("")).unwrap();
    let got = send(&h2_client(), req).await;
    assert_eq!(got.status, 400, "{}", got.text());
    assert_eq!(origin.count(), 0);
    let got = send(&h2_client(), Request::get(gw.url("/h2")).body(full("")).unwrap()).await;
    assert_eq!(got.status, 200);
    assert_eq!(origin.seen()[0].headers["host"], gw.addr().to_string().as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_segments_are_routed_as_forwarded() {
    let (origin, _) = echo().await;
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: public\n    match: {{ path: /public }}\n    upstream: {0}\n    cache: {{ ttl: 60s }}\n  - name: admin\n    match: {{ path: /admin, methods: [POST] }}\n    upstream: {0}\n",
        origin.url()
    ));
    // Routed as /admin/x (a POST-only route): 405, and nothing reaches the origin.
    let got = raw_req(&gw, "GET /public/%2e%2e/admin/x HTTP/1.1\r\nHost: h").await;
    assert!(got.starts_with("HTTP/1.1 405"), "{got}");
    assert_eq!(origin.count(), 0);
    let got = raw_req(&gw, "GET /public/a/../b HTTP/1.1\r\nHost: h").await;
    assert!(got.contains("pq=/public/b"), "{got}");
}

#[tokio::test(flavor = "multi_thread")]
async fn separators_in_a_query_cannot_write_a_variant() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    let attack = raw_req(&gw, "GET /p?vary=X|vary:x-foo=b; HTTP/1.1\r\nHost: h").await;
    assert!(attack.starts_with("HTTP/1.1 200"), "{attack}");
    let victim = call(&gw, Method::GET, "/p?vary=X", &[("x-foo", "b")], "").await;
    assert!(victim.text().ends_with("pq=/p?vary=X n=2 foo=b"), "{} {}", victim.text(), cs(&victim));
    // And the host/path boundary: `a.b` + `/c` is not `a` + `.b/c` (no route has a host).
    assert_eq!(origin.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_nominated_headers_are_not_keyed() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    let a = call(&gw, Method::GET, "/c", &[("x-foo", "a"), ("connection", "x-foo")], "").await;
    assert_eq!(a.text(), "host=h pq=/c n=1 foo=-".replace("host=h", &format!("host={}", gw.addr())));
    // A client that really sends X-Foo: a must not get the answer for "no X-Foo".
    let c = call(&gw, Method::GET, "/c", &[("x-foo", "a")], "").await;
    assert!(c.text().ends_with("n=2 foo=a"), "{} {}", c.text(), cs(&c));
    // The nominated request was keyed as the origin saw it: without X-Foo.
    let none = call(&gw, Method::GET, "/c", &[], "").await;
    assert!(none.text().ends_with("n=1 foo=-"), "{} {}", none.text(), cs(&none));
    assert_eq!(cs(&none), "weir; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_parameters_keep_their_order() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    let a = call(&gw, Method::GET, "/q?id=1&id=2", &[], "").await;
    let b = call(&gw, Method::GET, "/q?id=2&id=1", &[], "").await;
    assert!(a.text().contains("pq=/q?id=1&id=2 n=1"), "{}", a.text());
    assert!(b.text().contains("pq=/q?id=2&id=1 n=2"), "{} {}", b.text(), cs(&b));
    // Names still sort: the same parameters in another name order are one entry, and the
    // origin is asked exactly the query that is keyed.
    let c = call(&gw, Method::GET, "/s?b=1&a=2", &[], "").await;
    let d = call(&gw, Method::GET, "/s?a=2&b=1", &[], "").await;
    assert!(c.text().contains("pq=/s?a=2&b=1 n=3"), "{}", c.text());
    assert_eq!(cs(&d), "weir; hit; detail=l1");
}

#[tokio::test(flavor = "multi_thread")]
async fn overrides_bypass_or_are_stripped() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    for h in ["x-http-method-override", "x-http-method", "x-method-override"] {
        let got = call(&gw, Method::GET, "/m", &[(h, "DELETE")], "").await;
        assert_eq!(cs(&got), "weir; fwd=bypass; detail=method-override", "{h}");
    }
    let plain = call(&gw, Method::GET, "/m", &[], "").await;
    assert_eq!(cs(&plain), "weir; fwd=miss; stored", "an override's answer was cached");
    let n = origin.count();
    let stripped = [
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-port",
        "x-forwarded-scheme",
        "x-forwarded-server",
        "x-host",
        "weir-consumer",
        "x-consumer-id",
    ];
    let headers: Vec<(&str, &str)> = stripped.iter().map(|h| (*h, "/admin")).collect();
    call(&gw, Method::GET, "/o", &headers, "").await;
    let seen = &origin.seen()[n];
    for h in stripped {
        assert!(!seen.headers.contains_key(h), "{h} reached the origin");
    }
    // A GET with a body never reads or writes the cache.
    let got = call(&gw, Method::GET, "/m", &[], "payload").await;
    assert_eq!(cs(&got), "weir; fwd=bypass; detail=body");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_purge_their_host_and_tags_only_on_success() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "    invalidate: { methods: [POST, PUT], tags: [all] }\n", "");
    let at = |host: &'static str, path: &'static str| {
        let gw = &gw;
        async move {
            let r = Request::get(gw.url(path)).header("host", host).body(full("")).unwrap();
            cs(&send(&client(), r).await)
        }
    };
    for (h, p) in [("a.example", "/x"), ("b.example", "/x"), ("a.example", "/other")] {
        assert_eq!(at(h, p).await, "weir; fwd=miss; stored");
    }
    // A 303 purges the target URI on this host, not the route's tags.
    let w = Request::post(gw.url("/x")).header("host", "a.example").header("x-respond-status", "303");
    send(&client(), w.body(full("")).unwrap()).await;
    assert!(at("a.example", "/x").await.starts_with("weir; fwd="), "the target was not purged");
    assert_eq!(at("b.example", "/x").await, "weir; hit; detail=l1", "another host's copy was purged");
    assert_eq!(at("a.example", "/other").await, "weir; hit; detail=l1", "tags ran on a 3xx");
    // A 2xx runs the tags.
    let w = Request::put(gw.url("/x")).header("host", "a.example");
    send(&client(), w.body(full("")).unwrap()).await;
    assert!(at("a.example", "/other").await.starts_with("weir; fwd="), "tags did not run on a 2xx");
}

#[tokio::test(flavor = "multi_thread")]
async fn only_allowed_upgrades_are_forwarded() {
    let (origin, _) = echo().await;
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: r\n    upstream: {}\n",
        origin.url()
    ));
    let got = raw_req(&gw, "GET /u HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let seen = &origin.seen()[0];
    for h in ["upgrade", "http2-settings"] {
        assert!(!seen.headers.contains_key(h), "{h} forwarded");
    }
    assert!(!seen.headers.get("connection").is_some_and(|v| v.to_str().unwrap().to_lowercase().contains("upgrade")));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_body_limit_holds_on_cached_routes() {
    let (origin, _) = echo().await;
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    max_request_body: 1KiB\n    cache: {{ ttl: 60s, methods: [GET, HEAD, POST] }}\n",
        origin.url()
    ));
    let big = "x".repeat(4096);
    let got = call(&gw, Method::POST, "/graphql", &[], &big).await;
    assert_eq!(got.status, 413, "{}", got.text());
    let got = call(&gw, Method::GET, "/g", &[], &big).await;
    assert_eq!(got.status, 413);
    // Chunked (no Content-Length): the limit is enforced while reading.
    let chunked = format!(
        "POST /graphql HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n1000\r\n{big}\r\n0\r\n\r\n"
    );
    let got = raw(gw.addr(), chunked.as_bytes(), Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert_eq!(origin.count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_filling_client_keeps_its_cookie_nobody_else_gets_it() {
    let (origin, _) = echo().await;
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    cache: {{ ttl: 60s, share_private: true }}\n    forward_headers: [\"x-respond-*\"]\n",
        origin.url()
    ));
    let miss = call(&gw, Method::GET, "/s", &[("x-respond-set-cookie", "session=mine")], "").await;
    assert_eq!(cs(&miss), "weir; fwd=miss; stored");
    assert_eq!(miss.header("set-cookie"), Some("session=mine"));
    let hit = call(&gw, Method::GET, "/s", &[], "").await;
    assert_eq!(cs(&hit), "weir; hit; detail=l1");
    assert_eq!(hit.header("set-cookie"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_age_is_clamped_not_a_crash() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    for age in ["18446744073709551615", "99999999999999999999999"] {
        let path = format!("/age/{}", age.len());
        let got = call(&gw, Method::GET, &path, &[("x-respond-age", age)], "").await;
        assert_eq!(got.status, 200);
        // 2^31 s old: stale at once, so the next request goes to the origin again.
        let again = call(&gw, Method::GET, &path, &[], "").await;
        assert_eq!(again.status, 200);
        assert_ne!(cs(&again), "weir; hit; detail=l1", "an entry {age} s old was served fresh");
    }
    assert_eq!(get(&gw.url("/alive")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_purge_keys_are_normalised() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "admin:\n  addr: 127.0.0.1:0\n");
    call(&gw, Method::GET, "/~user/a?b=1&a=2", &[], "").await;
    let body = r#"{"keys": ["/%7Euser/x/../a?a=2&b=1"]}"#;
    let got = send(
        &client(),
        Request::post(gw.admin_url("/cache/purge"))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got.json()["purged"].as_u64().unwrap() >= 1, "{}", got.text());
    let after = call(&gw, Method::GET, "/~user/a?a=2&b=1", &[], "").await;
    assert_eq!(cs(&after), "weir; fwd=miss; stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_leader_hands_over_to_one_waiter() {
    // The first fetch outlives the route's response timeout (the leader fails with a 504); the
    // waiters behind it must not all go to the origin at once: one takes over, the rest collapse
    // onto its answer.
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let origin = Origin::start(move |_req| {
        let n = h2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(if n == 0 { 3000 } else { 200 })).await;
            let mut r = text(200, "x");
            r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
            r
        }
    })
    .await;
    let gw = gateway(&origin, "    timeouts: { response: 500ms }\n", "");
    let url = gw.url("/lead");
    let first = tokio::spawn({
        let u = url.clone();
        async move { get(&u).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let u = url.clone();
        tasks.push(tokio::spawn(async move { get(&u).await }));
    }
    assert_eq!(first.await.unwrap().status, 504);
    let mut outcomes = Vec::new();
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.status, 200);
        outcomes.push(cs(&g));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2, "waiters went to the origin on their own: {outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| o.as_str() == "weir; fwd=miss; collapsed").count(), 19, "{outcomes:?}");
}

/// The L1 byte bound is the memory bound: after writing ten times the capacity in distinct 1 KiB
/// entries (each with the dozen headers a real API sends), the process has grown by no more than
/// one and a half times the bound. (The issue asks for the bound + 64 MiB; at 32 MiB that could
/// not fail, so this is stricter. Before the weigher counted what the allocator holds, the
/// growth here was 101 MiB: 17.5k entries weighed as 1.9 KiB held 5.7 KiB each.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_bound_is_the_memory_bound() {
    const L1: u64 = 32 << 20;
    let origin = Origin::start(|req| async move {
        let mut r = text(200, &format!("{:<1024}", req.uri().path()));
        let h = r.headers_mut();
        h.insert("cache-control", "max-age=600".parse().unwrap());
        for (i, name) in
            ["x-a", "x-b", "x-c", "x-d", "x-e", "x-f", "x-g", "x-h", "etag", "last-modified"].iter().enumerate()
        {
            h.insert(*name, format!("\"value-{i}-{}\"", req.uri().path()).parse().unwrap());
        }
        r
    })
    .await;
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\ncache:\n  l1_max_bytes: {L1}\nroutes:\n  - name: api\n    upstream: {}\n    cache: {{ ttl: 600s }}\n",
        origin.url()
    ));
    let c = client();
    assert_eq!(send(&c, Request::get(gw.url("/warm")).body(full("")).unwrap()).await.status, 200);
    let before = gw.rss();
    // 10x the capacity: one entry weighs well over 1 KiB, so 10 * L1 / 1 KiB requests is more.
    let total = (10 * L1 / 1024) as usize;
    let tasks = 16;
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let c = c.clone();
        let url = gw.url("");
        set.spawn(async move {
            for i in (t..total).step_by(tasks) {
                let r = c.request(Request::get(format!("{url}/o/{i}")).body(full("")).unwrap()).await.unwrap();
                assert_eq!(r.status(), 200);
                r.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let health = get(&gw.admin_url("/health")).await.json();
    let entries = health["l1"]["entries"].as_u64().unwrap_or(0);
    let after = gw.rss();
    let grown = after.saturating_sub(before);
    eprintln!("L1 {} MiB: {entries} entries, RSS {} -> {} MiB", L1 >> 20, before >> 20, after >> 20);
    assert!(entries > 1000, "the cache stored almost nothing: {health}");
    assert!(grown <= L1 + L1 / 2, "RSS grew {} MiB for a {} MiB L1 ({entries} entries)", grown >> 20, L1 >> 20);
}

/// Slow readers: N clients each read a distinct 8 MiB cached object a byte at a time while a
/// fast client fills the cache many times over, evicting those objects under them. An object
/// being sent is held by its connection (the response shares the entry's bytes: no copy), so
/// the bound is `l1_max_bytes` + N × (`max_object_bytes` + 1 MiB for the connection's buffers)
/// + 128 MiB the allocator may keep for reuse; RSS is sampled all along, the worst counts
/// (measured here: 149-172 MiB of growth against a 214 MiB bound). Before large entries
/// settled moka at once, its lazy eviction held the run's objects until its next housekeeping:
/// 306-384 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_their_object_and_no_more() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const L1: u64 = 32 << 20;
    const OBJECT: usize = 8 << 20;
    const READERS: u64 = 6;
    // What the allocator may keep of freed large objects for reuse (mimalloc's segments): it
    // rises and falls with the fills, 20-90 MiB here over 200 of them (no growth: no leak).
    const ALLOCATOR: u64 = 128 << 20;
    let origin = Origin::start(|req| async move {
        let path = req.uri().path().to_string();
        let byte = path.bytes().map(u32::from).sum::<u32>() as u8;
        let mut r = Response::new(full(vec![byte; OBJECT]));
        r.headers_mut().insert("cache-control", "max-age=600".parse().unwrap());
        r
    })
    .await;
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\ncache:\n  l1_max_bytes: {L1}\n  max_object_bytes: 9MiB\nroutes:\n  - name: api\n    upstream: {}\n    cache: {{ ttl: 600s }}\n",
        origin.url()
    ));
    let c = client();
    // Warm the process (allocator arenas, pools) with one object through and out of the cache.
    for i in 0..2 {
        let r = c.request(Request::get(gw.url(&format!("/warm/{i}"))).body(full("")).unwrap()).await.unwrap();
        r.into_body().collect().await.unwrap();
    }
    let before = gw.rss();
    // The slow readers: each its own object; a byte every 20 ms.
    let mut readers = Vec::new();
    for i in 0..READERS {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        tcp.write_all(format!("GET /slow/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut got = 0usize;
            let mut b = [0u8; 1];
            loop {
                match tcp.read(&mut b).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Sample RSS while a fast client stores 60 more objects (15 times L1): every slow object
    // is evicted while its reader is still on it.
    let pid_rss = {
        let gw = &gw;
        move || gw.rss()
    };
    let mut worst = 0u64;
    for i in 0..60 {
        let r = c.request(Request::get(gw.url(&format!("/fast/{i}"))).body(full("")).unwrap()).await.unwrap();
        assert_eq!(r.status(), 200);
        r.into_body().collect().await.unwrap();
        worst = worst.max(pid_rss());
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        worst = worst.max(pid_rss());
    }
    let health = get(&gw.admin_url("/health")).await.json();
    let l1_bytes = health["l1"]["bytes"].as_u64().unwrap_or(0);
    assert!(l1_bytes <= L1, "{health}");
    for r in &readers {
        assert!(!r.is_finished(), "a slow reader was cut off");
    }
    let grown = worst.saturating_sub(before);
    let bound = L1 + READERS * (OBJECT as u64 + (1 << 20)) + ALLOCATOR;
    eprintln!(
        "slow readers: RSS {} -> worst {} MiB, grew {} MiB, bound {} MiB",
        before >> 20,
        worst >> 20,
        grown >> 20,
        bound >> 20
    );
    assert!(grown <= bound, "RSS grew {} MiB, more than the {} MiB bound", grown >> 20, bound >> 20);
    for r in readers {
        r.abort();
    }
}

/// `server.max_connections`: a connection beyond the cap is not accepted (it waits in the
/// kernel's backlog) until one of the open ones closes; then it is served.
#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "server:\n  max_connections: 3\n");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(b"GET /held HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0, "a connection under the cap is served");
        held.push(s);
    }
    let mut extra = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    extra.write_all(b"GET /extra HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(1500), extra.read_to_end(&mut buf)).await;
    assert!(early.is_err() && buf.is_empty(), "a 4th connection was served: {}", String::from_utf8_lossy(&buf));
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut buf)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&buf);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// A route's `max_upstream_connections`: a request that finds every slot taken waits up to the
/// connect timeout, then gets 503 `upstream_busy` with `Retry-After`; the origin never sees it.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_slots_are_bounded_per_route() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let origin = Origin::start(move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            text(200, "slow")
        }
    })
    .await;
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    max_upstream_connections: 1\n    timeouts: {{ connect: 500ms }}\n",
        origin.url()
    ));
    let url = gw.url("/a");
    let first = tokio::spawn(async move { send(&client(), Request::get(url).body(full("")).unwrap()).await });
    while hits.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = call(&gw, Method::GET, "/b", &[], "").await;
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.json()["error"], "upstream_busy");
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// `Vary` keys normalise only what is provably the same request. A trailing comma on `Origin`
/// (priming an answer without `Access-Control-Allow-Origin`) is another variant, so the real
/// origin's users get the origin's own answer; `Accept-Language: en, fr` and `fr, en` are two
/// variants (an origin may break equal weights by order); case, spacing and `q=1` are not.
#[tokio::test(flavor = "multi_thread")]
async fn vary_keys_normalise_only_what_is_equivalent() {
    let origin = Origin::start(|req| async move {
        let h = req.headers();
        let v = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mut r = text(200, &format!("lang={}", v("accept-language").split(',').next().unwrap_or("").trim()));
        r.headers_mut().insert("vary", "Origin, Accept-Language".parse().unwrap());
        r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
        if v("origin") == "https://good.example" {
            r.headers_mut().insert("access-control-allow-origin", "https://good.example".parse().unwrap());
        }
        r
    })
    .await;
    // `Origin` is not forwarded from untrusted clients on a cached route unless listed.
    let gw = Gateway::start(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    cache: {{ ttl: 60s }}\n    forward_headers: [origin]\n",
        origin.url()
    ));
    let get = |headers: &'static [(&'static str, &'static str)]| call(&gw, Method::GET, "/cors", headers, "");
    // Primed by an attacker with a trailing comma: stored without the CORS header.
    let primed = get(&[("origin", "https://good.example,")]).await;
    assert!(primed.header("access-control-allow-origin").is_none());
    let real = get(&[("origin", "https://good.example")]).await;
    assert_eq!(cs(&real), "weir; fwd=vary-miss; stored", "another variant, fetched");
    assert_eq!(real.header("access-control-allow-origin"), Some("https://good.example"));

    let en_fr = get(&[("accept-language", "en, fr")]).await;
    assert_eq!(en_fr.text(), "lang=en");
    let fr_en = get(&[("accept-language", "fr, en")]).await;
    assert_eq!((cs(&fr_en).as_str(), fr_en.text().as_str()), ("weir; fwd=vary-miss; stored", "lang=fr"));
    let same = get(&[("accept-language", "EN ,fr;q=1")]).await;
    assert_eq!((cs(&same).as_str(), same.text().as_str()), ("weir; hit; detail=l1", "lang=en"), "the same list");
}

/// On a cached route, an untrusted client's headers reach the origin from an allow list only:
/// `X-Forwarded-Prefix: //evil.example`, which origins build asset URLs from, never does, so it
/// cannot poison the entry everyone gets; `Accept-Language` and the route's `forward_headers`
/// do. Through a trusted proxy, and on uncached routes, every header is forwarded as before.
#[tokio::test(flavor = "multi_thread")]
async fn cached_routes_forward_untrusted_headers_from_an_allow_list() {
    let origin = Origin::start(|req| async move {
        let h = req.headers();
        let v = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        let mut r = text(
            200,
            &format!("prefix={} lang={} extra={}", v("x-forwarded-prefix"), v("accept-language"), v("x-extra")),
        );
        r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await;
    let routes = format!(
        "routes:\n  - name: cached\n    match: {{ path: /c }}\n    upstream: {u}\n    cache: {{}}\n    forward_headers: [x-extra]\n  - name: plain\n    match: {{ path: /p }}\n    upstream: {u}\n",
        u = origin.url()
    );
    let headers = [("x-forwarded-prefix", "//evil.example"), ("accept-language", "fr"), ("x-extra", "1")];
    let gw = Gateway::start(&format!("listen:\n  - addr: 127.0.0.1:0\n{routes}"));
    let poisoned = call(&gw, Method::GET, "/c/page", &headers, "").await;
    assert_eq!(poisoned.text(), "prefix=- lang=fr extra=1");
    assert_eq!(call(&gw, Method::GET, "/p/page", &headers, "").await.text(), "prefix=//evil.example lang=fr extra=1");
    // A trusted proxy in front is trusted to have cleaned the request.
    let trusted =
        Gateway::start(&format!("listen:\n  - addr: 127.0.0.1:0\nserver:\n  trusted_proxies: [127.0.0.0/8]\n{routes}"));
    assert_eq!(
        call(&trusted, Method::GET, "/c/page", &headers, "").await.text(),
        "prefix=//evil.example lang=fr extra=1"
    );
}

/// An authority-form target (`CONNECT host:port`) names no path: 400, never routed (found by
/// the canonical-request property test: the path was empty, not `/...`).
#[tokio::test(flavor = "multi_thread")]
async fn connect_targets_are_refused_not_routed() {
    let (origin, _) = echo().await;
    let gw = gateway(&origin, "", "");
    let got = raw_req(&gw, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443").await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(origin.count(), 0);
}
