//! `server:`, `log:`, `tracing:` and `debug:`.

use super::*;

impl Validator {
    pub(super) fn log(&mut self, src: &Source, l: Option<&RawLog>) -> crate::observe::LogSettings {
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
            out.buffer = self.count_usize(src, "log.access.buffer", a.buffer.as_ref(), 16_384, 10_000_000);
        }
        out
    }

    pub(super) fn tracing(&mut self, src: &Source, t: &RawTracing) -> Option<crate::observe::TraceSettings> {
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

    pub(super) fn debug(
        &mut self,
        src: &Source,
        d: Option<&RawDebug>,
        admin: Option<&RawAdmin>,
    ) -> Option<std::sync::Arc<crate::config::values::Token>> {
        let d = d?;
        if admin.and_then(|a| a.token_env.as_deref()) == Some(d.token_env.as_str()) && !d.token_env.is_empty() {
            self.problems.at(src, "debug.token_env", "debug.token_env must name its own secret, not the admin token's: the admin token must never travel on the data plane");
            return None;
        }
        match std::env::var(&d.token_env) {
            Ok(t) if t.len() >= 16 => Some(std::sync::Arc::new(crate::config::values::Token::new(&t))),
            Ok(t) if !t.is_empty() => {
                self.problems.at(
                    src,
                    "debug.token_env",
                    format!("the debug token in `{}` is {} bytes: use at least 16", d.token_env, t.len()),
                );
                None
            }
            _ => {
                self.missing_secret(
                    src,
                    "debug.token_env",
                    format!("debug token variable `{}` is not set", d.token_env),
                );
                None
            }
        }
    }

    pub(super) fn server(&mut self, src: &Source, s: Option<&RawServer>) -> ServerSettings {
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
            max_connections: self.count_usize(
                src,
                "server.max_connections",
                s.and_then(|s| s.max_connections.as_ref()),
                10_000,
                1 << 20,
            ),
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
            max_tunnels: self.count_usize(
                src,
                "server.max_tunnels",
                s.and_then(|s| s.max_tunnels.as_ref()),
                1000,
                1_000_000,
            ),
            max_tunnels_per_address: self.count_usize(
                src,
                "server.max_tunnels_per_address",
                s.and_then(|s| s.max_tunnels_per_address.as_ref()),
                32,
                1_000_000,
            ),
            http2: self.http2(src, s.and_then(|s| s.http2.as_ref())),
        }
    }

    pub(super) fn http2(&mut self, src: &Source, h: Option<&RawHttp2>) -> Http2Settings {
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

    /// `server.auth_failures` (default 60 a minute, bursts of 100).
    pub(super) fn auth_failures(&mut self, src: &Source, a: Option<&RawAuthFailures>) -> crate::limit::gcra::Gcra {
        let default = crate::limit::gcra::Gcra::new(60, Duration::from_secs(60), 100);
        let Some(a) = a else { return default.unwrap_or(crate::limit::gcra::Gcra { interval_us: 1, tolerance_us: 0 }) };
        let rate = parse_rate(&a.rate.text).unwrap_or_else(|e| {
            self.problems.at(src, "server.auth_failures.rate", e);
            crate::limit::Rate { count: 60, per: Duration::from_secs(60) }
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
}
