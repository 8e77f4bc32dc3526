//! The pure part of reconciliation: API objects in, data-plane ConfigMaps and status out.
//!
//! Nothing here does I/O, so every rule (hashing, sharding at the 1 MiB boundary, determinism,
//! each way a key can be unusable) is unit-tested without a cluster.

use std::collections::{BTreeMap, HashMap, HashSet};

use keylimit_dataplane as dp;

use crate::crd::{
    ApiKey, FailModeSpec, LimitHeadersSpec, LimitsSpec, MatrixParametersSpec, PolicyMode,
    QuotaAlignmentSpec, QuotaPeriodSpec, RateLimitPolicy, RateLimitPolicySpec, RotationSpec,
    StoreSpec, StoreType,
};
use crate::key_secret::KeySecret;
use crate::webhook::MAX_SHARDS;

/// A ConfigMap may hold 1 MiB of data. Shards stay well below it so that metadata, the
/// managed-fields entry and future fields never push a write over the limit.
pub const SHARD_BUDGET_BYTES: usize = 900 * 1024;
/// Keys shorter than this are refused: a short key can be guessed through the sidecar.
pub const MIN_KEY_BYTES: usize = 16;
/// Label on every ConfigMap the operator writes, naming its policy.
pub const POLICY_LABEL: &str = "keylimit.dev/policy";

/// Name of a policy's main ConfigMap (the one holding `policy.json`).
pub fn main_config_map(policy: &str) -> String {
    format!("keylimit-{policy}")
}

/// Name of a policy's n-th key shard ConfigMap (1-based) and its data key.
pub fn shard_names(policy: &str, n: usize) -> (String, String) {
    (
        format!("keylimit-{policy}-keys-{n:04}"),
        format!("keys-{n:04}.json"),
    )
}

/// Default name of the Secret the operator generates for an ApiKey without `secretRef`.
pub fn generated_secret_name(apikey: &str) -> String {
    format!("{apikey}-key")
}

/// Why an ApiKey cannot be served. Each variant is a `Ready=False` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("RateLimitPolicy {0:?} not found in this namespace")]
    PolicyNotFound(String),
    #[error("Secret {0:?} not found or not labelled keylimit.dev/secret=true (the operator reads only Secrets that opt in with that label)")]
    SecretNotFound(String),
    #[error("Secret {secret:?} has no data key {key:?}")]
    SecretKeyMissing { secret: String, key: String },
    #[error("the key in Secret {secret:?} is shorter than {min} bytes")]
    KeyTooShort { secret: String, min: usize },
    #[error("expiresAt {0:?} is not an RFC 3339 timestamp")]
    InvalidExpiry(String),
    #[error("ApiKey {holder:?} of this policy already holds the same key material; this ApiKey is left out of the data plane (requests with that key are served as {holder:?})")]
    DuplicateKey { holder: String },
}

impl KeyProblem {
    pub fn reason(&self) -> &'static str {
        match self {
            KeyProblem::PolicyNotFound(_) => "PolicyNotFound",
            KeyProblem::SecretNotFound(_) => "SecretNotFound",
            KeyProblem::SecretKeyMissing { .. } => "SecretKeyMissing",
            KeyProblem::KeyTooShort { .. } => "KeyTooShort",
            KeyProblem::InvalidExpiry(_) => "InvalidExpiry",
            KeyProblem::DuplicateKey { .. } => "DuplicateKey",
        }
    }
}

/// An ApiKey resolved against its Secret: what the data plane needs, and nothing secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundKey {
    pub name: String,
    /// The ApiKey's creationTimestamp (seconds): of two ApiKeys with the same key material,
    /// the earlier one keeps it.
    pub created: Option<i64>,
    pub sha256: String,
    pub disabled: bool,
    pub expires_at: Option<i64>,
    pub overrides: Option<dp::Limits>,
    /// During a rotation's overlap: the previous key, hashed, and when it stops working.
    pub previous: Option<dp::PreviousKey>,
    /// Why a previous key in the Secret is not accepted (said in the Ready message).
    pub rotation_problem: Option<String>,
    /// The hash of the key whose counters this key keeps (see [`counter_data_key`]).
    pub counter: Option<String>,
}

impl BoundKey {
    /// The key's public fingerprint: the first 12 hex digits of its keyed hash (HMAC under
    /// the namespace's hash key), the same digits its ConfigMap entry starts with. Enough to
    /// tell keys apart; it lets nobody test a guess without the hash key, but anyone who
    /// holds the hash key Secret can, so that Secret is as sensitive as the keys.
    pub fn fingerprint(&self) -> String {
        self.sha256[..12].to_string()
    }

    /// The previous key's fingerprint while it is accepted.
    pub fn previous_fingerprint(&self) -> Option<String> {
        self.previous.as_ref().map(|p| p.sha256[..12].to_string())
    }
}

/// Data key of the previous key in a rotation, next to the current key's data key.
pub fn previous_data_key(data_key: &str) -> String {
    format!("{data_key}.previous")
}

/// Data key of the rotation's instant (RFC 3339), next to the current key's data key.
pub fn rotated_at_data_key(data_key: &str) -> String {
    format!("{data_key}.rotated-at")
}

/// Data key of the key a rotated key first replaced: its hash names the counters every later
/// key of this ApiKey keeps, so rotating never starts a quota afresh. `kubectl keylimit
/// rotate` sets it on the first rotation and leaves it after.
pub fn counter_data_key(data_key: &str) -> String {
    format!("{data_key}.counter-key")
}

/// How far ahead of the operator's clock a `<key>.rotated-at` may be.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// The Secret's `<key>.rotated-at`, in Unix seconds.
fn rotated_at(secret: &KeySecret, data_key: &str) -> Result<i64, String> {
    let at_key = rotated_at_data_key(data_key);
    secret
        .get(&at_key)
        .and_then(|b| std::str::from_utf8(trim_newline(b)).ok())
        .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| t.as_second())
        .ok_or_else(|| {
            format!("the previous key is refused: {at_key} is missing or not an RFC 3339 timestamp")
        })
}

/// When a rotation's overlap ends: the Secret's `<key>.rotated-at` plus `previousValidFor`.
fn rotation_end(
    rotation: &RotationSpec,
    secret: &KeySecret,
    data_key: &str,
) -> Result<i64, String> {
    let rotated_at = rotated_at(secret, data_key)?;
    let valid_for = rotation.previous_valid_for_seconds().ok_or_else(|| {
        format!(
            "the previous key is refused: previousValidFor {:?} is not a duration",
            rotation.previous_valid_for
        )
    })?;
    Ok(rotated_at.saturating_add(valid_for))
}

/// When the overlap of this key's rotation ends, if it has a previous key at all. Cheap (no
/// hashing): a policy's render inputs and its wake-up time come from it.
pub fn previous_valid_until(key: &ApiKey, secret: Option<&KeySecret>) -> Option<i64> {
    let rotation = key.spec.rotation.as_ref()?;
    let secret = secret?;
    let (_, data_key) = secret_ref(key);
    secret.get(&previous_data_key(&data_key))?;
    rotation_end(rotation, secret, &data_key).ok()
}

