//! Turning sidecars' usage reports into `Exhausted` conditions (pure: no I/O, no clock).
//!
//! Every sidecar pushes a [`UsageReport`] every few seconds. The [`ReportBook`] keeps the
//! latest one per *authenticated pod* (its uid, taken from the pod-bound token the operator
//! reviewed, never from the report's self-declared `sidecar` field), so one pod cannot
//! overwrite or clear another pod's report, and the sidecar count that divides
//! `LocalFallback` limits counts distinct pods only. A report older than `stale_after` is
//! forgotten, so a sidecar that stopped cannot leave a key exhausted forever. A key exhausted
//! on any fresh sidecar is exhausted: with local counters each replica refuses on its own.
//!
//! The book is bounded per namespace (sidecars and report bytes): a namespace's pods can fill
//! their own namespace's share, never the operator's memory.

use std::collections::{BTreeMap, HashMap};

use keylimit_dataplane::{Exhaustion, ExhaustionReason, QuotaUsage, UsageReport};

/// (namespace, policy name)
pub type PolicyId = (String, String);

/// Who sent a report, as authenticated: from the TokenReview's pod-bound claims and the pod
/// object itself, not from anything in the report body.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reporter {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    /// The pod's `keylimit.dev/policy` annotation: the only policy it may report for.
    pub policy: String,
}

/// How much of the book one namespace may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BookLimits {
    /// Distinct reporting pods per namespace.
    pub sidecars_per_namespace: usize,
    /// Sum of the reports' body sizes per namespace.
    pub bytes_per_namespace: usize,
}

impl Default for BookLimits {
    fn default() -> Self {
        Self {
            sidecars_per_namespace: 1000,
            bytes_per_namespace: 64 * 1024 * 1024,
        }
    }
}

/// A report the book refused because its namespace is at its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookFull {
    Sidecars(usize),
    Bytes(usize),
}

impl std::fmt::Display for BookFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BookFull::Sidecars(n) => write!(f, "namespace already has {n} reporting sidecars"),
            BookFull::Bytes(n) => write!(f, "namespace reports already hold {n} bytes"),
        }
    }
}

#[derive(Debug)]
struct Entry {
    namespace: String,
    policy: String,
    report: UsageReport,
    bytes: usize,
    at: i64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    sidecars: usize,
    bytes: usize,
}

#[derive(Debug, Default)]
pub struct ReportBook {
    limits: BookLimits,
    /// pod uid → its latest report
    entries: HashMap<String, Entry>,
    per_namespace: HashMap<String, Usage>,
}

/// What the fresh reports say about one key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyView {
    /// Sidecars that refuse (or in DryRun would refuse) the key now.
    pub exhausted_on: usize,
    /// The exhaustion that lasts longest among them.
    pub worst: Option<Exhaustion>,
    /// Per quota, the highest use any sidecar reports.
    pub quotas: Vec<QuotaUsage>,
}

/// Sidecars that say they reject the config they are given (and serve an older one).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigFailures {
    pub failing: usize,
    /// The earliest `since` among them.
    pub since: Option<i64>,
    /// reason label → sidecars reporting it
    pub reasons: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyView {
    pub sidecars: usize,
    pub keys: BTreeMap<String, KeyView>,
    pub config: ConfigFailures,
}

