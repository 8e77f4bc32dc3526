//! Responses the sidecar writes itself (errors and refusals) and the rate-limit headers.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use keylimit_dataplane::{LimitHeaders, Unit};
use serde::Serialize;

use crate::limiter::window;
use crate::limiter::{LimitKind, LimitSet, LimitStatus, Refusal};
use crate::metrics::Outcome;

pub type ProxyBody = BoxBody<Bytes, crate::http::upstream::BoxError>;

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

/// A short JSON error body with a machine-readable `error` code.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::to_vec(&ErrorBody {
        error: code,
        message,
    })
    .unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn auth_failure(outcome: Outcome) -> Response<ProxyBody> {
    let (status, message) = match outcome {
        Outcome::MissingKey => (StatusCode::UNAUTHORIZED, "an API key is required"),
        Outcome::KeyDisabled => (StatusCode::FORBIDDEN, "the API key is disabled"),
        Outcome::KeyExpired => (StatusCode::FORBIDDEN, "the API key has expired"),
        _ => (StatusCode::UNAUTHORIZED, "the API key is not valid"),
    };
    let mut resp = error(status, outcome.as_str(), message);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// The peer spent its failed-key budget: 429 before any key is checked, so the answer says
/// nothing about whether this request's key is valid.
pub fn auth_throttled(retry_after_secs: u64) -> Response<ProxyBody> {
    let mut resp = error(
        StatusCode::TOO_MANY_REQUESTS,
        Outcome::AuthThrottled.as_str(),
        "too many requests with a missing or invalid API key from this address",
    );
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    resp
}

/// FailClosed with the shared store away: 503 (the client did nothing wrong, unlike a 429),
/// with `Retry-After` because the probe usually brings the store back within seconds.
pub fn store_unavailable() -> Response<ProxyBody> {
    let mut resp = error(
        StatusCode::SERVICE_UNAVAILABLE,
        Outcome::StoreUnavailable.as_str(),
        "the rate-limit store is unavailable and this policy fails closed; retry shortly",
    );
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LimitBody<'a> {
    kind: &'a str,
    name: &'a str,
    limit: u64,
    /// `requests` or `tokens`.
    unit: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RefusalBody<'a> {
    error: &'a str,
    message: &'a str,
    limit: LimitBody<'a>,
    reset_at: String,
    retry_after: u64,
}

pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// The 503 for a request shed because the app is at its adaptive concurrency limit and the
/// key over its fair share: a distinct `error` code, so clients and dashboards can tell the
/// app's overload from the key's own limits.
pub fn shed(limit: u32) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": Outcome::Shed.as_str(),
        "message": "the service is overloaded and this key is using more than its fair share; retry shortly",
        "limit": {"kind": "concurrency", "name": "load-shedding", "limit": limit, "unit": "concurrent-requests"},
        "retryAfter": 1,
    });
    let mut resp = Response::new(full(serde_json::to_vec(&body).unwrap_or_default()));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(RETRY_AFTER, HeaderValue::from(1u32));
    resp
}

/// The 429 for a refusal: JSON body naming the limit, `Retry-After`, and the limit headers
/// describing the limit that refused. `which` is the policy's choice of limit headers; only
/// `Draft` changes a 429 (no `X-RateLimit-*`).
pub fn too_many_requests(r: &Refusal, message: &str, which: LimitHeaders) -> Response<ProxyBody> {
    let retry_after = r.retry_after_secs();
    let body = RefusalBody {
        error: Outcome::from_reason(r.reason).as_str(),
        message,
        limit: LimitBody {
            kind: r.kind.as_str(),
            name: &r.name,
            limit: r.limit,
            unit: match r.kind {
                LimitKind::Concurrency => "concurrent-requests",
                _ => r.unit.as_str(),
            },
            window: (r.window_s > 0).then_some(r.window_s),
        },
        reset_at: rfc3339(r.reset_at_secs()),
        retry_after,
    };
    let mut resp = Response::new(full(serde_json::to_vec(&body).unwrap_or_default()));
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(RETRY_AFTER, HeaderValue::from(retry_after));
    limit_headers(
        h,
        &r.name,
        &LimitStatus {
            kind: r.kind,
            unit: r.unit,
            // Not looked up: the refusal carries the name.
            id: 0,
            limit: r.limit,
            window_s: r.window_s,
            remaining: 0,
            reset_secs: retry_after,
        },
        which != LimitHeaders::Draft,
    );
    resp
}

