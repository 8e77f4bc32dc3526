//! The kind tier: keylimit in real pods, on a kind cluster whose node image, control-plane
//! images and keylimit images were all built on this machine (hack/kind/). `hack/kind/e2e.sh`
//! brings the cluster up, loads the images, installs the chart with `helm`, then runs this
//! file twice: the `workload_` tests side by side, then the `operator_` tests one at a time
//! (they restart, upgrade and scale the operator, which the others would feel).
//!
//! Traffic takes the path users' traffic takes: `keylimit-probe` runs in a client pod
//! (`kubectl exec`), so requests go Service → kube-proxy → injected sidecar → app. Every
//! scenario has its own namespace, labelled for injection and Pod Security `restricted`
//! (enforce), and dumps pods, events and container logs when it fails.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use keylimit_e2e::*;
use kube::api::ListParams;
use kube::runtime::wait::Condition as _;
use kube::Api;
use serde_json::Value;

const RELEASE: &str = "keylimit";
const RELEASE_NS: &str = "keylimit-system";
/// The chart's Deployment for release `keylimit` (its Lease and PDB are named `keylimit`).
const OPERATOR_DEPLOY: &str = "keylimit-operator";
const T: Duration = Duration::from_secs(120);

fn image(name: &str) -> String {
    let tag = std::env::var("KEYLIMIT_IMAGE_TAG").unwrap_or_else(|_| "dev".into());
    format!("keylimit/{name}:{tag}")
}

/// A scenario in a namespace that injects every annotated pod and enforces `restricted`.
async fn kind_scenario<F>(name: &str, body: F)
where
    F: AsyncFnOnce(&mut Env) -> anyhow::Result<()>,
{
    scenario(name, async |env: &mut Env| {
        kubectl(
            &[
                "label",
                "namespace",
                &env.ns,
                "keylimit.dev/inject=enabled",
                "pod-security.kubernetes.io/enforce=restricted",
                "pod-security.kubernetes.io/enforce-version=latest",
            ],
            None,
        )
        .await?;
        let result = body(env).await;
        if result.is_err() {
            dump_pods(&env.ns).await;
        }
        result
    })
    .await
}

async fn dump_pods(ns: &str) {
    for args in [
        vec![
            "get",
            "pods,svc,endpointslices,deploy",
            "-o",
            "wide",
            "-n",
            ns,
        ],
        vec!["get", "events", "--sort-by=.lastTimestamp", "-n", ns],
        vec!["describe", "pods", "-n", ns],
        vec![
            "logs",
            "-n",
            ns,
            "--all-containers",
            "--prefix",
            "--tail=40",
            "-l",
            "keylimit-e2e/app",
        ],
        vec!["get", "pods", "-o", "wide", "-n", RELEASE_NS],
        vec![
            "logs",
            "-n",
            RELEASE_NS,
            "--prefix",
            "--tail=40",
            "-l",
            "app.kubernetes.io/name=keylimit",
        ],
    ] {
        match kubectl(&args, None).await {
            Ok(out) => eprintln!("$ kubectl {}\n{out}", args.join(" ")),
            Err(e) => eprintln!("kubectl {}: {e}", args.join(" ")),
        }
    }
}

/// Security settings that pass Pod Security `restricted`, for the pods the tests create.
const RESTRICTED_POD: &str = r#"{"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}"#;
const RESTRICTED_CONTAINER: &str = r#"{"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}}"#;

/// The app container the tests deploy; the injected pod must keep it as it is, except for the
/// port name the sidecar takes over. Its preStop sleep is what any app needs for a rollout
/// without errors, sidecar or not: endpoints are removed when termination starts, but
/// kube-proxy applies that a moment later, so the app keeps serving for those seconds. Without
/// it the first kind run lost 9 of 6,538 requests in a rolling restart (7 refused, 2 × 502:
/// the app exits at once, and the native sidecar, stopped only after the app, forwarded to
/// it or had closed its listener while traffic still arrived).
fn app_container(listen: &str) -> String {
    format!(
        r#"{{"name": "app", "image": "{img}", "imagePullPolicy": "Never",
            "args": ["--listen", "{listen}"],
            "env": [{{"name": "POD_NAME", "valueFrom": {{"fieldRef": {{"apiVersion": "v1", "fieldPath": "metadata.name"}}}}}}],
            "ports": [{{"name": "http", "containerPort": 8080}}],
            "resources": {{"requests": {{"cpu": "10m", "memory": "16Mi"}}}},
            "lifecycle": {{"preStop": {{"sleep": {{"seconds": 5}}}}}},
            "securityContext": {RESTRICTED_CONTAINER}}}"#,
        img = image("testapp")
    )
}

