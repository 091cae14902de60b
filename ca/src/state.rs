//! The CA's state directory: root and intermediate certificates and keys,
//! plus `ca.json` with the trust domain and name constraints.
//!
//! ```text
//! STATE/ca.json               trust domain, permitted DNS suffixes, root_offline
//! STATE/root.pem              root certificate (ECDSA P-384, 10 years)
//! STATE/root-key.pem          root key, 0600; absent with --offline-root
//! STATE/intermediate.pem      intermediate certificate (ECDSA P-256, 1 year, pathLen 0)
//! STATE/intermediate-key.pem  intermediate key, 0600
//! ```

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lanyard_sidecar::certinfo::CertInfo;
use lanyard_sidecar::identity::{DnsName, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, GeneralSubtree, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, NameConstraints, PublicKeyData, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::CaError;

/// The file that marks a state directory as holding a CA.
pub const META_FILE: &str = "ca.json";
const ROOT_CERT: &str = "root.pem";
const ROOT_KEY: &str = "root-key.pem";
const INTERMEDIATE_CERT: &str = "intermediate.pem";
const INTERMEDIATE_KEY: &str = "intermediate-key.pem";

/// Lifetime of the root CA.
pub const ROOT_LIFETIME: Duration = Duration::days(3650);
/// Lifetime of the intermediate CA.
pub const INTERMEDIATE_LIFETIME: Duration = Duration::days(365);
/// From this fraction of a CA certificate's life on, the CA raises an alarm.
pub const CA_ALARM_AT: f64 = 2.0 / 3.0;

/// A CA certificate's expiry, as `ca status`, `ca check`, `/health` and
/// `/metrics` report it.
#[derive(Clone, Debug)]
pub struct CaCertExpiry {
    /// `root` or `intermediate`.
    pub role: &'static str,
    /// Its notAfter.
    pub not_after: OffsetDateTime,
    /// Why an operator must act, from [`CA_ALARM_AT`] of its life on.
    pub alarm: Option<String>,
}

/// How far certificates are backdated to tolerate clock skew.
pub const BACKDATE: Duration = Duration::minutes(5);

/// The backdating of a leaf living `ttl`: [`BACKDATE`], but at most a tenth
/// of the lifetime, so that short-lived certificates keep their renewal
/// point (2/3 of the whole validity window) well after issuance.
pub fn backdate_for(ttl: std::time::Duration) -> Duration {
    BACKDATE.min(Duration::try_from(ttl / 10).unwrap_or(BACKDATE))
}
/// The trust domain used when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "lanyard.internal";

/// `ca.json`: what the CA was created with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaMeta {
    /// SPIFFE trust domain of every identity this CA issues.
    pub trust_domain: String,
    /// DNS suffixes the intermediate is constrained to; empty means any.
    #[serde(default)]
    pub permitted_dns: Vec<String>,
    /// Whether the root key is kept outside the state directory.
    #[serde(default)]
    pub root_offline: bool,
}

/// Options of `ca init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// SPIFFE trust domain.
    pub trust_domain: TrustDomain,
    /// RFC 5280 permitted DNS subtrees for the intermediate.
    pub permit_dns: Vec<DnsName>,
    /// Keep the root key out of the state directory and hand it back instead.
    pub offline_root: bool,
    /// Replace an existing CA.
    pub force: bool,
}

/// A loaded, usable CA.
pub struct CaState {
    dir: PathBuf,
    meta: CaMeta,
    trust_domain: TrustDomain,
    permitted_dns: Vec<DnsName>,
    root_pem: String,
    intermediate_pem: String,
    intermediate: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaState").field("dir", &self.dir).field("meta", &self.meta).finish_non_exhaustive()
    }
}

