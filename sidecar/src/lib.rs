//! keylimit sidecar: authenticates API keys, enforces the policy's limits and proxies allowed
//! requests to the workload on localhost.
//!
//! Layout: [`config`] turns the operator's document into an immutable [`config::Snapshot`]
//! (with its [`config::KeyIndex`]); [`limiter`] decides; [`proxy`] and [`admin`] are the two
//! ports; [`store`] makes the same decisions in Redis when the policy asks for a shared
//! store; [`server`] wires them with the config watcher and graceful shutdown.
#![forbid(unsafe_code)]

pub mod admin;
#[cfg(feature = "api-watch")]
pub mod apiwatch;
pub mod authbudget;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod limiter;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod report;
pub mod response;
pub mod server;
pub mod store;
pub mod upstream;
pub mod window;

pub use cli::{run, Args};
pub use error::Error;
pub use server::{Settings, Sidecar};
