//! End-to-end: sidecar injection through the real kube-apiserver. There is no kubelet, so the
//! operator runs locally with its webhook on 127.0.0.1 and the chart's own webhook
//! configuration is registered with `clientConfig.url` pointing at it; the operator patches
//! the caBundle itself, and the apiserver calls it over TLS for every Pod it admits. Run by
//! `hack/test.sh`; ignored by a plain `cargo test`.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use keylimit_e2e::*;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// The chart's MutatingWebhookConfiguration, rendered by helm, retargeted for this test: named
/// `name`, calling `url` instead of the in-cluster Service, and matching only `namespaces` (so
/// tests running side by side never see each other's webhook). Selectors, rules, failure
/// policy, timeouts and reinvocation are the chart's.
async fn chart_webhook_config(
    name: &str,
    url: &str,
    namespaces: &[&str],
    extra_set: &[&str],
) -> anyhow::Result<Value> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "kl-e2e",
        chart.to_str().unwrap_or_default(),
        "--namespace",
        "keylimit-e2e-system",
        "--show-only",
        "templates/mutatingwebhookconfiguration.yaml",
    ];
    for s in extra_set {
        args.extend(["--set", s]);
    }
    let yaml = helm(&args).await?;
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
    for h in hooks {
        h["clientConfig"] = json!({"url": url});
        let exprs = h["namespaceSelector"]["matchExpressions"]
            .as_array_mut()
            .ok_or_else(|| anyhow!("webhook without namespaceSelector expressions"))?;
        exprs.push(json!({
            "key": "kubernetes.io/metadata.name",
            "operator": "In",
            "values": namespaces,
        }));
    }
    Ok(cfg)
}

async fn create_namespace(env: &Env, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(env.client.clone());
    let mut l: std::collections::BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.insert("keylimit.dev/e2e".into(), "true".into());
    api.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(l),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await?;
    // Pods are refused until the namespace's default ServiceAccount exists.
    let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), name);
    eventually(T, &format!("ServiceAccount {name}/default"), || async {
        sas.get_opt("default").await.ok().flatten()
    })
    .await?;
    Ok(())
}

/// An app pod that passes Pod Security "restricted" by itself, with its API on a port named
/// `http` that a readiness probe also uses.
fn app_pod(name: &str, labels: Value, annotations: Value) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app",
                "image": "registry.example/api:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]},
                    "readOnlyRootFilesystem": true,
                },
            }],
        },
    }))?)
}

fn sidecar_of(pod: &Pod) -> Option<k8s_openapi::api::core::v1::Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .iter()
        .find(|c| c.name == "keylimit-sidecar")
        .cloned()
}

fn untouched(pod: &Pod) -> bool {
    sidecar_of(pod).is_none()
        && pod.spec.as_ref().is_some_and(|s| {
            s.containers[0]
                .ports
                .as_ref()
                .is_some_and(|p| p[0].name.as_deref() == Some("http"))
        })
}

/// Creates `pod` in `ns` and returns what the apiserver stored.
async fn create_pod(env: &Env, ns: &str, pod: &Pod) -> anyhow::Result<Pod> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    Ok(api.create(&PostParams::default(), pod).await?)
}

