//! What ACME clients send the ACME server: any body never panics the JWS
//! and JWK parsers or the signature check, a parsed key's thumbprint is
//! stable, and an identifier that parses writes back as itself.
#![no_main]

use lanyard_ca::acme_server::jws::{Jws, Signer};
use lanyard_ca::acme_server::Identifier;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(jws) = Jws::parse(body) {
        if let Signer::Jwk(key) = &jws.signer {
            let _ = jws.verify(key);
            assert_eq!(key.thumbprint(), key.thumbprint());
            let again = lanyard_ca::acme_server::jws::Jwk::from_json(&key.to_json()).expect("a key writes back readable");
            assert_eq!(&again, key);
        }
        if let Ok(payload) = jws.json() {
            for id in payload.get("identifiers").and_then(|v| v.as_array()).into_iter().flatten() {
                if let Ok(parsed) = Identifier::from_json(id) {
                    assert_eq!(Identifier::from_json(&parsed.to_json()).as_ref(), Ok(&parsed));
                }
            }
            // keyChange carries a JWS as the payload.
            if payload.get("protected").is_some() {
                let _ = Jws::from_value(&payload);
            }
        }
    }
});
