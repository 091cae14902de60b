//! `ca inject`: put a sidecar in front of every service of a compose file.
//!
//! For each service S (its app) the transform adds:
//! - `lanyard-S`, the sidecar. It takes over S's published ports, networks
//!   and aliases, so every caller that used `S:PORT` now reaches it, and it
//!   terminates mTLS there (inbound) and forwards to the app.
//! - `lanyard-S` (and `lanyard-S-2`, ... when S calls two services on one
//!   port), networks shared only by S's app and S's sidecar. The app leaves
//!   every other network, so nothing reaches its plaintext port. On these
//!   networks the sidecar carries the names of S's upstreams as aliases and
//!   listens on the address it has there, so the app's unchanged
//!   `http://upstream:port` reaches its own sidecar, which opens mTLS to the
//!   upstream's sidecar, and no other container can borrow S's identity.
//! - `lanyard-certs-S`, a volume that only the CA writes and only S's
//!   sidecar reads.
//!
//! One `lanyard-ca` service issues and rotates every certificate; its state
//! lives in the `lanyard-ca-state` volume, so identities survive `down`/`up`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lanyard_sidecar::identity::{DnsName, SpiffeId};
use lanyard_sidecar::span::Span;
use serde_norway::{Mapping, Value};

use crate::error::ComposeError;
use crate::model::{Attachment, Compose, Service, EXTENSION};
use crate::options::{Defaults, Protocol};

/// The CA service's name.
pub const CA_SERVICE: &str = "lanyard-ca";
/// Prefix of every name the transform adds.
pub const PREFIX: &str = "lanyard-";
/// Where the sidecar reads its cert dir.
const SIDECAR_CERTS: &str = "/certs";
/// Where an edge sidecar reads its public certificate.
const SIDECAR_PUBLIC: &str = "/public";
/// Where the CA finds `x-lanyard.acme_roots`.
const ACME_ROOTS: &str = "/etc/lanyard/acme-roots.pem";
/// The CA's plain-HTTP port, which answers ACME HTTP-01.
const CA_HTTP_PORT: u16 = 8080;
/// The CA's HTTPS API port inside its container.
const CA_API_PORT: u16 = 8443;

/// Settings given on the command line; they win over the top-level `x-lanyard`.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Certificate lifetime.
    pub ttl: Option<Span>,
    /// The Lanyard image.
    pub image: Option<String>,
}

/// The result of [`inject`].
#[derive(Clone, Debug)]
pub struct Injected {
    /// The rewritten file.
    pub compose: Compose,
    /// One line per service: what it got, or why it was left alone.
    pub report: Vec<String>,
}

/// A call from one service to another's port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    service: String,
    port: u16,
    protocol: Option<Protocol>,
}

/// What one injected service gets.
#[derive(Debug)]
struct Plan {
    inbound: Vec<(u16, Protocol)>,
    /// Upstreams through the sidecar, by private network index.
    outbound: Vec<(usize, String, u16)>,
    /// Opted-out services the app still reaches directly.
    plain: BTreeSet<String>,
    networks: usize,
    /// The app's HTTP port behind the edge, for a service with public names.
    public_port: Option<u16>,
}

