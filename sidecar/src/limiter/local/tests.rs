use super::*;
use crate::limiter::clock::FakeClock;
use crate::limiter::ThrottleRule;
use chrono::{TimeZone, Utc};
use keylimit_dataplane::{Limits, QuotaAlignment, QuotaPeriod, QuotaWindow, RateWindow};
use proptest::prelude::*;

const S: u64 = NANOS_PER_SEC;
const KEY: u64 = 0xdead_beef_0000_0001;

fn rate(name: &str, requests: u64, period_seconds: u64, burst: u64) -> RateWindow {
    RateWindow {
        unit: keylimit_dataplane::Unit::Requests,
        name: name.into(),
        requests,
        period_seconds,
        burst,
    }
}

fn quota(name: &str, requests: u64, period: QuotaPeriod, alignment: QuotaAlignment) -> QuotaWindow {
    QuotaWindow {
        unit: keylimit_dataplane::Unit::Requests,
        name: name.into(),
        requests,
        period,
        alignment,
    }
}

fn rates(windows: Vec<RateWindow>) -> LimitSet {
    LimitSet::compile(
        &Limits {
            rates: windows,
            ..Limits::default()
        },
        "key",
    )
}

fn setup(now_s: u64) -> (Arc<FakeClock>, Limiter) {
    let clock = Arc::new(FakeClock::at_secs(now_s));
    let limiter = Limiter::new(clock.clone());
    (clock, limiter)
}

fn check(set: &LimitSet) -> Check<'_> {
    Check {
        key_id: KEY,
        key_limits: set,
        route_limits: None,
        policy_limits: None,
        cost: 1,
        reserve: 0,
        throttle: None,
        dry_run: false,
    }
}

fn admits(l: &Limiter, c: &Check<'_>) -> bool {
    matches!(l.decide(c), Decision::Allow(a) if a.dry_run_refusal.is_none())
}

fn count_admitted(l: &Limiter, c: &Check<'_>, tries: usize) -> usize {
    (0..tries).filter(|_| admits(l, c)).count()
}

fn refusal(d: Decision) -> Refusal {
    match d {
        Decision::Refuse(r) => r,
        Decision::Allow(a) => panic!("expected refusal, got {a:?}"),
    }
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
        .unwrap()
        .timestamp() as u64
}

#[test]
fn gcra_without_burst_spaces_requests_one_interval_apart() {
    let (clock, l) = setup(1_000);
    let set = rates(vec![rate("minute", 10, 60, 0)]);
    let c = check(&set);
    assert_eq!(count_admitted(&l, &c, 5), 1);
    let r = refusal(l.decide(&c));
    assert_eq!(r.reason, ExhaustionReason::RateLimited);
    assert_eq!(&*r.name, "minute");
    assert_eq!(r.retry_after_secs(), 6);
    clock.advance_ns(6 * S - 1);
    assert!(!admits(&l, &c), "one nanosecond before the interval ends");
    clock.advance_ns(1);
    assert!(admits(&l, &c), "exactly at the interval edge");
}

#[test]
fn gcra_burst_admits_burst_plus_one_at_once_then_the_rate() {
    let (clock, l) = setup(1_000);
    let set = rates(vec![rate("minute", 10, 60, 4)]);
    let c = check(&set);
    let mut admitted = count_admitted(&l, &c, 20);
    assert_eq!(admitted, 5);
    // Ten tries a second for the rest of the period: one more every 6 s interval.
    for _ in 1..60 {
        clock.advance_secs(1);
        admitted += count_admitted(&l, &c, 10);
    }
    assert_eq!(admitted, 14, "requests + burst within one period");
}

#[test]
fn window_edge_with_uneven_interval_never_admits_an_extra_request() {
    // 3 per 10 s: the interval is rounded up to 3_333_333_334 ns.
    let (clock, l) = setup(50);
    let set = rates(vec![rate("ten", 3, 10, 0)]);
    let c = check(&set);
    let start = clock.now_ns();
    let mut admitted = 0;
    let mut t = start;
    while t < start + 10 * S {
        clock.set_ns(t);
        admitted += count_admitted(&l, &c, 1);
        t += S / 100;
    }
    assert_eq!(admitted, 3);
    clock.set_ns(start + 11 * S);
    assert!(admits(&l, &c));
}

