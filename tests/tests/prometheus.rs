//! End-to-end: a real Prometheus (Debian's package, on loopback) scrapes a real operator and
//! a real sidecar while traffic drives a key to exhaustion. Then every query of the chart's
//! Grafana dashboard, with its variables substituted, goes through Prometheus's HTTP API and
//! must be valid and return at least one series; the chart's alert rules, loaded into the same
//! Prometheus, must evaluate without errors, and the key-exhaustion alert must go pending.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use bytes::Bytes;
use keylimit_e2e::upstream::Upstream;
use keylimit_e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(30);

/// `application/x-www-form-urlencoded` value: everything but unreserved bytes escaped.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An instant query through the HTTP API: Ok(result array) or the error Prometheus gave.
async fn query(prom: &str, promql: &str) -> anyhow::Result<Vec<Value>> {
    let reply = request(
        "POST",
        &format!("{prom}/api/v1/query"),
        &[("content-type", "application/x-www-form-urlencoded")],
        Bytes::from(format!("query={}", form_encode(promql))),
    )
    .await?;
    let v = reply.json()?;
    if v["status"] != "success" {
        bail!(
            "HTTP {}: {} {}",
            reply.status,
            v["errorType"].as_str().unwrap_or_default(),
            v["error"].as_str().unwrap_or_default()
        );
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// Renders one template of the chart with `values`.
async fn render(ns: &str, template: &str, values: &[&str]) -> anyhow::Result<String> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "kl",
        chart.to_str().unwrap_or_default(),
        "-n",
        ns,
        "--show-only",
        template,
    ];
    for v in values {
        args.extend(["--set", v]);
    }
    helm(&args).await
}

/// The chart's PrometheusRule `spec` (a Prometheus rule file: `groups:`), dedented.
fn rule_file(rendered: &str) -> anyhow::Result<String> {
    let mut lines = rendered.lines().skip_while(|l| *l != "spec:");
    ensure!(lines.next().is_some(), "no spec in:\n{rendered}");
    let out: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("  "))
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    Ok(out.join("\n") + "\n")
}

/// Every panel's queries (rows' nested panels included): (panel title, expr).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((title.clone(), t["expr"].as_str().unwrap_or("").to_string()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = vec![];
    walk(&dashboard["panels"], &mut out);
    out
}

/// What Grafana does to a query before sending it, for one selected namespace and policy.
fn substitute(expr: &str, ns: &str, policy: &str) -> String {
    expr.replace("${datasource}", "prometheus")
        .replace("$datasource", "prometheus")
        .replace("$__rate_interval", "1m")
        .replace("$namespace", ns)
        .replace("$policy", policy)
}

