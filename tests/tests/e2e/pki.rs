//! The PKI core: `ca init`, `ca issue`, `ca inspect` and the cert-dir
//! contract, checked with openssl, rustls and pkilint.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lanyard_sidecar::certdir::CertDir;
use lanyard_tests::*;

const KEY_TYPES: [&str; 6] = ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048", "rsa-3072", "rsa-4096"];

fn openssl() -> Command {
    Command::new(peer("openssl"))
}

/// The first certificate of a PEM file, written alone to `out`.
fn first_cert(pem_file: &Path, out: &Path) {
    run_ok(openssl().args(["x509", "-in"]).arg(pem_file).arg("-out").arg(out));
}

#[test]
fn openssl_verifies_every_key_type_for_server_and_client_use() {
    let pki = Pki::new(&[]);
    for kt in KEY_TYPES {
        let dir = pki.issue(kt, &["--key-type", kt]);
        for purpose in ["sslserver", "sslclient"] {
            let out = run_ok(
                openssl()
                    .args(["verify", "-purpose", purpose, "-CAfile"])
                    .arg(dir.join("ca.pem"))
                    .arg("-untrusted")
                    .arg(dir.join("cert.pem"))
                    .arg(dir.join("cert.pem")),
            );
            assert!(text(&out.stdout).contains(": OK"), "{kt}/{purpose}: {}", text(&out.stdout));
        }
        let shown = text(&run_ok(openssl().args(["x509", "-noout", "-text", "-in"]).arg(dir.join("cert.pem"))).stdout);
        assert!(shown.contains(&format!("URI:spiffe://lanyard.internal/{kt}")), "{shown}");
        assert!(shown.contains(&format!("DNS:{kt}")), "{shown}");
        assert!(shown.contains("CA:FALSE") && shown.contains("Digital Signature"), "{shown}");
        assert!(shown.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{shown}");
        assert!(shown.contains("X509v3 Authority Key Identifier") && shown.contains("X509v3 Subject Key Identifier"));
        assert_eq!(kt.starts_with("rsa"), shown.contains("Key Encipherment"), "{kt}: {shown}");
    }
}

#[test]
fn leaf_defaults_ttl_backdating_and_serials() {
    let pki = Pki::new(&[]);
    let mut serials = std::collections::HashSet::new();
    for i in 0..5 {
        let dir = pki.issue(&format!("svc{i}"), &[]);
        let set = CertDir::new(&dir).load(time::OffsetDateTime::now_utc()).expect("valid set");
        let life = set.leaf.not_after - set.leaf.not_before;
        assert_eq!(life.whole_minutes(), 24 * 60 + 5, "24 h plus 5 min of backdating");
        assert!(set.leaf.not_before < time::OffsetDateTime::now_utc() - time::Duration::minutes(4));
        assert!(set.leaf.serial.len() >= 16, "serial of at least 64 bits: {}", set.leaf.serial);
        assert!(u8::from_str_radix(&set.leaf.serial[..2], 16).unwrap() < 0x80, "serial is positive");
        assert!(serials.insert(set.leaf.serial.clone()), "serials are unique");
        assert_eq!(set.chain.len(), 2, "leaf + intermediate");
    }
    let dir = pki.issue("api", &["--dns", "api.svc.local", "--ip", "10.1.2.3", "--ttl", "90m"]);
    let set = CertDir::new(&dir).load(time::OffsetDateTime::now_utc()).unwrap();
    assert_eq!(set.leaf.dns, ["api.svc.local"], "--dns replaces the default");
    assert_eq!(set.leaf.ips, ["10.1.2.3".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(set.leaf.uris, ["spiffe://lanyard.internal/api"]);
    assert_eq!((set.leaf.not_after - set.leaf.not_before).whole_minutes(), 95);
}

#[test]
fn file_modes_and_offline_root() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let pki = Pki::new(&[]);
    assert_eq!(mode(&pki.state()), 0o700);
    assert_eq!(mode(&pki.state().join("root-key.pem")), 0o600);
    assert_eq!(mode(&pki.state().join("intermediate-key.pem")), 0o600);
    let dir = pki.issue("web", &[]);
    assert_eq!(mode(&dir.join("key.pem")), 0o600);

    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("offline");
    let out = run_ok(ca().args(["init", "--offline-root", "--state"]).arg(&state));
    assert!(text(&out.stdout).contains("BEGIN PRIVATE KEY"), "root key printed to stdout");
    assert!(!state.join("root-key.pem").exists(), "root key not kept in the state dir");
    let key_out = tmp.path().join("root.key");
    run_ok(ca().args(["init", "--force", "--offline-root", "--root-key-out"]).arg(&key_out).arg("--state").arg(&state));
    assert_eq!(mode(&key_out), 0o600);
    run_ok(ca().args(["issue", "web", "--state"]).arg(&state).arg("--out").arg(tmp.path().join("web")));
}

/// The one-year intermediate is not renewed by anything yet: from 2/3 of
/// its life on, `ca check` fails and `ca status` shows the alarm, so the
/// operator hears of it months before leaf renewals would start failing.
#[test]
fn ca_check_raises_the_intermediate_expiry_alarm_at_two_thirds_of_its_life() {
    let pki = Pki::new(&[]);
    let state = pki.state();
    let ok = run_ok(ca().args(["check", "--state"]).arg(&state));
    assert_eq!(text(&ok.stdout), "CA certificates: ok\n");
    let later = |args: &[&str]| {
        run(Command::new(peer("faketime")).args(["-f", "+250d"]).arg(bin("ca")).args(args).arg("--state").arg(&state))
    };
    let check = later(&["check"]);
    assert!(!check.status.success(), "{check:?}");
    let said = text(&check.stderr);
    assert!(said.contains("the intermediate CA expires at") && said.contains("not rolled over yet"), "{said}");
    assert!(!said.contains("root CA"), "the root has years left: {said}");
    let status = text(&later(&["status"]).stdout);
    assert!(status.contains("intermediate CA expires") && status.contains("ALARM"), "{status}");
    assert!(
        status.lines().next().is_some_and(|l| l.starts_with("root CA expires") && !l.contains("ALARM")),
        "{status}"
    );
}

#[test]
fn init_refuses_to_overwrite_without_force_and_env_gives_state() {
    let pki = Pki::new(&[]);
    let before = std::fs::read(pki.state().join("root.pem")).unwrap();
    let err = run_err(ca().arg("init").env("LANYARD_STATE", pki.state()));
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(before, std::fs::read(pki.state().join("root.pem")).unwrap(), "old CA untouched");
    run_ok(ca().args(["init", "--force"]).env("LANYARD_STATE", pki.state()));
    assert_ne!(before, std::fs::read(pki.state().join("root.pem")).unwrap(), "--force replaced it");
    let err = run_err(ca().arg("init").env_remove("LANYARD_STATE"));
    assert!(err.contains("--state") && err.contains("LANYARD_STATE"), "{err}");
}

#[test]
fn name_constraints_limit_the_intermediate() {
    let pki = Pki::new(&["--permit-dns", "svc.local"]);
    let dir = pki.issue("api", &["--dns", "api.svc.local"]);
    run_ok(
        openssl()
            .args(["verify", "-CAfile"])
            .arg(dir.join("ca.pem"))
            .arg("-untrusted")
            .arg(dir.join("cert.pem"))
            .arg(dir.join("cert.pem")),
    );
    let shown = text(
        &run_ok(openssl().args(["x509", "-noout", "-text", "-in"]).arg(pki.state().join("intermediate.pem"))).stdout,
    );
    assert!(shown.contains("Name Constraints: critical") && shown.contains("DNS:svc.local"), "{shown}");
    assert!(shown.contains("pathlen:0"), "{shown}");
    let err = run_err(pki.issue_cmd("evil").arg("--out").arg(pki.path("evil")));
    assert!(err.contains("\"evil\"") && err.contains("permitted") && err.contains("svc.local"), "{err}");
    assert!(!pki.path("evil").exists());
}

/// Each bad input gets one line naming the problem.
#[test]
fn bad_input_gets_one_clear_line() {
    let pki = Pki::new(&[]);
    let out = pki.path("out");
    let cases: &[(&[&str], &str)] = &[
        (&["--dns", "a..b"], "\"a..b\""),
        (&["--dns", "-x"], "\"-x\""),
        (&["--dns", "10.0.0.1"], "--ip"),
        (&["--dns", "a.example", "--dns", "a.example"], "duplicate name \"a.example\""),
        (&["--ip", "10.0.0.1", "--ip", "10.0.0.1"], "duplicate name \"10.0.0.1\""),
        (&["--ttl", "0s"], "zero"),
        (&["--ttl", "-1h"], "negative"),
        (&["--ttl", "soon"], "\"soon\""),
        (&["--ttl", "9000d"], "intermediate CA expires"),
        (&["--spiffe", "http://x/y"], "spiffe://"),
        (&["--key-type", "dsa"], "dsa"),
    ];
    for (args, expect) in cases {
        let err = run_err(pki.issue_cmd("web").arg("--out").arg(&out).args(*args));
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line, got {err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!out.exists(), "nothing written on bad input");

    let missing = pki.path("nowhere");
    let err = run_err(ca().args(["issue", "web", "--state"]).arg(&missing).arg("--out").arg(&out));
    assert!(err.contains("no CA in") && err.contains("ca init"), "{err}");

    // Not writable: a path under a regular file.
    std::fs::write(pki.path("plainfile"), "x").unwrap();
    let err = run_err(pki.issue_cmd("web").arg("--out").arg(pki.path("plainfile/out")));
    assert!(err.contains("cannot write cert dir") && err.contains("plainfile"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn corrupt_or_unreadable_state_is_named() {
    let pki = Pki::new(&[]);
    let out = pki.path("out");
    let key = pki.state().join("intermediate-key.pem");
    let good_key = std::fs::read(&key).unwrap();

    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n").unwrap();
    let err = run_err(pki.issue_cmd("web").arg("--out").arg(&out));
    assert!(err.contains("intermediate-key.pem") && err.contains("corrupt"), "{err}");

    std::fs::remove_file(&key).unwrap();
    std::fs::create_dir(&key).unwrap();
    let err = run_err(pki.issue_cmd("web").arg("--out").arg(&out));
    assert!(err.contains("cannot read") && err.contains("intermediate-key.pem"), "{err}");
    std::fs::remove_dir(&key).unwrap();

    std::fs::write(&key, &good_key).unwrap();
    std::fs::write(pki.state().join("ca.json"), "{not json").unwrap();
    let err = run_err(pki.issue_cmd("web").arg("--out").arg(&out));
    assert!(err.contains("ca.json") && err.contains("corrupt"), "{err}");

    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A key of another CA is refused too.
    let other = Pki::new(&[]);
    std::fs::write(pki.state().join("ca.json"), std::fs::read(other.state().join("ca.json")).unwrap()).unwrap();
    std::fs::copy(other.state().join("intermediate-key.pem"), &key).unwrap();
    let err = run_err(pki.issue_cmd("web").arg("--out").arg(&out));
    assert!(err.contains("does not match"), "{err}");
}

fn make_csr(dir: &Path, san: &str) -> std::path::PathBuf {
    let csr = dir.join("req.csr");
    run_ok(
        openssl()
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=web"])
            .args(["-addext", &format!("subjectAltName={san}"), "-keyout"])
            .arg(dir.join("req.key"))
            .arg("-out")
            .arg(&csr),
    );
    csr
}

#[test]
fn csr_is_signed_checked_and_writes_no_key() {
    let pki = Pki::new(&[]);
    let work = pki.path("csr");
    std::fs::create_dir(&work).unwrap();
    let csr = make_csr(&work, "DNS:web,URI:spiffe://lanyard.internal/web");
    let out = pki.path("web");
    run_ok(pki.issue_cmd("web").arg("--csr").arg(&csr).arg("--out").arg(&out));
    assert!(!out.join("key.pem").exists(), "no key for a CSR");
    run_ok(
        openssl()
            .args(["verify", "-CAfile"])
            .arg(out.join("ca.pem"))
            .arg("-untrusted")
            .arg(out.join("cert.pem"))
            .arg(out.join("cert.pem")),
    );
    let cert_pub = run_ok(openssl().args(["x509", "-noout", "-pubkey", "-in"]).arg(out.join("cert.pem"))).stdout;
    let key_pub = run_ok(openssl().args(["pkey", "-pubout", "-in"]).arg(work.join("req.key"))).stdout;
    assert_eq!(cert_pub, key_pub, "the cert carries the CSR's key");
    let inspected = run_ok(ca().arg("inspect").arg(&out));
    assert!(text(&inspected.stdout).contains("absent"), "{}", text(&inspected.stdout));

    // A name outside the identity.
    let evil = make_csr(&work, "DNS:bank.example");
    let err = run_err(pki.issue_cmd("web").arg("--csr").arg(&evil).arg("--out").arg(pki.path("evil")));
    assert!(err.contains("bank.example") && err.contains("may not use"), "{err}");

    // A tampered signature: flip a byte of the DER signature.
    let der = run_ok(openssl().args(["req", "-outform", "DER", "-in"]).arg(&csr)).stdout;
    let mut bad = der.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x55;
    let bad_der = work.join("bad.der");
    std::fs::write(&bad_der, &bad).unwrap();
    let bad_pem = work.join("bad.csr");
    std::fs::write(&bad_pem, pem_wrap("CERTIFICATE REQUEST", &bad)).unwrap();
    let err = run_err(pki.issue_cmd("web").arg("--csr").arg(&bad_pem).arg("--out").arg(pki.path("bad")));
    assert!(err.contains("bad.csr") && err.contains("signature"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

fn pem_wrap(label: &str, der: &[u8]) -> String {
    let b64 = text(&run_ok(Command::new("base64").arg("-w64").arg(write_tmp(der).path())).stdout);
    format!("-----BEGIN {label}-----\n{b64}-----END {label}-----\n")
}

fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), bytes).unwrap();
    f
}

#[test]
fn inspect_reports_and_fails_on_broken_dirs() {
    let pki = Pki::new(&[]);
    let web = pki.issue("web", &[]);
    let out = run_ok(ca().arg("inspect").arg(&web));
    let shown = text(&out.stdout);
    for field in [
        "CN=web",
        "URI:spiffe://lanyard.internal/web",
        "serial:",
        "issuer:",
        "not before:",
        "not after:",
        "remaining:",
        "ECDSA P-256",
        "sha256:",
        "verifies against ca.pem",
        "matches the leaf",
    ] {
        assert!(shown.contains(field), "missing {field}: {shown}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&run_ok(ca().args(["inspect", "--json"]).arg(&web)).stdout).unwrap();
    assert_eq!(json["certificates"][0]["key_type"], "ECDSA P-256");
    assert_eq!(json["cert_dir"]["key_matches"], true);
    assert_eq!(json["certificates"][0]["sha256"].as_str().unwrap().len(), 64);

    // Mismatched key.
    let api = pki.issue("api", &[]);
    let mixed = pki.path("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(web.join("cert.pem"), mixed.join("cert.pem")).unwrap();
    std::fs::copy(web.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(api.join("key.pem"), mixed.join("key.pem")).unwrap();
    let out = run(ca().arg("inspect").arg(&mixed));
    assert!(!out.status.success() && text(&out.stdout).contains("DOES NOT MATCH"), "{}", text(&out.stdout));

    // Another CA's bundle.
    let other = Pki::new(&[]);
    std::fs::copy(other.state().join("root.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(web.join("key.pem"), mixed.join("key.pem")).unwrap();
    let out = run(ca().arg("inspect").arg(&mixed));
    assert!(!out.status.success() && text(&out.stdout).contains("DOES NOT VERIFY"), "{}", text(&out.stdout));

    // Expired: inspect two days later with libfaketime.
    let out = run(Command::new(peer("faketime")).args(["-f", "+2d"]).arg(bin("ca")).arg("inspect").arg(&web));
    assert!(!out.status.success(), "expired must fail: {}", text(&out.stdout));
    assert!(text(&out.stdout).contains("expired"), "{}", text(&out.stdout));

    // A single PEM file.
    let out = run_ok(ca().arg("inspect").arg(pki.state().join("root.pem")));
    assert!(text(&out.stdout).contains("Lanyard Root CA"));
}

#[test]
fn pkilint_finds_no_errors_or_warnings() {
    let lint = venv_tool("lint_pkix_cert");
    let pki = Pki::new(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let mut files = vec![pki.state().join("root.pem"), pki.state().join("intermediate.pem")];
    for kt in KEY_TYPES {
        let dir = pki.issue(kt, &["--key-type", kt, "--dns", &format!("{kt}.lanyard.internal")]);
        let leaf = tmp.path().join(format!("{kt}.pem"));
        first_cert(&dir.join("cert.pem"), &leaf);
        files.push(leaf);
    }
    for file in files {
        let out = run(Command::new(&lint).args(["lint", "-s", "WARNING"]).arg(&file));
        let report = text(&out.stdout);
        // pkilint's URI check (python `validators.url`) knows only web schemes
        // and flags every spiffe:// URI; that one finding is a known false positive.
        let findings: Vec<&str> = report
            .lines()
            .filter(|l| l.contains("(ERROR)") || l.contains("(WARNING)") || l.contains("(FATAL)"))
            .filter(|l| !(l.contains("pkix.invalid_uri_syntax") && l.contains("\"spiffe://")))
            .collect();
        assert!(findings.is_empty(), "{}: {report}", file.display());
        assert!(!text(&out.stderr).contains("Failed"), "{}: {}", file.display(), text(&out.stderr));
    }
}

/// `openssl s_server` requiring a client certificate, serving one connection; logs to `log`.
fn s_server(server: &Path, log: &Path) -> (u16, ChildGuard) {
    let port = free_port();
    let mut cmd = openssl();
    cmd.args([
        "s_server",
        "-accept",
        &format!("127.0.0.1:{port}"),
        "-naccept",
        "1",
        "-Verify",
        "1",
        "-verify_return_error",
        "-www",
    ])
    .arg("-cert")
    .arg(server.join("cert.pem"))
    .arg("-cert_chain")
    .arg(server.join("cert.pem"))
    .arg("-key")
    .arg(server.join("key.pem"))
    .arg("-CAfile")
    .arg(server.join("ca.pem"));
    let guard = ChildGuard::spawn(cmd, log);
    wait_for_log(log, "ACCEPT");
    (port, guard)
}

#[test]
fn openssl_s_server_and_s_client_authenticate_both_ways() {
    let pki = Pki::new(&[]);
    let server = pki.issue("server", &["--dns", "localhost"]);
    let client = pki.issue("client", &[]);
    let (port, _srv) = s_server(&server, &pki.path("s_server.log"));
    let out = run_s_client(port, &client, true);
    assert!(out.contains("Verify return code: 0 (ok)") && out.contains("HTTP/1.0 200 ok"), "{out}");
    assert!(out.contains("Client certificate"), "server saw the client cert: {out}");
    assert!(out.contains("CN=client") || out.contains("CN = client"), "{out}");

    // Without a client certificate the server refuses.
    let (port, _srv) = s_server(&server, &pki.path("s_server2.log"));
    let out = run_s_client(port, &client, false);
    assert!(!out.contains("HTTP/1.0 200 ok"), "served without a client cert: {out}");
    assert!(out.contains("alert"), "the server sent an alert: {out}");
}

fn run_s_client(port: u16, client: &Path, with_cert: bool) -> String {
    let mut cmd = openssl();
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-verify_return_error",
        "-ign_eof",
        "-servername",
        "localhost",
    ])
    .arg("-CAfile")
    .arg(client.join("ca.pem"));
    if with_cert {
        cmd.arg("-cert")
            .arg(client.join("cert.pem"))
            .arg("-cert_chain")
            .arg(client.join("cert.pem"))
            .arg("-key")
            .arg(client.join("key.pem"));
    }
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let out = child.wait_with_output().unwrap();
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

#[test]
fn rustls_pair_completes_mtls_from_cert_dirs() {
    lanyard_sidecar::install_crypto_provider();
    let pki = Pki::new(&[]);
    let server_dir = pki.issue("server", &[]);
    let client_dir = pki.issue("client", &[]);
    let now = time::OffsetDateTime::now_utc();
    let server_set = CertDir::new(&server_dir).load(now).unwrap();
    let client_set = CertDir::new(&client_dir).load(now).unwrap();
    let server_cfg = Arc::new(
        lanyard_sidecar::tls::server_config(
            &server_set,
            &lanyard_sidecar::tls::ClientAuth::Required(Vec::new().into()),
            None,
        )
        .unwrap(),
    );
    let client_cfg = Arc::new(
        lanyard_sidecar::tls::client_config(&client_set, &lanyard_sidecar::tls::ServerCheck::Hostname).unwrap(),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"pong").await.unwrap();
            tls.shutdown().await.unwrap();
            peer
        });
        let connector = tokio_rustls::TlsConnector::from(client_cfg);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("server").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong");
        let peer = server.await.unwrap();
        let info = lanyard_sidecar::certinfo::CertInfo::from_der(&peer).unwrap();
        assert_eq!(info.uris, ["spiffe://lanyard.internal/client"]);
    });
}

#[test]
fn concurrent_reader_never_sees_a_torn_pair() {
    let pki = Pki::new(&[]);
    let dir = pki.issue("web", &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let dir = CertDir::new(&dir);
        std::thread::spawn(move || {
            let (mut reads, mut failures, mut serials) = (0u64, Vec::new(), std::collections::HashSet::new());
            while !stop.load(Ordering::Relaxed) {
                match dir.load(time::OffsetDateTime::now_utc()) {
                    Ok(set) => {
                        serials.insert(set.leaf.serial);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
                reads += 1;
            }
            (reads, failures, serials.len())
        })
    };
    for _ in 0..200 {
        pki.issue_into("web", &dir, &[]);
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, failures, distinct) = reader.join().unwrap();
    assert!(failures.is_empty(), "{} of {reads} reads failed; first: {:?}", failures.len(), failures.first());
    assert!(reads > 200 && distinct > 10, "reader really overlapped the writes: {reads} reads, {distinct} serials");
    let generations = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("..gen"))
        .count();
    assert!(generations <= 2, "old generations are cleaned up: {generations} left");
}
