//! Key handling: every configured source stripped, the raw query kept byte for byte, two keys
//! refused, failed guesses budgeted per peer, and a duplicate entry that no longer freezes
//! the policy (issue 11, items 3, 4, 6 and 9).

use std::net::SocketAddr;

use keylimit_dataplane::KeySource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{doc, key, material, ConfigDir};
use crate::raw::{get, parse, send, RawResponse};
use crate::{echoed, per_minute, setup};

fn all_sources(strip: bool) -> KeySource {
    KeySource {
        header: Some("X-API-Key".into()),
        bearer: true,
        query_param: Some("api_key".into()),
        strip,
        ..KeySource::default()
    }
}

#[tokio::test]
async fn strip_removes_the_key_from_every_source_it_was_sent_in() {
    let mut d = doc(per_minute(1_000), vec![key("k")]);
    d.policy.key_source = all_sources(true);
    let (_d, _u, sc) = setup(d).await;
    let m = material("k");
    let target = format!("/x?a=1&api_key={m}&b=2");
    let hdr = format!("X-API-Key: {m}");
    let bearer = format!("Authorization: Bearer {m}");
    let r = send(sc.traffic_addr, &get(&target, &[&hdr, &bearer])).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!r.body.contains(&m), "the key reached the app: {}", r.body);
    let seen = echoed(&r);
    assert!(seen.get("x-api-key").is_none() && seen.get("authorization").is_none());
    assert!(
        seen[":uri"]
            .as_str()
            .is_some_and(|u| u.ends_with("/x?a=1&b=2")),
        "{seen}"
    );
    // Basic credentials are not a key source: they stay.
    let r = send(
        sc.traffic_addr,
        &get("/", &[&hdr, "Authorization: Basic dXNlcjpwdw=="]),
    )
    .await;
    assert_eq!(echoed(&r)["authorization"], "Basic dXNlcjpwdw==");
    sc.stop().await;
}

#[tokio::test]
async fn stripping_the_query_parameter_leaves_every_other_byte_alone() {
    let mut d = doc(per_minute(1_000), vec![key("k")]);
    d.policy.key_source = all_sources(true);
    let (_d, _u, sc) = setup(d).await;
    let m = material("k");
    for (query, kept) in [
        (
            format!("a=%20b&c&api_key={m}&d=x;y&e=%ff&f=1+2"),
            "a=%20b&c&d=x;y&e=%ff&f=1+2",
        ),
        (format!("api_key={m}"), ""),
        (format!("api_key={m}&z=%2F&"), "z=%2F&"),
        (format!("q=%E2%82%AC&api%5Fkey={m}"), "q=%E2%82%AC"),
    ] {
        let r = send(sc.traffic_addr, &get(&format!("/p?{query}"), &[])).await;
        assert_eq!(r.status, 200, "{query}: {r:?}");
        let uri = echoed(&r)[":uri"].as_str().unwrap_or_default().to_string();
        let want = if kept.is_empty() {
            "/p".to_string()
        } else {
            format!("/p?{kept}")
        };
        assert!(
            uri.ends_with(&want),
            "{query} reached the app as {uri}, want {want}"
        );
    }
    sc.stop().await;
}

