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
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use keylimit_dataplane as dp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PostParams};
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
use crate::index::{Debouncer, KeyIndex, Written};
use crate::key_secret::{KeySecret, SecretCache, WatchedSecret};
use crate::metrics::Metrics;
use crate::render::{self, BoundKey, KeyProblem, POLICY_LABEL};
use crate::Error;

/// The one field manager the operator writes with.
pub const MANAGER: &str = "keylimit-operator";
/// Label on Secrets the operator generated, naming their ApiKey.
pub const GENERATED_LABEL: &str = "keylimit.dev/apikey";
/// Opt-in label (value `"true"`) on every Secret keylimit may read: the ones it generates, and
/// any a user names in an ApiKey's `secretRef`. The operator watches, lists and caches only
/// Secrets that carry it, so it never holds other Secrets in memory, and an ApiKey author
/// cannot make it hash and publish a Secret its owner did not offer (a database password).
pub const SECRET_LABEL: &str = "keylimit.dev/secret";
/// [`SECRET_LABEL`] as the label selector of every Secret watch.
pub const SECRET_SELECTOR: &str = "keylimit.dev/secret=true";
/// How often a policy, or a key with an expiry, is looked at again without events (drift
/// repair for a policy's ConfigMaps; a bound on the wait for an expiry).
const RESYNC: Duration = Duration::from_secs(300);

/// Shared state of both controllers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every apiserver write goes through `leader.fenced`: a replica whose claim lapsed (a
    /// stalled renewal) stops writing at once, before another can take over.
    pub leader: crate::leader::LeaderState,
    pub secrets: Arc<SecretCache>,
    pub apikeys: Store<ApiKey>,
    pub policies: Store<RateLimitPolicy>,
    pub config_maps: Store<ConfigMap>,
    pub render_memo: RenderMemo,
    pub duplicates: DuplicateBook,
    /// Secret -> ApiKeys and policy -> ApiKeys, kept by the ApiKey watch.
    pub index: Arc<KeyIndex>,
    /// ApiKey statuses written by this process that the cache does not show yet.
    pub written: Written,
    /// True once every cache is filled.
    pub caches: tokio::sync::watch::Receiver<bool>,
    /// Asks the ApiKey controller to look at a key again: the policy controller is the one
    /// that finds duplicate key material, and the keys it affects get no event of their own.
    pub recheck_apikey: futures::channel::mpsc::UnboundedSender<ObjectRef<ApiKey>>,
}

/// Per policy (namespace, name): the ApiKeys its last render left out as duplicates, each
/// with the ApiKey that holds the key material. A policy is absent until this process has
/// rendered it.
#[derive(Default)]
pub struct DuplicateBook(std::sync::Mutex<HashMap<(String, String), BTreeMap<String, String>>>);

/// Drops what no reconcile reads before an object enters a cache: managed fields (several
/// entries of nested JSON per object, about half of an ApiKey's size in memory) and kubectl's
/// last-applied copy of the object. At 100,000 ApiKeys and their Secrets this is most of the
/// operator's memory.
fn slim<K: Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
    if let Some(a) = o.meta_mut().annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        if a.is_empty() {
            o.meta_mut().annotations = None;
        }
    }
}

/// What the last render of a key's policy says about the key's material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Duplication {
    /// The policy has not been rendered by this process yet.
    Unknown,
    Unique,
    HeldBy(String),
}

impl DuplicateBook {
    pub fn lookup(&self, ns: &str, policy: &str, key: &str) -> Duplication {
        let Ok(book) = self.0.lock() else {
            return Duplication::Unknown;
        };
        match book.get(&(ns.to_string(), policy.to_string())) {
            None => Duplication::Unknown,
            Some(d) => d
                .get(key)
                .map_or(Duplication::Unique, |h| Duplication::HeldBy(h.clone())),
        }
    }

    fn set(&self, ns: &str, policy: &str, dups: BTreeMap<String, String>) {
        if let Ok(mut book) = self.0.lock() {
            book.insert((ns.to_string(), policy.to_string()), dups);
        }
    }
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
    /// ApiKey left out -> the ApiKey holding the same key material.
    duplicates: BTreeMap<String, String>,
    /// Why nothing was written (the last published ConfigMaps stay): the Ready reason and
    /// message, e.g. too many keys.
    refused: Option<(&'static str, String)>,
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
    keys: &[(Arc<ApiKey>, Option<Arc<KeySecret>>)],
    owned: &[Arc<ConfigMap>],
    now: i64,
) -> u64 {
    render_inputs_with(
        policy,
        keys,
        owned.iter().map(|cm| {
            (
                cm.metadata.name.as_deref(),
                cm.metadata.resource_version.as_deref(),
            )
        }),
        now,
    )
}

/// `render_inputs` with the policy's ConfigMaps given as (name, resourceVersion): after a
/// render writes, the memo is keyed on the ConfigMaps as the write left them, so their watch
/// events coming back (the cache catching up with our own writes) do not render again.
fn render_inputs_with<'a>(
    policy: &RateLimitPolicy,
    keys: &[(Arc<ApiKey>, Option<Arc<KeySecret>>)],
    config_maps: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>,
    now: i64,
) -> u64 {
    let sidecars = policy.status.as_ref().map_or(0, |s| s.sidecars_reporting);
    let mut sum = hash_of((&policy.metadata.uid, policy.metadata.generation, sidecars));
    for (k, s) in keys {
        // A rotation's overlap ends with no object changing: whether it still lasts is an
        // input too, so the render after it ends drops the previous key.
        let overlap = render::previous_valid_until(k, s.as_deref()).map(|t| t > now);
        sum = sum.wrapping_add(hash_of((
            &k.metadata.name,
            &k.metadata.uid,
            k.metadata.generation,
            s.as_ref().map(|s| (&s.uid, &s.resource_version)),
            overlap,
        )));
    }
    for cm in config_maps {
        sum = sum.wrapping_add(hash_of(cm));
    }
    sum
}

/// How hard the controllers may push; see the flags in `lib.rs`.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// ApiKey reconciles at once.
    pub apikey_concurrency: u16,
    /// RateLimitPolicy reconciles (renders) at once.
    pub policy_concurrency: u16,
    /// A policy renders once its keys stopped changing for this long ...
    pub render_quiet: Duration,
    /// ... or this long after the first change it has not rendered yet.
    pub render_max_delay: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            apikey_concurrency: 32,
            policy_concurrency: 2,
            render_quiet: Duration::from_millis(500),
            render_max_delay: Duration::from_secs(10),
        }
    }
}

impl Context {
    /// Waits until every cache has its first full list. A controller starts when its own
    /// cache is ready; a reconcile also reads the others, and an ApiKey reconcile that ran
    /// before the Secret cache was filled would look for Secrets by GET one by one. (A
    /// watch channel, not the stores' own `wait_until_ready`: that wakes only the last of
    /// several waiters, and the reconciles waiting at startup would never run.)
    async fn caches_ready(&self) -> Result<(), Error> {
        let mut rx = self.caches.clone();
        rx.wait_for(|ready| *ready)
            .await
            .map(|_| ())
            .map_err(|_| Error::Config("the caches never became ready".into()))
    }
}

