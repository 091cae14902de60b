//! The HTTPS admin endpoint: `/healthz`, `/readyz` and `/metrics`.
//!
//! It serves the sidecar's own certificate (client certificates are
//! requested and verified when sent). Before a valid certificate exists it
//! serves a throwaway self-signed one, so `/readyz` can still say why the
//! sidecar is not ready.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::certinfo::rfc3339;
use crate::config::{Limits, Mode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::{counters, encode_listeners, gauges, ListenerMetrics, Registry, UNLABELED};
use crate::proxy::Listener;
use crate::reload::CertStore;
use crate::serving::{Gate, HttpsConfig};
use crate::tls;

/// A certificate is "degraded" once this fraction of its life has passed.
pub const NOT_READY_AFTER_LIFE: f64 = 5.0 / 6.0;

/// The `/readyz` body.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Readiness {
    /// Whether the sidecar should receive traffic.
    pub ready: bool,
    /// Ready, but in trouble: the certificate is in the last sixth of its
    /// life and not renewed (the reason says so). Not ready only at expiry.
    #[serde(default)]
    pub degraded: bool,
    /// Why not, or "ok".
    pub reason: String,
    /// Serial of the served certificate.
    pub serial: Option<String>,
    /// Its notAfter (RFC 3339).
    pub not_after: Option<String>,
    /// The last reload error, while the last good certificate is kept.
    pub last_reload_error: Option<String>,
    /// SHA-256 fingerprints of the roots in the served trust bundle
    /// (`ca.pem`): what a root rotation waits on.
    #[serde(default)]
    pub trust_roots: Vec<String>,
}

/// SHA-256 fingerprints (lowercase hex) of the roots in `set`'s bundle.
pub fn trust_roots(set: &crate::certdir::CertSet) -> Vec<String> {
    set.roots.iter().filter_map(|der| crate::certinfo::CertInfo::from_der(der).ok()).map(|c| c.sha256).collect()
}

/// Shared state the admin endpoint reports on.
pub struct Admin {
    store: Arc<CertStore>,
    listeners: Vec<Arc<Listener>>,
    edges: Vec<Arc<crate::edge::Edge>>,
    /// The sidecar's certificate, as served here.
    tls: Arc<HttpsConfig>,
    /// Served before the first valid certificate.
    fallback: Arc<rustls::ServerConfig>,
    /// Its own connection counters, reported as `listener="admin"`.
    connections: Arc<ListenerMetrics>,
    /// `/metrics`: one [`AdminCollector`].
    registry: Registry,
}

/// Writes the sidecar's families at scrape time.
#[derive(Debug)]
struct AdminCollector {
    store: Arc<CertStore>,
    /// Mesh listeners, edges, then the admin endpoint itself.
    listeners: Vec<(String, Arc<ListenerMetrics>)>,
}

impl Collector for AdminCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let current = self.store.current();
        let served = current.as_ref().map(|s| &s.set);
        let unlabeled = |v: Option<i64>| v.map(|v| (UNLABELED, v));
        gauges(
            &mut enc,
            "cert_expiration_timestamp_seconds",
            "notAfter of the served certificate.",
            unlabeled(served.map(|s| s.leaf.not_after.unix_timestamp())),
        )?;
        gauges(
            &mut enc,
            "cert_not_before_timestamp_seconds",
            "notBefore of the served certificate.",
            unlabeled(served.map(|s| s.leaf.not_before.unix_timestamp())),
        )?;
        let roots = served.map(trust_roots).unwrap_or_default();
        gauges(
            &mut enc,
            "trust_root_info",
            "1 for each root in the served trust bundle, by SHA-256 fingerprint.",
            roots.iter().map(|root| ([("sha256", root.as_str())], 1)),
        )?;
        let m = &self.store.metrics;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counters(
            &mut enc,
            "cert_reloads",
            "Certificate reloads by result.",
            [([("result", "success")], load(&m.ok)), ([("result", "failure")], load(&m.failed))],
        )?;
        gauges(
            &mut enc,
            "cert_last_reload_timestamp_seconds",
            "Time of the last reload attempt.",
            [(UNLABELED, m.last_attempt.load(Ordering::Relaxed))],
        )?;
        gauges(
            &mut enc,
            "cert_last_reload_success_timestamp_seconds",
            "Time of the last successful reload.",
            [(UNLABELED, m.last_success.load(Ordering::Relaxed))],
        )?;
        gauges(
            &mut enc,
            "cert_reload_error",
            "1 while the cert dir holds a set that failed validation.",
            [(UNLABELED, i64::from(self.store.last_error().is_some()))],
        )?;
        gauges(
            &mut enc,
            "cert_loaded",
            "1 once a valid certificate is served.",
            [(UNLABELED, i64::from(current.is_some()))],
        )?;
        encode_listeners(&mut enc, &self.listeners)
    }
}

