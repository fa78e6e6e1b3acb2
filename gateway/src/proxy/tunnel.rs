//! Bounds on an upgraded (WebSocket) connection: bytes in both directions count against a cap,
//! and the tunnel closes once nothing has moved for the route's idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared by both directions of one tunnel.
#[derive(Debug)]
pub struct Meter {
    bytes: AtomicU64,
    cap: u64,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte moved.
    last_ms: AtomicU64,
}

impl Meter {
    pub fn new(cap: u64) -> Arc<Meter> {
        Arc::new(Meter { bytes: AtomicU64::new(0), cap, epoch: Instant::now(), last_ms: AtomicU64::new(0) })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn moved(&self, n: usize) -> io::Result<()> {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        let total = self.bytes.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
        if total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX)) > self.cap {
            return Err(io::Error::other(format!("tunnel passed its {}-byte cap", self.cap)));
        }
        Ok(())
    }

    /// Resolves once no byte has moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        loop {
            let quiet = self.now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed));
            if quiet >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
        }
    }
}

pin_project! {
    /// A stream whose reads are counted on a `Meter`.
    pub struct Metered<S> {
        #[pin]
        inner: S,
        meter: Arc<Meter>,
    }
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Arc<Meter>) -> Self {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead> AsyncRead for Metered<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                Poll::Ready(if n > 0 { this.meter.moved(n) } else { Ok(()) })
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for Metered<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
