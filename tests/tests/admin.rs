//! Admin API, start-up refusals and configuration reload against the real binary.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::time::Duration;

use http::Request;
use weir_e2e::*;

fn config(admin: &str, origin: &Origin, path: &str) -> String {
    format!(
        "listen:\n  - addr: 127.0.0.1:0\nadmin:\n{admin}routes:\n  - name: r\n    match: {{ path: {path} }}\n    upstream: {}\n",
        origin.url()
    )
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef-admin";

#[tokio::test(flavor = "multi_thread")]
async fn health_is_open_everything_else_needs_the_token() {
    let origin = Origin::hello().await;
    let yaml = config("  addr: 127.0.0.1:0\n  token_env: WEIR_TEST_TOKEN\n", &origin, "/");
    let gw = Gateway::builder().env("WEIR_TEST_TOKEN", TOKEN).start(&yaml);
    let got = get(&gw.admin_url("/health")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["status"], "ok");

    let c = client();
    let call = |method: &str, path: &str, auth: Option<String>| {
        let mut b = Request::builder().method(method).uri(gw.admin_url(path));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let body = if method == "POST" { r#"{"tags": ["t"]}"# } else { "" };
        b.header("content-type", "application/json").body(full(body)).unwrap()
    };
    // Every protected path refuses a missing, wrong, truncated or extended token.
    let protected = [
        ("POST", "/reload"),
        ("POST", "/cache/purge"),
        ("GET", "/metrics"),
        ("GET", "/ratelimits/r/k"),
        ("DELETE", "/ratelimits/r/k"),
        ("GET", "/nope"),
    ];
    let wrong = [
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
    ];
    for (m, p) in protected {
        for w in &wrong {
            let got = send(&c, call(m, p, w.clone())).await;
            assert_eq!(got.status, 401, "{m} {p} with {w:?}");
            assert_eq!(got.json()["error"], "unauthorized");
        }
    }
    // The scheme is case-insensitive (RFC 9110 §11.1).
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let got = send(&c, call("POST", "/reload", Some(format!("{scheme} {TOKEN}")))).await;
        assert_eq!(got.status, 200, "{scheme}: {}", got.text());
    }
    let got = send(&c, call("GET", "/metrics", Some(format!("Bearer {TOKEN}")))).await;
    assert_eq!(got.status, 200);
    let got = send(&c, call("POST", "/cache/purge", Some(format!("Bearer {TOKEN}")))).await;
    assert_eq!(got.status, 200, "{}", got.text());
}

#[test]
fn refuses_a_short_admin_token() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::hello());
    let yaml = config("  addr: 127.0.0.1:0\n  token_env: WEIR_TEST_TOKEN\n", &origin, "/");
    let err = Gateway::builder().env("WEIR_TEST_TOKEN", "s3cret").try_start(&yaml).expect_err("must refuse");
    assert!(err.contains("at least 32"), "{err}");
}

#[test]
fn refuses_to_start_when_the_token_variable_is_unset() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::hello());
    let yaml = config("  addr: 127.0.0.1:0\n  token_env: WEIR_TEST_TOKEN_UNSET\n", &origin, "/");
    let err = Gateway::builder().try_start(&yaml).expect_err("must refuse to start");
    assert!(err.contains("WEIR_TEST_TOKEN_UNSET"), "{err}");
}

/// `admin.token_file` (a container secret): the token is the file's content without its line
/// break; a missing or empty file refuses to start, naming it; a non-loopback admin with a
/// token file is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_can_come_from_a_file() {
    let origin = Origin::hello().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let yaml = config(&format!("  addr: 127.0.0.1:0\n  token_file: {}\n", file.display()), &origin, "/");
    let gw = Gateway::start(&yaml);
    let metrics = |auth: Option<String>| {
        let mut b = Request::get(gw.admin_url("/metrics"));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        send_owned(b.body(full("")).unwrap())
    };
    assert_eq!(metrics(None).await.status, 401);
    assert_eq!(metrics(Some(format!("Bearer {TOKEN}\n").trim().to_string())).await.status, 200);
    drop(gw);

    for (content, expect) in [(None, "cannot be read"), (Some(""), "is empty"), (Some("short\n"), "at least 32")] {
        match content {
            Some(c) => std::fs::write(&file, c).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        let err = Gateway::builder().try_start(&yaml).expect_err("must refuse to start");
        assert!(err.contains(expect) && (expect == "at least 32" || err.contains("admin-token")), "{err}");
    }
    // Both ways at once is a mistake.
    let both =
        config(&format!("  addr: 127.0.0.1:0\n  token_env: X\n  token_file: {}\n", file.display()), &origin, "/");
    let err = Gateway::builder().try_start(&both).expect_err("must refuse");
    assert!(err.contains("not both"), "{err}");
}

