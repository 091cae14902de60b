//! `lanyard.toml`, the configuration of `ca serve`, with environment
//! overrides (`LANYARD_STATE`, `HTTPS_PORT`, `HTTP_PORT`) injected as a map
//! so tests never touch the process environment.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use lanyard_sidecar::cli::serde_str;
use lanyard_sidecar::identity::{DnsName, SpiffeId, TrustDomain};
use lanyard_sidecar::span::Span;
use serde::Deserialize;

use crate::CaError;

fn default_ttl() -> Span {
    "24h".parse().expect("valid")
}

/// An identity whose cert dir the CA keeps current.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Service name.
    #[serde(deserialize_with = "serde_str::one")]
    pub name: DnsName,
    /// DNS SANs; empty means the name.
    #[serde(default, deserialize_with = "serde_str::vec")]
    pub dns: Vec<DnsName>,
    /// IP SANs.
    #[serde(default)]
    pub ip: Vec<IpAddr>,
    /// SPIFFE ID; defaults to spiffe://<trust-domain>/<name>.
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub spiffe: Option<SpiffeId>,
    /// Certificate lifetime.
    #[serde(default = "default_ttl", deserialize_with = "serde_str::one")]
    pub ttl: Span,
    /// The cert dir to keep current.
    pub out_dir: PathBuf,
    /// `host:port` of the admin endpoint of the sidecar serving this
    /// identity: during a root rotation the CA asks its `/readyz` which
    /// roots it serves, and `finish` waits until it has the new one.
    #[serde(default)]
    pub sidecar_admin: Option<String>,
}

/// `lanyard.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The CA state directory (`LANYARD_STATE` overrides).
    #[serde(default)]
    pub state: Option<PathBuf>,
    /// When the state directory holds no CA yet, create one for this trust
    /// domain (as `ca init` would); a CA of another trust domain is an error.
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub trust_domain: Option<TrustDomain>,
    /// HTTPS API address (`HTTPS_PORT` overrides the port).
    #[serde(default = "default_https")]
    pub https_listen: SocketAddr,
    /// Plain HTTP address, for ACME HTTP-01 and redirects (`HTTP_PORT` overrides the port).
    #[serde(default = "default_http")]
    pub http_listen: SocketAddr,
    /// DNS names of the API certificate (127.0.0.1 and ::1 are always added).
    #[serde(default = "default_api_names", deserialize_with = "serde_str::vec")]
    pub api_names: Vec<DnsName>,
    /// Lifetime of the API certificate.
    #[serde(default = "default_ttl", deserialize_with = "serde_str::one")]
    pub api_ttl: Span,
    /// Lifetime of certificates the API issues (`/v1/sign`, `/v1/enrol`,
    /// `/v1/renew`) to identities this CA does not manage itself.
    #[serde(default = "default_ttl", deserialize_with = "serde_str::one")]
    pub leaf_ttl: Span,
    /// How often the CRL is re-signed and redistributed.
    #[serde(default = "default_crl_refresh", deserialize_with = "serde_str::one")]
    pub crl_refresh: Span,
    /// Key exchange of the API and the ACME client: `prefer` (post-quantum
    /// hybrid first, the default) or `require` (post-quantum hybrid only).
    #[serde(default)]
    pub kx: lanyard_sidecar::tls::KxPolicy,
    /// Managed identities.
    #[serde(default, rename = "identity")]
    pub identities: Vec<IdentityConfig>,
    /// Docker discovery.
    #[serde(default)]
    pub docker: DockerConfig,
    /// Public certificates from ACME.
    #[serde(default)]
    pub public: Vec<crate::acme::PublicConfig>,
    /// ACME settings.
    #[serde(default)]
    pub acme: crate::acme::AcmeSettings,
    /// On-demand certificates: ordered when an edge first sees a name.
    #[serde(default)]
    pub on_demand: Option<crate::acme::OnDemandConfig>,
    /// The ACME server at `/acme/directory`, for the fleet's own ACME clients.
    #[serde(default)]
    pub acme_server: Option<crate::acme_server::AcmeServerConfig>,
    /// Where the store lives: `sqlite` (the default, `STATE/lanyard.db`) or
    /// `redis://HOST:PORT[/DB]` / `rediss://…` for replicas sharing one
    /// state (`REDIS_URL` overrides).
    #[serde(default, deserialize_with = "serde_str::opt")]
    pub store: Option<crate::store::StoreSpec>,
    /// The key that seals key material in a shared store; every replica
    /// needs the same one (default `STATE/store.key`, made on first use).
    #[serde(default)]
    pub store_key: Option<PathBuf>,
    /// A backup (`ca backup`, or the `lanyard-ca-seed` secret `ca inject
    /// --target swarm` writes) that seeds an empty shared store: its CA and
    /// its records (enrolment credentials).
    #[serde(default)]
    pub seed: Option<PathBuf>,
    /// How long the leader's lease lasts in a shared store: a dead leader
    /// is replaced within this plus a fifth of it.
    #[serde(default = "default_lease_ttl", deserialize_with = "serde_str::one")]
    pub lease_ttl: Span,
    /// Timeouts and the connection cap of the API and HTTP listeners
    /// (`handshake_timeout`, `header_timeout`, `idle_timeout`,
    /// `drain_timeout`, `max_connections`), as in the sidecar's `[limits]`.
    #[serde(default)]
    pub limits: lanyard_sidecar::config::Limits,
}

