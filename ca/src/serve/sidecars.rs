//! The known sidecars: identities configured with a `sidecar_admin`
//! address. While a root rotation is under way, `ca serve` asks each one's
//! `/readyz` which roots it serves, so `ca root rotate status` can name the
//! ones that lack the new root and `finish` can refuse until none does.

use std::sync::Arc;
use std::time::Duration;

use lanyard_sidecar::admin::Readiness;
use lanyard_sidecar::identity::{PeerId, SpiffeId};
use lanyard_sidecar::tls::{self, ServerCheck};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::authority::Authority;
use crate::rotation::{SidecarReport, SidecarReports};

/// How often the sidecars are asked during a rotation.
const POLL_EVERY: Duration = Duration::from_secs(3);
/// How long one sidecar may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// A sidecar the CA can ask.
#[derive(Clone, Debug)]
pub struct KnownSidecar {
    /// The identity it serves.
    pub identity: String,
    /// The SPIFFE ID its admin certificate must carry.
    pub spiffe: SpiffeId,
    /// `host:port` of its admin endpoint.
    pub admin: String,
}

/// Asks every sidecar which roots it serves, verifying each against the
/// CA's current bundle and its identity.
pub async fn ask(authority: &Authority, sidecars: &[KnownSidecar]) -> SidecarReports {
    let ca = authority.ca();
    let dir = ca.dir().to_owned();
    let roots = lanyard_sidecar::certdir::parse_certs(&dir, ca.bundle_pem().as_bytes()).unwrap_or_default();
    let mut reports = Vec::new();
    for s in sidecars {
        let answer = ask_one(s, &roots).await;
        reports.push(match answer {
            Ok(trust_roots) => {
                SidecarReport { identity: s.identity.clone(), admin: s.admin.clone(), trust_roots, error: None }
            }
            Err(e) => SidecarReport {
                identity: s.identity.clone(),
                admin: s.admin.clone(),
                trust_roots: Vec::new(),
                error: Some(e),
            },
        });
    }
    SidecarReports { checked_at: OffsetDateTime::now_utc().unix_timestamp(), sidecars: reports }
}

async fn ask_one(
    s: &KnownSidecar,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Vec<String>, String> {
    readiness(s, roots).await.map(|(readiness, _)| readiness.trust_roots)
}

/// Asks one sidecar's `/readyz`, verifying its admin certificate against
/// `roots` and its identity; what it answered, and its clock.
pub async fn readiness(
    s: &KnownSidecar,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<(Readiness, Option<OffsetDateTime>), String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| format!("the CA's bundle: {e}"))?;
    }
    let config = tls::client_config_with(store, &ServerCheck::Identity(PeerId::Spiffe(s.spiffe.clone())), None)
        .map_err(|e| e.to_string())?;
    let (host, port) = s.admin.rsplit_once(':').ok_or_else(|| format!("{:?} is not host:port", s.admin))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| format!("{:?} is not host:port", s.admin))?;
    let answer = lanyard_sidecar::health::get(host, port, "/readyz", Arc::new(config), ANSWER_WITHIN)
        .await
        .map_err(|e| e.to_string())?;
    let readiness: Readiness =
        serde_json::from_str(&answer.body).map_err(|e| format!("/readyz did not answer with its JSON ({e})"))?;
    Ok((readiness, answer.date))
}

/// While a rotation is under way, asks the sidecars every few seconds and
/// writes what they said for `ca root rotate status` and `finish`.
pub async fn poll_during_rotation(
    authority: Arc<Authority>,
    sidecars: Vec<KnownSidecar>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let ca = authority.ca();
        if let Some(rotation) = ca.rotation() {
            let reports = ask(&authority, &sidecars).await;
            for s in reports.lacking(&rotation.new_root) {
                tracing::debug!(identity = %s.identity, admin = %s.admin, error = ?s.error, "sidecar lacks the new root");
            }
            if let Err(e) = reports.write(ca.dir()) {
                tracing::error!("cannot write the sidecar reports: {e}");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}
