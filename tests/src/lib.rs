//! Support for the end-to-end suite: a namespace per test, the real operator and sidecar
//! binaries as child processes, kubelet's ConfigMap projection, a real upstream, and bounded
//! waits that fail with a message naming what did not happen.
#![forbid(unsafe_code)]

pub mod project;
pub mod upstream;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace};
use keylimit_operator::crd::{ApiKey, RateLimitPolicy};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::wait::{await_condition, Condition};
use kube::{Api, Client, Resource};
use serde_json::Value;

/// Where cargo put the binaries under test.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug").join(name)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One test's world: a fresh namespace and the processes it started.
pub struct Env {
    pub client: Client,
    pub ns: String,
    pub dir: tempfile::TempDir,
    procs: Vec<(String, PathBuf)>,
}

impl Env {
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn apply_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        kubectl(&["apply", "-n", &self.ns, "-f", "-"], Some(yaml))
            .await
            .map(|_| ())
    }

    /// Starts the operator scoped to this namespace, with leader election on a Lease here.
    /// Without the TLS (webhook) server: these scenarios test what the operator does with
    /// reports, so they post them in plain HTTP to the admin port, which then has to allow
    /// it; tests/tests/report_tls.rs covers the TLS transport and the refusal by default.
    pub async fn start_operator(&mut self, identity: &str) -> anyhow::Result<Proc> {
        let port = free_port()?;
        let admin = format!("127.0.0.1:{port}");
        let ns = self.ns.clone();
        let p = self
            .spawn(
                &format!("operator-{identity}"),
                &bin("keylimit-operator"),
                &[
                    "run",
                    "--watch-namespace",
                    &ns,
                    "--lease-namespace",
                    &ns,
                    "--identity",
                    identity,
                    "--lease-seconds",
                    "6",
                    "--admin-addr",
                    &admin,
                    "--allow-plaintext-reports",
                ],
            )
            .await?;
        Ok(p.with_admin(port))
    }

    /// Starts a sidecar reading `config_dir`, proxying to `upstream`. Unless `extra` names one,
    /// the sidecar gets the namespace's key-hash key as `--hash-key-file`, written from the
    /// operator's `keylimit-hash-key` Secret (what the webhook's projected volume mounts).
    pub async fn start_sidecar(
        &mut self,
        name: &str,
        config_dir: &Path,
        upstream: SocketAddr,
        extra: &[&str],
    ) -> anyhow::Result<Proc> {
        let port = free_port()?;
        let admin = free_port()?;
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--admin-listen".to_string(),
            format!("127.0.0.1:{admin}"),
            "--upstream".to_string(),
            format!("http://{upstream}"),
            "--config-dir".to_string(),
            config_dir.display().to_string(),
            "--sidecar-name".to_string(),
            name.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--hash-key-file") {
            let file = self.hash_key_file().await?;
            args.extend(["--hash-key-file".to_string(), file.display().to_string()]);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = self
            .spawn(&format!("sidecar-{name}"), &bin("keylimit-sidecar"), &argv)
            .await?;
        let p = p.with_admin(admin).with_port(port);
        p.await_ready(Duration::from_secs(30)).await?;
        Ok(p)
    }

    /// Writes the namespace's key-hash key (once the operator has created its Secret) into a
    /// file, as kubelet would project it for an injected sidecar.
    pub async fn hash_key_file(&self) -> anyhow::Result<PathBuf> {
        let api: Api<k8s_openapi::api::core::v1::Secret> = self.api();
        let s = eventually(
            Duration::from_secs(30),
            "the keylimit-hash-key Secret",
            || async { api.get_opt("keylimit-hash-key").await.ok().flatten() },
        )
        .await?;
        let key = s
            .data
            .unwrap_or_default()
            .remove("key")
            .ok_or_else(|| anyhow!("keylimit-hash-key has no data key 'key'"))?;
        let file = self
            .dir
            .path()
            .join(format!("hash-key-{}", rand::random::<u16>()));
        std::fs::write(&file, key.0)?;
        Ok(file)
    }

    /// Projects the policy's ConfigMaps into a fresh directory, as kubelet would.
    pub fn project(&self, policy: &str) -> anyhow::Result<(PathBuf, tokio::task::JoinHandle<()>)> {
        let dir = self
            .dir
            .path()
            .join(format!("config-{policy}-{}", rand::random::<u16>()));
        std::fs::create_dir_all(&dir)?;
        let (client, ns, p, d) = (
            self.client.clone(),
            self.ns.clone(),
            policy.to_string(),
            dir.clone(),
        );
        let task = tokio::spawn(async move {
            if let Err(e) = project::project(client, &ns, &p, d).await {
                tracing::error!(error = %e, "projection failed");
            }
        });
        Ok((dir, task))
    }

    pub async fn spawn(&mut self, name: &str, path: &Path, args: &[&str]) -> anyhow::Result<Proc> {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(path)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        self.procs.push((name.to_string(), log.clone()));
        Ok(Proc {
            child,
            log,
            admin_port: None,
            port: None,
        })
    }

    /// Prints what a human would look at first when a test fails.
    pub async fn dump(&self) {
        eprintln!("===== state of namespace {} =====", self.ns);
        for args in [
            vec![
                "get",
                "apikeys,ratelimitpolicies,configmaps,secrets,leases",
                "-o",
                "wide",
            ],
            vec!["get", "apikeys,ratelimitpolicies", "-o", "yaml"],
        ] {
            let mut a = args.clone();
            a.extend(["-n", self.ns.as_str()]);
            match kubectl(&a, None).await {
                Ok(out) => eprintln!("$ kubectl {}\n{out}", a.join(" ")),
                Err(e) => eprintln!("kubectl {}: {e}", a.join(" ")),
            }
        }
        let events: Api<Event> = self.api();
        if let Ok(list) = events.list(&ListParams::default()).await {
            for e in list.items {
                eprintln!(
                    "event {} {}: {}",
                    e.reason.unwrap_or_default(),
                    e.involved_object.name.unwrap_or_default(),
                    e.message.unwrap_or_default()
                );
            }
        }
        for (name, log) in &self.procs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("----- {name} log (last {} lines) -----", tail.len());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Runs one scenario in its own namespace; dumps the state if it fails, and always deletes
/// the namespace.
pub async fn scenario<F>(name: &str, body: F)
where
    F: AsyncFnOnce(&mut Env) -> anyhow::Result<()>,
{
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => panic!("no cluster: set KUBECONFIG (hack/controlplane.sh up): {e}"),
    };
    let ns = format!("e2e-{name}-{:04x}", rand::random::<u16>());
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let obj = Namespace {
        metadata: ObjectMeta {
            name: Some(ns.clone()),
            labels: Some([("keylimit.dev/e2e".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    if let Err(e) = nsapi.create(&PostParams::default(), &obj).await {
        panic!("creating namespace {ns}: {e}");
    }
    let mut env = Env {
        client: client.clone(),
        ns: ns.clone(),
        dir: match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        },
        procs: vec![],
    };
    let result = body(&mut env).await;
    if let Err(e) = &result {
        env.dump().await;
        eprintln!("scenario {name} failed: {e:#}");
    }
    let _ = nsapi.delete(&ns, &DeleteParams::default()).await;
    drop(env);
    if let Err(e) = result {
        panic!("scenario {name}: {e:#}");
    }
}

/// A child process; killed when dropped.
pub struct Proc {
    pub child: tokio::process::Child,
    pub log: PathBuf,
    pub admin_port: Option<u16>,
    pub port: Option<u16>,
}

impl Proc {
    fn with_admin(mut self, port: u16) -> Self {
        self.admin_port = Some(port);
        self
    }

    fn with_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port.unwrap_or_default())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.admin_port.unwrap_or_default()
        )
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn await_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.admin_url("/readyz");
        eventually(
            timeout,
            &format!("{} to become ready", self.log.display()),
            || async {
                match get(&url, &[]).await {
                    Ok(r) if r.status == 200 => Some(()),
                    _ => None,
                }
            },
        )
        .await
    }

    /// SIGTERM, then wait for exit within `grace`.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.send_sigterm()?;
        self.await_exit(grace).await
    }

    pub fn send_sigterm(&self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        Ok(())
    }

    /// Whether the process is still running (not yet reaped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn await_exit(
        &mut self,
        grace: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(r) => Ok(r?),
            Err(_) => bail!(
                "{} did not exit within {grace:?} of SIGTERM",
                self.log.display()
            ),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Polls `check` until it yields a value or `timeout` passes. The poll interval is short and
/// the deadline hard, so a failure says what did not happen instead of hanging.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
    }
}

