//! Body adapters for streaming: an idle timeout between frames (either direction), so a stalled
//! peer cannot pin a connection, without ever buffering the body.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::BoxError;

/// The body went silent for longer than the route's idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("body idle for more than {0:?}")]
pub struct IdleTimeoutError(pub Duration);

pin_project! {
    /// Fails the body when no frame arrives within `idle`; each frame re-arms the timer.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        idle: Duration,
    }
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout { inner, sleep: tokio::time::sleep(idle), idle }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep.as_mut().reset(Instant::now() + *this.idle);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeoutError(*this.idle))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// True when `e` (or its cause) is a body over its length limit (`http_body_util::Limited`).
pub fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

pin_project! {
    /// A body that holds a permit (a route's upstream connection slot) until it ends or drops.
    pub struct WithPermit<B, P = tokio::sync::OwnedSemaphorePermit> {
        #[pin]
        inner: B,
        permit: Option<P>,
    }
}

impl<B, P> WithPermit<B, P> {
    pub fn new(inner: B, permit: P) -> Self {
        WithPermit { inner, permit: Some(permit) }
    }
}

impl<B: Body<Data = Bytes>, P> Body for WithPermit<B, P> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a metered body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every frame was read.
    Complete,
    /// The upstream failed mid-body.
    Failed,
}

/// What a metered body calls once, with the bytes it kept, when it ends.
pub type OnEnd = Box<dyn FnOnce(Vec<u8>, Ended) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// The part of a body a `cost` hook is shown: all of it when it fits in `cap`; else its first
/// `cap` bytes up to their last complete server-sent event, then its last `cap` bytes from
/// their first complete event on — so a stream's opening (Anthropic's `message_start`) and its
/// close (the final usage chunk, `response.completed`) both reach the hook, with a gap between
/// whole events. A non-event body over the cap keeps nothing the hook could misread.
#[derive(Debug, Default)]
pub struct Kept {
    head: Vec<u8>,
    tail: Vec<u8>,
    over: bool,
}

impl Kept {
    fn push(&mut self, cap: usize, mut data: &[u8]) {
        if !self.over {
            let room = cap.saturating_sub(self.head.len());
            let n = data.len().min(room);
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
            if data.is_empty() {
                return;
            }
            self.over = true;
        }
        self.tail.extend_from_slice(data);
        // The window, plus the 3 bytes before it that a boundary at its start may begin with.
        if self.tail.len() > cap.saturating_mul(2).saturating_add(8) {
            let cut = self.tail.len() - cap - 3;
            self.tail.drain(..cut);
        }
    }

    /// The bytes the hook is shown (see the type's doc).
    pub fn into_bytes(self, cap: usize) -> Vec<u8> {
        if !self.over {
            return self.head;
        }
        let window = self.tail.len().saturating_sub(cap);
        let search = window.saturating_sub(3);
        let mut out = Vec::with_capacity(self.head.len() + cap);
        if let Some(end) = event_ends(&self.head).last() {
            out.extend_from_slice(&self.head[..end]);
        }
        // The window's first event may have begun before it: start after the first event end
        // inside it (a boundary may straddle its start). When the body grew past the head by
        // less than the window, the tail starts where the head stopped keeping, which is not an
        // event start either.
        if let Some(start) = event_ends(&self.tail[search..]).map(|o| search + o).find(|&o| o >= window) {
            out.extend_from_slice(&self.tail[start..]);
        }
        out
    }
}

/// Offsets just past each blank line that ends a server-sent event (`\n\n` or `\r\n\r\n`).
fn event_ends(b: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (1..b.len()).filter_map(move |i| {
        if b[i] != b'\n' {
            return None;
        }
        let lf = b[i - 1] == b'\n';
        let crlf = i >= 3 && &b[i - 3..i] == b"\r\n\r";
        (lf || crlf).then_some(i + 1)
    })
}

/// A body that streams through and keeps what a `cost` hook is shown (`Kept`), then hands it to
/// `on_end` (a budget's settlement from the response). Dropped before its end (the client went
/// away), it keeps reading the rest in a task of its own — the origin bills the whole call — and
/// settles then.
pub struct Metered {
    inner: Option<crate::Body>,
    kept: Kept,
    cap: usize,
    on_end: Option<OnEnd>,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered").field("kept", &self.kept.head.len()).field("cap", &self.cap).finish_non_exhaustive()
    }
}

impl Metered {
    pub fn new(inner: crate::Body, cap: usize, on_end: OnEnd) -> Metered {
        Metered { inner: Some(inner), kept: Kept::default(), cap, on_end: Some(on_end) }
    }

