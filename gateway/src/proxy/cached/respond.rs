//! Phase 5, serving a stored entry: `Age`, conditionals (304), `Range` (206 / 416 from the
//! complete entry), HEAD without a body. Reads the canonical request only.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::CACHE_STATUS;
use crate::cache::entry::Entry;
use crate::observe::X_REQUEST_ID;
use crate::proxy::canonical::Canonical;
use crate::proxy::empty;
use crate::Body;

/// Builds the client's answer from a stored entry: `Age`, `Via`, conditionals (304), `Range`
/// (206/416 from the complete entry), HEAD without body.
pub(super) fn serve_entry(req: &Canonical, e: &Entry, now: SystemTime) -> Response<Body> {
    answer(req, e, now, None, None)
}

/// `serve_entry`, with this response's `Cache-Status` and `X-Request-Id` written too: all three
/// of the answer's own fields go into the slots the fill left for them, in one pass over the
/// stored head (no hashing, no growth).
pub(super) fn answer(
    req: &Canonical,
    e: &Entry,
    now: SystemTime,
    status: Option<HeaderValue>,
    request_id: Option<&HeaderValue>,
) -> Response<Body> {
    let ch = &req.headers;
    let mut headers = e.headers.clone();
    own_fields(&mut headers, age_value(e.age(now).as_secs()), status, request_id);
    let mut resp = Response::new(empty());
    if req.conditional && not_modified(&req.method, ch, e) {
        headers.remove(header::CONTENT_LENGTH);
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.headers_mut() = headers;
        return resp;
    }
    let mut status = e.status;
    let mut body = e.body.clone();
    if req.conditional && req.method == Method::GET && e.status == StatusCode::OK {
        if let Some(range) = ch.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            if if_range_ok(ch, e) {
                let len = e.body.len() as u64;
                match parse_range(range, len) {
                    Some(Ok((start, end))) => {
                        status = StatusCode::PARTIAL_CONTENT;
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end + 1 - start));
                        body = e.body.slice(usize::try_from(start).unwrap_or(0)..usize::try_from(end + 1).unwrap_or(0));
                        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                            headers.insert(header::CONTENT_RANGE, v);
                        }
                    }
                    Some(Err(())) => {
                        status = StatusCode::RANGE_NOT_SATISFIABLE;
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
                        body = Bytes::new();
                        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                            headers.insert(header::CONTENT_RANGE, v);
                        }
                    }
                    None => {}
                }
            }
        }
    }
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if req.method != Method::HEAD {
        *resp.body_mut() = Full::new(body).map_err(|never| match never {}).boxed();
    }
    resp
}

/// Writes `Age` (and `Cache-Status`, `X-Request-Id` when given) over their placeholders; a
/// stored head without a slot (an entry another version stored) gets the field inserted.
fn own_fields(h: &mut HeaderMap, age: HeaderValue, status: Option<HeaderValue>, request_id: Option<&HeaderValue>) {
    let (mut age, mut status, mut request_id) = (Some(age), status, request_id);
    for (name, v) in h.iter_mut() {
        if *name == header::AGE {
            if let Some(a) = age.take() {
                *v = a;
            }
        } else if *name == CACHE_STATUS {
            if let Some(s) = status.take() {
                *v = s;
            }
        } else if *name == X_REQUEST_ID {
            if let Some(id) = request_id.take() {
                v.clone_from(id);
            }
        }
    }
    if let Some(a) = age {
        h.insert(header::AGE, a);
    }
    if let Some(s) = status {
        h.insert(CACHE_STATUS.clone(), s);
    }
    if let Some(id) = request_id {
        h.insert(X_REQUEST_ID.clone(), id.clone());
    }
}

/// `Age` in seconds. The first hour's values are made once and shared (a clone of a static
/// value is a copy): a hit does not format and allocate its `Age`.
fn age_value(secs: u64) -> HeaderValue {
    static SMALL: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let small = SMALL.get_or_init(|| {
        (0..3600u64).map(|n| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str()))).collect()
    });
    usize::try_from(secs).ok().and_then(|i| small.get(i)).cloned().unwrap_or_else(|| HeaderValue::from(secs))
}

fn opaque(tag: &str) -> &str {
    tag.trim().trim_start_matches("W/")
}

/// RFC 9110 §13.1.2 / §13.1.3, evaluated against the stored response.
fn not_modified(method: &Method, ch: &HeaderMap, e: &Entry) -> bool {
    if let Some(inm) = ch.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        if inm.trim() == "*" {
            return true;
        }
        let Some(etag) = e.etag().and_then(|v| v.to_str().ok()) else { return false };
        return inm.split(',').any(|t| opaque(t) == opaque(etag));
    }
    if matches!(*method, Method::GET | Method::HEAD) {
        let ims = ch
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| httpdate::parse_http_date(s).ok());
        // RFC 9111 §4.3.2: without Last-Modified, the stored response's Date (else the time it
        // was received) is when it last changed, as far as the cache knows.
        let date = |v: Option<&http::HeaderValue>| {
            v.and_then(|v| v.to_str().ok()).and_then(|s| httpdate::parse_http_date(s).ok())
        };
        if let Some(ims) = ims {
            let lm = date(e.last_modified()).or_else(|| date(e.headers.get(header::DATE))).unwrap_or(e.stored_at);
            return lm <= ims;
        }
    }
    false
}

fn if_range_ok(ch: &HeaderMap, e: &Entry) -> bool {
    let Some(ir) = ch.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else { return true };
    let ir = ir.trim();
    if ir.starts_with('"') {
        // Strong comparison: a weak stored ETag never matches.
        e.etag().and_then(|v| v.to_str().ok()).is_some_and(|t| t.trim() == ir)
    } else {
        e.last_modified().and_then(|v| v.to_str().ok()).is_some_and(|lm| lm.trim() == ir)
    }
}

/// One byte range against a body of `len`: `None` when absent, multiple or unparseable (the
/// full response is served), `Some(Err)` when unsatisfiable (416).
fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.trim().split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end: u64 =
            if b.is_empty() { len.saturating_sub(1) } else { b.parse::<u64>().ok()?.min(len.saturating_sub(1)) };
        if start >= len || end < start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(range))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=95-200", 100), Some(Ok((95, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
