//! The shared tier end to end: several real `weir` processes on one real `redis-server` (or a
//! local three-master Redis Cluster): L2 hits across instances, invalidation that reaches every
//! L1, and degradation when Redis dies, stalls or refuses credentials.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request};
use weir_e2e::*;

/// An origin that answers `PATH n=COUNT` with a minute of freshness and tags from the path
/// (`product:ID` for `/products/ID`), counting every request; `/slow/...` takes 400 ms.
async fn origin() -> (Origin, Arc<AtomicU32>) {
    let n = Arc::new(AtomicU32::new(0));
    let c = n.clone();
    let o = Origin::start(move |req| {
        let c = c.clone();
        async move {
            let k = c.fetch_add(1, Ordering::SeqCst) + 1;
            let pq = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            if pq.starts_with("/slow/") {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            let mut r = text(200, &format!("{pq} n={k}"));
            r.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
            if let Some(id) = req.uri().path().strip_prefix("/products/") {
                r.headers_mut().insert("surrogate-key", format!("product:{id}").parse().unwrap());
            }
            r
        }
    })
    .await;
    (o, n)
}

fn redis_block(urls: &[String], extra: &str) -> String {
    if urls.len() == 1 {
        format!("redis:\n  url: {}\n{extra}", urls[0])
    } else {
        let list: Vec<String> = urls.iter().map(|u| format!("    - {u}\n")).collect();
        format!("redis:\n  cluster:\n{}{extra}", list.concat())
    }
}

fn config(origin: &Origin, redis: &str, l1: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\ncache:\n  l1_max_bytes: {l1}\n{redis}routes:\n  - name: other\n    match: {{host: other.test, path: /}}\n    upstream: {}\n    cache: {{ttl: 60s}}\n  - name: api\n    upstream: {}\n    cache: {{ttl: 60s}}\n    invalidate:\n      methods: [POST, PUT, DELETE]\n      tags: [products]\n",
        origin.url(),
        origin.url()
    )
}

/// Instances behind one load balancer see the same `Host`, hence the same cache keys.
async fn call(gw: &Gateway, method: Method, path: &str) -> Got {
    let req = Request::builder().method(method).uri(gw.url(path)).header("host", "api.test").body(full("")).unwrap();
    send(&client(), req).await
}

fn cs(g: &Got) -> String {
    g.header("cache-status").unwrap_or("<none>").to_string()
}

async fn purge(gw: &Gateway, body: &str) -> Got {
    let req = Request::builder()
        .method(Method::POST)
        .uri(gw.admin_url("/cache/purge"))
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap();
    send(&client(), req).await
}

async fn health(gw: &Gateway) -> serde_json::Value {
    get(&gw.admin_url("/health")).await.json()
}

