//! `ca serve`: the control plane service. It keeps managed cert dirs
//! current, serves the signing API over HTTPS (with a certificate it issues
//! to itself and rotates like any other, through the sidecar's reloading TLS
//! code), and answers plain HTTP with a redirect.

pub mod api;
pub mod bodies;
pub mod config;
pub mod docker;
pub mod leader;
pub mod metrics;
pub mod own;
pub mod schedule;
pub mod sidecars;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use lanyard_sidecar::certdir::CertDir;
use lanyard_sidecar::certinfo::{rfc3339, CertInfo};
use lanyard_sidecar::config::Limits;
use lanyard_sidecar::identity::{DnsName, TrustDomain};
use lanyard_sidecar::reload::CertStore;
use lanyard_sidecar::serving::{Gate, HttpsConfig};
use lanyard_sidecar::span::Span;
use lanyard_sidecar::tls;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::authority::Authority;
use crate::issue::{KeySource, LeafRequest};
use crate::keys::KeyType;
use crate::CaError;
use config::ServeConfig;
use metrics::CaMetrics;
use schedule::{managed_from_config, Managed, Scheduler};

/// Identity name of the API's own certificate.
pub const API_IDENTITY: &str = "lanyard-ca";

/// Shared state of the running service.
pub struct Service {
    /// The CA and its store.
    pub authority: Arc<Authority>,
    /// The rotation loop.
    pub scheduler: Arc<Scheduler>,
    /// Issuance, renewal and listener counters behind `/metrics`.
    pub metrics: Arc<CaMetrics>,
    /// Public certificates from ACME.
    pub acme: Arc<crate::acme::Acme>,
    /// The ACME server, with `[acme_server]`.
    pub acme_server: Option<Arc<crate::acme_server::AcmeServer>>,
    /// On-demand certificates for edges, with `[on_demand]`.
    pub on_demand: Option<Arc<crate::acme::OnDemand>>,
    /// Who leads among the replicas sharing the store.
    pub leader: leader::Leader,
    /// This replica's API certificate and admin credential.
    pub own: Arc<own::OwnCredentials>,
    /// Lifetime of API-issued certificates of identities not managed here.
    pub leaf_ttl: Span,
    api_certs: Arc<CertStore>,
    /// `/metrics`: see [`metrics::ServiceMetrics`].
    registry: lanyard_sidecar::metrics::Registry,
}

/// The `/health` body.
#[derive(Debug, Serialize)]
pub struct Health {
    /// `healthy` or `degraded`.
    pub status: &'static str,
    /// Whether the rotation loop runs (on the leader only).
    pub scheduler: bool,
    /// `healthy` or the store's error.
    pub store: String,
    /// `sqlite` or `redis`.
    pub store_backend: &'static str,
    /// With the Redis store: `healthy` or `unhealthy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<&'static str>,
    /// `leader` (runs rotation, ACME, CRL distribution, discovery) or
    /// `follower` (serves the API).
    pub role: &'static str,
    /// Managed identities with a valid certificate in their cert dir.
    pub certificates_loaded: usize,
    /// Whether the API serves its own valid certificate.
    pub https_enabled: bool,
    /// Identities past 2/3 of their certificate's life without a renewal.
    pub overdue: Vec<String>,
    /// Public certificates: status, expiry, last error and next attempt.
    pub public: Vec<PublicHealth>,
    /// The root's and the intermediate's notAfter.
    pub ca_certificates: Vec<CaCertHealth>,
    /// What an operator must act on (a CA certificate near its end).
    pub alarms: Vec<String>,
}

/// A CA certificate in `/health`.
#[derive(Debug, Serialize)]
pub struct CaCertHealth {
    /// `root` or `intermediate`.
    pub role: &'static str,
    /// notAfter (RFC 3339).
    pub not_after: String,
}

/// One public certificate in `/health`.
#[derive(Debug, Serialize)]
pub struct PublicHealth {
    /// The certificate's name, as in `/certificates/{name}`.
    pub cert_name: String,
    /// `pending`, `valid`, `failed` or `uploaded`; `corrupt` for a document that does not parse.
    pub status: String,
    /// notAfter of the served certificate.
    pub expires_at: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
    /// Next order (RFC 3339).
    pub next_attempt: Option<String>,
    /// Why the CA is holding back, if it is.
    pub held_back: Option<String>,
}

