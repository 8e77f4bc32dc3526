//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both write.
//!
//! kube-rs has none built in. This is client-go's algorithm with its safety rules kept:
//!
//! - **Another holder's expiry is judged on our own monotonic clock.** We note when we last saw
//!   the Lease record change (its resourceVersion or spec) and count the record's
//!   `leaseDurationSeconds` from that moment. Its `renewTime` was written with another machine's
//!   wall clock and is never compared with ours, so skew between nodes cannot make a held lease
//!   look free (or a free one look held).
//! - **Our claim is timed from when a successful renewal was sent**, not from when its answer
//!   came back: the apiserver wrote it no earlier than that, so every other replica first saw
//!   it no earlier either. The claim lapses [`Timing::renew_deadline`] (2/3 of the lease) after
//!   that send unless a later renewal succeeds.
//! - **Every renewal is bounded by the claim's deadline.** kube's client has no read timeout, so
//!   a stalled apiserver would otherwise hang a renewal while we still believed we lead.
//! - **The last third of the lease is the margin** between our step-down and the earliest moment
//!   another replica may take over: it absorbs clock-rate drift and a write already in flight.
//! - **Writers fence on the claim.** [`LeaderState::fenced`] refuses a write once the claim has
//!   lapsed, whether or not the renewal task has noticed yet, and cuts the write off at the
//!   claim's deadline.
//!
//! No maintained crate does this for kube 5 (checked: kube-lease-manager 0.13 compares
//! `renewTime + leaseDuration` with the local wall clock; kube-leader-election 0.44 does the
//! same and targets kube 4; kube-coordinate 2.0.0-rc targets kube 2 and reports leadership
//! from its task state rather than a deadline), so the lock stays here.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::Error;

/// The three durations of the algorithm, all derived from the lease duration the way
/// client-go's defaults are (15 s lease, 10 s renew deadline, 2 s retry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Written into the Lease: how long others wait after last seeing it change.
    pub lease: Duration,
    /// How long a claim lasts after the successful renewal's request was sent.
    pub renew_deadline: Duration,
    /// Time between attempts (renewals while leading, acquisitions while standing by).
    pub retry: Duration,
}

impl Timing {
    /// `lease` is rounded down to whole seconds (the Lease stores seconds), at least one.
    pub fn for_lease(lease: Duration) -> Self {
        let lease = Duration::from_secs(lease.as_secs().max(1));
        Self {
            lease,
            renew_deadline: lease * 2 / 3,
            retry: lease / 6,
        }
    }
}

/// What the lock decided about a Lease as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// We hold it (renewal).
    Ours,
    /// Nobody holds it, or its holder has not renewed it for a lease duration as we saw it.
    Free,
    /// Someone else holds it; it is free after `until` (our clock) unless it changes.
    Held { by: String, until: Instant },
}

/// Remembers the last Lease record seen from another holder and when we first saw it, so that
/// expiry is measured on our clock. Pure: the caller passes the time, so it is unit-tested with
/// a fake clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Option<String>, LeaseSpec, Instant)>,
}

impl Observer {
    /// Judges the record read at `now` (take `now` after the response arrived: a later
    /// observation only makes us wait longer).
    pub fn judge(
        &mut self,
        resource_version: Option<&str>,
        spec: &LeaseSpec,
        me: &str,
        now: Instant,
        default_lease: Duration,
    ) -> Verdict {
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        if holder.is_empty() {
            return Verdict::Free;
        }
        if holder == me {
            return Verdict::Ours;
        }
        let changed = match &self.last {
            Some((rv, s, _)) => rv.as_deref() != resource_version || s != spec,
            None => true,
        };
        if changed {
            self.last = Some((resource_version.map(String::from), spec.clone(), now));
        }
        let seen = self.last.as_ref().map_or(now, |(_, _, at)| *at);
        let lease = spec
            .lease_duration_seconds
            .filter(|s| *s > 0)
            .map_or(default_lease, |s| {
                Duration::from_secs(s.unsigned_abs().into())
            });
        let until = seen + lease;
        if now > until {
            Verdict::Free
        } else {
            Verdict::Held {
                by: holder.to_string(),
                until,
            }
        }
    }
}

