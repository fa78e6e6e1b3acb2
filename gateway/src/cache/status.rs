//! The cache outcome of a request: one enum, one renderer for `Cache-Status` (RFC 9211), one
//! label for metrics.

use http::HeaderValue;

use super::policy::NotStored;

/// Which tier served a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    L1,
    L2,
}

/// Why the cache did not take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BypassReason {
    Method,
    Cookie,
    Authorization,
    /// A method-override header (`X-HTTP-Method-Override` and kin): the answer may be another
    /// method's, so it is neither read from nor written to the cache.
    MethodOverride,
    /// A GET or HEAD with a body.
    Body,
    /// A cached POST whose body is over `max_key_body_bytes`.
    BodyTooLarge,
}

impl BypassReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BypassReason::Method => "method",
            BypassReason::Cookie => "cookie",
            BypassReason::Authorization => "authorization",
            BypassReason::MethodOverride => "method-override",
            BypassReason::Body => "body",
            BypassReason::BodyTooLarge => "body-too-large",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Fresh hit.
    Hit { level: Level },
    /// The route's plugin kept the cache out of this request, for `reason`.
    PluginBypass { reason: String },
    /// Stale hit served without contacting the origin (stale-while-revalidate, max-stale).
    StaleHit { ttl: i64 },
    /// Not found (`vary` when only the Vary variant was missing); `stored` or why not.
    Miss { vary: bool, stored: Result<(), NotStored> },
    /// Served the response another request for the same key fetched.
    Collapsed,
    /// The request's own directives (no-cache, max-age) made the cache go forward.
    Request { stored: Result<(), NotStored> },
    /// A stale entry was revalidated or refetched; `fwd_status` is the origin's answer.
    Revalidated { fwd_status: u16, stored: Result<(), NotStored> },
    /// The origin failed and a stale entry was served (stale-if-error).
    StaleIfError { fwd_status: u16, ttl: i64 },
    /// The cache did not take part; `stored` when a response was nonetheless stored.
    Bypass { reason: BypassReason, stored: bool },
    /// `only-if-cached` and nothing usable was stored.
    NotCached,
}

fn stored_param(s: &Result<(), NotStored>) -> String {
    match s {
        Ok(()) => "; stored".to_string(),
        Err(r) => format!("; detail={}", r.as_str()),
    }
}

impl Outcome {
    /// The `Cache-Status` field value, cache name `weir`.
    pub fn header_value(&self) -> HeaderValue {
        let s = match self {
            Outcome::Hit { level: Level::L1 } => return HeaderValue::from_static("weir; hit; detail=l1"),
            Outcome::Hit { level: Level::L2 } => return HeaderValue::from_static("weir; hit; detail=l2"),
            Outcome::Collapsed => return HeaderValue::from_static("weir; fwd=miss; collapsed"),
            // The usual misses are shared values too: a fill does not format its status.
            Outcome::Miss { vary: false, stored: Ok(()) } => return HeaderValue::from_static("weir; fwd=miss; stored"),
            Outcome::Miss { vary: true, stored: Ok(()) } => {
                return HeaderValue::from_static("weir; fwd=vary-miss; stored")
            }
            Outcome::Request { stored: Ok(()) } => return HeaderValue::from_static("weir; fwd=request; stored"),
            Outcome::StaleHit { ttl } => format!("weir; hit; ttl={ttl}"),
            Outcome::Miss { vary, stored } => {
                format!("weir; fwd={}{}", if *vary { "vary-miss" } else { "miss" }, stored_param(stored))
            }
            Outcome::Request { stored } => format!("weir; fwd=request{}", stored_param(stored)),
            Outcome::Revalidated { fwd_status, stored } => {
                format!("weir; fwd=stale; fwd-status={fwd_status}{}", stored_param(stored))
            }
            Outcome::StaleIfError { fwd_status, ttl } => {
                format!("weir; fwd=stale; fwd-status={fwd_status}; ttl={ttl}; detail=stale-if-error")
            }
            Outcome::Bypass { reason, stored } => {
                format!("weir; fwd=bypass; detail={}{}", reason.as_str(), if *stored { "; stored" } else { "" })
            }
            Outcome::NotCached => return HeaderValue::from_static("weir; fwd=miss; detail=only-if-cached"),
            Outcome::PluginBypass { reason } => {
                // RFC 9211 `detail` as an sf-string: printable ASCII, `"` and `\` escaped.
                let clean: String = reason
                    .chars()
                    .filter(|c| c.is_ascii_graphic() || *c == ' ')
                    .flat_map(|c| if c == '"' || c == '\\' { vec!['\\', c] } else { vec![c] })
                    .collect();
                format!("weir; fwd=bypass; detail=\"plugin: {clean}\"")
            }
        };
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("weir"))
    }

    /// The metrics label: `hit`, `stale`, `miss`, `collapsed`, `revalidated`, `bypass`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Hit { .. } => "hit",
            Outcome::StaleHit { .. } | Outcome::StaleIfError { .. } => "stale",
            Outcome::Miss { .. } | Outcome::Request { .. } | Outcome::NotCached => "miss",
            Outcome::Collapsed => "collapsed",
            Outcome::Revalidated { .. } => "revalidated",
            Outcome::Bypass { .. } | Outcome::PluginBypass { .. } => "bypass",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_examples() {
        assert_eq!(Outcome::Hit { level: Level::L1 }.header_value(), "weir; hit; detail=l1");
        assert_eq!(Outcome::Hit { level: Level::L2 }.header_value(), "weir; hit; detail=l2");
        assert_eq!(Outcome::Miss { vary: false, stored: Ok(()) }.header_value(), "weir; fwd=miss; stored");
        assert_eq!(Outcome::Miss { vary: true, stored: Ok(()) }.header_value(), "weir; fwd=vary-miss; stored");
        assert_eq!(Outcome::Request { stored: Ok(()) }.header_value(), "weir; fwd=request; stored");
        assert_eq!(
            Outcome::Request { stored: Err(NotStored::NoStore) }.header_value(),
            format!("weir; fwd=request; detail={}", NotStored::NoStore.as_str()).as_str()
        );
        assert_eq!(Outcome::Collapsed.header_value(), "weir; fwd=miss; collapsed");
        assert_eq!(Outcome::StaleHit { ttl: -3 }.header_value(), "weir; hit; ttl=-3");
        assert_eq!(
            Outcome::Bypass { reason: BypassReason::Method, stored: false }.header_value(),
            "weir; fwd=bypass; detail=method"
        );
        assert_eq!(
            Outcome::Miss { vary: false, stored: Err(NotStored::NoStore) }.header_value(),
            "weir; fwd=miss; detail=no-store"
        );
    }
}
