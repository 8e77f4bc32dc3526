//! Fair load shedding over real HTTP: an upstream whose latency grows with its in-flight count,
//! one heavy key with many requests in flight and nine light keys with one each.
//!
//! One sidecar goes through three phases: the light keys alone (their unloaded latency), then
//! with the heavy key hammering (overload), then with the app recovered (its latency no longer
//! grows with load). With shedding on, the heavy key is shed (503, `error: shed`) in overload and
//! no light key ever is; once the app recovers, the limit grows back to its maximum and nothing
//! is shed. With it off, nothing is shed at all. The latencies are printed (MEASURED) for
//! `docs/benchmarks.md`; only counts are asserted.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keylimit_dataplane::{Limits, LoadShedding, RateWindow, Unit};

const HEAVY_IN_FLIGHT: usize = 48;
const LIGHT_KEYS: usize = 9;
const LIGHT_REQUESTS: usize = 60;
const MAX_CONCURRENCY: u32 = 64;

/// Answers after `us_per_request` µs per request in flight (its own included): an app that
/// slows down as it is loaded, the case adaptive concurrency is for. Set to 0, the app has
/// recovered (say, it scaled out) and answers at once at any load.
async fn loaded_upstream(us_per_request: Arc<AtomicU64>) -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let in_flight = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (in_flight, us_per_request) = (in_flight.clone(), us_per_request.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<Incoming>| {
                    let (in_flight, us_per_request) = (in_flight.clone(), us_per_request.clone());
                    async move {
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        let us = n * us_per_request.load(Ordering::Relaxed);
                        if us > 0 {
                            // The app's own work: the upstream is slow, the test does not wait.
                            tokio::time::sleep(Duration::from_micros(us)).await;
                        }
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr }
}

fn policy(shedding: bool) -> keylimit_dataplane::PolicyDocument {
    let mut keys = vec![key("heavy")];
    keys.extend((0..LIGHT_KEYS).map(|i| key(&format!("light-{i}"))));
    let mut d = doc(
        Limits {
            rates: vec![RateWindow {
                name: "generous".into(),
                requests: 1_000_000,
                period_seconds: 1,
                burst: 1_000_000,
                unit: Unit::Requests,
            }],
            ..Limits::default()
        },
        keys,
    );
    d.policy.load_shedding = shedding.then_some(LoadShedding {
        min_concurrency: 2,
        max_concurrency: MAX_CONCURRENCY,
        latency_tolerance_percent: 150,
    });
    d
}

#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    shed: usize,
    other: usize,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn quantile_ms(&mut self, per_cent: usize) -> f64 {
        self.latencies_us.sort_unstable();
        let i = (self.latencies_us.len() * per_cent / 100)
            .min(self.latencies_us.len().saturating_sub(1));
        self.latencies_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
    }
}

/// The heavy key's results, counted per phase: 1 overload, 2 the app recovering, 3 recovered.
#[derive(Debug, Default)]
struct HeavyCounts {
    ok: [AtomicUsize; 4],
    shed: [AtomicUsize; 4],
    other: [AtomicUsize; 4],
}

impl HeavyCounts {
    fn get(&self, phase: usize) -> (usize, usize, usize) {
        (
            self.ok[phase].load(Ordering::SeqCst),
            self.shed[phase].load(Ordering::SeqCst),
            self.other[phase].load(Ordering::SeqCst),
        )
    }
}

/// Every light key sends `LIGHT_REQUESTS` requests, one at a time.
async fn light_round(c: &TestClient, addr: std::net::SocketAddr) -> Tally {
    let mut light = vec![];
    for i in 0..LIGHT_KEYS {
        let c = c.clone();
        light.push(tokio::spawn(async move {
            let mut t = Tally::default();
            for _ in 0..LIGHT_REQUESTS {
                let started = Instant::now();
                let r = with_key(&c, addr, "/", &format!("light-{i}")).await;
                t.latencies_us.push(started.elapsed().as_micros() as u64);
                match r.status {
                    StatusCode::OK => t.ok += 1,
                    StatusCode::SERVICE_UNAVAILABLE => t.shed += 1,
                    _ => t.other += 1,
                }
            }
            t
        }));
    }
    let mut total = Tally::default();
    for h in light {
        let t = h.await.unwrap();
        total.ok += t.ok;
        total.shed += t.shed;
        total.other += t.other;
        total.latencies_us.extend(t.latencies_us);
    }
    total
}

async fn metrics(c: &TestClient, admin: std::net::SocketAddr) -> String {
    let m = get(c, admin, "/metrics", &[]).await;
    m.body.as_str().unwrap_or_default().to_string()
}

