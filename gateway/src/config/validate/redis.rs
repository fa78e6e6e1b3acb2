//! `redis:`: the shared tier's servers, secrets, timeouts and breaker.

use super::*;

impl Validator {
    pub(super) fn redis(&mut self, src: &Source, r: &RawRedis) -> RedisSettings {
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
            // The longest wait between probes (they start at twice op_timeout): by default 20
            // op timeouts (1 s at 50 ms), between 250 ms and 5 s.
            open_for: self.duration(
                src,
                "redis.breaker.open_for",
                b.and_then(|b| b.open_for.as_ref()),
                (op_timeout * 20).clamp(Duration::from_millis(250), Duration::from_secs(5)),
            ),
        };
        if breaker.failures == 0 {
            self.problems.at(src, "redis.breaker.failures", "failures must be at least 1");
        }
        if breaker.window.is_zero() || breaker.open_for.is_zero() {
            self.problems.at(src, "redis.breaker", "breaker window and open_for must be positive durations");
        }
        RedisSettings {
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
            fill_lock: r.fill_lock.unwrap_or(true),
        }
    }
}
