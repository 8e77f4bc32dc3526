//! The webhook's serving certificate.
//!
//! By default the operator is its own CA: it generates a self-signed CA and a serving
//! certificate for `<service>.<namespace>.svc`, keeps them in a Secret in its namespace (so
//! every replica serves the same certificate and a restart does not mint a new CA), and writes
//! the CA into the `caBundle` of its MutatingWebhookConfiguration.
//!
//! Rotation (when a third of the validity is left) never serves a certificate the apiserver
//! cannot verify yet. It goes through three states recorded in the Secret, so any replica can
//! carry it on ([`Phase`], [`advance`]):
//!
//! 1. **Publishing**: a new CA and leaf are made; `ca.crt` holds the new *and* the old CA, the
//!    new leaf waits in `next.crt`/`next.key`, and every replica keeps serving the old leaf.
//! 2. **Retiring**: once the webhook configuration has shown that two-CA bundle for
//!    [`Timing::propagation`] (the apiserver's informer must have it too), the new leaf moves
//!    into `tls.crt`/`tls.key` and every replica serves it from its next refresh on. The old CA
//!    stays trusted meanwhile.
//! 3. **Stable**: [`Timing::retire`] after that (longer than a refresh, so every replica has
//!    swapped), the old CA is dropped from the bundle.
//!
//! Every wait is measured on the local monotonic clock from when this replica saw the state,
//! which is never earlier than when it was written.
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
use tokio::time::Instant;
use tracing::{info, warn};

use crate::Error;

/// Annotation on the Secret recording when the serving certificate expires: the rotation
/// decision needs it, and parsing X.509 just for one date would pull in a parser.
pub const NOT_AFTER_ANNOTATION: &str = "keylimit.dev/not-after";
/// Annotation recording when the pending (not yet served) certificate expires.
pub const NEXT_NOT_AFTER_ANNOTATION: &str = "keylimit.dev/next-not-after";
/// How often the Secret (or the mounted files) and the caBundle are checked by default. Also
/// how long a replica may serve a certificate another replica already replaced.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// The pace of refreshes and rotation steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often each replica reads the Secret and the webhook configuration.
    pub refresh: Duration,
    /// How long the webhook configuration must have shown a bundle with the new CA before the
    /// new leaf is served: the apiserver reads the configuration through an informer, so
    /// seeing it in a GET is not yet seeing it on every apiserver.
    pub propagation: Duration,
    /// How long the new leaf is served with the old CA still trusted. More than `refresh`, so
    /// every replica has swapped before the old CA goes.
    pub retire: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            refresh: REFRESH_INTERVAL,
            propagation: Duration::from_secs(10),
            retire: REFRESH_INTERVAL * 5 / 2,
        }
    }
}

/// A serving certificate and its key, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: DateTime<Utc>,
}

/// A CA bundle plus the serving certificate and key it signs, all PEM, and (while publishing
/// a rotation) the next certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The newest CA first, then (during a rotation) the previous one.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: DateTime<Utc>,
    /// Signed by the newest CA, served only once the bundle has been published.
    pub next: Option<Leaf>,
}

/// Where a rotation stands; read from the Secret, so every replica agrees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// One CA, its leaf served.
    Stable,
    /// Old and new CA in the bundle, old leaf served, new leaf waiting.
    Publishing,
    /// Old and new CA in the bundle, new leaf served.
    Retiring,
}

impl Bundle {
    pub fn phase(&self) -> Phase {
        if self.next.is_some() {
            Phase::Publishing
        } else if pem_certs(&self.ca_pem).len() > 1 {
            Phase::Retiring
        } else {
            Phase::Stable
        }
    }
}

/// What this replica has seen, by its own clock, that the rotation's steps wait on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// How long the Secret has been in its current state.
    pub state_for: Duration,
    /// How long the webhook configuration has shown exactly this bundle in every webhook;
    /// `None` if it does not show it now.
    pub published_for: Option<Duration>,
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
        next: None,
    })
}

/// Rotate once less than a third of the validity is left: early enough that a failing
/// rotation is noticed (and retried every minute) long before anything expires.
pub fn needs_rotation(not_after: DateTime<Utc>, validity: Duration, now: DateTime<Utc>) -> bool {
    let third = chrono::Duration::from_std(validity / 3).unwrap_or(chrono::Duration::zero());
    now + third >= not_after
}

/// The PEM certificates of a bundle, in order, each ending in a newline.
pub fn pem_certs(pem: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    out
}

