//! What the plugin shows, computed from the API objects alone (pure: no I/O, the clock is an
//! argument), so it is tested with builders and no cluster.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use keylimit_operator::crd::{
    ApiKey, LimitsSpec, PolicyMode, QuotaPeriodSpec, QuotaSpec, RateLimitPolicy, RateSpec, RateUnit,
};
use serde::Serialize;

/// One limit of one key: the unit of `kubectl keylimit usage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitUsage {
    pub namespace: String,
    pub key: String,
    pub policy: String,
    /// The limit's name as headers and status show it (`per-minute`, `monthly`, `concurrency`).
    pub limit: String,
    /// `rate`, `quota` or `concurrency`.
    pub kind: &'static str,
    /// The allowance in words, e.g. `6/minute`.
    pub allowance: String,
    /// Requests counted in the current period, when the operator's aggregated view has them
    /// (quotas: from sidecar reports). Rates and concurrency are only known when exhausted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// `ok`, `exhausted`, `would-refuse` (DryRun) or `unknown`.
    pub state: &'static str,
    /// When an exhausted key is admitted again (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
}

impl LimitUsage {
    /// Share of the allowance used, 0..=1, when known.
    pub fn fraction(&self) -> Option<f64> {
        match (self.state, self.used, self.max) {
            ("exhausted" | "would-refuse", _, _) => Some(1.0),
            (_, Some(u), Some(m)) if m > 0 => Some((u as f64 / m as f64).min(1.0)),
            _ => None,
        }
    }
}

/// The limits that apply to `key`: the policy's, with the key's overrides replacing rates and
/// quotas by name (as the operator renders them).
pub fn effective_limits(key: &ApiKey, policy: &RateLimitPolicy) -> LimitsSpec {
    let mut limits = policy.spec.limits.clone().unwrap_or(LimitsSpec {
        rates: None,
        quotas: None,
        concurrency: None,
    });
    if let Some(o) = &key.spec.overrides {
        for r in o.rates.iter().flatten() {
            let rates = limits.rates.get_or_insert_with(Vec::new);
            match rates.iter_mut().find(|x| x.name == r.name) {
                Some(x) => *x = r.clone(),
                None => rates.push(r.clone()),
            }
        }
        for q in o.quotas.iter().flatten() {
            let quotas = limits.quotas.get_or_insert_with(Vec::new);
            match quotas.iter_mut().find(|x| x.name == q.name) {
                Some(x) => *x = q.clone(),
                None => quotas.push(q.clone()),
            }
        }
        if o.concurrency.is_some() {
            limits.concurrency = o.concurrency;
        }
    }
    limits
}

fn condition<'a>(key: &'a ApiKey, type_: &str) -> Option<&'a Condition> {
    key.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// `"monthly 9800/10000, daily 3/100"` (the status's `usage`) as (name, used, limit).
pub fn parse_usage(text: &str) -> Vec<(String, u64, u64)> {
    text.split(", ")
        .filter_map(|part| {
            let (name, counts) = part.rsplit_once(' ')?;
            let (used, limit) = counts.split_once('/')?;
            Some((name.to_string(), used.parse().ok()?, limit.parse().ok()?))
        })
        .collect()
}

fn rate_text(r: &RateSpec) -> String {
    let unit = match r.per {
        RateUnit::Second => "second",
        RateUnit::Minute => "minute",
        RateUnit::Hour => "hour",
        RateUnit::Day => "day",
    };
    format!("{}/{unit}", amount(r.counted()))
}

/// `60` for requests, `100000 tokens` for tokens.
fn amount(c: Option<(u64, bool)>) -> String {
    match c {
        Some((n, false)) => n.to_string(),
        Some((n, true)) => format!("{n} tokens"),
        None => "?".into(),
    }
}

fn quota_text(q: &QuotaSpec) -> String {
    let period = match q.period {
        QuotaPeriodSpec::Hour => "hour",
        QuotaPeriodSpec::Day => "day",
        QuotaPeriodSpec::Week => "week",
        QuotaPeriodSpec::Month => "month",
    };
    format!("{}/{period}", amount(q.counted()))
}

