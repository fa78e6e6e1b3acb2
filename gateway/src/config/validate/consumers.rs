//! `consumers:`: API-key digests and consumers' own rate limits.

use super::*;

impl Validator {
    pub(super) fn consumer_limits(&mut self, src: &Source, raw: &[RawConsumer]) -> HashMap<String, Vec<LimitOverride>> {
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
    pub(super) fn consumers(&mut self, src: &Source, raw: &[RawConsumer]) -> HashMap<[u8; 32], String> {
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
                    _ => self.missing_secret(
                        src,
                        &format!("{cp}.key_env"),
                        format!("consumer key variable `{var}` is not set"),
                    ),
                }
            }
            // One mistake, one message: a key that is given but unset or malformed was reported.
            if c.keys_sha256.is_empty() && c.key_env.is_none() {
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
}
