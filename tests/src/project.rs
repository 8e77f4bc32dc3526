//! Stands in for kubelet's ConfigMap volume when the sidecar runs as a local process: the
//! sidecar's own API-watch mirror (which writes exactly as kubelet's AtomicWriter does) pointed
//! at a directory, so the volume path and the API-watch path share one implementation.

pub use keylimit_sidecar::config::apiwatch::{mirror as project, write_atomic};
