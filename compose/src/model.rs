//! The compose file as a document plus typed views of the keys Lanyard
//! reads. Every key stays in [`Service::raw`] and [`Compose::doc`], so what
//! the transform does not touch is written back as it was; the typed views
//! are interpolated (`${VAR:-default}`), the raw values keep the expressions.

use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use crate::error::ComposeError;
use crate::interpolate::{parse_env_file, Env};
use crate::options::{Defaults, ServiceOptions, EXTENSION};
use crate::yaml::scalar;

/// Largest port range expanded into single ports.
const MAX_RANGE: u16 = 1000;

/// Largest config file (or directory total) read for calls to other services.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Where a compose file lives: its directory (for `.env`, `env_file`,
/// `extends` files and bind-mounted config files) and its variables.
#[derive(Clone, Debug, Default)]
pub struct Project {
    /// The directory of the compose file; `None` reads no other file.
    pub dir: Option<PathBuf>,
    /// Variables for interpolation.
    pub env: Env,
}

impl Project {
    /// The project of the compose file at `path`: its directory, the `.env`
    /// there (if any) and `process` variables, which win.
    pub fn of_file(path: &Path, process: impl IntoIterator<Item = (String, String)>) -> Self {
        let dir = path.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }).map(Path::to_owned);
        let dotenv = dir.as_ref().and_then(|d| std::fs::read_to_string(d.join(".env")).ok());
        Self { env: Env::new(dotenv.as_deref(), process), dir }
    }

    fn read(&self, relative: &str) -> Option<(PathBuf, String)> {
        let path = self.dir.as_ref()?.join(relative);
        let text = std::fs::read_to_string(&path).ok()?;
        Some((path, text))
    }
}

/// A parsed compose file.
#[derive(Clone, Debug)]
pub struct Compose {
    /// The whole document, services included, in input order.
    pub doc: Mapping,
    /// The services, in input order, with `extends` merged in.
    pub services: Vec<Service>,
    /// The top-level `x-lanyard` defaults.
    pub defaults: Defaults,
    /// What reading the file noticed (a missing `env_file`, ...).
    pub notes: Vec<String>,
}

/// One service.
#[derive(Clone, Debug)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// Every key of the service as written, with `extends` merged in.
    pub raw: Mapping,
    /// `image`, interpolated.
    pub image: Option<String>,
    /// `ports`, the published ports (ranges expanded).
    pub ports: Vec<PortMapping>,
    /// `expose`, TCP container ports offered to other services.
    pub expose: Vec<u16>,
    /// `networks`; empty means the `default` network.
    pub networks: Vec<Attachment>,
    /// `depends_on`, in either form.
    pub depends_on: Vec<Dependency>,
    /// `env_file` then `environment`, interpolated; variables without a value are left out.
    pub environment: Vec<(String, String)>,
    /// `network_mode`, which injection cannot work with (except `none`).
    pub network_mode: Option<String>,
    /// `links`: the service and the alias it is known by.
    pub links: Vec<(String, String)>,
    /// `container_name`, which other containers can resolve.
    pub container_name: Option<String>,
    /// `profiles`, as written.
    pub profiles: Option<Value>,
    /// Text that may name other services: `command`, `entrypoint`,
    /// `healthcheck` and the bind-mounted config files.
    pub texts: Vec<String>,
    /// The service's `x-lanyard` options.
    pub options: ServiceOptions,
}

/// One published port (one entry of `ports`, or one port of a range).
#[derive(Clone, Debug, PartialEq)]
pub struct PortMapping {
    /// The container port.
    pub target: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The host side as written (`127.0.0.1:${PORT:-8080}`), or `None` for
    /// a random host port; interpolated for ports of an expanded range.
    pub host_raw: Option<String>,
    /// The host side, interpolated: `127.0.0.1:8080`, `8080` or empty.
    pub host: String,
    /// The long syntax mapping, when written that way.
    pub long: Option<Mapping>,
    /// The entry as written.
    pub raw: Value,
}

