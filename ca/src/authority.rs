//! The CA with its store: every issuance is recorded (serials unique even
//! under concurrent signing), and revocations turn into a signed CRL.

use std::sync::{Arc, RwLock};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber};
use time::{Duration, OffsetDateTime};

use crate::issue::{IssuedLeaf, LeafRequest, TlsServerRequest};
use crate::state::CaState;
use crate::store::{IssuedRecord, SqliteStore, Store, StoreError};
use crate::CaError;

/// How long a CRL is valid; it is re-signed well before.
pub const CRL_LIFETIME: Duration = Duration::hours(24);

/// A loaded CA plus its store. The CA is swapped whole when its
/// intermediate rolls over; each operation works on one generation.
pub struct Authority {
    ca: RwLock<Arc<CaState>>,
    store: Arc<dyn Store>,
}

impl Authority {
    /// Loads the CA in `dir` with its embedded store.
    pub fn open(dir: &std::path::Path) -> Result<Self, CaError> {
        Self::open_with(dir, Arc::new(SqliteStore::open(dir)?))
    }

    /// Loads the CA in `dir` with `store`.
    pub fn open_with(dir: &std::path::Path, store: Arc<dyn Store>) -> Result<Self, CaError> {
        Ok(Self { ca: RwLock::new(Arc::new(CaState::load(dir)?)), store })
    }

    /// The CA as it is now.
    pub fn ca(&self) -> Arc<CaState> {
        self.ca.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the intermediate (see [`CaState::roll_intermediate`]); new
    /// leaves come from the new one at once.
    pub fn roll_intermediate(&self, now: OffsetDateTime) -> Result<Arc<CaState>, CaError> {
        let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
        *ca = Arc::new(ca.roll_intermediate(now, None)?);
        Ok(ca.clone())
    }

    /// Loads the intermediate another process installed (an offline-root
    /// rollover); `None` when it is unchanged.
    pub fn reload_if_changed(&self) -> Result<Option<Arc<CaState>>, CaError> {
        let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
        if !ca.changed_on_disk() {
            return Ok(None);
        }
        *ca = Arc::new(CaState::load(ca.dir())?);
        Ok(Some(ca.clone()))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Issues a leaf and records it; `source` says how (`cli`, `managed`, `sign`, `renew`).
    pub fn issue(&self, req: &LeafRequest, source: &str) -> Result<IssuedLeaf, CaError> {
        self.issue_recorded(req.name.as_str(), source, |ca| ca.issue(req))
    }

    /// Issues a TLS server certificate (see [`CaState::issue_tls_server`])
    /// and records it under `identity`.
    pub fn issue_tls_server(
        &self,
        req: &TlsServerRequest<'_>,
        identity: &str,
        source: &str,
    ) -> Result<IssuedLeaf, CaError> {
        self.issue_recorded(identity, source, |ca| ca.issue_tls_server(req))
    }

    fn issue_recorded(
        &self,
        identity: &str,
        source: &str,
        issue: impl Fn(&CaState) -> Result<IssuedLeaf, CaError>,
    ) -> Result<IssuedLeaf, CaError> {
        // A random 127-bit serial colliding is astronomically unlikely; the
        // store's primary key makes it impossible.
        for _ in 0..3 {
            let ca = self.ca();
            let issued = issue(&ca)?;
            let rec = IssuedRecord {
                serial: issued.info.serial.clone(),
                identity: identity.to_owned(),
                not_before: issued.info.not_before.unix_timestamp(),
                not_after: issued.info.not_after.unix_timestamp(),
                source: source.to_owned(),
                revoked_at: None,
                root: Some(ca.root().sha256.clone()),
            };
            match self.store.record_issued(&rec) {
                Ok(()) => return Ok(issued),
                Err(StoreError::DuplicateSerial(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CaError::Store(StoreError::DuplicateSerial("three random serials in a row".into())))
    }

    /// Fresh CRLs (PEM) listing every revoked, unexpired certificate: one
    /// signed by the intermediate and, after a rollover, one signed by the
    /// previous intermediate while leaves it signed may live.
    pub fn crl_pem(&self, now: OffsetDateTime) -> Result<String, CaError> {
        let revoked = self.store.revoked(now.unix_timestamp())?;
        let ca = self.ca();
        let sign = |issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, key_id: Vec<u8>| -> Result<String, CaError> {
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
                key_identifier_method: KeyIdMethod::PreSpecified(key_id),
            };
            Ok(params.signed_by(issuer)?.pem()?)
        };
        let mut pem = sign(ca.issuer(), ca.intermediate_key_id())?;
        if let Some((_, issuer, key_id)) = ca.previous(now) {
            pem += &sign(issuer, key_id)?;
        }
        Ok(pem)
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let s = if s.len() % 2 == 1 { format!("0{s}") } else { s.to_owned() };
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}
