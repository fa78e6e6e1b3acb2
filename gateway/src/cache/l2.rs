//! L2: the shared tier in Redis (one server or a Cluster), and the invalidation channel that
//! reaches the L1 of every instance.
//!
//! Redis keys carry no request data: every name is `weir:{B}:<kind>:<128-bit keyed BLAKE3>`,
//! where `B` is one of `buckets` hash-tag buckets picked by the hash. An entry, the index sets
//! that list it (by tag, by exact path, by path prefix) and the bucket's purge log share a bucket, hence a
//! Cluster slot, so each store is one atomic script; entries of one route still spread over all
//! buckets. Index sets are sorted sets scored by expiry: expired members are trimmed on every
//! store and the set itself expires with its longest-lived member. A purge by tag, URL or prefix
//! runs one script per bucket that reads the index (never `KEYS`, never a scan); a purge by URL
//! (what every client write causes) reads only the exact-path set, never a prefix's.
//!
//! A purge wins over a fetch in flight: each bucket keeps a ten-minute log of purges, scored by
//! Redis' own clock (`TIME` inside the script); a store whose fetch started before a purge that
//! covers it is refused by the store script itself. The fetch's start is converted to Redis'
//! clock with the offset each instance measures once a second, so instances' clocks need not
//! agree. (On a Cluster, masters' clocks are assumed to agree within `SKEW_MS`.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use redis::Script;

use super::codec;
use super::entry::Object;
use super::{BoxFuture, Cache, CacheError, Purge, Storage, StorageStats};
use crate::redis::{CallError, Shared};

/// Index prefixes are the `/`-terminated prefixes of a path, this many levels deep at most.
const MAX_DEPTH: usize = 4;
/// How far back a bucket's purge log reaches; a fetch older than this is not stored.
const PURGE_LOG_MS: u64 = 600_000;
/// Error tolerated when placing a fetch's start in Redis' clock (offset measured each second).
const SKEW_MS: u64 = 2;
/// Purges that could not reach Redis, replayed when it is back (beyond: logged and dropped).
const PENDING_MAX: usize = 1024;
pub const CHANNEL: &str = "weir:invalidate";
/// Where a fill lock's holder announces that it is done (the payload: the lock's hex hash).
pub const FILLED: &str = "weir:filled";
/// Bytes of the keyed-BLAKE3 MAC appended to values and messages.
const MAC_LEN: usize = 16;

