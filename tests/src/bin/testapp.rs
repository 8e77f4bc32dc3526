//! `keylimit-testapp`: the workload the kind tier deploys behind the sidecar (our own, so no
//! image has to be pulled). Every request gets 200 and a JSON echo of what arrived,
//! `{"method", "path", "query", "headers": {name: value}, "body_bytes", "pod"}`, so a test sees the
//! identity header the sidecar added and that the API key was stripped. `/healthz` answers 200
//! `ok`. SIGTERM or SIGINT stops accepting and drains in-flight requests (up to
//! `--drain-timeout-s`) before exiting 0, so a rolling restart loses nothing on our side.
//! Needs no writable filesystem and runs as any user.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// Request bodies beyond this are refused (413): the echo only counts bytes.
const MAX_BODY: usize = 1 << 20;

#[derive(Parser)]
#[command(about = "HTTP echo app for the keylimit kind tier")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    #[arg(long, default_value_t = 25)]
    drain_timeout_s: u64,
}

fn reply(
    status: http::StatusCode,
    content_type: &str,
    body: Vec<u8>,
) -> http::Response<Full<Bytes>> {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

async fn handle(req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/healthz" {
        return Ok(reply(http::StatusCode::OK, "text/plain", b"ok\n".to_vec()));
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    // Repeated headers are joined with ", " as HTTP allows; names arrive lower-cased.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value)
            })
            .or_insert(value);
    }
    // Read the body so the connection stays reusable; only its size is echoed.
    let body_bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => {
            return Ok(reply(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                b"body too large or broken\n".to_vec(),
            ))
        }
    };
    let echo = json!({
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body_bytes": body_bytes,
        // Which replica answered (the Deployment passes the pod name in POD_NAME), so a test
        // can tell that traffic through a Service was spread.
        "pod": std::env::var("POD_NAME").unwrap_or_default(),
    });
    let mut body = echo.to_string().into_bytes();
    body.push(b'\n');
    Ok(reply(http::StatusCode::OK, "application/json", body))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("keylimit-testapp listening on {}", listener.local_addr()?);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Per-connection errors (e.g. the peer reset) must not stop the app.
                        eprintln!("accept: {e}");
                        continue;
                    }
                };
                let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(handle))
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(listener);
    eprintln!("keylimit-testapp: signal received, draining");
    match tokio::time::timeout(
        Duration::from_secs(args.drain_timeout_s),
        graceful.shutdown(),
    )
    .await
    {
        Ok(()) => eprintln!("keylimit-testapp: drained, exiting"),
        Err(_) => eprintln!("keylimit-testapp: drain timed out, exiting"),
    }
    Ok(())
}
