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
    /// What the last [`OwnCredentials::tick`] found in each cert dir, so
    /// that `/health` and `/metrics` read memory, not files.
    standing: std::sync::Mutex<Vec<ScheduleRow>>,
}

impl OwnCredentials {
    /// Keeps `credentials` current with `authority`, with the CRL `scheduler` signs.
    pub fn new(authority: Arc<Authority>, scheduler: Arc<Scheduler>, credentials: Vec<Managed>) -> Arc<Self> {
        Arc::new(Self { authority, scheduler, credentials, standing: Default::default() })
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
        let mut standing = Vec::with_capacity(self.credentials.len());
        for m in &self.credentials {
            let name = m.name();
            match m.out_dir.load(now) {
                Ok(set) if now < set.leaf.life_point(2.0 / 3.0) && set.leaf.issuer == issuer => {
                    standing.push(row(&name, Some(&set.leaf), None));
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
                served => {
                    let served = served.ok().map(|set| set.leaf);
                    let renewed = self.authority.issue(&m.request, "own").and_then(|issued| {
                        m.out_dir.write(&PemSet { crl: Some(crl.clone()), ..issued.pem })?;
                        Ok(issued.info)
                    });
                    match renewed {
                        Ok(leaf) => {
                            tracing::info!(identity = %name, serial = %leaf.serial, not_after = %rfc3339(leaf.not_after), dir = %m.out_dir.path().display(), event = "renewed", "rotated");
                            standing.push(row(&name, Some(&leaf), None));
                        }
                        Err(e) => {
                            tracing::error!(identity = %name, reason = %e, event = "failed", "cannot renew this replica's credential: {e}; retrying");
                            standing.push(row(&name, served.as_ref(), Some(e.to_string())));
                        }
                    }
                }
            }
        }
        *self.standing.lock().unwrap_or_else(|e| e.into_inner()) = standing;
    }

    /// The credentials as schedule rows, as the last tick found them (none
    /// before the first tick).
    pub fn rows(&self) -> Vec<ScheduleRow> {
        self.standing.lock().unwrap_or_else(|e| e.into_inner()).clone()
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

/// A credential as a schedule row: served as `leaf` (if any) and renewed
/// at 2/3 of its life, or failing with `error`.
fn row(name: &str, leaf: Option<&CertInfo>, error: Option<String>) -> ScheduleRow {
    ScheduleRow {
        identity: name.to_owned(),
        serial: leaf.map(|l| l.serial.clone()),
        not_after: leaf.map(|l| l.not_after.unix_timestamp()),
        next_renewal: leaf.map_or(0, |l| l.life_point(2.0 / 3.0).unix_timestamp()),
        failures: u32::from(error.is_some()),
        last_error: error,
        ..Default::default()
    }
}
