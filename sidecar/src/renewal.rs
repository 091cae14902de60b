//! When certificates are renewed and failures retried: shared by the CA's
//! rotation loop and the sidecar's network enrolment.

use std::time::Duration;

use time::OffsetDateTime;

/// Longest wait between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A random number in `[0, 1)` from the system RNG.
pub fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// When to renew a certificate: at 2/3 of its life, minus up to 5% of its
/// life of jitter so a fleet does not renew in lockstep.
pub fn renewal_point(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let life = not_after - not_before;
    not_before + life * (2.0 / 3.0) - life * (0.05 * unit_random())
}

/// Exponential backoff with jitter after `failures` consecutive failures:
/// 1 s doubling to [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1 << failures.min(16)).min(MAX_BACKOFF);
    base.mul_f64(0.5 + 0.5 * unit_random())
}