impl PortMapping {
    /// This entry with the container port replaced, host side kept as written.
    pub fn with_target(&self, target: u16) -> Value {
        if let Some(m) = &self.long {
            let mut m = m.clone();
            m.insert("target".into(), Value::from(target));
            return Value::Mapping(m);
        }
        match &self.host_raw {
            Some(host) => Value::String(format!("{host}:{target}")),
            None => Value::String(target.to_string()),
        }
    }

    /// The host port, when fixed.
    pub fn host_port(&self) -> Option<u16> {
        self.host.rsplit(':').next().and_then(|p| p.parse().ok())
    }
}

/// A service's membership of one network.
#[derive(Clone, Debug, PartialEq)]
pub struct Attachment {
    /// The network.
    pub network: String,
    /// `aliases` on that network.
    pub aliases: Vec<String>,
    /// Other settings (`ipv4_address`, `priority`, ...), kept as written.
    pub extra: Mapping,
}

/// One entry of `depends_on`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dependency {
    /// The service depended on.
    pub service: String,
    /// `service_started`, `service_healthy` or `service_completed_successfully`.
    pub condition: String,
    /// Other settings (`restart`, `required`), kept as written.
    pub extra: Mapping,
}

impl Compose {
    /// Parses compose YAML that refers to no other file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ComposeError> {
        Self::parse_in(text, origin, &Project::default())
    }

    /// Parses compose YAML of `project`; `origin` names the file in errors.
    pub fn parse_in(text: &str, origin: &str, project: &Project) -> Result<Self, ComposeError> {
        let doc = read_document(text, origin)?;
        let Some(Value::Mapping(services)) = doc.get("services") else {
            return Err(ComposeError::Syntax {
                origin: origin.to_owned(),
                message: "no `services` mapping: nothing to inject".into(),
            });
        };
        let mut notes = Vec::new();
        let mut parsed = Vec::new();
        for (name, _) in services {
            let name = name.as_str().ok_or_else(|| ComposeError::Syntax {
                origin: origin.to_owned(),
                message: format!("service name {name:?} is not a string"),
            })?;
            let raw = inline_extends(name, services, project, origin, 0)?;
            parsed.push(Service::parse(name, raw, project, &mut notes)?);
        }
        let defaults = match doc.get(EXTENSION) {
            Some(v) => Defaults::parse(v)?,
            None => Defaults::default(),
        };
        Ok(Self { doc, services: parsed, defaults, notes })
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Writes the document as YAML that PyYAML (docker-compose v1) and YAML
    /// 1.2 readers (compose v2) read the same way.
    pub fn to_yaml(&self) -> String {
        crate::yaml::to_string(&Value::Mapping(self.doc.clone()))
    }
}

/// The top-level mapping of compose YAML, with merge keys (`<<`) applied.
fn read_document(text: &str, origin: &str) -> Result<Mapping, ComposeError> {
    let syntax = |message: String| ComposeError::Syntax { origin: origin.to_owned(), message };
    let mut doc: Value = serde_norway::from_str(text).map_err(|e| syntax(e.to_string()))?;
    doc.apply_merge().map_err(|e| syntax(format!("YAML merge key (<<): {e}")))?;
    match doc {
        Value::Mapping(doc) => Ok(doc),
        _ => Err(syntax("not a compose file: the top level must be a mapping with `services`".into())),
    }
}