#[test]
fn all_rate_windows_apply_at_once() {
    let (clock, l) = setup(1_000);
    let set = rates(vec![rate("second", 2, 1, 1), rate("minute", 5, 60, 0)]);
    let c = check(&set);
    // The minute window (burst 0) lets one through, then one every 12 s.
    assert_eq!(count_admitted(&l, &c, 10), 1);
    clock.advance_secs(1);
    assert_eq!(count_admitted(&l, &c, 10), 0);
    clock.advance_secs(11);
    assert_eq!(count_admitted(&l, &c, 10), 1);
}

#[test]
fn success_status_reports_most_restrictive_window() {
    let (_clock, l) = setup(1_000);
    let set = rates(vec![rate("second", 100, 1, 99), rate("minute", 10, 60, 9)]);
    let c = check(&set);
    let Decision::Allow(a) = l.decide(&c) else {
        panic!("refused")
    };
    let s = a.status.unwrap();
    assert_eq!(set.name_of(s.id).map(|n| &**n), Some("minute"));
    assert_eq!(s.remaining, 9);
    assert_eq!(s.limit, 10);
    assert_eq!(s.reset_secs, 6);
}

#[test]
fn calendar_day_quota_resets_at_utc_midnight() {
    let (clock, l) = setup(utc(2026, 11, 28, 23, 59, 58));
    let set = LimitSet::compile(
        &Limits {
            quotas: vec![quota(
                "daily",
                3,
                QuotaPeriod::Day,
                QuotaAlignment::Calendar,
            )],
            ..Limits::default()
        },
        "key",
    );
    let c = check(&set);
    assert_eq!(count_admitted(&l, &c, 3), 3);
    let r = refusal(l.decide(&c));
    assert_eq!(r.reason, ExhaustionReason::QuotaExceeded);
    assert_eq!(r.reset_at_secs(), utc(2026, 11, 29, 0, 0, 0) as i64);
    assert_eq!(r.retry_after_secs(), 2);
    clock.set_ns(utc(2026, 11, 29, 0, 0, 0) * S - 1);
    assert!(!admits(&l, &c));
    clock.set_ns(utc(2026, 11, 29, 0, 0, 0) * S);
    assert_eq!(count_admitted(&l, &c, 5), 3);
}

#[test]
fn calendar_month_quota_crosses_month_ends_and_leap_day() {
    for (last, next) in [
        (utc(2026, 1, 31, 23, 59, 59), utc(2026, 2, 1, 0, 0, 0)),
        (utc(2028, 2, 29, 23, 59, 59), utc(2028, 3, 1, 0, 0, 0)),
        (utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1, 0, 0, 0)),
    ] {
        let (clock, l) = setup(last);
        let set = LimitSet::compile(
            &Limits {
                quotas: vec![quota(
                    "monthly",
                    2,
                    QuotaPeriod::Month,
                    QuotaAlignment::Calendar,
                )],
                ..Limits::default()
            },
            "key",
        );
        let c = check(&set);
        assert_eq!(count_admitted(&l, &c, 4), 2);
        assert_eq!(refusal(l.decide(&c)).reset_at_secs(), next as i64);
        clock.set_ns(next * S);
        assert_eq!(count_admitted(&l, &c, 4), 2);
    }
}

