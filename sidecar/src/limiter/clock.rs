//! Time sources for the limiter. Every limit decision takes its time from a [`Clock`] so tests
//! can drive window edges exactly instead of sleeping.
//!
//! There are two timelines. Wall time (`now_ns`) places calendar quotas on UTC boundaries and
//! becomes `resetAt` timestamps. Monotonic time (`mono_ns`) paces rate windows, so a clock
//! step (NTP, a VM resume) never refuses requests that should pass, nor refills a bucket
//! early. The monotonic timeline starts at the wall time of its first use, so the two read
//! alike until the wall clock is stepped.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock nanoseconds since the Unix epoch.
    fn now_ns(&self) -> u64;
    /// Nanoseconds on a timeline that never goes backwards.
    fn mono_ns(&self) -> u64;
    /// [`Clock::mono_ns`] at `at`, an [`Instant`] the caller has already read: one clock
    /// reading serves both. Clocks that are not the system's ignore `at`.
    fn mono_at(&self, at: Instant) -> u64 {
        let _ = at;
        self.mono_ns()
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

fn wall_ns() -> u64 {
    // A clock before 1970 is a broken host; treating it as the epoch keeps decisions
    // defined (everything looks idle) rather than panicking on the request path.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        wall_ns()
    }

    fn mono_ns(&self) -> u64 {
        self.mono_at(Instant::now())
    }

    fn mono_at(&self, at: Instant) -> u64 {
        static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
        let (start, wall) = BASE.get_or_init(|| (Instant::now(), wall_ns()));
        // An instant read before the base was set counts as the base.
        let elapsed =
            u64::try_from(at.saturating_duration_since(*start).as_nanos()).unwrap_or(u64::MAX);
        wall.saturating_add(elapsed)
    }
}

/// A settable clock for tests and benches. `set_ns` and `advance_*` move both timelines;
/// `step_wall_ns` moves only the wall clock, as an NTP step does.
#[derive(Debug, Default)]
pub struct FakeClock {
    now: AtomicU64,
    /// Monotonic minus wall time.
    mono_offset: AtomicI64,
}

impl FakeClock {
    pub fn new(now_ns: u64) -> Self {
        Self {
            now: AtomicU64::new(now_ns),
            mono_offset: AtomicI64::new(0),
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

    /// Steps the wall clock by `delta` ns (negative: backwards); monotonic time stays put.
    pub fn step_wall_ns(&self, delta: i64) {
        let wall = self.now.load(Ordering::SeqCst);
        self.now
            .store(wall.saturating_add_signed(delta), Ordering::SeqCst);
        self.mono_offset.fetch_sub(delta, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn mono_ns(&self) -> u64 {
        self.now_ns()
            .saturating_add_signed(self.mono_offset.load(Ordering::SeqCst))
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }

    fn mono_ns(&self) -> u64 {
        (**self).mono_ns()
    }

    fn mono_at(&self, at: Instant) -> u64 {
        (**self).mono_at(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The proxy reads the clock once per request and converts that reading: the conversion
    /// must land on the same timeline as a fresh reading, and keep the distance between two
    /// instants exactly.
    #[test]
    fn an_instant_already_read_converts_onto_the_monotonic_timeline() {
        let clock = SystemClock;
        let before = clock.mono_ns();
        let at = Instant::now();
        let converted = clock.mono_at(at);
        let after = clock.mono_ns();
        assert!(
            before <= converted && converted <= after,
            "{before} {converted} {after}"
        );
        let later = clock.mono_at(at + Duration::from_millis(1500));
        assert_eq!(later - converted, 1_500_000_000);
        // A fake clock ignores the instant: tests drive time, not the host.
        let fake = FakeClock::new(42 * NANOS_PER_SEC);
        assert_eq!(fake.mono_at(at), 42 * NANOS_PER_SEC);
    }
}