/// The Secret holding `bundle`, in the layout of a `kubernetes.io/tls` Secret plus `ca.crt`
/// (the same layout cert-manager writes, so the two modes read alike).
pub fn to_secret(bundle: &Bundle, name: &str, namespace: &str) -> Secret {
    let mut data: BTreeMap<String, ByteString> = [
        ("ca.crt", &bundle.ca_pem),
        ("tls.crt", &bundle.cert_pem),
        ("tls.key", &bundle.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
    .collect();
    let mut annotations: BTreeMap<String, String> = [(
        NOT_AFTER_ANNOTATION.to_string(),
        bundle.not_after.to_rfc3339(),
    )]
    .into();
    if let Some(next) = &bundle.next {
        data.insert(
            "next.crt".into(),
            ByteString(next.cert_pem.clone().into_bytes()),
        );
        data.insert(
            "next.key".into(),
            ByteString(next.key_pem.clone().into_bytes()),
        );
        annotations.insert(
            NEXT_NOT_AFTER_ANNOTATION.to_string(),
            next.not_after.to_rfc3339(),
        );
    }
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
            annotations: Some(annotations),
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
    let annotations = secret.metadata.annotations.as_ref()?;
    let date = |k: &str| {
        annotations
            .get(k)
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&Utc))
    };
    // A half-written pending leaf is dropped: the next rotation step makes a new one.
    let next = match (
        text("next.crt"),
        text("next.key"),
        date(NEXT_NOT_AFTER_ANNOTATION),
    ) {
        (Some(cert_pem), Some(key_pem), Some(not_after)) => Some(Leaf {
            cert_pem,
            key_pem,
            not_after,
        }),
        _ => None,
    };
    Some(Bundle {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after: date(NOT_AFTER_ANNOTATION)?,
        next,
    })
}

/// Step 1 of a rotation: a new CA and leaf; the bundle holds the new CA and the current one
/// (never older ones), and the current leaf is still the one served.
pub fn begin_rotation(
    current: &Bundle,
    names: &[String],
    validity: Duration,
    now: DateTime<Utc>,
) -> Result<Bundle, Error> {
    let new = generate(names, validity, now)?;
    let mut ca_pem = new.ca_pem.clone();
    if let Some(cur) = pem_certs(&current.ca_pem).into_iter().next() {
        ca_pem.push_str(&cur);
    }
    Ok(Bundle {
        ca_pem,
        cert_pem: current.cert_pem.clone(),
        key_pem: current.key_pem.clone(),
        not_after: current.not_after,
        next: Some(Leaf {
            cert_pem: new.cert_pem,
            key_pem: new.key_pem,
            not_after: new.not_after,
        }),
    })
}

/// The rotation's state machine: the Secret's next state, or `None` to leave it as it is.
/// Pure (the caller passes what it has seen and when), so every transition is unit-tested.
pub fn advance(
    current: &Bundle,
    seen: Seen,
    timing: Timing,
    names: &[String],
    validity: Duration,
    now: DateTime<Utc>,
) -> Result<Option<Bundle>, Error> {
    Ok(match (current.phase(), &current.next) {
        (Phase::Stable, _) if needs_rotation(current.not_after, validity, now) => {
            Some(begin_rotation(current, names, validity, now)?)
        }
        (Phase::Publishing, Some(next))
            if seen.published_for.is_some_and(|d| d >= timing.propagation) =>
        {
            Some(Bundle {
                ca_pem: current.ca_pem.clone(),
                cert_pem: next.cert_pem.clone(),
                key_pem: next.key_pem.clone(),
                not_after: next.not_after,
                next: None,
            })
        }
        (Phase::Retiring, _) if seen.state_for >= timing.retire => Some(Bundle {
            ca_pem: pem_certs(&current.ca_pem)
                .into_iter()
                .next()
                .unwrap_or_default(),
            next: None,
            ..current.clone()
        }),
        _ => None,
    })
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
    /// Unix seconds when the served certificate expires, 0 while unknown (before the first
    /// load, or certificates from files, whose expiry cert-manager reports itself). Shared with
    /// the metrics registry as `keylimit_operator_webhook_cert_expiry_timestamp_seconds`.
    expiry: prometheus_client::metrics::gauge::Gauge,
    /// The CA bundle clients should trust (during rotation the old and the new CA), when
    /// known: sidecars get it through the `keylimit-ca` ConfigMap, and a standby verifies the
    /// leader with it when forwarding reports.
    ca: RwLock<Option<String>>,
}

impl CertStore {
    /// A store that publishes the served certificate's expiry in `expiry`.
    pub fn with_expiry_gauge(expiry: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self {
            expiry,
            ..Default::default()
        }
    }

