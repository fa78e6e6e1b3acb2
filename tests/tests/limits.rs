//! Rate limits end to end: the real binary, a counting origin, and for the distributed cases a
//! real Redis shared by two instances. Counts are exact; no wall-clock tolerance is needed
//! because the rates are per hour or per day.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::Request;
use weir_e2e::*;

async fn origin() -> (Origin, Arc<AtomicUsize>) {
    Origin::counting(|_req| async move {
        let mut r = text(200, "ok");
        // An origin's own quota fields: Weir's replace them, and they are never stored.
        r.headers_mut().insert("ratelimit", "\"origin\";r=999;t=1".parse().unwrap());
        r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await
}

/// A gateway with one route per `(name, path, rate_limit block, cache)`.
fn config(origin: &Origin, redis: Option<&str>, routes: &[(&str, &str, &str, bool)]) -> String {
    let mut y = String::from("listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\n");
    if let Some(r) = redis {
        y.push_str(r);
    }
    y.push_str("routes:\n");
    for (name, path, limit, cached) in routes {
        y.push_str(&format!(
            "  - name: {name}\n    match: {{ path: {path} }}\n    upstream: {}\n    rate_limit:\n{limit}",
            origin.url()
        ));
        if *cached {
            y.push_str("    cache: { ttl: 60s }\n");
        }
    }
    y
}

async fn get_path(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::get(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(full("")).unwrap()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_local_limit_admits_its_burst_then_answers_429_with_honest_headers() {
    let (origin, hits) = origin().await;
    let gw = Gateway::start(&config(
        &origin,
        None,
        &[("api", "/", "      rate: 1/1h\n      burst: 5\n      key: route\n", false)],
    ));
    let mut remaining = Vec::new();
    for i in 0..5 {
        let g = get_path(&gw, &format!("/a/{i}"), &[]).await;
        assert_eq!(g.status, 200, "{}", g.text());
        assert_eq!(g.header("ratelimit-policy"), Some("\"default\";q=5;w=18000"));
        remaining.push(g.header("ratelimit").unwrap().to_string());
    }
    assert_eq!(remaining[0], "\"default\";r=4;t=3600", "{remaining:?}");
    assert!(remaining[4].starts_with("\"default\";r=0;t="), "{remaining:?}");
    for i in 0..20 {
        let g = get_path(&gw, &format!("/b/{i}"), &[]).await;
        assert_eq!(g.status, 429, "{}", g.text());
        assert_eq!(g.json()["error"], "rate_limited");
        let retry: u64 = g.header("retry-after").unwrap().parse().unwrap();
        assert!((3590..=3600).contains(&retry), "Retry-After {retry}: one cell comes back in an hour");
        assert!(g.header("ratelimit").unwrap().starts_with("\"default\";r=0;"));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 5, "refused requests never reach the origin");
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(m.contains(r#"weir_ratelimit_rejected_total{route="api",policy="default"} 20"#), "{m}");
}

/// Two instances on one Redis share one quota exactly: 200 concurrent requests spread over
/// both admit exactly the burst (GCRA) or the quota (fixed window), never more.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_on_one_redis_admit_exactly_the_quota() {
    let redis = RedisServer::start();
    let (origin, hits) = origin().await;
    let block = format!("redis:\n  url: {}\n", redis.url());
    let yaml = config(
        &origin,
        Some(&block),
        &[
            ("gcra", "/g", "      rate: 1/1h\n      burst: 10\n      key: route\n", false),
            ("window", "/w", "      rate: 10/1d\n      algorithm: fixed_window\n      key: route\n", false),
        ],
    );
    let a = Gateway::start(&yaml);
    let b = Gateway::start(&yaml);
    for prefix in ["/g", "/w"] {
        let before = hits.load(Ordering::SeqCst);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..200 {
            let url = if i % 2 == 0 { a.url(&format!("{prefix}/{i}")) } else { b.url(&format!("{prefix}/{i}")) };
            set.spawn(async move { send(&client(), Request::get(url).body(full("")).unwrap()).await.status });
        }
        let mut ok = 0;
        let mut limited = 0;
        while let Some(s) = set.join_next().await {
            match s.unwrap().as_u16() {
                200 => ok += 1,
                429 => limited += 1,
                other => panic!("{prefix}: status {other}"),
            }
        }
        assert_eq!((ok, limited), (10, 190), "{prefix}: {}", a.log());
        assert_eq!(hits.load(Ordering::SeqCst) - before, 10, "{prefix}");
    }
    // Checks that arrived while a call was in flight shared the next one: fewer script calls
    // than checks (400), each still decided on its own (the counts above are exact).
    let calls = redis.script_calls();
    println!("400 checks in {calls} script calls");
    assert!(calls > 0 && calls < 400, "400 checks took {calls} script calls");
}

/// A request refused by the tighter policy consumes nothing from the other: after 50 requests
/// against a burst of 2, the daily quota has paid for exactly 2.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_by_one_policy_consumes_nothing_from_another() {
    let limits = "      - name: burst\n        rate: 1/1h\n        burst: 2\n        key: route\n      - name: daily\n        rate: 100/1d\n        algorithm: fixed_window\n        key: route\n";
    for redis in [None, Some(RedisServer::start())] {
        let (origin, hits) = origin().await;
        let block = redis.as_ref().map(|r| format!("redis:\n  url: {}\n", r.url()));
        let gw = Gateway::start(&config(&origin, block.as_deref(), &[("api", "/", limits, false)]));
        let mut statuses = Vec::new();
        for i in 0..50 {
            statuses.push(get_path(&gw, &format!("/x/{i}"), &[]).await);
        }
        assert_eq!(statuses.iter().filter(|g| g.status == 200).count(), 2);
        let refused = &statuses[49];
        assert_eq!(refused.status, 429);
        assert_eq!(refused.header("ratelimit-policy"), Some("\"burst\";q=2;w=7200, \"daily\";q=100;w=86400"));
        assert!(refused.header("ratelimit").unwrap().starts_with("\"burst\";r=0;"), "the refusing policy is named");
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // The second admitted response named the policy closest to exhaustion: `burst`, r=0.
        assert!(statuses[1].header("ratelimit").unwrap().starts_with("\"burst\";r=0;"));
        if let Some(r) = &redis {
            let daily: Vec<String> = r.keys().into_iter().filter(|k| k.ends_with(":daily")).collect();
            assert_eq!(daily.len(), 1, "{:?}", r.keys());
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &r.port.to_string(), "--raw", "GET", &daily[0]])
                .output()
                .unwrap();
            let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(value.ends_with(":2"), "the daily window paid for {value}");
        }
    }
}

/// Cached hits count too (`count: all` runs before the cache), and a hit never replays the
/// origin's own `RateLimit` field.
#[tokio::test(flavor = "multi_thread")]
async fn hits_are_counted_and_never_replay_the_origins_quota() {
    let (origin, hits) = origin().await;
    let gw = Gateway::start(&config(
        &origin,
        None,
        &[("api", "/", "      rate: 1/1h\n      burst: 3\n      key: route\n      headers: false\n", true)],
    ));
    let first = get_path(&gw, "/same", &[]).await;
    assert_eq!(first.status, 200);
    let hit = get_path(&gw, "/same", &[]).await;
    assert_eq!(hit.header("cache-status"), Some("weir; hit; detail=l1"));
    assert_eq!(hit.header("ratelimit"), None, "a hit replayed the origin's quota");
    assert_eq!(get_path(&gw, "/same", &[]).await.status, 200);
    assert_eq!(get_path(&gw, "/same", &[]).await.status, 429, "the fourth request, a hit, is over the burst");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// `client_ip` from an untrusted peer ignores `X-Forwarded-For`: a spoofed header per request
/// still lands in the peer's own bucket.
#[tokio::test(flavor = "multi_thread")]
async fn a_spoofed_forwarded_for_lands_in_the_peers_bucket() {
    let (origin, _) = origin().await;
    let gw = Gateway::start(&config(
        &origin,
        None,
        &[("api", "/", "      rate: 1/1h\n      burst: 3\n      key: client_ip\n", false)],
    ));
    let admitted = {
        let mut n = 0;
        for i in 0..10 {
            let xff = format!("10.0.0.{i}");
            if get_path(&gw, "/x", &[("x-forwarded-for", &xff)]).await.status == 200 {
                n += 1;
            }
        }
        n
    };
    assert_eq!(admitted, 3);
    // A header key counts per value; a request without it falls back to the client address.
    let gw = Gateway::start(&config(
        &origin,
        None,
        &[("api", "/", "      rate: 1/1h\n      burst: 1\n      key: header:x-api-key\n", false)],
    ));
    for k in ["a", "b", "c"] {
        assert_eq!(get_path(&gw, "/x", &[("x-api-key", k)]).await.status, 200, "{k}");
        assert_eq!(get_path(&gw, "/x", &[("x-api-key", k)]).await.status, 429, "{k}");
    }
}

/// 50,000 distinct client addresses through a trusted proxy: the local limiter holds at most
/// `server.rate_limit_keys` of them (`weir_ratelimit_keys`), and a client it tracks is still
/// limited after the flood.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_distinct_keys_stays_within_the_key_cap() {
    let (origin, hits) = origin().await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nserver:\n  trusted_proxies: [127.0.0.1/32]\n  rate_limit_keys: 1000\nroutes:\n  - name: api\n    upstream: {}\n    rate_limit: {{ key: client_ip, rate: 1/1h, burst: 2 }}\n",
        origin.url()
    );
    let gw = Arc::new(Gateway::start(&yaml));
    const TASKS: u32 = 16;
    const EACH: u32 = 50_000 / TASKS;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut ok = 0u32;
            for i in 0..EACH {
                let n = t * EACH + i;
                let xff = format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255);
                let req = Request::get(gw.url("/x")).header("x-forwarded-for", xff).body(full("")).unwrap();
                if send(&c, req).await.status == 200 {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, TASKS * EACH, "every new address has its own burst");
    let m = get(&gw.admin_url("/metrics")).await.text();
    let keys: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("weir_ratelimit_keys "))
        .expect("weir_ratelimit_keys gauge")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&keys), "{keys} keys tracked, cap 1000");
    // A client seen after the flood is tracked and limited like any other.
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get_path(&gw, "/x", &[("x-forwarded-for", "192.0.2.7")]).await.status.as_u16());
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(hits.load(Ordering::SeqCst), TASKS as usize * EACH as usize + 2);
}

