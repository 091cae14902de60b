//! The `x-lanyard` extensions: defaults at the top level, options per service.

use std::fmt;
use std::str::FromStr;

use lanyard_sidecar::identity::TrustDomain;
use lanyard_sidecar::span::Span;
use serde::Deserialize;
use serde_norway::Value;

use crate::error::ComposeError;
use crate::yaml::scalar;

/// The extension key Lanyard reads, at the top level and in services.
pub const EXTENSION: &str = "x-lanyard";

/// How a protected port is proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// Bytes, as they come (databases, caches, anything on TCP).
    Tcp,
    /// HTTP/1.1, request by request, with the caller's verified identity in
    /// `X-Forwarded-Client-Cert`.
    Http,
    /// Bytes, preceded by a PROXY v2 header carrying the caller's identity.
    Proxy,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Proxy => "proxy",
        })
    }
}

/// A port with its protocol: `3000`, `3000/http`, `6379/tcp`, `7000/proxy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    /// The port.
    pub port: u16,
    /// The protocol, when written.
    pub protocol: Option<Protocol>,
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, protocol) = match s.split_once('/') {
            None => (s, None),
            Some((p, "tcp")) => (p, Some(Protocol::Tcp)),
            Some((p, "http")) => (p, Some(Protocol::Http)),
            Some((p, "proxy")) => (p, Some(Protocol::Proxy)),
            Some((_, other)) => return Err(format!("unknown protocol {other:?} in {s:?}: use tcp, http or proxy")),
        };
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Self { port, protocol }),
            _ => Err(format!("{s:?} is not a port: write 3000, 3000/http, 6379/tcp or 7000/proxy")),
        }
    }
}

/// An upstream named in `x-lanyard.upstreams`: `service:port[/protocol]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UpstreamSpec {
    /// The service called.
    pub service: String,
    /// The port and protocol.
    pub port: PortSpec,
}

impl FromStr for UpstreamSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (service, port) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: write upstreams as SERVICE:PORT, such as users:4000 or cache:6379/tcp"))?;
        Ok(Self { service: service.to_owned(), port: port.parse()? })
    }
}

/// Per-service `x-lanyard`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceOptions {
    /// Leave this service as it is: no sidecar, no identity.
    #[serde(default)]
    pub disable: bool,
    /// The ports to protect; default: `expose`, the targets of `ports`, and
    /// the ports other services call this one on.
    #[serde(default, deserialize_with = "strings")]
    pub ports: Vec<PortSpec>,
    /// Calls that cannot be inferred from `depends_on` and URLs in the environment.
    #[serde(default, deserialize_with = "strings")]
    pub upstreams: Vec<UpstreamSpec>,
    /// Callers allowed in (service names or SPIFFE IDs); default: any service of the mesh.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Certificate lifetime for this service; default: the top-level `ttl`.
    #[serde(default, deserialize_with = "opt_span")]
    pub ttl: Option<Span>,
    /// Make the network between the app and its sidecar `internal`, cutting
    /// the app off from everything else, the internet included.
    #[serde(default)]
    pub isolate: bool,
    /// Public names served over HTTPS with ACME certificates (edge mode).
    #[serde(default)]
    pub public: Vec<String>,
    /// The app's HTTP port behind the edge; default: its first protected port.
    #[serde(default)]
    pub public_port: Option<u16>,
    /// TLS on published ports, by container port: `tls` (a server
    /// certificate; client certificates optional), `mtls` (required) or
    /// `none`. Default: `tls` for HTTP ports, `none` for the rest, so that
    /// `psql -h localhost` keeps working.
    #[serde(default)]
    pub published: std::collections::BTreeMap<u16, PublishedTls>,
}

/// TLS on a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishedTls {
    /// Server certificate only; client certificates requested, not required.
    Tls,
    /// A client certificate of the fleet is required.
    Mtls,
    /// Bytes pass through as the app speaks them.
    None,
}

/// An IPv4 block that the private networks' subnets are cut from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetPool {
    /// First address.
    pub base: u32,
    /// Prefix length.
    pub prefix: u8,
}

impl FromStr for SubnetPool {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an IPv4 block such as 10.213.0.0/16 (prefix 8 to 24)");
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=24).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Self { base: u32::from(ip) & mask, prefix })
    }
}

