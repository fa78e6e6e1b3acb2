//! Request coalescing: one upstream fetch per key at a time. The first request for a key leads;
//! later ones wait (bounded) for its outcome. A leader whose response cannot be shared releases
//! its waiters to go upstream on their own; a leader that fails (or is dropped) tells them so,
//! and one of them takes over (`proxy::cached` re-joins: the first to join leads again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

use super::entry::Entry;

#[derive(Debug, Clone)]
pub enum FlightResult {
    /// The leader stored this response; waiters may use it if it matches their own lookup.
    Stored(Arc<Entry>),
    /// Nothing shareable (not storable, too large): each waiter fetches for itself.
    NotShared,
    /// The leader failed or went away without an answer: one waiter should lead again.
    Failed,
}

/// One fetch under way: its result once the leader has one, and the waiters to wake then. (A
/// `watch` channel did this before: its eight-way notifier and version bookkeeping were a
/// tenth of what an uncontended miss cost; a miss with no waiter now sets a cell and finds
/// nobody to wake.)
#[derive(Debug, Default)]
struct Flight {
    result: OnceLock<FlightResult>,
    done: Notify,
}

/// Keys are request-derived: a seeded, quality hash (foldhash, as L1 uses) rather than SipHash,
/// twice per miss (join and release). The key is allocated once, shared with the guard.
type Map = Arc<Mutex<HashMap<Arc<str>, Arc<Flight>, foldhash::quality::RandomState>>>;

#[derive(Debug, Default, Clone)]
pub struct Flights {
    map: Map,
}

#[derive(Debug)]
pub enum Join {
    Leader(FlightGuard),
    Waiter(Waiter),
}

/// A place in the queue behind a leader (`wait`).
#[derive(Debug)]
pub struct Waiter(Arc<Flight>);

/// Held by the leader; `finish` publishes the result, `Drop` releases waiters if it did not.
#[derive(Debug)]
pub struct FlightGuard {
    key: Arc<str>,
    map: Map,
    flight: Option<Arc<Flight>>,
}

impl Flights {
    pub fn join(&self, key: &str) -> Join {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned map only costs coalescing: lead alone.
            return Join::Leader(FlightGuard { key: Arc::from(""), map: Map::default(), flight: None });
        };
        if let Some(f) = map.get(key) {
            if f.result.get().is_none() {
                return Join::Waiter(Waiter(f.clone()));
            }
        }
        let key: Arc<str> = Arc::from(key);
        let flight = Arc::new(Flight::default());
        map.insert(key.clone(), flight.clone());
        Join::Leader(FlightGuard { key, map: self.map.clone(), flight: Some(flight) })
    }

    /// True when a fetch for `key` is under way (a background refresh need not start another).
    pub fn in_flight(&self, key: &str) -> bool {
        self.map.lock().map(|m| m.contains_key(key)).unwrap_or(false)
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FlightGuard {
    pub fn finish(mut self, result: FlightResult) {
        self.release(result);
    }

    fn release(&mut self, result: FlightResult) {
        if let Some(f) = self.flight.take() {
            if let Ok(mut map) = self.map.lock() {
                // Out of the map first: a request joining from now on leads a new fetch. (Only
                // this flight: one that replaced it under the key goes back.)
                if let Some(other) = map.remove(&self.key).filter(|g| !Arc::ptr_eq(g, &f)) {
                    map.insert(self.key.clone(), other);
                }
            }
            let _ = f.result.set(result);
            f.done.notify_waiters();
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.release(FlightResult::Failed);
    }
}

/// Waits for the leader, at most `limit`; a vanished leader means `Failed`, a timeout "go yourself".
pub async fn wait(w: Waiter, limit: Duration) -> FlightResult {
    let f = w.0;
    // Registered before the result is looked at: a result set after the look wakes it.
    let done = f.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    if let Some(r) = f.result.get() {
        return r.clone();
    }
    match tokio::time::timeout(limit, done).await {
        Ok(()) => f.result.get().cloned().unwrap_or(FlightResult::Failed),
        Err(_) => FlightResult::NotShared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_released_when_the_leader_drops() {
        let f = Flights::default();
        let Join::Leader(guard) = f.join("k") else { panic!("first must lead") };
        let Join::Waiter(w) = f.join("k") else { panic!("second must wait") };
        drop(guard);
        assert!(matches!(wait(w, Duration::from_secs(1)).await, FlightResult::Failed));
        assert!(f.is_empty());
        assert!(matches!(f.join("k"), Join::Leader(_)));
    }

    /// Waiters that joined before the leader finished are woken with its result (a missed
    /// wake-up would end at the limit as `NotShared`, never `Failed`), and a request that joins
    /// after it leads a new fetch.
    #[tokio::test]
    async fn waiters_wake_with_the_leaders_result() {
        let f = Flights::default();
        let Join::Leader(guard) = f.join("k") else { panic!("first must lead") };
        let limit = Duration::from_secs(5);
        let waits: Vec<_> = (0..3)
            .map(|_| {
                let Join::Waiter(w) = f.join("k") else { panic!("the others wait") };
                tokio::spawn(wait(w, limit))
            })
            .collect();
        tokio::task::yield_now().await;
        guard.finish(FlightResult::Failed);
        for w in waits {
            assert!(matches!(w.await.unwrap(), FlightResult::Failed));
        }
        assert!(f.is_empty());
        let Join::Leader(next) = f.join("k") else { panic!("after the finish, a new leader") };
        // A waiter whose leader finishes before it starts waiting returns the result at once.
        let Join::Waiter(late) = f.join("k") else { panic!("second must wait") };
        next.finish(FlightResult::Failed);
        assert!(matches!(wait(late, limit).await, FlightResult::Failed));
    }
}
