//! What operators see of each request: its id (`X-Request-Id`), its W3C trace context
//! (`traceparent`, `tracestate`) and its access-log line.
//!
//! The access log is written off the request path: a request hands a plain record to a bounded
//! queue (`try_send`, never waiting) and one writer thread formats and writes the lines. A slow
//! disk fills the queue; what does not fit is dropped and counted
//! (`weir_access_log_dropped_total`), never waited for.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Method};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Longest client-supplied request id kept (Envoy's and nginx's ids are 32–36 bytes).
const MAX_REQUEST_ID: usize = 128;

/// A request's identity: its id and its trace context, with Weir's own span.
#[derive(Debug, Clone)]
pub struct Ids {
    pub request_id: HeaderValue,
    /// The trace, made at once only when a log line or a span will name it; otherwise the
    /// request's context makes it if the request goes upstream (`RequestCtx::trace`): a hit
    /// never pays for it.
    pub trace: Option<Trace>,
}

impl Ids {
    /// The id from a trusted peer's `X-Request-Id` when it is printable and short, else a new
    /// one; with `trace`, the trace now (`Trace::of`).
    pub fn of(headers: &HeaderMap, trusted: bool, trace: Option<bool>) -> Ids {
        let trace = trace.map(|sample_new| Trace::of(headers, sample_new));
        // Only a trusted peer's id is kept: nobody else's is looked up.
        let kept = trusted
            .then(|| headers.get(&X_REQUEST_ID))
            .flatten()
            .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.as_bytes().iter().all(|b| b.is_ascii_graphic()))
            .cloned();
        let request_id = kept.unwrap_or_else(|| {
            let buf = crate::hex::u128_digits(fastrand::u128(..));
            // Owned, not copied into a `Vec`: the response and the upstream head share it
            // without the first clone allocating.
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
                .unwrap_or_else(|_| HeaderValue::from_static("0"))
        });
        Ids { request_id, trace }
    }
}

impl Trace {
    /// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, Weir's span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        header_value(&self.text())
    }

    fn text(&self) -> [u8; 55] {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        buf[3..35].copy_from_slice(&crate::hex::u128_digits(self.trace_id));
        buf[35] = b'-';
        buf[36..52].copy_from_slice(&crate::hex::u64_digits(self.span_id));
        buf[52] = b'-';
        hex_into(&mut buf[53..55], &[self.flags]);
        buf
    }
}

/// Hex text as a header value (always valid; the fallback is never taken).
fn header_value(hex: &[u8]) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(hex)).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
    }
}

/// W3C Trace Context: the trace Weir's span belongs to, Weir's span id (the parent of the
/// upstream hop), and the flags passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span, when the trace was continued.
    pub parent_id: Option<u64>,
    pub flags: u8,
}

impl Trace {
    /// The trace continued from a valid `traceparent`, else a new one — sampled when
    /// `sample_new` (Weir starts the trace and records its span: it says so downstream).
    pub fn of(headers: &HeaderMap, sample_new: bool) -> Trace {
        let span_id = nonzero_u64();
        match headers.get(&TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes())) {
            Some((trace_id, parent, flags)) => Trace { trace_id, span_id, parent_id: Some(parent), flags },
            None => Trace { trace_id: nonzero_u128(), span_id, parent_id: None, flags: u8::from(sample_new) },
        }
    }
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

fn nonzero_u128() -> u128 {
    fastrand::u128(1..)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `version-traceid-parentid-flags` (W3C Trace Context §3.2): lower-case hex; an all-zero trace
/// or parent id, version `ff`, or a version-00 value with anything after the flags is invalid.
/// A later version is read by its first four fields, as the spec asks.
fn parse_traceparent(v: &[u8]) -> Option<(u128, u64, u8)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let lower_hex = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let version = s.get(0..2)?;
    if !lower_hex(version) || version == "ff" || s.len() < 55 {
        return None;
    }
    if (version == "00" && s.len() != 55) || (s.len() > 55 && s.as_bytes()[55] != b'-') {
        return None;
    }
    let (d1, trace, d2, parent, d3, flags) = (&s[2..3], &s[3..35], &s[35..36], &s[36..52], &s[52..53], &s[53..55]);
    if d1 != "-" || d2 != "-" || d3 != "-" || !lower_hex(trace) || !lower_hex(parent) || !lower_hex(flags) {
        return None;
    }
    let trace = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
    let parent = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    Some((trace, parent, u8::from_str_radix(flags, 16).ok()?))
}

