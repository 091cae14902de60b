//! The CA with its store: every issuance is recorded (serials unique even
//! under concurrent signing), and revocations turn into a signed CRL.

use std::sync::Arc;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber};
use time::{Duration, OffsetDateTime};

use crate::issue::{IssuedLeaf, LeafRequest};
use crate::state::CaState;
use crate::store::{IssuedRecord, SqliteStore, Store, StoreError};
use crate::CaError;

/// How long a CRL is valid; it is re-signed well before.
pub const CRL_LIFETIME: Duration = Duration::hours(24);

/// A loaded CA plus its store.
pub struct Authority {
    ca: CaState,
    store: Arc<dyn Store>,
}

impl Authority {
    /// Loads the CA in `dir` and opens its store.
    pub fn open(dir: &std::path::Path) -> Result<Self, CaError> {
        let ca = CaState::load(dir)?;
        let store = Arc::new(SqliteStore::open(dir)?);
        Ok(Self { ca, store })
    }

    /// The CA.
    pub fn ca(&self) -> &CaState {
        &self.ca
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Issues a leaf and records it; `source` says how (`cli`, `managed`, `sign`, `renew`).
    pub fn issue(&self, req: &LeafRequest, source: &str) -> Result<IssuedLeaf, CaError> {
        // A random 127-bit serial colliding is astronomically unlikely; the
        // store's primary key makes it impossible.
        for _ in 0..3 {
            let issued = self.ca.issue(req)?;
            let rec = IssuedRecord {
                serial: issued.info.serial.clone(),
                identity: req.name.to_string(),
                not_before: issued.info.not_before.unix_timestamp(),
                not_after: issued.info.not_after.unix_timestamp(),
                source: source.to_owned(),
                revoked_at: None,
            };
            match self.store.record_issued(&rec) {
                Ok(()) => return Ok(issued),
                Err(StoreError::DuplicateSerial(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CaError::Store(StoreError::DuplicateSerial("three random serials in a row".into())))
    }

    /// A fresh CRL (PEM) signed by the intermediate, listing every revoked,
    /// unexpired certificate.
    pub fn crl_pem(&self, now: OffsetDateTime) -> Result<String, CaError> {
        let revoked = self.store.revoked(now.unix_timestamp())?;
        let revoked_certs = revoked
            .iter()
            .filter_map(|(serial, at)| {
                let bytes = hex_decode(serial)?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: OffsetDateTime::from_unix_timestamp(*at).ok()?,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - crate::state::BACKDATE,
            next_update: now + CRL_LIFETIME,
            crl_number: SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.ca.intermediate_key_id()),
        };
        Ok(params.signed_by(self.ca.issuer())?.pem()?)
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = if s.len() % 2 == 1 { format!("0{s}") } else { s.to_owned() };
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}
