//! `openloop`: an open-loop HTTP/1.1 load generator for latency under a fixed offered rate.
//!
//! Request `i` is due at `start + i / rate`, whatever happened to the requests before it, and
//! its latency is measured from that *intended* time to the end of its response body. A server
//! that stalls therefore shows its stall in every request that was due meanwhile (no
//! coordinated omission), which a closed-loop tool such as wrk hides.
//!
//! Connections are HTTP/1.1 keep-alive without pipelining. `--conns` are opened before the
//! clock starts; a due request takes the idle connection that has rested longest (so the load is
//! spread over all of them); when none is idle a new one is opened, up to `--max-conns`, and
//! beyond that the request waits in a FIFO queue (its wait counts in its latency). Both are
//! counted and printed, as is the generator's own lag (send time minus intended time), so a
//! generator that cannot keep up is visible rather than mistaken for a slow server.
//!
//! One thread, one current-thread runtime: the dispatcher never sleeps on a timer (tokio's
//! timers have millisecond resolution, 15 sends per tick at 15k req/s); it yields in a loop,
//! and each yield polls the sockets, so it keeps its core busy. Pin it with `taskset` from the
//! calling script.
//!
//! Output: a human summary on stderr and one `key=value` line on stdout, for scripts.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(about = "Open-loop HTTP/1.1 load: fixed rate, latency from the intended send time")]
struct Args {
    /// Target, `http://host:port/path` (plain HTTP only).
    url: String,
    /// Offered rate, requests per second.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Measured duration, e.g. `10s`, `500ms`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load at the same rate before measuring (connections and caches warm), not recorded.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Keep-alive connections opened before the clock starts.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Upper bound on connections when all are busy; further requests queue.
    #[arg(long, default_value_t = 256)]
    max_conns: usize,
    /// A request header, `Name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Requests still unanswered this long after the last one was due count as errors.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain: Duration,
    /// Label printed in the result line.
    #[arg(long, default_value = "target")]
    label: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (s, ms, us, m)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Log-linear histogram of nanoseconds: exact below 256 ns, then 128 buckets per power of two,
/// so a reported percentile is at most 0.8% above the true value (the bucket's upper bound is
/// reported, never an underestimate).
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 7;

impl Histogram {
    fn new() -> Self {
        // Enough buckets for 2^44 ns (4.9 hours); larger values land in the last one.
        Histogram {
            counts: vec![0; (44 << SUB_BITS) + (2 << SUB_BITS)],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        let e = 63 - (v | 1).leading_zeros();
        if e <= SUB_BITS {
            v as usize
        } else {
            let shift = e - SUB_BITS;
            ((shift as usize) << SUB_BITS) + (v >> shift) as usize
        }
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < (2 << SUB_BITS) {
            return i as u64;
        }
        let shift = (i >> SUB_BITS) - 1;
        let mantissa = (i - (shift << SUB_BITS)) as u64;
        ((mantissa + 1) << shift) - 1
    }

    fn record(&mut self, v: u64) {
        let i = Self::index(v).min(self.counts.len() - 1);
        self.counts[i] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// Value at quantile `q` (0..=1): the upper bound of the bucket holding the rank, capped at
    /// the exact maximum.
    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

#[derive(Default)]
struct Counts {
    sent: u64,
    ok: u64,
    non_2xx: u64,
    errors: u64,
    opened_extra: u64,
    queued: u64,
    max_conns_used: usize,
}

struct State {
    /// Idle connections, longest-rested first.
    idle: VecDeque<SendRequest<Empty<Bytes>>>,
    /// Intended send times of due requests that found no connection.
    pending: VecDeque<Instant>,
    open: usize,
    in_flight: u64,
    measure_from: Instant,
    latency: Histogram,
    lag: Histogram,
    counts: Counts,
    first_error: Option<String>,
}

struct Target {
    addr: String,
    authority: String,
    path: String,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

fn parse_target(args: &Args) -> anyhow::Result<Target> {
    let uri: hyper::Uri = args.url.parse().context("url")?;
    if uri.scheme_str() != Some("http") {
        bail!("only http:// URLs are supported");
    }
    let authority = uri.authority().context("url has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not Name: value"))?;
        headers.push((k.trim().parse()?, v.trim().parse()?));
    }
    Ok(Target {
        addr: format!("{}:{port}", authority.host()),
        authority: authority.to_string(),
        path,
        headers,
    })
}

async fn connect(t: &Target) -> anyhow::Result<SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(&t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(async move {
        // The connection's errors surface on its requests; nothing more to report here.
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request; Ok(status) once the whole body has arrived.
async fn exchange(t: &Target, sender: &mut SendRequest<Empty<Bytes>>) -> anyhow::Result<u16> {
    sender.ready().await?;
    let mut req = hyper::Request::get(t.path.as_str())
        .header(hyper::header::HOST, t.authority.as_str())
        .body(Empty::new())?;
    for (k, v) in &t.headers {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// Runs requests on one connection, starting with the one due at `intended`, then any that
/// queued meanwhile; gives the connection back when the queue is empty.
async fn serve(
    t: Rc<Target>,
    st: Rc<RefCell<State>>,
    mut sender: SendRequest<Empty<Bytes>>,
    mut intended: Instant,
) {
    loop {
        let sent = Instant::now();
        let result = exchange(&t, &mut sender).await;
        let done = Instant::now();
        let mut s = st.borrow_mut();
        s.in_flight -= 1;
        if intended >= s.measure_from {
            let lag = sent.saturating_duration_since(intended).as_nanos() as u64;
            s.lag.record(lag);
            match &result {
                Ok(status) => {
                    s.latency
                        .record(done.saturating_duration_since(intended).as_nanos() as u64);
                    if (200..300).contains(status) {
                        s.counts.ok += 1;
                    } else {
                        s.counts.non_2xx += 1;
                    }
                }
                Err(e) => {
                    s.counts.errors += 1;
                    s.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        if result.is_err() || sender.is_closed() {
            // A broken connection is dropped; the dispatcher opens another when one is needed.
            s.open -= 1;
            return;
        }
        match s.pending.pop_front() {
            Some(next) => intended = next,
            None => {
                s.idle.push_back(sender);
                return;
            }
        }
    }
}

/// Opens a connection for a request that found none idle, then serves it.
async fn open_and_serve(t: Rc<Target>, st: Rc<RefCell<State>>, intended: Instant) {
    match connect(&t).await {
        Ok(sender) => serve(t, st, sender, intended).await,
        Err(e) => {
            let mut s = st.borrow_mut();
            s.open -= 1;
            s.in_flight -= 1;
            if intended >= s.measure_from {
                s.counts.errors += 1;
                s.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

/// Hands due requests to idle connections, or new ones up to the bound; the rest stay queued.
fn dispatch(t: &Rc<Target>, st: &Rc<RefCell<State>>, max_conns: usize) {
    let mut s = st.borrow_mut();
    while let Some(&intended) = s.pending.front() {
        if let Some(sender) = s.idle.pop_front() {
            s.pending.pop_front();
            tokio::task::spawn_local(serve(t.clone(), st.clone(), sender, intended));
        } else if s.open < max_conns {
            s.pending.pop_front();
            s.open += 1;
            s.counts.max_conns_used = s.counts.max_conns_used.max(s.open);
            if intended >= s.measure_from {
                s.counts.opened_extra += 1;
            }
            tokio::task::spawn_local(open_and_serve(t.clone(), st.clone(), intended));
        } else {
            break;
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.rate == 0 {
        bail!("--rate must be positive");
    }
    if args.conns == 0 || args.max_conns < args.conns {
        bail!("need 0 < --conns <= --max-conns");
    }
    let t = Rc::new(parse_target(&args)?);
    let mut idle = VecDeque::new();
    for _ in 0..args.conns {
        idle.push_back(connect(&t).await?);
    }
    let interval_ns = 1e9 / args.rate as f64;
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let st = Rc::new(RefCell::new(State {
        idle,
        pending: VecDeque::new(),
        open: args.conns,
        in_flight: 0,
        measure_from,
        latency: Histogram::new(),
        lag: Histogram::new(),
        counts: Counts {
            max_conns_used: args.conns,
            ..Counts::default()
        },
        first_error: None,
    }));

    let mut i: u64 = 0;
    // Requests dispatched since the last yield: a generator that fell behind (descheduled, say)
    // still lets its connections run between bursts of catch-up sends.
    let mut burst = 0u32;
    loop {
        let due = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due <= now {
            {
                let mut s = st.borrow_mut();
                s.pending.push_back(due);
                s.in_flight += 1;
                if due >= measure_from {
                    s.counts.sent += 1;
                }
            }
            dispatch(&t, &st, args.max_conns);
            // The queue is FIFO and this request is its last: anything left includes it, and
            // it waits for a busy connection to finish.
            let mut s = st.borrow_mut();
            if !s.pending.is_empty() && due >= measure_from {
                s.counts.queued += 1;
            }
            i += 1;
            burst += 1;
            if burst < 64 {
                continue;
            }
        }
        burst = 0;
        // Not due yet, or a burst of 64 sent: let the connections run (each yield also polls
        // the sockets).
        tokio::task::yield_now().await;
    }

    // Drain: requests already due get `--drain` to finish; still pending or in flight after
    // that are errors (a stalled server must not read as a fast one).
    let drain_until = Instant::now() + args.drain;
    while st.borrow().in_flight > 0 && Instant::now() < drain_until {
        dispatch(&t, &st, args.max_conns);
        tokio::task::yield_now().await;
    }
    let s = st.borrow();
    let unfinished = s.in_flight;
    let c = &s.counts;
    let errors = c.errors + unfinished;
    let secs = args.duration.as_secs_f64();
    let us = |ns: u64| ns as f64 / 1e3;
    let (l, g) = (&s.latency, &s.lag);
    eprintln!(
        "{}: offered {} req/s for {:?}: sent {}, 2xx {}, non-2xx {}, errors {} (unfinished {}), \
         achieved {:.0} req/s",
        args.label,
        args.rate,
        args.duration,
        c.sent,
        c.ok,
        c.non_2xx,
        errors,
        unfinished,
        (c.ok + c.non_2xx) as f64 / secs
    );
    eprintln!(
        "  latency from intended send (us): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        us(l.quantile(0.5)),
        us(l.quantile(0.9)),
        us(l.quantile(0.99)),
        us(l.quantile(0.999)),
        us(l.max)
    );
    eprintln!(
        "  generator lag, send minus intended (us): p50 {:.1}  p99 {:.1}  max {:.1}; \
         waited for a connection {}, extra connections opened {}, most open {}",
        us(g.quantile(0.5)),
        us(g.quantile(0.99)),
        us(g.max),
        c.queued,
        c.opened_extra,
        c.max_conns_used
    );
    // Time this generator was runnable but not running (another process had its core): a
    // generator that is not scheduled does not send, and the delay shows in every target's
    // latency, so a script must be able to tell that apart from a slow server.
    let runq = runqueue_wait_ms();
    let runq_text = runq.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}"));
    eprintln!("  generator waiting for its CPU (run queue, whole run incl. connect and drain): {runq_text} ms");
    if let Some(e) = &s.first_error {
        eprintln!("  first error: {e}");
    }
    println!(
        "label={} rate={} achieved={:.0} sent={} ok={} non2xx={} errors={} \
         p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} \
         lag_p99_us={:.1} queued={} opened={} conns_max={} runq_ms={}",
        args.label,
        args.rate,
        (c.ok + c.non_2xx) as f64 / secs,
        c.sent,
        c.ok,
        c.non_2xx,
        errors,
        us(l.quantile(0.5)),
        us(l.quantile(0.9)),
        us(l.quantile(0.99)),
        us(l.quantile(0.999)),
        us(l.max),
        us(g.quantile(0.99)),
        c.queued,
        c.opened_extra,
        c.max_conns_used,
        runq_text
    );
    Ok(())
}

/// Milliseconds this thread spent runnable but waiting for a CPU (Linux schedstat, second
/// field, nanoseconds); None where there is no such file.
fn runqueue_wait_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().nth(1)?.parse().ok()?;
    Some(ns as f64 / 1e6)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&rt, run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_tight() {
        let mut prev = None;
        for v in (0..1_000_000u64).chain([u32::MAX as u64, 1 << 40]) {
            let i = Histogram::index(v);
            assert!(Histogram::upper(i) >= v, "v {v} bucket {i}");
            if i > 0 {
                assert!(Histogram::upper(i - 1) < v, "v {v} bucket {i}");
            }
            let up = Histogram::upper(i);
            assert!(
                (up - v) as f64 <= v as f64 / 128.0 + 1.0,
                "v {v} upper {up}"
            );
            if let Some(p) = prev {
                assert!(i >= p);
            }
            prev = Some(i);
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5);
        assert!((5_000_000..=5_040_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((9_900_000..=9_980_000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 10_000_000);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("1h").is_err());
    }
}
