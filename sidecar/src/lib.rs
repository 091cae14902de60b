//! Lanyard's data plane: the TLS/mTLS sidecar, plus the pieces every part of
//! Lanyard shares — the cert-dir contract, identities and certificate facts.
//!
//! The control plane (`lanyard-ca`) depends on this crate, never the reverse,
//! so the sidecar binary stays free of ACME, Docker and store code.
//!
//! Without the default `runtime` feature only the contract types are built
//! (`identity`, `span`): what `lanyard-compose` needs, with no TLS, HTTP or
//! async runtime.

pub mod identity;
pub mod span;

#[cfg(feature = "runtime")]
pub mod admin;
#[cfg(feature = "runtime")]
pub mod certdir;
#[cfg(feature = "runtime")]
pub mod certinfo;
#[cfg(feature = "runtime")]
pub mod cli;
#[cfg(feature = "runtime")]
pub mod command;
#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod copy;
#[cfg(feature = "runtime")]
pub mod edge;
#[cfg(feature = "runtime")]
pub mod enrol;
#[cfg(feature = "runtime")]
pub mod health;
#[cfg(feature = "runtime")]
pub mod http;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod proxy;
#[cfg(feature = "runtime")]
pub mod proxy_protocol;
#[cfg(feature = "runtime")]
pub mod reload;
#[cfg(feature = "runtime")]
pub mod renewal;
#[cfg(feature = "runtime")]
pub mod server;
#[cfg(feature = "runtime")]
pub mod serving;
#[cfg(feature = "runtime")]
pub mod tls;
#[cfg(feature = "runtime")]
pub mod verify;

#[cfg(feature = "runtime")]
pub use server::{run, SidecarError};
#[cfg(feature = "runtime")]
pub use tls::install_crypto_provider;