/// `log.access.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
    Off,
}

/// `log.access.to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// `log:` — read at start; a reload reopens the access-log file (for log rotation).
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: Format,
    pub to: Sink,
    /// Keep the query string in `path`.
    pub query: bool,
    /// Lines queued for the writer before new ones are dropped.
    pub buffer: usize,
    /// The `tracing` filter when `WEIR_LOG` is unset.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { format: Format::Json, to: Sink::Stdout, query: false, buffer: 16_384, level: "info".into() }
    }
}

/// One finished request, as the writer thread formats it.
#[derive(Debug)]
pub struct Record {
    pub ts: SystemTime,
    pub request_id: HeaderValue,
    pub route: Option<Arc<String>>,
    pub method: Method,
    pub authority: String,
    pub path: String,
    pub status: u16,
    /// The `Cache-Status` value, reduced to its outcome when written.
    pub cache: Option<HeaderValue>,
    pub upstream: Option<String>,
    pub upstream_status: Option<u16>,
    pub upstream_time: Option<Duration>,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub client_ip: Option<IpAddr>,
    pub consumer: Option<String>,
    pub tls: Option<&'static str>,
    /// Weir's error code, for responses Weir produced.
    pub error: Option<&'static str>,
    /// The request's trace: the line's `traceparent`, and the span exporter's.
    pub trace: Trace,
}

/// The process's access log: the queue's sending side and what the writer needs to know.
#[derive(Debug)]
pub struct AccessLog {
    tx: SyncSender<Box<Record>>,
    pub query: bool,
    dropped: prometheus_client::metrics::counter::Counter,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Starts the writer thread; `None` when the access log is off. A file that cannot be
    /// opened is an error (the configuration named it).
    pub fn start(
        s: &LogSettings,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> std::io::Result<Option<Arc<AccessLog>>> {
        if s.format == Format::Off {
            return Ok(None);
        }
        let out = open(&s.to)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(s.buffer.max(1));
        let reopen = Arc::new(AtomicBool::new(false));
        let (format, to, flag) = (s.format, s.to.clone(), reopen.clone());
        std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || write_lines(&rx, out, format, &to, &flag))?;
        Ok(Some(Arc::new(AccessLog { tx, query: s.query, dropped, reopen })))
    }

    /// Queues a line's record; a full queue drops it (counted), it never waits. The record
    /// stays boxed as it was built: moving a `Record` by value through the queue copied it twice.
    pub fn log(&self, r: Box<Record>) {
        if self.tx.try_send(r).is_err() {
            self.dropped.inc();
        }
    }

