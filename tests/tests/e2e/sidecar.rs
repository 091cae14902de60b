//! The sidecar against real clients (curl, openssl, rustls) and real sockets:
//! admission, outbound, hot reload under load, corrupt dirs, health, PROXY v2.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lanyard_sidecar::certdir::CertDir;
use lanyard_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    lanyard_sidecar::install_crypto_provider();
    let set = CertDir::new(dir).load(time::OffsetDateTime::now_utc()).unwrap();
    let mut config = lanyard_sidecar::tls::client_config(&set, &lanyard_sidecar::tls::ServerCheck::ChainOnly).unwrap();
    // Full handshakes only, so each one shows the certificate being served.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Handshake, one echo round trip; returns the server's serial.
async fn echo_once(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("api").unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
    let serial = server_serial(&tls);
    let mut tls = BufReader::new(tls);
    tls.write_all(b"ping\n").await.map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    tls.read_line(&mut line).await.map_err(|e| format!("read: {e}"))?;
    if line != "ping\n" {
        return Err(format!("bad echo {line:?}"));
    }
    Ok(serial)
}

fn server_serial<S>(tls: &tokio_rustls::client::TlsStream<S>) -> String {
    let cert = &tls.get_ref().1.peer_certificates().unwrap()[0];
    lanyard_sidecar::certinfo::CertInfo::from_der(cert).unwrap().serial
}