/// Rewrites `compose` so that every service is behind a Lanyard sidecar.
pub fn inject(compose: &Compose, overrides: &Overrides) -> Result<Injected, ComposeError> {
    let mut defaults = compose.defaults.clone();
    if let Some(ttl) = overrides.ttl {
        defaults.ttl = ttl;
    }
    if let Some(image) = &overrides.image {
        defaults.image = image.clone();
    }
    for s in &compose.services {
        if s.name.starts_with(PREFIX) {
            return Err(ComposeError::service(
                &s.name,
                "",
                "names starting with lanyard- are Lanyard's own: is this file injected already? Inject the original file",
            ));
        }
    }
    let names: BTreeSet<&str> = compose.services.iter().map(|s| s.name.as_str()).collect();
    let calls: HashMap<&str, Vec<Call>> =
        compose.services.iter().map(|s| Ok((s.name.as_str(), calls_of(s, &names)?))).collect::<Result<_, _>>()?;
    let mut report = Vec::new();

    for s in compose.services.iter().filter(|s| !s.options.disable) {
        check_injectable(s)?;
    }
    let inbound = inbound_ports(compose, &calls);
    let mut plans: BTreeMap<&str, Plan> = BTreeMap::new();
    for s in compose.services.iter().filter(|s| !s.options.disable) {
        match plan(s, &calls[s.name.as_str()], &inbound, &names)? {
            Some(p) => {
                report.push(p.summary(&s.name));
                plans.insert(&s.name, p);
            }
            None => report.push(format!(
                "{}: left as is: no ports to protect and no calls to other services (declare them in x-lanyard.ports or x-lanyard.upstreams)",
                s.name
            )),
        }
    }
    for s in compose.services.iter().filter(|s| s.options.disable) {
        report.push(format!("{}: opted out (x-lanyard.disable)", s.name));
    }
    check_generated_names(&plans)?;
    let public: Vec<&Service> = compose
        .services
        .iter()
        .filter(|s| plans.get(s.name.as_str()).is_some_and(|p| p.public_port.is_some()))
        .collect();
    if public.len() > 1 {
        return Err(ComposeError::service(
            &public[1].name,
            "x-lanyard.public",
            format!("{} already takes the host's edge ports; put every public name on one service", public[0].name),
        ));
    }
    if !public.is_empty() && defaults.acme_email.is_none() {
        return Err(ComposeError::top("x-lanyard.acme_email", "public names need an ACME account email"));
    }
    if plans.is_empty() {
        return Err(ComposeError::top("services", "no service to protect: every service is opted out or has no ports"));
    }

    let mut doc = compose.doc.clone();
    let plain_targets: BTreeSet<&String> = plans.values().flat_map(|p| p.plain.iter()).collect();
    let mut services = Mapping::new();
    services.insert(CA_SERVICE.into(), ca_service(&defaults, &plans, compose));
    let mut networks = take_mapping(&mut doc, "networks")?;
    let mut volumes = take_mapping(&mut doc, "volumes")?;
    networks.insert(format!("{PREFIX}control").into(), mapping([("internal", Value::Bool(true))]));
    volumes.insert(format!("{PREFIX}ca-state").into(), Value::Null);
    for s in &compose.services {
        let Some(plan) = plans.get(s.name.as_str()) else {
            let mut raw = s.raw.clone();
            if plain_targets.contains(&s.name) {
                let mut attachments = attachments_or_default(s);
                attachments.push(Attachment {
                    network: plain_network(&s.name),
                    aliases: vec![],
                    extra: Mapping::new(),
                });
                raw.insert("networks".into(), networks_value(&attachments));
            }
            services.insert(s.name.clone().into(), Value::Mapping(raw));
            continue;
        };
        for k in 0..plan.networks {
            let mut settings = Mapping::new();
            if s.options.isolate {
                settings.insert("internal".into(), Value::Bool(true));
            }
            networks.insert(private_network(&s.name, k).into(), Value::Mapping(settings));
        }
        volumes.insert(certs_volume(&s.name).into(), Value::Null);
        if plan.public_port.is_some() {
            volumes.insert(public_volume(&s.name).into(), Value::Null);
            // The CA reaches the ACME server, and the edge reaches the CA, through it.
            networks.insert(format!("{PREFIX}control").into(), Value::Mapping(Mapping::new()));
        }
        services.insert(s.name.clone().into(), app_service(s, plan));
        services.insert(format!("{PREFIX}{}", s.name).into(), sidecar_service(s, plan, &defaults)?);
    }
    for t in &plain_targets {
        networks.insert(plain_network(t).into(), Value::Null);
    }
    doc.insert("services".into(), Value::Mapping(services));
    doc.insert("networks".into(), Value::Mapping(networks));
    doc.insert("volumes".into(), Value::Mapping(volumes));
    let compose = Compose::parse(&serde_norway::to_string(&doc).expect("serializable"), "injected output")?;
    Ok(Injected { compose, report })
}

