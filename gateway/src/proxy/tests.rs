//! The phases one at a time, without processes: a runtime built from a YAML policy with the
//! in-memory parts the embedded mode runs on (L1 storage, the local limiter on a clock the test
//! moves, the embedded budget ledger), and requests built as phase 1 would see them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};

use super::{accept, admit_route, consumer, limits, route_of, Accepted, ConnInfo, Purpose, RequestCtx};
use crate::budget::Budgets;
use crate::cache::Cache;
use crate::clock::Manual;
use crate::error::GatewayError;
use crate::limit::Limiter;
use crate::metrics::{LevelLabel, Metrics};
use crate::observe::Ids;
use crate::runtime::Runtime;

const KEY: &str = "key-of-acme-0123456789";

/// A runtime on in-memory parts, and the clock its limiter reads.
struct Fixture {
    rt: Arc<Runtime>,
    clock: Arc<Manual>,
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    crate::hex::encode(&sha2::Sha256::digest(s.as_bytes()))
}

fn fixture(routes: &str) -> Fixture {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir =
        std::env::temp_dir().join(format!("weir-phases-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("weir.yaml");
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nserver:\n  max_header_bytes: 2048\n  auth_failures: {{ rate: 3/m, burst: 3 }}\nconsumers:\n  - id: acme\n    keys_sha256: [\"{}\"]\nbudgets:\n  api: {{ limit: \"1\", per: 1d }}\nroutes:\n{routes}",
        sha256_hex(KEY)
    );
    std::fs::write(&path, yaml).unwrap();
    let config = crate::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let metrics = Metrics::new();
    let errors = metrics.cache_errors.get_or_create_owned(&LevelLabel { level: "l2" });
    let cache = Cache::new(1 << 20, 1 << 20, 1 << 20, None, None, errors);
    let clock = Arc::new(Manual::at(1_000_000_000_000_000));
    let limits = Arc::new(Limiter::with_clock(None, 1, 1000, clock.clone()));
    let budgets = Arc::new(Budgets::new(None));
    Fixture { rt: Arc::new(Runtime::build(config, cache, metrics, limits, budgets)), clock }
}

/// Phases 1 and 2 for a request from `peer`, as the listener hands it over.
fn routed(fx: &Fixture, method: Method, uri: &str, headers: &[(&str, &str)]) -> Result<RequestCtx, GatewayError> {
    let mut b = Request::builder().method(method).uri(uri).header("host", "api.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (mut parts, ()) = b.body(()).unwrap().into_parts();
    let peer = "198.51.100.7:40000".parse().unwrap();
    let conn = ConnInfo::new(peer, "127.0.0.1:8080".parse().unwrap(), "http");
    let ids = Ids::of(&parts.headers, false, None);
    let Accepted { canon, debug } = accept(&fx.rt, &mut parts, &conn, false)?;
    let route = route_of(&fx.rt, &canon)?;
    let mut ctx = RequestCtx::new(fx.rt.clone(), conn, false, canon, route, debug, false);
    ctx.request_id = Some(ids.request_id);
    admit_route(&ctx)?;
    Ok(ctx)
}

/// Phase 3 too: the consumer, then the `count: all` limits.
async fn identified(fx: &Fixture, uri: &str, headers: &[(&str, &str)]) -> Result<RequestCtx, GatewayError> {
    let mut ctx = routed(fx, Method::GET, uri, headers)?;
    ctx.consumer = consumer(&mut ctx)?;
    limits(&ctx, false).await?;
    Ok(ctx)
}

fn status(r: Result<RequestCtx, GatewayError>) -> StatusCode {
    match r {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status(),
    }
}

#[test]
fn phase_1_refuses_a_head_over_the_limit_and_keeps_the_debug_header_from_the_upstream() {
    let fx = fixture("  - name: all\n    upstream: http://127.0.0.1:9\n");
    let big = "x".repeat(4096);
    match routed(&fx, Method::GET, "/a", &[("x-big", &big)]) {
        Err(GatewayError::HeadersTooLarge { limit, .. }) => assert_eq!(limit, 2048),
        other => panic!("expected 431, got {:?}", other.map(|_| ())),
    }
    let ctx = routed(&fx, Method::GET, "/a", &[("weir-debug", "anything")]).unwrap();
    assert!(!ctx.canon.headers.contains_key("weir-debug"), "never forwarded");
    assert!(!ctx.debug, "no debug token configured");
    assert!(ctx.upstream_head().headers.contains_key("x-request-id"), "the request's id goes upstream");
    let ctx = routed(&fx, Method::GET, "/a", &[("x-request-id", "client-chosen")]).unwrap();
    assert!(!ctx.canon.headers.contains_key("x-request-id"), "an untrusted client's id is never forwarded");
    assert_ne!(ctx.upstream_head().headers["x-request-id"], "client-chosen");
}

#[test]
fn phase_2_answers_405_from_the_most_specific_routes_never_a_catch_all() {
    let fx = fixture(
        "  - name: items\n    match: { path: /items, methods: [GET, PUT] }\n    upstream: http://127.0.0.1:9\n  - name: items-post\n    match: { path: /items, methods: [POST] }\n    upstream: http://127.0.0.1:9\n  - name: all\n    upstream: http://127.0.0.1:9\n",
    );
    assert_eq!(fx.rt.routes[routed(&fx, Method::POST, "/items/1", &[]).unwrap().route].route.name, "items-post");
    match routed(&fx, Method::DELETE, "/items/1", &[]) {
        Err(GatewayError::MethodNotAllowed { allow, .. }) => {
            let mut allow: Vec<String> = allow.iter().map(ToString::to_string).collect();
            allow.sort();
            assert_eq!(allow, ["GET", "POST", "PUT"], "the union of the /items routes, not the catch-all's");
        }
        other => panic!("expected 405, got {:?}", other.map(|c| c.route)),
    }
    assert_eq!(fx.rt.routes[routed(&fx, Method::DELETE, "/other", &[]).unwrap().route].route.name, "all");
}

#[test]
fn phase_2_refuses_plain_http_on_an_https_route_and_a_declared_body_over_the_limit() {
    let fx = fixture(
        "  - name: secure\n    match: { path: /s, scheme: https }\n    upstream: http://127.0.0.1:9\n  - name: small\n    match: { path: /small }\n    max_request_body: 10\n    upstream: http://127.0.0.1:9\n",
    );
    assert_eq!(status(routed(&fx, Method::GET, "/s", &[])), StatusCode::FORBIDDEN);
    assert_eq!(status(routed(&fx, Method::POST, "/small", &[("content-length", "11")])), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(status(routed(&fx, Method::POST, "/small", &[("content-length", "10")])), StatusCode::OK);
}

#[tokio::test]
async fn phase_3_identifies_by_the_key_digest_and_hides_the_key_from_the_upstream() {
    let fx = fixture(
        "  - name: paid\n    upstream: http://127.0.0.1:9\n    consumer: { from: header:x-api-key, required: true, hide_credentials: true }\n",
    );
    let ctx = identified(&fx, "/a", &[("x-api-key", KEY), ("weir-consumer", "forged")]).await.unwrap();
    assert_eq!(ctx.consumer.as_deref(), Some("acme"));
    assert_eq!(ctx.canon.headers.get("weir-consumer").unwrap(), "acme", "the verified id, not the client's");
    assert!(!ctx.canon.headers.contains_key("x-api-key"));
    assert_eq!(status(identified(&fx, "/a", &[("x-api-key", "wrong")]).await), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn phase_3_limits_failed_credentials_per_address_and_never_a_valid_key() {
    let fx = fixture(
        "  - name: paid\n    upstream: http://127.0.0.1:9\n    consumer: { from: header:x-api-key, required: true }\n",
    );
    let wrong = [("x-api-key", "wrong")];
    for _ in 0..3 {
        assert_eq!(status(identified(&fx, "/a", &wrong).await), StatusCode::UNAUTHORIZED);
    }
    match identified(&fx, "/a", &wrong).await {
        Err(GatewayError::AuthFailures { retry_after_s }) => assert_eq!(retry_after_s, 20, "3/m: one failure per 20 s"),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        status(identified(&fx, "/a", &[("x-api-key", KEY)]).await),
        StatusCode::OK,
        "a valid key is never refused"
    );
    fx.clock.advance(Duration::from_secs(20));
    assert_eq!(status(identified(&fx, "/a", &wrong).await), StatusCode::UNAUTHORIZED, "one more failure allowed");
    assert_eq!(status(identified(&fx, "/a", &wrong).await), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn phase_3_rate_limits_refuse_past_the_burst_and_admit_again_as_the_clock_moves() {
    let fx = fixture(
        "  - name: limited\n    upstream: http://127.0.0.1:9\n    consumer: { from: header:x-api-key }\n    rate_limit: { rate: 2/s, burst: 2, key: consumer }\n",
    );
    let acme = [("x-api-key", KEY)];
    for remaining in ["1", "0"] {
        let ctx = routed(&fx, Method::GET, "/a", &acme).unwrap();
        let mut ctx = ctx;
        ctx.consumer = consumer(&mut ctx).unwrap();
        let h = limits(&ctx, false).await.unwrap();
        let field = h.iter().find(|(k, _)| k == "ratelimit").unwrap().1.to_str().unwrap().to_string();
        assert!(field.contains(&format!(";r={remaining};")), "{field}");
    }
    match identified(&fx, "/a", &acme).await {
        Err(GatewayError::RateLimited { retry_after_s, headers, .. }) => {
            assert_eq!(retry_after_s, 1);
            assert!(headers.iter().any(|(k, _)| k == "ratelimit-policy"));
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // Anonymous callers count by their address, apart from acme's bucket.
    assert_eq!(status(identified(&fx, "/a", &[]).await), StatusCode::OK);
    fx.clock.advance(Duration::from_millis(500));
    assert_eq!(status(identified(&fx, "/a", &acme).await), StatusCode::OK, "one token back after 1/rate");
    assert_eq!(status(identified(&fx, "/a", &acme).await), StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn the_payer_is_the_client_except_for_weirs_own_work() {
    let fx = fixture(
        "  - name: paid\n    upstream: http://127.0.0.1:9\n    consumer: { from: header:x-api-key, required: true }\n    budget: { name: api, cost: \"0.01\" }\n",
    );
    let mut ctx = routed(&fx, Method::GET, "/a", &[("x-api-key", KEY)]).unwrap();
    ctx.consumer = consumer(&mut ctx).unwrap();
    for p in [Purpose::Miss, Purpose::Forward, Purpose::PassThrough, Purpose::Tunnel] {
        assert_eq!(super::meter::payer(&ctx, p), "acme", "{p:?}");
    }
    for p in [Purpose::Refresh, Purpose::Revalidate] {
        assert_eq!(super::meter::payer(&ctx, p), crate::budget::SYSTEM, "{p:?}");
    }
    ctx.system = true;
    assert_eq!(super::meter::payer(&ctx, Purpose::Miss), crate::budget::SYSTEM, "a warm-up");
}

#[tokio::test]
async fn a_lease_dropped_unsettled_is_charged_at_once_on_the_ledger() {
    let fx = fixture(
        "  - name: llm\n    upstream: http://127.0.0.1:9\n    consumer: { from: header:x-api-key, required: true }\n    budget: { name: api, cost: \"0.25\" }\n",
    );
    let mut ctx = routed(&fx, Method::GET, "/a", &[("x-api-key", KEY)]).unwrap();
    ctx.consumer = consumer(&mut ctx).unwrap();
    let b = ctx.route().route.budget.clone().unwrap();
    let spent = || async {
        let def = b.def.clone();
        fx.rt.budgets.status(&def, "acme", 0, 0, false).await.unwrap().spent
    };
    let guard = super::meter::reserve(&ctx, &b, Purpose::Miss).await.unwrap().unwrap();
    assert_eq!(spent().await, 0, "reserved, not spent");
    drop(guard); // the client left before the head
    for _ in 0..100 {
        if spent().await == 250_000 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the dropped lease was not settled at the fixed cost: spent {}", spent().await);
}
