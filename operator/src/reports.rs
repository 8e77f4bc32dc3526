//! Sidecars push usage reports here; the leader turns them into ApiKey and policy status.
//!
//! Why push: workloads need no extra RBAC (no Role per application ServiceAccount) and the
//! operator needs no route to every pod.
//!
//! Who may report, and as whom (docs/security.md, "Operator: reports and readiness"):
//! - The request is authenticated from its headers before any of its body is read: the
//!   bearer token is checked with a TokenReview for audience `keylimit`, and the review's
//!   own `audiences` must contain it (an audience-unaware authenticator must not pass).
//! - The sidecar's identity is the pod the token is bound to (the review's
//!   `authentication.kubernetes.io/pod-name`/`pod-uid` extras, as kubelet's projected tokens
//!   carry them). The pod must exist with that uid and name a policy in its
//!   `keylimit.dev/policy` annotation; it may report for that policy only. The report's
//!   self-declared `sidecar` field is ignored, so a pod writes only its own entry.
//! - Reviews are cached for a minute and refusals for 10 s, both in bounded maps, so 1,000
//!   sidecars reporting every 2 s cost a handful of reviews and a bad token repeated costs
//!   none; at most a few reviews run at once.
//! - Then the body is read: at most [`MAX_REPORT_BYTES`], within [`BODY_TIMEOUT`], a few
//!   bodies at a time, and the book caps each namespace's sidecars and bytes.
//!
//! Every replica accepts reports (every replica is Ready, so rolling updates and drains
//! work): the leader records them; a standby authenticates them the same way and forwards
//! them to the leader's pod, found from the Lease's holder. The leader authenticates the
//! forwarded request again itself: it never trusts a peer's word.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use keylimit_dataplane::UsageReport;
use kube::api::{Api, Patch, PostParams};
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::conditions::{self, Desired};
use crate::controller::Context;
use crate::crd::{condition, ApiKey, RateLimitPolicy};
use crate::exhaustion::{self, BookLimits, PolicyId, ReportBook, Reporter};
use crate::metrics::Metrics;

/// The field manager of everything this module writes, distinct from the reconcilers' so
/// server-side apply merges the `Exhausted` condition next to `Ready` instead of fighting.
pub const MANAGER: &str = "keylimit-operator-exhaustion";
/// Audience sidecar tokens must be minted for.
pub const AUDIENCE: &str = "keylimit";
/// TokenReview `user.extra` keys of a pod-bound ServiceAccount token.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// Set by a standby on the reports it forwards, so a report never travels twice (a replica
/// that is not the leader answers 503 to a forwarded report instead of forwarding it again).
pub const FORWARDED_HEADER: &str = "x-keylimit-forwarded";
/// A sidecar silent for this long is presumed gone; its report no longer counts.
pub const STALE_AFTER_SECS: i64 = 10;
/// Largest report body accepted. Measured (`report_sizes_fit` below): a key with one quota
/// and no exhaustion serialises to ~107 bytes, an exhausted key with one quota to ~238, so
/// 1 MiB carries ~9,800 active keys, or ~4,400 exhausted ones, per sidecar; the 20-key
/// reports of `keylimit-status-load` are under 5 KiB. A larger declared body is refused (413)
/// from its headers, unread; a larger chunked one when the limit is reached.
pub const MAX_REPORT_BYTES: usize = 1024 * 1024;
/// Time allowed to receive a report's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies read at once: with [`MAX_REPORT_BYTES`] at most 8 MiB of reports in flight.
const MAX_BODIES_IN_FLIGHT: usize = 8;
/// TokenReviews (plus the pod read) at once; more wait, up to [`REVIEW_WAIT`].
const MAX_REVIEWS_IN_FLIGHT: usize = 8;
const REVIEW_WAIT: Duration = Duration::from_secs(5);
const TOKEN_CACHE_SECS: i64 = 60;
const REFUSAL_CACHE_SECS: i64 = 10;
/// Entries of each token cache (accepted, refused); at 32-byte digests plus an identity,
/// a few MiB at most.
const MAX_CACHED_TOKENS: usize = 10_000;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a standby trusts the leader address it resolved.
const LEADER_ADDR_SECS: i64 = 5;
/// Quota usage moves with every request; refresh it in status at most this often per key.
const USAGE_REFRESH_SECS: i64 = 30;
/// After (re)starting, wait this long for every sidecar's next report before writing: an
/// empty book would otherwise clear every Exhausted condition a previous leader wrote, and
/// the next reports would set them again (two needless writes and two false Events per key).
const STARTUP_GRACE: Duration = Duration::from_secs(5);
/// Upper bound on status writes per second, so a mass exhaustion cannot flood the apiserver.
const MAX_WRITES_PER_TICK: usize = 100;
/// How often the status writer looks at every key, not only those of reported policies.
const FULL_WALK_EVERY: Duration = Duration::from_secs(60);

