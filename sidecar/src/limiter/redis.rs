//! The shared limit store: Redis, for limits that hold across every replica and quotas that
//! survive restarts.
//!
//! Every decision is one atomic server-side script per scope (the key, then the policy-wide
//! limits if any): it checks all of the scope's rate windows (GCRA, the same arithmetic as the
//! in-process store), quotas and concurrency leases and charges them only if all pass.
//! `EVALSHA` is tried first and the script loaded on `NOSCRIPT` (a restarted Redis).
//!
//! Key layout (Redis Cluster/Sentinel friendly): every counter of one key shares the hash
//! tag `{<prefix>:<key id>}`, so one script touches one slot:
//! `{<prefix>:<key id hex>}:q:<limit id hex>` (hash: count `c`, window end `e`),
//! `…:r:<limit id hex>` (string: GCRA theoretical arrival time) and `…:c:<limit id hex>`
//! (sorted set of lease ids scored by their expiry). Limit ids are stable fingerprints of
//! the limit's scope, name and parameters, so every sidecar (and every release) agrees.
//!
//! Times in Redis are microseconds since the epoch (exact in a Lua double for centuries) on
//! Redis' own clock: every script reads `TIME` and makes every comparison (GCRA, lease
//! pruning and expiry, "is this quota window over") against it, so one sidecar with a skewed
//! clock cannot refill a bucket, end a window or prune other sidecars' leases early. The
//! sidecar still computes calendar quota windows (UTC boundaries, in Rust) from its estimate
//! of Redis' clock (its own clock plus the offset seen in earlier replies) and passes them
//! in; the script opens a window only if it contains Redis' now, and otherwise answers with
//! its now so the sidecar recomputes. Times the scripts return are converted to the sidecar's
//! clock by their distance from Redis' now, so `Retry-After` and `resetAt` stay right.
//!
//! Failure handling: every call is bounded by the policy's `timeoutMs`. The first failure
//! marks the store down; from then on decisions go straight to the fail mode without
//! touching Redis (no request waits on a reconnect) while a background probe PINGs through
//! the same connection manager, which reconnects on its own. The first PONG marks the store
//! up again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use keylimit_dataplane::{
    ExhaustionReason, FailMode, QuotaAlignment, QuotaPeriod, RedisStore, Unit,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::clock::{Clock, NANOS_PER_SEC};
// Only the in-process store's public face: the sidecar's local view (mirrored quota counts,
// the throttle queue) and the `LocalFallback` limiter.
use super::local::Limiter;
use super::window;
use super::{
    Admission, Check, ConcurrencyRule, Decision, DecisionStore, LimitKind, LimitSet, LimitStatus,
    Permit, QuotaRule, RateRule, Refusal, POLICY_SCOPE_ID,
};
use crate::metrics::Metrics;
use crate::Error;

/// Environment variable holding the Redis password (from a Secret); never in the document.
pub const PASSWORD_ENV: &str = "KEYLIMIT_REDIS_PASSWORD";
/// Environment variable holding the Redis URL when the document has none: the webhook fills
/// it from the policy's connection Secret, the same Secret as the password, so the password
/// only ever goes to the server its owner named.
pub const URL_ENV: &str = "KEYLIMIT_REDIS_URL";
/// Environment variable holding a PEM CA (from the same Secret): a `rediss://` server is then
/// verified against exactly this CA instead of the system roots.
pub const CA_ENV: &str = "KEYLIMIT_REDIS_CA";

const NS_PER_US: u64 = 1_000;

/// Decides a batch of scopes in one call, in order, each exactly as if it were alone: each
/// checks, then (only if every limit passes) charges, one scope's limits, on Redis' clock.
/// One `TIME` serves the whole batch: the batch is atomic, so its decisions happen at one
/// instant.
///
/// ARGV[1]: the number of scopes. Then per scope: its number of KEYS (its keys follow the
/// previous scope's in KEYS), cost, max delay (-1: refuse instead of delaying), lease id,
/// lease TTL, then four values per key: kind and three parameters:
///   q (calendar quota): limit, start and end of the window the sidecar believes is current
///   o (rolling quota): limit, window length, unused
///   r (rate): interval, tolerance ((burst + 1) * interval), unused
///   c (concurrency): max in flight, unused, unused
/// Returns one reply per scope: `{0, i, reset, now}` when limit `i` refuses; `{2, now}` when
/// a quota window must be opened and the sidecar's calendar window does not contain Redis'
/// now (its clock estimate is off: recompute from `now` and call again; nothing was
/// charged); else `{1, delay, now, ...}` followed by, per key: quota count and window end;
/// rate TAT; concurrency count in flight. Every time is microseconds on Redis' clock.
const DECIDE_LUA: &str = r#"
local function int(x) return string.format('%d', x) end
local function expire_ms(us) return int(math.ceil(us / 1000)) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- One scope: its keys are KEYS[k0 + 1 .. k0 + n], its arguments start after ARGV[p] (= n).
-- Upper-case kinds count tokens: charged the reservation, and admitted only with at least
-- one token left (a key in debt waits).
local function charge_of(kind, cost, reserve)
  if kind == 'Q' or kind == 'O' or kind == 'R' then return reserve, math.max(reserve, 1) end
  return cost, cost
