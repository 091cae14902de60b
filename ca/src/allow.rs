//! Allow lists of names and addresses, as written in `lanyard.toml`
//! (`[acme_server] allow`, `[on_demand] allow`): a name (`web.internal`),
//! a glob (`*.internal`, `svc-*`), an IP address or a CIDR (`10.0.0.0/8`).

use std::net::IpAddr;

use lanyard_sidecar::identity::DnsName;

/// One entry.
#[derive(Clone, Debug, PartialEq)]
enum Pattern {
    /// A name or a glob over names (`*` matches any run of characters).
    Name(String),
    /// An IP network.
    Net(IpAddr, u8),
}

impl Pattern {
    fn parse(entry: &str) -> Result<Self, String> {
        if let Some((addr, len)) = entry.split_once('/') {
            let addr: IpAddr =
                addr.parse().map_err(|_| format!("allow entry {entry:?}: {addr:?} is not an IP address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("allow entry {entry:?}: the prefix length must be 0 to {max}"))?;
            return Ok(Self::Net(addr, len));
        }
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Ok(Self::Net(ip, if ip.is_ipv4() { 32 } else { 128 }));
        }
        let name = entry.to_ascii_lowercase();
        if name.replace('*', "x").parse::<DnsName>().is_err() {
            return Err(format!(
                "allow entry {entry:?} is not a name, a glob (*.internal, svc-*), an IP address or a CIDR"
            ));
        }
        Ok(Self::Name(name))
    }
}

/// A parsed allow list.
#[derive(Clone, Debug)]
pub struct AllowList {
    entries: Vec<String>,
    patterns: Vec<Pattern>,
}

impl AllowList {
    /// Parses `entries`; an error names the entry and what may be written.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let patterns = entries.iter().map(|e| Pattern::parse(e)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { entries: entries.to_vec(), patterns })
    }

    /// The entries as written, for messages.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// Whether an entry admits the DNS name `name` (compared lower-cased).
    pub fn admits_name(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.patterns.iter().any(|p| matches!(p, Pattern::Name(glob) if glob_match(glob, &name)))
    }

    /// Whether an entry admits the address `ip`.
    pub fn admits_ip(&self, ip: IpAddr) -> bool {
        self.patterns.iter().any(|p| matches!(p, Pattern::Net(net, len) if in_network(*net, *len, ip)))
    }
}

/// `*` matches any run of characters, `.` included.
fn glob_match(glob: &str, name: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return glob == name;
    }
    if name.len() < first.len() + last.len() || !name.starts_with(first) || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

fn in_network(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    let bits = |a: IpAddr| -> (u128, u32) {
        match a {
            IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, 32),
            IpAddr::V6(v) => (u128::from(v), 128),
        }
    };
    let ((n, nw), (i, iw)) = (bits(net), bits(ip));
    if nw != iw {
        return false;
    }
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
    n & mask == i & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_globs_and_networks() {
        let list =
            AllowList::parse(&["*.internal", "svc-*", "web.example.test", "10.0.0.0/8", "::1"].map(String::from))
                .unwrap();
        for ok in ["web.internal", "a.b.internal", "svc-api", "WEB.example.test"] {
            assert!(list.admits_name(ok), "{ok}");
        }
        for refused in ["internal", "web.internal.evil", "svc", "www.example.test"] {
            assert!(!list.admits_name(refused), "{refused}");
        }
        assert!(list.admits_ip("10.1.2.3".parse().unwrap()) && list.admits_ip("::1".parse().unwrap()));
        assert!(!list.admits_ip("11.0.0.1".parse().unwrap()) && !list.admits_ip("::2".parse().unwrap()));
        assert!(AllowList::parse(&["10.0.0.0/33".into()]).unwrap_err().contains("0 to 32"));
        assert!(AllowList::parse(&["a b".into()]).unwrap_err().contains("is not a name"));
    }
}
