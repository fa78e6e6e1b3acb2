//! Spend budgets: exact decimal money per consumer and window, reserved before a call goes
//! upstream and settled when its answer is known.
//!
//! - **Money**: amounts are `rust_decimal` in configuration and on the wire; stores hold
//!   integers of micro-units (`UNIT` = 0.000001, DESIGN.md), so every sum is exact. Lua numbers
//!   are doubles, exact below 2^53: the largest amount is `MAX_AMOUNT` (9,007,199,254.740991) and
//!   validation refuses limits beyond it. A computed cost is rounded *up* to the unit.
//! - **Reserve, then settle** (one upstream function, phase 6). `reserve` is one Lua call that
//!   first drops expired leases, then admits only if `spent + reserved + amount <= limit`, and
//!   records a lease (amount, expiry on Redis' clock). `settle` is one Lua call, idempotent by
//!   the lease id (instance id + counter, never a client's header): it releases the lease and,
//!   when the upstream status is charged, adds the cost to the window and to its hourly and
//!   daily history buckets. A lease whose instance died expires and gives its money back.
//! - **Windows** are computed from this instance's clock (NTP-synced hosts agree; skew moves a
//!   call at a boundary into the neighbouring window, never counts it twice): fixed lengths from
//!   the epoch (`1h`, `1d`, `30d`) or the calendar month (UTC). A call is charged to the window,
//!   hour and day it was reserved in, so the series of a window add up to its total.
//! - **Keys**: `weir:{bg:<keyed hash of budget and consumer>}:...` — one hash tag per consumer
//!   and budget, so the window, its leases and its history share one Cluster slot.
//! - **Embedded mode** (no Redis): the same arithmetic in memory; spend is lost on restart
//!   (warned at start, said in `/health`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rust_decimal::Decimal;

use crate::redis::batch::{Batcher, Call, Failed};
use crate::redis::Shared;

/// Decimal places of the money unit (micro-units).
pub const SCALE: u32 = 6;
/// The largest integer Lua (a double) keeps exactly: 2^53 - 1 units.
pub const MAX_UNITS: i64 = (1 << 53) - 1;
/// `MAX_UNITS` as an amount.
pub const MAX_AMOUNT: &str = "9007199254.740991";
/// A lease's default lifetime (`budgets.NAME.lease_ttl`): a fixed cost settles at the response
/// head, so this only matters when an instance dies holding one.
pub const LEASE_TTL: Duration = Duration::from_secs(300);
/// History retention by default (`budgets.NAME.history`): hourly buckets 48 h, daily 35 days.
pub const HOURLY_TTL: Duration = Duration::from_secs(48 * 3600);
pub const DAILY_TTL: Duration = Duration::from_secs(35 * 86_400);
/// The consumer charged for calls no client asked for (background refreshes).
pub const SYSTEM: &str = "_system";

/// An amount with at most `SCALE` decimals as units; `None` beyond `MAX_UNITS` or below zero.
pub fn units_exact(d: Decimal) -> Option<i64> {
    units_ceil(d).filter(|_| d.normalize().scale() <= SCALE)
}

/// An amount as units, rounded up to the unit.
pub fn units_ceil(d: Decimal) -> Option<i64> {
    if d.is_sign_negative() {
        return None;
    }
    let scaled = (d * Decimal::from(1_000_000u32)).ceil();
    i64::try_from(scaled).ok().filter(|u| *u <= MAX_UNITS)
}

/// How long a window's Redis keys live, in seconds from `now`: until two days after its `end`
/// (a settlement may come after the end; the admin API reads recent windows).
fn window_ttl(end: i64, now: i64) -> i64 {
    (end - now).max(0) + 2 * 86_400
}

/// Units as an amount (`4.998`, `0`).
pub fn amount(units: i64) -> Decimal {
    Decimal::new(units, SCALE).normalize()
}

/// The window holding `now` (Unix seconds): `(start, end)`.
pub fn window(per: BudgetWindow, now: i64) -> (i64, i64) {
    let fixed = |len: i64| {
        let start = now.div_euclid(len) * len;
        (start, start + len)
    };
    match per {
        BudgetWindow::Hour => fixed(3600),
        BudgetWindow::Day => fixed(86_400),
        BudgetWindow::Days30 => fixed(30 * 86_400),
        BudgetWindow::Month => {
            let (y, m, _) = civil_from_days(now.div_euclid(86_400));
            let start = days_from_civil(y, m, 1) * 86_400;
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (start, days_from_civil(ny, nm, 1) * 86_400)
        }
    }
}

