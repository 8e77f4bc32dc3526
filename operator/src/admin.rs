//! The operator's own HTTP endpoints: `/healthz`, `/readyz`, `/metrics`. Kept off the
//! webhook's TLS port so probes never depend on certificates.
//!
//! Usage reports carry the sidecar's ServiceAccount token, so they go to the TLS port
//! (webhook.rs); here they are refused unless `--allow-plaintext-reports` is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tracing::info;

use crate::metrics::Metrics;
use crate::reports::Reports;
use crate::Error;

#[derive(Default)]
pub struct Health {
    /// This replica can serve: webhook certificate loaded and the apiserver answered. Not
    /// leadership: every replica takes webhook calls and reports (a standby forwards
    /// reports to the leader), so rolling updates and drains see every replica Ready.
    pub ready: AtomicBool,
}

/// The answer to a report sent in plain HTTP.
pub const PLAINTEXT_REFUSED: &str = "usage reports are accepted over TLS only: send them to \
    https://<webhook service>.<namespace>.svc/v1/reports with --report-ca-file (the operator's \
    --allow-plaintext-reports accepts them here)\n";

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    req: Request<Incoming>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    reports: Arc<Reports>,
    allow_plaintext_reports: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/v1/reports" && !allow_plaintext_reports {
        // Refused before anything is read or reviewed: the token has crossed the network in
        // clear already, and answering 2xx would teach a misconfigured sidecar to keep doing so.
        return Ok(respond(
            StatusCode::GONE,
            "text/plain",
            PLAINTEXT_REFUSED.into(),
        ));
    }
    if req.uri().path() == "/v1/reports" {
        if req.method() != http::Method::POST {
            return Ok(respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "POST only\n".into(),
            ));
        }
        // Every replica takes reports: the leader records them, a standby forwards them to
        // the leader (reports.rs). Authentication comes from the headers, before the body.
        let (parts, body) = req.into_parts();
        let (status, text) = reports.handle(&parts.headers, body).await;
        return Ok(respond(status, "text/plain", text));
    }
    Ok(match req.uri().path() {
        "/healthz" | "/livez" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if health.ready.load(Ordering::Relaxed) => {
            respond(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// Binds now (so a bad address fails startup) and serves in the background.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    reports: Arc<Reports>,
    allow_plaintext_reports: bool,
) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(%local, "admin server listening");
    let config = keylimit_httpserver::ServerConfig {
        name: "operator-admin",
        // Every sidecar keeps a pooled connection here for its reports.
        max_connections: 16_384,
        ..keylimit_httpserver::ServerConfig::default()
    };
    tokio::spawn(keylimit_httpserver::serve(
        listener,
        config,
        keylimit_httpserver::tcp,
        move |_peer, req| {
            handle(
                req,
                health.clone(),
                metrics.clone(),
                reports.clone(),
                allow_plaintext_reports,
            )
        },
        std::future::pending(),
    ));
    Ok(local)
}