/// A Deployment of our test app opted in for `policy`, and its Service (`targetPort: http`).
async fn deploy_app(
    env: &Env,
    name: &str,
    policy: &str,
    replicas: u32,
    listen: &str,
    annotations: &[(&str, &str)],
) -> anyhow::Result<()> {
    let mut ann = serde_json::Map::new();
    ann.insert("keylimit.dev/policy".into(), policy.into());
    for (k, v) in annotations {
        ann.insert((*k).into(), (*v).into());
    }
    let yaml = format!(
        r#"{{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {{"name": "{name}"}},
  "spec": {{"replicas": {replicas}, "selector": {{"matchLabels": {{"app": "{name}"}}}},
    "strategy": {{"rollingUpdate": {{"maxUnavailable": 0, "maxSurge": 1}}}},
    "template": {{"metadata": {{"labels": {{"app": "{name}", "keylimit-e2e/app": "{name}"}}, "annotations": {ann}}},
      "spec": {{"securityContext": {RESTRICTED_POD}, "containers": [{app}]}}}}}}}}
---
{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "{name}"}},
  "spec": {{"selector": {{"app": "{name}"}}, "ports": [{{"name": "http", "port": 80, "targetPort": "http"}}]}}}}
"#,
        ann = Value::Object(ann),
        app = app_container(listen),
    );
    env.apply_yaml(&yaml).await?;
    kubectl_for(
        T + Duration::from_secs(10),
        &[
            "rollout",
            "status",
            &format!("deploy/{name}"),
            "-n",
            &env.ns,
            "--timeout=120s",
        ],
        None,
    )
    .await
    .with_context(|| format!("Deployment {name} did not become available"))?;
    // Available is not enough: a sidecar that crashed once on its way up (as the operator did
    // on the first kind run) is a defect even when it recovers.
    for p in pods_of(env, name).await? {
        for c in p
            .status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .into_iter()
            .flatten()
            .chain(
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .into_iter()
                    .flatten(),
            )
        {
            ensure!(
                c.restart_count == 0,
                "container {} of {} restarted {} times",
                c.name,
                p.metadata.name.as_deref().unwrap_or("?"),
                c.restart_count
            );
        }
    }
    Ok(())
}

/// The pod the tests send traffic from: not opted in, so it runs our image unchanged.
async fn client_pod(env: &Env) -> anyhow::Result<()> {
    let yaml = format!(
        r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "client"}},
  "spec": {{"securityContext": {RESTRICTED_POD}, "terminationGracePeriodSeconds": 1,
    "containers": [{{"name": "client", "image": "{img}", "imagePullPolicy": "Never",
      "args": ["--listen", "127.0.0.1:8081"], "securityContext": {RESTRICTED_CONTAINER}}}]}}}}"#,
        img = image("testapp")
    );
    env.apply_yaml(&yaml).await?;
    kubectl_for(
        T + Duration::from_secs(10),
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "-n",
            &env.ns,
            "--timeout=120s",
        ],
        None,
    )
    .await?;
    Ok(())
}

/// Runs `keylimit-probe` in the client pod; its one line of JSON.
async fn probe(env: &Env, timeout: Duration, args: &[&str]) -> anyhow::Result<Value> {
    let mut cmd = vec![
        "exec",
        "-n",
        &env.ns,
        "client",
        "--",
        "/usr/local/bin/keylimit-probe",
    ];
    cmd.extend_from_slice(args);
    let out = kubectl_for(timeout, &cmd, None).await?;
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("probe printed {out:?}"))
}

/// Waits until the Service answers at all (any status): kube-proxy programs a new Service's
/// endpoints a moment after its pods are Ready, and until then connections are refused.
async fn await_service(env: &Env, url: &str) -> anyhow::Result<()> {
    eventually(T, &format!("{url} to answer"), || async {
        let r = probe(env, T, &[url]).await.ok()?;
        r.get("status").map(|_| ())
    })
    .await
}

fn svc(env: &Env, name: &str) -> String {
    format!("http://{name}.{}.svc.cluster.local/", env.ns)
}

fn status(v: &Value) -> u64 {
    v["status"].as_u64().unwrap_or(0)
}

fn header<'a>(v: &'a Value, name: &str) -> &'a str {
    v["headers"][name].as_str().unwrap_or("")
}

