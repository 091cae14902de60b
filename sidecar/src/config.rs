//! Sidecar configuration: a TOML file with several listeners, or the flags
//! of `sidecar run` for one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::cli::serde_str;
use crate::identity::{NameError, PeerId};
use crate::span::Span;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is inconsistent.
    #[error("config {origin}: {message}")]
    Invalid {
        /// The file, or "command line".
        origin: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// What a listener does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Accept mTLS, forward plaintext TCP to the app.
    #[default]
    Inbound,
    /// Accept plaintext from the app, open mTLS to the upstream.
    Outbound,
}

/// A `host:port`: an upstream (resolved at connect time) or a listen
/// address (resolved once at start, so a listener can bind to the address
/// a name has on one network only).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    host: String,
    port: u16,
}

impl HostPort {
    /// The host part.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why an address was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid address {0:?}: expected HOST:PORT, such as app:8080 or 127.0.0.1:8080")]
pub struct HostPortError(String);

impl FromStr for HostPort {
    type Err = HostPortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HostPortError(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| err())?;
        if host.is_empty() || port == 0 {
            return Err(err());
        }
        Ok(Self { host: host.to_owned(), port })
    }
}

/// One listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Label in logs and metrics; defaults to the mode and port.
    #[serde(default)]
    pub name: String,
    /// What the listener does.
    #[serde(default)]
    pub mode: Mode,
    /// Address to accept on: an IP (`0.0.0.0:8443`) or a name resolved
    /// once at start. Listeners may share a port when one binds the
    /// wildcard address: a connection goes to the listener whose address it
    /// arrived on, else to the wildcard one.
    #[serde(deserialize_with = "serde_str::one")]
    pub listen: HostPort,
    /// Where to forward; outbound listeners with `route`s pick per request instead.
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub upstream: Option<HostPort>,
    /// Inbound: identities (SPIFFE IDs or DNS names) allowed to connect; empty allows any client of the CA.
    #[serde(default, deserialize_with = "serde_str::vec")]
    pub allow: Vec<PeerId>,
    /// Outbound: the identity the upstream must present; defaults to the upstream's host name.
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub server_name: Option<PeerId>,
    /// Inbound: send a PROXY v2 header with the peer identity to the upstream.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Inbound: proxy HTTP/1.1 request by request and set a sanitized
    /// `X-Forwarded-Client-Cert` header with the verified identity.
    #[serde(default)]
    pub http: bool,
    /// ALPN protocols the upstream speaks, in preference order (`h2`,
    /// `http/1.1`). Inbound accepts them from clients; outbound offers them.
    /// Empty (the default) negotiates none, so clients fall back to what
    /// they speak without ALPN.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Inbound: what TLS the listener asks of clients. Outbound: `mtls`
    /// (the default) or `none`, plaintext to a service outside the mesh.
    #[serde(default)]
    pub tls: InboundTls,
    /// Inbound: services (names resolved at connect time) whose connections
    /// are forwarded without TLS: callers that were left out of the mesh.
    #[serde(default)]
    pub plain_from: Vec<String>,
    /// Outbound HTTP: the upstream is chosen by the request's `Host`, so one
    /// address and port serves several services.
    #[serde(rename = "route", default)]
    pub routes: Vec<Route>,
}

/// What an inbound listener asks of its clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundTls {
    /// TLS with a client certificate from the CA (the mesh).
    #[default]
    Mtls,
    /// TLS; a client certificate is requested and verified when sent, not
    /// required (published ports that people use). With `http`, a
    /// plain-HTTP request is redirected to `https://`.
    Tls,
    /// No TLS: bytes pass through unchanged (published non-HTTP ports).
    None,
}

/// One upstream of a Host-routed outbound listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `Host` header values (without port) that go to this upstream.
    pub host: Vec<String>,
    /// Where to forward.
    #[serde(deserialize_with = "serde_str::one")]
    pub upstream: HostPort,
    /// The identity the upstream must present; absent: plaintext to a
    /// service outside the mesh.
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub server_name: Option<PeerId>,
}

