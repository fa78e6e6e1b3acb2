//! The connection to the shared tier (one Redis or a Redis Cluster), shared by everything that
//! uses it (the L2 cache today; rate limits and budgets later). Every call goes through `call`:
//! the circuit breaker first, then a hard `op_timeout`, then the outcome is recorded. Reconnection
//! is the client's (`ConnectionManager`, `cluster_async`), plus a supervisor that pings once a
//! second for `/health` and drives the breaker's probe when traffic is idle.

pub mod batch;
pub mod breaker;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use self::breaker::{Breaker, State};

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub urls: Vec<url::Url>,
    /// Environment variable holding the deployment secret that keys every Redis key name and
    /// MACs every value and invalidation message.
    pub key_secret_env: Option<String>,
    /// Instances sharing this Redis (configured): while Redis is away a `fail: local` rate limit
    /// admits `rate / instances` on each, so the fleet as a whole keeps about the shared rate.
    pub instances: u64,
    pub cluster: bool,
    pub password_env: Option<String>,
    /// Bound on every Redis call; a slower answer counts as a failure and the request goes on
    /// without Redis.
    pub op_timeout: Duration,
    /// Encoded entries above this stay in L1 only.
    pub max_object_bytes: u64,
    /// CA certificate (PEM) for `rediss://` servers signed by a private CA.
    pub tls_ca: Option<std::path::PathBuf>,
    pub breaker: BreakerSettings,
    /// `/readyz` answers 503 while Redis is unreachable.
    pub required: bool,
    /// `redis.fill_lock`: a miss's fill takes a lock in Redis, so the fleet sends one request
    /// per key to the origin, not one per instance (`cache::l2::FillLock`).
    pub fill_lock: bool,
}

/// Circuit breaker: `failures` within `window` open it; after `open_for` one probe may close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    pub failures: u32,
    pub window: Duration,
    pub open_for: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    #[error("redis.password_env names `{var}`, but that environment variable is not set (or empty)")]
    PasswordUnset { var: String },
    #[error("cannot read redis.tls.ca `{path}`: {source}")]
    Ca { path: String, source: std::io::Error },
    #[error("invalid Redis connection settings: {0}")]
    Settings(RedisError),
    #[error("redis.key_secret_env names `{var}`, but that environment variable is not set or shorter than 32 bytes (e.g. `openssl rand -hex 32`)")]
    KeySecretUnset { var: String },
    #[error("Redis refused Weir's credentials ({0}): check redis.password_env or the password in the URL")]
    Auth(RedisError),
}

/// Why a shared-tier call did not happen or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("circuit breaker open")]
    Open,
    #[error("not connected")]
    NotConnected,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Redis(RedisError),
}

/// A connection to one Redis (`ConnectionManager`: multiplexed, reconnects by itself) or to a
/// Cluster (`cluster_async`: routes by slot, follows MOVED/ASK and failovers). Cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Single(_) => "Conn::Single",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Debug)]
pub struct Shared {
    pub settings: RedisSettings,
    /// Cluster mode: the client that (re)builds the slot map; `None` for a single server.
    cluster: Option<ClusterClient>,
    /// For the pub/sub connection: one client per configured URL (in Cluster mode any node will
    /// do, since PUBLISH reaches every node; the subscriber moves on to the next when one fails).
    pub pubsub_clients: Vec<redis::Client>,
    conn: ArcSwapOption<Conn>,
    breaker: Breaker,
    /// Last successful ping round trip, in microseconds.
    latency_us: AtomicU64,
    /// Whether the last ping succeeded.
    reachable: AtomicBool,
    /// Whether the last call that ended answered (false after a timeout or a cut connection,
    /// until a call answers again): `answering`.
    answered: AtomicBool,
    /// Redis' clock minus ours, in microseconds, measured by every ping (`TIME`): what the
    /// shared tier compares across instances is in Redis' clock.
    offset_us: AtomicI64,
    /// Whether the invalidation subscription is live (set by the subscriber).
    pub subscribed: AtomicBool,
    /// Identifies this process on the invalidation channel (its own messages are skipped).
    pub instance: u64,
    /// The deployment secret (`redis.key_secret_env`), when configured: keys every Redis key
    /// name and MACs every value and invalidation message. Never logged.
    pub key_secret: Option<String>,
}

fn is_auth_error(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
        || e.to_string().contains("WRONGPASS")
}

