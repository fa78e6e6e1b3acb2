//! Rate limits (phase 3): a route's `count: all` policies are checked and consumed together,
//! all or nothing — a request refused by one policy consumes nothing from the others.
//!
//! - **Distributed** (with `redis`): a Lua script does every policy of the route for that key
//!   atomically, on Redis' own clock (`TIME`, microseconds: exact in Lua's doubles), so there is
//!   no read-then-increment race between instances; checks that arrive while a call is in flight
//!   share the next one, each still decided on its own (`batch`). The policies' keys
//!   are `weir:{rl:<keyed hash of route and key>}:<policy>`: policies counting by the same key
//!   share a hash tag, so one call touches one Cluster slot (on a Cluster, policies counting by
//!   different keys are read in every slot first and consumed only if all admit: `check`); a
//!   fixed window's key does not depend on time (it stores `window:count`), and every key
//!   expires when its state no longer matters (nothing needs a sweeper).
//! - **Local** (embedded mode, and the `fail: local` fallback while Redis is away): the same
//!   arithmetic on this instance's clock, in a bounded map (`server.rate_limit_keys`; the
//!   `weir_ratelimit_keys` gauge). As a fallback it admits `rate / redis.instances`.
//!   `governor` was the first choice, but it checks each limiter on its own (no all-or-nothing
//!   across a route's policies) and has no hard cap on keys; one GCRA cell per policy in a moka
//!   map gives both.
//!
//! Keys: `client_ip` walks `X-Forwarded-For` right to left only when the peer is a trusted
//! proxy (the first address that is not one counts); IPv6 clients are grouped by /64. A
//! `header:NAME` key without that header falls back to the client address.

pub mod gcra;
mod policy;
mod tunnels;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use smallvec::SmallVec;

use self::gcra::Gcra;
pub use self::policy::{Algorithm, LimitFail, LimitKey, LimitOverride, Rate, RateLimit};
pub use self::tunnels::{TunnelRefusal, TunnelSlot, Tunnels};
use crate::redis::batch::{Batcher, Call};
use crate::redis::Shared;

/// Most keys the local limiter tracks at once by default (`server.rate_limit_keys`; a flood of
/// distinct keys evicts the least used).
pub const LOCAL_KEYS: u64 = 100_000;