/// Waits for each cache in turn (one waiter each), then opens `tx`.
async fn await_caches(
    stores: (
        Arc<SecretCache>,
        Store<ApiKey>,
        Store<RateLimitPolicy>,
        Store<ConfigMap>,
    ),
    tx: tokio::sync::watch::Sender<bool>,
) -> Result<(), Error> {
    let (secrets, apikeys, policies, config_maps) = stores;
    secrets.wait_until_ready().await;
    for (what, r) in [
        ("apikeys", apikeys.wait_until_ready().await),
        ("policies", policies.wait_until_ready().await),
        ("configmaps", config_maps.wait_until_ready().await),
    ] {
        r.map_err(|e| Error::Config(format!("{what} cache never became ready: {e}")))?;
    }
    let _ = tx.send(true);
    Ok(())
}

/// Starts the caches, then runs both controllers until `shutdown` resolves.
///
/// One watch per kind feeds one cache, shared by both controllers and [`Context`]: the
/// ApiKey watch drives the ApiKey controller and keeps [`KeyIndex`], whose changes reach the
/// policy controller through a [`Debouncer`]; the Secret watch drives the ApiKey controller
/// (and, through the index, the debouncer); the policy watch drives the policy controller
/// and, when a policy appears or vanishes, rechecks its keys; the ConfigMap watch drives the
/// policy controller.
// Each argument is a separate piece of shared state wired once in `lib.rs`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    reports: Arc<crate::reports::Reports>,
    instance: String,
    leader: crate::leader::LeaderState,
    tuning: Tuning,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce(),
) -> Result<(), Error> {
    let secrets = Arc::new(SecretCache::default());
    let (apikeys, apikeys_w) = reflector::store::<ApiKey>();
    let (policies, policies_w) = reflector::store::<RateLimitPolicy>();
    let (config_maps, config_maps_w) = reflector::store::<ConfigMap>();

    let scoped = |c: &Client| -> (
        Api<WatchedSecret>,
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
    let secret_cfg = watcher::Config::default().labels(SECRET_SELECTOR);

    let (recheck_apikey, recheck_rx) = futures::channel::mpsc::unbounded();
    let index = Arc::new(KeyIndex::default());
    let (caches_tx, caches) = tokio::sync::watch::channel(false);
    let stores = (
        secrets.clone(),
        apikeys.clone(),
        policies.clone(),
        config_maps.clone(),
    );
    let (render_tx, render_rx) = crate::index::policy_channel();
    let debouncer = Arc::new(Debouncer::new(
        tuning.render_quiet,
        tuning.render_max_delay,
        render_tx,
        index.clone(),
    ));
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
        leader,
        secrets,
        apikeys,
        policies: policies.clone(),
        config_maps: config_maps.clone(),
        render_memo: RenderMemo::default(),
        duplicates: DuplicateBook::default(),
        index: index.clone(),
        written: Written::default(),
        caches,
        recheck_apikey: recheck_apikey.clone(),
    });

    // The index and the memo of our writes are updated after the cache (the reflector), so
    // whatever they say, the cache already holds.
    let apikey_events = {
        let (ctx, debouncer) = (ctx.clone(), debouncer.clone());
        reflector::reflector(
            apikeys_w,
            watcher(apikey_api, watcher::Config::default())
                .default_backoff()
                .modify(slim),
        )
        .map_ok(move |ev| {
            ctx.written.on_event(&ev);
            let has_secret = |ns: &str, name: &str| ctx.secrets.get(ns, name).is_some();
            debouncer.mark(ctx.index.on_event(&ev, has_secret));
            ev
        })
        .applied_objects()
    };
    let secret_events = {
        let cache = ctx.secrets.clone();
        watcher(secret_api, secret_cfg)
            .default_backoff()
            .map_ok(move |mut ev| {
                cache.apply(&mut ev);
                ev
            })
            .touched_objects()
    };
    let policy_events = {
        let (index, recheck) = (index.clone(), recheck_apikey.clone());
        let mut known: HashSet<(String, String)> = HashSet::new();
        reflector::reflector(
            policies_w,
            watcher(policy_api, watcher::Config::default())
                .default_backoff()
                .modify(slim),
        )
        .map_ok(move |ev| {
            // A policy appearing or vanishing changes its keys' Ready condition; its status
            // writes (many) change nothing for them.
            let mut flip = |p: &RateLimitPolicy, exists: bool| {
                let id = (p.namespace().unwrap_or_default(), p.name_any());
                let changed = if exists {
                    known.insert(id.clone())
                } else {
                    known.remove(&id)
                };
                if changed {
                    for k in index.keys_of_policy(&id.0, &id.1) {
                        // Only fails when the ApiKey controller has stopped (shutdown).
                        let _ = recheck.unbounded_send(k);
                    }
                }
            };
            match &ev {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => flip(p, true),
                watcher::Event::Delete(p) => flip(p, false),
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
            ev
        })
        .applied_objects()
        // The policy's own status writes (one per render) must not render it again: only a
        // new spec, or a new count of reporting sidecars (which the render reads), does.
        .predicate_filter(
            |p: &RateLimitPolicy| {
                let sidecars = p.status.as_ref().map_or(0, |s| s.sidecars_reporting);
                Some(hash_of((p.metadata.generation, sidecars)))
            },
            Default::default(),
        )
    };
    let cm_events = reflector::reflector(
        config_maps_w,
        watcher(cm_api, cm_cfg).default_backoff().modify(slim),
    )
    .touched_objects();

    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    let debounce = tokio::spawn(debouncer.clone().run());
    let release = tokio::spawn(release_memory_after_bursts(ctx.metrics.clone()));

    let apikey_ctl = Controller::for_stream(apikey_events, ctx.apikeys.clone())
        .with_config(
            kube::runtime::controller::Config::default().concurrency(tuning.apikey_concurrency),
        )
        // A Secret event re-reconciles the ApiKeys that read it and re-renders their
        // policies (a rotated key); the namespace's hash key re-renders every policy there.
        .watches_stream(secret_events, {
            let (index, debouncer) = (index.clone(), debouncer.clone());
            move |s: WatchedSecret| {
                let ns = s.namespace().unwrap_or_default();
                let name = s.name_any();
                if name == dp::HASH_KEY_SECRET {
                    debouncer.mark(index.policies_in(&ns).into_iter().map(|p| (ns.clone(), p)));
                    return vec![];
                }
                debouncer.mark(index.policies_of_secret(&ns, &name));
                index.keys_of_secret(&ns, &name)
            }
        })
        .reconcile_on(recheck_rx)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_apikey, error_policy_apikey, ctx.clone())
        .for_each(|_| async {});

    let policy_ctl = Controller::for_stream(policy_events, policies)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(tuning.policy_concurrency),
        )
        // A ConfigMap event (our own write coming back, or someone else's edit to repair)
        // re-renders its policy through the debouncer, once a burst of them is over.
        .watches_stream(cm_events, {
            let debouncer = debouncer.clone();
            move |cm: ConfigMap| {
                if let Some(p) = cm.labels().get(POLICY_LABEL) {
                    debouncer.mark([(cm.namespace().unwrap_or_default(), p.clone())]);
                }
                None
            }
        })
        .reconcile_on(render_rx)
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_policy, error_policy_policy, ctx.clone())
        .for_each(|_| async {});

    // Readiness and the exhaustion status writer wait for the caches, which the controllers'
    // streams fill.
    let status = {
        let ctx = ctx.clone();
        async move {
            await_caches(stores, caches_tx).await?;
            info!("caches synced");
            ready();
            crate::reports::write_status(reports, ctx, shutdown).await;
            Ok::<(), Error>(())
        }
    };
    let (_, status) =
        futures::future::join(futures::future::join(apikey_ctl, policy_ctl), status).await;
    debounce.abort();
    release.abort();
    status
}

