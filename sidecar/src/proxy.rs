//! The traffic port: authenticate, decide, forward.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::{hash_presented, ConfigStore, KeyPolicy, Snapshot};
use crate::limiter::{Admission, Check, Decision, Limiter, Permit};
use crate::metrics::{Metrics, Outcome};
use crate::response::{self, ProxyBody};
use crate::store::RedisBackends;
use crate::Error;
use keylimit_dataplane::Store;

/// Where allowed requests go.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
}

impl Upstream {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let uri: Uri = s
            .parse()
            .map_err(|e| Error::Argument(format!("--upstream {s:?}: {e}")))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        if scheme != Scheme::HTTP {
            return Err(Error::Argument(format!(
                "--upstream {s:?}: only http:// is supported (the app is on localhost)"
            )));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| Error::Argument(format!("--upstream {s:?}: host:port required")))?;
        Ok(Self { scheme, authority })
    }
}

/// Everything a request handler needs; one per sidecar, shared by all connections.
pub struct Proxy {
    pub config: Arc<ConfigStore>,
    pub limiter: Limiter,
    pub redis: Arc<RedisBackends>,
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    pub upstream_timeout: Duration,
    pub fail_open: bool,
    pub metrics_per_key: bool,
    client: Client<HttpConnector, Incoming>,
}

impl Proxy {
    // Each argument is a separate piece of shared state wired once in `Sidecar::start`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<ConfigStore>,
        limiter: Limiter,
        redis: Arc<RedisBackends>,
        metrics: Arc<Metrics>,
        upstream: Upstream,
        upstream_timeout: Duration,
        fail_open: bool,
        metrics_per_key: bool,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(upstream_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Self {
            config,
            limiter,
            redis,
            metrics,
            upstream,
            upstream_timeout,
            fail_open,
            metrics_per_key,
            client,
        }
    }

    pub async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        let started = Instant::now();
        let _in_flight = InFlight::new(&self.metrics);
        let Some(snap) = self.config.current() else {
            if self.fail_open {
                let mut req = req;
                // No config means no identity to vouch for: never pass a client's own claim.
                req.headers_mut()
                    .remove(keylimit_dataplane::DEFAULT_IDENTITY_HEADER);
                return Ok(self.forward(req, peer, None).await);
            }
            return Ok(response::error(
                StatusCode::SERVICE_UNAVAILABLE,
                Outcome::NotReady.as_str(),
                "the sidecar has not loaded a configuration yet",
            ));
        };
        Ok(self.handle_with(snap, started, peer, req).await)
    }

    async fn handle_with(
        &self,
        snap: Arc<Snapshot>,
        started: Instant,
        peer: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let Some(found) = find_key(&snap, &req) else {
            return self.auth_refused(&snap, None, Outcome::MissingKey);
        };
        let hash = hash_presented(found.material(&req));
        let Some(key) = snap.index.lookup(&hash) else {
            return self.auth_refused(&snap, None, Outcome::InvalidKey);
        };
        if key.disabled {
            return self.auth_refused(&snap, Some(key), Outcome::KeyDisabled);
        }
        let now_ns = self.limiter.now_ns();
        if key
            .expires_at
            .is_some_and(|t| i128::from(t) * 1_000_000_000 <= i128::from(now_ns))
        {
            return self.auth_refused(&snap, Some(key), Outcome::KeyExpired);
        }
        let route = snap.route(req.method(), req.uri().path());
        let check = Check {
            key_id: key.id,
            key_limits: &key.limits,
            route_limits: route.and_then(|r| r.limits.as_ref()),
            policy_limits: snap.policy_limits.as_ref(),
            cost: route.map_or(1, |r| r.cost),
            throttle: snap.throttle,
            dry_run: snap.dry_run,
        };
        let decision = match &snap.policy.store {
            Store::Local => self.limiter.decide(&check),
            Store::Redis(cfg) => {
                let store = self.redis.get(cfg);
                match store.decide(cfg, &check, &self.limiter).await {
                    Some(d) => {
                        if let Decision::Refuse(r)
                        | Decision::Allow(Admission {
                            dry_run_refusal: Some(r),
                            ..
                        }) = &d
                        {
                            // The local view feeds /v1/usage and the operator's report.
                            self.limiter.note_refusal(key.id, r.clone());
                        }
                        d
                    }
                    None => {
                        self.count(&snap, Some(key), Outcome::StoreUnavailable);
                        return response::store_unavailable();
                    }
                }
            }
        };
        self.metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        let admission = match decision {
            Decision::Refuse(r) => {
                let outcome = Outcome::from_reason(r.reason);
                self.count(&snap, Some(key), outcome);
                self.metrics.exhaustion(r.reason);
                tracing::debug!(key = %key.name, reason = ?r.reason, limit = %r.name, "refused");
                return response::too_many_requests(&r, &snap.policy.response.message);
            }
            Decision::Allow(a) => a,
        };
        match &admission.dry_run_refusal {
            Some(r) => {
                self.count(&snap, Some(key), Outcome::DryRunRefused);
                self.metrics.exhaustion(r.reason);
            }
            None => self.count(&snap, Some(key), Outcome::Allowed),
        }
        if admission.delay_ns > 0 {
            tokio::time::sleep(Duration::from_nanos(admission.delay_ns)).await;
        }
        drop(admission.queued);

        if snap.source.strip {
            found.strip(&mut req, &snap);
        }
        let headers = req.headers_mut();
        match &key.identity {
            Some(v) => headers.insert(snap.source.identity_header.clone(), v.clone()),
            // Never let a client-supplied identity header through.
            None => headers.remove(&snap.source.identity_header),
        };
        let mut resp = self.forward(req, peer, admission.permit).await;
        if let Some(status) = &admission.status {
            response::limit_headers(resp.headers_mut(), status);
        }
        resp
    }

    fn count(&self, snap: &Snapshot, key: Option<&KeyPolicy>, outcome: Outcome) {
        snap.counters.inc(outcome);
        if self.metrics_per_key {
            if let Some(k) = key {
                self.metrics.per_key(&snap.policy_label(), &k.name, outcome);
            }
        }
    }

    fn auth_refused(
        &self,
        snap: &Snapshot,
        key: Option<&KeyPolicy>,
        outcome: Outcome,
    ) -> Response<ProxyBody> {
        self.count(snap, key, outcome);
        response::auth_failure(outcome)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        permit: Option<Permit>,
    ) -> Response<ProxyBody> {
        let upgrade = is_upgrade(req.headers()) && req.version() == Version::HTTP_11;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // An h2 request carries its host in :authority; the app speaks HTTP/1.1 and wants Host.
        if !parts.headers.contains_key(header::HOST) {
            if let Some(a) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        let mut builder = Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone());
        builder = builder.path_and_query(path);
        parts.uri = match builder.build() {
            Ok(u) => u,
            Err(_) => {
                return response::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "invalid request target",
                )
            }
        };
        parts.version = Version::HTTP_11;
        let upgrade_proto = upgrade
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(proto) = upgrade_proto {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
        }
        append_forwarded_for(&mut parts.headers, peer);

        let upstream_req = Request::from_parts(parts, body);
        let result =
            tokio::time::timeout(self.upstream_timeout, self.client.request(upstream_req)).await;
        let mut resp = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.metrics.upstream_errors.inc();
                tracing::warn!(error = %e, "upstream request failed");
                return response::error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "the application did not accept the request",
                );
            }
            Err(_) => {
                self.metrics.upstream_errors.inc();
                return response::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the application did not answer in time",
                );
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    // The permit lives as long as the tunnel: a WebSocket counts as in flight.
                    let _permit = permit;
                    if let (Ok(client), Ok(upstream)) =
                        tokio::join!(client_upgrade, upstream_upgrade)
                    {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, response::full(Bytes::new()));
            }
        }

        strip_hop_by_hop(resp.headers_mut());
        let (parts, body) = resp.into_parts();
        let body = match permit {
            Some(permit) => GuardedBody {
                inner: body,
                permit: Some(permit),
            }
            .boxed(),
            None => body.boxed(),
        };
        Response::from_parts(parts, body)
    }
}