fn body(v: &Value) -> Value {
    v["body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null)
}

async fn policy_and_keys(
    env: &Env,
    policy_yaml: &str,
    keys: &[(&str, bool)],
) -> anyhow::Result<()> {
    env.apply_yaml(policy_yaml).await?;
    let ak = apikeys(env);
    for (k, disabled) in keys {
        env.apply_yaml(&format!(
            "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {k}}}\nspec: {{policyRef: {{name: p}}, disabled: {disabled}}}\n"
        ))
        .await?;
        if !disabled {
            await_object(&ak, k, "Ready=True", T, has_condition("Ready", "True")).await?;
        }
    }
    Ok(())
}

/// A policy that admits `rate` requests a minute, all of them at once if they come at once.
fn policy(rate: u64, extra: &str) -> String {
    let burst = rate.saturating_sub(1);
    format!(
        "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  limits:\n    rates: [{{name: per-minute, requests: {rate}, per: Minute, burst: {burst}}}]\n  response: {{message: Keys Temporarily Exhausted}}\n{extra}"
    )
}

async fn pods_of(env: &Env, app: &str) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = env.api();
    Ok(api
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Injection, Service traffic, every answer, and exhaustion reported back through the
/// projected ServiceAccount token.
#[tokio::test]
async fn workload_served_through_its_service() {
    kind_scenario("svc", async |env: &mut Env| {
        policy_and_keys(env, &policy(3, ""), &[("acme", false), ("frozen", true)]).await?;
        deploy_app(env, "api", "p", 1, "0.0.0.0:8080", &[]).await?;
        client_pod(env).await?;
        await_service(env, &svc(env, "api")).await?;

        // The native sidecar comes first; the app container is what we submitted, except for
        // the port name the sidecar takes over.
        let pod = pods_of(env, "api")
            .await?
            .into_iter()
            .next()
            .context("no api pod")?;
        let spec = pod.spec.clone().context("pod without spec")?;
        let init = spec.init_containers.clone().unwrap_or_default();
        let first = init.first().context("no init containers")?;
        ensure!(
            first.name == "keylimit-sidecar",
            "first init container {}",
            first.name
        );
        ensure!(
            first.restart_policy.as_deref() == Some("Always"),
            "not a native sidecar"
        );
        let mut want: k8s_openapi::api::core::v1::Container =
            serde_json::from_str(&app_container("0.0.0.0:8080"))?;
        if let Some(p) = want.ports.as_mut().and_then(|p| p.first_mut()) {
            p.name = Some("kl-app".into());
        }
        let got = spec.containers.first().context("no app container")?;
        // What the app asked for, compared whole (the apiserver's defaults aside).
        let asked = |c: &k8s_openapi::api::core::v1::Container| {
            serde_json::json!({
                "image": c.image, "args": c.args, "env": c.env, "lifecycle": c.lifecycle,
                "securityContext": c.security_context, "resources": c.resources,
            })
        };
        let (a, b) = (asked(got), asked(&want));
        ensure!(a == b, "app container changed: {a} != {b}");
        // The sidecar's volumes (policy, hash key, token) are mounted into the sidecar only.
        let mounts = got.volume_mounts.clone().unwrap_or_default();
        ensure!(
            mounts.iter().all(|m| !m.name.starts_with("keylimit")),
            "the app container got keylimit's volumes: {mounts:?}"
        );
        let port = got.ports.clone().unwrap_or_default();
        ensure!(
            port.len() == 1
                && port[0].name.as_deref() == Some("kl-app")
                && port[0].container_port == 8080,
            "app ports {port:?}"
        );
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        ensure!(phase.as_deref() == Some("Running"), "pod phase {phase:?}");

        let key = read_key(env, "acme-key").await?;
        let url = svc(env, "api");
        let hk = format!("X-API-Key: {key}");
        let ok = probe(env, T, &[&url, "-H", &hk]).await?;
        ensure!(status(&ok) == 200, "first request: {ok}");
        let echoed = body(&ok);
        ensure!(
            echoed["headers"]["x-keylimit-key"] == "acme",
            "the app did not see the identity header: {echoed}"
        );
        ensure!(
            !header(&ok, "ratelimit-policy").is_empty(),
            "no RateLimit-Policy on 200: {ok}"
        );

        let mut refused = None;
        for _ in 0..4 {
            let r = probe(env, T, &[&url, "-H", &hk]).await?;
            if status(&r) == 429 {
                refused = Some(r);
                break;
            }
            ensure!(status(&r) == 200, "before the limit: {r}");
        }
        let r = refused.context("no 429 after 5 requests on a 3-per-minute key")?;
        let b = body(&r);
        ensure!(
            b["message"] == "Keys Temporarily Exhausted" && b["error"] == "rate_limited",
            "429 body {b}"
        );
        ensure!(b["limit"]["name"] == "per-minute", "429 body {b}");
        let retry: u64 = header(&r, "retry-after")
            .parse()
            .with_context(|| format!("Retry-After in {r}"))?;
        ensure!((1..=60).contains(&retry), "Retry-After {retry}");
        ensure!(
            header(&r, "ratelimit-policy").contains("\"per-minute\";q=3;w=60"),
            "RateLimit-Policy in {r}"
        );
        ensure!(
            header(&r, "ratelimit").contains("\"per-minute\";r=0;t="),
            "RateLimit in {r}"
        );
        ensure!(
            header(&r, "x-ratelimit-remaining") == "0",
            "X-RateLimit-Remaining in {r}"
        );
        ensure!(
            header(&r, "x-ratelimit-limit") == "3",
            "X-RateLimit-Limit in {r}"
        );
        ensure!(
            !header(&r, "x-ratelimit-reset").is_empty(),
            "X-RateLimit-Reset in {r}"
        );
        ensure!(
            header(&r, "content-type").contains("json"),
            "Content-Type in {r}"
        );

        let bad = probe(env, T, &[&url, "-H", "X-API-Key: kl_not_a_key"]).await?;
        ensure!(
            status(&bad) == 401 && body(&bad)["error"] == "invalid_key",
            "bad key: {bad}"
        );
        let off = read_key(env, "frozen-key").await?;
        let dis = probe(env, T, &[&url, "-H", &format!("X-API-Key: {off}")]).await?;
        ensure!(
            status(&dis) == 403 && body(&dis)["error"] == "key_disabled",
            "disabled key: {dis}"
        );

        // The sidecar reports with its projected, pod-bound token; the operator marks the key.
        let start = Instant::now();
        kubectl_for(
            Duration::from_secs(100),
            &[
                "wait",
                "--for=condition=Exhausted",
                "apikey/acme",
                "-n",
                &env.ns,
                "--timeout=90s",
            ],
            None,
        )
        .await
        .context("kubectl wait --for=condition=Exhausted")?;
        eprintln!(
            "METRIC exhausted_condition_after_429_ms={}",
            start.elapsed().as_millis()
        );
        let shown = kubectl(&["get", "apikeys", "-n", &env.ns], None).await?;
        eprintln!("{shown}");
        Ok(())
    })
    .await;
}

/// Traffic to the app's own port on the pod IP skips the sidecar unless the app listens on
/// loopback only. Measured both ways: an app on 0.0.0.0 is reachable unlimited (the hole),
/// one on 127.0.0.1 is not (the fix that works on any CNI, kind's bridge included).
#[tokio::test]
async fn workload_direct_pod_ip_traffic() {
    kind_scenario("direct", async |env: &mut Env| {
        policy_and_keys(env, &policy(3, ""), &[]).await?;
        deploy_app(env, "open", "p", 1, "0.0.0.0:8080", &[]).await?;
        deploy_app(env, "closed", "p", 1, "127.0.0.1:8080", &[]).await?;
        client_pod(env).await?;
        await_service(env, &svc(env, "closed")).await?;
        let ip = |p: &Pod| p.status.as_ref().and_then(|s| s.pod_ip.clone());
        let open_ip = pods_of(env, "open")
            .await?
            .first()
            .and_then(ip)
            .context("open pod IP")?;
        let closed_ip = pods_of(env, "closed")
            .await?
            .first()
            .and_then(ip)
            .context("closed pod IP")?;

        let open = probe(env, T, &[&format!("http://{open_ip}:8080/")]).await?;
        eprintln!("METRIC direct_to_app_bound_all_interfaces={open}");
        ensure!(
            status(&open) == 200,
            "expected the bypass to exist for an app bound to 0.0.0.0 (this measures it): {open}"
        );
        let closed = probe(env, T, &[&format!("http://{closed_ip}:8080/")]).await?;
        eprintln!("METRIC direct_to_app_bound_loopback={closed}");
        ensure!(
            closed.get("error").is_some(),
            "an app bound to 127.0.0.1 must not answer on the pod IP: {closed}"
        );
        // The limiter's port on the same pod answers, and wants a key.
        let via = probe(env, T, &[&format!("http://{closed_ip}:4143/")]).await?;
        ensure!(status(&via) == 401, "sidecar port without a key: {via}");
        let through = probe(env, T, &[&svc(env, "closed")]).await?;
        ensure!(status(&through) == 401, "Service without a key: {through}");
        Ok(())
    })
    .await;
}

/// `kubectl apply` of a policy change reaches enforcement through kubelet's ConfigMap volume
/// and through API-watch mode; 10 changes, p50 and max of each.
#[tokio::test]
async fn workload_policy_changes_reach_enforcement() {
    kind_scenario("reload", async |env: &mut Env| {
        let env = &*env;
        policy_and_keys(env, &policy(1000, ""), &[("acme", false)]).await?;
        // API-watch mode needs read access to ConfigMaps for the pod's ServiceAccount.
        env.apply_yaml(
            r#"{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "keylimit-config-reader"},
  "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]}
---
{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "keylimit-config-reader"},
  "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "keylimit-config-reader"},
  "subjects": [{"kind": "ServiceAccount", "name": "default"}]}"#,
        )
        .await?;
        deploy_app(env, "vol", "p", 1, "0.0.0.0:8080", &[]).await?;
        deploy_app(env, "apiw", "p", 1, "0.0.0.0:8080", &[("keylimit.dev/config-source", "api")]).await?;
        client_pod(env).await?;
        await_service(env, &svc(env, "vol")).await?;
        await_service(env, &svc(env, "apiw")).await?;
        let key = read_key(env, "acme-key").await?;
        let hk = format!("X-API-Key: {key}");
        let (mut vol, mut api) = (vec![], vec![]);
        for i in 1..=10u64 {
            let q = 1000 + i;
            let want = format!("q={q};");
            let pol = policy(q, "");
            env.apply_yaml(&pol).await?;
            let start = Instant::now();
            let wait = |url: String| {
                let (hk, want) = (hk.clone(), want.clone());
                async move {
                    let r = probe(env, Duration::from_secs(200), &[
                        &url, "-H", &hk, "--until-header", "ratelimit-policy", "--contains", &want,
                        "--timeout-s", "180", "--interval-ms", "50",
                    ])
                    .await?;
                    ensure!(r.get("elapsed_ms").is_some(), "change {want} never enforced at {url}: {r}");
                    Ok::<u128, anyhow::Error>(start.elapsed().as_millis())
                }
            };
            let (v, a) = tokio::join!(wait(svc(env, "vol")), wait(svc(env, "apiw")));
            let (v, a) = (v?, a?);
            eprintln!("change {i}: volume {v} ms, api-watch {a} ms");
            vol.push(v);
            api.push(a);
        }
        vol.sort_unstable();
        api.sort_unstable();
        eprintln!(
            "METRIC reload_volume_ms p50={} max={}; reload_api_watch_ms p50={} max={}",
            percentile(&vol, 0.5), percentile(&vol, 1.0), percentile(&api, 0.5), percentile(&api, 1.0)
        );
        // API-watch mode is the fast path; kubelet's volume takes its sync period.
        ensure!(percentile(&api, 0.5) < 10_000, "API-watch p50 {} ms", percentile(&api, 0.5));
        Ok(())
    })
    .await;
}

/// A rolling restart under steady traffic through the Service loses no request.
#[tokio::test]
async fn workload_rolling_restart_loses_no_request() {
    kind_scenario("roll", async |env: &mut Env| {
        let env = &*env;
        policy_and_keys(env, &policy(1_000_000, ""), &[("acme", false)]).await?;
        deploy_app(env, "api", "p", 2, "0.0.0.0:8080", &[]).await?;
        client_pod(env).await?;
        await_service(env, &svc(env, "api")).await?;
        let key = read_key(env, "acme-key").await?;
        let hk = format!("X-API-Key: {key}");
        let url = svc(env, "api");
        let before: Vec<String> = pods_of(env, "api")
            .await?
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let traffic_args = [
            url.as_str(),
            "-H",
            &hk,
            "--duration-s",
            "90",
            "--interval-ms",
            "10",
        ];
        let traffic = probe(env, Duration::from_secs(200), &traffic_args);
        let restart = async {
            // The restart begins once a request has gone through, while the long probe runs.
            eventually(Duration::from_secs(30), "traffic to start", || async {
                kubectl(
                    &[
                        "exec",
                        "-n",
                        &env.ns,
                        "client",
                        "--",
                        "/usr/local/bin/keylimit-probe",
                        &url,
                        "-H",
                        &hk,
                    ],
                    None,
                )
                .await
                .ok()
            })
            .await?;
            let start = Instant::now();
            kubectl(&["rollout", "restart", "deploy/api", "-n", &env.ns], None).await?;
            kubectl_for(
                Duration::from_secs(100),
                &[
                    "rollout",
                    "status",
                    "deploy/api",
                    "-n",
                    &env.ns,
                    "--timeout=80s",
                ],
                None,
            )
            .await?;
            Ok::<Duration, anyhow::Error>(start.elapsed())
        };
        let (traffic, took) = tokio::join!(traffic, restart);
        let (traffic, took) = (traffic?, took?);
        let after: Vec<String> = pods_of(env, "api")
            .await?
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        eprintln!(
            "METRIC rolling_restart took_ms={} traffic={traffic}",
            took.as_millis()
        );
        ensure!(
            after.iter().all(|p| !before.contains(p)),
            "pods were not replaced: {before:?} -> {after:?}"
        );
        ensure!(
            took < Duration::from_secs(85),
            "the rollout outlasted the traffic window"
        );
        let total = traffic["total"].as_u64().unwrap_or(0);
        let ok = traffic["status"]["200"].as_u64().unwrap_or(0);
        ensure!(total > 100, "too little traffic: {traffic}");
        ensure!(
            ok == total,
            "{} of {total} requests failed during the rollout: {traffic}",
            total - ok
        );
        Ok(())
    })
    .await;
}

/// One Redis pod gives one exact limit across 3 replicas of the workload.
#[tokio::test]
async fn workload_redis_limit_is_exact_across_replicas() {
    kind_scenario("redis", async |env: &mut Env| {
        env.apply_yaml(&format!(
            r#"{{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {{"name": "redis"}},
  "spec": {{"replicas": 1, "selector": {{"matchLabels": {{"app": "redis"}}}},
    "template": {{"metadata": {{"labels": {{"app": "redis"}}, "annotations": {{"keylimit.dev/inject": "disabled"}}}},
      "spec": {{"securityContext": {RESTRICTED_POD},
        "containers": [{{"name": "redis", "image": "{img}", "imagePullPolicy": "Never",
          "ports": [{{"name": "redis", "containerPort": 6379}}],
          "readinessProbe": {{"tcpSocket": {{"port": 6379}}, "periodSeconds": 1}},
          "securityContext": {RESTRICTED_CONTAINER}}}]}}}}}}}}
---
{{"apiVersion": "v1", "kind": "Service", "metadata": {{"name": "redis"}},
  "spec": {{"selector": {{"app": "redis"}}, "ports": [{{"port": 6379, "targetPort": "redis"}}]}}}}"#,
            img = image("redis")
        ))
        .await?;
        kubectl_for(T, &["rollout", "status", "deploy/redis", "-n", &env.ns, "--timeout=100s"], None).await?;
        let store = format!(
            "  store: {{type: Redis, redis: {{url: \"redis://redis.{}.svc.cluster.local:6379/0\", timeoutMillis: 500}}}}\n",
            env.ns
        );
        // 10 per hour, all of them at once: the next one is due 6 minutes later, so however
        // slowly a loaded machine sends the 30 requests, exactly 10 are admitted. (A per-minute
        // rate admitted an 11th once the 30 exec round trips took over 6 s.)
        let p = format!(
            "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  selector: {{matchLabels: {{app: api}}}}\n  limits:\n    rates: [{{name: per-hour, requests: 10, per: Hour, burst: 9}}]\n{store}"
        );
        policy_and_keys(env, &p, &[("acme", false)]).await?;
        deploy_app(env, "api", "p", 3, "0.0.0.0:8080", &[]).await?;
        client_pod(env).await?;
        await_service(env, &svc(env, "api")).await?;
        let key = read_key(env, "acme-key").await?;
        let hk = format!("X-API-Key: {key}");
        let url = svc(env, "api");
        // Fresh connections: kube-proxy spreads them over the 3 pods.
        let mut served_by = std::collections::BTreeSet::new();
        let mut codes = vec![];
        for _ in 0..30 {
            let r = probe(env, T, &[&url, "-H", &hk]).await?;
            if status(&r) == 200 {
                if let Some(h) = body(&r)["pod"].as_str() {
                    served_by.insert(h.to_string());
                }
            }
            codes.push(status(&r));
        }
        let ok = codes.iter().filter(|c| **c == 200).count();
        let limited = codes.iter().filter(|c| **c == 429).count();
        eprintln!("METRIC redis_exact ok={ok} limited={limited} pods={served_by:?}");
        ensure!(ok == 10 && limited == 20, "want exactly 10 admitted and 20 refused across replicas: {codes:?}");
        ensure!(served_by.len() >= 2, "all admitted requests hit one pod: {served_by:?}");
        Ok(())
    })
    .await;
}

