//! Edge mode: public HTTPS in front of an app's plain HTTP port.
//!
//! - HTTPS with SNI across several cert dirs (one per public certificate),
//!   each watched and reloaded like the mesh cert dir. Until the first valid
//!   set arrives, a self-signed fallback is served and `/readyz` says why.
//! - HTTP/1.1 and h2 are proxied to the app over HTTP/1.1 with
//!   `X-Forwarded-For`, `-Proto` and `-Host` (set by us, never passed through
//!   from the client), and security headers are added to every response
//!   that does not set them itself.
//! - The optional plain-HTTP listener redirects everything to HTTPS (308)
//!   except `/.well-known/acme-challenge/`, which goes to the CA.
//! - TLS follows Mozilla's "intermediate" profile (TLS 1.2 + 1.3, ECDHE
//!   with AEAD suites) or "modern" (TLS 1.3 only).
//! - With `[edge.on_demand]`, a ClientHello for a name no cert dir covers
//!   asks the CA to order it and waits up to `wait` for its cert dir
//!   (`dir/NAME`), which is then watched like the others; names in use are
//!   reported to the CA every `report_every`, and a cert dir the CA removed
//!   is forgotten.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwapOption;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue, HOST, LOCATION};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Duration;

use crate::certdir::CertDir;
use crate::config::{EdgeConfig, Limits, OnDemandEdge, Profile};
use crate::identity::DnsName;
use crate::reload::{CertStore, Prebuild, Snapshot};
use crate::serving::{authority_host, Gate, Session};
use crate::tls::{self, TlsConfigError};

/// The path prefix of ACME HTTP-01 challenges.
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";
/// Where the CA's plain-HTTP listener hands out TLS-ALPN-01 validation
/// certificates (`PREFIX<name>`), which the edge serves to `acme-tls/1` clients.
pub const TLS_ALPN_PREFIX: &str = "/.well-known/acme-tls-alpn/";
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Where the CA's plain-HTTP listener takes on-demand requests (`PREFIX<name>`).
pub const ON_DEMAND_PREFIX: &str = "/.well-known/lanyard-on-demand/";

/// Picks the certificate whose DNS names match the SNI name.
#[derive(Debug)]
struct SniResolver {
    /// One per cert dir, in the config's order.
    keys: Vec<Arc<ServedKey>>,
    /// On-demand cert dirs by name.
    on_demand: Arc<OnDemandKeys>,
    fallback: Arc<CertifiedKey>,
}

/// The on-demand cert dirs loaded so far, by name.
#[derive(Debug, Default)]
struct OnDemandKeys {
    names: RwLock<HashMap<String, Arc<OnDemandName>>>,
}

/// One on-demand name's cert dir.
#[derive(Debug)]
struct OnDemandName {
    store: Arc<CertStore>,
    key: Arc<ServedKey>,
    /// Whether a handshake used it since the last report to the CA.
    used: AtomicBool,
}

/// How often on-demand cert dirs are re-read when no file event came.
const ON_DEMAND_POLL: Duration = Duration::from_secs(30);

impl OnDemandKeys {
    /// The key for `name`, marked used.
    fn key(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        let entry = names.get(&name.to_ascii_lowercase())?;
        let built = entry.key.built.load_full()?;
        entry.used.store(true, Ordering::Relaxed);
        Some(built.1.clone())
    }

    /// The loaded names and their entries.
    fn entries(&self) -> Vec<(String, Arc<OnDemandName>)> {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        names.iter().map(|(n, e)| (n.clone(), e.clone())).collect()
    }

    /// Reloads the names under `root` that `paths` touch (all of them for
    /// none), and forgets those whose cert dir the CA removed.
    fn sync(&self, root: &std::path::Path, paths: &[std::path::PathBuf], edge: &str) {
        let touched: std::collections::HashSet<&str> =
            paths.iter().filter_map(|p| p.strip_prefix(root).ok()?.components().next()?.as_os_str().to_str()).collect();
        for (name, entry) in self.entries() {
            if !paths.is_empty() && !touched.contains(name.as_str()) {
                continue;
            }
            if entry.store.dir().path().exists() {
                entry.store.reload();
            } else {
                self.names.write().unwrap_or_else(|e| e.into_inner()).remove(&name);
                tracing::info!(edge, %name, "on-demand certificate removed by the CA; no longer served");
            }
        }
    }
}

