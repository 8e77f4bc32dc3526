//! [`KeySecret`]: a Secret as the operator caches it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// The entries of a Secret's `data`, decoded, in key order. Secrets that hold API keys have
/// one or two entries, so a scan beats a map, and a slice costs no B-tree node (about 540
/// bytes for a single entry).
type Data = Box<[(Box<str>, Box<[u8]>)]>;

/// A Secret as the operator caches it: name, namespace, uid, resourceVersion and `data`,
/// nothing else. The Secret watch deserializes straight into it, so no full `Secret` (its
/// label map, owner reference and data B-tree) is held per key: at 100,000 keys those were
/// the largest part of the operator's memory.
#[derive(Resource, Deserialize, Clone, Debug, Default, PartialEq)]
#[resource(inherit = Secret)]
pub struct KeySecret {
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

impl KeySecret {
    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.data
            .iter()
            .find(|(k, _)| **k == *key)
            .map(|(_, v)| &**v)
    }

    /// Keeps only the metadata a reconcile reads: the name and namespace (the cache's key),
    /// and the uid and resourceVersion (a render's inputs). Labels need not stay: the watch
    /// selects on the opt-in label, so every cached Secret carries it.
    pub fn slim(&mut self) {
        let m = std::mem::take(&mut self.metadata);
        self.metadata = ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            ..ObjectMeta::default()
        };
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
        let mut out = KeySecret {
            metadata: s.metadata,
            data: entries(data),
        };
        out.slim();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// What the watch delivers (JSON, base64 data) decodes to the same bytes, and the slimmed
    /// entry equals the one made from an in-memory Secret.
    #[test]
    fn a_watched_secret_decodes_its_data_and_keeps_only_what_reconciles_read() {
        let json = serde_json::to_value(full_secret()).unwrap();
        assert_eq!(json["data"]["key"], "a2xfMDEyMzQ1Njc4OWFiY2RlZg==");
        let mut watched: KeySecret = serde_json::from_value(json).unwrap();
        assert_eq!(watched.get("key"), Some(&b"kl_0123456789abcdef"[..]));
        assert_eq!(watched.get("other"), Some(&[0u8, 255, 10][..]));
        assert_eq!(watched.get("missing"), None);
        watched.slim();
        assert_eq!(watched.metadata.labels, None);
        assert_eq!(watched.metadata.annotations, None);
        assert_eq!(watched.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(watched.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(watched, KeySecret::from(full_secret()));
    }

    #[test]
    fn a_secret_without_data_has_no_entries_and_string_data_counts_when_built_in_memory() {
        let empty: KeySecret =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "e"}})).unwrap();
        assert_eq!(empty.get("key"), None);
        let mut s = full_secret();
        s.string_data = Some(BTreeMap::from([
            ("key".to_string(), "ignored".to_string()),
            ("typed".to_string(), "kl_typed_value".to_string()),
        ]));
        let k = KeySecret::from(s);
        assert_eq!(k.get("key"), Some(&b"kl_0123456789abcdef"[..]));
        assert_eq!(k.get("typed"), Some(&b"kl_typed_value"[..]));
    }
}
