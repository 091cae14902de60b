//! Control-plane metrics: the counters the service updates, and one
//! `prometheus-client` registry whose collector reads the rest (schedules,
//! CA certificates, rotation, leadership, ACME) at scrape time.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lanyard_sidecar::metrics::{
    counters, encode_connections, encode_handshakes, gauges, ListenerMetrics, Registry, UNLABELED,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use time::OffsetDateTime;

use super::leader::Leader;
use super::own::OwnCredentials;
use crate::authority::Authority;
use crate::state::{CaCertExpiry, CaState, RotationPhase};
use crate::store::ScheduleRow;

/// Upper bounds of the signing-latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// Counters of the CA service.
#[derive(Debug)]
pub struct CaMetrics {
    /// API and CLI issuances: successes, failures.
    issued: [AtomicU64; 2],
    /// Scheduled rotations: successes, failures.
    renewed: [AtomicU64; 2],
    signing: Histogram,
    /// Whether the scheduler loop is running.
    pub scheduler_running: AtomicBool,
    /// Handshakes of the HTTPS API, by result, reason and key-exchange group.
    pub api_handshakes: Arc<ListenerMetrics>,
    /// Connections of the plain-HTTP listener.
    pub http_connections: Arc<ListenerMetrics>,
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self {
            issued: Default::default(),
            renewed: Default::default(),
            signing: Histogram::new(BUCKETS),
            scheduler_running: AtomicBool::new(false),
            api_handshakes: Arc::default(),
            http_connections: Arc::default(),
        }
    }
}

/// The `result` label of a success or failure count.
fn by_result(counts: &[AtomicU64; 2]) -> [([(&'static str, &'static str); 1], u64); 2] {
    let load = |i: usize| counts[i].load(Ordering::Relaxed);
    [([("result", "success")], load(0)), ([("result", "failure")], load(1))]
}

