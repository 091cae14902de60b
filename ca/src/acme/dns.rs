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

    /// The signed UPDATE message for one TXT change at `name`, with
    /// message ID `id`, signed at `now` (unix seconds).
    pub fn message(&self, change: Change, name: &str, value: &str, id: u16, now: u64) -> Result<Signed, String> {
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
        let mut signed = msg.clone();
        signed.extend(tsig_variables(&key_name, &alg_name, now, FUDGE, 0, &[]));
        let key = aws_lc_rs::hmac::Key::new(*algorithm, &secret);
        let mac = aws_lc_rs::hmac::sign(&key, &signed);
        let mac = mac.as_ref();

        let time = now.to_be_bytes();
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
        Ok(Signed { message: msg, mac: mac.to_vec(), key })
    }

    /// Checks the TSIG of `answer`, the server's reply to `request`
    /// (RFC 8945 §5.3): same key and algorithm, a MAC over the request's
    /// MAC and the reply, and a signing time within the fudge of `now`.
    pub fn verify_answer(&self, request: &Signed, answer: &[u8], now: u64) -> Result<(), String> {
        let server = self.server;
        let Some(tsig) = Tsig::find(answer)? else {
            return Err(format!("the answer from {server} carries no TSIG: it cannot be trusted"));
        };
        let mut key_name = Vec::new();
        put_name(&mut key_name, &self.tsig_key_name)?;
        let mut alg_name = Vec::new();
        put_name(&mut alg_name, self.tsig_algorithm.trim_end_matches('.'))?;
        if tsig.key_name != key_name || tsig.algorithm != alg_name {
            return Err(format!("the answer from {server} is signed with another TSIG key or algorithm"));
        }
        if tsig.error != 0 {
            return Err(format!(
                "{server} refused our TSIG: {} (check tsig_secret and the clocks)",
                tsig_error(tsig.error)
            ));
        }
        let mut signed = Vec::with_capacity(answer.len() + 128);
        signed.extend((request.mac.len() as u16).to_be_bytes());
        signed.extend(&request.mac);
        signed.extend(tsig.original_id.to_be_bytes());
        signed.extend(&answer[2..10]);
        let additional = u16::from_be_bytes([answer[10], answer[11]]) - 1;
        signed.extend(additional.to_be_bytes());
        signed.extend(&answer[12..tsig.start]);
        signed.extend(tsig_variables(&key_name, &alg_name, tsig.time, tsig.fudge, tsig.error, tsig.other));
        aws_lc_rs::hmac::verify(&request.key, &signed, tsig.mac)
            .map_err(|_| format!("the TSIG of the answer from {server} does not verify: it is forged or damaged"))?;
        if tsig.time.abs_diff(now) > u64::from(tsig.fudge) {
            return Err(format!(
                "the answer from {server} was signed {} s away from our clock",
                tsig.time.abs_diff(now)
            ));
        }
        Ok(())
    }

    /// Sends one change and waits for the server's signed answer: over
    /// UDP, and over TCP when the UDP answer comes truncated or not at all.
    pub async fn update(&self, change: Change, name: &str, value: &str) -> Result<(), String> {
        let mut idb = [0u8; 2];
        aws_lc_rs::rand::fill(&mut idb).map_err(|_| "no randomness")?;
        let id = u16::from_be_bytes(idb);
        let now = unix_now();
        let request = self.message(change, name, value, id, now)?;
        let server = self.server;
        let answer = match self.over_udp(&request.message, id).await? {
            Some(answer) if answer[2] & TC == 0 => answer,
            _ => self.over_tcp(&request.message, id).await?,
        };
        let rcode = answer[3] & 0x0f;
        if rcode != 0 && Tsig::find(&answer).ok().flatten().is_none() {
            // A server that cannot check our TSIG answers unsigned (RFC 8945 §5.2).
            return Err(refused(name, server, rcode));
        }
        self.verify_answer(&request, &answer, unix_now())?;
        match rcode {
            0 => Ok(()),
            rcode => Err(refused(name, server, rcode)),
        }
    }

    /// The answer to `msg` over UDP, tried three times; `None` when none came.
    async fn over_udp(&self, msg: &[u8], id: u16) -> Result<Option<Vec<u8>>, String> {
        let server = self.server;
        let bind = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        let mut answer = vec![0u8; 65_535];
        for _ in 0..3 {
            socket.send_to(msg, server).await.map_err(|e| format!("DNS update to {server}: {e}"))?;
            let Ok(received) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut answer)).await else {
                continue;
            };
            let (n, from) = received.map_err(|e| format!("DNS update to {server}: {e}"))?;
            if from == server && n >= 12 && answer[..2] == id.to_be_bytes() {
                answer.truncate(n);
                return Ok(Some(answer));
            }
        }
        Ok(None)
    }

    /// The answer to `msg` over TCP (two-byte length prefixes, RFC 1035 §4.2.2).
    async fn over_tcp(&self, msg: &[u8], id: u16) -> Result<Vec<u8>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = self.server;
        let exchange = async {
            let mut tcp = tokio::net::TcpStream::connect(server).await?;
            let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
            framed.extend(msg);
            tcp.write_all(&framed).await?;
            let len = tcp.read_u16().await?;
            let mut answer = vec![0u8; usize::from(len)];
            tcp.read_exact(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .map_err(|_| format!("DNS update to {server}: no answer over UDP or TCP"))?
            .map_err(|e| format!("DNS update to {server} over TCP: {e}"))?;
        if answer.len() < 12 || answer[..2] != id.to_be_bytes() {
            return Err(format!("DNS update to {server}: the TCP answer is not for our message"));
        }
        Ok(answer)
    }
}

