//! The two custom resources, `ApiKey` and `RateLimitPolicy` (`keylimit.dev/v1alpha1`).
//!
//! The schema is the users' contract: bounds and CEL rules here are what makes a bad manifest
//! fail at `kubectl apply` instead of at 3 a.m. in a sidecar.

// clippy reads the repeated `printcolumn(type_ = …)` arguments of the derive as duplicated
// attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "keylimit.dev";

/// Condition types. These are a stable API: `kubectl wait --for=condition=…` depends on them.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const ACCEPTED: &str = "Accepted";
    pub const EXHAUSTED: &str = "Exhausted";
    /// On a RateLimitPolicy: False when quotas are counted per sidecar across replicas.
    pub const QUOTAS_EXACT: &str = "QuotasExact";
}

// ---------------------------------------------------------------------------------------------
// ApiKey
// ---------------------------------------------------------------------------------------------

/// An API key: where its material lives, which policy governs it, and per-key overrides.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keylimit.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    namespaced,
    status = "ApiKeyStatus",
    shortname = "ak",
    category = "keylimit",
    cel,
    printcolumn(name = "Policy", type_ = "string", json_path = ".spec.policyRef.name"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Exhausted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Exhausted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Exhausted\")].reason"
    ),
    printcolumn(
        name = "Resets",
        type_ = "string",
        json_path = ".status.exhaustedUntil"
    ),
    printcolumn(
        name = "Usage",
        type_ = "string",
        json_path = ".status.usage",
        priority = 1
    ),
    printcolumn(
        name = "Fingerprint",
        type_ = "string",
        json_path = ".status.fingerprint",
        priority = 1
    ),
    printcolumn(
        name = "Previous",
        type_ = "string",
        json_path = ".status.previousFingerprint",
        priority = 1
    ),
    printcolumn(
        name = "Previous-Until",
        type_ = "string",
        json_path = ".status.previousValidUntil",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// The RateLimitPolicy (same namespace) that governs this key.
    pub policy_ref: PolicyRef,
    /// Human name of the key, e.g. the customer it was issued to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,
    /// Who owns the key (team, customer id, email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub owner: Option<String>,
    /// A disabled key is refused with 403.
    #[serde(default)]
    pub disabled: bool,
    /// After this instant (RFC 3339) the key is refused with 403.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("timestamp(self) > timestamp('2000-01-01T00:00:00Z')").message("expiresAt must be an RFC 3339 timestamp such as 2027-01-01T00:00:00Z"))]
    pub expires_at: Option<String>,
    /// Where the key material lives. When omitted, the operator generates a key into a Secret
    /// named `<apikey>-key` that it owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Limits for this key that replace the policy's (rates and quotas by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<LimitsSpec>,
    /// Key rotation without downtime. With this set, a previous key kept in the Secret next
    /// to the current one (data keys `<key>.previous` and `<key>.rotated-at`, written by
    /// `kubectl keylimit rotate`) is accepted for `previousValidFor` after the rotation, and
    /// both keys share one set of counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,
}

/// How long a replaced key keeps working.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// How long the previous key is still accepted after a rotation, as hours, minutes and
    /// seconds (`24h`, `90m`, `1h30m`, `45s`); at most 8760h (a year).
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+h)?([0-9]+m)?([0-9]+s)?$') && self != ''").message("previousValidFor must be hours, minutes and seconds such as 24h, 90m or 1h30m"))]
    #[x_kube(validation = Rule::new("!self.matches('^([0-9]+h)?([0-9]+m)?([0-9]+s)?$') || self == '' || duration(self) <= duration('8760h')").message("previousValidFor must be at most 8760h (a year)"))]
    #[schemars(length(min = 2, max = 32))]
    pub previous_valid_for: String,
}

impl RotationSpec {
    /// `previousValidFor` in seconds; `None` if it is not hours, minutes and seconds (the
    /// schema rejects that at apply time, so only a stored object from before could be).
    pub fn previous_valid_for_seconds(&self) -> Option<i64> {
        parse_hms(&self.previous_valid_for)
    }
}