/// How long the controllers must have been idle before the memory a burst freed is returned.
const IDLE_BEFORE_RELEASE: Duration = Duration::from_secs(5);

/// Once a burst of reconciles (a cold start, a mass edit) is over, returns the memory it freed
/// to the kernel. The allocator keeps freed pages for reuse, so without this the resident set
/// stays near the burst's peak: after a cold start over 100,000 keys, 411 MB, and 321 MB once
/// released. The walk over the heap runs once per burst, never while reconciles are running,
/// so a quiet operator pays nothing.
async fn release_memory_after_bursts(metrics: Arc<Metrics>) {
    let mut seen = metrics.reconciles_total();
    let mut busy = false;
    let mut tick = tokio::time::interval(IDLE_BEFORE_RELEASE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = metrics.reconciles_total();
        if now != seen {
            (seen, busy) = (now, true);
        } else if busy {
            busy = false;
            let _ = tokio::task::spawn_blocking(keylimit_memory::release_free_memory).await;
        }
    }
}

/// The policies an ApiKey event concerns: the one it names, and the one it was last bound to
/// (`status.policy`) when that differs. When a key moves to another policy, the old policy
/// must re-render at once, or the key stays valid there until the resync.
pub fn policies_of_key(k: &ApiKey) -> Vec<ObjectRef<RateLimitPolicy>> {
    let ns = k.namespace().unwrap_or_default();
    let named = &k.spec.policy_ref.name;
    let mut out = vec![ObjectRef::new(named).within(&ns)];
    if let Some(old) = k.status.as_ref().and_then(|s| s.policy.as_ref()) {
        if old != named {
            out.push(ObjectRef::new(old).within(&ns));
        }
    }
    out
}

/// Generates a key: `kl_` + 32 random bytes in hex (256 bits of entropy).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("kl_{}", hex::encode(bytes))
}

/// Labels of the namespace's key-hash Secret ([`dp::HASH_KEY_SECRET`]).
pub fn hash_key_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_string(),
            "keylimit".to_string(),
        ),
        // In the operator's (label-selected) Secret cache, not read by a GET per reconcile.
        (SECRET_LABEL.to_string(), "true".to_string()),
    ])
}

/// The namespace's key-hash HMAC key, as a keyed hasher: read from the `keylimit-hash-key`
/// Secret, which is created with 32 random bytes if absent. It is never overwritten or
/// rotated here (rotating means re-hashing every key and re-keying every sidecar at once);
/// a Secret whose key is unusable fails the reconcile instead of being replaced, because
/// replacing it would silently lock every key out of every running sidecar.
pub async fn ensure_hash_key(ctx: &Context, ns: &str) -> Result<dp::KeyHasher, Error> {
    let name = dp::HASH_KEY_SECRET;
    let secret: KeySecret = match ctx.secrets.get(ns, name) {
        Some(s) => (*s).clone(),
        None => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
            // The cache may lag (or not watch this Secret): look before creating.
            match api.get_opt(name).await? {
                Some(s) => s.into(),
                None => {
                    let mut bytes = [0u8; dp::HASH_KEY_LEN];
                    rand::rng().fill_bytes(&mut bytes);
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(name.to_string()),
                            namespace: Some(ns.to_string()),
                            labels: Some(hash_key_labels()),
                            ..Default::default()
                        },
                        type_: Some("Opaque".into()),
                        data: Some(BTreeMap::from([(
                            dp::HASH_KEY_DATA.to_string(),
                            ByteString(bytes.to_vec()),
                        )])),
                        ..Default::default()
                    };
                    match ctx
                        .leader
                        .fenced(api.create(&PostParams::default(), &secret))
                        .await?
                    {
                        Ok(s) => {
                            info!(namespace = ns, "created key-hash Secret {name}");
                            s.into()
                        }
                        // Another replica (or reconcile) won the race: use its key.
                        Err(kube::Error::Api(e)) if e.code == 409 => api
                            .get_opt(name)
                            .await?
                            .map(KeySecret::from)
                            .ok_or_else(|| {
                                Error::Config(format!("{ns}/{name} vanished after a conflict"))
                            })?,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    };
    hasher_from_secret(&secret).map_err(|e| Error::Config(format!("{ns}/{name}: {e}")))
}

/// The hasher a key-hash Secret holds.
pub fn hasher_from_secret(secret: &KeySecret) -> Result<dp::KeyHasher, dp::Error> {
    let key = secret
        .get(dp::HASH_KEY_DATA)
        .ok_or_else(|| dp::Error::Invalid(format!("no data key {:?}", dp::HASH_KEY_DATA)))?;
    dp::KeyHasher::hmac(key)
}

async fn ensure_generated_secret(key: &ApiKey, ctx: &Context) -> Result<Option<KeySecret>, Error> {
    let ns = key
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let (name, data_key) = render::secret_ref(key);
    let cached = ctx.secrets.get(&ns, &name);
    if let Some(s) = cached {
        return Ok(Some((*s).clone()));
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // The cache may lag a Secret created moments ago; never overwrite an existing key: a
    // create fails (409) when one exists, and only then is it read. A Secret of that name
    // without the opt-in label (a user's, or one generated before the label existed) is
    // neither read nor replaced: the key reports SecretNotFound, whose message names the
    // label. Labelling it here would need `patch` on every Secret in the cluster;
    // docs/install.md has the one-line upgrade step instead.
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                (GENERATED_LABEL.to_string(), key.name_any()),
                (SECRET_LABEL.to_string(), "true".to_string()),
            ])),
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
    match ctx
        .leader
        .fenced(api.create(&PostParams::default(), &secret))
        .await?
    {
        // No event: the key's status names the Secret, and an event per generated key
        // doubled the writes of a cold start over many new keys.
        Ok(s) => {
            info!(namespace = %ns, secret = %name, "generated a key");
            let created = KeySecret::from(s);
            ctx.secrets.insert_created(&ns, &name, created.clone());
            Ok(Some(created))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api
            .get_opt(&name)
            .await?
            .filter(opted_in)
            .map(KeySecret::from)),
        Err(e) => Err(e.into()),
    }
}