    fn finish(&mut self, how: Ended) {
        if let Some(f) = self.on_end.take() {
            let fut = f(std::mem::take(&mut self.kept).into_bytes(self.cap), how);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(fut);
            }
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.kept.push(this.cap, d);
                }
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.finish(Ended::Complete);
            }
            Poll::Ready(Some(Err(_))) => {
                this.inner = None;
                this.finish(Ended::Failed);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let (Some(mut inner), Some(on_end)) = (self.inner.take(), self.on_end.take()) else { return };
        let (mut kept, cap) = (std::mem::take(&mut self.kept), self.cap);
        let Ok(h) = tokio::runtime::Handle::try_current() else { return };
        h.spawn(async move {
            use http_body_util::BodyExt as _;
            let how = loop {
                match inner.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(d) = frame.data_ref() {
                            kept.push(cap, d);
                        }
                    }
                    Some(Err(_)) => break Ended::Failed,
                    None => break Ended::Complete,
                }
            };
            on_end(kept.into_bytes(cap), how).await;
        });
    }
}

/// Where a finished request's record goes: the access log, the span exporter, or both.
#[derive(Debug, Clone)]
pub struct Sinks {
    pub log: Option<std::sync::Arc<crate::observe::AccessLog>>,
    pub spans: Option<std::sync::Arc<crate::observe::SpanExporter>>,
}

type AccessRecord = (Sinks, Box<crate::observe::Record>, Option<std::sync::Arc<AtomicU64>>);

/// Where a `Counting` body's data bytes go.
pub trait Tally {
    fn add(&mut self, n: u64);
}

/// A request body's bytes, into a shared count (the access log's `bytes_in`).
impl Tally for std::sync::Arc<AtomicU64> {
    fn add(&mut self, n: u64) {
        self.fetch_add(n, Ordering::Relaxed);
    }
}

/// The completion of a request (phase 9), owned by its response body: when the body is dropped
/// — it ended, failed, or a client that went away dropped it — the bytes really sent go into
/// `weir_response_bytes_total` and, when the access log or span export is on, the request's
/// line and span are written with the whole duration.
pub struct Completion {
    started: std::time::Instant,
    sent: u64,
    bytes: prometheus_client::metrics::counter::Counter,
    record: Option<AccessRecord>,
}

impl Completion {
    pub fn new(
        started: std::time::Instant,
        bytes: prometheus_client::metrics::counter::Counter,
        record: Option<AccessRecord>,
    ) -> Completion {
        Completion { started, sent: 0, bytes, record }
    }
}

impl Tally for Completion {
    fn add(&mut self, n: u64) {
        self.sent += n;
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.bytes.inc_by(self.sent);
        if let Some((sinks, mut r, bytes_in)) = self.record.take() {
            r.duration = self.started.elapsed();
            r.bytes_out = self.sent;
            r.bytes_in = bytes_in.map_or(0, |n| n.load(Ordering::Relaxed));
            if let Some(spans) = &sinks.spans {
                spans.export(&r);
            }
            if let Some(log) = &sinks.log {
                log.log(r);
            }
        }
    }
}

pin_project! {
    /// A body passed through unchanged while its data bytes are counted into `tally`.
    pub struct Counting<B, T> {
        #[pin]
        inner: B,
        tally: T,
    }
}

impl<B, T> Counting<B, T> {
    pub fn new(inner: B, tally: T) -> Self {
        Counting { inner, tally }
    }
}

impl<B, T> Body for Counting<B, T>
where
    B: Body<Data = Bytes>,
    T: Tally,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                this.tally.add(d.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's request body: what hyper read, or none at all (an admin warm-up).
#[derive(Debug)]
pub enum ClientBody {
    Incoming(hyper::body::Incoming),
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Incoming(b) => b.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Incoming(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::Kept;

    fn kept(cap: usize, chunks: &[&str]) -> String {
        let mut k = Kept::default();
        for c in chunks {
            k.push(cap, c.as_bytes());
        }
        String::from_utf8(k.into_bytes(cap)).unwrap_or_default()
    }

    #[test]
    fn a_body_within_the_cap_is_kept_whole() {
        assert_eq!(kept(64, &["{\"usage\":", " 1}"]), "{\"usage\": 1}");
    }

    #[test]
    fn a_long_stream_keeps_whole_events_from_its_head_and_its_tail() {
        let mut chunks = vec!["data: first\n\n".to_string(), "data: second-is-cut".to_string()];
        chunks.extend((0..100).map(|i| format!(" filler {i}\n\ndata: x")));
        chunks.push("\n\ndata: {\"usage\": 7}\n\ndata: [DONE]\n\n".to_string());
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let out = kept(40, &refs);
        assert!(out.starts_with("data: first\n\n"), "{out:?}");
        assert!(!out.contains("second-is-cut"), "{out:?}");
        assert!(out.ends_with("data: {\"usage\": 7}\n\ndata: [DONE]\n\n"), "{out:?}");
        // CRLF events count too; a body with no event boundary keeps nothing past the cap.
        let crlf = ["data: a\r\n\r\n", "data: filler-filler-filler\r\n\r\n", "data: z\r\n\r\n"];
        assert_eq!(kept(12, &crlf), "data: a\r\n\r\ndata: z\r\n\r\n");
        assert_eq!(kept(4, &["{\"usage\": {\"a\": 1}}"]), "");
    }
}
