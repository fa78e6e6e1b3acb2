//! `weir plugin new | build | check | run`: write, build and try a plugin without a gateway.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{load, Header, KeyDecision, PluginRequest};

/// The guest SDK, vendored into every crate `weir plugin new` writes: a machine that installs
/// Weir may reach no source tree. Its `Cargo.lock` pins what the SDK was tested with.
const SDK_LIB: &str = include_str!("../../../plugins/sdk/src/lib.rs");
const SDK_WIT: &str = include_str!("../../../wit/weir-plugin.wit");
const SDK_LOCK: &str = include_str!("../../../plugins/Cargo.lock");
const SDK_MANIFEST: &str = r#"[package]
name = "weir-plugin-sdk"
description = "Write Weir plugins: implement the hooks you need, export with one macro"
version = "0.1.0"
edition = "2021"
license = "Apache-2.0"

[dependencies]
wit-bindgen = { version = "=0.61.1", default-features = false, features = ["macros", "realloc", "std"] }
serde_json = "1"
"#;

/// Scaffolds a guest crate `NAME/` with the SDK vendored in `NAME/sdk/`, or, with `sdk`, using
/// the SDK at that path (relative to the new crate, or absolute), which must be one.
pub fn new(name: &str, sdk: Option<&Path>) -> Result<String, String> {
    let dir = PathBuf::from(name);
    if dir.exists() {
        return Err(format!("{} already exists", dir.display()));
    }
    let crate_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| name.into());
    if crate_name.is_empty() || !crate_name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(format!("`{crate_name}` is not a crate name (letters, digits, - and _)"));
    }
    if let Some(sdk) = sdk {
        // Checked now, not at the first build: the path is read from the new crate.
        let manifest = dir.join(sdk).join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest)
            .map_err(|e| format!("--sdk {}: cannot read {}: {e}", sdk.display(), manifest.display()))?;
        if !text.contains("name = \"weir-plugin-sdk\"") {
            return Err(format!("--sdk {}: {} is not the weir-plugin-sdk crate", sdk.display(), manifest.display()));
        }
    }
    let sdk_path = match sdk {
        Some(p) => p.to_path_buf(),
        None => {
            let vendored = dir.join("sdk");
            std::fs::create_dir_all(vendored.join("src")).map_err(|e| e.to_string())?;
            std::fs::create_dir_all(vendored.join("wit")).map_err(|e| e.to_string())?;
            let write =
                |path: PathBuf, text: &str| std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()));
            write(vendored.join("Cargo.toml"), SDK_MANIFEST)?;
            write(vendored.join("src/lib.rs"), &SDK_LIB.replace("path: \"../../wit\"", "path: \"wit\""))?;
            write(vendored.join("wit/weir-plugin.wit"), SDK_WIT)?;
            write(dir.join("Cargo.lock"), SDK_LOCK)?;
            PathBuf::from("sdk")
        }
    };
    std::fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
    let cargo = format!(
        r#"[package]
name = "{crate_name}"
version = "0.1.0"
edition = "2021"

[lib]
crate-type = ["cdylib"]

[dependencies]
weir-plugin-sdk = {{ path = "{}" }}

[profile.release]
opt-level = "s"
lto = true
panic = "abort"
strip = true

# Standalone: not part of another workspace.
[workspace]
"#,
        sdk_path.display()
    );
    let lib = r#"//! A Weir plugin: implement only the hooks you need (see the SDK's `Plugin` trait).
use weir_plugin_sdk::*;

struct MyPlugin {
    ttl: u32,
}

impl Plugin for MyPlugin {
    fn new(config: Config) -> Result<Self, String> {
        let ttl = config.str("ttl_seconds").unwrap_or_else(|| "60".into());
        Ok(MyPlugin { ttl: ttl.parse().map_err(|_| format!("ttl_seconds: `{ttl}` is not a number"))? })
    }