/// Service `name` of `services` with its `extends` chain merged in, as
/// compose merges it; the result has no `extends` key.
fn inline_extends(
    name: &str,
    services: &Mapping,
    project: &Project,
    origin: &str,
    depth: usize,
) -> Result<Mapping, ComposeError> {
    let err = |m: String| ComposeError::service(name, "extends", m);
    let mut raw = match services.get(name) {
        Some(Value::Mapping(m)) => m.clone(),
        Some(Value::Null) => Mapping::new(),
        Some(_) => return Err(ComposeError::service(name, "", "a service must be a mapping")),
        None => return Err(err(format!("{origin} has no service {name}"))),
    };
    let Some(ext) = raw.remove("extends") else { return Ok(raw) };
    if depth > 10 {
        return Err(err("extends goes more than 10 levels deep; is there a cycle?".into()));
    }
    let (base_name, file) = match &ext {
        Value::String(s) => (s.clone(), None),
        Value::Mapping(m) => (
            m.get("service").and_then(Value::as_str).ok_or_else(|| err("needs `service`".into()))?.to_owned(),
            m.get("file").and_then(Value::as_str).map(|f| project.env.interpolate(f).map_err(&err)).transpose()?,
        ),
        _ => return Err(err("expected a service name or {service, file}".into())),
    };
    let base = match file {
        None => inline_extends(&base_name, services, project, origin, depth + 1)?,
        Some(file) => {
            let (path, text) = project.read(&file).ok_or_else(|| {
                err(format!("cannot read {file} (relative to the compose file); extends needs the file it names"))
            })?;
            let doc = read_document(&text, &path.display().to_string())?;
            let Some(Value::Mapping(other)) = doc.get("services") else {
                return Err(err(format!("{file} has no `services`")));
            };
            let sub = Project { dir: path.parent().map(Path::to_owned), env: project.env.clone() };
            inline_extends(&base_name, other, &sub, &file, depth + 1)?
        }
    };
    Ok(merge_service(base, raw))
}

/// `child` over `base`, by compose's rules: mappings merge, sequences of
/// ports and similar append, `environment` and `labels` merge by key,
/// everything else is replaced; `depends_on`, `links` and `volumes_from`
/// are never inherited.
fn merge_service(mut base: Mapping, child: Mapping) -> Mapping {
    for key in ["depends_on", "links", "volumes_from"] {
        base.remove(key);
    }
    for (k, v) in child {
        let key = k.as_str().unwrap_or_default().to_owned();
        let merged = match (base.remove(&k), v) {
            (Some(old), new) if matches!(key.as_str(), "environment" | "labels" | "extra_hosts" | "sysctls") => {
                Value::Mapping(merge_maps(as_map(&old), as_map(&new)))
            }
            (Some(Value::Sequence(mut old)), Value::Sequence(new)) => {
                for item in new {
                    if !old.contains(&item) {
                        old.push(item);
                    }
                }
                Value::Sequence(old)
            }
            (Some(Value::Mapping(old)), Value::Mapping(new)) => Value::Mapping(merge_maps(old, new)),
            (_, new) => new,
        };
        base.insert(k, merged);
    }
    base
}

fn merge_maps(mut base: Mapping, over: Mapping) -> Mapping {
    for (k, v) in over {
        base.insert(k, v);
    }
    base
}

/// `KEY=VALUE` lists as mappings (for merging `environment` and `labels`).
fn as_map(v: &Value) -> Mapping {
    match v {
        Value::Mapping(m) => m.clone(),
        Value::Sequence(items) => items
            .iter()
            .filter_map(scalar)
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (Value::from(k), Value::from(v)),
                None => (Value::from(kv), Value::Null),
            })
            .collect(),
        _ => Mapping::new(),
    }
}