    /// The file is opened again before the next line (after `logrotate` moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

fn open(to: &Sink) -> std::io::Result<Box<dyn std::io::Write + Send>> {
    Ok(match to {
        Sink::Stdout => Box::new(std::io::stdout()),
        Sink::Stderr => Box::new(std::io::stderr()),
        Sink::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
    })
}

/// How long the writer sleeps when the queue is empty. It polls instead of blocking on the
/// queue: a blocked receiver makes every request's `try_send` wake it (a futex call and a
/// context switch per line, measured at half the L1-hit throughput); a sleeping one is woken
/// by nobody and drains a batch per tick.
const WRITER_TICK: Duration = Duration::from_millis(20);

/// The writer thread: each tick drains the queue into a 64 KiB buffer and flushes it.
fn write_lines(
    rx: &Receiver<Box<Record>>,
    out: Box<dyn std::io::Write + Send>,
    format: Format,
    to: &Sink,
    reopen: &AtomicBool,
) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    let mut line: Vec<u8> = Vec::with_capacity(512);
    let mut stamps = crate::clock::Rfc3339Ms::default();
    loop {
        if reopen.swap(false, Ordering::Relaxed) {
            let _ = out.flush();
            match open(to) {
                Ok(w) => out = std::io::BufWriter::with_capacity(64 << 10, w),
                Err(e) => tracing::warn!(error = %e, "cannot reopen the access log; writing to the old file"),
            }
        }
        loop {
            match rx.try_recv() {
                Ok(r) => {
                    line.clear();
                    match format {
                        Format::Text => {
                            let mut text = String::with_capacity(256);
                            text_line(&r, &mut text);
                            line.extend_from_slice(text.as_bytes());
                        }
                        _ => json_line(&r, &mut line, &mut stamps),
                    }
                    line.push(b'\n');
                    let _ = out.write_all(&line);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        let _ = out.flush();
        std::thread::sleep(WRITER_TICK);
    }
}

/// `Cache-Status: weir; hit; detail=l1` → `hit`; `weir; fwd=stale; ...` → `stale`.
fn cache_outcome(v: &HeaderValue) -> &[u8] {
    let b = v.as_bytes();
    let Some(start) = b.iter().position(|&c| c == b';') else { return b"" };
    let rest = &b[start + 1..];
    let end = rest.iter().position(|&c| c == b';').unwrap_or(rest.len());
    let first = rest[..end].trim_ascii();
    first.strip_prefix(b"fwd=").unwrap_or(first)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// Milliseconds to three decimals, as `ms(d)` prints (`12`, `0.5`, `3.125`), without `f64`
/// formatting (and in 64-bit arithmetic: `as_nanos` is a `u128`, whose division is a call).
fn push_ms(out: &mut Vec<u8>, d: Duration) {
    let us = d.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(d.subsec_nanos() + 500) / 1000);
    push_int(out, us / 1000);
    let frac = us % 1000;
    if frac != 0 {
        let mut digits = *b".000";
        crate::clock::fixed_digits(&mut digits[1..], frac);
        let keep = if frac.is_multiple_of(100) {
            2
        } else if frac.is_multiple_of(10) {
            3
        } else {
            4
        };
        out.extend_from_slice(&digits[..keep]);
    }
}

fn push_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// An IPv4 address by its octets (a `Display` through `fmt` cost 950 instructions a line).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            push_int(out, a);
            for o in [b, c, d] {
                out.push(b'.');
                push_int(out, o);
            }
        }
        IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
}

/// A header value's text: itself when it is visible ASCII (always, for the ones Weir makes),
/// else lossily.
fn header_text(v: &HeaderValue) -> std::borrow::Cow<'_, str> {
    match v.to_str() {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(v.as_bytes()),
    }
}