impl ReportBook {
    pub fn new(limits: BookLimits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Keeps `report` as `who`'s latest (replacing its previous one), unless `who` is a new
    /// sidecar in a namespace at its limit. `bytes` is the report's size on the wire. Reports
    /// already stale are dropped first, so a namespace's share frees up as pods go away.
    pub fn record(
        &mut self,
        who: &Reporter,
        report: UsageReport,
        bytes: usize,
        now: i64,
        stale_after: i64,
    ) -> Result<(), BookFull> {
        if let Err(full) = self.fits(who, bytes) {
            self.expire(now, stale_after);
            if self.fits(who, bytes).is_err() {
                return Err(full);
            }
        }
        let usage = self.per_namespace.entry(who.namespace.clone()).or_default();
        usage.bytes += bytes;
        usage.sidecars += 1;
        let entry = Entry {
            namespace: who.namespace.clone(),
            policy: who.policy.clone(),
            report,
            bytes,
            at: now,
        };
        if let Some(old) = self.entries.insert(who.pod_uid.clone(), entry) {
            // The uid is globally unique, so the old entry is in the same namespace.
            if let Some(u) = self.per_namespace.get_mut(&old.namespace) {
                u.bytes = u.bytes.saturating_sub(old.bytes);
                u.sidecars = u.sidecars.saturating_sub(1);
            }
        }
        Ok(())
    }

    fn fits(&self, who: &Reporter, bytes: usize) -> Result<(), BookFull> {
        let usage = self
            .per_namespace
            .get(&who.namespace)
            .copied()
            .unwrap_or_default();
        let (sidecars, old_bytes) = match self.entries.get(&who.pod_uid) {
            Some(e) => (usage.sidecars, e.bytes),
            None => (usage.sidecars + 1, 0),
        };
        if sidecars > self.limits.sidecars_per_namespace {
            return Err(BookFull::Sidecars(usage.sidecars));
        }
        if usage.bytes.saturating_sub(old_bytes) + bytes > self.limits.bytes_per_namespace {
            return Err(BookFull::Bytes(usage.bytes));
        }
        Ok(())
    }

    /// Drops reports older than `stale_after` seconds.
    pub fn expire(&mut self, now: i64, stale_after: i64) {
        let per_namespace = &mut self.per_namespace;
        self.entries.retain(|_, e| {
            let keep = now - e.at <= stale_after;
            if !keep {
                if let Some(u) = per_namespace.get_mut(&e.namespace) {
                    u.bytes = u.bytes.saturating_sub(e.bytes);
                    u.sidecars = u.sidecars.saturating_sub(1);
                }
            }
            keep
        });
        self.per_namespace.retain(|_, u| u.sidecars > 0);
    }

    /// Reporting sidecars in a namespace (for tests and metrics).
    pub fn sidecars_in(&self, namespace: &str) -> usize {
        self.per_namespace.get(namespace).map_or(0, |u| u.sidecars)
    }

    /// Aggregates every policy's fresh reports in one pass. Exhaustions whose reset has
    /// passed are ignored even if the sidecar has not reported since: the key recovers on
    /// time, not on the next report.
    pub fn views(&self, now: i64) -> BTreeMap<PolicyId, PolicyView> {
        let mut views: BTreeMap<PolicyId, PolicyView> = BTreeMap::new();
        for e in self.entries.values() {
            let view = views
                .entry((e.namespace.clone(), e.policy.clone()))
                .or_default();
            add(view, &e.report, now);
        }
        views
    }

    /// One policy's view (see [`ReportBook::views`]).
    pub fn view(&self, policy: &PolicyId, now: i64) -> PolicyView {
        let mut view = PolicyView::default();
        for e in self.entries.values() {
            if e.namespace == policy.0 && e.policy == policy.1 {
                add(&mut view, &e.report, now);
            }
        }
        view
    }
}

fn add(view: &mut PolicyView, report: &UsageReport, now: i64) {
    view.sidecars += 1;
    if let Some(f) = &report.config_failure {
        let c = &mut view.config;
        c.failing += 1;
        c.since = Some(c.since.map_or(f.since, |s| s.min(f.since)));
        *c.reasons.entry(reason_label(&f.reason)).or_default() += 1;
    }
    for k in &report.keys {
        let kv = view.keys.entry(k.name.clone()).or_default();
        if let Some(e) = k.exhaustion.as_ref().filter(|e| e.reset_at > now) {
            kv.exhausted_on += 1;
            if kv.worst.as_ref().is_none_or(|w| e.reset_at > w.reset_at) {
                kv.worst = Some(e.clone());
            }
        }
        for q in &k.quotas {
            match kv.quotas.iter_mut().find(|x| x.name == q.name) {
                Some(x) if q.used > x.used => *x = q.clone(),
                Some(_) => {}
                None => kv.quotas.push(q.clone()),
            }
        }
    }
}

/// The sidecar's failure reason is meant to be a short label; it still comes from a pod, so
/// only a bounded, plain form of it reaches a condition message.
fn reason_label(reason: &str) -> String {
    let s: String = reason
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(32)
        .collect();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

/// Distinct reasons listed in a `ConfigLoaded` message; the rest are counted.
const MAX_REASONS_SHOWN: usize = 4;

/// The policy's `ConfigLoaded` condition from the fresh reports: (status, reason, message).
/// True unless a fresh report carries a config failure. The True message carries no counts,
/// so scaling the workload causes no status write.
pub fn config_loaded(view: Option<&PolicyView>) -> (bool, &'static str, String) {
    let Some(v) = view.filter(|v| v.config.failing > 0) else {
        return (
            true,
            "SidecarsAcceptConfig",
            "no fresh sidecar report says it rejects the config".into(),
        );
    };
    let c = &v.config;
    let mut reasons: Vec<(&String, &usize)> = c.reasons.iter().collect();
    // Most common first; ties by name, so the message is stable.
    reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut shown: Vec<String> = reasons
        .iter()
        .take(MAX_REASONS_SHOWN)
        .map(|(r, n)| format!("{r} ({n})"))
        .collect();
    if reasons.len() > MAX_REASONS_SHOWN {
        shown.push(format!("{} more", reasons.len() - MAX_REASONS_SHOWN));
    }
    let since = c.since.map(rfc3339).unwrap_or_default();
    (
        false,
        "SidecarRejectsConfig",
        format!(
            "{} of {} sidecars reject the config and serve an older one since {since}: {}",
            c.failing,
            v.sidecars,
            shown.join(", ")
        ),
    )
}

/// The `Exhausted` condition's reason for an exhaustion. DryRun reasons are distinct so that
/// `kubectl wait --for=condition=Exhausted` never fires for a key that is still served.
pub fn reason(e: &Exhaustion) -> &'static str {
    match (e.dry_run, e.reason) {
        (false, ExhaustionReason::RateLimited) => "RateLimited",
        (false, ExhaustionReason::QuotaExceeded) => "QuotaExceeded",
        (false, ExhaustionReason::ConcurrencyLimited) => "ConcurrencyLimited",
        (false, ExhaustionReason::Throttled) => "Throttled",
        // Shedding is never dry-run: it protects the app, whatever the policy's mode.
        (_, ExhaustionReason::Shed) => "Shed",
        (true, ExhaustionReason::RateLimited) => "WouldBeRateLimited",
        (true, ExhaustionReason::QuotaExceeded) => "WouldExceedQuota",
        (true, ExhaustionReason::ConcurrencyLimited) => "WouldBeConcurrencyLimited",
        (true, ExhaustionReason::Throttled) => "WouldBeThrottled",
    }
}

/// The policy's `LoadShedding` condition from the fresh reports: (status, reason, message).
/// The True message names no counts that change every second, so a steady overload causes no
/// status writes beyond the transition.
pub fn load_shedding(view: Option<&PolicyView>) -> (bool, &'static str, String) {
    let shed: Vec<&str> = view
        .map(|v| {
            v.keys
                .iter()
                .filter(|(_, k)| {
                    k.worst
                        .as_ref()
                        .is_some_and(|w| w.reason == ExhaustionReason::Shed)
                })
                .map(|(name, _)| name.as_str())
                .collect()
        })
        .unwrap_or_default();
    if shed.is_empty() {
        return (
            false,
            "NotShedding",
            "no fresh sidecar report shows requests shed".into(),
        );
    }
    let mut names: Vec<&str> = shed.iter().take(MAX_REASONS_SHOWN).copied().collect();
    let more = shed.len().saturating_sub(MAX_REASONS_SHOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    names.sort_unstable();
    (
        true,
        "Shedding",
        format!(
            "the app is at its adaptive concurrency limit; requests of keys over their fair share are shed with 503: {}{more}",
            names.join(", ")
        ),
    )
}

/// What the ApiKey status should say: (Exhausted?, reason, message, exhaustedUntil, usage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub exhausted: bool,
    pub reason: String,
    pub message: String,
    pub exhausted_until: Option<String>,
    pub usage: Option<String>,
}

pub fn rfc3339(unix: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

pub fn key_status(view: Option<&KeyView>, sidecars: usize) -> KeyStatus {
    let usage = view.and_then(|v| {
        (!v.quotas.is_empty()).then(|| {
            v.quotas
                .iter()
                .map(|q| match q.unit {
                    keylimit_dataplane::Unit::Requests => {
                        format!("{} {}/{}", q.name, q.used, q.limit)
                    }
                    unit => format!("{} {}/{} {}", q.name, q.used, q.limit, unit.as_str()),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
    });
    match view.and_then(|v| v.worst.as_ref().map(|w| (v, w))) {
        Some((v, w)) => {
            let scope = if sidecars > 1 {
                format!(" on {} of {} sidecars", v.exhausted_on, sidecars)
            } else {
                String::new()
            };
            let prefix = if w.dry_run {
                "DryRun, not enforced: "
            } else {
                ""
            };
            KeyStatus {
                // A DryRun key is still served, so it is not exhausted; the reason says why
                // it would be.
                exhausted: !w.dry_run,
                reason: reason(w).to_string(),
                message: format!(
                    "{prefix}{}{scope}; resets {}",
                    w.message,
                    rfc3339(w.reset_at)
                ),
                exhausted_until: (!w.dry_run).then(|| rfc3339(w.reset_at)),
                usage,
            }
        }
        None => KeyStatus {
            exhausted: false,
            reason: "WithinLimits".into(),
            message: "no sidecar reports this key exhausted".into(),
            exhausted_until: None,
            usage,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylimit_dataplane::KeyUsage;

    fn mk_exhaustion(reason: ExhaustionReason, reset_at: i64) -> Exhaustion {
        Exhaustion {
            reason,
            limit: "per-minute".into(),
            message: "rate per-minute (10 per 60s) exceeded".into(),
            reset_at,
            dry_run: false,
        }
    }

    fn mk_report(sidecar: &str, keys: Vec<KeyUsage>) -> UsageReport {
        UsageReport {
            sidecar: sidecar.into(),
            policy_namespace: "ns".into(),
            policy_name: "p".into(),
            policy_generation: 1,
            now: 0,
            keys,
            config_failure: None,
        }
    }

    fn mk_usage(name: &str, e: Option<Exhaustion>, used: u64) -> KeyUsage {
        KeyUsage {
            name: name.into(),
            exhaustion: e,
            quotas: vec![QuotaUsage {
                unit: keylimit_dataplane::Unit::Requests,
                name: "month".into(),
                used,
                limit: 100,
                reset_at: 2_000,
            }],
        }
    }

    fn id() -> PolicyId {
        ("ns".into(), "p".into())
    }

    fn pod(uid: &str) -> Reporter {
        Reporter {
            namespace: "ns".into(),
            pod: format!("pod-{uid}"),
            pod_uid: uid.into(),
            policy: "p".into(),
        }
    }

    /// Records under the pod named by the report's `sidecar` field (the tests' shorthand).
    fn rec(book: &mut ReportBook, report: UsageReport, now: i64) {
        let who = pod(&report.sidecar.clone());
        assert_eq!(book.record(&who, report, 100, now, 10), Ok(()));
    }

    #[test]
    fn exhausted_on_one_replica_is_exhausted() {
        let mut book = ReportBook::default();
        rec(
            &mut book,
            mk_report(
                "a",
                vec![mk_usage(
                    "k",
                    Some(mk_exhaustion(ExhaustionReason::RateLimited, 160)),
                    5,
                )],
            ),
            100,
        );
        rec(&mut book, mk_report("b", vec![mk_usage("k", None, 9)]), 100);
        rec(&mut book, mk_report("c", vec![]), 100);
        let v = book.view(&id(), 100);
        assert_eq!(v.sidecars, 3);
        let s = key_status(v.keys.get("k"), v.sidecars);
        assert!(s.exhausted);
        assert_eq!(s.reason, "RateLimited");
        assert_eq!(
            s.message,
            "rate per-minute (10 per 60s) exceeded on 1 of 3 sidecars; resets 1970-01-01T00:02:40Z"
        );
        assert_eq!(s.exhausted_until.as_deref(), Some("1970-01-01T00:02:40Z"));
        assert_eq!(s.usage.as_deref(), Some("month 9/100"), "highest use wins");
        let mut tokens = mk_usage("t", None, 1_200);
        for q in &mut tokens.quotas {
            q.unit = keylimit_dataplane::Unit::Tokens;
        }
        rec(&mut book, mk_report("c", vec![tokens]), 100);
        let v = book.view(&id(), 100);
        let s = key_status(v.keys.get("t"), v.sidecars);
        assert_eq!(
            s.usage.as_deref(),
            Some("month 1200/100 tokens"),
            "the unit is named"
        );
        assert!(!load_shedding(Some(&v)).0, "a rate limit is not shedding");
        let mut shed = ReportBook::default();
        rec(
            &mut shed,
            mk_report(
                "a",
                vec![
                    mk_usage("noisy", Some(mk_exhaustion(ExhaustionReason::Shed, 101)), 0),
                    mk_usage(
                        "k",
                        Some(mk_exhaustion(ExhaustionReason::RateLimited, 160)),
                        0,
                    ),
                ],
            ),
            100,
        );
        let v = shed.view(&id(), 100);
        let (on, reason, message) = load_shedding(Some(&v));
        assert!(on);
        assert_eq!(reason, "Shedding");
        assert!(message.ends_with(": noisy"), "{message}");
        assert_eq!(key_status(v.keys.get("noisy"), 1).reason, "Shed");
    }

    #[test]
    fn the_longest_exhaustion_is_reported() {
        let mut book = ReportBook::default();
        rec(
            &mut book,
            mk_report(
                "a",
                vec![mk_usage(
                    "k",
                    Some(mk_exhaustion(ExhaustionReason::RateLimited, 160)),
                    0,
                )],
            ),
            100,
        );
        rec(
            &mut book,
            mk_report(
                "b",
                vec![mk_usage(
                    "k",
                    Some(mk_exhaustion(ExhaustionReason::QuotaExceeded, 5000)),
                    0,
                )],
            ),
            100,
        );
        let v = book.view(&id(), 100);
        let s = key_status(v.keys.get("k"), v.sidecars);
        assert_eq!(s.reason, "QuotaExceeded");
        assert!(s.message.contains("on 2 of 2 sidecars"));
    }

    #[test]
    fn recovers_at_reset_time_without_a_new_report() {
        let mut book = ReportBook::default();
        rec(
            &mut book,
            mk_report(
                "a",
                vec![mk_usage(
                    "k",
                    Some(mk_exhaustion(ExhaustionReason::RateLimited, 160)),
                    0,
                )],
            ),
            100,
        );
        assert!(key_status(book.view(&id(), 159).keys.get("k"), 1).exhausted);
        let s = key_status(book.view(&id(), 160).keys.get("k"), 1);
        assert!(!s.exhausted);
        assert_eq!(s.reason, "WithinLimits");
    }

    #[test]
    fn stale_reports_expire() {
        let mut book = ReportBook::default();
        rec(
            &mut book,
            mk_report(
                "a",
                vec![mk_usage(
                    "k",
                    Some(mk_exhaustion(ExhaustionReason::QuotaExceeded, 10_000)),
                    0,
                )],
            ),
            100,
        );
        book.expire(110, 10);
        assert_eq!(book.view(&id(), 110).sidecars, 1);
        book.expire(111, 10);
        assert_eq!(book.view(&id(), 111).sidecars, 0);
        assert!(!key_status(book.view(&id(), 111).keys.get("k"), 0).exhausted);
        assert_eq!(book.views(111).len(), 0);
        assert_eq!(book.sidecars_in("ns"), 0);
    }

    #[test]
    fn dry_run_is_reported_but_not_exhausted() {
        let mut e = mk_exhaustion(ExhaustionReason::ConcurrencyLimited, 160);
        e.dry_run = true;
        let mut book = ReportBook::default();
        rec(
            &mut book,
            mk_report("a", vec![mk_usage("k", Some(e), 0)]),
            100,
        );
        let s = key_status(book.view(&id(), 100).keys.get("k"), 1);
        assert!(!s.exhausted);
        assert_eq!(s.reason, "WouldBeConcurrencyLimited");
        assert!(s.message.starts_with("DryRun, not enforced: "));
        assert_eq!(s.exhausted_until, None);
    }

    #[test]
    fn a_newer_report_replaces_the_sidecars_older_one() {
        let mut book = ReportBook::default();
        rec(
            &mut book,
            mk_report(
                "a",
                vec![mk_usage(
                    "k",
                    Some(mk_exhaustion(ExhaustionReason::RateLimited, 160)),
                    0,
                )],
            ),
            100,
        );
        rec(&mut book, mk_report("a", vec![mk_usage("k", None, 0)]), 101);
        let v = book.view(&id(), 101);
        assert_eq!(v.sidecars, 1);
        assert!(!key_status(v.keys.get("k"), 1).exhausted);
    }

    #[test]
    fn a_pod_cannot_overwrite_another_pods_report() {
        let mut book = ReportBook::default();
        let exhausted = vec![mk_usage(
            "k",
            Some(mk_exhaustion(ExhaustionReason::RateLimited, 160)),
            0,
        )];
        book.record(&pod("uid-b"), mk_report("b", exhausted), 10, 100, 10)
            .unwrap();
        // Pod A claims to be sidecar "b" and reports the key fine: it only writes its own
        // entry, so B's exhaustion stands and two distinct pods are counted.
        book.record(
            &pod("uid-a"),
            mk_report("b", vec![mk_usage("k", None, 0)]),
            10,
            100,
            10,
        )
        .unwrap();
        let v = book.view(&id(), 100);
        assert_eq!(v.sidecars, 2);
        assert!(key_status(v.keys.get("k"), v.sidecars).exhausted);
        // The same pod reporting again replaces its entry: still two sidecars, not three.
        book.record(&pod("uid-a"), mk_report("a", vec![]), 10, 101, 10)
            .unwrap();
        assert_eq!(book.view(&id(), 101).sidecars, 2);
        assert_eq!(book.sidecars_in("ns"), 2);
    }

    #[test]
    fn a_report_counts_only_for_the_pods_own_policy() {
        let mut book = ReportBook::default();
        let mut who = pod("u");
        who.policy = "other".into();
        // The body names policy "p"; the book files it under the pod's annotated policy.
        book.record(&who, mk_report("u", vec![]), 10, 100, 10)
            .unwrap();
        assert_eq!(book.view(&id(), 100).sidecars, 0);
        assert_eq!(book.view(&("ns".into(), "other".into()), 100).sidecars, 1);
    }

    #[test]
    fn namespaces_are_capped_in_sidecars_and_bytes() {
        let mut book = ReportBook::new(BookLimits {
            sidecars_per_namespace: 2,
            bytes_per_namespace: 1000,
        });
        book.record(&pod("a"), mk_report("a", vec![]), 100, 100, 10)
            .unwrap();
        book.record(&pod("b"), mk_report("b", vec![]), 100, 100, 10)
            .unwrap();
        assert_eq!(
            book.record(&pod("c"), mk_report("c", vec![]), 100, 100, 10),
            Err(BookFull::Sidecars(2))
        );
        // Known pods may still replace their reports, up to the byte budget.
        book.record(&pod("a"), mk_report("a", vec![]), 900, 101, 10)
            .unwrap();
        assert_eq!(
            book.record(&pod("b"), mk_report("b", vec![]), 200, 101, 10),
            Err(BookFull::Bytes(1000))
        );
        // Another namespace has its own share.
        let mut elsewhere = pod("z");
        elsewhere.namespace = "other".into();
        book.record(&elsewhere, mk_report("z", vec![]), 100, 102, 10)
            .unwrap();
        // Once a's and b's reports are stale, c fits.
        book.record(&pod("c"), mk_report("c", vec![]), 100, 112, 10)
            .unwrap();
        assert_eq!(book.sidecars_in("ns"), 1);
        assert_eq!(book.sidecars_in("other"), 1);
    }

    fn failing(sidecar: &str, reason: &str, since: i64) -> UsageReport {
        let mut r = mk_report(sidecar, vec![]);
        r.config_failure = Some(keylimit_dataplane::ConfigFailure {
            reason: reason.into(),
            since,
        });
        r
    }

    #[test]
    fn config_failures_aggregate_into_config_loaded() {
        let mut book = ReportBook::default();
        let (ok, reason, _) = config_loaded(None);
        assert!(ok);
        assert_eq!(reason, "SidecarsAcceptConfig");

        rec(&mut book, failing("a", "json", 200), 300);
        rec(&mut book, failing("b", "json", 100), 300);
        rec(&mut book, mk_report("c", vec![]), 300);
        let v = book.view(&id(), 300);
        let (ok, reason, msg) = config_loaded(Some(&v));
        assert!(!ok);
        assert_eq!(reason, "SidecarRejectsConfig");
        assert_eq!(
            msg,
            "2 of 3 sidecars reject the config and serve an older one since \
             1970-01-01T00:01:40Z: json (2)"
        );

        // Reasons are bounded labels, most common first, the tail counted.
        rec(&mut book, failing("c", "shard_digest\n<script>", 300), 301);
        for (i, r) in ["r1", "r2", "r3", "r4"].iter().enumerate() {
            rec(&mut book, failing(&format!("x{i}"), r, 300), 301);
        }
        let (_, _, msg) = config_loaded(Some(&book.view(&id(), 301)));
        assert!(
            msg.ends_with(": json (2), r1 (1), r2 (1), r3 (1), 2 more"),
            "{msg}"
        );
        assert!(msg.starts_with("7 of 7 sidecars"), "{msg}");

        // Back to True once no fresh report carries a failure.
        let mut book = ReportBook::default();
        rec(&mut book, failing("a", "json", 200), 300);
        rec(&mut book, mk_report("a", vec![]), 301);
        assert!(config_loaded(Some(&book.view(&id(), 301))).0);
        // And a failing sidecar that goes stale stops counting.
        rec(&mut book, failing("b", "json", 200), 302);
        book.expire(313, 10);
        assert!(config_loaded(Some(&book.view(&id(), 313))).0);
    }
}
