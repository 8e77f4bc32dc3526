//! Every limit type and every refusal over real HTTP, against a real local upstream.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keylimit_dataplane::{
    Limits, Mode, QuotaAlignment, QuotaPeriod, QuotaWindow, RateWindow, Route, Throttle,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rate(requests: u64, period_seconds: u64, burst: u64) -> Limits {
    Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "minute".into(),
            requests,
            period_seconds,
            burst,
        }],
        ..Limits::default()
    }
}

async fn setup(
    d: keylimit_dataplane::PolicyDocument,
) -> (ConfigDir, Upstream, keylimit_sidecar::Sidecar) {
    let mut dir = ConfigDir::new();
    dir.write_doc(&d);
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    (dir, up, sc)
}

#[tokio::test]
async fn authentication_failures_are_short_json_errors() {
    let mut disabled = key("off");
    disabled.disabled = true;
    let mut expired = key("old");
    expired.expires_at = Some(1_000);
    let (_d, _u, sc) = setup(doc(rate(100, 60, 100), vec![key("ok"), disabled, expired])).await;
    let c = client();
    let a = sc.traffic_addr;

    let r = get(&c, a, "/", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"], "missing_key");
    let r = get(&c, a, "/", &[("x-api-key", "random-guess")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"], "invalid_key");
    assert!(
        !r.body.to_string().contains("random-guess"),
        "never echo the key"
    );
    let r = with_key(&c, a, "/", "off").await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("key_disabled"))
    );
    let r = with_key(&c, a, "/", "old").await;
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("key_expired"))
    );
    let auth = format!("Bearer {}", material("ok"));
    let r = get(&c, a, "/", &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK);
    // Random keys never create limiter state.
    for i in 0..200 {
        get(&c, a, "/", &[("x-api-key", &format!("spray-{i}"))]).await;
    }
    assert_eq!(sc.limiter.slots(), 1);
    sc.stop().await;
}

/// The app learns the caller's address: appended to a text `X-Forwarded-For` the caller sent,
/// in place of one that is not text, and once even when the caller sent two lines.
#[tokio::test]
async fn the_app_gets_the_peer_in_x_forwarded_for() {
    let (_d, _u, sc) = setup(doc(rate(10, 60, 9), vec![key("alice")])).await;
    let c = client();
    let k = material("alice");
    let cases: [(&[&str], &str); 3] = [
        (&[], "127.0.0.1"),
        (&["203.0.113.9"], "203.0.113.9, 127.0.0.1"),
        (
            &["198.51.100.1, 203.0.113.9", "192.0.2.1"],
            "198.51.100.1, 203.0.113.9, 127.0.0.1",
        ),
    ];
    for (sent, want) in cases {
        let mut headers = vec![("x-api-key", k.as_str())];
        headers.extend(sent.iter().map(|v| ("x-forwarded-for", *v)));
        let r = get(&c, sc.traffic_addr, "/", &headers).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["x-forwarded-for"], want, "sent {sent:?}");
    }
}

/// RFC 9110 §7.6.1: the app's connection-specific fields end at the sidecar, those it names
/// in `Connection` included.
#[tokio::test]
async fn the_apps_hop_by_hop_fields_do_not_reach_the_client() {
    let (_d, _u, sc) = setup(doc(rate(10, 60, 9), vec![key("alice")])).await;
    let r = with_key(&client(), sc.traffic_addr, "/hop", "alice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-app"), "1");
    for name in ["x-private", "keep-alive"] {
        assert!(r.headers.get(name).is_none(), "{name}: {:?}", r.headers);
    }
}