end
local function decide(k0, p, n)
  local cost = tonumber(ARGV[p + 1])
  local max_delay = tonumber(ARGV[p + 2])
  local reserve = tonumber(ARGV[p + 5])
  local delay = 0
  local seen = {}
  for i = 1, n do
    local q = p + 1 + 4 * i
    local kind = ARGV[q + 1]
    local a = tonumber(ARGV[q + 2])
    local b = tonumber(ARGV[q + 3])
    local c = tonumber(ARGV[q + 4])
    local k = KEYS[k0 + i]
    local _, need = charge_of(kind, cost, reserve)
    if kind == 'q' or kind == 'o' or kind == 'Q' or kind == 'O' then
      local v = redis.call('HMGET', k, 'c', 'e')
      local used, e = tonumber(v[1]) or 0, tonumber(v[2]) or 0
      local opened = false
      if e <= now then
        used = 0
        opened = true
        if kind == 'o' or kind == 'O' then
          e = now + b
        elseif b <= now and now < c then
          e = c
        else
          return {2, now}
        end
      end
      if used + need > a then return {0, i, e, now} end
      seen[i] = {used, e, opened}
    elseif kind == 'r' or kind == 'R' then
      local tat = tonumber(redis.call('GET', k)) or 0
      if tat < now then tat = now end
      local inc = a * need
      local cap = b
      if inc > cap then cap = inc end
      local admit_at = tat + inc - cap
      if admit_at > now then
        local wait = admit_at - now
        if max_delay >= 0 and wait <= max_delay then
          if wait > delay then delay = wait end
        else
          return {0, i, admit_at, now}
        end
      end
      seen[i] = tat
    else
      -- Leases of crashed sidecars stop being renewed and fall out here.
      redis.call('ZREMRANGEBYSCORE', k, '-inf', int(now))
      local held = redis.call('ZCARD', k)
      if held >= a then return {0, i, now + 1000000, now} end
      seen[i] = held
    end
  end
  local out = {1, delay, now}
  local lease_expiry = int(now + tonumber(ARGV[p + 4]))
  for i = 1, n do
    local q = p + 1 + 4 * i
    local kind = ARGV[q + 1]
    local a = tonumber(ARGV[q + 2])
    local k = KEYS[k0 + i]
    local charge = charge_of(kind, cost, reserve)
    if kind == 'q' or kind == 'o' or kind == 'Q' or kind == 'O' then
      local used, e = seen[i][1] + charge, seen[i][2]
      redis.call('HSET', k, 'c', int(used), 'e', int(e))
      -- HSET keeps the hash's TTL: it only needs setting when a window opens.
      if seen[i][3] then redis.call('PEXPIREAT', k, expire_ms(e)) end
      out[#out + 1] = used
      out[#out + 1] = e
    elseif kind == 'r' or kind == 'R' then
      local tat = seen[i] + a * charge
      redis.call('SET', k, int(tat), 'PXAT', expire_ms(tat))
      out[#out + 1] = tat
    else
      redis.call('ZADD', k, lease_expiry, ARGV[p + 3])
      local last = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
      redis.call('PEXPIREAT', k, expire_ms(tonumber(last[2])))
      out[#out + 1] = seen[i] + 1
    end
  end
  return out
end
local replies = {}
local k0, p = 0, 2
for j = 1, tonumber(ARGV[1]) do
  local n = tonumber(ARGV[p])
  replies[j] = decide(k0, p, n)
  k0 = k0 + n
  p = p + 6 + 4 * n
end
return replies
"#;

/// Gives back what [`DECIDE_LUA`] charged for one scope (its KEYS, and its ARGV without the
/// leading counts: cost, max delay, lease id, lease TTL, reservation, four per key): used when
/// a later scope (policy-wide limits) or the throttle queue refuses a request the key scope
/// admitted.
const UNDO_LUA: &str = r#"
local function int(x) return string.format('%d', x) end
local cost = tonumber(ARGV[1])
local reserve = tonumber(ARGV[5])
for i = 1, #KEYS do
  local kind = ARGV[4 * i + 2]
  local a = tonumber(ARGV[4 * i + 3])
  local k = KEYS[i]
  local charge = cost
  if kind == 'Q' or kind == 'O' or kind == 'R' then charge = reserve end
  if kind == 'q' or kind == 'o' or kind == 'Q' or kind == 'O' then
    if redis.call('EXISTS', k) == 1 then redis.call('HINCRBY', k, 'c', int(-charge)) end
  elseif kind == 'r' or kind == 'R' then
    local tat = tonumber(redis.call('GET', k))
    if tat then redis.call('SET', k, int(tat - a * charge), 'KEEPTTL') end
  else
    redis.call('ZREM', k, ARGV[3])
  end
end
return 1
"#;

/// Charges a response's reported tokens against one scope's token limits (KEYS): ARGV[1] is
/// the reported cost minus the reservation (negative: a refund), then four per key as in
/// [`DECIDE_LUA`] (calendar windows placed by the sidecar's estimate of Redis' now). Debt
/// moves a rate's arrival time, and its expiry, past now; a refund never reaches a quota
/// window that ended since the reservation.
const SETTLE_LUA: &str = r#"
local function int(x) return string.format('%d', x) end
local function expire_ms(us) return int(math.ceil(us / 1000)) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delta = tonumber(ARGV[1])
for i = 1, #KEYS do
  local kind = ARGV[4 * i - 2]
  local a = tonumber(ARGV[4 * i - 1])
  local b = tonumber(ARGV[4 * i])
  local c = tonumber(ARGV[4 * i + 1])
  local k = KEYS[i]
  if kind == 'Q' or kind == 'O' then
    local v = redis.call('HMGET', k, 'c', 'e')
    local used, e = tonumber(v[1]) or 0, tonumber(v[2]) or 0
    if e > now then
      local n = used + delta
      if n < 0 then n = 0 end
      redis.call('HSET', k, 'c', int(n))
    elseif delta > 0 then
      -- The window ended while the response ran: the charge opens the one it ended in.
      if kind == 'O' then e = now + b elseif b <= now and now < c then e = c else e = 0 end
      if e > 0 then
        redis.call('HSET', k, 'c', int(delta), 'e', int(e))
        redis.call('PEXPIREAT', k, expire_ms(e))
      end
    end
  elseif kind == 'R' then
    local tat = tonumber(redis.call('GET', k))
    if delta > 0 then
      if not tat or tat < now then tat = now end
      tat = tat + a * delta
      redis.call('SET', k, int(tat), 'PXAT', expire_ms(tat))
    elseif tat then
      tat = tat + a * delta
      if tat > now then redis.call('SET', k, int(tat), 'PXAT', expire_ms(tat)) else redis.call('DEL', k) end
    end
  end
end
return 1
"#;

/// Moves the expiry of live leases (ARGV[2..]) in one sorted set (KEYS[1]) to Redis' now
/// plus the TTL (ARGV[1], µs), so renewal is on the same clock as pruning.
const RENEW_LUA: &str = r#"
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1])
local score = string.format('%d', expiry)
for i = 2, #ARGV do
  -- XX: never resurrect a lease that was released meanwhile.
  redis.call('ZADD', KEYS[1], 'XX', 'GT', score, ARGV[i])
end
redis.call('PEXPIREAT', KEYS[1], string.format('%d', math.ceil(expiry / 1000)), 'GT')
return 1
"#;

/// Tunables and credentials that are not part of the policy document.
#[derive(Clone)]
pub struct RedisSettings {
    /// How long a concurrency lease lives without renewal: how long a crashed sidecar's
    /// in-flight slots stay taken. Live leases are renewed every third of it.
    pub lease_ttl: Duration,
    /// How often a down store is probed.
    pub probe_interval: Duration,
    /// The URL used when the document carries none (`KEYLIMIT_REDIS_URL`); may hold a password.
    pub url: Option<String>,
    /// Password sent to Redis, over any the URL carries (`KEYLIMIT_REDIS_PASSWORD`).
    pub password: Option<String>,
    /// PEM CA a `rediss://` server must chain to (`KEYLIMIT_REDIS_CA`); none: system roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            probe_interval: Duration::from_millis(200),
            url: None,
            password: None,
            ca_pem: None,
        }
    }
}

