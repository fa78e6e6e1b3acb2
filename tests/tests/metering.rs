//! Who pays and what counts, tried as a client that wants more than its policy allows: each
//! test is one ordinary-HTTP trick against the real binary (leaving early, `no-cache`, an
//! `Upgrade` header, junk in `X-Forwarded-For`, another consumer's cache entry, a method the
//! route leaves out, an unpriceable response), and the rule that closes it.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::time::{Duration, Instant};

use http::Request;
use weir_e2e::*;

const KEY_A: &str = "key-of-acme";
const KEY_B: &str = "key-of-bolt";

fn consumers() -> String {
    format!(
        "consumers:\n  - id: acme\n    keys_sha256: [\"{}\"]\n  - id: bolt\n    keys_sha256: [\"{}\"]\n",
        sha256_hex(KEY_A),
        sha256_hex(KEY_B)
    )
}

fn head() -> String {
    "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\n".to_string()
}

async fn call(gw: &Gateway, path: &str, key: &str, extra: &[(&str, &str)]) -> Got {
    let mut b = Request::get(gw.url(path)).header("x-api-key", key);
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(full("")).unwrap()).await
}

async fn budget(gw: &Gateway, consumer: &str) -> serde_json::Value {
    get(&gw.admin_url(&format!("/budgets/{consumer}?budget=api"))).await.json()
}

/// Waits until `consumer`'s spend is `want` (settlements may run in tasks).
async fn spent_becomes(gw: &Gateway, consumer: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let s = budget(gw, consumer).await;
        if s["spent"] == want && s["reserved"] == "0" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{consumer}: spent {} (reserved {}), want {want}",
            s["spent"],
            s["reserved"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that hangs up before the response head still pays for the call the origin did:
/// the call runs on to the origin's answer, which settles it (before the guard existed, the
/// lease expired uncharged after `lease_ttl`, and six origin calls cost nothing).
#[tokio::test(flavor = "multi_thread")]
async fn leaving_before_the_head_is_charged() {
    let (origin, calls) = Origin::counting(|_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        text(200, "slow")
    })
    .await;
    let yaml = format!(
        "{}{}budgets:\n  api: {{ limit: \"1\", per: 1d }}\nroutes:\n  - name: paid\n    upstream: {}\n    consumer: {{ from: header:x-api-key, required: true }}\n    budget: {{ name: api, cost: \"0.01\" }}\n",
        head(),
        consumers(),
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    for i in 0..6 {
        let req = Request::get(gw.url(&format!("/slow/{i}"))).header("x-api-key", KEY_A).body(full("")).unwrap();
        let r = tokio::time::timeout(Duration::from_millis(300), client().request(req)).await;
        assert!(r.is_err(), "the client was meant to leave first");
    }
    // Every call reached the origin and is charged; well before any lease could expire (5 min).
    spent_becomes(&gw, "acme", "0.06", Duration::from_secs(10)).await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 6);
    // Settled from the answers, none from a guard left behind.
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(!m.contains("weir_budget_unsettled_total{reason=\"dropped\"}"), "{m}");
}

/// An LLM-like origin: `/json` a small body with usage, `/big` the same usage after 70 KiB of
/// text, `/chat` an OpenAI chat stream with `include_usage` (70 KiB of deltas), `/chat-no-usage`
/// the same without it, `/responses` an OpenAI Responses stream, `/anthropic` an Anthropic
/// messages stream. Usage everywhere: 1,000 tokens in, 60,000 out.
async fn llm_origin() -> Origin {
    Origin::start(|req| async move {
        let filler = "x".repeat(100);
        let sse = |events: Vec<String>| {
            let mut r = trickle(events, Duration::from_millis(1));
            r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            r
        };
        let deltas = |n: usize| -> Vec<String> {
            (0..n)
                .map(|i| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{filler}{i}\"}}}}],\"usage\":null}}\n\n"))
                .collect()
        };
        match req.uri().path() {
            "/json" => text(200, "{\"usage\": {\"prompt_tokens\": 1000, \"completion_tokens\": 60000}}"),
            "/big" => text(
                200,
                &format!("{{\"text\": \"{}\", \"usage\": {{\"prompt_tokens\": 1000, \"completion_tokens\": 60000}}}}", "y".repeat(70 << 10)),
            ),
            "/chat" => {
                let mut e = deltas(500);
                e.push("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1000,\"completion_tokens\":60000}}\n\n".into());
                e.push("data: [DONE]\n\n".into());
                sse(e)
            }
            "/chat-no-usage" => {
                let mut e = deltas(500);
                e.push("data: [DONE]\n\n".into());
                sse(e)
            }
            "/responses" => {
                let mut e: Vec<String> = (0..500)
                    .map(|i| format!("event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"{filler}{i}\"}}\n\n"))
                    .collect();
                e.push("event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":1000,\"output_tokens\":60000}}}\n\n".into());
                sse(e)
            }
            "/anthropic" => {
                let mut e = vec!["event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":600,\"cache_creation_input_tokens\":300,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n".to_string()];
                e.extend((0..500).map(|i| format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"text\":\"{filler}{i}\"}}}}\n\n")));
                e.push("event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30000}}\n\n".into());
                e.push("event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":60000}}\n\n".into());
                e.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into());
                sse(e)
            }
            _ => text(404, "no"),
        }
    })
    .await
}

