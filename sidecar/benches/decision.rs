//! The decision path: key lookup + limiter, at 1 key, 1M keys, and contended across threads.
//! Also prints limiter bytes per key after 1M keys have state.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keylimit_dataplane::{
    hash_key, KeyEntry, KeySource, Limits, LoadShedding, Mode, PolicyConfig, PolicyDocument,
    PreviousKey, RateWindow, ResponseConfig, Store, Unit, API_VERSION,
};
use keylimit_sidecar::config::{hash_presented, Snapshot};
use keylimit_sidecar::limiter::clock::SystemClock;
use keylimit_sidecar::limiter::local::Limiter;
use keylimit_sidecar::limiter::shed::LoadShedder;
use keylimit_sidecar::limiter::{Check, Decision, LimitSet};
use keylimit_sidecar::metrics::Metrics;

const MANY: usize = 1_000_000;

fn material(i: usize) -> String {
    format!("bench-key-{i:08}-padding-to-32b")
}

fn snapshot(n: usize) -> Snapshot {
    let keys: Vec<KeyEntry> = (0..n)
        .map(|i| KeyEntry {
            name: format!("key-{i}"),
            sha256: hash_key(material(i).as_bytes()),
            disabled: false,
            expires_at: None,
            overrides: None,
            previous: None,
            counter: None,
        })
        .collect();
    snapshot_of(keys)
}

/// Material of the key that key 0 of [`rotated_snapshot`] replaced.
const OLD: &str = "bench-old-key-material-padding-32";

/// One key in a rotation's overlap: its previous key is `OLD`, which also names its counters,
/// so both keys decide through the remap table.
fn rotated_snapshot() -> Snapshot {
    let old = hash_key(OLD.as_bytes());
    snapshot_of(vec![KeyEntry {
        name: "key-0".into(),
        sha256: hash_key(material(0).as_bytes()),
        disabled: false,
        expires_at: None,
        overrides: None,
        previous: Some(PreviousKey {
            sha256: old.clone(),
            valid_until: i64::from(u32::MAX),
        }),
        counter: Some(old),
    }])
}