const PUT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local since = tonumber(ARGV[3])
if now - since > tonumber(ARGV[9]) then return 0 end
local ntags = tonumber(ARGV[8])
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], since, '+inf')) do
  local kind, v = string.sub(m, 1, 2), string.sub(m, 3)
  if kind == 'k:' and (v == ARGV[5] or v == ARGV[6]) then return 0 end
  if kind == 'u:' and v == ARGV[7] then return 0 end
  if kind == 'p:' and string.sub(ARGV[7], 1, #v) == v then return 0 end
  if kind == 't:' then
    for i = 1, ntags do if ARGV[9 + i] == v then return 0 end end
  end
end
local px = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
for i = 3, #KEYS do
  local member = ARGV[4]
  if i - 2 > ntags + 1 then member = ARGV[4] .. ' ' .. ARGV[7] end
  redis.call('ZADD', KEYS[i], now + px, member)
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('PTTL', KEYS[i]) < px then redis.call('PEXPIRE', KEYS[i], px) end
end
return 1
";

const PURGE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local eprefix = ARGV[1]
local n = 0
for i = 2, #KEYS do
  local kind, v = ARGV[2 * i - 2], ARGV[2 * i - 1]
  if kind == 'k' then
    n = n + redis.call('DEL', KEYS[i])
  elseif kind == 't' or kind == 'u' then
    for _, m in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
      n = n + redis.call('DEL', eprefix .. m)
    end
    redis.call('DEL', KEYS[i])
  else
    for _, m in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
      local sp = string.find(m, ' ', 1, true)
      local path = string.sub(m, sp + 1)
      if string.sub(path, 1, #v) == v then
        n = n + redis.call('DEL', eprefix .. string.sub(m, 1, sp - 1))
        redis.call('ZREM', KEYS[i], m)
      end
    end
  end
  redis.call('ZADD', KEYS[1], now, kind .. ':' .. v)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2 * #KEYS]))
redis.call('PEXPIRE', KEYS[1], ARGV[2 * #KEYS])
return n
";

/// Takes a fill lock (`SET NX PX`: 1 taken, 0 another instance has it) unless the call arrives
/// after its caller stopped waiting for the answer (ARGV[3]: that moment on Redis' clock, ms;
/// -1). A call held by a paused or stalled Redis and run when it resumes would otherwise take a
/// lock no instance holds — its caller timed out and filled without one — and every instance
/// would wait on it for `FILL_LOCK_TTL` after the fault had ended.
const TAKE: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[3]) then return -1 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
";

/// Releases a fill lock if this holder still has it (compare and delete), then announces it on
/// `FILLED` either way: waiters look for the entry, or take their turn.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// Extends a fill lock this holder still has.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// A fill lock's lifetime, extended every third of it while its fill runs: a holder that dies
/// (a killed instance) keeps the others waiting this long at most.
pub const FILL_LOCK_TTL: Duration = Duration::from_secs(3);

/// The `/`-terminated prefixes of `path`'s path part under which an entry is indexed.
fn index_prefixes(path: &str) -> Vec<&str> {
    let p = path.split('?').next().unwrap_or(path);
    p.match_indices('/').take(MAX_DEPTH).map(|(i, _)| &p[..=i]).collect()
}

/// The index prefix to read for a purge by prefix (or by exact path): its deepest indexed
/// ancestor. `None` when it cannot match a path at all.
fn lookup_prefix(prefix: &str) -> Option<&str> {
    if prefix.is_empty() {
        return Some("/");
    }
    let p = prefix.split('?').next().unwrap_or(prefix);
    index_prefixes(p).pop()
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Message {
    from: u64,
    purge: Purge,
}

#[derive(Debug)]
pub struct L2 {
    pub redis: Arc<Shared>,
    hash_key: [u8; 32],
    /// Keys the MAC appended to every stored value and invalidation message: a value or purge
    /// that anyone without the deployment secret wrote is ignored, not served or obeyed.
    mac_key: [u8; 32],
    buckets: u16,
    put_script: Script,
    purge_script: Script,
    take_script: Script,
    release_script: Script,
    extend_script: Script,
    pending: Mutex<Vec<Purge>>,
    /// Fills this instance waits for on another instance, by lock hash: woken by `FILLED`.
    waiting: Mutex<HashMap<String, tokio::sync::watch::Sender<()>>>,
}

/// One instance's turn to fill a key (`redis.fill_lock`): `SET NX PX` on
/// `weir:{B}:f:<hash of the key>` with a random token. Dropped, it is released — compare and
/// delete, so an expired lock another instance took since is left alone — and `FILLED`
/// announces it, whatever became of the fill (stored, not storable, failed, the client gone).
#[derive(Debug)]
pub struct FillLock {
    l2: Arc<L2>,
    name: String,
    token: String,
    /// The lock's hash in hex: what `FILLED` carries.
    hex: String,
}

impl FillLock {
    /// Extends the lock by `FILL_LOCK_TTL` (in the background: the fill goes on meanwhile).
    pub fn extend(&self) {
        let (l2, name, token) = (self.l2.clone(), self.name.clone(), self.token.clone());
        tokio::spawn(async move {
            let mut inv = l2.extend_script.prepare_invoke();
            inv.key(name).arg(token).arg(u64::try_from(FILL_LOCK_TTL.as_millis()).unwrap_or(3000));
            let _ = l2.redis.call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await }).await;
        });
    }
}

impl Drop for FillLock {
    fn drop(&mut self) {
        let l2 = self.l2.clone();
        let (name, token, hex) =
            (std::mem::take(&mut self.name), std::mem::take(&mut self.token), std::mem::take(&mut self.hex));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut inv = l2.release_script.prepare_invoke();
                inv.key(name).arg(token).arg(FILLED).arg(hex);
                if let Err(e) = l2.redis.call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await }).await {
                    // It expires by itself; waiters stop waiting then.
                    tracing::debug!(error = %e, "releasing a fill lock failed");
                }
            });
        }
    }
}

