//! What a public certificate is: its configuration, its document in the
//! store (the REST API's certificate object), and its status and source.

use super::*;

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`staging = true`).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// How a name is proven.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Challenge {
    /// A token at `/.well-known/acme-challenge/` on port 80.
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// A certificate for ALPN `acme-tls/1` on port 443.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// A TXT record, written by RFC 2136 dynamic update (needed for wildcards).
    #[serde(rename = "dns-01")]
    Dns01,
}

/// A public certificate's name: a DNS label (letters, digits, `-`), so it
/// is safe as a directory name under `STATE/public`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertName(String);

impl CertName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for CertName {
    type Err = PublicError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name.parse::<DnsName>().is_err() || name.contains('.') {
            return Err(PublicError::Invalid(format!("cert_name {name:?}: use letters, digits and '-'")));
        }
        Ok(Self(name.to_owned()))
    }
}

impl<'de> Deserialize<'de> for CertName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks an ACME directory URL: ACME is served over HTTPS only (RFC 8555 §6.1).
pub fn check_directory_url(url: &str) -> Result<(), PublicError> {
    let https = url.parse::<hyper::Uri>().is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
    if !https {
        return Err(PublicError::Invalid(format!(
            "ACME directory {url:?} is not an https:// URL (RFC 8555 serves ACME over HTTPS only): give https://host/path"
        )));
    }
    Ok(())
}

pub(super) fn checked_directory_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let url = Option::<String>::deserialize(d)?;
    url.as_deref().map(check_directory_url).transpose().map_err(serde::de::Error::custom)?;
    Ok(url)
}

/// `[[public]]` in `lanyard.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    /// The certificate's name (its cert dir is `STATE/public/<name>` unless `out_dir` is set).
    pub name: CertName,
    /// The names on the certificate; `*.example.com` needs `dns-01`.
    pub domains: Vec<String>,
    /// Account contact.
    pub email: String,
    /// ACME directory; default Let's Encrypt production.
    #[serde(default, deserialize_with = "checked_directory_url")]
    pub directory_url: Option<String>,
    /// Use Let's Encrypt staging instead of production.
    #[serde(default)]
    pub staging: bool,
    /// How names are proven.
    #[serde(default)]
    pub challenge: Challenge,
    /// Where the certificate goes.
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// External account binding key ID, for CAs that need one.
    #[serde(default)]
    pub eab_kid: Option<String>,
    /// External account binding HMAC key, base64url.
    #[serde(default)]
    pub eab_hmac_key: Option<String>,
    /// The ACME profile to order (`classic`, `tlsserver`, `shortlived` at
    /// Let's Encrypt): checked against the directory's `meta.profiles`,
    /// and the same on every renewal.
    #[serde(default)]
    pub profile: Option<String>,
}

impl PublicConfig {
    /// The ACME directory: `directory_url`, or Let's Encrypt (staging with `staging`).
    pub fn directory(&self) -> String {
        directory(self.directory_url.as_deref(), self.staging)
    }
}

/// `url`, or Let's Encrypt (staging with `staging`).
pub(super) fn directory(url: Option<&str>, staging: bool) -> String {
    match (url, staging) {
        (Some(url), _) => url.to_owned(),
        (None, true) => LETS_ENCRYPT_STAGING.into(),
        (None, false) => LETS_ENCRYPT.into(),
    }
}

/// `[acme]` in `lanyard.toml`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeSettings {
    /// PEM roots trusted for the ACME server's HTTPS (Pebble's test CA);
    /// default: the system's roots.
    pub directory_roots: Option<PathBuf>,
    /// Where to answer TLS-ALPN-01 validations (`acme-tls/1` on port 443).
    pub tls_alpn_listen: Option<SocketAddr>,
    /// Domains (and their subdomains) that may never be ordered.
    pub blocklist: Vec<String>,
    /// How long one order may take before it counts as failed.
    #[serde(deserialize_with = "lanyard_sidecar::cli::serde_str::opt")]
    pub order_timeout: Option<lanyard_sidecar::span::Span>,
    /// The DNS server that takes DNS-01 records (RFC 2136 + TSIG).
    pub dns: Option<super::dns::DnsUpdateConfig>,
}

