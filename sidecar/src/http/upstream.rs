//! Connections to the one upstream (the app on localhost): a small pool of HTTP/1.1
//! connections, each driven by its own hyper connection task.
//!
//! hyper-util's general client keys its pool by (scheme, authority), hashed with SipHash on
//! every checkout and check-in, and races a checkout against a new connect. A sidecar has
//! exactly one upstream, so its pool is a list of idle senders behind a mutex: take the newest
//! ready one, or connect.
//!
//! Each connection keeps one timer for the deadlines of its exchanges. Tokio moves a registered
//! timer to a later deadline with one compare-and-swap, and re-files it in its wheel only when
//! the old deadline comes round. A `tokio::time::timeout` per request instead inserts and
//! removes a wheel entry each time, and moves the request's future into its own. Under
//! callgrind the difference is 132 instructions per proxied request (0.3 %): most of the
//! timer cost is the driver's work at each park, which the server's own timers need anyway.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an exchange with the upstream produced no response.
#[derive(Debug)]
pub enum Unanswered {
    /// The deadline passed first (connecting, waiting for a connection, or for the answer).
    TimedOut,
    /// The connect or the exchange failed.
    Failed(BoxError),
    /// The client's request body failed while it was being forwarded: malformed (a bad chunk)
    /// or cut short. The client's fault, not the app's.
    ClientBody(BoxError),
}

/// The idle connections to the upstream.
#[derive(Debug)]
pub struct UpstreamPool<B> {
    inner: Arc<PoolInner<B>>,
}

#[derive(Debug)]
struct PoolInner<B> {
    /// `host:port`, as given to the connect call.
    address: String,
    /// `Host` for a request that brought none (an HTTP/1.0 client).
    host: Option<HeaderValue>,
    /// Oldest first; the newest is reused first so a quiet pool shrinks from the front.
    idle: Mutex<Vec<Idle<B>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// One connection to the upstream, with the timer its exchanges race against.
#[derive(Debug)]
struct Connection<B> {
    sender: SendRequest<B>,
    /// Reset to each exchange's deadline (see the module comment). Between exchanges it stays
    /// filed at the last one, which at worst wakes a task that has nothing left to do.
    timer: Pin<Box<Sleep>>,
}

#[derive(Debug)]
struct Idle<B> {
    connection: Connection<B>,
    /// When the last exchange on the connection started.
    since: Instant,
}

/// A pooled connection lent to one exchange. [`Lent::give_back`] returns it once the response
/// body has been read to its end; dropped otherwise, which closes the connection.
#[derive(Debug)]
pub struct Lent<B> {
    connection: Connection<B>,
    since: Instant,
    pool: Arc<PoolInner<B>>,
}

impl<B> Lent<B> {
    pub fn give_back(self) {
        // A connection the app closed (or that is still busy failing) is not worth keeping;
        // one that is merely not ready yet becomes ready once hyper sees the exchange end.
        if self.connection.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.lock();
        if idle.len() < self.pool.max_idle {
            idle.push(Idle {
                connection: self.connection,
                since: self.since,
            });
        }
    }
}

impl<B> UpstreamPool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
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
    /// or a new one, and waits for the response's head until `deadline`. A request that an
    /// idle connection could not even start (the app closed it meanwhile) is retried on
    /// another; a failure after the request went out is returned. `now` is the request's
    /// start, used as the connection's last use.
    pub async fn send(
        &self,
        mut req: Request<B>,
        now: Instant,
        deadline: tokio::time::Instant,
    ) -> Result<(Response<Incoming>, Lent<B>), Unanswered> {
        if let Some(host) = &self.inner.host {
            req.headers_mut()
                .entry(header::HOST)
                .or_insert_with(|| host.clone());
        }
        loop {
            let (mut connection, reused) = match self.inner.checkout(now) {
                Some(mut c) => {
                    c.timer.as_mut().reset(deadline);
                    (c, true)
                }
                None => (self.inner.connect(deadline).await?, false),
            };
            let Connection { sender, timer } = &mut connection;
            match before(timer.as_mut(), sender.ready()).await {
                None => return Err(Unanswered::TimedOut),
                Some(Err(_)) if reused => continue,
                Some(Err(e)) => return Err(Unanswered::Failed(e.into())),
                Some(Ok(())) => {}
            }
            match before(timer.as_mut(), sender.try_send_request(req)).await {
                None => return Err(Unanswered::TimedOut),
                Some(Ok(resp)) => {
                    let lent = Lent {
                        connection,
                        since: now,
                        pool: self.inner.clone(),
                    };
                    return Ok((resp, lent));
                }
                Some(Err(mut e)) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => {
                        let e = e.into_error();
                        // hyper reports an error of the body it was sending as a user error
                        // whose cause is that body's error.
                        let client_body = e.is_user()
                            && std::error::Error::source(&e)
                                .is_some_and(|c| c.is::<hyper::Error>());
                        return Err(if client_body {
                            Unanswered::ClientBody(e.into())
                        } else {
                            Unanswered::Failed(e.into())
                        });
                    }
                },
            }
        }
    }

    /// Closes connections idle for longer than the idle timeout.
    pub fn evict_idle(&self, now: Instant) {
        let mut idle = self.inner.lock();
        let timeout = self.inner.idle_timeout;
        idle.retain(|c| {
            now.saturating_duration_since(c.since) <= timeout && !c.connection.sender.is_closed()
        });
    }

    /// Idle connections held (for tests and metrics).
    pub fn idle(&self) -> usize {
        self.inner.lock().len()
    }
}

