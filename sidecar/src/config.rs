//! Config snapshots: the immutable, per-request view of one loaded policy document, where it
//! comes from, and how a reload swaps it in.
//!
//! A [`Snapshot`] is built once per reload and shared behind an `Arc`; each request loads the
//! current one at its start (so a reload reaches already-open connections) and keeps it to the
//! end (so in-flight requests finish on the config they started with).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::{HeaderName, Method};
use keylimit_dataplane::{self as dp, KeyEntry, Mode, PolicyConfig, PolicyDocument};

#[cfg(feature = "api-watch")]
pub mod apiwatch;
mod index;
pub mod watch;
pub use index::{key_id, KeyIndex, KeyPolicy, KeyTable, SkippedKey, HASH_LEN};
use sha2::{Digest, Sha256};

use crate::http::meter::{UsageRule, DEFAULT_ESTIMATE_MAX};
use crate::http::path::SegmentPrefix;
use crate::http::response::LimitHeaderCache;
use crate::limiter::{LimitSet, ThrottleRule};
use crate::metrics::{Metrics, PolicyCounters};
use crate::Error;

/// Hashes presented key material under the plain sha256 scheme (`dataplane::hash_key`), raw.
/// The request path hashes with its snapshot's [`Snapshot::hasher`] instead, which is keyed
/// HMAC for documents that say so.
pub fn hash_presented(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

#[derive(Debug)]
pub struct RouteRule {
    pub name: Arc<str>,
    pub prefix: SegmentPrefix,
    pub methods: Vec<Method>,
    pub cost: u64,
    pub limits: Option<LimitSet>,
    /// Where this route's responses report their cost, in place of the policy's.
    pub usage: Option<UsageRule>,
}

/// Where the key is read from, with header names parsed once.
#[derive(Debug)]
pub struct KeySourceRule {
    pub header: Option<HeaderName>,
    pub bearer: bool,
    pub query_param: Option<String>,
    pub strip: bool,
    pub identity_header: HeaderName,
}

/// One loaded config, immutable.
#[derive(Debug)]
pub struct Snapshot {
    /// Local load counter (1 for the first config), not the policy's generation.
    pub generation: u64,
    /// sha256 of `policy.json`; shards are covered by the digests inside it.
    pub digest: [u8; 32],
    pub policy: PolicyConfig,
    pub index: KeyIndex,
    pub policy_limits: Option<LimitSet>,
    pub routes: Vec<RouteRule>,
    pub throttle: Option<ThrottleRule>,
    pub source: KeySourceRule,
    /// How presented keys are hashed to match the document's entries (pre-keyed for HMAC).
    pub hasher: dp::KeyHasher,
    pub dry_run: bool,
    pub counters: PolicyCounters,
    /// The rate-limit header values that depend only on the policy's limits, built once here
    /// so an allowed response formats only `remaining` and `reset`.
    pub limit_headers: LimitHeaderCache,
    /// Where responses report their cost (limits counted in tokens).
    pub usage: Option<UsageRule>,
}

fn header_name(name: &str, what: &str) -> Result<HeaderName, Error> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        Error::Document(dp::Error::Invalid(format!(
            "{what} {name:?} is not a valid header name"
        )))
    })
}

/// The sidecar's form of a `usage` (the policy's or a route's): header names parsed once.
fn usage_rule(u: &dp::UsageSource, what: &str) -> Result<UsageRule, Error> {
    Ok(UsageRule {
        header: u
            .header
            .as_deref()
            .map(|h| header_name(h, &format!("{what}.header")))
            .transpose()?,
        json_path: u
            .json_path()
            .into_iter()
            .map(|s| s.into_bytes().into_boxed_slice())
            .collect(),
        estimate_header: u
            .estimate
            .as_ref()
            .and_then(|e| e.header.as_deref())
            .map(|h| header_name(h, &format!("{what}.estimate.header")))
            .transpose()?,
        estimate_fixed: u.estimate.as_ref().map_or(0, |e| e.fixed),
        estimate_max: u
            .estimate
            .as_ref()
            .and_then(|e| e.max)
            .unwrap_or(DEFAULT_ESTIMATE_MAX),
    })
}

