//! `keylimit-scale`: what the operator costs at N ApiKeys, measured on the real control plane
//! (`$KUBECONFIG`), with the real operator binary.
//!
//! 1. Creates a namespace, one policy and `--keys` ApiKeys (no `secretRef`: the operator
//!    generates each key's Secret) while no operator runs.
//! 2. Cold start: starts the operator and waits until every ApiKey is `Ready=True` and the
//!    policy's status counts every key (it is written after the ConfigMaps).
//! 3. Quiet window: nothing changes for `--quiet-seconds`; counts writes and operator CPU.
//! 4. Burst: gives every key an `expiresAt` (a spec change: new generation, new render input)
//!    and waits until the ConfigMaps carry it for every key and every status caught up.
//! 5. Restart: a new operator process over the settled state must write nothing.
//!
//! Writes are counted by the apiserver (`apiserver_request_total` by verb and resource), peak
//! and total connections from `ss` on the apiserver's port (operator pid only), CPU and RSS
//! from /proc (the apiserver's too, found by its listening port). With `--assert`, the counts
//! (never the timings) are checked: CI runs 1,000 keys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use keylimit_e2e::{free_port, get, kubectl};
use keylimit_operator::crd::{ApiKey, RateLimitPolicy};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000)]
    keys: usize,
    /// The operator binary; defaults to the one next to this tool (same profile).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Extra arguments for `keylimit-operator run`.
    #[arg(long, allow_hyphen_values = true)]
    operator_arg: Vec<String>,
    /// Length of the steady-state window (nothing changes).
    #[arg(long, default_value_t = 20)]
    quiet_seconds: u64,
    /// Give up on a phase after this long.
    #[arg(long, default_value_t = 900)]
    timeout_seconds: u64,
    /// Skip the burst and restart phases.
    #[arg(long)]
    cold_only: bool,
    /// Check the counts and exit non-zero when one is over its bound.
    #[arg(long)]
    assert: bool,
    #[arg(long, default_value_t = 1.05)]
    max_status_writes_per_key: f64,
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    #[arg(long, default_value_t = 8)]
    max_burst_configmap_writes: u64,
    /// Leave the namespace in place (for a look afterwards).
    #[arg(long)]
    keep: bool,
}

/// 2099-01-01T00:00:00Z, the burst's `expiresAt`, as the data plane writes it (seconds).
const BURST_EXPIRY: &str = "2099-01-01T00:00:00Z";
const BURST_EXPIRY_SECS: &str = "4070908800";

/// `apiserver_request_total` summed by (verb, resource, subresource).
type Requests = HashMap<(String, String, String), f64>;

async fn apiserver_requests(client: &kube::Client) -> anyhow::Result<Requests> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = Requests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |n: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{n}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        *out.entry((label("verb"), label("resource"), label("subresource")))
            .or_default() += v;
    }
    Ok(out)
}

/// Requests between two snapshots whose verb and resource match.
fn delta(a: &Requests, b: &Requests, verbs: &[&str], resource: &str, sub: &str) -> f64 {
    b.iter()
        .filter(|((v, r, s), _)| verbs.contains(&v.as_str()) && r == resource && s == sub)
        .map(|(k, n)| n - a.get(k).copied().unwrap_or(0.0))
        .sum()
}

const WRITES: &[&str] = &["POST", "PUT", "PATCH", "APPLY", "DELETE"];

/// Every write to the objects the operator manages.
fn writes(a: &Requests, b: &Requests) -> f64 {
    [
        ("apikeys", "status"),
        ("apikeys", ""),
        ("ratelimitpolicies", "status"),
        ("configmaps", ""),
        ("secrets", ""),
        ("events", ""),
    ]
    .iter()
    .map(|(r, s)| delta(a, b, WRITES, r, s))
    .sum()
}

/// The writes between two snapshots, by verb and resource, for a failure message.
fn breakdown(a: &Requests, b: &Requests) -> String {
    let mut v: Vec<String> = b
        .iter()
        .filter(|((verb, _, _), _)| WRITES.contains(&verb.as_str()))
        .filter_map(|((verb, r, s), n)| {
            let d = n - a
                .get(&(verb.clone(), r.clone(), s.clone()))
                .copied()
                .unwrap_or(0.0);
            (d > 0.0).then(|| format!("{verb} {r}{}{s}: {d}", if s.is_empty() { "" } else { "/" }))
        })
        .collect();
    v.sort();
    v.join(", ")
}

