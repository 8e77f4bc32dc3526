//! The sidecar tried the way an attacker would: raw sockets where an HTTP client would
//! normalise the attack away, forged headers, hostile paths, idle and half-open connections.
//! Each module covers one class of attack from the sidecar-hardening issue; every test failed
//! on the code before its fix.

#[path = "../common/mod.rs"]
mod common;

mod raw;
