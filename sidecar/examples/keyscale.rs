//! Memory and reload cost of the config index and the local limiter at many keys.
//!
//! `cargo run --release -p keylimit-sidecar --example keyscale -- [keys] [dir]`
//! (default 1,000,000 keys; `dir` defaults to a fresh directory under the temp dir).
//!
//! Writes a policy the way the operator does (7,500 keys per shard file), then, in one process:
//! loads it through `ConfigStore::reload` (timed), gives every key one decision so each has
//! limiter state, and reloads twice more: once with one shard changed (one key renamed), once
//! with every shard rewritten (all keys replaced). Memory is the process's RSS from
//! `/proc/self/status`: bytes per key are RSS growth over the empty process divided by the key
//! count; a reload's peak is `VmHWM` after resetting it (`/proc/self/clear_refs` = 5) just
//! before that reload. The files are written by a child process, so their generation does not
//! count in this process's memory. Linux only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use keylimit_dataplane::{
    digest, hash_key, KeyEntry, KeyShard, KeySource, Limits, Mode, PolicyConfig, PolicyDocument,
    RateWindow, ResponseConfig, ShardRef, Store, API_VERSION,
};
use keylimit_sidecar::config::{hash_presented, key_id, ConfigSource, ConfigStore};
use keylimit_sidecar::limiter::clock::SystemClock;
use keylimit_sidecar::limiter::local::Limiter;
use keylimit_sidecar::limiter::{Check, Decision, LimitSet};
use keylimit_sidecar::metrics::Metrics;

const SHARD: usize = 7_500;

fn material(i: usize, variant: u32) -> String {
    format!("keyscale-{variant}-{i:08}-material")
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss() -> u64 {
    status_kb("VmRSS:") * 1024
}

fn hwm() -> u64 {
    status_kb("VmHWM:") * 1024
}

fn reset_hwm() {
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("cannot reset VmHWM: peak figures are process-wide");
    }
}

/// Writes `n` keys of `variant` (variant 1 renames key 0 only) into `dir` through a
/// kubelet-like `..data` swap, as the sidecar reads it in a pod.
fn generate(dir: &Path, n: usize, variant: u32) {
    let keys: Vec<KeyEntry> = (0..n)
        .map(|i| {
            // Variant 1 differs from 0 in one key: a typical edit (one shard changes).
            let v = if variant == 1 && i != 0 { 0 } else { variant };
            KeyEntry {
                name: format!("key-{v}-{i:07}"),
                sha256: hash_key(material(i, v).as_bytes()),
                disabled: false,
                expires_at: None,
                overrides: None,
                previous: None,
                counter: None,
            }
        })
        .collect();
    let mut doc = PolicyDocument {
        api_version: API_VERSION.into(),
        policy: PolicyConfig {
            load_shedding: None,
            usage: None,
            name: "scale".into(),
            namespace: "ns".into(),
            generation: i64::from(variant) + 1,
            mode: Mode::Enforce,
            key_source: KeySource::default(),
            limits: policy_limits(),
            policy_limits: None,
            throttle: None,
            routes: vec![],
            path_matching: Default::default(),
            upgrade_protocols: vec![],
            response: ResponseConfig::default(),
            store: Store::Local,
        },
        keys: vec![],
        shards: vec![],
    };
    let data = dir.join(format!("..v{variant}"));
    std::fs::create_dir_all(&data).expect("create data dir");
    let mut files = Vec::new();
    for (i, chunk) in keys.chunks(SHARD).enumerate() {
        let bytes = serde_json::to_vec(&KeyShard {
            api_version: API_VERSION.into(),
            policy: "scale".into(),
            index: i as u32,
            keys: chunk.to_vec(),
        })
        .expect("serialise shard");
        let file = format!("keys-{i:04}.json");
        doc.shards.push(ShardRef {
            file: file.clone(),
            config_map: format!("scale-keys-{i:04}"),
            sha256: digest(&bytes),
            keys: chunk.len(),
        });
        std::fs::write(data.join(&file), bytes).expect("write shard");
        files.push(file);
    }
    let policy = serde_json::to_vec(&doc).expect("serialise policy");
    std::fs::write(data.join("policy.json"), policy).expect("write policy");
    files.push("policy.json".into());
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{variant}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for f in files {
        let link = dir.join(&f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(&f), &link).expect("link");
        }
    }
}