/// `[docker]`: discovery of containers labelled `lanyard.identity`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Whether to follow Docker.
    pub enabled: bool,
    /// The Docker socket.
    pub socket: String,
    /// Where cert dirs go when a container has no `lanyard.certdir` label (default `STATE/certs`).
    pub cert_root: Option<PathBuf>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self { enabled: false, socket: "/var/run/docker.sock".into(), cert_root: None }
    }
}

fn default_https() -> SocketAddr {
    "0.0.0.0:8443".parse().expect("valid")
}
fn default_http() -> SocketAddr {
    "0.0.0.0:8080".parse().expect("valid")
}
fn default_api_names() -> Vec<DnsName> {
    vec!["ca".parse().expect("valid"), "localhost".parse().expect("valid")]
}
fn default_lease_ttl() -> Span {
    "10s".parse().expect("valid")
}
fn default_crl_refresh() -> Span {
    "1h".parse().expect("valid")
}

impl ServeConfig {
    /// Reads `path` and applies `env` overrides.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Self, CaError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| CaError::ReadState { path: path.to_owned(), source })?;
        Self::parse(&text, &path.display().to_string(), env)
    }

    /// Parses TOML text (`origin` names it in errors) and applies `env` overrides.
    pub fn parse(text: &str, origin: &str, env: &HashMap<String, String>) -> Result<Self, CaError> {
        let invalid = |what: String| CaError::Config { origin: origin.to_owned(), what };
        let mut config: Self = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if let Some(state) = env.get("LANYARD_STATE") {
            config.state = Some(state.into());
        }
        for (var, addr) in [("HTTPS_PORT", &mut config.https_listen), ("HTTP_PORT", &mut config.http_listen)] {
            if let Some(port) = env.get(var) {
                let port: u16 = port.parse().map_err(|_| invalid(format!("{var}={port:?} is not a port number")))?;
                addr.set_port(port);
            }
        }
        if let Some(url) = env.get("REDIS_URL") {
            config.store = Some(url.parse().map_err(|e| invalid(format!("REDIS_URL: {e}")))?);
        }
        if config.state.is_none() {
            return Err(invalid("no state directory: set `state` or LANYARD_STATE".into()));
        }
        let mut names = std::collections::HashSet::new();
        for id in &config.identities {
            if !names.insert(id.name.clone()) {
                return Err(invalid(format!("identity {} is declared twice", id.name)));
            }
        }
        Ok(config)
    }

    /// The store this configuration names.
    pub fn store_spec(&self) -> crate::store::StoreSpec {
        self.store.clone().unwrap_or(crate::store::StoreSpec::Sqlite)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.as_deref().unwrap_or(Path::new("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_and_errors_name_the_field() {
        let env: HashMap<_, _> =
            [("HTTPS_PORT".to_owned(), "9443".to_owned()), ("LANYARD_STATE".into(), "/s".into())].into();
        let c = ServeConfig::parse("[[identity]]\nname = \"web\"\nout_dir = \"/c/web\"\nttl = \"1m\"\n", "t", &env)
            .unwrap();
        assert_eq!(c.https_listen.port(), 9443);
        assert_eq!(c.state_dir(), Path::new("/s"));
        assert_eq!(c.identities[0].ttl.get().as_secs(), 60);
        let e =
            ServeConfig::parse("[[identity]]\nname = \"a..b\"\nout_dir = \"/x\"\n", "lanyard.toml", &env).unwrap_err();
        assert!(e.to_string().contains("lanyard.toml") && e.to_string().contains("a..b"), "{e}");
        let bad_port: HashMap<_, _> = [("HTTP_PORT".to_owned(), "http".to_owned())].into();
        let e = ServeConfig::parse("state = \"/s\"", "t", &bad_port).unwrap_err();
        assert!(e.to_string().contains("HTTP_PORT"), "{e}");
    }

    /// Every CA config `ca inject` writes (the golden outputs) is one
    /// `ca serve` accepts, with the store it names.
    #[test]
    fn every_injected_ca_config_parses() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compose/tests/golden");
        let mut seen = 0;
        for entry in std::fs::read_dir(&golden).unwrap() {
            let path = entry.unwrap().path();
            if !path.to_string_lossy().ends_with(".out.yml") {
                continue;
            }
            let compose = lanyard_compose::Compose::parse(&std::fs::read_to_string(&path).unwrap(), "golden").unwrap();
            for name in ["lanyard-ca", "lanyard-ca-2"] {
                let Some(ca) = compose.service(name) else { continue };
                let toml = &ca.environment.iter().find(|(k, _)| k == "LANYARD_CONFIG").expect("LANYARD_CONFIG").1;
                let config = ServeConfig::parse(toml, &path.display().to_string(), &HashMap::new())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if path.ends_with("store-redis.out.yml") {
                    assert_eq!(
                        config.store_spec(),
                        crate::store::StoreSpec::Redis("redis://lanyard-redis:6379".into())
                    );
                }
                seen += 1;
            }
        }
        assert!(seen >= 7, "golden CA configs parsed: {seen}");
    }
}