/// Where a standby finds the leader: the Lease's holder is the leader's pod name (its
/// `--identity`), in the Lease's namespace; reports go to that pod's IP on `port` (every
/// replica listens on the same ones): the TLS port when `tls` is set, else the admin port.
#[derive(Debug, Clone)]
pub struct Peers {
    pub namespace: String,
    pub lease: String,
    pub identity: String,
    pub port: u16,
    pub tls: Option<PeerTls>,
}

/// How a standby verifies the leader: every replica serves the same certificate, so the
/// leader's pod IP is checked as the Service name the certificate carries, against the CA
/// bundle this replica serves under.
#[derive(Clone)]
pub struct PeerTls {
    pub server_name: String,
    pub certs: Arc<crate::certs::CertStore>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub limits: BookLimits,
    /// None: no leader election, this replica records everything itself.
    pub peers: Option<Peers>,
}

/// A refused report: status and a short text for the sidecar's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

/// What a TokenReview proves: a ServiceAccount token bound to this pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaims {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
}

/// Judges a TokenReview's status (pure). Refuses anything but an authenticated,
/// `keylimit`-audience, pod-bound ServiceAccount token.
pub fn judge_review(status: &TokenReviewStatus) -> Result<PodClaims, Refusal> {
    if status.authenticated != Some(true) {
        return Err(Refusal::unauthenticated("token not accepted"));
    }
    // The apiserver checks the audience we asked for, but an authenticator that ignores
    // audiences answers without any: only an explicit match counts.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == AUDIENCE))
    {
        return Err(Refusal::unauthenticated(format!(
            "token is not for audience {AUDIENCE:?}"
        )));
    }
    let user = status.user.clone().unwrap_or_default();
    let Some(namespace) = service_account_namespace(user.username.as_deref().unwrap_or("")) else {
        return Err(Refusal::forbidden("only ServiceAccount tokens may report"));
    };
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| match extra.get(k).map(Vec::as_slice) {
        Some([v]) if !v.is_empty() => Some(v.clone()),
        _ => None,
    };
    match (one(POD_NAME_EXTRA), one(POD_UID_EXTRA)) {
        (Some(pod), Some(uid)) => Ok(PodClaims {
            namespace,
            pod,
            uid,
        }),
        _ => Err(Refusal::forbidden(
            "token is not bound to a pod: use the projected token the webhook mounts",
        )),
    }
}

/// `system:serviceaccount:<ns>:<name>` → `<ns>`; anything else is not a sidecar.
pub fn service_account_namespace(username: &str) -> Option<String> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty()).then(|| ns.to_string())
}

/// The pod check: the pod the token is bound to still exists as that uid and is injected
/// for a policy (pure, over the pod's metadata).
pub fn reporter_of(
    claims: &PodClaims,
    uid: Option<&str>,
    annotations: &BTreeMap<String, String>,
) -> Result<Reporter, Refusal> {
    if uid != Some(claims.uid.as_str()) {
        return Err(Refusal::forbidden(format!(
            "pod {} is not the pod the token was issued for",
            claims.pod
        )));
    }
    let policy = annotations
        .get(crate::webhook::POLICY_ANNOTATION)
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            Refusal::forbidden(format!(
                "pod {} has no {} annotation: it is not a keylimit sidecar's pod",
                claims.pod,
                crate::webhook::POLICY_ANNOTATION
            ))
        })?;
    Ok(Reporter {
        namespace: claims.namespace.clone(),
        pod: claims.pod.clone(),
        pod_uid: claims.uid.clone(),
        policy: policy.to_string(),
    })
}

type Digest32 = [u8; 32];

