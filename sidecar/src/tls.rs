//! rustls configurations built from a validated [`CertSet`], with Lanyard's
//! TLS policy: TLS 1.3 and 1.2, ECDHE with AEAD suites only (the aws-lc-rs
//! defaults), session resumption on. Callers set ALPN.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::server::{ProducesTickets, StoresServerSessions, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::certdir::CertSet;
use crate::identity::PeerId;
use crate::verify::{AllowListClientVerifier, IdentityServerVerifier};

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

/// Which key exchanges the process offers and accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KxPolicy {
    /// The hybrid post-quantum X25519MLKEM768 first; X25519 and the NIST
    /// curves still accepted from classical-only peers.
    #[default]
    Prefer,
    /// X25519MLKEM768 only: a classical-only peer fails the handshake
    /// (reason `kx_mismatch`).
    Require,
}

static KX_POLICY: std::sync::OnceLock<KxPolicy> = std::sync::OnceLock::new();

/// Sets the process's key-exchange policy, once, before any TLS config is
/// built (`sidecar run` and `ca serve` do it from their configuration).
pub fn set_kx_policy(policy: KxPolicy) {
    let _ = KX_POLICY.set(policy);
}

/// The one crypto provider: aws-lc-rs, with the process's [`KxPolicy`].
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(crypto_provider())
}

/// [`provider`], by value (to install as the process default).
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::aws_lc_rs::kx_group;
    let kx_groups = match KX_POLICY.get().copied().unwrap_or_default() {
        KxPolicy::Prefer => vec![kx_group::X25519MLKEM768, kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        KxPolicy::Require => vec![kx_group::X25519MLKEM768],
    };
    rustls::crypto::CryptoProvider { kx_groups, ..rustls::crypto::aws_lc_rs::default_provider() }
}

/// The metric label of a negotiated key-exchange group.
pub fn group_label(group: Option<rustls::NamedGroup>) -> &'static str {
    match group {
        Some(rustls::NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(rustls::NamedGroup::X25519) => "X25519",
        Some(rustls::NamedGroup::secp256r1) => "secp256r1",
        Some(rustls::NamedGroup::secp384r1) => "secp384r1",
        Some(_) => "other",
        None => "none",
    }
}

/// How a server treats client certificates.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// Required and verified against `ca.pem`; with a non-empty allow-list
    /// the client must also carry one of its identities.
    Required(Arc<[PeerId]>),
    /// Requested and verified when sent, but not required.
    Optional,
}

/// Session-resumption state that outlives certificate reloads.
#[derive(Clone, Debug)]
pub struct Resumption {
    cache: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
}

impl Resumption {
    /// A session cache of 4096 entries and a rotating ticket key.
    pub fn new() -> Result<Self, TlsConfigError> {
        Ok(Self {
            cache: rustls::server::ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
        })
    }
}

/// The trust bundle of `set` as a root store.
pub fn root_store(set: &CertSet) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for root in &set.roots {
        roots.add(root.clone())?;
    }
    Ok(roots)
}

/// A server config presenting `set`'s chain, checking clients per `auth`
/// (chain to `ca.pem`, not on `crl.pem`, on the allow-list).
pub fn server_config(
    set: &CertSet,
    auth: &ClientAuth,
    resumption: Option<&Resumption>,
) -> Result<ServerConfig, TlsConfigError> {
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let roots = Arc::new(root_store(set)?);
    let webpki = || {
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(set.crls.iter().cloned())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
    };
    let builder = match auth {
        ClientAuth::Required(allow) => {
            let inner = webpki().build().map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
            if allow.is_empty() {
                builder.with_client_cert_verifier(inner)
            } else {
                builder.with_client_cert_verifier(Arc::new(AllowListClientVerifier::new(inner, allow.clone())))
            }
        }
        ClientAuth::Optional => builder.with_client_cert_verifier(
            webpki().allow_unauthenticated().build().map_err(|e| TlsConfigError::Verifier(e.to_string()))?,
        ),
    };
    let mut config = builder.with_single_cert(set.chain.clone(), set.key.clone_key())?;
    if let Some(r) = resumption {
        config.session_storage = r.cache.clone();
        config.ticketer = r.ticketer.clone();
    }
    Ok(config)
}

/// A throwaway self-signed certificate, served until a real one is loaded
/// (so that health endpoints can say why they are not ready).
pub fn fallback_key(name: &str) -> Result<Arc<rustls::sign::CertifiedKey>, TlsConfigError> {
    let err = |e: rcgen::Error| TlsConfigError::Verifier(format!("cannot make the fallback certificate: {e}"));
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()]).and_then(|p| p.self_signed(&key)).map_err(err)?;
    certified_key(vec![cert.der().clone()], &rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
}

/// Resolves every handshake to one certificate.
#[derive(Debug)]
pub struct FixedCert(pub Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A chain and its key, ready for a certificate resolver.
pub fn certified_key(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: &rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsConfigError> {
    let signing = provider().key_provider.load_private_key(key.clone_key())?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)))
}

/// How a client checks the server's certificate, beyond chaining to `ca.pem`.
#[derive(Clone, Debug)]
pub enum ServerCheck {
    /// The usual hostname check against the SNI name.
    Hostname,
    /// The server must carry this identity, whatever the SNI name.
    Identity(PeerId),
    /// The chain alone (the admin endpoint of one's own sidecar).
    ChainOnly,
}

/// A client config trusting `roots` and checking servers per `check`,
/// presenting `set`'s chain when given.
pub fn client_config_with(
    roots: RootCertStore,
    check: &ServerCheck,
    client_cert: Option<&CertSet>,
) -> Result<ClientConfig, TlsConfigError> {
    let roots = Arc::new(roots);
    let crls = client_cert.map(|set| set.crls.as_slice()).unwrap_or_default();
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match check {
        ServerCheck::Identity(id) => builder.dangerous().with_custom_certificate_verifier(Arc::new(
            IdentityServerVerifier::new(roots, Some(id.clone()), provider(), crls)?,
        )),
        ServerCheck::ChainOnly => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(IdentityServerVerifier::new(roots, None, provider(), crls)?)),
        ServerCheck::Hostname => builder.with_webpki_verifier(
            WebPkiServerVerifier::builder_with_provider(roots, provider())
                .with_crls(crls.iter().cloned())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status()
                .build()
                .map_err(|e| TlsConfigError::Verifier(e.to_string()))?,
        ),
    };
    Ok(match client_cert {
        Some(set) => builder.with_client_auth_cert(set.chain.clone(), set.key.clone_key())?,
        None => builder.with_no_client_auth(),
    })
}

/// A client config presenting `set`'s chain and trusting `set`'s roots.
pub fn client_config(set: &CertSet, check: &ServerCheck) -> Result<ClientConfig, TlsConfigError> {
    client_config_with(root_store(set)?, check, Some(set))
}

/// Installs aws-lc-rs as the process-wide rustls crypto provider.
///
/// Binaries call this once at start; it is idempotent.
pub fn install_crypto_provider() {
    let _ = crypto_provider().install_default();
}
