//! The webhook's serving certificate.
//!
//! By default the operator is its own CA: it generates a self-signed CA and a serving
//! certificate for `<service>.<namespace>.svc`, keeps them in a Secret in its namespace (so
//! every replica serves the same certificate and a restart does not mint a new CA), rotates
//! them when a third of their validity is left, and writes the CA into the `caBundle` of its
//! MutatingWebhookConfiguration. During a rotation the bundle holds the new and the previous
//! CA, so a replica still serving the old certificate stays trusted until it reloads.
//!
//! With cert-manager (`--webhook-cert-dir`), the certificate is a mounted Secret that
//! cert-manager renews; the operator only reloads the files, and cert-manager's CA injector
//! owns the `caBundle`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::Error;

/// Annotation on the Secret recording when the serving certificate expires: the rotation
/// decision needs it, and parsing X.509 just for one date would pull in a parser.
pub const NOT_AFTER_ANNOTATION: &str = "keylimit.dev/not-after";
/// How often the Secret (or the mounted files) and the caBundle are checked. Also how long a
/// replica may serve a certificate another replica already replaced.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// A CA bundle plus the serving certificate and key it signs, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The current CA first, then (during a rotation) the previous one.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: DateTime<Utc>,
}

fn cert_err(e: impl std::fmt::Display) -> Error {
    Error::Certificate(e.to_string())
}

fn offset(t: DateTime<Utc>) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(cert_err)
}

/// Generates a fresh CA and a serving certificate for `names` (DNS names or IP addresses),
/// both valid from an hour ago (clock skew between nodes) until `now + validity`.
pub fn generate(names: &[String], validity: Duration, now: DateTime<Utc>) -> Result<Bundle, Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let validity = chrono::Duration::from_std(validity).map_err(cert_err)?;
    let not_before = offset(now - chrono::Duration::hours(1))?;
    let not_after_utc = now + validity;
    let not_after = offset(not_after_utc)?;

    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("keylimit-webhook-ca-{}", now.timestamp()),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::new(ca, &ca_key);

    let key = KeyPair::generate().map_err(cert_err)?;
    let mut leaf = CertificateParams::new(names.to_vec()).map_err(cert_err)?;
    if let Some(first) = names.first() {
        leaf.distinguished_name
            .push(DnType::CommonName, first.clone());
    }
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let cert = leaf.signed_by(&key, &issuer).map_err(cert_err)?;

    Ok(Bundle {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: not_after_utc,
    })
}

/// Rotate once less than a third of the validity is left: early enough that a failing
/// rotation is noticed (and retried every minute) long before anything expires.
pub fn needs_rotation(not_after: DateTime<Utc>, validity: Duration, now: DateTime<Utc>) -> bool {
    let third = chrono::Duration::from_std(validity / 3).unwrap_or(chrono::Duration::zero());
    now + third >= not_after
}

/// The first PEM certificate of a bundle (the newest CA).
fn first_pem_cert(pem: &str) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find("-----BEGIN CERTIFICATE-----")?;
    let end = pem[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &pem[start..end]))
}

/// The Secret holding `bundle`, in the layout of a `kubernetes.io/tls` Secret plus `ca.crt`
/// (the same layout cert-manager writes, so the two modes read alike).
pub fn to_secret(bundle: &Bundle, name: &str, namespace: &str) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", &bundle.ca_pem),
        ("tls.crt", &bundle.cert_pem),
        ("tls.key", &bundle.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "keylimit-operator".to_string(),
                )]
                .into(),
            ),
            annotations: Some(
                [(
                    NOT_AFTER_ANNOTATION.to_string(),
                    bundle.not_after.to_rfc3339(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Reads a bundle back; `None` if anything is missing (then it is regenerated).
pub fn from_secret(secret: &Secret) -> Option<Bundle> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.is_empty())
    };
    let not_after = secret
        .metadata
        .annotations
        .as_ref()?
        .get(NOT_AFTER_ANNOTATION)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())?
        .with_timezone(&Utc);
    Some(Bundle {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after,
    })
}

/// A rotated bundle: new CA and certificate, the bundle keeping the previous CA as well.
pub fn rotate(
    old: &Bundle,
    names: &[String],
    validity: Duration,
    now: DateTime<Utc>,
) -> Result<Bundle, Error> {
    let mut new = generate(names, validity, now)?;
    if let Some(prev) = first_pem_cert(&old.ca_pem) {
        new.ca_pem.push_str(&prev);
    }
    Ok(new)
}

