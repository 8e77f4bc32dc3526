//! Sidecar injection: a mutating admission webhook for Pods.
//!
//! The decision and the mutation are a pure function ([`inject`]: pod + settings → decision),
//! unit-tested without a cluster; [`serve`] only wraps it in AdmissionReview over TLS.
//!
//! Which pods arrive here is decided by the MutatingWebhookConfiguration's selectors (chart:
//! namespace label or pod label `keylimit.dev/inject: enabled`). Here a pod is injected when it
//! names its RateLimitPolicy in `keylimit.dev/policy`; it is left alone when it carries
//! `keylimit.dev/inject: disabled`, already has the sidecar (reinvocation, re-admission), or
//! names no policy (a namespace-wide opt-in also sends Jobs and debug pods that never serve
//! API traffic: they get a warning, not a rejection). A pod that names a policy but cannot be
//! injected correctly (no port to take over, a bad override) is rejected with the reason,
//! because admitting it would silently run the API without its limits.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::api::core::v1::{KeyToPath, SecretProjection};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keylimit_dataplane as dp;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::certs::CertStore;
use crate::render;
use crate::reports::AUDIENCE;
use crate::Error;

pub const INJECT_LABEL: &str = "keylimit.dev/inject";
pub const POLICY_ANNOTATION: &str = "keylimit.dev/policy";
pub const PORT_ANNOTATION: &str = "keylimit.dev/port";
pub const CPU_ANNOTATION: &str = "keylimit.dev/sidecar-cpu";
pub const MEMORY_ANNOTATION: &str = "keylimit.dev/sidecar-memory";
pub const FAIL_MODE_ANNOTATION: &str = "keylimit.dev/fail-mode";
pub const LOG_LEVEL_ANNOTATION: &str = "keylimit.dev/log-level";
/// `volume` (default): the policy reaches the sidecar through kubelet's projected ConfigMap
/// volume (up to about a minute per change, no RBAC needed). `api`: the sidecar watches the
/// policy's ConfigMaps through the API (about a second per change); the pod's
/// ServiceAccount then needs get/list/watch on configmaps in its namespace.
pub const CONFIG_SOURCE_ANNOTATION: &str = "keylimit.dev/config-source";
/// Set on injected pods: which policy and that keylimit changed the pod (for humans and for
/// `kubectl get pods -l`... annotations are not selectable, so this is informational).
pub const INJECTED_ANNOTATION: &str = "keylimit.dev/injected";

pub const SIDECAR_NAME: &str = "keylimit-sidecar";
/// The new name of the app's port the sidecar takes over.
pub const APP_PORT_RENAME: &str = "kl-app";
pub const ADMIN_PORT_NAME: &str = "kl-admin";
pub const CONFIG_VOLUME: &str = "keylimit-config";
pub const TOKEN_VOLUME: &str = "keylimit-token";
pub const CONFIG_DIR: &str = "/etc/keylimit";
/// In API-watch mode the sidecar writes the documents it watches into [`CONFIG_DIR`], an
/// emptyDir of this name, and reads the hash key from the projected volume mounted at
/// [`PROJECTED_DIR`] instead.
pub const CONFIG_CACHE_VOLUME: &str = "keylimit-config-cache";
pub const PROJECTED_DIR: &str = "/etc/keylimit-projected";
pub const TOKEN_DIR: &str = "/var/run/secrets/keylimit";
pub const TOKEN_FILE: &str = "token";
/// The CA bundle sidecars verify the operator's report endpoint with: the operator keeps a
/// ConfigMap of this name, key [`CA_FILE`], in every namespace with a policy
/// (operator/src/trust.rs); it holds the old and the new CA during a rotation.
pub const CA_CONFIG_MAP: &str = "keylimit-ca";
pub const CA_VOLUME: &str = "keylimit-ca";
pub const CA_DIR: &str = "/etc/keylimit-ca";
pub const CA_FILE: &str = "ca.crt";
/// File name of the namespace's key-hash HMAC key inside [`CONFIG_DIR`]: the
/// `keylimit-hash-key` Secret is a source of the same projected volume as the policy's
/// ConfigMaps, so kubelet swaps the key and the documents hashed with it in one atomic step.
pub const HASH_KEY_FILE: &str = "keylimit-hash-key";
/// Key shards the projected volume lists (all optional): render.rs never writes more.
pub const MAX_SHARDS: usize = 32;
/// Short-lived and audience-bound: a leaked token is only good for reporting usage to the
/// operator, for an hour. Kubelet refreshes it well before it expires.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    /// Forward requests unchecked until the sidecar has loaded its policy.
    Open,
    /// Answer 503 until the sidecar has loaded its policy.
    Closed,
}

impl FailMode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Self::Open),
            "closed" => Some(Self::Closed),
            _ => None,
        }
    }
}

/// What the webhook injects, from the operator's flags (the chart's `sidecar.*` values).
#[derive(clap::Args, Debug, Clone)]
pub struct SidecarSettings {
    #[arg(long, env = "KEYLIMIT_SIDECAR_IMAGE", default_value = concat!("keylimit/sidecar:", env!("CARGO_PKG_VERSION")))]
    pub sidecar_image: String,
    #[arg(long, default_value = "IfNotPresent")]
    pub sidecar_image_pull_policy: String,
    /// The sidecar's traffic port; it gets the name of the app port it takes over.
    #[arg(long, default_value_t = 4143)]
    pub sidecar_port: u16,
    /// The sidecar's admin port (/healthz, /readyz, /metrics).
    #[arg(long, default_value_t = 4191)]
    pub sidecar_admin_port: u16,
    /// The app container port the sidecar takes over unless `keylimit.dev/port` names another.
    #[arg(long, default_value = "http")]
    pub sidecar_app_port_name: String,
    #[arg(long, value_enum, default_value = "closed")]
    pub sidecar_fail_mode: FailMode,
    /// RUST_LOG of the sidecar.
    #[arg(long, default_value = "info")]
    pub sidecar_log_level: String,
    #[arg(long, default_value_t = 65532)]
    pub sidecar_run_as_user: i64,
    #[arg(long)]
    pub sidecar_cpu_request: Option<String>,
    #[arg(long)]
    pub sidecar_cpu_limit: Option<String>,
    #[arg(long)]
    pub sidecar_memory_request: Option<String>,
    #[arg(long)]
    pub sidecar_memory_limit: Option<String>,
    /// Where sidecars push usage reports: `https://<webhook service>.<namespace>.svc/v1/reports`
    /// (the sidecar then verifies the operator with the `keylimit-ca` ConfigMap); none: no
    /// reporting.
    #[arg(long)]
    pub sidecar_report_url: Option<String>,
    /// Per request, not a flag: the Secret holding the Redis connection (`url`, optional
    /// `password` and `ca.crt`) of the pod's policy. The sidecar gets all three from it, by
    /// reference, as `KEYLIMIT_REDIS_URL`, `KEYLIMIT_REDIS_PASSWORD` and `KEYLIMIT_REDIS_CA`:
    /// the password reaches only the server its Secret names, never one the policy names.
    #[arg(skip)]
    pub redis_connection: Option<String>,
}