/// A current right to write as the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub identity: String,
    /// When the claim lapses unless renewed; `None` without leader election (one replica).
    pub valid_until: Option<Instant>,
}

/// Whether this replica may write now. Cheap to clone and to ask; shared by the lock (which
/// extends or drops the claim) and every writer (which asks before each write).
#[derive(Clone, Debug)]
pub struct LeaderState {
    claim: Arc<Mutex<Option<Claim>>>,
}

impl LeaderState {
    /// Not leading until a lock grants a claim.
    pub fn standby() -> Self {
        Self {
            claim: Arc::new(Mutex::new(None)),
        }
    }

    /// Always leading: for `--no-leader-election` (a single replica).
    pub fn unconditional(identity: &str) -> Self {
        Self {
            claim: Arc::new(Mutex::new(Some(Claim {
                identity: identity.to_string(),
                valid_until: None,
            }))),
        }
    }

    /// The claim if it is still current at `now`.
    pub fn claim_at(&self, now: Instant) -> Option<Claim> {
        // A poisoned lock means a writer panicked mid-update: claim nothing.
        let c = self.claim.lock().ok()?.clone()?;
        match c.valid_until {
            Some(until) if now >= until => None,
            _ => Some(c),
        }
    }

    /// The claim if it is still current. Judged on the clock, not on the renewal task having
    /// noticed: a stalled renewal cannot keep a lapsed claim alive.
    pub fn current_claim(&self) -> Option<Claim> {
        self.claim_at(Instant::now())
    }

    pub fn is_leader_now(&self) -> bool {
        self.current_claim().is_some()
    }

    /// Runs `write` only under a current claim, and gives up on it (`Error::LeaseLost`) if it
    /// is still running when the claim lapses. Wrap every write a standby must not make.
    ///
    /// A request already sent cannot be recalled: the margin between the claim's deadline
    /// and the earliest takeover (a third of the lease) is what keeps it from landing after
    /// a new leader's first write.
    pub async fn fenced<T>(&self, write: impl Future<Output = T>) -> Result<T, Error> {
        let claim = self.current_claim().ok_or(Error::LeaseLost)?;
        match claim.valid_until {
            None => Ok(write.await),
            Some(until) => tokio::time::timeout_at(until, write)
                .await
                .map_err(|_| Error::LeaseLost),
        }
    }

    /// A renewal sent at `sent` succeeded: the claim runs to `sent + renew_deadline`.
    fn renewed(&self, identity: &str, sent: Instant, timing: Timing) {
        let until = sent + timing.renew_deadline;
        if let Ok(mut c) = self.claim.lock() {
            let later = c
                .as_ref()
                .and_then(|c| c.valid_until)
                .is_none_or(|old| until > old);
            if later {
                *c = Some(Claim {
                    identity: identity.to_string(),
                    valid_until: Some(until),
                });
            }
        }
    }

    fn lost(&self) {
        if let Ok(mut c) = self.claim.lock() {
            *c = None;
        }
    }
}

/// How one attempt on the Lease ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold it, under a claim timed from the attempt's start.
    Leading,
    /// Someone else holds it (or, while renewing, it is no longer ours).
    Standby,
    /// Our write raced another (409): read again on the next attempt.
    Conflict,
}

