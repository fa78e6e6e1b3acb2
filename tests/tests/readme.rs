//! The README stays true: every `yaml` block of it validates with `weir validate` (a fragment
//! merged into a small base configuration, the files it names created), and every `curl` of the
//! quick start runs against `make run`'s script (the demo origin and `policies/demo.yaml`, on
//! ephemeral ports) and answers what its comment says.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use weir_e2e::tls::Ca;
use weir_e2e::{free_port, repo_root, weir_bin};

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).unwrap()
}

/// Each fenced block of `lang`: the README line it starts on and its text, dedented.
fn blocks(text: &str, lang: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, usize, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match &mut cur {
            None if t == format!("```{lang}") => cur = Some((i + 2, line.len() - t.len(), Vec::new())),
            Some((start, indent, lines)) if t == "```" => {
                let body: Vec<&str> = lines.iter().map(|l| l.get(*indent..).unwrap_or("")).collect();
                // Dedent by the block's own first-line indentation (a route fragment is indented).
                let strip = body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
                let text: Vec<&str> = body.iter().map(|l| l.get(strip.unwrap_or(0)..).unwrap_or("")).collect();
                out.push((*start, text.join("\n") + "\n"));
                cur = None;
            }
            Some((_, _, lines)) => lines.push(line),
            None => {}
        }
    }
    out
}

const TOP_LEVEL: [&str; 13] = [
    "listen",
    "admin",
    "server",
    "include",
    "routes",
    "cache",
    "redis",
    "consumers",
    "budgets",
    "log",
    "debug",
    "tracing",
    "upstream",
];

/// Files a block names (comments left out): relative paths and absolute ones.
fn named_files(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        for word in code.split(|c: char| c.is_whitespace() || ",{}[]\"'".contains(c)) {
            let ext = [".pem", ".key", ".wasm", ".yaml", ".crl", ".sock"];
            if ext.iter().any(|e| word.ends_with(e)) && !word.contains("://") && !out.contains(&word.to_string()) {
                out.push(word.to_string());
            }
        }
    }
    out
}

/// Writes what a block names into `dir` (where its configuration file sits): certificates and
/// keys signed by a test CA (a `.pem` with a `.key` of the same stem is a served certificate, one
/// without is a CA), a CRL of that CA, the built example plugins, a route file.
fn create_files(dir: &Path, text: &str) -> String {
    let ca = Ca::new("README CA");
    let mut text = text.to_string();
    let names = named_files(&text);
    for name in &names {
        let path = if let Some(abs) = name.strip_prefix('/') {
            // Absolute paths move under the test directory.
            let moved = dir.join("root").join(abs);
            text = text.replace(name.as_str(), &moved.display().to_string());
            moved
        } else {
            dir.join(name)
        };
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let stem = name.rsplit_once('.').unwrap().0;
        match name.rsplit('.').next().unwrap() {
            "pem" if names.contains(&format!("{stem}.key")) => {
                let leaf = ca.server(&["api.example.com"]);
                std::fs::write(&path, &leaf.cert_pem).unwrap();
                std::fs::write(path.with_extension("key"), &leaf.key_pem).unwrap();
            }
            "pem" => std::fs::write(&path, &ca.pem).unwrap(),
            "crl" => std::fs::write(&path, ca.crl(&[], false)).unwrap(),
            "key" => {}
            "wasm" => {
                let built = repo_root().join("plugins").join(path.file_name().unwrap());
                assert!(built.is_file(), "{} is not built (make plugins)", built.display());
                std::fs::copy(&built, &path).unwrap();
            }
            "yaml" => std::fs::write(
                &path,
                "routes:\n  - name: included\n    match: { path: /included }\n    upstream: http://127.0.0.1:9\n",
            )
            .unwrap(),
            _ => {} // a socket: its directory is enough
        }
    }
    text
}

/// A block as a whole configuration: placeholders filled, a route fragment put in a route, and
/// what a fragment leaves out (a listener, a route, Redis for `redis.required`) added.
fn configuration(block: &str) -> String {
    let filled: String = {
        let mut s = block.to_string();
        while let Some(start) = s.find("\"<") {
            let end = s[start..].find(">\"").map(|e| start + e + 2).unwrap();
            s.replace_range(start..end, &format!("\"{}\"", "0".repeat(64)));
        }
        s
    };
    let keys: Vec<&str> = filled
        .lines()
        .filter(|l| !l.starts_with([' ', '#', '-']) && l.contains(':'))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    let mut doc = if keys.iter().all(|k| TOP_LEVEL.contains(k)) && !keys.contains(&"upstream") {
        filled
    } else {
        // Keys of one route.
        let inner: String = filled.lines().map(|l| format!("    {l}\n")).collect();
        let upstream = if keys.contains(&"upstream") { "" } else { "    upstream: http://127.0.0.1:9\n" };
        format!("routes:\n  - name: readme\n{upstream}{inner}")
    };
    let has = |doc: &str, k: &str| doc.lines().any(|l| l.starts_with(&format!("{k}:")));
    if !has(&doc, "listen") {
        doc.push_str("listen:\n  - addr: 127.0.0.1:0\n");
    }
    if !has(&doc, "routes") && !has(&doc, "include") {
        doc.push_str("routes:\n  - name: base\n    upstream: http://127.0.0.1:9\n");
    }
    if has(&doc, "redis") && !doc.contains("url:") && !doc.contains("cluster:") {
        doc = doc.replacen("redis:\n", "redis:\n  url: redis://127.0.0.1:9/0\n", 1);
    }
    doc
}

