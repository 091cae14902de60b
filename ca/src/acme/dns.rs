//! DNS-01 records through RFC 2136 dynamic updates signed with TSIG
//! (RFC 8945), so any standard DNS server (BIND, Knot, PowerDNS, ...) can
//! take the `_acme-challenge` TXT records.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tokio::net::UdpSocket;

const TYPE_SOA: u16 = 6;
const TYPE_TXT: u16 = 16;
const TYPE_TSIG: u16 = 250;
const CLASS_IN: u16 = 1;
const CLASS_NONE: u16 = 254;
const CLASS_ANY: u16 = 255;
const OPCODE_UPDATE: u16 = 5 << 11;
/// Seconds of clock difference the server may accept.
const FUDGE: u16 = 300;

/// `[acme.dns]`: the server that takes the updates and its TSIG key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsUpdateConfig {
    /// The primary server, `IP:PORT`.
    pub server: SocketAddr,
    /// The zone to update; default: the last two labels of the name.
    #[serde(default)]
    pub zone: Option<String>,
    /// TSIG key name.
    pub tsig_key_name: String,
    /// TSIG secret, base64 (as `tsig-keygen` prints it).
    pub tsig_secret: String,
    /// `hmac-sha256` (default), `hmac-sha384` or `hmac-sha512`.
    #[serde(default = "default_algorithm")]
    pub tsig_algorithm: String,
    /// TTL of the TXT records.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
}

fn default_algorithm() -> String {
    "hmac-sha256".into()
}

fn default_ttl() -> u32 {
    60
}

/// A TXT change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Add one record.
    Add,
    /// Delete that one record.
    Delete,
}

/// Appends a name in wire format (lowercase, as TSIG's canonical form wants).
fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), String> {
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} is not a DNS name"));
        }
        out.push(label.len() as u8);
        out.extend(label.to_ascii_lowercase().bytes());
    }
    out.push(0);
    Ok(())
}

impl DnsUpdateConfig {
    fn zone_for(&self, name: &str) -> String {
        self.zone.clone().unwrap_or_else(|| super::domain::registered_domain(name))
    }