/// A bounded map of token digests to what they proved, each valid until a unix second.
struct Bounded<V> {
    map: HashMap<Digest32, (V, i64)>,
    cap: usize,
}

impl<V: Clone> Bounded<V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap,
        }
    }

    fn get(&self, k: &Digest32, now: i64) -> Option<V> {
        self.map
            .get(k)
            .filter(|(_, until)| *until > now)
            .map(|(v, _)| v.clone())
    }

    /// Full: drop the expired, then (still full, i.e. under a flood of distinct tokens) the
    /// entry that expires first. O(n) only on that path, which a review precedes anyway.
    fn insert(&mut self, k: Digest32, v: V, until: i64, now: i64) {
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            self.map.retain(|_, (_, u)| *u > now);
            if self.map.len() >= self.cap {
                if let Some(first) = self
                    .map
                    .iter()
                    .min_by_key(|(_, (_, u))| *u)
                    .map(|(k, _)| *k)
                {
                    self.map.remove(&first);
                }
            }
        }
        self.map.insert(k, (v, until));
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

struct TokenCache {
    accepted: Bounded<Reporter>,
    refused: Bounded<Refusal>,
}

pub struct Reports {
    client: Client,
    metrics: Arc<Metrics>,
    book: Mutex<ReportBook>,
    tokens: Mutex<TokenCache>,
    reviews: Semaphore,
    bodies: Semaphore,
    leader: AtomicBool,
    peers: Option<Peers>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    /// (holder, URL, resolved until)
    leader_url: Mutex<Option<(String, String, i64)>>,
}

fn now_secs() -> i64 {
    Timestamp::now().as_second()
}

