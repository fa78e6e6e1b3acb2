//! What a rate-limit policy says (`rate_limit:` on a route, `consumers[].limits`), as `config`
//! builds it from YAML.

use std::time::Duration;

use http::HeaderName;

/// A consumer's own rate for the policies of one name.
#[derive(Debug, Clone)]
pub struct LimitOverride {
    pub policy: String,
    pub rate: Rate,
    pub burst: u64,
    pub gcra: super::gcra::Gcra,
}

/// What a rate-limit policy counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client's address (`X-Forwarded-For` only through trusted proxies; IPv6 by /64).
    ClientIp,
    /// A request header's value (a request without it is counted by its client address).
    Header(HeaderName),
    /// One bucket for the whole route.
    Route,
    /// The identified consumer (a request without one is counted by its client address).
    Consumer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Gcra,
    /// Calendar-aligned windows (UTC epoch multiples of the period): quotas like 10000/1d.
    FixedWindow,
}

/// What a limit does while Redis is away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitFail {
    /// The local limiter, at `rate / redis.instances`.
    Local,
    Open,
    Closed,
}

#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Shown in `RateLimit-Policy`; `[A-Za-z0-9_-]`, unique per route.
    pub name: String,
    pub key: LimitKey,
    pub rate: Rate,
    pub burst: u64,
    pub algorithm: Algorithm,
    pub gcra: super::gcra::Gcra,
    pub fail: LimitFail,
    /// `RateLimit` / `RateLimit-Policy` on allowed responses too (always on a 429).
    pub headers: bool,
    /// `count: misses`: only requests that reach the origin are counted.
    pub misses: bool,
}

/// A rate: `100/s`, `6000/m`, `10/30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}
