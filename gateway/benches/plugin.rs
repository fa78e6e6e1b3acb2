//! Plugin call costs (`make plugins` first): ns per hook call on a warm, reused instance (what
//! the gateway does), the same call on a fresh instance (the other isolation strategy), and
//! instantiation + `init` alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use weir::plugin::{load, Header, KeyDecision, PluginRequest, PluginResponse, RequestParts};

fn wasm(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins").join(format!("{name}.wasm"))
}

fn request(path: &str, query: Option<&str>, headers: Vec<Header>) -> PluginRequest {
    PluginRequest {
        method: "GET".into(),
        scheme: "http".into(),
        authority: "api.example.com".into(),
        path: path.into(),
        query: query.map(str::to_string),
        headers,
        consumer: None,
        body: None,
    }
}

/// An HS256 JWT for tenant `acme`, signed with `secret`.
const TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0ZW5hbnQiOiJhY21lIiwic3ViIjoidTEifQ.b6XXVkigFHzqs5riEs8FkZGAKmquS4yiCnBkK9e_LhE";

fn benches(c: &mut Criterion) {
    let t = Duration::from_millis(50);
    let catalog = load(&wasm("catalog"), &serde_json::json!({}), t, 16 << 20).expect("catalog (make plugins)");
    let fixture = load(&wasm("fixtures"), &serde_json::json!({"mode": "ok"}), t, 16 << 20).expect("fixtures");
    let tenant =
        load(&wasm("tenant-key"), &serde_json::json!({"jwt_secret": "secret"}), t, 16 << 20).expect("tenant-key");
    let llm =
        load(&wasm("llm-cost"), &serde_json::json!({"input_per_1k": "0.003", "output_per_1k": "0.015"}), t, 16 << 20)
            .expect("llm-cost");

    let plain = request("/products/42", Some("b=2&a=1"), Vec::new());
    let auth = vec![Header { name: "authorization".into(), value: format!("Bearer {TOKEN}") }];
    let with_jwt = request("/orders", Some("page=1&utm=x"), auth);
    let resp = PluginResponse { status: 200, headers: Vec::new(), body: None };
    let llm_resp = PluginResponse {
        status: 200,
        headers: Vec::new(),
        body: Some(br#"{"id":"x","usage":{"prompt_tokens":1200,"completion_tokens":300}}"#.to_vec()),
    };

    assert!(matches!(tenant.cache_key_uncached(&with_jwt), Ok(KeyDecision::Key(_))), "the token must verify");
    assert_eq!(llm.cost(&plain, &llm_resp).unwrap().map(|d| d.to_string()).as_deref(), Some("0.0081"));
    c.bench_function("plugin/cache-key trivial (fixtures ok), warm instance", |b| {
        b.iter(|| fixture.cache_key_uncached(black_box(&plain)).unwrap())
    });
    c.bench_function("plugin/cache-key trivial, fresh instance per call", |b| {
        b.iter(|| fixture.cache_key_fresh(black_box(&plain)).unwrap())
    });
    c.bench_function("plugin/instantiate + init", |b| b.iter(|| fixture.instantiate_only().unwrap()));
    c.bench_function("plugin/cache-key tenant-key (HS256 verify), warm", |b| {
        b.iter(|| tenant.cache_key_uncached(black_box(&with_jwt)).unwrap())
    });
    let mut jwt_headers = http::HeaderMap::new();
    jwt_headers.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    jwt_headers.insert("accept", "application/json".parse().unwrap());
    let parts = RequestParts::new("GET", "http", "api.example.com", "/orders?page=1&utm=x", &jwt_headers, None);
    assert!(matches!(tenant.cache_key(&parts), Ok(KeyDecision::Key(_))));
    c.bench_function("plugin/cache-key tenant-key, memoised (repeat request)", |b| {
        b.iter(|| tenant.cache_key(black_box(&parts)).unwrap())
    });
    c.bench_function("plugin/ttl catalog, warm", |b| b.iter(|| catalog.ttl(black_box(&plain), &resp).unwrap()));
    c.bench_function("plugin/invalidate catalog, warm", |b| {
        b.iter(|| catalog.invalidate(black_box(&plain), &resp).unwrap())
    });
    c.bench_function("plugin/cost llm-cost (JSON + decimal), warm", |b| {
        b.iter(|| llm.cost(black_box(&plain), &llm_resp).unwrap())
    });
    c.bench_function("plugin/identify default (no opinion), warm", |b| {
        b.iter(|| fixture.identify(black_box(&plain), std::time::SystemTime::now()).unwrap())
    });
}

criterion_group! {
    name = plugin;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(plugin);