/// Checks every policy (KEYS[i], ARGV[3i-2..3i] = kind, a, b) and consumes all or none; with
/// the last ARGV `0` it only reports (the admin read).
/// GCRA (`g`): a = interval µs, b = tolerance µs; the key holds the TAT. Fixed window (`w`):
/// a = window µs, b = quota; the key holds `window:count`. Returns `{admitted, then remaining,
/// reset µs, retry µs for each policy}`. Sent in batches (`crate::redis::batch`): a key is read
/// from Redis once a batch and written once at its end (`WRITE`); the calls in between see the
/// batch's own value (`LATER[key]`), so each is decided as if alone, and a hot key (one client's
/// many requests) costs one `GET` and one `SET` a batch instead of one of each a request.
const SCRIPT: &str = r"
local now = NOW
local commit = ARGV[#ARGV] == '1'
local ok = 1
local out = {0}
local sets = {}
for i = 1, #KEYS do
  local kind, a, b = ARGV[3 * i - 2], tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local e = LATER[KEYS[i]]
  if e == nil then
    e = {redis.call('GET', KEYS[i]), nil}
    LATER[KEYS[i]] = e
  end
  local v = e[1]
  local remaining, reset, retry = 0, 0, 0
  if kind == 'g' then
    local tat = tonumber(v or '0') or 0
    local start = math.max(tat, now)
    local horizon = now + b
    if start > horizon then
      ok = 0
      reset = tat - now
      retry = start - horizon
    else
      local nt = start + a
      if nt <= horizon then remaining = math.floor((horizon - nt) / a) + 1 end
      reset = nt - now
      sets[#sets + 1] = {KEYS[i], string.format('%.0f', nt), math.ceil(reset / 1000) + 1, #out + 1, a}
    end
  else
    local w = math.floor(now / a)
    local count = 0
    if v then
      local sw, sc = string.match(v, '^(%d+):(%d+)$')
      if sw and tonumber(sw) == w then count = tonumber(sc) end
    end
    reset = (w + 1) * a - now
    if count >= b then
      ok = 0
      retry = reset
    else
      remaining = b - count - 1
      sets[#sets + 1] = {KEYS[i], string.format('%.0f', w) .. ':' .. (count + 1), math.ceil(reset / 1000) + 1, #out + 1, 0}
    end
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
if ok == 1 and commit then
  for _, s in ipairs(sets) do
    local e = LATER[s[1]]
    if e[2] == nil then LATER[#LATER + 1] = s[1] end
    e[1], e[2] = s[2], s[3]
  end
else
  -- Refused (or only read): the policies that would have admitted report their state unconsumed.
  for _, s in ipairs(sets) do
    out[s[4]] = out[s[4]] + 1
    out[s[4] + 1] = out[s[4] + 1] - s[5]
  end
end
out[1] = ok
return out
";

/// After a batch: each key it changed, written once (its last value; that value's expiry is the
/// latest of the batch's, as a later state never expires sooner).
const WRITE: &str = r"
for _, k in ipairs(LATER) do
  local e = LATER[k]
  redis.call('SET', k, e[1], 'PX', e[2])
end
";

/// Who a request is, for the keys its policies count by: everything phases 1–3 found.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The route's name (every key is the route's own).
    pub route: &'a str,
    /// The client's address (the peer, or the first untrusted hop behind trusted proxies).
    pub client_ip: IpAddr,
    /// The peer's address as already formatted, when it is the client and IPv4 (no proxy).
    pub peer_text: Option<&'a str>,
    pub consumer: Option<&'a str>,
    /// The request's headers (`key: header:NAME`).
    pub headers: &'a http::HeaderMap,
    /// The consumer's own rates (`consumers[].limits`).
    pub own: Option<&'a [LimitOverride]>,
}

/// What a limit check decided.
#[derive(Debug)]
pub enum Decision {
    /// Admitted; the `RateLimit` / `RateLimit-Policy` fields for the response (empty when no
    /// policy asks for them).
    Allow { headers: Vec<(HeaderName, HeaderValue)> },
    /// Refused by `policy`: 429 with `Retry-After` and the refusing policy's fields.
    Reject { policy: String, retry_after_s: u64, headers: Vec<(HeaderName, HeaderValue)> },
    /// Redis is away and a policy says `fail: closed`.
    Unavailable,
}

/// A decision, and whether Redis was away so the policies' fail modes decided it.
#[derive(Debug)]
pub struct Verdict {
    pub decision: Decision,
    pub fell_back: bool,
}

/// Redis is away and the limit may not go on without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// One policy's state after a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyState {
    pub remaining: u64,
    /// Until the policy's quota is whole again.
    pub reset_us: u64,
    /// Refused by this policy: a retry this much later is admitted. Zero: it admitted.
    pub retry_us: u64,
}

#[derive(Debug)]
pub struct Limiter {
    /// Keyed by the length-prefixed (route, key, policy) bytes themselves (`fields`): exact, so
    /// no two keys ever share a cell, and looked up by reference (a key is allocated only when
    /// it is new). Hashed with foldhash, randomly seeded (an attacker cannot aim at one hash
    /// chain), not moka's SipHash.
    local: moka::sync::Cache<Vec<u8>, Arc<Mutex<[u64; 2]>>, foldhash::fast::RandomState>,
    redis: Option<Arc<Shared>>,
    script: redis::Script,
    /// Sends the Redis checks in batches; started by the first one (it needs the runtime).
    batcher: std::sync::OnceLock<Batcher>,
    hash_key: [u8; 32],
    instances: u64,
    /// The local limiter's clock (Redis uses its own `TIME`).
    clock: Arc<dyn Clock>,
    /// Tunnels open now (`server.max_tunnels`, `server.max_tunnels_per_address`).
    pub tunnels: Arc<Tunnels>,
}

impl Limiter {
    pub fn new(redis: Option<Arc<Shared>>, instances: u64, max_keys: u64) -> Limiter {
        Limiter::with_clock(redis, instances, max_keys, Arc::new(crate::clock::System))
    }

    /// A limiter whose local arithmetic reads `clock` (unit tests move it by hand).
    pub fn with_clock(redis: Option<Arc<Shared>>, instances: u64, max_keys: u64, clock: Arc<dyn Clock>) -> Limiter {
        // Names Redis keys only (local cells are keyed by their fields themselves). Instances on
        // one Redis must agree on them: the deployment secret, or (as the L2 does without one) a
        // public constant.
        let secret = redis.as_ref().and_then(|r| r.key_secret.as_deref()).unwrap_or("weir");
        let hash_key = blake3::derive_key("weir rate-limit keys", secret.as_bytes());
        Limiter {
            local: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(Duration::from_secs(86_400 * 31))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            redis,
            script: redis::Script::new(&crate::redis::batch::wrap(SCRIPT, WRITE)),
            batcher: std::sync::OnceLock::new(),
            hash_key,
            instances: instances.max(1),
            clock,
            tunnels: Arc::default(),
        }
    }

    /// One failed credential from `ip` (IPv6 by /64), counted in this instance against
    /// `server.auth_failures`: `Err(retry_after_us)` once the address is past it. Only failures
    /// are counted, so a valid credential from a shared address is never refused by this.
    pub fn auth_failure(&self, ip: IpAddr, gcra: &Gcra) -> Result<(), u64> {
        let now_us = self.clock.now_us();
        let addr = address_key(ip);
        let cell = self.local_cell("\u{0}auth", &addr, "failures");
        let mut c = cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match gcra.check(c[0], now_us) {
            gcra::Decision::Allow { tat, .. } => {
                c[0] = tat;
                Ok(())
            }
            gcra::Decision::Deny { retry_after_us } => Err(retry_after_us),
        }
    }

    /// Keys the local limiter tracks now (`weir_ratelimit_keys`).
    pub fn local_keys(&self) -> u64 {
        self.local.run_pending_tasks();
        self.local.entry_count()
    }

    /// Checks and consumes `policies` for `who`, all or nothing: the `count: all` policies in
    /// phase 3, the `count: misses` ones where a request leaves for the origin (phase 6). The
    /// consumer's own rates (`who.own`) replace the policies' of the same name.
    /// `fields`: the precomputed `RateLimit-Policy` values (`headers: true` ones, all).
    pub async fn admit(&self, policies: &[RateLimit], fields: &[Option<HeaderValue>; 2], who: &Subject<'_>) -> Verdict {
        if let Some(own) = overridden(who.own, policies) {
            let fields = [policy_header(&own, false), policy_header(&own, true)];
            return self.admit_policies(&own, &fields, who).await;
        }
        self.admit_policies(policies, fields, who).await
    }

    async fn admit_policies(
        &self,
        policies: &[RateLimit],
        policy_header: &[Option<HeaderValue>; 2],
        who: &Subject<'_>,
    ) -> Verdict {
        // Inline for the usual one to four policies: no allocation per request for the lists.
        let mut states: SmallVec<[PolicyState; 4]> =
            smallvec::smallvec![PolicyState { remaining: 0, reset_us: 0, retry_us: 0 }; policies.len()];
        let all: SmallVec<[usize; 4]> = (0..policies.len()).collect();
        let keys: SmallVec<[String; 4]> = policies.iter().map(|p| limit_key(who, &p.key)).collect();
        let q = Query { route: who.route, policies, keys: &keys };
        let mut fell_back = false;
        let decision = match self.check(q, &all, &mut states, true, &mut fell_back).await {
            Err(Unavailable) => Decision::Unavailable,
            Ok(false) => {
                let (i, retry) = states
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i, s.retry_us))
                    .max_by_key(|(_, r)| *r)
                    .unwrap_or((0, 1_000_000));
                // The refusing policy, with the wait until a retry is admitted.
                let headers =
                    [(&RATELIMIT_POLICY, policy_header[1].clone()), (&RATELIMIT, field(&policies[i].name, 0, retry))]
                        .into_iter()
                        .filter_map(|(k, v)| Some((k.clone(), v?)))
                        .collect();
                Decision::Reject {
                    policy: policies[i].name.clone(),
                    retry_after_s: retry.div_ceil(1_000_000).max(1),
                    headers,
                }
            }
            Ok(true) => Decision::Allow {
                headers: if policies.iter().any(|p| p.headers) {
                    headers(policies, &states, policy_header[0].as_ref())
                } else {
                    Vec::new()
                },
            },
        };
        Verdict { decision, fell_back }
    }

    /// A check of `idx` policies (Redis, else the local map); false: refused. One atomic call
    /// on one Redis, and on a Cluster when every policy counts by the same key (their Redis keys
    /// share its hash tag, hence a slot). On a Cluster, policies counting by different keys (one
    /// per consumer, one per address) live in different slots, which one script cannot touch:
    /// each key's policies are first read without consuming, and only if all would admit are
    /// they consumed, key by key — so a refused request consumes nothing unless another request
    /// took the last unit between the read and the consumption, and even then no policy ever
    /// admits more than it allows.
    async fn check(
        &self,
        q: Query<'_>,
        idx: &[usize],
        states: &mut [PolicyState],
        commit: bool,
        fell_back: &mut bool,
    ) -> Result<bool, Unavailable> {
        let cluster = self.redis.as_ref().is_some_and(|r| r.settings.cluster);
        if cluster && idx.windows(2).any(|w| q.keys[w[0]] != q.keys[w[1]]) {
            let mut groups: SmallVec<[SmallVec<[usize; 4]>; 4]> = SmallVec::new();
            for &i in idx {
                match groups.iter_mut().find(|g| q.keys[g[0]] == q.keys[i]) {
                    Some(g) => g.push(i),
                    None => groups.push(smallvec::smallvec![i]),
                }
            }
            let mut admitted = true;
            for g in &groups {
                admitted &= self.check_slot(q, false, g, states, fell_back).await?;
            }
            if !admitted || !commit {
                return Ok(admitted);
            }
            for g in &groups {
                if !self.check_slot(q, true, g, states, fell_back).await? {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        self.check_slot(q, commit, idx, states, fell_back).await
    }

    /// The Redis key of a policy's state for `key` on `route`: the hash tag `{rl:<id>}` is its
    /// Cluster slot, shared by every policy of the route counting by that key.
    fn redis_key(&self, route: &str, key: &str, policy: &str) -> String {
        format!("weir:{{rl:{}}}:{policy}", self.id_hex(route, key))
    }

    /// One atomic check of `idx` policies, which count by one key (or run on one Redis).
    async fn check_slot(
        &self,
        q: Query<'_>,
        commit: bool,
        idx: &[usize],
        states: &mut [PolicyState],
        fell_back: &mut bool,
    ) -> Result<bool, Unavailable> {
        let Query { policies, .. } = q;
        if let Some(redis) = &self.redis {
            let mut call = Call::default();
            for &i in idx {
                let p = &policies[i];
                let key = self.redis_key(q.route, &q.keys[i], &p.name);
                if redis.settings.cluster {
                    call.slot = crate::redis::batch::slot(&key);
                }
                call.key(key);
                match p.algorithm {
                    Algorithm::Gcra => call.arg("g").arg(p.gcra.interval_us).arg(p.gcra.tolerance_us),
                    Algorithm::FixedWindow => call.arg("w").arg(window_us(p)).arg(p.rate.count),
                };
            }
            call.arg(if commit { "1" } else { "0" });
            let batcher = self.batcher.get_or_init(|| Batcher::start(redis.clone(), self.script.clone()));
            match batcher.call(call).await {
                Ok(out) if out.len() == 1 + 3 * idx.len() => {
                    for (n, &i) in idx.iter().enumerate() {
                        let at = |k: usize| u64::try_from(out[1 + 3 * n + k]).unwrap_or(0);
                        states[i] = PolicyState { remaining: at(0), reset_us: at(1), retry_us: at(2) };
                    }
                    return Ok(out[0] == 1);
                }
                _ => {
                    *fell_back = true;
                    if idx.iter().any(|&i| policies[i].fail == LimitFail::Closed) {
                        return Err(Unavailable);
                    }
                    let local: Vec<usize> =
                        idx.iter().copied().filter(|&i| policies[i].fail == LimitFail::Local).collect();
                    return Ok(self.check_local(q, &local, states, self.instances, commit));
                }
            }
        }
        Ok(self.check_local(q, idx, states, 1, commit))
    }

    /// The same arithmetic on this instance's clock; `share` divides every rate (the fallback).
    fn check_local(&self, q: Query<'_>, idx: &[usize], states: &mut [PolicyState], share: u64, commit: bool) -> bool {
        let Query { route, policies, keys } = q;
        let now = self.clock.now_us();
        // Per admitting policy: its position in `idx` and the state it would store.
        let mut decided: SmallVec<[(usize, (u64, u64)); 4]> = SmallVec::new();
        let cells: SmallVec<[Arc<Mutex<[u64; 2]>>; 4]> =
            idx.iter().map(|&i| self.local_cell(route, &keys[i], &policies[i].name)).collect();
        let mut guards: SmallVec<[_; 4]> =
            cells.iter().map(|c| c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).collect();
        let mut ok = true;
        for (n, &i) in idx.iter().enumerate() {
            let p = &policies[i];
            let cell = &guards[n];
            match p.algorithm {
                Algorithm::Gcra => {
                    let g = shared_gcra(p, share);
                    match g.check(cell[0], now) {
                        gcra::Decision::Allow { tat, remaining } => {
                            states[i] = PolicyState { remaining, reset_us: tat - now, retry_us: 0 };
                            decided.push((n, (tat, 0)));
                        }
                        gcra::Decision::Deny { retry_after_us } => {
                            ok = false;
                            states[i] = PolicyState {
                                remaining: 0,
                                reset_us: cell[0].saturating_sub(now),
                                retry_us: retry_after_us,
                            };
                        }
                    }
                }
                Algorithm::FixedWindow => {
                    let w = window_us(p);
                    let quota = (p.rate.count / share).max(1);
                    let id = now / w;
                    let count = if cell[0] == id { cell[1] } else { 0 };
                    let reset = (id + 1) * w - now;
                    if count >= quota {
                        ok = false;
                        states[i] = PolicyState { remaining: 0, reset_us: reset, retry_us: reset };
                    } else {
                        states[i] = PolicyState { remaining: quota - count - 1, reset_us: reset, retry_us: 0 };
                        decided.push((n, (id, count + 1)));
                    }
                }
            }
        }
        for (n, (a, b)) in decided {
            if ok && commit {
                guards[n][0] = a;
                guards[n][1] = b;
            } else {
                // Refused (or only read): the policies that would have admitted report their
                // state unconsumed.
                let i = idx[n];
                states[i].remaining += 1;
                if policies[i].algorithm == Algorithm::Gcra {
                    states[i].reset_us =
                        states[i].reset_us.saturating_sub(shared_gcra(&policies[i], share).interval_us);
                }
            }
        }
        ok
    }

    /// `GET /ratelimits/{route}/{key}`: each policy's state for `key` (the address, header value,
    /// or anything for a `route` key), without consuming.
    pub async fn peek(
        &self,
        route: &str,
        policies: &[RateLimit],
        key: &AdminKey,
    ) -> Result<Vec<(String, PolicyState)>, Unavailable> {
        let keys: Vec<String> = policies.iter().map(|p| key.internal(&p.key)).collect();
        let mut states = vec![PolicyState { remaining: 0, reset_us: 0, retry_us: 0 }; policies.len()];
        let all: Vec<usize> = (0..policies.len()).collect();
        self.check(Query { route, policies, keys: &keys }, &all, &mut states, false, &mut false).await?;
        Ok(policies.iter().map(|p| p.name.clone()).zip(states).collect())
    }

    /// `DELETE /ratelimits/{route}/{key}`: forgets `key`'s state in every policy (Redis and
    /// here). Returns whether there was any to forget.
    pub async fn reset(&self, route: &str, policies: &[RateLimit], key: &AdminKey) -> Result<bool, Unavailable> {
        let mut names = Vec::new();
        let mut found = false;
        for p in policies {
            let k = key.internal(&p.key);
            found |= fields(route, &k, &p.name, |f| self.local.remove(f).is_some());
            names.push(self.redis_key(route, &k, &p.name));
        }
        if let Some(redis) = &self.redis {
            // One DEL per key: keys of different limit kinds may sit in different slots.
            for name in names {
                let n = redis
                    .call(|mut c| async move { redis::cmd("DEL").arg(name).query_async::<i64>(&mut c).await })
                    .await
                    .map_err(|_| Unavailable)?;
                found |= n > 0;
            }
        }
        Ok(found)
    }

    /// The local cell of a policy for a key on a route, created when new.
    fn local_cell(&self, route: &str, key: &str, policy: &str) -> Arc<Mutex<[u64; 2]>> {
        fields(route, key, policy, |f| self.local.get_with_by_ref(f, || Arc::new(Mutex::new([0, 0]))))
    }

    /// The keyed BLAKE3 of the fields (one call: many small `update`s cost several times as
    /// much): Redis key names carry no request data.
    fn id(&self, route: &str, key: &str, policy: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        fields(route, key, policy, |f| out.copy_from_slice(&blake3::keyed_hash(&self.hash_key, f).as_bytes()[..16]));
        out
    }

    fn id_hex(&self, route: &str, key: &str) -> String {
        crate::hex::encode(&self.id(route, key, ""))
    }
}

/// `f` of (route, key, policy) as length-prefixed fields in one buffer, gathered on the stack
/// when they fit (they nearly always do): unambiguous whatever the fields hold.
fn fields<R>(route: &str, key: &str, policy: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    let total = 24 + route.len() + key.len() + policy.len();
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let buf: &mut [u8] = match stack.get_mut(..total) {
        Some(b) => b,
        None => {
            heap.resize(total, 0);
            &mut heap
        }
    };
    let mut at = 0;
    for field in [route, key, policy] {
        buf[at..at + 8].copy_from_slice(&(field.len() as u64).to_le_bytes());
        buf[at + 8..at + 8 + field.len()].copy_from_slice(field.as_bytes());
        at += 8 + field.len();
    }
    f(buf)
}

/// What one check is about: a route's policies and, for each, the key it counts by.
#[derive(Clone, Copy)]
struct Query<'a> {
    route: &'a str,
    policies: &'a [RateLimit],
    keys: &'a [String],
}

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The route's policies with the consumer's own rates (`consumers[].limits`), when it has any
/// for these policies' names.
fn overridden(own: Option<&[LimitOverride]>, policies: &[RateLimit]) -> Option<Vec<RateLimit>> {
    let own = own?;
    if !policies.iter().any(|p| own.iter().any(|o| o.policy == p.name)) {
        return None;
    }
    Some(
        policies
            .iter()
            .map(|p| match own.iter().find(|o| o.policy == p.name) {
                Some(o) => RateLimit { rate: o.rate, burst: o.burst, gcra: o.gcra, ..p.clone() },
                None => p.clone(),
            })
            .collect(),
    )
}

/// `rate / share` for the local fallback (burst divided too, at least one).
fn shared_gcra(p: &RateLimit, share: u64) -> Gcra {
    if share <= 1 {
        return p.gcra;
    }
    let interval_us = p.gcra.interval_us.saturating_mul(share);
    let burst = (p.burst / share).max(1);
    Gcra { interval_us, tolerance_us: interval_us.saturating_mul(burst - 1) }
}

fn window_us(p: &RateLimit) -> u64 {
    u64::try_from(p.rate.per.as_micros()).unwrap_or(u64::MAX).max(1)
}

use crate::clock::Clock;

/// `RateLimit-Policy` for the policies with `headers: true`, and `RateLimit` for the one of them
/// closest to exhaustion
/// (draft-ietf-httpapi-ratelimit-headers-11, Structured Field lists). For GCRA the quota is the
/// burst and the window the time that burst takes to refill (`w = ceil(burst × interval)`), so
/// `r` never exceeds `q`.
fn headers(
    policies: &[RateLimit],
    states: &[PolicyState],
    policy: Option<&HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(2);
    if let Some(v) = policy {
        out.push((RATELIMIT_POLICY.clone(), v.clone()));
    }
    let closest = (0..policies.len()).filter(|&i| policies[i].headers).min_by_key(|&i| states[i].remaining);
    if let Some(i) = closest {
        if let Some(v) = field(&policies[i].name, states[i].remaining, states[i].reset_us) {
            out.push((RATELIMIT.clone(), v));
        }
    }
    out
}

/// `RateLimit-Policy` for a route's policies (all of them, or those with `headers: true`):
/// computed once per configuration, not per request.
pub fn policy_header(policies: &[RateLimit], all: bool) -> Option<HeaderValue> {
    let listed: Vec<String> = policies
        .iter()
        .filter(|p| all || p.headers)
        .map(|p| {
            let (q, w) = match p.algorithm {
                Algorithm::Gcra => (p.burst, (p.burst.saturating_mul(p.gcra.interval_us)).div_ceil(1_000_000)),
                Algorithm::FixedWindow => (p.rate.count, window_us(p).div_ceil(1_000_000)),
            };
            format!("\"{}\";q={q};w={}", p.name, w.max(1))
        })
        .collect();
    if listed.is_empty() {
        return None;
    }
    HeaderValue::from_str(&listed.join(", ")).ok()
}

fn field(name: &str, remaining: u64, reset_us: u64) -> Option<HeaderValue> {
    // `"name";r=N;t=S`, without `fmt` (it is on every limited answer).
    let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
    let (r, t) = (r.format(remaining), t.format(reset_us.div_ceil(1_000_000)));
    let mut v = Vec::with_capacity(name.len() + r.len() + t.len() + 8);
    v.push(b'"');
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(b"\";r=");
    v.extend_from_slice(r.as_bytes());
    v.extend_from_slice(b";t=");
    v.extend_from_slice(t.as_bytes());
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

/// A key named through the admin API (`/ratelimits/{route}/{key}?kind=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminKey {
    /// No `kind`: the key as each policy counts by its own kind (an address for `client_ip`, a
    /// consumer id, a header's value).
    Own(String),
    /// A client address: the bucket of `client_ip` policies, and the fallback bucket of
    /// `header:` and `consumer` policies for requests without the header or a consumer.
    Address(IpAddr),
    Consumer(String),
    /// A header's value by its SHA-256 (lower-case hex): how a `header:` policy keys it.
    HeaderSha256(String),
}

impl AdminKey {
    /// A header value, named by its digest (as `header:` policies keep it).
    pub fn header_value(value: &[u8]) -> AdminKey {
        AdminKey::HeaderSha256(header_digest(value))
    }

    /// The internal key it names under a policy of `kind`.
    fn internal(&self, kind: &LimitKey) -> String {
        match (self, kind) {
            (_, LimitKey::Route) => String::new(),
            (AdminKey::Own(k), LimitKey::ClientIp) => match k.parse::<IpAddr>() {
                Ok(ip) => format!("ip:{}", address_key(ip.to_canonical())),
                Err(_) => format!("ip:{k}"),
            },
            (AdminKey::Own(k), LimitKey::Header(_)) => header_key(k.as_bytes()),
            (AdminKey::Own(k) | AdminKey::Consumer(k), LimitKey::Consumer) => format!("c:{k}"),
            (AdminKey::Address(ip), _) => format!("ip:{}", address_key(ip.to_canonical())),
            (AdminKey::HeaderSha256(h), LimitKey::Header(_)) => format!("h:{h}"),
            // A kind the policy does not count by: a key no request has.
            (AdminKey::Consumer(_) | AdminKey::HeaderSha256(_), _) => "-".to_string(),
        }
    }
}

/// A header value as a limit key: its SHA-256, so the admin API can name it by digest (a raw
/// API key never sits in an admin URL or a log) and Redis never holds it.
fn header_key(value: &[u8]) -> String {
    let mut s = String::with_capacity(66);
    s.push_str("h:");
    s.push_str(&header_digest(value));
    s
}

/// SHA-256 of a header value, lower-case hex.
fn header_digest(value: &[u8]) -> String {
    use sha2::Digest as _;
    crate::hex::encode(&sha2::Sha256::digest(value))
}

/// What a policy counts by, for this request (built by hand: it is on every limited request).
fn limit_key(who: &Subject<'_>, key: &LimitKey) -> String {
    let prefixed = |prefix: &str, rest: &str| {
        let mut k = String::with_capacity(prefix.len() + rest.len());
        k.push_str(prefix);
        k.push_str(rest);
        k
    };
    match key {
        LimitKey::Route => return String::new(),
        LimitKey::Consumer => {
            if let Some(id) = who.consumer {
                return prefixed("c:", id);
            }
        }
        LimitKey::Header(h) => {
            if let Some(v) = who.headers.get(h) {
                return header_key(v.as_bytes());
            }
        }
        LimitKey::ClientIp => {}
    }
    // `client_ip`, and the others' fallback: the client's address — the peer's text, formatted
    // once per connection, when the peer is the client.
    match who.peer_text {
        Some(t) => prefixed("ip:", t),
        None => prefixed("ip:", &address_key(who.client_ip)),
    }
}

/// An address as a limit key: IPv4 whole, IPv6 by its /64 (one subscriber's prefix).
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(name: &str, rate: u64, per: u64, burst: u64, algorithm: Algorithm) -> RateLimit {
        RateLimit {
            name: name.into(),
            key: LimitKey::Route,
            rate: Rate { count: rate, per: Duration::from_secs(per) },
            burst,
            algorithm,
            gcra: Gcra::new(rate, Duration::from_secs(per), burst).unwrap(),
            fail: LimitFail::Local,
            headers: true,
            misses: false,
        }
    }

    #[test]
    fn a_request_refused_by_one_policy_consumes_nothing_from_the_others() {
        let l = Limiter::new(None, 1, LOCAL_KEYS);
        let ps =
            [policy("per-second", 1, 1, 2, Algorithm::Gcra), policy("daily", 100, 86_400, 100, Algorithm::FixedWindow)];
        let keys = [String::new(), String::new()];
        let mut st = [PolicyState { remaining: 0, reset_us: 0, retry_us: 0 }; 2];
        let admitted = (0..1000)
            .filter(|_| l.check_local(Query { route: "r", policies: &ps, keys: &keys }, &[0, 1], &mut st, 1, true))
            .count();
        assert_eq!(admitted, 2, "the burst of the tighter policy");
        assert_eq!(st[1].remaining, 98, "the daily quota only paid for the admitted ones");
    }

    #[test]
    fn the_fallback_admits_a_share_of_the_rate() {
        let l = Limiter::new(None, 1, LOCAL_KEYS);
        let ps = [policy("p", 10, 3600, 10, Algorithm::Gcra)];
        let mut st = [PolicyState { remaining: 0, reset_us: 0, retry_us: 0 }; 1];
        let admitted = (0..100)
            .filter(|_| {
                l.check_local(Query { route: "r", policies: &ps, keys: &[String::new()] }, &[0], &mut st, 5, true)
            })
            .count();
        assert_eq!(admitted, 2);
    }
}