#[tokio::test]
async fn allowed_requests_carry_identity_and_limit_headers_and_strip_the_key() {
    let mut d = doc(rate(10, 60, 9), vec![key("alice")]);
    d.policy.key_source.strip = true;
    let (_d, _u, sc) = setup(d).await;
    let c = client();
    let r = get(
        &c,
        sc.traffic_addr,
        "/items?x=1",
        &[
            ("x-api-key", &material("alice")),
            ("x-keylimit-key", "mallory"),
            ("connection", "x-drop"),
            ("x-drop", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body["x-keylimit-key"], "alice",
        "identity set, spoof overwritten"
    );
    assert!(r.body.get("x-api-key").is_none(), "key stripped");
    assert!(
        r.body.get("x-drop").is_none(),
        "connection-named header dropped"
    );
    assert_eq!(r.body[":uri"], "/items?x=1");
    assert_eq!(r.header("ratelimit-policy"), "\"minute\";q=10;w=60");
    assert_eq!(r.header("ratelimit"), "\"minute\";r=9;t=6");
    assert_eq!(r.header("x-ratelimit-limit"), "10");
    assert_eq!(r.header("x-ratelimit-remaining"), "9");
    assert_eq!(r.header("x-ratelimit-reset"), "6");
    sc.stop().await;
}

/// `Draft` drops the `X-RateLimit-*` fields; `OnRefusal` sends no limit headers until the key
/// is refused, and then the full set with `Retry-After`.
#[tokio::test]
async fn the_policy_chooses_which_limit_headers_responses_carry() {
    use keylimit_dataplane::LimitHeaders;
    for which in [LimitHeaders::Draft, LimitHeaders::OnRefusal] {
        let mut d = doc(rate(10, 60, 0), vec![key("alice")]);
        d.policy.response.limit_headers = which;
        let (_d, _u, sc) = setup(d).await;
        let c = client();
        let ok = with_key(&c, sc.traffic_addr, "/", "alice").await;
        assert_eq!(ok.status, StatusCode::OK);
        let limit_headers = |r: &Reply| {
            let mut names: Vec<String> = r
                .headers
                .keys()
                .map(|n| n.as_str().to_owned())
                .filter(|n| n.contains("ratelimit") || n == "retry-after")
                .collect();
            names.sort_unstable();
            names
        };
        match which {
            LimitHeaders::Draft => {
                assert_eq!(limit_headers(&ok), ["ratelimit", "ratelimit-policy"]);
                assert_eq!(ok.header("ratelimit"), "\"minute\";r=0;t=6");
            }
            _ => assert!(limit_headers(&ok).is_empty(), "{:?}", ok.headers),
        }
        let refused = with_key(&c, sc.traffic_addr, "/", "alice").await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        let want: &[&str] = match which {
            LimitHeaders::Draft => &["ratelimit", "ratelimit-policy", "retry-after"],
            _ => &[
                "ratelimit",
                "ratelimit-policy",
                "retry-after",
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ],
        };
        assert_eq!(limit_headers(&refused), want, "{which:?}");
        sc.stop().await;
    }
}

/// A key with its own limits is not in the precomputed header values: when its own limit is
/// the most restrictive, its headers name that limit, looked up per request; a key on the
/// defaults gets the policy's.
#[tokio::test]
async fn a_key_with_its_own_limits_gets_headers_naming_them() {
    let mut vip = key("vip");
    vip.overrides = Some(Limits {
        rates: vec![RateWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "vip-hour".into(),
            requests: 100,
            period_seconds: 3600,
            burst: 4,
        }],
        ..Limits::default()
    });
    let (_d, _u, sc) = setup(doc(rate(10, 60, 9), vec![key("std"), vip])).await;
    let c = client();
    let r = with_key(&c, sc.traffic_addr, "/", "vip").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("ratelimit-policy"), "\"vip-hour\";q=100;w=3600");
    assert_eq!(r.header("ratelimit"), "\"vip-hour\";r=4;t=36");
    assert_eq!(r.header("x-ratelimit-limit"), "100");
    let r = with_key(&c, sc.traffic_addr, "/", "std").await;
    assert_eq!(r.header("ratelimit-policy"), "\"minute\";q=10;w=60");
    assert_eq!(r.header("x-ratelimit-remaining"), "9");
    sc.stop().await;
}

#[tokio::test]
async fn query_parameter_key_is_opt_in_and_stripped() {
    let mut d = doc(rate(10, 60, 9), vec![key("q")]);
    d.policy.key_source.query_param = Some("api_key".into());
    d.policy.key_source.strip = true;
    let (_d, _u, sc) = setup(d).await;
    let c = client();
    let path = format!("/search?term=a+b&api_key={}&page=2", material("q"));
    let r = get(&c, sc.traffic_addr, &path, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body[":uri"], "/search?term=a+b&page=2");
    sc.stop().await;
}

