//! End-to-end: what render and the CRD refuse or repair, against a real kube-apiserver.
//! Duplicate key material, free routes, path matching, policy names that would collide with
//! another policy's shard ConfigMaps, and an ApiKey moved between policies. Run by
//! `hack/test.sh`, which starts the control plane; ignored by a plain `cargo test`.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use k8s_openapi::api::core::v1::Secret;
use keylimit_dataplane as dp;
use keylimit_e2e::*;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::Api;

const T: Duration = Duration::from_secs(30);

fn policy_yaml(name: &str) -> String {
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
        requests: 10
        per: Minute
"#
    )
}

fn apikey_yaml(name: &str, policy: &str, secret: Option<&str>) -> String {
    let secret = secret
        .map(|s| format!("  secretRef: {{name: {s}, key: key}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}}}\nspec:\n  policyRef: {{name: {policy}}}\n{secret}"
    )
}

/// The data-plane document of a policy as the apiserver holds it now.
async fn document(env: &Env, policy: &str) -> Option<dp::PolicyDocument> {
    let cm = configmaps(env)
        .get_opt(&format!("keylimit-{policy}"))
        .await
        .ok()
        .flatten()?;
    let body = cm.data?.get(dp::POLICY_FILE)?.clone();
    dp::PolicyDocument::parse(body.as_bytes()).ok()
}

/// The names of the keys a policy's (unsharded) document lists.
async fn document_keys(env: &Env, policy: &str) -> Option<Vec<String>> {
    let doc = document(env, policy).await?;
    let mut names: Vec<String> = doc.keys.into_iter().map(|k| k.name).collect();
    names.sort();
    Some(names)
}

/// Waits until the ApiKey's Ready condition has `reason`; returns the condition's message.
async fn await_ready_reason(env: &Env, key: &str, reason: &str) -> anyhow::Result<String> {
    let keys = apikeys(env);
    eventually(
        T,
        &format!("ApiKey {key} Ready reason {reason}"),
        || async {
            let k = keys.get(key).await.ok()?;
            let c = k
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.reason == reason).then_some(c.message)
        },
    )
    .await
}

/// Manifests the apiserver itself must refuse, with a message a user can act on, and the
/// neighbouring ones it must accept.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn crd_refuses_colliding_names_and_limited_free_routes() {
    scenario("render-crd", async |env: &mut Env| {
        let spec = "spec:\n  selector: {matchLabels: {a: b}}\n  limits: {concurrency: 1}\n";
        let rlp = |name: &str, spec: &str| {
            format!("apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}}}\n{spec}")
        };
        let refused = [
            (
                "a name that is another policy's shard ConfigMap",
                rlp("gold-keys-0001", spec),
                "must not end in '-keys-' and digits",
            ),
            (
                "a name whose shard ConfigMap names exceed 253 characters",
                rlp(&"a".repeat(235), spec),
                "at most 234 characters",
            ),
            (
                "a free route with its own limits",
                rlp(
                    "free",
                    "spec:\n  selector: {matchLabels: {a: b}}\n  routes:\n    - {name: health, pathPrefix: /health, cost: 0, limits: {rates: [{name: m, requests: 5, per: Minute}]}}\n",
                ),
                "a route with cost 0 is free",
            ),
            (
                "an unknown matrixParameters mode",
                rlp(
                    "pm",
                    "spec:\n  selector: {matchLabels: {a: b}}\n  limits: {concurrency: 1}\n  pathMatching: {matrixParameters: Strip}\n",
                ),
                "Unsupported value: \"Strip\"",
            ),
        ];
        for (what, yaml, fragment) in &refused {
            match env.apply_yaml(yaml).await {
                Ok(()) => bail!("{what}: the apiserver accepted a bad manifest"),
                Err(e) => ensure!(
                    e.to_string().contains(fragment),
                    "{what}: expected {fragment:?} in the error, got: {e}"
                ),
            }
        }
        let accepted = [
            rlp("gold", spec),
            rlp("gold-keys", spec),
            rlp(&"a".repeat(234), spec),
            rlp(
                "free",
                "spec:\n  selector: {matchLabels: {a: b}}\n  limits: {concurrency: 1}\n  routes:\n    - {name: health, pathPrefix: /health, cost: 0}\n",
            ),
        ];
        for yaml in &accepted {
            env.apply_yaml(yaml)
                .await
                .with_context(|| format!("a valid manifest was refused:\n{yaml}"))?;
        }
        Ok(())
    })
    .await;
}

