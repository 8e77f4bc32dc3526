//! Time source for the limiter. Every limit decision takes `now` from a [`Clock`] so tests can
//! drive window edges exactly instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Wall-clock time in nanoseconds since the Unix epoch. Wall time (not monotonic) because
/// quotas align to UTC calendar boundaries and `resetAt` is reported as a timestamp.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        // A clock before 1970 is a broken host; treating it as the epoch keeps decisions
        // defined (everything looks idle) rather than panicking on the request path.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A settable clock for tests and benches.
#[derive(Debug, Default)]
pub struct FakeClock {
    now: AtomicU64,
}

impl FakeClock {
    pub fn new(now_ns: u64) -> Self {
        Self {
            now: AtomicU64::new(now_ns),
        }
    }

    pub fn at_secs(secs: u64) -> Self {
        Self::new(secs * NANOS_PER_SEC)
    }

    pub fn set_ns(&self, ns: u64) {
        self.now.store(ns, Ordering::SeqCst);
    }

    pub fn advance_ns(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::SeqCst);
    }

    pub fn advance_secs(&self, secs: u64) {
        self.advance_ns(secs * NANOS_PER_SEC);
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}
