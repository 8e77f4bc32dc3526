//! End-to-end: leader election against a stalled kube-apiserver. Two real operator processes
//! share a Lease; the test freezes this control plane's apiserver with SIGSTOP for longer than
//! the lease, then thaws it. Run by `hack/test.sh`; ignored by a plain `cargo test`.
//!
//! It stops the apiserver of the control plane in `$KEYLIMIT_CP_DIR` (else the directory of
//! `$KUBECONFIG`, which `hack/controlplane.sh` puts there) and nothing else: the pid comes from
//! that directory and must name it on its command line. A guard sends SIGCONT on every way out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use keylimit_e2e::*;
use kube::Api;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The operators' `--lease-seconds`: renew deadline 4 s, retry 1 s (2/3 and 1/6 of it).
const LEASE: Duration = Duration::from_secs(6);
const RENEW_DEADLINE: Duration = Duration::from_secs(4);
/// Longer than the lease, so the standby would consider the lease expired by any clock.
const STALL: Duration = Duration::from_secs(10);
const T: Duration = Duration::from_secs(60);

/// This control plane's kube-apiserver, found by the pid file `hack/controlplane.sh` writes.
fn apiserver_pid() -> anyhow::Result<Pid> {
    let dir = match std::env::var("KEYLIMIT_CP_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let kc = std::env::var("KUBECONFIG").context("KUBECONFIG is not set")?;
            Path::new(&kc)
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("KUBECONFIG {kc} has no directory"))?
        }
    };
    let dir = dir.canonicalize().unwrap_or(dir);
    let pid_file = dir.join("kube-apiserver.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", pid_file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("apiserver pid {pid} is not running"))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let marker = format!("{}/", dir.display());
    ensure!(
        cmdline.contains("kube-apiserver") && cmdline.contains(&marker),
        "pid {pid} is not the kube-apiserver of {}: {cmdline}",
        dir.display()
    );
    Ok(Pid::from_raw(pid))
}

/// The apiserver frozen; thawed when dropped, whatever happens in between.
struct Frozen(Pid);

impl Frozen {
    fn freeze(pid: Pid) -> anyhow::Result<Self> {
        kill(pid, Signal::SIGSTOP).context("SIGSTOP to the apiserver")?;
        Ok(Self(pid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = kill(self.0, Signal::SIGCONT) {
            eprintln!("SIGCONT to the apiserver (pid {}) failed: {e}", self.0);
        }
    }
}

async fn start(env: &mut Env, identity: &str) -> anyhow::Result<Proc> {
    let admin = free_port()?;
    let ns = env.ns.clone();
    let lease = LEASE.as_secs().to_string();
    let addr = format!("127.0.0.1:{admin}");
    let mut p = env
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
                &lease,
                "--admin-addr",
                &addr,
            ],
        )
        .await?;
    p.admin_port = Some(admin);
    Ok(p)
}

/// The timestamp of the first log line of `p` containing one of `needles` (tracing's RFC 3339
/// prefix; both operators run on this machine, so their stamps share one clock).
fn logged_at(p: &Proc, needles: &[&str]) -> Option<Timestamp> {
    p.log_text()
        .lines()
        .find(|l| needles.iter().any(|n| l.contains(n)))
        .and_then(|l| {
            let plain = strip_ansi(l);
            plain.split_whitespace().next()?.parse().ok()
        })
}

fn count(p: &Proc, needles: &[&str]) -> usize {
    p.log_text()
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .count()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn wait_logged(p: &Proc, needles: &[&str], timeout: Duration) -> anyhow::Result<Timestamp> {
    eventually(
        timeout,
        &format!("{:?} in {}", needles, p.log.display()),
        || async { logged_at(p, needles) },
    )
    .await
}

const BECAME: &[&str] = &["became leader"];
/// The lock's own message, or the caller's when the lock returns `LeaseLost`.
const STOPPED: &[&str] = &["stopped leading", "stepping down"];

/// Scenario: operator `a` leads, `b` stands by; the apiserver is frozen for longer than the
/// lease (every request hangs: no error, no answer), then thawed.
/// - `a` stops leading by its claim's deadline (the last renewal's start + 4 s), during the
///   freeze: a renewal that hangs does not keep it leading. Before the fix the renewal had no
///   timeout and `a` went on leading through the freeze.
/// - `b` becomes leader only after the thaw, and only after `a` stopped: there is no instant
///   at which both claim leadership.
/// - The Lease ends up held by `b`, and `a` never leads again.
#[tokio::test]
#[ignore = "needs a control plane: run hack/test.sh"]
async fn stalled_apiserver_never_gives_two_leaders() {
    scenario("leader-stall", async |env: &mut Env| {
        let apiserver = apiserver_pid()?;
        let a = start(env, "a").await?;
        wait_logged(&a, BECAME, T).await?;
        let b = start(env, "b").await?;
        let healthz = b.admin_url("/healthz");
        eventually(T, "b to be up", || async {
            get(&healthz, &[]).await.ok().filter(|r| r.status == 200)
        })
        .await?;

        // Wait for a fresh renewal by `a`, so the freeze starts with its claim just renewed and
        // `b` has had a retry period to read the lease.
        let leases: Api<Lease> = env.api();
        let rv = |l: Option<Lease>| l.and_then(|l| l.metadata.resource_version);
        let before = rv(leases.get_opt("keylimit-operator").await?);
        eventually(T, "a renewal of the lease", || async {
            let now = rv(leases.get_opt("keylimit-operator").await.ok().flatten());
            (now.is_some() && now != before).then_some(())
        })
        .await?;

        let frozen_at = Timestamp::now();
        let frozen_since = Instant::now();
        let stepped_down = {
            let _frozen = Frozen::freeze(apiserver)?;
            // Nothing here talks to the apiserver: the test only reads the operators' logs.
            let stepped_down = wait_logged(&a, STOPPED, RENEW_DEADLINE + Duration::from_secs(5))
                .await
                .context("the leader kept leading through a stalled apiserver")?;
            ensure!(
                logged_at(&b, BECAME).is_none(),
                "b became leader while the apiserver was frozen"
            );
            // The freeze lasting past a whole lease is the scenario itself, not a wait for
            // something to happen.
            tokio::time::sleep_until((frozen_since + STALL).into()).await;
            stepped_down
        };
        let thawed_at = Timestamp::now();

        let b_leads = wait_logged(&b, BECAME, T)
            .await
            .context("b never took over after the thaw")?;
        let step_down_after = stepped_down.duration_since(frozen_at);
        eprintln!(
            "a stopped leading {step_down_after:#} after the freeze; b became leader {:#} after the thaw",
            b_leads.duration_since(thawed_at)
        );
        ensure!(
            step_down_after.unsigned_abs() <= RENEW_DEADLINE + Duration::from_secs(1),
            "a stopped leading {step_down_after:#} after the freeze, past its renew deadline"
        );
        ensure!(
            stepped_down < b_leads,
            "two leaders: b became leader at {b_leads} before a stopped at {stepped_down}"
        );
        ensure!(
            b_leads > thawed_at,
            "b became leader at {b_leads}, before the thaw at {thawed_at}"
        );
        let holder = eventually(T, "the Lease to name b", || async {
            leases
                .get_opt("keylimit-operator")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
                .filter(|h| h == "b")
        })
        .await?;
        ensure!(holder == "b");
        if count(&a, BECAME) != 1 {
            bail!("a led again after stepping down:\n{}", a.log_text());
        }
        Ok(())
    })
    .await;
}