// ----- operator_ tests: run one at a time, after the workload_ tests -------------------------

/// The operator pods not being deleted.
async fn operator_pods(env: &Env) -> anyhow::Result<Vec<Pod>> {
    Ok(operator_pods_with_terminating(env)
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Every operator pod, terminating ones too: a terminating operator still answers the webhook
/// for its shutdown delay.
async fn operator_pods_with_terminating(env: &Env) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), RELEASE_NS);
    Ok(api
        .list(&ListParams::default().labels("app.kubernetes.io/name=keylimit"))
        .await?
        .items)
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn await_operator_ready(env: &Env, n: usize) -> anyhow::Result<()> {
    let pods = eventually(T, &format!("{n} Ready operator pods"), || async {
        let pods = operator_pods(env).await.ok()?;
        (pods.len() == n && pods.iter().all(ready)).then_some(pods)
    })
    .await?;
    // A replica that crashed on its way up (the first kind run showed both crash twice: their
    // first API call raced the pod network) is a defect even when it recovers.
    for p in &pods {
        let restarts: i32 = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        ensure!(
            restarts == 0,
            "operator pod {} restarted {restarts} times",
            p.metadata.name.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// Evicts an operator pod the way `kubectl drain` does (a policy/v1 Eviction). kube-rs 5's
/// `Api::evict` sends a body without apiVersion and kind, which the apiserver here granted
/// even with the budget exhausted.
async fn evict(pod: &str) -> anyhow::Result<String> {
    let body = format!(
        r#"{{"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {{"name": "{pod}", "namespace": "{RELEASE_NS}"}}}}"#
    );
    let path = format!("/api/v1/namespaces/{RELEASE_NS}/pods/{pod}/eviction");
    kubectl(&["create", "--raw", &path, "-f", "-"], Some(&body)).await
}

/// An opted-in pod, created with a server-side dry run: it passes admission (and so the
/// webhook) without running.
async fn admit_opted_in_pod(env: &Env) -> anyhow::Result<String> {
    let yaml = format!(
        r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"generateName": "dry-", "annotations": {{"keylimit.dev/policy": "p"}}}},
  "spec": {{"securityContext": {RESTRICTED_POD}, "containers": [{app}]}}}}"#,
        app = app_container("0.0.0.0:8080")
    );
    kubectl(
        &[
            "create",
            "--dry-run=server",
            "-o",
            "json",
            "-n",
            &env.ns,
            "-f",
            "-",
        ],
        Some(&yaml),
    )
    .await
}