/// `kube::runtime::wait::await_condition` with a deadline and a message.
pub async fn await_object<K, C>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: C,
) -> anyhow::Result<K>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    C: Condition<K>,
{
    let fut = await_condition(api.clone(), name, cond);
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => bail!("{name} was deleted while waiting for {what}"),
        Ok(Err(e)) => Err(anyhow!("watching {name} for {what}: {e}")),
        Err(_) => bail!("timed out after {timeout:?} waiting for {name}: {what}"),
    }
}

/// Condition: the object's status has a condition of `type_` with `status`.
pub fn has_condition<K>(type_: &'static str, status: &'static str) -> impl Condition<K>
where
    K: serde::Serialize,
{
    move |obj: Option<&K>| {
        obj.and_then(|o| serde_json::to_value(o).ok())
            .and_then(|v| v.pointer("/status/conditions").cloned())
            .and_then(|c| c.as_array().cloned())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == type_ && c["status"] == status)
            })
    }
}

pub fn policies(env: &Env) -> Api<RateLimitPolicy> {
    env.api()
}

pub fn apikeys(env: &Env) -> Api<ApiKey> {
    env.api()
}

pub fn configmaps(env: &Env) -> Api<ConfigMap> {
    env.api()
}

/// An HTTP response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

pub async fn get(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
    request("GET", url, headers, Bytes::new()).await
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Reply> {
    let client: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    request_with(&client, method, url, headers, body).await
}

/// [`request`] over https, trusting exactly the CA bundle in `ca_file` (the sidecar's own
/// report client, so the name in the URL is verified as the sidecar verifies it).
pub async fn request_tls(
    ca_file: &Path,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Reply> {
    let client = keylimit_sidecar::report::TlsTransport::new(ca_file)
        .client()
        .await
        .map_err(|e| anyhow!(e))?;
    request_with(&client, method, url, headers, body).await
}

async fn request_with<C>(
    client: &HttpClient<C, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<Reply>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| anyhow!("{method} {url}: no response within 30s"))??;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Runs kubectl against `$KUBECONFIG`; returns stdout, or an error with stderr.
pub async fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    kubectl_for(Duration::from_secs(60), args, stdin).await
}

/// [`kubectl`] for commands that wait longer than a minute (`rollout status`, `wait`).
pub async fn kubectl_for(
    timeout: Duration,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("kubectl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut sin) = child.stdin.take() {
        if let Some(s) = stdin {
            sin.write_all(s.as_bytes()).await?;
        }
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("kubectl {} hung", args.join(" ")))??;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Reads the plaintext key of an ApiKey from its Secret (the test plays the API owner).
pub async fn read_key(env: &Env, secret: &str) -> anyhow::Result<String> {
    let api: Api<k8s_openapi::api::core::v1::Secret> = env.api();
    let s = eventually(
        Duration::from_secs(30),
        &format!("Secret {secret}"),
        || async { api.get_opt(secret).await.ok().flatten() },
    )
    .await?;
    let data = s.data.unwrap_or_default();
    let v = data
        .get("key")
        .ok_or_else(|| anyhow!("Secret {secret} has no data key 'key'"))?;
    Ok(String::from_utf8(v.0.clone())?)
}

/// The chart under test.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/keylimit")
}

/// `$HELM`, else the pinned helm from hack/build-tools.sh.
pub fn helm_bin() -> PathBuf {
    if let Ok(h) = std::env::var("HELM") {
        return PathBuf::from(h);
    }
    let cache = std::env::var("KEYLIMIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/keylimit")
        });
    cache.join("bin/helm")
}