/// Whether the apiserver refused a create because the namespace is being deleted (403, reason
/// Forbidden, "... because it is being terminated").
pub fn namespace_terminating(e: &kube::core::Status) -> bool {
    e.code == 403 && e.message.contains("because it is being terminated")
}

/// Whether keylimit wrote this ConfigMap for the policy `name`: it carries the policy label
/// and an owner reference to a RateLimitPolicy of that name (any uid: a re-created policy
/// adopts the ConfigMaps its predecessor left until the garbage collector removes them).
pub fn owned_by_policy(c: &ConfigMap, name: &str) -> bool {
    c.labels().get(POLICY_LABEL).map(String::as_str) == Some(name)
        && c.owner_references().iter().any(|o| {
            o.kind == "RateLimitPolicy"
                && o.name == name
                && o.api_version.starts_with("keylimit.dev/")
        })
}

/// Whether a Secret carries the opt-in label ([`SECRET_LABEL`]`=true`).
pub fn opted_in(s: &Secret) -> bool {
    s.labels().get(SECRET_LABEL).map(String::as_str) == Some("true")
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
    // A standby (or a lapsed leader) publishes nothing: `fenced` refuses without a claim.
    if let Ok(Err(e)) = ctx
        .leader
        .fenced(ctx.recorder.publish(&ev, &obj.object_ref(&())))
        .await
    {
        warn!(error = %e, "publishing event failed");
    }
}

/// The outcome of resolving one ApiKey: the Ready condition and, when bound, its key.
/// `held_by` names the older ApiKey of the same policy with the same key material, if any.
pub fn key_readiness(
    key: &ApiKey,
    policy_exists: bool,
    secret: Option<&KeySecret>,
    held_by: Option<&str>,
    now: i64,
    hasher: &dp::KeyHasher,
) -> (Desired, Option<BoundKey>) {
    if !policy_exists {
        let p = KeyProblem::PolicyNotFound(key.spec.policy_ref.name.clone());
        return (
            Desired::new(condition::READY, false, p.reason(), p.to_string()),
            None,
        );
    }
    match render::bind_key(key, secret, hasher, now) {
        Err(p) => (
            Desired::new(condition::READY, false, p.reason(), p.to_string()),
            None,
        ),
        // Before Disabled and Expired: the key is not in the data plane at all, and its own
        // flags have no effect there.
        Ok(b) if held_by.is_some() => (duplicate_condition(held_by.unwrap_or_default()), Some(b)),
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
        Ok(b) => {
            let mut message = format!("bound to RateLimitPolicy {}", key.spec.policy_ref.name);
            if let Some(p) = &b.rotation_problem {
                message.push_str("; ");
                message.push_str(p);
            }
            (
                Desired::new(condition::READY, true, "Bound", message),
                Some(b),
            )
        }
    }
}

/// Unix seconds as RFC 3339 (UTC, whole seconds), as status fields show instants.
fn rfc3339(t: i64) -> Option<String> {
    Timestamp::from_second(t).ok().map(|t| t.to_string())
}

fn duplicate_condition(holder: &str) -> Desired {
    let p = KeyProblem::DuplicateKey {
        holder: holder.to_string(),
    };
    Desired::new(condition::READY, false, p.reason(), p.to_string())
}

/// The ApiKeys whose Ready condition disagrees with a render's duplicates (`left out ->
/// holder`), so the ApiKey controller must look at them again.
pub fn keys_to_recheck<'a>(
    keys: impl IntoIterator<Item = &'a ApiKey>,
    duplicates: &BTreeMap<String, String>,
) -> Vec<ObjectRef<ApiKey>> {
    keys.into_iter()
        .filter(|k| {
            let says = k
                .status
                .as_ref()
                .and_then(|s| conditions::find(&s.conditions, condition::READY))
                .filter(|c| c.reason == "DuplicateKey")
                .map(|c| c.message.as_str());
            let want = duplicates
                .get(&k.name_any())
                .map(|h| duplicate_condition(h).message);
            says != want.as_deref()
        })
        .map(ObjectRef::from_obj)
        .collect()
}

