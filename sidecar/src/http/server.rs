//! Wiring: listeners, the config watcher, the eviction sweep and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keylimit_httpserver::ServerConfig;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::authbudget::AuthFailureLimit;
use crate::config::watch::{reload_blocking, reload_loop, watch_source};
use crate::config::{ConfigSource, ConfigStore, ReloadOutcome};
use crate::http::admin::Admin;
use crate::http::proxy::{Proxy, Upstream};
use crate::limiter::clock::Clock;
use crate::limiter::local::Limiter;
use crate::limiter::redis::{RedisBackends, RedisSettings};
use crate::limiter::shed::LoadShedder;
use crate::metrics::Metrics;
use crate::Error;

/// Everything the sidecar is configured with (the CLI maps onto this).
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: String,
    pub source: ConfigSource,
    pub reload_interval: Duration,
    pub fail_open_before_config: bool,
    pub drain_timeout: Duration,
    pub upstream_timeout: Duration,
    pub sidecar_name: String,
    pub metrics_per_key: bool,
    pub eviction_interval: Duration,
    /// Where to push usage reports (the operator); none disables pushing.
    pub report: Option<crate::report::ReportSettings>,
    /// Lease TTL and probe interval of the Redis store (used only by `store: Redis` policies).
    pub redis: RedisSettings,
    /// From a request head's first byte to its end (slowloris), on both ports.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed, on both ports.
    pub idle_timeout: Duration,
    /// Open traffic connections at most; more clients wait in the listen backlog.
    pub max_connections: usize,
    /// The same for the admin port, apart so traffic can never starve kubelet's probes.
    pub admin_max_connections: usize,
    /// Failed key attempts (401/403) allowed per peer per minute; 0 disables the budget.
    pub auth_failures_per_minute: u32,
    /// The namespace's HMAC key for presented keys (mounted Secret); documents that ask for
    /// keyed hashing are refused without it.
    pub hash_key_file: Option<PathBuf>,
}

impl Settings {
    /// Loopback listeners on free ports: what tests and benchmarks want.
    pub fn local(config_dir: PathBuf, upstream: String) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            source: ConfigSource::Directory(config_dir),
            reload_interval: Duration::from_secs(30),
            fail_open_before_config: false,
            drain_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(30),
            sidecar_name: "sidecar".into(),
            metrics_per_key: false,
            eviction_interval: Duration::from_secs(30),
            report: None,
            redis: RedisSettings::default(),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 4096,
            admin_max_connections: 128,
            auth_failures_per_minute: AuthFailureLimit::default().per_minute,
            hash_key_file: None,
        }
    }

    fn server_config(&self, name: &'static str, max_connections: usize) -> ServerConfig {
        ServerConfig {
            name,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections,
            drain_timeout: self.drain_timeout,
            ..ServerConfig::default()
        }
    }
}

