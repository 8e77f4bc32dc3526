//! The one HTTP server stack behind every keylimit listener (sidecar traffic and admin,
//! operator admin, operator webhook).
//!
//! What it guarantees, whatever the handler:
//! - **Header-read timeout**: a request head must arrive within `header_read_timeout` of its
//!   first byte (slowloris). The same bound covers the accept-time transform (a TLS handshake).
//! - **Idle timeout**: a connection with no request in flight for `idle_timeout` is closed
//!   (HTTP/1 keep-alive and HTTP/2 alike; HTTP/2 gets a GOAWAY).
//! - **Connection cap with backpressure**: a permit is taken *before* `accept`, and held by the
//!   connection's task. At the cap, new clients wait in the kernel's backlog, they are not
//!   refused; they are accepted as soon as a connection ends.
//! - **Accept errors** (EMFILE when descriptors run out) back off with a growing delay and are
//!   logged at most once per [`ACCEPT_LOG_EVERY`], instead of spinning.
//! - **Graceful drain**: when `shutdown` resolves the listener closes, open connections get a
//!   graceful shutdown, and whatever is left after `drain_timeout` is dropped.
//!
//! Why not hyper's own `header_read_timeout`: hyper starts it when it begins waiting for a head,
//! which includes the idle time between keep-alive requests, so an idle HTTP/1 connection would
//! be closed after the header timeout (10 s) instead of the idle timeout. A short server idle
//! timeout under a load balancer's keep-alive pool (typically 60 s) races the pool's reuse and
//! turns into 502s. So the clock here starts at the first byte of a head, and idle time is
//! bounded separately. hyper's timer is still set, for HTTP/2 keep-alive pings.
#![forbid(unsafe_code)]

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Accept failures are logged at most this often (the rest are counted into the next line).
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// For logs: which listener this is.
    pub name: &'static str,
    /// From the first byte of a request head (or the start of the accept transform) to the
    /// complete head.
    pub header_read_timeout: Duration,
    /// No request in flight for this long: the connection is closed.
    pub idle_timeout: Duration,
    /// Open connections at most; more clients wait in the listen backlog.
    pub max_connections: usize,
    /// HTTP/2 PING interval (None: off) and how long to wait for the answer.
    pub h2_keepalive_interval: Option<Duration>,
    pub h2_keepalive_timeout: Duration,
    /// On shutdown, how long open connections may take to finish.
    pub drain_timeout: Duration,
    pub http1_only: bool,
}

impl Default for ServerConfig {
    /// Sized for a sidecar: a 10 s head, idle longer than common load-balancer keep-alive
    /// pools (60 s) so the server is not the side that closes a connection being reused.
    fn default() -> Self {
        Self {
            name: "http",
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 4096,
            h2_keepalive_interval: Some(Duration::from_secs(20)),
            h2_keepalive_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(20),
            http1_only: false,
        }
    }
}

/// The plain accept transform: TCP with Nagle off.
pub async fn tcp(stream: TcpStream, _peer: SocketAddr) -> io::Result<TcpStream> {
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Serves `listener` until `shutdown` resolves, then drains. `accept` turns each accepted
/// stream into the stream HTTP runs on (e.g. a TLS handshake) inside the connection's task,
/// so a slow transform never holds up the accept loop.
pub async fn serve<A, AF, IO, H, HF, B, E>(
    listener: TcpListener,
    config: ServerConfig,
    accept: A,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    A: Fn(TcpStream, SocketAddr) -> AF + Clone + Send + Sync + 'static,
    AF: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> HF + Clone + Send + Sync + 'static,
    HF: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Into<BoxError> + 'static,
{
    let config = Arc::new(config);
    let builder = Arc::new(builder(&config));
    let permits = Arc::new(Semaphore::new(
        config.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut errors = AcceptErrors::new(config.name);
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        tracing::error!(server = config.name, error = %e, "connection task panicked");
                    }
                }
                // A connection closed: a descriptor is free, so retry a failing accept now.
                retry_at = None;
            }
            p = permits.clone().acquire_owned(), if permit.is_none() => {
                // The semaphore is never closed.
                permit = p.ok();
            }
            _ = sleep_until_opt(retry_at), if retry_at.is_some() => retry_at = None,
            accepted = listener.accept(), if permit.is_some() && retry_at.is_none() => {
                match accepted {
                    Ok((stream, peer)) => {
                        errors.recovered();
                        let Some(permit) = permit.take() else { continue };
                        conns.spawn(connection(
                            stream,
                            peer,
                            accept.clone(),
                            handler.clone(),
                            builder.clone(),
                            config.clone(),
                            drain_rx.clone(),
                            permit,
                        ));
                    }
                    Err(e) => {
                        if let Some(wait) = errors.failed(&e) {
                            retry_at = Some(tokio::time::Instant::now() + wait);
                        }
                    }
                }
            }
        }
    }
    drop(listener);
    let _ = drain_tx.send(true);
    let drained = tokio::time::timeout(config.drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(server = config.name, remaining = conns.len(), drain = ?config.drain_timeout,
            "drain timeout; closing remaining connections");
        conns.shutdown().await;
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // See the crate docs: the head timeout is enforced per connection here, from the
        // head's first byte, so that idle keep-alive time is bounded by idle_timeout instead.
        .header_read_timeout(None);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(config.h2_keepalive_interval)
        .keep_alive_timeout(config.h2_keepalive_timeout);
    if config.http1_only {
        b = b.http1_only();
    }
    b
}