async fn reconcile_apikey(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.caches_ready().await?;
    let _timer = ctx.metrics.reconcile_timer("apikey");
    // A key on its way out (a finalizer holds it) gets no writes: garbage collection removes
    // its generated Secret, and recreating that Secret would only fight the collector.
    if key.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = key
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = key.name_any();
    let secret = if key.spec.secret_ref.is_none() {
        match ensure_generated_secret(&key, &ctx).await {
            // Its namespace is being deleted, and the key with it: nothing to write, and a
            // retry with backoff would only ask again until the key is gone.
            Err(Error::Kube(kube::Error::Api(e))) if namespace_terminating(&e) => {
                return Ok(Action::await_change())
            }
            r => r?,
        }
    } else {
        let (sname, _) = render::secret_ref(&key);
        ctx.secrets.get(&ns, &sname).map(|s| (*s).clone())
    };
    let policy_exists = ctx
        .policies
        .get(&ObjectRef::new(&key.spec.policy_ref.name).within(&ns))
        .is_some();
    let now = Timestamp::now();
    let old = key.status.clone().unwrap_or_default();
    let duplication = ctx.duplicates.lookup(&ns, &key.spec.policy_ref.name, &name);
    let held_by = match &duplication {
        Duplication::HeldBy(h) => Some(h.as_str()),
        _ => None,
    };
    // Without a policy the key binds to nothing and is never hashed: no hash-key Secret is
    // created for a namespace that has no policy.
    let hasher = if policy_exists {
        ensure_hash_key(&ctx, &ns).await?
    } else {
        dp::KeyHasher::Sha256
    };
    let (mut ready, bound) = key_readiness(
        &key,
        policy_exists,
        secret.as_ref(),
        held_by,
        now.as_second(),
        &hasher,
    );
    // Until this process has rendered the policy, a key another operator found to be a
    // duplicate stays one: flipping it to Bound and back on every restart would be noise. The
    // policy's first render rechecks every key whose condition disagrees with it.
    if duplication == Duplication::Unknown && bound.is_some() {
        if let Some(c) = conditions::find(&old.conditions, condition::READY)
            .filter(|c| c.reason == "DuplicateKey")
        {
            ready = Desired::new(condition::READY, false, "DuplicateKey", c.message.clone());
        }
    }

    let generation = key.metadata.generation;
    let fingerprint = bound.as_ref().map(BoundKey::fingerprint);
    let previous = bound.as_ref().and_then(|b| b.previous.as_ref());
    let previous_fingerprint = bound.as_ref().and_then(BoundKey::previous_fingerprint);
    let previous_valid_until = previous.and_then(|p| rfc3339(p.valid_until));
    let secret_name = Some(render::secret_ref(&key).0);
    let policy = policy_exists.then(|| key.spec.policy_ref.name.clone());
    let id = (ns.clone(), name.clone());
    let digest = hash_of((
        (&ready.reason, &ready.message, ready.status, generation),
        (&fingerprint, &secret_name, &policy),
        (&previous_fingerprint, &previous_valid_until),
    ));
    let cached_current = conditions::is_current(&old.conditions, &ready, generation)
        && old.observed_generation == generation
        && old.fingerprint == fingerprint
        && old.secret_name == secret_name
        && old.policy == policy
        && old.previous_fingerprint == previous_fingerprint
        && old.previous_valid_until == previous_valid_until;
    let write = match ctx.written.last(&id) {
        // This process wrote a status the cache does not show yet: the cache is stale, and
        // only what was written says whether this one is new.
        Some(w) => w.digest != digest,
        None => !cached_current,
    };
    if write {
        let was_ready = match ctx.written.last(&id) {
            Some(w) => Some(w.ready),
            None => conditions::find(&old.conditions, condition::READY).map(|c| c.status == "True"),
        };
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
                "previousFingerprint": previous_fingerprint,
                "previousValidUntil": previous_valid_until,
            }
        });
        let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
        let written = ctx
            .leader
            .fenced(api.patch_status(&name, &crate::apply_params(MANAGER), &Patch::Apply(&status)))
            .await??;
        ctx.written.record(
            id,
            written.metadata.resource_version.unwrap_or_default(),
            digest,
            ready.status,
        );
        ctx.metrics.status_writes.inc();
        // Events on transitions only: a new key that binds says so in its status; one that
        // cannot be used gets a warning.
        let transition = match was_ready {
            Some(was) => was != ready.status,
            None => !ready.status,
        };
        // A rotation's start and end are worth a line in `kubectl get events`: the end is
        // when callers still holding the old key start getting 403.
        match (&old.previous_fingerprint, &previous_fingerprint) {
            (None, Some(p)) => {
                let note = format!(
                    "key rotated: the previous key {p} is accepted until {}, sharing this key's counters",
                    previous_valid_until.as_deref().unwrap_or_default()
                );
                publish(
                    &ctx,
                    key.as_ref(),
                    EventType::Normal,
                    "RotationStarted",
                    note,
                )
                .await;
            }
            (Some(p), None) => {
                let note = format!("rotation complete: the previous key {p} is no longer accepted");
                publish(
                    &ctx,
                    key.as_ref(),
                    EventType::Normal,
                    "RotationComplete",
                    note,
                )
                .await;
            }
            _ => {}
        }
        if transition {
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
    // Expiry is a status change nobody will send an event for: come back then (at the
    // latest after RESYNC, which keeps every timer within the timer wheel's range). A key
    // without an expiry gets no timer: everything this reconcile reads (the key, its Secret,
    // its policy and that policy's render) wakes it through a watch, and a watch that lost
    // events relists. A timer per key would cost about 500 bytes each (kube's scheduler and
    // its delay queue) to repeat work that changes nothing: 50 MB at 100,000 keys.
    // The end of a rotation's overlap is another such change.
    let wake = [
        bound.as_ref().and_then(|b| b.expires_at),
        bound
            .as_ref()
            .and_then(|b| b.previous.as_ref().map(|p| p.valid_until)),
    ]
    .into_iter()
    .filter_map(|t| render::seconds_until(t, now.as_second()))
    .min();
    Ok(match wake {
        Some(s) => Action::requeue(Duration::from_secs(s as u64 + 1).min(RESYNC)),
        None => Action::await_change(),
    })
}

/// Renders the policy and writes what changed. Returns the summary and how many writes
/// (including deletions of stale shards) it made.
async fn write_config_maps(
    policy: &Arc<RateLimitPolicy>,
    keys: &[(Arc<ApiKey>, Option<Arc<KeySecret>>)],
    ns: &str,
    name: &str,
    ctx: &Arc<Context>,
    now: i64,
) -> Result<(Rendered, usize, Vec<(String, Option<String>)>), Error> {
    let (ns, name) = (ns.to_string(), name.to_string());
    let hasher = ensure_hash_key(ctx, &ns).await?;
    let mut bound = vec![];
    for (key, secret) in keys {
        // Unusable keys are left out; their own status says why.
        if let Ok(b) = render::bind_key(key, secret.as_deref(), &hasher, now) {
            bound.push(b);
        }
    }
    let rendered = match render::render(policy, &bound) {
        Ok(r) => r,
        // Sidecars could not mount the result: write nothing, so the last published
        // ConfigMaps keep serving, and say why on the policy.
        Err(e @ render::RenderError::TooManyKeys { .. }) => {
            let (_, duplicates) = render::dedupe(&bound);
            return Ok((
                refused(&name, &ns, duplicates, "TooManyKeys", e.to_string()),
                0,
                vec![],
            ));
        }
        Err(e) => return Err(e.into()),
    };
    // The CRD refuses policy names that collide with another policy's shard ConfigMaps; a
    // policy created before that rule must still not overwrite another policy's ConfigMap.
    let cached: Vec<Arc<ConfigMap>> = rendered
        .config_maps
        .iter()
        .filter_map(|c| ctx.config_maps.get(&ObjectRef::new(&c.name).within(&ns)))
        .collect();
    if let Some(message) = foreign_config_map(&name, cached.iter().map(|c| c.as_ref())) {
        return Ok((
            refused(
                &name,
                &ns,
                rendered.duplicates,
                "ConfigMapConflict",
                message,
            ),
            0,
            vec![],
        ));
    }

    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = policy
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.uid"))?;
    let mut changed = 0;
    // Each ConfigMap of this render, with its resourceVersion once written.
    let mut published: Vec<(String, Option<String>)> = vec![];
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
            published.push((
                cm.name.clone(),
                current.and_then(|c| c.metadata.resource_version.clone()),
            ));
            continue;
        }
        // Never take over a ConfigMap keylimit did not create: the cache holds only labelled
        // ones, so one it lacks may be a user's of the same name (or ours, not yet seen).
        let live = match current {
            Some(c) => Some(c),
            None => api.get_opt(&cm.name).await?.map(Arc::new),
        };
        if let Some(c) = live.filter(|c| !owned_by_policy(c, &name)) {
            return Err(Error::Config(format!(
                "ConfigMap {ns}/{} exists and is not owned by RateLimitPolicy {name}: refusing to overwrite it",
                c.name_any()
            )));
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
        let written = ctx
            .leader
            .fenced(api.patch(
                &cm.name,
                &crate::apply_params(MANAGER),
                &Patch::Apply(&patch),
            ))
            .await??;
        ctx.metrics.configmap_writes.inc();
        changed += 1;
        published.push((cm.name.clone(), written.metadata.resource_version));
    }
    // Shards left over from a larger key set.
    let stale: Vec<String> = ctx
        .config_maps
        .state()
        .iter()
        .filter(|c| {
            c.namespace().as_deref() == Some(ns.as_str())
                && owned_by_policy(c, &name)
                && !wanted.contains(&c.name_any())
        })
        .map(|c| c.name_any())
        .collect();
    for s in &stale {
        match ctx
            .leader
            .fenced(api.delete(s, &DeleteParams::default()))
            .await?
        {
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
            duplicates: rendered
                .duplicates
                .into_iter()
                .map(|d| (d.name, d.holder))
                .collect(),
            refused: None,
        },
        changed + stale.len(),
        published,
    ))
}

