//! The ACME server's published limits, which the CA keeps itself under,
//! and the backoff between failed orders.

use super::*;

/// Let's Encrypt's published limits that the CA keeps itself under.
const MAX_ORDERS_PER_DOMAIN_PER_WEEK: usize = 50;
const MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR: usize = 5;

/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// What a rate-limit event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum EventKind {
    /// An order was placed for the name.
    Order,
    /// The ACME server did not validate the name.
    Failed,
    /// A name was first asked for on demand.
    OnDemand,
}

/// One order or failed validation, kept a week in the store.
#[derive(Serialize, Deserialize)]
struct Event {
    at: i64,
    name: String,
    kind: EventKind,
}

impl Acme {
    /// Whether an order now would break a published limit: the reason and
    /// when to look again.
    pub(super) fn rate_limited(&self, cert: &PublicCert) -> Option<(String, i64)> {
        let t = now();
        let all = self.store.docs(KIND_EVENT).ok()?;
        // Forget events older than the longest window (keys start with the time).
        let cutoff = format!("{:012}", t - 8 * 24 * 3600);
        for (k, _) in all.iter().filter(|(k, _)| *k < cutoff) {
            let _ = self.store.delete_doc(KIND_EVENT, k);
        }
        let events: Vec<Event> = all.iter().filter_map(|(_, j)| serde_json::from_str(j).ok()).collect();
        for d in &cert.domains {
            let failed: Vec<i64> = events
                .iter()
                .filter(|e| e.kind == EventKind::Failed && &e.name == d && e.at > t - 3600)
                .map(|e| e.at)
                .collect();
            if failed.len() >= MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR {
                let until = failed.iter().min().copied().unwrap_or(t) + 3600;
                return Some((format!("{d}: {} failed validations in the last hour (limit {MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR})", failed.len()), until));
            }
            let reg = registered_domain(d);
            let week = 7 * 24 * 3600;
            let orders: Vec<i64> = events
                .iter()
                .filter(|e| e.kind == EventKind::Order && registered_domain(&e.name) == reg && e.at > t - week)
                .map(|e| e.at)
                .collect();
            if orders.len() >= MAX_ORDERS_PER_DOMAIN_PER_WEEK {
                let until = orders.iter().min().copied().unwrap_or(t) + week;
                return Some((
                    format!("{reg}: {} orders in 7 days (limit {MAX_ORDERS_PER_DOMAIN_PER_WEEK})", orders.len()),
                    until,
                ));
            }
        }
        None
    }

    /// When the events of `kind` since unix second `since` happened, oldest first.
    pub(super) fn event_times(&self, kind: EventKind, since: i64) -> Result<Vec<i64>, PublicError> {
        let mut times: Vec<i64> = (self.store.docs(KIND_EVENT)?.iter())
            .filter_map(|(_, j)| serde_json::from_str::<Event>(j).ok())
            .filter(|e| e.kind == kind && e.at > since)
            .map(|e| e.at)
            .collect();
        times.sort_unstable();
        Ok(times)
    }

    pub(super) fn record_event(&self, kind: EventKind, name: &str) {
        let at = now();
        let mut id = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut id);
        let key = format!("{at:012}-{}", lanyard_sidecar::certinfo::hex(&id));
        let json = serde_json::to_string(&Event { at, name: name.to_owned(), kind }).unwrap_or_default();
        let _ = self.store.put_doc(KIND_EVENT, &key, &json);
    }
}

/// Uniform in [0, 1].
pub(super) fn random_fraction() -> f64 {
    let mut r = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut r);
    f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX)
}

pub(super) fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(12)).min(MAX_BACKOFF);
    base.mul_f64(0.9 + random_fraction() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_under_the_published_limits() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(dir.path()).unwrap());
        let acme = Acme::new(store, AcmeSettings::default(), dir.path());
        let cert = acme.create("shop", vec!["shop.example.com".into()], "a@example.com".into(), None, None).unwrap();
        assert!(acme.rate_limited(&cert).is_none());
        for _ in 0..MAX_FAILED_VALIDATIONS_PER_NAME_PER_HOUR {
            acme.record_event(EventKind::Failed, "shop.example.com");
        }
        let (why, until) = acme.rate_limited(&cert).unwrap();
        assert!(why.contains("5 failed validations in the last hour"), "{why}");
        assert!(until > now() + 3500 && until <= now() + 3600, "{until}");
        // Orders count per registered domain, across names.
        let other = acme.create("api", vec!["api.example.com".into()], "a@example.com".into(), None, None).unwrap();
        assert!(acme.rate_limited(&other).is_none());
        for i in 0..MAX_ORDERS_PER_DOMAIN_PER_WEEK {
            acme.record_event(EventKind::Order, &format!("n{i}.example.com"));
        }
        let (why, _) = acme.rate_limited(&other).unwrap();
        assert!(why.starts_with("example.com: 50 orders in 7 days"), "{why}");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_cap() {
        let b = backoff(3);
        assert!(b >= Duration::from_millis(7200) && b <= Duration::from_millis(8800), "{b:?}");
        assert!(backoff(40) <= MAX_BACKOFF.mul_f64(1.1));
    }
}
