//! End-to-end proxy behaviour: the real `weir` binary between a real client and a scripted origin.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use weir_e2e::*;

fn config(routes: &str) -> String {
    format!("listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nroutes:\n{routes}")
}

fn route(origin: &Origin) -> String {
    format!("  - name: all\n    match: {{ path: / }}\n    upstream: {}\n", origin.url())
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_with_via_and_client_host() {
    let origin = Origin::hello().await;
    let gw = Gateway::start(&config(&route(&origin)));
    let req = Request::get(gw.url("/a/b?x=1")).header("host", "api.example.com").body(full("")).unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "hello from origin");
    assert_eq!(got.header("via"), Some("1.1 weir"));
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri.path_and_query().unwrap().as_str(), "/a/b?x=1");
    assert_eq!(seen[0].headers["host"], "api.example.com");
    assert_eq!(seen[0].headers["via"], "1.1 weir");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge_client() {
    let origin = Origin::hello().await;
    let gw = Gateway::start(&config(&route(&origin)));
    let got = send(&h2_client(), Request::get(gw.url("/h2")).body(full("")).unwrap()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.version, Version::HTTP_2);
    assert_eq!(got.text(), "hello from origin");
    // HTTP/2 has no Host header; the upstream still sees the authority the client addressed.
    let seen = origin.seen();
    assert_eq!(seen[0].headers["host"], gw.addr().to_string());
    assert_eq!(seen[0].headers["via"], "2 weir");
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let origin = Origin::start(|_req| async {
        let mut r = text(200, "ok");
        let h = r.headers_mut();
        h.insert("connection", "x-origin-private".parse().unwrap());
        h.insert("x-origin-private", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-authenticate", "Basic".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        r
    })
    .await;
    let gw = Gateway::start(&config(&route(&origin)));
    let req = Request::get(gw.url("/"))
        .header("connection", "x-client-private")
        .header("x-client-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-end-to-end", "kept")
        .body(full(""))
        .unwrap();
    let got = send(&client(), req).await;
    assert_eq!(got.status, 200);
    assert!(got.header("x-origin-private").is_none());
    assert!(got.header("keep-alive").is_none());
    assert!(got.header("proxy-authenticate").is_none());
    assert_eq!(got.header("x-end-to-end"), Some("kept"));
    let seen = &origin.seen()[0];
    for h in ["x-client-private", "keep-alive", "te", "proxy-authorization"] {
        assert!(!seen.headers.contains_key(h), "{h} reached the origin");
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_cannot_be_injected_by_untrusted_clients() {
    let origin = Origin::hello().await;
    let gw = Gateway::start(&config(&route(&origin)));
    let req = Request::get(gw.url("/"))
        .header("host", "shop.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.test")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=6.6.6.6;proto=https")
        .body(full(""))
        .unwrap();
    send(&client(), req).await;
    let seen = &origin.seen()[0];
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-host"], "shop.test");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["forwarded"], "for=127.0.0.1;host=\"shop.test\";proto=http");
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_from_trusted_proxies_are_extended() {
    let origin = Origin::hello().await;
    let yaml = format!("server:\n  trusted_proxies: [127.0.0.0/8]\n{}", config(&route(&origin)));
    let gw = Gateway::start(&yaml);
    let req = Request::get(gw.url("/"))
        .header("host", "shop.test")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=203.0.113.9;proto=https")
        .body(full(""))
        .unwrap();
    send(&client(), req).await;
    let seen = &origin.seen()[0];
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["forwarded"], "for=203.0.113.9;proto=https, for=127.0.0.1;host=\"shop.test\";proto=http");
}

#[tokio::test(flavor = "multi_thread")]
async fn first_response_bytes_arrive_before_the_origin_finishes() {
    let released = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let (r2, f2) = (released.clone(), finished.clone());
    let origin = Origin::start(move |_req| {
        let (released, finished) = (r2.clone(), f2.clone());
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first-chunk;")))).await;
                released.notified().await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"last-chunk")))).await;
                finished.store(true, Ordering::SeqCst);
            });
            let stream = tokio_stream_from(rx);
            Response::new(StreamBody::new(stream).boxed())
        }
    })
    .await;
    let gw = Gateway::start(&config(&route(&origin)));
    let resp = client().request(Request::get(gw.url("/stream")).body(full("")).unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let first =
        tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("first chunk").unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first-chunk;"));
    assert!(!finished.load(Ordering::SeqCst), "origin had already finished");
    released.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, Bytes::from_static(b"last-chunk"));
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send + Sync + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A body of `total` bytes produced in 64 KiB chunks, never held whole in memory.
fn generated(total: u64) -> Body {
    let chunk = Bytes::from(vec![b'w'; 64 << 10]);
    let mut left = total;
    let stream = futures_util::stream::poll_fn(move |_cx| {
        if left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = left.min(chunk.len() as u64) as usize;
        left -= n as u64;
        std::task::Poll::Ready(Some(Ok::<_, BoxError>(Frame::data(chunk.slice(..n)))))
    });
    StreamBody::new(stream).boxed()
}