/// Two Ready replicas (standbys are Ready too), a PDB that lets one go, and `helm upgrade` to
/// a changed value that completes with the rollout.
#[tokio::test]
async fn operator_upgrade_rolls_with_its_pdb() {
    kind_scenario("upgrade", async |env: &mut Env| {
        await_operator_ready(env, 2).await?;
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), RELEASE_NS);
        let pdb = eventually(T, "the PDB to allow one disruption", || async {
            let p = pdbs.get(RELEASE).await.ok()?;
            (p.status.as_ref()?.disruptions_allowed == Some(1)).then_some(p)
        })
        .await?;
        eprintln!("pdb status {:?}", pdb.status);

        let nonce = format!("{:08x}", rand::random::<u32>());
        let before: Vec<String> = operator_pods(env)
            .await?
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let start = Instant::now();
        let out = helm(&[
            "upgrade",
            RELEASE,
            &chart_dir().display().to_string(),
            "-n",
            RELEASE_NS,
            "--reuse-values",
            "--set-string",
            &format!("podAnnotations.e2e-upgrade={nonce}"),
            "--wait",
            "--timeout",
            "100s",
        ])
        .await?;
        eprintln!(
            "METRIC helm_upgrade_ms={}\n{out}",
            start.elapsed().as_millis()
        );
        await_operator_ready(env, 2).await?;
        let after = operator_pods(env).await?;
        ensure!(
            after
                .iter()
                .all(|p| !before.contains(p.metadata.name.as_ref().unwrap_or(&String::new()))),
            "the upgrade did not replace the pods: {before:?}"
        );
        let rolled = after.iter().all(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("e2e-upgrade"))
                == Some(&nonce)
        });
        ensure!(rolled, "the changed value did not reach the new pods");

        // The PDB at work: with both Ready, one eviction is allowed and the next is refused
        // until the evicted pod's replacement is Ready.
        let api: Api<Pod> = Api::namespaced(env.client.clone(), RELEASE_NS);
        // The old pods must be gone first: while they terminate, the disruption controller
        // recounts as they disappear, and a replacement that is Ready within a second here
        // legitimately frees a disruption again.
        eventually(T, "the old operator pods to be gone", || async {
            let all = api
                .list(&ListParams::default().labels("app.kubernetes.io/name=keylimit"))
                .await
                .ok()?;
            (all.items.len() == 2).then_some(())
        })
        .await?;
        eventually(T, "the PDB to allow one disruption again", || async {
            let p = pdbs.get(RELEASE).await.ok()?;
            (p.status.as_ref()?.disruptions_allowed == Some(1)).then_some(())
        })
        .await?;
        let names: Vec<String> = after
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        evict(&names[0]).await.context("first eviction")?;
        match evict(&names[1]).await {
            Err(e) if format!("{e:#}").contains("TooManyRequests") => {}
            other => bail!(
                "second eviction while one replica is down: want 429 from the PDB, got {other:?}"
            ),
        }
        await_operator_ready(env, 2).await?;
        admit_opted_in_pod(env)
            .await
            .context("webhook after the upgrade")?;
        Ok(())
    })
    .await;
}

