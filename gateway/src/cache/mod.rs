//! The HTTP cache: keys (`key`), freshness and storage rules (`control`, `policy`), stored
//! objects (`entry`), tiers behind one narrow `Storage` trait (`l1`; the Redis L2 and the tiered
//! composition plug in beside it), coalescing (`flight`) and the `Cache-Status` outcome (`status`).
//! The request-path use of all this is `proxy::cached`.

pub mod codec;
pub mod control;
pub mod entry;
pub mod flight;
pub mod key;
pub mod l1;
pub mod l2;
pub mod policy;
pub mod status;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use self::entry::{Entry, Object};
use self::flight::Flights;
use self::status::Level;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache index lock poisoned")]
    Poisoned,
    #[error("storage tier {tier} failed: {message}")]
    Tier { tier: &'static str, message: String },
    /// The shared tier refused a store: a purge that covers it landed after its fetch began.
    #[error("a purge overtook this store")]
    Overtaken,
    /// The shared tier was not asked: its circuit breaker is open or it is not connected (the
    /// breaker logs that; this is not counted as an error).
    #[error("storage tier {tier} skipped: {reason}")]
    Skipped { tier: &'static str, reason: String },
}

/// What to invalidate. `keys` are full cache keys, or URL paths (`/products/1?x=1`, matched
/// exactly against normalised paths); `prefixes` match the start of normalised paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purge {
    #[serde(default)]
    pub keys: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
}

impl Purge {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.tags.is_empty() && self.prefixes.is_empty()
    }

    /// Whether this purge covers the object stored under `key` (used to refuse storing a fetch,
    /// or promoting an L2 read, that a purge overtook).
    fn covers(&self, key: &str, obj: &Object) -> bool {
        let primary = key::primary_of(key);
        let path = obj.path();
        self.keys.iter().any(|k| k == key || k == primary || k == path)
            || self.tags.iter().any(|t| obj.tags().contains(t))
            || self.prefixes.iter().any(|p| path.starts_with(p.as_str()))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageStats {
    pub entries: u64,
    pub bytes: u64,
}

/// One cache tier: look up, store and purge. L1, L2 and their composition all implement it.
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Object>, CacheError>>;
    /// Stores `obj`; `since` is when the fetch that produced it began (a tier may refuse the
    /// store with `CacheError::Overtaken` when a purge covering it landed after that).
    fn put<'a>(&'a self, key: &'a str, obj: Object, since: SystemTime) -> BoxFuture<'a, Result<(), CacheError>>;
    fn purge<'a>(&'a self, p: &'a Purge) -> BoxFuture<'a, Result<u64, CacheError>>;
    fn stats(&self) -> StorageStats;
}

/// Purges remembered so a fetch that started before one of them is not stored after it.
const PURGE_LOG: usize = 4096;

/// A generation stamp taken when a fetch starts (the local purge count, and the wall clock for
/// the shared tier's purge log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64, SystemTime);

/// The process-wide cache: the tiers (L1 always, a shared L2 when configured: the tiered
/// composition), in-flight fetches, and the purge log (generation stamps).
#[derive(Debug)]
pub struct Cache {
    pub l1: l1::L1,
    /// `cache.l1_max_bytes: 0` turns L1 off (every hit comes from L2).
    l1_enabled: bool,
    /// The shared tier (Redis); `None` = embedded mode.
    pub l2: Option<Arc<dyn Storage>>,
    /// Fill locks across instances (`redis.fill_lock`): the same L2, for its locks.
    pub fill_locks: Option<Arc<l2::L2>>,
    pub flights: Flights,
    generation: AtomicU64,
    log: Mutex<VecDeque<(u64, Purge)>>,
    pub max_object_bytes: u64,
    /// Bytes buffered for fills at once (`cache.max_fill_bytes`).
    pub fill_budget: FillBudget,
    /// `weir_cache_errors_total{level="l2"}`.
    l2_errors: Counter,
}

/// A process-wide byte budget for responses being buffered into the cache: a fill reserves its
/// declared length (or the object bound) up front; when the budget is spent the response streams
/// through uncached instead of pushing memory past the bound.
#[derive(Debug)]
pub struct FillBudget {
    used: Arc<AtomicU64>,
    max: u64,
}

/// Returned to the budget when dropped.
#[derive(Debug)]
pub struct FillPermit {
    used: Arc<AtomicU64>,
    n: u64,
}

impl FillBudget {
    pub fn new(max: u64) -> FillBudget {
        FillBudget { used: Arc::default(), max }
    }

