//! The CA's state directory: root and intermediate certificates and keys,
//! plus `ca.json` with the trust domain and name constraints.
//!
//! ```text
//! STATE/ca.json               trust domain, permitted DNS suffixes, root_offline
//! STATE/root.pem              root certificate (ECDSA P-384, 10 years)
//! STATE/root-key.pem          root key, 0600; absent with --offline-root
//! STATE/intermediate.pem      intermediate certificate (ECDSA P-256, 1 year, pathLen 0)
//! STATE/intermediate-key.pem  intermediate key, 0600
//! STATE/intermediate-previous.pem, intermediate-previous-key.pem
//!                             the intermediate before the last rollover, kept
//!                             (to sign its CRL) until it expires
//! STATE/root-rotation.json    a root rotation under way (see `rotation`), with
//!   root-next.pem, root-next-key.pem, intermediate-next.pem, intermediate-next-key.pem
//!                             the new root and intermediate, from `start` to `finish`
//!   root-previous.pem         the old root, kept in the bundle from `finish`
//!                             until its last leaf is gone
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
pub(crate) const ROOT_CERT: &str = "root.pem";
pub(crate) const ROOT_KEY: &str = "root-key.pem";
pub(crate) const INTERMEDIATE_CERT: &str = "intermediate.pem";
pub(crate) const INTERMEDIATE_KEY: &str = "intermediate-key.pem";
pub(crate) const PREVIOUS_CERT: &str = "intermediate-previous.pem";
pub(crate) const PREVIOUS_KEY: &str = "intermediate-previous-key.pem";
pub(crate) const ROOT_NEXT_CERT: &str = "root-next.pem";
pub(crate) const ROOT_NEXT_KEY: &str = "root-next-key.pem";
pub(crate) const INTERMEDIATE_NEXT_CERT: &str = "intermediate-next.pem";
pub(crate) const INTERMEDIATE_NEXT_KEY: &str = "intermediate-next-key.pem";
pub(crate) const ROOT_PREVIOUS_CERT: &str = "root-previous.pem";
/// The file that marks a root rotation under way.
pub const ROTATION_FILE: &str = "root-rotation.json";
/// What `ca serve` last learnt from the known sidecars during a rotation.
pub const REPORTS_FILE: &str = "root-rotation-sidecars.json";
/// Every file whose change means the CA must be reloaded.
const DEFINING_FILES: [&str; 5] = [ROOT_CERT, INTERMEDIATE_CERT, ROOT_NEXT_CERT, ROOT_PREVIOUS_CERT, ROTATION_FILE];

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
    /// `root`, `intermediate`, `previous-intermediate` (its leaves may
    /// live), or during a root rotation `next-root`, `next-intermediate`
    /// and `previous-root`.
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

/// The identity name of the admin certificate `ca init` creates.
pub const ADMIN_NAME: &str = "lanyard-admin";

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
    /// Lifetime of the intermediate (and of each one rolled after it).
    pub intermediate_lifetime: Duration,
}

impl InitOptions {
    /// A new CA for `trust_domain` with the defaults: no name constraints,
    /// the root key online, the default intermediate lifetime.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            permit_dns: Vec::new(),
            offline_root: false,
            force: false,
            intermediate_lifetime: INTERMEDIATE_LIFETIME,
        }
    }
}

/// A loaded, usable CA.
pub struct CaState {
    dir: PathBuf,
    meta: CaMeta,
    trust_domain: TrustDomain,
    permitted_dns: Vec<DnsName>,
    root_pem: String,
    root: CertInfo,
    intermediate_pem: String,
    intermediate: CertInfo,
    issuer: Issuer<'static, KeyPair>,
    previous: Option<Previous>,
    rotation: Option<LoadedRotation>,
    bundle_pem: String,
    disk_signature: Vec<u8>,
}

/// Phase of a root rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationPhase {
    /// The new root is in every bundle; issuance stays on the old one.
    Started,
    /// Issuance is on the new root; the old root stays in the bundles
    /// until its last leaf has expired or been replaced.
    Finished,
}