/// Deleting the leader: how long until the new leader writes status, while the webhook keeps
/// admitting opted-in pods.
#[tokio::test]
async fn operator_leader_failover() {
    kind_scenario("failover", async |env: &mut Env| {
        await_operator_ready(env, 2).await?;
        policy_and_keys(env, &policy(5, ""), &[("first", false)]).await?;
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), RELEASE_NS);
        let holder = leases
            .get(RELEASE)
            .await?
            .spec
            .and_then(|s| s.holder_identity)
            .context("no lease holder")?;
        let leader = operator_pods(env)
            .await?
            .into_iter()
            .find(|p| holder.contains(p.metadata.name.as_deref().unwrap_or("-")))
            .ok_or_else(|| anyhow!("no operator pod holds the lease ({holder})"))?;
        let leader_name = leader.metadata.name.clone().unwrap_or_default();
        let start = Instant::now();
        kubectl(&["delete", "pod", &leader_name, "-n", RELEASE_NS, "--wait=false"], None).await?;
        env.apply_yaml("apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: second}\nspec: {policyRef: {name: p}}\n").await?;
        let ak = apikeys(env);
        let mut admitted = 0u32;
        let mut refused = vec![];
        let status_written = loop {
            match admit_opted_in_pod(env).await {
                Ok(out) if out.contains("keylimit-sidecar") => admitted += 1,
                Ok(out) => refused.push(format!("admitted without the sidecar: {}", &out[..out.len().min(200)])),
                Err(e) => refused.push(format!("{e:#}")),
            }
            let k = ak.get("second").await?;
            if has_condition::<keylimit_operator::crd::ApiKey>("Ready", "True").matches_object(Some(&k)) {
                break start.elapsed();
            }
            ensure!(start.elapsed() < T, "no status written {T:?} after deleting the leader");
        };
        let new_holder = leases.get(RELEASE).await?.spec.and_then(|s| s.holder_identity).unwrap_or_default();
        eprintln!(
            "METRIC leader_failover status_written_ms={} admitted={admitted} refused={} old={holder} new={new_holder}",
            status_written.as_millis(),
            refused.len()
        );
        ensure!(refused.is_empty(), "the webhook refused during failover: {refused:?}");
        ensure!(admitted > 0, "no pod went through the webhook during failover");
        await_operator_ready(env, 2).await?;
        Ok(())
    })
    .await;
}

