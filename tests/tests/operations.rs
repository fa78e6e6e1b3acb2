//! Operations end to end: access-log lines (parsed as JSON), request ids and trace context,
//! liveness and readiness, drain on SIGTERM, and the metrics dashboards read.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use weir_e2e::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// An origin that answers `/c/*` cacheably, echoes a POST body's length, and sends 404 elsewhere.
async fn origin() -> Origin {
    Origin::start(|req| async move {
        let path = req.uri().path().to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if path.starts_with("/c/") {
            let mut r = text(200, "cached body");
            r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
            r
        } else if path == "/upload" {
            // Slow enough that requests are always in flight (the upgrade test relies on it).
            tokio::time::sleep(Duration::from_millis(50)).await;
            text(201, &format!("got {}", body.len()))
        } else {
            text(404, "nope")
        }
    })
    .await
}

fn yaml(origin: &Origin, log: &str, server: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\n{log}{server}routes:\n  - name: cached\n    match: {{ path: /c/ }}\n    upstream: {u}\n    cache: {{}}\n  - name: api\n    match: {{ path: /upload }}\n    upstream: {u}\n",
        u = origin.url()
    )
}

/// Lines of the access log, waiting (generously) until at least `n` are written.
fn lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let v: Vec<String> = text.lines().map(str::to_string).collect();
        if v.len() >= n || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_lines_and_trace_context() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let gw =
        Gateway::start(&yaml(&origin, &format!("log:\n  access: {{ format: json, to: {} }}\n", log.display()), ""));
    let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
    let c = client();
    let ask = |method: &str, path: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(gw.url(path))
            .header("host", "api.test")
            .header("traceparent", &parent)
            .header("tracestate", "vendor=abc")
            .header("x-request-id", "client-chosen")
            .body(full(body))
            .unwrap()
    };
    let miss = send(&c, ask("GET", "/c/one?secret=1", "")).await;
    let hit = send(&c, ask("GET", "/c/one?secret=1", "")).await;
    let post = send(&c, ask("POST", "/upload", "twelve bytes")).await;
    let none = send(&c, ask("GET", "/nowhere", "")).await;
    assert_eq!([&miss, &hit, &post, &none].map(|g| g.status.as_u16()), [200, 200, 201, 404]);

    // Request ids: the untrusted client's own is replaced, returned on every response
    // (errors too) and forwarded.
    let ids: Vec<&str> = [&miss, &hit, &post, &none].iter().map(|g| g.header("x-request-id").unwrap()).collect();
    assert!(ids.iter().all(|id| id.len() == 32 && *id != "client-chosen"), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2, "the hit never reached the origin");
    assert_eq!(seen[0].headers["x-request-id"], ids[0]);
    assert_eq!(seen[1].headers["x-request-id"], ids[2]);
    // Trace context: the same trace, a new span for the hop (not the client's), flags kept;
    // tracestate passed on unchanged.
    let up = seen[0].headers["traceparent"].to_str().unwrap().to_string();
    let parts: Vec<&str> = up.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE, "01"), "{up}");
    assert!(parts[2] != "00f067aa0ba902b7" && parts[2].len() == 16 && parts[2] != "0000000000000000", "{up}");
    assert_eq!(seen[0].headers["tracestate"], "vendor=abc");

    let got = lines(&log, 4);
    assert_eq!(got.len(), 4, "{got:?}");
    let recs: Vec<serde_json::Value> = got.iter().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    for (r, id) in recs.iter().zip(&ids) {
        for field in [
            "ts",
            "request_id",
            "route",
            "method",
            "authority",
            "path",
            "status",
            "cache",
            "upstream",
            "upstream_status",
            "duration_ms",
            "upstream_ms",
            "bytes_in",
            "bytes_out",
            "client_ip",
            "consumer",
            "tls",
            "traceparent",
        ] {
            assert!(r.get(field).is_some(), "no `{field}` in {r}");
        }
        assert_eq!(r["request_id"], *id);
        assert_eq!(r["client_ip"], "127.0.0.1");
        assert_eq!(r["authority"], "api.test");
        assert!(r["ts"].as_str().unwrap().ends_with('Z'));
        assert!(r["traceparent"].as_str().unwrap().starts_with(&format!("00-{TRACE}-")));
    }
    let (m, h, p, n) = (&recs[0], &recs[1], &recs[2], &recs[3]);
    assert_eq!(
        (m["route"].as_str(), m["cache"].as_str(), m["status"].as_u64()),
        (Some("cached"), Some("miss"), Some(200))
    );
    assert_eq!(m["path"], "/c/one", "the query is dropped unless log.query");
    assert_eq!(m["upstream"], origin.url());
    assert_eq!(m["upstream_status"], 200);
    assert_eq!(m["bytes_out"], 11);
    assert_eq!(m["traceparent"], up.as_str(), "the log names the span sent upstream");
    assert_eq!((h["cache"].as_str(), h["upstream"].is_null(), h["upstream_ms"].is_null()), (Some("hit"), true, true));
    assert_eq!((p["route"].as_str(), p["bytes_in"].as_u64(), p["status"].as_u64()), (Some("api"), Some(12), Some(201)));
    assert!(p["cache"].is_null());
    assert_eq!((n["route"].is_null(), n["error"].as_str(), n["status"].as_u64()), (true, Some("no_route"), Some(404)));
    assert!(m["duration_ms"].as_f64().unwrap() >= m["upstream_ms"].as_f64().unwrap());

    // A trusted proxy's request id is kept; the text format is one line per request.
    let log2 = dir.path().join("text.log");
    let gw2 = Gateway::start(&yaml(
        &origin,
        &format!("log:\n  query: true\n  access: {{ format: text, to: {} }}\n", log2.display()),
        "server:\n  trusted_proxies: [127.0.0.1/32]\n",
    ));
    let g =
        send(&c, Request::get(gw2.url("/c/two?q=1")).header("x-request-id", "edge-42").body(full("")).unwrap()).await;
    assert_eq!(g.header("x-request-id"), Some("edge-42"));
    let line = lines(&log2, 1).pop().unwrap_or_default();
    assert!(line.contains(" edge-42 127.0.0.1 \"GET ") && line.contains("/c/two?q=1\" 200 miss "), "{line}");
}

