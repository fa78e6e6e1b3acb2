//! Weir: a programmable caching gateway.
//!
//! A request passes through DESIGN.md's nine phases (numbered the same way in `proxy`):
//!
//! 1. **accept** (`server::listener`) — TCP, HTTP/1.1 and HTTP/2, limits; the canonical request
//!    (`proxy::canonical`) and the client's address (`proxy::headers::client_addr`) in the
//!    per-request context (`proxy::RequestCtx`)
//! 2. **route** (`router`) — host, longest path prefix, methods; 404 `no_route`, 405 from the
//!    most specific matching routes
//! 3. **consumer** and `count: all` rate limits (`limit`); failed credentials limited per address
//! 4. **cache key and lookup** (`cache`, `proxy::cached`) — L1 → L2 (`cache::l2` on `redis`);
//!    keyed by consumer on routes with one
//! 5. **hit** — served from the entry (`proxy::cached::respond`)
//! 6. **miss / bypass** — the one upstream function, `proxy::upstream`: `count: misses` limits,
//!    and the payer's budget lease (`proxy::meter`)
//! 7. **response** — storage decision and store (`proxy::cached::fill`), streaming back
//! 8. **mutation** — invalidation on every tier and instance (`proxy::cached::invalidate`)
//! 9. **settle and log** — the lease guard settles once, at the head, the body's end or when
//!    dropped (`proxy::meter`); access log and metrics (`observe`, `metrics`)
//!
//! Configuration (`config`) is parsed and validated whole into a `runtime::Runtime`, swapped
//! atomically on reload; errors become JSON responses only in `error`. The admin API lives in
//! `admin` on its own listener. The shared tier's connection, breaker and health live in `redis`.
//!
//! Layers: a module may use modules of its own layer or below, never above (checked by
//! `tests/layers.rs`, which reads this table):
//!
//! | layer | modules |
//! |---|---|
//! | 5 entry | server, admin |
//! | 4 pipeline | proxy, error |
//! | 3 runtime | runtime |
//! | 2 config | config |
//! | 1 domain | cache, limit, budget, redis, plugin, tls, observe, metrics, router |
//! | 0 base | clock, hex |

#![forbid(unsafe_code)]

pub mod admin;
pub mod budget;
pub mod cache;
pub mod clock;
pub mod config;
pub mod error;
pub mod hex;
pub mod limit;
pub mod metrics;
pub mod observe;
pub mod plugin;
pub mod proxy;
pub mod redis;
pub mod router;
pub mod runtime;
pub mod server;
pub mod tls;

/// 64 random bits for process-wide secrets and identities (std's randomly keyed SipHash seed,
/// mixed with the time and PID): the Redis instance id, the plugin memo key.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

/// Boxed error used by bodies crossing the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response Weir produces: streamed upstream bodies and small buffered ones.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;
