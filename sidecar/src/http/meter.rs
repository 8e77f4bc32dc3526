//! Cost from the response: reads what a response reports its request cost (a header, a JSON
//! field of the body, or the last event of a `text/event-stream` that carries the field) as
//! the body passes through, and settles it against the key's token limits when the response
//! ends. Bodies are never buffered: the scanners keep a few hundred bytes of state whatever
//! the body's size.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, CONTENT_TYPE};

use crate::config::ConfigStore;
use crate::limiter::local::Limiter;
use crate::limiter::redis::RedisBackends;
use keylimit_dataplane::Store;

/// How deep a JSON body may nest before the scanner stops looking (and the request is
/// charged its estimate): bounds the scanner's memory against a hostile upstream.
const MAX_DEPTH: usize = 64;
/// Digits kept for the cost; more is not a token count.
const MAX_DIGITS: usize = 19;
/// The most a reported cost is taken to be: a broken or hostile upstream must not put a key
/// into debt for centuries.
pub const MAX_COST: u64 = 1 << 40;
/// Used when the policy gives no cap for a request's estimate header.
pub const DEFAULT_ESTIMATE_MAX: u64 = 1_000_000;

/// The policy's `usage`, with header names parsed once per config.
#[derive(Debug, Clone)]
pub struct UsageRule {
    pub header: Option<HeaderName>,
    pub json_path: Arc<[Box<[u8]>]>,
    pub estimate_header: Option<HeaderName>,
    pub estimate_fixed: u64,
    pub estimate_max: u64,
}

impl UsageRule {
    /// Tokens to reserve for a request with these headers.
    pub fn estimate(&self, h: &HeaderMap) -> u64 {
        self.estimate_header
            .as_ref()
            .and_then(|n| h.get(n))
            .and_then(|v| parse_count(v.as_bytes()))
            .map_or(self.estimate_fixed, |n| n.min(self.estimate_max))
    }
}

fn parse_count(b: &[u8]) -> Option<u64> {
    let b = b.trim_ascii();
    if b.is_empty() || b.len() > MAX_DIGITS || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b)
        .ok()?
        .parse::<u64>()
        .ok()
        .map(|n| n.min(MAX_COST))
}

/// What a response settles: the key, its route and its reservation. It names them, and
/// looks their limits up in the config current when the response ends, rather than holding
/// the snapshot the request was admitted under: a long stream must not keep a replaced
/// million-key index alive. Limit ids are stable across reloads, so an unchanged limit is
/// charged as if nothing had happened, and a changed one starts fresh either way.
pub struct Meter {
    pub limiter: Limiter,
    /// For policies whose counters live in Redis.
    pub redis: Arc<RedisBackends>,
    pub config: Arc<ConfigStore>,
    pub rule: UsageRule,
    pub key_id: u64,
    /// The route's name, if the request matched one.
    pub route: Option<Arc<str>>,
    pub reserved: u64,
}

impl Meter {
    /// Charges `actual` (in place of the reservation). Consumes the meter: once only.
    pub fn settle(self, actual: u64) {
        if actual == self.reserved {
            return;
        }
        let Some(snap) = self.config.current() else {
            return;
        };
        let Some(key) = snap.index.by_id(self.key_id) else {
            return;
        };
        let route = self
            .route
            .as_ref()
            .and_then(|name| snap.routes.iter().find(|r| r.name == *name))
            .and_then(|r| r.limits.as_ref());
        let sets = [Some(key.limits), route];
        let policy = snap.policy_limits.as_ref();
        match &snap.policy.store {
            Store::Local => self
                .limiter
                .settle(self.key_id, sets, policy, self.reserved, actual),
            Store::Redis(cfg) => {
                self.redis
                    .get(cfg)
                    .settle(self.key_id, sets, policy, self.reserved, actual)
            }
        }
    }