#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    state: LeaderState,
    observer: Arc<Mutex<Observer>>,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing: Timing::for_lease(duration),
            state: LeaderState::standby(),
            observer: Arc::new(Mutex::new(Observer::default())),
        }
    }

    /// The claim every writer checks; shared with this lock.
    pub fn state(&self) -> LeaderState {
        self.state.clone()
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// One read (and, if we may, one write) of the Lease. The caller bounds it in time; a claim
    /// it grants is timed from `start`, taken before the read.
    async fn attempt(&self, start: Instant, renewing: bool) -> Result<Attempt, Error> {
        let wall = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            if renewing {
                // Someone deleted it: we cannot know who else saw that, so stop.
                return Ok(Attempt::Standby);
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, wall, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(self.granted(start)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(e.into()),
            };
        };
        let read_at = Instant::now();
        let spec = lease.spec.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let verdict = match self.observer.lock() {
            Ok(mut o) => o.judge(
                lease.metadata.resource_version.as_deref(),
                &spec,
                &self.identity,
                read_at,
                self.timing.lease,
            ),
            Err(_) => return Err(Error::Config("lease observer poisoned".into())),
        };
        match verdict {
            Verdict::Held { by, until } => {
                debug!(holder = %by, free_in = ?until.saturating_duration_since(read_at), "lease held by another replica");
                Ok(Attempt::Standby)
            }
            // While renewing, a lease that is no longer ours is lost, even if nobody holds it.
            Verdict::Free if renewing => Ok(Attempt::Standby),
            Verdict::Ours => {
                lease.spec = Some(self.spec(spec.acquire_time, wall, transitions));
                self.replace(&lease, start).await
            }
            Verdict::Free => {
                lease.spec = Some(self.spec(None, wall, transitions + 1));
                self.replace(&lease, start).await
            }
        }
    }

    fn granted(&self, start: Instant) -> Attempt {
        self.state.renewed(&self.identity, start, self.timing);
        if self.state.is_leader_now() {
            Attempt::Leading
        } else {
            // It took longer than the whole claim: as good as not holding it.
            Attempt::Standby
        }
    }

    /// `renewTime`/`acquireTime` are informational (kubectl, humans): no replica of ours
    /// judges them.
    fn spec(&self, acquired: Option<MicroTime>, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.timing.lease.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn replace(&self, lease: &Lease, start: Instant) -> Result<Attempt, Error> {
        // resourceVersion travels with `lease`: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), lease)
            .await
        {
            Ok(_) => Ok(self.granted(start)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// One bounded attempt to take or renew the lease. `Ok(true)` means we hold a current
    /// claim now.
    pub async fn try_acquire(&self) -> Result<bool, Error> {
        let start = Instant::now();
        match tokio::time::timeout_at(
            start + self.timing.renew_deadline,
            self.attempt(start, false),
        )
        .await
        {
            Ok(r) => Ok(r? == Attempt::Leading),
            Err(_) => Ok(false),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<(), Error> {
        let mut following: Option<String> = None;
        loop {
            let start = Instant::now();
            match self.try_acquire().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return Ok(());
                }
                Ok(false) => {
                    let holder = self.holder_seen();
                    if holder.is_some() && holder != following {
                        info!(lease = %self.name, holder = ?holder, "standing by: the lease is held by another replica");
                        following = holder;
                    }
                }
                Err(e) => debug!(error = %e, "lease attempt failed"),
            }
            tokio::time::sleep_until(start + self.timing.retry).await;
        }
    }

    fn holder_seen(&self) -> Option<String> {
        self.observer
            .lock()
            .ok()?
            .last
            .as_ref()
            .and_then(|(_, s, _)| s.holder_identity.clone())
    }

    /// Renews until the claim can no longer be kept; then drops the claim (so
    /// [`LeaderState::fenced`] refuses writes) and returns `Error::LeaseLost`, on which the
    /// caller stops. Each renewal is cut off at the claim's deadline.
    pub async fn hold(&self) -> Error {
        let mut next = Instant::now() + self.timing.retry;
        loop {
            let Some(until) = self.state.current_claim().and_then(|c| c.valid_until) else {
                return self.step_down("the claim lapsed before a renewal succeeded");
            };
            tokio::time::sleep_until(next.min(until)).await;
            let start = Instant::now();
            if start >= until {
                return self.step_down("no renewal succeeded within the renew deadline");
            }
            next = start + self.timing.retry;
            match tokio::time::timeout_at(until, self.attempt(start, true)).await {
                Ok(Ok(Attempt::Leading)) => {}
                Ok(Ok(Attempt::Standby)) => {
                    return self.step_down("the lease is no longer ours");
                }
                Ok(Ok(Attempt::Conflict)) => {
                    debug!("lease renewal conflicted; reading it again");
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "lease renewal failed; retrying until the deadline");
                }
                Err(_) => {
                    return self
                        .step_down("a renewal did not complete before the claim's deadline");
                }
            }
        }
    }

    fn step_down(&self, reason: &str) -> Error {
        self.state.lost();
        warn!(lease = %self.name, identity = %self.identity, reason, "stopped leading");
        Error::LeaseLost
    }

    /// Gives the lease up on clean shutdown so a standby takes over at once. Call it only once
    /// writing has stopped. Best effort and bounded: if it fails, the lease expires by itself.
    pub async fn release(&self) -> Result<(), Error> {
        self.state.lost();
        let give_up = async {
            if let Some(mut lease) = self.api.get_opt(&self.name).await? {
                if let Some(spec) = lease.spec.as_mut() {
                    if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                        spec.holder_identity = None;
                        spec.renew_time = None;
                        self.api
                            .replace(&self.name, &PostParams::default(), &lease)
                            .await?;
                    }
                }
            }
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(self.timing.renew_deadline, give_up).await {
            Ok(r) => r,
            Err(_) => {
                warn!(lease = %self.name, "releasing the lease timed out; it will expire");
                Ok(())
            }
        }
    }

    /// Test hook: act as if a renewal sent at `sent` had succeeded.
    #[cfg(test)]
    fn pretend_renewed(&self, sent: Instant) {
        self.state.renewed(&self.identity, sent, self.timing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    const D: Duration = Duration::from_secs(15);

    fn lease(holder: Option<&str>, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(15),
            ..Default::default()
        }
    }

    fn held(v: &Verdict) -> bool {
        matches!(v, Verdict::Held { .. })
    }

    #[test]
    fn timing_follows_client_go_proportions() {
        let t = Timing::for_lease(D);
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert_eq!(t.retry, Duration::from_millis(2500));
        assert_eq!(
            Timing::for_lease(Duration::ZERO).lease,
            Duration::from_secs(1)
        );
    }

    #[test]
    fn judges_holders_on_the_local_clock() {
        let t0 = Instant::now();
        let now = Timestamp::now();
        let mut o = Observer::default();
        assert_eq!(
            o.judge(Some("1"), &lease(None, now), "a", t0, D),
            Verdict::Free
        );
        assert_eq!(
            o.judge(Some("1"), &lease(Some("a"), now), "a", t0, D),
            Verdict::Ours
        );
        let b = lease(Some("b"), now);
        assert_eq!(
            o.judge(Some("2"), &b, "a", t0, D),
            Verdict::Held {
                by: "b".into(),
                until: t0 + D
            }
        );
        // Re-reading the same record does not restart the count...
        assert!(held(&o.judge(Some("2"), &b, "a", t0 + D, D)));
        assert_eq!(
            o.judge(Some("2"), &b, "a", t0 + D + Duration::from_millis(1), D),
            Verdict::Free
        );
        // ...a renewal (new resourceVersion) does.
        let mut o = Observer::default();
        o.judge(Some("2"), &b, "a", t0, D);
        let renewed = o.judge(Some("3"), &b, "a", t0 + Duration::from_secs(10), D);
        assert_eq!(
            renewed,
            Verdict::Held {
                by: "b".into(),
                until: t0 + Duration::from_secs(25)
            }
        );
    }

    /// The holder's `renewTime` an hour in the future or the past (a skewed clock on its node,
    /// or on ours) changes nothing: the verdicts at every local instant are the same as with an
    /// accurate one. The old judge compared `renewTime` with our wall clock and took a live
    /// lease at once when it was an hour in the past.
    #[test]
    fn skewed_renew_time_does_not_change_who_leads() {
        let t0 = Instant::now();
        let now = Timestamp::now();
        let hour = SignedDuration::from_hours(1);
        let verdicts = |renewed: Timestamp| {
            let mut o = Observer::default();
            let spec = lease(Some("b"), renewed);
            [0u64, 5, 14, 15, 16, 60]
                .iter()
                .map(|s| held(&o.judge(Some("7"), &spec, "a", t0 + Duration::from_secs(*s), D)))
                .collect::<Vec<_>>()
        };
        let accurate = verdicts(now);
        assert_eq!(accurate, vec![true, true, true, true, false, false]);
        assert_eq!(verdicts(now - hour), accurate, "renewTime an hour behind");
        assert_eq!(verdicts(now + hour), accurate, "renewTime an hour ahead");
    }

    /// The safety margin: a claim timed from the request's start lapses a third of the lease
    /// before any other replica (which saw the write no earlier than it was sent) may take over,
    /// however late the response came back.
    #[test]
    fn claim_is_timed_from_the_request_and_lapses_before_takeover() {
        let t = Timing::for_lease(D);
        let state = LeaderState::standby();
        let sent = Instant::now();
        assert!(state.claim_at(sent).is_none(), "no claim before a renewal");
        // The answer arrived 9 s after the request was sent: the claim still ends at sent + 10 s.
        state.renewed("a", sent, t);
        let until = sent + t.renew_deadline;
        assert!(state.claim_at(until - Duration::from_millis(1)).is_some());
        assert!(state.claim_at(until).is_none());
        // An older renewal finishing late never shortens or extends a newer claim.
        state.renewed("a", sent - Duration::from_secs(5), t);
        assert_eq!(
            state.claim_at(sent).and_then(|c| c.valid_until),
            Some(until)
        );
        // The earliest moment another replica may take over: it saw the write at `sent` at the
        // earliest, and waits the lease from then.
        let mut o = Observer::default();
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            ..Default::default()
        };
        o.judge(Some("9"), &spec, "b", sent, D);
        let takeover = (0..=20_000u64)
            .map(|ms| sent + Duration::from_millis(ms))
            .find(|at| o.judge(Some("9"), &spec, "b", *at, D) == Verdict::Free);
        let takeover = takeover.expect("the lease frees up");
        assert!(
            takeover >= until + Duration::from_secs(5),
            "margin between step-down and takeover is a third of the lease"
        );
        state.lost();
        assert!(state.claim_at(sent).is_none());
    }

    #[tokio::test]
    async fn fenced_writes_need_a_current_claim_and_stop_at_its_deadline() {
        let state = LeaderState::standby();
        let ran = std::sync::atomic::AtomicBool::new(false);
        let r = state
            .fenced(async { ran.store(true, std::sync::atomic::Ordering::SeqCst) })
            .await;
        assert!(matches!(r, Err(Error::LeaseLost)));
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "no write without a claim"
        );

        let t = Timing {
            lease: D,
            renew_deadline: Duration::from_millis(200),
            retry: D,
        };
        state.renewed("a", Instant::now(), t);
        assert_eq!(state.fenced(async { 7 }).await.ok(), Some(7));
        // A write still running when the claim lapses is abandoned at the deadline.
        let begun = Instant::now();
        let r = state.fenced(futures::future::pending::<()>()).await;
        assert!(matches!(r, Err(Error::LeaseLost)));
        assert!(begun.elapsed() < Duration::from_secs(5));

        let single = LeaderState::unconditional("solo");
        assert!(single.is_leader_now());
        assert_eq!(single.fenced(async { 1 }).await.ok(), Some(1));
    }

    /// A stalled apiserver: it accepts connections and never answers (what SIGSTOP looks like
    /// to a client). The leader must step down at its claim's deadline instead of waiting on
    /// the renewal forever; before the fix `hold` never returned.
    #[tokio::test]
    async fn renewal_against_a_stalled_apiserver_steps_down_at_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held_open = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let url = format!("http://{addr}").parse().expect("url");
        let client = Client::try_from(kube::Config::new(url)).expect("client");
        let lock = LeaseLock::new(client, "ns", "lease", "a", Duration::from_secs(3));
        let state = lock.state();
        let sent = Instant::now();
        lock.pretend_renewed(sent);
        assert!(state.is_leader_now());
        let deadline = sent + lock.timing().renew_deadline;
        let r = tokio::time::timeout(Duration::from_secs(30), lock.hold()).await;
        let returned = Instant::now();
        held_open.abort();
        assert!(
            matches!(r, Ok(Error::LeaseLost)),
            "hold must give up on a stalled apiserver"
        );
        assert!(!state.is_leader_now());
        assert!(
            returned < deadline + Duration::from_millis(500),
            "stepped down {:?} after the deadline",
            returned.saturating_duration_since(deadline)
        );
    }
}
