//! Stands in for kubelet's ConfigMap volume: watches a policy's ConfigMaps through the API and
//! writes their data into a directory exactly the way kubelet's AtomicWriter does, so the
//! sidecar's reload path is exercised as it is in a pod.
//!
//! Layout: `<dir>/<file>` → `..data/<file>`, `..data` → `..<timestamp>.<random>`. An update
//! writes a new timestamped directory, points `..data_tmp` at it, renames `..data_tmp` over
//! `..data` (atomic), then removes the old directory. Unchanged content writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{reflector, watcher, WatchStreamExt};

use kube::{Api, Client};

/// Writes `files` into `dir` as one atomic AtomicWriter update. Returns false when the
/// content already matches (kubelet skips the write then).
pub fn write_atomic(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    if let Ok(current) = std::fs::read_link(&data) {
        let current_dir = dir.join(&current);
        let same = std::fs::read_dir(&current_dir)
            .map(|rd| rd.filter_map(|e| e.ok()).count() == files.len())
            .unwrap_or(false)
            && files
                .iter()
                .all(|(k, v)| std::fs::read(current_dir.join(k)).ok().as_deref() == Some(v));
        if same {
            return Ok(false);
        }
    }
    let old = std::fs::read_link(&data).ok();
    let stamp = format!(
        "..{}.{:08x}",
        k8s_openapi::jiff::Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S"),
        rand::random::<u32>()
    );
    let ts_dir = dir.join(&stamp);
    std::fs::create_dir(&ts_dir)?;
    for (k, v) in files {
        std::fs::write(ts_dir.join(k), v)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    // User-visible names point through ..data, so they switch with the rename.
    for k in files.keys() {
        let link = dir.join(k);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(PathBuf::from("..data").join(k), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("..") && !files.contains_key(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old))?;
    }
    Ok(true)
}

/// Projects every ConfigMap labelled for `policy` in `ns` into `dir` until the task is dropped.
pub async fn project(client: Client, ns: &str, policy: &str, dir: PathBuf) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client, ns);
    let cfg = watcher::Config::default().labels(&format!(
        "{}={policy}",
        keylimit_operator::render::POLICY_LABEL
    ));
    let (store, writer) = reflector::store::<ConfigMap>();
    let mut stream = reflector::reflector(writer, watcher(api, cfg))
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Err(e) => {
                tracing::warn!(error = %e, "projection watch error");
                continue;
            }
            // During the initial list the store is incomplete; kubelet would not write then.
            Ok(watcher::Event::Init) | Ok(watcher::Event::InitApply(_)) => continue,
            Ok(_) => {}
        }
        let mut files = BTreeMap::new();
        for cm in store.state() {
            for (k, v) in cm.data.clone().unwrap_or_default() {
                files.insert(k, v.into_bytes());
            }
        }
        if files.is_empty() {
            continue;
        }
        write_atomic(&dir, &files)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writer_layout_and_swap() {
        let d = tempfile::tempdir().unwrap();
        let f = |s: &str| BTreeMap::from([("policy.json".to_string(), s.as_bytes().to_vec())]);
        assert!(write_atomic(d.path(), &f("one")).unwrap());
        let first = std::fs::read_link(d.path().join("..data")).unwrap();
        assert_eq!(
            std::fs::read_link(d.path().join("policy.json")).unwrap(),
            PathBuf::from("..data/policy.json")
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("policy.json")).unwrap(),
            "one"
        );
        assert!(
            !write_atomic(d.path(), &f("one")).unwrap(),
            "unchanged content is not rewritten"
        );
        assert!(write_atomic(d.path(), &f("two")).unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join("policy.json")).unwrap(),
            "two"
        );
        assert!(
            !d.path().join(&first).exists(),
            "old timestamped dir removed"
        );
        assert!(!d.path().join("..data_tmp").exists());
    }
}
