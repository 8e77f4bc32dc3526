//! Pushes this sidecar's usage report to the operator, which turns it into `Exhausted`
//! conditions on ApiKeys.
//!
//! Push, not pull: the operator then needs no route to every pod, and the workload needs no
//! RBAC. The request carries the pod's projected ServiceAccount token (audience `keylimit`),
//! re-read on every push because kubelet rotates it; the operator checks it with a
//! TokenReview. A report is sent every interval, and at once when a key becomes exhausted, so
//! `kubectl get apikeys` shows it within seconds of the first 429.
//!
//! The token must not cross the network in clear: reports go to an `https` URL, and the
//! operator's certificate is verified (chain and name) against the CA file only
//! (`--report-ca-file`, the `keylimit-ca` ConfigMap the webhook mounts), never the system's
//! roots. The file is re-read before every report; when its content changed (kubelet updates
//! the ConfigMap during a CA rotation) the client is rebuilt, so new connections trust the new
//! bundle and pooled ones, verified under the old, are dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::config::ConfigStore;
use crate::http::admin::usage_report;
use crate::limiter::local::Limiter;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ReportSettings {
    /// `https://<operator webhook service>.<namespace>.svc/v1/reports`
    pub url: http::Uri,
    pub token_file: Option<PathBuf>,
    pub interval: Duration,
    /// PEM CA bundle the operator's certificate must chain to; required for `https`.
    pub ca_file: Option<PathBuf>,
}

/// A TLS client config trusting exactly the certificates of `pem` (ring provider).
pub fn tls_config(pem: &[u8]) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| format!("CA bundle: {e}"))?;
        roots.add(c).map_err(|e| format!("CA bundle: {e}"))?;
    }
    if roots.is_empty() {
        return Err("CA bundle holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

type TlsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The report client over TLS, rebuilt whenever the CA file's content changes.
pub struct TlsTransport {
    ca_file: PathBuf,
    current: Option<(Vec<u8>, TlsClient)>,
}

impl TlsTransport {
    pub fn new(ca_file: &Path) -> Self {
        Self {
            ca_file: ca_file.to_path_buf(),
            current: None,
        }
    }

    /// The client for the CA file as it is now.
    pub async fn client(&mut self) -> Result<TlsClient, String> {
        let pem = tokio::fs::read(&self.ca_file)
            .await
            .map_err(|e| format!("reading CA {}: {e}", self.ca_file.display()))?;
        if let Some((have, client)) = &self.current {
            if *have == pem {
                return Ok(client.clone());
            }
        }
        let config = tls_config(&pem).map_err(|e| format!("{}: {e}", self.ca_file.display()))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        let client: TlsClient = Client::builder(TokioExecutor::new()).build(connector);
        if self.current.is_some() {
            tracing::info!(ca = %self.ca_file.display(), "report CA bundle changed; reconnecting");
        }
        self.current = Some((pem, client.clone()));
        Ok(client)
    }
}

/// How reports travel: TLS with a CA file, or plain HTTP (development and tests only: the
/// operator refuses it unless started with `--allow-plaintext-reports`).
pub enum Transport {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(TlsTransport),
}

impl Transport {
    pub fn new(settings: &ReportSettings) -> Self {
        match &settings.ca_file {
            Some(ca) => Self::Tls(TlsTransport::new(ca)),
            None => Self::Plain(Client::builder(TokioExecutor::new()).build_http()),
        }
    }

    pub async fn send(
        &mut self,
        settings: &ReportSettings,
        report: &keylimit_dataplane::UsageReport,
    ) -> Result<(), String> {
        match self {
            Self::Plain(c) => send(c, settings, report).await,
            Self::Tls(t) => {
                let c = t.client().await?;
                send(&c, settings, report).await
            }
        }
    }
}

/// Runs until `shutdown` flips, then sends one last report so the operator sees the final state.
pub async fn report_loop(
    settings: ReportSettings,
    sidecar_name: String,
    config: Arc<ConfigStore>,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut transport = Transport::new(&settings);
    let mut tick = tokio::time::interval(settings.interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Checking for a new exhaustion is cheap (a counter); it is what makes status fast.
    let mut fast = tokio::time::interval(Duration::from_secs(1));
    let mut last_exhaustions = metrics.exhaustions_seen();
    let mut last_stale = config.failure().is_some();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = fast.tick() => {
                // A config going stale (or recovering) is news as well.
                let now = metrics.exhaustions_seen();
                if now == last_exhaustions && config.failure().is_some() == last_stale {
                    continue;
                }
            }
            _ = shutdown.changed() => return,
        }
        last_exhaustions = metrics.exhaustions_seen();
        // With no config ever loaded there is no policy to attach a report to.
        let Some(snap) = config.current() else {
            continue;
        };
        let failure = config.failure();
        last_stale = failure.is_some();
        let report = usage_report(&sidecar_name, Some(&snap), failure, &limiter);
        let result = transport.send(&settings, &report).await;
        metrics.report(result.is_ok());
        if let Err(e) = result {
            tracing::warn!(error = %e, url = %settings.url, "usage report not delivered");
        }
    }
}

async fn send<C>(
    client: &Client<C, Full<Bytes>>,
    settings: &ReportSettings,
    report: &keylimit_dataplane::UsageReport,
) -> Result<(), String>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let body = serde_json::to_vec(report).map_err(|e| e.to_string())?;
    let mut req = http::Request::post(settings.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(path) = &settings.token_file {
        let token = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("reading token {}: {e}", path.display()))?;
        req = req.header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "operator did not answer within 5s".to_string())?
        .map_err(error_chain)?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("operator answered {}", resp.status()))
    }
}

