//! `ca serve` against real peers: rotation picked up by running sidecars,
//! the signing API through curl, CRL enforcement, crash safety, backups.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lanyard_sidecar::certdir::CertDir;
use lanyard_tests::*;

mod enrol;
mod redis;
use serde_json::{json, Value};

fn serial_of(dir: &Path) -> Option<String> {
    CertDir::new(dir).load(time::OffsetDateTime::now_utc()).ok().map(|s| s.leaf.serial)
}

/// The leaf serial in `dir`, valid now or not.
fn written_serial(dir: &Path) -> String {
    let raw = CertDir::new(dir).read_raw().unwrap();
    let certs = lanyard_sidecar::certdir::parse_certs(dir, &raw.cert).unwrap();
    lanyard_sidecar::certinfo::CertInfo::from_der(&certs[0]).unwrap().serial
}

/// api's app (an echo server) behind api's inbound sidecar, which admits
/// only web, and web's outbound sidecar in front of it.
struct Mesh {
    inbound: u16,
    inb: Sidecar,
    out: Sidecar,
    /// The outbound sidecar's plaintext address: app -> outbound -> mTLS -> inbound -> app.
    addr: SocketAddr,
}

impl Mesh {
    fn start(pki: &Pki, api: &Path, web: &Path) -> Self {
        let free = || format!("127.0.0.1:{}", free_port()).parse().unwrap();
        Self::start_at(pki, api, web, [free(), free()])
    }

    /// With the inbound's and the outbound's admin endpoints at `admins`.
    fn start_at(pki: &Pki, api: &Path, web: &Path, admins: [SocketAddr; 2]) -> Self {
        let app = echo_upstream();
        let inbound = free_port();
        let inb = Sidecar::start_at(
            admins[0],
            &[
                "--cert-dir",
                api.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{inbound}"),
                "--upstream",
                &app.to_string(),
                "--allow",
                "spiffe://lanyard.internal/web",
            ],
            pki.path("in.log"),
        );
        let outbound = free_port();
        let out = Sidecar::start_at(
            admins[1],
            &[
                "--cert-dir",
                web.to_str().unwrap(),
                "--mode",
                "outbound",
                "--listen",
                &format!("127.0.0.1:{outbound}"),
                "--upstream",
                &format!("localhost:{inbound}"),
                "--server-name",
                "spiffe://lanyard.internal/api",
            ],
            pki.path("out.log"),
        );
        Self { inbound, inb, out, addr: format!("127.0.0.1:{outbound}").parse().unwrap() }
    }
}

/// One request through the mesh on a new connection: the echoed line.
fn ping(addr: SocketAddr) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"ping\n")?;
    let mut line = String::new();
    std::io::BufReader::new(conn).read_line(&mut line)?;
    Ok(line)
}

/// Requests through the mesh on a thread of their own until dropped;
/// counts successes and keeps the failures.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failures) = (0, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match ping(addr) {
                    Ok(line) if line == "ping\n" => ok += 1,
                    other => failures.push(format!("request {}: {other:?}", ok + failures.len())),
                }
            }
            (ok, failures)
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops, and asserts that no request failed; the number answered.
    fn finish(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (requests, failures) =
            self.thread.take().expect("running").join().expect("the traffic thread does not panic");
        assert!(
            failures.is_empty(),
            "{} of {} requests failed: {:?}",
            failures.len(),
            requests + failures.len(),
            &failures[..failures.len().min(5)]
        );
        requests
    }
}

fn identity(name: &str, ttl: &str, out: &Path, extra: &str) -> String {
    format!("[[identity]]\nname = \"{name}\"\nttl = \"{ttl}\"\nout_dir = {out:?}\n{extra}\n")
}

fn csr(dir: &Path, cn: &str, san: &str) -> String {
    let key = dir.join(format!("{cn}.key"));
    let out = run_ok(
        Command::new(peer("openssl"))
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
            ])
            .args(["-addext", &format!("subjectAltName={san}"), "-keyout"])
            .arg(&key),
    );
    text(&out.stdout)
}

fn token(pki: &Pki, name: &str, ttl: &str) -> String {
    text(&run_ok(ca().args(["token", name, "--ttl", ttl, "--state"]).arg(pki.state())).stdout).trim().to_owned()
}