/// Counts accept failures, decides the back-off and rate-limits the log.
struct AcceptErrors {
    name: &'static str,
    delay: Duration,
    unlogged: u64,
    total: u64,
    last_log: Option<Instant>,
}

impl AcceptErrors {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            delay: ACCEPT_BACKOFF_FIRST,
            unlogged: 0,
            total: 0,
            last_log: None,
        }
    }

    /// How long to wait before the next accept; None: retry at once (the error concerned one
    /// connection only, e.g. a client that reset before we accepted it).
    fn failed(&mut self, e: &io::Error) -> Option<Duration> {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
        ) {
            tracing::debug!(server = self.name, error = %e, "accept: connection gone");
            return None;
        }
        self.total += 1;
        self.unlogged += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(server = self.name, error = %e, failures = self.unlogged,
                retry_in = ?self.delay, "accept failing (out of file descriptors?); backing off");
            self.unlogged = 0;
            self.last_log = Some(Instant::now());
        }
        let wait = self.delay;
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF_MAX);
        Some(wait)
    }

    fn recovered(&mut self) {
        if self.total > 0 {
            tracing::info!(
                server = self.name,
                failures = self.total,
                "accept recovered"
            );
            *self = Self::new(self.name);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection<A, AF, IO, H, HF, B, E>(
    stream: TcpStream,
    peer: SocketAddr,
    accept: A,
    handler: H,
    builder: Arc<auto::Builder<TokioExecutor>>,
    config: Arc<ServerConfig>,
    mut drain: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) where
    A: Fn(TcpStream, SocketAddr) -> AF,
    AF: Future<Output = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(SocketAddr, Request<Incoming>) -> HF + Clone + Send + Sync + 'static,
    HF: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Into<BoxError> + 'static,
{
    let io = match tokio::time::timeout(config.header_read_timeout, accept(stream, peer)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            tracing::debug!(server = config.name, %peer, error = %e, "connection setup failed");
            return;
        }
        Err(_) => {
            tracing::debug!(server = config.name, %peer, "connection setup timed out");
            return;
        }
    };
    let activity = Arc::new(Activity::new(config.http1_only));
    let io = TokioIo::new(Tracked::new(io, activity.clone()));
    let act = activity.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let guard = act.enter(req.version());
        TrackedResponse {
            inner: handler(peer, req),
            guard: Some(guard),
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let drain_signal = async move {
        // An Err means the server is gone: drain as well.
        let _ = drain.wait_for(|d| *d).await;
    };
    tokio::pin!(drain_signal);
    let mut timer = Box::pin(tokio::time::sleep(config.idle_timeout));
    let mut closing = false;
    let mut close_by: Option<Instant> = None;
    let end = poll_fn(|cx: &mut Context<'_>| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(End::Done(r));
        }
        if !closing && drain_signal.as_mut().poll(cx).is_ready() {
            closing = true;
            conn.as_mut().graceful_shutdown();
            continue;
        }
        let next = match close_by {
            Some(at) => Some((at, Expiry::Close)),
            None if closing => None,
            None => activity.deadline(&config),
        };
        let Some((at, why)) = next else {
            return Poll::Pending;
        };
        let at = tokio::time::Instant::from_std(at);
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        match why {
            Expiry::Idle => {
                // Graceful: HTTP/1 closes at once (nothing in flight), HTTP/2 sends GOAWAY.
                closing = true;
                close_by = Some(Instant::now() + config.header_read_timeout);
                conn.as_mut().graceful_shutdown();
            }
            Expiry::Header | Expiry::Close => return Poll::Ready(End::Expired(why)),
        }
    })
    .await;
    match end {
        End::Done(Ok(())) => {}
        End::Done(Err(e)) => {
            tracing::debug!(server = config.name, %peer, error = %e, "connection ended with an error")
        }
        End::Expired(why) => {
            tracing::debug!(server = config.name, %peer, ?why, "connection closed by timeout")
        }
    }
}

enum End {
    Done(Result<(), BoxError>),
    Expired(Expiry),
}

#[derive(Debug, Clone, Copy)]
enum Expiry {
    /// A request head started arriving and did not complete in time: closed hard.
    Header,
    /// Nothing in flight for the idle timeout: closed gracefully.
    Idle,
    /// A graceful close that did not complete: closed hard.
    Close,
}

