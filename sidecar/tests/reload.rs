//! Hot reload through a directory written exactly like kubelet's AtomicWriter.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use keylimit_dataplane::{
    digest, KeyShard, Limits, QuotaAlignment, QuotaPeriod, QuotaWindow, ShardRef, API_VERSION,
};

fn daily(requests: u64) -> Limits {
    Limits {
        quotas: vec![QuotaWindow {
            name: "daily".into(),
            requests,
            period: QuotaPeriod::Day,
            alignment: QuotaAlignment::Calendar,
        }],
        ..Limits::default()
    }
}

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