#[tokio::test]
async fn two_different_keys_or_one_source_twice_are_400() {
    let mut d = doc(per_minute(1_000), vec![key("a"), key("b")]);
    d.policy.key_source = all_sources(false);
    let (_d, _u, sc) = setup(d).await;
    let (a, b) = (material("a"), material("b"));
    let ha = format!("X-API-Key: {a}");
    let hb = format!("X-API-Key: {b}");
    let bb = format!("Authorization: Bearer {b}");
    let ba = format!("Authorization: Bearer {a}");
    for (target, headers) in [
        ("/".to_string(), vec![ha.as_str(), hb.as_str()]),
        ("/".to_string(), vec![ha.as_str(), ha.as_str()]),
        ("/".to_string(), vec![ha.as_str(), bb.as_str()]),
        (format!("/?api_key={b}"), vec![ha.as_str()]),
        (format!("/?api_key={a}&api_key={a}"), vec![]),
        ("/".to_string(), vec![ba.as_str(), bb.as_str()]),
    ] {
        let r = send(sc.traffic_addr, &get(&target, &headers)).await;
        assert_eq!(r.status, 400, "{target} {headers:?}: {r:?}");
        assert!(r.body.contains("ambiguous_key"), "{r:?}");
    }
    // One key in several sources is one key.
    let r = send(
        sc.traffic_addr,
        &get(&format!("/?api_key={a}"), &[&ha, &ba]),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(echoed(&r)["x-keylimit-key"], "a");
    sc.stop().await;
}

/// A raw request from a chosen loopback source address (Linux routes all of 127/8 locally).
async fn send_from(src: &str, to: SocketAddr, request: &[u8]) -> RawResponse {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{src}:0").parse().expect("addr"))
        .expect("bind");
    let mut s = sock.connect(to).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    parse(&buf)
}

#[tokio::test]
async fn failed_key_guesses_are_budgeted_per_peer() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let to = sc.traffic_addr;
    let good = format!("X-API-Key: {}", material("k"));
    let mut statuses = Vec::new();
    for i in 0..40 {
        let guess = format!("X-API-Key: guess-{i}-0123456789abcdef");
        statuses.push(
            send_from("127.0.0.9", to, &get("/", &[&guess]))
                .await
                .status,
        );
    }
    assert!(statuses[..30].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[30..].iter().all(|s| *s == 429), "{statuses:?}");
    // While throttled, even a valid key is refused unchecked: no oracle for the guesser.
    let r = send_from("127.0.0.9", to, &get("/", &[&good])).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.body.contains("auth_throttled"), "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    // Other peers are not affected.
    let r = send_from("127.0.0.10", to, &get("/", &[&good])).await;
    assert_eq!(r.status, 200, "{r:?}");
    let m = crate::common::get(&crate::common::client(), sc.admin_addr, "/metrics", &[]).await;
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.lines()
            .any(|l| l.contains("decision=\"auth_throttled\"") && !l.ends_with(" 0")),
        "the throttled requests are counted: {text}"
    );
    sc.stop().await;
}

#[tokio::test]
async fn a_duplicate_or_malformed_key_entry_is_skipped_not_fatal() {
    let mut twin = key("twin");
    twin.sha256 = key("k").sha256;
    let mut bad = key("bad");
    bad.sha256 = "not-hex".into();
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(
        per_minute(1_000),
        vec![key("k"), twin, bad, key("other")],
    ));
    let up = crate::common::upstream().await;
    let sc = crate::common::start(&dir, &up).await;
    let k = format!("X-API-Key: {}", material("k"));
    let o = format!("X-API-Key: {}", material("other"));
    let r = send(sc.traffic_addr, &get("/", &[&k])).await;
    assert_eq!(r.status, 200, "the first holder keeps its key: {r:?}");
    assert_eq!(echoed(&r)["x-keylimit-key"], "k");
    assert_eq!(send(sc.traffic_addr, &get("/", &[&o])).await.status, 200);
    let m = crate::common::get(&crate::common::client(), sc.admin_addr, "/metrics", &[]).await;
    let text = m.body.as_str().unwrap_or_default().to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("keylimit_config_skipped_keys") && l.ends_with(" 2")),
        "{text}"
    );
    sc.stop().await;
}

#[tokio::test]
async fn the_failed_key_budget_is_a_setting_and_zero_disables_it() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(per_minute(1_000), vec![key("k")]));
    let up = crate::common::upstream().await;
    for (per_minute, throttled_after) in [(3u32, Some(3usize)), (0, None)] {
        let sc =
            crate::common::start_with(&dir, &up, |s| s.auth_failures_per_minute = per_minute).await;
        let mut statuses = Vec::new();
        for i in 0..40 {
            let guess = format!("X-API-Key: guess-{i}-0123456789abcdef");
            statuses.push(send(sc.traffic_addr, &get("/", &[&guess])).await.status);
        }
        match throttled_after {
            Some(n) => {
                assert!(statuses[..n].iter().all(|s| *s == 401), "{statuses:?}");
                assert!(statuses[n..].iter().all(|s| *s == 429), "{statuses:?}");
            }
            None => assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}"),
        }
        sc.stop().await;
    }
}
