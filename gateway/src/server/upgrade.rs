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
//!
//! Whoever can talk on this socket can take the listening sockets, so: by default it lives in
//! a private directory (`$TMPDIR/weir-UID`, 0700, checked with `lstat`: a directory, not a
//! symlink, owned by this user, no access for anyone else) and is itself 0600; both ends
//! check the other's user id (`SO_PEERCRED`), so neither a stranger that connects nor one that
//! squats on the path gets or hands over sockets; and the sockets stay non-blocking (their
//! flags are shared with the old process, whose runtime must never block in `accept`).
//! File descriptors cross the socket through `rustix` (safe `OwnedFd`s), so Weir has no
//! `unsafe` of its own.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
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
/// file in this user's private directory under the temporary directory (writable in a
/// container whose config directory is not).
pub fn socket_path(configured: Option<&Path>, config_file: &Path) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    let canonical = std::fs::canonicalize(config_file).unwrap_or_else(|_| config_file.to_path_buf());
    let h = blake3::hash(canonical.as_os_str().as_encoded_bytes());
    private_dir().join(format!("weir-{}.sock", &h.to_hex()[..16]))
}

/// `$TMPDIR/weir-UID`: the default home of upgrade sockets.
fn private_dir() -> PathBuf {
    let uid = own_uid().map_or_else(|_| "user".to_string(), |u| u.to_string());
    std::env::temp_dir().join(format!("weir-{uid}"))
}

/// This process's user id: the owner of `/proc/self` (no `unsafe`, no libc call of our own).
fn own_uid() -> std::io::Result<u32> {
    Ok(std::fs::metadata("/proc/self")?.uid())
}

/// The other end runs as this user, or the exchange stops here.
fn peer_allowed(own: u32, peer: u32) -> std::io::Result<()> {
    if own == peer {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("the other end of the upgrade socket runs as uid {peer}, not {own}: refused"),
        ))
    }
}

fn check_peer(conn: &UnixStream) -> std::io::Result<()> {
    let cred = rustix::net::sockopt::socket_peercred(conn)?;
    peer_allowed(own_uid()?, cred.uid.as_raw())
}

/// Creates `dir` (0700) when missing, then checks it without following a symlink: a directory
/// owned by `uid` that nobody else may enter.
fn ensure_private(dir: &Path, uid: u32) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    let why = if m.file_type().is_symlink() {
        Some("is a symlink".to_string())
    } else if !m.is_dir() {
        Some("is not a directory".to_string())
    } else if m.uid() != uid {
        Some(format!("belongs to uid {}", m.uid()))
    } else if m.mode() & 0o077 != 0 {
        Some(format!("is open to others (mode {:o})", m.mode() & 0o777))
    } else {
        None
    };
    match why {
        Some(why) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} {why}: remove it, or set `server.upgrade_socket`", dir.display()),
        )),
        None => Ok(()),
    }
}

/// The default directory is checked before use; a configured path is the operator's.
fn check_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if dir == private_dir() => ensure_private(dir, own_uid()?),
        _ => Ok(()),
    }
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
    check_dir(path)?;
    let mut conn = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("no running instance answers on {}: {e}", path.display()))
    })?;
    // The sockets must come from this user's own instance, not from whoever squats on the path.
    check_peer(&conn)?;
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
    for l in &tcp {
        // Shared flags: blocking here would freeze the old process's `accept`.
        l.set_nonblocking(true)?;
    }
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
    check_dir(path)?;
    if path.exists() && UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
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
    // Only a process of this user gets the listening sockets.
    check_peer(conn)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_peer_of_another_user_is_refused() {
        assert!(peer_allowed(1000, 1000).is_ok());
        let e = peer_allowed(1000, 1001).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("uid 1001"), "{e}");
    }

    #[test]
    fn the_socket_directory_must_be_private_and_ours() {
        let base = tempfile::tempdir().unwrap();
        let uid = own_uid().unwrap();
        let dir = base.path().join("d");
        ensure_private(&dir, uid).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert!(ensure_private(&dir, uid + 1).unwrap_err().to_string().contains("belongs to uid"), "another owner");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(ensure_private(&dir, uid).unwrap_err().to_string().contains("open to others"));
        let link = base.path().join("l");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(ensure_private(&link, uid).unwrap_err().to_string().contains("symlink"));
    }

    #[test]
    fn the_socket_is_0600_in_its_private_directory() {
        let base = tempfile::tempdir().unwrap();
        let path = base.path().join("s.sock");
        let _l = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(check_peer(&UnixStream::connect(&path).unwrap()).is_ok(), "our own process");
    }
}