/// The ports each injected service protects, with their protocols:
/// declared in `x-lanyard.ports`, else exposed, published and called by others.
fn inbound_ports<'a>(
    compose: &'a Compose,
    calls: &HashMap<&str, Vec<Call>>,
) -> BTreeMap<&'a str, BTreeMap<u16, Protocol>> {
    let mut inbound = BTreeMap::new();
    for s in compose.services.iter().filter(|s| !s.options.disable) {
        let mut ports: BTreeMap<u16, Option<Protocol>> = BTreeMap::new();
        if s.options.ports.is_empty() {
            for p in s.expose.iter().chain(s.ports.iter().map(|p| &p.target)) {
                ports.entry(*p).or_default();
            }
            for call in calls.values().flatten().filter(|c| c.service == s.name) {
                ports.entry(call.port).or_default();
            }
        } else {
            for p in &s.options.ports {
                ports.insert(p.port, p.protocol);
            }
        }
        let resolved = ports
            .into_iter()
            .map(|(port, declared)| {
                let called_http = calls
                    .values()
                    .flatten()
                    .any(|c| c.service == s.name && c.port == port && c.protocol == Some(Protocol::Http));
                let protocol = declared.unwrap_or(if called_http { Protocol::Http } else { Protocol::Tcp });
                (port, protocol)
            })
            .collect();
        inbound.insert(s.name.as_str(), resolved);
    }

    inbound
}

/// What service `s` gets: its inbound ports, its upstreams (each on a
/// private network index) and the opted-out services it reaches in
/// plaintext; `None` when there is nothing to protect.
fn plan(
    s: &Service,
    calls: &[Call],
    inbound: &BTreeMap<&str, BTreeMap<u16, Protocol>>,
    names: &BTreeSet<&str>,
) -> Result<Option<Plan>, ComposeError> {
    let mut targets: BTreeSet<(String, u16)> = BTreeSet::new();
    let mut plain = BTreeSet::new();
    let mut all_calls = calls.to_vec();
    for d in &s.depends_on {
        if let Some(ports) = inbound.get(d.service.as_str()) {
            all_calls.extend(ports.keys().map(|p| Call { service: d.service.clone(), port: *p, protocol: None }));
        } else if names.contains(d.service.as_str()) {
            plain.insert(d.service.clone());
        }
    }
    for c in all_calls.iter().filter(|c| c.service != s.name) {
        match inbound.get(c.service.as_str()) {
            Some(ports) if ports.contains_key(&c.port) => {
                targets.insert((c.service.clone(), c.port));
            }
            Some(ports) => {
                return Err(ComposeError::service(
                    &s.name,
                    EXTENSION,
                    format!(
                        "calls {}:{}, but {} protects only ports {:?}: add {} to its x-lanyard.ports",
                        c.service,
                        c.port,
                        c.service,
                        ports.keys().collect::<Vec<_>>(),
                        c.port
                    ),
                ))
            }
            None => {
                plain.insert(c.service.clone());
            }
        }
    }
    // Two upstreams on one port need two addresses: one private network each.
    let mut per_port: BTreeMap<u16, usize> = BTreeMap::new();
    let outbound: Vec<(usize, String, u16)> = targets
        .into_iter()
        .map(|(service, port)| {
            let k = per_port.entry(port).or_default();
            *k += 1;
            (*k - 1, service, port)
        })
        .collect();
    let networks = per_port.values().copied().max().unwrap_or(0).max(1);
    let ports = &inbound[s.name.as_str()];
    if ports.is_empty() && outbound.is_empty() {
        return Ok(None);
    }
    let inbound: Vec<(u16, Protocol)> = ports.iter().map(|(p, proto)| (*p, *proto)).collect();
    let public_port = if s.options.public.is_empty() {
        None
    } else {
        match s.options.public_port.or_else(|| inbound.first().map(|(p, _)| *p)) {
            Some(p) if inbound.iter().any(|(q, _)| *q == p) => Some(p),
            _ => {
                return Err(ComposeError::service(
                    &s.name,
                    "x-lanyard.public_port",
                    "the edge needs the app's HTTP port: set public_port to one of the service's ports",
                ))
            }
        }
    };
    Ok(Some(Plan { inbound, outbound, plain, networks, public_port }))
}

