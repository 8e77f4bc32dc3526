//! The crate's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy document: {0}")]
    Document(#[from] keylimit_dataplane::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("watching config directory {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    /// The config's inputs are the same as at its last rejection, so it was not parsed again.
    #[error("config unchanged since it was rejected: {message}")]
    StillRejected {
        reason: &'static str,
        message: String,
    },
    #[error("invalid argument: {0}")]
    Argument(String),
    #[error("logging setup failed: {0}")]
    Logging(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The Redis store is misconfigured (bad URL) or did not answer.
    #[error("redis store: {0}")]
    Redis(String),
    /// The Redis store did not answer within the policy's timeout.
    #[error("redis store did not answer within {0:?}")]
    RedisTimeout(std::time::Duration),
    /// The app's answer was not HTTP/1.x the proxy can pass on (a malformed head, a conflicting
    /// length, a body cut short).
    #[error("upstream: {0}")]
    Upstream(&'static str),
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(e.to_string())
    }
}

impl Error {
    /// A short, bounded label for the reload-failure metric (never includes file content).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Read { .. } => "read",
            Error::Document(keylimit_dataplane::Error::Json(_)) => "json",
            Error::Document(keylimit_dataplane::Error::ApiVersion { .. }) => "api_version",
            Error::Document(keylimit_dataplane::Error::MissingShard { .. }) => "missing_shard",
            Error::Document(keylimit_dataplane::Error::ShardDigest { .. }) => "shard_digest",
            Error::Document(keylimit_dataplane::Error::Invalid(_)) => "invalid",
            Error::StillRejected { reason, .. } => reason,
            Error::Bind { .. } => "bind",
            Error::Watch { .. } => "watch",
            Error::Argument(_) => "argument",
            Error::Logging(_) => "logging",
            Error::Io(_) => "io",
            Error::Redis(_) => "redis",
            Error::RedisTimeout(_) => "redis_timeout",
            Error::Upstream(_) => "upstream",
        }
    }
}
