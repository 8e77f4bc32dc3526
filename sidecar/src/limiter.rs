//! The decision core: rate windows (GCRA), quotas, concurrency and throttling, all per key
//! and optionally per policy, evaluated together. This module holds what every store shares:
//! the compiled rules ([`LimitSet`]), what is asked ([`Check`]) and answered ([`Decision`],
//! [`Refusal`], [`Permit`]). The stores that keep the state and decide are [`local`] (in
//! process, sharded) and [`redis`] (shared by every replica); neither reaches into the other's
//! internals, and nothing here names either.
//!
//! State is keyed by `(key id, limit id)`. A limit's id is a fingerprint of its scope, name and
//! parameters, so after a config reload every limit that did not change finds its old counters
//! and every limit that did starts fresh, without any migration step.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use keylimit_dataplane::{Exhaustion, ExhaustionReason, Limits, QuotaAlignment, QuotaPeriod, Unit};
use sha2::{Digest, Sha256};

use clock::NANOS_PER_SEC;

pub mod clock;
pub mod local;
pub mod redis;
pub mod shed;
pub mod window;

/// Key id under which policy-wide limits keep their state. Real key ids are the first 8 bytes
/// of a sha256, and the index refuses a key whose id equals this one.
pub const POLICY_SCOPE_ID: u64 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Rate,
    Quota,
    Concurrency,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Rate => "rate",
            LimitKind::Quota => "quota",
            LimitKind::Concurrency => "concurrency",
        }
    }
}

/// A compiled GCRA window: one request every `interval_ns`, up to `burst + 1` at once.
#[derive(Debug, Clone)]
pub struct RateRule {
    pub name: Arc<str>,
    /// The count per period, in `unit`s.
    pub requests: u64,
    pub period_s: u64,
    pub burst: u64,
    pub unit: Unit,
    id: u64,
    pub(crate) interval_ns: u64,
    /// How far the theoretical arrival time may run ahead of now: `(burst + 1) * interval`.
    pub(crate) tolerance_ns: u64,
}

