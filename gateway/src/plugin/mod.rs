//! Wasm plugins: the host side of `wit/weir-plugin.wit`.
//!
//! One wasmtime `Engine` per process (epoch interruption on, a 1 ms ticker thread); components
//! compiled once per content hash; each route's plugin keeps a pool of warm instances (store +
//! instance, `init` already run) that calls borrow and return. Every call gets an epoch
//! deadline (`plugin.timeout`, at most 100 ms: a call runs on a runtime worker) and runs under a
//! memory limit (`plugin.max_memory`: one linear memory, so it is the real cap); an instance that
//! trapped, ran out of time or memory is dropped, never reused. Instances are made at load and
//! by a background thread, never on the request path: a call that finds no warm instance gets
//! `busy` (the policy decides) and wakes the refill. At most `MAX_LIVE` instances exist per
//! plugin, so its memory is bounded by `MAX_LIVE × max_memory`. A component that imports
//! anything is refused at load: plugins get no files, sockets, clocks, randomness or
//! environment, because there is nothing to import.
//!
//! Failures never fail the request: the caller gets `Err(Failure)` and falls back to the route's
//! policy; `weir_plugin_calls_total{plugin,hook,outcome}` counts every call.

pub mod cli;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

pub use self::bindings::weir::plugin::types::{
    Datetime, Header, Invalidation, KeyDecision, Needs, Request as PluginRequest, Response as PluginResponse,
    TtlDecision,
};
use self::bindings::{Plugin, PluginPre};

/// The version of the `weir:plugin` package in `wit/` (components built against another are refused).
pub const WIT_VERSION: &str = "0.2.0";
/// Epoch tick: the granularity of `plugin.timeout`.
const TICK: Duration = Duration::from_millis(1);
/// Deadline for instantiation + `init`.
const INIT_TIMEOUT: Duration = Duration::from_millis(200);
/// `cache-key` answers remembered per plugin.
const MEMO_ENTRIES: u64 = 16_384;
/// Instances that may exist at once per plugin (warm in the pool or in a call).
const MAX_LIVE: usize = 16;
/// Longest `plugin.timeout`: a call holds a runtime worker for at most this long.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(100);

/// Warm instances kept ready: a call is synchronous on a runtime worker, so no more calls run
/// at once than there are threads; two spare cover the ones being replaced after a failure.
fn pool_target() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() + 2).min(MAX_LIVE)
}
/// Output caps (a plugin's answer beyond them is "malformed": the policy decides instead).
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_BYTES: usize = 256;
pub const MAX_INVALIDATIONS: usize = 64;
pub const MAX_CONSUMER_BYTES: usize = 256;

/// Why a plugin call gave no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Trap,
    Timeout,
    Memory,
    /// The answer broke a cap or a format (key too long, control characters, bad decimal...).
    Invalid,
    /// A new instance could not be made (its `init` failed, say).
    Instantiate,
    /// No warm instance was free (they are made off the request path, never while it waits).
    Busy,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Trap => "trap",
            Failure::Timeout => "timeout",
            Failure::Memory => "memory",
            Failure::Invalid => "invalid",
            Failure::Instantiate => "instantiate",
            Failure::Busy => "busy",
        }
    }
}

/// The process-wide engine and compile cache.
struct Host {
    engine: Engine,
    compiled: Mutex<HashMap<[u8; 32], Component>>,
}

fn host() -> Result<&'static Host, String> {
    static HOST: OnceLock<Result<Host, String>> = OnceLock::new();
    HOST.get_or_init(|| {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true);
        cfg.wasm_component_model(true);
        let engine = Engine::new(&cfg).map_err(|e| format!("cannot start the Wasm engine: {e}"))?;
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("weir-plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            })
            .map_err(|e| format!("cannot start the plugin timer: {e}"))?;
        Ok(Host { engine, compiled: Mutex::new(HashMap::new()) })
    })
    .as_ref()
    .map_err(Clone::clone)
}

struct State {
    limits: StoreLimits,
}

struct Warm {
    store: Store<State>,
    plugin: Plugin,
}

/// Counts calls for `/metrics`; provided by the runtime (the plugin layer does not know the
/// registry).
pub trait CallSink: Send + Sync + std::fmt::Debug {
    fn record(&self, plugin: &str, hook: &'static str, outcome: &'static str, took: Duration);
}

