//! The stack against raw sockets: the bytes an attacker sends, nothing normalised.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::*;

async fn ok(
    _peer: SocketAddr,
    _req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

async fn start(config: ServerConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, config, tcp, ok, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        stop: Some(tx),
        task,
    }
}

fn config(header: u64, idle: u64) -> ServerConfig {
    ServerConfig {
        header_read_timeout: Duration::from_millis(header),
        idle_timeout: Duration::from_millis(idle),
        drain_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// Reads one `Content-Length` response off a keep-alive connection; None on EOF.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits for the peer to close (EOF or reset); the elapsed time, or None after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut chunk = [0u8; 256];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| t.elapsed())
}

/// Sends `bytes` one at a time every `every` until the server closes; when it closed.
async fn trickle(s: TcpStream, bytes: &[u8], every: Duration, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let (mut r, mut w) = s.into_split();
    let bytes = bytes.to_vec();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        for b in bytes.iter().cycle() {
            tick.tick().await;
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
        }
    });
    let mut chunk = [0u8; 256];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    writer.abort();
    closed.ok().map(|()| t.elapsed())
}

#[tokio::test]
async fn slowloris_head_is_cut_at_the_header_timeout() {
    let srv = start(config(500, 30_000)).await;
    let s = TcpStream::connect(srv.addr).await.unwrap();
    let head =
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let closed = trickle(s, head, Duration::from_millis(50), Duration::from_secs(5)).await;
    let closed = closed.expect("a trickled head was cut off");
    assert!(closed >= Duration::from_millis(400), "{closed:?}");
    srv.stop().await;
}

#[tokio::test]
async fn slowloris_after_a_keepalive_request_is_cut_too() {
    let srv = start(config(500, 30_000)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(REQUEST).await.unwrap();
    assert!(read_response(&mut s).await.is_some());
    let closed = trickle(
        s,
        b"GET / HTTP/1.1\r\nX-a: b",
        Duration::from_millis(50),
        Duration::from_secs(5),
    )
    .await;
    assert!(closed.is_some(), "the second, trickled head was cut off");
    srv.stop().await;
}

#[tokio::test]
async fn h2_preface_trickle_is_cut_at_the_header_timeout() {
    let srv = start(config(500, 30_000)).await;
    let s = TcpStream::connect(srv.addr).await.unwrap();
    let closed = trickle(
        s,
        H2_PREFACE,
        Duration::from_millis(50),
        Duration::from_secs(5),
    )
    .await;
    assert!(closed.is_some(), "a trickled HTTP/2 preface was cut off");
    srv.stop().await;
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed_at_the_idle_timeout_not_the_header_timeout() {
    let srv = start(config(200, 1_000)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(REQUEST).await.unwrap();
    assert!(read_response(&mut s).await.is_some());
    let closed = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the idle connection was closed");
    assert!(
        closed >= Duration::from_millis(900),
        "closed after {closed:?}: the header timeout (200 ms) must not apply to idle time"
    );
    srv.stop().await;
}

#[tokio::test]
async fn connection_that_never_sends_is_closed_at_the_idle_timeout() {
    let srv = start(config(200, 600)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5))
        .await
        .is_some());
    srv.stop().await;
}

#[tokio::test]
async fn idle_h2_connection_gets_goaway_at_the_idle_timeout() {
    let srv = start(config(200, 600)).await;
    let s = TcpStream::connect(srv.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    let t = Instant::now();
    let conn = tokio::spawn(conn);
    let resp = send
        .send_request(Request::get("http://x/").body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the server ended the idle HTTP/2 connection")
        .unwrap()
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    srv.stop().await;
}

#[tokio::test]
async fn over_the_cap_clients_wait_and_are_served_when_a_connection_closes() {
    let srv = start(ServerConfig {
        max_connections: 2,
        ..config(10_000, 30_000)
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(REQUEST).await.unwrap();
        assert!(read_response(&mut s).await.is_some());
        held.push(s);
    }
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(REQUEST).await.unwrap();
        waiting.push(s);
    }
    for s in &mut waiting {
        let early = tokio::time::timeout(Duration::from_millis(300), read_response(s)).await;
        assert!(
            early.is_err(),
            "a client over the cap was answered: {early:?}"
        );
    }
    held.clear();
    for s in &mut waiting {
        let r = tokio::time::timeout(Duration::from_secs(5), read_response(s))
            .await
            .expect("served once slots freed up");
        assert!(r.is_some_and(|r| r.ends_with("ok")));
    }
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_drains_then_drops_what_is_left() {
    let srv = start(config(10_000, 30_000)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Partial:")
        .await
        .unwrap();
    let t = Instant::now();
    srv.stop().await;
    // A half-sent head holds nothing up beyond the drain timeout (2 s).
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(closed_within(&mut s, Duration::from_secs(1))
        .await
        .is_some());
}

#[test]
fn accept_errors_back_off_and_log_rarely() {
    let mut e = AcceptErrors::new("t");
    let emfile = io::Error::from_raw_os_error(24);
    let waits: Vec<_> = (0..10).filter_map(|_| e.failed(&emfile)).collect();
    assert_eq!(waits.first(), Some(&ACCEPT_BACKOFF_FIRST));
    assert!(waits.windows(2).all(|w| w[1] >= w[0]));
    assert_eq!(waits.last(), Some(&ACCEPT_BACKOFF_MAX));
    assert_eq!(e.unlogged, 9, "only the first of ten failures was logged");
    let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
    assert_eq!(e.failed(&reset), None);
    e.recovered();
    assert_eq!(e.failed(&emfile), Some(ACCEPT_BACKOFF_FIRST));
}

/// The webhook's TLS handshake runs as the accept transform: one that stalls is cut at the
/// header timeout and does not hold up other connections.
#[tokio::test]
async fn a_stalled_accept_transform_is_cut_at_the_header_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stall = |s: TcpStream, _peer: SocketAddr| async move {
        let _held = s;
        std::future::pending::<io::Result<TcpStream>>().await
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        listener,
        config(500, 30_000),
        stall,
        ok,
        async move {
            let _ = rx.await;
        },
    ));
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let mut other = TcpStream::connect(addr).await.unwrap();
    let closed = closed_within(&mut stalled, Duration::from_secs(5))
        .await
        .expect("the stalled setup was cut");
    assert!(closed >= Duration::from_millis(400), "{closed:?}");
    // Set up in parallel, not one after the other: the second is cut at about the same time.
    let second = closed_within(&mut other, Duration::from_secs(5)).await;
    assert!(
        second.is_some_and(|d| d < Duration::from_millis(300)),
        "{second:?}"
    );
    let _ = tx.send(());
    let _ = task.await;
}

/// The service future hyper holds (and moves, per request) is the handler's future plus the
/// request guard, not twice the handler's future as an async block wrapping it was.
#[test]
fn the_service_wrapper_adds_only_the_guard() {
    fn wrapped<F: Future>(_: &F) -> usize {
        std::mem::size_of::<TrackedResponse<F>>()
    }
    let big = [0u8; 4096];
    let handler = async move {
        let kept = big;
        tokio::task::yield_now().await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::copy_from_slice(&kept))))
    };
    let inner = std::mem::size_of_val(&handler);
    assert!(inner >= 4096);
    assert!(
        wrapped(&handler) <= inner + 16,
        "{} vs {inner}",
        wrapped(&handler)
    );
}
