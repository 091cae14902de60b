//! Public certificates from an ACME CA (Let's Encrypt; Pebble in tests),
//! through the same cert-dir contract and reload path as internal ones.
//!
//! Every public certificate is a document in the store (`public_cert`) that
//! carries its own retry queue: `next_attempt`, `failures` and the last
//! error, so a restart neither loses a pending order nor hammers the ACME
//! server. Accounts are stored per directory and email and reused.
//! A failure never touches the cert dir that is being served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, ExternalAccountKey, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use lanyard_sidecar::certdir::{CertDir, PemSet};
use lanyard_sidecar::certinfo::{rfc3339, CertInfo};
use lanyard_sidecar::identity::DnsName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};

use super::domain::registered_domain;
use crate::store::Store;

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`staging = true`).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

const KIND_CERT: &str = "public_cert";
const KIND_ACCOUNT: &str = "acme_account";
const KIND_EVENT: &str = "acme_event";
/// An HTTP-01 answer, in the store so that any replica answers it.
const KIND_CHALLENGE: &str = "challenge";
/// A TLS-ALPN-01 validation certificate and key (PEM), likewise.
const KIND_CHALLENGE_ALPN: &str = "challenge_alpn";
/// How long a challenge answer is kept at most.
const CHALLENGE_TTL: Duration = Duration::from_secs(3600);

/// Let's Encrypt's published limits that the CA keeps itself under.
const MAX_ORDERS_PER_DOMAIN_PER_WEEK: usize = 50;
const MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR: usize = 5;

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

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
    #[serde(default)]
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
}

impl PublicConfig {
    /// The ACME directory: `directory_url`, or Let's Encrypt (staging with `staging`).
    pub fn directory(&self) -> String {
        match (&self.directory_url, self.staging) {
            (Some(url), _) => url.clone(),
            (None, true) => LETS_ENCRYPT_STAGING.into(),
            (None, false) => LETS_ENCRYPT.into(),
        }
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
    pub dns: Option<super::rfc2136::DnsUpdateConfig>,
}

/// A public certificate and where it stands: the REST API's certificate object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PublicCert {
    /// Name.
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
    /// `config`, `api` or `upload`.
    pub source: String,
    /// `pending`, `valid`, `failed` or `uploaded`.
    pub status: String,
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
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The ACME side of `ca serve`.
pub struct Acme {
    store: Arc<dyn Store>,
    settings: AcmeSettings,
    state_dir: PathBuf,
    /// HTTP-01 token -> key authorization.
    http01: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01 name -> validation certificate.
    alpn: Mutex<HashMap<String, AlpnCert>>,
    eab: Mutex<HashMap<String, (String, String)>>,
    wake: Notify,
    /// Next attempts the store refused to record (a full disk, Redis
    /// down), kept here so that the backoff still holds.
    unrecorded: Mutex<HashMap<String, i64>>,
    /// Orders that ended with a certificate, and orders that failed.
    orders: [std::sync::atomic::AtomicU64; 2],
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Why an order failed, by stage. Only a failed validation counts against
/// the failed-validation limit.
#[derive(Debug, thiserror::Error)]
enum OrderError {
    /// The account or the new order.
    #[error("{0}")]
    Setup(String),
    /// Fetching an authorization or publishing its answer (HTTP-01 token,
    /// TLS-ALPN-01 certificate, DNS-01 record).
    #[error("{0}")]
    Challenge(String),
    /// The ACME server did not validate.
    #[error("validation: {0}")]
    Validation(String),
    /// Finalizing, downloading or writing the certificate.
    #[error("{0}")]
    Issue(String),
}

#[derive(Serialize, Deserialize)]
struct Event {
    at: i64,
    name: String,
    kind: String,
}

impl Acme {
    /// The ACME manager over `store`.
    pub fn new(store: Arc<dyn Store>, settings: AcmeSettings, state_dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            store,
            settings,
            state_dir: state_dir.to_owned(),
            http01: Mutex::default(),
            alpn: Mutex::default(),
            eab: Mutex::default(),
            wake: Notify::new(),
            unrecorded: Mutex::default(),
            orders: Default::default(),
        })
    }