impl Reports {
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: Settings) -> Self {
        Self {
            client,
            metrics,
            book: Mutex::new(ReportBook::new(settings.limits)),
            tokens: Mutex::new(TokenCache {
                accepted: Bounded::new(MAX_CACHED_TOKENS),
                refused: Bounded::new(MAX_CACHED_TOKENS),
            }),
            reviews: Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
            bodies: Semaphore::new(MAX_BODIES_IN_FLIGHT),
            // Without leader election this replica is the one that writes.
            leader: AtomicBool::new(settings.peers.is_none()),
            peers: settings.peers,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            leader_url: Mutex::new(None),
        }
    }

    /// This replica holds the Lease (records reports) or not (forwards them).
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    fn count(&self, result: &'static str) {
        self.metrics.report(result);
    }

    /// Handles `POST /v1/reports`: authenticate from the headers, then read a bounded body,
    /// then record (leader) or forward (standby). Returns the status and a short text body.
    pub async fn handle<B>(&self, headers: &HeaderMap, body: B) -> (StatusCode, String)
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let r = self.handle_inner(headers, body).await;
        let (status, text) = match r {
            Ok((s, t)) => (s, t),
            Err(refusal) => {
                self.count(match refusal.status {
                    StatusCode::UNAUTHORIZED => "unauthenticated",
                    StatusCode::FORBIDDEN => "forbidden",
                    StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                    StatusCode::REQUEST_TIMEOUT => "timeout",
                    StatusCode::BAD_REQUEST => "invalid",
                    StatusCode::TOO_MANY_REQUESTS => "over_capacity",
                    _ => "unavailable",
                });
                (refusal.status, refusal.message)
            }
        };
        let mut text = text;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        (status, text)
    }

    async fn handle_inner<B>(
        &self,
        headers: &HeaderMap,
        body: B,
    ) -> Result<(StatusCode, String), Refusal>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let authorization = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Refusal::unauthenticated("bearer token required"))?;
        let token = authorization
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Refusal::unauthenticated("bearer token required"))?;
        let who = self.authenticate(token).await?;

        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REPORT_BYTES as u64) {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("report larger than {MAX_REPORT_BYTES} bytes"),
            ));
        }
        let _slot = tokio::time::timeout(BODY_TIMEOUT, self.bodies.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| Refusal::unavailable("too many reports in flight"))?;
        let body = match tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(body, MAX_REPORT_BYTES).collect(),
        )
        .await
        {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("report body not received within {BODY_TIMEOUT:?}"),
                ))
            }
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("report larger than {MAX_REPORT_BYTES} bytes"),
                ))
            }
            Ok(Err(e)) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the report: {e}"),
                ))
            }
            Ok(Ok(b)) => b.to_bytes(),
        };
        let forwarded = headers.contains_key(FORWARDED_HEADER);
        self.accept(&who, authorization, forwarded, body).await
    }

    async fn accept(
        &self,
        who: &Reporter,
        authorization: &str,
        forwarded: bool,
        body: Bytes,
    ) -> Result<(StatusCode, String), Refusal> {
        let report: UsageReport = serde_json::from_slice(&body)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("invalid report: {e}")))?;
        if report.policy_namespace != who.namespace || report.policy_name != who.policy {
            return Err(Refusal::forbidden(format!(
                "pod {}/{} reports for policy {}/{} only, not {}/{}",
                who.namespace,
                who.pod,
                who.namespace,
                who.policy,
                report.policy_namespace,
                report.policy_name
            )));
        }
        if self.leader.load(Ordering::Relaxed) {
            let now = now_secs();
            let recorded = match self.book.lock() {
                Ok(mut book) => book.record(who, report, body.len(), now, STALE_AFTER_SECS),
                Err(_) => return Err(Refusal::unavailable("report book unavailable")),
            };
            return match recorded {
                Ok(()) => {
                    self.count("accepted");
                    Ok((StatusCode::NO_CONTENT, String::new()))
                }
                Err(full) => Err(Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("report not kept: {full}"),
                )),
            };
        }
        if forwarded {
            return Err(Refusal::unavailable("not the leader"));
        }
        let r = self.forward(authorization, body).await;
        self.count(if r.is_ok() {
            "forwarded"
        } else {
            "forward_failed"
        });
        r
    }

    /// Sends the report to the leader with the sidecar's own token; the leader's answer is
    /// the sidecar's answer.
    async fn forward(
        &self,
        authorization: &str,
        body: Bytes,
    ) -> Result<(StatusCode, String), Refusal> {
        let url = self.leader_url().await?;
        let req = http::Request::post(&url)
            .header(http::header::AUTHORIZATION, authorization)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(FORWARDED_HEADER, "1")
            .body(Full::new(body))
            .map_err(|e| Refusal::unavailable(format!("forwarding: {e}")))?;
        let tls = self.peers.as_ref().and_then(|p| p.tls.clone());
        let sent = tokio::time::timeout(FORWARD_TIMEOUT, async {
            let resp = match &tls {
                Some(tls) => send_tls(tls, req).await?,
                None => self.http.request(req).await.map_err(|e| e.to_string())?,
            };
            let status = resp.status();
            let text = Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
                .unwrap_or_default();
            Ok::<_, String>((status, text))
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {FORWARD_TIMEOUT:?}")));
        match sent {
            Ok((status, text)) if status.is_success() => Ok((status, text)),
            Ok((status, text)) => {
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    self.forget_leader();
                }
                Err(Refusal::new(status, text))
            }
            Err(e) => {
                self.forget_leader();
                debug!(error = %e, %url, "forwarding a report to the leader failed");
                Err(Refusal::unavailable(format!(
                    "forwarding to the leader failed: {e}"
                )))
            }
        }
    }

    fn forget_leader(&self) {
        if let Ok(mut l) = self.leader_url.lock() {
            *l = None;
        }
    }

    async fn leader_url(&self) -> Result<String, Refusal> {
        let peers = self
            .peers
            .as_ref()
            .ok_or_else(|| Refusal::unavailable("not the leader"))?;
        let now = now_secs();
        if let Ok(l) = self.leader_url.lock() {
            if let Some((_, url, _)) = l.as_ref().filter(|(_, _, until)| *until > now) {
                return Ok(url.clone());
            }
        }
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &peers.namespace);
        let lease = leases
            .get_opt(&peers.lease)
            .await
            .map_err(|e| Refusal::unavailable(format!("reading the leader Lease: {e}")))?;
        let holder = lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty() && *h != peers.identity)
            .ok_or_else(|| Refusal::unavailable("no leader to forward to yet"))?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &peers.namespace);
        let ip = pods
            .get_opt(&holder)
            .await
            .map_err(|e| Refusal::unavailable(format!("reading the leader's pod: {e}")))?
            .and_then(|p| p.status)
            .and_then(|s| s.pod_ip)
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            .ok_or_else(|| Refusal::unavailable(format!("leader {holder} has no pod IP")))?;
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        let scheme = if peers.tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{host}:{}/v1/reports", peers.port);
        if let Ok(mut l) = self.leader_url.lock() {
            *l = Some((holder, url.clone(), now + LEADER_ADDR_SECS));
        }
        Ok(url)
    }

    /// The reporter a token proves, from the caches or a TokenReview plus a pod read.
    async fn authenticate(&self, token: &str) -> Result<Reporter, Refusal> {
        let digest: Digest32 = Sha256::digest(token.as_bytes()).into();
        if let Some(r) = self.cached(&digest) {
            return r;
        }
        let _permit = tokio::time::timeout(REVIEW_WAIT, self.reviews.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| Refusal::unavailable("too many token reviews in flight"))?;
        // Identical tokens that queued behind the first review find its answer here.
        if let Some(r) = self.cached(&digest) {
            return r;
        }
        let result = self.review(token).await;
        let now = now_secs();
        if let Ok(mut cache) = self.tokens.lock() {
            match &result {
                Ok(who) => cache
                    .accepted
                    .insert(digest, who.clone(), now + TOKEN_CACHE_SECS, now),
                // A 503 is our trouble, not the token's: not cached.
                Err(r) if r.status != StatusCode::SERVICE_UNAVAILABLE => {
                    cache
                        .refused
                        .insert(digest, r.clone(), now + REFUSAL_CACHE_SECS, now)
                }
                Err(_) => {}
            }
            self.metrics
                .token_cache_entries
                .set((cache.accepted.len() + cache.refused.len()) as i64);
        }
        result
    }

    fn cached(&self, digest: &Digest32) -> Option<Result<Reporter, Refusal>> {
        let now = now_secs();
        let cache = self.tokens.lock().ok()?;
        if let Some(who) = cache.accepted.get(digest, now) {
            return Some(Ok(who));
        }
        cache.refused.get(digest, now).map(Err)
    }

    async fn review(&self, token: &str) -> Result<Reporter, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let out = match api.create(&PostParams::default(), &review).await {
            Ok(o) => o,
            Err(e) => {
                self.metrics.token_review("error");
                warn!(error = %e, "TokenReview failed");
                return Err(Refusal::unavailable("cannot review the token now"));
            }
        };
        let status = out.status.unwrap_or_default();
        let claims = match judge_review(&status) {
            Ok(c) => {
                self.metrics.token_review("authenticated");
                c
            }
            Err(r) => {
                self.metrics.token_review("refused");
                debug!(error = ?status.error, reason = %r.message, "sidecar token refused");
                return Err(r);
            }
        };
        // Metadata only: the check needs the uid and the annotation, not the pod's spec.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &claims.namespace);
        match pods.get_metadata_opt(&claims.pod).await {
            Ok(Some(meta)) => reporter_of(
                &claims,
                meta.metadata.uid.as_deref(),
                &meta.metadata.annotations.unwrap_or_default(),
            ),
            Ok(None) => Err(Refusal::forbidden(format!(
                "pod {}/{} no longer exists",
                claims.namespace, claims.pod
            ))),
            Err(e) => {
                warn!(error = %e, "reading a reporting sidecar's pod failed");
                Err(Refusal::unavailable("cannot check the sidecar's pod now"))
            }
        }
    }

    fn views(&self, now: i64) -> BTreeMap<PolicyId, exhaustion::PolicyView> {
        let Ok(mut book) = self.book.lock() else {
            return BTreeMap::new();
        };
        book.expire(now, STALE_AFTER_SECS);
        book.views(now)
    }
}

