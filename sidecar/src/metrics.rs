//! Prometheus metrics (text exposition via prometheus-client).
//!
//! Per-request counters are resolved to plain `Counter` handles once per config snapshot, so
//! the hot path is one atomic increment, not a label-set hash and a lock.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// What happened to a request; the `decision` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allowed,
    DryRunRefused,
    RateLimited,
    QuotaExceeded,
    ConcurrencyLimited,
    Throttled,
    MissingKey,
    InvalidKey,
    KeyDisabled,
    KeyExpired,
    NotReady,
    /// FailClosed and the shared store (Redis) could not decide in time.
    StoreUnavailable,
    /// A request the sidecar cannot interpret safely (unnormalisable path, two different
    /// keys, a refused upgrade or CONNECT): 4xx before any key lookup.
    BadRequest,
    /// The peer used up its budget of failed key attempts (401/403): refused unchecked.
    AuthThrottled,
    /// The app was at its adaptive concurrency limit and the key over its fair share (503).
    Shed,
}

impl Outcome {
    pub const ALL: [Outcome; 15] = [
        Outcome::Allowed,
        Outcome::DryRunRefused,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::ConcurrencyLimited,
        Outcome::Throttled,
        Outcome::MissingKey,
        Outcome::InvalidKey,
        Outcome::KeyDisabled,
        Outcome::KeyExpired,
        Outcome::NotReady,
        Outcome::StoreUnavailable,
        Outcome::BadRequest,
        Outcome::AuthThrottled,
        Outcome::Shed,
    ];

