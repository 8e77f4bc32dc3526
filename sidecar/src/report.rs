//! Pushes this sidecar's usage report to the operator, which turns it into `Exhausted`
//! conditions on ApiKeys.
//!
//! Push, not pull: the operator then needs no route to every pod, and the workload needs no
//! RBAC. The request carries the pod's projected ServiceAccount token (audience `keylimit`),
//! re-read on every push because kubelet rotates it; the operator checks it with a
//! TokenReview. A report is sent every interval, and at once when a key becomes exhausted, so
//! `kubectl get apikeys` shows it within seconds of the first 429.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::admin::usage_report;
use crate::config::ConfigStore;
use crate::limiter::Limiter;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ReportSettings {
    /// `http://<operator service>:8080/v1/reports`
    pub url: http::Uri,
    pub token_file: Option<PathBuf>,
    pub interval: Duration,
}

/// Runs until `shutdown` flips, then sends one last report so the operator sees the final state.
pub async fn report_loop(
    settings: ReportSettings,
    sidecar_name: String,
    config: Arc<ConfigStore>,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut tick = tokio::time::interval(settings.interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Checking for a new exhaustion is cheap (a counter); it is what makes status fast.
    let mut fast = tokio::time::interval(Duration::from_secs(1));
    let mut last_exhaustions = metrics.exhaustions_seen();
    let mut last_stale = config.failure().is_some();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fast.tick() => {
                // A config going stale (or recovering) is news as well.
                let now = metrics.exhaustions_seen();
                if now == last_exhaustions && config.failure().is_some() == last_stale {
                    continue;
                }
            }
            _ = shutdown.changed() => return,
        }
        last_exhaustions = metrics.exhaustions_seen();
        // With no config ever loaded there is no policy to attach a report to.
        let Some(snap) = config.current() else {
            continue;
        };
        let failure = config.failure();
        last_stale = failure.is_some();
        let report = usage_report(&sidecar_name, Some(&snap), failure, &limiter);
        let result = send(&client, &settings, &report).await;
        metrics.report(result.is_ok());
        if let Err(e) = result {
            tracing::warn!(error = %e, url = %settings.url, "usage report not delivered");
        }
    }
}

async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    settings: &ReportSettings,
    report: &keylimit_dataplane::UsageReport,
) -> Result<(), String> {
    let body = serde_json::to_vec(report).map_err(|e| e.to_string())?;
    let mut req = http::Request::post(settings.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(path) = &settings.token_file {
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("reading token {}: {e}", path.display()))?;
        req = req.header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "operator did not answer within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("operator answered {}", resp.status()))
    }
}