/// Waiting for another instance's fill of one key; dropped, it stops listening.
#[derive(Debug)]
pub struct FillWait {
    l2: Arc<L2>,
    hex: String,
    rx: tokio::sync::watch::Receiver<()>,
}

impl FillWait {
    /// Until the holder announces it is done, or `within` passes (its lock expires then).
    pub async fn done(&mut self, within: Duration) {
        let _ = tokio::time::timeout(within, self.rx.changed()).await;
    }
}

impl Drop for FillWait {
    fn drop(&mut self) {
        if let Ok(mut w) = self.l2.waiting.lock() {
            // The last one waiting for this lock here takes the entry along.
            if w.get(&self.hex).is_some_and(|tx| tx.receiver_count() <= 1) {
                w.remove(&self.hex);
            }
        }
    }
}

/// What `L2::fill_turn` found.
#[derive(Debug)]
pub enum Turn {
    /// This instance fills; the lock is released when dropped.
    Mine(FillLock),
    /// Another instance is filling: wait, then look again.
    Theirs(FillWait),
}

/// What a purge does in one bucket: (kind, value, Redis key).
type Ops = Vec<(&'static str, String, String)>;

impl L2 {
    pub fn new(redis: Arc<Shared>) -> L2 {
        // One bucket on a single server (hash tags mean nothing there); on a Cluster, enough
        // buckets to spread over every master.
        let buckets = if redis.settings.cluster { 64 } else { 1 };
        // Without `redis.key_secret_env` the keys derive from a public constant: names still carry
        // no request data, but they are predictable and the MAC only guards against corruption.
        let secret = redis.key_secret.clone().unwrap_or_else(|| "weir".to_string());
        L2 {
            hash_key: blake3::derive_key("weir 2026 L2 key names v1", secret.as_bytes()),
            mac_key: blake3::derive_key("weir 2026 L2 value MAC v1", secret.as_bytes()),
            buckets,
            put_script: Script::new(PUT),
            purge_script: Script::new(PURGE),
            take_script: Script::new(TAKE),
            release_script: Script::new(RELEASE),
            extend_script: Script::new(EXTEND),
            pending: Mutex::new(Vec::new()),
            waiting: Mutex::new(HashMap::new()),
            redis,
        }
    }

    fn hash(&self, domain: u8, s: &str) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.hash_key);
        h.update(&[domain]);
        h.update(s.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    fn mac(&self, payload: &[u8]) -> [u8; MAC_LEN] {
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&blake3::keyed_hash(&self.mac_key, payload).as_bytes()[..MAC_LEN]);
        out
    }

    /// The payload of an authenticated value, or `None` when its MAC does not verify.
    fn verified<'v>(&self, value: &'v [u8]) -> Option<&'v [u8]> {
        let at = value.len().checked_sub(MAC_LEN)?;
        let (payload, mac) = value.split_at(at);
        let want = self.mac(payload);
        bool::from(subtle::ConstantTimeEq::ct_eq(&want[..], mac)).then_some(payload)
    }

    fn bucket_of(&self, h: &[u8; 16]) -> u16 {
        u16::from_le_bytes([h[0], h[1]]) % self.buckets
    }

    fn name(b: u16, kind: &str, h: &[u8; 16]) -> String {
        format!("weir:{{{b}}}:{kind}:{}", crate::hex::encode(h))
    }

    fn error(e: CallError) -> CacheError {
        match e {
            CallError::Open | CallError::NotConnected => CacheError::Skipped { tier: "l2", reason: e.to_string() },
            _ => CacheError::Tier { tier: "l2", message: e.to_string() },
        }
    }

    /// The same operation in every bucket (tags and prefixes are indexed per bucket).
    fn in_every_bucket(per: &mut [Ops], kind: &'static str, value: &str, index: &str, h: &[u8; 16]) {
        for (b, ops) in per.iter_mut().enumerate() {
            let b = u16::try_from(b).unwrap_or(0);
            ops.push((kind, value.to_string(), Self::name(b, index, h)));
        }
    }

    async fn put_inner(&self, key: &str, obj: Object, since: SystemTime) -> Result<(), CacheError> {
        let Some(mut payload) = codec::encode(key, &obj) else { return Ok(()) };
        let mac = self.mac(&payload);
        payload.extend_from_slice(&mac);
        if u64::try_from(payload.len()).unwrap_or(u64::MAX) > self.redis.settings.max_object_bytes {
            return Ok(()); // L1 only
        }
        let left = u64::try_from(obj.remaining(SystemTime::now()).as_millis()).unwrap_or(u64::MAX);
        if left == 0 {
            return Ok(());
        }
        let h = self.hash(b'e', key);
        let b = self.bucket_of(&h);
        let mut tags: Vec<&str> = obj.tags().iter().map(String::as_str).collect();
        tags.sort_unstable();
        tags.dedup();
        let primary = super::key::primary_of(key);
        let since_ms = self.redis.redis_ms(since);
        let mut inv = self.put_script.prepare_invoke();
        inv.key(Self::name(b, "e", &h)).key(format!("weir:{{{b}}}:purges"));
        for t in &tags {
            inv.key(Self::name(b, "t", &self.hash(b't', t)));
        }
        // The exact-path set: a purge by URL (every write) reads only the entries of that URL.
        inv.key(Self::name(b, "x", &self.hash(b'x', obj.path())));
        for p in index_prefixes(obj.path()) {
            inv.key(Self::name(b, "p", &self.hash(b'p', p)));
        }
        inv.arg(payload)
            .arg(left)
            .arg(since_ms.saturating_sub(SKEW_MS))
            .arg(crate::hex::encode(&h))
            .arg(key)
            .arg(primary)
            .arg(obj.path())
            .arg(tags.len())
            .arg(PURGE_LOG_MS);
        for t in &tags {
            inv.arg(*t);
        }
        let stored: i64 =
            self.redis.call(|mut c| async move { inv.invoke_async(&mut c).await }).await.map_err(Self::error)?;
        if stored == 1 {
            Ok(())
        } else {
            tracing::debug!(key, since_ms, "L2 refused a store: a purge overtook its fetch");
            Err(CacheError::Overtaken)
        }
    }

    /// Takes the fill lock of `key` for `FILL_LOCK_TTL`, or finds another instance holding it
    /// (listening for its release before asking, so none is missed). `Err`: Redis is not usable
    /// now — fill without a lock, adding no wait.
    pub async fn fill_turn(self: &Arc<Self>, key: &str) -> Result<Turn, CacheError> {
        let h = self.hash(b'f', key);
        let name = Self::name(self.bucket_of(&h), "f", &h);
        let hex = crate::hex::encode(&h);
        let rx = {
            let mut w = self.waiting.lock().map_err(|_| CacheError::Poisoned)?;
            w.entry(hex.clone()).or_insert_with(|| tokio::sync::watch::channel(()).0).subscribe()
        };
        let wait = FillWait { l2: self.clone(), hex: hex.clone(), rx };
        let token = crate::hex::encode(&crate::random_u64().to_le_bytes());
        let ms = u64::try_from(FILL_LOCK_TTL.as_millis()).unwrap_or(3000);
        // The moment `call` stops waiting, on Redis' clock: a later arrival takes nothing.
        let late = self.redis.redis_ms(SystemTime::now() + self.redis.settings.op_timeout);
        let mut inv = self.take_script.prepare_invoke();
        inv.key(&name).arg(&token).arg(ms).arg(late);
        let taken: i64 =
            self.redis.call(|mut c| async move { inv.invoke_async(&mut c).await }).await.map_err(Self::error)?;
        Ok(match taken {
            1 => {
                drop(wait);
                Turn::Mine(FillLock { l2: self.clone(), name, token, hex })
            }
            0 => Turn::Theirs(wait),
            // Arrived after this call's own deadline (the clocks disagree more than measured):
            // nothing was taken, fill without a lock.
            _ => return Err(CacheError::Skipped { tier: "l2", reason: "fill lock request arrived late".into() }),
        })
    }

    /// A `FILLED` announcement: wakes this instance's waiter for that lock, if any.
    fn filled(&self, hex: &[u8]) {
        let Ok(hex) = std::str::from_utf8(hex) else { return };
        if let Ok(w) = self.waiting.lock() {
            if let Some(tx) = w.get(hex) {
                tx.send_replace(());
            }
        }
    }

    /// Groups a purge into per-bucket operations.
    fn plan(&self, p: &Purge) -> Vec<(u16, Ops)> {
        let mut per: Vec<Ops> = vec![Vec::new(); usize::from(self.buckets)];
        for k in &p.keys {
            if k.starts_with('/') {
                Self::in_every_bucket(&mut per, "u", k, "x", &self.hash(b'x', k));
            } else {
                let h = self.hash(b'e', k);
                let b = self.bucket_of(&h);
                per[usize::from(b)].push(("k", k.clone(), Self::name(b, "e", &h)));
            }
        }
        for t in &p.tags {
            Self::in_every_bucket(&mut per, "t", t, "t", &self.hash(b't', t));
        }
        for prefix in &p.prefixes {
            if let Some(q) = lookup_prefix(prefix) {
                Self::in_every_bucket(&mut per, "p", prefix, "p", &self.hash(b'p', q));
            }
        }
        per.into_iter()
            .enumerate()
            .filter(|(_, ops)| !ops.is_empty())
            .map(|(b, ops)| (u16::try_from(b).unwrap_or(0), ops))
            .collect()
    }

    async fn purge_redis(&self, p: &Purge) -> Result<u64, CacheError> {
        let calls = self.plan(p).into_iter().map(|(b, ops)| {
            let mut inv = self.purge_script.prepare_invoke();
            inv.key(format!("weir:{{{b}}}:purges")).arg(format!("weir:{{{b}}}:e:"));
            for (kind, value, key) in ops {
                inv.key(key).arg(kind).arg(value);
            }
            inv.arg(PURGE_LOG_MS);
            async move { self.redis.call(|mut c| async move { inv.invoke_async::<u64>(&mut c).await }).await }
        });
        let mut n = 0;
        for r in futures_util::future::join_all(calls).await {
            n += r.map_err(Self::error)?;
        }
        let body = serde_json::to_vec(&Message { from: self.redis.instance, purge: p.clone() })
            .map_err(|e| CacheError::Tier { tier: "l2", message: e.to_string() })?;
        let mut msg = body.clone();
        msg.extend_from_slice(&self.mac(&body));
        self.redis
            .call(|mut c| async move { redis::cmd("PUBLISH").arg(CHANNEL).arg(msg).query_async::<i64>(&mut c).await })
            .await
            .map_err(Self::error)?;
        Ok(n)
    }

    fn remember(&self, p: &Purge) {
        if let Ok(mut pending) = self.pending.lock() {
            if pending.len() < PENDING_MAX {
                pending.push(p.clone());
            } else {
                tracing::error!(?p, "too many purges waiting for Redis: this one is dropped for L2");
            }
        }
    }

    /// Replays purges that could not reach Redis; those that fail again stay queued.
    async fn replay_pending(&self) {
        let queued = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        if queued.is_empty() {
            return;
        }
        tracing::info!(purges = queued.len(), "replaying purges made while Redis was away");
        let (mut done, mut again) = (0, 0);
        for p in queued {
            if self.purge_redis(&p).await.is_ok() {
                done += 1;
            } else {
                again += 1;
                self.remember(&p);
            }
        }
        tracing::info!(done, still_queued = again, "queued purges replayed");
    }
}

