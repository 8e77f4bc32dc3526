//! Raw-socket client: sends exactly the bytes given, so nothing is normalised on the way.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed response head plus body, read until the connection closes or `Content-Length`.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends `request` verbatim (it should carry `Connection: close`) and reads the whole answer.
pub async fn send(addr: SocketAddr, request: &[u8]) -> RawResponse {
    parse(&read_until_closed(addr, request).await)
}

/// Sends `request` verbatim and returns every byte read until the sidecar closes the connection.
async fn read_until_closed(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the sidecar closed the connection within 10 s")
        .expect("read");
    buf
}

/// Sends `request` and reads only the response head: for answers that keep the connection
/// open (a `101` tunnel).
pub async fn send_head(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("the sidecar answered within 10 s")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse(&buf)
}

/// Sends `request` verbatim and splits everything read until the connection closes into
/// responses (each framed by `Content-Length`, as every answer in these tests is).
pub async fn send_all(addr: SocketAddr, request: &[u8]) -> Vec<RawResponse> {
    let buf = read_until_closed(addr, request).await;
    let mut out = Vec::new();
    let mut rest = &buf[..];
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = parse(&rest[..end]);
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(rest.len() - end - 4);
        let body_end = (end + 4 + len).min(rest.len());
        out.push(parse(&rest[..body_end]));
        rest = &rest[body_end..];
    }
    out
}

pub fn parse(buf: &[u8]) -> RawResponse {
    let text = String::from_utf8_lossy(buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// `GET <target>` with the given extra header lines, `Connection: close`.
pub fn get(target: &str, headers: &[&str]) -> Vec<u8> {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: app\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("Connection: close\r\n\r\n");
    r.into_bytes()
}
