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
    ExhaustionReason, FailMode, Limits, Mode, PolicyDocument, QuotaAlignment, QuotaPeriod,
    QuotaWindow, RateWindow, RedisStore, Store,
};
use keylimit_sidecar::config::{hash_presented, key_id};
use keylimit_sidecar::limiter::clock::{Clock, SystemClock};
use keylimit_sidecar::limiter::local::Limiter;
use keylimit_sidecar::limiter::redis::{RedisLimiter, RedisSettings};
use keylimit_sidecar::limiter::{Admission, Check, Decision, LimitSet, Refusal};
use keylimit_sidecar::metrics::Metrics;
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

/// The store timeout of tests that are not about timeouts: generous, because a debug build
/// sharing two loaded cores with a fleet of sidecars can take 200 ms for one call, and a
/// timeout there turns an accuracy test into a fail-mode one.
const TIMEOUT_MS: u64 = 1000;

fn store(url: String, fail_mode: FailMode, replicas: u32) -> Store {
    store_with_timeout(url, fail_mode, replicas, TIMEOUT_MS)
}

fn store_with_timeout(url: String, fail_mode: FailMode, replicas: u32, timeout_ms: u64) -> Store {
    Store::Redis(RedisStore {
        url: Some(url),
        key_prefix: "kl:test".into(),
        timeout_ms,
        fail_mode,
        replicas,
    })
}