impl Plan {
    /// One line for the report.
    fn summary(&self, service: &str) -> String {
        let join = |items: Vec<String>| items.join(", ");
        let plain = if self.plain.is_empty() {
            String::new()
        } else {
            format!(" plain [{}]", join(self.plain.iter().cloned().collect()))
        };
        format!(
            "{service}: sidecar {PREFIX}{service} in [{}] out [{}]{plain}",
            join(self.inbound.iter().map(|(p, proto)| format!("{p}/{proto}")).collect()),
            join(self.outbound.iter().map(|(_, t, p)| format!("{t}:{p}")).collect()),
        )
    }
}

/// Generated DNS names must not collide: service `app-x`'s sidecar and
/// service `x`'s app alias would both be `lanyard-app-x`.
fn check_generated_names(plans: &BTreeMap<&str, Plan>) -> Result<(), ComposeError> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (name, plan) in plans {
        let mut generated = vec![format!("{PREFIX}{name}"), app_alias(name)];
        generated.extend((0..plan.networks).map(|k| out_alias(name, k)));
        for g in generated {
            if let Some(other) = seen.insert(g.clone(), name).filter(|o| o != name) {
                return Err(ComposeError::service(
                    name,
                    "",
                    format!("services {other} and {name} both lead to the name {g}: rename one of them"),
                ));
            }
        }
    }
    Ok(())
}

fn check_injectable(s: &Service) -> Result<(), ComposeError> {
    let refuse = |key: &str, why: &str| {
        Err(ComposeError::service(
            &s.name,
            key,
            format!("{why}; or opt the service out with `x-lanyard: {{disable: true}}`"),
        ))
    };
    if s.name.parse::<DnsName>().is_err() {
        return refuse(
            "",
            "the service name is not a DNS label, so it cannot be an identity: rename it (letters, digits, -)",
        );
    }
    if let Some(mode) = &s.network_mode {
        return refuse("network_mode", &format!("network_mode {mode:?} leaves no network for a sidecar to stand on"));
    }
    if s.get("links").is_some() {
        return refuse(
            "links",
            "links are legacy and bypass the sidecar: remove them (service names resolve without them)",
        );
    }
    for (i, p) in s.ports.iter().enumerate() {
        if p.protocol != "tcp" {
            return refuse(&format!("ports[{i}]"), &format!("{}/{}: Lanyard protects TCP only", p.target, p.protocol));
        }
    }
    Ok(())
}

/// The calls a service makes, from URLs and `host:port` in its environment
/// and from `x-lanyard.upstreams`.
fn calls_of(s: &Service, names: &BTreeSet<&str>) -> Result<Vec<Call>, ComposeError> {
    let mut calls = BTreeSet::new();
    for (_, value) in &s.environment {
        calls.extend(references(value, names));
    }
    for (i, u) in s.options.upstreams.iter().enumerate() {
        if !names.contains(u.service.as_str()) {
            return Err(ComposeError::service(
                &s.name,
                format!("x-lanyard.upstreams[{i}]"),
                format!("{} is not a service of this file", u.service),
            ));
        }
        calls.insert(Call { service: u.service.clone(), port: u.port.port, protocol: u.port.protocol });
    }
    Ok(calls.into_iter().collect())
}