/// `root-rotation.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RootRotation {
    /// Where it stands.
    pub phase: RotationPhase,
    /// `start`, unix seconds.
    pub started_at: i64,
    /// `finish`, unix seconds.
    #[serde(default)]
    pub finished_at: Option<i64>,
    /// SHA-256 of the root being replaced.
    pub old_root: String,
    /// SHA-256 of the new root.
    pub new_root: String,
    /// Over how many seconds `finish` spreads the re-issue of every identity.
    #[serde(default)]
    pub reissue_window_secs: u64,
}

/// A rotation with the certificates it names.
struct LoadedRotation {
    doc: RootRotation,
    /// Started: the new root and intermediate. Finished: the old root.
    other_root: CertInfo,
    next_intermediate: Option<CertInfo>,
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

        let (int_cert, int_key) =
            new_intermediate(&root_issuer, td, &opts.permit_dns, now, opts.intermediate_lifetime)?;

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

        let rotation_path = dir.join(ROTATION_FILE);
        let rotation: Option<RootRotation> = match fs::read_to_string(&rotation_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| corrupt(&rotation_path, e.to_string()))?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(CaError::ReadState { path: rotation_path, source }),
        };
        if rotation.as_ref().is_some_and(|r| r.phase == RotationPhase::Finished) && dir.join(ROOT_NEXT_CERT).exists() {
            // `finish` stopped halfway: complete the switch (unless the
            // process running `finish` completes it first).
            match switch_to_next(dir) {
                Err(_) if !dir.join(ROOT_NEXT_CERT).exists() => {}
                other => other?,
            }
        }
        let root_path = dir.join(ROOT_CERT);
        let root_pem = read_state(&root_path)?;
        let root = single_cert(&root_path, &root_pem)?;
        let (intermediate_pem, intermediate, issuer) =
            load_intermediate(&dir.join(INTERMEDIATE_CERT), &dir.join(INTERMEDIATE_KEY))?;
        let previous = if dir.join(PREVIOUS_CERT).exists() {
            let (pem, info, issuer) = load_intermediate(&dir.join(PREVIOUS_CERT), &dir.join(PREVIOUS_KEY))?;
            Some(Previous { pem, info, issuer })
        } else {
            None
        };
        let mut bundle_pem = root_pem.clone();
        let rotation = match rotation {
            None => None,
            Some(doc) => {
                let (other, next_intermediate) = match doc.phase {
                    RotationPhase::Started => {
                        let (_, info, _) =
                            load_intermediate(&dir.join(INTERMEDIATE_NEXT_CERT), &dir.join(INTERMEDIATE_NEXT_KEY))?;
                        (dir.join(ROOT_NEXT_CERT), Some(info))
                    }
                    RotationPhase::Finished => (dir.join(ROOT_PREVIOUS_CERT), None),
                };
                let other_pem = read_state(&other)?;
                let other_root = single_cert(&other, &other_pem)?;
                bundle_pem.push_str(&other_pem);
                Some(LoadedRotation { doc, other_root, next_intermediate })
            }
        };
        Ok(Self {
            disk_signature: disk_signature(dir),
            bundle_pem,
            rotation,
            previous,
            dir: dir.to_owned(),
            meta,
            trust_domain,
            permitted_dns,
            root_pem,
            root,
            intermediate_pem,
            intermediate,
            issuer,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The SPIFFE trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// DNS suffixes leaves must fall under; empty means any.
    pub fn permitted_dns(&self) -> &[DnsName] {
        &self.permitted_dns
    }

    /// The trust bundle handed to every cert dir (`ca.pem`): the root, and
    /// during a root rotation the other root too.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The root certificate PEM (issuance chains to it).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root rotation under way.
    pub fn rotation(&self) -> Option<&RootRotation> {
        self.rotation.as_ref().map(|r| &r.doc)
    }

    /// Whether the root key is kept in the state directory.
    pub fn root_key_online(&self) -> bool {
        self.dir.join(ROOT_KEY).exists()
    }

    /// The intermediate certificate PEM (appended to every leaf chain).
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// Facts about the intermediate.
    pub fn intermediate(&self) -> &CertInfo {
        &self.intermediate
    }

    /// Whether another process changed the CA on disk since this state was
    /// loaded (`ca intermediate roll`, `ca root rotate`, while `ca serve` runs).
    pub fn changed_on_disk(&self) -> bool {
        disk_signature(&self.dir) != self.disk_signature
    }

    /// Facts about the root.
    pub fn root(&self) -> &CertInfo {
        &self.root
    }

    /// The root and the intermediate with their expiry, and an alarm for
    /// each that is past [`CA_ALARM_AT`] of its life: nothing renews them
    /// yet, and once the intermediate expires no leaf can be renewed.
    pub fn expiry(&self, now: OffsetDateTime) -> Vec<CaCertExpiry> {
        let mut out = Vec::new();
        for (role, info) in [("root", &self.root), ("intermediate", &self.intermediate)] {
            let alarm = (now >= info.life_point(CA_ALARM_AT)).then(|| {
                format!(
                    "the {role} CA expires at {} ({} left){}",
                    lanyard_sidecar::certinfo::rfc3339(info.not_after),
                    crate::inspect::human_seconds((info.not_after - now).whole_seconds()),
                    match (role, self.dir.join(ROOT_KEY).exists()) {
                        ("intermediate", true) => {
                            ": past 2/3 of its life and not rolled over yet; `ca serve` replaces it at once when it runs (see its log)"
                        }
                        ("intermediate", false) => {
                            ": after that no leaf can be renewed, and the root key is offline, so nothing replaces it; create a new CA with `ca init --force` and re-issue"
                        }
                        _ => ": plan a root rotation",
                    }
                )
            });
            out.push(CaCertExpiry { role, not_after: info.not_after, alarm });
        }
        let mut quiet = |role, info: &CertInfo| out.push(CaCertExpiry { role, not_after: info.not_after, alarm: None });
        if let Some(p) = self.previous.as_ref().filter(|p| p.info.not_after > now) {
            quiet("previous-intermediate", &p.info);
        }
        if let Some(r) = &self.rotation {
            match r.doc.phase {
                RotationPhase::Started => quiet("next-root", &r.other_root),
                RotationPhase::Finished => quiet("previous-root", &r.other_root),
            }
            if let Some(i) = &r.next_intermediate {
                quiet("next-intermediate", i);
            }
        }
        out
    }

    /// The intermediate's subject key identifier (for CRLs).
    pub fn intermediate_key_id(&self) -> Vec<u8> {
        key_id(&self.dir, &self.intermediate_pem)
    }

    /// The signer of leaves.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The intermediate before the last rollover, while it has not expired:
    /// leaves it signed may still be in use, so its CRL is still published.
    pub fn previous(&self, now: OffsetDateTime) -> Option<(&CertInfo, &Issuer<'static, KeyPair>, Vec<u8>)> {
        let p = self.previous.as_ref().filter(|p| p.info.not_after > now)?;
        Some((&p.info, &p.issuer, key_id(&self.dir, &p.pem)))
    }

    /// When the intermediate is to be replaced: at [`CA_ALARM_AT`] of its
    /// life; `None` when the root key is offline (`ca init --offline-root`).
    pub fn rollover_at(&self) -> Option<OffsetDateTime> {
        self.dir.join(ROOT_KEY).exists().then(|| self.intermediate.life_point(CA_ALARM_AT))
    }

    /// Replaces the intermediate with a new one (new key, same name
    /// constraints and lifetime, signed by the root); the old one becomes
    /// the previous intermediate. Returns the reloaded state.
    /// With the root key offline, give it as `root_key` (PEM); it is not stored.
    pub fn roll_intermediate(&self, now: OffsetDateTime, root_key: Option<(&Path, &str)>) -> Result<Self, CaError> {
        let stored = self.dir.join(ROOT_KEY);
        let (root_key_path, root_key_pem) = match root_key {
            Some((path, pem)) => (path.to_owned(), pem.to_owned()),
            None if stored.exists() => (stored.clone(), read_state(&stored)?),
            None => return Err(CaError::RootOffline),
        };
        let corrupt = |path: &Path, what: String| CaError::CorruptState { path: path.to_owned(), what };
        let root_key = KeyPair::from_pem(&root_key_pem)
            .map_err(|e| corrupt(&root_key_path, format!("not a usable private key ({e})")))?;
        if root_key.subject_public_key_info() != self.root.spki {
            return Err(corrupt(&root_key_path, "this is not the key of the CA's root certificate".into()));
        }
        let root_issuer = Issuer::from_ca_cert_pem(&self.root_pem, root_key)
            .map_err(|e| corrupt(&self.dir.join(ROOT_CERT), format!("not a usable CA certificate ({e})")))?;
        let old = &self.intermediate;
        let lifetime = lifetime_of(old.not_after - old.not_before).min(self.root.not_after - now);
        let (cert, key) = new_intermediate(&root_issuer, &self.trust_domain, &self.permitted_dns, now, lifetime)?;
        // The current pair becomes the previous one, then the new pair is
        // written key first: each file is replaced atomically.
        let old_key = read_state(&self.dir.join(INTERMEDIATE_KEY))?;
        write_secret(&self.dir.join(PREVIOUS_KEY), &old_key)?;
        write_public(&self.dir.join(PREVIOUS_CERT), &self.intermediate_pem)?;
        write_secret(&self.dir.join(INTERMEDIATE_KEY), &key.serialize_pem())?;
        write_public(&self.dir.join(INTERMEDIATE_CERT), &cert.pem())?;
        Self::load(&self.dir)
    }
}

/// Makes the next root and intermediate the current ones. Idempotent: a
/// `finish` cut short is completed by the next load.
pub(crate) fn switch_to_next(dir: &Path) -> Result<(), CaError> {
    let next_root_key = dir.join(ROOT_NEXT_KEY);
    if next_root_key.exists() {
        write_secret(&dir.join(ROOT_KEY), &read_state(&next_root_key)?)?;
    } else {
        remove_state_file(&dir.join(ROOT_KEY))?;
    }
    write_secret(&dir.join(INTERMEDIATE_KEY), &read_state(&dir.join(INTERMEDIATE_NEXT_KEY))?)?;
    write_public(&dir.join(INTERMEDIATE_CERT), &read_state(&dir.join(INTERMEDIATE_NEXT_CERT))?)?;
    write_public(&dir.join(ROOT_CERT), &read_state(&dir.join(ROOT_NEXT_CERT))?)?;
    for name in [ROOT_NEXT_KEY, INTERMEDIATE_NEXT_KEY, INTERMEDIATE_NEXT_CERT, REPORTS_FILE, ROOT_NEXT_CERT] {
        remove_state_file(&dir.join(name))?;
    }
    Ok(())
}

/// Removes a state file; a missing one is fine.
pub(crate) fn remove_state_file(path: &Path) -> Result<(), CaError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaError::WriteState { path: path.to_owned(), source }),
    }
}

