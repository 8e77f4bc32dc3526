//! End-to-end: CRDs, the operator's reconcile loop, garbage collection and leader election,
//! against a real kube-apiserver (+ kube-controller-manager). Run by `hack/test.sh`, which
//! starts the control plane; ignored by a plain `cargo test` because they need it.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use keylimit_dataplane as dp;
use keylimit_e2e::*;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;

const T: Duration = Duration::from_secs(30);

/// The namespace's keyed hash, as the operator computes it.
async fn namespace_hasher(env: &Env) -> anyhow::Result<dp::KeyHasher> {
    let key = std::fs::read(env.hash_key_file().await?)?;
    dp::KeyHasher::hmac(&key).map_err(|e| anyhow::anyhow!(e))
}

fn policy_yaml(name: &str, per_minute: u64) -> String {
    format!(
        r#"
apiVersion: keylimit.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: {name}
spec:
  selector:
    matchLabels:
      app: api
  limits:
    rates:
      - name: per-minute
        requests: {per_minute}
        per: Minute
"#
    )
}

fn apikey_yaml(name: &str, policy: &str) -> String {
    format!(
        r#"
apiVersion: keylimit.dev/v1alpha1
kind: ApiKey
metadata:
  name: {name}
spec:
  policyRef:
    name: {policy}
  displayName: Example customer
"#
    )
}

/// Scenario 1: the CRDs are served and explained, and bad manifests are refused by the
/// apiserver itself with a message a user can act on.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn crds_install_and_reject_bad_manifests() {
    scenario("crds", async |env: &mut Env| {
            let explain = kubectl(&["explain", "ratelimitpolicies.spec.limits.rates"], None).await?;
            ensure!(explain.contains("requests"), "kubectl explain lacks fields: {explain}");
            let explain = kubectl(&["explain", "apikeys.spec.policyRef"], None).await?;
            ensure!(explain.contains("RateLimitPolicy"), "kubectl explain: {explain}");

            let cases = [
                (
                    "empty selector",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad1}\nspec:\n  selector: {}\n  limits: {concurrency: 1}\n",
                    "selector must not be empty",
                ),
                (
                    "negative burst",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad2}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits:\n    rates: [{name: m, requests: 1, per: Minute, burst: -1}]\n",
                    "burst",
                ),
                (
                    "bad window unit",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad3}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits:\n    rates: [{name: m, requests: 1, per: Fortnight}]\n",
                    "Unsupported value: \"Fortnight\"",
                ),
                (
                    "unknown choice of limit headers",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad30}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits: {concurrency: 1}\n  response: {limitHeaders: Never}\n",
                    "Unsupported value: \"Never\"",
                ),
                (
                    "bad quota period",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad4}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits:\n    quotas: [{name: q, requests: 5, period: Year}]\n",
                    "Unsupported value: \"Year\"",
                ),
                (
                    "duplicate route names",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad5}\nspec:\n  selector: {matchLabels: {a: b}}\n  routes:\n    - {name: r, pathPrefix: /a, cost: 2}\n    - {name: r, pathPrefix: /b, cost: 3}\n",
                    "route names must be unique",
                ),
                (
                    "apikey without policyRef",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: bad6}\nspec: {}\n",
                    "policyRef: Required value",
                ),
                (
                    "apikey with a bad expiry",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: bad7}\nspec: {policyRef: {name: p}, expiresAt: soon}\n",
                    "expiresAt",
                ),
                (
                    "apikey rotation overlap in days",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: bad8}\nspec: {policyRef: {name: p}, rotation: {previousValidFor: 1d}}\n",
                    "previousValidFor must be hours, minutes and seconds",
                ),
                (
                    "apikey rotation overlap over a year",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: bad9}\nspec: {policyRef: {name: p}, rotation: {previousValidFor: 9000h}}\n",
                    "previousValidFor must be at most 8760h",
                ),
                (
                    "a rate of both requests and tokens",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad10}\nspec:\n  selector: {matchLabels: {a: b}}\n  usage: {header: x-usage-tokens}\n  limits:\n    rates: [{name: m, requests: 1, tokens: 5, per: Minute}]\n",
                    "a rate counts either requests or tokens: set exactly one",
                ),
                (
                    "token limits without usage",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad11}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits:\n    quotas: [{name: q, tokens: 5, period: Month}]\n",
                    "limits counted in tokens need usage",
                ),
                (
                    "usage with a bad json path",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad13}\nspec:\n  selector: {matchLabels: {a: b}}\n  usage: {jsonField: 'usage..total'}\n  limits:\n    rates: [{name: t, tokens: 5, per: Minute}]\n",
                    "jsonField must be dot-separated field names",
                ),
                (
                    "a route's token limits without usage",
                    "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: bad14}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits:\n    rates: [{name: m, requests: 1, per: Minute}]\n  routes:\n    - {name: chat, pathPrefix: /chat, limits: {rates: [{name: t, tokens: 5, per: Minute}]}}\n",
                    "limits counted in tokens need usage",
                ),
            ];
            for (what, yaml, fragment) in cases {
                match env.apply_yaml(yaml).await {
                    Ok(()) => bail!("{what}: the apiserver accepted a bad manifest"),
                    Err(e) => ensure!(
                        e.to_string().contains(fragment),
                        "{what}: expected {fragment:?} in the error, got: {e}"
                    ),
                }
            }
            // The README's token example is a valid manifest.
            env.apply_yaml(include_str!("../../examples/tokens/llm.yaml"))
                .await
                .context("examples/tokens/llm.yaml")?;
            // Policy-wide token limits may be metered by a route's usage alone (the other
            // routes then cost no tokens).
            env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: route-usage}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits:\n    rates: [{name: t, tokens: 5000, per: Minute}]\n  routes:\n    - {name: chat, pathPrefix: /chat, usage: {jsonField: usage.total_tokens}}\n")
                .await
                .context("token limits metered by a route's usage")?;
            Ok(())
    })
    .await;
}

