//! End-to-end: key hashes are keyed. The ConfigMap (readable by the built-in `view` role)
//! holds HMAC-SHA256 under the namespace's `keylimit-hash-key` Secret, not the sha256 a
//! guessable key could be cracked from offline; the fingerprint is not an unkeyed hash prefix
//! either; a sidecar given the hash key admits the key; and the hash key survives an operator
//! restart unchanged.

use std::time::Duration;

use anyhow::{ensure, Context as _};
use k8s_openapi::api::core::v1::Secret;
use keylimit_dataplane as dp;
use keylimit_e2e::upstream::Upstream;
use keylimit_e2e::*;

const T: Duration = Duration::from_secs(30);

/// A user-chosen key of the minimum length: exactly what an offline guesser would try.
const GUESSABLE: &str = "password12345678";

#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn configmaps_and_fingerprints_hold_keyed_hashes_the_sidecar_matches() {
    scenario("hashkey", async |env: &mut Env| {
        let mut op = env.start_operator("op").await?;
        env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 100, per: Minute, burst: 10}]\n").await?;
        env.apply_yaml(&format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: user-key, labels: {{keylimit.dev/secret: \"true\"}}}}\nstringData: {{key: {GUESSABLE}}}\n")).await?;
        env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: weak}\nspec:\n  policyRef: {name: p}\n  secretRef: {name: user-key, key: key}\n").await?;
        let weak = await_object(&apikeys(env), "weak", "Ready=True", T, has_condition("Ready", "True")).await?;

        // The operator made the namespace's hash key: 32 bytes, labelled as its own.
        let secrets: kube::Api<Secret> = env.api();
        let hk = secrets.get(dp::HASH_KEY_SECRET).await?;
        let labels = hk.metadata.labels.clone().unwrap_or_default();
        ensure!(labels.get("app.kubernetes.io/managed-by").map(String::as_str) == Some("keylimit"), "labels {labels:?}");
        let key_bytes = hk.data.clone().unwrap_or_default().get(dp::HASH_KEY_DATA).context("hash key data")?.0.clone();
        ensure!(key_bytes.len() == dp::HASH_KEY_LEN, "hash key has {} bytes", key_bytes.len());
        let hasher = dp::KeyHasher::hmac(&key_bytes).map_err(|e| anyhow::anyhow!(e))?;
        let keyed = hasher.hash_hex(GUESSABLE.as_bytes());
        let plain = dp::hash_key(GUESSABLE.as_bytes());

        // What `view` can read: the keyed hash, the scheme, and nowhere the plain sha256.
        let cms = configmaps(env);
        let doc = eventually(T, "policy.json with the weak key", || async {
            let cm = cms.get_opt("keylimit-p").await.ok().flatten()?;
            let body = cm.data?.get(dp::POLICY_FILE)?.clone();
            body.contains(&keyed).then_some(body)
        })
        .await?;
        ensure!(!doc.contains(&plain), "the ConfigMap holds the unkeyed sha256 of the key");
        let parsed = dp::PolicyDocument::parse(doc.as_bytes()).map_err(|e| anyhow::anyhow!(e))?;
        ensure!(parsed.policy.key_source.key_hash.algorithm == dp::KeyHashAlgorithm::HmacSha256, "scheme {:?}", parsed.policy.key_source.key_hash);

        // The public fingerprint: a prefix of the keyed hash, not of the plain one.
        let fp = weak.status.and_then(|s| s.fingerprint).context("fingerprint")?;
        ensure!(keyed.starts_with(&fp), "fingerprint {fp} is not a prefix of the keyed hash");
        ensure!(!plain.starts_with(&fp), "fingerprint {fp} is a prefix of the plain sha256");

        // A sidecar with the mounted hash key admits the key and nothing else.
        let (dir, _projection) = env.project("p")?;
        eventually(T, "the projected policy.json", || async {
            std::fs::read_to_string(dir.join(dp::POLICY_FILE)).ok()?.contains(&keyed).then_some(())
        })
        .await?;
        let upstream = Upstream::start().await?;
        let sc = env.start_sidecar("sc", &dir, upstream.addr, &[]).await?;
        let r = get(&sc.url("/"), &[("X-API-Key", GUESSABLE)]).await?;
        ensure!(r.status == 200, "the key through the sidecar: {}", r.status);
        let r = get(&sc.url("/"), &[("X-API-Key", "password12345679")]).await?;
        ensure!(r.status == 401, "a neighbouring guess: {}", r.status);

        // Never rotated behind the sidecars' back: a restarted operator keeps the same key.
        let rv = hk.metadata.resource_version.clone();
        op.terminate(Duration::from_secs(10)).await?;
        let _op = env.start_operator("op2").await?;
        env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: second}\nspec: {policyRef: {name: p}}\n").await?;
        await_object(&apikeys(env), "second", "Ready=True", T, has_condition("Ready", "True")).await?;
        let again = secrets.get(dp::HASH_KEY_SECRET).await?;
        ensure!(again.metadata.resource_version == rv, "the hash key Secret changed on restart");
        let r = get(&sc.url("/"), &[("X-API-Key", GUESSABLE)]).await?;
        ensure!(r.status == 200, "the key after the restart: {}", r.status);
        Ok(())
    })
    .await;
}