    /// Settles from the response's header, or returns the [`BodyMeter`] that finds the cost
    /// as the body passes. A response that reports nothing is charged its reservation.
    pub fn attach(self, headers: &HeaderMap) -> Option<BodyMeter> {
        let reported = self
            .rule
            .header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| parse_count(v.as_bytes()));
        if let Some(n) = reported {
            self.settle(n);
            return None;
        }
        let path = &self.rule.json_path;
        let ct = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        // With no scan, nothing will report a cost: the reservation stands as the charge.
        let scan = if path.is_empty() {
            None
        } else if ct.starts_with("text/event-stream") {
            Some(Scan::Events(EventScanner::new(path.clone())))
        } else if ct.contains("json") {
            Some(Scan::Json(JsonScanner::new(path.clone())))
        } else {
            None
        }?;
        Some(BodyMeter {
            scan,
            meter: Some(self),
        })
    }
}

enum Scan {
    Json(JsonScanner),
    Events(EventScanner),
}

impl Scan {
    fn feed(&mut self, b: &[u8]) {
        match self {
            Scan::Json(s) => s.feed(b),
            Scan::Events(s) => s.feed(b),
        }
    }

    fn found(&mut self) -> Option<u64> {
        match self {
            Scan::Json(s) => s.found,
            Scan::Events(s) => s.finish(),
        }
    }
}

/// Reads a response body's cost as its frames pass, and settles it when the body ends, is
/// cut, or is dropped (the client went away): with the cost it saw, or the reservation if it
/// saw none. The proxy's response body drives it.
pub struct BodyMeter {
    scan: Scan,
    meter: Option<Meter>,
}

impl BodyMeter {
    pub fn feed(&mut self, data: &[u8]) {
        self.scan.feed(data);
    }

    /// Settles once; later calls do nothing.
    pub fn finish(&mut self) {
        if let Some(m) = self.meter.take() {
            let actual = self.scan.found().unwrap_or(m.reserved);
            m.settle(actual);
        }
    }
}

impl Drop for BodyMeter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a value (after `:`, `[`, `,` in an array, or at the start).
    Value,
    /// Expecting a key or `}`.
    Key,
    /// After a key, expecting `:`.
    Colon,
    /// After a value, expecting `,` or a closing bracket.
    After,
    /// Inside a string; `key` when it is an object key.
    Str { key: bool, escape: bool },
    /// Inside a number, `true`, `false` or `null`.
    Scalar,
    /// Malformed or too deep: nothing more is read.
    Stopped,
}

/// Finds the integer at a dotted path (`usage.total_tokens`) in a JSON text fed in chunks.
/// It tokenises only as far as it needs to: it tracks nesting, which object keys lie on the
/// path, and the digits of a number at the path's end. The last occurrence wins. Its memory
/// is bounded by [`MAX_DEPTH`] and the path's length.
#[derive(Debug)]
pub struct JsonScanner {
    path: Arc<[Box<[u8]>]>,
    stack: Vec<(Container, bool)>,
    state: State,
    /// The key being read, while it can still match the next segment.
    key: Vec<u8>,
    key_fits: bool,
    /// The value about to be read is the path's target.
    at_target: bool,
    /// The next value is on the path (its object may hold the next segment).
    value_on_path: bool,
    digits: Vec<u8>,
    pub found: Option<u64>,
}

impl JsonScanner {
    pub fn new(path: Arc<[Box<[u8]>]>) -> Self {
        JsonScanner {
            path,
            stack: Vec::new(),
            state: State::Value,
            key: Vec::new(),
            key_fits: false,
            at_target: false,
            value_on_path: true,
            digits: Vec::new(),
            found: None,
        }
    }

    /// Depth along the path of the innermost object, if it lies on the path.
    fn on_path_depth(&self) -> Option<usize> {
        // Every open container must be an object on the path for the next key to match.
        if self
            .stack
            .iter()
            .all(|(c, on)| *c == Container::Object && *on)
        {
            Some(self.stack.len())
        } else {
            None
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.step(b);
            if self.state == State::Stopped {
                return;
            }
        }
    }

