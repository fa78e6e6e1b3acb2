//! TLS termination end to end: the real binary, certificates generated per test (rcgen), a
//! rustls client that reports what each handshake did, and an origin that echoes what it saw.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Version;
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_e2e::tls::{client_config, connect, Ca, Leaf, SecretDir};
use weir_e2e::*;

/// Answers with what it was sent: forwarding and identity headers, as JSON; cacheable.
async fn echo() -> (Origin, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    let o = Origin::start(move |req| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            let h = |k: &str| req.headers().get(k).map(|v| v.to_str().unwrap_or("?").to_string());
            let body = serde_json::json!({
                "path": req.uri().path(),
                "proto": h("x-forwarded-proto"),
                "forwarded": h("forwarded"),
                "client_cert": h("weir-client-cert"),
                "xfcc": h("x-forwarded-client-cert"),
                "consumer": h("weir-consumer"),
            });
            let mut r = text(200, &body.to_string());
            r.headers_mut().insert("cache-control", "max-age=60".parse().unwrap());
            r
        }
    })
    .await;
    (o, n)
}

/// `listen:` with a plain listener first and a TLS one second.
fn yaml(origin: &Origin, tls: &str, routes_extra: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\n  - addr: 127.0.0.1:0\n    tls:\n{tls}admin:\n  addr: 127.0.0.1:0\nroutes:\n{routes_extra}  - name: api\n    upstream: {}\n    cache: {{ ttl: 60s }}\n",
        origin.url()
    )
}

fn certs_block(pairs: &[(&Path, &Path)]) -> String {
    let mut s = String::from("      certs:\n");
    for (c, k) in pairs {
        s.push_str(&format!("        - {{ cert: {}, key: {} }}\n", c.display(), k.display()));
    }
    s
}

async fn metrics(gw: &Gateway) -> String {
    get(&gw.admin_url("/metrics")).await.text()
}

