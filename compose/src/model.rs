//! The compose file as a document plus typed views of the keys Lanyard
//! reads. Every key stays in [`Service::raw`] and [`Compose::doc`], so what
//! the transform does not touch is written back as it was.

use serde_norway::{Mapping, Value};

use crate::error::ComposeError;
use crate::options::{Defaults, ServiceOptions};

/// The extension key Lanyard reads, at the top level and in services.
pub const EXTENSION: &str = "x-lanyard";

/// A parsed compose file.
#[derive(Clone, Debug)]
pub struct Compose {
    /// The whole document, services included, in input order.
    pub doc: Mapping,
    /// The services, in input order.
    pub services: Vec<Service>,
    /// The top-level `x-lanyard` defaults.
    pub defaults: Defaults,
}

/// One service.
#[derive(Clone, Debug)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// Every key of the service as written.
    pub raw: Mapping,
    /// `ports`, the published ports.
    pub ports: Vec<PortMapping>,
    /// `expose`, container ports offered to other services.
    pub expose: Vec<u16>,
    /// `networks`; empty means the `default` network.
    pub networks: Vec<Attachment>,
    /// `depends_on`, in either form.
    pub depends_on: Vec<Dependency>,
    /// `environment`, in either form; variables without a value are left out.
    pub environment: Vec<(String, String)>,
    /// `network_mode`, which injection cannot work with.
    pub network_mode: Option<String>,
    /// The service's `x-lanyard` options.
    pub options: ServiceOptions,
}

/// One entry of `ports`.
#[derive(Clone, Debug, PartialEq)]
pub struct PortMapping {
    /// The container port.
    pub target: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The entry as written, moved to the sidecar unchanged.
    pub raw: Value,
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
    /// Parses compose YAML; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ComposeError> {
        let syntax = |message: String| ComposeError::Syntax { origin: origin.to_owned(), message };
        let mut doc: Value = serde_norway::from_str(text).map_err(|e| syntax(e.to_string()))?;
        doc.apply_merge().map_err(|e| syntax(format!("YAML merge key (<<): {e}")))?;
        let Value::Mapping(doc) = doc else {
            return Err(syntax("not a compose file: the top level must be a mapping with `services`".into()));
        };
        let Some(Value::Mapping(services)) = doc.get("services") else {
            return Err(syntax("no `services` mapping: nothing to inject".into()));
        };
        let services = services
            .iter()
            .map(|(name, body)| {
                let name = name.as_str().ok_or_else(|| syntax(format!("service name {name:?} is not a string")))?;
                Service::parse(name, body)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let defaults = match doc.get(EXTENSION) {
            Some(v) => Defaults::parse(v)?,
            None => Defaults::default(),
        };
        Ok(Self { doc, services, defaults })
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Writes the document as YAML that docker-compose v1 and v2 accept.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(&self.doc).expect("a YAML value always serializes")
    }
}

impl Service {
    fn parse(name: &str, body: &Value) -> Result<Self, ComposeError> {
        let raw = match body {
            Value::Mapping(m) => m.clone(),
            Value::Null => Mapping::new(),
            _ => return Err(ComposeError::service(name, "", "a service must be a mapping")),
        };
        let options = match raw.get(EXTENSION) {
            Some(v) => ServiceOptions::parse(name, v)?,
            None => ServiceOptions::default(),
        };
        Ok(Self {
            name: name.to_owned(),
            ports: seq(name, &raw, "ports")?
                .iter()
                .enumerate()
                .map(|(i, v)| port_mapping(v).map_err(|m| ComposeError::service(name, format!("ports[{i}]"), m)))
                .collect::<Result<_, _>>()?,
            expose: seq(name, &raw, "expose")?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    scalar(v)
                        .ok_or_else(|| "expected a port number such as 3000".to_owned())
                        .and_then(|text| container_port(&text))
                        .map_err(|m| ComposeError::service(name, format!("expose[{i}]"), m))
                })
                .collect::<Result<_, _>>()?,
            networks: networks(name, raw.get("networks"))?,
            depends_on: depends_on(name, raw.get("depends_on"))?,
            environment: environment(name, raw.get("environment"))?,
            network_mode: raw.get("network_mode").and_then(scalar),
            raw,
            options,
        })
    }

    /// The value of `key` as written.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }
}

