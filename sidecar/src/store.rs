//! The shared limit store: Redis, for limits that hold across every replica and quotas that
//! survive restarts.
//!
//! Every decision is one atomic server-side script per scope (the key, then the policy-wide
//! limits if any): it checks all of the scope's rate windows (GCRA, same arithmetic as
//! [`crate::limiter`]), quotas and concurrency leases and charges them only if all pass.
//! `EVALSHA` is tried first and the script loaded on `NOSCRIPT` (a restarted Redis).
//!
//! Key layout (Redis Cluster/Sentinel friendly): every counter of one key shares the hash
//! tag `{<prefix>:<key id>}`, so one script touches one slot:
//! `{<prefix>:<key id hex>}:q:<limit id hex>` (hash: count `c`, window end `e`),
//! `…:r:<limit id hex>` (string: GCRA theoretical arrival time) and `…:c:<limit id hex>`
//! (sorted set of lease ids scored by their expiry). Limit ids are stable fingerprints of
//! the limit's scope, name and parameters, so every sidecar (and every release) agrees.
//!
//! Times in Redis are microseconds since the epoch (exact in a Lua double for centuries);
//! `now` comes from the sidecar's clock, as in local mode, so quota window ends are computed
//! in Rust (calendar rules) and passed in.
//!
//! Failure handling: every call is bounded by the policy's `timeoutMs`. The first failure
//! marks the store down; from then on decisions go straight to the fail mode without
//! touching Redis (no request waits on a reconnect) while a background probe PINGs through
//! the same connection manager, which reconnects on its own. The first PONG marks the store
//! up again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use keylimit_dataplane::{ExhaustionReason, FailMode, RedisStore};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use crate::clock::{Clock, NANOS_PER_SEC};
use crate::limiter::{
    Admission, Check, ConcurrencyRule, Decision, LimitKind, LimitSet, LimitStatus, Limiter, Permit,
    QuotaRule, RateRule, Refusal, POLICY_SCOPE_ID,
};
use crate::metrics::Metrics;
use crate::window;
use crate::Error;

/// Environment variable holding the Redis password (from a Secret); never in the document.
pub const PASSWORD_ENV: &str = "KEYLIMIT_REDIS_PASSWORD";

const NS_PER_US: u64 = 1_000;

/// Checks, then (only if every limit passes) charges, one scope's limits.
///
/// ARGV: now, cost, max delay (-1: refuse instead of delaying), lease id, lease expiry, then
/// three values per key: kind (`q` quota, `r` rate, `c` concurrency) and two parameters:
///   q: limit, window end to use if this request opens a new window
///   r: interval, tolerance ((burst + 1) * interval)
///   c: max in flight, unused
/// Returns `{0, i, reset}` when limit `i` refuses, else `{1, delay, ...}` followed by, per
/// key: quota count and window end; rate TAT; concurrency count in flight.
const DECIDE_LUA: &str = r#"
local function int(x) return string.format('%d', x) end
-- Expiry one second past the logical end: tolerates clock skew between the sidecar and
-- Redis (the script itself compares against the sidecar's now, never Redis' expiry).
local function expire_ms(us) return int(math.ceil(us / 1000) + 1000) end
local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local max_delay = tonumber(ARGV[3])
local n = #KEYS
local delay = 0
local seen = {}
for i = 1, n do
  local kind = ARGV[3 * i + 3]
  local a = tonumber(ARGV[3 * i + 4])
  local b = tonumber(ARGV[3 * i + 5])
  local k = KEYS[i]
  if kind == 'q' then
    local v = redis.call('HMGET', k, 'c', 'e')
    local used, e = tonumber(v[1]) or 0, tonumber(v[2]) or 0
    if e <= now then used, e = 0, b end
    if used + cost > a then return {0, i, e} end
    seen[i] = {used, e}
  elseif kind == 'r' then
    local tat = tonumber(redis.call('GET', k)) or 0
    if tat < now then tat = now end
    local inc = a * cost
    local cap = b
    if inc > cap then cap = inc end
    local admit_at = tat + inc - cap
    if admit_at > now then
      local wait = admit_at - now
      if max_delay >= 0 and wait <= max_delay then
        if wait > delay then delay = wait end
      else
        return {0, i, admit_at}
      end
    end
    seen[i] = tat
  else
    -- Leases of crashed sidecars stop being renewed and fall out here.
    redis.call('ZREMRANGEBYSCORE', k, '-inf', int(now))
    local held = redis.call('ZCARD', k)
    if held >= a then return {0, i, now + 1000000} end
    seen[i] = held
  end