impl Service {
    fn parse(name: &str, raw: Mapping, project: &Project, notes: &mut Vec<String>) -> Result<Self, ComposeError> {
        let options = match raw.get(EXTENSION) {
            Some(v) => ServiceOptions::parse(name, v)?,
            None => ServiceOptions::default(),
        };
        // A service left alone is not read strictly: what Lanyard cannot
        // handle in it must not stop the rest of the file.
        let lenient = options.disable;
        fn or_default<T: Default>(lenient: bool, r: Result<T, ComposeError>) -> Result<T, ComposeError> {
            match r {
                Err(_) if lenient => Ok(T::default()),
                other => other,
            }
        }
        let env = &project.env;
        let interp = |key: &str, text: &str| env.interpolate(text).map_err(|m| ComposeError::service(name, key, m));
        let image = raw.get("image").and_then(scalar).map(|i| interp("image", &i)).transpose()?;
        let ports = or_default(lenient, published_ports(name, &raw, env))?;
        let expose = or_default(
            lenient,
            seq(name, &raw, "expose")?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let key = format!("expose[{i}]");
                    let text = scalar(v).ok_or_else(|| {
                        ComposeError::service(name, key.as_str(), "expected a port number such as 3000")
                    })?;
                    let text = interp(&key, &text)?;
                    let (ports, proto) = text.split_once('/').unwrap_or((&text, "tcp"));
                    let ports = port_range(ports).map_err(|m| ComposeError::service(name, key.as_str(), m))?;
                    Ok(if proto == "tcp" { ports } else { Vec::new() })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.into_iter().flatten().collect()),
        )?;
        let mut environment = Vec::new();
        for file in env_files(raw.get("env_file")) {
            let file = interp("env_file", &file.0)?;
            match project.read(&file) {
                Some((_, text)) => environment.extend(parse_env_file(&text)),
                None if project.dir.is_some() => {
                    notes.push(format!("{name}: env_file {file} not found; its variables were not read for calls"))
                }
                None => {}
            }
        }
        for (k, v) in or_default(lenient, environment_of(name, raw.get("environment"), env))? {
            environment.retain(|(old, _)| *old != k);
            environment.push((k, v));
        }
        let links = or_default(
            lenient,
            seq(name, &raw, "links")?
                .iter()
                .map(|v| {
                    let text =
                        scalar(v).ok_or_else(|| ComposeError::service(name, "links", "expected SERVICE[:ALIAS]"))?;
                    let (service, alias) = text.split_once(':').unwrap_or((&text, &text));
                    Ok((service.to_owned(), alias.to_owned()))
                })
                .collect(),
        )?;
        let mut texts = Vec::new();
        for key in ["command", "entrypoint", "healthcheck"] {
            if let Some(v) = raw.get(key) {
                collect_strings(v, &mut texts);
            }
        }
        texts = texts.into_iter().map(|t| env.interpolate(&t).unwrap_or(t)).collect();
        texts.extend(config_files(&raw, project));
        Ok(Self {
            name: name.to_owned(),
            image,
            ports,
            expose,
            networks: or_default(lenient, networks(name, raw.get("networks")))?,
            depends_on: or_default(lenient, depends_on(name, raw.get("depends_on")))?,
            environment,
            network_mode: raw.get("network_mode").and_then(scalar).map(|m| env.interpolate(&m).unwrap_or(m)),
            links,
            container_name: raw.get("container_name").and_then(scalar).map(|c| env.interpolate(&c).unwrap_or(c)),
            profiles: raw.get("profiles").cloned(),
            texts,
            raw,
            options,
        })
    }

    /// The value of `key` as written.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Sequence(s) => s.iter().for_each(|v| collect_strings(v, out)),
        Value::Mapping(m) => m.values().for_each(|v| collect_strings(v, out)),
        other => out.extend(scalar(other)),
    }
}

fn seq<'a>(service: &str, raw: &'a Mapping, key: &str) -> Result<&'a [Value], ComposeError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Sequence(s)) => Ok(s),
        Some(_) => Err(ComposeError::service(service, key, "expected a list")),
    }
}

/// `3000` or `3000-3005` as ports.
fn port_range(text: &str) -> Result<Vec<u16>, String> {
    let bad = || format!("{text:?} is not a port number");
    match text.split_once('-') {
        None => Ok(vec![text.trim().parse().map_err(|_| bad())?]),
        Some((a, b)) => {
            let (a, b): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
            if b < a || b - a >= MAX_RANGE {
                return Err(format!("port range {text:?} is reversed or longer than {MAX_RANGE} ports"));
            }
            Ok((a..=b).collect())
        }
    }
}

