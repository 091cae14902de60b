//! Guided root rotation, with no downtime:
//! 1. `start` makes a new root and intermediate; every trust bundle becomes
//!    old + new, and issuance stays on the old root.
//! 2. `status` shows which known sidecars serve the new root, from the
//!    fingerprints their `/readyz` reports (polled by `ca serve`).
//! 3. `finish` (refused while a known sidecar lacks the new root, unless
//!    forced) moves issuance to the new intermediate; `ca serve` re-issues
//!    every identity over a window, and drops the old root from the bundles
//!    once the last leaf under it has expired or been replaced.
//! 4. `abort`, before `finish`, returns to the old root alone.
//!
//! Each phase is a file in the state directory (see [`crate::state`]), so a
//! restart resumes where the rotation stood.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use lanyard_sidecar::certinfo::rfc3339;
use rcgen::{BasicConstraints, IsCa, Issuer, KeyPair};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::inspect::human_seconds;
use crate::state::{
    self, ca_params, lifetime_of, new_intermediate, read_state, remove_state_file as remove, write_public,
    write_secret, CaState, RootRotation, RotationPhase, INTERMEDIATE_KEY, INTERMEDIATE_NEXT_CERT,
    INTERMEDIATE_NEXT_KEY, PREVIOUS_CERT, PREVIOUS_KEY, REPORTS_FILE, ROOT_NEXT_CERT, ROOT_NEXT_KEY,
    ROOT_PREVIOUS_CERT, ROTATION_FILE,
};
use crate::store::{IssuedRecord, Store};
use crate::CaError;

/// `finish` trusts sidecar reports at most this old.
pub const REPORT_MAX_AGE: i64 = 60;

/// One known sidecar's answer, polled from its admin endpoint's `/readyz`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SidecarReport {
    /// The identity it serves.
    pub identity: String,
    /// Its admin endpoint (`host:port`).
    pub admin: String,
    /// Fingerprints of the roots in the bundle it serves.
    pub trust_roots: Vec<String>,
    /// Why it could not be asked.
    pub error: Option<String>,
}

/// `root-rotation-sidecars.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SidecarReports {
    /// When they were asked, unix seconds.
    pub checked_at: i64,
    /// One per known sidecar.
    pub sidecars: Vec<SidecarReport>,
}

impl SidecarReports {
    /// Reads the last reports; `None` when `ca serve` wrote none.
    pub fn read(dir: &Path) -> Result<Option<Self>, CaError> {
        let path = dir.join(REPORTS_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map(Some).map_err(|e| CaError::CorruptState { path, what: e.to_string() })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CaError::ReadState { path, source }),
        }
    }

    /// Writes them for `ca root rotate status` and `finish`.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        write_public(&dir.join(REPORTS_FILE), &serde_json::to_string_pretty(self).expect("reports serialize"))
    }

    /// The sidecars that do not serve `root` (unreachable ones included).
    pub fn lacking<'a>(&'a self, root: &'a str) -> impl Iterator<Item = &'a SidecarReport> {
        self.sidecars.iter().filter(move |s| !s.trust_roots.iter().any(|r| r == root))
    }
}

