//! End-to-end: what the operator may read and write (issue 12, item 3), against a real
//! kube-apiserver. The operator reads only Secrets that opt in with `keylimit.dev/secret=true`
//! and writes only ConfigMaps its policies own; the chart's namespace-scoped install
//! (`rbac.scope=Namespace`) gives it nothing outside the watched namespace but a TokenReview
//! and its webhook configuration, and the operator does its whole job with that. Run by
//! `hack/test.sh`; ignored by a plain `cargo test`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use keylimit_e2e::*;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;

const T: Duration = Duration::from_secs(60);
const POLICY: &str = "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: gold}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 60, per: Minute}]\n";

/// The ApiKey's Ready condition once its reason is `reason`.
async fn ready_reason(
    keys: &Api<keylimit_operator::crd::ApiKey>,
    name: &str,
    reason: &str,
) -> anyhow::Result<Condition> {
    eventually(
        T,
        &format!("ApiKey {name} Ready reason {reason}"),
        || async {
            let k = keys.get(name).await.ok()?;
            let c = k
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.reason == reason).then_some(c)
        },
    )
    .await
}

fn secret_yaml(name: &str, key: &str, labelled: bool) -> String {
    let labels = if labelled {
        ", labels: {keylimit.dev/secret: \"true\"}"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}{labels}}}\nstringData: {{key: {key}}}\n")
}

/// Scenario: an ApiKey author names a Secret its owner did not label (a database password,
/// say): the operator neither caches nor hashes it, and the key says which label is missing.
/// Labelling the Secret binds the key. A Secret of a generated key's name that keylimit did
/// not generate is neither used nor overwritten; a generated Secret carries the label. A
/// ConfigMap of a policy's name that the policy does not own is never taken over.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn only_opted_in_secrets_are_read_and_only_owned_config_maps_written() {
    scenario("optin", async |env: &mut Env| {
        // The user's ConfigMap is there before the policy whose rendered name it has.
        env.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: keylimit-gold}\ndata: {mine: \"yes\"}\n").await?;
        env.apply_yaml(&secret_yaml("db-password", "a-long-enough-database-password", false)).await?;
        env.apply_yaml(&secret_yaml("other-key", "users-own-unlabelled-material", false)).await?;
        let op = env.start_operator("op-a").await?;
        env.apply_yaml(&POLICY.replace("gold", "p")).await?;
        env.apply_yaml(POLICY).await?;
        env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: thief}\nspec:\n  policyRef: {name: p}\n  secretRef: {name: db-password, key: key}\n").await?;
        // No secretRef: the generated name is other-key, which a user already holds.
        env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: other}\nspec:\n  policyRef: {name: p}\n").await?;
        env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: gen}\nspec:\n  policyRef: {name: p}\n").await?;

        let keys = apikeys(env);
        let c = ready_reason(&keys, "thief", "SecretNotFound").await?;
        ensure!(c.message.contains("keylimit.dev/secret=true"), "message does not name the label: {}", c.message);
        ready_reason(&keys, "other", "SecretNotFound").await?;
        // The generated key binds, and its Secret is labelled so the watch sees it.
        ready_reason(&keys, "gen", "Bound").await?;
        let secrets: Api<Secret> = env.api();
        let gen = secrets.get("gen-key").await.context("generated Secret")?;
        ensure!(
            gen.metadata.labels.as_ref().and_then(|l| l.get("keylimit.dev/secret")).map(String::as_str) == Some("true"),
            "generated Secret not labelled: {:?}",
            gen.metadata.labels
        );
        // The user's Secret of the generated name is untouched.
        let other = secrets.get("other-key").await?;
        let data = other.data.unwrap_or_default();
        ensure!(
            data.get("key").map(|b| b.0.as_slice()) == Some(b"users-own-unlabelled-material".as_slice()) && data.len() == 1,
            "other-key was changed: {data:?}"
        );
        // The policy p rendered without the unlabelled keys: only gen's fingerprint is there.
        let cms = configmaps(env);
        eventually(T, "ConfigMap keylimit-p with one key", || async {
            let cm = cms.get_opt("keylimit-p").await.ok().flatten()?;
            let doc: serde_json::Value = serde_json::from_str(cm.data?.get("policy.json")?).ok()?;
            let n = doc.get("keys")?.as_array()?.len();
            (n == 1).then_some(())
        })
        .await?;

        // The owner opts in: the key binds, on the Secret event alone.
        let label = serde_json::json!({"metadata": {"labels": {"keylimit.dev/secret": "true"}}});
        secrets.patch("db-password", &PatchParams::default(), &Patch::Merge(&label)).await?;
        ready_reason(&keys, "thief", "Bound").await?;
        // And opts out again: the watch drops it, the key is unbound.
        let unlabel = serde_json::json!({"metadata": {"labels": {"keylimit.dev/secret": null}}});
        secrets.patch("db-password", &PatchParams::default(), &Patch::Merge(&unlabel)).await?;
        ready_reason(&keys, "thief", "SecretNotFound").await?;

        // The user's ConfigMap keylimit-gold: refused, left as it was.
        eventually(T, "the operator to refuse ConfigMap keylimit-gold", || async {
            op.log_text().contains("keylimit-gold exists and is not owned by RateLimitPolicy gold").then_some(())
        })
        .await?;
        let cm = cms.get("keylimit-gold").await?;
        ensure!(
            cm.data.as_ref().map(|d| d.len()) == Some(1) && cm.metadata.owner_references.is_none(),
            "keylimit-gold was taken over: {:?} {:?}",
            cm.data,
            cm.metadata.owner_references
        );
        Ok(())
    })
    .await;
}

