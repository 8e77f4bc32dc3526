//! Redis-mode decisions per second for one sidecar process, next to `redis-benchmark -t incr`
//! (one round trip per operation: the physical limit of one round trip per decision).
//!
//! `cargo bench -p keylimit-sidecar --bench redis` starts its own `redis-server` (or uses
//! `REDIS_PORT` if set), then for each concurrency level runs `RedisLimiter::decide` (one
//! EVALSHA per decision, rate window + monthly quota on one of 1000 keys) for `SECS` seconds,
//! and `redis-benchmark -t incr -P 1` with the same number of clients. It also prints Redis'
//! own time per decision script (`INFO commandstats`). Under `cargo test` it only checks that
//! it starts.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keylimit_dataplane::{
    FailMode, Limits, QuotaAlignment, QuotaPeriod, QuotaWindow, RateWindow, RedisStore,
};
use keylimit_sidecar::clock::SystemClock;
use keylimit_sidecar::limiter::{Check, Decision, LimitSet, Limiter};
use keylimit_sidecar::metrics::Metrics;
use keylimit_sidecar::store::{RedisLimiter, RedisSettings};

struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn start_server() -> (Server, u16) {
    if let Some(p) = std::env::var("REDIS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        return (Server(None), p);
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (hack/install-deps.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pings(port) {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Server(Some(child)), port)
}

async fn decisions_per_sec(
    limiter: Arc<RedisLimiter>,
    cfg: &RedisStore,
    clients: usize,
    secs: f64,
) -> f64 {
    let limits = Limits {
        rates: vec![RateWindow {
            name: "second".into(),
            requests: 1_000_000_000,
            period_seconds: 1,
            burst: 1_000_000_000,
        }],
        quotas: vec![QuotaWindow {
            name: "monthly".into(),
            requests: u64::MAX / 4,
            period: QuotaPeriod::Month,
            alignment: QuotaAlignment::Calendar,
        }],
        ..Limits::default()
    };
    let set = Arc::new(LimitSet::compile(&limits, "key"));
    let view = Limiter::new(Arc::new(SystemClock));
    let done = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for t in 0..clients {
        let (limiter, cfg, set, view) = (limiter.clone(), cfg.clone(), set.clone(), view.clone());
        let (done, refused) = (done.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t as u64;
            while Instant::now() < stop {
                let check = Check {
                    key_id: 1 + i % 1000,
                    key_limits: &set,
                    route_limits: None,
                    policy_limits: None,
                    cost: 1,
                    throttle: None,
                    dry_run: false,
                };
                match limiter.decide(&cfg, &check, &view).await {
                    Some(Decision::Allow(_)) => done.fetch_add(1, Ordering::Relaxed),
                    _ => refused.fetch_add(1, Ordering::Relaxed),
                };
                i += clients as u64;
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "the store must stay up and admit"
    );
    done.load(Ordering::Relaxed) as f64 / elapsed
}

fn redis_benchmark(port: u16, clients: usize) -> Option<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "incr"])
        .args([
            "-n",
            "200000",
            "-c",
            &clients.to_string(),
            "-P",
            "1",
            "-q",
            "--csv",
        ])
        .output()
        .ok()?;
    // --csv: a header line, then "INCR","123456.78",...
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("\"INCR\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 5.0 } else { 0.2 });
    let (_server, port) = start_server();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("WORKERS")
                .ok()
                .and_then(|w| w.parse().ok())
                .unwrap_or(1),
        )
        .enable_all()
        .build()
        .expect("runtime");
    let cfg = RedisStore {
        url: Some(format!("redis://127.0.0.1:{port}/0")),
        key_prefix: "kl:bench".into(),
        timeout_ms: 1000,
        fail_mode: FailMode::FailClosed,
        replicas: 1,
    };
    let levels: &[usize] = if bench { &[1, 8, 32] } else { &[1] };
    for &clients in levels {
        let before = rt.block_on(script_stats(port));
        let ours = rt.block_on(async {
            let limiter = Arc::new(RedisLimiter::new(
                &cfg,
                Arc::new(SystemClock),
                Arc::new(Metrics::new(false)),
                RedisSettings::default(),
            ));
            decisions_per_sec(limiter, &cfg, clients, secs).await
        });
        // Redis' own time per decision script: the server-side cost (e.g. of `TIME`), which
        // a loaded machine blurs far less than decisions per second.
        let script_us = match (before, rt.block_on(script_stats(port))) {
            (Some((c0, u0)), Some((c1, u1))) if c1 > c0 => {
                format!(
                    "{:.2} µs/script in Redis",
                    (u1 - u0) as f64 / (c1 - c0) as f64
                )
            }
            _ => "script time unavailable".to_string(),
        };
        if !bench {
            println!("redis bench smoke: {ours:.0} decisions/s, {script_us}");
            return;
        }
        let incr = redis_benchmark(port, clients);
        match incr {
            Some(incr) => println!(
                "clients {clients:>3}: keylimit {ours:>9.0} decisions/s ({script_us}) | redis-benchmark INCR {incr:>9.0} ops/s | ratio {:.2}",
                ours / incr
            ),
            None => println!(
                "clients {clients:>3}: keylimit {ours:>9.0} decisions/s ({script_us}) | redis-benchmark unavailable"
            ),
        }
    }
}

/// Calls and total µs of `EVALSHA` so far, from `INFO commandstats` (read, never reset:
/// `REDIS_PORT` may be someone's Redis).
async fn script_stats(port: u16) -> Option<(u64, u64)> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .ok()?;
    let Some(line) = info.lines().find(|l| l.starts_with("cmdstat_evalsha:")) else {
        return Some((0, 0)); // no EVALSHA yet
    };
    let field = |name: &str| {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("calls")?, field("usec")?))
}
