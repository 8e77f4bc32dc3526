//! End-to-end: `POST /v1/reports` against a real apiserver. Who may report and as whom (pod-
//! bound tokens, audience, the pod's policy annotation), what a hostile pod of the namespace
//! cannot do (overwrite another pod's report, fill the book, make the operator read a huge
//! body, amplify bad tokens into TokenReviews), the `ConfigLoaded` condition, and two
//! replicas that are both Ready while reports sent to the standby still reach the leader.
//! Run by `hack/test.sh`; ignored by a plain `cargo test` because they need a control plane.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use bytes::Bytes;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use keylimit_dataplane::{ConfigFailure, Exhaustion, ExhaustionReason, KeyUsage, UsageReport};
use keylimit_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

const POLICY: &str = "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 1, per: Minute}]\n";
const KEY: &str = "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: acme}\nspec: {policyRef: {name: p}}\n";

/// The policy and its key, Ready.
async fn policy_and_key(env: &Env) -> anyhow::Result<()> {
    env.apply_yaml(POLICY).await?;
    env.apply_yaml(KEY).await?;
    await_object(
        &apikeys(env),
        "acme",
        "Ready=True",
        T,
        has_condition("Ready", "True"),
    )
    .await?;
    Ok(())
}

fn report(ns: &str, policy: &str, sidecar: &str, exhausted: bool) -> UsageReport {
    let now = Timestamp::now().as_second();
    UsageReport {
        sidecar: sidecar.into(),
        policy_namespace: ns.into(),
        policy_name: policy.into(),
        policy_generation: 1,
        now,
        keys: vec![KeyUsage {
            name: "acme".into(),
            exhaustion: exhausted.then(|| Exhaustion {
                reason: ExhaustionReason::RateLimited,
                limit: "per-minute".into(),
                message: "rate per-minute (1 per 60s) exceeded".into(),
                reset_at: now + 600,
                dry_run: false,
            }),
            quotas: vec![],
        }],
        config_failure: None,
    }
}

async fn post(url: &str, token: Option<&str>, body: Bytes) -> anyhow::Result<Reply> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    request("POST", url, &headers, body).await
}

async fn post_report(url: &str, token: &str, r: &UsageReport) -> anyhow::Result<Reply> {
    post(url, Some(token), Bytes::from(serde_json::to_vec(r)?)).await
}

/// Sum of a metric's samples (all label sets).
async fn metric(url: &str, name: &str) -> anyhow::Result<f64> {
    let r = get(url, &[]).await?;
    let text = String::from_utf8_lossy(&r.body).to_string();
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Re-posts reports every second (a sidecar's rhythm) until dropped.
struct Reporting(tokio::task::JoinHandle<()>);

impl Drop for Reporting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn keep_reporting(url: String, sends: Vec<(String, UsageReport)>) -> Reporting {
    Reporting(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for (token, r) in &sends {
                if let Err(e) = post_report(&url, token, r).await {
                    tracing::warn!(error = %e, "report not sent");
                }
            }
        }
    }))
}

/// Sends a request head and `sent` body bytes over a raw socket, then waits for the status
/// line: proves the server answers without waiting for (or reading) the rest of the body.
async fn raw_status(
    addr: SocketAddr,
    head: &str,
    sent: usize,
    within: Duration,
) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(head.as_bytes()).await?;
    s.write_all(&vec![b'x'; sent]).await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 512];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(2).any(|w| w == b"\r\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match read {
        Err(_) => bail!("no answer within {within:?} after {sent} body bytes"),
        Ok(r) => r?,
    }
    let line = String::from_utf8_lossy(&buf).to_string();
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status line in {line:?}"))
}

fn admin_addr(p: &Proc) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        p.admin_port.context("admin port")?,
    )))
}

