//! Hot reload through a directory written exactly like kubelet's AtomicWriter.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keylimit_dataplane::{digest, KeyShard, ShardRef, UsageReport, API_VERSION};
use keylimit_sidecar::config::ReloadOutcome;
use keylimit_sidecar::limiter::clock::SystemClock;
use keylimit_sidecar::report::ReportSettings;
use keylimit_sidecar::{Settings, Sidecar};

#[tokio::test]
async fn watcher_picks_up_an_atomic_writer_swap() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(daily(100), vec![key("a")]));
    let up = upstream().await;
    // A long fallback interval: only the inotify watch can make this test pass in time.
    let sc = start_with(&dir, &up, |s| {
        s.reload_interval = Duration::from_secs(3_600)
    })
    .await;
    let c = client();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "b").await.status,
        StatusCode::UNAUTHORIZED
    );
    dir.write_doc(&doc(daily(100), vec![key("a"), key("b")]));
    eventually("the new key to be served", || async {
        with_key(&c, sc.traffic_addr, "/", "b").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(sc.config.generation(), 2);
    sc.stop().await;
}

#[tokio::test]
async fn invalid_or_half_written_config_keeps_the_last_good_one() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(daily(100), vec![key("a")]));
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let c = client();
    let good = serde_json::to_vec(&doc(daily(100), vec![key("a"), key("b")])).unwrap();
    dir.write(&[("policy.json", good[..good.len() / 2].to_vec())]);
    assert!(sc.reload_now().await.is_err());
    let mut zero = doc(daily(100), vec![key("b")]);
    zero.policy.limits.quotas[0].requests = 0;
    dir.write_doc(&zero);
    assert!(sc.reload_now().await.is_err());
    assert_eq!(sc.config.generation(), 1);
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "a").await.status,
        StatusCode::OK
    );
    let m = get(&c, sc.admin_addr, "/metrics", &[]).await;
    let text = m.body.as_str().unwrap();
    // The directory watcher may have tried the same bad files too: at least once each.
    for reason in ["json", "invalid"] {
        let series =
            format!("keylimit_config_reloads_total{{result=\"failure\",reason=\"{reason}\"}} ");
        let count: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(count >= 1, "{reason}: {text}");
    }
    assert!(text.contains("keylimit_config_generation 1"));
    sc.stop().await;
}

#[tokio::test]
async fn unchanged_limits_keep_their_counters_across_a_reload() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(daily(3), vec![key("a")]));
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            with_key(&c, sc.traffic_addr, "/", "a").await.status,
            StatusCode::OK
        );
    }
    let mut next = doc(daily(3), vec![key("a"), key("b")]);
    next.policy.generation = 2;
    dir.write_doc(&next);
    // Either this call or the directory watcher loads it first; both end on generation 2.
    sc.reload_now().await.unwrap();
    assert_eq!(sc.config.generation(), 2);
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "a").await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "a").await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the third request of 3 was counted before the reload"
    );
    // Raising the quota is a new limit: fresh counter.
    dir.write_doc(&doc(daily(5), vec![key("a"), key("b")]));
    sc.reload_now().await.unwrap();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "a").await.status,
        StatusCode::OK
    );
    sc.stop().await;
}