impl Admin {
    /// Reports on `store` and `listeners`.
    pub fn new(
        store: Arc<CertStore>,
        listeners: Vec<Arc<Listener>>,
        edges: Vec<Arc<crate::edge::Edge>>,
    ) -> Result<Self, tls::TlsConfigError> {
        let connections = Arc::<ListenerMetrics>::default();
        let named = listeners.iter().map(|l| (l.config.name.clone(), l.metrics.clone()));
        let edge_names = edges.iter().map(|e| (e.metrics_label.clone(), e.metrics.clone()));
        let mut registry = Registry::with_prefix("lanyard_sidecar");
        registry.register_collector(Box::new(AdminCollector {
            store: store.clone(),
            listeners: named.chain(edge_names).chain([("admin".to_owned(), connections.clone())]).collect(),
        }));
        Ok(Self {
            tls: HttpsConfig::new(&store),
            store,
            listeners,
            edges,
            fallback: Arc::new(fallback_config()?),
            connections,
            registry,
        })
    }

    /// Computes readiness now; checks that each inbound upstream accepts TCP.
    pub async fn readiness(&self) -> Readiness {
        let last_reload_error = self.store.last_error();
        if let Some(reason) = self.edges.iter().find_map(|e| e.not_ready()) {
            let current = self.store.current();
            return Readiness {
                ready: false,
                degraded: false,
                reason,
                serial: current.as_ref().map(|s| s.set.leaf.serial.clone()),
                not_after: current.as_ref().map(|s| rfc3339(s.set.leaf.not_after)),
                trust_roots: current.as_ref().map(|s| trust_roots(&s.set)).unwrap_or_default(),
                last_reload_error,
            };
        }
        let Some(snapshot) = self.store.current() else {
            let why = last_reload_error.clone().unwrap_or_else(|| "no certificate found yet".into());
            return Readiness {
                ready: false,
                degraded: false,
                reason: format!("no valid certificate loaded: {why}"),
                serial: None,
                not_after: None,
                trust_roots: Vec::new(),
                last_reload_error,
            };
        };
        let leaf = &snapshot.set.leaf;
        let now = OffsetDateTime::now_utc();
        let mut reason = None;
        if now > leaf.not_after {
            reason = Some(format!("certificate expired at {}", rfc3339(leaf.not_after)));
        }
        let degraded = (reason.is_none() && now > leaf.life_point(NOT_READY_AFTER_LIFE)).then(|| {
            format!(
                "certificate is in the last sixth of its life (expires {}); renewal is overdue",
                rfc3339(leaf.not_after)
            )
        });
        if reason.is_none() {
            for l in self.listeners.iter().filter(|l| l.config.mode == Mode::Inbound) {
                let Some(up) = &l.config.upstream else { continue };
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(1), TcpStream::connect((up.host(), up.port()))).await,
                    Ok(Ok(_))
                );
                if !ok {
                    reason = Some(format!("upstream {up} of listener {} does not accept TCP", l.config.name));
                    break;
                }
            }
        }
        Readiness {
            ready: reason.is_none(),
            degraded: degraded.is_some(),
            reason: reason.or(degraded).unwrap_or_else(|| "ok".into()),
            serial: Some(leaf.serial.clone()),
            not_after: Some(rfc3339(leaf.not_after)),
            trust_roots: trust_roots(&snapshot.set),
            last_reload_error,
        }
    }

    /// Prometheus text: the served certificate, reloads, and every listener.
    pub fn metrics(&self) -> String {
        crate::metrics::exposition(&self.registry)
    }

    fn tls_config(&self) -> Arc<rustls::ServerConfig> {
        self.tls.current().unwrap_or_else(|| self.fallback.clone())
    }

    /// Serves until `stop` turns true, within `limits`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, limits: Limits, stop: watch::Receiver<bool>) {
        let gate = Gate::new("admin", limits, self.connections.clone());
        gate.serve(listener, stop, |tcp, session| {
            let this = self.clone();
            async move {
                let accept = tokio_rustls::TlsAcceptor::from(this.tls_config()).accept(tcp);
                let Some(tls) = session.handshake(accept).await else { return };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.respond(req.method(), req.uri().path()).await) }
                });
                session.http1(tls, service).await;
            }
        })
        .await;
    }

    async fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let (status, kind, body) = match (method, path) {
            (&Method::GET, "/healthz") => (StatusCode::OK, "application/json", "{\"status\":\"alive\"}\n".to_owned()),
            (&Method::GET, "/readyz") => {
                let r = self.readiness().await;
                let body = serde_json::to_string(&r).unwrap_or_default() + "\n";
                (if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, "application/json", body)
            }
            (&Method::GET, "/metrics") => (StatusCode::OK, crate::metrics::CONTENT_TYPE, self.metrics()),
            (&Method::GET, _) => {
                (StatusCode::NOT_FOUND, "text/plain", "not found: try /healthz, /readyz or /metrics\n".into())
            }
            _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET is served\n".into()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(kind));
        response
    }
}

fn fallback_config() -> Result<rustls::ServerConfig, tls::TlsConfigError> {
    let key = tls::fallback_key("lanyard-sidecar-fallback")?;
    Ok(rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(tls::FixedCert(key))))
}