    /// Unix seconds when the served certificate expires (0: unknown).
    pub fn expiry(&self) -> i64 {
        self.expiry.get()
    }

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

    pub fn set_ca(&self, ca_pem: &str) {
        if let Ok(mut c) = self.ca.write() {
            if c.as_deref() != Some(ca_pem) {
                *c = Some(ca_pem.to_string());
            }
        }
    }

    /// The CA bundle to trust for this certificate, if known.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca.read().ok().and_then(|c| c.clone())
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

/// What the apiserver does on a new connection to the webhook: a TLS handshake to `addr`
/// trusting exactly the CAs in `ca_pem`, for `server_name` (a DNS name or IP address).
/// `Ok(())` if the certificate served there verifies. The e2e suite watches a rotation with
/// it; it also makes a cheap self-check.
pub async fn check_served(
    addr: std::net::SocketAddr,
    server_name: &str,
    ca_pem: &str,
) -> Result<(), Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.map_err(cert_err)?).map_err(cert_err)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(cert_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).map_err(cert_err)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        connector.connect(name, tcp).await
    };
    match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(cert_err(e)),
        Err(_) => Err(Error::Certificate(format!(
            "no TLS handshake with {addr} in 10s"
        ))),
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
/// in the background at the default pace.
pub async fn start(source: Source, store: Arc<CertStore>) -> Result<(), Error> {
    start_with(source, store, Timing::default()).await
}

/// [`start`] at another pace (tests rotate within seconds).
pub async fn start_with(
    source: Source,
    store: Arc<CertStore>,
    timing: Timing,
) -> Result<(), Error> {
    let mut tracker = Tracker::default();
    refresh(&source, &store, timing, &mut tracker).await?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(timing.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = refresh(&source, &store, timing, &mut tracker).await {
                warn!(error = %e, "refreshing the webhook certificate failed; retrying");
            }
        }
    });
    Ok(())
}

/// When this replica first saw the Secret's current state and the webhook configuration
/// showing the current bundle, by its monotonic clock.
#[derive(Debug, Default)]
struct Tracker {
    secret: Option<(Option<String>, Instant)>,
    published: Option<(String, Instant)>,
}

impl Tracker {
    fn saw_secret(&mut self, resource_version: Option<String>, at: Instant) {
        if self.secret.as_ref().map(|(rv, _)| rv) != Some(&resource_version) {
            self.secret = Some((resource_version, at));
        }
    }

    fn state_for(&self, now: Instant) -> Duration {
        self.secret
            .as_ref()
            .map_or(Duration::ZERO, |(_, at)| now.saturating_duration_since(*at))
    }

    fn saw_published(&mut self, ca_pem: &str, shows: bool, at: Instant) {
        if !shows {
            self.published = None;
        } else if self.published.as_ref().map(|(ca, _)| ca.as_str()) != Some(ca_pem) {
            self.published = Some((ca_pem.to_string(), at));
        }
    }

    fn published_for(&self, ca_pem: &str, now: Instant) -> Option<Duration> {
        self.published
            .as_ref()
            .filter(|(ca, _)| ca == ca_pem)
            .map(|(_, at)| now.saturating_duration_since(*at))
    }
}