fn serial_of(dir: &Path) -> String {
    CertDir::new(dir).load(time::OffsetDateTime::now_utc()).unwrap().leaf.serial
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn curl_status(url: &str, ca: &Path, client: Option<&Path>) -> String {
    let mut cmd = Command::new(peer("curl"));
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert"]).arg(ca);
    if let Some(dir) = client {
        cmd.arg("--cert").arg(dir.join("cert.pem")).arg("--key").arg(dir.join("key.pem"));
    }
    cmd.arg("--resolve").arg(format!("api:{}:127.0.0.1", url.rsplit(':').next().unwrap().trim_end_matches('/')));
    text(&run(cmd.arg(url)).stdout)
}

struct Fixture {
    pki: Pki,
    api: PathBuf,
    web: PathBuf,
}

fn fixture() -> Fixture {
    let pki = Pki::new(&[]);
    let api = pki.issue("api", &["--dns", "api", "--dns", "localhost", "--ip", "127.0.0.1"]);
    let web = pki.issue("web", &[]);
    Fixture { pki, api, web }
}

#[test]
fn inbound_admits_good_clients_and_rejects_bad_ones_by_reason() {
    let f = fixture();
    let app = http_upstream();
    let port = free_port();
    let sc = Sidecar::start(
        &[
            "--cert-dir",
            f.api.to_str().unwrap(),
            "--listen",
            &addr(port).to_string(),
            "--upstream",
            &app.to_string(),
            "--allow",
            "spiffe://lanyard.internal/web",
        ],
        f.pki.path("sidecar.log"),
    );
    let url = format!("https://api:{port}/");
    let ca = f.api.join("ca.pem");
    assert_eq!(curl_status(&url, &ca, Some(&f.web)), "200", "{}", sc.log_text());

    // openssl s_client with the issued client cert gets through too.
    let mut child = Command::new(peer("openssl"))
        .args([
            "s_client",
            "-connect",
            &addr(port).to_string(),
            "-verify_return_error",
            "-ign_eof",
            "-servername",
            "api",
            "-CAfile",
        ])
        .arg(&ca)
        .arg("-cert")
        .arg(f.web.join("cert.pem"))
        .arg("-cert_chain")
        .arg(f.web.join("cert.pem"))
        .arg("-key")
        .arg(f.web.join("key.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(text(&out.stdout).contains("hello"), "openssl got through: {}{}", text(&out.stdout), text(&out.stderr));

    // Rejections: none, another CA, expired, not yet valid, not on the allow-list.
    let other = Pki::new(&[]);
    let stranger = other.issue("web", &[]);
    let expired = f.pki.path("expired");
    run_ok(
        Command::new(peer("faketime"))
            .args(["-f", "-2d"])
            .arg(bin("ca"))
            .args(["issue", "web", "--state"])
            .arg(f.pki.state())
            .arg("--out")
            .arg(&expired),
    );
    let future = f.pki.path("future");
    run_ok(
        Command::new(peer("faketime"))
            .args(["-f", "+2d"])
            .arg(bin("ca"))
            .args(["issue", "web", "--state"])
            .arg(f.pki.state())
            .arg("--out")
            .arg(&future),
    );
    let intruder = f.pki.issue("intruder", &[]);
    let cases: [(Option<&Path>, &str); 5] = [
        (None, "no_cert"),
        (Some(&stranger), "unknown_ca"),
        (Some(&expired), "expired"),
        (Some(&future), "not_yet_valid"),
        (Some(&intruder), "not_allowed"),
    ];
    for (client, reason) in cases {
        let status = curl_status(&url, &ca, client);
        assert_ne!(status, "200", "{reason}: must be refused");
        let sample = format!(
            "lanyard_sidecar_handshakes_total{{listener=\"inbound-{port}\",result=\"rejected\",reason=\"{reason}\"}}"
        );
        wait_until(Duration::from_secs(5), &sample, || sc.metric(&sample) >= 1.0);
        assert!(sc.log_text().contains(&format!("reason=\"{reason}\"")), "logged with reason {reason}");
    }
    assert_eq!(curl_status(&url, &ca, Some(&f.web)), "200", "still serving good clients");
}

#[test]
fn outbound_reaches_inbound_and_fails_closed_on_the_wrong_identity() {
    let f = fixture();
    let app = http_upstream();
    let inbound = free_port();
    let _inb = Sidecar::start(
        &[
            "--cert-dir",
            f.api.to_str().unwrap(),
            "--listen",
            &addr(inbound).to_string(),
            "--upstream",
            &app.to_string(),
            "--allow",
            "spiffe://lanyard.internal/web",
        ],
        f.pki.path("in.log"),
    );
    let good = free_port();
    let _out = Sidecar::start(
        &[
            "--cert-dir",
            f.web.to_str().unwrap(),
            "--mode",
            "outbound",
            "--listen",
            &addr(good).to_string(),
            "--upstream",
            &format!("localhost:{inbound}"),
            "--server-name",
            "spiffe://lanyard.internal/api",
        ],
        f.pki.path("out.log"),
    );
    let status = text(
        &run(Command::new(peer("curl"))
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{good}/")))
        .stdout,
    );
    assert_eq!(status, "200", "app -> outbound -> inbound -> app");
    // Sidecar to sidecar, the key exchange is the hybrid post-quantum one.
    wait_for_log(&f.pki.path("in.log"), "group=X25519MLKEM768");
    let pq =
        format!("lanyard_sidecar_handshake_groups_total{{listener=\"inbound-{inbound}\",group=\"X25519MLKEM768\"}}");
    assert!(_inb.metric(&pq) >= 1.0, "{pq}");
    // A classical-only client (openssl 3.0 offers no ML-KEM) still gets in.
    let classical = run(Command::new(peer("openssl"))
        .args(["s_client", "-connect", &addr(inbound).to_string(), "-groups", "X25519", "-brief"])
        .arg("-cert")
        .arg(f.web.join("cert.pem"))
        .arg("-cert_chain")
        .arg(f.web.join("cert.pem"))
        .arg("-key")
        .arg(f.web.join("key.pem"))
        .arg("-CAfile")
        .arg(f.web.join("ca.pem"))
        .stdin(std::process::Stdio::null()));
    let said = text(&classical.stdout) + &text(&classical.stderr);
    assert!(said.contains("Server Temp Key: X25519") || said.contains("Peer Temp Key: X25519"), "{said}");
    wait_for_log(&f.pki.path("in.log"), "group=X25519\n");

    let bad = free_port();
    let wrong = Sidecar::start(
        &[
            "--cert-dir",
            f.web.to_str().unwrap(),
            "--mode",
            "outbound",
            "--listen",
            &addr(bad).to_string(),
            "--upstream",
            &format!("localhost:{inbound}"),
            "--server-name",
            "spiffe://lanyard.internal/db",
        ],
        f.pki.path("wrong.log"),
    );
    let out = run(Command::new(peer("curl"))
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{bad}/")));
    assert_ne!(text(&out.stdout), "200", "wrong server identity must fail closed");
    let sample = format!(
        "lanyard_sidecar_handshakes_total{{listener=\"outbound-{bad}\",result=\"rejected\",reason=\"not_allowed\"}}"
    );
    wait_until(Duration::from_secs(5), &sample, || wrong.metric(&sample) >= 1.0);
}

#[test]
fn rotation_under_load_drops_nothing_and_serves_every_new_serial() {
    let f = fixture();
    let echo = echo_upstream();
    let port = free_port();
    let sc = Sidecar::start(
        &["--cert-dir", f.api.to_str().unwrap(), "--listen", &addr(port).to_string(), "--upstream", &echo.to_string()],
        f.pki.path("sidecar.log"),
    );
    let config = client_config(&f.web);
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let requests = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = rt();
    let mut load = Vec::new();
    for _ in 0..2 {
        // New connection per request.
        let (cfg, fails, seen, halt, reqs) =
            (config.clone(), failures.clone(), seen.clone(), stop.clone(), requests.clone());
        load.push(runtime.spawn(async move {
            let (config, failures, stop, requests) = (cfg, fails, halt, reqs);
            while !stop.load(Ordering::Relaxed) {
                match echo_once(addr(port), config.clone()).await {
                    Ok(serial) => {
                        seen.lock().unwrap().insert(serial);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
                requests.fetch_add(1, Ordering::Relaxed);
            }
        }));
        // Keep-alive: one connection, many round trips.
        let (cfg, fails, halt, reqs) = (config.clone(), failures.clone(), stop.clone(), requests.clone());
        load.push(runtime.spawn(async move {
            let (config, failures, stop, requests) = (cfg, fails, halt, reqs);
            let tcp = tokio::net::TcpStream::connect(addr(port)).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("api").unwrap();
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
            let mut tls = BufReader::new(tls);
            while !stop.load(Ordering::Relaxed) {
                let mut line = String::new();
                let ok = tls.write_all(b"keepalive\n").await.is_ok() && tls.read_line(&mut line).await.is_ok();
                if !ok || line != "keepalive\n" {
                    failures.lock().unwrap().push(format!("keep-alive broke: {line:?}"));
                    return;
                }
                requests.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut issued = Vec::new();
    for _ in 0..50 {
        f.pki.issue_into("api", &f.api, &["--dns", "api"]);
        let serial = serial_of(&f.api);
        wait_until(Duration::from_secs(10), &format!("serial {serial} served"), || {
            seen.lock().unwrap().contains(&serial)
        });
        issued.push(serial);
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        runtime.block_on(t).unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "{} failures, first: {:?}", failures.len(), failures.first());
    let seen = seen.lock().unwrap();
    assert!(issued.iter().all(|s| seen.contains(s)), "every rotated serial was served");
    assert!(requests.load(Ordering::Relaxed) > 500, "real load ran: {}", requests.load(Ordering::Relaxed));
    assert!(sc.metric("lanyard_sidecar_cert_reloads_total{result=\"success\"}") >= 51.0);
    assert_eq!(sc.metric("lanyard_sidecar_cert_reloads_total{result=\"failure\"}"), 0.0);
}

/// Copies a valid set into a plain (non-symlinked) dir, like a user-managed one.
fn plain_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        let _ = std::fs::remove_file(to.join(f));
        std::fs::write(to.join(f), std::fs::read(from.join(f)).unwrap()).unwrap();
    }
}

#[test]
fn corrupt_dirs_keep_the_last_good_cert_and_recover_when_fixed() {
    let f = fixture();
    let dir = f.pki.path("plain");
    plain_copy(&f.api, &dir);
    let echo = echo_upstream();
    let port = free_port();
    let sc = Sidecar::start(
        &["--cert-dir", dir.to_str().unwrap(), "--listen", &addr(port).to_string(), "--upstream", &echo.to_string()],
        f.pki.path("sidecar.log"),
    );
    let config = client_config(&f.web);
    let runtime = rt();
    let serve = || runtime.block_on(echo_once(addr(port), config.clone()));
    let other = Pki::new(&[]);
    let foreign = other.issue("api", &["--dns", "api"]);
    let expired = f.pki.path("expired");
    run_ok(
        Command::new(peer("faketime"))
            .args(["-f", "-2d"])
            .arg(bin("ca"))
            .args(["issue", "api", "--state"])
            .arg(f.pki.state())
            .arg("--out")
            .arg(&expired),
    );
    let spare = f.pki.issue("spare", &[]);

    type Corrupt = Box<dyn Fn(&Path)>;
    let cert = std::fs::read_to_string(f.api.join("cert.pem")).unwrap();
    let corpus: Vec<(&str, Corrupt)> = vec![
        ("truncated PEM", Box::new(move |d| std::fs::write(d.join("cert.pem"), &cert[..cert.len() / 2]).unwrap())),
        (
            "key of another cert",
            Box::new(move |d| std::fs::copy(spare.join("key.pem"), d.join("key.pem")).map(|_| ()).unwrap()),
        ),
        ("expired cert", Box::new(move |d| plain_copy(&expired, d))),
        (
            "cert from another CA",
            Box::new(move |d| {
                std::fs::copy(foreign.join("cert.pem"), d.join("cert.pem")).unwrap();
                std::fs::copy(foreign.join("key.pem"), d.join("key.pem")).unwrap();
            }),
        ),
        (
            "empty files",
            Box::new(|d| {
                for f in ["cert.pem", "key.pem", "ca.pem"] {
                    std::fs::write(d.join(f), "").unwrap();
                }
            }),
        ),
        ("missing files", Box::new(|d| std::fs::remove_file(d.join("key.pem")).unwrap())),
        (
            "symlink loop",
            Box::new(|d| {
                std::fs::remove_file(d.join("cert.pem")).unwrap();
                std::os::unix::fs::symlink("cert.pem", d.join("cert.pem")).unwrap();
            }),
        ),
    ];
    let mut good = serial_of(&dir);
    assert_eq!(serve().unwrap(), good);
    for (i, (what, corrupt)) in corpus.iter().enumerate() {
        let failures_before = sc.metric("lanyard_sidecar_cert_reloads_total{result=\"failure\"}");
        corrupt(&dir);
        wait_until(Duration::from_secs(10), &format!("{what}: reload error reported"), || {
            sc.metric("lanyard_sidecar_cert_reload_error") == 1.0
                && sc.metric("lanyard_sidecar_cert_reloads_total{result=\"failure\"}") > failures_before
        });
        assert_eq!(serve().as_deref(), Ok(good.as_str()), "{what}: still serving the last good cert");
        let (code, body) = sc.get("/readyz");
        assert!(
            code == 200 && body.contains("last_reload_error") && !body.contains("\"last_reload_error\":null"),
            "{what}: {code} {body}"
        );
        // Fix it with a fresh issue; the sidecar recovers without a restart.
        let fresh = f.pki.issue(&format!("fix{i}"), &["--dns", "api"]);
        let _ = std::fs::remove_file(dir.join("cert.pem"));
        plain_copy(&fresh, &dir);
        let next = serial_of(&dir);
        wait_until(Duration::from_secs(10), &format!("{what}: recovered"), || serve().is_ok_and(|s| s == next));
        wait_until(Duration::from_secs(5), "error cleared", || sc.metric("lanyard_sidecar_cert_reload_error") == 0.0);
        good = next;
    }
    assert!(sc.log_text().contains("certificate reload failed"), "one clear error line per failure");
}

#[test]
fn starts_without_a_cert_reports_not_ready_then_becomes_ready() {
    let f = fixture();
    let dir = f.pki.path("later");
    std::fs::create_dir(&dir).unwrap();
    let app = http_upstream();
    let port = free_port();
    let mut sc = Sidecar::start(
        &["--cert-dir", dir.to_str().unwrap(), "--listen", &addr(port).to_string(), "--upstream", &app.to_string()],
        f.pki.path("sidecar.log"),
    );
    let (code, body) = sc.get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no valid certificate loaded"), "{body}");
    assert_eq!(sc.get("/healthz").0, 200, "alive while waiting");
    let health = run(Command::new(bin("sidecar"))
        .args(["health", "--url", &format!("https://{}/readyz", sc.admin), "--cert-dir"])
        .arg(&f.api));
    assert!(!health.status.success(), "health fails while not ready");
    assert!(text(&health.stderr).contains("not ready"), "{}", text(&health.stderr));
    assert!(sc.child().try_wait().unwrap().is_none(), "no crash loop");

    f.pki.issue_into("api", &dir, &["--dns", "api"]);
    wait_until(Duration::from_secs(10), "ready", || sc.get("/readyz").0 == 200);
    let health = run_ok(
        Command::new(bin("sidecar"))
            .args(["health", "--url", &format!("https://{}/readyz", sc.admin), "--cert-dir"])
            .arg(&dir),
    );
    assert!(text(&health.stdout).contains("\"ready\":true"), "{}", text(&health.stdout));

    // The upstream going away makes it not ready, with the reason.
    let dead = free_port();
    let sc2 = Sidecar::start(
        &[
            "--cert-dir",
            dir.to_str().unwrap(),
            "--listen",
            &addr(free_port()).to_string(),
            "--upstream",
            &addr(dead).to_string(),
        ],
        f.pki.path("sidecar2.log"),
    );
    let health = run(Command::new(bin("sidecar"))
        .args(["health", "--url", &format!("https://{}/readyz", sc2.admin), "--cert-dir"])
        .arg(&dir));
    assert!(!health.status.success());
    assert!(text(&health.stderr).contains("does not accept TCP"), "{}", text(&health.stderr));
    // A foreign CA's bundle cannot verify the admin endpoint.
    let other = Pki::new(&[]);
    let stranger = other.issue("x", &[]);
    let health = run(Command::new(bin("sidecar"))
        .args(["health", "--url", &format!("https://{}/readyz", sc.admin), "--cert-dir"])
        .arg(&stranger));
    assert!(!health.status.success());
}

#[test]
fn rotated_trust_bundle_is_picked_up() {
    let f = fixture();
    let dir = f.pki.path("bundle");
    plain_copy(&f.api, &dir);
    let echo = echo_upstream();
    let port = free_port();
    let sc = Sidecar::start(
        &["--cert-dir", dir.to_str().unwrap(), "--listen", &addr(port).to_string(), "--upstream", &echo.to_string()],
        f.pki.path("sidecar.log"),
    );
    let new_ca = Pki::new(&[]);
    let new_client = new_ca.issue("web", &[]);
    let runtime = rt();
    // The client trusts both roots; the sidecar does not yet trust the new one.
    let both = format!(
        "{}{}",
        std::fs::read_to_string(f.api.join("ca.pem")).unwrap(),
        std::fs::read_to_string(new_client.join("ca.pem")).unwrap()
    );
    std::fs::write(new_client.join("..data").join("ca.pem"), &both).unwrap();
    let config = client_config(&new_client);
    assert!(runtime.block_on(echo_once(addr(port), config.clone())).is_err(), "new CA not trusted yet");
    std::fs::write(dir.join("ca.pem"), &both).unwrap();
    wait_until(Duration::from_secs(10), "new root trusted", || {
        runtime.block_on(echo_once(addr(port), config.clone())).is_ok()
    });
    assert!(runtime.block_on(echo_once(addr(port), client_config(&f.web))).is_ok(), "old root still trusted");
    drop(sc);
}

#[test]
fn proxy_protocol_v2_carries_the_verified_identity() {
    let f = fixture();
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let port = free_port();
    let _sc = Sidecar::start(
        &[
            "--cert-dir",
            f.api.to_str().unwrap(),
            "--listen",
            &addr(port).to_string(),
            "--upstream",
            &up_addr.to_string(),
            "--proxy-protocol",
        ],
        f.pki.path("sidecar.log"),
    );
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let (mut conn, _) = upstream.accept().unwrap();
        let mut head = [0u8; 16];
        conn.read_exact(&mut head).unwrap();
        let len = u16::from_be_bytes([head[14], head[15]]) as usize;
        let mut rest = vec![0u8; len];
        conn.read_exact(&mut rest).unwrap();
        [head.to_vec(), rest].concat()
    });
    let runtime = rt();
    let config = client_config(&f.web);
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr(port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("api").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        let header = tokio::task::spawn_blocking(move || reader.join().unwrap()).await.unwrap();
        use lanyard_sidecar::proxy_protocol::{find_tlv, SIGNATURE, TLV_PEER_IDENTITY};
        assert_eq!(&header[..12], &SIGNATURE);
        assert_eq!(find_tlv(&header, TLV_PEER_IDENTITY), Some(&b"spiffe://lanyard.internal/web"[..]));
        let _ = tls.read(&mut [0u8; 1]).await;
    });
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    let f = fixture();
    let echo = echo_upstream();
    let port = free_port();
    let mut sc = Sidecar::start(
        &["--cert-dir", f.api.to_str().unwrap(), "--listen", &addr(port).to_string(), "--upstream", &echo.to_string()],
        f.pki.path("sidecar.log"),
    );
    let config = client_config(&f.web);
    let runtime = rt();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr(port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("api").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.unwrap();
        let mut tls = BufReader::new(tls);
        run_ok(Command::new("kill").args(["-TERM", &sc.pid().to_string()]));
        wait_until(Duration::from_secs(5), "listener closed", || std::net::TcpStream::connect(addr(port)).is_err());
        let mut line = String::new();
        tls.write_all(b"still here\n").await.unwrap();
        tls.read_line(&mut line).await.unwrap();
        assert_eq!(line, "still here\n", "the open connection keeps working while draining");
        tls.get_mut().shutdown().await.unwrap();
    });
    wait_until(Duration::from_secs(10), "exit after drain", || sc.child().try_wait().unwrap().is_some());
    assert!(sc.log_text().contains("draining"), "{}", sc.log_text());
}

#[test]
fn config_file_declares_several_listeners_and_bad_input_is_named() {
    let f = fixture();
    let echo = echo_upstream();
    let (p1, p2) = (free_port(), free_port());
    let cfg = f.pki.path("sidecar.toml");
    std::fs::write(
        &cfg,
        format!(
            "cert_dir = {:?}\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:{p1}\"\nupstream = \"{echo}\"\n[[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:{p2}\"\nupstream = \"{echo}\"\nallow = [\"spiffe://lanyard.internal/web\"]\n",
            f.api
        ),
    )
    .unwrap();
    let _sc = Sidecar::start(&["--config", cfg.to_str().unwrap()], f.pki.path("sidecar.log"));
    let runtime = rt();
    for p in [p1, p2] {
        runtime.block_on(echo_once(addr(p), client_config(&f.web))).unwrap();
    }
    std::fs::write(&cfg, "cert_dir = \"/x\"\n[[listener]]\nlisten = \"127.0.0.1:1\"\nupstream = \"nowhere\"\n")
        .unwrap();
    let err = run_err(Command::new(bin("sidecar")).args(["run", "--config"]).arg(&cfg));
    assert!(err.contains("sidecar.toml") && err.contains("HOST:PORT"), "{err}");
    let err = run_err(Command::new(bin("sidecar")).args([
        "run",
        "--cert-dir",
        "/x",
        "--listen",
        "127.0.0.1:1",
        "--upstream",
        "a:1",
        "--allow",
        "spiffe://",
    ]));
    assert!(err.contains("spiffe://") && err.lines().count() == 1, "{err}");
}

/// An HTTP server that answers with the X-Forwarded-Client-Cert lines it received.
fn xfcc_echo_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut writer = conn;
                loop {
                    let (mut line, mut seen, mut any) = (String::new(), Vec::new(), false);
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        any = true;
                        if line == "\r\n" {
                            break;
                        }
                        if line.to_ascii_lowercase().starts_with("x-forwarded-client-cert:") {
                            seen.push(line.trim().to_owned());
                        }
                        line.clear();
                    }
                    if !any {
                        return;
                    }
                    let body = seen.join("\n") + "\n";
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                    if writer.write_all(head.as_bytes()).and_then(|()| writer.write_all(body.as_bytes())).is_err() {
                        return;
                    }
                }
            });
        }
    });
    local
}

