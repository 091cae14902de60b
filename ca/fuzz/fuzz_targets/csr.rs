//! CSR checking: any DER in a CSR's PEM never panics, and a certificate
//! signed from one carries the identity's names only, never a name the
//! CSR asked for.
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use lanyard_ca::issue::{KeySource, LeafRequest};
use lanyard_ca::state::{CaState, InitOptions};
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static CaState {
    static CA: OnceLock<(tempfile::TempDir, CaState)> = OnceLock::new();
    &CA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CaState::init(dir.path(), &InitOptions::new("fuzz.test".parse().unwrap())).unwrap();
        (dir, ca)
    })
    .1
}

fuzz_target!(|der: &[u8]| {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n");
    let request = LeafRequest {
        name: "web".parse().unwrap(),
        dns: None,
        ips: Vec::new(),
        spiffe: None,
        ttl: "1h".parse().unwrap(),
        key: KeySource::Csr { origin: "fuzz.csr".into(), pem },
    };
    if let Ok(issued) = ca().issue(&request) {
        assert_eq!(issued.info.dns, ["web"]);
        assert!(issued.info.ips.is_empty());
        assert_eq!(issued.info.uris, ["spiffe://fuzz.test/web"]);
        assert!(issued.pem.key.is_none(), "the key stays with the requester");
    }
});
