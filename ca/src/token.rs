//! Secrets handed to callers (bootstrap tokens, enrolment credentials) are
//! kept only as hashes.

/// SHA-256 (hex) of a secret: what the store keeps.
pub fn secret_hash(secret: &str) -> String {
    lanyard_sidecar::certinfo::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes()).as_ref())
}
