//! The keylimit operator: reconciles `ApiKey`s and `RateLimitPolicy`s into data-plane
//! ConfigMaps and reports status back.
#![forbid(unsafe_code)]

pub mod admin;
pub mod certs;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod exhaustion;
pub mod index;
pub mod key_secret;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod reports;
pub mod throttle;
pub mod trust;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::InferConfigError),
    #[error("rendering the data-plane config: {0}")]
    Render(#[from] render::RenderError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("yaml: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("leader lease lost")]
    LeaseLost,
    #[error("{0}")]
    Config(String),
    #[error("webhook certificate: {0}")]
    Certificate(String),
}

/// Server-side apply as `manager`, taking over fields another manager holds.
///
/// `fieldValidation=Ignore`: with the apiserver's default (`Warn`) every apply body is decoded
/// twice, once to apply it and once more, strictly, only to find duplicate or unknown fields
/// and turn them into warnings, which nothing here reads. Every body is built by this crate
/// (typed values or `json!`), never copied from user input, and the schema still prunes and
/// validates what is stored. Status writes are most of the apiserver's work in a cold start
/// (`docs/operator-scale.md`).
pub fn apply_params(manager: &str) -> kube::api::PatchParams {
    kube::api::PatchParams::apply(manager)
        .force()
        .validation_ignore()
}

#[derive(Parser, Debug)]
#[command(
    name = "keylimit-operator",
    version,
    about = "keylimit: API-key limits on Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers.
    Run(RunArgs),
    /// Write the CRD manifests (generated from the Rust types) into a directory.
    Crd {
        #[arg(long, default_value = "crds")]
        out: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "KEYLIMIT_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Namespace of the leader-election Lease (defaults to the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "keylimit-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "keylimit-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (defaults to the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, default_value_t = 15)]
    pub lease_seconds: u64,
    /// After SIGTERM, keep answering the webhook and reports for this long (seconds) while the
    /// Service stops routing here. The lease is given up at once, so failover is not delayed.
    #[arg(long, default_value_t = 8)]
    pub shutdown_delay_seconds: u64,
    /// Skip leader election (a single replica, e.g. local development).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Watch only this namespace (namespace-scoped install); all namespaces when unset.
    #[arg(long, env = "KEYLIMIT_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "KEYLIMIT_LOG_JSON")]
    pub log_json: bool,
    /// Sidecars (distinct pods) whose reports are kept per namespace; a new pod beyond it is
    /// refused (429) until others go stale, so one namespace cannot fill the leader's memory.
    #[arg(long, default_value_t = 1000)]
    pub max_sidecars_per_namespace: usize,
    /// Also accept usage reports in plain HTTP on the admin address. Off by default: reports
    /// carry ServiceAccount tokens, and go to the webhook's TLS address instead.
    #[arg(long)]
    pub allow_plaintext_reports: bool,
    /// Client-side limit on apiserver requests per second (watches and the leader Lease are
    /// not counted); 0 turns it off. Sized so a cold start over 100k ApiKeys (about two
    /// writes each) finishes in minutes while a shared apiserver still sees a ceiling.
    #[arg(long, default_value_t = 1000.0)]
    pub kube_api_qps: f64,
    /// Requests allowed at once above the QPS rate.
    #[arg(long, default_value_t = 2000)]
    pub kube_api_burst: u32,
    /// Apiserver requests in flight at once (watches aside). kube's client uses HTTP/1.1, one
    /// connection per concurrent request: this bounds the connections to the apiserver. Not
    /// exactly: hyper's pool finishes a connect it started even when an idle connection
    /// served the request first, so the pool drifts above this (66 open at 100k keys with 40);
    /// 32 keeps that under 64.
    #[arg(long, default_value_t = 32)]
    pub kube_api_max_in_flight: usize,
    /// ApiKey reconciles at once.
    #[arg(long, default_value_t = 32)]
    pub apikey_concurrency: u16,
    /// RateLimitPolicy reconciles (renders) at once.
    #[arg(long, default_value_t = 2)]
    pub policy_concurrency: u16,
    /// A policy re-renders once its keys stopped changing for this many milliseconds...
    #[arg(long, default_value_t = 500)]
    pub render_quiet_ms: u64,
    /// ...or this many milliseconds after the first change it has not rendered yet; for a
    /// big policy, 0.5 ms per key if that is longer (at most 60 s), so renders stay a fixed
    /// share of a long burst's work.
    #[arg(long, default_value_t = 10000)]
    pub render_max_delay_ms: u64,
    /// Boxed: the webhook's many flags would make `Command::Run` far larger than `Crd`.
    #[command(flatten)]
    pub webhook: Box<WebhookArgs>,
}

