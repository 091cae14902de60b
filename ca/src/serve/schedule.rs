//! Rotation of managed identities: each cert dir is re-issued at 2/3 of its
//! certificate's life (with jitter, a new key every time), failures back off
//! exponentially, and the schedule lives in the store so a restart neither
//! re-issues nor misses anything. The CRL is distributed with every set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lanyard_sidecar::certdir::{CertDir, PemSet};
use lanyard_sidecar::certinfo::{rfc3339, CertInfo};
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};

use crate::authority::Authority;
use crate::issue::{KeySource, LeafRequest};
use crate::keys::KeyType;
use crate::serve::leader::Leader;
use crate::serve::metrics::CaMetrics;
use crate::state::RotationPhase;
use crate::store::Fence;
use crate::store::ScheduleRow;
use crate::CaError;

pub use lanyard_sidecar::renewal::{backoff, renewal_point, unit_random, MAX_BACKOFF};

/// One identity whose cert dir the CA keeps current.
#[derive(Clone, Debug, PartialEq)]
pub struct Managed {
    /// The issuance template (the key is always fresh).
    pub request: LeafRequest,
    /// Where the set is written.
    pub out_dir: CertDir,
}

impl Managed {
    /// The identity name.
    pub fn name(&self) -> String {
        self.request.name.to_string()
    }
}

/// How often the loop looks for an intermediate installed by another process.
const STATE_CHECK: time::Duration = time::Duration::seconds(10);

/// How long the old root stays in the bundles after its last leaf is gone.
const DROP_GRACE: time::Duration = time::Duration::seconds(10);

/// Runs after a successful rotation, with the identity name.
pub type RotateHook = Box<dyn Fn(&str) + Send + Sync>;

/// Keeps managed cert dirs current.
pub struct Scheduler {
    authority: Arc<Authority>,
    identities: RwLock<BTreeMap<String, Managed>>,
    crl: Mutex<String>,
    kick: Notify,
    metrics: Arc<CaMetrics>,
    /// Called with the identity name after each successful rotation.
    on_rotate: Mutex<Vec<RotateHook>>,
    /// Since when no live leaf needs the old root (after a root rotation's finish).
    old_root_free_since: Mutex<Option<OffsetDateTime>>,
    /// Whether this replica leads: only the leader rotates and writes cert dirs.
    leader: Leader,
    /// Held while a cert dir is rewritten, so a CRL refresh never puts back
    /// a set that a rotation just replaced.
    dir_writes: Mutex<()>,
}

impl Scheduler {
    /// A scheduler for `authority` that acts while `leader` leads; add
    /// identities with [`Scheduler::upsert`].
    pub fn new(authority: Arc<Authority>, metrics: Arc<CaMetrics>, leader: Leader) -> Result<Arc<Self>, CaError> {
        let crl = authority.crl_pem(OffsetDateTime::now_utc())?;
        Ok(Arc::new(Self {
            authority,
            identities: RwLock::default(),
            crl: Mutex::new(crl),
            kick: Notify::new(),
            metrics,
            on_rotate: Mutex::default(),
            old_root_free_since: Mutex::default(),
            leader,
            dir_writes: Mutex::default(),
        }))
    }

