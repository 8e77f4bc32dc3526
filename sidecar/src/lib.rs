//! keylimit sidecar: authenticates API keys, enforces the policy's limits and proxies allowed
//! requests to the workload on localhost.
//!
//! Layout, by role:
//! - [`limiter`]: the decision core (rate windows, quotas, concurrency, throttle; [`limiter::Check`]
//!   in, [`limiter::Decision`] out), with the in-process store in [`limiter::local`] and the
//!   shared Redis store in [`limiter::redis`]; neither store reaches into the other.
//! - [`config`]: turns the operator's document into an immutable [`config::Snapshot`] (with its
//!   [`config::KeyIndex`]), and in [`config::apiwatch`] mirrors a ConfigMap into the config
//!   directory.
//! - [`http`]: the two ports ([`http::proxy`], [`http::admin`]), responses, the upstream pool,
//!   path normalisation, and [`http::server`], which wires them with the config watcher and
//!   graceful shutdown.
#![forbid(unsafe_code)]

pub mod authbudget;
pub mod cli;
pub mod config;
pub mod error;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod report;

pub use crate::http::server::{Settings, Sidecar};
pub use cli::{run, Args};
pub use error::Error;