/// pathMatching and free routes reach the data-plane document, with the documented defaults.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn path_matching_and_free_routes_reach_the_document() {
    scenario("render-paths", async |env: &mut Env| {
        let _op = env.start_operator("op-a").await?;
        env.apply_yaml(&policy_yaml("plain")).await?;
        env.apply_yaml(
            "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: strict}\nspec:\n  selector: {matchLabels: {a: b}}\n  limits: {concurrency: 1}\n  pathMatching: {caseSensitive: true, matrixParameters: Reject}\n  routes:\n    - {name: health, pathPrefix: /health, cost: 0}\n",
        )
        .await?;
        let plain = eventually(T, "the document of policy plain", || document(env, "plain")).await?;
        ensure!(
            plain.policy.path_matching == dp::PathMatching::default(),
            "defaults: {:?}",
            plain.policy.path_matching
        );
        let strict =
            eventually(T, "the document of policy strict", || document(env, "strict")).await?;
        ensure!(
            strict.policy.path_matching
                == dp::PathMatching {
                    case_sensitive: true,
                    matrix_parameters: dp::MatrixParameters::Reject,
                },
            "pathMatching: {:?}",
            strict.policy.path_matching
        );
        ensure!(
            strict.policy.routes.first().map(|r| r.cost) == Some(0),
            "routes: {:?}",
            strict.policy.routes
        );
        Ok(())
    })
    .await;
}