#[derive(Debug)]
struct NoSink;
impl CallSink for NoSink {
    fn record(&self, _: &str, _: &'static str, _: &'static str, _: Duration) {}
}

/// A loaded, checked plugin with its warm instances.
pub struct Loaded {
    /// The file stem (`catalog` for `plugins/catalog.wasm`): the metrics label.
    pub name: String,
    pub path: PathBuf,
    pub digest: [u8; 32],
    pre: PluginPre<State>,
    config: String,
    timeout: Duration,
    max_memory: usize,
    pub needs: Needs,
    pool: Mutex<Vec<Warm>>,
    /// Instances in existence (pooled or in a call), at most `MAX_LIVE`.
    live: AtomicUsize,
    /// A refill thread is running.
    refilling: AtomicBool,
    me: OnceLock<Weak<Loaded>>,
    /// `cache-key` answers by a 128-bit keyed hash of everything the hook was given. A hook is a
    /// function of its input (no clock, randomness or I/O to read, and no guarantee which warm
    /// instance answers), so a repeated request needs no new call: the L1-hit path then costs a
    /// hash and a lookup instead of a Wasm call.
    memo: moka::sync::Cache<[u8; 16], KeyDecision>,
    memo_key: [u8; 32],
    sink: OnceLock<Arc<dyn CallSink>>,
    /// Last time a failure was logged (ms since `started`): logs are rate-limited.
    last_log_ms: AtomicU64,
    started: Instant,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").field("name", &self.name).field("path", &self.path).finish_non_exhaustive()
    }
}

/// Compiles (or takes from the cache) and checks a component: it must import nothing and export
/// the `plugin` world of this WIT version.
/// What a file that is not a component is, in words (its first bytes, not a parser's dump).
fn not_a_component(bytes: &[u8]) -> Option<String> {
    const BUILD: &str = "build plugins with `weir plugin build`";
    if !bytes.starts_with(b"\0asm") {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Some(format!(
            "is not a WebAssembly component (it starts with `{}`, not the `00 61 73 6d` of a WebAssembly binary): {BUILD}",
            head.join(" ")
        ));
    }
    // Version 1, layer 0: a core module (what `cargo build` alone makes), not a component.
    if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
        return Some(format!("is a core WebAssembly module, not a component: {BUILD} (it makes the component)"));
    }
    None
}

fn compile(bytes: &[u8]) -> Result<(Component, [u8; 32]), String> {
    let host = host()?;
    let digest = *blake3::hash(bytes).as_bytes();
    if let Some(c) = host.compiled.lock().ok().and_then(|m| m.get(&digest).cloned()) {
        return Ok((c, digest));
    }
    if let Some(why) = not_a_component(bytes) {
        return Err(why);
    }
    let component = Component::new(&host.engine, bytes).map_err(|e| {
        format!("is not a valid WebAssembly component (build plugins with `weir plugin build`): {}", root_cause(&e))
    })?;
    let ty = component.component_type();
    // The one thing a plugin may import is an interface of types only (the WIT's own `types`,
    // which wit-bindgen imports): it carries no function, so it grants nothing.
    let imports: Vec<String> = ty
        .imports(&host.engine)
        .filter(|(_, item)| !types_only(&host.engine, &item.ty))
        .map(|(name, _)| name.to_string())
        .collect();
    if !imports.is_empty() {
        return Err(format!(
            "imports {}, which Weir does not grant: a plugin may import nothing (no files, sockets, clocks, randomness or environment)",
            imports.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
        ));
    }
    if let Ok(mut m) = host.compiled.lock() {
        m.insert(digest, component.clone());
    }
    Ok((component, digest))
}

fn types_only(engine: &Engine, item: &ComponentItem) -> bool {
    match item {
        ComponentItem::Type(_) => true,
        ComponentItem::ComponentInstance(i) => i.exports(engine).all(|(_, e)| matches!(e.ty, ComponentItem::Type(_))),
        _ => false,
    }
}

fn root_cause(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

/// Loads the plugin at `path` with its config, and makes one instance (running `init`) to check
/// that it works. Every problem is an error message for the configuration report.
pub fn load(
    path: &Path,
    config: &serde_json::Value,
    timeout: Duration,
    max_memory: u64,
) -> Result<Arc<Loaded>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read plugin: {e}"))?;
    load_bytes(path, &bytes, config, timeout, max_memory)
}

