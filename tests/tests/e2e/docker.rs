//! Docker discovery against a real dockerd: a labelled container gets its
//! cert dir, and a `signal` container receives its signal after rotation.

use std::path::Path;
use std::time::{Duration, Instant};

use lanyard_sidecar::certdir::CertDir;
use lanyard_tests::*;

const IMAGE: &str = "lanyard-test-busybox";

/// Builds a FROM-scratch image holding busybox-static; no registry needed.
fn build_image(work: &Path) {
    require_dockerd();
    let ctx = work.join("image");
    std::fs::create_dir_all(&ctx).unwrap();
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.exists(), "busybox-static is missing: scripts/test installs it");
    std::fs::copy(busybox, ctx.join("busybox")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\n")
        .unwrap();
    run_ok(docker().args(["build", "-q", "-t", IMAGE]).arg(&ctx));
}

#[test]
fn labelled_containers_get_cert_dirs_and_signals_after_rotation() {
    let pki = Pki::new(&[]);
    build_image(pki.tmp.path());
    let root = pki.path("dcerts");
    let server = CaServer::start(&pki, &format!("[docker]\nenabled = true\ncert_root = {root:?}\n"));
    let name = format!("dock{}", free_port());
    let started = Instant::now();
    let id = text(
        &run_ok(docker().args(["run", "-d", "--label"]).arg(format!("lanyard.identity={name}")).args([
            "--label",
            "lanyard.ttl=6s",
            "--label",
            "lanyard.reload=signal:SIGHUP",
            IMAGE,
            "sh",
            "-c",
            "trap 'echo got-hup' HUP; while :; do sleep 0.1; done",
        ]))
        .stdout,
    )
    .trim()
    .to_owned();
    let _container = Container(id.clone());
    let dir = root.join(&name);
    wait_until(Duration::from_secs(10), "the discovered cert dir", || {
        CertDir::new(&dir).load(time::OffsetDateTime::now_utc()).is_ok()
    });
    let first_issue = started.elapsed();
    let set = CertDir::new(&dir).load(time::OffsetDateTime::now_utc()).unwrap();
    assert_eq!(set.leaf.uris, [format!("spiffe://lanyard.internal/{name}")]);
    // A SIGHUP after the first issue, and another after the rotation at ~4 s.
    let first_serial = set.leaf.serial.clone();
    wait_until(Duration::from_secs(20), "SIGHUP delivered after rotation", || {
        text(&run(docker().args(["logs", &id])).stdout).matches("got-hup").count() >= 2
    });
    let rotated = CertDir::new(&dir).load(time::OffsetDateTime::now_utc()).unwrap();
    assert_ne!(rotated.leaf.serial, first_serial, "the certificate rotated");
    assert!(server.log_text().contains("reloaded after rotation"), "{}", server.log_text());
    eprintln!("first issue {first_issue:?} after docker run");
    // Removing the container stops management (the cert dir stays).
    run_ok(docker().args(["rm", "-f", &id]));
    wait_until(Duration::from_secs(10), "identity unmanaged", || server.log_text().contains("no longer managed"));
    assert!(dir.exists());
}