/// A scalar as text (strings, numbers and booleans); `None` for the rest.
pub fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn seq<'a>(service: &str, raw: &'a Mapping, key: &str) -> Result<&'a [Value], ComposeError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Sequence(s)) => Ok(s),
        Some(_) => Err(ComposeError::service(service, key, "expected a list")),
    }
}

/// The container port of `3000`, `3000/tcp`, `8080:3000` or `127.0.0.1:8080:3000/tcp`.
fn container_port(text: &str) -> Result<u16, String> {
    let (ports, _) = text.split_once('/').unwrap_or((text, ""));
    let target = ports.rsplit(':').next().unwrap_or(ports);
    if target.contains('-') {
        return Err(format!(
            "port range {text:?}: Lanyard protects single ports; list them one by one, or opt the service out with `x-lanyard: {{disable: true}}`"
        ));
    }
    target.parse().map_err(|_| format!("{text:?} is not a port number"))
}

fn port_mapping(v: &Value) -> Result<PortMapping, String> {
    let (target, protocol) = match v {
        Value::Mapping(m) => {
            let target = m.get("target").and_then(scalar).ok_or("long syntax needs `target`")?;
            let protocol = m.get("protocol").and_then(scalar).unwrap_or_else(|| "tcp".into());
            (container_port(&target)?, protocol)
        }
        other => {
            let text = scalar(other).ok_or("expected \"HOST:CONTAINER\" or a mapping with `target`")?;
            let protocol = text.split_once('/').map_or("tcp", |(_, p)| p).to_owned();
            (container_port(&text)?, protocol)
        }
    };
    Ok(PortMapping { target, protocol, raw: v.clone() })
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

fn environment(service: &str, v: Option<&Value>) -> Result<Vec<(String, String)>, ComposeError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Sequence(list)) => Ok(list
            .iter()
            .filter_map(scalar)
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect()),
        Some(Value::Mapping(map)) => Ok(map.iter().filter_map(|(k, v)| Some((scalar(k)?, scalar(v)?))).collect()),
        Some(_) => Err(ComposeError::service(service, "environment", "expected a list or a mapping")),
    }
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
    ports: ["127.0.0.1:8080:80/tcp", {target: 443, published: 8443}]
    expose: [3000, "3001/tcp"]
    networks: {front: {aliases: [www], priority: 5}, back: null}
    depends_on: {db: {condition: service_healthy}}
    environment: {DB: "postgres://db:5432/app", DEBUG: 1, EMPTY: null}
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
        assert_eq!(web.ports.iter().map(|p| p.target).collect::<Vec<_>>(), [80, 443]);
        assert_eq!(web.expose, [3000, 3001]);
        assert_eq!(web.networks[0].aliases, ["www"]);
        assert_eq!(web.networks[0].extra.get("priority"), Some(&Value::from(5)));
        assert_eq!(web.depends_on[0].condition, "service_healthy");
        assert_eq!(web.environment.len(), 2);
        assert!(web.get("unknown_key").is_some());
        let db = c.service("db").unwrap();
        assert_eq!(db.networks[0].network, "back");
        assert_eq!(db.depends_on[0].condition, "service_started");
        assert_eq!(db.environment, [("A".to_owned(), "1".to_owned())]);
    }

    #[test]
    fn errors_name_the_service_and_key() {
        let e = Compose::parse("services:\n  web:\n    ports: [\"3000-3005:3000-3005\"]\n", "t").unwrap_err();
        assert!(e.to_string().starts_with("service web, key ports[0]: port range"), "{e}");
        let e = Compose::parse("services:\n  web:\n    networks: 5\n", "t").unwrap_err();
        assert_eq!(e.to_string(), "service web, key networks: expected a list or a mapping");
        let e = Compose::parse("version: '3'\n", "in.yml").unwrap_err();
        assert!(e.to_string().starts_with("in.yml: no `services`"), "{e}");
    }
}