    fn open(&mut self, c: Container) {
        if self.stack.len() >= MAX_DEPTH {
            self.state = State::Stopped;
            return;
        }
        let on = self.value_on_path && c == Container::Object;
        self.stack.push((c, on));
        self.value_on_path = false;
        self.at_target = false;
        self.state = match c {
            Container::Object => State::Key,
            Container::Array => State::Value,
        };
    }

    fn close(&mut self, c: Container) {
        match self.stack.pop() {
            Some((open, _)) if open == c => self.state = State::After,
            _ => self.state = State::Stopped,
        }
    }

    fn end_scalar(&mut self) {
        if self.at_target && !self.digits.is_empty() {
            self.found = parse_count(&self.digits).or(self.found);
        }
        self.digits.clear();
        self.at_target = false;
        self.value_on_path = false;
        self.state = State::After;
    }

    fn step(&mut self, b: u8) {
        match self.state {
            State::Stopped => {}
            State::Str { key, escape } => {
                if escape {
                    self.state = State::Str { key, escape: false };
                    if key {
                        // A key with an escape never equals a plain path segment.
                        self.key_fits = false;
                    }
                } else if b == b'\\' {
                    self.state = State::Str { key, escape: true };
                } else if b == b'"' {
                    if key {
                        self.end_key();
                    } else {
                        self.at_target = false;
                        self.value_on_path = false;
                        self.state = State::After;
                    }
                } else if key && self.key_fits {
                    self.key.push(b);
                    if self.key.len() > 256 {
                        self.key_fits = false;
                    }
                }
            }
            State::Scalar => {
                if b.is_ascii_digit() {
                    if self.at_target && self.digits.len() <= MAX_DIGITS {
                        self.digits.push(b);
                    }
                } else if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+') {
                    // A fraction, exponent or sign: not a token count.
                    if self.at_target {
                        self.digits.clear();
                        self.at_target = false;
                    }
                } else {
                    self.end_scalar();
                    self.step(b);
                }
            }
            _ if b.is_ascii_whitespace() => {}
            State::Value => match b {
                b'{' => self.open(Container::Object),
                b'[' => self.open(Container::Array),
                b'"' => {
                    self.state = State::Str {
                        key: false,
                        escape: false,
                    }
                }
                b']' => self.close(Container::Array),
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                    self.state = State::Scalar;
                    if b == b'-' {
                        self.at_target = false;
                    } else {
                        self.step(b);
                    }
                }
                _ => self.state = State::Stopped,
            },
            State::Key => match b {
                b'"' => {
                    self.key.clear();
                    self.key_fits = self.on_path_depth().is_some_and(|d| d <= self.path.len());
                    self.state = State::Str {
                        key: true,
                        escape: false,
                    };
                }
                b'}' => self.close(Container::Object),
                _ => self.state = State::Stopped,
            },
            State::Colon => match b {
                b':' => self.state = State::Value,
                _ => self.state = State::Stopped,
            },
            State::After => match (b, self.stack.last()) {
                (b',', Some((Container::Object, _))) => self.state = State::Key,
                (b',', Some((Container::Array, _))) => self.state = State::Value,
                (b'}', _) => self.close(Container::Object),
                (b']', _) => self.close(Container::Array),
                _ => self.state = State::Stopped,
            },
        }
    }

    fn end_key(&mut self) {
        self.state = State::Colon;
        self.value_on_path = false;
        self.at_target = false;
        if !self.key_fits {
            return;
        }
        let Some(depth) = self.on_path_depth() else {
            return;
        };
        // The innermost object is the value at path[..depth - 1]; its key matches segment
        // depth - 1.
        if depth >= 1 && self.path.get(depth - 1).is_some_and(|s| **s == *self.key) {
            if depth == self.path.len() {
                self.at_target = true;
            } else {
                self.value_on_path = true;
            }
        }
    }
}

