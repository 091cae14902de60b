//! Issuing leaf certificates for service identities.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use lanyard_sidecar::certdir::PemSet;
use lanyard_sidecar::certinfo::{rfc3339, CertInfo};
use lanyard_sidecar::identity::{DnsName, SpiffeId};
use lanyard_sidecar::span::Span;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::keys::{is_rsa, KeyType};
use crate::state::{backdate_for, random_serial, CaState};
use crate::CaError;

/// Default leaf lifetime.
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Where the leaf's key comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum KeySource {
    /// The CA generates a fresh key of this type.
    Generate(KeyType),
    /// The requester holds the key and sent this CSR (PEM).
    Csr {
        /// Where the CSR came from, for messages.
        origin: PathBuf,
        /// The PEM text.
        pem: String,
    },
}

/// A request for one service certificate.
#[derive(Clone, Debug, PartialEq)]
pub struct LeafRequest {
    /// The service name: the CN, the SPIFFE path and the default DNS SAN.
    pub name: DnsName,
    /// DNS SANs; `None` means just `name`, `Some(vec![])` none at all.
    pub dns: Option<Vec<DnsName>>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// SPIFFE ID; `None` means `spiffe://<trust-domain>/<name>`.
    pub spiffe: Option<SpiffeId>,
    /// How long the leaf lives (before backdating); renewed at 2/3 of it.
    pub ttl: Span,
    /// Key source.
    pub key: KeySource,
}

impl LeafRequest {
    /// The DNS SANs the leaf will carry.
    pub fn dns_names(&self) -> Vec<DnsName> {
        self.dns.clone().unwrap_or_else(|| vec![self.name.clone()])
    }
}

/// An issued certificate, ready for a cert dir.
#[derive(Clone, Debug)]
pub struct IssuedLeaf {
    /// The PEM set (chain, key unless a CSR was signed, trust bundle).
    pub pem: PemSet,
    /// Facts about the leaf.
    pub info: CertInfo,
}

/// The names a leaf will carry, after defaults and checks.
struct Identity {
    spiffe: SpiffeId,
    dns: Vec<DnsName>,
    ips: Vec<IpAddr>,
}

impl Identity {
    fn allowed(&self) -> String {
        let mut all = vec![self.spiffe.to_string()];
        all.extend(self.dns.iter().map(ToString::to_string));
        all.extend(self.ips.iter().map(ToString::to_string));
        all.join(", ")
    }

    fn permits(&self, san: &SanType) -> Option<String> {
        let refused = |s: String| Some(s);
        match san {
            SanType::DnsName(d) => {
                let ok = d.as_str().parse::<DnsName>().is_ok_and(|n| self.dns.contains(&n));
                if ok {
                    None
                } else {
                    refused(d.as_str().to_owned())
                }
            }
            SanType::IpAddress(ip) => (!self.ips.contains(ip)).then(|| ip.to_string()),
            SanType::URI(u) => (u.as_str() != self.spiffe.as_str()).then(|| u.as_str().to_owned()),
            other => refused(format!("{other:?}")),
        }
    }
}

impl CaState {
    fn identity(&self, req: &LeafRequest) -> Result<Identity, CaError> {
        let spiffe = match &req.spiffe {
            Some(id) => id.clone(),
            None => self.trust_domain().id(req.name.as_str())?,
        };
        let dns = req.dns_names();
        let mut seen = BTreeSet::new();
        for name in dns.iter().map(ToString::to_string).chain(req.ips.iter().map(ToString::to_string)) {
            if !seen.insert(name.clone()) {
                return Err(CaError::DuplicateName(name));
            }
        }
        if !self.permitted_dns().is_empty() {
            for name in &dns {
                if !self.permitted_dns().iter().any(|p| name.is_within(p)) {
                    let permitted = self.permitted_dns().iter().map(ToString::to_string).collect::<Vec<_>>();
                    return Err(CaError::NotPermitted { name: name.to_string(), permitted: permitted.join(", ") });
                }
            }
        }
        Ok(Identity { spiffe, dns, ips: req.ips.clone() })
    }

    /// Issues one leaf certificate signed by the intermediate.
    pub fn issue(&self, req: &LeafRequest) -> Result<IssuedLeaf, CaError> {
        let identity = self.identity(req)?;
        let (now, not_after) = self.validity(req.ttl)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.name.as_str());
        params.distinguished_name = dn;
        leaf_validity(&mut params, now, not_after, req.ttl);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names.push(SanType::URI(identity.spiffe.as_str().try_into()?));
        for name in &identity.dns {
            params.subject_alt_names.push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.subject_alt_names.extend(identity.ips.iter().copied().map(SanType::IpAddress));

        let (cert, key_pem) = match &req.key {
            KeySource::Generate(kind) => {
                let key = kind.generate()?;
                params.key_usages = key_usages(is_rsa(key.algorithm()));
                (params.signed_by(&key, self.issuer())?, Some(key.serialize_pem()))
            }
            KeySource::Csr { origin, pem } => {
                let csr = parse_csr(origin, pem)?;
                for san in &csr.params.subject_alt_names {
                    if let Some(name) = identity.permits(san) {
                        return Err(CaError::CsrNameNotAllowed {
                            path: origin.clone(),
                            name,
                            identity: req.name.to_string(),
                            allowed: identity.allowed(),
                        });
                    }
                }
                params.key_usages = key_usages(is_rsa(csr.public_key.algorithm()));
                (params.signed_by(&csr.public_key, self.issuer())?, None)
            }
        };
        self.issued(&cert, key_pem)
    }

