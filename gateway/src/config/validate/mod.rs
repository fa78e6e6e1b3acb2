//! Raw → validated conversion. Collects every problem instead of stopping at the first,
//! each positioned through the span index of the file it came from. This file holds the
//! machinery (sources, problems, value helpers) and assembles the whole `Config`; each section
//! of the file format is checked in its own file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::Method;
use ipnet::IpNet;
use serde::de::DeserializeOwned;

use super::model::*;
use super::raw::*;
use super::spans::{Pos, SpanIndex};
use super::values::{parse_duration, parse_method, parse_money, parse_rate, parse_size, Text};
use super::{ConfigError, Problem, MAX_FILE_BYTES};

mod budgets;
mod cache;
mod consumers;
mod limits;
mod redis;
mod routes;
mod server;
mod tls;

const MAX_INCLUDE_DEPTH: usize = 8;

/// One parsed source file: its path, folder (for relative paths) and span index.
struct Source {
    path: PathBuf,
    dir: PathBuf,
    spans: SpanIndex,
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn at(&mut self, src: &Source, path: &str, message: impl Into<String>) {
        self.0.push(Problem { file: src.path.clone(), pos: src.spans.value(path), message: message.into() });
    }
    fn at_key(&mut self, src: &Source, path: &str, message: impl Into<String>) {
        self.0.push(Problem { file: src.path.clone(), pos: src.spans.key(path), message: message.into() });
    }
    fn at_pos(&mut self, file: &Path, pos: Pos, message: impl Into<String>) {
        self.0.push(Problem { file: file.to_path_buf(), pos, message: message.into() });
    }
}

/// Reads and parses one file. Problems (I/O, syntax, schema) are recorded; `None` means unusable.
fn parse_file<T: DeserializeOwned>(file: &Path, problems: &mut Problems) -> Option<(Source, T)> {
    let origin = Pos { line: 1, col: 1 };
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) => {
            problems.at_pos(file, origin, format!("cannot read configuration: {e}"));
            return None;
        }
    };
    if meta.len() > MAX_FILE_BYTES {
        problems.at_pos(file, origin, format!("document too large: {} bytes, at most {MAX_FILE_BYTES}", meta.len()));
        return None;
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            problems.at_pos(file, origin, format!("cannot read configuration: {e}"));
            return None;
        }
    };
    let spans = match SpanIndex::build(&text) {
        Ok(s) => s,
        Err(e) => {
            problems.at_pos(file, e.pos, format!("YAML syntax error: {}", e.message));
            return None;
        }
    };
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let src = Source { path: file.to_path_buf(), dir, spans };
    // An empty document is an empty mapping, so `routes: []` errors read the same as an empty file.
    // serde stops at the first unknown key: each is reported, blanked out of the text (every
    // other position unchanged) and the document read again, so one run reports them all.
    let mut text = if text.trim().is_empty() { "{}".to_string() } else { text };
    let mut unknown = 0;
    loop {
        match serde_norway::from_str(&text) {
            Ok(v) => return Some((src, v)),
            Err(e) => {
                let pos = e.location().map(|l| Pos { line: l.line(), col: l.column() }).unwrap_or(origin);
                let msg = explain_serde(&e.to_string());
                problems.at_pos(file, pos, msg.clone());
                let blanked = (msg.starts_with("unknown key") && unknown < MAX_UNKNOWN_KEYS)
                    .then(|| src.spans.key_at(pos).and_then(|k| blank_entry(&text, &src.spans, k)))
                    .flatten();
                match blanked {
                    Some(t) => {
                        text = t;
                        unknown += 1;
                    }
                    None => return None,
                }
            }
        }
    }
}

/// Unknown keys reported in one run before the rest is given up on.
const MAX_UNKNOWN_KEYS: usize = 100;

