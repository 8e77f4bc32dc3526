//! Keyed key hashes over real HTTP: a document whose keys are HMAC-SHA256 under the
//! namespace's hash key admits the key only when the sidecar holds that key file, and a
//! sidecar without it refuses the document and keeps its last good config.

mod common;

use common::*;
use http::StatusCode;
use keylimit_dataplane::{
    hash_key, KeyEntry, KeyHash, KeyHashAlgorithm, KeyHasher, Limits, PolicyDocument, RateWindow,
    HASH_KEY_SECRET,
};

const HASH_KEY: [u8; 32] = *b"0123456789abcdef0123456789abcdef";

fn limits() -> Limits {
    Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "minute".into(),
            requests: 100,
            period_seconds: 60,
            burst: 100,
        }],
        ..Limits::default()
    }
}

/// The document the operator renders now: entries are HMACs, the scheme is declared.
fn hmac_doc(names: &[&str]) -> PolicyDocument {
    let hasher = KeyHasher::hmac(&HASH_KEY).unwrap();
    let keys = names
        .iter()
        .map(|n| KeyEntry {
            sha256: hasher.hash_hex(material(n).as_bytes()),
            ..key(n)
        })
        .collect();
    let mut d = doc(limits(), keys);
    d.policy.key_source.key_hash = KeyHash {
        algorithm: KeyHashAlgorithm::HmacSha256,
        secret: Some(HASH_KEY_SECRET.into()),
    };
    d.api_version = keylimit_dataplane::API_VERSION_KEYED.into();
    d
}

#[tokio::test]
async fn hmac_document_admits_keys_with_the_mounted_hash_key() {
    let mut dir = ConfigDir::new();
    let d = hmac_doc(&["a"]);
    // What the ConfigMap holds is not the sha256 an attacker could test guesses against.
    assert_ne!(d.keys[0].sha256, hash_key(material("a").as_bytes()));
    dir.write_doc(&d);
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("key");
    std::fs::write(&key_file, HASH_KEY).unwrap();
    let up = upstream().await;
    let sc = start_with(&dir, &up, |s| s.hash_key_file = Some(key_file.clone())).await;
    let c = client();

    let r = with_key(&c, sc.traffic_addr, "/", "a").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["x-keylimit-key"], "a");
    // Bearer goes through the same keyed hash.
    let bearer = format!("Bearer {}", material("a"));
    let r = get(&c, sc.traffic_addr, "/", &[("authorization", &bearer)]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = with_key(&c, sc.traffic_addr, "/", "b").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    sc.stop().await;
}

#[tokio::test]
async fn hmac_document_without_a_hash_key_is_refused_and_the_last_good_config_serves() {
    let mut dir = ConfigDir::new();
    // A plain-sha256 document (an older operator's) loads without any hash key.
    dir.write_doc(&doc(limits(), vec![key("old")]));
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let c = client();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "old").await.status,
        StatusCode::OK
    );
    let loaded = sc.config.generation();

    dir.write_doc(&hmac_doc(&["new"]));
    assert!(sc.reload_now().await.is_err(), "no hash key: refused");
    assert_eq!(sc.config.generation(), loaded);
    assert!(sc.config.failure().is_some());
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "old").await.status,
        StatusCode::OK,
        "the last good config keeps serving"
    );
    sc.stop().await;
}

#[tokio::test]
async fn a_wrong_or_short_hash_key_admits_nothing() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&hmac_doc(&["a"]));
    let key_dir = tempfile::tempdir().unwrap();
    let wrong = key_dir.path().join("wrong");
    std::fs::write(&wrong, [9u8; 32]).unwrap();
    let up = upstream().await;
    let sc = start_with(&dir, &up, |s| s.hash_key_file = Some(wrong.clone())).await;
    let c = client();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "a").await.status,
        StatusCode::UNAUTHORIZED,
        "a different hash key matches nothing"
    );
    sc.stop().await;

    let short = key_dir.path().join("short");
    std::fs::write(&short, [9u8; 16]).unwrap();
    let sc = start_with(&dir, &up, |s| s.hash_key_file = Some(short.clone())).await;
    assert!(
        sc.config.current().is_none(),
        "a truncated key file is refused"
    );
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "a").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    sc.stop().await;
}