/// Structured Fields sf-string: printable ASCII with `"` and `\` escaped; anything else is
/// dropped so a strange limit name can never produce an invalid header.
fn sf_string(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `RateLimit-Policy`/`RateLimit` (draft-ietf-httpapi-ratelimit-headers) and, with
/// `x_fields`, the de-facto `X-RateLimit-*` fields for one limit named `name`. Reset values
/// are delta-seconds. Formats everything; the request path uses [`LimitHeaderCache::apply`],
/// which formats only what varies.
pub fn limit_headers(h: &mut HeaderMap, name: &str, s: &LimitStatus, x_fields: bool) {
    let name = sf_string(name);
    let policy = policy_value(&name, s.kind, s.unit, s.limit, s.window_s);
    let current = format!("{name};r={};t={}", s.remaining, s.reset_secs);
    if let Ok(v) = HeaderValue::from_str(&policy) {
        h.insert(RATELIMIT_POLICY.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&current) {
        h.insert(RATELIMIT.clone(), v);
    }
    if !x_fields {
        return;
    }
    h.insert(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(s.limit));
    h.insert(
        X_RATELIMIT_REMAINING.clone(),
        HeaderValue::from(s.remaining),
    );
    h.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from(s.reset_secs));
}

/// The header values that depend only on a limit (kind, name, size, window), not on the
/// request: `RateLimit-Policy`, `X-RateLimit-Limit` and the `"name";r=` start of `RateLimit`.
#[derive(Debug, Clone)]
pub struct LimitHeaderValues {
    kind: LimitKind,
    unit: Unit,
    name: Arc<str>,
    limit: u64,
    window_s: u64,
    policy: HeaderValue,
    limit_value: HeaderValue,
    /// `"name";r=`
    current_prefix: Box<[u8]>,
}

impl LimitHeaderValues {
    /// `None` only if the policy value is not a valid header value, which [`sf_string`] rules
    /// out; such a limit is then formatted per request by [`limit_headers`].
    fn new(
        kind: LimitKind,
        unit: Unit,
        name: &Arc<str>,
        limit: u64,
        window_s: u64,
    ) -> Option<Self> {
        let quoted = sf_string(name);
        let policy = policy_value(&quoted, kind, unit, limit, window_s);
        Some(Self {
            kind,
            unit,
            name: name.clone(),
            limit,
            window_s,
            policy: HeaderValue::from_str(&policy).ok()?,
            limit_value: HeaderValue::from(limit),
            current_prefix: format!("{quoted};r=").into_bytes().into_boxed_slice(),
        })
    }

    fn apply(&self, h: &mut HeaderMap, s: &LimitStatus, x_fields: bool) {
        h.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        if x_fields {
            h.insert(X_RATELIMIT_LIMIT.clone(), self.limit_value.clone());
        }
        apply_varying(h, &self.current_prefix, s, x_fields);
    }
}

/// `RateLimit-Policy`'s item for one limit. The draft's quota units are requests (the
/// default), content bytes and concurrent requests; a token limit says `qu="tokens"` so that
/// a client that does not know the unit can at least tell that it is not requests.
fn policy_value(quoted: &str, kind: LimitKind, unit: Unit, limit: u64, window_s: u64) -> String {
    match (kind, unit) {
        (LimitKind::Concurrency, _) => format!("{quoted};q={limit};qu=\"concurrent-requests\""),
        (_, Unit::Requests) => format!("{quoted};q={limit};w={window_s}"),
        (_, Unit::Tokens) => format!("{quoted};q={limit};w={window_s};qu=\"tokens\""),
    }
}

/// `RateLimit` (`"name";r=R;t=T`) and, with `x_fields`, `X-RateLimit-Remaining` and
/// `X-RateLimit-Reset`, written into one buffer and sliced, so the three values cost one
/// allocation. `prefix` is `"name";r=`.
fn apply_varying(h: &mut HeaderMap, prefix: &[u8], s: &LimitStatus, x_fields: bool) {
    let mut remaining = [0u8; 20];
    let remaining = decimal(s.remaining, &mut remaining);
    let mut reset = [0u8; 20];
    let reset = decimal(s.reset_secs, &mut reset);
    // "name";r=R;t=T followed by R and T again for the X- fields.
    let mut buf = Vec::with_capacity(prefix.len() + 3 + 2 * (remaining.len() + reset.len()));
    buf.extend_from_slice(prefix);
    buf.extend_from_slice(remaining);
    buf.extend_from_slice(b";t=");
    buf.extend_from_slice(reset);
    let current_end = buf.len();
    buf.extend_from_slice(remaining);
    let remaining_end = buf.len();
    buf.extend_from_slice(reset);
    let buf = Bytes::from(buf);
    if let Ok(v) = HeaderValue::from_maybe_shared(buf.slice(..current_end)) {
        h.insert(RATELIMIT.clone(), v);
    }
    if !x_fields {
        return;
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(buf.slice(current_end..remaining_end)) {
        h.insert(X_RATELIMIT_REMAINING.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(buf.slice(remaining_end..)) {
        h.insert(X_RATELIMIT_RESET.clone(), v);
    }
}

/// `n` in decimal, written at the end of `buf`.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The fixed header values of every limit a snapshot's shared limit sets hold (key defaults,
/// routes, the policy scope), built once per config load. Keys with their own overrides are
/// not in here (there can be a million of them) and are formatted per request.
#[derive(Debug, Default)]
pub struct LimitHeaderCache {
    /// The policy's choice of headers for forwarded responses.
    which: LimitHeaders,
    entries: Vec<LimitHeaderValues>,
    /// Limit id -> entry: limits of different scopes with the same name and size share one.
    by_id: Vec<(u64, usize)>,
}

impl LimitHeaderCache {
    pub fn build<'a>(which: LimitHeaders, sets: impl IntoIterator<Item = &'a LimitSet>) -> Self {
        let mut cache = Self {
            which,
            ..Self::default()
        };
        for set in sets {
            for r in &set.rates {
                cache.add(
                    r.id(),
                    LimitKind::Rate,
                    r.unit,
                    &r.name,
                    r.requests,
                    r.period_s,
                );
            }
            for q in &set.quotas {
                cache.add(
                    q.id(),
                    LimitKind::Quota,
                    q.unit,
                    &q.name,
                    q.requests,
                    window::nominal_secs(q.period),
                );
            }
        }
        cache
    }

    fn add(
        &mut self,
        id: u64,
        kind: LimitKind,
        unit: Unit,
        name: &Arc<str>,
        limit: u64,
        window_s: u64,
    ) {
        if self.by_id.iter().any(|(known, _)| *known == id) {
            return;
        }
        let same = |e: &LimitHeaderValues| {
            e.kind == kind
                && e.unit == unit
                && e.limit == limit
                && e.window_s == window_s
                && e.name == *name
        };
        let entry = match self.entries.iter().position(same) {
            Some(i) => i,
            None => match LimitHeaderValues::new(kind, unit, name, limit, window_s) {
                Some(v) => {
                    self.entries.push(v);
                    self.entries.len() - 1
                }
                None => return,
            },
        };
        self.by_id.push((id, entry));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the fixed values of limit `id` are precomputed.
    pub fn has(&self, id: u64) -> bool {
        self.by_id.iter().any(|(known, _)| *known == id)
    }

    /// The headers of a forwarded response, as the policy chose ([`LimitHeaders`]):
    /// [`limit_headers`], with the fixed values taken from the cache when it has the limit;
    /// otherwise the limit's name comes from `name_of` (the request's limit sets). A status
    /// whose limit neither knows gets no headers rather than wrong ones.
    pub fn apply<'n>(
        &self,
        h: &mut HeaderMap,
        s: &LimitStatus,
        name_of: impl FnOnce(u64) -> Option<&'n str>,
    ) {
        let x_fields = match self.which {
            LimitHeaders::OnRefusal => return,
            LimitHeaders::Draft => false,
            LimitHeaders::Full => true,
        };
        let cached = self.by_id.iter().find(|(id, _)| *id == s.id);
        match cached.and_then(|&(_, i)| self.entries.get(i)) {
            Some(fixed) => fixed.apply(h, s, x_fields),
            None => {
                if let Some(name) = name_of(s.id) {
                    limit_headers(h, name, s, x_fields);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylimit_dataplane::{self as dp, ExhaustionReason};

    /// A refusal by the rate `"minute"` (10 a minute) at `now_s`, until `reset_s`.
    fn mk_refusal(now_s: u64, reset_s: u64) -> Refusal {
        Refusal {
            unit: keylimit_dataplane::Unit::Requests,
            reason: ExhaustionReason::RateLimited,
            kind: LimitKind::Rate,
            name: Arc::from("minute"),
            limit: 10,
            window_s: 60,
            now_ns: now_s * 1_000_000_000,
            reset_at_ns: reset_s * 1_000_000_000,
            dry_run: false,
        }
    }

    #[test]
    fn refusal_body_and_headers_follow_the_documented_shape() {
        let r = mk_refusal(1_795_921_188, 1_795_921_200);
        let resp = too_many_requests(&r, "Keys Temporarily Exhausted", LimitHeaders::Full);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = resp.headers();
        assert_eq!(h["retry-after"], "12");
        assert_eq!(h["ratelimit-policy"], "\"minute\";q=10;w=60");
        assert_eq!(h["ratelimit"], "\"minute\";r=0;t=12");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "12");
    }

    /// Each policy choice of headers, on a forwarded response (cached and uncached limits) and
    /// on a 429: `Draft` is `Full` without the `X-` fields, byte for byte; `OnRefusal` writes
    /// nothing on a forwarded response and the full set on a 429.
    #[test]
    fn each_choice_of_limit_headers_writes_its_set() {
        let limits: dp::Limits = serde_json::from_value(serde_json::json!({
            "rates": [{"name": "minute", "requests": 10, "periodSeconds": 60, "burst": 0}]
        }))
        .expect("limits");
        let set = LimitSet::compile(&limits, "key");
        let cached = LimitStatus {
            remaining: 4,
            reset_secs: 6,
            ..status(LimitKind::Rate, set.rates[0].id(), 10, 60)
        };
        let uncached = LimitStatus { id: 7, ..cached };
        let draft = [RATELIMIT.as_str(), RATELIMIT_POLICY.as_str()];
        for s in [cached, uncached] {
            let forwarded = |which| {
                let mut h = HeaderMap::new();
                LimitHeaderCache::build(which, [&set]).apply(&mut h, &s, |_| Some("minute"));
                h
            };
            let full = forwarded(LimitHeaders::Full);
            assert_eq!(full.len(), 5, "{full:?}");
            let mut want = HeaderMap::new();
            for (n, v) in full.iter().filter(|(n, _)| draft.contains(&n.as_str())) {
                want.insert(n.clone(), v.clone());
            }
            assert_eq!(want.len(), 2);
            assert_eq!(forwarded(LimitHeaders::Draft), want);
            assert!(forwarded(LimitHeaders::OnRefusal).is_empty());
        }

        let r = mk_refusal(0, 6);
        let refused = |which| too_many_requests(&r, "m", which).headers().clone();
        for which in [LimitHeaders::Full, LimitHeaders::OnRefusal] {
            let h = refused(which);
            assert_eq!(h["x-ratelimit-remaining"], "0", "{which:?}");
            assert_eq!(h["ratelimit"], "\"minute\";r=0;t=6", "{which:?}");
        }
        let h = refused(LimitHeaders::Draft);
        assert_eq!(h["retry-after"], "6");
        assert_eq!(h["ratelimit"], "\"minute\";r=0;t=6");
        assert!(h.keys().all(|n| !n.as_str().starts_with("x-")), "{h:?}");
    }

    fn status(kind: LimitKind, id: u64, limit: u64, window_s: u64) -> LimitStatus {
        LimitStatus {
            unit: keylimit_dataplane::Unit::Requests,
            kind,
            id,
            limit,
            window_s,
            remaining: 0,
            reset_secs: 0,
        }
    }

    #[test]
    fn cached_limit_headers_are_byte_for_byte_the_formatted_ones() {
        let limits: dp::Limits = serde_json::from_value(serde_json::json!({
            "rates": [{"name": "min\"ute\\é", "requests": 10, "periodSeconds": 60, "burst": 0},
                      {"name": "second", "requests": 1000000, "periodSeconds": 1, "burst": 5}],
            "quotas": [{"name": "month", "requests": 5000, "period": "Month"}]
        }))
        .expect("limits");
        let set = LimitSet::compile(&limits, "key");
        // The same limits in another scope: other ids, the same header values.
        let route = LimitSet::compile(&limits, "route:/x");
        let cache = LimitHeaderCache::build(LimitHeaders::Full, [&set, &set, &route]);
        assert_eq!(cache.len(), 3, "one entry per distinct limit");
        let named = |s: &LimitSet| -> Vec<(LimitStatus, String)> {
            s.rates
                .iter()
                .map(|r| {
                    let st = status(LimitKind::Rate, r.id(), r.requests, r.period_s);
                    (st, r.name.to_string())
                })
                .chain(s.quotas.iter().map(|q| {
                    let w = window::nominal_secs(q.period);
                    (
                        status(LimitKind::Quota, q.id(), q.requests, w),
                        q.name.to_string(),
                    )
                }))
                .collect()
        };
        let mut statuses = named(&set);
        statuses.extend(named(&route));
        // Not in the cache (a key's own override, a concurrency limit): formatted per request
        // under the name the request's limit sets give.
        statuses.push((status(LimitKind::Rate, 7, 7, 60), "other".into()));
        statuses.push((status(LimitKind::Concurrency, 8, 3, 0), "c".into()));
        for (i, (s, name)) in statuses.iter().enumerate() {
            assert_eq!(cache.has(s.id), i < 6, "cache hit for {s:?}");
            for (remaining, reset) in [(0, 0), (9, 6), (u64::MAX, 1_000_000_007)] {
                let s = LimitStatus {
                    remaining,
                    reset_secs: reset,
                    ..*s
                };
                let mut want = HeaderMap::new();
                limit_headers(&mut want, name, &s, true);
                let mut got = HeaderMap::new();
                got.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from_static("stale"));
                cache.apply(&mut got, &s, |id| (id == s.id).then_some(name.as_str()));
                assert_eq!(want.len(), 5);
                assert_eq!(got, want, "{s:?}");
            }
        }
        // A limit nobody can name gets no headers, never another limit's.
        let mut h = HeaderMap::new();
        cache.apply(&mut h, &statuses[6].0, |_| None);
        assert!(h.is_empty(), "{h:?}");

        let mut h = HeaderMap::new();
        cache.apply(
            &mut h,
            &LimitStatus {
                remaining: 9,
                reset_secs: 6,
                ..statuses[0].0
            },
            |_| None,
        );
        assert_eq!(h["ratelimit-policy"], "\"min\\\"ute\\\\\";q=10;w=60");
        assert_eq!(h["ratelimit"], "\"min\\\"ute\\\\\";r=9;t=6");
        assert_eq!(h["x-ratelimit-limit"], "10");
        assert_eq!(h["x-ratelimit-remaining"], "9");
        assert_eq!(h["x-ratelimit-reset"], "6");
    }

    #[test]
    fn decimal_writes_every_digit() {
        for n in [0, 7, 10, 99, 12345, u64::MAX] {
            let mut buf = [0u8; 20];
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn sf_string_escapes_and_drops_non_printables() {
        assert_eq!(sf_string("a\"b\\c\u{7f}é"), "\"a\\\"b\\\\c\"");
    }
}