/// `text` with the mapping entry whose key is at `path` replaced by spaces (line breaks kept,
/// so every other node keeps its position): the key's line from the key on (in a flow mapping,
/// up to the next entry or the closing bracket, with its comma), then the lines below that are
/// indented deeper (its block value).
fn blank_entry(text: &str, spans: &SpanIndex, path: &str) -> Option<String> {
    let start = spans.key(path);
    let next = spans.next_outside(path);
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let first = lines.get_mut(start.line - 1)?;
    let chars: Vec<char> = first.chars().collect();
    let from = start.col - 1;
    let mut to = match next {
        Some(n) if n.line == start.line => n.col - 1,
        _ => chars.len(),
    };
    // A flow collection's closing bracket stays.
    let mut depth = 0i32;
    for (i, c) in chars.iter().enumerate().take(to).skip(from) {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' if depth == 0 => {
                to = i;
                break;
            }
            '}' | ']' => depth -= 1,
            _ => {}
        }
    }
    *first = chars.iter().enumerate().map(|(i, c)| if (from..to).contains(&i) { ' ' } else { *c }).collect();
    let indent = from;
    let stop = next.map_or(lines.len(), |n| n.line - 1);
    for line in lines.iter_mut().take(stop).skip(start.line) {
        let lead = line.chars().take_while(|c| *c == ' ').count();
        let rest = line.trim_start_matches(' ');
        let inner =
            lead > indent || (lead == indent && rest.starts_with("- ")) || rest.is_empty() || rest.starts_with('#');
        if !inner {
            break;
        }
        *line = " ".repeat(line.chars().count());
    }
    Some(lines.join("\n"))
}

/// Rewrites serde's messages for people: strips the trailing position, suggests the closest known key.
fn explain_serde(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    if msg.contains("repetition limit exceeded") || msg.contains("recursion limit exceeded") {
        return format!("document refused: {msg} (too many aliases or too deep; alias bombs are not accepted)");
    }
    let Some(rest) = msg.split_once("unknown field `").map(|(_, r)| r) else {
        return msg.to_string();
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return msg.to_string();
    };
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best =
        known.iter().map(|k| (strsim::levenshtein(field, k), *k)).filter(|(d, k)| *d <= 2.max(k.len() / 3)).min();
    let path = msg.split_once(": unknown field").map(|(p, _)| format!(" in `{p}`")).unwrap_or_default();
    match best {
        Some((_, k)) => format!("unknown key `{field}`{path} (did you mean `{k}`?)"),
        None => format!("unknown key `{field}`{path}; expected one of: {}", known.join(", ")),
    }
}

/// Whether an unset secret is an error (`weir run`, reload) or a warning (`weir validate`, which
/// runs in CI without production secrets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Secrets {
    Required,
    Optional,
}

pub(super) fn load(root: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();
    let Some((src, raw)) = parse_file::<RawConfig>(root, &mut problems) else {
        return Err(ConfigError { problems: in_file_order(problems.0, root) });
    };
    let mut v = Validator {
        problems,
        warnings: Vec::new(),
        budgets: Default::default(),
        targeted_fields: default_targeted_fields(),
        client_no_cache: true,
        secrets,
        route_names: Vec::new(),
    };
    let cfg = v.config(&src, raw);
    if v.problems.0.is_empty() {
        let mut cfg = cfg;
        cfg.warnings = v
            .warnings
            .iter()
            .map(|p| format!("{}:{}:{}: warning: {}", p.file.display(), p.pos.line, p.pos.col, p.message))
            .collect();
        Ok(cfg)
    } else {
        Err(ConfigError { problems: in_file_order(v.problems.0, root) })
    }
}

/// Problems by position: the root file's first, then each included file's.
fn in_file_order(mut problems: Vec<Problem>, root: &Path) -> Vec<Problem> {
    problems.sort_by(|a, b| {
        (a.file != root, &a.file, a.pos.line, a.pos.col).cmp(&(b.file != root, &b.file, b.pos.line, b.pos.col))
    });
    problems
}

struct Validator {
    problems: Problems,
    warnings: Vec<Problem>,
    /// `budgets:`, read before the routes that name them.
    budgets: std::collections::BTreeMap<String, std::sync::Arc<BudgetDef>>,
    /// `cache.targeted_fields`, read before the routes that carry it.
    targeted_fields: std::sync::Arc<[HeaderName]>,
    /// `cache.client_no_cache` (honor: true), the default of the routes'.
    client_no_cache: bool,
    secrets: Secrets,
    /// Every route's name where it was declared (valid routes or not), for the duplicate check.
    route_names: Vec<(String, Declared)>,
}

/// Where a route was declared, for cross-route messages.
#[derive(Clone)]
struct Declared {
    file: PathBuf,
    pos: Pos,
}

impl Validator {
    /// An environment variable holding a secret is unset: an error when the configuration is to
    /// run, a warning under `weir validate`.
    fn missing_secret(&mut self, src: &Source, path: &str, message: String) {
        match self.secrets {
            Secrets::Required => self.problems.at(src, path, message),
            Secrets::Optional => self.warnings.push(Problem {
                file: src.path.clone(),
                pos: src.spans.value(path),
                message: format!("{message} (needed by `weir run`)"),
            }),
        }
    }

