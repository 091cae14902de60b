//! `ca inject --target swarm`: the injected file turned into a stack that
//! `docker stack deploy` accepts. What changes from the compose topology:
//! - every network is an overlay; the private app ↔ sidecar networks are
//!   encrypted overlays, since Swarm may put the two tasks on different
//!   nodes and their traffic is plaintext; the others are attachable;
//! - sidecars enrol over the network with a credential from a secret and
//!   keep their key in a tmpfs (no shared volumes, which belong to one node);
//! - the CA runs two replicas on the shared store, seeded from a secret;
//! - no `depends_on`, `restart`, `container_name` or `security_opt` (Swarm
//!   ignores or refuses them): start-up order comes from health and retries;
//! - `deploy.endpoint_mode` on every service, and published ports in host
//!   mode with `dnsrr` (the routing mesh needs a virtual IP);
//! - Lanyard's services run as uid 0, still with no capabilities: a stack
//!   file cannot give a tmpfs an owner or a mode (`docker stack deploy`
//!   ignores `tmpfs.mode`), and Swarm's tmpfs is root's 0755, so the image's
//!   unprivileged user could not write its keys there.

use serde_norway::{Mapping, Value};

use crate::inject::{enrol_secret, mapping, SEED_SECRET, STORE_KEY_SECRET, SWARM_SECRETS_DIR};
use crate::options::{Defaults, EndpointMode};

/// Keys Swarm ignores or refuses in a service.
const UNSUPPORTED: [&str; 5] = ["depends_on", "restart", "container_name", "security_opt", "links"];

