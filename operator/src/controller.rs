//! The I/O shell around [`crate::render`]: two kube-runtime controllers, one per CRD.
//!
//! * The ApiKey controller makes sure each key has material (generating a Secret when the
//!   user gave none) and reports `Ready` with the exact reason a key is unusable.
//! * The RateLimitPolicy controller renders the policy and its bound keys into ConfigMaps
//!   and reports what it produced.
//!
//! Both read Secrets, ApiKeys and policies from shared reflector caches, so a reconcile of a
//! policy with 100k keys costs no API reads.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use rand::RngCore;
use serde_json::json;
use tracing::{info, warn};

use crate::conditions::{self, Desired};
use crate::crd::{condition, ApiKey, RateLimitPolicy};
use crate::metrics::Metrics;
use crate::render::{self, BoundKey, KeyProblem, POLICY_LABEL};
use crate::Error;

/// The one field manager the operator writes with.
pub const MANAGER: &str = "keylimit-operator";
/// Label on Secrets the operator generated, naming their ApiKey.
pub const GENERATED_LABEL: &str = "keylimit.dev/apikey";
/// How often a healthy object is looked at again even without events (drift repair).
const RESYNC: Duration = Duration::from_secs(300);

/// Shared state of both controllers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub secrets: Store<Secret>,
    pub apikeys: Store<ApiKey>,
    pub policies: Store<RateLimitPolicy>,
    pub config_maps: Store<ConfigMap>,
    pub render_memo: RenderMemo,
}

/// What each policy's last successful render was made from. Every ApiKey change wakes its
/// policy, status writes included (kube-runtime has no stable predicate for `watches`), and a
/// render hashes and serialises every key: without this, binding N keys costs O(N^2).
#[derive(Default)]
pub struct RenderMemo(std::sync::Mutex<HashMap<(String, String), Rendered>>);

#[derive(Clone)]
struct Rendered {
    inputs: u64,
    keys: usize,
    config_maps: Vec<String>,
}

