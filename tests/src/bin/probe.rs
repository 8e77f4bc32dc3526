//! `keylimit-probe`: the HTTP client the kind tier runs inside the cluster (`kubectl exec`
//! into a client pod), so requests take the real path: Service → kube-proxy → sidecar → app.
//! It prints one JSON line, which the test parses:
//! - one request (default): `{"status", "headers", "body"}`, or `{"error"}`;
//! - `--count N` or `--duration-s S`: a fresh connection per request, like a client behind a
//!   load balancer, and `{"total", "status": {"200": n, ...}, "errors", "error_samples"}`;
//! - `--until-header NAME --contains TEXT`: polls until a response's header contains the text
//!   and prints `{"elapsed_ms", "polls"}` (how long a change took to reach enforcement).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    url: String,
    /// A request header, `Name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    #[arg(long)]
    count: Option<u64>,
    #[arg(long)]
    duration_s: Option<u64>,
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    #[arg(long)]
    until_header: Option<String>,
    #[arg(long, default_value = "")]
    contains: String,
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn once(client: &HttpClient, args: &Args) -> anyhow::Result<Answer> {
    let mut req = http::Request::get(args.url.as_str());
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("header {h:?} is not Name: value"))?;
        req = req.header(k.trim(), v.trim());
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Empty::new())?),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no response within 10s"))??;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into(),
    })
}

async fn run(args: Args) -> Value {
    // No idle connections kept: every request opens its own, as separate clients would.
    let fresh: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    if let Some(name) = &args.until_header {
        let start = Instant::now();
        let mut polls = 0u64;
        while start.elapsed() < Duration::from_secs(args.timeout_s) {
            polls += 1;
            if let Ok(a) = once(&fresh, &args).await {
                if a.headers
                    .get(&name.to_ascii_lowercase())
                    .is_some_and(|v| v.contains(&args.contains))
                {
                    return json!({"elapsed_ms": start.elapsed().as_millis() as u64, "polls": polls});
                }
            }
            tokio::time::sleep(Duration::from_millis(args.interval_ms.max(20))).await;
        }
        return json!({"timeout": true, "polls": polls});
    }
    if args.count.is_none() && args.duration_s.is_none() {
        return match once(&fresh, &args).await {
            Ok(a) => json!({"status": a.status, "headers": a.headers, "body": a.body}),
            Err(e) => json!({"error": format!("{e:#}")}),
        };
    }
    let start = Instant::now();
    let (mut total, mut errors) = (0u64, 0u64);
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples: Vec<String> = vec![];
    loop {
        if args.count.is_some_and(|n| total >= n)
            || args
                .duration_s
                .is_some_and(|s| start.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
        total += 1;
        match once(&fresh, &args).await {
            Ok(a) => *by_status.entry(a.status.to_string()).or_default() += 1,
            Err(e) => {
                errors += 1;
                if samples.len() < 5 {
                    samples.push(format!("{e:#}"));
                }
            }
        }
        if args.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
    }
    json!({"total": total, "status": by_status, "errors": errors, "error_samples": samples})
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let out = run(Args::parse()).await;
    println!("{out}");
}
