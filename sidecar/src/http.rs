//! The HTTP side: the traffic port ([`proxy`]) and the admin port ([`admin`]), the responses
//! they build ([`response`]), the pool of connections to the workload ([`upstream`]), request
//! path normalisation ([`path`]) and the wiring of all of it ([`server`]), and reading a request's cost from its response
//! ([`meter`]).

pub mod admin;
pub mod meter;
pub mod path;
pub mod proxy;
pub mod response;
pub mod server;
pub mod upstream;