end
local out = {1, delay}
for i = 1, n do
  local kind = ARGV[3 * i + 3]
  local a = tonumber(ARGV[3 * i + 4])
  local k = KEYS[i]
  if kind == 'q' then
    local used, e = seen[i][1] + cost, seen[i][2]
    redis.call('HSET', k, 'c', int(used), 'e', int(e))
    redis.call('PEXPIREAT', k, expire_ms(e))
    out[#out + 1] = used
    out[#out + 1] = e
  elseif kind == 'r' then
    local tat = seen[i] + a * cost
    redis.call('SET', k, int(tat), 'PXAT', expire_ms(tat))
    out[#out + 1] = tat
  else
    redis.call('ZADD', k, ARGV[5], ARGV[4])
    local last = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', k, expire_ms(tonumber(last[2])))
    out[#out + 1] = seen[i] + 1
  end
end
return out
"#;

/// Gives back what [`DECIDE_LUA`] charged (same KEYS and ARGV): used when a later scope
/// (policy-wide limits) or the throttle queue refuses a request the key scope admitted.
const UNDO_LUA: &str = r#"
local function int(x) return string.format('%d', x) end
local cost = tonumber(ARGV[2])
for i = 1, #KEYS do
  local kind = ARGV[3 * i + 3]
  local a = tonumber(ARGV[3 * i + 4])
  local k = KEYS[i]
  if kind == 'q' then
    if redis.call('EXISTS', k) == 1 then redis.call('HINCRBY', k, 'c', int(-cost)) end
  elseif kind == 'r' then
    local tat = tonumber(redis.call('GET', k))
    if tat then redis.call('SET', k, int(tat - a * cost), 'KEEPTTL') end
  else
    redis.call('ZREM', k, ARGV[4])
  end
end
return 1
"#;

/// Tunables that are not part of the policy document.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// How long a concurrency lease lives without renewal: how long a crashed sidecar's
    /// in-flight slots stay taken. Live leases are renewed every third of it.
    pub lease_ttl: Duration,
    /// How often a down store is probed.
    pub probe_interval: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            probe_interval: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Rule<'a> {
    Quota(&'a QuotaRule),
    Rate(&'a RateRule),
    Concurrency(&'a ConcurrencyRule),
}

/// One scope's limits as script KEYS and ARGV.
struct Group<'a> {
    keys: Vec<String>,
    rules: Vec<Rule<'a>>,
}

impl<'a> Group<'a> {
    fn new(prefix: &str, key_id: u64, sets: &[Option<&'a LimitSet>]) -> Self {
        let mut g = Group {
            keys: Vec::new(),
            rules: Vec::new(),
        };
        // Same order as the local limiter's check, so the same limit is reported when
        // several are exhausted.
        for set in sets.iter().flatten() {
            for q in &set.quotas {
                g.keys
                    .push(format!("{{{prefix}:{key_id:016x}}}:q:{:016x}", q.id()));
                g.rules.push(Rule::Quota(q));
            }
            for r in &set.rates {
                g.keys
                    .push(format!("{{{prefix}:{key_id:016x}}}:r:{:016x}", r.id()));
                g.rules.push(Rule::Rate(r));
            }
            if let Some(c) = &set.concurrency {
                g.keys
                    .push(format!("{{{prefix}:{key_id:016x}}}:c:{:016x}", c.id()));
                g.rules.push(Rule::Concurrency(c));
            }
        }
        g
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn lease_keys(&self) -> impl Iterator<Item = &String> {
        self.keys
            .iter()
            .zip(&self.rules)
            .filter(|(_, r)| matches!(r, Rule::Concurrency(_)))
            .map(|(k, _)| k)
    }

    fn invocation<'s>(&self, script: &'s Script, a: &Args<'_>) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(a.now_us)
            .arg(a.cost)
            .arg(a.max_delay_us)
            .arg(a.lease_id)
            .arg(a.lease_expiry_us);
        for rule in &self.rules {
            match rule {
                Rule::Quota(q) => {
                    let end = window::window_end_ns(q.period, q.alignment, a.now_ns);
                    inv.arg("q").arg(q.requests).arg(end / NS_PER_US);
                }
                Rule::Rate(r) => {
                    let interval = interval_us(r);
                    inv.arg("r")
                        .arg(interval)
                        .arg(interval.saturating_mul(r.burst.saturating_add(1)));
                }
                Rule::Concurrency(c) => {
                    inv.arg("c").arg(c.max).arg(0);
                }
            }
        }
        inv
    }

    fn refusal(&self, index: i64, reset_us: i64, now_ns: u64) -> Option<Refusal> {
        let rule = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.rules.get(i))?;
        let reset_at_ns = u64::try_from(reset_us)
            .unwrap_or(0)
            .saturating_mul(NS_PER_US);
        Some(match rule {
            Rule::Quota(q) => Refusal {
                reason: ExhaustionReason::QuotaExceeded,
                kind: LimitKind::Quota,
                name: q.name.clone(),
                limit: q.requests,
                window_s: window::nominal_secs(q.period),
                now_ns,
                reset_at_ns,
                dry_run: false,
            },
            Rule::Rate(r) => Refusal {
                reason: ExhaustionReason::RateLimited,
                kind: LimitKind::Rate,
                name: r.name.clone(),
                limit: r.requests,
                window_s: r.period_s,
                now_ns,
                reset_at_ns,
                dry_run: false,
            },
            Rule::Concurrency(c) => Refusal {
                reason: ExhaustionReason::ConcurrencyLimited,
                kind: LimitKind::Concurrency,
                name: Arc::from("concurrency"),
                limit: u64::from(c.max),
                window_s: 0,
                now_ns,
                reset_at_ns: now_ns.saturating_add(NANOS_PER_SEC),
                dry_run: false,
            },
        })
    }

    /// Folds the script's per-limit values into the most restrictive status (as the local
    /// limiter's commit does) and mirrors quota counts into the local view.
    fn admitted(
        &self,
        values: &[i64],
        now_ns: u64,
        key_id: u64,
        view: &Limiter,
        status: &mut Option<LimitStatus>,
    ) {
        let mut offer = |s: LimitStatus| {
            if status
                .as_ref()
                .is_none_or(|cur| s.more_restrictive_than(cur))
            {
                *status = Some(s);
            }
        };
        let now_us = now_ns / NS_PER_US;
        let mut v = values.iter().map(|x| u64::try_from(*x).unwrap_or(0));
        for rule in &self.rules {
            match rule {
                Rule::Quota(q) => {
                    let used = v.next().unwrap_or(0);
                    let end_ns = v.next().unwrap_or(0).saturating_mul(NS_PER_US);
                    view.note_quota(key_id, q.id(), used, end_ns);
                    offer(LimitStatus {
                        kind: LimitKind::Quota,
                        name: q.name.clone(),
                        limit: q.requests,
                        window_s: window::nominal_secs(q.period),
                        remaining: q.requests.saturating_sub(used),
                        reset_secs: end_ns.saturating_sub(now_ns).div_ceil(NANOS_PER_SEC),
                    });
                }
                Rule::Rate(r) => {
                    let interval = interval_us(r);
                    let tolerance = interval.saturating_mul(r.burst.saturating_add(1));
                    let ahead = v.next().unwrap_or(0).saturating_sub(now_us);
                    offer(LimitStatus {
                        kind: LimitKind::Rate,
                        name: r.name.clone(),
                        limit: r.requests,
                        window_s: r.period_s,
                        remaining: tolerance.saturating_sub(ahead) / interval,
                        reset_secs: ahead.saturating_mul(NS_PER_US).div_ceil(NANOS_PER_SEC),
                    });
                }
                Rule::Concurrency(_) => {
                    v.next();
                }
            }
        }
    }
}

/// The local limiter's interval in whole microseconds, rounded up like the local one so
/// `requests` intervals never fit in one period.
fn interval_us(r: &RateRule) -> u64 {
    r.interval_ns.div_ceil(NS_PER_US).max(1)
}

struct Args<'a> {
    now_ns: u64,
    now_us: u64,
    cost: u64,
    max_delay_us: i64,
    lease_id: &'a str,
    lease_expiry_us: u64,
}

enum ScriptResult {
    Refused { index: i64, reset_us: i64 },
    Admitted { delay_us: u64, values: Vec<i64> },
}

fn parse(v: Vec<i64>) -> Result<ScriptResult, Error> {
    match v.as_slice() {
        [0, index, reset_us] => Ok(ScriptResult::Refused {
            index: *index,
            reset_us: *reset_us,
        }),
        [1, delay, ..] => Ok(ScriptResult::Admitted {
            delay_us: u64::try_from(*delay).unwrap_or(0),
            values: v[2..].to_vec(),
        }),
        _ => Err(Error::Redis(format!("unexpected script reply {v:?}"))),
    }
}

struct Inner {
    conn: Option<ConnectionManager>,
    url: String,
    prefix: String,
    up: AtomicBool,
    halted: AtomicBool,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Enforces `limit / replicas` while Redis is away; its own state, never mixed with the
    /// sidecar's local view.
    fallback: Limiter,
    decide: Script,
    settings: RedisSettings,
    /// Leases held by in-flight requests (id -> sorted-set keys), renewed in the background.
    leases: Mutex<HashMap<String, Vec<String>>>,
    instance: u64,
    next_lease: AtomicU64,
    /// Timeout of the last decision, for the background calls (same bound).
    last_timeout_ms: AtomicU64,
}

/// One Redis connection (manager) and its scripts, shared by every snapshot that names the
/// same URL and prefix; the rest of the store config is read per decision so an operator
/// changing `replicas` or the fail mode does not reconnect.
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.prefix)
            .field("up", &self.inner.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn connect(url: &str, timeout: Duration) -> Result<ConnectionManager, Error> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
    if let Ok(pw) = std::env::var(PASSWORD_ENV) {
        if !pw.is_empty() {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
    }
    let client = redis::Client::open(info)?;
    // Lazy: the first connect happens in the background, never on a request. Retries are
    // short and few because the probe keeps asking; requests are bounded by our own timeout.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(100))))
        .set_response_timeout(None)
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    Ok(ConnectionManager::new_lazy_with_config(client, config)?)
}

impl RedisLimiter {
    /// Never fails: a bad URL is logged and leaves the store permanently down, so the fail
    /// mode applies exactly as for an unreachable Redis.
    pub fn new(
        cfg: &RedisStore,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        settings: RedisSettings,
    ) -> Self {
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let conn = match connect(&cfg.url, timeout) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(url = %cfg.url, error = %e,
                    "redis store misconfigured; every decision uses the fail mode");
                None
            }
        };
        let instance = {
            use std::hash::{BuildHasher, Hasher};
            // A random per-process id (std seeds RandomState from the OS) to keep lease ids
            // of different sidecars apart.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(clock.now_ns());
            h.finish()
        };
        let up = conn.is_some();
        metrics.store_up.set(i64::from(up));
        let inner = Arc::new(Inner {
            conn,
            url: cfg.url.clone(),
            prefix: cfg.key_prefix.clone(),
            up: AtomicBool::new(up),
            halted: AtomicBool::new(false),
            fallback: Limiter::new(clock.clone()),
            clock,
            metrics,
            decide: Script::new(DECIDE_LUA),
            settings,
            leases: Mutex::new(HashMap::new()),
            instance,
            next_lease: AtomicU64::new(0),
            last_timeout_ms: AtomicU64::new(cfg.timeout_ms.max(1)),
        });
        if inner.conn.is_some() {
            tokio::spawn(probe_loop(Arc::downgrade(&inner)));
            tokio::spawn(renew_loop(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    fn serves(&self, cfg: &RedisStore) -> bool {
        self.inner.url == cfg.url && self.inner.prefix == cfg.key_prefix
    }

    /// Whether decisions currently go to Redis (false: the fail mode applies).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Stops background renewal and probing, as a crashed process would: its leases then
    /// expire after the lease TTL. For tests.
    pub fn halt(&self) {
        self.inner.halted.store(true, Ordering::Release);
    }

    /// Decides one request. `None` means refuse with 503 (FailClosed and Redis unavailable).
    /// Never waits longer than the store's timeout for Redis.
    pub async fn decide(
        &self,
        cfg: &RedisStore,
        c: &Check<'_>,
        view: &Limiter,
    ) -> Option<Decision> {
        let inner = &self.inner;
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        inner
            .last_timeout_ms
            .store(cfg.timeout_ms.max(1), Ordering::Relaxed);
        if inner.up.load(Ordering::Acquire) {
            if let Some(conn) = &inner.conn {
                match tokio::time::timeout(timeout, inner.decide_redis(conn.clone(), c, view)).await
                {
                    Ok(Ok(d)) => return Some(d),
                    Ok(Err(e)) => inner.mark_down("error", &e, Some(cfg.fail_mode)),
                    Err(_) => inner.mark_down(
                        "timeout",
                        &Error::RedisTimeout(timeout),
                        Some(cfg.fail_mode),
                    ),
                }
            }
        }
        inner.fail(cfg, c)
    }
}

impl Inner {
    fn mark_down(&self, kind: &'static str, e: &Error, mode: Option<FailMode>) {
        self.metrics.store_error(kind);
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.store_up.set(0);
            tracing::warn!(url = %self.url, error = %e, fail_mode = ?mode,
                "redis store unavailable; applying the fail mode until it answers again");
        }
    }

    fn fail(&self, cfg: &RedisStore, c: &Check<'_>) -> Option<Decision> {
        match cfg.fail_mode {
            FailMode::FailOpen => {
                self.metrics.store_fallback("fail_open");
                Some(Decision::Allow(Admission::default()))
            }
            FailMode::FailClosed => {
                self.metrics.store_fallback("fail_closed");
                None
            }
            FailMode::LocalFallback => {
                self.metrics.store_fallback("local_fallback");
                // Degraded path only: dividing allocates, the Redis and Local paths do not.
                let n = cfg.replicas.max(1);
                let key = c.key_limits.divided(n);
                let route = c.route_limits.map(|s| s.divided(n));
                let policy = c.policy_limits.map(|s| s.divided(n));
                Some(self.fallback.decide(&Check {
                    key_limits: &key,
                    route_limits: route.as_ref(),
                    policy_limits: policy.as_ref(),
                    ..*c
                }))
            }
        }
    }

    async fn run(
        &self,
        conn: &mut ConnectionManager,
        g: &Group<'_>,
        a: &Args<'_>,
    ) -> Result<ScriptResult, Error> {
        let v: Vec<i64> = g.invocation(&self.decide, a).invoke_async(conn).await?;
        parse(v)
    }

    async fn decide_redis(
        self: &Arc<Self>,
        mut conn: ConnectionManager,
        c: &Check<'_>,
        view: &Limiter,
    ) -> Result<Decision, Error> {
        let now_ns = self.clock.now_ns();
        let key_group = Group::new(
            &self.prefix,
            c.key_id,
            &[Some(c.key_limits), c.route_limits],
        );
        let policy_group = Group::new(
            &self.prefix,
            POLICY_SCOPE_ID,
            &[c.policy_limits.filter(|p| !p.is_empty())],
        );
        let needs_lease =
            key_group.lease_keys().next().is_some() || policy_group.lease_keys().next().is_some();
        let lease_id = if needs_lease {
            format!(
                "{:016x}-{}",
                self.instance,
                self.next_lease.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            String::new()
        };
        let args = Args {
            now_ns,
            now_us: now_ns / NS_PER_US,
            cost: c.cost.max(1),
            max_delay_us: match (c.dry_run, c.throttle) {
                (false, Some(t)) => i64::try_from(t.max_delay_ns / NS_PER_US).unwrap_or(i64::MAX),
                _ => -1,
            },
            lease_id: &lease_id,
            lease_expiry_us: (now_ns / NS_PER_US).saturating_add(
                u64::try_from(self.settings.lease_ttl.as_micros()).unwrap_or(u64::MAX),
            ),
        };
        let mut status = None;
        let mut delay_us = 0;
        let mut charged: Vec<&Group<'_>> = Vec::with_capacity(2);
        for (scope, g) in [(c.key_id, &key_group), (POLICY_SCOPE_ID, &policy_group)] {
            if g.is_empty() {
                continue;
            }
            match self.run(&mut conn, g, &args).await? {
                ScriptResult::Admitted {
                    delay_us: d,
                    values,
                } => {
                    g.admitted(&values, now_ns, scope, view, &mut status);
                    delay_us = delay_us.max(d);
                    charged.push(g);
                }
                ScriptResult::Refused { index, reset_us } => {
                    self.spawn_undo(&charged, &args);
                    let mut r = g
                        .refusal(index, reset_us, now_ns)
                        .ok_or_else(|| Error::Redis(format!("script named limit {index}")))?;
                    r.dry_run = c.dry_run;
                    return Ok(if r.dry_run {
                        // DryRun forwards what it would refuse, uncharged, as local mode does.
                        Decision::Allow(Admission {
                            dry_run_refusal: Some(r),
                            ..Admission::default()
                        })
                    } else {
                        Decision::Refuse(r)
                    });
                }
            }
        }
        let delay_ns = delay_us.saturating_mul(NS_PER_US);
        let mut queued = None;
        if delay_ns > 0 {
            let max_queue = c.throttle.map_or(0, |t| t.max_queue);
            match view.try_enqueue(max_queue) {
                Some(slot) => queued = Some(slot),
                None => {
                    self.spawn_undo(&charged, &args);
                    return Ok(Decision::Refuse(Refusal {
                        reason: ExhaustionReason::Throttled,
                        kind: LimitKind::Rate,
                        name: Arc::from("throttle"),
                        limit: u64::from(max_queue),
                        window_s: 0,
                        now_ns,
                        reset_at_ns: now_ns.saturating_add(delay_ns),
                        dry_run: false,
                    }));
                }
            }
        }
        let permit = needs_lease.then(|| {
            let keys: Vec<String> = key_group
                .lease_keys()
                .chain(policy_group.lease_keys())
                .cloned()
                .collect();
            self.leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(lease_id.clone(), keys.clone());
            Permit::Redis(Lease {
                inner: self.clone(),
                id: lease_id,
                keys,
            })
        });
        Ok(Decision::Allow(Admission {
            delay_ns,
            status,
            permit,
            queued,
            dry_run_refusal: None,
        }))
    }

    /// Rolls back scopes already charged, off the request path (bounded by the timeout).
    fn spawn_undo(&self, charged: &[&Group<'_>], a: &Args<'_>) {
        let Some(conn) = self.conn.clone() else {
            return;
        };
        let invocations: Vec<redis::Cmd> = charged.iter().map(|g| undo_cmd(g, a)).collect();
        if invocations.is_empty() {
            return;
        }
        let timeout = self.timeout();
        tokio::spawn(async move {
            let mut conn = conn;
            for cmd in invocations {
                // EVAL, not EVALSHA: rare path, and it must not depend on the script cache.
                let r =
                    tokio::time::timeout(timeout, cmd.query_async::<redis::Value>(&mut conn)).await;
                if !matches!(r, Ok(Ok(_))) {
                    tracing::debug!("redis rollback failed; the charge expires with its window");
                }
            }
        });
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.last_timeout_ms.load(Ordering::Relaxed))
    }

    fn release(&self, id: &str, keys: &[String]) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        let Some(conn) = self.conn.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime (shutdown): the lease expires after its TTL
        };
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("ZREM").arg(k).arg(id).ignore();
        }
        let timeout = self.timeout();
        rt.spawn(async move {
            let mut conn = conn;
            let r = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::debug!("redis lease release failed; it expires after its TTL");
            }
        });
    }
}

fn undo_cmd(g: &Group<'_>, a: &Args<'_>) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(UNDO_LUA).arg(g.keys.len());
    for k in &g.keys {
        cmd.arg(k);
    }
    cmd.arg(a.now_us)
        .arg(a.cost)
        .arg(a.max_delay_us)
        .arg(a.lease_id)
        .arg(a.lease_expiry_us);
    for rule in &g.rules {
        match rule {
            Rule::Quota(q) => {
                cmd.arg("q").arg(q.requests).arg(0);
            }
            Rule::Rate(r) => {
                cmd.arg("r").arg(interval_us(r)).arg(0);
            }
            Rule::Concurrency(c) => {
                cmd.arg("c").arg(c.max).arg(0);
            }
        }
    }
    cmd
}

/// Concurrency slots held in Redis by one request.
pub struct Lease {
    inner: Arc<Inner>,
    id: String,
    keys: Vec<String>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.release(&self.id, &self.keys);
    }
}