fn snapshot_of(keys: Vec<KeyEntry>) -> Snapshot {
    let doc = PolicyDocument {
        api_version: API_VERSION.into(),
        policy: PolicyConfig {
            load_shedding: None,
            usage: None,
            name: "bench".into(),
            namespace: "ns".into(),
            generation: 1,
            mode: Mode::Enforce,
            key_source: KeySource::default(),
            // Generous, so every decision admits and writes state (the common, costlier case).
            limits: Limits {
                rates: vec![RateWindow {
                    unit: keylimit_dataplane::Unit::Requests,
                    name: "second".into(),
                    requests: 1_000_000_000,
                    period_seconds: 1,
                    burst: 1_000_000_000,
                }],
                ..Limits::default()
            },
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
    Snapshot::build(doc, keys, [0; 32], 1, &Metrics::new(false)).expect("bench config")
}

/// [`decide`] at a monotonic reading the caller took.
fn decide_at(snap: &Snapshot, limiter: &Limiter, hash: &[u8; 32], mono_ns: u64) -> bool {
    let Some(key) = snap.index.lookup(hash) else {
        return false;
    };
    matches!(
        limiter.decide_at(
            &Check {
                key_id: key.id,
                key_limits: key.limits,
                route_limits: None,
                policy_limits: snap.policy_limits.as_ref(),
                cost: 1,
                reserve: 0,
                throttle: snap.throttle,
                dry_run: snap.dry_run,
            },
            mono_ns
        ),
        Decision::Allow(_)
    )
}

/// Index lookup by hash + limiter decision: everything after the sha256.
fn decide(snap: &Snapshot, limiter: &Limiter, hash: &[u8; 32]) -> bool {
    let Some(key) = snap.index.lookup(hash) else {
        return false;
    };
    matches!(
        limiter.decide(&Check {
            key_id: key.id,
            key_limits: key.limits,
            route_limits: None,
            policy_limits: snap.policy_limits.as_ref(),
            cost: 1,
            reserve: 0,
            throttle: snap.throttle,
            dry_run: snap.dry_run,
        }),
        Decision::Allow(_)
    )
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(4));
    g.sample_size(30);

    let one = snapshot(1);
    let limiter = Limiter::new(Arc::new(SystemClock));
    let h0 = hash_presented(material(0).as_bytes());
    g.bench_function("single_key", |b| {
        b.iter(|| decide(&one, &limiter, black_box(&h0)))
    });
    // As the proxy decides: at the monotonic reading it already took for the request (the
    // failed-key budget needs it), so the limiter reads no clock of its own.
    let mono = keylimit_sidecar::limiter::clock::Clock::mono_ns(&SystemClock);
    let mut tick = 0u64;
    g.bench_function("single_key_caller_clock", |b| {
        b.iter(|| {
            tick += 1;
            decide_at(&one, &limiter, black_box(&h0), mono + tick)
        })
    });
    // A key in a rotation's overlap, presented as the new key and as the old one: both
    // decide under the first key's counters through the remap table.
    let rotated = rotated_snapshot();
    let old = hash_presented(OLD.as_bytes());
    for (name, h) in [("rotated_key_new", &h0), ("rotated_key_previous", &old)] {
        let limiter = Limiter::new(Arc::new(SystemClock));
        assert!(decide(&rotated, &limiter, h), "{name} must be admitted");
        g.bench_function(name, |b| {
            b.iter(|| decide(&rotated, &limiter, black_box(h)))
        });
    }
    // A key limited in tokens as well as requests (#14): the decision reserves an estimate;
    // a response then settles the reported cost. Both at the caller's clock, so they compare
    // with `single_key_caller_clock`.
    let both = LimitSet::compile(
        &Limits {
            rates: vec![
                RateWindow {
                    unit: Unit::Requests,
                    name: "second".into(),
                    requests: 1_000_000_000,
                    period_seconds: 1,
                    burst: 1_000_000_000,
                },
                RateWindow {
                    unit: Unit::Tokens,
                    name: "second-tokens".into(),
                    requests: 1_000_000_000_000,
                    period_seconds: 1,
                    burst: 1_000_000_000_000,
                },
            ],
            ..Limits::default()
        },
        "key",
    );
    let token_check = Check {
        key_id: 0x5eed_0000_0000_0001,
        key_limits: &both,
        route_limits: None,
        policy_limits: None,
        cost: 1,
        reserve: 500,
        throttle: None,
        dry_run: false,
    };
    let limiter = Limiter::new(Arc::new(SystemClock));
    let mut tick = 0u64;
    g.bench_function("token_key_caller_clock", |b| {
        b.iter(|| {
            tick += 1;
            matches!(
                limiter.decide_at(black_box(&token_check), mono + tick),
                Decision::Allow(_)
            )
        })
    });
    g.bench_function("token_key_settle", |b| {
        b.iter(|| {
            limiter.settle(
                black_box(token_check.key_id),
                [Some(&both), None],
                None,
                500,
                black_box(420),
            )
        })
    });
    // Load shedding's admission: a mutex and the per-key in-flight map, then the latency
    // sample and the release when the response ends. The permit's observe() also closes a
    // window every 16 samples.
    let shedder = LoadShedder::default();
    let shedding = LoadShedding {
        min_concurrency: 4,
        max_concurrency: 1000,
        latency_tolerance_percent: 150,
    };
    let mut at = mono;
    g.bench_function("shed_admit_observe_release", |b| {
        b.iter(|| {
            at += 1_000_000;
            if let Ok(mut p) = shedder.try_acquire(black_box(7), &shedding, at) {
                p.answered(at + 500_000);
            }
        })
    });
    // The parts of `single_key`: the clock read every decision makes, and the index lookup.
    g.bench_function("clock_mono_ns", |b| {
        b.iter(|| keylimit_sidecar::limiter::clock::Clock::mono_ns(black_box(&SystemClock)))
    });
    g.bench_function("index_lookup_single_key", |b| {
        b.iter(|| one.index.lookup(black_box(&h0)).map(|k| k.id))
    });
    g.bench_function("sha256_of_32B_key", |b| {
        let m = material(0);
        b.iter(|| hash_presented(black_box(m.as_bytes())))
    });
    // What a keyed document costs instead: HMAC-SHA256 from a pre-keyed state, cloned per
    // request as the proxy does (Snapshot::hasher).
    g.bench_function("hmac_sha256_of_32B_key", |b| {
        let m = material(0);
        let hasher = keylimit_dataplane::KeyHasher::hmac(&[7u8; keylimit_dataplane::HASH_KEY_LEN])
            .expect("32-byte bench key");
        b.iter(|| hasher.hash(black_box(m.as_bytes())))
    });

    let many = snapshot(MANY);
    let hashes: Vec<[u8; 32]> = (0..MANY)
        .map(|i| hash_presented(material(i).as_bytes()))
        .collect();
    // Random order, so each decision misses the cache as traffic from many keys would.
    let mut order: Vec<u32> = (0..MANY as u32).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let limiter = Limiter::new(Arc::new(SystemClock));
    for h in &hashes {
        decide(&many, &limiter, h);
    }
    let slots = limiter.slots();
    let bytes = limiter.state_bytes();
    eprintln!(
        "limiter state: {slots} slots for {MANY} keys, {bytes} bytes = {:.1} B/key",
        bytes as f64 / MANY as f64
    );
    // The presented key is in cache in a real request (it was just parsed), so the hashes are
    // laid out in the random visiting order and read sequentially.
    let shuffled: Vec<[u8; 32]> = order.iter().map(|&i| hashes[i as usize]).collect();
    let mut i = 0usize;
    g.bench_function("1M_keys_random", |b| {
        b.iter(|| {
            i = (i + 1) % MANY;
            decide(&many, &limiter, black_box(&shuffled[i]))
        })
    });
    let mut i = 0usize;
    g.bench_function("index_lookup_1M_keys_random", |b| {
        b.iter(|| {
            i = (i + 1) % MANY;
            many.index.lookup(black_box(&shuffled[i])).map(|k| k.id)
        })
    });
    // The limiter alone at 1M keys (ids known, no index), at a caller's clock reading.
    let mono = keylimit_sidecar::limiter::clock::Clock::mono_ns(&SystemClock);
    let ids: Vec<u64> = shuffled
        .iter()
        .map(|h| many.index.lookup(h).map_or(0, |k| k.id))
        .collect();
    let limits = many.index.lookup(&hashes[0]).map(|k| k.limits);
    let mut i = 0usize;
    if let Some(limits) = limits {
        g.bench_function("limiter_only_1M_keys_random_caller_clock", |b| {
            b.iter(|| {
                i = (i + 1) % MANY;
                let c = Check {
                    key_id: black_box(ids[i]),
                    key_limits: limits,
                    route_limits: None,
                    policy_limits: None,
                    cost: 1,
                    reserve: 0,
                    throttle: None,
                    dry_run: false,
                };
                matches!(limiter.decide_at(&c, mono + i as u64), Decision::Allow(_))
            })
        });
    }
    eprintln!(
        "key index: {} keys, {} heap bytes = {:.1} B/key",
        many.index.len(),
        many.index.heap_bytes(),
        many.index.heap_bytes() as f64 / MANY as f64
    );
    // The memory-latency floor of this machine: one random read of a 1M-entry hash map.
    let floor: std::collections::HashMap<u64, u64> = (0..MANY as u64)
        .map(|k| (k.wrapping_mul(0x9E37_79B9_7F4A_7C15), k))
        .collect();
    let mut i = 0usize;
    g.bench_function("baseline_std_hashmap_1M_random_get", |b| {
        b.iter(|| {
            i = (i + 1) % MANY;
            let k = u64::from(order[i]).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            black_box(floor.get(&k).copied())
        })
    });
    let mut i = 0usize;
    g.bench_function("1M_keys_random_with_sha256", |b| {
        b.iter(|| {
            i = (i + 1) % MANY;
            let h = hash_presented(material(order[i] as usize).as_bytes());
            decide(&many, &limiter, &h)
        })
    });

    // Two threads (the machine has two cores): same key, then distinct keys.
    for (name, same) in [
        ("contended_2threads_same_key", true),
        ("contended_2threads_1M_keys", false),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..2usize {
                        let (many, limiter, hashes, shuffled) =
                            (&many, &limiter, &hashes, &shuffled);
                        s.spawn(move || {
                            for n in 0..iters as usize {
                                let h = if same {
                                    &hashes[0]
                                } else {
                                    &shuffled[(n * 2 + t) % MANY]
                                };
                                black_box(decide(many, limiter, h));
                            }
                        });
                    }
                });
                // Per decision: both threads' decisions completed in this wall time.
                start.elapsed() / 2
            })
        });
    }
    g.finish();
}

