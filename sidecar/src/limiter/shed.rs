//! Fair load shedding: protects the app itself when it is the exhausted resource.
//!
//! An adaptive concurrency limit follows the upstream's latency, in the manner of Envoy's
//! adaptive concurrency filter and Netflix's gradient limiter:
//! - the baseline is measured in a probe, as Envoy does for its minimum RTT: the limit is
//!   pinned to `min` until [`WINDOW_SAMPLES`] requests admitted during the probe have
//!   answered, and their mean latency is the new baseline. Under sustained overload the
//!   latency never falls back to the baseline by itself, so a baseline cannot be learnt from
//!   ordinary traffic. A probe runs at the start; when the limit has sat at `min` for
//!   [`STUCK_WINDOWS`] windows (the baseline may be too low: the app got slower for good);
//!   and every [`PROBE_INTERVAL_NS`] (it may be too high). A probe sheds the requests of keys
//!   over their share of `min`, so probes are rare: a healthy app is not probed every few
//!   seconds;
//! - every window (at least [`WINDOW_SAMPLES`] responses and [`WINDOW_NS`]) the window's mean
//!   latency `recent` is compared with `tolerance × baseline`:
//!   - within it, the limit grows by `√limit` (smoothed, about `0.2 √limit` a window), but
//!     only if the window used at least half the limit: an idle app earns no headroom it has
//!     not shown it can take;
//!   - over it, the limit is multiplied by `gradient = max(tolerance × baseline / recent,
//!     0.5)` (smoothed), within `[min, max]`. So latency settles at the tolerance the policy
//!     declared, not above it.
//!
//! At the limit, a request is still admitted while its key holds fewer than its fair share
//! (`limit / keys with requests in flight`): a key under its share is never shed because
//! another key is loud, and the loud key's in-flight count drains to its share. Requests of
//! keys at or over their share are shed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use keylimit_dataplane::LoadShedding;

use crate::limiter::BuildMix;

/// Responses per window, at least.
pub const WINDOW_SAMPLES: u32 = 16;
/// Window length, at least.
pub const WINDOW_NS: u64 = 20_000_000;
/// Windows at `min` in a row that start a probe (at least 1 s).
pub const STUCK_WINDOWS: u32 = 50;
/// Time between two scheduled probes.
pub const PROBE_INTERVAL_NS: u64 = 60_000_000_000;

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: u32,
    by_key: HashMap<u64, u32, BuildMix>,
    window_start_ns: u64,
    window_sum_ns: u64,
    window_count: u32,
    /// Mean latency of the last probe (ns), 0 until the first probe ends.
    baseline_ns: f64,
    /// Set while the limit is pinned to `min` to measure the baseline.
    probing: bool,
    /// Counts probes; a permit taken during the current probe carries its number.
    probe_epoch: u64,
    /// When the last probe ended (monotonic ns).
    probed_at_ns: u64,
    /// Windows in a row that ended with the limit at `min`.
    windows_at_min: u32,
    /// The most requests in flight during the current window.
    window_peak: u32,
    shed_total: u64,
}

/// The app's adaptive concurrency limit and who holds it. Cheap to clone; one per sidecar,
/// kept across config reloads.
#[derive(Debug, Clone)]
pub struct LoadShedder(Arc<Mutex<State>>);

impl Default for LoadShedder {
    fn default() -> Self {
        LoadShedder(Arc::new(Mutex::new(State {
            limit: 0.0,
            in_flight: 0,
            by_key: HashMap::default(),
            window_start_ns: 0,
            window_sum_ns: 0,
            window_count: 0,
            baseline_ns: 0.0,
            probing: true,
            probe_epoch: 1,
            probed_at_ns: 0,
            windows_at_min: 0,
            window_peak: 0,
            shed_total: 0,
        })))
    }
}

/// What [`LoadShedder::snapshot`] shows (metrics, usage reports).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShedView {
    pub limit: u32,
    pub in_flight: u32,
    pub shed_total: u64,
}

