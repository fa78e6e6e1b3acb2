//! Raw → validated conversion. Collects every problem instead of stopping at the first,
//! each positioned through the span index of the file it came from.

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
    let parsed = if text.trim().is_empty() { serde_norway::from_str("{}") } else { serde_norway::from_str(&text) };
    match parsed {
        Ok(v) => Some((src, v)),
        Err(e) => {
            let pos = e.location().map(|l| Pos { line: l.line(), col: l.column() }).unwrap_or(origin);
            problems.at_pos(file, pos, explain_serde(&e.to_string()));
            None
        }
    }
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

pub(super) fn load(root: &Path) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();
    let Some((src, raw)) = parse_file::<RawConfig>(root, &mut problems) else {
        return Err(ConfigError { problems: problems.0 });
    };
    let mut v = Validator {
        problems,
        warnings: Vec::new(),
        budgets: Default::default(),
        targeted_fields: default_targeted_fields(),
        client_no_cache: true,
    };
    let cfg = v.config(&src, raw);
    if v.problems.0.is_empty() {
        let mut cfg = cfg;
        cfg.warnings = v.warnings.iter().map(ToString::to_string).collect();
        Ok(cfg)
    } else {
        Err(ConfigError { problems: v.problems.0 })
    }
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
}

/// Where a route was declared, for cross-route messages.
struct Declared {
    file: PathBuf,
    pos: Pos,
}

impl Validator {
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

    /// `upstream_tls:` and `upstream_http2:`, built into the route's client configuration now
    /// (a missing or mismatched file is a configuration error). `verify: false` is a warning.
    fn upstream_tls(&mut self, src: &Source, p: &str, r: &RawRoute) -> Option<crate::tls::UpstreamTls> {
        let up = format!("{p}.upstream_tls");
        let t = r.upstream_tls.as_ref();
        let file = |v: &mut Self, key: &str, rel: Option<&String>, what: &str| {
            rel.map(|rel| v.file_exists(src, &format!("{up}.{key}"), rel, what))
        };
        let ca = file(self, "ca", t.and_then(|t| t.ca.as_ref()), "upstream CA file");
        let cert = file(self, "client_cert", t.and_then(|t| t.client_cert.as_ref()), "client certificate file");
        let key = file(self, "client_key", t.and_then(|t| t.client_key.as_ref()), "client key file");
        if cert.is_some() != key.is_some() {
            self.problems.at(src, &up, "upstream_tls needs both `client_cert` and `client_key`, or neither");
        }
        let verify = t.and_then(|t| t.verify).unwrap_or(true);
        if !verify {
            self.warnings.push(Problem {
                file: src.path.clone(),
                pos: src.spans.value(&format!("{up}.verify")),
                message: "upstream_tls.verify: false accepts any certificate from the upstream: anyone on the path can impersonate it".into(),
            });
        }
        let missing = [&ca, &cert, &key].iter().any(|f| f.as_ref().is_some_and(|f| !f.is_file()));
        if missing {
            return None;
        }
        let client = cert.as_deref().zip(key.as_deref());
        match crate::tls::upstream_tls(
            ca.as_deref(),
            client,
            t.and_then(|t| t.server_name.as_deref()),
            verify,
            r.upstream_http2.unwrap_or(false),
        ) {
            Ok(u) => Some(u),
            Err(e) => {
                self.problems.at(src, &up, e);
                None
            }
        }
    }

