//! Network enrolment: the sidecar makes its own key, proves who it may be
//! with an enrolment credential (`ca enrol NAME`), and keeps its cert dir
//! current over the network. The key never leaves the process except into
//! the sidecar's own cert dir (mode 0600), which the usual reload serves.
//!
//! 1. The CA is verified by the root fingerprint the credential pins: the
//!    roots are fetched first, and the secret is sent only over TLS that
//!    chains to the pinned root.
//! 2. `POST /v1/enrol` with the secret and a CSR for a fresh key.
//! 3. At 2/3 of the certificate's life (with jitter), `POST /v1/renew` over
//!    mTLS with the current certificate, again with a fresh key.
//! 4. The trust bundle (`/v1/roots`) and the CRL (`/v1/crl`) are fetched on
//!    a schedule; a root rotation reaches the sidecar this way.
//! 5. While the CA is unreachable the current certificate is served on and
//!    requests retry with jittered exponential backoff. An expired or
//!    revoked certificate is replaced by enrolling again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::certdir::{parse_certs, CertDir, PemSet};
use crate::certinfo::CertInfo;
use crate::renewal::{backoff, renewal_point, MAX_BACKOFF};

/// `[enrol]` in the sidecar's TOML (or `--enrol FILE [--ca URL]`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrolConfig {
    /// The enrolment credential file (`ca enrol NAME`).
    pub credential: PathBuf,
    /// The CA's URL; default the one in the credential.
    #[serde(default)]
    pub ca: Option<String>,
}

/// An enrolment credential: what `ca enrol NAME` writes, and nothing else.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// `https://HOST:PORT` of the CA's API.
    pub ca: String,
    /// SHA-256 (hex) of the CA's root, pinned.
    pub fingerprint: String,
    /// The secret that may enrol one identity.
    pub secret: String,
}

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The credential file could not be read or parsed.
    #[error("enrolment credential {path}: {what}; make a new one with `ca enrol NAME`")]
    Credential {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The CA's URL is not `https://HOST:PORT`.
    #[error("CA URL {0:?}: expected https://HOST:PORT")]
    Url(String),
    /// The server does not hold the pinned root: nothing was sent to it.
    #[error("{url} serves no root with the pinned fingerprint {pinned} (it serves {served}); the credential is for another CA, or something is in between: nothing was sent")]
    Fingerprint {
        /// The CA's URL.
        url: String,
        /// What the credential pins.
        pinned: String,
        /// What the server offered.
        served: String,
    },
    /// The CA could not be reached or answered badly.
    #[error("{0}")]
    Unreachable(String),
    /// The CA refused (revoked or unknown credential, names not allowed, ...).
    #[error("the CA refused: HTTP {status}: {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The CA's error message.
        reason: String,
    },
    /// What the CA sent is not a usable set.
    #[error("the CA's answer is not a usable certificate: {0}")]
    Answer(String),
}

impl Credential {
    /// Reads a credential file.
    pub fn load(path: &Path) -> Result<Self, EnrolError> {
        let err = |what: String| EnrolError::Credential { path: path.to_owned(), what };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let c: Self = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if c.fingerprint.len() != 64 || !c.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(format!("fingerprint {:?} is not a SHA-256 in hex", c.fingerprint)));
        }
        Ok(c)
    }

    /// As TOML, for the credential file.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a credential serializes")
    }
}

/// A server certificate check that accepts any chain but still verifies the
/// handshake signature: used only to fetch `/v1/roots`, which carries no
/// secret and whose answer is checked against the pinned fingerprint.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The CA's address.
#[derive(Clone, Debug)]
struct CaUrl {
    url: String,
    host: String,
    port: u16,
}

impl CaUrl {
    fn parse(url: &str) -> Result<Self, EnrolError> {
        let uri: hyper::Uri = url.parse().map_err(|_| EnrolError::Url(url.to_owned()))?;
        if uri.scheme_str() != Some("https") {
            return Err(EnrolError::Url(url.to_owned()));
        }
        let authority = uri.authority().ok_or_else(|| EnrolError::Url(url.to_owned()))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        Ok(Self { url: url.trim_end_matches('/').to_owned(), host, port: authority.port_u16().unwrap_or(443) })
    }
}

/// How long one request to the CA may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// Keeps `dir` current through the CA named in `credential`.
pub struct Enroller {
    credential: Credential,
    ca: CaUrl,
    dir: CertDir,
}

/// What the CA answers to enrol and renew.
#[derive(Deserialize)]
struct Issued {
    certificate: String,
    ca: String,
}

