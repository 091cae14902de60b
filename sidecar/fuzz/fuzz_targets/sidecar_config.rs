//! The sidecar's TOML config: parsing and the cross-field checks never
//! panic, whatever the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = lanyard_sidecar::config::Config::from_toml(text, std::path::Path::new("fuzz.toml"));
});