    /// Registers a hook run after every successful rotation.
    pub fn on_rotate(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.on_rotate.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(hook));
    }

    /// The managed identities.
    pub fn identities(&self) -> Vec<Managed> {
        self.identities.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The current CRL (PEM).
    pub fn crl(&self) -> String {
        self.crl.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds or replaces a managed identity and plans its first issue.
    /// Re-adding an unchanged identity changes nothing.
    pub fn upsert(&self, managed: Managed) -> Result<(), CaError> {
        let name = managed.name();
        if self.identities.read().unwrap_or_else(|e| e.into_inner()).get(&name) == Some(&managed) {
            return Ok(());
        }
        // A follower only plans identities the leader has not planned yet.
        if self.leader.is_leader() || self.authority.store().schedule(&name)?.is_none() {
            let row = self.plan(&managed)?;
            self.authority.store().put_schedule(&row, None)?;
        }
        self.identities.write().unwrap_or_else(|e| e.into_inner()).insert(name, managed);
        self.kick.notify_one();
        Ok(())
    }

    /// Stops managing an identity (its cert dir is left as it is).
    pub fn remove(&self, name: &str) -> Result<(), CaError> {
        let mut ids = self.identities.write().unwrap_or_else(|e| e.into_inner());
        ids.remove(name);
        let names: Vec<String> = ids.keys().cloned().collect();
        self.authority.store().retain_schedule(&names)?;
        Ok(())
    }

    /// Forgets stored schedules of identities no longer configured.
    pub fn prune(&self) -> Result<(), CaError> {
        let names: Vec<String> = self.identities.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        Ok(self.authority.store().retain_schedule(&names)?)
    }

    /// Works out when `m` is next due from its cert dir and stored schedule.
    fn plan(&self, m: &Managed) -> Result<ScheduleRow, CaError> {
        let now = OffsetDateTime::now_utc();
        let stored = self.authority.store().schedule(&m.name())?;
        let current = m.out_dir.load(now).ok().map(|set| set.leaf);
        let mut row = stored.clone().unwrap_or_else(|| ScheduleRow { identity: m.name(), ..Default::default() });
        match &current {
            Some(leaf) if self.matches(m, leaf) => {
                if row.serial.as_deref() != Some(leaf.serial.as_str()) {
                    row.sans = Some(sans_of(leaf));
                    row.serial = Some(leaf.serial.clone());
                    row.not_after = Some(leaf.not_after.unix_timestamp());
                    row.next_renewal = renewal_point(leaf.not_before, leaf.not_after).unix_timestamp();
                }
            }
            _ => {
                // Missing, invalid or for other names: issue now, unless backing off.
                if row.failures == 0 || row.next_renewal <= now.unix_timestamp() {
                    row.next_renewal = now.unix_timestamp();
                }
            }
        }
        Ok(row)
    }

    /// Whether the served leaf carries the identity's names.
    fn matches(&self, m: &Managed, leaf: &CertInfo) -> bool {
        m.request.dns_names().iter().all(|d| leaf.dns.contains(&d.to_string()))
            && m.request.ips.iter().all(|ip| leaf.ips.contains(ip))
    }

    /// Issues a new set for `m` and writes it; never touches the dir on failure.
    fn rotate(&self, m: &Managed) -> Result<CertInfo, CaError> {
        let started = std::time::Instant::now();
        let issued = self.authority.issue(&m.request, "managed")?;
        self.metrics.observe_signing(started.elapsed());
        let set = PemSet { crl: Some(self.crl()), ..issued.pem };
        let _writing = self.dir_writes.lock().unwrap_or_else(|e| e.into_inner());
        m.out_dir.write(&set)?;
        Ok(issued.info)
    }

    /// Renews every identity that is due, writing the schedule with
    /// `fence`; returns when the next one is due.
    fn run_due(&self, fence: &Fence) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        let mut next = now + time::Duration::minutes(5);
        // One read of the whole schedule (a few MGETs on Redis, not a round
        // trip per identity every STATE_CHECK); a due row is read again
        // before it is acted on, as another replica may have changed it.
        let due: std::collections::HashMap<String, i64> = match self.authority.store().schedules() {
            Ok(rows) => rows.into_iter().map(|r| (r.identity, r.next_renewal)).collect(),
            Err(e) => {
                tracing::error!("cannot read the schedule: {e}; retrying in {STATE_CHECK}");
                return now + STATE_CHECK;
            }
        };
        for m in self.identities() {
            let name = m.name();
            match due.get(&name) {
                None => continue,
                Some(&at) if at > now.unix_timestamp() => {
                    next = next.min(OffsetDateTime::from_unix_timestamp(at).unwrap_or(next));
                    continue;
                }
                Some(_) => {}
            }
            let Ok(Some(mut row)) = self.authority.store().schedule(&name) else { continue };
            if row.next_renewal > now.unix_timestamp() {
                next = next.min(OffsetDateTime::from_unix_timestamp(row.next_renewal).unwrap_or(next));
                continue;
            }
            match self.rotate(&m) {
                Ok(leaf) => {
                    let event = if row.serial.is_some() { "renewed" } else { "issued" };
                    tracing::info!(identity = %name, serial = %leaf.serial, not_after = %rfc3339(leaf.not_after), dir = %m.out_dir.path().display(), event, "rotated");
                    row.serial = Some(leaf.serial.clone());
                    row.sans = Some(sans_of(&leaf));
                    row.not_after = Some(leaf.not_after.unix_timestamp());
                    row.next_renewal = renewal_point(leaf.not_before, leaf.not_after).unix_timestamp();
                    row.last_renewal = Some(now.unix_timestamp());
                    row.last_error = None;
                    row.failures = 0;
                    self.metrics.renewed(true);
                    for hook in self.on_rotate.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                        hook(&name);
                    }
                }
                Err(e) => {
                    row.failures += 1;
                    let wait = backoff(row.failures);
                    row.next_renewal = (now + wait).unix_timestamp();
                    tracing::error!(identity = %name, failures = row.failures, retry_in = ?wait, reason = %e, event = "failed", "rotation failed: {e}");
                    row.last_error = Some(e.to_string());
                    self.metrics.renewed(false);
                }
            }
            match self.authority.store().put_schedule(&row, Some(fence)) {
                Ok(()) => {}
                Err(e @ crate::store::StoreError::Fenced(_)) => {
                    tracing::error!(identity = %name, "{e}; this replica stops rotating");
                    return now;
                }
                Err(e) => tracing::error!(identity = %name, "cannot save the schedule: {e}"),
            }
            next = next.min(OffsetDateTime::from_unix_timestamp(row.next_renewal).unwrap_or(next));
        }
        next
    }

    /// Re-signs the CRL (served at `/v1/crl` and kept in `STATE/crl.pem`)
    /// and, on the leader, rewrites it with the CA's trust bundle into every
    /// managed cert dir.
    pub fn refresh_crl(&self) -> Result<(), CaError> {
        let crl = self.authority.crl_pem(OffsetDateTime::now_utc())?;
        let bundle = self.authority.ca().bundle_pem().to_owned();
        *self.crl.lock().unwrap_or_else(|e| e.into_inner()) = crl.clone();
        std::fs::write(self.authority.ca().dir().join("crl.pem"), &crl)
            .map_err(|source| CaError::WriteState { path: self.authority.ca().dir().join("crl.pem"), source })?;
        if !self.leader.is_leader() {
            return Ok(());
        }
        let _writing = self.dir_writes.lock().unwrap_or_else(|e| e.into_inner());
        for m in self.identities() {
            let Ok(raw) = m.out_dir.read_raw() else { continue };
            let (Ok(cert), Some(Ok(key))) = (String::from_utf8(raw.cert), raw.key.map(String::from_utf8)) else {
                continue;
            };
            if let Err(e) =
                m.out_dir.write(&PemSet { cert, key: Some(key), ca: bundle.clone(), crl: Some(crl.clone()) })
            {
                tracing::error!(identity = %m.name(), "cannot write the CRL: {e}");
            }
        }
        Ok(())
    }

    /// Makes every managed identity currently serving one of `serials` due now.
    pub fn reissue_if_serving(&self, serials: &[String]) -> Result<(), CaError> {
        let store = self.authority.store();
        for mut row in store.schedules()? {
            if row.serial.as_ref().is_some_and(|s| serials.contains(s)) {
                row.next_renewal = OffsetDateTime::now_utc().unix_timestamp();
                store.put_schedule(&row, None)?;
            }
        }
        self.kick();
        Ok(())
    }

    /// Keeps the CA itself current; returns when to look again.
    /// - The intermediate rolls over when it is due (at 2/3 of its life,
    ///   root key online). The root is unchanged, so no bundle changes.
    /// - A change made on disk by another process is loaded: an
    ///   intermediate installed by `ca intermediate roll` (offline root), or
    ///   a step of `ca root rotate`.
    /// - After `ca root rotate finish`, the old root is dropped once no
    ///   live leaf needs it.
    ///
    /// Whenever the CA changes, the CRLs and the trust bundle reach every
    /// cert dir first. When the issuing intermediate changed, every identity
    /// is then re-issued from it: at once after a rollover, spread over the
    /// rotation's window after `finish`.
    pub fn keep_ca_current(&self, fence: &Fence) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc();
        let look_again = now + STATE_CHECK;
        self.sync_from_store();
        let before = self.authority.ca();
        if before.rotation().is_some_and(|r| r.phase == RotationPhase::Finished) {
            self.drop_old_root_when_free(&before, now);
        }
        let changed = match self.authority.reload_if_changed() {
            Ok(Some(ca)) => Ok(ca),
            Ok(None) => match before.rollover_at() {
                Some(due) if now >= due => self.authority.roll_intermediate(now),
                due => {
                    let look_again = match before.rotation() {
                        Some(r) if r.phase == RotationPhase::Finished => now + DROP_GRACE / 2,
                        _ => look_again,
                    };
                    return due.map_or(look_again, |due| due.min(look_again));
                }
            },
            Err(e) => Err(e),
        };
        let ca = match changed {
            Ok(ca) => ca,
            Err(e) => {
                tracing::error!("updating the CA failed: {e}; retrying in {STATE_CHECK}");
                return look_again;
            }
        };
        if ca.bundle_pem() != before.bundle_pem() {
            tracing::info!(roots = ca.bundle_pem().matches("BEGIN CERTIFICATE").count(), "trust bundle changed");
        }
        if self.authority.store().backend() != "sqlite" {
            if let Err(e) = crate::mirror::push(ca.dir(), self.authority.store().as_ref()) {
                tracing::error!("cannot publish the CA's files to the store: {e}");
            }
        }
        if let Err(e) = self.refresh_crl() {
            tracing::error!("CRL and bundle refresh after the CA changed failed: {e}");
        }
        let (old, new) = (&before.intermediate().serial, &ca.intermediate().serial);
        if old != new {
            tracing::info!(identity = "intermediate", serial = %new, not_after = %rfc3339(ca.intermediate().not_after), old = %old, root = %ca.root().sha256, event = "rotated", "intermediate rolled over");
            let spread =
                ca.rotation().filter(|r| r.phase == RotationPhase::Finished).map_or(0, |r| r.reissue_window_secs);
            let store = self.authority.store();
            for mut row in store.schedules().unwrap_or_default() {
                row.next_renewal = now.unix_timestamp() + (spread as f64 * unit_random()) as i64;
                if let Err(e) = store.put_schedule(&row, Some(fence)) {
                    tracing::error!(identity = %row.identity, "cannot plan the re-issue: {e}");
                }
            }
        }
        now
    }

    /// With a shared store, makes this replica's state directory a copy of
    /// the store's CA when that changed (another replica rolled it over, or
    /// `ca root rotate` ran elsewhere), and loads it.
    pub fn sync_from_store(&self) {
        let store = self.authority.store();
        if store.backend() == "sqlite" {
            return;
        }
        let dir = self.authority.ca().dir().to_owned();
        match crate::mirror::differs(&dir, store.as_ref()) {
            Ok(false) => {}
            Ok(true) => {
                match crate::mirror::pull(&dir, store.as_ref()).and_then(|_| self.authority.reload_if_changed()) {
                    Ok(Some(ca)) => {
                        tracing::info!(intermediate = %ca.intermediate().serial, root = %ca.root().sha256, "loaded the CA from the store")
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!("cannot load the CA from the store: {e}"),
                }
            }
            Err(e) => tracing::warn!("cannot compare the CA with the store's: {e}"),
        }
    }

    /// Drops the old root from the bundles once no live leaf has needed it
    /// for [`DROP_GRACE`]: the sidecars have then loaded their new leaves,
    /// so none still presents one that only the old root verifies.
    fn drop_old_root_when_free(&self, ca: &crate::state::CaState, now: OffsetDateTime) {
        let mut free_since = self.old_root_free_since.lock().unwrap_or_else(|e| e.into_inner());
        match crate::rotation::old_leaves(ca, self.authority.store().as_ref(), now) {
            Ok(old) if old.is_empty() => {
                let since = *free_since.get_or_insert(now);
                if now - since < DROP_GRACE {
                    return;
                }
                match crate::rotation::complete(ca) {
                    Ok(_) => {
                        *free_since = None;
                        tracing::info!(identity = "root", root = %ca.root().sha256, event = "rotated", "root rotation complete: no live leaf under the old root is left, so it leaves the trust bundles");
                    }
                    Err(e) => tracing::error!("cannot drop the old root: {e}"),
                }
            }
            Ok(_) => *free_since = None,
            Err(e) => tracing::error!("cannot count the leaves under the old root: {e}"),
        }
    }

    /// Wakes the loop (after a revocation or a new identity).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Runs until `stop` turns true: the rotation loop while this replica
    /// leads; while it follows, only the in-memory CRL is kept fresh (every
    /// replica serves `/v1/crl`).
    pub async fn run(self: Arc<Self>, crl_refresh: Duration, mut stop: watch::Receiver<bool>) {
        let mut crl_due = tokio::time::Instant::now() + crl_refresh;
        loop {
            let Some(fence) = self.leader.fence() else {
                self.metrics.scheduler_running.store(false, std::sync::atomic::Ordering::Relaxed);
                let this = self.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || {
                    this.sync_from_store();
                    this.refresh_crl()
                })
                .await
                {
                    tracing::warn!("CRL refresh failed: {e}");
                }
                let (mut leader, mut until_stop) = (self.leader.clone(), stop.clone());
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = leader.wait_until_leading(&mut until_stop) => {}
                    _ = tokio::time::sleep(STATE_CHECK.try_into().unwrap_or(Duration::from_secs(10))) => {}
                }
                continue;
            };
            self.metrics.scheduler_running.store(true, std::sync::atomic::Ordering::Relaxed);
            let (this, f) = (self.clone(), fence.clone());
            let rollover = tokio::task::spawn_blocking(move || this.keep_ca_current(&f)).await.ok();
            let this = self.clone();
            let next = tokio::task::spawn_blocking(move || this.run_due(&fence))
                .await
                .unwrap_or_else(|_| OffsetDateTime::now_utc());
            let next = rollover.map_or(next, |r| next.min(r));
            if tokio::time::Instant::now() >= crl_due {
                let this = self.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || this.refresh_crl()).await {
                    tracing::error!("CRL refresh failed: {e}");
                }
                crl_due = tokio::time::Instant::now() + crl_refresh;
            }
            // Another replica may change the schedule (a revocation through
            // its API): look at the store again at least every STATE_CHECK.
            let next = next.min(OffsetDateTime::now_utc() + STATE_CHECK);
            let wait = (next - OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO);
            let deadline = (tokio::time::Instant::now() + wait).min(crl_due);
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
        self.metrics.scheduler_running.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The issuance template of a configured identity.