/// Default ports of URL schemes that name no port.
fn scheme_port(scheme: &str) -> Option<u16> {
    Some(match scheme {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        "redis" | "rediss" => 6379,
        "postgres" | "postgresql" => 5432,
        "mysql" | "mariadb" => 3306,
        "mongodb" => 27017,
        "amqp" => 5672,
        "nats" => 4222,
        "memcached" => 11211,
        _ => return None,
    })
}

/// Service references in one environment value: `scheme://svc[:port]/...`
/// and bare `svc:port`, also inside comma-separated lists.
fn references(value: &str, names: &BTreeSet<&str>) -> Vec<Call> {
    let mut found = Vec::new();
    for token in value.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '"' | '\'' | '=')) {
        let (scheme, rest) = match token.split_once("://") {
            Some((scheme, rest)) => {
                (Some(scheme.rsplit(|c: char| !c.is_ascii_alphanumeric() && c != '+').next().unwrap_or(scheme)), rest)
            }
            None => (None, token),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) => (h, Some(p)),
                Err(_) => continue,
            },
            None => (host_port, None),
        };
        if !names.contains(host) {
            continue;
        }
        let scheme = scheme.map(|s| s.to_ascii_lowercase());
        let Some(port) = port.or_else(|| scheme.as_deref().and_then(scheme_port)) else { continue };
        let protocol = match scheme.as_deref() {
            Some("http" | "ws") => Some(Protocol::Http),
            _ => None,
        };
        found.push(Call { service: host.to_owned(), port, protocol });
    }
    found
}

fn private_network(service: &str, k: usize) -> String {
    match k {
        0 => format!("{PREFIX}{service}"),
        k => format!("{PREFIX}{service}-{}", k + 1),
    }
}

fn plain_network(service: &str) -> String {
    format!("{PREFIX}plain-{service}")
}

fn public_volume(service: &str) -> String {
    format!("{PREFIX}public-{service}")
}

fn certs_volume(service: &str) -> String {
    format!("{PREFIX}certs-{service}")
}

/// The alias the sidecar listens on, on private network `k`.
fn out_alias(service: &str, k: usize) -> String {
    format!("{PREFIX}out-{}", private_network(service, k).trim_start_matches(PREFIX))
}

/// The app's name on its first private network.
fn app_alias(service: &str) -> String {
    format!("{PREFIX}app-{service}")
}

fn mapping<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

fn strings<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Value {
    Value::Sequence(items.into_iter().map(|s| Value::String(s.into())).collect())
}

fn take_mapping(doc: &mut Mapping, key: &str) -> Result<Mapping, ComposeError> {
    match doc.remove(key) {
        None | Some(Value::Null) => Ok(Mapping::new()),
        Some(Value::Mapping(m)) => Ok(m),
        Some(_) => Err(ComposeError::top(key, "expected a mapping")),
    }
}

fn attachments_or_default(s: &Service) -> Vec<Attachment> {
    if s.networks.is_empty() {
        vec![Attachment { network: "default".into(), aliases: vec![], extra: Mapping::new() }]
    } else {
        s.networks.clone()
    }
}

fn networks_value(attachments: &[Attachment]) -> Value {
    let mut map = Mapping::new();
    for a in attachments {
        let mut settings = a.extra.clone();
        if !a.aliases.is_empty() {
            settings.insert("aliases".into(), strings(a.aliases.clone()));
        }
        let settings = if settings.is_empty() { Value::Null } else { Value::Mapping(settings) };
        map.insert(a.network.clone().into(), settings);
    }
    Value::Mapping(map)
}

/// A compose healthcheck that runs `sidecar health`: an HTTPS GET of `url`
/// verified against `cert_dir/ca.pem`.
fn https_healthcheck(cert_dir: &str, url: String) -> Value {
    let test = ["CMD", "/sidecar", "health", "--cert-dir", cert_dir, "--url", &url];
    mapping([
        ("test", strings(test)),
        ("interval", "5s".into()),
        ("timeout", "3s".into()),
        ("retries", Value::from(30)),
        ("start_period", "5s".into()),
    ])
}

