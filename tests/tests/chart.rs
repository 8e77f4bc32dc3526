//! End-to-end: the Helm chart (charts/keylimit) against a real kube-apiserver. It lints and
//! renders objects the apiserver accepts; `helm install`/`upgrade`/`uninstall` behave (CRDs
//! are kept); and the real operator binary, holding nothing but the chart's ServiceAccount
//! token, can do its whole job. Run by `hack/test.sh`; ignored by a plain `cargo test`
//! (except the CRD freshness check, which needs no cluster).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use keylimit_e2e::*;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::Api;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Helm's release name for a test namespace: short and unique, so cluster-scoped objects of
/// tests running side by side never collide.
fn release_for(ns: &str) -> String {
    format!("klt-{}", ns.rsplit('-').next().unwrap_or("0"))
}

fn fullname(release: &str) -> String {
    format!("{release}-keylimit")
}

async fn create_namespace(env: &Env, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(env.client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some([("keylimit.dev/e2e".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

async fn delete_namespace(env: &Env, name: &str) {
    let api: Api<Namespace> = Api::all(env.client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
}

/// The chart's CRDs are the generated ones, byte for byte (regenerate both with
/// `cargo run -p keylimit-operator -- crd --out crds --out charts/keylimit/crds`).
#[test]
fn chart_crds_are_the_generated_ones() -> anyhow::Result<()> {
    let manifests = keylimit_operator::crd_manifests()?;
    ensure!(!manifests.is_empty());
    let mut chart_files: Vec<String> = std::fs::read_dir(chart_dir().join("crds"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    chart_files.sort();
    let mut want: Vec<String> = manifests.iter().map(|(f, _)| f.clone()).collect();
    want.sort();
    ensure!(
        chart_files == want,
        "charts/keylimit/crds has {chart_files:?}, expected {want:?}"
    );
    for (file, yaml) in manifests {
        let expected = format!("{}{yaml}", keylimit_operator::CRD_HEADER);
        for dir in [repo_dir().join("crds"), chart_dir().join("crds")] {
            let got = std::fs::read_to_string(dir.join(&file))
                .with_context(|| format!("reading {}", dir.join(&file).display()))?;
            ensure!(
                got == expected,
                "{} is stale: run `cargo run -p keylimit-operator -- crd --out crds --out charts/keylimit/crds`",
                dir.join(&file).display()
            );
        }
    }
    Ok(())
}

/// Every object of a rendered manifest, as JSON (kubectl does the YAML parsing).
async fn objects(manifest: &str) -> anyhow::Result<Vec<Value>> {
    let json = kubectl(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(manifest),
    )
    .await?;
    // One JSON document per object, or a List.
    let mut out = Vec::new();
    for v in serde_json::Deserializer::from_str(&json).into_iter::<Value>() {
        let v = v?;
        match v["kind"].as_str() {
            Some("List") => out.extend(v["items"].as_array().cloned().unwrap_or_default()),
            _ => out.push(v),
        }
    }
    Ok(out)
}

/// Scenario: `helm lint` is clean; the default render and the variants are accepted by the
/// apiserver (server-side dry run, strict field validation); the operator's pod template is
/// admitted by Pod Security "restricted"; a wrong value fails with a message naming it.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn chart_lints_and_renders_objects_the_apiserver_accepts() {
    scenario("chart-render", async |env: &mut Env| {
        let chart = chart_dir();
        let chart = chart.to_string_lossy();
        let lint = helm(&["lint", "--strict", &chart]).await?;
        ensure!(lint.contains("0 chart(s) failed"), "helm lint: {lint}");

        let release = release_for(&env.ns);
        for extra in [
            vec![],
            vec![
                "--set",
                "replicaCount=1",
                "--set",
                "leaderElection.enabled=false",
            ],
            vec![
                "--set",
                "webhook.failurePolicy=Ignore",
                "--set",
                "webhook.excludeNamespaces={a,b}",
            ],
            vec!["--set", "webhook.enabled=false"],
        ] {
            let mut args = vec!["template", &release, &chart, "--namespace", &env.ns];
            args.extend(extra.iter().copied());
            let manifest = helm(&args).await?;
            let out = kubectl(
                &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
                Some(&manifest),
            )
            .await
            .with_context(|| format!("server-side dry run of helm template {extra:?}"))?;
            ensure!(out.contains("deployment.apps"), "dry run output: {out}");
        }

        // Optional integrations render (their CRDs are not in this cluster, so no dry run).
        let manifest = helm(&[
            "template",
            &release,
            &chart,
            "--namespace",
            &env.ns,
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "webhook.certManager.enabled=true",
        ])
        .await?;
        for want in ["kind: ServiceMonitor", "kind: Certificate", "kind: Issuer"] {
            ensure!(manifest.contains(want), "no {want} rendered");
        }
        ensure!(manifest.contains("--webhook-cert-dir=/var/run/keylimit/webhook-certs"));
        ensure!(manifest.contains("cert-manager.io/inject-ca-from"));

        // The operator pod passes Pod Security "restricted" (enforced on Pods, so the
        // Deployment's template is dry-run as a Pod in an enforcing namespace).
        kubectl(
            &[
                "label",
                "namespace",
                &env.ns,
                "pod-security.kubernetes.io/enforce=restricted",
            ],
            None,
        )
        .await?;
        let manifest = helm(&["template", &release, &chart, "--namespace", &env.ns]).await?;
        let deploy = objects(&manifest)
            .await?
            .into_iter()
            .find(|o| o["kind"] == "Deployment")
            .ok_or_else(|| anyhow!("no Deployment rendered"))?;
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "operator-template", "namespace": env.ns},
            "spec": deploy["spec"]["template"]["spec"],
        });
        // The ServiceAccount may not exist: it is not created here, so allow for it by
        // using the namespace's default one (the security context is what is checked).
        let mut pod = pod;
        pod["spec"]["serviceAccountName"] = Value::String("default".into());
        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> = env.api();
        eventually(T, "the default ServiceAccount", || async {
            api.get_opt("default").await.ok().flatten()
        })
        .await?;
        kubectl(
            &["create", "--dry-run=server", "-f", "-"],
            Some(&pod.to_string()),
        )
        .await
        .context("the operator's pod template under Pod Security restricted")?;

        // Strict schema: wrong values fail at render time and say which value is wrong.
        for (set, expect) in [
            ("replicas=2", "additional properties 'replicas' not allowed"),
            ("webhook.failurePolicy=Never", "/webhook/failurePolicy"),
            ("sidecar.failMode=sometimes", "/sidecar/failMode"),
            ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
            ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
        ] {
            match helm(&["template", &release, &chart, "--set", set]).await {
                Ok(_) => bail!("--set {set} was accepted"),
                Err(e) => ensure!(
                    e.to_string().contains(expect),
                    "--set {set}: error does not mention {expect:?}: {e}"
                ),
            }
        }
        Ok(())
    })
    .await;
}

/// Scenario: `helm install` creates everything and the CRDs are there; `helm upgrade` applies a
/// changed value; `helm uninstall` removes the release's objects but keeps the CRDs (and with
/// them every user's ApiKeys and policies).
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn helm_install_upgrade_uninstall() {
    scenario("chart-install", async |env: &mut Env| {
        let r = async {
            let chart = chart_dir();
            let chart = chart.to_string_lossy().to_string();
            let release = release_for(&env.ns);
            let name = fullname(&release);
            let out = helm(&[
                "install",
                &release,
                &chart,
                "--namespace",
                &env.ns,
                "--create-namespace",
            ])
            .await?;
            ensure!(
                out.contains("keylimit.dev/inject=enabled"),
                "NOTES.txt: {out}"
            );
            ensure!(out.contains("keylimit.dev/policy"), "NOTES.txt: {out}");

            let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
            for crd in ["apikeys.keylimit.dev", "ratelimitpolicies.keylimit.dev"] {
                crds.get(crd).await.with_context(|| format!("CRD {crd}"))?;
            }
            let deploys: Api<Deployment> = env.api();
            let deploy = format!("{name}-operator");
            let d = deploys.get(&deploy).await?;
            ensure!(d.spec.replicas == Some(2));
            let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
            let mwc = mwcs.get(&name).await?;
            let hooks = mwc.webhooks.unwrap_or_default();
            ensure!(hooks.len() == 2, "webhooks: {hooks:?}");
            for h in &hooks {
                ensure!(h.failure_policy.as_deref() == Some("Fail"));
                ensure!(h.side_effects == "None");
                ensure!(h.reinvocation_policy.as_deref() == Some("IfNeeded"));
                ensure!(h.timeout_seconds == Some(5));
                let excluded = serde_json::to_string(&h.namespace_selector)?;
                ensure!(excluded.contains("kube-system") && excluded.contains(&env.ns));
            }
            for kind in [
                "serviceaccount",
                "service",
                "role",
                "rolebinding",
                "poddisruptionbudget",
            ] {
                kubectl(&["get", kind, &name, "-n", &env.ns], None).await?;
            }
            kubectl(
                &["get", "service", &format!("{name}-webhook"), "-n", &env.ns],
                None,
            )
            .await?;
            for kind in ["clusterrole", "clusterrolebinding"] {
                kubectl(&["get", kind, &name], None).await?;
            }

            helm(&[
                "upgrade",
                &release,
                &chart,
                "--namespace",
                &env.ns,
                "--set",
                "replicaCount=3",
                "--set",
                "webhook.failurePolicy=Ignore",
            ])
            .await?;
            let d = deploys.get(&deploy).await?;
            ensure!(d.spec.replicas == Some(3), "upgrade not applied");
            let mwc = mwcs.get(&name).await?;
            ensure!(mwc
                .webhooks
                .unwrap_or_default()
                .iter()
                .all(|h| h.failure_policy.as_deref() == Some("Ignore")));

            helm(&["uninstall", &release, "--namespace", &env.ns]).await?;
            ensure!(
                deploys.get_opt(&deploy).await?.is_none(),
                "Deployment left behind"
            );
            ensure!(
                mwcs.get_opt(&name).await?.is_none(),
                "webhook configuration left behind"
            );
            let status =
                kubectl(&["get", "clusterrole", &name, "--ignore-not-found"], None).await?;
            ensure!(
                status.trim().is_empty(),
                "ClusterRole left behind: {status}"
            );
            for crd in ["apikeys.keylimit.dev", "ratelimitpolicies.keylimit.dev"] {
                crds.get(crd)
                    .await
                    .with_context(|| format!("CRD {crd} removed by uninstall"))?;
            }
            Ok(())
        }
        .await;
        if r.is_err() {
            // Cluster-scoped objects outlive the namespace.
            let _ = helm(&["uninstall", &release_for(&env.ns), "--namespace", &env.ns]).await;
        }
        r
    })
    .await;
}

/// A kubeconfig for the apiserver of `$KUBECONFIG` that authenticates with `token` only.
async fn token_kubeconfig(env: &Env, token: &str) -> anyhow::Result<PathBuf> {
    let server = kubectl(
        &[
            "config",
            "view",
            "--minify",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
        None,
    )
    .await?;
    let ca = kubectl(
        &[
            "config",
            "view",
            "--minify",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ],
        None,
    )
    .await?;
    ensure!(
        !server.is_empty() && !ca.is_empty(),
        "cannot read the admin kubeconfig"
    );
    let path = env.dir.path().join("sa.kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: sa}}\ncurrent-context: c\n"
        ),
    )?;
    Ok(path)
}

/// Scenario: the operator, run as the chart's ServiceAccount (a token minted for it, nothing
/// else), elects itself leader, generates its webhook certificate and patches the chart's
/// webhook configuration, turns an ApiKey in another namespace into a Ready key with a
/// rendered ConfigMap, and reviews a sidecar token. Any RBAC rule missing from the chart
/// fails one of these steps.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn operator_does_its_job_with_only_the_charts_rbac() {
    scenario("chart-rbac", async |env: &mut Env| {
        let app_ns = format!("{}-app", env.ns);
        let r = async {
            let chart = chart_dir();
            let chart = chart.to_string_lossy().to_string();
            let release = release_for(&env.ns);
            let name = fullname(&release);
            helm(&["install", &release, &chart, "--namespace", &env.ns]).await?;
            create_namespace(env, &app_ns).await?;

            let token = kubectl(
                &["create", "token", &name, "-n", &env.ns, "--duration", "1h"],
                None,
            )
            .await?;
            let kubeconfig = token_kubeconfig(env, token.trim()).await?;
            // Sanity: the token really is the ServiceAccount and not the admin.
            let who = kubectl(
                &["--kubeconfig", &kubeconfig.to_string_lossy(), "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"],
                None,
            )
            .await?;
            ensure!(
                who == format!("system:serviceaccount:{}:{name}", env.ns),
                "token belongs to {who}"
            );

            let admin_port = free_port()?;
            let webhook_port = free_port()?;
            let kc = format!("KUBECONFIG={}", kubeconfig.display());
            let op = bin("keylimit-operator");
            let op = op.to_string_lossy().to_string();
            let (admin, hook) = (
                format!("--admin-addr=127.0.0.1:{admin_port}"),
                format!("--webhook-addr=127.0.0.1:{webhook_port}"),
            );
            let (lease, wns, svc, cfg, secret) = (
                format!("--lease-name={name}"),
                format!("--webhook-namespace={}", env.ns),
                format!("--webhook-service={name}-webhook"),
                format!("--webhook-config-name={name}"),
                format!("--webhook-cert-secret={name}-webhook-cert"),
            );
            let lease_ns = format!("--lease-namespace={}", env.ns);
            let watch = format!("--watch-namespace={app_ns}");
            for (verb, what) in [
                ("list", "apikeys.keylimit.dev"),
                ("watch", "ratelimitpolicies.keylimit.dev"),
                ("watch", "secrets"),
                ("delete", "configmaps"),
            ] {
                let can = kubectl(
                    &["--kubeconfig", &kubeconfig.to_string_lossy(), "auth", "can-i", verb, what, "--all-namespaces"],
                    None,
                )
                .await?;
                ensure!(can.trim() == "yes", "chart SA cannot {verb} {what} cluster-wide");
            }
            // Least privilege: what it must not do.
            // No patch on Secrets either: pre-label generated Secrets are labelled by the user
            // (docs/install.md), not by the operator. A namespace-scoped install narrows the
            // rest: tests/tests/rbac.rs.
            for (verb, what) in [("delete", "secrets"), ("update", "secrets"), ("patch", "secrets"), ("create", "pods"), ("delete", "apikeys.keylimit.dev")] {
                let can = kubectl(
                    &["--kubeconfig", &kubeconfig.to_string_lossy(), "auth", "can-i", verb, what, "--all-namespaces"],
                    None,
                )
                .await
                .unwrap_or_else(|e| e.to_string());
                ensure!(!can.trim().starts_with("yes"), "chart SA may {verb} {what}");
            }
            // The chart's Deployment args, with ports moved to loopback.
            let proc = env
                .spawn(
                    "operator-chart-sa",
                    Path::new("env"),
                    &[
                        &kc, &op, "run", &admin, &lease_ns, &lease, "--identity=chart-sa",
                        "--lease-seconds=15", &hook, &svc, &wns, &cfg, &secret,
                        "--webhook-extra-san=127.0.0.1",
                        // Only the test's namespace: an operator watching the whole cluster
                        // would act on other tests' objects. Cluster-wide reads are checked
                        // with `auth can-i` below.
                        &watch,
                        "--sidecar-report-url=http://example.invalid:8080/v1/reports",
                    ],
                )
                .await?;

            // Ready (serving), then leader with synced caches (leases, watches on all four
            // kinds): readiness alone no longer means leadership.
            let ready = format!("http://127.0.0.1:{admin_port}/readyz");
            eventually(T, "the operator (chart RBAC) to become ready", || async {
                match get(&ready, &[]).await {
                    Ok(r) if r.status == 200 => Some(()),
                    _ => None,
                }
            })
            .await?;
            let metrics = format!("http://127.0.0.1:{admin_port}/metrics");
            eventually(T, "the operator (chart RBAC) to lead with synced caches", || async {
                let r = get(&metrics, &[]).await.ok()?;
                String::from_utf8_lossy(&r.body)
                    .lines()
                    .any(|l| l == "keylimit_operator_caches_synced 1")
                    .then_some(())
            })
            .await?;

            // The webhook certificate Secret and the caBundle of both webhooks.
            let secrets: Api<Secret> = env.api();
            secrets
                .get(&format!("{name}-webhook-cert"))
                .await
                .context("webhook certificate Secret")?;
            let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
            await_object(&mwcs, &name, "caBundle on every webhook", T, |m: Option<&MutatingWebhookConfiguration>| {
                m.and_then(|m| m.webhooks.as_ref()).is_some_and(|ws| {
                    !ws.is_empty()
                        && ws.iter().all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| !b.0.is_empty()))
                })
            })
            .await?;

            // Its whole job, in a user's namespace.
            let policy = "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: gold}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 60, per: Minute}]\n";
            let key = "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: acme}\nspec:\n  policyRef: {name: gold}\n  displayName: Acme\n";
            for y in [policy, key] {
                kubectl(&["apply", "-n", &app_ns, "-f", "-"], Some(y)).await?;
            }
            let keys: Api<keylimit_operator::crd::ApiKey> = Api::namespaced(env.client.clone(), &app_ns);
            await_object(&keys, "acme", "Ready=True", T, has_condition("Ready", "True")).await?;
            let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(env.client.clone(), &app_ns);
            eventually(T, "ConfigMap keylimit-gold", || async {
                cms.get_opt("keylimit-gold").await.ok().flatten()
            })
            .await?;

            // TokenReview: a sidecar's audience-bound token is accepted (400 for the junk body
            // comes after authentication; a missing RBAC rule would give 503).
            // The token is bound to a pod injected for the policy, as the sidecar's projected
            // token is: the operator reads that pod (pods get) after the review.
            let pod = sidecar_pod(&env.client, &app_ns, "api-0", "gold").await?;
            let sidecar_token = pod_token(&pod, "keylimit").await?;
            let auth = format!("Bearer {}", sidecar_token.trim());
            // Over TLS, as sidecars report (the admin port refuses reports), trusting the CA
            // in the chart's certificate Secret.
            let secrets: Api<Secret> = env.api();
            let cert = secrets.get(&format!("{name}-webhook-cert")).await?;
            let ca = cert
                .data
                .as_ref()
                .and_then(|d| d.get("ca.crt"))
                .context("ca.crt in the webhook certificate Secret")?;
            let ca_file = env.dir.path().join("chart-ca.crt");
            std::fs::write(&ca_file, &ca.0)?;
            let reply = request_tls(
                &ca_file,
                "POST",
                &format!("https://127.0.0.1:{webhook_port}/v1/reports"),
                &[("authorization", &auth), ("content-type", "application/json")],
                bytes::Bytes::from_static(b"not a report"),
            )
            .await?;
            ensure!(
                reply.status == 400,
                "report with a valid token: {} {:?}",
                reply.status,
                reply.body
            );
            drop(proc);
            helm(&["uninstall", &release, "--namespace", &env.ns]).await?;
            Ok(())
        }
        .await;
        delete_namespace(env, &app_ns).await;
        if r.is_err() {
            let _ = helm(&["uninstall", &release_for(&env.ns), "--namespace", &env.ns]).await;
        }
        r
    })
    .await;
}
