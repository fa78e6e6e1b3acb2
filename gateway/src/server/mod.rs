//! Start-up wiring: bind every listener and the admin API, write the ready file, then run until
//! SIGINT/SIGTERM (graceful drain) while SIGHUP reloads the configuration.

pub mod listener;
pub mod upgrade;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::admin::Admin;
use crate::config::Config;
use crate::runtime::Gateway;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{why}: refusing to start an admin API without its token")]
    TokenUnset { why: String },
    #[error("the admin token in {from} is {len} bytes: use at least {MIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)")]
    TokenTooShort { from: String, len: usize },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("{0}")]
    Redis(#[from] crate::redis::RedisStartError),
    #[error("listen[{index}].tls: {message}")]
    Tls { index: usize, message: String },
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    #[error("cannot write ready file {path}: {source}")]
    ReadyFile { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Default)]
pub struct RunOptions {
    /// Written once every listener is bound: `{"listen": ["ip:port", ...], "admin": "ip:port"}`.
    pub ready_file: Option<PathBuf>,
    /// Take the listeners from the running instance (`weir run --upgrade`).
    pub upgrade: bool,
}

/// Shortest admin token accepted: 32 bytes, a brute force is out of reach.
pub const MIN_TOKEN_BYTES: usize = 32;

pub async fn run(config: Config, opts: RunOptions) -> Result<(), StartError> {
    let token = match config.admin.as_ref().and_then(|a| a.token.as_ref()) {
        Some(from) => match from.read() {
            Ok(t) if t.len() >= MIN_TOKEN_BYTES => Some(crate::config::values::Token::new(&t)),
            Ok(t) => return Err(StartError::TokenTooShort { from: from.to_string(), len: t.len() }),
            Err(why) => return Err(StartError::TokenUnset { why }),
        },
        None => None,
    };

    let upgrade_path = upgrade::socket_path(config.server.upgrade_socket.as_deref(), &config.source);
    let mut inherited = if opts.upgrade {
        let path = upgrade_path.clone();
        let got = tokio::task::spawn_blocking(move || upgrade::receive(&path))
            .await
            .map_err(|e| StartError::Upgrade(e.to_string()))?
            .map_err(|e| StartError::Upgrade(e.to_string()))?;
        if got.listeners.len() != config.listeners.len() || got.admin.is_some() != config.admin.is_some() {
            return Err(StartError::Upgrade(format!(
                "the running instance has {} listeners{}; this configuration has {}{}: listeners change with a restart",
                got.listeners.len(),
                if got.admin.is_some() { " and an admin API" } else { "" },
                config.listeners.len(),
                if config.admin.is_some() { " and an admin API" } else { "" },
            )));
        }
        // What was received must be what this configuration listens on, socket by socket.
        let wanted = config.listeners.iter().map(|l| l.addr).chain(config.admin.as_ref().map(|a| a.addr));
        for (l, want) in got.listeners.iter().chain(got.admin.iter()).zip(wanted) {
            let have = l.local_addr().map_err(|e| StartError::Upgrade(e.to_string()))?;
            let same = if want.port() == 0 { have.ip() == want.ip() } else { have == want };
            if !same {
                return Err(StartError::Upgrade(format!(
                    "the running instance listens on {have} where this configuration has {want}: listeners change with a restart"
                )));
            }
        }
        tracing::info!(sockets = got.listeners.len(), "took over the running instance's listeners");
        Some(got)
    } else {
        None
    };
    let adopt = |l: std::net::TcpListener, addr: SocketAddr| -> Result<TcpListener, StartError> {
        l.set_nonblocking(true).map_err(|source| StartError::Bind { addr, source })?;
        TcpListener::from_std(l).map_err(|source| StartError::Bind { addr, source })
    };
    let mut bound = Vec::new();
    for l in &config.listeners {
        let tcp = match inherited.as_mut() {
            Some(inh) => adopt(inh.listeners.remove(0), l.addr)?,
            None => TcpListener::bind(l.addr).await.map_err(|source| StartError::Bind { addr: l.addr, source })?,
        };
        bound.push(tcp);
    }
    let admin_listener = match &config.admin {
        Some(a) => Some(match inherited.as_mut().and_then(|inh| inh.admin.take()) {
            Some(l) => adopt(l, a.addr)?,
            None => TcpListener::bind(a.addr).await.map_err(|source| StartError::Bind { addr: a.addr, source })?,
        }),
        None => None,
    };
    // Copies of the listening sockets, for handing them to the next instance.
    let mut handover: Vec<std::os::fd::OwnedFd> = Vec::new();
    for l in bound.iter().chain(admin_listener.iter()) {
        if let Ok(fd) = std::os::fd::AsFd::as_fd(l).try_clone_to_owned() {
            handover.push(fd);
        }
    }
    let addrs: Vec<String> = bound.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect();
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string());
    // Redis first (with `redis.required`, bad credentials end the start here): the listeners
    // are announced only once Weir will serve them.
    let redis = match &config.redis {
        Some(r) => Some(crate::redis::Shared::connect(r.clone()).await?),
        None => None,
    };
    for a in &addrs {
        tracing::info!(addr = %a, "listening");
    }
    if let Some(a) = &admin_addr {
        tracing::info!(addr = %a, "admin API listening");
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let settings = config.server.clone();
    let tls_settings: Vec<Option<crate::tls::TlsSettings>> = config.listeners.iter().map(|l| l.tls.clone()).collect();
    let log_settings = config.log.clone();
    let trace_settings = config.tracing.clone();
    let gateway = Gateway::new(config, redis);
    let dropped = gateway.runtime().metrics.access_log_dropped.clone();
    if let Some(log) = crate::observe::AccessLog::start(&log_settings, dropped).map_err(StartError::AccessLog)? {
        gateway.set_access_log(log);
    }
    if let Some(t) = &trace_settings {
        let dropped = gateway.runtime().metrics.spans_dropped.clone();
        gateway.set_span_exporter(crate::observe::SpanExporter::start(t, dropped));
        tracing::info!(endpoint = %t.otlp, "exporting a span per request over OTLP/HTTP");
    }
    let mut acceptors = Vec::new();
    for (index, s) in tls_settings.iter().enumerate() {
        if let Some(s) = s {
            let a = crate::tls::Acceptor::new(s, gateway.runtime().metrics.clone())
                .map_err(|message| StartError::Tls { index, message })?;
            acceptors.push((index, Arc::new(a)));
        }
    }
    gateway.set_tls(acceptors.clone());
    if let Some(port) = bound.first().and_then(|l| l.local_addr().ok()).map(|a| a.port()) {
        let scheme = if tls_settings.first().is_some_and(Option::is_some) { "https" } else { "http" };
        gateway.set_first_listener(scheme, port);
    }
    tokio::spawn(sample_hits(gateway.clone()));
    if !acceptors.is_empty() {
        tokio::spawn(watch_tls_files(gateway.clone()));
    }
    let builder = Arc::new(listener::http_builder(&settings));
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let mut tasks = Vec::new();
    for (i, tcp) in bound.into_iter().enumerate() {
        let gw = gateway.clone();
        let handler = move |req, conn| crate::proxy::handle(gw.clone(), req, conn);
        let tls = acceptors.iter().find(|(j, _)| *j == i).map(|(_, a)| a.clone());
        let gauges = gateway.runtime().metrics.connections(&addrs.get(i).cloned().unwrap_or_default());
        let serving = listener::Serving {
            builder: builder.clone(),
            shutdown: stop_rx.clone(),
            drain: settings.shutdown_timeout,
            slots: slots.clone(),
            gauges,
        };
        tasks.push(tokio::spawn(listener::serve(tcp, tls, serving, handler)));
    }
    if let Some(tcp) = admin_listener {
        let admin = Arc::new(Admin { gateway: gateway.clone(), token });
        let handler = move |req, _conn| admin.clone().handle(req);
        let gauges = gateway.runtime().metrics.connections("admin");
        let serving = listener::Serving {
            builder: builder.clone(),
            shutdown: stop_rx.clone(),
            drain: settings.shutdown_timeout,
            // The admin API has its own few slots: a flood on the data plane cannot lock it out.
            slots: Arc::new(tokio::sync::Semaphore::new(64)),
            gauges,
        };
        tasks.push(tokio::spawn(listener::serve(tcp, None, serving, handler)));
    }

    gateway.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(path) = &opts.ready_file {
        // Written whole, then renamed: a reader never sees half of it.
        let doc = serde_json::json!({"listen": addrs, "admin": admin_addr});
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| StartError::ReadyFile { path: path.clone(), source })?;
    }
    if let Some(inh) = inherited {
        // Serving now: the old instance may let go.
        match tokio::task::spawn_blocking(move || inh.ready()).await {
            Ok(Ok(())) => tracing::info!("the previous instance released its listeners and is draining"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the previous instance did not confirm the hand-over"),
            Err(e) => tracing::warn!(error = %e, "hand-over task failed"),
        }
    }
    // Answer the next `weir run --upgrade` (on a thread of its own: it blocks on the socket).
    let (handed_tx, mut handed_rx) = tokio::sync::oneshot::channel::<()>();
    let mut upgradable = match upgrade::bind(&upgrade_path) {
        Ok(l) => {
            let admin = admin_addr.is_some();
            std::thread::Builder::new()
                .name("weir-upgrade".into())
                .spawn(move || {
                    upgrade::serve(l, handover, admin);
                    let _ = handed_tx.send(());
                })
                .is_ok()
        }
        Err(e) => {
            tracing::warn!(path = %upgrade_path.display(), error = %e, "zero-downtime upgrade unavailable: cannot bind the upgrade socket");
            false
        }
    };
    let owns_socket = upgradable;
    let mut handed_over = false;

    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            res = &mut handed_rx, if upgradable => {
                if res.is_ok() {
                    tracing::info!("handed over to a new instance: draining");
                    handed_over = true;
                    break;
                }
                upgradable = false;
            }
            _ = hup.recv() => {
                if let Err(e) = gateway.reload_off_thread().await {
                    tracing::error!("reload rejected, the previous configuration keeps serving:\n{e}");
                }
            }
        }
    }
    // Readiness fails first, so load balancers stop sending before the listeners close.
    gateway.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    if !settings.drain_delay.is_zero() {
        tracing::info!(delay = ?settings.drain_delay, "draining: /readyz fails, still accepting");
        tokio::time::sleep(settings.drain_delay).await;
    }
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if owns_socket && !handed_over {
        // The next instance binds its own; a hand-over's successor already has.
        let _ = std::fs::remove_file(&upgrade_path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Once a second, the cache counters into `/health`'s last-minute hit rate.
async fn sample_hits(gateway: Arc<Gateway>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (lookups, hits) = gateway.cache_totals();
        gateway.runtime().metrics.recent.sample(lookups, hits);
    }
}

/// How often certificate files are looked at.
const TLS_WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads when a certificate, key or client CA file changes. Each path is `stat`ed through its
/// symlinks, so an atomic symlink swap (cert-manager, Kubernetes secrets: `..data` pointed at a
/// new directory) is seen as a new inode even though the path never changed; an in-place
/// rewrite changes the size or the modification time. Polling costs a few `stat`s a second
/// and, unlike inotify on each directory, needs no re-arming when the directory itself is
/// replaced. A broken file is reported once (the reload is rejected and the old certificates
/// serve); the next change is tried again.
async fn watch_tls_files(gateway: Arc<Gateway>) {
    let mut seen = tls_fingerprint(&gateway);
    let mut tick = tokio::time::interval(TLS_WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = tls_fingerprint(&gateway);
        if now == seen {
            continue;
        }
        tracing::info!("a certificate file changed: reloading");
        match gateway.reload_off_thread().await {
            Ok(()) => {}
            Err(e) => tracing::error!("reload rejected, the previous certificates keep serving:\n{e}"),
        }
        // The files as they were before the reload read them: a file that changed again while
        // it ran (a half-written one finished, say) differs next time and is read again. A
        // reload that changed the list of files costs one more, idempotent, reload.
        seen = now;
    }
}

/// (size, mtime, device, inode) of every TLS file of the running configuration.
fn tls_fingerprint(gateway: &Gateway) -> Vec<Option<(u64, std::time::SystemTime, u64, u64)>> {
    use std::os::unix::fs::MetadataExt as _;
    let rt = gateway.runtime();
    rt.config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref())
        .flat_map(|t| t.files.iter())
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH), m.dev(), m.ino()))
        })
        .collect()
}