#[test]
fn http_mode_sets_a_sanitized_client_identity_header() {
    let f = fixture();
    let app = xfcc_echo_upstream();
    let port = free_port();
    let _sc = Sidecar::start(
        &[
            "--cert-dir",
            f.api.to_str().unwrap(),
            "--listen",
            &addr(port).to_string(),
            "--upstream",
            &app.to_string(),
            "--http",
        ],
        f.pki.path("sidecar.log"),
    );
    let url = format!("https://api:{port}/");
    let out = run_ok(
        Command::new(peer("curl"))
            .args([
                "-sS",
                "--max-time",
                "5",
                "-H",
                "X-Forwarded-Client-Cert: By=spiffe://evil/forged;URI=spiffe://lanyard.internal/admin",
            ])
            .arg("--cacert")
            .arg(f.api.join("ca.pem"))
            .arg("--cert")
            .arg(f.web.join("cert.pem"))
            .arg("--key")
            .arg(f.web.join("key.pem"))
            .arg("--resolve")
            .arg(format!("api:{port}:127.0.0.1"))
            .arg(&url)
            .arg(&url),
    );
    let body = text(&out.stdout);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "one header per request, two requests on one connection: {body}");
    for line in lines {
        assert!(line.contains("URI=spiffe://lanyard.internal/web"), "{line}");
        assert!(line.contains("By=spiffe://lanyard.internal/api") && line.contains("Hash="), "{line}");
        assert!(!line.contains("evil") && !line.contains("/admin"), "client's header was stripped: {line}");
    }
}