/// A cert dir's certified key with the snapshot it came from, built by the
/// reload that published the snapshot.
#[derive(Debug)]
struct ServedKey {
    dir: std::path::PathBuf,
    built: ArcSwapOption<(Arc<Snapshot>, Arc<CertifiedKey>)>,
}

impl Prebuild for ServedKey {
    fn rebuild(&self, snapshot: &Arc<Snapshot>) {
        match tls::certified_key(snapshot.set.chain.clone(), &snapshot.set.key) {
            Ok(key) => self.built.store(Some(Arc::new((snapshot.clone(), key)))),
            Err(e) => tracing::error!(dir = %self.dir.display(), "edge key: {e}; keeping the previous one"),
        }
    }
}

/// Whether a ClientHello is an ACME TLS-ALPN-01 validation (it offers
/// `acme-tls/1`), and of which name; one without SNI names none and is refused.
pub fn acme_validation<'h>(hello: &'h ClientHello<'_>) -> Option<Option<&'h str>> {
    let offered = hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
    offered.then(|| hello.server_name())
}

/// Whether certificate name `pattern` (maybe `*.example.com`) covers `name`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(name),
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        let mut first = None;
        for served in &self.keys {
            let Some(served) = served.built.load_full() else { continue };
            let (snapshot, key) = &*served;
            if sni.is_some_and(|n| snapshot.set.leaf.dns.iter().any(|d| name_matches(d, n))) {
                return Some(key.clone());
            }
            first.get_or_insert_with(|| key.clone());
        }
        if let Some(key) = sni.and_then(|n| self.on_demand.key(n)) {
            return Some(key);
        }
        Some(first.unwrap_or_else(|| self.fallback.clone()))
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text_response(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// A running edge.
pub struct Edge {
    /// Its `[[edge]]` table.
    pub config: EdgeConfig,
    /// One store per cert dir.
    pub stores: Vec<Arc<CertStore>>,
    keys: Vec<Arc<ServedKey>>,
    on_demand: Arc<OnDemandKeys>,
    tls: Arc<rustls::ServerConfig>,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: Client<HttpConnector, Incoming>,
    fetch: Client<HttpConnector, http_body_util::Empty<Bytes>>,
    /// Handshakes of the HTTPS listener, as `edge-<name>` in the metrics.
    pub metrics: Arc<crate::metrics::ListenerMetrics>,
    /// The `listener` label of those metrics.
    pub metrics_label: String,
}

/// Headers that describe one hop and are not forwarded.
const HOP_BY_HOP: [&str; 6] = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"];

impl Edge {
    /// Builds the edge; cert dirs are loaded by the caller's stores, and
    /// on-demand ones by [`Edge::run_on_demand`].
    pub fn new(config: EdgeConfig) -> Result<Arc<Self>, TlsConfigError> {
        let headers = config.headers.pairs().map_err(TlsConfigError::Verifier)?;
        let stores: Vec<Arc<CertStore>> = config.cert_dirs.iter().map(|d| CertStore::new(CertDir::new(d))).collect();
        let keys: Vec<Arc<ServedKey>> = stores
            .iter()
            .map(|s| Arc::new(ServedKey { dir: s.dir().path().to_owned(), built: ArcSwapOption::empty() }))
            .collect();
        for (store, key) in stores.iter().zip(&keys) {
            store.attach(key);
        }
        let on_demand = Arc::new(OnDemandKeys::default());
        let resolver = SniResolver {
            keys: keys.clone(),
            on_demand: on_demand.clone(),
            fallback: tls::fallback_key("lanyard-edge-fallback")?,
        };
        let versions: &[&rustls::SupportedProtocolVersion] = match config.profile {
            Profile::Intermediate => &[&rustls::version::TLS13, &rustls::version::TLS12],
            Profile::Modern => &[&rustls::version::TLS13],
        };
        let mut tls = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tls.ignore_client_order = true;
        let client = Client::builder(TokioExecutor::new()).build_http();
        let fetch = Client::builder(TokioExecutor::new()).build_http();
        let metrics_label = format!("edge-{}", config.name);
        Ok(Arc::new(Self {
            config,
            stores,
            keys,
            on_demand,
            tls: Arc::new(tls),
            headers,
            client,
            fetch,
            metrics: Default::default(),
            metrics_label,
        }))
    }

    /// Why the edge is not ready, if it is not: a cert dir with no valid set.
    pub fn not_ready(&self) -> Option<String> {
        self.stores.iter().find(|s| s.current().is_none()).map(|s| {
            let why = s.last_error().unwrap_or_else(|| "no certificate yet".into());
            format!(
                "edge {}: {} has no valid certificate ({why}); serving a self-signed fallback",
                self.config.name,
                s.dir().path().display()
            )
        })
    }

    /// Serves HTTPS until `stop` turns true, within `limits`.
    pub async fn serve_https(self: Arc<Self>, socket: TcpListener, limits: Limits, stop: watch::Receiver<bool>) {
        let gate = Gate::new(self.metrics_label.clone(), limits, self.metrics.clone());
        gate.serve(socket, stop, |tcp, session| self.clone().serve_connection(tcp, session)).await;
    }

    /// One HTTPS connection: handshake, then HTTP/2 or HTTP/1.1 by ALPN.
    async fn serve_connection(self: Arc<Self>, tcp: TcpStream, session: Session) {
        // A handshake may also wait for an on-demand certificate.
        let on_demand_wait = self.config.on_demand.as_ref().map_or(Duration::ZERO, |od| od.wait.get());
        let budget = session.limits().handshake_timeout.get() + on_demand_wait;
        // Boxed: the handshake's state (4 KiB) lives only while it runs,
        // not in every connection's task for its whole life.
        let handshake = tokio::time::timeout(budget, Box::pin(self.handshake(tcp))).await;
        let tls = match handshake {
            Ok(Some(tls)) => tls,
            Ok(None) => return,
            Err(_) => return self.metrics.reject(crate::metrics::Rejection::Timeout),
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let peer = session.peer.ip();
        let service = hyper::service::service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.forward(req, peer).await) }
        });
        session.http(tls, h2, service).await;
    }

    /// The TLS handshake; `None` when it fails, or when it was an ACME
    /// TLS-ALPN-01 validation, answered with the CA's certificate and closed.
    /// The stream (1.2 KiB) comes boxed: the caller's task, which awaits
    /// this, would otherwise keep room for it twice for its whole life.
    async fn handshake(&self, tcp: TcpStream) -> Option<Box<tokio_rustls::server::TlsStream<TcpStream>>> {
        let start = match tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await {
            Ok(start) => start,
            Err(e) => {
                tracing::debug!(edge = %self.config.name, "no TLS client hello: {e}");
                return None;
            }
        };
        let hello = start.client_hello();
        if let Some(name) = acme_validation(&hello) {
            let name = name?.to_owned();
            let Some(config) = self.tls_alpn_config(&name).await else {
                tracing::warn!(edge = %self.config.name, %name, "cannot answer a TLS-ALPN-01 validation: no certificate from the CA");
                return None;
            };
            match start.into_stream(config).await {
                Ok(mut tls) => {
                    tracing::info!(edge = %self.config.name, %name, "answered a TLS-ALPN-01 validation");
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                }
                Err(e) => tracing::warn!(edge = %self.config.name, %name, "TLS-ALPN-01 handshake failed: {e}"),
            }
            return None;
        }
        if let Some(name) = hello.server_name().filter(|n| !self.covers(n)).map(str::to_owned) {
            if let Some(od) = &self.config.on_demand {
                self.order_on_demand(od, &name).await;
            }
        }
        match start.into_stream(self.tls.clone()).await {
            Ok(tls) => {
                self.metrics.handshake_done(tls.get_ref().1);
                Some(Box::new(tls))
            }
            Err(e) => {
                let why = self.metrics.handshake_failed(&e);
                tracing::debug!(edge = %self.config.name, reason = why.label(), "handshake failed: {e}");
                None
            }
        }
    }

    /// Whether a cert dir, static or on demand, has a certificate for `name`.
    fn covers(&self, name: &str) -> bool {
        let static_dirs = self.keys.iter().filter_map(|k| k.built.load_full());
        static_dirs.into_iter().any(|built| built.0.set.leaf.dns.iter().any(|d| name_matches(d, name)))
            || self.on_demand.names.read().unwrap_or_else(|e| e.into_inner()).contains_key(&name.to_ascii_lowercase())
    }

    /// Asks the CA for `name`'s certificate, waiting up to `od.wait`, and
    /// loads its cert dir once the CA says it is there.
    async fn order_on_demand(&self, od: &OnDemandEdge, name: &str) {
        let Ok(name) = name.parse::<DnsName>().map(|n| n.to_string()) else { return };
        if name.starts_with("*.") {
            return;
        }
        match tokio::time::timeout(od.wait.get(), self.ask_ca(&name)).await {
            Ok(Ok(())) => self.load_on_demand(od, &name).await,
            Ok(Err(why)) => {
                tracing::info!(edge = %self.config.name, %name, "no on-demand certificate: {why}; serving the fallback")
            }
            Err(_) => {
                tracing::info!(edge = %self.config.name, %name, "no on-demand certificate within {}; serving the fallback", od.wait)
            }
        }
    }

    /// `GET CA/.well-known/lanyard-on-demand/NAME`: `Ok` on 200, else what the CA said.
    async fn ask_ca(&self, name: &str) -> Result<(), String> {
        let ca = self.config.acme_forward.as_ref().ok_or("no acme_forward")?;
        let uri: Uri = format!("http://{ca}{ON_DEMAND_PREFIX}{name}").parse().map_err(|e| format!("{e}"))?;
        let response = self.fetch.get(uri).await.map_err(|e| format!("cannot reach the CA at {ca}: {e}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if status == StatusCode::OK {
            return Ok(());
        }
        let why = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        Err(format!("the CA answered {status}: {why}"))
    }

    /// Loads `od.dir/NAME`; a set that does not load is logged and not served.
    async fn load_on_demand(&self, od: &OnDemandEdge, name: &str) {
        if self.on_demand.names.read().unwrap_or_else(|e| e.into_inner()).contains_key(name) {
            return;
        }
        let dir = od.dir.join(name);
        let store = CertStore::new(CertDir::new(&dir));
        let key = Arc::new(ServedKey { dir: dir.clone(), built: ArcSwapOption::empty() });
        store.attach(&key);
        let loading = store.clone();
        let _ = tokio::task::spawn_blocking(move || loading.reload()).await;
        if key.built.load().is_none() {
            let why = store.last_error().unwrap_or_else(|| "no certificate".into());
            return tracing::error!(edge = %self.config.name, %name, dir = %dir.display(), "the CA has {name}'s on-demand certificate, but this edge cannot load it ({why}): mount the CA's [on_demand] out_dir at {}", od.dir.display());
        }
        let entry = Arc::new(OnDemandName { store, key, used: AtomicBool::new(true) });
        self.on_demand.names.write().unwrap_or_else(|e| e.into_inner()).entry(name.to_owned()).or_insert(entry);
        tracing::info!(edge = %self.config.name, %name, dir = %dir.display(), "serving an on-demand certificate");
    }

    /// Loads the on-demand cert dirs already there, then watches them (one
    /// watcher for all) and reports the names in use to the CA every
    /// `report_every`, until `stop` turns true.
    pub async fn run_on_demand(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let Some(od) = self.config.on_demand.clone() else { return };
        if let Ok(entries) = std::fs::read_dir(&od.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && name.parse::<DnsName>().is_ok() {
                    self.load_on_demand(&od, &name).await;
                }
            }
        }
        let (keys, root, edge) = (self.on_demand.clone(), od.dir.clone(), self.config.name.clone());
        let mut until_stop = stop.clone();
        let watching = crate::reload::watch_tree(
            &od.dir,
            ON_DEMAND_POLL,
            async move {
                let _ = until_stop.wait_for(|s| *s).await;
            },
            move |paths| keys.sync(&root, paths, &edge),
        );
        tokio::join!(watching, self.report_on_demand(&od, stop));
    }

    /// Tells the CA every `report_every` which on-demand names handshakes
    /// used, for its idle clean-up.
    async fn report_on_demand(&self, od: &OnDemandEdge, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(od.report_every.get()) => {}
            }
            for (name, entry) in self.on_demand.entries() {
                if entry.used.swap(false, Ordering::Relaxed) {
                    if let Err(why) = self.ask_ca(&name).await {
                        tracing::warn!(edge = %self.config.name, %name, "cannot report the on-demand name in use: {why}");
                    }
                }
            }
        }
    }

    /// A config that presents the CA's TLS-ALPN-01 certificate for `name`.
    async fn tls_alpn_config(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        let ca = self.config.acme_forward.as_ref()?;
        let uri: Uri = format!("http://{ca}{TLS_ALPN_PREFIX}{name}").parse().ok()?;
        let response = match self.fetch.get(uri).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(edge = %self.config.name, %name, "cannot reach the CA at {ca} for TLS-ALPN-01: {e}");
                return None;
            }
        };
        if response.status() != StatusCode::OK {
            tracing::warn!(edge = %self.config.name, %name, "no TLS-ALPN-01 certificate at the CA ({})", response.status());
            return None;
        }
        let pem = response.into_body().collect().await.ok()?.to_bytes();
        let built = (|| {
            let chain =
                CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| e.to_string())?;
            // A resolver, not with_single_cert: rustls would refuse the
            // critical acmeIdentifier extension of its own certificate.
            let key = tls::certified_key(chain, &key).map_err(|e| e.to_string())?;
            rustls::ServerConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()
                .map(|b| b.with_no_client_auth().with_cert_resolver(Arc::new(tls::FixedCert(key))))
                .map_err(|e| e.to_string())
        })();
        let mut config = match built {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(edge = %self.config.name, %name, "unusable TLS-ALPN-01 certificate from the CA: {e}");
                return None;
            }
        };
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        Some(Arc::new(config))
    }

    /// Proxies one request to the app.
    async fn forward(&self, mut req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        let Some(host) = host else {
            return self.secured(text_response(StatusCode::BAD_REQUEST, "no Host header\n".into()));
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = format!("http://{}{path}", self.config.upstream).parse::<Uri>() else {
            return self.secured(text_response(StatusCode::BAD_REQUEST, "bad request target\n".into()));
        };
        *req.uri_mut() = uri;
        *req.version_mut() = hyper::Version::HTTP_11;
        let headers = req.headers_mut();
        for h in HOP_BY_HOP {
            headers.remove(h);
        }
        let forwarded = [
            ("x-forwarded-for", peer.to_string()),
            ("x-forwarded-proto", "https".to_owned()),
            ("x-forwarded-host", host.clone()),
            ("host", host),
        ];
        for (name, value) in forwarded {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        }
        let response = match self.client.request(req).await {
            Ok(r) => r.map(|b| b.boxed()),
            Err(e) => {
                tracing::warn!(edge = %self.config.name, upstream = %self.config.upstream, "upstream failed: {e}");
                text_response(StatusCode::BAD_GATEWAY, format!("the app at {} did not answer\n", self.config.upstream))
            }
        };
        self.secured(response)
    }

    /// Adds the security headers the app did not set.
    fn secured(&self, mut response: Response<Body>) -> Response<Body> {
        let headers = response.headers_mut();
        for h in HOP_BY_HOP {
            headers.remove(h);
        }
        for (name, value) in &self.headers {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        response
    }

    /// Serves the plain-HTTP listener until `stop` turns true, within `limits`.
    pub async fn serve_http(
        self: Arc<Self>,
        socket: TcpListener,
        https_port: u16,
        limits: Limits,
        stop: watch::Receiver<bool>,
    ) {
        let gate = Gate::new(format!("{}-http", self.metrics_label), limits, self.metrics.clone());
        gate.serve(socket, stop, |tcp, session| {
            let this = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let this = this.clone();
                async move { Ok::<_, Infallible>(this.plain(req, https_port).await) }
            });
            session.http1(tcp, service)
        })
        .await;
    }

    /// Plain HTTP: ACME challenges go to the CA, everything else to HTTPS.
    async fn plain(&self, mut req: Request<Incoming>, https_port: u16) -> Response<Body> {
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        if path.starts_with(ACME_CHALLENGE_PREFIX) {
            let Some(ca) = &self.config.acme_forward else {
                return text_response(StatusCode::NOT_FOUND, "no ACME responder configured\n".into());
            };
            let Ok(uri) = format!("http://{ca}{path}").parse::<Uri>() else {
                return text_response(StatusCode::BAD_REQUEST, "bad request target\n".into());
            };
            *req.uri_mut() = uri;
            return match self.client.request(req).await {
                Ok(r) => r.map(|b| b.boxed()),
                Err(e) => text_response(StatusCode::BAD_GATEWAY, format!("the CA at {ca} did not answer: {e}\n")),
            };
        }
        let Some(name) = host.as_deref().and_then(authority_host) else {
            return text_response(StatusCode::BAD_REQUEST, "a valid Host header is needed for the redirect\n".into());
        };
        let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
        let mut r = text_response(StatusCode::PERMANENT_REDIRECT, "use HTTPS\n".into());
        if let Ok(location) = HeaderValue::from_str(&format!("https://{name}{port}{path}")) {
            r.headers_mut().insert(LOCATION, location);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("*.example.com", "www.example.com"));
        assert!(name_matches("example.com", "EXAMPLE.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
    }
}