fn generate_in_child(dir: &Path, n: usize, variant: u32) {
    let t = Instant::now();
    let exe = std::env::current_exe().expect("own path");
    let ok = std::process::Command::new(exe)
        .arg("--generate")
        .arg(n.to_string())
        .arg(dir)
        .arg(variant.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "generating variant {variant} failed");
    eprintln!(
        "(generated variant {variant} in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
}

fn policy_limits() -> Limits {
    Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "second".into(),
            requests: 1_000_000,
            period_seconds: 1,
            burst: 1_000,
        }],
        ..Limits::default()
    }
}

fn decide(limiter: &Limiter, key_id: u64, limits: &LimitSet) -> bool {
    matches!(
        limiter.decide(&Check {
            key_id,
            key_limits: limits,
            route_limits: None,
            policy_limits: None,
            cost: 1,
            reserve: 0,
            throttle: None,
            dry_run: false,
        }),
        Decision::Allow(_)
    )
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--generate") {
        let n = args[1].parse().expect("key count");
        let variant = args[3].parse().expect("variant");
        generate(Path::new(&args[2]), n, variant);
        return;
    }
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir: PathBuf = args
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("keyscale-{}", std::process::id())));
    std::fs::create_dir_all(&dir).expect("create dir");
    generate_in_child(&dir, n, 0);

    // Presented hashes computed first, outside the measured growth; the decisions below
    // then cost what they cost.
    let hashes: Vec<[u8; 32]> = (0..n)
        .map(|i| hash_presented(material(i, 0).as_bytes()))
        .collect();
    let base = rss();

    // Limiter state alone first (ids and limits as the index gives them), so its growth is
    // not hidden in heap the config load freed.
    let limits = LimitSet::compile(&policy_limits(), "key");
    let limiter = Limiter::new(Arc::new(SystemClock));
    let t = Instant::now();
    let mut admitted = 0usize;
    for h in &hashes {
        admitted += usize::from(decide(&limiter, key_id(h), &limits));
    }
    let first_decisions_s = t.elapsed().as_secs_f64();
    assert_eq!(admitted, n, "every key admitted once");
    let with_state = rss();

    let metrics = Arc::new(Metrics::new(false));
    let config = ConfigStore::new(metrics.clone());
    let src = ConfigSource::Directory(dir.clone());
    reset_hwm();
    let t = Instant::now();
    config.reload(&src).expect("first load");
    let load_s = t.elapsed().as_secs_f64();
    let load_peak = hwm();
    let loaded = rss();
    let snap = config.current().expect("loaded");
    assert_eq!(snap.index.len(), n);
    // The index finds every key, and its decisions land on the state made above.
    for h in &hashes {
        let key = snap.index.lookup(h).expect("indexed key");
        assert!(decide(&limiter, key.id, key.limits));
    }
    drop(snap);
    // The tool's own copy of every key's hash is no part of a sidecar's steady state.
    drop(hashes);
    let steady = rss();

    let limiter_b = (with_state.saturating_sub(base)) as f64 / n as f64;
    let config_b = (loaded.saturating_sub(with_state)) as f64 / n as f64;
    println!("keys: {n} (sharded, {SHARD} per shard, 1 rate window each)");
    println!(
        "rss before limiter and config (hashes of every key held): {:.1} MB",
        mb(base)
    );
    println!(
        "first load: {:.0} ms, rss after {:.1} MB, peak during load {:.1} MB",
        load_s * 1e3,
        mb(loaded),
        mb(load_peak)
    );
    println!(
        "limiter: {limiter_b:.1} B/key (rss growth of one decision per key; {:.0} ns/decision \
         for first decisions in key order)",
        first_decisions_s * 1e9 / n as f64
    );
    println!("config: {config_b:.1} B/key (rss growth of the load)");
    println!(
        "total: {:.1} B/key; steady rss {:.1} MB",
        config_b + limiter_b,
        mb(steady)
    );

    for (variant, what) in [(1u32, "one shard changed"), (2, "every shard rewritten")] {
        generate_in_child(&dir, n, variant);
        let before = rss();
        reset_hwm();
        let t = Instant::now();
        config.reload(&src).expect("reload");
        let took = t.elapsed().as_secs_f64();
        let peak = hwm();
        let after = rss();
        println!(
            "reload ({what}): {:.0} ms to enforcement; rss before {:.1} MB, peak {:.1} MB \
             ({:.2}x before), after {:.1} MB",
            took * 1e3,
            mb(before),
            mb(peak),
            peak as f64 / before as f64,
            mb(after)
        );
    }
    let t = Instant::now();
    config.reload(&src).expect("re-read");
    println!(
        "re-read of unchanged bytes: {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
}