/// Scenario 2 (operator half) and 6 (GC): a generated key lands in a Secret, only its hash in
/// the ConfigMap; a missing policy is reported exactly; deleting the policy garbage-collects
/// its ConfigMaps.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn apikey_to_configmap_holds_only_the_hash() {
    scenario("render", async |env: &mut Env| {
        let _op = env.start_operator("op-a").await?;
        // Key first, policy missing: Ready=False with the exact reason.
        env.apply_yaml(&apikey_yaml("acme", "gold")).await?;
        let keys = apikeys(env);
        let k = await_object(
            &keys,
            "acme",
            "Ready=False",
            T,
            has_condition("Ready", "False"),
        )
        .await?;
        let st = k.status.context("status")?;
        let ready = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .context("Ready")?;
        ensure!(ready.reason == "PolicyNotFound", "reason {}", ready.reason);
        ensure!(
            ready.message.contains("\"gold\""),
            "message {}",
            ready.message
        );

        env.apply_yaml(&policy_yaml("gold", 10)).await?;
        let k = await_object(
            &keys,
            "acme",
            "Ready=True",
            T,
            has_condition("Ready", "True"),
        )
        .await?;
        let key = read_key(env, "acme-key").await?;
        ensure!(
            key.starts_with("kl_") && key.len() == 67,
            "generated key shape"
        );
        let fp = k
            .status
            .and_then(|s| s.fingerprint)
            .context("fingerprint")?;
        let hasher = namespace_hasher(env).await?;
        ensure!(
            hasher.hash_hex(key.as_bytes()).starts_with(&fp),
            "fingerprint is a prefix of the keyed hash"
        );

        let cms = configmaps(env);
        let cm = eventually(T, "ConfigMap keylimit-gold with the key", || async {
            let cm = cms.get_opt("keylimit-gold").await.ok().flatten()?;
            let doc = cm.data.as_ref()?.get("policy.json")?.clone();
            doc.contains("acme").then_some(doc)
        })
        .await?;
        ensure!(
            !cm.contains(&key),
            "plaintext key leaked into the ConfigMap"
        );
        ensure!(
            cm.contains(&hasher.hash_hex(key.as_bytes())),
            "hash missing from ConfigMap"
        );
        let doc = dp::PolicyDocument::parse(cm.as_bytes())?;
        ensure!(doc.policy.limits.rates[0].requests == 10);

        let pol = policies(env);
        await_object(
            &pol,
            "gold",
            "Ready=True",
            T,
            has_condition("Ready", "True"),
        )
        .await?;

        // Deleting the policy: the garbage collector removes the owned ConfigMap.
        pol.delete("gold", &DeleteParams::default()).await?;
        eventually(T, "garbage collection of keylimit-gold", || async {
            cms.get_opt("keylimit-gold")
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        })
        .await?;
        await_object(
            &keys,
            "acme",
            "Ready=False after policy deletion",
            T,
            has_condition("Ready", "False"),
        )
        .await?;
        Ok(())
    })
    .await;
}

