//! Public certificates from an ACME CA (Let's Encrypt; Pebble in tests),
//! through the same cert-dir contract and reload path as internal ones.
//!
//! Every public certificate is a document in the store (`public_cert`) that
//! carries its own retry queue: `next_attempt`, `failures` and the last
//! error, so a restart neither loses a pending order nor hammers the ACME
//! server. Accounts are stored per directory and email and reused.
//! A failure never touches the cert dir that is being served.
//!
//! - `model`: the certificate document, its status and source, the config;
//! - `repo`: the documents in the store, corrupt ones reported;
//! - `order`: accounts and orders against the ACME server;
//! - `challenges`: HTTP-01 and TLS-ALPN-01 answers, for every replica;
//! - `limits`: the published rate limits and the backoff;
//! - `dns`: DNS-01 through RFC 2136 updates; `domain`: registered domains;
//! - `on_demand`: certificates ordered when an edge first sees a name.

use std::collections::{HashMap, HashSet};
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

use crate::store::Store;

mod challenges;
pub mod dns;
pub mod domain;
mod limits;
mod model;
mod on_demand;
mod order;
mod repo;

use challenges::alpn_certificate;
use challenges::AlpnCert;
use domain::registered_domain;
use limits::{backoff, random_fraction, EventKind};
pub use model::*;
pub use on_demand::{OnDemand, OnDemandAnswer, OnDemandConfig};
pub use order::probe_directory;
use order::{write_public, Ari, Issued, OrderError};
pub use repo::PublicCerts;
use repo::{CHALLENGE_TTL, KIND_ACCOUNT, KIND_CHALLENGE, KIND_CHALLENGE_ALPN, KIND_EVENT};

/// The ACME side of `ca serve`.
pub struct Acme {
    store: Arc<dyn Store>,
    certs: PublicCerts,
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
    /// Corrupt documents already logged (by their error), so each is logged once.
    corrupt: Mutex<HashSet<String>>,
    /// Bumped on every document this replica stores, for waiters.
    stored: watch::Sender<u64>,
}

pub(crate) fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