/// Unpriceable is never cheaper than priceable: the same usage costs 0.903 as a small JSON
/// body and as each provider's stream (the hook sees the stream's head and tail); a body it
/// cannot price (70 KiB of JSON, a stream without usage) settles at `max_cost`, 1.50 — never at
/// the 0.05 reservation (before: 0.05, an 18x undercharge). The hook gets 100 ms: pricing a
/// 128 KiB stream within the default 5 ms of wall time failed now and then while the suite's
/// other gateways had the cores (a timed-out hook settles at `max_cost`, as it must).
#[tokio::test(flavor = "multi_thread")]
async fn streams_are_priced_and_unpriceable_calls_settle_at_max_cost() {
    let origin = llm_origin().await;
    let wasm = repo_root().join("plugins/llm-cost.wasm");
    let yaml = format!(
        "{}{}budgets:\n  api: {{ limit: \"100\", per: 1d }}\nroutes:\n  - name: llm\n    upstream: {}\n    consumer: {{ from: header:x-api-key, required: true }}\n    plugin: {{ path: {}, timeout: 100ms, config: {{ input_per_1k: \"0.003\", output_per_1k: \"0.015\" }} }}\n    budget: {{ name: api, cost: plugin, reserve: \"0.05\", max_cost: \"1.50\" }}\n",
        head(),
        consumers(),
        origin.url(),
        wasm.display()
    );
    let gw = Gateway::start(&yaml);
    let mut total = rust_decimal::Decimal::ZERO;
    for (path, price) in [
        ("/json", "0.903"),
        ("/chat", "0.903"),
        ("/responses", "0.903"),
        // 600 in + 300 cache writes + 100 cache reads at the input price, 60,000 out.
        ("/anthropic", "0.903"),
        ("/big", "1.50"),
        ("/chat-no-usage", "1.50"),
    ] {
        let g = call(&gw, path, KEY_A, &[]).await;
        assert_eq!(g.status, 200, "{path}: {}", g.text());
        total += price.parse::<rust_decimal::Decimal>().unwrap();
        spent_becomes(&gw, "acme", &total.normalize().to_string(), Duration::from_secs(10)).await;
    }
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(m.contains("weir_budget_unsettled_total{reason=\"no_usage\"} 2"), "{m}");
    // `max_cost` is required with `cost: plugin`, and `weir validate` says how to fix it.
    let (ok, out) = validate(&yaml.replace(", max_cost: \"1.50\"", ""));
    assert!(!ok && out.contains("`cost: plugin` needs `max_cost`") && out.contains("weir.yaml:"), "{out}");
}

