//! The sidecar tried the way an attacker would: raw sockets where an HTTP client would
//! normalise the attack away, forged headers, hostile paths, idle and half-open connections.
//! Each module covers one class of attack from the sidecar-hardening issue; every test failed
//! on the code before its fix.

#[path = "../common/mod.rs"]
mod common;

mod headers;
mod keys;
mod paths;
mod raw;
mod server;

use keylimit_dataplane::{Limits, PolicyDocument, RateWindow};

/// `requests` per minute, all of them admitted at once if they come at once.
pub fn per_minute(requests: u64) -> Limits {
    Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "minute".into(),
            requests,
            period_seconds: 60,
            burst: requests - 1,
        }],
        ..Limits::default()
    }
}

/// A sidecar in front of the test upstream, serving `doc`.
pub async fn setup(
    doc: PolicyDocument,
) -> (
    common::ConfigDir,
    common::Upstream,
    keylimit_sidecar::Sidecar,
) {
    let mut dir = common::ConfigDir::new();
    dir.write_doc(&doc);
    let up = common::upstream().await;
    let sc = common::start(&dir, &up).await;
    (dir, up, sc)
}

/// What the upstream saw, from its JSON echo of the request headers and `:uri`.
pub fn echoed(r: &raw::RawResponse) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not an upstream echo ({e}): {r:?}"))
}