/// A user-provided Secret: a missing data key, then a too-short key, are reported; fixing the
/// Secret re-renders without touching the ApiKey.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn user_secret_problems_are_reported() {
    scenario("secret", async |env: &mut Env| {
            let _op = env.start_operator("op-a").await?;
            env.apply_yaml(&policy_yaml("p", 10)).await?;
            env.apply_yaml(
                "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: mine}\nspec:\n  policyRef: {name: p}\n  secretRef: {name: my-secret, key: token}\n",
            )
            .await?;
            let keys = apikeys(env);
            let reason = |want: &'static str| {
                let keys = keys.clone();
                async move {
                    eventually(T, &format!("Ready reason {want}"), || async {
                        let k = keys.get("mine").await.ok()?;
                        let c = k.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
                        (c.reason == want).then_some(c)
                    })
                    .await
                }
            };
            reason("SecretNotFound").await?;
            env.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: my-secret, labels: {keylimit.dev/secret: \"true\"}}\nstringData: {other: x}\n").await?;
            reason("SecretKeyMissing").await?;
            env.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: my-secret, labels: {keylimit.dev/secret: \"true\"}}\nstringData: {token: short}\n").await?;
            reason("KeyTooShort").await?;
            env.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: my-secret, labels: {keylimit.dev/secret: \"true\"}}\nstringData: {token: a-long-enough-customer-key}\n").await?;
            reason("Bound").await?;
            let cms = configmaps(env);
            let h = namespace_hasher(env).await?.hash_hex(b"a-long-enough-customer-key");
            eventually(T, "the user key's hash in the ConfigMap", || async {
                let cm = cms.get_opt("keylimit-p").await.ok().flatten()?;
                cm.data?.get("policy.json")?.contains(&h).then_some(())
            })
            .await?;
            Ok(())
    })
    .await;
}