    /// Also the machine-readable `error` code of the JSON body for refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::DryRunRefused => "dry_run_refused",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::ConcurrencyLimited => "concurrency_limited",
            Outcome::Throttled => "throttled",
            Outcome::MissingKey => "missing_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::KeyDisabled => "key_disabled",
            Outcome::KeyExpired => "key_expired",
            Outcome::NotReady => "not_ready",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::BadRequest => "bad_request",
            Outcome::AuthThrottled => "auth_throttled",
            Outcome::Shed => "shed",
        }
    }

    pub fn from_reason(reason: keylimit_dataplane::ExhaustionReason) -> Self {
        use keylimit_dataplane::ExhaustionReason as R;
        match reason {
            R::RateLimited => Outcome::RateLimited,
            R::QuotaExceeded => Outcome::QuotaExceeded,
            R::ConcurrencyLimited => Outcome::ConcurrencyLimited,
            R::Throttled => Outcome::Throttled,
            R::Shed => Outcome::Shed,
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    policy: String,
    decision: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyRequestLabels {
    policy: String,
    key: String,
    decision: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyReasonLabels {
    policy: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyThresholdLabels {
    policy: String,
    threshold: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyQuotaLabels {
    policy: String,
    quota: String,
}

/// Usage-fraction thresholds of `keylimit_keys_above_usage_ratio`: fixed, so the family has
/// at most this many series per policy.
pub const USAGE_THRESHOLDS: [(f64, &str); 3] = [(0.5, "0.5"), (0.8, "0.8"), (0.95, "0.95")];

/// Quota names with their own `keylimit_quota_usage_ratio_max` series, per policy.
pub const MAX_QUOTA_SERIES: usize = 16;
/// The `quota` label of the series that stands for the quotas beyond [`MAX_QUOTA_SERIES`].
pub const OTHER_QUOTAS: &str = "_other";

/// The `reason` values of `keylimit_exhausted_keys`, one series each (zeros included, so an
/// alert on the series does not depend on a key having been exhausted once).
const EXHAUSTION_REASONS: [keylimit_dataplane::ExhaustionReason; 5] = [
    keylimit_dataplane::ExhaustionReason::RateLimited,
    keylimit_dataplane::ExhaustionReason::QuotaExceeded,
    keylimit_dataplane::ExhaustionReason::ConcurrencyLimited,
    keylimit_dataplane::ExhaustionReason::Throttled,
    keylimit_dataplane::ExhaustionReason::Shed,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: String,
    reason: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    requests_by_key: Option<Family<KeyRequestLabels, Counter>>,
    exhaustions: Family<ReasonLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    pub config_generation: Gauge,
    /// 1 while the latest config reload failed (the last good config keeps serving).
    pub config_stale: Gauge,
    /// Unix seconds of the last config that was loaded (0 = none yet).
    pub config_last_success: Gauge,
    /// Every reload attempt (watcher event, periodic tick, manual), changed or not.
    pub config_reads: Counter,
    /// Reload attempts whose inputs differed from the serving config's and the latest
    /// rejection's, so were parsed.
    pub config_parses: Counter,
    pub in_flight: Gauge,
    /// The app's adaptive concurrency limit (`loadShedding`); 0 until shedding has run.
    pub shed_limit: Gauge,
    /// 1 while the shared store (Redis) answers, 0 while decisions use the fail mode.
    pub store_up: Gauge,
    store_fallbacks: Family<ModeLabels, Counter>,
    store_errors: Family<KindLabels, Counter>,
    pub limiter_slots: Gauge,
    /// Key entries of the current config left out of the index (duplicate or malformed).
    pub config_skipped_keys: Gauge,
    /// Peers whose failed-key budget is tracked (bounded by the table size).
    pub auth_failure_peers: Gauge,
    pub decision_seconds: Histogram,
    /// Time from sending a request to the app until its response head (or the failure).
    pub upstream_seconds: Histogram,
    pub upstream_errors: Counter,
    /// Keys of the served policy refused right now, by reason (this sidecar's view).
    exhausted_keys: Family<PolicyReasonLabels, Gauge>,
    /// Keys at or above a fraction of any of their quotas.
    keys_above_ratio: Family<PolicyThresholdLabels, Gauge>,
    /// Per quota (limit name of the policy): the highest used/limit of any key.
    quota_ratio_max: Family<PolicyQuotaLabels, Gauge<f64, AtomicU64>>,
    /// Per quota: when the period of the key with the highest fraction ends.
    quota_ratio_max_reset: Family<PolicyQuotaLabels, Gauge>,
    reports: Family<ReportLabels, Counter>,
    /// Refusals so far, readable without touching the registry (the reporter polls it).
    exhaustions_seen: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReportLabels {
    result: &'static str,
}

/// Counter handles for one policy, one per [`Outcome`].
#[derive(Debug, Clone)]
pub struct PolicyCounters {
    by_outcome: Vec<Counter>,
}

impl PolicyCounters {
    pub fn inc(&self, o: Outcome) {
        if let Some(c) = self.by_outcome.get(o as usize) {
            c.inc();
        }
    }
}

impl Metrics {
    pub fn new(per_key: bool) -> Self {
        let mut registry = Registry::with_prefix("keylimit");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by policy and decision",
            requests.clone(),
        );
        let requests_by_key = per_key.then(|| {
            let f = Family::<KeyRequestLabels, Counter>::default();
            registry.register(
                "key_requests",
                "Requests by policy, key and decision (opt-in: one series per key)",
                f.clone(),
            );
            f
        });
        let exhaustions = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "exhaustions",
            "Refusals (or dry-run would-be refusals) by reason",
            exhaustions.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reload attempts by result: success, failure (with reason), or unchanged (same inputs as the serving config or the latest rejection, not parsed)",
            reloads.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "Number of configs loaded by this sidecar (0 = none yet)",
            config_generation.clone(),
        );
        let config_stale = Gauge::default();
        registry.register(
            "sidecar_config_stale",
            "1 while the latest config reload failed and the last good config is served",
            config_stale.clone(),
        );
        let config_last_success = Gauge::default();
        registry.register(
            "sidecar_config_last_success_timestamp_seconds",
            "Unix time of the last config loaded (0 = none yet)",
            config_last_success.clone(),
        );
        let config_reads = Counter::default();
        registry.register(
            "sidecar_config_reads",
            "Config reload attempts, whether or not anything changed",
            config_reads.clone(),
        );
        let config_parses = Counter::default();
        registry.register(
            "sidecar_config_parses",
            "Config reload attempts that parsed the document (its bytes had changed)",
            config_parses.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being handled",
            in_flight.clone(),
        );
        let shed_limit = Gauge::default();
        registry.register(
            "load_shedding_limit",
            "The app's adaptive concurrency limit under the policy's loadShedding (0 until it has run); requests shed at it count as decision=\"shed\"",
            shed_limit.clone(),
        );
        let limiter_slots = Gauge::default();
        registry.register(
            "limiter_slots",
            "Live limiter state slots after the last eviction sweep",
            limiter_slots.clone(),
        );
        let config_skipped_keys = Gauge::default();
        registry.register(
            "config_skipped_keys",
            "Key entries of the loaded config skipped as duplicate or malformed",
            config_skipped_keys.clone(),
        );
        let auth_failure_peers = Gauge::default();
        registry.register(
            "auth_failure_peers",
            "Peers with a live failed-key-attempt budget",
            auth_failure_peers.clone(),
        );
        // 100 ns to 0.21 s: local decisions take microseconds, Redis-backed ones a round trip,
        // and a slow store up to its timeout, which a 13 ms top bucket would have hidden.
        let decision_seconds = Histogram::new(exponential_buckets(1e-7, 2.0, 22));
        registry.register(
            "decision_duration_seconds",
            "Time from request arrival to the limit decision (auth, lookup, limiter)",
            decision_seconds.clone(),
        );
        let upstream_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding a request to the app until its response head, failures and timeouts included",
            upstream_seconds.clone(),
        );
        let exhausted_keys = Family::<PolicyReasonLabels, Gauge>::default();
        registry.register(
            "exhausted_keys",
            "Keys of the policy refused (or in DryRun would be) right now, by reason, as this sidecar's limiter sees them; updated at scrape",
            exhausted_keys.clone(),
        );
        let keys_above_ratio = Family::<PolicyThresholdLabels, Gauge>::default();
        registry.register(
            "keys_above_usage_ratio",
            "Keys whose usage of any quota is at or above threshold (0.5, 0.8, 0.95) of its limit; updated at scrape",
            keys_above_ratio.clone(),
        );
        let quota_ratio_max = Family::<PolicyQuotaLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "quota_usage_ratio_max",
            "Per quota of the policy, the highest used/limit of any key with live state (1 = exhausted); updated at scrape",
            quota_ratio_max.clone(),
        );
        let quota_ratio_max_reset = Family::<PolicyQuotaLabels, Gauge>::default();
        registry.register(
            "quota_usage_ratio_max_reset_timestamp_seconds",
            "Per quota, Unix time when the period of the key with the highest used/limit ends; updated at scrape",
            quota_ratio_max_reset.clone(),
        );
        let reports = Family::<ReportLabels, Counter>::default();
        registry.register(
            "usage_reports",
            "Usage reports pushed to the operator, by result",
            reports.clone(),
        );
        let upstream_errors = Counter::default();
        registry.register(
            "upstream_errors",
            "Forwarded requests that failed to reach the app or timed out",
            upstream_errors.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "store_up",
            "1 while the shared limit store (Redis) answers; 0 while its fail mode applies",
            store_up.clone(),
        );
        let store_fallbacks = Family::<ModeLabels, Counter>::default();
        registry.register(
            "store_fallbacks",
            "Decisions made by the fail mode because the shared store was unreachable or slow",
            store_fallbacks.clone(),
        );
        let store_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Shared store calls that failed, by kind (timeout, error)",
            store_errors.clone(),
        );
        // Known label values start at 0, so rate() and alerts over them have a series to work
        // on before the first event (a fail mode engaged, a report failed).
        for mode in ["fail_open", "fail_closed", "local_fallback"] {
            let _ = store_fallbacks.get_or_create(&ModeLabels { mode });
        }
        for kind in ["timeout", "error"] {
            let _ = store_errors.get_or_create(&KindLabels { kind });
        }
        for result in ["delivered", "failed"] {
            let _ = reports.get_or_create(&ReportLabels { result });
        }
        Self {
            store_up,
            store_fallbacks,
            store_errors,
            reports,
            exhaustions_seen: std::sync::atomic::AtomicU64::new(0),
            registry,
            requests,
            requests_by_key,
            exhaustions,
            reloads,
            config_generation,
            config_stale,
            config_last_success,
            config_reads,
            config_parses,
            in_flight,
            shed_limit,
            limiter_slots,
            config_skipped_keys,
            auth_failure_peers,
            decision_seconds,
            upstream_seconds,
            upstream_errors,
            exhausted_keys,
            keys_above_ratio,
            quota_ratio_max,
            quota_ratio_max_reset,
        }
    }

    pub fn policy_counters(&self, policy: &str) -> PolicyCounters {
        PolicyCounters {
            by_outcome: Outcome::ALL
                .iter()
                .map(|o| {
                    self.requests
                        .get_or_create(&RequestLabels {
                            policy: policy.to_string(),
                            decision: *o,
                        })
                        .clone()
                })
                .collect(),
        }
    }

    pub fn per_key(&self, policy: &str, key: &str, decision: Outcome) {
        if let Some(f) = &self.requests_by_key {
            f.get_or_create(&KeyRequestLabels {
                policy: policy.to_string(),
                key: key.to_string(),
                decision,
            })
            .inc();
        }
    }

    pub fn exhaustion(&self, reason: keylimit_dataplane::ExhaustionReason) {
        self.exhaustions_seen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.exhaustions
            .get_or_create(&ReasonLabels {
                reason: format!("{reason:?}"),
            })
            .inc();
    }

    /// `mode`: fail_open, fail_closed or local_fallback.
    pub fn store_fallback(&self, mode: &'static str) {
        self.store_fallbacks
            .get_or_create(&ModeLabels { mode })
            .inc();
    }

    /// `kind`: timeout or error.
    pub fn store_error(&self, kind: &'static str) {
        self.store_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn exhaustions_seen(&self) -> u64 {
        self.exhaustions_seen
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn report(&self, delivered: bool) {
        self.reports
            .get_or_create(&ReportLabels {
                result: if delivered { "delivered" } else { "failed" },
            })
            .inc();
    }

    pub fn reload(&self, result: Result<(), &'static str>) {
        let (result, reason) = match result {
            Ok(()) => ("success", ""),
            Err(reason) => ("failure", reason),
        };
        self.reloads
            .get_or_create(&ReloadLabels {
                result: result.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A reload attempt that found the inputs of the serving config or of the latest
    /// rejection again, so did not parse.
    pub fn reload_unchanged(&self) {
        self.reloads
            .get_or_create(&ReloadLabels {
                result: "unchanged".to_string(),
                reason: String::new(),
            })
            .inc();
    }

    /// Sets the usage gauges from the sidecar's current usage report (called at scrape). The
    /// families are rebuilt each time, so a policy or quota that left the config leaves no
    /// stale series behind. Labels are the policy ("namespace/name", one per sidecar), a fixed
    /// reason or threshold, and the policy's quota names: never key names.
    pub fn observe_usage(&self, report: &keylimit_dataplane::UsageReport) {
        self.exhausted_keys.clear();
        self.keys_above_ratio.clear();
        self.quota_ratio_max.clear();
        self.quota_ratio_max_reset.clear();
        if report.policy_name.is_empty() {
            return;
        }
        let policy = format!("{}/{}", report.policy_namespace, report.policy_name);
        let mut exhausted = [0i64; EXHAUSTION_REASONS.len()];
        let mut above = [0i64; USAGE_THRESHOLDS.len()];
        // quota name -> (highest fraction, its reset)
        let mut max: std::collections::BTreeMap<&str, (f64, i64)> = Default::default();
        for k in &report.keys {
            if let Some(e) = &k.exhaustion {
                if let Some(i) = EXHAUSTION_REASONS.iter().position(|r| *r == e.reason) {
                    exhausted[i] += 1;
                }
            }
            let mut key_max = 0.0f64;
            for q in &k.quotas {
                let ratio = usage_ratio(q.used, q.limit);
                key_max = key_max.max(ratio);
                let slot = max.entry(q.name.as_str()).or_insert((ratio, q.reset_at));
                if ratio > slot.0 {
                    *slot = (ratio, q.reset_at);
                }
            }
            for (n, (t, _)) in above.iter_mut().zip(USAGE_THRESHOLDS) {
                if key_max >= t {
                    *n += 1;
                }
            }
        }
        for (r, n) in EXHAUSTION_REASONS.iter().zip(exhausted) {
            self.exhausted_keys
                .get_or_create(&PolicyReasonLabels {
                    policy: policy.clone(),
                    reason: Outcome::from_reason(*r).as_str(),
                })
                .set(n);
        }
        for ((_, t), n) in USAGE_THRESHOLDS.iter().zip(above) {
            self.keys_above_ratio
                .get_or_create(&PolicyThresholdLabels {
                    policy: policy.clone(),
                    threshold: t,
                })
                .set(n);
        }
        // ApiKeys may override quotas under their own names, so the names are bounded per key,
        // not per policy: the fullest MAX_QUOTA_SERIES keep their own series, the rest share
        // one labelled OTHER_QUOTAS (with the highest fraction among them).
        let mut by_ratio: Vec<(&str, (f64, i64))> = max.into_iter().collect();
        by_ratio.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.0.cmp(b.0)));
        let mut series: Vec<(&str, (f64, i64))> = vec![];
        for (i, (quota, v)) in by_ratio.into_iter().enumerate() {
            if i < MAX_QUOTA_SERIES {
                series.push((quota, v));
            } else if i == MAX_QUOTA_SERIES {
                // Sorted by fraction: the first folded one is the fullest of the rest.
                series.push((OTHER_QUOTAS, v));
            }
        }
        for (quota, (ratio, reset)) in series {
            let labels = PolicyQuotaLabels {
                policy: policy.clone(),
                quota: quota.to_string(),
            };
            self.quota_ratio_max.get_or_create(&labels).set(ratio);
            self.quota_ratio_max_reset.get_or_create(&labels).set(reset);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in an encoder, and
        // an empty scrape is the right degraded answer.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// used/limit; a zero limit admits nothing, so it counts as full.
fn usage_ratio(used: u64, limit: u64) -> f64 {
    if limit == 0 {
        1.0
    } else {
        used as f64 / limit as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylimit_dataplane::{Exhaustion, ExhaustionReason, KeyUsage, QuotaUsage, UsageReport};

    fn key(
        name: &str,
        exhausted: Option<ExhaustionReason>,
        quotas: &[(&str, u64, u64, i64)],
    ) -> KeyUsage {
        KeyUsage {
            name: name.into(),
            exhaustion: exhausted.map(|reason| Exhaustion {
                reason,
                limit: "l".into(),
                message: String::new(),
                reset_at: 0,
                dry_run: false,
            }),
            quotas: quotas
                .iter()
                .map(|(n, used, limit, reset_at)| QuotaUsage {
                    unit: keylimit_dataplane::Unit::Requests,
                    name: (*n).into(),
                    used: *used,
                    limit: *limit,
                    reset_at: *reset_at,
                })
                .collect(),
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn usage_gauges_count_keys_by_reason_and_threshold_without_key_names() {
        let m = Metrics::new(false);
        let report = UsageReport {
            policy_namespace: "ns".into(),
            policy_name: "p".into(),
            keys: vec![
                key(
                    "secret-a",
                    Some(ExhaustionReason::QuotaExceeded),
                    &[("daily", 10, 10, 500)],
                ),
                key(
                    "secret-b",
                    None,
                    &[("daily", 9, 10, 400), ("hourly", 1, 4, 90)],
                ),
                key(
                    "secret-c",
                    Some(ExhaustionReason::RateLimited),
                    &[("daily", 5, 10, 300)],
                ),
                key("secret-d", None, &[]),
            ],
            ..UsageReport::default()
        };
        m.observe_usage(&report);
        let text = m.encode();
        let want = [
            "keylimit_exhausted_keys{policy=\"ns/p\",reason=\"quota_exceeded\"} 1",
            "keylimit_exhausted_keys{policy=\"ns/p\",reason=\"rate_limited\"} 1",
            "keylimit_exhausted_keys{policy=\"ns/p\",reason=\"throttled\"} 0",
            "keylimit_keys_above_usage_ratio{policy=\"ns/p\",threshold=\"0.5\"} 3",
            "keylimit_keys_above_usage_ratio{policy=\"ns/p\",threshold=\"0.8\"} 2",
            "keylimit_keys_above_usage_ratio{policy=\"ns/p\",threshold=\"0.95\"} 1",
            "keylimit_quota_usage_ratio_max{policy=\"ns/p\",quota=\"daily\"} 1.0",
            "keylimit_quota_usage_ratio_max{policy=\"ns/p\",quota=\"hourly\"} 0.25",
            "keylimit_quota_usage_ratio_max_reset_timestamp_seconds{policy=\"ns/p\",quota=\"daily\"} 500",
        ];
        for w in want {
            assert!(text.lines().any(|l| l == w), "missing {w:?} in\n{text}");
        }
        assert!(
            !text.contains("secret-"),
            "a key name leaked into the metrics:\n{text}"
        );

        // A quota that left the config leaves no series; no config at all leaves none.
        m.observe_usage(&UsageReport {
            policy_namespace: "ns".into(),
            policy_name: "p".into(),
            keys: vec![key("secret-b", None, &[("daily", 1, 10, 400)])],
            ..UsageReport::default()
        });
        let text = m.encode();
        assert!(line(
            &text,
            "keylimit_quota_usage_ratio_max{policy=\"ns/p\",quota=\"hourly\"}"
        )
        .is_none());
        m.observe_usage(&UsageReport::default());
        let text = m.encode();
        assert!(line(&text, "keylimit_exhausted_keys{").is_none(), "{text}");
        assert!(
            line(&text, "keylimit_quota_usage_ratio_max{").is_none(),
            "{text}"
        );
    }

    #[test]
    fn quota_names_beyond_the_cap_share_one_series() {
        let m = Metrics::new(false);
        // 20 keys, each with its own quota name; key i at (i+1)/40 of it.
        let keys: Vec<KeyUsage> = (0..20u64)
            .map(|i| {
                let q = format!("q{i:02}");
                key(&format!("k{i}"), None, &[(q.as_str(), i + 1, 40, i as i64)])
            })
            .collect();
        m.observe_usage(&UsageReport {
            policy_namespace: "ns".into(),
            policy_name: "p".into(),
            keys,
            ..UsageReport::default()
        });
        let text = m.encode();
        let n = text
            .lines()
            .filter(|l| l.starts_with("keylimit_quota_usage_ratio_max{"))
            .count();
        assert_eq!(n, MAX_QUOTA_SERIES + 1, "{text}");
        // The fullest 16 (q04..q19) keep their names; q00..q03 fold, q03 being the fullest.
        assert!(
            line(
                &text,
                "keylimit_quota_usage_ratio_max{policy=\"ns/p\",quota=\"q19\"} 0.5"
            )
            .is_some(),
            "{text}"
        );
        assert!(
            line(
                &text,
                "keylimit_quota_usage_ratio_max{policy=\"ns/p\",quota=\"q03\"}"
            )
            .is_none(),
            "{text}"
        );
        assert!(
            line(
                &text,
                "keylimit_quota_usage_ratio_max{policy=\"ns/p\",quota=\"_other\"} 0.1"
            )
            .is_some(),
            "{text}"
        );
    }

    #[test]
    fn known_label_values_start_at_zero() {
        let text = Metrics::new(false).encode();
        for w in [
            "keylimit_store_fallbacks_total{mode=\"fail_closed\"} 0",
            "keylimit_store_errors_total{kind=\"timeout\"} 0",
            "keylimit_usage_reports_total{result=\"failed\"} 0",
        ] {
            assert!(text.lines().any(|l| l == w), "missing {w:?} in\n{text}");
        }
    }

    #[test]
    fn a_zero_quota_counts_as_full() {
        assert_eq!(usage_ratio(0, 0), 1.0);
        assert_eq!(usage_ratio(3, 4), 0.75);
    }
}