/// Timeouts and caps.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest TLS handshake.
    #[serde(deserialize_with = "serde_str::one")]
    pub handshake_timeout: Span,
    /// Longest wait for an HTTP request's headers, from the previous
    /// response; on a new connection, for its first byte and then again for
    /// the rest of the head (HTTP listeners: edge, admin, CA).
    #[serde(deserialize_with = "serde_str::one")]
    pub header_timeout: Span,
    /// Close a connection with no traffic in either direction for this long.
    #[serde(deserialize_with = "serde_str::one")]
    pub idle_timeout: Span,
    /// Longest wait for the upstream to accept.
    #[serde(deserialize_with = "serde_str::one")]
    pub connect_timeout: Span,
    /// How long SIGTERM waits for open connections.
    #[serde(deserialize_with = "serde_str::one")]
    pub drain_timeout: Span,
    /// Most open connections per listener; more are refused at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let span = |s: u64| Span::new(std::time::Duration::from_secs(s)).expect("non-zero");
        Self {
            handshake_timeout: span(10),
            header_timeout: span(10),
            idle_timeout: span(300),
            connect_timeout: span(5),
            drain_timeout: span(15),
            max_connections: 10_000,
        }
    }
}

/// The whole sidecar configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cert dir to serve from and watch.
    pub cert_dir: PathBuf,
    /// HTTPS admin endpoint (`/healthz`, `/readyz`, `/metrics`); none when absent.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// Timeouts and caps.
    #[serde(default)]
    pub limits: Limits,
    /// The listeners.
    #[serde(rename = "listener", default)]
    pub listeners: Vec<ListenerConfig>,
    /// Public HTTPS edges.
    #[serde(rename = "edge", default)]
    pub edges: Vec<EdgeConfig>,
    /// Key exchange on every listener: `prefer` (post-quantum hybrid first,
    /// the default) or `require` (post-quantum hybrid only).
    #[serde(default)]
    pub kx: crate::tls::KxPolicy,
    /// Network enrolment: the cert dir is kept current through the CA.
    #[serde(default)]
    pub enrol: Option<crate::enrol::EnrolConfig>,
}

