//! Control-plane metrics, rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lanyard_sidecar::metrics::{header, ListenerMetrics};

use crate::store::ScheduleRow;

/// Upper bounds of the signing-latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// Counters of the CA service.
#[derive(Debug, Default)]
pub struct CaMetrics {
    issued_ok: AtomicU64,
    issued_err: AtomicU64,
    renewed_ok: AtomicU64,
    renewed_err: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Whether the scheduler loop is running.
    pub scheduler_running: AtomicBool,
    /// Handshakes of the HTTPS API, by result, reason and key-exchange group.
    pub api_handshakes: Arc<ListenerMetrics>,
    /// Connections of the plain-HTTP listener.
    pub http_connections: Arc<ListenerMetrics>,
}

impl CaMetrics {
    /// Counts an API or CLI issuance.
    pub fn issued(&self, ok: bool) {
        if ok { &self.issued_ok } else { &self.issued_err }.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a scheduled rotation.
    pub fn renewed(&self, ok: bool) {
        if ok { &self.renewed_ok } else { &self.renewed_err }.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one signing's latency.
    pub fn observe_signing(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Prometheus text, with per-identity gauges from `schedule`.
    pub fn render(&self, schedule: &[ScheduleRow]) -> String {
        let mut out = String::new();
        let p = "lanyard_ca";
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        header(
            &mut out,
            &format!("{p}_issued_total"),
            "counter",
            "Certificates issued through the API or CLI, by result.",
        );
        let _ = writeln!(out, "{p}_issued_total{{result=\"success\"}} {}", load(&self.issued_ok));
        let _ = writeln!(out, "{p}_issued_total{{result=\"failure\"}} {}", load(&self.issued_err));
        header(
            &mut out,
            &format!("{p}_renewed_total"),
            "counter",
            "Scheduled rotations of managed identities, by result.",
        );
        let _ = writeln!(out, "{p}_renewed_total{{result=\"success\"}} {}", load(&self.renewed_ok));
        let _ = writeln!(out, "{p}_renewed_total{{result=\"failure\"}} {}", load(&self.renewed_err));
        header(
            &mut out,
            &format!("{p}_signing_duration_seconds"),
            "histogram",
            "Time to issue and sign one certificate.",
        );
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{p}_signing_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                load(&self.latency_buckets[i])
            );
        }
        let count = load(&self.latency_count);
        let _ = writeln!(out, "{p}_signing_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{p}_signing_duration_seconds_sum {}", load(&self.latency_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "{p}_signing_duration_seconds_count {count}");
        header(
            &mut out,
            &format!("{p}_cert_expiration_timestamp_seconds"),
            "gauge",
            "notAfter of each managed identity's certificate.",
        );
        for row in schedule {
            if let Some(t) = row.not_after {
                let _ = writeln!(out, "{p}_cert_expiration_timestamp_seconds{{identity=\"{}\"}} {t}", row.identity);
            }
        }
        header(
            &mut out,
            &format!("{p}_next_renewal_timestamp_seconds"),
            "gauge",
            "Next scheduled renewal of each managed identity.",
        );
        for row in schedule {
            let _ = writeln!(
                out,
                "{p}_next_renewal_timestamp_seconds{{identity=\"{}\"}} {}",
                row.identity, row.next_renewal
            );
        }
        header(
            &mut out,
            &format!("{p}_renewal_failures"),
            "gauge",
            "Consecutive failed renewals of each managed identity.",
        );
        for row in schedule {
            let _ = writeln!(out, "{p}_renewal_failures{{identity=\"{}\"}} {}", row.identity, row.failures);
        }
        lanyard_sidecar::metrics::render_handshakes(&mut out, p, std::iter::once(("api", &*self.api_handshakes)));
        let listeners = [("api", &*self.api_handshakes), ("http", &*self.http_connections)];
        lanyard_sidecar::metrics::render_connections(&mut out, p, listeners.into_iter());
        out
    }
}

/// Gauges of the root's and the intermediate's expiry, so that alerting
/// sees a CA certificate's end coming.
pub fn ca_certificates(expiry: &[crate::state::CaCertExpiry], now: time::OffsetDateTime) -> String {
    let mut out = String::new();
    let p = "lanyard_ca_certificate";
    header(
        &mut out,
        &format!("{p}_expiration_timestamp_seconds"),
        "gauge",
        "notAfter of the CA's root and intermediate.",
    );
    for e in expiry {
        let _ =
            writeln!(out, "{p}_expiration_timestamp_seconds{{role=\"{}\"}} {}", e.role, e.not_after.unix_timestamp());
    }
    header(&mut out, &format!("{p}_seconds_left"), "gauge", "Seconds until the CA's root and intermediate expire.");
    for e in expiry {
        let _ = writeln!(out, "{p}_seconds_left{{role=\"{}\"}} {}", e.role, (e.not_after - now).whole_seconds());
    }
    header(&mut out, &format!("{p}_alarm"), "gauge", "1 from 2/3 of a CA certificate's life on: nothing renews it.");
    for e in expiry {
        let _ = writeln!(out, "{p}_alarm{{role=\"{}\"}} {}", e.role, u8::from(e.alarm.is_some()));
    }
    out
}

/// Root rotation gauges: the phase, and during one the known sidecars by
/// whether they serve the new root.
pub fn root_rotation(ca: &crate::state::CaState) -> String {
    use crate::state::RotationPhase;
    let mut out = String::new();
    let p = "lanyard_ca_root_rotation";
    header(
        &mut out,
        &format!("{p}_phase"),
        "gauge",
        "0: no root rotation; 1: started; 2: finished, old root still in the bundles.",
    );
    let phase = match ca.rotation().map(|r| r.phase) {
        None => 0,
        Some(RotationPhase::Started) => 1,
        Some(RotationPhase::Finished) => 2,
    };
    let _ = writeln!(out, "{p}_phase {phase}");
    header(
        &mut out,
        &format!("{p}_sidecars"),
        "gauge",
        "Known sidecars during a root rotation, by whether they serve the new root.",
    );
    let reports = ca.rotation().and_then(|r| Some((r, crate::rotation::SidecarReports::read(ca.dir()).ok()??)));
    let (total, lacking) =
        reports.map_or((0, 0), |(r, reports)| (reports.sidecars.len(), reports.lacking(&r.new_root).count()));
    let _ = writeln!(out, "{p}_sidecars{{state=\"new_root\"}} {}", total - lacking);
    let _ = writeln!(out, "{p}_sidecars{{state=\"lacking\"}} {lacking}");
    out
}

/// Leadership gauges: whether this replica leads, lease changes, and the
/// store's latency and errors as the lease loop sees them.
pub fn leadership(leader: &super::leader::Leader) -> String {
    let mut out = String::new();
    let p = "lanyard_ca";
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    header(
        &mut out,
        &format!("{p}_leader"),
        "gauge",
        "1 while this replica holds the lease and runs rotation, ACME and discovery.",
    );
    let _ = writeln!(out, "{p}_leader {}", u8::from(leader.is_leader()));
    header(
        &mut out,
        &format!("{p}_lease_changes_total"),
        "counter",
        "Times this replica became leader or stopped being it.",
    );
    let _ = writeln!(out, "{p}_lease_changes_total {}", load(&leader.stats.changes));
    header(
        &mut out,
        &format!("{p}_store_errors_total"),
        "counter",
        "Failed store calls of the lease loop (the store unreachable).",
    );
    let _ = writeln!(out, "{p}_store_errors_total {}", load(&leader.stats.errors));
    header(&mut out, &format!("{p}_store_latency_seconds"), "gauge", "Round trip of the last lease call to the store.");
    let _ = writeln!(out, "{p}_store_latency_seconds {}", load(&leader.stats.last_latency_us) as f64 / 1e6);
    out
}