async fn send_owned(req: Request<weir_e2e::Body>) -> Got {
    send(&client(), req).await
}

#[test]
fn refuses_a_non_loopback_admin_without_token() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let origin = rt.block_on(Origin::hello());
    let yaml = config("  addr: 0.0.0.0:0\n", &origin, "/");
    let err = Gateway::builder().try_start(&yaml).expect_err("must refuse to start");
    assert!(err.contains("not on loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_a_broken_config_keeps_the_old_one() {
    let origin = Origin::hello().await;
    let admin = "  addr: 127.0.0.1:0\n";
    let gw = Gateway::start(&config(admin, &origin, "/old"));
    assert_eq!(get(&gw.url("/old")).await.status, 200);
    assert_eq!(get(&gw.url("/new")).await.status, 404);

    std::fs::write(&gw.config_path, config(admin, &origin, "/new")).unwrap();
    gw.signal("HUP");
    let mut reloaded = false;
    for _ in 0..100 {
        if get(&gw.url("/new")).await.status == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "SIGHUP did not load the new configuration:\n{}", gw.log());
    assert_eq!(get(&gw.url("/old")).await.status, 404);

    std::fs::write(&gw.config_path, "listen: [{addr: 127.0.0.1:0}]\nroutes:\n  - name: r\n    upstream: ftp://x\n")
        .unwrap();
    let got = gw.reload().await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"], "invalid_config");
    assert!(got.json()["message"].as_str().unwrap().contains("weir.yaml:"), "{}", got.text());
    assert_eq!(get(&gw.url("/new")).await.status, 200, "old configuration must keep serving");
}

/// The admin API cannot be driven by a web page on the operator's machine: no `Origin`, no
/// `Sec-Fetch-Site` but `none`, no `Host` name but `localhost` and `admin.hosts` (DNS
/// rebinding), and state changes only as JSON (a page sends `text/plain` without a preflight).
/// No token on loopback, as `make run` has it.
#[tokio::test(flavor = "multi_thread")]
async fn a_browser_cannot_drive_the_admin_api() {
    let origin = Origin::hello().await;
    let yaml = config("  addr: 127.0.0.1:0\n  hosts: [admin.internal]\n", &origin, "/");
    let gw = Gateway::start(&yaml);
    let c = client();
    let purge = |headers: &[(&str, &str)]| {
        let mut b = Request::post(gw.admin_url("/cache/purge"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(full(r#"{"prefixes": ["/"]}"#)).unwrap()
    };
    let json = ("content-type", "application/json");
    let port = gw.admin_url("/").rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Headers, u16, &str); 9] = [
        (&[json], 200, "a JSON call from a tool"),
        (&[("content-type", "text/plain")], 415, "a page's simple POST"),
        (&[], 415, "no content type"),
        (&[json, ("origin", "https://evil.example")], 403, "a page's fetch"),
        (&[json, ("sec-fetch-site", "cross-site")], 403, "a page's fetch, by Fetch metadata"),
        (&[json, ("sec-fetch-site", "none")], 200, "typed in the address bar"),
        (&[json, ("host", "rebind.evil.example")], 403, "DNS rebinding"),
        (&[json, ("host", "admin.internal")], 200, "a configured name"),
        (&[json, ("host", "localhost")], 200, "localhost"),
    ];
    for (headers, status, what) in cases {
        let got = send(&c, purge(headers)).await;
        assert_eq!(got.status, status, "{what}: {}", got.text());
        if status == 403 {
            assert_eq!(got.json()["error"], "forbidden", "{what}");
        }
    }
    let got = send(&c, purge(&[json, ("host", &format!("127.0.0.1:{port}"))])).await;
    assert_eq!(got.status, 200, "an IP address with its port");
    // Reads are held to the same names: a rebinding page cannot read /metrics either.
    let metrics = Request::get(gw.admin_url("/metrics")).header("host", "rebind.evil.example").body(full("")).unwrap();
    assert_eq!(send(&c, metrics).await.status, 403);
}