/// One JSON object, written by hand into a reused buffer: the writer thread shares the server's
/// cores, and building a `serde_json::Value` per line cost more than the request it logs.
/// Numbers, the timestamp and IPv4 addresses are written without `fmt`.
fn json_line(r: &Record, out: &mut Vec<u8>, stamps: &mut crate::clock::Rfc3339Ms) {
    out.extend_from_slice(b"{\"ts\":\"");
    stamps.push(out, r.ts);
    out.extend_from_slice(b"\",\"request_id\":");
    json_bytes(out, r.request_id.as_bytes());
    out.extend_from_slice(b",\"route\":");
    json_opt(out, r.route.as_deref().map(String::as_str));
    out.extend_from_slice(b",\"method\":");
    json_str(out, r.method.as_str());
    out.extend_from_slice(b",\"authority\":");
    json_str(out, &r.authority);
    out.extend_from_slice(b",\"path\":");
    json_str(out, &r.path);
    out.extend_from_slice(b",\"status\":");
    push_int(out, r.status);
    out.extend_from_slice(b",\"cache\":");
    match &r.cache {
        Some(v) => json_bytes(out, cache_outcome(v)),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"upstream\":");
    json_opt(out, r.upstream.as_deref());
    out.extend_from_slice(b",\"upstream_status\":");
    match r.upstream_status {
        Some(s) => push_int(out, s),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"duration_ms\":");
    push_ms(out, r.duration);
    out.extend_from_slice(b",\"upstream_ms\":");
    match r.upstream_time {
        Some(t) => push_ms(out, t),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"bytes_in\":");
    push_int(out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    push_int(out, r.bytes_out);
    out.extend_from_slice(b",\"client_ip\":");
    match r.client_ip {
        Some(ip) => {
            out.push(b'"');
            push_ip(out, ip);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"consumer\":");
    json_opt(out, r.consumer.as_deref());
    out.extend_from_slice(b",\"tls\":");
    json_opt(out, r.tls);
    out.extend_from_slice(b",\"traceparent\":");
    out.push(b'"');
    out.extend_from_slice(&r.trace.text());
    out.push(b'"');
    out.extend_from_slice(b",\"error\":");
    json_opt(out, r.error);
    out.push(b'}');
}

fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Whether any byte is a control character, `"` or `\\`: eight bytes at a time (SWAR: a byte
/// below `n` leaves its high bit set in `(x - n·0x01…) & !x & 0x80…`; a byte equal to `c` is a
/// zero byte of `x ^ c·0x01…`), the rest one by one. Exact, not approximate: a hit is only
/// ever a real one.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let mut words = bytes.chunks_exact(8);
    for w in words.by_ref() {
        let x = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        if x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0 || zero_byte(x ^ (ONES * 0x22)) || zero_byte(x ^ (ONES * 0x5c))
        {
            return true;
        }
    }
    words.remainder().iter().any(|&b| escapes(b))
}

/// A byte a JSON string cannot hold as it is: a control character, `"` or `\\`.
fn escapes(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// A JSON string (RFC 8259 §7): quotes, backslashes and control characters escaped. The runs
/// between them are copied whole (most strings have none).
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    if !needs_escape(s.as_bytes()) {
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    let b = s.as_bytes();
    let mut from = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            c if c < 0x20 => b"",
            _ => continue,
        };
        out.extend_from_slice(&b[from..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 15)]);
        } else {
            out.extend_from_slice(esc);
        }
        from = i + 1;
    }
    out.extend_from_slice(&b[from..]);
    out.push(b'"');
}

/// A header value as a JSON string: copied as it is when it is ASCII with nothing to escape
/// (the ids and statuses Weir makes always are), else as its text read lossily.
fn json_bytes(out: &mut Vec<u8>, b: &[u8]) {
    if b.is_ascii() && !needs_escape(b) {
        out.push(b'"');
        out.extend_from_slice(b);
        out.push(b'"');
    } else {
        json_str(out, &String::from_utf8_lossy(b));
    }
}

