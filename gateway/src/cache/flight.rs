//! Request coalescing: one upstream fetch per key at a time. The first request for a key leads;
//! later ones wait (bounded) for its outcome. A leader whose response cannot be shared releases
//! its waiters to go upstream on their own; a leader that fails (or is dropped) tells them so,
//! and one of them takes over (`proxy::cached` re-joins: the first to join leads again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

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

/// Keys are request-derived: a seeded, quality hash (foldhash, as L1 uses) rather than SipHash,
/// twice per miss (join and release).
type Map = Arc<Mutex<HashMap<String, watch::Receiver<Option<FlightResult>>, foldhash::quality::RandomState>>>;

#[derive(Debug, Default, Clone)]
pub struct Flights {
    map: Map,
}

#[derive(Debug)]
pub enum Join {
    Leader(FlightGuard),
    Waiter(watch::Receiver<Option<FlightResult>>),
}

/// Held by the leader; `finish` publishes the result, `Drop` releases waiters if it did not.
#[derive(Debug)]
pub struct FlightGuard {
    key: String,
    map: Map,
    tx: Option<watch::Sender<Option<FlightResult>>>,
}

impl Flights {
    pub fn join(&self, key: &str) -> Join {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned map only costs coalescing: lead alone.
            let (tx, _) = watch::channel(None);
            return Join::Leader(FlightGuard { key: String::new(), map: Map::default(), tx: Some(tx) });
        };
        if let Some(rx) = map.get(key) {
            if rx.has_changed().is_ok() {
                return Join::Waiter(rx.clone());
            }
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_string(), rx);
        Join::Leader(FlightGuard { key: key.to_string(), map: self.map.clone(), tx: Some(tx) })
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
        if let Some(tx) = self.tx.take() {
            if let Ok(mut map) = self.map.lock() {
                map.remove(&self.key);
            }
            let _ = tx.send(Some(result));
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.release(FlightResult::Failed);
    }
}

/// Waits for the leader, at most `limit`; a vanished leader means `Failed`, a timeout "go yourself".
pub async fn wait(mut rx: watch::Receiver<Option<FlightResult>>, limit: Duration) -> FlightResult {
    match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
        Ok(Ok(v)) => v.clone().unwrap_or(FlightResult::Failed),
        Ok(Err(_)) => FlightResult::Failed,
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
        let Join::Waiter(rx) = f.join("k") else { panic!("second must wait") };
        drop(guard);
        assert!(matches!(wait(rx, Duration::from_secs(1)).await, FlightResult::Failed));
        assert!(f.is_empty());
        assert!(matches!(f.join("k"), Join::Leader(_)));
    }
}
