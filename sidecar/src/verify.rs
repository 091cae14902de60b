//! Peer verification beyond chain building: allow-lists of identities for
//! clients, an expected identity for servers, and the reasons for refusals.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

use crate::certinfo::CertInfo;
use crate::identity::PeerId;

/// Whether the certificate carries `id` (a URI SAN for SPIFFE IDs, a DNS SAN
/// for names).
pub fn cert_has_id(info: &CertInfo, id: &PeerId) -> bool {
    match id {
        PeerId::Spiffe(s) => info.uris.iter().any(|u| u == s.as_str()),
        PeerId::Dns(d) => info.dns.iter().any(|n| n.eq_ignore_ascii_case(d.as_str())),
    }
}

/// The identity to report for a peer: its SPIFFE ID, else its first DNS SAN,
/// else its subject.
pub fn peer_identity(info: &CertInfo) -> String {
    info.uris.first().or(info.dns.first()).cloned().unwrap_or_else(|| info.subject.clone())
}

/// Verifies clients: the chain like `full`, and, when `allow` is not empty,
/// that the client carries one of its identities.
///
/// A chain whose first intermediate is one already verified against the
/// same trust bundle (the served set's
/// [`client_path`](crate::certdir::CertSet::client_path)) and inside its
/// validity window is verified from it with `shortcut`: the root's
/// signature over it, the most expensive check of a handshake under a P-384
/// root, is not verified again. Any other chain, and any chain the shortcut
/// refuses, gets `full`'s verdict.
#[derive(Debug)]
pub struct ClientVerifier {
    full: Arc<dyn ClientCertVerifier>,
    /// The known intermediates, and a verifier that trusts them as anchors
    /// beside `full`'s roots, with the same CRLs and options.
    shortcut: Option<(Vec<crate::certdir::VerifiedIntermediate>, Arc<dyn ClientCertVerifier>)>,
    allow: Arc<[PeerId]>,
}

impl ClientVerifier {
    /// Checks chains with `full` (and `shortcut`), then identities against `allow`.
    pub fn new(
        full: Arc<dyn ClientCertVerifier>,
        shortcut: Option<(Vec<crate::certdir::VerifiedIntermediate>, Arc<dyn ClientCertVerifier>)>,
        allow: Arc<[PeerId]>,
    ) -> Self {
        Self { full, shortcut, allow }
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let unix = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if let (Some((known, shortcut)), Some(first)) = (&self.shortcut, intermediates.first()) {
            if known.iter().any(|k| k.der.as_ref() == first.as_ref() && k.valid_at(unix)) {
                if let Ok(verified) = shortcut.verify_client_cert(end_entity, &[], now) {
                    return Ok(verified);
                }
            }
        }
        self.full.verify_client_cert(end_entity, intermediates, now)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.full.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.full.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.full.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.verify_chain(end_entity, intermediates, now)?;
        if self.allow.is_empty() {
            return Ok(verified);
        }
        let info =
            CertInfo::from_der(end_entity).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.allow.iter().any(|id| cert_has_id(&info, id)) {
            Ok(verified)
        } else {
            Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.full.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.full.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.full.supported_verify_schemes()
    }
}

/// Verifies a server's chain against the trust bundle, its revocation
/// against the caller's CRLs and, when given, its identity against an
/// expected SPIFFE ID or DNS name (instead of the SNI name).
#[derive(Debug)]
pub struct IdentityServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Option<PeerId>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// `crl.pem` of the caller's cert dir: a revoked server is refused too.
    crls: Vec<webpki::CertRevocationList<'static>>,
}

impl IdentityServerVerifier {
    /// Expects the server to chain to `roots`, carry `expected` (if any) and
    /// not be on `crls`.
    pub fn new(
        roots: Arc<RootCertStore>,
        expected: Option<PeerId>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        crls: &[rustls::pki_types::CertificateRevocationListDer<'_>],
    ) -> Result<Self, Error> {
        let crls = crls
            .iter()
            .map(|der| {
                let crl = webpki::BorrowedCertRevocationList::from_der(der).map_err(webpki_error)?;
                Ok(webpki::CertRevocationList::from(crl.to_owned().map_err(webpki_error)?))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self { roots, expected, provider, crls })
    }

    /// Chain to the roots, and not revoked by a CRL of the chain's issuer
    /// (a CRL from another issuer says nothing about this certificate).
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Error> {
        let algs = self.provider.signature_verification_algorithms.all;
        if self.crls.is_empty() {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            return rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                algs,
            );
        }
        let crls: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crls)
            .map_err(|_| Error::General("no CRL to check".into()))?
            .with_depth(webpki::RevocationCheckDepth::EndEntity)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .build();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        cert.verify_for_usage(
            algs,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(revocation),
            None,
        )
        .map(|_| ())
        .map_err(webpki_error)
    }
}

/// A webpki verdict as rustls reports it (so refusals are classified alike).
fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    Error::InvalidCertificate(match e {
        W::CertRevoked => CertificateError::Revoked,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

impl ServerCertVerifier for IdentityServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify_chain(end_entity, intermediates, now)?;
        let info =
            CertInfo::from_der(end_entity).map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.expected.as_ref().is_none_or(|id| cert_has_id(&info, id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