/// Pods of the namespace that are not the reporting pod cannot speak for it, and what is
/// refused is refused cheaply: bad tokens are reviewed once, big bodies are never read.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn reports_are_authenticated_by_pod_and_bounded() {
    scenario("reports-auth", async |env: &mut Env| {
        let op = env.start_operator("op").await?;
        op.await_ready(T).await?;
        policy_and_key(env).await?;
        let url = op.admin_url("/v1/reports");
        let metrics = op.admin_url("/metrics");
        let ns = env.ns.clone();
        let pod_a = sidecar_pod(&env.client, &ns, "api-a", "p").await?;
        let pod_b = sidecar_pod(&env.client, &ns, "api-b", "p").await?;
        let pod_other = sidecar_pod(&env.client, &ns, "web", "q").await?;
        let ta = pod_token(&pod_a, "keylimit").await?;
        let tb = pod_token(&pod_b, "keylimit").await?;
        let t_other = pod_token(&pod_other, "keylimit").await?;

        // A bad token: 401, and the refusal is cached: the second try costs no TokenReview.
        let reviews = "keylimit_operator_token_reviews_total";
        let before = metric(&metrics, reviews).await?;
        let r = post(&url, Some("not-a-token"), Bytes::from_static(b"{}")).await?;
        ensure!(r.status == 401, "bad token: {} {:?}", r.status, r.body);
        let after_one = metric(&metrics, reviews).await?;
        ensure!(after_one == before + 1.0, "one review: {before} -> {after_one}");
        let r = post(&url, Some("not-a-token"), Bytes::from_static(b"{}")).await?;
        ensure!(r.status == 401, "bad token again: {}", r.status);
        let after_two = metric(&metrics, reviews).await?;
        ensure!(
            after_two == after_one,
            "the repeated bad token was reviewed again: {after_one} -> {after_two}"
        );

        // A plain ServiceAccount token (no pod-bound claims) is not a sidecar's.
        let plain = kubectl(
            &["create", "token", "default", "-n", &ns, "--audience", "keylimit"],
            None,
        )
        .await?;
        let r = post_report(&url, plain.trim(), &report(&ns, "p", "api-a", false)).await?;
        ensure!(r.status == 403, "unbound token: {} {:?}", r.status, r.body);
        // Pod-bound, but for another audience.
        let wrong = pod_token(&pod_a, "not-keylimit").await?;
        let r = post_report(&url, &wrong, &report(&ns, "p", "api-a", false)).await?;
        ensure!(r.status == 401, "wrong audience: {} {:?}", r.status, r.body);
        // A pod injected for policy q cannot report for p, nor a pod for another namespace.
        let r = post_report(&url, &t_other, &report(&ns, "p", "web", true)).await?;
        ensure!(r.status == 403, "other policy's pod: {} {:?}", r.status, r.body);
        let r = post_report(&url, &ta, &report("kube-system", "p", "api-a", true)).await?;
        ensure!(r.status == 403, "other namespace: {} {:?}", r.status, r.body);

        // Pod B reports acme exhausted. Pod A claims to be "api-b" and reports it fine: it
        // only ever writes its own entry, so both count and B's exhaustion stands.
        let r = post_report(&url, &tb, &report(&ns, "p", "api-b", true)).await?;
        ensure!(r.status == 204, "pod B's report: {} {:?}", r.status, r.body);
        let reporting = keep_reporting(
            url.clone(),
            vec![
                (tb.clone(), report(&ns, "p", "api-b", true)),
                (ta.clone(), report(&ns, "p", "api-b", false)),
            ],
        );
        let pol = policies(env);
        eventually(T, "two distinct pods reporting for p", || async {
            let p = pol.get("p").await.ok()?;
            (p.status?.sidecars_reporting == 2).then_some(())
        })
        .await?;
        await_object(
            &apikeys(env),
            "acme",
            "Exhausted=True despite pod A's forged report",
            T,
            has_condition("Exhausted", "True"),
        )
        .await?;
        let k = apikeys(env).get("acme").await?;
        let st = k.status.context("status")?;
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Exhausted")
            .context("Exhausted")?;
        ensure!(c.message.contains("on 1 of 2 sidecars"), "{}", c.message);

        // Every report stops: once they are stale (10 s) the key recovers. The status writer
        // looks at a policy's keys when its reports vanish, not only on its minutely walk of
        // every key, so this takes well under that minute.
        drop(reporting);
        await_object(
            &apikeys(env),
            "acme",
            "Exhausted=False once no sidecar reports",
            Duration::from_secs(30),
            has_condition("Exhausted", "False"),
        )
        .await?;

        // Bodies: a declared size over the limit is refused from the headers, unread; no
        // token is refused before any body; a body that trickles is cut off.
        let addr = admin_addr(&op)?;
        let huge = 64 * 1024 * 1024;
        let head = |auth: &str, len: usize| {
            format!(
                "POST /v1/reports HTTP/1.1\r\nhost: op\r\ncontent-type: application/json\r\n{auth}content-length: {len}\r\n\r\n"
            )
        };
        let code = raw_status(
            addr,
            &head(&format!("authorization: Bearer {ta}\r\n"), huge),
            1024,
            Duration::from_secs(5),
        )
        .await?;
        ensure!(code == 413, "oversized body: {code}");
        // Over the limit but under the old 8 MiB: still refused before being read.
        let code = raw_status(
            addr,
            &head(&format!("authorization: Bearer {ta}\r\n"), 2 * 1024 * 1024),
            1024,
            Duration::from_secs(5),
        )
        .await?;
        ensure!(code == 413, "2 MiB body: {code}");
        let code = raw_status(addr, &head("", huge), 1024, Duration::from_secs(5)).await?;
        ensure!(code == 401, "unauthenticated huge body: {code}");
        let code = raw_status(
            addr,
            &head(&format!("authorization: Bearer {ta}\r\n"), 4096),
            10,
            Duration::from_secs(20),
        )
        .await?;
        ensure!(code == 408, "trickled body: {code}");
        Ok(())
    })
    .await;
}

