//! Sealing of key material kept in a shared store: AES-256-GCM (aws-lc-rs)
//! with a key that only the CA replicas hold, in a file beside them (by
//! default `STATE/store.key`, or a Swarm/compose secret). The record's key
//! is the associated data, so a sealed value moved to another key does not
//! open.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine;

use super::StoreError;

/// The key file's name in the state directory.
pub const DEFAULT_FILE: &str = "store.key";
/// What a sealed value starts with.
const PREFIX: &str = "sealed:v1:";

/// The key that seals key material in the store.
pub struct StoreKey {
    path: PathBuf,
    key: LessSafeKey,
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreKey").field("path", &self.path).finish_non_exhaustive()
    }
}

impl StoreKey {
    /// Reads the key in `path` (64 hex digits), making one (mode 0600) when
    /// there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, StoreError> {
        let err = |what: String| StoreError::Seal { path: path.to_owned(), what };
        let hex = match std::fs::read_to_string(path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                aws_lc_rs::rand::fill(&mut bytes).map_err(|_| err("the system RNG failed".into()))?;
                let hex = lanyard_sidecar::certinfo::hex(&bytes);
                write_new(path, &hex).map_err(|e| err(format!("cannot create it: {e}")))?;
                hex
            }
            Err(e) => return Err(err(format!("cannot read it: {e}; every CA replica needs the same key"))),
        };
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| err("not a store key: expected 64 hex digits".into()))?;
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| err("not an AES-256 key".into()))?;
        Ok(Self { path: path.to_owned(), key: LessSafeKey::new(key) })
    }

    /// Seals `plain`, bound to the record `name`.
    pub fn seal(&self, name: &str, plain: &str) -> Result<String, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| self.error("the system RNG failed"))?;
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| self.error("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(out)))
    }

    /// Opens what [`StoreKey::seal`] made for `name`.
    pub fn open(&self, name: &str, sealed: &str) -> Result<String, StoreError> {
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .filter(|raw| raw.len() > NONCE_LEN)
            .ok_or_else(|| StoreError::Corrupt { key: name.to_owned(), what: "not a sealed value".into() })?;
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| self.error("bad nonce"))?;
        let mut data = data.to_vec();
        let plain = self.key.open_in_place(nonce, Aad::from(name.as_bytes()), &mut data).map_err(|_| {
            self.error(&format!(
                "cannot open {name}: sealed with another key; every CA replica needs the same key file"
            ))
        })?;
        String::from_utf8(plain.to_vec()).map_err(|_| StoreError::Corrupt { key: name.into(), what: "not text".into() })
    }

    fn error(&self, what: &str) -> StoreError {
        StoreError::Seal { path: self.path.clone(), what: what.to_owned() }
    }
}

fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
