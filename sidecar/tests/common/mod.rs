//! Shared fixtures: a kubelet-style config directory, a real upstream and a client.
#![allow(dead_code)] // each test binary uses a different subset of the fixtures

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keylimit_dataplane::{
    hash_key, KeyEntry, KeySource, Limits, Mode, PolicyConfig, PolicyDocument, ResponseConfig,
    Store, API_VERSION,
};
use keylimit_sidecar::limiter::clock::SystemClock;
use keylimit_sidecar::{Settings, Sidecar};
use tokio::sync::mpsc;

/// A directory updated exactly the way kubelet's AtomicWriter does it.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
    n: u32,
    current: Option<String>,
}

impl ConfigDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            n: 0,
            current: None,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// 1. new timestamped dir, 2. `..data_tmp` -> it, 3. rename to `..data`,
    /// 4. per-file symlinks `<file> -> ..data/<file>`, 5. delete the old dir.
    pub fn write(&mut self, files: &[(&str, Vec<u8>)]) {
        self.n += 1;
        let root = self.dir.path();
        let ts = format!("..2026_11_29_03_00_{:02}.{:08}", self.n % 60, self.n);
        std::fs::create_dir(root.join(&ts)).unwrap();
        for (name, bytes) in files {
            std::fs::write(root.join(&ts).join(name), bytes).unwrap();
        }
        let tmp = root.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
        for (name, _) in files {
            let link = root.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
            }
        }
        if let Some(old) = self.current.replace(ts) {
            std::fs::remove_dir_all(root.join(old)).unwrap();
        }
    }

    pub fn write_doc(&mut self, doc: &PolicyDocument) {
        self.write(&[("policy.json", serde_json::to_vec(doc).unwrap())]);
    }
}

pub fn key(name: &str) -> KeyEntry {
    KeyEntry {
        name: name.into(),
        sha256: hash_key(material(name).as_bytes()),
        disabled: false,
        expires_at: None,
        overrides: None,
        previous: None,
        counter: None,
    }
}

/// The secret a test key is presented with.
pub fn material(name: &str) -> String {
    format!("{name}-secret-material-0123456789")
}

/// A calendar-day quota of `requests`.
pub fn daily(requests: u64) -> Limits {
    Limits {
        quotas: vec![keylimit_dataplane::QuotaWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "daily".into(),
            requests,
            period: keylimit_dataplane::QuotaPeriod::Day,
            alignment: keylimit_dataplane::QuotaAlignment::Calendar,
        }],
        ..Limits::default()
    }
}

pub fn doc(limits: Limits, keys: Vec<KeyEntry>) -> PolicyDocument {
    PolicyDocument {
        api_version: API_VERSION.into(),
        policy: PolicyConfig {
            load_shedding: None,
            usage: None,
            name: "orders".into(),
            namespace: "shop".into(),
            generation: 1,
            mode: Mode::Enforce,
            key_source: KeySource::default(),
            limits,
            policy_limits: None,
            throttle: None,
            routes: vec![],
            path_matching: Default::default(),
            upgrade_protocols: vec![],
            response: ResponseConfig::default(),
            store: Store::Local,
        },
        keys,
        shards: vec![],
    }
}

/// The upstream app. Paths: `/hold` answers headers at once and keeps the body open until
/// the test sends on `release` (or forever); `/stall` never answers; `/upgrade` switches
/// protocols and echoes bytes; `/hop` answers with hop-by-hop fields (`Keep-Alive`, and
/// `X-Private` named by `Connection`) next to `X-App`; anything else answers 200 with the
/// request's headers as JSON.
pub struct Upstream {
    pub addr: SocketAddr,
}

pub async fn upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(app))
                    .with_upgrades()
                    .await;
            });
        }
    });
    Upstream { addr }
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn app(mut req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    match req.uri().path() {
        "/hold" => {
            // The body's sender is leaked into a task that never sends: the body stays open
            // until the client goes away.
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"start")))).await;
            tokio::spawn(async move {
                tx.closed().await;
            });
            let stream = tokio_stream_from(rx);
            Ok(Response::new(StreamBody::new(stream).boxed()))
        }
        "/stall" => std::future::pending().await,
        "/hop" => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")).boxed());
            for (k, v) in [
                ("connection", "keep-alive, x-private"),
                ("keep-alive", "timeout=5"),
                ("x-private", "1"),
                ("x-app", "1"),
            ] {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            Ok(resp)
        }
        "/upgrade" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut resp = Response::new(Full::new(Bytes::new()).boxed());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert("upgrade", "echo".parse().unwrap());
            resp.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            Ok(resp)
        }
        _ => {
            let mut seen = BTreeMap::new();
            for (k, v) in req.headers() {
                seen.insert(k.to_string(), v.to_str().unwrap_or("").to_string());
            }
            seen.insert(":uri".into(), req.uri().to_string());
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            seen.insert(":body-len".into(), body.len().to_string());
            Ok(Response::new(
                Full::new(Bytes::from(serde_json::to_vec(&seen).unwrap())).boxed(),
            ))
        }
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

pub async fn start(dir: &ConfigDir, upstream: &Upstream) -> Sidecar {
    start_with(dir, upstream, |_| {}).await
}

pub async fn start_with(
    dir: &ConfigDir,
    upstream: &Upstream,
    tweak: impl FnOnce(&mut Settings),
) -> Sidecar {
    let mut s = Settings::local(
        dir.path().to_path_buf(),
        format!("http://{}", upstream.addr),
    );
    s.drain_timeout = Duration::from_secs(5);
    s.upstream_timeout = Duration::from_secs(5);
    tweak(&mut s);
    Sidecar::start(s, Arc::new(SystemClock)).await.unwrap()
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: serde_json::Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn get(c: &TestClient, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into())),
    }
}

pub async fn with_key(c: &TestClient, addr: SocketAddr, path: &str, name: &str) -> Reply {
    get(c, addr, path, &[("x-api-key", &material(name))]).await
}

/// Polls `f` until it returns true or the deadline passes (no fixed sleeps).
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