impl Enroller {
    /// An enroller writing `dir` (created 0700 when missing).
    pub fn new(config: &EnrolConfig, dir: &Path) -> Result<Self, EnrolError> {
        let credential = Credential::load(&config.credential)?;
        let ca = CaUrl::parse(config.ca.as_deref().unwrap_or(&credential.ca))?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| EnrolError::Answer(format!("cannot create the cert dir {}: {e}", dir.display())))?;
        }
        Ok(Self { credential, ca, dir: CertDir::new(dir) })
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        config: rustls::ClientConfig,
    ) -> Result<String, EnrolError> {
        let crate::health::Answer { status, body: text, .. } =
            crate::health::request(&self.ca.host, self.ca.port, method, path, body, Arc::new(config), REQUEST_LIMIT)
                .await
                .map_err(|e| EnrolError::Unreachable(format!("{}: {e}", self.ca.url)))?;
        if status != "200" {
            let reason = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            return Err(EnrolError::Refused { status: status.parse().unwrap_or(0), reason });
        }
        Ok(text)
    }

    /// The bundle the CA serves, accepted only when it holds the pinned root;
    /// returns a client config trusting that root alone.
    async fn pinned(&self) -> Result<rustls::RootCertStore, EnrolError> {
        let provider = crate::tls::provider();
        let any = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| EnrolError::Unreachable(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_no_client_auth();
        let bundle = self.request("GET", "/v1/roots", None, any).await?;
        let roots =
            parse_certs(Path::new("/v1/roots"), bundle.as_bytes()).map_err(|e| EnrolError::Answer(e.to_string()))?;
        let pinned = self.credential.fingerprint.to_ascii_lowercase();
        let mut served = Vec::new();
        for der in roots {
            let info = CertInfo::from_der(&der).map_err(|e| EnrolError::Answer(e.to_string()))?;
            if info.sha256 == pinned {
                let mut store = rustls::RootCertStore::empty();
                store.add(der).map_err(|e| EnrolError::Answer(e.to_string()))?;
                return Ok(store);
            }
            served.push(info.sha256);
        }
        Err(EnrolError::Fingerprint { url: self.ca.url.clone(), pinned, served: served.join(", ") })
    }

    /// A client config trusting `roots`, presenting `set` when given.
    fn client(
        &self,
        roots: rustls::RootCertStore,
        set: Option<&crate::certdir::CertSet>,
    ) -> Result<rustls::ClientConfig, EnrolError> {
        crate::tls::client_config_with(roots, &crate::tls::ServerCheck::Hostname, set)
            .map_err(|e| EnrolError::Unreachable(e.to_string()))
    }

    /// A fresh P-256 key and a CSR for it (the CA decides the names).
    fn new_key() -> Result<(String, String), EnrolError> {
        let key = rcgen::KeyPair::generate().map_err(|e| EnrolError::Answer(e.to_string()))?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|c| c.pem())
            .map_err(|e| EnrolError::Answer(e.to_string()))?;
        Ok((key.serialize_pem(), csr))
    }

    /// Writes a new set from the CA's answer, with the current CRL.
    async fn install(&self, answer: &str, key: String, trust: rustls::ClientConfig) -> Result<CertInfo, EnrolError> {
        let issued: Issued = serde_json::from_str(answer).map_err(|e| EnrolError::Answer(e.to_string()))?;
        let crl = self.request("GET", "/v1/crl", None, trust).await.ok();
        let set = PemSet { cert: issued.certificate, key: Some(key), ca: issued.ca, crl };
        let raw = crate::certdir::RawSet::from_pem(self.dir.path(), &set);
        let valid = raw.validate(OffsetDateTime::now_utc()).map_err(|e| EnrolError::Answer(e.to_string()))?;
        self.dir.write(&set).map_err(|e| EnrolError::Answer(e.to_string()))?;
        Ok(valid.leaf)
    }

    /// Enrols with the credential: verifies the CA by the pinned root, then
    /// sends the secret and a CSR.
    pub async fn enrol(&self) -> Result<CertInfo, EnrolError> {
        let roots = self.pinned().await?;
        let (key, csr) = Self::new_key()?;
        let body = serde_json::json!({ "secret": self.credential.secret, "csr": csr }).to_string();
        let answer = self.request("POST", "/v1/enrol", Some(&body), self.client(roots.clone(), None)?).await?;
        let leaf = self.install(&answer, key, self.client(roots, None)?).await?;
        tracing::info!(identity = %crate::verify::peer_identity(&leaf), serial = %leaf.serial, not_after = %crate::certinfo::rfc3339(leaf.not_after), ca = %self.ca.url, event = "issued", "enrolled");
        Ok(leaf)
    }

    /// The current set, when it is valid now.
    fn current(&self) -> Option<crate::certdir::CertSet> {
        self.dir.load(OffsetDateTime::now_utc()).ok()
    }

    /// Renews over mTLS with the current certificate, trusting its bundle.
    async fn renew(&self, set: &crate::certdir::CertSet) -> Result<CertInfo, EnrolError> {
        let roots = crate::tls::root_store(set).map_err(|e| EnrolError::Answer(e.to_string()))?;
        let (key, csr) = Self::new_key()?;
        let body = serde_json::json!({ "csr": csr }).to_string();
        let answer = self.request("POST", "/v1/renew", Some(&body), self.client(roots.clone(), Some(set))?).await?;
        let leaf = self.install(&answer, key, self.client(roots, None)?).await?;
        tracing::info!(identity = %crate::verify::peer_identity(&leaf), serial = %leaf.serial, not_after = %crate::certinfo::rfc3339(leaf.not_after), event = "renewed", "renewed");
        Ok(leaf)
    }

    /// Fetches the trust bundle and the CRL and rewrites the set when they changed.
    async fn refresh(&self, set: &crate::certdir::CertSet) -> Result<(), EnrolError> {
        let roots = crate::tls::root_store(set).map_err(|e| EnrolError::Answer(e.to_string()))?;
        let bundle = self.request("GET", "/v1/roots", None, self.client(roots.clone(), None)?).await?;
        let crl = self.request("GET", "/v1/crl", None, self.client(roots, None)?).await?;
        let raw = self.dir.read_raw().map_err(|e| EnrolError::Answer(e.to_string()))?;
        if raw.ca == bundle.as_bytes() && raw.crl.as_deref() == Some(crl.as_bytes()) {
            return Ok(());
        }
        let text = |b: Vec<u8>| String::from_utf8(b).map_err(|e| EnrolError::Answer(e.to_string()));
        let key = raw.key.map(text).transpose()?;
        let set = PemSet { cert: text(raw.cert)?, key, ca: bundle, crl: Some(crl) };
        crate::certdir::RawSet::from_pem(self.dir.path(), &set).validate(OffsetDateTime::now_utc()).map_err(|e| {
            EnrolError::Answer(format!("the CA's new bundle does not verify the current certificate: {e}"))
        })?;
        self.dir.write(&set).map_err(|e| EnrolError::Answer(e.to_string()))?;
        tracing::info!("trust bundle or CRL updated from the CA");
        Ok(())
    }

    /// Keeps the cert dir current until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        loop {
            let now = OffsetDateTime::now_utc();
            let outcome = match self.current() {
                // No valid certificate (none yet, expired): enrol.
                None => self.enrol().await.map(|leaf| renewal_at(&leaf)),
                Some(set) if now >= renewal_at(&set.leaf) => match self.renew(&set).await {
                    Ok(leaf) => Ok(renewal_at(&leaf)),
                    // Revoked or no longer accepted: enrol again.
                    Err(EnrolError::Refused { status: 401 | 403, reason }) => {
                        tracing::warn!("renewal refused ({reason}); enrolling again with the credential");
                        self.enrol().await.map(|leaf| renewal_at(&leaf))
                    }
                    Err(e) => Err(e),
                },
                Some(set) => self.refresh(&set).await.map(|()| renewal_at(&set.leaf)),
            };
            let wait = match outcome {
                Ok(next) => {
                    failures = 0;
                    let until_renewal = (next - OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO);
                    until_renewal.min(refresh_every(&self.dir))
                }
                Err(e) => {
                    failures += 1;
                    // While the current certificate lives, retry at least
                    // four times before it expires.
                    let left = self
                        .current()
                        .and_then(|s| Duration::try_from(s.leaf.not_after - OffsetDateTime::now_utc()).ok())
                        .map_or(MAX_BACKOFF, |d| (d / 4).max(Duration::from_secs(1)));
                    let wait = backoff(failures).min(left);
                    tracing::error!(failures, retry_in = ?wait, "enrolment: {e}");
                    wait
                }
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn renewal_at(leaf: &CertInfo) -> OffsetDateTime {
    renewal_point(leaf.not_before, leaf.not_after)
}

/// How often the bundle and CRL are fetched: a sixth of the certificate's
/// life, at most every 5 minutes and at least every 2 seconds.
fn refresh_every(dir: &CertDir) -> Duration {
    let life = dir
        .load(OffsetDateTime::now_utc())
        .ok()
        .and_then(|s| Duration::try_from(s.leaf.not_after - s.leaf.not_before).ok())
        .unwrap_or(MAX_BACKOFF);
    (life / 6).clamp(Duration::from_secs(2), MAX_BACKOFF)
}