impl CaMetrics {
    /// Counts an API or CLI issuance.
    pub fn issued(&self, ok: bool) {
        self.issued[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a scheduled rotation.
    pub fn renewed(&self, ok: bool) {
        self.renewed[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one signing's latency.
    pub fn observe_signing(&self, d: Duration) {
        self.signing.observe(d.as_secs_f64());
    }

    /// Writes the issuance counters, per-identity gauges from `schedule`,
    /// and the API's and HTTP listener's families.
    fn encode(&self, enc: &mut DescriptorEncoder, schedule: &[ScheduleRow]) -> fmt::Result {
        counters(enc, "issued", "Certificates issued through the API or CLI, by result.", by_result(&self.issued))?;
        counters(enc, "renewed", "Scheduled rotations of managed identities, by result.", by_result(&self.renewed))?;
        let identity = |row: &ScheduleRow| [("identity", row.identity.clone())];
        gauges(
            enc,
            "cert_expiration_timestamp_seconds",
            "notAfter of each managed identity's certificate.",
            schedule.iter().filter_map(|row| Some((identity(row), row.not_after?))),
        )?;
        gauges(
            enc,
            "next_renewal_timestamp_seconds",
            "Next scheduled renewal of each managed identity.",
            schedule.iter().map(|row| (identity(row), row.next_renewal)),
        )?;
        gauges(
            enc,
            "renewal_failures",
            "Consecutive failed renewals of each managed identity.",
            schedule.iter().map(|row| (identity(row), row.failures)),
        )?;
        let api = ("api".to_owned(), self.api_handshakes.clone());
        encode_handshakes(enc, std::slice::from_ref(&api))?;
        encode_connections(enc, &[api, ("http".to_owned(), self.http_connections.clone())])
    }
}

/// Writes the root's and the intermediate's expiry, so that alerting sees a
/// CA certificate's end coming.
fn encode_ca_certificates(enc: &mut DescriptorEncoder, expiry: &[CaCertExpiry], now: OffsetDateTime) -> fmt::Result {
    let role = |e: &CaCertExpiry| [("role", e.role)];
    gauges(
        enc,
        "certificate_expiration_timestamp_seconds",
        "notAfter of the CA's root and intermediate.",
        expiry.iter().map(|e| (role(e), e.not_after.unix_timestamp())),
    )?;
    gauges(
        enc,
        "certificate_seconds_left",
        "Seconds until the CA's root and intermediate expire.",
        expiry.iter().map(|e| (role(e), (e.not_after - now).whole_seconds())),
    )?;
    gauges(
        enc,
        "certificate_alarm",
        "1 from 2/3 of a CA certificate's life on: nothing renews it.",
        expiry.iter().map(|e| (role(e), i64::from(e.alarm.is_some()))),
    )
}

/// Writes the root rotation's phase, and during one the known sidecars by
/// whether they serve the new root.
fn encode_root_rotation(enc: &mut DescriptorEncoder, ca: &CaState) -> fmt::Result {
    let phase = match ca.rotation().map(|r| r.phase) {
        None => 0,
        Some(RotationPhase::Started) => 1,
        Some(RotationPhase::Finished) => 2,
    };
    gauges(
        enc,
        "root_rotation_phase",
        "0: no root rotation; 1: started; 2: finished, old root still in the bundles.",
        [(UNLABELED, phase)],
    )?;
    let reports = ca.rotation().and_then(|r| Some((r, crate::rotation::SidecarReports::read(ca.dir()).ok()??)));
    let (total, lacking) =
        reports.map_or((0, 0), |(r, reports)| (reports.sidecars.len(), reports.lacking(&r.new_root).count()));
    gauges(
        enc,
        "root_rotation_sidecars",
        "Known sidecars during a root rotation, by whether they serve the new root.",
        [([("state", "new_root")], total - lacking), ([("state", "lacking")], lacking)],
    )
}

/// Writes whether this replica leads, lease changes, and the store's
/// latency and errors as the lease loop sees them.
fn encode_leadership(enc: &mut DescriptorEncoder, leader: &Leader) -> fmt::Result {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    gauges(
        enc,
        "leader",
        "1 while this replica holds the lease and runs rotation, ACME and discovery.",
        [(UNLABELED, i64::from(leader.is_leader()))],
    )?;
    counters(
        enc,
        "lease_changes",
        "Times this replica became leader or stopped being it.",
        [(UNLABELED, load(&leader.stats.changes))],
    )?;
    counters(
        enc,
        "store_errors",
        "Failed store calls of the lease loop (the store unreachable).",
        [(UNLABELED, load(&leader.stats.errors))],
    )?;
    gauges(
        enc,
        "store_latency_seconds",
        "Round trip of the last lease call to the store.",
        [(UNLABELED, load(&leader.stats.last_latency_us) as f64 / 1e6)],
    )
}

/// What the collector reads at scrape time.
pub struct ServiceMetrics {
    /// The CA, its state and its store's schedules.
    pub authority: Arc<Authority>,
    /// This replica's own identities' schedule rows.
    pub own: Arc<OwnCredentials>,
    /// Leadership and the lease loop's view of the store.
    pub leader: Leader,
    /// Public certificates.
    pub acme: Arc<crate::acme::Acme>,
    /// The ACME server, if configured.
    pub acme_server: Option<Arc<crate::acme_server::AcmeServer>>,
    /// On-demand certificates, if configured.
    pub on_demand: Option<Arc<crate::acme::OnDemand>>,
    /// The service's counters.
    pub counters: Arc<CaMetrics>,
}

impl fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceMetrics").field("counters", &self.counters).finish_non_exhaustive()
    }
}

impl ServiceMetrics {
    /// The CA's one registry: the signing histogram and this collector.
    pub fn registry(self) -> Registry {
        let mut registry = Registry::with_prefix("lanyard_ca");
        registry.register(
            "signing_duration_seconds",
            "Time to issue and sign one certificate",
            self.counters.signing.clone(),
        );
        registry.register_collector(Box::new(self));
        registry
    }
}

impl Collector for ServiceMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let now = OffsetDateTime::now_utc();
        let ca = self.authority.ca();
        let mut rows = self.authority.store().schedules().unwrap_or_else(|e| {
            tracing::warn!("metrics: cannot read the schedules from the store: {e}");
            Vec::new()
        });
        rows.extend(self.own.rows());
        self.counters.encode(&mut enc, &rows)?;
        encode_ca_certificates(&mut enc, &ca.expiry(now), now)?;
        encode_root_rotation(&mut enc, &ca)?;
        encode_leadership(&mut enc, &self.leader)?;
        self.acme.encode_metrics(&mut enc)?;
        if let Some(on_demand) = &self.on_demand {
            on_demand.encode_metrics(&mut enc)?;
        }
        match &self.acme_server {
            Some(server) => server.encode_metrics(&mut enc),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
impl CaMetrics {
    /// Its own families as `/metrics` shows them, without a running service.
    pub(crate) fn exposition(self: &Arc<Self>, schedule: Vec<ScheduleRow>) -> String {
        #[derive(Debug)]
        struct Own(Arc<CaMetrics>, Vec<ScheduleRow>);
        impl Collector for Own {
            fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
                self.0.encode(&mut enc, &self.1)
            }
        }
        let mut registry = Registry::with_prefix("lanyard_ca");
        registry.register("signing_duration_seconds", "Time to issue and sign one certificate", self.signing.clone());
        registry.register_collector(Box::new(Own(self.clone(), schedule)));
        lanyard_sidecar::metrics::exposition(&registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_keep_their_names_label_values_are_escaped_and_latency_is_one_histogram() {
        let metrics = Arc::new(CaMetrics::default());
        metrics.issued(true);
        metrics.renewed(false);
        metrics.observe_signing(Duration::from_micros(700));
        metrics.api_handshakes.reject(lanyard_sidecar::metrics::Rejection::NoCert);
        let row = ScheduleRow {
            identity: "we\"b\\".into(),
            not_after: Some(1_700_000_000),
            next_renewal: 1_690_000_000,
            failures: 2,
            ..ScheduleRow::default()
        };
        let text = metrics.exposition(vec![row]);
        for sample in [
            "lanyard_ca_issued_total{result=\"success\"} 1",
            "lanyard_ca_renewed_total{result=\"failure\"} 1",
            "lanyard_ca_cert_expiration_timestamp_seconds{identity=\"we\\\"b\\\\\"} 1700000000",
            "lanyard_ca_renewal_failures{identity=\"we\\\"b\\\\\"} 2",
            "lanyard_ca_signing_duration_seconds_bucket{le=\"0.0005\"} 0",
            "lanyard_ca_signing_duration_seconds_bucket{le=\"0.001\"} 1",
            "lanyard_ca_signing_duration_seconds_bucket{le=\"+Inf\"} 1",
            "lanyard_ca_signing_duration_seconds_count 1",
            "lanyard_ca_handshakes_total{listener=\"api\",result=\"rejected\",reason=\"no_cert\"} 1",
            "lanyard_ca_active_connections{listener=\"http\"} 0",
            "# TYPE lanyard_ca_signing_duration_seconds histogram",
            "# TYPE lanyard_ca_issued_total counter",
        ] {
            assert!(text.lines().any(|l| l == sample), "no line {sample:?} in:\n{text}");
        }
    }
}