    fn ttl(&self, req: &Request, _resp: &Response) -> Option<TtlDecision> {
        let section = req.path.split('/').nth(1).unwrap_or("root").to_string();
        Some(TtlDecision { ttl: Some(self.ttl), tags: vec![section], ..TtlDecision::default() })
    }
}

export_plugin!(MyPlugin);
"#;
    std::fs::write(dir.join("Cargo.toml"), cargo).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("src/lib.rs"), lib).map_err(|e| e.to_string())?;
    Ok(format!("created {} — build it with `weir plugin build {}`", dir.display(), dir.display()))
}

/// Builds the guest crate in `dir` for wasm32-unknown-unknown (release) and makes the core
/// module a component (wit-component; the WIT travels in the module's custom section).
pub fn build(dir: &Path, out: Option<&Path>) -> Result<PathBuf, String> {
    let meta = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !meta.status.success() {
        return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&meta.stderr)));
    }
    let meta: serde_json::Value = serde_json::from_slice(&meta.stdout).map_err(|e| e.to_string())?;
    let manifest = std::fs::canonicalize(dir.join("Cargo.toml")).map_err(|e| e.to_string())?;
    let package = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path())))
        .ok_or("no package in that folder")?;
    let name = package["name"].as_str().ok_or("package without a name")?.to_string();
    let target_dir = PathBuf::from(meta["target_directory"].as_str().ok_or("no target directory")?);
    let status = Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-unknown-unknown", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build failed (is the target installed? `rustup target add wasm32-unknown-unknown`)".into());
    }
    let module = target_dir.join("wasm32-unknown-unknown/release").join(format!("{}.wasm", name.replace('-', "_")));
    let bytes = std::fs::read(&module).map_err(|e| format!("cannot read {}: {e}", module.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| format!("cannot make a component of {}: {e:#}", module.display()))?;
    let out = match out {
        Some(o) => o.to_path_buf(),
        None => dir.parent().unwrap_or(Path::new(".")).join(format!("{name}.wasm")),
    };
    std::fs::write(&out, component).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(out)
}

/// Loads and checks a component (imports, exports, `init` with `config`).
pub fn check(file: &Path, config: &serde_json::Value) -> Result<String, String> {
    let t = Instant::now();
    let p = load(file, config, Duration::from_millis(100), 64 << 20)?;
    Ok(format!(
        "{}: ok — exports weir:plugin@{}, imports nothing, init ok in {:.1} ms; needs headers {:?}, request body {}, response body {}",
        file.display(),
        super::WIT_VERSION,
        t.elapsed().as_secs_f64() * 1000.0,
        p.needs.headers,
        p.needs.request_body,
        p.needs.response_body
    ))
}

/// A request line `METHOD /path?query` and `name: value` headers as the plugin sees them.
pub fn request(line: &str, headers: &[String], host: &str) -> Result<PluginRequest, String> {
    let (method, target) = line.trim().split_once(' ').ok_or("--request must look like `GET /path?query`")?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    Ok(PluginRequest {
        method: method.to_ascii_uppercase(),
        scheme: "http".into(),
        authority: host.into(),
        path,
        query,
        headers: header_list(headers)?,
        consumer: None,
        body: None,
    })
}

/// `name: value` lines as a plugin's header list (names lower-case), each checked as HTTP.
pub fn header_list(lines: &[String]) -> Result<Vec<Header>, String> {
    lines
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').ok_or_else(|| format!("header `{h}` must look like `name: value`"))?;
            let name =
                http::HeaderName::from_bytes(k.trim().as_bytes()).map_err(|_| format!("bad header name `{k}`"))?;
            http::HeaderValue::from_str(v.trim()).map_err(|_| format!("bad header value `{v}`"))?;
            Ok(Header { name: name.as_str().to_string(), value: v.trim().to_string() })
        })
        .collect()
}

/// The hooks `weir plugin run --hook` can call.
pub const HOOKS: [&str; 5] = ["cache-key", "ttl", "invalidate", "cost", "identify"];

