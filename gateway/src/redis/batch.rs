//! Script calls, batched: calls that arrive while a round is in flight join the next round, so
//! one `EVALSHA` carries many (rate-limit checks, budget reservations and settlements: each was
//! one round trip per request, and Redis' per-call cost was most of what a limited or budgeted
//! request cost; see `bench/RESULTS.md`).
//!
//! A batched script is the single-call script as a function `one(KEYS, ARGV)` returning a table,
//! run once per call in the batch, in order (`wrap`): each call is decided on its own exactly as
//! if it had been sent alone at that point, atomically with the rest of the batch. On a Cluster a
//! script touches one slot: a batch holds the calls of one slot (each call's keys share a hash
//! tag), and one round sends one batch per slot, together.
//!
//! Order is kept per slot: a call queued after another runs after it (a budget's release of a
//! lease whose reservation never answered runs after that reservation, never before it): rounds
//! leave in order on the one connection to the slot's node, and Redis runs them in order. One
//! task per batcher sends the rounds, up to two at once; a call whose caller went away while it
//! waited still runs, as it would have once sent.

use std::sync::Arc;

use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};

use super::{CallError, Shared};

/// The most calls one script call carries (a bound on the script's run time and its answer).
const MAX_BATCH: usize = 128;
/// The most slots one round sends to.
const MAX_SLOTS: usize = 64;
/// Rounds out at once. With one, a call that arrives just after a round left waits for it and
/// then for its own; with two, it goes out at once, behind it on the same connection (Redis
/// runs them in order, so order per slot holds).
const DEPTH: usize = 2;

/// `one` (a Lua function body over `KEYS`, `ARGV`, `NOW` and `LATER`, returning a table of
/// integers) run for each call of a batch, then `finish` once. `NOW`: Redis' clock (`TIME`) in
/// microseconds, read once per batch (the calls of a batch are decided at one instant, in
/// order). `LATER`: a table the calls leave work in for `finish` (writes that no decision in the
/// batch reads, done once for all). `ARGV[1]`: how many runs; then per run its key count, its
/// argument count, how many calls it stands for, and its arguments; `KEYS`: every run's keys,
/// in order. A run is one call, or several identical ones that were queued one after the other
/// (one client's requests to one route, say): sent once, decided once per call, in order, so
/// each is decided exactly as if it had been sent on its own. `one` must not change its `KEYS`
/// and `ARGV` tables (a run's calls share them). Answers, per call, the length of its table,
/// then the table — packed by Redis' `cmsgpack` as one MessagePack array in one bulk string:
/// the client parses one value instead of an array of integers (redis-rs' parser cost ~850
/// instructions an element, most of a limit check's answer), and Redis formats no integers
/// (MessagePack integers are exact; an integral Lua number is packed as one).
pub fn wrap(one: &str, finish: &str) -> String {
    format!(
        r"local function one(KEYS, ARGV, NOW, LATER)
{one}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local later = {{}}
local out = {{}}
local ki, ai = 1, 2
for _ = 1, tonumber(ARGV[1]) do
  local nk, na, calls = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
  ai = ai + 3
  local k, a = {{}}, {{}}
  for i = 1, nk do k[i] = KEYS[ki + i - 1] end
  for i = 1, na do a[i] = ARGV[ai + i - 1] end
  ki, ai = ki + nk, ai + na
  for _ = 1, calls do
    local r = one(k, a, now, later)
    out[#out + 1] = #r
    for i = 1, #r do out[#out + 1] = r[i] end
  end
end
local LATER = later
{finish}
return cmsgpack.pack(out)
"
    )
}

/// One argument of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Int(i64),
    Str(&'static str),
    Owned(String),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::Int(v)
    }
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<&'static str> for Arg {
    fn from(v: &'static str) -> Arg {
        Arg::Str(v)
    }
}

impl From<String> for Arg {
    fn from(v: String) -> Arg {
        Arg::Owned(v)
    }
}

/// Why a call got no answer. `Sent`: the batch went out and its answer did not come back (a
/// timeout, a broken connection, an error reply): the call may have run. `NotSent`: it did not
/// (the breaker is open, no connection, the batcher is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    Sent,
    NotSent,
}

type Answer = Result<Vec<i64>, Failed>;

/// One script call: its slot (0 for a single Redis), keys and arguments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Call {
    pub slot: u16,
    pub keys: SmallVec<[String; 6]>,
    pub args: SmallVec<[Arg; 8]>,
}

impl Call {
    pub fn key(&mut self, k: String) -> &mut Self {
        self.keys.push(k);
        self
    }

    pub fn arg(&mut self, a: impl Into<Arg>) -> &mut Self {
        self.args.push(a.into());
        self
    }
}