fn hardening(service: &mut Mapping) {
    service.insert("restart".into(), "unless-stopped".into());
    service.insert("cap_drop".into(), strings(["ALL"]));
    service.insert("security_opt".into(), strings(["no-new-privileges:true"]));
}

fn app_service(s: &Service, plan: &Plan) -> Value {
    let mut raw = s.raw.clone();
    raw.remove("ports");
    let mut attachments: Vec<Attachment> = (0..plan.networks)
        .map(|k| Attachment {
            network: private_network(&s.name, k),
            aliases: if k == 0 { vec![app_alias(&s.name)] } else { vec![] },
            extra: Mapping::new(),
        })
        .collect();
    attachments.extend(plan.plain.iter().map(|t| Attachment {
        network: plain_network(t),
        aliases: vec![],
        extra: Mapping::new(),
    }));
    raw.insert("networks".into(), networks_value(&attachments));
    let mut depends = Mapping::new();
    for d in &s.depends_on {
        let mut settings = d.extra.clone();
        settings.insert("condition".into(), d.condition.clone().into());
        depends.insert(d.service.clone().into(), Value::Mapping(settings));
    }
    depends.insert(format!("{PREFIX}{}", s.name).into(), mapping([("condition", "service_healthy".into())]));
    raw.insert("depends_on".into(), Value::Mapping(depends));
    Value::Mapping(raw)
}

fn spiffe(defaults: &Defaults, service: &str) -> Result<SpiffeId, ComposeError> {
    defaults.trust_domain.id(service).map_err(|e| ComposeError::service(service, "", e.to_string()))
}