async fn reconcile_policy(
    policy: Arc<RateLimitPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    ctx.caches_ready().await?;
    let _timer = ctx.metrics.reconcile_timer("ratelimitpolicy");
    let ns = policy
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = policy.name_any();
    let now = Timestamp::now();

    let keys: Vec<(Arc<ApiKey>, Option<Arc<KeySecret>>)> = ctx
        .index
        .keys_of_policy(&ns, &name)
        .into_iter()
        .filter_map(|r| ctx.apikeys.get(&r))
        // The index is updated after the cache: a key it names but the cache changed since
        // (moved to another policy) is not this policy's.
        .filter(|k| k.spec.policy_ref.name == name)
        .map(|k| {
            let (sname, _) = render::secret_ref(&k);
            let secret = ctx.secrets.get(&ns, &sname);
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
    let inputs = render_inputs(&policy, &keys, &owned, now.as_second());
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
            let summary =
                write_config_maps(&policy, &keys, &ns, &name, &ctx, now.as_second()).await?;
            // Publish the duplicates before asking the ApiKey controller to look again, so
            // the recheck reads them.
            ctx.duplicates.set(&ns, &name, summary.0.duplicates.clone());
            for k in keys_to_recheck(keys.iter().map(|(k, _)| k.as_ref()), &summary.0.duplicates) {
                // Only fails when the ApiKey controller has stopped (shutdown).
                let _ = ctx.recheck_apikey.unbounded_send(k);
            }
            // The memo describes the ConfigMaps as they are now, including our own writes,
            // which the cache may not have seen yet: keyed on what the write left, it matches
            // once the cache catches up, unless something else changed meanwhile.
            let inputs = if summary.1 == 0 {
                inputs
            } else {
                render_inputs_with(
                    &policy,
                    &keys,
                    summary
                        .2
                        .iter()
                        .map(|(n, rv)| (Some(n.as_str()), rv.as_deref())),
                    now.as_second(),
                )
            };
            if let Ok(mut m) = ctx.render_memo.0.lock() {
                m.insert(
                    memo_key,
                    Rendered {
                        inputs,
                        ..summary.0.clone()
                    },
                );
            }
            summary.0
        }
    };
    let generation = policy.metadata.generation;
    let old = policy.status.clone().unwrap_or_default();
    let (rendered_keys, cms, ready) = policy_readiness(&rendered_summary, &old);
    let accepted = Desired::new(condition::ACCEPTED, true, "Accepted", "spec is valid");
    let quotas = quota_scope(&policy.spec, old.sidecars_reporting);
    let unchanged = conditions::is_current(&old.conditions, &accepted, generation)
        && conditions::is_current(&old.conditions, &ready, generation)
        && conditions::is_current(&old.conditions, &quotas, generation)
        && old.observed_generation == generation
        && old.keys == rendered_keys
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
        let was_reason = conditions::find(&old.conditions, condition::READY).map(|c| &c.reason);
        if !ready.status && was_reason != Some(&ready.reason) {
            publish(
                &ctx,
                policy.as_ref(),
                EventType::Warning,
                &ready.reason,
                ready.message.clone(),
            )
            .await;
        }
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
        ctx.leader
            .fenced(papi.patch_status(&name, &crate::apply_params(MANAGER), &Patch::Apply(&status)))
            .await??;
        ctx.metrics.status_writes.inc();
    }
    // A rotation's overlap ends without an event: render again then, to drop its key.
    let overlap_ends = keys
        .iter()
        .filter_map(|(k, s)| render::previous_valid_until(k, s.as_deref()))
        .filter_map(|t| render::seconds_until(Some(t), now.as_second()))
        .min();
    Ok(Action::requeue(match overlap_ends {
        Some(s) => Duration::from_secs(s as u64 + 1).min(RESYNC),
        None => RESYNC,
    }))
}

fn refused(
    name: &str,
    ns: &str,
    duplicates: Vec<render::Duplicate>,
    reason: &'static str,
    message: String,
) -> Rendered {
    warn!(policy = %name, namespace = %ns, reason, %message, "not publishing");
    Rendered {
        inputs: 0,
        keys: 0,
        config_maps: vec![],
        duplicates: duplicates.into_iter().map(|d| (d.name, d.holder)).collect(),
        refused: Some((reason, message)),
    }
}

/// A ConfigMap among `existing` (those the render would write) that the label says belongs
/// to another policy, described for the policy's Ready message.
pub fn foreign_config_map<'a>(
    policy: &str,
    existing: impl IntoIterator<Item = &'a ConfigMap>,
) -> Option<String> {
    existing.into_iter().find_map(|c| {
        let owner = c.labels().get(POLICY_LABEL)?;
        (owner != policy).then(|| {
            format!(
                "ConfigMap {} belongs to RateLimitPolicy {owner:?}; rename this policy (names ending in '-keys-' and digits collide with shard ConfigMaps)",
                c.name_any()
            )
        })
    })
}

