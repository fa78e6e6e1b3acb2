//! Phase 4a, cache keys. Primary key: route + method class + scheme + host + normalised path +
//! sorted query; a `Vary` response adds a secondary part from the named request headers.
//!
//! Normalisation decisions (cache deception): only unreserved `%XX` are decoded (`%41` → `A`),
//! other escapes are upper-cased and kept — `%2F` stays distinct from `/`; dot segments are
//! resolved and the *normalised* path is what Weir forwards, so the key always names exactly
//! what the origin was asked; `;` parameters are kept verbatim (part of the key); hosts are
//! lower-cased, lose a trailing dot and a default port. A malformed escape makes the request
//! uncacheable (bypass), never "close enough".

use http::header::{HeaderMap, HeaderName, VARY};

/// Error: the path or query cannot be normalised unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed percent-encoding in `{0}`")]
pub struct KeyError(pub String);

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
fn normalize_escapes(s: &str) -> Result<String, KeyError> {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) else {
                return Err(KeyError(s.to_string()));
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                out.push(v as char);
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
        } else {
            // The URI is ASCII (hyper guarantees it), so bytes are chars.
            out.push(b[i] as char);
            i += 1;
        }
    }
    Ok(out)
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
    format!("/{}", out.join("/"))
}

/// True when `raw` needs no normalisation: no escapes and no dot segments.
fn path_is_normal(raw: &str) -> bool {
    !raw.contains('%') && !raw.split('/').any(|s| s == "." || s == "..")
}

/// The normalised path (what Weir keys on and forwards).
pub fn normalize_path(raw: &str) -> Result<String, KeyError> {
    if path_is_normal(raw) {
        return Ok(raw.to_string());
    }
    let escaped = normalize_escapes(raw)?;
    if !escaped.starts_with('/') {
        return Ok(escaped);
    }
    Ok(remove_dot_segments(&escaped))
}

/// Query parameters normalised and sorted (order-insensitive), empty pairs dropped.
pub fn normalize_query(raw: &str) -> Result<String, KeyError> {
    let mut out = String::with_capacity(raw.len());
    push_query(&mut out, raw)?;
    Ok(out)
}

/// Appends the normalised query to `out`; the common case (already sorted, no escapes, no
/// empty pairs) copies it as is.
fn push_query(out: &mut String, raw: &str) -> Result<(), KeyError> {
    let simple = !raw.contains('%') && !raw.contains("&&") && !raw.starts_with('&') && !raw.ends_with('&');
    if simple && raw.split('&').is_sorted() {
        out.push_str(raw);
        return Ok(());
    }
    let mut pairs = raw.split('&').filter(|p| !p.is_empty()).map(normalize_escapes).collect::<Result<Vec<_>, _>>()?;
    pairs.sort();
    for (i, p) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(p);
    }
    Ok(())
}

/// `host[:port]` lower-cased, trailing dot removed, default port for the scheme removed.
pub fn normalize_authority(authority: &str, scheme: &str) -> String {
    let mut out = String::with_capacity(authority.len());
    push_authority(&mut out, authority, scheme);
    out
}

fn push_authority(out: &mut String, authority: &str, scheme: &str) {
    // Common case: already lower-case, no trailing dot, no port.
    if !authority.bytes().any(|b| b.is_ascii_uppercase() || b == b':') && !authority.ends_with('.') {
        out.push_str(authority);
        return;
    }
    let lower = authority.to_ascii_lowercase();
    let (host, port) = match lower.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (lower.as_str(), None), // bare IPv6
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (lower.as_str(), None),
    };
    out.push_str(host.trim_end_matches('.'));
    match port {
        Some(p) if !(scheme == "http" && p == "80" || scheme == "https" && p == "443") => {
            out.push(':');
            out.push_str(p);
        }
        _ => {}
    }
}

/// The request-derived parts of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyParts {
    /// Route-namespaced primary key.
    pub primary: String,
    /// Normalised `path?query` (for purge by URL and prefix, and for forwarding).
    pub path_query: String,
}

