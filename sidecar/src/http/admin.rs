//! The admin port: health, readiness, metrics and the usage report.
//!
//! Who may ask what: the port listens on the pod IP because kubelet's probes come from the
//! node and the metrics scraper from the network, so `/healthz`, `/readyz` and `/metrics`
//! answer anyone who can reach the pod. `/v1/usage` lists key names and their usage, so it
//! answers loopback peers only (`kubectl port-forward` arrives on loopback) and 403 otherwise;
//! the operator gets the same report pushed (see `report`), it never pulls.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use keylimit_dataplane::{ConfigFailure, KeyUsage, QuotaUsage, UsageReport};

use crate::config::{ConfigStore, Snapshot};
use crate::http::response::{self, ProxyBody};
use crate::limiter::clock::NANOS_PER_SEC;
use crate::limiter::local::Limiter;
use crate::limiter::shed::LoadShedder;
use crate::metrics::Metrics;

pub struct Admin {
    pub config: Arc<ConfigStore>,
    pub limiter: Limiter,
    pub metrics: Arc<Metrics>,
    pub sidecar_name: String,
    pub shedder: LoadShedder,
}

impl Admin {
    pub async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(response::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "admin endpoints are read-only",
            ));
        }
        let resp = match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
            // A failing reload does not make the sidecar unready: it keeps serving the last good
            // config, and going unready would turn a bad ConfigMap into an outage. The body,
            // the stale metric and the operator report say it.
            "/readyz" => match self.config.current() {
                Some(s) => text(
                    StatusCode::OK,
                    &match self.config.failure() {
                        None => format!("ready: generation {}\n", s.generation),
                        Some(f) => format!(
                            "ready: generation {} (stale: reloads failing since {}: {})\n",
                            s.generation, f.since, f.reason
                        ),
                    },
                    "text/plain",
                ),
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no configuration loaded\n",
                    "text/plain",
                ),
            },
            "/metrics" => {
                self.metrics.limiter_slots.set(self.limiter.slots() as i64);
                let shed = self.shedder.snapshot();
                self.metrics.shed_limit.set(i64::from(shed.limit));
                self.metrics.observe_usage(&usage_report(
                    &self.sidecar_name,
                    self.config.current().as_deref(),
                    None,
                    &self.limiter,
                ));
                text(
                    StatusCode::OK,
                    &self.metrics.encode(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
            "/v1/usage" if !is_loopback(peer) => response::error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "/v1/usage answers loopback peers only (use kubectl port-forward)",
            ),
            "/v1/usage" => {
                let report = usage_report(
                    &self.sidecar_name,
                    self.config.current().as_deref(),
                    self.config.failure(),
                    &self.limiter,
                );
                let body = serde_json::to_vec(&report).unwrap_or_default();
                let mut r = Response::new(response::full(body));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
            _ => response::error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        };
        Ok(resp)
    }
}

/// 127.0.0.0/8 and ::1, also as IPv4-mapped IPv6 (a dual-stack listener's view of 127.0.0.1).
pub fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

fn text(status: StatusCode, body: &str, content_type: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(response::full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The dataplane `UsageReport`: every key with live limiter state, its current exhaustion (if
/// its reset is still ahead) and its quota usage, sorted by name; and why the config is
/// stale, if the latest reload failed.
pub fn usage_report(
    sidecar: &str,
    snap: Option<&Snapshot>,
    config_failure: Option<ConfigFailure>,
    limiter: &Limiter,
) -> UsageReport {
    let now_ns = limiter.now_ns();
    let mut report = UsageReport {
        sidecar: sidecar.to_string(),
        now: i64::try_from(now_ns / NANOS_PER_SEC).unwrap_or(i64::MAX),
        config_failure,
        ..UsageReport::default()
    };
    let Some(snap) = snap else {
        return report;
    };
    report.policy_namespace = snap.policy.namespace.clone();
    report.policy_name = snap.policy.name.clone();
    report.policy_generation = snap.policy.generation;
    for id in limiter.active_keys() {
        // State of a key that left the config is not reported: the operator has nothing to
        // attach it to, and eviction will drop it.
        let Some(key) = snap.index.by_id(id) else {
            continue;
        };
        let quotas = key
            .limits
            .quotas
            .iter()
            .filter_map(|q| {
                limiter.quota_usage(id, q).map(|(used, end)| QuotaUsage {
                    name: q.name.to_string(),
                    used,
                    limit: q.requests,
                    reset_at: i64::try_from(end.div_ceil(NANOS_PER_SEC)).unwrap_or(i64::MAX),
                    unit: q.unit,
                })
            })
            .collect();
        report.keys.push(KeyUsage {
            name: key.name().to_string(),
            exhaustion: limiter.current_refusal(id).map(|r| r.to_exhaustion()),
            quotas,
        });
    }
    report.keys.sort_by(|a, b| a.name.cmp(&b.name));
    report
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_peers_count_as_local() {
        for local in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "10.0.0.7:1",
            "192.0.2.2:1",
            "[fd00::1]:1",
            "[::ffff:10.0.0.7]:1",
            "0.0.0.0:1",
        ] {
            assert!(!is_loopback(remote.parse().unwrap()), "{remote}");
        }
    }
}