/// `ts request_id client_ip "METHOD authority path" status cache duration_ms bytes_out route
/// consumer error`, `-` for what is absent.
fn text_line(r: &Record, out: &mut String) {
    use std::fmt::Write as _;
    let dash = |o: Option<&str>| o.unwrap_or("-").to_string();
    let _ = write!(
        out,
        "{} {} {} \"{} {} {}\" {} {} {:.3} {} {} {} {}",
        crate::clock::rfc3339_ms(r.ts),
        header_text(&r.request_id),
        r.client_ip.map_or_else(|| "-".to_string(), |ip| ip.to_string()),
        r.method,
        r.authority,
        r.path.escape_default(),
        r.status,
        dash(r.cache.as_ref().map(|v| std::str::from_utf8(cache_outcome(v)).unwrap_or(""))),
        ms(r.duration),
        r.bytes_out,
        dash(r.route.as_deref().map(String::as_str).filter(|s| !s.is_empty())),
        dash(r.consumer.as_deref()),
        dash(r.error),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_rules() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse_traceparent(ok), Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1)));
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version: the first four fields count, more may follow.
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever").is_some());
    }

    #[test]
    fn ids_trust_only_trusted_peers() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(Ids::of(&h, true, None).request_id, "abc-123");
        let own = Ids::of(&h, false, None).request_id;
        assert_ne!(own, "abc-123");
        assert_eq!(own.len(), 32);
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(Ids::of(&h, true, None).request_id, "has space");
    }

    #[test]
    fn traceparent_continues_the_trace_with_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let trace = Trace::of(&h, false);
        let tp = trace.traceparent();
        let tp = tp.to_str().unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"), "{tp}");
        assert_eq!(parse_traceparent(tp.as_bytes()).map(|t| t.1), Some(trace.span_id));
        assert_ne!(trace.span_id, 0x00f067aa0ba902b7);
        assert_eq!(trace.parent_id, Some(0x00f067aa0ba902b7));
        let fresh = Trace::of(&HeaderMap::new(), false);
        assert!(parse_traceparent(fresh.traceparent().as_bytes()).is_some());
        assert_eq!(fresh.flags, 0);
        assert_eq!(Trace::of(&HeaderMap::new(), true).flags, 1, "a trace Weir starts and records is sampled");
        assert_eq!(Trace::of(&h, true).flags, 1, "a continued trace keeps the caller's flags");
    }

    #[test]
    fn numbers_strings_and_addresses_are_written_as_fmt_and_serde_would() {
        for us in [0u64, 1, 499, 500, 999, 1000, 1500, 1050, 1005, 12_345, 3_000_000, 86_400_000_123] {
            for extra_ns in [0u64, 499, 501] {
                let d = Duration::from_nanos(us * 1000 + extra_ns);
                let mut out = Vec::new();
                push_ms(&mut out, d);
                assert_eq!(String::from_utf8(out).unwrap(), ms(d).to_string(), "{d:?}");
            }
        }
        for s in ["", "plain", "a\"b", "back\\slash", "ctl\u{1}\n\t", "ünïcødé \u{7f} ✓", "\"\"\\"] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s, "{s:?}");
            let mut out = Vec::new();
            json_bytes(&mut out, s.as_bytes());
            assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s, "{s:?}");
        }
        // A header value with obs-text (not UTF-8) is still a JSON string.
        let mut out = Vec::new();
        json_bytes(&mut out, b"caf\xe9");
        assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), "caf\u{fffd}");
        // Every byte value at every position of a word: the word-at-a-time test agrees with the
        // byte-at-a-time one.
        for b in 0..=255u8 {
            for at in 0..17 {
                let mut v = vec![b'a'; 17];
                v[at] = b;
                assert_eq!(needs_escape(&v), b < 0x20 || b == b'"' || b == b'\\', "byte {b:#x} at {at}");
            }
        }
        for ip in ["0.0.0.0", "198.51.100.7", "255.255.255.255", "::1", "2001:db8::7"] {
            let mut out = Vec::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip.as_bytes());
        }
    }

    #[test]
    fn json_lines_parse_whatever_the_fields_hold() {
        let r = Record {
            ts: SystemTime::UNIX_EPOCH,
            request_id: HeaderValue::from_static("id"),
            route: Some(Arc::new("r".into())),
            method: Method::GET,
            authority: "a\"b".into(),
            path: "/p\\q\u{1}\u{e9}".into(),
            status: 200,
            cache: Some(HeaderValue::from_static("weir; fwd=miss; stored")),
            upstream: None,
            upstream_status: Some(200),
            duration: Duration::from_micros(1500),
            upstream_time: None,
            bytes_in: 1,
            bytes_out: 2,
            client_ip: Some(IpAddr::from([127, 0, 0, 1])),
            consumer: None,
            tls: Some("TLSv1.3"),
            error: None,
            trace: Trace { trace_id: 1, span_id: 2, parent_id: None, flags: 1 },
        };
        let mut line = Vec::new();
        json_line(&r, &mut line, &mut crate::clock::Rfc3339Ms::default());
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["authority"], "a\"b");
        assert_eq!(v["path"], "/p\\q\u{1}\u{e9}");
        assert_eq!(v["cache"], "miss");
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["upstream"], serde_json::Value::Null);
        assert_eq!(v["client_ip"], "127.0.0.1");
    }

    #[test]
    fn timestamps() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_691_670_123);
        assert_eq!(crate::clock::rfc3339_ms(t), "2025-12-02T16:07:50.123Z");
    }
}

/// `tracing: {otlp, service_name}`: where spans go (OTLP/HTTP, JSON encoding), when set.
#[derive(Debug, Clone)]
pub struct TraceSettings {
    /// The collector's base URL (`http://collector:4318`); spans are POSTed to `/v1/traces`.
    pub otlp: url::Url,
    pub service_name: String,
}

