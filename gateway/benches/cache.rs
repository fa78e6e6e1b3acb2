//! Micro-benchmarks of the cache hit path's pieces: key building, L1 lookup, Cache-Control parsing.

// Benchmark setup: a panic is the right answer to a broken fixture.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, StatusCode};
use weir::cache::control::{RequestDirectives, ResponseDirectives};
use weir::cache::entry::{Entry, Object};
use weir::cache::key;
use weir::cache::l1::L1;
use weir::cache::Storage;
use weir::proxy::canonical::{normalize_path, normalize_query};

fn keys(c: &mut Criterion) {
    c.bench_function("key/normalise (path + 3 query params)", |b| {
        b.iter(|| {
            let mut pq = normalize_path(black_box("/products/42/./reviews")).expect("path");
            pq.push('?');
            pq.push_str(&normalize_query(black_box("sort=desc&page=2&lang=en")).expect("query"));
            pq
        })
    });
    c.bench_function("key/primary (normalised parts)", |b| {
        b.iter(|| key::primary("products", "GET", "http", "api.example.com", black_box("/products/42?page=2"), None))
    });
    let mut h = HeaderMap::new();
    h.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
    h.insert("accept-language", HeaderValue::from_static("en-GB,en;q=0.8"));
    let names = vec![http::header::ACCEPT_ENCODING, http::header::ACCEPT_LANGUAGE];
    c.bench_function("key/secondary (2 vary headers)", |b| {
        b.iter(|| key::secondary(black_box("p|GET|http://h/x"), &names, &h))
    });
}

fn control(c: &mut Criterion) {
    let mut h = HeaderMap::new();
    h.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=60, s-maxage=120, stale-while-revalidate=30, stale-if-error=600"),
    );
    c.bench_function("cache-control/response (5 directives)", |b| b.iter(|| ResponseDirectives::parse(black_box(&h))));
    let empty = HeaderMap::new();
    c.bench_function("cache-control/request (absent)", |b| b.iter(|| RequestDirectives::parse(black_box(&empty))));
}

fn l1(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let l1 = L1::new(256 << 20);
    rt.block_on(async {
        for i in 0..10_000 {
            let k = format!("products|GET|http://h/products/{i}");
            let e = Entry {
                key: k.clone(),
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Bytes::from(vec![b'x'; 1024]),
                stored_at: SystemTime::now(),
                initial_age: Duration::ZERO,
                fresh_for: Duration::from_secs(600),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                revalidate_always: false,
                stale_forbidden: false,
                tags: vec![],
                path: format!("/products/{i}"),
                vary: Arc::from(Vec::new()),
            };
            l1.put(&k, Object::Response(Arc::new(e)), SystemTime::now()).await.expect("put");
        }
    });
    c.bench_function("l1/get hit (10k entries)", |b| {
        b.iter(|| rt.block_on(async { l1.get(black_box("products|GET|http://h/products/4242")).await }))
    });
    c.bench_function("l1/get miss", |b| {
        b.iter(|| rt.block_on(async { l1.get(black_box("products|GET|http://h/none")).await }))
    });
}

criterion_group!(benches, keys, control, l1);
criterion_main!(benches);