/// A digest of every file that defines the CA (a missing file counts).
fn disk_signature(dir: &Path) -> Vec<u8> {
    files_digest(dir, &DEFINING_FILES)
}

/// SHA-256 over the names and contents of `names` in `dir` (a missing file
/// counts as empty): what tells one state of the CA's files from another.
pub(crate) fn files_digest(dir: &Path, names: &[&str]) -> Vec<u8> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for name in names {
        let bytes = fs::read(dir.join(name)).unwrap_or_default();
        ctx.update(name.as_bytes());
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(&bytes);
    }
    ctx.finish().as_ref().to_vec()
}

/// The intermediate before the last rollover.
struct Previous {
    pem: String,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

/// The lifetime a CA certificate was made with, from its whole validity
/// window (lifetime plus [`backdate_for`] it).
pub(crate) fn lifetime_of(window: Duration) -> Duration {
    let tenth_at_most = BACKDATE * 11;
    if window <= tenth_at_most {
        window * (10.0 / 11.0)
    } else {
        window - BACKDATE
    }
}

/// The common name of a CA certificate made at `now`: seconds are enough
/// to tell successive ones (and their CRLs) apart; the trust domain is left
/// out where X.520's 64 characters would not hold it.
pub(crate) fn ca_name(kind: &str, td: &TrustDomain, now: OffsetDateTime) -> String {
    let since = now.replace_nanosecond(0).unwrap_or(now);
    let since = since.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let name = format!("{kind} ({td}) {since}");
    if name.len() > 64 {
        format!("{kind} {since}")
    } else {
        name
    }
}

/// A new intermediate for trust domain `td`, signed by `root`: pathLen 0,
/// `permit_dns` as name constraints, a subject naming its start so that
/// successive intermediates (and their CRLs) are told apart by name.
pub(crate) fn new_intermediate(
    root: &Issuer<'_, KeyPair>,
    td: &TrustDomain,
    permit_dns: &[DnsName],
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<(rcgen::Certificate, KeyPair), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut int = ca_params(&ca_name("Lanyard Intermediate CA", td, now), now, lifetime);
    int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int.use_authority_key_identifier_extension = true;
    if !permit_dns.is_empty() {
        int.name_constraints = Some(NameConstraints {
            permitted_subtrees: permit_dns.iter().map(|d| GeneralSubtree::DnsName(d.to_string())).collect(),
            excluded_subtrees: Vec::new(),
        });
    }
    Ok((int.signed_by(&key, root)?, key))
}

/// An intermediate's certificate and key from `cert` and `key`, checked to match.
pub(crate) fn load_intermediate(
    cert: &Path,
    key: &Path,
) -> Result<(String, CertInfo, Issuer<'static, KeyPair>), CaError> {
    let corrupt = |path: &Path, what: String| CaError::CorruptState { path: path.to_owned(), what };
    let pem = read_state(cert)?;
    let info = single_cert(cert, &pem)?;
    let pair =
        KeyPair::from_pem(&read_state(key)?).map_err(|e| corrupt(key, format!("not a usable private key ({e})")))?;
    if pair.subject_public_key_info() != info.spki {
        return Err(corrupt(key, format!("the key does not match {}", cert.display())));
    }
    let issuer = Issuer::from_ca_cert_pem(&pem, pair)
        .map_err(|e| corrupt(cert, format!("not a usable CA certificate ({e})")))?;
    Ok((pem, info, issuer))
}

/// The subject key identifier of the CA certificate in `pem`.
fn key_id(dir: &Path, pem: &str) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
    let der = lanyard_sidecar::certdir::parse_certs(dir, pem.as_bytes()).unwrap_or_default();
    der.first()
        .and_then(|der| X509Certificate::from_der(der).ok())
        .and_then(|(_, cert)| {
            cert.extensions().iter().find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
        })
        .unwrap_or_default()
}

pub(crate) fn ca_params(common_name: &str, now: OffsetDateTime, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Lanyard");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = now - backdate_for(lifetime.try_into().unwrap_or_default());
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

pub(crate) fn single_cert(path: &Path, pem: &str) -> Result<CertInfo, CaError> {
    let certs = lanyard_sidecar::certdir::parse_certs(path, pem.as_bytes())?;
    CertInfo::from_der(&certs[0]).map_err(|e| CaError::CorruptState { path: path.to_owned(), what: e.to_string() })
}

pub(crate) fn read_state(path: &Path) -> Result<String, CaError> {
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

pub(crate) fn write_secret(path: &Path, text: &str) -> Result<(), CaError> {
    write_file(path, text, 0o600)
}

pub(crate) fn write_public(path: &Path, text: &str) -> Result<(), CaError> {
    write_file(path, text, 0o644)
}