/// An inbound listener on the wildcard address and an outbound listener on
/// one specific address share a port (the compose topology): connections
/// are routed by the local address they arrived on.
#[test]
fn listeners_sharing_a_port_are_routed_by_local_address() {
    let f = fixture();
    let echo = echo_upstream();
    let port = free_port();
    let cfg = f.pki.path("shared.toml");
    std::fs::write(
        &cfg,
        format!(
            "cert_dir = {:?}\n\
             [[listener]]\nname = \"in\"\nlisten = \"0.0.0.0:{port}\"\nupstream = \"{echo}\"\n\
             [[listener]]\nname = \"out\"\nmode = \"outbound\"\nlisten = \"127.0.0.2:{port}\"\nupstream = \"127.0.0.1:{port}\"\nserver_name = \"api\"\n",
            f.api
        ),
    )
    .unwrap();
    let log = f.pki.path("shared.log");
    let _sc = Sidecar::start(&["--config", cfg.to_str().unwrap()], log.clone());
    wait_for_log(&log, "listener=out");
    // Plaintext to 127.0.0.2 goes out over mTLS, back in through the same
    // socket on 127.0.0.1, and reaches the echo app.
    let plain = |ip: &str| {
        use std::io::{BufRead, Write};
        let mut conn = std::net::TcpStream::connect((ip, port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(b"routed\n").unwrap();
        let mut line = String::new();
        let _ = std::io::BufReader::new(conn).read_line(&mut line);
        line
    };
    assert_eq!(plain("127.0.0.2"), "routed\n");
    // The same port on 127.0.0.1 is the inbound listener: TLS, not echo.
    assert_ne!(plain("127.0.0.1"), "routed\n");
    rt().block_on(echo_once(addr(port), client_config(&f.web))).unwrap();
}

/// One plaintext line to `port` on 127.0.0.1 and the echoed answer ("" when refused).
fn plain_echo(port: u16) -> String {
    use std::io::{BufRead, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    conn.write_all(b"plain\n").unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(conn).read_line(&mut line);
    line
}

/// What the compose topology needs of the sidecar besides plain mTLS:
/// outbound HTTP routed by Host (several services on one address and
/// port, and plaintext to a service outside the mesh), published ports for
/// people (TLS with optional client certificates and a redirect for plain
/// HTTP, or bytes passed through), and left-out callers let in without TLS
/// by their address only.
#[test]
fn routes_by_host_serves_people_and_admits_left_out_callers_by_address() {
    let f = fixture();
    let (alpha, beta, echo) = (xfcc_echo_upstream(), http_upstream(), echo_upstream());
    let [p_alpha, p_beta, p_out, p_people, p_none, p_from, p_other] = std::array::from_fn(|_| free_port());
    let cfg = f.pki.path("topology.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"cert_dir = {dir:?}
[[listener]]
name = "in-alpha"
listen = "127.0.0.1:{p_alpha}"
upstream = "{alpha}"
http = true
[[listener]]
name = "in-beta"
listen = "127.0.0.1:{p_beta}"
upstream = "{beta}"
http = true
[[listener]]
name = "out"
mode = "outbound"
listen = "127.0.0.1:{p_out}"
[[listener.route]]
host = ["alpha", "alpha-alias"]
upstream = "127.0.0.1:{p_alpha}"
server_name = "api"
[[listener.route]]
host = ["beta"]
upstream = "127.0.0.1:{p_beta}"
server_name = "api"
[[listener.route]]
host = ["legacy"]
upstream = "{beta}"
[[listener]]
name = "people"
listen = "127.0.0.1:{p_people}"
upstream = "{alpha}"
tls = "tls"
http = true
[[listener]]
name = "passthrough"
listen = "127.0.0.1:{p_none}"
upstream = "{echo}"
tls = "none"
[[listener]]
name = "from-localhost"
listen = "127.0.0.1:{p_from}"
upstream = "{echo}"
plain_from = ["localhost"]
[[listener]]
name = "from-nobody"
listen = "127.0.0.1:{p_other}"
upstream = "{echo}"
plain_from = ["nobody.invalid"]
"#,
            dir = f.api
        ),
    )
    .unwrap();
    let log = f.pki.path("topology.log");
    let _sc = Sidecar::start(&["--config", cfg.to_str().unwrap()], log.clone());
    wait_for_log(&log, "listener=from-nobody");

    let curl = |args: &[&str], url: String| {
        let out = run(Command::new(peer("curl")).args(["-sS", "--max-time", "5", "-D", "-"]).args(args).arg(url));
        text(&out.stdout) + &text(&out.stderr)
    };
    // Outbound: the Host header picks the upstream; mTLS to the two mesh
    // services (alpha sees the sidecar's identity), plaintext to the legacy one.
    let via = |host: &str| curl(&["-H", &format!("Host: {host}")], format!("http://127.0.0.1:{p_out}/"));
    let alpha_answer = via("alpha");
    assert!(alpha_answer.contains("URI=spiffe://lanyard.internal/api"), "{alpha_answer}");
    assert!(via("alpha-alias:8080").contains("URI=spiffe://lanyard.internal/api"));
    assert!(via("beta").contains("hello"), "{}", via("beta"));
    assert!(via("legacy").contains("hello"), "{}", via("legacy"));
    let unknown = via("elsewhere");
    assert!(unknown.starts_with("HTTP/1.1 502") && unknown.contains("elsewhere"), "{unknown}");

    // People: HTTPS without a client certificate (no identity header), with one (its identity), redirect for HTTP.
    let ca = f.api.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let anonymous = curl(&["--cacert", ca], format!("https://localhost:{p_people}/"));
    assert!(anonymous.starts_with("HTTP/1.1 200") && !anonymous.contains("URI="), "{anonymous}");
    let (cert, key) = (f.web.join("cert.pem"), f.web.join("key.pem"));
    let with_cert = curl(
        &["--cacert", ca, "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()],
        format!("https://localhost:{p_people}/"),
    );
    assert!(with_cert.contains("URI=spiffe://lanyard.internal/web"), "{with_cert}");
    let redirect = curl(&[], format!("http://localhost:{p_people}/a/b?c=d"));
    assert!(redirect.starts_with("HTTP/1.1 308"), "{redirect}");
    assert!(redirect.contains(&format!("Location: https://localhost:{p_people}/a/b?c=d")), "{redirect}");

    // Bytes through unchanged; plaintext admitted only from a listed name's address.
    assert_eq!(plain_echo(p_none), "plain\n");
    assert_eq!(plain_echo(p_from), "plain\n");
    assert_ne!(plain_echo(p_other), "plain\n");
    // The listed name still needs mTLS from anywhere else: a TLS client is served too.
    rt().block_on(echo_once(addr(p_other), client_config(&f.web))).unwrap();
}

/// `kx = "require"`: only the post-quantum hybrid is accepted; a
/// classical-only client (openssl 3.0) is refused with reason `kx_mismatch`.
#[test]
fn kx_require_refuses_classical_only_clients_by_reason() {
    let f = fixture();
    let echo = echo_upstream();
    let port = free_port();
    let sc = Sidecar::start(
        &[
            "--cert-dir",
            f.api.to_str().unwrap(),
            "--listen",
            &addr(port).to_string(),
            "--upstream",
            &echo.to_string(),
            "--kx",
            "require",
        ],
        f.pki.path("kx.log"),
    );
    rt().block_on(echo_once(addr(port), client_config(&f.web))).unwrap();
    let (cert, key) = (f.web.join("cert.pem"), f.web.join("key.pem"));
    let classical = openssl_classical(
        &addr(port).to_string(),
        &[
            "-cert".as_ref(),
            cert.as_os_str(),
            "-cert_chain".as_ref(),
            cert.as_os_str(),
            "-key".as_ref(),
            key.as_os_str(),
        ],
    );
    assert!(!classical.status.success(), "a classical-only client got in: {classical:?}");
    // The admin endpoint is under the policy too, so curl (OpenSSL 3.0)
    // cannot read it: `sidecar health` (rustls, post-quantum) can.
    let refused = sc.try_get("/metrics");
    assert!(refused.is_err(), "a classical-only client read the admin endpoint: {refused:?}");
    let metrics = || sidecar_get(&format!("https://{}/metrics", sc.admin), &f.api);
    let sample = format!(
        "lanyard_sidecar_handshakes_total{{listener=\"inbound-{port}\",result=\"rejected\",reason=\"kx_mismatch\"}} 1"
    );
    wait_until(Duration::from_secs(5), &sample, || metrics().contains(&sample));
    let pq =
        format!("lanyard_sidecar_handshake_groups_total{{listener=\"inbound-{port}\",group=\"X25519MLKEM768\"}} 1");
    assert!(metrics().contains(&pq), "{pq} in\n{}", metrics());
}

/// The edge under both key-exchange policies: with `prefer` (the default)
/// OpenSSL 3.0's classical handshake is served; with `require` it is
/// refused and counted as `kx_mismatch`, while a post-quantum client
/// (rustls) negotiates X25519MLKEM768.
#[test]
fn edge_serves_classical_clients_under_prefer_and_refuses_them_under_require() {
    let f = fixture();
    let app = http_upstream();
    let start_edge = |kx: &str| {
        let (https, http) = (free_port(), free_port());
        let sc = Sidecar::start(
            &[
                "--mode",
                "edge",
                "--cert-dir",
                f.api.to_str().unwrap(),
                "--public-cert-dir",
                f.api.to_str().unwrap(),
                "--listen",
                &addr(https).to_string(),
                "--http-listen",
                &addr(http).to_string(),
                "--upstream",
                &app.to_string(),
                "--kx",
                kx,
            ],
            f.pki.path(&format!("edge-{kx}.log")),
        );
        (sc, https)
    };
    let root = f.pki.state().join("root.pem");
    let verify = ["-CAfile".as_ref(), root.as_os_str(), "-verify_return_error".as_ref()];

    let (prefer, port) = start_edge("prefer");
    let classical = openssl_classical(&addr(port).to_string(), &verify);
    assert!(classical.status.success(), "prefer serves a classical-only client: {classical:?}");
    let (_, metrics) = prefer.get("/metrics");
    assert!(
        metrics.contains("lanyard_sidecar_handshake_groups_total{listener=\"edge-edge\",group=\"X25519\"} 1"),
        "{metrics}"
    );

    let (require, port) = start_edge("require");
    let classical = openssl_classical(&addr(port).to_string(), &verify);
    assert!(!classical.status.success(), "require refuses a classical-only client: {classical:?}");
    let page = sidecar_get(&format!("https://localhost:{port}/"), &f.api);
    assert!(!page.contains("failed"), "a post-quantum client is served: {page}");
    let metrics = || sidecar_get(&format!("https://{}/metrics", require.admin), &f.api);
    let refused =
        "lanyard_sidecar_handshakes_total{listener=\"edge-edge\",result=\"rejected\",reason=\"kx_mismatch\"} 1";
    wait_until(Duration::from_secs(5), refused, || metrics().contains(refused));
    let pq = "lanyard_sidecar_handshake_groups_total{listener=\"edge-edge\",group=\"X25519MLKEM768\"} 1";
    assert!(metrics().contains(pq), "{pq} in\n{}", metrics());
}