impl Storage for L2 {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Object>, CacheError>> {
        Box::pin(async move {
            let h = self.hash(b'e', key);
            let name = Self::name(self.bucket_of(&h), "e", &h);
            let value: Option<Vec<u8>> = self
                .redis
                .call(|mut c| async move { redis::cmd("GET").arg(name).query_async(&mut c).await })
                .await
                .map_err(Self::error)?;
            match value {
                None => Ok(None),
                Some(v) => match self.verified(&v) {
                    Some(payload) => {
                        codec::decode(key, payload).map_err(|e| CacheError::Tier { tier: "l2", message: e.to_string() })
                    }
                    None => {
                        Err(CacheError::Tier { tier: "l2", message: "a value failed its MAC check: ignored".into() })
                    }
                },
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, obj: Object, since: SystemTime) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(self.put_inner(key, obj, since))
    }

    /// Removes from Redis and tells every instance. When Redis cannot be reached the purge is
    /// queued and replayed once it is back (the local L1 is purged by the caller either way).
    fn purge<'a>(&'a self, p: &'a Purge) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(async move {
            match self.purge_redis(p).await {
                Ok(n) => Ok(n),
                Err(e) => {
                    self.remember(p);
                    Err(e)
                }
            }
        })
    }

    fn stats(&self) -> StorageStats {
        StorageStats::default()
    }
}

