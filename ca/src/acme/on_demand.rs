//! On-demand certificates (`[on_demand]`): an edge that gets a ClientHello
//! for a name it has no certificate for asks the CA
//! (`GET /.well-known/lanyard-on-demand/NAME` on the plain-HTTP listener),
//! and the CA orders it once, for every edge and every concurrent request.
//!
//! - A name is ordered only when `allow` admits it and, with `ask`, when
//!   `ask?domain=NAME` answers 200. Refusals are counted, never ordered;
//!   an `ask` refusal is remembered for a minute, so retries of a refused
//!   name do not reach the app.
//! - At most `max_new_per_hour` new names are ordered per hour (counted in
//!   the store, across replicas); per name, one order at a time, then the
//!   backoff and the failed-validation limit of every public certificate.
//! - The answer waits up to `wait` for the certificate.
//! - The certificate goes to `out_dir/NAME`, which edges read as their
//!   `on_demand.dir/NAME`. Each request marks the name used; a name that no
//!   edge used for `idle`, or that `allow` no longer admits, is removed
//!   with its cert dir.
//!
//! The answer carries no key: the certificate reaches edges through the
//! cert dir, as every other one does.

use std::sync::atomic::{AtomicU64, Ordering};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use lanyard_sidecar::cli::serde_str;
use lanyard_sidecar::span::Span;

use super::*;
use crate::allow::AllowList;

/// Where a name was last used, per on-demand certificate: unix seconds.
const KIND_USED: &str = "on_demand_used";
/// Longest wait for the `ask` endpoint.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an `ask` refusal is remembered, so that a client retrying a
/// refused name (a browser, a monitor, a scanner) does not call the app
/// again on every handshake.
const ASK_REFUSAL_MEMORY: Duration = Duration::from_secs(60);
/// Most refusals remembered; past it, expired ones are dropped, and while
/// it stays full a new refusal is simply not remembered.
const ASK_REFUSALS_KEPT: usize = 10_000;

/// `[on_demand]` in `lanyard.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDemandConfig {
    /// Names that may be ordered: a name or a glob (`*.apps.example.com`).
    pub allow: Vec<String>,
    /// `http://` URL asked `?domain=NAME` before a new name is ordered; only 200 admits it.
    #[serde(default)]
    pub ask: Option<String>,
    /// Account contact.
    pub email: String,
    /// ACME directory; default Let's Encrypt production.
    #[serde(default, deserialize_with = "model::checked_directory_url")]
    pub directory_url: Option<String>,
    /// Use Let's Encrypt staging instead of production.
    #[serde(default)]
    pub staging: bool,
    /// How names are proven.
    #[serde(default)]
    pub challenge: Challenge,
    /// The ACME profile to order.
    #[serde(default)]
    pub profile: Option<String>,
    /// Where cert dirs go, one per name (default `STATE/on-demand`).
    #[serde(default)]
    pub out_dir: Option<PathBuf>,
    /// How long a request waits for the certificate.
    #[serde(default = "default_wait", deserialize_with = "serde_str::one")]
    pub wait: Span,
    /// Most new names ordered per hour, over all replicas.
    #[serde(default = "default_max_new_per_hour")]
    pub max_new_per_hour: usize,
    /// A name no edge used for this long is removed.
    #[serde(default = "default_idle", deserialize_with = "serde_str::one")]
    pub idle: Span,
}

fn default_wait() -> Span {
    "10s".parse().expect("valid")
}
fn default_max_new_per_hour() -> usize {
    60
}
fn default_idle() -> Span {
    "30d".parse().expect("valid")
}

/// The answer to an edge.
#[derive(Clone, Debug, PartialEq)]
pub enum OnDemandAnswer {
    /// The certificate is in this cert dir.
    Ready(PathBuf),
    /// Never ordered, and why.
    Refused(Refusal, String),
    /// Not now: too many new names, an order still running, or a failed one
    /// backing off. Why, and when to ask again (unix seconds).
    NotYet(String, i64),
}

/// Why a name was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a DNS name with at least two labels.
    Invalid,
    /// `allow` does not admit it.
    Policy,
    /// The `ask` endpoint did not answer 200.
    Ask,
}

/// Request outcomes, as the `result` label of `lanyard_ca_on_demand_requests_total`.
const RESULTS: [&str; 6] = ["ready", "refused_invalid", "refused_policy", "refused_ask", "limited", "pending"];

