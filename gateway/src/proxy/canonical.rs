//! Phase 1, the canonical request: computed once, right after the head is read, and the only
//! view of the request that routing, cache keys, invalidation, plugins and the upstream request
//! read. What one phase sees, every phase sees: the path that is routed is the path that is keyed
//! and the path the origin is asked for; the headers a `Vary` variant is keyed on are the headers
//! the origin receives.
//!
//! The rules (each closes a way to make the cache store one answer where another request reads it):
//! - **scheme** is the listener's. An absolute-form target or an HTTP/2 `:scheme` that says
//!   otherwise is refused (400): a plaintext client must not write `https` entries.
//! - **authority** comes from the absolute-form target or `:authority`, else from `Host`
//!   (RFC 9112 §3.2.2: with an absolute-form target, `Host` is replaced by the target's). No
//!   `Host`, several, one that is not a valid `host[:port]` (userinfo included), or an HTTP/2
//!   `host` that disagrees with `:authority` → 400. It is lower-cased, loses a trailing dot and
//!   the scheme's default port, and is what the origin receives as `Host`.
//! - **path**: unreserved `%XX` decoded (`%41` → `A`), other escapes upper-cased and kept (`%2F`
//!   stays distinct from `/`), dot segments removed (`/public/%2e%2e/admin` is `/admin`, and is
//!   routed as `/admin`). A malformed escape is refused (400), never "close enough".
//! - **query**: escapes normalised as in the path, empty pairs dropped, pairs sorted by parameter
//!   *name* with a stable sort (`?b=1&a=2` = `?a=2&b=1`, but `?id=1&id=2` ≠ `?id=2&id=1`). The
//!   origin is sent exactly this query.
//! - **headers**: hop-by-hop headers and every header `Connection` names are removed (they are
//!   neither forwarded nor part of a `Vary` key); `Host` becomes the authority; override headers
//!   that rewrite the target (`X-Original-URL`, `X-Rewrite-URL`, `X-Host`, `X-Forwarded-Port`,
//!   `X-Forwarded-Scheme`, `X-Forwarded-Server`) are removed unless the peer is a trusted proxy;
//!   identity headers only Weir may set (`Weir-Consumer`, `X-Consumer-*`,
//!   `X-Forwarded-Client-Cert`) are always removed. Method-override headers are kept but noted:
//!   such a request never reads or writes the cache.
//! - **upgrade**: only the protocols in `server.upgrade_protocols` (default `websocket`) are
//!   tunnelled; any other `Upgrade` (`h2c` included) is removed and never forwarded.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Version};

use super::headers::strip_hop_by_hop;
use crate::error::GatewayError;

/// Error: the target cannot be normalised unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed percent-encoding in `{0}`")]
pub struct MalformedTarget(pub String);

/// Headers some frameworks read to rewrite the target: believed only from trusted proxies.
static TARGET_OVERRIDES: [HeaderName; 6] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-server"),
];

/// Identity headers only Weir sets; a client's copy is always removed.
static WEIR_CONSUMER: HeaderName = HeaderName::from_static("weir-consumer");
static CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// The verified client certificate (mTLS), as Weir forwards it.
pub static WEIR_CLIENT_CERT: HeaderName = HeaderName::from_static("weir-client-cert");

