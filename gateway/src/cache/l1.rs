//! L1: the in-process tier. A moka cache bounded in bytes (the weigher counts key, headers,
//! body and tags), per-entry expiry from each object's lifetime, and an index by tag and by
//! URL path so purge by tag and by prefix never scans the cache.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use moka::sync::Cache as Moka;
use moka::Expiry;

use super::entry::Object;
use super::{BoxFuture, CacheError, Purge, Storage, StorageStats};

#[derive(Debug, Default)]
struct Index {
    tags: HashMap<String, Keys, foldhash::fast::RandomState>,
    paths: BTreeMap<String, Keys>,
}

/// The keys under one tag or path. Hashed with foldhash, seeded per set (the keys come from
/// clients' URLs): SipHash was a tenth of what storing an entry cost.
type Keys = HashSet<Arc<str>, foldhash::fast::RandomState>;

impl Index {
    fn add(&mut self, key: &Arc<str>, obj: &Object) {
        for t in obj.tags() {
            self.tags.entry(t.clone()).or_default().insert(key.clone());
        }
        self.paths.entry(obj.path().to_string()).or_default().insert(key.clone());
    }

    fn remove(&mut self, key: &str, obj: &Object) {
        for t in obj.tags() {
            if let Some(set) = self.tags.get_mut(t) {
                set.remove(key);
                if set.is_empty() {
                    self.tags.remove(t);
                }
            }
        }
        if let Some(set) = self.paths.get_mut(obj.path()) {
            set.remove(key);
            if set.is_empty() {
                self.paths.remove(obj.path());
            }
        }
    }

    /// Keys matched by a purge (URL-path keys, tags, prefixes); raw keys are returned as given.
    fn matching(&self, p: &Purge) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        for k in &p.keys {
            if k.starts_with('/') {
                if let Some(set) = self.paths.get(k.as_str()) {
                    out.extend(set.iter().cloned());
                }
            } else {
                out.push(Arc::from(k.as_str()));
            }
        }
        for t in &p.tags {
            if let Some(set) = self.tags.get(t.as_str()) {
                out.extend(set.iter().cloned());
            }
        }
        for prefix in &p.prefixes {
            for (_, set) in self.paths.range(prefix.clone()..).take_while(|(path, _)| path.starts_with(prefix.as_str()))
            {
                out.extend(set.iter().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

struct Lifetime;

impl Expiry<Arc<str>, Object> for Lifetime {
    fn expire_after_create(&self, _k: &Arc<str>, v: &Object, _at: Instant) -> Option<Duration> {
        Some(v.remaining(std::time::SystemTime::now()))
    }
    fn expire_after_update(
        &self,
        _k: &Arc<str>,
        v: &Object,
        _at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.remaining(std::time::SystemTime::now()))
    }
}

/// What moka holds per entry besides key and value (its entry, hash-table slot, access-order
/// and timer-wheel nodes), measured at about 250 bytes; and what one index row holds (a set slot
/// with an `Arc` of the key, plus the path string and its set for the path row).
const MOKA_ENTRY: usize = 256;
const INDEX_ROW: usize = 48;

/// Bytes one L1 entry keeps alive: the key, the object, moka's bookkeeping, its index rows.
fn weight(k: &Arc<str>, v: &Object) -> usize {
    let rows = 1 + v.tags().len();
    MOKA_ENTRY + k.len() + 32 + v.weight() + rows * INDEX_ROW + v.path().len() + 64
}

/// Entries this heavy make moka evict at once rather than at its next housekeeping.
const LARGE_ENTRY: usize = 256 << 10;

/// Keys are request-derived: a seeded, quality hash (foldhash) instead of moka's default SipHash,
/// which was a measurable share of a hit.
type Hasher = foldhash::quality::RandomState;

#[derive(Debug, Clone)]
pub struct L1 {
    cache: Moka<Arc<str>, Object, Hasher>,
    index: Arc<Mutex<Index>>,
}

impl L1 {
    pub fn new(max_bytes: u64) -> L1 {
        let index: Arc<Mutex<Index>> = Arc::default();
        let idx = index.clone();
        let cache = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &Arc<str>, v: &Object| u32::try_from(weight(k, v)).unwrap_or(u32::MAX))
            .expire_after(Lifetime)
            .eviction_listener(move |k: Arc<Arc<str>>, v: Object, cause| {
                // A replaced entry's rows were swapped by `put`, which knows the new value.
                if cause != RemovalCause::Replaced {
                    if let Ok(mut i) = idx.lock() {
                        i.remove(&k, &v);
                    }
                }
            })
            .build_with_hasher(Hasher::default());
        L1 { cache, index }
    }

    /// Direct lookup, synchronous: moka's sync cache never blocks on a lookup.
    pub fn lookup(&self, key: &str) -> Option<Object> {
        self.cache.get(key)
    }

    pub fn remove(&self, key: &str) {
        self.cache.invalidate(key);
    }

    /// Drops everything; returns how many entries there were.
    pub fn clear(&self) -> u64 {
        self.cache.run_pending_tasks();
        let n = self.cache.entry_count();
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
        n
    }

    /// Makes moka apply pending evictions now (it evicts lazily); tests and `/health` use it.
    pub async fn settle(&self) {
        self.cache.run_pending_tasks();
    }
}

impl Storage for L1 {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Object>, CacheError>> {
        Box::pin(std::future::ready(Ok(self.lookup(key))))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        obj: Object,
        _since: std::time::SystemTime,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let key: Arc<str> = Arc::from(key);
            // Read before locking: a lookup may run moka's housekeeping, whose eviction listener
            // takes the index lock. A fill usually follows a miss: `contains_key` (no read
            // recorded) first, the value only when there is one to replace.
            let old = if self.cache.contains_key(&key) { self.cache.get(&key) } else { None };
            if let Ok(mut i) = self.index.lock() {
                // The replaced value's rows go (an origin re-tagging one key must not grow the
                // index); the listener skips `Replaced` for that reason.
                if let Some(old) = &old {
                    i.remove(&key, old);
                }
                i.add(&key, &obj);
            }
            // The body is what makes an entry large (moka's weigher counts the rest).
            let large = obj.body_len() >= LARGE_ENTRY;
            self.cache.insert(key, obj);
            if large {
                // moka evicts lazily, in batches: a run of large inserts would hold several times
                // the bound until its next housekeeping. A large entry settles at once, so the
                // bound holds (the cost is small next to the fill that made the entry).
                self.cache.run_pending_tasks();
            }
            Ok(())
        })
    }