/// Two ApiKeys on one Secret: the older keeps the key, the newer is left out with
/// `DuplicateKey` naming the older, the policy stays published. When the older goes, the
/// newer takes over without any edit of its own.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn duplicate_key_material_leaves_the_later_apikey_out() {
    scenario("render-dup", async |env: &mut Env| {
        let _op = env.start_operator("op-a").await?;
        env.apply_yaml(&policy_yaml("p")).await?;
        env.apply_yaml(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: shared, labels: {keylimit.dev/secret: \"true\"}}\nstringData: {key: kl_shared_material_0123456789}\n",
        )
        .await?;
        env.apply_yaml(&apikey_yaml("first", "p", Some("shared")))
            .await?;
        await_ready_reason(env, "first", "Bound").await?;
        // creationTimestamp has one-second resolution: make "second" strictly later, so the
        // test exercises the time rule, not only the name tie-break.
        let keys = apikeys(env);
        let first_created = keys
            .get("first")
            .await?
            .metadata
            .creation_timestamp
            .context("creationTimestamp")?;
        eventually(T, "the clock to pass first's creation second", || async {
            let now = k8s_openapi::jiff::Timestamp::now();
            (now.as_second() > first_created.0.as_second()).then_some(())
        })
        .await?;
        // A name that sorts before "first": only creation time makes it the later one.
        env.apply_yaml(&apikey_yaml("another", "p", Some("shared")))
            .await?;
        let message = await_ready_reason(env, "another", "DuplicateKey").await?;
        ensure!(
            message.contains("\"first\""),
            "message should name the holder: {message}"
        );
        eventually(T, "the document to list only first", || async {
            (document_keys(env, "p").await? == ["first"]).then_some(())
        })
        .await?;
        let pol = policies(env);
        await_object(&pol, "p", "Ready=True", T, has_condition("Ready", "True")).await?;
        ensure!(
            await_ready_reason(env, "first", "Bound").await.is_ok(),
            "the holder stays Bound"
        );

        // The holder goes: the duplicate becomes the key, with no change of its own.
        keys.delete("first", &DeleteParams::default()).await?;
        await_ready_reason(env, "another", "Bound").await?;
        eventually(T, "the document to list another", || async {
            (document_keys(env, "p").await? == ["another"]).then_some(())
        })
        .await?;

        // Distinct Secrets with equal bytes are duplicates too.
        env.apply_yaml(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: copy, labels: {keylimit.dev/secret: \"true\"}}\nstringData: {key: kl_shared_material_0123456789}\n",
        )
        .await?;
        env.apply_yaml(&apikey_yaml("copycat", "p", Some("copy")))
            .await?;
        let message = await_ready_reason(env, "copycat", "DuplicateKey").await?;
        ensure!(message.contains("\"another\""), "{message}");
        // Rotating the copy's material makes it a key of its own.
        let secrets: Api<Secret> = env.api();
        let patch = serde_json::json!({"stringData": {"key": "kl_now_its_own_material_0123"}});
        secrets
            .patch("copy", &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        await_ready_reason(env, "copycat", "Bound").await?;
        eventually(T, "the document to list both", || async {
            (document_keys(env, "p").await? == ["another", "copycat"]).then_some(())
        })
        .await?;
        Ok(())
    })
    .await;
}

/// One Secret change that swaps which ApiKeys hold and which duplicate, while the policy's
/// counts stay the same: every affected key's condition follows, although none of them changed
/// and the policy's status does not move.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn a_changed_holder_rechecks_every_affected_key() {
    scenario("render-dup-swap", async |env: &mut Env| {
        let _op = env.start_operator("op-a").await?;
        env.apply_yaml(&policy_yaml("p")).await?;
        let m = "kl_material_m_0123456789abcdef";
        let n = "kl_material_n_0123456789abcdef";
        for (secret, material) in [("s1", m), ("s2", m), ("s3", n), ("s4", n)] {
            env.apply_yaml(&format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}, labels: {{keylimit.dev/secret: \"true\"}}}}\nstringData: {{key: {material}}}\n"
            ))
            .await?;
        }
        // Created in name order, so creation time and name agree on who is older.
        for (key, secret) in [("ka", "s1"), ("kb", "s2"), ("kc", "s3"), ("kd", "s4")] {
            env.apply_yaml(&apikey_yaml(key, "p", Some(secret))).await?;
            let keys = apikeys(env);
            eventually(T, &format!("ApiKey {key} to have a status"), || async {
                keys.get(key).await.ok()?.status.map(|_| ())
            })
            .await?;
        }
        // Each state after the first is awaited with a short bound: the keys' conditions must
        // follow because the render asked for it, not because some unrelated write (such as
        // the status writer's first round after start) happened to wake every key.
        let quick = Duration::from_secs(3);
        // Waits for the Ready reason, and for the message to name `names` when given.
        let reason_within = async |key: &str,
                                   reason: &str,
                                   names: Option<&str>,
                                   bound: Duration|
               -> anyhow::Result<()> {
            let keys = apikeys(env);
            let quoted = names.map(|n| format!("\"{n}\""));
            let what = format!("ApiKey {key} Ready reason {reason} naming {names:?}");
            eventually(bound, &what, || async {
                let k = keys.get(key).await.ok()?;
                let c = k.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
                let named = quoted.as_ref().is_none_or(|q| c.message.contains(q));
                (c.reason == reason && named).then_some(())
            })
            .await
        };
        let secrets: Api<Secret> = env.api();
        // s1 holds m (the start), then n: ka (oldest) takes n from kc, kb is left alone with
        // m. Back and forth, so that some swaps happen well after start-up.
        for (round, material) in [m, n, m, n].into_iter().enumerate() {
            if round > 0 {
                let patch = serde_json::json!({"stringData": {"key": material}});
                secrets
                    .patch("s1", &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            let (published, dups) = if material == m {
                (["ka", "kc"], [("kb", "ka"), ("kd", "kc")])
            } else {
                (["ka", "kb"], [("kc", "ka"), ("kd", "ka")])
            };
            let bound = if round == 0 { T } else { quick };
            eventually(
                bound,
                &format!("round {round}: the document to list {published:?}"),
                || async { (document_keys(env, "p").await? == published).then_some(()) },
            )
            .await?;
            for k in published {
                reason_within(k, "Bound", None, bound).await?;
            }
            for (k, holder) in dups {
                reason_within(k, "DuplicateKey", Some(holder), bound).await?;
            }
        }
        Ok(())
    })
    .await;
}

/// Moving an ApiKey to another policy takes it out of the old policy's ConfigMap at once,
/// not at the next resync.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn a_moved_key_leaves_its_old_policy_promptly() {
    scenario("render-move", async |env: &mut Env| {
        let _op = env.start_operator("op-a").await?;
        env.apply_yaml(&policy_yaml("gold")).await?;
        env.apply_yaml(&policy_yaml("silver")).await?;
        env.apply_yaml(&apikey_yaml("acme", "gold", None)).await?;
        env.apply_yaml(&apikey_yaml("stays", "gold", None)).await?;
        await_ready_reason(env, "acme", "Bound").await?;
        eventually(T, "gold's document to list acme", || async {
            (document_keys(env, "gold").await? == ["acme", "stays"]).then_some(())
        })
        .await?;

        // Back and forth: each move must empty the old policy of the key by itself. (Other
        // writes, such as the status writer's first round after start, also re-render a
        // policy once; several moves make sure the test does not ride on one of those.)
        let keys = apikeys(env);
        let mut slowest = Duration::ZERO;
        for (from, to) in [("gold", "silver"), ("silver", "gold"), ("gold", "silver")] {
            let patch = serde_json::json!({"spec": {"policyRef": {"name": to}}});
            keys.patch("acme", &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            let moved = std::time::Instant::now();
            // Far below the 300 s resync that used to be the only way out.
            eventually(
                Duration::from_secs(3),
                &format!("{from}'s document to drop acme"),
                || async {
                    (!document_keys(env, from)
                        .await?
                        .contains(&"acme".to_string()))
                    .then_some(())
                },
            )
            .await?;
            slowest = slowest.max(moved.elapsed());
            eventually(T, &format!("{to}'s document to list acme"), || async {
                document_keys(env, to)
                    .await?
                    .contains(&"acme".to_string())
                    .then_some(())
            })
            .await?;
        }
        eprintln!("MEASURED a moved key left the old policy's ConfigMap within {slowest:?}");
        ensure!(
            document_keys(env, "gold").await == Some(vec!["stays".to_string()]),
            "gold keeps its other key"
        );
        Ok(())
    })
    .await;
}