#[test]
fn short_lived_certs_rotate_and_running_sidecars_pick_them_up() {
    let pki = Pki::new(&[]);
    let (api, web) = (pki.path("certs/api"), pki.path("certs/web"));
    let ids = identity("api", "9s", &api, "dns = [\"api\", \"localhost\"]") + &identity("web", "9s", &web, "");
    let server = CaServer::start(&pki, &ids);
    wait_until(Duration::from_secs(10), "first issue of both identities", || {
        serial_of(&api).is_some() && serial_of(&web).is_some()
    });

    let Mesh { inbound, inb, out, addr } = Mesh::start(&pki, &api, &web);
    let (mut api_serials, mut web_serials) = (HashSet::new(), HashSet::new());
    let mut requests = 0;
    let start = std::time::Instant::now();
    while api_serials.len() < 4 || web_serials.len() < 4 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rotations too slow: api {api_serials:?} web {web_serials:?}\n{}",
            server.log_text()
        );
        // A new connection each time: app -> outbound -> mTLS -> inbound -> app.
        use std::io::{BufRead, Write};
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(b"ping\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(conn).read_line(&mut line).unwrap();
        assert_eq!(line, "ping\n", "request {requests} failed");
        requests += 1;
        api_serials.extend(serial_of(&api));
        web_serials.extend(serial_of(&web));
    }
    // Every handshake succeeded on both sides, across several rotations.
    assert_eq!(
        rejected_handshakes(&inb, &format!("inbound-{inbound}")),
        0.0,
        "no failed handshake on the inbound side"
    );
    assert!(inb.metric("lanyard_sidecar_cert_reloads_total{result=\"success\"}") >= 4.0);
    assert!(out.metric("lanyard_sidecar_cert_reloads_total{result=\"success\"}") >= 4.0);
    let (_, metrics) = curl_api(&pki, "GET", &server.url("/metrics"), None, None);
    assert!(metrics.contains("lanyard_ca_renewed_total{result=\"success\"}"), "{metrics}");
    // The CA's own certificates are watched too: about a year left, no alarm.
    let left = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lanyard_ca_certificate_seconds_left{role=\"intermediate\"} "))
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no intermediate expiry gauge in\n{metrics}"));
    assert!((364 * 86_400..=365 * 86_400).contains(&left), "{left}");
    assert!(metrics.contains("lanyard_ca_certificate_alarm{role=\"intermediate\"} 0"), "{metrics}");
    let (code, health) = curl_api(&pki, "GET", &server.url("/health"), None, None);
    let h: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(code, 200);
    assert_eq!(h["status"], "healthy", "{health}");
    assert_eq!(h["scheduler"], true);
    assert_eq!(h["store"], "healthy");
    assert_eq!(h["https_enabled"], true);
    assert_eq!(h["certificates_loaded"], 4, "api, web, the API's own cert and the admin credential");
    assert_eq!(h["alarms"], serde_json::json!([]), "{health}");
    assert_eq!(h["ca_certificates"][1]["role"], "intermediate", "{health}");
}

#[test]
fn signing_api_paths_and_refusals() {
    let pki = Pki::new(&[]);
    let server = CaServer::start(&pki, "");
    let work = pki.path("work");
    std::fs::create_dir_all(&work).unwrap();

    // Token sign.
    let tok = token(&pki, "web", "5m");
    let body = json!({"token": tok, "csr": csr(&work, "web", "DNS:web")}).to_string();
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/sign"), Some(&body), None);
    assert_eq!(code, 200, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    let web = pki.path("web-signed");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::write(web.join("cert.pem"), v["certificate"].as_str().unwrap()).unwrap();
    std::fs::write(web.join("ca.pem"), v["ca"].as_str().unwrap()).unwrap();
    std::fs::copy(work.join("web.key"), web.join("key.pem")).unwrap();
    run_ok(ca().arg("inspect").arg(&web));

    // The same token again, an expired token, a token for another name.
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/sign"), Some(&body), None);
    assert!(code == 401 && resp.contains("already used"), "{code} {resp}");
    let short = token(&pki, "web", "1s");
    let expiry = std::time::Instant::now() + Duration::from_secs(2);
    wait_until(Duration::from_secs(5), "the token's lifetime to pass", || std::time::Instant::now() > expiry);
    let body = json!({"token": short, "csr": csr(&work, "web", "DNS:web")}).to_string();
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/sign"), Some(&body), None);
    assert!(code == 401 && resp.contains("expired"), "{code} {resp}");
    let other = token(&pki, "api", "5m");
    let body = json!({"token": other, "csr": csr(&work, "web2", "DNS:web")}).to_string();
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/sign"), Some(&body), None);
    assert!(code == 403 && resp.contains("may not use"), "{code} {resp}");

    // mTLS renew with the signed cert.
    let body = json!({"csr": csr(&work, "web-renew", "DNS:web")}).to_string();
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/renew"), Some(&body), Some(&web));
    assert_eq!(code, 200, "{resp}");
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/renew"), Some(&body), None);
    assert!(code == 401, "renew without a client cert: {code} {resp}");

    // Admin calls without, and with, the admin certificate.
    let serial = serial_of_pem(v["certificate"].as_str().unwrap());
    let revoke = json!({"serial": serial}).to_string();
    let (code, _) = curl_api(&pki, "POST", &server.url("/v1/revoke"), Some(&revoke), None);
    assert_eq!(code, 401, "no client cert");
    let (code, _) = curl_api(&pki, "POST", &server.url("/v1/revoke"), Some(&revoke), Some(&web));
    assert_eq!(code, 403, "a service cert is not the admin cert");
    let (code, _) = curl_api(&pki, "GET", &server.url("/v1/certificates"), None, Some(&web));
    assert_eq!(code, 403);
    let admin = pki.state().join("admin");
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/revoke"), Some(&revoke), Some(&admin));
    assert_eq!(code, 200, "{resp}");
    let (code, resp) = curl_api(&pki, "GET", &server.url("/v1/certificates"), None, Some(&admin));
    assert!(code == 200 && resp.contains(&serial), "{resp}");

    // A renew with the revoked cert is refused: by the TLS layer once the new
    // CRL is loaded (alert "certificate revoked"), by the store check before.
    let (code, resp) = curl_api(&pki, "POST", &server.url("/v1/renew"), Some(&body), Some(&web));
    let refused = (code == 403 && resp.contains("revoked")) || (code == 0 && resp.contains("certificate revoked"));
    assert!(refused, "{code} {resp}");

    // The CRL lists it, and openssl agrees.
    let (code, crl) = curl_api(&pki, "GET", &server.url("/v1/crl"), None, None);
    assert_eq!(code, 200);
    std::fs::write(work.join("crl.pem"), &crl).unwrap();
    let shown = text(
        &run_ok(Command::new(peer("openssl")).args(["crl", "-noout", "-text", "-in"]).arg(work.join("crl.pem"))).stdout,
    );
    assert!(shown.to_lowercase().contains(&serial), "{shown}");
    let (code, roots) = curl_api(&pki, "GET", &server.url("/v1/roots"), None, None);
    assert!(code == 200 && roots.contains("BEGIN CERTIFICATE"));

    // Bad input is a clear 4xx, never a 500.
    for (method, path, body, expect) in [
        ("POST", "/v1/sign", "{not json", 400),
        ("POST", "/v1/sign", "{\"token\": 1}", 400),
        ("POST", "/v1/sign", &json!({"token": token(&pki, "web", "5m"), "csr": "garbage"}).to_string(), 400),
        ("POST", "/v1/sign", &"x".repeat(100_000), 413),
        ("GET", "/v1/sign", "", 405),
        ("GET", "/nowhere", "", 404),
        ("POST", "/v1/revoke", "{}", 401),
    ] {
        let (code, resp) = curl_api(&pki, method, &server.url(path), (!body.is_empty()).then_some(body), None);
        assert_eq!(code, expect, "{method} {path}: {resp}");
        assert!(resp.contains("\"error\""), "{resp}");
    }
    let (code, _) = curl_api(&pki, "POST", &server.url("/v1/revoke"), Some("{}"), Some(&admin));
    assert_eq!(code, 400);
    assert!(!server.log_text().contains("panicked"));
}

fn serial_of_pem(pem: &str) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), pem).unwrap();
    let out = run_ok(Command::new(peer("openssl")).args(["x509", "-noout", "-serial", "-in"]).arg(f.path()));
    text(&out.stdout).trim().trim_start_matches("serial=").to_lowercase().trim_start_matches('0').to_owned()
}