    fn purge<'a>(&'a self, p: &'a Purge) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            let keys = match self.index.lock() {
                Ok(i) => i.matching(p),
                Err(_) => return Err(CacheError::Poisoned),
            };
            let mut n = 0;
            for k in keys {
                if let Some(obj) = self.cache.remove(&k) {
                    n += 1;
                    // A Vary marker's variants live under its variant prefix, at the same path.
                    if matches!(obj, Object::Vary { .. }) {
                        let prefix = super::key::variant_prefix(&k);
                        let variants: Vec<Arc<str>> = match self.index.lock() {
                            Ok(i) => i
                                .paths
                                .get(obj.path())
                                .map(|s| s.iter().filter(|v| v.starts_with(prefix.as_str())).cloned().collect())
                                .unwrap_or_default(),
                            Err(_) => Vec::new(),
                        };
                        for v in variants {
                            if self.cache.remove(&v).is_some() {
                                n += 1;
                            }
                        }
                    }
                }
            }
            Ok(n)
        })
    }

    fn stats(&self) -> StorageStats {
        StorageStats { entries: self.cache.entry_count(), bytes: self.cache.weighted_size() }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::cache::entry::Entry;

    pub(crate) fn entry(key: &str, path: &str, tags: &[&str], body: usize) -> Object {
        Object::Response(Arc::new(Entry {
            key: key.to_string(),
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            stored_at: SystemTime::now(),
            initial_age: Duration::ZERO,
            fresh_for: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            revalidate_always: false,
            stale_forbidden: false,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            path: path.to_string(),
            vary: Arc::from(Vec::new()),
        }))
    }

    #[tokio::test]
    async fn never_exceeds_its_byte_bound() {
        let l1 = L1::new(1 << 20);
        // Ten times the capacity in 10 KiB objects.
        for i in 0..1000 {
            let k = format!("r|GET|http://h/o/{i}");
            l1.put(&k, entry(&k, &format!("/o/{i}"), &["t"], 10 << 10), SystemTime::now()).await.unwrap();
        }
        l1.settle().await;
        let s = l1.stats();
        assert!(s.bytes <= 1 << 20, "weighted size {} over the bound", s.bytes);
        assert!(s.entries > 10 && s.entries < 110, "{} entries", s.entries);
    }

    #[tokio::test]
    async fn a_replaced_entry_leaves_no_index_rows() {
        let l1 = L1::new(1 << 20);
        for i in 0..100 {
            let tag = format!("t{i}");
            l1.put("k", entry("k", &format!("/p/{i}"), &[&tag], 10), SystemTime::now()).await.unwrap();
        }
        l1.settle().await;
        let idx = l1.index.lock().unwrap();
        assert_eq!(idx.tags.keys().collect::<Vec<_>>(), ["t99"], "index rows of replaced values remain");
        assert_eq!(idx.paths.keys().collect::<Vec<_>>(), ["/p/99"]);
    }

    #[tokio::test]
    async fn purge_by_tag_prefix_and_path_cleans_the_index() {
        let l1 = L1::new(1 << 20);
        for (k, p, t) in [("k1", "/a/1", "x"), ("k2", "/a/2", "y"), ("k3", "/b/1", "x")] {
            l1.put(k, entry(k, p, &[t], 10), SystemTime::now()).await.unwrap();
        }
        assert_eq!(l1.purge(&Purge { tags: vec!["x".into()], ..Purge::default() }).await.unwrap(), 2);
        assert!(l1.get("k1").await.unwrap().is_none());
        assert!(l1.get("k2").await.unwrap().is_some());
        assert_eq!(l1.purge(&Purge { prefixes: vec!["/a/".into()], ..Purge::default() }).await.unwrap(), 1);
        l1.settle().await;
        let idx = l1.index.lock().unwrap();
        assert!(idx.tags.is_empty() && idx.paths.is_empty(), "index keeps purged keys: {idx:?}");
    }
}