/// One server span per request, sent to an OTLP/HTTP collector in batches from a background
/// task. Written by hand rather than with `opentelemetry-otlp`: the span is already complete
/// in the access record (ids, times, status), the JSON encoding of OTLP is a stable wire
/// format, and the SDK would add a second tracing pipeline, its own HTTP client stack and some
/// forty crates to a data path that needs one `try_send`.
#[derive(Debug)]
pub struct SpanExporter {
    tx: tokio::sync::mpsc::Sender<serde_json::Value>,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// Spans per export request, and the longest a span waits for its batch.
const SPAN_BATCH: usize = 512;
const SPAN_FLUSH: Duration = Duration::from_secs(1);

impl SpanExporter {
    /// Starts the export task (inside the runtime).
    pub fn start(s: &TraceSettings, dropped: prometheus_client::metrics::counter::Counter) -> Arc<SpanExporter> {
        let (tx, rx) = tokio::sync::mpsc::channel(8192);
        let endpoint = s.otlp.join("v1/traces").unwrap_or_else(|_| s.otlp.clone());
        tokio::spawn(export(rx, endpoint, s.service_name.clone(), dropped.clone()));
        Arc::new(SpanExporter { tx, dropped })
    }

    /// Queues the request's span when its trace is sampled; a full queue drops it (counted).
    pub fn export(&self, r: &Record) {
        let trace = r.trace;
        if trace.flags & 1 != 1 {
            return;
        }
        let nanos = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos().to_string();
        let attr = |k: &str, v: serde_json::Value| serde_json::json!({"key": k, "value": v});
        let s = |v: &str| serde_json::json!({"stringValue": v});
        let i = |v: u64| serde_json::json!({"intValue": v.to_string()});
        let mut attributes = vec![
            attr("http.request.method", s(r.method.as_str())),
            attr("url.path", s(&r.path)),
            attr("server.address", s(&r.authority)),
            attr("http.response.status_code", i(u64::from(r.status))),
            attr("http.response.body.size", i(r.bytes_out)),
        ];
        if let Some(route) = &r.route {
            attributes.push(attr("http.route", s(route)));
        }
        if let Some(c) = r.cache.as_ref().map(cache_outcome) {
            attributes.push(attr("weir.cache", s(std::str::from_utf8(c).unwrap_or(""))));
        }
        if let Some(ip) = r.client_ip {
            attributes.push(attr("client.address", s(&ip.to_string())));
        }
        if let Some(c) = &r.consumer {
            attributes.push(attr("weir.consumer", s(c)));
        }
        if let Some(u) = &r.upstream {
            attributes.push(attr("weir.upstream", s(u)));
        }
        if let Some(code) = r.error {
            attributes.push(attr("error.type", s(code)));
        }
        let mut span = serde_json::json!({
            "traceId": format!("{:032x}", trace.trace_id),
            "spanId": format!("{:016x}", trace.span_id),
            "name": format!("{} {}", r.method, r.route.as_deref().map_or("", String::as_str)).trim().to_string(),
            "kind": 2,
            "startTimeUnixNano": nanos(r.ts),
            "endTimeUnixNano": nanos(r.ts + r.duration),
            "attributes": attributes,
            "status": {"code": if r.status >= 500 { 2 } else { 0 }},
        });
        if let Some(p) = trace.parent_id {
            span["parentSpanId"] = format!("{p:016x}").into();
        }
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

async fn export(
    mut rx: tokio::sync::mpsc::Receiver<serde_json::Value>,
    endpoint: url::Url,
    service: String,
    dropped: prometheus_client::metrics::counter::Counter,
) {
    use http_body_util::BodyExt as _;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut batch = Vec::with_capacity(SPAN_BATCH);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + SPAN_FLUSH;
        while batch.len() < SPAN_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let doc = serde_json::json!({"resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{"scope": {"name": "weir", "version": env!("CARGO_PKG_VERSION")}, "spans": std::mem::take(&mut batch)}],
        }]});
        let req = http::Request::post(endpoint.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(doc.to_string())));
        let Ok(req) = req else { continue };
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                let _ = resp.into_body().collect().await;
            }
            Ok(Ok(resp)) => {
                tracing::debug!(status = %resp.status(), "the OTLP collector refused a batch of spans");
                dropped.inc_by(n);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot reach the OTLP collector");
                dropped.inc_by(n);
            }
            Err(_) => {
                dropped.inc_by(n);
            }
        }
    }
}