impl RedisSettings {
    /// Takes the connection from the environment the webhook injects (empty counts as unset).
    pub fn with_env(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        self.url = var(URL_ENV);
        self.password = var(PASSWORD_ENV);
        self.ca_pem = var(CA_ENV).map(String::into_bytes);
        self
    }
}

// By hand: the URL and password are secrets and never reach a log line.
impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("lease_ttl", &self.lease_ttl)
            .field("probe_interval", &self.probe_interval)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_pem", &self.ca_pem.is_some())
            .finish()
    }
}

/// The URL with any userinfo (`user:password@`) replaced, for logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end], &rest[at..]),
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Rule<'a> {
    Quota(&'a QuotaRule),
    Rate(&'a RateRule),
    Concurrency(&'a ConcurrencyRule),
}

impl Rule<'_> {
    fn counts_tokens(&self) -> bool {
        match self {
            Rule::Quota(q) => q.unit == Unit::Tokens,
            Rule::Rate(r) => r.unit == Unit::Tokens,
            Rule::Concurrency(_) => false,
        }
    }

    /// The rule's kind and three parameters for the scripts; calendar quota windows are
    /// placed at `est_us`, the sidecar's estimate of Redis' now. An upper-case kind counts
    /// tokens.
    fn script_args(&self, est_us: u64) -> (&'static str, u64, u64, u64) {
        let tokens = self.counts_tokens();
        match self {
            Rule::Quota(q) => match q.alignment {
                QuotaAlignment::Calendar => {
                    let (start, end) = calendar_window_us(q.period, est_us);
                    (if tokens { "Q" } else { "q" }, q.requests, start, end)
                }
                QuotaAlignment::Rolling => {
                    // The script adds its own now: only the length (a calendar month's, for
                    // Month) comes from here.
                    let est_ns = est_us.saturating_mul(NS_PER_US);
                    let len = window::window_end_ns(q.period, q.alignment, est_ns)
                        .saturating_sub(est_ns)
                        / NS_PER_US;
                    (if tokens { "O" } else { "o" }, q.requests, len, 0)
                }
            },
            Rule::Rate(r) => {
                let interval = interval_us(r);
                (
                    if tokens { "R" } else { "r" },
                    interval,
                    interval.saturating_mul(r.burst.saturating_add(1)),
                    0,
                )
            }
            Rule::Concurrency(c) => ("c", u64::from(c.max), 0, 0),
        }
    }
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

    /// [`SETTLE_LUA`] for this scope's token limits, `None` if it has none.
    fn settle_cmd(&self, delta: i64, est_us: u64) -> Option<redis::Cmd> {
        let tokens: Vec<(&String, &Rule<'_>)> = self
            .keys
            .iter()
            .zip(&self.rules)
            .filter(|(_, r)| r.counts_tokens())
            .collect();
        if tokens.is_empty() {
            return None;
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SETTLE_LUA).arg(tokens.len());
        for (k, _) in &tokens {
            cmd.arg(*k);
        }
        cmd.arg(delta);
        for (_, rule) in &tokens {
            let (kind, x, y, z) = rule.script_args(est_us);
            cmd.arg(kind).arg(x).arg(y).arg(z);
        }
        Some(cmd)
    }

    fn lease_keys(&self) -> impl Iterator<Item = &String> {
        self.keys
            .iter()
            .zip(&self.rules)
            .filter(|(_, r)| matches!(r, Rule::Concurrency(_)))
            .map(|(k, _)| k)
    }

    /// This scope's part of a batched script call; calendar quota windows are placed at
    /// `est_us`, the sidecar's estimate of Redis' now.
    fn job(&self, a: &Args<'_>, est_us: u64, reply: oneshot::Sender<Result<Reply, Error>>) -> Job {
        let mut keys = redis::Cmd::new();
        for k in &self.keys {
            keys.arg(k);
        }
        let mut argv = redis::Cmd::new();
        argv.arg(self.keys.len())
            .arg(a.cost)
            .arg(a.max_delay_us)
            .arg(a.lease_id)
            .arg(a.lease_ttl_us)
            .arg(a.reserve);
        for rule in &self.rules {
            let (kind, x, y, z) = rule.script_args(est_us);
            argv.arg(kind).arg(x).arg(y).arg(z);
        }
        let lease_keys: Vec<String> = self.lease_keys().cloned().collect();
        Job {
            keys,
            key_count: self.keys.len(),
            argv,
            lease: (!lease_keys.is_empty()).then(|| (a.lease_id.to_string(), lease_keys)),
            reply,
        }
    }

    /// The refusal for limit `index` (1-based, as the script numbers it), with `reset_us`
    /// (Redis' clock) moved onto the sidecar's: `now_ns` is the sidecar's clock when Redis'
    /// clock read `redis_now_us`.
    fn refusal(
        &self,
        index: i64,
        reset_us: i64,
        redis_now_us: i64,
        now_ns: u64,
    ) -> Option<Refusal> {
        let rule = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.rules.get(i))?;
        let reset_at_ns = now_ns.saturating_add(ns_until(reset_us, redis_now_us));
        Some(match rule {
            Rule::Quota(q) => Refusal {
                reason: ExhaustionReason::QuotaExceeded,
                kind: LimitKind::Quota,
                name: q.name.clone(),
                limit: q.requests,
                unit: q.unit,
                window_s: window::nominal_secs(q.period),
                now_ns,
                reset_at_ns,
                dry_run: false,
            },
            Rule::Rate(r) => r.refusal(now_ns, reset_at_ns),
            Rule::Concurrency(c) => Refusal {
                reason: ExhaustionReason::ConcurrencyLimited,
                kind: LimitKind::Concurrency,
                name: Arc::from("concurrency"),
                limit: u64::from(c.max),
                unit: Unit::Requests,
                window_s: 0,
                now_ns,
                reset_at_ns: now_ns.saturating_add(NANOS_PER_SEC),
                dry_run: false,
            },
        })
    }

    /// Folds the script's per-limit values into the most restrictive status (as the local
    /// limiter's commit does) and mirrors quota counts into the local view. Window ends reach
    /// the view through the sidecar's steady offset to Redis (`offset_us`, Redis minus
    /// sidecar), so the same window keeps the same end from one reply to the next.
    fn admitted(
        &self,
        values: &[i64],
        redis_now_us: i64,
        offset_us: i64,
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
        let mut v = values.iter().copied();
        for rule in &self.rules {
            match rule {
                Rule::Quota(q) => {
                    let used = u64::try_from(v.next().unwrap_or(0)).unwrap_or(0);
                    let end_us = v.next().unwrap_or(0);
                    let local_end_ns = u64::try_from(end_us.saturating_sub(offset_us))
                        .unwrap_or(0)
                        .saturating_mul(NS_PER_US);
                    view.note_quota(key_id, q.id(), used, local_end_ns);
                    offer(q.status(used, ns_until(end_us, redis_now_us).div_ceil(NANOS_PER_SEC)));
                }
                Rule::Rate(r) => {
                    let interval = interval_us(r);
                    let tolerance = interval.saturating_mul(r.burst.saturating_add(1));
                    let ahead_ns = ns_until(v.next().unwrap_or(0), redis_now_us);
                    offer(LimitStatus {
                        kind: LimitKind::Rate,
                        unit: r.unit,
                        id: r.id(),
                        limit: r.requests,
                        window_s: r.period_s,
                        remaining: tolerance.saturating_sub(ahead_ns / NS_PER_US) / interval,
                        reset_secs: ahead_ns.div_ceil(NANOS_PER_SEC),
                    });
                }
                Rule::Concurrency(_) => {
                    v.next();
                }
            }
        }
    }
}

/// Nanoseconds from `now_us` until `at_us` (both on Redis' clock), zero if already past.
fn ns_until(at_us: i64, now_us: i64) -> u64 {
    u64::try_from(at_us.saturating_sub(now_us))
        .unwrap_or(0)
        .saturating_mul(NS_PER_US)
}

/// Start and end (µs) of the calendar window containing `at_us`. The start is found by
/// walking boundaries from a point at least one whole period earlier, so it needs nothing
/// but [`window::calendar_end_secs`] (months have no fixed length).
fn calendar_window_us(period: QuotaPeriod, at_us: u64) -> (u64, u64) {
    const US_PER_SEC: u64 = 1_000_000;
    let at = at_us / US_PER_SEC;
    let longest = match period {
        QuotaPeriod::Month => 31 * 86_400,
        other => window::nominal_secs(other),
    };
    let mut start = window::calendar_end_secs(period, at.saturating_sub(longest));
    if start > at {
        // Only before the first boundary after the epoch (a broken clock).
        start = 0;
    }
    loop {
        let next = window::calendar_end_secs(period, start);
        if next > at || next <= start {
            return (
                start.saturating_mul(US_PER_SEC),
                next.saturating_mul(US_PER_SEC),
            );
        }
        start = next;
    }
}

/// The local limiter's interval in whole microseconds, rounded up like the local one so
/// `requests` intervals never fit in one period.
fn interval_us(r: &RateRule) -> u64 {
    r.interval_ns.div_ceil(NS_PER_US).max(1)
}

struct Args<'a> {
    cost: u64,
    max_delay_us: i64,
    lease_id: &'a str,
    lease_ttl_us: u64,
    /// Tokens reserved for token limits ([`Check::reserve`]).
    reserve: u64,
}