/// The previous key of a rotation while its overlap lasts. `Ok(None)`: no rotation declared,
/// none in the Secret, or the overlap is over. `Err`: the Secret holds a previous key that
/// cannot be accepted, and why.
fn bind_previous(
    key: &ApiKey,
    secret: &KeySecret,
    data_key: &str,
    current: &[u8],
    hasher: &dp::KeyHasher,
    now: i64,
) -> Result<Option<dp::PreviousKey>, String> {
    let prev_key = previous_data_key(data_key);
    let Some(previous) = secret.get(&prev_key).map(trim_newline) else {
        return Ok(None);
    };
    let Some(rotation) = &key.spec.rotation else {
        return Err(format!(
            "the Secret holds a previous key ({prev_key}) but spec.rotation is not set, so it is refused"
        ));
    };
    let rotated_at = rotated_at(secret, data_key)?;
    // Whoever writes the Secret must not outlast the overlap the ApiKey declares by dating
    // the rotation ahead; clocks may differ a little.
    if rotated_at > now + MAX_CLOCK_SKEW_SECS {
        return Err(format!(
            "the previous key is refused: {} is in the future",
            rotated_at_data_key(data_key)
        ));
    }
    let valid_until = rotation_end(rotation, secret, data_key)?;
    if previous.len() < MIN_KEY_BYTES {
        return Err(format!(
            "the previous key is refused: shorter than {MIN_KEY_BYTES} bytes"
        ));
    }
    // The same material twice is no rotation; an ended overlap leaves nothing to serve.
    if previous == current || valid_until <= now {
        return Ok(None);
    }
    Ok(Some(dp::PreviousKey {
        sha256: hasher.hash_hex(previous),
        valid_until,
    }))
}

/// The Secret an ApiKey reads, and the data key in it.
pub fn secret_ref(key: &ApiKey) -> (String, String) {
    let name = key.metadata.name.clone().unwrap_or_default();
    match &key.spec.secret_ref {
        Some(r) => (r.name.clone(), r.key.clone()),
        None => (
            generated_secret_name(&name),
            crate::crd::default_secret_key(),
        ),
    }
}

/// The key-hash scheme every document the operator renders declares.
pub fn key_hash_scheme() -> dp::KeyHash {
    dp::KeyHash {
        algorithm: dp::KeyHashAlgorithm::HmacSha256,
        secret: Some(dp::HASH_KEY_SECRET.to_string()),
    }
}

/// Resolves an ApiKey against its Secret. The plaintext is hashed here, with `hasher` (the
/// namespace's HMAC key, see [`key_hash_scheme`]), and dropped.
pub fn bind_key(
    key: &ApiKey,
    secret: Option<&KeySecret>,
    hasher: &dp::KeyHasher,
    now: i64,
) -> Result<BoundKey, KeyProblem> {
    let (secret_name, data_key) = secret_ref(key);
    let secret = secret.ok_or_else(|| KeyProblem::SecretNotFound(secret_name.clone()))?;
    let material = secret
        .get(&data_key)
        .ok_or_else(|| KeyProblem::SecretKeyMissing {
            secret: secret_name.clone(),
            key: data_key.clone(),
        })?;
    // Trailing newlines come from `kubectl create secret --from-file` and are never meant.
    let material = trim_newline(material);
    if material.len() < MIN_KEY_BYTES {
        return Err(KeyProblem::KeyTooShort {
            secret: secret_name,
            min: MIN_KEY_BYTES,
        });
    }
    let expires_at = key
        .spec
        .expires_at
        .as_ref()
        .map(|s| {
            s.parse::<k8s_openapi::jiff::Timestamp>()
                .map(|t| t.as_second())
                .map_err(|_| KeyProblem::InvalidExpiry(s.clone()))
        })
        .transpose()?;
    let (previous, rotation_problem) =
        match bind_previous(key, secret, &data_key, material, hasher, now) {
            Ok(p) => (p, None),
            Err(e) => (None, Some(e)),
        };
    // The first key this ApiKey had, else the one it replaced last: the counters live there.
    let counter = secret
        .get(&counter_data_key(&data_key))
        .or_else(|| secret.get(&previous_data_key(&data_key)))
        .map(trim_newline)
        .filter(|c| !c.is_empty() && *c != material)
        .map(|c| hasher.hash_hex(c));
    Ok(BoundKey {
        name: key.metadata.name.clone().unwrap_or_default(),
        created: key
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        sha256: hasher.hash_hex(material),
        disabled: key.spec.disabled,
        expires_at,
        overrides: key.spec.overrides.as_ref().map(limits_from_spec),
        previous,
        rotation_problem,
        counter,
    })
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && (b[end - 1] == b'\n' || b[end - 1] == b'\r') {
        end -= 1;
    }
    &b[..end]
}

pub fn limits_from_spec(spec: &LimitsSpec) -> dp::Limits {
    dp::Limits {
        rates: spec
            .rates
            .iter()
            .flatten()
            .filter_map(|r| {
                let (requests, unit) = counted(r.counted())?;
                Some(dp::RateWindow {
                    name: r.name.clone(),
                    requests,
                    period_seconds: r.per.seconds(),
                    burst: r.burst_or_default(),
                    unit,
                })
            })
            .collect(),
        quotas: spec
            .quotas
            .iter()
            .flatten()
            .filter_map(|q| {
                let (requests, unit) = counted(q.counted())?;
                Some(dp::QuotaWindow {
                    name: q.name.clone(),
                    requests,
                    unit,
                    period: match q.period {
                        QuotaPeriodSpec::Hour => dp::QuotaPeriod::Hour,
                        QuotaPeriodSpec::Day => dp::QuotaPeriod::Day,
                        QuotaPeriodSpec::Week => dp::QuotaPeriod::Week,
                        QuotaPeriodSpec::Month => dp::QuotaPeriod::Month,
                    },
                    alignment: match q.alignment {
                        QuotaAlignmentSpec::Calendar => dp::QuotaAlignment::Calendar,
                        QuotaAlignmentSpec::Rolling => dp::QuotaAlignment::Rolling,
                    },
                })
            })
            .collect(),
        concurrency: spec.concurrency,
    }
}

/// A rate's or quota's count and unit. The CRD's CEL rule sets exactly one of the two; an
/// object that slipped past it with neither (or both) is left out, not guessed at.
fn counted(c: Option<(u64, bool)>) -> Option<(u64, dp::Unit)> {
    c.map(|(n, tokens)| {
        (
            n,
            if tokens {
                dp::Unit::Tokens
            } else {
                dp::Unit::Requests
            },
        )
    })
}

pub fn usage_from_spec(u: &crate::crd::UsageSpec) -> dp::UsageSource {
    dp::UsageSource {
        header: u.header.clone(),
        json_field: u.json_field.clone(),
        estimate: u.estimate.as_ref().map(|e| dp::UsageEstimate {
            header: e.header.clone(),
            fixed: e.fixed,
            max: e.max,
        }),
    }
}

