//! `[acme_server]` in `lanyard.toml`: which names may be ordered, the
//! profiles offered, and how validations reach the fleet.

use std::collections::BTreeMap;
use std::net::IpAddr;

use lanyard_sidecar::identity::DnsName;
use lanyard_sidecar::span::Span;
use serde::{Deserialize, Serialize};

use super::problem::Problem;
use crate::allow::AllowList;

/// `[acme_server]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeServerConfig {
    /// Identifiers that may be ordered: a name (`web.internal`), a glob
    /// (`*.internal`, `svc-*`), an IP address or a CIDR (`10.0.0.0/8`).
    pub allow: Vec<String>,
    /// Profiles offered in `meta.profiles`: name → certificate lifetime.
    #[serde(default = "default_profiles")]
    pub profiles: BTreeMap<String, String>,
    /// The profile of an order that names none.
    #[serde(default = "default_profile")]
    pub default_profile: String,
    /// The port HTTP-01 validations connect to (RFC 8555 says 80).
    #[serde(default = "default_http01_port")]
    pub http01_port: u16,
    /// The port TLS-ALPN-01 validations connect to (RFC 8737 says 443).
    #[serde(default = "default_tls_alpn01_port")]
    pub tls_alpn01_port: u16,
    /// Addresses for names the resolver does not know (validation only).
    #[serde(default)]
    pub hosts: BTreeMap<String, IpAddr>,
    /// External account binding keys: key ID → HMAC key (base64url).
    #[serde(default)]
    pub eab: BTreeMap<String, String>,
    /// Refuse accounts without an external account binding.
    #[serde(default)]
    pub eab_required: bool,
    /// How long one validation may take.
    #[serde(default = "default_validation_timeout", deserialize_with = "lanyard_sidecar::cli::serde_str::one")]
    pub validation_timeout: Span,
}

fn default_profiles() -> BTreeMap<String, String> {
    [("tlsserver".to_owned(), "24h".to_owned()), ("shortlived".to_owned(), "6h".to_owned())].into()
}
fn default_profile() -> String {
    "tlsserver".into()
}
fn default_http01_port() -> u16 {
    80
}
fn default_tls_alpn01_port() -> u16 {
    443
}
fn default_validation_timeout() -> Span {
    "10s".parse().expect("valid")
}

/// An order's identifier (RFC 8555 §9.7.7, RFC 8738).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
pub enum Identifier {
    /// `{"type": "dns"}`, lower-cased.
    Dns(String),
    /// `{"type": "ip"}`.
    Ip(IpAddr),
}

impl Identifier {
    /// Reads `{"type", "value"}`.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, Problem> {
        let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or_default();
        let value = v.get("value").and_then(|t| t.as_str()).unwrap_or_default();
        match kind {
            "dns" if value.starts_with("*.") => Err(Problem::rejected_identifier(format!(
                "{value}: wildcard names need dns-01, which this server does not offer (it validates http-01 and tls-alpn-01)"
            ))),
            "dns" if value.parse::<IpAddr>().is_ok() => Err(Problem::rejected_identifier(format!(
                "{value} is an IP address: order it as an identifier of type \"ip\" (RFC 8738)"
            ))),
            "dns" => value
                .parse::<DnsName>()
                .map(|_| Self::Dns(value.to_ascii_lowercase()))
                .map_err(|_| Problem::rejected_identifier(format!("{value:?} is not a DNS name"))),
            "ip" => value
                .parse()
                .map(Self::Ip)
                .map_err(|_| Problem::rejected_identifier(format!("{value:?} is not an IP address"))),
            other => Err(Problem::unsupported_identifier(format!(
                "identifier type {other:?}: this server issues for dns and ip identifiers"
            ))),
        }
    }

    /// `{"type", "value"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The value as written in certificates and messages.
    pub fn value(&self) -> String {
        match self {
            Self::Dns(name) => name.clone(),
            Self::Ip(ip) => ip.to_string(),
        }
    }
}

/// The checked `[acme_server]`: patterns parsed and lifetimes read.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The configuration as written.
    pub config: AcmeServerConfig,
    allow: AllowList,
    /// Profile name → lifetime.
    pub profiles: BTreeMap<String, Span>,
}