#[derive(Debug)]
enum ScriptResult {
    Refused {
        index: i64,
        reset_us: i64,
        now_us: i64,
    },
    /// The sidecar's calendar window did not contain Redis' now; nothing was charged.
    Stale { now_us: i64 },
    Admitted {
        delay_us: u64,
        now_us: i64,
        values: Vec<i64>,
    },
}

fn parse(v: Vec<i64>) -> Result<ScriptResult, Error> {
    match v.as_slice() {
        [0, index, reset_us, now_us] => Ok(ScriptResult::Refused {
            index: *index,
            reset_us: *reset_us,
            now_us: *now_us,
        }),
        [2, now_us] => Ok(ScriptResult::Stale { now_us: *now_us }),
        [1, delay, now_us, ..] => Ok(ScriptResult::Admitted {
            delay_us: u64::try_from(*delay).unwrap_or(0),
            now_us: *now_us,
            values: v[3..].to_vec(),
        }),
        _ => Err(Error::Redis(format!("unexpected script reply {v:?}"))),
    }
}

/// Most scopes in one script call: bounds the call's size and how long Redis runs it.
const MAX_BATCH: usize = 64;
/// Script calls in flight at once: while one runs in Redis the next one fills, so Redis
/// does not sit idle for a round trip between batches; more would only make them smaller.
const MAX_IN_FLIGHT: usize = 2;