/// Scenario 7: a second replica stands by; SIGTERM on the leader hands over; the new leader
/// converges to byte-identical ConfigMaps without rewriting them.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn leader_election_and_restart_converge_without_rewrites() {
    scenario("leader", async |env: &mut Env| {
        let mut a = env.start_operator("op-a").await?;
        a.await_ready(T).await?;
        // Ready means serving, not leading: wait for op-a to lead before op-b starts.
        let leases: Api<Lease> = env.api();
        let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
        eventually(T, "op-a to hold the lease", || async {
            let l = leases.get_opt("keylimit-operator").await.ok()??;
            (holder(l) == "op-a").then_some(())
        })
        .await?;
        let b = env.start_operator("op-b").await?;
        env.apply_yaml(&policy_yaml("p", 10)).await?;
        env.apply_yaml(&apikey_yaml("k1", "p")).await?;
        let keys = apikeys(env);
        await_object(&keys, "k1", "Ready=True", T, has_condition("Ready", "True")).await?;
        let cms = configmaps(env);
        let before = eventually(T, "ConfigMap with k1", || async {
            let cm = cms.get_opt("keylimit-p").await.ok().flatten()?;
            cm.data
                .as_ref()?
                .get("policy.json")?
                .contains("k1")
                .then_some(cm)
        })
        .await?;

        ensure!(
            holder(leases.get("keylimit-operator").await?) == "op-a",
            "op-a should lead"
        );
        // The standby is Ready too (rolling updates and drains need it), but does not lead.
        b.await_ready(T).await?;
        let standby = get(&b.admin_url("/metrics"), &[]).await?;
        ensure!(
            String::from_utf8_lossy(&standby.body).contains("keylimit_operator_leader 0"),
            "standby leader gauge"
        );
        let metrics = get(&a.admin_url("/metrics"), &[]).await?;
        ensure!(
            String::from_utf8_lossy(&metrics.body).contains("keylimit_operator_leader 1"),
            "leader gauge"
        );

        // SIGTERM: op-a gives the lease up at once, but keeps answering (not Ready) while a
        // Service would still route to it, so the webhook is never unreachable in a failover.
        a.send_sigterm()?;
        eventually(T, "op-b to hold the lease", || async {
            let l = leases.get("keylimit-operator").await.ok()?;
            (holder(l) == "op-b").then_some(())
        })
        .await?;
        let draining = get(&a.admin_url("/readyz"), &[]).await;
        ensure!(
            a.is_running() && matches!(&draining, Ok(r) if r.status == 503),
            "op-a should still answer, not Ready, after handing the lease over: {draining:?}"
        );
        let status = a.await_exit(Duration::from_secs(20)).await?;
        ensure!(status.success(), "operator exited with {status} on SIGTERM");
        b.await_ready(T).await?;
        // The new leader must do real work...
        env.apply_yaml(&apikey_yaml("k2", "p")).await?;
        await_object(&keys, "k2", "Ready=True", T, has_condition("Ready", "True")).await?;
        eventually(T, "ConfigMap with k2", || async {
            let cm = cms.get_opt("keylimit-p").await.ok().flatten()?;
            cm.data?.get("policy.json")?.contains("k2").then_some(())
        })
        .await?;
        // ...and a restart with unchanged inputs writes nothing.
        let settled = cms.get("keylimit-p").await?;
        ensure!(settled.metadata.resource_version != before.metadata.resource_version);
        let mut b = b;
        b.terminate(Duration::from_secs(20)).await?;
        let c = env.start_operator("op-c").await?;
        c.await_ready(T).await?;
        let pol = policies(env);
        await_object(&pol, "p", "Ready=True", T, has_condition("Ready", "True")).await?;
        // Give op-c a full reconcile of everything it owns, observed through its metrics.
        eventually(T, "op-c to reconcile the policy", || async {
            let m = get(&c.admin_url("/metrics"), &[]).await.ok()?;
            let text = String::from_utf8_lossy(&m.body).to_string();
            text.lines()
                .any(|l| {
                    l.starts_with(
                        "keylimit_operator_reconciles_total{controller=\"ratelimitpolicy\"}",
                    ) && !l.ends_with(" 0")
                })
                .then_some(())
        })
        .await?;
        let after = cms.get("keylimit-p").await?;
        ensure!(
            after.metadata.resource_version == settled.metadata.resource_version,
            "restart rewrote an unchanged ConfigMap"
        );
        let m = get(&c.admin_url("/metrics"), &[]).await?;
        let text = String::from_utf8_lossy(&m.body).to_string();
        ensure!(
            text.lines()
                .any(|l| l == "keylimit_operator_configmap_writes_total 0"),
            "op-c wrote ConfigMaps it did not need to:\n{text}"
        );
        // A Secret change re-renders: rotate k1's key by hand.
        let secrets: Api<Secret> = env.api();
        let patch = serde_json::json!({"stringData": {"key": "kl_rotated_key_0123456789abcdef"}});
        secrets
            .patch("k1-key", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        let h = namespace_hasher(env)
            .await?
            .hash_hex(b"kl_rotated_key_0123456789abcdef");
        eventually(T, "the rotated key's hash in the ConfigMap", || async {
            let cm = cms.get_opt("keylimit-p").await.ok().flatten()?;
            cm.data?.get("policy.json")?.contains(&h).then_some(())
        })
        .await?;
        Ok(())
    })
    .await;
}
