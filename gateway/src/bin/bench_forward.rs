//! Benchmark floor for pure proxying: a minimal hyper forwarder. Every request goes to one
//! upstream over hyper-util's pooled client with its method, path and headers as they came
//! (`Host` rewritten to the upstream's), and the answer streams back unchanged — none of the
//! header rules, timeouts, limits or observability a gateway applies. What a proxy built on
//! hyper cannot go below.

#![forbid(unsafe_code)]

#[path = "baseline/runtime.rs"]
mod bench_runtime;

use std::net::SocketAddr;

use clap::Parser;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:3002")]
    addr: SocketAddr,
    /// The upstream, `host:port`.
    #[arg(long)]
    upstream: String,
}

fn main() -> std::io::Result<()> {
    bench_runtime::runtime()?.block_on(serve(Args::parse()))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let host = HeaderValue::from_str(&args.upstream).map_err(std::io::Error::other)?;
    let base = format!("http://{}", args.upstream);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, host, base) = (client.clone(), host.clone(), base.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let (client, host) = (client.clone(), host.clone());
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let uri: Result<Uri, _> = format!("{base}{pq}").parse();
                async move {
                    let Ok(uri) = uri else { return Ok(status(StatusCode::BAD_REQUEST)) };
                    *req.uri_mut() = uri;
                    req.headers_mut().insert(header::HOST, host);
                    Ok::<_, std::convert::Infallible>(match client.request(req).await {
                        Ok(resp) => resp.map(http_body_util::Either::Left),
                        Err(_) => status(StatusCode::BAD_GATEWAY),
                    })
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

type Body = http_body_util::Either<Incoming, http_body_util::Empty<bytes::Bytes>>;

fn status(s: StatusCode) -> Response<Body> {
    let mut r = Response::new(http_body_util::Either::Right(http_body_util::Empty::new()));
    *r.status_mut() = s;
    r
}
