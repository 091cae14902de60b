//! `ca inject`: put a sidecar in front of every service of a compose file,
//! without cutting any call between services.
//!
//! The topology, for each injected service S (its app) and its sidecar
//! `lanyard-S`:
//! - The app leaves every network and joins `lanyard-S`, a private network
//!   (a small subnet from `x-lanyard.subnet_pool`) shared only with its
//!   sidecar, which forwards to the app's plaintext ports there.
//! - The sidecar takes over S's networks, names, aliases and published
//!   ports, and terminates mTLS on every known port of S.
//! - Reachability does not depend on guessing who calls whom: on the
//!   private network the sidecar answers, under their names, for every
//!   service that S could reach before (it shared a network with it), on
//!   each of that service's known ports, and opens mTLS to that service's
//!   sidecar, checking its SPIFFE ID. HTTP ports are routed by `Host`, so
//!   many services on port 80 share one address; two services on one
//!   non-HTTP port need a second private network (`lanyard-S-2`).
//! - Known ports: `x-lanyard.ports`, else `expose`, `ports`, ports other
//!   services name in URLs and config files, the image's `EXPOSE` (from the
//!   local engine) or the table of well-known images.
//! - What cannot be protected still works, in plaintext, and the report
//!   says so. A service left out of the mesh is called through the
//!   caller's own sidecar, which forwards plaintext to it (as
//!   `lanyard-direct-U`, an alias it gets on its own networks); a left-out
//!   caller reaches an injected service's sidecar, which lets it in without
//!   TLS from that caller's address only (`plain_from`). A service with no
//!   known port cannot be answered for: the report says to declare
//!   `x-lanyard.ports`.
//! - Published ports stay usable by people: HTTP ports answer HTTPS with a
//!   certificate that also names `localhost` (client certificates optional,
//!   plain HTTP redirected), other ports pass bytes through unchanged
//!   unless `x-lanyard.published` asks for `tls` or `mtls`.
//! - `lanyard-certs-S`, a volume that only the CA writes and only S's
//!   sidecar reads, and one `lanyard-ca` service that issues and rotates
//!   every certificate (state in `lanyard-ca-state`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use lanyard_sidecar::identity::{DnsName, SpiffeId};
use lanyard_sidecar::span::Span;
use serde::Serialize;
use serde_norway::{Mapping, Value};

use crate::error::ComposeError;
use crate::images::{well_known, ImagePorts, NoEngine};
use crate::model::{Attachment, Compose, PortMapping, Service};
use crate::options::{Defaults, Protocol, PublishedTls, StoreChoice};

/// The CA service's name.
pub const CA_SERVICE: &str = "lanyard-ca";
/// The second CA replica, with a shared store.
pub const CA_REPLICA: &str = "lanyard-ca-2";
/// The Redis service `store: redis` adds.
pub const REDIS_SERVICE: &str = "lanyard-redis";
/// The one-shot service that gives the CA's volumes to the image's user.
pub const VOLUMES_SERVICE: &str = "lanyard-volumes";
/// The unprivileged user (`uid:gid`) Lanyard's image runs as
/// (`scripts/build-images` makes it).
pub const IMAGE_USER: &str = "65532:65532";
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
/// The control network (the CA, and the edge that forwards ACME challenges to it).
const CONTROL: &str = "lanyard-control";
/// Prefix length of the networks Lanyard adds: room for the gateway, the
/// app and its sidecar (or the two ends of a plaintext pair).
const SUBNET_PREFIX: u8 = 28;
/// docker-compose v1's default thread budget, which nested start-ups share:
/// with more services ready at once than that, `up` deadlocks.
const V1_PARALLEL_LIMIT: usize = 64;

/// Settings given on the command line; they win over the top-level `x-lanyard`.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Certificate lifetime.
    pub ttl: Option<Span>,
    /// The Lanyard image.
    pub image: Option<String>,
    /// A Docker Swarm stack instead of a compose file, with its secrets
    /// named with this version (secrets are immutable: a new version is a
    /// new secret).
    pub swarm: Option<String>,
}

/// The secrets a stack from `--target swarm` needs, as files beside it.
pub const SWARM_SECRETS_DIR: &str = "lanyard-secrets";
/// The secret holding the store's sealing key.
pub const STORE_KEY_SECRET: &str = "lanyard-store-key";
/// The secret that seeds the store with the CA and the credentials.
pub const SEED_SECRET: &str = "lanyard-ca-seed";

/// The secret holding service `name`'s enrolment credential.
pub fn enrol_secret(name: &str) -> String {
    format!("{PREFIX}enrol-{name}")
}

/// The result of [`inject`].
#[derive(Clone, Debug)]
pub struct Injected {
    /// The rewritten file.
    pub compose: Compose,
    /// One line per service: what it got, or why it was left alone.
    pub report: Vec<String>,
    /// Every call between services and every published port, and what it became.
    pub paths: Vec<PathLine>,
    /// What the user should know: calls left in plaintext, UDP ports, ...
    pub warnings: Vec<String>,
    /// With `--target swarm`: the services whose sidecars enrol over the
    /// network, each needing its enrolment credential as a secret.
    pub enrolled: Vec<String>,
}

impl Injected {
    /// Whether some call between services stays in plaintext.
    pub fn has_plain_calls(&self) -> bool {
        self.paths.iter().any(|p| matches!(p.how, How::Plain(_)))
    }

    /// The report file: the service lines, the `--explain` table and the warnings.
    pub fn report_text(&self) -> String {
        let mut text = self.report.join("\n") + "\n\n" + &self.explain();
        if !self.warnings.is_empty() {
            text.push('\n');
            for w in &self.warnings {
                text += &format!("warning: {w}\n");
            }
        }
        text
    }

    /// The `--explain` table.
    pub fn explain(&self) -> String {
        let width = self.paths.iter().map(|p| p.from.len() + p.to.len() + 4).max().unwrap_or(0);
        let mut out = String::new();
        for p in &self.paths {
            let route = format!("{} -> {}", p.from, p.to);
            out.push_str(&format!("{route:<width$}  {}\n", p.how));
        }
        out
    }
}

/// One call or published port in the explanation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathLine {
    /// The caller: a service, or `host 127.0.0.1:8080` for a published port.
    pub from: String,
    /// The callee and port (`db:5432`, or `db` for every port).
    pub to: String,
    /// What it became.
    pub how: How,
}

/// What a call became.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum How {
    /// mTLS between the two sidecars; the callee's identity is checked.
    Mtls(String),
    /// Plaintext, and why.
    Plain(String),
    /// A published port, and what it serves people.
    Published(String),
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mtls(id) => write!(f, "mtls (server identity {id} checked)"),
            Self::Plain(why) => write!(f, "plain: {why}"),
            Self::Published(what) => write!(f, "published: {what}"),
        }
    }
}

/// Rewrites `compose` so that every service is behind a Lanyard sidecar,
/// knowing images only from the table.
pub fn inject(compose: &Compose, overrides: &Overrides) -> Result<Injected, ComposeError> {
    inject_with(compose, overrides, &NoEngine)
}

