//! Weir: a programmable caching gateway.
//!
//! A request passes through DESIGN.md's nine phases. `proxy::handle` runs phases 1–6 in order
//! over one per-request context (`proxy::RequestCtx`), each phase a function answering it; the
//! response body's completion runs 7–9:
//!
//! 1. **accept** (`server::listener`, `proxy::accept`) — TCP, HTTP/1.1 and HTTP/2, head limits;
//!    the canonical request (`proxy::canonical`)
//! 2. **route** (`router`, `proxy::route_of`) — host, longest path prefix, methods; 404
//!    `no_route`, 405 from the most specific matching routes; the context is made here, with the
//!    client's address (`proxy::headers::client_addr`)
//! 3. **consumer** (`proxy::consumer`; failed credentials limited per address) and `count: all`
//!    rate limits (`limit`, through `proxy::limits`)
//! 4. **cache key and lookup** (`proxy::cached`, `cache`) — L1 → L2 (`cache::l2` on `redis`);
//!    keyed by consumer on routes with one
//! 5. **hit** — served from the entry (`proxy::cached::respond`)
//! 6. **miss / bypass** — every upstream request leaves through `proxy::send::upstream`:
//!    `count: misses` limits, the route's connection slots (`upstream`), and the payer's budget
//!    lease (`proxy::meter`, on `budget`); uncached routes through `proxy::forward`
//! 7. **response** — storage decision (`cache::policy`) and store (`proxy::cached::fill`),
//!    streaming back
//! 8. **mutation** — invalidation on every tier and instance (`proxy::cached::invalidate`)
//! 9. **settle and log** — the lease guard settles once, at the head, the body's end or when
//!    dropped (`proxy::meter`); the completion (`proxy::body::Completion`) counts and logs
//!    (`observe`, `metrics`)
//!
//! Configuration (`config`) is parsed and validated whole (`config::validate`, a file per
//! section) into the domain modules' own types, then into a `runtime::Runtime`, swapped
//! atomically on reload; errors become JSON responses only in `proxy::handle` (rendered by
//! `error`). The admin API lives in `admin` on its own listener.
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
//! | 1 domain | cache, limit, budget, redis, plugin, tls, upstream, observe, metrics, router |
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
pub mod upstream;

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
