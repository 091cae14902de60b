//! The REST API's JSON bodies: the first byte picks the route, the rest is
//! the body. Parsing never panics and refuses with a message, and what
//! parses goes on into the real operation (signing a CSR, revoking in a
//! SQLite store, creating or uploading a public certificate), which answers
//! with a typed refusal, never a store error or a corrupt document.
#![no_main]

use std::sync::{Arc, OnceLock};

use lanyard_ca::acme::{Acme, AcmeSettings, PublicError};
use lanyard_ca::issue::{KeySource, LeafRequest};
use lanyard_ca::serve::bodies::{self, EnrolBody, NewPublic, RenewBody, RevokeTarget, SignBody, UploadPublic};
use lanyard_ca::state::{CaState, InitOptions};
use lanyard_ca::store::{Store, StoreSpec};
use libfuzzer_sys::fuzz_target;

struct Ca {
    _dir: tempfile::TempDir,
    state: CaState,
    store: Arc<dyn Store>,
    acme: Arc<Acme>,
}

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (state, _) = CaState::init(dir.path(), &InitOptions::new("fuzz.test".parse().unwrap())).unwrap();
        let store = lanyard_ca::store::open(&StoreSpec::Sqlite, dir.path(), None).unwrap();
        let acme = Acme::new(store.clone(), AcmeSettings::default(), dir.path());
        Ca { _dir: dir, state, store, acme }
    })
}

/// Signs `csr` for `web`: only the identity's names, never the CSR's.
fn sign(csr: String) {
    let request = LeafRequest {
        name: "web".parse().unwrap(),
        dns: None,
        ips: Vec::new(),
        spiffe: None,
        ttl: "1h".parse().unwrap(),
        key: KeySource::Csr { origin: "request body".into(), pem: csr },
    };
    if let Ok(issued) = ca().state.issue(&request) {
        assert_eq!(issued.info.dns, ["web"]);
        assert_eq!(issued.info.uris, ["spiffe://fuzz.test/web"]);
    }
}

/// An ACME refusal is the caller's fault (400, 409); the store never fails.
fn refused_for_the_caller(e: &PublicError) {
    assert!(matches!(e, PublicError::Invalid(_) | PublicError::Exists(_)), "{e:?}");
    assert!(!e.to_string().is_empty());
}

fuzz_target!(|input: &[u8]| {
    let Some((&route, body)) = input.split_first() else { return };
    let refused = |e: bodies::BodyError| assert!(!e.to_string().is_empty());
    match route % 6 {
        0 => bodies::parse::<SignBody>(body).map_or_else(refused, |b| sign(b.csr)),
        1 => bodies::parse::<EnrolBody>(body).map_or_else(refused, |b| sign(b.csr)),
        2 => bodies::parse::<RenewBody>(body).map_or_else(refused, |b| sign(b.csr)),
        3 => match RevokeTarget::parse(body) {
            Ok(RevokeTarget::Serial(serial)) => {
                assert!(!serial.starts_with('0') && serial == serial.to_ascii_lowercase(), "{serial:?}");
                ca().store.revoke_serial(&serial, 1).unwrap();
            }
            Ok(RevokeTarget::Identity(identity)) => drop(ca().store.revoke_identity(&identity, 1).unwrap()),
            Err(e) => refused(e),
        },
        4 => match NewPublic::parse(body) {
            Ok(new) => match ca().acme.create(&new.cert_name, new.domains.clone(), new.email, new.acme_directory_url, new.profile) {
                Ok(created) => {
                    let stored = ca().acme.get(&new.cert_name).unwrap().expect("a created certificate is stored");
                    assert_eq!(stored.domains, new.domains);
                    assert_eq!(created.domains, new.domains);
                    ca().acme.remove(&new.cert_name).unwrap();
                }
                Err(e) => refused_for_the_caller(&e),
            },
            Err(e) => refused(e),
        },
        _ => match bodies::parse::<UploadPublic>(body) {
            Ok(upload) => match ca().acme.upload("uploaded", &upload.certificate, &upload.key) {
                Ok(cert) => {
                    let stored = ca().acme.get("uploaded").unwrap().expect("an uploaded certificate is stored");
                    assert_eq!((stored.domains, stored.fingerprint), (cert.domains, cert.fingerprint));
                }
                Err(e) => refused_for_the_caller(&e),
            },
            Err(e) => refused(e),
        },
    }
});
