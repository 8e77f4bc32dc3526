//! Operator metrics (Prometheus text via prometheus-client). Labels are bounded: controller
//! names and results only, never object names.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: &'static str,
}

/// Outcome of a sidecar report or a TokenReview: a fixed set of short strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    /// `POST /v1/reports` outcomes (accepted, forwarded, unauthenticated, forbidden, …).
    pub reports: Family<ResultLabel, Counter>,
    /// TokenReviews sent (authenticated, refused, error); cache hits send none.
    pub token_reviews: Family<ResultLabel, Counter>,
    /// Entries in the report token caches (accepted plus refused).
    pub token_cache_entries: Gauge,
    /// 1 once this replica, as leader, has synced its caches and runs the controllers.
    /// Readiness does not say it (every serving replica is Ready).
    pub caches_synced: Gauge,
    pub reconciles: Family<ControllerLabel, Counter>,
    pub failures: Family<ControllerLabel, Counter>,
    pub duration: Family<ControllerLabel, Histogram>,
    pub configmap_writes: Counter,
    pub status_writes: Counter,
    pub leader: Gauge,
    /// Unix seconds when the served webhook certificate expires (0: not known).
    pub webhook_cert_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keylimit_operator");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let failures = Family::<ControllerLabel, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let configmap_writes = Counter::default();
        let status_writes = Counter::default();
        let leader = Gauge::default();
        let reports = Family::<ResultLabel, Counter>::default();
        let token_reviews = Family::<ResultLabel, Counter>::default();
        let token_cache_entries = Gauge::default();
        let caches_synced = Gauge::default();
        let webhook_cert_expiry = Gauge::default();
        registry.register(
            "webhook_cert_expiry_timestamp_seconds",
            "Unix time the served webhook certificate expires (0 while not known)",
            webhook_cert_expiry.clone(),
        );
        registry.register(
            "caches_synced",
            "1 while this replica, as leader, runs the controllers on synced caches",
            caches_synced.clone(),
        );
        registry.register(
            "reports",
            "Sidecar usage reports received, by result",
            reports.clone(),
        );
        registry.register(
            "token_reviews",
            "TokenReviews sent for sidecar report tokens, by result",
            token_reviews.clone(),
        );
        registry.register(
            "token_cache_entries",
            "Sidecar tokens cached (accepted and refused)",
            token_cache_entries.clone(),
        );
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that returned an error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        registry.register(
            "configmap_writes",
            "Data-plane ConfigMap writes",
            configmap_writes.clone(),
        );
        registry.register(
            "status_writes",
            "Status subresource writes",
            status_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            configmap_writes,
            status_writes,
            leader,
            reports,
            token_reviews,
            token_cache_entries,
            caches_synced,
            webhook_cert_expiry,
        }
    }
}

/// Observes the reconcile duration when dropped, so early returns are measured too.
pub struct ReconcileTimer<'a> {
    start: Instant,
    hist: &'a Family<ControllerLabel, Histogram>,
    label: ControllerLabel,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.hist
            .get_or_create(&self.label)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn reconcile_timer(&self, controller: &'static str) -> ReconcileTimer<'_> {
        let label = ControllerLabel { controller };
        self.reconciles.get_or_create(&label).inc();
        ReconcileTimer {
            start: Instant::now(),
            hist: &self.duration,
            label,
        }
    }

    /// Reconciles started by both controllers since the process started.
    pub fn reconciles_total(&self) -> u64 {
        ["apikey", "ratelimitpolicy"]
            .into_iter()
            .map(|controller| {
                self.reconciles
                    .get_or_create(&ControllerLabel { controller })
                    .get()
            })
            .sum()
    }

    pub fn reconcile_failure(&self, controller: &'static str) {
        self.failures
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    pub fn report(&self, result: &'static str) {
        self.reports.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn token_review(&self, result: &'static str) {
        self.token_reviews
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail except on fmt errors, which only a broken
        // metric implementation produces; an empty scrape is the safe answer then.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