use crate::clock::{civil_from_days, days_from_civil, now_s};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Open,
    Closed,
}

/// A budget's window: fixed lengths from the epoch, or calendar months (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWindow {
    Hour,
    Day,
    Days30,
    Month,
}

/// A named budget (`budgets:`): a spend limit per consumer per window.
#[derive(Debug, Clone)]
pub struct BudgetDef {
    pub name: String,
    pub limit: Decimal,
    /// `limit` in money units (`crate::budget::UNIT`).
    pub limit_units: i64,
    /// `system_limit`: what `_system` may spend per window (default: `limit`).
    pub system_limit_units: Option<i64>,
    pub per: BudgetWindow,
    pub fail: FailMode,
    /// A reservation's lifetime: an instance killed mid-call gives the money back after it.
    pub lease_ttl: Duration,
    /// How long hourly and daily history buckets are kept.
    pub hourly_ttl: Duration,
    pub daily_ttl: Duration,
}

/// A route's use of a budget.
#[derive(Debug, Clone)]
pub struct RouteBudget {
    pub def: std::sync::Arc<BudgetDef>,
    /// What one call costs, in units, or `None`: the route plugin's `cost` hook decides from
    /// the response (`cost: plugin`).
    pub cost_units: Option<i64>,
    /// Held before forwarding (the cost, for a fixed cost).
    pub reserve_units: i64,
    /// One call never settles above this (`max_cost`; `None`: no cap).
    pub max_cost_units: Option<i64>,
    /// Upstream statuses that cost money, as inclusive ranges (`2xx` = 200..=299).
    pub charge_status: Vec<(u16, u16)>,
    /// `Weir-Budget-Remaining` on budgeted responses.
    pub headers: bool,
    /// Cache hits cost the fixed cost too (default: a hit costs nothing).
    pub charge_hits: bool,
}

impl RouteBudget {
    pub fn charges(&self, status: u16) -> bool {
        self.charge_status.iter().any(|(a, b)| (*a..=*b).contains(&status))
    }
}

/// A reservation held while a call is upstream.
#[derive(Debug, Clone)]
pub struct Lease {
    pub budget: Arc<BudgetDef>,
    pub consumer: String,
    pub id: String,
    pub units: i64,
    /// The window, hour and day it was taken in (its charge goes there).
    pub window: i64,
    pub hour: i64,
    pub day: i64,
    /// What was left after this reservation (for `Weir-Budget-Remaining`).
    pub remaining_units: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the limit: retry when the window resets (seconds).
    Exhausted { retry_after_s: u64 },
    /// The store (Redis) cannot be reached.
    Unavailable,
}

/// One window's figures and its history, for the admin API.
#[derive(Debug, Clone)]
pub struct Status {
    pub window: (i64, i64),
    pub spent: i64,
    pub reserved: i64,
    pub requests: i64,
    /// `(bucket start, spent, requests)`, oldest first.
    pub series: Vec<(i64, i64, i64)>,
}

