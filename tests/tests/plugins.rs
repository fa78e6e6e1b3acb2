//! Wasm plugins end to end: the example plugins (`plugins/*.wasm`, built by `make plugins`)
//! and misbehaving fixtures, through the real `weir` binary against a real origin.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{Method, Request};
use weir_e2e::*;

fn plugin(name: &str) -> PathBuf {
    let p = repo_root().join("plugins").join(format!("{name}.wasm"));
    assert!(p.is_file(), "{} missing: run `make plugins`", p.display());
    p
}

/// Answers `PATH n=COUNT` with a minute of freshness.
async fn origin() -> (Origin, Arc<AtomicU32>) {
    let n = Arc::new(AtomicU32::new(0));
    let c = n.clone();
    let o = Origin::start(move |req| {
        let c = c.clone();
        async move {
            let k = c.fetch_add(1, Ordering::SeqCst) + 1;
            let pq = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let mut r = text(200, &format!("{pq} n={k}"));
            r.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
            r
        }
    })
    .await;
    (o, n)
}

fn config(origin: &Origin, plugin_block: &str, cache_extra: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    plugin:\n{plugin_block}    cache:\n      ttl: 60s\n{cache_extra}    invalidate:\n      methods: [PUT, POST, DELETE]\n",
        origin.url()
    )
}

fn block(path: &std::path::Path, config: &str) -> String {
    format!("      path: {}\n      config: {config}\n", path.display())
}

async fn call(gw: &Gateway, method: Method, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::builder().method(method).uri(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(full("")).unwrap()).await
}

fn cs(g: &Got) -> String {
    g.header("cache-status").unwrap_or("<none>").to_string()
}

async fn metrics(gw: &Gateway) -> String {
    send(&client(), Request::get(gw.admin_url("/metrics")).body(full("")).unwrap()).await.text()
}

