//! Sidecar metrics, rendered as Prometheus text.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejection {
    /// The client presented no certificate.
    NoCert,
    /// The certificate does not chain to `ca.pem`.
    UnknownCa,
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
    /// The certificate is on the CRL.
    Revoked,
    /// The identity is not on the allow-list (or not the expected server).
    NotAllowed,
    /// The handshake took too long.
    Timeout,
    /// No key-exchange group in common (a classical-only client under `kx = "require"`).
    KxMismatch,
    /// Any other TLS failure.
    Other,
}

impl Rejection {
    /// Classifies a handshake failure for logs and metrics.
    pub fn of(err: &rustls::Error) -> Self {
        match err {
            rustls::Error::NoCertificatesPresented => Self::NoCert,
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoKxGroupsInCommon) => Self::KxMismatch,
            rustls::Error::InvalidCertificate(c) => match c {
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature => Self::UnknownCa,
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => Self::Expired,
                rustls::CertificateError::NotValidYet | rustls::CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                rustls::CertificateError::Revoked => Self::Revoked,
                rustls::CertificateError::ApplicationVerificationFailure
                | rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => Self::NotAllowed,
                _ => Self::Other,
            },
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => Self::NoCert,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA) => Self::UnknownCa,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired) => Self::Expired,
            _ => Self::Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoCert => "no_cert",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::NotAllowed => "not_allowed",
            Self::Timeout => "timeout",
            Self::KxMismatch => "kx_mismatch",
            Self::Other => "other",
        }
    }
}

/// Per-listener counters.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    /// Completed handshakes.
    pub handshakes_ok: AtomicU64,
    /// Handshakes that resumed a session.
    pub handshakes_resumed: AtomicU64,
    /// Refused handshakes by reason.
    pub rejected: Mutex<BTreeMap<Rejection, u64>>,
    /// Completed handshakes by negotiated key-exchange group.
    pub groups: Mutex<BTreeMap<&'static str, u64>>,
    /// Open connections.
    pub active: AtomicI64,
    /// Connections refused because the cap was reached.
    pub over_cap: AtomicU64,
    /// Connections closed by the header-read or idle timeout.
    pub timeouts: AtomicU64,
    /// Upstream connections that failed.
    pub upstream_errors: AtomicU64,
    /// Bytes from the client side to the upstream.
    pub bytes_in: Arc<AtomicU64>,
    /// Bytes from the upstream to the client side.
    pub bytes_out: Arc<AtomicU64>,
}

impl ListenerMetrics {
    /// Counts one refused handshake.
    pub fn reject(&self, why: Rejection) {
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()).entry(why).or_default() += 1;
    }

    /// Counts one completed handshake's key-exchange group.
    pub fn negotiated(&self, group: &'static str) {
        *self.groups.lock().unwrap_or_else(|e| e.into_inner()).entry(group).or_default() += 1;
    }

    /// Counts a completed handshake: its key-exchange group, and whether it
    /// resumed a session.
    pub fn handshake_done(&self, conn: &rustls::CommonState) {
        self.handshakes_ok.fetch_add(1, Ordering::Relaxed);
        self.negotiated(crate::tls::group_label(conn.negotiated_key_exchange_group().map(|g| g.name())));
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.handshakes_resumed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failed handshake; returns why it failed.
    pub fn handshake_failed(&self, e: &std::io::Error) -> Rejection {
        let why =
            e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map_or(Rejection::Other, Rejection::of);
        self.reject(why);
        why
    }
}

/// Certificate reload counters.
#[derive(Debug, Default)]
pub struct ReloadMetrics {
    /// Successful reloads.
    pub ok: AtomicU64,
    /// Failed reloads.
    pub failed: AtomicU64,
    /// Unix time of the last reload attempt.
    pub last_attempt: AtomicI64,
    /// Unix time of the last successful reload.
    pub last_success: AtomicI64,
}

