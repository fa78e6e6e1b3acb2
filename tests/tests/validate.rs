//! `weir validate`: golden files in `policies/invalid/` (NAME.yaml → NAME.err, exact stderr) and
//! the valid example policies. `UPDATE_GOLDEN=1` rewrites the .err files from the current output.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::{Command, Output};

use weir_e2e::{repo_root, weir_bin};

fn validate(rel: &Path) -> Output {
    Command::new(weir_bin())
        .current_dir(repo_root())
        .arg("validate")
        .arg("--config")
        .arg(rel)
        .output()
        .expect("run weir")
}

#[test]
fn every_invalid_policy_gives_its_golden_errors() {
    let dir = repo_root().join("policies/invalid");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .expect("policies/invalid")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "expected at least 15 golden cases, found {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let rel = Path::new("policies/invalid").join(&name);
        let out = validate(&rel);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let golden_path = case.with_extension("err");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden_path, &stderr).unwrap();
        }
        let golden =
            std::fs::read_to_string(&golden_path).unwrap_or_else(|_| panic!("missing {}", golden_path.display()));
        if out.status.success() {
            failures.push(format!("{name}: exit 0, expected failure"));
        }
        if stderr.trim_end() != golden.trim_end() {
            failures.push(format!("{name}:\n--- expected\n{golden}--- got\n{stderr}"));
        }
        for line in stderr.lines() {
            let prefix = format!("{}:", rel.display());
            let rest = line.strip_prefix(&prefix).unwrap_or_else(|| panic!("{name}: not FILE:LINE:COL: {line}"));
            let mut parts = rest.splitn(3, ':');
            let (l, c) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(l.parse::<u32>().is_ok() && c.parse::<u32>().is_ok(), "{name}: bad position in {line}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn several_semantic_problems_give_several_lines() {
    let out = validate(Path::new("policies/invalid/several_problems.yaml"));
    assert!(String::from_utf8_lossy(&out.stderr).lines().count() >= 5);
}

#[test]
fn oversized_document_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    let mut text = String::from("listen: [{ addr: 127.0.0.1:8080 }]\nroutes:\n");
    while text.len() < (1 << 20) + 10 {
        text.push_str("  # padding padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&path, text).unwrap();
    let out = validate(&path);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("document too large"));
}

#[test]
fn example_policies_are_valid() {
    for name in ["policies/demo.yaml", "policies/compose.yaml"] {
        let out = validate(Path::new(name));
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn includes_resolve_relative_to_the_including_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("routes")).unwrap();
    std::fs::write(dir.path().join("main.yaml"), "listen: [{ addr: 127.0.0.1:8080 }]\ninclude: [routes/a.yaml]\n")
        .unwrap();
    std::fs::write(
        dir.path().join("routes/a.yaml"),
        "include: [b.yaml]\nroutes:\n  - name: a\n    match: { path: /a }\n    upstream: http://127.0.0.1:1\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("routes/b.yaml"),
        "routes:\n  - name: b\n    match: { path: /b }\n    upstream: http://127.0.0.1:1\n    cache: { ttl: nope }\n",
    )
    .unwrap();
    let out = validate(&dir.path().join("main.yaml"));
    let err = String::from_utf8_lossy(&out.stderr);
    // The problem is reported in the included file, at its own line and column.
    assert!(err.contains("routes/b.yaml:5:19: invalid duration `nope`"), "{err}");
    std::fs::write(
        dir.path().join("routes/b.yaml"),
        "routes:\n  - name: b\n    match: { path: /b }\n    upstream: http://127.0.0.1:1\n",
    )
    .unwrap();
    let out = validate(&dir.path().join("main.yaml"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(2 routes)"));
}

/// `weir validate` runs in CI without production secrets: an unset secret (a consumer's
/// `key_env`, `debug.token_env`, `admin.token_env`) is a positioned warning and the exit status
/// stays 0; `weir run` refuses the same configuration. One mistake, one message: the consumer
/// whose variable is unset is not also told it needs `keys_sha256` or `key_env`.
#[test]
fn unset_secrets_warn_under_validate_and_stop_run() {
    let yaml = "listen:\n  - addr: 127.0.0.1:0\nadmin:\n  addr: 127.0.0.1:0\n  token_env: WEIR_TEST_UNSET_ADMIN\ndebug:\n  token_env: WEIR_TEST_UNSET_DEBUG\nconsumers:\n  - id: acme\n    key_env: WEIR_TEST_UNSET_KEY\nroutes:\n  - name: r\n    upstream: http://127.0.0.1:9\n";
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = weir_e2e::validate_in(yaml, dir.path());
    assert!(ok, "{out}");
    for (line, var) in [(5, "WEIR_TEST_UNSET_ADMIN"), (7, "WEIR_TEST_UNSET_DEBUG"), (10, "WEIR_TEST_UNSET_KEY")] {
        let w = out.lines().find(|l| l.contains(var)).unwrap_or_else(|| panic!("no warning for {var}: {out}"));
        assert!(w.contains(&format!("weir.yaml:{line}:")) && w.contains(": warning: "), "{w}");
    }
    assert!(!out.contains("needs `keys_sha256`"), "{out}");
    let run = Command::new(weir_bin())
        .args(["run", "--config"])
        .arg(dir.path().join("weir.yaml"))
        .output()
        .expect("run weir");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("WEIR_TEST_UNSET_KEY") && err.contains("is not set"), "{err}");
    assert_eq!(err.matches("weir.yaml:").count(), err.lines().filter(|l| l.contains("weir.yaml:")).count());
    assert!(!err.contains("needs `keys_sha256`"), "{err}");
}

/// A configuration `weir run` refuses is said once (no log line repeating it), positioned.
#[test]
fn run_says_a_fatal_configuration_error_once() {
    let out = Command::new(weir_bin())
        .current_dir(repo_root())
        .args(["run", "--config", "policies/invalid/unknown_key.yaml"])
        .output()
        .expect("run weir");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.matches("unknown key `ttll`").count(), 1, "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("policies/invalid/unknown_key.yaml:8:7:")), "{stderr}");
}
