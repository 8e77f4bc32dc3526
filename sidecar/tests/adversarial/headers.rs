//! Header games: hop-by-hop tricks against the identity header, forged identities, upgrades
//! and CONNECT (issue 11, items 2 and 7).

use crate::common::{doc, key, material};
use crate::raw::{get, send, send_all, send_head};
use crate::{echoed, per_minute, setup};

fn key_header() -> String {
    format!("X-API-Key: {}", material("k"))
}

#[tokio::test]
async fn a_client_cannot_remove_or_forge_the_identity_header() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let h = key_header();
    for extra in [
        vec!["Connection: x-keylimit-key"],
        vec!["Connection: keep-alive, X-KeyLimit-Key"],
        vec!["Connection: x-keylimit-key", "X-KeyLimit-Key: admin"],
        vec!["X-KeyLimit-Key: admin"],
        vec!["x-keylimit-key: admin", "X-KeyLimit-Key: root"],
    ] {
        let mut headers: Vec<&str> = vec![&h];
        headers.extend(extra.iter().copied());
        let r = send(sc.traffic_addr, &get("/", &headers)).await;
        assert_eq!(r.status, 200, "{extra:?}: {r:?}");
        assert_eq!(
            echoed(&r)["x-keylimit-key"],
            "k",
            "{extra:?}: the app must see exactly the authenticated key's name"
        );
    }
    sc.stop().await;
}

/// With the identity under another name, a forged header under the default name is removed
/// too: the app may still read the default name.
#[tokio::test]
async fn a_forged_identity_under_the_default_name_is_removed_when_another_name_is_set() {
    let mut d = doc(per_minute(1_000), vec![key("k")]);
    d.policy.key_source.identity_header = "x-consumer".into();
    let (_d, _u, sc) = setup(d).await;
    let h = key_header();
    let r = send(
        sc.traffic_addr,
        &get("/", &[&h, "X-KeyLimit-Key: admin", "X-Consumer: root"]),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = echoed(&r);
    assert_eq!(seen["x-consumer"], "k", "{seen}");
    assert!(seen.get("x-keylimit-key").is_none(), "{seen}");
    sc.stop().await;
}

/// Heads hyper accepts and a proxy must not forward: two `Host` lines (the sidecar and the app
/// could each take another), an HTTP/1.1 request with none, and a lower-case method, which some
/// frameworks upper-case after the route matcher has failed to match it. Each is a 400 and the
/// app never sees it; HTTP/1.0 without `Host` and the upper-case method still go through.
#[tokio::test]
async fn duplicate_or_missing_hosts_and_lower_case_methods_are_400() {
    let mut d = doc(per_minute(1_000), vec![key("k")]);
    // A route whose own limit a lower-case `get` would otherwise skip.
    d.policy.routes = vec![keylimit_dataplane::Route {
        name: "search".into(),
        path_prefix: "/search".into(),
        methods: vec!["GET".into()],
        cost: 1,
        limits: Some(per_minute(1)),
        usage: None,
    }];
    let (_d, _u, sc) = setup(d).await;
    let h = key_header();
    let refused = [
        format!("GET / HTTP/1.1\r\nHost: app\r\nHost: admin.internal\r\n{h}\r\nConnection: close\r\n\r\n"),
        format!("GET / HTTP/1.1\r\n{h}\r\nConnection: close\r\n\r\n"),
        format!("get /search HTTP/1.1\r\nHost: app\r\n{h}\r\nConnection: close\r\n\r\n"),
    ];
    for request in &refused {
        let r = send(sc.traffic_addr, request.as_bytes()).await;
        assert_eq!(r.status, 400, "{request:?}: {r:?}");
        assert!(r.body.contains("bad_request"), "{r:?}");
    }
    let r = send(
        sc.traffic_addr,
        format!("GET / HTTP/1.0\r\n{h}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "HTTP/1.0 needs no Host: {r:?}");
    // The route's limit of one a minute holds for the method in any spelling.
    let search = get("/search", &[&h]);
    assert_eq!(send(sc.traffic_addr, &search).await.status, 200);
    assert_eq!(send(sc.traffic_addr, &search).await.status, 429);
    sc.stop().await;
}

/// An absolute-form target names the host: the app gets it as `Host`, never the client's own
/// `Host` line (RFC 9112 §3.2.2), and never the target's userinfo; the request still goes to
/// the one upstream, in origin form.
#[tokio::test]
async fn an_absolute_form_target_replaces_the_clients_host() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let h = key_header();
    for (target, want) in [
        ("http://app.example/x?q=1", "app.example"),
        ("http://user:pw@app.example:8080/x?q=1", "app.example:8080"),
    ] {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: admin.internal\r\n{h}\r\nConnection: close\r\n\r\n"
        );
        let r = send(sc.traffic_addr, request.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
        let seen = echoed(&r);
        assert_eq!(seen["host"], want, "{seen}");
        assert_eq!(seen[":uri"], "/x?q=1", "{seen}");
    }
    sc.stop().await;
}

/// Request smuggling: framing a front end and a back end could read differently. Whatever the
/// sidecar accepts reaches the app framed one way only (never `Content-Length` together with
/// `Transfer-Encoding`), a request hidden after a body is never forwarded unchecked (it has no
/// key: a 401 at most), and the pooled connection to the app stays in step: the next client's
/// request gets its own answer, not the answer to a hidden one.
#[tokio::test]
async fn smuggled_requests_never_reach_the_app_and_never_desync_its_connection() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let h = key_header();
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
    let cases = [
        ("CL.TE", format!("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}")),
        ("TE.CL", format!("Transfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n5\r\nhello\r\n0\r\n\r\n{hidden}")),
        ("two lengths", format!("Content-Length: 5\r\nContent-Length: 40\r\n\r\nhello{hidden}")),
        ("TE with a space", format!("Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello{hidden}")),
        ("TE xchunked", format!("Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello{hidden}")),
        ("chunk extension", format!("Transfer-Encoding: chunked\r\n\r\n5;a=\"0\r\n\r\n\"\r\nhello\r\n0\r\n\r\n{hidden}")),
        ("length with a sign", format!("Content-Length: +5\r\n\r\nhello{hidden}")),
    ];
    for (name, rest) in &cases {
        let request = format!("POST / HTTP/1.1\r\nHost: app\r\n{h}\r\n{rest}");
        let answers = send_all(sc.traffic_addr, request.as_bytes()).await;
        assert!(!answers.is_empty(), "{name}: no answer");
        for r in &answers {
            match r.status {
                400 | 401 | 501 => {}
                200 => {
                    let seen = echoed(r);
                    assert_eq!(seen[":uri"], "/", "{name}: {seen}");
                    assert!(
                        seen.get("content-length").is_none()
                            || seen.get("transfer-encoding").is_none(),
                        "{name}: the app got both framings: {seen}"
                    );
                }
                s => panic!("{name}: status {s}: {r:?}"),
            }
        }
        let probe = send(sc.traffic_addr, &get("/probe", &[&h])).await;
        assert_eq!(probe.status, 200, "{name}: {probe:?}");
        assert_eq!(
            echoed(&probe)[":uri"],
            "/probe",
            "{name}: the app's connection is out of step"
        );
    }
    sc.stop().await;
}

/// A body in a transfer coding besides `chunked` is answered 501 and never forwarded: hyper
/// takes off the chunks and `Transfer-Encoding` is hop-by-hop, so the app would get gzip bytes
/// with nothing saying so. The connection ends there, so a request hidden after the body is
/// never read. Plain `chunked` still goes through, body intact.
#[tokio::test]
async fn a_body_in_another_transfer_coding_is_501_and_the_connection_ends() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let h = key_header();
    for coding in ["gzip, chunked", "deflate,chunked", "chunked, chunked"] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: app\r\n{h}\r\nTransfer-Encoding: {coding}\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n{h}\r\n\r\n"
        );
        let r = send(sc.traffic_addr, request.as_bytes()).await;
        assert_eq!(r.status, 501, "{coding}: {r:?}");
        assert!(r.body.contains("unsupported_transfer_coding"), "{r:?}");
        assert!(
            !r.body.contains("HTTP/1.1"),
            "{coding}: a second answer: {r:?}"
        );
    }
    let request = format!(
        "POST / HTTP/1.1\r\nHost: app\r\n{h}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let r = send(sc.traffic_addr, request.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(echoed(&r)[":body-len"], "5");
    sc.stop().await;
}