/// The sidecar-injecting admission webhook (operator/src/webhook.rs, certs.rs).
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Serve the webhook (TLS) here; no webhook when unset.
    #[arg(long, env = "KEYLIMIT_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// The webhook's Service; its `<name>.<namespace>.svc` names go into the certificate.
    #[arg(long, default_value = "keylimit-webhook")]
    pub webhook_service: String,
    /// The operator's own namespace: the Service's and the certificate Secret's.
    #[arg(long, env = "POD_NAMESPACE", default_value = "keylimit-system")]
    pub webhook_namespace: String,
    /// MutatingWebhookConfiguration whose caBundle the operator keeps current; unset: leave
    /// it alone (cert-manager's CA injector, or a caBundle managed by hand).
    #[arg(long)]
    pub webhook_config_name: Option<String>,
    /// Secret (in --webhook-namespace) holding the generated CA and serving certificate.
    #[arg(long, default_value = "keylimit-webhook-cert")]
    pub webhook_cert_secret: String,
    #[arg(long, default_value_t = 365)]
    pub webhook_cert_validity_days: u64,
    /// Read tls.crt/tls.key from this directory (e.g. a cert-manager Secret) instead of
    /// generating a certificate; the caBundle is then not patched.
    #[arg(long)]
    pub webhook_cert_dir: Option<PathBuf>,
    /// More names (DNS or IP) for the generated certificate, e.g. 127.0.0.1 for a webhook
    /// registered by URL during development.
    #[arg(long, value_delimiter = ',')]
    pub webhook_extra_san: Vec<String>,
    #[command(flatten)]
    pub sidecar: webhook::SidecarSettings,
}

impl WebhookArgs {
    /// The serving certificate's names: the Service's in-cluster DNS names plus extras.
    pub fn cert_names(&self) -> Vec<String> {
        let (svc, ns) = (&self.webhook_service, &self.webhook_namespace);
        let mut names = vec![
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
            format!("{svc}.{ns}"),
        ];
        names.extend(self.webhook_extra_san.iter().cloned());
        names
    }

    /// The name sidecars and standbys verify the report endpoint's certificate as.
    pub fn report_server_name(&self) -> String {
        format!("{}.{}.svc", self.webhook_service, self.webhook_namespace)
    }

    /// Starts the webhook (and the TLS report endpoint) if configured, serving the
    /// certificate `store` is kept filled with. Runs on every replica, before leader
    /// election: admission is stateless and reports are forwarded, so standbys answer too.
    pub async fn start(
        &self,
        client: &kube::Client,
        store: Arc<certs::CertStore>,
        reports: Option<Arc<reports::Reports>>,
    ) -> Result<Option<SocketAddr>, Error> {
        let Some(addr) = self.webhook_addr else {
            return Ok(None);
        };
        let source = match &self.webhook_cert_dir {
            Some(dir) => certs::Source::Directory(dir.clone()),
            None => certs::Source::Generated {
                client: client.clone(),
                namespace: self.webhook_namespace.clone(),
                secret: self.webhook_cert_secret.clone(),
                webhook_config: self.webhook_config_name.clone(),
                names: self.cert_names(),
                validity: Duration::from_secs(self.webhook_cert_validity_days.max(1) * 86400),
            },
        };
        certs::start(source, store.clone()).await?;
        Ok(Some(
            webhook::serve(
                addr,
                store,
                self.sidecar.clone(),
                Some(client.clone()),
                reports,
            )
            .await?,
        ))
    }
}

pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// The CRDs as YAML, one document per file name.
pub fn crd_manifests() -> Result<Vec<(String, String)>, Error> {
    let mut out = vec![];
    for (file, crd) in [
        (
            "keylimit.dev_apikeys.yaml",
            serde_json::to_value(crd::ApiKey::crd())?,
        ),
        (
            "keylimit.dev_ratelimitpolicies.yaml",
            serde_json::to_value(crd::RateLimitPolicy::crd())?,
        ),
    ] {
        let mut crd = crd;
        strip_unsigned_formats(&mut crd);
        out.push((file.to_string(), serde_yaml::to_string(&crd)?));
    }
    Ok(out)
}