/// A writer that cannot keep up (a pipe nobody reads) fills the queue: lines are dropped and
/// counted, and no request waits for the log.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_access_log_never_stalls_requests() {
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stuck.log");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // The reader opens the pipe (so the gateway's open succeeds) and then never reads.
    let f = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::File::open(f).unwrap());
    let gw = Gateway::start(&yaml(&origin, &format!("log:\n  access: {{ to: {}, buffer: 16 }}\n", fifo.display()), ""));
    let _held = reader.join().unwrap();
    let c = client();
    // ~300 bytes a line: the 64 KiB pipe holds a few hundred, the queue 16 more.
    for i in 0..2000 {
        let g = tokio::time::timeout(
            Duration::from_secs(10),
            send(&c, Request::get(gw.url("/c/x")).body(full("")).unwrap()),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} waited for the log"));
        assert_eq!(g.status, 200);
    }
    let m = get(&gw.admin_url("/metrics")).await.text();
    let dropped: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("weir_access_log_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(dropped > 1000, "dropped {dropped}\n{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn livez_readyz_health_and_drain() {
    let origin = origin().await;
    let mut redis = RedisServer::start();
    let gw = Gateway::start(&yaml(
        &origin,
        &format!("redis:\n  url: {}\n  required: true\n  breaker: {{ failures: 1, open_for: 1s }}\n", redis.url()),
        "server:\n  drain_delay: 3s\n",
    ));
    let live = get(&gw.admin_url("/livez")).await;
    assert_eq!((live.status.as_u16(), live.json()["status"].as_str()), (200, Some("alive")));
    assert_eq!(get(&gw.admin_url("/readyz")).await.status, 200);
    // Load balancers probe with HEAD: the same status, no body.
    for probe in ["/livez", "/readyz", "/health"] {
        let h = send(&client(), Request::head(gw.admin_url(probe)).body(full("")).unwrap()).await;
        assert_eq!((h.status.as_u16(), h.body.len()), (200, 0), "HEAD {probe}");
    }

    // /health: version, uptime and the last minute's hit rate (one miss, then three hits).
    for _ in 0..4 {
        get(&gw.url("/c/h")).await;
    }
    let h = get(&gw.admin_url("/health")).await.json();
    assert_eq!(h["version"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    assert!(h["uptime_seconds"].is_u64());
    assert_eq!((h["hit_rate"]["lookups"].as_u64(), h["hit_rate"]["hits"].as_u64()), (Some(4), Some(3)), "{h}");
    assert_eq!(h["hit_rate"]["ratio"].as_f64(), Some(0.75));

    // redis.required: Redis gone is not ready (still alive, still serving); back is ready.
    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = get(&gw.admin_url("/readyz")).await;
    while ready.status == 200 && Instant::now() < deadline {
        get(&gw.url("/c/while-down")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = get(&gw.admin_url("/readyz")).await;
    }
    assert_eq!((ready.status.as_u16(), ready.json()["reason"].as_str()), (503, Some("redis unreachable")));
    assert_eq!(get(&gw.admin_url("/livez")).await.status, 200);
    assert_eq!(get(&gw.url("/c/h")).await.status, 200);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&gw.admin_url("/readyz")).await.status != 200 && Instant::now() < deadline {
        get(&gw.url("/c/while-up")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&gw.admin_url("/readyz")).await.status, 200);

    // SIGTERM with drain_delay: readiness fails at once, requests are still served, then exit.
    let mut gw = gw;
    gw.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(&gw.admin_url("/readyz")).await;
    assert_eq!((r.status.as_u16(), r.json()["reason"].as_str()), (503, Some("draining")));
    assert_eq!(get(&gw.url("/c/h")).await.status, 200, "still accepting during the drain delay");
    assert!(gw.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
}

/// Once a listener stops accepting (SIGTERM here; an upgrade's hand-over alike), an HTTP/1.1
/// answer on a kept-alive connection says `Connection: close`: a busy client closes that
/// connection itself after the answer, instead of finding it closed under a request it is
/// sending when the drain begins (the keep-alive race: the soak lost a write to it).
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_listener_answers_connection_close_on_kept_alive_connections() {
    let origin = origin().await;
    let mut gw = Gateway::start(&yaml(&origin, "", "server:\n  shutdown_timeout: 5s\n"));
    let stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<_>| {
        sender.send_request(Request::get("/c/drain").header("host", "weir.test").body(full("")).unwrap())
    };
    let first = ask(&mut sender).await.unwrap();
    assert!(first.headers().get("connection").is_none(), "kept alive while serving");
    gw.signal("TERM");
    // Asked every 20 ms on the same connection: answers go on as before until the listener
    // stops accepting, then one says `close`; the connection must not be closed before that.
    let mut answers = 1;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        sender
            .ready()
            .await
            .unwrap_or_else(|e| panic!("closed under us after {answers} answers, none said close: {e}"));
        let r = ask(&mut sender)
            .await
            .unwrap_or_else(|e| panic!("closed under a request after {answers} answers, none said close: {e}"));
        answers += 1;
        assert_eq!(r.status(), 200);
        if r.headers().get("connection").is_some_and(|v| v == "close") {
            break;
        }
    }
    assert!(gw.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_metrics_exist() {
    let origin = origin().await;
    let gw = Gateway::start(&yaml(&origin, "", ""));
    let c = client();
    for _ in 0..3 {
        send(&c, Request::get(gw.url("/c/m")).body(full("")).unwrap()).await;
    }
    // A body's bytes are counted when hyper drops it, just after the client has read it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut m = get(&gw.admin_url("/metrics")).await.text();
    while !m.contains("weir_response_bytes_total{route=\"cached\"} 33") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = get(&gw.admin_url("/metrics")).await.text();
    }
    let has = |s: &str| m.lines().any(|l| l.starts_with(s));
    assert!(has("weir_request_duration_seconds_bucket{le=\"0.001\",route=\"cached\"}"), "{m}");
    assert!(has("weir_request_duration_seconds_bucket{le=\"60.0\",route=\"cached\"}"), "{m}");
    assert!(has("weir_request_duration_seconds_count{route=\"cached\"} 3"), "{m}");
    assert!(has("weir_response_bytes_total{route=\"cached\"} 33"), "three 11-byte bodies\n{m}");
    assert!(has(&format!("weir_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{m}");
    // The keep-alive connections of `c` are open now (the pool may have opened a second).
    let listener = gw.addr().to_string();
    let open = m
        .lines()
        .find_map(|l| l.strip_prefix(&format!("weir_connections{{listener=\"{listener}\",state=\"open\"}} ")))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(open.is_some_and(|n| (1..=3).contains(&n)), "{m}");
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    let closed = format!("weir_connections{{listener=\"{listener}\",state=\"open\"}} 0");
    while !get(&gw.admin_url("/metrics")).await.text().contains(&closed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(get(&gw.admin_url("/metrics")).await.text().contains(&closed), "closed connections are not counted");
    assert!(has(&format!("weir_connections{{listener=\"{listener}\",state=\"handshake\"}} 0")), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_explain_and_debug_headers() {
    let origin = origin().await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\ndebug:\n  token_env: WEIR_TEST_DEBUG\nconsumers:\n  - id: alice\n    keys_sha256: [\"{}\"]\nbudgets:\n  api: {{ limit: \"10\", per: 1d }}\nroutes:\n  - name: cached\n    match: {{ path: /c/ }}\n    upstream: {u}\n    cache: {{ ttl: 60s, shared_across_consumers: true }}\n    consumer: {{ from: header:x-api-key, required: true }}\n    budget: {{ name: api, cost: \"1\" }}\n    invalidate: {{ tags: [catalog] }}\n",
        sha256_hex("alice-key"),
        u = origin.url()
    );
    let gw = Gateway::builder().env("WEIR_TEST_DEBUG", "debug-token-0123456789").start(&yaml);
    let post = |path: &str, body: serde_json::Value| {
        Request::post(gw.admin_url(path))
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap()
    };
    // Warm-up: through the cache path, past `consumer.required`, charged to `_system`.
    // The key names the authority: warm with the Host clients send.
    let host = gw.addr().to_string();
    let w = send(
        &client(),
        post(
            "/cache/warm",
            serde_json::json!({"paths": ["/c/a", "/c/b", "/c/a", "/nowhere"], "headers": {"host": host}}),
        ),
    )
    .await;
    assert_eq!(w.status, 200, "{}", w.text());
    let j = w.json();
    // A path named twice is warmed, and counted, once.
    assert_eq!(j["stored"], 2, "{j}");
    let reasons: Vec<&str> = j["results"].as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["stored", "stored", "no_route"], "{j}");
    assert_eq!(j["results"][0]["authority"].as_str(), Some(host.as_str()), "{j}");
    assert_eq!(origin.count(), 2);
    let spent = get(&gw.admin_url("/budgets/_system?budget=api")).await.json();
    assert_eq!(spent["spent"], "2", "{spent}");
    // A client now hits what was warmed.
    let hit =
        send(&client(), Request::get(gw.url("/c/a")).header("x-api-key", "alice-key").body(full("")).unwrap()).await;
    assert_eq!(hit.header("cache-status"), Some("weir; hit; detail=l1"));

    // Explain: the route, the canonical request, the key and who chose it, the rules, the tiers.
    let e = get(&gw.admin_url("/cache/explain?url=/c/./a%7E?b=2%26&h=host:API.test")).await;
    assert_eq!(e.status, 200, "{}", e.text());
    let e = e.json();
    assert_eq!((e["route"].as_str(), e["decided_by"].as_str()), (Some("cached"), Some("policy")), "{e}");
    assert_eq!(
        (e["canonical"]["path"].as_str(), e["canonical"]["authority"].as_str()),
        (Some("/c/a~"), Some("api.test"))
    );
    assert_eq!(e["rules"]["ttl_s"], 60);
    assert_eq!(e["tags"], serde_json::json!(["catalog"]));
    assert_eq!((e["l1"]["cached"].as_bool(), e["l2"]["configured"].as_bool()), (Some(false), Some(false)), "{e}");
    let e = get(&gw.admin_url(&format!("/cache/explain?url=/c/a&h=host:{host}"))).await.json();
    assert_eq!(e["l1"]["cached"], true, "{e}");
    assert!(e["l1"]["ttl_s"].as_i64().unwrap() > 50 && e["l1"]["status"] == 200, "{e}");
    assert!(e["key"].as_str().unwrap().contains("/c/a"));
    // A bare path is what `curl localhost:PORT/path` sends: warmed and explained as that host.
    let local = format!("localhost:{}", gw.addr().port());
    let w = send(&client(), post("/cache/warm", serde_json::json!({"paths": ["/c/bare"]}))).await.json();
    assert_eq!((w["stored"].as_u64(), w["results"][0]["authority"].as_str()), (Some(1), Some(local.as_str())), "{w}");
    let hit = send(
        &client(),
        Request::get(gw.url("/c/bare")).header("host", &local).header("x-api-key", "alice-key").body(full("")).unwrap(),
    )
    .await;
    assert_eq!(hit.header("cache-status"), Some("weir; hit; detail=l1"), "a warmed bare path is what curl gets");
    let e = get(&gw.admin_url("/cache/explain?url=/c/bare")).await.json();
    assert_eq!(
        (e["canonical"]["authority"].as_str(), e["l1"]["cached"].as_bool()),
        (Some(local.as_str()), Some(true)),
        "{e}"
    );
    let bad = get(&gw.admin_url("/cache/explain?url=/nowhere")).await;
    assert_eq!((bad.status.as_u16(), bad.json()["error"].as_str()), (404, Some("no_route")));

    // Debug headers: only with the debug token; the header never reaches the origin and the
    // answer's debug fields are never stored.
    let ask = |token: &str| {
        Request::get(gw.url("/c/dbg"))
            .header("x-api-key", "alice-key")
            .header("weir-debug", token)
            .body(full(""))
            .unwrap()
    };
    let d = send(&client(), ask("debug-token-0123456789")).await;
    assert_eq!(d.header("weir-debug-route"), Some("cached"));
    assert!(d.header("weir-debug-key").is_some_and(|k| k.contains("/c/dbg")), "{:?}", d.headers);
    assert!(d.header("weir-debug-ttl").and_then(|t| t.parse::<i64>().ok()).is_some_and(|t| (50..=60).contains(&t)));
    assert!(!origin.seen().iter().any(|s| s.headers.contains_key("weir-debug")), "stripped before forwarding");
    let plain =
        send(&client(), Request::get(gw.url("/c/dbg")).header("x-api-key", "alice-key").body(full("")).unwrap()).await;
    assert_eq!((plain.header("cache-status"), plain.header("weir-debug-key")), (Some("weir; hit; detail=l1"), None));
    let wrong = send(&client(), ask("not-the-token")).await;
    assert_eq!(wrong.header("weir-debug-key"), None);
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(m.contains("weir_debug_rejected_total 1"), "{m}");

    // `weir health` (the container HEALTHCHECK): 0 when ready, non-zero when nothing answers.
    let admin = gw.admin.unwrap().to_string();
    let ok = std::process::Command::new(weir_bin()).args(["health", "--addr", &admin]).output().unwrap();
    assert!(ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("ready"), "{ok:?}");
    let dead = format!("127.0.0.1:{}", free_port());
    let no =
        std::process::Command::new(weir_bin()).args(["health", "--addr", &dead, "--timeout", "2"]).output().unwrap();
    assert!(!no.status.success());
}

/// One request on a new connection (`Connection: close`) to the slow uncached route: whether a
/// complete answer came back.
async fn one_fresh_request(addr: std::net::SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET /upload HTTP/1.1\r\nHost: up.test\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    if text.starts_with("HTTP/1.1 201") && text.ends_with("got 0") {
        Ok(())
    } else {
        Err(format!("answer: {text:?}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_hands_over_the_listeners_with_zero_failed_requests() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let origin = origin().await;
    let mut old = Gateway::start(&yaml(&origin, "", "server:\n  drain_delay: 1s\n  shutdown_timeout: 10s\n"));
    let (addr, admin) = (old.addr(), old.admin.unwrap());
    // The hand-over socket is private: a 0700 directory of this user's, the socket 0600 (it
    // gives whoever talks on it the listening sockets).
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let uid = std::fs::metadata("/proc/self").unwrap().uid();
        let dir = std::env::temp_dir().join(format!("weir-{uid}"));
        let m = std::fs::symlink_metadata(&dir).unwrap();
        assert!(m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o777 == 0o700, "{:o}", m.mode());
        let socks: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect();
        assert!(!socks.is_empty());
        for p in socks {
            // Another test's gateway may have exited and taken its socket away meanwhile.
            if let Ok(m) = std::fs::metadata(&p) {
                assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", p.display());
            }
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match one_fresh_request(addr).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        0
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    let new = old.upgrade().expect("the new instance starts on the inherited sockets");
    assert_eq!((new.addr(), new.admin), (addr, Some(admin)), "the same sockets, not new ones");
    // The old one drains (readiness fails, then it stops accepting) and exits by itself.
    let exited = tokio::task::spawn_blocking(move || {
        let status = old.wait_exit(Duration::from_secs(30));
        let log = old.log();
        // Kept: its directory holds the configuration the next upgrade reads.
        (status, log, old)
    })
    .await
    .unwrap();
    assert!(exited.0.is_some_and(|s| s.success()), "the old instance exits cleanly:\n{}", exited.1);
    assert!(exited.1.contains("handed over to a new instance"), "{}", exited.1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let total = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(total > before + 50, "requests kept flowing through the upgrade: {before} then {total}");
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status, 200);
    // And the new instance can hand over in turn.
    let newer = new.upgrade().expect("a second upgrade");
    assert_eq!(newer.addr(), addr);
    assert_eq!(one_fresh_request(addr).await, Ok(()));
}

/// A small OTLP/HTTP receiver: every span POSTed to `/v1/traces`, with its resource's
/// `service.name`.
async fn otlp_receiver() -> (Origin, std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>) {
    let spans: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>> = Default::default();
    let s = spans.clone();
    let o = Origin::start(move |req| {
        let s = s.clone();
        async move {
            assert_eq!(req.uri().path(), "/v1/traces");
            assert_eq!(req.headers()["content-type"], "application/json");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
            for rs in doc["resourceSpans"].as_array().unwrap() {
                let service = rs["resource"]["attributes"][0]["value"]["stringValue"].as_str().unwrap().to_string();
                for ss in rs["scopeSpans"].as_array().unwrap() {
                    for span in ss["spans"].as_array().unwrap() {
                        s.lock().unwrap().push((service.clone(), span.clone()));
                    }
                }
            }
            text(200, "{}")
        }
    })
    .await;
    (o, spans)
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_over_otlp() {
    let origin = origin().await;
    let (collector, spans) = otlp_receiver().await;
    let gw = Gateway::start(&yaml(
        &origin,
        &format!("log:\n  access: {{ format: off }}\ntracing:\n  otlp: {}\n  service_name: edge\n", collector.url()),
        "",
    ));
    let c = client();
    let sampled = format!("00-{TRACE}-00f067aa0ba902b7-01");
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let with = |tp: Option<&str>| {
        let mut b = Request::get(gw.url("/c/span")).header("host", "api.test");
        if let Some(tp) = tp {
            b = b.header("traceparent", tp);
        }
        b.body(full("")).unwrap()
    };
    send(&c, with(Some(&sampled))).await;
    send(&c, with(Some(unsampled))).await;
    let fresh = send(&c, Request::post(gw.url("/upload")).body(full("abc")).unwrap()).await;
    assert_eq!(fresh.status, 201);
    let deadline = Instant::now() + Duration::from_secs(15);
    while spans.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = spans.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "the unsampled trace is not exported: {got:?}");
    let seen = origin.seen();
    // The continued trace: the client's trace and parent, Weir's span = the upstream's parent.
    let (service, s) = &got[0];
    assert_eq!(service, "edge");
    assert_eq!(s["traceId"], TRACE);
    assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
    let upstream_tp = seen[0].headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(upstream_tp, format!("00-{TRACE}-{}-01", s["spanId"].as_str().unwrap()));
    assert_eq!((s["kind"].as_u64(), s["name"].as_str()), (Some(2), Some("GET cached")));
    let attr = |s: &serde_json::Value, k: &str| {
        s["attributes"].as_array().unwrap().iter().find(|a| a["key"] == k).map(|a| a["value"].clone())
    };
    assert_eq!(attr(s, "http.response.status_code"), Some(serde_json::json!({"intValue": "200"})));
    assert_eq!(attr(s, "weir.cache"), Some(serde_json::json!({"stringValue": "miss"})));
    let start: u128 = s["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = s["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(end >= start);
    // A request without trace context starts a sampled trace, and says so upstream.
    let (_, f) = &got[1];
    assert!(f.get("parentSpanId").is_none(), "{f}");
    let up =
        seen.iter().find(|s| s.uri.path() == "/upload").unwrap().headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(up, format!("00-{}-{}-01", f["traceId"].as_str().unwrap(), f["spanId"].as_str().unwrap()));
    assert_eq!(attr(f, "http.response.status_code"), Some(serde_json::json!({"intValue": "201"})));
    // A collector that is not there loses spans (counted), never requests.
    drop(collector);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = Gateway::start(&yaml(&origin, &format!("tracing:\n  otlp: {dead}\n"), ""));
    for _ in 0..3 {
        let g = send(&c, Request::get(gw.url("/c/span")).header("traceparent", &sampled).body(full("")).unwrap()).await;
        assert_eq!(g.status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut dropped = 0;
    while dropped < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let m = get(&gw.admin_url("/metrics")).await.text();
        dropped = m
            .lines()
            .find_map(|l| l.strip_prefix("weir_trace_spans_dropped_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
    }
    assert!(dropped >= 3, "dropped {dropped}");
}