/// What `weir plugin run` gives a hook besides the request.
#[derive(Debug, Default)]
pub struct RunInput {
    pub status: u16,
    pub response_headers: Vec<Header>,
    pub response_body: Option<Vec<u8>>,
    pub request_body: Option<Vec<u8>>,
    /// `identify`'s clock (default: now).
    pub now: Option<std::time::SystemTime>,
}

/// Runs one hook and describes the decision, what the gateway would do with it, and the time
/// it took.
pub fn run(
    file: &Path,
    config: &serde_json::Value,
    hook: &str,
    req: PluginRequest,
    input: RunInput,
) -> Result<String, String> {
    let p = load(file, config, Duration::from_millis(100), 64 << 20)?;
    // The gateway passes only the headers and bodies the plugin asked for.
    let req = PluginRequest {
        headers: req.headers.into_iter().filter(|h| p.wants_header(&h.name)).collect(),
        body: if p.needs.request_body { input.request_body } else { None },
        ..req
    };
    let resp = super::PluginResponse {
        status: input.status,
        headers: input.response_headers,
        body: if p.needs.response_body { input.response_body } else { None },
    };
    let t = Instant::now();
    let list = |l: &[String]| if l.is_empty() { "none".to_string() } else { l.join(", ") };
    let out = match hook {
        "cache-key" => p.cache_key_uncached(&req).map(|d| {
            let applied = match &d {
                KeyDecision::Policy => "the route's policy key".to_string(),
                KeyDecision::Key(k) => format!("cached under `{k}` (namespaced by the route)"),
                KeyDecision::Bypass(r) => format!("not cached: Cache-Status: weir; fwd=bypass; detail={r}"),
            };
            (format!("{d:?}"), applied)
        }),
        "ttl" => p.ttl(&req, &resp).map(|d| {
            let applied = match &d {
                None => "the origin's headers and the policy decide".to_string(),
                Some(d) if !d.store => "not stored".to_string(),
                Some(d) => {
                    let secs = |v: Option<u32>| v.map_or_else(|| "the policy's".to_string(), |s| format!("{s} s"));
                    format!(
                        "stored: fresh for {}, stale-while-revalidate {}, stale-if-error {}, tags {}",
                        secs(d.ttl),
                        secs(d.stale_while_revalidate),
                        secs(d.stale_if_error),
                        list(&d.tags)
                    )
                }
            };
            (format!("{d:?}"), applied)
        }),
        "invalidate" => p.invalidate(&req, &resp).map(|d| {
            let applied = format!(
                "purges keys {}; tags {}; prefixes {} — on every tier and instance",
                list(&d.keys),
                list(&d.tags),
                list(&d.prefixes)
            );
            (format!("{d:?}"), applied)
        }),
        "cost" => p.cost(&req, &resp).map(|d| {
            let applied = match &d {
                None => "the route's `budget.cost`".to_string(),
                Some(c) => format!("{c} charged to the consumer's budget"),
            };
            (format!("{d:?}"), applied)
        }),
        "identify" => p.identify(&req, input.now.unwrap_or_else(std::time::SystemTime::now)).map(|d| {
            let applied = match &d {
                None => "not identified: a `required` route answers 401 unknown_consumer".to_string(),
                Some(id) => {
                    format!("consumer `{id}`: keys its rate limits and budgets, sent upstream as Weir-Consumer")
                }
            };
            (format!("{d:?}"), applied)
        }),
        other => return Err(format!("unknown hook `{other}`: {}", HOOKS.join(", "))),
    };
    let took = t.elapsed();
    match out {
        Ok((d, applied)) => Ok(format!("{hook}: {d}\napplied: {applied}\ntook {:.1} µs", took.as_secs_f64() * 1e6)),
        Err(f) => Err(format!(
            "{hook} failed: {} after {:.1} ms (the gateway would fall back to the policy)",
            f.as_str(),
            took.as_secs_f64() * 1000.0
        )),
    }
}
