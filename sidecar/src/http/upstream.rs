//! Connections to the one upstream (the app on localhost): a pool of HTTP/1.1 connections,
//! each driven by the request that holds it.
//!
//! hyper's client runs each connection as a task of its own. A request goes to it through a
//! channel, the response head comes back through a oneshot, the body through a third channel,
//! and every hop is a task wake-up: under callgrind that task alone was a third of the
//! sidecar's instructions per proxied request. A sidecar has one app, on loopback, and a
//! connection carries one exchange at a time, so here the request's own task writes the request
//! and parses the answer (httparse, as hyper does). A body that arrived with the head is taken
//! whole, and the connection goes back to the pool before the response is even written to the
//! client.
//!
//! The pool is a list of idle connections behind a mutex: take the newest that is still open,
//! or connect. Each connection keeps one timer for the deadlines of its exchanges: tokio moves
//! a registered timer to a later deadline with one compare-and-swap, where a
//! `tokio::time::timeout` per request inserts and removes a wheel entry each time.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::http::proxy::{hop_by_hop_bit, names_only_hop_by_hop};
use crate::Error;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response head larger than this is refused (502), as nginx refuses one larger than its
/// `proxy_buffer_size`; hyper's limit is about 400 KiB.
const MAX_HEAD: usize = 64 * 1024;
/// Header fields in a response head; more is refused (hyper's client default).
const MAX_HEADERS: usize = 100;
/// Bytes of chunked-body trailer fields read (and dropped) before the body is refused.
const MAX_TRAILERS: usize = 16 * 1024;
/// A chunk-size line longer than this is refused.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// How much a read asks for at most; the buffer grows by this when less than a quarter is free.
const READ_CHUNK: usize = 8 * 1024;
/// A chunk this small is framed and written in one `write` with its size line.
const SMALL_CHUNK: usize = 16 * 1024;

/// Why an exchange with the upstream produced no response.
#[derive(Debug)]
pub enum Unanswered {
    /// The deadline passed first (connecting, waiting for a connection, or for the answer).
    TimedOut,
    /// The connect or the exchange failed, or the answer was not HTTP/1.x the proxy can pass on.
    Failed(BoxError),
    /// The client's request body failed while it was being forwarded: malformed (a bad chunk)
    /// or cut short. The client's fault, not the app's.
    ClientBody(BoxError),
}

/// The idle connections to the upstream.
#[derive(Debug)]
pub struct UpstreamPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    /// `host:port`, as given to the connect call.
    address: String,
    /// `Host` for a request that brought none (an HTTP/1.0 client).
    host: Option<HeaderValue>,
    /// Oldest first; the newest is reused first so a quiet pool shrinks from the front.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// One connection to the upstream, with its buffers and the timer its exchanges race against.
#[derive(Debug)]
struct Connection {
    io: TcpStream,
    /// Bytes read from the app and not yet passed on. Empty whenever the connection is idle.
    read: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    write: Vec<u8>,
    /// Reset to each exchange's deadline (see the module comment). Between exchanges it stays
    /// filed at the last one, which at worst wakes a task that has nothing left to do.
    timer: Pin<Box<Sleep>>,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    /// When the last exchange on the connection started.
    since: Instant,
}

/// What the app answered with: a body to pass on, or (`101`) the connection itself.
#[derive(Debug)]
pub enum Reply {
    Body(UpstreamBody),
    Switched(Tunnel),
}

/// The connection after a `101 Switching Protocols`: the tunnel's now, never pooled.
#[derive(Debug)]
pub struct Tunnel {
    pub io: TcpStream,
    /// What the app sent after its `101` head, before anyone read from the tunnel.
    pub early: Bytes,
}

/// How the request's body goes to the app.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outgoing {
    None,
    Length(u64),
    Chunked,
}

/// How the response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked(Chunked),
    /// Until the app closes the connection, which is then not reused.
    UntilClose,
}

/// Where a chunked body's reader stands.
#[derive(Debug, Clone, Copy)]
enum Chunked {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields after the last chunk, with how many bytes of them were read.
    Trailers(usize),
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    /// Whether the connection may carry another exchange after this one's body.
    reusable: bool,
}

impl UpstreamPool {
    pub fn new(authority: &Authority, max_idle: usize, idle_timeout: Duration) -> Self {
        let port = authority.port_u16().unwrap_or(80);
        Self {
            inner: Arc::new(PoolInner {
                address: format!("{}:{port}", authority.host()),
                host: HeaderValue::from_str(authority.as_str()).ok(),
                idle: Mutex::new(Vec::new()),
                max_idle,
                idle_timeout,
            }),
        }
    }