/// The on-demand side of `ca serve`.
pub struct OnDemand {
    config: OnDemandConfig,
    allow: AllowList,
    ask: Option<hyper::Uri>,
    out_dir: PathBuf,
    directory: String,
    acme: Arc<Acme>,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Serialises the check-and-create of new names in this replica.
    creating: tokio::sync::Mutex<()>,
    /// Names `ask` refused, with when its answer was given and why.
    ask_refusals: Mutex<HashMap<String, (std::time::Instant, String)>>,
    results: [AtomicU64; RESULTS.len()],
    /// Removals because no edge used the name, and because `allow` no longer admits it.
    removed: [AtomicU64; 2],
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand").field("allow", &self.config.allow).finish_non_exhaustive()
    }
}

impl OnDemand {
    /// Checks `config`; an error names the field and what to write.
    pub fn new(config: OnDemandConfig, acme: Arc<Acme>, state_dir: &Path) -> Result<Arc<Self>, String> {
        if config.allow.is_empty() {
            return Err("allow is empty: list the names edges may order, e.g. [\"*.apps.example.com\"]".into());
        }
        let allow = AllowList::parse(&config.allow)?;
        let ask = config
            .ask
            .as_deref()
            .map(|url| {
                url.parse::<hyper::Uri>().ok().filter(|u| u.scheme_str() == Some("http") && u.host().is_some()).ok_or_else(
                    || format!("ask = {url:?} is not an http:// URL: give the app's endpoint, e.g. http://app:8080/allowed"),
                )
            })
            .transpose()?;
        if !config.email.contains('@') {
            return Err(format!("email = {:?} is not an address", config.email));
        }
        let out_dir = config.out_dir.clone().unwrap_or_else(|| state_dir.join("on-demand"));
        Ok(Arc::new(Self {
            directory: model::directory(config.directory_url.as_deref(), config.staging),
            config,
            allow,
            ask,
            out_dir,
            acme,
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
            creating: tokio::sync::Mutex::new(()),
            ask_refusals: Default::default(),
            results: Default::default(),
            removed: Default::default(),
        }))
    }