    /// Checks `domains` for a new or changed certificate.
    pub fn check_domains(&self, domains: &[String], challenge: Challenge) -> Result<(), PublicError> {
        if domains.is_empty() {
            return Err(PublicError::Invalid("no domain: give `domain` or `domains`".into()));
        }
        for d in domains {
            let base = d.strip_prefix("*.").unwrap_or(d);
            if base.parse::<DnsName>().is_err() || !base.contains('.') || base.parse::<std::net::IpAddr>().is_ok() {
                return Err(PublicError::Invalid(format!(
                    "malformed domain {d:?}: give a DNS name such as www.example.com (or *.example.com with dns-01)"
                )));
            }
            if d.starts_with("*.") && challenge != Challenge::Dns01 {
                return Err(PublicError::Invalid(format!("{d}: wildcard names need challenge = \"dns-01\"")));
            }
            let lower = base.to_ascii_lowercase();
            if let Some(b) = self.settings.blocklist.iter().find(|b| lower == **b || lower.ends_with(&format!(".{b}")))
            {
                return Err(PublicError::Invalid(format!("domain {d:?} is on the blocklist ({b})")));
            }
        }
        Ok(())
    }

    /// Makes the store match the `[[public]]` entries: adds and updates them,
    /// and removes (with their cert dirs) config entries that are gone.
    pub fn reconcile(&self, configured: &[PublicConfig]) -> Result<(), PublicError> {
        let mut eab = self.eab.lock().unwrap_or_else(|e| e.into_inner());
        eab.clear();
        for c in configured {
            self.check_domains(&c.domains, c.challenge)
                .map_err(|e| PublicError::Invalid(format!("[[public]] {}: {e}", c.name.as_str())))?;
            let directory = c.directory();
            if let (Some(kid), Some(key)) = (&c.eab_kid, &c.eab_hmac_key) {
                eab.insert(c.name.as_str().to_owned(), (kid.clone(), key.clone()));
            }
            let out_dir = c.out_dir.clone().unwrap_or_else(|| self.state_dir.join("public").join(c.name.as_str()));
            let existing = self.get(c.name.as_str())?;
            let mut cert = existing.clone().unwrap_or_else(|| PublicCert::new(c.name.as_str(), "config"));
            let changed = cert.domains != c.domains || cert.acme_directory_url != directory;
            cert.domains = c.domains.clone();
            cert.email = c.email.clone();
            cert.acme_directory_url = directory;
            cert.challenge = c.challenge;
            cert.out_dir = out_dir;
            if changed && existing.is_some() {
                cert.next_attempt = now();
            }
            if Some(&cert) != existing.as_ref() {
                self.put(&cert)?;
            }
        }
        for cert in self.list()? {
            if cert.source == "config" && !configured.iter().any(|c| c.name.as_str() == cert.cert_name) {
                self.remove(&cert.cert_name)?;
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Every public certificate.
    pub fn list(&self) -> Result<Vec<PublicCert>, PublicError> {
        Ok(self.store.docs(KIND_CERT)?.iter().filter_map(|(_, json)| serde_json::from_str(json).ok()).collect())
    }

    /// One public certificate.
    pub fn get(&self, name: &str) -> Result<Option<PublicCert>, PublicError> {
        Ok(self.store.doc(KIND_CERT, name)?.and_then(|json| serde_json::from_str(&json).ok()))
    }

    /// Stores `cert`; once stored, no next attempt waits in memory for it.
    fn put(&self, cert: &PublicCert) -> Result<(), PublicError> {
        let json = serde_json::to_string(cert).map_err(|e| PublicError::Invalid(e.to_string()))?;
        self.store.put_doc(KIND_CERT, &cert.cert_name, &json)?;
        self.unrecorded.lock().unwrap_or_else(|e| e.into_inner()).remove(&cert.cert_name);
        Ok(())
    }

    /// Removes a certificate, its state and its cert dir.
    pub fn remove(&self, name: &str) -> Result<(), PublicError> {
        let cert = self.get(name)?.ok_or_else(|| PublicError::Unknown(name.to_owned()))?;
        self.store.delete_doc(KIND_CERT, name)?;
        // Only the cert dir Lanyard made for this name, never a path that
        // merely starts like one (`public/..`).
        let own = name.parse::<CertName>().is_ok() && cert.out_dir == self.state_dir.join("public").join(name);
        if own {
            let _ = std::fs::remove_dir_all(&cert.out_dir);
        }
        tracing::info!(identity = name, event = "removed", "public certificate removed");
        Ok(())
    }

    /// `POST /certificates`: a new certificate, ordered at once.
    pub fn create(
        &self,
        name: &str,
        domains: Vec<String>,
        email: String,
        directory: Option<String>,
    ) -> Result<PublicCert, PublicError> {
        name.parse::<CertName>()?;
        if self.get(name)?.is_some() {
            return Err(PublicError::Exists(name.to_owned()));
        }
        if !email.contains('@') {
            return Err(PublicError::Invalid(format!("email {email:?} is not an address")));
        }
        self.check_domains(&domains, Challenge::Http01)?;
        let mut cert = PublicCert::new(name, "api");
        cert.domains = domains;
        cert.email = email;
        cert.acme_directory_url = directory.unwrap_or_else(|| LETS_ENCRYPT.into());
        cert.out_dir = self.state_dir.join("public").join(name);
        self.put(&cert)?;
        self.wake.notify_one();
        Ok(cert)
    }

    /// `POST /certificates/{name}/renew`: order again now.
    pub fn renew_now(&self, name: &str) -> Result<PublicCert, PublicError> {
        let mut cert = self.get(name)?.ok_or_else(|| PublicError::Unknown(name.to_owned()))?;
        if cert.source == "upload" {
            return Err(PublicError::Invalid(format!("{name} was uploaded: upload its successor instead")));
        }
        cert.next_attempt = now();
        cert.held_back = None;
        self.put(&cert)?;
        self.wake.notify_one();
        Ok(cert)
    }

    /// `DELETE /certificates/{name}/domains/{domain}`: re-issue without the
    /// domain; the last domain removes the certificate. Returns the rest.
    pub fn remove_domain(&self, name: &str, domain: &str) -> Result<Option<PublicCert>, PublicError> {
        let mut cert = self.get(name)?.ok_or_else(|| PublicError::Unknown(name.to_owned()))?;
        if !cert.domains.iter().any(|d| d == domain) {
            return Err(PublicError::Invalid(format!("{name} has no domain {domain:?} (it has {:?})", cert.domains)));
        }
        cert.domains.retain(|d| d != domain);
        if cert.domains.is_empty() {
            self.remove(name)?;
            return Ok(None);
        }
        cert.next_attempt = now();
        self.put(&cert)?;
        self.wake.notify_one();
        Ok(Some(cert))
    }

    /// `PUT /certificates/{name}` and `ca upload`: a certificate from another
    /// provider, validated, then served and watched like the others.
    pub fn upload(&self, name: &str, chain_pem: &str, key_pem: &str) -> Result<PublicCert, PublicError> {
        if name.parse::<DnsName>().is_err() || name.contains('.') {
            return Err(PublicError::Invalid(format!("certificate name {name:?}: use letters, digits and '-'")));
        }
        let mut cert = self.get(name)?.unwrap_or_else(|| PublicCert::new(name, "upload"));
        cert.source = "upload".into();
        if cert.out_dir.as_os_str().is_empty() {
            cert.out_dir = self.state_dir.join("public").join(name);
        }
        let info = write_public(&cert.out_dir, chain_pem, key_pem).map_err(PublicError::Invalid)?;
        cert.domains = info.dns.clone();
        cert.status = "uploaded".into();
        cert.record_served(&info, chain_pem);
        cert.next_attempt = i64::MAX;
        self.put(&cert)?;
        Ok(cert)
    }

    /// Prometheus text: orders by result, and per certificate its expiry,
    /// next attempt, consecutive failures and whether the CA holds back.
    pub fn metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let p = "lanyard_ca_acme";
        lanyard_sidecar::metrics::header(&mut out, &format!("{p}_orders_total"), "counter", "ACME orders, by result.");
        for (i, result) in ["success", "failure"].iter().enumerate() {
            let n = self.orders[i].load(std::sync::atomic::Ordering::Relaxed);
            let _ = writeln!(out, "{p}_orders_total{{result=\"{result}\"}} {n}");
        }
        let certs = self.list().unwrap_or_default();
        let gauges: [Gauge; 4] = [
            ("cert_expiration_timestamp_seconds", "notAfter of each public certificate.", |c| {
                let t = c.expires_at.as_deref()?;
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .ok()
                    .map(|t| t.unix_timestamp())
            }),
            ("next_attempt_timestamp_seconds", "Next order of each public certificate.", |c| {
                (c.next_attempt != i64::MAX).then_some(c.next_attempt)
            }),
            ("failures", "Consecutive failed orders of each public certificate.", |c| Some(i64::from(c.failures))),
            ("held_back", "1 while the CA holds back to stay under the ACME server's limits.", |c| {
                Some(i64::from(c.held_back.is_some()))
            }),
        ];
        for (name, help, value) in gauges {
            lanyard_sidecar::metrics::header(&mut out, &format!("{p}_{name}"), "gauge", help);
            for c in &certs {
                if let Some(v) = value(c) {
                    let _ = writeln!(out, "{p}_{name}{{cert=\"{}\"}} {v}", c.cert_name);
                }
            }
        }
        out
    }

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

    /// Runs orders when they are due until `stop` turns true.
    /// Orders only while `leader` leads; every replica answers challenges.
    pub async fn run(self: Arc<Self>, leader: super::leader::Leader, mut stop: watch::Receiver<bool>) {
        if let Some(addr) = self.settings.tls_alpn_listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(socket) => {
                    tracing::info!(%addr, "answering TLS-ALPN-01 validations");
                    tokio::spawn(self.clone().serve_tls_alpn(socket, stop.clone()));
                }
                Err(e) => tracing::error!(%addr, "cannot listen for TLS-ALPN-01: {e}"),
            }
        }
        loop {
            if !leader.is_leader() {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            let due: Vec<PublicCert> = match self.list() {
                Ok(list) => {
                    let unrecorded = self.unrecorded.lock().unwrap_or_else(|e| e.into_inner());
                    let due = |c: &PublicCert| c.next_attempt.max(unrecorded.get(&c.cert_name).copied().unwrap_or(0));
                    list.into_iter().filter(|c| due(c) <= now()).collect()
                }
                Err(e) => {
                    tracing::error!("cannot read public certificates: {e}");
                    Vec::new()
                }
            };
            for cert in due {
                if *stop.borrow() {
                    return;
                }
                self.attempt(cert).await;
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One order for `cert`, recorded in its document whatever happens.
    async fn attempt(&self, mut cert: PublicCert) {
        if let Some(reason) = self.rate_limited(&cert) {
            if cert.held_back.as_deref() != Some(reason.0.as_str()) {
                tracing::warn!(identity = %cert.cert_name, "holding back: {}", reason.0);
            }
            cert.held_back = Some(reason.0);
            cert.next_attempt = reason.1;
            return self.record_attempt(&cert);
        }
        cert.held_back = None;
        let started = std::time::Instant::now();
        tracing::info!(identity = %cert.cert_name, domains = ?cert.domains, directory = %cert.acme_directory_url, "ordering");
        let result = self.order(&cert).await;
        // The document may have changed meanwhile (API); keep its edits.
        let mut latest = match self.get(&cert.cert_name) {
            Ok(Some(c)) if c.domains == cert.domains => c,
            // Domains changed meanwhile: that change already asked for a new order.
            _ => return,
        };
        // A renewal asked for during the order (API) must not be lost.
        let requested = (latest.next_attempt != cert.next_attempt).then_some(latest.next_attempt);
        match result {
            Ok(Issued { info, chain, window }) => {
                self.orders[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(identity = %latest.cert_name, serial = %info.serial, not_after = %rfc3339(info.not_after), took = ?started.elapsed(), event = "issued", "public certificate issued");
                latest.status = "valid".into();
                latest.record_served(&info, &chain);
                latest.failures = 0;
                latest.last_error = None;
                latest.next_attempt = match window {
                    // Inside the window the server suggests, at a random point.
                    Some((start, end)) if end > start => {
                        let span = (end - start).whole_seconds().max(1);
                        start.unix_timestamp() + (random_fraction() * span as f64) as i64
                    }
                    // Renew when a third of the life remains.
                    _ => {
                        let life = (info.not_after - info.not_before).whole_seconds();
                        info.not_before.unix_timestamp() + life * 2 / 3
                    }
                };
            }
            Err(e) => {
                self.orders[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                latest.failures += 1;
                let wait = backoff(latest.failures);
                tracing::warn!(identity = %latest.cert_name, failures = latest.failures, retry_in = ?wait, reason = %e, event = "failed", "order failed: {e}");
                if latest.chain.is_none() {
                    latest.status = "failed".into();
                }
                latest.last_error = Some(e.to_string());
                latest.next_attempt = now() + wait.as_secs() as i64;
            }
        }
        if let Some(at) = requested {
            latest.next_attempt = latest.next_attempt.min(at);
        }
        self.record_attempt(&latest);
    }

    /// Stores an attempt's outcome; when the store refuses, its next attempt
    /// is kept in memory so that a failing store does not turn the backoff
    /// into one order per second.
    fn record_attempt(&self, cert: &PublicCert) {
        if let Err(e) = self.put(cert) {
            tracing::error!(identity = %cert.cert_name, next_attempt = cert.next_attempt, "cannot record the attempt in the store: {e}; the next one waits in memory");
            self.unrecorded.lock().unwrap_or_else(|e| e.into_inner()).insert(cert.cert_name.clone(), cert.next_attempt);
        }
    }

    /// Whether an order now would break a published limit: the reason and
    /// when to look again.
    fn rate_limited(&self, cert: &PublicCert) -> Option<(String, i64)> {
        let t = now();
        let all = self.store.docs(KIND_EVENT).ok()?;
        // Forget events older than the longest window (keys start with the time).
        let cutoff = format!("{:012}", t - 8 * 24 * 3600);
        for (k, _) in all.iter().filter(|(k, _)| *k < cutoff) {
            let _ = self.store.delete_doc(KIND_EVENT, k);
        }
        let events: Vec<Event> = all.iter().filter_map(|(_, j)| serde_json::from_str(j).ok()).collect();
        for d in &cert.domains {
            let failed: Vec<i64> =
                events.iter().filter(|e| e.kind == "failed" && &e.name == d && e.at > t - 3600).map(|e| e.at).collect();
            if failed.len() >= MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR {
                let until = failed.iter().min().copied().unwrap_or(t) + 3600;
                return Some((format!("{d}: {} failed validations in the last hour (limit {MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR})", failed.len()), until));
            }
            let reg = registered_domain(d);
            let week = 7 * 24 * 3600;
            let orders: Vec<i64> = events
                .iter()
                .filter(|e| e.kind == "order" && registered_domain(&e.name) == reg && e.at > t - week)
                .map(|e| e.at)
                .collect();
            if orders.len() >= MAX_ORDERS_PER_DOMAIN_PER_WEEK {
                let until = orders.iter().min().copied().unwrap_or(t) + week;
                return Some((
                    format!("{reg}: {} orders in 7 days (limit {MAX_ORDERS_PER_DOMAIN_PER_WEEK})", orders.len()),
                    until,
                ));
            }
        }
        None
    }

    fn record_event(&self, kind: &str, name: &str) {
        let at = now();
        let mut id = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut id);
        let key = format!("{at:012}-{}", lanyard_sidecar::certinfo::hex(&id));
        let json = serde_json::json!({"at": at, "name": name, "kind": kind}).to_string();
        let _ = self.store.put_doc(KIND_EVENT, &key, &json);
    }

    fn http_client(&self) -> Result<Option<Box<dyn instant_acme::HttpClient>>, String> {
        let Some(path) = &self.settings.directory_roots else { return Ok(None) };
        let client: hyper_util::client::legacy::Client<_, instant_acme::BodyWrapper<hyper::body::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(directory_connector(directory_roots(path)?)?);
        Ok(Some(Box::new(client)))
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, String> {
        match self.http_client()? {
            Some(client) => Ok(Account::builder_with_http(client)),
            None => Account::builder().map_err(|e| format!("cannot set up the ACME client: {e}")),
        }
    }

    /// The account for the certificate's directory and email, reused when stored.
    async fn account(&self, cert: &PublicCert) -> Result<Account, String> {
        let key = format!("{}|{}", cert.acme_directory_url, cert.email);
        if let Some(json) = self.store.doc(KIND_ACCOUNT, &key).map_err(|e| e.to_string())? {
            if let Ok(creds) = serde_json::from_str::<AccountCredentials>(&json) {
                match self.builder()?.from_credentials(creds).await {
                    Ok(account) => return Ok(account),
                    Err(e) => {
                        tracing::warn!(directory = %cert.acme_directory_url, "stored account unusable ({e}); registering again")
                    }
                }
            }
        }
        let eab = self.eab.lock().unwrap_or_else(|e| e.into_inner()).get(&cert.cert_name).cloned();
        let eab = match eab {
            Some((kid, hmac)) => {
                use base64::Engine;
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(hmac.trim_end_matches('='))
                    .map_err(|e| format!("eab_hmac_key is not base64url: {e}"))?;
                Some(ExternalAccountKey::new(kid, &raw))
            }
            None => None,
        };
        let contact = format!("mailto:{}", cert.email);
        let (account, creds) = self
            .builder()?
            .create(
                &NewAccount { contact: &[&contact], terms_of_service_agreed: true, only_return_existing: false },
                cert.acme_directory_url.clone(),
                eab.as_ref(),
            )
            .await
            .map_err(|e| format!("cannot register an account at {}: {}", cert.acme_directory_url, causes(&e)))?;
        let json = serde_json::to_string(&creds).map_err(|e| e.to_string())?;
        self.store.put_doc(KIND_ACCOUNT, &key, &json).map_err(|e| e.to_string())?;
        tracing::info!(directory = %cert.acme_directory_url, email = %cert.email, "ACME account registered");
        Ok(account)
    }

    /// Orders, validates, finalizes and writes the cert dir.
    async fn order(&self, cert: &PublicCert) -> Result<Issued, OrderError> {
        let account = self.account(cert).await.map_err(OrderError::Setup)?;
        for d in &cert.domains {
            self.record_event("order", d);
        }
        let ids: Vec<Identifier> = cert.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
        // ARI (RFC 9773): a renewal names the certificate it replaces, when the server knows ARI.
        let mut replaces = None;
        if let Some(id) = cert.chain.as_deref().and_then(leaf_identifier) {
            if account.renewal_info(&id).await.is_ok() {
                replaces = Some(id);
            }
        }
        let new_order = || match &replaces {
            Some(id) => NewOrder::new(&ids).replaces(id.clone()),
            None => NewOrder::new(&ids),
        };
        let mut order = match account.new_order(&new_order()).await {
            Ok(order) => order,
            // The server forgot the account (a reset staging or test server): register again, once.
            Err(instant_acme::Error::Api(p))
                if p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist") || t.ends_with(":unauthorized")) =>
            {
                tracing::warn!(directory = %cert.acme_directory_url, "the ACME server does not know the stored account; registering again");
                let key = format!("{}|{}", cert.acme_directory_url, cert.email);
                self.store.delete_doc(KIND_ACCOUNT, &key).map_err(|e| OrderError::Setup(e.to_string()))?;
                let account = self.account(cert).await.map_err(OrderError::Setup)?;
                account.new_order(&new_order()).await.map_err(|e| OrderError::Setup(format!("new order: {e}")))?
            }
            Err(e) => return Err(OrderError::Setup(format!("new order: {}", causes(&e)))),
        };
        let mut tokens = Vec::new();
        let mut names = Vec::new();
        let mut records: Vec<(String, String)> = Vec::new();
        let outcome = async {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz.map_err(|e| OrderError::Challenge(format!("authorization: {e}")))?;
                if authz.status != AuthorizationStatus::Pending {
                    continue;
                }
                let name = match authz.identifier().identifier {
                    Identifier::Dns(d) => d.clone(),
                    other => format!("{other:?}"),
                };
                let kind = match cert.challenge {
                    Challenge::Http01 => ChallengeType::Http01,
                    Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                    Challenge::Dns01 => ChallengeType::Dns01,
                };
                let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                    OrderError::Challenge(format!("{name}: the ACME server offers no {:?} challenge", cert.challenge))
                })?;
                let key_auth = challenge.key_authorization();
                match cert.challenge {
                    Challenge::Http01 => {
                        let answer = key_auth.as_str().to_owned();
                        self.store.put_expiring(KIND_CHALLENGE, &challenge.token, &answer, CHALLENGE_TTL).map_err(
                            |e| OrderError::Challenge(format!("{name}: cannot store the HTTP-01 answer: {e}")),
                        )?;
                        self.http01.lock().unwrap_or_else(|e| e.into_inner()).insert(challenge.token.clone(), answer);
                        tokens.push(challenge.token.clone());
                    }
                    Challenge::TlsAlpn01 => {
                        let key = alpn_certificate(&name, key_auth.digest().as_ref()).map_err(OrderError::Challenge)?;
                        self.store.put_expiring(KIND_CHALLENGE_ALPN, &name, &key.pem, CHALLENGE_TTL).map_err(|e| {
                            OrderError::Challenge(format!("{name}: cannot store the TLS-ALPN-01 certificate: {e}"))
                        })?;
                        self.alpn.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), key);
                        names.push(name.clone());
                    }
                    Challenge::Dns01 => {
                        let dns = self.settings.dns.as_ref().ok_or_else(|| {
                            OrderError::Challenge(format!(
                                "{name}: dns-01 needs [acme.dns] (an RFC 2136 server and its TSIG key)"
                            ))
                        })?;
                        let record = format!("_acme-challenge.{}", name.trim_start_matches("*."));
                        let value = key_auth.dns_value();
                        dns.update(super::rfc2136::Change::Add, &record, &value)
                            .await
                            .map_err(OrderError::Challenge)?;
                        records.push((record, value));
                    }
                }
                challenge.set_ready().await.map_err(|e| OrderError::Challenge(format!("{name}: {e}")))?;
            }
            let timeout = self.settings.order_timeout.map_or(Duration::from_secs(60), |s| s.get());
            let status = order
                .poll_ready(&RetryPolicy::new().initial_delay(Duration::from_millis(50)).backoff(1.5).timeout(timeout))
                .await
                .map_err(|e| OrderError::Validation(e.to_string()))?;
            if status != OrderStatus::Ready {
                return Err(OrderError::Validation(format!("the order is {status:?}")));
            }
            Ok(())
        }
        .await;
        if let Some(dns) = &self.settings.dns {
            for (record, value) in &records {
                if let Err(e) = dns.update(super::rfc2136::Change::Delete, record, value).await {
                    tracing::warn!("cannot remove the DNS-01 record {record}: {e}");
                }
            }
        }
        {
            let mut http01 = self.http01.lock().unwrap_or_else(|e| e.into_inner());
            tokens.iter().for_each(|t| drop(http01.remove(t)));
            let mut alpn = self.alpn.lock().unwrap_or_else(|e| e.into_inner());
            names.iter().for_each(|n| drop(alpn.remove(n)));
        }
        for (kind, keys) in [(KIND_CHALLENGE, &tokens), (KIND_CHALLENGE_ALPN, &names)] {
            for key in keys {
                if let Err(e) = self.store.delete_doc(kind, key) {
                    tracing::warn!("cannot remove the {kind} {key} (it expires by itself): {e}");
                }
            }
        }
        if let Err(e) = outcome {
            if matches!(e, OrderError::Validation(_)) {
                cert.domains.iter().for_each(|d| self.record_event("failed", d));
            }
            return Err(e);
        }
        // A new key for every order.
        let issue = |e: &dyn std::fmt::Display| OrderError::Issue(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(|e| issue(&e))?;
        let params = rcgen::CertificateParams::new(cert.domains.clone()).map_err(|e| issue(&e))?;
        let csr = params.serialize_request(&key).map_err(|e| issue(&e))?;
        order.finalize_csr(csr.der()).await.map_err(|e| issue(&format!("finalize: {e}")))?;
        let chain = order
            .poll_certificate(
                &RetryPolicy::new().initial_delay(Duration::from_millis(50)).timeout(Duration::from_secs(60)),
            )
            .await
            .map_err(|e| issue(&format!("certificate download: {e}")))?;
        // Validation and the fsyncs of the cert-dir swap are blocking work.
        let (out_dir, chain_copy, key_pem) = (cert.out_dir.clone(), chain.clone(), key.serialize_pem());
        let info = tokio::task::spawn_blocking(move || write_public(&out_dir, &chain_copy, &key_pem))
            .await
            .map_err(|e| issue(&format!("cert dir writer: {e}")))?
            .map_err(OrderError::Issue)?;
        let window = match leaf_identifier(&chain) {
            Some(id) => {
                account.renewal_info(&id).await.ok().map(|(r, _)| (r.suggested_window.start, r.suggested_window.end))
            }
            None => None,
        };
        Ok(Issued { info, chain, window })
    }

    async fn serve_tls_alpn(self: Arc<Self>, socket: tokio::net::TcpListener, mut stop: watch::Receiver<bool>) {
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

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").field("state_dir", &self.state_dir).finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for AlpnResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello.server_name()?.to_owned();
        self.0.alpn_key(&name)
    }
}

/// A TLS-ALPN-01 validation certificate, ready to serve and as PEM for
/// edge sidecars (its key proves nothing beyond this one challenge).
#[derive(Clone)]
struct AlpnCert {
    key: Arc<rustls::sign::CertifiedKey>,
    pem: String,
}

/// The self-signed certificate RFC 8737 asks for: the name, and the key
/// authorization digest in a critical acmeIdentifier extension.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<AlpnCert, String> {
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

/// Validates a chain and key and writes them as a cert dir, with the top of
/// the chain as `ca.pem` so readers can verify the set on their own.
fn write_public(out_dir: &Path, chain_pem: &str, key_pem: &str) -> Result<CertInfo, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the chain is not PEM certificates: {e}"))?;
    let Some(leaf) = certs.first() else {
        return Err("the chain holds no certificate".into());
    };
    let top_pem = chain_pem.rfind("-----BEGIN CERTIFICATE-----").map_or("", |i| &chain_pem[i..]).to_owned();
    let set = PemSet { cert: chain_pem.to_owned(), key: Some(key_pem.to_owned()), ca: top_pem, crl: None };
    let raw = lanyard_sidecar::certdir::RawSet::from_pem(out_dir, &set);
    raw.validate(OffsetDateTime::now_utc()).map_err(|e| format!("refused: {e}"))?;
    CertDir::new(out_dir).write(&set).map_err(|e| format!("cannot write {}: {e}", out_dir.display()))?;
    CertInfo::from_der(leaf).map_err(|e| e.to_string())
}

/// An error with its causes: `client error (Connect): tcp connect error: ...`.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A per-certificate gauge: name, help, value.
type Gauge = (&'static str, &'static str, fn(&PublicCert) -> Option<i64>);

/// A certificate order's result.
struct Issued {
    info: CertInfo,
    chain: String,
    /// The server's suggested renewal window (ARI), when it has one.
    window: Option<(OffsetDateTime, OffsetDateTime)>,
}

/// The ARI identifier (AKI + serial) of the leaf of a PEM chain.
fn leaf_identifier(chain_pem: &str) -> Option<instant_acme::CertificateIdentifier<'static>> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()?.ok()?;
    instant_acme::CertificateIdentifier::try_from(&leaf).ok().map(|id| id.into_owned())
}