fn hash_of(v: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A digest of everything a policy's render depends on, cheap to compute: object identities
/// and versions, no key material. Sums of per-object hashes make it independent of the
/// caches' iteration order.
fn render_inputs(
    policy: &RateLimitPolicy,
    keys: &[(Arc<ApiKey>, Option<Arc<Secret>>)],
    owned: &[Arc<ConfigMap>],
) -> u64 {
    let sidecars = policy.status.as_ref().map_or(0, |s| s.sidecars_reporting);
    let mut sum = hash_of((&policy.metadata.uid, policy.metadata.generation, sidecars));
    for (k, s) in keys {
        sum = sum.wrapping_add(hash_of((
            &k.metadata.name,
            &k.metadata.uid,
            k.metadata.generation,
            s.as_ref()
                .map(|s| (&s.metadata.uid, &s.metadata.resource_version)),
        )));
    }
    for cm in owned {
        sum = sum.wrapping_add(hash_of((&cm.metadata.name, &cm.metadata.resource_version)));
    }
    sum
}

/// Starts the caches, then runs both controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    reports: Arc<crate::reports::Reports>,
    instance: String,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce(),
) -> Result<(), Error> {
    let (secrets, secrets_w) = reflector::store::<Secret>();
    let (apikeys, apikeys_w) = reflector::store::<ApiKey>();
    let (policies, policies_w) = reflector::store::<RateLimitPolicy>();
    let (config_maps, config_maps_w) = reflector::store::<ConfigMap>();

    let scoped = |c: &Client| -> (
        Api<Secret>,
        Api<ApiKey>,
        Api<RateLimitPolicy>,
        Api<ConfigMap>,
    ) {
        match namespace.as_deref() {
            Some(ns) => (
                Api::namespaced(c.clone(), ns),
                Api::namespaced(c.clone(), ns),
                Api::namespaced(c.clone(), ns),
                Api::namespaced(c.clone(), ns),
            ),
            None => (
                Api::all(c.clone()),
                Api::all(c.clone()),
                Api::all(c.clone()),
                Api::all(c.clone()),
            ),
        }
    };
    let (secret_api, apikey_api, policy_api, cm_api) = scoped(&client);
    let cm_cfg = watcher::Config::default().labels(POLICY_LABEL);

    // Reflectors feed the caches; their streams must be polled to make progress.
    let caches = futures::future::join4(
        reflector::reflector(
            secrets_w,
            watcher(secret_api.clone(), watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|_| async {}),
        reflector::reflector(
            apikeys_w,
            watcher(apikey_api.clone(), watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|_| async {}),
        reflector::reflector(
            policies_w,
            watcher(policy_api.clone(), watcher::Config::default()),
        )
        .default_backoff()
        .for_each(|_| async {}),
        reflector::reflector(config_maps_w, watcher(cm_api.clone(), cm_cfg.clone()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    let caches = tokio::spawn(caches);

    for (what, r) in [
        ("secrets", secrets.wait_until_ready().await),
        ("apikeys", apikeys.wait_until_ready().await),
        ("policies", policies.wait_until_ready().await),
        ("configmaps", config_maps.wait_until_ready().await),
    ] {
        r.map_err(|e| Error::Config(format!("{what} cache never became ready: {e}")))?;
    }
    info!("caches synced");
    ready();

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(instance),
            },
        ),
        metrics,
        secrets,
        apikeys: apikeys.clone(),
        policies,
        config_maps: config_maps.clone(),
        render_memo: RenderMemo::default(),
    });

    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let status_writer = tokio::spawn(crate::reports::write_status(
        reports,
        ctx.clone(),
        shutdown.clone(),
    ));

    // A Secret event re-reconciles the ApiKeys that read it.
    let keys_for_secret = apikeys.clone();
    let apikey_ctl = Controller::new(apikey_api.clone(), watcher::Config::default())
        .watches(secret_api, watcher::Config::default(), move |s: Secret| {
            let ns = s.namespace().unwrap_or_default();
            let name = s.name_any();
            keys_for_secret
                .state()
                .into_iter()
                .filter(|k| {
                    k.namespace().as_deref() == Some(ns.as_str()) && render::secret_ref(k).0 == name
                })
                .map(|k| ObjectRef::from_obj(k.as_ref()))
                .collect::<Vec<_>>()
        })
        // A policy appearing or vanishing changes its keys' Ready condition.
        .watches(policy_api.clone(), watcher::Config::default(), {
            let keys = apikeys.clone();
            move |p: RateLimitPolicy| keys_of_policy(&keys, &p)
        })
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_apikey, error_policy_apikey, ctx.clone())
        .for_each(|_| async {});

    let policy_ctl = Controller::new(policy_api, watcher::Config::default())
        .owns(cm_api, cm_cfg)
        .watches(apikey_api, watcher::Config::default(), |k: ApiKey| {
            let ns = k.namespace().unwrap_or_default();
            Some(ObjectRef::<RateLimitPolicy>::new(&k.spec.policy_ref.name).within(&ns))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile_policy, error_policy_policy, ctx)
        .for_each(|_| async {});

    futures::future::join(apikey_ctl, policy_ctl).await;
    status_writer.abort();
    caches.abort();
    Ok(())
}

fn keys_of_policy(keys: &Store<ApiKey>, p: &RateLimitPolicy) -> Vec<ObjectRef<ApiKey>> {
    let ns = p.namespace().unwrap_or_default();
    let name = p.name_any();
    keys.state()
        .into_iter()
        .filter(|k| k.namespace().as_deref() == Some(ns.as_str()) && k.spec.policy_ref.name == name)
        .map(|k| ObjectRef::from_obj(k.as_ref()))
        .collect()
}

/// Generates a key: `kl_` + 32 random bytes in hex (256 bits of entropy).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("kl_{}", hex::encode(bytes))
}

async fn ensure_generated_secret(key: &ApiKey, ctx: &Context) -> Result<Option<Secret>, Error> {
    let ns = key
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let (name, data_key) = render::secret_ref(key);
    let cached = ctx.secrets.get(&ObjectRef::new(&name).within(&ns));
    if let Some(s) = cached {
        return Ok(Some((*s).clone()));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // The cache may lag a Secret created moments ago; never overwrite an existing key.
    if let Some(s) = api.get_opt(&name).await? {
        return Ok(Some(s));
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([(
                GENERATED_LABEL.to_string(),
                key.name_any(),
            )])),
            owner_references: key.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            data_key,
            ByteString(generate_key().into_bytes()),
        )])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(s) => {
            publish(
                ctx,
                key,
                EventType::Normal,
                "KeyGenerated",
                format!("generated a key into Secret {name}"),
            )
            .await;
            Ok(Some(s))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get_opt(&name).await?),
        Err(e) => Err(e.into()),
    }
}