/// The window hash's figures for this batch (`LATER[KEYS[1]]`, shared by RESERVE and SETTLE):
/// read once a batch, changed in memory by every call, written once at its end (`FINISH`), so
/// each call still sees what the calls before it did. On the first touch in a batch the
/// window's expired leases are released (on Redis' clock): once a batch, not once a call.
/// `{spent, reserved, requests, existed, changed, w = true, ttl}`: `ttl` (the window's end plus
/// two days, from the call) is set by `FINISH` when the batch writes a window that was not
/// there — created by a reservation, or recreated by a settlement after it expired.
const WINDOW: &str = r"
local function window(KEYS, now, ttl)
  local w = LATER[KEYS[1]]
  if w then return w end
  local f = redis.call('HMGET', KEYS[1], 's', 'r', 'n')
  w = {tonumber(f[1] or '0'), tonumber(f[2] or '0'), tonumber(f[3] or '0'), (f[1] or f[2] or f[3]) and true or false, false, w = true, ttl = ttl}
  LATER[KEYS[1]] = w
  LATER[#LATER + 1] = KEYS[1]
  local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  for _, id in ipairs(dead) do
    local a = redis.call('HGET', KEYS[2], id)
    if a then
      w[2] = w[2] - tonumber(a)
      w[5] = true
      redis.call('HDEL', KEYS[2], id)
    end
    redis.call('ZREM', KEYS[3], id)
  end
  return w
end
";

/// Checks reserve against the limit and records a lease (KEYS: window hash, lease amounts,
/// lease expiries; ARGV: limit, amount, lease id (empty: only read), lease TTL µs, key TTL s,
/// partial 0/1). Expired leases are released first (`window`). With `partial` (a cost the
/// plugin computes later) a call is admitted while anything is left, holding at most what is
/// left. Returns `{admitted, spent, reserved, requests, held}`.
/// `NOW` is Redis' clock in microseconds (read once per batch).
const RESERVE: &str = r"
local w = window(KEYS, NOW, ARGV[5])
local s, r, n = w[1], w[2], w[3]
if ARGV[3] == '' then return {1, s, r, n, 0} end
local amount = tonumber(ARGV[2])
local left = tonumber(ARGV[1]) - s - r
if ARGV[6] == '1' and left > 0 and amount > left then amount = left end
if amount > left then return {0, s, r, n, 0} end
w[2] = r + amount
w[5] = true
redis.call('HSET', KEYS[2], ARGV[3], amount)
redis.call('ZADD', KEYS[3], NOW + tonumber(ARGV[4]), ARGV[3])
-- The window's hash lives as long as its window (FINISH writes it, with its expiry when it
-- is new); the lease sets may have been emptied (and so deleted) since.
for i = 2, 3 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
return {1, s, r + amount, n, amount}
";

/// Settles a lease once (KEYS: window hash, lease amounts, lease expiries, hour bucket, day
/// bucket, done marker; ARGV: lease id, cost, charged 0/1, hour TTL s, day TTL s, marker TTL s,
/// window TTL s — set when the settlement recreates a window whose hash has expired, as a
/// call that crosses its window's end does).
/// Returns `{0}` when it was settled before. The hourly and daily history is added to once per
/// batch and bucket (`LATER`, `FINISH`): no decision reads it.
const SETTLE: &str = r"
if not redis.call('SET', KEYS[6], '1', 'NX', 'EX', ARGV[6]) then return {0} end
local w = window(KEYS, NOW, ARGV[7])
local a = redis.call('HGET', KEYS[2], ARGV[1])
if a then
  w[2] = w[2] - tonumber(a)
  w[5] = true
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if ARGV[3] == '1' then
  local c = tonumber(ARGV[2])
  w[1] = w[1] + c
  w[3] = w[3] + 1
  w[5] = true
  for j = 4, 5 do
    local e = LATER[KEYS[j]]
    if not e then
      e = {0, 0, ARGV[j]}
      LATER[KEYS[j]] = e
      LATER[#LATER + 1] = KEYS[j]
    end
    e[1] = e[1] + c
    e[2] = e[2] + 1
  end
end
return {1}
";

/// After a batch: each window it changed, written once (exact integers: `%.0f`), with its
/// expiry when this batch created it; each history bucket a settlement charged, added to once.
const FINISH: &str = r"
local function int(x) return string.format('%.0f', x) end
for _, k in ipairs(LATER) do
  local e = LATER[k]
  if e.w then
    if e[5] then
      redis.call('HSET', k, 's', int(e[1]), 'r', int(e[2]), 'n', int(e[3]))
      -- A window that was not there (new, or expired under a call crossing its end): no
      -- budget key lives for ever.
      if not e[4] then redis.call('EXPIRE', k, e.ttl) end
    end
  else
    redis.call('HINCRBY', k, 's', e[1])
    redis.call('HINCRBY', k, 'n', e[2])
    redis.call('EXPIRE', k, e[3])
  end
end
";

/// Reservations (`ARGV[1]` `r`) and settlements (`s`) as one script, so they go out in batches
/// of one queue (`crate::redis::batch`): a release queued after the reservation it releases
/// runs after it.
fn calls_script() -> String {
    crate::redis::batch::wrap(
        &format!(
            "{WINDOW}\nlocal function reserve(KEYS, ARGV)\n{RESERVE}\nend\nlocal function settle(KEYS, ARGV)\n{SETTLE}\nend\n\
             local rest = {{}}\nfor i = 2, #ARGV do rest[i - 1] = ARGV[i] end\n\
             if ARGV[1] == 'r' then return reserve(KEYS, rest) end\nreturn settle(KEYS, rest)"
        ),
        FINISH,
    )
}

/// Extends a lease that is still held (KEYS: lease expiries; ARGV: lease id, TTL µs), on
/// Redis' clock: a long stream keeps its reservation without being charged twice.
const RENEW: &str = r"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
";

#[derive(Debug, Default)]
struct LocalWindow {
    spent: i64,
    requests: i64,
    /// Lease id -> (units, expiry as Unix seconds).
    leases: BTreeMap<String, (i64, i64)>,
}

impl LocalWindow {
    fn reserved(&mut self, now: i64) -> i64 {
        self.leases.retain(|_, (_, exp)| *exp > now);
        self.leases.values().map(|(u, _)| u).sum()
    }
}

/// Embedded mode's store: windows and history buckets by (budget, consumer, start).
#[derive(Debug, Default)]
struct Local {
    windows: BTreeMap<(String, String, i64), LocalWindow>,
    /// (budget, consumer, 'h' | 'd', start) -> (spent, requests)
    history: BTreeMap<(String, String, char, i64), (i64, i64)>,
}

#[derive(Debug)]
pub struct Budgets {
    redis: Option<Arc<Shared>>,
    /// Reservations and settlements (and the admin read of a window: a reservation of
    /// nothing), batched (`calls_script`); the batcher starts with the
    /// first call (it needs the runtime).
    calls_script: redis::Script,
    batcher: std::sync::OnceLock<Batcher>,
    renew_script: redis::Script,
    hash_key: [u8; 32],
    instance: u64,
    counter: AtomicU64,
    local: Mutex<Local>,
    /// Reservations whose script may have run though its answer never came (Redis stalled past
    /// `op_timeout`, the connection broke): released by the caller (`take_unanswered`) instead
    /// of holding the consumer's money until `lease_ttl`.
    unanswered: Mutex<Vec<Lease>>,
    has_unanswered: std::sync::atomic::AtomicBool,
}

/// A reservation sent to Redis and not yet answered. Dropped armed — the answer never came, or
/// the caller went away while waiting (a client that hung up) — it queues the lease for release.
struct Unanswered<'a> {
    budgets: &'a Budgets,
    lease: Option<Lease>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            self.budgets.unanswered.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(l);
            self.budgets.has_unanswered.store(true, Ordering::Release);
        }
    }
}