#[test]
fn revocation_reaches_sidecars_through_the_crl() {
    let pki = Pki::new(&[]);
    let api = pki.path("certs/api");
    let web = pki.path("certs/web");
    let ids = identity("api", "1h", &api, "dns = [\"api\", \"localhost\"]") + &identity("web", "1h", &web, "");
    let server = CaServer::start(&pki, &ids);
    wait_until(Duration::from_secs(10), "first issue", || serial_of(&api).is_some() && serial_of(&web).is_some());
    let echo_addr = echo_upstream();
    let port = free_port();
    let sc = Sidecar::start(
        &[
            "--cert-dir",
            api.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &echo_addr.to_string(),
        ],
        pki.path("sc.log"),
    );

    // A second client cert for "web" that the CA knows, issued through the API.
    let work = pki.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let body = json!({"token": token(&pki, "web", "5m"), "csr": csr(&work, "web", "DNS:web")}).to_string();
    let (_, resp) = curl_api(&pki, "POST", &server.url("/v1/sign"), Some(&body), None);
    let v: Value = serde_json::from_str(&resp).unwrap();
    let client = pki.path("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::write(client.join("cert.pem"), v["certificate"].as_str().unwrap()).unwrap();
    std::fs::copy(work.join("web.key"), client.join("key.pem")).unwrap();
    std::fs::write(client.join("ca.pem"), v["ca"].as_str().unwrap()).unwrap();
    // A rustls client that keeps its TLS session, to try resuming after the revocation.
    lanyard_sidecar::install_crypto_provider();
    let set = CertDir::new(&client).load(time::OffsetDateTime::now_utc()).unwrap();
    let resuming = std::sync::Arc::new(
        lanyard_sidecar::tls::client_config(&set, &lanyard_sidecar::tls::ServerCheck::ChainOnly).unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let handshake = |config: std::sync::Arc<rustls::ClientConfig>| {
        runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
            let name = rustls::pki_types::ServerName::try_from("api").unwrap();
            let mut tls =
                tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
            // TLS 1.3: the server's verdict on the client certificate arrives after the handshake.
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buf)).await {
                Ok(Err(e)) => Err(e.to_string()),
                _ => Ok(tls.get_ref().1.handshake_kind()),
            }
        })
    };
    assert_eq!(handshake(resuming.clone()), Ok(Some(rustls::HandshakeKind::Full)));
    assert_eq!(
        handshake(resuming.clone()),
        Ok(Some(rustls::HandshakeKind::Resumed)),
        "sessions resume before the revocation"
    );

    let connect = || {
        let out = run(Command::new(peer("curl"))
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", "--cacert"])
            .arg(api.join("ca.pem"))
            .arg("--cert")
            .arg(client.join("cert.pem"))
            .arg("--key")
            .arg(client.join("key.pem"))
            .arg("--resolve")
            .arg(format!("api:{port}:127.0.0.1"))
            .arg(format!("https://api:{port}/")));
        text(&out.stdout)
    };
    let revoked_sample = format!(
        "lanyard_sidecar_handshakes_total{{listener=\"inbound-{port}\",result=\"rejected\",reason=\"revoked\"}}"
    );
    connect();
    assert_eq!(sc.metric(&revoked_sample), 0.0);
    let revoke = json!({"serial": v["serial"]}).to_string();
    let (code, resp) =
        curl_api(&pki, "POST", &server.url("/v1/revoke"), Some(&revoke), Some(&pki.state().join("admin")));
    assert_eq!(code, 200, "{resp}");
    wait_until(Duration::from_secs(10), "crl.pem distributed", || {
        std::fs::read_to_string(api.join("crl.pem")).is_ok_and(|crl| !crl.is_empty())
            && sc.metric("lanyard_sidecar_cert_reloads_total{result=\"success\"}") >= 2.0
    });
    wait_until(Duration::from_secs(10), "revoked client refused", || {
        connect();
        sc.metric(&revoked_sample) >= 1.0
    });
    // The new CRL also started a new session cache: the revoked client cannot resume.
    let after = handshake(resuming.clone());
    assert!(after.as_ref().is_err_and(|e| e.contains("Revoked")), "a revoked client resumed its session: {after:?}");
}