#[test]
fn every_yaml_block_of_the_readme_validates() {
    let text = readme();
    let yaml = blocks(&text, "yaml");
    assert!(yaml.len() >= 10, "found {} yaml blocks", yaml.len());
    let mut failures = Vec::new();
    for (line, block) in &yaml {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("policies");
        std::fs::create_dir_all(&conf_dir).unwrap();
        let doc = create_files(&conf_dir, &configuration(block));
        let path = conf_dir.join("weir.yaml");
        std::fs::write(&path, &doc).unwrap();
        let out = Command::new(weir_bin()).args(["validate", "--config"]).arg(&path).output().unwrap();
        if !out.status.success() {
            failures.push(format!(
                "README.md:{line}: the block does not validate:\n{}\n--- as validated:\n{doc}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `scripts/run-demo.sh` (what `make run` starts) on ephemeral ports: its `Weir on http://...`
/// line comes when Weir answers, and stops both processes when stopped.
struct Demo {
    child: std::process::Child,
    listen: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start() -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let origin = format!("127.0.0.1:{}", free_port());
        let policy = std::fs::read_to_string(repo_root().join("policies/demo.yaml"))
            .unwrap()
            .replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("127.0.0.1:9901", "127.0.0.1:0")
            .replace("http://127.0.0.1:3000", &format!("http://{origin}"))
            .replace("../plugins/", &format!("{}/plugins/", repo_root().display()));
        let config = dir.path().join("demo.yaml");
        std::fs::write(&config, policy).unwrap();
        let target = weir_bin().parent().unwrap().parent().unwrap().to_path_buf();
        let mut child = Command::new(repo_root().join("scripts/run-demo.sh"))
            .env("CARGO_TARGET_DIR", &target)
            .env("WEIR_DEMO_ORIGIN", &origin)
            .env("WEIR_DEMO_CONFIG", &config)
            .env("WEIR_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("the script said nothing").unwrap();
        let addr = |after: &str| {
            let rest = &line[line.find(after).unwrap_or_else(|| panic!("{line}")) + after.len()..];
            rest.split([' ', ')']).next().unwrap().to_string()
        };
        let (listen, admin) = (addr("Weir on http://"), addr("(admin http://"));
        Demo { child, listen, admin, _dir: dir }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_quick_start_curls_answer_what_the_readme_says() {
    let demo = Demo::start();
    // Printed once Weir answers: the first request to the printed address is served.
    let (ok, out) = sh(&format!("curl -s -o /dev/null -w '%{{http_code}}' {}/__stats", demo.listen));
    assert!(ok && out == "200", "the printed address did not answer at once: {out}");

    let text = readme();
    let quick = text.split("With `make run` going:").nth(1).expect("the quick start");
    let (_, block) = blocks(quick, "sh").into_iter().next().unwrap();
    let mut ran = 0;
    for line in block.lines().filter(|l| l.starts_with("curl ")) {
        let (cmd, comment) = match line.split_once(" # ") {
            Some((c, m)) => (c.trim(), m.trim()),
            None => (line.trim(), ""),
        };
        let cmd = cmd.replace("localhost:8080", &demo.listen).replace("localhost:9901", &demo.admin);
        let (ok, out) = sh(&format!("{cmd} --max-time 10"));
        assert!(ok, "`{cmd}` failed:\n{out}");
        let lower = out.to_ascii_lowercase();
        // What the comment promises.
        if let Some(cs) = comment.strip_prefix("Cache-Status: ") {
            let cs = cs.split(" (").next().unwrap().to_ascii_lowercase();
            assert!(lower.contains(&format!("cache-status: {cs}")), "`{cmd}` # {comment}:\n{out}");
        }
        if comment.starts_with("304") {
            assert!(out.starts_with("HTTP/1.1 304"), "`{cmd}` # {comment}:\n{out}");
        }
        if comment.starts_with("fwd=miss") {
            assert!(lower.contains("fwd=miss"), "`{cmd}` # {comment}:\n{out}");
        }
        if comment.contains("invalidates") || cmd.contains("--http2-prior-knowledge") {
            assert!(out.starts_with("HTTP/1.1 2") || out.starts_with("HTTP/2 2"), "`{cmd}`:\n{out}");
        }
        if cmd.contains("/cache/purge") {
            assert!(out.contains("\"purged\""), "`{cmd}`:\n{out}");
        }
        if comment.starts_with("admin API: L1 entries") {
            assert!(out.contains("\"l1\"") || out.contains("entries"), "`{cmd}`:\n{out}");
        }
        ran += 1;
    }
    assert!(ran >= 8, "ran {ran} curls");
    drop(demo);
}

#[test]
fn paths_in_blocks_are_found() {
    // The helper itself: comments are not files, absolute paths are.
    let found = named_files("a: certs/x.pem  # not: y.pem\nb: /etc/z.key\n# c.yaml\n");
    assert_eq!(found, ["certs/x.pem", "/etc/z.key"]);
}