/// Entries per namespace are capped: with `--max-sidecars-per-namespace 2` a third pod is
/// refused while the first two keep reporting. And a sidecar stuck on a stale config turns
/// the policy's `ConfigLoaded` False, then True again once no report carries a failure.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn book_is_capped_per_namespace_and_config_failures_show() {
    scenario("reports-cap", async |env: &mut Env| {
        let port = free_port()?;
        let ns = env.ns.clone();
        let mut op = env
            .spawn(
                "operator-op",
                &bin("keylimit-operator"),
                &[
                    "run",
                    "--watch-namespace",
                    &ns,
                    "--lease-namespace",
                    &ns,
                    "--identity",
                    "op",
                    "--lease-seconds",
                    "6",
                    "--admin-addr",
                    &format!("127.0.0.1:{port}"),
                    "--allow-plaintext-reports",
                    "--max-sidecars-per-namespace",
                    "2",
                ],
            )
            .await?;
        op.admin_port = Some(port);
        op.await_ready(T).await?;
        policy_and_key(env).await?;
        let url = op.admin_url("/v1/reports");
        let mut tokens = vec![];
        for name in ["a", "b", "c"] {
            let pod = sidecar_pod(&env.client, &ns, name, "p").await?;
            tokens.push(pod_token(&pod, "keylimit").await?);
        }
        // The operator records reports once it leads: wait for the first one to stick.
        eventually(T, "pod a's report accepted", || async {
            let r = post_report(&url, &tokens[0], &report(&ns, "p", "a", false))
                .await
                .ok()?;
            (r.status == 204).then_some(())
        })
        .await?;
        let r = post_report(&url, &tokens[1], &report(&ns, "p", "b", false)).await?;
        ensure!(r.status == 204, "pod b: {} {:?}", r.status, r.body);
        let r = post_report(&url, &tokens[2], &report(&ns, "p", "c", false)).await?;
        ensure!(
            r.status == 429,
            "third pod over the cap: {} {:?}",
            r.status,
            r.body
        );
        let r = post_report(&url, &tokens[0], &report(&ns, "p", "a", false)).await?;
        ensure!(
            r.status == 204,
            "a known pod at the cap: {} {:?}",
            r.status,
            r.body
        );

        // Pod a rejects its config; pod b is fine.
        let mut failing = report(&ns, "p", "a", false);
        failing.config_failure = Some(ConfigFailure {
            reason: "json".into(),
            since: Timestamp::now().as_second() - 30,
        });
        let reporting = keep_reporting(
            url.clone(),
            vec![
                (tokens[0].clone(), failing),
                (tokens[1].clone(), report(&ns, "p", "b", false)),
            ],
        );
        let pol = policies(env);
        let p = await_object(
            &pol,
            "p",
            "ConfigLoaded=False",
            T,
            has_condition("ConfigLoaded", "False"),
        )
        .await?;
        let st = p.status.context("status")?;
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == "ConfigLoaded")
            .context("ConfigLoaded")?;
        ensure!(c.reason == "SidecarRejectsConfig", "reason {}", c.reason);
        ensure!(
            c.message.starts_with("1 of 2 sidecars reject the config")
                && c.message.ends_with(": json (1)"),
            "message {}",
            c.message
        );
        // Recovered: no fresh report carries a failure.
        drop(reporting);
        let _reporting = keep_reporting(
            url.clone(),
            vec![
                (tokens[0].clone(), report(&ns, "p", "a", false)),
                (tokens[1].clone(), report(&ns, "p", "b", false)),
            ],
        );
        await_object(
            &pol,
            "p",
            "ConfigLoaded=True",
            T,
            has_condition("ConfigLoaded", "True"),
        )
        .await?;
        drop(op);
        Ok(())
    })
    .await;
}