/// One scope's decision waiting for the next batched script call.
struct Job {
    /// The scope's KEYS, as bare arguments.
    keys: redis::Cmd,
    key_count: usize,
    /// Its ARGV: key count, cost, max delay, lease id, lease TTL, four per key.
    argv: redis::Cmd,
    /// The lease id and sorted sets the script may add it to: if the caller is gone by the
    /// time the reply comes, the batch releases the lease itself (see [`run_batch`]).
    lease: Option<(String, Vec<String>)>,
    reply: oneshot::Sender<Result<Reply, Error>>,
}

/// One scope's script reply, with the sidecar's clock when its batch was sent and answered.
struct Reply {
    values: Vec<i64>,
    sent_ns: u64,
    got_ns: u64,
}

/// What every batch needs, shared by the batching task and the calls it starts.
struct BatchContext {
    conn: ConnectionManager,
    script: Script,
    clock: Arc<dyn Clock>,
    /// The timeout of the last decision (ms), shared with [`Inner`].
    timeout_ms: Arc<AtomicU64>,
    lease_ttl: Duration,
}

/// Gathers the scopes that callers queue while earlier calls are in flight and sends each
/// gathering as one script call on the shared connection, so Redis pays its per-command
/// cost (parsing, script lookup, Lua entry, `TIME`, reply) once per batch rather than once
/// per decision. A lone caller is sent at once (a batch of one): batching never waits for
/// company. Ends when the limiter (the only sender) is dropped.
async fn batch_loop(mut queue: mpsc::UnboundedReceiver<Job>, ctx: Arc<BatchContext>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        // Waiting for a slot is what lets a batch grow: callers keep queueing meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut jobs = Vec::with_capacity(queue.len().min(MAX_BATCH - 1) + 1);
        let mut next = Some(first);
        while let Some(job) = next.take() {
            // A caller that gave up (timeout) before its scope was sent: never run it, so
            // nothing is charged or leased for a request that was already answered.
            if !job.reply.is_closed() {
                jobs.push(job);
            }
            if jobs.len() < MAX_BATCH {
                next = queue.try_recv().ok();
            }
        }
        if !jobs.is_empty() {
            tokio::spawn(run_batch(jobs, ctx.clone(), slot));
        }
    }
}

/// Sends one batch, answers each caller, and releases the leases of callers that gave up
/// after their scope was sent (the script may have added the lease after the caller's own
/// release went out; this release follows the script on the same connection).
async fn run_batch(jobs: Vec<Job>, ctx: Arc<BatchContext>, _slot: OwnedSemaphorePermit) {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(ctx.script.get_hash())
        .arg(jobs.iter().map(|j| j.key_count).sum::<usize>());
    for part in jobs.iter().map(|j| &j.keys) {
        for a in part.args_iter() {
            if let redis::Arg::Simple(b) = a {
                cmd.arg(b);
            }
        }
    }
    cmd.arg(jobs.len());
    for part in jobs.iter().map(|j| &j.argv) {
        for a in part.args_iter() {
            if let redis::Arg::Simple(b) = a {
                cmd.arg(b);
            }
        }
    }
    let timeout = Duration::from_millis(ctx.timeout_ms.load(Ordering::Relaxed));
    let mut conn = ctx.conn.clone();
    let sent_ns = ctx.clock.now_ns();
    let r = tokio::time::timeout(timeout, evalsha(&mut conn, &cmd, &ctx.script)).await;
    let got_ns = ctx.clock.now_ns();
    let mut replies: Vec<Result<Vec<i64>, Error>> = match r {
        Ok(Ok(v)) if v.len() == jobs.len() => v.into_iter().map(Ok).collect(),
        Ok(Ok(v)) => {
            let msg = format!("{} script replies for {} scopes", v.len(), jobs.len());
            jobs.iter()
                .map(|_| Err(Error::Redis(msg.clone())))
                .collect()
        }
        Ok(Err(e)) => {
            let msg = e.to_string();
            jobs.iter()
                .map(|_| Err(Error::Redis(msg.clone())))
                .collect()
        }
        Err(_) => jobs
            .iter()
            .map(|_| Err(Error::RedisTimeout(timeout)))
            .collect(),
    };
    let mut abandoned = redis::pipe();
    let mut any_abandoned = false;
    for (job, reply) in jobs.into_iter().zip(replies.drain(..)) {
        let reply = reply.map(|values| Reply {
            values,
            sent_ns,
            got_ns,
        });
        if job.reply.send(reply).is_err() {
            if let Some((id, keys)) = &job.lease {
                for k in keys {
                    abandoned.cmd("ZREM").arg(k).arg(id).ignore();
                    any_abandoned = true;
                }
            }
        }
    }
    if any_abandoned {
        // Off every request path: wait as long as a lease would hold the slot.
        let r = tokio::time::timeout(
            ctx.lease_ttl.max(timeout),
            abandoned.query_async::<()>(&mut conn),
        )
        .await;
        if !matches!(r, Ok(Ok(()))) {
            tracing::debug!("redis lease release failed; it expires after its TTL");
        }
    }
}

/// `EVALSHA`, loading the script on `NOSCRIPT` (a restarted or flushed Redis) and retrying.
async fn evalsha(
    conn: &mut ConnectionManager,
    cmd: &redis::Cmd,
    script: &Script,
) -> redis::RedisResult<Vec<Vec<i64>>> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        r => r,
    }
}

struct Inner {
    conn: Option<ConnectionManager>,
    /// The document's URL (none: the environment's), to tell whether a new document still
    /// names this connection.
    source: Option<String>,
    /// The URL in use with any password redacted: the only form that is logged.
    url: String,
    prefix: String,
    up: AtomicBool,
    halted: AtomicBool,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Enforces `limit / replicas` while Redis is away; its own state, never mixed with the
    /// sidecar's local view.
    fallback: Limiter,
    /// Scopes waiting for the batching task ([`batch_loop`]); none without a connection.
    batches: Option<mpsc::UnboundedSender<Job>>,
    settings: RedisSettings,
    /// Leases held by in-flight requests (id -> sorted-set keys), renewed in the background.
    leases: Mutex<HashMap<String, Vec<String>>>,
    instance: u64,
    next_lease: AtomicU64,
    /// Timeout of the last decision, for the background calls (same bound).
    last_timeout_ms: Arc<AtomicU64>,
    /// Redis' clock minus the sidecar's (µs), as last learned from a reply: where the
    /// sidecar places calendar quota windows, and how Redis' window ends reach the local view.
    offset_us: AtomicI64,
}

