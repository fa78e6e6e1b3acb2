//! Property tests for the code every request's cache key goes through — target normalisation,
//! key construction, `Cache-Control` and targeted-field parsing, the canonical request on
//! arbitrary heads — and for what reads untrusted bytes: the configuration loader and the L2
//! entry decoder. Bounded (`PROPTEST_CASES`, 512 by default) so
//! `make test` runs them on every change; set `PROPTEST_CASES=100000` for a long run.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use weir::cache::control::{RequestDirectives, ResponseDirectives};
use weir::cache::key;
use weir::proxy::canonical::{normalize_path, normalize_query};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Paths built from the bytes that matter: separators, dots, escapes (valid and not), unreserved
/// and reserved characters.
fn path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E".to_string()),
        Just("%2f".to_string()),
        Just("%41".to_string()),
        Just("%7e".to_string()),
        Just("%zz".to_string()),
        Just("%".to_string()),
        Just(";".to_string()),
        "[a-zA-Z0-9~_-]{1,3}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| format!("/{}", v.concat()))
}

fn query() -> impl Strategy<Value = String> {
    let name = prop_oneof![Just("a"), Just("b"), Just("id"), Just("%61"), Just("")];
    let value = prop_oneof![Just(""), Just("=1"), Just("=2"), Just("=%41"), Just("=x%26y"), Just("=a=b")];
    prop::collection::vec((name, value), 0..8)
        .prop_map(|v| v.into_iter().map(|(n, v)| format!("{n}{v}")).collect::<Vec<_>>().join("&"))
}

/// The name of a normalised pair, as the normaliser sorts by it.
fn name(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(n, _)| n)
}