/// A slot in the app's concurrency; the response's latency is recorded with
/// [`ShedPermit::observe`] and the slot freed on drop.
#[derive(Debug)]
pub struct ShedPermit {
    shedder: LoadShedder,
    key_id: u64,
    started_ns: u64,
    /// The probe this request was admitted in, 0 if none.
    probe: u64,
    cfg: LoadShedding,
    /// When the app's response head arrived, if it did.
    answered_ns: Option<u64>,
}

impl LoadShedder {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a whole value; a panic mid-update leaves a usable state.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits the request of `key_id` at `now_ns` (monotonic), or `Err(limit)` when the app is
    /// at its limit and the key at or over its fair share.
    pub fn try_acquire(
        &self,
        key_id: u64,
        cfg: &LoadShedding,
        now_ns: u64,
    ) -> Result<ShedPermit, u32> {
        let mut st = self.lock();
        let (min, max) = (
            f64::from(cfg.min_concurrency),
            f64::from(cfg.max_concurrency),
        );
        if st.limit == 0.0 {
            // Start low and grow while latency allows: an unknown app is not trusted with
            // its maximum at once.
            st.limit = (min * 4.0).clamp(min, max);
            st.window_start_ns = now_ns;
        }
        st.limit = st.limit.clamp(min, max);
        let limit = if st.probing {
            cfg.min_concurrency
        } else {
            st.limit.floor() as u32
        };
        let held = st.by_key.get(&key_id).copied().unwrap_or(0);
        if st.in_flight >= limit {
            let keys = st.by_key.len() as u32 + u32::from(held == 0);
            let share = (limit / keys.max(1)).max(1);
            if held >= share {
                st.shed_total += 1;
                return Err(limit);
            }
        }
        st.in_flight += 1;
        st.window_peak = st.window_peak.max(st.in_flight);
        *st.by_key.entry(key_id).or_insert(0) += 1;
        Ok(ShedPermit {
            shedder: self.clone(),
            key_id,
            started_ns: now_ns,
            probe: if st.probing { st.probe_epoch } else { 0 },
            cfg: *cfg,
            answered_ns: None,
        })
    }

    pub fn snapshot(&self) -> ShedView {
        let st = self.lock();
        ShedView {
            limit: st.limit.floor() as u32,
            in_flight: st.in_flight,
            shed_total: st.shed_total,
        }
    }
}

impl State {
    fn observe(&mut self, cfg: &LoadShedding, probe: u64, latency_ns: u64, now_ns: u64) {
        let st = self;
        if st.probing {
            // Only requests admitted under the pinned limit measure the baseline.
            if probe != st.probe_epoch {
                return;
            }
            st.window_sum_ns = st.window_sum_ns.saturating_add(latency_ns);
            st.window_count += 1;
            if st.window_count >= WINDOW_SAMPLES {
                st.baseline_ns = (st.window_sum_ns as f64 / f64::from(st.window_count)).max(1.0);
                st.probing = false;
                st.probed_at_ns = now_ns;
                st.windows_at_min = 0;
                st.window_peak = 0;
                st.window_sum_ns = 0;
                st.window_count = 0;
                st.window_start_ns = now_ns;
            }
            return;
        }
        st.window_sum_ns = st.window_sum_ns.saturating_add(latency_ns);
        st.window_count += 1;
        if st.window_count < WINDOW_SAMPLES || now_ns.saturating_sub(st.window_start_ns) < WINDOW_NS
        {
            return;
        }
        let recent = (st.window_sum_ns as f64 / f64::from(st.window_count)).max(1.0);
        let peak = f64::from(st.window_peak);
        st.window_sum_ns = 0;
        st.window_count = 0;
        st.window_peak = st.in_flight;
        st.window_start_ns = now_ns;
        let (min, max) = (
            f64::from(cfg.min_concurrency),
            f64::from(cfg.max_concurrency),
        );
        let tolerance = f64::from(cfg.latency_tolerance_percent) / 100.0;
        let allowed = tolerance * st.baseline_ns;
        let limit = st.limit;
        let next = if recent <= allowed {
            if peak * 2.0 >= limit {
                limit + limit.sqrt()
            } else {
                limit
            }
        } else {
            limit * (allowed / recent).max(0.5)
        };
        st.limit = (0.8 * limit + 0.2 * next).clamp(min, max);
        st.windows_at_min = if st.limit.floor() <= min {
            st.windows_at_min + 1
        } else {
            0
        };
        if st.windows_at_min >= STUCK_WINDOWS
            || now_ns.saturating_sub(st.probed_at_ns) >= PROBE_INTERVAL_NS
        {
            st.probing = true;
            st.probe_epoch += 1;
        }
    }