/// With the operator scaled to 0, `failurePolicy: Fail` (the chart's default) refuses
/// opted-in pods with a clear message, and leaves every other pod alone.
#[tokio::test]
async fn operator_scaled_to_zero_fails_closed() {
    kind_scenario("zero", async |env: &mut Env| {
        await_operator_ready(env, 2).await?;
        policy_and_keys(env, &policy(5, ""), &[]).await?;
        kubectl(
            &[
                "scale",
                "deploy",
                OPERATOR_DEPLOY,
                "-n",
                RELEASE_NS,
                "--replicas=0",
            ],
            None,
        )
        .await?;
        let result = async {
            eventually(T, "no operator pods, terminating ones included", || async {
                operator_pods_with_terminating(env)
                    .await
                    .ok()?
                    .is_empty()
                    .then_some(())
            })
            .await?;
            let err = match admit_opted_in_pod(env).await {
                Ok(out) => bail!(
                    "an opted-in pod was admitted with no operator: {}",
                    &out[..out.len().min(300)]
                ),
                Err(e) => format!("{e:#}"),
            };
            eprintln!("METRIC scaled_to_zero_refusal={err}");
            ensure!(
                err.contains("keylimit") && err.contains("webhook"),
                "unclear refusal: {err}"
            );
            // A pod that did not opt in, elsewhere, is never sent to the webhook.
            let other = format!(
                r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"generateName": "plain-"}},
  "spec": {{"containers": [{{"name": "c", "image": "{}"}}]}}}}"#,
                image("testapp")
            );
            kubectl(
                &["create", "--dry-run=server", "-n", "default", "-f", "-"],
                Some(&other),
            )
            .await?;
            Ok(())
        }
        .await;
        kubectl(
            &[
                "scale",
                "deploy",
                OPERATOR_DEPLOY,
                "-n",
                RELEASE_NS,
                "--replicas=2",
            ],
            None,
        )
        .await?;
        await_operator_ready(env, 2).await?;
        result?;
        eventually(T, "the webhook to admit again", || async {
            admit_opted_in_pod(env).await.ok()
        })
        .await?;
        Ok(())
    })
    .await;
}