const NEVER: u64 = u64::MAX;
/// A time not read yet: the clock is read when a deadline needs it ([`Activity::deadline`],
/// after the connection's poll). Most heads arrive whole in one read and most keep-alive
/// requests follow one another, so most of these are overwritten unread; each read saved is
/// 15-25 ns on a VM's kvm-clock, twice per request.
const UNREAD: u64 = u64::MAX - 1;
const PROTO_UNKNOWN: u8 = 0;
const PROTO_H1: u8 = 1;
const PROTO_H2: u8 = 2;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection is doing, as the timeouts need it. Times are milliseconds since `start`.
/// Written by the stream wrapper and the request guards, read after every poll of the
/// connection (all on the connection's task; atomics because the guards must be `Send`).
struct Activity {
    start: Instant,
    in_flight: AtomicU32,
    /// When the last request finished (or the connection opened); UNREAD: since the last poll.
    idle_since: AtomicU64,
    /// First byte read while no request was in flight: a head is arriving. NEVER: none;
    /// UNREAD: one is, since the last poll.
    reading_since: AtomicU64,
    proto: AtomicU8,
}

impl Activity {
    fn new(http1_only: bool) -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
            reading_since: AtomicU64::new(NEVER),
            proto: AtomicU8::new(if http1_only { PROTO_H1 } else { PROTO_UNKNOWN }),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(UNREAD - 1)
    }

    fn on_read(&self) {
        if self.in_flight.load(Relaxed) == 0 && self.reading_since.load(Relaxed) == NEVER {
            self.reading_since.store(UNREAD, Relaxed);
        }
    }

    /// The time in `at`, read from the clock now if it is [`UNREAD`].
    fn resolve(&self, at: &AtomicU64) -> u64 {
        match at.load(Relaxed) {
            UNREAD => {
                let now = self.now_ms();
                match at.compare_exchange(UNREAD, now, Relaxed, Relaxed) {
                    Ok(_) => now,
                    Err(other) => other,
                }
            }
            t => t,
        }
    }

    fn enter(self: &Arc<Self>, version: Version) -> InFlight {
        if version == Version::HTTP_2 {
            self.proto.store(PROTO_H2, Relaxed);
        }
        self.in_flight.fetch_add(1, Relaxed);
        self.reading_since.store(NEVER, Relaxed);
        InFlight(self.clone())
    }

    /// The next timeout, or None while a request is in flight (the handler bounds those).
    fn deadline(&self, config: &ServerConfig) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        let at = |ms: u64, plus: Duration| self.start + Duration::from_millis(ms) + plus;
        // On HTTP/2 bytes arrive while idle (PINGs, WINDOW_UPDATEs) and say nothing about a
        // head; its idle time is what is bounded.
        if self.reading_since.load(Relaxed) != NEVER && self.proto.load(Relaxed) != PROTO_H2 {
            let reading = self.resolve(&self.reading_since);
            return Some((at(reading, config.header_read_timeout), Expiry::Header));
        }
        Some((
            at(self.resolve(&self.idle_since), config.idle_timeout),
            Expiry::Idle,
        ))
    }
}

/// Held by a request from the service call until its response body is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        if a.in_flight.fetch_sub(1, Relaxed) == 1 {
            a.idle_since.store(UNREAD, Relaxed);
            a.reading_since.store(NEVER, Relaxed);
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future, whose response gets the request's [`InFlight`] guard in its
    /// body. A struct, not an async block: an async block holds the handler's future twice
    /// (captured, then moved into its `.await`), and hyper moves the service future on every
    /// request. The sidecar's handler future is kilobytes, so that was a memcpy of twice that
    /// per request (`docs/benchmarks.md`, "Futures moved per request").
    struct TrackedResponse<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B, E> Future for TrackedResponse<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = std::task::ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(resp.map(|inner| TrackedBody {
            inner,
            _guard: guard,
        })))
    }
}

pin_project_lite::pin_project! {
    /// The handler's response body, carrying the request's [`InFlight`] guard (`None` only
    /// if the future was polled again after it completed, which hyper never does).
    struct TrackedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's stream, reporting reads to [`Activity`] and telling HTTP/2 (by its
/// preface) from HTTP/1 the way hyper's auto builder does.
struct Tracked<T> {
    io: T,
    activity: Arc<Activity>,
    preface_matched: usize,
}

impl<T> Tracked<T> {
    fn new(io: T, activity: Arc<Activity>) -> Self {
        Self {
            io,
            activity,
            preface_matched: 0,
        }
    }

    fn saw(&mut self, bytes: &[u8]) {
        if self.activity.proto.load(Relaxed) == PROTO_UNKNOWN {
            for b in bytes {
                if H2_PREFACE.get(self.preface_matched) == Some(b) {
                    self.preface_matched += 1;
                    if self.preface_matched == H2_PREFACE.len() {
                        self.activity.proto.store(PROTO_H2, Relaxed);
                        break;
                    }
                } else {
                    self.activity.proto.store(PROTO_H1, Relaxed);
                    break;
                }
            }
        }
        self.activity.on_read();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if let Some(new) = buf.filled().get(before..).filter(|b| !b.is_empty()) {
                this.saw(new);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
