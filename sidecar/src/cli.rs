//! Command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::config::ConfigSource;
use crate::http::server::{serve_until_signal, Settings};
use crate::limiter::clock::SystemClock;
use crate::Error;

/// The longest any duration flag may be: a year. Durations are added to instants on the
/// request path, and one near u64::MAX seconds would overflow there.
const MAX_SECS: u64 = 365 * 86_400;

fn secs() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(..=MAX_SECS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "keylimit-sidecar",
    version,
    about = "API-key rate-limiting sidecar proxy"
)]
pub struct Args {
    /// Traffic address (clients connect here).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin address: /healthz, /readyz, /metrics (anyone who reaches the pod), /v1/usage
    /// (loopback peers only: kubectl port-forward).
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// The application, on localhost.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub upstream: String,
    /// Mounted ConfigMap directory holding policy.json (and key shards).
    #[arg(long, default_value = "/etc/keylimit")]
    pub config_dir: PathBuf,
    /// API-watch mode: read the policy's ConfigMaps through the Kubernetes API
    /// (`<namespace>/<policy>`) instead of a kubelet volume, mirroring them into --config-dir
    /// (which must then be writable, e.g. an emptyDir). Needs get/list/watch on configmaps.
    #[cfg(feature = "api-watch")]
    #[arg(long)]
    pub configmap: Option<String>,
    /// Fallback re-read interval in case a filesystem event is missed.
    #[arg(long, default_value_t = 30, value_parser = secs())]
    pub reload_interval_secs: u64,
    /// Forward requests unchecked until the first config loads (default: 503).
    #[arg(long)]
    pub fail_open_before_config: bool,
    /// How long to wait for in-flight requests on SIGTERM.
    #[arg(long, default_value_t = 20, value_parser = secs())]
    pub drain_timeout_secs: u64,
    /// Time allowed for the application's response headers.
    #[arg(long, default_value_t = 30, value_parser = secs())]
    pub upstream_timeout_secs: u64,
    /// Name reported in /v1/usage (defaults to $HOSTNAME, the pod name).
    #[arg(long, env = "HOSTNAME", default_value = "keylimit-sidecar")]
    pub sidecar_name: String,
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Add a per-key label to request metrics (one series per key: opt-in).
    #[arg(long)]
    pub metrics_per_key: bool,
    /// Failed key attempts (401/403) allowed per client address (IPv6: per /64) per minute;
    /// past it the address gets 429 before its key is checked. 0 disables.
    #[arg(long, default_value_t = 30)]
    pub auth_failures_per_minute: u32,
    /// Operator endpoint for usage reports, e.g.
    /// https://keylimit-webhook.keylimit-system.svc/v1/reports (needs --report-ca-file).
    #[arg(long)]
    pub report_url: Option<String>,
    /// PEM CA bundle the operator's report endpoint is verified against (re-read when it
    /// changes); required with an https --report-url.
    #[arg(long)]
    pub report_ca_file: Option<PathBuf>,
    /// Projected ServiceAccount token (audience `keylimit`) sent with each report.
    #[arg(long)]
    pub report_token_file: Option<PathBuf>,
    /// How often a report is pushed (and at most every second more when keys are refused).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS * 1000))]
    pub report_interval_ms: u64,
    /// How often idle limiter state is swept.
    #[arg(long, default_value_t = 30, value_parser = secs())]
    pub eviction_interval_secs: u64,
    /// Redis store only: how long a concurrency slot of a crashed sidecar stays taken (live
    /// slots are renewed every third of it).
    #[arg(long, default_value_t = 30, value_parser = secs())]
    pub redis_lease_ttl_secs: u64,
    /// Both ports: a request head must be complete this long after its first byte (slowloris).
    #[arg(long, default_value_t = 10, value_parser = secs())]
    pub header_read_timeout_secs: u64,
    /// Both ports: a connection with no request in flight is closed after this long. Keep it
    /// above the keep-alive timeout of whatever pools connections to the pod (60 s for most
    /// load balancers), so the sidecar is never the side closing a connection being reused.
    #[arg(long, default_value_t = 75, value_parser = secs())]
    pub idle_timeout_secs: u64,
    /// Open traffic connections at most; further clients wait in the listen backlog until one
    /// closes. Each proxied connection needs up to two file descriptors.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Open admin connections at most (apart from traffic, so traffic cannot starve probes).
    #[arg(long, default_value_t = 128)]
    pub admin_max_connections: usize,
    /// File holding the namespace's key-hash HMAC key (the operator's `keylimit-hash-key`
    /// Secret, mounted). Read at every config load; required by documents whose
    /// `keySource.keyHash` is HmacSha256, in API-watch mode too.
    #[arg(long)]
    pub hash_key_file: Option<PathBuf>,
    /// Runtime threads serving traffic; 0 means one per CPU the process may use (its cgroup
    /// quota included), or `TOKIO_WORKER_THREADS` when set. With one, every task runs on a
    /// single-threaded runtime.
    #[arg(long, env = "KEYLIMIT_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl Args {
    pub fn settings(&self) -> Result<Settings, Error> {
        let report = match &self.report_url {
            None => None,
            Some(u) => {
                let url: http::Uri = u
                    .parse()
                    .map_err(|e| Error::Argument(format!("--report-url {u:?}: {e}")))?;
                match (url.scheme_str(), &self.report_ca_file) {
                    (Some("https"), Some(_)) | (Some("http"), None) => {}
                    (Some("https"), None) => {
                        return Err(Error::Argument(format!(
                            "--report-url {u:?} is https: --report-ca-file must name the CA to verify the operator with"
                        )))
                    }
                    (Some("http"), Some(_)) => {
                        return Err(Error::Argument(format!(
                            "--report-ca-file is set but --report-url {u:?} is plain http"
                        )))
                    }
                    _ => {
                        return Err(Error::Argument(format!(
                            "--report-url {u:?}: must be an https:// (or http://) URL"
                        )))
                    }
                }
                Some(crate::report::ReportSettings {
                    url,
                    token_file: self.report_token_file.clone(),
                    interval: Duration::from_millis(self.report_interval_ms),
                    ca_file: self.report_ca_file.clone(),
                })
            }
        };
        Ok(Settings {
            listen: self.listen,
            admin_listen: self.admin_listen,
            upstream: self.upstream.clone(),
            source: ConfigSource::Directory(self.config_dir.clone()),
            reload_interval: Duration::from_secs(self.reload_interval_secs),
            fail_open_before_config: self.fail_open_before_config,
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            upstream_timeout: Duration::from_secs(self.upstream_timeout_secs),
            sidecar_name: self.sidecar_name.clone(),
            metrics_per_key: self.metrics_per_key,
            auth_failures_per_minute: self.auth_failures_per_minute,
            eviction_interval: Duration::from_secs(self.eviction_interval_secs),
            report,
            redis: crate::limiter::redis::RedisSettings {
                lease_ttl: Duration::from_secs(self.redis_lease_ttl_secs.max(1)),
                ..crate::limiter::redis::RedisSettings::default()
            }
            .with_env(),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            max_connections: self.max_connections.max(1),
            admin_max_connections: self.admin_max_connections.max(1),
            hash_key_file: self.hash_key_file.clone(),
        })
    }
}