/// The data-plane store. `replicas` is the operator's latest count of the policy's sidecars.
pub fn store_config(
    name: &str,
    namespace: &str,
    spec: &RateLimitPolicySpec,
    replicas: u32,
) -> dp::Store {
    match spec.store.as_ref() {
        Some(StoreSpec {
            type_: StoreType::Redis,
            redis: Some(r),
        }) => dp::Store::Redis(dp::RedisStore {
            // None: the sidecar takes the URL from the connection Secret (its environment).
            url: r.url.clone(),
            key_prefix: r
                .key_prefix
                .clone()
                .unwrap_or_else(|| format!("keylimit:{namespace}:{name}")),
            timeout_ms: r.timeout_millis,
            fail_mode: match r.fail_mode {
                FailModeSpec::FailOpen => dp::FailMode::FailOpen,
                FailModeSpec::FailClosed => dp::FailMode::FailClosed,
                FailModeSpec::LocalFallback => dp::FailMode::LocalFallback,
            },
            replicas: replicas.max(1),
        }),
        _ => dp::Store::Local,
    }
}

/// The data-plane view of a policy spec.
pub fn policy_config(
    name: &str,
    namespace: &str,
    generation: i64,
    spec: &RateLimitPolicySpec,
) -> dp::PolicyConfig {
    let key_source = match &spec.key_source {
        None => dp::KeySource {
            key_hash: key_hash_scheme(),
            ..dp::KeySource::default()
        },
        Some(ks) => dp::KeySource {
            // The header is always read (default `X-API-Key`): it costs nothing and keeps
            // a policy that only adds bearer or query lookup from locking out header users.
            header: Some(
                ks.header
                    .clone()
                    .unwrap_or_else(|| dp::DEFAULT_KEY_HEADER.to_string()),
            ),
            bearer: ks.bearer,
            query_param: ks.query_param.clone(),
            strip: ks.strip,
            identity_header: dp::DEFAULT_IDENTITY_HEADER.to_string(),
            key_hash: key_hash_scheme(),
        },
    };
    dp::PolicyConfig {
        name: name.to_string(),
        namespace: namespace.to_string(),
        generation,
        mode: match spec.mode {
            PolicyMode::Enforce => dp::Mode::Enforce,
            PolicyMode::DryRun => dp::Mode::DryRun,
        },
        key_source,
        limits: spec
            .limits
            .as_ref()
            .map(limits_from_spec)
            .unwrap_or_default(),
        policy_limits: spec.policy_limits.as_ref().map(limits_from_spec),
        throttle: spec.throttle.as_ref().map(|t| dp::Throttle {
            max_delay_ms: t.max_delay_millis,
            max_queue: t.max_queue,
        }),
        routes: spec
            .routes
            .iter()
            .flatten()
            .map(|r| dp::Route {
                name: r.name.clone(),
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.clone().unwrap_or_default(),
                cost: r.cost,
                limits: r.limits.as_ref().map(limits_from_spec),
                usage: r.usage.as_ref().map(usage_from_spec),
            })
            .collect(),
        path_matching: spec
            .path_matching
            .as_ref()
            .map(|m| dp::PathMatching {
                case_sensitive: m.case_sensitive,
                matrix_parameters: match m.matrix_parameters {
                    MatrixParametersSpec::Ignore => dp::MatrixParameters::Ignore,
                    MatrixParametersSpec::Reject => dp::MatrixParameters::Reject,
                },
            })
            .unwrap_or_default(),
        upgrade_protocols: spec.upgrade_protocols.clone().unwrap_or_default(),
        response: spec
            .response
            .as_ref()
            .map(|r| dp::ResponseConfig {
                message: r
                    .message
                    .clone()
                    .unwrap_or_else(|| dp::DEFAULT_EXHAUSTED_MESSAGE.to_string()),
                limit_headers: match r.limit_headers.unwrap_or_default() {
                    LimitHeadersSpec::Full => dp::LimitHeaders::Full,
                    LimitHeadersSpec::Draft => dp::LimitHeaders::Draft,
                    LimitHeadersSpec::OnRefusal => dp::LimitHeaders::OnRefusal,
                },
            })
            .unwrap_or_default(),
        store: store_config(name, namespace, spec, 1),
        usage: spec.usage.as_ref().map(usage_from_spec),
        load_shedding: spec.load_shedding.as_ref().filter(|l| l.enabled).map(|l| {
            dp::LoadShedding {
                min_concurrency: l.min_concurrency,
                max_concurrency: l.max_concurrency,
                latency_tolerance_percent: l.latency_tolerance_percent,
            }
        }),
    }
}

/// One ConfigMap's worth of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapData {
    pub name: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The main ConfigMap first, then the shards in order.
    pub config_maps: Vec<ConfigMapData>,
    pub keys: usize,
    /// ApiKeys left out because an earlier one holds the same key material.
    pub duplicates: Vec<Duplicate>,
}

/// An ApiKey left out of the document: `holder` has the same key material and is older.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub name: String,
    pub holder: String,
}

/// Splits keys into those that go into the document and the duplicates. The sidecar indexes
/// keys by their hash, so two entries with one hash would be ambiguous: the earliest ApiKey
/// (creationTimestamp, then name) keeps the key, whatever order the keys arrive in, so an
/// existing key is never displaced by a newcomer that copies its Secret.
pub fn dedupe(keys: &[BoundKey]) -> (Vec<&BoundKey>, Vec<Duplicate>) {
    let mut order: Vec<&BoundKey> = keys.iter().collect();
    // A key without a creation time (never the case for a stored object) counts as oldest.
    order.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut holders: HashMap<&str, &str> = HashMap::with_capacity(order.len());
    let mut kept = Vec::with_capacity(order.len());
    let mut duplicates = vec![];
    for k in order {
        match holders.get(k.sha256.as_str()) {
            Some(holder) => duplicates.push(Duplicate {
                name: k.name.clone(),
                holder: holder.to_string(),
            }),
            None => {
                holders.insert(&k.sha256, &k.name);
                kept.push(k);
            }
        }
    }
    duplicates.sort_by(|a, b| a.name.cmp(&b.name));
    (kept, duplicates)
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("policy has no name")]
    NoName,
    #[error("serialising the data-plane document: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("one key entry ({0}) is larger than a ConfigMap shard")]
    EntryTooLarge(String),
    #[error("{keys} keys need {shards} key shard ConfigMaps, but sidecars mount at most {max_shards} (about {fit} keys of this size); the last published ConfigMaps stay in place: move keys to another policy")]
    TooManyKeys {
        keys: usize,
        shards: usize,
        max_shards: usize,
        fit: usize,
    },
}

/// Renders a policy and its bound keys into ConfigMaps. Deterministic: the same inputs give
/// byte-identical output regardless of the order keys arrive in.
pub fn render(policy: &RateLimitPolicy, keys: &[BoundKey]) -> Result<Rendered, RenderError> {
    let name = policy.metadata.name.as_deref().ok_or(RenderError::NoName)?;
    let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
    let generation = policy.metadata.generation.unwrap_or_default();
    let mut config = policy_config(name, namespace, generation, &policy.spec);
    let replicas = policy
        .status
        .as_ref()
        .map_or(1, |s| u32::try_from(s.sidecars_reporting).unwrap_or(1));
    config.store = store_config(name, namespace, &policy.spec, replicas);
    render_config(config, keys, SHARD_BUDGET_BYTES, MAX_SHARDS)
}