impl Snapshot {
    /// A snapshot for a sidecar without a hash key: documents that ask for HMAC are refused.
    pub fn build(
        doc: PolicyDocument,
        keys: Vec<KeyEntry>,
        digest: [u8; 32],
        generation: u64,
        metrics: &Metrics,
    ) -> Result<Self, Error> {
        let keys = KeyTable::from_entries(&keys);
        Self::build_keyed(doc, keys, digest, generation, metrics, None)
    }

    /// `hash_key` is the namespace's HMAC key (the mounted Secret), if the sidecar has one.
    pub fn build_keyed(
        doc: PolicyDocument,
        keys: KeyTable,
        digest: [u8; 32],
        generation: u64,
        metrics: &Metrics,
        hash_key: Option<&[u8]>,
    ) -> Result<Self, Error> {
        let hasher = dp::KeyHasher::for_scheme(&doc.policy.key_source.key_hash, hash_key)?;
        let policy = doc.policy;
        let defaults = Arc::new(LimitSet::compile(&policy.limits, "key"));
        let index = keys.into_index(defaults.clone(), &policy.limits);
        for k in index.skipped() {
            tracing::warn!(key = %k.name, reason = k.reason, "key entry skipped");
        }
        metrics
            .config_skipped_keys
            .set(i64::try_from(index.skipped().len()).unwrap_or(i64::MAX));
        let routes = policy
            .routes
            .iter()
            .map(|r| {
                let methods = r
                    .methods
                    .iter()
                    .map(|m| {
                        Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
                            Error::Document(dp::Error::Invalid(format!(
                                "route {}: bad method {m:?}",
                                r.name
                            )))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let prefix = SegmentPrefix::compile(&r.path_prefix, &policy.path_matching)
                    .map_err(|e| {
                        Error::Document(dp::Error::Invalid(format!(
                            "route {}: pathPrefix {:?}: {}",
                            r.name,
                            r.path_prefix,
                            e.message()
                        )))
                    })?;
                Ok(RouteRule {
                    name: Arc::from(r.name.as_str()),
                    prefix,
                    methods,
                    // 0 is a free route: admitted and counted for concurrency, never charged
                    // against a rate or quota.
                    cost: r.cost,
                    limits: r
                        .limits
                        .as_ref()
                        .map(|l| LimitSet::compile(l, &format!("route/{}", r.name))),
                    usage: r
                        .usage
                        .as_ref()
                        .map(|u| usage_rule(u, &format!("routes[{}].usage", r.name)))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let ks = &policy.key_source;
        let source = KeySourceRule {
            header: ks
                .header
                .as_deref()
                .map(|h| header_name(h, "keySource.header"))
                .transpose()?,
            bearer: ks.bearer,
            query_param: ks.query_param.clone(),
            strip: ks.strip,
            identity_header: header_name(&ks.identity_header, "keySource.identityHeader")?,
        };
        let policy_limits = policy
            .policy_limits
            .as_ref()
            .map(|l| LimitSet::compile(l, "policy"))
            .filter(|l| !l.is_empty());
        let throttle = policy.throttle.as_ref().map(|t| ThrottleRule {
            max_delay_ns: t.max_delay_ms.saturating_mul(1_000_000),
            max_queue: t.max_queue,
        });
        let limit_headers = LimitHeaderCache::build(
            policy.response.limit_headers,
            std::iter::once(&*defaults)
                .chain(routes.iter().filter_map(|r| r.limits.as_ref()))
                .chain(policy_limits.as_ref()),
        );
        let usage = policy
            .usage
            .as_ref()
            .map(|u| usage_rule(u, "usage"))
            .transpose()?;
        let counters = metrics.policy_counters(&format!("{}/{}", policy.namespace, policy.name));
        Ok(Snapshot {
            usage,
            generation,
            digest,
            dry_run: policy.mode == Mode::DryRun,
            policy,
            index,
            policy_limits,
            routes,
            throttle,
            source,
            hasher,
            counters,
            limit_headers,
        })
    }

    /// The longest matching route prefix wins, so rule order in the document does not matter.
    /// `path` is in match form ([`crate::http::path::match_form`] of the normalised path).
    pub fn route(&self, method: &Method, path: &str) -> Option<&RouteRule> {
        self.routes
            .iter()
            .filter(|r| r.prefix.matches(path))
            .filter(|r| r.methods.is_empty() || r.methods.contains(method))
            .max_by_key(|r| r.prefix.len())
    }

    pub fn policy_label(&self) -> String {
        format!("{}/{}", self.policy.namespace, self.policy.name)
    }
}

/// Where configs come from. Only the mounted ConfigMap directory exists today; an API-watch
/// source (`--configmap ns/name`) would be another variant feeding the same [`ConfigStore`].
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Directory(PathBuf),
}

/// The raw bytes of one config, read consistently.
#[derive(Debug)]
pub struct RawConfig {
    pub digest: [u8; 32],
    /// The document without its keys (`doc.keys` is empty): those are in `keys`.
    pub doc: PolicyDocument,
    pub keys: KeyTable,
}

impl ConfigSource {
    /// Reads through the visible paths (`policy.json -> ..data/policy.json`), so a kubelet
    /// swap in progress yields either the old or the new file, never a mix; a shard that does
    /// not match the document's digest means the swap is mid-way and the read is rejected.
    pub fn read(&self) -> Result<RawConfig, Error> {
        self.parse(self.read_policy()?)
    }

    /// Only `policy.json`'s bytes and their digest: what decides whether anything changed.
    /// Shards need not be read for that, their digests are inside `policy.json`.
    pub fn read_policy(&self) -> Result<PolicyBytes, Error> {
        match self {
            ConfigSource::Directory(dir) => {
                let bytes = read_file(&dir.join(dp::POLICY_FILE))?;
                let digest = Sha256::digest(&bytes).into();
                Ok(PolicyBytes { digest, bytes })
            }
        }
    }

    /// Parses `policy.json` and reads and checks the shards it names.
    pub fn parse(&self, policy: PolicyBytes) -> Result<RawConfig, Error> {
        match self {
            ConfigSource::Directory(dir) => parse_dir_config(dir, policy),
        }
    }
}

/// `policy.json` as read, before parsing.
#[derive(Debug)]
pub struct PolicyBytes {
    pub digest: [u8; 32],
    pub bytes: Vec<u8>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_dir_config(dir: &Path, policy: PolicyBytes) -> Result<RawConfig, Error> {
    let PolicyBytes { digest, bytes } = policy;
    // Keys go straight from the bytes into the compact table, a shard at a time: the
    // document's key list never exists as owned values.
    let mut keys = KeyTable::default();
    let doc = index::parse_document(&bytes, &mut keys)?;
    drop(bytes);
    index::resolve_shards(&doc, &mut keys, |file| {
        // Shard names come from the document; refuse anything that could leave the directory.
        if file.contains('/') || file.starts_with("..") {
            return None;
        }
        std::fs::read(dir.join(file)).ok()
    })?;
    Ok(RawConfig { digest, doc, keys })
}

/// What a reload attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Loaded { generation: u64 },
    Unchanged,
}

/// Holds the current snapshot and swaps in new ones.
#[derive(Debug)]
pub struct ConfigStore {
    current: ArcSwapOption<Snapshot>,
    loads: AtomicU64,
    /// Serialises reloads (watcher and manual triggers) so generations stay in order.
    reloading: std::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// Set while the latest reload attempt failed (the last good snapshot keeps serving).
    failure: std::sync::Mutex<Option<dp::ConfigFailure>>,
    /// File holding the namespace's HMAC key (a mounted Secret), read on every reload so a
    /// document is always matched with the key present at its load.
    hash_key_file: Option<PathBuf>,
    /// The inputs of the serving snapshot and of the latest rejection, by digest: a re-read
    /// with the same inputs repeats that answer without parsing.
    seen: std::sync::Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// [`fingerprint`] of the serving snapshot's inputs.
    loaded: Option<[u8; 32]>,
    /// The latest rejection that the same inputs would repeat, and why.
    rejected: Option<([u8; 32], Rejection)>,
}

#[derive(Debug, Clone)]
struct Rejection {
    reason: &'static str,
    message: String,
}

/// Whether a rejection follows from the fingerprinted inputs alone. A missing shard or one
/// whose digest does not match `policy.json` means the volume is mid-update: the shard can
/// catch up while `policy.json` stays the same, so that attempt is made again.
fn rejection_is_repeatable(e: &Error) -> bool {
    !matches!(
        e,
        Error::Document(dp::Error::MissingShard { .. } | dp::Error::ShardDigest { .. })
    )
}

impl ConfigStore {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_hash_key_file(metrics, None)
    }

    pub fn with_hash_key_file(metrics: Arc<Metrics>, hash_key_file: Option<PathBuf>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            loads: AtomicU64::new(0),
            reloading: std::sync::Mutex::new(()),
            metrics,
            failure: std::sync::Mutex::new(None),
            hash_key_file,
            seen: std::sync::Mutex::new(Seen::default()),
        }
    }

    /// The hash key file as read for this attempt; an error counts only for a document that
    /// needs the key: a sha256 document loads even if the file is missing.
    fn read_hash_key(&self) -> Option<Result<Vec<u8>, Error>> {
        self.hash_key_file.as_deref().map(read_file)
    }

    fn hash_key(
        doc: &PolicyDocument,
        read: Option<Result<Vec<u8>, Error>>,
    ) -> Result<Option<Vec<u8>>, Error> {
        if doc.policy.key_source.key_hash.algorithm == dp::KeyHashAlgorithm::Sha256 {
            return Ok(None);
        }
        read.transpose()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why the latest reload failed and since when; None while the latest attempt succeeded
    /// (or found nothing changed).
    pub fn failure(&self) -> Option<dp::ConfigFailure> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_failure(&self, reason: Option<&'static str>) {
        let mut failure = self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match reason {
            None => *failure = None,
            // `since` is the first failure of the current run; the reason is the latest.
            Some(reason) => {
                let since = failure.as_ref().map_or_else(unix_now, |f| f.since);
                *failure = Some(dp::ConfigFailure {
                    reason: reason.to_string(),
                    since,
                });
            }
        }
        self.metrics.config_stale.set(i64::from(failure.is_some()));
    }

    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    pub fn generation(&self) -> u64 {
        self.loads.load(Ordering::Acquire)
    }

    /// Reads, validates and swaps in the source's config. On any error the current snapshot
    /// stays, and the failure is counted and logged with its reason.
    ///
    /// Inputs (see [`fingerprint`]) identical to the serving config's are not parsed again
    /// ([`ReloadOutcome::Unchanged`]), nor are inputs identical to the latest attempt's when
    /// that was rejected: the answer is then [`Error::StillRejected`] with the same reason,
    /// neither logged nor counted as a new failure (both count as `result="unchanged"`).
    pub fn reload(&self, source: &ConfigSource) -> Result<ReloadOutcome, Error> {
        let _serial = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.metrics.config_reads.inc();
        let policy = match source.read_policy() {
            Ok(p) => p,
            Err(e) => {
                self.seen().rejected = None;
                return Err(self.rejected(e));
            }
        };
        let hash_key = self.read_hash_key();
        let inputs = fingerprint(&policy.digest, hash_key.as_ref());
        // Hash first, parse only on a change: a re-read of the same bytes (a periodic tick, an
        // unrelated event in the directory) costs a read and a sha256.
        let repeat = {
            let mut seen = self.seen();
            if seen.loaded == Some(inputs) {
                // A rejection is repeated only while it is the latest outcome: the same bad
                // bytes coming back after this are a new failure, logged and counted.
                seen.rejected = None;
                Some(None)
            } else {
                seen.rejected
                    .as_ref()
                    .filter(|(i, _)| *i == inputs)
                    .map(|(_, r)| Some(r.clone()))
            }
        };
        if let Some(rejected) = repeat {
            self.metrics.reload_unchanged();
            return match rejected {
                None => {
                    self.set_failure(None);
                    Ok(ReloadOutcome::Unchanged)
                }
                Some(r) => Err(Error::StillRejected {
                    reason: r.reason,
                    message: r.message,
                }),
            };
        }
        self.metrics.config_parses.inc();
        let result = source.parse(policy).and_then(|raw| {
            let generation = self.loads.load(Ordering::Acquire) + 1;
            let hash_key = Self::hash_key(&raw.doc, hash_key)?;
            Snapshot::build_keyed(
                raw.doc,
                raw.keys,
                raw.digest,
                generation,
                &self.metrics,
                hash_key.as_deref(),
            )
        });
        match result {
            Ok(snap) => {
                let generation = snap.generation;
                tracing::info!(
                    generation,
                    policy = %snap.policy_label(),
                    policy_generation = snap.policy.generation,
                    keys = snap.index.len(),
                    "config loaded"
                );
                let replaced = self.current.swap(Some(Arc::new(snap)));
                *self.seen() = Seen {
                    loaded: Some(inputs),
                    rejected: None,
                };
                self.loads.store(generation, Ordering::Release);
                self.metrics.config_generation.set(generation as i64);
                self.metrics.config_last_success.set(unix_now());
                self.set_failure(None);
                self.metrics.reload(Ok(()));
                if let Some(old) = replaced {
                    retire(old);
                }
                Ok(ReloadOutcome::Loaded { generation })
            }
            Err(e) => {
                self.seen().rejected = rejection_is_repeatable(&e).then(|| {
                    (
                        inputs,
                        Rejection {
                            reason: e.reason(),
                            message: e.to_string(),
                        },
                    )
                });
                Err(self.rejected(e))
            }
        }
    }

    /// Logs and counts a failed attempt; the last good snapshot keeps serving.
    fn rejected(&self, e: Error) -> Error {
        let serving = self.current.load().as_ref().map(|s| s.generation);
        tracing::warn!(error = %e, reason = e.reason(), serving_generation = ?serving,
            "config rejected; keeping the last good config");
        self.metrics.reload(Err(e.reason()));
        self.set_failure(Some(e.reason()));
        e
    }
}

/// Frees a replaced snapshot off the request path. Freeing one with a million keys takes
/// about 165 ms; a request still holding it would otherwise do that on a runtime worker when
/// it finishes, and every connection on that worker would wait. Here it is freed by the
/// reload's own (blocking) thread, or, while requests still hold it, by one retiring thread
/// that keeps a reference to every such snapshot until it is the last. One thread, not one per
/// reload: a long-lived upgraded connection can hold a snapshot across many reloads.
fn retire(old: Arc<Snapshot>) {
    let Err(old) = Arc::try_unwrap(old) else {
        return;
    };
    static RETIRING: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Arc<Snapshot>>>> =
        std::sync::OnceLock::new();
    let sender = RETIRING.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Snapshot>>();
        let spawned = std::thread::Builder::new()
            .name("keylimit-retire".into())
            .spawn(move || {
                let mut held: Vec<Arc<Snapshot>> = Vec::new();
                let mut wait = std::time::Duration::from_millis(1);
                loop {
                    // Requests hold a snapshot for their own duration only; polling with
                    // back-off costs nothing next to that, and nothing at all when idle.
                    let next = if held.is_empty() {
                        rx.recv().map_err(|_| ())
                    } else {
                        match rx.recv_timeout(wait) {
                            Ok(s) => Ok(s),
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(()),
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(()),
                        }
                    };
                    match next {
                        Ok(s) => {
                            held.push(s);
                            wait = std::time::Duration::from_millis(1);
                        }
                        Err(()) if held.is_empty() => return,
                        Err(()) => wait = (wait * 2).min(std::time::Duration::from_millis(100)),
                    }
                    // Dropping the last reference here frees the snapshot on this thread.
                    held.retain(|s| Arc::strong_count(s) > 1);
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to free replaced configs");
                None
            }
        }
    });
    // Without the thread, the last request holding it frees it, as before.
    if let Some(tx) = sender {
        let _ = tx.send(old);
    }
}

/// Digest of one attempt's inputs: `policy.json` (by its digest) and the hash key file, which
/// decides how a keyed document's entries are matched, so a new key is a new config.
fn fingerprint(policy: &[u8; 32], hash_key: Option<&Result<Vec<u8>, Error>>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(policy);
    match hash_key {
        None => h.update([0]),
        Some(Err(_)) => h.update([1]),
        Some(Ok(key)) => {
            h.update([2]);
            h.update(key);
        }
    }
    h.finalize().into()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