    fn duration(&mut self, src: &Source, path: &str, t: Option<&Text>, default: Duration) -> Duration {
        match t {
            None => default,
            Some(t) => parse_duration(&t.text).unwrap_or_else(|e| {
                self.problems.at(src, path, e);
                default
            }),
        }
    }

    fn opt_duration(&mut self, src: &Source, path: &str, t: Option<&Text>) -> Option<Duration> {
        t.map(|t| self.duration(src, path, Some(t), Duration::ZERO))
    }

    fn size(&mut self, src: &Source, path: &str, t: Option<&Text>, default: u64) -> u64 {
        match t {
            None => default,
            Some(t) => parse_size(&t.text).unwrap_or_else(|e| {
                self.problems.at(src, path, e);
                default
            }),
        }
    }

    /// A whole number in `min..=max` (written plainly: `10000`).
    /// `count` for sizes held as `usize` (`max` fits one on every target Weir builds for).
    fn count_usize(&mut self, src: &Source, path: &str, t: Option<&Text>, default: usize, max: usize) -> usize {
        let n = self.count(src, path, t, default as u64, 1, max as u64);
        usize::try_from(n).unwrap_or(default)
    }

    fn count(&mut self, src: &Source, path: &str, t: Option<&Text>, default: u64, min: u64, max: u64) -> u64 {
        let Some(t) = t else { return default };
        match t.text.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                self.problems.at(src, path, format!("expected a whole number from {min} to {max}, got `{}`", t.text));
                default
            }
        }
    }

    fn addr(&mut self, src: &Source, path: &str, s: &str) -> Option<SocketAddr> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problems.at(src, path, format!("invalid address `{s}`: expected IP:PORT, e.g. `127.0.0.1:8080`"));
                None
            }
        }
    }

    fn methods(&mut self, src: &Source, path: &str, list: &[String]) -> Vec<Method> {
        let mut out = Vec::new();
        for (i, m) in list.iter().enumerate() {
            match parse_method(m) {
                Ok(m) => out.push(m),
                Err(e) => self.problems.at(src, &format!("{path}[{i}]"), e),
            }
        }
        out
    }

    fn file_exists(&mut self, src: &Source, path: &str, rel: &str, what: &str) -> PathBuf {
        let full = src.dir.join(rel);
        if !full.is_file() {
            self.problems.at(src, path, format!("{what} `{rel}` not found (looked at {})", full.display()));
        }
        full
    }

    /// One of a few words (`None`: the default).
    fn keyword<T: Copy>(
        &mut self,
        src: &Source,
        path: &str,
        what: &str,
        value: Option<&str>,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(v) = value else { return default };
        match options.iter().find(|(w, _)| *w == v) {
            Some((_, t)) => *t,
            None => {
                let words: Vec<String> = options.iter().map(|(w, _)| format!("`{w}`")).collect();
                self.problems.at(src, path, format!("invalid {what} `{v}`: expected {}", words.join(" or ")));
                default
            }
        }
    }

    fn config(&mut self, src: &Source, raw: RawConfig) -> Config {
        let mut listeners = Vec::new();
        if raw.listen.is_empty() {
            self.problems.at_key(src, "listen", "no listeners: add `listen: [{addr: 127.0.0.1:8080}]`");
        }
        for (i, l) in raw.listen.iter().enumerate() {
            let p = format!("listen[{i}]");
            let addr = self.addr(src, &format!("{p}.addr"), &l.addr);
            let tls = l.tls.as_ref().and_then(|t| self.tls(src, &format!("{p}.tls"), t));
            if let Some(addr) = addr {
                listeners.push(Listener { addr, tls });
            }
        }

        let admin = raw.admin.as_ref().and_then(|a| {
            let addr = self.addr(src, "admin.addr", &a.addr)?;
            if a.token_env.is_none() && a.token_file.is_none() && !addr.ip().is_loopback() {
                self.problems.at(
                    src,
                    "admin.addr",
                    format!("admin listener `{addr}` is not on loopback: set `admin.token_env` or `admin.token_file` so every admin call needs a token"),
                );
            }
            let token = match (&a.token_env, &a.token_file) {
                (Some(_), Some(_)) => {
                    self.problems.at(src, "admin.token_file", "give the admin token by `token_env` or by `token_file`, not both");
                    None
                }
                (Some(env), None) => {
                    if env.is_empty() || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        self.problems.at(src, "admin.token_env", format!("invalid environment variable name `{env}`"));
                    }
                    Some(AdminToken::Env(env.clone()))
                }
                (None, Some(file)) => Some(AdminToken::File(src.dir.join(file))),
                (None, None) => None,
            };
            // `weir run` refuses to start without the token (with the reason); a reload keeps the
            // token the process started with. `weir validate` warns.
            if let Some(t) = &token {
                if let (Err(why), Secrets::Optional) = (t.read(), self.secrets) {
                    let key = if a.token_file.is_some() { "admin.token_file" } else { "admin.token_env" };
                    self.missing_secret(src, key, why);
                }
            }
            let mut hosts = Vec::new();
            for (i, h) in a.hosts.iter().enumerate() {
                let ok = !h.is_empty()
                    && h.len() <= 253
                    && h.split('.').all(|l| {
                        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if ok {
                    hosts.push(h.to_ascii_lowercase());
                } else {
                    self.problems.at(
                        src,
                        &format!("admin.hosts[{i}]"),
                        format!("`{h}` is not a host name (letters, digits, `-` and `.`, no port)"),
                    );
                }
            }
            Some(Admin { addr, token, hosts })
        });

        let redis = raw.redis.as_ref().map(|r| self.redis(src, r));

        let cache = CacheSettings {
            l1_max_bytes: self.size(
                src,
                "cache.l1_max_bytes",
                raw.cache.as_ref().and_then(|c| c.l1_max_bytes.as_ref()),
                256 << 20,
            ),
            max_object_bytes: self.size(
                src,
                "cache.max_object_bytes",
                raw.cache.as_ref().and_then(|c| c.max_object_bytes.as_ref()),
                8 << 20,
            ),
            max_fill_bytes: self.size(
                src,
                "cache.max_fill_bytes",
                raw.cache.as_ref().and_then(|c| c.max_fill_bytes.as_ref()),
                256 << 20,
            ),
            targeted_fields: self.targeted_fields(src, raw.cache.as_ref().and_then(|c| c.targeted_fields.as_ref())),
            client_no_cache: self.client_no_cache(
                src,
                "cache.client_no_cache",
                raw.cache.as_ref().and_then(|c| c.client_no_cache.as_deref()),
                true,
            ),
        };
        self.targeted_fields = cache.targeted_fields.clone();
        self.client_no_cache = cache.client_no_cache;

        let server = self.server(src, raw.server.as_ref());
        let consumers = self.consumers(src, &raw.consumers);
        let consumer_limits = self.consumer_limits(src, &raw.consumers);
        self.budgets(src, &raw.budgets);

        let mut routes = Vec::new();
        let mut declared = Vec::new();
        self.routes(src, raw.routes, &mut routes, &mut declared);
        let mut stack = vec![src.path.clone()];
        self.includes(src, &raw.include, &mut routes, &mut declared, &mut stack);
        if routes.is_empty() && self.problems.0.is_empty() {
            self.problems.at_key(
                src,
                "routes",
                "no routes: add at least one route under `routes:` (or `include:` a route file)",
            );
        }
        self.cross_route_checks(&routes, &declared);
        for (i, c) in raw.consumers.iter().enumerate() {
            for name in c.limits.keys() {
                let known =
                    routes.iter().any(|r| r.rate_limit.iter().chain(&r.rate_limit_misses).any(|l| &l.name == name));
                if !known {
                    self.problems.at(
                        src,
                        &format!("consumers[{i}].limits.{name}"),
                        format!("no route has a rate_limit policy named `{name}`"),
                    );
                }
            }
        }

        Config {
            source: src.path.clone(),
            listeners,
            admin,
            redis,
            cache,
            server,
            routes,
            consumers: std::sync::Arc::new(consumers),
            consumer_limits: std::sync::Arc::new(consumer_limits),
            consumer_budgets: std::sync::Arc::new(self.consumer_budgets(src, &raw.consumers)),
            budgets: std::sync::Arc::new(std::mem::take(&mut self.budgets)),
            warnings: Vec::new(),
            log: self.log(src, raw.log.as_ref()),
            debug_token: self.debug(src, raw.debug.as_ref(), raw.admin.as_ref()),
            tracing: raw.tracing.as_ref().and_then(|t| self.tracing(src, t)),
        }
    }
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.trim().as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::explain_serde;

    #[test]
    fn did_you_mean() {
        let m = explain_serde(
            "routes[0].cache: unknown field `ttll`, expected one of `ttl`, `origin_headers` at line 3 column 5",
        );
        assert_eq!(m, "unknown key `ttll` in `routes[0].cache` (did you mean `ttl`?)");
    }
}