    /// The certificate's name in the store: `on-demand-` and a hash of the
    /// domain, since a domain is not a valid certificate name.
    fn cert_name(domain: &str) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, domain.as_bytes());
        format!("on-demand-{}", &lanyard_sidecar::certinfo::hex(digest.as_ref())[..20])
    }

    /// Answers an edge asking for `name`, waiting up to `wait` for the certificate.
    pub async fn request(self: Arc<Self>, name: String) -> OnDemandAnswer {
        let answer = self.clone().answer(name.to_ascii_lowercase()).await;
        let result = match &answer {
            OnDemandAnswer::Ready(_) => "ready",
            OnDemandAnswer::Refused(Refusal::Invalid, _) => "refused_invalid",
            OnDemandAnswer::Refused(Refusal::Policy, _) => "refused_policy",
            OnDemandAnswer::Refused(Refusal::Ask, _) => "refused_ask",
            OnDemandAnswer::NotYet(why, _) if why.starts_with("limited") => "limited",
            OnDemandAnswer::NotYet(..) => "pending",
        };
        let i = RESULTS.iter().position(|r| *r == result).expect("listed");
        self.results[i].fetch_add(1, Ordering::Relaxed);
        answer
    }

    async fn answer(self: Arc<Self>, name: String) -> OnDemandAnswer {
        if name.parse::<DnsName>().is_err() || !name.contains('.') || name.contains('*') || name.ends_with('.') {
            return OnDemandAnswer::Refused(
                Refusal::Invalid,
                format!("{name:?} is not a DNS name such as www.example.com"),
            );
        }
        let cert_name = Self::cert_name(&name);
        let existing = match self
            .blocking({
                let cert_name = cert_name.clone();
                move |this| this.acme.get(&cert_name)
            })
            .await
        {
            Ok(existing) => existing,
            Err(e) => return OnDemandAnswer::NotYet(format!("the store failed: {e}"), now() + 1),
        };
        if existing.is_none() {
            if !self.allow.admits_name(&name) {
                tracing::info!(%name, "on-demand: refused by allow");
                let why = format!("{name} is not allowed by [on_demand] allow = {:?}", self.allow.entries());
                return OnDemandAnswer::Refused(Refusal::Policy, why);
            }
            if let Err(why) = self.ask(&name).await {
                tracing::info!(%name, "on-demand: refused: {why}");
                return OnDemandAnswer::Refused(Refusal::Ask, why);
            }
            let _creating = self.creating.lock().await;
            let created = self.blocking({
                let (name, cert_name) = (name.clone(), cert_name.clone());
                move |this| this.create(&name, &cert_name)
            });
            match created.await {
                Ok(None) => {}
                Ok(Some((why, until))) => return OnDemandAnswer::NotYet(why, until),
                Err(e) => return OnDemandAnswer::NotYet(format!("cannot order {name}: {e}"), now() + 1),
            }
        }
        self.wait_for(cert_name).await
    }

    /// Runs `f` off the async runtime: the store's calls block.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> Result<T, PublicError> + Send + 'static,
    ) -> Result<T, PublicError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// Whether the `ask` endpoint admits `name`; the refusal says why. A
    /// refusal (an answer other than 200) is remembered for
    /// [`ASK_REFUSAL_MEMORY`]; an endpoint that cannot be reached is asked
    /// again next time.
    async fn ask(&self, name: &str) -> Result<(), String> {
        let Some(ask) = &self.ask else { return Ok(()) };
        if let Some((at, why)) = self.ask_refusals.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            if at.elapsed() < ASK_REFUSAL_MEMORY {
                return Err(format!("{why} (remembered for {ASK_REFUSAL_MEMORY:?})"));
            }
        }
        let answer = self.ask_endpoint(ask, name).await;
        if let Err((true, why)) = &answer {
            let mut refusals = self.ask_refusals.lock().unwrap_or_else(|e| e.into_inner());
            if refusals.len() >= ASK_REFUSALS_KEPT {
                refusals.retain(|_, (at, _)| at.elapsed() < ASK_REFUSAL_MEMORY);
            }
            if refusals.len() < ASK_REFUSALS_KEPT {
                refusals.insert(name.to_owned(), (std::time::Instant::now(), why.clone()));
            }
        }
        answer.map_err(|(_, why)| why)
    }

    /// One call to the `ask` endpoint; an error says whether it was an
    /// answer (`true`: a refusal to remember) and why.
    async fn ask_endpoint(&self, ask: &hyper::Uri, name: &str) -> Result<(), (bool, String)> {
        let sep = if ask.query().is_some() { '&' } else { '?' };
        let uri: hyper::Uri =
            format!("{ask}{sep}domain={name}").parse().map_err(|e| (false, format!("ask URL for {name}: {e}")))?;
        match tokio::time::timeout(ASK_TIMEOUT.min(self.config.wait.get()), self.client.get(uri)).await {
            Ok(Ok(r)) if r.status() == hyper::StatusCode::OK => Ok(()),
            Ok(Ok(r)) => {
                let status = r.status();
                let _ = r.into_body().collect().await;
                Err((true, format!("the ask endpoint {ask} answered {status} for {name}")))
            }
            Ok(Err(e)) => {
                Err((false, format!("cannot reach the ask endpoint {ask}: {e}; no name is ordered until it answers")))
            }
            Err(_) => Err((false, format!("the ask endpoint {ask} did not answer within {ASK_TIMEOUT:?}"))),
        }
    }

    /// Stores a new on-demand certificate for `name` unless one exists (made
    /// meanwhile by another request), or the reason and time to wait when
    /// too many new names were ordered this hour.
    fn create(&self, name: &str, cert_name: &str) -> Result<Option<(String, i64)>, PublicError> {
        if self.acme.get(cert_name)?.is_some() {
            return Ok(None);
        }
        let recent = self.acme.event_times(EventKind::OnDemand, now() - 3600)?;
        if recent.len() >= self.config.max_new_per_hour {
            let until = recent[0] + 3600;
            let why = format!(
                "limited: {} new names ordered on demand in the last hour (max_new_per_hour = {})",
                recent.len(),
                self.config.max_new_per_hour
            );
            tracing::warn!(%name, "on-demand: {why}");
            return Ok(Some((why, until)));
        }
        self.acme.check_domains(&[name.to_owned()], self.config.challenge)?;
        let mut cert = PublicCert::new(cert_name, CertSource::OnDemand);
        cert.domains = vec![name.to_owned()];
        cert.email = self.config.email.clone();
        cert.acme_directory_url = self.directory.clone();
        cert.challenge = self.config.challenge;
        cert.profile = self.config.profile.clone();
        cert.out_dir = self.out_dir.join(name);
        self.acme.record_event(EventKind::OnDemand, name);
        self.mark_used(cert_name)?;
        self.acme.put(&cert)?;
        self.acme.wake.notify_one();
        tracing::info!(%name, identity = cert_name, "on-demand: ordering a new name");
        Ok(None)
    }

    /// Records that an edge uses `cert_name` now: at most once a minute,
    /// and more often when `idle` is shorter than four minutes.
    fn mark_used(&self, cert_name: &str) -> Result<(), PublicError> {
        let resolution = (self.config.idle.get().as_secs() as i64 / 4).min(60);
        let last = self.acme.store.doc(KIND_USED, cert_name)?.and_then(|t| t.parse::<i64>().ok());
        if last.is_none_or(|t| t + resolution <= now()) {
            self.acme.store.put_doc(KIND_USED, cert_name, &now().to_string())?;
        }
        Ok(())
    }

    /// Waits up to `wait` for `cert_name` to be issued.
    async fn wait_for(self: Arc<Self>, cert_name: String) -> OnDemandAnswer {
        let deadline = tokio::time::Instant::now() + self.config.wait.get();
        let mut stored = self.acme.subscribe();
        let mut marked = false;
        loop {
            let seen = self.blocking({
                let (cert_name, mark) = (cert_name.clone(), !marked);
                move |this| {
                    if mark {
                        this.mark_used(&cert_name)?;
                    }
                    this.acme.get(&cert_name)
                }
            });
            let cert = match seen.await {
                Ok(Some(cert)) => cert,
                Ok(None) => return OnDemandAnswer::NotYet("removed while waiting; ask again".into(), now() + 1),
                Err(e) => return OnDemandAnswer::NotYet(format!("the store failed: {e}"), now() + 1),
            };
            marked = true;
            if cert.chain.is_some() {
                return OnDemandAnswer::Ready(cert.out_dir);
            }
            // A failed order backs off: say so now instead of holding the handshake.
            if let Some(why) = cert.held_back.clone().or_else(|| cert.last_error.clone()) {
                if cert.next_attempt > now() {
                    return OnDemandAnswer::NotYet(why, cert.next_attempt);
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                let why = format!("ordered; not issued within {}", self.config.wait);
                return OnDemandAnswer::NotYet(why, now() + 1);
            }
            // Another replica's writes are seen by polling.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), stored.changed()).await;
        }
    }

    /// Removes, while `leader` leads, the names no edge used for `idle` and
    /// those `allow` no longer admits, until `stop` turns true.
    pub async fn run(self: Arc<Self>, leader: crate::serve::leader::Leader, mut stop: watch::Receiver<bool>) {
        let every = (self.config.idle.get() / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(every) => {}
            }
            if !leader.is_leader() {
                continue;
            }
            if let Err(e) = self.blocking(|this| this.remove_unused()).await {
                tracing::error!("on-demand clean-up: {e}");
            }
        }
    }

    fn remove_unused(&self) -> Result<(), PublicError> {
        let idle = self.config.idle.get().as_secs() as i64;
        for cert in self.acme.list()?.into_iter().filter(|c| c.source == CertSource::OnDemand) {
            let name = cert.domains.first().cloned().unwrap_or_default();
            let used = self.acme.store.doc(KIND_USED, &cert.cert_name)?.and_then(|t| t.parse::<i64>().ok());
            let (reason, why) = if !self.allow.admits_name(&name) {
                (1, format!("[on_demand] allow = {:?} no longer admits it", self.allow.entries()))
            } else if used.unwrap_or(0) + idle < now() {
                (0, format!("no edge used it for {}", self.config.idle))
            } else {
                continue;
            };
            self.acme.remove(&cert.cert_name)?;
            self.acme.store.delete_doc(KIND_USED, &cert.cert_name)?;
            self.removed[reason].fetch_add(1, Ordering::Relaxed);
            tracing::info!(%name, identity = %cert.cert_name, event = "on_demand_removed", "on-demand certificate removed: {why}");
        }
        Ok(())
    }

    /// Writes requests by result and removals.
    pub fn encode_metrics(&self, enc: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use lanyard_sidecar::metrics::counters;
        let results = RESULTS.iter().zip(&self.results).map(|(r, n)| ([("result", *r)], n.load(Ordering::Relaxed)));
        counters(enc, "on_demand_requests", "On-demand requests from edges, by result.", results)?;
        let removed = ["idle", "not_allowed"]
            .iter()
            .zip(&self.removed)
            .map(|(r, n)| ([("reason", *r)], n.load(Ordering::Relaxed)));
        counters(enc, "on_demand_removed", "On-demand certificates removed, by reason.", removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_demand(extra: &str) -> (tempfile::TempDir, Arc<OnDemand>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let acme = Acme::new(store, AcmeSettings::default(), dir.path());
        let toml = format!("allow = [\"*.apps.example.test\"]\nemail = \"ops@example.test\"\nwait = \"1s\"\n{extra}");
        let od = OnDemand::new(toml::from_str(&toml).unwrap(), acme, dir.path()).unwrap();
        (dir, od)
    }

    #[tokio::test]
    async fn refusals_never_order_and_new_names_are_limited_per_hour() {
        let (_dir, od) = on_demand("max_new_per_hour = 2\n");
        let answer = od.clone().request(String::from("evil.example.test")).await;
        assert!(
            matches!(&answer, OnDemandAnswer::Refused(Refusal::Policy, why) if why.contains("*.apps.example.test")),
            "{answer:?}"
        );
        assert!(matches!(
            od.clone().request(String::from("no_dots")).await,
            OnDemandAnswer::Refused(Refusal::Invalid, _)
        ));
        assert!(od.acme.list().unwrap().is_empty(), "a refused name was stored");
        // Nothing orders in this test: each new name waits, then is pending.
        for name in ["a.apps.example.test", "B.apps.example.test"] {
            let answer = od.clone().request(name.into()).await;
            assert!(matches!(&answer, OnDemandAnswer::NotYet(why, _) if why.starts_with("ordered")), "{answer:?}");
        }
        let names: Vec<_> = od.acme.list().unwrap().into_iter().map(|c| c.domains[0].clone()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"b.apps.example.test".to_owned()), "{names:?}");
        let answer = od.clone().request(String::from("c.apps.example.test")).await;
        assert!(
            matches!(&answer, OnDemandAnswer::NotYet(why, _) if why.contains("max_new_per_hour = 2")),
            "{answer:?}"
        );
        // A name already ordered is not a new one.
        assert!(
            matches!(od.clone().request(String::from("a.apps.example.test")).await, OnDemandAnswer::NotYet(why, _) if why.starts_with("ordered"))
        );
        let metrics = {
            let mut registry = prometheus_client::registry::Registry::with_prefix("lanyard_ca");
            #[derive(Debug)]
            struct M(Arc<OnDemand>);
            impl prometheus_client::collector::Collector for M {
                fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
                    self.0.encode_metrics(&mut enc)
                }
            }
            registry.register_collector(Box::new(M(od.clone())));
            lanyard_sidecar::metrics::exposition(&registry)
        };
        for line in [
            "lanyard_ca_on_demand_requests_total{result=\"refused_policy\"} 1",
            "lanyard_ca_on_demand_requests_total{result=\"refused_invalid\"} 1",
            "lanyard_ca_on_demand_requests_total{result=\"limited\"} 1",
            "lanyard_ca_on_demand_requests_total{result=\"pending\"} 3",
        ] {
            assert!(metrics.contains(line), "no {line} in\n{metrics}");
        }
    }

    #[tokio::test]
    async fn unused_and_no_longer_allowed_names_are_removed_with_their_cert_dir() {
        let (dir, od) = on_demand("idle = \"1h\"\n");
        let _ = od.clone().request(String::from("old.apps.example.test")).await;
        let _ = od.clone().request(String::from("new.apps.example.test")).await;
        let old = OnDemand::cert_name("old.apps.example.test");
        std::fs::create_dir_all(dir.path().join("on-demand/old.apps.example.test")).unwrap();
        od.acme.store.put_doc(KIND_USED, &old, &(now() - 7200).to_string()).unwrap();
        od.remove_unused().unwrap();
        let left: Vec<_> = od.acme.list().unwrap().into_iter().map(|c| c.domains[0].clone()).collect();
        assert_eq!(left, ["new.apps.example.test"]);
        assert!(!dir.path().join("on-demand/old.apps.example.test").exists(), "its cert dir is left");
        // A narrower allow list removes what it no longer admits.
        let narrower = OnDemandConfig { allow: vec!["old.apps.example.test".into()], ..od.config.clone() };
        let od2 = OnDemand::new(narrower, od.acme.clone(), dir.path()).unwrap();
        od2.remove_unused().unwrap();
        assert!(od.acme.list().unwrap().is_empty());
    }

    #[test]
    fn config_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let acme = Acme::new(store, AcmeSettings::default(), dir.path());
        let parse = |t: &str| OnDemand::new(toml::from_str(t).unwrap(), acme.clone(), dir.path()).unwrap_err();
        assert!(parse("allow = []\nemail = \"a@b.c\"").contains("allow is empty"));
        assert!(
            parse("allow = [\"*.x.y\"]\nemail = \"a@b.c\"\nask = \"https://app/ok\"").contains("not an http:// URL")
        );
        assert!(parse("allow = [\"*.x.y\"]\nemail = \"nobody\"").contains("email"));
    }
}
