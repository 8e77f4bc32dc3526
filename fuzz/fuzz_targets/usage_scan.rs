//! The response-cost scanners (`keylimit_sidecar::http::meter`): they read bodies from the
//! app as they pass, so they must agree with a real JSON parser, not depend on how the body
//! is chunked, and never report more than the cap.
//!
//! Input: one byte picking the path, one byte picking the split point (as a fraction of the
//! body), then the body.
#![no_main]

use std::sync::Arc;

use keylimit_sidecar::http::meter::{EventScanner, JsonScanner, MAX_COST};
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 3] = ["usage.total_tokens", "a", "a.b.c"];

fn path(p: &str) -> Arc<[Box<[u8]>]> {
    p.split('.')
        .map(|s| s.as_bytes().to_vec().into_boxed_slice())
        .collect()
}

fn json(p: &str, chunks: &[&[u8]]) -> Option<u64> {
    let mut s = JsonScanner::new(path(p));
    for c in chunks {
        s.feed(c);
    }
    s.feed(b" ");
    s.found
}

fn events(p: &str, chunks: &[&[u8]]) -> Option<u64> {
    let mut s = EventScanner::new(path(p));
    for c in chunks {
        s.feed(c);
    }
    s.finish()
}

fuzz_target!(|data: &[u8]| {
    let [which, split, body @ ..] = data else {
        return;
    };
    let p = PATHS[usize::from(*which) % PATHS.len()];
    let at = body.len() * usize::from(*split) / 256;
    let (head, tail) = body.split_at(at);

    let whole = json(p, &[body]);
    assert_eq!(json(p, &[head, tail]), whole, "JSON chunked at {at}");
    assert!(whole.is_none_or(|n| n <= MAX_COST));
    let bytewise: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(json(p, &bytewise), whole, "JSON byte by byte");

    let ev = events(p, &[body]);
    assert_eq!(events(p, &[head, tail]), ev, "events chunked at {at}");
    assert!(ev.is_none_or(|n| n <= MAX_COST));

    // Where a real parser finds an unsigned integer at the path, the scanner finds the same
    // (serde_json, like the scanner, lets the last duplicate key win). Escaped keys are
    // not matched by design, and 20-digit numbers are over the scanner's digit bound.
    if body.contains(&b'\\') {
        return;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let pointer = format!("/{}", p.replace('.', "/"));
    if let Some(n) = v.pointer(&pointer).and_then(serde_json::Value::as_u64) {
        if n < 10_000_000_000_000_000_000 && v.is_object() {
            assert_eq!(whole, Some(n.min(MAX_COST)), "serde_json finds {n} at {p}");
        }
    }
});