/// The one view of a request every phase reads.
#[derive(Debug, Clone)]
pub struct Canonical {
    pub method: Method,
    /// The version the client spoke (for `Via`).
    pub version: Version,
    /// The listener's scheme.
    pub scheme: &'static str,
    /// Normalised `host[:port]`: what routes, keys and the origin's `Host` use.
    pub authority: String,
    /// Normalised `path?query`: what is routed, keyed and forwarded.
    pub path_query: String,
    /// Length of the path part of `path_query`.
    path_len: usize,
    /// Length of the host part of `authority` (routing reads it on every request).
    host_len: usize,
    /// End-to-end request headers as the origin receives them (before Weir adds its forwarding
    /// headers and `Via`). `Host` is the authority.
    pub headers: HeaderMap,
    /// The protocol to tunnel, when the client asked for an allowed upgrade (HTTP/1.1 only).
    pub upgrade: Option<HeaderValue>,
    /// The request carries a method-override header: the cache stays out of it.
    pub method_override: bool,
    /// The head, as received, had a field the cache's request rules read (`Authorization`,
    /// `Cookie`, `Cache-Control`, `Pragma`). Fields are only ever removed from `headers` after,
    /// so when this is false none is there now.
    pub cache_fields: bool,
    /// The head carried `Weir-Debug` (phase 1 takes it out of `headers`).
    pub debug_header: bool,
    /// The head had a conditional or range field (`If-None-Match`, `If-Modified-Since`,
    /// `If-Match`, `If-Unmodified-Since`, `Range`, `If-Range`): a hit without one answers
    /// without looking them up.
    pub conditional: bool,
    /// The head carried `X-Request-Id` (phase 1 takes it out of `headers`: the upstream gets
    /// the request's own id, `RequestCtx::upstream_head`).
    pub request_id_header: bool,
}

/// Which of `from_head`'s rules a head needs, read from its header names in one pass.
#[derive(Debug, Default)]
struct Survey {
    expect: bool,
    /// `Connection` (and what it names), `Upgrade`, or another hop-by-hop field.
    hop: bool,
    target_override: bool,
    /// Identity headers only Weir sets (`Weir-Consumer`, client-certificate headers,
    /// `X-Consumer-*`).
    identity: bool,
    method_override: bool,
    /// Fields the cache reads (`Authorization`, `Cookie`, `Cache-Control`, `Pragma`).
    cache_fields: bool,
    /// `Weir-Debug`.
    debug: bool,
    /// Conditional and range fields.
    conditional: bool,
    /// `X-Request-Id`.
    request_id: bool,
}

impl Survey {
    fn of(headers: &HeaderMap) -> Survey {
        let mut s = Survey::default();
        for name in headers.keys() {
            match name.as_str() {
                "expect" => s.expect = true,
                "x-original-url" | "x-rewrite-url" | "x-host" | "x-forwarded-port" | "x-forwarded-scheme"
                | "x-forwarded-server" => s.target_override = true,
                "weir-consumer" | "x-forwarded-client-cert" | "weir-client-cert" => s.identity = true,
                n if n.starts_with("x-consumer-") => s.identity = true,
                "x-http-method-override" | "x-http-method" | "x-method-override" => s.method_override = true,
                "authorization" | "cookie" | "cache-control" | "pragma" => s.cache_fields = true,
                "weir-debug" => s.debug = true,
                "x-request-id" => s.request_id = true,
                "if-none-match" | "if-modified-since" | "if-match" | "if-unmodified-since" | "range" | "if-range" => {
                    s.conditional = true;
                }
                n if super::headers::is_hop_by_hop(n) => s.hop = true,
                _ => {}
            }
        }
        s
    }
}

/// `Expect` is answered by Weir and never forwarded (RFC 9110 §10.1.1): hyper sends
/// `100 Continue` when the body is first read, and the body is first read when the request
/// goes upstream — after routing, the consumer, limits and budget accepted it — so a refused
/// request gets its 401/413/429 without the client ever sending the body. Any other
/// expectation is 417.
fn expectation(headers: &mut http::HeaderMap) -> Result<(), GatewayError> {
    if !headers.contains_key(header::EXPECT) {
        return Ok(());
    }
    for v in headers.get_all(header::EXPECT) {
        let ok = v.to_str().is_ok_and(|s| s.split(',').all(|e| e.trim().eq_ignore_ascii_case("100-continue")));
        if !ok {
            return Err(GatewayError::ExpectationFailed(String::from_utf8_lossy(v.as_bytes()).into_owned()));
        }
    }
    headers.remove(header::EXPECT);
    Ok(())
}

