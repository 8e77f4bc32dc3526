//! The sidecar binary on the single-threaded runtime that `--worker-threads 1` selects (and
//! that a pod limited to one CPU gets by default): it serves keyed traffic, and on SIGTERM it
//! finishes a request still in flight before it exits.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use common::{client, daily, doc, eventually, key, material, upstream, with_key, ConfigDir};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Killed when dropped, so a failed assertion leaves no sidecar behind.
struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    let c = client();
    let resp = c
        .get(format!("http://{addr}{path}").parse().ok()?)
        .await
        .ok()?;
    if resp.status() != StatusCode::OK {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_serves_and_drains_on_sigterm() {
    let up = upstream().await;
    let mut dir = ConfigDir::new();
    dir.write_doc(&doc(daily(100), vec![key("z")]));
    let (traffic, admin) = (free_addr(), free_addr());
    let child = Command::new(env!("CARGO_BIN_EXE_keylimit-sidecar"))
        .args(["--worker-threads", "1", "--log-format", "text"])
        .args(["--listen", &traffic.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &format!("http://{}", up.addr)])
        .args(["--drain-timeout-secs", "20"])
        .arg("--config-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the sidecar");
    let mut sidecar = Sidecar(child);
    eventually("the sidecar to be ready", || async {
        admin_get(admin, "/readyz").await.is_some()
    })
    .await;

    let c = client();
    let r = with_key(&c, traffic, "/", "z").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining"), "99");

    // An upload whose body is only half sent when SIGTERM arrives.
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let streaming: Client<HttpConnector, _> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = Request::post(format!("http://{traffic}/upload"))
        .header("x-api-key", material("z"))
        .body(body)
        .expect("request");
    let in_flight = tokio::spawn(streaming.request(req));
    tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 1000]))))
        .await
        .expect("first half");
    eventually("the upload to be in flight", || async {
        admin_get(admin, "/metrics")
            .await
            .is_some_and(|m| m.lines().any(|l| l.ends_with("in_flight_requests 1")))
    })
    .await;
    let pid = sidecar.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {pid}");
    tx.send(Ok(Frame::data(Bytes::from(vec![2u8; 500]))))
        .await
        .expect("second half");
    drop(tx);

    let resp = in_flight
        .await
        .expect("join")
        .expect("the in-flight upload is answered");
    assert_eq!(resp.status(), StatusCode::OK);
    let seen: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes())
            .expect("json");
    assert_eq!(seen[":body-len"], "1500");

    let mut exit = None;
    eventually("the sidecar to exit", || {
        exit = sidecar.0.try_wait().ok().flatten();
        std::future::ready(exit.is_some())
    })
    .await;
    assert!(exit.is_some_and(|s| s.success()), "exit status {exit:?}");
    assert!(
        tokio::net::TcpStream::connect(traffic).await.is_err(),
        "the traffic port is closed"
    );
}