#[test]
fn crash_during_a_signing_burst_keeps_serials_unique_and_dirs_valid() {
    let pki = Pki::new(&[]);
    let dirs: Vec<_> = (0..3).map(|i| pki.path(&format!("certs/s{i}"))).collect();
    let ids: String = dirs.iter().enumerate().map(|(i, d)| identity(&format!("s{i}"), "6s", d, "")).collect();
    let server = CaServer::start(&pki, &ids);
    wait_until(Duration::from_secs(10), "first issue", || dirs.iter().all(|d| serial_of(d).is_some()));
    let work = pki.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let csr_pem = csr(&work, "burst", "DNS:burst");
    // 1000 signings through the API from 4 threads, with the CA killed midway.
    let tokens: Vec<String> = (0..1000).map(|_| token(&pki, "burst", "10m")).collect();
    let url = server.url("/v1/sign");
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = tokens
        .chunks(250)
        .map(|chunk| {
            let (chunk, url, csr_pem, ok, root) =
                (chunk.to_vec(), url.clone(), csr_pem.clone(), ok.clone(), pki.state().join("root.pem"));
            std::thread::spawn(move || {
                for t in chunk {
                    let body = json!({"token": t, "csr": csr_pem}).to_string();
                    let out = run(Command::new("curl")
                        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert"])
                        .arg(&root)
                        .args(["-XPOST", "--data", &body])
                        .arg(&url));
                    if text(&out.stdout) == "200" {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(60), "burst under way", || ok.load(std::sync::atomic::Ordering::Relaxed) >= 100);
    run_ok(Command::new("kill").args(["-9", &server.pid().to_string()]));
    for h in handles {
        h.join().unwrap();
    }
    // Every cert dir is a complete, consistent set (its 6 s certificate may
    // have expired while the CA was down, so check it inside its own window).
    for d in &dirs {
        let raw = CertDir::new(d).read_raw().unwrap();
        let certs = lanyard_sidecar::certdir::parse_certs(d, &raw.cert).unwrap();
        let leaf = lanyard_sidecar::certinfo::CertInfo::from_der(&certs[0]).unwrap();
        let at = leaf.not_before + time::Duration::seconds(1);
        assert!(raw.validate(at).is_ok(), "{} is a valid set after kill -9: {:?}", d.display(), raw.validate(at).err());
    }
    // Restart: the store opens, serials are unique, rotation resumes.
    let config = server.config.clone();
    drop(server);
    let restarted = CaServer::start_with(&pki, config, free_port(), free_port());
    // (Under load a 6 s certificate may have expired while the CA was down.)
    let before: Vec<_> = dirs.iter().map(|d| written_serial(d)).collect();
    wait_until(Duration::from_secs(20), "rotation resumes after restart", || {
        dirs.iter().zip(&before).all(|(d, b)| serial_of(d).is_some_and(|s| &s != b))
    });
    let db = pki.state().join("lanyard.db");
    let out = run_ok(Command::new(venv_tool("python")).arg("-c").arg(format!(
        "import sqlite3; c = sqlite3.connect({:?}); print(c.execute('pragma integrity_check').fetchone()[0]); print(c.execute('select count(*), count(distinct serial) from certificates').fetchone())",
        db
    )));
    let report = text(&out.stdout);
    assert!(report.starts_with("ok"), "{report}");
    let counts = report.lines().nth(1).unwrap();
    let (total, distinct) = counts.trim_matches(|c| c == '(' || c == ')').split_once(", ").unwrap();
    assert_eq!(total, distinct, "serials unique");
    assert!(
        total.parse::<usize>().unwrap() >= ok.load(std::sync::atomic::Ordering::Relaxed),
        "every answered signing is recorded"
    );
    drop(restarted);
}

#[test]
fn status_check_and_backup_restore() {
    let pki = Pki::new(&[]);
    let web = pki.path("certs/web");
    let server = CaServer::start(&pki, &identity("web", "1h", &web, ""));
    wait_until(Duration::from_secs(10), "first issue", || serial_of(&web).is_some());
    let status = text(&run_ok(ca().args(["status", "--state"]).arg(pki.state())).stdout);
    assert!(
        status.contains("web") && status.contains("DNS:web") && status.contains(&serial_of(&web).unwrap()),
        "{status}"
    );
    let json: Value =
        serde_json::from_slice(&run_ok(ca().args(["status", "--json", "--state"]).arg(pki.state())).stdout).unwrap();
    assert!(json.as_array().unwrap().iter().any(|r| r["identity"] == "web" && r["trouble"].is_null()));
    run_ok(ca().args(["check", "web", "--state"]).arg(pki.state()));
    let err = run_err(ca().args(["check", "nobody", "--state"]).arg(pki.state()));
    assert!(err.contains("not managed"), "{err}");

    // A backup taken while the CA runs restores into a working CA.
    let backup = pki.path("backup.json");
    run_ok(ca().arg("backup").arg(&backup).arg("--state").arg(pki.state()));
    drop(server);
    let restored = pki.path("restored");
    run_ok(ca().arg("restore").arg(&backup).arg("--state").arg(&restored));
    let err = run_err(ca().arg("restore").arg(&backup).arg("--state").arg(&restored));
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(restored.join("root.pem")).unwrap(), std::fs::read(pki.state().join("root.pem")).unwrap());
    let status = text(&run_ok(ca().args(["status", "--state"]).arg(&restored)).stdout);
    assert!(status.contains(&serial_of(&web).unwrap()), "the store came along: {status}");
    run_ok(ca().args(["issue", "x", "--state"]).arg(&restored).arg("--out").arg(pki.path("x")));
    std::fs::write(pki.path("junk.json"), "{}").unwrap();
    let err = run_err(ca().arg("restore").arg(pki.path("junk.json")).arg("--state").arg(pki.path("r2")));
    assert!(err.contains("junk.json") && err.contains("not a Lanyard backup"), "{err}");
}

#[test]
fn plain_http_redirects_to_https_and_env_overrides_ports() {
    let pki = Pki::new(&[]);
    let server = CaServer::start(&pki, "");
    let out = run_ok(
        Command::new(peer("curl"))
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}"])
            .arg(format!("http://127.0.0.1:{}/v1/roots", server.http_port)),
    );
    assert_eq!(text(&out.stdout), format!("308 https://127.0.0.1:{}/v1/roots", server.https_port));
    drop(server);
    let port = free_port();
    let config = pki.path("lanyard.toml");
    let log = pki.path("env.log");
    let mut cmd = ca();
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .env("HTTPS_PORT", port.to_string())
        .env("HTTP_PORT", free_port().to_string());
    let _g = ChildGuard::spawn(cmd, &log);
    wait_for_port(format!("127.0.0.1:{port}").parse().unwrap());
}

/// The serial of certificate `index` in `dir`'s cert.pem (0 the leaf, 1 its intermediate).
fn chain_serial(dir: &Path, index: usize) -> Option<String> {
    let raw = CertDir::new(dir).read_raw().ok()?;
    let certs = lanyard_sidecar::certdir::parse_certs(dir, &raw.cert).ok()?;
    Some(lanyard_sidecar::certinfo::CertInfo::from_der(certs.get(index)?).ok()?.serial)
}

/// No CA certificate expires in service: with a 150 s intermediate and
/// 20 s leaves, `ca serve` rolls the intermediate at 2/3 of its life while
/// traffic flows app -> outbound -> mTLS -> inbound -> app. Not one request
/// fails, every leaf afterwards chains to the new intermediate, the trust
/// bundle is unchanged, and the old intermediate's CRL is still published
/// beside the new one's while its leaves may live.
#[test]
fn the_intermediate_rolls_over_under_traffic_with_no_failed_request() {
    let pki = Pki::new(&["--intermediate-ttl", "150s"]);
    let old_intermediate = text(&std::fs::read(pki.state().join("intermediate.pem")).unwrap());
    let (api, web) = (pki.path("certs/api"), pki.path("certs/web"));
    let ids = identity("api", "20s", &api, "dns = [\"api\", \"localhost\"]") + &identity("web", "20s", &web, "");
    let server = CaServer::start(&pki, &ids);
    wait_until(Duration::from_secs(10), "first issue of both identities", || {
        serial_of(&api).is_some() && serial_of(&web).is_some()
    });
    let root = std::fs::read(api.join("ca.pem")).unwrap();
    let first_chain = chain_serial(&api, 1).unwrap();

    let Mesh { inbound, inb, out: _out, addr } = Mesh::start(&pki, &api, &web);
    let (mut requests, mut failures) = (0usize, Vec::new());
    let (mut two_crls, mut after_roll) = (false, None::<String>);
    let start = std::time::Instant::now();
    let rolled =
        |new: &str| chain_serial(&api, 1).as_deref() == Some(new) && chain_serial(&web, 1).as_deref() == Some(new);
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(200),
            "no rollover seen: {requests} requests\n{}",
            server.log_text()
        );
        match ping(addr) {
            Ok(line) if line == "ping\n" => requests += 1,
            other => failures.push(format!("request {requests}: {other:?}")),
        }
        let current = text(&std::fs::read(pki.state().join("intermediate.pem")).unwrap());
        if current != old_intermediate {
            let crl = std::fs::read_to_string(api.join("crl.pem")).unwrap_or_default();
            two_crls |= crl.matches("BEGIN X509 CRL").count() == 2;
            let new = lanyard_sidecar::certinfo::CertInfo::from_der(
                &lanyard_sidecar::certdir::parse_certs(&pki.state(), current.as_bytes()).unwrap()[0],
            )
            .unwrap()
            .serial;
            if rolled(&new) {
                // Then one more rotation from the new intermediate, under traffic.
                let leaf = chain_serial(&api, 0);
                match &after_roll {
                    None => after_roll = leaf,
                    Some(first) if leaf.as_ref() != Some(first) => break,
                    Some(_) => {}
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        requests + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_ne!(chain_serial(&api, 1).unwrap(), first_chain, "the leaves chain to a new intermediate");
    assert_eq!(std::fs::read(api.join("ca.pem")).unwrap(), root, "the trust bundle did not change");
    assert!(two_crls, "the old intermediate's CRL was published beside the new one's");
    assert!(server.log_text().contains("intermediate rolled over"), "{}", server.log_text());
    assert_eq!(
        rejected_handshakes(&inb, &format!("inbound-{inbound}")),
        0.0,
        "no failed handshake on the inbound side"
    );
    let check = run(ca().args(["check", "--state"]).arg(pki.state()));
    assert!(check.status.success(), "after the rollover the CA has no alarm: {check:?}");
    eprintln!("{requests} requests across the intermediate rollover, none failed");
}

/// The admin credential is no time bomb: `ca serve` renews STATE/admin like
/// any identity (here a 45 s one, from a 90 s intermediate), and `ca admin
/// issue` gives an operator a credential of their own that is revoked
/// without touching the others.
#[test]
fn the_admin_credential_is_renewed_and_operators_get_their_own_revocable_ones() {
    let pki = Pki::new(&["--intermediate-ttl", "90s"]);
    let server = CaServer::start(&pki, "");
    let admin = pki.state().join("admin");
    let first = written_serial(&admin);

    let out = run_ok(ca().args(["admin", "issue", "alice", "--state"]).arg(pki.state()));
    assert!(text(&out.stdout).starts_with("spiffe://lanyard.internal/lanyard-admin/alice: serial "), "{out:?}");
    let alice = pki.state().join("admin-alice");
    let (code, body) = curl_api(&pki, "GET", &server.url("/v1/status"), None, Some(&alice));
    assert_eq!(code, 200, "{body}");
    let revoke = json!({"serial": written_serial(&alice)}).to_string();
    let (code, body) = curl_api(&pki, "POST", &server.url("/v1/revoke"), Some(&revoke), Some(&admin));
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl_api(&pki, "GET", &server.url("/v1/status"), None, Some(&alice));
    // Refused: by the TLS layer once the new CRL is loaded, else by the API.
    assert!(code != 200 && body.contains("revoked"), "{code} {body}");

    wait_until(Duration::from_secs(45), "the admin credential renewed", || written_serial(&admin) != first);
    let (code, body) = curl_api(&pki, "GET", &server.url("/v1/status"), None, Some(&admin));
    assert_eq!(code, 200, "the renewed admin credential works: {body}");
    let status = text(&run_ok(ca().args(["status", "--state"]).arg(pki.state())).stdout);
    assert!(status.contains("lanyard-admin"), "ca status shows the admin credential: {status}");
}

/// Revocation on every hop: once an upstream's certificate is revoked, the
/// caller's outbound sidecar refuses it (reason `revoked`), while the
/// upstream's own sidecar stays up for everyone else.
#[test]
fn outbound_sidecars_refuse_a_revoked_upstream() {
    let pki = Pki::new(&[]);
    let web = pki.path("certs/web");
    let server = CaServer::start(&pki, &identity("web", "1h", &web, ""));
    wait_until(Duration::from_secs(10), "web issued", || serial_of(&web).is_some());
    // The upstream's certificate is not managed, so nothing replaces it once revoked.
    let api = pki.issue("api", &["--dns", "api", "--dns", "localhost"]);
    let api_serial = written_serial(&api);
    let Mesh { inbound, inb: _inb, out, addr } = Mesh::start(&pki, &api, &web);
    let outbound = addr.port();
    let call = |port: u16| {
        use std::io::{BufRead, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = conn.write_all(b"ping\n");
        let mut line = String::new();
        let _ = std::io::BufReader::new(conn).read_line(&mut line);
        line
    };
    assert_eq!(call(outbound), "ping\n");

    let revoke = json!({"serial": api_serial}).to_string();
    let (code, body) =
        curl_api(&pki, "POST", &server.url("/v1/revoke"), Some(&revoke), Some(&pki.state().join("admin")));
    assert_eq!(code, 200, "{body}");
    let sample = format!(
        "lanyard_sidecar_handshakes_total{{listener=\"outbound-{outbound}\",result=\"rejected\",reason=\"revoked\"}}"
    );
    wait_until(Duration::from_secs(15), "the outbound sidecar refuses the revoked upstream", || {
        call(outbound) != "ping\n" && out.metric(&sample) >= 1.0
    });
    // The upstream's sidecar itself is up: a client that has not loaded the CRL still gets through.
    rt_echo(inbound, &pki.issue("web", &[]));
}

/// One mTLS echo round trip to `port` with the cert dir `client`.
fn rt_echo(port: u16, client: &Path) {
    let set = CertDir::new(client).load(time::OffsetDateTime::now_utc()).unwrap();
    let config = std::sync::Arc::new(
        lanyard_sidecar::tls::client_config_with(
            lanyard_sidecar::tls::root_store(&set).unwrap(),
            &lanyard_sidecar::tls::ServerCheck::ChainOnly,
            Some(&lanyard_sidecar::certdir::CertSet { crls: Vec::new(), ..set }),
        )
        .unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("api").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
        let mut tls = tokio::io::BufReader::new(tls);
        tls.write_all(b"up\n").await.unwrap();
        let mut line = String::new();
        tls.read_line(&mut line).await.unwrap();
        assert_eq!(line, "up\n");
    });
}

/// The shipped alert rules pass promtool's checks and unit tests, and every
/// metric they name is one a real `ca serve` and `sidecar` expose, so
/// renaming a metric breaks this test rather than the alerts.
#[test]
fn alert_rules_pass_promtool_and_name_real_metrics() {
    let rules = workspace_root().join("ca/alerts.yml");
    run_ok(Command::new(peer("promtool")).args(["check", "rules"]).arg(&rules));
    run_ok(Command::new(peer("promtool")).args(["test", "rules"]).arg(workspace_root().join("ca/alerts.test.yml")));

    let pki = Pki::new(&[]);
    let web = pki.path("certs/web");
    let server = CaServer::start(&pki, &identity("web", "1h", &web, ""));
    wait_until(Duration::from_secs(10), "web issued", || serial_of(&web).is_some());
    let sidecar = Sidecar::start(
        &[
            "--cert-dir",
            web.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--upstream",
            "127.0.0.1:9",
        ],
        pki.path("sidecar.log"),
    );
    let (_, ca_metrics) = curl_api(&pki, "GET", &server.url("/metrics"), None, None);
    let (_, sidecar_metrics) = sidecar.get("/metrics");
    let text = std::fs::read_to_string(&rules).unwrap();
    let mut names: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("lanyard_") && w.len() > "lanyard_".len())
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        let exposed = format!("# TYPE {name} ");
        assert!(
            ca_metrics.contains(&exposed) || sidecar_metrics.contains(&exposed),
            "the alert rules use {name}, which neither ca serve nor the sidecar exposes"
        );
    }
}

/// With the root key offline, the operator replaces the intermediate with
/// `ca intermediate roll --root-key` (the key is not stored); a running
/// `ca serve` picks the new intermediate up and re-issues every identity
/// from it, and keeps publishing the old one's CRL.
#[test]
fn an_offline_root_rolls_the_intermediate_by_hand_and_ca_serve_picks_it_up() {
    let keys = tempfile::tempdir().unwrap();
    let root_key = keys.path().join("root.key");
    let pki = Pki::new(&["--offline-root", "--root-key-out", root_key.to_str().unwrap()]);
    let web = pki.path("certs/web");
    let _server = CaServer::start(&pki, &identity("web", "1h", &web, ""));
    wait_until(Duration::from_secs(10), "web issued", || serial_of(&web).is_some());
    let first = chain_serial(&web, 1).unwrap();
    let status = text(&run_ok(ca().args(["status", "--state"]).arg(pki.state())).stdout);
    assert!(status.contains("root key offline: not rolled over automatically"), "{status}");

    let err = run_err(ca().args(["intermediate", "roll", "--state"]).arg(pki.state()));
    assert!(err.contains("root key is offline"), "{err}");
    let out = run_ok(ca().args(["intermediate", "roll", "--root-key"]).arg(&root_key).arg("--state").arg(pki.state()));
    assert!(text(&out.stdout).starts_with(&format!("intermediate {first} replaced by ")), "{out:?}");
    assert!(!pki.state().join("root-key.pem").exists(), "the root key was not stored");
    wait_until(Duration::from_secs(30), "web re-issued from the new intermediate", || {
        chain_serial(&web, 1).is_some_and(|s| s != first)
    });
    let crl = std::fs::read_to_string(web.join("crl.pem")).unwrap();
    assert_eq!(crl.matches("BEGIN X509 CRL").count(), 2, "both intermediates' CRLs are published");
}

/// Handshakes `listener` of `sidecar` rejected, for any reason.
fn rejected_handshakes(sidecar: &Sidecar, listener: &str) -> f64 {
    ["no_cert", "unknown_ca", "expired", "not_yet_valid", "revoked", "not_allowed", "other"]
        .iter()
        .map(|r| {
            sidecar.metric(&format!(
                "lanyard_sidecar_handshakes_total{{listener=\"{listener}\",result=\"rejected\",reason=\"{r}\"}}"
            ))
        })
        .sum()
}

fn roots_in(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("ca.pem")).unwrap_or_default().matches("BEGIN CERTIFICATE").count()
}

fn rotate(pki: &Pki, step: &str) -> Command {
    let mut cmd = ca();
    cmd.args(["root", "rotate", step, "--state"]).arg(pki.state());
    cmd
}

fn copy_cert_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["cert.pem", "key.pem", "ca.pem", "crl.pem"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Root rotation with no downtime, under traffic
/// app -> outbound -> mTLS -> inbound -> app, through every phase:
/// - start puts old + new root in every cert dir; abort takes the new one
///   out again; a second start puts it back;
/// - a sidecar serving a frozen copy of its cert dir blocks finish, and
///   the refusal names it; once its copy is refreshed, finish goes through;
/// - finish moves issuance to the new root, every identity is re-issued
///   under it, and the old root leaves the bundles once no leaf needs it.
///
/// Not one request and not one handshake fails.
#[test]
fn the_root_rotates_in_phases_under_traffic_and_a_frozen_sidecar_blocks_finish() {
    let pki = Pki::new(&[]);
    let (api, web, frozen) = (pki.path("certs/api"), pki.path("certs/web"), pki.path("certs/frozen"));
    let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (in_admin, out_admin, frozen_admin) = (addr(), addr(), addr());
    let ids = identity("api", "30s", &api, &format!("dns = [\"api\", \"localhost\"]\nsidecar_admin = \"{in_admin}\""))
        + &identity("web", "30s", &web, &format!("sidecar_admin = \"{out_admin}\""))
        + &identity("frozen", "10m", &frozen, &format!("sidecar_admin = \"{frozen_admin}\""));
    let server = CaServer::start(&pki, &ids);
    wait_until(Duration::from_secs(10), "first issue of every identity", || {
        [&api, &web, &frozen].iter().all(|d| serial_of(d).is_some())
    });
    let old_root = std::fs::read_to_string(pki.state().join("root.pem")).unwrap();
    let frozen_copy = pki.path("frozen-copy");
    copy_cert_dir(&frozen, &frozen_copy);
    let _frozen_sidecar = Sidecar::start_at(
        frozen_admin,
        &[
            "--cert-dir",
            frozen_copy.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--upstream",
            &echo_upstream().to_string(),
        ],
        pki.path("frozen.log"),
    );
    let Mesh { inbound, inb, out, addr } = Mesh::start_at(&pki, &api, &web, [in_admin, out_admin]);
    let traffic = Traffic::start(addr);
    let status = || text(&run_ok(&mut rotate(&pki, "status")).stdout);
    assert!(status().contains("none under way"), "{}", status());

    // start, abort, start again.
    run_ok(&mut rotate(&pki, "start"));
    wait_until(Duration::from_secs(30), "old + new root in every cert dir", || {
        [&api, &web, &frozen].iter().all(|d| roots_in(d) == 2)
    });
    let err = run_err(&mut rotate(&pki, "start"));
    assert!(err.contains("already under way"), "{err}");
    run_ok(&mut rotate(&pki, "abort"));
    wait_until(Duration::from_secs(30), "the old root alone again after abort", || {
        [&api, &web, &frozen].iter().all(|d| roots_in(d) == 1)
    });
    assert_eq!(std::fs::read_to_string(api.join("ca.pem")).unwrap(), old_root);
    run_ok(&mut rotate(&pki, "start"));
    let new_root = std::fs::read_to_string(pki.state().join("root-next.pem")).unwrap();
    wait_until(Duration::from_secs(30), "old + new root in every cert dir", || {
        [&api, &web, &frozen].iter().all(|d| roots_in(d) == 2)
    });

    // The frozen sidecar blocks finish, by name.
    poll_until(Duration::from_secs(30), Duration::from_millis(500), "2 of 3 sidecars serve the new root", || {
        status().contains("2 of 3 serve the new root")
    });
    let st = status();
    assert!(st.contains("lacks the new root: frozen") && st.contains(&frozen_admin.to_string()), "{st}");
    let err = run_err(&mut rotate(&pki, "finish"));
    assert!(
        err.contains("refusing to finish") && err.contains("frozen") && err.contains(&frozen_admin.to_string()),
        "{err}"
    );
    let m = |state: &str| {
        let (_, body) = curl_api(&pki, "GET", &server.url("/metrics"), None, None);
        body.lines().find_map(|l| {
            l.strip_prefix(&format!("lanyard_ca_root_rotation_sidecars{{state=\"{state}\"}} "))?.parse::<u32>().ok()
        })
    };
    assert_eq!(m("lacking"), Some(1), "the metric counts the frozen sidecar");

    // Its volume is fixed: finish goes through.
    copy_cert_dir(&frozen, &frozen_copy);
    poll_until(Duration::from_secs(30), Duration::from_millis(500), "3 of 3 sidecars serve the new root", || {
        status().contains("3 of 3 serve the new root")
    });
    run_ok(rotate(&pki, "finish").args(["--window", "5s"]));
    let new_intermediate = std::fs::read_to_string(pki.state().join("intermediate.pem")).unwrap();
    let new_intermediate = lanyard_sidecar::certinfo::CertInfo::from_der(
        &lanyard_sidecar::certdir::parse_certs(&pki.state(), new_intermediate.as_bytes()).unwrap()[0],
    )
    .unwrap()
    .serial;
    wait_until(Duration::from_secs(60), "every identity re-issued under the new root", || {
        [&api, &web, &frozen].iter().all(|d| chain_serial(d, 1).as_deref() == Some(new_intermediate.as_str()))
    });
    wait_until(Duration::from_secs(60), "the old root leaves the bundles", || {
        [&api, &web, &frozen].iter().all(|d| std::fs::read_to_string(d.join("ca.pem")).unwrap_or_default() == new_root)
    });
    assert!(status().contains("none under way"), "{}", status());
    assert!(server.log_text().contains("root rotation complete"), "{}", server.log_text());
    // One more rotation of every leaf under the new root alone, under traffic.
    let leaf = chain_serial(&api, 0);
    wait_until(Duration::from_secs(40), "a renewal under the new root alone", || chain_serial(&api, 0) != leaf);
    while ping(addr).is_err() {}

    let requests = traffic.finish();
    assert!(requests > 0, "traffic flowed");
    assert_eq!(
        rejected_handshakes(&inb, &format!("inbound-{inbound}")),
        0.0,
        "no failed handshake on the inbound side"
    );
    let (_, ready) = out.get("/readyz");
    assert!(
        ready.contains(
            &lanyard_sidecar::certinfo::CertInfo::from_der(
                &lanyard_sidecar::certdir::parse_certs(&pki.state(), new_root.as_bytes()).unwrap()[0]
            )
            .unwrap()
            .sha256
        ),
        "{ready}"
    );
    eprintln!("{requests} requests through start, abort, start, finish and the drop of the old root; none failed");
}

/// The CA API under both key-exchange policies: with `prefer` (the
/// default) OpenSSL 3.0's classical handshake is served; with `kx =
/// "require"` it is refused and counted as `kx_mismatch`, while a
/// post-quantum client (rustls) negotiates X25519MLKEM768.
#[test]
fn ca_api_serves_classical_clients_under_prefer_and_refuses_them_under_require() {
    let verify = |pki: &Pki| {
        let root = pki.state().join("root.pem");
        move |port: u16| {
            openssl_classical(
                &format!("127.0.0.1:{port}"),
                &["-CAfile".as_ref(), root.as_os_str(), "-verify_return_error".as_ref()],
            )
        }
    };
    let pki = Pki::new(&[]);
    let prefer = CaServer::start(&pki, "");
    let classical = verify(&pki)(prefer.https_port);
    assert!(classical.status.success(), "prefer serves a classical-only client: {classical:?}");
    let (_, metrics) = curl_api(&pki, "GET", &prefer.url("/metrics"), None, None);
    assert!(metrics.contains("lanyard_ca_handshake_groups_total{listener=\"api\",group=\"X25519\"}"), "{metrics}");

    let pki = Pki::new(&[]);
    let require = CaServer::start(&pki, "kx = \"require\"\n");
    let admin = pki.state().join("admin");
    let health = || sidecar_get(&format!("https://127.0.0.1:{}/health", require.https_port), &admin);
    poll_until(Duration::from_secs(10), Duration::from_millis(100), "the API answers a post-quantum client", || {
        health().contains("\"status\"")
    });
    let classical = verify(&pki)(require.https_port);
    assert!(!classical.status.success(), "require refuses a classical-only client: {classical:?}");
    let metrics = || sidecar_get(&format!("https://127.0.0.1:{}/metrics", require.https_port), &admin);
    let refused = "lanyard_ca_handshakes_total{listener=\"api\",result=\"rejected\",reason=\"kx_mismatch\"} 1";
    wait_until(Duration::from_secs(5), refused, || metrics().contains(refused));
    assert!(
        metrics().contains("lanyard_ca_handshake_groups_total{listener=\"api\",group=\"X25519MLKEM768\"}"),
        "{}",
        metrics()
    );
}