    /// Sends `req` (origin-form target, hop-by-hop headers already gone) on an idle connection
    /// or a new one, and waits for the response's head until `deadline`. A request with no
    /// body and an idempotent method (RFC 9110 §9.2.2) is sent again on another connection
    /// when a reused one was closed by the app before anything came back: the app's keep-alive
    /// timeout racing the request. `now` is the request's start, kept as the connection's last
    /// use. With `forwarded_for`, that address is appended to the request's `X-Forwarded-For`
    /// as the head is written (see [`RequestHead::encode`]).
    ///
    /// Not an `async fn`: one holds each argument twice (as the argument and as the body's
    /// binding), and this future is moved whole into every future awaiting it. The block
    /// below captures what it uses once.
    pub fn send<'a, B>(
        &'a self,
        req: Request<B>,
        forwarded_for: Option<IpAddr>,
        now: Instant,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<Response<Reply>, Unanswered>> + 'a
    where
        B: Body<Data = Bytes> + Unpin + 'a,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let outgoing = match body.size_hint().exact() {
            // A client's `Content-Length: 0` is kept: some apps want a length on a POST.
            Some(n) if n > 0 || parts.headers.contains_key(header::CONTENT_LENGTH) => {
                Outgoing::Length(n)
            }
            _ if body.is_end_stream() => Outgoing::None,
            _ => Outgoing::Chunked,
        };
        let head_request = parts.method == Method::HEAD;
        let retry_allowed = outgoing == Outgoing::None && parts.method.is_idempotent();
        let mut body = Some(body).filter(|_| outgoing != Outgoing::None);
        async move {
            loop {
                let (mut connection, reused) = match self.inner.checkout(now) {
                    Some(mut c) => {
                        c.timer.as_mut().reset(deadline);
                        (c, true)
                    }
                    None => (self.inner.connect(deadline).await?, false),
                };
                let head = RequestHead {
                    parts: &parts,
                    outgoing,
                    default_host: self.inner.host.as_ref(),
                    forwarded_for,
                };
                head.encode(&mut connection.write);
                let answer = {
                    let Connection {
                        io,
                        read,
                        write,
                        timer,
                    } = &mut connection;
                    let exchange = pin!(exchange(
                        io,
                        read,
                        write,
                        body.take(),
                        outgoing,
                        head_request
                    ));
                    before(timer.as_mut(), exchange).await
                };
                let (head, sent_whole) = match answer {
                    None => return Err(Unanswered::TimedOut),
                    Some(Ok(answer)) => answer,
                    Some(Err(Failure::NothingBack(_))) if reused && retry_allowed => continue,
                    Some(Err(Failure::NothingBack(e) | Failure::App(e))) => {
                        return Err(Unanswered::Failed(e))
                    }
                    Some(Err(Failure::Client(e))) => return Err(Unanswered::ClientBody(e)),
                };
                return Ok(self.reply(connection, head, sent_whole, now));
            }
        }
    }

    /// The response to hand on; the connection goes back to the pool here if its body has
    /// already arrived whole.
    fn reply(
        &self,
        mut connection: Connection,
        head: Head,
        sent_whole: bool,
        since: Instant,
    ) -> Response<Reply> {
        let mut resp = Response::new(());
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        let reply = if head.status == StatusCode::SWITCHING_PROTOCOLS {
            let early = connection.read.split().freeze();
            Reply::Switched(Tunnel {
                io: connection.io,
                early,
            })
        } else {
            // A request whose body was cut short by an early answer leaves the connection
            // mid-message.
            let reusable = head.reusable && sent_whole;
            let body = match head.framing {
                Framing::Length(n) if connection.read.len() as u64 >= n => {
                    let whole = connection.read.split_to(n as usize).freeze();
                    if reusable && connection.read.is_empty() {
                        self.inner.check_in(connection, since);
                    }
                    BodyState::Whole(whole)
                }
                framing => BodyState::Streaming(Box::new(Streaming {
                    connection,
                    framing,
                    reusable,
                    since,
                    pool: self.inner.clone(),
                })),
            };
            Reply::Body(UpstreamBody { state: body })
        };
        resp.map(|()| reply)
    }

    /// Closes connections idle for longer than the idle timeout, or closed by the app.
    pub fn evict_idle(&self, now: Instant) {
        let mut idle = self.inner.lock();
        let timeout = self.inner.idle_timeout;
        idle.retain(|c| {
            now.saturating_duration_since(c.since) <= timeout && c.connection.is_open()
        });
    }

    /// Idle connections held (for tests and metrics).
    pub fn idle(&self) -> usize {
        self.inner.lock().len()
    }
}

/// Why an exchange failed.
enum Failure {
    /// The connection ended or failed before a byte of an answer came: a reused connection
    /// may have been closed by the app just before the request went out.
    NothingBack(BoxError),
    /// The app failed, or answered with something that is not HTTP/1.x.
    App(BoxError),
    /// The client's body failed.
    Client(BoxError),
}

/// Writes the request (the head is in `write` already) and reads the response head. With a
/// body, the two run together: an app may answer before it has read the whole body (a 413),
/// and that answer is passed on. Returns the head, and whether the whole request went out.
async fn exchange<B>(
    io: &mut TcpStream,
    read: &mut BytesMut,
    write: &mut Vec<u8>,
    body: Option<B>,
    outgoing: Outgoing,
    head_request: bool,
) -> Result<(Head, bool), Failure>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if let Err(e) = write_all(io, write).await {
        return Err(Failure::NothingBack(e.into()));
    }
    let Some(body) = body else {
        return read_head(io, read, head_request).await.map(|h| (h, true));
    };
    let (mut reader, writer) = io.split();
    let chunked = outgoing == Outgoing::Chunked;
    let mut sending = pin!(send_body(writer.as_ref(), write, body, chunked));
    let mut reading = pin!(read_head(&mut reader, read, head_request));
    let mut sent: Option<Result<(), Failure>> = None;
    poll_fn(|cx| {
        if sent.is_none() {
            if let Poll::Ready(r) = sending.as_mut().poll(cx) {
                if let Err(Failure::Client(e)) = r {
                    return Poll::Ready(Err(Failure::Client(e)));
                }
                sent = Some(r);
            }
        }
        let head = ready!(reading.as_mut().poll(cx));
        Poll::Ready(match (head, sent.take()) {
            (Ok(h), sent) => Ok((h, matches!(sent, Some(Ok(()))))),
            // An answer that failed after a failed write: the write's error says more.
            (Err(_), Some(Err(e))) => Err(e),
            (Err(e), _) => Err(e),
        })
    })
    .await
}

/// Writes the request body, framed by length (as it came) or chunked.
async fn send_body<B>(
    io: &TcpStream,
    scratch: &mut Vec<u8>,
    mut body: B,
    chunked: bool,
) -> Result<(), Failure>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let app = |e: io::Error| Failure::App(e.into());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Client(e.into()))?;
        // Trailer fields are not passed on: an app behind the sidecar gets a plain body.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if !chunked {
            write_all(io, &data).await.map_err(app)?;
        } else if data.len() <= SMALL_CHUNK {
            scratch.clear();
            push_hex(scratch, data.len());
            scratch.extend_from_slice(b"\r\n");
            scratch.extend_from_slice(&data);
            scratch.extend_from_slice(b"\r\n");
            write_all(io, scratch).await.map_err(app)?;
        } else {
            scratch.clear();
            push_hex(scratch, data.len());
            scratch.extend_from_slice(b"\r\n");
            write_all(io, scratch).await.map_err(app)?;
            write_all(io, &data).await.map_err(app)?;
            write_all(io, b"\r\n").await.map_err(app)?;
        }
    }
    if chunked {
        write_all(io, b"0\r\n\r\n").await.map_err(app)?;
    }
    Ok(())
}

/// What goes into a request head besides the request's own parts.
struct RequestHead<'a> {
    parts: &'a http::request::Parts,
    /// The framing written in place of the client's own `Content-Length` or
    /// `Transfer-Encoding`.
    outgoing: Outgoing,
    /// `Host` for a request that brought none.
    default_host: Option<&'a HeaderValue>,
    /// The peer appended to `X-Forwarded-For`.
    forwarded_for: Option<IpAddr>,
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

