//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both write.
//!
//! kube-rs has none built in. This is the client-go algorithm reduced to what we need:
//! take the Lease when it is free or expired (optimistic concurrency through
//! `resourceVersion` settles races), renew it well inside its duration, and step down — by
//! returning an error the binary exits on — the moment a renewal cannot be confirmed in time.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tracing::{debug, info};

use crate::Error;

#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// What the lock decided about a Lease as read: pure, so the rules are unit-tested.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// We hold it (renewal).
    Ours,
    /// Nobody holds it, or the holder let it expire: take it.
    Free,
    /// Someone else holds it until the given time.
    Held { by: String },
}

pub fn judge(lease: &LeaseSpec, me: &str, now: Timestamp, default_duration: Duration) -> Claim {
    let holder = lease.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Claim::Free;
    }
    if holder == me {
        return Claim::Ours;
    }
    let secs = lease
        .lease_duration_seconds
        .map(i64::from)
        .unwrap_or(default_duration.as_secs() as i64);
    let renewed = lease
        .renew_time
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(Timestamp::UNIX_EPOCH);
    if renewed + SignedDuration::from_secs(secs) < now {
        Claim::Free
    } else {
        Claim::Held { by: holder }
    }
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
            duration,
        }
    }

    /// One attempt to take or renew the lease. `Ok(true)` means we hold it now.
    pub async fn try_acquire(&self) -> Result<bool, Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        match judge(&spec, &self.identity, now, self.duration) {
            Claim::Held { by } => {
                debug!(holder = %by, "lease held by another replica");
                Ok(false)
            }
            Claim::Ours => {
                lease.spec = Some(self.spec(spec.acquire_time, now, transitions));
                self.replace(&lease).await
            }
            Claim::Free => {
                lease.spec = Some(self.spec(None, now, transitions + 1));
                self.replace(&lease).await
            }
        }
    }

    fn spec(&self, acquired: Option<MicroTime>, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn replace(&self, lease: &Lease) -> Result<bool, Error> {
        // resourceVersion travels with `lease`: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<(), Error> {
        let retry = self.duration / 3;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became leader");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => debug!(error = %e, "lease attempt failed"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews until a renewal cannot be confirmed within the lease duration; then returns
    /// `Error::LeaseLost` so the caller stops writing before another replica starts.
    pub async fn hold(&self) -> Error {
        let period = self.duration / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return Error::LeaseLost,
                Err(e) => debug!(error = %e, "lease renewal failed"),
            }
            // Stop a full period before expiry, so the old leader is quiet before a new one acts.
            if last_ok.elapsed() + period >= self.duration {
                return Error::LeaseLost;
            }
        }
    }

    /// Gives the lease up on clean shutdown so a standby takes over at once.
    pub async fn release(&self) -> Result<(), Error> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await? {
            if let Some(spec) = lease.spec.as_mut() {
                if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                    self.replace(&lease).await?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_lease(holder: Option<&str>, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn judges_lease_states() {
        let d = Duration::from_secs(15);
        assert_eq!(judge(&mk_lease(None, 0, 15), "a", at(100), d), Claim::Free);
        assert_eq!(
            judge(&mk_lease(Some("a"), 0, 15), "a", at(100), d),
            Claim::Ours
        );
        assert_eq!(
            judge(&mk_lease(Some("b"), 90, 15), "a", at(100), d),
            Claim::Held { by: "b".into() }
        );
        // Exactly at expiry the holder still has it; one second later it is free.
        assert_eq!(
            judge(&mk_lease(Some("b"), 85, 15), "a", at(100), d),
            Claim::Held { by: "b".into() }
        );
        assert_eq!(
            judge(&mk_lease(Some("b"), 84, 15), "a", at(100), d),
            Claim::Free
        );
    }
}