impl Default for SidecarSettings {
    fn default() -> Self {
        Self {
            sidecar_image: concat!("keylimit/sidecar:", env!("CARGO_PKG_VERSION")).into(),
            sidecar_image_pull_policy: "IfNotPresent".into(),
            sidecar_port: 4143,
            sidecar_admin_port: 4191,
            sidecar_app_port_name: "http".into(),
            sidecar_fail_mode: FailMode::Closed,
            sidecar_log_level: "info".into(),
            sidecar_run_as_user: 65532,
            sidecar_cpu_request: None,
            sidecar_cpu_limit: None,
            sidecar_memory_request: None,
            sidecar_memory_limit: None,
            sidecar_report_url: None,
            redis_connection: None,
        }
    }
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admit unchanged; the reason is logged and, when the user should know, sent as a warning.
    Skip { reason: String, warn: bool },
    /// Admit this pod instead.
    Inject(Box<Pod>),
    /// Reject the pod with this message.
    Deny(String),
}

fn skip(reason: impl Into<String>, warn: bool) -> Decision {
    Decision::Skip {
        reason: reason.into(),
        warn,
    }
}

/// A Kubernetes quantity as the apiserver accepts it (`100m`, `1.5`, `64Mi`, `1e3`).
fn valid_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    let num_ok = !num.is_empty() && num.matches('.').count() <= 1 && num != ".";
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || (suffix.len() > 1
        && suffix.starts_with(['e', 'E'])
        && suffix[1..]
            .strip_prefix(['+', '-'])
            .unwrap_or(&suffix[1..])
            .chars()
            .all(|c| c.is_ascii_digit()));
    num_ok && suffix_ok
}

/// A DNS-1123 label (port names, policy names are subdomains but we keep them simple).
fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

fn valid_log_filter(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=,:.-".contains(c))
}

struct Overrides {
    policy: String,
    port_name: String,
    cpu: Option<String>,
    memory: Option<String>,
    fail_mode: FailMode,
    log_level: String,
    config_source: ConfigSource,
}

/// Where the sidecar reads its policy from ([`CONFIG_SOURCE_ANNOTATION`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    Volume,
    Api,
}

fn overrides(
    annotations: &BTreeMap<String, String>,
    policy: &str,
    s: &SidecarSettings,
) -> Result<Overrides, String> {
    // The longest name derived from the policy must still be a valid ConfigMap name.
    let (longest, _) = render::shard_names(policy, MAX_SHARDS);
    if !valid_name(policy, 253) || longest.len() > 253 {
        return Err(format!(
            "{POLICY_ANNOTATION}: {policy:?} is not a valid RateLimitPolicy name"
        ));
    }
    let get = |k: &str| annotations.get(k).map(|v| v.trim().to_string());
    let port_name = get(PORT_ANNOTATION).unwrap_or_else(|| s.sidecar_app_port_name.clone());
    // Port names are IANA service names: at most 15 characters, with a letter.
    if !valid_name(&port_name, 15)
        || port_name.contains('.')
        || !port_name.chars().any(|c| c.is_ascii_lowercase())
    {
        return Err(format!(
            "{PORT_ANNOTATION}: {port_name:?} is not a port name (the name of the app's \
             containerPort, e.g. \"http\")"
        ));
    }
    let cpu = get(CPU_ANNOTATION);
    if let Some(c) = &cpu {
        if !valid_quantity(c) {
            return Err(format!(
                "{CPU_ANNOTATION}: {c:?} is not a quantity (e.g. 100m)"
            ));
        }
    }
    let memory = get(MEMORY_ANNOTATION);
    if let Some(m) = &memory {
        if !valid_quantity(m) {
            return Err(format!(
                "{MEMORY_ANNOTATION}: {m:?} is not a quantity (e.g. 64Mi)"
            ));
        }
    }
    let fail_mode = match get(FAIL_MODE_ANNOTATION) {
        None => s.sidecar_fail_mode,
        Some(v) => FailMode::parse(&v).ok_or_else(|| {
            format!("{FAIL_MODE_ANNOTATION}: {v:?} is not \"open\" or \"closed\"")
        })?,
    };
    let log_level = get(LOG_LEVEL_ANNOTATION).unwrap_or_else(|| s.sidecar_log_level.clone());
    if !valid_log_filter(&log_level) {
        return Err(format!(
            "{LOG_LEVEL_ANNOTATION}: {log_level:?} is not a log filter (e.g. info, debug)"
        ));
    }
    let config_source = match get(CONFIG_SOURCE_ANNOTATION).as_deref() {
        None | Some("volume") => ConfigSource::Volume,
        Some("api") => ConfigSource::Api,
        Some(v) => {
            return Err(format!(
                "{CONFIG_SOURCE_ANNOTATION}: {v:?} is not \"volume\" or \"api\""
            ))
        }
    };
    Ok(Overrides {
        policy: policy.to_string(),
        port_name,
        cpu,
        memory,
        fail_mode,
        log_level,
        config_source,
    })
}

fn already_injected(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_NAME)
}

