//! The operator's document as the sidecar reads it: `policy.json`, then every shard it names.
//! A hand-edited or half-written ConfigMap must be refused, never crash the sidecar.
//!
//! Input: the document's bytes, then the shards' bytes, separated by NUL (which valid JSON
//! never contains raw), so seeds stay readable.
#![no_main]

use keylimit_dataplane::{digest, validate_key, PolicyDocument};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let doc_bytes = parts.next().unwrap_or_default();
    let shards: Vec<&[u8]> = parts.collect();

    let Ok(doc) = PolicyDocument::parse(doc_bytes) else {
        return;
    };
    // What parse accepted, validate accepts, and the operator's serialisation of it reads
    // back as the same document (the operator writes with serde_json, the sidecar reads).
    assert!(doc.validate().is_ok());
    let written = serde_json::to_vec(&doc).expect("a parsed document serialises");
    let back = PolicyDocument::parse(&written).expect("a serialised document parses");
    assert_eq!(back, doc);

    check_keys(&doc, &shards);
    // Shard digests from the fuzzer almost never match, which would stop every run at the
    // digest check: recompute them so the shard parser is reached too.
    let mut fixed = doc.clone();
    for (s, bytes) in fixed.shards.iter_mut().zip(&shards) {
        s.sha256 = digest(bytes);
    }
    check_keys(&fixed, &shards);
});

fn check_keys(doc: &PolicyDocument, shards: &[&[u8]]) {
    let mut next = 0;
    let resolved = doc.resolve_keys(|_file| {
        let bytes = shards.get(next).map(|b| b.to_vec());
        next += 1;
        bytes
    });
    let Ok(keys) = resolved else { return };
    if doc.shards.is_empty() {
        assert_eq!(keys, doc.keys);
    } else {
        assert!(keys.len() >= doc.keys.len());
        assert_eq!(&keys[..doc.keys.len()], &doc.keys[..]);
    }
    for k in &keys {
        if validate_key(k).is_ok() {
            assert!(k.sha256.len() == 64 && k.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            // The limits a valid key gets are computed for every request: they must not panic.
            if let Some(o) = &k.overrides {
                let _ = doc.policy.limits.with_overrides(o);
            }
        }
    }
}