#[tokio::test]
async fn rate_limit_refuses_with_429_body_and_headers() {
    let (_d, _u, sc) = setup(doc(rate(10, 60, 1), vec![key("bob")])).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            with_key(&c, sc.traffic_addr, "/", "bob").await.status,
            StatusCode::OK
        );
    }
    let r = with_key(&c, sc.traffic_addr, "/", "bob").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"], "rate_limited");
    assert_eq!(r.body["message"], "Keys Temporarily Exhausted");
    assert_eq!(r.body["limit"]["kind"], "rate");
    assert_eq!(r.body["limit"]["name"], "minute");
    assert_eq!(r.body["limit"]["limit"], 10);
    assert_eq!(r.body["limit"]["window"], 60);
    let retry = r.body["retryAfter"].as_u64().unwrap();
    assert!((1..=12).contains(&retry));
    assert_eq!(r.header("retry-after"), retry.to_string());
    assert!(r.body["resetAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r.header("ratelimit"), format!("\"minute\";r=0;t={retry}"));
    assert_eq!(r.header("x-ratelimit-remaining"), "0");

    // The admin usage report shows the exhaustion for the operator.
    let report = get(&c, sc.admin_addr, "/v1/usage", &[]).await;
    assert_eq!(report.body["policyName"], "orders");
    assert_eq!(report.body["keys"][0]["name"], "bob");
    assert_eq!(
        report.body["keys"][0]["exhaustion"]["reason"],
        "RateLimited"
    );
    assert_eq!(report.body["keys"][0]["exhaustion"]["limit"], "minute");
    sc.stop().await;
}

#[tokio::test]
async fn quota_refuses_and_reports_usage_and_custom_message() {
    let limits = Limits {
        quotas: vec![QuotaWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "daily".into(),
            requests: 3,
            period: QuotaPeriod::Day,
            alignment: QuotaAlignment::Calendar,
        }],
        ..Limits::default()
    };
    let mut d = doc(limits, vec![key("carol")]);
    d.policy.response.message = "Out of credits".into();
    let (_d, _u, sc) = setup(d).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(
            with_key(&c, sc.traffic_addr, "/", "carol").await.status,
            StatusCode::OK
        );
    }
    let r = with_key(&c, sc.traffic_addr, "/", "carol").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"], "quota_exceeded");
    assert_eq!(r.body["message"], "Out of credits");
    assert_eq!(r.body["limit"]["window"], 86_400);
    assert!(r.body["resetAt"].as_str().unwrap().ends_with("T00:00:00Z"));
    let report = get(&c, sc.admin_addr, "/v1/usage", &[]).await;
    let k = &report.body["keys"][0];
    assert_eq!(k["quotas"][0]["used"], 3);
    assert_eq!(k["quotas"][0]["limit"], 3);
    assert_eq!(k["exhaustion"]["reason"], "QuotaExceeded");
    sc.stop().await;
}

#[tokio::test]
async fn route_cost_counts_against_the_quota() {
    let limits = Limits {
        quotas: vec![QuotaWindow {
            unit: keylimit_dataplane::Unit::Requests,
            name: "daily".into(),
            requests: 10,
            period: QuotaPeriod::Day,
            alignment: QuotaAlignment::Calendar,
        }],
        ..Limits::default()
    };
    let mut d = doc(limits, vec![key("dan")]);
    d.policy.routes = vec![Route {
        usage: None,
        name: "export".into(),
        path_prefix: "/export".into(),
        methods: vec![],
        cost: 4,
        limits: None,
    }];
    let (_d, _u, sc) = setup(d).await;
    let c = client();
    let a = sc.traffic_addr;
    assert_eq!(
        with_key(&c, a, "/export/1", "dan").await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_key(&c, a, "/export/2", "dan").await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_key(&c, a, "/export/3", "dan").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        with_key(&c, a, "/cheap", "dan").await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_key(&c, a, "/cheap", "dan").await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_key(&c, a, "/cheap", "dan").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    sc.stop().await;
}

#[tokio::test]
async fn concurrency_slot_is_released_when_the_client_disconnects() {
    let limits = Limits {
        concurrency: Some(1),
        ..Limits::default()
    };
    let (_d, _u, sc) = setup(doc(limits, vec![key("erin")])).await;
    let a = sc.traffic_addr;
    // Hold one streaming response open on its own connection.
    let holder = client();
    let resp = holder
        .request(
            Request::get(format!("http://{a}/hold"))
                .header("x-api-key", material("erin"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let c = client();
    let r = with_key(&c, a, "/", "erin").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body["error"], "concurrency_limited");
    assert_eq!(r.body["limit"]["kind"], "concurrency");
    // Abort: drop the unfinished body and the client (its pooled connection closes).
    drop(resp);
    drop(holder);
    eventually("concurrency slot released", || async {
        with_key(&c, a, "/", "erin").await.status == StatusCode::OK
    })
    .await;
    sc.stop().await;
}

#[tokio::test]
async fn throttle_holds_then_forwards_within_the_bound() {
    let mut d = doc(rate(2, 1, 0), vec![key("fay")]);
    d.policy.throttle = Some(Throttle {
        max_delay_ms: 2_000,
        max_queue: 4,
    });
    let (_d, _u, sc) = setup(d).await;
    let c = client();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "fay").await.status,
        StatusCode::OK
    );
    let t = Instant::now();
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "fay").await.status,
        StatusCode::OK
    );
    let held = t.elapsed();
    assert!(held >= Duration::from_millis(400), "held {held:?}");
    assert!(held < Duration::from_millis(1_500), "held {held:?}");
    sc.stop().await;
}

