//! Lanyard's data plane: the TLS/mTLS sidecar, plus the pieces every part of
//! Lanyard shares — the cert-dir contract, identities and certificate facts.
//!
//! The control plane (`lanyard-ca`) depends on this crate, never the reverse,
//! so the sidecar binary stays free of ACME, Docker and store code.

pub mod admin;
pub mod certdir;
pub mod certinfo;
pub mod cli;
pub mod config;
pub mod health;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod span;
pub mod tls;
pub mod verify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::certdir::CertDir;
use crate::config::Config;
use crate::reload::CertStore;

/// Installs aws-lc-rs as the process-wide rustls crypto provider.
///
/// Binaries call this once at start; it is idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS setup failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, SidecarError> {
    TcpListener::bind(addr).await.map_err(|source| SidecarError::Bind { addr, what: what.to_owned(), source })
}

/// Runs the sidecar until `shutdown` resolves, then stops accepting and
/// drains open connections (bounded by the drain timeout).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), SidecarError> {
    let store = CertStore::new(CertDir::new(&config.cert_dir));
    let store_for_load = store.clone();
    let _ = tokio::task::spawn_blocking(move || store_for_load.reload()).await;
    if store.current().is_none() {
        tracing::warn!(dir = %config.cert_dir.display(), "no valid certificate yet; waiting for one (not ready)");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut listeners = Vec::new();
    let mut tasks = Vec::new();
    for lc in &config.listeners {
        let socket = bind(lc.listen, &lc.name).await?;
        tracing::info!(listener = %lc.name, mode = ?lc.mode, listen = %lc.listen, upstream = %lc.upstream, "listening");
        let l = proxy::Listener::new(lc.clone(), config.limits.clone(), store.clone())?;
        listeners.push(l.clone());
        tasks.push(tokio::spawn(l.serve(socket, stop_rx.clone())));
    }
    if let Some(addr) = config.admin {
        let socket = bind(addr, "admin").await?;
        tracing::info!(%addr, "admin endpoint on https://{addr}/readyz");
        let admin = Arc::new(admin::Admin::new(store.clone(), listeners.clone())?);
        tokio::spawn(admin.serve(socket, stop_rx.clone()));
    }
    let mut watch_stop = stop_rx.clone();
    let watcher = tokio::spawn(store.clone().watch(async move {
        let _ = watch_stop.wait_for(|s| *s).await;
    }));

    shutdown.await;
    tracing::info!("shutting down: no new connections, draining open ones");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = watcher.await;
    Ok(())
}
