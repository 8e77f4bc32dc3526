//! Indexes the watches keep, so that no event walks every cached object.
//!
//! * [`KeyIndex`]: Secret -> ApiKeys and policy -> ApiKeys, updated from the ApiKey watch in
//!   O(1) per event. It also says which policies an ApiKey event concerns (only a change to
//!   what a render reads: a new or deleted key, a new generation, another Secret or policy),
//!   so the ApiKey controller's own status writes never wake a policy.
//! * [`Written`]: the status each ApiKey was last given by this process, until the watch
//!   delivers that write. A reconcile that runs before then reads a cache without its own last
//!   write; comparing with what it wrote keeps it from writing the same status again.
//! * [`Debouncer`]: policies whose inputs changed, handed to the policy controller once a
//!   burst is over (or has lasted long enough), so 10,000 key changes cost a few renders.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::ResourceExt;

use crate::crd::{ApiKey, RateLimitPolicy};
use crate::render;

/// (namespace, name).
pub type Id = (String, String);

/// A name held once and shared. A policy's name is under every one of its keys, and a key's
/// name is in three maps; with one `String` per use the index cost about 1.1 KB per key.
type Name = Arc<str>;

/// What an ApiKey's render depends on, as last seen by the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refs {
    secret: Name,
    policy: Name,
    /// The policy the key was last bound to (`status.policy`), when it differs: a key moved
    /// away must leave its old policy's ConfigMaps at once.
    bound: Option<Name>,
    generation: Option<i64>,
}

/// [`Refs`] as read from an ApiKey, before they are interned.
struct Seen<'a> {
    secret: String,
    policy: &'a str,
    bound: Option<&'a str>,
    generation: Option<i64>,
}

impl Seen<'_> {
    fn same_inputs(&self, r: &Refs) -> bool {
        *r.secret == *self.secret && *r.policy == *self.policy && r.generation == self.generation
    }

    fn same(&self, r: &Refs) -> bool {
        self.same_inputs(r) && r.bound.as_deref() == self.bound
    }
}

fn seen(k: &ApiKey) -> Seen<'_> {
    let policy = k.spec.policy_ref.name.as_str();
    let bound = k
        .status
        .as_ref()
        .and_then(|s| s.policy.as_deref())
        .filter(|b| *b != policy);
    Seen {
        secret: render::secret_ref(k).0,
        policy,
        bound,
        generation: k.metadata.generation,
    }
}

/// The keys that read one Secret: nearly always one (each generated Secret has its key), so
/// one is kept without a set.
#[derive(Debug)]
enum Readers {
    One(Name),
    // Boxed so that the common case, `One`, keeps each map entry at 16 bytes, not a set's 48.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<Name>>),
}

impl Readers {
    fn insert(&mut self, key: Name) {
        match self {
            Readers::One(k) if *k == key => {}
            Readers::One(k) => *self = Readers::Many(Box::new(HashSet::from([k.clone(), key]))),
            Readers::Many(set) => {
                set.insert(key);
            }
        }
    }

    /// Removes `key`; true when no reader is left.
    fn remove(&mut self, key: &str) -> bool {
        match self {
            Readers::One(k) => **k == *key,
            Readers::Many(set) => {
                set.remove(key);
                set.is_empty()
            }
        }
    }

    fn names(&self) -> Vec<Name> {
        match self {
            Readers::One(k) => vec![k.clone()],
            Readers::Many(set) => set.iter().cloned().collect(),
        }
    }
}

/// One namespace's keys and their reverse maps.
#[derive(Default)]
struct Namespace {
    keys: HashMap<Name, Refs>,
    by_secret: HashMap<Name, Readers>,
    by_policy: HashMap<Name, HashSet<Name>>,
}

impl Namespace {
    /// The shared copy of a policy name, if some key names the policy.
    fn policy_name(&self, policy: &str) -> Name {
        self.by_policy
            .get_key_value(policy)
            .map_or_else(|| Name::from(policy), |(p, _)| p.clone())
    }