#[test]
fn week_quota_resets_monday_and_rolling_quota_from_first_request() {
    // 2026-11-29 is a Sunday.
    let (clock, l) = setup(utc(2026, 11, 29, 12, 0, 0));
    let set = LimitSet::compile(
        &Limits {
            quotas: vec![
                quota("weekly", 1, QuotaPeriod::Week, QuotaAlignment::Calendar),
                quota("rolling", 2, QuotaPeriod::Hour, QuotaAlignment::Rolling),
            ],
            ..Limits::default()
        },
        "key",
    );
    let c = check(&set);
    assert!(admits(&l, &c));
    let r = refusal(l.decide(&c));
    assert_eq!(&*r.name, "weekly");
    assert_eq!(r.reset_at_secs(), utc(2026, 11, 30, 0, 0, 0) as i64);
    clock.set_ns(utc(2026, 11, 30, 0, 0, 0) * S);
    assert!(admits(&l, &c));
    // Rolling hour opened at 12:00 Sunday with two requests now used.
    let r = refusal(l.decide(&c));
    assert!(r.reason == ExhaustionReason::QuotaExceeded);
    clock.set_ns(utc(2026, 11, 29, 13, 0, 0) * S);
    let (clock2, l2) = setup(utc(2026, 11, 29, 12, 30, 0));
    let rolling = LimitSet::compile(
        &Limits {
            quotas: vec![quota(
                "rolling",
                2,
                QuotaPeriod::Hour,
                QuotaAlignment::Rolling,
            )],
            ..Limits::default()
        },
        "key",
    );
    let c2 = check(&rolling);
    assert_eq!(count_admitted(&l2, &c2, 3), 2);
    assert_eq!(
        refusal(l2.decide(&c2)).reset_at_secs(),
        utc(2026, 11, 29, 13, 30, 0) as i64
    );
    clock2.set_ns(utc(2026, 11, 29, 13, 30, 0) * S);
    assert_eq!(count_admitted(&l2, &c2, 3), 2);
}

#[test]
fn concurrency_is_released_when_the_permit_drops() {
    let (_clock, l) = setup(1_000);
    let set = LimitSet::compile(
        &Limits {
            concurrency: Some(2),
            ..Limits::default()
        },
        "key",
    );
    let c = check(&set);
    let Decision::Allow(a) = l.decide(&c) else {
        panic!()
    };
    let Decision::Allow(b) = l.decide(&c) else {
        panic!()
    };
    assert!(a.permit.is_some() && b.permit.is_some());
    let r = refusal(l.decide(&c));
    assert_eq!(r.reason, ExhaustionReason::ConcurrencyLimited);
    assert_eq!(r.limit, 2);
    drop(a);
    let Decision::Allow(_c) = l.decide(&c) else {
        panic!("slot not released")
    };
    drop(b);
    drop(_c);
    assert_eq!(l.evict_idle(), 1, "an idle concurrency slot is evictable");
}

#[test]
fn route_cost_and_route_limits_apply_per_key() {
    let (_clock, l) = setup(1_000);
    let key = LimitSet::compile(
        &Limits {
            quotas: vec![quota(
                "daily",
                10,
                QuotaPeriod::Day,
                QuotaAlignment::Calendar,
            )],
            ..Limits::default()
        },
        "key",
    );
    let route = rates(vec![rate("search", 1, 60, 0)]);
    let mut c = check(&key);
    c.cost = 4;
    assert_eq!(count_admitted(&l, &c, 5), 2, "4 + 4 of 10");
    c.cost = 2;
    c.route_limits = Some(&route);
    assert!(admits(&l, &c), "8 + 2 of 10, first search");
    let mut c3 = check(&key);
    c3.route_limits = Some(&route);
    let r = refusal(l.decide(&c3));
    assert_eq!(r.reason, ExhaustionReason::QuotaExceeded);
}

#[test]
fn policy_limits_are_shared_and_refusal_rolls_back_the_key() {
    let (_clock, l) = setup(1_000);
    let key = LimitSet::compile(
        &Limits {
            quotas: vec![quota(
                "daily",
                100,
                QuotaPeriod::Day,
                QuotaAlignment::Calendar,
            )],
            ..Limits::default()
        },
        "key",
    );
    let policy = rates(vec![rate("all", 3, 60, 2)]);
    let mk = |id| Check {
        key_id: id,
        policy_limits: Some(&policy),
        ..check(&key)
    };
    assert!(admits(&l, &mk(1)));
    assert!(admits(&l, &mk(2)));
    assert!(admits(&l, &mk(3)));
    let r = refusal(l.decide(&mk(4)));
    assert_eq!(&*r.name, "all");
    let daily = &key.quotas[0];
    assert_eq!(l.quota_usage(1, daily).map(|u| u.0), Some(1));
    assert_eq!(l.quota_usage(4, daily).map(|u| u.0), Some(0), "rolled back");
    assert_eq!(
        l.current_refusal(4).map(|r| r.reason),
        Some(ExhaustionReason::RateLimited)
    );
}

