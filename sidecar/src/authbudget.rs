//! A budget of failed key attempts (401 and 403) per peer, so a key cannot be guessed through
//! the sidecar: past the budget, every request from that peer is refused before its key is
//! looked at, which also closes the "was that key valid?" oracle while the peer is throttled.
//!
//! Peers are IPv4 addresses and IPv6 /64 networks (one IPv6 host commonly owns a whole /64).
//! The table is bounded: idle peers are dropped when it fills, and past the bound new peers
//! share one overflow budget, so address spraying costs memory it cannot grow.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::limiter::clock::NANOS_PER_SEC;

/// Failures allowed per minute per peer, with a burst of the same size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureLimit {
    /// 0 disables the budget.
    pub per_minute: u32,
    /// Peers tracked at once before new ones share the overflow budget.
    pub max_peers: usize,
}

impl Default for AuthFailureLimit {
    fn default() -> Self {
        // A client with a typo retries a few times; a guesser needs millions of tries. 30 a
        // minute keeps the first unharmed and makes the second hopeless.
        Self {
            per_minute: 30,
            max_peers: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Peer {
    V4(u32),
    V6Net(u64),
    Overflow,
}

fn peer_of(ip: IpAddr) -> Peer {
    match ip {
        IpAddr::V4(v4) => Peer::V4(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Peer::V4(u32::from(v4)),
            None => Peer::V6Net((u128::from(v6) >> 64) as u64),
        },
    }
}

/// GCRA per peer on the monotonic clock: `tat` is when the peer's budget is full again.
#[derive(Debug)]
pub struct AuthFailureBudget {
    limit: AuthFailureLimit,
    interval_ns: u64,
    tolerance_ns: u64,
    peers: Mutex<HashMap<Peer, u64>>,
    /// False while no peer has a failure on record: the common case skips the lock.
    any: AtomicBool,
}

impl AuthFailureBudget {
    pub fn new(limit: AuthFailureLimit) -> Self {
        let per_minute = u64::from(limit.per_minute.max(1));
        let interval_ns = (60 * NANOS_PER_SEC).div_ceil(per_minute);
        Self {
            limit,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(per_minute),
            peers: Mutex::new(HashMap::new()),
            any: AtomicBool::new(false),
        }
    }

    /// `Some(retry after, in seconds)` when the peer has no failures left.
    pub fn throttled(&self, ip: IpAddr, now_mono: u64) -> Option<u64> {
        if self.limit.per_minute == 0 || !self.any.load(Ordering::Acquire) {
            return None;
        }
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = *peers.get(&peer_of(ip)).or_else(|| {
            // A peer not in a full table lives in the overflow budget.
            (peers.len() >= self.limit.max_peers)
                .then(|| peers.get(&Peer::Overflow))
                .flatten()
        })?;
        // The next failure would push the TAT past the tolerance: refuse until it would not.
        let admit_at = tat
            .saturating_add(self.interval_ns)
            .saturating_sub(self.tolerance_ns);
        (admit_at > now_mono).then(|| (admit_at - now_mono).div_ceil(NANOS_PER_SEC).max(1))
    }

    /// Charges one failed attempt to the peer.
    pub fn record_failure(&self, ip: IpAddr, now_mono: u64) {
        if self.limit.per_minute == 0 {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut peer = peer_of(ip);
        if !peers.contains_key(&peer) && peers.len() >= self.limit.max_peers {
            peers.retain(|_, tat| *tat > now_mono);
            if peers.len() >= self.limit.max_peers {
                peer = Peer::Overflow;
            }
        }
        let tat = peers.entry(peer).or_insert(0);
        *tat = (*tat).max(now_mono).saturating_add(self.interval_ns);
        self.any.store(true, Ordering::Release);
    }

    /// Drops peers whose budget is full again; returns how many are still tracked.
    pub fn evict_idle(&self, now_mono: u64) -> usize {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.retain(|_, tat| *tat > now_mono);
        self.any.store(!peers.is_empty(), Ordering::Release);
        if peers.capacity() > 64 && peers.capacity() > 4 * peers.len() {
            peers.shrink_to_fit();
        }
        peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NANOS_PER_SEC;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_peer_gets_its_budget_then_waits_for_it_to_refill() {
        let b = AuthFailureBudget::new(AuthFailureLimit {
            per_minute: 6,
            max_peers: 10,
        });
        let now = 1_000 * S;
        for i in 0..6 {
            assert_eq!(b.throttled(ip("10.0.0.1"), now), None, "failure {i}");
            b.record_failure(ip("10.0.0.1"), now);
        }
        assert_eq!(b.throttled(ip("10.0.0.1"), now), Some(10));
        assert_eq!(
            b.throttled(ip("10.0.0.2"), now),
            None,
            "other peers unaffected"
        );
        assert_eq!(b.throttled(ip("10.0.0.1"), now + 10 * S - 1), Some(1));
        assert_eq!(b.throttled(ip("10.0.0.1"), now + 10 * S), None);
        assert_eq!(b.evict_idle(now + 60 * S), 0);
    }

    #[test]
    fn ipv6_hosts_of_one_64_share_a_budget_and_mapped_v4_is_v4() {
        let b = AuthFailureBudget::new(AuthFailureLimit {
            per_minute: 1,
            max_peers: 10,
        });
        b.record_failure(ip("2001:db8:1:2::1"), S);
        assert!(b.throttled(ip("2001:db8:1:2:ffff::9"), S).is_some());
        assert!(b.throttled(ip("2001:db8:1:3::1"), S).is_none());
        b.record_failure(ip("::ffff:192.0.2.7"), S);
        assert!(b.throttled(ip("192.0.2.7"), S).is_some());
    }

    #[test]
    fn the_table_is_bounded_and_spraying_lands_in_the_overflow_budget() {
        let b = AuthFailureBudget::new(AuthFailureLimit {
            per_minute: 2,
            max_peers: 4,
        });
        for i in 0..100u32 {
            b.record_failure(IpAddr::from(std::net::Ipv4Addr::from(i)), S);
        }
        assert!(b.evict_idle(S) <= 5, "4 peers plus the overflow budget");
        assert!(
            b.throttled(ip("203.0.113.9"), S).is_some(),
            "a new peer in a full table shares the exhausted overflow budget"
        );
        assert!(b.throttled(ip("203.0.113.9"), 3_600 * S).is_none());
    }

    #[test]
    fn zero_disables() {
        let b = AuthFailureBudget::new(AuthFailureLimit {
            per_minute: 0,
            max_peers: 4,
        });
        for _ in 0..100 {
            b.record_failure(ip("10.0.0.1"), S);
        }
        assert_eq!(b.throttled(ip("10.0.0.1"), S), None);
    }
}
