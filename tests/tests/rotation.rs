//! End-to-end: webhook certificate rotation under load, through the real kube-apiserver. Two
//! webhook replicas (the operator's own certificate code and TLS server, in this process) share
//! one certificate Secret and rotate it every few seconds, while pods are created through the
//! apiserver without a pause and each replica's certificate is checked by fresh TLS handshakes
//! against the caBundle the apiserver had at that moment. Run by `hack/test.sh`; ignored by a
//! plain `cargo test`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use keylimit_e2e::*;
use keylimit_operator::certs::{self, pem_certs, CertStore, Source, Timing};
use keylimit_operator::webhook::{self, SidecarSettings};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
/// Certificates live 24 s, so a rotation starts 16 s after each one is made.
const VALIDITY: Duration = Duration::from_secs(24);
const TIMING: Timing = Timing {
    refresh: Duration::from_millis(500),
    propagation: Duration::from_secs(2),
    retire: Duration::from_secs(3),
};
/// A probe trusts only CAs the webhook configuration has shown for this long: time for the
/// apiserver's informer to see them (and much less than `TIMING.propagation`).
const TRUSTED_AFTER: Duration = Duration::from_secs(1);
const ROTATIONS: usize = 2;

/// The chart's MutatingWebhookConfiguration (default values: failure policy included),
/// retargeted: webhook `i` calls `urls[i]` and only matches `namespaces`.
async fn chart_webhook_config(
    name: &str,
    urls: &[String],
    namespaces: &[&str],
) -> anyhow::Result<Value> {
    let chart = chart_dir();
    let yaml = helm(&[
        "template",
        "kl-e2e",
        chart.to_str().unwrap_or_default(),
        "--namespace",
        "keylimit-e2e-system",
        "--show-only",
        "templates/mutatingwebhookconfiguration.yaml",
    ])
    .await?;
    let json = kubectl(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(&yaml),
    )
    .await?;
    let mut cfg: Value = serde_json::from_str(&json)?;
    cfg["metadata"] = json!({"name": name, "labels": {"keylimit.dev/e2e": "true"}});
    let hooks = cfg["webhooks"]
        .as_array_mut()
        .ok_or_else(|| anyhow!("rendered configuration has no webhooks"))?;
    ensure!(hooks.len() == urls.len(), "webhooks: {hooks:?}");
    for (h, url) in hooks.iter_mut().zip(urls) {
        h["clientConfig"] = json!({ "url": url });
        h["namespaceSelector"]["matchExpressions"]
            .as_array_mut()
            .ok_or_else(|| anyhow!("webhook without namespaceSelector expressions"))?
            .push(json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}));
    }
    Ok(cfg)
}

fn app_pod(labels: Value) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "api-", "labels": labels, "annotations": {"keylimit.dev/policy": "gold"}},
        "spec": {"containers": [{
            "name": "app",
            "image": "registry.example/api:1",
            "ports": [{"name": "http", "containerPort": 8080}],
        }]},
    }))?)
}

fn injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.name == "keylimit-sidecar"))
}

/// One webhook replica: the operator's certificate refresher and TLS server on `port`.
async fn replica(client: &Client, ns: &str, config: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let store = Arc::new(CertStore::default());
    let source = Source::Generated {
        client: client.clone(),
        namespace: ns.to_string(),
        secret: "keylimit-webhook-cert".into(),
        webhook_config: Some(config.to_string()),
        names: vec!["127.0.0.1".into()],
        validity: VALIDITY,
    };
    certs::start_with(source, store.clone(), TIMING).await?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    Ok(webhook::serve(
        addr,
        store,
        SidecarSettings::default(),
        Some(client.clone()),
        None,
    )
    .await?)
}

/// When each caBundle was first seen by a watch, as the CAs every webhook of the
/// configuration trusts.
type History = Arc<Mutex<Vec<(Instant, BTreeSet<String>)>>>;