#[tokio::test]
async fn dry_run_forwards_and_reports() {
    let mut d = doc(rate(1, 60, 0), vec![key("gus")]);
    d.policy.mode = Mode::DryRun;
    let (_d, _u, sc) = setup(d).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(
            with_key(&c, sc.traffic_addr, "/", "gus").await.status,
            StatusCode::OK
        );
    }
    let report = get(&c, sc.admin_addr, "/v1/usage", &[]).await;
    assert_eq!(report.body["keys"][0]["exhaustion"]["dryRun"], true);
    let metrics = get(&c, sc.admin_addr, "/metrics", &[]).await;
    let text = metrics.body.as_str().unwrap().to_string();
    assert!(
        text.contains(
            "keylimit_requests_total{policy=\"shop/orders\",decision=\"dry_run_refused\"} 2"
        ),
        "{text}"
    );
    assert!(text.contains("keylimit_exhaustions_total{reason=\"RateLimited\"} 2"));
    sc.stop().await;
}

#[tokio::test]
async fn h2c_requests_are_proxied() {
    let (_d, _u, sc) = setup(doc(rate(100, 60, 99), vec![key("h2")])).await;
    let c = h2c_client();
    let r = with_key(&c, sc.traffic_addr, "/over-h2", "h2").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body[":uri"], "/over-h2");
    assert_eq!(r.body["x-keylimit-key"], "h2");
    sc.stop().await;
}

/// Over HTTP/2 the app gets the request's `Host`, built from `:authority` when there is none; a
/// `Host` that names something else than `:authority` is malformed (RFC 9113 §8.3.1): 400.
#[tokio::test]
async fn an_h2_host_unlike_the_authority_is_400() {
    let (_d, _u, sc) = setup(doc(rate(100, 60, 99), vec![key("h2")])).await;
    let c = h2c_client();
    let addr = sc.traffic_addr;
    let send = |host: Option<String>| {
        let mut b = Request::get(format!("http://{addr}/x")).header("x-api-key", material("h2"));
        if let Some(h) = host {
            b = b.header("host", h);
        }
        c.request(b.body(Full::new(Bytes::new())).unwrap())
    };
    let r = send(Some("admin.internal".into())).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains(":authority"),
        "{body:?}"
    );
    // The same name in either case, and no Host at all, are one entity.
    let same = addr.to_string().to_uppercase();
    assert_eq!(send(Some(same)).await.unwrap().status(), StatusCode::OK);
    assert_eq!(send(None).await.unwrap().status(), StatusCode::OK);
    sc.stop().await;
}

#[tokio::test]
async fn upgrades_pass_through_both_ways() {
    // `echo` is not websocket: the policy has to declare it (see the adversarial suite).
    let mut d = doc(rate(100, 60, 99), vec![key("ws")]);
    d.policy.upgrade_protocols = vec!["echo".into()];
    let (_d, _u, sc) = setup(d).await;
    let stream = tokio::net::TcpStream::connect(sc.traffic_addr)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/upgrade")
        .header("host", "app")
        .header("x-api-key", material("ws"))
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ping over the tunnel").await.unwrap();
    let mut buf = [0u8; 20];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over the tunnel");
    sc.stop().await;
}