/// One request to a peer over TLS on a fresh connection, verified against the CA bundle this
/// replica serves under, for the Service name (not the pod IP the URL carries).
async fn send_tls(
    tls: &PeerTls,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    use rustls_pki_types::pem::PemObject;
    let ca = tls
        .certs
        .ca_pem()
        .ok_or("no CA bundle to verify the leader with")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone())
        .map_err(|e| e.to_string())?;
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .ok_or("no address")?;
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // Origin form with a Host header, as a client library would send it.
    let (mut parts, body) = req.into_parts();
    parts.uri = http::Uri::from_static("/v1/reports");
    if let Ok(h) = http::HeaderValue::from_str(&authority) {
        parts.headers.insert(http::header::HOST, h);
    }
    let req = http::Request::from_parts(parts, body);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "connection to the leader");
        }
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// What the cached status says, borrowed: this runs for many keys every second.
struct CurrentStatus<'a> {
    exhausted: bool,
    reason: &'a str,
    message: &'a str,
    exhausted_until: Option<&'a str>,
}

fn current(key: &ApiKey) -> (Option<CurrentStatus<'_>>, Option<&str>) {
    let Some(st) = key.status.as_ref() else {
        return (None, None);
    };
    let cond = conditions::find(&st.conditions, condition::EXHAUSTED).map(|c| CurrentStatus {
        exhausted: c.status == "True",
        reason: &c.reason,
        message: &c.message,
        exhausted_until: st.exhausted_until.as_deref(),
    });
    (cond, st.usage.as_deref())
}

