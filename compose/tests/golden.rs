//! Golden tests: each `golden/NAME.in.yml` injects to `golden/NAME.out.yml`
//! (with the report in `NAME.report`), or fails with `golden/NAME.err`.
//! The example fleet in `examples/fleet` is checked the same way.
//!
//! Regenerate after an intended change with `scripts/update-golden`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use lanyard_compose::inject::Overrides;
use lanyard_compose::{inject, Compose};
use lanyard_sidecar::config::Config;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn updating() -> bool {
    std::env::var_os("LANYARD_UPDATE_GOLDEN").is_some()
}

/// Compares `actual` with the file, or rewrites the file when updating.
fn check(path: &Path, actual: &str) {
    if updating() {
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/update-golden to create it", path.display()));
    assert!(
        expected == actual,
        "{} differs from the output (run scripts/update-golden if the change is intended):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn cases() -> Vec<(String, PathBuf)> {
    let mut cases: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".in.yml").map(|n| (n.to_owned(), dir().join(&name)))
        })
        .collect();
    cases.push(("fleet".into(), Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fleet/docker-compose.yml")));
    cases.sort();
    cases
}

/// Every sidecar's configuration must be one the real sidecar accepts.
fn check_sidecar_configs(name: &str, out: &Compose) {
    let mut sidecars = 0;
    for s in &out.services {
        let Some(env) = s.get("environment").and_then(|e| e.get("LANYARD_SIDECAR_CONFIG")) else { continue };
        let text = env.as_str().unwrap();
        Config::from_toml(text, Path::new(&s.name)).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
        sidecars += 1;
    }
    assert!(sidecars > 0, "{name}: no sidecar");
}

#[test]
fn golden_files() {
    let cases = cases();
    assert!(cases.len() >= 8, "the golden corpus is incomplete");
    for (name, input) in cases {
        let text = std::fs::read_to_string(&input).unwrap();
        let origin = format!("{name}.in.yml");
        let result = Compose::parse(&text, &origin).and_then(|c| inject(&c, &Overrides::default()));
        if name.starts_with("error-") {
            let e = result.err().unwrap_or_else(|| panic!("{name}: expected an error"));
            check(&dir().join(format!("{name}.err")), &format!("{e}\n"));
            continue;
        }
        let injected = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        check_sidecar_configs(&name, &injected.compose);
        let yaml = injected.compose.to_yaml();
        check(&dir().join(format!("{name}.out.yml")), &yaml);
        check(&dir().join(format!("{name}.report")), &injected.report_text());
        // Injecting the output again is refused, not doubled.
        let again = Compose::parse(&yaml, "out").and_then(|c| inject(&c, &Overrides::default()));
        assert!(again.unwrap_err().to_string().contains("injected already"), "{name}");
    }
}
