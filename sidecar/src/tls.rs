//! rustls configurations built from a validated [`CertSet`], with Lanyard's
//! TLS policy: TLS 1.3 and 1.2, ECDHE with AEAD suites only (the aws-lc-rs
//! set, AES-128-GCM first: [`CIPHER_SUITES`]), the server's order over the
//! client's, session resumption on. Callers set ALPN.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::server::{ProducesTickets, StoresServerSessions, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::certdir::CertSet;
use crate::identity::PeerId;
use crate::verify::{ClientVerifier, IdentityServerVerifier};

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

/// The AEAD suites, in Lanyard's order of preference: AES-128-GCM with
/// SHA-256 first, as Mozilla's server configurations, Go and BoringSSL
/// order them. The aws-lc-rs default puts AES-256-GCM with SHA-384 first,
/// and SHA-384 has no instruction of its own on x86 where SHA-256 has: its
/// key schedule was 11 % of a full mTLS handshake's CPU in the sidecar.
/// AES-256-GCM and ChaCha20-Poly1305 stay for clients that offer nothing else.
pub static CIPHER_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    &[
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// The one crypto provider: aws-lc-rs, with the process's [`KxPolicy`] and
/// [`CIPHER_SUITES`].
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
    rustls::crypto::CryptoProvider {
        kx_groups,
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    }
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

/// Verifies client chains to `set`'s `ca.pem`, not on its `crl.pem`, per
/// `auth`; from the served chain's verified intermediates when the client
/// presents one ([`ClientVerifier`]).
pub fn client_verifier(
    set: &CertSet,
    auth: &ClientAuth,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsConfigError> {
    let verifier = |anchors: Arc<RootCertStore>| {
        let webpki = WebPkiClientVerifier::builder_with_provider(anchors, provider())
            .with_crls(set.crls.iter().cloned())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
        match auth {
            ClientAuth::Required(_) => webpki.build(),
            ClientAuth::Optional => webpki.allow_unauthenticated().build(),
        }
        .map_err(|e| TlsConfigError::Verifier(e.to_string()))
    };
    let roots = root_store(set)?;
    let full = verifier(Arc::new(roots.clone()))?;
    let shortcut = if set.client_path.is_empty() {
        None
    } else {
        let mut with_known = roots;
        for known in &set.client_path {
            with_known.add(known.der.clone())?;
        }
        Some((set.client_path.clone(), verifier(Arc::new(with_known))?))
    };
    let allow = match auth {
        ClientAuth::Required(allow) => allow.clone(),
        ClientAuth::Optional => Arc::from(Vec::new()),
    };
    Ok(Arc::new(ClientVerifier::new(full, shortcut, allow)))
}

/// A server config presenting `set`'s chain, checking clients per `auth`
/// (chain to `ca.pem`, not on `crl.pem`, on the allow-list).
pub fn server_config(
    set: &CertSet,
    auth: &ClientAuth,
    resumption: Option<&Resumption>,
) -> Result<ServerConfig, TlsConfigError> {
    let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = builder.with_client_cert_verifier(client_verifier(set, auth)?);
    let mut config = builder.with_single_cert(set.chain.clone(), set.key.clone_key())?;
    config.ignore_client_order = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certdir::{CertDir, PemSet};
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer, KeyIdMethod, KeyPair,
        RevokedCertParams, SerialNumber,
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls::{CertificateError, Error};
    use time::{Duration, OffsetDateTime};

    fn ca(
        name: &str,
        until: OffsetDateTime,
        parent: Option<&Issuer<'_, KeyPair>>,
    ) -> (Issuer<'static, KeyPair>, String) {
        let key = KeyPair::generate_for(if parent.is_some() {
            &rcgen::PKCS_ECDSA_P256_SHA256
        } else {
            &rcgen::PKCS_ECDSA_P384_SHA384
        })
        .unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_after = until;
        let cert = match parent {
            Some(p) => params.signed_by(&key, p).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (Issuer::new(params, key), cert.pem())
    }

    fn leaf(name: &str, serial: u64, issuer: &Issuer<'_, KeyPair>) -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_after = OffsetDateTime::now_utc() + Duration::hours(2);
        (params.signed_by(&key, issuer).unwrap().pem(), key)
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_known_intermediate_shortcuts_the_chain_but_never_its_validity_revocation_or_issuer() {
        let now = OffsetDateTime::now_utc();
        let (root, root_pem) = ca("root", now + Duration::days(30), None);
        // Ours expires in 1 h, before the leaves it issued.
        let (ours, ours_pem) = ca("ours", now + Duration::hours(1), Some(&root));
        let (other, other_pem) = ca("other", now + Duration::days(1), Some(&root));
        let (served, served_key) = leaf("web", 1, &ours);
        let crl = CertificateRevocationListParams {
            this_update: now - Duration::minutes(1),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(3u64),
                revocation_time: now - Duration::minutes(1),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ours)
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path().join("web"));
        certs
            .write(&PemSet {
                cert: served + &ours_pem,
                key: Some(served_key.serialize_pem()),
                ca: root_pem,
                crl: Some(crl.pem().unwrap()),
            })
            .unwrap();
        let set = certs.load(now).unwrap();
        assert_eq!(set.client_path.len(), 1, "our intermediate is on a verified client path");
        let verifier = client_verifier(&set, &ClientAuth::Required(Arc::from(Vec::new()))).unwrap();
        let at =
            |t: OffsetDateTime| UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.unix_timestamp() as u64));
        let verify = |leaf_pem: &str, chain: &[&str], t| {
            let chain: Vec<_> = chain.iter().map(|p| der(p)).collect();
            verifier.verify_client_cert(&der(leaf_pem), &chain, at(t)).map(drop)
        };

        let (api, _) = leaf("api", 2, &ours);
        verify(&api, &[&ours_pem], now).expect("a peer of our intermediate");
        let (db, _) = leaf("db", 4, &other);
        verify(&db, &[&other_pem], now).expect("a peer of another intermediate, through the full path");
        let unknown = verify(&db, &[&ours_pem], now).unwrap_err();
        assert!(matches!(unknown, Error::InvalidCertificate(CertificateError::UnknownIssuer)), "{unknown:?}");
        let (revoked, _) = leaf("old", 3, &ours);
        let refused = verify(&revoked, &[&ours_pem], now).unwrap_err();
        assert!(matches!(refused, Error::InvalidCertificate(CertificateError::Revoked)), "{refused:?}");
        let expired = verify(&api, &[&ours_pem], now + Duration::minutes(90)).unwrap_err();
        assert!(
            matches!(
                expired,
                Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })
            ),
            "our intermediate has expired: {expired:?}"
        );
    }

    /// Moves every TLS byte `from` has to send into `to`, and lets `to` process them.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    #[test]
    fn the_server_picks_aes_128_gcm_over_a_client_that_lists_aes_256_first() {
        use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider};
        let now = OffsetDateTime::now_utc();
        let (root, root_pem) = ca("root", now + Duration::days(30), None);
        let (ours, ours_pem) = ca("ours", now + Duration::days(1), Some(&root));
        let (served, served_key) = leaf("web", 1, &ours);
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path().join("web"));
        let pems = PemSet { cert: served + &ours_pem, key: Some(served_key.serialize_pem()), ca: root_pem, crl: None };
        certs.write(&pems).unwrap();
        let set = certs.load(now).unwrap();
        let server = Arc::new(server_config(&set, &ClientAuth::Optional, None).unwrap());
        let negotiated = |suites: Vec<rustls::SupportedCipherSuite>| {
            let provider = rustls::crypto::CryptoProvider { cipher_suites: suites, ..default_provider() };
            let client = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(root_store(&set).unwrap())
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from("web").unwrap();
            let mut client = rustls::Connection::from(rustls::ClientConnection::new(Arc::new(client), name).unwrap());
            let mut server = rustls::Connection::from(rustls::ServerConnection::new(server.clone()).unwrap());
            while client.is_handshaking() || server.is_handshaking() {
                pump(&mut client, &mut server);
                pump(&mut server, &mut client);
            }
            server.negotiated_cipher_suite().map(|s| s.suite())
        };
        assert_eq!(
            default_provider().cipher_suites.first().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            "the client below lists AES-256-GCM first, as rustls and OpenSSL clients do"
        );
        assert_eq!(negotiated(default_provider().cipher_suites), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert_eq!(
            negotiated(vec![cipher_suite::TLS13_AES_256_GCM_SHA384]),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            "a client that offers AES-256-GCM alone still connects"
        );
    }
}