impl Shared {
    /// Builds the clients and checks the server once. Wrong credentials are a start-up error;
    /// an unreachable Redis is not (Weir starts degraded, L1 only, and keeps trying).
    pub async fn connect(settings: RedisSettings) -> Result<Arc<Shared>, RedisStartError> {
        let key_secret = match &settings.key_secret_env {
            Some(var) => match std::env::var(var) {
                Ok(s) if s.len() >= 32 => Some(s),
                _ => return Err(RedisStartError::KeySecretUnset { var: var.clone() }),
            },
            None => None,
        };
        let password = match &settings.password_env {
            Some(var) => match std::env::var(var) {
                Ok(p) if !p.is_empty() => Some(p),
                _ => return Err(RedisStartError::PasswordUnset { var: var.clone() }),
            },
            None => None,
        };
        let ca = match &settings.tls_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|source| RedisStartError::Ca { path: path.display().to_string(), source })?,
            ),
            None => None,
        };
        let infos = settings
            .urls
            .iter()
            .map(|u| {
                let mut info = u.as_str().into_connection_info().map_err(RedisStartError::Settings)?;
                if let Some(p) = &password {
                    let redis = info.redis_settings().clone().set_password(p);
                    info = info.set_redis_settings(redis);
                }
                Ok(info)
            })
            .collect::<Result<Vec<_>, RedisStartError>>()?;
        let client = |info: redis::ConnectionInfo| match &ca {
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) },
            ),
            None => redis::Client::open(info),
        };
        let Some(first) = infos.first().cloned() else {
            return Err(RedisStartError::Settings(RedisError::from((redis::ErrorKind::Client, "no Redis URL"))));
        };
        let pubsub_clients = infos
            .iter()
            .map(|i| client(i.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(RedisStartError::Settings)?;
        let connect_timeout = settings.op_timeout.max(Duration::from_millis(500));
        let (cluster, conn) = if settings.cluster {
            let mut b = ClusterClient::builder(infos)
                .connection_timeout(connect_timeout)
                .response_timeout(settings.op_timeout.max(Duration::from_millis(200)))
                .retries(2);
            if let Some(p) = &password {
                b = b.password(p.clone());
            }
            if let Some(ca) = &ca {
                b = b.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) });
            }
            (Some(b.build().map_err(RedisStartError::Settings)?), None)
        } else {
            let c = client(first).map_err(RedisStartError::Settings)?;
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                // redis-rs' own per-call deadline (500 ms by default) must not cut a longer
                // `op_timeout` short: `call` applies op_timeout itself.
                .set_response_timeout(Some(settings.op_timeout.max(Duration::from_millis(500))))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let manager = ConnectionManager::new_lazy_with_config(c, cfg).map_err(RedisStartError::Settings)?;
            (None, Some(Conn::Single(manager)))
        };
        let shared = Arc::new(Shared {
            key_secret,
            breaker: Breaker::new(settings.breaker, settings.op_timeout),
            settings,
            cluster,
            pubsub_clients,
            conn: ArcSwapOption::from_pointee(conn),
            latency_us: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
            answered: AtomicBool::new(true),
            offset_us: AtomicI64::new(0),
            subscribed: AtomicBool::new(false),
            instance: crate::random_u64(),
        });
        // The first check may wait longer than op_timeout: a TLS handshake, a cold server.
        match shared.establish(Duration::from_secs(2)).await {
            Ok(()) => match tokio::time::timeout(Duration::from_secs(2), shared.ping_raw()).await {
                Ok(Ok(rtt)) => {
                    shared.note_ping(Some(rtt));
                    tracing::info!(urls = ?shared.redacted_urls(), rtt_us = rtt.as_micros(), "redis connected");
                }
                Ok(Err(e)) if is_auth_error(&e) => return Err(RedisStartError::Auth(e)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "redis unreachable at start: serving from L1 and the origin until it answers")
                }
                Err(_) => tracing::warn!(
                    "redis did not answer within 2s at start: serving from L1 and the origin until it answers"
                ),
            },
            Err(e) if is_auth_error(&e) => return Err(RedisStartError::Auth(e)),
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable at start: serving from L1 and the origin until it answers")
            }
        }
        Ok(shared)
    }

    fn redacted_urls(&self) -> Vec<String> {
        self.settings
            .urls
            .iter()
            .map(|u| {
                let mut u = u.clone();
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                u.to_string()
            })
            .collect()
    }

    /// Makes sure a connection object exists (Cluster: the initial topology has been read).
    async fn establish(&self, wait: Duration) -> RedisResult<()> {
        if self.conn.load().is_some() {
            return Ok(());
        }
        let Some(client) = &self.cluster else { return Ok(()) };
        match tokio::time::timeout(wait, client.get_async_connection()).await {
            Ok(Ok(c)) => {
                self.conn.store(Some(Arc::new(Conn::Cluster(c))));
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RedisError::from((redis::ErrorKind::Io, "cluster connection timed out"))),
        }
    }

    async fn ping_raw(&self) -> RedisResult<Duration> {
        let Some(conn) = self.conn.load_full() else {
            return Err(RedisError::from((redis::ErrorKind::Io, "not connected")));
        };
        self.time_ping((*conn).clone()).await
    }

    /// A ping that also measures the clock offset: `TIME`, read between two local readings.
    async fn time_ping(&self, mut c: Conn) -> RedisResult<Duration> {
        let t = Instant::now();
        let before = unix_us(SystemTime::now());
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await?;
        let rtt = t.elapsed();
        let mid = before + i64::try_from(rtt.as_micros() / 2).unwrap_or(0);
        self.offset_us.store(secs * 1_000_000 + micros - mid, Ordering::Relaxed);
        Ok(rtt)
    }

    /// `t` (our clock) in Redis' clock, in Unix milliseconds.
    pub fn redis_ms(&self, t: SystemTime) -> u64 {
        let us = unix_us(t) + self.offset_us.load(Ordering::Relaxed);
        u64::try_from(us / 1000).unwrap_or(0)
    }

    fn note_ping(&self, rtt: Option<Duration>) {
        match rtt {
            Some(rtt) => {
                self.latency_us.store(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
                self.reachable.store(true, Ordering::Relaxed);
            }
            None => self.reachable.store(false, Ordering::Relaxed),
        }
    }

    /// Runs one Redis operation behind the breaker and `op_timeout`.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return Err(CallError::Open);
        }
        let Some(conn) = self.conn.load_full() else {
            self.breaker.failure("not connected");
            return Err(CallError::NotConnected);
        };
        let out = tokio::time::timeout(self.settings.op_timeout, f((*conn).clone())).await;
        // Recorded once: the breaker's count, and whether this call got an answer.
        let answered = match &out {
            Ok(Ok(_)) => {
                self.breaker.success();
                true
            }
            Ok(Err(e)) if found_dead(e) => {
                self.breaker.dropped(&e.to_string());
                false
            }
            Ok(Err(e))
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() =>
            {
                self.breaker.failure(&e.to_string());
                false
            }
            // A server-side error answer (a script error, say) says Redis is alive.
            Ok(Err(_)) => true,
            Err(_) => {
                self.breaker.failure("timeout");
                false
            }
        };
        self.answered.store(answered, Ordering::Relaxed);
        match out {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CallError::Redis(e)),
            Err(_) => Err(CallError::Timeout(self.settings.op_timeout)),
        }
    }

    pub fn breaker_state(&self) -> State {
        self.breaker.state()
    }

    /// Usable now: the breaker lets calls through and the last ping answered.
    pub fn is_up(&self) -> bool {
        self.breaker.state() == State::Closed && self.reachable.load(Ordering::Relaxed)
    }

    /// The last call that ended got an answer. What is worth asking only of a Redis that
    /// answers (a fill lock: waiting on other instances) is not asked after a call timed out
    /// or lost its connection, until a call answers again — a miss during a fault meets one
    /// timeout (its lookup), not one more for the lock.
    pub fn answering(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    /// Once a second: (re)establish, ping through the breaker (the ping is the half-open probe
    /// when traffic is idle), remember the round trip for `/health`.
    pub fn spawn_supervisor(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(s) = me.upgrade() else { return };
                if let Err(e) = s.establish(s.settings.op_timeout.max(Duration::from_millis(500))).await {
                    s.note_ping(None);
                    tracing::debug!(error = %e, "redis cluster still unreachable");
                    continue;
                }
                let me2 = s.clone();
                let r = s.call(|c| async move { me2.time_ping(c).await }).await;
                match r {
                    Ok(rtt) => s.note_ping(Some(rtt)),
                    Err(CallError::Open) => {}
                    Err(_) => s.note_ping(None),
                }
            }
        });
    }
}

