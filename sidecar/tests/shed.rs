//! Fair load shedding over real HTTP: an upstream whose latency grows with its in-flight count,
//! one heavy key with many requests in flight and nine light keys with one each. With
//! shedding on, the heavy key is shed (503, `error: shed`) and no light key ever is; with it
//! off, nothing is shed. The latencies are printed (MEASURED) for `docs/benchmarks.md`;
//! only counts are asserted.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Answers after 1 ms per request in flight (its own included): an app that slows down as
/// it is loaded, the case adaptive concurrency is for.
async fn loaded_upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let in_flight = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<Incoming>| {
                    let in_flight = in_flight.clone();
                    async move {
                        let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        // The app's own work: the upstream is slow, the test does not wait.
                        tokio::time::sleep(Duration::from_millis(n)).await;
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
        max_concurrency: 64,
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
    fn p99_ms(&mut self) -> f64 {
        self.latencies_us.sort_unstable();
        let i = (self.latencies_us.len() * 99 / 100).min(self.latencies_us.len().saturating_sub(1));
        self.latencies_us.get(i).copied().unwrap_or(0) as f64 / 1000.0
    }
}

async fn run(shedding: bool) -> (Tally, Tally) {
    let mut dir = ConfigDir::new();
    dir.write_doc(&policy(shedding));
    let up = loaded_upstream().await;
    let sc = start(&dir, &up).await;
    let addr = sc.traffic_addr;
    let c = client();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut heavy = vec![];
    for _ in 0..HEAVY_IN_FLIGHT {
        let (c, done) = (c.clone(), done.clone());
        heavy.push(tokio::spawn(async move {
            let mut t = Tally::default();
            while !done.load(Ordering::Relaxed) {
                let r = with_key(&c, addr, "/", "heavy").await;
                match r.status {
                    StatusCode::OK => t.ok += 1,
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert_eq!(r.body["error"], "shed");
                        assert_eq!(r.header("retry-after"), "1");
                        // Retried at once: the worst client, which must still not crowd out
                        // the light keys.
                        t.shed += 1;
                    }
                    _ => t.other += 1,
                }
            }
            t
        }));
    }
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
    let mut light_total = Tally::default();
    for h in light {
        let t = h.await.unwrap();
        light_total.ok += t.ok;
        light_total.shed += t.shed;
        light_total.other += t.other;
        light_total.latencies_us.extend(t.latencies_us);
    }
    done.store(true, Ordering::Relaxed);
    let mut heavy_total = Tally::default();
    for h in heavy {
        let t = h.await.unwrap();
        heavy_total.ok += t.ok;
        heavy_total.shed += t.shed;
        heavy_total.other += t.other;
    }
    let shed_view = sc.shedder.snapshot();
    let metrics = get(&c, sc.admin_addr, "/metrics", &[]).await;
    let text = metrics.body.as_str().unwrap_or_default().to_string();
    let limit_line = text
        .lines()
        .find(|l| l.starts_with("keylimit_load_shedding_limit "))
        .map(str::to_string);
    assert_eq!(
        limit_line,
        Some(format!("keylimit_load_shedding_limit {}", shed_view.limit)),
        "the adaptive limit is exported"
    );
    assert_eq!(
        text.contains("decision=\"shed\"} 0") || !text.contains("decision=\"shed\""),
        !shedding,
        "shed requests are counted"
    );
    sc.stop().await;
    let p99 = light_total.p99_ms();
    eprintln!(
        "MEASURED shedding={shedding}: light ok {} shed {} p99 {p99:.1} ms; heavy ok {} shed {}; limit at the end {:?}",
        light_total.ok,
        light_total.shed,
        heavy_total.ok,
        heavy_total.shed,
        shed_view,
    );
    (light_total, heavy_total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_key_is_shed_and_light_keys_never_are() {
    let (light, heavy) = run(true).await;
    assert_eq!(
        light.ok,
        LIGHT_KEYS * LIGHT_REQUESTS,
        "every light request served"
    );
    assert_eq!(light.shed + light.other, 0);
    assert!(heavy.shed > 0, "the heavy key is shed: {heavy:?}");
    assert!(heavy.ok > 0, "but still served its share: {heavy:?}");
    assert_eq!(heavy.other, 0);

    let (light, heavy) = run(false).await;
    assert_eq!(light.ok, LIGHT_KEYS * LIGHT_REQUESTS);
    assert_eq!(heavy.shed, 0, "nothing is shed with shedding off");
}
