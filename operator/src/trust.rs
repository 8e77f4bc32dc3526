//! The `keylimit-ca` ConfigMap: the CA bundle sidecars verify the operator's report endpoint
//! with, in every namespace that has a `RateLimitPolicy` (an injected pod always names one:
//! its config ConfigMap is not optional either).
//!
//! The bundle is the one the webhook certificate is served under ([`CertStore::ca_pem`]):
//! during a rotation it holds the old and the new CA, so a sidecar that has either keeps
//! verifying. The leader writes it (server-side apply, only where it differs), at start and
//! every [`INTERVAL`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::certs::CertStore;
use crate::crd::RateLimitPolicy;
use crate::webhook::{CA_CONFIG_MAP, CA_FILE};
use crate::Error;

pub const MANAGER: &str = "keylimit-operator-trust";
/// Marks the ConfigMap as keylimit's (the label every ConfigMap keylimit writes carries).
pub const MANAGED_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_VALUE: &str = "keylimit";
/// How often the bundle is checked in every namespace. A rotation's new CA reaches the
/// ConfigMaps within this, then the pods within kubelet's ConfigMap sync period; the new leaf
/// is served after `certs::Timing::propagation`, which does not wait for that, so a sidecar
/// may miss reports for about a minute once per rotation (docs/security.md). The old CA stays
/// in the bundle far longer (`Timing::retire`) than the new one takes to arrive.
pub const INTERVAL: Duration = Duration::from_secs(15);

/// The ConfigMap's content for a bundle (pure).
pub fn ca_config_map(namespace: &str, ca_pem: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CA_CONFIG_MAP,
            "namespace": namespace,
            "labels": { MANAGED_LABEL: MANAGED_VALUE },
        },
        "data": { CA_FILE: ca_pem },
    })
}

/// One pass: the bundle into every namespace with a policy where it is not already.
pub async fn publish_once(
    client: &Client,
    watch_namespace: Option<&str>,
    certs: &CertStore,
) -> Result<usize, Error> {
    let Some(ca) = certs.ca_pem() else {
        return Ok(0);
    };
    let policies: Api<RateLimitPolicy> = match watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let namespaces: BTreeSet<String> = policies
        .list_metadata(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|p| p.namespace())
        .collect();
    let mut written = 0;
    for ns in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let have = api.get_opt(CA_CONFIG_MAP).await?;
        let current = have
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d: &BTreeMap<String, String>| d.get(CA_FILE));
        if current.map(String::as_str) == Some(ca.as_str()) {
            continue;
        }
        api.patch(
            CA_CONFIG_MAP,
            &crate::apply_params(MANAGER),
            &Patch::Apply(&ca_config_map(&ns, &ca)),
        )
        .await?;
        info!(namespace = %ns, "published the report CA bundle");
        written += 1;
    }
    Ok(written)
}

/// Keeps the bundle published until `stop` resolves (the leader runs it).
pub async fn publish(
    client: Client,
    watch_namespace: Option<String>,
    certs: Arc<CertStore>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = publish_once(&client, watch_namespace.as_deref(), &certs).await {
            warn!(error = %e, "publishing the report CA bundle failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_map_carries_the_whole_bundle() {
        let two = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n";
        let cm = ca_config_map("shop", two);
        assert_eq!(cm["metadata"]["name"], CA_CONFIG_MAP);
        assert_eq!(cm["metadata"]["namespace"], "shop");
        assert_eq!(cm["data"][CA_FILE], two);
        assert_eq!(cm["metadata"]["labels"][MANAGED_LABEL], MANAGED_VALUE);
    }
}
