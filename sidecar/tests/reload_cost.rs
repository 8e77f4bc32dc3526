//! What a re-read of an unchanged config directory costs: no parse, whether the bytes were
//! loaded or rejected last time, and a change after that is still picked up.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use keylimit_dataplane::{
    digest, hash_key, KeyEntry, KeyHashAlgorithm, KeyHasher, KeyShard, Limits, RateWindow,
    ShardRef, API_VERSION, API_VERSION_KEYED,
};
use keylimit_sidecar::config::{ConfigSource, ConfigStore, ReloadOutcome};
use keylimit_sidecar::metrics::Metrics;

fn limits(requests: u64) -> Limits {
    Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "second".into(),
            requests,
            period_seconds: 1,
            burst: 0,
        }],
        ..Limits::default()
    }
}

fn store() -> (Arc<Metrics>, ConfigStore) {
    let metrics = Arc::new(Metrics::new(false));
    (metrics.clone(), ConfigStore::new(metrics))
}

fn source(dir: &ConfigDir) -> ConfigSource {
    ConfigSource::Directory(dir.path().to_path_buf())
}

#[test]
fn a_rejected_document_read_again_unchanged_is_not_parsed_again() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(limits(10), vec![key("a")]));
    let (metrics, config) = store();
    let src = source(&dir);
    assert_eq!(
        config.reload(&src).unwrap(),
        ReloadOutcome::Loaded { generation: 1 }
    );

    // requests: 0 is invalid: rejected once, the first config keeps serving.
    let mut bad = doc(limits(10), vec![key("a"), key("b")]);
    bad.policy.limits.rates[0].requests = 0;
    dir.write_doc(&bad);
    let parses = metrics.config_parses.get();
    let err = config.reload(&src).unwrap_err();
    assert_eq!(err.reason(), "invalid");
    assert_eq!(metrics.config_parses.get(), parses + 1);
    let failed_since = config.failure().expect("stale after a rejection").since;

    // The same bad bytes again (a periodic tick, an unrelated event): no parse, still stale,
    // still the same reason, and the first config still serves.
    for _ in 0..3 {
        let again = config.reload(&src).unwrap_err();
        assert_eq!(again.reason(), "invalid");
    }
    assert_eq!(
        metrics.config_parses.get(),
        parses + 1,
        "unchanged rejected bytes were parsed again"
    );
    assert_eq!(config.failure().map(|f| f.since), Some(failed_since));
    assert_eq!(config.generation(), 1);
    assert!(metrics
        .encode()
        .contains("keylimit_config_reloads_total{result=\"unchanged\",reason=\"\"} 3"));

    // A fixed document is picked up at once.
    dir.write_doc(&doc(limits(10), vec![key("a"), key("b")]));
    assert_eq!(
        config.reload(&src).unwrap(),
        ReloadOutcome::Loaded { generation: 2 }
    );
    assert!(config.failure().is_none());
    assert_eq!(metrics.config_parses.get(), parses + 2);
}

#[test]
fn a_loaded_document_read_again_unchanged_is_not_parsed_and_a_change_is() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(limits(10), vec![key("a")]));
    let (metrics, config) = store();
    let src = source(&dir);
    config.reload(&src).unwrap();
    let parses = metrics.config_parses.get();
    for _ in 0..3 {
        assert_eq!(config.reload(&src).unwrap(), ReloadOutcome::Unchanged);
    }
    assert_eq!(metrics.config_parses.get(), parses);
    dir.write_doc(&doc(limits(20), vec![key("a")]));
    assert_eq!(
        config.reload(&src).unwrap(),
        ReloadOutcome::Loaded { generation: 2 }
    );
    assert_eq!(metrics.config_parses.get(), parses + 1);
}

/// A shard that does not match `policy.json` means the projected volume is mid-update: that
/// rejection must not stick when `policy.json` stays the same and the shard catches up.
#[test]
fn a_shard_mismatch_is_retried_when_only_the_shard_changes() {
    let mut dir = ConfigDir::new();
    let shard = |keys: Vec<KeyEntry>| {
        serde_json::to_vec(&KeyShard {
            api_version: API_VERSION.into(),
            policy: "orders".into(),
            index: 0,
            keys,
        })
        .unwrap()
    };
    let new_shard = shard(vec![key("a"), key("b")]);
    let mut d = doc(limits(10), vec![]);
    d.shards = vec![ShardRef {
        file: "keys-0000.json".into(),
        config_map: "orders-keys-0000".into(),
        sha256: digest(&new_shard),
        keys: 2,
    }];
    let policy = serde_json::to_vec(&d).unwrap();
    dir.write(&[
        ("policy.json", policy.clone()),
        ("keys-0000.json", shard(vec![key("a")])),
    ]);
    let (_, config) = store();
    let src = source(&dir);
    assert_eq!(config.reload(&src).unwrap_err().reason(), "shard_digest");
    assert_eq!(config.reload(&src).unwrap_err().reason(), "shard_digest");
    dir.write(&[("policy.json", policy), ("keys-0000.json", new_shard)]);
    assert_eq!(
        config.reload(&src).unwrap(),
        ReloadOutcome::Loaded { generation: 1 }
    );
}