/// Uniform in [0, 1].
fn random_fraction() -> f64 {
    let mut r = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut r);
    f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX)
}

fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(12)).min(MAX_BACKOFF);
    base.mul_f64(0.9 + random_fraction() * 0.2)
}

impl PublicCert {
    fn new(name: &str, source: &str) -> Self {
        Self {
            cert_name: name.to_owned(),
            domains: Vec::new(),
            email: String::new(),
            acme_directory_url: String::new(),
            challenge: Challenge::Http01,
            out_dir: PathBuf::new(),
            source: source.to_owned(),
            status: "pending".into(),
            issued_at: None,
            expires_at: None,
            fingerprint: None,
            chain: None,
            next_attempt: now(),
            failures: 0,
            last_error: None,
            held_back: None,
        }
    }

    fn record_served(&mut self, info: &CertInfo, chain: &str) {
        self.issued_at = Some(rfc3339(info.not_before));
        self.expires_at = Some(rfc3339(info.not_after));
        self.fingerprint = Some(info.sha256.clone());
        self.chain = Some(chain.to_owned());
    }
}

/// The roots in `directory_roots` (Pebble's test CA).
fn directory_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read directory_roots {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{}: {e}", path.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// HTTPS to an ACME server trusting `roots`.
fn directory_connector(
    roots: rustls::RootCertStore,
) -> Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, String> {
    let tls = rustls::ClientConfig::builder_with_provider(lanyard_sidecar::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build())
}

/// Fetches the ACME directory at `url` within `limit`, trusting
/// `directory_roots` or the system's roots, and checks that it is one.
pub async fn probe_directory(settings: &AcmeSettings, url: &str, limit: std::time::Duration) -> Result<(), String> {
    let roots = match &settings.directory_roots {
        Some(path) => directory_roots(path)?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            roots
        }
    };
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<hyper::body::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(directory_connector(roots)?);
    let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let fetch = async {
        let response = client.get(uri).await.map_err(|e| format!("unreachable: {e:?}"))?;
        let status = response.status();
        let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(response.into_body(), 64 * 1024))
            .await
            .map_err(|e| format!("reading the directory: {e}"))?
            .to_bytes();
        let directory: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| format!("answered {status} with no JSON directory"))?;
        match directory.get("newNonce") {
            Some(_) if status.is_success() => Ok(()),
            _ => Err(format!("answered {status} with no newNonce: not an ACME directory")),
        }
    };
    tokio::time::timeout(limit, fetch).await.map_err(|_| format!("no answer within {limit:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_like_certificate_names_are_refused_and_never_delete_outside_their_dir() {
        for bad in ["..", ".", "a/b", "../state", "www.example.com", ""] {
            assert!(bad.parse::<CertName>().is_err(), "{bad:?} accepted");
            let toml = format!("name = {bad:?}\ndomains = [\"example.com\"]\nemail = \"a@example.com\"\n");
            let e = toml::from_str::<PublicConfig>(&toml).unwrap_err().to_string();
            assert!(e.contains("use letters, digits and '-'"), "{e}");
        }
        // A stored document whose name points elsewhere (written by an older
        // version) is forgotten without deleting that directory.
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let acme = Acme::new(store, AcmeSettings::default(), dir.path());
        let mut cert = PublicCert::new("..", "config");
        cert.out_dir = dir.path().join("public").join("..");
        acme.put(&cert).unwrap();
        acme.reconcile(&[]).unwrap();
        assert!(dir.path().join("lanyard.db").exists(), "the state directory was deleted");
        assert!(acme.get("..").unwrap().is_none());
    }

    #[test]
    fn holds_back_under_the_published_limits() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let acme = Acme::new(store, AcmeSettings::default(), dir.path());
        let cert = acme.create("shop", vec!["shop.example.com".into()], "a@example.com".into(), None).unwrap();
        assert!(acme.rate_limited(&cert).is_none());
        for _ in 0..MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR {
            acme.record_event("failed", "shop.example.com");
        }
        let (why, until) = acme.rate_limited(&cert).unwrap();
        assert!(why.contains("5 failed validations in the last hour"), "{why}");
        assert!(until > now() + 3500 && until <= now() + 3600, "{until}");
        // Orders count per registered domain, across names.
        let other = acme.create("api", vec!["api.example.com".into()], "a@example.com".into(), None).unwrap();
        assert!(acme.rate_limited(&other).is_none());
        for i in 0..MAX_ORDERS_PER_DOMAIN_PER_WEEK {
            acme.record_event("order", &format!("n{i}.example.com"));
        }
        let (why, _) = acme.rate_limited(&other).unwrap();
        assert!(why.starts_with("example.com: 50 orders in 7 days"), "{why}");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        let b = backoff(3);
        assert!(b >= Duration::from_millis(7200) && b <= Duration::from_millis(8800), "{b:?}");
        assert!(backoff(40) <= MAX_BACKOFF.mul_f64(1.1));
    }
}
