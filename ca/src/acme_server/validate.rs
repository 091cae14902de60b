//! The ACME server's challenge checks, made from the CA against the fleet:
//! HTTP-01 (RFC 8555 §8.3) and TLS-ALPN-01 (RFC 8737, RFC 8738 for IPs).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};

use super::config::Identifier;
use super::problem::Problem;

/// Largest HTTP-01 answer read.
const MAX_ANSWER: usize = 4096;
/// `id-pe-acmeIdentifier` (RFC 8737 §6.1).
const ACME_IDENTIFIER_OID: &str = "1.3.6.1.5.5.7.1.31";

/// Where validations connect, and how long they may take.
#[derive(Clone, Debug)]
pub struct Reach {
    /// The HTTP-01 port.
    pub http01_port: u16,
    /// The TLS-ALPN-01 port.
    pub tls_alpn01_port: u16,
    /// Addresses for names the resolver does not know.
    pub hosts: BTreeMap<String, IpAddr>,
    /// The bound of one validation.
    pub timeout: Duration,
}

impl Reach {
    async fn address(&self, id: &Identifier, port: u16) -> Result<SocketAddr, Problem> {
        match id {
            Identifier::Ip(ip) => Ok(SocketAddr::new(*ip, port)),
            Identifier::Dns(name) => {
                if let Some(ip) = self.hosts.get(name) {
                    return Ok(SocketAddr::new(*ip, port));
                }
                let mut found = tokio::net::lookup_host((name.as_str(), port))
                    .await
                    .map_err(|e| Problem::connection(format!("cannot resolve {name}: {e}")))?;
                found.next().ok_or_else(|| Problem::connection(format!("{name} resolves to no address")))
            }
        }
    }

    /// Fetches `http://ID:PORT/.well-known/acme-challenge/TOKEN` and compares it with `key_auth`.
    pub async fn http01(&self, id: &Identifier, token: &str, key_auth: &str) -> Result<(), Problem> {
        let addr = self.address(id, self.http01_port).await?;
        let fetch = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
                Problem::connection(format!("HTTP-01: cannot connect to {addr} for {}: {e}", id.value()))
            })?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| Problem::connection(format!("HTTP-01: {addr}: {e}")))?;
            tokio::spawn(conn);
            let host = match id {
                Identifier::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
                other => other.value(),
            };
            let req = hyper::Request::get(format!("{}{token}", lanyard_sidecar::edge::ACME_CHALLENGE_PREFIX))
                .header(hyper::header::HOST, host)
                .header(hyper::header::USER_AGENT, "lanyard-acme-server")
                .body(Empty::<Bytes>::new())
                .map_err(|e| Problem::server_internal(e.to_string()))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| Problem::connection(format!("HTTP-01: {addr} did not answer: {e}")))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(Problem::incorrect_response(format!(
                    "HTTP-01: http://{}:{}{}{token} answered {status} (redirects are not followed)",
                    id.value(),
                    self.http01_port,
                    lanyard_sidecar::edge::ACME_CHALLENGE_PREFIX
                )));
            }
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| {
                    Problem::incorrect_response(format!("HTTP-01: the answer is unreadable or too long: {e}"))
                })?
                .to_bytes();
            if String::from_utf8_lossy(&body).trim_end() != key_auth {
                return Err(Problem::incorrect_response(format!(
                    "HTTP-01: {} served {:?}, not the key authorization",
                    id.value(),
                    String::from_utf8_lossy(&body[..body.len().min(100)])
                )));
            }
            Ok(())
        };
        tokio::time::timeout(self.timeout, fetch).await.unwrap_or_else(|_| {
            Err(Problem::connection(format!("HTTP-01: {} did not answer within {:?}", id.value(), self.timeout)))
        })
    }

    /// Connects with ALPN `acme-tls/1` and checks the validation certificate.
    pub async fn tls_alpn01(&self, id: &Identifier, key_auth: &str) -> Result<(), Problem> {
        let addr = self.address(id, self.tls_alpn01_port).await?;
        let sni = match id {
            Identifier::Dns(name) => name.clone(),
            Identifier::Ip(ip) => reverse_name(*ip),
        };
        let server_name = ServerName::try_from(sni.clone())
            .map_err(|_| Problem::server_internal(format!("{sni} is not a valid server name")))?;
        let provider = lanyard_sidecar::tls::provider();
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Problem::server_internal(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ValidationCert(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"acme-tls/1".to_vec()];
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
                Problem::connection(format!("TLS-ALPN-01: cannot connect to {addr} for {}: {e}", id.value()))
            })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await
                .map_err(|e| Problem::tls(format!("TLS-ALPN-01: handshake with {addr} for {}: {e}", id.value())))?;
            let (_, session) = tls.get_ref();
            if session.alpn_protocol() != Some(b"acme-tls/1") {
                return Err(Problem::tls(format!("TLS-ALPN-01: {addr} did not negotiate acme-tls/1")));
            }
            let cert = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| Problem::tls(format!("TLS-ALPN-01: {addr} sent no certificate")))?;
            check_validation_cert(cert, id, key_auth)
        };
        tokio::time::timeout(self.timeout, connect).await.unwrap_or_else(|_| {
            Err(Problem::connection(format!("TLS-ALPN-01: {} did not answer within {:?}", id.value(), self.timeout)))
        })
    }
}

