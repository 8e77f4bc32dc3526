//! [`KeySecret`]: a Secret as the operator caches it, and [`SecretCache`], the cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::runtime::watcher;
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// The entries of a Secret's `data`, decoded, in key order. Secrets that hold API keys have
/// one or two entries, so a scan beats a map, and a slice costs no B-tree node (about 540
/// bytes for a single entry).
type Data = Box<[(Box<str>, Box<[u8]>)]>;

/// A Secret as the watch delivers it: metadata and decoded `data`, nothing else. It lives only
/// while its event passes through: [`SecretCache`] keeps a [`KeySecret`] made from it.
#[derive(Resource, Deserialize, Clone, Debug, Default)]
#[resource(inherit = Secret)]
pub struct WatchedSecret {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "decoded")]
    data: Data,
}

fn decoded<'de, D: Deserializer<'de>>(d: D) -> Result<Data, D::Error> {
    let map: Option<BTreeMap<String, ByteString>> = Option::deserialize(d)?;
    Ok(entries(map.unwrap_or_default()))
}

fn entries(map: BTreeMap<String, ByteString>) -> Data {
    map.into_iter()
        .map(|(k, v)| (k.into_boxed_str(), v.0.into_boxed_slice()))
        .collect()
}

/// A Secret as the operator caches it: its uid and resourceVersion (a render's inputs) and
/// its decoded `data`. Its name and namespace are the cache's keys. No `ObjectMeta` (360
/// bytes before any string) and no store key per Secret: at 100,000 keys the Secret cache
/// was the operator's second largest use of memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeySecret {
    pub uid: Option<Box<str>>,
    pub resource_version: Option<Box<str>>,
    data: Data,
}

impl KeySecret {
    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.data
            .iter()
            .find(|(k, _)| **k == *key)
            .map(|(_, v)| &**v)
    }
}

impl From<Secret> for KeySecret {
    /// A Secret the operator read or created itself. `stringData` is write-only in the API,
    /// so only a Secret built in memory carries it; `data` wins where both name a key, as
    /// the apiserver would have merged them.
    fn from(s: Secret) -> Self {
        let mut data = s.data.unwrap_or_default();
        for (k, v) in s.string_data.unwrap_or_default() {
            data.entry(k).or_insert_with(|| ByteString(v.into_bytes()));
        }
        KeySecret {
            uid: s.metadata.uid.map(String::into_boxed_str),
            resource_version: s.metadata.resource_version.map(String::into_boxed_str),
            data: entries(data),
        }
    }
}

type ByName = HashMap<Box<str>, Arc<KeySecret>>;

/// The watched Secrets, by namespace and name, fed by the Secret watch's events.
///
/// A re-list (after a watch expired) fills a fresh map and swaps it in at its end, as kube's
/// reflector does, so a Secret deleted while the watch was down does not linger.
#[derive(Default)]
pub struct SecretCache {
    state: RwLock<CacheState>,
    ready: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct CacheState {
    by_ns: HashMap<Box<str>, ByName>,
    /// Filled during a (re-)list, swapped in when it ends.
    relist: Option<HashMap<Box<str>, ByName>>,
}

/// Files the event's Secret under its namespace and name, taking its data out of the event.
fn put(map: &mut HashMap<Box<str>, ByName>, s: &mut WatchedSecret) {
    let m = &s.metadata;
    let (Some(ns), Some(name)) = (m.namespace.as_deref(), m.name.as_deref()) else {
        return;
    };
    let entry = KeySecret {
        uid: m.uid.as_deref().map(Into::into),
        resource_version: m.resource_version.as_deref().map(Into::into),
        data: std::mem::take(&mut s.data),
    };
    let by_name = match map.get_mut(ns) {
        Some(by_name) => by_name,
        None => map.entry(ns.into()).or_default(),
    };
    by_name.insert(name.into(), Arc::new(entry));
}

impl SecretCache {
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<KeySecret>> {
        let state = self.state.read().ok()?;
        state.by_ns.get(namespace)?.get(name).cloned()
    }