fn release_for(ns: &str) -> String {
    format!("klr-{}", ns.rsplit('-').next().unwrap_or("0"))
}

fn fullname(release: &str) -> String {
    format!("{release}-keylimit")
}

/// A kubeconfig for the apiserver of `$KUBECONFIG` that authenticates with `token` only.
async fn token_kubeconfig(env: &Env, token: &str) -> anyhow::Result<PathBuf> {
    let view = |path: &'static str| async move {
        kubectl(
            &[
                "config",
                "view",
                "--minify",
                "--raw",
                "-o",
                &format!("jsonpath={{{path}}}"),
            ],
            None,
        )
        .await
    };
    let server = view(".clusters[0].cluster.server").await?;
    let ca = view(".clusters[0].cluster.certificate-authority-data").await?;
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

/// `kubectl auth can-i` as the ServiceAccount: true only on a plain "yes".
async fn can_i(kubeconfig: &Path, args: &[&str]) -> bool {
    let mut a = vec![
        "--kubeconfig",
        kubeconfig.to_str().unwrap_or_default(),
        "auth",
        "can-i",
    ];
    a.extend_from_slice(args);
    // `can-i` exits 1 on "no", which kubectl() reports as an error.
    kubectl(&a, None).await.is_ok_and(|o| o.trim() == "yes")
}

