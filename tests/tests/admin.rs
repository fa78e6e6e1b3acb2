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
        b.body(full(body)).unwrap()
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
    let got = send(&client(), Request::post(gw.admin_url("/reload")).body(full("")).unwrap()).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.json()["error"], "invalid_config");
    assert!(got.json()["message"].as_str().unwrap().contains("weir.yaml:"), "{}", got.text());
    assert_eq!(get(&gw.url("/new")).await.status, 200, "old configuration must keep serving");
}