/// The policy's Ready condition and the key and ConfigMap counts its status reports. A refused
/// render leaves the last published ConfigMaps in place, so the status keeps describing them.
fn policy_readiness(
    r: &Rendered,
    old: &crate::crd::RateLimitPolicyStatus,
) -> (i64, Vec<String>, Desired) {
    if let Some((reason, why)) = &r.refused {
        return (
            old.keys,
            old.config_maps.clone(),
            Desired::new(condition::READY, false, reason, why.clone()),
        );
    }
    let mut message = format!(
        "{} key(s) published in {} ConfigMap(s)",
        r.keys,
        r.config_maps.len()
    );
    if !r.duplicates.is_empty() {
        message.push_str(&format!(
            "; {} ApiKey(s) left out as duplicates of an older ApiKey's key material (their Ready condition names it)",
            r.duplicates.len()
        ));
    }
    (
        r.keys as i64,
        r.config_maps.clone(),
        Desired::new(condition::READY, true, "ConfigMapsWritten", message),
    )
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

    /// A Context whose client reaches a stand-in apiserver that counts requests (answering
    /// 404 to each).
    fn mk_ctx(
        leader: crate::leader::LeaderState,
    ) -> (Arc<Context>, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let svc = tower::service_fn(move |_req: http::Request<kube::client::Body>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async {
                let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{}"));
                let mut resp = http::Response::new(body);
                *resp.status_mut() = http::StatusCode::NOT_FOUND;
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let client = Client::new(svc, "ns");
        let ctx = Context {
            client: client.clone(),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: MANAGER.into(),
                    instance: None,
                },
            ),
            metrics: Arc::new(Metrics::default()),
            leader,
            secrets: Arc::default(),
            apikeys: reflector::store::<ApiKey>().0,
            policies: reflector::store::<RateLimitPolicy>().0,
            config_maps: reflector::store::<ConfigMap>().0,
            render_memo: RenderMemo::default(),
            duplicates: DuplicateBook::default(),
            index: Arc::default(),
            written: Written::default(),
            caches: tokio::sync::watch::channel(true).1,
            recheck_apikey: futures::channel::mpsc::unbounded().0,
        };
        (Arc::new(ctx), calls)
    }

    #[tokio::test]
    async fn a_replica_without_a_current_claim_sends_no_write() {
        use std::sync::atomic::Ordering;
        let key = mk_apikey("k", "p");
        let (standby, calls) = mk_ctx(crate::leader::LeaderState::standby());
        publish(
            &standby,
            &key,
            EventType::Normal,
            "Test",
            "from a standby".into(),
        )
        .await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "a standby reached the apiserver"
        );
        let (leader, calls) = mk_ctx(crate::leader::LeaderState::unconditional("me"));
        publish(
            &leader,
            &key,
            EventType::Normal,
            "Test",
            "from the leader".into(),
        )
        .await;
        assert!(
            calls.load(Ordering::SeqCst) > 0,
            "the leader's write was sent"
        );
    }

    #[tokio::test]
    async fn a_key_being_deleted_is_left_alone() {
        use std::sync::atomic::Ordering;
        let mut key = mk_apikey("k", "p");
        let (ctx, calls) = mk_ctx(crate::leader::LeaderState::unconditional("me"));
        // The same key, alive: its reconcile generates a Secret, so the count below can fail.
        let _ = reconcile_apikey(Arc::new(key.clone()), ctx.clone()).await;
        assert!(
            calls.load(Ordering::SeqCst) > 0,
            "a live key's reconcile writes"
        );

        key.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        let (ctx, calls) = mk_ctx(crate::leader::LeaderState::unconditional("me"));
        let action = reconcile_apikey(Arc::new(key), ctx).await;
        assert!(action.is_ok(), "{action:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "a key being deleted got a write"
        );
    }

    fn test_hasher() -> dp::KeyHasher {
        dp::KeyHasher::hmac(&[5u8; dp::HASH_KEY_LEN]).unwrap()
    }

    #[test]
    fn a_create_in_a_terminating_namespace_is_recognised() {
        let e = |code: u16, message: &str| {
            kube::core::Status::failure(message, "Forbidden").with_code(code)
        };
        // The apiserver's wording (NamespaceLifecycle admission).
        assert!(namespace_terminating(&e(
            403,
            "secrets \"k-key\" is forbidden: unable to create new content in namespace e2e-1 because it is being terminated"
        )));
        assert!(!namespace_terminating(&e(
            403,
            "secrets is forbidden: User \"x\" cannot create resource \"secrets\""
        )));
        assert!(!namespace_terminating(&e(
            409,
            "because it is being terminated"
        )));
    }

    #[test]
    fn hash_key_secret_must_hold_a_full_key() {
        let good = mk_secret(dp::HASH_KEY_SECRET, dp::HASH_KEY_DATA, &[5u8; 32]);
        let h = hasher_from_secret(&good).unwrap();
        assert_eq!(h.hash_hex(b"k"), test_hasher().hash_hex(b"k"));
        let short = mk_secret(dp::HASH_KEY_SECRET, dp::HASH_KEY_DATA, &[5u8; 8]);
        assert!(hasher_from_secret(&short).is_err());
        let other = mk_secret(dp::HASH_KEY_SECRET, "other", &[5u8; 32]);
        assert!(hasher_from_secret(&other).is_err());
    }

    #[test]
    fn render_inputs_ignore_order_and_status_but_see_real_changes() {
        let p = crate::render::tests::mk_policy("p");
        let mk = |n: &str, gen: i64, rv: &str| {
            let mut k = mk_apikey(n, "p");
            k.metadata.generation = Some(gen);
            let mut s = mk_secret(&format!("{n}-key"), "key", b"kl_0123456789abcdef0123");
            s.resource_version = Some(rv.into());
            (Arc::new(k), Some(Arc::new(s)))
        };
        let a = vec![mk("a", 1, "10"), mk("b", 1, "11")];
        let reversed = vec![mk("b", 1, "11"), mk("a", 1, "10")];
        assert_eq!(
            render_inputs(&p, &a, &[], 0),
            render_inputs(&p, &reversed, &[], 0)
        );
        // A status write changes resourceVersion, not generation: same inputs.
        let mut with_status = a.clone();
        let mut k = (*with_status[0].0).clone();
        k.metadata.resource_version = Some("999".into());
        with_status[0].0 = Arc::new(k);
        assert_eq!(
            render_inputs(&p, &a, &[], 0),
            render_inputs(&p, &with_status, &[], 0)
        );
        // A rotated Secret, a spec change, a removed key: different inputs.
        assert_ne!(
            render_inputs(&p, &a, &[], 0),
            render_inputs(&p, &[mk("a", 1, "12"), mk("b", 1, "11")], &[], 0)
        );
        assert_ne!(
            render_inputs(&p, &a, &[], 0),
            render_inputs(&p, &[mk("a", 2, "10"), mk("b", 1, "11")], &[], 0)
        );
        assert_ne!(
            render_inputs(&p, &a, &[], 0),
            render_inputs(&p, &a[..1], &[], 0)
        );

        // The memo after a write is keyed on what the write left (name, resourceVersion):
        // once the cache shows those ConfigMaps, the inputs match and nothing renders again;
        // another resourceVersion (someone else's edit) does not match.
        let cm = |name: &str, rv: &str| {
            Arc::new(ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    resource_version: Some(rv.into()),
                    ..Default::default()
                },
                ..Default::default()
            })
        };
        let written = [("p-0", Some("41")), ("p-1", Some("42"))];
        let after_write =
            render_inputs_with(&p, &a, written.iter().map(|(n, rv)| (Some(*n), *rv)), 0);
        assert_eq!(
            render_inputs(&p, &a, &[cm("p-1", "42"), cm("p-0", "41")], 0),
            after_write
        );
        assert_ne!(
            render_inputs(&p, &a, &[cm("p-0", "41"), cm("p-1", "43")], 0),
            after_write
        );
        assert_ne!(render_inputs(&p, &a, &[cm("p-0", "41")], 0), after_write);
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
            tokens: None,
            name: "monthly".into(),
            requests: Some(10),
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
    fn a_duplicate_is_not_ready_and_names_the_holder() {
        let mut k = mk_apikey("b", "p");
        let s = mk_secret("b-key", "key", b"kl_0123456789abcdef0123");
        let (c, b) = key_readiness(&k, true, Some(&s), Some("a"), 0, &test_hasher());
        assert_eq!((c.status, c.reason.as_str()), (false, "DuplicateKey"));
        assert!(c.message.contains("ApiKey \"a\""), "{}", c.message);
        assert!(b.is_some(), "the fingerprint stays visible");
        // It outranks Disabled: a duplicate's own flags never reach the data plane.
        k.spec.disabled = true;
        let (c, _) = key_readiness(&k, true, Some(&s), Some("a"), 0, &test_hasher());
        assert_eq!(c.reason, "DuplicateKey");
        // A missing policy or Secret still comes first.
        let (c, _) = key_readiness(&k, false, Some(&s), Some("a"), 0, &test_hasher());
        assert_eq!(c.reason, "PolicyNotFound");
        let (c, _) = key_readiness(&k, true, None, Some("a"), 0, &test_hasher());
        assert_eq!(c.reason, "SecretNotFound");
    }

    fn with_ready(mut k: ApiKey, reason: &str, message: &str) -> ApiKey {
        let d = Desired::new(condition::READY, reason == "Bound", reason, message);
        k.status = Some(crate::crd::ApiKeyStatus {
            conditions: vec![conditions::merge(&[], &d, None, Timestamp::UNIX_EPOCH)],
            ..Default::default()
        });
        k
    }

    #[test]
    fn keys_whose_condition_disagrees_with_the_render_are_rechecked() {
        let dups = BTreeMap::from([("b".to_string(), "a".to_string())]);
        let right = duplicate_condition("a").message;
        let keys = [
            // The holder, Bound: fine.
            with_ready(mk_apikey("a", "p"), "Bound", "ok"),
            // A new duplicate still saying Bound, and one with no status yet.
            with_ready(mk_apikey("b", "p"), "Bound", "ok"),
            // Was a duplicate, the holder is gone: must become Bound.
            with_ready(mk_apikey("c", "p"), "DuplicateKey", &right),
            // Unrelated problem: not ours to recheck.
            with_ready(mk_apikey("d", "p"), "SecretNotFound", "x"),
        ];
        let names = |v: Vec<ObjectRef<ApiKey>>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(names(keys_to_recheck(&keys, &dups)), ["b", "c"]);
        // A duplicate already saying so is left alone, unless its holder changed.
        let settled = [with_ready(mk_apikey("b", "p"), "DuplicateKey", &right)];
        assert!(keys_to_recheck(&settled, &dups).is_empty());
        let moved = BTreeMap::from([("b".to_string(), "z".to_string())]);
        assert_eq!(names(keys_to_recheck(&settled, &moved)), ["b"]);
        assert_eq!(names(keys_to_recheck([&mk_apikey("b", "p")], &dups)), ["b"]);
    }

    #[test]
    fn a_moved_key_wakes_its_old_and_new_policy() {
        let mut k = mk_apikey("a", "new");
        let names = |k: &ApiKey| {
            policies_of_key(k)
                .into_iter()
                .map(|r| (r.name, r.namespace))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&k), [("new".to_string(), Some("ns".to_string()))]);
        k.status = Some(crate::crd::ApiKeyStatus {
            policy: Some("new".into()),
            ..Default::default()
        });
        assert_eq!(names(&k).len(), 1);
        k.status.as_mut().unwrap().policy = Some("old".into());
        assert_eq!(
            names(&k),
            [
                ("new".to_string(), Some("ns".to_string())),
                ("old".to_string(), Some("ns".to_string()))
            ]
        );
    }

    #[test]
    fn another_policys_configmap_is_never_taken_over() {
        let cm = |name: &str, policy: Option<&str>| ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: policy.map(|p| BTreeMap::from([(POLICY_LABEL.to_string(), p.to_string())])),
                ..Default::default()
            },
            ..Default::default()
        };
        // Policy "a-keys-0001" (created before the CEL rule) wants keylimit-a-keys-0001,
        // which is shard 1 of policy "a".
        let theirs = cm("keylimit-a-keys-0001", Some("a"));
        let msg = foreign_config_map("a-keys-0001", [&theirs]).unwrap();
        assert!(
            msg.contains("keylimit-a-keys-0001") && msg.contains("\"a\""),
            "{msg}"
        );
        let ours = cm("keylimit-a", Some("a"));
        assert_eq!(foreign_config_map("a", [&ours, &theirs]), None);
        assert_eq!(foreign_config_map("a", []), None);
    }

    #[test]
    fn a_refused_render_keeps_reporting_the_published_configmaps() {
        let old = crate::crd::RateLimitPolicyStatus {
            keys: 7,
            config_maps: vec!["keylimit-p".into()],
            ..Default::default()
        };
        let refused = Rendered {
            inputs: 0,
            keys: 0,
            config_maps: vec![],
            duplicates: BTreeMap::new(),
            refused: Some((
                "TooManyKeys",
                "300000 keys need 40 key shard ConfigMaps".into(),
            )),
        };
        let (keys, cms, ready) = policy_readiness(&refused, &old);
        assert_eq!(
            (keys, cms.as_slice()),
            (7, ["keylimit-p".to_string()].as_slice())
        );
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (false, "TooManyKeys")
        );
        assert!(ready.message.contains("300000 keys"));
        let ok = Rendered {
            keys: 2,
            config_maps: vec!["keylimit-p".into()],
            duplicates: BTreeMap::from([("b".to_string(), "a".to_string())]),
            refused: None,
            ..refused
        };
        let (keys, _, ready) = policy_readiness(&ok, &old);
        assert_eq!((keys, ready.status), (2, true));
        assert!(
            ready.message.contains("1 ApiKey(s) left out"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn readiness_reasons() {
        let mut k = mk_apikey("a", "p");
        let s = mk_secret("a-key", "key", b"kl_0123456789abcdef0123");
        let (c, b) = key_readiness(&k, false, Some(&s), None, 0, &test_hasher());
        assert_eq!(
            (c.status, c.reason.as_str(), b.is_none()),
            (false, "PolicyNotFound", true)
        );
        assert!(c.message.contains("\"p\""));
        let (c, _) = key_readiness(&k, true, None, None, 0, &test_hasher());
        assert_eq!(c.reason, "SecretNotFound");
        let (c, b) = key_readiness(&k, true, Some(&s), None, 0, &test_hasher());
        assert_eq!((c.status, c.reason.as_str()), (true, "Bound"));
        assert!(b.is_some());
        k.spec.expires_at = Some("1970-01-01T00:01:40Z".into());
        let (c, b) = key_readiness(&k, true, Some(&s), None, 100, &test_hasher());
        assert_eq!((c.status, c.reason.as_str()), (false, "Expired"));
        assert!(
            b.is_some(),
            "expired keys stay in the data plane so callers get 403, not 401"
        );
        let (c, _) = key_readiness(&k, true, Some(&s), None, 99, &test_hasher());
        assert_eq!(c.reason, "Bound");
        k.spec.disabled = true;
        let (c, _) = key_readiness(&k, true, Some(&s), None, 0, &test_hasher());
        assert_eq!(c.reason, "Disabled");
    }
}
