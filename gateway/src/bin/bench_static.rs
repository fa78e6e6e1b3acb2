//! Benchmark baseline: a bare hyper server answering every request with the same N bytes from
//! memory (`Cache-Control: public, max-age=600`). Also the origin of the cache benchmarks.

#![forbid(unsafe_code)]

#[path = "baseline/runtime.rs"]
mod bench_runtime;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:3001")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 1024)]
    bytes: usize,
}

fn main() -> std::io::Result<()> {
    bench_runtime::runtime()?.block_on(serve(Args::parse()))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let body = Bytes::from(vec![b'x'; args.bytes]);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let mut r = Response::new(Full::new(body.clone()));
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=600"));
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