/// Rewrites `compose`, asking `images` for the ports of images the file does not describe.
pub fn inject_with(
    compose: &Compose,
    overrides: &Overrides,
    images: &dyn ImagePorts,
) -> Result<Injected, ComposeError> {
    let mut defaults = compose.defaults.clone();
    if let Some(ttl) = overrides.ttl {
        defaults.ttl = ttl;
    }
    if let Some(image) = &overrides.image {
        defaults.image = image.clone();
    }
    let swarm = overrides.swarm.as_deref();
    if swarm.is_some() && defaults.store.is_none() {
        // Replicas on several nodes share their state through Redis.
        defaults.store = Some(StoreChoice::Service);
    }
    let fleet = Fleet::read(compose, images)?;
    let mut warnings = compose.notes.clone();
    let mut plans: BTreeMap<&str, Plan> = BTreeMap::new();
    for s in fleet.injected() {
        plans.insert(&s.name, fleet.plan(s, &defaults, &mut warnings)?);
    }
    if plans.is_empty() {
        return Err(ComposeError::top("services", "no service to protect: every service is opted out"));
    }
    check_generated_names(&plans)?;
    let public: Vec<&str> = plans.iter().filter(|(_, p)| p.public_port.is_some()).map(|(n, _)| *n).collect();
    if public.len() > 1 {
        return Err(ComposeError::service(
            public[1],
            "x-lanyard.public",
            format!("{} already takes the host's edge ports; put every public name on one service", public[0]),
        ));
    }
    if let (Some(name), Some(_)) = (public.first(), swarm) {
        return Err(ComposeError::service(
            name,
            "x-lanyard.public",
            "public names (the edge) are not supported with --target swarm yet; publish the port instead",
        ));
    }
    if !public.is_empty() && defaults.acme_email.is_none() {
        return Err(ComposeError::top("x-lanyard.acme_email", "public names need an ACME account email"));
    }
    let paths = fleet.paths(&plans, &defaults);
    for p in &paths {
        if let How::Plain(why) = &p.how {
            warnings.push(format!("plaintext: {} -> {}: {why}", p.from, p.to));
        }
    }
    let mut report = Vec::new();
    for s in &compose.services {
        report.push(match (plans.get(s.name.as_str()), fleet.left_out(s)) {
            (Some(p), _) => p.summary(&s.name),
            (None, Some(why)) => format!("{}: left as is ({why})", s.name),
            (None, None) => unreachable!("every service is planned or left out"),
        });
    }

    let mut subnets = Subnets::new(&defaults, compose);
    let mut doc = compose.doc.clone();
    let mut networks = take_mapping(&mut doc, "networks")?;
    let mut volumes = take_mapping(&mut doc, "volumes")?;
    let mut services = Mapping::new();
    let ca = ca_service(&defaults, &plans, compose, swarm)?;
    if let Some(store) = &defaults.store {
        // Two replicas on one store; both answer as lanyard-ca (a stack has
        // `deploy.replicas: 2` instead).
        if swarm.is_none() {
            services.insert(CA_REPLICA.into(), ca.clone());
        }
        if *store == StoreChoice::Service {
            services.insert(REDIS_SERVICE.into(), redis_service(&defaults));
            volumes.insert(format!("{PREFIX}redis-data").into(), Value::Null);
        }
    }
    if swarm.is_none() {
        services.insert(VOLUMES_SERVICE.into(), volumes_service(&defaults, &ca));
    }
    services.insert(CA_SERVICE.into(), ca);
    let control_internal = public.is_empty();
    networks.insert(CONTROL.into(), network(&mut subnets, control_internal)?);
    volumes.insert(format!("{PREFIX}ca-state").into(), Value::Null);
    for s in &compose.services {
        let Some(plan) = plans.get(s.name.as_str()) else {
            let mut raw = s.raw.clone();
            if s.network_mode.is_none() {
                // The name its neighbours' sidecars forward plaintext to.
                let mut attachments = attachments_or_default(s);
                for a in &mut attachments {
                    a.aliases.push(direct_alias(&s.name));
                }
                raw.insert("networks".into(), networks_value(&attachments));
            }
            services.insert(s.name.clone().into(), Value::Mapping(raw));
            continue;
        };
        for k in 0..plan.networks {
            networks.insert(private_network(&s.name, k).into(), network(&mut subnets, s.options.isolate)?);
        }
        volumes.insert(certs_volume(&s.name).into(), Value::Null);
        if plan.public_port.is_some() {
            volumes.insert(public_volume(&s.name).into(), Value::Null);
        }
        services.insert(s.name.clone().into(), app_service(s, plan));
        services.insert(
            format!("{PREFIX}{}", s.name).into(),
            sidecar_service(s, plan, &defaults, compose.services.len(), swarm.is_some())?,
        );
    }
    if services.len() > V1_PARALLEL_LIMIT / 2 {
        warnings.push(format!(
            "{} services: docker-compose v1 (1.29) hangs when more than COMPOSE_PARALLEL_LIMIT (default {V1_PARALLEL_LIMIT}) start at once; run it with COMPOSE_PARALLEL_LIMIT={} (in the environment or the project's .env); compose v2 is not affected",
            services.len(),
            2 * services.len()
        ));
    }
    doc.insert("services".into(), Value::Mapping(services));
    doc.insert("networks".into(), Value::Mapping(networks));
    doc.insert("volumes".into(), Value::Mapping(volumes));
    let enrolled: Vec<String> = plans.keys().map(|n| n.to_string()).collect();
    if let Some(version) = swarm {
        crate::stack::rewrite(&mut doc, &defaults, &enrolled, version, &mut warnings);
    }
    let text = crate::yaml::to_string(&Value::Mapping(doc));
    let compose = Compose::parse(&text, "injected output")?;
    let enrolled = if swarm.is_some() { enrolled } else { Vec::new() };
    Ok(Injected { compose, report, paths, warnings, enrolled })
}

/// Every service with what the transform knows of it.
struct Fleet<'a> {
    compose: &'a Compose,
    /// Known TCP ports of each service, with their protocols.
    ports: BTreeMap<&'a str, BTreeMap<u16, Protocol>>,
    /// Services that get a sidecar.
    injected: BTreeSet<&'a str>,
    /// The input networks of each service (none for `network_mode: none`).
    networks: BTreeMap<&'a str, BTreeSet<String>>,
}

/// A call found in a service's environment, commands or config files.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    service: String,
    port: u16,
    protocol: Option<Protocol>,
}