#[tokio::test]
#[ignore = "needs a control plane and Debian's prometheus: run hack/test.sh"]
async fn dashboard_queries_return_series_from_a_real_prometheus() {
    scenario("prom", async |env: &mut Env| {
        // The stack, as tests/tests/limits.rs builds it: operator, policy, key, projection,
        // upstream, and a sidecar reporting with a pod-bound token.
        let operator = env.start_operator("op").await?;
        env.apply_yaml(
            "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 600, per: Minute, burst: 20}]\n    quotas: [{name: hourly, requests: 4, period: Hour}]\n",
        )
        .await?;
        env.apply_yaml(
            "apiVersion: keylimit.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: acme}\nspec: {policyRef: {name: p}}\n",
        )
        .await?;
        await_object(&apikeys(env), "acme", "Ready=True", T, has_condition("Ready", "True"))
            .await?;
        let (dir, _projection) = env.project("p")?;
        eventually(T, "the projected policy.json to hold the key", || async {
            let doc = std::fs::read_to_string(dir.join("policy.json")).ok()?;
            doc.contains("\"acme\"").then_some(())
        })
        .await?;
        let upstream = Upstream::start().await?;
        let pod = sidecar_pod(&env.client, &env.ns, "sc-prom", "p").await?;
        let token_file = env.dir.path().join("token");
        std::fs::write(&token_file, pod_token(&pod, "keylimit").await?)?;
        let report_url = operator.admin_url("/v1/reports");
        let token_arg = token_file.display().to_string();
        let sidecar = env
            .start_sidecar(
                "sc",
                &dir,
                upstream.addr,
                &[
                    "--report-url",
                    &report_url,
                    "--report-token-file",
                    &token_arg,
                    "--report-interval-ms",
                    "1000",
                ],
            )
            .await?;

        // Prometheus: loopback, a free port, storage in the test's temp dir, 1s scrapes of
        // both targets with the labels a PodMonitor/ServiceMonitor would give them, and the
        // chart's alert rules exactly as rendered.
        let ns = env.ns.clone();
        let rules = rule_file(
            &render(&ns, "templates/prometheusrule.yaml", &["metrics.alerts.enabled=true"]).await?,
        )?;
        let prom_dir = env.dir.path().join("prometheus");
        std::fs::create_dir_all(prom_dir.join("data"))?;
        std::fs::write(prom_dir.join("rules.yaml"), &rules)?;
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n\
             - job_name: keylimit-operator\n  static_configs: [{{targets: ['127.0.0.1:{op}'], labels: {{namespace: '{ns}', pod: operator-op}}}}]\n\
             - job_name: keylimit-sidecars\n  static_configs: [{{targets: ['127.0.0.1:{sc}'], labels: {{namespace: '{ns}', pod: sc-prom}}}}]\n",
            rules = prom_dir.join("rules.yaml").display(),
            op = operator.admin_port.unwrap_or_default(),
            sc = sidecar.admin_port.unwrap_or_default(),
        );
        std::fs::write(prom_dir.join("prometheus.yml"), config)?;
        let port = free_port()?;
        let prom = format!("http://127.0.0.1:{port}");
        let _prometheus = env
            .spawn(
                "prometheus",
                Path::new("prometheus"),
                &[
                    &format!("--config.file={}", prom_dir.join("prometheus.yml").display()),
                    &format!("--storage.tsdb.path={}", prom_dir.join("data").display()),
                    &format!("--web.listen-address=127.0.0.1:{port}"),
                ],
            )
            .await
            .context("starting prometheus (Debian package `prometheus`: hack/install-deps.sh)")?;
        eventually(T, "prometheus ready", || async {
            let r = get(&format!("{prom}/-/ready"), &[]).await.ok()?;
            (r.status == 200).then_some(())
        })
        .await?;
        eventually(T, "both targets scraped (up == 1)", || async {
            let up = query(&prom, "sum(up)").await.ok()?;
            (up.first()?["value"][1].as_str()? == "2").then_some(())
        })
        .await?;

        // Traffic: admitted calls until the hourly quota of 4 is used up, then 429s; and a
        // call without a key.
        let key = read_key(env, "acme-key").await?;
        let mut statuses = vec![];
        for _ in 0..8 {
            statuses.push(get(&sidecar.url("/"), &[("X-API-Key", key.as_str())]).await?.status);
        }
        ensure!(
            statuses == [200, 200, 200, 200, 429, 429, 429, 429],
            "quota of 4 did not exhaust as expected: {statuses:?}"
        );
        ensure!(get(&sidecar.url("/"), &[]).await?.status == 401, "keyless call not 401");

        let policy = format!("{ns}/p");
        eventually(T, "Prometheus to see the key exhausted", || async {
            let sel = format!(
                "keylimit_exhausted_keys{{namespace=\"{ns}\",policy=\"{policy}\",reason=\"quota_exceeded\"}} == 1"
            );
            (!query(&prom, &sel).await.ok()?.is_empty()).then_some(())
        })
        .await?;
        eventually(T, "the operator to record a report", || async {
            let q = "keylimit_operator_reports_total{result=\"accepted\"} > 0";
            (!query(&prom, q).await.ok()?.is_empty()).then_some(())
        })
        .await?;

        // The dashboard exactly as the chart ships it.
        let cm = render(&ns, "templates/dashboard-configmap.yaml", &["metrics.dashboard.enabled=true"])
            .await?;
        let json = kubectl(&["create", "--dry-run=client", "-o", "json", "-f", "-"], Some(&cm))
            .await?;
        let cm: Value = serde_json::from_str(&json)?;
        let dashboard: Value = serde_json::from_str(
            cm["data"]["keylimit.json"]
                .as_str()
                .ok_or_else(|| anyhow!("the ConfigMap has no keylimit.json"))?,
        )?;
        let queries = panel_queries(&dashboard);
        ensure!(queries.len() >= 20, "only {} panel queries", queries.len());
        ensure!(
            queries.iter().all(|(_, e)| !e.is_empty()),
            "a panel target has no expr"
        );
        // Variables: label_values(metric, label) must offer this namespace and policy.
        let vars: Vec<&Value> = dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        for (name, want) in [("namespace", ns.as_str()), ("policy", policy.as_str())] {
            let v = vars
                .iter()
                .find(|v| v["name"] == name)
                .ok_or_else(|| anyhow!("no ${name} variable"))?;
            let def = v["query"]["query"].as_str().unwrap_or_default();
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .and_then(|s| s.rsplit_once(','))
                .ok_or_else(|| anyhow!("${name} is not label_values(metric, label): {def}"))?;
            let (metric, label) = (substitute(inner.0, &ns, &policy), inner.1.trim());
            let got = query(&prom, &format!("count by ({label}) ({metric})")).await?;
            ensure!(
                got.iter().any(|s| s["metric"][label] == want),
                "${name} ({def}) does not offer {want}: {got:?}"
            );
        }

        // Every panel query: valid PromQL that returns at least one series. Polled, because a
        // rate() needs two scrapes of a series and the report-driven ones a report.
        let mut failures = vec![];
        for (title, expr) in &queries {
            let q = substitute(expr, &ns, &policy);
            ensure!(!q.contains('$'), "unsubstituted variable in panel {title:?}: {q}");
            let r = eventually(Duration::from_secs(15), &format!("panel {title:?}"), || async {
                match query(&prom, &q).await {
                    Ok(series) if series.is_empty() => None,
                    other => Some(other),
                }
            })
            .await;
            match r {
                Ok(Ok(series)) => {
                    tracing::info!(panel = %title, series = series.len(), "panel query ok")
                }
                Ok(Err(e)) => failures.push(format!("panel {title:?}: invalid query {q}: {e:#}")),
                Err(_) => failures.push(format!("panel {title:?}: no series for {q}")),
            }
        }
        ensure!(failures.is_empty(), "dashboard queries failed:\n{}", failures.join("\n"));

        // The alert rules: every rule evaluates cleanly against the real metrics, and the key
        // exhaustion alert is on its way (pending for metrics.alerts.keyExhaustedFor).
        let alert = eventually(T, "KeylimitKeyExhausted pending for policy p", || async {
            let r = get(&format!("{prom}/api/v1/alerts"), &[]).await.ok()?;
            let v = r.json().ok()?;
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "KeylimitKeyExhausted"
                        && a["labels"]["policy"] == policy.as_str()
                })
                .cloned()
        })
        .await?;
        ensure!(
            alert["labels"]["reason"] == "quota_exceeded",
            "unexpected alert: {alert}"
        );
        let rules = get(&format!("{prom}/api/v1/rules"), &[]).await?.json()?;
        let mut n = 0;
        for g in rules["data"]["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                n += 1;
                ensure!(
                    r["health"] != "err",
                    "rule {} failed to evaluate: {}",
                    r["name"],
                    r["lastError"]
                );
            }
        }
        ensure!(n >= 7, "Prometheus loaded only {n} rules");
        Ok(())
    })
    .await;
}
