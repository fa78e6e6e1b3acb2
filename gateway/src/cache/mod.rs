//! The HTTP cache: keys (`key`), freshness and storage rules (`control`, `policy`), stored
//! objects (`entry`), tiers behind one narrow `Storage` trait (`l1`; the Redis L2 and the tiered
//! composition plug in beside it), coalescing (`flight`) and the `Cache-Status` outcome (`status`).
//! The request-path use of all this is `proxy::cached`.

pub mod control;
pub mod entry;
pub mod flight;
pub mod key;
pub mod l1;
pub mod policy;
pub mod status;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use self::entry::{Entry, Object};
use self::flight::Flights;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache index lock poisoned")]
    Poisoned,
    #[error("storage tier {tier} failed: {message}")]
    Tier { tier: &'static str, message: String },
}

/// What to invalidate. `keys` are full cache keys, or URL paths (`/products/1?x=1`, matched
/// exactly against normalised paths); `prefixes` match the start of normalised paths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
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

    /// Whether this purge covers `e` (used to refuse storing a fetch that a purge overtook).
    fn covers(&self, e: &Entry) -> bool {
        let primary = e.key.split("|vary:").next().unwrap_or(&e.key);
        self.keys.iter().any(|k| *k == e.key || k == primary || *k == e.path)
            || self.tags.iter().any(|t| e.tags.contains(t))
            || self.prefixes.iter().any(|p| e.path.starts_with(p.as_str()))
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
    fn put<'a>(&'a self, key: &'a str, obj: Object) -> BoxFuture<'a, Result<(), CacheError>>;
    fn purge<'a>(&'a self, p: &'a Purge) -> BoxFuture<'a, Result<u64, CacheError>>;
    fn stats(&self) -> StorageStats;
}

/// Purges remembered so a fetch that started before one of them is not stored after it.
const PURGE_LOG: usize = 4096;

/// A generation stamp taken when a fetch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// The process-wide cache: the tiers (L1 always, a shared L2 when configured: the tiered
/// composition), in-flight fetches, and the purge log (generation stamps).
#[derive(Debug)]
pub struct Cache {
    pub l1: l1::L1,
    /// The shared tier (Redis, with the Redis issue); `None` = embedded mode.
    pub l2: Option<Arc<dyn Storage>>,
    pub flights: Flights,
    generation: AtomicU64,
    log: Mutex<VecDeque<(u64, Purge)>>,
    pub max_object_bytes: u64,
}

impl Cache {
    pub fn new(l1_max_bytes: u64, max_object_bytes: u64) -> Arc<Cache> {
        Arc::new(Cache {
            l1: l1::L1::new(l1_max_bytes),
            l2: None,
            flights: Flights::default(),
            generation: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
            max_object_bytes,
        })
    }

    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::Acquire))
    }

    /// L1, then L2 (a hit there is promoted to L1). The L1 lookup is called directly: the hit
    /// path pays no boxed `dyn` future (measured: the boxed moka lookup was the costliest
    /// allocation of a hit).
    pub async fn get(&self, key: &str) -> Option<Object> {
        if let Some(obj) = self.l1.lookup(key) {
            return Some(obj);
        }
        let l2 = self.l2.as_ref()?;
        match l2.get(key).await {
            Ok(Some(obj)) => {
                let _ = self.l1.put(key, obj.clone()).await;
                Some(obj)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "L2 lookup failed; treating as a miss");
                None
            }
        }
    }

    async fn put(&self, key: &str, obj: Object) -> Result<(), CacheError> {
        self.l1.put(key, obj.clone()).await?;
        if let Some(l2) = &self.l2 {
            l2.put(key, obj).await?;
        }
        Ok(())
    }

    async fn purge_tiers(&self, p: &Purge) -> Result<u64, CacheError> {
        let mut n = self.l1.purge(p).await?;
        if let Some(l2) = &self.l2 {
            n = n.max(l2.purge(p).await?);
        }
        Ok(n)
    }

    /// Stores `entry` (and the Vary marker at `primary` when it varies) unless a purge that
    /// covers it landed after `since`. Returns whether it was stored.
    pub async fn store(&self, primary: &str, entry: Arc<Entry>, since: Generation) -> bool {
        if self.overtaken(&entry, since) {
            return false;
        }
        if !entry.vary.is_empty() {
            let marker =
                Object::Vary { headers: entry.vary.clone(), path: entry.path.clone(), retain_for: entry.retain_for() };
            if let Err(e) = self.put(primary, marker).await {
                tracing::warn!(error = %e, "cache store failed");
                return false;
            }
        }
        let key = entry.key.clone();
        if let Err(e) = self.put(&key, Object::Response(entry.clone())).await {
            tracing::warn!(error = %e, "cache store failed");
            return false;
        }
        // A purge may have landed while we were storing: undo rather than keep a purged copy.
        if self.overtaken(&entry, since) {
            let _ = self.purge_tiers(&Purge { keys: vec![key], ..Purge::default() }).await;
            return false;
        }
        true
    }

    fn overtaken(&self, entry: &Entry, since: Generation) -> bool {
        let now = self.generation.load(Ordering::Acquire);
        if now == since.0 {
            return false;
        }
        let Ok(log) = self.log.lock() else { return true };
        // Older than the log reaches: be safe, do not store.
        if log.front().is_none_or(|(g, _)| *g > since.0 + 1) {
            return true;
        }
        log.iter().filter(|(g, _)| *g > since.0).any(|(_, p)| p.covers(entry))
    }

    /// Purges from every tier; returns how many objects were removed.
    pub async fn purge(&self, p: &Purge) -> Result<u64, CacheError> {
        {
            let mut log = self.log.lock().map_err(|_| CacheError::Poisoned)?;
            let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            log.push_back((g, p.clone()));
            while log.len() > PURGE_LOG {
                log.pop_front();
            }
        }
        self.purge_tiers(p).await
    }

    /// L1 figures (what this instance holds in memory).
    pub fn stats(&self) -> StorageStats {
        self.l1.stats()
    }
}