/// A port free on both addresses.
fn port_free_on(a: Ipv4Addr, b: Ipv4Addr) -> anyhow::Result<u16> {
    for _ in 0..20 {
        let l = std::net::TcpListener::bind(SocketAddrV4::new(a, 0))?;
        let port = l.local_addr()?.port();
        if std::net::TcpListener::bind(SocketAddrV4::new(b, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free on both {a} and {b}")
}

/// Readiness is not leadership: both replicas become Ready, and a report sent over TLS to the
/// standby is forwarded over TLS to the leader (found from the Lease holder's pod IP, verified
/// as the webhook Service's name) and becomes status. The two replicas run as the pods `op-a`
/// and `op-b` with pod IPs 127.0.0.2 and 127.0.0.3 (one admin and one TLS port, as in the
/// chart), since there is no kubelet to give them real ones.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn both_replicas_ready_and_standby_forwards_reports() {
    scenario("reports-ha", async |env: &mut Env| {
        let ns = env.ns.clone();
        let ips = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
        let port = port_free_on(ips[0], ips[1])?;
        let tls_port = port_free_on(ips[0], ips[1])?;
        let mut procs = vec![];
        for (name, ip) in ["op-a", "op-b"].into_iter().zip(ips) {
            let pod = sidecar_pod(&env.client, &ns, name, "none").await?;
            let status = format!(r#"{{"status":{{"podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
            kubectl(
                &[
                    "patch",
                    "pod",
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    "-n",
                    &ns,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &status,
                ],
                None,
            )
            .await?;
            let p = env
                .spawn(
                    &format!("operator-{name}"),
                    &bin("keylimit-operator"),
                    &[
                        "run",
                        "--watch-namespace",
                        &ns,
                        "--lease-namespace",
                        &ns,
                        "--identity",
                        name,
                        "--lease-seconds",
                        "6",
                        "--admin-addr",
                        &format!("{ip}:{port}"),
                        "--webhook-addr",
                        &format!("{ip}:{tls_port}"),
                        "--webhook-namespace",
                        &ns,
                        // The test posts to a replica by IP; forwards are verified as the
                        // Service name, which the certificate carries anyway.
                        "--webhook-extra-san",
                        "127.0.0.2,127.0.0.3",
                    ],
                )
                .await?;
            procs.push((name, ip, p));
        }
        let url = |ip: Ipv4Addr, path: &str| format!("http://{ip}:{port}{path}");
        for (name, ip, _) in &procs {
            let readyz = url(*ip, "/readyz");
            eventually(T, &format!("{name} /readyz 200"), || async {
                let r = get(&readyz, &[]).await.ok()?;
                (r.status == 200).then_some(())
            })
            .await?;
        }
        policy_and_key(env).await?;
        let leases: kube::Api<Lease> = env.api();
        let leader = eventually(T, "a leader in the Lease", || async {
            leases
                .get_opt("keylimit-operator")
                .await
                .ok()??
                .spec?
                .holder_identity
                .filter(|h| !h.is_empty())
        })
        .await?;
        let (leader_ip, standby_ip) = match leader.as_str() {
            "op-a" => (ips[0], ips[1]),
            "op-b" => (ips[1], ips[0]),
            other => bail!("unexpected leader {other}"),
        };
        // Both are still Ready with the leader decided.
        for ip in ips {
            let r = get(&url(ip, "/readyz"), &[]).await?;
            ensure!(r.status == 200, "{ip} /readyz {}", r.status);
        }
        let sidecar = sidecar_pod(&env.client, &ns, "api-1", "p").await?;
        let token = pod_token(&sidecar, "keylimit").await?;
        // Both replicas serve the certificate of the one Secret; trust its CA.
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = env.api();
        let ca = eventually(T, "the webhook certificate Secret", || async {
            secrets
                .get_opt("keylimit-webhook-cert")
                .await
                .ok()??
                .data?
                .get("ca.crt")
                .cloned()
        })
        .await?;
        let ca_file = env.dir.path().join("ha-ca.crt");
        std::fs::write(&ca_file, &ca.0)?;
        let standby = format!("https://{standby_ip}:{tls_port}/v1/reports");
        let body = Bytes::from(serde_json::to_vec(&report(&ns, "p", "api-1", true))?);
        let auth = format!("Bearer {token}");
        let headers = [
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
        ];
        let r = request_tls(&ca_file, "POST", &standby, &headers, body.clone()).await?;
        ensure!(
            r.status == 204,
            "report sent to the standby: {} {:?}",
            r.status,
            r.body
        );
        // The plain admin port refuses the same report (no --allow-plaintext-reports).
        let plain = request("POST", &url(standby_ip, "/v1/reports"), &headers, body.clone()).await?;
        ensure!(plain.status == 410, "plain HTTP report: {}", plain.status);
        let reporting = {
            let (ca_file, standby, auth, body) = (ca_file.clone(), standby.clone(), auth.clone(), body.clone());
            Reporting(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let headers = [
                        ("content-type", "application/json"),
                        ("authorization", auth.as_str()),
                    ];
                    if let Err(e) = request_tls(&ca_file, "POST", &standby, &headers, body.clone()).await {
                        tracing::warn!(error = %e, "report not sent");
                    }
                }
            }))
        };
        await_object(
            &apikeys(env),
            "acme",
            "Exhausted=True from a report sent to the standby",
            T,
            has_condition("Exhausted", "True"),
        )
        .await?;
        drop(reporting);
        let forwarded = metric(
            &url(standby_ip, "/metrics"),
            "keylimit_operator_reports_total{result=\"forwarded\"}",
        )
        .await?;
        let accepted = metric(
            &url(leader_ip, "/metrics"),
            "keylimit_operator_reports_total{result=\"accepted\"}",
        )
        .await?;
        let standby_accepted = metric(
            &url(standby_ip, "/metrics"),
            "keylimit_operator_reports_total{result=\"accepted\"}",
        )
        .await?;
        ensure!(
            forwarded >= 1.0 && accepted >= 1.0 && standby_accepted == 0.0,
            "standby forwarded {forwarded}, leader accepted {accepted}, standby accepted {standby_accepted}"
        );
        drop(procs);
        Ok(())
    })
    .await;
}