/// Parses `1h30m`, `24h`, `45s`: each unit at most once, in that order.
pub fn parse_hms(s: &str) -> Option<i64> {
    let (mut total, mut digits, mut last_unit) = (0i64, None::<i64>, 0u8);
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            digits = Some(
                digits
                    .unwrap_or(0)
                    .checked_mul(10)?
                    .checked_add(i64::from(d))?,
            );
            continue;
        }
        let (rank, secs) = match c {
            'h' => (1, 3600),
            'm' => (2, 60),
            's' => (3, 1),
            _ => return None,
        };
        if rank <= last_unit {
            return None;
        }
        total = total.checked_add(digits.take()?.checked_mul(secs)?)?;
        last_unit = rank;
    }
    (digits.is_none() && last_unit > 0).then_some(total)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name in the ApiKey's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Data key in the Secret that holds the key material.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

pub fn default_secret_key() -> String {
    "key".to_string()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The policy the key is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The Secret that holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// First 12 hex digits of the key's HMAC-SHA256 under the namespace's `keylimit-hash-key`
    /// Secret (the start of its ConfigMap entry): enough to tell keys apart. It cannot be
    /// checked against a guessed key without that Secret; with it, it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// While Exhausted is True: when the key is admitted again (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhausted_until: Option<String>,
    /// Quota use for the current period, e.g. "month 9800/10000".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
    /// During a rotation's overlap: the previous key's fingerprint, still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_fingerprint: Option<String>,
    /// During a rotation's overlap: when the previous key stops working (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_valid_until: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// RateLimitPolicy
// ---------------------------------------------------------------------------------------------

/// Limits for the API keys bound to it, enforced by the sidecars of the selected workloads.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "keylimit.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced,
    status = "RateLimitPolicyStatus",
    shortname = "rlp",
    category = "keylimit",
    cel,
    // A policy's ConfigMaps are `keylimit-<name>` and `keylimit-<name>-keys-NNNN`
    // (render::main_config_map, render::shard_names). A name ending like a shard suffix would
    // make its main ConfigMap another policy's shard, and the two would overwrite each other.
    validation = Rule::new("!self.metadata.name.matches('-keys-[0-9]+$')").message("metadata.name must not end in '-keys-' and digits: the policy's ConfigMap keylimit-<name> would collide with the key shard ConfigMaps of another policy"),
    // keylimit-<name>-keys-0032, the longest ConfigMap name a policy gets, must stay a
    // valid object name (253 characters).
    validation = Rule::new("size(self.metadata.name) <= 234").message("metadata.name must be at most 234 characters so that its ConfigMap names (keylimit-<name>-keys-NNNN) fit in 253"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Keys", type_ = "integer", json_path = ".status.keys"),
    printcolumn(
        name = "Exhausted",
        type_ = "integer",
        json_path = ".status.keysExhausted"
    ),
    printcolumn(
        name = "Sidecars",
        type_ = "integer",
        json_path = ".status.sidecarsReporting",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.routes) || self.routes.all(r, self.routes.exists_one(s, s.name == r.name))").message("route names must be unique"))]
#[x_kube(validation = Rule::new("has(self.limits) || has(self.routes)").message("a policy needs limits or routes"))]
#[x_kube(validation = Rule::new("has(self.usage) || ((!has(self.routes) || self.routes.all(r, has(r.usage) || (!has(r.limits) || ((!has(r.limits.rates) || r.limits.rates.all(x, !has(x.tokens))) && (!has(r.limits.quotas) || r.limits.quotas.all(x, !has(x.tokens))))))) && (((!has(self.limits) || ((!has(self.limits.rates) || self.limits.rates.all(x, !has(x.tokens))) && (!has(self.limits.quotas) || self.limits.quotas.all(x, !has(x.tokens))))) && (!has(self.policyLimits) || ((!has(self.policyLimits.rates) || self.policyLimits.rates.all(x, !has(x.tokens))) && (!has(self.policyLimits.quotas) || self.policyLimits.quotas.all(x, !has(x.tokens)))))) || (has(self.routes) && self.routes.exists(r, has(r.usage)))))").message("limits counted in tokens need usage: where responses report their cost (on the policy, or on the route)"))]
pub struct RateLimitPolicySpec {
    /// Pods whose sidecars enforce this policy. Must not be empty.
    #[x_kube(validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)").message("selector must not be empty: give matchLabels or matchExpressions"))]
    pub selector: LabelSelector,
    /// How the sidecar reads the key from a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_source: Option<KeySourceSpec>,
    /// Limits that apply to each key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Limits that apply to all keys of the policy together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_limits: Option<LimitsSpec>,
    /// Hold requests up to a bound instead of rejecting them at once when a rate is exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    /// Per-route rules: their own limits, or a cost per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub routes: Option<Vec<RouteSpec>>,
    /// How request paths are compared with the routes' `pathPrefix`. Whatever is set here, the
    /// sidecar first normalises the path (RFC 3986 section 6: dot segments removed,
    /// percent-escapes of unreserved characters decoded, repeated slashes merged) and a prefix
    /// matches whole segments only (`/x` matches `/x` and `/x/y`, not `/xy`). The defaults
    /// over-match rather than under-match: a spelling the app may serve as the same resource
    /// is limited like it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_matching: Option<PathMatchingSpec>,
    /// Protocols a request may switch to with `Upgrade`, besides `websocket` (always
    /// allowed). Any other upgrade is dropped and the request forwarded as a plain request,
    /// so the sidecar never becomes an opaque tunnel nobody declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 64)))]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^[A-Za-z0-9!#$%&*+.^_`|~-]+$'))").message("upgradeProtocols must be protocol tokens such as 'connect-udp'"))]
    pub upgrade_protocols: Option<Vec<String>>,
    /// `Enforce` rejects; `DryRun` counts and reports but never rejects.
    #[serde(default)]
    pub mode: PolicyMode,
    /// The 429 response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<ResponseSpec>,
    /// Where counters live: `Local` (default, in each sidecar's memory) or `Redis` (exact
    /// across replicas, durable quotas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreSpec>,
    /// Protect the app itself: an adaptive concurrency limit that follows the app's latency,
    /// and at that limit requests of keys over their fair share get 503 (`error: shed`)
    /// first, so one noisy key cannot take the service from everyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_shedding: Option<LoadSheddingSpec>,
    /// Where a response reports what its request cost, for rates and quotas counted in
    /// `tokens` (for example an LLM API's `usage.total_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSpec>,
}

/// Fair load shedding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minConcurrency <= self.maxConcurrency").message("minConcurrency must not exceed maxConcurrency"))]
pub struct LoadSheddingSpec {
    /// Switch shedding off without losing the settings.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The adaptive limit never goes below this many requests in flight (default 4). The
    /// app's baseline latency is measured with the limit pinned here: at start, when the
    /// limit has sat here for 50 windows, and every 60 s.
    #[serde(default = "default_min_concurrency")]
    #[schemars(range(min = 1, max = 100000))]
    pub min_concurrency: u32,
    /// ... nor above this many (default 1000).
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrency: u32,
    /// How far the app's recent latency may rise over its baseline before the limit
    /// shrinks, in percent (default 150: up to 1.5 times the baseline).
    #[serde(default = "default_latency_tolerance")]
    #[schemars(range(min = 100, max = 1000))]
    pub latency_tolerance_percent: u32,
}

fn default_min_concurrency() -> u32 {
    4
}

fn default_max_concurrency() -> u32 {
    1000
}

fn default_latency_tolerance() -> u32 {
    150
}

/// Where the cost of a request is found once the upstream answers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.header) || has(self.jsonField)").message("usage needs a header or a jsonField"))]
pub struct UsageSpec {
    /// A response header with the cost as a non-negative integer (e.g. `x-usage-tokens`).
    /// Checked first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9!#$%&*+.^_`|~-]+$')").message("header must be an HTTP header name"))]
    pub header: Option<String>,
    /// A dot-separated path to a number in the JSON response body (e.g.
    /// `usage.total_tokens`). For a `text/event-stream` response, the path is looked up in
    /// every event's data and the last event that has it wins (an LLM stream's final usage
    /// chunk). Bodies are read as they pass, never buffered. A response without the field is
    /// charged its estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_$@-]+(\\\\.[A-Za-z0-9_$@-]+)*$')").message("jsonField must be dot-separated field names such as usage.total_tokens"))]
    pub json_field: Option<String>,
    /// Tokens reserved when a request is admitted, reconciled with the reported cost when
    /// the response completes. Without it nothing is reserved: a request is admitted while
    /// the key has any tokens left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<UsageEstimateSpec>,
}

/// The tokens reserved up front.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageEstimateSpec {
    /// A request header whose integer value is reserved (e.g. `x-max-tokens`), at most `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9!#$%&*+.^_`|~-]+$')").message("header must be an HTTP header name"))]
    pub header: Option<String>,
    /// Reserved when the header is absent or not set (default 0).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000000))]
    pub fixed: u64,
    /// The most the header may reserve (default 1,000,000), so that a caller cannot lock
    /// its own key for a long time with one header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub max: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type != 'Redis' || has(self.redis)").message("store type Redis needs the redis settings"))]
pub struct StoreSpec {
    #[serde(rename = "type")]
    pub type_: StoreType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StoreType {
    Local,
    Redis,
}

/// Where Redis is and how to log in. A password goes only to the server named in the same
/// Secret, so whoever may edit the policy (but not read the Secret) cannot redirect it to a
/// server of their own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.connectionSecretRef)").message("give exactly one of url (an open Redis) and connectionSecretRef (a Secret with url, password, ca.crt)"))]
#[x_kube(validation = Rule::new("!has(self.passwordSecretRef)").message("passwordSecretRef is refused: a password may only travel with a URL from the same Secret; put url (and password) in one Secret and name it in connectionSecretRef"))]
pub struct RedisSpec {
    /// `redis://host:port/db`, or `rediss://` for TLS, of a Redis that needs no password.
    /// For one that does, name a Secret in `connectionSecretRef` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('redis://') || self.startsWith('rediss://')").message("url must start with redis:// or rediss://"))]
    #[x_kube(validation = Rule::new("!self.contains('@')").message("put credentials in the Secret named by connectionSecretRef, not in the url"))]
    #[schemars(length(min = 9, max = 1024))]
    pub url: Option<String>,
    /// A Secret in the policy's namespace with data keys `url` (`redis://` or `rediss://`,
    /// may carry the password: `rediss://:pw@host:6380/0`), optional `password`, and optional
    /// `ca.crt` (PEM: a `rediss://` server must then chain to exactly this CA). The sidecar
    /// reads them from its environment, never from the policy's ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret_ref: Option<ConnectionSecretRef>,
    /// Refused by validation: it sent the password wherever `url` pointed. Kept in the schema
    /// so an old manifest fails with a message instead of losing the field silently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Prefix of this policy's Redis keys (default `keylimit:<namespace>:<policy>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub key_prefix: Option<String>,
    /// Longest a request waits for Redis before the fail mode applies (default 50 ms).
    #[serde(default = "default_redis_timeout")]
    #[schemars(range(min = 1, max = 5000))]
    pub timeout_millis: u64,
    /// What happens when Redis is unreachable or slow.
    #[serde(default)]
    pub fail_mode: FailModeSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionSecretRef {
    /// Secret name in the policy's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_redis_timeout() -> u64 {
    50
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailModeSpec {
    /// Admit while Redis is away.
    FailOpen,
    /// Refuse with 503 while Redis is away.
    FailClosed,
    /// Enforce in memory, each limit divided by the sidecar count, until Redis is back.
    #[default]
    LocalFallback,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PolicyMode {
    #[default]
    Enforce,
    DryRun,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeySourceSpec {
    /// Header that carries the key (default `X-API-Key`; always read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9-]+$')").message("header must be a valid HTTP header name"))]
    pub header: Option<String>,
    /// Also accept `Authorization: Bearer <key>` (default true).
    #[serde(default = "yes")]
    pub bearer: bool,
    /// Query parameter that carries the key. Opt-in: keys in URLs end up in access logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub query_param: Option<String>,
    /// Remove the key from the request before it reaches the app.
    #[serde(default)]
    pub strip: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.rates) && size(self.rates) > 0) || (has(self.quotas) && size(self.quotas) > 0) || has(self.concurrency)").message("limits must set at least one of rates, quotas or concurrency"))]
pub struct LimitsSpec {
    /// Rate windows, all enforced at once (e.g. 10/second and 500/minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(s, s.name == r.name))").message("rate names must be unique"))]
    pub rates: Option<Vec<RateSpec>>,
    /// Long quotas (day/week/month).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(q, self.exists_one(s, s.name == q.name))").message("quota names must be unique"))]
    pub quotas: Option<Vec<QuotaSpec>>,
    /// Maximum requests in flight at once per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub concurrency: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.requests) != has(self.tokens)").message("a rate counts either requests or tokens: set exactly one"))]
pub struct RateSpec {
    /// Name of the window, shown in headers and status (e.g. `per-minute`).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("name must be lowercase alphanumerics and '-'"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Requests admitted per `per`, paced evenly (GCRA): one every `per / requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000))]
    pub requests: Option<u64>,
    /// Tokens per `per`, as the responses report them (the policy's or the route's `usage`), instead of
    /// requests. A request is admitted while the key has tokens left; its reported cost is
    /// charged when the response completes and may put the key into debt, which it pays
    /// back at this rate before it is admitted again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000000u64))]
    pub tokens: Option<u64>,
    /// The window unit.
    pub per: RateUnit,
    /// Extra requests (or tokens) that may be spent at once on top of that pace: up to
    /// `burst + 1` back to back. No window of one `per` ever admits more than
    /// `requests + burst`; `burst: requests - 1` lets a whole window's worth arrive at once.
    /// Default 0 for requests; for tokens `tokens - 1`, since one response spends many
    /// tokens at once (with 0, a 500-token response would make the key wait 500 intervals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000000000u64))]
    pub burst: Option<u64>,
}

impl RateSpec {
    /// The count and whether it is in tokens (`None` only for an object the CEL rule would
    /// refuse: neither or both set).
    pub fn counted(&self) -> Option<(u64, bool)> {
        counted(self.requests, self.tokens)
    }

    /// `burst`, or its default for the rate's unit.
    pub fn burst_or_default(&self) -> u64 {
        match (self.burst, self.tokens) {
            (Some(b), _) => b,
            (None, Some(t)) => t.saturating_sub(1),
            (None, None) => 0,
        }
    }
}

impl QuotaSpec {
    /// As [`RateSpec::counted`].
    pub fn counted(&self) -> Option<(u64, bool)> {
        counted(self.requests, self.tokens)
    }
}

fn counted(requests: Option<u64>, tokens: Option<u64>) -> Option<(u64, bool)> {
    match (requests, tokens) {
        (Some(n), None) => Some((n, false)),
        (None, Some(n)) => Some((n, true)),
        _ => None,
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RateUnit {
    Second,
    Minute,
    Hour,
    Day,
}

impl RateUnit {
    pub fn seconds(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3_600,
            RateUnit::Day => 86_400,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.requests) != has(self.tokens)").message("a quota counts either requests or tokens: set exactly one"))]
pub struct QuotaSpec {
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("name must be lowercase alphanumerics and '-'"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Requests per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000000u64))]
    pub requests: Option<u64>,
    /// Tokens per period, as the responses report them (the policy's or the route's `usage`). A key whose
    /// last response took it over the quota is refused until the period ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000000000u64))]
    pub tokens: Option<u64>,
    pub period: QuotaPeriodSpec,
    /// `Calendar` resets at the start of each UTC day/week (Monday)/month; `Rolling` one
    /// period after the first request of the window.
    #[serde(default)]
    pub alignment: QuotaAlignmentSpec,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum QuotaPeriodSpec {
    Hour,
    Day,
    Week,
    Month,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum QuotaAlignmentSpec {
    #[default]
    Calendar,
    Rolling,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleSpec {
    /// Longest a request is held waiting for the rate to admit it.
    #[schemars(range(min = 1, max = 30000))]
    pub max_delay_millis: u64,
    /// Requests held at once per sidecar; more are rejected.
    #[serde(default = "default_queue")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_queue: u32,
}

fn default_queue() -> u32 {
    100
}

/// See `RateLimitPolicySpec::path_matching`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathMatchingSpec {
    /// Compare paths with route prefixes case-sensitively (default false: `/Admin` is limited
    /// like `/admin`, because many apps and frameworks serve both alike).
    #[serde(default)]
    pub case_sensitive: bool,
    /// `;` parameters inside path segments (`/a;v=1/b`). `Ignore` (default): left out when
    /// matching (`/a;v=1/b` matches the prefix `/a/b`) and forwarded unchanged. `Reject`:
    /// a request whose path has any `;` is answered 400.
    #[serde(default)]
    pub matrix_parameters: MatrixParametersSpec,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MatrixParametersSpec {
    #[default]
    Ignore,
    Reject,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.limits) || self.cost != 1 || has(self.usage)").message("a route needs its own limits, a cost other than 1, or its own usage"))]
#[x_kube(validation = Rule::new("self.cost != 0 || !has(self.limits)").message("a route with cost 0 is free: it is charged nothing against rates and quotas, so its own limits would never count; remove limits or set a cost"))]
pub struct RouteSpec {
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("name must be lowercase alphanumerics and '-'"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("pathPrefix must start with '/'"))]
    #[schemars(length(min = 1, max = 1024))]
    pub path_prefix: String,
    /// HTTP methods the rule applies to; all when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.all(m, m in ['GET','HEAD','POST','PUT','PATCH','DELETE','OPTIONS','CONNECT','TRACE'])").message("methods must be HTTP methods in upper case"))]
    #[schemars(length(max = 9))]
    pub methods: Option<Vec<String>>,
    /// How many units of each rate and quota (the key's and the policy's) one request costs
    /// (default 1). `0` makes the route free: its requests are charged nothing against rates
    /// and quotas, but still count towards `concurrency` while in flight. A free route cannot
    /// have its own `limits`, which would never count.
    #[serde(default = "default_cost")]
    #[schemars(range(min = 0, max = 1000000))]
    pub cost: u64,
    /// Limits for this route only, per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Where this route's responses report their cost, in place of the policy's `usage`
    /// (for example an embeddings route that reports `usage.prompt_tokens`). Requests on a
    /// route without it use the policy's; with neither, they cost no tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSpec>,
}

fn default_cost() -> u64 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResponseSpec {
    /// Message in the 429 body (default "Keys Temporarily Exhausted").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub message: Option<String>,
    /// Which limit headers responses carry. `Full` (default): `RateLimit`, `RateLimit-Policy`
    /// and `X-RateLimit-Limit`/`-Remaining`/`-Reset` on every response. `Draft`: only the IETF
    /// draft's `RateLimit` and `RateLimit-Policy`. `OnRefusal`: none on forwarded responses,
    /// the full set on a 429. A 429 always has `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_headers: Option<LimitHeadersSpec>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LimitHeadersSpec {
    #[default]
    Full,
    Draft,
    OnRefusal,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicyStatus {
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// ApiKeys bound to the policy with a usable Secret.
    #[serde(default)]
    pub keys: i64,
    /// Keys currently exhausted on at least one sidecar.
    #[serde(default)]
    pub keys_exhausted: i64,
    /// Sidecars whose report is fresh.
    #[serde(default)]
    pub sidecars_reporting: i64,
    /// ConfigMaps holding the data-plane document (first is the main one).
    #[serde(default)]
    pub config_maps: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::{mk_apikey, mk_policy};

    fn rejects(p: &RateLimitPolicy, fragment: &str) {
        let err = p.validate_cel().expect_err("manifest should be rejected");
        let text = err.to_string();
        assert!(text.contains(fragment), "expected {fragment:?} in {text:?}");
    }

    #[test]
    fn valid_policy_passes_cel() {
        mk_policy("p").validate_cel().unwrap();
    }

    fn with_redis(url: Option<&str>, conn: Option<&str>, pw: Option<&str>) -> RateLimitPolicy {
        let mut p = mk_policy("p");
        p.spec.store = Some(StoreSpec {
            type_: StoreType::Redis,
            redis: Some(RedisSpec {
                url: url.map(Into::into),
                connection_secret_ref: conn.map(|n| ConnectionSecretRef { name: n.into() }),
                password_secret_ref: pw.map(|n| SecretKeyRef {
                    name: n.into(),
                    key: "password".into(),
                }),
                key_prefix: None,
                timeout_millis: 50,
                fail_mode: FailModeSpec::FailClosed,
            }),
        });
        p
    }

    #[test]
    fn a_redis_password_travels_only_with_a_url_from_the_same_secret() {
        // Allowed: the connection Secret alone, or an open Redis by URL.
        with_redis(None, Some("redis-conn"), None)
            .validate_cel()
            .unwrap();
        with_redis(Some("rediss://redis.ns.svc:6380/0"), None, None)
            .validate_cel()
            .unwrap();
        // A policy URL next to the Secret: which would win is exactly the foot-gun.
        rejects(
            &with_redis(Some("redis://evil:6379"), Some("redis-conn"), None),
            "exactly one of url",
        );
        // A password Secret with the Secret, or with a plain URL the author chose.
        rejects(
            &with_redis(None, Some("redis-conn"), Some("redis-auth")),
            "passwordSecretRef is refused",
        );
        rejects(
            &with_redis(Some("redis://evil:6379"), None, Some("redis-auth")),
            "passwordSecretRef is refused",
        );
        rejects(&with_redis(None, None, None), "exactly one of url");
        rejects(
            &with_redis(Some("redis://:pw@host:6379"), None, None),
            "not in the url",
        );
    }

    #[test]
    fn upgrade_protocols_must_be_tokens() {
        let mut p = mk_policy("p");
        p.spec.upgrade_protocols = Some(vec!["connect-udp".into(), "h2c".into()]);
        p.validate_cel().unwrap();
        p.spec.upgrade_protocols = Some(vec!["web socket".into()]);
        rejects(&p, "upgradeProtocols must be protocol tokens");
    }

    #[test]
    fn empty_selector_is_rejected() {
        let mut p = mk_policy("p");
        p.spec.selector = LabelSelector::default();
        rejects(&p, "selector must not be empty");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let mut p = mk_policy("p");
        let limits = p.spec.limits.as_mut().unwrap();
        let r = limits.rates.as_ref().unwrap()[0].clone();
        limits.rates.as_mut().unwrap().push(r);
        rejects(&p, "rate names must be unique");

        let mut p = mk_policy("p");
        let route = RouteSpec {
            usage: None,
            name: "a".into(),
            path_prefix: "/a".into(),
            methods: None,
            cost: 2,
            limits: None,
        };
        p.spec.routes = Some(vec![route.clone(), route]);
        rejects(&p, "route names must be unique");
    }

    #[test]
    fn empty_limits_and_bad_routes_are_rejected() {
        let mut p = mk_policy("p");
        p.spec.limits = Some(LimitsSpec::default());
        rejects(&p, "limits must set at least one");

        let mut p = mk_policy("p");
        p.spec.routes = Some(vec![RouteSpec {
            usage: None,
            name: "a".into(),
            path_prefix: "nope".into(),
            methods: Some(vec!["get".into()]),
            cost: 1,
            limits: None,
        }]);
        rejects(&p, "pathPrefix must start with '/'");
        rejects(&p, "methods must be HTTP methods");
        rejects(&p, "a route needs its own limits, a cost");
    }

    fn route(cost: u64, limits: Option<LimitsSpec>) -> RouteSpec {
        RouteSpec {
            usage: None,
            name: "r".into(),
            path_prefix: "/r".into(),
            methods: None,
            cost,
            limits,
        }
    }

    #[test]
    fn token_limits_need_usage_on_the_policy_or_a_route() {
        let tokens = || {
            Some(LimitsSpec {
                rates: Some(vec![RateSpec {
                    name: "t".into(),
                    requests: None,
                    tokens: Some(1_000),
                    per: RateUnit::Minute,
                    burst: None,
                }]),
                ..Default::default()
            })
        };
        let usage = || {
            Some(UsageSpec {
                header: Some("x-usage-tokens".into()),
                json_field: None,
                estimate: None,
            })
        };
        // A route's own token limits, with no usage anywhere.
        let mut p = mk_policy("p");
        p.spec.routes = Some(vec![route(1, tokens())]);
        rejects(&p, "limits counted in tokens need usage");
        // ... metered by the route's usage, or the policy's.
        p.spec.routes = Some(vec![RouteSpec {
            usage: usage(),
            ..route(1, tokens())
        }]);
        p.validate_cel().unwrap();
        p.spec.routes = Some(vec![route(1, tokens())]);
        p.spec.usage = usage();
        p.validate_cel().unwrap();
        // Policy-wide token limits metered by one route's usage; a route may have only usage.
        let mut p = mk_policy("p");
        p.spec.limits = tokens();
        rejects(&p, "limits counted in tokens need usage");
        p.spec.routes = Some(vec![RouteSpec {
            usage: usage(),
            ..route(1, None)
        }]);
        p.validate_cel().unwrap();
    }

    #[test]
    fn free_routes_are_allowed_but_not_with_their_own_limits() {
        let concurrency = || {
            Some(LimitsSpec {
                concurrency: Some(2),
                ..Default::default()
            })
        };
        let mut p = mk_policy("p");
        p.spec.routes = Some(vec![route(0, None)]);
        p.validate_cel().unwrap();
        p.spec.routes = Some(vec![route(0, concurrency())]);
        rejects(&p, "a route with cost 0 is free");
        // The older rule still holds, and a priced route may have limits.
        p.spec.routes = Some(vec![route(1, None)]);
        rejects(&p, "a route needs its own limits, a cost");
        p.spec.routes = Some(vec![route(1, concurrency())]);
        p.validate_cel().unwrap();
        p.spec.routes = Some(vec![route(3, concurrency())]);
        p.validate_cel().unwrap();
    }

    #[test]
    fn path_matching_defaults_and_values() {
        let p: RateLimitPolicySpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"a": "b"}},
            "limits": {"concurrency": 1},
            "pathMatching": {}
        }))
        .unwrap();
        assert_eq!(p.path_matching, Some(PathMatchingSpec::default()));
        let m = PathMatchingSpec::default();
        assert!(!m.case_sensitive);
        assert_eq!(m.matrix_parameters, MatrixParametersSpec::Ignore);
        let m: PathMatchingSpec = serde_json::from_value(
            serde_json::json!({"caseSensitive": true, "matrixParameters": "Reject"}),
        )
        .unwrap();
        assert_eq!(m.matrix_parameters, MatrixParametersSpec::Reject);
        assert!(m.case_sensitive);
        let mut p = mk_policy("p");
        p.spec.path_matching = Some(m);
        p.validate_cel().unwrap();
    }

    #[test]
    fn policy_names_that_collide_with_shards_are_rejected() {
        for bad in [
            "gold-keys-0001",
            "gold-keys-1",
            "a-keys-0032",
            "x-keys-99999",
        ] {
            rejects(&mk_policy(bad), "must not end in '-keys-' and digits");
        }
        for good in [
            "gold",
            "keys-0001",
            "gold-keys",
            "gold-keys-x1",
            "gold-keys-0001a",
        ] {
            mk_policy(good).validate_cel().unwrap();
        }
        // The longest name allowed still gives valid ConfigMap names, and one more does not.
        let limit = 253
            - crate::render::shard_names("", crate::webhook::MAX_SHARDS)
                .0
                .len();
        assert_eq!(limit, 234, "update the CEL rule on metadata.name length");
        let longest = "a".repeat(limit);
        mk_policy(&longest).validate_cel().unwrap();
        let (shard, _) = crate::render::shard_names(&longest, crate::webhook::MAX_SHARDS);
        assert_eq!(shard.len(), 253);
        rejects(&mk_policy(&"a".repeat(limit + 1)), "at most 234 characters");
    }

    #[test]
    fn no_two_policies_share_a_configmap_name() {
        // What the CEL rule above guarantees, checked on the names render produces: among
        // names it admits, main and shard ConfigMap names never coincide across policies.
        let names = ["a", "a-keys", "a-keys-x", "keys-0001", "a-b", "a-key-0001"];
        let mut seen = std::collections::BTreeMap::new();
        for n in names {
            mk_policy(n).validate_cel().unwrap();
            let mut cms = vec![crate::render::main_config_map(n)];
            cms.extend(
                (1..=crate::webhook::MAX_SHARDS).map(|i| crate::render::shard_names(n, i).0),
            );
            for cm in cms {
                if let Some(other) = seen.insert(cm.clone(), n) {
                    panic!("{cm} belongs to both {other} and {n}");
                }
            }
        }
        // And the collision the rule exists for is real.
        assert_eq!(
            crate::render::main_config_map("a-keys-0001"),
            crate::render::shard_names("a", 1).0
        );
    }

    #[test]
    fn key_source_header_must_be_a_header_name() {
        let mut p = mk_policy("p");
        p.spec.key_source = Some(KeySourceSpec {
            header: Some("X Bad".into()),
            bearer: true,
            query_param: None,
            strip: false,
        });
        rejects(&p, "valid HTTP header name");
    }

    #[test]
    fn bad_window_name_is_rejected() {
        let mut p = mk_policy("p");
        p.spec.limits.as_mut().unwrap().rates.as_mut().unwrap()[0].name = "Per Minute".into();
        rejects(&p, "lowercase alphanumerics");
    }

    #[test]
    fn apikey_expiry_must_be_a_timestamp() {
        let mut k = mk_apikey("a", "p");
        k.validate_cel().unwrap();
        k.spec.expires_at = Some("2027-01-01T00:00:00Z".into());
        k.validate_cel().unwrap();
        k.spec.expires_at = Some("next tuesday".into());
        assert!(k.validate_cel().is_err());
    }

    /// `crds/` must be what the types generate; CI also checks it with `git diff`.
    #[test]
    fn checked_in_crds_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for (file, yaml) in crate::crd_manifests().unwrap() {
            let on_disk = std::fs::read_to_string(dir.join(&file)).unwrap();
            assert_eq!(
                on_disk,
                format!("{}{yaml}", crate::CRD_HEADER),
                "crds/{file} is stale: run `cargo run -p keylimit-operator -- crd`"
            );
        }
    }
}
