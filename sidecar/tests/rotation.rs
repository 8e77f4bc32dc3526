//! Key rotation in the sidecar: during the overlap the previous key is served as its ApiKey,
//! on one budget, and its end (by the clock, or by a reload without it) refuses only new
//! requests: nothing admitted before fails.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use keylimit_dataplane::{hash_key, KeyEntry, Limits, PreviousKey};

const NEW: &str = "acme-new-key-material-0123456789";
const OLD: &str = "acme-old-key-material-0123456789";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn rotated(valid_until: i64) -> KeyEntry {
    KeyEntry {
        name: "acme".into(),
        sha256: hash_key(NEW.as_bytes()),
        previous: Some(PreviousKey {
            sha256: hash_key(OLD.as_bytes()),
            valid_until,
        }),
        ..key("acme")
    }
}

/// A sidecar serving one key in a rotation's overlap until `valid_until`, and a `/hold`
/// request admitted with the old key whose body stays open.
async fn held_with_old_key(
    valid_until: i64,
) -> (
    ConfigDir,
    Upstream,
    keylimit_sidecar::Sidecar,
    TestClient,
    http::Response<hyper::body::Incoming>,
) {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(Limits::default(), vec![rotated(valid_until)]));
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let c = client();
    let req = http::Request::get(format!("http://{}/hold", sc.traffic_addr))
        .header("x-api-key", OLD)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let held = c.request(req).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    (dir, up, sc, c, held)
}

async fn status(c: &TestClient, addr: std::net::SocketAddr, path: &str, key: &str) -> StatusCode {
    get(c, addr, path, &[("x-api-key", key)]).await.status
}

#[tokio::test]
async fn both_keys_are_one_key_with_one_budget() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(daily(4), vec![rotated(unix_now() + 3_600)]));
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let c = client();
    for k in [OLD, NEW, OLD, NEW] {
        let r = get(&c, sc.traffic_addr, "/", &[("x-api-key", k)]).await;
        assert_eq!(r.status, StatusCode::OK);
        // The app sees one identity, whichever key was presented.
        assert_eq!(r.body["x-keylimit-key"], "acme", "{:?}", r.body);
    }
    // Four requests spent the quota of four, across both keys: both are exhausted.
    for k in [NEW, OLD] {
        assert_eq!(
            status(&c, sc.traffic_addr, "/", k).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    sc.stop().await;
}

#[tokio::test]
async fn the_overlap_ends_on_the_clock_without_failing_a_request_in_flight() {
    // The previous key works for about one more second; the held request's body stays open
    // across the end of the overlap.
    let (_dir, _up, sc, c, held) = held_with_old_key(unix_now() + 1).await;
    eventually(
        "the old key to be refused once its overlap is over",
        || async { status(&c, sc.traffic_addr, "/", OLD).await == StatusCode::FORBIDDEN },
    )
    .await;
    assert_eq!(status(&c, sc.traffic_addr, "/", NEW).await, StatusCode::OK);
    // The held request still streams: its first frame arrives whole.
    let mut body = held.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"start"));
    sc.stop().await;
}

#[tokio::test]
async fn a_reload_without_the_previous_key_ends_the_overlap_for_new_requests_only() {
    let (mut dir, _up, sc, c, held) = held_with_old_key(unix_now() + 3_600).await;
    // What the operator renders once the overlap is over: the key alone.
    let mut ended = rotated(0);
    ended.previous = None;
    dir.write_doc(&doc(Limits::default(), vec![ended]));
    sc.reload_now().await.unwrap();
    assert_eq!(
        status(&c, sc.traffic_addr, "/", OLD).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status(&c, sc.traffic_addr, "/", NEW).await, StatusCode::OK);
    let frame = held.into_body().frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"start"));
    sc.stop().await;
}