impl<'a> Fleet<'a> {
    fn read(compose: &'a Compose, images: &dyn ImagePorts) -> Result<Self, ComposeError> {
        for s in &compose.services {
            if s.name.starts_with(PREFIX) {
                return Err(ComposeError::service(
                    &s.name,
                    "",
                    "names starting with lanyard- are Lanyard's own: is this file injected already? Inject the original file",
                ));
            }
        }
        let mut injected = BTreeSet::new();
        for s in &compose.services {
            if s.options.disable || s.network_mode.as_deref() == Some("none") {
                continue;
            }
            check_injectable(s)?;
            injected.insert(s.name.as_str());
        }
        let names = Names::of(compose);
        let mut calls: Vec<Call> = Vec::new();
        for s in &compose.services {
            calls.extend(calls_of(s, &names)?);
        }
        let mut ports = BTreeMap::new();
        for s in &compose.services {
            let called = calls.iter().filter(|c| c.service == s.name);
            let mut known: BTreeMap<u16, Option<Protocol>> = BTreeMap::new();
            if s.options.ports.is_empty() {
                // The table gives protocols; the engine, when it has the image, the ports.
                let table = s.image.as_deref().and_then(well_known).unwrap_or_default();
                let image_ports = match s.image.as_deref().and_then(|image| images.exposed(image)) {
                    Some(exposed) => exposed,
                    None => table.iter().map(|(p, _)| *p).collect(),
                };
                let declared = s.expose.iter().chain(s.ports.iter().filter(|p| p.protocol == "tcp").map(|p| &p.target));
                for p in declared.copied().chain(image_ports) {
                    known.entry(p).or_default();
                }
                for (p, proto) in table {
                    if let Some(slot) = known.get_mut(p) {
                        slot.get_or_insert(*proto);
                    }
                }
                for c in called.clone() {
                    known.entry(c.port).or_default();
                }
            } else {
                known.extend(s.options.ports.iter().map(|p| (p.port, p.protocol)));
            }
            let healthcheck = s.get("healthcheck").map(|h| format!("{h:?}"));
            let resolved = known
                .into_iter()
                .map(|(port, declared)| {
                    let http_call = called.clone().any(|c| c.port == port && c.protocol == Some(Protocol::Http));
                    let http_check = healthcheck.as_ref().is_some_and(|h| {
                        h.contains(&format!("http://localhost:{port}"))
                            || h.contains(&format!("http://127.0.0.1:{port}"))
                    });
                    // 80 and 8080 are HTTP by convention when nothing says otherwise.
                    let http = http_call || http_check || matches!(port, 80 | 8080);
                    let protocol = declared.unwrap_or(if http { Protocol::Http } else { Protocol::Tcp });
                    (port, protocol)
                })
                .collect();
            ports.insert(s.name.as_str(), resolved);
        }
        let networks = compose
            .services
            .iter()
            .map(|s| {
                let nets = if s.network_mode.is_some() {
                    BTreeSet::new()
                } else {
                    attachments_or_default(s).into_iter().map(|a| a.network).collect()
                };
                (s.name.as_str(), nets)
            })
            .collect();
        Ok(Self { compose, ports, injected, networks })
    }

    fn injected(&self) -> impl Iterator<Item = &'a Service> + '_ {
        self.compose.services.iter().filter(|s| self.injected.contains(s.name.as_str()))
    }

    /// Why `s` gets no sidecar, if it gets none.
    fn left_out(&self, s: &Service) -> Option<&'static str> {
        if self.injected.contains(s.name.as_str()) {
            None
        } else if s.options.disable {
            Some("opted out with x-lanyard.disable")
        } else {
            Some("network_mode: none")
        }
    }

    /// Services sharing a network with `name`, in file order.
    fn neighbours(&self, name: &str) -> Vec<&'a Service> {
        let own = &self.networks[name];
        self.compose
            .services
            .iter()
            .filter(|s| s.name != name && self.networks[s.name.as_str()].intersection(own).next().is_some())
            .collect()
    }

    /// The names by which `caller` reaches `callee`: its service name, its
    /// aliases on the networks they share, its `container_name`, and the
    /// aliases of `caller`'s links to it.
    fn names_of(&self, callee: &Service, caller: &Service) -> Vec<String> {
        let shared = &self.networks[caller.name.as_str()];
        let mut names = vec![callee.name.clone()];
        for a in attachments_or_default(callee).iter().filter(|a| shared.contains(&a.network)) {
            names.extend(a.aliases.iter().cloned());
        }
        names.extend(callee.container_name.iter().cloned());
        names.extend(caller.links.iter().filter(|(s, _)| *s == callee.name).map(|(_, alias)| alias.clone()));
        let mut seen = BTreeSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }

    fn plan(&self, s: &'a Service, defaults: &Defaults, warnings: &mut Vec<String>) -> Result<Plan, ComposeError> {
        let inbound: Vec<(u16, Protocol)> = self.ports[s.name.as_str()].iter().map(|(p, proto)| (*p, *proto)).collect();
        let neighbours = self.neighbours(&s.name);
        if inbound.is_empty() && !neighbours.is_empty() {
            warnings.push(format!(
                "{}: no known port, so no other service can reach it (fine for workers); if one calls it, declare x-lanyard.ports",
                s.name
            ));
        }
        for n in neighbours
            .iter()
            .filter(|n| !self.injected.contains(n.name.as_str()) && self.ports[n.name.as_str()].is_empty())
        {
            warnings.push(format!(
                "{} -> {}: {} is left out of the mesh and has no known port, so {}'s sidecar cannot forward to it; declare its x-lanyard.ports",
                s.name, n.name, n.name, s.name
            ));
        }
        let plain_from: Vec<String> = neighbours
            .iter()
            .filter(|n| !self.injected.contains(n.name.as_str()) && !inbound.is_empty())
            .map(|n| direct_alias(&n.name))
            .collect();

        // Every protected neighbour, on the first private network where its
        // ports are free (HTTP ports share by Host).
        let mut slots: BTreeMap<(usize, u16), (bool, Vec<Target>)> = BTreeMap::new();
        let mut claimed: BTreeMap<String, String> = BTreeMap::new();
        for t in &neighbours {
            let ports = &self.ports[t.name.as_str()];
            if ports.is_empty() {
                continue;
            }
            let mtls = self.injected.contains(t.name.as_str());
            let fits = |k: usize| {
                ports.iter().all(|(p, proto)| match slots.get(&(k, *p)) {
                    None => true,
                    Some((http, _)) => *http && *proto == Protocol::Http,
                })
            };
            let k = (0..).find(|k| fits(*k)).expect("an empty network always fits");
            let mut names = Vec::new();
            for n in self.names_of(t, s) {
                match claimed.get(&n) {
                    Some(other) if *other != t.name => warnings.push(format!(
                        "{}: the name {n} means both {other} and {}; {} keeps it",
                        s.name, t.name, other
                    )),
                    _ => {
                        claimed.insert(n.clone(), t.name.clone());
                        names.push(n);
                    }
                }
            }
            for (p, proto) in ports {
                let slot = slots.entry((k, *p)).or_insert((*proto == Protocol::Http, Vec::new()));
                slot.1.push(Target { service: t.name.clone(), names: names.clone(), mtls });
            }
        }
        let networks = slots.keys().map(|(k, _)| k + 1).max().unwrap_or(1);
        let outbound =
            slots.into_iter().map(|((k, port), (_, targets))| Outbound { network: k, port, targets }).collect();

        let mut used: BTreeSet<u16> = inbound.iter().map(|(p, _)| *p).collect();
        let mut published = Vec::new();
        let public_port = self.public_port(s, &inbound)?;
        let edge_ports: Vec<u16> = if public_port.is_some() {
            [&defaults.edge_http, &defaults.edge_https]
                .iter()
                .filter_map(|h| h.rsplit(':').next()?.parse().ok())
                .collect()
        } else {
            Vec::new()
        };
        for m in &s.ports {
            if m.protocol != "tcp" {
                warnings.push(format!(
                    "{}: port {} is {}: published as it is, to the app, unprotected (Lanyard carries TCP only)",
                    s.name, m.target, m.protocol
                ));
                continue;
            }
            if m.host_port().is_some_and(|p| edge_ports.contains(&p)) {
                // The edge takes the host's 80/443 over (below).
                continue;
            }
            let protocol = self.ports[s.name.as_str()].get(&m.target).copied().unwrap_or(Protocol::Tcp);
            let tls = s.options.published.get(&m.target).copied().unwrap_or(if protocol == Protocol::Http {
                PublishedTls::Tls
            } else {
                PublishedTls::None
            });
            let mut listen = if m.target < 40000 { m.target + 20000 } else { m.target - 20000 };
            while !used.insert(listen) {
                listen += 1;
            }
            published.push(Published { mapping: m.clone(), listen, http: protocol == Protocol::Http, tls });
        }
        Ok(Plan { identity: identity_name(s)?, inbound, outbound, plain_from, networks, published, public_port })
    }

    fn public_port(&self, s: &Service, inbound: &[(u16, Protocol)]) -> Result<Option<u16>, ComposeError> {
        if s.options.public.is_empty() {
            return Ok(None);
        }
        let first_http = inbound.iter().find(|(_, p)| *p == Protocol::Http).or(inbound.first()).map(|(p, _)| *p);
        match s.options.public_port.or(first_http) {
            Some(p) if inbound.iter().any(|(q, _)| *q == p) => Ok(Some(p)),
            _ => Err(ComposeError::service(
                &s.name,
                "x-lanyard.public_port",
                "the edge needs the app's HTTP port: set public_port to one of the service's ports (or list it in x-lanyard.ports)",
            )),
        }
    }

    /// The explanation: every call between neighbours and every published port.
    fn paths(&self, plans: &BTreeMap<&str, Plan>, defaults: &Defaults) -> Vec<PathLine> {
        let mut paths = Vec::new();
        for caller in &self.compose.services {
            let caller_in = plans.contains_key(caller.name.as_str());
            for callee in self.neighbours(&caller.name) {
                let callee_in = plans.contains_key(callee.name.as_str());
                if !caller_in && !callee_in {
                    continue;
                }
                for port in self.ports[callee.name.as_str()].keys() {
                    let (from, to) = (caller.name.clone(), format!("{}:{port}", callee.name));
                    let how = match (caller_in, callee_in) {
                        (true, true) => {
                            How::Mtls(spiffe(defaults, &callee.name).map(|i| i.to_string()).unwrap_or_default())
                        }
                        (true, false) => How::Plain(format!(
                            "{} is left out of the mesh; {from}'s sidecar forwards to it in plaintext",
                            callee.name
                        )),
                        _ => How::Plain(format!(
                            "{from} is left out of the mesh; {}'s sidecar lets it in without TLS from {from}'s address only",
                            callee.name
                        )),
                    };
                    paths.push(PathLine { from, to, how });
                }
            }
        }
        for (name, plan) in plans {
            for p in &plan.published {
                let what = match p.tls {
                    PublishedTls::None => "plain, as the app speaks it (x-lanyard.published: {PORT: tls} to encrypt)".into(),
                    PublishedTls::Tls if p.http => {
                        "HTTPS with a fleet certificate for localhost (run ca trust); client certificates optional; plain HTTP redirected".into()
                    }
                    PublishedTls::Tls => "TLS with a fleet certificate; client certificates optional".to_owned(),
                    PublishedTls::Mtls => "mTLS: a client certificate of the fleet is required".to_owned(),
                };
                let host = if p.mapping.host.is_empty() { "a random port".to_owned() } else { p.mapping.host.clone() };
                paths.push(PathLine {
                    from: format!("host {host}"),
                    to: format!("{name}:{}", p.mapping.target),
                    how: How::Published(what),
                });
            }
            if let Some(port) = plan.public_port {
                let what = "public HTTPS through the edge with an ACME certificate".to_owned();
                let names = self.compose.service(name).map(|s| s.options.public.join(", ")).unwrap_or_default();
                paths.push(PathLine {
                    from: format!("public {names}"),
                    to: format!("{name}:{port}"),
                    how: How::Published(what),
                });
            }
        }
        paths
    }
}

