//! Compact binary encoding of cache objects for the shared tier. Version-tagged, length-prefixed,
//! bounds-checked on read: a corrupt or foreign value is an error (a miss), never a panic.
//!
//! Layout (integers little-endian, `str` = u32 length + bytes):
//! `"W1"`, kind (0 response, 1 vary), key, path, then
//! response: status u16, stored_at ms u64 (Unix), initial_age / fresh_for / swr / sie ms u64,
//! flags u8, vary names (u16 n × str), tags (u16 n × str), headers (u16 n × (str, str)), body;
//! vary: expires_at ms u64, header names (u16 n × str).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use super::entry::{Entry, Object};

const MAGIC: &[u8; 2] = b"W1";
const FLAG_REVALIDATE_ALWAYS: u8 = 1;
const FLAG_STALE_FORBIDDEN: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[error("undecodable cache value: {0}")]
pub struct DecodeError(&'static str);

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

use crate::clock::unix_ms;

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn count(&mut self, n: usize) {
        self.u16(u16::try_from(n).unwrap_or(u16::MAX));
    }
}

/// Encodes `obj` stored under `key`. `None` when it cannot be represented (more than 65535
/// headers or tags): such an object stays in L1 only.
pub fn encode(key: &str, obj: &Object) -> Option<Vec<u8>> {
    let mut w = Writer(Vec::with_capacity(obj.weight() + 64));
    w.0.extend_from_slice(MAGIC);
    match obj {
        Object::Response(e) => {
            if e.headers.len() > usize::from(u16::MAX) || e.tags.len() > usize::from(u16::MAX) {
                return None;
            }
            w.u8(0);
            w.bytes(key.as_bytes());
            w.bytes(e.path.as_bytes());
            w.u16(e.status.as_u16());
            w.u64(unix_ms(e.stored_at));
            for d in [e.initial_age, e.fresh_for, e.stale_while_revalidate, e.stale_if_error] {
                w.u64(ms(d));
            }
            let mut flags = 0;
            if e.revalidate_always {
                flags |= FLAG_REVALIDATE_ALWAYS;
            }
            if e.stale_forbidden {
                flags |= FLAG_STALE_FORBIDDEN;
            }
            w.u8(flags);
            w.count(e.vary.len());
            for h in e.vary.iter() {
                w.bytes(h.as_str().as_bytes());
            }
            w.count(e.tags.len());
            for t in &e.tags {
                w.bytes(t.as_bytes());
            }
            w.count(e.headers.len());
            for (k, v) in &e.headers {
                w.bytes(k.as_str().as_bytes());
                w.bytes(v.as_bytes());
            }
            w.bytes(&e.body);
        }
        Object::Vary { headers, path, retain_for } => {
            w.u8(1);
            w.bytes(key.as_bytes());
            w.bytes(path.as_bytes());
            w.u64(unix_ms(SystemTime::now() + *retain_for));
            w.count(headers.len());
            for h in headers.iter() {
                w.bytes(h.as_str().as_bytes());
            }
        }
    }
    Some(w.0)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or(DecodeError("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        self.take(usize::try_from(n).map_err(|_| DecodeError("length"))?)
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError("not UTF-8"))
    }
    fn name(&mut self) -> Result<HeaderName, DecodeError> {
        HeaderName::from_bytes(self.bytes()?).map_err(|_| DecodeError("header name"))
    }
    fn names(&mut self) -> Result<Arc<[HeaderName]>, DecodeError> {
        let n = self.u16()?;
        (0..n).map(|_| self.name()).collect()
    }
}

/// Decodes a value stored under `key`; `Ok(None)` when it belongs to another key (a hash
/// collision, or a value written by something else): the full key is compared on every read.
/// Longest lifetime a decoded entry may claim (RFC 9111's 2^31 s cap on delta-seconds): hostile
/// bytes must not make later `Duration` arithmetic overflow.
const MAX_LIFETIME_MS: u64 = (1 << 31) * 1000;

fn lifetime(ms: u64) -> Result<Duration, DecodeError> {
    if ms > MAX_LIFETIME_MS {
        return Err(DecodeError("lifetime out of range"));
    }
    Ok(Duration::from_millis(ms))
}

fn instant(ms: u64) -> Result<SystemTime, DecodeError> {
    if ms > MAX_LIFETIME_MS * 4 {
        return Err(DecodeError("time out of range"));
    }
    UNIX_EPOCH.checked_add(Duration::from_millis(ms)).ok_or(DecodeError("time out of range"))
}