impl RateRule {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This window refused at `now_ns` until `reset_at_ns` (wall time; every store reports
    /// it the same way).
    pub(crate) fn refusal(&self, now_ns: u64, reset_at_ns: u64) -> Refusal {
        Refusal {
            reason: ExhaustionReason::RateLimited,
            kind: LimitKind::Rate,
            name: self.name.clone(),
            limit: self.requests,
            unit: self.unit,
            window_s: self.period_s,
            now_ns,
            reset_at_ns,
            dry_run: false,
        }
    }

    fn new(name: Arc<str>, requests: u64, period_s: u64, burst: u64, unit: Unit, id: u64) -> Self {
        let period_ns = period_s.saturating_mul(NANOS_PER_SEC);
        // Rounded up so that `requests` intervals never fit inside one period: the
        // window then admits at most requests + burst, never one more.
        let interval_ns = period_ns.div_ceil(requests.max(1)).max(1);
        RateRule {
            name,
            requests,
            period_s,
            burst,
            unit,
            id,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst.saturating_add(1)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuotaRule {
    pub name: Arc<str>,
    /// The count per period, in `unit`s.
    pub requests: u64,
    pub period: QuotaPeriod,
    pub alignment: QuotaAlignment,
    pub unit: Unit,
    id: u64,
}

impl QuotaRule {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What the response headers say about this quota with `used` spent and `reset_secs`
    /// until its window ends (every store reports it the same way).
    pub(crate) fn status(&self, used: u64, reset_secs: u64) -> LimitStatus {
        LimitStatus {
            kind: LimitKind::Quota,
            unit: self.unit,
            id: self.id,
            limit: self.requests,
            window_s: window::nominal_secs(self.period),
            remaining: self.requests.saturating_sub(used),
            reset_secs,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConcurrencyRule {
    pub max: u32,
    id: u64,
}

impl ConcurrencyRule {
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The limits of one scope (a key, a route for a key, or the policy as a whole), compiled.
#[derive(Debug, Clone, Default)]
pub struct LimitSet {
    pub rates: Vec<RateRule>,
    pub quotas: Vec<QuotaRule>,
    pub concurrency: Option<ConcurrencyRule>,
    /// Whether a rate or quota here counts tokens (settled after the response).
    pub counts_tokens: bool,
}

/// The parameters a limit's id covers. A token limit adds a marker, so it never shares state
/// with a request limit of the same name and size; a request limit's id is what it was before
/// units existed, so upgrading keeps its counters (local and in Redis).
fn with_unit(mut params: Vec<u64>, unit: Unit) -> Vec<u64> {
    if unit == Unit::Tokens {
        params.push(u64::from_le_bytes(*b"tokens\0\0"));
    }
    params
}

fn fingerprint(scope: &str, kind: LimitKind, name: &str, params: &[u64]) -> u64 {
    // sha256 rather than std's SipHash: the id names Redis keys, so it must be the same in
    // every sidecar of the fleet and across releases (std documents no such guarantee).
    // Only computed when a config is compiled, never per request. Strings are
    // length-prefixed so ("ab","c") and ("a","bc") cannot collide.
    let mut h = Sha256::new();
    for part in [scope, kind.as_str(), name] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    for p in params {
        h.update(p.to_le_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // 0 marks an empty place in the slot table; 1 in 2^64 fingerprints moves to 1.
    u64::from_le_bytes(b).max(1)
}

fn period_code(p: QuotaPeriod) -> u64 {
    match p {
        QuotaPeriod::Minute => 1,
        QuotaPeriod::Hour => 2,
        QuotaPeriod::Day => 3,
        QuotaPeriod::Week => 4,
        QuotaPeriod::Month => 5,
    }
}

impl LimitSet {
    /// `scope` separates otherwise identical limits of different scopes (key vs route).
    pub fn compile(limits: &Limits, scope: &str) -> Self {
        let rates = limits
            .rates
            .iter()
            .map(|r| {
                RateRule::new(
                    Arc::from(r.name.as_str()),
                    r.requests,
                    r.period_seconds,
                    r.burst,
                    r.unit,
                    fingerprint(
                        scope,
                        LimitKind::Rate,
                        &r.name,
                        &with_unit(vec![r.requests, r.period_seconds, r.burst], r.unit),
                    ),
                )
            })
            .collect();
        let quotas = limits
            .quotas
            .iter()
            .map(|q| QuotaRule {
                name: Arc::from(q.name.as_str()),
                requests: q.requests,
                period: q.period,
                alignment: q.alignment,
                unit: q.unit,
                id: fingerprint(
                    scope,
                    LimitKind::Quota,
                    &q.name,
                    &with_unit(
                        vec![
                            q.requests,
                            period_code(q.period),
                            matches!(q.alignment, QuotaAlignment::Rolling) as u64,
                        ],
                        q.unit,
                    ),
                ),
            })
            .collect();
        let concurrency = limits.concurrency.map(|max| ConcurrencyRule {
            max,
            id: fingerprint(scope, LimitKind::Concurrency, "", &[u64::from(max)]),
        });
        LimitSet {
            rates,
            quotas,
            concurrency,
            counts_tokens: limits.counts_tokens(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rates.is_empty() && self.quotas.is_empty() && self.concurrency.is_none()
    }

    /// The name of this set's rate or quota with `id` ([`LimitStatus::id`]).
    pub fn name_of(&self, id: u64) -> Option<&Arc<str>> {
        self.rates
            .iter()
            .find(|r| r.id == id)
            .map(|r| &r.name)
            .or_else(|| self.quotas.iter().find(|q| q.id == id).map(|q| &q.name))
    }

    /// This set with every count divided by `n` (at least 1 each): what one of `n` sidecars
    /// may admit on its own while the shared store is away. Rounded down so the fleet stays
    /// at or under the declared limit; ids are kept (the copy lives in its own limiter).
    pub fn divided(&self, n: u32) -> LimitSet {
        let n = u64::from(n.max(1));
        let share = |v: u64| (v / n).max(1);
        LimitSet {
            rates: self
                .rates
                .iter()
                .map(|r| {
                    RateRule::new(
                        r.name.clone(),
                        share(r.requests),
                        r.period_s,
                        r.burst / n,
                        r.unit,
                        r.id,
                    )
                })
                .collect(),
            quotas: self
                .quotas
                .iter()
                .map(|q| QuotaRule {
                    requests: share(q.requests),
                    ..q.clone()
                })
                .collect(),
            concurrency: self.concurrency.as_ref().map(|c| ConcurrencyRule {
                max: u32::try_from(share(u64::from(c.max))).unwrap_or(u32::MAX),
                id: c.id,
            }),
            counts_tokens: self.counts_tokens,
        }
    }
}

/// Why a request was (or in dry-run would have been) refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: ExhaustionReason,
    pub kind: LimitKind,
    pub name: Arc<str>,
    pub limit: u64,
    /// What `limit` counts.
    pub unit: Unit,
    pub window_s: u64,
    pub now_ns: u64,
    /// When the refused request would be admitted (rate), the window resets (quota), or a
    /// retry is worth trying (concurrency, throttle queue).
    pub reset_at_ns: u64,
    pub dry_run: bool,
}

impl Refusal {
    /// Delta-seconds for `Retry-After`: rounded up, at least 1 so clients never spin.
    pub fn retry_after_secs(&self) -> u64 {
        self.reset_at_ns
            .saturating_sub(self.now_ns)
            .div_ceil(NANOS_PER_SEC)
            .max(1)
    }

    pub fn reset_at_secs(&self) -> i64 {
        i64::try_from(self.reset_at_ns.div_ceil(NANOS_PER_SEC)).unwrap_or(i64::MAX)
    }

    pub fn message(&self) -> String {
        match self.reason {
            ExhaustionReason::RateLimited => format!(
                "rate {} {}{}/{}s exceeded",
                self.name,
                self.limit,
                self.unit_suffix(),
                self.window_s
            ),
            ExhaustionReason::QuotaExceeded => {
                format!(
                    "quota {} {}{} exceeded",
                    self.name,
                    self.limit,
                    self.unit_suffix()
                )
            }
            ExhaustionReason::ConcurrencyLimited => {
                format!("concurrency {} in flight exceeded", self.limit)
            }
            ExhaustionReason::Throttled => {
                format!("throttle queue of {} requests is full", self.limit)
            }
            ExhaustionReason::Shed => format!(
                "shed: the app is at its concurrency limit of {} and this key is over its fair share",
                self.limit
            ),
        }
    }

    /// Request limits read as before (`10/60s`); token limits say so (`100000 tokens/60s`).
    fn unit_suffix(&self) -> &'static str {
        match self.unit {
            Unit::Requests => "",
            Unit::Tokens => " tokens",
        }
    }

    pub fn to_exhaustion(&self) -> Exhaustion {
        Exhaustion {
            reason: self.reason,
            limit: self.name.to_string(),
            message: self.message(),
            reset_at: self.reset_at_secs(),
            dry_run: self.dry_run,
        }
    }
}

/// The most restrictive limit after an admitted request, for the response headers.
///
/// It names its limit by id, not by name: the name is looked up only when the headers are
/// written ([`LimitSet::name_of`], or precomputed header values), so a decision takes and
/// drops no reference-counted handle (two atomic operations, a quarter of a hot decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitStatus {
    pub kind: LimitKind,
    pub unit: Unit,
    /// [`RateRule::id`] or [`QuotaRule::id`].
    pub id: u64,
    pub limit: u64,
    pub window_s: u64,
    pub remaining: u64,
    /// Seconds until the limit is fully available again.
    pub reset_secs: u64,
}

impl LimitStatus {
    /// Fewer left wins; between units (requests against tokens) the smaller share of its
    /// limit left wins, since 5 requests and 5 tokens are not comparable.
    pub(crate) fn more_restrictive_than(&self, other: &LimitStatus) -> bool {
        if self.unit != other.unit {
            let mine = u128::from(self.remaining) * u128::from(other.limit);
            let theirs = u128::from(other.remaining) * u128::from(self.limit);
            return mine < theirs;
        }
        (self.remaining, std::cmp::Reverse(self.reset_secs))
            < (other.remaining, std::cmp::Reverse(other.reset_secs))
    }
}

/// Everything the limiter needs to decide one request.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    pub key_id: u64,
    pub key_limits: &'a LimitSet,
    pub route_limits: Option<&'a LimitSet>,
    pub policy_limits: Option<&'a LimitSet>,
    pub cost: u64,
    /// Tokens reserved now for limits counted in tokens (the policy's estimate), reconciled
    /// with the response's reported cost by [`local::Limiter::settle`]. Request limits never
    /// read it.
    pub reserve: u64,
    pub throttle: Option<ThrottleRule>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleRule {
    pub max_delay_ns: u64,
    pub max_queue: u32,
}

#[derive(Debug)]
pub enum Decision {
    Allow(Admission),
    Refuse(Refusal),
}

#[derive(Debug, Default)]
pub struct Admission {
    /// How long to hold the request before forwarding it (throttle); 0 almost always.
    pub delay_ns: u64,
    pub status: Option<LimitStatus>,
    /// Concurrency slots; released when dropped.
    pub permit: Option<Permit>,
    /// A slot in the throttle queue, held only while the request waits.
    pub queued: Option<QueueSlot>,
    /// Set in DryRun when the request would have been refused. Boxed because it is rare:
    /// inline, it made every decision a 192-byte value copied by `memcpy` on its way out
    /// (28 % of a hot key's decision in `perf` samples).
    pub dry_run_refusal: Option<Box<Refusal>>,
}

/// A store that keeps limit state and decides [`Check`]s against it: the in-process store and
/// the Redis one each implement this, and the core depends on neither. The proxy picks the
/// store per policy (the document's `store`) and calls it statically, so the in-process path
/// pays for no dynamic dispatch or boxed future.
pub trait DecisionStore {
    /// What a decision needs besides the check: nothing in process; for a shared store, the
    /// policy's connection settings and the sidecar's own view (usage, throttle queue).
    type With<'a>
    where
        Self: 'a;

    /// Decides `c` as of `mono_ns`, a monotonic reading the caller took for this request (a
    /// store with its own clock may ignore it). `None`: the store cannot decide and the
    /// policy says refuse (503).
    fn decide_check<'a>(
        &'a self,
        with: Self::With<'a>,
        c: &'a Check<'a>,
        mono_ns: u64,
    ) -> impl std::future::Future<Output = Option<Decision>> + Send + 'a;
}

/// Concurrency slots held by one admitted request; released when dropped (response end or
/// client abort). Where the slots live is the store's business: a store that names them by
/// `(key id, limit id)` and releases them in place hands out [`Permit::slots`] (no allocation
/// per request), any other hands over a guard whose drop releases them ([`Permit::guard`]).
#[derive(Debug)]
pub struct Permit(Held);

#[derive(Debug)]
enum Held {
    Slots {
        store: Arc<dyn ReleaseSlots>,
        slots: HeldSlots,
    },
    /// Never read: dropping it is what releases the slots.
    Guard {
        _guard: Box<dyn std::fmt::Debug + Send + Sync>,
    },
}

impl Permit {
    /// Slots `store` releases in place when this permit drops.
    pub fn slots(store: Arc<dyn ReleaseSlots>, slots: HeldSlots) -> Self {
        Permit(Held::Slots { store, slots })
    }

    /// Slots released by dropping `guard` (for example leases in Redis, released in the
    /// background and expiring on their own otherwise).
    pub fn guard(guard: impl std::fmt::Debug + Send + Sync + 'static) -> Self {
        Permit(Held::Guard {
            _guard: Box::new(guard),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Held::Slots { store, slots } = &self.0 {
            store.release(slots);
        }
    }
}

/// The concurrency slots one admitted request holds, by limit id: the key scope's (the key's
/// own and its route's) and the policy scope's. 0 is no slot (limit ids are never 0), which
/// keeps the permit, and so every decision, small enough to move without a `memcpy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSlots {
    pub key_id: u64,
    pub key_slots: [u64; 2],
    pub policy_slot: u64,
}

/// A store whose concurrency slots a [`Permit`] releases in place.
pub trait ReleaseSlots: std::fmt::Debug + Send + Sync {
    fn release(&self, slots: &HeldSlots);
}

/// A place in the throttle queue; the count drops when the held request is released.
#[derive(Debug)]
pub struct QueueSlot(Arc<AtomicU32>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// For maps keyed by key id. Key ids are already uniformly distributed (sha256 bytes) and only
/// keys from the index get state, so an attacker cannot choose them: a multiply-mix is enough
/// and keeps the lookup cheap compared with SipHash.
#[derive(Debug, Clone, Copy, Default)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 31)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BuildMix;

impl BuildHasher for BuildMix {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(0)
    }
}
