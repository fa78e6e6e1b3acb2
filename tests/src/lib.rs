//! End-to-end harness: a scripted origin (records every request), the real `weir` binary and,
//! when asked, a real `redis-server` — all on ephemeral ports, all torn down on drop.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

pub mod relay;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
type HandlerFn = dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync;

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

/// An in-process HTTP/1.1 + h2c origin driven by a closure.
#[derive(Debug)]
pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A 200 whose body arrives as `parts`, one frame each, `gap` apart.
pub fn trickle(parts: Vec<String>, gap: Duration) -> Response<Body> {
    use futures_util::StreamExt as _;
    let frames = futures_util::stream::iter(parts.into_iter().enumerate()).then(move |(i, p)| async move {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(p)))
    });
    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
}

pub fn text(status: u16, body: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

impl Origin {
    /// Starts an origin answering every request with `f(request)`.
    /// `start`, with a count of the requests it answered.
    pub async fn counting<F, Fut>(f: F) -> (Origin, Arc<std::sync::atomic::AtomicUsize>)
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = n.clone();
        let o = Origin::start(move |req| {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            f(req)
        })
        .await;
        (o, n)
    }

    pub async fn start<F, Fut>(f: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Arc<HandlerFn> = Arc::new(move |req| Box::pin(f(req)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let handler = handler.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        seen.lock().expect("seen lock").push(Seen {
                            method: req.method().clone(),
                            uri: req.uri().clone(),
                            version: req.version(),
                            headers: req.headers().clone(),
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, seen, task }
    }

    /// An origin answering 200 `hello from origin` to everything.
    pub async fn hello() -> Origin {
        Origin::start(|_req| async { text(200, "hello from origin") }).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("seen lock").len()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the `weir` binary is: `$WEIR_BIN`, or beside this test executable's `deps/` folder.
pub fn weir_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WEIR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("weir");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p weir`, which `make test` does)",
        bin.display()
    );
    bin
}

/// The repository root (for policies/ and fixtures): where `cargo test` runs this test from
/// (it sets `CARGO_MANIFEST_DIR` for the process), else where it was compiled — a build dir
/// reused from a checkout at another path must not send the tests to that path's files.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// A running `weir run` process.
#[derive(Debug)]
pub struct Gateway {
    child: Option<Child>,
    pub listen: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

#[derive(Debug, Default)]
pub struct GatewayBuilder {
    env: Vec<(String, String)>,
}

impl GatewayBuilder {
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Spawns `weir run` on `yaml`; waits until it is listening, or returns its stderr on exit.
    pub fn try_start(self, yaml: &str) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config_path = dir.path().join("weir.yaml");
        std::fs::write(&config_path, yaml).map_err(|e| e.to_string())?;
        self.spawn(dir, config_path, &[])
    }

    /// `weir run --config CONFIG EXTRA...`, logging into `dir`, waited for until ready.
    fn spawn(self, dir: tempfile::TempDir, config_path: PathBuf, extra: &[&str]) -> Result<Gateway, String> {
        let ready = dir.path().join("ready.json");
        let log = std::fs::File::create(dir.path().join("weir.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(weir_bin());
        cmd.arg("run").arg("--config").arg(&config_path).arg("--ready-file").arg(&ready).args(extra);
        cmd.env("WEIR_LOG", std::env::var("WEIR_LOG").unwrap_or_else(|_| "info".into()));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    let listen = v["listen"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|s| s.as_str()?.parse().ok()).collect())
                        .unwrap_or_default();
                    let admin = v["admin"].as_str().and_then(|s| s.parse().ok());
                    return Ok(Gateway { child: Some(child), listen, admin, dir, config_path });
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("weir.log")).unwrap_or_default();
                return Err(format!("weir exited with {status}:\n{log}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err("weir did not become ready within 30s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start(self, yaml: &str) -> Gateway {
        match self.try_start(yaml) {
            Ok(g) => g,
            Err(e) => panic!("gateway failed to start: {e}"),
        }
    }
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    pub fn start(yaml: &str) -> Gateway {
        GatewayBuilder::default().start(yaml)
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen[0]
    }

    /// `weir run --upgrade` on this gateway's configuration: a new process that takes over its
    /// listeners (this one then drains and exits by itself).
    pub fn upgrade(&self) -> Result<Gateway, String> {
        Gateway::upgrade_from(self.config_path.clone())
    }

    /// `weir run --upgrade` on a configuration file: what `upgrade` does, without holding the
    /// gateway it replaces.
    pub fn upgrade_from(config_path: PathBuf) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        GatewayBuilder::default().spawn(dir, config_path, &["--upgrade"])
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin.expect("admin listener"), path)
    }

    /// `POST /reload` on the admin API (as JSON, as it must be sent): its answer.
    pub async fn reload(&self) -> Got {
        let req = Request::post(self.admin_url("/reload"))
            .header("content-type", "application/json")
            .body(full(""))
            .expect("reload request");
        send(&client(), req).await
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weir.log")).unwrap_or_default()
    }

    /// Peak resident memory of the gateway process, in bytes (`VmHWM`).
    pub fn peak_rss(&self) -> u64 {
        self.proc_status_kb("VmHWM:")
    }

    /// Resident memory of the gateway process now, in bytes (`VmRSS`).
    pub fn rss(&self) -> u64 {
        self.proc_status_kb("VmRSS:")
    }

    fn proc_status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A real `redis-server` on an ephemeral port, stopped by PID on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("tempdir");
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let child = Self::spawn(port, &dir, &args);
            let mut server = RedisServer { child, port, dir, args };
            if server.wait_ready() {
                return server;
            }
            let _ = server.child.kill();
        }
        panic!("redis-server did not start");
    }

    fn spawn(port: u16, dir: &tempfile::TempDir, args: &[String]) -> Child {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (make test installs it)")
    }

    /// SIGKILL: the server vanishes mid-conversation, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = Self::spawn(self.port, &self.dir, &self.args);
            if self.wait_ready() {
                return;
            }
            let _ = self.child.kill();
            assert!(Instant::now() < deadline, "redis-server did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every key in the server (tests inspect the key space; the gateway never uses KEYS).
    pub fn keys(&self) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw", "KEYS", "*"])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            // A password-protected server answers NOAUTH: it is up all the same.
            if self.command("PING").is_some_and(|r| r == "+PONG" || r.starts_with("-NOAUTH")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends one inline command and returns the first reply line.
    pub fn command(&self, cmd: &str) -> Option<String> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weir validate` on `yaml` written as `dir/weir.yaml`: whether it passed, and everything it
/// printed.
pub fn validate_in(yaml: &str, dir: &Path) -> (bool, String) {
    let path = dir.join("weir.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let out = Command::new(weir_bin()).args(["validate", "--config"]).arg(&path).output().expect("run weir validate");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

/// `validate_in` a fresh temporary folder.
pub fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    validate_in(yaml, dir.path())
}

/// Lower-case hex SHA-256 of `s` (how `consumers[].keys_sha256` holds an API key).
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A port the OS just handed out (released for the child to take).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A plain HTTP/1.1 client with pooling.
pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

/// A collected response.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn send(client: &Client<HttpConnector, Body>, req: Request<Body>) -> Got {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got { status: parts.status, version: parts.version, headers: parts.headers, body }
}

pub async fn get(url: &str) -> Got {
    send(&client(), Request::get(url).body(full("")).expect("request")).await
}

/// Writes raw bytes on a fresh connection and reads until the server closes it (or `wait`).
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A local Redis Cluster of three masters (no replicas) on ephemeral ports, each with an
/// explicit `cluster-port` so the bus port never needs port + 10000.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = cmd.arg("--cluster-yes").output().expect("redis-cli");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|n| n.info("cluster_state").as_deref() == Some("ok")) {
            assert!(Instant::now() < deadline, "cluster did not reach state ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }
}

impl RedisServer {
    /// One field of `CLUSTER INFO`.
    pub fn info(&self, field: &str) -> Option<String> {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string(), "CLUSTER", "INFO"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()))
    }

    /// Script calls (`EVALSHA` and `EVAL`) this server has run, from `INFO commandstats`.
    pub fn script_calls(&self) -> u64 {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string(), "INFO", "commandstats"]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
    }

    /// `DBSIZE` of this node.
    pub fn dbsize(&self) -> u64 {
        self.command("DBSIZE").and_then(|r| r.trim_start_matches(':').parse().ok()).unwrap_or(0)
    }
}