/// Runs helm; stdout on success, an error carrying stderr otherwise.
pub async fn helm(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(helm_bin())
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .map_err(|_| anyhow!("helm {} hung", args.join(" ")))?
    .with_context(|| {
        format!(
            "running {} (build it: hack/build-tools.sh)",
            helm_bin().display()
        )
    })?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A Pod object standing for an injected workload's pod: annotated for `policy` and run as
/// the namespace's `default` ServiceAccount. Nothing runs it (there is no kubelet); it exists
/// so that a token can be bound to it, as kubelet binds a projected token to its pod, and so
/// that the operator can check which policy the pod is injected for.
pub async fn sidecar_pod(
    client: &Client,
    ns: &str,
    name: &str,
    policy: &str,
) -> anyhow::Result<k8s_openapi::api::core::v1::Pod> {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "annotations": { "keylimit.dev/policy": policy },
        },
        "spec": {
            "serviceAccountName": "default",
            "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
        },
    }))?;
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    // The ServiceAccount admission plugin refuses pods until `default` exists, which
    // kube-controller-manager creates a moment after the namespace.
    eventually(
        Duration::from_secs(30),
        &format!("Pod {ns}/{name} created"),
        || async { api.create(&PostParams::default(), &pod).await.ok() },
    )
    .await
}

/// A `keylimit`-audience token of the pod's ServiceAccount, bound to the pod (pod name and
/// uid claims), as the webhook's projected volume gives the sidecar.
pub async fn pod_token(
    pod: &k8s_openapi::api::core::v1::Pod,
    audience: &str,
) -> anyhow::Result<String> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let token = kubectl(
        &[
            "create",
            "token",
            "default",
            "-n",
            ns,
            "--audience",
            audience,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            name,
            "--bound-object-uid",
            uid,
            "--duration",
            "1h",
        ],
        None,
    )
    .await?;
    Ok(token.trim().to_string())
}
