//! A fault relay: a TCP proxy between Weir and a peer (Redis, the origin) that passes bytes,
//! stalls them, delays them, or drops them and then cuts every connection (a black hole), on
//! the test's command.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes pass both ways.
pub const PASS: u8 = 0;
/// Accepted connections and bytes in flight stall: nothing is forwarded either way.
pub const STALL: u8 = 1;
/// Every byte is delivered `SPIKE` late (pipelined: a latency spike, not a throughput cap).
pub const SLOW: u8 = 2;
/// Nothing is forwarded, and when the hole closes every connection through it is gone: what a
/// peer sees when packets are dropped until its TCP gives up.
pub const HOLE: u8 = 3;
/// The latency a spike adds: over the Redis `op_timeout` (200 ms) of the soak's config.
pub const SPIKE: Duration = Duration::from_millis(300);

#[derive(Debug)]
pub struct Relay {
    pub port: u16,
    mode: Arc<AtomicU8>,
    reset: tokio::sync::watch::Sender<u64>,
    /// Where it relays to (0 until known: a Cluster node announces its relay's port, so the
    /// relay exists before the node).
    target: Arc<AtomicU16>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let (reset, _) = tokio::sync::watch::channel(0u64);
        let target = Arc::new(AtomicU16::new(target));
        let (m, r, t) = (mode.clone(), reset.clone(), target.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let (mode, mut reset, target) = (m.clone(), r.subscribe(), t.load(Ordering::SeqCst));
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let _ = (down.set_nodelay(true), up.set_nodelay(true));
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        _ = pump(dr, uw, mode.clone()) => {}
                        _ = pump(ur, dw, mode) => {}
                        _ = reset.changed() => {}
                    }
                    // Dropping both halves closes both sockets: a reset from either side's view.
                });
            }
        });
        Relay { port, mode, reset, target }
    }

    pub fn point(&self, target: u16) {
        self.target.store(target, Ordering::SeqCst);
    }

    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// Closes every connection through the relay.
    pub fn reset_all(&self) {
        self.reset.send_modify(|g| *g += 1);
    }

    /// Holds `mode` for `hold`, then passes again (a black hole's connections are cut then).
    pub async fn fault(&self, mode: u8, hold: Duration) {
        self.set(mode);
        tokio::time::sleep(hold).await;
        if mode == HOLE {
            self.reset_all();
        }
        self.set(PASS);
    }
}

/// One direction of a relayed connection: read, stamp with when it may be delivered, deliver in
/// order (a spike delays each chunk from its own arrival, so the backlog clears when it ends).
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mode: Arc<AtomicU8>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, tokio::time::Instant)>();
    let m = mode.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due =
                tokio::time::Instant::now() + if m.load(Ordering::SeqCst) == SLOW { SPIKE } else { Duration::ZERO };
            if tx.send((buf[..n].to_vec(), due)).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((bytes, due)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            while matches!(mode.load(Ordering::SeqCst), STALL | HOLE) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    // The reader ends at EOF; what it read is still delivered before the writer ends.
    let (_, ()) = tokio::join!(reader, writer);
}