pub fn load_bytes(
    path: &Path,
    bytes: &[u8],
    config: &serde_json::Value,
    timeout: Duration,
    max_memory: u64,
) -> Result<Arc<Loaded>, String> {
    let host = host()?;
    let (component, digest) = compile(bytes)?;
    let mut linker: Linker<State> = Linker::new(&host.engine);
    for (name, item) in component.component_type().imports(&host.engine) {
        if name.starts_with("weir:plugin/") && !name.ends_with(&format!("@{WIT_VERSION}")) {
            return Err(format!(
                "was built against `{name}`; this Weir speaks weir:plugin@{WIT_VERSION}: rebuild it with the current SDK (`weir plugin build`)"
            ));
        }
        if types_only(&host.engine, &item.ty) {
            linker.instance(name).map_err(|e| format!("cannot link `{name}`: {}", root_cause(&e)))?;
        }
    }
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| format!("cannot be instantiated: {}", root_cause(&e)))
        .and_then(|p| {
            PluginPre::new(p).map_err(|e| {
                format!(
                    "does not export the weir:plugin@{WIT_VERSION} `plugin` world (wit/weir-plugin.wit): {}",
                    root_cause(&e)
                )
            })
        })?;
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "plugin".into());
    let mut loaded = Loaded {
        name,
        path: path.to_path_buf(),
        digest,
        pre,
        config: config.to_string(),
        timeout,
        max_memory: usize::try_from(max_memory).unwrap_or(usize::MAX),
        needs: Needs { headers: Vec::new(), request_body: false, response_body: false },
        pool: Mutex::new(Vec::new()),
        live: AtomicUsize::new(0),
        refilling: AtomicBool::new(false),
        me: OnceLock::new(),
        memo: moka::sync::Cache::builder().max_capacity(MEMO_ENTRIES).build(),
        memo_key: blake3::derive_key(
            "weir plugin memo ids",
            &[crate::random_u64().to_le_bytes(), crate::random_u64().to_le_bytes()].concat(),
        ),
        sink: OnceLock::new(),
        last_log_ms: AtomicU64::new(0),
        started: Instant::now(),
    };
    let (warm, needs) = loaded.instantiate().map_err(|e| format!("init failed: {e}"))?;
    loaded.needs = needs;
    loaded.live.store(1, Ordering::Relaxed);
    if let Ok(mut p) = loaded.pool.lock() {
        p.push(warm);
    }
    // The rest of the warm pool at load, off the request path (load runs on reload's thread).
    for _ in 1..pool_target() {
        let Ok((warm, _)) = loaded.instantiate() else { break };
        loaded.live.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = loaded.pool.lock() {
            p.push(warm);
        }
    }
    let loaded = Arc::new(loaded);
    let _ = loaded.me.set(Arc::downgrade(&loaded));
    Ok(loaded)
}

impl Loaded {
    pub fn set_sink(&self, sink: Arc<dyn CallSink>) {
        let _ = self.sink.set(sink);
    }

    fn sink(&self) -> &dyn CallSink {
        match self.sink.get() {
            Some(s) => s.as_ref(),
            None => &NoSink,
        }
    }

    fn ticks(&self) -> u64 {
        ticks(self.timeout)
    }

