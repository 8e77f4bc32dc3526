//! Sidecars push usage reports here; the leader turns them into ApiKey status.
//!
//! Why push: workloads need no extra RBAC (no Role per application ServiceAccount) and the
//! operator needs no route to every pod. Authentication: each sidecar sends its pod's
//! projected ServiceAccount token (audience `keylimit`); the operator checks it with a
//! TokenReview and accepts reports only for policies in the token's own namespace. Reviews
//! are cached for a minute so 1,000 sidecars reporting every 2 s cost a handful of
//! TokenReviews, not 500 a second.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::jiff::Timestamp;
use keylimit_dataplane::UsageReport;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::conditions::{self, Desired};
use crate::controller::Context;
use crate::crd::{condition, ApiKey, RateLimitPolicy};
use crate::exhaustion::{self, KeyStatus, PolicyId, ReportBook};

/// The field manager of everything this module writes, distinct from the reconcilers' so
/// server-side apply merges the `Exhausted` condition next to `Ready` instead of fighting.
pub const MANAGER: &str = "keylimit-operator-exhaustion";
/// Audience sidecar tokens must be minted for.
pub const AUDIENCE: &str = "keylimit";
/// A sidecar silent for this long is presumed gone; its report no longer counts.
pub const STALE_AFTER_SECS: i64 = 10;
/// Quota usage moves with every request; refresh it in status at most this often per key.
const USAGE_REFRESH_SECS: i64 = 30;
/// After (re)starting, wait this long for every sidecar's next report before writing: an
/// empty book would otherwise clear every Exhausted condition a previous leader wrote, and
/// the next reports would set them again (two needless writes and two false Events per key).
const STARTUP_GRACE: Duration = Duration::from_secs(5);
/// Upper bound on status writes per second, so a mass exhaustion cannot flood the apiserver.
const MAX_WRITES_PER_TICK: usize = 100;
const TOKEN_CACHE_SECS: i64 = 60;
const MAX_REPORT_BYTES: usize = 8 * 1024 * 1024;

pub struct Reports {
    client: Client,
    book: Mutex<ReportBook>,
    /// sha256(token) → (namespace, cached until)
    tokens: Mutex<HashMap<[u8; 32], (String, i64)>>,
}

impl Reports {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            book: Mutex::new(ReportBook::default()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Handles `POST /v1/reports`. Returns the status and a short text body.
    pub async fn receive(&self, authorization: Option<&str>, body: Bytes) -> (StatusCode, String) {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return (StatusCode::UNAUTHORIZED, "bearer token required\n".into());
        };
        let ns = match self.authenticate(token).await {
            Ok(Some(ns)) => ns,
            Ok(None) => return (StatusCode::UNAUTHORIZED, "token not accepted\n".into()),
            Err(e) => {
                warn!(error = %e, "TokenReview failed");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot review token now\n".into(),
                );
            }
        };
        if body.len() > MAX_REPORT_BYTES {
            return (StatusCode::PAYLOAD_TOO_LARGE, "report too large\n".into());
        }
        let report: UsageReport = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("invalid report: {e}\n")),
        };
        if report.policy_namespace != ns {
            return (
                StatusCode::FORBIDDEN,
                format!(
                    "a sidecar in {ns} cannot report for namespace {}\n",
                    report.policy_namespace
                ),
            );
        }
        let now = Timestamp::now().as_second();
        if let Ok(mut book) = self.book.lock() {
            book.record(report, now);
        }
        (StatusCode::NO_CONTENT, String::new())
    }

    async fn authenticate(&self, token: &str) -> Result<Option<String>, kube::Error> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Timestamp::now().as_second();
        if let Ok(cache) = self.tokens.lock() {
            if let Some((ns, until)) = cache.get(&digest) {
                if *until > now {
                    return Ok(Some(ns.clone()));
                }
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let out = api.create(&PostParams::default(), &review).await?;
        let status = out.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            debug!(error = ?status.error, "sidecar token rejected");
            return Ok(None);
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        let ns = service_account_namespace(&user);
        if let (Some(ns), Ok(mut cache)) = (ns.clone(), self.tokens.lock()) {
            cache.retain(|_, (_, until)| *until > now);
            cache.insert(digest, (ns, now + TOKEN_CACHE_SECS));
        }
        Ok(ns)
    }

    fn views(&self, now: i64) -> BTreeMap<PolicyId, exhaustion::PolicyView> {
        let Ok(mut book) = self.book.lock() else {
            return BTreeMap::new();
        };
        book.expire(now, STALE_AFTER_SECS);
        let ids: Vec<PolicyId> = book.policies().cloned().collect();
        ids.into_iter()
            .map(|id| {
                let v = book.view(&id, now);
                (id, v)
            })
            .collect()
    }
}

/// `system:serviceaccount:<ns>:<name>` → `<ns>`; anything else is not a sidecar.
pub fn service_account_namespace(username: &str) -> Option<String> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty()).then(|| ns.to_string())
}

