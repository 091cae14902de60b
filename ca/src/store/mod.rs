//! The CA's store: issued certificates, revocations, bootstrap tokens, the
//! renewal schedule and the ACME documents, behind [`Store`].
//! - [`SqliteStore`], the embedded default (`STATE/lanyard.db`);
//! - [`RedisStore`], for several `ca serve` replicas sharing one state, one
//!   of them leading through a lease with a fencing token.
//!
//! [`open`] picks one from the configuration.

mod redis;
mod seal;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::redis::RedisStore;
pub use seal::StoreKey;
pub use sqlite::{SqliteStore, DB_FILE};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("store {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// Redis failed or is unreachable.
    #[error("redis store {url}: {source}; the CA retries by itself (check that redis-server runs and that REDIS_URL/store is right)")]
    Redis {
        /// The server, without credentials.
        url: String,
        /// The client's error.
        source: ::redis::RedisError,
    },
    /// A serial was recorded twice.
    #[error("serial {0} already exists")]
    DuplicateSerial(String),
    /// A write only the leader may make came from a replica that no longer
    /// holds the lease (its fencing token is stale).
    #[error("fenced: this replica's lease (token {0}) is no longer the leader's; the write was refused")]
    Fenced(u64),
    /// A stored record is not what it should be.
    #[error("store record {key}: {what}")]
    Corrupt {
        /// Its key.
        key: String,
        /// What is wrong.
        what: String,
    },
    /// Sealed key material could not be sealed or opened.
    #[error("store key {path}: {what}")]
    Seal {
        /// The key file.
        path: PathBuf,
        /// What failed, and what to do.
        what: String,
    },
}

/// One issued certificate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedRecord {
    /// Serial, lowercase hex.
    pub serial: String,
    /// Identity (service) name.
    pub identity: String,
    /// notBefore, unix seconds.
    pub not_before: i64,
    /// notAfter, unix seconds.
    pub not_after: i64,
    /// How it was issued: `cli`, `managed`, `sign`, `renew`.
    pub source: String,
    /// Revocation time, unix seconds.
    pub revoked_at: Option<i64>,
    /// SHA-256 fingerprint of the root its chain ends at; `None` for
    /// records older than root rotation. A root rotation waits for every
    /// live leaf under the old root to expire or be replaced.
    pub root: Option<String>,
}

/// Why a token could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token.
    Unknown,
    /// Already used once.
    Used,
    /// Past its expiry.
    Expired,
}

/// One managed identity's place in the renewal schedule.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ScheduleRow {
    /// Identity name.
    pub identity: String,
    /// Serial currently in the cert dir.
    pub serial: Option<String>,
    /// Its notAfter, unix seconds.
    pub not_after: Option<i64>,
    /// When to renew next, unix seconds.
    pub next_renewal: i64,
    /// Last successful renewal, unix seconds.
    pub last_renewal: Option<i64>,
    /// Last error, cleared on success.
    pub last_error: Option<String>,
    /// Consecutive failures (drives the backoff).
    pub failures: u32,
    /// SANs of the current certificate, comma-separated.
    pub sans: Option<String>,
}

/// A bootstrap token, as kept (by hash).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// SHA-256 of the token.
    pub hash: String,
    /// The identity it may sign for.
    pub identity: String,
    /// Expiry, unix seconds.
    pub expires_at: i64,
    /// When it was used, unix seconds.
    pub used_at: Option<i64>,
}

/// Proof that a write comes from the leader: the lease holder and the
/// fencing token it got with the lease. A store refuses a fenced write once
/// the lease is another's (or lapsed), even from a replica that has not
/// noticed yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// Who holds the lease.
    pub holder: String,
    /// The token it came with; each new lease gets a greater one.
    pub token: u64,
}

/// One document: `(kind, key)` and its JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct DocRecord {
    /// ACME accounts, public certificates, rate-limit events.
    pub kind: String,
    /// Its key within the kind.
    pub key: String,
    /// The document.
    pub json: String,
}

/// Everything a store keeps that outlives an order, for `ca store copy`
/// and `ca backup` (expiring documents such as challenges are left out).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Dump {
    /// Issued certificates, with their revocations.
    pub certificates: Vec<IssuedRecord>,
    /// Bootstrap tokens.
    pub tokens: Vec<TokenRecord>,
    /// The renewal schedule.
    pub schedules: Vec<ScheduleRow>,
    /// Every JSON document (public certificates, accounts, credentials...).
    pub docs: Vec<DocRecord>,
}

impl Dump {
    /// Sorts every list by its key, so that equal contents compare and hash equal.
    pub fn normalized(mut self) -> Self {
        self.certificates.sort_by(|a, b| a.serial.cmp(&b.serial));
        self.tokens.sort_by(|a, b| a.hash.cmp(&b.hash));
        self.schedules.sort_by(|a, b| a.identity.cmp(&b.identity));
        self.docs.sort();
        self
    }

    /// Record counts and a SHA-256 over every record, as `ca store copy` prints them.
    pub fn summary(&self) -> String {
        let normalized = self.clone().normalized();
        let json = serde_json::to_vec(&normalized).expect("a dump serializes");
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json);
        format!(
            "{} certificates ({} revoked), {} tokens, {} schedules, {} documents, sha256 {}",
            self.certificates.len(),
            self.certificates.iter().filter(|c| c.revoked_at.is_some()).count(),
            self.tokens.len(),
            self.schedules.len(),
            self.docs.len(),
            lanyard_sidecar::certinfo::hex(digest.as_ref())
        )
    }
}

