//! Facts about one X.509 certificate, for `ca inspect`, health and metrics.

use std::net::IpAddr;

use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::public_key::PublicKey;

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not a valid X.509 certificate: {0}")]
pub struct CertParseError(String);

/// What an operator wants to know about a certificate.
#[derive(Clone, Debug, Serialize)]
pub struct CertInfo {
    /// Subject distinguished name (RFC 4514).
    pub subject: String,
    /// Issuer distinguished name (RFC 4514).
    pub issuer: String,
    /// Serial number, lowercase hex without separators.
    pub serial: String,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// IP address subject alternative names.
    pub ips: Vec<IpAddr>,
    /// URI subject alternative names (SPIFFE IDs).
    pub uris: Vec<String>,
    /// Start of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Key algorithm, such as `ECDSA P-256` or `RSA 2048`.
    pub key_type: String,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub sha256: String,
    /// Whether basicConstraints marks it as a CA.
    pub is_ca: bool,
    /// The DER-encoded SubjectPublicKeyInfo.
    #[serde(skip)]
    pub spki: Vec<u8>,
}

impl CertInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertParseError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertParseError(e.to_string()))?;
        let mut info = Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: hex(cert.raw_serial()).trim_start_matches("00").to_owned(),
            dns: Vec::new(),
            ips: Vec::new(),
            uris: Vec::new(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            key_type: key_type(&cert),
            sha256: hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref()),
            is_ca: cert.is_ca(),
            spki: cert.public_key().raw.to_vec(),
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => info.dns.push((*d).to_owned()),
                    GeneralName::URI(u) => info.uris.push((*u).to_owned()),
                    GeneralName::IPAddress(raw) => {
                        if let Some(ip) = ip_from_bytes(raw) {
                            info.ips.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(info)
    }

    /// Time left until `not_after`, negative once expired.
    pub fn remaining(&self, now: OffsetDateTime) -> time::Duration {
        self.not_after - now
    }

    /// The instant when this certificate has used `fraction` of its lifetime.
    pub fn life_point(&self, fraction: f64) -> OffsetDateTime {
        self.not_before + (self.not_after - self.not_before) * fraction
    }
}

fn ip_from_bytes(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" {
        return "Ed25519".into();
    }
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
        Ok(PublicKey::EC(ec)) => match ec.key_size() {
            256 => "ECDSA P-256".into(),
            384 => "ECDSA P-384".into(),
            bits => format!("ECDSA {bits}-bit"),
        },
        _ => spki.algorithm.algorithm.to_id_string(),
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Formats an instant as RFC 3339 (`2026-11-24T10:55:42Z`).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}