async fn purge(gw: &Gateway, body: &str) {
    let req = Request::post(gw.admin_url("/cache/purge"))
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn catalog_sets_ttls_and_tags_and_its_writes_invalidate() {
    let (origin, _) = origin().await;
    let gw = Gateway::start(&config(&origin, &block(&plugin("catalog"), "{item_ttl: 5m, search_ttl: 30s}"), ""));
    assert_eq!(cs(&call(&gw, Method::GET, "/products/1", &[]).await), "weir; fwd=miss; stored");
    let g = call(&gw, Method::GET, "/products/1", &[]).await;
    assert_eq!(cs(&g), "weir; hit; detail=l1");
    assert_eq!(g.text(), "/products/1 n=1");
    call(&gw, Method::GET, "/products/2", &[]).await;
    call(&gw, Method::GET, "/products?search=a", &[]).await;
    assert_eq!(cs(&call(&gw, Method::GET, "/products?search=a", &[]).await), "weir; hit; detail=l1");

    // Plugin-computed tags: purge product:2 only.
    purge(&gw, r#"{"tags": ["product:2"]}"#).await;
    assert!(cs(&call(&gw, Method::GET, "/products/2", &[]).await).contains("fwd=miss"));
    assert_eq!(cs(&call(&gw, Method::GET, "/products/1", &[]).await), "weir; hit; detail=l1");

    // A write to /products/1: the plugin invalidates tag product:1 and every search.
    assert_eq!(call(&gw, Method::PUT, "/products/1", &[]).await.status, 200);
    assert!(cs(&call(&gw, Method::GET, "/products/1", &[]).await).contains("fwd=miss"));
    assert!(cs(&call(&gw, Method::GET, "/products?search=a", &[]).await).contains("fwd=miss"));
    assert_eq!(cs(&call(&gw, Method::GET, "/products/2", &[]).await), "weir; hit; detail=l1");

    let m = metrics(&gw).await;
    assert!(m.contains(r#"weir_plugin_calls_total{plugin="catalog",hook="ttl",outcome="ok"}"#), "{m}");
    assert!(m.contains(r#"weir_plugin_calls_total{plugin="catalog",hook="invalidate",outcome="ok"}"#), "{m}");
}

fn jwt(secret: &str, header: &str, claims: &str) -> String {
    let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let signing = format!("{}.{}", e(header), e(claims));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing.as_bytes());
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing}.{sig}")
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_key_separates_tenants_and_never_trusts_a_forged_token() {
    let (origin, hits) = origin().await;
    let secret = "s3cret-for-tests";
    let yaml = config(
        &origin,
        &block(&plugin("tenant-key"), &format!("{{jwt_secret: {secret}, params: [page]}}")),
        "      share_private: true\n",
    );
    let gw = Gateway::start(&yaml);
    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let acme = format!("Bearer {}", jwt(secret, hs, r#"{"tenant":"acme","sub":"u1"}"#));
    let acme2 = format!("Bearer {}", jwt(secret, hs, r#"{"tenant":"acme","sub":"u2"}"#));
    let globex = format!("Bearer {}", jwt(secret, hs, r#"{"tenant":"globex"}"#));

    assert_eq!(
        cs(&call(&gw, Method::GET, "/orders?page=1&utm=x", &[("authorization", &acme)]).await),
        "weir; fwd=miss; stored"
    );
    // Same tenant (another user), unlisted params ignored, order irrelevant: a hit.
    let g = call(&gw, Method::GET, "/orders?utm=y&page=1", &[("authorization", &acme2)]).await;
    assert_eq!(cs(&g), "weir; hit; detail=l1");
    // Another tenant: its own entry.
    let g = call(&gw, Method::GET, "/orders?page=1", &[("authorization", &globex)]).await;
    assert_eq!(cs(&g), "weir; fwd=miss; stored");
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // Forged: acme's claims signed with another secret; unsigned (alg none); no token.
    let forged = format!("Bearer {}", jwt("not-the-secret", hs, r#"{"tenant":"acme"}"#));
    let none_alg = {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("Bearer {}.{}.", e(r#"{"alg":"none"}"#), e(r#"{"tenant":"acme"}"#))
    };
    for (auth, why) in [(forged.as_str(), "bad-signature"), (none_alg.as_str(), "unsupported-alg")] {
        let g = call(&gw, Method::GET, "/orders?page=1", &[("authorization", auth)]).await;
        assert_eq!(cs(&g), format!("weir; fwd=bypass; detail=\"plugin: {why}\""));
        assert!(!g.text().ends_with("n=1"), "a forged token read acme's entry: {}", g.text());
    }
    let g = call(&gw, Method::GET, "/orders?page=1", &[]).await;
    assert_eq!(cs(&g), "weir; fwd=bypass; detail=\"plugin: no-token\"");
    assert_eq!(hits.load(Ordering::SeqCst), 5, "every bypass went to the origin");
}

/// Each misbehaving fixture: the request completes with the policy's defaults, fast, and the
/// gateway keeps serving; the failure is counted.
#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_plugins_fall_back_to_the_policy_and_are_counted() {
    let (origin, _) = origin().await;
    for (mode, outcome) in
        [("loop", "timeout"), ("memory", "memory"), ("huge", "memory"), ("trap", "trap"), ("bad-key", "invalid")]
    {
        let pb = format!(
            "{}      timeout: 5ms\n      max_memory: 4MiB\n",
            block(&plugin("fixtures"), &format!("{{mode: {mode}}}"))
        );
        let gw = Gateway::start(&config(&origin, &pb, ""));
        for i in 0..3 {
            let t = Instant::now();
            let g = call(&gw, Method::GET, &format!("/{mode}/{i}"), &[]).await;
            assert_eq!(g.status, 200, "{mode}: {}", g.text());
            assert!(t.elapsed() < Duration::from_secs(2), "{mode}: took {:?}", t.elapsed());
            assert_eq!(cs(&g), "weir; fwd=miss; stored", "{mode}: the policy key and TTL apply");
        }
        assert_eq!(cs(&call(&gw, Method::GET, &format!("/{mode}/0"), &[]).await), "weir; hit; detail=l1", "{mode}");
        let m = metrics(&gw).await;
        let line = format!(r#"weir_plugin_calls_total{{plugin="fixtures",hook="cache-key",outcome="{outcome}"}}"#);
        assert!(m.contains(&line), "{mode}: no {line} in\n{m}");
        assert!(gw.log().contains("plugin call failed"), "{mode}: {}", gw.log());
    }
}

fn metric(m: &str, line: &str) -> u64 {
    m.lines().find_map(|l| l.strip_prefix(line)?.trim().parse().ok()).unwrap_or(0)
}

/// A plugin that traps on every call, under 64 concurrent requests: every request is answered
/// by the policy, instances are replaced off the request path (a call never instantiates; one
/// that finds no warm instance is `busy`), and no more than 16 instances ever exist.
#[tokio::test(flavor = "multi_thread")]
async fn trapping_instances_are_replaced_off_the_request_path_within_a_bound() {
    let (origin, hits) = origin().await;
    let pb = format!("{}      timeout: 5ms\n      max_memory: 4MiB\n", block(&plugin("fixtures"), "{mode: trap}"));
    let gw = Gateway::start(&config(&origin, &pb, ""));
    let m = metrics(&gw).await;
    let warm = metric(&m, r#"weir_plugin_instances{plugin="fixtures"}"#);
    assert!((1..=16).contains(&warm), "warm instances at load: {warm}\n{m}");
    let c = client();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..64 {
        let c = c.clone();
        let url = gw.url(&format!("/trap/{i}"));
        set.spawn(async move { send(&c, Request::get(url).body(full("")).unwrap()).await });
    }
    while let Some(g) = set.join_next().await {
        let g = g.unwrap();
        assert_eq!(g.status, 200, "{}", g.text());
        assert_eq!(cs(&g), "weir; fwd=miss; stored", "the policy key and TTL apply");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 64);
    let m = metrics(&gw).await;
    let count = |outcome: &str| {
        metric(&m, &format!(r#"weir_plugin_calls_total{{plugin="fixtures",hook="cache-key",outcome="{outcome}"}}"#))
    };
    // A call on a machine busy enough can also pass the 5 ms timeout: a failure all the same.
    assert_eq!(
        count("trap") + count("busy") + count("timeout"),
        64,
        "every key call trapped, timed out or found no instance\n{m}"
    );
    assert!(count("trap") >= 1, "{m}");
    assert_eq!(count("instantiate"), 0, "{m}");
    let live = metric(&m, r#"weir_plugin_instances{plugin="fixtures"}"#);
    assert!(live <= 16, "{live} instances exist\n{m}");
    // The pool is refilled in the background: a later call finds a warm instance and traps.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = count_in(&metrics(&gw).await, "trap");
        call(&gw, Method::GET, &format!("/again/{before}"), &[]).await;
        if count_in(&metrics(&gw).await, "trap") > before {
            break;
        }
        assert!(Instant::now() < deadline, "the pool was never refilled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count_in(m: &str, outcome: &str) -> u64 {
    metric(m, &format!(r#"weir_plugin_calls_total{{plugin="fixtures",hook="cache-key",outcome="{outcome}"}}"#))
}

/// Where credentialed responses are shared, a failed key hook must not fall back to the policy
/// key (it would mix what the plugin keeps apart): the cache stays out instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_key_hook_on_a_share_private_route_bypasses_the_cache() {
    let (origin, hits) = origin().await;
    let pb = format!("{}      timeout: 5ms\n", block(&plugin("fixtures"), "{mode: trap}"));
    let gw = Gateway::start(&config(&origin, &pb, "      share_private: true\n"));
    for _ in 0..2 {
        let g = call(&gw, Method::GET, "/private", &[("authorization", "Bearer x")]).await;
        assert_eq!(g.status, 200);
        assert_eq!(cs(&g), "weir; fwd=bypass; detail=\"plugin: failed (trap)\"");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_plugins_are_refused_at_load_with_a_clear_error() {
    let (origin, _) = origin().await;
    let dir = tempfile::tempdir().unwrap();
    // A component that imports a WASI interface: nothing is granted, so it is refused.
    let forbidden = dir.path().join("forbidden.wasm");
    let wat = r#"(component
        (import "wasi:random/random@0.2.0" (instance (export "get-random-u64" (func (result u64))))))"#;
    std::fs::write(&forbidden, wat::parse_str(wat).unwrap()).unwrap();
    let (ok, err) = validate(&config(&origin, &block(&forbidden, "{}"), ""));
    assert!(!ok);
    assert!(err.contains("imports `wasi:random/random@0.2.0`, which Weir does not grant"), "{err}");
    assert!(err.contains("weir.yaml:"), "positioned: {err}");

    // Not a component at all: said in words, with the file's first bytes (not a parser's dump).
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm not really").unwrap();
    let (ok, err) = validate(&config(&origin, &block(&junk, "{}"), ""));
    assert!(!ok && err.contains("not a valid WebAssembly component"), "{err}");
    let text = dir.path().join("text.wasm");
    std::fs::write(&text, b"hello, plugin").unwrap();
    let (ok, err) = validate(&config(&origin, &block(&text, "{}"), ""));
    assert!(!ok && err.contains("it starts with `68 65 6c 6c 6f 2c 20 70`"), "{err}");
    assert!(!err.contains("[104,"), "no byte-array dump: {err}");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, wat::parse_str("(module)").unwrap()).unwrap();
    let (ok, err) = validate(&config(&origin, &block(&core, "{}"), ""));
    assert!(!ok && err.contains("a core WebAssembly module, not a component"), "{err}");

    // A component without the plugin world's exports.
    let empty = dir.path().join("empty.wasm");
    std::fs::write(&empty, wat::parse_str("(component)").unwrap()).unwrap();
    let (ok, err) = validate(&config(&origin, &block(&empty, "{}"), ""));
    assert!(!ok && err.contains("does not export the weir:plugin@0.2.0"), "{err}");

    // One built against the previous interface is told to rebuild.
    let old = dir.path().join("old.wasm");
    std::fs::write(&old, wat::parse_str(r#"(component (import "weir:plugin/types@0.1.0" (instance)))"#).unwrap())
        .unwrap();
    let (ok, err) = validate(&config(&origin, &block(&old, "{}"), ""));
    assert!(!ok && err.contains("built against `weir:plugin/types@0.1.0`") && err.contains("rebuild"), "{err}");

    // init refuses its config.
    let (ok, err) = validate(&config(&origin, &block(&plugin("fixtures"), "{mode: init-error}"), ""));
    assert!(!ok && err.contains("init failed: fixture refuses to start"), "{err}");
    let (ok, err) = validate(&config(&origin, &block(&plugin("catalog"), "{item_ttl: soon}"), ""));
    assert!(!ok && err.contains("item_ttl"), "{err}");

    // And a good one passes.
    let (ok, err) = validate(&config(&origin, &block(&plugin("catalog"), "{}"), ""));
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_swap_under_load_and_a_broken_plugin_is_rejected_on_reload() {
    let (origin, _) = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.wasm");
    std::fs::copy(plugin("catalog"), &live).unwrap();
    let gw = Gateway::start(&config(&origin, &block(&live, "{}"), ""));
    call(&gw, Method::GET, "/x", &[]).await;
    assert_eq!(cs(&call(&gw, Method::GET, "/x", &[]).await), "weir; hit; detail=l1");

    let url = gw.url("/load");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = client();
            let (mut n, mut bad) = (0u32, 0u32);
            while !stop.load(Ordering::SeqCst) {
                let g = send(&c, Request::get(format!("{url}/{}", n % 7)).body(full("")).unwrap()).await;
                n += 1;
                if g.status != 200 {
                    bad += 1;
                }
            }
            (n, bad)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Swap in the fixture (its key is `fixture:PATH`: the old entries no longer match).
    std::fs::copy(plugin("fixtures"), &live).unwrap();
    gw.signal("HUP");
    let swapped = async {
        for _ in 0..100 {
            if cs(&call(&gw, Method::GET, "/x", &[]).await).contains("fwd=miss") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(swapped.await, "the new plugin never took over: {}", gw.log());
    assert_eq!(cs(&call(&gw, Method::GET, "/x", &[]).await), "weir; hit; detail=l1");

    // A broken file: the reload is rejected and the fixture keeps serving.
    std::fs::write(&live, b"garbage").unwrap();
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gw.log().contains("reload rejected"), "{}", gw.log());
    assert_eq!(cs(&call(&gw, Method::GET, "/x", &[]).await), "weir; hit; detail=l1");
    stop.store(true, Ordering::SeqCst);
    let (n, bad) = load.await.unwrap();
    assert!(n > 20, "only {n} requests");
    assert_eq!(bad, 0, "{bad} of {n} requests failed during the swaps");
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_cli_checks_and_runs_hooks() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(weir_bin()).arg("plugin").args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let catalog = plugin("catalog").display().to_string();
    let (ok, out) = run(&["check", &catalog]);
    assert!(ok && out.contains("imports nothing"), "{out}");
    let (ok, out) = run(&["run", &catalog, "--hook", "ttl", "--request", "GET /products/7"]);
    assert!(ok && out.contains("ttl: Some(TtlDecision") && out.contains("product:7") && out.contains("took"), "{out}");
    let (ok, out) = run(&["run", &catalog, "--hook", "invalidate", "--request", "PUT /products/7"]);
    assert!(ok && out.contains("/products?"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("resp.json");
    std::fs::write(&body, r#"{"usage": {"prompt_tokens": 1200, "completion_tokens": 300}}"#).unwrap();
    let llm = plugin("llm-cost").display().to_string();
    let cfg = r#"{"input_per_1k": "0.003", "output_per_1k": "0.015"}"#;
    let (ok, out) =
        run(&["run", &llm, "--hook", "cost", "--config", cfg, "--response-file", &body.display().to_string()]);
    // 1.2 × 0.003 + 0.3 × 0.015 = 0.0036 + 0.0045, exactly.
    assert!(ok && out.contains("cost: Some(0.0081)"), "{out}");
    let (ok, out) = run(&["check", &llm]);
    assert!(!ok && out.contains("input_per_1k is required"), "{out}");

    let fixtures = plugin("fixtures").display().to_string();
    let (ok, out) = run(&["run", &fixtures, "--config", r#"{"mode": "loop"}"#]);
    assert!(!ok && out.contains("timeout"), "{out}");
}

#[test]
fn plugin_new_scaffolds_a_crate_that_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let weir = |args: &[&str]| {
        let out =
            std::process::Command::new(weir_bin()).arg("plugin").args(args).current_dir(dir.path()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Anywhere, with no source tree: the SDK is vendored into the new crate.
    let (ok, out) = weir(&["new", "hello"]);
    assert!(ok, "{out}");
    assert!(dir.path().join("hello/sdk/wit/weir-plugin.wit").is_file(), "the SDK and its WIT are written");
    let (ok, out) = weir(&["build", "hello"]);
    assert!(ok && out.contains("built"), "{out}");
    let (ok, out) = weir(&[
        "run",
        "hello.wasm",
        "--hook",
        "ttl",
        "--request",
        "GET /docs/1",
        "--config",
        r#"{"ttl_seconds": 42}"#,
        "--response-header",
        "content-type: text/html",
    ]);
    assert!(ok && out.contains("ttl: Some(42)") && out.contains(r#"tags: ["docs"]"#), "{out}");
    // ... said as the gateway applies it.
    assert!(out.contains("applied: stored: fresh for 42 s") && out.contains("tags docs"), "{out}");
    let (ok, out) = weir(&["new", "hello"]);
    assert!(!ok && out.contains("already exists"), "{out}");
    // `--sdk` still overrides, and is checked at `new`, not at the first build.
    let sdk = repo_root().join("plugins/sdk").display().to_string();
    let (ok, out) = weir(&["new", "with-repo-sdk", "--sdk", &sdk]);
    assert!(ok, "{out}");
    let (ok, out) = weir(&["new", "bad-sdk", "--sdk", "/nonexistent/sdk"]);
    assert!(!ok && out.contains("--sdk /nonexistent/sdk"), "{out}");
    // The hooks are listed in --help, and an unknown one is refused before loading anything.
    let (ok, out) = weir(&["run", "--help"]);
    assert!(
        ok && ["cache-key", "ttl", "invalidate", "cost", "identify", "--now", "--body-file"]
            .iter()
            .all(|h| out.contains(h)),
        "{out}"
    );
    let (ok, out) = weir(&["run", "hello.wasm", "--hook", "bogus"]);
    assert!(!ok && out.contains("identify"), "{out}");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// `consumer: {from: plugin}`: the tenant-key plugin's `identify` turns a verified, unexpired
/// JWT into the consumer (checked against the time Weir gives the hook), before the cache and
/// before any quota; the consumer keys the rate limit and travels upstream as `Weir-Consumer`.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_identify_checks_exp_before_the_cache_and_keys_the_limit() {
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let origin = Origin::start(move |req| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            let who = req.headers().get("weir-consumer").map(|v| v.to_str().unwrap().to_string());
            let mut r = text(200, &format!("consumer={}", who.unwrap_or_else(|| "-".into())));
            r.headers_mut().insert("cache-control", "public, max-age=60".parse().unwrap());
            r
        }
    })
    .await;
    let secret = "s3cret-for-tests";
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    plugin:\n{}    consumer: {{ from: plugin, required: true }}\n    rate_limit: {{ key: plugin, rate: 1/1h, burst: 3 }}\n    cache:\n      ttl: 60s\n      share_private: true\n",
        origin.url(),
        block(&plugin("tenant-key"), &format!("{{jwt_secret: {secret}}}"))
    );
    let gw = Gateway::start(&yaml);
    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let now = unix_now();
    let token = |claims: String| format!("Bearer {}", jwt(secret, hs, &claims));
    let alice = token(format!(r#"{{"tenant":"acme","sub":"alice","exp":{}}}"#, now + 3600));
    let bob = token(format!(r#"{{"tenant":"acme","sub":"bob","exp":{}}}"#, now + 3600));

    // Alice's first call fills the tenant's entry; the origin saw her as the consumer.
    let g = call(&gw, Method::GET, "/orders", &[("authorization", &alice)]).await;
    assert_eq!((g.status.as_u16(), g.text()), (200, "consumer=alice".to_string()));
    assert_eq!(cs(&g), "weir; fwd=miss; stored");

    // Refused before the cache (the tenant's entry is there) and before the origin: expired,
    // not yet valid, no `exp`, forged, none; a client's own `Weir-Consumer` counts for nothing.
    let refused = [
        token(format!(r#"{{"tenant":"acme","sub":"carol","exp":{}}}"#, now - 5)),
        token(format!(r#"{{"tenant":"acme","sub":"carol","exp":{},"nbf":{}}}"#, now + 7200, now + 3600)),
        token(r#"{"tenant":"acme","sub":"carol"}"#.to_string()),
        format!(
            "Bearer {}",
            jwt("not-the-secret", hs, &format!(r#"{{"tenant":"acme","sub":"alice","exp":{}}}"#, now + 3600))
        ),
    ];
    for auth in &refused {
        let g = call(&gw, Method::GET, "/orders", &[("authorization", auth), ("weir-consumer", "alice")]).await;
        assert_eq!(g.status, 401, "{auth}: {}", g.text());
        assert!(g.text().contains(r#""error":"unknown_consumer""#), "{}", g.text());
        assert_eq!(g.header("www-authenticate"), Some(r#"Bearer realm="weir", error="invalid_token""#));
        assert!(g.header("cache-status").is_none(), "a refused request never reached the cache");
    }
    let g = call(&gw, Method::GET, "/orders", &[("weir-consumer", "alice")]).await;
    assert_eq!(g.status, 401);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "no refused request reached the origin");

    // The quota is the consumer's: alice has 2 left of 3 (hits count: `count: all`), bob his own.
    for _ in 0..2 {
        let g = call(&gw, Method::GET, "/orders", &[("authorization", &alice)]).await;
        assert_eq!(g.status, 200, "{}", g.text());
        assert_eq!(cs(&g), "weir; hit; detail=l1");
    }
    let g = call(&gw, Method::GET, "/orders", &[("authorization", &alice)]).await;
    assert_eq!(g.status, 429, "{}", g.text());
    let g = call(&gw, Method::GET, "/other", &[("authorization", &bob), ("weir-consumer", "alice")]).await;
    assert_eq!((g.status.as_u16(), g.text()), (200, "consumer=bob".to_string()), "bob's own bucket, his own name");
    let m = metrics(&gw).await;
    assert!(m.contains(r#"weir_plugin_calls_total{plugin="tenant-key",hook="identify",outcome="ok"}"#), "{m}");
}

/// A required plugin consumer whose `identify` fails is neither let in nor told it is unknown:
/// 503 `consumer_unavailable` (retry); where the consumer is optional the request goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_identify_is_503_where_a_consumer_is_required() {
    let (origin, hits) = origin().await;
    for (required, status) in [(true, 503), (false, 200)] {
        let yaml = format!(
            "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nroutes:\n  - name: api\n    upstream: {}\n    plugin:\n{}    consumer: {{ from: plugin, required: {required} }}\n",
            origin.url(),
            block(&plugin("fixtures"), "{mode: trap}")
        );
        let gw = Gateway::start(&yaml);
        let g = call(&gw, Method::GET, "/x", &[]).await;
        assert_eq!(g.status, status, "required {required}: {}", g.text());
        if required {
            assert!(g.text().contains(r#""error":"consumer_unavailable""#), "{}", g.text());
            assert_eq!(g.header("retry-after"), Some("1"));
        }
        let m = metrics(&gw).await;
        assert!(m.contains(r#"weir_plugin_calls_total{plugin="fixtures",hook="identify",outcome="trap"}"#), "{m}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "only the optional route reached the origin");
}
