//! The Redis store against a real `redis-server` (started by each test on a free port):
//! fleet-wide accuracy, quota durability across restarts, concurrency leases, and every fail
//! mode while Redis is down or stalled, with recovery.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use keylimit_dataplane::{
    FailMode, Limits, Mode, PolicyDocument, QuotaAlignment, QuotaPeriod, QuotaWindow, RateWindow,
    RedisStore, Store,
};
use keylimit_sidecar::clock::SystemClock;
use keylimit_sidecar::config::{hash_presented, key_id};
use keylimit_sidecar::limiter::{Check, Decision, LimitSet};
use keylimit_sidecar::metrics::Metrics;
use keylimit_sidecar::store::{RedisLimiter, RedisSettings};
use keylimit_sidecar::Sidecar;

/// A throwaway `redis-server` child: no persistence, loopback only, killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
}

fn redis_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH: these tests need a real Redis. \
                 Install it with hack/install-deps.sh (Debian package redis-server)."
            )
        })
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    fn start() -> Self {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Self {
        let child = Command::new(redis_binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pings(port) {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within 10s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn store(url: String, fail_mode: FailMode, replicas: u32) -> Store {
    Store::Redis(RedisStore {
        url,
        key_prefix: "kl:test".into(),
        timeout_ms: 200,
        fail_mode,
        replicas,
    })
}

fn rate(requests: u64, period_seconds: u64, burst: u64) -> Limits {
    Limits {
        rates: vec![RateWindow {
            name: "hour".into(),
            requests,
            period_seconds,
            burst,
        }],
        ..Limits::default()
    }
}

fn with_store(limits: Limits, store: Store) -> PolicyDocument {
    let mut d = doc(limits, vec![key("k")]);
    d.policy.store = store;
    d
}

async fn start_redis_sidecar(dir: &ConfigDir, up: &Upstream, lease_ttl: Duration) -> Sidecar {
    start_with(dir, up, |s| {
        s.redis = RedisSettings {
            lease_ttl,
            probe_interval: Duration::from_millis(50),
        };
    })
    .await
}

/// Sends `total` requests for key `k`, round-robin over `addrs`, `parallel` at a time;
/// returns (admitted, 429s, anything else).
async fn hammer(addrs: &[SocketAddr], total: usize, parallel: usize) -> (u64, u64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (ok, limited, other, next) = (ok.clone(), limited.clone(), other.clone(), next.clone());
        let addrs = addrs.to_vec();
        tasks.push(tokio::spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= total {
                    return;
                }
                let r = with_key(&c, addrs[i % addrs.len()], "/", "k").await;
                match r.status {
                    StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    StatusCode::TOO_MANY_REQUESTS => limited.fetch_add(1, Ordering::Relaxed),
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    (
        ok.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    )
}

async fn fleet_admitted(store: Store) -> u64 {
    // 50 at once (burst 49), then one per 72 s: nothing more fits in the test.
    let mut dir = ConfigDir::new();
    dir.write_doc(&with_store(rate(50, 3600, 49), store));
    let up = upstream().await;
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await);
    }
    let addrs: Vec<SocketAddr> = fleet.iter().map(|s| s.traffic_addr).collect();
    let (ok, limited, other) = hammer(&addrs, 300, 24).await;
    assert_eq!(other, 0, "only 200 and 429 expected");
    assert_eq!(ok + limited, 300);
    for s in fleet {
        s.stop().await;
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_share_one_limit_in_redis_but_not_locally() {
    let redis = RedisServer::start();
    let shared = fleet_admitted(store(redis.url(), FailMode::FailClosed, 3)).await;
    let local = fleet_admitted(Store::Local).await;
    eprintln!("MEASURED redis admitted {shared} local admitted {local} (limit 50 incl. burst, 3 sidecars, 300 requests)");
    assert_eq!(
        shared, 50,
        "Redis mode admits exactly the limit across the fleet"
    );
    assert_eq!(local, 150, "Local mode admits the limit per replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_survives_a_sidecar_restart_and_headers_match_local_mode() {
    let redis = RedisServer::start();
    let limits = Limits {
        quotas: vec![QuotaWindow {
            name: "monthly".into(),
            requests: 20,
            period: QuotaPeriod::Month,
            alignment: QuotaAlignment::Calendar,
        }],
        ..Limits::default()
    };
    let mut dir = ConfigDir::new();
    dir.write_doc(&with_store(
        limits,
        store(redis.url(), FailMode::FailClosed, 1),
    ));
    let up = upstream().await;
    let c = client();

    let first = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let mut last = None;
    for _ in 0..15 {
        let r = with_key(&c, first.traffic_addr, "/", "k").await;
        assert_eq!(r.status, StatusCode::OK);
        last = Some(r);
    }
    let last = last.expect("15 replies");
    assert_eq!(last.header("x-ratelimit-limit"), "20");
    assert_eq!(last.header("x-ratelimit-remaining"), "5");
    assert!(last
        .header("ratelimit-policy")
        .starts_with("\"monthly\";q=20;w="));
    first.stop().await;

    // A new process: nothing local survives, the count in Redis does.
    let second = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(with_key(&c, second.traffic_addr, "/", "k").await);
    }
    let admitted = statuses
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    eprintln!("MEASURED quota after restart: {admitted} of 10 admitted (15 of 20 used before)");
    assert_eq!(admitted, 5);
    let refused = statuses.last().expect("10 replies");
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.body["error"], "quota_exceeded");
    assert_eq!(refused.body["limit"]["name"], "monthly");
    assert!(refused.header("retry-after").parse::<u64>().unwrap() > 0);

    // /v1/usage mirrors what Redis answered.
    let usage = get(&c, second.admin_addr, "/v1/usage", &[]).await;
    let key = &usage.body["keys"][0];
    assert_eq!(
        key["quotas"][0]["used"],
        20,
        "{usage_body}",
        usage_body = usage.body
    );
    assert_eq!(
        key["exhaustion"]["reason"], "QuotaExceeded",
        "{}",
        usage.body
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_leases_release_on_abort_and_expire_after_a_crash() {
    let redis = RedisServer::start();
    let cfg = store(redis.url(), FailMode::FailClosed, 1);
    let limits = Limits {
        concurrency: Some(1),
        ..Limits::default()
    };
    let mut dir = ConfigDir::new();
    dir.write_doc(&with_store(limits.clone(), cfg.clone()));
    let up = upstream().await;
    let ttl = Duration::from_secs(2);
    let sc = start_redis_sidecar(&dir, &up, ttl).await;
    let c = client();

    // Release on client abort: the held body keeps the slot, dropping it frees it.
    let held = c
        .request(
            http::Request::get(format!("http://{}/hold", sc.traffic_addr))
                .header("x-api-key", material("k"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let r = with_key(&c, sc.traffic_addr, "/", "k").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"], "concurrency_limited");
    drop(held);
    eventually("the aborted request's lease to be released", || async {
        with_key(&c, sc.traffic_addr, "/", "k").await.status == StatusCode::OK
    })
    .await;

    // A "crashed" sidecar: takes a lease, never releases it, stops renewing.
    let Store::Redis(redis_cfg) = &cfg else {
        unreachable!()
    };
    let crashed = RedisLimiter::new(
        redis_cfg,
        Arc::new(SystemClock),
        Arc::new(Metrics::new(false)),
        RedisSettings {
            lease_ttl: ttl,
            ..RedisSettings::default()
        },
    );
    let set = LimitSet::compile(&limits, "key");
    let view = keylimit_sidecar::limiter::Limiter::new(Arc::new(SystemClock));
    let check = Check {
        key_id: key_id(&hash_presented(material("k").as_bytes())),
        key_limits: &set,
        route_limits: None,
        policy_limits: None,
        cost: 1,
        throttle: None,
        dry_run: false,
    };
    let Some(Decision::Allow(a)) = crashed.decide(redis_cfg, &check, &view).await else {
        panic!("the crashed sidecar's request should have been admitted");
    };
    let taken = Instant::now();
    std::mem::forget(a.permit);
    crashed.halt();
    drop(crashed);

    let r = with_key(&c, sc.traffic_addr, "/", "k").await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the leaked slot is taken"
    );
    let deadline = taken + ttl + Duration::from_secs(5);
    loop {
        let r = with_key(&c, sc.traffic_addr, "/", "k").await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "leaked lease never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let freed_after = taken.elapsed();
    eprintln!("MEASURED leaked lease freed after {freed_after:?} (ttl {ttl:?})");
    assert!(
        freed_after + Duration::from_millis(100) >= ttl,
        "freed before its TTL"
    );
    sc.stop().await;
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_text(c: &TestClient, sc: &Sidecar) -> String {
    match get(c, sc.admin_addr, "/metrics", &[]).await.body {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// 10 per hour (burst 9) with 2 replicas: LocalFallback allows 5 per sidecar.
async fn fail_mode_holds_while_redis_is_down(mode: FailMode, label: &str) {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let mut dir = ConfigDir::new();
    dir.write_doc(&with_store(rate(10, 3600, 9), store(redis.url(), mode, 2)));
    let up = upstream().await;
    let sc = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let c = client();
    let a = sc.traffic_addr;

    let (ok, limited, _) = hammer(&[a], 12, 1).await;
    assert_eq!((ok, limited), (10, 2), "exact while Redis is up");

    redis.stop();
    let budget = Duration::from_millis(200) + Duration::from_millis(800);
    let mut statuses = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let r = with_key(&c, a, "/", "k").await;
        slowest = slowest.max(t.elapsed());
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.body["error"], "store_unavailable");
            assert_eq!(r.header("retry-after"), "1");
        }
        statuses.push(r.status);
    }
    eprintln!("MEASURED {label} with Redis down: statuses {statuses:?}, slowest {slowest:?}");
    assert!(
        slowest <= budget,
        "a request waited {slowest:?} for a dead Redis"
    );
    let count = |s: StatusCode| statuses.iter().filter(|x| **x == s).count();
    match mode {
        FailMode::FailOpen => assert_eq!(count(StatusCode::OK), 10),
        FailMode::FailClosed => assert_eq!(count(StatusCode::SERVICE_UNAVAILABLE), 10),
        FailMode::LocalFallback => {
            assert_eq!(count(StatusCode::OK), 5, "limit / replicas");
            assert_eq!(count(StatusCode::TOO_MANY_REQUESTS), 5);
        }
    }
    let text = metrics_text(&c, &sc).await;
    assert_eq!(metric(&text, "keylimit_store_up"), Some(0.0));
    let fallbacks = format!("keylimit_store_fallbacks_total{{mode=\"{label}\"}}");
    assert!(metric(&text, &fallbacks).unwrap_or(0.0) >= 10.0, "{text}");

    // Same port, empty Redis: the probe notices and exact limits resume by themselves.
    let _redis = RedisServer::start_on(port);
    eventually("the store to be marked up again", || async {
        metric(&metrics_text(&c, &sc).await, "keylimit_store_up") == Some(1.0)
    })
    .await;
    let (ok, limited, other) = hammer(&[a], 12, 1).await;
    eprintln!("MEASURED {label} after Redis returned: {ok} admitted, {limited} limited");
    assert_eq!(
        (ok, limited, other),
        (10, 2, 0),
        "exact again after recovery"
    );
    sc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_admits_while_redis_is_down_then_recovers() {
    fail_mode_holds_while_redis_is_down(FailMode::FailOpen, "fail_open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_while_redis_is_down_then_recovers() {
    fail_mode_holds_while_redis_is_down(FailMode::FailClosed, "fail_closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fallback_enforces_limit_over_replicas_then_recovers() {
    fail_mode_holds_while_redis_is_down(FailMode::LocalFallback, "local_fallback").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_timeout() {
    let redis = RedisServer::start();
    let mut dir = ConfigDir::new();
    dir.write_doc(&with_store(
        rate(1000, 3600, 999),
        store(redis.url(), FailMode::FailClosed, 1),
    ));
    let up = upstream().await;
    let sc = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let c = client();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "k").await.status,
        StatusCode::OK
    );

    // SIGSTOP: the socket stays open but nothing answers, the slow case rather than the
    // refused-connection one.
    redis.signal("-STOP");
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let r = with_key(&c, sc.traffic_addr, "/", "k").await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    redis.signal("-CONT");
    eprintln!("MEASURED stalled Redis: slowest request {slowest:?} (timeout 200ms)");
    assert!(
        slowest >= Duration::from_millis(150),
        "the first call must have waited"
    );
    assert!(slowest <= Duration::from_millis(1000), "waited {slowest:?}");
    eventually("recovery after SIGCONT", || async {
        with_key(&c, sc.traffic_addr, "/", "k").await.status == StatusCode::OK
    })
    .await;
    sc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_counts_in_redis_but_forwards() {
    let redis = RedisServer::start();
    let mut d = with_store(
        rate(5, 3600, 4),
        store(redis.url(), FailMode::FailClosed, 1),
    );
    d.policy.mode = Mode::DryRun;
    let mut dir = ConfigDir::new();
    dir.write_doc(&d);
    let up = upstream().await;
    let sc = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let c = client();
    let (ok, limited, other) = hammer(&[sc.traffic_addr], 8, 1).await;
    assert_eq!((ok, limited, other), (8, 0, 0));
    let text = metrics_text(&c, &sc).await;
    let name = "keylimit_requests_total{policy=\"shop/orders\",decision=\"dry_run_refused\"}";
    assert_eq!(metric(&text, name), Some(3.0), "{text}");
    sc.stop().await;
}