async fn refresh(
    source: &Source,
    store: &CertStore,
    timing: Timing,
    tracker: &mut Tracker,
) -> Result<(), Error> {
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
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let (mut bundle, rv) =
                read_or_create(&api, namespace, secret, names, *validity).await?;
            tracker.saw_secret(rv.clone(), Instant::now());
            if let Some(cfg) = webhook_config {
                let shows = patch_ca_bundle(client, cfg, &bundle.ca_pem).await?;
                tracker.saw_published(&bundle.ca_pem, shows, Instant::now());
            }
            let now = Instant::now();
            let seen = Seen {
                state_for: tracker.state_for(now),
                // Without a configuration to read, the Secret's age is all there is to go by.
                published_for: match webhook_config {
                    Some(_) => tracker.published_for(&bundle.ca_pem, now),
                    None => Some(tracker.state_for(now)),
                },
            };
            if bundle.phase() == Phase::Publishing && seen.published_for.is_none() {
                warn!(secret = %secret, "the new CA is not in the webhook configuration yet; still serving the old certificate");
            }
            if let Some(next) = advance(&bundle, seen, timing, names, *validity, Utc::now())? {
                let mut s = to_secret(&next, secret, namespace);
                s.metadata.resource_version = rv;
                match api.replace(secret, &PostParams::default(), &s).await {
                    Ok(written) => {
                        info!(%namespace, secret = %secret, phase = ?next.phase(), not_after = %next.not_after, "webhook certificate rotation step");
                        tracker.saw_secret(written.metadata.resource_version, Instant::now());
                        bundle = next;
                    }
                    // Another replica moved first: go on from what it wrote.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        let (b, rv) =
                            read_or_create(&api, namespace, secret, names, *validity).await?;
                        tracker.saw_secret(rv, Instant::now());
                        bundle = b;
                    }
                    Err(e) => return Err(e.into()),
                }
                if let Some(cfg) = webhook_config {
                    let shows = patch_ca_bundle(client, cfg, &bundle.ca_pem).await?;
                    tracker.saw_published(&bundle.ca_pem, shows, Instant::now());
                }
            }
            // Last: the leaf the Secret says to serve, which only ever names a leaf whose CA
            // the webhook configuration has carried for `propagation`.
            if store.install(&bundle.cert_pem, &bundle.key_pem)? {
                info!(secret = %secret, not_after = %bundle.not_after, "serving webhook certificate");
            }
            store.expiry.set(bundle.not_after.timestamp());
            store.set_ca(&bundle.ca_pem);
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
    // cert-manager writes the issuing CA next to the certificate.
    if let Ok(ca) = tokio::fs::read_to_string(dir.join("ca.crt")).await {
        if !ca.trim().is_empty() {
            store.set_ca(&ca);
        }
    }
    Ok(())
}

/// The bundle in the Secret and its resourceVersion, creating the Secret if it is missing.
/// Replicas race safely: creation is first-wins (409: read the winner's), and a Secret that
/// cannot be read as a bundle is replaced with the resourceVersion read (409: read again).
async fn read_or_create(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    names: &[String],
    validity: Duration,
) -> Result<(Bundle, Option<String>), Error> {
    let existing = api.get_opt(name).await?;
    if let Some(b) = existing.as_ref().and_then(from_secret) {
        let rv = existing.and_then(|s| s.metadata.resource_version);
        return Ok((b, rv));
    }
    let bundle = generate(names, validity, Utc::now())?;
    let mut secret = to_secret(&bundle, name, namespace);
    let written = match existing {
        None => api.create(&PostParams::default(), &secret).await,
        Some(old) => {
            warn!(%namespace, secret = %name, "the webhook certificate Secret is incomplete; regenerating it");
            secret.metadata.resource_version = old.metadata.resource_version;
            api.replace(name, &PostParams::default(), &secret).await
        }
    };
    match written {
        Ok(s) => {
            info!(%namespace, secret = %name, "generated the webhook CA and certificate");
            Ok((bundle, s.metadata.resource_version))
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await?;
            let b = from_secret(&s).ok_or(Error::MissingField("webhook certificate in Secret"))?;
            Ok((b, s.metadata.resource_version))
        }
        Err(e) => Err(e.into()),
    }
}