struct Job {
    call: Call,
    reply: oneshot::Sender<Answer>,
}

/// The sending side of one batched script.
#[derive(Debug)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Job>,
}

impl Batcher {
    /// Starts the task that sends `script` (made by `wrap`) in batches. Needs the runtime.
    pub fn start(redis: Arc<Shared>, script: redis::Script) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(redis, script, rx));
        Batcher { tx }
    }

    /// Runs `call` with the next round: its table, or why there is none.
    pub async fn call(&self, call: Call) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job { call, reply }).map_err(|_| Failed::NotSent)?;
        answer.await.unwrap_or(Err(Failed::NotSent))
    }
}

/// The Cluster slot of `key`, as Redis computes it: CRC16 (XMODEM) of its hash tag (what lies
/// between the first `{` and the next `}`, when that is not empty), else of the whole key.
pub fn slot(key: &str) -> u16 {
    let tagged = key
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty());
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key).as_bytes()) % 16384
}

/// Takes what is queued (up to `MAX_BATCH` a slot) as a round: one script call per slot, sent
/// together. Up to `DEPTH` rounds are out at once; what queues meanwhile is the next round.
async fn run(redis: Arc<Shared>, script: redis::Script, mut rx: mpsc::UnboundedReceiver<Job>) {
    use futures_util::StreamExt;
    let mut rounds = futures_util::stream::FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(()) = rounds.next(), if !rounds.is_empty() => {}
            job = rx.recv(), if open && rounds.len() < DEPTH => match job {
                Some(first) => rounds.push(round(&redis, &script, gather(first, &mut rx))),
                None => open = false,
            },
            else => return,
        }
    }
}

/// `first` and what else is queued, in groups of one slot, in order.
fn gather(first: Job, rx: &mut mpsc::UnboundedReceiver<Job>) -> SmallVec<[Vec<Job>; 1]> {
    let mut groups: SmallVec<[Vec<Job>; 1]> = SmallVec::new();
    let mut next = Some(first);
    while let Some(job) = next.take() {
        // The last group of the slot: a full one is followed by a new one, in order.
        match groups.iter_mut().rev().find(|g| g[0].call.slot == job.call.slot) {
            Some(g) if g.len() < MAX_BATCH => g.push(job),
            _ => groups.push(vec![job]),
        }
        if groups.len() >= MAX_SLOTS {
            break;
        }
        next = rx.try_recv().ok();
    }
    groups
}

/// One round: a script call per group, together.
async fn round(redis: &Shared, script: &redis::Script, groups: SmallVec<[Vec<Job>; 1]>) {
    futures_util::future::join_all(groups.into_iter().map(|g| send(redis, script, g))).await;
}

/// One script call for `jobs` (all of one slot); each job gets its part of the answer.
async fn send(redis: &Shared, script: &redis::Script, jobs: Vec<Job>) {
    let runs = runs(&jobs);
    // `EVALSHA` written straight into one command (two buffers), not through redis-rs'
    // `ScriptInvocation`, which holds every key and argument in an allocation of its own and
    // copies them all into the command it sends.
    let (nkeys, nargs) = runs
        .iter()
        .fold((0, 0), |(k, a), &(first, _)| (k + jobs[first].call.keys.len(), a + 3 + jobs[first].call.args.len()));
    let mut cmd = redis::Cmd::with_capacity(4 + nkeys + nargs, 64 + 48 * (nkeys + nargs));
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(nkeys);
    for &(first, _) in &runs {
        for k in &jobs[first].call.keys {
            cmd.arg(k.as_str());
        }
    }
    cmd.arg(runs.len());
    for &(first, calls) in &runs {
        let call = &jobs[first].call;
        cmd.arg(call.keys.len()).arg(call.args.len()).arg(calls);
        for a in &call.args {
            match a {
                Arg::Int(v) => cmd.arg(*v),
                Arg::Str(v) => cmd.arg(*v),
                Arg::Owned(v) => cmd.arg(v.as_str()),
            };
        }
    }
    let cmd = &cmd;
    let out = redis
        .call(|mut c| async move {
            match cmd.query_async::<Vec<u8>>(&mut c).await {
                // Not loaded yet (a new or restarted Redis): load it, then the same call again.
                Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    script.load_async(&mut c).await?;
                    cmd.query_async(&mut c).await
                }
                other => other,
            }
        })
        .await;
    let mut out = match out {
        Ok(packed) => Ok(unpack(&packed).into_iter()),
        Err(e) => {
            tracing::debug!(error = %e, calls = jobs.len(), "a batch of script calls got no answer");
            Err(match e {
                CallError::Open | CallError::NotConnected => Failed::NotSent,
                CallError::Timeout(_) | CallError::Redis(_) => Failed::Sent,
            })
        }
    };
    for j in jobs {
        // Each call's part: its length, then that many numbers; a short answer is no answer.
        let part = match &mut out {
            Ok(it) => {
                let n = it.next().and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
                let v: Vec<i64> = it.by_ref().take(n).collect();
                if v.len() == n && n > 0 {
                    Ok(v)
                } else {
                    Err(Failed::Sent)
                }
            }
            Err(f) => Err(*f),
        };
        let _ = j.reply.send(part);
    }
}