async fn drain(mut body: impl hyper::body::Body<Data = Bytes, Error = impl std::fmt::Debug> + Unpin) -> u64 {
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.expect("body frame").into_data() {
            n += d.len() as u64;
        }
    }
    n
}

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_download_and_upload_stream_with_bounded_memory() {
    let origin = Origin::start(|req| async move {
        if req.method() == http::Method::POST {
            let n = drain(req.into_body()).await;
            text(200, &n.to_string())
        } else {
            Response::new(generated(GIB))
        }
    })
    .await;
    let gw = Gateway::start(&config(&route(&origin)));
    let c = client();
    let resp = c.request(Request::get(gw.url("/big")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(drain(resp.into_body()).await, GIB);
    let resp = c.request(Request::post(gw.url("/upload")).body(generated(GIB)).unwrap()).await.unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, GIB.to_string());
    let rss = gw.peak_rss();
    assert!(rss > 0 && rss < 256 << 20, "gateway peak RSS {} MiB while streaming 2 GiB", rss >> 20);
}

/// A WebSocket echo origin (`echo:TEXT`); a plain request gets `200 plain`.
async fn ws_origin() -> Origin {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    Origin::start(|mut req| async move {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else { return text(200, "plain") };
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(on.await.unwrap());
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                io,
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() {
                    let reply = format!("echo:{}", msg.into_text().unwrap());
                    if ws.send(Message::text(reply)).await.is_err() {
                        return;
                    }
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_is_tunnelled_both_ways() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let origin = ws_origin().await;
    let gw = Gateway::start(&config(&route(&origin)));
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr())).await.expect("ws handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap(), format!("echo:ping {i}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fails_over_to_a_second_upstream_and_skips_the_dead_one() {
    let origin = Origin::hello().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let routes = format!("  - name: all\n    match: {{ path: / }}\n    upstream: [{dead}, {}]\n", origin.url());
    let gw = Gateway::start(&config(&routes));
    let c = client();
    for _ in 0..6 {
        let got = send(&c, Request::get(gw.url("/x")).body(full("")).unwrap()).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    assert_eq!(origin.count(), 6);
    // Non-idempotent requests with a body are not replayed, but passive health now skips the dead one.
    let got = send(&c, Request::post(gw.url("/x")).body(full("payload")).unwrap()).await;
    assert_eq!(got.status, 200);
    // The dead upstream was tried once: every later request skipped it (one failed connect, one
    // warning), instead of paying a refused connection each time.
    let tried = gw.log().matches("upstream failed to connect; skipping it").count();
    assert_eq!(tried, 1, "the dead upstream was tried {tried} times:\n{}", gw.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_errors_are_json() {
    let slow = Origin::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        text(200, "late")
    })
    .await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let routes = format!(
        "  - name: slow\n    match: {{ path: /slow }}\n    upstream: {}\n    timeouts: {{ response: 200ms }}\n\
         \x20 - name: dead\n    match: {{ path: /dead }}\n    upstream: {dead}\n\
         \x20 - name: limited\n    match: {{ path: /upload, methods: [POST] }}\n    upstream: {}\n    max_request_body: 1KiB\n",
        slow.url(),
        slow.url()
    );
    let gw = Gateway::start(&config(&routes));
    let c = client();

    let got = send(&c, Request::get(gw.url("/nowhere")).body(full("")).unwrap()).await;
    assert_eq!(got.status, 404);
    assert_eq!(got.json()["error"], "no_route");
    assert_eq!(got.header("content-type"), Some("application/json"));

    let got = send(&c, Request::get(gw.url("/dead")).body(full("")).unwrap()).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["error"], "upstream_unavailable");
    // The client is not told where the upstream is or why it failed; the log is.
    let dead_addr = dead.trim_start_matches("http://");
    assert!(!got.text().contains(dead_addr) && !got.text().contains("connect"), "{}", got.text());
    assert!(gw.log().contains(dead_addr), "the log names the upstream: {}", gw.log());

    let started = Instant::now();
    let got = send(&c, Request::get(gw.url("/slow")).body(full("")).unwrap()).await;
    assert_eq!(got.status, 504);
    assert_eq!(got.json()["error"], "upstream_timeout");
    assert!(!got.text().contains(slow.url().trim_start_matches("http://")), "{}", got.text());
    assert!(started.elapsed() < Duration::from_secs(3), "504 came only after the origin answered");

    let got = send(&c, Request::get(gw.url("/upload")).body(full("")).unwrap()).await;
    assert_eq!(got.status, 405);
    assert_eq!(got.json()["error"], "method_not_allowed");
    assert_eq!(got.header("allow"), Some("POST"));

    let got = send(&client(), Request::post(gw.url("/upload")).body(full(vec![b'x'; 4096])).unwrap()).await;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "payload_too_large");
    // A chunked body (no Content-Length) over the limit is cut off too.
    let got = send(&client(), Request::post(gw.url("/upload")).body(generated(64 << 10)).unwrap()).await;
    assert_eq!(got.status, 413);
    assert_eq!(slow.count(), 1, "only the /slow request may reach the origin");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_are_refused() {
    let origin = Origin::hello().await;
    let gw = Gateway::start(&config(&route(&origin)));
    let got =
        send(&client(), Request::get(gw.url("/")).header("x-big", "a".repeat(40 << 10)).body(full("")).unwrap()).await;
    assert_eq!(got.status, 431);
    assert_eq!(got.json()["error"], "headers_too_large");
    // Beyond hyper's own buffer the answer is hyper's bare 431; the origin never sees either.
    let raw_req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n", "a".repeat(100 << 10));
    let out = raw(gw.addr(), raw_req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(origin.count(), 0);
}

/// RFC 9112 §6.1/§6.3: ambiguous framing is rejected, or chunked wins and the connection closes;
/// never does a second, smuggled request reach the origin.
#[tokio::test(flavor = "multi_thread")]
async fn request_smuggling_attempts_never_reach_the_origin() {
    let origin = Origin::start(|req| async move {
        let n = drain(req.into_body()).await;
        text(200, &format!("read {n}"))
    })
    .await;
    let gw = Gateway::start(&config(&route(&origin)));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    // (request, status, requests the origin may see): where chunked wins (RFC 9112 §6.1, the
    // Content-Length is dropped) the POST is forwarded with an empty body and the connection is
    // closed after the answer; the other framings are refused.
    let attempts = [
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"), 200, 1),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello{smuggled}"), 400, 0),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: xchunked\r\n\r\n5c\r\n{smuggled}"), 400, 0),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"), 400, 0),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"), 200, 1),
    ];
    for (a, status, upstream) in &attempts {
        let before = origin.count();
        let out = raw(gw.addr(), a.as_bytes(), Duration::from_secs(3)).await;
        let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
        assert_eq!(statuses.len(), 1, "exactly one response to {a:?}: {out}");
        assert!(statuses[0].starts_with(&format!("HTTP/1.1 {status} ")), "{a:?}: {out}");
        assert_eq!(origin.count() - before, *upstream, "{a:?}");
        if *status == 200 {
            assert!(out.ends_with("read 0"), "the POST went up with an empty body: {out}");
        }
    }
    let seen = origin.seen();
    assert!(seen.iter().all(|s| s.uri.path() != "/smuggled"), "smuggled request reached the origin: {seen:?}");
}

/// An HTTP/2 client in front of an HTTP/1.1 origin: a body longer than its declared
/// `content-length` (the h2 downgrade desync) never turns into a second request upstream.
#[tokio::test(flavor = "multi_thread")]
async fn h2_to_h1_length_desync_never_reaches_the_origin() {
    let origin = Origin::start(|req| async move {
        let n = drain(req.into_body()).await;
        text(200, &format!("read {n}"))
    })
    .await;
    let gw = Gateway::start(&config(&route(&origin)));
    let tcp = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let req = Request::post(format!("http://{}/a", gw.addr())).header("content-length", "3").body(()).unwrap();
    let (resp, mut stream) = h2.send_request(req, false).unwrap();
    let sent = stream.send_data(bytes::Bytes::from(format!("abc{smuggled}")), true);
    let answer = match (sent, resp.await) {
        (_, Ok(r)) => format!("status {}", r.status()),
        (_, Err(e)) => format!("reset: {e}"),
    };
    eprintln!("h2 desync: {answer}");
    assert!(!answer.starts_with("status 2"), "a desynced body was accepted: {answer}");
    // The gateway keeps serving, and the origin never saw the smuggled request.
    assert_eq!(send(&h2_client(), Request::get(gw.url("/ok")).body(full("")).unwrap()).await.status, 200);
    let seen = origin.seen();
    assert!(seen.iter().all(|s| s.uri.path() != "/smuggled"), "smuggled request reached the origin: {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let origin = Origin::start(|_req| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        text(200, "finished")
    })
    .await;
    let mut gw = Gateway::start(&config(&route(&origin)));
    let url = gw.url("/slow");
    let inflight = tokio::spawn(async move { get(&url).await });
    while origin.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.signal("TERM");
    let got = inflight.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "finished");
    let status = gw.wait_exit(Duration::from_secs(10)).expect("weir did not exit");
    assert!(status.success(), "exit status {status}");
    assert!(tokio::net::TcpStream::connect(gw.addr()).await.is_err(), "still accepting after shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn body_idle_timeout_cuts_a_stalled_upstream() {
    let origin = Origin::start(|_req| async {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"partial")))).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        Response::new(StreamBody::new(tokio_stream_from(rx)).boxed())
    })
    .await;
    let routes = format!(
        "  - name: all\n    match: {{ path: / }}\n    upstream: {}\n    timeouts: {{ idle: 300ms }}\n",
        origin.url()
    );
    let gw = Gateway::start(&config(&routes));
    let resp = client().request(Request::get(gw.url("/")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let result =
        tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect()).await.expect("body never ended");
    assert!(result.is_err(), "a stalled body must end in an error, not look complete");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_listen_entry_serves_http1_and_h2c() {
    let origin = Origin::hello().await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\n  - addr: 127.0.0.1:0\nroutes:\n  - name: all\n    upstream: {}\n",
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    assert_eq!(gw.listen.len(), 2);
    assert_ne!(gw.listen[0], gw.listen[1]);
    for addr in &gw.listen {
        let h1 = send(&client(), Request::get(format!("http://{addr}/")).body(full("")).unwrap()).await;
        assert_eq!(h1.status, 200);
        let h2 = send(&h2_client(), Request::get(format!("http://{addr}/")).body(full("")).unwrap()).await;
        assert_eq!(h2.version, Version::HTTP_2);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let origin = Origin::hello().await;
    let yaml = format!(
        "server:\n  header_read_timeout: 500ms\nlisten:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: all\n    upstream: {}\n",
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    let started = Instant::now();
    // Half a request head, then silence: the gateway must close the connection by itself.
    let out = raw(gw.addr(), b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "connection held for {waited:?}");
    assert!(!out.contains("200 OK"), "{out}");
    assert_eq!(origin.count(), 0);
}

/// A raw HTTP/1.1 exchange with `Expect: 100-continue`: sends the head, waits for the first
/// response head, and sends `body` only if that was `100 Continue`. Returns the first head and
/// everything read (the connection is closed by `Connection: close`).
async fn expect_continue(addr: std::net::SocketAddr, head: &str, body: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                return String::from_utf8_lossy(&got[..end]).into_owned();
            }
            let k = s.read(&mut chunk).await.unwrap();
            assert!(k > 0, "closed before any response: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..k]);
        }
    })
    .await
    .expect("a first response head");
    if first.starts_with("HTTP/1.1 100") {
        s.write_all(body.as_bytes()).await.unwrap();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    (first, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_continue_only_after_every_gate_accepted() {
    let origin = Origin::start(|req| async move {
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        text(200, &format!("got {}", String::from_utf8_lossy(&body)))
    })
    .await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nconsumers:\n  - id: alice\n    keys_sha256: [\"{}\"]\nbudgets:\n  api: {{ limit: \"1\", per: 1d }}\nroutes:\n  - name: up\n    upstream: {}\n    max_request_body: 1KiB\n    consumer: {{ from: header:x-api-key, required: true }}\n    rate_limit: {{ key: consumer, rate: 1/1h, burst: 2 }}\n    budget: {{ name: api, cost: \"1\" }}\n",
        sha256_hex("alice-key"),
        origin.url()
    );
    let gw = Gateway::start(&yaml);
    let head = |key: &str, len: usize, expect: &str| {
        format!("POST /upload HTTP/1.1\r\nHost: api.test\r\n{key}Content-Length: {len}\r\nExpect: {expect}\r\nConnection: close\r\n\r\n")
    };
    let alice = "x-api-key: alice-key\r\n";
    // Refused before the body is asked for: no 100, the refusal is the only answer.
    for (h, want, code) in [
        (head("", 5, "100-continue"), "HTTP/1.1 401", "unknown_consumer"),
        (head(alice, 5000, "100-continue"), "HTTP/1.1 413", "payload_too_large"),
    ] {
        let (first, all) = expect_continue(gw.addr(), &h, "hello").await;
        assert!(first.starts_with(want), "{first}");
        assert!(all.contains(code) && !all.contains("100 Continue"), "{all}");
    }
    // Accepted: 100 Continue, then the body goes to the origin, without the expectation.
    let (first, all) = expect_continue(gw.addr(), &head(alice, 5, "100-Continue"), "hello").await;
    assert!(first.starts_with("HTTP/1.1 100 Continue"), "{first}");
    assert!(all.contains("HTTP/1.1 200 OK") && all.ends_with("got hello"), "{all}");
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("expect"), "Weir answered the expectation itself");
    // The budget (1, cost 1) is spent, then the rate limit (burst 2): each refuses with no 100.
    for code in ["budget_exhausted", "rate_limited"] {
        let (first, all) = expect_continue(gw.addr(), &head(alice, 5, "100-continue"), "hello").await;
        assert!(first.starts_with("HTTP/1.1 429"), "{first}");
        assert!(all.contains(code) && !all.contains("100 Continue"), "{all}");
    }
    // Any other expectation: 417.
    let (first, all) = expect_continue(gw.addr(), &head(alice, 5, "fast-lane"), "hello").await;
    assert!(first.starts_with("HTTP/1.1 417") && all.contains("expectation_failed"), "{all}");
    assert_eq!(origin.count(), 1);
}

/// A tunnel holds everything a request holds, for its whole life: its client connection's slot
/// (`server.max_connections`), the route's upstream slot (`max_upstream_connections`), and a
/// place in the tunnel caps (`server.max_tunnels_per_address` here); it counts in
/// `weir_connections{state="tunnel"}`. Before: eight tunnels opened past a cap of four
/// connections and two upstream slots, and an ordinary request was still served.
#[tokio::test(flavor = "multi_thread")]
async fn tunnels_hold_their_slots_and_have_caps_of_their_own() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Error as WsError;
    let origin = ws_origin().await;
    let yaml = format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\nserver:\n  max_connections: 4\n  max_tunnels_per_address: 3\nroutes:\n  - name: ws\n    match: {{ path: /ws }}\n    upstream: {u}\n    max_upstream_connections: 2\n    timeouts: {{ connect: 300ms }}\n  - name: free\n    match: {{ path: /free }}\n    upstream: {u}\n",
        u = origin.url()
    );
    let gw = Gateway::start(&yaml);
    let ws = |path: &str| tokio_tungstenite::connect_async(format!("ws://{}{path}", gw.addr()));
    let refused = |r: Result<_, WsError>| match r {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Ok(_) => 101,
        Err(e) => panic!("{e}"),
    };
    let (a, _) = ws("/ws/a").await.expect("first tunnel");
    let (b, _) = ws("/ws/b").await.expect("second tunnel");
    // Both upstream slots are the tunnels': a third upgrade and a plain request wait, then 503.
    assert_eq!(refused(ws("/ws/c").await), 503);
    let plain = send(&client(), Request::get(gw.url("/ws/plain")).body(full("")).unwrap()).await;
    assert_eq!((plain.status.as_u16(), plain.json()["error"].as_str()), (503, Some("upstream_busy")));
    let metrics = get(&gw.admin_url("/metrics")).await.text();
    assert!(metrics.lines().any(|l| l.contains("state=\"tunnel\"") && l.ends_with(" 2")), "{metrics}");
    // The third tunnel of this address is its last.
    let (c, _) = ws("/free/c").await.expect("third tunnel");
    assert_eq!(refused(ws("/free/d").await), 429);
    // Three tunnels hold three of the four connection slots: one idle connection takes the
    // last, and a further client is not even accepted until a tunnel closes.
    let mut idle = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    idle.write_all(b"GET /free/x HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 12];
    idle.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    let waiting = tokio::spawn({
        let url = gw.url("/free/y");
        async move { send(&client(), Request::get(url).body(full("")).unwrap()).await.status }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "served past server.max_connections");
    drop(a);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("served once a tunnel closed");
    assert_eq!(status.unwrap(), 200);
    drop((b, c));
}

/// A raw HTTP/1.1 origin that counts its connections and answers `answer to PATH`; `/quiet-close`
/// answers and then closes the connection without saying so (no `Connection: close`), as an
/// origin whose keep-alive timer fired does; `/big` sends 8 MiB.
async fn counting_raw_origin() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    if path.starts_with("/big") {
                        let body = vec![b'x'; 8 << 20];
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                        if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&body).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let body = format!("answer to {path}");
                    let out = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if s.write_all(out.as_bytes()).await.is_err() || path.starts_with("/quiet-close") {
                        return;
                    }
                }
            });
        }
    });
    (url, conns)
}

