//! The CA's own files (certificates, keys, rotation state) mirrored in a
//! shared store, so that replicas on other hosts share one CA: the store is
//! the source of truth, and each replica's state directory is a copy. Keys
//! are sealed in the store like all key material. An intermediate rolled
//! over by the leader reaches every replica this way.

use std::path::Path;

use crate::state::{self, remove_state_file, write_file};
use crate::store::{Store, StoreError};
use crate::CaError;

/// Document kind of public CA files.
const FILES: &str = "ca_file";
/// Document kind of CA keys (sealed by the store).
const KEYS: &str = "ca_key";
/// The digest of the mirrored files, to notice a change cheaply.
const GENERATION: (&str, &str) = ("ca_generation", "current");

/// Every file that makes up the CA.
const MIRRORED: [&str; 13] = [
    state::META_FILE,
    state::ROOT_CERT,
    state::ROOT_KEY,
    state::INTERMEDIATE_CERT,
    state::INTERMEDIATE_KEY,
    state::PREVIOUS_CERT,
    state::PREVIOUS_KEY,
    state::ROTATION_FILE,
    state::ROOT_NEXT_CERT,
    state::ROOT_NEXT_KEY,
    state::INTERMEDIATE_NEXT_CERT,
    state::INTERMEDIATE_NEXT_KEY,
    state::ROOT_PREVIOUS_CERT,
];

fn kind_of(name: &str) -> &'static str {
    if name.ends_with("key.pem") {
        KEYS
    } else {
        FILES
    }
}

/// A digest of the CA's files in `dir`.
fn local_generation(dir: &Path) -> String {
    lanyard_sidecar::certinfo::hex(&state::files_digest(dir, &MIRRORED))
}

/// The generation the store holds; `None` when it holds no CA.
pub fn stored_generation(store: &dyn Store) -> Result<Option<String>, StoreError> {
    store.doc(GENERATION.0, GENERATION.1)
}

/// Whether the store's CA differs from the one in `dir`.
pub fn differs(dir: &Path, store: &dyn Store) -> Result<bool, StoreError> {
    Ok(stored_generation(store)?.is_some_and(|g| g != local_generation(dir)))
}

/// Writes the CA in `dir` to the store (files absent here are removed there).
pub fn push(dir: &Path, store: &dyn Store) -> Result<(), CaError> {
    for name in MIRRORED {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(text) => store.put_doc(kind_of(name), name, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                store.delete_doc(kind_of(name), name)?;
            }
            Err(source) => return Err(CaError::ReadState { path: dir.join(name), source }),
        }
    }
    store.put_doc(GENERATION.0, GENERATION.1, &local_generation(dir))?;
    Ok(())
}

/// Makes `dir` a copy of the store's CA; false when the store holds none.
pub fn pull(dir: &Path, store: &dyn Store) -> Result<bool, CaError> {
    if stored_generation(store)?.is_none() {
        return Ok(false);
    }
    let mut present = Vec::new();
    for name in MIRRORED {
        if let Some(text) = store.doc(kind_of(name), name)? {
            present.push((name, text));
        }
    }
    // Keys before certificates, ca.json last: a reader never sees a
    // certificate without its key, nor a CA marker before its files.
    present.sort_by_key(|(name, _)| (*name == state::META_FILE, !name.ends_with("key.pem")));
    for (name, text) in &present {
        let mode = if name.ends_with("key.pem") { 0o600 } else { 0o644 };
        write_file(&dir.join(name), text, mode)?;
    }
    for name in MIRRORED.iter().filter(|n| !present.iter().any(|(p, _)| p == *n)) {
        remove_state_file(&dir.join(name))?;
    }
    Ok(true)
}