/// Parses PEM into what rustls serves.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, Error> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Certificate("no certificate in PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| Error::Certificate(format!("private key PEM: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(cert_err)?;
    Ok(CertifiedKey::new(certs, signer))
}

/// The certificate the TLS server presents; swapped in place on rotation, so connections
/// never see a restart.
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<(Arc<CertifiedKey>, String)>>,
}

impl CertStore {
    /// Installs a certificate unless it is the one already served. Returns whether it changed.
    pub fn install(&self, cert_pem: &str, key_pem: &str) -> Result<bool, Error> {
        let same = self
            .current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(_, pem)| pem == cert_pem))
            .unwrap_or(false);
        if same {
            return Ok(false);
        }
        let key = Arc::new(certified_key(cert_pem.as_bytes(), key_pem.as_bytes())?);
        let mut slot = self
            .current
            .write()
            .map_err(|_| Error::Certificate("certificate store poisoned".into()))?;
        *slot = Some((key, cert_pem.to_string()));
        Ok(true)
    }

    pub fn is_loaded(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|(k, _)| k.clone()))
    }
}

/// Where the certificate comes from and who maintains the caBundle.
#[derive(Clone)]
pub enum Source {
    /// The operator's own CA in a Secret; `webhook_config` gets its caBundle patched.
    Generated {
        client: Client,
        namespace: String,
        secret: String,
        webhook_config: Option<String>,
        names: Vec<String>,
        validity: Duration,
    },
    /// `tls.crt`/`tls.key` in a directory (cert-manager's mounted Secret).
    Directory(PathBuf),
}

/// Loads the certificate once (so the server never starts without one), then keeps it fresh
/// in the background.
pub async fn start(source: Source, store: Arc<CertStore>) -> Result<(), Error> {
    refresh(&source, &store).await?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = refresh(&source, &store).await {
                warn!(error = %e, "refreshing the webhook certificate failed; retrying");
            }
        }
    });
    Ok(())
}

async fn refresh(source: &Source, store: &CertStore) -> Result<(), Error> {
    match source {
        Source::Directory(dir) => load_dir(dir, store).await,
        Source::Generated {
            client,
            namespace,
            secret,
            webhook_config,
            names,
            validity,
        } => {
            let bundle = ensure_secret(client, namespace, secret, names, *validity).await?;
            if store.install(&bundle.cert_pem, &bundle.key_pem)? {
                info!(secret = %secret, not_after = %bundle.not_after, "serving webhook certificate");
            }
            if let Some(cfg) = webhook_config {
                patch_ca_bundle(client, cfg, &bundle.ca_pem).await?;
            }
            Ok(())
        }
    }
}

async fn load_dir(dir: &Path, store: &CertStore) -> Result<(), Error> {
    let cert = tokio::fs::read_to_string(dir.join("tls.crt")).await?;
    let key = tokio::fs::read_to_string(dir.join("tls.key")).await?;
    if store.install(&cert, &key)? {
        info!(dir = %dir.display(), "serving webhook certificate from files");
    }
    Ok(())
}

