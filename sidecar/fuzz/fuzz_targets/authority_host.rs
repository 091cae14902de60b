//! Host headers: `authority_host` returns a host or `None`, never panics,
//! and what it returns parses again as an authority.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Some(host) = lanyard_sidecar::serving::authority_host(text) {
        assert!(lanyard_sidecar::serving::authority_host(&host).is_some(), "{text:?} gave {host:?}");
    }
});