#[tokio::test]
async fn sharded_keys_are_read_from_the_same_directory() {
    let shard = KeyShard {
        api_version: API_VERSION.into(),
        policy: "orders".into(),
        index: 1,
        keys: vec![key("s1"), key("s2")],
    };
    let shard_bytes = serde_json::to_vec(&shard).unwrap();
    let mut d = doc(daily(10), vec![]);
    d.shards = vec![ShardRef {
        file: "keys-0001.json".into(),
        config_map: "keylimit-orders-keys-0001".into(),
        sha256: digest(&shard_bytes),
        keys: 2,
    }];
    let mut dir = ConfigDir::new();
    dir.write(&[
        ("policy.json", serde_json::to_vec(&d).unwrap()),
        ("keys-0001.json", shard_bytes),
    ]);
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let c = client();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "s2").await.status,
        StatusCode::OK
    );
    // A shard that does not match its digest (mid-propagation) is rejected as a whole.
    dir.write(&[
        ("policy.json", serde_json::to_vec(&d).unwrap()),
        ("keys-0001.json", b"{}".to_vec()),
    ]);
    let mut d2 = d.clone();
    d2.policy.generation = 9;
    dir.write(&[
        ("policy.json", serde_json::to_vec(&d2).unwrap()),
        ("keys-0001.json", b"{}".to_vec()),
    ]);
    assert!(sc.reload_now().await.is_err());
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "s1").await.status,
        StatusCode::OK
    );
    sc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_steady_traffic_drop_nothing() {
    let keys: Vec<_> = (0..8).map(|i| key(&format!("k{i}"))).collect();
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(daily(1_000_000), keys.clone()));
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let addr = sc.traffic_addr;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut drivers = Vec::new();
    for w in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        drivers.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = with_key(&c, addr, "/", &format!("k{}", (w + i) % 8)).await;
                if r.status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    for g in 2..=51 {
        let mut d = doc(daily(1_000_000), keys.clone());
        d.policy.generation = g;
        // Alternate an extra key in and out so each swap changes the index too.
        if g % 2 == 0 {
            d.keys.push(key("extra"));
        }
        dir.write_doc(&d);
        let before = ok.load(Ordering::Relaxed);
        eventually("the reload and some traffic on it", || async {
            let _ = sc.reload_now().await;
            sc.config.generation() == g as u64 && ok.load(Ordering::Relaxed) > before
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for d in drivers {
        d.await.unwrap();
    }
    assert_eq!(sc.config.generation(), 51);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(ok.load(Ordering::Relaxed) >= 50);
    sc.stop().await;
}

/// A plain directory (`policy.json` a regular file, as `hack/loadtest/run.sh` and hand-made
/// setups have it): the sidecar's own reads of the file land on the watched directory.
#[tokio::test]
async fn plain_directory_stays_quiet_while_idle_and_still_sees_writes() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    let write = |d: &keylimit_dataplane::PolicyDocument| {
        std::fs::write(&policy, serde_json::to_vec(d).unwrap()).unwrap()
    };
    write(&doc(daily(100), vec![key("a")]));
    let up = upstream().await;
    let mut settings = Settings::local(dir.path().to_path_buf(), format!("http://{}", up.addr));
    settings.reload_interval = Duration::from_secs(3_600);
    let sc = Sidecar::start(settings, Arc::new(SystemClock))
        .await
        .unwrap();
    assert_eq!(sc.config.generation(), 1);
    let reads = || sc.metrics.config_reads.get();
    // Idle, nothing writes: a reload must not cause the next one. (It did, in a loop.)
    let spun = tokio::time::timeout(Duration::from_secs(2), async {
        while reads() < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(spun.is_err(), "{} reloads in 2 s of idle", reads());

    // Re-reading the same bytes hashes them and stops there.
    let (reads_before, parses_before) = (reads(), sc.metrics.config_parses.get());
    for _ in 0..3 {
        assert_eq!(sc.reload_now().await.unwrap(), ReloadOutcome::Unchanged);
    }
    assert!(reads() >= reads_before + 3);
    assert_eq!(
        sc.metrics.config_parses.get(),
        parses_before,
        "unchanged bytes were parsed"
    );

    // Writes are still noticed, in place and by rename, without the periodic re-read.
    let c = client();
    write(&doc(daily(100), vec![key("a"), key("b")]));
    eventually("a rewritten policy.json to load", || async {
        with_key(&c, sc.traffic_addr, "/", "b").await.status == StatusCode::OK
    })
    .await;
    let tmp = dir.path().join(".policy.json.tmp");
    let next = doc(daily(100), vec![key("a"), key("b"), key("c")]);
    std::fs::write(&tmp, serde_json::to_vec(&next).unwrap()).unwrap();
    std::fs::rename(&tmp, &policy).unwrap();
    eventually("a policy.json renamed into place to load", || async {
        with_key(&c, sc.traffic_addr, "/", "c").await.status == StatusCode::OK
    })
    .await;
    sc.stop().await;
}

/// The operator's report endpoint: keeps every report pushed to it.
async fn operator() -> (SocketAddr, Arc<Mutex<Vec<UsageReport>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if let Some(r) = body.ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                            sink.lock().unwrap().push(r);
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn metric(c: &TestClient, admin: SocketAddr, name: &str) -> Option<f64> {
    let m = get(c, admin, "/metrics", &[]).await;
    let text = m.body.as_str()?.to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn a_failing_reload_marks_the_config_stale_until_a_good_one_loads() {
    let (op, reports) = operator().await;
    let latest = || reports.lock().unwrap().last().cloned();
    let good = doc(daily(100), vec![key("a")]);
    let mut dir = ConfigDir::new();
    dir.write_doc(&good);
    let up = upstream().await;
    let sc = start_with(&dir, &up, |s| {
        s.reload_interval = Duration::from_secs(3_600);
        s.report = Some(ReportSettings {
            url: format!("http://{op}/v1/reports").parse().unwrap(),
            token_file: None,
            interval: Duration::from_millis(100),
            ca_file: None,
        });
    })
    .await;
    let c = client();
    let stale = "keylimit_sidecar_config_stale";
    assert_eq!(metric(&c, sc.admin_addr, stale).await, Some(0.0));
    let loaded_at = metric(
        &c,
        sc.admin_addr,
        "keylimit_sidecar_config_last_success_timestamp_seconds",
    )
    .await
    .unwrap_or(0.0);
    assert!(loaded_at > 1.0e9, "last success timestamp: {loaded_at}");
    eventually("a report from the fresh config", || async {
        latest().is_some_and(|r| r.config_failure.is_none())
    })
    .await;

    // Broken: the last good config keeps serving, ready stays 200, and it all says stale.
    for round in 0..2 {
        dir.write(&[("policy.json", b"{\"apiVersion\": broken".to_vec())]);
        assert!(sc.reload_now().await.is_err());
        assert_eq!(
            metric(&c, sc.admin_addr, stale).await,
            Some(1.0),
            "round {round}"
        );
        let ready = get(&c, sc.admin_addr, "/readyz", &[]).await;
        assert_eq!(ready.status, StatusCode::OK);
        assert!(
            ready.body.as_str().is_some_and(|b| b.contains("stale")),
            "{:?}",
            ready.body
        );
        assert_eq!(
            with_key(&c, sc.traffic_addr, "/", "a").await.status,
            StatusCode::OK
        );
        eventually("a report carrying the failure", || async {
            latest()
                .and_then(|r| r.config_failure)
                .is_some_and(|f| f.reason == "json" && f.since > 0)
        })
        .await;
        // Fixed: round 0 by restoring the very bytes being served (nothing to load, but the
        // latest attempt succeeded), round 1 by a new config.
        let fix = if round == 0 {
            good.clone()
        } else {
            doc(daily(100), vec![key("a"), key("b")])
        };
        dir.write_doc(&fix);
        let outcome = sc.reload_now().await.unwrap();
        if round == 0 {
            assert_eq!(outcome, ReloadOutcome::Unchanged);
        }
        // (Round 1: the directory watcher may have loaded it first.)
        assert_eq!(sc.config.generation(), 1 + round);
        assert_eq!(
            metric(&c, sc.admin_addr, stale).await,
            Some(0.0),
            "round {round}"
        );
        let ready = get(&c, sc.admin_addr, "/readyz", &[]).await;
        assert!(
            ready.body.as_str().is_some_and(|b| !b.contains("stale")),
            "{:?}",
            ready.body
        );
        eventually("a report without the failure", || async {
            latest().is_some_and(|r| r.config_failure.is_none())
        })
        .await;
    }
    sc.stop().await;
}
