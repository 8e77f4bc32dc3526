//! API-watch mode (`--configmap <namespace>/<policy>`): the policy's ConfigMaps are read
//! through the Kubernetes API instead of a kubelet volume, for sub-second propagation (kubelet
//! takes up to about a minute) where the pod's RBAC allows `get/list/watch configmaps`.
//!
//! The watch writes what it sees into the config directory exactly the way kubelet's
//! AtomicWriter updates a ConfigMap volume, so both modes share one validated read path and
//! one reload trigger. Only this task links kube; the request path never touches it.
//!
//! Layout: `<dir>/<file>` → `..data/<file>`, `..data` → `..<timestamp>.<random>`. An update
//! writes a new timestamped directory, points `..data_tmp` at it, renames `..data_tmp` over
//! `..data` (atomic), then removes the old directory. Unchanged content writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};

use crate::Error;

/// Label the operator puts on every ConfigMap of a policy.
pub const POLICY_LABEL: &str = "keylimit.dev/policy";

/// Writes `files` into `dir` as one AtomicWriter update. Returns false when the content
/// already matches (kubelet skips the write then).
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
        "..{}.{:016x}",
        chrono::Utc::now().format("%Y_%m_%d_%H_%M_%S"),
        rand_suffix()
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
        if old != Path::new(&stamp) {
            std::fs::remove_dir_all(dir.join(old))?;
        }
    }
    Ok(true)
}

/// A unique-enough suffix without pulling in a RNG: time and pid are enough to keep two
/// writes in the same second apart.
fn rand_suffix() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Parses `--configmap <namespace>/<policy>`.
pub fn parse_target(s: &str) -> Result<(String, String), Error> {
    match s.split_once('/') {
        Some((ns, p)) if !ns.is_empty() && !p.is_empty() && !p.contains('/') => {
            Ok((ns.to_string(), p.to_string()))
        }
        _ => Err(Error::Argument(format!(
            "--configmap wants <namespace>/<policy>, got {s:?}"
        ))),
    }
}

/// Mirrors every ConfigMap labelled for `policy` in `namespace` into `dir` until the stream
/// ends. Watch errors are retried with backoff by the watcher; the last good files stay.
pub async fn mirror(
    client: Client,
    namespace: &str,
    policy: &str,
    dir: PathBuf,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().labels(&format!("{POLICY_LABEL}={policy}"));
    let (store, writer) = reflector::store::<ConfigMap>();
    let mut stream = reflector::reflector(writer, watcher(api, cfg))
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Err(e) => {
                tracing::warn!(error = %e, "configmap watch error; retrying");
                continue;
            }
            // During the initial list the store is incomplete: never write half a key set.
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

/// Runs [`mirror`] with an in-cluster (or `$KUBECONFIG`) client.
pub async fn run(target: (String, String), dir: PathBuf) -> Result<(), Error> {
    let client = Client::try_default()
        .await
        .map_err(|e| Error::Argument(format!("no Kubernetes client for --configmap: {e}")))?;
    mirror(client, &target.0, &target.1, dir).await
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

    #[test]
    fn removed_files_disappear() {
        let d = tempfile::tempdir().unwrap();
        let two = BTreeMap::from([
            ("policy.json".to_string(), b"p".to_vec()),
            ("keys-0001.json".to_string(), b"k".to_vec()),
        ]);
        write_atomic(d.path(), &two).unwrap();
        let one = BTreeMap::from([("policy.json".to_string(), b"q".to_vec())]);
        write_atomic(d.path(), &one).unwrap();
        assert!(!d.path().join("keys-0001.json").exists());
    }

    #[test]
    fn target_parsing() {
        assert_eq!(
            parse_target("shop/standard").unwrap(),
            ("shop".into(), "standard".into())
        );
        assert!(parse_target("standard").is_err());
        assert!(parse_target("/x").is_err());
        assert!(parse_target("a/b/c").is_err());
    }
}
