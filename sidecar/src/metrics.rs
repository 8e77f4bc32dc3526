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
}

impl Outcome {
    pub const ALL: [Outcome; 14] = [
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
        }
    }

    pub fn from_reason(reason: keylimit_dataplane::ExhaustionReason) -> Self {
        use keylimit_dataplane::ExhaustionReason as R;
        match reason {
            R::RateLimited => Outcome::RateLimited,
            R::QuotaExceeded => Outcome::QuotaExceeded,
            R::ConcurrencyLimited => Outcome::ConcurrencyLimited,
            R::Throttled => Outcome::Throttled,
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
    pub upstream_errors: Counter,
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
        let decision_seconds = Histogram::new(exponential_buckets(1e-7, 2.0, 18));
        registry.register(
            "decision_duration_seconds",
            "Time from request arrival to the limit decision (auth, lookup, limiter)",
            decision_seconds.clone(),
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
            limiter_slots,
            config_skipped_keys,
            auth_failure_peers,
            decision_seconds,
            upstream_errors,
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