fn init_logging(format: LogFormat) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| Error::Logging(e.to_string()))
}

/// The binary's whole job: logging, a runtime, serve until SIGTERM.
pub fn run(args: Args) -> Result<(), Error> {
    init_logging(args.log_format)?;
    let runtime = runtime(worker_threads(args.worker_threads))?;
    let settings = args.settings()?;
    runtime.block_on(async {
        #[cfg(feature = "api-watch")]
        if let Some(target) = &args.configmap {
            let target = crate::config::apiwatch::parse_target(target)?;
            let dir = args.config_dir.clone();
            // The directory must exist before the sidecar starts watching it, or inotify has
            // nothing to watch and updates wait for the periodic re-read.
            std::fs::create_dir_all(&dir)?;
            // The mirror feeds the same directory the reload path watches; if it fails the
            // last good config keeps serving and the error is logged, as with a bad file.
            tokio::spawn(async move {
                if let Err(e) = crate::config::apiwatch::run(target, dir).await {
                    tracing::error!(error = %e, "configmap watch stopped");
                }
            });
        }
        serve_until_signal(settings, Arc::new(SystemClock)).await
    })
}

/// The worker count `--worker-threads` asks for: the flag, else `TOKIO_WORKER_THREADS`, else
/// the CPUs available (which `available_parallelism` reads from the cgroup quota too).
fn worker_threads(flag: usize) -> usize {
    if flag > 0 {
        return flag;
    }
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// One worker gets a single-threaded runtime: a one-worker multi-threaded runtime still runs
/// its work-stealing scheduler and leaves the main thread apart from the tasks. Measured with
/// the load script's layout (proxy and upstream on one core): 0.53-0.57 context switches per
/// request became 0.41-0.45, and 2% fewer instructions per request (docs/benchmarks.md).
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Settings, Error> {
        let argv = ["keylimit-sidecar"].iter().chain(extra).copied();
        Args::try_parse_from(argv)
            .map_err(|e| Error::Argument(e.to_string()))?
            .settings()
    }

    #[test]
    fn an_explicit_worker_count_wins_and_one_worker_runs_single_threaded() {
        assert_eq!(worker_threads(3), 3);
        assert!(worker_threads(0) >= 1);
        use tokio::runtime::RuntimeFlavor;
        let one = runtime(1).map(|rt| rt.handle().runtime_flavor());
        assert_eq!(one.ok(), Some(RuntimeFlavor::CurrentThread));
        let two = runtime(2).map(|rt| (rt.handle().runtime_flavor(), rt.metrics().num_workers()));
        assert_eq!(two.ok(), Some((RuntimeFlavor::MultiThread, 2)));
    }

    #[test]
    fn a_duration_flag_over_a_year_is_refused_at_start() {
        for flag in [
            "--upstream-timeout-secs",
            "--header-read-timeout-secs",
            "--idle-timeout-secs",
            "--drain-timeout-secs",
            "--reload-interval-secs",
            "--eviction-interval-secs",
            "--redis-lease-ttl-secs",
        ] {
            let e = parse(&[flag, "18446744073709551615"])
                .err()
                .map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(flag)),
                "{flag}: {e:?}"
            );
            assert!(
                parse(&[flag, "31536000"]).is_ok(),
                "{flag}: a year is allowed"
            );
        }
        let e = parse(&["--report-interval-ms", "0"])
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("--report-interval-ms")),
            "{e:?}"
        );
    }

    #[test]
    fn https_reports_need_a_ca_file() {
        let url = "https://keylimit-webhook.keylimit-system.svc/v1/reports";
        let e = parse(&["--report-url", url]).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("--report-ca-file")),
            "{e:?}"
        );
        let s = parse(&[
            "--report-url",
            url,
            "--report-ca-file",
            "/etc/keylimit-ca/ca.crt",
        ]);
        assert!(s.is_ok_and(|s| s.report.is_some_and(|r| r.ca_file.is_some())));
        // A CA file with a plain URL is a mistake, not a silent downgrade.
        let plain = "http://127.0.0.1:8080/v1/reports";
        assert!(parse(&["--report-url", plain, "--report-ca-file", "/x"]).is_err());
        assert!(parse(&["--report-url", plain]).is_ok());
    }
}