impl RequestHead<'_> {
    /// The request line and header fields. `X-Forwarded-For` is written here rather than put
    /// in the map first: a new value and a map insert cost about 900 instructions per request.
    /// Its first value, if it is text, is kept and extended; the address replaces anything else.
    fn encode(&self, out: &mut Vec<u8>) {
        let parts = self.parts;
        out.clear();
        out.extend_from_slice(parts.method.as_str().as_bytes());
        out.push(b' ');
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut has_host = false;
        let mut previous_forwarded = None;
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            if self.forwarded_for.is_some() && name == X_FORWARDED_FOR {
                previous_forwarded = previous_forwarded.or(Some(value));
                continue;
            }
            has_host |= name == header::HOST;
            push_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if let (false, Some(host)) = (has_host, self.default_host) {
            push_field(out, b"host", host.as_bytes());
        }
        if let Some(ip) = self.forwarded_for {
            out.extend_from_slice(b"x-forwarded-for: ");
            if let Some(prev) = previous_forwarded.filter(|v| v.to_str().is_ok()) {
                out.extend_from_slice(prev.as_bytes());
                out.extend_from_slice(b", ");
            }
            push_ip(out, ip);
            out.extend_from_slice(b"\r\n");
        }
        match self.outgoing {
            Outgoing::None => {}
            Outgoing::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
            Outgoing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// An IPv4 address (the usual peer) is written by hand: `Ipv4Addr`'s `Display` goes through the
/// formatter machinery, which costs more than the rest of the head.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u64::from(octet));
            }
        }
        IpAddr::V6(a) => {
            use std::io::Write;
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{a}");
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::http::response::decimal(n, &mut [0u8; 20]));
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    let width = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..width).rev() {
        out.push(b"0123456789abcdef"[(n >> (shift * 4)) & 0xf]);
    }
}

async fn write_all(io: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match io.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads from `io` into `buf`: the number of bytes read, 0 at the end of the stream.
///
/// Through `AsyncRead`, not `try_read`: tokio takes a read that did not fill the buffer as
/// proof the socket is drained (it is, with epoll) and clears its readiness, as nginx does.
/// So the check of an idle connection before reuse ([`Connection::is_open`]) costs a system
/// call only when something arrived since, not after every exchange.
fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    pin!(io.read_buf(buf)).poll(cx)
}

/// Reads until a final response head is complete; `1xx` heads before it (other than `101`) are
/// read and dropped.
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Head, Failure> {
    let mut informational = false;
    poll_fn(|cx| loop {
        if !buf.is_empty() {
            match parse_head(buf, head_request) {
                Ok(Parsed::Final(head)) => return Poll::Ready(Ok(head)),
                Ok(Parsed::Informational) => {
                    informational = true;
                    continue;
                }
                Ok(Parsed::Partial) if buf.len() >= MAX_HEAD => {
                    return Poll::Ready(Err(Failure::App(
                        Error::Upstream("response head too large").into(),
                    )))
                }
                Ok(Parsed::Partial) => {}
                Err(e) => return Poll::Ready(Err(Failure::App(e.into()))),
            }
        }
        match ready!(poll_fill(io, buf, cx)) {
            Ok(0) if buf.is_empty() && !informational => {
                return Poll::Ready(Err(Failure::NothingBack(
                    Error::Upstream("connection closed before an answer").into(),
                )))
            }
            Ok(0) => {
                return Poll::Ready(Err(Failure::App(
                    Error::Upstream("connection closed in the response head").into(),
                )))
            }
            Ok(_) => {}
            Err(e) if buf.is_empty() && !informational => {
                return Poll::Ready(Err(Failure::NothingBack(e.into())))
            }
            Err(e) => return Poll::Ready(Err(Failure::App(e.into()))),
        }
    })
    .await
}

enum Parsed {
    Partial,
    Informational,
    Final(Head),
}

/// Where a header field's name and value lie in the head.
#[derive(Clone, Copy, Default)]
struct FieldSpan {
    name: (u32, u32),
    value: (u32, u32),
}