/// The decision for one pod. Pure: the same pod and settings always give the same answer, and
/// an injected pod is always skipped, so reinvocation and re-admission change nothing.
pub fn inject(pod: &Pod, s: &SidecarSettings) -> Decision {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if labels.get(INJECT_LABEL).map(String::as_str) == Some("disabled") {
        return skip(format!("{INJECT_LABEL}=disabled"), false);
    }
    if already_injected(pod) {
        return skip("already has the sidecar", false);
    }
    let Some(policy) = annotations
        .get(POLICY_ANNOTATION)
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    else {
        return skip(
            format!(
                "keylimit: opted in but no {POLICY_ANNOTATION} annotation; sidecar not injected"
            ),
            true,
        );
    };
    let o = match overrides(&annotations, policy, s) {
        Ok(o) => o,
        Err(e) => return Decision::Deny(format!("keylimit: {e}")),
    };
    let Some(spec) = &pod.spec else {
        return Decision::Deny("keylimit: pod has no spec".into());
    };
    let mut spec = spec.clone();

    // Ports share the pod's network namespace: nothing may already listen where the sidecar will.
    let all_ports = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten());
    for p in all_ports {
        if p.container_port == i32::from(s.sidecar_port)
            || p.container_port == i32::from(s.sidecar_admin_port)
        {
            return Decision::Deny(format!(
                "keylimit: containerPort {} is the sidecar's; the app must use another port",
                p.container_port
            ));
        }
        if p.name.as_deref() == Some(APP_PORT_RENAME) || p.name.as_deref() == Some(ADMIN_PORT_NAME)
        {
            return Decision::Deny(format!(
                "keylimit: port name {:?} is reserved for the sidecar",
                p.name.as_deref().unwrap_or_default()
            ));
        }
    }

    // Take over the app's port: the sidecar gets its name, so `targetPort: <name>` in a Service
    // lands on the limiter, which forwards to the app's original port on localhost.
    let mut upstream_port = None;
    for c in spec.containers.iter_mut() {
        let Some(port) = c
            .ports
            .iter_mut()
            .flatten()
            .find(|p| p.name.as_deref() == Some(o.port_name.as_str()))
        else {
            continue;
        };
        port.name = Some(APP_PORT_RENAME.into());
        upstream_port = Some(port.container_port);
        // Kubelet resolves a probe's named port in the probe's own container: keep the app's
        // probes pointing at the app, not at a name that now belongs to the sidecar.
        for probe in [
            c.liveness_probe.as_mut(),
            c.readiness_probe.as_mut(),
            c.startup_probe.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            rename_probe_port(probe, &o.port_name);
        }
        break;
    }
    let Some(upstream_port) = upstream_port else {
        return Decision::Deny(format!(
            "keylimit: no container has a port named {:?} for the sidecar to take over; name \
             the app's containerPort {:?} or set the {PORT_ANNOTATION} annotation",
            o.port_name, o.port_name
        ));
    };

    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    let reserved = [CONFIG_VOLUME, TOKEN_VOLUME, CA_VOLUME, CONFIG_CACHE_VOLUME];
    if volumes.iter().any(|v| reserved.contains(&v.name.as_str())) {
        return Decision::Deny(format!(
            "keylimit: volume names {} are reserved for the sidecar",
            reserved.join(", ")
        ));
    }
    volumes.push(config_volume(&o.policy));
    volumes.push(token_volume());
    if o.config_source == ConfigSource::Api {
        volumes.push(Volume {
            name: CONFIG_CACHE_VOLUME.into(),
            empty_dir: Some(k8s_openapi::api::core::v1::EmptyDirVolumeSource {
                // A few documents; the limit keeps a runaway writer from filling the node.
                size_limit: Some(Quantity("64Mi".into())),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut sidecar = sidecar_container(s, &o, upstream_port);
    if reports_over_tls(s) {
        volumes.push(ca_volume());
        sidecar
            .volume_mounts
            .get_or_insert_with(Vec::new)
            .push(VolumeMount {
                name: CA_VOLUME.into(),
                mount_path: CA_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
    }
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .push(sidecar);

    let mut out = pod.clone();
    out.spec = Some(spec);
    out.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED_ANNOTATION.into(), o.policy.clone());
    Decision::Inject(Box::new(out))
}

fn rename_probe_port(probe: &mut Probe, old: &str) {
    let named = |p: &IntOrString| matches!(p, IntOrString::String(n) if n == old);
    if let Some(h) = probe.http_get.as_mut() {
        if named(&h.port) {
            h.port = IntOrString::String(APP_PORT_RENAME.into());
        }
    }
    if let Some(t) = probe.tcp_socket.as_mut() {
        if named(&t.port) {
            t.port = IntOrString::String(APP_PORT_RENAME.into());
        }
    }
}

/// The policy's ConfigMaps through ONE projected volume: kubelet updates it in place when the
/// operator rewrites them, and the optional shards appear as the key set grows.
fn config_volume(policy: &str) -> Volume {
    let main = VolumeProjection {
        config_map: Some(ConfigMapProjection {
            name: render::main_config_map(policy),
            // Not optional: a misspelt policy keeps the pod from starting, with an event that
            // names the missing ConfigMap, instead of a sidecar that never becomes ready.
            optional: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    };
    let shards = (1..=MAX_SHARDS).map(|n| VolumeProjection {
        config_map: Some(ConfigMapProjection {
            name: render::shard_names(policy, n).0,
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    });
    // Not optional either: the operator creates it with the namespace's first policy, and a
    // sidecar without it would refuse every document (their key hashes are keyed with it).
    let hash_key = VolumeProjection {
        secret: Some(SecretProjection {
            name: dp::HASH_KEY_SECRET.into(),
            optional: Some(false),
            items: Some(vec![KeyToPath {
                key: dp::HASH_KEY_DATA.into(),
                path: HASH_KEY_FILE.into(),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    };
    Volume {
        name: CONFIG_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            // Read-only for everyone: the sidecar only reads. Only the sidecar container
            // mounts this volume, so the app container never sees the hash key.
            default_mode: Some(0o444),
            sources: Some(
                std::iter::once(main)
                    .chain(shards)
                    .chain(std::iter::once(hash_key))
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reports go to an `https` URL: the sidecar needs the CA to verify the operator with.
pub fn reports_over_tls(s: &SidecarSettings) -> bool {
    s.sidecar_report_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"))
}

/// The `keylimit-ca` ConfigMap: not optional, so a pod waits for it rather than running a
/// sidecar that cannot verify where it sends its token. Kubelet updates it in place during
/// a CA rotation, and the sidecar re-reads it when it changes.
fn ca_volume() -> Volume {
    Volume {
        name: CA_VOLUME.into(),
        config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
            name: CA_CONFIG_MAP.into(),
            optional: Some(false),
            default_mode: Some(0o444),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(AUDIENCE.into()),
                    expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                    path: TOKEN_FILE.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Pod Security "restricted", whatever the pod itself says.
fn restricted_security_context(run_as_user: i64) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(run_as_user),
        run_as_group: Some(run_as_user),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// The sidecar's CPU limit: the chart's, unless an annotated CPU request dropped it.
fn cpu_limit<'a>(s: &'a SidecarSettings, o: &Overrides) -> Option<&'a str> {
    match o.cpu {
        Some(_) => None,
        None => s.sidecar_cpu_limit.as_deref(),
    }
}

/// Runtime threads for the injected sidecar: its CPU limit rounded up, else one. Left to
/// itself the sidecar starts a worker per CPU it can use, which without a limit is every CPU
/// of the node (64 threads on a 64-core node, for a proxy that requests 20m); and one worker
/// runs on the single-threaded runtime, the fastest per core.
fn sidecar_worker_threads(cpu_limit: Option<&str>) -> u32 {
    let cores = cpu_limit.and_then(|q| match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|m| m / 1000.0),
        None => q.parse::<f64>().ok(),
    });
    match cores {
        // Bounded so a typo'd limit cannot start thousands of threads.
        Some(c) if c.is_finite() && c > 0.0 => (c.ceil() as u32).clamp(1, 64),
        _ => 1,
    }
}

fn resources(s: &SidecarSettings, o: &Overrides) -> Option<ResourceRequirements> {
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(c) = o.cpu.as_ref().or(s.sidecar_cpu_request.as_ref()) {
        requests.insert("cpu".to_string(), Quantity(c.clone()));
    }
    // An annotated CPU request drops the default limit, which could otherwise sit below it.
    if o.cpu.is_none() {
        if let Some(c) = &s.sidecar_cpu_limit {
            limits.insert("cpu".to_string(), Quantity(c.clone()));
        }
    }
    // Memory: an annotation sets request and limit alike (memory is not compressible; a
    // limit above the request only defers the OOM kill).
    match &o.memory {
        Some(m) => {
            requests.insert("memory".to_string(), Quantity(m.clone()));
            limits.insert("memory".to_string(), Quantity(m.clone()));
        }
        None => {
            if let Some(m) = &s.sidecar_memory_request {
                requests.insert("memory".to_string(), Quantity(m.clone()));
            }
            if let Some(m) = &s.sidecar_memory_limit {
                limits.insert("memory".to_string(), Quantity(m.clone()));
            }
        }
    }
    (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

/// The sidecar's command line (see sidecar/src/cli.rs).
pub fn sidecar_args(
    s: &SidecarSettings,
    fail_mode: FailMode,
    source: ConfigSource,
    policy: &str,
    upstream_port: i32,
) -> Vec<String> {
    let hash_key_dir = match source {
        ConfigSource::Volume => CONFIG_DIR,
        ConfigSource::Api => PROJECTED_DIR,
    };
    let mut args = vec![
        "--listen".to_string(),
        format!("0.0.0.0:{}", s.sidecar_port),
        "--admin-listen".to_string(),
        format!("0.0.0.0:{}", s.sidecar_admin_port),
        "--upstream".to_string(),
        format!("http://127.0.0.1:{upstream_port}"),
        "--config-dir".to_string(),
        CONFIG_DIR.to_string(),
        "--hash-key-file".to_string(),
        format!("{hash_key_dir}/{HASH_KEY_FILE}"),
        "--sidecar-name".to_string(),
        // Expanded by kubelet from the env var below.
        "$(POD_NAME)".to_string(),
    ];
    if source == ConfigSource::Api {
        // Expanded by kubelet from the env var below: the pod's own namespace.
        args.extend([
            "--configmap".to_string(),
            format!("$(POD_NAMESPACE)/{policy}"),
        ]);
    }
    if fail_mode == FailMode::Open {
        args.push("--fail-open-before-config".into());
    }
    if let Some(url) = &s.sidecar_report_url {
        args.extend([
            "--report-url".to_string(),
            url.clone(),
            "--report-token-file".to_string(),
            format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        ]);
        if reports_over_tls(s) {
            args.extend([
                "--report-ca-file".to_string(),
                format!("{CA_DIR}/{CA_FILE}"),
            ]);
        }
    }
    args
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn sidecar_container(s: &SidecarSettings, o: &Overrides, upstream_port: i32) -> Container {
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(s.sidecar_image.clone()),
        image_pull_policy: Some(s.sidecar_image_pull_policy.clone()),
        // A native sidecar: started before the app containers, kept running beside them, and
        // stopped after them, so no request reaches the app unlimited and draining works.
        restart_policy: Some("Always".into()),
        args: Some(sidecar_args(
            s,
            o.fail_mode,
            o.config_source,
            &o.policy,
            upstream_port,
        )),
        env: Some(
            vec![
                EnvVar {
                    name: "POD_NAME".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.name".into(),
                            api_version: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "POD_NAMESPACE".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.namespace".into(),
                            api_version: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "RUST_LOG".into(),
                    value: Some(o.log_level.clone()),
                    ..Default::default()
                },
                EnvVar {
                    name: "KEYLIMIT_WORKER_THREADS".into(),
                    value: Some(sidecar_worker_threads(cpu_limit(s, o)).to_string()),
                    ..Default::default()
                },
            ]
            .into_iter()
            .chain(s.redis_connection.iter().flat_map(|secret| {
                // `url` must exist (the pod waits for it rather than run without a store);
                // `password` and `ca.crt` are optional, so the webhook never reads the Secret.
                [
                    ("KEYLIMIT_REDIS_URL", "url", false),
                    ("KEYLIMIT_REDIS_PASSWORD", "password", true),
                    ("KEYLIMIT_REDIS_CA", "ca.crt", true),
                ]
                .map(|(env, key, optional)| EnvVar {
                    name: env.into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                            name: secret.clone(),
                            key: key.into(),
                            optional: Some(optional),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            }))
            .collect(),
        ),
        ports: Some(vec![
            ContainerPort {
                name: Some(o.port_name.clone()),
                container_port: i32::from(s.sidecar_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.into()),
                container_port: i32::from(s.sidecar_admin_port),
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // Ready once the policy is loaded: the pod receives no traffic before that.
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: resources(s, o),
        security_context: Some(restricted_security_context(s.sidecar_run_as_user)),
        volume_mounts: Some(config_mounts(o.config_source)),
        ..Default::default()
    }
}

/// Volume mode: the projected volume is the config directory. API mode: the sidecar mirrors
/// the ConfigMaps into a writable emptyDir there, and the projected volume (read for the hash
/// key only) moves aside.
fn config_mounts(source: ConfigSource) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    let token = mount(TOKEN_VOLUME, TOKEN_DIR, true);
    match source {
        ConfigSource::Volume => vec![mount(CONFIG_VOLUME, CONFIG_DIR, true), token],
        ConfigSource::Api => vec![
            mount(CONFIG_CACHE_VOLUME, CONFIG_DIR, false),
            mount(CONFIG_VOLUME, PROJECTED_DIR, true),
            token,
        ],
    }
}

/// The JSON patch from `pod` to the injected pod, or `None` when nothing changes.
pub fn patch_for(pod: &Pod, injected: &Pod) -> Result<json_patch::Patch, Error> {
    Ok(json_patch::diff(
        &serde_json::to_value(pod)?,
        &serde_json::to_value(injected)?,
    ))
}

/// The AdmissionReview answer for one request body.
pub fn review(body: &[u8], s: &SidecarSettings) -> Result<AdmissionReview<DynamicObject>, Error> {
    let review: AdmissionReview<Pod> = serde_json::from_slice(body)?;
    let req: AdmissionRequest<Pod> = review
        .try_into()
        .map_err(|e| Error::Config(format!("AdmissionReview without request: {e}")))?;
    let mut resp = AdmissionResponse::from(&req);
    let who = format!(
        "{}/{}",
        req.namespace.as_deref().unwrap_or_default(),
        req.object
            .as_ref()
            .and_then(|p| p.metadata.name.clone().or(p.metadata.generate_name.clone()))
            .unwrap_or_default()
    );
    if let Some(pod) = &req.object {
        match inject(pod, s) {
            Decision::Skip { reason, warn } => {
                debug!(pod = %who, %reason, "not injecting");
                if warn {
                    resp.warnings = Some(vec![reason]);
                }
            }
            Decision::Deny(msg) => {
                info!(pod = %who, reason = %msg, "rejecting pod");
                resp = resp.deny(msg);
            }
            Decision::Inject(injected) => {
                let patch = patch_for(pod, &injected)?;
                resp = resp
                    .with_patch(patch)
                    .map_err(|e| Error::Config(format!("serializing the patch: {e}")))?;
                info!(pod = %who, "injected the sidecar");
            }
        }
    }
    Ok(resp.into_review())
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// The connection Secret of the policy a pod names, if the policy uses Redis through one.
/// Looked up per admission (a GET): every replica serves the webhook, not only the leader
/// whose caches are warm. A failed lookup injects without it; the sidecar then has no URL,
/// logs so, and applies the policy's fail mode. A `passwordSecretRef` (refused by the CRD,
/// but an object stored before that rule may still hold one) is never injected: it would
/// send the password to whatever URL the policy names.
async fn redis_connection_ref(client: &kube::Client, body: &[u8]) -> Option<String> {
    let review: AdmissionReview<Pod> = serde_json::from_slice(body).ok()?;
    let req: AdmissionRequest<Pod> = review.try_into().ok()?;
    let ns = req.namespace.clone()?;
    let policy = req
        .object
        .as_ref()?
        .metadata
        .annotations
        .as_ref()?
        .get(POLICY_ANNOTATION)?
        .clone();
    let api: kube::Api<crate::crd::RateLimitPolicy> = kube::Api::namespaced(client.clone(), &ns);
    let p = tokio::time::timeout(Duration::from_secs(2), api.get_opt(&policy))
        .await
        .ok()?
        .ok()??;
    let store = p.spec.store?;
    Some(store.redis?.connection_secret_ref?.name)
}

async fn handle(
    req: Request<Incoming>,
    settings: Arc<SidecarSettings>,
    client: Option<kube::Client>,
    reports: Option<Arc<crate::reports::Reports>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method(), req.uri().path(), reports) {
        // Sidecars report here, over TLS, so their tokens never cross the network in clear
        // (the admin port refuses reports by default). Same handler as ever: authenticated
        // from the headers before the body is read; a standby forwards to the leader.
        (&http::Method::POST, "/v1/reports", Some(reports)) => {
            let (parts, body) = req.into_parts();
            let (status, text) = reports.handle(&parts.headers, body).await;
            return Ok(respond(status, "text/plain", text.into_bytes()));
        }
        (&http::Method::POST, "/mutate", _) => {}
        (&http::Method::GET, "/healthz", _) => {
            return Ok(respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()))
        }
        _ => {
            return Ok(respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found\n".to_vec(),
            ))
        }
    }
    // Pods are small; 4 MiB is far above any real one and bounds what a caller can make us buffer.
    let body = match http_body_util::Limited::new(req.into_body(), 4 * 1024 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(respond(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                b"request too large\n".to_vec(),
            ))
        }
    };
    let redis = match &client {
        Some(c) => redis_connection_ref(c, &body).await,
        None => None,
    };
    let settings = match redis {
        Some(r) => Arc::new(SidecarSettings {
            redis_connection: Some(r),
            ..(*settings).clone()
        }),
        None => settings,
    };
    let out = review(&body, &settings).and_then(|r| Ok(serde_json::to_vec(&r)?));
    Ok(match out {
        Ok(json) => respond(StatusCode::OK, "application/json", json),
        Err(e) => {
            warn!(error = %e, "bad admission request");
            respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{e}\n").into_bytes(),
            )
        }
    })
}

/// Binds now (so a bad address fails startup) and serves TLS in the background with whatever
/// certificate `certs` holds at handshake time.
pub async fn serve(
    addr: SocketAddr,
    certs: Arc<CertStore>,
    settings: SidecarSettings,
    client: Option<kube::Client>,
    reports: Option<Arc<crate::reports::Reports>>,
) -> Result<SocketAddr, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(%local, "webhook server listening (TLS)");
    let settings = Arc::new(settings);
    // The handshake runs in the connection's task, bounded by the stack's header timeout, so
    // a handshake that stalls never holds up accepting others.
    let tls = move |stream: tokio::net::TcpStream, _peer: SocketAddr| {
        let acceptor = acceptor.clone();
        async move {
            stream.set_nodelay(true)?;
            acceptor.accept(stream).await
        }
    };
    tokio::spawn(keylimit_httpserver::serve(
        listener,
        keylimit_httpserver::ServerConfig {
            name: "webhook",
            // Every sidecar keeps a pooled connection here for its reports.
            max_connections: 16_384,
            ..keylimit_httpserver::ServerConfig::default()
        },
        tls,
        move |_peer, req| handle(req, settings.clone(), client.clone(), reports.clone()),
        std::future::pending(),
    ));
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use kube::api::ObjectMeta;

    fn app_pod(annotations: &[(&str, &str)], labels: &[(&str, &str)]) -> Pod {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        Pod {
            metadata: ObjectMeta {
                name: Some("api-1".into()),
                namespace: Some("shop".into()),
                annotations: map(annotations),
                labels: map(labels),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("app:1".into()),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..Default::default()
                        },
                        ContainerPort {
                            name: Some("grpc".into()),
                            container_port: 9000,
                            ..Default::default()
                        },
                    ]),
                    readiness_probe: Some(Probe {
                        http_get: Some(HTTPGetAction {
                            path: Some("/ready".into()),
                            port: IntOrString::String("http".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn settings() -> SidecarSettings {
        SidecarSettings {
            sidecar_cpu_request: Some("20m".into()),
            sidecar_memory_request: Some("32Mi".into()),
            sidecar_memory_limit: Some("128Mi".into()),
            sidecar_report_url: Some("http://keylimit.keylimit-system.svc:8080/v1/reports".into()),
            ..Default::default()
        }
    }

    #[test]
    fn redis_url_password_and_ca_come_from_one_secret() {
        let pod = app_pod(
            &[("keylimit.dev/policy", "orders")],
            &[("keylimit.dev/inject", "enabled")],
        );
        let s = SidecarSettings {
            redis_connection: Some("redis-conn".into()),
            ..settings()
        };
        let Decision::Inject(p) = inject(&pod, &s) else {
            panic!("expected injection");
        };
        let env = sidecar(&p).env.unwrap_or_default();
        for (name, key, optional) in [
            ("KEYLIMIT_REDIS_URL", "url", false),
            ("KEYLIMIT_REDIS_PASSWORD", "password", true),
            ("KEYLIMIT_REDIS_CA", "ca.crt", true),
        ] {
            let e = env.iter().find(|e| e.name == name).expect(name);
            let r = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .expect("secretKeyRef");
            assert_eq!(
                (r.name.as_str(), r.key.as_str(), r.optional),
                ("redis-conn", key, Some(optional)),
                "{name}"
            );
            assert!(e.value.is_none(), "{name} is never inlined");
        }
        let plain = sidecar(&injected(&pod)).env.unwrap_or_default();
        assert!(plain.iter().all(|e| !e.name.starts_with("KEYLIMIT_REDIS")));
    }

    fn injected(pod: &Pod) -> Pod {
        match inject(pod, &settings()) {
            Decision::Inject(p) => *p,
            other => panic!("expected injection, got {other:?}"),
        }
    }

    fn sidecar(pod: &Pod) -> Container {
        let spec = pod.spec.as_ref().expect("spec");
        let mut side = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.name == SIDECAR_NAME);
        let c = side.next().expect("sidecar in initContainers").clone();
        assert!(side.next().is_none(), "exactly one sidecar");
        c
    }

    fn arg_after(c: &Container, flag: &str) -> Option<String> {
        let args = c.args.clone().unwrap_or_default();
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1).cloned()
    }

    #[test]
    fn api_config_source_watches_the_policy_into_a_writable_dir() {
        let pod = app_pod(
            &[
                (POLICY_ANNOTATION, "gold"),
                (CONFIG_SOURCE_ANNOTATION, "api"),
            ],
            &[],
        );
        let out = injected(&pod);
        let c = sidecar(&out);
        assert_eq!(
            arg_after(&c, "--configmap").as_deref(),
            Some("$(POD_NAMESPACE)/gold")
        );
        assert_eq!(
            arg_after(&c, "--hash-key-file"),
            Some(format!("{PROJECTED_DIR}/{HASH_KEY_FILE}"))
        );
        let env = c.env.clone().unwrap_or_default();
        let ns = env.iter().find(|e| e.name == "POD_NAMESPACE").expect("env");
        assert_eq!(
            ns.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.namespace")
        );
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        let at = |path: &str| mounts.iter().find(|m| m.mount_path == path).cloned();
        let cache = at(CONFIG_DIR).expect("config dir mount");
        assert_eq!(
            (cache.name.as_str(), cache.read_only),
            (CONFIG_CACHE_VOLUME, Some(false))
        );
        let projected = at(PROJECTED_DIR).expect("projected mount");
        assert_eq!(projected.read_only, Some(true));
        let vols = out
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        assert!(vols
            .iter()
            .any(|v| v.name == CONFIG_CACHE_VOLUME && v.empty_dir.is_some()));

        // The default stays the kubelet volume, with no API access needed.
        let plain = sidecar(&injected(&app_pod(&[(POLICY_ANNOTATION, "gold")], &[])));
        assert_eq!(arg_after(&plain, "--configmap"), None);
        assert_eq!(
            arg_after(&plain, "--hash-key-file"),
            Some(format!("{CONFIG_DIR}/{HASH_KEY_FILE}"))
        );

        let bad = app_pod(
            &[
                (POLICY_ANNOTATION, "gold"),
                (CONFIG_SOURCE_ANNOTATION, "etcd"),
            ],
            &[],
        );
        match inject(&bad, &settings()) {
            Decision::Deny(m) => assert!(m.contains(CONFIG_SOURCE_ANNOTATION), "{m}"),
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn injects_a_native_sidecar_with_policy_volume_and_token() {
        let pod = app_pod(&[(POLICY_ANNOTATION, "gold")], &[]);
        let out = injected(&pod);
        let c = sidecar(&out);
        assert_eq!(c.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            arg_after(&c, "--upstream").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(arg_after(&c, "--listen").as_deref(), Some("0.0.0.0:4143"));
        assert_eq!(
            arg_after(&c, "--admin-listen").as_deref(),
            Some("0.0.0.0:4191")
        );
        assert_eq!(
            arg_after(&c, "--config-dir").as_deref(),
            Some("/etc/keylimit")
        );
        assert_eq!(
            arg_after(&c, "--sidecar-name").as_deref(),
            Some("$(POD_NAME)")
        );
        assert_eq!(
            arg_after(&c, "--report-token-file").as_deref(),
            Some("/var/run/secrets/keylimit/token")
        );
        assert!(arg_after(&c, "--report-url").is_some());
        assert!(!c
            .args
            .clone()
            .unwrap_or_default()
            .contains(&"--fail-open-before-config".into()));
        let env = c.env.clone().unwrap_or_default();
        assert!(env.iter().any(|e| e.name == "POD_NAME"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("metadata.name")));
        assert!(env
            .iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("info")));
        // No CPU limit: one worker, not one per node CPU.
        assert!(env
            .iter()
            .any(|e| e.name == "KEYLIMIT_WORKER_THREADS" && e.value.as_deref() == Some("1")));
        assert_eq!(
            c.readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.as_deref()),
            Some("/readyz")
        );
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.as_deref()),
            Some("/healthz")
        );

        let vols = out
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let cfg = vols
            .iter()
            .find(|v| v.name == CONFIG_VOLUME)
            .expect("config volume");
        let sources = cfg
            .projected
            .as_ref()
            .and_then(|p| p.sources.clone())
            .unwrap_or_default();
        // The main ConfigMap, every possible shard, and the hash key.
        assert_eq!(sources.len(), 2 + MAX_SHARDS);
        let names: Vec<(String, Option<bool>)> = sources
            .iter()
            .filter_map(|s| s.config_map.as_ref().map(|c| (c.name.clone(), c.optional)))
            .collect();
        assert_eq!(names[0], ("keylimit-gold".to_string(), Some(false)));
        assert_eq!(
            names[1],
            ("keylimit-gold-keys-0001".to_string(), Some(true))
        );
        assert_eq!(
            names[32],
            ("keylimit-gold-keys-0032".to_string(), Some(true))
        );
        let tok = vols
            .iter()
            .find(|v| v.name == TOKEN_VOLUME)
            .expect("token volume");
        let sat = tok
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .and_then(|s| s[0].service_account_token.clone())
            .expect("token projection");
        assert_eq!(sat.audience.as_deref(), Some("keylimit"));
        assert_eq!(sat.expiration_seconds, Some(3600));
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        assert!(mounts.iter().all(|m| m.read_only == Some(true)));
        assert!(mounts.iter().any(|m| m.mount_path == "/etc/keylimit"));
        assert!(mounts
            .iter()
            .any(|m| m.mount_path == "/var/run/secrets/keylimit"));
        assert_eq!(
            out.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(INJECTED_ANNOTATION))
                .map(String::as_str),
            Some("gold")
        );
    }

    #[test]
    fn sidecar_gets_the_hash_key_from_the_config_volume() {
        let out = injected(&app_pod(&[(POLICY_ANNOTATION, "gold")], &[]));
        let spec = out.spec.as_ref().expect("spec");
        let cfg = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == CONFIG_VOLUME)
            .expect("config volume");
        let secrets: Vec<_> = cfg
            .projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|s| s.secret.clone())
            .collect();
        assert_eq!(secrets.len(), 1, "{secrets:?}");
        assert_eq!(secrets[0].name, "keylimit-hash-key");
        assert_eq!(secrets[0].optional, Some(false));
        let items = secrets[0].items.clone().unwrap_or_default();
        assert_eq!(items.len(), 1);
        assert_eq!(
            (items[0].key.as_str(), items[0].path.as_str()),
            ("key", HASH_KEY_FILE)
        );
        // Only the sidecar mounts the volume; the app container never sees the key.
        assert!(spec.containers.iter().all(|c| c
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| m.name != CONFIG_VOLUME)));
        let sidecar = spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == SIDECAR_NAME)
            .expect("sidecar");
        let args = sidecar.args.clone().unwrap_or_default();
        let i = args
            .iter()
            .position(|a| a == "--hash-key-file")
            .expect("--hash-key-file");
        assert_eq!(
            args.get(i + 1).map(String::as_str),
            Some("/etc/keylimit/keylimit-hash-key")
        );
    }

    #[test]
    fn takes_over_the_http_port_and_keeps_app_probes_on_the_app() {
        let out = injected(&app_pod(&[(POLICY_ANNOTATION, "gold")], &[]));
        let spec = out.spec.as_ref().expect("spec");
        let app = &spec.containers[0];
        let ports = app.ports.clone().unwrap_or_default();
        assert_eq!(ports[0].name.as_deref(), Some(APP_PORT_RENAME));
        assert_eq!(ports[0].container_port, 8080);
        assert_eq!(
            ports[1].name.as_deref(),
            Some("grpc"),
            "other ports untouched"
        );
        assert_eq!(
            app.readiness_probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .map(|h| h.port.clone()),
            Some(IntOrString::String(APP_PORT_RENAME.into()))
        );
        let c = sidecar(&out);
        let sp = c.ports.clone().unwrap_or_default();
        assert_eq!(sp[0].name.as_deref(), Some("http"));
        assert_eq!(sp[0].container_port, 4143);
    }

    #[test]
    fn port_annotation_selects_another_port() {
        let out = injected(&app_pod(
            &[(POLICY_ANNOTATION, "gold"), (PORT_ANNOTATION, "grpc")],
            &[],
        ));
        let c = sidecar(&out);
        assert_eq!(
            arg_after(&c, "--upstream").as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(
            c.ports.clone().unwrap_or_default()[0].name.as_deref(),
            Some("grpc")
        );
        let app_ports = out.spec.as_ref().expect("spec").containers[0]
            .ports
            .clone()
            .unwrap_or_default();
        assert_eq!(app_ports[0].name.as_deref(), Some("http"));
        assert_eq!(app_ports[1].name.as_deref(), Some(APP_PORT_RENAME));
    }

    #[test]
    fn sidecar_is_restricted() {
        let c = sidecar(&injected(&app_pod(&[(POLICY_ANNOTATION, "gold")], &[])));
        let sc = c.security_context.expect("securityContext");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            sc.seccomp_profile.map(|s| s.type_),
            Some("RuntimeDefault".to_string())
        );
        assert!(sc.run_as_user.is_some_and(|u| u > 0));
    }

    #[test]
    fn worker_threads_follow_the_cpu_limit_rounded_up() {
        for (limit, want) in [
            (None, 1),
            (Some("500m"), 1),
            (Some("1"), 1),
            (Some("1500m"), 2),
            (Some("2"), 2),
            (Some("0.25"), 1),
            (Some("4k"), 1),
            (Some("100000"), 64),
        ] {
            assert_eq!(sidecar_worker_threads(limit), want, "{limit:?}");
        }
    }

    #[test]
    fn annotations_override_resources_fail_mode_and_log_level() {
        let out = injected(&app_pod(
            &[
                (POLICY_ANNOTATION, "gold"),
                (CPU_ANNOTATION, "250m"),
                (MEMORY_ANNOTATION, "256Mi"),
                (FAIL_MODE_ANNOTATION, "open"),
                (LOG_LEVEL_ANNOTATION, "debug,hyper=info"),
            ],
            &[],
        ));
        let c = sidecar(&out);
        let r = c.resources.clone().expect("resources");
        let q = |m: &Option<BTreeMap<String, Quantity>>, k: &str| {
            m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone())
        };
        assert_eq!(q(&r.requests, "cpu").as_deref(), Some("250m"));
        assert_eq!(q(&r.requests, "memory").as_deref(), Some("256Mi"));
        assert_eq!(q(&r.limits, "memory").as_deref(), Some("256Mi"));
        assert!(c
            .args
            .clone()
            .unwrap_or_default()
            .contains(&"--fail-open-before-config".into()));
        let env = c.env.clone().unwrap_or_default();
        assert!(env
            .iter()
            .any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug,hyper=info")));

        // Defaults when not annotated.
        let d = sidecar(&injected(&app_pod(&[(POLICY_ANNOTATION, "gold")], &[])));
        let r = d.resources.expect("resources");
        assert_eq!(q(&r.requests, "cpu").as_deref(), Some("20m"));
        assert_eq!(q(&r.limits, "memory").as_deref(), Some("128Mi"));
    }

    #[test]
    fn bad_overrides_are_rejected_with_the_reason() {
        for (k, v) in [
            (CPU_ANNOTATION, "lots"),
            (MEMORY_ANNOTATION, "1 GB"),
            (FAIL_MODE_ANNOTATION, "sometimes"),
            (LOG_LEVEL_ANNOTATION, "debug; rm -rf"),
            (PORT_ANNOTATION, "8080"),
        ] {
            match inject(
                &app_pod(&[(POLICY_ANNOTATION, "gold"), (k, v)], &[]),
                &settings(),
            ) {
                Decision::Deny(msg) => assert!(msg.contains(k), "{msg}"),
                other => panic!("{k}={v}: expected a denial, got {other:?}"),
            }
        }
        match inject(
            &app_pod(&[(POLICY_ANNOTATION, "Not_A_Name")], &[]),
            &settings(),
        ) {
            Decision::Deny(msg) => assert!(msg.contains(POLICY_ANNOTATION)),
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn missing_port_or_port_conflicts_are_rejected() {
        let mut pod = app_pod(
            &[(POLICY_ANNOTATION, "gold"), (PORT_ANNOTATION, "web")],
            &[],
        );
        assert!(matches!(inject(&pod, &settings()), Decision::Deny(m) if m.contains("\"web\"")));
        pod = app_pod(&[(POLICY_ANNOTATION, "gold")], &[]);
        if let Some(spec) = pod.spec.as_mut() {
            spec.containers[0]
                .ports
                .get_or_insert_with(Vec::new)
                .push(ContainerPort {
                    container_port: 4191,
                    ..Default::default()
                });
        }
        assert!(matches!(inject(&pod, &settings()), Decision::Deny(m) if m.contains("4191")));
    }

    #[test]
    fn opt_outs_are_left_alone() {
        let disabled = app_pod(
            &[(POLICY_ANNOTATION, "gold")],
            &[(INJECT_LABEL, "disabled")],
        );
        assert!(matches!(
            inject(&disabled, &settings()),
            Decision::Skip { warn: false, .. }
        ));
        let no_policy = app_pod(&[], &[(INJECT_LABEL, "enabled")]);
        assert!(matches!(
            inject(&no_policy, &settings()),
            Decision::Skip { warn: true, .. }
        ));
        let blank = app_pod(&[(POLICY_ANNOTATION, "  ")], &[]);
        assert!(matches!(inject(&blank, &settings()), Decision::Skip { .. }));
    }

    #[test]
    fn injection_is_idempotent() {
        let once = injected(&app_pod(&[(POLICY_ANNOTATION, "gold")], &[]));
        assert!(matches!(
            inject(&once, &settings()),
            Decision::Skip { warn: false, .. }
        ));
        // The patch applied to the original gives exactly the injected pod.
        let original = app_pod(&[(POLICY_ANNOTATION, "gold")], &[]);
        let patch = patch_for(&original, &once).expect("patch");
        let mut doc = serde_json::to_value(&original).expect("json");
        json_patch::patch(&mut doc, &patch).expect("apply");
        assert_eq!(doc, serde_json::to_value(&once).expect("json"));
    }

    #[test]
    fn review_round_trip() {
        let pod = app_pod(&[(POLICY_ANNOTATION, "gold")], &[]);
        let body = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0d3d2f5c-1111-2222-3333-444455556666",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "alice"},
                "object": pod,
                "dryRun": false,
            }
        });
        let out = review(&serde_json::to_vec(&body).expect("json"), &settings()).expect("review");
        let resp = out.response.expect("response");
        assert!(resp.allowed);
        assert_eq!(resp.uid, "0d3d2f5c-1111-2222-3333-444455556666");
        assert!(resp.patch.is_some());
        assert!(review(b"{}", &settings()).is_err());
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "1", "0.5", "64Mi", "1Gi", "1e3", "2k"] {
            assert!(valid_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "lots", "1 GB", "1.2.3", "64MB"] {
            assert!(!valid_quantity(bad), "{bad}");
        }
    }

    /// An https report URL brings the CA ConfigMap (not optional) and the flag naming it; a
    /// plain one (development) brings neither.
    #[test]
    fn https_reports_mount_the_ca_bundle() {
        let pod = app_pod(&[(POLICY_ANNOTATION, "gold")], &[]);
        let tls = SidecarSettings {
            sidecar_report_url: Some(
                "https://keylimit-webhook.keylimit-system.svc/v1/reports".into(),
            ),
            ..settings()
        };
        let Decision::Inject(out) = inject(&pod, &tls) else {
            panic!("expected injection");
        };
        let c = sidecar(&out);
        assert_eq!(
            arg_after(&c, "--report-ca-file").as_deref(),
            Some("/etc/keylimit-ca/ca.crt")
        );
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == CA_VOLUME)
            .expect("CA mount");
        assert_eq!(mount.mount_path, CA_DIR);
        assert_eq!(mount.read_only, Some(true));
        let vol = out
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .find(|v| v.name == CA_VOLUME)
            .and_then(|v| v.config_map.clone())
            .expect("CA volume");
        assert_eq!(vol.name, CA_CONFIG_MAP);
        assert_eq!(vol.optional, Some(false));

        let plain = SidecarSettings {
            sidecar_report_url: Some("http://127.0.0.1:8080/v1/reports".into()),
            ..settings()
        };
        let Decision::Inject(out) = inject(&pod, &plain) else {
            panic!("expected injection");
        };
        let c = sidecar(&out);
        assert!(arg_after(&c, "--report-ca-file").is_none());
        assert!(!out
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .any(|v| v.name == CA_VOLUME));
    }
}