    /// The PEM set of a signed leaf: the chain with the intermediate, and the bundle.
    fn issued(&self, cert: &rcgen::Certificate, key: Option<String>) -> Result<IssuedLeaf, CaError> {
        let info = CertInfo::from_der(cert.der()).map_err(|e| CaError::Rcgen(rcgen::Error::X509(e.to_string())))?;
        Ok(IssuedLeaf {
            pem: PemSet {
                cert: format!("{}{}", cert.pem(), self.intermediate_pem()),
                key,
                ca: self.bundle_pem().to_owned(),
                crl: None,
            },
            info,
        })
    }
}

impl CaState {
    /// notBefore (now) and notAfter of a leaf living `ttl`, refused past the intermediate's notAfter.
    fn validity(&self, ttl: Span) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
        let now = OffsetDateTime::now_utc();
        let not_after = now + ttl.get();
        let int_not_after = self.intermediate().not_after;
        if now >= int_not_after {
            return Err(CaError::IntermediateExpired(rfc3339(int_not_after)));
        }
        if not_after > int_not_after {
            let max_minutes = (int_not_after - now).whole_minutes().max(1) as u64;
            let max =
                Span::new(std::time::Duration::from_secs(max_minutes * 60)).map(|s| s.to_string()).unwrap_or_default();
            return Err(CaError::TtlTooLong {
                ttl: ttl.to_string(),
                intermediate_not_after: rfc3339(int_not_after),
                max,
            });
        }
        Ok((now, not_after))
    }

    /// Issues a TLS server certificate for names an ACME client proved: no
    /// SPIFFE ID and serverAuth only, so that it never passes as a mesh
    /// identity. The names must lie within the CA's name constraints.
    pub fn issue_tls_server(&self, req: &TlsServerRequest<'_>) -> Result<IssuedLeaf, CaError> {
        let (now, not_after) = self.validity(req.ttl)?;
        for name in req.dns {
            let permitted = self.permitted_dns();
            if !permitted.is_empty() && !name.parse::<DnsName>().is_ok_and(|n| permitted.iter().any(|p| n.is_within(p)))
            {
                let permitted = permitted.iter().map(ToString::to_string).collect::<Vec<_>>();
                return Err(CaError::NotPermitted { name: name.clone(), permitted: permitted.join(", ") });
            }
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // The CN, as Let's Encrypt's classic profile writes it: the first name, when it fits.
        if let Some(first) = req.dns.first().filter(|n| n.len() <= 64) {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        leaf_validity(&mut params, now, not_after, req.ttl);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for name in req.dns {
            params.subject_alt_names.push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.subject_alt_names.extend(req.ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = key_usages(is_rsa(req.csr.public_key.algorithm()));
        self.issued(&params.signed_by(&req.csr.public_key, self.issuer())?, None)
    }
}

/// A TLS server certificate for a CSR's key (the ACME server's finalize).
pub struct TlsServerRequest<'a> {
    /// The CSR, its signature checked.
    pub csr: &'a CertificateSigningRequestParams,
    /// DNS SANs, the first one also the CN.
    pub dns: &'a [String],
    /// IP SANs.
    pub ips: &'a [IpAddr],
    /// Lifetime.
    pub ttl: Span,
}

/// Serial, validity (backdated for clock skew), and the leaf constraints.
fn leaf_validity(params: &mut CertificateParams, now: OffsetDateTime, not_after: OffsetDateTime, ttl: Span) {
    params.not_before = now - backdate_for(ttl.get());
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
}

fn key_usages(rsa: bool) -> Vec<KeyUsagePurpose> {
    let mut usages = vec![KeyUsagePurpose::DigitalSignature];
    if rsa {
        usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    usages
}

fn parse_csr(origin: &std::path::Path, pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    let err = |what: &str| CaError::Csr { path: origin.to_owned(), what: what.to_owned() };
    CertificateSigningRequestParams::from_pem(pem).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            err("signature does not verify; the CSR was altered or not signed by its own key")
        }
        rcgen::Error::UnsupportedExtension => err("requests an extension Lanyard does not sign; request only SANs"),
        rcgen::Error::UnsupportedSignatureAlgorithm => err("uses an unsupported signature algorithm"),
        _ => err("not a PEM certificate signing request (expected -----BEGIN CERTIFICATE REQUEST-----)"),
    })
}