/// A running sidecar.
pub struct Sidecar {
    pub traffic_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub config: Arc<ConfigStore>,
    pub limiter: Limiter,
    /// The Redis store, created when a config first asks for it.
    pub redis: Arc<RedisBackends>,
    pub metrics: Arc<Metrics>,
    /// The app's adaptive concurrency limit (`loadShedding`).
    pub shedder: LoadShedder,
    source: ConfigSource,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    // Dropping the watcher stops the inotify thread, so it lives as long as the sidecar.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Sidecar {
    pub async fn start(settings: Settings, clock: Arc<dyn Clock>) -> Result<Sidecar, Error> {
        let upstream = Upstream::parse(&settings.upstream)?;
        let metrics = Arc::new(Metrics::new(settings.metrics_per_key));
        let config = Arc::new(ConfigStore::with_hash_key_file(
            metrics.clone(),
            settings.hash_key_file.clone(),
        ));
        let limiter = Limiter::new(clock.clone());
        let redis = Arc::new(RedisBackends::new(
            clock,
            metrics.clone(),
            settings.redis.clone(),
        ));

        // A config that is not there yet (or invalid) is not fatal: the sidecar serves 503
        // (or fails open) and the watcher picks the config up when it appears.
        let _ = reload_blocking(&config, &settings.source).await;

        let traffic = bind(settings.listen)?;
        let admin = bind(settings.admin_listen)?;
        let traffic_addr = traffic.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let (shutdown, _) = watch::channel(false);

        let proxy = Arc::new(
            Proxy::new(
                config.clone(),
                limiter.clone(),
                redis.clone(),
                metrics.clone(),
                upstream,
                settings.upstream_timeout,
                settings.fail_open_before_config,
                settings.metrics_per_key,
            )
            .with_auth_failure_limit(AuthFailureLimit {
                per_minute: settings.auth_failures_per_minute,
                ..AuthFailureLimit::default()
            }),
        );
        let shedder = proxy.shedder.clone();
        let proxy_for_eviction = proxy.clone();
        let admin_svc = Arc::new(Admin {
            config: config.clone(),
            limiter: limiter.clone(),
            metrics: metrics.clone(),
            sidecar_name: settings.sidecar_name.clone(),
            shedder: shedder.clone(),
        });

        let changed = Arc::new(Notify::new());
        let watcher = watch_source(&settings.source, changed.clone())?;
        let mut tasks = vec![
            tokio::spawn(keylimit_httpserver::serve(
                traffic,
                settings.server_config("traffic", settings.max_connections),
                keylimit_httpserver::tcp,
                move |peer, req| proxy.clone().handle(peer, req),
                stopped(shutdown.subscribe()),
            )),
            tokio::spawn(keylimit_httpserver::serve(
                admin,
                ServerConfig {
                    http1_only: true,
                    ..settings.server_config("admin", settings.admin_max_connections)
                },
                keylimit_httpserver::tcp,
                move |peer, req| admin_svc.clone().handle(peer, req),
                stopped(shutdown.subscribe()),
            )),
            tokio::spawn(reload_loop(
                config.clone(),
                settings.source.clone(),
                changed,
                settings.reload_interval,
                shutdown.subscribe(),
            )),
            tokio::spawn(evict_loop(
                limiter.clone(),
                proxy_for_eviction,
                metrics.clone(),
                settings.eviction_interval,
                shutdown.subscribe(),
            )),
        ];
        if let Some(report) = settings.report.clone() {
            tasks.push(tokio::spawn(crate::report::report_loop(
                report,
                settings.sidecar_name.clone(),
                config.clone(),
                limiter.clone(),
                metrics.clone(),
                shutdown.subscribe(),
            )));
        }
        tracing::info!(%traffic_addr, %admin_addr, upstream = %settings.upstream, "sidecar listening");
        Ok(Sidecar {
            traffic_addr,
            admin_addr,
            config,
            limiter,
            redis,
            metrics,
            shedder,
            source: settings.source,
            shutdown,
            tasks,
            _watcher: watcher,
        })
    }

    /// Reloads now instead of waiting for the watcher (used by tests and on startup).
    pub async fn reload_now(&self) -> Result<ReloadOutcome, Error> {
        reload_blocking(&self.config, &self.source).await
    }

    /// Stops accepting, drains in-flight requests up to the drain timeout, then returns.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// How many connections the kernel completes for us while we are not accepting: a burst of
/// new clients while the worker is busy or descheduled, or clients beyond `max_connections`.
/// `TcpListener::bind` asks for 128 (std's value); past a full queue the kernel drops the
/// client's SYN and the client retries only after 1 s (then 3 s, 7 s), so a burst of more than
/// 128 new connections during a short stall turned into one-second waits, and clients over the
/// connection cap did not "wait in the backlog" as documented. nginx asks for 511. Linux caps
/// the value at net.core.somaxconn (4096 by default since 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    socket
        .and_then(|s| {
            // As TcpListener::bind does: a restarted sidecar can bind while old connections
            // are in TIME_WAIT.
            #[cfg(unix)]
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(LISTEN_BACKLOG)
        })
        .map_err(|source| Error::Bind { addr, source })
}

async fn evict_loop(
    limiter: Limiter,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let dropped = limiter.evict_idle();
        proxy.evict_idle_peers();
        proxy.evict_idle_upstream();
        let slots = limiter.slots();
        metrics.limiter_slots.set(slots as i64);
        tracing::debug!(dropped, slots, "evicted idle limiter state");
    }
}

/// Resolves when the sidecar is told to stop (or the sender is gone).
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs until SIGTERM or Ctrl-C, then drains.
pub async fn serve_until_signal(settings: Settings, clock: Arc<dyn Clock>) -> Result<(), Error> {
    let sidecar = Sidecar::start(settings, clock).await?;
    shutdown_signal().await?;
    tracing::info!("shutting down: draining in-flight requests");
    sidecar.stop().await;
    Ok(())
}

async fn shutdown_signal() -> Result<(), Error> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok(()),
            r = tokio::signal::ctrl_c() => r.map_err(Error::from),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(Error::from)
    }
}