/// Accepts the validation certificate for [`check_validation_cert`] to judge,
/// but checks the TLS 1.3 handshake signature against its key. The key is
/// read from the SPKI directly: webpki refuses the certificate outright,
/// for its critical acmeIdentifier extension.
#[derive(Debug)]
struct ValidationCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for ValidationCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS-ALPN-01 validation speaks TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let spki = SubjectPublicKeyInfoDer::from(parsed.tbs_certificate.subject_pki.raw);
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &spki,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The `in-addr.arpa` / `ip6.arpa` name an IP's TLS-ALPN-01 uses as SNI (RFC 8738 §6).
fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let nibbles: Vec<String> =
                v6.octets().iter().rev().flat_map(|b| [b & 0xf, b >> 4]).map(|n| format!("{n:x}")).collect();
            format!("{}.ip6.arpa", nibbles.join("."))
        }
    }
}

/// RFC 8737 §3: exactly the identifier as SAN, and a critical
/// acmeIdentifier extension holding SHA-256 of the key authorization.
fn check_validation_cert(der: &[u8], id: &Identifier, key_auth: &str) -> Result<(), Problem> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Problem::incorrect_response(format!("TLS-ALPN-01: the certificate does not parse: {e}")))?;
    let sans =
        cert.subject_alternative_name().ok().flatten().map(|s| s.value.general_names.clone()).unwrap_or_default();
    let names_it = match (sans.as_slice(), id) {
        ([GeneralName::DNSName(n)], Identifier::Dns(name)) => n.eq_ignore_ascii_case(name),
        ([GeneralName::IPAddress(raw)], Identifier::Ip(ip)) => match ip {
            IpAddr::V4(v4) => *raw == v4.octets().as_slice(),
            IpAddr::V6(v6) => *raw == v6.octets().as_slice(),
        },
        _ => false,
    };
    if !names_it {
        return Err(Problem::incorrect_response(format!(
            "TLS-ALPN-01: the validation certificate must name exactly {}",
            id.value()
        )));
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_auth.as_bytes());
    let mut expected = vec![0x04, 0x20];
    expected.extend_from_slice(digest.as_ref());
    let ext = cert.extensions().iter().find(|e| e.oid.to_id_string() == ACME_IDENTIFIER_OID);
    match ext {
        Some(e) if e.critical && e.value == expected.as_slice() => Ok(()),
        Some(e) if !e.critical => {
            Err(Problem::incorrect_response("TLS-ALPN-01: the acmeIdentifier extension must be critical"))
        }
        Some(_) => Err(Problem::incorrect_response(
            "TLS-ALPN-01: the acmeIdentifier extension does not hold SHA-256 of the key authorization",
        )),
        None => Err(Problem::incorrect_response("TLS-ALPN-01: the certificate has no acmeIdentifier extension")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_certificates_must_carry_the_key_authorization_digest() {
        let key_auth = "token.thumbprint";
        let make = |name: &str, digest_of: &str, critical: bool| {
            let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, digest_of.as_bytes());
            let mut value = vec![0x04, 0x20];
            value.extend_from_slice(d.as_ref());
            let mut ext = rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 31], value);
            ext.set_criticality(critical);
            params.custom_extensions.push(ext);
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let id = Identifier::Dns("web.internal".into());
        check_validation_cert(&make("web.internal", key_auth, true), &id, key_auth).unwrap();
        let wrong = check_validation_cert(&make("web.internal", "other", true), &id, key_auth).unwrap_err();
        assert!(wrong.detail.contains("does not hold"), "{wrong}");
        let other_name = check_validation_cert(&make("api.internal", key_auth, true), &id, key_auth).unwrap_err();
        assert!(other_name.detail.contains("exactly web.internal"), "{other_name}");
        let soft = check_validation_cert(&make("web.internal", key_auth, false), &id, key_auth).unwrap_err();
        assert!(soft.detail.contains("critical"), "{soft}");
        assert_eq!(reverse_name("192.0.2.7".parse().unwrap()), "7.2.0.192.in-addr.arpa");
        assert!(reverse_name("2001:db8::1".parse().unwrap()).starts_with("1.0.0.0.0.0.0.0"));
    }
}
