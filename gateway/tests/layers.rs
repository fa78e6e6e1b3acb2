//! The layering declared in `src/lib.rs` holds: no file of `gateway/src` refers to a module of
//! a higher layer, by a `use` line or an inline `crate::` path. Debts still being paid off are
//! listed in `KNOWN` — each one that disappears must be removed from it, and nothing may be
//! added.

// Test code: a panic is how a failed expectation is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// (from module, to module) references that run upward today, to be removed.
const KNOWN: &[(&str, &str)] = &[];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `module → layer` from the table in lib.rs's crate doc.
fn layers() -> BTreeMap<String, u32> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else { continue };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Some(layer) = cells.first().and_then(|c| c.split_whitespace().next()).and_then(|n| n.parse().ok()) else {
            continue;
        };
        for m in cells.get(1).unwrap_or(&"").split(',') {
            out.insert(m.trim().to_string(), layer);
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules a source text names through `crate::` (inline paths and `use` lines,
/// braces included), comments left out.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(inner) = rest.strip_prefix('{') {
                let end = inner.find('}').unwrap_or(inner.len());
                for part in inner[..end].split(',') {
                    let name: String = part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    out.insert(name);
                }
            } else {
                out.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
    }
    out
}

#[test]
fn no_module_refers_to_a_higher_layer() {
    let layers = layers();
    assert!(layers.len() >= 15, "the layer table in lib.rs was not read: {layers:?}");
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut found: BTreeSet<(String, String)> = BTreeSet::new();
    let mut unlisted = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(src()).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if ["lib", "main", "bin"].contains(&first.as_str()) {
            continue;
        }
        let Some(&from) = layers.get(&first) else {
            unlisted.insert(first);
            continue;
        };
        for to in references(&std::fs::read_to_string(f).unwrap()) {
            // Items of the crate root (`Body`, `BoxError`, `random_u64`) are the base layer.
            let Some(&layer) = layers.get(&to) else { continue };
            if layer > from {
                found.insert((first.clone(), to));
            }
        }
    }
    assert!(unlisted.is_empty(), "modules missing from lib.rs's layer table: {unlisted:?}");
    let known: BTreeSet<(String, String)> = KNOWN.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let new: Vec<_> = found.difference(&known).collect();
    assert!(new.is_empty(), "upward references (module → higher layer): {new:?}");
    let paid: Vec<_> = known.difference(&found).collect();
    assert!(paid.is_empty(), "no longer upward, remove from KNOWN: {paid:?}");
}

#[test]
fn references_are_read_from_use_lines_and_inline_paths() {
    let r = references("use crate::{cache::key, Body};\nlet x = crate::proxy::f(); // crate::admin\n");
    assert_eq!(r.into_iter().collect::<Vec<_>>(), ["Body", "cache", "proxy"]);
}