    fn release(&mut self, key_id: u64) {
        let st = self;
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(n) = st.by_key.get_mut(&key_id) {
            *n -= 1;
            if *n == 0 {
                st.by_key.remove(&key_id);
            }
        }
    }
}

impl ShedPermit {
    /// Notes that the app's response head arrived at `now_ns`: the request's latency sample,
    /// recorded when the permit is released, under the same lock. Requests the app never
    /// answered are not samples.
    pub fn answered(&mut self, now_ns: u64) {
        self.answered_ns = Some(now_ns);
    }
}

impl Drop for ShedPermit {
    fn drop(&mut self) {
        let mut st = self.shedder.lock();
        if let Some(at) = self.answered_ns {
            st.observe(
                &self.cfg,
                self.probe,
                at.saturating_sub(self.started_ns),
                at,
            );
        }
        st.release(self.key_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn cfg() -> LoadShedding {
        LoadShedding {
            min_concurrency: 2,
            max_concurrency: 100,
            latency_tolerance_percent: 150,
        }
    }

    /// `rounds` rounds of a saturating client: each takes every slot the shedder gives key 1,
    /// and they all answer `step` later after `latency`.
    fn load(s: &LoadShedder, now: &mut u64, latency: u64, step: u64, rounds: u32) {
        load_with(s, now, |_| latency, step, rounds);
    }

    /// [`load`] with the latency a function of how many requests are in flight.
    fn load_with(
        s: &LoadShedder,
        now: &mut u64,
        latency: impl Fn(u64) -> u64,
        step: u64,
        rounds: u32,
    ) {
        for _ in 0..rounds {
            let mut permits: Vec<_> = (0..1_000)
                .map_while(|_| s.try_acquire(1, &cfg(), *now).ok())
                .collect();
            *now += step;
            let l = latency(permits.len() as u64);
            for p in &mut permits {
                // Every request took `l`, answered now.
                p.started_ns = *now - l;
                p.answered(*now);
            }
        }
    }

    const STEP: u64 = WINDOW_NS / 4;

    #[test]
    fn the_limit_grows_at_baseline_latency_shrinks_as_it_rises_and_recovers() {
        let s = LoadShedder::default();
        let mut now = 1_000 * MS;
        // The first probe: 2 at a time until 16 have answered.
        load(&s, &mut now, 10 * MS, STEP, 8);
        let start = s.snapshot().limit;
        assert_eq!(start, 8, "starts at 4 x min");
        load(&s, &mut now, 10 * MS, STEP, 200);
        let grown = s.snapshot().limit;
        assert!(
            grown > start * 4,
            "grew from {start} to {grown} at baseline latency"
        );
        // Latency triples, past the 1.5x tolerance: the limit falls to near min.
        load(&s, &mut now, 30 * MS, STEP, 120);
        let shrunk = s.snapshot().limit;
        assert!(shrunk < grown / 4, "{grown} -> {shrunk} under 3x latency");
        // Within tolerance (1.4x) it grows again: latency recovered.
        load(&s, &mut now, 14 * MS, STEP, 240);
        let recovered = s.snapshot().limit;
        assert!(
            recovered > shrunk * 4,
            "{shrunk} -> {recovered} after recovery"
        );
    }

    #[test]
    fn latency_settles_at_the_declared_tolerance() {
        // An app whose latency is 1 ms per request in flight: the limit settles where the
        // latency is 1.5x the baseline, not beyond.
        let s = LoadShedder::default();
        let mut now = 1_000 * MS;
        load_with(&s, &mut now, |in_flight| in_flight * MS, STEP, 2_000);
        // Baseline 2 ms (the probe at min 2), tolerance 1.5: about 3 in flight.
        let limit = s.snapshot().limit;
        assert!((2..=4).contains(&limit), "settled at {limit}");
    }

    #[test]
    fn an_idle_app_earns_no_headroom() {
        let s = LoadShedder::default();
        let mut now = 1_000 * MS;
        load(&s, &mut now, 10 * MS, STEP, 8);
        // One request at a time, at baseline latency, for many windows.
        for _ in 0..2_000 {
            let mut p = s.try_acquire(1, &cfg(), now).expect("under the limit");
            now += STEP / 4;
            p.answered(now);
        }
        assert_eq!(s.snapshot().limit, 8);
    }

    #[test]
    fn a_scheduled_probe_re_measures_a_baseline_taken_in_a_busy_moment() {
        let s = LoadShedder::default();
        let mut now = 1_000 * MS;
        // First probe at 40 ms (a busy moment), then the app is at 10 ms for good.
        load(&s, &mut now, 40 * MS, STEP, 8);
        load(&s, &mut now, 10 * MS, STEP, 100);
        // 30 ms is within 1.5 x 40 ms: nothing falls before the next probe.
        let before = s.snapshot().limit;
        load(&s, &mut now, 30 * MS, STEP, 40);
        assert!(
            s.snapshot().limit >= before,
            "{before} -> {:?}",
            s.snapshot()
        );
        // A minute on, the probe measures 10 ms, and 30 ms is now 3x the baseline.
        load(&s, &mut now, 10 * MS, PROBE_INTERVAL_NS / 100, 100);
        load(&s, &mut now, 10 * MS, STEP, 20);
        let before = s.snapshot().limit;
        load(&s, &mut now, 30 * MS, STEP, 120);
        assert!(
            s.snapshot().limit < before / 4,
            "{before} -> {:?}",
            s.snapshot()
        );
    }

    #[test]
    fn a_limit_stuck_at_min_re_probes_an_app_that_got_slower_for_good() {
        let s = LoadShedder::default();
        let mut now = 1_000 * MS;
        load(&s, &mut now, 10 * MS, STEP, 8);
        load(&s, &mut now, 10 * MS, STEP, 100);
        // A new release answers in 100 ms at any load: the limit falls to min, then a probe
        // takes 100 ms as the baseline and it grows again.
        load(&s, &mut now, 100 * MS, STEP, 200);
        assert_eq!(s.snapshot().limit, 2);
        load(&s, &mut now, 100 * MS, STEP, 400);
        assert!(s.snapshot().limit > 8, "{:?}", s.snapshot());
    }

    #[test]
    fn at_the_limit_only_keys_over_their_fair_share_are_shed() {
        let s = LoadShedder::default();
        let c = cfg();
        let mut now = 1_000 * MS;
        // The first probe: the limit is pinned to min (2) until 16 requests have answered.
        let probe: Vec<_> = (0..2)
            .map(|_| s.try_acquire(1, &c, 0).expect("under min"))
            .collect();
        assert!(
            s.try_acquire(1, &c, 0).is_err(),
            "pinned to min while probing"
        );
        drop(probe);
        load(&s, &mut now, 10 * MS, STEP, 8);
        let shed_before = s.snapshot().shed_total;
        // Limit 8: a heavy key takes all 8 slots.
        let heavy: Vec<_> = (0..8)
            .map(|_| s.try_acquire(1, &c, 0).expect("under the limit"))
            .collect();
        assert_eq!(
            s.try_acquire(1, &c, 0).err(),
            Some(8),
            "heavy is over its share"
        );
        // Light keys under their share (8 / 2 keys = 4 each) still get in.
        let light: Vec<_> = (0..4)
            .map(|_| s.try_acquire(2, &c, 0).expect("light key under its share"))
            .collect();
        assert!(
            s.try_acquire(2, &c, 0).is_err(),
            "light at its share is shed too"
        );
        assert_eq!(s.snapshot().shed_total, shed_before + 2);
        // As the heavy key's requests end, it is still over its share until it drains to it.
        drop(heavy);
        assert_eq!(s.snapshot().in_flight, 4);
        assert!(s.try_acquire(1, &c, 0).is_ok(), "under the limit again");
        drop(light);
        assert_eq!(s.snapshot().in_flight, 0);
    }
}