pub async fn publish(
    ctx: &Context,
    obj: &impl Resource<DynamicType = ()>,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    // Events are best effort: losing one must not fail a reconcile.
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        warn!(error = %e, "publishing event failed");
    }
}

/// The outcome of resolving one ApiKey: the Ready condition and, when bound, its key.
pub fn key_readiness(
    key: &ApiKey,
    policy_exists: bool,
    secret: Option<&Secret>,
    now: i64,
) -> (Desired, Option<BoundKey>) {
    if !policy_exists {
        let p = KeyProblem::PolicyNotFound(key.spec.policy_ref.name.clone());
        return (
            Desired::new(condition::READY, false, p.reason(), p.to_string()),
            None,
        );
    }
    match render::bind_key(key, secret) {
        Err(p) => (
            Desired::new(condition::READY, false, p.reason(), p.to_string()),
            None,
        ),
        Ok(b) if b.disabled => (
            Desired::new(
                condition::READY,
                false,
                "Disabled",
                "key is disabled: requests get 403",
            ),
            Some(b),
        ),
        Ok(b) if b.expires_at.is_some_and(|t| t <= now) => (
            Desired::new(
                condition::READY,
                false,
                "Expired",
                "key has expired: requests get 403",
            ),
            Some(b),
        ),
        Ok(b) => (
            Desired::new(
                condition::READY,
                true,
                "Bound",
                format!("bound to RateLimitPolicy {}", key.spec.policy_ref.name),
            ),
            Some(b),
        ),
    }
}

async fn reconcile_apikey(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("apikey");
    let ns = key
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = key.name_any();
    let secret = if key.spec.secret_ref.is_none() {
        ensure_generated_secret(&key, &ctx).await?
    } else {
        let (sname, _) = render::secret_ref(&key);
        ctx.secrets
            .get(&ObjectRef::new(&sname).within(&ns))
            .map(|s| (*s).clone())
    };
    let policy_exists = ctx
        .policies
        .get(&ObjectRef::new(&key.spec.policy_ref.name).within(&ns))
        .is_some();
    let now = Timestamp::now();
    let (ready, bound) = key_readiness(&key, policy_exists, secret.as_ref(), now.as_second());

    let old = key.status.clone().unwrap_or_default();
    let generation = key.metadata.generation;
    let fingerprint = bound.as_ref().map(BoundKey::fingerprint);
    let secret_name = Some(render::secret_ref(&key).0);
    let policy = policy_exists.then(|| key.spec.policy_ref.name.clone());
    let unchanged = conditions::is_current(&old.conditions, &ready, generation)
        && old.observed_generation == generation
        && old.fingerprint == fingerprint
        && old.secret_name == secret_name
        && old.policy == policy;
    if !unchanged {
        let was_ready =
            conditions::find(&old.conditions, condition::READY).map(|c| c.status == "True");
        let cond = conditions::merge(&old.conditions, &ready, generation, now);
        // Only the fields this manager owns; the exhaustion reporter owns the rest.
        let status = json!({
            "apiVersion": "keylimit.dev/v1alpha1",
            "kind": "ApiKey",
            "status": {
                "conditions": [cond],
                "observedGeneration": generation,
                "policy": policy,
                "secretName": secret_name,
                "fingerprint": fingerprint,
            }
        });
        let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await?;
        ctx.metrics.status_writes.inc();
        if was_ready != Some(ready.status) {
            let type_ = if ready.status {
                EventType::Normal
            } else {
                EventType::Warning
            };
            publish(
                &ctx,
                key.as_ref(),
                type_,
                &ready.reason,
                ready.message.clone(),
            )
            .await;
        }
    }
    // Expiry is a status change nobody will send an event for: come back then.
    let requeue = render::seconds_until(bound.and_then(|b| b.expires_at), now.as_second())
        .map(|s| Duration::from_secs(s as u64 + 1))
        .map_or(RESYNC, |d| d.min(RESYNC));
    Ok(Action::requeue(requeue))
}

