//! New connections that arrive while the sidecar is not accepting wait in the kernel's listen
//! queue instead of having their SYNs dropped (a dropped SYN is retried only after a second).
//! The open-loop benchmark opens up to 224 connections in a burst when its 32 are busy; at
//! the connection cap the docs promise that clients wait in the backlog.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keylimit_dataplane::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// More than the 128 that `TcpListener::bind` asks for, fewer than Linux's default somaxconn.
const BURST: usize = 300;

#[tokio::test]
async fn a_burst_of_new_connections_at_the_cap_waits_in_the_backlog() {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(usize::MAX);
    assert!(
        somaxconn > BURST,
        "net.core.somaxconn is {somaxconn}: the kernel caps every listen queue below {BURST}"
    );
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(Limits::default(), vec![key("k")]));
    let up = upstream().await;
    // One connection at most: while it is open the sidecar accepts nothing more, so every
    // further client is left to the kernel's listen queue.
    let sc = start_with(&dir, &up, |s| s.max_connections = 1).await;
    let addr = sc.traffic_addr;

    let mut held = TcpStream::connect(addr).await.expect("connect");
    held.write_all(b"GET / HTTP/1.1\r\nhost: sidecar\r\n\r\n")
        .await
        .expect("write");
    // An answer proves the sidecar accepted this one and holds its only permit.
    let mut first = [0u8; 12];
    held.read_exact(&mut first).await.expect("answer");
    assert!(first.starts_with(b"HTTP/1.1 "), "{first:?}");

    let connected = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(Notify::new());
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        let (connected, changed) = (connected.clone(), changed.clone());
        clients.spawn(async move {
            let stream = TcpStream::connect(addr).await;
            if stream.is_ok() {
                connected.fetch_add(1, Ordering::SeqCst);
                changed.notify_one();
            }
            // Kept open until the test ends, so the queue stays as full as it got.
            stream
        });
    }
    // A client whose SYN was dropped retries after 1 s, 3 s, 7 s..., and the queue stays full,
    // so it never connects: the wait ends at the deadline with fewer than BURST connected.
    let all = tokio::time::timeout(Duration::from_secs(10), async {
        while connected.load(Ordering::SeqCst) < BURST {
            changed.notified().await;
        }
    })
    .await;
    let n = connected.load(Ordering::SeqCst);
    assert!(
        all.is_ok(),
        "only {n} of {BURST} new connections completed while the sidecar was at its cap"
    );
    clients.abort_all();
    drop(held);
    sc.stop().await;
}