impl Canonical {
    /// What a plugin hook is given of this request (with `body` where the route read it).
    pub fn plugin_parts<'a>(&'a self, body: Option<&'a [u8]>) -> crate::plugin::RequestParts<'a> {
        crate::plugin::RequestParts::new(
            self.method.as_str(),
            self.scheme,
            &self.authority,
            &self.path_query,
            &self.headers,
            body,
        )
    }

    /// Normalises the request head. `scheme` is the listener's; `trusted` whether the peer is a
    /// trusted proxy; `upgrades` the protocols that may be tunnelled (lower-case).
    pub fn from_head(
        parts: &mut Parts,
        scheme: &'static str,
        trusted: bool,
        upgrades: &[String],
    ) -> Result<Canonical, GatewayError> {
        // Origin-form or absolute-form only: an authority-form (`CONNECT host:443`) or asterisk
        // (`OPTIONS *`) target names no path to route, key or forward.
        if !parts.uri.path().starts_with('/') {
            return Err(GatewayError::BadRequest(
                "the request target must be a path (`/...`) or an absolute URL".into(),
            ));
        }
        let (authority, host_is_authority) = authority(parts, scheme)?;
        let path = normalize_path(parts.uri.path()).map_err(|e| GatewayError::BadRequest(e.to_string()))?;
        let mut path_query = path;
        let path_len = path_query.len();
        if let Some(q) = parts.uri.query().filter(|q| !q.is_empty()) {
            path_query.push('?');
            push_query(&mut path_query, q).map_err(|e| GatewayError::BadRequest(e.to_string()))?;
            if path_query.len() == path_len + 1 {
                path_query.truncate(path_len);
            }
        }
        let mut headers = std::mem::take(&mut parts.headers);
        // One pass over the names says which rules apply; a request that carries none of the
        // headers they remove pays for no lookups (each is a hash of the name).
        let seen = Survey::of(&headers);
        if seen.expect {
            expectation(&mut headers)?;
        }
        let upgrade =
            (seen.hop && parts.version == Version::HTTP_11).then(|| allowed_upgrade(&headers, upgrades)).flatten();
        if seen.hop {
            strip_hop_by_hop(&mut headers);
        }
        if seen.target_override && !trusted {
            for h in &TARGET_OVERRIDES {
                headers.remove(h);
            }
        }
        if seen.identity {
            headers.remove(&WEIR_CONSUMER);
            headers.remove(&CLIENT_CERT);
            headers.remove(&WEIR_CLIENT_CERT);
            let names: Vec<HeaderName> =
                headers.keys().filter(|k| k.as_str().starts_with("x-consumer-")).cloned().collect();
            for n in names {
                headers.remove(n);
            }
        }
        let method_override = seen.method_override;
        // A `Host` already equal to the authority (what nearly every client sends) is kept as is.
        if !host_is_authority {
            let host = HeaderValue::from_str(&authority).map_err(|_| bad_host("not a valid host"))?;
            headers.insert(header::HOST, host);
        }
        let host_len = host_of(&authority).len();
        Ok(Canonical {
            method: parts.method.clone(),
            version: parts.version,
            scheme,
            authority,
            path_query,
            path_len,
            host_len,
            headers,
            upgrade,
            method_override,
            cache_fields: seen.cache_fields,
            debug_header: seen.debug,
            conditional: seen.conditional,
            request_id_header: seen.request_id,
        })
    }

    /// The normalised path (no query).
    pub fn path(&self) -> &str {
        &self.path_query[..self.path_len]
    }

    /// The normalised query, when there is one.
    pub fn query(&self) -> Option<&str> {
        self.path_query.get(self.path_len + 1..)
    }

    /// The host without port, for routing.
    pub fn host(&self) -> &str {
        self.authority.get(..self.host_len).unwrap_or(&self.authority)
    }
}