fn record(history: &History, cfg: &MutatingWebhookConfiguration) {
    let mut common: Option<BTreeSet<String>> = None;
    for w in cfg.webhooks.iter().flatten() {
        let pem = w
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| String::from_utf8_lossy(&b.0).to_string())
            .unwrap_or_default();
        let cas: BTreeSet<String> = pem_certs(&pem).into_iter().collect();
        common = Some(match common {
            None => cas,
            Some(c) => c.intersection(&cas).cloned().collect(),
        });
    }
    if let Ok(mut h) = history.lock() {
        let cas = common.unwrap_or_default();
        if h.last().map(|(_, last)| last) != Some(&cas) {
            h.push((Instant::now(), cas));
        }
    }
}

/// The CAs the configuration has shown without a break since `at - TRUSTED_AFTER`.
fn trusted_at(history: &History, at: Instant) -> BTreeSet<String> {
    let Ok(h) = history.lock() else {
        return BTreeSet::new();
    };
    let Some(from) = at.checked_sub(TRUSTED_AFTER) else {
        return BTreeSet::new();
    };
    let Some(i) = h.iter().rposition(|(t, _)| *t <= from) else {
        return BTreeSet::new();
    };
    let mut set = h[i].1.clone();
    for (t, cas) in &h[i + 1..] {
        if *t <= at {
            set = set.intersection(cas).cloned().collect();
        }
    }
    set
}

/// Rotations completed so far: single-CA bundles seen, less the first.
fn rotations(history: &History) -> usize {
    history
        .lock()
        .map(|h| {
            h.iter()
                .filter(|(_, cas)| cas.len() == 1)
                .map(|(_, cas)| cas.clone())
                .collect::<BTreeSet<_>>()
                .len()
                .saturating_sub(1)
        })
        .unwrap_or(0)
}