    /// Applies one watch event. Takes the Secret's data out of the event (the cache owns it
    /// from here); what passes on carries the metadata, which is all the event's mappers read.
    pub fn apply(&self, ev: &mut watcher::Event<WatchedSecret>) {
        let Ok(mut state) = self.state.write() else {
            return;
        };
        match ev {
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(s) => match state.relist.as_mut() {
                Some(relist) => put(relist, s),
                None => put(&mut state.by_ns, s),
            },
            watcher::Event::InitDone => {
                if let Some(relist) = state.relist.take() {
                    state.by_ns = relist;
                }
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(s) => put(&mut state.by_ns, s),
            watcher::Event::Delete(s) => {
                let (Some(ns), Some(name)) = (&s.metadata.namespace, &s.metadata.name) else {
                    return;
                };
                if let Some(by_name) = state.by_ns.get_mut(ns.as_str()) {
                    by_name.remove(name.as_str());
                    if by_name.is_empty() {
                        state.by_ns.remove(ns.as_str());
                    }
                }
            }
        }
    }

    /// Files a Secret this process just created, unless the watch got there first. Until the
    /// watch delivers the create, every reconcile of its key would otherwise miss the cache
    /// and try to create it again (a 409, then a GET): 0.9 % of the creates of a cold start
    /// did. Only ever fills a gap: an entry the watch wrote is newer or the same. (A Secret
    /// deleted in the moment between its create and this call would stay cached until the
    /// next re-list; its Delete event comes after the create's response in practice.)
    pub fn insert_created(&self, namespace: &str, name: &str, secret: KeySecret) {
        let Ok(mut state) = self.state.write() else {
            return;
        };
        let by_name = match state.by_ns.get_mut(namespace) {
            Some(by_name) => by_name,
            None => state.by_ns.entry(namespace.into()).or_default(),
        };
        by_name
            .entry(name.into())
            .or_insert_with(|| Arc::new(secret));
    }

    /// Resolves once the first list has been applied.
    pub async fn wait_until_ready(&self) {
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = self.ready.subscribe().wait_for(|r| *r).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn full_secret() -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("k-key".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                resource_version: Some("7".into()),
                labels: Some(BTreeMap::from([(
                    "keylimit.dev/secret".to_string(),
                    "true".to_string(),
                )])),
                annotations: Some(BTreeMap::from([("a".to_string(), "b".to_string())])),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (
                    "key".to_string(),
                    ByteString(b"kl_0123456789abcdef".to_vec()),
                ),
                ("other".to_string(), ByteString(vec![0, 255, 10])),
            ])),
            ..Default::default()
        }
    }

    fn watched(s: Secret) -> WatchedSecret {
        serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap()
    }

    fn named(name: &str, rv: &str) -> WatchedSecret {
        let mut s = full_secret();
        s.metadata.name = Some(name.into());
        s.metadata.resource_version = Some(rv.into());
        watched(s)
    }

    /// What the watch delivers (JSON, base64 data) decodes to the same bytes, and the cached
    /// entry equals the one made from an in-memory Secret.
    #[test]
    fn a_watched_secret_decodes_its_data_and_keeps_only_what_reconciles_read() {
        let json = serde_json::to_value(full_secret()).unwrap();
        assert_eq!(json["data"]["key"], "a2xfMDEyMzQ1Njc4OWFiY2RlZg==");
        let cache = SecretCache::default();
        cache.apply(&mut watcher::Event::Apply(watched(full_secret())));
        let cached = cache.get("ns", "k-key").unwrap();
        assert_eq!(cached.get("key"), Some(&b"kl_0123456789abcdef"[..]));
        assert_eq!(cached.get("other"), Some(&[0u8, 255, 10][..]));
        assert_eq!(cached.get("missing"), None);
        assert_eq!(cached.uid.as_deref(), Some("u-1"));
        assert_eq!(cached.resource_version.as_deref(), Some("7"));
        assert_eq!(*cached, KeySecret::from(full_secret()));
        assert_eq!(cache.get("other-ns", "k-key"), None);
    }

    #[test]
    fn a_secret_without_data_has_no_entries_and_string_data_counts_when_built_in_memory() {
        let empty: WatchedSecret = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "e", "namespace": "ns"}}),
        )
        .unwrap();
        let cache = SecretCache::default();
        cache.apply(&mut watcher::Event::Apply(empty));
        assert_eq!(cache.get("ns", "e").unwrap().get("key"), None);
        let mut s = full_secret();
        s.string_data = Some(BTreeMap::from([
            ("key".to_string(), "ignored".to_string()),
            ("typed".to_string(), "kl_typed_value".to_string()),
        ]));
        let k = KeySecret::from(s);
        assert_eq!(k.get("key"), Some(&b"kl_0123456789abcdef"[..]));
        assert_eq!(k.get("typed"), Some(&b"kl_typed_value"[..]));
    }

    #[tokio::test]
    async fn a_relist_replaces_the_cache_and_drops_what_was_deleted_meanwhile() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let cache = SecretCache::default();
        for mut ev in [Init, InitApply(named("a", "1")), InitApply(named("b", "1"))] {
            cache.apply(&mut ev);
        }
        // Not ready, and nothing visible, until the first list is complete.
        assert!(cache.get("ns", "a").is_none());
        let waiter = tokio::time::timeout(Duration::from_millis(50), cache.wait_until_ready());
        assert!(waiter.await.is_err(), "ready before the list ended");
        cache.apply(&mut InitDone);
        cache.wait_until_ready().await;
        assert!(cache.get("ns", "a").is_some() && cache.get("ns", "b").is_some());

        cache.apply(&mut Apply(named("a", "2")));
        assert_eq!(
            cache.get("ns", "a").unwrap().resource_version.as_deref(),
            Some("2")
        );
        cache.apply(&mut Delete(named("a", "2")));
        assert!(cache.get("ns", "a").is_none());

        // The watch expired; "b" was deleted while it was down and "c" created. Until the
        // re-list ends, reads see the old state.
        cache.apply(&mut Apply(named("a", "3")));
        cache.apply(&mut Init);
        cache.apply(&mut InitApply(named("c", "4")));
        assert!(cache.get("ns", "b").is_some());
        assert!(cache.get("ns", "c").is_none());
        cache.apply(&mut InitDone);
        assert!(cache.get("ns", "b").is_none(), "a deleted Secret lingered");
        assert!(cache.get("ns", "a").is_none(), "a deleted Secret lingered");
        assert!(cache.get("ns", "c").is_some());
    }

    #[test]
    fn a_created_secret_fills_a_gap_but_never_replaces_what_the_watch_wrote() {
        use watcher::Event::Apply;
        let cache = SecretCache::default();
        let created = |rv: &str| {
            let mut s = full_secret();
            s.metadata.resource_version = Some(rv.into());
            KeySecret::from(s)
        };
        cache.insert_created("ns", "k-key", created("5"));
        assert_eq!(
            cache
                .get("ns", "k-key")
                .unwrap()
                .resource_version
                .as_deref(),
            Some("5")
        );
        // The watch catches up, then moves on; a late insert of the creation changes nothing.
        cache.apply(&mut Apply(named("k-key", "6")));
        cache.insert_created("ns", "k-key", created("5"));
        assert_eq!(
            cache
                .get("ns", "k-key")
                .unwrap()
                .resource_version
                .as_deref(),
            Some("6")
        );
    }

    #[test]
    fn the_data_moves_into_the_cache_and_the_event_keeps_its_name() {
        let cache = SecretCache::default();
        let mut ev = watcher::Event::Apply(watched(full_secret()));
        cache.apply(&mut ev);
        let watcher::Event::Apply(passed_on) = ev else {
            unreachable!()
        };
        assert!(passed_on.data.is_empty(), "the key material was kept twice");
        assert_eq!(passed_on.metadata.name.as_deref(), Some("k-key"));
    }
}