/// Round-trip noise in a measured clock offset, below which the steady offset is kept.
const OFFSET_SLACK_US: u64 = 20_000;

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

fn connect(
    url: &str,
    settings: &RedisSettings,
    timeout: Duration,
) -> Result<ConnectionManager, Error> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
    if let Some(pw) = &settings.password {
        let s = info.redis_settings().clone().set_password(pw.clone());
        info = info.set_redis_settings(s);
    }
    let client = match &settings.ca_pem {
        // Exactly this CA, not the system roots: the Secret that names the server also names
        // who vouches for it. The redis crate refuses a CA with a plain `redis://` URL, so a
        // CA never silently goes unused. Verification is always on: the build has no
        // `tls-rustls-insecure`, so a `#insecure` URL fails to connect.
        Some(ca) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        )?,
        None => redis::Client::open(info)?,
    };
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
        let url = cfg.url.clone().or_else(|| settings.url.clone());
        let shown = url
            .as_deref()
            .map_or_else(|| format!("${URL_ENV} (unset)"), redact_url);
        let conn = match url {
            Some(u) => connect(&u, &settings, timeout),
            None => Err(Error::Redis(format!(
                "the policy takes its Redis URL from a Secret but {URL_ENV} is unset"
            ))),
        };
        let conn = match conn {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(url = %shown, error = %e,
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
        let last_timeout_ms = Arc::new(AtomicU64::new(cfg.timeout_ms.max(1)));
        let batches = conn.clone().map(|conn| {
            let (tx, rx) = mpsc::unbounded_channel();
            let ctx = Arc::new(BatchContext {
                conn,
                script: Script::new(DECIDE_LUA),
                clock: clock.clone(),
                timeout_ms: last_timeout_ms.clone(),
                lease_ttl: settings.lease_ttl,
            });
            tokio::spawn(batch_loop(rx, ctx));
            tx
        });
        let inner = Arc::new(Inner {
            conn,
            source: cfg.url.clone(),
            url: shown,
            prefix: cfg.key_prefix.clone(),
            up: AtomicBool::new(up),
            halted: AtomicBool::new(false),
            fallback: Limiter::new(clock.clone()),
            clock,
            metrics,
            batches,
            settings,
            leases: Mutex::new(HashMap::new()),
            instance,
            next_lease: AtomicU64::new(0),
            last_timeout_ms,
            offset_us: AtomicI64::new(0),
        });
        if inner.conn.is_some() {
            tokio::spawn(probe_loop(Arc::downgrade(&inner)));
            tokio::spawn(renew_loop(Arc::downgrade(&inner)));
        }
        Self { inner }
    }

    fn serves(&self, cfg: &RedisStore) -> bool {
        self.inner.source == cfg.url && self.inner.prefix == cfg.key_prefix
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

    /// Charges a response's reported tokens (`actual`, in place of the reservation) against
    /// the token limits of the sets a request was admitted under, in the background. While
    /// Redis is away nothing is settled: the reservation stands as the charge.
    pub fn settle(
        &self,
        key_id: u64,
        key_sets: [Option<&LimitSet>; 2],
        policy: Option<&LimitSet>,
        reserved: u64,
        actual: u64,
    ) {
        let inner = &self.inner;
        if actual == reserved || !inner.up.load(Ordering::Acquire) {
            return;
        }
        let Some(conn) = inner.conn.clone() else {
            return;
        };
        let delta = i64::try_from(actual)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(reserved).unwrap_or(i64::MAX));
        let est_us = inner.redis_now_estimate_us();
        let policy = [policy.filter(|p| !p.is_empty())];
        let cmds: Vec<redis::Cmd> = [
            Group::new(&inner.prefix, key_id, &key_sets),
            Group::new(&inner.prefix, POLICY_SCOPE_ID, &policy),
        ]
        .iter()
        .filter_map(|g| g.settle_cmd(delta, est_us))
        .collect();
        if cmds.is_empty() {
            return;
        }
        let timeout = Duration::from_millis(inner.last_timeout_ms.load(Ordering::Relaxed));
        tokio::spawn(async move {
            let mut conn = conn;
            for cmd in cmds {
                let r =
                    tokio::time::timeout(timeout, cmd.query_async::<redis::Value>(&mut conn)).await;
                if !matches!(r, Ok(Ok(_))) {
                    tracing::debug!("redis settlement failed; the reservation stands");
                }
            }
        });
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
        if inner.up.load(Ordering::Acquire) && inner.batches.is_some() {
            match tokio::time::timeout(timeout, inner.decide_redis(c, view)).await {
                Ok(Ok(d)) => return Some(d),
                Ok(Err(e)) => inner.mark_down("error", &e, Some(cfg.fail_mode)),
                Err(_) => inner.mark_down(
                    "timeout",
                    &Error::RedisTimeout(timeout),
                    Some(cfg.fail_mode),
                ),
            }
        }
        inner.fail(cfg, c)
    }
}

impl DecisionStore for RedisLimiter {
    type With<'a> = (&'a RedisStore, &'a Limiter);