/// Top-level `x-lanyard`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    /// SPIFFE trust domain of the fleet.
    #[serde(deserialize_with = "one")]
    pub trust_domain: TrustDomain,
    /// Certificate lifetime.
    #[serde(deserialize_with = "one")]
    pub ttl: Span,
    /// The image with the `ca` and `sidecar` binaries.
    pub image: String,
    /// The sidecars' admin (health and metrics) port, on loopback.
    pub admin_port: u16,
    /// ACME account email, for public names.
    pub acme_email: Option<String>,
    /// ACME directory URL, for public names; default Let's Encrypt.
    pub acme_directory: Option<String>,
    /// A host file of PEM roots for the ACME server's HTTPS (a test CA such
    /// as Pebble's), mounted into the CA; default: the image's roots.
    pub acme_roots: Option<String>,
    /// Host side of the edge's port 80 mapping (`80`, `127.0.0.1:8080`, ...).
    pub edge_http: String,
    /// Host side of the edge's port 443 mapping.
    pub edge_https: String,
    /// Extra names (besides `localhost` and `127.0.0.1`) in the
    /// certificates of published HTTPS ports, such as the host's name.
    pub host_names: Vec<String>,
    /// Where the private networks' small subnets come from, so that a
    /// large project does not exhaust dockerd's default address pools.
    #[serde(deserialize_with = "one")]
    pub subnet_pool: SubnetPool,
    /// Where the CA keeps its state: unset for one CA with its embedded
    /// store; `redis` for a Redis service (AOF on) and two CA replicas on
    /// it; or a `redis://` / `rediss://` URL for two replicas on that Redis.
    #[serde(deserialize_with = "opt_store")]
    pub store: Option<StoreChoice>,
    /// The image of the Redis service that `store: redis` adds.
    pub redis_image: String,
    /// Docker Swarm (`ca inject --target swarm`): how services are reached,
    /// `vip` (a virtual IP, the default) or `dnsrr` (DNS round robin, for
    /// engines without IPVS).
    #[serde(deserialize_with = "one")]
    pub endpoint_mode: EndpointMode,
}

/// `deploy.endpoint_mode` of every service of a stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointMode {
    /// A virtual IP per service.
    #[default]
    Vip,
    /// DNS round robin over the tasks.
    Dnsrr,
}

impl FromStr for EndpointMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vip" => Ok(Self::Vip),
            "dnsrr" => Ok(Self::Dnsrr),
            other => Err(format!("endpoint_mode {other:?}: give vip or dnsrr")),
        }
    }
}

impl fmt::Display for EndpointMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Vip => "vip",
            Self::Dnsrr => "dnsrr",
        })
    }
}

/// `x-lanyard.store`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// A Redis service of the project's own.
    Service,
    /// A Redis outside the project.
    Url(String),
}

impl FromStr for StoreChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "redis" => Ok(Self::Service),
            url if url.starts_with("redis://") || url.starts_with("rediss://") => Ok(Self::Url(url.to_owned())),
            other => Err(format!(
                "store {other:?}: give `redis` (a Redis service and two CA replicas) or a redis:// or rediss:// URL; leave it out for one CA with its embedded store"
            )),
        }
    }
}

fn opt_store<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<StoreChoice>, D::Error> {
    one(d).map(Some)
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            trust_domain: "lanyard.internal".parse().expect("valid"),
            ttl: "24h".parse().expect("valid"),
            image: "lanyard:latest".into(),
            admin_port: 9901,
            acme_email: None,
            acme_directory: None,
            acme_roots: None,
            edge_http: "80".into(),
            edge_https: "443".into(),
            host_names: Vec::new(),
            subnet_pool: SubnetPool { base: u32::from(std::net::Ipv4Addr::new(10, 213, 0, 0)), prefix: 16 },
            store: None,
            redis_image: "redis:7".into(),
            endpoint_mode: EndpointMode::Vip,
        }
    }
}

impl Defaults {
    pub(crate) fn parse(v: &Value) -> Result<Self, ComposeError> {
        serde_norway::from_value(v.clone()).map_err(|e| ComposeError::top(EXTENSION, e.to_string()))
    }
}

impl ServiceOptions {
    pub(crate) fn parse(service: &str, v: &Value) -> Result<Self, ComposeError> {
        serde_norway::from_value(v.clone()).map_err(|e| ComposeError::service(service, EXTENSION, e.to_string()))
    }
}

fn one<'de, D: serde::Deserializer<'de>, T: FromStr>(d: D) -> Result<T, D::Error>
where
    T::Err: fmt::Display,
{
    let text = scalar_string(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn opt_span<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Span>, D::Error> {
    one(d).map(Some)
}

fn strings<'de, D: serde::Deserializer<'de>, T: FromStr>(d: D) -> Result<Vec<T>, D::Error>
where
    T::Err: fmt::Display,
{
    let list = Vec::<Value>::deserialize(d)?;
    list.iter()
        .map(|v| {
            let text = scalar(v).ok_or_else(|| serde::de::Error::custom("expected a list of strings"))?;
            text.parse().map_err(serde::de::Error::custom)
        })
        .collect()
}

fn scalar_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = Value::deserialize(d)?;
    scalar(&v).ok_or_else(|| serde::de::Error::custom("expected a string"))
}
