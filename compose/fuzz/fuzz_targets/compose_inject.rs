//! A compose file of any text: parsing and `ca inject` return a result or
//! an error, never a panic; an injected file parses again.
#![no_main]

use lanyard_compose::{inject, Compose};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(compose) = Compose::parse(text, "fuzz.yml") else { return };
    if let Ok(injected) = inject(&compose, &Default::default()) {
        let again = injected.compose.to_yaml();
        assert!(Compose::parse(&again, "injected.yml").is_ok(), "the injected file does not parse:\n{again}");
    }
});
