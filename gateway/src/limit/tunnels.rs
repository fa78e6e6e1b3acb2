//! Caps on tunnels (upgraded connections spliced to an upstream): how many this instance holds
//! at once (`server.max_tunnels`) and how many one client address holds (IPv6 by /64,
//! `server.max_tunnels_per_address`). A slot is held by the tunnel's task for its whole life.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Tunnels open now, in total and per address.
#[derive(Debug, Default)]
pub struct Tunnels {
    open: Mutex<(usize, HashMap<String, usize>)>,
}

/// Why a tunnel was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelRefusal {
    /// `server.max_tunnels` are open on this instance.
    Full,
    /// This client address holds `server.max_tunnels_per_address` already.
    PerAddress,
}

/// One open tunnel's place in the counts, given back when dropped.
#[derive(Debug)]
pub struct TunnelSlot {
    tunnels: Arc<Tunnels>,
    addr: String,
}

impl Tunnels {
    /// A slot for a tunnel from `ip`, within `max` in total and `per_address` for the address.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize, per_address: usize) -> Result<TunnelSlot, TunnelRefusal> {
        let addr = super::address_key(ip);
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.0 >= max {
            return Err(TunnelRefusal::Full);
        }
        let mine = open.1.entry(addr.clone()).or_insert(0);
        if *mine >= per_address {
            return Err(TunnelRefusal::PerAddress);
        }
        *mine += 1;
        open.0 += 1;
        Ok(TunnelSlot { tunnels: self.clone(), addr })
    }

    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut open = self.tunnels.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn caps_in_total_and_per_address_and_slots_come_back() {
        let t = Arc::new(Tunnels::default());
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::2".parse().unwrap();
        let s1 = t.acquire(a, 3, 2).unwrap();
        let _s2 = t.acquire(a, 3, 2).unwrap();
        assert_eq!(t.acquire(a, 3, 2).unwrap_err(), TunnelRefusal::PerAddress);
        let _s3 = t.acquire(b, 3, 1).unwrap();
        assert_eq!(t.acquire(b2, 4, 1).unwrap_err(), TunnelRefusal::PerAddress, "one /64");
        assert_eq!(t.acquire("203.0.113.9".parse().unwrap(), 3, 2).unwrap_err(), TunnelRefusal::Full);
        drop(s1);
        assert_eq!(t.open(), 2);
        assert!(t.acquire(a, 3, 2).is_ok());
    }
}