/// PINGs a down store until it answers; checks an up store now and then so `store_up` is
/// right even without traffic. Ends when the limiter is dropped or halted.
async fn probe_loop(inner: Weak<Inner>) {
    let Some(every) = inner.upgrade().map(|i| i.settings.probe_interval) else {
        return;
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.halted.load(Ordering::Acquire) {
            return;
        }
        n += 1;
        inner.fallback.evict_idle();
        let up = inner.up.load(Ordering::Acquire);
        if up && !n.is_multiple_of(25) {
            continue;
        }
        let Some(mut conn) = inner.conn.clone() else {
            return;
        };
        let timeout = inner.timeout().max(Duration::from_millis(100));
        let ping = redis::cmd("PING");
        let r = tokio::time::timeout(timeout, ping.query_async::<String>(&mut conn)).await;
        match r {
            Ok(Ok(_)) if !up => {
                inner.up.store(true, Ordering::Release);
                inner.metrics.store_up.set(1);
                tracing::info!(url = %inner.url, "redis store answers again; exact limits resumed");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) if up => inner.mark_down("error", &e.into(), None),
            Err(_) if up => inner.mark_down("timeout", &Error::RedisTimeout(timeout), None),
            _ => {}
        }
    }
}

/// Pushes the expiry of every live lease forward, so long requests (streams, WebSockets)
/// keep their slots while a crashed sidecar's slots free after one TTL.
async fn renew_loop(inner: Weak<Inner>) {
    let Some(ttl) = inner.upgrade().map(|i| i.settings.lease_ttl) else {
        return;
    };
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.halted.load(Ordering::Acquire) {
            return;
        }
        if !inner.up.load(Ordering::Acquire) {
            continue;
        }
        let live: Vec<(String, Vec<String>)> = inner
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if live.is_empty() {
            continue;
        }
        let Some(mut conn) = inner.conn.clone() else {
            return;
        };
        let expiry_us = (inner.clock.now_ns() / NS_PER_US)
            .saturating_add(u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX));
        let expire_ms = expiry_us.div_ceil(1_000) + 1_000;
        let mut pipe = redis::pipe();
        for (id, keys) in &live {
            for k in keys {
                // XX: never resurrect a lease that was released meanwhile.
                pipe.cmd("ZADD")
                    .arg(k)
                    .arg("XX")
                    .arg(expiry_us)
                    .arg(id)
                    .ignore();
                pipe.cmd("PEXPIREAT")
                    .arg(k)
                    .arg(expire_ms)
                    .arg("GT")
                    .ignore();
            }
        }
        let timeout = inner.timeout();
        let r = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::debug!("redis lease renewal failed; retrying next tick");
        }
    }
}