/// A public certificate and where it stands: the REST API's certificate object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PublicCert {
    /// The `[[public]]` or API name; also the cert dir's name under `STATE/public`.
    pub cert_name: String,
    /// Names on the certificate.
    pub domains: Vec<String>,
    /// Account contact.
    pub email: String,
    /// ACME directory.
    pub acme_directory_url: String,
    /// How names are proven.
    pub challenge: Challenge,
    /// Where the certificate goes.
    pub out_dir: PathBuf,
    /// Where it was declared.
    pub source: CertSource,
    /// Where its order stands.
    pub status: CertStatus,
    /// notBefore of the served certificate (RFC 3339).
    pub issued_at: Option<String>,
    /// notAfter of the served certificate (RFC 3339).
    pub expires_at: Option<String>,
    /// SHA-256 of the served leaf.
    pub fingerprint: Option<String>,
    /// The served chain (PEM); never the key.
    pub chain: Option<String>,
    /// Next order, unix seconds.
    pub next_attempt: i64,
    /// Consecutive failures (drives the backoff).
    pub failures: u32,
    /// The last error, cleared on success.
    pub last_error: Option<String>,
    /// Why the CA is holding back (rate limits), if it is.
    pub held_back: Option<String>,
    /// The ACME profile ordered, the same on every renewal.
    #[serde(default)]
    pub profile: Option<String>,
    /// When to ask the server's ARI (RFC 9773) again whether to renew
    /// earlier, unix seconds; `None` when the server offers no ARI.
    #[serde(default)]
    pub ari_check_at: Option<i64>,
}

/// Where a public certificate was declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// A `[[public]]` entry: removed when the entry is.
    Config,
    /// `POST /certificates`.
    Api,
    /// `PUT /certificates/{name}` or `ca upload`: never ordered.
    Upload,
    /// `[on_demand]`: ordered when an edge first saw its name, removed when
    /// no edge has used it for `idle`.
    #[serde(rename = "on_demand")]
    OnDemand,
}

/// Where a public certificate's order stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertStatus {
    /// Not issued yet.
    Pending,
    /// Issued and served.
    Valid,
    /// Never issued: the orders so far failed.
    Failed,
    /// Uploaded from another provider.
    Uploaded,
}

impl CertStatus {
    /// The word the API and `ca status` show.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Valid => "valid",
            Self::Failed => "failed",
            Self::Uploaded => "uploaded",
        }
    }
}

impl std::fmt::Display for CertStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Why a request about public certificates was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublicError {
    /// No such certificate.
    #[error("no public certificate named {0:?}")]
    Unknown(String),
    /// Bad input, with what to do.
    #[error("{0}")]
    Invalid(String),
    /// A certificate of that name exists.
    #[error("a public certificate named {0:?} exists already")]
    Exists(String),
    /// A document in the store does not parse.
    #[error("the stored public certificate {name:?} is corrupt ({what}): fix or delete its `public_cert` document, or re-create it")]
    Corrupt {
        /// The document's name.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl PublicCert {
    /// A pending certificate, due now.
    pub(super) fn new(name: &str, source: CertSource) -> Self {
        Self {
            cert_name: name.to_owned(),
            domains: Vec::new(),
            email: String::new(),
            acme_directory_url: String::new(),
            challenge: Challenge::Http01,
            out_dir: PathBuf::new(),
            source,
            status: CertStatus::Pending,
            issued_at: None,
            expires_at: None,
            fingerprint: None,
            chain: None,
            next_attempt: now(),
            failures: 0,
            last_error: None,
            held_back: None,
            profile: None,
            ari_check_at: None,
        }
    }

    /// Records the served certificate's facts and chain.
    pub(super) fn record_served(&mut self, info: &CertInfo, chain: &str) {
        self.issued_at = Some(rfc3339(info.not_before));
        self.expires_at = Some(rfc3339(info.not_after));
        self.fingerprint = Some(info.sha256.clone());
        self.chain = Some(chain.to_owned());
    }
}