/// Scenario: two webhook replicas rotate their certificate twice while pods are created
/// without a pause through the apiserver under the chart's webhook configuration.
/// - Every admission succeeds and injects the sidecar (a call the apiserver cannot verify
///   fails the pod under `failurePolicy: Fail`, or admits it without a sidecar under `Ignore`).
/// - Every fresh TLS handshake to either replica verifies against the CAs the configuration
///   had shown for at least a second: no replica ever serves a leaf the apiserver may not
///   trust yet. The one-step rotation (new leaf served, then the caBundle patched) fails this
///   at every rotation.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn rotation_under_load_never_fails_an_admission() {
    scenario("rotation", async |env: &mut Env| {
        let ns_opted = env.ns.clone();
        let ns_pods = format!("{}-pods", env.ns);
        let cfg_name = format!("keylimit-{}", env.ns);
        let r = async {
            kubectl(&["label", "namespace", &ns_opted, "keylimit.dev/inject=enabled"], None).await?;
            let nsapi: Api<Namespace> = Api::all(env.client.clone());
            nsapi
                .create(
                    &PostParams::default(),
                    &Namespace {
                        metadata: ObjectMeta {
                            name: Some(ns_pods.clone()),
                            labels: Some([("keylimit.dev/e2e".to_string(), "true".to_string())].into()),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                )
                .await?;
            for ns in [&ns_opted, &ns_pods] {
                let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), ns);
                eventually(T, &format!("ServiceAccount {ns}/default"), || async {
                    sas.get_opt("default").await.ok().flatten()
                })
                .await?;
            }

            // Webhook 0 (namespace opt-in) calls replica A, webhook 1 (pod opt-in) replica B.
            let ports = [free_port()?, free_port()?];
            let urls: Vec<String> = ports.iter().map(|p| format!("https://127.0.0.1:{p}/mutate")).collect();
            let cfg = chart_webhook_config(&cfg_name, &urls, &[&ns_opted, &ns_pods]).await?;
            let policy = cfg["webhooks"][0]["failurePolicy"].as_str().unwrap_or_default().to_string();
            kubectl(&["create", "-f", "-"], Some(&cfg.to_string())).await?;

            let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
            let history: History = Arc::default();
            let watch = {
                let (mwcs, history, name) = (mwcs.clone(), history.clone(), cfg_name.clone());
                tokio::spawn(async move {
                    let mut s = std::pin::pin!(kube::runtime::watcher::watch_object(mwcs, &name));
                    while let Some(ev) = s.next().await {
                        if let Ok(Some(cfg)) = ev {
                            record(&history, &cfg);
                        }
                    }
                })
            };

            let mut addrs = Vec::new();
            for port in ports {
                addrs.push(replica(&env.client, &ns_opted, &cfg_name, port).await?);
            }
            let opted: Api<Pod> = Api::namespaced(env.client.clone(), &ns_opted);
            let labelled: Api<Pod> = Api::namespaced(env.client.clone(), &ns_pods);
            let dry = PostParams { dry_run: true, ..Default::default() };
            let plain = app_pod(json!({}))?;
            let opted_in = app_pod(json!({"keylimit.dev/inject": "enabled"}))?;
            eventually(T, "the apiserver to call both webhooks", || async {
                let a = opted.create(&dry, &plain).await.ok().filter(injected)?;
                let b = labelled.create(&dry, &opted_in).await.ok().filter(injected)?;
                Some((a, b))
            })
            .await?;
            // The probes' standard: the first bundle must have been shown for TRUSTED_AFTER.
            eventually(T, "the first caBundle to be trusted", || async {
                (!trusted_at(&history, Instant::now()).is_empty()).then_some(())
            })
            .await?;
            let rotations_before = rotations(&history);

            // Load: pods through the apiserver, one after another in each namespace.
            let failures: Arc<Mutex<Vec<String>>> = Arc::default();
            let admitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let started = Instant::now();
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut load = Vec::new();
            for (api, pod) in [(opted.clone(), plain.clone()), (labelled.clone(), opted_in.clone())] {
                let (failures, admitted, done, dry) = (failures.clone(), admitted.clone(), done.clone(), dry.clone());
                load.push(tokio::spawn(async move {
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        match api.create(&dry, &pod).await {
                            Ok(p) if injected(&p) => {
                                admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(_) => push(&failures, format!("{:?}: admitted WITHOUT a sidecar", started.elapsed())),
                            Err(e) => push(&failures, format!("{:?}: {e}", started.elapsed())),
                        }
                    }
                }));
            }

            // Probes: a fresh handshake to each replica every 50 ms.
            let mut probes = 0usize;
            let mut bad_probes: Vec<String> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let outcome = loop {
                tick.tick().await;
                for addr in &addrs {
                    let at = Instant::now();
                    let trusted = trusted_at(&history, at);
                    let bundle: String = trusted.iter().cloned().collect();
                    probes += 1;
                    if let Err(e) = certs::check_served(*addr, "127.0.0.1", &bundle).await {
                        bad_probes.push(format!("{:?} {addr} ({} CAs trusted): {e}", started.elapsed(), trusted.len()));
                    }
                }
                if rotations(&history) >= rotations_before + ROTATIONS {
                    break Ok(());
                }
                if started.elapsed() > Duration::from_secs(150) {
                    break Err(anyhow!("only {} rotations in 150 s", rotations(&history) - rotations_before));
                }
            };
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            for l in load {
                let _ = l.await;
            }
            watch.abort();
            outcome?;
            let failures = failures.lock().map(|f| f.clone()).unwrap_or_default();
            let admitted = admitted.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "{ROTATIONS} rotations in {:?} (failurePolicy {policy}): {admitted} pods admitted with a sidecar, {} failed; {probes} handshakes, {} untrusted",
                started.elapsed(),
                failures.len(),
                bad_probes.len()
            );
            ensure!(
                bad_probes.is_empty(),
                "{} handshakes served a certificate the apiserver could not trust yet, e.g. {:#?}",
                bad_probes.len(),
                &bad_probes[..bad_probes.len().min(5)]
            );
            ensure!(
                failures.is_empty(),
                "{} admissions failed during rotation, e.g. {:#?}",
                failures.len(),
                &failures[..failures.len().min(5)]
            );
            ensure!(admitted >= 100, "only {admitted} admissions: the load did not run");
            Ok(())
        }
        .await;
        let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
        let _ = mwcs.delete(&cfg_name, &DeleteParams::default()).await;
        let nsapi: Api<Namespace> = Api::all(env.client.clone());
        let _ = nsapi.delete(&ns_pods, &DeleteParams::default()).await;
        r
    })
    .await;
}

fn push(failures: &Mutex<Vec<String>>, f: String) {
    if let Ok(mut v) = failures.lock() {
        v.push(f);
    }
}