/// The Redis limiter of the current config, rebuilt only when the URL or prefix changes.
pub struct RedisBackends {
    current: ArcSwapOption<RedisLimiter>,
    building: Mutex<()>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    settings: RedisSettings,
}

impl std::fmt::Debug for RedisBackends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackends")
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

impl RedisBackends {
    pub fn new(clock: Arc<dyn Clock>, metrics: Arc<Metrics>, settings: RedisSettings) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            building: Mutex::new(()),
            clock,
            metrics,
            settings,
        }
    }

    pub fn get(&self, cfg: &RedisStore) -> Arc<RedisLimiter> {
        if let Some(l) = self.current.load_full().filter(|l| l.serves(cfg)) {
            return l;
        }
        let _building = self.building.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = self.current.load_full().filter(|l| l.serves(cfg)) {
            return l;
        }
        let l = Arc::new(RedisLimiter::new(
            cfg,
            self.clock.clone(),
            self.metrics.clone(),
            self.settings.clone(),
        ));
        self.current.store(Some(l.clone()));
        l
    }

    /// The limiter in use, if the config has asked for one.
    pub fn current(&self) -> Option<Arc<RedisLimiter>> {
        self.current.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylimit_dataplane::{Limits, RateWindow};

    #[test]
    fn one_key_shares_one_hash_tag() {
        let set = LimitSet::compile(
            &Limits {
                rates: vec![RateWindow {
                    name: "minute".into(),
                    requests: 100,
                    period_seconds: 60,
                    burst: 0,
                }],
                concurrency: Some(2),
                ..Limits::default()
            },
            "key",
        );
        let g = Group::new("kl:shop:orders", 0xabc, &[Some(&set)]);
        assert_eq!(g.keys.len(), 2);
        for k in &g.keys {
            assert!(
                k.starts_with("{kl:shop:orders:0000000000000abc}:"),
                "{k} must carry the key's hash tag"
            );
        }
    }

    #[test]
    fn script_replies_parse() {
        assert!(matches!(
            parse(vec![0, 2, 5]),
            Ok(ScriptResult::Refused {
                index: 2,
                reset_us: 5
            })
        ));
        assert!(matches!(
            parse(vec![1, 0, 7]),
            Ok(ScriptResult::Admitted { delay_us: 0, .. })
        ));
        assert!(parse(vec![]).is_err());
    }

    #[test]
    fn divided_limits_round_down_but_never_to_zero() {
        let set = LimitSet::compile(
            &Limits {
                rates: vec![RateWindow {
                    name: "minute".into(),
                    requests: 10,
                    period_seconds: 60,
                    burst: 5,
                }],
                concurrency: Some(1),
                ..Limits::default()
            },
            "key",
        );
        let d = set.divided(3);
        assert_eq!((d.rates[0].requests, d.rates[0].burst), (3, 1));
        assert_eq!(d.concurrency.as_ref().map(|c| c.max), Some(1));
        assert_eq!(d.rates[0].id(), set.rates[0].id());
    }
}