/// Rewrites the injected document `doc` into a stack; `enrolled` are the
/// services with sidecars, `version` names this run's secrets.
pub fn rewrite(doc: &mut Mapping, defaults: &Defaults, enrolled: &[String], version: &str, warnings: &mut Vec<String>) {
    doc.insert("version".into(), "3.8".into());
    bind_outbound_by_subnet(doc);
    if let Some(Value::Mapping(services)) = doc.get_mut("services") {
        for (name, service) in services.iter_mut() {
            let Value::Mapping(service) = service else { continue };
            let name = name.as_str().unwrap_or_default().to_owned();
            for key in UNSUPPORTED {
                if service.remove(key).is_some() && key == "container_name" {
                    warnings.push(format!("{name}: container_name is not supported by Swarm and was left out"));
                }
            }
            if service.get("image").and_then(Value::as_str) == Some(defaults.image.as_str()) {
                service.insert("user".into(), "0:0".into());
            }
            let deploy = service.entry("deploy".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
            if let Value::Mapping(deploy) = deploy {
                deploy.insert("endpoint_mode".into(), defaults.endpoint_mode.to_string().into());
            }
            if defaults.endpoint_mode == EndpointMode::Dnsrr {
                if let Some(Value::Sequence(ports)) = service.get_mut("ports") {
                    for port in ports.iter_mut() {
                        if let Some(host_mode) = host_mode_port(port) {
                            *port = host_mode;
                        } else {
                            warnings
                                .push(format!("{name}: port {port:?} kept as written; with dnsrr it needs mode: host"));
                        }
                    }
                }
            }
        }
    }
    if let Some(Value::Mapping(networks)) = doc.get_mut("networks") {
        // Services without `networks` are on `default`: an overlay too.
        networks.entry("default".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
        for (name, network) in networks.iter_mut() {
            let name = name.as_str().unwrap_or_default();
            if network.is_null() {
                *network = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(network) = network else { continue };
            if network.get("external").is_some_and(|e| e != &Value::Bool(false)) {
                continue;
            }
            network.insert("driver".into(), "overlay".into());
            if private(name) {
                network.insert("driver_opts".into(), mapping([("encrypted", "true".into())]));
            } else {
                network.insert("attachable".into(), Value::Bool(true));
            }
        }
    }
    if let Some(Value::Mapping(volumes)) = doc.get_mut("volumes") {
        volumes.retain(|name, _| {
            !name.as_str().is_some_and(|n| n.starts_with("lanyard-certs-") || n == "lanyard-ca-state")
        });
    }
    let mut secrets = Mapping::new();
    let mut secret = |name: String, file: String| {
        let versioned = format!("{name}-{version}");
        secrets.insert(
            name.into(),
            mapping([("file", format!("./{SWARM_SECRETS_DIR}/{file}").into()), ("name", versioned.into())]),
        );
    };
    secret(STORE_KEY_SECRET.into(), "store.key".into());
    secret(SEED_SECRET.into(), "ca-seed.json".into());
    for s in enrolled {
        secret(enrol_secret(s), format!("enrol-{s}.toml"));
    }
    doc.insert("secrets".into(), Value::Mapping(secrets));
}

/// A Swarm task cannot resolve its own network aliases before it is
/// healthy, so sidecars listen for their app's calls on "my address in
/// this private network's subnet" instead of on their alias there.
fn bind_outbound_by_subnet(doc: &mut Mapping) {
    let subnets: Vec<(String, String)> = doc
        .get("networks")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter_map(|(name, n)| {
            let subnet = n.get("ipam")?.get("config")?.get(0)?.get("subnet")?.as_str()?;
            Some((name.as_str()?.to_owned(), subnet.to_owned()))
        })
        .collect();
    let Some(Value::Mapping(services)) = doc.get_mut("services") else { return };
    for (_, service) in services.iter_mut() {
        let Some(Value::Mapping(env)) = service.get_mut("environment") else { continue };
        let Some(Value::String(config)) = env.get_mut("LANYARD_SIDECAR_CONFIG") else { continue };
        for (network, subnet) in &subnets {
            // The alias `lanyard-out-S[-k]` belongs to network `lanyard-S[-k]`.
            let Some(rest) = network.strip_prefix(crate::inject::PREFIX) else { continue };
            let alias = format!("{}out-{rest}", crate::inject::PREFIX);
            *config = config.replace(&format!("listen = \"{alias}:"), &format!("listen = \"{subnet}:"));
        }
    }
}

/// An app ↔ sidecar network (`lanyard-S`, `lanyard-S-2`, ...), not the
/// control network or the project's own.
fn private(name: &str) -> bool {
    name.starts_with(crate::inject::PREFIX) && name != "lanyard-control"
}

/// `[IP:]PUBLISHED:TARGET` as the long syntax in host mode (the long
/// syntax has no host IP: the port is published on every address).
fn host_mode_port(port: &Value) -> Option<Value> {
    let text = match port {
        Value::String(s) => s.clone(),
        Value::Mapping(m) => {
            let mut m = m.clone();
            m.insert("mode".into(), "host".into());
            return Some(Value::Mapping(m));
        }
        _ => return None,
    };
    let (text, protocol) = text.split_once('/').map_or((text.as_str(), "tcp"), |(p, proto)| (p, proto));
    let parts: Vec<&str> = text.rsplitn(3, ':').collect();
    let (target, published) = match parts.as_slice() {
        [target, published, ..] => (target.parse::<u16>().ok()?, published.parse::<u16>().ok()?),
        _ => return None,
    };
    Some(mapping([
        ("target", Value::from(target)),
        ("published", Value::from(published)),
        ("protocol", protocol.into()),
        ("mode", "host".into()),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::Overrides;

    #[test]
    fn a_stack_has_overlays_secrets_enrolment_and_no_compose_only_keys() {
        let compose = crate::Compose::parse(
            "x-lanyard: {endpoint_mode: dnsrr}\nservices:\n  web:\n    image: nginx\n    container_name: web1\n    ports: [\"8080:80\"]\n    depends_on: [api]\n  api:\n    image: app\n    expose: [\"3000\"]\n    deploy: {replicas: 3}\n",
            "t",
        )
        .unwrap();
        let overrides = Overrides { swarm: Some("v7".into()), ..Default::default() };
        let out = crate::inject(&compose, &overrides).unwrap();
        assert_eq!(out.enrolled, ["api", "web"]);
        let yaml = out.compose.to_yaml();
        let doc: Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(doc["version"], "3.8");
        assert_eq!(doc["networks"]["lanyard-api"]["driver_opts"]["encrypted"], "true", "{yaml}");
        assert_eq!(doc["networks"]["default"]["attachable"], true);
        assert_eq!(doc["secrets"]["lanyard-enrol-api"]["name"], "lanyard-enrol-api-v7");
        let web = &doc["services"]["web"];
        assert!(web.get("container_name").is_none() && web.get("depends_on").is_none());
        let sidecar = &doc["services"]["lanyard-web"];
        assert_eq!(sidecar["deploy"]["endpoint_mode"], "dnsrr");
        assert_eq!(sidecar["ports"][0]["mode"], "host");
        assert_eq!(doc["services"]["lanyard-api"]["deploy"]["replicas"], 3, "each app replica gets a sidecar replica");
        let config = doc["services"]["lanyard-web"]["environment"]["LANYARD_SIDECAR_CONFIG"].as_str().unwrap();
        assert!(config.contains("[enrol]") && config.contains("/run/secrets/lanyard-enrol-web"), "{config}");
        assert!(!config.contains("lanyard-out-web:"), "outbound listeners bind by subnet: {config}");
        assert_eq!(doc["services"]["lanyard-ca"]["deploy"]["replicas"], 2);
        assert!(doc["services"].get("lanyard-ca-2").is_none());
        assert!(doc["services"].get("lanyard-redis").is_some(), "a stack needs the shared store");
    }

    #[test]
    fn public_names_are_refused_in_a_stack() {
        let compose = crate::Compose::parse(
            "x-lanyard: {acme_email: a@example.com}\nservices:\n  web:\n    image: app\n    expose: [\"80\"]\n    x-lanyard: {public: [www.example.com]}\n",
            "t",
        )
        .unwrap();
        let err = crate::inject(&compose, &Overrides { swarm: Some("v1".into()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("--target swarm"), "{err}");
    }
}
