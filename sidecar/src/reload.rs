//! Hot reload: watch a cert dir, validate each new set, and publish it as an
//! immutable snapshot. A bad set never replaces the last good one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::certdir::{CertDir, CertSet};
use crate::metrics::ReloadMetrics;

/// Quiet time after the last file event before a reload.
const DEBOUNCE: Duration = Duration::from_millis(25);
/// Fallback poll, for file systems whose events get lost.
const POLL: Duration = Duration::from_secs(1);

/// One published, validated certificate set.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated set.
    pub set: CertSet,
    /// Increases with every publication.
    pub generation: u64,
}

/// What a listener builds from each snapshot (its TLS configs, a certified
/// key). The reload that validates a set builds these on its blocking
/// thread before it publishes the set, so the accept path only loads an
/// `Arc` and never builds a config.
pub trait Prebuild: Send + Sync {
    /// Builds and keeps what `snapshot` needs.
    fn rebuild(&self, snapshot: &Arc<Snapshot>);
}

/// Watches one cert dir and publishes validated snapshots.
pub struct CertStore {
    dir: CertDir,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    last_raw: Mutex<Option<RawFingerprint>>,
    last_error: Mutex<Option<String>>,
    generation: AtomicU64,
    /// Rebuilt from every snapshot before it is published.
    prebuilt: Mutex<Vec<Weak<dyn Prebuild>>>,
    /// Reload counters.
    pub metrics: ReloadMetrics,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("dir", &self.dir)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, PartialEq, Eq)]
struct RawFingerprint(Vec<u8>, Option<Vec<u8>>, Vec<u8>, Option<Vec<u8>>);

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new set was published.
    Published,
    /// The files did not change.
    Unchanged,
    /// The new set was refused; the last good one stays.
    Rejected,
}

impl CertStore {
    /// A store for `dir`; nothing is loaded yet.
    pub fn new(dir: CertDir) -> Arc<Self> {
        Arc::new(Self {
            dir,
            tx: watch::Sender::new(None),
            last_raw: Mutex::new(None),
            last_error: Mutex::new(None),
            generation: AtomicU64::new(0),
            prebuilt: Mutex::default(),
            metrics: ReloadMetrics::default(),
        })
    }

    /// The watched directory.
    pub fn dir(&self) -> &CertDir {
        &self.dir
    }

    /// The current snapshot, if a valid set was ever loaded.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.tx.borrow().clone()
    }

    /// Has `built` rebuilt from every snapshot from now on, and at once from
    /// the current one. It is held weakly: dropping it detaches it.
    pub fn attach<P: Prebuild + 'static>(&self, built: &Arc<P>) {
        let mut prebuilt = lock(&self.prebuilt);
        if let Some(snapshot) = self.current() {
            built.rebuild(&snapshot);
        }
        let weak: Weak<P> = Arc::downgrade(built);
        prebuilt.push(weak);
    }

    /// Why the last reload failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Reads the dir now and publishes the set if it is new and valid.
    pub fn reload(&self) -> ReloadOutcome {
        let now = OffsetDateTime::now_utc();
        let raw = match self.dir.read_raw() {
            Ok(raw) => raw,
            Err(e) => return self.fail(e.to_string(), None),
        };
        let fingerprint = RawFingerprint(raw.cert.clone(), raw.key.clone(), raw.ca.clone(), raw.crl.clone());
        if lock(&self.last_raw).as_ref() == Some(&fingerprint) {
            return ReloadOutcome::Unchanged;
        }
        self.metrics.last_attempt.store(now.unix_timestamp(), Ordering::Relaxed);
        match raw.validate(now) {
            Ok(set) => {
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(
                    identity = %crate::verify::peer_identity(&set.leaf),
                    serial = %set.leaf.serial,
                    not_after = %crate::certinfo::rfc3339(set.leaf.not_after),
                    dir = %self.dir.path().display(),
                    event = "reloaded",
                    "loaded certificate"
                );
                let snapshot = Arc::new(Snapshot { set, generation });
                {
                    let mut prebuilt = lock(&self.prebuilt);
                    prebuilt.retain(|b| b.upgrade().inspect(|b| b.rebuild(&snapshot)).is_some());
                    self.tx.send_replace(Some(snapshot));
                }
                *lock(&self.last_raw) = Some(fingerprint);
                *lock(&self.last_error) = None;
                self.metrics.ok.fetch_add(1, Ordering::Relaxed);
                self.metrics.last_success.store(now.unix_timestamp(), Ordering::Relaxed);
                ReloadOutcome::Published
            }
            Err(e) => self.fail(e.to_string(), Some(fingerprint)),
        }
    }

    fn fail(&self, error: String, fingerprint: Option<RawFingerprint>) -> ReloadOutcome {
        let mut last = lock(&self.last_error);
        if last.as_deref() != Some(error.as_str()) {
            let keeping = match self.current() {
                Some(s) => format!("keeping serial {}", s.set.leaf.serial),
                None => "no valid certificate yet; not ready".into(),
            };
            tracing::error!(dir = %self.dir.path().display(), reason = %error, event = "refused", "certificate reload failed: {error} ({keeping})");
            self.metrics.failed.fetch_add(1, Ordering::Relaxed);
            self.metrics.last_attempt.store(OffsetDateTime::now_utc().unix_timestamp(), Ordering::Relaxed);
            *last = Some(error);
        }
        // Remember the bad bytes so the same bad set is not re-parsed on every poll,
        // but forget the good fingerprint so restoring the old files reloads them.
        *lock(&self.last_raw) = fingerprint;
        ReloadOutcome::Rejected
    }

    /// Spawns [`CertStore::watch`] until `stop` turns true.
    pub fn spawn_watch(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().watch(async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    }

    /// Watches the directory until `shutdown` resolves: file events
    /// (debounced) and a slow poll both trigger [`CertStore::reload`].
    pub async fn watch(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let dir = self.dir.path().to_owned();
        watch_tree(&dir, POLL, shutdown, move |_| {
            let _ = self.reload();
        })
        .await;
    }
}