/// A cached, budgeted route whose origin answers with the consumer it was sent.
async fn cached_budget_gateway(extra_cache: &str, extra_budget: &str) -> (Gateway, Origin) {
    let origin = Origin::start(|req| async move {
        let who = req.headers().get("weir-consumer").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
        text(200, &format!("for {who}"))
    })
    .await;
    let yaml = format!(
        "{}{}budgets:\n  api: {{ limit: \"1\", per: 1d{extra_budget} }}\nroutes:\n  - name: cached\n    upstream: {}\n    consumer: {{ from: header:x-api-key, required: true }}\n    cache: {{ ttl: 60s{extra_cache} }}\n    budget: {{ name: api, cost: \"0.01\", headers: true }}\n",
        head(),
        consumers(),
        origin.url()
    );
    (Gateway::start(&yaml), origin)
}

/// A refetch the client's own `Cache-Control` forces is the client's: it pays, and sees its own
/// balance (before: billed to `_system`, whose balance it was shown). With
/// `client_no_cache: ignore` such a request is a hit like any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_forced_refetch_is_paid_by_the_client() {
    let (gw, origin) = cached_budget_gateway("", ", system_limit: \"0.5\"").await;
    let g = call(&gw, "/p", KEY_A, &[]).await;
    assert_eq!((g.status.as_u16(), g.header("weir-budget-remaining")), (200, Some("0.99")));
    for (i, cc) in
        [("cache-control", "no-cache"), ("pragma", "no-cache"), ("cache-control", "max-age=0")].iter().enumerate()
    {
        if cc.1 == "max-age=0" {
            // Older than zero seconds: the stored answer no longer meets the request.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let g = call(&gw, "/p", KEY_A, &[*cc]).await;
        assert_eq!(g.status, 200, "{}", g.text());
        let left = format!("{}", rust_decimal::Decimal::new(98 - i as i64, 2));
        assert_eq!(g.header("weir-budget-remaining"), Some(left.as_str()), "{cc:?}");
    }
    assert_eq!(origin.count(), 4);
    spent_becomes(&gw, "acme", "0.04", Duration::from_secs(5)).await;
    spent_becomes(&gw, "_system", "0", Duration::from_secs(5)).await;
    assert_eq!(budget(&gw, "_system").await["limit"], "0.5", "system_limit is _system's own");

    let (gw, origin) = cached_budget_gateway(", client_no_cache: ignore", "").await;
    assert_eq!(call(&gw, "/p", KEY_A, &[]).await.status, 200);
    let g = call(&gw, "/p", KEY_A, &[("cache-control", "no-cache")]).await;
    assert_eq!(g.header("cache-status"), Some("weir; hit; detail=l1"), "{:?}", g.headers);
    assert_eq!(origin.count(), 1);
}

/// A cache on a route with a consumer is keyed by consumer: B never gets A's answer (before:
/// it did, unless the origin sent `Vary: Weir-Consumer`). `shared_across_consumers: true` opts
/// out; a purge of the path reaches every consumer's copy.
#[tokio::test(flavor = "multi_thread")]
async fn caches_with_consumers_are_keyed_by_consumer() {
    let (gw, origin) = cached_budget_gateway("", "").await;
    assert_eq!(call(&gw, "/p", KEY_A, &[]).await.text(), "for acme");
    let b = call(&gw, "/p", KEY_B, &[]).await;
    assert_eq!(b.text(), "for bolt");
    let a = call(&gw, "/p", KEY_A, &[]).await;
    assert_eq!((a.text().as_str(), a.header("cache-status")), ("for acme", Some("weir; hit; detail=l1")));
    assert_eq!(call(&gw, "/p", KEY_B, &[]).await.header("cache-status"), Some("weir; hit; detail=l1"));
    assert_eq!(origin.count(), 2);
    let purge = Request::post(gw.admin_url("/cache/purge"))
        .header("content-type", "application/json")
        .body(full("{\"prefixes\": [\"/p\"]}"))
        .unwrap();
    assert_eq!(send(&client(), purge).await.status, 200);
    for key in [KEY_A, KEY_B] {
        let g = call(&gw, "/p", key, &[]).await;
        let status = g.header("cache-status").unwrap_or_default().to_string();
        assert!(status.contains("fwd=") && status.ends_with("; stored"), "{status}");
    }
    assert_eq!(origin.count(), 4, "both consumers' copies were purged");

    let (gw, origin) = cached_budget_gateway(", shared_across_consumers: true", "").await;
    assert_eq!(call(&gw, "/p", KEY_A, &[]).await.text(), "for acme");
    assert_eq!(call(&gw, "/p", KEY_B, &[]).await.text(), "for acme");
    assert_eq!(origin.count(), 1);
}

