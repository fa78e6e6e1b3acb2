//! Spend budgets end to end: the real binary, a counting origin, and a real Redis shared by two
//! instances. Amounts are compared as exact decimal strings.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use weir_e2e::*;

const KEY: &str = "key-of-acme";

/// Counts calls; `/fail` answers 500, `/slow` takes 30 s, everything else 200.
async fn origin() -> (Origin, Arc<AtomicUsize>) {
    Origin::counting(|req| async move {
        match req.uri().path() {
            "/fail" => text(500, "broken"),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                text(200, "late")
            }
            "/wait" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                text(200, "waited")
            }
            _ => text(200, "ok"),
        }
    })
    .await
}

fn config(origin: &Origin, redis: Option<u16>, budget: &str, route_budget: &str) -> String {
    config_for(&origin.url(), redis, budget, route_budget)
}

/// `config` with any upstream URL.
fn config_for(upstream: &str, redis: Option<u16>, budget: &str, route_budget: &str) -> String {
    let redis = redis.map_or(String::new(), |p| format!("redis:\n  url: redis://127.0.0.1:{p}/0\n"));
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\n{redis}consumers:\n  - id: acme\n    keys_sha256: [\"{}\"]\nbudgets:\n  api: {{ {budget} }}\nroutes:\n  - name: paid\n    upstream: {upstream}\n    consumer: {{ from: header:x-api-key, required: true }}\n    budget: {{ name: api, {route_budget} }}\n",
        sha256_hex(KEY),
    )
}

async fn call(
    c: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    gw: &Gateway,
    path: &str,
) -> Got {
    send(c, Request::get(gw.url(path)).header("x-api-key", KEY).body(full("")).unwrap()).await
}

async fn status(gw: &Gateway, query: &str) -> serde_json::Value {
    get(&gw.admin_url(&format!("/budgets/acme?budget=api{query}"))).await.json()
}