fn current(key: &ApiKey) -> (Option<KeyStatus>, Option<String>) {
    let st = key.status.clone().unwrap_or_default();
    let cond = conditions::find(&st.conditions, condition::EXHAUSTED).map(|c| KeyStatus {
        exhausted: c.status == "True",
        reason: c.reason.clone(),
        message: c.message.clone(),
        exhausted_until: st.exhausted_until.clone(),
        usage: None,
    });
    (cond, st.usage)
}

/// Writes `Exhausted` conditions and policy summaries from the reports, once a second, only
/// where something changed. Runs on the leader until `stop` resolves.
pub async fn write_status(
    reports: Arc<Reports>,
    ctx: Arc<Context>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    let mut usage_written: HashMap<(String, String), i64> = HashMap::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        if started.elapsed() < STARTUP_GRACE {
            continue;
        }
        let now = Timestamp::now();
        let views = reports.views(now.as_second());
        let mut writes = 0;
        let mut exhausted_per_policy: HashMap<PolicyId, i64> = HashMap::new();
        for key in ctx.apikeys.state() {
            let ns = key.namespace().unwrap_or_default();
            let id = (ns.clone(), key.spec.policy_ref.name.clone());
            let view = views.get(&id);
            let want = exhaustion::key_status(
                view.and_then(|v| v.keys.get(&key.name_any())),
                view.map_or(0, |v| v.sidecars),
            );
            if want.exhausted {
                *exhausted_per_policy.entry(id.clone()).or_default() += 1;
            }
            let (have, have_usage) = current(&key);
            let cond_same = have.as_ref().is_some_and(|h| {
                h.exhausted == want.exhausted
                    && h.reason == want.reason
                    && h.message == want.message
                    && h.exhausted_until == want.exhausted_until
            });
            let slot = (ns.clone(), key.name_any());
            let usage_due = want.usage.is_some()
                && want.usage != have_usage
                && usage_written
                    .get(&slot)
                    .is_none_or(|t| now.as_second() - t >= USAGE_REFRESH_SECS);
            if (cond_same && !usage_due) || writes >= MAX_WRITES_PER_TICK {
                continue;
            }
            writes += 1;
            let desired = Desired::new(
                condition::EXHAUSTED,
                want.exhausted,
                &want.reason,
                want.message.clone(),
            );
            let old = key.status.clone().unwrap_or_default().conditions;
            let cond = conditions::merge(&old, &desired, key.metadata.generation, now);
            let usage = if usage_due || cond_same {
                want.usage.clone()
            } else {
                want.usage.clone().or(have_usage)
            };
            let patch = json!({
                "apiVersion": "keylimit.dev/v1alpha1",
                "kind": "ApiKey",
                "status": {
                    "conditions": [cond],
                    "exhaustedUntil": want.exhausted_until,
                    "usage": usage,
                }
            });
            let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
            match api
                .patch_status(
                    &key.name_any(),
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => {
                    ctx.metrics.status_writes.inc();
                    usage_written.insert(slot, now.as_second());
                }
                Err(e) => {
                    warn!(error = %e, key = %key.name_any(), "writing Exhausted failed");
                    continue;
                }
            }
            let was = have.as_ref().map(|h| h.exhausted);
            if want.exhausted && was != Some(true) {
                crate::controller::publish(
                    &ctx,
                    key.as_ref(),
                    EventType::Warning,
                    "Exhausted",
                    want.message.clone(),
                )
                .await;
            } else if !want.exhausted && was == Some(true) {
                crate::controller::publish(
                    &ctx,
                    key.as_ref(),
                    EventType::Normal,
                    "Recovered",
                    "key is within its limits again".into(),
                )
                .await;
            }
        }
        for policy in ctx.policies.state() {
            let id = (policy.namespace().unwrap_or_default(), policy.name_any());
            let sidecars = views.get(&id).map_or(0, |v| v.sidecars as i64);
            let exhausted = exhausted_per_policy.get(&id).copied().unwrap_or(0);
            let st = policy.status.clone().unwrap_or_default();
            let want = (exhausted, sidecars);
            if (st.keys_exhausted, st.sidecars_reporting) == want {
                continue;
            }
            let patch = json!({
                "apiVersion": "keylimit.dev/v1alpha1",
                "kind": "RateLimitPolicy",
                "status": { "keysExhausted": exhausted, "sidecarsReporting": sidecars }
            });
            let api: Api<RateLimitPolicy> = Api::namespaced(ctx.client.clone(), &id.0);
            match api
                .patch_status(
                    &id.1,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => {
                    ctx.metrics.status_writes.inc();
                }
                Err(e) => warn!(error = %e, "writing policy summary failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_accounts_are_sidecars() {
        assert_eq!(
            service_account_namespace("system:serviceaccount:shop:default").as_deref(),
            Some("shop")
        );
        assert_eq!(
            service_account_namespace("system:serviceaccount:shop"),
            None
        );
        assert_eq!(service_account_namespace("admin"), None);
        assert_eq!(service_account_namespace("system:serviceaccount::x"), None);
    }
}