impl Config {
    /// Reads and checks a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, path)
    }

    /// Parses and checks TOML text; `origin` names it in errors (a file, or
    /// `$LANYARD_SIDECAR_CONFIG`).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })?;
        config.checked(&origin.display().to_string())
    }

    /// Checks cross-field rules and fills default names; `origin` names the source in errors.
    pub fn checked(mut self, origin: &str) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { origin: origin.to_owned(), message };
        if self.listeners.is_empty() && self.edges.is_empty() {
            return Err(invalid(
                "no listener: add a [[listener]] or [[edge]] table (or pass --listen and --upstream)".into(),
            ));
        }
        for e in &self.edges {
            if e.cert_dirs.is_empty() && e.on_demand.is_none() {
                return Err(invalid(format!(
                    "edge {}: cert_dirs is empty; give the public certificates' cert dirs, or [edge.on_demand]",
                    e.name
                )));
            }
            if e.on_demand.is_some() && e.acme_forward.is_none() {
                return Err(invalid(format!(
                    "edge {}: on_demand asks the CA for certificates: set acme_forward to the CA's HTTP listener",
                    e.name
                )));
            }
            if e.http_listen.as_ref() == Some(&e.https_listen) {
                return Err(invalid(format!("edge {}: https_listen and http_listen are the same address", e.name)));
            }
            e.headers.pairs().map_err(|m| invalid(format!("edge {}: {m}", e.name)))?;
        }
        let mut seen = std::collections::HashSet::new();
        for l in &mut self.listeners {
            if l.name.is_empty() {
                l.name = format!("{:?}-{}", l.mode, l.listen.port()).to_lowercase();
            }
            if !seen.insert(l.listen.clone()) {
                return Err(invalid(format!("listener {}: address {} is used twice", l.name, l.listen)));
            }
            match l.mode {
                Mode::Inbound if l.server_name.is_some() => {
                    return Err(invalid(format!("listener {}: server_name applies to outbound listeners only", l.name)))
                }
                Mode::Outbound if !l.allow.is_empty() => {
                    return Err(invalid(format!(
                        "listener {}: allow applies to inbound listeners; use server_name to pin the upstream",
                        l.name
                    )))
                }
                Mode::Outbound if l.proxy_protocol || l.http => {
                    return Err(invalid(format!(
                        "listener {}: proxy_protocol and http apply to inbound listeners",
                        l.name
                    )))
                }
                Mode::Inbound if l.proxy_protocol && l.http => {
                    return Err(invalid(format!(
                        "listener {}: choose proxy_protocol (L4) or http (XFCC header), not both",
                        l.name
                    )))
                }
                _ => {}
            }
            let routed = !l.routes.is_empty();
            if routed && (l.mode != Mode::Outbound || l.upstream.is_some() || l.server_name.is_some()) {
                return Err(invalid(format!(
                    "listener {}: route applies to outbound listeners without upstream and server_name",
                    l.name
                )));
            }
            if l.mode == Mode::Outbound && (l.tls == InboundTls::Tls || !l.plain_from.is_empty()) {
                return Err(invalid(format!(
                    "listener {}: outbound listeners take tls = \"mtls\" (the default) or \"none\" (plaintext to a service outside the mesh); plain_from is for inbound ones",
                    l.name
                )));
            }
            if l.mode == Mode::Outbound && l.tls == InboundTls::None {
                if l.server_name.is_some() {
                    return Err(invalid(format!(
                        "listener {}: a plaintext upstream has no server_name to check",
                        l.name
                    )));
                }
                continue;
            }
            if l.tls == InboundTls::None && (l.http || l.proxy_protocol || !l.allow.is_empty()) {
                return Err(invalid(format!(
                    "listener {}: tls = \"none\" passes bytes through; http, proxy_protocol and allow need TLS",
                    l.name
                )));
            }
            let Some(upstream) = &l.upstream else {
                if routed {
                    continue;
                }
                return Err(invalid(format!("listener {}: upstream is missing; give HOST:PORT", l.name)));
            };
            if l.mode == Mode::Outbound && l.server_name.is_none() {
                let host: Result<PeerId, NameError> = upstream.host().parse();
                match host {
                    Ok(id) => l.server_name = Some(id),
                    Err(_) => {
                        return Err(invalid(format!(
                            "listener {}: upstream {} is an address; give server_name (a DNS name or SPIFFE ID) to verify it",
                            l.name, upstream
                        )))
                    }
                }
            }
        }
        Ok(self)
    }
}

/// A TLS profile from Mozilla's server-side TLS guidelines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// TLS 1.2 and 1.3, ECDHE with AEAD suites: for general-purpose servers.
    #[default]
    Intermediate,
    /// TLS 1.3 only: for clients from 2019 on.
    Modern,
}

/// Response headers added by the edge; an empty value turns one off.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityHeaders {
    /// `Strict-Transport-Security` max-age.
    #[serde(deserialize_with = "serde_str::one")]
    pub hsts_max_age: Span,
    /// Add `includeSubDomains` to HSTS.
    pub hsts_include_subdomains: bool,
    /// Add `preload` to HSTS (opt-in: it is hard to undo).
    pub hsts_preload: bool,
    /// `Content-Security-Policy`.
    pub content_security_policy: String,
    /// `X-Frame-Options`.
    pub x_frame_options: String,
    /// `X-Content-Type-Options`.
    pub x_content_type_options: String,
    /// `Referrer-Policy`.
    pub referrer_policy: String,
    /// `Permissions-Policy`.
    pub permissions_policy: String,
}