impl Service {
    /// The issuance template of a configured identity.
    pub fn template(&self, name: &DnsName) -> Option<LeafRequest> {
        self.scheduler.identities().into_iter().find(|m| &m.request.name == name).map(|m| m.request)
    }

    /// Whether `serial` is revoked (unknown serials are not).
    pub fn is_revoked(&self, serial: &str) -> bool {
        matches!(self.authority.store().certificate(serial), Ok(Some(rec)) if rec.revoked_at.is_some())
    }

    /// Health as operators expect it.
    pub fn health(&self) -> Health {
        let now = OffsetDateTime::now_utc();
        let store = match self.authority.store().check() {
            Ok(()) => "healthy".to_owned(),
            Err(e) => e.to_string(),
        };
        // From the scheduler's rows and the last look at the replica's own
        // credentials: no cert dir is read on a health check.
        let configured: std::collections::BTreeSet<String> =
            self.scheduler.identities().iter().map(|m| m.name()).collect();
        let mut rows = self.authority.store().schedules().unwrap_or_default();
        rows.retain(|r| configured.contains(&r.identity));
        let own = self.own.rows();
        let reported: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.identity.as_str()).collect();
        let mut overdue: Vec<String> = configured.iter().filter(|n| !reported.contains(n.as_str())).cloned().collect();
        let rows = rows.iter().chain(&own);
        let loaded = rows.clone().filter(|r| r.serial.is_some()).count();
        overdue.extend(
            rows.filter(|r| crate::ops::trouble(r, now.unix_timestamp()).is_some()).map(|r| r.identity.clone()),
        );
        let scheduler = self.metrics.scheduler_running.load(std::sync::atomic::Ordering::Relaxed);
        let leading = self.leader.is_leader();
        let https_enabled = self.api_certs.current().is_some();
        let expiry = self.authority.ca().expiry(now);
        let alarms: Vec<String> = expiry.iter().filter_map(|e| e.alarm.clone()).collect();
        let ca_certificates =
            expiry.iter().map(|e| CaCertHealth { role: e.role, not_after: rfc3339(e.not_after) }).collect();
        let healthy =
            (scheduler || !leading) && store == "healthy" && overdue.is_empty() && https_enabled && alarms.is_empty();
        let backend = self.authority.store().backend();
        let redis = (backend == "redis").then_some(if store == "healthy" { "healthy" } else { "unhealthy" });
        let public = self
            .acme
            .scan()
            .unwrap_or_default()
            .into_iter()
            .map(|scanned| match scanned {
                Ok(c) => PublicHealth {
                    next_attempt: OffsetDateTime::from_unix_timestamp(c.next_attempt).ok().map(rfc3339),
                    cert_name: c.cert_name,
                    status: c.status.as_str().to_owned(),
                    expires_at: c.expires_at,
                    last_error: c.last_error,
                    held_back: c.held_back,
                },
                Err(e) => PublicHealth {
                    cert_name: match &e {
                        crate::acme::PublicError::Corrupt { name, .. } => name.clone(),
                        _ => String::new(),
                    },
                    status: "corrupt".into(),
                    next_attempt: None,
                    expires_at: None,
                    last_error: Some(e.to_string()),
                    held_back: None,
                },
            })
            .collect();
        Health {
            public,
            status: if healthy { "healthy" } else { "degraded" },
            scheduler,
            store,
            store_backend: backend,
            redis,
            role: if leading { "leader" } else { "follower" },
            certificates_loaded: loaded,
            https_enabled,
            overdue,
            ca_certificates,
            alarms,
        }
    }

    /// Prometheus text.
    pub fn metrics_text(&self) -> String {
        lanyard_sidecar::metrics::exposition(&self.registry)
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, CaError> {
    lanyard_sidecar::serving::bind(addr)
        .map_err(|e| CaError::Config { origin: what.to_owned(), what: format!("cannot listen on {addr}: {e}") })
}

/// Creates the CA for `trust_domain` in `dir` unless one is there; refuses
/// one of another trust domain.
fn ensure_ca(
    dir: &std::path::Path,
    trust_domain: &TrustDomain,
    store: &Arc<dyn crate::store::Store>,
) -> Result<(), CaError> {
    // Replicas sharing a fresh state directory: one creates the CA, the
    // others wait for it.
    let lock = dir.join(".init-lock");
    let mut waited = 0;
    while !dir.join(crate::state::META_FILE).exists() {
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&lock) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && waited < 300 => {
                waited += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                return Err(CaError::Config {
                    origin: "trust_domain".into(),
                    what: format!(
                        "cannot create the CA in {}: {e} (another replica holds {}; remove it if none runs)",
                        dir.display(),
                        lock.display()
                    ),
                })
            }
        }
    }
    let created = if !dir.join(crate::state::META_FILE).exists() {
        let opts = crate::state::InitOptions::new(trust_domain.clone());
        let made = crate::ops::init_ca(dir, &opts, store.clone());
        let _ = std::fs::remove_file(&lock);
        let (ca, _) = made?;
        tracing::info!(state = %dir.display(), trust_domain = %ca.trust_domain(), "created a new CA");
        true
    } else {
        false
    };
    if created {
        return Ok(());
    }
    let ca = crate::state::CaState::load(dir)?;
    if ca.trust_domain() != trust_domain {
        return Err(CaError::Config {
            origin: "trust_domain".into(),
            what: format!(
                "the CA in {} is for trust domain {}, not {trust_domain}; fix trust_domain or use another state directory",
                dir.display(),
                ca.trust_domain()
            ),
        });
    }
    Ok(())
}

