//! Responses the sidecar writes itself (errors and refusals) and the rate-limit headers.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde::Serialize;

use crate::limiter::{LimitKind, LimitStatus, Refusal};
use crate::metrics::Outcome;

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

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

/// The 429 for a refusal: JSON body naming the limit, `Retry-After`, and the limit headers
/// describing the limit that refused.
pub fn too_many_requests(r: &Refusal, message: &str) -> Response<ProxyBody> {
    let retry_after = r.retry_after_secs();
    let body = RefusalBody {
        error: Outcome::from_reason(r.reason).as_str(),
        message,
        limit: LimitBody {
            kind: r.kind.as_str(),
            name: &r.name,
            limit: r.limit,
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
        &LimitStatus {
            kind: r.kind,
            name: r.name.clone(),
            limit: r.limit,
            window_s: r.window_s,
            remaining: 0,
            reset_secs: retry_after,
        },
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

/// `RateLimit-Policy`/`RateLimit` (draft-ietf-httpapi-ratelimit-headers) and the de-facto
/// `X-RateLimit-*` fields for one limit. Reset values are delta-seconds.
pub fn limit_headers(h: &mut HeaderMap, s: &LimitStatus) {
    let name = sf_string(&s.name);
    let policy = match s.kind {
        LimitKind::Concurrency => format!("{name};q={};qu=\"concurrent-requests\"", s.limit),
        _ => format!("{name};q={};w={}", s.limit, s.window_s),
    };
    let current = format!("{name};r={};t={}", s.remaining, s.reset_secs);
    if let Ok(v) = HeaderValue::from_str(&policy) {
        h.insert(RATELIMIT_POLICY.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&current) {
        h.insert(RATELIMIT.clone(), v);
    }
    h.insert(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(s.limit));
    h.insert(
        X_RATELIMIT_REMAINING.clone(),
        HeaderValue::from(s.remaining),
    );
    h.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from(s.reset_secs));
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylimit_dataplane::ExhaustionReason;
    use std::sync::Arc;

    #[test]
    fn refusal_body_and_headers_follow_the_documented_shape() {
        let r = Refusal {
            reason: ExhaustionReason::RateLimited,
            kind: LimitKind::Rate,
            name: Arc::from("minute"),
            limit: 10,
            window_s: 60,
            now_ns: 1_795_921_188 * 1_000_000_000,
            reset_at_ns: 1_795_921_200 * 1_000_000_000,
            dry_run: false,
        };
        let resp = too_many_requests(&r, "Keys Temporarily Exhausted");
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = resp.headers();
        assert_eq!(h["retry-after"], "12");
        assert_eq!(h["ratelimit-policy"], "\"minute\";q=10;w=60");
        assert_eq!(h["ratelimit"], "\"minute\";r=0;t=12");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "12");
    }

    #[test]
    fn sf_string_escapes_and_drops_non_printables() {
        assert_eq!(sf_string("a\"b\\c\u{7f}é"), "\"a\\\"b\\\\c\"");
    }
}
