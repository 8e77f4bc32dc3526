use super::*;
use keylimit_dataplane::{hash_key, KeySource, Limits, RateWindow, ResponseConfig, Route, Store};

fn key(name: &str, material: &str) -> KeyEntry {
    KeyEntry {
        name: name.into(),
        sha256: hash_key(material.as_bytes()),
        disabled: false,
        expires_at: None,
        overrides: None,
        previous: None,
        counter: None,
    }
}

fn doc(keys: Vec<KeyEntry>, routes: Vec<Route>) -> PolicyDocument {
    PolicyDocument {
        api_version: dp::API_VERSION.into(),
        policy: PolicyConfig {
            load_shedding: None,
            usage: None,
            name: "p".into(),
            namespace: "ns".into(),
            generation: 3,
            mode: Mode::Enforce,
            key_source: KeySource::default(),
            limits: Limits {
                rates: vec![RateWindow {
                    unit: keylimit_dataplane::Unit::Requests,
                    name: "minute".into(),
                    requests: 10,
                    period_seconds: 60,
                    burst: 0,
                }],
                ..Limits::default()
            },
            policy_limits: None,
            throttle: None,
            routes,
            path_matching: Default::default(),
            upgrade_protocols: vec![],
            response: ResponseConfig::default(),
            store: Store::Local,
        },
        keys,
        shards: vec![],
    }
}

fn build(d: PolicyDocument) -> Result<Snapshot, Error> {
    let keys = d.keys.clone();
    Snapshot::build(d, keys, [0; 32], 1, &Metrics::new(false))
}

#[test]
fn index_finds_keys_by_presented_material_only() {
    let mut o = key("gold", "gold-key-material-123");
    o.overrides = Some(Limits {
        concurrency: Some(3),
        ..Limits::default()
    });
    let snap = build(doc(vec![key("basic", "basic-key-material-123"), o], vec![])).unwrap();
    let basic = snap
        .index
        .lookup(&hash_presented(b"basic-key-material-123"))
        .unwrap();
    assert_eq!(basic.name(), "basic");
    assert!(basic.limits.concurrency.is_none());
    let gold = snap
        .index
        .lookup(&hash_presented(b"gold-key-material-123"))
        .unwrap();
    assert_eq!(gold.limits.concurrency.as_ref().map(|c| c.max), Some(3));
    assert_eq!(
        gold.limits.rates.len(),
        1,
        "policy rate kept under the override"
    );
    assert!(snap.index.lookup(&hash_presented(b"nope")).is_none());
}

#[test]
fn longest_route_prefix_wins_and_methods_filter() {
    let route = |name: &str, prefix: &str, methods: Vec<&str>, cost| Route {
        usage: None,
        name: name.into(),
        path_prefix: prefix.into(),
        methods: methods.into_iter().map(String::from).collect(),
        cost,
        limits: None,
    };
    let snap = build(doc(
        vec![],
        vec![
            route("api", "/api", vec![], 1),
            route("search", "/api/search", vec!["post"], 5),
        ],
    ))
    .unwrap();
    assert_eq!(
        snap.route(&Method::POST, "/api/search/x").map(|r| r.cost),
        Some(5)
    );
    assert_eq!(
        snap.route(&Method::GET, "/api/search").map(|r| &*r.name),
        Some("api")
    );
    assert!(snap.route(&Method::GET, "/other").is_none());
}

#[test]
fn invalid_header_name_is_rejected() {
    let mut d = doc(vec![], vec![]);
    d.policy.key_source.header = Some("bad header".into());
    assert!(matches!(build(d), Err(Error::Document(_))));
}
