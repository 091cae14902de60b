//! End-to-end tests: Lanyard's binaries against real peers.

mod pki;