#[test]
fn throttle_holds_within_delay_and_queue_then_rejects() {
    let (clock, l) = setup(1_000);
    let set = rates(vec![rate("second", 1, 1, 0)]);
    let mut c = check(&set);
    c.throttle = Some(ThrottleRule {
        max_delay_ns: 2_500_000_000,
        max_queue: 1,
    });
    let Decision::Allow(first) = l.decide(&c) else {
        panic!()
    };
    assert_eq!(first.delay_ns, 0);
    let Decision::Allow(second) = l.decide(&c) else {
        panic!()
    };
    assert_eq!(second.delay_ns, S, "held until its slot one interval later");
    assert_eq!(l.queued(), 1);
    let r = refusal(l.decide(&c));
    assert_eq!(
        r.reason,
        ExhaustionReason::Throttled,
        "queue of one is full"
    );
    drop(second);
    let Decision::Allow(third) = l.decide(&c) else {
        panic!()
    };
    assert_eq!(third.delay_ns, 2 * S, "the throttled try was rolled back");
    drop(third);
    let r = refusal(l.decide(&c));
    assert_eq!(
        r.reason,
        ExhaustionReason::RateLimited,
        "3 s is past the max delay"
    );
    clock.advance_ns(S / 2);
    let Decision::Allow(fourth) = l.decide(&c) else {
        panic!()
    };
    assert_eq!(fourth.delay_ns, 5 * S / 2);
}

#[test]
fn dry_run_reports_but_neither_refuses_nor_charges() {
    let (_clock, l) = setup(1_000);
    let set = LimitSet::compile(
        &Limits {
            quotas: vec![quota(
                "daily",
                1,
                QuotaPeriod::Day,
                QuotaAlignment::Calendar,
            )],
            ..Limits::default()
        },
        "key",
    );
    let mut c = check(&set);
    c.dry_run = true;
    assert!(admits(&l, &c));
    let Decision::Allow(a) = l.decide(&c) else {
        panic!("dry run refused")
    };
    let r = a.dry_run_refusal.unwrap();
    assert!(r.dry_run);
    assert_eq!(l.quota_usage(KEY, &set.quotas[0]).map(|u| u.0), Some(1));
    let ex = l.current_refusal(KEY).unwrap().to_exhaustion();
    assert!(ex.dry_run);
    assert_eq!(ex.reason, ExhaustionReason::QuotaExceeded);
}

#[test]
fn unchanged_limits_keep_counters_across_recompilation() {
    let (_clock, l) = setup(1_000);
    let limits = Limits {
        rates: vec![rate("minute", 10, 60, 2)],
        quotas: vec![quota(
            "daily",
            100,
            QuotaPeriod::Day,
            QuotaAlignment::Calendar,
        )],
        concurrency: None,
    };
    let before = LimitSet::compile(&limits, "key");
    assert_eq!(count_admitted(&l, &check(&before), 10), 3);
    // A reload compiles the same limits again: same ids, same state.
    let after = LimitSet::compile(&limits.clone(), "key");
    assert_eq!(count_admitted(&l, &check(&after), 10), 0);
    assert_eq!(l.quota_usage(KEY, &after.quotas[0]).map(|u| u.0), Some(3));
    // A changed limit starts fresh.
    let mut raised = limits.clone();
    raised.rates[0].requests = 20;
    let changed = LimitSet::compile(&raised, "key");
    assert_eq!(count_admitted(&l, &check(&changed), 10), 3);
    assert_eq!(l.quota_usage(KEY, &changed.quotas[0]).map(|u| u.0), Some(6));
}