/// Splits at `sep` outside `${...}` and `[...]`.
fn split_outside(text: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            c if c == sep && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn published_ports(name: &str, raw: &Mapping, env: &Env) -> Result<Vec<PortMapping>, ComposeError> {
    let mut out = Vec::new();
    for (i, v) in seq(name, raw, "ports")?.iter().enumerate() {
        let key = format!("ports[{i}]");
        let err = |m: String| ComposeError::service(name, key.as_str(), m);
        let interp = |t: &str| env.interpolate(t).map_err(&err);
        if let Value::Mapping(m) = v {
            let target = m.get("target").and_then(scalar).ok_or_else(|| err("long syntax needs `target`".into()))?;
            let target = interp(&target)?.parse().map_err(|_| err(format!("target {target:?} is not a port")))?;
            let protocol = m.get("protocol").and_then(scalar).unwrap_or_else(|| "tcp".into());
            let published = m.get("published").and_then(scalar).map(|p| interp(&p)).transpose()?.unwrap_or_default();
            let ip = m.get("host_ip").and_then(scalar).map(|p| interp(&p)).transpose()?;
            let host = ip.map_or(published.clone(), |ip| format!("{ip}:{published}"));
            out.push(PortMapping { target, protocol, host_raw: None, host, long: Some(m.clone()), raw: v.clone() });
            continue;
        }
        let text = scalar(v).ok_or_else(|| err("expected \"HOST:CONTAINER\" or a mapping with `target`".into()))?;
        let (body, protocol) = match split_outside(&text, '/').as_slice() {
            [body] => (body.to_string(), "tcp".to_owned()),
            [body, proto] => (body.to_string(), interp(proto)?),
            _ => return Err(err(format!("{text:?} is not a port mapping"))),
        };
        let parts = split_outside(&body, ':');
        let (host_parts, container) = parts.split_at(parts.len() - 1);
        let targets = port_range(&interp(container[0])?).map_err(&err)?;
        let host_raw = (!host_parts.is_empty()).then(|| host_parts.join(":"));
        let host = host_raw.as_deref().map(interp).transpose()?.unwrap_or_default();
        if targets.len() == 1 {
            let raw = v.clone();
            out.push(PortMapping { target: targets[0], protocol, host_raw, host, long: None, raw });
            continue;
        }
        // A range: one mapping per port, host ports counted along.
        let (ip, host_ports) = match host.rsplit_once(':') {
            Some((ip, ports)) => (format!("{ip}:"), ports.to_owned()),
            None => (String::new(), host.clone()),
        };
        let host_ports = if host_ports.is_empty() { None } else { Some(port_range(&host_ports).map_err(&err)?) };
        if host_ports.as_ref().is_some_and(|h| h.len() != targets.len()) {
            return Err(err(format!("{text:?}: the host and container ranges differ in length")));
        }
        for (k, target) in targets.iter().enumerate() {
            let host_port = host_ports.as_ref().map(|h| h[k].to_string());
            let host = host_port.as_ref().map_or(String::new(), |p| format!("{ip}{p}"));
            let host_raw = host_port.map(|_| host.clone());
            let raw = Value::String(format!(
                "{}{target}/{protocol}",
                host_raw.as_ref().map_or(String::new(), |h| format!("{h}:"))
            ));
            out.push(PortMapping { target: *target, protocol: protocol.clone(), host_raw, host, long: None, raw });
        }
    }
    Ok(out)
}

/// The paths of `env_file`, with whether each is required.
fn env_files(v: Option<&Value>) -> Vec<(String, bool)> {
    match v {
        Some(Value::String(s)) => vec![(s.clone(), true)],
        Some(Value::Sequence(list)) => list
            .iter()
            .filter_map(|e| match e {
                Value::String(s) => Some((s.clone(), true)),
                Value::Mapping(m) => Some((
                    m.get("path").and_then(Value::as_str)?.to_owned(),
                    m.get("required").and_then(Value::as_bool).unwrap_or(true),
                )),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The text of bind-mounted files and directories inside the project,
/// where config files name the services they call (nginx.conf, Grafana
/// datasources, prometheus.yml).
fn config_files(raw: &Mapping, project: &Project) -> Vec<String> {
    let Some(dir) = &project.dir else { return Vec::new() };
    let mut sources = Vec::new();
    for v in raw.get("volumes").and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default() {
        let source = match v {
            Value::String(s) => s.split(':').next().map(str::to_owned),
            Value::Mapping(m) if m.get("type").and_then(Value::as_str) == Some("bind") => {
                m.get("source").and_then(Value::as_str).map(str::to_owned)
            }
            _ => None,
        };
        let Some(source) = source.map(|s| project.env.interpolate(&s).unwrap_or(s)) else { continue };
        if source.starts_with('.') {
            sources.push(dir.join(source));
        }
    }
    let mut texts = Vec::new();
    let mut budget = MAX_CONFIG_BYTES;
    let mut stack = sources;
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()).take(200));
            }
        } else if meta.len() <= budget {
            if let Ok(text) = std::fs::read_to_string(&path) {
                budget -= meta.len();
                texts.push(text);
            }
        }
    }
    texts
}

