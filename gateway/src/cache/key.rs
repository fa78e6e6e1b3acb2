//! Phase 4, cache keys: built from the canonical request (`proxy::canonical`), which already
//! normalised the authority, path and query, so the key names exactly what the origin is asked.
//!
//! Keys are unambiguous by construction: every field is length-prefixed (`<len>:<bytes>`), so no
//! byte a URL or header can contain acts as a separator, and two distinct requests can never
//! produce one key. A primary key is the fields (route, method class, scheme, authority,
//! path?query[, body hash]); a plugin's key is (route, class, `plugin`, its key) — never a policy
//! key, whose third field is a scheme. A `Vary` variant lives in its own namespace: `v` followed by
//! its primary key as one field, then (name, values) per varying header, so no primary key (which
//! starts with a digit) is ever a variant key.

use http::header::{HeaderMap, HeaderName, VARY};

fn push_field(out: &mut String, s: &str) {
    push_decimal(out, s.len());
    out.push(':');
    out.push_str(s);
}

/// Decimal digits of `n`, without `format!` (keys are built on every request).
fn push_decimal(out: &mut String, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

fn capacity(parts: &[&str]) -> usize {
    parts.iter().map(|p| p.len() + 4).sum()
}

/// The route-namespaced primary key; `body_hash` for opt-in POST caching.
pub fn primary(
    route: &str,
    class: &str,
    scheme: &str,
    authority: &str,
    path_query: &str,
    body_hash: Option<&str>,
) -> String {
    let fields = [route, class, scheme, authority, path_query];
    let mut out = String::with_capacity(capacity(&fields) + body_hash.map_or(0, |h| h.len() + 4));
    for f in fields {
        push_field(&mut out, f);
    }
    if let Some(h) = body_hash {
        push_field(&mut out, h);
    }
    out
}

/// A plugin's key, namespaced by route and method class.
pub fn plugin(route: &str, class: &str, key: &str) -> String {
    let fields = [route, class, "plugin", key];
    let mut out = String::with_capacity(capacity(&fields));
    for f in fields {
        push_field(&mut out, f);
    }
    out
}

/// The start every variant key of `primary` shares.
pub fn variant_prefix(primary: &str) -> String {
    let mut out = String::with_capacity(primary.len() + 8);
    out.push('v');
    push_field(&mut out, primary);
    out
}

/// The primary key a full key belongs to (itself, unless it is a variant).
pub fn primary_of(key: &str) -> &str {
    let Some(rest) = key.strip_prefix('v') else { return key };
    let Some((len, body)) = rest.split_once(':') else { return key };
    len.parse::<usize>().ok().and_then(|n| body.get(..n)).unwrap_or(key)
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

/// Adds `name` to a sorted, de-duplicated list of varying names.
pub fn add_name(names: &mut Vec<HeaderName>, name: HeaderName) {
    if let Err(i) = names.binary_search_by(|n| n.as_str().cmp(name.as_str())) {
        names.insert(i, name);
    }
}

/// Headers whose values are preference lists (RFC 9110 §12.5.3, §12.5.4), normalised in keys.
fn negotiated(name: &HeaderName) -> bool {
    name == http::header::ACCEPT_ENCODING || name == http::header::ACCEPT_LANGUAGE
}

/// One member of a preference list as (q in thousandths, lower-case name and other
/// parameters); `q` defaults to 1 (§12.4.2). A malformed weight keeps the member as written, so
/// it never collapses into a different list.
fn preference(member: &str) -> Option<(u16, String)> {
    let mut params = member.split(';').map(str::trim);
    let token = params.next().filter(|t| !t.is_empty())?.to_ascii_lowercase();
    let mut q = 1000u16;
    let mut rest = String::new();
    for p in params {
        let (k, v) = p.split_once('=').map_or((p, ""), |(k, v)| (k.trim(), v.trim()));
        match (k.eq_ignore_ascii_case("q"), qvalue(v)) {
            (true, Some(v)) => q = v,
            _ => {
                rest.push(';');
                rest.push_str(&p.to_ascii_lowercase().split_whitespace().collect::<String>());
            }
        }
    }
    Some((q, token + &rest))
}

/// A qvalue (`0`, `0.5`, `1.000`; §12.4.2) in thousandths.
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = format!("{frac:0<3}").parse::<u16>().ok()?;
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Secondary key: the variant of `primary` selected by the values of the varying headers in
/// `headers` (the canonical request's: what the origin receives), each value with whitespace
/// trimmed and collapsed (so `gzip,br` and `gzip, br` select the same variant). An absent header
/// and an empty one are distinct.
pub fn secondary(primary: &str, vary: &[HeaderName], headers: &HeaderMap) -> String {
    let mut part = String::new();
    let mut members: Vec<(u16, String)> = Vec::new();
    for name in vary {
        push_field(&mut part, name.as_str());
        let mut values = String::new();
        let mut present = false;
        for v in headers.get_all(name) {
            present = true;
            let Ok(s) = v.to_str() else {
                // Opaque bytes: keyed by their hash, never mixed with a readable value.
                values.push_str("#b");
                values.push_str(&blake3::hash(v.as_bytes()).to_hex()[..32]);
                continue;
            };
            if negotiated(name) {
                members.extend(s.split(',').filter_map(preference));
                continue;
            }
            for t in s.split(',') {
                let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
                if !t.is_empty() {
                    push_field(&mut values, &t);
                }
            }
        }
        // Preference lists mean the same whatever their order, case and spacing: sorted by
        // q-value (highest first), then by name.
        members.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        members.dedup();
        for (q, token) in members.drain(..) {
            let mut m = token;
            if q != 1000 {
                m.push_str(";q=");
                m.push_str(&format!("{}", f64::from(q) / 1000.0));
            }
            push_field(&mut values, &m);
        }
        if present {
            values.insert(0, '=');
        }
        push_field(&mut part, &values);
    }
    let mut out = variant_prefix(primary);
    // Long header values must not make unbounded keys.
    if part.len() > 256 {
        out.push('#');
        out.push_str(&blake3::hash(part.as_bytes()).to_hex()[..32]);
    } else {
        out.push_str(&part);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    #[test]
    fn fields_cannot_be_confused() {
        let a = primary("r", "GET", "http", "h", "/p?vary=X|vary:x-foo=b;", None);
        let b = primary("r", "GET", "http", "h", "/p?vary=X", None);
        assert_ne!(a, b);
        assert_eq!(b, "1:r3:GET4:http1:h9:/p?vary=X");
        // The host/path boundary: `a.b` + `/c` vs `a` + `.b/c`.
        assert_ne!(primary("r", "GET", "http", "a.b", "/c", None), primary("r", "GET", "http", "a", ".b/c", None));
        assert_ne!(plugin("r", "GET", "x"), primary("r", "GET", "plugin", "x", "", None));
        assert_eq!(primary_of(&b), b);
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
        let p = primary("r", "GET", "http", "h", "/", None);
        assert_eq!(secondary(&p, &names, &a), secondary(&p, &names, &b));
        b.insert("accept-language", HeaderValue::from_static("fr"));
        assert_ne!(secondary(&p, &names, &a), secondary(&p, &names, &b));
        let mut empty = HeaderMap::new();
        empty.insert("accept-encoding", HeaderValue::from_static(""));
        assert_ne!(secondary(&p, &names, &empty), secondary(&p, &names, &HeaderMap::new()));
        // Preference lists: order of members, case and spacing do not matter; weights do.
        let lang = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("accept-language", HeaderValue::from_static(v));
            secondary(&p, &names, &h)
        };
        assert_eq!(lang("en-US, fr;q=0.5, de;q=0.5"), lang("de; q=0.50 , EN-us,fr;Q=0.5"));
        assert_eq!(lang("en"), lang("en;q=1.000"));
        assert_ne!(lang("en, fr;q=0.5"), lang("en;q=0.5, fr"));
        assert_ne!(lang("en"), lang("en;q=0"));
        assert_ne!(lang("en;q=2"), lang("en"));
        let s = secondary(&p, &names, &a);
        assert!(s.starts_with(&variant_prefix(&p)));
        assert_eq!(primary_of(&s), p);
        // A variant never equals any primary key, whatever the request contains.
        assert!(!s.starts_with(|c: char| c.is_ascii_digit()));
    }
}