    /// [`RedisLimiter::decide`]: on Redis' clock, so `mono_ns` is not used.
    fn decide_check<'a>(
        &'a self,
        (cfg, view): Self::With<'a>,
        c: &'a Check<'a>,
        _mono_ns: u64,
    ) -> impl std::future::Future<Output = Option<Decision>> + Send + 'a {
        self.decide(cfg, c, view)
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

    /// The sidecar's estimate of Redis' clock now, in µs.
    fn redis_now_estimate_us(&self) -> u64 {
        (self.clock.now_ns() / NS_PER_US)
            .saturating_add_signed(self.offset_us.load(Ordering::Relaxed))
    }

    /// Learns Redis' clock from a reply: `redis_now_us` was read between `sent_ns` and
    /// `got_ns` on the sidecar's clock. The steady offset moves only when it is off by more
    /// than round-trip noise, so window ends mirrored into the local view stay put.
    fn observe_redis_clock(&self, redis_now_us: i64, sent_ns: u64, got_ns: u64) {
        let mid_us = (sent_ns / 2 + got_ns / 2) / NS_PER_US;
        let measured = redis_now_us.saturating_sub(i64::try_from(mid_us).unwrap_or(i64::MAX));
        let current = self.offset_us.load(Ordering::Relaxed);
        if measured.abs_diff(current) > OFFSET_SLACK_US {
            self.offset_us.store(measured, Ordering::Relaxed);
        }
    }

    /// Runs one scope's decision (in the next batch) and returns the reply with the
    /// sidecar's clock when it arrived. A `Stale` reply (the calendar window was placed from a clock estimate that
    /// is off, e.g. before the first reply of a skewed sidecar, or one round trip after a
    /// boundary) is retried from Redis' own now; it is returned only if that keeps failing.
    async fn run(&self, g: &Group<'_>, a: &Args<'_>) -> Result<(ScriptResult, u64), Error> {
        let batches = self
            .batches
            .as_ref()
            .ok_or_else(|| Error::Redis("no redis connection".into()))?;
        let mut est_us = self.redis_now_estimate_us();
        let mut attempts = 0;
        loop {
            let (tx, rx) = oneshot::channel();
            batches
                .send(g.job(a, est_us, tx))
                .map_err(|_| Error::Redis("the redis batching task ended".into()))?;
            let Reply {
                values,
                sent_ns,
                got_ns,
            } = rx
                .await
                .map_err(|_| Error::Redis("the redis batching task ended".into()))??;
            let r = parse(values)?;
            let redis_now_us = match &r {
                ScriptResult::Refused { now_us, .. }
                | ScriptResult::Stale { now_us }
                | ScriptResult::Admitted { now_us, .. } => *now_us,
            };
            self.observe_redis_clock(redis_now_us, sent_ns, got_ns);
            attempts += 1;
            match r {
                ScriptResult::Stale { now_us } if attempts < 3 => {
                    est_us = u64::try_from(now_us).unwrap_or(0);
                }
                r => return Ok((r, got_ns)),
            }
        }
    }

    async fn decide_redis(
        self: &Arc<Self>,
        c: &Check<'_>,
        view: &Limiter,
    ) -> Result<Decision, Error> {
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
        let lease_keys: Vec<String> = key_group
            .lease_keys()
            .chain(policy_group.lease_keys())
            .cloned()
            .collect();
        let lease_id = if lease_keys.is_empty() {
            String::new()
        } else {
            format!(
                "{:016x}-{}",
                self.instance,
                self.next_lease.fetch_add(1, Ordering::Relaxed)
            )
        };
        // The guard exists before any script can add the lease: if this future is dropped
        // (the policy timeout) after Redis ran the script, dropping the guard still releases
        // the slot instead of leaving it taken until the lease TTL.
        let mut lease = (!lease_keys.is_empty()).then(|| self.lease(lease_id.clone(), lease_keys));
        let args = Args {
            cost: c.cost,
            max_delay_us: match (c.dry_run, c.throttle) {
                (false, Some(t)) => i64::try_from(t.max_delay_ns / NS_PER_US).unwrap_or(i64::MAX),
                _ => -1,
            },
            lease_id: &lease_id,
            lease_ttl_us: u64::try_from(self.settings.lease_ttl.as_micros()).unwrap_or(u64::MAX),
            reserve: c.reserve,
        };
        let mut status = None;
        let mut delay_us = 0;
        let mut charged: Vec<&Group<'_>> = Vec::with_capacity(2);
        for (scope, g) in [(c.key_id, &key_group), (POLICY_SCOPE_ID, &policy_group)] {
            if g.is_empty() {
                continue;
            }
            match self.run(g, &args).await? {
                (
                    ScriptResult::Admitted {
                        delay_us: d,
                        now_us,
                        values,
                    },
                    _,
                ) => {
                    let offset_us = self.offset_us.load(Ordering::Relaxed);
                    g.admitted(&values, now_us, offset_us, scope, view, &mut status);
                    delay_us = delay_us.max(d);
                    charged.push(g);
                }
                (
                    ScriptResult::Refused {
                        index,
                        reset_us,
                        now_us,
                    },
                    at_ns,
                ) => {
                    // This scope refused before adding the lease; the undo takes it out of
                    // the scopes that admitted.
                    self.spawn_undo(&charged, &args);
                    if let Some(l) = lease.take() {
                        l.disarm();
                    }
                    let mut r = g
                        .refusal(index, reset_us, now_us, at_ns)
                        .ok_or_else(|| Error::Redis(format!("script named limit {index}")))?;
                    r.dry_run = c.dry_run;
                    return Ok(if r.dry_run {
                        // DryRun forwards what it would refuse, uncharged, as local mode does.
                        Decision::Allow(Admission {
                            dry_run_refusal: Some(Box::new(r)),
                            ..Admission::default()
                        })
                    } else {
                        Decision::Refuse(r)
                    });
                }
                (ScriptResult::Stale { now_us }, _) => {
                    return Err(Error::Redis(format!(
                        "no calendar quota window contains Redis' clock ({now_us} µs) after 3 tries"
                    )));
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
                    if let Some(l) = lease.take() {
                        l.disarm();
                    }
                    let now_ns = self.clock.now_ns();
                    return Ok(Decision::Refuse(Refusal {
                        reason: ExhaustionReason::Throttled,
                        kind: LimitKind::Rate,
                        name: Arc::from("throttle"),
                        limit: u64::from(max_queue),
                        unit: Unit::Requests,
                        window_s: 0,
                        now_ns,
                        reset_at_ns: now_ns.saturating_add(delay_ns),
                        dry_run: false,
                    }));
                }
            }
        }
        Ok(Decision::Allow(Admission {
            delay_ns,
            status,
            permit: lease.map(Permit::guard),
            queued,
            dry_run_refusal: None,
        }))
    }

    /// Registers a lease for renewal and returns its guard, whose drop releases it.
    fn lease(self: &Arc<Self>, id: String, keys: Vec<String>) -> Lease {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), keys.clone());
        Lease {
            inner: self.clone(),
            id,
            keys,
        }
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

    /// Stops renewing a lease.
    fn forget(&self, id: &str) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Stops renewing a lease and removes it from Redis (sent on the same connection as,
    /// so after, the script that may have added it).
    fn release(&self, id: &str, keys: &[String]) {
        self.forget(id);
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
        // Off the request path, so it may wait longer than the policy timeout: redis-rs
        // drops a command whose caller gave up before it was written, and a release cut
        // short that way would hold the slot for the whole TTL, so wait up to that TTL.
        let timeout = self.settings.lease_ttl.max(self.timeout());
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
    cmd.arg(a.cost)
        .arg(a.max_delay_us)
        .arg(a.lease_id)
        .arg(a.lease_ttl_us)
        .arg(a.reserve);
    for rule in &g.rules {
        // The undo reads only the kind and the first parameter.
        let (kind, x, _, _) = rule.script_args(0);
        cmd.arg(kind).arg(x).arg(0).arg(0);
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

impl Lease {
    /// For a lease no script holds (its scope refused before adding it, or the undo script
    /// takes it back): stop renewing it without a round trip.
    fn disarm(mut self) {
        self.inner.forget(&self.id);
        self.keys.clear();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            self.inner.release(&self.id, &self.keys);
        }
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
        // One call per sorted set (one slot each, Cluster-friendly); EVAL rather than
        // EVALSHA: a few calls per third of a TTL, and no dependence on the script cache.
        let mut by_key: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, keys) in &live {
            for k in keys {
                by_key.entry(k).or_default().push(id);
            }
        }
        let ttl_us = u64::try_from(ttl.as_micros()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for (k, ids) in &by_key {
            pipe.cmd("EVAL")
                .arg(RENEW_LUA)
                .arg(1)
                .arg(k)
                .arg(ttl_us)
                .arg(ids)
                .ignore();
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
    fn redact_url_hides_credentials_only() {
        assert_eq!(
            redact_url("rediss://:s3cret@redis.ns.svc:6380/0"),
            "rediss://***@redis.ns.svc:6380/0"
        );
        assert_eq!(
            redact_url("redis://user:p@ss@host/1?x=@"),
            "redis://***@host/1?x=@"
        );
        assert_eq!(redact_url("redis://host:6379/0"), "redis://host:6379/0");
        let s = RedisSettings {
            url: Some("redis://:s3cret@h".into()),
            password: Some("s3cret".into()),
            ..RedisSettings::default()
        };
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn one_key_shares_one_hash_tag() {
        let set = LimitSet::compile(
            &Limits {
                rates: vec![RateWindow {
                    unit: keylimit_dataplane::Unit::Requests,
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
            parse(vec![0, 2, 5, 3]),
            Ok(ScriptResult::Refused {
                index: 2,
                reset_us: 5,
                now_us: 3
            })
        ));
        assert!(matches!(
            parse(vec![1, 0, 3, 7]),
            Ok(ScriptResult::Admitted {
                delay_us: 0,
                now_us: 3,
                ..
            })
        ));
        assert!(matches!(
            parse(vec![2, 9]),
            Ok(ScriptResult::Stale { now_us: 9 })
        ));
        assert!(parse(vec![]).is_err());
        assert!(parse(vec![0, 2, 5]).is_err());
    }

    #[test]
    fn calendar_windows_contain_their_instant() {
        use chrono::{TimeZone, Utc};
        let us = |y, mo, d, h, mi, s| {
            u64::try_from(
                Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
                    .unwrap()
                    .timestamp(),
            )
            .unwrap()
                * 1_000_000
        };
        let at = us(2026, 3, 31, 23, 59, 59) + 999_999;
        assert_eq!(
            calendar_window_us(QuotaPeriod::Month, at),
            (us(2026, 3, 1, 0, 0, 0), us(2026, 4, 1, 0, 0, 0))
        );
        assert_eq!(
            calendar_window_us(QuotaPeriod::Month, us(2026, 3, 1, 0, 0, 0)),
            (us(2026, 3, 1, 0, 0, 0), us(2026, 4, 1, 0, 0, 0))
        );
        assert_eq!(
            calendar_window_us(QuotaPeriod::Month, us(2024, 2, 29, 12, 0, 0)),
            (us(2024, 2, 1, 0, 0, 0), us(2024, 3, 1, 0, 0, 0))
        );
        // 2026-03-04 is a Wednesday; weeks start on Monday.
        assert_eq!(
            calendar_window_us(QuotaPeriod::Week, us(2026, 3, 4, 8, 0, 0)),
            (us(2026, 3, 2, 0, 0, 0), us(2026, 3, 9, 0, 0, 0))
        );
        assert_eq!(
            calendar_window_us(QuotaPeriod::Hour, us(2026, 3, 4, 8, 0, 0) - 1),
            (us(2026, 3, 4, 7, 0, 0), us(2026, 3, 4, 8, 0, 0))
        );
        for period in [
            QuotaPeriod::Minute,
            QuotaPeriod::Hour,
            QuotaPeriod::Day,
            QuotaPeriod::Week,
            QuotaPeriod::Month,
        ] {
            for at in (0..400u64).map(|i| us(2025, 12, 20, 0, 0, 0) + i * 7_777_777_777) {
                let (start, end) = calendar_window_us(period, at);
                assert!(start <= at && at < end, "{period:?} {at}: [{start}, {end})");
                assert_eq!(
                    end / 1_000_000,
                    window::calendar_end_secs(period, at / 1_000_000)
                );
                assert_eq!(
                    window::calendar_end_secs(period, start / 1_000_000 - 1),
                    start / 1_000_000,
                    "{period:?}: the start is the boundary just before"
                );
            }
        }
    }

    #[test]
    fn divided_limits_round_down_but_never_to_zero() {
        let set = LimitSet::compile(
            &Limits {
                rates: vec![RateWindow {
                    unit: keylimit_dataplane::Unit::Requests,
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