    /// A new store + instance, `init` run with the config.
    fn instantiate(&self) -> Result<(Warm, Needs), String> {
        let host = host()?;
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.max_memory)
            // A component is a few core instances (its module and the canonical-ABI shims) around
            // one linear memory: one memory makes `max_memory` the plugin's whole heap.
            .instances(8)
            .memories(1)
            .tables(4)
            .table_elements(100_000)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&host.engine, State { limits });
        store.limiter(|s| &mut s.limits);
        // Instantiation and `init` (config parsing) get more time than a hook call.
        let init_ticks = ticks(self.timeout.max(INIT_TIMEOUT));
        store.set_epoch_deadline(init_ticks);
        let plugin = self.pre.instantiate(&mut store).map_err(|e| root_cause(&e))?;
        store.set_epoch_deadline(init_ticks);
        let needs = match plugin.call_init(&mut store, &self.config) {
            Ok(Ok(n)) => n,
            Ok(Err(msg)) => return Err(msg),
            Err(e) => return Err(classify(&e).as_str().to_string() + ": " + &root_cause(&e)),
        };
        Ok((Warm { store, plugin }, needs))
    }

    /// Runs `f` on a warm instance under the deadline; the instance goes back to the pool only
    /// when the call returned normally.
    fn call<T>(
        &self,
        hook: &'static str,
        f: impl FnOnce(&Plugin, &mut Store<State>) -> wasmtime::Result<T>,
    ) -> Result<T, Failure> {
        let t = Instant::now();
        let Some(mut warm) = self.pool.lock().ok().and_then(|mut p| p.pop()) else {
            self.refill();
            self.failed(hook, Failure::Busy, "no warm instance free", t.elapsed());
            return Err(Failure::Busy);
        };
        warm.store.set_epoch_deadline(self.ticks());
        match f(&warm.plugin, &mut warm.store) {
            Ok(v) => {
                if let Ok(mut p) = self.pool.lock() {
                    p.push(warm);
                }
                self.sink().record(&self.name, hook, "ok", t.elapsed());
                Ok(v)
            }
            Err(e) => {
                drop(warm);
                self.live.fetch_sub(1, Ordering::Relaxed);
                self.refill();
                let why = classify(&e);
                self.failed(hook, why, &root_cause(&e), t.elapsed());
                Err(why)
            }
        }
    }

    /// Instances in existence now (pooled or in a call).
    pub fn live_instances(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Wakes the refill thread, which brings the pool back to its target off the request path.
    fn refill(&self) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.me.get().cloned() else {
            self.refilling.store(false, Ordering::Release);
            return;
        };
        let spawned = std::thread::Builder::new().name("weir-plugin-warm".into()).spawn(move || loop {
            let Some(this) = me.upgrade() else { return };
            let target = pool_target();
            let short =
                |l: &Loaded| l.pool.lock().map_or(0, |p| p.len()) < target && l.live.load(Ordering::Relaxed) < MAX_LIVE;
            while short(&this) {
                match this.instantiate() {
                    Ok((warm, _)) => {
                        this.live.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut p) = this.pool.lock() {
                            p.push(warm);
                        }
                    }
                    Err(e) => {
                        // Tried again on the next call that finds the pool empty.
                        this.failed("init", Failure::Instantiate, &e, Duration::ZERO);
                        this.refilling.store(false, Ordering::Release);
                        return;
                    }
                }
            }
            this.refilling.store(false, Ordering::Release);
            // A call that found the pool empty after the last check and before the flag fell
            // would otherwise wait for the next failure to be refilled.
            if !short(&this) || this.refilling.swap(true, Ordering::AcqRel) {
                return;
            }
        });
        if spawned.is_err() {
            self.refilling.store(false, Ordering::Release);
        }
    }

    fn failed(&self, hook: &'static str, why: Failure, detail: &str, took: Duration) {
        self.sink().record(&self.name, hook, why.as_str(), took);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1000)
            && self.last_log_ms.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(plugin = %self.name, hook, outcome = why.as_str(), "plugin call failed; the route's policy decides instead: {detail}");
        }
    }

    /// Records a malformed answer (the call itself succeeded).
    fn invalid(&self, hook: &'static str, what: &str) -> Failure {
        self.failed(hook, Failure::Invalid, what, Duration::ZERO);
        Failure::Invalid
    }

    /// `cache-key` for a request, memoised: a repeated request costs a hash and a lookup, and
    /// the WIT request is built only when the plugin is really called.
    pub fn cache_key(&self, parts: &RequestParts<'_>) -> Result<KeyDecision, Failure> {
        let id = self.request_id(parts);
        if let Some(d) = self.memo.get(&id) {
            return Ok(d);
        }
        let d = self.cache_key_uncached(&self.request(parts))?;
        self.memo.insert(id, d.clone());
        Ok(d)
    }

    /// Identifies a request by everything a hook is given of it (see `request`): the fields,
    /// length-prefixed into one buffer, then one keyed BLAKE3 call (many small `update`s cost
    /// three times as much, measured with callgrind).
    fn request_id(&self, r: &RequestParts<'_>) -> [u8; 16] {
        let mut buf = Vec::with_capacity(256);
        let mut field = |b: &[u8]| {
            buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
            buf.extend_from_slice(b);
        };
        field(r.method.as_bytes());
        field(r.scheme.as_bytes());
        field(r.authority.as_bytes());
        field(r.path.as_bytes());
        field(r.query.unwrap_or("\0none").as_bytes());
        field(r.consumer.unwrap_or("\0none").as_bytes());
        if !self.needs.headers.is_empty() {
            for (k, v) in r.headers.iter().filter(|(k, _)| self.wants_header(k.as_str())) {
                field(k.as_str().as_bytes());
                field(v.as_bytes());
            }
        }
        if self.needs.request_body {
            field(r.body.unwrap_or(b"\0none"));
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&blake3::keyed_hash(&self.memo_key, &buf).as_bytes()[..16]);
        out
    }

    /// The request in WIT form, with only what the plugin asked for.
    pub fn request(&self, r: &RequestParts<'_>) -> PluginRequest {
        PluginRequest {
            method: r.method.to_string(),
            scheme: r.scheme.to_string(),
            authority: r.authority.to_ascii_lowercase(),
            path: r.path.to_string(),
            query: r.query.map(str::to_string),
            headers: self.headers_for(r.headers),
            consumer: r.consumer.map(str::to_string),
            body: if self.needs.request_body { r.body.map(<[u8]>::to_vec) } else { None },
        }
    }

    /// `cache-key` without the memo (every call reaches the plugin).
    pub fn cache_key_uncached(&self, req: &PluginRequest) -> Result<KeyDecision, Failure> {
        let d = self.call("cache-key", |p, s| p.call_cache_key(s, req))?;
        match &d {
            KeyDecision::Key(k) if k.is_empty() || k.len() > MAX_KEY_BYTES || k.chars().any(char::is_control) => {
                Err(self.invalid("cache-key", "key empty, over 1 KiB or with control characters"))
            }
            KeyDecision::Bypass(r) if r.len() > 64 => Err(self.invalid("cache-key", "bypass reason over 64 bytes")),
            _ => Ok(d),
        }
    }

    pub fn ttl(&self, req: &PluginRequest, resp: &PluginResponse) -> Result<Option<TtlDecision>, Failure> {
        let d = self.call("ttl", |p, s| p.call_ttl(s, req, resp))?;
        if let Some(t) = &d {
            if !tags_ok(&t.tags) {
                return Err(
                    self.invalid("ttl", "more than 32 tags, or a tag empty, over 256 bytes or with control characters")
                );
            }
        }
        Ok(d)
    }

    pub fn invalidate(&self, req: &PluginRequest, resp: &PluginResponse) -> Result<Invalidation, Failure> {
        let d = self.call("invalidate", |p, s| p.call_invalidate(s, req, resp))?;
        let ok = [&d.keys, &d.tags, &d.prefixes].iter().all(|l| {
            l.len() <= MAX_INVALIDATIONS
                && l.iter().all(|v| v.len() <= MAX_KEY_BYTES && !v.chars().any(char::is_control))
        });
        if ok {
            Ok(d)
        } else {
            Err(self.invalid(
                "invalidate",
                "more than 64 entries in a list, or an entry over 1 KiB or with control characters",
            ))
        }
    }

    pub fn cost(&self, req: &PluginRequest, resp: &PluginResponse) -> Result<Option<rust_decimal::Decimal>, Failure> {
        let d = self.call("cost", |p, s| p.call_cost(s, req, resp))?;
        match d {
            None => Ok(None),
            Some(s) => match s.parse::<rust_decimal::Decimal>() {
                Ok(v) if s.len() <= 40 && !v.is_sign_negative() => Ok(Some(v)),
                _ => Err(self.invalid("cost", "cost is not a non-negative decimal string")),
            },
        }
    }

    /// `identify` at `now` (the request's arrival). Not memoised: its answer may depend on the
    /// time (a token's `exp`), and a consumer decides quotas.
    pub fn identify(&self, req: &PluginRequest, now: std::time::SystemTime) -> Result<Option<String>, Failure> {
        let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let now = Datetime { seconds: since.as_secs(), nanoseconds: since.subsec_nanos() };
        let d = self.call("identify", |p, s| p.call_identify(s, req, now))?;
        match d {
            Some(c) if c.is_empty() || c.len() > MAX_CONSUMER_BYTES || c.chars().any(char::is_control) => {
                Err(self.invalid("identify", "consumer empty, over 256 bytes or with control characters"))
            }
            other => Ok(other),
        }
    }

    /// The other isolation strategy, for comparison (`benches/plugin.rs`): a new store and
    /// instance for this one call (instantiate, `init`, call, drop) instead of a warm one.
    pub fn cache_key_fresh(&self, req: &PluginRequest) -> Result<KeyDecision, Failure> {
        let (mut warm, _) = self.instantiate().map_err(|_| Failure::Instantiate)?;
        warm.store.set_epoch_deadline(self.ticks());
        warm.plugin.call_cache_key(&mut warm.store, req).map_err(|e| classify(&e))
    }

    /// Only instantiation and `init` (`benches/plugin.rs`).
    pub fn instantiate_only(&self) -> Result<(), String> {
        self.instantiate().map(|_| ())
    }

    /// Whether the plugin asked for header `name` (lower-case).
    pub fn wants_header(&self, name: &str) -> bool {
        self.needs.headers.iter().any(|h| h == "*" || h.eq_ignore_ascii_case(name))
    }

    /// The request's headers the plugin asked for, in WIT form.
    pub fn headers_for(&self, headers: &http::HeaderMap) -> Vec<Header> {
        if self.needs.headers.is_empty() {
            return Vec::new();
        }
        wit_headers(headers.iter().filter(|(k, _)| self.wants_header(k.as_str())))
    }
}