fn shedding_limit(metrics: &str) -> Option<u32> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("keylimit_load_shedding_limit "))
        .and_then(|v| v.trim().parse().ok())
}

struct Run {
    /// The light keys in each phase: alone, under overload, after the app recovered.
    light: [Tally; 3],
    heavy: Arc<HeavyCounts>,
}

async fn run(shedding: bool) -> Run {
    let mut dir = ConfigDir::new();
    dir.write_doc(&policy(shedding));
    let us_per_request = Arc::new(AtomicU64::new(1_000));
    let up = loaded_upstream(us_per_request.clone()).await;
    let sc = start(&dir, &up).await;
    let addr = sc.traffic_addr;
    let c = client();

    // Phase 0: the light keys alone.
    let alone = light_round(&c, addr).await;

    // Phase 1: the heavy key hammers, retrying a shed request at once: the worst client,
    // which must still not crowd out the light keys.
    let phase = Arc::new(AtomicUsize::new(1));
    let done = Arc::new(AtomicBool::new(false));
    let heavy = Arc::new(HeavyCounts::default());
    let mut workers = vec![];
    for _ in 0..HEAVY_IN_FLIGHT {
        let (c, done, phase, heavy) = (c.clone(), done.clone(), phase.clone(), heavy.clone());
        workers.push(tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let p = phase.load(Ordering::SeqCst);
                let r = with_key(&c, addr, "/", "heavy").await;
                match r.status {
                    StatusCode::OK => heavy.ok[p].fetch_add(1, Ordering::SeqCst),
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert_eq!(r.body["error"], "shed");
                        assert_eq!(r.header("retry-after"), "1");
                        heavy.shed[p].fetch_add(1, Ordering::SeqCst)
                    }
                    _ => heavy.other[p].fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    let overload = light_round(&c, addr).await;
    let limit_in_overload = sc.shedder.snapshot().limit;

    // Phase 2: the app recovers. The limit grows back to its maximum while the heavy key
    // keeps it full; then (phase 3) the light keys go again.
    phase.store(2, Ordering::SeqCst);
    us_per_request.store(0, Ordering::SeqCst);
    if shedding {
        eventually("the limit to grow back to its maximum", || async {
            shedding_limit(&metrics(&c, sc.admin_addr).await) == Some(MAX_CONCURRENCY)
        })
        .await;
    }
    phase.store(3, Ordering::SeqCst);
    let recovered = light_round(&c, addr).await;
    done.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    let shed_view = sc.shedder.snapshot();
    let text = metrics(&c, sc.admin_addr).await;
    assert_eq!(
        shedding_limit(&text),
        Some(shed_view.limit),
        "the adaptive limit is exported"
    );
    assert_eq!(
        text.contains("decision=\"shed\"} 0") || !text.contains("decision=\"shed\""),
        !shedding,
        "shed requests are counted"
    );
    sc.stop().await;
    let mut light = [alone, overload, recovered];
    let quantiles: Vec<String> = light
        .iter_mut()
        .map(|t| format!("{:.1}/{:.1}", t.quantile_ms(50), t.quantile_ms(99)))
        .collect();
    eprintln!(
        "MEASURED shedding={shedding}: light p50/p99 alone, overload, recovered: {} ms; light ok {:?} shed {:?}; heavy (ok, shed, other) overload {:?} recovering {:?} recovered {:?}; limit after overload {limit_in_overload}, at the end {:?}",
        quantiles.join(", "),
        light.iter().map(|t| t.ok).collect::<Vec<_>>(),
        light.iter().map(|t| t.shed).collect::<Vec<_>>(),
        heavy.get(1),
        heavy.get(2),
        heavy.get(3),
        shed_view,
    );
    Run { light, heavy }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_key_is_shed_light_keys_never_are_and_shedding_stops_when_latency_recovers() {
    let r = run(true).await;
    for t in &r.light {
        assert_eq!(
            t.ok,
            LIGHT_KEYS * LIGHT_REQUESTS,
            "every light request served"
        );
        assert_eq!(t.shed + t.other, 0);
    }
    let (ok, shed, other) = r.heavy.get(1);
    assert!(shed > 0, "the heavy key is shed in overload");
    assert!(ok > 0, "but still served its share");
    assert_eq!(other, 0);
    let (ok, shed, other) = r.heavy.get(3);
    assert!(ok > 0, "the heavy key is served once the app recovered");
    assert_eq!((shed, other), (0, 0), "and no longer shed");

    let r = run(false).await;
    for t in &r.light {
        assert_eq!(t.ok, LIGHT_KEYS * LIGHT_REQUESTS);
    }
    for phase in 1..=3 {
        assert_eq!(r.heavy.get(phase).1, 0, "nothing is shed with shedding off");
    }
}