proptest! {
    #![proptest_config(config())]

    /// Normalising twice changes nothing, and the result has no dot segment left to resolve:
    /// the path that is routed is the path that is keyed and forwarded.
    #[test]
    fn path_normalisation_is_idempotent_and_leaves_no_dot_segments(p in path()) {
        if let Ok(n) = normalize_path(&p) {
            prop_assert_eq!(normalize_path(&n).unwrap(), n.clone());
            prop_assert!(n.starts_with('/'));
            prop_assert!(!n.split('/').any(|s| s == "." || s == ".."), "{} -> {}", p, n);
            prop_assert!(!n.to_ascii_lowercase().contains("%2e"), "an escaped dot survived: {}", n);
        } else {
            prop_assert!(p.contains('%'), "only a bad escape is refused: {}", p);
        }
    }

    /// The query is sorted by name, stably: same-name parameters keep their order, no pair is
    /// lost or invented, and normalising twice changes nothing.
    #[test]
    fn query_normalisation_keeps_every_pair_and_same_name_order(q in query()) {
        let n = normalize_query(&q).unwrap();
        prop_assert_eq!(normalize_query(&n).unwrap(), n.clone());
        let pairs: Vec<&str> = n.split('&').filter(|p| !p.is_empty()).collect();
        prop_assert!(pairs.windows(2).all(|w| name(w[0]) <= name(w[1])), "not sorted: {}", n);
        let mut input: Vec<String> = q
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| normalize_query(p).unwrap())
            .collect();
        input.sort_by(|a, b| name(a).cmp(name(b)));
        prop_assert_eq!(pairs, input.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// Keys are injective in their fields: no choice of host, path or query can write the key of
    /// another request (the separator-injection hole).
    #[test]
    fn primary_keys_are_injective(
        a in prop::collection::vec("[a-z:|0-9/?&=]{0,6}", 5),
        b in prop::collection::vec("[a-z:|0-9/?&=]{0,6}", 5),
        ha in prop::option::of("[0-9a-f:]{0,4}"),
        hb in prop::option::of("[0-9a-f:]{0,4}"),
    ) {
        let ka = key::primary(&a[0], &a[1], &a[2], &a[3], &a[4], ha.as_deref());
        let kb = key::primary(&b[0], &b[1], &b[2], &b[3], &b[4], hb.as_deref());
        prop_assert_eq!(ka == kb, a == b && ha == hb);
        let pa = key::plugin(&a[0], &a[1], &a[2]);
        prop_assert_ne!(pa, ka, "a plugin key never equals a policy key");
    }

    /// `Cache-Control` parsing never panics on any visible-ASCII value, on either side.
    #[test]
    fn cache_control_parsing_never_panics(v in "[ -~]{0,64}") {
        let mut h = HeaderMap::new();
        h.append(http::header::CACHE_CONTROL, HeaderValue::from_str(&v).unwrap());
        let _ = ResponseDirectives::parse(&h);
        let _ = RequestDirectives::parse(&h);
    }

    /// Directives written in any order, case and spacing, across one or two header lines,
    /// parse to what they say; of a duplicated delta directive the first counts; a malformed
    /// delta makes the directive absent; huge values saturate at 2^31 s.
    #[test]
    fn cache_control_directives_parse_to_what_they_say(
        max_age in prop::option::of(prop_oneof![0u64..100_000, Just(u64::MAX)]),
        dup in prop::option::of(0u64..100),
        s_maxage in prop::option::of(0u64..1000),
        flags in prop::collection::vec(any::<bool>(), 4),
        bad in any::<bool>(),
        upper in any::<bool>(),
        split in 0usize..8,
        order in any::<u64>(),
    ) {
        let mut items: Vec<String> = Vec::new();
        if let Some(m) = max_age {
            items.push(format!("max-age={m}"));
        }
        if let Some(s) = s_maxage {
            items.push(format!("s-maxage=\"{s}\""));
        }
        for (on, d) in flags.iter().zip(["no-store", "private", "must-revalidate", "public"]) {
            if *on {
                items.push(d.to_string());
            }
        }
        if bad {
            items.push("stale-if-error=1x".into());
            items.push("x-unknown=\"a, b\"".into());
        }
        // A fixed permutation from the drawn seed (the max-age duplicate stays after the first).
        let n = items.len();
        if n > 1 {
            for i in 0..n {
                let j = usize::try_from(order.rotate_left(u32::try_from(i).unwrap()) % n as u64).unwrap();
                items.swap(i, j);
            }
        }
        if let (Some(_), Some(d)) = (max_age, dup) {
            items.push(format!("max-age={d}"));
        }
        if upper {
            items = items.into_iter().map(|s| s.to_ascii_uppercase()).collect();
        }
        let cut = split.min(items.len());
        let mut h = HeaderMap::new();
        for line in [&items[..cut], &items[cut..]] {
            if !line.is_empty() {
                h.append(http::header::CACHE_CONTROL, HeaderValue::from_str(&line.join(" ,  ")).unwrap());
            }
        }
        let d = ResponseDirectives::parse(&h);
        prop_assert_eq!(d.max_age, max_age.map(|m| Duration::from_secs(m.min(1 << 31))));
        prop_assert_eq!(d.s_maxage, s_maxage.map(Duration::from_secs));
        prop_assert_eq!([d.no_store, d.private, d.must_revalidate, d.public], [flags[0], flags[1], flags[2], flags[3]]);
        prop_assert_eq!(d.stale_if_error, None);
    }
}

/// A header name the `http` crate accepts (lower-case token characters).
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("host".to_string()),
        Just("x-forwarded-for".to_string()),
        Just("connection".to_string()),
        Just("upgrade".to_string()),
        Just("forwarded".to_string()),
        Just("x-original-url".to_string()),
        Just("content-length".to_string()),
        Just("weir-consumer".to_string()),
        "[a-z0-9!#$%&'*+.^_`|~-]{1,12}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes as a configuration file: never a panic; every problem is positioned
    /// (`FILE:LINE:COL: message`, line and column from 1).
    #[test]
    fn the_config_loader_never_panics_and_positions_every_problem(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.yaml");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = weir::config::load(&path) {
            prop_assert!(!e.problems.is_empty());
            for p in &e.problems {
                prop_assert!(p.pos.line >= 1 && p.pos.col >= 1, "{p}");
                prop_assert!(!p.message.is_empty());
            }
        }
    }

    /// YAML-shaped text from the configuration's own words: the same promise, deeper in.
    #[test]
    fn configuration_shaped_text_never_panics(
        lines in proptest::collection::vec(
            (0usize..3, prop_oneof![
                Just("listen:"), Just("- addr: 127.0.0.1:0"), Just("routes:"), Just("- name: r"),
                Just("upstream: http://127.0.0.1:9"), Just("cache: {ttl: 5s}"), Just("rate_limit: {rate: 1/s}"),
                Just("consumer: {from: header:x-k}"), Just("budget: {name: b, cost: \"1\"}"), Just("match: {path: /a}"),
                Just("server: {max_tunnels: 0}"), Just("forward_headers: [\"x-*\"]"), Just("admin: {addr: 1.2.3.4:5}"),
                Just("\t"), Just(": :"), Just("- [")
            ]),
            0..12,
        )
    ) {
        let text: String = lines.iter().map(|(indent, l)| format!("{}{l}\n", "  ".repeat(*indent))).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.yaml");
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = weir::config::load(&path) {
            for p in &e.problems {
                prop_assert!(p.pos.line >= 1 && p.pos.col >= 1, "{p}\n{text}");
            }
        }
    }

    /// The canonical request on arbitrary heads: a value or a 400, never a panic; what it
    /// keeps is what it was given (no header it removes ever reappears).
    #[test]
    fn the_canonical_request_never_panics_on_any_head(
        target in "[ -~]{0,40}",
        headers in proptest::collection::vec((header_name(), "[ -~]{0,24}"), 0..8),
        trusted in any::<bool>(),
    ) {
        let Ok(uri) = target.parse::<http::Uri>() else { return Ok(()) };
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in &headers {
            if let Ok(v) = HeaderValue::from_str(v) {
                b = b.header(k.as_str(), v);
            }
        }
        let Ok(req) = b.body(()) else { return Ok(()) };
        let (mut parts, ()) = req.into_parts();
        if let Ok(c) = weir::proxy::canonical::Canonical::from_head(&mut parts, "http", trusted, &["websocket".to_string()]) {
            prop_assert!(!c.headers.contains_key("weir-consumer"), "a client's Weir-Consumer is always removed");
            prop_assert!(c.path_query.starts_with('/'));
        }
    }

    /// Any bytes as a stored L2 value: an error or an object, never a panic.
    #[test]
    fn the_l2_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), key in "[ -~]{0,20}") {
        let _ = weir::cache::codec::decode(&key, &bytes);
    }

    /// Targeted fields (RFC 9213) on any text: never a panic.
    #[test]
    fn targeted_fields_never_panic(v in "[ -~]{0,64}") {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert("cdn-cache-control", v);
        }
        let _ = ResponseDirectives::targeted(&h, &[http::HeaderName::from_static("cdn-cache-control")]);
    }
}