/// 10,000 calls costing 0.001 through two instances at 64 connections each against a limit of
/// 7.500: exactly 7,500 are admitted and reach the origin, the spend is exactly 7.5, and the
/// hourly series adds up to it.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_admit_exactly_the_budget() {
    let (origin, hits) = origin().await;
    let redis = RedisServer::start();
    // About exactness, not Redis' latency: a loaded machine must not trip the 50 ms default
    // `op_timeout` (a call that times out fails closed with 503).
    let yaml = config(&origin, Some(redis.port), "limit: \"7.500\", per: 1d", "cost: \"0.001\"")
        .replace("/0\n", "/0\n  op_timeout: 1s\n");
    let gws = [Arc::new(Gateway::start(&yaml)), Arc::new(Gateway::start(&yaml))];
    let admitted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..128 {
        let gw = gws[t % 2].clone();
        let (admitted, refused) = (admitted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0..(10_000 / 128 + usize::from(t < 10_000 % 128)) {
                let g = call(&c, &gw, &format!("/c/{t}/{i}")).await;
                match g.status.as_u16() {
                    200 => admitted.fetch_add(1, Ordering::SeqCst),
                    429 => {
                        assert_eq!(g.json()["error"], "budget_exhausted");
                        assert!(g.header("retry-after").is_some());
                        refused.fetch_add(1, Ordering::SeqCst)
                    }
                    other => panic!("unexpected {other}: {}", g.text()),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), 7_500);
    assert_eq!(refused.load(Ordering::SeqCst), 2_500);
    assert_eq!(hits.load(Ordering::SeqCst), 7_500, "a refused call never reaches the origin");
    // 10,000 reservations and 7,500 settlements, each decided on its own (the figures here are
    // exact), in fewer script calls: the ones that queued while a call was out shared the next.
    let calls = redis.script_calls();
    println!("17,500 reservations and settlements in {calls} script calls");
    assert!(calls > 0 && calls < 17_500, "17,500 reservations and settlements took {calls} script calls");
    // Nothing a budget writes stays for ever: the window, its leases, the history buckets and
    // the settled markers all expire (the window with its day).
    let keys = redis.keys();
    assert!(!keys.is_empty());
    for k in &keys {
        let ttl: i64 = redis.command(&format!("TTL {k}")).and_then(|t| t.trim_start_matches(':').parse().ok()).unwrap();
        assert!(ttl > 0, "{k} has no expiry (TTL {ttl})");
    }
    for gw in &gws {
        let s = status(gw, "").await;
        assert_eq!(
            (s["spent"].as_str(), s["reserved"].as_str(), s["remaining"].as_str()),
            (Some("7.5"), Some("0"), Some("0")),
            "{s}"
        );
        assert_eq!(s["requests"], 7_500);
        assert_eq!(s["store"], "redis");
        let sum: rust_decimal::Decimal = s["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["spent"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
            .sum();
        assert_eq!(sum.normalize().to_string(), "7.5", "the hourly series adds up to the total: {s}");
        let m = get(&gw.admin_url("/metrics")).await.text();
        assert!(m.contains("weir_budget_rejected_total{route=\"paid\"}"), "{m}");
        let spent: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("weir_budget_spent{budget=\"api\"} "))
            .expect("weir_budget_spent gauge")
            .parse()
            .unwrap();
        assert!(spent > 0.0 && spent < 7.6, "{spent}");
    }
}

/// A call that outlives its window's hash (the hash expired at the window's end; here it is
/// deleted under the call) recreates it when it settles, and the recreated hash expires like
/// every other budget key instead of staying for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_a_settlement_recreates_still_expires() {
    let (origin, _) = origin().await;
    let redis = RedisServer::start();
    let gw = Gateway::start(&config(&origin, Some(redis.port), "limit: \"5\", per: 1d", "cost: \"0.001\""));
    let c = client();
    let delete_window = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let w: Vec<String> = redis.keys().into_iter().filter(|k| k.contains(":w:")).collect();
        assert_eq!(w.len(), 1, "the reservation made one window: {w:?}");
        assert_eq!(redis.command(&format!("DEL {}", w[0])).as_deref(), Some(":1"));
        w[0].clone()
    };
    let (got, key) = tokio::join!(call(&c, &gw, "/wait"), delete_window);
    assert_eq!(got.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.command(&format!("EXISTS {key}")).as_deref() != Some(":1") {
        assert!(Instant::now() < deadline, "the settlement never reached {key}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ttl: i64 = redis.command(&format!("TTL {key}")).and_then(|t| t.trim_start_matches(':').parse().ok()).unwrap();
    assert!(ttl > 86_400, "{key}: TTL {ttl} (the window's end plus two days)");
    let s = status(&gw, "").await;
    assert_eq!((s["spent"].as_str(), s["requests"].as_i64()), (Some("0.001"), Some(1)), "{s}");
}

/// Embedded mode (no Redis): the same arithmetic in memory. A status that is not charged
/// (`charge_status: 2xx`) costs nothing; `Weir-Budget-Remaining` tells what is left; a reset
/// gives the window back.
#[tokio::test(flavor = "multi_thread")]
async fn only_charged_statuses_cost_money_and_the_balance_is_exact() {
    let (origin, hits) = origin().await;
    let gw = Gateway::start(&config(&origin, None, "limit: \"0.003\", per: month", "cost: \"0.001\", headers: true"));
    let c = client();
    for _ in 0..10 {
        let g = call(&c, &gw, "/fail").await;
        assert_eq!(g.status, 500, "{}", g.text());
        assert_eq!(g.header("weir-budget-remaining"), Some("0.003"), "a 500 is not charged");
    }
    let mut left = Vec::new();
    for _ in 0..3 {
        let g = call(&c, &gw, "/ok").await;
        assert_eq!(g.status, 200);
        left.push(g.header("weir-budget-remaining").unwrap().to_string());
    }
    assert_eq!(left, ["0.002", "0.001", "0"]);
    let g = call(&c, &gw, "/ok").await;
    assert_eq!(g.status, 429);
    assert_eq!(hits.load(Ordering::SeqCst), 13);
    let s = status(&gw, "&by=day").await;
    assert_eq!(
        (s["spent"].as_str(), s["requests"].as_u64(), s["store"].as_str()),
        (Some("0.003"), Some(3), Some("memory")),
        "{s}"
    );
    let h = get(&gw.admin_url("/health")).await.json();
    assert_eq!(h["budgets"], "memory");
    // Unknown or missing key: 401 before any budget is looked at.
    let g = send(&c, Request::get(gw.url("/ok")).body(full("")).unwrap()).await;
    assert_eq!(g.status, 401);
    // A reset gives the window back; the admin API needs its token like every path.
    let r = send(
        &c,
        Request::delete(gw.admin_url("/budgets/acme?budget=api"))
            .header("content-type", "application/json")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(call(&c, &gw, "/ok").await.status, 200);
}

/// Redis killed: `fail: closed` answers 503 `budget_unavailable` at once (the breaker, not a
/// timeout per call); `fail: open` lets calls through and counts them.
#[tokio::test(flavor = "multi_thread")]
async fn with_redis_gone_closed_refuses_and_open_admits_unmetered() {
    let (origin, _) = origin().await;
    let mut redis = RedisServer::start();
    let closed = Gateway::start(&config(&origin, Some(redis.port), "limit: \"1\", per: 1d", "cost: \"0.001\""));
    let open =
        Gateway::start(&config(&origin, Some(redis.port), "limit: \"1\", per: 1d, fail: open", "cost: \"0.001\""));
    let c = client();
    assert_eq!(call(&c, &closed, "/ok").await.status, 200);
    redis.kill();
    let t = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(call(&c, &closed, "/ok").await.status.as_u16());
    }
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "20 refusals took {:?}", t.elapsed());
    let g = call(&c, &closed, "/ok").await;
    assert_eq!((g.json()["error"].as_str(), g.header("retry-after").is_some()), (Some("budget_unavailable"), true));
    for _ in 0..5 {
        assert_eq!(call(&c, &open, "/ok").await.status, 200);
    }
    let m = get(&open.admin_url("/metrics")).await.text();
    assert!(m.contains("weir_budget_unmetered_total{route=\"paid\"} 5"), "{m}");
}

/// An instance killed with calls in flight leaves leases that expire (`lease_ttl`): the money
/// comes back without anyone settling it.
#[tokio::test(flavor = "multi_thread")]
async fn leases_of_a_killed_instance_expire() {
    let (origin, _) = origin().await;
    let redis = RedisServer::start();
    let yaml = config(&origin, Some(redis.port), "limit: \"0.002\", per: 1d, lease_ttl: 2s", "cost: \"0.001\"");
    let mut a = Gateway::start(&yaml);
    let b = Gateway::start(&yaml);
    let url = a.url("/slow");
    for _ in 0..2 {
        let url = url.clone();
        tokio::spawn(async move {
            let _ = client().request(Request::get(url).header("x-api-key", KEY).body(full("")).unwrap()).await;
        });
    }
    // Both reservations are held (the whole budget): B is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&b, "").await["reserved"] != "0.002" {
        assert!(Instant::now() < deadline, "A's reservations never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = client();
    assert_eq!(call(&c, &b, "/ok").await.status, 429);
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let g = call(&c, &b, "/ok").await;
        if g.status == 200 {
            break;
        }
        assert_eq!(g.status, 429, "{}", g.text());
        assert!(Instant::now() < deadline, "the dead instance's leases never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status(&b, "").await;
    assert_eq!(s["spent"], "0.001", "only B's call was charged: {s}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_budgets_are_refused_with_their_position() {
    let (origin, _) = origin().await;
    let cases = [
        ("limit: \"-1\", per: 1d", "cost: \"0.001\"", "must not be negative"),
        ("limit: \"1\", per: 7m", "cost: \"0.001\"", "invalid budget window `7m`"),
        ("limit: \"1\", per: 1d", "cost: \"abc\"", "invalid money amount `abc`"),
        ("limit: \"1\", per: 1d", "cost: \"0.0000001\"", "at most 6 decimal places"),
        ("limit: \"9007199254.740992\", per: 1d", "cost: \"0.001\"", "largest amount kept exactly"),
        ("limit: 5.00, per: 1d", "cost: \"0.001\"", "quoted decimal string"),
        ("limit: \"1\", per: 1d", "cost: plugin", "needs the route's `plugin:`"),
        ("limit: \"1\", per: 1d", "cost: \"0.01\", max_cost: \"0.001\"", "max_cost is below the reservation"),
        ("limit: \"1\", per: 1d", "cost: plugin", "needs `reserve`"),
        ("limit: \"1\", per: 1d", "cost: \"0.01\", reserve: \"0.001\"", "reserve is below the fixed cost"),
        ("limit: \"1\", per: 1d", "cost: \"0.01\", charge_status: 2yy", "invalid charge_status `2yy`"),
    ];
    for (budget, route_budget, want) in cases {
        let (ok, out) = validate(&config(&origin, None, budget, route_budget));
        assert!(!ok && out.contains(want) && out.contains("weir.yaml:"), "{budget} / {route_budget}: {out}");
    }
    // Unknown name; a route whose consumer is not required.
    let yaml = config(&origin, None, "limit: \"1\", per: 1d", "cost: \"0.001\"").replace("name: api,", "name: apu,");
    let (ok, out) = validate(&yaml);
    assert!(!ok && out.contains("unknown budget `apu` (budgets: api)"), "{out}");
    let yaml =
        config(&origin, None, "limit: \"1\", per: 1d", "cost: \"0.001\"").replace("required: true", "required: false");
    let (ok, out) = validate(&yaml);
    assert!(!ok && out.contains("a budget needs the route's `consumer"), "{out}");
}

/// An LLM-like origin: `/chat?i=N&o=M` answers `{"usage": {"prompt_tokens": N,
/// "completion_tokens": M}}`; `/plain` answers without usage.
async fn llm_origin() -> Origin {
    Origin::start(|req| async move {
        let q = req.uri().query().unwrap_or("").to_string();
        let get = |k: &str| {
            q.split('&').find_map(|p| p.strip_prefix(&format!("{k}="))).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        if req.uri().path() == "/plain" {
            return text(200, "no usage here");
        }
        let body = serde_json::json!({"usage": {"prompt_tokens": get("i"), "completion_tokens": get("o")}});
        text(200, &body.to_string())
    })
    .await
}

fn plugin_config(
    origin: &Origin,
    redis: Option<u16>,
    plugin: &str,
    plugin_cfg: &str,
    budget: &str,
    route_budget: &str,
) -> String {
    let path = repo_root().join("plugins").join(format!("{plugin}.wasm"));
    config(origin, redis, budget, route_budget).replace(
        "    budget:",
        &format!("    plugin: {{ path: {}, timeout: 100ms, config: {plugin_cfg} }}\n    budget:", path.display()),
    )
}

/// `cost: plugin` with the `llm-cost` plugin: each call settles at its exact usage price,
/// rounded up to the micro-unit (0.00000015 per token); a cost above `max_cost` is capped and
/// counted; a response without usage settles at `max_cost`, never at zero or the reservation.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_costs_settle_exactly_from_the_response() {
    let origin = llm_origin().await;
    let redis = RedisServer::start();
    let yaml = plugin_config(
        &origin,
        Some(redis.port),
        "llm-cost",
        "{ input_per_1k: \"0.00015\", output_per_1k: \"0.01\" }",
        "limit: \"1\", per: 1d",
        "cost: plugin, reserve: \"0.05\", max_cost: \"0.10\"",
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    // 3 input tokens: 0.00000045, charged as one unit; 1000 in + 2 out: 0.00017; 100 out: 0.001.
    for q in ["i=3", "i=1000&o=2", "o=100"] {
        let g = call(&c, &gw, &format!("/chat?{q}")).await;
        assert_eq!(g.status, 200, "{}", g.text());
    }
    let spent = |s: &serde_json::Value| s["spent"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = status(&gw, "").await;
    while spent(&s) != "0.001171" {
        assert!(Instant::now() < deadline, "settled {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        s = status(&gw, "").await;
    }
    assert_eq!(s["reserved"], "0");
    // 20,000 output tokens cost 0.20: capped at max_cost 0.10. No usage: max_cost, 0.10.
    assert_eq!(call(&c, &gw, "/chat?o=20000").await.status, 200);
    assert_eq!(call(&c, &gw, "/plain").await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while spent(&status(&gw, "").await) != "0.201171" {
        assert!(Instant::now() < deadline, "settled {}", status(&gw, "").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(m.contains("weir_budget_clamped_total{budget=\"api\"} 1"), "{m}");
    assert!(m.contains("weir_budget_unsettled_total{reason=\"no_usage\"} 1"), "{m}");
}

/// Refunds: `reserve: "0.10"` for calls that cost 0.01 against a limit of 1.00 — the
/// difference comes back at every settlement, and the last calls hold only what is left, so
/// exactly 100 sequential calls are admitted and the spend is exactly 1.
#[tokio::test(flavor = "multi_thread")]
async fn reservations_are_refunded_to_the_actual_cost() {
    let origin = llm_origin().await;
    let yaml = plugin_config(
        &origin,
        None,
        "llm-cost",
        "{ input_per_1k: \"0\", output_per_1k: \"0.01\" }",
        "limit: \"1.00\", per: 1d",
        "cost: plugin, reserve: \"0.10\", max_cost: \"0.50\"",
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    for i in 0..100 {
        let g = call(&c, &gw, "/chat?o=1000").await;
        assert_eq!(g.status, 200, "call {i}: {}", g.text());
        // Settled as the body ends; wait for it so the next reservation sees the refund.
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(&gw, "").await["reserved"] != "0" {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(call(&c, &gw, "/chat?o=1000").await.status, 429);
    let s = status(&gw, "").await;
    assert_eq!((s["spent"].as_str(), s["requests"].as_u64()), (Some("1"), Some(100)), "{s}");
}

/// A cost hook that traps settles at `max_cost` (never at zero, never at the smaller
/// reservation) and is counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_cost_hook_settles_at_max_cost() {
    let origin = llm_origin().await;
    let yaml = plugin_config(
        &origin,
        None,
        "fixtures",
        "{ mode: trap }",
        "limit: \"1\", per: 1d",
        "cost: plugin, reserve: \"0.05\", max_cost: \"0.20\"",
    );
    let gw = Gateway::start(&yaml);
    let c = client();
    for _ in 0..3 {
        assert_eq!(call(&c, &gw, "/chat?o=1").await.status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&gw, "").await["spent"] != "0.6" {
        assert!(Instant::now() < deadline, "{}", status(&gw, "").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(m.contains("weir_budget_unsettled_total{reason=\"trap\"} 3"), "{m}");
}

/// `/stream`: usage JSON in four frames, 700 ms apart (about 2 s in all).
async fn streaming_llm_origin() -> Origin {
    Origin::start(|_req| async move {
        let parts = ["{\"usage\": ", "{\"prompt_tokens\": 0, ", "\"completion_tokens\": 1000", "}}"];
        trickle(parts.iter().map(|p| p.to_string()).collect(), Duration::from_millis(700))
    })
    .await
}

/// A stream longer than `lease_ttl` keeps its reservation (renewed while it streams) and is
/// charged exactly once, at its price.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_longer_than_its_lease_is_held_and_charged_once() {
    let origin = streaming_llm_origin().await;
    let redis = RedisServer::start();
    let yaml = plugin_config(
        &origin,
        Some(redis.port),
        "llm-cost",
        "{ input_per_1k: \"0\", output_per_1k: \"0.01\" }",
        "limit: \"1\", per: 1d, lease_ttl: 1s",
        "cost: plugin, reserve: \"0.10\", max_cost: \"0.50\"",
    );
    let gw = Arc::new(Gateway::start(&yaml));
    let g2 = gw.clone();
    let streaming = tokio::spawn(async move { call(&client(), &g2, "/stream").await });
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let s = status(&gw, "").await;
    assert_eq!(s["reserved"], "0.1", "the lease outlived its 1 s TTL while streaming: {s}");
    let g = streaming.await.unwrap();
    assert_eq!(g.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&gw, "").await["spent"] != "0.01" {
        assert!(Instant::now() < deadline, "{}", status(&gw, "").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = status(&gw, "").await;
    assert_eq!(
        (s["spent"].as_str(), s["reserved"].as_str(), s["requests"].as_u64()),
        (Some("0.01"), Some("0"), Some(1)),
        "{s}"
    );
}

/// A client that goes away mid-stream does not stop the settlement: the rest of the upstream
/// body is read and the call settles at its full price, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_stream_is_still_charged_the_full_call() {
    let origin = streaming_llm_origin().await;
    let yaml = plugin_config(
        &origin,
        None,
        "llm-cost",
        "{ input_per_1k: \"0\", output_per_1k: \"0.01\" }",
        "limit: \"1\", per: 1d",
        "cost: plugin, reserve: \"0.10\", max_cost: \"0.50\"",
    );
    let gw = Gateway::start(&yaml);
    let resp = client()
        .request(Request::get(gw.url("/stream")).header("x-api-key", KEY).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp); // the head only: the client hangs up
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&gw, "").await["spent"] != "0.01" {
        assert!(Instant::now() < deadline, "{}", status(&gw, "").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(&gw, "").await;
    assert_eq!((s["reserved"].as_str(), s["requests"].as_u64()), (Some("0"), Some(1)), "{s}");
}

/// A consumer's own limit (`consumers[].budgets`) replaces the budget's for that consumer.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_can_have_its_own_limit() {
    let (origin, _) = origin().await;
    let yaml = config(&origin, None, "limit: \"0.003\", per: 1d", "cost: \"0.001\"");
    let own = yaml.replacen("\nbudgets:", "\n    budgets: { api: \"0.002\" }\nbudgets:", 1);
    let gw = Gateway::start(&own);
    let c = client();
    assert_eq!(call(&c, &gw, "/a").await.status, 200);
    assert_eq!(call(&c, &gw, "/b").await.status, 200);
    assert_eq!(call(&c, &gw, "/c").await.status, 429);
    let s = status(&gw, "").await;
    assert_eq!((s["limit"].as_str(), s["remaining"].as_str()), (Some("0.002"), Some("0")), "{s}");
    let bad = yaml.replacen("\nbudgets:", "\n    budgets: { apx: \"0.002\" }\nbudgets:", 1);
    let (ok, out) = validate(&bad);
    assert!(!ok && out.contains("no budget named `apx`"), "{out}");
}

/// On a cached route a miss is charged once, to the consumer whose request went upstream:
/// requests that waited on it (coalesced) and later hits pay nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_coalesced_miss_is_charged_once_and_hits_are_free() {
    let origin = Origin::start(|_req| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut r = text(200, "slow and cacheable");
        r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await;
    let yaml = config(&origin, None, "limit: \"1\", per: 1d", "cost: \"0.01\"")
        .replace("    budget:", "    cache: { ttl: 60s, share_private: true }\n    budget:");
    let gw = Arc::new(Gateway::start(&yaml));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move { call(&client(), &gw, "/same").await.status.as_u16() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    for _ in 0..5 {
        assert_eq!(call(&client(), &gw, "/same").await.status, 200);
    }
    let s = status(&gw, "").await;
    assert_eq!((s["spent"].as_str(), s["requests"].as_u64()), (Some("0.01"), Some(1)), "{s}");
}

/// `charge_hits: true`: a hit costs the fixed cost too, and is refused once the budget is spent.
#[tokio::test(flavor = "multi_thread")]
async fn charged_hits_cost_money_too() {
    let (origin, hits) = Origin::counting(|_req| async move {
        let mut r = text(200, "cacheable");
        r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
        r
    })
    .await;
    let yaml = config(&origin, None, "limit: \"0.03\", per: 1d", "cost: \"0.01\", charge_hits: true, headers: true")
        .replace("    budget:", "    cache: { ttl: 60s }\n    budget:");
    let gw = Gateway::start(&yaml);
    let c = client();
    let mut left = Vec::new();
    for _ in 0..3 {
        let g = call(&c, &gw, "/same").await;
        assert_eq!(g.status, 200);
        left.push((
            g.header("cache-status").unwrap().to_string(),
            g.header("weir-budget-remaining").unwrap().to_string(),
        ));
    }
    assert_eq!(left[0], ("weir; fwd=miss; stored".to_string(), "0.02".to_string()));
    assert_eq!(left[1], ("weir; hit; detail=l1".to_string(), "0.01".to_string()));
    assert_eq!(left[2].1, "0");
    let g = call(&c, &gw, "/same").await;
    assert_eq!((g.status.as_u16(), g.json()["error"].as_str()), (429, Some("budget_exhausted")));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // With a plugin cost a hit has nothing to price: refused at validation.
    let bad = config(
        &origin,
        None,
        "limit: \"1\", per: 1d",
        "cost: plugin, reserve: \"0.1\", max_cost: \"0.2\", charge_hits: true",
    );
    let (ok, out) = validate(&bad);
    assert!(!ok && out.contains("charge_hits needs a fixed cost"), "{out}");
}

/// A background refresh (stale-while-revalidate) is Weir's own call: charged to `_system`,
/// never to the client whose request found the stale entry.
#[tokio::test(flavor = "multi_thread")]
async fn background_refreshes_are_charged_to_system() {
    let (origin, hits) = Origin::counting(|_req| async move {
        let mut r = text(200, "soon stale");
        r.headers_mut().insert("cache-control", "max-age=1, stale-while-revalidate=60".parse().unwrap());
        r
    })
    .await;
    let yaml = config(&origin, None, "limit: \"1\", per: 1d", "cost: \"0.01\"")
        .replace("    budget:", "    cache: { ttl: 60s }\n    budget:");
    let gw = Gateway::start(&yaml);
    let c = client();
    assert_eq!(call(&c, &gw, "/page").await.header("cache-status"), Some("weir; fwd=miss; stored"));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let g = call(&c, &gw, "/page").await;
    assert!(g.header("cache-status").unwrap().starts_with("weir; hit; ttl=-"), "{:?}", g.header("cache-status"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no background refresh");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let system = gw.admin_url("/budgets/_system?budget=api");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&system).await.json()["spent"] != "0.01" {
        assert!(Instant::now() < deadline, "{}", get(&system).await.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&gw, "").await["spent"], "0.01", "the client paid for its own miss only");
}

/// Polls the budget's status until `done` holds (10 s at most); returns the last status.
async fn status_until(gw: &Gateway, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let g = get(&gw.admin_url("/budgets/acme?budget=api")).await;
        if g.status == 200 {
            let s = g.json();
            if done(&s) || Instant::now() > deadline {
                return s;
            }
        } else if Instant::now() > deadline {
            panic!("budget status: {} {}", g.status, g.text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn amount(s: &serde_json::Value, field: &str) -> rust_decimal::Decimal {
    s[field].as_str().unwrap_or("?").parse().unwrap_or_else(|_| panic!("{field} in {s}"))
}

/// A client that leaves while Weir is still reaching the origin (here a TLS handshake the
/// upstream never answers) asked the origin nothing: its reservation is released, not charged,
/// once the connection attempt gives up (`timeouts.connect` bounds the handshakes too).
/// (Found by the soak: such calls were charged the fixed cost.)
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_before_its_request_is_sent_is_not_charged() {
    // Accepts TCP connections and never says a word: the TLS handshake waits forever.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let redis = RedisServer::start();
    let yaml =
        config_for(&format!("https://127.0.0.1:{port}"), Some(redis.port), "limit: \"1\", per: 1d", "cost: \"0.001\"")
            .replace("/0\n", "/0\n  op_timeout: 1s\n");
    let gw = Gateway::start(&yaml);
    for i in 0..3 {
        let c = client();
        let left = tokio::time::timeout(Duration::from_millis(400), call(&c, &gw, &format!("/x/{i}"))).await;
        assert!(left.is_err(), "the upstream never answers: the client gives up");
    }
    assert!(!held.lock().unwrap().is_empty(), "Weir was connecting when the clients left");
    let s = status_until(&gw, |s| amount(s, "reserved").is_zero()).await;
    assert!(amount(&s, "reserved").is_zero(), "the reservations were released: {s}");
    assert!(amount(&s, "spent").is_zero(), "nothing reached the origin, nothing is charged: {s}");
}

/// A settlement Redis does not take (paused past `op_timeout` while the origin answered) is
/// retried until it lands: the served call is paid, once. (Found by the soak: it was dropped,
/// and the call went unpaid when the lease expired.)
#[tokio::test(flavor = "multi_thread")]
async fn a_settlement_redis_missed_is_retried_until_it_lands() {
    let (origin, hits) = Origin::counting(|_req| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        text(200, "ok")
    })
    .await;
    let redis = RedisServer::start();
    let yaml = config(&origin, Some(redis.port), "limit: \"1\", per: 1d", "cost: \"0.001\"")
        .replace("/0\n", "/0\n  op_timeout: 100ms\n");
    let gw = Arc::new(Gateway::start(&yaml));
    let g2 = gw.clone();
    let call_task = tokio::spawn(async move { call(&client(), &g2, "/served").await });
    // The reservation is made; while the origin works, Redis stops answering for 1.5 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while hits.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the call never reached the origin");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(redis.command("CLIENT PAUSE 1500"), Some("+OK".into()));
    let g = call_task.await.unwrap();
    assert_eq!(g.status, 200, "{}", g.text());
    let s = status_until(&gw, |s| !amount(s, "spent").is_zero()).await;
    assert_eq!(amount(&s, "spent"), "0.001".parse().unwrap(), "the served call is paid once: {s}");
    assert!(amount(&s, "reserved").is_zero(), "{s}");
    assert_eq!(s["requests"], 1, "{s}");
}

/// A reservation whose answer never came (Redis paused past `op_timeout`: the call got 503, the
/// script ran when Redis woke) is released by the instance's next budgeted call instead of
/// holding the consumer's money for `lease_ttl`. (Found by the soak: ~150 held after 60 s.)
#[tokio::test(flavor = "multi_thread")]
async fn a_reservation_whose_answer_never_came_is_released() {
    let (origin, hits) = origin().await;
    let redis = RedisServer::start();
    let yaml = config(&origin, Some(redis.port), "limit: \"1\", per: 1d", "cost: \"0.001\"")
        .replace("/0\n", "/0\n  op_timeout: 100ms\n");
    let gw = Gateway::start(&yaml);
    let c = client();
    // One call first: Redis has the scripts, so the paused call's EVALSHA runs when it wakes.
    assert_eq!(call(&c, &gw, "/first").await.status, 200);
    assert_eq!(redis.command("CLIENT PAUSE 800"), Some("+OK".into()));
    let g = call(&c, &gw, "/during-pause").await;
    assert_eq!(g.status, 503, "{}", g.text());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Redis wakes and runs the reservation nobody waits for; the breaker lets Redis back in.
    let s = status_until(&gw, |s| !amount(s, "reserved").is_zero()).await;
    assert_eq!(amount(&s, "reserved"), "0.001".parse().unwrap(), "the late reservation is held: {s}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let g = call(&c, &gw, "/after").await;
        if g.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "Redis never came back: {} {}", g.status, g.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = status_until(&gw, |s| amount(s, "reserved").is_zero()).await;
    assert!(amount(&s, "reserved").is_zero(), "the unanswered reservation was released: {s}");
    assert_eq!(amount(&s, "spent"), "0.002".parse().unwrap(), "only the two served calls are paid: {s}");
}

/// A client that hangs up once its request is on its way does not decide the bill: the call
/// runs to the origin's answer, which is charged — so `spent` is exactly what the origin served.
/// The origin here reads a request only after 300 ms and, as hyper's server does, drops one whose
/// connection was closed by then. (Found by the soak: Weir closed the upstream connection when
/// the client left, charged the call, and the origin never served it.)
#[tokio::test(flavor = "multi_thread")]
async fn a_call_whose_client_leaves_runs_to_the_origins_answer_and_is_charged_exactly() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (s2, d2) = (served.clone(), dropped.clone());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            let (served, dropped) = (s2.clone(), d2.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut buf = vec![0u8; 16 << 10];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                // Closed behind the request: not served.
                if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(50), sock.read(&mut buf)).await {
                    dropped.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                served.fetch_add(1, Ordering::SeqCst);
                let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                let _ = sock.read(&mut buf).await;
            });
        }
    });
    let redis = RedisServer::start();
    let yaml =
        config_for(&format!("http://127.0.0.1:{port}"), Some(redis.port), "limit: \"1\", per: 1d", "cost: \"0.001\"");
    let gw = Gateway::start(&yaml);
    for i in 0..3 {
        let c = client();
        // The request is written to the origin's socket well within 100 ms; the client then
        // hangs up while the origin has not read it yet.
        let left = tokio::time::timeout(Duration::from_millis(100), call(&c, &gw, &format!("/x/{i}"))).await;
        assert!(left.is_err(), "the origin answers after 300 ms: the client gives up first");
    }
    let s =
        status_until(&gw, |s| amount(s, "reserved").is_zero() && amount(s, "spent") == "0.003".parse().unwrap()).await;
    let n = served.load(Ordering::SeqCst);
    assert_eq!(
        (amount(&s, "spent"), n, dropped.load(Ordering::SeqCst)),
        ("0.003".parse().unwrap(), 3, 0),
        "every call the client left was still asked of the origin, served and charged once: {s}"
    );
    assert!(amount(&s, "reserved").is_zero(), "{s}");
}
