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
/// Most redirects an HTTP-01 validation follows (Let's Encrypt's figure).
const MAX_REDIRECTS: usize = 10;
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

/// One URL an HTTP-01 validation fetches.
#[derive(Clone, Debug)]
struct Target {
    https: bool,
    host: Identifier,
    port: u16,
    path: String,
}

impl Target {
    /// `host[:port]` as the Host header writes it.
    fn authority(&self) -> String {
        let host = match &self.host {
            Identifier::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
            other => other.value(),
        };
        host + &format!(":{}", self.port)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", if self.https { "https" } else { "http" }, self.authority(), self.path)
    }
}

/// What one fetch got.
enum Fetched {
    Body(Bytes),
    Redirect(String),
}

/// A client config that accepts any certificate and checks only the
/// handshake signature against its key, offering `alpn`.
fn any_certificate(alpn: Vec<Vec<u8>>) -> Result<Arc<rustls::ClientConfig>, Problem> {
    let provider = lanyard_sidecar::tls::provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Problem::server_internal(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
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

    /// Fetches `http://ID:PORT/.well-known/acme-challenge/TOKEN` and compares
    /// it with `key_auth`, following up to ten redirects as Let's Encrypt
    /// does: to `http` on the HTTP-01 port or `https` on the TLS-ALPN-01
    /// port (the fleet's 80 and 443), whose certificate is not checked.
    pub async fn http01(&self, id: &Identifier, token: &str, key_auth: &str) -> Result<(), Problem> {
        let first = Target {
            https: false,
            host: id.clone(),
            port: self.http01_port,
            path: format!("{}{token}", lanyard_sidecar::edge::ACME_CHALLENGE_PREFIX),
        };
        let fetch = async {
            let mut target = first.clone();
            for _ in 0..=MAX_REDIRECTS {
                match self.get(&target).await? {
                    Fetched::Body(body) => {
                        if String::from_utf8_lossy(&body).trim_end() != key_auth {
                            return Err(Problem::incorrect_response(format!(
                                "HTTP-01: {target} served {:?}, not the key authorization",
                                String::from_utf8_lossy(&body[..body.len().min(100)])
                            )));
                        }
                        return Ok(());
                    }
                    Fetched::Redirect(location) => target = self.redirected(&target, &location)?,
                }
            }
            Err(Problem::incorrect_response(format!("HTTP-01: more than {MAX_REDIRECTS} redirects from {first}")))
        };
        tokio::time::timeout(self.timeout, fetch).await.unwrap_or_else(|_| {
            Err(Problem::connection(format!("HTTP-01: {} did not answer within {:?}", id.value(), self.timeout)))
        })
    }

    /// One GET of `target`: its body, or where it redirects to.
    async fn get(&self, target: &Target) -> Result<Fetched, Problem> {
        let addr = self.address(&target.host, target.port).await?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Problem::connection(format!("HTTP-01: cannot connect to {addr} for {target}: {e}")))?;
        let handshake_failed = |e: hyper::Error| Problem::connection(format!("HTTP-01: {target} ({addr}): {e}"));
        let mut send = if target.https {
            let server_name = match &target.host {
                Identifier::Dns(name) => ServerName::try_from(name.clone()),
                Identifier::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
            }
            .map_err(|_| Problem::server_internal(format!("{target}: not a valid server name")))?;
            let tls = tokio_rustls::TlsConnector::from(any_certificate(vec![b"http/1.1".to_vec()])?)
                .connect(server_name, tcp)
                .await
                .map_err(|e| Problem::tls(format!("HTTP-01: TLS handshake with {target} ({addr}): {e}")))?;
            let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(handshake_failed)?;
            tokio::spawn(conn);
            send
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(handshake_failed)?;
            tokio::spawn(conn);
            send
        };
        let req = hyper::Request::get(&target.path)
            .header(hyper::header::HOST, target.authority())
            .header(hyper::header::USER_AGENT, "lanyard-acme-server")
            .body(Empty::<Bytes>::new())
            .map_err(|e| Problem::server_internal(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| Problem::connection(format!("HTTP-01: {target} did not answer: {e}")))?;
        let status = resp.status();
        if status.is_redirection() {
            let location = resp.headers().get(hyper::header::LOCATION).and_then(|l| l.to_str().ok());
            let location = location.ok_or_else(|| {
                Problem::incorrect_response(format!("HTTP-01: {target} answered {status} without a Location"))
            })?;
            return Ok(Fetched::Redirect(location.to_owned()));
        }
        if !status.is_success() {
            return Err(Problem::incorrect_response(format!("HTTP-01: {target} answered {status}")));
        }
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| Problem::incorrect_response(format!("HTTP-01: the answer is unreadable or too long: {e}")))?
            .to_bytes();
        Ok(Fetched::Body(body))
    }

    /// Where a redirect from `from` to `location` goes, if it may be followed.
    fn redirected(&self, from: &Target, location: &str) -> Result<Target, Problem> {
        if location.starts_with('/') && !location.starts_with("//") {
            return Ok(Target { path: location.to_owned(), ..from.clone() });
        }
        if !location.contains("://") && !location.starts_with("//") {
            let dir = from.path.rsplit_once('/').map_or("", |(dir, _)| dir);
            return Ok(Target { path: format!("{dir}/{location}"), ..from.clone() });
        }
        let refused =
            |why: &str| Problem::incorrect_response(format!("HTTP-01: {from} redirects to {location:?}: {why}"));
        let uri: hyper::Uri = location.parse().map_err(|_| refused("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(refused("only http and https URLs are followed")),
        };
        let host = uri.host().ok_or_else(|| refused("no host"))?.trim_start_matches('[').trim_end_matches(']');
        let host = match host.parse::<IpAddr>() {
            Ok(ip) => Identifier::Ip(ip),
            Err(_) => Identifier::Dns(host.to_ascii_lowercase()),
        };
        let allowed = if https { self.tls_alpn01_port } else { self.http01_port };
        let port = uri.port_u16().unwrap_or(allowed);
        if port != allowed {
            return Err(refused(&format!(
                "redirects are followed to port {} (http) and {} (https) only, as Let's Encrypt follows them to 80 and 443",
                self.http01_port, self.tls_alpn01_port
            )));
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Target { https, host, port, path })
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
        let config = any_certificate(vec![b"acme-tls/1".to_vec()])?;
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
                Problem::connection(format!("TLS-ALPN-01: cannot connect to {addr} for {}: {e}", id.value()))
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
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

/// Accepts any certificate (a TLS-ALPN-01 validation certificate, judged
/// by [`check_validation_cert`]; the HTTPS end of an HTTP-01 redirect,
/// never checked), but checks the handshake signature against its key,
/// in TLS 1.3 and 1.2 (RFC 8737 §4). The key is read from the SPKI
/// directly: webpki refuses a validation certificate outright, for its
/// critical acmeIdentifier extension.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_with_spki(message, cert, dss)
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

/// A TLS 1.2 handshake signature, checked with aws-lc-rs against the
/// certificate's key: in TLS 1.2 the scheme names the hash, the key the curve.
fn verify_tls12_with_spki(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &rustls::DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    use aws_lc_rs::signature as sig;
    use rustls::SignatureScheme as S;
    let bad = || rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let spki = &parsed.tbs_certificate.subject_pki;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
    let p384 = curve.as_deref() == Some("1.3.132.0.34");
    let algorithm: &dyn sig::VerificationAlgorithm = match (dss.scheme, p384) {
        (S::ECDSA_NISTP256_SHA256, false) => &sig::ECDSA_P256_SHA256_ASN1,
        (S::ECDSA_NISTP256_SHA256, true) => &sig::ECDSA_P384_SHA256_ASN1,
        (S::ECDSA_NISTP384_SHA384, false) => &sig::ECDSA_P256_SHA384_ASN1,
        (S::ECDSA_NISTP384_SHA384, true) => &sig::ECDSA_P384_SHA384_ASN1,
        (S::ED25519, _) => &sig::ED25519,
        (S::RSA_PKCS1_SHA256, _) => &sig::RSA_PKCS1_2048_8192_SHA256,
        (S::RSA_PKCS1_SHA384, _) => &sig::RSA_PKCS1_2048_8192_SHA384,
        (S::RSA_PKCS1_SHA512, _) => &sig::RSA_PKCS1_2048_8192_SHA512,
        (S::RSA_PSS_SHA256, _) => &sig::RSA_PSS_2048_8192_SHA256,
        (S::RSA_PSS_SHA384, _) => &sig::RSA_PSS_2048_8192_SHA384,
        (S::RSA_PSS_SHA512, _) => &sig::RSA_PSS_2048_8192_SHA512,
        _ => {
            return Err(rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme))
        }
    };
    sig::UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
        .verify(message, dss.signature())
        .map(|()| HandshakeSignatureValid::assertion())
        .map_err(|_| bad())
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

    /// Answers HTTP/1.1 requests on a loopback port, over TLS 1.2 only when
    /// `tls` is given, with `route(path)` as the whole response.
    async fn serve(
        tls: Option<Arc<rustls::sign::CertifiedKey>>,
        route: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> u16 {
        let route = Arc::new(route);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tls.map(|key| {
            let mut config = rustls::ServerConfig::builder_with_provider(lanyard_sidecar::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(lanyard_sidecar::tls::FixedCert(key)));
            config.alpn_protocols = vec![b"acme-tls/1".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, route) = (acceptor.clone(), route.clone());
                tokio::spawn(async move {
                    let mut io: Box<dyn Io> = match acceptor {
                        Some(a) => match a.accept(tcp).await {
                            Ok(tls) => Box::new(tls),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&request);
                    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let _ = io.write_all(route(&path).as_bytes()).await;
                    let _ = io.shutdown().await;
                });
            }
        });
        port
    }

    trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

    fn reach(http01_port: u16, tls_alpn01_port: u16) -> Reach {
        let hosts = [("web.internal".to_owned(), IpAddr::from([127, 0, 0, 1]))].into();
        Reach { http01_port, tls_alpn01_port, hosts, timeout: Duration::from_secs(5) }
    }

    fn self_signed(name: &str, key_auth: Option<&str>) -> Arc<rustls::sign::CertifiedKey> {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        if let Some(key_auth) = key_auth {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_auth.as_bytes());
            params.custom_extensions.push(rcgen::CustomExtension::new_acme_identifier(d.as_ref()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        lanyard_sidecar::tls::certified_key(vec![cert.der().clone()], &der).unwrap()
    }

    fn response(status: &str, extra: &str, body: &str) -> String {
        format!("HTTP/1.1 {status}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
    }

    /// A plain-HTTP server that sends every request to HTTPS, where the
    /// challenge is answered (over TLS 1.2): followed, as Let's Encrypt does.
    #[tokio::test]
    async fn http01_follows_redirects_to_the_https_port_only() {
        let https = serve(Some(self_signed("web.internal", None)), |path| match path {
            "/moved/tok" => response("200 OK", "", "tok.thumb\n"),
            _ => response("404 Not Found", "", ""),
        })
        .await;
        let http = serve(None, move |path| match path {
            "/.well-known/acme-challenge/tok" => {
                response("301 Moved Permanently", &format!("location: https://web.internal:{https}/moved/tok\r\n"), "")
            }
            "/.well-known/acme-challenge/loop" => {
                response("302 Found", "location: /.well-known/acme-challenge/loop\r\n", "")
            }
            "/.well-known/acme-challenge/elsewhere" => {
                response("302 Found", "location: http://web.internal:1/x\r\n", "")
            }
            _ => response("404 Not Found", "", ""),
        })
        .await;
        let id = Identifier::Dns("web.internal".into());
        reach(http, https).http01(&id, "tok", "tok.thumb").await.unwrap();
        let wrong = reach(http, https).http01(&id, "tok", "other.thumb").await.unwrap_err();
        assert!(wrong.detail.contains(&format!("https://web.internal:{https}/moved/tok served")), "{wrong}");
        let endless = reach(http, https).http01(&id, "loop", "x").await.unwrap_err();
        assert!(endless.detail.contains("more than 10 redirects"), "{endless}");
        let port = reach(http, https).http01(&id, "elsewhere", "x").await.unwrap_err();
        assert!(port.detail.contains("followed to port"), "{port}");
    }

    /// RFC 8737 §4: TLS 1.2 or later, so a TLS 1.2-only responder validates.
    #[tokio::test]
    async fn tls_alpn01_validates_over_tls12() {
        let key_auth = "tok.thumb";
        let port = serve(Some(self_signed("web.internal", Some(key_auth))), |_| String::new()).await;
        let id = Identifier::Dns("web.internal".into());
        reach(1, port).tls_alpn01(&id, key_auth).await.unwrap();
        let wrong = reach(1, port).tls_alpn01(&id, "other").await.unwrap_err();
        assert!(wrong.detail.contains("does not hold"), "{wrong}");
    }
}