/// What the control plane keeps. Implementations are safe to share.
pub trait Store: Send + Sync {
    /// `sqlite` or `redis`.
    fn backend(&self) -> &'static str;
    /// Records an issued certificate; serials are unique.
    fn record_issued(&self, rec: &IssuedRecord) -> Result<(), StoreError>;
    /// Looks up one certificate.
    fn certificate(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError>;
    /// Every certificate, newest first.
    fn certificates(&self) -> Result<Vec<IssuedRecord>, StoreError>;
    /// Revokes one serial; false when unknown.
    fn revoke_serial(&self, serial: &str, at: i64) -> Result<bool, StoreError>;
    /// Revokes every unexpired certificate of an identity; returns their serials.
    fn revoke_identity(&self, identity: &str, at: i64) -> Result<Vec<String>, StoreError>;
    /// Revoked and unexpired certificates, for the CRL: `(serial, revoked_at)`.
    fn revoked(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError>;
    /// Stores a bootstrap token (by hash) bound to an identity.
    fn add_token(&self, hash: &str, identity: &str, expires_at: i64) -> Result<(), StoreError>;
    /// Uses a token once, atomically; returns its identity.
    fn use_token(&self, hash: &str, now: i64) -> Result<Result<String, TokenRefusal>, StoreError>;
    /// Every token (for copies and backups).
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Writes a token as it is (for copies and restores).
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// One identity's schedule.
    fn schedule(&self, identity: &str) -> Result<Option<ScheduleRow>, StoreError>;
    /// Writes one identity's schedule. With `fence` (the leader's token),
    /// the write is refused unless that token still holds the lease.
    fn put_schedule(&self, row: &ScheduleRow, fence: Option<&Fence>) -> Result<(), StoreError>;
    /// Removes identities no longer managed.
    fn retain_schedule(&self, identities: &[String]) -> Result<(), StoreError>;
    /// The whole schedule.
    fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError>;
    /// Writes a JSON document under `(kind, key)` (ACME accounts, public
    /// certificates, rate-limit events).
    fn put_doc(&self, kind: &str, key: &str, json: &str) -> Result<(), StoreError>;
    /// Writes a document that disappears by itself after `ttl` (ACME
    /// challenges, answered by any replica).
    fn put_expiring(&self, kind: &str, key: &str, json: &str, ttl: Duration) -> Result<(), StoreError>;
    /// Reads one document (an expired one reads as none).
    fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError>;
    /// Every document of a kind, by key.
    fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError>;
    /// Every lasting document of every kind (for copies and backups).
    fn all_docs(&self) -> Result<Vec<DocRecord>, StoreError>;
    /// Removes one document; false when there was none.
    fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, StoreError>;
    /// A cheap liveness query.
    fn check(&self) -> Result<(), StoreError>;
    /// Takes or renews the leader's lease for `holder`, for `ttl`. Returns
    /// the fencing token while `holder` leads, `None` while another does.
    /// The embedded store has one process, which always leads (token 0).
    fn lease(&self, holder: &str, ttl: Duration) -> Result<Option<u64>, StoreError>;
    /// Gives the lease up (on shutdown), if `holder` has it.
    fn release(&self, holder: &str) -> Result<(), StoreError>;

    /// Everything kept, for `ca store copy` and `ca backup`.
    fn export(&self) -> Result<Dump, StoreError> {
        Ok(Dump {
            certificates: self.certificates()?,
            tokens: self.tokens()?,
            schedules: self.schedules()?,
            docs: self.all_docs()?,
        })
    }

    /// Writes every record of `dump` (into an empty store).
    fn import(&self, dump: &Dump) -> Result<(), StoreError> {
        for c in &dump.certificates {
            self.record_issued(c)?;
            if let Some(at) = c.revoked_at {
                self.revoke_serial(&c.serial, at)?;
            }
        }
        for t in &dump.tokens {
            self.put_token(t)?;
        }
        for s in &dump.schedules {
            self.put_schedule(s, None)?;
        }
        for d in &dump.docs {
            self.put_doc(&d.kind, &d.key, &d.json)?;
        }
        Ok(())
    }
}

/// Where the store lives: `sqlite` (the default, in the state directory)
/// or a `redis://` / `rediss://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// `STATE/lanyard.db`.
    Sqlite,
    /// A Redis server.
    Redis(String),
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "sqlite" => Ok(Self::Sqlite),
            url if url.starts_with("redis://") || url.starts_with("rediss://") => Ok(Self::Redis(url.to_owned())),
            other => Err(format!("store {other:?}: give sqlite, redis://HOST:PORT[/DB] or rediss://HOST:PORT[/DB]")),
        }
    }
}

/// Opens the store `spec` for the CA in `state_dir`. Redis key material is
/// sealed with the key in `store_key` (default `STATE/store.key`, made on
/// first use): Redis alone never hands out a key. `rediss://` trusts the
/// system's roots and the fleet's own root.
pub fn open(spec: &StoreSpec, state_dir: &Path, store_key: Option<&Path>) -> Result<Arc<dyn Store>, StoreError> {
    if !state_dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(|e| StoreError::Seal {
            path: state_dir.to_owned(),
            what: format!("cannot create the state directory: {e}"),
        })?;
    }
    Ok(match spec {
        StoreSpec::Sqlite => Arc::new(SqliteStore::open(state_dir)?),
        StoreSpec::Redis(url) => {
            let key_path = store_key.map(Path::to_owned).unwrap_or_else(|| state_dir.join(seal::DEFAULT_FILE));
            let fleet_roots = std::fs::read_to_string(state_dir.join("root.pem")).ok();
            Arc::new(RedisStore::open(url, StoreKey::load_or_create(&key_path)?, fleet_roots.as_deref())?)
        }
    })
}

#[cfg(test)]
pub(crate) mod conformance;
