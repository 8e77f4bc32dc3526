//! Client-side limits on the apiserver traffic of the operator's one `kube::Client`, as a tower
//! layer under it:
//!
//! * a token bucket (`qps`, `burst`), like client-go's `--kube-api-qps/--kube-api-burst`: a
//!   cold start over 100k keys must not flood a shared apiserver;
//! * at most `max_in_flight` requests at once. kube's client speaks HTTP/1.1 (its rustls
//!   connector enables only `http/1.1`), where each concurrent request needs a connection of
//!   its own and the pool opens one per request it cannot serve from idle ones: bounding the
//!   requests in flight bounds the connections (plus one per watch).
//!
//! Watches (long-lived, one each) and Lease requests (leader renewal must not queue behind a
//! burst of status writes, or the lease lapses under load) pass unthrottled.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

/// The limits; see the `--kube-api-*` flags.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub qps: f64,
    pub burst: u32,
    pub max_in_flight: usize,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Shared {
    limits: Limits,
    bucket: Mutex<Bucket>,
    in_flight: Arc<Semaphore>,
}

impl Shared {
    /// Takes a token, possibly one not yet refilled: returns how long to wait for it. Taking
    /// before waiting keeps waiters in arrival order without a queue.
    fn reserve(&self, now: Instant) -> Duration {
        let qps = self.limits.qps;
        if qps <= 0.0 {
            return Duration::ZERO;
        }
        let Ok(mut b) = self.bucket.lock() else {
            return Duration::ZERO;
        };
        let refill = now.saturating_duration_since(b.last).as_secs_f64() * qps;
        b.tokens = (b.tokens + refill).min(f64::from(self.limits.burst.max(1)));
        b.last = now;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / qps)
        }
    }
}

#[derive(Clone)]
pub struct ThrottleLayer(Arc<Shared>);

impl ThrottleLayer {
    pub fn new(limits: Limits) -> Self {
        Self(Arc::new(Shared {
            limits,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(limits.burst.max(1)),
                last: Instant::now(),
            }),
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
        }))
    }
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttle<S>;
    fn layer(&self, inner: S) -> Throttle<S> {
        Throttle {
            inner,
            shared: self.0.clone(),
        }
    }
}

pub struct Throttle<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Requests that pass unthrottled: watches and leader-election Leases.
pub fn exempt<B>(req: &Request<B>) -> bool {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    watch || req.uri().path().starts_with("/apis/coordination.k8s.io/")
}

impl<S, B, ReqBody> Service<Request<ReqBody>> for Throttle<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<Permitted<B>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let exempt = exempt(&req);
        // The inner future (kube's stack down to hyper's pool) does nothing until polled:
        // the request is sent, and a connection taken, only after the limits below.
        let sent = self.inner.call(req);
        let shared = self.shared.clone();
        Box::pin(async move {
            let permit = if exempt {
                None
            } else {
                // The semaphore is never closed, so acquiring cannot fail.
                let permit = shared.in_flight.clone().acquire_owned().await.ok();
                let wait = shared.reserve(Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                permit
            };
            let resp = sent.await?;
            Ok(resp.map(|body| Permitted {
                body,
                _permit: permit,
            }))
        })
    }
}

/// A response body that holds its request's in-flight permit until it is read (or dropped):
/// its connection is busy until then.
pub struct Permitted<B> {
    body: B,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<B: Body + Unpin> Body for Permitted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    fn shared(qps: f64, burst: u32) -> ThrottleLayer {
        ThrottleLayer::new(Limits {
            qps,
            burst,
            max_in_flight: 4,
        })
    }

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let l = shared(10.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.0.reserve(t0), Duration::ZERO);
        }
        // The 4th and 5th wait one and two refills (100 ms each at 10 qps).
        let w4 = l.0.reserve(t0);
        let w5 = l.0.reserve(t0);
        assert!((w4.as_secs_f64() - 0.1).abs() < 1e-6, "{w4:?}");
        assert!((w5.as_secs_f64() - 0.2).abs() < 1e-6, "{w5:?}");
        // A second later the debt is repaid and 8 tokens are back (capped at burst 3).
        let t1 = t0 + Duration::from_secs(2);
        for _ in 0..3 {
            assert_eq!(l.0.reserve(t1), Duration::ZERO);
        }
        assert!(l.0.reserve(t1) > Duration::ZERO);
    }

    #[test]
    fn watches_and_leases_are_exempt() {
        let r = |uri: &str| Request::get(uri).body(()).unwrap();
        assert!(exempt(&r(
            "/api/v1/namespaces/a/secrets?labelSelector=x&watch=true"
        )));
        assert!(exempt(&r(
            "/apis/coordination.k8s.io/v1/namespaces/a/leases/keylimit"
        )));
        assert!(!exempt(&r(
            "/apis/keylimit.dev/v1alpha1/namespaces/a/apikeys/k/status"
        )));
        assert!(!exempt(&r("/api/v1/secrets?watchy=true")));
    }

    /// No more than `max_in_flight` requests reach the inner service at once, and a permit is
    /// held until the response body is dropped.
    #[tokio::test]
    async fn requests_in_flight_are_bounded() {
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (n, p) = (now.clone(), peak.clone());
        let svc = tower::service_fn(move |_req: Request<()>| {
            let (n, p) = (n.clone(), p.clone());
            async move {
                let c = n.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(c, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                    bytes::Bytes,
                >::new()))
            }
        });
        let layer = ThrottleLayer::new(Limits {
            qps: 0.0,
            burst: 1,
            max_in_flight: 3,
        });
        let calls = (0..20).map(|_| {
            // Every instance shares the layer's limits.
            let s = layer.layer(svc.clone());
            // The body is dropped here, which frees the permit.
            async move {
                s.oneshot(Request::get("/api/v1/x").body(()).unwrap())
                    .await
                    .map(drop)
            }
        });
        let out = futures::future::join_all(calls).await;
        assert!(out.iter().all(|r| r.is_ok()));
        assert!(
            peak.load(Ordering::SeqCst) <= 3,
            "{}",
            peak.load(Ordering::SeqCst)
        );
        assert!(
            peak.load(Ordering::SeqCst) >= 2,
            "requests ran concurrently"
        );
    }
}