/// A request that still holds the replaced snapshot must not be the one that frees it (at 1M
/// keys that takes ~165 ms on a runtime worker): the reload keeps a reference until the
/// request lets go, then frees it on its own thread.
#[test]
fn a_replaced_snapshot_is_not_freed_by_the_request_still_holding_it() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(limits(10), vec![key("a")]));
    let (_, config) = store();
    let src = source(&dir);
    config.reload(&src).unwrap();
    let held = config.current().unwrap();
    dir.write_doc(&doc(limits(20), vec![key("a")]));
    assert_eq!(
        config.reload(&src).unwrap(),
        ReloadOutcome::Loaded { generation: 2 }
    );
    assert_eq!(
        Arc::strong_count(&held),
        2,
        "the request's reference is the last one: dropping it would free the snapshot"
    );
    let freed = Arc::downgrade(&held);
    drop(held);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while freed.upgrade().is_some() {
        assert!(
            Instant::now() < deadline,
            "the replaced snapshot was never freed"
        );
        std::thread::yield_now();
    }
}

/// The hash key file is part of a keyed document's inputs: a rejection for want of it is not
/// repeated by parsing, and lifts as soon as the key is mounted, with `policy.json` the same.
#[test]
fn a_keyed_document_waiting_for_its_hash_key_loads_when_the_key_appears() {
    let mut dir = ConfigDir::new();
    let mut d = doc(limits(10), vec![]);
    d.api_version = API_VERSION_KEYED.into();
    d.policy.key_source.key_hash.algorithm = KeyHashAlgorithm::HmacSha256;
    d.keys = vec![KeyEntry {
        sha256: KeyHasher::hmac(&[7; 32]).unwrap().hash_hex(b"material"),
        ..key("a")
    }];
    dir.write_doc(&d);
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("key");
    let metrics = Arc::new(Metrics::new(false));
    let config = ConfigStore::with_hash_key_file(metrics.clone(), Some(key_file.clone()));
    let src = source(&dir);
    assert_eq!(config.reload(&src).unwrap_err().reason(), "read");
    let parses = metrics.config_parses.get();
    assert_eq!(config.reload(&src).unwrap_err().reason(), "read");
    assert_eq!(
        metrics.config_parses.get(),
        parses,
        "re-parsed while the key was missing"
    );
    std::fs::write(&key_file, [7; 32]).unwrap();
    assert_eq!(
        config.reload(&src).unwrap(),
        ReloadOutcome::Loaded { generation: 1 }
    );
    assert!(config.current().unwrap().index.len() == 1);
}

/// Writes a policy with `n` keys the way the operator does (shards of 7,500 keys) or inline
/// (as `hack/loadtest` does); returns the total bytes written.
fn write_many(dir: &mut ConfigDir, n: usize, sharded: bool, valid: bool) -> usize {
    let keys: Vec<KeyEntry> = (0..n)
        .map(|i| KeyEntry {
            name: format!("key-{i:07}"),
            sha256: hash_key(format!("material-{i}").as_bytes()),
            disabled: false,
            expires_at: None,
            overrides: None,
            previous: None,
            counter: None,
        })
        .collect();
    // The costly rejection: a keyed document on a sidecar without a hash key is refused only
    // after every key has been parsed.
    let api_version = if valid {
        API_VERSION
    } else {
        API_VERSION_KEYED
    };
    let mut d = doc(limits(10), vec![]);
    d.api_version = api_version.into();
    if !valid {
        d.policy.key_source.key_hash.algorithm = KeyHashAlgorithm::HmacSha256;
    }
    let mut files = Vec::new();
    if sharded {
        for (i, chunk) in keys.chunks(7_500).enumerate() {
            let bytes = serde_json::to_vec(&KeyShard {
                api_version: api_version.into(),
                policy: "orders".into(),
                index: i as u32,
                keys: chunk.to_vec(),
            })
            .unwrap();
            let file = format!("keys-{i:04}.json");
            d.shards.push(ShardRef {
                file: file.clone(),
                config_map: format!("orders-keys-{i:04}"),
                sha256: digest(&bytes),
                keys: chunk.len(),
            });
            files.push((file, bytes));
        }
    } else {
        d.keys = keys;
    }
    files.push(("policy.json".into(), serde_json::to_vec(&d).unwrap()));
    let total = files.iter().map(|(_, b)| b.len()).sum();
    let refs: Vec<(&str, Vec<u8>)> = files.into_iter().map(|(f, b)| (leak(f), b)).collect();
    dir.write(&refs);
    total
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn time_reload(config: &ConfigStore, src: &ConfigSource) -> f64 {
    let t = Instant::now();
    let _ = config.reload(src);
    t.elapsed().as_secs_f64() * 1e3
}

/// `cargo test --release -p keylimit-sidecar --test reload_cost -- --ignored --nocapture`
#[test]
#[ignore = "measurement: 1M keys, several seconds"]
fn measure_unchanged_reread_at_1m_keys() {
    let n = 1_000_000;
    for (sharded, valid) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut dir = ConfigDir::new();
        let bytes = write_many(&mut dir, n, sharded, valid);
        let (metrics, config) = store();
        let src = source(&dir);
        let first = time_reload(&config, &src);
        let mut again: Vec<f64> = (0..5).map(|_| time_reload(&config, &src)).collect();
        again.sort_by(f64::total_cmp);
        println!(
            "{} keys, {}, {} ({} MB): first read {first:.0} ms; unchanged re-read median \
             {:.2} ms (min {:.2}, max {:.2}); parses {}",
            n,
            if sharded { "sharded" } else { "inline" },
            if valid { "valid" } else { "rejected" },
            bytes / 1_000_000,
            again[2],
            again[0],
            again[4],
            metrics.config_parses.get(),
        );
        // What a request holding the 1M-key snapshot across a reload pays when it lets go.
        if let Some(held) = config.current() {
            dir.write_doc(&doc(limits(10), vec![key("a")]));
            config.reload(&src).unwrap();
            let t = Instant::now();
            drop(held);
            println!(
                "  a request dropping the replaced snapshot: {:.3} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}