/// Every name a service can be called by, mapped to the service.
struct Names<'a>(BTreeMap<&'a str, &'a str>);

impl<'a> Names<'a> {
    fn of(compose: &'a Compose) -> Self {
        let mut map = BTreeMap::new();
        for s in &compose.services {
            map.insert(s.name.as_str(), s.name.as_str());
        }
        for s in &compose.services {
            let aliases = s.networks.iter().flat_map(|a| a.aliases.iter()).chain(s.container_name.iter());
            for a in aliases {
                map.entry(a.as_str()).or_insert(s.name.as_str());
            }
            for (target, alias) in &s.links {
                if let Some(t) = compose.service(target) {
                    map.entry(alias.as_str()).or_insert(t.name.as_str());
                }
            }
        }
        Self(map)
    }

    fn service(&self, name: &str) -> Option<&'a str> {
        self.0.get(name).copied()
    }
}

/// One service that a routed or plain outbound listener leads to.
#[derive(Clone, Debug)]
struct Target {
    service: String,
    /// The names the caller uses for it (aliases on the private network).
    names: Vec<String>,
    /// mTLS to its sidecar; else plaintext to a service left out of the mesh.
    mtls: bool,
}

impl Target {
    /// Where the caller's sidecar connects.
    fn upstream(&self, port: u16) -> String {
        if self.mtls {
            format!("{PREFIX}{}:{port}", self.service)
        } else {
            format!("{}:{port}", direct_alias(&self.service))
        }
    }
}

/// An outbound listener: one port on one private network.
#[derive(Debug)]
struct Outbound {
    network: usize,
    port: u16,
    /// One target, or several HTTP ones routed by `Host`.
    targets: Vec<Target>,
}

/// A published port, served to people by the sidecar on `listen`.
#[derive(Debug)]
struct Published {
    mapping: PortMapping,
    listen: u16,
    http: bool,
    tls: PublishedTls,
}

/// What one injected service gets.
#[derive(Debug)]
struct Plan {
    /// The identity's name at the CA (the service name as a DNS label).
    identity: String,
    inbound: Vec<(u16, Protocol)>,
    outbound: Vec<Outbound>,
    /// Left-out neighbours let in without TLS.
    plain_from: Vec<String>,
    networks: usize,
    published: Vec<Published>,
    /// The app's HTTP port behind the edge, for a service with public names.
    public_port: Option<u16>,
}

impl Plan {
    /// One line for the report.
    fn summary(&self, service: &str) -> String {
        let join = |items: Vec<String>| items.join(", ");
        let targets: BTreeSet<&str> =
            self.outbound.iter().flat_map(|o| o.targets.iter().map(|t| t.service.as_str())).collect();
        let mut line = format!(
            "{service}: sidecar {PREFIX}{service} in [{}] out [{}]",
            join(self.inbound.iter().map(|(p, proto)| format!("{p}/{proto}")).collect()),
            join(targets.into_iter().map(str::to_owned).collect()),
        );
        if !self.published.is_empty() {
            let published = self.published.iter().map(|p| {
                let host = if p.mapping.host.is_empty() { "?".to_owned() } else { p.mapping.host.clone() };
                format!("{host}->{}/{}", p.mapping.target, tls_name(p.tls))
            });
            line.push_str(&format!(" published [{}]", join(published.collect())));
        }
        line
    }
}

