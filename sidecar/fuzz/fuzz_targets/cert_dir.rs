//! The cert-dir loader: whatever `cert.pem`, `key.pem`, `ca.pem` and
//! `crl.pem` hold (the input split at 0xff bytes), loading returns a set or
//! an error, never a panic.
#![no_main]

use lanyard_sidecar::certdir::CertDir;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut parts = data.split(|b| *b == 0xff);
    for name in ["cert.pem", "key.pem", "ca.pem", "crl.pem"] {
        if let Some(part) = parts.next() {
            std::fs::write(dir.path().join(name), part).expect("write");
        }
    }
    let _ = CertDir::new(dir.path()).load(time::OffsetDateTime::now_utc());
    let _ = lanyard_sidecar::certdir::parse_certs(std::path::Path::new("fuzz.pem"), data);
});