#[tokio::test]
async fn upstream_down_is_a_502_with_a_clear_body() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(rate(100, 60, 99), vec![key("x")]));
    // A port that is bound but not listening: connecting is refused, and no other test can
    // take the port meanwhile (one that was bound and dropped was, once, by a sidecar of a
    // test running alongside, which answered 404).
    let dead = tokio::net::TcpSocket::new_v4().unwrap();
    dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let up = Upstream {
        addr: dead.local_addr().unwrap(),
    };
    let sc = start(&dir, &up).await;
    let r = with_key(&client(), sc.traffic_addr, "/", "x").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.body["error"], "upstream_unavailable");
    sc.stop().await;
}

#[tokio::test]
async fn an_app_that_does_not_answer_in_time_is_a_504_and_traffic_goes_on() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(rate(100, 60, 99), vec![key("x")]));
    let up = upstream().await;
    let timeout = Duration::from_millis(300);
    let sc = start_with(&dir, &up, |s| s.upstream_timeout = timeout).await;
    let c = client();
    // Each stall goes out on the pooled connection `/ok` just used, its timer moved to the
    // stall's deadline; a timed-out connection is dropped, so each round starts a new one.
    for _ in 0..2 {
        assert_eq!(
            with_key(&c, sc.traffic_addr, "/ok", "x").await.status,
            StatusCode::OK
        );
        let started = Instant::now();
        let r = with_key(&c, sc.traffic_addr, "/stall", "x").await;
        let waited = started.elapsed();
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.body["error"], "upstream_timeout");
        assert!(
            waited >= timeout && waited < Duration::from_secs(5),
            "answered after {waited:?}"
        );
    }
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/ok", "x").await.status,
        StatusCode::OK
    );
    sc.stop().await;
}

/// An upstream timeout too large to add to an instant is no timeout, not a panic.
#[tokio::test]
async fn an_upstream_timeout_past_the_end_of_time_still_forwards() {
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(rate(100, 60, 99), vec![key("x")]));
    let up = upstream().await;
    let sc = start_with(&dir, &up, |s| s.upstream_timeout = Duration::MAX).await;
    let r = with_key(&client(), sc.traffic_addr, "/ok", "x").await;
    assert_eq!(r.status, StatusCode::OK);
    sc.stop().await;
}

#[tokio::test]
async fn before_the_first_config_it_fails_closed_and_is_not_ready() {
    let mut dir = ConfigDir::new();
    let up = upstream().await;
    let sc = start(&dir, &up).await;
    let c = client();
    let r = with_key(&c, sc.traffic_addr, "/", "k").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body["error"], "not_ready");
    assert_eq!(
        get(&c, sc.admin_addr, "/readyz", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        get(&c, sc.admin_addr, "/healthz", &[]).await.status,
        StatusCode::OK
    );
    dir.write_doc(&doc(rate(100, 60, 99), vec![key("k")]));
    sc.reload_now().await.unwrap();
    assert_eq!(
        get(&c, sc.admin_addr, "/readyz", &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        with_key(&c, sc.traffic_addr, "/", "k").await.status,
        StatusCode::OK
    );
    sc.stop().await;

    let open = start_with(&ConfigDir::new(), &up, |s| s.fail_open_before_config = true).await;
    let r = get(&c, open.traffic_addr, "/", &[("x-keylimit-key", "spoof")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.get("x-keylimit-key").is_none());
    open.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let (_d, _u, sc) = setup(doc(rate(100, 60, 99), vec![key("z")])).await;
    let c = client();
    let a = sc.traffic_addr;
    // A request whose body is still streaming when shutdown starts.
    let resp = c
        .request(
            Request::post(format!("http://{a}/upload"))
                .header("x-api-key", material("z"))
                .body(Full::new(Bytes::from(vec![7u8; 256 * 1024])))
                .unwrap(),
        )
        .await
        .unwrap();
    let stop = tokio::spawn(sc.stop());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen[":body-len"], "262144");
    stop.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(a).await.is_err(),
        "listener closed"
    );
}
