//! Noticing new config: a watch on the config directory plus a periodic re-read, each
//! reloading off the request workers.

use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{watch, Notify};

use super::{ConfigSource, ConfigStore, ReloadOutcome};
use crate::Error;

pub(crate) async fn reload_blocking(
    config: &Arc<ConfigStore>,
    source: &ConfigSource,
) -> Result<ReloadOutcome, Error> {
    let (config, source) = (config.clone(), source.clone());
    // Parsing a large sharded key set takes a while; keep it off the request workers.
    tokio::task::spawn_blocking(move || config.reload(&source))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
}

/// Whether a filesystem event in the config directory can mean new content.
///
/// Reading the config makes events too (open, read, close-nowrite, an atime update), and in a
/// plain directory, where `policy.json` is a regular file rather than a symlink into `..data/`,
/// they arrive on the watched directory itself: reacting to them made each reload trigger the
/// next one. Writes count once finished (close-write), so a file being written is not read
/// half-way; a rename or link (AtomicWriter's swap, `mv`) counts at once.
pub fn is_content_event(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Name(_)) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        // Also a queue overflow (Other / Any): events were lost, so look.
        EventKind::Any | EventKind::Other => true,
        EventKind::Modify(ModifyKind::Any | ModifyKind::Other) => true,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => false,
        EventKind::Access(_) => false,
    }
}

/// Watches the directory itself, not the file: kubelet replaces `..data` with a rename, which
/// a watch on `policy.json` (a symlink into the old directory) would never see.
pub(crate) fn watch_source(
    source: &ConfigSource,
    changed: Arc<Notify>,
) -> Result<Option<notify::RecommendedWatcher>, Error> {
    match source {
        ConfigSource::Directory(dir) => {
            let mut watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    // An error from the watcher may mean lost events: look rather than miss one.
                    if event.map_or(true, |e| is_content_event(&e.kind)) {
                        changed.notify_one();
                    }
                })
                .map_err(|source| Error::Watch {
                    path: dir.clone(),
                    source,
                })?;
            // A directory that does not exist yet is covered by the periodic re-read.
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e,
                    "cannot watch the config directory; relying on the periodic re-read");
            }
            Ok(Some(watcher))
        }
    }
}

pub(crate) async fn reload_loop(
    config: Arc<ConfigStore>,
    source: ConfigSource,
    changed: Arc<Notify>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // Errors are logged and counted inside reload; the last good config keeps serving.
        let _ = reload_blocking(&config, &source).await;
    }
}