/// The truncation bit in the third header byte.
const TC: u8 = 0x02;

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn refused(name: &str, server: SocketAddr, rcode: u8) -> String {
    let what = match rcode {
        2 => "SERVFAIL",
        5 => "REFUSED",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        _ => "an error",
    };
    format!("DNS update of {name} at {server} refused: {what} (check the TSIG key and the zone's update policy)")
}

fn tsig_error(code: u16) -> &'static str {
    match code {
        16 => "BADSIG",
        17 => "BADKEY",
        18 => "BADTIME",
        22 => "BADTRUNC",
        _ => "an unknown TSIG error",
    }
}

/// A signed request and what verifying its answer needs.
#[derive(Debug)]
pub struct Signed {
    /// The message as sent.
    pub message: Vec<u8>,
    mac: Vec<u8>,
    key: aws_lc_rs::hmac::Key,
}

/// The TSIG variables that follow the message in a MAC's input (RFC 8945 §4.3.3).
fn tsig_variables(key_name: &[u8], alg_name: &[u8], time: u64, fudge: u16, error: u16, other: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key_name.len() + alg_name.len() + 24 + other.len());
    out.extend(key_name);
    out.extend(CLASS_ANY.to_be_bytes());
    out.extend(0u32.to_be_bytes());
    out.extend(alg_name);
    out.extend(&time.to_be_bytes()[2..]);
    out.extend(fudge.to_be_bytes());
    out.extend(error.to_be_bytes());
    out.extend((other.len() as u16).to_be_bytes());
    out.extend(other);
    out
}

/// The TSIG record that ends a DNS message.
struct Tsig<'a> {
    /// Where the record starts: the MAC covers the bytes before it.
    start: usize,
    key_name: Vec<u8>,
    algorithm: Vec<u8>,
    time: u64,
    fudge: u16,
    mac: &'a [u8],
    original_id: u16,
    error: u16,
    other: &'a [u8],
}