/// The integers of a `cmsgpack`-packed array; an answer that is not one (it never is: a script
/// error is an error reply) gives none, so every call of the batch reads as unanswered.
fn unpack(mut packed: &[u8]) -> Vec<i64> {
    let Ok(n) = rmp::decode::read_array_len(&mut packed) else { return Vec::new() };
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(packed.len()));
    for _ in 0..n {
        match rmp::decode::read_int::<i64, _>(&mut packed) {
            Ok(v) => out.push(v),
            Err(_) => return Vec::new(),
        }
    }
    out
}

/// The calls of `jobs` as runs of identical calls queued one after the other: (the first job's
/// index, how many). Only neighbours are merged: order is kept exactly.
fn runs(jobs: &[Job]) -> SmallVec<[(usize, usize); 8]> {
    let mut runs: SmallVec<[(usize, usize); 8]> = SmallVec::new();
    for (i, j) in jobs.iter().enumerate() {
        match runs.last_mut() {
            Some((first, n)) if jobs[*first].call == j.call => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_follow_redis_hash_tags() {
        // Known slots (`CLUSTER KEYSLOT`): "foo" 12182, "{user1000}.following" = "user1000" 3443.
        assert_eq!(super::slot("foo"), 12182);
        assert_eq!(super::slot("{user1000}.following"), 3443);
        assert_eq!(super::slot("{user1000}.following"), super::slot("user1000"));
        // An empty tag hashes the whole key ("{}foo" 9500); only the first `{...}` counts.
        assert_eq!(super::slot("{}foo"), 9500);
        assert_eq!(super::slot("a{b}{c}"), super::slot("b"));
        assert_eq!(super::slot("weir:{rl:00ff}:p"), 16025);
    }

    /// What Redis 7's `cmsgpack.pack` returned for this table (`redis-cli EVAL`): every integer
    /// width it picks, signs, and a float (which no script answers; it makes the answer none).
    #[test]
    fn answers_unpack_as_redis_packs_them() {
        let table = [
            1,
            -1,
            0,
            127,
            128,
            -32,
            -33,
            255,
            256,
            65535,
            65536,
            4_294_967_295,
            4_294_967_296,
            -2_147_483_648,
            -2_147_483_649,
            -1_099_511_627_776,
            1_000_000_000_000_000,
            9_007_199_254_740_992,
        ];
        let packed: &[u8] = b"\xdc\x00\x12\x01\xff\x00\x7f\xcc\x80\xe0\xd0\xdf\xcc\xff\xcd\x01\x00\xcd\xff\xff\xce\x00\x01\x00\x00\xce\xff\xff\xff\xff\xcf\x00\x00\x00\x01\x00\x00\x00\x00\xd2\x80\x00\x00\x00\xd3\xff\xff\xff\xff\x7f\xff\xff\xff\xd3\xff\xff\xff\x00\x00\x00\x00\x00\xcf\x00\x03\x8d\x7e\xa4\xc6\x80\x00\xcf\x00\x20\x00\x00\x00\x00\x00\x00";
        assert_eq!(super::unpack(packed), table);
        // With 2.5 appended (`\xca`: a float32): no answer at all, not a truncated one.
        let with_float = b"\xdc\x00\x02\x01\xca\x40\x20\x00\x00";
        assert!(super::unpack(with_float).is_empty());
        assert!(super::unpack(b"").is_empty());
        assert!(super::unpack(b"\xdc\x00\x03\x01").is_empty(), "short");
    }

    #[test]
    fn only_identical_neighbours_share_a_run() {
        let job = |key: &str, commit: i64| {
            let mut call = super::Call::default();
            call.key(key.to_string()).arg("g").arg(commit);
            super::Job { call, reply: tokio::sync::oneshot::channel().0 }
        };
        let jobs = [job("a", 1), job("a", 1), job("a", 0), job("a", 1), job("b", 1), job("b", 1), job("b", 1)];
        assert_eq!(super::runs(&jobs).as_slice(), &[(0, 2), (2, 1), (3, 1), (4, 3)]);
        assert!(super::runs(&[]).is_empty());
    }
}
