//! The edge's ClientHello peek: any bytes read as a ClientHello never
//! panic, an ACME TLS-ALPN-01 validation is told apart from a visit, and
//! SNI matching is consistent (a name covers itself; a wildcard covers one
//! label only).
#![no_main]

use lanyard_sidecar::edge::{acme_validation, name_matches};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut cursor = std::io::Cursor::new(data);
    loop {
        match acceptor.read_tls(&mut cursor) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let accepted = match acceptor.accept() {
            Ok(Some(accepted)) => accepted,
            Ok(None) => continue,
            Err(_) => return,
        };
        let hello = accepted.client_hello();
        let validation = acme_validation(&hello);
        let offers_acme = hello.alpn().is_some_and(|mut p| p.any(|p| p == b"acme-tls/1"));
        assert_eq!(validation.is_some(), offers_acme);
        if let Some(sni) = hello.server_name() {
            assert!(name_matches(sni, sni), "{sni:?}");
            let wildcard = format!("*.{sni}");
            assert!(!name_matches(&wildcard, sni), "{sni:?}");
            assert!(name_matches(&wildcard, &format!("a.{sni}")), "{sni:?}");
        }
        return;
    }
});
