//! Redis-mode decisions per second for one sidecar process, next to `redis-benchmark -t incr`
//! (one round trip per operation) on the same machine.
//!
//! `cargo bench -p keylimit-sidecar --bench redis` starts its own `redis-server` (or uses
//! `REDIS_PORT` if set), then for each concurrency level (`LEVELS`, default 1,8,32) runs
//! `ROUNDS` rounds (default 3) of: `RedisLimiter::decide` (rate window + monthly quota on one
//! of 1000 keys) from that many concurrent callers for `SECS` seconds (default 5), then
//! `redis-benchmark -t incr -P 1` with the same number of clients. Each round prints both
//! rates and their ratio, Redis' own time per script call and decisions per call
//! (`INFO commandstats`), the CPU time per operation of each process (this one, the
//! redis-server it started, redis-benchmark) and the load average; each level ends with the
//! medians. It also checks that the quota counts in Redis add up to exactly the decisions
//! admitted.
//!
//! Like with like: `redis-benchmark -c 32` opens 32 connections with one INCR in flight on
//! each; the sidecar sends every decision over one multiplexed connection, batched.
//!
//! Short mode (any run without `--bench`, e.g. `cargo test -p keylimit-sidecar --bench redis`,
//! as CI may run it): the same levels, one round of 0.2 s each and a small `redis-benchmark`;
//! it asserts the exact count, never a timing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keylimit_dataplane::{
    FailMode, Limits, QuotaAlignment, QuotaPeriod, QuotaWindow, RateWindow, RedisStore,
};
use keylimit_sidecar::limiter::clock::SystemClock;
use keylimit_sidecar::limiter::local::Limiter;
use keylimit_sidecar::limiter::redis::{RedisLimiter, RedisSettings};
use keylimit_sidecar::limiter::{Check, Decision, LimitSet};
use keylimit_sidecar::metrics::Metrics;

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

/// CPU seconds (user + system) used so far by process `pid` (`self` for this one).
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Decisions per second and the number admitted.
async fn decisions_per_sec(
    limiter: Arc<RedisLimiter>,
    cfg: &RedisStore,
    set: &Arc<LimitSet>,
    clients: usize,
    secs: f64,
) -> (f64, u64) {
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
                    reserve: 0,
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
    let done = done.load(Ordering::Relaxed);
    (done as f64 / elapsed, done)
}

/// `redis-benchmark -t incr` ops/s and its own CPU seconds (client side).
fn redis_benchmark(port: u16, clients: usize, requests: u64) -> Option<(f64, Option<f64>)> {
    // Through a shell that then prints its own /proc stat: its cutime and cstime are the CPU
    // of the redis-benchmark it waited for.
    let script = format!(
        "redis-benchmark -h 127.0.0.1 -p {port} -t incr -n {requests} -c {clients} -P 1 -q --csv \
         && echo STAT $(cat /proc/$$/stat)"
    );
    let out = Command::new("sh").args(["-c", &script]).output().ok()?;
    // --csv: a header line, then "INCR","123456.78",...
    let text = String::from_utf8_lossy(&out.stdout);
    let ops = text
        .lines()
        .find(|l| l.starts_with("\"INCR\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())?;
    let cpu = text
        .lines()
        .find_map(|l| l.strip_prefix("STAT "))
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // cutime and cstime (fields 16 and 17): 13 and 14 after the command name.
            let t = fields.get(13)?.parse::<f64>().ok()? + fields.get(14)?.parse::<f64>().ok()?;
            Some(t / 100.0)
        });
    Some((ops, cpu))
}

/// The sum of every quota count under `prefix`: what Redis charged, to hold against what
/// the bench saw admitted.
async fn charged(port: u16, prefix: &str) -> Option<u64> {
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{{{prefix}:*}}:q:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .ok()?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut pipe = redis::pipe();
    for k in &keys {
        pipe.cmd("HGET").arg(k).arg("c");
    }
    let counts: Vec<u64> = pipe.query_async(&mut conn).await.ok()?;
    Some(counts.iter().sum())
}

struct Setup {
    bench: bool,
    secs: f64,
    port: u16,
    server_pid: Option<String>,
    cfg: RedisStore,
    set: Arc<LimitSet>,
}

