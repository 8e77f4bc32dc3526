//! End-to-end: usage reports travel over TLS. A real sidecar reports over https to a real
//! operator's TLS (webhook) port, verifying the certificate against the `keylimit-ca`
//! ConfigMap the operator publishes, and the `Exhausted` condition appears; a sidecar given
//! another CA delivers nothing (its metric and log say so) and no condition appears; the plain
//! HTTP admin port refuses reports. Run by `hack/test.sh`; ignored by a plain `cargo test`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::ensure;
use keylimit_e2e::upstream::Upstream;
use keylimit_e2e::*;
use keylimit_operator::webhook::{CA_CONFIG_MAP, CA_FILE};

const T: Duration = Duration::from_secs(30);

const POLICY: &str = "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 1, per: Minute}]\n";
const KEY: &str = "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: acme}\nspec: {policyRef: {name: p}}\n";

/// The operator as the chart runs it (webhook TLS server on, plaintext reports not allowed),
/// on loopback; its certificate also names 127.0.0.1. Returns it and its TLS port.
async fn start_operator_tls(env: &mut Env) -> anyhow::Result<(Proc, u16)> {
    let (admin, tls) = (free_port()?, free_port()?);
    let ns = env.ns.clone();
    let mut p = env
        .spawn(
            "operator-tls",
            &bin("keylimit-operator"),
            &[
                "run",
                "--watch-namespace",
                &ns,
                "--lease-namespace",
                &ns,
                "--identity",
                "op",
                "--lease-seconds",
                "6",
                "--admin-addr",
                &format!("127.0.0.1:{admin}"),
                "--webhook-addr",
                &format!("127.0.0.1:{tls}"),
                "--webhook-namespace",
                &ns,
                "--webhook-extra-san",
                "127.0.0.1",
            ],
        )
        .await?;
    p.admin_port = Some(admin);
    p.await_ready(T).await?;
    Ok((p, tls))
}

/// What kubelet would put at /etc/keylimit-ca/ca.crt: the published ConfigMap's bundle.
async fn published_ca(env: &Env) -> anyhow::Result<PathBuf> {
    let cms = configmaps(env);
    let pem = eventually(T, "the keylimit-ca ConfigMap", || async {
        cms.get_opt(CA_CONFIG_MAP)
            .await
            .ok()??
            .data?
            .get(CA_FILE)
            .filter(|p| p.contains("BEGIN CERTIFICATE"))
            .cloned()
    })
    .await?;
    let path = env.dir.path().join("published-ca.crt");
    std::fs::write(&path, pem)?;
    Ok(path)
}

/// A pod-bound `keylimit` token for a new pod injected for policy `p`, in a file.
async fn token_file(env: &Env, pod: &str) -> anyhow::Result<PathBuf> {
    let pod = sidecar_pod(&env.client, &env.ns, pod, "p").await?;
    let token = pod_token(&pod, "keylimit").await?;
    let path = env
        .dir
        .path()
        .join(format!("token-{}", rand::random::<u32>()));
    std::fs::write(&path, token.trim())?;
    Ok(path)
}

/// The namespace's key-hash key, as the webhook's projected volume gives it to the sidecar.
async fn hash_key_file(env: &Env) -> anyhow::Result<PathBuf> {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = env.api();
    let key = eventually(T, "the key-hash Secret", || async {
        secrets
            .get_opt(keylimit_dataplane::HASH_KEY_SECRET)
            .await
            .ok()??
            .data?
            .get(keylimit_dataplane::HASH_KEY_DATA)
            .cloned()
    })
    .await?;
    let path = env
        .dir
        .path()
        .join(format!("hash-key-{}", rand::random::<u32>()));
    std::fs::write(&path, &key.0)?;
    Ok(path)
}