fn tls_name(t: PublishedTls) -> &'static str {
    match t {
        PublishedTls::Tls => "tls",
        PublishedTls::Mtls => "mtls",
        PublishedTls::None => "plain",
    }
}

/// The CA identity name of `s`: its name as a DNS label (`_` becomes `-`).
fn identity_name(s: &Service) -> Result<String, ComposeError> {
    let name = s.name.replace('_', "-").to_ascii_lowercase();
    name.parse::<DnsName>().map(|_| name).map_err(|e| {
        ComposeError::service(&s.name, "", format!("{e}: the service name must work as an identity; rename it"))
    })
}

/// Generated names must not collide: service `app-x`'s sidecar and
/// service `x`'s app alias would both be `lanyard-app-x`.
fn check_generated_names(plans: &BTreeMap<&str, Plan>) -> Result<(), ComposeError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for (name, plan) in plans {
        let mut generated = vec![format!("{PREFIX}{name}"), app_alias(name), format!("identity {}", plan.identity)];
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
    if let Some(mode) = &s.network_mode {
        let why = if mode == "host" {
            "network_mode: host shares the host's network, where no sidecar can stand in front of the app".to_owned()
        } else if mode.starts_with("service:") || mode.starts_with("container:") {
            format!("network_mode: {mode} puts the app in another container's network, which that container's sidecar cannot tell apart")
        } else {
            format!("network_mode: {mode} leaves no network for a sidecar to stand on; remove it to use the project's networks")
        };
        return refuse("network_mode", &why);
    }
    let tcp = !s.options.ports.is_empty() || !s.expose.is_empty() || s.ports.iter().any(|p| p.protocol == "tcp");
    if !tcp && s.ports.iter().any(|p| p.protocol != "tcp") {
        return refuse("ports", "every port of this service is UDP, and Lanyard protects TCP only");
    }
    Ok(())
}

/// The calls a service makes: URLs and `host:port` in its environment,
/// commands and config files, `*_HOST` + `*_PORT` variable pairs, and
/// `x-lanyard.upstreams`.
fn calls_of(s: &Service, names: &Names) -> Result<Vec<Call>, ComposeError> {
    let mut calls = BTreeSet::new();
    for text in s.environment.iter().map(|(_, v)| v).chain(&s.texts) {
        calls.extend(references(text, names));
    }
    for (key, value) in &s.environment {
        let Some(target) = names.service(value) else { continue };
        let Some(stem) = ["_HOST", "_HOSTNAME", "_SERVER", "_ADDR"].iter().find_map(|suffix| key.strip_suffix(suffix))
        else {
            continue;
        };
        let port = s.environment.iter().find(|(k, _)| *k == format!("{stem}_PORT")).and_then(|(_, v)| v.parse().ok());
        if let Some(port) = port {
            calls.insert(Call { service: target.to_owned(), port, protocol: None });
        }
    }
    for (i, u) in s.options.upstreams.iter().enumerate() {
        let Some(target) = names.service(&u.service) else {
            return Err(ComposeError::service(
                &s.name,
                format!("x-lanyard.upstreams[{i}]"),
                format!("{} is not a service of this file", u.service),
            ));
        };
        calls.insert(Call { service: target.to_owned(), port: u.port.port, protocol: u.port.protocol });
    }
    calls.retain(|c| c.service != s.name);
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

/// Service references in one text: `scheme://svc[:port]/...` and bare
/// `svc:port`, also inside comma-separated lists and config files.
fn references(value: &str, names: &Names) -> Vec<Call> {
    let mut found = Vec::new();
    for token in
        value.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '"' | '\'' | '=' | '(' | ')' | '<' | '>'))
    {
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
        let Some(service) = names.service(host) else { continue };
        let scheme = scheme.map(|s| s.to_ascii_lowercase());
        let Some(port) = port.or_else(|| scheme.as_deref().and_then(scheme_port)) else { continue };
        let protocol = match scheme.as_deref() {
            Some("http" | "ws") => Some(Protocol::Http),
            _ => None,
        };
        found.push(Call { service: service.to_owned(), port, protocol });
    }
    found
}

/// Cuts /28 subnets from `x-lanyard.subnet_pool`, starting at an offset
/// derived from the project's services so that two projects on one host
/// rarely meet; one project never overlaps itself.
struct Subnets {
    base: u32,
    count: u32,
    next: u32,
    handed: u32,
}

