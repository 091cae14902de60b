//! End-to-end tests: Lanyard's binaries against real peers.
#![allow(clippy::unwrap_used)]

mod acme;
mod acme_server;
mod compose;
mod docker;
mod flood;
mod ops;
mod pki;
mod serve;
mod sidecar;
