//! Connection-level attacks on both ports: slowloris heads, idle keep-alive connections,
//! more connections than the cap, descriptor exhaustion; and who may read the admin port.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keylimit_dataplane::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{self, doc, key, material};
use crate::raw;

/// A sidecar serving key `a`, with its settings tweaked.
async fn sidecar(
    tweak: impl FnOnce(&mut keylimit_sidecar::Settings),
) -> (
    common::ConfigDir,
    common::Upstream,
    keylimit_sidecar::Sidecar,
) {
    let mut dir = common::ConfigDir::new();
    dir.write_doc(&doc(Limits::default(), vec![key("a")]));
    let up = common::upstream().await;
    let sc = common::start_with(&dir, &up, tweak).await;
    (dir, up, sc)
}

fn keyed_request() -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: app\r\nX-Api-Key: {}\r\n\r\n",
        material("a")
    )
    .into_bytes()
}

/// Reads one `Content-Length` response off a keep-alive connection: its status, or None on EOF.
async fn read_response(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let r = raw::parse(&buf);
            let len: usize = r
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(r.status);
            }
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How long until the peer closes (EOF or reset), or None if it is still open after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(limit, async {
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
    .ok()
    .map(|()| t.elapsed())
}

/// The slowloris client: one byte of a never-ending head every `every` until the server
/// closes the connection. When it did, or None if it still had not after `limit`.
async fn slowloris(addr: SocketAddr, every: Duration, limit: Duration) -> Option<Duration> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let head = b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: ";
        let mut tick = tokio::time::interval(every);
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            tick.tick().await;
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    let mut chunk = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        while let Ok(n) = r.read(&mut chunk).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
    writer.abort();
    closed.ok().map(|()| t.elapsed())
}

#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_read_timeout_on_both_ports() {
    let (_dir, _up, sc) = sidecar(|s| {
        s.header_read_timeout = Duration::from_secs(1);
        s.idle_timeout = Duration::from_secs(60);
    })
    .await;
    for (port, addr) in [("traffic", sc.traffic_addr), ("admin", sc.admin_addr)] {
        let closed = slowloris(addr, Duration::from_millis(200), Duration::from_secs(8)).await;
        let closed =
            closed.unwrap_or_else(|| panic!("{port}: a head trickled for 8 s was not cut"));
        assert!(
            (Duration::from_millis(900)..Duration::from_secs(4)).contains(&closed),
            "{port}: cut after {closed:?}, header timeout 1 s"
        );
    }
    sc.stop().await;
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed_after_the_idle_timeout() {
    let (_dir, _up, sc) = sidecar(|s| {
        s.header_read_timeout = Duration::from_millis(300);
        s.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    for (port, addr, req) in [
        ("traffic", sc.traffic_addr, keyed_request()),
        (
            "admin",
            sc.admin_addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&req).await.unwrap();
        assert_eq!(read_response(&mut s).await, Some(200), "{port}");
        let closed = closed_within(&mut s, Duration::from_secs(8))
            .await
            .unwrap_or_else(|| panic!("{port}: idle keep-alive connection still open after 8 s"));
        // Idle time is bounded by the idle timeout, not the (shorter) header timeout.
        assert!(
            (Duration::from_millis(1400)..Duration::from_secs(5)).contains(&closed),
            "{port}: closed after {closed:?}, idle timeout 1.5 s"
        );
    }
    sc.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_wait_and_are_served_when_one_closes() {
    let (_dir, _up, sc) = sidecar(|s| s.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(sc.traffic_addr).await.unwrap();
        s.write_all(&keyed_request()).await.unwrap();
        assert_eq!(read_response(&mut s).await, Some(200));
        held.push(s);
    }
    // Over the cap: the kernel completes the handshake (backlog), the sidecar does not accept.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(sc.traffic_addr).await.unwrap();
        s.write_all(&keyed_request()).await.unwrap();
        waiting.push(s);
    }
    for s in &mut waiting {
        let early = tokio::time::timeout(Duration::from_millis(300), read_response(s)).await;
        assert!(
            early.is_err(),
            "a connection over the cap was served: {early:?}"
        );
    }
    // One slot frees up: the waiting clients are served in turn (each closes after its
    // answer, freeing the slot for the next), none refused.
    held.pop();
    for s in &mut waiting {
        let status = tokio::time::timeout(Duration::from_secs(5), read_response(s))
            .await
            .expect("served after a slot freed up");
        assert_eq!(status, Some(200));
        s.shutdown().await.unwrap();
        assert!(closed_within(s, Duration::from_secs(5)).await.is_some());
    }
    sc.stop().await;
}

/// The machine's first global IPv4 address, if it has one.
fn non_loopback_ip() -> Option<IpAddr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
}

#[tokio::test]
async fn usage_answers_loopback_only_while_probes_and_metrics_answer_the_pod_ip() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address: the peer check is covered by admin's unit test");
        return;
    };
    let (_dir, _up, sc) = sidecar(|s| s.admin_listen = SocketAddr::from(([0, 0, 0, 0], 0))).await;
    let port = sc.admin_addr.port();
    let remote = SocketAddr::new(ip, port);
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let get = |path: &str| raw::get(path, &[]);
    // Connecting to the pod IP from this host makes the sidecar see the pod IP as the peer.
    let r = raw::send(remote, &get("/v1/usage")).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(!r.body.contains("\"keys\""), "{r:?}");
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(raw::send(remote, &get(path)).await.status, 200, "{path}");
    }
    let r = raw::send(local, &get("/v1/usage")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("\"policyName\":\"orders\""), "{r:?}");
    sc.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The sidecar binary under a descriptor limit of 64, with a connection cap far above it:
/// once descriptors run out, accept fails with EMFILE. It must back off quietly (not log a
/// line every few milliseconds) and serve again once descriptors are free.
#[tokio::test]
async fn descriptor_exhaustion_backs_off_quietly_and_recovers() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("prlimit (util-linux) missing: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg(env!("CARGO_BIN_EXE_keylimit-sidecar"))
        .args([
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", "http://127.0.0.1:9", "--log-format", "text"])
        .args(["--max-connections", "1000"])
        .arg("--config-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the sidecar");
    let lines = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
    let stdout = child.stdout.take().expect("piped stdout");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                l.push((Instant::now(), line));
            }
        }
    });
    let accept_failures = || {
        lines
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|(_, s)| s.contains("accept fail"))
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    common::eventually("the sidecar to listen", || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;

    // More connections than descriptors; they are idle, so nothing closes them for 75 s.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(
            TcpStream::connect(addr)
                .await
                .expect("the backlog takes it"),
        );
    }
    common::eventually("an accept failure to be logged", || async {
        !accept_failures().is_empty()
    })
    .await;
    let first = accept_failures()[0];
    // The old loop logged every 50 ms (~40 lines in 2 s); now at most one line per 5 s.
    let spun = tokio::time::timeout(Duration::from_secs(2), async {
        while accept_failures().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let logged = accept_failures();
    assert!(
        spun.is_err(),
        "{} accept-failure lines within {:?} of the first",
        logged.len(),
        logged.last().map(|t| t.duration_since(first))
    );

    // Descriptors come back: new clients are served again.
    held.clear();
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                if s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                    .await
                    .is_ok()
                {
                    if let Some(status) = read_response(&mut s).await {
                        return status;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    // No config in the directory: the sidecar answers 503 not_ready, which is an answer.
    assert_eq!(served.ok(), Some(503));
}