/// Renders with explicit limits: `budget` bytes per ConfigMap, at most `max_shards` key
/// shards (the webhook mounts no more: a document naming more could never load).
pub fn render_config(
    config: dp::PolicyConfig,
    keys: &[BoundKey],
    budget: usize,
    max_shards: usize,
) -> Result<Rendered, RenderError> {
    let (kept, duplicates) = dedupe(keys);
    // A previous key is only an alias: it never displaces a current key, and of two previous
    // keys with one hash neither is served (which ApiKey it belongs to would be a guess).
    let current: HashSet<&str> = kept.iter().map(|k| k.sha256.as_str()).collect();
    let mut previous_count: HashMap<&str, usize> = HashMap::new();
    for p in kept.iter().filter_map(|k| k.previous.as_ref()) {
        *previous_count.entry(p.sha256.as_str()).or_default() += 1;
    }
    let mut entries: Vec<dp::KeyEntry> = kept
        .iter()
        .map(|k| dp::KeyEntry {
            name: k.name.clone(),
            sha256: k.sha256.clone(),
            disabled: k.disabled,
            expires_at: k.expires_at,
            overrides: k.overrides.clone(),
            previous: k
                .previous
                .as_ref()
                .filter(|p| {
                    !current.contains(p.sha256.as_str())
                        && previous_count.get(p.sha256.as_str()) == Some(&1)
                })
                .cloned(),
            counter: k.counter.clone(),
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.sha256.cmp(&b.sha256)));
    let policy_name = config.name.clone();
    let main = main_config_map(&policy_name);

    // A key whose own limits count tokens needs the metered version too: an older sidecar
    // would read them as requests.
    let metered = entries
        .iter()
        .any(|e| e.overrides.as_ref().is_some_and(dp::Limits::counts_tokens));
    let mut doc = dp::PolicyDocument {
        api_version: String::new(),
        policy: config,
        keys: entries,
        shards: vec![],
    };
    let api_version = dp::api_version_for(doc.key_hash_algorithm(), metered || doc.is_metered());
    doc.api_version = api_version.to_string();
    let inline = serde_json::to_string(&doc)?;
    if inline.len() <= budget {
        return Ok(Rendered {
            keys: doc.keys.len(),
            config_maps: vec![ConfigMapData {
                name: main,
                data: BTreeMap::from([(dp::POLICY_FILE.to_string(), inline)]),
            }],
            duplicates,
        });
    }

    // Too large for one ConfigMap: move every key into shards packed up to the budget.
    let entries = std::mem::take(&mut doc.keys);
    let total = entries.len();
    let mut shards: Vec<Vec<dp::KeyEntry>> = vec![];
    let mut current: Vec<dp::KeyEntry> = vec![];
    // The shard envelope (apiVersion, policy name, index) costs a fixed few hundred bytes.
    let envelope = 256 + policy_name.len();
    let mut size = envelope;
    for e in entries {
        let len = serde_json::to_string(&e)?.len() + 1;
        if len + envelope > budget {
            return Err(RenderError::EntryTooLarge(e.name));
        }
        if size + len > budget && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            size = envelope;
        }
        size += len;
        current.push(e);
    }
    if !current.is_empty() {
        shards.push(current);
    }
    if shards.len() > max_shards {
        return Err(RenderError::TooManyKeys {
            keys: total,
            shards: shards.len(),
            max_shards,
            fit: total * max_shards / shards.len(),
        });
    }

    let mut config_maps = vec![];
    for (i, keys) in shards.into_iter().enumerate() {
        let n = i + 1;
        let (cm, file) = shard_names(&policy_name, n);
        let count = keys.len();
        let body = serde_json::to_string(&dp::KeyShard {
            api_version: api_version.to_string(),
            policy: policy_name.clone(),
            index: n as u32,
            keys,
        })?;
        doc.shards.push(dp::ShardRef {
            file: file.clone(),
            config_map: cm.clone(),
            sha256: dp::digest(body.as_bytes()),
            keys: count,
        });
        config_maps.push(ConfigMapData {
            name: cm,
            data: BTreeMap::from([(file, body)]),
        });
    }
    let main_body = serde_json::to_string(&doc)?;
    config_maps.insert(
        0,
        ConfigMapData {
            name: main,
            data: BTreeMap::from([(dp::POLICY_FILE.to_string(), main_body)]),
        },
    );
    Ok(Rendered {
        config_maps,
        keys: total,
        duplicates,
    })
}