/// Whether `e` says the connection was found dead when used (the server or a middlebox closed
/// it: broken pipe, reset, aborted, EOF): the client reconnects on such an error, so the next call
/// may well succeed. A refused connection is not one: nothing listens there. (The client keeps
/// the `io::Error` behind an `Arc` its `source()` does not unwrap: ask it, not the chain.)
fn found_dead(e: &RedisError) -> bool {
    e.is_connection_dropped() && !e.is_connection_refusal()
}

/// Unix microseconds as the signed number clock offsets are computed in.
fn unix_us(t: SystemTime) -> i64 {
    i64::try_from(crate::clock::unix_us(t)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errors the client gives for a connection a peer cut (it reconnects on them) are found
    /// dead; a refusal, a timeout or a script error is not.
    #[test]
    fn found_dead_knows_the_clients_own_errors() {
        use std::io::{Error, ErrorKind};
        for kind in
            [ErrorKind::BrokenPipe, ErrorKind::ConnectionReset, ErrorKind::ConnectionAborted, ErrorKind::UnexpectedEof]
        {
            assert!(found_dead(&RedisError::from(Error::from(kind))), "{kind:?}");
        }
        for kind in [ErrorKind::ConnectionRefused, ErrorKind::TimedOut] {
            assert!(!found_dead(&RedisError::from(Error::from(kind))), "{kind:?}");
        }
        assert!(!found_dead(&RedisError::from((redis::ErrorKind::UnexpectedReturnType, "not a number"))));
    }
}