impl<'a> Tsig<'a> {
    /// The message's TSIG, if its last additional record is one; an error
    /// when the message does not parse.
    fn find(msg: &'a [u8]) -> Result<Option<Self>, String> {
        let bad = || "a malformed DNS answer".to_owned();
        let count = |at: usize| msg.get(at..at + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
        let (questions, answers, authority, additional) = (
            count(4).ok_or_else(bad)?,
            count(6).ok_or_else(bad)?,
            count(8).ok_or_else(bad)?,
            count(10).ok_or_else(bad)?,
        );
        if additional == 0 {
            return Ok(None);
        }
        let mut at = 12;
        for _ in 0..questions {
            at = read_name(msg, at).ok_or_else(bad)?.1 + 4;
        }
        for _ in 0..answers + authority + additional - 1 {
            at = skip_record(msg, at).ok_or_else(bad)?;
        }
        let start = at;
        let (key_name, at) = read_name(msg, at).ok_or_else(bad)?;
        let field = |at: usize, n: usize| msg.get(at..at + n).ok_or_else(bad);
        let u16_at = |at: usize| field(at, 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        if u16_at(at)? != TYPE_TSIG {
            return Ok(None);
        }
        let rdata = at + 10;
        let end = rdata + usize::from(u16_at(at + 8)?);
        let (algorithm, at) = read_name(msg, rdata).ok_or_else(bad)?;
        let time = field(at, 6)?.iter().fold(0u64, |t, b| t << 8 | u64::from(*b));
        let fudge = u16_at(at + 6)?;
        let mac_len = usize::from(u16_at(at + 8)?);
        let mac = field(at + 10, mac_len)?;
        let at = at + 10 + mac_len;
        let (original_id, error, other_len) = (u16_at(at)?, u16_at(at + 2)?, usize::from(u16_at(at + 4)?));
        let other = field(at + 6, other_len)?;
        if at + 6 + other_len != end || end != msg.len() {
            return Err(bad());
        }
        Ok(Some(Self { start, key_name, algorithm, time, fudge, mac, original_id, error, other }))
    }
}

/// The name at `at` in wire form, lowercased and with compression
/// pointers followed, and where the bytes after it start.
fn read_name(msg: &[u8], mut at: usize) -> Option<(Vec<u8>, usize)> {
    let mut name = Vec::new();
    let mut after = None;
    for _ in 0..128 {
        let len = *msg.get(at)?;
        match len {
            0 => {
                name.push(0);
                return Some((name, after.unwrap_or(at + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let target = usize::from(u16::from_be_bytes([l & 0x3f, *msg.get(at + 1)?]));
                after.get_or_insert(at + 2);
                at = target;
            }
            l if l < 64 => {
                let label = msg.get(at + 1..at + 1 + usize::from(l))?;
                name.push(l);
                name.extend(label.iter().map(u8::to_ascii_lowercase));
                at += 1 + usize::from(l);
            }
            _ => return None,
        }
    }
    None
}

/// Where the resource record at `at` ends.
fn skip_record(msg: &[u8], at: usize) -> Option<usize> {
    let (_, at) = read_name(msg, at)?;
    let rdlen = msg.get(at + 8..at + 10)?;
    let end = at + 10 + usize::from(u16::from_be_bytes([rdlen[0], rdlen[1]]));
    (end <= msg.len()).then_some(end)
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
        let m =
            c.message(Change::Add, "_acme-challenge.www.example.test", "abc", 0x1234, 1_700_000_000).unwrap().message;
        assert_eq!(&m[..12], &[0x12, 0x34, 0x28, 0, 0, 1, 0, 0, 0, 1, 0, 1]);
        // zone example.test SOA IN
        assert_eq!(&m[12..26], b"\x07example\x04test\x00");
        assert!(m.ends_with(&[0x12, 0x34, 0, 0, 0, 0]), "original id, no error, no other data");
        assert_eq!(c.zone_for("_acme-challenge.a.b.example.test"), "example.test");
        let bad = DnsUpdateConfig { tsig_algorithm: "hmac-md5".into(), ..c };
        assert!(bad.message(Change::Delete, "x.example.test", "v", 1, 1).unwrap_err().contains("hmac-sha256"));
    }

    /// What a server sends back for `request`: its header and zone section,
    /// signed with the key over the request's MAC (as BIND does).
    fn signed_answer(c: &DnsUpdateConfig, request: &Signed, time: u64, compress_key_name: bool) -> Vec<u8> {
        let tsig = Tsig::find(&request.message).unwrap().unwrap();
        let mut answer = request.message[..tsig.start].to_vec();
        answer[2] |= 0x80; // QR
        answer[5] = 1;
        answer[9] = 0; // no update section in the answer
        let zone_end = read_name(&answer, 12).unwrap().1 + 4;
        answer.truncate(zone_end);
        answer[10..12].copy_from_slice(&[0, 0]);
        let mut key_name = Vec::new();
        put_name(&mut key_name, &c.tsig_key_name).unwrap();
        let mut alg = Vec::new();
        put_name(&mut alg, &c.tsig_algorithm).unwrap();
        let mut signed = (request.mac.len() as u16).to_be_bytes().to_vec();
        signed.extend(&request.mac);
        signed.extend(&answer);
        signed.extend(tsig_variables(&key_name, &alg, time, FUDGE, 0, &[]));
        let mac = aws_lc_rs::hmac::sign(&request.key, &signed);
        let mut rdata = alg;
        rdata.extend(&time.to_be_bytes()[2..]);
        rdata.extend(FUDGE.to_be_bytes());
        rdata.extend((mac.as_ref().len() as u16).to_be_bytes());
        rdata.extend(mac.as_ref());
        rdata.extend(answer[..2].to_vec());
        rdata.extend([0, 0, 0, 0]);
        if compress_key_name {
            answer.extend([0xc0, 12]); // the key is named like the zone here
        } else {
            answer.extend(&key_name);
        }
        answer.extend(TYPE_TSIG.to_be_bytes());
        answer.extend(CLASS_ANY.to_be_bytes());
        answer.extend(0u32.to_be_bytes());
        answer.extend((rdata.len() as u16).to_be_bytes());
        answer.extend(rdata);
        answer[11] = 1;
        answer
    }

    #[test]
    fn answers_are_trusted_only_with_a_tsig_that_verifies() {
        let c = DnsUpdateConfig {
            server: "127.0.0.1:53".parse().unwrap(),
            zone: Some("example.test".into()),
            tsig_key_name: "Example.Test".into(),
            tsig_secret: "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0".into(),
            tsig_algorithm: "hmac-sha256".into(),
            ttl: 60,
        };
        let now = 1_700_000_000;
        let request = c.message(Change::Add, "_acme-challenge.www.example.test", "abc", 7, now).unwrap();
        for compressed in [false, true] {
            let good = signed_answer(&c, &request, now, compressed);
            assert_eq!(c.verify_answer(&request, &good, now + 2), Ok(()), "compressed key name: {compressed}");
        }
        let good = signed_answer(&c, &request, now, false);
        let mut forged = good.clone();
        forged[3] |= 5; // REFUSED turned into... anything else
        assert!(c.verify_answer(&request, &forged, now).unwrap_err().contains("does not verify"));
        assert!(c.verify_answer(&request, &good, now + 301).unwrap_err().contains("301 s away"));
        let unsigned = &good[..good.len() - (good.len() - Tsig::find(&good).unwrap().unwrap().start)];
        let mut unsigned = unsigned.to_vec();
        unsigned[11] = 0;
        assert!(c.verify_answer(&request, &unsigned, now).unwrap_err().contains("carries no TSIG"));
        let other = DnsUpdateConfig { tsig_key_name: "other-key".into(), ..c.clone() };
        assert!(other.verify_answer(&request, &good, now).unwrap_err().contains("another TSIG key"));
        for cut in [13, good.len() - 1] {
            assert!(c.verify_answer(&request, &good[..cut], now).unwrap_err().contains("malformed"), "cut at {cut}");
        }
    }
}
