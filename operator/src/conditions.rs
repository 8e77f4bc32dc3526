//! metav1.Condition bookkeeping: `lastTransitionTime` moves only on a real status change, so
//! `kubectl describe` tells users when something actually happened.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// On a RateLimitPolicy: False while fresh sidecar reports say they reject the config they
/// are given (and serve an older one); written by the report aggregation (reports.rs).
pub const CONFIG_LOADED: &str = "ConfigLoaded";
/// On a policy with `loadShedding`: True while sidecars shed requests of keys over their
/// fair share because the app is at its adaptive concurrency limit.
pub const LOAD_SHEDDING: &str = "LoadShedding";

/// A condition as reconcile wants it to be; the timestamp is filled in by [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// Builds the condition, keeping the previous `lastTransitionTime` if the status is unchanged.
pub fn merge(
    existing: &[Condition],
    want: &Desired,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = status_str(want.status);
    let last_transition_time = existing
        .iter()
        .find(|c| c.type_ == want.type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: want.type_.to_string(),
        status: status.to_string(),
        reason: want.reason.clone(),
        message: want.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// True when `existing` already says what `want` says (ignoring timestamps), so no write is needed.
pub fn is_current(existing: &[Condition], want: &Desired, generation: Option<i64>) -> bool {
    existing.iter().any(|c| {
        c.type_ == want.type_
            && c.status == status_str(want.status)
            && c.reason == want.reason
            && c.message == want.message
            && c.observed_generation == generation
    })
}

/// The condition of a type, if present.
pub fn find<'a>(existing: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    existing.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let want = Desired::new("Ready", true, "Bound", "ok");
        let c1 = merge(&[], &want, Some(1), ts(100));
        assert_eq!(c1.last_transition_time, Time(ts(100)));
        // Same status, new message: time is kept.
        let want2 = Desired::new("Ready", true, "Bound", "still ok");
        let c2 = merge(std::slice::from_ref(&c1), &want2, Some(2), ts(200));
        assert_eq!(c2.last_transition_time, Time(ts(100)));
        assert_eq!(c2.message, "still ok");
        // Status flips: time moves.
        let want3 = Desired::new("Ready", false, "SecretNotFound", "gone");
        let c3 = merge(&[c2], &want3, Some(2), ts(300));
        assert_eq!(c3.last_transition_time, Time(ts(300)));
        assert_eq!(c3.status, "False");
    }

    #[test]
    fn is_current_compares_everything_but_time() {
        let want = Desired::new("Ready", true, "Bound", "ok");
        let c = merge(&[], &want, Some(1), ts(1));
        assert!(is_current(std::slice::from_ref(&c), &want, Some(1)));
        assert!(!is_current(std::slice::from_ref(&c), &want, Some(2)));
        assert!(!is_current(
            &[c],
            &Desired::new("Ready", false, "Bound", "ok"),
            Some(1)
        ));
    }
}