/// CPU seconds (user + system) and RSS / peak RSS in MB of a process.
fn proc_stats(pid: u32) -> (f64, f64, f64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(") ")?.1.split(' ').collect::<Vec<_>>();
            // Fields 14 and 15 (utime, stime), counted from `state` (field 3).
            let u: f64 = after.get(11)?.parse().ok()?;
            let s: f64 = after.get(12)?.parse().ok()?;
            Some((u + s) / 100.0)
        })
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (cpu, kb("VmRSS:"), kb("VmHWM:"))
}

/// The pid of the process listening on `port` (the apiserver), from `ss`, if this user may
/// see it: its CPU over the cold start shows how much of the wait is the apiserver's work.
async fn listener_pid(port: u16) -> Option<u32> {
    let out = tokio::process::Command::new("ss")
        .args(["-Hltnp"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = text.split("pid=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Samples the operator's established connections to the apiserver port every 100 ms: the
/// peak at once and every distinct local port seen (connections opened in total).
struct Connections {
    peak: AtomicUsize,
    seen: Mutex<HashSet<String>>,
    stop: AtomicBool,
}

impl Connections {
    fn spawn(pid: u32, port: u16) -> Arc<Self> {
        let c = Arc::new(Self {
            peak: AtomicUsize::new(0),
            seen: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
        });
        let me = c.clone();
        tokio::spawn(async move {
            let tag = format!("pid={pid},");
            while !me.stop.load(Ordering::Relaxed) {
                let out = tokio::process::Command::new("ss")
                    .args(["-Htnp", "state", "established"])
                    .arg(format!("( dport = :{port} )"))
                    .output()
                    .await;
                if let Ok(out) = out {
                    let text = String::from_utf8_lossy(&out.stdout);
                    let mine: Vec<&str> = text.lines().filter(|l| l.contains(&tag)).collect();
                    me.peak.fetch_max(mine.len(), Ordering::Relaxed);
                    if let Ok(mut seen) = me.seen.lock() {
                        for l in mine {
                            // Local address:port is the 3rd column without a state column.
                            if let Some(local) = l.split_whitespace().nth(2) {
                                seen.insert(local.to_string());
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        c
    }

    fn reset(&self) {
        self.peak.store(0, Ordering::Relaxed);
        if let Ok(mut s) = self.seen.lock() {
            s.clear();
        }
    }

    fn read(&self) -> (usize, usize) {
        (
            self.peak.load(Ordering::Relaxed),
            self.seen.lock().map(|s| s.len()).unwrap_or(0),
        )
    }
}

struct Operator {
    child: tokio::process::Child,
    pid: u32,
    admin: String,
}

async fn start_operator(args: &Args, ns: &str, tag: &str) -> anyhow::Result<Operator> {
    let bin = match &args.operator {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("tool has no directory")?
            .join("keylimit-operator"),
    };
    let port = free_port()?;
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{ns}-{tag}.log")))?;
    let child = tokio::process::Command::new(&bin)
        .args([
            "run",
            "--watch-namespace",
            ns,
            "--no-leader-election",
            "--shutdown-delay-seconds",
            "0",
            "--admin-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .args(&args.operator_arg)
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("operator exited at once")?;
    Ok(Operator {
        child,
        pid,
        admin: format!("http://127.0.0.1:{port}"),
    })
}

async fn operator_metric(op: &Operator, name: &str) -> f64 {
    let Ok(r) = get(&format!("{}/metrics", op.admin), &[]).await else {
        return 0.0;
    };
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Counts ApiKeys whose Ready is True and whose status saw their current generation.
fn settled(k: &ApiKey) -> bool {
    let Some(s) = &k.status else { return false };
    s.observed_generation == k.metadata.generation
        && s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Waits until `done(settled keys, policy)` holds, watching the ApiKeys (no polling lists).
async fn wait_for(
    keys: &Api<ApiKey>,
    policies: &Api<RateLimitPolicy>,
    timeout: Duration,
    mut done: impl FnMut(usize, &RateLimitPolicy) -> bool,
) -> anyhow::Result<()> {
    let state: Arc<Mutex<HashMap<String, bool>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let (s, c) = (state.clone(), count.clone());
    let watch = tokio::spawn(
        watcher(keys.clone(), watcher::Config::default()).try_for_each(move |ev| {
            let upd = |k: &ApiKey| {
                if let Ok(mut st) = s.lock() {
                    let now = settled(k);
                    let name = k.metadata.name.clone().unwrap_or_default();
                    let before = st.insert(name, now).unwrap_or(false);
                    match (before, now) {
                        (false, true) => c.fetch_add(1, Ordering::Relaxed),
                        (true, false) => c.fetch_sub(1, Ordering::Relaxed),
                        _ => 0,
                    };
                }
            };
            match &ev {
                watcher::Event::Apply(k) | watcher::Event::InitApply(k) => upd(k),
                _ => {}
            }
            futures::future::ready(Ok(()))
        }),
    );
    let deadline = Instant::now() + timeout;
    let result = loop {
        let p = policies.get("p").await?;
        if done(count.load(Ordering::Relaxed), &p) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "timed out: {} keys settled, policy status {:?}",
                count.load(Ordering::Relaxed),
                p.status.map(|s| s.keys)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    watch.abort();
    result
}

/// The policy's ConfigMaps' data, concatenated.
async fn config_text(cms: &Api<ConfigMap>) -> anyhow::Result<String> {
    let list = cms
        .list(&ListParams::default().labels("keylimit.dev/policy=p"))
        .await?;
    Ok(list
        .items
        .iter()
        .flat_map(|c| c.data.iter().flat_map(|d| d.values()))
        .cloned()
        .collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = kube::Config::infer().await?;
    let port = config
        .cluster_url
        .port_u16()
        .context("apiserver URL has no port")?;
    let client = kube::Client::try_from(config)?;
    let timeout = Duration::from_secs(args.timeout_seconds);
    let n = args.keys;
    let ns = format!("scale-{:04x}", rand::random::<u16>());
    kubectl(&["create", "namespace", &ns], None).await?;
    let policy = "apiVersion: keylimit.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  selector: {matchLabels: {app: api}}\n  limits:\n    rates: [{name: per-minute, requests: 100, per: Minute}]\n";
    kubectl(&["apply", "-n", &ns, "-f", "-"], Some(policy)).await?;
    let keys: Api<ApiKey> = Api::namespaced(client.clone(), &ns);
    let policies: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let t = Instant::now();
    let failed = stream::iter(0..n)
        .map(|i| {
            let api = keys.clone();
            async move {
                let k = ApiKey::new(
                    &format!("k{i:06}"),
                    serde_json::from_value(serde_json::json!({"policyRef": {"name": "p"}}))?,
                );
                api.create(&PostParams::default(), &k).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .filter(|r| futures::future::ready(r.is_err()))
        .count()
        .await;
    if failed > 0 {
        bail!("{failed} ApiKeys could not be created");
    }
    eprintln!("created {n} ApiKeys in {:.1?}", t.elapsed());

    let mut results: BTreeMap<&str, String> = BTreeMap::new();
    let mut failures: Vec<String> = vec![];

    // --- cold start
    let r0 = apiserver_requests(&client).await?;
    let apiserver = listener_pid(port).await;
    let apiserver_cpu0 = apiserver.map(|p| proc_stats(p).0);
    let t = Instant::now();
    let mut op = start_operator(&args, &ns, "operator").await?;
    let conns = Connections::spawn(op.pid, port);
    wait_for(&keys, &policies, timeout, |ready, p| {
        ready == n && p.status.as_ref().is_some_and(|s| s.keys == n as i64)
    })
    .await?;
    let cold = t.elapsed();
    let (cpu_cold, rss, peak_rss) = proc_stats(op.pid);
    if let (Some(pid), Some(before)) = (apiserver, apiserver_cpu0) {
        let used = proc_stats(pid).0 - before;
        results.insert(
            "apiserver_cpu_ms_per_key",
            format!("{:.3}", used * 1000.0 / n as f64),
        );
    }
    let r1 = apiserver_requests(&client).await?;
    let (peak, opened) = conns.read();
    let status_writes = delta(&r0, &r1, WRITES, "apikeys", "status");
    let events = delta(&r0, &r1, WRITES, "events", "");
    let cm_writes = delta(&r0, &r1, WRITES, "configmaps", "");
    eprintln!("cold start writes: {}", breakdown(&r0, &r1));
    let all_requests: f64 = r1.values().sum::<f64>() - r0.values().sum::<f64>();
    results.insert("cold_start_s", format!("{:.1}", cold.as_secs_f64()));
    results.insert(
        "status_writes_per_key",
        format!("{:.3}", status_writes / n as f64),
    );
    results.insert("events_per_key", format!("{:.3}", events / n as f64));
    results.insert("cold_configmap_writes", format!("{cm_writes}"));
    results.insert(
        "apiserver_requests_per_key",
        format!("{:.2}", all_requests / n as f64),
    );
    results.insert(
        "cpu_ms_per_key",
        format!("{:.3}", cpu_cold * 1000.0 / n as f64),
    );
    results.insert("rss_mb_after_cold", format!("{rss:.0}"));
    results.insert("peak_rss_mb_cold", format!("{peak_rss:.0}"));
    if status_writes / n as f64 > args.max_status_writes_per_key {
        failures.push(format!(
            "{status_writes} ApiKey status writes for {n} keys (> {} per key)",
            args.max_status_writes_per_key
        ));
    }

    // --- quiet window: nothing changes. It starts once the tail of the cold start (events,
    // the reporter's first policy summary) is written: the policy carries the reporter's
    // ConfigLoaded condition, and two seconds passed without a write. The reporter waits 5 s
    // after its start for sidecar reports, so at 1k keys two calm seconds alone ended before
    // that summary, which then landed in the quiet window as its one write.
    let deadline = Instant::now() + timeout;
    let mut last = apiserver_requests(&client).await?;
    let mut calm = 0;
    let summarized = |p: &RateLimitPolicy| {
        p.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "ConfigLoaded"))
    };
    while calm < 2 || !summarized(&policies.get("p").await?) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = apiserver_requests(&client).await?;
        calm = if writes(&last, &now) == 0.0 {
            calm + 1
        } else {
            0
        };
        last = now;
        if Instant::now() > deadline {
            bail!("the operator never stopped writing after the cold start");
        }
    }
    results.insert("settled_s", format!("{:.1}", t.elapsed().as_secs_f64()));
    let (cpu_a, _, _) = proc_stats(op.pid);
    let q0 = apiserver_requests(&client).await?;
    tokio::time::sleep(Duration::from_secs(args.quiet_seconds)).await;
    let q1 = apiserver_requests(&client).await?;
    // The resident set once the operator has been idle: what a cluster of this size costs
    // between bursts (the operator returns a burst's freed memory once it goes idle).
    let (cpu_b, rss_quiet, _) = proc_stats(op.pid);
    results.insert("rss_mb_quiet", format!("{rss_quiet:.0}"));
    let quiet_writes = writes(&q0, &q1);
    eprintln!("quiet window writes: {}", breakdown(&q0, &q1));
    results.insert("quiet_writes", format!("{quiet_writes}"));
    results.insert(
        "quiet_cpu_pct",
        format!("{:.2}", (cpu_b - cpu_a) * 100.0 / args.quiet_seconds as f64),
    );
    if quiet_writes > 0.0 {
        failures.push(format!(
            "{quiet_writes} writes in a {} s window where nothing changed ({})",
            args.quiet_seconds,
            breakdown(&q0, &q1)
        ));
    }

    if !args.cold_only {
        // --- burst: every key gets an expiry
        let b0 = apiserver_requests(&client).await?;
        let t = Instant::now();
        let patch = serde_json::json!({"spec": {"expiresAt": BURST_EXPIRY}});
        let failed = stream::iter(0..n)
            .map(|i| {
                let (api, patch) = (keys.clone(), patch.clone());
                async move {
                    api.patch(
                        &format!("k{i:06}"),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(32)
            .filter(|r| futures::future::ready(r.is_err()))
            .count()
            .await;
        if failed > 0 {
            bail!("{failed} ApiKeys could not be patched");
        }
        let patched = t.elapsed();
        wait_for(&keys, &policies, timeout, |ready, _| ready == n).await?;
        let deadline = Instant::now() + timeout;
        while config_text(&cms).await?.matches(BURST_EXPIRY_SECS).count() < n {
            if Instant::now() > deadline {
                bail!("the ConfigMaps never carried every key's expiry");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let burst = t.elapsed();
        let b1 = apiserver_requests(&client).await?;
        let burst_cms = delta(&b0, &b1, WRITES, "configmaps", "");
        let burst_status = delta(&b0, &b1, WRITES, "apikeys", "status");
        results.insert("burst_patch_s", format!("{:.1}", patched.as_secs_f64()));
        results.insert("burst_final_s", format!("{:.1}", burst.as_secs_f64()));
        results.insert("burst_configmap_writes", format!("{burst_cms}"));
        results.insert(
            "burst_status_writes_per_key",
            format!("{:.3}", burst_status / n as f64),
        );
        if burst_cms as u64 > args.max_burst_configmap_writes {
            failures.push(format!(
                "{burst_cms} ConfigMap writes for a burst of {n} key changes (> {})",
                args.max_burst_configmap_writes
            ));
        }
        if burst_status / n as f64 > args.max_status_writes_per_key {
            failures.push(format!(
                "{burst_status} ApiKey status writes for {n} changed keys"
            ));
        }

        // --- restart over settled state
        let (cpu_total, _, hwm) = proc_stats(op.pid);
        results.insert("peak_rss_mb", format!("{hwm:.0}"));
        results.insert("cpu_s_total_first_operator", format!("{cpu_total:.1}"));
        let _ = op.child.start_kill();
        let _ = op.child.wait().await;
        conns.stop.store(true, Ordering::Relaxed);
        let s0 = apiserver_requests(&client).await?;
        let t = Instant::now();
        op = start_operator(&args, &ns, "operator-restarted").await?;
        let conns2 = Connections::spawn(op.pid, port);
        conns2.reset();
        let deadline = Instant::now() + timeout;
        // Every key is looked at once after a restart; then nothing may be written.
        while operator_metric(
            &op,
            "keylimit_operator_reconciles_total{controller=\"apikey\"}",
        )
        .await
            < n as f64
        {
            if Instant::now() > deadline {
                bail!("the restarted operator never reconciled every key");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restart = t.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let s1 = apiserver_requests(&client).await?;
        let restart_writes = writes(&s0, &s1);
        results.insert(
            "restart_reconciled_s",
            format!("{:.1}", restart.as_secs_f64()),
        );
        results.insert("restart_writes", format!("{restart_writes}"));
        let (p2, _) = conns2.read();
        results.insert("restart_peak_connections", format!("{p2}"));
        if restart_writes > 0.0 {
            failures.push(format!(
                "{restart_writes} writes by an operator restarted over settled state ({})",
                breakdown(&s0, &s1)
            ));
        }
        if p2 > args.max_connections {
            failures.push(format!("{p2} connections after restart"));
        }
        conns2.stop.store(true, Ordering::Relaxed);
    }
    results.insert("peak_connections", format!("{peak}"));
    results.insert("connections_opened", format!("{opened}"));
    if peak > args.max_connections {
        failures.push(format!(
            "{peak} connections to the apiserver at once (> {})",
            args.max_connections
        ));
    }
    let _ = op.child.start_kill();
    conns.stop.store(true, Ordering::Relaxed);

    let line: Vec<String> = results.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT keys={n} {}", line.join(" "));
    if !args.keep {
        kubectl(&["delete", "namespace", &ns, "--wait=false"], None)
            .await
            .context("cleanup")?;
    }
    if args.assert && !failures.is_empty() {
        bail!("scale bounds exceeded:\n  {}", failures.join("\n  "));
    }
    Ok(())
}