/// `Connection: Upgrade` on an uncached route counts under `count: misses`, whatever the origin
/// answers (before: tagged as a tunnel and never counted).
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_request_counts_as_a_miss() {
    let (origin, calls) = Origin::counting(|_req| async { text(200, "not a websocket") }).await;
    let yaml = format!(
        "{}routes:\n  - name: api\n    upstream: {}\n    rate_limit: {{ key: client_ip, rate: 2/m, burst: 2, count: misses }}\n",
        head(),
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    let mut statuses = Vec::new();
    for i in 0..4 {
        let req = Request::get(gw.url(&format!("/ws/{i}")))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(full(""))
            .unwrap();
        statuses.push(send(&client(), req).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Behind a trusted proxy, junk in `X-Forwarded-For` ends the walk at the nearest trusted hop:
/// a client cannot choose its own bucket by writing an address left of junk (before: the walk
/// stopped at the junk and the client's chosen address was its bucket), with one line or two.
#[tokio::test(flavor = "multi_thread")]
async fn junk_in_x_forwarded_for_never_chooses_the_bucket() {
    let origin = Origin::hello().await;
    let yaml = format!(
        "{}server:\n  trusted_proxies: [127.0.0.0/8]\nroutes:\n  - name: api\n    upstream: {}\n    rate_limit: {{ key: client_ip, rate: 3/m, burst: 3 }}\n",
        head(),
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    let mut statuses = Vec::new();
    for i in 0..6 {
        let mut b = Request::get(gw.url("/x"));
        if i % 2 == 0 {
            b = b.header("x-forwarded-for", format!("198.51.100.{i}, junk, 203.0.113.9"));
        } else {
            b = b.header("x-forwarded-for", format!("198.51.100.{i}, junk")).header("x-forwarded-for", "203.0.113.9");
        }
        statuses.push(send(&client(), b.body(full("")).unwrap()).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    // The real client (203.0.113.9) is who the bucket belongs to: another address is free.
    let g =
        send(&client(), Request::get(gw.url("/x")).header("x-forwarded-for", "203.0.113.10").body(full("")).unwrap())
            .await;
    assert_eq!(g.status, 200);
}

/// Junk with only trusted hops to its right: the walk ends at the junk and the nearest trusted
/// hop (the one that wrote it) is the bucket — not the address left of the junk, and not the
/// peer, whose own bucket stays untouched.
#[tokio::test(flavor = "multi_thread")]
async fn junk_behind_trusted_hops_counts_against_the_nearest_hop() {
    let origin = Origin::hello().await;
    let yaml = format!(
        "{}server:\n  trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\nroutes:\n  - name: api\n    upstream: {}\n    rate_limit: {{ key: client_ip, rate: 3/m, burst: 3 }}\n",
        head(),
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    let get = |xff: Option<String>| {
        let mut b = Request::get(gw.url("/x"));
        if let Some(v) = xff {
            b = b.header("x-forwarded-for", v);
        }
        b.body(full("")).unwrap()
    };
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(send(&client(), get(Some(format!("198.51.100.{i}, junk, 10.0.0.5")))).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429], "one bucket: 10.0.0.5's");
    // The peer (127.0.0.1) was never the bucket: its own requests are admitted.
    assert_eq!(send(&client(), get(None)).await.status, 200);
}

/// A method the route does not list gets 405 from that route, with `Allow`, never the
/// catch-all's answer (before: `/` served it, past the route's consumer, limits and budget).
#[tokio::test(flavor = "multi_thread")]
async fn a_method_the_route_leaves_out_gets_405_not_the_catch_all() {
    let origin = Origin::hello().await;
    let yaml = format!(
        "{}{}routes:\n  - name: all\n    match: {{ path: / }}\n    upstream: {}\n  - name: admin\n    match: {{ path: /admin, methods: [GET] }}\n    upstream: {}\n    consumer: {{ from: header:x-api-key, required: true }}\n",
        head(),
        consumers(),
        origin.url(),
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    let post = send(&client(), Request::post(gw.url("/admin/users")).body(full("x")).unwrap()).await;
    assert_eq!(post.status, 405, "{}", post.text());
    assert_eq!(post.header("allow"), Some("GET"));
    assert_eq!(origin.count(), 0, "the catch-all never answered");
    assert_eq!(call(&gw, "/admin/users", KEY_A, &[]).await.status, 200);
    assert_eq!(send(&client(), Request::post(gw.url("/other")).body(full("x")).unwrap()).await.status, 200);
    let (ok, out) = validate(&yaml);
    assert!(ok && out.contains("route `admin` allows only GET: other methods on its paths get 405"), "{out}");
}

/// Guessing keys: 10,000 wrong keys from one address never reach the origin, and once past
/// `server.auth_failures` they get 429 — while a valid key from the same address is still
/// served (only failures count). A limit keyed by an unverified header makes `weir validate`
/// warn.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_keys_are_limited_per_address_and_valid_keys_are_not() {
    let (origin, calls) = Origin::counting(|_req| async { text(200, "ok") }).await;
    let yaml = format!(
        "{}server:\n  auth_failures: {{ rate: 10/m, burst: 50 }}\n{}routes:\n  - name: api\n    upstream: {}\n    consumer: {{ from: header:x-api-key, required: true }}\n",
        head(),
        consumers(),
        origin.url()
    );
    let gw = std::sync::Arc::new(Gateway::start(&yaml));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut seen = [0usize; 2];
            for i in 0..625 {
                let req =
                    Request::get(gw.url("/x")).header("x-api-key", format!("guess-{t}-{i}")).body(full("")).unwrap();
                match send(&c, req).await.status.as_u16() {
                    401 => seen[0] += 1,
                    429 => seen[1] += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            seen
        }));
    }
    let (mut unauthorized, mut limited) = (0, 0);
    for t in tasks {
        let [u, l] = t.await.unwrap();
        unauthorized += u;
        limited += l;
    }
    assert_eq!(unauthorized + limited, 10_000);
    assert!((50..=60).contains(&unauthorized), "{unauthorized} answered 401 before the limit");
    let last =
        send(&client(), Request::get(gw.url("/x")).header("x-api-key", "one-more").body(full("")).unwrap()).await;
    assert_eq!((last.status.as_u16(), last.json()["error"].as_str()), (429, Some("too_many_auth_failures")));
    assert!(last.header("retry-after").is_some());
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0, "no guess reached the origin");
    assert_eq!(call(&gw, "/x", KEY_A, &[]).await.status, 200, "a valid key from the same address");

    let warned = format!(
        "{}routes:\n  - name: api\n    upstream: {}\n    rate_limit: {{ key: header:x-api-key, rate: 10/s }}\n",
        head(),
        origin.url()
    );
    let (ok, out) = validate(&warned);
    assert!(
        ok && out.contains("warning:") && out.contains("a client that changes the header's value gets a fresh quota"),
        "{out}"
    );
}
