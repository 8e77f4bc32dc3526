//! Cost from the response, over real HTTP: a local "LLM" upstream reports tokens in a header,
//! a JSON body or an event stream, and the sidecar charges them to limits counted in tokens.

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt as _;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keylimit_dataplane::{
    Limits, RateWindow, Unit, UsageEstimate, UsageSource, API_VERSION_METERED,
};

/// 1,000 tokens a minute, all at once: one token every 60 ms.
fn token_doc(estimate: u64) -> keylimit_dataplane::PolicyDocument {
    let mut d = doc(
        Limits {
            rates: vec![RateWindow {
                name: "per-minute-tokens".into(),
                requests: 1_000,
                period_seconds: 60,
                burst: 999,
                unit: Unit::Tokens,
            }],
            ..Limits::default()
        },
        vec![key("a"), key("b")],
    );
    d.api_version = API_VERSION_METERED.into();
    d.policy.usage = Some(UsageSource {
        header: Some("x-usage-tokens".into()),
        json_field: Some("usage.total_tokens".into()),
        estimate: Some(UsageEstimate {
            header: None,
            fixed: estimate,
            max: None,
        }),
    });
    d
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Breaks `/sse-cut`'s body.
static CUT: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// Lets `/sse-hold`'s body finish.
static HOLD: tokio::sync::Notify = tokio::sync::Notify::const_new();

fn tokens_of(req: &http::Request<Incoming>) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.strip_prefix("tokens="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `/header`, `/json`, `/sse` report `?tokens=N`; `/none` reports nothing; `/sse-cut` sends
/// one event and then breaks the connection mid-body.
async fn llm(req: http::Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let n = tokens_of(&req);
    let full = |ct: &str, s: String| {
        let mut r = Response::new(Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed());
        r.headers_mut().insert("content-type", ct.parse().unwrap());
        r
    };
    let stream = |chunks: Vec<Result<Frame<Bytes>, std::io::Error>>| {
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            chunks,
        ))));
        r.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        r
    };
    let frame = |s: &str| Ok(Frame::data(Bytes::from(s.to_string())));
    Ok(match req.uri().path() {
        "/header" => {
            let mut r = full("text/plain", "done".into());
            r.headers_mut()
                .insert("x-usage-tokens", n.to_string().parse().unwrap());
            r
        }
        "/json" => full(
            "application/json",
            format!(
                r#"{{"choices":[{{"message":{{"content":"usage.total_tokens"}}}}],"usage":{{"prompt_tokens":1,"total_tokens":{n}}}}}"#
            ),
        ),
        "/sse" => stream(vec![
            frame("data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n"),
            frame("data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n"),
            frame(&format!(
                "data: {{\"choices\":[],\"usage\":{{\"total_tokens\":{n}}}}}\n\n"
            )),
            frame("data: [DONE]\n\n"),
        ]),
        "/sse-cut" => {
            // The head and one event go out; the break waits for the test's signal, so the
            // client has the 200 before the body fails.
            let first = futures_util::stream::iter([frame(
                "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            )]);
            let cut = futures_util::stream::once(async {
                CUT.notified().await;
                Err(std::io::Error::other("the model crashed"))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(first.chain(cut))));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        "/sse-hold" => {
            let first = futures_util::stream::iter([frame("data: {\"choices\":[]}\n\n")]);
            let rest = futures_util::stream::once(async move {
                HOLD.notified().await;
                Ok(Frame::data(Bytes::from(format!(
                    "data: {{\"usage\":{{\"total_tokens\":{n}}}}}\n\n"
                ))))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(first.chain(rest))));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        _ => full("application/json", r#"{"choices":[]}"#.into()),
    })
}

async fn llm_upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(llm))
                    .await;
            });
        }
    });
    Upstream { addr }
}

async fn setup(d: keylimit_dataplane::PolicyDocument) -> (ConfigDir, keylimit_sidecar::Sidecar) {
    let mut dir = ConfigDir::new();
    dir.write_doc(&d);
    let up = llm_upstream().await;
    let sc = start(&dir, &up).await;
    (dir, sc)
}

/// Key a's request for `path`, answered with its head while the body may still be open.
async fn open_stream(c: &TestClient, a: std::net::SocketAddr, path: &str) -> Response<Incoming> {
    let req = http::Request::get(format!("http://{a}{path}"))
        .header("x-api-key", material("a"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    c.request(req).await.unwrap()
}

/// Reloads the same token policy with one more key, `c`: the token limit is unchanged.
async fn reload_with_another_key(dir: &mut ConfigDir, sc: &keylimit_sidecar::Sidecar) {
    let mut next = token_doc(0);
    next.policy.generation = 2;
    next.keys.push(key("c"));
    dir.write_doc(&next);
    sc.reload_now().await.unwrap();
    assert_eq!(sc.config.generation(), 2);
}

#[tokio::test]
async fn a_json_body_puts_the_key_in_debt_and_the_429_names_tokens() {
    let (_d, sc) = setup(token_doc(0)).await;
    let (c, a) = (client(), sc.traffic_addr);
    let r = with_key(&c, a, "/json?tokens=1500", "a").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.header("ratelimit-policy").contains("qu=\"tokens\""),
        "{:?}",
        r.headers
    );
    let r = with_key(&c, a, "/json?tokens=1", "a").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", r.body);
    assert_eq!(r.body["limit"]["unit"], "tokens");
    assert_eq!(r.body["limit"]["name"], "per-minute-tokens");
    // 500 tokens of debt plus one free token at 60 ms each: 30.06 s.
    assert_eq!(r.header("retry-after"), "31");
    assert_eq!(
        r.header("ratelimit-policy"),
        "\"per-minute-tokens\";q=1000;w=60;qu=\"tokens\""
    );
    // Another key is not affected.
    assert_eq!(
        with_key(&c, a, "/json?tokens=1", "b").await.status,
        StatusCode::OK
    );
    sc.stop().await;
}

#[tokio::test]
async fn a_header_and_an_event_stream_are_charged_when_the_response_ends() {
    let (_d, sc) = setup(token_doc(0)).await;
    let (c, a) = (client(), sc.traffic_addr);
    assert_eq!(
        with_key(&c, a, "/header?tokens=990", "a").await.status,
        StatusCode::OK
    );
    // 10 tokens left.
    let r = with_key(&c, a, "/none", "a").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining"), "10");
    let r = with_key(&c, a, "/sse?tokens=2000", "b").await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.body.as_str().unwrap_or_default().to_string();
    assert!(body.contains("[DONE]"), "the stream passes whole: {body}");
    let r = with_key(&c, a, "/none", "b").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), "61");
    sc.stop().await;
}