/// Scenario: the apiserver calls the operator's webhook over TLS (certificate and caBundle made
/// by the operator) and:
/// - a pod in an opted-in namespace that enforces Pod Security "restricted" gets the native
///   sidecar, its port taken over, and is admitted;
/// - a pod labelled `keylimit.dev/inject=enabled` in a plain namespace gets it too;
/// - a pod without the label there, and one labelled `disabled` in the opted-in namespace, are
///   untouched;
/// - a pod that names a policy but has no port to take over is rejected with the reason;
/// - with the operator stopped, failurePolicy Ignore admits opted-in pods without the sidecar,
///   and failurePolicy Fail rejects them.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn webhook_injects_opted_in_pods_over_tls() {
    scenario("webhook", async |env: &mut Env| {
        let plain_ns = format!("{}-plain", env.ns);
        let cfg_name = format!("keylimit-{}", env.ns);
        let r = async {
            let opted_ns = env.ns.clone();
            kubectl(
                &[
                    "label", "namespace", &opted_ns,
                    "keylimit.dev/inject=enabled",
                    "pod-security.kubernetes.io/enforce=restricted",
                ],
                None,
            )
            .await?;
            create_namespace(env, &plain_ns, &[("pod-security.kubernetes.io/enforce", "restricted")]).await?;

            // Register first (no caBundle yet), so the operator's first refresh patches it.
            let port = free_port()?;
            let url = format!("https://127.0.0.1:{port}/mutate");
            // Ignore (the chart's default is Fail) for the webhook-down check below.
            let cfg = chart_webhook_config(&cfg_name, &url, &[&opted_ns, &plain_ns], &["webhook.failurePolicy=Ignore"]).await?;
            kubectl(&["create", "-f", "-"], Some(&cfg.to_string())).await?;

            let admin = free_port()?;
            let args = [
                "run".to_string(),
                "--no-leader-election".into(),
                format!("--watch-namespace={opted_ns}"),
                format!("--admin-addr=127.0.0.1:{admin}"),
                format!("--webhook-addr=127.0.0.1:{port}"),
                format!("--webhook-namespace={opted_ns}"),
                "--webhook-service=keylimit-webhook".into(),
                format!("--webhook-config-name={cfg_name}"),
                "--webhook-cert-secret=keylimit-webhook-cert".into(),
                "--webhook-extra-san=127.0.0.1".into(),
                "--sidecar-image=registry.example/keylimit-sidecar:e2e".into(),
                "--sidecar-cpu-request=20m".into(),
                "--sidecar-memory-request=32Mi".into(),
                "--sidecar-memory-limit=128Mi".into(),
                "--sidecar-report-url=http://keylimit.keylimit-system.svc:8080/v1/reports".into(),
            ];
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut op = env.spawn("operator-webhook", &bin("keylimit-operator"), &argv).await?;

            let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
            await_object(&mwcs, &cfg_name, "caBundle patched by the operator", T, |m: Option<&MutatingWebhookConfiguration>| {
                m.and_then(|m| m.webhooks.as_ref()).is_some_and(|ws| {
                    ws.iter().all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| !b.0.is_empty()))
                })
            })
            .await?;
            // The served certificate's expiry is on /metrics (the cert-expiry alert reads it):
            // about a year ahead, not 0.
            let expiry = eventually(T, "the certificate expiry gauge", || async {
                let m = get(&format!("http://127.0.0.1:{admin}/metrics"), &[]).await.ok()?;
                let text = String::from_utf8_lossy(&m.body).to_string();
                let line = text.lines().find(|l| l.starts_with("keylimit_operator_webhook_cert_expiry_timestamp_seconds "))?;
                line.rsplit(' ').next()?.parse::<i64>().ok().filter(|v| *v > 0)
            })
            .await?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            ensure!(expiry - now > 300 * 86_400 && expiry - now < 400 * 86_400, "certificate expiry {expiry}, now {now}");

            // The apiserver picks up the new caBundle asynchronously; with failurePolicy Ignore
            // a call before that admits the pod uninjected. Dry runs (the webhook has no side
            // effects, so it is called for them too) tell when the webhook is live.
            let probe = app_pod("probe", json!({}), json!({"keylimit.dev/policy": "gold"}))?;
            let pods: Api<Pod> = Api::namespaced(env.client.clone(), &opted_ns);
            eventually(T, "the apiserver to call the webhook", || async {
                pods.create(&PostParams { dry_run: true, ..Default::default() }, &probe)
                    .await
                    .ok()
                    .filter(|p| sidecar_of(p).is_some())
            })
            .await?;

            // Namespace opt-in, under Pod Security "restricted".
            let pod = create_pod(
                env,
                &opted_ns,
                &app_pod(
                    "api",
                    json!({"app": "api"}),
                    json!({"keylimit.dev/policy": "gold", "keylimit.dev/sidecar-memory": "64Mi", "keylimit.dev/fail-mode": "open"}),
                )?,
            )
            .await
            .context("creating the opted-in pod in a restricted namespace")?;
            let side = sidecar_of(&pod).ok_or_else(|| anyhow!("no sidecar in {pod:?}"))?;
            ensure!(side.restart_policy.as_deref() == Some("Always"), "not a native sidecar");
            let args = side.args.clone().unwrap_or_default();
            ensure!(args.windows(2).any(|w| w[0] == "--upstream" && w[1] == "http://127.0.0.1:8080"), "args: {args:?}");
            ensure!(args.contains(&"--fail-open-before-config".to_string()), "fail-mode annotation ignored: {args:?}");
            let mem = side
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .map(|q| q.0.clone());
            ensure!(mem.as_deref() == Some("64Mi"), "memory annotation ignored: {mem:?}");
            let sp = side.ports.clone().unwrap_or_default();
            ensure!(sp.iter().any(|p| p.name.as_deref() == Some("http") && p.container_port == 4143), "sidecar ports: {sp:?}");
            let spec = pod.spec.clone().unwrap_or_default();
            let app_ports = spec.containers[0].ports.clone().unwrap_or_default();
            ensure!(app_ports[0].name.as_deref() == Some("kl-app") && app_ports[0].container_port == 8080, "app ports: {app_ports:?}");
            let vols = spec.volumes.clone().unwrap_or_default();
            let cfg_vol = vols.iter().find(|v| v.name == "keylimit-config").ok_or_else(|| anyhow!("no config volume: {vols:?}"))?;
            let sources = cfg_vol.projected.as_ref().and_then(|p| p.sources.clone()).unwrap_or_default();
            ensure!(sources.len() == 34, "projected sources (main, 32 shards, hash key): {}", sources.len());
            ensure!(sources.iter().any(|s| s.secret.as_ref().is_some_and(|s| s.name == "keylimit-hash-key")), "no hash-key source: {sources:?}");
            ensure!(vols.iter().any(|v| v.name == "keylimit-token"), "no token volume");

            // A Redis policy: the sidecar gets URL and password from the policy's one
            // connection Secret, by reference (the policy need not exist before the pod; here
            // it does).
            env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: orders}\nspec:\n  selector: {matchLabels: {app: orders}}\n  limits: {concurrency: 5}\n  store:\n    type: Redis\n    redis: {connectionSecretRef: {name: redis-conn}}\n").await?;
            let redis_pod = create_pod(env, &opted_ns, &app_pod("redis-user", json!({}), json!({"keylimit.dev/policy": "orders"}))?).await?;
            let side = sidecar_of(&redis_pod).context("no sidecar on the Redis policy's pod")?;
            let side_env = side.env.unwrap_or_default();
            for (name, key) in [("KEYLIMIT_REDIS_URL", "url"), ("KEYLIMIT_REDIS_PASSWORD", "password")] {
                let e = side_env.iter().find(|e| e.name == name).with_context(|| format!("no {name}"))?;
                let sref = e.value_from.clone().and_then(|v| v.secret_key_ref).with_context(|| format!("{name} not from a Secret"))?;
                ensure!(sref.name == "redis-conn" && sref.key == key, "{name}: {sref:?}");
            }

            // Pod-label opt-in in a namespace that did not opt in; and the opt-outs.
            let labelled = create_pod(
                env,
                &plain_ns,
                &app_pod("labelled", json!({"keylimit.dev/inject": "enabled"}), json!({"keylimit.dev/policy": "gold"}))?,
            )
            .await?;
            ensure!(sidecar_of(&labelled).is_some(), "pod-label opt-in not injected");
            let plain = create_pod(env, &plain_ns, &app_pod("plain", json!({}), json!({"keylimit.dev/policy": "gold"}))?).await?;
            ensure!(untouched(&plain), "a pod that did not opt in was changed: {plain:?}");
            let disabled = create_pod(
                env,
                &opted_ns,
                &app_pod("disabled", json!({"keylimit.dev/inject": "disabled"}), json!({"keylimit.dev/policy": "gold"}))?,
            )
            .await?;
            ensure!(untouched(&disabled), "an opted-out pod was changed: {disabled:?}");
            let no_policy = create_pod(env, &opted_ns, &app_pod("no-policy", json!({}), json!({}))?).await?;
            ensure!(untouched(&no_policy), "a pod without a policy was changed");

            // A pod that names a policy but cannot be injected correctly is refused, loudly.
            let mut bad = app_pod("bad-port", json!({}), json!({"keylimit.dev/policy": "gold"}))?;
            if let Some(s) = bad.spec.as_mut() {
                s.containers[0].ports = None;
                s.containers[0].readiness_probe = None;
            }
            match create_pod(env, &opted_ns, &bad).await {
                Ok(p) => bail!("pod without an http port was admitted: {p:?}"),
                Err(e) => ensure!(e.to_string().contains("no container has a port named"), "denial: {e}"),
            }

            // The webhook down: failurePolicy Ignore admits the pod as is.
            op.terminate(Duration::from_secs(20)).await?;
            let down = create_pod(env, &opted_ns, &app_pod("while-down", json!({}), json!({"keylimit.dev/policy": "gold"}))?)
                .await
                .context("failurePolicy Ignore must admit pods while the webhook is down")?;
            ensure!(untouched(&down), "pod changed while the webhook was down");
            // failurePolicy Fail refuses them instead.
            let patch: Vec<Value> = (0..2)
                .map(|i| json!({"op": "replace", "path": format!("/webhooks/{i}/failurePolicy"), "value": "Fail"}))
                .collect();
            mwcs.patch(&cfg_name, &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(Value::Array(patch))?))
                .await?;
            let refused = eventually(T, "failurePolicy Fail to refuse pods while the webhook is down", || async {
                let p = app_pod("refused", json!({}), json!({"keylimit.dev/policy": "gold"})).ok()?;
                match pods.create(&PostParams { dry_run: true, ..Default::default() }, &p).await {
                    Err(e) => Some(e.to_string()),
                    Ok(_) => None,
                }
            })
            .await?;
            ensure!(refused.contains("failed calling webhook"), "refusal: {refused}");
            Ok(())
        }
        .await;
        let _ = mwcs_delete(env, &cfg_name).await;
        let nsapi: Api<Namespace> = Api::all(env.client.clone());
        let _ = nsapi.delete(&plain_ns, &DeleteParams::default()).await;
        r
    })
    .await;
}

async fn mwcs_delete(env: &Env, name: &str) -> anyhow::Result<()> {
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    mwcs.delete(name, &DeleteParams::default()).await?;
    Ok(())
}