/// Headers in WIT form (values that are not visible ASCII are left out).
fn wit_headers<'a>(headers: impl Iterator<Item = (&'a http::HeaderName, &'a http::HeaderValue)>) -> Vec<Header> {
    headers
        .filter_map(|(k, v)| Some(Header { name: k.as_str().to_string(), value: v.to_str().ok()?.to_string() }))
        .collect()
}

fn ticks(d: Duration) -> u64 {
    let t = d.as_micros() / TICK.as_micros().max(1);
    // +1: the current tick may be about to end.
    u64::try_from(t).unwrap_or(u64::MAX).max(1) + 1
}

fn tags_ok(tags: &[String]) -> bool {
    tags.len() <= MAX_TAGS
        && tags.iter().all(|t| !t.is_empty() && t.len() <= MAX_TAG_BYTES && !t.chars().any(char::is_control))
}

/// What the gateway knows of a request, borrowed: hooks get the parts their `needs` name.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    /// Normalised path, and the query without `?`.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub body: Option<&'a [u8]>,
    /// The consumer phase 3 identified, if the route has one.
    pub consumer: Option<&'a str>,
}

impl<'a> RequestParts<'a> {
    /// From a normalised `path?query`.
    pub fn new(
        method: &'a str,
        scheme: &'a str,
        authority: &'a str,
        path_query: &'a str,
        headers: &'a http::HeaderMap,
        body: Option<&'a [u8]>,
    ) -> RequestParts<'a> {
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_query, None),
        };
        RequestParts { method, scheme, authority, path, query, headers, body, consumer: None }
    }

    pub fn with_consumer(self, consumer: Option<&'a str>) -> RequestParts<'a> {
        RequestParts { consumer, ..self }
    }
}

/// Trap (a panic, `unreachable`), timeout (epoch deadline) or memory (a refused grow).
fn classify(e: &wasmtime::Error) -> Failure {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => Failure::Timeout,
        Some(_) => Failure::Trap,
        None => {
            let text = format!("{e:#}");
            if text.contains("memory") && (text.contains("grow") || text.contains("limit") || text.contains("exceed")) {
                Failure::Memory
            } else {
                Failure::Trap
            }
        }
    }
}

/// Response fields for the `ttl` / `invalidate` / `cost` hooks.
pub fn response_for(loaded: &Loaded, status: u16, headers: &http::HeaderMap, body: Option<&[u8]>) -> PluginResponse {
    PluginResponse {
        status,
        headers: wit_headers(headers.iter()),
        body: if loaded.needs.response_body { body.map(<[u8]>::to_vec) } else { None },
    }
}
