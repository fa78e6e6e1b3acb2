//! A small product-catalogue API used by `make run`, the tests and the benchmarks.
//! `GET /products/{id}`, `GET /products?search=`, `PUT|POST|DELETE /products/{id}`,
//! `GET /slow?ms=N`, `GET /bytes?n=N`, and a request counter at `GET /__stats`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
}

#[derive(Default)]
struct State {
    requests: AtomicU64,
    /// id → (name, version); versions bump on every write so ETags change.
    products: Mutex<BTreeMap<u64, (String, u64)>>,
}

type Resp = Response<Full<Bytes>>;

fn json(status: StatusCode, body: serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn query_param<'a>(q: Option<&'a str>, name: &str) -> Option<&'a str> {
    q?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Resp {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let method = req.method().clone();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segs.as_slice()) {
        (Method::GET, ["__stats"]) => {
            json(StatusCode::OK, serde_json::json!({"requests": state.requests.load(Ordering::Relaxed)}))
        }
        (Method::GET, ["slow"]) => {
            let ms = query_param(query.as_deref(), "ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            json(StatusCode::OK, serde_json::json!({"slept_ms": ms}))
        }
        (Method::GET, ["bytes"]) => {
            let n: usize =
                query_param(query.as_deref(), "n").and_then(|v| v.parse().ok()).unwrap_or(1024).min(64 << 20);
            let mut r = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
            r
        }
        (Method::GET, ["products"]) => {
            let term = query_param(query.as_deref(), "search").unwrap_or("").to_ascii_lowercase();
            let items: Vec<_> = (1..=20u64)
                .map(|id| product(&state, id))
                .filter(|p| p["name"].as_str().is_some_and(|n| n.to_ascii_lowercase().contains(&term)))
                .collect();
            let mut r = json(StatusCode::OK, serde_json::json!({"items": items}));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=30"));
            r
        }
        (Method::GET | Method::HEAD, ["products", id]) => {
            let Ok(id) = id.parse::<u64>() else {
                return json(StatusCode::NOT_FOUND, serde_json::json!({"error": "not_found"}));
            };
            let p = product(&state, id);
            let etag = format!("\"p{id}-v{}\"", p["version"]);
            if req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r.headers_mut()
                    .insert(header::ETAG, HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"x\"")));
                return r;
            }
            let mut r = json(StatusCode::OK, p);
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
            if let Ok(v) = HeaderValue::from_str(&etag) {
                r.headers_mut().insert(header::ETAG, v);
            }
            r
        }
        (Method::PUT | Method::POST, ["products", id]) => {
            let Ok(id) = id.parse::<u64>() else {
                return json(StatusCode::BAD_REQUEST, serde_json::json!({"error": "bad_id"}));
            };
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let name = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["name"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("Product {id}"));
            let mut map = state.products.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(id).or_insert_with(|| (name.clone(), 0));
            entry.0 = name;
            entry.1 += 1;
            drop(map);
            json(StatusCode::OK, product(&state, id))
        }
        (Method::DELETE, ["products", id]) => {
            if let Ok(id) = id.parse::<u64>() {
                state.products.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        _ => json(StatusCode::NOT_FOUND, serde_json::json!({"error": "not_found", "path": path})),
    }
}

fn product(state: &State, id: u64) -> serde_json::Value {
    let map = state.products.lock().unwrap_or_else(|p| p.into_inner());
    let (name, version) = map.get(&id).cloned().unwrap_or_else(|| (format!("Product {id}"), 0));
    serde_json::json!({"id": id, "name": name, "price": format!("{}.99", id % 50 + 1), "version": version})
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    eprintln!("demo origin listening on http://{}", listener.local_addr()?);
    let state = Arc::new(State::default());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
