//! The app's answer as the sidecar reads it (`keylimit_sidecar::http::upstream`): the response
//! head (httparse, 1xx answers, framing, hop-by-hop fields) and the body in each framing
//! (length, chunked with trailers, until close). The app sits behind the sidecar, but it is
//! still input: a buggy or compromised app must not be able to make the sidecar pass on a
//! different answer depending on how its bytes happened to be split into reads.
//!
//! Input: one flags byte (bit 0: the request was `HEAD`), one seed byte for where the bytes
//! are split, then the app's bytes.
#![no_main]

use keylimit_sidecar::http::upstream::read_answer;
use libfuzzer_sys::fuzz_target;

/// Never passed on except with a `101`, whose fields go to the client unchanged.
const HOP_BY_HOP: [&str; 8] = [
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "keep-alive",
    "proxy-connection",
];

fuzz_target!(|data: &[u8]| {
    let [flags, seed, wire @ ..] = data else {
        return;
    };
    let head_request = flags & 1 != 0;
    let whole = read_answer(&[wire], head_request);

    // The same bytes in reads of 1 to 16 bytes, the lengths drawn from the seed.
    let mut pieces = Vec::new();
    let mut rest = wire;
    let mut x = u32::from(*seed) | 0x100;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (1 + (x % 16) as usize).min(rest.len());
        let (piece, more) = rest.split_at(n);
        pieces.push(piece);
        rest = more;
    }
    let split = read_answer(&pieces, head_request);
    assert_eq!(
        format!("{whole:?}"),
        format!("{split:?}"),
        "the answer depends on how its bytes were read"
    );

    let Ok(answer) = whole else { return };
    assert!(
        answer.status == 101 || !(100..200).contains(&answer.status),
        "a 1xx other than 101 passed on: {}",
        answer.status
    );
    assert!(answer.body.len() <= wire.len());
    if head_request || matches!(answer.status, 101 | 204 | 304) {
        assert!(answer.body.is_empty(), "{} with a body", answer.status);
    }
    if answer.status != 101 {
        for (name, _) in &answer.fields {
            assert!(
                !HOP_BY_HOP.contains(&name.as_str()),
                "hop-by-hop {name} passed on"
            );
        }
    }
});
