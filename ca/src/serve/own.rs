//! A replica's own credentials: the API's certificate (`STATE/api`) and the
//! admin credential (`STATE/admin`). Every replica keeps its own in its own
//! state directory, leader or not, so they are not in the shared schedule:
//! each is re-issued at 2/3 of its life (new key), and rewritten when the
//! trust bundle or the CRL changes.

use std::sync::Arc;
use std::time::Duration;

use lanyard_sidecar::certdir::PemSet;
use lanyard_sidecar::certinfo::{rfc3339, CertInfo};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::authority::Authority;
use crate::serve::schedule::{Managed, Scheduler};
use crate::store::ScheduleRow;

/// How often the credentials are looked at.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The replica's own credentials.
pub struct OwnCredentials {
    authority: Arc<Authority>,
    scheduler: Arc<Scheduler>,
    credentials: Vec<Managed>,
}

impl OwnCredentials {
    /// Keeps `credentials` current with `authority`, with the CRL `scheduler` signs.
    pub fn new(authority: Arc<Authority>, scheduler: Arc<Scheduler>, credentials: Vec<Managed>) -> Arc<Self> {
        Arc::new(Self { authority, scheduler, credentials })
    }

    /// Re-issues what is missing, invalid, past 2/3 of its life or from
    /// another intermediate (after a rollover or a root rotation), and
    /// rewrites what carries an old bundle or CRL.
    pub fn tick(&self) {
        let now = OffsetDateTime::now_utc();
        let ca = self.authority.ca();
        let issuer = ca.intermediate().subject.clone();
        let bundle = ca.bundle_pem().to_owned();
        let crl = self.scheduler.crl();
        for m in &self.credentials {
            let name = m.name();
            match m.out_dir.load(now) {
                Ok(set) if now < set.leaf.life_point(2.0 / 3.0) && set.leaf.issuer == issuer => {
                    let Ok(raw) = m.out_dir.read_raw() else { continue };
                    if raw.ca == bundle.as_bytes() && raw.crl.as_deref() == Some(crl.as_bytes()) {
                        continue;
                    }
                    let (Ok(cert), Some(Ok(key))) = (String::from_utf8(raw.cert), raw.key.map(String::from_utf8))
                    else {
                        continue;
                    };
                    let set = PemSet { cert, key: Some(key), ca: bundle.clone(), crl: Some(crl.clone()) };
                    if let Err(e) = m.out_dir.write(&set) {
                        tracing::error!(identity = %name, "cannot update the bundle and CRL: {e}");
                    }
                }
                _ => match self.authority.issue(&m.request, "own") {
                    Ok(issued) => match m.out_dir.write(&PemSet { crl: Some(crl.clone()), ..issued.pem }) {
                        Ok(()) => {
                            tracing::info!(identity = %name, serial = %issued.info.serial, not_after = %rfc3339(issued.info.not_after), dir = %m.out_dir.path().display(), event = "renewed", "rotated")
                        }
                        Err(e) => tracing::error!(identity = %name, "cannot write the new credential: {e}"),
                    },
                    Err(e) => {
                        tracing::error!(identity = %name, "cannot renew this replica's credential: {e}; retrying")
                    }
                },
            }
        }
    }

    /// The credentials.
    pub fn managed(&self) -> &[Managed] {
        &self.credentials
    }

    /// The credentials as schedule rows, for `/metrics`.
    pub fn rows(&self) -> Vec<ScheduleRow> {
        let now = OffsetDateTime::now_utc();
        self.credentials
            .iter()
            .filter_map(|m| {
                let leaf: CertInfo = m.out_dir.load(now).ok()?.leaf;
                Some(ScheduleRow {
                    identity: m.name(),
                    serial: Some(leaf.serial.clone()),
                    not_after: Some(leaf.not_after.unix_timestamp()),
                    next_renewal: leaf.life_point(2.0 / 3.0).unix_timestamp(),
                    ..Default::default()
                })
            })
            .collect()
    }

    /// Runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.tick()).await;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
    }
}