/// hyper's client error says only "client error (Connect)"; the cause (e.g. the certificate
/// verification failure) is further down the chain.
fn error_chain(e: impl std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A CA (PEM) and a leaf it signed for `name` (cert PEM, key PEM).
    fn ca_and_leaf(name: &str) -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca_cert.pem(), leaf.pem(), key.serialize_pem())
    }

    /// A real TLS server answering 204 to everything, counting the requests that got through.
    async fn tls_server(cert_pem: &str, key_pem: &str) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, h) = (acceptor.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        async {
                            let mut r = http::Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = http::StatusCode::NO_CONTENT;
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (addr, hits)
    }

    fn settings(url: String, ca: &Path) -> ReportSettings {
        ReportSettings {
            url: url.parse().unwrap(),
            token_file: None,
            interval: Duration::from_secs(1),
            ca_file: Some(ca.to_path_buf()),
        }
    }

    fn report() -> keylimit_dataplane::UsageReport {
        keylimit_dataplane::UsageReport::default()
    }

    #[test]
    fn an_empty_or_garbage_bundle_is_refused() {
        assert!(tls_config(b"").is_err());
        assert!(tls_config(b"not a certificate").is_err());
        let (ca, _, _) = ca_and_leaf("op.test");
        assert!(tls_config(ca.as_bytes()).is_ok());
    }

    /// Verified against the CA file only, name included, and the file is re-read: a rotated
    /// bundle is trusted from the next report on, without a restart.
    #[tokio::test]
    async fn verifies_against_the_ca_file_and_follows_its_changes() {
        let (ca, leaf, key) = ca_and_leaf("localhost");
        let (other_ca, _, _) = ca_and_leaf("localhost");
        let (addr, hits) = tls_server(&leaf, &key).await;
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, &other_ca).unwrap();
        let s = settings(
            format!("https://localhost:{}/v1/reports", addr.port()),
            &ca_file,
        );
        let mut t = Transport::new(&s);

        let e = t.send(&s, &report()).await.unwrap_err();
        assert!(e.contains("certificate"), "{e}");
        assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the server");

        // The bundle during a rotation: the other CA and the server's.
        std::fs::write(&ca_file, format!("{other_ca}{ca}")).unwrap();
        t.send(&s, &report()).await.unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        // The right CA, the wrong name: refused.
        let wrong = settings(
            format!("https://127.0.0.1:{}/v1/reports", addr.port()),
            &ca_file,
        );
        let e = Transport::new(&wrong)
            .send(&wrong, &report())
            .await
            .unwrap_err();
        assert!(e.contains("certificate"), "{e}");
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        // The CA file gone: no report, and an error that names the file.
        std::fs::remove_file(&ca_file).unwrap();
        let e = t.send(&s, &report()).await.unwrap_err();
        assert!(e.contains("ca.crt"), "{e}");
    }
}