/// Reads a `text/event-stream` body: every event's `data` goes through a [`JsonScanner`],
/// and the last event that has the field wins (an LLM stream ends with a usage chunk, then
/// `data: [DONE]`). Lines are not buffered: a `data:` line's value is scanned as it arrives.
#[derive(Debug)]
pub struct EventScanner {
    path: Arc<[Box<[u8]>]>,
    event: JsonScanner,
    /// The current event has data already (a second `data:` line adds a newline).
    has_data: bool,
    line: Line,
    /// The field name read so far at the start of a line (at most `data`).
    field: Vec<u8>,
    after_cr: bool,
    last: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// Reading the field name.
    Field,
    /// After `data:`, before the optional single space.
    DataStart,
    /// Inside a `data` value.
    Data,
    /// Inside any other field, or a comment.
    Skip,
}

impl EventScanner {
    pub fn new(path: Arc<[Box<[u8]>]>) -> Self {
        EventScanner {
            event: JsonScanner::new(path.clone()),
            path,
            has_data: false,
            line: Line::Start,
            field: Vec::new(),
            after_cr: false,
            last: None,
        }
    }

    fn end_event(&mut self) {
        if self.has_data {
            self.event.feed(b" ");
            if let Some(n) = self.event.found {
                self.last = Some(n);
            }
        }
        self.event = JsonScanner::new(self.path.clone());
        self.has_data = false;
    }