/// Watches the tree at `root` until `shutdown` resolves and calls
/// `changed` (off the async runtime) with the paths that changed after
/// each debounced burst of file events, and with none every `poll`.
/// Until `root` exists, its nearest existing ancestor is watched, so that
/// the first files are seen at once, not at the next poll.
pub async fn watch_tree(
    root: &std::path::Path,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()>,
    changed: impl Fn(&[std::path::PathBuf]) + Send + Sync + 'static,
) {
    let changed = Arc::new(changed);
    let call = |paths: Vec<std::path::PathBuf>| {
        let changed = changed.clone();
        tokio::task::spawn_blocking(move || changed(&paths))
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<std::path::PathBuf>>();
    let mut watcher: Option<notify::RecommendedWatcher> = None;
    let mut on_ancestor = false;
    let mut watched = std::path::PathBuf::new();
    let nearest = |p: &std::path::Path| p.ancestors().find(|a| a.is_dir()).map(std::path::Path::to_path_buf);
    let mut poll = tokio::time::interval(poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        if watcher.is_none() || (on_ancestor && nearest(root).is_some_and(|n| n != watched)) {
            let was_on_ancestor = on_ancestor;
            (watcher, on_ancestor) = match start_watcher(root, RecursiveMode::Recursive, tx.clone()) {
                Some(w) => (Some(w), false),
                None => {
                    watched = nearest(root).unwrap_or_default();
                    (start_watcher(&watched, RecursiveMode::NonRecursive, tx.clone()), true)
                }
            };
            if was_on_ancestor && !on_ancestor {
                // Files may have landed while the watch moved: look now.
                let _ = call(Vec::new()).await;
                continue;
            }
        }
        let mut paths = Vec::new();
        tokio::select! {
            _ = &mut shutdown => return,
            _ = poll.tick() => {}
            Some(first) = rx.recv() => {
                paths = first;
                // Debounce: wait for a quiet spell, bounded; but the
                // cert-dir contract's last step, the `..data` swap, means
                // the new set is complete: read it at once.
                let deadline = tokio::time::Instant::now() + DEBOUNCE * 8;
                while !paths.iter().any(|p| crate::certdir::is_generation_swap(p)) {
                    let Ok(Some(more)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await else { break };
                    paths.extend(more);
                    if tokio::time::Instant::now() > deadline {
                        break;
                    }
                }
            }
        }
        let _ = call(paths).await;
    }
}

fn start_watcher(
    dir: &std::path::Path,
    mode: RecursiveMode,
    tx: mpsc::UnboundedSender<Vec<std::path::PathBuf>>,
) -> Option<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            if !event.kind.is_access() {
                let _ = tx.send(event.paths);
            }
        }
    })
    .ok()?;
    watcher.watch(dir, mode).ok()?;
    Some(watcher)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certdir::PemSet;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// Notes the generation of every snapshot it was rebuilt from, and
    /// whether the store had already published it by then.
    struct Recorder {
        store: Arc<CertStore>,
        seen: Mutex<Vec<(u64, bool)>>,
    }

    impl Prebuild for Recorder {
        fn rebuild(&self, snapshot: &Arc<Snapshot>) {
            let published = self.store.current().is_some_and(|c| c.generation == snapshot.generation);
            lock(&self.seen).push((snapshot.generation, published));
        }
    }

    fn leaf_set(ca: &Issuer<'_, KeyPair>, ca_pem: &str, name: &str) -> PemSet {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, ca).unwrap();
        PemSet { cert: cert.pem(), key: Some(key.serialize_pem()), ca: ca_pem.to_owned(), crl: None }
    }

    #[test]
    fn prebuilt_values_are_rebuilt_before_each_publication_and_detach_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = params.self_signed(&ca_key).unwrap().pem();
        let ca = Issuer::new(params, ca_key);
        let certs = CertDir::new(dir.path().join("certs"));
        certs.write(&leaf_set(&ca, &ca_pem, "web")).unwrap();
        let store = CertStore::new(certs.clone());
        assert_eq!(store.reload(), ReloadOutcome::Published);

        let recorder = Arc::new(Recorder { store: store.clone(), seen: Mutex::default() });
        store.attach(&recorder);
        assert_eq!(*lock(&recorder.seen), [(1, true)], "attaching builds from the current snapshot at once");

        certs.write(&leaf_set(&ca, &ca_pem, "web")).unwrap();
        assert_eq!(store.reload(), ReloadOutcome::Published);
        assert_eq!(*lock(&recorder.seen), [(1, true), (2, false)], "built before the snapshot is published");

        drop(recorder);
        certs.write(&leaf_set(&ca, &ca_pem, "web")).unwrap();
        assert_eq!(store.reload(), ReloadOutcome::Published);
        assert!(lock(&store.prebuilt).is_empty(), "a dropped value is detached");
    }
}