impl Policy {
    /// Checks `config`; an error names the entry and what to write.
    pub fn new(config: AcmeServerConfig) -> Result<Self, String> {
        if config.allow.is_empty() {
            return Err(
                "[acme_server] allow is empty: list the names ACME clients may order, e.g. [\"*.internal\"]".into()
            );
        }
        let allow = AllowList::parse(&config.allow)?;
        let mut profiles = BTreeMap::new();
        for (name, lifetime) in &config.profiles {
            let span: Span = lifetime.parse().map_err(|e| {
                format!("[acme_server.profiles] {name} = {lifetime:?}: {e} (write a lifetime such as \"24h\")")
            })?;
            profiles.insert(name.clone(), span);
        }
        if !profiles.contains_key(&config.default_profile) {
            return Err(format!(
                "[acme_server] default_profile = {:?} is not one of the profiles ({})",
                config.default_profile,
                profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        for (kid, key) in &config.eab {
            use base64::Engine;
            if base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key.trim_end_matches('=')).is_err() {
                return Err(format!("[acme_server.eab] {kid}: the HMAC key is not base64url"));
            }
        }
        Ok(Self { config, allow, profiles })
    }

    /// Whether `id` may be ordered; the refusal names the allow list.
    pub fn admit(&self, id: &Identifier) -> Result<(), Problem> {
        let admitted = match id {
            Identifier::Dns(name) => self.allow.admits_name(name),
            Identifier::Ip(ip) => self.allow.admits_ip(*ip),
        };
        if admitted {
            return Ok(());
        }
        Err(Problem::rejected_identifier(format!(
            "{} is not allowed by this CA's [acme_server] allow = {:?}",
            id.value(),
            self.config.allow
        )))
    }

    /// The lifetime of `profile` (or the default), or `invalidProfile` naming the offered ones.
    pub fn lifetime(&self, profile: Option<&str>) -> Result<(String, Span), Problem> {
        let name = profile.unwrap_or(&self.config.default_profile);
        match self.profiles.get(name) {
            Some(span) => Ok((name.to_owned(), *span)),
            None => Err(Problem::invalid_profile(format!(
                "profile {name:?} is not offered; this server offers {}",
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> Policy {
        let toml = format!("allow = {allow:?}");
        Policy::new(toml::from_str(&toml).unwrap()).unwrap()
    }

    #[test]
    fn allow_takes_names_globs_and_networks() {
        let p = policy(&["*.internal", "svc-*", "web.example.test", "10.0.0.0/8", "::1"]);
        let dns = |n: &str| Identifier::Dns(n.into());
        let ip = |a: &str| Identifier::Ip(a.parse().unwrap());
        for ok in [
            dns("web.internal"),
            dns("a.b.internal"),
            dns("svc-api"),
            dns("web.example.test"),
            ip("10.1.2.3"),
            ip("::1"),
        ] {
            assert!(p.admit(&ok).is_ok(), "{ok:?}");
        }
        for refused in
            [dns("internal"), dns("web.internal.evil"), dns("svc"), dns("www.example.test"), ip("11.0.0.1"), ip("::2")]
        {
            let e = p.admit(&refused).unwrap_err();
            assert_eq!(e.kind, "rejectedIdentifier", "{refused:?}");
            assert!(e.detail.contains("*.internal"), "{e}");
        }
        assert!(Policy::new(toml::from_str("allow = [\"10.0.0.0/33\"]").unwrap()).unwrap_err().contains("0 to 32"));
        assert!(Policy::new(toml::from_str("allow = []").unwrap()).unwrap_err().contains("allow is empty"));
        let e = Policy::new(toml::from_str("allow = [\"*.x\"]\ndefault_profile = \"classic\"").unwrap()).unwrap_err();
        assert!(e.contains("shortlived, tlsserver"), "{e}");
        assert_eq!(p.lifetime(Some("classic")).unwrap_err().kind, "invalidProfile");
        assert_eq!(p.lifetime(None).unwrap().0, "tlsserver");
    }
}