/// Every limit of `key` with what the operator knows about its use. `policy` is `None` when
/// the key's policy does not exist (the key then has no limits: it is refused with 401).
pub fn usage(key: &ApiKey, policy: Option<&RateLimitPolicy>) -> Vec<LimitUsage> {
    let Some(policy) = policy else {
        return vec![];
    };
    let limits = effective_limits(key, policy);
    let status = key.status.as_ref();
    let counted = status
        .and_then(|s| s.usage.as_deref())
        .map(parse_usage)
        .unwrap_or_default();
    let exhausted = condition(key, "Exhausted");
    let exhausted_true = exhausted.is_some_and(|c| c.status == "True");
    // A DryRun policy never refuses: the operator leaves Exhausted False and says in the
    // message which limit would have refused.
    let dry_run_msg = exhausted
        .filter(|c| c.status == "False" && c.message.starts_with("DryRun"))
        .map(|c| c.message.as_str());
    let dry_run = policy.spec.mode == PolicyMode::DryRun;
    let base = |limit: &str, kind: &'static str, allowance: String| {
        let refusing = exhausted
            .filter(|_| exhausted_true)
            .is_some_and(|c| names_limit(&c.message, limit, kind));
        let would = dry_run_msg.is_some_and(|m| names_limit(m, limit, kind));
        LimitUsage {
            namespace: key.metadata.namespace.clone().unwrap_or_default(),
            key: key.metadata.name.clone().unwrap_or_default(),
            policy: key.spec.policy_ref.name.clone(),
            limit: limit.to_string(),
            kind,
            allowance,
            used: None,
            max: None,
            state: if refusing {
                "exhausted"
            } else if would && dry_run {
                "would-refuse"
            } else if kind == "quota" {
                "ok"
            } else {
                // Rates and concurrency are reported only when they refuse.
                if exhausted.is_some() {
                    "ok"
                } else {
                    "unknown"
                }
            },
            resets_at: refusing
                .then(|| status.and_then(|s| s.exhausted_until.clone()))
                .flatten(),
        }
    };
    let mut rows = vec![];
    for r in limits.rates.iter().flatten() {
        rows.push(base(&r.name, "rate", rate_text(r)));
    }
    for q in limits.quotas.iter().flatten() {
        let mut row = base(&q.name, "quota", quota_text(q));
        if let Some((_, used, max)) = counted.iter().find(|(n, _, _)| n == &q.name) {
            row.used = Some(*used);
            row.max = Some(*max);
        } else if exhausted.is_some() {
            // Reports name every quota a key has used; none yet means none used.
            row.used = Some(0);
            row.max = q.counted().map(|(n, _)| n);
        }
        rows.push(row);
    }
    if let Some(c) = limits.concurrency {
        rows.push(base("concurrency", "concurrency", format!("{c} in flight")));
    }
    rows
}

/// Whether an exhaustion message is about this limit. Messages name the limit, e.g.
/// "rate per-minute 6/60s exceeded" or "quota monthly 10000/10000 used".
fn names_limit(message: &str, limit: &str, kind: &str) -> bool {
    if kind == "concurrency" {
        return message.contains("concurrency");
    }
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .any(|w| w == limit)
}

/// `[#######-------------]  35%`: a fixed-width bar, or spaces when the use is unknown.
pub fn bar(fraction: Option<f64>, width: usize) -> String {
    match fraction {
        Some(f) => {
            let f = f.clamp(0.0, 1.0);
            let filled = (f * width as f64).round() as usize;
            format!(
                "[{}{}] {:>3.0}%",
                "#".repeat(filled),
                "-".repeat(width - filled),
                f * 100.0
            )
        }
        None => format!("[{}]    ?", " ".repeat(width)),
    }
}

