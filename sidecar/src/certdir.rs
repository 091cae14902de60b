//! The cert-dir contract, the one place where certificate sets are written
//! and read.
//!
//! ```text
//! DIR/cert.pem   leaf first, then intermediates
//! DIR/key.pem    PKCS#8, mode 0600 (absent when the key lives elsewhere)
//! DIR/ca.pem     trust bundle: one or more roots
//! DIR/crl.pem    optional certificate revocation list
//! ```
//!
//! Writers put each generation in a fresh hidden sibling directory and swap
//! the `..data` symlink to it with one `rename`, as Kubernetes' AtomicWriter
//! does. The visible names are symlinks through `..data`. Readers resolve
//! `..data` once and read every file from that one generation, so they never
//! see a torn pair.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use time::OffsetDateTime;

use crate::certinfo::CertInfo;

/// File name of the certificate chain.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the private key.
pub const KEY_FILE: &str = "key.pem";
/// File name of the trust bundle.
pub const CA_FILE: &str = "ca.pem";
/// File name of the optional CRL.
pub const CRL_FILE: &str = "crl.pem";
/// The symlink that names the current generation.
const DATA_LINK: &str = "..data";

/// Whether `path` is a cert dir's `..data` link, whose swap is the last
/// step of a write: after it, the new generation is complete.
pub fn is_generation_swap(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == DATA_LINK)
}
/// Every file a generation may hold.
const ALL_FILES: [&str; 4] = [CERT_FILE, KEY_FILE, CA_FILE, CRL_FILE];
/// Generations kept besides the current one, for readers still inside one.
const KEEP_OLD_GENERATIONS: usize = 1;

/// What went wrong with a cert dir.
#[derive(Debug, thiserror::Error)]
pub enum CertDirError {
    /// A file of the set is missing.
    #[error("{path}: missing; the cert dir must hold cert.pem, key.pem and ca.pem")]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The unreadable file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The directory could not be written.
    #[error("cannot write cert dir {path}: {source}; check that it exists and is writable")]
    Write {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The private key does not belong to the leaf certificate.
    #[error("{key}: private key does not match the leaf certificate in {cert}; re-issue the pair")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The chain does not verify against the trust bundle.
    #[error("{cert}: chain does not verify against {ca}: {reason}")]
    Untrusted {
        /// The certificate file.
        cert: PathBuf,
        /// The trust bundle.
        ca: PathBuf,
        /// The verifier's reason.
        reason: String,
    },
    /// The leaf certificate has expired.
    #[error("{cert}: leaf certificate expired at {not_after}; re-issue it")]
    Expired {
        /// The certificate file.
        cert: PathBuf,
        /// Its notAfter.
        not_after: OffsetDateTime,
    },
    /// The leaf certificate is not valid yet.
    #[error("{cert}: leaf certificate is not valid before {not_before}; check the clocks")]
    NotYetValid {
        /// The certificate file.
        cert: PathBuf,
        /// Its notBefore.
        not_before: OffsetDateTime,
    },
}

/// The PEM texts of one generation, as a writer hands them over.
#[derive(Clone, Debug, Default)]
pub struct PemSet {
    /// Leaf first, then intermediates.
    pub cert: String,
    /// PKCS#8 private key; `None` when the key lives with the requester.
    pub key: Option<String>,
    /// Trust bundle.
    pub ca: String,
    /// Optional CRL.
    pub crl: Option<String>,
}

impl PemSet {
    fn files(&self) -> impl Iterator<Item = (&'static str, &str, u32)> {
        [
            (CERT_FILE, Some(self.cert.as_str()), 0o644),
            (KEY_FILE, self.key.as_deref(), 0o600),
            (CA_FILE, Some(self.ca.as_str()), 0o644),
            (CRL_FILE, self.crl.as_deref(), 0o644),
        ]
        .into_iter()
        .filter_map(|(name, text, mode)| text.map(|t| (name, t, mode)))
    }
}

/// A directory that follows the cert-dir contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertDir(PathBuf);

impl CertDir {
    /// Names a cert dir; nothing is read or created yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self(path.into())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Path of one of the contract's files, as readers outside Lanyard see it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Atomically replaces the whole set with `set`.
    ///
    /// Writes a new generation directory, fsyncs it, swaps `..data` with one
    /// rename, then removes generations older than the previous one.
    pub fn write(&self, set: &PemSet) -> Result<(), CertDirError> {
        let dir = &self.0;
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| CertDirError::Write { path, source }
        };
        DirBuilder::new().recursive(true).mode(0o755).create(dir).map_err(werr(dir))?;

