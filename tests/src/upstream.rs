//! A real HTTP upstream for the sidecar to proxy to. `/hold` parks a request until the test
//! releases it, so concurrency limits can be observed with requests really in flight;
//! `/usage?tokens=N` reports a cost the way an LLM API does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    release: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let (release, rx) = watch::channel(0u64);
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (counter, rx) = (counter.clone(), rx.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, counter.clone(), rx.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            requests,
            release,
            task,
        })
    }

    /// Lets every request parked in `/hold` finish.
    pub fn release_all(&self) {
        self.release.send_modify(|n| *n += 1);
    }
}

async fn handle(
    req: http::Request<Incoming>,
    counter: Arc<AtomicU64>,
    mut release: watch::Receiver<u64>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    counter.fetch_add(1, Ordering::Relaxed);
    if req.uri().path().starts_with("/hold") {
        let seen = *release.borrow_and_update();
        let _ = release.wait_for(|n| *n > seen).await;
    }
    let saw_identity = req
        .headers()
        .get(keylimit_dataplane::DEFAULT_IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let saw_key = req.headers().contains_key("x-api-key");
    // `/usage?tokens=N` answers like an LLM API: JSON whose `usage.total_tokens` is N.
    let body = match (req.uri().path(), req.uri().query()) {
        ("/usage", Some(q)) => {
            let n: u64 = q
                .strip_prefix("tokens=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Bytes::from(format!(
                r#"{{"choices":[{{"text":"hi"}}],"usage":{{"total_tokens":{n}}}}}"#
            ))
        }
        _ => Bytes::from_static(b"hello from upstream\n"),
    };
    let json = req.uri().path() == "/usage";
    let mut resp = http::Response::new(Full::new(body));
    if json {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    if let Ok(v) = http::HeaderValue::from_str(&saw_identity) {
        resp.headers_mut().insert("x-upstream-saw-identity", v);
    }
    resp.headers_mut().insert(
        "x-upstream-saw-key",
        http::HeaderValue::from_static(if saw_key { "yes" } else { "no" }),
    );
    Ok(resp)
}