/// Polls `f` every 5 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Both instances subscribed to the invalidation channel (so a purge now reaches both).
async fn wait_subscribed(gws: &[&Gateway]) {
    for gw in gws {
        let ok = eventually(Duration::from_secs(10), || async {
            health(gw).await["redis"]["invalidations_subscribed"] == serde_json::json!(true)
        })
        .await;
        assert!(ok, "instance never subscribed: {}", gw.log());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_l2_and_every_purge_reaches_both_l1s() {
    let redis = RedisServer::start();
    let (origin, hits) = origin().await;
    let yaml = config(&origin, &redis_block(&[redis.url()], ""), "16MiB");
    let a = Gateway::start(&yaml);
    let b = Gateway::start(&yaml);
    wait_subscribed(&[&a, &b]).await;

    // Miss on A, an L2 hit on B (promoted), then B's own L1.
    assert_eq!(cs(&call(&a, Method::GET, "/products/1").await), "weir; fwd=miss; stored");
    let g = call(&b, Method::GET, "/products/1").await;
    assert_eq!(cs(&g), "weir; hit; detail=l2");
    assert_eq!(g.text(), "/products/1 n=1");
    assert_eq!(cs(&call(&b, Method::GET, "/products/1").await), "weir; hit; detail=l1");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Purge by tag on A: gone from Redis and from B's L1.
    let p = purge(&a, r#"{"tags": ["product:1"]}"#).await;
    assert_eq!(p.status, 200, "{}", p.text());
    let gone = eventually(Duration::from_secs(2), || async {
        cs(&call(&b, Method::GET, "/products/1").await).contains("fwd=miss")
    })
    .await;
    assert!(gone, "B kept serving a purged entry");
    // A fetch that began within a few ms of the purge may be refused (the safe side of the
    // race); the next one is stored and shared.
    let stored = eventually(Duration::from_secs(2), || async {
        let s = cs(&call(&b, Method::GET, "/products/1").await);
        s == "weir; fwd=miss; stored" || s == "weir; hit; detail=l1"
    })
    .await;
    assert!(stored, "B never stored its refetch: {}", b.log());
    assert_eq!(cs(&call(&a, Method::GET, "/products/1").await), "weir; hit; detail=l2", "B's refetch is shared");

    // Purge by prefix and by key (URL path) on B reaches A.
    call(&a, Method::GET, "/products/2?x=1").await;
    assert_eq!(cs(&call(&b, Method::GET, "/products/2?x=1").await), "weir; hit; detail=l2");
    purge(&b, r#"{"prefixes": ["/products/2"]}"#).await;
    let gone = eventually(Duration::from_secs(2), || async {
        cs(&call(&a, Method::GET, "/products/2?x=1").await).contains("fwd=miss")
    })
    .await;
    assert!(gone, "prefix purge on B did not reach A");
    call(&b, Method::GET, "/products/3").await;
    assert_eq!(cs(&call(&a, Method::GET, "/products/3").await), "weir; hit; detail=l2");
    purge(&b, r#"{"keys": ["/products/3"]}"#).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            cs(&call(&a, Method::GET, "/products/3").await).contains("fwd=miss")
        })
        .await
    );

    // A write through A invalidates B's L1 (target URI and the route's `products` tag).
    call(&a, Method::GET, "/products/4").await;
    assert_eq!(cs(&call(&b, Method::GET, "/products/4").await), "weir; hit; detail=l2");
    assert_eq!(cs(&call(&b, Method::GET, "/products/4").await), "weir; hit; detail=l1");
    assert_eq!(call(&a, Method::PUT, "/products/4").await.status, 200);
    assert!(
        eventually(Duration::from_secs(2), || async {
            cs(&call(&b, Method::GET, "/products/4").await).contains("fwd=miss")
        })
        .await,
        "a write through A left B's L1 stale"
    );

    let h = health(&b).await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["redis"]["connected"], true);
    assert_eq!(h["redis"]["breaker"], "closed");
    let m = send(&client(), Request::get(b.admin_url("/metrics")).body(full("")).unwrap()).await.text();
    assert!(m.contains("weir_redis_up 1"), "{m}");
    assert!(m.contains(r#"weir_cache_hits_total{route="api",level="l2"}"#), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn l1_disabled_serves_every_hit_from_l2() {
    let redis = RedisServer::start();
    let (origin, hits) = origin().await;
    let gw = Gateway::start(&config(&origin, &redis_block(&[redis.url()], ""), "0"));
    assert_eq!(cs(&call(&gw, Method::GET, "/a").await), "weir; fwd=miss; stored");
    for _ in 0..3 {
        assert_eq!(cs(&call(&gw, Method::GET, "/a").await), "weir; hit; detail=l2");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_request_data_never_becomes_a_redis_key_and_routes_never_collide() {
    let redis = RedisServer::start();
    let (origin, _) = origin().await;
    let gw = Gateway::start(&config(&origin, &redis_block(&[redis.url()], ""), "0"));
    let long = format!("/{}", "a/".repeat(3000));
    let paths = [long.as_str(), "/*", "/%0D%0Akeys%20*", "/{x}/{y}", "/weir:{0}:e:00", "/?q=%00"];
    for p in paths {
        call(&gw, Method::GET, p).await;
        assert_eq!(cs(&call(&gw, Method::GET, p).await), "weir; hit; detail=l2", "{p}");
    }
    // The same path on another route (host) is a different entry.
    let req = Request::get(gw.url("/*")).header("host", "other.test").body(full("")).unwrap();
    let g = send(&client(), req).await;
    assert_eq!(g.header("cache-status"), Some("weir; fwd=miss; stored"));
    let names = redis.keys();
    assert!(!names.is_empty());
    for k in &names {
        let ok = k.len() <= 60 && k.starts_with("weir:{") && k.bytes().all(|b| b.is_ascii_graphic());
        assert!(ok, "raw request data in a Redis key: {k:?}");
        assert!(!k.contains('*') && !k.contains("a/a/") && !k.contains("keys"), "{k:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_under_load_then_restarted() {
    let mut redis = RedisServer::start();
    let (origin, _) = origin().await;
    let yaml = config(&origin, &redis_block(&[redis.url()], "  op_timeout: 50ms\n"), "16MiB");
    let gw = Gateway::start(&yaml);
    wait_subscribed(&[&gw]).await;
    for i in 0..5 {
        call(&gw, Method::GET, &format!("/warm/{i}")).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = gw.url("");
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = client();
            let (mut n, mut bad, mut i) = (0u32, Vec::new(), 0u32);
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                // Cached keys, and a fresh key now and then (a miss that must reach the origin).
                let p = if i % 5 == 0 { format!("/fresh/{i}") } else { format!("/warm/{}", i % 5) };
                let req = Request::get(format!("{url}{p}")).header("host", "api.test").body(full("")).unwrap();
                let g = send(&c, req).await;
                n += 1;
                if g.status.as_u16() >= 500 {
                    bad.push((p, g.status));
                }
            }
            (n, bad)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // While Redis is gone, cached keys keep hitting L1 and new keys reach the origin.
    assert_eq!(cs(&call(&gw, Method::GET, "/warm/1").await), "weir; hit; detail=l1");
    assert_eq!(cs(&call(&gw, Method::GET, "/during-outage").await), "weir; fwd=miss; stored");
    let h = health(&gw).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["redis"]["connected"], false);
    stop.store(true, Ordering::SeqCst);
    let (n, bad) = load.await.unwrap();
    assert!(n > 50, "only {n} requests made it through");
    assert!(bad.is_empty(), "5xx while Redis was dying: {bad:?}");

    // Back: the gateway reconnects by itself and the shared tier works again.
    redis.restart();
    let back = eventually(Duration::from_secs(15), || async {
        let h = health(&gw).await;
        h["redis"]["connected"] == serde_json::json!(true)
            && h["redis"]["invalidations_subscribed"] == serde_json::json!(true)
    })
    .await;
    assert!(back, "no reconnection: {}", gw.log());
    call(&gw, Method::GET, "/after").await;
    assert!(redis.dbsize() > 0, "nothing stored in Redis after it came back");
    assert!(gw.log().contains("redis circuit breaker open"), "{}", gw.log());
}

/// Three instances, 300 concurrent requests for one cold key (100 on each), an origin that
/// takes 400 ms: one request reaches the origin. Each instance's first request takes the fill
/// lock in Redis or waits for the instance that holds it (woken by its announcement), then reads
/// what it stored; each instance's other requests wait on their own leader. With
/// `redis.fill_lock: false` every instance fills for itself. On a Redis Cluster too.
#[tokio::test(flavor = "multi_thread")]
async fn a_cold_key_reaches_the_origin_once_from_the_whole_fleet() {
    // One Redis with and without the lock, then a Cluster (the lock and its announcement live
    // in the key's slot; a script's PUBLISH reaches every node's subscribers).
    for (fill_lock, origin_requests, cluster) in [(true, 1, false), (false, 3, false), (true, 1, true)] {
        // Kept alive for the round; stopped when dropped.
        let (_server, _cluster) =
            if cluster { (None, Some(RedisCluster::start())) } else { (Some(RedisServer::start()), None) };
        let urls = match (&_server, &_cluster) {
            (Some(r), _) => vec![r.url()],
            (_, Some(c)) => c.urls(),
            _ => unreachable!(),
        };
        let (origin, hits) = origin().await;
        let extra = format!("  fill_lock: {fill_lock}\n");
        let yaml = config(&origin, &redis_block(&urls, &extra), "16MiB");
        let gws = [Gateway::start(&yaml), Gateway::start(&yaml), Gateway::start(&yaml)];
        wait_subscribed(&[&gws[0], &gws[1], &gws[2]]).await;
        let mut calls = Vec::new();
        for gw in &gws {
            for _ in 0..100 {
                let url = gw.url("/slow/cold");
                calls.push(tokio::spawn(async move {
                    let req = Request::get(url).header("host", "api.test").body(full("")).unwrap();
                    send(&client(), req).await
                }));
            }
        }
        let mut bodies = std::collections::BTreeSet::new();
        let mut statuses = std::collections::BTreeMap::new();
        for c in calls {
            let g = c.await.unwrap();
            assert_eq!(g.status, 200, "{}", g.text());
            bodies.insert(g.text());
            *statuses.entry(cs(&g)).or_insert(0) += 1;
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            origin_requests,
            "fill_lock {fill_lock}, cluster {cluster}: origin requests; answers {statuses:?}; {}",
            gws[1].log()
        );
        assert_eq!(bodies.len(), origin_requests as usize, "{bodies:?}");
    }
}

/// A purge that lands while another instance fills the key wins across the fleet: the filler's
/// store is refused, and the instance that was waiting for it, finding nothing stored, fills
/// again — with what the origin has after the purge, never the purged answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_during_another_instances_fill_wins() {
    let redis = RedisServer::start();
    let (origin, hits) = origin().await;
    let yaml = config(&origin, &redis_block(&[redis.url()], ""), "16MiB");
    let (a, b) = (Gateway::start(&yaml), Gateway::start(&yaml));
    wait_subscribed(&[&a, &b]).await;
    let get = |gw: &Gateway| {
        let url = gw.url("/slow/p");
        tokio::spawn(async move {
            send(&client(), Request::get(url).header("host", "api.test").body(full("")).unwrap()).await
        })
    };
    // A fills (400 ms at the origin); B's request waits for A's fill; the purge lands meanwhile.
    let on_a = get(&a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let on_b = get(&b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(purge(&b, r#"{"keys": ["/slow/p"]}"#).await.status, 200);
    let (ga, gb) = (on_a.await.unwrap(), on_b.await.unwrap());
    assert_eq!(ga.text(), "/slow/p n=1", "{}", cs(&ga));
    assert_eq!(gb.text(), "/slow/p n=2", "B served the purged fill: {} {}", cs(&gb), b.log());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// A gateway on its own Redis with `extra` settings, subscribed, after one fill whose lock is
/// released (its scripts are loaded: calls Redis holds and runs later run for real, where an
/// unknown script's would fail `NOSCRIPT` and prove nothing): ready for a fault.
async fn warmed(extra: &str) -> (RedisServer, Origin, Gateway) {
    let redis = RedisServer::start();
    let (origin, _) = origin().await;
    let gw = Gateway::start(&config(&origin, &redis_block(&[redis.url()], extra), "16MiB"));
    wait_subscribed(&[&gw]).await;
    assert_eq!(call(&gw, Method::GET, "/products/warm").await.status, 200);
    // Its lock is released after the answer (in the background): not caught by the fault.
    let released =
        eventually(Duration::from_secs(5), || async { !redis.keys().iter().any(|k| k.contains(":f:")) }).await;
    assert!(released, "the warm-up fill's lock was never released: {:?}", redis.keys());
    (redis, origin, gw)
}

/// A fill lock asked for while Redis holds writes — the call times out and the miss fills
/// without the lock — is not taken when Redis resumes and runs the held call: no instance then
/// waits for a lock nobody holds. (Before, it was taken for its whole `FILL_LOCK_TTL` after the
/// fault had ended: the soak saw hits on every instance wait ~2 s right after Redis faults.)
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_lock_asked_for_during_a_pause_is_not_taken_when_redis_resumes() {
    // A breaker that stays closed through two timeouts; `CLIENT PAUSE .. WRITE` holds scripts
    // but answers reads, so the lookup answers (a miss) and the lock request is sent and held.
    let extra = "  op_timeout: 300ms\n  breaker: {failures: 50, window: 10s, open_for: 1s}\n";
    let (redis, _origin, gw) = warmed(extra).await;
    let paused_at = Instant::now();
    assert_eq!(redis.command("CLIENT PAUSE 1200 WRITE").as_deref(), Some("+OK"));
    let g = call(&gw, Method::GET, "/products/cold").await;
    assert_eq!(g.status, 200, "{}", gw.log());
    let answered = paused_at.elapsed();
    tokio::time::sleep((paused_at + Duration::from_millis(1500)).saturating_duration_since(Instant::now())).await;
    // Redis has run what it held (the lock request, the store): no lock is left.
    let locks: Vec<String> = redis.keys().into_iter().filter(|k| k.contains(":f:")).collect();
    let ttl: Vec<_> = locks.iter().map(|k| redis.command(&format!("PTTL {k}"))).collect();
    assert!(locks.is_empty(), "a fill lock nobody holds: {locks:?} (PTTL {ttl:?}; answered after {answered:?})");
    let entries = redis.keys().into_iter().filter(|k| k.contains(":e:")).count();
    assert_eq!(entries, 2, "the held store ran too: {:?}", redis.keys());
}

/// A miss while Redis does not answer meets one timeout for its lookup and then asks for no
/// fill lock (nothing would answer it, and the lock is worth having only from a Redis that
/// answers): its answer comes after two timeouts (the lookup, the store), not three — each of
/// the configured `op_timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_miss_after_a_redis_timeout_asks_for_no_fill_lock() {
    let extra = "  op_timeout: 800ms\n  breaker: {failures: 50, window: 10s, open_for: 1s}\n";
    let (redis, _origin, gw) = warmed(extra).await;
    assert_eq!(redis.command("CLIENT PAUSE 3500").as_deref(), Some("+OK"));
    let t = Instant::now();
    let g = call(&gw, Method::GET, "/products/cold").await;
    let took = t.elapsed();
    assert_eq!(g.status, 200, "{}", gw.log());
    // Two timeouts are 1.6 s; a third (the lock) would make it 2.4 s.
    // Two timeouts are 1.6 s (each the configured op_timeout, not redis-rs' own 500-ms default);
    // a third (the lock) would make it 2.4 s.
    assert!(took >= Duration::from_millis(1500), "op_timeout was cut short: a miss took {took:?}");
    assert!(took < Duration::from_millis(2200), "a miss took {took:?} while Redis was paused: {}", gw.log());
}

/// An answer that may not be stored hands the fill on to one instance at a time, not to every
/// waiting instance at once: the origin sees one request at a time from the fleet (each
/// instance's own waiters still go together, as they do without Redis).
#[tokio::test(flavor = "multi_thread")]
async fn an_unstorable_answer_hands_the_turn_to_one_instance_at_a_time() {
    for (fill_lock, most) in [(true, 1), (false, 3)] {
        let redis = RedisServer::start();
        let now = Arc::new(AtomicU32::new(0));
        let max = Arc::new(AtomicU32::new(0));
        let (n, m) = (now.clone(), max.clone());
        let origin = Origin::start(move |_req| {
            let (n, m) = (n.clone(), m.clone());
            async move {
                let at = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(at, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                let mut r = text(200, "private");
                r.headers_mut().insert("cache-control", "no-store".parse().unwrap());
                r
            }
        })
        .await;
        let yaml = config(&origin, &redis_block(&[redis.url()], &format!("  fill_lock: {fill_lock}\n")), "16MiB");
        let gws = [Gateway::start(&yaml), Gateway::start(&yaml), Gateway::start(&yaml)];
        wait_subscribed(&[&gws[0], &gws[1], &gws[2]]).await;
        let calls: Vec<_> = gws
            .iter()
            .map(|gw| {
                let url = gw.url("/products/private");
                tokio::spawn(async move {
                    send(&client(), Request::get(url).header("host", "api.test").body(full("")).unwrap()).await
                })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap().status, 200);
        }
        assert_eq!(max.load(Ordering::SeqCst), most, "fill_lock {fill_lock}: most origin requests at once");
    }
}

/// A Redis that was away for a while is used again within about `open_for` (the longest wait
/// between probes; probes start at twice op_timeout and back off), not after a whole `open_for`
/// per failed probe on top of the outage.
#[tokio::test(flavor = "multi_thread")]
async fn redis_back_after_an_outage_closes_the_breaker_within_open_for() {
    let mut redis = RedisServer::start();
    let (origin, _) = origin().await;
    let extra = "  op_timeout: 50ms\n  breaker: {failures: 1, window: 10s}\n";
    let gw = Gateway::start(&config(&origin, &redis_block(&[redis.url()], extra), "16MiB"));
    wait_subscribed(&[&gw]).await;
    redis.kill();
    let open = eventually(Duration::from_secs(10), || async {
        call(&gw, Method::GET, "/during").await;
        health(&gw).await["redis"]["breaker"] == serde_json::json!("open")
    })
    .await;
    assert!(open, "the breaker did not open: {}", gw.log());
    // Away long enough for several failed probes (at the old fixed 5 s, one more would come at 10 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    redis.restart();
    let back = Instant::now();
    let closed = eventually(Duration::from_secs(15), || async {
        health(&gw).await["redis"]["breaker"] == serde_json::json!("closed")
    })
    .await;
    let took = back.elapsed();
    assert!(closed, "breaker never closed: {}", gw.log());
    // open_for defaults to 1 s here; a second of supervisor tick and reconnection on top.
    assert!(took < Duration::from_millis(3500), "closed {took:?} after Redis came back: {}", gw.log());
}

/// After a network fault — packets dropped, then every connection cut (a black hole) — the first
/// probe meets the connection that was cut and fails; the client reconnects on that error, so
/// another probe follows two `op_timeout`s later instead of a whole `open_for` later: Redis is used
/// again within `open_for` plus a second of the hole's end (README). The hole ends just after a
/// failed probe whose wait is `open_for`, so the next probe is the one that meets the dead connection.
#[tokio::test(flavor = "multi_thread")]
async fn redis_back_after_a_black_hole_is_found_by_the_probe_after_the_one_that_met_the_cut() {
    let redis = RedisServer::start();
    let relay = weir_e2e::relay::Relay::start(redis.port).await;
    let (origin, _) = origin().await;
    let open_for = Duration::from_secs(3);
    let extra = "  op_timeout: 100ms\n  breaker: {failures: 1, window: 10s, open_for: 3s}\n";
    let url = format!("redis://127.0.0.1:{}", relay.port);
    let gw = Gateway::start(&config(&origin, &redis_block(&[url], extra), "16MiB"));
    wait_subscribed(&[&gw]).await;
    assert_eq!(call(&gw, Method::GET, "/products/1").await.status, 200);

    relay.set(weir_e2e::relay::HOLE);
    // L1 misses all along, each with an L2 lookup: one the breaker lets through while open is a
    // probe (besides the supervisor's once-a-second ping).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), gw.url("/products/"));
        tokio::spawn(async move {
            for i in 2.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = Request::get(format!("{url}{i}")).header("host", "api.test").body(full("")).unwrap();
                let _ = tokio::time::timeout(Duration::from_secs(2), send(&client(), req)).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Failed probes (half-open, then open again): waits of 0.2 s (first), then 0.4, 0.8, 1.6 and
    // 3 s (open_for) after each. After the fourth the next probe is open_for away.
    let (mut failed, mut probing) = (0, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while failed < 4 && Instant::now() < deadline {
        match health(&gw).await["redis"]["breaker"].as_str() {
            Some("half_open") => probing = true,
            Some("open") if probing => {
                failed += 1;
                probing = false;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(failed, 4, "probes seen failing in the hole: {}", gw.log());
    relay.reset_all();
    relay.set(weir_e2e::relay::PASS);
    let end = Instant::now();
    let closed = eventually(Duration::from_secs(15), || async {
        health(&gw).await["redis"]["breaker"] == serde_json::json!("closed")
    })
    .await;
    let took = end.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    assert!(closed, "breaker never closed: {}", gw.log());
    assert!(
        gw.log().contains("probe found its connection dead"),
        "no probe met the cut connection (the test no longer covers the case): {}",
        gw.log()
    );
    // The dead probe open_for after the end, the next one two op_timeouts later (a doubled wait
    // would be another open_for).
    assert!(took < open_for + Duration::from_secs(1), "closed {took:?} after the hole ended: {}", gw.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_redis_costs_about_op_timeout_then_the_breaker_opens_and_recovers() {
    let extra = "  op_timeout: 50ms\n  breaker: {failures: 3, window: 10s, open_for: 1s}\n";
    let (redis, origin, gw) = warmed(extra).await;
    assert_eq!(redis.command("CLIENT PAUSE 3000").as_deref(), Some("+OK"));
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        let g = call(&gw, Method::GET, &format!("/paused/{i}")).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(g.status, 200);
        assert_eq!(g.text(), format!("/paused/{i} n={}", i + 2));
    }
    // A lookup and a store each wait at most op_timeout (generous bound for a loaded CI box).
    assert!(slowest < Duration::from_millis(600), "a request took {slowest:?} while Redis was paused");
    assert_eq!(health(&gw).await["redis"]["breaker"], "open");
    // After the pause the probe closes the breaker.
    let closed = eventually(Duration::from_secs(10), || async {
        health(&gw).await["redis"]["breaker"] == serde_json::json!("closed")
    })
    .await;
    assert!(closed, "breaker never closed: {}", gw.log());
    call(&gw, Method::GET, "/later").await;
    let b = Gateway::start(&config(&origin, &redis_block(&[redis.url()], extra), "16MiB"));
    assert_eq!(cs(&call(&b, Method::GET, "/later").await), "weir; hit; detail=l2");
}

#[tokio::test(flavor = "multi_thread")]
async fn requirepass_good_password_works_and_a_wrong_one_stops_start_up() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let (origin, _) = origin().await;
    let yaml = config(&origin, &redis_block(&[redis.url()], "  password_env: WEIR_TEST_REDIS_PASSWORD\n"), "0");
    let gw = Gateway::builder().env("WEIR_TEST_REDIS_PASSWORD", "s3cret").start(&yaml);
    call(&gw, Method::GET, "/x").await;
    assert_eq!(cs(&call(&gw, Method::GET, "/x").await), "weir; hit; detail=l2");

    let err = Gateway::builder().env("WEIR_TEST_REDIS_PASSWORD", "wrong").try_start(&yaml).unwrap_err();
    assert!(err.contains("Redis refused Weir's credentials"), "{err}");
    assert!(!err.contains("wrong"), "the password leaked into the log: {err}");
    // Nothing announced as listening by an instance that will not serve.
    assert!(!err.contains("listening"), "announced before Redis was checked: {err}");
    let err = Gateway::builder().try_start(&yaml).unwrap_err();
    assert!(err.contains("WEIR_TEST_REDIS_PASSWORD"), "{err}");

    // `weir validate` checks the configuration, not secrets it cannot see.
    let out = std::process::Command::new(weir_bin())
        .args(["validate", "--config"])
        .arg(&gw.config_path)
        .env_remove("WEIR_TEST_REDIS_PASSWORD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cluster_store_hit_and_purge_by_tag() {
    let cluster = RedisCluster::start();
    let (origin, _) = origin().await;
    let yaml = config(&origin, &redis_block(&cluster.urls(), ""), "16MiB");
    let a = Gateway::start(&yaml);
    let b = Gateway::start(&yaml);
    wait_subscribed(&[&a, &b]).await;
    for i in 0..30 {
        assert_eq!(cs(&call(&a, Method::GET, &format!("/products/{i}")).await), "weir; fwd=miss; stored");
    }
    for i in 0..30 {
        assert_eq!(cs(&call(&b, Method::GET, &format!("/products/{i}")).await), "weir; hit; detail=l2", "{i}");
    }
    // Entries spread over the masters rather than one slot.
    let used = cluster.nodes.iter().filter(|n| n.dbsize() > 0).count();
    assert!(used >= 2, "all entries on one node");
    purge(&a, r#"{"tags": ["product:7"]}"#).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            cs(&call(&b, Method::GET, "/products/7").await).contains("fwd=miss")
        })
        .await
    );
    assert_eq!(cs(&call(&b, Method::GET, "/products/8").await), "weir; hit; detail=l1");
    purge(&b, r#"{"prefixes": ["/products/"]}"#).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            cs(&call(&a, Method::GET, "/products/9").await).contains("fwd=miss")
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_on_one_instance_wins_over_a_fetch_in_flight_on_another() {
    let redis = RedisServer::start();
    let (origin, hits) = origin().await;
    let yaml = config(&origin, &redis_block(&[redis.url()], "  op_timeout: 200ms\n"), "16MiB");
    let a = Gateway::start(&yaml);
    let b = Gateway::start(&yaml);
    wait_subscribed(&[&a, &b]).await;
    let url = b.url("/slow/1");
    let in_flight = tokio::spawn(async move {
        let req = Request::get(url).header("host", "api.test").body(full("")).unwrap();
        send(&client(), req).await
    });
    // The fetch has reached the origin (which answers 400 ms later): purge now.
    assert!(eventually(Duration::from_secs(5), || async { hits.load(Ordering::SeqCst) == 1 }).await);
    assert_eq!(purge(&a, r#"{"keys": ["/slow/1"]}"#).await.status, 200);
    let g = in_flight.await.unwrap();
    assert_eq!(g.status, 200);
    assert_eq!(cs(&g), "weir; fwd=miss; detail=purged", "the overtaken fetch was stored");
    // Neither tier kept the pre-purge answer.
    assert!(cs(&call(&a, Method::GET, "/slow/1").await).contains("fwd=miss"));
}

/// The Redis side of the purge-vs-fill race, alone: instance B may not subscribe (its Redis
/// user has no channel rights), so no purge message ever reaches it, and its store of an
/// overtaken fetch must be refused by the store script's check of the purge log. A third
/// instance then finds nothing in L2 for that path, while B's other stores are there.
#[tokio::test(flavor = "multi_thread")]
async fn the_store_script_refuses_a_fill_overtaken_by_a_purge_it_never_heard_of() {
    let redis = RedisServer::start_with(&["--user", "deaf", "on", ">deafpass", "~*", "resetchannels", "+@all"]);
    let (origin, hits) = origin().await;
    let extra = "  op_timeout: 500ms\n";
    let yaml = config(&origin, &redis_block(&[redis.url()], extra), "16MiB");
    let deaf_url = redis.url().replacen("redis://", "redis://deaf:deafpass@", 1);
    let a = Gateway::start(&yaml);
    let b = Gateway::start(&config(&origin, &redis_block(&[deaf_url], extra), "16MiB"));
    wait_subscribed(&[&a]).await;
    assert_eq!(health(&b).await["redis"]["invalidations_subscribed"], serde_json::json!(false));
    // Control: B's stores reach L2.
    assert_eq!(cs(&call(&b, Method::GET, "/products/1").await), "weir; fwd=miss; stored");
    let url = b.url("/slow/1");
    let in_flight = tokio::spawn(async move {
        let req = Request::get(url).header("host", "api.test").body(full("")).unwrap();
        send(&client(), req).await
    });
    assert!(eventually(Duration::from_secs(5), || async { hits.load(Ordering::SeqCst) == 2 }).await);
    assert_eq!(purge(&a, r#"{"keys": ["/slow/1"]}"#).await.status, 200);
    assert_eq!(in_flight.await.unwrap().status, 200);
    let c = Gateway::start(&yaml);
    wait_subscribed(&[&c]).await;
    assert_eq!(cs(&call(&c, Method::GET, "/products/1").await), "weir; hit; detail=l2", "B's stores reach L2");
    let g = call(&c, Method::GET, "/slow/1").await;
    assert_eq!(cs(&g), "weir; fwd=miss; stored", "L2 kept a fill the purge overtook: {}", g.text());
}

/// Runs `script` with `redis-cli EVAL` on every entry key (`weir:{B}:e:*`); the replies.
fn eval_on_entries(redis: &RedisServer, script: &str) -> Vec<String> {
    let entries: Vec<String> = redis.keys().into_iter().filter(|k| k.contains(":e:")).collect();
    entries
        .iter()
        .map(|k| {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &redis.port.to_string(), "--raw", "EVAL", script, "1", k])
                .output()
                .expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect()
}

/// A value changed in Redis by anyone without the deployment secret (here: one body byte,
/// everything else intact, so it still decodes) is ignored, not served: the MAC does not verify.
/// And a client write purges its URL's L2 entry only, through the exact-path index.
#[tokio::test(flavor = "multi_thread")]
async fn tampered_l2_values_are_ignored_and_a_write_purges_only_its_url() {
    let redis = RedisServer::start();
    let (origin, _) = origin().await;
    let yaml = config(&origin, &redis_block(&[redis.url()], ""), "16MiB");
    let a = Gateway::start(&yaml);
    for p in ["/products/1", "/products/2", "/products/3"] {
        assert_eq!(cs(&call(&a, Method::GET, p).await), "weir; fwd=miss; stored");
    }
    // Forge /products/1: ` n=1` becomes ` n=9` in place (same length, TTL kept).
    let forged = eval_on_entries(
        &redis,
        "local v = redis.call('GET', KEYS[1]) local i = string.find(v, '/products/1 n=1', 1, true) \
         if not i then return 0 end \
         redis.call('SET', KEYS[1], string.sub(v, 1, i + 13) .. '9' .. string.sub(v, i + 15), 'KEEPTTL') return 1",
    );
    assert_eq!(forged.iter().filter(|r| *r == "1").count(), 1, "{forged:?}");
    let b = Gateway::start(&yaml);
    wait_subscribed(&[&a, &b]).await;
    let g = call(&b, Method::GET, "/products/1").await;
    assert_ne!(g.text(), "/products/1 n=9", "a forged L2 value was served");
    assert_eq!(cs(&g), "weir; fwd=miss; stored");
    assert_eq!(cs(&call(&b, Method::GET, "/products/2").await), "weir; hit; detail=l2");
    // On the route without tags, a write to /o/3 on A: a fresh instance misses there and still
    // hits /o/2 (same prefix) from L2.
    let c0 = client();
    let other = |gw: &Gateway, m: Method, p: &str| {
        let req = Request::builder().method(m).uri(gw.url(p)).header("host", "other.test").body(full("")).unwrap();
        send(&c0, req)
    };
    for p in ["/o/2", "/o/3"] {
        assert_eq!(cs(&other(&a, Method::GET, p).await), "weir; fwd=miss; stored");
    }
    assert_eq!(other(&a, Method::PUT, "/o/3").await.status, 200);
    let c = Gateway::start(&yaml);
    wait_subscribed(&[&c]).await;
    assert_eq!(cs(&other(&c, Method::GET, "/o/3").await), "weir; fwd=miss; stored");
    assert_eq!(cs(&other(&c, Method::GET, "/o/2").await), "weir; hit; detail=l2");
}

/// A CA and a server certificate for `localhost` / 127.0.0.1, made with the openssl CLI.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=weir test ca"],
    ]
    .concat());
    run(&[&["req"][..], &ec, &["-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost"]].concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_with_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).display().to_string();
    let tls_port = free_port().to_string();
    let (cert, key, ca) = (p("srv.pem"), p("srv.key"), p("ca.pem"));
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    let (origin, _) = origin().await;
    let url = format!("rediss://localhost:{tls_port}/0");
    let yaml = config(&origin, &redis_block(std::slice::from_ref(&url), &format!("  tls: {{ca: {ca}}}\n")), "0");
    let gw = Gateway::start(&yaml);
    call(&gw, Method::GET, "/t").await;
    assert_eq!(cs(&call(&gw, Method::GET, "/t").await), "weir; hit; detail=l2", "{}", gw.log());
    assert!(redis.dbsize() > 0);

    // Without the CA the server is not trusted: Weir says so and serves without the shared tier.
    let untrusted = Gateway::start(&config(&origin, &redis_block(&[url], ""), "16MiB"));
    assert_eq!(call(&untrusted, Method::GET, "/u").await.status, 200);
    assert_eq!(health(&untrusted).await["redis"]["connected"], false);
    let log = untrusted.log();
    assert!(log.contains("redis unreachable at start") && log.to_lowercase().contains("certificate"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_made_while_redis_stalls_is_replayed_when_it_recovers() {
    let redis = RedisServer::start();
    let (origin, _) = origin().await;
    let yaml = config(&origin, &redis_block(&[redis.url()], "  op_timeout: 50ms\n"), "16MiB");
    let a = Gateway::start(&yaml);
    wait_subscribed(&[&a]).await;
    call(&a, Method::GET, "/r/1").await;
    // Writes (the purge script) stall; reads still answer.
    assert_eq!(redis.command("CLIENT PAUSE 1500 WRITE").as_deref(), Some("+OK"));
    assert_eq!(purge(&a, r#"{"keys": ["/r/1"]}"#).await.status, 200);
    assert!(a.log().contains("queued until it is back"), "{}", a.log());
    // Once Redis takes writes again the queued purge reaches it: a fresh instance misses.
    let replayed = eventually(Duration::from_secs(6), || async { a.log().contains("still_queued=0") }).await;
    assert!(replayed, "{}", a.log());
    let c = Gateway::start(&yaml);
    assert!(cs(&call(&c, Method::GET, "/r/1").await).contains("fwd=miss"), "{}", a.log());
}