    pub fn reserve(&self, n: u64) -> Option<FillPermit> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(n).filter(|&v| v <= self.max)?;
            match self.used.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(FillPermit { used: self.used.clone(), n }),
                Err(now) => cur = now,
            }
        }
    }

    pub fn in_use(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        self.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

impl Cache {
    pub fn new(
        l1_max_bytes: u64,
        max_object_bytes: u64,
        max_fill_bytes: u64,
        l2: Option<Arc<dyn Storage>>,
        fill_locks: Option<Arc<l2::L2>>,
        l2_errors: Counter,
    ) -> Arc<Cache> {
        Arc::new(Cache {
            l1: l1::L1::new(l1_max_bytes),
            l1_enabled: l1_max_bytes > 0,
            l2,
            fill_locks,
            flights: Flights::default(),
            generation: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
            max_object_bytes,
            fill_budget: FillBudget::new(max_fill_bytes),
            l2_errors,
        })
    }

    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::Acquire), SystemTime::now())
    }

    fn l2_failed(&self, what: &str, e: &CacheError) {
        self.l2_errors.inc();
        tracing::debug!(error = %e, "L2 {what} failed; going on without it");
    }

    /// L1, then L2 (a hit there is promoted to L1 with its remaining lifetime). The L1 lookup
    /// is called directly: the hit path pays no boxed `dyn` future (measured: the boxed moka
    /// lookup was the costliest allocation of a hit).
    ///
    /// A purge that lands while the L2 read is under way wins: the generation is taken before
    /// the read, and an object the purge covers is neither promoted nor served.
    pub async fn get(&self, key: &str) -> Option<(Object, Level)> {
        if let Some(obj) = self.l1.lookup(key) {
            return Some((obj, Level::L1));
        }
        let l2 = self.l2.as_ref()?;
        let since = self.generation();
        match l2.get(key).await {
            Ok(Some(obj)) => {
                if self.overtaken(key, &obj, since) {
                    return None;
                }
                if self.l1_enabled {
                    let _ = self.l1.put(key, obj.clone(), SystemTime::now()).await;
                }
                Some((obj, Level::L2))
            }
            Ok(None) => None,
            Err(e) => {
                if !matches!(e, CacheError::Skipped { .. }) {
                    self.l2_failed("lookup", &e);
                }
                None
            }
        }
    }

    async fn put(&self, key: &str, obj: Object, since: SystemTime) -> Result<(), CacheError> {
        if self.l1_enabled {
            self.l1.put(key, obj.clone(), since).await?;
        }
        // Attempted even right after a Redis call timed out: its refusal (`Overtaken`) is how a
        // fill overtaken by a purge made on another instance, one this instance has not heard
        // of yet, is taken out of L1 again (a soak served such a body 13 s after its purge when
        // stores were skipped after a timeout: a6bd70c, reverted).
        if let Some(l2) = &self.l2 {
            match l2.put(key, obj, since).await {
                Ok(()) => {}
                Err(CacheError::Overtaken) => {
                    self.l1.remove(key);
                    return Err(CacheError::Overtaken);
                }
                // L1 keeps it: the shared tier is an optimisation, not a condition.
                Err(CacheError::Skipped { .. }) => {}
                Err(e) => self.l2_failed("store", &e),
            }
        }
        Ok(())
    }

    async fn purge_tiers(&self, p: &Purge) -> Result<u64, CacheError> {
        let mut n = self.l1.purge(p).await?;
        if let Some(l2) = &self.l2 {
            match l2.purge(p).await {
                Ok(m) => n = n.max(m),
                Err(e) => {
                    self.l2_failed("purge", &e);
                    tracing::warn!(error = %e, "purge could not reach Redis: queued until it is back");
                }
            }
        }
        Ok(n)
    }

    fn log_purge(&self, p: &Purge) -> Result<(), CacheError> {
        let mut log = self.log.lock().map_err(|_| CacheError::Poisoned)?;
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        log.push_back((g, p.clone()));
        while log.len() > PURGE_LOG {
            log.pop_front();
        }
        Ok(())
    }

    /// A purge announced by another instance: this L1 only (Redis is already done).
    pub async fn purge_local(&self, p: &Purge) -> Result<u64, CacheError> {
        self.log_purge(p)?;
        self.l1.purge(p).await
    }

    /// Drops all of L1 (after a gap in the invalidation channel); fetches in flight are not
    /// stored. Returns how many entries were dropped.
    pub fn clear_l1(&self) -> u64 {
        let _ = self.log_purge(&Purge { prefixes: vec![String::new()], ..Purge::default() });
        self.l1.clear()
    }

    /// Stores `entry` (and the Vary marker at `primary` when it varies) unless a purge that
    /// covers it landed after `since`. Returns whether it was stored.
    pub async fn store(&self, primary: &str, entry: Arc<Entry>, since: Generation) -> bool {
        let obj = Object::Response(entry.clone());
        if self.overtaken(&entry.key, &obj, since) {
            return false;
        }
        if !entry.vary.is_empty() {
            let marker =
                Object::Vary { headers: entry.vary.clone(), path: entry.path.clone(), retain_for: entry.retain_for() };
            if let Err(e) = self.put(primary, marker, since.1).await {
                tracing::warn!(error = %e, "cache store failed");
                return false;
            }
        }
        let key = entry.key.clone();
        if let Err(e) = self.put(&key, Object::Response(entry.clone()), since.1).await {
            if !matches!(e, CacheError::Overtaken) {
                tracing::warn!(error = %e, "cache store failed");
            }
            return false;
        }
        // A purge may have landed while we were storing: undo rather than keep a purged copy.
        if self.overtaken(&entry.key, &obj, since) {
            let _ = self.purge_tiers(&Purge { keys: vec![key], ..Purge::default() }).await;
            return false;
        }
        true
    }

    fn overtaken(&self, key: &str, obj: &Object, since: Generation) -> bool {
        let now = self.generation.load(Ordering::Acquire);
        if now == since.0 {
            return false;
        }
        let Ok(log) = self.log.lock() else { return true };
        // Older than the log reaches: be safe, do not store.
        if log.front().is_none_or(|(g, _)| *g > since.0 + 1) {
            return true;
        }
        log.iter().filter(|(g, _)| *g > since.0).any(|(_, p)| p.covers(key, obj))
    }

    /// Purges from every tier; returns how many objects were removed.
    pub async fn purge(&self, p: &Purge) -> Result<u64, CacheError> {
        self.log_purge(p)?;
        self.purge_tiers(p).await
    }

    /// L1 figures (what this instance holds in memory).
    pub fn stats(&self) -> StorageStats {
        self.l1.stats()
    }
}