fn bad_host(why: &str) -> GatewayError {
    GatewayError::BadRequest(format!("Host: {why}"))
}

/// The authority the request addresses (see the module doc), normalised, and whether the
/// request's one `Host` field is already exactly that.
fn authority(parts: &Parts, scheme: &'static str) -> Result<(String, bool), GatewayError> {
    if let Some(s) = parts.uri.scheme_str() {
        if !s.eq_ignore_ascii_case(scheme) {
            return Err(GatewayError::BadRequest(format!(
                "the request target's scheme `{s}` is not this listener's (`{scheme}`)"
            )));
        }
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad_host("more than one"));
    }
    let from_target = parts.uri.authority().map(|a| a.as_str());
    let raw = match (from_target, host) {
        (Some(a), Some(h)) if parts.version == Version::HTTP_2 => {
            let h = h.to_str().map_err(|_| bad_host("not a valid host"))?;
            let (na, nh) = (normalize_authority(a, scheme)?, normalize_authority(h, scheme)?);
            if na != nh {
                return Err(bad_host("differs from the request's :authority"));
            }
            let same = h.as_bytes() == na.as_bytes();
            return Ok((na, same));
        }
        // Absolute form (HTTP/1.1) or `:authority` alone: the target's authority wins over Host.
        (Some(a), _) => a,
        (None, Some(h)) => h.to_str().map_err(|_| bad_host("not a valid host"))?,
        (None, None) => return Err(bad_host("missing")),
    };
    let normal = normalize_authority(raw, scheme)?;
    let same = host.is_some_and(|h| h.as_bytes() == normal.as_bytes());
    Ok((normal, same))
}

/// `host[:port]` validated, lower-cased, trailing dot removed, default port removed.
pub fn normalize_authority(raw: &str, scheme: &str) -> Result<String, GatewayError> {
    if already_normal(raw, scheme) {
        return Ok(raw.to_string());
    }
    if raw.is_empty() || raw.contains('@') {
        return Err(bad_host("not a valid host"));
    }
    let a: http::uri::Authority = raw.parse().map_err(|_| bad_host("not a valid host"))?;
    let host = a.host();
    if host.is_empty()
        || !host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':'))
    {
        return Err(bad_host("not a valid host"));
    }
    // `host:` with an empty port is allowed by RFC 3986 and means the default port.
    let port = match raw.strip_prefix(host).and_then(|r| r.strip_prefix(':')) {
        Some("") | None => None,
        Some(_) => Some(a.port_u16().ok_or_else(|| bad_host("not a valid port"))?),
    };
    let mut out = host.trim_end_matches('.').to_ascii_lowercase();
    if out.is_empty() {
        return Err(bad_host("not a valid host"));
    }
    match port {
        Some(80) if scheme == "http" => {}
        Some(443) if scheme == "https" => {}
        Some(p) => {
            out.push(':');
            out.push_str(&p.to_string());
        }
        None => {}
    }
    Ok(out)
}

/// What clients almost always send: a lower-case name or IPv4 address and, maybe, a port that
/// is not the scheme's default, written without leading zeros. Such an authority is its own
/// normal form (the full parse below would return it unchanged).
fn already_normal(raw: &str, scheme: &str) -> bool {
    let (host, port) = match raw.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (raw, None),
    };
    let host_ok = !host.is_empty()
        && !host.starts_with('.')
        && !host.ends_with('.')
        && host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'));
    let port_ok = match port {
        None => true,
        Some(p) => {
            let n = (p.len() <= 5 && !p.starts_with('0') && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u16>().ok())
                .flatten();
            match n {
                Some(80) => scheme != "http",
                Some(443) => scheme != "https",
                Some(_) => true,
                None => false,
            }
        }
    };
    host_ok && port_ok
}