fn networks(service: &str, v: Option<&Value>) -> Result<Vec<Attachment>, ComposeError> {
    let err = |m: &str| ComposeError::service(service, "networks", m);
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|n| {
                let network = n.as_str().ok_or_else(|| err("list entries must be network names"))?.to_owned();
                Ok(Attachment { network, aliases: Vec::new(), extra: Mapping::new() })
            })
            .collect(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(n, settings)| {
                let network = n.as_str().ok_or_else(|| err("keys must be network names"))?.to_owned();
                let mut extra = match settings {
                    Value::Mapping(m) => m.clone(),
                    Value::Null => Mapping::new(),
                    _ => return Err(err("each network's settings must be a mapping")),
                };
                let aliases = match extra.remove("aliases") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Sequence(a)) => a.iter().filter_map(scalar).collect(),
                    Some(_) => {
                        return Err(ComposeError::service(
                            service,
                            format!("networks.{network}.aliases"),
                            "expected a list",
                        ))
                    }
                };
                Ok(Attachment { network, aliases, extra })
            })
            .collect(),
        Some(_) => Err(err("expected a list or a mapping")),
    }
}

fn depends_on(service: &str, v: Option<&Value>) -> Result<Vec<Dependency>, ComposeError> {
    let err = |m: &str| ComposeError::service(service, "depends_on", m);
    let started = || "service_started".to_owned();
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(list)) => list
            .iter()
            .map(|n| {
                let name = n.as_str().ok_or_else(|| err("list entries must be service names"))?;
                Ok(Dependency { service: name.to_owned(), condition: started(), extra: Mapping::new() })
            })
            .collect(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(n, settings)| {
                let name = n.as_str().ok_or_else(|| err("keys must be service names"))?.to_owned();
                let mut extra = match settings {
                    Value::Mapping(m) => m.clone(),
                    Value::Null => Mapping::new(),
                    _ => return Err(err("each entry must be a mapping such as {condition: service_healthy}")),
                };
                let condition = extra.remove("condition").as_ref().and_then(scalar).unwrap_or_else(started);
                Ok(Dependency { service: name, condition, extra })
            })
            .collect(),
        Some(_) => Err(err("expected a list or a mapping")),
    }
}

