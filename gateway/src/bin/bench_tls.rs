//! Benchmark client: new TLS connections per second, each carrying one HTTP/1.1 request
//! (`Connection: close`), with full handshakes or resumed ones (a shared session store, TLS 1.3
//! tickets). Prints one JSON line: `{"mode", "connections", "seconds", "per_sec", "resumed"}`.
//! The server's CPU per connection is what `bench/run.py --scenario tls` reports.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value = "localhost")]
    sni: String,
    /// PEM of the CA (or self-signed certificate) to trust.
    #[arg(long)]
    ca: PathBuf,
    /// `full` or `resumed`.
    #[arg(long, default_value = "full")]
    mode: String,
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value = "/hot/1")]
    path: String,
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?.block_on(run(args))
}

async fn run(args: Args) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&args.ca).map_err(|e| format!("{e:?}"))? {
        roots.add(c.map_err(|e| format!("{e:?}"))?).map_err(|e| e.to_string())?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = match args.mode.as_str() {
        "full" => rustls::client::Resumption::disabled(),
        "resumed" => rustls::client::Resumption::in_memory_sessions(4096),
        other => return Err(format!("--mode {other}: expected full or resumed")),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(args.sni.clone()).map_err(|e| e.to_string())?;
    let request = format!("GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", args.path, args.sni);
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (connector, name, request) = (connector.clone(), name.clone(), request.clone());
        let (done, resumed, failed) = (done.clone(), resumed.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            while Instant::now() < until {
                let one = async {
                    let tcp = tokio::net::TcpStream::connect(args.addr).await?;
                    tcp.set_nodelay(true)?;
                    let mut tls = connector.connect(name.clone(), tcp).await?;
                    let kind = tls.get_ref().1.handshake_kind();
                    tls.write_all(request.as_bytes()).await?;
                    buf.clear();
                    tls.read_to_end(&mut buf).await?;
                    Ok::<_, std::io::Error>((kind, buf.starts_with(b"HTTP/1.1 200")))
                };
                match one.await {
                    Ok((kind, true)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        if kind == Some(rustls::HandshakeKind::Resumed) {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "mode": args.mode,
            "connections": n,
            "failed": failed.load(Ordering::Relaxed),
            "seconds": secs,
            "per_sec": n as f64 / secs,
            "resumed": resumed.load(Ordering::Relaxed),
        })
    );
    Ok(())
}