/// Writes one metric family header.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One per-listener metric family: name, type, help, and how to read it.
type Family = (&'static str, &'static str, &'static str, fn(&ListenerMetrics) -> i64);

/// Renders the handshake families (by result and reason, by key-exchange
/// group) of `(name, metrics)` pairs, named `<prefix>_handshakes_total` and
/// `<prefix>_handshake_groups_total`.
pub fn render_handshakes<'a>(
    out: &mut String,
    p: &str,
    listeners: impl Iterator<Item = (&'a str, &'a ListenerMetrics)> + Clone,
) {
    header(out, &format!("{p}_handshakes_total"), "counter", "TLS handshakes by listener, result and reason.");
    for (l, m) in listeners.clone() {
        let ok = m.handshakes_ok.load(Ordering::Relaxed);
        let _ = writeln!(out, "{p}_handshakes_total{{listener=\"{l}\",result=\"ok\",reason=\"\"}} {ok}");
        for (why, n) in m.rejected.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "{p}_handshakes_total{{listener=\"{l}\",result=\"rejected\",reason=\"{}\"}} {n}",
                why.label()
            );
        }
    }
    header(out, &format!("{p}_handshake_groups_total"), "counter", "Completed handshakes by key-exchange group.");
    for (l, m) in listeners.clone() {
        for (group, n) in m.groups.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "{p}_handshake_groups_total{{listener=\"{l}\",group=\"{group}\"}} {n}");
        }
    }
}

/// Renders listener metrics for `(name, metrics)` pairs.
pub fn render_listeners<'a>(out: &mut String, listeners: impl Iterator<Item = (&'a str, &'a ListenerMetrics)> + Clone) {
    let p = "lanyard_sidecar";
    render_handshakes(out, p, listeners.clone());
    render_connections(out, p, listeners.clone());
    let families: [Family; 4] = [
        ("handshakes_resumed_total", "counter", "Handshakes that resumed a TLS session.", |m| {
            m.handshakes_resumed.load(Ordering::Relaxed) as i64
        }),
        ("upstream_errors_total", "counter", "Failed upstream connections.", |m| {
            m.upstream_errors.load(Ordering::Relaxed) as i64
        }),
        ("received_bytes_total", "counter", "Bytes from clients to the upstream.", |m| {
            m.bytes_in.load(Ordering::Relaxed) as i64
        }),
        ("sent_bytes_total", "counter", "Bytes from the upstream to clients.", |m| {
            m.bytes_out.load(Ordering::Relaxed) as i64
        }),
    ];
    render_families(out, p, &families, listeners);
}

/// Renders the connection families every server has (open connections,
/// refusals at the cap, closes by timeout), named `<prefix>_…`.
pub fn render_connections<'a>(
    out: &mut String,
    p: &str,
    listeners: impl Iterator<Item = (&'a str, &'a ListenerMetrics)> + Clone,
) {
    let families: [Family; 3] = [
        ("active_connections", "gauge", "Open connections.", |m| m.active.load(Ordering::Relaxed)),
        ("connections_over_cap_total", "counter", "Connections refused at the connection cap.", |m| {
            m.over_cap.load(Ordering::Relaxed) as i64
        }),
        ("connection_timeouts_total", "counter", "Connections closed by the header-read or idle timeout.", |m| {
            m.timeouts.load(Ordering::Relaxed) as i64
        }),
    ];
    render_families(out, p, &families, listeners);
}

fn render_families<'a>(
    out: &mut String,
    p: &str,
    families: &[Family],
    listeners: impl Iterator<Item = (&'a str, &'a ListenerMetrics)> + Clone,
) {
    for (name, kind, help, get) in families {
        header(out, &format!("{p}_{name}"), kind, help);
        for (l, m) in listeners.clone() {
            let _ = writeln!(out, "{p}_{name}{{listener=\"{l}\"}} {}", get(m));
        }
    }
}