        let gen_name = unique_name("..gen");
        let gen_dir = dir.join(&gen_name);
        DirBuilder::new().mode(0o755).create(&gen_dir).map_err(werr(&gen_dir))?;
        let result = (|| {
            for (name, text, mode) in set.files() {
                let path = gen_dir.join(name);
                let mut f =
                    OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(werr(&path))?;
                f.write_all(text.as_bytes()).map_err(werr(&path))?;
                f.sync_all().map_err(werr(&path))?;
            }
            File::open(&gen_dir).and_then(|d| d.sync_all()).map_err(werr(&gen_dir))?;
            replace_symlink(dir, DATA_LINK, Path::new(&gen_name)).map_err(werr(dir))
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&gen_dir);
            return Err(e);
        }

        for name in ALL_FILES {
            let visible = dir.join(name);
            let target = Path::new(DATA_LINK).join(name);
            if set.files().any(|(n, _, _)| n == name) {
                if fs::read_link(&visible).ok().as_deref() != Some(target.as_path()) {
                    replace_symlink(dir, name, &target).map_err(werr(&visible))?;
                }
            } else if fs::symlink_metadata(&visible).is_ok() {
                fs::remove_file(&visible).map_err(werr(&visible))?;
            }
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(werr(dir))?;
        self.remove_old_generations(&gen_name);
        Ok(())
    }

    fn remove_old_generations(&self, current: &str) {
        let Ok(entries) = fs::read_dir(&self.0) else { return };
        let mut old: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("..gen") && n != current)
            .collect();
        old.sort();
        let keep_from = old.len().saturating_sub(KEEP_OLD_GENERATIONS);
        for name in &old[..keep_from] {
            let _ = fs::remove_dir_all(self.0.join(name));
        }
    }

