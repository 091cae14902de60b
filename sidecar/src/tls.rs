//! rustls configurations built from a validated [`CertSet`], with Lanyard's
//! TLS policy: TLS 1.3 and 1.2, ECDHE with AEAD suites only (the aws-lc-rs
//! defaults), session resumption on.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::certdir::CertSet;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// rustls refused the certificate, key or roots.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built from the trust bundle.
    #[error("cannot build a verifier from ca.pem: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The trust bundle of `set` as a root store.
pub fn root_store(set: &CertSet) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for root in &set.roots {
        roots.add(root.clone())?;
    }
    Ok(roots)
}

/// A server config presenting `set`'s chain. With `require_client_cert`,
/// clients must present a certificate chaining to `set`'s roots (and not be
/// on its CRL).
pub fn server_config(set: &CertSet, require_client_cert: bool) -> Result<ServerConfig, TlsConfigError> {
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = if require_client_cert {
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(set)?), provider())
            .with_crls(set.crls.iter().cloned())
            .build()
            .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(set.chain.clone(), set.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client config presenting `set`'s chain and trusting `set`'s roots.
pub fn client_config(set: &CertSet) -> Result<ClientConfig, TlsConfigError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(set)?), provider())
        .with_crls(set.crls.iter().cloned())
        .build()
        .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(set.chain.clone(), set.key.clone_key())?;
    Ok(config)
}
