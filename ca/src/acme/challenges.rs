//! Answers to the ACME server's validations, from whichever replica it
//! reaches: HTTP-01 tokens and TLS-ALPN-01 certificates, kept in memory and
//! in the store.

use super::*;

impl Acme {
    /// The TLS-ALPN-01 validation certificate and key (PEM) for `name`, if
    /// one is pending: edge sidecars fetch it to answer on port 443.
    pub fn tls_alpn01(&self, name: &str) -> Option<String> {
        let placed = self.alpn.lock().unwrap_or_else(|e| e.into_inner()).get(name).map(|c| c.pem.clone());
        placed.or_else(|| self.store.doc(KIND_CHALLENGE_ALPN, name).ok().flatten())
    }

    /// The TLS-ALPN-01 key to present for `name`: this replica's, or the
    /// one another replica placed in the store.
    fn alpn_key(&self, name: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        if let Some(c) = self.alpn.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Some(c.key.clone());
        }
        let pem = self.store.doc(KIND_CHALLENGE_ALPN, name).ok().flatten()?;
        let chain = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().ok()?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).ok()?;
        lanyard_sidecar::tls::certified_key(chain, &key).ok()
    }

    /// The key authorization for an HTTP-01 token, if one is pending.
    pub fn http01(&self, token: &str) -> Option<String> {
        let placed = self.http01.lock().unwrap_or_else(|e| e.into_inner()).get(token).cloned();
        placed.or_else(|| self.store.doc(KIND_CHALLENGE, token).ok().flatten())
    }

    pub(super) async fn serve_tls_alpn(
        self: Arc<Self>,
        socket: tokio::net::TcpListener,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut config = match rustls::ServerConfig::builder_with_provider(lanyard_sidecar::tls::provider())
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b.with_no_client_auth().with_cert_resolver(Arc::new(AlpnResolver(self.clone()))),
            Err(e) => return tracing::error!("TLS-ALPN-01 listener: {e}"),
        };
        config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        loop {
            let Some((tcp, _)) = lanyard_sidecar::serving::next_connection(&socket, &mut stop).await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                }
            });
        }
    }
}

/// Serves the TLS-ALPN-01 validation certificate for the SNI name.
#[derive(Debug)]
struct AlpnResolver(Arc<Acme>);

impl rustls::server::ResolvesServerCert for AlpnResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello.server_name()?.to_owned();
        self.0.alpn_key(&name)
    }
}

/// A TLS-ALPN-01 validation certificate, ready to serve and as PEM for
/// edge sidecars (its key proves nothing beyond this one challenge).
#[derive(Clone)]
pub(super) struct AlpnCert {
    pub(super) key: Arc<rustls::sign::CertifiedKey>,
    pub(super) pem: String,
}

/// The self-signed certificate RFC 8737 asks for: the name, and the key
/// authorization digest in a critical acmeIdentifier extension.
pub(super) fn alpn_certificate(name: &str, digest: &[u8]) -> Result<AlpnCert, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let certified = lanyard_sidecar::tls::certified_key(
        vec![cert.der().clone()],
        &rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .map_err(|e| e.to_string())?;
    Ok(AlpnCert { key: certified, pem: cert.pem() + &key.serialize_pem() })
}