    fn algorithm(&self) -> Result<&'static aws_lc_rs::hmac::Algorithm, String> {
        match self.tsig_algorithm.trim_end_matches('.').to_ascii_lowercase().as_str() {
            "hmac-sha256" => Ok(&aws_lc_rs::hmac::HMAC_SHA256),
            "hmac-sha384" => Ok(&aws_lc_rs::hmac::HMAC_SHA384),
            "hmac-sha512" => Ok(&aws_lc_rs::hmac::HMAC_SHA512),
            other => Err(format!("tsig_algorithm {other:?}: use hmac-sha256, hmac-sha384 or hmac-sha512")),
        }
    }

    /// The signed UPDATE message for one TXT change at `name`.
    fn message(&self, change: Change, name: &str, value: &str, id: u16, now: u64) -> Result<Vec<u8>, String> {
        let zone = self.zone_for(name);
        let algorithm = self.algorithm()?;
        let secret = base64::engine::general_purpose::STANDARD
            .decode(self.tsig_secret.trim())
            .map_err(|e| format!("tsig_secret is not base64: {e}"))?;
        if value.len() > 255 {
            return Err("TXT value longer than 255 bytes".into());
        }
        let mut msg = Vec::with_capacity(256);
        msg.extend(id.to_be_bytes());
        msg.extend(OPCODE_UPDATE.to_be_bytes());
        msg.extend([0, 1, 0, 0, 0, 1, 0, 0]); // one zone, no prerequisite, one update, no additional (yet)
        put_name(&mut msg, &zone)?;
        msg.extend(TYPE_SOA.to_be_bytes());
        msg.extend(CLASS_IN.to_be_bytes());
        put_name(&mut msg, name)?;
        msg.extend(TYPE_TXT.to_be_bytes());
        let (class, ttl) = match change {
            Change::Add => (CLASS_IN, self.ttl),
            Change::Delete => (CLASS_NONE, 0),
        };
        msg.extend(class.to_be_bytes());
        msg.extend(ttl.to_be_bytes());
        msg.extend(((value.len() + 1) as u16).to_be_bytes());
        msg.push(value.len() as u8);
        msg.extend(value.as_bytes());

        // TSIG: the MAC covers the message, then the TSIG variables.
        let mut key_name = Vec::new();
        put_name(&mut key_name, &self.tsig_key_name)?;
        let mut alg_name = Vec::new();
        put_name(&mut alg_name, self.tsig_algorithm.trim_end_matches('.'))?;
        let time = now.to_be_bytes();
        let mut signed = msg.clone();
        signed.extend(&key_name);
        signed.extend(CLASS_ANY.to_be_bytes());
        signed.extend(0u32.to_be_bytes());
        signed.extend(&alg_name);
        signed.extend(&time[2..]);
        signed.extend(FUDGE.to_be_bytes());
        signed.extend([0, 0, 0, 0]); // error, other len
        let key = aws_lc_rs::hmac::Key::new(*algorithm, &secret);
        let mac = aws_lc_rs::hmac::sign(&key, &signed);
        let mac = mac.as_ref();

        let mut rdata = alg_name;
        rdata.extend(&time[2..]);
        rdata.extend(FUDGE.to_be_bytes());
        rdata.extend((mac.len() as u16).to_be_bytes());
        rdata.extend(mac);
        rdata.extend(id.to_be_bytes());
        rdata.extend([0, 0, 0, 0]);
        msg.extend(&key_name);
        msg.extend(TYPE_TSIG.to_be_bytes());
        msg.extend(CLASS_ANY.to_be_bytes());
        msg.extend(0u32.to_be_bytes());
        msg.extend((rdata.len() as u16).to_be_bytes());
        msg.extend(rdata);
        msg[11] = 1; // ARCOUNT = 1
        Ok(msg)
    }

    /// Sends one change and waits for the server's answer.
    pub async fn update(&self, change: Change, name: &str, value: &str) -> Result<(), String> {
        let mut idb = [0u8; 2];
        aws_lc_rs::rand::fill(&mut idb).map_err(|_| "no randomness")?;
        let id = u16::from_be_bytes(idb);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let msg = self.message(change, name, value, id, now)?;
        let bind = if self.server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        let server = self.server;
        let mut answer = [0u8; 1024];
        for _ in 0..3 {
            socket.send_to(&msg, server).await.map_err(|e| format!("DNS update to {server}: {e}"))?;
            let Ok(received) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut answer)).await else {
                continue;
            };
            let (n, from) = received.map_err(|e| format!("DNS update to {server}: {e}"))?;
            if from != server || n < 12 || answer[..2] != id.to_be_bytes() {
                continue;
            }
            return match answer[3] & 0x0f {
                0 => Ok(()),
                rcode => Err(format!(
                    "DNS update of {name} at {server} refused: {} (check the TSIG key and the zone's update policy)",
                    match rcode {
                        2 => "SERVFAIL",
                        5 => "REFUSED",
                        9 => "NOTAUTH",
                        10 => "NOTZONE",
                        _ => "an error",
                    }
                )),
            };
        }
        Err(format!("DNS update to {server}: no answer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout_and_tsig() {
        let c = DnsUpdateConfig {
            server: "127.0.0.1:53".parse().unwrap(),
            zone: None,
            tsig_key_name: "acme-key".into(),
            tsig_secret: "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0".into(),
            tsig_algorithm: "hmac-sha256".into(),
            ttl: 60,
        };
        let m = c.message(Change::Add, "_acme-challenge.www.example.test", "abc", 0x1234, 1_700_000_000).unwrap();
        assert_eq!(&m[..12], &[0x12, 0x34, 0x28, 0, 0, 1, 0, 0, 0, 1, 0, 1]);
        // zone example.test SOA IN
        assert_eq!(&m[12..26], b"\x07example\x04test\x00");
        assert!(m.ends_with(&[0x12, 0x34, 0, 0, 0, 0]), "original id, no error, no other data");
        assert_eq!(c.zone_for("_acme-challenge.a.b.example.test"), "example.test");
        let bad = DnsUpdateConfig { tsig_algorithm: "hmac-md5".into(), ..c };
        assert!(bad.message(Change::Delete, "x.example.test", "v", 1, 1).unwrap_err().contains("hmac-sha256"));
    }
}
