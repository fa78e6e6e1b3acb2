//! What the README promises about the code, checked against the code: today, the table of
//! error codes (every code Weir answers, with its status).

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The README's error table lists exactly the codes Weir answers: every `code()` of
/// `GatewayError` and the TLS listener's `plain_http`, with the status `status()` gives.
#[test]
fn the_readme_error_table_matches_the_code() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let error = std::fs::read_to_string(src().join("error.rs")).unwrap();
    let readme = std::fs::read_to_string(root.join("../README.md")).unwrap();
    let tls = std::fs::read_to_string(src().join("tls.rs")).unwrap();
    // `GatewayError::Variant .. => "code",` inside `fn code`.
    let body = error.split("pub fn code(&self)").nth(1).unwrap().split("\n    }\n").next().unwrap();
    let mut in_code: BTreeSet<String> =
        body.lines().filter_map(|l| l.split("=> \"").nth(1)).map(|c| c.trim_end_matches("\",").to_string()).collect();
    assert!(tls.contains(r#""error":"plain_http""#));
    in_code.insert("plain_http".to_string());
    let table: BTreeMap<String, u16> = readme
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.strip_prefix("| `")?.split('|').map(str::trim).collect();
            let code = cells.first()?.strip_suffix('`')?;
            let status = cells.get(1)?.parse().ok()?;
            Some((code.to_string(), status))
        })
        .collect();
    let in_readme: BTreeSet<String> = table.keys().cloned().collect();
    assert_eq!(in_code, in_readme, "codes in error.rs (and plain_http) vs the README's table");
    for e in sample_errors() {
        let code = e.code().to_string();
        assert_eq!(table.get(&code).copied(), Some(e.status().as_u16()), "the README's status of `{code}`");
    }
}

/// One error of each status-bearing kind, to hold the table's statuses to `status()`.
fn sample_errors() -> Vec<weir::error::GatewayError> {
    use weir::error::{ConsumerMissing, GatewayError as E};
    vec![
        E::NoRoute { method: http::Method::GET, host: String::new(), path: String::new() },
        E::MethodNotAllowed { method: http::Method::GET, allow: vec![] },
        E::HeadersTooLarge { size: 0, limit: 0 },
        E::PayloadTooLarge { limit: 0 },
        E::BadRequest(String::new()),
        E::UpstreamUnavailable { upstream: String::new(), reason: String::new() },
        E::UpstreamBusy { route: String::new(), limit: 0 },
        E::UpstreamTimeout { upstream: String::new(), after: std::time::Duration::ZERO },
        E::Unauthorized,
        E::Forbidden(String::new()),
        E::UnsupportedMediaType,
        E::NotFound(String::new()),
        E::InvalidConfig { message: String::new() },
        E::NotCached,
        E::BudgetUnavailable,
        E::RateLimited { policy: String::new(), retry_after_s: 1, headers: vec![] },
        E::AuthFailures { retry_after_s: 1 },
        E::UnknownConsumer { missing: ConsumerMissing::Plugin },
        E::IdentifyUnavailable { outcome: "trap" },
        E::UpstreamTls { upstream: String::new() },
        E::Misdirected { host: String::new() },
        E::HttpsRequired,
        E::BudgetExhausted { budget: String::new(), retry_after_s: 1 },
        E::RateLimitUnavailable,
        E::TunnelsBusy,
        E::TooManyTunnels,
        E::ExpectationFailed(String::new()),
    ]
}