/// A fresh random positive serial of 127 bits.
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG is available");
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl CaState {
    /// Creates a new root and intermediate in `dir`. Returns the state and,
    /// with `offline_root`, the root key PEM that was not stored.
    pub fn init(dir: &Path, opts: &InitOptions) -> Result<(Self, Option<String>), CaError> {
        if dir.join(META_FILE).exists() && !opts.force {
            return Err(CaError::AlreadyExists(dir.to_owned()));
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::WriteState { path: dir.to_owned(), source })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| CaError::WriteState { path: dir.to_owned(), source })?;

        let now = OffsetDateTime::now_utc();
        let td = &opts.trust_domain;

        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
        let mut root = ca_params(&format!("Lanyard Root CA ({td})"), now, ROOT_LIFETIME);
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, root_key);

        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut int = ca_params(&format!("Lanyard Intermediate CA ({td})"), now, INTERMEDIATE_LIFETIME);
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.use_authority_key_identifier_extension = true;
        if !opts.permit_dns.is_empty() {
            int.name_constraints = Some(NameConstraints {
                permitted_subtrees: opts.permit_dns.iter().map(|d| GeneralSubtree::DnsName(d.to_string())).collect(),
                excluded_subtrees: Vec::new(),
            });
        }
        let int_cert = int.signed_by(&int_key, &root_issuer)?;

        let meta = CaMeta {
            trust_domain: td.to_string(),
            permitted_dns: opts.permit_dns.iter().map(ToString::to_string).collect(),
            root_offline: opts.offline_root,
        };
        let root_key_pem = root_issuer.key().serialize_pem();
        write_secret(&dir.join(INTERMEDIATE_KEY), &int_key.serialize_pem())?;
        write_public(&dir.join(INTERMEDIATE_CERT), &int_cert.pem())?;
        write_public(&dir.join(ROOT_CERT), &root_cert.pem())?;
        let offline_key = if opts.offline_root {
            match fs::remove_file(dir.join(ROOT_KEY)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CaError::WriteState { path: dir.join(ROOT_KEY), source }),
            }
            Some(root_key_pem)
        } else {
            write_secret(&dir.join(ROOT_KEY), &root_key_pem)?;
            None
        };
        let meta_json = serde_json::to_string_pretty(&meta).expect("CaMeta serializes");
        write_public(&dir.join(META_FILE), &(meta_json + "\n"))?;
        Ok((Self::load(dir)?, offline_key))
    }

    /// Loads the CA in `dir`, checking that every file is present and sound.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let meta_path = dir.join(META_FILE);
        match fs::metadata(&meta_path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CaError::NoCa(dir.to_owned())),
            Err(source) => return Err(CaError::ReadState { path: meta_path, source }),
        }
        let meta: CaMeta = serde_json::from_str(&read_state(&meta_path)?)
            .map_err(|e| CaError::CorruptState { path: meta_path.clone(), what: e.to_string() })?;
        let corrupt = |path: &Path, what: String| CaError::CorruptState { path: path.to_owned(), what };
        let trust_domain = meta
            .trust_domain
            .parse()
            .map_err(|e: lanyard_sidecar::identity::NameError| corrupt(&meta_path, e.to_string()))?;
        let permitted_dns = meta
            .permitted_dns
            .iter()
            .map(|d| d.parse().map_err(|e: lanyard_sidecar::identity::NameError| corrupt(&meta_path, e.to_string())))
            .collect::<Result<_, _>>()?;

        let root_path = dir.join(ROOT_CERT);
        let root_pem = read_state(&root_path)?;
        single_cert(&root_path, &root_pem)?;
        let int_path = dir.join(INTERMEDIATE_CERT);
        let intermediate_pem = read_state(&int_path)?;
        let intermediate = single_cert(&int_path, &intermediate_pem)?;
        let key_path = dir.join(INTERMEDIATE_KEY);
        let key = KeyPair::from_pem(&read_state(&key_path)?)
            .map_err(|e| corrupt(&key_path, format!("not a usable private key ({e})")))?;
        if key.subject_public_key_info() != intermediate.spki {
            return Err(corrupt(&key_path, format!("the key does not match {}", int_path.display())));
        }
        let issuer = Issuer::from_ca_cert_pem(&intermediate_pem, key)
            .map_err(|e| corrupt(&int_path, format!("not a usable CA certificate ({e})")))?;
        Ok(Self {
            dir: dir.to_owned(),
            meta,
            trust_domain,
            permitted_dns,
            root_pem,
            intermediate_pem,
            intermediate,
            issuer,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the CA was created with.
    pub fn meta(&self) -> &CaMeta {
        &self.meta
    }

    /// The SPIFFE trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// DNS suffixes leaves must fall under; empty means any.
    pub fn permitted_dns(&self) -> &[DnsName] {
        &self.permitted_dns
    }

    /// The trust bundle handed to every cert dir (`ca.pem`).
    pub fn bundle_pem(&self) -> &str {
        &self.root_pem
    }

    /// The intermediate certificate PEM (appended to every leaf chain).
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// Facts about the intermediate.
    pub fn intermediate(&self) -> &CertInfo {
        &self.intermediate
    }

    /// Facts about the root.
    pub fn root(&self) -> Result<CertInfo, CaError> {
        single_cert(&self.dir.join(ROOT_CERT), &self.root_pem)
    }

    /// The root and the intermediate with their expiry, and an alarm for
    /// each that is past [`CA_ALARM_AT`] of its life: nothing renews them
    /// yet, and once the intermediate expires no leaf can be renewed.
    pub fn expiry(&self, now: OffsetDateTime) -> Result<Vec<CaCertExpiry>, CaError> {
        let mut out = Vec::new();
        for (role, info) in [("root", self.root()?), ("intermediate", self.intermediate.clone())] {
            let alarm = (now >= info.life_point(CA_ALARM_AT)).then(|| {
                format!(
                    "the {role} CA expires at {} ({} left){}",
                    lanyard_sidecar::certinfo::rfc3339(info.not_after),
                    crate::inspect::human_seconds((info.not_after - now).whole_seconds()),
                    if role == "intermediate" {
                        ": after that no leaf can be renewed; create a new CA with `ca init --force` and re-issue, or restore one with a longer intermediate"
                    } else {
                        ": plan a root rotation"
                    }
                )
            });
            out.push(CaCertExpiry { role, not_after: info.not_after, alarm });
        }
        Ok(out)
    }

    /// The intermediate's subject key identifier (for CRLs).
    pub fn intermediate_key_id(&self) -> Vec<u8> {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let pem =
            lanyard_sidecar::certdir::parse_certs(&self.dir, self.intermediate_pem.as_bytes()).unwrap_or_default();
        pem.first()
            .and_then(|der| X509Certificate::from_der(der).ok())
            .and_then(|(_, cert)| {
                cert.extensions().iter().find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                    _ => None,
                })
            })
            .unwrap_or_default()
    }

    /// The signer of leaves.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

fn ca_params(common_name: &str, now: OffsetDateTime, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Lanyard");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn single_cert(path: &Path, pem: &str) -> Result<CertInfo, CaError> {
    let certs = lanyard_sidecar::certdir::parse_certs(path, pem.as_bytes())?;
    CertInfo::from_der(&certs[0]).map_err(|e| CaError::CorruptState { path: path.to_owned(), what: e.to_string() })
}

fn read_state(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CaError::CorruptState { path: path.to_owned(), what: "file is missing".into() },
        _ => CaError::ReadState { path: path.to_owned(), source },
    })
}

/// Writes `text` to `path` with `mode`, atomically (temp file + rename + fsync).
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let werr = |source| CaError::WriteState { path: path.to_owned(), source };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(werr)?;
    f.write_all(text.as_bytes()).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    fs::rename(&tmp, path).map_err(werr)
}

fn write_secret(path: &Path, text: &str) -> Result<(), CaError> {
    write_file(path, text, 0o600)
}

fn write_public(path: &Path, text: &str) -> Result<(), CaError> {
    write_file(path, text, 0o644)
}