/// The keys a tick looks at. Keys of a policy no sidecar reports on have nothing to say
/// unless a condition written earlier must be cleared, which happens when the policy's
/// reports stop (its view goes) or the key moves to another policy; a full walk every
/// `FULL_WALK_EVERY` catches the second, so a quiet operator does not walk 100,000 keys a
/// second.
fn keys_to_walk(ctx: &Context, full: bool, policies: &BTreeSet<PolicyId>) -> Vec<Arc<ApiKey>> {
    if full {
        return ctx.apikeys.state();
    }
    policies
        .iter()
        .flat_map(|(ns, policy)| ctx.index.keys_of_policy(ns, policy))
        .filter_map(|r| ctx.apikeys.get(&r))
        .collect()
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
    // Policies whose keys the next tick must look at although no sidecar reports on them:
    // their reports just stopped, or the write cap cut their walk short.
    let mut revisit: BTreeSet<PolicyId> = BTreeSet::new();
    let mut reported_before: BTreeSet<PolicyId> = BTreeSet::new();
    let mut last_full_walk: Option<tokio::time::Instant> = None;
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
        let reported: BTreeSet<PolicyId> = views.keys().cloned().collect();
        let mut policies = std::mem::take(&mut revisit);
        policies.extend(reported.iter().cloned());
        policies.extend(reported_before.difference(&reported).cloned());
        reported_before = reported;
        let full = last_full_walk.is_none_or(|t| t.elapsed() >= FULL_WALK_EVERY);
        if full {
            last_full_walk = Some(tokio::time::Instant::now());
        }
        let mut writes = 0;
        let mut exhausted_per_policy: HashMap<PolicyId, i64> = HashMap::new();
        for key in keys_to_walk(&ctx, full, &policies) {
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
            // No sidecar reports for the policy and nothing said yet: there is nothing to
            // say (a write per key here doubled a cold start's status writes).
            if view.is_none() && have.is_none() && !want.exhausted {
                continue;
            }
            let cond_same = have.as_ref().is_some_and(|h| {
                h.exhausted == want.exhausted
                    && h.reason == want.reason
                    && h.message == want.message
                    && h.exhausted_until == want.exhausted_until.as_deref()
            });
            let slot = (ns.clone(), key.name_any());
            let usage_due = want.usage.is_some()
                && want.usage.as_deref() != have_usage
                && usage_written
                    .get(&slot)
                    .is_none_or(|t| now.as_second() - t >= USAGE_REFRESH_SECS);
            if cond_same && !usage_due {
                continue;
            }
            if writes >= MAX_WRITES_PER_TICK {
                revisit.insert(id);
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
                want.usage.clone().or(have_usage.map(str::to_owned))
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
            let written = ctx
                .leader
                .fenced(api.patch_status(
                    &key.name_any(),
                    &crate::apply_params(MANAGER),
                    &Patch::Apply(&patch),
                ))
                .await
                .and_then(|r| r.map_err(crate::Error::from));
            match written {
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
            let view = views.get(&id);
            let sidecars = view.map_or(0, |v| v.sidecars as i64);
            let exhausted = exhausted_per_policy.get(&id).copied().unwrap_or(0);
            let st = policy.status.clone().unwrap_or_default();
            let (loaded, reason, message) = exhaustion::config_loaded(view);
            let desired = Desired::new(conditions::CONFIG_LOADED, loaded, reason, message);
            let generation = policy.metadata.generation;
            // Only a policy that sheds says whether it does; switching shedding off drops the
            // condition (this manager no longer applies it).
            let shedding = policy
                .spec
                .load_shedding
                .as_ref()
                .filter(|l| l.enabled)
                .map(|_| {
                    let (on, reason, message) = exhaustion::load_shedding(view);
                    Desired::new(conditions::LOAD_SHEDDING, on, reason, message)
                });
            let shed_current = match &shedding {
                Some(d) => conditions::is_current(&st.conditions, d, generation),
                None => conditions::find(&st.conditions, conditions::LOAD_SHEDDING).is_none(),
            };
            let cond_current =
                conditions::is_current(&st.conditions, &desired, generation) && shed_current;
            if (st.keys_exhausted, st.sidecars_reporting) == (exhausted, sidecars) && cond_current {
                continue;
            }
            let mut cond = vec![conditions::merge(&st.conditions, &desired, generation, now)];
            if let Some(d) = &shedding {
                cond.push(conditions::merge(&st.conditions, d, generation, now));
            }
            let patch = json!({
                "apiVersion": "keylimit.dev/v1alpha1",
                "kind": "RateLimitPolicy",
                "status": {
                    "keysExhausted": exhausted,
                    "sidecarsReporting": sidecars,
                    "conditions": cond,
                }
            });
            let api: Api<RateLimitPolicy> = Api::namespaced(ctx.client.clone(), &id.0);
            let written = ctx
                .leader
                .fenced(api.patch_status(
                    &id.1,
                    &crate::apply_params(MANAGER),
                    &Patch::Apply(&patch),
                ))
                .await
                .and_then(|r| r.map_err(crate::Error::from));
            match written {
                Ok(_) => {
                    ctx.metrics.status_writes.inc();
                }
                Err(e) => {
                    warn!(error = %e, "writing policy summary failed");
                    continue;
                }
            }
            let was = conditions::find(&st.conditions, conditions::CONFIG_LOADED)
                .map(|c| c.status == "True");
            if !loaded && was != Some(false) {
                crate::controller::publish(
                    &ctx,
                    policy.as_ref(),
                    EventType::Warning,
                    "SidecarRejectsConfig",
                    desired.message.clone(),
                )
                .await;
            } else if loaded && was == Some(false) {
                crate::controller::publish(
                    &ctx,
                    policy.as_ref(),
                    EventType::Normal,
                    "ConfigLoaded",
                    "every reporting sidecar serves the current config again".into(),
                )
                .await;
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

    fn review(
        authenticated: bool,
        audiences: Option<&[&str]>,
        username: &str,
        extra: &[(&str, &str)],
    ) -> TokenReviewStatus {
        use k8s_openapi::api::authentication::v1::UserInfo;
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const SA: &str = "system:serviceaccount:shop:default";
    const BOUND: &[(&str, &str)] = &[(POD_NAME_EXTRA, "api-1"), (POD_UID_EXTRA, "uid-1")];

    #[test]
    fn a_pod_bound_keylimit_token_proves_its_pod() {
        let c = judge_review(&review(true, Some(&["keylimit"]), SA, BOUND)).unwrap();
        assert_eq!(
            c,
            PodClaims {
                namespace: "shop".into(),
                pod: "api-1".into(),
                uid: "uid-1".into()
            }
        );
    }

    #[test]
    fn reviews_that_prove_less_are_refused() {
        let cases = [
            (
                "not authenticated",
                review(false, Some(&["keylimit"]), SA, BOUND),
                401,
            ),
            // An authenticator that ignores audiences answers without any.
            ("no audiences", review(true, None, SA, BOUND), 401),
            (
                "other audience",
                review(true, Some(&["api"]), SA, BOUND),
                401,
            ),
            (
                "not a ServiceAccount",
                review(true, Some(&["keylimit"]), "alice", BOUND),
                403,
            ),
            (
                "not bound to a pod",
                review(true, Some(&["keylimit"]), SA, &[]),
                403,
            ),
            (
                "pod name without uid",
                review(true, Some(&["keylimit"]), SA, &[(POD_NAME_EXTRA, "api-1")]),
                403,
            ),
        ];
        for (what, status, code) in cases {
            match judge_review(&status) {
                Ok(c) => panic!("{what}: accepted as {c:?}"),
                Err(r) => assert_eq!(r.status.as_u16(), code, "{what}: {}", r.message),
            }
        }
        // Two pod names (an extra is a list) is not one pod.
        let mut two = review(true, Some(&["keylimit"]), SA, BOUND);
        if let Some(u) = two.user.as_mut() {
            u.extra
                .get_or_insert_default()
                .insert(POD_NAME_EXTRA.into(), vec!["a".into(), "b".into()]);
        }
        assert!(judge_review(&two).is_err());
    }

    #[test]
    fn the_pod_must_be_the_bound_one_and_injected() {
        let claims = PodClaims {
            namespace: "shop".into(),
            pod: "api-1".into(),
            uid: "uid-1".into(),
        };
        let annotated: BTreeMap<String, String> = [(
            crate::webhook::POLICY_ANNOTATION.to_string(),
            "gold".to_string(),
        )]
        .into();
        let who = reporter_of(&claims, Some("uid-1"), &annotated).unwrap();
        assert_eq!(who.policy, "gold");
        assert_eq!(who.pod_uid, "uid-1");
        // A pod recreated under the same name is another pod.
        assert_eq!(
            reporter_of(&claims, Some("uid-2"), &annotated)
                .unwrap_err()
                .status,
            StatusCode::FORBIDDEN
        );
        // A pod of the namespace that is not a keylimit workload.
        assert!(reporter_of(&claims, Some("uid-1"), &BTreeMap::new()).is_err());
    }

    #[test]
    fn token_caches_are_bounded_and_expire() {
        let mut c: Bounded<u32> = Bounded::new(3);
        for i in 0..3u8 {
            c.insert([i; 32], i.into(), 100 + i64::from(i), 0);
        }
        assert_eq!(c.get(&[0; 32], 50), Some(0));
        assert_eq!(c.get(&[0; 32], 100), None, "expired at its deadline");
        // Full: the entry that expires first makes room.
        c.insert([9; 32], 9, 500, 50);
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&[0; 32], 50), None);
        assert_eq!(c.get(&[9; 32], 50), Some(9));
        // Full of expired entries: they all go.
        c.insert([8; 32], 8, 600, 300);
        assert_eq!(c.len(), 2);
    }

    /// The numbers behind MAX_REPORT_BYTES' comment.
    #[test]
    fn report_sizes_fit() {
        use keylimit_dataplane::{Exhaustion, ExhaustionReason, KeyUsage, QuotaUsage};
        let key = |i: usize, exhausted: bool| KeyUsage {
            name: format!("customer-{i:06}"),
            exhaustion: exhausted.then(|| Exhaustion {
                reason: ExhaustionReason::QuotaExceeded,
                limit: "monthly".into(),
                message: "quota monthly (1000 per Month) exceeded".into(),
                reset_at: 1_800_000_000,
                dry_run: false,
            }),
            quotas: vec![QuotaUsage {
                unit: keylimit_dataplane::Unit::Requests,
                name: "monthly".into(),
                used: 123_456,
                limit: 1_000_000,
                reset_at: 1_800_000_000,
            }],
        };
        let size = |n: usize, exhausted: bool| {
            let r = UsageReport {
                sidecar: "api-7d9f8b6c4-x2x9z".into(),
                policy_namespace: "shop".into(),
                policy_name: "standard".into(),
                keys: (0..n).map(|i| key(i, exhausted)).collect(),
                ..Default::default()
            };
            serde_json::to_vec(&r)
                .map(|v| v.len())
                .unwrap_or(usize::MAX)
        };
        let plain = (size(1000, false) - size(0, false)) / 1000;
        let exhausted = (size(1000, true) - size(0, true)) / 1000;
        eprintln!("{plain} bytes per key, {exhausted} per exhausted key");
        assert!((100..=140).contains(&plain), "{plain} bytes per key");
        assert!(
            (200..=260).contains(&exhausted),
            "{exhausted} bytes per exhausted key"
        );
        assert!(size(8000, false) <= MAX_REPORT_BYTES);
        assert!(size(4000, true) <= MAX_REPORT_BYTES);
        assert!(size(20, true) <= 8 * 1024);
    }
}