/// `work`'s output, or `None` if `timer` fires first. `work` is polled first, so an answer
/// that is there wins over a timer that has also run out (as with `tokio::time::timeout`).
async fn before<F: Future>(mut timer: Pin<&mut Sleep>, work: F) -> Option<F::Output> {
    let mut work = pin!(work);
    poll_fn(move |cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

impl<B> PoolInner<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle<B>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<B> PoolInner<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The newest idle connection that is ready; closed ones found on the way are dropped,
    /// ones not ready yet (their last exchange still finishing) stay.
    fn checkout(&self, now: Instant) -> Option<Connection<B>> {
        let mut idle = self.lock();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.connection.sender.is_ready() {
                if now.saturating_duration_since(c.since) > self.idle_timeout {
                    // Older ones sit in front of it: a connection the app may be about to
                    // close is not worth the race.
                    idle.drain(..=i);
                    return None;
                }
                return Some(idle.remove(i).connection);
            }
            if c.connection.sender.is_closed() {
                idle.remove(i);
            }
        }
        None
    }

    /// A new connection, its timer set to `deadline`, which the connect itself races.
    async fn connect(&self, deadline: tokio::time::Instant) -> Result<Connection<B>, Unanswered> {
        let mut timer = Box::pin(tokio::time::sleep_until(deadline));
        let sender = match before(timer.as_mut(), self.handshake()).await {
            None => return Err(Unanswered::TimedOut),
            Some(sender) => sender.map_err(Unanswered::Failed)?,
        };
        Ok(Connection { sender, timer })
    }

    async fn handshake(&self) -> Result<SendRequest<B>, BoxError> {
        let stream = TcpStream::connect(self.address.as_str()).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            // Upgrades: a 101 hands the connection over to the tunnel instead of ending here.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
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
                            if let Upstream::LateAfterFirst = mode {
                                if answered > 0 {
                                    tokio::time::sleep(LATE).await;
                                }
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

    async fn exchange(pool: &UpstreamPool<Empty<Bytes>>) -> Result<Bytes, Unanswered> {
        exchange_until(pool, tokio::time::Instant::now() + WAIT).await
    }

    async fn exchange_until(
        pool: &UpstreamPool<Empty<Bytes>>,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, Unanswered> {
        let (resp, lent) = pool.send(get(), Instant::now(), deadline).await?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Unanswered::Failed(e.into()))?
            .to_bytes();
        lent.give_back();
        Ok(body)
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
            // hyper notices the close on its own; the pool then drops the connection.
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
        // Nobody listening at all: an error too.
        let dead: Authority = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr()
                .expect("addr")
                .to_string()
                .parse()
                .expect("authority")
        };
        let pool = UpstreamPool::new(&dead, 8, Duration::from_secs(30));
        assert!(exchange(&pool).await.is_err());
    }

    #[tokio::test]
    async fn a_body_not_read_to_its_end_does_not_return_the_connection() {
        let (authority, accepted) = upstream(Upstream::ShortBody).await;
        let pool = UpstreamPool::new(&authority, 8, Duration::from_secs(30));
        let (resp, lent) = pool
            .send(get(), Instant::now(), tokio::time::Instant::now() + WAIT)
            .await
            .expect("send");
        assert!(!resp.body().is_end_stream());
        drop(resp);
        drop(lent);
        assert_eq!(pool.idle(), 0);
        let (_resp, _lent) = pool
            .send(get(), Instant::now(), tokio::time::Instant::now() + WAIT)
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
}