/// The current bundle from the Secret, creating or rotating it as needed. Replicas race
/// safely: creation is first-wins (409 → read the winner's), rotation is a replace with the
/// resourceVersion read (409 → the next refresh reads the winner's).
async fn ensure_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    names: &[String],
    validity: Duration,
) -> Result<Bundle, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let now = Utc::now();
    let Some(existing) = api.get_opt(name).await? else {
        let bundle = generate(names, validity, now)?;
        return match api
            .create(&PostParams::default(), &to_secret(&bundle, name, namespace))
            .await
        {
            Ok(_) => {
                info!(%namespace, secret = %name, "generated the webhook CA and certificate");
                Ok(bundle)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let s = api.get(name).await?;
                from_secret(&s).ok_or(Error::MissingField("webhook certificate in Secret"))
            }
            Err(e) => Err(e.into()),
        };
    };
    let current = from_secret(&existing);
    let next = match &current {
        Some(b) if !needs_rotation(b.not_after, validity, now) => return Ok(b.clone()),
        Some(b) => rotate(b, names, validity, now)?,
        None => generate(names, validity, now)?,
    };
    let mut secret = to_secret(&next, name, namespace);
    secret.metadata.resource_version = existing.metadata.resource_version.clone();
    match api.replace(name, &PostParams::default(), &secret).await {
        Ok(_) => {
            info!(%namespace, secret = %name, not_after = %next.not_after, "rotated the webhook certificate");
            Ok(next)
        }
        // Another replica rotated first; keep serving what we have until the next refresh.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await?;
            from_secret(&s).ok_or(Error::MissingField("webhook certificate in Secret"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `ca_pem` into every webhook of the configuration whose caBundle differs. A JSON
/// patch with a `test` on each entry's name, so a concurrent edit of the list fails the patch
/// instead of writing a bundle into the wrong entry. Works for service and url clientConfigs.
pub async fn patch_ca_bundle(client: &Client, name: &str, ca_pem: &str) -> Result<(), Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(cfg) = api.get_opt(name).await? else {
        // Helm creates it after the Deployment; the next refresh finds it.
        warn!(webhook_config = %name, "MutatingWebhookConfiguration not found yet");
        return Ok(());
    };
    let encoded = serde_json::to_value(ByteString(ca_pem.as_bytes().to_vec()))?;
    let mut ops = Vec::new();
    for (i, w) in cfg.webhooks.unwrap_or_default().iter().enumerate() {
        if w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(ca_pem.as_bytes()) {
            continue;
        }
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w.name}));
        ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
    }
    if ops.is_empty() {
        return Ok(());
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    info!(webhook_config = %name, "caBundle updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec![
            "keylimit-webhook.keylimit-system.svc".into(),
            "127.0.0.1".into(),
        ]
    }

    #[test]
    fn generated_bundle_is_servable() {
        let now = Utc::now();
        let b = generate(&names(), Duration::from_secs(86400), now).expect("generate");
        assert!(b.ca_pem.contains("BEGIN CERTIFICATE"));
        assert!(b.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(certified_key(b.cert_pem.as_bytes(), b.key_pem.as_bytes()).is_ok());
        assert_eq!(
            b.not_after.timestamp(),
            (now + chrono::Duration::days(1)).timestamp()
        );
    }

    #[test]
    fn secret_round_trips() {
        let b = generate(&names(), Duration::from_secs(86400), Utc::now()).expect("generate");
        let s = to_secret(&b, "cert", "ns");
        let back = from_secret(&s).expect("bundle");
        assert_eq!(back.ca_pem, b.ca_pem);
        assert_eq!(back.not_after.timestamp(), b.not_after.timestamp());
        assert!(from_secret(&Secret::default()).is_none());
    }

    #[test]
    fn rotates_in_the_last_third_and_keeps_the_previous_ca() {
        let day = Duration::from_secs(86400);
        let validity = day * 30;
        let now = Utc::now();
        let na = now + chrono::Duration::days(30);
        assert!(!needs_rotation(na, validity, now));
        assert!(!needs_rotation(
            na,
            validity,
            now + chrono::Duration::days(19)
        ));
        assert!(needs_rotation(
            na,
            validity,
            now + chrono::Duration::days(20)
        ));
        assert!(needs_rotation(
            na,
            validity,
            now + chrono::Duration::days(31)
        ));

        let old = generate(&names(), validity, now).expect("generate");
        let new = rotate(&old, &names(), validity, now).expect("rotate");
        assert_eq!(new.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(new.ca_pem.ends_with(&old.ca_pem));
        // A second rotation drops the oldest CA: the bundle never grows without bound.
        let newer = rotate(&new, &names(), validity, now).expect("rotate");
        assert_eq!(newer.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!newer.ca_pem.contains(old.ca_pem.trim()));
    }

    #[test]
    fn store_swaps_certificates() {
        let store = CertStore::default();
        assert!(!store.is_loaded());
        let b = generate(&names(), Duration::from_secs(86400), Utc::now()).expect("generate");
        assert!(store.install(&b.cert_pem, &b.key_pem).expect("install"));
        assert!(!store
            .install(&b.cert_pem, &b.key_pem)
            .expect("install again"));
        assert!(store.is_loaded());
        assert!(store.install("garbage", "garbage").is_err());
    }
}