/// Renders the policy and writes what changed. Returns the summary and how many writes
/// (including deletions of stale shards) it made.
async fn write_config_maps(
    policy: &Arc<RateLimitPolicy>,
    keys: &[(Arc<ApiKey>, Option<Arc<Secret>>)],
    ns: &str,
    name: &str,
    ctx: &Arc<Context>,
) -> Result<(Rendered, usize), Error> {
    let (ns, name) = (ns.to_string(), name.to_string());
    let mut bound = vec![];
    for (key, secret) in keys {
        // Unusable keys are left out; their own status says why.
        if let Ok(b) = render::bind_key(key, secret.as_deref()) {
            bound.push(b);
        }
    }
    let rendered = render::render(policy, &bound)?;

    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = policy
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let mut changed = 0;
    let wanted: BTreeSet<String> = rendered
        .config_maps
        .iter()
        .map(|c| c.name.clone())
        .collect();
    for cm in &rendered.config_maps {
        let current = ctx.config_maps.get(&ObjectRef::new(&cm.name).within(&ns));
        // Skip identical writes: unchanged inputs must cost the apiserver nothing.
        if current.as_ref().and_then(|c| c.data.as_ref()) == Some(&cm.data)
            && current
                .as_ref()
                .map(|c| c.owner_references().contains(&owner))
                == Some(true)
        {
            continue;
        }
        let obj = ConfigMap {
            metadata: ObjectMeta {
                name: Some(cm.name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(BTreeMap::from([
                    (POLICY_LABEL.to_string(), name.clone()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        MANAGER.to_string(),
                    ),
                ])),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            data: Some(cm.data.clone()),
            ..Default::default()
        };
        let mut patch = serde_json::to_value(&obj)?;
        patch["apiVersion"] = json!("v1");
        patch["kind"] = json!("ConfigMap");
        api.patch(
            &cm.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.metrics.configmap_writes.inc();
        changed += 1;
    }
    // Shards left over from a larger key set.
    let stale: Vec<String> = ctx
        .config_maps
        .state()
        .iter()
        .filter(|c| {
            c.namespace().as_deref() == Some(ns.as_str())
                && c.labels().get(POLICY_LABEL) == Some(&name)
                && !wanted.contains(&c.name_any())
        })
        .map(|c| c.name_any())
        .collect();
    for s in &stale {
        match api.delete(s, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if changed > 0 || !stale.is_empty() {
        info!(policy = %name, namespace = %ns, changed, removed = stale.len(), keys = rendered.keys, "data-plane config updated");
        publish(
            ctx,
            policy.as_ref(),
            EventType::Normal,
            "ConfigUpdated",
            format!(
                "{} key(s) in {} ConfigMap(s); {changed} written",
                rendered.keys,
                rendered.config_maps.len()
            ),
        )
        .await;
    }

    Ok((
        Rendered {
            inputs: 0,
            keys: rendered.keys,
            config_maps: rendered
                .config_maps
                .iter()
                .map(|c| c.name.clone())
                .collect(),
        },
        changed + stale.len(),
    ))
}

async fn reconcile_policy(
    policy: Arc<RateLimitPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("ratelimitpolicy");
    let ns = policy
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = policy.name_any();
    let now = Timestamp::now();

    let keys: Vec<(Arc<ApiKey>, Option<Arc<Secret>>)> = ctx
        .apikeys
        .state()
        .into_iter()
        .filter(|k| k.namespace().as_deref() == Some(ns.as_str()) && k.spec.policy_ref.name == name)
        .map(|k| {
            let (sname, _) = render::secret_ref(&k);
            let secret = ctx.secrets.get(&ObjectRef::new(&sname).within(&ns));
            (k, secret)
        })
        .collect();
    let owned: Vec<Arc<ConfigMap>> = ctx
        .config_maps
        .state()
        .into_iter()
        .filter(|c| {
            c.namespace().as_deref() == Some(ns.as_str())
                && c.labels().get(POLICY_LABEL) == Some(&name)
        })
        .collect();
    let inputs = render_inputs(&policy, &keys, &owned);
    let memo_key = (ns.clone(), name.clone());
    let memo = ctx
        .render_memo
        .0
        .lock()
        .ok()
        .and_then(|m| m.get(&memo_key).cloned())
        .filter(|m| m.inputs == inputs);
    let rendered_summary = match memo {
        Some(m) => m,
        None => {
            let summary = write_config_maps(&policy, &keys, &ns, &name, &ctx).await?;
            // The memo must describe the ConfigMaps as they are now, including our own writes,
            // which the cache may not have seen yet: store it only when nothing was written.
            if summary.1 == 0 {
                if let Ok(mut m) = ctx.render_memo.0.lock() {
                    m.insert(
                        memo_key,
                        Rendered {
                            inputs,
                            keys: summary.0.keys,
                            config_maps: summary.0.config_maps.clone(),
                        },
                    );
                }
            }
            summary.0
        }
    };
    let rendered_keys = rendered_summary.keys;
    let cms = rendered_summary.config_maps;

    let generation = policy.metadata.generation;
    let old = policy.status.clone().unwrap_or_default();
    let accepted = Desired::new(condition::ACCEPTED, true, "Accepted", "spec is valid");
    let ready = Desired::new(
        condition::READY,
        true,
        "ConfigMapsWritten",
        format!(
            "{} key(s) published in {} ConfigMap(s)",
            rendered_keys,
            cms.len()
        ),
    );
    let quotas = quota_scope(&policy.spec, old.sidecars_reporting);
    let unchanged = conditions::is_current(&old.conditions, &accepted, generation)
        && conditions::is_current(&old.conditions, &ready, generation)
        && conditions::is_current(&old.conditions, &quotas, generation)
        && old.observed_generation == generation
        && old.keys == rendered_keys as i64
        && old.config_maps == cms;
    if !unchanged {
        let status = json!({
            "apiVersion": "keylimit.dev/v1alpha1",
            "kind": "RateLimitPolicy",
            "status": {
                "conditions": [
                    conditions::merge(&old.conditions, &accepted, generation, now),
                    conditions::merge(&old.conditions, &ready, generation, now),
                    conditions::merge(&old.conditions, &quotas, generation, now),
                ],
                "observedGeneration": generation,
                "keys": rendered_keys,
                "configMaps": cms,
            }
        });
        let was_exact =
            conditions::find(&old.conditions, condition::QUOTAS_EXACT).map(|c| c.status == "True");
        if !quotas.status && was_exact != Some(false) {
            publish(
                &ctx,
                policy.as_ref(),
                EventType::Warning,
                &quotas.reason,
                quotas.message.clone(),
            )
            .await;
        }
        let papi: Api<RateLimitPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        papi.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await?;
        ctx.metrics.status_writes.inc();
    }
    Ok(Action::requeue(RESYNC))
}

/// `QuotasExact`: whether a declared quota means one count for the whole workload. With the
/// Local store each sidecar counts on its own (and forgets on restart), so with more than one
/// sidecar the workload admits up to N x the quota: say so where users look.
pub fn quota_scope(spec: &crate::crd::RateLimitPolicySpec, sidecars: i64) -> Desired {
    let has_quota = |l: &Option<crate::crd::LimitsSpec>| {
        l.as_ref()
            .and_then(|l| l.quotas.as_ref())
            .is_some_and(|q| !q.is_empty())
    };
    let declared = has_quota(&spec.limits)
        || has_quota(&spec.policy_limits)
        || spec.routes.iter().flatten().any(|r| has_quota(&r.limits));
    let redis = spec
        .store
        .as_ref()
        .is_some_and(|s| s.type_ == crate::crd::StoreType::Redis);
    match (declared, redis, sidecars > 1) {
        (false, _, _) => Desired::new(condition::QUOTAS_EXACT, true, "NoQuotas", "the policy declares no quota"),
        (true, true, _) => Desired::new(condition::QUOTAS_EXACT, true, "RedisStore", "quotas are counted once in Redis and survive restarts"),
        (true, false, false) => Desired::new(
            condition::QUOTAS_EXACT,
            true,
            "SingleSidecar",
            "quotas are counted in the one reporting sidecar's memory and reset when it restarts",
        ),
        (true, false, true) => Desired::new(
            condition::QUOTAS_EXACT,
            false,
            "LocalStoreWithReplicas",
            format!(
                "quotas are counted per sidecar with store Local: {sidecars} sidecars may each admit the full quota, and a restart forgets it; use store: Redis for one durable count"
            ),
        ),
    }
}

fn backoff(ctx: &Context, controller: &'static str, err: &Error) -> Action {
    warn!(controller, error = %err, "reconcile failed");
    ctx.metrics.reconcile_failure(controller);
    // A permanent error (a render bug, a rejected write) must not hot-loop the apiserver.
    Action::requeue(Duration::from_secs(15))
}

fn error_policy_apikey(_k: Arc<ApiKey>, err: &Error, ctx: Arc<Context>) -> Action {
    backoff(&ctx, "apikey", err)
}

fn error_policy_policy(_p: Arc<RateLimitPolicy>, err: &Error, ctx: Arc<Context>) -> Action {
    backoff(&ctx, "ratelimitpolicy", err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{mk_apikey, mk_secret};

    #[test]
    fn render_inputs_ignore_order_and_status_but_see_real_changes() {
        let p = crate::render::tests::mk_policy("p");
        let mk = |n: &str, gen: i64, rv: &str| {
            let mut k = mk_apikey(n, "p");
            k.metadata.generation = Some(gen);
            let mut s = mk_secret(&format!("{n}-key"), "key", b"kl_0123456789abcdef0123");
            s.metadata.resource_version = Some(rv.into());
            (Arc::new(k), Some(Arc::new(s)))
        };
        let a = vec![mk("a", 1, "10"), mk("b", 1, "11")];
        let reversed = vec![mk("b", 1, "11"), mk("a", 1, "10")];
        assert_eq!(
            render_inputs(&p, &a, &[]),
            render_inputs(&p, &reversed, &[])
        );
        // A status write changes resourceVersion, not generation: same inputs.
        let mut with_status = a.clone();
        let mut k = (*with_status[0].0).clone();
        k.metadata.resource_version = Some("999".into());
        with_status[0].0 = Arc::new(k);
        assert_eq!(
            render_inputs(&p, &a, &[]),
            render_inputs(&p, &with_status, &[])
        );
        // A rotated Secret, a spec change, a removed key: different inputs.
        assert_ne!(
            render_inputs(&p, &a, &[]),
            render_inputs(&p, &[mk("a", 1, "12"), mk("b", 1, "11")], &[])
        );
        assert_ne!(
            render_inputs(&p, &a, &[]),
            render_inputs(&p, &[mk("a", 2, "10"), mk("b", 1, "11")], &[])
        );
        assert_ne!(render_inputs(&p, &a, &[]), render_inputs(&p, &a[..1], &[]));
    }

    #[test]
    fn generated_keys_are_long_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert!(a.starts_with("kl_"));
        assert_eq!(a.len(), 3 + 64);
        assert_ne!(a, b);
    }

    #[test]
    fn local_quotas_with_replicas_are_flagged() {
        let mut p = crate::render::tests::mk_policy("p");
        assert_eq!(quota_scope(&p.spec, 3).reason, "NoQuotas");
        p.spec.limits.as_mut().unwrap().quotas = Some(vec![crate::crd::QuotaSpec {
            name: "monthly".into(),
            requests: 10,
            period: crate::crd::QuotaPeriodSpec::Month,
            alignment: crate::crd::QuotaAlignmentSpec::Calendar,
        }]);
        assert_eq!(quota_scope(&p.spec, 1).reason, "SingleSidecar");
        let d = quota_scope(&p.spec, 3);
        assert!(!d.status);
        assert_eq!(d.reason, "LocalStoreWithReplicas");
        assert!(d.message.contains("3 sidecars"));
        p.spec.store = Some(crate::crd::StoreSpec {
            type_: crate::crd::StoreType::Redis,
            redis: None,
        });
        assert_eq!(quota_scope(&p.spec, 3).reason, "RedisStore");
    }

    #[test]
    fn readiness_reasons() {
        let mut k = mk_apikey("a", "p");
        let s = mk_secret("a-key", "key", b"kl_0123456789abcdef0123");
        let (c, b) = key_readiness(&k, false, Some(&s), 0);
        assert_eq!(
            (c.status, c.reason.as_str(), b.is_none()),
            (false, "PolicyNotFound", true)
        );
        assert!(c.message.contains("\"p\""));
        let (c, _) = key_readiness(&k, true, None, 0);
        assert_eq!(c.reason, "SecretNotFound");
        let (c, b) = key_readiness(&k, true, Some(&s), 0);
        assert_eq!((c.status, c.reason.as_str()), (true, "Bound"));
        assert!(b.is_some());
        k.spec.expires_at = Some("1970-01-01T00:01:40Z".into());
        let (c, b) = key_readiness(&k, true, Some(&s), 100);
        assert_eq!((c.status, c.reason.as_str()), (false, "Expired"));
        assert!(
            b.is_some(),
            "expired keys stay in the data plane so callers get 403, not 401"
        );
        let (c, _) = key_readiness(&k, true, Some(&s), 99);
        assert_eq!(c.reason, "Bound");
        k.spec.disabled = true;
        let (c, _) = key_readiness(&k, true, Some(&s), 0);
        assert_eq!(c.reason, "Disabled");
    }
}
