//! Circuit breaker for the shared tier: closed (calls go to Redis), open (calls are skipped at
//! once, so a sick Redis adds no latency), half-open (one probe decides). Lock-free reads on the
//! request path: `allow()` is one atomic load while closed.
//!
//! The first probe goes soon after the breaker opens (twice the op timeout); each failed probe
//! doubles the wait, up to `open_for`. A Redis that is back is found within `open_for` however
//! long it was away, and a dead one costs one probe per `open_for`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::BreakerSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// Failures counted since `window_start` (a fixed window, restarted when it runs out).
    failures: u32,
    window_start: Instant,
    /// Open: since when it has been open. Half-open: when the probe went (a lost probe is
    /// retried).
    since: Instant,
    /// How long after `since` the next probe may go: doubles per failed probe, up to `open_for`.
    wait: Duration,
    /// A probe of this opening found its connection dead and was followed by a quick one.
    reprobed: bool,
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: AtomicU8,
    inner: Mutex<Inner>,
    /// How long a half-open probe may take before another caller may probe.
    probe_timeout: Duration,
    /// The wait before the first probe after opening.
    first_wait: Duration,
}

impl Breaker {
    /// `op_timeout`: the longest a Redis call may take (a probe is retried after four of them).
    pub fn new(settings: BreakerSettings, op_timeout: Duration) -> Breaker {
        let now = Instant::now();
        let first_wait = (op_timeout * 2).min(settings.open_for);
        Breaker {
            settings,
            state: AtomicU8::new(State::Closed as u8),
            inner: Mutex::new(Inner { failures: 0, window_start: now, since: now, wait: first_wait, reprobed: false }),
            probe_timeout: op_timeout * 4,
            first_wait,
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set(&self, s: State, why: &str) {
        let old = State::from_u8(self.state.swap(s as u8, Ordering::AcqRel));
        if old != s {
            match s {
                State::Closed => tracing::info!(from = old.as_str(), "redis circuit breaker closed: {why}"),
                State::Open => tracing::warn!(from = old.as_str(), "redis circuit breaker open: {why}"),
                State::HalfOpen => tracing::info!(from = old.as_str(), "redis circuit breaker half-open: {why}"),
            }
        }
    }

    /// Whether a call may go to Redis now. While open, the first caller after `open_for` becomes
    /// the half-open probe; everyone else is refused until it reports.
    pub fn allow(&self) -> bool {
        match self.state() {
            State::Closed => true,
            State::Open | State::HalfOpen => {
                let Ok(mut inner) = self.inner.lock() else { return false };
                let now = Instant::now();
                match self.state() {
                    State::Closed => true,
                    State::Open if now.duration_since(inner.since) >= inner.wait => {
                        inner.since = now;
                        self.set(State::HalfOpen, "probing");
                        true
                    }
                    State::HalfOpen if now.duration_since(inner.since) >= self.probe_timeout => {
                        inner.since = now;
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    pub fn success(&self) {
        if self.state() == State::Closed {
            return;
        }
        if let Ok(mut inner) = self.inner.lock() {
            inner.failures = 0;
            inner.window_start = Instant::now();
            inner.wait = self.first_wait;
            inner.reprobed = false;
        }
        self.set(State::Closed, "probe succeeded");
    }

    /// A call failed because its connection was found dead (broken pipe, reset): the client
    /// reconnects on that error, so a half-open probe that met it is followed by another soon
    /// (after the first wait), once per opening, instead of a doubled wait. Without this, a
    /// Redis back after a network fault was found only a doubled `open_for` later (the soak:
    /// budgeted calls refused 6 s after a black hole ended). Otherwise a failure like any other.
    pub fn dropped(&self, what: &str) {
        if self.state() == State::HalfOpen {
            if let Ok(mut inner) = self.inner.lock() {
                if !inner.reprobed && self.state() == State::HalfOpen {
                    inner.reprobed = true;
                    let now = Instant::now();
                    // The next probe after `first_wait`; the back-off itself is kept.
                    inner.since = now.checked_sub(inner.wait.saturating_sub(self.first_wait)).unwrap_or(now);
                    self.set(State::Open, &format!("probe found its connection dead: {what}; probing again"));
                    return;
                }
            }
        }
        self.failure(what);
    }

    pub fn failure(&self, what: &str) {
        let Ok(mut inner) = self.inner.lock() else { return };
        let now = Instant::now();
        match self.state() {
            State::HalfOpen => {
                inner.since = now;
                inner.wait = (inner.wait * 2).min(self.settings.open_for);
                self.set(State::Open, &format!("probe failed: {what}; next in {:?}", inner.wait));
            }
            State::Open => {}
            State::Closed => {
                if now.duration_since(inner.window_start) > self.settings.window {
                    inner.window_start = now;
                    inner.failures = 0;
                }
                inner.failures += 1;
                if inner.failures >= self.settings.failures {
                    inner.since = now;
                    inner.wait = self.first_wait;
                    inner.reprobed = false;
                    let n = inner.failures;
                    self.set(State::Open, &format!("{n} failures within {:?}, last: {what}", self.settings.window));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(open_for_ms: u64) -> Breaker {
        let s = BreakerSettings {
            failures: 3,
            window: Duration::from_secs(10),
            open_for: Duration::from_millis(open_for_ms),
        };
        Breaker::new(s, Duration::from_millis(250))
    }

    #[test]
    fn opens_after_threshold_then_half_opens_and_closes() {
        let b = breaker(20);
        assert!(b.allow());
        b.failure("x");
        b.failure("x");
        assert_eq!(b.state(), State::Closed);
        b.failure("x");
        assert_eq!(b.state(), State::Open);
        assert!(!b.allow(), "open refuses at once");
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow(), "first caller after open_for probes");
        assert_eq!(b.state(), State::HalfOpen);
        assert!(!b.allow(), "only one probe at a time");
        b.success();
        assert_eq!(b.state(), State::Closed);
        assert!(b.allow());
    }

    #[test]
    fn failed_probe_reopens() {
        let b = breaker(10);
        for _ in 0..3 {
            b.failure("x");
        }
        std::thread::sleep(Duration::from_millis(15));
        assert!(b.allow());
        b.failure("still down");
        assert_eq!(b.state(), State::Open);
        assert!(!b.allow());
    }

    #[test]
    fn probes_start_soon_and_back_off_to_open_for() {
        // op_timeout 5 ms: the first probe 10 ms after opening, then 20, 40, capped at 50.
        let s = BreakerSettings { failures: 1, window: Duration::from_secs(10), open_for: Duration::from_millis(50) };
        let b = Breaker::new(s, Duration::from_millis(5));
        b.failure("x");
        let waits: Vec<u128> = (0..5)
            .map(|_| {
                let t = Instant::now();
                while !b.allow() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let waited = t.elapsed().as_millis();
                b.failure("still down");
                waited
            })
            .collect();
        for (w, want) in waits.iter().zip([10, 20, 40, 50, 50]) {
            assert!(*w >= want && *w < want + 40, "waits {waits:?}");
        }
        std::thread::sleep(Duration::from_millis(55));
        assert!(b.allow());
        b.success();
        // Closed again: the next opening starts over at the first wait.
        b.failure("x");
        let t = Instant::now();
        while !b.allow() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(t.elapsed() < Duration::from_millis(45), "{:?}", t.elapsed());
    }

    #[test]
    fn a_probe_that_meets_a_dead_connection_is_followed_by_another_soon_once() {
        // op_timeout 5 ms (first wait 10 ms), open_for 400 ms; the back-off reaches 80 ms.
        let s = BreakerSettings { failures: 1, window: Duration::from_secs(10), open_for: Duration::from_millis(400) };
        let b = Breaker::new(s, Duration::from_millis(5));
        b.failure("x");
        let probe = |b: &Breaker| {
            let t = Instant::now();
            while !b.allow() {
                std::thread::sleep(Duration::from_millis(1));
            }
            t.elapsed()
        };
        for _ in 0..3 {
            probe(&b);
            b.failure("timeout");
        }
        // The wait is 80 ms now; a probe meets a dropped connection: the next goes after ~10.
        probe(&b);
        b.dropped("broken pipe");
        let quick = probe(&b);
        assert!(quick < Duration::from_millis(40), "{quick:?}");
        // Once per opening: a second dropped probe backs off as a failure (160 ms).
        b.dropped("broken pipe");
        let slow = probe(&b);
        assert!(slow >= Duration::from_millis(150), "{slow:?}");
    }
}
