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

    /// Bytes the entry holds on the heap, as the allocator sees them: what the L1 byte bound
    /// weighs, so the bound is the memory bound (measured by `l1_bound_is_the_memory_bound`).
    pub fn weight(&self) -> usize {
        let tags: usize = self.tags.iter().map(|t| alloc(t.capacity()) + size_of::<String>()).sum();
        let vary = self.vary.len() * size_of::<HeaderName>();
        ARC + size_of::<Entry>()
            + alloc(self.key.capacity())
            + alloc(self.path.capacity())
            + headers_weight(&self.headers)
            + tags
            + alloc(vary)
            + alloc(self.body.len())
    }
}

/// Heap overhead of one `Arc` (two counters) and one allocation's rounding and header.
const ARC: usize = 16;
fn alloc(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        n.next_multiple_of(16) + 16
    }
}

/// What a `HeaderMap` holds: its index table (4 bytes a slot, a power of two above the usable
/// capacity), a bucket per usable slot, extra values of repeated names, custom names, and the
/// value bytes (one allocation when the map came from [`compact_headers`]).
pub fn headers_weight(h: &HeaderMap) -> usize {
    let usable = h.capacity();
    let index = alloc(4 * (usable + usable / 3).next_power_of_two());
    let bucket = size_of::<HeaderName>() + size_of::<HeaderValue>() + 24;
    let extra = h.len().saturating_sub(h.keys_len()) * (size_of::<HeaderValue>() + 24);
    let names: usize = h.keys().map(|k| alloc(k.as_str().len())).sum();
    let values: usize = h.values().map(HeaderValue::len).sum();
    index + alloc(usable * bucket) + alloc(extra) + names + alloc(values)
}

/// The same headers in a map of exactly their size, every value a slice of one buffer: one
/// allocation for all values, owned (never a slice of a connection's read buffer, which would
/// keep that whole buffer alive while the entry lives).
pub fn compact_headers<N: std::borrow::Borrow<HeaderName>>(pairs: &[(N, &[u8])]) -> HeaderMap {
    let mut buf = bytes::BytesMut::with_capacity(pairs.iter().map(|(_, v)| v.len()).sum());
    for (_, v) in pairs {
        buf.extend_from_slice(v);
    }
    let buf = buf.freeze();
    let mut out = HeaderMap::with_capacity(pairs.len());
    let mut at = 0;
    for (name, v) in pairs {
        let bytes = buf.slice(at..at + v.len());
        at += v.len();
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes) {
            out.append(name.borrow().clone(), v);
        }
    }
    out
}

/// A cache object under a key: a response, or the note that responses here vary on headers.
#[derive(Debug, Clone)]
pub enum Object {
    Response(Arc<Entry>),
    Vary { headers: Arc<[HeaderName]>, path: String, retain_for: Duration },
}

impl Object {
    /// The body's length: what makes an entry large (cheaper than `weight`, which walks the
    /// headers).
    pub fn body_len(&self) -> usize {
        match self {
            Object::Response(e) => e.body.len(),
            Object::Vary { .. } => 0,
        }
    }

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