pub fn decode(key: &str, value: &[u8]) -> Result<Option<Object>, DecodeError> {
    let mut r = Reader { buf: value, at: 0 };
    if r.take(2)? != MAGIC {
        return Err(DecodeError("unknown format"));
    }
    let kind = r.u8()?;
    if r.bytes()? != key.as_bytes() {
        return Ok(None);
    }
    let path = r.str()?.to_string();
    match kind {
        0 => {
            let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError("status"))?;
            let stored_at = instant(r.u64()?)?;
            let initial_age = lifetime(r.u64()?)?;
            let fresh_for = lifetime(r.u64()?)?;
            let stale_while_revalidate = lifetime(r.u64()?)?;
            let stale_if_error = lifetime(r.u64()?)?;
            let flags = r.u8()?;
            let vary = r.names()?;
            let n = r.u16()?;
            let tags = (0..n).map(|_| r.str().map(str::to_string)).collect::<Result<Vec<_>, _>>()?;
            let n = r.u16()?;
            let mut pairs = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let k = r.name()?;
                let v = r.bytes()?;
                HeaderValue::from_bytes(v).map_err(|_| DecodeError("header value"))?;
                pairs.push((k, v));
            }
            let headers = super::entry::compact_headers(&pairs);
            let body = Bytes::copy_from_slice(r.bytes()?);
            Ok(Some(Object::Response(Arc::new(Entry {
                key: key.to_string(),
                status,
                headers,
                body,
                stored_at,
                initial_age,
                fresh_for,
                stale_while_revalidate,
                stale_if_error,
                revalidate_always: flags & FLAG_REVALIDATE_ALWAYS != 0,
                stale_forbidden: flags & FLAG_STALE_FORBIDDEN != 0,
                tags,
                path,
                vary,
            }))))
        }
        1 => {
            let expires = instant(r.u64()?)?;
            let headers = r.names()?;
            let retain_for = expires.duration_since(SystemTime::now()).unwrap_or_default();
            Ok(Some(Object::Vary { headers, path, retain_for }))
        }
        _ => Err(DecodeError("unknown kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            key: "GET|http|example.com|/p/1".into(),
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
            stored_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            initial_age: Duration::from_secs(3),
            fresh_for: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(7),
            revalidate_always: false,
            stale_forbidden: true,
            tags: vec!["product:1".into(), "products".into()],
            path: "/p/1".into(),
            vary: Arc::from(vec![HeaderName::from_static("accept-encoding")]),
        }
    }

    #[test]
    fn response_round_trips() {
        let e = entry();
        let bytes = encode(&e.key, &Object::Response(Arc::new(e.clone()))).expect("encodable");
        let Ok(Some(Object::Response(d))) = decode(&e.key, &bytes) else { panic!("decodes") };
        assert_eq!(d.status, e.status);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.body, e.body);
        assert_eq!(d.stored_at, e.stored_at);
        assert_eq!((d.initial_age, d.fresh_for), (e.initial_age, e.fresh_for));
        assert_eq!((d.stale_while_revalidate, d.stale_if_error), (e.stale_while_revalidate, e.stale_if_error));
        assert_eq!((d.revalidate_always, d.stale_forbidden), (false, true));
        assert_eq!(d.tags, e.tags);
        assert_eq!(d.path, e.path);
        assert_eq!(&*d.vary, &*e.vary);
    }

    #[test]
    fn another_key_is_a_miss_and_garbage_is_an_error() {
        let e = entry();
        let bytes = encode(&e.key, &Object::Response(Arc::new(e.clone()))).expect("encodable");
        assert!(matches!(decode("GET|http|example.com|/p/2", &bytes), Ok(None)));
        for cut in [0, 1, 2, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&e.key, &bytes[..cut]).is_err(), "truncated at {cut}");
        }
        assert!(decode(&e.key, b"not an entry at all").is_err());
    }

    #[test]
    fn vary_marker_round_trips_with_remaining_lifetime() {
        let obj = Object::Vary {
            headers: Arc::from(vec![HeaderName::from_static("accept")]),
            path: "/p".into(),
            retain_for: Duration::from_secs(100),
        };
        let bytes = encode("k", &obj).expect("encodable");
        let Ok(Some(Object::Vary { headers, path, retain_for })) = decode("k", &bytes) else { panic!("decodes") };
        assert_eq!(headers[0], "accept");
        assert_eq!(path, "/p");
        assert!(retain_for <= Duration::from_secs(100) && retain_for > Duration::from_secs(98));
    }
}