/// "in 1m40s" / "2m ago": how far `at` (RFC 3339) is from `now`.
pub fn relative(at: &str, now: Timestamp) -> Option<String> {
    let t: Timestamp = at.parse().ok()?;
    let secs = t.as_second() - now.as_second();
    let span = |s: i64| match s {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{s}s"),
    };
    Some(if secs >= 0 {
        format!("in {}", span(secs))
    } else {
        format!("{} ago", span(-secs))
    })
}

/// Why a key is (or is not) refused right now, in the order the sidecar checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub namespace: String,
    pub key: String,
    pub policy: String,
    /// The status callers get now, when keylimit refuses them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_with: Option<u16>,
    pub reasons: Vec<String>,
}

/// `secret_present`: whether the key's Secret exists (None: not allowed to read it).
pub fn explain(
    key: &ApiKey,
    policy: Option<&RateLimitPolicy>,
    secret_present: Option<bool>,
    now: Timestamp,
) -> Explanation {
    let mut reasons = vec![];
    let mut refused_with = None;
    let mut refuse = |code: u16, why: String, reasons: &mut Vec<String>| {
        refused_with.get_or_insert(code);
        reasons.push(why);
    };
    let policy_name = key.spec.policy_ref.name.clone();
    if key.spec.disabled {
        refuse(
            403,
            "spec.disabled is true: the key is refused with 403 key_disabled".into(),
            &mut reasons,
        );
    }
    if let Some(exp) = &key.spec.expires_at {
        if exp.parse::<Timestamp>().is_ok_and(|t| t <= now) {
            refuse(
                403,
                format!(
                    "expired at {exp} ({}): refused with 403",
                    relative(exp, now).unwrap_or_default()
                ),
                &mut reasons,
            );
        }
    }
    match policy {
        None => refuse(
            401,
            format!("RateLimitPolicy {policy_name} does not exist: the key is in no sidecar's config, so callers get 401"),
            &mut reasons,
        ),
        Some(p) if p.spec.mode == PolicyMode::DryRun => reasons.push(format!(
            "policy {policy_name} is in DryRun: limits are measured and reported, never enforced"
        )),
        Some(_) => {}
    }
    if secret_present == Some(false) {
        refuse(
            401,
            "its Secret does not exist (or lacks the keylimit.dev/secret=true label): there is no key to accept".into(),
            &mut reasons,
        );
    }
    if let Some(c) = condition(key, "Ready").filter(|c| c.status == "False") {
        // Disabled and expired keys are already explained above.
        if c.reason != "Disabled" && c.reason != "Expired" {
            refuse(
                401,
                format!("not Ready ({}): {}", c.reason, c.message),
                &mut reasons,
            );
        }
    }
    match condition(key, "Exhausted") {
        Some(c) if c.status == "True" => {
            let until = key.status.as_ref().and_then(|s| s.exhausted_until.clone());
            let when = until
                .as_deref()
                .map(|u| {
                    format!(
                        "; admitted again at {u} ({})",
                        relative(u, now).unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            refuse(
                429,
                format!("exhausted ({}): {}{when}", c.reason, c.message),
                &mut reasons,
            );
        }
        Some(c) if c.message.starts_with("DryRun") => {
            reasons.push(format!("would be refused ({}): {}", c.reason, c.message))
        }
        _ => {}
    }
    let healthy = reasons.is_empty();
    // Not a refusal: which key callers may still be using, and until when.
    let rotation = key.status.as_ref().and_then(|s| {
        Some((
            s.previous_fingerprint.as_deref()?,
            s.previous_valid_until.as_deref()?,
        ))
    });
    if let Some((fp, until)) = rotation {
        reasons.push(format!(
            "in a rotation: the previous key {fp} is also accepted, on the same counters, until {until} ({}); then it gets 403",
            relative(until, now).unwrap_or_default()
        ));
    }
    if healthy {
        reasons.push(
            "not refused: Ready, within every limit as far as the sidecars report (reports arrive every few seconds)"
                .into(),
        );
    }
    Explanation {
        namespace: key.metadata.namespace.clone().unwrap_or_default(),
        key: key.metadata.name.clone().unwrap_or_default(),
        policy: policy_name,
        refused_with,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keylimit_operator::crd::{ApiKeySpec, ApiKeyStatus, PolicyRef, RateLimitPolicySpec};

    fn mk_policy(yaml_limits: &str, mode: &str) -> RateLimitPolicy {
        let spec: RateLimitPolicySpec = serde_yaml::from_str(&format!(
            "selector: {{matchLabels: {{app: api}}}}\nmode: {mode}\nlimits:\n{yaml_limits}"
        ))
        .expect("test policy parses");
        let mut p = RateLimitPolicy::new("p", spec);
        p.metadata.namespace = Some("ns".into());
        p
    }

    fn mk_cond(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        }
    }

    fn mk_key(conditions: Vec<Condition>, usage: Option<&str>, until: Option<&str>) -> ApiKey {
        let mut k = ApiKey::new(
            "acme",
            ApiKeySpec {
                policy_ref: PolicyRef { name: "p".into() },
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
        k.status = Some(ApiKeyStatus {
            conditions,
            usage: usage.map(Into::into),
            exhausted_until: until.map(Into::into),
            ..Default::default()
        });
        k
    }

    const LIMITS: &str = "  rates: [{name: per-minute, requests: 6, per: Minute}]\n  quotas: [{name: monthly, requests: 1000, period: Month}]\n  concurrency: 4\n";

    fn now() -> Timestamp {
        "2026-11-29T12:00:00Z".parse().expect("valid")
    }

    #[test]
    fn usage_shows_each_limit_with_the_reported_quota_use() {
        let p = mk_policy(LIMITS, "Enforce");
        let k = mk_key(
            vec![
                mk_cond("Ready", "True", "Bound", ""),
                mk_cond("Exhausted", "False", "WithinLimits", ""),
            ],
            Some("monthly 250/1000"),
            None,
        );
        let rows = usage(&k, Some(&p));
        let names: Vec<_> = rows.iter().map(|r| (r.limit.as_str(), r.state)).collect();
        assert_eq!(
            names,
            [
                ("per-minute", "ok"),
                ("monthly", "ok"),
                ("concurrency", "ok")
            ]
        );
        assert_eq!(rows[1].fraction(), Some(0.25));
        assert_eq!(rows[0].fraction(), None, "a rate's use is not reported");
        assert_eq!(rows[0].allowance, "6/minute");
    }

    #[test]
    fn the_exhausting_limit_is_full_and_carries_the_reset() {
        let p = mk_policy(LIMITS, "Enforce");
        let k = mk_key(
            vec![mk_cond(
                "Exhausted",
                "True",
                "RateLimited",
                "rate per-minute 6/60s exceeded; resets 2026-11-29T12:00:10Z",
            )],
            Some("monthly 7/1000"),
            Some("2026-11-29T12:00:10Z"),
        );
        let rows = usage(&k, Some(&p));
        assert_eq!(rows[0].state, "exhausted");
        assert_eq!(rows[0].fraction(), Some(1.0));
        assert_eq!(rows[0].resets_at.as_deref(), Some("2026-11-29T12:00:10Z"));
        assert_eq!(rows[1].state, "ok", "the quota did not refuse");
        assert_eq!(rows[1].resets_at, None);
    }

    #[test]
    fn a_limit_name_inside_another_does_not_match() {
        assert!(names_limit(
            "rate per-minute 6/60s exceeded",
            "per-minute",
            "rate"
        ));
        assert!(!names_limit(
            "rate per-minute-burst 6/60s exceeded",
            "per-minute",
            "rate"
        ));
    }

    #[test]
    fn overrides_replace_policy_limits_by_name() {
        let p = mk_policy(LIMITS, "Enforce");
        let mut k = mk_key(vec![], None, None);
        k.spec.overrides = Some(
            serde_yaml::from_str("rates: [{name: per-minute, requests: 60, per: Minute}, {name: per-second, requests: 2, per: Second}]")
                .expect("valid"),
        );
        let l = effective_limits(&k, &p);
        let rates: Vec<_> = l
            .rates
            .iter()
            .flatten()
            .map(|r| (r.name.as_str(), r.requests.unwrap_or_default()))
            .collect();
        assert_eq!(rates, [("per-minute", 60), ("per-second", 2)]);
        assert_eq!(l.concurrency, Some(4));
    }

    #[test]
    fn parse_usage_reads_every_quota_and_skips_junk() {
        assert_eq!(
            parse_usage("monthly 9800/10000, daily 3/100, broken"),
            [
                ("monthly".to_string(), 9800, 10000),
                ("daily".to_string(), 3, 100)
            ]
        );
    }

    #[test]
    fn bar_is_fixed_width() {
        assert_eq!(bar(Some(0.5), 10), "[#####-----]  50%");
        assert_eq!(bar(Some(2.0), 4), "[####] 100%");
        assert_eq!(bar(None, 4).len(), bar(Some(0.1), 4).len());
    }

    #[test]
    fn explain_names_the_refusal_and_when_it_ends() {
        let p = mk_policy(LIMITS, "Enforce");
        let k = mk_key(
            vec![
                mk_cond("Ready", "True", "Bound", ""),
                mk_cond(
                    "Exhausted",
                    "True",
                    "RateLimited",
                    "rate per-minute 6/60s exceeded",
                ),
            ],
            None,
            Some("2026-11-29T12:01:40Z"),
        );
        let e = explain(&k, Some(&p), Some(true), now());
        assert_eq!(e.refused_with, Some(429));
        assert!(
            e.reasons[0].contains("RateLimited") && e.reasons[0].contains("in 1m40s"),
            "{:?}",
            e.reasons
        );
    }

    #[test]
    fn explain_puts_disabled_and_missing_policy_first() {
        let mut k = mk_key(vec![mk_cond("Ready", "False", "Disabled", "")], None, None);
        k.spec.disabled = true;
        let e = explain(&k, None, Some(true), now());
        assert_eq!(e.refused_with, Some(403));
        assert_eq!(e.reasons.len(), 2, "{:?}", e.reasons);
        assert!(e.reasons[1].contains("does not exist"));
    }

    #[test]
    fn explain_an_expired_key_and_a_healthy_one() {
        let p = mk_policy(LIMITS, "Enforce");
        let mut k = mk_key(vec![mk_cond("Ready", "True", "Bound", "")], None, None);
        assert_eq!(explain(&k, Some(&p), Some(true), now()).refused_with, None);
        k.spec.expires_at = Some("2026-11-29T11:00:00Z".into());
        let e = explain(&k, Some(&p), Some(true), now());
        assert_eq!(e.refused_with, Some(403));
        assert!(e.reasons[0].contains("1h0m ago"), "{:?}", e.reasons);
    }

    #[test]
    fn explain_says_until_when_a_rotated_out_key_works() {
        let p = mk_policy(LIMITS, "Enforce");
        let mut k = mk_key(vec![mk_cond("Ready", "True", "Bound", "")], None, None);
        if let Some(s) = k.status.as_mut() {
            s.previous_fingerprint = Some("0123456789ab".into());
            s.previous_valid_until = Some("2026-11-29T13:00:00Z".into());
        }
        let e = explain(&k, Some(&p), Some(true), now());
        assert_eq!(e.refused_with, None);
        assert!(
            e.reasons[0].contains("0123456789ab") && e.reasons[0].contains("in 1h0m"),
            "{:?}",
            e.reasons
        );
        assert!(e.reasons[1].starts_with("not refused"), "{:?}", e.reasons);
    }

    #[test]
    fn dry_run_is_explained_but_not_refused() {
        let p = mk_policy(LIMITS, "DryRun");
        let k = mk_key(
            vec![mk_cond(
                "Exhausted",
                "False",
                "RateLimited",
                "DryRun, not enforced: rate per-minute 6/60s exceeded",
            )],
            None,
            None,
        );
        let e = explain(&k, Some(&p), Some(true), now());
        assert_eq!(e.refused_with, None);
        assert_eq!(usage(&k, Some(&p))[0].state, "would-refuse");
    }
}