/// `route|class|scheme://host/path?sorted-query`; `body_hash` for opt-in POST caching.
pub fn primary(
    route: &str,
    class: &str,
    scheme: &str,
    authority: &str,
    path: &str,
    query: Option<&str>,
    body_hash: Option<&str>,
) -> Result<KeyParts, KeyError> {
    let mut path_query = normalize_path(path)?;
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        let at = path_query.len();
        path_query.push('?');
        push_query(&mut path_query, q)?;
        if path_query.len() == at + 1 {
            path_query.truncate(at);
        }
    }
    let mut primary =
        String::with_capacity(route.len() + class.len() + scheme.len() + authority.len() + path_query.len() + 8);
    primary.push_str(route);
    primary.push('|');
    primary.push_str(class);
    primary.push('|');
    primary.push_str(scheme);
    primary.push_str("://");
    push_authority(&mut primary, authority, scheme);
    primary.push_str(&path_query);
    if let Some(h) = body_hash {
        primary.push_str("|body=");
        primary.push_str(h);
    }
    Ok(KeyParts { primary, path_query })
}

/// 128-bit BLAKE3 of a request body, hex.
pub fn body_hash(body: &[u8]) -> String {
    let h = blake3::hash(body);
    h.to_hex()[..32].to_string()
}

/// Header names a response varies on: lower-case, de-duplicated, sorted.
pub fn vary_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

/// Secondary key: the primary plus the request's values of the varying headers, each with
/// whitespace trimmed and collapsed (so `gzip,br` and `gzip, br` select the same variant).
pub fn secondary(primary: &str, vary: &[HeaderName], headers: &HeaderMap) -> String {
    let mut part = String::new();
    for name in vary {
        part.push_str(name.as_str());
        part.push('=');
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|t| !t.is_empty())
            .collect();
        part.push_str(&values.join(","));
        part.push(';');
    }
    // Long header values must not make unbounded keys.
    if part.len() > 256 {
        part = format!("#{}", &blake3::hash(part.as_bytes()).to_hex()[..32]);
    }
    format!("{primary}|vary:{part}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn paths() {
        assert_eq!(normalize_path("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(normalize_path("/%7Euser/%41%62").unwrap(), "/~user/Ab");
        // Encoded slash and dots-with-encoded-slash stay distinct from their decoded forms.
        assert_eq!(normalize_path("/a/..%2f").unwrap(), "/a/..%2F");
        assert_ne!(normalize_path("/a%2fb").unwrap(), normalize_path("/a/b").unwrap());
        // %2e is unreserved: decoded, then resolved as a dot segment.
        assert_eq!(normalize_path("/a/%2e%2e/b").unwrap(), "/b");
        assert_eq!(normalize_path("/../../etc").unwrap(), "/etc");
        assert_eq!(normalize_path("/account;x.css").unwrap(), "/account;x.css");
        assert!(normalize_path("/bad%zz").is_err());
        assert!(normalize_path("/bad%2").is_err());
    }

    #[test]
    fn queries_sort() {
        assert_eq!(normalize_query("b=2&a=1&&a=0").unwrap(), "a=0&a=1&b=2");
        let k1 = primary("r", "GET", "http", "API.example.com.:80", "/p", Some("b=2&a=1"), None).unwrap();
        let k2 = primary("r", "GET", "http", "api.example.com", "/p", Some("a=1&b=2"), None).unwrap();
        assert_eq!(k1, k2);
        assert_eq!(k1.primary, "r|GET|http://api.example.com/p?a=1&b=2");
        let other_route = primary("s", "GET", "http", "api.example.com", "/p", Some("a=1&b=2"), None).unwrap();
        assert_ne!(k1.primary, other_route.primary);
        assert_eq!(normalize_authority("h:8080", "http"), "h:8080");
        assert_eq!(normalize_authority("[::1]:80", "http"), "[::1]");
    }

    #[test]
    fn vary_secondary() {
        let mut resp = HeaderMap::new();
        resp.append(VARY, HeaderValue::from_static("Accept-Encoding, accept-language"));
        let names = vary_names(&resp);
        assert_eq!(names.len(), 2);
        let mut a = HeaderMap::new();
        a.insert("accept-encoding", HeaderValue::from_static("gzip,  br"));
        let mut b = HeaderMap::new();
        b.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        assert_eq!(secondary("k", &names, &a), secondary("k", &names, &b));
        b.insert("accept-language", HeaderValue::from_static("fr"));
        assert_ne!(secondary("k", &names, &a), secondary("k", &names, &b));
    }
}