/// Weir's upstream pool: sequential requests share one keep-alive connection; a connection the
/// origin closed while idle is not used again; a response abandoned mid-body closes its
/// connection instead of handing the next request its leftover bytes.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_reused_and_never_handed_on_dirty() {
    let (url, conns) = counting_raw_origin().await;
    let gw = Gateway::start(&config(&format!("  - name: all\n    match: {{ path: / }}\n    upstream: {url}\n")));
    let c = client();
    for i in 0..20 {
        let got = send(&c, Request::get(gw.url(&format!("/a/{i}"))).body(full("")).unwrap()).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("answer to /a/{i}")));
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "twenty sequential requests, one upstream connection");

    // The origin closes after this answer; the next request must not be sent on that socket.
    let got = send(&c, Request::get(gw.url("/quiet-close")).body(full("")).unwrap()).await;
    assert_eq!(got.text(), "answer to /quiet-close");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = send(&c, Request::get(gw.url("/after-close")).body(full("")).unwrap()).await;
    assert_eq!((got.status.as_u16(), got.text()), (200, "answer to /after-close".to_string()));
    assert_eq!(conns.load(Ordering::SeqCst), 2);

    // A client takes the first bytes of 8 MiB and leaves: the upstream connection, with the
    // rest of the body unread, must not carry the next request.
    let resp = client().request(Request::get(gw.url("/big")).body(full("")).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    drop(body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        let got = send(&c, Request::get(gw.url(&format!("/next/{i}"))).body(full("")).unwrap()).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, format!("answer to /next/{i}")));
    }
    assert_eq!(conns.load(Ordering::SeqCst), 3, "the abandoned connection was closed, its successor reused");
}