/// schemars marks Rust's unsigned integers `format: uint32/uint64`, which the apiserver does
/// not know and warns about on every apply; the `minimum` bounds already say it.
fn strip_unsigned_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if matches!(
                m.get("format").and_then(|f| f.as_str()),
                Some("uint32" | "uint64" | "uint16" | "uint8")
            ) {
                m.remove("format");
            }
            m.values_mut().for_each(strip_unsigned_formats);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_unsigned_formats),
        _ => {}
    }
}

pub const CRD_HEADER: &str =
    "# Generated by `keylimit-operator crd` from operator/src/crd.rs. Do not edit.\n";

pub async fn main_entry(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Crd { out } => {
            for dir in out {
                std::fs::create_dir_all(&dir)?;
                for (file, yaml) in crd_manifests()? {
                    std::fs::write(dir.join(file), format!("{CRD_HEADER}{yaml}"))?;
                }
            }
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

type ShutdownSignal =
    futures::future::Shared<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>;

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                futures::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    info!("shutdown signal received");
}

/// Waits until the apiserver answers, retrying with a capped backoff.
async fn await_apiserver(client: &kube::Client) {
    let mut wait = Duration::from_millis(200);
    loop {
        match client.apiserver_version().await {
            Ok(_) => return,
            Err(e) => warn!(error = %e, "apiserver not reachable yet"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

pub async fn run(args: RunArgs) -> Result<(), Error> {
    init_tracing(args.log_json);
    // One client for everything, under the QPS and in-flight limits (throttle.rs).
    let client = kube::client::ClientBuilder::try_from(kube::Config::infer().await?)?
        .with_layer(&throttle::ThrottleLayer::new(throttle::Limits {
            qps: args.kube_api_qps,
            burst: args.kube_api_burst,
            max_in_flight: args.kube_api_max_in_flight,
        }))
        .build();
    let metrics = Arc::new(metrics::Metrics::default());
    let health = Arc::new(admin::Health::default());
    let certs = Arc::new(certs::CertStore::with_expiry_gauge(
        metrics.webhook_cert_expiry.clone(),
    ));
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME").unwrap_or_else(|_| format!("keylimit-{}", std::process::id()))
    });
    let settings = reports::Settings {
        limits: exhaustion::BookLimits {
            sidecars_per_namespace: args.max_sidecars_per_namespace.max(1),
            ..Default::default()
        },
        // A standby forwards reports to the leader's pod: over TLS on the webhook port,
        // verified as the webhook Service's name; in plain HTTP on the admin port only when
        // there is no TLS port.
        peers: (!args.no_leader_election).then(|| reports::Peers {
            namespace: args.lease_namespace.clone(),
            lease: args.lease_name.clone(),
            identity: identity.clone(),
            port: args
                .webhook
                .webhook_addr
                .map_or(args.admin_addr.port(), |a| a.port()),
            tls: args.webhook.webhook_addr.map(|_| reports::PeerTls {
                server_name: args.webhook.report_server_name(),
                certs: certs.clone(),
            }),
        }),
    };
    let reports = Arc::new(reports::Reports::new(
        client.clone(),
        metrics.clone(),
        settings,
    ));
    admin::serve(
        args.admin_addr,
        health.clone(),
        metrics.clone(),
        reports.clone(),
        args.allow_plaintext_reports,
    )
    .await?;
    let shutdown: ShutdownSignal = futures::future::FutureExt::shared(Box::pin(shutdown_signal()));
    let drain = Duration::from_secs(args.shutdown_delay_seconds);
    let started = Started {
        client,
        metrics,
        health: health.clone(),
        certs,
        reports,
        identity,
    };
    let result = run_until_shutdown(args, started, shutdown.clone()).await;
    // Lame duck: the apiserver reaches the webhook through the Service, and kube-proxy keeps
    // routing to a deleted pod until its endpoint removal reaches every node (seen on kind:
    // "connection refused", then "no route to host", for about a second after the old leader
    // exited, and opted-in pods were refused). The servers run on their own tasks, so they keep
    // answering while this waits; only a signal-driven exit waits, a lost lease exits at once.
    health.ready.store(false, Ordering::Relaxed);
    if futures::FutureExt::now_or_never(shutdown).is_some() && !drain.is_zero() {
        info!(
            seconds = drain.as_secs(),
            "draining: still serving the webhook while endpoints update"
        );
        tokio::time::sleep(drain).await;
    }
    result
}

/// What `run` sets up before the webhook: it outlives `run_until_shutdown`, so the servers it
/// feeds keep answering during the drain.
struct Started {
    client: kube::Client,
    metrics: Arc<metrics::Metrics>,
    health: Arc<admin::Health>,
    certs: Arc<certs::CertStore>,
    reports: Arc<reports::Reports>,
    identity: String,
}

async fn run_until_shutdown(
    args: RunArgs,
    started: Started,
    shutdown: ShutdownSignal,
) -> Result<(), Error> {
    let Started {
        client,
        metrics,
        health,
        certs,
        reports,
        identity,
    } = started;
    // A pod's network can lag its start (seen on kind: the first connect to the API Service
    // was refused and the operator crash-looped twice). Wait for the apiserver, with backoff,
    // before the webhook setup's first API call, instead of exiting on it.
    tokio::select! {
        _ = await_apiserver(&client) => {},
        _ = shutdown.clone() => return Ok(()),
    }
    let tls = args
        .webhook
        .start(&client, certs.clone(), Some(reports.clone()))
        .await?
        .is_some();

    let lock = (!args.no_leader_election).then(|| {
        leader::LeaseLock::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_seconds),
        )
    });
    // Ready once this replica can do what the Services send it: answer the webhook (its
    // certificate is loaded above) and take reports (which needs the apiserver, reached
    // above, for TokenReviews and, on a standby, to find the leader). Not leadership: a
    // standby is Ready too, or a rolling update's surge pod never becomes Ready and no drain
    // is allowed.
    health.ready.store(true, Ordering::Relaxed);
    if let Some(lock) = &lock {
        tokio::select! {
            r = lock.acquire() => r?,
            _ = shutdown.clone() => return Ok(()),
        }
    }
    metrics.leader.set(1);
    reports.set_leader(true);
    // The CA bundle sidecars verify reports with, in every namespace with a policy.
    let trust = tls.then(|| {
        tokio::spawn(trust::publish(
            client.clone(),
            args.watch_namespace.clone(),
            certs.clone(),
            futures::future::pending(),
        ))
    });

    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = lock.clone().map(|l| {
        tokio::spawn(async move {
            let e = l.hold().await;
            warn!(error = %e, "stepping down");
            let _ = lost_tx.send(());
        })
    });
    let lost = futures::future::FutureExt::shared(Box::pin(async move {
        // Without leader election the sender is dropped at once; wait forever then.
        if lost_rx.await.is_err() {
            futures::future::pending::<()>().await;
        }
    }));
    let stop = {
        let (s, l) = (shutdown.clone(), lost.clone());
        async move {
            tokio::select! { _ = s => {}, _ = l => {} }
        }
    };
    // Writers ask this before every write; without leader election this replica always may.
    let leader = lock
        .as_ref()
        .map(|l| l.state())
        .unwrap_or_else(|| leader::LeaderState::unconditional(&identity));
    controller::run(
        client,
        args.watch_namespace.clone(),
        metrics.clone(),
        reports.clone(),
        identity,
        leader,
        controller::Tuning {
            apikey_concurrency: args.apikey_concurrency.max(1),
            policy_concurrency: args.policy_concurrency.max(1),
            render_quiet: Duration::from_millis(args.render_quiet_ms),
            render_max_delay: Duration::from_millis(
                args.render_max_delay_ms.max(args.render_quiet_ms),
            ),
        },
        stop,
        {
            let m = metrics.clone();
            move || {
                m.caches_synced.set(1);
            }
        },
    )
    .await?;
    metrics.caches_synced.set(0);
    if let Some(h) = holder {
        h.abort();
    }
    if let Some(t) = trust {
        t.abort();
    }
    reports.set_leader(false);
    metrics.leader.set(0);
    if futures::FutureExt::now_or_never(lost).is_some() {
        return Err(Error::LeaseLost);
    }
    if let Some(lock) = &lock {
        lock.release().await?;
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_apply_asks_the_apiserver_to_decode_its_body_once() {
        let request = kube::core::Request::new("/apis/keylimit.dev/v1alpha1/namespaces/n/apikeys")
            .patch_subresource(
                "status",
                "k",
                &apply_params(controller::MANAGER),
                &kube::api::Patch::Apply(serde_json::json!({})),
            )
            .map_err(|e| e.to_string());
        let uri = match request {
            Ok(r) => r.uri().to_string(),
            Err(e) => panic!("building the request: {e}"),
        };
        for part in [
            "fieldManager=keylimit-operator",
            "force=true",
            "fieldValidation=Ignore",
        ] {
            assert!(uri.contains(part), "{uri} lacks {part}");
        }
    }
}
