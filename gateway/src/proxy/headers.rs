//! Header rules at the proxy boundary: hop-by-hop removal (RFC 9110 §7.6.1), `Via`, and the
//! forwarding headers, which a client outside the trusted-proxy list can never inject.

use super::ConnInfo;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// A field that is hop-by-hop by its name alone (what `Connection` nominates is found from its
/// value): `Connection`, `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`.
pub fn is_hop_by_hop(name: &str) -> bool {
    matches!(name, "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade")
        || name.starts_with("proxy-")
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`, `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade` and all `Proxy-*`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most heads carry none: one pass over the names instead of a lookup (a hash) per field.
    if !headers.keys().any(|k| is_hop_by_hop(k.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in
        [&header::CONNECTION, &KEEP_ALIVE, &header::TE, &header::TRAILER, &header::TRANSFER_ENCODING, &header::UPGRADE]
    {
        headers.remove(n);
    }
    let proxy: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().starts_with("proxy-")).cloned().collect();
    for n in proxy {
        headers.remove(n);
    }
}

/// The protocol name for `Via` as RFC 9110 §7.6.3 wants it (`1.1`, `2`).
fn via_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Weir's own `Via` hop for a message received as `received` (`1.1 weir`).
pub fn via_hop(received: Version) -> &'static str {
    let ours = match received {
        Version::HTTP_10 => "1.0 weir",
        Version::HTTP_2 => "2 weir",
        Version::HTTP_3 => "3 weir",
        _ => "1.1 weir",
    };
    debug_assert!(ours.starts_with(via_version(received)));
    ours
}

/// Appends `Via: <version> weir` to whatever `Via` chain is already there.
pub fn add_via(headers: &mut HeaderMap, received: Version) {
    let ours = via_hop(received);
    match headers.get(header::VIA).and_then(|v| v.to_str().ok()).filter(|p| !p.is_empty()) {
        None => {
            headers.insert(header::VIA, HeaderValue::from_static(ours));
        }
        Some(prev) => {
            if let Ok(v) = HeaderValue::from_str(&format!("{prev}, {ours}")) {
                headers.insert(header::VIA, v);
            }
        }
    }
}

/// Sets `X-Forwarded-For/Host/Proto` and `Forwarded` from what Weir saw. From a trusted peer the
/// incoming chain is kept and extended; from anyone else it is replaced. Built with `push_str`
/// from the connection's preformatted address: this runs on every proxied request.
pub fn set_forwarding(headers: &mut HeaderMap, conn: &ConnInfo, host: Option<&str>, trusted: bool) {
    let ip = conn.peer_ip.as_str();
    let proto = if conn.scheme == "https" { "https" } else { "http" };
    let mut elem = String::with_capacity(16 + ip.len() + host.map_or(0, str::len));
    elem.push_str("for=");
    if conn.peer.is_ipv6() && !conn.peer.ip().to_canonical().is_ipv4() {
        elem.push_str("\"[");
        elem.push_str(ip);
        elem.push_str("]\"");
    } else {
        elem.push_str(ip);
    }
    if let Some(h) = host {
        elem.push_str(";host=\"");
        if h.bytes().any(|b| b == b'"' || b == b'\\') {
            elem.extend(h.chars().filter(|c| *c != '"' && *c != '\\'));
        } else {
            elem.push_str(h);
        }
        elem.push('"');
    }
    elem.push_str(";proto=");
    elem.push_str(proto);

    if trusted {
        let chain = |name: &HeaderName, add: &str, headers: &mut HeaderMap| {
            let joined: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
            let value = if joined.is_empty() { add.to_string() } else { format!("{}, {add}", joined.join(", ")) };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name.clone(), v);
            }
        };
        chain(&X_FORWARDED_FOR, ip, headers);
        chain(&header::FORWARDED, &elem, headers);
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
                headers.insert(X_FORWARDED_HOST.clone(), v);
            }
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        }
        return;
    }
    // An untrusted client's own forwarding headers are replaced: `insert` drops every earlier
    // value of a name, so each is removed only where Weir has nothing to put in its place.
    match HeaderValue::from_str(ip) {
        Ok(v) => headers.insert(X_FORWARDED_FOR.clone(), v),
        Err(_) => headers.remove(&X_FORWARDED_FOR),
    };
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => headers.insert(X_FORWARDED_HOST.clone(), v),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(elem)) {
        Ok(v) => headers.insert(header::FORWARDED, v),
        Err(_) => headers.remove(&header::FORWARDED),
    };
}

/// Bytes the request head occupies, as a client would have sent it.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum()
}

/// The client's address. From an untrusted peer: the peer. Through trusted proxies: the
/// `X-Forwarded-For` lines joined in order (or, without them, the `for=` of `Forwarded`), walked
/// right to left; the walk stops at the first entry that is not a trusted proxy, which is the
/// client. An entry that is not an address (`unknown`, junk, an obfuscated name) ends the walk:
/// the nearest trusted hop's address is used, so a client can never choose its own by putting
/// junk in front of a real proxy's entry.
/// `peer_trusted`: the peer is in `trusted` (the caller has checked it once per request).
pub fn client_addr(
    peer: std::net::IpAddr,
    peer_trusted: bool,
    trusted: &[ipnet::IpNet],
    headers: &HeaderMap,
) -> std::net::IpAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut ip = peer.to_canonical();
    if !peer_trusted {
        return ip;
    }
    let xff: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .collect();
    let entries: Vec<&str> = if !xff.is_empty() {
        xff
    } else {
        headers
            .get_all(header::FORWARDED)
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{0}"))
            .flat_map(|s| s.split(','))
            .map(|elem| {
                elem.split(';')
                    .find_map(|pair| {
                        let (k, v) = pair.trim().split_once('=')?;
                        k.trim().eq_ignore_ascii_case("for").then(|| forwarded_node(v.trim()))
                    })
                    .unwrap_or("")
            })
            .collect()
    };
    for entry in entries.iter().rev() {
        let Ok(hop) = entry.parse::<std::net::IpAddr>() else { return ip };
        ip = hop.to_canonical();
        if !is_trusted(&ip) {
            return ip;
        }
    }
    ip
}

/// The address part of a `Forwarded` node (RFC 7239 §6): quotes, brackets and port removed.
fn forwarded_node(v: &str) -> &str {
    let v = v.trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split_once(']').map_or("", |(a, _)| a);
    }
    match v.split_once(':') {
        Some((a, port)) if !port.contains(':') => a,
        _ => v,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_address_walks_right_to_left_and_stops_at_junk() {
        use std::net::IpAddr;
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let walk = |lines: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in lines {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
            }
            super::client_addr(peer, trusted.iter().any(|n| n.contains(&peer)), &trusted, &h).to_string()
        };
        // The client's chosen address left of junk never counts: the nearest trusted hop does.
        assert_eq!(walk(&[("x-forwarded-for", "1.2.3.4, junk, 10.0.0.9")]), "10.0.0.9");
        assert_eq!(walk(&[("x-forwarded-for", "1.2.3.4, junk, 203.0.113.7")]), "203.0.113.7");
        // Two lines (HAProxy style) are one list, in order.
        assert_eq!(walk(&[("x-forwarded-for", "1.2.3.4, junk"), ("x-forwarded-for", "10.0.0.5")]), "10.0.0.5");
        assert_eq!(
            walk(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "203.0.113.7, 10.0.0.5")]),
            "203.0.113.7"
        );
        assert_eq!(walk(&[("x-forwarded-for", "10.0.0.3, 10.0.0.4")]), "10.0.0.3");
        assert_eq!(walk(&[]), "10.0.0.1");
        assert_eq!(walk(&[("forwarded", "for=1.2.3.4, for=\"[2001:db8::1]:443\";proto=https")]), "2001:db8::1");
        assert_eq!(walk(&[("forwarded", "for=1.2.3.4, for=unknown, for=10.0.0.7:80")]), "10.0.0.7");
        // An untrusted peer's headers are never read.
        let h = {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
            h
        };
        let peer: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let peer_trusted = trusted.iter().any(|n| n.contains(&peer));
        assert_eq!(super::client_addr(peer, peer_trusted, &trusted, &h).to_string(), "192.0.2.1");
    }

    use super::*;

    #[test]
    fn strips_connection_named_and_proxy_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    fn conn(peer: &str) -> ConnInfo {
        ConnInfo::new(peer.parse().unwrap(), "127.0.0.1:80".parse().unwrap(), "http")
    }

    #[test]
    fn ipv6_peers_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        set_forwarding(&mut h, &conn("[2001:db8::1]:443"), None, false);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }

    #[test]
    fn untrusted_forwarding_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        set_forwarding(&mut h, &conn("10.0.0.9:5555"), Some("api.test"), false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["forwarded"], "for=10.0.0.9;host=\"api.test\";proto=http");
    }

    #[test]
    fn trusted_forwarding_is_extended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarding(&mut h, &conn("10.0.0.9:5555"), Some("api.test"), true);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
