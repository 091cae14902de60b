//! Lanyard's data plane: the TLS/mTLS sidecar, plus the pieces every part of
//! Lanyard shares — the cert-dir contract, identities and certificate facts.
//!
//! The control plane (`lanyard-ca`) depends on this crate, never the reverse,
//! so the sidecar binary stays free of ACME, Docker and store code.

pub mod certdir;
pub mod certinfo;
pub mod identity;
pub mod span;
pub mod tls;

/// Installs aws-lc-rs as the process-wide rustls crypto provider.
///
/// Binaries call this once at start; it is idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