impl Budgets {
    pub fn new(redis: Option<Arc<Shared>>) -> Budgets {
        // Instances on one Redis agree on key names: the deployment secret, else a constant.
        let secret = redis.as_ref().and_then(|r| r.key_secret.as_deref()).unwrap_or("weir");
        let hash_key = blake3::derive_key("weir budget keys", secret.as_bytes());
        Budgets {
            redis,
            calls_script: redis::Script::new(&calls_script()),
            batcher: std::sync::OnceLock::new(),
            renew_script: redis::Script::new(RENEW),
            hash_key,
            instance: crate::random_u64(),
            counter: AtomicU64::new(0),
            local: Mutex::new(Local::default()),
            unanswered: Mutex::new(Vec::new()),
            has_unanswered: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn embedded(&self) -> bool {
        self.redis.is_none()
    }

    fn tag(&self, budget: &str, consumer: &str) -> String {
        let mut buf = Vec::with_capacity(16 + budget.len() + consumer.len());
        for f in [budget, consumer] {
            buf.extend_from_slice(&(f.len() as u64).to_le_bytes());
            buf.extend_from_slice(f.as_bytes());
        }
        let h = blake3::keyed_hash(&self.hash_key, &buf);
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.as_bytes()[..16]);
        format!("weir:{{bg:{}}}", crate::hex::encode(&id))
    }

    /// A batched call of kind `op` (`r`, `s`) on the keys of `tag` (one Cluster slot).
    fn call(&self, redis: &Shared, tag: &str, op: &'static str) -> Call {
        let mut call = Call::default();
        if redis.settings.cluster {
            // `weir:{bg:…}`: every key of the call carries that hash tag.
            call.slot = crate::redis::batch::slot(tag);
        }
        call.arg(op);
        call
    }

    fn batcher(&self, redis: &Arc<Shared>) -> &Batcher {
        self.batcher.get_or_init(|| Batcher::start(redis.clone(), self.calls_script.clone()))
    }

    fn window_keys(&self, tag: &str, window: i64) -> [String; 3] {
        [format!("{tag}:w:{window}"), format!("{tag}:la:{window}"), format!("{tag}:lz:{window}")]
    }

    /// Holds `units` against `def`'s limit for `consumer` in the current window; with
    /// `partial`, at most what is left (while anything is).
    pub async fn reserve(
        &self,
        def: &Arc<BudgetDef>,
        limit_units: i64,
        consumer: &str,
        units: i64,
        partial: bool,
    ) -> Result<Lease, Refusal> {
        let now = now_s();
        let (window, end) = window(def.per, now);
        let id = format!("{:016x}-{}", self.instance, self.counter.fetch_add(1, Ordering::Relaxed));
        let retry = Refusal::Exhausted { retry_after_s: u64::try_from(end - now).unwrap_or(1).max(1) };
        let lease = |spent: i64, reserved: i64, units: i64| Lease {
            budget: def.clone(),
            consumer: consumer.to_string(),
            id: id.clone(),
            units,
            window,
            hour: now.div_euclid(3600) * 3600,
            day: now.div_euclid(86_400) * 86_400,
            remaining_units: (limit_units - spent - reserved).max(0),
        };
        let Some(redis) = &self.redis else {
            let mut local = self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (def.name.clone(), consumer.to_string(), window);
            if !local.windows.contains_key(&key) {
                // A new window: the ones that ended hold nothing a reservation can use (pruned
                // here, once per window and consumer, not on every call).
                local.windows.retain(|(_, _, start), _| *start >= window - 40 * 86_400);
            }
            let w = local.windows.entry(key).or_default();
            let reserved = w.reserved(now);
            let left = limit_units - w.spent - reserved;
            let units = if partial && left > 0 { units.min(left) } else { units };
            if units > left {
                return Err(retry);
            }
            let expiry = now + i64::try_from(def.lease_ttl.as_secs()).unwrap_or(300);
            w.leases.insert(id.clone(), (units, expiry));
            return Ok(lease(w.spent, reserved + units, units));
        };
        let tag = self.tag(&def.name, consumer);
        let mut call = self.call(redis, &tag, "r");
        for k in self.window_keys(&tag, window) {
            call.key(k);
        }
        let ttl_us = u64::try_from(def.lease_ttl.as_micros()).unwrap_or(u64::MAX);
        call.arg(limit_units).arg(units).arg(id.clone()).arg(ttl_us).arg(window_ttl(end, now));
        call.arg(if partial { "1" } else { "0" });
        let mut pending = Unanswered { budgets: self, lease: Some(lease(0, 0, units)) };
        let answer = self.batcher(redis).call(call).await;
        if answer != Err(Failed::Sent) {
            // Answered, or never sent (breaker open, not connected): nothing to release.
            pending.lease = None;
        }
        match answer {
            Ok(v) if v.len() == 5 && v[0] == 1 => Ok(lease(v[1], v[2], v[4])),
            Ok(v) if v.len() == 5 => Err(retry),
            Ok(_) => Err(Refusal::Unavailable),
            Err(e) => {
                tracing::debug!(error = ?e, budget = %def.name, "budget reservation without Redis");
                Err(Refusal::Unavailable)
            }
        }
    }

    /// Whether reservations wait to be released (one atomic load: the common answer is no).
    pub fn has_unanswered(&self) -> bool {
        self.has_unanswered.load(Ordering::Acquire)
    }

    /// Reservations that were sent but never answered, to be released.
    pub fn take_unanswered(&self) -> Vec<Lease> {
        let mut q = self.unanswered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.has_unanswered.store(false, Ordering::Release);
        std::mem::take(&mut *q)
    }

    /// Settles `lease`: releases it and, when `charged`, adds `units` to its window and history.
    /// Answers whether Redis took the settlement (always, in embedded mode). The script is
    /// idempotent by lease id, so a caller retries one that was not taken.
    pub async fn settle(&self, lease: &Lease, units: i64, charged: bool) -> bool {
        let Some(redis) = &self.redis else {
            // In process each lease is settled once by construction (its one caller); a lease
            // that expired meanwhile is still charged, as in Redis.
            let mut local = self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (b, c) = (lease.budget.name.clone(), lease.consumer.clone());
            if let Some(w) = local.windows.get_mut(&(b.clone(), c.clone(), lease.window)) {
                w.leases.remove(&lease.id);
                if charged {
                    w.spent += units;
                    w.requests += 1;
                }
            }
            if charged {
                for (kind, start) in [('h', lease.hour), ('d', lease.day)] {
                    let key = (b.clone(), c.clone(), kind, start);
                    if !local.history.contains_key(&key) {
                        // A new bucket (once an hour per consumer): drop the expired ones.
                        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                        let now = now_s();
                        let (hourly, daily) = (now - secs(lease.budget.hourly_ttl), now - secs(lease.budget.daily_ttl));
                        local.history.retain(|(budget, _, k, s), _| {
                            *budget != lease.budget.name || *s >= if *k == 'h' { hourly } else { daily }
                        });
                    }
                    let e = local.history.entry(key).or_default();
                    e.0 += units;
                    e.1 += 1;
                }
            }
            return true;
        };
        let tag = self.tag(&lease.budget.name, &lease.consumer);
        let mut call = self.call(redis, &tag, "s");
        for k in self.window_keys(&tag, lease.window) {
            call.key(k);
        }
        call.key(format!("{tag}:h:{}", lease.hour)).key(format!("{tag}:d:{}", lease.day));
        call.key(format!("{tag}:done:{}", lease.id));
        call.arg(lease.id.clone()).arg(units).arg(if charged { "1" } else { "0" });
        let (_, end) = window(lease.budget.per, lease.window);
        call.arg(lease.budget.hourly_ttl.as_secs())
            .arg(lease.budget.daily_ttl.as_secs())
            .arg(lease.budget.lease_ttl.as_secs().max(60) * 2)
            .arg(window_ttl(end, now_s()));
        match self.batcher(redis).call(call).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = ?e, budget = %lease.budget.name, "budget settlement not taken; retrying");
                false
            }
        }
    }

    /// Extends `lease` by its budget's `lease_ttl` while its call is still streaming.
    pub async fn renew(&self, lease: &Lease) {
        let ttl = lease.budget.lease_ttl;
        let Some(redis) = &self.redis else {
            let mut local = self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (lease.budget.name.clone(), lease.consumer.clone(), lease.window);
            if let Some((_, exp)) = local.windows.get_mut(&key).and_then(|w| w.leases.get_mut(&lease.id)) {
                *exp = now_s() + i64::try_from(ttl.as_secs()).unwrap_or(300);
            }
            return;
        };
        let lz = self.window_keys(&self.tag(&lease.budget.name, &lease.consumer), lease.window)[2].clone();
        let mut inv = self.renew_script.prepare_invoke();
        inv.key(lz).arg(&lease.id).arg(u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX));
        if let Err(e) = redis.call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await }).await {
            tracing::debug!(error = ?e, "budget lease renewal failed");
        }
    }

    /// The current window and the history buckets (`by_hour`, else daily) from `from` to `to`.
    pub async fn status(
        &self,
        def: &Arc<BudgetDef>,
        consumer: &str,
        from: i64,
        to: i64,
        by_hour: bool,
    ) -> Result<Status, Refusal> {
        let now = now_s();
        let win = window(def.per, now);
        let step = if by_hour { 3600 } else { 86_400 };
        let retention = i64::try_from(if by_hour { def.hourly_ttl } else { def.daily_ttl }.as_secs()).unwrap_or(0);
        let first = from.max(now - retention).div_euclid(step) * step;
        let starts: Vec<i64> = (0..).map(|i| first + i * step).take_while(|s| *s <= to).take(1000).collect();
        let kind = if by_hour { 'h' } else { 'd' };
        let Some(redis) = &self.redis else {
            let mut local = self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (spent, reserved, requests) =
                match local.windows.get_mut(&(def.name.clone(), consumer.to_string(), win.0)) {
                    Some(w) => {
                        let r = w.reserved(now);
                        (w.spent, r, w.requests)
                    }
                    None => (0, 0, 0),
                };
            let series = starts
                .iter()
                .map(|s| {
                    let (sp, n) = local
                        .history
                        .get(&(def.name.clone(), consumer.to_string(), kind, *s))
                        .copied()
                        .unwrap_or((0, 0));
                    (*s, sp, n)
                })
                .collect();
            return Ok(Status { window: win, spent, reserved, requests, series });
        };
        let tag = self.tag(&def.name, consumer);
        // A reservation without a lease id only reads (after releasing expired leases).
        let mut call = self.call(redis, &tag, "r");
        for k in self.window_keys(&tag, win.0) {
            call.key(k);
        }
        // (The window's TTL too: a read that releases expired leases writes the window.)
        call.arg(def.limit_units).arg(0i64).arg("").arg(0i64).arg(window_ttl(win.1, now)).arg("0");
        let head = self.batcher(redis).call(call).await.map_err(|_| Refusal::Unavailable)?;
        let mut pipe = redis::pipe();
        for s in &starts {
            pipe.cmd("HMGET").arg(format!("{tag}:{kind}:{s}")).arg("s").arg("n");
        }
        let buckets: Vec<(Option<i64>, Option<i64>)> = if starts.is_empty() {
            Vec::new()
        } else {
            redis.call(|mut c| async move { pipe.query_async(&mut c).await }).await.map_err(|_| Refusal::Unavailable)?
        };
        let series = starts.iter().zip(buckets).map(|(s, (sp, n))| (*s, sp.unwrap_or(0), n.unwrap_or(0))).collect();
        let at = |i: usize| head.get(i).copied().unwrap_or(0);
        Ok(Status { window: win, spent: at(1), reserved: at(2), requests: at(3), series })
    }

    /// Forgets the current window's spend (leases in flight stay held).
    pub async fn reset(&self, def: &Arc<BudgetDef>, consumer: &str) -> Result<(), Refusal> {
        let win = window(def.per, now_s()).0;
        let Some(redis) = &self.redis else {
            let mut local = self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(w) = local.windows.get_mut(&(def.name.clone(), consumer.to_string(), win)) {
                w.spent = 0;
                w.requests = 0;
            }
            return Ok(());
        };
        let key = self.window_keys(&self.tag(&def.name, consumer), win)[0].clone();
        redis
            .call(|mut c| async move { redis::cmd("HDEL").arg(key).arg("s").arg("n").query_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
            .map_err(|_| Refusal::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::str::FromStr;

    #[test]
    fn units_are_exact_and_computed_costs_round_up() {
        assert_eq!(units_exact(Decimal::from_str("7.500").unwrap()), Some(7_500_000));
        assert_eq!(units_exact(Decimal::from_str("0.000001").unwrap()), Some(1));
        assert_eq!(units_exact(Decimal::from_str("0.0000001").unwrap()), None, "finer than the unit");
        assert_eq!(units_exact(Decimal::from_str(MAX_AMOUNT).unwrap()), Some(MAX_UNITS));
        assert_eq!(units_exact(Decimal::from_str("9007199254.740992").unwrap()), None, "2^53 is not exact");
        // 0.00000015 per token: 3 tokens cost 0.00000045, charged as one unit; 1000 exactly 150.
        let per_token = Decimal::from_str("0.00000015").unwrap();
        assert_eq!(units_ceil(per_token * Decimal::from(3)), Some(1));
        assert_eq!(units_ceil(per_token * Decimal::from(1000)), Some(150));
        assert_eq!(units_ceil(Decimal::from_str("-1").unwrap()), None);
        assert_eq!(amount(4_998_000).to_string(), "4.998");
        assert_eq!(amount(0).to_string(), "0");
    }

    #[test]
    fn windows_are_fixed_lengths_or_calendar_months() {
        let t = days_from_civil(2026, 12, 2) * 86_400 + 13 * 3600 + 5 * 60;
        assert_eq!(window(BudgetWindow::Hour, t), (t - 5 * 60, t - 5 * 60 + 3600));
        assert_eq!(window(BudgetWindow::Day, t).0, days_from_civil(2026, 12, 2) * 86_400);
        let (s, e) = window(BudgetWindow::Month, t);
        assert_eq!((s, e), (days_from_civil(2026, 12, 1) * 86_400, days_from_civil(2027, 1, 1) * 86_400));
        // February of a leap year, and the last second of a month.
        let feb = days_from_civil(2028, 2, 29) * 86_400;
        assert_eq!(window(BudgetWindow::Month, feb).1, days_from_civil(2028, 3, 1) * 86_400);
        assert_eq!(window(BudgetWindow::Month, s - 1).1, s);
        for z in [-1000, 0, 19_000, 20_424, 100_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }
}