impl Acme {
    /// The ACME manager over `store`.
    pub fn new(store: Arc<dyn Store>, settings: AcmeSettings, state_dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            certs: PublicCerts::new(store.clone()),
            store,
            settings,
            state_dir: state_dir.to_owned(),
            http01: Mutex::default(),
            alpn: Mutex::default(),
            eab: Mutex::default(),
            wake: Notify::new(),
            unrecorded: Mutex::default(),
            orders: Default::default(),
            corrupt: Mutex::default(),
            stored: watch::Sender::new(0),
        })
    }

    /// Checks `domains` for a new or changed certificate.
    pub fn check_domains(&self, domains: &[String], challenge: Challenge) -> Result<(), PublicError> {
        if domains.is_empty() {
            return Err(PublicError::Invalid("no domain: give `domain` or `domains`".into()));
        }
        for d in domains {
            if d.parse::<std::net::IpAddr>().is_ok() {
                if challenge == Challenge::Dns01 {
                    return Err(PublicError::Invalid(format!(
                        "{d}: an IP address is proven by http-01 or tls-alpn-01, not dns-01 (RFC 8738)"
                    )));
                }
                continue;
            }
            let base = d.strip_prefix("*.").unwrap_or(d);
            if base.parse::<DnsName>().is_err() || !base.contains('.') || base.parse::<std::net::IpAddr>().is_ok() {
                return Err(PublicError::Invalid(format!(
                    "malformed domain {d:?}: give a DNS name such as www.example.com (or *.example.com with dns-01), or an IP address"
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
            let mut cert = existing.clone().unwrap_or_else(|| PublicCert::new(c.name.as_str(), CertSource::Config));
            let changed =
                cert.domains != c.domains || cert.acme_directory_url != directory || cert.profile != c.profile;
            cert.domains = c.domains.clone();
            cert.email = c.email.clone();
            cert.acme_directory_url = directory;
            cert.challenge = c.challenge;
            cert.profile = c.profile.clone();
            cert.out_dir = out_dir;
            if changed && existing.is_some() {
                cert.next_attempt = now();
            }
            if Some(&cert) != existing.as_ref() {
                self.put(&cert)?;
            }
        }
        for cert in self.list()? {
            if cert.source == CertSource::Config && !configured.iter().any(|c| c.name.as_str() == cert.cert_name) {
                self.remove(&cert.cert_name)?;
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Every public certificate; a corrupt document is an error naming it.
    pub fn list(&self) -> Result<Vec<PublicCert>, PublicError> {
        self.certs.list()
    }

    /// Every document: the certificate, or why it cannot be read.
    pub fn scan(&self) -> Result<Vec<Result<PublicCert, PublicError>>, PublicError> {
        self.certs.scan()
    }

    /// One public certificate.
    pub fn get(&self, name: &str) -> Result<Option<PublicCert>, PublicError> {
        self.certs.get(name)
    }

    /// The readable certificates; each corrupt document is logged, once.
    fn readable(&self) -> Result<Vec<PublicCert>, PublicError> {
        let mut corrupt = self.corrupt.lock().unwrap_or_else(|e| e.into_inner());
        let mut certs = Vec::new();
        for scanned in self.certs.scan()? {
            match scanned {
                Ok(cert) => certs.push(cert),
                // The message names the document and what is wrong with it.
                Err(e) => {
                    if corrupt.insert(e.to_string()) {
                        tracing::error!("{e}; it is not ordered until then");
                    }
                }
            }
        }
        Ok(certs)
    }

    /// Stores `cert`; once stored, no next attempt waits in memory for it.
    fn put(&self, cert: &PublicCert) -> Result<(), PublicError> {
        self.certs.put(cert)?;
        self.unrecorded.lock().unwrap_or_else(|e| e.into_inner()).remove(&cert.cert_name);
        self.stored.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes whenever this replica stores a certificate's document.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.stored.subscribe()
    }

    /// Removes a certificate, its state and its cert dir.
    pub fn remove(&self, name: &str) -> Result<(), PublicError> {
        let cert = self.get(name)?.ok_or_else(|| PublicError::Unknown(name.to_owned()))?;
        self.certs.delete(name)?;
        // Only the cert dir Lanyard made for this name, never a path that
        // merely starts like one (`public/..`): STATE/public/NAME, or an
        // on-demand certificate's DIR/DOMAIN.
        let own = match cert.source {
            CertSource::OnDemand => {
                let domain = cert.domains.first().map(String::as_str).unwrap_or_default();
                domain.parse::<DnsName>().is_ok() && cert.out_dir.file_name() == Some(std::ffi::OsStr::new(domain))
            }
            _ => name.parse::<CertName>().is_ok() && cert.out_dir == self.state_dir.join("public").join(name),
        };
        if own {
            // Renamed first, so that readers see the whole cert dir go at once.
            let hidden = cert.out_dir.file_name().map(|f| format!(".{}.removed", f.to_string_lossy()));
            let trash =
                hidden.map(|h| cert.out_dir.with_file_name(h)).filter(|t| std::fs::rename(&cert.out_dir, t).is_ok());
            let _ = std::fs::remove_dir_all(trash.as_deref().unwrap_or(&cert.out_dir));
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
        profile: Option<String>,
    ) -> Result<PublicCert, PublicError> {
        name.parse::<CertName>()?;
        if self.get(name)?.is_some() {
            return Err(PublicError::Exists(name.to_owned()));
        }
        if !email.contains('@') {
            return Err(PublicError::Invalid(format!("email {email:?} is not an address")));
        }
        self.check_domains(&domains, Challenge::Http01)?;
        directory.as_deref().map(model::check_directory_url).transpose()?;
        let mut cert = PublicCert::new(name, CertSource::Api);
        cert.domains = domains;
        cert.email = email;
        cert.acme_directory_url = directory.unwrap_or_else(|| LETS_ENCRYPT.into());
        cert.profile = profile;
        cert.out_dir = self.state_dir.join("public").join(name);
        self.put(&cert)?;
        self.wake.notify_one();
        Ok(cert)
    }

    /// `POST /certificates/{name}/renew`: order again now.
    pub fn renew_now(&self, name: &str) -> Result<PublicCert, PublicError> {
        let mut cert = self.get(name)?.ok_or_else(|| PublicError::Unknown(name.to_owned()))?;
        if cert.source == CertSource::Upload {
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

    /// `PUT /certificates/{name}`: see [`PublicCerts::upload`].
    pub fn upload(&self, name: &str, chain_pem: &str, key_pem: &str) -> Result<PublicCert, PublicError> {
        let cert = self.certs.upload(&self.state_dir, name, chain_pem, key_pem)?;
        self.unrecorded.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        Ok(cert)
    }

    /// Writes orders by result, and per certificate its expiry, next
    /// attempt, consecutive failures and whether the CA holds back.
    pub fn encode_metrics(&self, enc: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use lanyard_sidecar::metrics::{counters, gauges};
        let orders = ["success", "failure"]
            .iter()
            .zip(&self.orders)
            .map(|(result, n)| ([("result", *result)], n.load(std::sync::atomic::Ordering::Relaxed)));
        counters(enc, "acme_orders", "ACME orders, by result.", orders)?;
        let certs = self.readable().unwrap_or_default();
        let gauge_families: [Gauge; 4] = [
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
        for (name, help, value) in gauge_families {
            let samples = certs.iter().filter_map(|c| Some(([("cert", c.cert_name.as_str())], value(c)?)));
            gauges(enc, &format!("acme_{name}"), help, samples)?;
        }
        Ok(())
    }

    /// Runs orders when they are due until `stop` turns true.
    /// Orders only while `leader` leads; every replica answers challenges.
    pub async fn run(self: Arc<Self>, leader: crate::serve::leader::Leader, mut stop: watch::Receiver<bool>) {
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
            let due: Vec<PublicCert> = match self.readable() {
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
                self.attempt(cert, stop.clone()).await;
            }
            self.check_renewal_info().await;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One order for `cert`, recorded in its document whatever happens.
    async fn attempt(&self, mut cert: PublicCert, stop: watch::Receiver<bool>) {
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
        let result = match self.order(&cert, stop).await {
            // Not a failure: the next start orders again, as it was due.
            Err(OrderError::Cancelled) => {
                return tracing::info!(identity = %cert.cert_name, "order given up: ca serve is stopping");
            }
            result => result,
        };
        // The document may have changed meanwhile (API); keep its edits.
        let mut latest = match self.get(&cert.cert_name) {
            Ok(Some(c)) if c.domains == cert.domains => c,
            // Domains changed meanwhile: that change already asked for a new order.
            _ => return,
        };
        // A renewal asked for during the order (API) must not be lost.
        let requested = (latest.next_attempt != cert.next_attempt).then_some(latest.next_attempt);
        match result {
            Ok(Issued { info, chain, ari }) => {
                self.orders[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(identity = %latest.cert_name, serial = %info.serial, not_after = %rfc3339(info.not_after), took = ?started.elapsed(), event = "issued", "public certificate issued");
                latest.status = CertStatus::Valid;
                latest.record_served(&info, &chain);
                latest.failures = 0;
                latest.last_error = None;
                latest.ari_check_at = ari.as_ref().map(Ari::next_check);
                latest.next_attempt = match ari {
                    // Inside the window the server suggests, at a random point.
                    Some(ari) if ari.end > ari.start => ari.renewal_time(),
                    // Renew when a third of the life actually issued remains:
                    // 2 days before the end of a 6-day certificate, 21 of a 64-day one.
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
                    latest.status = CertStatus::Failed;
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

    /// Asks ARI again for every certificate whose `ari_check_at` has come:
    /// a window the server pulled forward (a revocation, a key rotation)
    /// moves the next order forward.
    async fn check_renewal_info(&self) {
        let asking: Vec<PublicCert> = self
            .readable()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.status == CertStatus::Valid && c.ari_check_at.is_some_and(|at| at <= now()))
            .collect();
        for cert in asking {
            let answer = self.renewal_info(&cert).await;
            let Ok(Some(mut latest)) = self.get(&cert.cert_name) else { continue };
            match answer {
                Ok(ari) => {
                    let at = ari.renewal_time();
                    if at < latest.next_attempt {
                        tracing::info!(identity = %latest.cert_name, renew_at = at, was = latest.next_attempt, "ARI moved the renewal forward");
                        latest.next_attempt = at;
                        self.wake.notify_one();
                    }
                    latest.ari_check_at = Some(ari.next_check());
                }
                Err(e) => {
                    tracing::warn!(identity = %latest.cert_name, "ARI check failed: {e}; asking again in an hour");
                    latest.ari_check_at = Some(now() + 3600);
                }
            }
            self.record_attempt(&latest);
        }
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
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").field("state_dir", &self.state_dir).finish_non_exhaustive()
    }
}

/// A per-certificate gauge: name, help, value.
type Gauge = (&'static str, &'static str, fn(&PublicCert) -> Option<i64>);

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
        let mut cert = PublicCert::new("..", CertSource::Config);
        cert.out_dir = dir.path().join("public").join("..");
        acme.put(&cert).unwrap();
        acme.reconcile(&[]).unwrap();
        assert!(dir.path().join("lanyard.db").exists(), "the state directory was deleted");
        assert!(acme.get("..").unwrap().is_none());
    }
}