pub fn managed_from_config(c: &crate::serve::config::IdentityConfig) -> Managed {
    Managed {
        request: LeafRequest {
            name: c.name.clone(),
            dns: (!c.dns.is_empty()).then(|| c.dns.clone()),
            ips: c.ip.clone(),
            spiffe: c.spiffe.clone(),
            ttl: c.ttl,
            key: KeySource::Generate(KeyType::EcdsaP256),
        },
        out_dir: CertDir::new(&c.out_dir),
    }
}

/// `URI:...,DNS:...,IP:...` of a leaf.
pub fn sans_of(leaf: &CertInfo) -> String {
    let uris = leaf.uris.iter().map(|u| format!("URI:{u}"));
    let dns = leaf.dns.iter().map(|d| format!("DNS:{d}"));
    let ips = leaf.ips.iter().map(|i| format!("IP:{i}"));
    uris.chain(dns).chain(ips).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::KeySource;
    use crate::keys::KeyType;
    use crate::state::{CaState, InitOptions};
    use crate::store::{SqliteStore, Store};

    /// A CA in `dir` and a scheduler that leads (SQLite's lease is always
    /// this replica's).
    fn scheduler(dir: &std::path::Path) -> (Arc<Scheduler>, Fence) {
        CaState::init(dir, &InitOptions::new("td.test".parse().unwrap())).unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir).unwrap());
        let token = store.lease("test", std::time::Duration::from_secs(60)).unwrap().unwrap();
        let fence = Fence { holder: "test".into(), token };
        let authority = Arc::new(Authority::open_with(dir, store).unwrap());
        let leader = Leader::fixed(Some(fence.clone()));
        (Scheduler::new(authority, Arc::default(), leader).unwrap(), fence)
    }

    fn managed(name: &str, out_dir: &std::path::Path, ttl: &str) -> Managed {
        Managed {
            request: LeafRequest {
                name: name.parse().unwrap(),
                dns: None,
                ips: Vec::new(),
                spiffe: None,
                ttl: ttl.parse().unwrap(),
                key: KeySource::Generate(KeyType::EcdsaP256),
            },
            out_dir: CertDir::new(out_dir),
        }
    }

    fn row(s: &Scheduler, name: &str) -> ScheduleRow {
        s.authority.store().schedule(name).unwrap().unwrap()
    }

    #[test]
    fn a_new_identity_is_due_now_and_renewed_at_two_thirds_of_its_life() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, fence) = scheduler(&tmp.path().join("state"));
        let before = OffsetDateTime::now_utc().unix_timestamp();
        s.upsert(managed("api", &tmp.path().join("api"), "1h")).unwrap();
        let planned = row(&s, "api");
        assert!(planned.serial.is_none() && (before..=before + 1).contains(&planned.next_renewal), "{planned:?}");

        s.run_due(&fence);
        let issued = row(&s, "api");
        let leaf = CertDir::new(tmp.path().join("api")).load(OffsetDateTime::now_utc()).unwrap().leaf;
        assert_eq!(issued.serial.as_deref(), Some(leaf.serial.as_str()));
        // At 2/3 of the life, less up to 5 % of it (jitter, so a fleet
        // issued at once does not renew at once).
        let life = (leaf.not_after - leaf.not_before).whole_seconds();
        let at = issued.next_renewal - leaf.not_before.unix_timestamp();
        assert!((life * 2 / 3 - life / 20 - 1..=life * 2 / 3 + 1).contains(&at), "renews at {at} s of {life} s");
        assert_eq!((issued.failures, issued.last_error.as_deref()), (0, None));

        // Not due: nothing changes.
        s.run_due(&fence);
        assert_eq!(row(&s, "api"), issued);
    }

    #[test]
    fn a_restart_keeps_a_served_certificate_and_its_plan() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let (s, fence) = scheduler(&state);
        s.upsert(managed("api", &tmp.path().join("api"), "1h")).unwrap();
        s.run_due(&fence);
        let served = row(&s, "api");
        drop(s);
        // A new scheduler over the same store and cert dir plans the same
        // renewal rather than issuing again.
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&state).unwrap());
        let authority = Arc::new(Authority::open_with(&state, store).unwrap());
        let again = Scheduler::new(authority, Arc::default(), Leader::fixed(Some(fence))).unwrap();
        again.upsert(managed("api", &tmp.path().join("api"), "1h")).unwrap();
        assert_eq!(row(&again, "api"), served);
        // A cert dir that lacks the identity's names is issued again now.
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut renamed = managed("api", &tmp.path().join("api"), "1h");
        renamed.request.dns = Some(vec!["api".parse().unwrap(), "api.td.test".parse().unwrap()]);
        again.upsert(renamed).unwrap();
        assert!(row(&again, "api").next_renewal <= now + 1);
    }

    #[test]
    fn a_failed_rotation_is_counted_backed_off_and_keeps_the_served_set() {
        let tmp = tempfile::tempdir().unwrap();
        let (s, fence) = scheduler(&tmp.path().join("state"));
        // The cert dir's parent is a file: every write fails.
        std::fs::write(tmp.path().join("blocked"), "").unwrap();
        s.upsert(managed("api", &tmp.path().join("blocked/api"), "1h")).unwrap();
        let started = OffsetDateTime::now_utc().unix_timestamp();
        s.run_due(&fence);
        let first = row(&s, "api");
        assert_eq!(first.failures, 1);
        assert!(first.last_error.as_deref().is_some_and(|e| e.contains("blocked")), "{first:?}");
        // The first retry waits about 2 s (1 << 1, with ±10 % jitter).
        assert!((started + 1..=started + 3).contains(&first.next_renewal), "{first:?}");
        assert!(s.metrics.exposition(Vec::new()).contains("lanyard_ca_renewed_total{result=\"failure\"} 1"));
        // Not due yet: no second attempt.
        s.run_due(&fence);
        assert_eq!(row(&s, "api").failures, 1);
    }
}