impl Default for SecurityHeaders {
    fn default() -> Self {
        Self {
            hsts_max_age: Span::new(Duration::from_secs(2 * 365 * 24 * 3600)).expect("non-zero"),
            hsts_include_subdomains: true,
            hsts_preload: false,
            content_security_policy:
                "default-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'; object-src 'none'"
                    .into(),
            x_frame_options: "DENY".into(),
            x_content_type_options: "nosniff".into(),
            referrer_policy: "strict-origin-when-cross-origin".into(),
            permissions_policy: "camera=(), microphone=(), geolocation=(), payment=()".into(),
        }
    }
}

impl SecurityHeaders {
    /// The headers to add, checked; a bad value is named.
    pub fn pairs(&self) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let mut hsts = format!("max-age={}", self.hsts_max_age.get().as_secs());
        if self.hsts_include_subdomains {
            hsts.push_str("; includeSubDomains");
        }
        if self.hsts_preload {
            hsts.push_str("; preload");
        }
        [
            ("strict-transport-security", hsts.as_str()),
            ("content-security-policy", &self.content_security_policy),
            ("x-frame-options", &self.x_frame_options),
            ("x-content-type-options", &self.x_content_type_options),
            ("referrer-policy", &self.referrer_policy),
            ("permissions-policy", &self.permissions_policy),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| {
            let value =
                HeaderValue::from_str(v).map_err(|_| format!("headers: {k} value {v:?} is not a valid header"))?;
            Ok((HeaderName::from_static(k), value))
        })
        .collect()
    }
}

/// One edge: `[[edge]]` in the config file, or `sidecar run --mode edge`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Label in logs and health.
    #[serde(default = "default_edge_name")]
    pub name: String,
    /// HTTPS address.
    #[serde(deserialize_with = "serde_str::one")]
    pub https_listen: HostPort,
    /// Plain-HTTP address that redirects to HTTPS and forwards ACME challenges.
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub http_listen: Option<HostPort>,
    /// The app's HTTP address.
    #[serde(deserialize_with = "serde_str::one")]
    pub upstream: HostPort,
    /// Cert dirs of the public certificates, chosen by SNI; the first is the default.
    #[serde(default)]
    pub cert_dirs: Vec<PathBuf>,
    /// Where `/.well-known/acme-challenge/` requests go (the CA's HTTP listener).
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub acme_forward: Option<HostPort>,
    /// Mozilla TLS profile.
    #[serde(default)]
    pub profile: Profile,
    /// Security headers.
    #[serde(default)]
    pub headers: SecurityHeaders,
    /// Certificates for names no cert dir covers, ordered by the CA on the
    /// first handshake (the CA's `[on_demand]`).
    #[serde(default)]
    pub on_demand: Option<OnDemandEdge>,
}

fn default_edge_name() -> String {
    "edge".into()
}

/// `[edge.on_demand]`: a ClientHello for a name no cert dir covers asks
/// the CA (`acme_forward`) to order it, and waits for it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDemandEdge {
    /// Where the CA writes them, one cert dir per name (`DIR/NAME`): the
    /// CA's `[on_demand] out_dir`, mounted read-only.
    pub dir: PathBuf,
    /// How long a handshake waits for a new name's certificate before it
    /// gets the fallback.
    #[serde(default = "default_on_demand_wait", deserialize_with = "serde_str::one")]
    pub wait: Span,
    /// How often the names in use are reported to the CA, which removes
    /// names no edge used for its `[on_demand] idle`.
    #[serde(default = "default_on_demand_report", deserialize_with = "serde_str::one")]
    pub report_every: Span,
}

fn default_on_demand_wait() -> Span {
    "10s".parse().expect("valid")
}
fn default_on_demand_report() -> Span {
    "10m".parse().expect("valid")
}