fn rate(requests: u64, period_seconds: u64, burst: u64) -> Limits {
    Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
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
            ..RedisSettings::default()
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

/// Key rotation against Redis: two sidecars, one quota. The key spends part of it, is rotated
/// (the document names the old key as previous key and counter), and the rest is spent with
/// the new key on one sidecar and the old one on the other: exactly the quota in total, and
/// `/v1/usage` reports the refusal under the ApiKey's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_keeps_its_redis_counters_on_every_sidecar() {
    let redis = RedisServer::start();
    let limits = daily(12);
    let mut dir = ConfigDir::new();
    dir.write_doc(&with_store(
        limits.clone(),
        store(redis.url(), FailMode::FailClosed, 2),
    ));
    let up = upstream().await;
    let c = client();
    let a = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let b = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    for sc in [&a, &b, &a, &b] {
        assert_eq!(
            with_key(&c, sc.traffic_addr, "/", "k").await.status,
            StatusCode::OK
        );
    }

    let old = keylimit_dataplane::hash_key(material("k").as_bytes());
    let new = "k-rotated-secret-material-0123456789";
    let mut rotated = with_store(limits, store(redis.url(), FailMode::FailClosed, 2));
    rotated.keys[0].sha256 = keylimit_dataplane::hash_key(new.as_bytes());
    rotated.keys[0].previous = Some(keylimit_dataplane::PreviousKey {
        sha256: old.clone(),
        valid_until: i64::from(u32::MAX),
    });
    rotated.keys[0].counter = Some(old);
    dir.write_doc(&rotated);
    a.reload_now().await.unwrap();
    b.reload_now().await.unwrap();

    let (mut admitted, mut turn) = (0, 0);
    loop {
        let (sc, key) = if turn % 2 == 0 {
            (&a, new.to_string())
        } else {
            (&b, material("k"))
        };
        turn += 1;
        let r = get(&c, sc.traffic_addr, "/", &[("x-api-key", &key)]).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert_eq!(r.status, StatusCode::OK);
        admitted += 1;
        assert!(admitted <= 12, "the quota never ran out");
    }
    eprintln!("MEASURED rotation in Redis: 4 before, {admitted} after (quota 12)");
    assert_eq!(admitted, 8, "4 of 12 were spent before the rotation");
    let usage = get(&c, a.admin_addr, "/v1/usage", &[]).await;
    assert_eq!(usage.body["keys"][0]["name"], "k", "{}", usage.body);
    // Sidecar `a` mirrors what Redis last told it: 11 on its last admission (`b` spent the
    // 12th), then the refusal.
    let k = &usage.body["keys"][0];
    assert_eq!(k["quotas"][0]["used"], 11, "{}", usage.body);
    assert_eq!(k["exhaustion"]["reason"], "QuotaExceeded", "{}", usage.body);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_survives_a_sidecar_restart_and_headers_match_local_mode() {
    let redis = RedisServer::start();
    let limits = Limits {
        quotas: vec![QuotaWindow {
            unit: keylimit_dataplane::Unit::Requests,
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
    let view = keylimit_sidecar::limiter::local::Limiter::new(Arc::new(SystemClock));
    let check = Check {
        key_id: key_id(&hash_presented(material("k").as_bytes())),
        key_limits: &set,
        route_limits: None,
        policy_limits: None,
        cost: 1,
        reserve: 0,
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
    let budget = Duration::from_millis(TIMEOUT_MS) + Duration::from_millis(800);
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
        store_with_timeout(redis.url(), FailMode::FailClosed, 1, 200),
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

// ---- Clock skew between sidecars, and leases when the timeout fires mid-call ----

/// The system clock moved by a fixed offset: a sidecar whose host clock is wrong.
struct Skewed(i64);

impl Clock for Skewed {
    fn now_ns(&self) -> u64 {
        SystemClock.now_ns().saturating_add_signed(self.0)
    }
    fn mono_ns(&self) -> u64 {
        SystemClock.mono_ns().saturating_add_signed(self.0)
    }
}

const HOUR_NS: i64 = 3_600_000_000_000;

fn redis_cfg(url: String, timeout_ms: u64) -> RedisStore {
    RedisStore {
        url: Some(url),
        key_prefix: "kl:test".into(),
        timeout_ms,
        fail_mode: FailMode::FailClosed,
        replicas: 1,
    }
}

/// A sidecar's Redis limiter without the HTTP around it.
fn redis_limiter(cfg: &RedisStore, clock: Arc<dyn Clock>, lease_ttl: Duration) -> RedisLimiter {
    RedisLimiter::new(
        cfg,
        clock,
        Arc::new(Metrics::new(false)),
        RedisSettings {
            lease_ttl,
            probe_interval: Duration::from_millis(50),
            ..RedisSettings::default()
        },
    )
}

async fn decide(l: &RedisLimiter, cfg: &RedisStore, set: &LimitSet, key: u64) -> Option<Decision> {
    let view = Limiter::new(Arc::new(SystemClock));
    let check = Check {
        key_id: key,
        key_limits: set,
        route_limits: None,
        policy_limits: None,
        cost: 1,
        reserve: 0,
        throttle: None,
        dry_run: false,
    };
    l.decide(cfg, &check, &view).await
}

async fn admitted(l: &RedisLimiter, cfg: &RedisStore, set: &LimitSet, key: u64) -> Admission {
    match decide(l, cfg, set, key).await {
        Some(Decision::Allow(a)) => a,
        other => panic!("expected an admission, got {other:?}"),
    }
}

async fn refused(l: &RedisLimiter, cfg: &RedisStore, set: &LimitSet, key: u64) -> Refusal {
    match decide(l, cfg, set, key).await {
        Some(Decision::Refuse(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A separate connection that looks at Redis directly, never through a limiter.
async fn inspector(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("inspector connection")
}

/// Leases held in every concurrency sorted set, with their expiry scores.
async fn leases(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(String, i64)> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:c:*")
        .query_async(conn)
        .await
        .expect("KEYS");
    let mut out = Vec::new();
    for k in keys {
        let members: Vec<(String, i64)> = redis::cmd("ZRANGE")
            .arg(&k)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await
            .expect("ZRANGE");
        out.extend(members);
    }
    out
}

async fn redis_time_us(conn: &mut redis::aio::MultiplexedConnection) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    s * 1_000_000 + us
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_clock_does_not_prune_other_sidecars_live_leases() {
    let redis = RedisServer::start();
    let cfg = redis_cfg(redis.url(), 1000);
    let set = LimitSet::compile(
        &Limits {
            concurrency: Some(2),
            ..Limits::default()
        },
        "key",
    );
    let ttl = Duration::from_secs(30);
    let honest = redis_limiter(&cfg, Arc::new(SystemClock), ttl);
    let fast = redis_limiter(&cfg, Arc::new(Skewed(HOUR_NS)), ttl);
    let mut ins = inspector(&redis.url()).await;

    let _a = admitted(&honest, &cfg, &set, 7).await;
    // The fast sidecar's "now" is an hour past the honest lease's expiry.
    let _b = admitted(&fast, &cfg, &set, 7).await;
    let held = leases(&mut ins).await;
    eprintln!("MEASURED leases after a fast sidecar's decision: {held:?}");
    assert_eq!(held.len(), 2, "the honest sidecar's live lease was pruned");
    let now = redis_time_us(&mut ins).await;
    for (id, expiry) in &held {
        let ahead = Duration::from_micros(u64::try_from(expiry - now).unwrap_or(0));
        assert!(
            ahead <= ttl && ahead + Duration::from_secs(5) >= ttl,
            "lease {id} expires {ahead:?} from Redis' now, not one TTL"
        );
    }
    for l in [&honest, &fast] {
        let r = refused(l, &cfg, &set, 7).await;
        assert_eq!(r.reason, ExhaustionReason::ConcurrencyLimited);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_clock_keeps_its_leases_and_a_fast_ones_expire_after_one_ttl() {
    let redis = RedisServer::start();
    let cfg = redis_cfg(redis.url(), 1000);
    let set = LimitSet::compile(
        &Limits {
            concurrency: Some(1),
            ..Limits::default()
        },
        "key",
    );
    let ttl = Duration::from_secs(1);
    let honest = redis_limiter(&cfg, Arc::new(SystemClock), ttl);
    let mut ins = inspector(&redis.url()).await;

    // An hour slow: its lease (taken and renewed) must stay live past its first expiry.
    let slow = redis_limiter(&cfg, Arc::new(Skewed(-HOUR_NS)), ttl);
    let held = admitted(&slow, &cfg, &set, 8).await;
    let first_expiry = leases(&mut ins)
        .await
        .first()
        .map(|l| l.1)
        .expect("a lease");
    eventually("Redis' clock to pass the lease's first expiry", || {
        let ins = ins.clone();
        async move { redis_time_us(&mut ins.clone()).await > first_expiry + 200_000 }
    })
    .await;
    let r = refused(&honest, &cfg, &set, 8).await;
    assert_eq!(
        r.reason,
        ExhaustionReason::ConcurrencyLimited,
        "renewed lease"
    );
    drop(held);
    eventually("the slow sidecar's lease to be released", || {
        let mut ins = ins.clone();
        async move { leases(&mut ins).await.is_empty() }
    })
    .await;

    // An hour fast, then crashed: its lease frees after one TTL of Redis time, not an hour.
    let fast = redis_limiter(&cfg, Arc::new(Skewed(HOUR_NS)), ttl);
    let a = admitted(&fast, &cfg, &set, 8).await;
    let taken = Instant::now();
    std::mem::forget(a.permit);
    fast.halt();
    drop(fast);
    let deadline = taken + ttl + Duration::from_secs(5);
    loop {
        if let Some(Decision::Allow(_)) = decide(&honest, &cfg, &set, 8).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a fast sidecar's crashed lease outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let freed = taken.elapsed();
    eprintln!("MEASURED fast sidecar's crashed lease freed after {freed:?} (ttl {ttl:?})");
    assert!(
        freed + Duration::from_millis(100) >= ttl,
        "freed before its TTL"
    );
}

fn secs_to_next_hour() -> u64 {
    3600 - (SystemClock.now_ns() / 1_000_000_000) % 3600
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_clock_does_not_refill_rate_windows() {
    let redis = RedisServer::start();
    let cfg = redis_cfg(redis.url(), 1000);
    let honest = redis_limiter(&cfg, Arc::new(SystemClock), Duration::from_secs(30));
    let fast = redis_limiter(&cfg, Arc::new(Skewed(HOUR_NS)), Duration::from_secs(30));

    // Rate: 2 per hour, both at once (interval 30 min).
    let rate_set = LimitSet::compile(&rate(2, 3600, 1), "key");
    admitted(&honest, &cfg, &rate_set, 1).await;
    admitted(&honest, &cfg, &rate_set, 1).await;
    for (who, l) in [("honest", &honest), ("fast", &fast)] {
        let r = refused(l, &cfg, &rate_set, 1).await;
        assert_eq!(r.reason, ExhaustionReason::RateLimited, "{who}");
        let retry = r.retry_after_secs();
        eprintln!("MEASURED {who} sidecar: rate Retry-After {retry}s (interval 1800s)");
        assert!((1795..=1800).contains(&retry), "{who}: Retry-After {retry}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_clock_neither_ends_nor_misplaces_quota_windows() {
    let redis = RedisServer::start();
    let cfg = redis_cfg(redis.url(), 1000);
    let honest = redis_limiter(&cfg, Arc::new(SystemClock), Duration::from_secs(30));
    let fast = redis_limiter(&cfg, Arc::new(Skewed(HOUR_NS)), Duration::from_secs(30));

    // Quota: 3 per calendar hour. Keep clear of the hour's end, where the window turns over
    // under the test (bounded: at most 20 s).
    let start = Instant::now();
    while secs_to_next_hour() < 20 {
        assert!(start.elapsed() < Duration::from_secs(25));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quota_set = LimitSet::compile(
        &Limits {
            quotas: vec![QuotaWindow {
                unit: keylimit_dataplane::Unit::Requests,
                name: "hourly".into(),
                requests: 3,
                period: QuotaPeriod::Hour,
                alignment: QuotaAlignment::Calendar,
            }],
            ..Limits::default()
        },
        "key",
    );
    let expect_reset = |who: &str, r: &Refusal| {
        assert_eq!(r.reason, ExhaustionReason::QuotaExceeded, "{who}");
        let retry = r.retry_after_secs();
        let left = secs_to_next_hour();
        eprintln!("MEASURED {who} sidecar: quota Retry-After {retry}s, {left}s left in the hour");
        assert!(retry.abs_diff(left) <= 2, "{who}: Retry-After {retry}s");
    };
    // Key 2: the honest sidecar opens the window; the fast one must not see it as over.
    admitted(&honest, &cfg, &quota_set, 2).await;
    admitted(&honest, &cfg, &quota_set, 2).await;
    let third = admitted(&fast, &cfg, &quota_set, 2).await;
    let status = third.status.expect("quota status");
    assert_eq!(status.remaining, 0, "the fast sidecar started a new window");
    assert!(status.reset_secs.abs_diff(secs_to_next_hour()) <= 2);
    expect_reset("honest", &refused(&honest, &cfg, &quota_set, 2).await);
    expect_reset("fast", &refused(&fast, &cfg, &quota_set, 2).await);

    // Key 3: a fresh fast sidecar (no reply seen yet, so it guesses the window from its own
    // clock) opens the window: Redis' hour, not the one an hour ahead.
    let fresh = redis_limiter(&cfg, Arc::new(Skewed(HOUR_NS)), Duration::from_secs(30));
    admitted(&fresh, &cfg, &quota_set, 3).await;
    admitted(&honest, &cfg, &quota_set, 3).await;
    admitted(&honest, &cfg, &quota_set, 3).await;
    expect_reset("honest", &refused(&honest, &cfg, &quota_set, 3).await);
    expect_reset("fresh fast", &refused(&fresh, &cfg, &quota_set, 3).await);
}

/// A loopback TCP proxy in front of Redis that can hold Redis' replies while commands still
/// flow in: Redis runs a script, and the caller's timeout fires before it hears back.
struct ReplyHoldingProxy {
    addr: SocketAddr,
    hold: tokio::sync::watch::Sender<bool>,
    /// Every byte Redis sent while replies were held.
    held: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl ReplyHoldingProxy {
    async fn start(redis_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (hold, hold_rx) = tokio::sync::watch::channel(false);
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = held.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let (mut client_r, mut client_w) = client.into_split();
                let (mut server_r, mut server_w) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
                });
                let (mut hold_rx, log) = (hold_rx.clone(), log.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 64 * 1024];
                    // Keeps reading while holding, so every reply Redis sends is logged.
                    let mut pending = Vec::new();
                    loop {
                        tokio::select! {
                            r = server_r.read(&mut buf) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if *hold_rx.borrow() {
                                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                                    }
                                    pending.extend_from_slice(&buf[..n]);
                                }
                            },
                            changed = hold_rx.changed() => {
                                if changed.is_err() {
                                    return;
                                }
                            }
                        }
                        if !*hold_rx.borrow() && !pending.is_empty() {
                            if client_w.write_all(&pending).await.is_err() {
                                return;
                            }
                            pending.clear();
                        }
                    }
                });
            }
        });
        Self { addr, hold, held }
    }

    fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }

    fn held(&self) -> Vec<u8> {
        self.held.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_released_when_the_timeout_fires_after_the_script_ran() {
    let redis = RedisServer::start();
    let proxy = ReplyHoldingProxy::start(redis.port).await;
    // Generous, so even a loaded machine writes the script before the timeout drops it.
    let cfg = redis_cfg(proxy.url(), 500);
    let set = LimitSet::compile(
        &Limits {
            concurrency: Some(1),
            ..Limits::default()
        },
        "key",
    );
    let ttl = Duration::from_secs(60);
    let l = redis_limiter(&cfg, Arc::new(SystemClock), ttl);
    let mut ins = inspector(&redis.url()).await;

    // Connected, script loaded, and a lease taken and released normally.
    let a = admitted(&l, &cfg, &set, 9).await;
    assert_eq!(leases(&mut ins).await.len(), 1);
    drop(a);
    eventually("the first lease to be released", || {
        let mut ins = ins.clone();
        async move { leases(&mut ins).await.is_empty() }
    })
    .await;

    proxy.hold(true);
    let t = Instant::now();
    let d = decide(&l, &cfg, &set, 9).await;
    let waited = t.elapsed();
    assert!(d.is_none(), "FailClosed after the timeout, got {d:?}");
    assert!(
        waited >= Duration::from_millis(490),
        "returned after {waited:?}"
    );
    // Redis did run the script: its reply is the only array reply (`*` at the start of a
    // reply) among what the proxy holds; probe PINGs (`+PONG`) may be held too.
    eventually("Redis to have answered the script", || async {
        let held = proxy.held();
        held.first() == Some(&b'*') || held.windows(2).any(|w| w == b"\n*")
    })
    .await;
    eventually("the timed-out request's lease to be released", || {
        let mut ins = ins.clone();
        async move { leases(&mut ins).await.is_empty() }
    })
    .await;
    eprintln!(
        "MEASURED lease of a timed-out decision freed {:?} after the decision returned (ttl {ttl:?})",
        t.elapsed().saturating_sub(waited)
    );
    proxy.hold(false);
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr if it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (hack/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA named `name`: `<name>.crt` and `<name>.key` in `dir`.
fn make_ca(dir: &std::path::Path, name: &str) {
    let (crt, key, subj) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("/CN={name}"),
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `redis-server` serving only TLS on 127.0.0.1 with a certificate from `ca` (CA `ca` in
/// `dir`, made by `make_ca`), requiring the password `pw`.
struct TlsRedis {
    server: RedisServer,
}

impl TlsRedis {
    fn start(dir: &std::path::Path, ca: &str, pw: &str) -> Self {
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        let port = free_port();
        let child = Command::new(redis_binary())
            .current_dir(dir)
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", &ca_crt, "--tls-auth-clients", "no"])
            .args(["--requirepass", pw, "--save", "", "--appendonly", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn redis-server");
        let mut server = RedisServer {
            child: Some(child),
            port,
        };
        // Listening means the certificate loaded; a build without TLS exits instead, and its
        // own words say why.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = server.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let mut log = String::new();
                    if let Some(mut out) = c.stdout.take() {
                        let _ = out.read_to_string(&mut log);
                    }
                    panic!("redis-server with --tls-port exited ({status}): {log}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on TLS port {port} within 10s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { server }
    }
}

/// A limiter whose URL, password and CA come from the settings (the environment the webhook
/// fills from the policy's connection Secret); the document carries no URL.
fn secret_limiter(url: String, ca_pem: Option<Vec<u8>>) -> (RedisLimiter, RedisStore) {
    let cfg = RedisStore {
        url: None,
        ..redis_cfg(String::new(), TIMEOUT_MS)
    };
    let l = RedisLimiter::new(
        &cfg,
        Arc::new(SystemClock),
        Arc::new(Metrics::new(false)),
        RedisSettings {
            probe_interval: Duration::from_millis(50),
            url: Some(url),
            ca_pem,
            ..RedisSettings::default()
        },
    );
    (l, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_decides_exactly_through_a_server_verified_by_the_secrets_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_ca(dir.path(), "ca");
    make_ca(dir.path(), "other-ca");
    let redis = TlsRedis::start(dir.path(), "ca", "s3cret");
    let pem = |name: &str| std::fs::read(dir.path().join(name)).expect("read CA");
    // The password travels inside the Secret's URL.
    let url = format!("rediss://:s3cret@127.0.0.1:{}/0", redis.server.port);
    let set = LimitSet::compile(
        &Limits {
            concurrency: Some(2),
            ..Limits::default()
        },
        "key",
    );

    // The right CA: exact limits, decided by Redis (FailClosed has no local answer, so a
    // refusal can only come from the server).
    let (good, cfg) = secret_limiter(url.clone(), Some(pem("ca.crt")));
    let _a = admitted(&good, &cfg, &set, 5).await;
    let _b = admitted(&good, &cfg, &set, 5).await;
    let r = refused(&good, &cfg, &set, 5).await;
    assert_eq!(r.reason, ExhaustionReason::ConcurrencyLimited);
    assert!(good.is_up());

    // A CA that did not sign the server's certificate, and the system roots (no CA at all):
    // the handshake fails, so no decision is taken through the server, only the fail mode
    // (FailClosed: no decision, a 503).
    for (what, ca) in [
        ("another CA", Some(pem("other-ca.crt"))),
        ("system roots", None),
    ] {
        let (bad, cfg) = secret_limiter(url.clone(), ca);
        for _ in 0..3 {
            let d = decide(&bad, &cfg, &set, 6).await;
            assert!(
                d.is_none(),
                "{what}: decided through an unverified server: {d:?}"
            );
        }
        assert!(!bad.is_up(), "{what}");
    }

    // A CA with a plain redis:// URL is refused, never silently dropped.
    let plain = format!("redis://:s3cret@127.0.0.1:{}/0", redis.server.port);
    let (bad, cfg) = secret_limiter(plain, Some(pem("ca.crt")));
    assert!(decide(&bad, &cfg, &set, 6).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_without_url_and_no_env_url_applies_the_fail_mode() {
    let cfg = RedisStore {
        url: None,
        ..redis_cfg(String::new(), 200)
    };
    let l = redis_limiter(&cfg, Arc::new(SystemClock), Duration::from_secs(30));
    let set = LimitSet::compile(&rate(10, 60, 10), "key");
    assert!(decide(&l, &cfg, &set, 1).await.is_none());
    assert!(!l.is_up());
}

/// `cost: 0` is free in Redis mode too (the local limiter's rule): a key whose rate is spent
/// is still served on a free route, and the free requests do not spend anything.
#[tokio::test]
async fn a_free_route_costs_nothing_in_redis_either() {
    let redis = RedisServer::start();
    let mut dir = ConfigDir::new();
    let mut d = with_store(
        rate(1, 3600, 0),
        store_with_timeout(redis.url(), FailMode::FailClosed, 1, 1000),
    );
    d.policy.routes = vec![keylimit_dataplane::Route {
        usage: None,
        name: "health".into(),
        path_prefix: "/health".into(),
        methods: vec![],
        cost: 0,
        limits: None,
    }];
    dir.write_doc(&d);
    let up = upstream().await;
    let sc = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let c = client();
    for _ in 0..3 {
        let r = with_key(&c, sc.traffic_addr, "/health", "k").await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "k").await.status,
        StatusCode::OK,
        "free requests spent nothing"
    );
    let r = with_key(&c, sc.traffic_addr, "/", "k").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    let r = with_key(&c, sc.traffic_addr, "/health", "k").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    sc.stop().await;
}

/// `EVALSHA` calls Redis has served so far (`INFO commandstats`).
async fn evalsha_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Concurrent decisions reach Redis in batched script calls (fewer calls than decisions),
/// and batching changes no count: every key admits exactly its limit whichever batch each
/// decision landed in (several decisions of one key share a batch), Redis holds exactly
/// those charges, and concurrency leases taken inside batches are exact and all released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_are_batched_and_stay_exact() {
    let redis = RedisServer::start();
    let cfg = redis_cfg(redis.url(), TIMEOUT_MS);
    let l = Arc::new(redis_limiter(
        &cfg,
        Arc::new(SystemClock),
        Duration::from_secs(30),
    ));
    let mut ins = inspector(&redis.url()).await;
    // Keys 1-5: 20 at once (burst 19), then one per 3 minutes. Keys 6-10: the same rate,
    // under a daily quota of 15.
    let rate_bound = Arc::new(LimitSet::compile(&rate(20, 3600, 19), "key"));
    let quota_bound = Arc::new(LimitSet::compile(
        &Limits {
            quotas: vec![QuotaWindow {
                unit: keylimit_dataplane::Unit::Requests,
                name: "daily".into(),
                requests: 15,
                period: QuotaPeriod::Day,
                alignment: QuotaAlignment::Calendar,
            }],
            ..rate(20, 3600, 19)
        },
        "key",
    ));
    // Loaded first, so a NOSCRIPT retry does not count as a batch.
    admitted(&l, &cfg, &rate_bound, 99).await;
    let calls_before = evalsha_calls(&mut ins).await;

    const TOTAL: u64 = 600;
    let next = Arc::new(AtomicU64::new(0));
    let per_key: Arc<Vec<AtomicU64>> = Arc::new((0..=10).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (l, cfg, next, per_key) = (l.clone(), cfg.clone(), next.clone(), per_key.clone());
        let (rate_bound, quota_bound) = (rate_bound.clone(), quota_bound.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= TOTAL {
                    return;
                }
                let key = 1 + i % 10;
                let (set, reason) = if key <= 5 {
                    (&rate_bound, ExhaustionReason::RateLimited)
                } else {
                    (&quota_bound, ExhaustionReason::QuotaExceeded)
                };
                match decide(&l, &cfg, set, key).await {
                    Some(Decision::Allow(_)) => {
                        per_key[key as usize].fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Decision::Refuse(r)) => assert_eq!(r.reason, reason, "key {key}"),
                    None => panic!("the store failed (timeout?) under batching"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller task");
    }
    let calls = evalsha_calls(&mut ins).await - calls_before;
    let admitted_per_key: Vec<u64> = (1..=10)
        .map(|k| per_key[k].load(Ordering::Relaxed))
        .collect();
    eprintln!(
        "MEASURED {TOTAL} decisions from 64 callers in {calls} script calls; admitted per key {admitted_per_key:?}"
    );
    assert_eq!(admitted_per_key, [20, 20, 20, 20, 20, 15, 15, 15, 15, 15]);
    assert!(
        calls < TOTAL,
        "{calls} script calls for {TOTAL} concurrent decisions: not batched"
    );
    // What Redis charged: each quota-bound key's count is exactly its quota.
    let quota_keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:q:*")
        .query_async(&mut ins)
        .await
        .expect("KEYS");
    assert_eq!(quota_keys.len(), 5, "{quota_keys:?}");
    for k in &quota_keys {
        let used: u64 = redis::cmd("HGET")
            .arg(k)
            .arg("c")
            .query_async(&mut ins)
            .await
            .expect("HGET");
        assert_eq!(used, 15, "{k}");
        // The TTL is set when the window opens and kept by later charges: the key expires
        // with its window (end in µs, expiry in ms).
        let end_us: u64 = redis::cmd("HGET")
            .arg(k)
            .arg("e")
            .query_async(&mut ins)
            .await
            .expect("HGET");
        let expires_ms: i64 = redis::cmd("PEXPIRETIME")
            .arg(k)
            .query_async(&mut ins)
            .await
            .expect("PEXPIRETIME");
        assert_eq!(
            u64::try_from(expires_ms).ok(),
            Some(end_us.div_ceil(1000)),
            "{k}"
        );
    }

    // Concurrency: 24 callers at once on a limit of 3, each holding what it got until every
    // one has answered: exactly 3 leases, all released when dropped.
    let concurrent = Arc::new(LimitSet::compile(
        &Limits {
            concurrency: Some(3),
            ..Limits::default()
        },
        "key",
    ));
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let (l, cfg, set) = (l.clone(), cfg.clone(), concurrent.clone());
        tasks.push(tokio::spawn(
            async move { decide(&l, &cfg, &set, 11).await },
        ));
    }
    let mut held = Vec::new();
    for t in tasks {
        match t.await.expect("caller task") {
            Some(Decision::Allow(a)) => held.push(a),
            Some(Decision::Refuse(r)) => {
                assert_eq!(r.reason, ExhaustionReason::ConcurrencyLimited)
            }
            None => panic!("the store failed under batching"),
        }
    }
    assert_eq!(held.len(), 3, "exactly the concurrency limit admitted");
    assert_eq!(leases(&mut ins).await.len(), 3);
    drop(held);
    eventually("every lease to be released", || {
        let mut ins = ins.clone();
        async move { leases(&mut ins).await.is_empty() }
    })
    .await;
}

/// An app that reports `?tokens=N` in `x-usage-tokens`, as a metered API does.
async fn usage_upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let n = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("tokens="))
                            .unwrap_or("0")
                            .to_string();
                        let mut r = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{}"),
                        ));
                        r.headers_mut().insert("x-usage-tokens", n.parse().unwrap());
                        Ok::<_, std::convert::Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr }
}

/// Token limits in Redis (#14): the cost a response reports on one sidecar is charged where
/// every sidecar sees it, a cheaper response gives its reservation back, and debt run up on
/// one sidecar refuses the key on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_costs_settle_in_redis_for_the_whole_fleet() {
    let redis = RedisServer::start();
    let mut d = with_store(
        Limits {
            rates: vec![RateWindow {
                unit: keylimit_dataplane::Unit::Tokens,
                name: "hour-tokens".into(),
                requests: 1_000,
                period_seconds: 3_600,
                burst: 999,
            }],
            ..Limits::default()
        },
        store(redis.url(), FailMode::FailClosed, 2),
    );
    d.api_version = keylimit_dataplane::API_VERSION_METERED.into();
    d.policy.usage = Some(keylimit_dataplane::UsageSource {
        header: Some("x-usage-tokens".into()),
        json_field: None,
        estimate: Some(keylimit_dataplane::UsageEstimate {
            header: None,
            fixed: 100,
            max: None,
        }),
    });
    let mut dir = ConfigDir::new();
    dir.write_doc(&d);
    let up = usage_upstream().await;
    let a = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let b = start_redis_sidecar(&dir, &up, Duration::from_secs(30)).await;
    let c = client();
    let r = with_key(&c, a.traffic_addr, "/?tokens=40", "k").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining"), "900", "100 reserved");
    // On the other sidecar: 40 spent (60 of the reservation came back), 100 reserved now.
    // Settlement is asynchronous, and each of these probes reports 0, so it gives its own
    // reservation back: they converge on 860.
    eventually("the reported 40 tokens to settle in Redis", || {
        let c = c.clone();
        let addr = b.traffic_addr;
        async move {
            with_key(&c, addr, "/?tokens=0", "k")
                .await
                .header("x-ratelimit-remaining")
                == "860"
        }
    })
    .await;
    assert_eq!(
        with_key(&c, a.traffic_addr, "/?tokens=5000", "k")
            .await
            .status,
        StatusCode::OK
    );
    eventually("the debt run up on a to refuse the key on b", || {
        let c = c.clone();
        let addr = b.traffic_addr;
        async move {
            let r = with_key(&c, addr, "/?tokens=0", "k").await;
            r.status == StatusCode::TOO_MANY_REQUESTS && r.body["limit"]["unit"] == "tokens"
        }
    })
    .await;
    a.stop().await;
    b.stop().await;
}