/// Writes `ca_pem` into every webhook of the configuration whose caBundle differs. A JSON
/// patch with a `test` on each entry's name, so a concurrent edit of the list fails the patch
/// instead of writing a bundle into the wrong entry. Works for service and url clientConfigs.
/// Returns whether every webhook of the configuration carries `ca_pem` now.
pub async fn patch_ca_bundle(client: &Client, name: &str, ca_pem: &str) -> Result<bool, Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(cfg) = api.get_opt(name).await? else {
        // Helm creates it after the Deployment; the next refresh finds it.
        warn!(webhook_config = %name, "MutatingWebhookConfiguration not found yet");
        return Ok(false);
    };
    let hooks = cfg.webhooks.unwrap_or_default();
    if hooks.is_empty() {
        return Ok(false);
    }
    let encoded = serde_json::to_value(ByteString(ca_pem.as_bytes().to_vec()))?;
    let mut ops = Vec::new();
    for (i, w) in hooks.iter().enumerate() {
        if w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(ca_pem.as_bytes()) {
            continue;
        }
        ops.push(serde_json::json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": w.name}));
        ops.push(serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
    }
    if ops.is_empty() {
        return Ok(true);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    let patched = api
        .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    info!(webhook_config = %name, "caBundle updated");
    let hooks = patched.webhooks.unwrap_or_default();
    Ok(!hooks.is_empty()
        && hooks.iter().all(|w| {
            w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(ca_pem.as_bytes())
        }))
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
    fn rotates_in_the_last_third() {
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
    }

    /// Whether a TLS client trusting exactly `ca_pem` accepts `leaf_pem` for 127.0.0.1 (what
    /// the apiserver does with the caBundle).
    fn trusts(ca_pem: &str, leaf_pem: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
            let _ = roots.add(c);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let Ok(v) =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
        else {
            return false;
        };
        let Some(Ok(leaf)) = CertificateDer::pem_slice_iter(leaf_pem.as_bytes()).next() else {
            return false;
        };
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
        v.verify_server_cert(&leaf, &[], &name, &[], rustls_pki_types::UnixTime::now())
            .is_ok()
    }

    /// The rotation walks Stable -> Publishing -> Retiring -> Stable, each step only once what
    /// it waits on has been seen for long enough, and no step ever serves a leaf the bundle
    /// published before that step does not trust. The one-step rotation this replaced (new
    /// leaf served at once, new CA published alongside) fails the last assertion.
    #[test]
    fn rotation_publishes_the_new_ca_before_serving_its_leaf() {
        let validity = Duration::from_secs(3000);
        let timing = Timing {
            refresh: Duration::from_secs(1),
            propagation: Duration::from_secs(10),
            retire: Duration::from_secs(150),
        };
        let t0 = Utc::now();
        let seen = |state_for: u64, published_for: Option<u64>| Seen {
            state_for: Duration::from_secs(state_for),
            published_for: published_for.map(Duration::from_secs),
        };
        let step = |b: &Bundle, s: Seen, at: DateTime<Utc>| {
            advance(b, s, timing, &names(), validity, at).expect("advance")
        };
        let first = generate(&names(), validity, t0).expect("generate");
        assert_eq!(first.phase(), Phase::Stable);
        assert!(trusts(&first.ca_pem, &first.cert_pem));
        assert_eq!(step(&first, seen(999, Some(999)), t0), None, "too early");

        let late = t0 + chrono::Duration::seconds(2001);
        let publishing = step(&first, seen(0, None), late).expect("rotation starts");
        assert_eq!(publishing.phase(), Phase::Publishing);
        let cas = pem_certs(&publishing.ca_pem);
        assert_eq!(cas.len(), 2);
        assert_eq!(cas[1], first.ca_pem, "the current CA stays trusted");
        assert_eq!(publishing.cert_pem, first.cert_pem, "old leaf still served");
        let next = publishing.next.clone().expect("pending leaf");
        assert!(trusts(&cas[0], &next.cert_pem));
        assert!(!trusts(&first.ca_pem, &next.cert_pem));

        // Not in the webhook configuration, or not for long enough: keep serving the old leaf.
        assert_eq!(step(&publishing, seen(500, None), late), None);
        assert_eq!(step(&publishing, seen(500, Some(9)), late), None);
        let retiring = step(&publishing, seen(500, Some(10)), late).expect("serve the new leaf");
        assert_eq!(retiring.phase(), Phase::Retiring);
        assert_eq!(retiring.cert_pem, next.cert_pem);
        assert_eq!(retiring.ca_pem, publishing.ca_pem, "both CAs still trusted");

        assert_eq!(step(&retiring, seen(149, Some(149)), late), None);
        let stable = step(&retiring, seen(150, Some(150)), late).expect("drop the old CA");
        assert_eq!(stable.phase(), Phase::Stable);
        assert_eq!(pem_certs(&stable.ca_pem), vec![cas[0].clone()]);
        assert!(trusts(&stable.ca_pem, &stable.cert_pem));
        assert_eq!(step(&stable, seen(999, Some(999)), late), None);

        // Each state survives the Secret, so any replica can take the next step.
        for b in [&publishing, &retiring, &stable] {
            let back = from_secret(&to_secret(b, "cert", "ns")).expect("bundle");
            assert_eq!(&back.next, &b.next);
            assert_eq!(back.phase(), b.phase());
        }
        // A Secret written by the one-step rotation (two CAs, new leaf) just retires the old CA.
        let legacy = Bundle {
            ca_pem: format!("{}{}", cas[0], first.ca_pem),
            next: None,
            ..retiring.clone()
        };
        assert_eq!(legacy.phase(), Phase::Retiring);

        // The invariant, over the whole walk: whatever a step serves, the bundle published
        // before that step (what the apiserver may still hold) already trusts it, and a step
        // never changes the bundle and the served leaf together.
        for (before, after) in [
            (&first, &publishing),
            (&publishing, &retiring),
            (&retiring, &stable),
        ] {
            assert!(
                trusts(&before.ca_pem, &after.cert_pem),
                "{:?} -> {:?} serves a leaf the published bundle does not trust",
                before.phase(),
                after.phase()
            );
            assert!(before.ca_pem == after.ca_pem || before.cert_pem == after.cert_pem);
        }
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