/// The host part of a normalised authority (IPv6 keeps its brackets).
pub fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_once(']').map_or(authority, |(a, _)| &authority[..=a.len()]);
    }
    // A byte search: `rsplit_once`'s pattern machinery cost more than the rest of routing.
    match authority.bytes().rposition(|b| b == b':') {
        Some(i) => &authority[..i],
        None => authority,
    }
}

/// The upgrade protocol to tunnel: `Connection: upgrade` and an `Upgrade` whose first protocol
/// is allowed. Judged before hop-by-hop removal.
fn allowed_upgrade(headers: &HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let mut values = headers.get_all(header::UPGRADE).iter();
    let v = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let proto = v.to_str().ok()?.split(',').next()?.trim();
    let name = proto.split('/').next().unwrap_or(proto);
    allowed.iter().any(|a| a.eq_ignore_ascii_case(name)).then(|| v.clone())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes unreserved escapes, upper-cases the rest; fails on a malformed escape.
fn push_escapes(out: &mut String, s: &str) -> Result<(), MalformedTarget> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) else {
                return Err(MalformedTarget(s.to_string()));
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
        } else {
            // A URI is ASCII (hyper guarantees it), so bytes are chars.
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    Ok(())
}

/// RFC 3986 §5.2.4 dot-segment removal on an already-escaped path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').collect();
    let last = segs.len().saturating_sub(1);
    for (i, seg) in segs.iter().enumerate().skip(1) {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(path.len());
    s.push('/');
    s.push_str(&out.join("/"));
    s
}

/// True when `raw` needs no normalisation: no escapes and no dot segments.
fn path_is_normal(raw: &str) -> bool {
    // Most paths have neither an escape nor a dot: one pass over the bytes says so.
    if !raw.bytes().any(|b| b == b'%' || b == b'.') {
        return true;
    }
    !raw.contains('%') && !raw.split('/').any(|s| s == "." || s == "..")
}

/// The normalised path (what Weir routes, keys and forwards).
pub fn normalize_path(raw: &str) -> Result<String, MalformedTarget> {
    if path_is_normal(raw) {
        return Ok(raw.to_string());
    }
    let mut escaped = String::with_capacity(raw.len());
    push_escapes(&mut escaped, raw)?;
    if !escaped.starts_with('/') {
        return Ok(escaped);
    }
    Ok(remove_dot_segments(&escaped))
}

/// The normalised query (see the module doc).
pub fn normalize_query(raw: &str) -> Result<String, MalformedTarget> {
    let mut out = String::with_capacity(raw.len());
    push_query(&mut out, raw)?;
    Ok(out)
}

fn param_name(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(n, _)| n)
}