    fn link(&mut self, key: &Name, seen: &Seen) -> Refs {
        let secret = match self.by_secret.get_key_value(seen.secret.as_str()) {
            Some((s, _)) => s.clone(),
            None => Name::from(seen.secret.as_str()),
        };
        self.by_secret
            .entry(secret.clone())
            .and_modify(|r| r.insert(key.clone()))
            .or_insert_with(|| Readers::One(key.clone()));
        let policy = self.policy_name(seen.policy);
        self.by_policy
            .entry(policy.clone())
            .or_default()
            .insert(key.clone());
        Refs {
            secret,
            policy,
            bound: seen.bound.map(|b| self.policy_name(b)),
            generation: seen.generation,
        }
    }

    fn unlink(&mut self, key: &str, r: &Refs) {
        if self
            .by_secret
            .get_mut(&r.secret)
            .is_some_and(|readers| readers.remove(key))
        {
            self.by_secret.remove(&r.secret);
        }
        if let Some(set) = self.by_policy.get_mut(&r.policy) {
            set.remove(key);
            if set.is_empty() {
                self.by_policy.remove(&r.policy);
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    namespaces: HashMap<Name, Namespace>,
    /// Keys seen during a relist (`Init` .. `InitDone`); the others were deleted meanwhile.
    relist: Option<HashSet<(Name, Name)>>,
}

impl Inner {
    /// Records a key; returns the policies whose render it changes.
    /// A new key whose Secret is not cached yet changes no render (it would be left out):
    /// the Secret's own event renders it, at once, instead of after a debounce the key's
    /// creation started.
    fn put(&mut self, ns: &str, name: &str, new: Seen, has_secret: bool) -> Vec<Id> {
        let ns_name = match self.namespaces.get_key_value(ns) {
            Some((n, _)) => n.clone(),
            None => Name::from(ns),
        };
        let space = self.namespaces.entry(ns_name.clone()).or_default();
        let (key, old) = match space.keys.remove_entry(name) {
            Some((k, o)) => (k, Some(o)),
            None => (Name::from(name), None),
        };
        if let Some(r) = &mut self.relist {
            r.insert((ns_name, key.clone()));
        }
        if let Some(o) = old.as_ref().filter(|o| new.same(o)) {
            space.keys.insert(key, o.clone());
            return vec![];
        }
        let mut dirty: Vec<String> = vec![];
        if let Some(o) = &old {
            space.unlink(&key, o);
            // Only a status change (`status.policy` caught up): no render input changed.
            if !new.same_inputs(o) {
                dirty.push(o.policy.to_string());
            }
        }
        let inputs_changed = match &old {
            None => has_secret,
            Some(o) => !new.same_inputs(o),
        };
        if inputs_changed {
            dirty.push(new.policy.to_string());
            dirty.extend(new.bound.map(str::to_string));
        }
        let refs = space.link(&key, &new);
        space.keys.insert(key, refs);
        dirty.sort();
        dirty.dedup();
        dirty.into_iter().map(|p| (ns.to_string(), p)).collect()
    }

    fn delete(&mut self, ns: &str, name: &str) -> Vec<Id> {
        let Some(space) = self.namespaces.get_mut(ns) else {
            return vec![];
        };
        let Some(o) = space.keys.remove(name) else {
            return vec![];
        };
        space.unlink(name, &o);
        if space.keys.is_empty() {
            self.namespaces.remove(ns);
        }
        let mut dirty = vec![(ns.to_string(), o.policy.to_string())];
        dirty.extend(o.bound.map(|b| (ns.to_string(), b.to_string())));
        dirty
    }

    fn space(&self, ns: &str) -> Option<&Namespace> {
        self.namespaces.get(ns)
    }
}

/// Secret -> ApiKeys and policy -> ApiKeys, kept by the ApiKey watch.
#[derive(Default)]
pub struct KeyIndex(Mutex<Inner>);

impl KeyIndex {
    /// Applies one ApiKey watch event; returns the policies whose render inputs changed.
    /// `has_secret(namespace, name)`: whether the Secret is cached.
    pub fn on_event(
        &self,
        ev: &watcher::Event<ApiKey>,
        has_secret: impl Fn(&str, &str) -> bool,
    ) -> Vec<Id> {
        let Ok(mut inner) = self.0.lock() else {
            return vec![];
        };
        match ev {
            watcher::Event::Apply(k) | watcher::Event::InitApply(k) => {
                let (ns, name) = (k.namespace().unwrap_or_default(), k.name_any());
                let s = seen(k);
                let has = has_secret(&ns, &s.secret);
                inner.put(&ns, &name, s, has)
            }
            watcher::Event::Delete(k) => {
                inner.delete(&k.namespace().unwrap_or_default(), &k.name_any())
            }
            watcher::Event::Init => {
                inner.relist = Some(HashSet::new());
                vec![]
            }
            watcher::Event::InitDone => {
                let Some(seen) = inner.relist.take() else {
                    return vec![];
                };
                let gone: Vec<(Name, Name)> = inner
                    .namespaces
                    .iter()
                    .flat_map(|(ns, space)| space.keys.keys().map(|k| (ns.clone(), k.clone())))
                    .filter(|id| !seen.contains(id))
                    .collect();
                gone.iter()
                    .flat_map(|(ns, k)| inner.delete(ns, k))
                    .collect()
            }
        }
    }

    /// The ApiKeys (in `ns`) that read the Secret `secret`.
    pub fn keys_of_secret(&self, ns: &str, secret: &str) -> Vec<ObjectRef<ApiKey>> {
        let Ok(inner) = self.0.lock() else {
            return vec![];
        };
        inner
            .space(ns)
            .and_then(|s| s.by_secret.get(secret))
            .map(|r| {
                r.names()
                    .iter()
                    .map(|k| ObjectRef::new(k).within(ns))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The ApiKeys (in `ns`) that name the policy `policy`.
    pub fn keys_of_policy(&self, ns: &str, policy: &str) -> Vec<ObjectRef<ApiKey>> {
        let Ok(inner) = self.0.lock() else {
            return vec![];
        };
        inner
            .space(ns)
            .and_then(|s| s.by_policy.get(policy))
            .map(|keys| keys.iter().map(|k| ObjectRef::new(k).within(ns)).collect())
            .unwrap_or_default()
    }

    /// The policies whose render reads the Secret `secret` (through one of their keys).
    pub fn policies_of_secret(&self, ns: &str, secret: &str) -> Vec<Id> {
        let Ok(inner) = self.0.lock() else {
            return vec![];
        };
        let Some(space) = inner.space(ns) else {
            return vec![];
        };
        let mut out: Vec<Id> = space
            .by_secret
            .get(secret)
            .map(Readers::names)
            .unwrap_or_default()
            .iter()
            .filter_map(|k| space.keys.get(k))
            .flat_map(|r| std::iter::once(r.policy.clone()).chain(r.bound.clone()))
            .map(|p| (ns.to_string(), p.to_string()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// How many ApiKeys (in `ns`) name the policy.
    pub fn count_of_policy(&self, ns: &str, policy: &str) -> usize {
        self.0.lock().map_or(0, |i| {
            i.space(ns)
                .and_then(|s| s.by_policy.get(policy))
                .map_or(0, HashSet::len)
        })
    }

    /// The policies (in `ns`) some ApiKey names.
    pub fn policies_in(&self, ns: &str) -> Vec<String> {
        let Ok(inner) = self.0.lock() else {
            return vec![];
        };
        inner
            .space(ns)
            .map(|s| s.by_policy.keys().map(|p| p.to_string()).collect())
            .unwrap_or_default()
    }
}

/// How long a remembered write stands in for the cache. The watch normally delivers the
/// write within milliseconds and forgets it; this bounds the case where it never does (a
/// relist that skipped past it), after which the cache is trusted again.
const WRITTEN_TTL: Duration = Duration::from_secs(60);

/// A status this process wrote: a digest of its content and whether it said Ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    pub digest: u64,
    pub ready: bool,
}

/// The status each ApiKey was last given by this process, with the resourceVersion the write
/// returned, until the watch delivers that version.
#[derive(Default)]
pub struct Written(Mutex<HashMap<Id, (String, Write, Instant)>>);

impl Written {
    pub fn record(&self, id: Id, resource_version: String, digest: u64, ready: bool) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(
                id,
                (resource_version, Write { digest, ready }, Instant::now()),
            );
        }
    }

    /// The last write to the key that the cache does not show yet, if any.
    pub fn last(&self, id: &Id) -> Option<Write> {
        let m = self.0.lock().ok()?;
        m.get(id)
            .filter(|(_, _, at)| at.elapsed() < WRITTEN_TTL)
            .map(|(_, w, _)| *w)
    }

    /// The watch saw an event: once a key carries the remembered write (or is gone), forget it.
    pub fn on_event(&self, ev: &watcher::Event<ApiKey>) {
        let Ok(mut m) = self.0.lock() else { return };
        if m.is_empty() {
            return;
        }
        match ev {
            watcher::Event::Apply(k) | watcher::Event::InitApply(k) => {
                let id = (k.namespace().unwrap_or_default(), k.name_any());
                if m.get(&id).map(|(rv, _, _)| rv) == k.metadata.resource_version.as_ref() {
                    m.remove(&id);
                }
            }
            watcher::Event::Delete(k) => {
                m.remove(&(k.namespace().unwrap_or_default(), k.name_any()));
            }
            watcher::Event::InitDone => m.retain(|_, (_, _, at)| at.elapsed() < WRITTEN_TTL),
            watcher::Event::Init => {}
        }
    }

    pub fn len(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Collects policies to render. A change to a policy that rendered no sooner than `quiet`
/// ago is released at once (a single new key is published without delay); changes that follow
/// are held until no new one came for `quiet`, or `max` after the first (a steady stream
/// must not starve the render).
pub struct Debouncer {
    pending: Mutex<HashMap<Id, (Instant, Instant)>>,
    released: Mutex<HashMap<Id, Instant>>,
    quiet: Duration,
    max: Duration,
    tx: UnboundedSender<ObjectRef<RateLimitPolicy>>,
    /// The quiet period of a policy grows with its keys (`QUIET_PER_KEY` each, up to
    /// `quiet`): a small policy renders on every change, as cheap as it is; one with 10k keys
    /// waits the full `quiet`.
    index: std::sync::Arc<KeyIndex>,
}

/// A render costs a few microseconds per key; waiting 200 us per key keeps renders a small
/// share of the time even when changes never stop.
const QUIET_PER_KEY: Duration = Duration::from_micros(200);
/// Under a steady stream of changes (a cold start over 100k keys takes minutes), a policy
/// renders every `max`. Each render costs time in proportion to its keys, so a fixed `max`
/// makes the total render work grow with keys times duration, quadratically: the longest
/// wait grows with the keys too (500 us each, 50 s at 100k), up to `MAX_DELAY_CAP`.
const MAX_DELAY_PER_KEY: Duration = Duration::from_micros(500);
const MAX_DELAY_CAP: Duration = Duration::from_secs(60);

impl Debouncer {
    pub fn new(
        quiet: Duration,
        max: Duration,
        tx: UnboundedSender<ObjectRef<RateLimitPolicy>>,
        index: std::sync::Arc<KeyIndex>,
    ) -> Self {
        Self {
            pending: Mutex::default(),
            released: Mutex::default(),
            quiet,
            max,
            tx,
            index,
        }
    }

    /// How long a policy waits for quiet, and at most, under a stream of changes.
    fn delays_for(&self, (ns, name): &Id) -> (Duration, Duration) {
        let keys = u32::try_from(self.index.count_of_policy(ns, name)).unwrap_or(u32::MAX);
        let quiet = self.quiet.min(QUIET_PER_KEY.saturating_mul(keys));
        let max = self
            .max
            .max(MAX_DELAY_PER_KEY.saturating_mul(keys).min(MAX_DELAY_CAP));
        (quiet, max)
    }

    pub fn mark(&self, ids: impl IntoIterator<Item = Id>) {
        self.mark_at(ids, Instant::now())
    }

    fn mark_at(&self, ids: impl IntoIterator<Item = Id>, now: Instant) {
        // Before taking the locks: the index has its own.
        let ids: Vec<(Id, Duration)> = ids
            .into_iter()
            .map(|id| {
                let (q, _) = self.delays_for(&id);
                (id, q)
            })
            .collect();
        let (Ok(mut p), Ok(mut r)) = (self.pending.lock(), self.released.lock()) else {
            return;
        };
        for (id, quiet) in ids {
            if let Some((_, last)) = p.get_mut(&id) {
                *last = now;
                continue;
            }
            let idle = r
                .get(&id)
                .is_none_or(|t| now.saturating_duration_since(*t) >= quiet);
            if idle {
                r.insert(id.clone(), now);
                self.send(&id);
            } else {
                p.insert(id, (now, now));
            }
        }
    }

    fn send(&self, (ns, name): &Id) {
        // Fails only when the policy controller has stopped (shutdown).
        let _ = self.tx.unbounded_send(ObjectRef::new(name).within(ns));
    }

    /// Releases the policies due at `now`; returns them.
    pub fn release_due(&self, now: Instant) -> Vec<Id> {
        let pending: Vec<Id> = match self.pending.lock() {
            Ok(p) => p.keys().cloned().collect(),
            Err(_) => return vec![],
        };
        let delays: HashMap<Id, (Duration, Duration)> = pending
            .into_iter()
            .map(|id| {
                let d = self.delays_for(&id);
                (id, d)
            })
            .collect();
        let (Ok(mut p), Ok(mut r)) = (self.pending.lock(), self.released.lock()) else {
            return vec![];
        };
        let due: Vec<Id> = p
            .iter()
            .filter(|(id, (first, last))| {
                let (q, max) = delays.get(*id).copied().unwrap_or((self.quiet, self.max));
                now.saturating_duration_since(*last) >= q
                    || now.saturating_duration_since(*first) >= max
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            p.remove(id);
            r.insert(id.clone(), now);
            self.send(id);
        }
        // Forget policies idle for long (deleted ones included): their next change is
        // released at once either way.
        r.retain(|_, t| now.saturating_duration_since(*t) < self.max.max(self.quiet));
        due
    }

    /// Releases due policies until the process stops.
    pub async fn run(self: std::sync::Arc<Self>) {
        let tick = (self.quiet / 4).max(Duration::from_millis(20));
        loop {
            tokio::time::sleep(tick).await;
            self.release_due(Instant::now());
            if self.tx.is_closed() {
                return;
            }
        }
    }
}

/// A channel for the policy debouncer's output.
pub fn policy_channel() -> (
    UnboundedSender<ObjectRef<RateLimitPolicy>>,
    UnboundedReceiver<ObjectRef<RateLimitPolicy>>,
) {
    futures::channel::mpsc::unbounded()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::mk_apikey;

    fn ns(ids: Vec<Id>) -> Vec<String> {
        ids.into_iter().map(|(_, p)| p).collect()
    }

    /// An index holding `n` keys of policy `policy` (ApiKeys k0, k1, ...).
    fn index_of_keys(n: usize, policy: &str) -> std::sync::Arc<KeyIndex> {
        let index = std::sync::Arc::new(KeyIndex::default());
        for i in 0..n {
            index.on_event(
                &watcher::Event::Apply(mk_apikey(&format!("k{i}"), policy)),
                |_, _| true,
            );
        }
        index
    }

    fn names(refs: Vec<ObjectRef<ApiKey>>) -> Vec<String> {
        let mut v: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        v.sort();
        v
    }

    #[test]
    fn the_index_maps_secrets_and_policies_to_their_keys() {
        let idx = KeyIndex::default();
        let yes = |_: &str, _: &str| true;
        // A new key whose Secret is not cached yet renders nothing new; its Secret's event
        // will (so the render is not debounced behind the key's creation).
        let c = mk_apikey("c", "p");
        assert!(idx
            .on_event(&watcher::Event::Apply(c.clone()), |_, _| false)
            .is_empty());
        assert_eq!(names(idx.keys_of_secret("ns", "c-key")), ["c"]);
        assert_eq!(
            idx.policies_of_secret("ns", "c-key"),
            [("ns".to_string(), "p".to_string())]
        );
        idx.on_event(&watcher::Event::Delete(c), yes);
        let mut a = mk_apikey("a", "p");
        a.metadata.generation = Some(1);
        let b = mk_apikey("b", "p");
        assert_eq!(
            ns(idx.on_event(&watcher::Event::Apply(a.clone()), yes)),
            ["p"]
        );
        idx.on_event(&watcher::Event::Apply(b.clone()), yes);
        assert_eq!(names(idx.keys_of_policy("ns", "p")), ["a", "b"]);
        assert_eq!(names(idx.keys_of_secret("ns", "a-key")), ["a"]);
        assert!(idx.keys_of_policy("other", "p").is_empty());

        // A status write (same generation, same refs) concerns no policy.
        let mut a_status = a.clone();
        a_status.metadata.resource_version = Some("9".into());
        assert!(idx
            .on_event(&watcher::Event::Apply(a_status), yes)
            .is_empty());

        // A spec change: the policy renders again. A move: both policies.
        a.metadata.generation = Some(2);
        assert_eq!(
            ns(idx.on_event(&watcher::Event::Apply(a.clone()), yes)),
            ["p"]
        );
        a.spec.policy_ref.name = "q".into();
        a.metadata.generation = Some(3);
        assert_eq!(
            ns(idx.on_event(&watcher::Event::Apply(a.clone()), yes)),
            ["p", "q"]
        );
        assert_eq!(names(idx.keys_of_policy("ns", "p")), ["b"]);
        assert_eq!(names(idx.keys_of_policy("ns", "q")), ["a"]);

        assert_eq!(ns(idx.on_event(&watcher::Event::Delete(b), yes)), ["p"]);
        assert!(idx.keys_of_policy("ns", "p").is_empty());
        assert!(idx.keys_of_secret("ns", "b-key").is_empty());
    }

    #[test]
    fn a_secret_read_by_two_keys_keeps_the_other_when_one_leaves() {
        let idx = KeyIndex::default();
        let yes = |_: &str, _: &str| true;
        let reading = |name: &str, policy: &str| {
            let mut k = mk_apikey(name, policy);
            k.spec.secret_ref = Some(crate::crd::SecretKeyRef {
                name: "shared".into(),
                key: "key".into(),
            });
            k
        };
        let (a, b, c) = (reading("a", "p"), reading("b", "q"), reading("c", "q"));
        for k in [&a, &b, &c] {
            idx.on_event(&watcher::Event::Apply(k.clone()), yes);
        }
        assert_eq!(names(idx.keys_of_secret("ns", "shared")), ["a", "b", "c"]);
        assert_eq!(ns(idx.policies_of_secret("ns", "shared")), ["p", "q"]);
        idx.on_event(&watcher::Event::Delete(a), yes);
        assert_eq!(names(idx.keys_of_secret("ns", "shared")), ["b", "c"]);
        assert_eq!(ns(idx.policies_of_secret("ns", "shared")), ["q"]);
        // Moving b to its own Secret leaves c the only reader.
        let mut b2 = b.clone();
        b2.spec.secret_ref = None;
        b2.metadata.generation = Some(2);
        idx.on_event(&watcher::Event::Apply(b2), yes);
        assert_eq!(names(idx.keys_of_secret("ns", "shared")), ["c"]);
        assert_eq!(names(idx.keys_of_secret("ns", "b-key")), ["b"]);
        idx.on_event(&watcher::Event::Delete(c), yes);
        assert!(idx.keys_of_secret("ns", "shared").is_empty());
        assert_eq!(idx.policies_in("ns"), ["q"]);
        assert_eq!(idx.count_of_policy("ns", "q"), 1);
    }

    #[test]
    fn a_relist_forgets_keys_deleted_meanwhile() {
        let idx = KeyIndex::default();
        let yes = |_: &str, _: &str| true;
        idx.on_event(&watcher::Event::Apply(mk_apikey("a", "p")), yes);
        idx.on_event(&watcher::Event::Apply(mk_apikey("b", "p")), yes);
        idx.on_event(&watcher::Event::Init, yes);
        idx.on_event(&watcher::Event::InitApply(mk_apikey("a", "p")), yes);
        assert_eq!(ns(idx.on_event(&watcher::Event::InitDone, yes)), ["p"]);
        assert_eq!(names(idx.keys_of_policy("ns", "p")), ["a"]);
    }

    #[test]
    fn a_remembered_write_stands_in_until_the_watch_shows_it() {
        let w = Written::default();
        let id = ("ns".to_string(), "a".to_string());
        assert_eq!(w.last(&id), None);
        w.record(id.clone(), "5".into(), 7, true);
        let mine = Some(Write {
            digest: 7,
            ready: true,
        });
        assert_eq!(w.last(&id), mine);
        let mut k = mk_apikey("a", "p");
        k.metadata.resource_version = Some("4".into());
        w.on_event(&watcher::Event::Apply(k.clone()));
        assert_eq!(w.last(&id), mine, "an older version is not our write");
        k.metadata.resource_version = Some("5".into());
        w.on_event(&watcher::Event::Apply(k));
        assert_eq!(w.last(&id), None);
        assert!(w.is_empty());
    }

    #[test]
    fn the_debouncer_releases_at_once_when_idle_then_waits_for_quiet_but_not_forever() {
        let (tx, mut rx) = policy_channel();
        // 2,000 keys: 200 us each would be 400 ms; the quiet period is capped at 100 ms.
        let index = index_of_keys(2000, "p");
        let d = Debouncer::new(
            Duration::from_millis(100),
            Duration::from_millis(1000),
            tx,
            index.clone(),
        );
        let p = ("ns".to_string(), "p".to_string());
        let mut sent = || {
            let mut n = 0;
            while rx.try_recv().is_ok() {
                n += 1;
            }
            n
        };
        let t0 = Instant::now();
        // Idle: released at once.
        d.mark_at([p.clone()], t0);
        assert_eq!(sent(), 1);
        // A burst right after: held while changes keep coming, then released once.
        d.mark_at([p.clone()], t0 + Duration::from_millis(10));
        d.mark_at([p.clone()], t0 + Duration::from_millis(90));
        assert!(d.release_due(t0 + Duration::from_millis(150)).is_empty());
        assert_eq!(sent(), 0);
        assert_eq!(
            d.release_due(t0 + Duration::from_millis(200)),
            std::slice::from_ref(&p)
        );
        assert_eq!(sent(), 1);
        assert!(d.release_due(t0 + Duration::from_millis(300)).is_empty());
        // A change every 50 ms for ever: released at `max` after the first.
        let t1 = t0 + Duration::from_millis(250);
        for i in 0..30 {
            d.mark_at([p.clone()], t1 + Duration::from_millis(50 * i));
            d.release_due(t1 + Duration::from_millis(50 * i));
        }
        assert_eq!(sent(), 1, "one release within 1.5 s of constant change");

        // A policy with one key renders on every change.
        let small = Debouncer::new(
            Duration::from_millis(100),
            Duration::from_millis(1000),
            d.tx.clone(),
            std::sync::Arc::new(KeyIndex::default()),
        );
        let q = ("ns".to_string(), "q".to_string());
        small
            .index
            .on_event(&watcher::Event::Apply(mk_apikey("only", "q")), |_, _| true);
        small.mark_at([q.clone()], t0);
        small.mark_at([q.clone()], t0 + Duration::from_millis(1));
        assert_eq!(sent(), 2);
    }

    /// Under a stream of changes a big policy renders less often than a small one: at 20,000
    /// keys the longest wait is 10 s, not the configured 1 s, so the render work over a long
    /// burst stays in proportion to the keys, not to keys times duration.
    #[test]
    fn the_longest_wait_grows_with_the_keys_up_to_a_cap() {
        let (tx, mut rx) = policy_channel();
        let index = index_of_keys(20_000, "p");
        let d = Debouncer::new(
            Duration::from_millis(100),
            Duration::from_millis(1000),
            tx,
            index,
        );
        let p = ("ns".to_string(), "p".to_string());
        assert_eq!(
            d.delays_for(&p),
            (Duration::from_millis(100), Duration::from_secs(10))
        );
        assert_eq!(
            d.delays_for(&("ns".to_string(), "empty".to_string())),
            (Duration::ZERO, Duration::from_millis(1000))
        );
        let t0 = Instant::now();
        d.mark_at([p.clone()], t0);
        assert!(rx.try_recv().is_ok(), "idle: released at once");
        // A change every 50 ms for 9.5 s: held throughout, then released at 10 s.
        for i in 1..=190 {
            let t = t0 + Duration::from_millis(50 * i);
            d.mark_at([p.clone()], t);
            assert!(
                d.release_due(t).is_empty(),
                "released early, at {} ms",
                50 * i
            );
        }
        let first_held = t0 + Duration::from_millis(50);
        assert_eq!(
            d.release_due(first_held + Duration::from_secs(10)),
            std::slice::from_ref(&p)
        );
        // 130,000 keys would wait 65 s: capped.
        let big = index_of_keys(130_000, "p");
        let (tx, _rx) = policy_channel();
        let capped = Debouncer::new(
            Duration::from_millis(100),
            Duration::from_millis(1000),
            tx,
            big,
        );
        assert_eq!(capped.delays_for(&p).1, MAX_DELAY_CAP);
    }
}