/// What the hardened request path adds before the decision: path normalisation (the common
/// already-normal case and a path that needs rewriting), route matching, and key extraction
/// from a realistic header map.
fn request_path(c: &mut Criterion) {
    use keylimit_sidecar::http::path::{match_form, normalize};
    let mut g = c.benchmark_group("request_path");
    g.throughput(Throughput::Elements(1));
    let rules = keylimit_dataplane::PathMatching::default();
    g.bench_function("normalize_already_normal", |b| {
        b.iter(|| normalize(black_box("/v1/orders/42/items")).map(|p| p.len()))
    });
    g.bench_function("normalize_rewrite", |b| {
        b.iter(|| normalize(black_box("/v1//orders/./42/%69tems")).map(|p| p.len()))
    });
    g.bench_function("match_form_lowercase", |b| {
        b.iter(|| match_form(black_box("/v1/orders/42/items"), &rules).map(|p| p.len()))
    });
    let snap = snapshot(1);
    let req = http::Request::get("/v1/orders/42?expand=items")
        .header("host", "app")
        .header("user-agent", "bench")
        .header("accept", "application/json")
        .header("x-api-key", material(0))
        .body(())
        .unwrap_or_default();
    g.bench_function("find_key_header", |b| {
        b.iter(|| keylimit_sidecar::http::proxy::find_key(&snap.source, black_box(&req)))
    });
    g.finish();
}

criterion_group!(decision, benches, request_path);
criterion_main!(decision);