/// Scenario: `helm install --set rbac.scope=Namespace`: the ServiceAccount may read Secrets and
/// write ConfigMaps in the watched namespace only (`auth can-i` says yes there and no
/// everywhere else, including cluster-wide list), keeps only TokenReview create and its own
/// webhook configuration at cluster scope, and the real operator run with that token and the
/// chart's --watch-namespace elects itself, patches the caBundle and binds a key.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn namespaced_install_needs_and_gets_nothing_outside_its_namespace() {
    scenario("rbac-ns", async |env: &mut Env| {
        let app_ns = format!("{}-app", env.ns);
        let release = release_for(&env.ns);
        let name = fullname(&release);
        let r = async {
            let ns_api: Api<Namespace> = Api::all(env.client.clone());
            ns_api
                .create(&PostParams::default(), &Namespace { metadata: ObjectMeta { name: Some(app_ns.clone()), ..Default::default() }, ..Default::default() })
                .await?;
            let chart = chart_dir().to_string_lossy().to_string();
            let watch_set = format!("rbac.watchNamespace={app_ns}");
            helm(&["install", &release, &chart, "--namespace", &env.ns, "--set", "rbac.scope=Namespace", "--set", &watch_set]).await?;
            // The chart passes the same namespace to the operator.
            let manifest = helm(&["get", "manifest", &release, "--namespace", &env.ns]).await?;
            ensure!(manifest.contains(&format!("--watch-namespace={app_ns}")), "Deployment lacks --watch-namespace");

            let token = kubectl(&["create", "token", &name, "-n", &env.ns, "--duration", "1h"], None).await?;
            let kc = token_kubeconfig(env, token.trim()).await?;
            let (app, own) = (app_ns.as_str(), env.ns.as_str());
            let cert = format!("secrets/{name}-webhook-cert");
            // What it needs, where it needs it.
            for args in [
                vec!["list", "secrets", "-n", app],
                vec!["watch", "secrets", "-n", app],
                vec!["create", "secrets", "-n", app],
                vec!["patch", "configmaps", "-n", app],
                vec!["watch", "apikeys.keylimit.dev", "-n", app],
                vec!["patch", "ratelimitpolicies.keylimit.dev", "--subresource=status", "-n", app],
                vec!["create", "tokenreviews.authentication.k8s.io"],
                vec!["update", "leases.coordination.k8s.io", "-n", own],
                vec!["get", &cert, "-n", own],
                vec!["update", &cert, "-n", own],
            ] {
                ensure!(can_i(&kc, &args).await, "namespaced SA cannot {args:?}");
            }
            // What it must not do. RBAC cannot filter by label: in the watched namespace it
            // can still list every Secret; the label selector is the operator's own restraint.
            for args in [
                vec!["list", "secrets", "--all-namespaces"],
                vec!["get", "secrets", "-n", "default"],
                vec!["list", "secrets", "-n", "kube-system"],
                vec!["list", "secrets", "-n", own],
                vec!["get", "secrets/other", "-n", own],
                vec!["update", "secrets", "-n", app],
                vec!["patch", "secrets", "-n", app],
                vec!["delete", "secrets", "-n", app],
                vec!["patch", "configmaps", "-n", "default"],
                vec!["delete", "configmaps", "--all-namespaces"],
                vec!["list", "apikeys.keylimit.dev", "--all-namespaces"],
                vec!["get", "pods", "-n", "default"],
                vec!["patch", "mutatingwebhookconfigurations/other"],
                vec!["create", "pods", "-n", app],
            ] {
                ensure!(!can_i(&kc, &args).await, "namespaced SA may {args:?}");
            }

            // The real operator with that token and the chart's arguments (ports on loopback).
            let (admin_port, webhook_port) = (free_port()?, free_port()?);
            let kcenv = format!("KUBECONFIG={}", kc.display());
            let op = bin("keylimit-operator").to_string_lossy().to_string();
            let args = [
                kcenv,
                op,
                "run".into(),
                format!("--admin-addr=127.0.0.1:{admin_port}"),
                format!("--lease-namespace={own}"),
                format!("--lease-name={name}"),
                "--identity=ns-sa".into(),
                format!("--webhook-addr=127.0.0.1:{webhook_port}"),
                format!("--webhook-service={name}-webhook"),
                format!("--webhook-namespace={own}"),
                format!("--webhook-config-name={name}"),
                format!("--webhook-cert-secret={name}-webhook-cert"),
                "--webhook-extra-san=127.0.0.1".into(),
                format!("--watch-namespace={app}"),
                "--sidecar-report-url=http://example.invalid:8080/v1/reports".into(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let _proc = env.spawn("operator-ns-sa", Path::new("env"), &args).await?;
            let metrics = format!("http://127.0.0.1:{admin_port}/metrics");
            eventually(T, "the operator (namespaced RBAC) to lead with synced caches", || async {
                let r = get(&metrics, &[]).await.ok()?;
                String::from_utf8_lossy(&r.body).lines().any(|l| l == "keylimit_operator_caches_synced 1").then_some(())
            })
            .await?;
            for y in [
                POLICY.to_string(),
                secret_yaml("acme-secret", "a-long-enough-customer-key", true),
                "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: acme}\nspec:\n  policyRef: {name: gold}\n  secretRef: {name: acme-secret, key: key}\n".into(),
                "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: gen}\nspec:\n  policyRef: {name: gold}\n".into(),
            ] {
                kubectl(&["apply", "-n", app, "-f", "-"], Some(&y)).await?;
            }
            let keys: Api<keylimit_operator::crd::ApiKey> = Api::namespaced(env.client.clone(), app);
            ready_reason(&keys, "acme", "Bound").await?;
            ready_reason(&keys, "gen", "Bound").await?;
            let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), app);
            eventually(T, "ConfigMap keylimit-gold", || async { cms.get_opt("keylimit-gold").await.ok().flatten() }).await?;
            helm(&["uninstall", &release, "--namespace", &env.ns]).await?;
            Ok(())
        }
        .await;
        let ns_api: Api<Namespace> = Api::all(env.client.clone());
        let _ = ns_api.delete(&app_ns, &DeleteParams::default()).await;
        if r.is_err() {
            let _ = helm(&["uninstall", &release, "--namespace", &env.ns]).await;
        }
        r
    })
    .await;
}