impl OnDemandEdge {
    /// Reads a directory with the default wait and report period.
    pub fn in_dir(dir: PathBuf) -> Self {
        Self { dir, wait: default_on_demand_wait(), report_every: default_on_demand_report() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_safe_defaults_and_can_be_turned_off() {
        let pairs = SecurityHeaders::default().pairs().unwrap();
        let hsts = pairs.iter().find(|(k, _)| k == "strict-transport-security").unwrap();
        assert_eq!(hsts.1, "max-age=63072000; includeSubDomains");
        assert_eq!(pairs.len(), 6);
        let off = SecurityHeaders { x_frame_options: String::new(), ..Default::default() };
        assert_eq!(off.pairs().unwrap().len(), 5);
        let bad = SecurityHeaders { referrer_policy: "a\nb".into(), ..Default::default() };
        assert!(bad.pairs().unwrap_err().contains("referrer-policy"));
    }

    #[test]
    fn an_on_demand_edge_needs_the_ca_and_no_cert_dirs() {
        let edge = "cert_dir = \"/certs\"\n[[edge]]\nhttps_listen = \"0.0.0.0:443\"\nupstream = \"app:8080\"\n";
        let with_ca = format!("{edge}acme_forward = \"ca:8080\"\n[edge.on_demand]\ndir = \"/od\"\nwait = \"3s\"\n");
        let config = Config::from_toml(&with_ca, Path::new("s.toml")).unwrap();
        let od = config.edges[0].on_demand.as_ref().unwrap();
        assert_eq!(
            (od.dir.as_path(), od.wait.get().as_secs(), od.report_every.get().as_secs()),
            (Path::new("/od"), 3, 600)
        );
        let e =
            Config::from_toml(&format!("{edge}[edge.on_demand]\ndir = \"/od\"\n"), Path::new("s.toml")).unwrap_err();
        assert!(e.to_string().contains("set acme_forward"), "{e}");
        let e = Config::from_toml(edge, Path::new("s.toml")).unwrap_err();
        assert!(e.to_string().contains("cert_dirs is empty"), "{e}");
    }

    #[test]
    fn parses_a_two_listener_file() {
        let cfg: Config = toml::from_str(
            r#"
            cert_dir = "/certs"
            admin = "127.0.0.1:9901"
            [limits]
            idle_timeout = "1m"
            [[listener]]
            listen = "0.0.0.0:8443"
            upstream = "app:8080"
            allow = ["spiffe://lanyard.internal/web", "web"]
            proxy_protocol = true
            [[listener]]
            mode = "outbound"
            listen = "127.0.0.1:9000"
            upstream = "api:8443"
            "#,
        )
        .unwrap();
        let cfg = cfg.checked("test").unwrap();
        assert_eq!(cfg.listeners[0].allow.len(), 2);
        assert_eq!(cfg.listeners[1].server_name, Some("api".parse().unwrap()));
        assert_eq!(cfg.limits.idle_timeout.get().as_secs(), 60);
        assert_eq!(cfg.listeners[0].name, "inbound-8443");
    }

    #[test]
    fn refuses_bad_values_by_name() {
        let bad = r#"
            cert_dir = "/c"
            [[listener]]
            listen = "0.0.0.0:1"
            upstream = "app"
        "#;
        let e = toml::from_str::<Config>(bad).unwrap_err().to_string();
        assert!(e.contains("upstream") && e.contains("HOST:PORT"), "{e}");
        let outbound_ip = Config {
            cert_dir: "/c".into(),
            admin: None,
            limits: Limits::default(),
            edges: vec![],
            kx: Default::default(),
            enrol: None,
            listeners: vec![ListenerConfig {
                name: String::new(),
                mode: Mode::Outbound,
                listen: "127.0.0.1:1".parse().unwrap(),
                upstream: Some("10.0.0.1:443".parse().unwrap()),
                allow: vec![],
                server_name: None,
                proxy_protocol: false,
                http: false,
                alpn: vec![],
                tls: InboundTls::Mtls,
                plain_from: vec![],
                routes: vec![],
            }],
        };
        let e = outbound_ip.checked("cli").unwrap_err().to_string();
        assert!(e.contains("server_name"), "{e}");
    }
}
