//! Leadership among `ca serve` replicas sharing a store. Exactly one runs
//! the rotation scheduler, the ACME order loop, the CRL distribution and
//! Docker discovery: the one holding the store's lease. Every replica
//! serves the API.
//!
//! The lease is renewed every fifth of its TTL. A leader that has not
//! renewed for half the TTL steps down: the lease can only be taken over
//! once it has lapsed, a whole TTL after the last renewal, so two leaders
//! never act at once. Writes only the leader may make carry the lease's
//! fencing token, and the store refuses a stale one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{Fence, Store};

/// What the lease loop reports, for `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Times this replica became leader or stopped being it.
    pub changes: AtomicU64,
    /// Failed lease calls (the store unreachable).
    pub errors: AtomicU64,
    /// Round trip of the last lease call, in microseconds.
    pub last_latency_us: AtomicU64,
}

/// A replica's view of who leads.
#[derive(Clone)]
pub struct Leader {
    rx: watch::Receiver<Option<Fence>>,
    /// This replica's name in the lease.
    pub holder: String,
    /// Counters of the lease loop.
    pub stats: Arc<LeaseStats>,
}

impl Leader {
    /// The fence to write with while this replica leads.
    pub fn fence(&self) -> Option<Fence> {
        self.rx.borrow().clone()
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Waits until this replica leads; false when `stop` turned true first.
    pub async fn wait_until_leading(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            r = self.rx.wait_for(|f| f.is_some()) => r.is_ok(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// A leader that never changes (tests, and the embedded store's one process).
    pub fn fixed(fence: Option<Fence>) -> Self {
        let (_tx, rx) = watch::channel(fence);
        Self { rx, holder: "fixed".into(), stats: Arc::default() }
    }
}

/// A name for this replica in the lease: host, process and a random part.
pub fn holder_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let mut r = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut r);
    format!(
        "{}-{}-{}",
        if host.is_empty() { "ca" } else { &host },
        std::process::id(),
        lanyard_sidecar::certinfo::hex(&r)
    )
}

/// Takes the first lease decision, then keeps the lease (or waits for it)
/// until `stop`; returns this replica's view of who leads.
pub async fn start(store: Arc<dyn Store>, ttl: Duration, mut stop: watch::Receiver<bool>) -> Leader {
    let holder = holder_name();
    let stats = Arc::new(LeaseStats::default());
    let (tx, rx) = watch::channel(None);
    let leader = Leader { rx, holder: holder.clone(), stats: stats.clone() };
    let mut last_renewal = None::<Instant>;
    attempt(&store, &holder, ttl, &tx, &stats, &mut last_renewal).await;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(ttl / 5) => {}
            }
            attempt(&store, &holder, ttl, &tx, &stats, &mut last_renewal).await;
        }
        if tx.borrow().is_some() {
            let (store, name) = (store.clone(), holder.clone());
            let _ = tokio::task::spawn_blocking(move || store.release(&name)).await;
            tracing::info!(%holder, "gave up the lease on shutdown");
        }
    });
    leader
}

async fn attempt(
    store: &Arc<dyn Store>,
    holder: &str,
    ttl: Duration,
    tx: &watch::Sender<Option<Fence>>,
    stats: &LeaseStats,
    last_renewal: &mut Option<Instant>,
) {
    let started = Instant::now();
    let (s, h) = (store.clone(), holder.to_owned());
    let outcome = tokio::task::spawn_blocking(move || s.lease(&h, ttl)).await.unwrap_or_else(|e| {
        Err(crate::store::StoreError::Corrupt { key: "leader".into(), what: format!("lease task failed: {e}") })
    });
    stats.last_latency_us.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    let was = tx.borrow().clone();
    let now_leading = match outcome {
        Ok(Some(token)) => {
            *last_renewal = Some(started);
            Some(Fence { holder: holder.to_owned(), token })
        }
        Ok(None) => None,
        Err(e) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            match (&was, *last_renewal) {
                // Still inside the safe half of the lease: keep leading.
                (Some(_), Some(at)) if at.elapsed() < ttl / 2 => {
                    tracing::warn!(%holder, "cannot renew the lease ({e}); still leading for now");
                    return;
                }
                (Some(f), _) => {
                    tracing::error!(%holder, token = f.token, "stepping down: the lease could not be renewed for half its TTL ({e})");
                    None
                }
                (None, _) => {
                    tracing::warn!(%holder, "cannot reach the store for the lease: {e}");
                    None
                }
            }
        }
    };
    if now_leading != was {
        stats.changes.fetch_add(1, Ordering::Relaxed);
        match &now_leading {
            Some(f) => tracing::info!(%holder, token = f.token, "became leader"),
            None => tracing::info!(%holder, "following: another replica leads"),
        }
        let _ = tx.send(now_leading);
    }
}