    fn end_line(&mut self) {
        if self.line == Line::Start {
            self.end_event();
        }
        self.line = Line::Start;
        self.field.clear();
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            if b == b'\r' || b == b'\n' {
                self.after_cr = b == b'\r';
                self.end_line();
                continue;
            }
            match self.line {
                Line::Start | Line::Field => {
                    if b == b':' {
                        self.line = if self.field == b"data" {
                            if self.has_data {
                                self.event.feed(b"\n");
                            }
                            self.has_data = true;
                            Line::DataStart
                        } else {
                            Line::Skip
                        };
                    } else if self.field.len() < 4 {
                        self.field.push(b);
                        self.line = Line::Field;
                    } else {
                        self.line = Line::Skip;
                    }
                }
                Line::DataStart => {
                    self.line = Line::Data;
                    if b != b' ' {
                        self.event.feed(&[b]);
                    }
                }
                Line::Data => self.event.feed(&[b]),
                Line::Skip => {}
            }
        }
    }

    /// The cost of the last complete event that had the field, or of an unfinished last event.
    pub fn finish(&mut self) -> Option<u64> {
        if self.line != Line::Start || self.has_data {
            self.end_line();
            self.end_event();
        }
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Arc<[Box<[u8]>]> {
        p.split('.')
            .map(|s| s.as_bytes().to_vec().into_boxed_slice())
            .collect()
    }

    fn json(p: &str, body: &str) -> Option<u64> {
        let mut s = JsonScanner::new(path(p));
        s.feed(body.as_bytes());
        // The end of the body ends a number at the very end.
        s.feed(b" ");
        s.found
    }

    fn json_bytewise(p: &str, body: &str) -> Option<u64> {
        let mut s = JsonScanner::new(path(p));
        for b in body.as_bytes() {
            s.feed(std::slice::from_ref(b));
        }
        s.feed(b" ");
        s.found
    }

    const OPENAI: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"usage: {\"total_tokens\": 9} is a string"}}],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;

    #[test]
    fn finds_the_field_at_its_path_whatever_the_chunking() {
        assert_eq!(json("usage.total_tokens", OPENAI), Some(42));
        assert_eq!(json_bytewise("usage.total_tokens", OPENAI), Some(42));
        assert_eq!(json("usage.prompt_tokens", OPENAI), Some(12));
    }

    #[test]
    fn ignores_the_same_name_elsewhere() {
        // Same key under another parent, inside an array, or in a string.
        let body =
            r#"{"other":{"total_tokens":7},"list":[{"usage":{"total_tokens":8}}],"s":"usage"}"#;
        assert_eq!(json("usage.total_tokens", body), None);
        assert_eq!(json("other.total_tokens", body), Some(7));
    }

    #[test]
    fn a_missing_or_non_integer_field_is_none() {
        assert_eq!(json("usage.total_tokens", r#"{"usage":{}}"#), None);
        assert_eq!(
            json("usage.total_tokens", r#"{"usage":{"total_tokens":"42"}}"#),
            None
        );
        assert_eq!(
            json("usage.total_tokens", r#"{"usage":{"total_tokens":4.5}}"#),
            None
        );
        assert_eq!(
            json("usage.total_tokens", r#"{"usage":{"total_tokens":-3}}"#),
            None
        );
        assert_eq!(
            json("usage.total_tokens", r#"{"usage":{"total_tokens":null}}"#),
            None
        );
        assert_eq!(json("usage.total_tokens", "not json"), None);
    }

    #[test]
    fn a_huge_number_is_capped_and_deep_nesting_stops_the_scan() {
        let body = r#"{"usage":{"total_tokens":99999999999999999999999}}"#;
        assert_eq!(json("usage.total_tokens", body), None);
        let body = r#"{"usage":{"total_tokens":9999999999999999}}"#;
        assert_eq!(json("usage.total_tokens", body), Some(MAX_COST));
        let deep = format!(
            "{}{}",
            "[".repeat(10_000),
            r#"{"usage":{"total_tokens":5}}"#
        );
        let mut s = JsonScanner::new(path("usage.total_tokens"));
        s.feed(deep.as_bytes());
        assert_eq!(s.found, None);
        assert!(s.stack.len() <= MAX_DEPTH);
    }

    #[test]
    fn a_key_with_escapes_or_a_long_key_does_not_match() {
        assert_eq!(
            json("usage.total_tokens", r#"{"us\u0061ge":{"total_tokens":5}}"#),
            None
        );
        let long = format!(
            r#"{{"{}":1,"usage":{{"total_tokens":6}}}}"#,
            "k".repeat(5000)
        );
        assert_eq!(json("usage.total_tokens", &long), Some(6));
    }

    fn events(p: &str, chunks: &[&str]) -> Option<u64> {
        let mut s = EventScanner::new(path(p));
        for c in chunks {
            s.feed(c.as_bytes());
        }
        s.finish()
    }

    const STREAM: &str =
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        : keep-alive\n\n\
        event: message\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":57}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn the_last_event_with_the_field_wins() {
        assert_eq!(events("usage.total_tokens", &[STREAM]), Some(57));
        let bytewise: Vec<String> = STREAM.chars().map(String::from).collect();
        let refs: Vec<&str> = bytewise.iter().map(String::as_str).collect();
        assert_eq!(events("usage.total_tokens", &refs), Some(57));
        let crlf = STREAM.replace('\n', "\r\n");
        assert_eq!(events("usage.total_tokens", &[&crlf]), Some(57));
    }

    #[test]
    fn data_split_over_lines_is_one_json_text() {
        let s = "data: {\"usage\":\ndata: {\"total_tokens\": 8}}\n\n";
        assert_eq!(events("usage.total_tokens", &[s]), Some(8));
    }

    #[test]
    fn a_stream_cut_before_its_usage_event_reports_none() {
        let cut = &STREAM[..STREAM.find("event:").unwrap_or(0)];
        assert_eq!(events("usage.total_tokens", &[cut]), None);
        // Cut inside the usage event, after its number: the unfinished event still counts.
        let mid = &STREAM[..STREAM.find("57").unwrap_or(0) + 2];
        assert_eq!(events("usage.total_tokens", &[mid, "}"]), Some(57));
    }

    #[test]
    fn estimates_come_from_the_header_capped_or_fixed() {
        let rule = UsageRule {
            header: None,
            json_path: path("usage.total_tokens"),
            estimate_header: Some(HeaderName::from_static("x-max-tokens")),
            estimate_fixed: 100,
            estimate_max: 4096,
        };
        let mut h = HeaderMap::new();
        assert_eq!(rule.estimate(&h), 100);
        h.insert("x-max-tokens", http::HeaderValue::from_static("512"));
        assert_eq!(rule.estimate(&h), 512);
        h.insert("x-max-tokens", http::HeaderValue::from_static("99999999"));
        assert_eq!(rule.estimate(&h), 4096);
        h.insert("x-max-tokens", http::HeaderValue::from_static("-1"));
        assert_eq!(rule.estimate(&h), 100);
    }
}