    /// Reads the raw bytes of the current generation, all from one generation.
    pub fn read_raw(&self) -> Result<RawSet, CertDirError> {
        // A writer may delete a generation between resolving and reading; retry.
        let mut attempts = 0;
        loop {
            let base = match fs::read_link(self.0.join(DATA_LINK)) {
                Ok(target) => self.0.join(target),
                Err(_) => self.0.clone(),
            };
            match read_generation(&self.0, &base) {
                Err(CertDirError::Missing { .. } | CertDirError::Read { .. }) if attempts < 3 && base != self.0 => {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    /// Reads, parses and validates the current set at `now`.
    pub fn load(&self, now: OffsetDateTime) -> Result<CertSet, CertDirError> {
        self.read_raw()?.validate(now)
    }
}

fn read_generation(dir: &Path, base: &Path) -> Result<RawSet, CertDirError> {
    let read = |name: &str, required: bool| -> Result<Option<Vec<u8>>, CertDirError> {
        match fs::read(base.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CertDirError::Missing { path: dir.join(name) }),
            Err(source) => Err(CertDirError::Read { path: dir.join(name), source }),
        }
    };
    Ok(RawSet {
        dir: dir.to_owned(),
        cert: read(CERT_FILE, true)?.unwrap_or_default(),
        key: read(KEY_FILE, false)?,
        ca: read(CA_FILE, true)?.unwrap_or_default(),
        crl: read(CRL_FILE, false)?,
    })
}

fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = OffsetDateTime::now_utc();
    format!(
        "{prefix}_{:04}{:02}{:02}T{:02}{:02}{:02}.{:09}_{}_{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Points `dir/name` at `target` with one atomic rename.
fn replace_symlink(dir: &Path, name: &str, target: &Path) -> io::Result<()> {
    let tmp = dir.join(unique_name("..tmp"));
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, dir.join(name)).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// The bytes of one generation, not yet validated.
#[derive(Clone, Debug)]
pub struct RawSet {
    dir: PathBuf,
    /// `cert.pem`.
    pub cert: Vec<u8>,
    /// `key.pem`, absent when the key lives with the requester.
    pub key: Option<Vec<u8>>,
    /// `ca.pem`.
    pub ca: Vec<u8>,
    /// `crl.pem`, if present.
    pub crl: Option<Vec<u8>>,
}

/// A validated certificate set: the key matches the leaf, the chain verifies
/// against the bundle, and the leaf is inside its validity window.
#[derive(Clone, Debug)]
pub struct CertSet {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Trust anchors from `ca.pem`.
    pub roots: Vec<CertificateDer<'static>>,
    /// DER CRLs from `crl.pem`.
    pub crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    /// Facts about the leaf.
    pub leaf: CertInfo,
    /// The intermediates of the leaf's path to `ca.pem` when that path
    /// also verifies for client authentication under a root without name
    /// constraints: peers issued by them can be verified from them.
    pub client_path: Vec<VerifiedIntermediate>,
}

/// An intermediate verified against the set's trust bundle, and its
/// validity, which is checked again at each use.
#[derive(Clone, Debug)]
pub struct VerifiedIntermediate {
    /// Its DER.
    pub der: CertificateDer<'static>,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
}

impl VerifiedIntermediate {
    /// Whether it is inside its validity window at `unix` seconds.
    pub fn valid_at(&self, unix: i64) -> bool {
        (self.not_before..=self.not_after).contains(&unix)
    }
}

impl RawSet {
    /// The set `pem` would be once written to `dir` (to validate it first).
    pub fn from_pem(dir: &Path, pem: &PemSet) -> Self {
        Self {
            dir: dir.to_owned(),
            cert: pem.cert.as_bytes().to_vec(),
            key: pem.key.as_ref().map(|k| k.as_bytes().to_vec()),
            ca: pem.ca.as_bytes().to_vec(),
            crl: pem.crl.as_ref().map(|c| c.as_bytes().to_vec()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Parses and validates the set at `now`.
    pub fn validate(&self, now: OffsetDateTime) -> Result<CertSet, CertDirError> {
        let chain = parse_certs(&self.path(CERT_FILE), &self.cert)?;
        let roots = parse_certs(&self.path(CA_FILE), &self.ca)?;
        let key_pem = self.key.as_deref().ok_or_else(|| CertDirError::Missing { path: self.path(KEY_FILE) })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertDirError::Pem {
            path: self.path(KEY_FILE),
            what: format!("no usable private key ({e}); expected a PKCS#8 PEM key"),
        })?;
        let crls = match &self.crl {
            Some(bytes) => parse_crls(&self.path(CRL_FILE), bytes)?,
            None => Vec::new(),
        };
        let leaf = CertInfo::from_der(&chain[0])
            .map_err(|e| CertDirError::Pem { path: self.path(CERT_FILE), what: e.to_string() })?;
        if !key_matches(&key, &leaf) {
            return Err(CertDirError::KeyMismatch { key: self.path(KEY_FILE), cert: self.path(CERT_FILE) });
        }
        if now < leaf.not_before {
            return Err(CertDirError::NotYetValid { cert: self.path(CERT_FILE), not_before: leaf.not_before });
        }
        if now > leaf.not_after {
            return Err(CertDirError::Expired { cert: self.path(CERT_FILE), not_after: leaf.not_after });
        }
        verify_chain(&chain, &roots, now).map_err(|reason| CertDirError::Untrusted {
            cert: self.path(CERT_FILE),
            ca: self.path(CA_FILE),
            reason,
        })?;
        let client_path = client_path(&chain, &roots, now);
        Ok(CertSet { chain, key: Arc::new(key), roots, crls, leaf, client_path })
    }
}

/// Parses every certificate in a PEM text; at least one is required.
pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertDirError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertDirError::Pem { path: path.to_owned(), what: format!("corrupt PEM: {e}") })?;
    if certs.is_empty() {
        return Err(CertDirError::Pem { path: path.to_owned(), what: "holds no certificate".into() });
    }
    for der in &certs {
        CertInfo::from_der(der).map_err(|e| CertDirError::Pem { path: path.to_owned(), what: e.to_string() })?;
    }
    Ok(certs)
}

fn parse_crls(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, CertDirError> {
    rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| CertDirError::Pem { path: path.to_owned(), what: format!("corrupt CRL PEM: {e}") })
}

/// Whether `key` is the private half of the leaf's public key.
pub fn key_matches(key: &PrivateKeyDer<'_>, leaf: &CertInfo) -> bool {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .ok()
        .and_then(|signing| signing.public_key().map(|spki| spki.as_ref() == leaf.spki.as_slice()))
        .unwrap_or(false)
}

/// Verifies `chain` (leaf first) up to one of `roots` at `now`, for TLS
/// server or client use. Returns the verifier's reason on failure.
pub fn verify_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: OffsetDateTime,
) -> Result<(), String> {
    let anchors: Vec<TrustAnchor<'_>> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map_err(|e| format!("bad root in bundle: {e:?}")))
        .collect::<Result<_, _>>()?;
    let leaf = chain.first().ok_or("empty chain")?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("bad leaf: {e:?}"))?;
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.all;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.unix_timestamp().max(0) as u64));
    ee.verify_for_usage(algs, &anchors, &chain[1..], time, webpki::KeyUsage::server_auth(), None, None)
        .map(|_| ())
        .map_err(|e| describe_webpki_error(&e))
}

