//! Turning sidecars' usage reports into `Exhausted` conditions (pure: no I/O, no clock).
//!
//! Every sidecar pushes a [`UsageReport`] every few seconds. The [`ReportBook`] keeps the
//! latest one per sidecar; a report older than `stale_after` is forgotten, so a sidecar that
//! stopped cannot leave a key exhausted forever. A key exhausted on any fresh sidecar is
//! exhausted: with local counters each replica refuses on its own.

use std::collections::BTreeMap;

use keylimit_dataplane::{Exhaustion, ExhaustionReason, QuotaUsage, UsageReport};

/// (namespace, policy name)
pub type PolicyId = (String, String);

#[derive(Debug, Default)]
pub struct ReportBook {
    /// policy → sidecar → (report, unix seconds received)
    reports: BTreeMap<PolicyId, BTreeMap<String, (UsageReport, i64)>>,
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

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyView {
    pub sidecars: usize,
    pub keys: BTreeMap<String, KeyView>,
}

impl ReportBook {
    pub fn record(&mut self, report: UsageReport, now: i64) {
        let id = (report.policy_namespace.clone(), report.policy_name.clone());
        self.reports
            .entry(id)
            .or_default()
            .insert(report.sidecar.clone(), (report, now));
    }

    /// Drops reports older than `stale_after` seconds.
    pub fn expire(&mut self, now: i64, stale_after: i64) {
        for sidecars in self.reports.values_mut() {
            sidecars.retain(|_, (_, at)| now - *at <= stale_after);
        }
        self.reports.retain(|_, s| !s.is_empty());
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyId> {
        self.reports.keys()
    }

    /// Aggregates a policy's fresh reports. Exhaustions whose reset has passed are ignored
    /// even if the sidecar has not reported since: the key recovers on time, not on the next
    /// report.
    pub fn view(&self, policy: &PolicyId, now: i64) -> PolicyView {
        let Some(sidecars) = self.reports.get(policy) else {
            return PolicyView::default();
        };
        let mut view = PolicyView {
            sidecars: sidecars.len(),
            keys: BTreeMap::new(),
        };
        for (report, _) in sidecars.values() {
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
        view
    }
}

/// The `Exhausted` condition's reason for an exhaustion. DryRun reasons are distinct so that
/// `kubectl wait --for=condition=Exhausted` never fires for a key that is still served.
pub fn reason(e: &Exhaustion) -> &'static str {
    match (e.dry_run, e.reason) {
        (false, ExhaustionReason::RateLimited) => "RateLimited",
        (false, ExhaustionReason::QuotaExceeded) => "QuotaExceeded",
        (false, ExhaustionReason::ConcurrencyLimited) => "ConcurrencyLimited",
        (false, ExhaustionReason::Throttled) => "Throttled",
        (true, ExhaustionReason::RateLimited) => "WouldBeRateLimited",
        (true, ExhaustionReason::QuotaExceeded) => "WouldExceedQuota",
        (true, ExhaustionReason::ConcurrencyLimited) => "WouldBeConcurrencyLimited",
        (true, ExhaustionReason::Throttled) => "WouldBeThrottled",
    }
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
                .map(|q| format!("{} {}/{}", q.name, q.used, q.limit))
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

    #[test]
    fn exhausted_on_one_replica_is_exhausted() {
        let mut book = ReportBook::default();
        book.record(
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
        book.record(mk_report("b", vec![mk_usage("k", None, 9)]), 100);
        book.record(mk_report("c", vec![]), 100);
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
    }

    #[test]
    fn the_longest_exhaustion_is_reported() {
        let mut book = ReportBook::default();
        book.record(
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
        book.record(
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
        book.record(
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
        book.record(
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
        assert_eq!(book.policies().count(), 0);
    }

    #[test]
    fn dry_run_is_reported_but_not_exhausted() {
        let mut e = mk_exhaustion(ExhaustionReason::ConcurrencyLimited, 160);
        e.dry_run = true;
        let mut book = ReportBook::default();
        book.record(mk_report("a", vec![mk_usage("k", Some(e), 0)]), 100);
        let s = key_status(book.view(&id(), 100).keys.get("k"), 1);
        assert!(!s.exhausted);
        assert_eq!(s.reason, "WouldBeConcurrencyLimited");
        assert!(s.message.starts_with("DryRun, not enforced: "));
        assert_eq!(s.exhausted_until, None);
    }

    #[test]
    fn a_newer_report_replaces_the_sidecars_older_one() {
        let mut book = ReportBook::default();
        book.record(
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
        book.record(mk_report("a", vec![mk_usage("k", None, 0)]), 101);
        let v = book.view(&id(), 101);
        assert_eq!(v.sidecars, 1);
        assert!(!key_status(v.keys.get("k"), 1).exhausted);
    }
}