#[tokio::test]
async fn a_response_without_the_field_or_cut_midway_is_charged_its_estimate() {
    let (_d, sc) = setup(token_doc(100)).await;
    let (c, a) = (client(), sc.traffic_addr);
    assert_eq!(with_key(&c, a, "/none", "a").await.status, StatusCode::OK);
    // The cut stream: the client sees the body fail; the reservation stays charged.
    let resp = open_stream(&c, a, "/sse-cut").await;
    assert_eq!(resp.status(), StatusCode::OK);
    CUT.notify_one();
    assert!(
        resp.into_body().collect().await.is_err(),
        "the cut reaches the client"
    );
    // Two estimates charged, and this request's own reservation shows too.
    let r = with_key(&c, a, "/json?tokens=0", "a").await;
    assert_eq!(r.header("x-ratelimit-remaining"), "700");
    // That response reported 0: its 100 came back.
    let r = with_key(&c, a, "/json?tokens=0", "a").await;
    assert_eq!(r.header("x-ratelimit-remaining"), "700");
    sc.stop().await;
}

#[tokio::test]
async fn debt_survives_a_reload_that_keeps_the_limit() {
    let (mut dir, sc) = setup(token_doc(0)).await;
    let (c, a) = (client(), sc.traffic_addr);
    with_key(&c, a, "/header?tokens=5000", "a").await;
    assert_eq!(
        with_key(&c, a, "/none", "a").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    reload_with_another_key(&mut dir, &sc).await;
    assert_eq!(
        with_key(&c, a, "/none", "a").await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the debt is still owed"
    );
    assert_eq!(with_key(&c, a, "/none", "c").await.status, StatusCode::OK);
    sc.stop().await;
}

#[tokio::test]
async fn an_older_document_version_with_token_limits_is_refused() {
    let mut d = token_doc(0);
    d.api_version = keylimit_dataplane::API_VERSION.into();
    let bytes = serde_json::to_vec(&d).unwrap();
    let err = keylimit_dataplane::PolicyDocument::parse(&bytes).unwrap_err();
    assert!(err.to_string().contains("v3"), "{err}");
}

#[tokio::test]
async fn an_open_stream_does_not_pin_a_replaced_config_and_is_charged_under_the_new_one() {
    let (mut dir, sc) = setup(token_doc(0)).await;
    let (c, a) = (client(), sc.traffic_addr);
    let resp = open_stream(&c, a, "/sse-hold?tokens=1500").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let old = Arc::downgrade(&sc.config.current().expect("a config"));
    reload_with_another_key(&mut dir, &sc).await;
    // The replaced snapshot is freed (by the retiring thread) while the stream is still
    // open: the stream's meter does not hold it.
    eventually("the replaced config to be freed", || {
        let gone = old.upgrade().is_none();
        async move { gone }
    })
    .await;
    HOLD.notify_one();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("1500"));
    // The unchanged limit kept its id: the 1,500 tokens put the key in debt under the new
    // config.
    assert_eq!(
        with_key(&c, a, "/none", "a").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    sc.stop().await;
}

#[tokio::test]
async fn a_route_reads_its_cost_from_its_own_usage() {
    // An embeddings-style route reports `usage.prompt_tokens`; the rest of the API reports
    // `usage.total_tokens` (the policy's).
    let mut d = token_doc(0);
    d.policy.routes.push(keylimit_dataplane::Route {
        name: "embed".into(),
        path_prefix: "/json".into(),
        methods: vec![],
        cost: 1,
        limits: None,
        usage: Some(UsageSource {
            header: None,
            json_field: Some("usage.prompt_tokens".into()),
            estimate: None,
        }),
    });
    let (_d, sc) = setup(d).await;
    let (c, a) = (client(), sc.traffic_addr);
    // The body says 1 prompt token and 1,500 in total: the route's field is charged.
    assert_eq!(
        with_key(&c, a, "/json?tokens=1500", "a").await.status,
        StatusCode::OK
    );
    let r = with_key(&c, a, "/json?tokens=1500", "a").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.header("x-ratelimit-remaining"), "999");
    // Off the route, the policy's field: 2,000 tokens put key b in debt.
    with_key(&c, a, "/sse?tokens=2000", "b").await;
    assert_eq!(
        with_key(&c, a, "/none", "b").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    sc.stop().await;
}