/// With a shared store, the store holds the CA: a replica copies it into
/// its state directory. The first leader puts it there: from `seed`, from
/// the state directory, or made for `trust_domain`. Other replicas wait.
async fn share_ca(
    dir: &std::path::Path,
    store: &Arc<dyn crate::store::Store>,
    leader: &leader::Leader,
    config: &ServeConfig,
) -> Result<(), CaError> {
    let started = std::time::Instant::now();
    loop {
        let (d, s) = (dir.to_owned(), store.clone());
        if tokio::task::spawn_blocking(move || crate::mirror::pull(&d, s.as_ref())).await.unwrap_or(Ok(false))? {
            tracing::info!(state = %dir.display(), "copied the CA from the store");
            if let Some(seed) = &config.seed {
                let added = crate::ops::merge_seed_records(seed, store.as_ref())?;
                if added > 0 {
                    tracing::info!(seed = %seed.display(), added, "added the seed's new records to the store");
                }
            }
            return Ok(());
        }
        if leader.is_leader() {
            if let Some(seed) = &config.seed {
                crate::ops::seed(dir, seed, store.as_ref())?;
                tracing::info!(seed = %seed.display(), "seeded the store with the CA and its records");
            } else if let Some(td) = &config.trust_domain {
                ensure_ca(dir, td, store)?;
            }
            crate::state::CaState::load(dir)?;
            crate::mirror::push(dir, store.as_ref())?;
            tracing::info!(state = %dir.display(), "published the CA to the store");
            return Ok(());
        }
        if started.elapsed() > std::time::Duration::from_secs(120) {
            return Err(CaError::Config {
                origin: "store".into(),
                what: "the store holds no CA and no replica has published one in 2 minutes; give the leader `seed` or `trust_domain`".into(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The most threads `ca serve`'s blocking pool runs: 8, or 2 per core where
/// there are more than 4. Every API request, and every store call, runs on
/// that pool. Without a bound, tokio starts a thread per request in flight,
/// and each is woken for one request and then contends for the store; with
/// one, a busy thread takes the next request off the queue without a
/// wake-up. 8 leaves room for a long task (a scheduler pass over every
/// identity, a mirror pull) while requests are served.
pub fn blocking_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_mul(2).max(8)
}

/// Runs the service until `shutdown` resolves.
pub async fn run(config: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), CaError> {
    tls::set_kx_policy(config.kx);
    let dir = config.state_dir().to_owned();
    let store = crate::store::open(&config.store_spec(), &dir, config.store_key.as_deref())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let leader = leader::start(store.clone(), config.lease_ttl.get(), stop_rx.clone()).await;
    if store.backend() == "sqlite" {
        if let Some(td) = &config.trust_domain {
            ensure_ca(&dir, td, &store)?;
        }
    } else {
        share_ca(&dir, &store, &leader, &config).await?;
    }
    let authority = Arc::new(Authority::open_with(&dir, store)?);
    let metrics = Arc::new(CaMetrics::default());
    tracing::info!(store = authority.store().backend(), holder = %leader.holder, role = if leader.is_leader() { "leader" } else { "follower" }, "store opened");
    let scheduler = Scheduler::new(authority.clone(), metrics.clone(), leader.clone())?;

    // The CA's own credentials live at most half its intermediate's lifetime.
    let intermediate = authority.ca().intermediate().clone();
    let own_ttl_cap = intermediate.not_after - intermediate.not_before;
    let api_ttl = std::time::Duration::try_from(own_ttl_cap / 2)
        .ok()
        .and_then(Span::new)
        .map_or(config.api_ttl, |cap| config.api_ttl.min(cap));
    let api_dir = CertDir::new(dir.join("api"));
    let api = Managed {
        request: LeafRequest {
            name: API_IDENTITY.parse()?,
            dns: Some(config.api_names.clone()),
            ips: vec!["127.0.0.1".parse().expect("valid"), "::1".parse().expect("valid")],
            spiffe: None,
            ttl: api_ttl,
            key: KeySource::Generate(KeyType::EcdsaP256),
        },
        out_dir: api_dir.clone(),
    };
    // The admin credential in STATE/admin is renewed like the API's.
    let admin =
        Managed { request: crate::ops::admin_request(None, own_ttl_cap)?, out_dir: CertDir::new(dir.join("admin")) };
    for id in &config.identities {
        scheduler.upsert(managed_from_config(id))?;
    }
    scheduler.prune()?;
    scheduler.refresh_crl()?;
    let own = own::OwnCredentials::new(authority.clone(), scheduler.clone(), vec![api, admin]);
    let first = own.clone();
    tokio::task::spawn_blocking(move || first.tick())
        .await
        .map_err(|e| CaError::Config { origin: "own credentials".into(), what: e.to_string() })?;
    tokio::spawn(own.clone().run(stop_rx.clone()));
    let known_sidecars = known_sidecars(&config, authority.ca().trust_domain())?;

    let crl_refresh = config.crl_refresh.get();
    let sched_task = tokio::spawn(scheduler.clone().run(crl_refresh, stop_rx.clone()));

    // The API's certificate is issued by the scheduler; wait for the first one.
    let api_certs = CertStore::new(api_dir);
    for _ in 0..100 {
        if api_certs.reload() == lanyard_sidecar::reload::ReloadOutcome::Published || api_certs.current().is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    if config.docker.enabled {
        let cert_root = config.docker.cert_root.clone().unwrap_or_else(|| dir.join("certs"));
        match docker::Discovery::connect(&config.docker.socket, scheduler.clone(), cert_root) {
            Ok(discovery) => {
                let (mut leader, mut stop) = (leader.clone(), stop_rx.clone());
                tokio::spawn(async move {
                    if leader.wait_until_leading(&mut stop).await {
                        discovery.run(stop).await;
                    }
                });
            }
            Err(e) => return Err(CaError::Config { origin: "docker".into(), what: e }),
        }
    }
    api_certs.spawn_watch(stop_rx.clone());

    let https = bind(config.https_listen, "https_listen").await?;
    let http = bind(config.http_listen, "http_listen").await?;
    tracing::info!(https = %config.https_listen, http = %config.http_listen, state = %dir.display(), "ca serve listening");
    let https_port = config.https_listen.port();
    let acme = crate::acme::Acme::new(authority.store().clone(), config.acme.clone(), &dir);
    acme.reconcile(&config.public).map_err(|e| CaError::Config { origin: "[[public]]".into(), what: e.to_string() })?;
    let acme_task = tokio::spawn(acme.clone().run(leader.clone(), stop_rx.clone()));
    let acme_server = match config.acme_server.clone() {
        None => None,
        Some(c) => {
            let policy = crate::acme_server::Policy::new(c)
                .map_err(|what| CaError::Config { origin: "[acme_server]".into(), what })?;
            let runtime = tokio::runtime::Handle::current();
            Some(crate::acme_server::AcmeServer::new(policy, authority.store().clone(), authority.clone(), runtime))
        }
    };
    let on_demand = match config.on_demand.clone() {
        None => None,
        Some(c) => {
            let od = crate::acme::OnDemand::new(c, acme.clone(), &dir)
                .map_err(|what| CaError::Config { origin: "[on_demand]".into(), what })?;
            tokio::spawn(od.clone().run(leader.clone(), stop_rx.clone()));
            Some(od)
        }
    };
    tokio::spawn(sidecars::poll_during_rotation(authority.clone(), known_sidecars, stop_rx.clone()));
    let registry = metrics::ServiceMetrics {
        authority: authority.clone(),
        own: own.clone(),
        leader: leader.clone(),
        acme: acme.clone(),
        acme_server: acme_server.clone(),
        on_demand: on_demand.clone(),
        counters: metrics.clone(),
    }
    .registry();
    let service = Arc::new(Service {
        authority,
        scheduler,
        metrics,
        acme,
        acme_server,
        on_demand,
        leader,
        own,
        leaf_ttl: config.leaf_ttl,
        api_certs,
        registry,
    });
    let https = tokio::spawn(serve_https(service.clone(), https, config.limits.clone(), stop_rx.clone()));
    let http = tokio::spawn(serve_http(service.clone(), http, https_port, config.limits.clone(), stop_rx.clone()));

    shutdown.await;
    tracing::info!("ca serve shutting down: no new connections, draining open ones");
    let _ = stop_tx.send(true);
    // The ACME loop gives up an order in flight and removes its answers.
    let _ = tokio::join!(https, http, acme_task);
    let _ = sched_task.await;
    Ok(())
}

/// The configured identities with a `sidecar_admin` address.
pub fn known_sidecars(config: &ServeConfig, td: &TrustDomain) -> Result<Vec<sidecars::KnownSidecar>, CaError> {
    config
        .identities
        .iter()
        .filter_map(|id| Some((id, id.sidecar_admin.clone()?)))
        .map(|(id, admin)| {
            let spiffe = match &id.spiffe {
                Some(s) => s.clone(),
                None => format!("spiffe://{td}/{}", id.name).parse()?,
            };
            Ok(sidecars::KnownSidecar { identity: id.name.to_string(), spiffe, admin })
        })
        .collect()
}

/// The HTTPS API listener, within `limits`.
async fn serve_https(svc: Arc<Service>, listener: TcpListener, limits: Limits, stop: watch::Receiver<bool>) {
    let configs = HttpsConfig::new(&svc.api_certs);
    let gate = Gate::new("api", limits, svc.metrics.api_handshakes.clone());
    gate.serve(listener, stop, |tcp, session| {
        let (svc, configs) = (svc.clone(), configs.clone());
        async move {
            let Some(config) = configs.current() else { return };
            let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
            let Some(tls) = session.handshake(accept).await else { return };
            session.metrics().handshake_done(tls.get_ref().1);
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| CertInfo::from_der(c).ok())
                .map(Arc::new);
            let remote = session.peer;
            let service = hyper::service::service_fn(move |req| api::handle(svc.clone(), peer.clone(), remote, req));
            session.http1(tls, service).await;
        }
    })
    .await;
}

/// The plain-HTTP listener: ACME HTTP-01 answers, TLS-ALPN-01 validation
/// certificates and on-demand requests for edges, and a redirect to HTTPS
/// for everything else.
async fn serve_http(
    svc: Arc<Service>,
    listener: TcpListener,
    https_port: u16,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    let gate = Gate::new("http", limits, svc.metrics.http_connections.clone());
    gate.serve(listener, stop, |tcp, session| {
        let svc = svc.clone();
        {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let svc = svc.clone();
                async move {
                    let path = req.uri().path();
                    if let Some(r) = api::acme_challenge(&svc, path).or_else(|| api::tls_alpn_challenge(&svc, path)) {
                        return Ok::<_, std::convert::Infallible>(r);
                    }
                    if let Some(name) = path.strip_prefix(lanyard_sidecar::edge::ON_DEMAND_PREFIX) {
                        return Ok(api::on_demand(&svc, name).await);
                    }
                    let host = req
                        .headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .and_then(lanyard_sidecar::serving::authority_host)
                        .unwrap_or_else(|| "localhost".into());
                    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/".into());
                    let mut r = hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::new()));
                    *r.status_mut() = hyper::StatusCode::PERMANENT_REDIRECT;
                    if let Ok(v) = format!("https://{host}:{https_port}{path}").parse() {
                        r.headers_mut().insert(hyper::header::LOCATION, v);
                    }
                    Ok(r)
                }
            });
            session.http1(tcp, service)
        }
    })
    .await;
}