/// Redis gone: `closed` answers 503 JSON, `open` admits everything, `local` keeps limiting on
/// this instance at `rate / redis.instances`; every fallback is counted.
#[tokio::test(flavor = "multi_thread")]
async fn with_redis_gone_each_fail_mode_does_what_it_says() {
    let mut redis = RedisServer::start();
    let (origin, _) = origin().await;
    let block = format!("redis:\n  url: {}\n  instances: 2\n  op_timeout: 200ms\n", redis.url());
    let policy = |fail: &str| format!("      rate: 1/1h\n      burst: 4\n      key: route\n      fail: {fail}\n");
    let (closed, open, local) = (policy("closed"), policy("open"), policy("local"));
    let gw = Gateway::start(&config(
        &origin,
        Some(&block),
        &[("closed", "/c", &closed, false), ("open", "/o", &open, false), ("local", "/l", &local, false)],
    ));
    assert_eq!(get_path(&gw, "/c", &[]).await.status, 200, "shared counters while Redis is up");
    redis.kill();
    let g = get_path(&gw, "/c", &[]).await;
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(g.json()["error"], "ratelimit_unavailable");
    for _ in 0..10 {
        assert_eq!(get_path(&gw, "/o", &[]).await.status, 200);
    }
    let mut local_ok = 0;
    for _ in 0..10 {
        if get_path(&gw, "/l", &[]).await.status == 200 {
            local_ok += 1;
        }
    }
    assert_eq!(local_ok, 2, "burst 4 shared by 2 instances");
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(m.contains(r#"weir_ratelimit_fallback_total{route="open"} 10"#), "{m}");
}

/// `weir validate` on `yaml`: whether it passed, and what it printed.
const ROUTE: &str = "routes:\n  - name: r\n    upstream: http://127.0.0.1:1\n";

#[test]
fn bad_limits_are_refused_with_their_position() {
    for (limit, want) in [
        ("    rate_limit: { rate: 0/s }\n", "greater than zero"),
        ("    rate_limit: { rate: 10/s, burst: 0 }\n", "at least 1"),
        ("    rate_limit: { rate: 10/s, algorithm: leaky }\n", "unknown algorithm"),
        ("    rate_limit: { rate: 10/s, key: cookie }\n", "invalid key"),
        ("    rate_limit: { rate: 10/1d, algorithm: fixed_window, burst: 5 }\n", "no burst"),
        ("    rate_limit:\n      - { name: a, rate: 1/s }\n      - { name: a, rate: 2/s }\n", "duplicate"),
        ("    rate_limit:\n      - { rate: 1/s }\n", "needs a `name`"),
    ] {
        let (ok, text) = validate(&format!("listen:\n  - addr: 127.0.0.1:0\n{ROUTE}{limit}"));
        assert!(!ok, "{limit}: accepted");
        assert!(text.contains(want), "{limit}: {text}");
        assert!(text.contains("weir.yaml:"), "{limit}: no position in {text}");
    }
}

/// On a Redis Cluster, the policies of one key share a hash tag: one script call, one slot, no
/// CROSSSLOT refusal; the quota is exact across two instances. Policies counting by different
/// keys (different slots) hold too, all or nothing. After Redis restarts (empty), the
/// instances go back to shared counters by themselves.
#[tokio::test(flavor = "multi_thread")]
async fn limits_on_a_cluster_and_after_a_redis_restart() {
    let limits = "      - name: burst\n        rate: 1/1h\n        burst: 3\n        key: header:x-k\n      - name: daily\n        rate: 100/1d\n        algorithm: fixed_window\n        key: header:x-k\n";
    let cluster = RedisCluster::start();
    let (origin, _) = origin().await;
    let list: String = cluster.urls().iter().map(|u| format!("    - {u}\n")).collect();
    // The address' policy first: consumed before the key's refuses, were it not read first.
    let two = "      - name: per-address\n        rate: 1/1h\n        burst: 5\n        key: client_ip\n      - name: per-key\n        rate: 1/1h\n        burst: 3\n        key: header:x-k\n";
    let yaml = config(
        &origin,
        Some(&format!("redis:\n  cluster:\n{list}")),
        &[("two", "/two/", two, false), ("api", "/", limits, false)],
    );
    let (a, b) = (Gateway::start(&yaml), Gateway::start(&yaml));
    for key in ["k1", "k2", "k3", "k4"] {
        let mut ok = 0;
        for i in 0..10 {
            let gw = if i % 2 == 0 { &a } else { &b };
            if get_path(gw, "/x", &[("x-k", key)]).await.status == 200 {
                ok += 1;
            }
        }
        assert_eq!(ok, 3, "{key}: {}", a.log());
    }
    // Policies counting by different keys (here the header and the client's address) sit in
    // different slots, which one script cannot touch: read in each, consumed only if all admit.
    // Per key 3, per address 5 in all: k1 gets 3 (its fourth is refused by its own policy and
    // costs the address nothing), k2 the address' last 2, k3 none.
    for (key, want) in [("k1", 3), ("k2", 2), ("k3", 0)] {
        let mut ok = 0;
        for i in 0..5 {
            let gw = if i % 2 == 0 { &a } else { &b };
            if get_path(gw, "/two/x", &[("x-k", key)]).await.status == 200 {
                ok += 1;
            }
        }
        assert_eq!(ok, want, "{key}: {}", a.log());
    }
    let m = get(&a.admin_url("/metrics")).await.text() + &get(&b.admin_url("/metrics")).await.text();
    assert!(!m.contains("weir_ratelimit_fallback_total"), "a cluster call fell back:\n{m}");

    let mut redis = RedisServer::start();
    let yaml = config(
        &origin,
        Some(&format!("redis:\n  url: {}\n  op_timeout: 200ms\n", redis.url())),
        &[("api", "/", limits, false)],
    );
    let (a, b) = (Gateway::start(&yaml), Gateway::start(&yaml));
    redis.kill();
    for gw in [&a, &b] {
        assert_eq!(get_path(gw, "/x", &[("x-k", "while-down")]).await.status, 200, "fail: local admits");
    }
    redis.restart();
    // Back to shared counters without restarting Weir: once Redis answers again, the two
    // instances together admit exactly the burst of a fresh key.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while get(&a.admin_url("/health")).await.json()["redis"]["connected"] != serde_json::json!(true)
        || get(&b.admin_url("/health")).await.json()["redis"]["connected"] != serde_json::json!(true)
    {
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let before = get(&a.admin_url("/metrics")).await.text();
    let mut ok = 0;
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if get_path(gw, "/x", &[("x-k", "after-restart")]).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "shared counters again after the restart ({before})");
}

/// `GET /ratelimits/{route}/{key}` reads each policy's state without consuming it; `DELETE`
/// gives the key its full quota back — on every instance sharing the Redis.
#[tokio::test(flavor = "multi_thread")]
async fn admin_reads_and_resets_a_key() {
    let limits = "      - name: burst\n        rate: 1/1h\n        burst: 3\n        key: header:x-api-key\n      - name: daily\n        rate: 100/1d\n        algorithm: fixed_window\n        key: header:x-api-key\n";
    for redis in [None, Some(RedisServer::start())] {
        let (origin, _) = origin().await;
        let block = redis.as_ref().map(|r| format!("redis:\n  url: {}\n", r.url()));
        let gw = Gateway::start(&config(&origin, block.as_deref(), &[("api", "/", limits, false)]));
        for _ in 0..5 {
            get_path(&gw, "/x", &[("x-api-key", "alice key")]).await;
        }
        let read = || async { get(&gw.admin_url("/ratelimits/api/alice%20key")).await.json() };
        let v = read().await;
        assert_eq!(v["policies"][0]["name"], "burst", "{v}");
        assert_eq!(v["policies"][0]["remaining"], 0, "{v}");
        assert_eq!(v["policies"][1]["remaining"], 97, "{v}");
        assert_eq!(read().await, v, "reading consumed something");
        let del = send(
            &client(),
            Request::delete(gw.admin_url("/ratelimits/api/alice%20key"))
                .header("content-type", "application/json")
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(del.status, 200, "{}", del.text());
        let v = read().await;
        assert_eq!(
            (v["policies"][0]["remaining"].as_u64(), v["policies"][1]["remaining"].as_u64()),
            (Some(3), Some(100)),
            "{v}"
        );
        assert_eq!(get_path(&gw, "/x", &[("x-api-key", "alice key")]).await.status, 200);
        assert_eq!(get(&gw.admin_url("/ratelimits/nope/x")).await.status, 404);

        // The same bucket named by the value's SHA-256: no raw key in the URL.
        use sha2::Digest as _;
        let digest: String = sha2::Sha256::digest(b"alice key").iter().map(|b| format!("{b:02x}")).collect();
        let v = get(&gw.admin_url(&format!("/ratelimits/api?kind=header&sha256={digest}"))).await.json();
        assert_eq!(v["policies"][0]["remaining"], 2, "{v}");
        assert_eq!(v["key"], format!("sha256:{digest}"), "{v}");
        // Requests without the header are counted by address: that bucket is `kind=address`.
        for _ in 0..2 {
            get_path(&gw, "/x", &[]).await;
        }
        let by_addr = get(&gw.admin_url("/ratelimits/api/127.0.0.1?kind=address")).await.json();
        assert_eq!(by_addr["policies"][0]["remaining"], 1, "{by_addr}");
        // ... and not under its own kind (the header value `127.0.0.1` was never sent).
        assert_eq!(get(&gw.admin_url("/ratelimits/api/127.0.0.1")).await.json()["policies"][0]["remaining"], 3);
        let delete = |path: String| {
            let url = gw.admin_url(&path);
            async move {
                send(&client(), Request::delete(url).header("content-type", "application/json").body(full("")).unwrap())
                    .await
                    .json()
            }
        };
        assert_eq!(delete("/ratelimits/api/127.0.0.1?kind=address".into()).await["reset"], true);
        assert_eq!(
            get(&gw.admin_url("/ratelimits/api/127.0.0.1?kind=address")).await.json()["policies"][0]["remaining"],
            3
        );
        // Nothing to forget: said so.
        assert_eq!(delete("/ratelimits/api/nobody?kind=consumer".into()).await["reset"], false);
        assert_eq!(delete(format!("/ratelimits/api?kind=header&sha256={digest}")).await["reset"], true);
        assert_eq!(get(&gw.admin_url("/ratelimits/api?kind=header&sha256=xyz")).await.status, 400);
    }
}

/// Consumers: API keys as SHA-256 digests (or from the environment). On a required route an
/// unknown or missing key is a 401 with a challenge that never reaches the origin and gets no
/// quota; a known key is forwarded as `Weir-Consumer` (the key hidden, a client's own
/// `Weir-Consumer` stripped); a `consumer` limit counts all of a consumer's keys together.
#[tokio::test(flavor = "multi_thread")]
async fn consumers_are_identified_by_key_digest_and_limited_together() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let origin = Origin::start(move |req| {
        let h = req.headers();
        let v = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        s2.lock().unwrap().push((v("weir-consumer"), v("x-api-key")));
        async move { text(200, "ok") }
    })
    .await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nconsumers:\n  - id: alice\n    keys_sha256: [\"{}\"]\n    key_env: ALICE_SECOND_KEY\n  - id: bob\n    keys_sha256: [\"{}\"]\nroutes:\n  - name: api\n    upstream: {}\n    consumer: {{ from: header:x-api-key, required: true, hide_credentials: true }}\n    rate_limit: {{ key: consumer, rate: 1/1h, burst: 3 }}\n",
        sha256_hex("alice-key-1"),
        sha256_hex("bob-key"),
        origin.url()
    );
    let gw = Gateway::builder().env("ALICE_SECOND_KEY", "alice-key-2").start(&yaml);
    for headers in [vec![], vec![("x-api-key", "wrong")], vec![("weir-consumer", "alice")]] {
        let g = get_path(&gw, "/x", &headers).await;
        assert_eq!(g.status, 401, "{headers:?}: {}", g.text());
        assert_eq!(g.json()["error"], "unknown_consumer");
        assert_eq!(g.header("www-authenticate"), Some("ApiKey realm=\"weir\", header=\"x-api-key\""));
    }
    assert!(seen.lock().unwrap().is_empty(), "a 401 reached the origin");
    // Alice's two keys share her burst of 3; Bob has his own.
    let mut alice = Vec::new();
    for key in ["alice-key-1", "alice-key-2", "alice-key-1", "alice-key-2"] {
        alice.push(get_path(&gw, "/x", &[("x-api-key", key), ("weir-consumer", "bob")]).await.status);
    }
    assert_eq!(alice, [200, 200, 200, 429]);
    assert_eq!(get_path(&gw, "/x", &[("x-api-key", "bob-key")]).await.status, 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    assert!(seen[..3].iter().all(|(c, k)| c == "alice" && k == "-"), "{seen:?}");
    assert_eq!(seen[3], ("bob".to_string(), "-".to_string()));
}

#[test]
fn consumer_configuration_errors() {
    for (block, want) in [
        ("consumers:\n  - id: a\n    keys_sha256: [\"abc\"]\n", "64 hex digits"),
        ("consumers:\n  - id: a\n    key: plain-text\n", "unknown key `key`"),
        ("consumers:\n  - id: a\n    keys_sha256: []\n", "needs `keys_sha256` or `key_env`"),
        (
            "consumers:\n  - id: a\n    key_env: PATH\n    limits:\n      per-secnod: { rate: 1/s }\n",
            "no route has a rate_limit policy named `per-secnod`",
        ),
    ] {
        let (ok, text) = validate(&format!("listen:\n  - addr: 127.0.0.1:0\n{block}{ROUTE}"));
        assert!(!ok && text.contains(want), "{block}: {text}");
    }
    // An unset key variable is a warning under `weir validate` (CI has no production secrets).
    let (ok, text) = validate(&format!(
        "listen:\n  - addr: 127.0.0.1:0\nconsumers:\n  - id: a\n    key_env: WEIR_TEST_NO_SUCH_VAR\n{ROUTE}"
    ));
    assert!(ok && text.contains("not set") && text.contains(": warning: "), "{text}");
    let (ok, text) =
        validate(&format!("listen:\n  - addr: 127.0.0.1:0\n{ROUTE}    rate_limit: {{ key: consumer, rate: 1/s }}\n"));
    assert!(!ok && text.contains("needs the route's `consumer"), "{text}");
}

/// `count: misses`: only requests that reach the origin are charged, so hits keep flowing when
/// the miss quota is spent; a miss over it gets the 429 and the origin never sees it.
#[tokio::test(flavor = "multi_thread")]
async fn miss_limits_charge_only_what_reaches_the_origin() {
    let (origin, hits) = origin().await;
    let gw = Gateway::start(&config(
        &origin,
        None,
        &[("api", "/", "      rate: 1/1h\n      burst: 2\n      key: route\n      count: misses\n", true)],
    ));
    assert_eq!(get_path(&gw, "/a", &[]).await.status, 200);
    assert_eq!(get_path(&gw, "/b", &[]).await.status, 200);
    let over = get_path(&gw, "/c", &[]).await;
    assert_eq!(over.status, 429, "{}", over.text());
    assert_eq!(over.json()["error"], "rate_limited");
    for _ in 0..20 {
        let g = get_path(&gw, "/a", &[]).await;
        assert_eq!(g.status, 200);
        assert_eq!(g.header("cache-status"), Some("weir; hit; detail=l1"));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// `consumers[].limits` gives one consumer its own rate for a policy of that name; the others
/// keep the route's.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_can_have_its_own_rate() {
    let (origin, _) = origin().await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nconsumers:\n  - id: gold\n    keys_sha256: [\"{}\"]\n    limits:\n      default: {{ rate: 1/1h, burst: 5 }}\n  - id: basic\n    keys_sha256: [\"{}\"]\nroutes:\n  - name: api\n    upstream: {}\n    consumer: {{ from: header:x-api-key, required: true }}\n    rate_limit: {{ key: consumer, rate: 1/1h, burst: 2 }}\n",
        sha256_hex("gold-key"),
        sha256_hex("basic-key"),
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    for (key, admitted, q) in [("gold-key", 5, "q=5"), ("basic-key", 2, "q=2")] {
        let mut ok = 0;
        let mut policy = String::new();
        for _ in 0..10 {
            let g = get_path(&gw, "/x", &[("x-api-key", key)]).await;
            if g.status == 200 {
                ok += 1;
                policy = g.header("ratelimit-policy").unwrap_or("").to_string();
            }
        }
        assert_eq!(ok, admitted, "{key}");
        assert!(policy.contains(q), "{key}: {policy}");
    }
}