fn sidecar_service(s: &Service, plan: &Plan, defaults: &Defaults) -> Result<Value, ComposeError> {
    let allow = s
        .options
        .allow
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let key = || format!("x-lanyard.allow[{i}]");
            if a.starts_with("spiffe://") {
                a.parse::<SpiffeId>().map_err(|e| ComposeError::service(&s.name, key(), e.to_string()))
            } else {
                a.parse::<DnsName>().map_err(|e| {
                    ComposeError::service(&s.name, key(), format!("{e}: give a service name or a SPIFFE ID"))
                })?;
                spiffe(defaults, a)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut listeners = Vec::new();
    for (port, protocol) in &plan.inbound {
        let mut l = toml::Table::new();
        l.insert("name".into(), format!("in-{port}").into());
        l.insert("mode".into(), "inbound".into());
        l.insert("listen".into(), format!("0.0.0.0:{port}").into());
        l.insert("upstream".into(), format!("{}:{port}", app_alias(&s.name)).into());
        match protocol {
            Protocol::Http => l.insert("http".into(), true.into()),
            Protocol::Proxy => l.insert("proxy_protocol".into(), true.into()),
            Protocol::Tcp => None,
        };
        if !allow.is_empty() {
            l.insert("allow".into(), allow.iter().map(|a| toml::Value::from(a.as_str())).collect::<Vec<_>>().into());
        }
        listeners.push(toml::Value::Table(l));
    }
    for (k, target, port) in &plan.outbound {
        let mut l = toml::Table::new();
        l.insert("name".into(), format!("out-{target}-{port}").into());
        l.insert("mode".into(), "outbound".into());
        l.insert("listen".into(), format!("{}:{port}", out_alias(&s.name, *k)).into());
        l.insert("upstream".into(), format!("{PREFIX}{target}:{port}").into());
        l.insert("server_name".into(), spiffe(defaults, target)?.as_str().into());
        listeners.push(toml::Value::Table(l));
    }
    let mut config = toml::Table::new();
    config.insert("cert_dir".into(), SIDECAR_CERTS.into());
    config.insert("admin".into(), format!("127.0.0.1:{}", defaults.admin_port).into());
    config.insert("listener".into(), listeners.into());
    let public = plan.public_port.is_some();
    if let Some(port) = plan.public_port {
        let mut edge = toml::Table::new();
        edge.insert("name".into(), "public".into());
        edge.insert("https_listen".into(), "0.0.0.0:443".into());
        edge.insert("http_listen".into(), "0.0.0.0:80".into());
        edge.insert("upstream".into(), format!("{}:{port}", app_alias(&s.name)).into());
        edge.insert("cert_dirs".into(), vec![toml::Value::from(SIDECAR_PUBLIC)].into());
        edge.insert("acme_forward".into(), format!("{CA_SERVICE}:{CA_HTTP_PORT}").into());
        config.insert("edge".into(), vec![toml::Value::Table(edge)].into());
    }
    let config = toml::to_string(&config).expect("a TOML table serializes");

    let mut shared = attachments_or_default(s);
    for a in &mut shared {
        a.aliases.insert(0, s.name.clone());
    }
    if public {
        // To forward ACME HTTP-01 requests to the CA.
        shared.push(Attachment { network: format!("{PREFIX}control"), aliases: vec![], extra: Mapping::new() });
    }
    for k in 0..plan.networks {
        let mut aliases = vec![out_alias(&s.name, k)];
        aliases.extend(plan.outbound.iter().filter(|(n, _, _)| *n == k).map(|(_, t, _)| t.clone()));
        aliases.dedup();
        shared.push(Attachment { network: private_network(&s.name, k), aliases, extra: Mapping::new() });
    }

    let mut side = Mapping::new();
    side.insert("image".into(), defaults.image.clone().into());
    side.insert("command".into(), strings(["/sidecar", "run"]));
    side.insert("environment".into(), mapping([("LANYARD_SIDECAR_CONFIG", config.into())]));
    let mut volumes = vec![format!("{}:{SIDECAR_CERTS}:ro", certs_volume(&s.name))];
    if public {
        volumes.push(format!("{}:{SIDECAR_PUBLIC}:ro", public_volume(&s.name)));
    }
    side.insert("volumes".into(), strings(volumes));
    side.insert("networks".into(), networks_value(&shared));
    let mut ports = match s.get("ports") {
        Some(Value::Sequence(p)) => p.clone(),
        _ => Vec::new(),
    };
    if public {
        ports.push(format!("{}:80", defaults.edge_http).into());
        ports.push(format!("{}:443", defaults.edge_https).into());
    }
    if !ports.is_empty() {
        side.insert("ports".into(), Value::Sequence(ports));
    }
    side.insert("depends_on".into(), mapping([(CA_SERVICE, mapping([("condition", "service_healthy".into())]))]));
    // Verified against ca.pem, so this passes only once the sidecar serves a
    // valid certificate (its fallback does not verify); /readyz would also
    // wait for the app, which waits for the sidecar.
    let url = format!("https://127.0.0.1:{}/healthz", defaults.admin_port);
    side.insert("healthcheck".into(), https_healthcheck(SIDECAR_CERTS, url));
    hardening(&mut side);
    side.insert("read_only".into(), Value::Bool(true));
    Ok(Value::Mapping(side))
}

fn ca_service(defaults: &Defaults, plans: &BTreeMap<&str, Plan>, compose: &Compose) -> Value {
    let mut identities = Vec::new();
    let mut volumes = vec![format!("{PREFIX}ca-state:/state")];
    for name in plans.keys() {
        let s = compose.service(name).expect("planned services exist");
        let ttl = s.options.ttl.unwrap_or(defaults.ttl);
        let mut id = toml::Table::new();
        id.insert("name".into(), (*name).into());
        id.insert("dns".into(), vec![toml::Value::from(*name), format!("{PREFIX}{name}").into()].into());
        id.insert("ttl".into(), format!("{}s", ttl.get().as_secs().max(1)).into());
        id.insert("out_dir".into(), format!("/certs/{name}").into());
        identities.push(toml::Value::Table(id));
        volumes.push(format!("{}:/certs/{name}", certs_volume(name)));
    }
    let mut config = toml::Table::new();
    config.insert("trust_domain".into(), defaults.trust_domain.as_str().into());
    config.insert("state".into(), "/state".into());
    config.insert("https_listen".into(), format!("0.0.0.0:{CA_API_PORT}").into());
    config.insert("identity".into(), identities.into());
    let public: Vec<&Service> =
        plans.iter().filter(|(_, p)| p.public_port.is_some()).filter_map(|(n, _)| compose.service(n)).collect();
    let mut publics = Vec::new();
    for s in &public {
        let mut p = toml::Table::new();
        p.insert("name".into(), s.name.clone().into());
        p.insert(
            "domains".into(),
            s.options.public.iter().map(|d| toml::Value::from(d.as_str())).collect::<Vec<_>>().into(),
        );
        p.insert("email".into(), defaults.acme_email.clone().unwrap_or_default().into());
        if let Some(dir) = &defaults.acme_directory {
            p.insert("directory_url".into(), dir.clone().into());
        }
        p.insert("out_dir".into(), format!("/public/{}", s.name).into());
        publics.push(toml::Value::Table(p));
        volumes.push(format!("{}:/public/{}", public_volume(&s.name), s.name));
    }
    if !publics.is_empty() {
        config.insert("public".into(), publics.into());
        if defaults.acme_roots.is_some() {
            let mut acme = toml::Table::new();
            acme.insert("directory_roots".into(), ACME_ROOTS.into());
            config.insert("acme".into(), acme.into());
        }
    }
    let config = toml::to_string(&config).expect("a TOML table serializes");

    let mut ca = Mapping::new();
    ca.insert("image".into(), defaults.image.clone().into());
    ca.insert("command".into(), strings(["/ca", "serve"]));
    ca.insert("environment".into(), mapping([("LANYARD_CONFIG", config.into())]));
    if let Some(roots) = defaults.acme_roots.as_ref().filter(|_| !public.is_empty()) {
        volumes.push(format!("{roots}:{ACME_ROOTS}:ro"));
    }
    ca.insert("volumes".into(), strings(volumes));
    ca.insert("networks".into(), strings([format!("{PREFIX}control")]));
    if !public.is_empty() {
        // The ACME server is outside: `host.docker.internal` is the host.
        ca.insert("extra_hosts".into(), strings(["host.docker.internal:host-gateway"]));
    }
    let url = format!("https://127.0.0.1:{CA_API_PORT}/health");
    ca.insert("healthcheck".into(), https_healthcheck("/state/api", url));
    hardening(&mut ca);
    Value::Mapping(ca)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names<'a>(n: &[&'a str]) -> BTreeSet<&'a str> {
        n.iter().copied().collect()
    }

    #[test]
    fn finds_references_in_urls_and_host_ports() {
        let n = names(&["users", "cache", "db", "kafka"]);
        let calls =
            |v: &str| references(v, &n).into_iter().map(|c| (c.service, c.port, c.protocol)).collect::<Vec<_>>();
        assert_eq!(calls("http://users:4000/v1"), [("users".into(), 4000, Some(Protocol::Http))]);
        assert_eq!(calls("http://users/v1"), [("users".into(), 80, Some(Protocol::Http))]);
        assert_eq!(calls("redis://:secret@cache"), [("cache".into(), 6379, None)]);
        assert_eq!(calls("postgres://app:pw@db:5432/app?sslmode=disable"), [("db".into(), 5432, None)]);
        assert_eq!(calls("kafka:9092,other:1"), [("kafka".into(), 9092, None)]);
        assert!(calls("https://example.com:443, users, 4000, userservice:1").is_empty());
    }
}