#[tokio::test]
async fn connection_named_headers_never_reach_the_app() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let h = key_header();
    let r = send(
        sc.traffic_addr,
        &get(
            "/",
            &[
                &h,
                "Connection: x-internal",
                "X-Internal: 1",
                "Keep-Alive: 5",
            ],
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = echoed(&r);
    assert!(seen.get("x-internal").is_none(), "{seen}");
    assert!(seen.get("keep-alive").is_none(), "{seen}");
    sc.stop().await;
}

#[tokio::test]
async fn only_websocket_upgrades_become_tunnels() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let h = key_header();
    // The app would switch protocols on `/upgrade` whatever was asked: an upgrade the policy
    // does not allow is dropped, and an unrequested 101 is a 502, never a tunnel.
    for proto in ["evil-tunnel", "h2c", "websocket, evil"] {
        let up = format!("Upgrade: {proto}");
        let r = send(
            sc.traffic_addr,
            &get("/upgrade", &[&h, "Connection: Upgrade", &up]),
        )
        .await;
        assert_eq!(r.status, 502, "{proto}: {r:?}");
        // On a plain path the request is served without the upgrade headers.
        let r = send(
            sc.traffic_addr,
            &get("/", &[&h, "Connection: Upgrade", &up]),
        )
        .await;
        assert_eq!(r.status, 200, "{proto}: {r:?}");
        assert!(echoed(&r).get("upgrade").is_none(), "{proto}: {r:?}");
    }
    // websocket still works end to end.
    let r = send_head(
        sc.traffic_addr,
        &get(
            "/upgrade",
            &[&h, "Connection: Upgrade", "Upgrade: websocket"],
        ),
    )
    .await;
    assert_eq!(r.status, 101, "{r:?}");
    sc.stop().await;
}

#[tokio::test]
async fn policy_declared_upgrade_protocols_are_allowed() {
    let mut d = doc(per_minute(1_000), vec![key("k")]);
    d.policy.upgrade_protocols = vec!["echo".into()];
    let (_d, _u, sc) = setup(d).await;
    let h = key_header();
    let r = send_head(
        sc.traffic_addr,
        &get("/upgrade", &[&h, "Connection: Upgrade", "Upgrade: echo"]),
    )
    .await;
    assert_eq!(r.status, 101, "{r:?}");
    sc.stop().await;
}

#[tokio::test]
async fn connect_is_refused_not_forwarded() {
    let (_d, _u, sc) = setup(doc(per_minute(1_000), vec![key("k")])).await;
    let req = format!(
        "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n{}\r\nConnection: close\r\n\r\n",
        key_header()
    );
    let r = send(sc.traffic_addr, req.as_bytes()).await;
    assert_eq!(r.status, 405, "{r:?}");
    assert!(r.header("allow").is_some(), "{r:?}");
    sc.stop().await;
}
