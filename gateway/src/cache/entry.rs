//! What the cache stores: a complete response with its freshness bookkeeping (RFC 9111 §4.2),
//! and the `Vary` marker that sends a lookup on to the variant's secondary key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// A stored response. Immutable once stored; a 304 revalidation stores a new `Entry`.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The full cache key (primary + secondary), compared on read by tiers that hash keys.
    pub key: String,
    pub status: StatusCode,
    /// End-to-end headers as received, minus `Set-Cookie`, `Age` and `Cache-Status`.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the response was received (the `response_time` of RFC 9111 §4.2.3).
    pub stored_at: SystemTime,
    /// Age the response already had when it arrived (`Age` header, apparent age).
    pub initial_age: Duration,
    pub fresh_for: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// `no-cache`: stored, but every use needs a successful revalidation first.
    pub revalidate_always: bool,
    /// must-revalidate, proxy-revalidate, s-maxage or no-cache (respect mode): never served stale.
    pub stale_forbidden: bool,
    pub tags: Vec<String>,
    /// Normalised `path?query` the entry answers, for purge by URL and by prefix.
    pub path: String,
    /// Request header names the response varies on (lower-case, sorted); empty: no `Vary`.
    pub vary: Arc<[HeaderName]>,
}

impl Entry {
    /// Current age (§4.2.3): initial age plus resident time.
    pub fn age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.stored_at).unwrap_or_default()
    }

    /// Seconds of freshness left; negative once stale (`Cache-Status: ttl=`).
    pub fn ttl_secs(&self, now: SystemTime) -> i64 {
        let left_ms = i128::try_from(self.fresh_for.as_millis()).unwrap_or(i128::MAX)
            - i128::try_from(self.age(now).as_millis()).unwrap_or(i128::MAX);
        i64::try_from(left_ms.div_euclid(1000)).unwrap_or(i64::MIN)
    }

    pub fn is_fresh(&self, now: SystemTime) -> bool {
        !self.revalidate_always && self.age(now) < self.fresh_for
    }

    /// How far past its freshness the entry is (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.age(now).saturating_sub(self.fresh_for)
    }

    pub fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(http::header::ETAG)
    }

    pub fn last_modified(&self) -> Option<&HeaderValue> {
        self.headers.get(http::header::LAST_MODIFIED)
    }

    pub fn has_validators(&self) -> bool {
        self.etag().is_some() || self.last_modified().is_some()
    }

    /// How long a store keeps the entry: freshness, then the longest of the stale windows and a
    /// "keep" time (its freshness, 10 s to 1 h) in which it can still be revalidated or served
    /// to a client that asks for `max-stale`.
    pub fn retain_for(&self) -> Duration {
        let stale = self.stale_while_revalidate.max(self.stale_if_error);
        let keep = self.fresh_for.clamp(Duration::from_secs(10), Duration::from_secs(3600));
        (self.fresh_for + stale.max(keep)).saturating_sub(self.initial_age.min(self.fresh_for))
    }

    /// Approximate bytes held: what the L1 byte bound weighs.
    pub fn weight(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + 16).sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + 24).sum();
        self.key.len() + self.path.len() + headers + tags + self.body.len() + 160
    }
}

/// A cache object under a key: a response, or the note that responses here vary on headers.
#[derive(Debug, Clone)]
pub enum Object {
    Response(Arc<Entry>),
    Vary { headers: Arc<[HeaderName]>, path: String, retain_for: Duration },
}

impl Object {
    pub fn weight(&self) -> usize {
        match self {
            Object::Response(e) => e.weight(),
            Object::Vary { headers, path, .. } => {
                64 + path.len() + headers.iter().map(|h| h.as_str().len() + 16).sum::<usize>()
            }
        }
    }

    pub fn retain_for(&self) -> Duration {
        match self {
            Object::Response(e) => e.retain_for(),
            Object::Vary { retain_for, .. } => *retain_for,
        }
    }

    /// Lifetime left in a store: `retain_for` counted from when the response was received (an
    /// object promoted from L2 keeps only what it has left).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        match self {
            Object::Response(e) => e.retain_for().saturating_sub(now.duration_since(e.stored_at).unwrap_or_default()),
            Object::Vary { retain_for, .. } => *retain_for,
        }
    }

    pub fn path(&self) -> &str {
        match self {
            Object::Response(e) => &e.path,
            Object::Vary { path, .. } => path,
        }
    }

    pub fn tags(&self) -> &[String] {
        match self {
            Object::Response(e) => &e.tags,
            Object::Vary { .. } => &[],
        }
    }
}