    /// `budgets:`: each a limit (money, at most `budget::MAX_AMOUNT`), a window and a fail mode.
    fn budgets(&mut self, src: &Source, raw: &std::collections::BTreeMap<String, RawBudgetDef>) {
        for (name, b) in raw {
            let bp = format!("budgets.{name}");
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                self.problems.at_key(src, &bp, format!("invalid budget name `{name}`: 1-64 of A-Z a-z 0-9 - _ ."));
            }
            // A bad limit is reported once; the budget is still known, so routes naming it do
            // not add "unknown budget" errors on top.
            let limit = parse_money(&b.limit).unwrap_or_else(|e| {
                self.problems.at(src, &format!("{bp}.limit"), e);
                rust_decimal::Decimal::ZERO
            });
            let limit_units = crate::budget::units_exact(limit).unwrap_or_else(|| {
                self.problems.at(
                    src,
                    &format!("{bp}.limit"),
                    format!("limit {limit} is above {}, the largest amount kept exactly", crate::budget::MAX_AMOUNT),
                );
                0
            });
            let per = match b.per.text.trim() {
                "1h" => BudgetWindow::Hour,
                "1d" => BudgetWindow::Day,
                "30d" => BudgetWindow::Days30,
                "month" => BudgetWindow::Month,
                other => {
                    self.problems.at(
                        src,
                        &format!("{bp}.per"),
                        format!("invalid budget window `{other}`: expected 1h, 1d, 30d or month (calendar, UTC)"),
                    );
                    BudgetWindow::Day
                }
            };
            let fail = self.keyword(
                src,
                &format!("{bp}.fail"),
                "fail mode",
                b.fail.as_deref(),
                &[("closed", FailMode::Closed), ("open", FailMode::Open)],
                FailMode::Closed,
            );
            let lease_ttl =
                self.duration(src, &format!("{bp}.lease_ttl"), b.lease_ttl.as_ref(), crate::budget::LEASE_TTL);
            if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&lease_ttl) {
                self.problems.at(src, &format!("{bp}.lease_ttl"), "lease_ttl must be between 1s and 1d");
            }
            let history = b.history.as_ref();
            let hourly_ttl = self.duration(
                src,
                &format!("{bp}.history.hourly"),
                history.and_then(|h| h.hourly.as_ref()),
                crate::budget::HOURLY_TTL,
            );
            let daily_ttl = self.duration(
                src,
                &format!("{bp}.history.daily"),
                history.and_then(|h| h.daily.as_ref()),
                crate::budget::DAILY_TTL,
            );
            let system_limit_units = b.system_limit.as_ref().and_then(|t| match parse_money(t) {
                Ok(d) => crate::budget::units_exact(d).or_else(|| {
                    self.problems.at(
                        src,
                        &format!("{bp}.system_limit"),
                        format!("system_limit {d} is above {}", crate::budget::MAX_AMOUNT),
                    );
                    None
                }),
                Err(e) => {
                    self.problems.at(src, &format!("{bp}.system_limit"), e);
                    None
                }
            });
            let def = BudgetDef {
                name: name.clone(),
                limit,
                limit_units,
                system_limit_units,
                per,
                fail,
                lease_ttl,
                hourly_ttl,
                daily_ttl,
            };
            self.budgets.insert(name.clone(), std::sync::Arc::new(def));
        }
    }

    /// A route's `budget:` (after `budgets:` are known).
    fn route_budget(
        &mut self,
        src: &Source,
        p: &str,
        b: &RawBudget,
        consumer: Option<&ConsumerFrom>,
        has_plugin: bool,
    ) -> Option<RouteBudget> {
        let bp = format!("{p}.budget");
        let def = self.budgets.get(&b.name).cloned();
        if def.is_none() {
            let known: Vec<&str> = self.budgets.keys().map(String::as_str).collect();
            self.problems.at(
                src,
                &format!("{bp}.name"),
                format!(
                    "unknown budget `{}` (budgets: {})",
                    b.name,
                    if known.is_empty() { "none".into() } else { known.join(", ") }
                ),
            );
        }
        if !consumer.is_some_and(|c| c.required) {
            self.problems.at(
                src,
                &bp,
                "a budget needs the route's `consumer: {..., required: true}` (an unknown caller must never get a budget)",
            );
        }
        let units = |v: &mut Self, field: &str, t: &Text| -> Option<i64> {
            match parse_money(t) {
                Ok(d) => crate::budget::units_exact(d).or_else(|| {
                    v.problems.at(src, &format!("{bp}.{field}"), format!("{d} is above {}", crate::budget::MAX_AMOUNT));
                    None
                }),
                Err(e) => {
                    v.problems.at(src, &format!("{bp}.{field}"), e);
                    None
                }
            }
        };
        let cost = if b.cost.text.trim() == "plugin" {
            if !has_plugin {
                self.problems.at(
                    src,
                    &format!("{bp}.cost"),
                    "`cost: plugin` needs the route's `plugin:` (its cost hook)",
                );
            }
            if b.reserve.is_none() {
                self.problems.at(
                    src,
                    &bp,
                    "`cost: plugin` needs `reserve` (held before forwarding, while the cost is unknown)",
                );
            }
            if b.max_cost.is_none() {
                self.problems.at(
                    src,
                    &bp,
                    "`cost: plugin` needs `max_cost`: what a call costs when its response cannot be priced (no usage, a failed hook, a client that left); add e.g. `max_cost: \"0.50\"`",
                );
            }
            None
        } else {
            Some(units(self, "cost", &b.cost)?)
        };
        let reserve = match &b.reserve {
            Some(t) => units(self, "reserve", t)?,
            None => cost.unwrap_or(0),
        };
        if cost.is_some_and(|c| reserve < c) {
            self.problems.at(
                src,
                &format!("{bp}.reserve"),
                "reserve is below the fixed cost: every call would overshoot",
            );
        }
        let max_cost = match &b.max_cost {
            Some(t) => Some(units(self, "max_cost", t)?),
            None => None,
        };
        if max_cost.is_some_and(|m| m < reserve) {
            self.problems.at(src, &format!("{bp}.max_cost"), "max_cost is below the reservation");
        }
        let mut charge_status = Vec::new();
        let default = ["2xx".to_string()];
        let classes = b.charge_status.as_ref().map_or(&default[..], OneOrMany::as_slice);
        for c in classes {
            let range = match c.trim() {
                "any" => Some((100, 599)),
                x if x.len() == 3 && x.ends_with("xx") => {
                    x[..1].parse::<u16>().ok().filter(|d| (1..=5).contains(d)).map(|d| (d * 100, d * 100 + 99))
                }
                x => x.parse::<u16>().ok().filter(|s| (100..=599).contains(s)).map(|s| (s, s)),
            };
            match range {
                Some(r) => charge_status.push(r),
                None => self.problems.at(
                    src,
                    &format!("{bp}.charge_status"),
                    format!("invalid charge_status `{c}`: expected a class (`2xx`), a code (`201`) or `any`"),
                ),
            }
        }
        if b.charge_hits == Some(true) && cost.is_none() {
            self.problems.at(
                src,
                &format!("{bp}.charge_hits"),
                "charge_hits needs a fixed cost: a hit has no usage of its own for the plugin to price",
            );
        }
        Some(RouteBudget {
            def: def?,
            cost_units: cost,
            reserve_units: reserve,
            max_cost_units: max_cost,
            charge_status,
            headers: b.headers.unwrap_or(false),
            charge_hits: b.charge_hits.unwrap_or(false),
        })
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

    /// A listener's `tls:`: every certificate and the client CA loaded and checked now, so a
    /// bad file is reported at its entry (and a reload with one keeps the old certificates).
    fn tls(&mut self, src: &Source, p: &str, t: &RawTls) -> Option<crate::tls::TlsSettings> {
        use crate::tls::{ClientAuth, MinVersion};
        if t.certs.is_empty() {
            self.problems.at(src, &format!("{p}.certs"), "tls needs at least one certificate");
        }
        let mut certs = Vec::new();
        let mut files = Vec::new();
        let mut ok = true;
        for (j, c) in t.certs.iter().enumerate() {
            let cp = format!("{p}.certs[{j}]");
            let cert = self.file_exists(src, &format!("{cp}.cert"), &c.cert, "certificate file");
            let key = self.file_exists(src, &format!("{cp}.key"), &c.key, "key file");
            if !cert.is_file() || !key.is_file() {
                ok = false;
                continue;
            }
            match crate::tls::load_cert(&cert, &key) {
                Ok(served) => {
                    let left = served.not_after - crate::clock::unix_s(std::time::SystemTime::now());
                    if left < i64::try_from(crate::tls::EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX) {
                        let when = if left <= 0 {
                            format!("expired {} days ago", -left / 86_400)
                        } else {
                            format!("expires in {} days", left / 86_400)
                        };
                        self.warnings.push(Problem {
                            file: src.path.clone(),
                            pos: src.spans.value(&format!("{cp}.cert")),
                            message: format!("certificate `{}` ({}) {when}; it is still served", c.cert, served.name),
                        });
                    }
                    certs.push(std::sync::Arc::new(served));
                }
                Err(e) => {
                    ok = false;
                    self.problems.at(src, &cp, e);
                }
            }
            files.push(cert);
            files.push(key);
        }
        let client_ca = t.client_ca.as_ref().and_then(|ca| {
            let path = self.file_exists(src, &format!("{p}.client_ca"), ca, "client CA file");
            files.push(path.clone());
            match crate::tls::load_client_ca(&path) {
                Ok(c) => Some(std::sync::Arc::new(c)),
                Err(e) => {
                    ok = false;
                    if path.is_file() {
                        self.problems.at(src, &format!("{p}.client_ca"), e);
                    }
                    None
                }
            }
        });
        let client_auth = self.keyword(
            src,
            &format!("{p}.client_auth"),
            "client_auth",
            t.client_auth.as_deref(),
            &[("required", ClientAuth::Required), ("optional", ClientAuth::Optional)],
            ClientAuth::Required,
        );
        if t.client_auth.is_some() && t.client_ca.is_none() {
            self.problems.at(
                src,
                &format!("{p}.client_auth"),
                "client_auth needs `client_ca` (the CA that signs client certificates)",
            );
        }
        // Older versions are not offered at all.
        let min_version = self.keyword(
            src,
            &format!("{p}.min_version"),
            "min_version",
            t.min_version.as_deref(),
            &[("1.2", MinVersion::Tls12), ("1.3", MinVersion::Tls13)],
            MinVersion::Tls12,
        );
        let handshake_timeout = self.duration(
            src,
            &format!("{p}.handshake_timeout"),
            t.handshake_timeout.as_ref(),
            std::time::Duration::from_secs(10),
        );
        // HSTS: only on the TLS listener (RFC 6797 §7.2: never over plain HTTP).
        let hsts = t.hsts.as_ref().and_then(|h| {
            let max_age = self.duration(src, &format!("{p}.hsts"), Some(h), std::time::Duration::ZERO).as_secs();
            http::HeaderValue::from_str(&format!("max-age={max_age}")).ok()
        });
        (ok && !certs.is_empty()).then(|| crate::tls::TlsSettings {
            certs: std::sync::Arc::new(certs),
            client_ca,
            client_auth,
            min_version,
            handshake_timeout,
            hsts,
            files,
        })
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
            if a.token_env.is_none() && !addr.ip().is_loopback() {
                self.problems.at(
                    src,
                    "admin.addr",
                    format!("admin listener `{addr}` is not on loopback: set `admin.token_env` so every admin call needs a token"),
                );
            }
            if let Some(env) = &a.token_env {
                if env.is_empty() || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    self.problems.at(src, "admin.token_env", format!("invalid environment variable name `{env}`"));
                }
            }
            Some(Admin { addr, token_env: a.token_env.clone() })
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

    /// `consumers[].limits`: a consumer's own rate (and burst) for the policies of a name.
    /// `consumers[].budgets`: a consumer's own limit for a named budget (after `budgets:`).
    fn consumer_budgets(&mut self, src: &Source, raw: &[RawConsumer]) -> HashMap<String, HashMap<String, i64>> {
        let mut out = HashMap::new();
        for (i, c) in raw.iter().enumerate() {
            let mut own = HashMap::new();
            for (name, limit) in &c.budgets {
                let bp = format!("consumers[{i}].budgets.{name}");
                if !self.budgets.contains_key(name) {
                    self.problems.at_key(src, &bp, format!("no budget named `{name}` in `budgets:`"));
                    continue;
                }
                match parse_money(limit).map(crate::budget::units_exact) {
                    Ok(Some(u)) => {
                        own.insert(name.clone(), u);
                    }
                    Ok(None) => self.problems.at(
                        src,
                        &bp,
                        format!(
                            "limit {} is above {}, the largest amount kept exactly",
                            limit.text,
                            crate::budget::MAX_AMOUNT
                        ),
                    ),
                    Err(e) => self.problems.at(src, &bp, e),
                }
            }
            if !own.is_empty() {
                out.insert(c.id.clone(), own);
            }
        }
        out
    }

    fn consumer_limits(&mut self, src: &Source, raw: &[RawConsumer]) -> HashMap<String, Vec<LimitOverride>> {
        let mut out = HashMap::new();
        for (i, c) in raw.iter().enumerate() {
            let mut list = Vec::new();
            for (name, o) in &c.limits {
                let lp = format!("consumers[{i}].limits.{name}");
                let Ok(rate) = parse_rate(&o.rate.text).map_err(|e| self.problems.at(src, &format!("{lp}.rate"), e))
                else {
                    continue;
                };
                let burst = self.count(src, &format!("{lp}.burst"), o.burst.as_ref(), rate.count, 1, u64::MAX);
                match crate::limit::gcra::Gcra::new(rate.count, rate.per, burst) {
                    Some(gcra) => list.push(LimitOverride { policy: name.clone(), rate, burst, gcra }),
                    None => self.problems.at(
                        src,
                        &format!("{lp}.rate"),
                        format!("rate `{}` cannot be kept exactly: one request per 1 µs to 285 years", o.rate.text),
                    ),
                }
            }
            if !list.is_empty() {
                out.insert(c.id.clone(), list);
            }
        }
        out
    }

    /// `consumers:`: ids unique; keys as SHA-256 digests (64 hex digits) or read from an
    /// environment variable and hashed here (a key never sits in the file in plain text).
    fn consumers(&mut self, src: &Source, raw: &[RawConsumer]) -> HashMap<[u8; 32], String> {
        let mut out: HashMap<[u8; 32], String> = HashMap::new();
        let mut ids = std::collections::HashSet::new();
        for (i, c) in raw.iter().enumerate() {
            let cp = format!("consumers[{i}]");
            let id_ok = !c.id.is_empty()
                && c.id.len() <= 256
                && c.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b));
            if !id_ok {
                self.problems.at(
                    src,
                    &format!("{cp}.id"),
                    format!("invalid consumer id `{}`: 1-256 of A-Z a-z 0-9 . _ - @ :", c.id),
                );
            }
            if !ids.insert(c.id.clone()) {
                self.problems.at(src, &format!("{cp}.id"), format!("duplicate consumer id `{}`", c.id));
            }
            let mut digests = Vec::new();
            for (k, d) in c.keys_sha256.iter().enumerate() {
                match hex32(d) {
                    Some(h) => digests.push(h),
                    None => self.problems.at(
                        src,
                        &format!("{cp}.keys_sha256[{k}]"),
                        "expected a SHA-256 digest: 64 hex digits (`printf %s KEY | sha256sum`)",
                    ),
                }
            }
            if let Some(var) = &c.key_env {
                match std::env::var(var) {
                    Ok(key) if !key.is_empty() => {
                        use sha2::Digest as _;
                        digests.push(sha2::Sha256::digest(key.as_bytes()).into());
                    }
                    _ => self.problems.at(
                        src,
                        &format!("{cp}.key_env"),
                        format!("consumer key variable `{var}` is not set"),
                    ),
                }
            }
            if digests.is_empty() {
                self.problems.at(src, &cp, "a consumer needs `keys_sha256` or `key_env`");
            }
            for d in digests {
                if out.insert(d, c.id.clone()).is_some_and(|other| other != c.id) {
                    self.problems.at(src, &cp, "this key already belongs to another consumer");
                }
            }
        }
        out
    }

    fn redis(&mut self, src: &Source, r: &RawRedis) -> Redis {
        let mut urls = Vec::new();
        let (list, cluster, base) = match (&r.url, &r.cluster) {
            (Some(u), None) => (vec![u.clone()], false, "redis.url".to_string()),
            (None, Some(c)) if !c.is_empty() => (c.clone(), true, "redis.cluster".to_string()),
            _ => {
                self.problems.at(src, "redis", "redis needs exactly one of `url` or a non-empty `cluster` list");
                (Vec::new(), false, "redis".to_string())
            }
        };
        for (i, u) in list.iter().enumerate() {
            let p = if cluster { format!("{base}[{i}]") } else { base.clone() };
            match url::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "redis" | "rediss") && url.host_str().is_some() => urls.push(url),
                _ => self.problems.at(
                    src,
                    &p,
                    format!("invalid Redis URL `{u}`: expected redis://HOST:PORT/DB or rediss://..."),
                ),
            }
        }
        let op_timeout = self.duration(src, "redis.op_timeout", r.op_timeout.as_ref(), Duration::from_millis(50));
        if op_timeout.is_zero() || op_timeout > Duration::from_secs(10) {
            self.problems.at(src, "redis.op_timeout", "op_timeout must be between 1ms and 10s");
        }
        let max_object_bytes = self.size(src, "redis.max_object_bytes", r.max_object_bytes.as_ref(), 1 << 20);
        if max_object_bytes > 512 << 20 {
            self.problems.at(
                src,
                "redis.max_object_bytes",
                "max_object_bytes must be at most 512MiB (Redis' own limit)",
            );
        }
        let tls_ca =
            r.tls.as_ref().and_then(|t| t.ca.as_deref()).map(|ca| self.file_exists(src, "redis.tls.ca", ca, "CA file"));
        if tls_ca.is_some() && !urls.iter().any(|u| u.scheme() == "rediss") {
            self.problems.at(src, "redis.tls", "redis.tls applies to rediss:// URLs only");
        }
        let b = r.breaker.as_ref();
        let breaker = BreakerSettings {
            failures: b.and_then(|b| b.failures).unwrap_or(5),
            window: self.duration(
                src,
                "redis.breaker.window",
                b.and_then(|b| b.window.as_ref()),
                Duration::from_secs(10),
            ),
            open_for: self.duration(
                src,
                "redis.breaker.open_for",
                b.and_then(|b| b.open_for.as_ref()),
                Duration::from_secs(5),
            ),
        };
        if breaker.failures == 0 {
            self.problems.at(src, "redis.breaker.failures", "failures must be at least 1");
        }
        if breaker.window.is_zero() || breaker.open_for.is_zero() {
            self.problems.at(src, "redis.breaker", "breaker window and open_for must be positive durations");
        }
        Redis {
            urls,
            key_secret_env: r.key_secret_env.clone(),
            instances: self.count(src, "redis.instances", r.instances.as_ref(), 1, 1, 10_000),
            cluster,
            password_env: r.password_env.clone(),
            op_timeout,
            max_object_bytes,
            tls_ca,
            breaker,
            required: r.required.unwrap_or(false),
        }
    }

    fn log(&mut self, src: &Source, l: Option<&RawLog>) -> crate::observe::LogSettings {
        use crate::observe::{Format, LogSettings, Sink};
        let mut out = LogSettings::default();
        let Some(l) = l else { return out };
        if let Some(level) = &l.level {
            if tracing_subscriber::EnvFilter::try_new(level).is_err() {
                self.problems.at(
                    src,
                    "log.level",
                    format!("invalid log level `{level}`: expected e.g. `info`, `debug` or `weir=debug,info`"),
                );
            }
            out.level = level.clone();
        }
        out.query = l.query.unwrap_or(false);
        if let Some(a) = &l.access {
            out.format = match a.format.as_deref() {
                None | Some("json") => Format::Json,
                Some("text") => Format::Text,
                Some("off") => Format::Off,
                Some(o) => {
                    self.problems.at(
                        src,
                        "log.access.format",
                        format!("invalid format `{o}`: expected `json`, `text` or `off`"),
                    );
                    Format::Json
                }
            };
            out.to = match a.to.as_deref() {
                None | Some("stdout") => Sink::Stdout,
                Some("stderr") => Sink::Stderr,
                Some(path) => {
                    let p = src.dir.join(path);
                    let dir_ok = p.parent().is_none_or(|d| d.as_os_str().is_empty() || d.is_dir());
                    if !dir_ok {
                        self.problems.at(
                            src,
                            "log.access.to",
                            format!("the directory of `{}` does not exist", p.display()),
                        );
                    }
                    Sink::File(p)
                }
            };
            out.buffer =
                usize::try_from(self.count(src, "log.access.buffer", a.buffer.as_ref(), 16_384, 1, 10_000_000))
                    .unwrap_or(16_384);
        }
        out
    }

    fn tracing(&mut self, src: &Source, t: &RawTracing) -> Option<crate::observe::TraceSettings> {
        match url::Url::parse(&t.otlp) {
            Ok(u) if u.scheme() == "http" && u.host_str().is_some() => Some(crate::observe::TraceSettings {
                otlp: u,
                service_name: t.service_name.clone().unwrap_or_else(|| "weir".into()),
            }),
            _ => {
                self.problems.at(
                    src,
                    "tracing.otlp",
                    format!(
                        "invalid OTLP endpoint `{}`: expected the collector's OTLP/HTTP base URL, e.g. `http://127.0.0.1:4318`",
                        t.otlp
                    ),
                );
                None
            }
        }
    }

    fn debug(
        &mut self,
        src: &Source,
        d: Option<&RawDebug>,
        admin: Option<&RawAdmin>,
    ) -> Option<std::sync::Arc<crate::admin::Token>> {
        let d = d?;
        if admin.and_then(|a| a.token_env.as_deref()) == Some(d.token_env.as_str()) {
            self.problems.at(src, "debug.token_env", "debug.token_env must name its own secret, not the admin token's: the admin token must never travel on the data plane");
            return None;
        }
        match std::env::var(&d.token_env) {
            Ok(t) if t.len() >= 16 => Some(std::sync::Arc::new(crate::admin::Token::new(&t))),
            Ok(t) if !t.is_empty() => {
                self.problems.at(
                    src,
                    "debug.token_env",
                    format!("the debug token in `{}` is {} bytes: use at least 16", d.token_env, t.len()),
                );
                None
            }
            _ => {
                self.problems.at(src, "debug.token_env", format!("debug token variable `{}` is not set", d.token_env));
                None
            }
        }
    }

    fn server(&mut self, src: &Source, s: Option<&RawServer>) -> ServerSettings {
        let max_header_bytes =
            self.size(src, "server.max_header_bytes", s.and_then(|s| s.max_header_bytes.as_ref()), 32 << 10);
        // hyper's own buffer is 64 KiB (it answers a bare 431 beyond); Weir's JSON 431 must trigger first.
        if !(1024..=60 << 10).contains(&max_header_bytes) {
            self.problems.at(src, "server.max_header_bytes", "max_header_bytes must be between 1KiB and 60KiB");
        }
        let mut trusted = Vec::new();
        for (i, t) in s.map(|s| s.trusted_proxies.as_slice()).unwrap_or_default().iter().enumerate() {
            let parsed = t.parse::<IpNet>().or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => trusted.push(n),
                Err(_) => self.problems.at(
                    src,
                    &format!("server.trusted_proxies[{i}]"),
                    format!("invalid address or CIDR `{t}`: expected e.g. `10.0.0.0/8` or `192.0.2.7`"),
                ),
            }
        }
        ServerSettings {
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(32 << 10),
            header_read_timeout: self.duration(
                src,
                "server.header_read_timeout",
                s.and_then(|s| s.header_read_timeout.as_ref()),
                Duration::from_secs(10),
            ),
            shutdown_timeout: self.duration(
                src,
                "server.shutdown_timeout",
                s.and_then(|s| s.shutdown_timeout.as_ref()),
                Duration::from_secs(30),
            ),
            drain_delay: self.duration(
                src,
                "server.drain_delay",
                s.and_then(|s| s.drain_delay.as_ref()),
                Duration::ZERO,
            ),
            upgrade_socket: s.and_then(|s| s.upgrade_socket.as_ref()).map(|p| src.dir.join(p)),
            trusted_proxies: trusted,
            max_connections: usize::try_from(self.count(
                src,
                "server.max_connections",
                s.and_then(|s| s.max_connections.as_ref()),
                10_000,
                1,
                1 << 20,
            ))
            .unwrap_or(10_000),
            auth_failures: self.auth_failures(src, s.and_then(|s| s.auth_failures.as_ref())),
            rate_limit_keys: self.count(
                src,
                "server.rate_limit_keys",
                s.and_then(|s| s.rate_limit_keys.as_ref()),
                crate::limit::LOCAL_KEYS,
                100,
                100_000_000,
            ),
            upgrade_protocols: s
                .and_then(|s| s.upgrade_protocols.clone())
                .unwrap_or_else(|| vec!["websocket".into()])
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            max_tunnel_bytes: self.size(
                src,
                "server.max_tunnel_bytes",
                s.and_then(|s| s.max_tunnel_bytes.as_ref()),
                1 << 30,
            ),
            http2: self.http2(src, s.and_then(|s| s.http2.as_ref())),
        }
    }

    fn http2(&mut self, src: &Source, h: Option<&RawHttp2>) -> Http2Settings {
        let n = |v: &mut Self, key: &str, t: Option<&Text>, default: u64, max: u64| {
            v.count(src, &format!("server.http2.{key}"), t, default, 1, max)
        };
        let max_concurrent_streams =
            n(self, "max_concurrent_streams", h.and_then(|h| h.max_concurrent_streams.as_ref()), 128, 10_000);
        let pending = n(
            self,
            "max_pending_accept_reset_streams",
            h.and_then(|h| h.max_pending_accept_reset_streams.as_ref()),
            20,
            10_000,
        );
        let local = n(
            self,
            "max_local_error_reset_streams",
            h.and_then(|h| h.max_local_error_reset_streams.as_ref()),
            128,
            10_000,
        );
        Http2Settings {
            max_concurrent_streams: u32::try_from(max_concurrent_streams).unwrap_or(128),
            keep_alive_interval: self.duration(
                src,
                "server.http2.keep_alive_interval",
                h.and_then(|h| h.keep_alive_interval.as_ref()),
                Duration::from_secs(30),
            ),
            keep_alive_timeout: self.duration(
                src,
                "server.http2.keep_alive_timeout",
                h.and_then(|h| h.keep_alive_timeout.as_ref()),
                Duration::from_secs(10),
            ),
            max_pending_accept_reset_streams: usize::try_from(pending).unwrap_or(20),
            max_local_error_reset_streams: usize::try_from(local).unwrap_or(128),
        }
    }

    fn includes(
        &mut self,
        src: &Source,
        list: &[String],
        routes: &mut Vec<Route>,
        declared: &mut Vec<Declared>,
        stack: &mut Vec<PathBuf>,
    ) {
        for (i, inc) in list.iter().enumerate() {
            let p = format!("include[{i}]");
            let full = src.dir.join(inc);
            if !full.is_file() {
                self.problems.at(src, &p, format!("included file `{inc}` not found (looked at {})", full.display()));
                continue;
            }
            let canon = full.canonicalize().unwrap_or_else(|_| full.clone());
            if stack.iter().any(|s| s.canonicalize().unwrap_or_else(|_| s.clone()) == canon) {
                self.problems.at(src, &p, format!("include cycle: `{inc}` includes itself"));
                continue;
            }
            if stack.len() >= MAX_INCLUDE_DEPTH {
                self.problems.at(src, &p, format!("includes nested deeper than {MAX_INCLUDE_DEPTH}"));
                continue;
            }
            let Some((isrc, file)) = parse_file::<RawRouteFile>(&full, &mut self.problems) else {
                continue;
            };
            self.routes(&isrc, file.routes, routes, declared);
            stack.push(full);
            self.includes(&isrc, &file.include, routes, declared, stack);
            stack.pop();
        }
    }

    fn routes(&mut self, src: &Source, raws: Vec<RawRoute>, routes: &mut Vec<Route>, declared: &mut Vec<Declared>) {
        for (i, r) in raws.into_iter().enumerate() {
            let p = format!("routes[{i}]");
            if let Some(route) = self.route(src, &p, r) {
                declared.push(Declared { file: src.path.clone(), pos: src.spans.value(&format!("{p}.name")) });
                routes.push(route);
            }
        }
    }

    fn route(&mut self, src: &Source, p: &str, r: RawRoute) -> Option<Route> {
        let before = self.problems.0.len();
        if r.name.is_empty() || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            self.problems.at(
                src,
                &format!("{p}.name"),
                format!("invalid route name `{}`: use letters, digits, `-`, `_`, `.`", r.name),
            );
        }
        let host = r.match_.host.as_deref().map(|h| self.host(src, &format!("{p}.match.host"), h));
        let path = r.match_.path.clone().unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.contains(['?', '#']) {
            self.problems.at(
                src,
                &format!("{p}.match.path"),
                format!("invalid path prefix `{path}`: must start with `/` and hold no query"),
            );
        }
        let methods = r.match_.methods.as_ref().map(|m| self.methods(src, &format!("{p}.match.methods"), m));
        // `https`: TLS listeners only; `http`: any.
        let https_only = self.keyword(
            src,
            &format!("{p}.match.scheme"),
            "scheme",
            r.match_.scheme.as_deref(),
            &[("http", false), ("https", true)],
            false,
        );

        let mut upstreams = Vec::new();
        let ups = r.upstream.as_slice();
        if ups.is_empty() {
            self.problems.at(src, &format!("{p}.upstream"), "route needs at least one upstream URL");
        }
        for (j, u) in ups.iter().enumerate() {
            let up = if matches!(r.upstream, OneOrMany::One(_)) {
                format!("{p}.upstream")
            } else {
                format!("{p}.upstream[{j}]")
            };
            if let Some(u) = self.upstream(src, &up, u) {
                upstreams.push(u);
            }
        }

        let t = r.timeouts.as_ref();
        let d = Timeouts::default();
        let timeouts = Timeouts {
            connect: self.duration(
                src,
                &format!("{p}.timeouts.connect"),
                t.and_then(|t| t.connect.as_ref()),
                d.connect,
            ),
            response: self.duration(
                src,
                &format!("{p}.timeouts.response"),
                t.and_then(|t| t.response.as_ref()),
                d.response,
            ),
            idle: self.duration(src, &format!("{p}.timeouts.idle"), t.and_then(|t| t.idle.as_ref()), d.idle),
        };
        let max_request_body =
            r.max_request_body.as_ref().map(|b| self.size(src, &format!("{p}.max_request_body"), Some(b), 0));
        let upstream_tls = self.upstream_tls(src, p, &r);
        let upstream_host_own = self.keyword(
            src,
            &format!("{p}.upstream_host"),
            "upstream_host",
            r.upstream_host.as_deref(),
            &[("client", false), ("upstream", true)],
            false,
        );
        let max_upstream_connections = usize::try_from(self.count(
            src,
            &format!("{p}.max_upstream_connections"),
            r.max_upstream_connections.as_ref(),
            1024,
            1,
            1 << 20,
        ))
        .unwrap_or(1024);

        let plugin = r.plugin.as_ref().map(|pl| {
            let pp = format!("{p}.plugin");
            let path = self.file_exists(src, &format!("{pp}.path"), &pl.path, "plugin file");
            let config =
                pl.config.as_ref().and_then(|c| serde_json::to_value(c).ok()).unwrap_or(serde_json::Value::Null);
            let timeout = self.duration(src, &format!("{pp}.timeout"), pl.timeout.as_ref(), Duration::from_millis(5));
            if timeout.is_zero() || timeout > crate::plugin::MAX_TIMEOUT {
                self.problems.at(
                    src,
                    &format!("{pp}.timeout"),
                    "plugin timeout must be between 1ms and 100ms (a call holds a runtime worker)",
                );
            }
            let max_memory = self.size(src, &format!("{pp}.max_memory"), pl.max_memory.as_ref(), 16 << 20);
            if !(1 << 20..=1 << 30).contains(&max_memory) {
                self.problems.at(src, &format!("{pp}.max_memory"), "plugin max_memory must be between 1MiB and 1GiB");
            }
            let max_body_bytes = self.size(src, &format!("{pp}.max_body_bytes"), pl.max_body_bytes.as_ref(), 64 << 10);
            // Loading compiles the component (cached by content), checks its imports and exports
            // and runs `init` with the config: `weir validate` and a reload catch a broken plugin.
            let loaded = if path.is_file() {
                match crate::plugin::load(&path, &config, timeout, max_memory) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        self.problems.at(src, &format!("{pp}.path"), format!("plugin `{}` {e}", pl.path));
                        None
                    }
                }
            } else {
                None
            };
            PluginRef { path, config, timeout, max_memory, max_body_bytes, loaded }
        });

        let cache = r.cache.as_ref().map(|c| std::sync::Arc::new(self.route_cache(src, &format!("{p}.cache"), c)));

        let invalidate = r.invalidate.as_ref().map(|inv| {
            let ip = format!("{p}.invalidate");
            let list = inv.methods.clone().unwrap_or_else(|| ["POST", "PUT", "PATCH", "DELETE"].map(String::from).to_vec());
            let im = self.methods(src, &format!("{ip}.methods"), &list);
            if let (Some(allowed), Some(_)) = (&methods, &inv.methods) {
                for (k, m) in im.iter().enumerate() {
                    if !allowed.contains(m) {
                        self.problems.at(
                            src,
                            &format!("{ip}.methods[{k}]"),
                            format!("invalidate method `{m}` is not in this route's `match.methods`, so it can never reach the route"),
                        );
                    }
                }
            }
            Invalidate { methods: im, tags: inv.tags.clone() }
        });

        let consumer = r.consumer.as_ref().and_then(|c| {
            let cp = format!("{p}.consumer");
            let source = match c.from.strip_prefix("header:").map(|h| HeaderName::from_bytes(h.trim().as_bytes())) {
                Some(Ok(header)) => ConsumerSource::Header(header),
                _ if c.from == "plugin" => {
                    if plugin.is_none() {
                        self.problems.at(
                            src,
                            &format!("{cp}.from"),
                            "`from: plugin` needs the route's `plugin:` (its `identify` hook finds the consumer)",
                        );
                    }
                    if c.hide_credentials == Some(true) {
                        self.problems.at(
                            src,
                            &format!("{cp}.hide_credentials"),
                            "hide_credentials needs `from: header:NAME` (a plugin's credential has no one header)",
                        );
                    }
                    ConsumerSource::Plugin
                }
                _ if c.from == "client_cert" => {
                    if c.hide_credentials == Some(true) {
                        self.problems.at(
                            src,
                            &format!("{cp}.hide_credentials"),
                            "hide_credentials needs `from: header:NAME` (a client certificate is not a header)",
                        );
                    }
                    ConsumerSource::ClientCert
                }
                _ => {
                    self.problems.at(
                        src,
                        &format!("{cp}.from"),
                        format!(
                            "invalid consumer source `{}`: expected `header:NAME`, `plugin` or `client_cert`",
                            c.from
                        ),
                    );
                    return None;
                }
            };
            Some(ConsumerFrom {
                source,
                required: c.required.unwrap_or(false),
                hide_credentials: c.hide_credentials.unwrap_or(false),
            })
        });
        let rate_limit = match &r.rate_limit {
            None => Vec::new(),
            Some(RawRateLimits::One(rl)) => {
                self.rate_limit(src, &format!("{p}.rate_limit"), rl, "default").into_iter().collect()
            }
            Some(RawRateLimits::Many(list)) => {
                let mut out: Vec<RateLimit> = Vec::new();
                for (i, rl) in list.iter().enumerate() {
                    let rp = format!("{p}.rate_limit[{i}]");
                    if rl.name.is_none() {
                        self.problems.at(src, &rp, "each policy of a rate_limit list needs a `name`");
                    }
                    if let Some(l) = self.rate_limit(src, &rp, rl, &format!("policy-{i}")) {
                        if out.iter().any(|o| o.name == l.name) {
                            self.problems.at(
                                src,
                                &format!("{rp}.name"),
                                format!("duplicate rate_limit policy name `{}`", l.name),
                            );
                        }
                        out.push(l);
                    }
                }
                out
            }
        };

        let (rate_limit_misses, rate_limit): (Vec<RateLimit>, Vec<RateLimit>) =
            rate_limit.into_iter().partition(|l| l.misses);
        if consumer.is_none() && rate_limit.iter().chain(&rate_limit_misses).any(|l| l.key == LimitKey::Consumer) {
            self.problems.at(
                src,
                &format!("{p}.rate_limit"),
                "a rate limit keyed by `consumer` needs the route's `consumer: {from: header:NAME | plugin | client_cert}`",
            );
        }
        // A bucket per value of a header nobody verified: a client that rotates the value gets
        // a fresh quota every time.
        if !consumer.as_ref().is_some_and(|c| c.required)
            && rate_limit.iter().chain(&rate_limit_misses).any(|l| matches!(l.key, LimitKey::Header(_)))
        {
            self.warnings.push(Problem {
                file: src.path.clone(),
                pos: src.spans.value(&format!("{p}.rate_limit")),
                message: "a rate limit keyed by `header:NAME` on a route without `consumer: {..., required: true}`: a client that changes the header's value gets a fresh quota each time; key by `consumer` (with a required consumer) or `client_ip`".to_string(),
            });
        }
        // `key: plugin` is `consumer` where the plugin finds the consumer.
        let raw_limits: Vec<(String, &RawRateLimit)> = match &r.rate_limit {
            None => Vec::new(),
            Some(RawRateLimits::One(rl)) => vec![(format!("{p}.rate_limit"), rl)],
            Some(RawRateLimits::Many(list)) => {
                list.iter().enumerate().map(|(i, rl)| (format!("{p}.rate_limit[{i}]"), rl)).collect()
            }
        };
        for (rp, rl) in raw_limits {
            let from_plugin = consumer.as_ref().is_some_and(|c| c.source == ConsumerSource::Plugin);
            if rl.key.as_deref() == Some("plugin") && !from_plugin {
                self.problems.at(
                    src,
                    &format!("{rp}.key"),
                    "a rate limit keyed by `plugin` needs the route's `consumer: {from: plugin}`",
                );
            }
        }
        let budget = r.budget.as_ref().and_then(|b| self.route_budget(src, p, b, consumer.as_ref(), plugin.is_some()));
        let shared = r.cache.as_ref().and_then(|c| c.shared_across_consumers).unwrap_or(false);
        let cache = cache.map(|c| {
            let mut c = std::sync::Arc::unwrap_or_clone(c);
            c.by_consumer = consumer.is_some() && !shared;
            std::sync::Arc::new(c)
        });

        // `None` only with a problem recorded.
        let upstream_tls = upstream_tls?;
        (self.problems.0.len() == before).then(|| Route {
            name: r.name,
            host: host.flatten(),
            path,
            methods,
            https_only,
            upstreams,
            timeouts,
            max_request_body,
            max_upstream_connections,
            upstream_tls,
            upstream_host_own,
            plugin,
            cache,
            invalidate,
            consumer,
            rate_limit,
            rate_limit_misses,
            budget,
        })
    }

    /// `server.auth_failures` (default 60 a minute, bursts of 100).
    fn auth_failures(&mut self, src: &Source, a: Option<&RawAuthFailures>) -> crate::limit::gcra::Gcra {
        let default = crate::limit::gcra::Gcra::new(60, Duration::from_secs(60), 100);
        let Some(a) = a else { return default.unwrap_or(crate::limit::gcra::Gcra { interval_us: 1, tolerance_us: 0 }) };
        let rate = parse_rate(&a.rate.text).unwrap_or_else(|e| {
            self.problems.at(src, "server.auth_failures.rate", e);
            super::values::Rate { count: 60, per: Duration::from_secs(60) }
        });
        let burst = self.count(src, "server.auth_failures.burst", a.burst.as_ref(), rate.count, 1, 1_000_000);
        match crate::limit::gcra::Gcra::new(rate.count, rate.per, burst) {
            Some(g) => g,
            None => {
                self.problems.at(src, "server.auth_failures", "a rate Weir cannot keep exactly");
                default.unwrap_or(crate::limit::gcra::Gcra { interval_us: 1, tolerance_us: 0 })
            }
        }
    }

    /// `honor` (true) or `ignore` (false).
    fn client_no_cache(&mut self, src: &Source, path: &str, v: Option<&str>, default: bool) -> bool {
        match v {
            None => default,
            Some("honor") => true,
            Some("ignore") => false,
            Some(other) => {
                self.problems.at(src, path, format!("invalid client_no_cache `{other}`: expected `honor` or `ignore`"));
                default
            }
        }
    }

    fn targeted_fields(&mut self, src: &Source, list: Option<&Vec<String>>) -> std::sync::Arc<[HeaderName]> {
        let Some(list) = list else { return default_targeted_fields() };
        let mut names = Vec::new();
        for (i, f) in list.iter().enumerate() {
            match HeaderName::from_bytes(f.trim().as_bytes()) {
                Ok(n) if n != http::header::CACHE_CONTROL => names.push(n),
                _ => self.problems.at(
                    src,
                    &format!("cache.targeted_fields[{i}]"),
                    format!("invalid targeted field `{f}`: expected a header name such as `cdn-cache-control` (not `cache-control` itself)"),
                ),
            }
        }
        names.into()
    }

    fn route_cache(&mut self, src: &Source, cp: &str, c: &RawRouteCache) -> RouteCache {
        let origin_headers = match c.origin_headers.as_deref() {
            None | Some("respect") => OriginHeaders::Respect,
            Some("override") => OriginHeaders::Override,
            Some(o) => {
                self.problems.at(
                    src,
                    &format!("{cp}.origin_headers"),
                    format!("invalid origin_headers `{o}`: expected `respect` or `override`"),
                );
                OriginHeaders::Respect
            }
        };
        let ttl = self.opt_duration(src, &format!("{cp}.ttl"), c.ttl.as_ref());
        if origin_headers == OriginHeaders::Override && ttl.is_none() {
            self.problems.at(src, &format!("{cp}.origin_headers"), "origin_headers: override needs a `ttl`");
        }
        let mut methods = vec![Method::GET, Method::HEAD];
        if let Some(list) = &c.methods {
            for m in self.methods(src, &format!("{cp}.methods"), list) {
                if m == Method::POST {
                    methods.push(m);
                } else if m != Method::GET && m != Method::HEAD {
                    self.problems.at(
                        src,
                        &format!("{cp}.methods"),
                        format!("method `{m}` cannot be cached: only GET, HEAD and POST"),
                    );
                }
            }
        }
        RouteCache {
            ttl,
            origin_headers,
            stale_while_revalidate: self.opt_duration(
                src,
                &format!("{cp}.stale_while_revalidate"),
                c.stale_while_revalidate.as_ref(),
            ),
            stale_if_error: self.opt_duration(src, &format!("{cp}.stale_if_error"), c.stale_if_error.as_ref()),
            share_private: c.share_private.unwrap_or(false),
            // Set by the route once its consumer is known.
            by_consumer: false,
            client_no_cache: self.client_no_cache(
                src,
                &format!("{cp}.client_no_cache"),
                c.client_no_cache.as_deref(),
                self.client_no_cache,
            ),
            methods,
            max_key_body_bytes: self.size(
                src,
                &format!("{cp}.max_key_body_bytes"),
                c.max_key_body_bytes.as_ref(),
                64 << 10,
            ),
            targeted_fields: self.targeted_fields.clone(),
        }
    }

    fn rate_limit(&mut self, src: &Source, rp: &str, rl: &RawRateLimit, default_name: &str) -> Option<RateLimit> {
        let before = self.problems.0.len();
        let name = rl.name.clone().unwrap_or_else(|| default_name.to_string());
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            self.problems.at(
                src,
                &format!("{rp}.name"),
                format!("invalid policy name `{name}`: 1-64 of A-Z a-z 0-9 - _"),
            );
        }
        let rate = parse_rate(&rl.rate.text).unwrap_or_else(|e| {
            self.problems.at(src, &format!("{rp}.rate"), e);
            super::values::Rate { count: 1, per: Duration::from_secs(1) }
        });
        let algorithm = match rl.algorithm.as_deref() {
            None | Some("gcra") => Algorithm::Gcra,
            Some("fixed_window") => Algorithm::FixedWindow,
            Some(other) => {
                self.problems.at(
                    src,
                    &format!("{rp}.algorithm"),
                    format!("unknown algorithm `{other}`: expected `gcra` or `fixed_window`"),
                );
                Algorithm::Gcra
            }
        };
        let burst = match &rl.burst {
            None => rate.count,
            Some(b) => match b.text.parse::<u64>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    self.problems.at(
                        src,
                        &format!("{rp}.burst"),
                        format!("invalid burst `{}`: expected a whole number of at least 1", b.text),
                    );
                    1
                }
            },
        };
        if algorithm == Algorithm::FixedWindow && rl.burst.is_some() {
            self.problems.at(src, &format!("{rp}.burst"), "a fixed window has no burst: its quota is the rate's count");
        }
        let gcra = crate::limit::gcra::Gcra::new(rate.count, rate.per, burst);
        if gcra.is_none() {
            self.problems.at(
                src,
                &format!("{rp}.rate"),
                format!("rate `{}` cannot be kept exactly: one request per 1 µs to 285 years", rl.rate.text),
            );
        }
        let key = match rl.key.as_deref() {
            None | Some("client_ip") => LimitKey::ClientIp,
            Some("route") => LimitKey::Route,
            // `plugin`: the consumer the route plugin's `identify` found (checked by the route).
            Some("consumer" | "plugin") => LimitKey::Consumer,
            Some(k) => {
                match k.strip_prefix("header:").map(|h| HeaderName::from_bytes(h.trim().as_bytes())) {
                    Some(Ok(h)) => LimitKey::Header(h),
                    _ => {
                        self.problems.at(
                        src,
                        &format!("{rp}.key"),
                        format!("invalid key `{k}`: expected `client_ip`, `header:NAME`, `route`, `consumer` or `plugin`"),
                    );
                        LimitKey::Route
                    }
                }
            }
        };
        let misses = match rl.count.as_deref() {
            None | Some("all") => false,
            Some("misses") => true,
            Some(other) => {
                self.problems.at(
                    src,
                    &format!("{rp}.count"),
                    format!("invalid count `{other}`: expected `all` or `misses`"),
                );
                false
            }
        };
        let fail = match rl.fail.as_deref() {
            None | Some("local") => LimitFail::Local,
            Some("open") => LimitFail::Open,
            Some("closed") => LimitFail::Closed,
            Some(other) => {
                self.problems.at(
                    src,
                    &format!("{rp}.fail"),
                    format!("invalid fail mode `{other}`: expected `local`, `open` or `closed`"),
                );
                LimitFail::Local
            }
        };
        let gcra = gcra?;
        (self.problems.0.len() == before).then_some(RateLimit {
            name,
            key,
            rate,
            burst,
            algorithm,
            gcra,
            fail,
            headers: rl.headers.unwrap_or(true),
            misses,
        })
    }

    fn host(&mut self, src: &Source, path: &str, h: &str) -> Option<HostMatch> {
        let lower = h.trim_end_matches('.').to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower.clone()),
        };
        let valid = !name.is_empty()
            && name
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !valid {
            self.problems.at(
                src,
                path,
                format!(
                    "invalid host `{h}`: expected a DNS name such as `api.example.com` or `*.example.com` (no port)"
                ),
            );
            return None;
        }
        Some(if wild { HostMatch::Suffix(format!(".{name}")) } else { HostMatch::Exact(name) })
    }

    fn upstream(&mut self, src: &Source, path: &str, u: &str) -> Option<UpstreamUrl> {
        let bad = |why: &str| format!("invalid upstream URL `{u}`: {why}");
        let url = match url::Url::parse(u) {
            Ok(url) => url,
            Err(e) => {
                self.problems.at(src, path, bad(&e.to_string()));
                return None;
            }
        };
        let scheme = match url.scheme() {
            "http" => Scheme::HTTP,
            "https" => Scheme::HTTPS,
            s => {
                self.problems.at(src, path, bad(&format!("scheme `{s}` is not http or https")));
                return None;
            }
        };
        let Some(host) = url.host_str() else {
            self.problems.at(src, path, bad("no host"));
            return None;
        };
        if !(url.path().is_empty() || url.path() == "/")
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
        {
            self.problems.at(
                src,
                path,
                bad("only scheme, host and port are allowed (the request path is forwarded as is)"),
            );
            return None;
        }
        let port = url.port_or_known_default().unwrap_or(80);
        match Authority::try_from(format!("{host}:{port}").as_str()) {
            Ok(authority) => Some(UpstreamUrl { scheme, authority }),
            Err(e) => {
                self.problems.at(src, path, bad(&e.to_string()));
                None
            }
        }
    }

    fn cross_route_checks(&mut self, routes: &[Route], declared: &[Declared]) {
        // A path a route claims with a `methods` list is never answered by a wider route (a
        // catch-all) for other methods: they get 405 from the route. Say so where that differs
        // from routers that fall through.
        let table = routes.iter().map(|r| (r.host.clone(), r.path.clone(), r.methods.clone())).collect();
        for (a, b) in crate::router::Router::from_table(table).shadowed_catch_alls() {
            let methods: Vec<&str> = routes[a].methods.iter().flatten().map(Method::as_str).collect();
            self.warnings.push(Problem {
                file: declared[a].file.clone(),
                pos: declared[a].pos,
                message: format!(
                    "route `{}` allows only {}: other methods on its paths get 405, not route `{}` (list them, or give them a route of the same path)",
                    routes[a].name,
                    methods.join(", "),
                    routes[b].name
                ),
            });
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            if let Some(&first) = names.get(r.name.as_str()) {
                let d = &declared[first];
                self.problems.at_pos(
                    &declared[i].file,
                    declared[i].pos,
                    format!(
                        "duplicate route name `{}` (first defined at {}:{}:{})",
                        r.name,
                        d.file.display(),
                        d.pos.line,
                        d.pos.col
                    ),
                );
            } else {
                names.insert(&r.name, i);
            }
            // A later route whose match is covered by an earlier identical one can never be selected.
            if let Some(j) = routes[..i].iter().position(|e| {
                e.host == r.host
                    && e.path == r.path
                    && match (&e.methods, &r.methods) {
                        (None, _) => true,
                        (Some(_), None) => false,
                        (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
                    }
            }) {
                self.problems.at_pos(
                    &declared[i].file,
                    declared[i].pos,
                    format!(
                        "route `{}` is unreachable: route `{}` has the same match and is tried first",
                        r.name, routes[j].name
                    ),
                );
            }
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