/// Appends the normalised query to `out`; the common case (names already in order, no escapes,
/// no empty pairs) copies it as is.
fn push_query(out: &mut String, raw: &str) -> Result<(), MalformedTarget> {
    let simple = !raw.contains('%') && !raw.contains("&&") && !raw.starts_with('&') && !raw.ends_with('&');
    if simple && raw.split('&').map(param_name).is_sorted() {
        out.push_str(raw);
        return Ok(());
    }
    let mut pairs = Vec::new();
    for p in raw.split('&').filter(|p| !p.is_empty()) {
        let mut s = String::with_capacity(p.len());
        push_escapes(&mut s, p)?;
        pairs.push(s);
    }
    // Stable: parameters of one name keep their order (`id=2&id=1` is not `id=1&id=2`).
    pairs.sort_by(|a, b| param_name(a).cmp(param_name(b)));
    for (i, p) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn head(method: &str, target: &str, version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(target).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn canon(target: &str, headers: &[(&str, &str)]) -> Result<Canonical, GatewayError> {
        Canonical::from_head(&mut head("GET", target, Version::HTTP_11, headers), "http", false, &["websocket".into()])
    }

    #[test]
    fn paths() {
        assert_eq!(normalize_path("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(normalize_path("/%7Euser/%41%62").unwrap(), "/~user/Ab");
        assert_eq!(normalize_path("/a/..%2f").unwrap(), "/a/..%2F");
        assert_ne!(normalize_path("/a%2fb").unwrap(), normalize_path("/a/b").unwrap());
        assert_eq!(normalize_path("/a/%2e%2e/b").unwrap(), "/b");
        assert_eq!(normalize_path("/public/%2e%2e/admin/x").unwrap(), "/admin/x");
        assert_eq!(normalize_path("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize_path("/account;x.css").unwrap(), "/account;x.css");
        assert!(normalize_path("/bad%zz").is_err());
        assert!(normalize_path("/bad%2").is_err());
    }

    #[test]
    fn queries_sort_by_name_stably() {
        assert_eq!(normalize_query("b=2&a=1&&a=0").unwrap(), "a=1&a=0&b=2");
        assert_eq!(normalize_query("id=2&id=1").unwrap(), "id=2&id=1");
        assert_ne!(normalize_query("id=2&id=1").unwrap(), normalize_query("id=1&id=2").unwrap());
        assert_eq!(normalize_query("b=%41&a").unwrap(), "a&b=A");
    }

    /// The fast path never disagrees with the full parse.
    #[test]
    fn the_normal_form_shortcut_agrees_with_the_parse() {
        let cases = [
            "a",
            "api.example.com",
            "h:8080",
            "h:80",
            "h:443",
            "h:080",
            "h:65535",
            "h:65536",
            "h:0",
            "10.0.0.1:3000",
            "a_b.c-d",
            "A.b",
            "a.",
            ".a",
            "a..b",
            "h:",
            "h:1:2",
            "[::1]:80",
            "a@b",
            "",
            "h:+1",
            "h:99999",
        ];
        for raw in cases {
            for scheme in ["http", "https"] {
                if already_normal(raw, scheme) {
                    let slow = {
                        let a: http::uri::Authority = raw.parse().unwrap();
                        let mut out = a.host().trim_end_matches('.').to_ascii_lowercase();
                        match a.port_u16() {
                            Some(80) if scheme == "http" => {}
                            Some(443) if scheme == "https" => {}
                            Some(p) => out.push_str(&format!(":{p}")),
                            None => {}
                        }
                        out
                    };
                    assert_eq!(raw, slow, "{raw} ({scheme})");
                }
            }
        }
        assert!(already_normal("h:8080", "http") && !already_normal("h:80", "http") && already_normal("h:80", "https"));
    }

    /// Every header a rule of `from_head` removes or reads is noticed by the survey.
    #[test]
    fn the_survey_sees_every_header_a_rule_acts_on() {
        let survey = |name: &str| {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("x"));
            Survey::of(&h)
        };
        for n in &TARGET_OVERRIDES {
            assert!(survey(n.as_str()).target_override, "{n}");
        }
        for n in [&WEIR_CONSUMER, &CLIENT_CERT, &WEIR_CLIENT_CERT] {
            assert!(survey(n.as_str()).identity, "{n}");
        }
        assert!(survey("x-consumer-id").identity);
        for n in ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization"] {
            assert!(survey(n).hop, "{n}");
        }
        for n in ["x-http-method-override", "x-http-method", "x-method-override"] {
            assert!(survey(n).method_override, "{n}");
        }
        assert!(survey("expect").expect);
        assert!(survey("weir-debug").debug);
        for n in ["authorization", "cookie", "cache-control", "pragma"] {
            assert!(survey(n).cache_fields, "{n}");
        }
        for n in ["if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "range", "if-range"] {
            assert!(survey(n).conditional, "{n}");
        }
        let plain = survey("user-agent");
        assert!(
            !(plain.expect
                || plain.hop
                || plain.target_override
                || plain.identity
                || plain.method_override
                || plain.cache_fields
                || plain.debug
                || plain.conditional)
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(normalize_authority("API.example.com.:80", "http").unwrap(), "api.example.com");
        assert_eq!(normalize_authority("h:8080", "http").unwrap(), "h:8080");
        assert_eq!(normalize_authority("h:443", "https").unwrap(), "h");
        assert_eq!(normalize_authority("[::1]:80", "http").unwrap(), "[::1]");
        assert_eq!(normalize_authority("h:", "http").unwrap(), "h");
        for bad in ["", "user@h", "h:99999", "h:x", "a b", "h/x", "h|x"] {
            assert!(normalize_authority(bad, "http").is_err(), "{bad:?} accepted");
        }
        assert_eq!(host_of("h:8080"), "h");
        assert_eq!(host_of("[::1]:8080"), "[::1]");
    }

    #[test]
    fn absolute_form_replaces_host() {
        let c = canon("http://victim.example/x", &[("host", "evil.example")]).unwrap();
        assert_eq!(c.authority, "victim.example");
        assert_eq!(c.headers[header::HOST], "victim.example");
        assert!(canon("https://victim.example/x", &[("host", "victim.example")]).is_err());
    }

    #[test]
    fn host_rules() {
        assert!(canon("/x", &[]).is_err());
        let mut p = head("GET", "/x", Version::HTTP_11, &[("host", "a")]);
        p.headers.append(header::HOST, HeaderValue::from_static("b"));
        assert!(Canonical::from_head(&mut p, "http", false, &[]).is_err());
        let mut p = head("GET", "http://a/x", Version::HTTP_2, &[("host", "b")]);
        assert!(Canonical::from_head(&mut p, "http", false, &[]).is_err());
        let mut p = head("GET", "http://A/x", Version::HTTP_2, &[("host", "a")]);
        assert_eq!(Canonical::from_head(&mut p, "http", false, &[]).unwrap().authority, "a");
        // `Host` is the authority: rewritten when it was spelled otherwise, kept when it was
        // already that, added when only `:authority` named it.
        for (host, want) in [("API.Example.:80", "api.example"), ("api.example:8080", "api.example:8080")] {
            let c = canon("/x", &[("host", host)]).unwrap();
            assert_eq!((c.authority.as_str(), c.headers[header::HOST].to_str().unwrap()), (want, want), "{host}");
            assert_eq!(c.host(), "api.example");
            assert_eq!(c.headers.get_all(header::HOST).iter().count(), 1);
        }
        let mut p = head("GET", "http://[::1]:8080/x", Version::HTTP_2, &[]);
        let c = Canonical::from_head(&mut p, "http", false, &[]).unwrap();
        assert_eq!((c.host(), c.headers[header::HOST].to_str().unwrap()), ("[::1]", "[::1]:8080"));
    }

    #[test]
    fn headers_the_origin_sees() {
        let c = canon(
            "/p?b=1&a=2",
            &[
                ("host", "h"),
                ("connection", "x-foo"),
                ("x-foo", "1"),
                ("x-original-url", "/admin"),
                ("weir-consumer", "root"),
                ("x-consumer-id", "root"),
                ("upgrade", "h2c"),
            ],
        )
        .unwrap();
        assert_eq!(c.path(), "/p");
        assert_eq!(c.query(), Some("a=2&b=1"));
        for h in ["x-foo", "x-original-url", "weir-consumer", "x-consumer-id", "upgrade", "connection"] {
            assert!(!c.headers.contains_key(h), "{h} kept");
        }
        assert!(c.upgrade.is_none());
        let ws = canon("/ws", &[("host", "h"), ("connection", "Upgrade"), ("upgrade", "WebSocket")]).unwrap();
        assert_eq!(ws.upgrade.as_ref().map(|v| v.as_bytes()), Some(&b"WebSocket"[..]));
        let h2c = canon("/ws", &[("host", "h"), ("connection", "Upgrade"), ("upgrade", "h2c")]).unwrap();
        assert!(h2c.upgrade.is_none());
        assert!(canon("/p", &[("host", "h"), ("x-http-method-override", "DELETE")]).unwrap().method_override);
    }
}
