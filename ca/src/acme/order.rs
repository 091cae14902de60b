//! Accounts and orders against the ACME server, and the certificate they
//! end with.

use super::*;

/// Why an order failed, by stage. Only a failed validation counts against
/// the failed-validation limit.
#[derive(Debug, thiserror::Error)]
pub(super) enum OrderError {
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
    /// `ca serve` is stopping: the order was given up, its answers removed.
    #[error("cancelled: ca serve is stopping")]
    Cancelled,
}

impl Acme {
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
    /// Orders `cert`; when `stop` turns true first, gives the order up and
    /// still removes every answer it published (HTTP-01 tokens, TLS-ALPN-01
    /// certificates, DNS-01 TXT records).
    pub(super) async fn order(&self, cert: &PublicCert, mut stop: watch::Receiver<bool>) -> Result<Issued, OrderError> {
        let account = self.account(cert).await.map_err(OrderError::Setup)?;
        for d in &cert.domains {
            self.record_event(EventKind::Order, d);
        }
        let ids: Vec<Identifier> = cert
            .domains
            .iter()
            .map(|d| d.parse().map_or_else(|_| Identifier::Dns(d.clone()), Identifier::Ip))
            .collect();
        if let Some(profile) = &cert.profile {
            let mut offered: Vec<&str> = account.profiles().map(|p| p.name).collect();
            offered.sort_unstable();
            if !offered.contains(&profile.as_str()) {
                let offered =
                    if offered.is_empty() { "none (no meta.profiles)".to_owned() } else { offered.join(", ") };
                return Err(OrderError::Setup(format!(
                    "profile {profile:?} is not offered by {}: it offers {offered}; set `profile` to one of them or remove it",
                    cert.acme_directory_url
                )));
            }
        }
        // ARI (RFC 9773): a renewal names the certificate it replaces, when the server knows ARI.
        let mut replaces = None;
        if let Some(id) = cert.chain.as_deref().and_then(leaf_identifier) {
            if account.renewal_info(&id).await.is_ok() {
                replaces = Some(id);
            }
        }
        let new_order = || {
            let order = match &replaces {
                Some(id) => NewOrder::new(&ids).replaces(id.clone()),
                None => NewOrder::new(&ids),
            };
            // The same profile on every order, renewals included: never a silent fallback.
            match &cert.profile {
                Some(profile) => order.profile(profile),
                None => order,
            }
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
            Err(instant_acme::Error::Api(p)) if p.r#type.as_deref().is_some_and(|t| t.ends_with(":invalidProfile")) => {
                return Err(OrderError::Setup(format!(
                    "the ACME server refused profile {:?} (invalidProfile): {}",
                    cert.profile.as_deref().unwrap_or("(default)"),
                    p.detail.as_deref().unwrap_or("no detail")
                )))
            }
            Err(e) => return Err(OrderError::Setup(format!("new order: {}", causes(&e)))),
        };
        let mut tokens = Vec::new();
        let mut names = Vec::new();
        let mut records: Vec<(String, String)> = Vec::new();
        let validated = async {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz.map_err(|e| OrderError::Challenge(format!("authorization: {e}")))?;
                if authz.status != AuthorizationStatus::Pending {
                    continue;
                }
                let name = match authz.identifier().identifier {
                    Identifier::Dns(d) => d.clone(),
                    Identifier::Ip(ip) => ip.to_string(),
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
                        dns.update(super::dns::Change::Add, &record, &value).await.map_err(OrderError::Challenge)?;
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
        };
        // Cancelling drops `validated`, and with it its borrows of what it
        // published so far, which the clean-up below then removes.
        let outcome = tokio::select! {
            outcome = validated => outcome,
            _ = stop.wait_for(|s| *s) => Err(OrderError::Cancelled),
        };
        if let Some(dns) = &self.settings.dns {
            for (record, value) in &records {
                if let Err(e) = dns.update(super::dns::Change::Delete, record, value).await {
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
                cert.domains.iter().for_each(|d| self.record_event(EventKind::Failed, d));
            }
            return Err(e);
        }
        // A new key for every order.
        let issue = |e: &dyn std::fmt::Display| OrderError::Issue(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(|e| issue(&e))?;
        let mut params = rcgen::CertificateParams::new(cert.domains.clone()).map_err(|e| issue(&e))?;
        // No subject: rcgen's default CN ("rcgen self signed cert") is not one of the
        // names, and servers that check the CSR (Boulder, Lanyard's own) refuse it.
        params.distinguished_name = rcgen::DistinguishedName::new();
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
        let ari = match leaf_identifier(&chain) {
            Some(id) => account.renewal_info(&id).await.ok(),
            None => None,
        };
        Ok(Issued { info, chain, ari: ari.map(Ari::from) })
    }

    /// Asks the server's ARI whether `cert` should renew earlier than planned.
    pub(super) async fn renewal_info(&self, cert: &PublicCert) -> Result<Ari, String> {
        let id = cert.chain.as_deref().and_then(leaf_identifier).ok_or("no served certificate")?;
        let account = self.account(cert).await?;
        account.renewal_info(&id).await.map(Ari::from).map_err(|e| causes(&e))
    }
}

/// Validates a chain and key and writes them as a cert dir, with the top of
/// the chain as `ca.pem` so readers can verify the set on their own.
pub(super) fn write_public(out_dir: &Path, chain_pem: &str, key_pem: &str) -> Result<CertInfo, String> {
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

/// A certificate order's result.
pub(super) struct Issued {
    pub(super) info: CertInfo,
    pub(super) chain: String,
    /// The server's renewal information, when it offers ARI.
    pub(super) ari: Option<Ari>,
}

/// What ARI (RFC 9773) answered: the suggested window, and when to ask again.
pub(super) struct Ari {
    pub(super) start: OffsetDateTime,
    pub(super) end: OffsetDateTime,
    pub(super) retry_after: Duration,
}

impl From<(instant_acme::RenewalInfo, Duration)> for Ari {
    fn from((info, retry_after): (instant_acme::RenewalInfo, Duration)) -> Self {
        Self { start: info.suggested_window.start, end: info.suggested_window.end, retry_after }
    }
}

impl Ari {
    /// A random point of the window (RFC 9773 §4.2), now when the window has passed.
    pub(super) fn renewal_time(&self) -> i64 {
        if self.end.unix_timestamp() <= now() {
            return now();
        }
        let span = (self.end - self.start).whole_seconds().max(1);
        self.start.unix_timestamp() + (random_fraction() * span as f64) as i64
    }

    /// When to ask again: the server's Retry-After (RFC 9773 §4.3), within
    /// ten seconds and six hours.
    pub(super) fn next_check(&self) -> i64 {
        now() + self.retry_after.as_secs().clamp(10, 6 * 3600) as i64
    }
}

/// The ARI identifier (AKI + serial) of the leaf of a PEM chain.
fn leaf_identifier(chain_pem: &str) -> Option<instant_acme::CertificateIdentifier<'static>> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()?.ok()?;
    instant_acme::CertificateIdentifier::try_from(&leaf).ok().map(|id| id.into_owned())
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