/// Listens on the invalidation channel for as long as the cache lives: each message from
/// another instance purges this instance's L1. After any gap in the subscription (start-up
/// included) the whole L1 is dropped, since invalidations may have been missed, and purges
/// queued while Redis was away are replayed.
pub fn spawn_subscriber(cache: Weak<Cache>, l2: Arc<L2>) {
    // Purges queued while Redis was unusable go out once it is back, even when the subscription
    // itself never dropped (a stalled Redis, say).
    let replayer = Arc::downgrade(&l2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(l2) = replayer.upgrade() else { return };
            let waiting = l2.pending.lock().map(|p| !p.is_empty()).unwrap_or(false);
            if waiting && l2.redis.is_up() {
                l2.replay_pending().await;
            }
        }
    });
    tokio::spawn(async move {
        let mut announced_down = false;
        let mut node = 0usize;
        loop {
            if cache.strong_count() == 0 {
                return;
            }
            let clients = &l2.redis.pubsub_clients;
            let Some(client) = clients.get(node % clients.len().max(1)) else { return };
            let connected = tokio::time::timeout(Duration::from_secs(2), async {
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(CHANNEL).await?;
                ps.subscribe(FILLED).await?;
                Ok::<_, redis::RedisError>(ps)
            })
            .await;
            let ps = match connected {
                Ok(Ok(ps)) => ps,
                Ok(Err(e)) => {
                    if !announced_down {
                        tracing::warn!(error = %e, "invalidation channel unavailable; retrying");
                        announced_down = true;
                    }
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) => {
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let Some(c) = cache.upgrade() else { return };
            let dropped = c.clear_l1();
            l2.redis.subscribed.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(dropped, "invalidation channel subscribed; L1 cleared (missed invalidations)");
            announced_down = false;
            drop(c);
            l2.replay_pending().await;
            let mut stream = ps.into_on_message();
            while let Some(msg) = stream.next().await {
                let Some(c) = cache.upgrade() else { return };
                let Ok(payload) = msg.get_payload::<Vec<u8>>() else { continue };
                if msg.get_channel_name() == FILLED {
                    // Unauthenticated on purpose: a forged one only makes a waiter look again.
                    l2.filled(&payload);
                    continue;
                }
                let Some(payload) = l2.verified(&payload) else {
                    tracing::warn!("ignoring an invalidation message that failed its MAC check");
                    continue;
                };
                match serde_json::from_slice::<Message>(payload) {
                    Ok(m) if m.from == l2.redis.instance => {}
                    Ok(m) => {
                        if let Err(e) = c.purge_local(&m.purge).await {
                            tracing::warn!(error = %e, "applying a remote invalidation failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed invalidation message"),
                }
            }
            l2.redis.subscribed.store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("invalidation channel lost; reconnecting");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_prefixes_are_segment_prefixes_bounded_in_depth() {
        assert_eq!(index_prefixes("/a/b/c?x=/y"), vec!["/", "/a/", "/a/b/"]);
        assert_eq!(index_prefixes("/"), vec!["/"]);
        assert_eq!(index_prefixes("/1/2/3/4/5/6"), vec!["/", "/1/", "/1/2/", "/1/2/3/"]);
        assert_eq!(lookup_prefix("/a/b/c"), Some("/a/b/"));
        assert_eq!(lookup_prefix("/a/b/"), Some("/a/b/"));
        assert_eq!(lookup_prefix("/a/b?x"), Some("/a/"));
        assert_eq!(lookup_prefix(""), Some("/"));
        assert_eq!(lookup_prefix("products"), None);
        // A deep purge prefix reads the deepest indexed ancestor, which holds every match.
        assert_eq!(lookup_prefix("/1/2/3/4/5"), Some("/1/2/3/"));
    }
}