/// `environment` in either form, interpolated; a variable without a value
/// takes the one in `env` (as compose passes the shell's through).
fn environment_of(service: &str, v: Option<&Value>, env: &Env) -> Result<Vec<(String, String)>, ComposeError> {
    // Values are only read for calls; one compose would refuse (a missing
    // `${VAR:?}`) is kept as written rather than stopping the transform.
    let interp = |_: &str, v: &str| Ok::<_, ComposeError>(env.interpolate(v).unwrap_or_else(|_| v.to_owned()));
    let inherit = |k: &str| env.interpolate(&format!("${{{k}}}")).ok().filter(|v| !v.is_empty());
    let mut out = Vec::new();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Sequence(list)) => {
            for kv in list.iter().filter_map(scalar) {
                match kv.split_once('=') {
                    Some((k, v)) => out.push((k.to_owned(), interp(k, v)?)),
                    None => out.extend(inherit(&kv).map(|v| (kv.clone(), v))),
                }
            }
        }
        Some(Value::Mapping(map)) => {
            for (k, v) in map {
                let Some(k) = scalar(k) else { continue };
                match scalar(v) {
                    Some(v) => out.push((k.clone(), interp(&k, &v)?)),
                    None => out.extend(inherit(&k).map(|v| (k.clone(), v))),
                }
            }
        }
        Some(_) => return Err(ComposeError::service(service, "environment", "expected a list or a mapping")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_forms_of_each_key() {
        let c = Compose::parse(
            r#"
services:
  web:
    image: web
    ports: ["127.0.0.1:8080:80/tcp", {target: 443, published: 8443}, "${NOPE:-9000}:9000", "7000-7001:7000-7001"]
    expose: [3000, "3001/tcp", "53/udp"]
    networks: {front: {aliases: [www], priority: 5}, back: null}
    depends_on: {db: {condition: service_healthy}}
    environment: {DB: "postgres://db:5432/app", DEBUG: 1, EMPTY: null}
    links: ["db:database", cache]
    unknown_key: {kept: true}
  db:
    image: db
    networks: [back]
    depends_on: [cache]
    environment: ["A=1", "B"]
"#,
            "t.yml",
        )
        .unwrap();
        let web = c.service("web").unwrap();
        assert_eq!(web.ports.iter().map(|p| p.target).collect::<Vec<_>>(), [80, 443, 9000, 7000, 7001]);
        assert_eq!(web.ports[2].host, "9000");
        assert_eq!(web.ports[2].with_target(20000), Value::from("${NOPE:-9000}:20000"));
        assert_eq!(web.ports[4].host, "7001");
        assert_eq!(web.ports[0].with_target(1), Value::from("127.0.0.1:8080:1"));
        assert_eq!(web.expose, [3000, 3001]);
        assert_eq!(web.networks[0].aliases, ["www"]);
        assert_eq!(web.networks[0].extra.get("priority"), Some(&Value::from(5)));
        assert_eq!(web.depends_on[0].condition, "service_healthy");
        assert_eq!(web.environment.len(), 2);
        assert_eq!(web.links, [("db".to_owned(), "database".to_owned()), ("cache".to_owned(), "cache".to_owned())]);
        assert!(web.get("unknown_key").is_some());
        let db = c.service("db").unwrap();
        assert_eq!(db.networks[0].network, "back");
        assert_eq!(db.depends_on[0].condition, "service_started");
        assert_eq!(db.environment, [("A".to_owned(), "1".to_owned())]);
    }

    #[test]
    fn merges_extends_and_forgives_disabled_services() {
        let c = Compose::parse(
            r#"
services:
  base:
    image: app
    ports: ["8080:8080"]
    environment: {A: "1", B: "2"}
  web:
    extends: base
    ports: ["9090:9090"]
    environment: ["B=3"]
  odd:
    ports: ["not a port"]
    x-lanyard: {disable: true}
"#,
            "t.yml",
        )
        .unwrap();
        let web = c.service("web").unwrap();
        assert!(web.get("extends").is_none());
        assert_eq!(web.ports.iter().map(|p| p.target).collect::<Vec<_>>(), [8080, 9090]);
        assert_eq!(web.environment, [("A".to_owned(), "1".to_owned()), ("B".to_owned(), "3".to_owned())]);
        assert!(c.service("odd").unwrap().ports.is_empty());
    }

    #[test]
    fn errors_name_the_service_and_key() {
        let e = Compose::parse("services:\n  web:\n    ports: [\"x:y\"]\n", "t").unwrap_err();
        assert!(e.to_string().starts_with("service web, key ports[0]: \"y\" is not a port"), "{e}");
        let e = Compose::parse("services:\n  web:\n    networks: 5\n", "t").unwrap_err();
        assert_eq!(e.to_string(), "service web, key networks: expected a list or a mapping");
        let e = Compose::parse("services:\n  web:\n    ports: [\"${P:?set P}:80\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("P is required (set P)"), "{e}");
        let e = Compose::parse("version: '3'\n", "in.yml").unwrap_err();
        assert!(e.to_string().starts_with("in.yml: no `services`"), "{e}");
    }
}
