//! Identities: DNS names, SPIFFE IDs and trust domains, parsed once and
//! carried as newtypes.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Why a name was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// An IP address was given where a DNS name was expected.
    #[error("{0:?} is an IP address, not a DNS name; pass it with --ip instead")]
    IpAsDns(String),
    /// The DNS name breaks RFC 1123 syntax.
    #[error("invalid DNS name {name:?}: {why}")]
    Dns {
        /// The rejected text.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The SPIFFE ID breaks the SPIFFE syntax.
    #[error("invalid SPIFFE ID {id:?}: {why}; expected spiffe://<trust-domain>/<path>")]
    Spiffe {
        /// The rejected text.
        id: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_'")]
    TrustDomain(String),
}

/// A syntactically valid, lowercase DNS name (RFC 1123), optionally with one
/// leading `*.` wildcard label.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(String);

impl DnsName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` equals `suffix` or is a subdomain of it.
    pub fn is_within(&self, suffix: &DnsName) -> bool {
        let (name, suffix) = (self.as_str(), suffix.as_str().trim_start_matches("*."));
        name == suffix || name.ends_with(&format!(".{suffix}"))
    }
}

impl FromStr for DnsName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.parse::<IpAddr>().is_ok() {
            return Err(NameError::IpAsDns(s.to_owned()));
        }
        let err = |why| NameError::Dns { name: s.to_owned(), why };
        let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
        if name.is_empty() {
            return Err(err("it is empty"));
        }
        if name.len() > 253 {
            return Err(err("it is longer than 253 characters"));
        }
        let body = name.strip_prefix("*.").unwrap_or(&name);
        let labels: Vec<&str> = body.split('.').collect();
        for label in &labels {
            if label.is_empty() {
                return Err(err("it has an empty label (two dots in a row, or a leading dot)"));
            }
            if label.len() > 63 {
                return Err(err("a label is longer than 63 characters"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(err("a label starts or ends with '-'"));
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(err("only letters, digits, '-' and '.' are allowed"));
            }
        }
        if labels.last().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit())) {
            return Err(err("the last label is all digits"));
        }
        Ok(Self(name))
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE trust domain such as `lanyard.internal`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID `spiffe://<self>/<path>`.
    pub fn id(&self, path: &str) -> Result<SpiffeId, NameError> {
        format!("spiffe://{}/{}", self.0, path).parse()
    }
}

impl FromStr for TrustDomain {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::TrustDomain(s.to_owned()))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID, `spiffe://<trust-domain>/<path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SpiffeId {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| NameError::Spiffe { id: s.to_owned(), why };
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| err("it must start with spiffe://"))?;
        let (domain, path) = rest.split_once('/').ok_or_else(|| err("it has no path"))?;
        domain.parse::<TrustDomain>().map_err(|_| err("the trust domain is invalid"))?;
        if path.is_empty() {
            return Err(err("it has no path"));
        }
        for seg in path.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(err("a path segment is empty, '.' or '..'"));
            }
            if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return Err(err("path segments allow only letters, digits, '.', '-' and '_'"));
            }
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A peer identity on an allow-list or expected of a server: a SPIFFE ID or a
/// DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerId {
    /// Matched against URI SANs.
    Spiffe(SpiffeId),
    /// Matched against DNS SANs.
    Dns(DnsName),
}

impl FromStr for PeerId {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("spiffe://") {
            s.parse().map(Self::Spiffe)
        } else {
            s.parse().map(Self::Dns)
        }
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spiffe(id) => id.fmt(f),
            Self::Dns(name) => name.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert_eq!("Web.Example.".parse::<DnsName>().unwrap().as_str(), "web.example");
        assert!("*.svc.local".parse::<DnsName>().is_ok());
        assert!(matches!("10.0.0.1".parse::<DnsName>(), Err(NameError::IpAsDns(_))));
        assert!(matches!("::1".parse::<DnsName>(), Err(NameError::IpAsDns(_))));
        for bad in ["a..b", "-x", "x-", "", "a_b", "a.*.b", "1.2.3"] {
            assert!(bad.parse::<DnsName>().is_err(), "{bad}");
        }
        let api: DnsName = "api.svc.local".parse().unwrap();
        assert!(api.is_within(&"svc.local".parse().unwrap()));
        assert!(!api.is_within(&"vc.local".parse().unwrap()));
    }

    #[test]
    fn spiffe_ids() {
        assert!("spiffe://lanyard.internal/web".parse::<SpiffeId>().is_ok());
        assert!("spiffe://td/ns/prod/web".parse::<SpiffeId>().is_ok());
        for bad in
            ["http://td/web", "spiffe://td", "spiffe://td/", "spiffe://TD/x", "spiffe://td/a//b", "spiffe://td/../x"]
        {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
        assert!(matches!("spiffe://td/web".parse::<PeerId>(), Ok(PeerId::Spiffe(_))));
        assert!(matches!("web".parse::<PeerId>(), Ok(PeerId::Dns(_))));
    }
}
