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
    // `itoa`, not `format!`: keys are built on every request.
    out.push_str(itoa::Buffer::new().format(s.len()));
    out.push(':');
    out.push_str(s);
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
    primary_after(&prefix(route, class), scheme, authority, path_query, body_hash)
}

/// The first two fields of every primary key of a route and method class (`primary`'s start):
/// made once per route, not per request.
pub fn prefix(route: &str, class: &str) -> String {
    let fields = [route, class];
    let mut out = String::with_capacity(capacity(&fields));
    for f in fields {
        push_field(&mut out, f);
    }
    out
}

/// `primary`, from the route's `prefix`.
pub fn primary_after(prefix: &str, scheme: &str, authority: &str, path_query: &str, body_hash: Option<&str>) -> String {
    let fields = [scheme, authority, path_query];
    let mut out = String::with_capacity(prefix.len() + capacity(&fields) + body_hash.map_or(0, |h| h.len() + 4));
    out.push_str(prefix);
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

/// The content-negotiation fields (RFC 9110 §12.5): lists whose members are normalised in keys
/// where the grammar makes two spellings the same, never reordered.
fn negotiated(name: &HeaderName) -> bool {
    name == http::header::ACCEPT_ENCODING || name == http::header::ACCEPT_LANGUAGE || name == http::header::ACCEPT
}

/// One member of a negotiation list as a key part: what the grammar makes equivalent is
/// written one way — the value's letter case (media ranges, codings and language tags are
/// case-insensitive) and parameter names' case, whitespace around the member and its `;`, and
/// `q=1` written or omitted (§12.4.2). Parameter values other than `q` stay as written, and a
/// malformed weight keeps the member as written, so it never collapses into a different list.
fn member(m: &str) -> Option<String> {
    let mut params = m.split(';').map(str::trim);
    let mut out = params.next().filter(|t| !t.is_empty())?.to_ascii_lowercase();
    for p in params {
        let pair = p.split_once('=');
        let weight = pair.filter(|(k, _)| k.eq_ignore_ascii_case("q")).and_then(|(_, v)| qvalue(v));
        match (weight, pair) {
            (Some(1000), _) => {}
            (Some(q), _) => {
                out.push_str(";q=");
                out.push_str(&(f64::from(q) / 1000.0).to_string());
            }
            (None, Some((k, v))) => {
                out.push(';');
                out.push_str(&k.to_ascii_lowercase());
                out.push('=');
                out.push_str(v);
            }
            (None, None) => {
                out.push(';');
                out.push_str(&p.to_ascii_lowercase());
            }
        }
    }
    Some(out)
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
/// `headers` (the canonical request's: what the origin receives). The negotiation fields
/// (`Accept`, `Accept-Encoding`, `Accept-Language`) key by their members in order, each written
/// one way (`member`), across lines (a list split over lines is the same list); every other
/// field keys by its field lines exactly as sent, each length-prefixed — so `Origin: a,` is not
/// `Origin: a`, and one line `a, b` is not two lines `a` and `b`. An absent header and an empty
/// one are distinct.
pub fn secondary(primary: &str, vary: &[HeaderName], headers: &HeaderMap) -> String {
    let mut part = String::new();
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
                for m in s.split(',').filter_map(member) {
                    push_field(&mut values, &m);
                }
            } else {
                push_field(&mut values, s);
            }
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
        // Negotiation lists: case, spacing and `q=1` do not matter; order and weights do.
        let lang = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("accept-language", HeaderValue::from_static(v));
            secondary(&p, &names, &h)
        };
        assert_eq!(lang("en-US, fr;q=0.5, de;q=0.5"), lang(" EN-us,fr; Q=0.50 ,de;q=0.5"));
        assert_eq!(lang("en"), lang("en;q=1.000"));
        assert_eq!(lang("en, fr"), lang("en,,fr"), "empty list members");
        assert_ne!(lang("en, fr"), lang("fr, en"), "never reordered: equal weights may break by order");
        assert_ne!(lang("en, fr;q=0.5"), lang("en;q=0.5, fr"));
        assert_ne!(lang("en"), lang("en;q=0"));
        assert_ne!(lang("en;q=2"), lang("en"));
        assert_ne!(lang("en;q = 0.5"), lang("en;q=0.5"), "not the grammar: kept as written");
        // A list split over lines is the same list.
        let mut two = HeaderMap::new();
        two.append("accept-language", HeaderValue::from_static("en"));
        two.append("accept-language", HeaderValue::from_static("fr"));
        assert_eq!(secondary(&p, &names, &two), lang("en, fr"));
        // Any other field: its lines exactly.
        let origin_names = vec![http::header::ORIGIN];
        let origin = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append("origin", HeaderValue::from_static(l));
            }
            secondary(&p, &origin_names, &h)
        };
        assert_ne!(origin(&["https://good.example,"]), origin(&["https://good.example"]));
        assert_ne!(origin(&["a, b"]), origin(&["a", "b"]));
        assert_ne!(origin(&["a,b"]), origin(&["a, b"]));
        let s = secondary(&p, &names, &a);
        assert!(s.starts_with(&variant_prefix(&p)));
        assert_eq!(primary_of(&s), p);
        // A variant never equals any primary key, whatever the request contains.
        assert!(!s.starts_with(|c: char| c.is_ascii_digit()));
    }
}