/// The intermediates on `chain`'s path to `roots` for client
/// authentication (so their extended key usages allow it), or none when
/// there is no such path or its root carries name constraints (a shortcut
/// from the intermediate would skip them).
fn client_path(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'_>],
    now: OffsetDateTime,
) -> Vec<VerifiedIntermediate> {
    let Ok(anchors) = roots.iter().map(webpki::anchor_from_trusted_cert).collect::<Result<Vec<_>, _>>() else {
        return Vec::new();
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(&chain[0]) else { return Vec::new() };
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.all;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.unix_timestamp().max(0) as u64));
    let Ok(path) = ee.verify_for_usage(algs, &anchors, &chain[1..], time, webpki::KeyUsage::client_auth(), None, None)
    else {
        return Vec::new();
    };
    if path.anchor().name_constraints.is_some() {
        return Vec::new();
    }
    path.intermediate_certificates()
        .filter_map(|cert| {
            let der = chain[1..].iter().find(|c| c.as_ref() == cert.der().as_ref())?.clone();
            let info = CertInfo::from_der(&der).ok()?;
            Some(VerifiedIntermediate {
                der,
                not_before: info.not_before.unix_timestamp(),
                not_after: info.not_after.unix_timestamp(),
            })
        })
        .collect()
}

fn describe_webpki_error(e: &webpki::Error) -> String {
    match e {
        webpki::Error::UnknownIssuer => "issued by a CA that is not in the trust bundle".into(),
        webpki::Error::CertExpired { .. } => "a certificate in the chain has expired".into(),
        webpki::Error::CertNotValidYet { .. } => "a certificate in the chain is not valid yet".into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => "the leaf lacks the serverAuth extended key usage".into(),
        other => format!("{other:?}"),
    }
}
