//! A route's `rate_limit:` policies.

use super::*;

impl Validator {
    pub(super) fn rate_limit(
        &mut self,
        src: &Source,
        rp: &str,
        rl: &RawRateLimit,
        default_name: &str,
    ) -> Option<RateLimit> {
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
            crate::limit::Rate { count: 1, per: Duration::from_secs(1) }
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
}