/// Keeps the request's concurrency slots until the response body ends or is dropped (the
/// client went away), whichever comes first.
struct GuardedBody {
    inner: Incoming,
    permit: Option<Permit>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.in_flight.inc();
        Self(m)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Where the presented key was found, so it can be stripped from the same place.
enum Found {
    Header(HeaderName),
    Bearer,
    Query(String),
}

impl Found {
    fn material<'r>(&'r self, req: &'r Request<Incoming>) -> &'r [u8] {
        match self {
            Found::Header(h) => req.headers().get(h).map_or(&[][..], |v| v.as_bytes()),
            Found::Bearer => req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| bearer_token(v.as_bytes()))
                .unwrap_or(&[]),
            Found::Query(k) => k.as_bytes(),
        }
    }

    fn strip(&self, req: &mut Request<Incoming>, snap: &Snapshot) {
        match self {
            Found::Header(h) => {
                req.headers_mut().remove(h);
            }
            Found::Bearer => {
                req.headers_mut().remove(header::AUTHORIZATION);
            }
            Found::Query(_) => {
                let Some(param) = snap.source.query_param.as_deref() else {
                    return;
                };
                let uri = req.uri();
                let Some(query) = uri.query() else { return };
                let kept: String = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(
                        form_urlencoded::parse(query.as_bytes()).filter(|(k, _)| k != param),
                    )
                    .finish();
                let pq = if kept.is_empty() {
                    uri.path().to_string()
                } else {
                    format!("{}?{kept}", uri.path())
                };
                let mut parts = uri.clone().into_parts();
                if let Ok(pq) = PathAndQuery::try_from(pq) {
                    parts.path_and_query = Some(pq);
                    if let Ok(u) = Uri::from_parts(parts) {
                        *req.uri_mut() = u;
                    }
                }
            }
        }
    }
}

fn bearer_token(v: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn find_key(snap: &Snapshot, req: &Request<Incoming>) -> Option<Found> {
    let src = &snap.source;
    if let Some(h) = &src.header {
        if req.headers().get(h).is_some_and(|v| !v.is_empty()) {
            return Some(Found::Header(h.clone()));
        }
    }
    if src.bearer
        && req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()))
            .is_some()
    {
        return Some(Found::Bearer);
    }
    let param = src.query_param.as_deref()?;
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, v)| k == param && !v.is_empty())
        .map(|(_, v)| Found::Query(v.into_owned()))
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// RFC 9110 §7.6.1: connection-specific fields, plus any the `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

fn append_forwarded_for(h: &mut HeaderMap, peer: SocketAddr) {
    static XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let ip = peer.ip().to_string();
    let value = match h.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(XFF.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing_is_case_insensitive_and_rejects_empty() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bear"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_connection_named_ones_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
