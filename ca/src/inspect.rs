//! `ca inspect`: what a PEM file or cert dir holds, and whether it is usable.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use lanyard_sidecar::certdir::{self, CertDir, CertDirError, CERT_FILE};
use lanyard_sidecar::certinfo::{rfc3339, CertInfo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use serde::Serialize;
use time::OffsetDateTime;

use crate::CaError;

/// One certificate, as shown.
#[derive(Debug, Serialize)]
pub struct CertReport {
    /// The certificate's facts.
    #[serde(flatten)]
    pub info: CertInfo,
    /// Seconds until notAfter; negative once expired.
    pub remaining_seconds: i64,
}

/// Checks that only a cert dir allows.
#[derive(Debug, Serialize)]
pub struct DirChecks {
    /// Whether the chain verifies against `ca.pem`.
    pub chain_verifies: bool,
    /// Why it does not, if it does not.
    pub chain_error: Option<String>,
    /// Whether `key.pem` matches the leaf; `None` when there is no key.
    pub key_matches: Option<bool>,
}

/// The result of inspecting a path.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// What was inspected.
    pub path: PathBuf,
    /// Certificates, leaf first.
    pub certificates: Vec<CertReport>,
    /// Cert-dir checks, when `path` is a directory.
    pub cert_dir: Option<DirChecks>,
    /// Everything that makes the path unusable; empty when fine.
    pub problems: Vec<String>,
}

impl Inspection {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, c) in self.certificates.iter().enumerate() {
            let role = match (i, c.info.is_ca) {
                (0, false) => "leaf",
                (_, true) => "CA",
                _ => "certificate",
            };
            let i = &c.info;
            let sans: Vec<String> = i
                .uris
                .iter()
                .map(|u| format!("URI:{u}"))
                .chain(i.dns.iter().map(|d| format!("DNS:{d}")))
                .chain(i.ips.iter().map(|a| format!("IP:{a}")))
                .collect();
            let _ = writeln!(out, "[{role}] {}", i.subject);
            let _ = writeln!(out, "  SANs:        {}", if sans.is_empty() { "-".into() } else { sans.join(", ") });
            let _ = writeln!(out, "  serial:      {}", i.serial);
            let _ = writeln!(out, "  issuer:      {}", i.issuer);
            let _ = writeln!(out, "  not before:  {}", rfc3339(i.not_before));
            let _ = writeln!(out, "  not after:   {}", rfc3339(i.not_after));
            let _ = writeln!(out, "  remaining:   {}", human_seconds(c.remaining_seconds));
            let _ = writeln!(out, "  key:         {}", i.key_type);
            let _ = writeln!(out, "  sha256:      {}", i.sha256);
        }
        if let Some(d) = &self.cert_dir {
            let chain = match &d.chain_error {
                None => "verifies against ca.pem".to_owned(),
                Some(e) => format!("DOES NOT VERIFY: {e}"),
            };
            let key = match d.key_matches {
                Some(true) => "matches the leaf",
                Some(false) => "DOES NOT MATCH the leaf",
                None => "absent (the key lives with the requester)",
            };
            let _ = writeln!(out, "chain:         {chain}");
            let _ = writeln!(out, "key.pem:       {key}");
        }
        for p in &self.problems {
            let _ = writeln!(out, "PROBLEM: {p}");
        }
        out
    }
}

pub(crate) fn human_seconds(secs: i64) -> String {
    let (sign, s) = if secs < 0 { ("expired ", -secs) } else { ("", secs) };
    format!(
        "{sign}{}d {}h {}m {}s{}",
        s / 86_400,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        if secs < 0 { " ago" } else { "" }
    )
}

/// Inspects a PEM file or a cert dir at `now`.
pub fn inspect(path: &Path, now: OffsetDateTime) -> Result<Inspection, CaError> {
    let mut problems = Vec::new();
    let (ders, cert_dir) = if path.is_dir() {
        let raw = CertDir::new(path).read_raw()?;
        let ders = certdir::parse_certs(&path.join(CERT_FILE), &raw.cert)?;
        let roots = certdir::parse_certs(&path.join(certdir::CA_FILE), &raw.ca)?;
        let chain_error = certdir::verify_chain(&ders, &roots, now).err();
        if let Some(e) = &chain_error {
            problems.push(format!("chain does not verify against ca.pem: {e}"));
        }
        let leaf = info(path, &ders[0])?;
        let key_matches = raw
            .key
            .as_deref()
            .map(|pem| PrivateKeyDer::from_pem_slice(pem).is_ok_and(|k| certdir::key_matches(&k, &leaf)));
        if key_matches == Some(false) {
            problems.push("key.pem does not match the leaf certificate".into());
        }
        (ders, Some(DirChecks { chain_verifies: chain_error.is_none(), chain_error, key_matches }))
    } else {
        let pem = std::fs::read(path).map_err(|source| CertDirError::Read { path: path.to_owned(), source })?;
        (certdir::parse_certs(path, &pem)?, None)
    };
    let mut certificates = Vec::new();
    for der in &ders {
        let info = info(path, der)?;
        if now > info.not_after {
            problems.push(format!("{} expired at {}", info.subject, rfc3339(info.not_after)));
        } else if now < info.not_before {
            problems.push(format!("{} is not valid before {}", info.subject, rfc3339(info.not_before)));
        }
        certificates.push(CertReport { remaining_seconds: info.remaining(now).whole_seconds(), info });
    }
    Ok(Inspection { path: path.to_owned(), certificates, cert_dir, problems })
}

fn info(path: &Path, der: &[u8]) -> Result<CertInfo, CaError> {
    CertInfo::from_der(der).map_err(|e| CertDirError::Pem { path: path.to_owned(), what: e.to_string() }.into())
}
