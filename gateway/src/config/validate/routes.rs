//! `routes:` (and `include:`d route files): match, upstreams, plugin, consumer, and the checks across routes.

use super::*;

impl Validator {
    pub(super) fn includes(
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

    pub(super) fn routes(
        &mut self,
        src: &Source,
        raws: Vec<RawRoute>,
        routes: &mut Vec<Route>,
        declared: &mut Vec<Declared>,
    ) {
        for (i, r) in raws.into_iter().enumerate() {
            let p = format!("routes[{i}]");
            let at = Declared { file: src.path.clone(), pos: src.spans.value(&format!("{p}.name")) };
            // Every name, valid route or not: a duplicate is reported with the field errors.
            self.route_names.push((r.name.clone(), at.clone()));
            if let Some(route) = self.route(src, &p, r) {
                declared.push(at);
                routes.push(route);
            }
        }
    }

    pub(super) fn route(&mut self, src: &Source, p: &str, r: RawRoute) -> Option<Route> {
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
        let max_upstream_connections = self.count_usize(
            src,
            &format!("{p}.max_upstream_connections"),
            r.max_upstream_connections.as_ref(),
            1024,
            1 << 20,
        );

        let mut forward_headers = crate::cache::policy::ForwardHeaders::default();
        for (i, h) in r.forward_headers.iter().enumerate() {
            let lower = h.to_ascii_lowercase();
            let (name, prefix) = match lower.strip_suffix('*') {
                Some(pre) => (pre, true),
                None => (lower.as_str(), false),
            };
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(_) if prefix => forward_headers.prefixes.push(name.to_string()),
                Ok(n) => forward_headers.names.push(n),
                Err(_) => self.problems.at(
                    src,
                    &format!("{p}.forward_headers[{i}]"),
                    format!("`{h}` is not a header name (or `PREFIX*`)"),
                ),
            }
        }
        if !r.forward_headers.is_empty() && r.cache.is_none() {
            self.warnings.push(Problem {
                file: src.path.clone(),
                pos: src.spans.value(&format!("{p}.forward_headers")),
                message: "`forward_headers` has no effect on a route without `cache`: it forwards every header"
                    .to_string(),
            });
        }

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
            forward_headers,
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

    pub(super) fn host(&mut self, src: &Source, path: &str, h: &str) -> Option<HostMatch> {
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

    pub(super) fn upstream(&mut self, src: &Source, path: &str, u: &str) -> Option<UpstreamUrl> {
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

    pub(super) fn cross_route_checks(&mut self, routes: &[Route], declared: &[Declared]) {
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
        for (i, (name, at)) in self.route_names.iter().enumerate() {
            match names.get(name.as_str()) {
                Some(&first) => {
                    let d = &self.route_names[first].1;
                    self.problems.0.push(Problem {
                        file: at.file.clone(),
                        pos: at.pos,
                        message: format!(
                            "duplicate route name `{name}` (first defined at {}:{}:{})",
                            d.file.display(),
                            d.pos.line,
                            d.pos.col
                        ),
                    });
                }
                None => {
                    names.insert(name, i);
                }
            }
        }
        for (i, r) in routes.iter().enumerate() {
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