/// `ca root rotate start`: a new root (ECDSA P-384) and a new intermediate
/// under it. Returns the reloaded CA and, when the current root key is
/// offline, the new root's key PEM, which is not stored either.
pub fn start(ca: &CaState, now: OffsetDateTime) -> Result<(CaState, Option<String>), CaError> {
    if let Some(r) = ca.rotation() {
        return Err(CaError::Rotation(format!(
            "a rotation is already under way ({} since {}); see `ca root rotate status`",
            phase_name(r.phase),
            at(r.started_at)
        )));
    }
    let dir = ca.dir();
    let td = ca.trust_domain();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    let mut params = ca_params(&state::ca_name("Lanyard Root CA", td, now), now, state::ROOT_LIFETIME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root = params.self_signed(&key)?;
    let issuer = Issuer::new(params, key);
    let current = ca.intermediate();
    let lifetime = lifetime_of(current.not_after - current.not_before);
    let (int_cert, int_key) = new_intermediate(&issuer, td, ca.permitted_dns(), now, lifetime)?;

    write_secret(&dir.join(INTERMEDIATE_NEXT_KEY), &int_key.serialize_pem())?;
    write_public(&dir.join(INTERMEDIATE_NEXT_CERT), &int_cert.pem())?;
    let root_key = issuer.key().serialize_pem();
    let handed_back = if ca.root_key_online() {
        write_secret(&dir.join(ROOT_NEXT_KEY), &root_key)?;
        None
    } else {
        Some(root_key)
    };
    write_public(&dir.join(ROOT_NEXT_CERT), &root.pem())?;
    let new_root = lanyard_sidecar::certinfo::CertInfo::from_der(root.der())
        .map_err(|e| CaError::Rcgen(rcgen::Error::X509(e.to_string())))?
        .sha256;
    let doc = RootRotation {
        phase: RotationPhase::Started,
        started_at: now.unix_timestamp(),
        finished_at: None,
        old_root: ca.root().sha256.clone(),
        new_root,
        reissue_window_secs: 0,
    };
    write_doc(dir, &doc)?;
    let _ = fs::remove_file(dir.join(REPORTS_FILE));
    Ok((CaState::load(dir)?, handed_back))
}

/// `ca root rotate abort`: back to the old root alone (before `finish` only).
pub fn abort(ca: &CaState) -> Result<CaState, CaError> {
    let dir = ca.dir();
    match ca.rotation() {
        None => return Err(CaError::Rotation("no rotation is under way".into())),
        Some(r) if r.phase == RotationPhase::Finished => {
            return Err(CaError::Rotation(format!(
                "issuance moved to the new root at {}; a finished rotation cannot be aborted",
                r.finished_at.map(at).unwrap_or_default()
            )))
        }
        Some(_) => {}
    }
    remove(&dir.join(ROTATION_FILE))?;
    for name in [INTERMEDIATE_NEXT_KEY, INTERMEDIATE_NEXT_CERT, ROOT_NEXT_KEY, ROOT_NEXT_CERT, REPORTS_FILE] {
        remove(&dir.join(name))?;
    }
    CaState::load(dir)
}

/// `ca root rotate finish`: moves issuance to the new intermediate. Refused
/// while a known sidecar lacks the new root (or `ca serve` has not asked
/// them lately), unless `force`. `ca serve` then re-issues every identity
/// spread over `window`.
pub fn finish(ca: &CaState, now: OffsetDateTime, window: std::time::Duration, force: bool) -> Result<CaState, CaError> {
    let dir = ca.dir();
    let mut doc = match ca.rotation() {
        None => return Err(CaError::Rotation("no rotation is under way; run `ca root rotate start` first".into())),
        Some(r) if r.phase == RotationPhase::Finished => {
            return Err(CaError::Rotation("already finished; see `ca root rotate status`".into()))
        }
        Some(r) => r.clone(),
    };
    if !force {
        check_sidecars(dir, &doc, now)?;
    }
    // The old pair stays as the previous intermediate (its CRL goes on),
    // and the old root as the previous root (bundles keep it).
    write_public(&dir.join(ROOT_PREVIOUS_CERT), ca.root_pem())?;
    write_secret(&dir.join(PREVIOUS_KEY), &read_state(&dir.join(INTERMEDIATE_KEY))?)?;
    write_public(&dir.join(PREVIOUS_CERT), ca.intermediate_pem())?;
    doc.phase = RotationPhase::Finished;
    doc.finished_at = Some(now.unix_timestamp());
    doc.reissue_window_secs = window.as_secs();
    write_doc(dir, &doc)?;
    state::switch_to_next(dir)?;
    CaState::load(dir)
}

/// Refuses `finish` unless every known sidecar reported the new root lately.
fn check_sidecars(dir: &Path, doc: &RootRotation, now: OffsetDateTime) -> Result<(), CaError> {
    let Some(reports) = SidecarReports::read(dir)? else {
        return Err(CaError::Rotation(
            "no sidecar has been asked yet: `ca serve` asks every sidecar with a `sidecar_admin` address every few seconds while a rotation is under way; is it running? (--force skips the check)".into(),
        ));
    };
    let age = now.unix_timestamp() - reports.checked_at;
    if age > REPORT_MAX_AGE || reports.checked_at < doc.started_at {
        return Err(CaError::Rotation(format!(
            "the sidecars were last asked {} ago; is `ca serve` running? (--force skips the check)",
            human_seconds(age)
        )));
    }
    let lacking: Vec<String> = reports.lacking(&doc.new_root).map(describe_lacking).collect();
    if !lacking.is_empty() {
        return Err(CaError::Rotation(format!(
            "refusing to finish: {} of {} known sidecars do not serve the new root yet: {}. A sidecar whose cert dir is not updated (a frozen copy, a stale volume) must get the CA's ca.pem first; --force finishes anyway and cuts them off",
            lacking.len(),
            reports.sidecars.len(),
            lacking.join("; ")
        )));
    }
    Ok(())
}

fn describe_lacking(s: &SidecarReport) -> String {
    match &s.error {
        Some(e) => format!("{} ({}): unreachable: {e}", s.identity, s.admin),
        None => format!(
            "{} ({}): serves only root {}",
            s.identity,
            s.admin,
            s.trust_roots.iter().map(|r| short(r)).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Live leaves under a root other than the current one whose identity has
/// no leaf under the current root yet: what keeps the old root in the
/// bundles after `finish`.
pub fn old_leaves(ca: &CaState, store: &dyn Store, now: OffsetDateTime) -> Result<Vec<IssuedRecord>, CaError> {
    let root = &ca.root().sha256;
    let live: Vec<IssuedRecord> = store
        .certificates()?
        .into_iter()
        .filter(|r| r.not_after > now.unix_timestamp() && r.revoked_at.is_none())
        .collect();
    let replaced: BTreeSet<&str> =
        live.iter().filter(|r| r.root.as_ref() == Some(root)).map(|r| r.identity.as_str()).collect();
    Ok(live
        .iter()
        .filter(|r| r.root.as_ref() != Some(root) && !replaced.contains(r.identity.as_str()))
        .cloned()
        .collect())
}

/// Ends a finished rotation: the old root leaves the bundles.
pub fn complete(ca: &CaState) -> Result<CaState, CaError> {
    if ca.rotation().map(|r| r.phase) != Some(RotationPhase::Finished) {
        return Err(CaError::Rotation("only a finished rotation can drop the old root".into()));
    }
    remove(&ca.dir().join(ROTATION_FILE))?;
    remove(&ca.dir().join(ROOT_PREVIOUS_CERT))?;
    CaState::load(ca.dir())
}

/// `ca root rotate status`, also part of `ca status`.
pub fn status_text(ca: &CaState, store: &dyn Store, now: OffsetDateTime) -> Result<String, CaError> {
    let mut out = String::new();
    let Some(r) = ca.rotation() else {
        let _ = writeln!(out, "root rotation: none under way (root {})", short(&ca.root().sha256));
        return Ok(out);
    };
    let _ = writeln!(out, "root rotation: {} (started {})", phase_name(r.phase), at(r.started_at));
    let _ = writeln!(out, "  old root  {}", r.old_root);
    let _ = writeln!(out, "  new root  {}", r.new_root);
    match r.phase {
        RotationPhase::Started => {
            match SidecarReports::read(ca.dir())? {
                None => {
                    let _ =
                        writeln!(out, "  sidecars: not asked yet (`ca serve` asks those with a sidecar_admin address)");
                }
                Some(reports) => {
                    let lacking: Vec<&SidecarReport> = reports.lacking(&r.new_root).collect();
                    let _ = writeln!(
                        out,
                        "  sidecars: {} of {} serve the new root (asked {} ago)",
                        reports.sidecars.len() - lacking.len(),
                        reports.sidecars.len(),
                        human_seconds(now.unix_timestamp() - reports.checked_at)
                    );
                    for s in lacking {
                        let _ = writeln!(out, "    lacks the new root: {}", describe_lacking(s));
                    }
                }
            }
            let _ = writeln!(
                out,
                "  next: `ca root rotate finish` once every sidecar serves the new root, or `ca root rotate abort`"
            );
        }
        RotationPhase::Finished => {
            let old = old_leaves(ca, store, now)?;
            let _ = writeln!(
                out,
                "  issuance on the new root since {}; {} live leaves under the old root",
                r.finished_at.map(at).unwrap_or_default(),
                old.len()
            );
            for rec in old.iter().take(10) {
                let _ = writeln!(out, "    {} serial {} expires {}", rec.identity, rec.serial, at(rec.not_after));
            }
            let last = old.iter().map(|r| r.not_after).max();
            let _ = writeln!(
                out,
                "  the old root leaves the bundles when they are renewed or expired{}",
                last.map(|t| format!(" (at the latest {})", at(t))).unwrap_or_default()
            );
        }
    }
    Ok(out)
}

fn write_doc(dir: &Path, doc: &RootRotation) -> Result<(), CaError> {
    write_public(&dir.join(ROTATION_FILE), &(serde_json::to_string_pretty(doc).expect("serializes") + "\n"))
}

fn phase_name(phase: RotationPhase) -> &'static str {
    match phase {
        RotationPhase::Started => "started: bundles carry old + new root, issuance on the old root",
        RotationPhase::Finished => "finished: issuance on the new root, bundles keep the old root",
    }
}

fn at(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix).map(rfc3339).unwrap_or_default()
}

/// The first 16 hex digits of a fingerprint.
fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(16)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::InitOptions;
    use crate::store::SqliteStore;

    fn ca(dir: &Path) -> CaState {
        CaState::init(dir, &InitOptions::new("td.test".parse().unwrap())).unwrap().0
    }

    fn rec(serial: &str, identity: &str, root: &str, not_after: i64) -> IssuedRecord {
        IssuedRecord {
            serial: serial.into(),
            identity: identity.into(),
            not_before: 0,
            not_after,
            source: "managed".into(),
            revoked_at: None,
            root: Some(root.into()),
        }
    }

    #[test]
    fn phases_change_the_bundle_and_the_issuer_and_abort_undoes_start() {
        let tmp = tempfile::tempdir().unwrap();
        let old = ca(tmp.path());
        let now = OffsetDateTime::now_utc();
        let (started, key) = start(&old, now).unwrap();
        assert!(key.is_none(), "an online root's successor is stored");
        assert_eq!(started.bundle_pem().matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(started.root().sha256, old.root().sha256, "issuance stays on the old root");
        assert!(matches!(start(&started, now), Err(CaError::Rotation(_))), "one rotation at a time");
        let aborted = abort(&started).unwrap();
        assert_eq!(aborted.bundle_pem(), old.bundle_pem());
        assert!(aborted.rotation().is_none());

        let (started, _) = start(&aborted, now).unwrap();
        let new_root = started.rotation().unwrap().new_root.clone();
        let err = finish(&started, now, std::time::Duration::ZERO, false).unwrap_err().to_string();
        assert!(err.contains("no sidecar has been asked"), "{err}");
        let finished = finish(&started, now, std::time::Duration::ZERO, true).unwrap();
        assert_eq!(finished.root().sha256, new_root, "issuance on the new root");
        assert_eq!(finished.bundle_pem().matches("BEGIN CERTIFICATE").count(), 2, "the old root stays");
        assert!(matches!(abort(&finished), Err(CaError::Rotation(_))), "finished cannot be aborted");
        let done = complete(&finished).unwrap();
        assert_eq!(done.bundle_pem(), done.root_pem(), "the new root alone");
        assert!(done.rotation().is_none());
    }

    #[test]
    fn a_finish_cut_short_is_completed_by_the_next_load() {
        let tmp = tempfile::tempdir().unwrap();
        let (started, _) = start(&ca(tmp.path()), OffsetDateTime::now_utc()).unwrap();
        let new_root = started.rotation().unwrap().new_root.clone();
        let mut doc = started.rotation().unwrap().clone();
        doc.phase = RotationPhase::Finished;
        doc.finished_at = Some(doc.started_at);
        write_public(&tmp.path().join(state::ROOT_PREVIOUS_CERT), started.root_pem()).unwrap();
        write_doc(tmp.path(), &doc).unwrap();
        let loaded = CaState::load(tmp.path()).unwrap();
        assert_eq!(loaded.root().sha256, new_root);
        assert!(!tmp.path().join(ROOT_NEXT_CERT).exists());
    }

    #[test]
    fn old_leaves_are_those_under_another_root_not_yet_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = ca(tmp.path());
        let store = SqliteStore::open(tmp.path()).unwrap();
        let (now, root) = (OffsetDateTime::now_utc(), ca.root().sha256.clone());
        let later = now.unix_timestamp() + 3600;
        store.record_issued(&rec("01", "api", "old", later)).unwrap();
        store.record_issued(&rec("02", "api", &root, later)).unwrap();
        store.record_issued(&rec("03", "web", "old", later)).unwrap();
        store.record_issued(&rec("04", "db", "old", now.unix_timestamp() - 1)).unwrap();
        store.record_issued(&rec("05", "cache", "old", later)).unwrap();
        store.revoke_serial("05", now.unix_timestamp()).unwrap();
        let old: Vec<String> = old_leaves(&ca, &store, now).unwrap().into_iter().map(|r| r.serial).collect();
        assert_eq!(old, ["03"], "api is replaced, db expired, cache revoked; web still needs the old root");
    }
}
