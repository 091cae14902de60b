//! RFC 2136 answers: any bytes a DNS server (or someone on the path) sends
//! back never panic the parser, and never pass TSIG verification: only an
//! answer signed with the key over our request's MAC is trusted.
#![no_main]

use std::sync::OnceLock;

use lanyard_ca::acme::dns::{Change, DnsUpdateConfig, Signed};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_700_000_000;

fn setup() -> &'static (DnsUpdateConfig, Signed) {
    static SETUP: OnceLock<(DnsUpdateConfig, Signed)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let config = DnsUpdateConfig {
            server: "127.0.0.1:53".parse().unwrap(),
            zone: Some("example.test".into()),
            tsig_key_name: "acme-key".into(),
            tsig_secret: "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0".into(),
            tsig_algorithm: "hmac-sha256".into(),
            ttl: 60,
        };
        let request = config.message(Change::Add, "_acme-challenge.www.example.test", "token", 0x1234, NOW).unwrap();
        (config, request)
    })
}

fuzz_target!(|answer: &[u8]| {
    let (config, request) = setup();
    assert!(config.verify_answer(request, answer, NOW).is_err(), "an answer we did not sign verified");
});