/// Seconds until an expiry, if it lies ahead: the operator requeues then to flip Ready.
pub fn seconds_until(expires_at: Option<i64>, now: i64) -> Option<i64> {
    expires_at.map(|t| t - now).filter(|d| *d > 0)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::crd::{ApiKeySpec, PolicyRef, RateSpec, RateUnit, RotationSpec, SecretKeyRef};
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    pub fn mk_policy(name: &str) -> RateLimitPolicy {
        let mut p = RateLimitPolicy::new(
            name,
            RateLimitPolicySpec {
                load_shedding: None,
                usage: None,
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("app".into(), "api".into())])),
                    ..Default::default()
                },
                key_source: None,
                limits: Some(LimitsSpec {
                    rates: Some(vec![RateSpec {
                        tokens: None,
                        name: "per-minute".into(),
                        requests: Some(10),
                        per: RateUnit::Minute,
                        burst: Some(2),
                    }]),
                    quotas: None,
                    concurrency: None,
                }),
                policy_limits: None,
                throttle: None,
                routes: None,
                path_matching: None,
                upgrade_protocols: None,
                mode: PolicyMode::Enforce,
                response: None,
                store: None,
            },
        );
        p.metadata.namespace = Some("ns".into());
        p.metadata.generation = Some(3);
        p
    }

    pub fn mk_apikey(name: &str, policy: &str) -> ApiKey {
        let mut k = ApiKey::new(
            name,
            ApiKeySpec {
                policy_ref: PolicyRef {
                    name: policy.into(),
                },
                display_name: None,
                owner: None,
                disabled: false,
                expires_at: None,
                secret_ref: None,
                overrides: None,
                rotation: None,
            },
        );
        k.metadata.namespace = Some("ns".into());
        k
    }

    pub fn mk_secret(name: &str, key: &str, value: &[u8]) -> KeySecret {
        KeySecret::from(Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(key.into(), ByteString(value.to_vec()))])),
            ..Default::default()
        })
    }

    fn hasher() -> dp::KeyHasher {
        dp::KeyHasher::hmac(&[42u8; dp::HASH_KEY_LEN]).unwrap()
    }

    /// 2026-01-01T00:00:00Z.
    const NOW: i64 = 1_767_225_600;

    fn mk_secret_data(name: &str, data: &[(&str, &[u8])]) -> KeySecret {
        KeySecret::from(Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        })
    }

    fn rotating(name: &str, valid_for: &str) -> ApiKey {
        let mut k = mk_apikey(name, "p");
        k.spec.rotation = Some(RotationSpec {
            previous_valid_for: valid_for.into(),
        });
        k
    }

    /// A Secret in a rotation's overlap: `rotated_at` seconds before NOW.
    fn rotated_secret(name: &str, ago: i64) -> KeySecret {
        let at = k8s_openapi::jiff::Timestamp::from_second(NOW - ago)
            .unwrap()
            .to_string();
        mk_secret_data(
            &format!("{name}-key"),
            &[
                ("key", b"kl_new_key_0123456789abcdef"),
                ("key.previous", b"kl_old_key_0123456789abcdef\n"),
                ("key.rotated-at", at.as_bytes()),
            ],
        )
    }

    #[test]
    fn a_rotation_keeps_the_previous_key_for_its_overlap() {
        let k = rotating("a", "1h");
        let b = bind_key(&k, Some(&rotated_secret("a", 600)), &hasher(), NOW).unwrap();
        assert_eq!(b.sha256, hasher().hash_hex(b"kl_new_key_0123456789abcdef"));
        let p = b.previous.clone().expect("in the overlap");
        // Trailing newline trimmed, as for the current key.
        assert_eq!(p.sha256, hasher().hash_hex(b"kl_old_key_0123456789abcdef"));
        assert_eq!(p.valid_until, NOW - 600 + 3600);
        assert_eq!(b.rotation_problem, None);
        // Without a counter key the counters stay with the key it replaced.
        assert_eq!(b.counter.as_deref(), Some(p.sha256.as_str()));
        assert_eq!(
            previous_valid_until(&k, Some(&rotated_secret("a", 600))),
            Some(p.valid_until)
        );
        // The document carries it next to the key; nothing of the plaintext.
        let r = render(&mk_policy("p"), &[b]).unwrap();
        let text = &r.config_maps[0].data["policy.json"];
        assert!(!text.contains("kl_old") && text.contains(&p.sha256));
        let doc = dp::PolicyDocument::parse(text.as_bytes()).unwrap();
        assert_eq!(doc.keys[0].previous, Some(p));

        // The overlap is over: only the current key is served.
        let b = bind_key(&k, Some(&rotated_secret("a", 3600)), &hasher(), NOW).unwrap();
        assert_eq!((b.previous, b.rotation_problem), (None, None));
    }

    #[test]
    fn the_counters_stay_with_the_first_key_through_every_rotation() {
        let s = mk_secret_data(
            "a-key",
            &[
                ("key", b"kl_third_key_0123456789abc"),
                ("key.previous", b"kl_second_key_0123456789ab"),
                ("key.counter-key", b"kl_first_key_0123456789abc\n"),
            ],
        );
        let b = bind_key(&mk_apikey("a", "p"), Some(&s), &hasher(), NOW).unwrap();
        assert_eq!(
            b.counter,
            Some(hasher().hash_hex(b"kl_first_key_0123456789abc"))
        );
        let r = render(&mk_policy("p"), std::slice::from_ref(&b)).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(doc.keys[0].counter, b.counter);
        // A key that was never rotated names no counter.
        let plain = mk_secret("a-key", "key", b"kl_0123456789abcdef");
        let b = bind_key(&mk_apikey("a", "p"), Some(&plain), &hasher(), NOW).unwrap();
        assert_eq!(b.counter, None);
    }

    #[test]
    fn a_previous_key_without_a_declared_or_dated_rotation_is_refused_and_said_why() {
        // No spec.rotation: the current key binds, the previous one does not.
        let b = bind_key(
            &mk_apikey("a", "p"),
            Some(&rotated_secret("a", 10)),
            &hasher(),
            NOW,
        )
        .unwrap();
        assert!(b.previous.is_none());
        assert!(b
            .rotation_problem
            .unwrap()
            .contains("spec.rotation is not set"));
        // No rotated-at, or one that is not a timestamp.
        for at in [None, Some(&b"yesterday"[..])] {
            let mut data: Vec<(&str, &[u8])> = vec![
                ("key", b"kl_new_key_0123456789abcdef"),
                ("key.previous", b"kl_old_key_0123456789abcdef"),
            ];
            if let Some(at) = at {
                data.push(("key.rotated-at", at));
            }
            let s = mk_secret_data("a-key", &data);
            let b = bind_key(&rotating("a", "1h"), Some(&s), &hasher(), NOW).unwrap();
            assert!(b.previous.is_none());
            assert!(b.rotation_problem.unwrap().contains("key.rotated-at"));
        }
        // A short previous key is refused like a short key.
        let at = k8s_openapi::jiff::Timestamp::from_second(NOW)
            .unwrap()
            .to_string();
        let s = mk_secret_data(
            "a-key",
            &[
                ("key", b"kl_new_key_0123456789abcdef"),
                ("key.previous", b"short"),
                ("key.rotated-at", at.as_bytes()),
            ],
        );
        let b = bind_key(&rotating("a", "1h"), Some(&s), &hasher(), NOW).unwrap();
        assert!(b.previous.is_none() && b.rotation_problem.is_some());
        // Dated ahead to stretch the overlap: refused (a little clock skew is not).
        let k = rotating("a", "1h");
        let b = bind_key(&k, Some(&rotated_secret("a", -86_400)), &hasher(), NOW).unwrap();
        assert!(b.previous.is_none());
        assert!(b.rotation_problem.unwrap().contains("in the future"));
        let b = bind_key(&k, Some(&rotated_secret("a", -60)), &hasher(), NOW).unwrap();
        assert_eq!(b.previous.map(|p| p.valid_until), Some(NOW + 60 + 3600));
    }

    #[test]
    fn a_previous_key_never_displaces_a_current_key() {
        let hash = |m: &str| hasher().hash_hex(m.as_bytes());
        let prev = |m: &str| {
            Some(dp::PreviousKey {
                sha256: hash(m),
                valid_until: NOW + 60,
            })
        };
        // `a`'s previous key is `b`'s current key; `c` and `d` claim the same previous key.
        let keys = [
            BoundKey {
                previous: prev("kl_b_material_0123456789"),
                ..mk_bound("a")
            },
            BoundKey {
                sha256: hash("kl_b_material_0123456789"),
                ..mk_bound("b")
            },
            BoundKey {
                previous: prev("kl_shared_old_0123456789"),
                ..mk_bound("c")
            },
            BoundKey {
                previous: prev("kl_shared_old_0123456789"),
                ..mk_bound("d")
            },
            BoundKey {
                previous: prev("kl_e_old_0123456789abcd"),
                ..mk_bound("e")
            },
        ];
        let r = render(&mk_policy("p"), &keys).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        let with_previous: Vec<&str> = doc
            .keys
            .iter()
            .filter(|k| k.previous.is_some())
            .map(|k| k.name.as_str())
            .collect();
        assert_eq!(with_previous, ["e"]);
        assert_eq!(doc.keys.len(), 5);
    }

    #[test]
    fn durations_are_hours_minutes_seconds() {
        use crate::crd::parse_hms;
        assert_eq!(parse_hms("24h"), Some(86_400));
        assert_eq!(parse_hms("1h30m"), Some(5_400));
        assert_eq!(parse_hms("90m"), Some(5_400));
        assert_eq!(parse_hms("1h2m3s"), Some(3_723));
        for bad in [
            "",
            "h",
            "1",
            "30m1h",
            "1h1h",
            "1d",
            "-1h",
            "1.5h",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_hms(bad), None, "{bad:?}");
        }
    }

    fn mk_bound(name: &str) -> BoundKey {
        BoundKey {
            name: name.into(),
            created: None,
            sha256: hasher().hash_hex(format!("kl_{name}_0123456789abcdef").as_bytes()),
            disabled: false,
            expires_at: None,
            overrides: None,
            previous: None,
            rotation_problem: None,
            counter: None,
        }
    }

    #[test]
    fn bind_hashes_the_key_and_trims_newline() {
        let k = mk_apikey("a", "p");
        let s = mk_secret("a-key", "key", b"kl_0123456789abcdef\n");
        let b = bind_key(&k, Some(&s), &hasher(), NOW).unwrap();
        assert_eq!(b.sha256, hasher().hash_hex(b"kl_0123456789abcdef"));
        assert_eq!(b.fingerprint().len(), 12);
        assert!(b.sha256.starts_with(&b.fingerprint()));
    }

    #[test]
    fn key_hashes_and_fingerprint_are_keyed_not_plain_sha256() {
        let k = mk_apikey("a", "p");
        let s = mk_secret("a-key", "key", b"kl_0123456789abcdef");
        let b = bind_key(&k, Some(&s), &hasher(), NOW).unwrap();
        let plain = dp::hash_key(b"kl_0123456789abcdef");
        assert_ne!(
            b.sha256, plain,
            "the ConfigMap entry is not an unkeyed hash"
        );
        assert!(
            !plain.starts_with(&b.fingerprint()),
            "the fingerprint is not an unkeyed hash prefix"
        );
        // Another namespace's hash key gives other hashes for the same key.
        let other = dp::KeyHasher::hmac(&[43u8; dp::HASH_KEY_LEN]).unwrap();
        assert_ne!(
            bind_key(&k, Some(&s), &other, NOW).unwrap().sha256,
            b.sha256
        );
        // Every document says how its hashes were made, so a sidecar can match them.
        let r = render(&mk_policy("p"), std::slice::from_ref(&b)).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(doc.policy.key_source.key_hash, key_hash_scheme());
        let sidecar = dp::KeyHasher::for_scheme(
            &doc.policy.key_source.key_hash,
            Some(&[42u8; dp::HASH_KEY_LEN]),
        )
        .unwrap();
        assert_eq!(sidecar.hash_hex(b"kl_0123456789abcdef"), doc.keys[0].sha256);
    }

    #[test]
    fn bind_reports_each_problem() {
        let mut k = mk_apikey("a", "p");
        assert_eq!(
            bind_key(&k, None, &hasher(), NOW),
            Err(KeyProblem::SecretNotFound("a-key".into()))
        );
        k.spec.secret_ref = Some(SecretKeyRef {
            name: "mine".into(),
            key: "token".into(),
        });
        let s = mk_secret("mine", "other", b"kl_0123456789abcdef");
        assert_eq!(
            bind_key(&k, Some(&s), &hasher(), NOW),
            Err(KeyProblem::SecretKeyMissing {
                secret: "mine".into(),
                key: "token".into()
            })
        );
        let s = mk_secret("mine", "token", b"short");
        assert!(matches!(
            bind_key(&k, Some(&s), &hasher(), NOW),
            Err(KeyProblem::KeyTooShort { .. })
        ));
        let s = mk_secret("mine", "token", b"kl_0123456789abcdef");
        k.spec.expires_at = Some("tomorrow".into());
        assert_eq!(
            bind_key(&k, Some(&s), &hasher(), NOW),
            Err(KeyProblem::InvalidExpiry("tomorrow".into()))
        );
        k.spec.expires_at = Some("2027-01-01T00:00:00Z".into());
        assert_eq!(
            bind_key(&k, Some(&s), &hasher(), NOW).unwrap().expires_at,
            Some(1_798_761_600)
        );
        assert_eq!(
            KeyProblem::PolicyNotFound("p".into()).reason(),
            "PolicyNotFound"
        );
    }

    #[test]
    fn token_limits_render_with_their_unit_usage_and_the_metered_version() {
        let k = mk_apikey("a", "p");
        let s = mk_secret("a-key", "key", b"kl_0123456789abcdef");
        let b = bind_key(&k, Some(&s), &hasher(), NOW).unwrap();
        let plain = render(&mk_policy("p"), std::slice::from_ref(&b)).unwrap();
        let doc = |r: &Rendered| {
            dp::PolicyDocument::parse(r.config_maps[0].data[dp::POLICY_FILE].as_bytes()).unwrap()
        };
        assert_ne!(doc(&plain).api_version, dp::API_VERSION_METERED);
        let mut p = mk_policy("p");
        if let Some(l) = p.spec.limits.as_mut() {
            l.rates.get_or_insert_with(Vec::new).push(RateSpec {
                name: "per-minute-tokens".into(),
                requests: None,
                tokens: Some(6_000),
                per: RateUnit::Minute,
                burst: None,
            });
            l.quotas = Some(vec![crate::crd::QuotaSpec {
                name: "monthly-tokens".into(),
                requests: None,
                tokens: Some(5_000_000),
                period: QuotaPeriodSpec::Month,
                alignment: QuotaAlignmentSpec::Calendar,
            }]);
        }
        p.spec.usage = Some(crate::crd::UsageSpec {
            header: None,
            json_field: Some("usage.total_tokens".into()),
            estimate: None,
        });
        let d = doc(&render(&p, &[b]).unwrap());
        assert_eq!(d.api_version, dp::API_VERSION_METERED);
        let q = &d.policy.limits.quotas[0];
        assert_eq!((q.requests, q.unit), (5_000_000, dp::Unit::Tokens));
        assert_eq!(d.policy.limits.rates[0].unit, dp::Unit::Requests);
        // Without a burst, a request rate paces one at a time and a token rate may spend a
        // whole period's tokens in one response.
        let bursts: Vec<_> = d
            .policy
            .limits
            .rates
            .iter()
            .map(|r| (r.unit, r.burst))
            .collect();
        assert_eq!(bursts, [(dp::Unit::Requests, 2), (dp::Unit::Tokens, 5_999)]);
        assert_eq!(
            d.policy.usage.and_then(|u| u.json_field).as_deref(),
            Some("usage.total_tokens")
        );
    }

    #[test]
    fn plaintext_never_reaches_the_configmap() {
        let k = mk_apikey("a", "p");
        let s = mk_secret("a-key", "key", b"kl_supersecretvalue123");
        let b = bind_key(&k, Some(&s), &hasher(), NOW).unwrap();
        let r = render(&mk_policy("p"), &[b]).unwrap();
        for cm in &r.config_maps {
            for v in cm.data.values() {
                assert!(!v.contains("supersecret"));
            }
        }
    }

    #[test]
    fn small_policy_is_one_configmap_and_parses() {
        let r = render(&mk_policy("p"), &[mk_bound("b"), mk_bound("a")]).unwrap();
        assert_eq!(r.config_maps.len(), 1);
        assert_eq!(r.config_maps[0].name, "keylimit-p");
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(
            doc.keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(doc.policy.limits.rates[0].period_seconds, 60);
        assert_eq!(doc.policy.generation, 3);
        assert_eq!(doc.policy.response.message, "Keys Temporarily Exhausted");
    }

    #[test]
    fn output_is_deterministic_whatever_the_input_order() {
        let keys: Vec<BoundKey> = (0..500).map(|i| mk_bound(&format!("k{i}"))).collect();
        let mut reversed = keys.clone();
        reversed.reverse();
        let p = mk_policy("p");
        let a = render_config(
            policy_config("p", "ns", 1, &p.spec),
            &keys,
            8 * 1024,
            MAX_SHARDS,
        )
        .unwrap();
        let b = render_config(
            policy_config("p", "ns", 1, &p.spec),
            &reversed,
            8 * 1024,
            MAX_SHARDS,
        )
        .unwrap();
        assert!(a.config_maps.len() > 2);
        assert_eq!(a, b);
    }

    #[test]
    fn shards_at_the_budget_and_round_trips() {
        let p = mk_policy("p");
        let keys: Vec<BoundKey> = (0..300).map(|i| mk_bound(&format!("k{i:04}"))).collect();
        let budget = 10 * 1024;
        let r = render_config(
            policy_config("p", "ns", 1, &p.spec),
            &keys,
            budget,
            MAX_SHARDS,
        )
        .unwrap();
        assert!(
            r.config_maps.len() > 2,
            "expected shards, got {}",
            r.config_maps.len()
        );
        for cm in &r.config_maps {
            let size: usize = cm.data.values().map(|v| v.len()).sum();
            assert!(size <= budget, "{} is {size} bytes", cm.name);
        }
        let files: BTreeMap<String, String> = r
            .config_maps
            .iter()
            .flat_map(|cm| cm.data.clone())
            .collect();
        let doc = dp::PolicyDocument::parse(files["policy.json"].as_bytes()).unwrap();
        assert!(doc.keys.is_empty());
        let back = doc
            .resolve_keys(|f| files.get(f).map(|s| s.as_bytes().to_vec()))
            .unwrap();
        assert_eq!(back.len(), 300);
        assert_eq!(r.keys, 300);
    }

    #[test]
    fn exactly_at_the_budget_stays_inline() {
        let p = mk_policy("p");
        let keys: Vec<BoundKey> = (0..10).map(|i| mk_bound(&format!("k{i}"))).collect();
        let one = render_config(
            policy_config("p", "ns", 1, &p.spec),
            &keys,
            usize::MAX,
            MAX_SHARDS,
        )
        .unwrap();
        let len = one.config_maps[0].data["policy.json"].len();
        let at =
            render_config(policy_config("p", "ns", 1, &p.spec), &keys, len, MAX_SHARDS).unwrap();
        assert_eq!(at.config_maps.len(), 1);
        let over = render_config(
            policy_config("p", "ns", 1, &p.spec),
            &keys,
            len - 1,
            MAX_SHARDS,
        )
        .unwrap();
        assert!(over.config_maps.len() >= 2);
    }

    #[test]
    fn hundred_thousand_keys_fit_real_configmaps() {
        let keys: Vec<BoundKey> = (0..100_000)
            .map(|i| mk_bound(&format!("customer-{i:06}")))
            .collect();
        let r = render(&mk_policy("p"), &keys).unwrap();
        for cm in &r.config_maps {
            let size: usize = cm.data.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(size < 1024 * 1024, "{} is {size} bytes", cm.name);
        }
        assert_eq!(r.keys, 100_000);
        // The webhook mounts shards 1..=32 optionally, so this bounds a policy's key count.
        assert!(
            r.config_maps.len() <= 33,
            "{} ConfigMaps",
            r.config_maps.len()
        );
        eprintln!("MEASURED 100k keys -> {} ConfigMaps", r.config_maps.len());
    }

    #[test]
    fn overrides_and_routes_reach_the_document() {
        let mut p = mk_policy("p");
        p.spec.routes = Some(vec![crate::crd::RouteSpec {
            usage: None,
            name: "search".into(),
            path_prefix: "/search".into(),
            methods: Some(vec!["GET".into()]),
            cost: 5,
            limits: None,
        }]);
        p.spec.mode = PolicyMode::DryRun;
        let mut k = mk_bound("a");
        k.overrides = Some(dp::Limits {
            concurrency: Some(4),
            ..Default::default()
        });
        let r = render(&p, &[k]).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(doc.policy.mode, dp::Mode::DryRun);
        assert_eq!(doc.policy.routes[0].cost, 5);
        assert_eq!(doc.keys[0].overrides.as_ref().unwrap().concurrency, Some(4));
    }

    /// `response` may set the headers alone; the message then stays the default.
    #[test]
    fn the_choice_of_limit_headers_reaches_the_document() {
        let cases = [
            (
                None,
                None,
                dp::LimitHeaders::Full,
                "Keys Temporarily Exhausted",
            ),
            (
                Some(LimitHeadersSpec::OnRefusal),
                None,
                dp::LimitHeaders::OnRefusal,
                "Keys Temporarily Exhausted",
            ),
            (
                Some(LimitHeadersSpec::Draft),
                Some("Out of credits"),
                dp::LimitHeaders::Draft,
                "Out of credits",
            ),
        ];
        for (headers, message, want, want_message) in cases {
            let mut p = mk_policy("p");
            p.spec.response = Some(crate::crd::ResponseSpec {
                message: message.map(str::to_owned),
                limit_headers: headers,
            });
            let r = render(&p, &[mk_bound("a")]).unwrap();
            let doc =
                dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
            assert_eq!(doc.policy.response.limit_headers, want, "{headers:?}");
            assert_eq!(doc.policy.response.message, want_message);
        }
    }

    #[test]
    fn a_routes_usage_reaches_the_document_and_makes_it_metered() {
        let mut p = mk_policy("p");
        p.spec.routes = Some(vec![crate::crd::RouteSpec {
            usage: Some(crate::crd::UsageSpec {
                header: None,
                json_field: Some("usage.prompt_tokens".into()),
                estimate: None,
            }),
            name: "embeddings".into(),
            path_prefix: "/v1/embeddings".into(),
            methods: None,
            cost: 1,
            limits: None,
        }]);
        let r = render(&p, &[mk_bound("a")]).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(doc.api_version, dp::API_VERSION_METERED);
        assert_eq!(
            doc.policy.routes[0]
                .usage
                .as_ref()
                .and_then(|u| u.json_field.as_deref()),
            Some("usage.prompt_tokens")
        );
    }

    #[test]
    fn redis_store_reaches_the_document_with_the_replica_count() {
        let mut p = mk_policy("p");
        p.spec.store = Some(StoreSpec {
            type_: StoreType::Redis,
            redis: Some(crate::crd::RedisSpec {
                url: None,
                connection_secret_ref: Some(crate::crd::ConnectionSecretRef {
                    name: "redis-conn".into(),
                }),
                password_secret_ref: None,
                key_prefix: None,
                timeout_millis: 50,
                fail_mode: FailModeSpec::FailClosed,
            }),
        });
        p.status = Some(crate::crd::RateLimitPolicyStatus {
            sidecars_reporting: 3,
            ..Default::default()
        });
        let r = render(&p, &[]).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        match doc.policy.store {
            dp::Store::Redis(r) => {
                assert_eq!(r.key_prefix, "keylimit:ns:p");
                assert_eq!(r.replicas, 3);
                assert_eq!(r.fail_mode, dp::FailMode::FailClosed);
                assert_eq!(r.url, None, "the URL stays in the Secret");
            }
            other => panic!("expected Redis, got {other:?}"),
        }
        assert!(!r.config_maps[0].data["policy.json"].contains("password"));
    }

    fn mk_bound_at(name: &str, material: &str, created: i64) -> BoundKey {
        BoundKey {
            created: Some(created),
            sha256: hasher().hash_hex(material.as_bytes()),
            ..mk_bound(name)
        }
    }

    fn doc_key_names(r: &Rendered) -> Vec<String> {
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        doc.keys.into_iter().map(|k| k.name).collect()
    }

    #[test]
    fn duplicate_key_material_is_kept_once_by_the_earliest_apikey() {
        let same = "kl_the_same_material_0123456789";
        // "a" sorts first by name but was created later: creation time decides.
        let keys = vec![
            mk_bound_at("a", same, 200),
            mk_bound_at("z", same, 100),
            mk_bound_at("m", same, 300),
            mk_bound_at("other", "kl_other_material_0123456789", 50),
        ];
        let r = render(&mk_policy("p"), &keys).unwrap();
        assert_eq!(doc_key_names(&r), ["other", "z"]);
        assert_eq!(r.keys, 2);
        assert_eq!(
            r.duplicates,
            [
                Duplicate {
                    name: "a".into(),
                    holder: "z".into()
                },
                Duplicate {
                    name: "m".into(),
                    holder: "z".into()
                },
            ]
        );
        // Same answer whatever order the caches hand the keys over in.
        let mut reversed = keys.clone();
        reversed.reverse();
        assert_eq!(render(&mk_policy("p"), &reversed).unwrap(), r);
        // Equal creation times (one-second resolution): the name decides.
        let tie = vec![mk_bound_at("b", same, 100), mk_bound_at("a", same, 100)];
        let r = render(&mk_policy("p"), &tie).unwrap();
        assert_eq!(doc_key_names(&r), ["a"]);
        assert_eq!(r.duplicates[0].holder, "a");
        // The document the sidecar gets has one entry per hash.
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(doc.keys.len(), 1);
    }

    #[test]
    fn two_apikeys_on_one_secret_are_duplicates() {
        let mut a = mk_apikey("a", "p");
        let mut b = mk_apikey("b", "p");
        for (k, t) in [(&mut a, 100), (&mut b, 200)] {
            k.spec.secret_ref = Some(SecretKeyRef {
                name: "shared".into(),
                key: "key".into(),
            });
            k.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(t).unwrap(),
                ));
        }
        let s = mk_secret("shared", "key", b"kl_0123456789abcdef0123");
        let bound = [&b, &a].map(|k| bind_key(k, Some(&s), &hasher(), NOW).unwrap());
        assert_eq!(bound[1].created, Some(100));
        let r = render(&mk_policy("p"), &bound).unwrap();
        assert_eq!(doc_key_names(&r), ["a"]);
        assert_eq!(
            r.duplicates,
            [Duplicate {
                name: "b".into(),
                holder: "a".into()
            }]
        );
        let p = KeyProblem::DuplicateKey { holder: "a".into() };
        assert_eq!(p.reason(), "DuplicateKey");
        assert!(p.to_string().contains("ApiKey \"a\""), "{p}");
    }

    #[test]
    fn duplicates_never_reach_shards_either() {
        let p = mk_policy("p");
        let mut keys: Vec<BoundKey> = (0..300).map(|i| mk_bound(&format!("k{i:04}"))).collect();
        let mut copy = mk_bound("k0000");
        copy.name = "copy".into();
        copy.created = Some(1);
        keys.push(copy);
        let r = render_config(policy_config("p", "ns", 1, &p.spec), &keys, 10 * 1024, 32).unwrap();
        assert!(r.config_maps.len() > 2);
        assert_eq!(r.keys, 300);
        assert_eq!(r.duplicates.len(), 1);
        // The key created first (with a creation time) keeps it; the one without counts as
        // oldest, as documented on `dedupe`.
        assert_eq!(r.duplicates[0].name, "copy");
        assert_eq!(r.duplicates[0].holder, "k0000");
    }

    #[test]
    fn more_shards_than_sidecars_mount_is_refused() {
        let p = mk_policy("p");
        let keys: Vec<BoundKey> = (0..300).map(|i| mk_bound(&format!("k{i:04}"))).collect();
        let config = || policy_config("p", "ns", 1, &p.spec);
        let budget = 4 * 1024;
        // How many shards these keys need at this budget, with no cap.
        let free = render_config(config(), &keys, budget, usize::MAX).unwrap();
        let needed = free.config_maps.len() - 1;
        assert!(needed > 3, "test needs several shards, got {needed}");
        // Exactly at the cap: fine.
        let at = render_config(config(), &keys, budget, needed).unwrap();
        assert_eq!(at.config_maps.len(), needed + 1);
        // One shard short: refused, with the numbers a user needs.
        let err = render_config(config(), &keys, budget, needed - 1).unwrap_err();
        match &err {
            RenderError::TooManyKeys {
                keys,
                shards,
                max_shards,
                fit,
            } => {
                assert_eq!((*keys, *shards, *max_shards), (300, needed, needed - 1));
                assert!(*fit < 300 && *fit > 0, "fit {fit}");
            }
            other => panic!("expected TooManyKeys, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("300 keys"), "{text}");
        assert!(text.contains(&format!("at most {}", needed - 1)), "{text}");
    }

    #[test]
    fn the_real_cap_is_the_webhooks_mount_count() {
        // Entries of ~100 bytes: 32 shards of 900 KiB hold about 290k. Use long names to
        // reach the cap with fewer keys, so the test stays fast.
        let pad = "x".repeat(2000);
        let n = SHARD_BUDGET_BYTES / 2100 * (MAX_SHARDS + 1);
        let keys: Vec<BoundKey> = (0..n).map(|i| mk_bound(&format!("{pad}-{i:06}"))).collect();
        match render(&mk_policy("p"), &keys) {
            Err(RenderError::TooManyKeys { max_shards, .. }) => assert_eq!(max_shards, MAX_SHARDS),
            other => panic!(
                "expected TooManyKeys, got {:?}",
                other.map(|r| r.config_maps.len())
            ),
        }
    }

    #[test]
    fn path_matching_and_free_routes_reach_the_document() {
        let mut p = mk_policy("p");
        let r = render(&p, &[]).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(doc.policy.path_matching, dp::PathMatching::default());
        assert!(!doc.policy.path_matching.case_sensitive);
        p.spec.path_matching = Some(crate::crd::PathMatchingSpec {
            case_sensitive: true,
            matrix_parameters: MatrixParametersSpec::Reject,
        });
        p.spec.routes = Some(vec![crate::crd::RouteSpec {
            usage: None,
            name: "health".into(),
            path_prefix: "/health".into(),
            methods: None,
            cost: 0,
            limits: None,
        }]);
        let r = render(&p, &[]).unwrap();
        let doc =
            dp::PolicyDocument::parse(r.config_maps[0].data["policy.json"].as_bytes()).unwrap();
        assert_eq!(
            doc.policy.path_matching,
            dp::PathMatching {
                case_sensitive: true,
                matrix_parameters: dp::MatrixParameters::Reject,
            }
        );
        assert_eq!(doc.policy.routes[0].cost, 0);
    }

    #[test]
    fn seconds_until_only_counts_the_future() {
        let now = 1_000;
        assert_eq!(seconds_until(Some(1_060), now), Some(60));
        assert_eq!(seconds_until(Some(900), now), None);
        assert_eq!(seconds_until(None, now), None);
    }
}