#[test]
fn idle_state_is_evicted_without_changing_decisions() {
    let (clock, l) = setup(1_000);
    let set = rates(vec![rate("minute", 10, 60, 9)]);
    for key_id in 1..=1_000u64 {
        let c = Check {
            key_id: key_id << 20,
            ..check(&set)
        };
        assert!(admits(&l, &c));
    }
    assert_eq!(l.slots(), 1_000);
    let busy = l.state_bytes();
    clock.advance_secs(61);
    assert_eq!(l.evict_idle(), 1_000);
    assert_eq!(l.slots(), 0);
    assert!(l.state_bytes() < busy);
    assert_eq!(count_admitted(&l, &check(&set), 20), 10);
}

#[test]
fn refusal_is_reported_only_until_its_reset() {
    let (clock, l) = setup(1_000);
    let set = rates(vec![rate("minute", 1, 60, 0)]);
    let c = check(&set);
    assert!(admits(&l, &c));
    assert!(!admits(&l, &c));
    let r = l.current_refusal(KEY).unwrap();
    assert_eq!(r.reset_at_secs(), 1_060);
    assert_eq!(l.active_keys(), vec![KEY]);
    clock.advance_secs(60);
    assert!(l.current_refusal(KEY).is_none());
    assert!(l.active_keys().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A key with one rate window is decided by `decide_one_rate` (one probe); the same key
    /// with an empty route set beside it takes the general path (check, then commit). Both
    /// give the same answer, headers, reset time and dry-run refusal for every request of a
    /// random sequence of costs and gaps, refused ones included.
    #[test]
    fn one_rate_path_decides_as_the_general_path(
        requests in 1u64..20,
        period in 1u64..10,
        burst in 0u64..5,
        dry_run in any::<bool>(),
        steps in proptest::collection::vec((0u64..2_000_000_000, 1u64..4), 1..200),
    ) {
        let (clock_a, one) = setup(10_000);
        let (clock_b, general) = setup(10_000);
        let set = rates(vec![rate("w", requests, period, burst)]);
        let empty = LimitSet::default();
        let mut refused = 0usize;
        for (gap, cost) in steps {
            clock_a.advance_ns(gap % (period * S));
            clock_b.advance_ns(gap % (period * S));
            let a = Check { cost, dry_run, ..check(&set) };
            let b = Check { route_limits: Some(&empty), ..a };
            prop_assert!(one_rate(&a).is_some() && one_rate(&b).is_none());
            let (da, db) = (one.decide(&a), general.decide(&b));
            let summary = |d: &Decision| match d {
                Decision::Allow(x) => (true, x.status, x.dry_run_refusal.as_deref().cloned(), None),
                Decision::Refuse(r) => (false, None, None, Some(r.clone())),
            };
            let (sa, sb) = (summary(&da), summary(&db));
            refused += usize::from(sa.3.is_some() || sa.2.is_some());
            prop_assert_eq!(format!("{sa:?}"), format!("{sb:?}"));
        }
        // Sequences with no refusal at all would compare only the easy half.
        prop_assume!(refused > 0);
    }

    /// No half-open window of one period ever admits more than requests + burst.
    #[test]
    fn rate_window_never_exceeds_limit_plus_burst(
        requests in 1u64..20,
        period in 1u64..10,
        burst in 0u64..10,
        gaps in proptest::collection::vec(0u64..2_000_000_000, 1..300),
    ) {
        let (clock, l) = setup(10_000);
        let set = rates(vec![rate("w", requests, period, burst)]);
        let c = check(&set);
        let mut admitted = Vec::new();
        for gap in gaps {
            clock.advance_ns(gap % (period * S));
            if admits(&l, &c) {
                admitted.push(clock.now_ns());
            }
        }
        let span = period * S;
        for (i, start) in admitted.iter().enumerate() {
            let in_window = admitted[i..].iter().take_while(|t| **t < start + span).count();
            prop_assert!(in_window as u64 <= requests + burst,
                "{in_window} admitted in one window of {requests}/{period}s burst {burst}");
        }
    }

    /// A calendar quota never admits more than its limit inside one calendar period.
    #[test]
    fn quota_never_exceeds_limit_per_period(
        requests in 1u64..10,
        cost in 1u64..4,
        gaps in proptest::collection::vec(0u64..20_000, 1..200),
    ) {
        let (clock, l) = setup(utc(2026, 1, 30, 0, 0, 0));
        let set = LimitSet::compile(&Limits {
            quotas: vec![quota("h", requests, QuotaPeriod::Hour, QuotaAlignment::Calendar)],
            ..Limits::default()
        }, "key");
        let mut c = check(&set);
        c.cost = cost;
        let mut used: HashMap<u64, u64> = HashMap::new();
        for gap in gaps {
            clock.advance_ns(gap * S / 10);
            if admits(&l, &c) {
                *used.entry(clock.now_ns() / S / 3600).or_default() += cost;
            }
        }
        for (_, u) in used {
            prop_assert!(u <= requests);
        }
    }
}

#[test]
fn a_wall_clock_step_back_neither_refuses_nor_refills_rate_windows() {
    let (clock, l) = setup(1_000_000);
    let set = rates(vec![rate("minute", 10, 60, 9)]);
    let c = check(&set);
    assert_eq!(count_admitted(&l, &c, 5), 5);
    // NTP steps the wall clock back an hour: with wall-time GCRA the stored TATs would lie an
    // hour ahead and every request would be refused for that hour.
    clock.step_wall_ns(-3_600 * S as i64);
    assert_eq!(count_admitted(&l, &c, 5), 5, "the other half of the burst");
    let r = refusal(l.decide(&c));
    assert_eq!(
        r.retry_after_secs(),
        6,
        "reset is a delta on the monotonic timeline"
    );
    assert_eq!(r.now_ns, clock.now_ns(), "timestamps stay wall time");
    assert_eq!(r.reset_at_ns, clock.now_ns() + 6 * S);
    // A step forward must not refill the bucket either.
    clock.step_wall_ns(7_200 * S as i64);
    assert!(!admits(&l, &c));
    clock.advance_secs(6);
    assert!(admits(&l, &c));
    // Eviction keeps the live bucket across the steps.
    l.evict_idle();
    assert!(!admits(&l, &c));
}

#[test]
fn calendar_quotas_follow_the_wall_clock() {
    let (clock, l) = setup(utc(2026, 11, 29, 23, 59, 0));
    let set = LimitSet::compile(
        &Limits {
            quotas: vec![quota(
                "daily",
                1,
                QuotaPeriod::Day,
                QuotaAlignment::Calendar,
            )],
            ..Limits::default()
        },
        "key",
    );
    let c = check(&set);
    assert!(admits(&l, &c));
    assert!(!admits(&l, &c));
    // The wall clock says it is the next day (monotonic time moved only a minute): the day
    // is a calendar fact, so the quota resets.
    clock.step_wall_ns(60 * S as i64);
    assert!(admits(&l, &c));
}

#[test]
fn cost_zero_is_free_but_still_holds_a_concurrency_slot() {
    let (_clock, l) = setup(1_000);
    let set = LimitSet::compile(
        &Limits {
            rates: vec![rate("minute", 1, 60, 0)],
            quotas: vec![quota("daily", 1, QuotaPeriod::Day, QuotaAlignment::Rolling)],
            concurrency: Some(1),
        },
        "key",
    );
    let free = Check {
        cost: 0,
        ..check(&set)
    };
    let Decision::Allow(a) = l.decide(&free) else {
        panic!("a free request is admitted")
    };
    assert!(a.permit.is_some(), "free requests count as in flight");
    assert!(
        matches!(l.decide(&free), Decision::Refuse(r) if r.reason == ExhaustionReason::ConcurrencyLimited)
    );
    drop(a);
    for _ in 0..10 {
        assert!(
            admits(&l, &free),
            "free requests never use up rate or quota"
        );
    }
    assert!(admits(&l, &check(&set)), "the paid budget is untouched");
    assert!(!admits(&l, &check(&set)));
    assert!(admits(&l, &free), "and free stays free once it is spent");
}

fn tokens(set_rates: Vec<RateWindow>, set_quotas: Vec<QuotaWindow>) -> LimitSet {
    let tok = |mut r: RateWindow| {
        r.unit = keylimit_dataplane::Unit::Tokens;
        r
    };
    let tokq = |mut q: QuotaWindow| {
        q.unit = keylimit_dataplane::Unit::Tokens;
        q
    };
    LimitSet::compile(
        &Limits {
            rates: set_rates.into_iter().map(tok).collect(),
            quotas: set_quotas.into_iter().map(tokq).collect(),
            ..Limits::default()
        },
        "key",
    )
}

#[test]
fn a_token_rate_admits_while_tokens_are_left_then_refuses_until_the_debt_is_paid() {
    let (clock, l) = setup(1_000);
    // 600 tokens a minute: one every 100 ms, up to 600 at once.
    let set = tokens(vec![rate("per-minute-tokens", 600, 60, 599)], vec![]);
    let c = check(&set);
    assert!(admits(&l, &c), "a fresh key has tokens");
    // The response reports 1,500 tokens: 900 more than the bucket held, so 90 s of debt.
    l.settle(KEY, [Some(&set), None], None, 0, 1_500);
    let r = refusal(l.decide(&c));
    assert_eq!(r.unit, keylimit_dataplane::Unit::Tokens);
    assert_eq!(r.reason, ExhaustionReason::RateLimited);
    // Admitted again once one token is free: 900 tokens of debt plus one, at 100 ms each.
    assert_eq!(r.retry_after_secs(), 91);
    assert!(r.message().contains("600 tokens/60s"), "{}", r.message());
    clock.advance_ns(90 * S);
    assert!(
        !admits(&l, &c),
        "the debt is paid, but no token is free yet"
    );
    clock.advance_ns(S / 10);
    assert!(admits(&l, &c));
}

#[test]
fn a_reservation_is_charged_up_front_and_reconciled_both_ways() {
    let (_clock, l) = setup(1_000);
    let set = tokens(vec![rate("t", 1_000, 60, 999)], vec![]);
    let c = Check {
        reserve: 600,
        ..check(&set)
    };
    assert!(admits(&l, &c));
    // Two reservations of 600 do not fit in 1,000.
    assert!(!admits(&l, &c));
    // The first response cost only 100: 500 come back, and the second now fits.
    l.settle(KEY, [Some(&set), None], None, 600, 100);
    assert!(admits(&l, &c));
    // Request limits never see tokens: two requests of a 2-request window, each refunded
    // all its tokens, leave the third refused by the request limit.
    let req = rates(vec![rate("r", 2, 60, 1)]);
    let both = Check {
        route_limits: Some(&req),
        ..c
    };
    l.settle(KEY, [Some(&set), None], None, 600, 0);
    l.settle(KEY, [Some(&set), None], None, 600, 0);
    for _ in 0..2 {
        assert!(admits(&l, &both));
        l.settle(KEY, [Some(&set), Some(&req)], None, 600, 0);
    }
    assert_eq!(refusal(l.decide(&both)).name.as_ref(), "r");
}

#[test]
fn a_token_quota_in_debt_waits_for_its_window_and_refunds_stay_in_theirs() {
    let (clock, l) = setup(utc(2026, 5, 10, 12, 0, 0));
    let set = tokens(
        vec![],
        vec![quota(
            "daily-tokens",
            1_000,
            QuotaPeriod::Day,
            QuotaAlignment::Calendar,
        )],
    );
    let c = check(&set);
    assert!(admits(&l, &c));
    l.settle(KEY, [Some(&set), None], None, 0, 1_200);
    let r = refusal(l.decide(&c));
    assert_eq!(r.reason, ExhaustionReason::QuotaExceeded);
    assert_eq!(r.reset_at_secs(), utc(2026, 5, 11, 0, 0, 0) as i64);
    let used = l.quota_usage(KEY, &set.quotas[0]).map(|(u, _)| u);
    assert_eq!(used, Some(1_200), "usage shows the overshoot");
    clock.advance_secs(12 * 3_600);
    assert!(admits(&l, &c), "a new day starts without the old debt");
    // A refund goes back into the window its reservation was taken from.
    let r = Check {
        reserve: 300,
        ..check(&set)
    };
    assert!(admits(&l, &r));
    l.settle(KEY, [Some(&set), None], None, 300, 0);
    assert_eq!(l.quota_usage(KEY, &set.quotas[0]).map(|(u, _)| u), Some(0));
}
