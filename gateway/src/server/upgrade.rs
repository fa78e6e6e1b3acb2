//! Zero-downtime upgrade: `weir run --upgrade` takes the listening sockets of the running
//! instance over a Unix socket (SCM_RIGHTS, the way Envoy, HAProxy and Pingora hand them over),
//! so both processes hold the *same* sockets and no connection waiting in an accept queue is
//! ever reset. The exchange, one line each way:
//!
//! 1. new → old: `upgrade`
//! 2. old → new: a JSON line `{"listeners": N, "admin": bool}` with the N (+1) sockets attached
//! 3. new → old: `ready` — it serves on them now
//! 4. old → new: `released` — the old one stops answering upgrades, fails `/readyz`, waits
//!    `server.drain_delay`, stops accepting, finishes what is in flight and exits; the new one
//!    takes over the upgrade socket for the next upgrade.
//!
//! A new process that fails before `ready` changes nothing: the old one keeps serving.
//! File descriptors cross the socket through `rustix` (safe `OwnedFd`s), so Weir has no
//! `unsafe` of its own.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// Sockets one hand-over carries at most (listeners plus the admin API).
const MAX_FDS: usize = 64;
/// How long each step of the exchange may take (the new process compiles its plugins before
/// it can serve).
const STEP: Duration = Duration::from_secs(120);

/// The upgrade socket of a configuration: `server.upgrade_socket`, else one per configuration
/// file in the temporary directory (writable in a container whose config directory is not).
pub fn socket_path(configured: Option<&Path>, config_file: &Path) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    let canonical = std::fs::canonicalize(config_file).unwrap_or_else(|_| config_file.to_path_buf());
    let h = blake3::hash(canonical.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join(format!("weir-{}.sock", &h.to_hex()[..16]))
}

/// What the new process received: the listeners in configuration order, then the admin's.
#[derive(Debug)]
pub struct Inherited {
    pub listeners: Vec<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
    /// The connection to the old process, to say `ready` on.
    conn: UnixStream,
}

/// Step 1–2, in the new process.
pub fn receive(path: &Path) -> std::io::Result<Inherited> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("no running instance answers on {}: {e}", path.display()))
    })?;
    conn.set_read_timeout(Some(STEP))?;
    conn.write_all(b"upgrade\n")?;
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut buf = [0u8; 512];
    let n = rustix::net::recvmsg(&conn, &mut [IoSliceMut::new(&mut buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?.bytes;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    let head: serde_json::Value = serde_json::from_slice(buf[..n].trim_ascii())
        .map_err(|e| std::io::Error::other(format!("bad hand-over message: {e}")))?;
    let listeners = usize::try_from(head["listeners"].as_u64().unwrap_or(0)).unwrap_or(0);
    let admin = head["admin"].as_bool().unwrap_or(false);
    if fds.len() != listeners + usize::from(admin) {
        return Err(std::io::Error::other(format!(
            "the running instance announced {} sockets and sent {}",
            listeners + usize::from(admin),
            fds.len()
        )));
    }
    let mut tcp: Vec<std::net::TcpListener> = fds.into_iter().map(std::net::TcpListener::from).collect();
    let admin = if admin { tcp.pop() } else { None };
    Ok(Inherited { listeners: tcp, admin, conn })
}

impl Inherited {
    /// Steps 3–4, in the new process: say `ready`, wait until the old one has let go.
    pub fn ready(mut self) -> std::io::Result<()> {
        self.conn.write_all(b"ready\n")?;
        let mut line = String::new();
        BufReader::new(&self.conn).read_line(&mut line)?;
        if line.trim() == "released" {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("the running instance answered `{}`", line.trim())))
        }
    }
}

/// Binds the upgrade socket of a running instance (replacing a stale file no process answers
/// on).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() && UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
}

/// In the running instance: answers upgrade requests with `sockets` (listeners, then the
/// admin's when `admin`), until one new process says `ready`; then acknowledges and returns,
/// and the caller drains. Runs on a blocking thread.
pub fn serve(listener: UnixListener, sockets: Vec<OwnedFd>, admin: bool) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        match hand_over(&conn, &sockets, admin) {
            Ok(()) => {
                drop(listener);
                let mut c = &conn;
                let _ = c.write_all(b"released\n");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "upgrade hand-over failed; this instance keeps serving"),
        }
    }
}

fn hand_over(conn: &UnixStream, sockets: &[OwnedFd], admin: bool) -> std::io::Result<()> {
    conn.set_read_timeout(Some(STEP))?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "upgrade" {
        return Err(std::io::Error::other(format!("unexpected request `{}`", line.trim())));
    }
    let head = serde_json::json!({"listeners": sockets.len() - usize::from(admin), "admin": admin}).to_string() + "\n";
    let borrowed: Vec<_> = sockets.iter().map(AsFd::as_fd).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(std::io::Error::other("too many sockets to hand over"));
    }
    rustix::net::sendmsg(conn, &[IoSlice::new(head.as_bytes())], &mut control, SendFlags::empty())?;
    tracing::info!("listening sockets handed to a new instance; waiting for it to serve");
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim() == "ready" {
        Ok(())
    } else {
        Err(std::io::Error::other("the new instance ended before serving"))
    }
}
