//! Sidecar metrics: the counters listeners update, and the families a
//! `prometheus-client` collector writes from them at scrape time.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::Registry;

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

/// The Prometheus text format's `Content-Type`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The registry's metrics in the Prometheus text format (0.0.4).
pub fn exposition(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; an encoder error would be a bug in a collector.
    if let Err(e) = prometheus_text::encode(&mut out, registry) {
        tracing::error!("cannot encode the metrics: {e}");
    }
    out
}

/// The labels of a family's one unlabeled sample.
pub const UNLABELED: [(&str, &str); 0] = [];

/// Writes one gauge family whose samples are read at scrape time.
pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one counter family (named without `_total`, which the encoder
/// appends) whose samples are read at scrape time.
pub fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Named listeners, as a slice a collector walks.
pub type Named = [(String, Arc<ListenerMetrics>)];

fn by_listener<'a, V>(
    listeners: &'a Named,
    value: impl Fn(&ListenerMetrics) -> V + 'a,
) -> impl Iterator<Item = ([(&'static str, &'a str); 1], V)> + 'a {
    listeners.iter().map(move |(l, m)| ([("listener", l.as_str())], value(m)))
}

/// Writes the handshake families: by listener, result and reason
/// (`handshakes_total`), and by key-exchange group (`handshake_groups_total`).
pub fn encode_handshakes(enc: &mut DescriptorEncoder, listeners: &Named) -> fmt::Result {
    let mut results = Vec::new();
    for (l, m) in listeners {
        results.push((
            [("listener", l.as_str()), ("result", "ok"), ("reason", "")],
            m.handshakes_ok.load(Ordering::Relaxed),
        ));
        let rejected = m.rejected.lock().unwrap_or_else(|e| e.into_inner()).clone();
        results.extend(
            rejected
                .into_iter()
                .map(|(why, n)| ([("listener", l.as_str()), ("result", "rejected"), ("reason", why.label())], n)),
        );
    }
    counters(enc, "handshakes", "TLS handshakes by listener, result and reason.", results)?;
    let mut groups = Vec::new();
    for (l, m) in listeners {
        let counted = m.groups.lock().unwrap_or_else(|e| e.into_inner()).clone();
        groups.extend(counted.into_iter().map(|(group, n)| ([("listener", l.as_str()), ("group", group)], n)));
    }
    counters(enc, "handshake_groups", "Completed handshakes by key-exchange group.", groups)
}

/// Writes the connection families every server has: open connections,
/// refusals at the cap, closes by timeout.
pub fn encode_connections(enc: &mut DescriptorEncoder, listeners: &Named) -> fmt::Result {
    gauges(
        enc,
        "active_connections",
        "Open connections.",
        by_listener(listeners, |m| m.active.load(Ordering::Relaxed)),
    )?;
    counters(
        enc,
        "connections_over_cap",
        "Connections refused at the connection cap.",
        by_listener(listeners, |m| m.over_cap.load(Ordering::Relaxed)),
    )?;
    counters(
        enc,
        "connection_timeouts",
        "Connections closed by the header-read or idle timeout.",
        by_listener(listeners, |m| m.timeouts.load(Ordering::Relaxed)),
    )
}

/// Writes every listener family of the sidecar: handshakes, connections,
/// resumptions, upstream errors and bytes.
pub fn encode_listeners(enc: &mut DescriptorEncoder, listeners: &Named) -> fmt::Result {
    encode_handshakes(enc, listeners)?;
    encode_connections(enc, listeners)?;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counters(
        enc,
        "handshakes_resumed",
        "Handshakes that resumed a TLS session.",
        by_listener(listeners, |m| load(&m.handshakes_resumed)),
    )?;
    counters(
        enc,
        "upstream_errors",
        "Failed upstream connections.",
        by_listener(listeners, |m| load(&m.upstream_errors)),
    )?;
    counters(
        enc,
        "received_bytes",
        "Bytes from clients to the upstream.",
        by_listener(listeners, |m| load(&m.bytes_in)),
    )?;
    counters(enc, "sent_bytes", "Bytes from the upstream to clients.", by_listener(listeners, |m| load(&m.bytes_out)))
}
