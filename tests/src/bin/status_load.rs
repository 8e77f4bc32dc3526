//! `keylimit-status-load`: how many apiserver writes does exhaustion reporting cost?
//!
//! Against the real control plane (`$KUBECONFIG`): creates one policy with `--keys` ApiKeys,
//! runs the real operator, then plays `--sidecars` sidecars that each push a usage report every
//! 2 s (as the real sidecar does), with a share of keys exhausted and churning. It prints the
//! operator's status writes per minute, reports per second, and the latency from a key's first
//! exhausted report to its `Exhausted=True` condition. Loopback only; bounded in time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use futures::{stream, StreamExt};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use keylimit_dataplane::{Exhaustion, ExhaustionReason, KeyUsage, UsageReport};
use keylimit_e2e::{bin, free_port, get, kubectl, request, sidecar_pod};
use keylimit_operator::crd::ApiKey;
use kube::api::{Api, PostParams};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    #[arg(long, default_value_t = 1_000)]
    sidecars: usize,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Keys each sidecar has state for.
    #[arg(long, default_value_t = 20)]
    keys_per_sidecar: usize,
    /// Share of those keys exhausted at any time (they churn every 20 s).
    #[arg(long, default_value_t = 0.05)]
    exhausted: f64,
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = kube::Client::try_default().await?;
    let ns = format!("status-load-{:04x}", rand::random::<u16>());
    kubectl(&["create", "namespace", &ns], None).await?;
    let policy = "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 100, per: Minute}]\n";
    kubectl(&["apply", "-n", &ns, "-f", "-"], Some(policy)).await?;

    let port = free_port()?;
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{ns}-operator.log")))?;
    let mut op = tokio::process::Command::new(bin("keylimit-operator"))
        .args([
            "run",
            "--watch-namespace",
            &ns,
            "--no-leader-election",
            "--admin-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let admin = format!("http://127.0.0.1:{port}");

    let start = Instant::now();
    let api: Api<ApiKey> = Api::namespaced(client.clone(), &ns);
    let created = stream::iter(0..args.keys)
        .map(|i| {
            let api = api.clone();
            async move {
                let k = ApiKey::new(
                    &format!("k{i:05}"),
                    serde_json::from_value(serde_json::json!({"policyRef": {"name": "p"}}))?,
                );
                api.create(&PostParams::default(), &k).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .filter(|r| futures::future::ready(r.is_err()))
        .count()
        .await;
    if created > 0 {
        bail!("{created} ApiKeys could not be created");
    }
    println!("created {} ApiKeys in {:?}", args.keys, start.elapsed());
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let out = kubectl(
            &[
                "get",
                "rlp",
                "p",
                "-n",
                &ns,
                "-o",
                "jsonpath={.status.keys}",
            ],
            None,
        )
        .await?;
        if out.trim() == args.keys.to_string() {
            break;
        }
        if Instant::now() > deadline {
            bail!("policy never bound all keys (status.keys={out})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("operator bound all keys after {:?}", start.elapsed());

    // The operator counts reports per pod their token is bound to: one Pod object (never run)
    // and one pod-bound token per simulated sidecar, as the webhook's projected volume gives.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let tokens: Vec<anyhow::Result<String>> = stream::iter(0..args.sidecars)
        .map(|s| {
            let (client, ns, sas) = (client.clone(), ns.clone(), sas.clone());
            async move {
                let pod = sidecar_pod(&client, &ns, &format!("sc-{s}"), "p").await?;
                let req = TokenRequest {
                    spec: Some(TokenRequestSpec {
                        audiences: Some(vec!["keylimit".into()]),
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: pod.metadata.name.clone(),
                            uid: pod.metadata.uid.clone(),
                        }),
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let t = sas
                    .create_token_request("default", &PostParams::default(), &req)
                    .await?;
                let token = t.status.and_then(|st| st.token).unwrap_or_default();
                Ok(format!("Bearer {token}"))
            }
        })
        .buffered(16)
        .collect()
        .await;
    let tokens: Vec<Arc<String>> = tokens
        .into_iter()
        .map(|t| t.map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let before =
        String::from_utf8_lossy(&get(&format!("{admin}/metrics"), &[]).await?.body).to_string();
    let w0 = metric(&before, "keylimit_operator_status_writes_total");

    let delivered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let run = Duration::from_secs(args.seconds);
    let t0 = Instant::now();
    let mut tasks = vec![];
    for (s, token) in tokens.iter().enumerate() {
        let (token, delivered, failed, ns, admin) = (
            token.clone(),
            delivered.clone(),
            failed.clone(),
            ns.clone(),
            admin.clone(),
        );
        let (keys, per, share, total) = (
            args.keys,
            args.keys_per_sidecar,
            args.exhausted,
            args.sidecars as u64,
        );
        tasks.push(tokio::spawn(async move {
            // Spread the sidecars over the 2 s interval as real ones drift apart.
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_millis(s as u64 * 2000 / total.max(1)),
                Duration::from_secs(2),
            );
            while t0.elapsed() < run {
                tick.tick().await;
                let now = k8s_openapi::jiff::Timestamp::now().as_second();
                let epoch = now / 20;
                let report = UsageReport {
                    sidecar: format!("sc-{s}"),
                    policy_namespace: ns.clone(),
                    policy_name: "p".into(),
                    policy_generation: 1,
                    now,
                    keys: (0..per)
                        .map(|j| {
                            let idx = (s * per + j) % keys;
                            // Deterministic churn: which keys are exhausted changes every 20 s.
                            let h = (idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64;
                            let exhausted = (h % 10_000) as f64 / 10_000.0 < share;
                            KeyUsage {
                                name: format!("k{idx:05}"),
                                exhaustion: exhausted.then(|| Exhaustion {
                                    reason: ExhaustionReason::RateLimited,
                                    limit: "per-minute".into(),
                                    message: "rate per-minute 100/60s exceeded".into(),
                                    reset_at: (epoch + 1) * 20,
                                    dry_run: false,
                                }),
                                quotas: vec![],
                            }
                        })
                        .collect(),
                    config_failure: None,
                };
                let body = Bytes::from(serde_json::to_vec(&report).unwrap_or_default());
                match request(
                    "POST",
                    &format!("{admin}/v1/reports"),
                    &[
                        ("authorization", token.as_str()),
                        ("content-type", "application/json"),
                    ],
                    body,
                )
                .await
                {
                    Ok(r) if r.status == 204 => delivered.fetch_add(1, Ordering::Relaxed),
                    other => {
                        // The first failure says why (a benchmark that fails silently lies).
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first failed report: {other:?}");
                        }
                        0
                    }
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = t0.elapsed();
    let after =
        String::from_utf8_lossy(&get(&format!("{admin}/metrics"), &[]).await?.body).to_string();
    let w1 = metric(&after, "keylimit_operator_status_writes_total");
    let minutes = elapsed.as_secs_f64() / 60.0;
    println!(
        "RESULT keys={} sidecars={} seconds={:.0} reports_delivered={} reports_failed={} reports_per_s={:.0} status_writes={} status_writes_per_min={:.0}",
        args.keys,
        args.sidecars,
        elapsed.as_secs_f64(),
        delivered.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        w1 - w0,
        (w1 - w0) / minutes
    );
    let _ = op.start_kill();
    kubectl(&["delete", "namespace", &ns, "--wait=false"], None)
        .await
        .context("cleanup")?;
    Ok(())
}