fn metric(m: &str, line_prefix: &str) -> u64 {
    m.lines().find_map(|l| l.strip_prefix(line_prefix)).map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

fn served(conn: &weir_e2e::tls::Conn, leaf: &Leaf) -> bool {
    conn.handshake.server_cert.as_ref() == Some(&leaf.der)
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_picks_the_certificate_alpn_gives_h2_and_other_hosts_get_421() {
    let (origin, _) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let api = ca.server(&["api.test", "*.api.test"]);
    let admin = ca.server(&["admin.test"]);
    let (ac, ak) = api.write(dir.path(), "api");
    let (dc, dk) = admin.write(dir.path(), "admin");
    let gw = Gateway::start(&yaml(&origin, &certs_block(&[(&ac, &ak), (&dc, &dk)]), ""));
    let addr = gw.listen[1];
    let h1 = client_config(ca.roots(), &["http/1.1"], None);
    let h2 = client_config(ca.roots(), &["h2", "http/1.1"], None);

    // SNI picks by name (a wildcard covers one label); an unknown name gets the first (default).
    for (sni, leaf) in [("api.test", &api), ("v2.api.test", &api), ("admin.test", &admin), ("other.test", &api)] {
        let conn = connect(addr, sni, &client_config(ca.roots(), &["http/1.1"], None)).await;
        if sni == "other.test" {
            // The client refuses the default certificate: it does not name other.test.
            assert!(conn.is_err(), "{sni}: {conn:?}");
            continue;
        }
        assert!(served(&conn.unwrap(), leaf), "{sni} was served the wrong certificate");
    }

    // ALPN h2: the request is served over HTTP/2, forwarded as https, keyed as https.
    let mut c = connect(addr, "api.test", &h2).await.unwrap();
    assert_eq!(c.handshake.alpn.as_deref(), Some(&b"h2"[..]));
    let g = c.get("api.test", "/x", &[]).await.unwrap();
    assert_eq!((g.status.as_u16(), g.version), (200, Version::HTTP_2), "{}", g.text());
    assert_eq!(g.json()["proto"], "https");
    assert!(g.json()["forwarded"].as_str().unwrap().ends_with("proto=https"), "{}", g.text());
    assert_eq!(g.header("cache-status"), Some("weir; fwd=miss; stored"));
    let g = c.get("api.test", "/x", &[]).await.unwrap();
    assert_eq!(g.header("cache-status"), Some("weir; hit; detail=l1"));
    // The same path over plain HTTP is another entry (scheme is part of the key).
    let g = get(&format!("http://{}/x", gw.listen[0])).await;
    assert_eq!(g.header("cache-status"), Some("weir; fwd=miss; stored"));
    assert_eq!(g.json()["proto"], "http");

    // HTTP/2 connection reuse for a name this certificate does not cover: 421, and a name it
    // covers is served on the same connection.
    let g = c.get("admin.test", "/x", &[]).await.unwrap();
    assert_eq!(g.status, 421, "{}", g.text());
    assert_eq!(g.json()["error"], "misdirected_request");
    let g = c.get("v9.api.test", "/y", &[]).await.unwrap();
    assert_eq!(g.status, 200);
    // HTTP/1.1 with a Host outside the certificate its SNI chose: 421 too.
    let mut c1 = connect(addr, "admin.test", &h1).await.unwrap();
    assert_eq!(c1.handshake.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(c1.get("api.test", "/x", &[]).await.unwrap().status, 421);
    assert_eq!(c1.get("admin.test", "/x", &[]).await.unwrap().status, 200);

    let m = metrics(&gw).await;
    assert!(metric(&m, r#"weir_tls_handshakes_total{kind="full"} "#) >= 5, "{m}");
    assert!(m.contains(r#"weir_tls_cert_expiry_seconds{name="api.test"}"#), "{m}");
    assert!(m.contains(r#"weir_tls_cert_expiry_seconds{name="admin.test"}"#), "{m}");
}

/// A ClientHello that offers only TLS 1.1 (no supported_versions extension), as a client
/// capped at TLS 1.1 sends it (with signature_algorithms, without which rustls stops earlier).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ECDHE-RSA-AES128-SHA, AES128-SHA
    body.extend_from_slice(&[0x01, 0x00]); // null compression
                                           // extensions: signature_algorithms (ecdsa_secp256r1_sha256, rsa_pkcs1_sha256)
    body.extend_from_slice(&[0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01]);
    let mut hs = vec![0x01, 0, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test(flavor = "multi_thread")]
async fn old_protocols_and_plain_http_are_refused_cleanly() {
    let (origin, hits) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let (c, k) = ca.server(&["api.test"]).write(dir.path(), "api");
    let gw = Gateway::start(&yaml(&origin, &certs_block(&[(&c, &k)]), ""));
    let addr = gw.listen[1];

    // TLS 1.1: a fatal protocol_version alert (record type 21, level 2, description 70).
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&tls11_client_hello()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("closed").unwrap();
    assert_eq!(out.first(), Some(&0x15), "an alert record: {out:x?}");
    assert_eq!(&out[5..7], &[2, 70], "fatal protocol_version: {out:x?}");

    // Plain HTTP on the TLS port: a 400 that says so, then the connection is closed (no hang).
    let t = Instant::now();
    let text = raw(addr, b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n", Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request"), "{text}");
    assert!(text.contains("plain_http"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(5), "closed, not left to time out: {:?}", t.elapsed());
    // Neither reached the origin; the gateway still serves.
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let mut conn = connect(addr, "api.test", &client_config(ca.roots(), &["h2"], None)).await.unwrap();
    assert_eq!(conn.get("api.test", "/", &[]).await.unwrap().status, 200);
    let m = metrics(&gw).await;
    assert_eq!(metric(&m, r#"weir_tls_handshake_errors_total{reason="protocol_version"} "#), 1, "{m}");
    assert_eq!(metric(&m, r#"weir_tls_handshake_errors_total{reason="plain_http"} "#), 1, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_swap_rotates_the_certificate_without_dropping_connections_or_sessions() {
    let (origin, _) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let v1 = ca.server(&["api.test"]);
    let v2 = ca.server(&["api.test"]);
    let mut secret = SecretDir::new(dir.path(), &v1);
    let gw = Gateway::start(&yaml(&origin, &certs_block(&[(&secret.cert(), &secret.key())]), ""));
    let addr = gw.listen[1];
    let sessions = client_config(ca.roots(), &["http/1.1"], None);

    // A full handshake, a request read (TLS 1.3 tickets arrive with it), then a resumption.
    let mut before = connect(addr, "api.test", &sessions).await.unwrap();
    assert_eq!(before.handshake.kind, Some(HandshakeKind::Full));
    assert!(served(&before, &v1));
    assert_eq!(before.get("api.test", "/a", &[]).await.unwrap().status, 200);
    let mut again = connect(addr, "api.test", &sessions).await.unwrap();
    assert_eq!(again.handshake.kind, Some(HandshakeKind::Resumed));
    assert_eq!(again.get("api.test", "/a", &[]).await.unwrap().status, 200);

    // Rotate: a new handshake is served v2 (the watcher polls every second).
    secret.rotate(&v2.cert_pem, &v2.key_pem);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fresh = connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], None)).await.unwrap();
        if served(&fresh, &v2) {
            break;
        }
        assert!(Instant::now() < deadline, "v2 not served 20 s after the swap:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before the swap keeps working, and sessions still resume.
    assert_eq!(before.get("api.test", "/b", &[]).await.unwrap().status, 200);
    let mut resumed = connect(addr, "api.test", &sessions).await.unwrap();
    assert_eq!(resumed.handshake.kind, Some(HandshakeKind::Resumed), "a reload must not force full handshakes");
    assert_eq!(resumed.get("api.test", "/c", &[]).await.unwrap().status, 200);

    // A broken replacement is rejected (counted, logged) and v2 keeps serving.
    let errors = |m: &str| metric(m, r#"weir_config_reloads_total{result="error"} "#);
    assert_eq!(errors(&metrics(&gw).await), 0);
    secret.rotate("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", &v2.key_pem);
    let deadline = Instant::now() + Duration::from_secs(20);
    while errors(&metrics(&gw).await) == 0 {
        assert!(Instant::now() < deadline, "the broken certificate was not noticed:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], None)).await.unwrap();
    assert!(served(&fresh, &v2), "the old certificate keeps serving");
    assert!(gw.log().contains("tls.crt"), "the log names the file:\n{}", gw.log());
    assert_eq!(before.get("api.test", "/d", &[]).await.unwrap().status, 200);
    let m = metrics(&gw).await;
    assert!(metric(&m, r#"weir_config_reloads_total{result="ok"} "#) >= 1, "{m}");
}

/// mTLS, required: no certificate is refused; a valid one is served, its identity forwarded in
/// `Weir-Client-Cert` and used as the consumer of a limit; after a reload that replaces the client
/// CA, a session resumed from before is refused (ticket keys and cache were replaced).
#[tokio::test(flavor = "multi_thread")]
async fn mtls_identifies_the_consumer_and_a_ca_change_ends_old_sessions() {
    let (origin, hits) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let clients = Ca::new("Client CA");
    let other = Ca::new("Other Client CA");
    let (c, k) = ca.server(&["api.test"]).write(dir.path(), "api");
    let ca_file = clients.write(dir.path(), "clients.pem");
    let other_file = other.write(dir.path(), "other.pem");
    let tls = |ca: &Path| format!("{}      client_ca: {}\n", certs_block(&[(&c, &k)]), ca.display());
    let route = "  - name: mtls\n    match: { path: /m }\n    upstream: ORIGIN\n    consumer: { from: client_cert, required: true }\n    rate_limit: { key: consumer, rate: 1/1h, burst: 2 }\n"
        .replace("ORIGIN", &origin.url());
    let gw = Gateway::start(&yaml(&origin, &tls(&ca_file), &route));
    let addr = gw.listen[1];

    // No client certificate: refused in the handshake, or (TLS 1.3) on the first read.
    match connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], None)).await {
        Err(_) => {}
        Ok(mut conn) => assert!(conn.get("api.test", "/m", &[]).await.is_err(), "served without a certificate"),
    }
    // A certificate from another CA: refused too.
    let mallory = other.client("mallory");
    match connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], Some(&mallory))).await {
        Err(_) => {}
        Ok(mut conn) => assert!(conn.get("api.test", "/m", &[]).await.is_err(), "served a foreign certificate"),
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let alice = clients.client("alice");
    let sessions = client_config(ca.roots(), &["http/1.1"], Some(&alice));
    let mut conn = connect(addr, "api.test", &sessions).await.unwrap();
    let forged = [("weir-client-cert", "subject=\"CN=root\""), ("x-forwarded-client-cert", "By=x;Subject=\"CN=root\"")];
    let g = conn.get("api.test", "/m", &forged).await.unwrap();
    assert_eq!(g.status, 200, "{}", g.text());
    let seen = g.json();
    assert_eq!(seen["consumer"], "alice");
    let cert = seen["client_cert"].as_str().unwrap();
    assert!(cert.contains("subject=\"CN=alice\"") && cert.starts_with("hash=:"), "{cert}");
    assert!(seen["xfcc"].is_null(), "a client's X-Forwarded-Client-Cert is stripped: {seen}");
    assert_eq!(conn.get("api.test", "/m", &[]).await.unwrap().status, 200);
    // The third is over alice's quota: the limit is keyed by her certificate.
    assert_eq!(conn.get("api.test", "/m", &[]).await.unwrap().status, 429);
    // A resumed session keeps her identity (429, not 401).
    let mut resumed = connect(addr, "api.test", &sessions).await.unwrap();
    assert_eq!(resumed.handshake.kind, Some(HandshakeKind::Resumed));
    assert_eq!(resumed.get("api.test", "/m", &[]).await.unwrap().status, 429);

    // The client CA is replaced: alice's old session must not resume into the new trust.
    std::fs::write(&gw.config_path, yaml(&origin, &tls(&other_file), &route)).unwrap();
    let r = gw.reload().await;
    assert_eq!(r.status, 200, "{}", r.text());
    match connect(addr, "api.test", &sessions).await {
        Err(_) => {}
        Ok(mut conn) => {
            assert_ne!(conn.handshake.kind, Some(HandshakeKind::Resumed), "resumed across a client CA change");
            assert!(conn.get("api.test", "/m", &[]).await.is_err(), "alice's certificate is no longer trusted");
        }
    }
    // mallory's CA is the trusted one now.
    let mut conn = connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], Some(&mallory))).await.unwrap();
    let g = conn.get("api.test", "/m", &[]).await.unwrap();
    assert_eq!((g.status.as_u16(), g.json()["consumer"].as_str()), (200, Some("mallory")));
    let m = metrics(&gw).await;
    assert!(metric(&m, r#"weir_tls_handshake_errors_total{reason="no_client_cert"} "#) >= 1, "{m}");
}

/// `client_auth: optional`: a connection without a certificate is served, but a route that
/// requires a certificate consumer answers 401; `match.scheme: https` routes do not answer on
/// the plain listener.
#[tokio::test(flavor = "multi_thread")]
async fn optional_client_auth_and_https_only_routes() {
    let (origin, hits) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let clients = Ca::new("Client CA");
    let (c, k) = ca.server(&["api.test"]).write(dir.path(), "api");
    let ca_file = clients.write(dir.path(), "clients.pem");
    let tls =
        format!("{}      client_ca: {}\n      client_auth: optional\n", certs_block(&[(&c, &k)]), ca_file.display());
    let routes = "  - name: mtls\n    match: { path: /m, scheme: https }\n    upstream: ORIGIN\n    consumer: { from: client_cert, required: true }\n"
        .replace("ORIGIN", &origin.url());
    let gw = Gateway::start(&yaml(&origin, &tls, &routes));
    let addr = gw.listen[1];

    let mut anon = connect(addr, "api.test", &client_config(ca.roots(), &["h2"], None)).await.unwrap();
    assert_eq!(anon.get("api.test", "/open", &[]).await.unwrap().status, 200);
    let g = anon.get("api.test", "/m", &[]).await.unwrap();
    assert_eq!(g.status, 401, "{}", g.text());
    assert_eq!(g.header("www-authenticate"), Some("ClientCertificate realm=\"weir\""));
    let mut bob =
        connect(addr, "api.test", &client_config(ca.roots(), &["h2"], Some(&clients.client("bob")))).await.unwrap();
    let g = bob.get("api.test", "/m", &[]).await.unwrap();
    assert_eq!((g.status.as_u16(), g.json()["consumer"].as_str()), (200, Some("bob")));

    // The plain listener: the https-only route is refused, the rest answers.
    let before = hits.load(Ordering::SeqCst);
    let g = get(&format!("http://{}/m", gw.listen[0])).await;
    assert_eq!(g.status, 403, "{}", g.text());
    assert_eq!(g.json()["error"], "https_required");
    assert_eq!(hits.load(Ordering::SeqCst), before, "refused before the origin");
    assert_eq!(get(&format!("http://{}/open", gw.listen[0])).await.status, 200);
}

#[test]
fn validate_reports_certificate_problems_at_their_entry() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let (c, k) = ca.server(&["api.test"]).write(dir.path(), "api");
    let (c2, k2) = ca.server(&["b.test"]).write(dir.path(), "b");
    let (ec, ek) = ca.expired(&["old.test"]).write(dir.path(), "old");
    let doc = |tls: &str| {
        format!(
            "listen:\n  - addr: 127.0.0.1:0\n    tls:\n{tls}routes:\n  - name: r\n    upstream: http://127.0.0.1:1\n"
        )
    };
    let missing = dir.path().join("nope.key");
    let (ok, out) = validate_in(&doc(&certs_block(&[(&c, &missing)])), dir.path());
    assert!(!ok && out.contains("weir.yaml:5:") && out.contains("key file") && out.contains("nope.key"), "{out}");
    // b.test's key with api.test's certificate.
    let (ok, out) = validate_in(&doc(&certs_block(&[(&c, &k), (&c2, &k)])), dir.path());
    assert!(!ok && out.contains("weir.yaml:6:") && out.contains("does not match"), "{out}");
    let _ = k2;
    // Not a certificate at all.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let (ok, out) = validate_in(&doc(&certs_block(&[(&junk, &k)])), dir.path());
    assert!(!ok && out.contains("junk.pem"), "{out}");
    // TLS 1.1 is not offered; client_auth needs a CA.
    let (ok, out) = validate_in(
        &doc(&format!("{}      min_version: \"1.1\"\n      client_auth: optional\n", certs_block(&[(&c, &k)]))),
        dir.path(),
    );
    assert!(!ok && out.contains("min_version") && out.contains("client_auth needs `client_ca`"), "{out}");
    // Expired: a warning (the certificate still serves), not a refusal.
    let (ok, out) = validate_in(&doc(&certs_block(&[(&ec, &ek)])), dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("warning:") && out.contains("expired") && out.contains("weir.yaml:5:"), "{out}");
}

fn upstream_yaml(origin: std::net::SocketAddr, route_extra: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nroutes:\n  - name: up\n    upstream: https://localhost:{}\n{route_extra}",
        origin.port()
    )
}

/// `https://` upstreams: a private CA is trusted through `upstream_tls.ca`, a client certificate
/// is presented, `server_name` and `upstream_host` pick the names, HTTP/2 is negotiated on
/// request; a certificate that does not verify is 502 `upstream_tls` (the reason in the log).
#[tokio::test(flavor = "multi_thread")]
async fn https_upstreams_verify_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Upstream CA");
    let origin_leaf = ca.server(&["localhost", "backend.internal"]);
    let origin = weir_e2e::tls::https_origin(&origin_leaf, None).await;
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");

    // Without the CA: the web PKI does not know it, so 502 upstream_tls, reason logged only.
    let gw = Gateway::start(&upstream_yaml(origin, ""));
    let g = get(&gw.url("/x")).await;
    assert_eq!(g.status, 502, "{}", g.text());
    assert_eq!(g.json()["error"], "upstream_tls", "{}", gw.log());
    assert!(!g.text().contains("UnknownIssuer"), "the reason stays in the log: {}\n{}", g.text(), gw.log());
    assert!(gw.log().contains("TLS to the upstream failed"), "{}", gw.log());
    drop(gw);

    // With it: served; Host is the client's by default, the upstream's own with `upstream`.
    let tls = format!("    upstream_tls: {{ ca: {} }}\n", ca_file.display());
    let gw = Gateway::start(&upstream_yaml(origin, &tls));
    let g = get(&gw.url("/x")).await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(g.json()["host"].as_str(), Some(gw.addr().to_string().as_str()));
    assert_eq!(g.json()["version"], "HTTP/1.1");
    assert_eq!(g.json()["sni"], "localhost");
    drop(gw);
    let gw = Gateway::start(&upstream_yaml(
        origin,
        &format!("{tls}    upstream_host: upstream\n    upstream_http2: true\n"),
    ));
    let g = get(&gw.url("/x")).await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(g.json()["version"], "HTTP/2.0");
    let own = format!("localhost:{}", origin.port());
    assert!(
        g.json()["host"].as_str() == Some(own.as_str()) || g.json()["authority"].as_str() == Some(own.as_str()),
        "{}",
        g.text()
    );
    drop(gw);

    // server_name: SNI and verification use it (the certificate names backend.internal).
    let gw = Gateway::start(&upstream_yaml(
        origin,
        &format!("    upstream_tls: {{ ca: {}, server_name: backend.internal }}\n", ca_file.display()),
    ));
    let g = get(&gw.url("/x")).await;
    assert_eq!((g.status.as_u16(), g.json()["sni"].as_str()), (200, Some("backend.internal")));
    drop(gw);
    // ... and a name it does not cover fails verification.
    let gw = Gateway::start(&upstream_yaml(
        origin,
        &format!("    upstream_tls: {{ ca: {}, server_name: elsewhere.test }}\n", ca_file.display()),
    ));
    assert_eq!(get(&gw.url("/x")).await.json()["error"], "upstream_tls");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_requires_a_client_certificate_gets_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Upstream CA");
    let clients = Ca::new("Gateway client CA");
    let origin = weir_e2e::tls::https_origin(&ca.server(&["localhost"]), Some(&clients)).await;
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    let (cc, ck) = clients.client("weir-gateway").write(dir.path(), "gw-client");
    // Without a client certificate the upstream refuses the handshake.
    let gw = Gateway::start(&upstream_yaml(origin, &format!("    upstream_tls: {{ ca: {} }}\n", ca_file.display())));
    assert_eq!(get(&gw.url("/x")).await.status, 502);
    drop(gw);
    let gw = Gateway::start(&upstream_yaml(
        origin,
        &format!(
            "    upstream_tls: {{ ca: {}, client_cert: {}, client_key: {} }}\n",
            ca_file.display(),
            cc.display(),
            ck.display()
        ),
    ));
    let g = get(&gw.url("/x")).await;
    assert_eq!((g.status.as_u16(), g.json()["client_cert"].as_bool()), (200, Some(true)), "{}", g.text());

    // `verify: false` is a warning in `weir validate`; a key that is not the certificate's is
    // an error.
    let (other_c, _) = clients.client("other").write(dir.path(), "other");
    let (ok, out) = validate_in(
        &upstream_yaml(
            origin,
            &format!("    upstream_tls: {{ client_cert: {}, client_key: {} }}\n", other_c.display(), ck.display()),
        ),
        dir.path(),
    );
    assert!(!ok && out.contains("does not match"), "{out}");
    let (ok, out) = validate_in(&upstream_yaml(origin, "    upstream_tls: { verify: false }\n"), dir.path());
    assert!(ok && out.contains("warning:") && out.contains("verify: false"), "{out}");
}

/// A client that connects and then says nothing, or stops inside its ClientHello, is closed
/// after `handshake_timeout` (not the default 10 s), counted; HSTS goes on TLS responses only.
#[tokio::test(flavor = "multi_thread")]
async fn silent_clients_are_cut_at_the_handshake_timeout_and_hsts_is_tls_only() {
    let (origin, _) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let (c, k) = ca.server(&["api.test"]).write(dir.path(), "api");
    let tls = format!("{}      handshake_timeout: 1s\n      hsts: 365d\n", certs_block(&[(&c, &k)]));
    let gw = Gateway::start(&yaml(&origin, &tls, ""));
    let addr = gw.listen[1];
    for first in [&b""[..], &[0x16, 0x03, 0x01][..]] {
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(first).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "still open after 8 s (sent {first:?})");
        assert!(t.elapsed() < Duration::from_secs(5), "closed after {:?}, not at the 1 s timeout", t.elapsed());
    }
    let m = metrics(&gw).await;
    assert_eq!(metric(&m, r#"weir_tls_handshake_errors_total{reason="timeout"} "#), 2, "{m}");

    let mut conn = connect(addr, "api.test", &client_config(ca.roots(), &["h2"], None)).await.unwrap();
    let g = conn.get("api.test", "/", &[]).await.unwrap();
    assert_eq!(g.header("strict-transport-security"), Some("max-age=31536000"));
    let g = get(&format!("http://{}/", gw.listen[0])).await;
    assert_eq!(g.header("strict-transport-security"), None, "never over plain HTTP");
}

/// `client_crl`: a revoked certificate is refused in new handshakes, cannot resume a session
/// from before the revocation, and a connection it opened earlier is refused on its next request;
/// a list whose nextUpdate has passed refuses every certificate it covers; the gauge tells.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_client_certificate_is_refused_in_new_resumed_and_open_connections() {
    let (origin, hits) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let clients = Ca::new("Client CA");
    let (c, k) = ca.server(&["api.test"]).write(dir.path(), "api");
    let ca_file = clients.write(dir.path(), "clients.pem");
    let crl_file = dir.path().join("clients.crl");
    // Replaced by rename, as a CRL fetcher would.
    let publish = |pem: String| {
        let tmp = dir.path().join("clients.crl.tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, &crl_file).unwrap();
    };
    let (alice, bob) = (clients.client("alice"), clients.client("bob"));
    publish(clients.crl(&[], false));
    let tls = format!(
        "{}      client_ca: {}\n      client_crl: {}\n",
        certs_block(&[(&c, &k)]),
        ca_file.display(),
        crl_file.display()
    );
    let route = "  - name: mtls\n    match: { path: /m }\n    upstream: ORIGIN\n    consumer: { from: client_cert, required: true }\n"
        .replace("ORIGIN", &origin.url());
    let gw = Gateway::start(&yaml(&origin, &tls, &route));
    let addr = gw.listen[1];
    let reload = || async {
        let r = gw.reload().await;
        assert_eq!(r.status, 200, "{}", r.text());
    };

    let bob_sessions = client_config(ca.roots(), &["http/1.1"], Some(&bob));
    let mut bob_open = connect(addr, "api.test", &bob_sessions).await.unwrap();
    let g = bob_open.get("api.test", "/m", &[]).await.unwrap();
    assert_eq!((g.status.as_u16(), g.json()["consumer"].as_str()), (200, Some("bob")));
    let mut alice_open =
        connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], Some(&alice))).await.unwrap();
    assert_eq!(alice_open.get("api.test", "/m", &[]).await.unwrap().status, 200);
    // Before the revocation bob resumes.
    let mut again = connect(addr, "api.test", &bob_sessions).await.unwrap();
    assert_eq!(again.handshake.kind, Some(HandshakeKind::Resumed));
    assert_eq!(again.get("api.test", "/m", &[]).await.unwrap().status, 200);
    let m = metrics(&gw).await;
    let left = m
        .lines()
        .find_map(|l| l.strip_prefix(r#"weir_tls_crl_expiry_seconds{issuer="CN=Client CA"} "#))
        .map(|v| v.trim().parse::<i64>().unwrap());
    assert!(left.is_some_and(|s| s > 86_400 * 365), "{m}");
    let served_before = hits.load(Ordering::SeqCst);

    // bob is revoked.
    publish(clients.crl(&[&bob], false));
    reload().await;
    // The connection he opened before: refused on its next request, and closed.
    let g = bob_open.get("api.test", "/m", &[]).await.unwrap();
    assert_eq!((g.status.as_u16(), g.json()["error"].as_str()), (403, Some("client_cert_revoked")), "{}", g.text());
    assert!(bob_open.get("api.test", "/m", &[]).await.is_err(), "the revoked connection stays open");
    // His session from before cannot be resumed, and a new handshake is refused.
    match connect(addr, "api.test", &bob_sessions).await {
        Err(_) => {}
        Ok(mut conn) => {
            assert_ne!(conn.handshake.kind, Some(HandshakeKind::Resumed), "a revoked certificate resumed");
            assert!(conn.get("api.test", "/m", &[]).await.is_err(), "a revoked certificate was served");
        }
    }
    match connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], Some(&bob))).await {
        Err(_) => {}
        Ok(mut conn) => assert!(conn.get("api.test", "/m", &[]).await.is_err(), "a revoked certificate was served"),
    }
    // alice, on her open connection and on a new one, is not affected.
    assert_eq!(alice_open.get("api.test", "/m", &[]).await.unwrap().status, 200);
    let mut fresh = connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], Some(&alice))).await.unwrap();
    assert_eq!(fresh.get("api.test", "/m", &[]).await.unwrap().status, 200);
    assert_eq!(hits.load(Ordering::SeqCst), served_before + 2, "only alice's two requests reached the origin");
    let m = metrics(&gw).await;
    assert!(metric(&m, r#"weir_tls_handshake_errors_total{reason="bad_client_cert"} "#) >= 1, "{m}");

    // A list past its nextUpdate: nobody it covers is let in (it is enforced), and the gauge
    // turns negative.
    publish(clients.crl(&[], true));
    reload().await;
    match connect(addr, "api.test", &client_config(ca.roots(), &["http/1.1"], Some(&alice))).await {
        Err(_) => {}
        Ok(mut conn) => assert!(conn.get("api.test", "/m", &[]).await.is_err(), "served under a stale CRL"),
    }
    let m = metrics(&gw).await;
    assert!(m.contains(r#"weir_tls_crl_expiry_seconds{issuer="CN=Client CA"} -"#), "{m}");
}

#[test]
fn validate_checks_the_client_crl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let clients = Ca::new("Client CA");
    let (c, k) = ca.server(&["api.test"]).write(dir.path(), "api");
    let ca_file = clients.write(dir.path(), "clients.pem");
    let doc = |extra: &str| {
        format!(
            "listen:\n  - addr: 127.0.0.1:0\n    tls:\n{}{extra}routes:\n  - name: r\n    upstream: http://127.0.0.1:1\n",
            certs_block(&[(&c, &k)])
        )
    };
    let crl = dir.path().join("clients.crl");
    std::fs::write(&crl, clients.crl(&[], false)).unwrap();
    let (ok, out) = validate_in(
        &doc(&format!("      client_ca: {}\n      client_crl: {}\n", ca_file.display(), crl.display())),
        dir.path(),
    );
    assert!(ok && !out.contains("warning"), "{out}");
    // Without the CA it revokes for.
    let (ok, out) = validate_in(&doc(&format!("      client_crl: {}\n", crl.display())), dir.path());
    assert!(!ok && out.contains("weir.yaml:6:") && out.contains("client_crl needs `client_ca`"), "{out}");
    // Not a CRL.
    let junk = clients.write(dir.path(), "junk.crl");
    let (ok, out) = validate_in(
        &doc(&format!("      client_ca: {}\n      client_crl: {}\n", ca_file.display(), junk.display())),
        dir.path(),
    );
    assert!(!ok && out.contains("weir.yaml:7:") && out.contains("junk.crl"), "{out}");
    // Stale: a warning that says what it does.
    std::fs::write(&crl, clients.crl(&[], true)).unwrap();
    let (ok, out) = validate_in(
        &doc(&format!("      client_ca: {}\n      client_crl: {}\n", ca_file.display(), crl.display())),
        dir.path(),
    );
    assert!(ok, "{out}");
    assert!(out.contains("weir.yaml:7:") && out.contains("warning:") && out.contains("refused"), "{out}");
}

/// One route answers both listeners from one origin: a write over one scheme purges what was
/// cached for the same URL over the other, both ways.
/// Found by the reliability soak: HTTPS readers were served the old body for the entry's TTL.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_over_http_purges_what_https_readers_were_served_and_back() {
    let (origin, fetched) = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Weir Test CA");
    let (cert, key) = ca.server(&["api.test"]).write(dir.path(), "api");
    let gw = Gateway::start(&yaml(&origin, &certs_block(&[(&cert, &key)]), ""));
    let cfg = client_config(ca.roots(), &["http/1.1"], None);
    let mut tls = connect(gw.listen[1], "api.test", &cfg).await.unwrap();
    let plain = client();
    let plain_get = |path: &str| http::Request::get(gw.url(path)).header("host", "api.test").body(full("")).unwrap();
    let post = |path: &str| http::Request::post(gw.url(path)).header("host", "api.test").body(full("w")).unwrap();

    // Cached over HTTPS, then a hit.
    for _ in 0..2 {
        assert_eq!(tls.get("api.test", "/doc", &[]).await.unwrap().status, 200);
    }
    assert_eq!(fetched.load(Ordering::SeqCst), 1);
    // A write over plain HTTP: the next HTTPS read goes to the origin.
    assert_eq!(send(&plain, post("/doc")).await.status, 200);
    let before = fetched.load(Ordering::SeqCst);
    let got = tls.get("api.test", "/doc", &[]).await.unwrap();
    assert_eq!(got.header("cache-status").map(|s| s.contains("fwd=miss")), Some(true), "{:?}", got.headers);
    assert_eq!(fetched.load(Ordering::SeqCst), before + 1, "an HTTPS reader was served what a write replaced");

    // And the other way: cached over HTTP, written over HTTPS.
    for _ in 0..2 {
        assert_eq!(send(&plain, plain_get("/other")).await.status, 200);
    }
    let cached = fetched.load(Ordering::SeqCst);
    let mut w = connect(gw.listen[1], "api.test", &cfg).await.unwrap();
    let wrote = w.post("api.test", "/other", "w").await.unwrap();
    assert_eq!(wrote.status, 200);
    let after_write = fetched.load(Ordering::SeqCst);
    assert_eq!(after_write, cached + 1, "the write itself reached the origin");
    let got = send(&plain, plain_get("/other")).await;
    assert_eq!(got.status, 200);
    assert_eq!(fetched.load(Ordering::SeqCst), after_write + 1, "an HTTP reader was served what a write replaced");
}