/// Parses a response head at the front of `buf` and takes it off. Values are slices of the
/// head's bytes, not copies.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, Error> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut spans = [FieldSpan::default(); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        // A head that came whole in one read is held to the bound a partial one is, so the
        // answer does not depend on how the app's bytes were split into reads.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(Error::Upstream("response head too large"))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Upstream("too many header fields in the response"))
        }
        Err(_) => return Err(Error::Upstream("malformed response head")),
    };
    let code = parsed.code.unwrap_or(0);
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    if (100..200).contains(&code) && code != 101 {
        buf.advance(len);
        return Ok(Parsed::Informational);
    }
    let status = StatusCode::from_u16(code).map_err(|_| Error::Upstream("bad status code"))?;
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = version == Version::HTTP_10;
    let fields = parsed.headers.len();
    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = field.name.as_bytes();
        *span = FieldSpan {
            name: (offset(name), name.len() as u32),
            value: (offset(field.value), field.value.len() as u32),
        };
        if name.eq_ignore_ascii_case(b"content-length") {
            for v in field.value.split(|&b| b == b',') {
                let n = parse_length(v).ok_or(Error::Upstream("bad Content-Length"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(Error::Upstream("conflicting Content-Length"));
                }
                content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // Only the last coding decides whether the body is chunked (RFC 9112 §6.3).
            chunked = field
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= field
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let framing = if head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::SWITCHING_PROTOCOLS
    {
        Framing::Length(0)
    } else if transfer_encoding && chunked {
        Framing::Chunked(Chunked::Size)
    } else if transfer_encoding {
        Framing::UntilClose
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    // Both framings in one message: the sender must close after it (RFC 9112 §6.3).
    let both_framings = transfer_encoding && content_length.is_some();
    let reusable = !(close || both_framings || matches!(framing, Framing::UntilClose));
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(fields);
    // Hop-by-hop fields are left out here rather than inserted and removed by the proxy; a
    // `Connection` naming other fields stays for the proxy to act on. A `101` keeps them all:
    // `Upgrade` and `Connection` go on to the client.
    let strip = status != StatusCode::SWITCHING_PROTOCOLS;
    for span in &spans[..fields] {
        let (n, nl) = (span.name.0 as usize, span.name.1 as usize);
        let (v, vl) = (span.value.0 as usize, span.value.1 as usize);
        let name = HeaderName::from_bytes(&head[n..n + nl])
            .map_err(|_| Error::Upstream("bad header name in the response"))?;
        let hop = if strip { hop_by_hop_bit(&name) } else { 0 };
        if hop > 1 || (hop == 1 && names_only_hop_by_hop(&head[v..v + vl])) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
            .map_err(|_| Error::Upstream("bad header value in the response"))?;
        headers.append(name, value);
    }
    Ok(Parsed::Final(Head {
        status,
        version,
        headers,
        framing,
        reusable,
    }))
}

/// `Content-Length`'s value: digits only, optional whitespace around them.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `work`'s output, or `None` if `timer` fires first. `work` is polled first, so an answer
/// that is there wins over a timer that has also run out (as with `tokio::time::timeout`).
/// `work` comes pinned by the caller: taken by value, it would be held twice in this future
/// (as the argument and as the pinned local), and every future around it grows by that.
async fn before<F: Future>(mut timer: Pin<&mut Sleep>, mut work: Pin<&mut F>) -> Option<F::Output> {
    poll_fn(move |cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

impl Connection {
    /// Whether the app has neither closed the idle connection nor sent anything on it. No
    /// system call unless the socket was seen readable since the last read (see
    /// [`poll_fill`]).
    fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl PoolInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The newest idle connection still open; closed ones found on the way are dropped.
    fn checkout(&self, now: Instant) -> Option<Connection> {
        loop {
            let Idle { connection, since } = self.lock().pop()?;
            if now.saturating_duration_since(since) > self.idle_timeout {
                // The older ones behind it are staler still: a connection the app may be about
                // to close is not worth the race.
                self.lock().clear();
                return None;
            }
            if connection.is_open() {
                return Some(connection);
            }
        }
    }

    fn check_in(&self, connection: Connection, since: Instant) {
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(Idle { connection, since });
        }
    }

    /// A new connection, its timer set to `deadline`, which the connect itself races.
    async fn connect(&self, deadline: tokio::time::Instant) -> Result<Connection, Unanswered> {
        let mut timer = Box::pin(tokio::time::sleep_until(deadline));
        let connecting = pin!(TcpStream::connect(self.address.as_str()));
        let io = match before(timer.as_mut(), connecting).await {
            None => return Err(Unanswered::TimedOut),
            Some(io) => io.map_err(|e| Unanswered::Failed(e.into()))?,
        };
        io.set_nodelay(true)
            .map_err(|e| Unanswered::Failed(e.into()))?;
        Ok(Connection {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            timer,
        })
    }
}

/// A response body from the app, on its way to the client.
#[derive(Debug)]
pub struct UpstreamBody {
    state: BodyState,
}

#[derive(Debug)]
enum BodyState {
    /// All of it came with the head (the connection is back in the pool already).
    Whole(Bytes),
    Streaming(Box<Streaming>),
    Done,
}

/// A body still arriving, with the connection it arrives on. Dropped before its end, the
/// connection closes, since it is mid-message.
#[derive(Debug)]
struct Streaming {
    connection: Connection,
    framing: Framing,
    reusable: bool,
    since: Instant,
    pool: Arc<PoolInner>,
}

impl UpstreamBody {
    /// A body whose bytes are all here (for tests and local answers).
    pub fn whole(bytes: Bytes) -> Self {
        Self {
            state: BodyState::Whole(bytes),
        }
    }

    /// Ends the body; the connection goes back to the pool if it can carry another exchange.
    fn finish(&mut self) {
        if let BodyState::Streaming(s) = std::mem::replace(&mut self.state, BodyState::Done) {
            let Streaming {
                connection,
                reusable,
                since,
                pool,
                ..
            } = *s;
            if reusable && connection.read.is_empty() {
                pool.check_in(connection, since);
            }
        }
    }
}

/// What the bytes read so far give of a body.
#[derive(Debug, PartialEq)]
enum Decoded {
    Data(Bytes),
    /// The body is complete.
    End,
    /// More bytes are needed.
    More,
}

/// Takes the next piece of a body delimited by `framing` off the front of `read`. Pure, so the
/// chunked decoder is tested byte by byte without a socket.
fn decode(framing: &mut Framing, read: &mut BytesMut) -> Result<Decoded, Error> {
    loop {
        match framing {
            Framing::Length(0) => return Ok(Decoded::End),
            Framing::Length(_) | Framing::UntilClose if read.is_empty() => {
                return Ok(Decoded::More)
            }
            Framing::Length(left) => {
                let n = (*left).min(read.len() as u64);
                *left -= n;
                return Ok(Decoded::Data(read.split_to(n as usize).freeze()));
            }
            Framing::UntilClose => return Ok(Decoded::Data(read.split().freeze())),
            Framing::Chunked(state) => match *state {
                Chunked::Size => match httparse::parse_chunk_size(read) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        read.advance(used);
                        *state = if size == 0 {
                            Chunked::Trailers(0)
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if read.len() < MAX_CHUNK_LINE => {
                        return Ok(Decoded::More)
                    }
                    _ => return Err(Error::Upstream("bad chunk size")),
                },
                Chunked::Data(_) if read.is_empty() => return Ok(Decoded::More),
                Chunked::Data(left) => {
                    let n = left.min(read.len() as u64);
                    *state = if n == left {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left - n)
                    };
                    return Ok(Decoded::Data(read.split_to(n as usize).freeze()));
                }
                Chunked::DataEnd if read.len() < 2 => return Ok(Decoded::More),
                Chunked::DataEnd => {
                    if &read[..2] != b"\r\n" {
                        return Err(Error::Upstream("bad chunk end"));
                    }
                    read.advance(2);
                    *state = Chunked::Size;
                }
                Chunked::Trailers(seen) => {
                    let Some(at) = read.windows(2).position(|w| w == b"\r\n") else {
                        if seen + read.len() > MAX_TRAILERS {
                            return Err(Error::Upstream("trailers too large"));
                        }
                        return Ok(Decoded::More);
                    };
                    read.advance(at + 2);
                    if at == 0 {
                        *framing = Framing::Length(0);
                    } else if seen + at + 2 > MAX_TRAILERS {
                        return Err(Error::Upstream("trailers too large"));
                    } else {
                        *state = Chunked::Trailers(seen + at + 2);
                    }
                }
            },
        }
    }
}

/// The app's answer as a connection would read it, with `pieces` as its successive reads and
/// their end as the app closing the connection. Not used by the proxy: the fuzz target
/// `upstream_answer` checks with it that how the bytes are split into reads never changes
/// what is passed on. It drives the same [`parse_head`] and [`decode`] as [`read_head`] and
/// [`Streaming`]. `Err` is a `502`, or a body cut off after its head went out.
#[doc(hidden)]
pub fn read_answer(pieces: &[&[u8]], head_request: bool) -> Result<Answer, Error> {
    let mut reads = pieces.iter().filter(|p| !p.is_empty());
    let mut buf = BytesMut::new();
    let mut fill = |buf: &mut BytesMut| reads.next().map(|p| buf.extend_from_slice(p)).is_some();
    let head = loop {
        if !buf.is_empty() {
            match parse_head(&mut buf, head_request)? {
                Parsed::Final(head) => break head,
                Parsed::Informational => continue,
                Parsed::Partial if buf.len() >= MAX_HEAD => {
                    return Err(Error::Upstream("response head too large"))
                }
                Parsed::Partial => {}
            }
        }
        if !fill(&mut buf) {
            return Err(Error::Upstream("connection closed in the response head"));
        }
    };
    let mut framing = head.framing;
    let mut body = Vec::new();
    let mut closed = false;
    loop {
        match decode(&mut framing, &mut buf)? {
            Decoded::Data(data) => body.extend_from_slice(&data),
            Decoded::End => break,
            Decoded::More if fill(&mut buf) => {}
            Decoded::More if matches!(framing, Framing::UntilClose) => {
                closed = true;
                break;
            }
            Decoded::More => return Err(Error::Upstream("the app closed the connection mid-body")),
        }
    }
    let leftover = !buf.is_empty() || fill(&mut buf);
    Ok(Answer {
        status: head.status.as_u16(),
        fields: head
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body,
        reusable: head.reusable && !closed && !leftover,
    })
}

/// What [`read_answer`] read.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// The fields passed on, in order (hop-by-hop ones already left out).
    pub fields: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Whether the connection could carry another exchange: the head allows it and nothing
    /// came after the body.
    pub reusable: bool,
}

impl Streaming {
    /// The next piece of the body: data, or `None` at its end.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BoxError>> {
        let Connection { io, read, .. } = &mut self.connection;
        loop {
            match decode(&mut self.framing, read)? {
                Decoded::Data(data) => return Poll::Ready(Ok(Some(data))),
                Decoded::End => return Poll::Ready(Ok(None)),
                Decoded::More => {}
            }
            match ready!(poll_fill(io, read, cx)) {
                Ok(0) if matches!(self.framing, Framing::UntilClose) => {
                    self.reusable = false;
                    self.framing = Framing::Length(0);
                }
                Ok(0) => {
                    return Poll::Ready(Err(Error::Upstream(
                        "the app closed the connection mid-body",
                    )
                    .into()))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.state {
            BodyState::Done => Poll::Ready(None),
            BodyState::Whole(_) => {
                let BodyState::Whole(bytes) = std::mem::replace(&mut this.state, BodyState::Done)
                else {
                    return Poll::Ready(None);
                };
                Poll::Ready((!bytes.is_empty()).then(|| Ok(Frame::data(bytes))))
            }
            BodyState::Streaming(s) => match ready!(s.poll_next(cx)) {
                Ok(Some(data)) => {
                    if matches!(s.framing, Framing::Length(0)) {
                        // Nothing is left: hyper may not poll again once it sees the end.
                        this.finish();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Ok(None) => {
                    this.finish();
                    Poll::Ready(None)
                }
                Err(e) => {
                    // Mid-message: the connection is dropped, never pooled.
                    this.state = BodyState::Done;
                    Poll::Ready(Some(Err(e)))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Done => true,
            BodyState::Whole(b) => b.is_empty(),
            BodyState::Streaming(s) => matches!(s.framing, Framing::Length(0)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Whole(b) => SizeHint::with_exact(b.len() as u64),
            BodyState::Streaming(s) => match s.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const WAIT: Duration = Duration::from_secs(10);

    /// What the test upstream does on each connection.
    #[derive(Clone, Copy)]
    enum Upstream {
        /// Answers every request with `ok`, keep-alive.
        KeepAlive,
        /// Answers one request, then closes the connection (no `Connection: close`).
        OneThenClose,
        /// Reads the request and closes without answering.
        CloseUnanswered,
        /// Promises 10 bytes, sends 2, then waits for the client to go.
        ShortBody,
        /// Reads requests and never answers.
        Silent,
        /// Answers the first request on a connection at once, later ones after [`LATE`].
        LateAfterFirst,
        /// Answers the first request on a connection; closes on the next one, unanswered.
        FirstOnly,
    }

    /// How long [`Upstream::LateAfterFirst`] takes over a connection's second request and on.
    const LATE: Duration = Duration::from_secs(3);

    /// A raw TCP upstream counting the connections it accepted.
    async fn upstream(mode: Upstream) -> (Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut answered = 0;
                    loop {
                        // One request per `\r\n\r\n` (no request bodies in these tests).
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            match mode {
                                Upstream::LateAfterFirst if answered > 0 => {
                                    tokio::time::sleep(LATE).await
                                }
                                Upstream::FirstOnly if answered > 0 => return,
                                _ => {}
                            }
                            answered += 1;
                            let answer: &[u8] = match mode {
                                Upstream::CloseUnanswered => return,
                                Upstream::Silent => continue,
                                Upstream::ShortBody => {
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok"
                                }
                                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                            };
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                            if let Upstream::OneThenClose = mode {
                                return;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().expect("authority"), accepted)
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::get("/x").body(Empty::new()).expect("request")
    }

    async fn exchange(pool: &UpstreamPool) -> Result<Bytes, Unanswered> {
        exchange_until(pool, tokio::time::Instant::now() + WAIT).await
    }

    async fn exchange_until(
        pool: &UpstreamPool,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, Unanswered> {
        let resp = pool.send(get(), None, Instant::now(), deadline).await?;
        body_of(resp).await.map_err(Unanswered::Failed)
    }

    async fn body_of(resp: Response<Reply>) -> Result<Bytes, BoxError> {
        let Reply::Body(body) = resp.into_body() else {
            panic!("a tunnel, not a body");
        };
        Ok(body.collect().await?.to_bytes())
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(WAIT, async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (authority, accepted) = upstream(Upstream::KeepAlive).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        for _ in 0..5 {
            assert_eq!(exchange(&pool).await.expect("exchange"), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_not_used_again() {
        let (authority, accepted) = upstream(Upstream::OneThenClose).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        for i in 1..=3 {
            assert_eq!(exchange(&pool).await.expect("exchange"), "ok");
            // The pool sees the app's close once the runtime has read the socket's event.
            until("the closed connection to leave the pool", || {
                pool.evict_idle(Instant::now());
                pool.idle() == 0
            })
            .await;
            assert_eq!(accepted.load(Ordering::SeqCst), i);
        }
    }

    #[tokio::test]
    async fn an_unanswered_request_is_an_error_not_a_panic() {
        let (authority, _) = upstream(Upstream::CloseUnanswered).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        assert!(exchange(&pool).await.is_err());
        assert_eq!(pool.idle(), 0);
        // Nobody listening at all: an error too. The port stays bound (not listening), so no
        // other test can take it meanwhile.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let dead: Authority = socket
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("authority");
        let pool = UpstreamPool::new(&dead, 8, Duration::from_secs(30));
        assert!(exchange(&pool).await.is_err());
    }

    #[tokio::test]
    async fn a_body_not_read_to_its_end_does_not_return_the_connection() {
        let (authority, accepted) = upstream(Upstream::ShortBody).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let resp = pool
            .send(
                get(),
                None,
                Instant::now(),
                tokio::time::Instant::now() + WAIT,
            )
            .await
            .expect("send");
        let Reply::Body(body) = resp.body() else {
            panic!("a tunnel");
        };
        assert!(!body.is_end_stream());
        drop(resp);
        assert_eq!(pool.idle(), 0);
        let _resp = pool
            .send(
                get(),
                None,
                Instant::now(),
                tokio::time::Instant::now() + WAIT,
            )
            .await
            .expect("send");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// K clients, each sending its next request as soon as its previous response is read,
    /// never have more than K exchanges in flight, so K upstream connections are enough. A
    /// pool that connects while a returned connection could have been reused grows past K,
    /// and each extra connect costs an accept in the app and a task spawn exactly when the
    /// sidecar is busiest (checked while looking for the open-loop stalls: it does not).
    #[tokio::test]
    async fn concurrent_clients_need_no_more_connections_than_requests_in_flight() {
        const CLIENTS: usize = 8;
        const ROUNDS: usize = 50;
        let (authority, accepted) = upstream(Upstream::KeepAlive).await;
        let pool = Arc::new(UpstreamPool::new(&authority, 1024, Duration::from_secs(30)));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            let pool = pool.clone();
            clients.spawn(async move {
                for _ in 0..ROUNDS {
                    exchange(&pool).await?;
                }
                Ok::<_, Unanswered>(())
            });
        }
        while let Some(done) = clients.join_next().await {
            done.expect("client task").expect("exchange");
        }
        let connects = accepted.load(Ordering::SeqCst);
        assert!(
            connects <= CLIENTS,
            "{connects} upstream connections for {CLIENTS} clients"
        );
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_closed() {
        let (authority, accepted) = upstream(Upstream::KeepAlive).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        assert_eq!(exchange(&pool).await.expect("exchange"), "ok");
        assert_eq!(pool.idle(), 1);
        pool.evict_idle(Instant::now() + Duration::from_secs(31));
        assert_eq!(pool.idle(), 0);
        assert_eq!(exchange(&pool).await.expect("exchange"), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// The deadline covers the whole exchange; the request is not retried past it, and the
    /// connection it hung on is not pooled.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_times_out_at_its_deadline() {
        let (authority, _) = upstream(Upstream::Silent).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let start = tokio::time::Instant::now();
        let r = exchange_until(&pool, start + Duration::from_secs(5)).await;
        assert!(matches!(r, Err(Unanswered::TimedOut)), "{r:?}");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
            "timed out after {waited:?}"
        );
        assert_eq!(pool.idle(), 0);
    }

    /// A pooled connection's timer is moved to each exchange's own deadline: a later exchange
    /// is neither cut off at an earlier one's deadline nor given more than its own.
    #[tokio::test(start_paused = true)]
    async fn a_reused_connection_keeps_each_exchanges_own_deadline() {
        let (authority, accepted) = upstream(Upstream::LateAfterFirst).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let t0 = tokio::time::Instant::now();
        let first = exchange_until(&pool, t0 + Duration::from_secs(4)).await;
        assert_eq!(first.expect("first exchange"), "ok");
        tokio::time::advance(Duration::from_secs(2)).await;
        // Answered at t0 + 5 s: past the first exchange's deadline, within this one's.
        let second = exchange_until(&pool, t0 + Duration::from_secs(6)).await;
        assert_eq!(second.expect("second exchange"), "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the connection was reused"
        );
        let t1 = tokio::time::Instant::now();
        let third = exchange_until(&pool, t1 + Duration::from_secs(2)).await;
        assert!(matches!(third, Err(Unanswered::TimedOut)), "{third:?}");
        assert!(t1.elapsed() < LATE, "cut off after {:?}", t1.elapsed());
    }

    /// A request body of the given frames whose length is not known in advance; with
    /// `then_wait` it stays open after them, as a slow upload does.
    struct Frames {
        frames: VecDeque<&'static [u8]>,
        then_wait: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.frames.pop_front() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b))))),
                None if self.then_wait => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    /// An app that answers the requests on its one connection with `answers`, in order, and
    /// reports each request's bytes. With `read_body` false it answers once it has the head;
    /// with `close` it closes after the last answer, else it holds the connection open.
    async fn scripted(
        answers: Vec<&'static [u8]>,
        read_body: bool,
        close: bool,
    ) -> (Authority, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            for answer in answers {
                let end = loop {
                    if let Some(end) = request_end(&buf, read_body) {
                        break end;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let _ = tx.send(buf.drain(..end).collect());
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
            if !close {
                while !matches!(s.read(&mut chunk).await, Ok(0) | Err(_)) {}
            }
        });
        (addr.to_string().parse().expect("authority"), rx)
    }

    /// Where the first request in `buf` ends, if it is all there.
    fn request_end(buf: &[u8], with_body: bool) -> Option<usize> {
        let head = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
        if !with_body {
            return Some(head);
        }
        if let Some(line) = text.lines().find(|l| l.starts_with("content-length:")) {
            let n: usize = line["content-length:".len()..].trim().parse().ok()?;
            return (buf.len() >= head + n).then_some(head + n);
        }
        if text.contains("transfer-encoding: chunked") {
            let rest = &buf[head..];
            return rest
                .windows(5)
                .position(|w| w == b"0\r\n\r\n")
                .map(|at| head + at + 5);
        }
        Some(head)
    }

    async fn send_to(
        pool: &UpstreamPool,
        req: Request<impl Body<Data = Bytes, Error = impl Into<BoxError>> + Unpin>,
    ) -> Result<Response<Reply>, Unanswered> {
        pool.send(
            req,
            None,
            Instant::now(),
            tokio::time::Instant::now() + WAIT,
        )
        .await
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[tokio::test]
    async fn a_chunked_answer_is_decoded_and_its_connection_reused() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=\"a b\"\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n";
        let (authority, _) = scripted(vec![answer, answer], false, false).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        for _ in 0..2 {
            let resp = send_to(&pool, get()).await.expect("send");
            assert_eq!(body_of(resp).await.expect("body"), "abcde");
            assert_eq!(pool.idle(), 1, "the connection went back to the pool");
        }
    }

    #[tokio::test]
    async fn an_answer_without_a_length_runs_until_the_app_closes_and_is_not_pooled() {
        let (authority, _) = scripted(vec![b"HTTP/1.1 200 OK\r\n\r\nhello"], false, true).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let resp = send_to(&pool, get()).await.expect("send");
        assert_eq!(body_of(resp).await.expect("body"), "hello");
        assert_eq!(pool.idle(), 0);
    }

    /// A HEAD answer's `Content-Length` describes the GET's body, which does not follow; read
    /// as a body, the next answer on the connection would be taken for it.
    #[tokio::test]
    async fn a_head_answer_has_no_body_and_the_next_answer_is_read_whole() {
        let (authority, _) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            ],
            false,
            false,
        )
        .await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let head = Request::head("/x")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let resp = send_to(&pool, head).await.expect("send");
        assert_eq!(resp.headers()["content-length"], "5");
        assert_eq!(body_of(resp).await.expect("body"), "");
        let resp = send_to(&pool, get()).await.expect("send");
        assert_eq!(body_of(resp).await.expect("body"), "hello");
    }

    #[tokio::test]
    async fn informational_answers_are_skipped() {
        let (authority, _) = scripted(
            vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-app: 1\r\n\r\nok"],
            false,
            false,
        )
        .await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let resp = send_to(&pool, get()).await.expect("send");
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(resp.headers()["x-app"], "1");
        assert!(resp.headers().get("link").is_none());
        assert_eq!(body_of(resp).await.expect("body"), "ok");
    }

    /// Answers whose framing is ambiguous or broken are errors (a 502 at the proxy), never
    /// passed on: each would let the app's bytes be read two ways.
    #[tokio::test]
    async fn malformed_answers_are_errors() {
        let many: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n",
                "x-a: 1\r\n".repeat(MAX_HEADERS)
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let huge: &'static [u8] = Box::leak(
            format!("HTTP/1.1 200 OK\r\nx-a: {}", "a".repeat(MAX_HEAD + 10))
                .into_bytes()
                .into_boxed_slice(),
        );
        let answers: [&'static [u8]; 6] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok",
            b"HELLO THERE\r\n\r\n",
            many,
            huge,
        ];
        for answer in answers {
            let (authority, _) = scripted(vec![answer], false, false).await;
            let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
            let r = send_to(&pool, get()).await;
            assert!(
                matches!(r, Err(Unanswered::Failed(_))),
                "{:?}: {r:?}",
                text(&answer[..answer.len().min(60)])
            );
            assert_eq!(pool.idle(), 0);
        }
        // A chunked body that breaks off mid-way is an error in the body, and not pooled.
        let (authority, _) = scripted(
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXX"],
            false,
            false,
        )
        .await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let resp = send_to(&pool, get()).await.expect("send");
        assert!(body_of(resp).await.is_err());
        assert_eq!(pool.idle(), 0);
    }

    /// A body of known length goes with `Content-Length`, one of unknown length chunked, and
    /// the client's own framing fields never reach the app.
    #[tokio::test]
    async fn request_bodies_are_framed_by_what_the_proxy_knows() {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (authority, mut seen) = scripted(vec![ok, ok, ok], true, false).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));

        let post = Request::post("/x")
            .header("transfer-encoding", "chunked")
            .body(Full::new(Bytes::from_static(b"abc")))
            .expect("request");
        assert_eq!(
            body_of(send_to(&pool, post).await.expect("send"))
                .await
                .expect("body"),
            "ok"
        );
        let got = text(&seen.recv().await.expect("request"));
        assert!(got.starts_with("POST /x HTTP/1.1\r\n"), "{got}");
        assert!(got.ends_with("content-length: 3\r\n\r\nabc"), "{got}");
        assert!(!got.contains("transfer-encoding"), "{got}");

        let streamed = Request::post("/x")
            .header("content-length", "999")
            .body(Frames {
                frames: VecDeque::from([&b"abc"[..], b"", b"de"]),
                then_wait: false,
            })
            .expect("request");
        assert_eq!(
            body_of(send_to(&pool, streamed).await.expect("send"))
                .await
                .expect("body"),
            "ok"
        );
        let got = text(&seen.recv().await.expect("request"));
        assert!(
            got.ends_with("transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            "{got}"
        );
        assert!(!got.contains("content-length"), "{got}");

        // An empty POST that said `Content-Length: 0` keeps it.
        let empty = Request::post("/x")
            .header("content-length", "0")
            .body(Empty::<Bytes>::new())
            .expect("request");
        assert_eq!(
            body_of(send_to(&pool, empty).await.expect("send"))
                .await
                .expect("body"),
            "ok"
        );
        let got = text(&seen.recv().await.expect("request"));
        assert!(got.ends_with("content-length: 0\r\n\r\n"), "{got}");
        assert_eq!(pool.idle(), 1);
    }

    /// An app may refuse an upload before reading it: its answer is passed on, and the
    /// connection, left mid-request, is not pooled.
    #[tokio::test]
    async fn an_answer_before_the_body_is_sent_is_passed_on() {
        let (authority, _) = scripted(
            vec![b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n"],
            false,
            false,
        )
        .await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let upload = Request::post("/x")
            .body(Frames {
                frames: VecDeque::from([&b"part"[..]]),
                then_wait: true,
            })
            .expect("request");
        let resp = send_to(&pool, upload).await.expect("send");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body_of(resp).await.expect("body"), "");
        assert_eq!(pool.idle(), 0);
    }

    /// A reused connection the app closed just as the request went out: a GET is sent again
    /// on a new connection, a POST is not (it may have been acted on).
    #[tokio::test]
    async fn only_an_idempotent_request_is_sent_again_after_a_reused_connection_ends() {
        let (authority, accepted) = upstream(Upstream::FirstOnly).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        assert_eq!(exchange(&pool).await.expect("exchange"), "ok");
        assert_eq!(exchange(&pool).await.expect("the GET is retried"), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        let (authority, accepted) = upstream(Upstream::FirstOnly).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        assert_eq!(exchange(&pool).await.expect("exchange"), "ok");
        let post = Request::post("/x")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let r = send_to(&pool, post).await;
        assert!(matches!(r, Err(Unanswered::Failed(_))), "{r:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// Hop-by-hop fields never reach the response map, except a `Connection` that names other
    /// fields (the proxy removes those), and all of them on a `101`.
    #[test]
    fn hop_by_hop_fields_are_left_out_of_the_response() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\ntransfer-encoding: chunked\r\nx-app: 1\r\n\r\n"[..],
        );
        let Ok(Parsed::Final(head)) = parse_head(&mut buf, false) else {
            panic!("a final head");
        };
        let names: Vec<_> = head.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-app"]);
        assert!(matches!(head.framing, Framing::Chunked(_)));

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nconnection: keep-alive, x-private\r\nx-private: 1\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let Ok(Parsed::Final(head)) = parse_head(&mut buf, false) else {
            panic!("a final head");
        };
        assert_eq!(head.headers["connection"], "keep-alive, x-private");
        assert_eq!(head.headers["x-private"], "1");

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"[..],
        );
        let Ok(Parsed::Final(head)) = parse_head(&mut buf, false) else {
            panic!("a final head");
        };
        assert_eq!(head.headers["connection"], "upgrade");
        assert_eq!(head.headers["upgrade"], "echo");
    }

    #[test]
    fn forwarded_for_matches_the_formatted_address() {
        // What the hand-written formatting replaced, kept here as the reference: the first
        // value, if text, extended by the peer; one line in place of all.
        fn reference(prev: &[&[u8]], ip: IpAddr) -> String {
            match prev.first().and_then(|v| std::str::from_utf8(v).ok()) {
                Some(p) => format!("{p}, {ip}"),
                None => ip.to_string(),
            }
        }
        let peers = [
            "0.0.0.0",
            "255.255.255.255",
            "10.1.20.3",
            "127.0.0.1",
            "::1",
            "2001:db8::7",
            "::ffff:10.0.0.1",
        ];
        let before: [&[&[u8]]; 4] = [
            &[],
            &[b"203.0.113.9"],
            &[b"198.51.100.1, 203.0.113.9", b"192.0.2.1"],
            &[b"caf\xe9"],
        ];
        for peer in peers {
            let ip: IpAddr = peer.parse().expect("addr");
            for prev in before {
                let mut req = Request::get("/x").header("x-a", "1");
                for v in prev {
                    req = req.header(
                        "x-forwarded-for",
                        HeaderValue::from_bytes(v).expect("value"),
                    );
                }
                let (parts, ()) = req.body(()).expect("request").into_parts();
                let mut out = Vec::new();
                RequestHead {
                    parts: &parts,
                    outgoing: Outgoing::None,
                    default_host: None,
                    forwarded_for: Some(ip),
                }
                .encode(&mut out);
                let lines: Vec<String> = text(&out)
                    .lines()
                    .filter_map(|l| l.strip_prefix("x-forwarded-for: ").map(str::to_string))
                    .collect();
                assert_eq!(lines, [reference(prev, ip)], "{peer} after {prev:?}");
                assert!(text(&out).contains("x-a: 1\r\n"));
            }
        }
    }

    /// Every chunked body decodes the same however its bytes are split across reads: fed one
    /// byte at a time, and in two parts at every split point.
    #[test]
    fn a_chunked_body_decodes_the_same_however_it_arrives() {
        let wire: &[u8] = b"3;ext=\"a b\"\r\nabc\r\n10\r\n0123456789abcdef\r\n1\r\nz\r\n0\r\nx-t: 1\r\ny: 2\r\n\r\nNEXT";
        let want = b"abc0123456789abcdefz";
        let run = |parts: &[&[u8]]| -> (Vec<u8>, Vec<u8>) {
            let mut framing = Framing::Chunked(Chunked::Size);
            let mut read = BytesMut::new();
            let mut body = Vec::new();
            for part in parts {
                read.extend_from_slice(part);
                while let Decoded::Data(d) = decode(&mut framing, &mut read).expect("decodes") {
                    body.extend_from_slice(&d);
                }
            }
            assert_eq!(
                decode(&mut framing, &mut read).expect("decodes"),
                Decoded::End
            );
            (body, read.to_vec())
        };
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(run(&bytes), (want.to_vec(), b"NEXT".to_vec()));
        for at in 0..=wire.len() {
            let (a, b) = wire.split_at(at);
            assert_eq!(
                run(&[a, b]),
                (want.to_vec(), b"NEXT".to_vec()),
                "split at {at}"
            );
        }
    }

    #[test]
    fn bad_chunks_and_endless_trailers_are_errors() {
        let endless = "x: 1\r\n".repeat(MAX_TRAILERS / 6 + 1);
        let cases: [Vec<u8>; 4] = [
            b"zz\r\n".to_vec(),
            b"3\r\nabcXY".to_vec(),
            [&b"3\r\nabc\r\n"[..], &[b'1'; MAX_CHUNK_LINE]].concat(),
            format!("0\r\n{endless}").into_bytes(),
        ];
        for case in cases {
            let mut framing = Framing::Chunked(Chunked::Size);
            let mut read = BytesMut::from(&case[..]);
            let outcome = loop {
                match decode(&mut framing, &mut read) {
                    Ok(Decoded::Data(_)) => continue,
                    other => break other,
                }
            };
            assert!(
                outcome.is_err(),
                "{:?}: {outcome:?}",
                text(&case[..case.len().min(40)])
            );
        }
    }

    /// A head over the bound is refused whether it arrives in one read or in many; one at the
    /// bound is read both ways. (It used to be checked only while the head was incomplete, so a
    /// large head completed by one read went through.)
    #[test]
    fn a_head_over_the_bound_is_refused_however_it_arrives() {
        let head_of = |len: usize| {
            let start = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-big: ";
            let end = "\r\n\r\n";
            let fill = "a".repeat(len - start.len() - end.len());
            format!("{start}{fill}{end}ok").into_bytes()
        };
        for (len, fits) in [(MAX_HEAD, true), (MAX_HEAD + 1, false)] {
            let wire = head_of(len);
            let whole = read_answer(&[&wire], false);
            let pieces: Vec<&[u8]> = wire.chunks(READ_CHUNK).collect();
            let split = read_answer(&pieces, false);
            assert_eq!(whole.is_ok(), fits, "{len}: {whole:?}");
            assert_eq!(
                format!("{whole:?}"),
                format!("{split:?}"),
                "{len} bytes, whole and in reads"
            );
            if let Ok(a) = whole {
                assert_eq!((a.status, &a.body[..], a.reusable), (200, &b"ok"[..], true));
            }
        }
    }

    /// The whole answer (head, 1xx before it, body in each framing) reads the same from one
    /// read as from one byte per read.
    #[test]
    fn an_answer_reads_the_same_from_one_read_or_a_byte_at_a_time() {
        let answers: [&[u8]; 5] = [
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nt: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-b\r\nX-B: 2\r\n\r\nuntil close",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.1 204 No Content\r\n\r\nextra",
        ];
        for wire in answers {
            let whole = read_answer(&[wire], false);
            let bytes: Vec<&[u8]> = wire.chunks(1).collect();
            assert_eq!(
                format!("{whole:?}"),
                format!("{:?}", read_answer(&bytes, false)),
                "{}",
                text(wire)
            );
            assert!(whole.is_ok(), "{}: {whole:?}", text(wire));
        }
        let a = read_answer(&[answers[0]], false).expect("reads");
        assert_eq!(
            (a.status, &a.body[..], a.reusable),
            (200, &b"abc"[..], true)
        );
        let until_close = read_answer(&[answers[2]], false).expect("reads");
        assert_eq!(until_close.body, b"until close");
        assert!(!until_close.reusable);
        // Bytes after a 204 are not its body, and its connection is not reused.
        let no_content = read_answer(&[answers[4]], false).expect("reads");
        assert!(no_content.body.is_empty() && !no_content.reusable);
    }
}