async fn sidecar_metric(p: &Proc, name: &str) -> f64 {
    let Ok(r) = get(&p.admin_url("/metrics"), &[]).await else {
        return 0.0;
    };
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts a sidecar reporting to `url` with `ca`, then drives the key to 429 through it.
async fn exhaust_through(
    env: &mut Env,
    name: &str,
    dir: &Path,
    upstream: &Upstream,
    url: &str,
    ca: &Path,
    key: &str,
) -> anyhow::Result<Proc> {
    let token = token_file(env, name).await?;
    let hash_key = hash_key_file(env).await?;
    let (ca, token) = (ca.display().to_string(), token.display().to_string());
    let hash_key = hash_key.display().to_string();
    let sc = env
        .start_sidecar(
            name,
            dir,
            upstream.addr,
            &[
                "--report-url",
                url,
                "--report-ca-file",
                &ca,
                "--report-token-file",
                &token,
                "--report-interval-ms",
                "500",
                "--hash-key-file",
                &hash_key,
            ],
        )
        .await?;
    eventually(T, &format!("{name}: a 429 for acme"), || async {
        let r = get(&sc.url("/"), &[("X-API-Key", key)]).await.ok()?;
        (r.status == 429).then_some(())
    })
    .await?;
    Ok(sc)
}

#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn reports_over_tls_are_verified_and_plaintext_is_refused() {
    scenario("report-tls", async |env: &mut Env| {
        let (op, tls_port) = start_operator_tls(env).await?;
        env.apply_yaml(POLICY).await?;
        env.apply_yaml(KEY).await?;
        await_object(
            &apikeys(env),
            "acme",
            "Ready=True",
            T,
            has_condition("Ready", "True"),
        )
        .await?;
        let ca = published_ca(env).await?;
        let (dir, _projection) = env.project("p")?;
        eventually(T, "the projected policy.json", || async {
            let doc = std::fs::read_to_string(dir.join("policy.json")).ok()?;
            doc.contains("\"acme\"").then_some(())
        })
        .await?;
        let upstream = Upstream::start().await?;
        let key = read_key(env, "acme-key").await?;
        let url = format!("https://127.0.0.1:{tls_port}/v1/reports");

        // A CA that did not sign the operator's certificate: the sidecar refuses the server,
        // so the token is never sent and the key's exhaustion never reaches status.
        // The apiserver's CA serves: a real CA, and not the operator's.
        let other_ca = env.dir.path().join("other-ca.crt");
        let b64 = kubectl(
            &[
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.certificate-authority-data}",
            ],
            None,
        )
        .await?;
        let other: k8s_openapi::ByteString = serde_json::from_value(serde_json::json!(b64.trim()))?;
        ensure!(
            String::from_utf8_lossy(&other.0).contains("BEGIN CERTIFICATE"),
            "no CA in the kubeconfig"
        );
        std::fs::write(&other_ca, &other.0)?;
        let wrong =
            exhaust_through(env, "sc-wrong-ca", &dir, &upstream, &url, &other_ca, &key).await?;
        // Exhausted since the 429: the sidecar reports at once and every 500 ms after, so
        // three failures mean at least one report that carried the exhaustion was refused.
        eventually(
            T,
            "three failed reports from the wrong-CA sidecar",
            || async {
                let failed =
                    sidecar_metric(&wrong, "keylimit_usage_reports_total{result=\"failed\"}").await;
                (failed >= 3.0).then_some(())
            },
        )
        .await?;
        let delivered =
            sidecar_metric(&wrong, "keylimit_usage_reports_total{result=\"delivered\"}").await;
        ensure!(
            delivered == 0.0,
            "wrong-CA sidecar delivered {delivered} reports"
        );
        ensure!(
            wrong.log_text().contains("usage report not delivered"),
            "the sidecar does not log the refused server:\n{}",
            wrong.log_text()
        );
        let accepted = "keylimit_operator_reports_total{result=\"accepted\"}";
        let op_metric = |name: &'static str| {
            let url = op.admin_url("/metrics");
            async move {
                let r = get(&url, &[]).await?;
                Ok::<f64, anyhow::Error>(
                    String::from_utf8_lossy(&r.body)
                        .lines()
                        .filter(|l| l.starts_with(name))
                        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        .sum(),
                )
            }
        };
        ensure!(
            op_metric(accepted).await? == 0.0,
            "the operator accepted a report"
        );
        let acme = apikeys(env).get("acme").await?;
        let exhausted = acme
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .any(|c| c.type_ == "Exhausted" && c.status == "True");
        ensure!(!exhausted, "Exhausted=True without a delivered report");
        drop(wrong);

        // The published CA: reports arrive and the condition appears.
        let good = exhaust_through(env, "sc-good-ca", &dir, &upstream, &url, &ca, &key).await?;
        await_object(
            &apikeys(env),
            "acme",
            "Exhausted=True from a report sent over TLS",
            T,
            has_condition("Exhausted", "True"),
        )
        .await?;
        let delivered =
            sidecar_metric(&good, "keylimit_usage_reports_total{result=\"delivered\"}").await;
        ensure!(delivered >= 1.0, "delivered {delivered}");
        ensure!(
            op_metric(accepted).await? >= 1.0,
            "the operator accepted nothing"
        );

        // Plain HTTP on the admin port: refused by default, before the token is reviewed,
        // even with a valid token and report.
        let token = std::fs::read_to_string(token_file(env, "plain").await?)?;
        let body = keylimit_dataplane::UsageReport {
            sidecar: "plain".into(),
            policy_namespace: env.ns.clone(),
            policy_name: "p".into(),
            ..Default::default()
        };
        let reply = request(
            "POST",
            &op.admin_url("/v1/reports"),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/json"),
            ],
            bytes::Bytes::from(serde_json::to_vec(&body)?),
        )
        .await?;
        ensure!(
            reply.status == 410 && String::from_utf8_lossy(&reply.body).contains("TLS"),
            "plain HTTP report: {} {:?}",
            reply.status,
            reply.body
        );
        // The same report over TLS to the same operator is taken (the refusal is the
        // transport's, not the report's).
        let tls_reply = request_tls(
            &ca,
            "POST",
            &url,
            &[
                ("authorization", &format!("Bearer {token}")),
                ("content-type", "application/json"),
            ],
            bytes::Bytes::from(serde_json::to_vec(&body)?),
        )
        .await?;
        ensure!(
            tls_reply.status == 204,
            "TLS report: {} {:?}",
            tls_reply.status,
            tls_reply.body
        );
        drop(good);
        Ok(())
    })
    .await;
}
