//! Heap cost of many keys, counted exactly by a counting allocator: the config index and the
//! limiter state per key, and the peak while a reload replaces every key.
//!
//! One test in this binary, so no other test's allocations are counted.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use keylimit_dataplane::{
    digest, hash_key, KeyEntry, KeyShard, Limits, RateWindow, ShardRef, API_VERSION,
};
use keylimit_sidecar::config::{hash_presented, ConfigSource, ConfigStore};
use keylimit_sidecar::limiter::clock::SystemClock;
use keylimit_sidecar::limiter::local::Limiter;
use keylimit_sidecar::limiter::{Check, Decision};
use keylimit_sidecar::metrics::Metrics;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed on to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// 1,000 keys per limiter shard (128 shards): where a `HashMap` doubling to 2,048 buckets
/// would hold ~68 bytes per slot.
const N: usize = 128_000;

fn material(i: usize, variant: u32) -> String {
    format!("mem-{variant}-{i:07}-material")
}

/// `n` keys of `variant` in shards of 7,500, as the operator writes them.
fn write_sharded(dir: &mut ConfigDir, n: usize, variant: u32) {
    let keys: Vec<KeyEntry> = (0..n)
        .map(|i| KeyEntry {
            name: format!("key-{variant}-{i:07}"),
            sha256: hash_key(material(i, variant).as_bytes()),
            disabled: false,
            expires_at: None,
            overrides: None,
            previous: None,
            counter: None,
        })
        .collect();
    let mut d = doc(
        Limits {
            rates: vec![RateWindow {
                unit: keylimit_dataplane::Unit::Requests,
                name: "second".into(),
                requests: 1_000,
                period_seconds: 1,
                burst: 0,
            }],
            ..Limits::default()
        },
        vec![],
    );
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, chunk) in keys.chunks(7_500).enumerate() {
        let bytes = serde_json::to_vec(&KeyShard {
            api_version: API_VERSION.into(),
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
    files.push(("policy.json".into(), serde_json::to_vec(&d).unwrap()));
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(f, b)| (f.as_str(), b.clone())).collect();
    dir.write(&refs);
}

#[test]
fn keys_cost_under_100_bytes_each_and_a_reload_holds_only_the_new_index_besides() {
    let mut dir = ConfigDir::new();
    write_sharded(&mut dir, N, 0);
    let hashes: Vec<[u8; 32]> = (0..N)
        .map(|i| hash_presented(material(i, 0).as_bytes()))
        .collect();
    let metrics = Arc::new(Metrics::new(false));
    let config = ConfigStore::new(metrics);
    let src = ConfigSource::Directory(dir.path().to_path_buf());
    let limiter = Limiter::new(Arc::new(SystemClock));

    let empty = live();
    config.reload(&src).unwrap();
    let loaded = live();
    let snap = config.current().unwrap();
    assert_eq!(snap.index.len(), N);
    for h in &hashes {
        let key = snap.index.lookup(h).expect("every key is indexed");
        let d = limiter.decide(&Check {
            key_id: key.id,
            key_limits: key.limits,
            route_limits: None,
            policy_limits: None,
            cost: 1,
            reserve: 0,
            throttle: None,
            dry_run: false,
        });
        assert!(matches!(d, Decision::Allow(_)));
    }
    drop(snap);
    let steady = live();
    let config_per_key = (loaded - empty) as f64 / N as f64;
    let limiter_per_key = (steady - loaded) as f64 / N as f64;
    println!("config {config_per_key:.1} B/key, limiter {limiter_per_key:.1} B/key");
    assert!(config_per_key <= 48.0, "config {config_per_key:.1} B/key");
    assert!(
        limiter_per_key <= 52.0,
        "limiter {limiter_per_key:.1} B/key"
    );
    assert!(config_per_key + limiter_per_key <= 100.0);

    // Every key replaced: the new index is built while the old one serves.
    write_sharded(&mut dir, N, 1);
    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    config.reload(&src).unwrap();
    let peak = PEAK.load(Ordering::Relaxed);
    let after = live();
    let growth = (peak - empty) as f64 / (before - empty) as f64;
    println!(
        "reload: steady {} B, peak {} B ({growth:.2}x), after {} B",
        before - empty,
        peak - empty,
        after - empty
    );
    // While the old index serves, the reload holds the new one (as big as the old: same key
    // count and name lengths) and one shard's bytes (~1 MB) at a time, nothing per key more:
    // no owned copy of the key list, no second DOM. With these 128k keys that is ~1.6x the
    // keys' steady heap; with a million, and the process's own baseline, RSS stays near 1.4x
    // (`examples/keyscale.rs`).
    let index = loaded - empty;
    let extra = peak.saturating_sub(before + index);
    assert!(
        extra <= 2_000_000,
        "the reload held {extra} bytes besides both indexes (peak {growth:.2}x)"
    );
    assert!(config
        .current()
        .unwrap()
        .index
        .lookup(&hash_presented(material(7, 1).as_bytes()))
        .is_some());
}