impl Subnets {
    fn new(defaults: &Defaults, compose: &Compose) -> Self {
        let pool = defaults.subnet_pool;
        let count = 1u32 << (SUBNET_PREFIX - pool.prefix);
        // FNV-1a over the service names: stable for a file, different across projects.
        let mut hash: u32 = 0x811c_9dc5;
        for b in compose.services.iter().flat_map(|s| s.name.bytes().chain([0])) {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        // Start on a /24 boundary inside the pool.
        let per_24 = 1u32 << (SUBNET_PREFIX - 24);
        let start = (hash % (count / per_24).max(1)) * per_24;
        Self { base: pool.base, count, next: start, handed: 0 }
    }

    fn take(&mut self) -> Result<String, ComposeError> {
        if self.handed == self.count {
            return Err(ComposeError::top(
                "x-lanyard.subnet_pool",
                format!(
                    "the pool holds {} /{SUBNET_PREFIX} subnets, and this project needs more: give a larger pool",
                    self.count
                ),
            ));
        }
        let ip = std::net::Ipv4Addr::from(self.base + (self.next % self.count) * (1 << (32 - SUBNET_PREFIX)));
        self.next += 1;
        self.handed += 1;
        Ok(format!("{ip}/{SUBNET_PREFIX}"))
    }
}

/// A network Lanyard adds, with a subnet of its own.
fn network(subnets: &mut Subnets, internal: bool) -> Result<Value, ComposeError> {
    let mut settings = Mapping::new();
    if internal {
        settings.insert("internal".into(), Value::Bool(true));
    }
    settings.insert(
        "ipam".into(),
        mapping([("config", Value::Sequence(vec![mapping([("subnet", subnets.take()?.into())])]))]),
    );
    Ok(Value::Mapping(settings))
}

fn private_network(service: &str, k: usize) -> String {
    match k {
        0 => format!("{PREFIX}{service}"),
        k => format!("{PREFIX}{service}-{}", k + 1),
    }
}

/// The alias of a service left out of the mesh, on its own networks.
fn direct_alias(service: &str) -> String {
    format!("{PREFIX}direct-{service}")
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

pub(crate) fn mapping<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

pub(crate) fn strings<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Value {
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
/// verified against `cert_dir/ca.pem`. Every check is a `docker exec`,
/// which costs the engine a process: a large project checks less often.
fn https_healthcheck(cert_dir: &str, url: String, services: usize) -> Value {
    let test = ["CMD", "/sidecar", "health", "--cert-dir", cert_dir, "--url", &url];
    let interval = (services / 10).clamp(5, 30);
    mapping([
        ("test", strings(test)),
        ("interval", format!("{interval}s").into()),
        ("timeout", "10s".into()),
        ("retries", Value::from(30)),
        ("start_period", "5s".into()),
    ])
}

/// A tmpfs mount (long volume syntax).
fn tmpfs(target: &str) -> Value {
    mapping([("type", "tmpfs".into()), ("target", target.into())])
}

fn hardening(service: &mut Mapping) {
    service.insert("restart".into(), "unless-stopped".into());
    service.insert("cap_drop".into(), strings(["ALL"]));
    service.insert("security_opt".into(), strings(["no-new-privileges:true"]));
}

fn app_service(s: &Service, plan: &Plan) -> Value {
    let mut raw = s.raw.clone();
    raw.remove("links");
    // UDP ports stay with the app: the sidecar carries TCP only.
    let udp: Vec<Value> = s.ports.iter().filter(|p| p.protocol != "tcp").map(|p| p.raw.clone()).collect();
    if udp.is_empty() {
        raw.remove("ports");
    } else {
        raw.insert("ports".into(), Value::Sequence(udp));
    }
    let attachments: Vec<Attachment> = (0..plan.networks)
        .map(|k| Attachment {
            network: private_network(&s.name, k),
            aliases: if k == 0 { vec![app_alias(&s.name)] } else { vec![] },
            extra: Mapping::new(),
        })
        .collect();
    raw.insert("networks".into(), networks_value(&attachments));
    let mut depends = Mapping::new();
    for d in &s.depends_on {
        let mut settings = d.extra.clone();
        settings.insert("condition".into(), d.condition.clone().into());
        depends.insert(d.service.clone().into(), Value::Mapping(settings));
    }
    for (target, _) in &s.links {
        if !depends.contains_key(target.as_str()) {
            depends.insert(target.clone().into(), mapping([("condition", "service_started".into())]));
        }
    }
    depends.insert(format!("{PREFIX}{}", s.name).into(), mapping([("condition", "service_healthy".into())]));
    raw.insert("depends_on".into(), Value::Mapping(depends));
    Value::Mapping(raw)
}

fn spiffe(defaults: &Defaults, service: &str) -> Result<SpiffeId, ComposeError> {
    defaults.trust_domain.id(service).map_err(|e| ComposeError::service(service, "", e.to_string()))
}

/// The sidecar's configuration, as `sidecar run` reads it.
#[derive(Serialize)]
struct SidecarToml {
    cert_dir: &'static str,
    admin: String,
    #[serde(rename = "listener")]
    listeners: Vec<ListenerToml>,
    #[serde(rename = "edge", skip_serializing_if = "Vec::is_empty")]
    edges: Vec<EdgeToml>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enrol: Option<EnrolToml>,
}

/// `[enrol]`: the sidecar makes its key and enrols with its credential.
#[derive(Serialize)]
struct EnrolToml {
    credential: String,
    ca: String,
}

#[derive(Serialize, Default)]
struct ListenerToml {
    name: String,
    mode: &'static str,
    listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    http: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    proxy_protocol: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    plain_from: Vec<String>,
    #[serde(rename = "route", skip_serializing_if = "Vec::is_empty")]
    routes: Vec<RouteToml>,
}

#[derive(Serialize)]
struct RouteToml {
    host: Vec<String>,
    upstream: String,
    /// Absent: plaintext to a service left out of the mesh.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,
}

#[derive(Serialize)]
struct EdgeToml {
    name: &'static str,
    https_listen: &'static str,
    http_listen: &'static str,
    upstream: String,
    cert_dirs: Vec<&'static str>,
    acme_forward: String,
}

fn sidecar_service(
    s: &Service,
    plan: &Plan,
    defaults: &Defaults,
    project_size: usize,
    swarm: bool,
) -> Result<Value, ComposeError> {
    let allow = s
        .options
        .allow
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let key = || format!("x-lanyard.allow[{i}]");
            if a.starts_with("spiffe://") {
                a.parse::<SpiffeId>()
                    .map(|id| id.to_string())
                    .map_err(|e| ComposeError::service(&s.name, key(), e.to_string()))
            } else {
                defaults.trust_domain.id(a).map(|id| id.to_string()).map_err(|_| {
                    ComposeError::service(&s.name, key(), format!("{a:?} is neither a service name nor a SPIFFE ID"))
                })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    let app = app_alias(&s.name);
    let mut listeners = Vec::new();
    for (port, protocol) in &plan.inbound {
        listeners.push(ListenerToml {
            name: format!("in-{port}"),
            mode: "inbound",
            listen: format!("0.0.0.0:{port}"),
            upstream: Some(format!("{app}:{port}")),
            http: *protocol == Protocol::Http,
            proxy_protocol: *protocol == Protocol::Proxy,
            allow: allow.clone(),
            plain_from: plan.plain_from.clone(),
            ..Default::default()
        });
    }
    for p in &plan.published {
        let (tls, http, allow) = match p.tls {
            PublishedTls::None => ("none", false, Vec::new()),
            PublishedTls::Tls => ("tls", p.http, Vec::new()),
            PublishedTls::Mtls => ("mtls", p.http, allow.clone()),
        };
        listeners.push(ListenerToml {
            name: format!("published-{}", p.mapping.target),
            mode: "inbound",
            listen: format!("0.0.0.0:{}", p.listen),
            upstream: Some(format!("{app}:{}", p.mapping.target)),
            tls: Some(tls),
            http,
            allow,
            ..Default::default()
        });
    }
    for o in &plan.outbound {
        let listen = format!("{}:{}", out_alias(&s.name, o.network), o.port);
        let name =
            format!("out-{}-{}", o.targets.iter().map(|t| t.service.as_str()).collect::<Vec<_>>().join("-"), o.port);
        let name = if name.len() > 60 { format!("out-{}-{}", o.port, o.network + 1) } else { name };
        let server_name = |t: &Target| -> Result<Option<String>, ComposeError> {
            Ok(if t.mtls { Some(spiffe(defaults, &t.service)?.to_string()) } else { None })
        };
        let listener = match o.targets.as_slice() {
            [t] => ListenerToml {
                name,
                mode: "outbound",
                listen,
                upstream: Some(t.upstream(o.port)),
                server_name: server_name(t)?,
                tls: (!t.mtls).then_some("none"),
                ..Default::default()
            },
            many => ListenerToml {
                name,
                mode: "outbound",
                listen,
                routes: many
                    .iter()
                    .map(|t| {
                        Ok(RouteToml {
                            host: t.names.clone(),
                            upstream: t.upstream(o.port),
                            server_name: server_name(t)?,
                        })
                    })
                    .collect::<Result<_, ComposeError>>()?,
                ..Default::default()
            },
        };
        listeners.push(listener);
    }
    let public = plan.public_port.is_some();
    let edges = plan
        .public_port
        .map(|port| EdgeToml {
            name: "public",
            https_listen: "0.0.0.0:443",
            http_listen: "0.0.0.0:80",
            upstream: format!("{app}:{port}"),
            cert_dirs: vec![SIDECAR_PUBLIC],
            acme_forward: format!("{CA_SERVICE}:{CA_HTTP_PORT}"),
        })
        .into_iter()
        .collect();
    let enrol = swarm.then(|| EnrolToml {
        credential: format!("/run/secrets/{}", enrol_secret(&s.name)),
        ca: format!("https://{CA_SERVICE}:{CA_API_PORT}"),
    });
    let config = SidecarToml {
        cert_dir: SIDECAR_CERTS,
        admin: format!("127.0.0.1:{}", defaults.admin_port),
        listeners,
        edges,
        enrol,
    };
    let config = toml::to_string(&config).expect("the sidecar config serializes");

    let mut shared = attachments_or_default(s);
    if !plan.inbound.is_empty() {
        for a in &mut shared {
            let mut names = vec![s.name.clone()];
            names.append(&mut a.aliases);
            names.extend(s.container_name.iter().cloned());
            let mut seen = BTreeSet::new();
            a.aliases = names.into_iter().filter(|n| seen.insert(n.clone())).collect();
        }
    }
    if public || swarm {
        // To forward ACME HTTP-01 requests to the CA; to enrol.
        shared.push(Attachment { network: CONTROL.into(), aliases: vec![], extra: Mapping::new() });
    }
    for k in 0..plan.networks {
        let mut aliases = vec![out_alias(&s.name, k)];
        for o in plan.outbound.iter().filter(|o| o.network == k) {
            for n in o.targets.iter().flat_map(|t| &t.names) {
                if !aliases.contains(n) {
                    aliases.push(n.clone());
                }
            }
        }
        shared.push(Attachment { network: private_network(&s.name, k), aliases, extra: Mapping::new() });
    }

    let mut side = Mapping::new();
    side.insert("image".into(), defaults.image.clone().into());
    side.insert("command".into(), strings(["/sidecar", "run"]));
    side.insert("environment".into(), mapping([("LANYARD_SIDECAR_CONFIG", config.into())]));
    if swarm {
        // Its own key, in memory, for `sidecar health` too.
        side.insert("volumes".into(), Value::Sequence(vec![tmpfs(SIDECAR_CERTS)]));
        side.insert("secrets".into(), strings([enrol_secret(&s.name)]));
        let replicas = s.raw.get("deploy").and_then(|d| d.get("replicas")).cloned();
        if let Some(replicas) = replicas {
            side.insert("deploy".into(), mapping([("replicas", replicas)]));
        }
    } else {
        let mut volumes = vec![format!("{}:{SIDECAR_CERTS}:ro", certs_volume(&s.name))];
        if public {
            volumes.push(format!("{}:{SIDECAR_PUBLIC}:ro", public_volume(&s.name)));
        }
        side.insert("volumes".into(), strings(volumes));
    }
    side.insert("networks".into(), networks_value(&shared));
    let mut ports: Vec<Value> = plan.published.iter().map(|p| p.mapping.with_target(p.listen)).collect();
    if public {
        ports.push(format!("{}:80", defaults.edge_http).into());
        ports.push(format!("{}:443", defaults.edge_https).into());
    }
    if !ports.is_empty() {
        side.insert("ports".into(), Value::Sequence(ports));
    }
    if let Some(profiles) = &s.profiles {
        side.insert("profiles".into(), profiles.clone());
    }
    side.insert("depends_on".into(), mapping([(CA_SERVICE, mapping([("condition", "service_healthy".into())]))]));
    // Verified against ca.pem, so this passes only once the sidecar serves a
    // valid certificate (its fallback does not verify); /readyz would also
    // wait for the app, which waits for the sidecar.
    let url = format!("https://127.0.0.1:{}/healthz", defaults.admin_port);
    side.insert("healthcheck".into(), https_healthcheck(SIDECAR_CERTS, url, project_size));
    hardening(&mut side);
    side.insert("read_only".into(), Value::Bool(true));
    Ok(Value::Mapping(side))
}

/// `ca serve`'s configuration, as `ServeConfig` reads it.
#[derive(Serialize)]
struct CaToml {
    trust_domain: String,
    state: &'static str,
    https_listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    swarm: Option<SwarmCaToml>,
    #[serde(rename = "identity")]
    identities: Vec<IdentityToml>,
    #[serde(rename = "public", skip_serializing_if = "Vec::is_empty")]
    publics: Vec<PublicToml>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acme: Option<AcmeToml>,
}

/// What a CA replica of a stack adds to its configuration.
#[derive(Serialize)]
struct SwarmCaToml {
    api_names: Vec<String>,
    store_key: String,
    seed: String,
    leaf_ttl: String,
}

#[derive(Serialize)]
struct IdentityToml {
    name: String,
    spiffe: String,
    dns: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ip: Vec<String>,
    ttl: String,
    out_dir: String,
}

#[derive(Serialize)]
struct PublicToml {
    name: String,
    domains: Vec<String>,
    email: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    directory_url: Option<String>,
    out_dir: String,
}

/// Runs once before the CA: a new named volume is owned by root (Docker
/// copies ownership only onto paths the image has, and the cert dirs'
/// paths are the fleet's), so this gives every volume the CA writes to
/// the image's unprivileged user. Root here holds CHOWN and
/// DAC_READ_SEARCH only, and no network.
fn volumes_service(defaults: &Defaults, ca: &Value) -> Value {
    let named: Vec<String> = ca
        .get("volumes")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|v| v.starts_with(PREFIX))
        .map(str::to_owned)
        .collect();
    let targets = named.iter().filter_map(|v| v.split(':').nth(1));
    let mut service = Mapping::new();
    service.insert("image".into(), defaults.image.clone().into());
    service.insert(
        "command".into(),
        strings(["/ca", "prepare-volumes", "--owner", IMAGE_USER].into_iter().chain(targets)),
    );
    service.insert("user".into(), "0:0".into());
    service.insert("volumes".into(), strings(named.iter().cloned()));
    service.insert("network_mode".into(), "none".into());
    service.insert("cap_drop".into(), strings(["ALL"]));
    service.insert("cap_add".into(), strings(["CHOWN", "DAC_READ_SEARCH"]));
    service.insert("security_opt".into(), strings(["no-new-privileges:true"]));
    // It runs once, to completion.
    service.insert("restart".into(), "no".into());
    Value::Mapping(service)
}

/// The Redis service of `store: redis`: AOF on (fsync every second), its
/// data in a volume, reachable only on the control network.
fn redis_service(defaults: &Defaults) -> Value {
    let mut redis = Mapping::new();
    redis.insert("image".into(), defaults.redis_image.clone().into());
    redis.insert(
        "command".into(),
        strings([
            "redis-server",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            "/data",
            "--protected-mode",
            "no",
        ]),
    );
    redis.insert("volumes".into(), strings([format!("{PREFIX}redis-data:/data")]));
    redis.insert("networks".into(), strings([CONTROL]));
    let mut check = Mapping::new();
    check.insert("test".into(), strings(["CMD", "redis-cli", "ping"]));
    check.insert("interval".into(), "2s".into());
    check.insert("timeout".into(), "2s".into());
    check.insert("retries".into(), Value::Number(30.into()));
    redis.insert("healthcheck".into(), Value::Mapping(check));
    hardening(&mut redis);
    // The official image starts as root, chowns /data and drops to its
    // user with gosu: those three capabilities, no more.
    redis.insert("cap_add".into(), strings(["CHOWN", "SETGID", "SETUID"]));
    Value::Mapping(redis)
}

#[derive(Serialize)]
struct AcmeToml {
    directory_roots: &'static str,
}

fn ca_service(
    defaults: &Defaults,
    plans: &BTreeMap<&str, Plan>,
    compose: &Compose,
    swarm: Option<&str>,
) -> Result<Value, ComposeError> {
    let mut identities = Vec::new();
    let mut volumes = vec![format!("{PREFIX}ca-state:/state")];
    let mut publics = Vec::new();
    for (name, plan) in plans {
        let s = compose.service(name).expect("planned services exist");
        let ttl = s.options.ttl.unwrap_or(defaults.ttl);
        let mut dns: Vec<String> = [name.to_string(), format!("{PREFIX}{name}")]
            .into_iter()
            .filter(|n| n.parse::<DnsName>().is_ok())
            .collect();
        let mut ip = Vec::new();
        if plan.published.iter().any(|p| p.tls != PublishedTls::None) {
            dns.push("localhost".into());
            for h in &defaults.host_names {
                h.parse::<DnsName>().map_err(|e| ComposeError::top("x-lanyard.host_names", e.to_string()))?;
                dns.push(h.clone());
            }
            ip = vec!["127.0.0.1".to_owned(), "::1".to_owned()];
        }
        identities.push(IdentityToml {
            name: plan.identity.clone(),
            spiffe: spiffe(defaults, name)?.to_string(),
            dns,
            ip,
            ttl: format!("{}s", ttl.get().as_secs().max(1)),
            out_dir: format!("/certs/{name}"),
        });
        volumes.push(format!("{}:/certs/{name}", certs_volume(name)));
        if plan.public_port.is_some() {
            publics.push(PublicToml {
                name: plan.identity.clone(),
                domains: s.options.public.clone(),
                email: defaults.acme_email.clone().unwrap_or_default(),
                directory_url: defaults.acme_directory.clone(),
                out_dir: format!("/public/{name}"),
            });
            volumes.push(format!("{}:/public/{name}", public_volume(name)));
        }
    }
    let public = !publics.is_empty();
    let acme = (public && defaults.acme_roots.is_some()).then_some(AcmeToml { directory_roots: ACME_ROOTS });
    let store = defaults.store.as_ref().map(|s| match s {
        StoreChoice::Service => format!("redis://{REDIS_SERVICE}:6379"),
        StoreChoice::Url(url) => url.clone(),
    });
    let swarm_settings = swarm.map(|_| SwarmCaToml {
        api_names: vec![CA_SERVICE.into(), "localhost".into()],
        store_key: format!("/run/secrets/{STORE_KEY_SECRET}"),
        seed: format!("/run/secrets/{SEED_SECRET}"),
        leaf_ttl: format!("{}s", defaults.ttl.get().as_secs().max(1)),
    });
    if swarm.is_some() {
        // Sidecars enrol over the network: the CA keeps no cert dirs.
        identities.clear();
        volumes = vec![];
    }
    let config = CaToml {
        trust_domain: defaults.trust_domain.as_str().to_owned(),
        state: "/state",
        https_listen: format!("0.0.0.0:{CA_API_PORT}"),
        store,
        swarm: swarm_settings,
        identities,
        publics,
        acme,
    };
    let config = toml::to_string(&config).expect("the CA config serializes");

    let mut ca = Mapping::new();
    ca.insert("image".into(), defaults.image.clone().into());
    ca.insert("command".into(), strings(["/ca", "serve"]));
    ca.insert("environment".into(), mapping([("LANYARD_CONFIG", config.into())]));
    if let Some(roots) = defaults.acme_roots.as_ref().filter(|_| public) {
        volumes.push(format!("{roots}:{ACME_ROOTS}:ro"));
    }
    match swarm {
        None => {
            ca.insert("volumes".into(), strings(volumes));
        }
        Some(_) => {
            ca.insert("volumes".into(), Value::Sequence(vec![tmpfs("/state")]));
            ca.insert("secrets".into(), strings([STORE_KEY_SECRET, SEED_SECRET]));
            ca.insert("deploy".into(), mapping([("replicas", Value::from(2))]));
        }
    }
    if defaults.store.is_some() {
        // Both replicas answer as lanyard-ca; the sidecars' ACME forwards reach either.
        let mut control = Mapping::new();
        control.insert("aliases".into(), strings([CA_SERVICE]));
        ca.insert("networks".into(), mapping([(CONTROL, Value::Mapping(control))]));
    } else {
        ca.insert("networks".into(), strings([CONTROL]));
    }
    let mut depends = Mapping::new();
    if swarm.is_none() {
        depends.insert(VOLUMES_SERVICE.into(), mapping([("condition", "service_completed_successfully".into())]));
    }
    if defaults.store == Some(StoreChoice::Service) {
        depends.insert(REDIS_SERVICE.into(), mapping([("condition", "service_healthy".into())]));
    }
    if !depends.is_empty() {
        ca.insert("depends_on".into(), Value::Mapping(depends));
    }
    if public {
        // The ACME server is outside: `host.docker.internal` is the host.
        ca.insert("extra_hosts".into(), strings(["host.docker.internal:host-gateway"]));
    }
    let url = format!("https://127.0.0.1:{CA_API_PORT}/health");
    ca.insert("healthcheck".into(), https_healthcheck("/state/api", url, compose.services.len()));
    hardening(&mut ca);
    Ok(Value::Mapping(ca))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_references_in_urls_and_host_ports() {
        let compose = Compose::parse(
            "services:\n  users: {}\n  cache: {networks: {default: {aliases: [redis]}}}\n  db: {}\n  kafka: {}\n",
            "t",
        )
        .unwrap();
        let n = Names::of(&compose);
        let calls =
            |v: &str| references(v, &n).into_iter().map(|c| (c.service, c.port, c.protocol)).collect::<Vec<_>>();
        assert_eq!(calls("http://users:4000/v1"), [("users".into(), 4000, Some(Protocol::Http))]);
        assert_eq!(calls("proxy_pass http://users/v1;"), [("users".into(), 80, Some(Protocol::Http))]);
        assert_eq!(calls("redis://:secret@redis"), [("cache".into(), 6379, None)]);
        assert_eq!(calls("jdbc:postgresql://db:5432/app?sslmode=disable"), [("db".into(), 5432, None)]);
        assert_eq!(calls("kafka:9092,other:1"), [("kafka".into(), 9092, None)]);
        assert!(calls("https://example.com:443, users, 4000, userservice:1").is_empty());
    }

    #[test]
    fn hands_out_distinct_subnets_inside_the_pool() {
        let compose = Compose::parse("x-lanyard: {subnet_pool: 10.9.0.0/24}\nservices:\n  a: {}\n", "t").unwrap();
        let mut s = Subnets::new(&compose.defaults, &compose);
        let taken: BTreeSet<String> = (0..16).map(|_| s.take().unwrap()).collect();
        assert_eq!(taken.len(), 16);
        assert!(taken.iter().all(|n| n.starts_with("10.9.0.") && n.ends_with("/28")));
        assert!(s.take().unwrap_err().to_string().contains("larger pool"));
    }
}
