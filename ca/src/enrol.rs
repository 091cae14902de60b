//! Enrolment credentials (`ca enrol NAME`): a secret that may enrol exactly
//! one identity over the network (`POST /v1/enrol`). Unlike a bootstrap
//! token it is reusable, so restarts and replicas work. It is kept hashed
//! in the store, listed, revoked on its own, and every use is recorded with
//! the caller's address. Revoking it stops new enrolments at once;
//! certificates already issued stay valid until they are revoked.

use lanyard_sidecar::certinfo::rfc3339;
use lanyard_sidecar::enrol::Credential;
use lanyard_sidecar::identity::DnsName;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::store::{Store, StoreError};
use crate::token::secret_hash;

/// The store's document kind.
const KIND: &str = "enrolment";

/// One credential as the store keeps it (never the secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrolment {
    /// A short name for listing and revoking: the first 12 hex digits of the secret's hash.
    pub id: String,
    /// The identity it may enrol.
    pub identity: String,
    /// When it was made, unix seconds.
    pub created_at: i64,
    /// When it stops working, unix seconds.
    pub expires_at: i64,
    /// When it was revoked, unix seconds.
    pub revoked_at: Option<i64>,
    /// Enrolments made with it.
    pub uses: u64,
    /// The last one, unix seconds.
    pub last_used_at: Option<i64>,
    /// The address the last one came from.
    pub last_caller: Option<String>,
}

/// Why an enrolment was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum EnrolRefusal {
    /// No such credential.
    Unknown,
    /// Revoked at this time.
    Revoked(i64),
    /// Expired at this time.
    Expired(i64),
}

impl std::fmt::Display for EnrolRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).map(rfc3339).unwrap_or_default();
        match self {
            Self::Unknown => write!(f, "unknown enrolment credential"),
            Self::Revoked(t) => {
                write!(f, "the enrolment credential was revoked at {}; make a new one with `ca enrol`", at(*t))
            }
            Self::Expired(t) => {
                write!(f, "the enrolment credential expired at {}; make a new one with `ca enrol`", at(*t))
            }
        }
    }
}

/// Makes a credential for `identity`, valid for `ttl`, naming the CA at
/// `ca_url` with root `fingerprint`. Returns what is stored and the file's
/// contents (the only place the secret exists).
pub fn create(
    store: &dyn Store,
    identity: &DnsName,
    ttl: time::Duration,
    ca_url: &str,
    fingerprint: &str,
) -> Result<(Enrolment, Credential), StoreError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG is available");
    let secret = format!("lyen_{}", lanyard_sidecar::certinfo::hex(&bytes));
    let hash = secret_hash(&secret);
    let now = OffsetDateTime::now_utc();
    let record = Enrolment {
        id: hash[..12].to_owned(),
        identity: identity.to_string(),
        created_at: now.unix_timestamp(),
        expires_at: (now + ttl).unix_timestamp(),
        revoked_at: None,
        uses: 0,
        last_used_at: None,
        last_caller: None,
    };
    store.put_doc(KIND, &hash, &serde_json::to_string(&record).expect("serializes"))?;
    Ok((record, Credential { ca: ca_url.to_owned(), fingerprint: fingerprint.to_owned(), secret }))
}

/// Every credential, by id.
pub fn list(store: &dyn Store) -> Result<Vec<Enrolment>, StoreError> {
    let mut all: Vec<Enrolment> = store
        .docs(KIND)?
        .into_iter()
        .map(|(key, json)| serde_json::from_str(&json).map_err(|e| StoreError::Corrupt { key, what: e.to_string() }))
        .collect::<Result<_, _>>()?;
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(all)
}

/// Revokes the credential whose id starts with `id`; `None` when none or
/// several match.
pub fn revoke(store: &dyn Store, id: &str) -> Result<Option<Enrolment>, StoreError> {
    let matches: Vec<(String, String)> =
        store.docs(KIND)?.into_iter().filter(|(hash, _)| hash.starts_with(id)).collect();
    let [(hash, json)] = matches.as_slice() else { return Ok(None) };
    let mut record: Enrolment =
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt { key: hash.clone(), what: e.to_string() })?;
    record.revoked_at.get_or_insert(OffsetDateTime::now_utc().unix_timestamp());
    store.put_doc(KIND, hash, &serde_json::to_string(&record).expect("serializes"))?;
    Ok(Some(record))
}

/// Checks `secret` for an enrolment from `caller` at `now`, and records the use.
pub fn admit(
    store: &dyn Store,
    secret: &str,
    caller: &str,
    now: i64,
) -> Result<Result<Enrolment, EnrolRefusal>, StoreError> {
    let hash = secret_hash(secret);
    let Some(json) = store.doc(KIND, &hash)? else { return Ok(Err(EnrolRefusal::Unknown)) };
    let mut record: Enrolment =
        serde_json::from_str(&json).map_err(|e| StoreError::Corrupt { key: hash.clone(), what: e.to_string() })?;
    if let Some(at) = record.revoked_at {
        return Ok(Err(EnrolRefusal::Revoked(at)));
    }
    if record.expires_at <= now {
        return Ok(Err(EnrolRefusal::Expired(record.expires_at)));
    }
    record.uses += 1;
    record.last_used_at = Some(now);
    record.last_caller = Some(caller.to_owned());
    store.put_doc(KIND, &hash, &serde_json::to_string(&record).expect("serializes"))?;
    Ok(Ok(record))
}