/// One round at one level: ours, then `redis-benchmark`, back to back. Prints a line and
/// returns (ours, redis-benchmark) per second. `admitted_total` carries the exact count.
fn round(
    rt: &tokio::runtime::Runtime,
    s: &Setup,
    clients: usize,
    round: usize,
    admitted_total: &mut u64,
) -> (f64, Option<f64>) {
    let server_cpu = || s.server_pid.as_deref().and_then(cpu_secs);
    let before = rt.block_on(script_stats(s.port));
    let (cpu0, server0) = (cpu_secs("self"), server_cpu());
    let (ours, admitted) = rt.block_on(async {
        let limiter = Arc::new(RedisLimiter::new(
            &s.cfg,
            Arc::new(SystemClock),
            Arc::new(Metrics::new(false)),
            RedisSettings::default(),
        ));
        decisions_per_sec(limiter, &s.cfg, &s.set, clients, s.secs).await
    });
    let (cpu1, server1) = (cpu_secs("self"), server_cpu());
    *admitted_total += admitted;
    // Every admitted decision charged the quota exactly once, however they were batched.
    let in_redis = rt.block_on(charged(s.port, &s.cfg.key_prefix));
    assert_eq!(
        in_redis,
        Some(*admitted_total),
        "quota counts in Redis must equal the decisions admitted"
    );
    // CPU per decision: this process (client side) and redis-server (server side).
    let per = |a: Option<f64>, b: Option<f64>, n: u64| match (a, b) {
        (Some(a), Some(b)) if n > 0 => format!("{:.1}", (b - a) * 1e6 / n as f64),
        _ => "?".into(),
    };
    let cpu = format!(
        "cpu/decision: bench {} µs, redis {} µs",
        per(cpu0, cpu1, admitted),
        per(server0, server1, admitted)
    );
    // Redis' own time per script call (a call may carry several decisions).
    let script = match (before, rt.block_on(script_stats(s.port))) {
        (Some((c0, u0)), Some((c1, u1))) if c1 > c0 => format!(
            "{:.1} µs/script call, {:.1} decisions/call",
            (u1 - u0) as f64 / (c1 - c0) as f64,
            admitted as f64 / (c1 - c0) as f64
        ),
        _ => "script time unavailable".to_string(),
    };
    let load = loadavg();
    let n = if s.bench { 200_000 } else { 2_000 };
    let s0 = server_cpu();
    let run = redis_benchmark(s.port, clients, n);
    let s1 = server_cpu();
    let theirs = match run {
        Some((ops, client)) => format!(
            "redis-benchmark INCR {ops:>7.0} ops/s (cpu/op: redis-benchmark {} µs, redis {} µs) | ratio {:.2}",
            per(Some(0.0), client, n),
            per(s0, s1, n),
            ours / ops
        ),
        None => "redis-benchmark unavailable".into(),
    };
    println!(
        "clients {clients:>3} round {round}: keylimit {ours:>7.0} decisions/s ({script}; {cpu}) | {theirs} | load {load}"
    );
    (ours, run.map(|(ops, _)| ops))
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let env = |k: &str| std::env::var(k).ok();
    let secs: f64 = env("SECS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 5.0 } else { 0.2 });
    // Rounds per level, ours then redis-benchmark back to back in each: the machine's load
    // moves both, so the median ratio is the figure to quote.
    let rounds: usize = env("ROUNDS")
        .and_then(|r| r.parse().ok())
        .unwrap_or(if bench { 3 } else { 1 });
    let levels: Vec<usize> = env("LEVELS")
        .map(|l| l.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    let (server, port) = start_server();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env("WORKERS").and_then(|w| w.parse().ok()).unwrap_or(1))
        .enable_all()
        .build()
        .expect("runtime");
    let limits = Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "second".into(),
            requests: 1_000_000_000,
            period_seconds: 1,
            burst: 1_000_000_000,
        }],
        quotas: vec![QuotaWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "monthly".into(),
            requests: u64::MAX / 4,
            period: QuotaPeriod::Month,
            alignment: QuotaAlignment::Calendar,
        }],
        ..Limits::default()
    };
    let setup = Setup {
        bench,
        secs,
        port,
        server_pid: server.0.as_ref().map(|c| c.id().to_string()),
        cfg: RedisStore {
            url: Some(format!("redis://127.0.0.1:{port}/0")),
            // A prefix of this run's own, so the count check sees only this run's keys.
            key_prefix: format!("kl:bench:{}", std::process::id()),
            timeout_ms: 1000,
            fail_mode: FailMode::FailClosed,
            replicas: 1,
        },
        set: Arc::new(LimitSet::compile(&limits, "key")),
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut admitted_total = 0;
    for clients in levels {
        let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for r in 1..=rounds {
            let (o, t) = round(&rt, &setup, clients, r, &mut admitted_total);
            ours.push(o);
            if let Some(t) = t {
                theirs.push(t);
                ratios.push(o / t);
            }
        }
        println!(
            "clients {clients:>3} median of {rounds}: keylimit {:.0} decisions/s | redis-benchmark INCR {:.0} ops/s | ratio {:.2}",
            median(ours),
            median(theirs),
            median(ratios)
        );
    }
    drop(server);
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
