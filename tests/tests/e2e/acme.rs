//! Public certificates against a real Pebble (Debian 2.4.0), served by a
//! real edge sidecar: HTTP-01 through the edge, TLS-ALPN-01 at the CA,
//! unattended renewal, faults, the REST API, and the TLS scanners.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lanyard_sidecar::certdir::CertDir;
use lanyard_tests::*;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `ca serve` with `[acme]` and `public` (TOML `[[public]]` tables).
fn ca_with_public(pki: &Pki, pebble: &Pebble, http_port: u16, tls_alpn: u16, public: &str) -> CaServer {
    ca_with_acme(pki, pebble, http_port, tls_alpn, "", public)
}

/// The same, with more `[acme]` tables (`acme_tables`).
fn ca_with_acme(
    pki: &Pki,
    pebble: &Pebble,
    http_port: u16,
    tls_alpn: u16,
    acme_tables: &str,
    public: &str,
) -> CaServer {
    let https_port = free_port();
    let config = pki.path(&format!("acme-{https_port}.toml"));
    std::fs::write(
        &config,
        format!(
            "state = {:?}\nhttps_listen = \"127.0.0.1:{https_port}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n\
             [acme]\ndirectory_roots = {:?}\ntls_alpn_listen = \"127.0.0.1:{tls_alpn}\"\nblocklist = [\"blocked.test\"]\n{acme_tables}\n{public}",
            pki.state(),
            pebble.tls_ca(),
        ),
    )
    .unwrap();
    CaServer::start_with(pki, config, https_port, http_port)
}

fn public_entry(name: &str, domains: &[&str], challenge: &str, pebble: &Pebble) -> String {
    format!(
        "[[public]]\nname = \"{name}\"\ndomains = {domains:?}\nemail = \"ops@example.test\"\ndirectory_url = \"{}\"\nchallenge = \"{challenge}\"\n",
        pebble.directory()
    )
}

fn serial_of(dir: &Path) -> Option<String> {
    CertDir::new(dir).load(time::OffsetDateTime::now_utc()).ok().map(|s| s.leaf.serial)
}

/// curl through the edge for `name`, verifying with `root`; (status, headers).
fn edge_get(port: u16, name: &str, root: &Path, extra: &[&str]) -> (u16, String) {
    let out = run(Command::new(peer("curl"))
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--max-time", "5", "--resolve"])
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(root)
        .args(extra)
        .arg(format!("https://{name}:{port}/")));
    let head = text(&out.stdout);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, if status == 0 { text(&out.stderr) } else { head })
}

fn admin_api(pki: &Pki, server: &CaServer, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) = curl_api(pki, method, &server.url(path), body, Some(&pki.state().join("admin")));
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

#[test]
fn edge_serves_acme_certificates_from_http01_and_tls_alpn01() {
    let pki = Pki::new(&[]);
    let (ca_http, edge_http, edge_https, tls_alpn) = (free_port(), free_port(), free_port(), free_port());
    // Pebble validates on the edge's stand-ins for ports 80 and 443: the edge
    // forwards HTTP-01 requests to the CA, and answers TLS-ALPN-01 itself
    // with the validation certificate it fetches from the CA.
    let pebble = Pebble::start(pki.tmp.path(), edge_http, edge_https, 60 * 24 * 3600, &[]);
    let (www, alpn) = (pki.state().join("public/www"), pki.state().join("public/alpn"));
    let app = http_upstream();
    let edge = Sidecar::start(
        &[
            "--mode",
            "edge",
            "--cert-dir",
            www.to_str().unwrap(),
            "--public-cert-dir",
            www.to_str().unwrap(),
            "--public-cert-dir",
            alpn.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{edge_https}"),
            "--http-listen",
            &format!("127.0.0.1:{edge_http}"),
            "--acme-forward",
            &format!("127.0.0.1:{ca_http}"),
            "--upstream",
            &app.to_string(),
        ],
        pki.path("edge.log"),
    );
    // Before the first certificate: a fallback, and not ready with the reason.
    let (status, body) = edge.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("self-signed fallback"), "{body}");
    let public = public_entry("www", &["example.test", "www.example.test"], "http-01", &pebble)
        + &public_entry("alpn", &["alpn.example.test"], "tls-alpn-01", &pebble);
    let server = ca_with_public(&pki, &pebble, ca_http, tls_alpn, &public);
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(50), "both public certificates", || {
        if serial_of(&www).is_some() && serial_of(&alpn).is_some() {
            return Ok(());
        }
        Err(format!("CA:\n{}\nedge:\n{}", server.log_text(), edge.log_text()))
    });
    // Served through the normal reload, without a restart.
    let root = pebble.root();
    wait_until(Duration::from_secs(10), "the edge ready", || edge.get("/readyz").0 == 200);
    for name in ["example.test", "www.example.test", "alpn.example.test"] {
        let (status, head) = edge_get(edge_https, name, &root, &[]);
        assert_eq!(status, 200, "{name}: {head}");
        for header in [
            "strict-transport-security: max-age=63072000; includeSubDomains",
            "content-security-policy: default-src 'self'",
            "x-frame-options: DENY",
            "x-content-type-options: nosniff",
            "referrer-policy: strict-origin-when-cross-origin",
            "permissions-policy: camera=()",
        ] {
            assert!(head.to_lowercase().contains(&header.to_lowercase()), "{name}: no {header} in\n{head}");
        }
    }
    let (status, head) = edge_get(edge_https, "www.example.test", &root, &["--http2"]);
    assert!(status == 200 && head.starts_with("HTTP/2"), "{head}");
    // Port 80: a redirect for everything but the challenge path.
    let out = run_ok(
        Command::new("curl")
            .args(["-sS", "-D", "-", "-o", "/dev/null", "-H", "Host: www.example.test"])
            .arg(format!("http://127.0.0.1:{edge_http}/a/b?c=d")),
    );
    let head = text(&out.stdout);
    assert!(head.starts_with("HTTP/1.1 308"), "{head}");
    assert!(head.contains(&format!("location: https://www.example.test:{edge_https}/a/b?c=d")), "{head}");
    let out = run(Command::new("curl")
        .args(["-sS"])
        .arg(format!("http://127.0.0.1:{edge_http}/.well-known/acme-challenge/unknown-token")));
    assert!(text(&out.stdout).contains("no pending challenge"), "forwarded to the CA: {out:?}");
    assert!(server.log_text().contains("public certificate issued identity=www"), "{}", server.log_text());
    assert!(edge.log_text().contains("answered a TLS-ALPN-01 validation"), "{}", edge.log_text());

    // The scanners, against the ACME certificate.
    let sslyze_json = pki.path("sslyze.json");
    let out = run(Command::new(venv_tool("sslyze"))
        .args(["--mozilla_config=intermediate", "--quiet", "--certinfo_ca_file"])
        .arg(&root)
        .arg("--json_out")
        .arg(&sslyze_json)
        .arg(format!("www.example.test:{edge_https}{{127.0.0.1}}")));
    // (The report holds RSA moduli as JSON integers, too large for serde_json.)
    let report = std::fs::read_to_string(&sslyze_json).unwrap().replace(' ', "");
    assert!(report.contains("\"scan_status\":\"COMPLETED\""), "sslyze did not complete a scan: {}", text(&out.stdout));
    assert!(out.status.success() && text(&out.stdout).contains("OK - Compliant"), "sslyze: {}", text(&out.stdout));
    let testssl_json = pki.path("testssl.json");
    run(Command::new(peer("testssl"))
        .args(["--quiet", "--color", "0", "--warnings", "batch", "--fast", "--sneaky", "--nodns", "none"])
        .args(["--openssl-timeout", "10", "--ip", "127.0.0.1", "-p", "-s", "-P", "-S", "-U", "--add-ca"])
        .arg(&root)
        .arg("--jsonfile")
        .arg(&testssl_json)
        .arg(format!("https://www.example.test:{edge_https}")));
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&testssl_json).unwrap()).unwrap();
    assert!(findings.len() > 20, "testssl ran no checks: {findings:?}");
    let severe: Vec<_> =
        findings.iter().filter(|f| matches!(f["severity"].as_str(), Some("HIGH" | "CRITICAL" | "FATAL"))).collect();
    assert!(severe.is_empty(), "testssl: {severe:#?}");
}

#[test]
fn renewals_are_unattended_and_the_edge_never_fails() {
    let pki = Pki::new(&[]);
    let (ca_http, edge_https, tls_alpn) = (free_port(), free_port(), free_port());
    let pebble = Pebble::start(pki.tmp.path(), ca_http, tls_alpn, 12, &[]);
    let www = pki.state().join("public/www");
    // TLS-ALPN-01 here, answered by the CA's own listener.
    let _server = ca_with_public(
        &pki,
        &pebble,
        ca_http,
        tls_alpn,
        &public_entry("www", &["www.example.test"], "tls-alpn-01", &pebble),
    );
    wait_until(Duration::from_secs(30), "the first certificate", || serial_of(&www).is_some());
    let app = http_upstream();
    let edge = Sidecar::start(
        &["--mode", "edge", "--cert-dir", www.to_str().unwrap(), "--listen", &format!("127.0.0.1:{edge_https}")]
            .into_iter()
            .chain(["--upstream", &app.to_string()])
            .collect::<Vec<_>>(),
        pki.path("edge.log"),
    );
    let root = pebble.root();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match edge_get(edge_https, "www.example.test", &root, &[]) {
                    (200, _) => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        })
    };
    let mut serials = std::collections::BTreeSet::new();
    poll_until(Duration::from_secs(60), Duration::from_millis(200), "three renewals", || {
        serials.extend(serial_of(&www));
        serials.len() >= 4
    });
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(failed.is_empty(), "{} of {} requests failed: {:?}", failed.len(), ok + failed.len(), &failed[..1]);
    assert!(ok > 20, "only {ok} requests");
    assert!(edge.metric("lanyard_sidecar_cert_reloads_total{result=\"success\"}") >= 3.0);
    eprintln!("{} certificates, {ok} requests through the edge, none failed", serials.len());
}

#[test]
fn failures_back_off_keep_serving_and_survive_restarts() {
    let pki = Pki::new(&[]);
    let (ca_http, tls_alpn) = (free_port(), free_port());
    // Pebble also rejects a share of good nonces (the client must retry), and
    // never reuses an authorization, so every order is validated again.
    let mut pebble = Pebble::start(
        pki.tmp.path(),
        ca_http,
        tls_alpn,
        3600,
        &[("PEBBLE_WFE_NONCEREJECT", "15"), ("PEBBLE_AUTHZREUSE", "0")],
    );
    let www = pki.state().join("public/www");
    let public = public_entry("www", &["www.example.test"], "http-01", &pebble);
    let server = ca_with_public(&pki, &pebble, ca_http, tls_alpn, &public);
    let status = |server: &CaServer| admin_api(&pki, server, "GET", "/certificates/www", None).1;
    wait_until(Duration::from_secs(30), "the first certificate", || status(&server)["status"] == "valid");
    let first = serial_of(&www).unwrap();

    // A challenge that cannot validate: retried with backoff, old cert kept.
    pebble.set_a("www.example.test", "127.0.0.2");
    assert_eq!(admin_api(&pki, &server, "POST", "/certificates/www/renew", None).0, 202);
    // Pebble's nonce rejections can end an attempt early too (instant-acme
    // retries a rejected nonce only twice), so wait for a validation failure.
    poll_until_ok(Duration::from_secs(60), Duration::from_millis(200), "two failed attempts", || {
        let s = status(&server);
        if s["failures"].as_u64().unwrap_or(0) >= 2
            && s["last_error"].as_str().is_some_and(|e| e.contains("validation"))
        {
            return Ok(());
        }
        Err(format!("{s}\n{}", server.log_text()))
    });
    let s = status(&server);
    assert!(s["last_error"].as_str().unwrap_or("").contains("validation"), "{s}");
    assert!(s["next_attempt"].as_i64().unwrap() > time::OffsetDateTime::now_utc().unix_timestamp(), "{s}");
    assert_eq!(serial_of(&www).as_deref(), Some(first.as_str()), "the served certificate was kept");
    let (_, health) = curl_api(&pki, "GET", &server.url("/health"), None, None);
    assert!(health.contains("\"last_error\":\"validation"), "{health}");
    let out = run_ok(ca().arg("status").arg("--state").arg(pki.state()));
    assert!(text(&out.stdout).contains("www") && text(&out.stdout).contains("validation"), "{}", text(&out.stdout));

    // The queue survives a CA restart: failures and the error are still there.
    let failures_before = status(&server)["failures"].as_u64().unwrap();
    let config = server.config.clone();
    drop(server);
    // ... and so does an ACME outage: Pebble is down, then back (new root, no accounts).
    pebble.stop();
    let server = CaServer::start_with(&pki, config, free_port(), ca_http);
    assert!(status(&server)["failures"].as_u64().unwrap() >= failures_before, "{}", status(&server));
    pebble.set_a("www.example.test", "127.0.0.1");
    assert_eq!(admin_api(&pki, &server, "POST", "/certificates/www/renew", None).0, 202);
    poll_until(Duration::from_secs(20), Duration::from_millis(200), "a failure while the ACME server is down", || {
        status(&server)["last_error"].as_str().is_some_and(|e| !e.contains("validation"))
    });
    assert_eq!(serial_of(&www).as_deref(), Some(first.as_str()));
    pebble.restart();
    poll_until_ok(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "recovery after the outage",
        || match serial_of(&www) {
            Some(s) if s != first => Ok(()),
            _ => Err(format!("{}\n{}", status(&server), server.log_text())),
        },
    );
    let s = status(&server);
    assert_eq!(s["status"], "valid", "{s}");
    assert_eq!(s["failures"], 0, "{s}");
    let (_, metrics) = curl_api(&pki, "GET", &server.url("/metrics"), None, None);
    assert!(metrics.contains("lanyard_ca_acme_orders_total{result=\"success\"} 1"), "{metrics}");
    assert!(metrics.contains("lanyard_ca_acme_failures{cert=\"www\"} 0"), "{metrics}");
    assert!(metrics.contains("lanyard_ca_acme_cert_expiration_timestamp_seconds{cert=\"www\"} "), "{metrics}");
    assert!(s["last_error"].is_null(), "{s}");
    assert!(server.log_text().contains("registering again"), "a lost account is registered again");
}

#[test]
fn rest_api_manages_public_certificates() {
    let pki = Pki::new(&[]);
    let (ca_http, tls_alpn) = (free_port(), free_port());
    let pebble = Pebble::start(pki.tmp.path(), ca_http, tls_alpn, 3600, &[]);
    let config_entry = public_entry("cfg", &["cfg.example.test"], "http-01", &pebble);
    let server = ca_with_public(&pki, &pebble, ca_http, tls_alpn, &config_entry);
    let api = |method: &str, path: &str, body: Option<&str>| admin_api(&pki, &server, method, path, body);
    let dir = pebble.directory();
    let create = |name: &str, domains: &str| {
        format!(
            r#"{{"cert_name":"{name}","domains":{domains},"email":"ops@example.test","acme_directory_url":"{dir}"}}"#
        )
    };

    let (status, created) =
        api("POST", "/certificates", Some(&create("shop", r#"["shop.example.test","pay.example.test"]"#)));
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"], "pending");
    poll_until(Duration::from_secs(30), Duration::from_millis(100), "shop issued", || {
        api("GET", "/certificates/shop", None).1["status"] == "valid"
    });
    let (_, shop) = api("GET", "/certificates/shop", None);
    for key in ["domains", "email", "acme_directory_url", "status", "issued_at", "expires_at", "fingerprint", "chain"] {
        assert!(!shop[key].is_null(), "{key} missing in {shop}");
    }
    assert!(!shop.to_string().contains("PRIVATE KEY"), "a private key left through the API");
    let (_, list) = api("GET", "/certificates", None);
    let names: Vec<_> = list["certificates"].as_array().unwrap().iter().map(|c| c["cert_name"].clone()).collect();
    assert!(names.contains(&"shop".into()) && names.contains(&"cfg".into()), "{list}");

    // Dropping a domain re-issues without it; dropping the last removes the certificate.
    let shop_dir = pki.state().join("public/shop");
    let before = serial_of(&shop_dir).unwrap();
    let (status, after) = api("DELETE", "/certificates/shop/domains/pay.example.test", None);
    assert_eq!(status, 200, "{after}");
    poll_until(Duration::from_secs(30), Duration::from_millis(100), "shop re-issued", || {
        serial_of(&shop_dir).is_some_and(|s| s != before)
    });
    let set = CertDir::new(&shop_dir).load(time::OffsetDateTime::now_utc()).unwrap();
    assert_eq!(set.leaf.dns, ["shop.example.test"]);
    let (status, gone) = api("DELETE", "/certificates/shop/domains/shop.example.test", None);
    assert_eq!((status, gone["status"].as_str()), (200, Some("removed")), "{gone}");
    assert_eq!(api("GET", "/certificates/shop", None).0, 404);
    assert!(!shop_dir.exists(), "the cert dir is cleaned up");
    assert_eq!(api("POST", "/certificates/shop/renew", None).0, 404);

    // Bad input gets clear 4xx answers.
    let cases = [
        ("GET", "/certificates/nope".to_owned(), None, 404, "no public certificate named"),
        ("POST", "/certificates".into(), Some(create("bad", r#"["not..valid"]"#)), 400, "malformed domain"),
        ("POST", "/certificates".into(), Some(create("bad", r#"["x.blocked.test"]"#)), 400, "blocklist"),
        ("POST", "/certificates".into(), Some(create("bad", r#"["*.example.test"]"#)), 400, "dns-01"),
        ("POST", "/certificates".into(), Some(create("cfg", r#"["a.example.test"]"#)), 409, "exists already"),
        ("POST", "/certificates".into(), Some("{\"cert_name\":\"x\"}".into()), 400, "malformed JSON"),
        ("DELETE", "/certificates/cfg/domains/other.test".into(), None, 400, "has no domain"),
    ];
    for (method, path, body, want, needle) in cases {
        let (status, reply) = api(method, &path, body.as_deref());
        assert_eq!(status, want, "{method} {path}: {reply}");
        assert!(reply.to_string().contains(needle), "{method} {path}: {reply}");
    }
    let (status, _) = curl_api(&pki, "GET", &server.url("/certificates"), None, None);
    assert_eq!(status, 401, "no admin certificate");

    // A certificate from another provider, uploaded through the API and the CLI.
    let other = Pki::new(&[]);
    let issued = other.issue("legacy", &["--dns", "legacy.example.com"]);
    let chain = std::fs::read_to_string(issued.join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(issued.join("key.pem")).unwrap();
    let body = serde_json::json!({"certificate": chain, "key": key}).to_string();
    let (status, up) = api("PUT", "/certificates/legacy", Some(&body));
    assert_eq!((status, up["status"].as_str()), (200, Some("uploaded")), "{up}");
    assert!(serial_of(&pki.state().join("public/legacy")).is_some());
    let bad = serde_json::json!({"certificate": chain, "key": std::fs::read_to_string(pki.issue("x", &[]).join("key.pem")).unwrap()});
    let (status, reply) = api("PUT", "/certificates/legacy2", Some(&bad.to_string()));
    assert_eq!(status, 400, "a key of another certificate: {reply}");
    let out = run_ok(
        ca().args(["upload", "cli-up", "--cert"])
            .arg(issued.join("cert.pem"))
            .arg("--key")
            .arg(issued.join("key.pem"))
            .arg("--state")
            .arg(pki.state()),
    );
    assert!(text(&out.stderr).contains("cli-up"), "{out:?}");
    assert_eq!(api("GET", "/certificates/cli-up", None).1["status"], "uploaded");

    // The public challenge route answers anyone.
    let (status, _) = curl_api(&pki, "GET", &server.url("/.well-known/acme-challenge/nothing"), None, None);
    assert_eq!(status, 404);

    // A name removed from the config is cleaned up on the next start.
    poll_until(Duration::from_secs(30), Duration::from_millis(100), "cfg issued", || {
        serial_of(&pki.state().join("public/cfg")).is_some()
    });
    let config = server.config.clone();
    drop(server);
    let text_config = std::fs::read_to_string(&config).unwrap().replace(&config_entry, "");
    std::fs::write(&config, text_config).unwrap();
    let server = CaServer::start_with(&pki, config, free_port(), ca_http);
    assert_eq!(admin_api(&pki, &server, "GET", "/certificates/cfg", None).0, 404);
    assert!(!pki.state().join("public/cfg").exists());
    assert_eq!(admin_api(&pki, &server, "GET", "/certificates/legacy", None).0, 200, "uploads are not config entries");
}

/// BIND9 as the authoritative server of `example.test` (every name ->
/// 127.0.0.1), taking TSIG-signed dynamic updates; killed on drop.
struct Bind {
    _guard: ChildGuard,
    port: u16,
    secret: String,
}

impl Bind {
    fn start(work: &Path) -> Self {
        let dir = work.join("bind");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let secret = "bGFueWFyZC10ZXN0LXRzaWcta2V5LTMyLWJ5dGVzISE=".to_owned();
        std::fs::write(
            dir.join("named.conf"),
            format!(
                "options {{ directory \"{d}\"; pid-file \"{d}/named.pid\"; session-keyfile \"{d}/session.key\";\n\
                 managed-keys-directory \"{d}\"; listen-on port {port} {{ 127.0.0.1; }}; listen-on-v6 {{ none; }};\n\
                 recursion no; dnssec-validation no; notify no; }};\n\
                 key \"acme-key\" {{ algorithm hmac-sha256; secret \"{secret}\"; }};\ncontrols {{ }};\n\
                 zone \"example.test\" {{ type primary; file \"{d}/example.test.zone\";\n\
                 update-policy {{ grant acme-key zonesub ANY; }}; }};\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("example.test.zone"),
            "$TTL 60\n@ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60\n@ IN NS ns.example.test.\n\
             ns IN A 127.0.0.1\n@ IN A 127.0.0.1\n* IN A 127.0.0.1\n",
        )
        .unwrap();
        let log = dir.join("named.log");
        let mut cmd = Command::new(peer("named"));
        cmd.arg("-g").arg("-c").arg(dir.join("named.conf"));
        let mut guard = ChildGuard::spawn(cmd, &log);
        guard.wait_for_port(local(port), &log);
        Self { _guard: guard, port, secret }
    }

    fn txt(&self, name: &str) -> String {
        let out =
            run_ok(Command::new(peer("dig")).args(["+short", "@127.0.0.1", "-p", &self.port.to_string(), name, "TXT"]));
        text(&out.stdout)
    }
}

#[test]
fn dns01_wildcard_through_rfc2136_updates_to_bind() {
    let pki = Pki::new(&[]);
    let (ca_http, tls_alpn) = (free_port(), free_port());
    let bind = Bind::start(pki.tmp.path());
    let mut pebble = Pebble::start(pki.tmp.path(), ca_http, tls_alpn, 3600, &[("PEBBLE_AUTHZREUSE", "0")]);
    pebble.use_resolver(bind.port);
    let dns = format!(
        "[acme.dns]\nserver = \"127.0.0.1:{}\"\ntsig_key_name = \"acme-key\"\ntsig_secret = \"{}\"\n",
        bind.port, bind.secret
    );
    let public = public_entry("wild", &["*.example.test", "example.test"], "dns-01", &pebble);
    let server = ca_with_acme(&pki, &pebble, ca_http, tls_alpn, &dns, &public);
    let dir = pki.state().join("public/wild");
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(100), "the wildcard certificate", || {
        serial_of(&dir).map(drop).ok_or_else(|| server.log_text())
    });
    let set = CertDir::new(&dir).load(time::OffsetDateTime::now_utc()).unwrap();
    let mut names = set.leaf.dns.clone();
    names.sort();
    assert_eq!(names, ["*.example.test", "example.test"]);
    assert_eq!(bind.txt("_acme-challenge.example.test"), "", "the challenge records are removed afterwards");
}

/// SIGTERM while an order waits on validation: `ca serve` gives the order
/// up, removes the TXT record it published from the real BIND, and exits 0.
#[test]
fn stopping_mid_order_removes_the_dns01_records() {
    let pki = Pki::new(&[]);
    let (ca_http, tls_alpn) = (free_port(), free_port());
    let bind = Bind::start(pki.tmp.path());
    // Pebble validates through a resolver that never answers: the order
    // waits on validation until the CA stops.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut pebble = Pebble::start(pki.tmp.path(), ca_http, tls_alpn, 3600, &[("PEBBLE_AUTHZREUSE", "0")]);
    pebble.use_resolver(silent.local_addr().unwrap().port());
    let dns = format!(
        "[acme.dns]\nserver = \"127.0.0.1:{}\"\ntsig_key_name = \"acme-key\"\ntsig_secret = \"{}\"\n",
        bind.port, bind.secret
    );
    let public = public_entry("slow", &["slow.example.test"], "dns-01", &pebble);
    let mut server = ca_with_acme(&pki, &pebble, ca_http, tls_alpn, &dns, &public);
    let record = "_acme-challenge.slow.example.test";
    poll_until(Duration::from_secs(30), Duration::from_millis(100), "the TXT record published", || {
        !bind.txt(record).is_empty()
    });
    run_ok(Command::new("kill").args(["-TERM", &server.pid().to_string()]));
    let mut status = None;
    wait_until(Duration::from_secs(20), "ca serve to exit", || {
        status = server.child().try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{}", server.log_text());
    assert_eq!(bind.txt(record), "", "the record outlived the order:\n{}", server.log_text());
    assert!(server.log_text().contains("order given up"), "{}", server.log_text());
}

#[test]
fn external_account_binding_is_used_when_configured() {
    let pki = Pki::new(&[]);
    let (ca_http, tls_alpn) = (free_port(), free_port());
    let mut pebble = Pebble::start(pki.tmp.path(), ca_http, tls_alpn, 3600, &[]);
    let hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    pebble.require_eab("kid-1", hmac);
    let eab = public_entry("bound", &["bound.example.test"], "http-01", &pebble)
        + &format!("eab_kid = \"kid-1\"\neab_hmac_key = \"{hmac}\"\n");
    // Another account (accounts are per directory and email), without a binding.
    let unbound = public_entry("unbound", &["unbound.example.test"], "http-01", &pebble)
        .replace("ops@example.test", "other@example.test");
    let server = ca_with_public(&pki, &pebble, ca_http, tls_alpn, &(eab + &unbound));
    let bound = pki.state().join("public/bound");
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(100), "the EAB-bound certificate", || {
        serial_of(&bound).map(drop).ok_or_else(|| server.log_text())
    });
    // Without the binding the account is refused, with a clear error.
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(100), "the unbound account refused", || {
        let (_, c) = admin_api(&pki, &server, "GET", "/certificates/unbound", None);
        match c["last_error"].as_str() {
            Some(e) if e.contains("cannot register an account") => Ok(()),
            _ => Err(c.to_string()),
        }
    });
    assert!(serial_of(&pki.state().join("public/unbound")).is_none());
}

/// A TSIG secret BIND does not know: BIND answers with a TSIG error, and
/// the order fails with that error named, not with a bare "refused".
#[test]
fn a_wrong_tsig_secret_is_named_in_the_failure() {
    let pki = Pki::new(&[]);
    let (ca_http, tls_alpn) = (free_port(), free_port());
    let bind = Bind::start(pki.tmp.path());
    let mut pebble = Pebble::start(pki.tmp.path(), ca_http, tls_alpn, 3600, &[("PEBBLE_AUTHZREUSE", "0")]);
    pebble.use_resolver(bind.port);
    let wrong = "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC13cm9uZyE=";
    assert_ne!(bind.secret, wrong);
    let dns = format!(
        "[acme.dns]\nserver = \"127.0.0.1:{}\"\ntsig_key_name = \"acme-key\"\ntsig_secret = \"{wrong}\"\n",
        bind.port
    );
    let public = public_entry("badkey", &["badkey.example.test"], "dns-01", &pebble);
    let server = ca_with_acme(&pki, &pebble, ca_http, tls_alpn, &dns, &public);
    poll_until(Duration::from_secs(30), Duration::from_millis(100), "the TSIG failure in the log", || {
        server.log_text().contains("refused our TSIG: BADSIG")
    });
    assert!(serial_of(&pki.state().join("public/badkey")).is_none(), "no certificate without the record");
}

/// An IP address certificate (RFC 8738) for `127.0.0.1`, proven by HTTP-01
/// through the edge, and served by the edge to clients that connect by
/// address (no SNI).
#[test]
fn an_ip_address_certificate_is_ordered_through_the_edge() {
    let pki = Pki::new(&[]);
    let (ca_http, edge_http, edge_https, tls_alpn) = (free_port(), free_port(), free_port(), free_port());
    let pebble = Pebble::start(pki.tmp.path(), edge_http, edge_https, 6 * 24 * 3600, &[]);
    let ip_dir = pki.state().join("public/loopback");
    let app = http_upstream();
    let _edge = Sidecar::start(
        &[
            "--mode",
            "edge",
            "--cert-dir",
            ip_dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{edge_https}"),
            "--http-listen",
            &format!("127.0.0.1:{edge_http}"),
            "--acme-forward",
            &format!("127.0.0.1:{ca_http}"),
            "--upstream",
            &app.to_string(),
        ],
        pki.path("edge.log"),
    );
    let server =
        ca_with_public(&pki, &pebble, ca_http, tls_alpn, &public_entry("loopback", &["127.0.0.1"], "http-01", &pebble));
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(50), "the IP certificate", || {
        serial_of(&ip_dir).map(drop).ok_or_else(|| format!("CA:\n{}", server.log_text()))
    });
    let out = run_ok(
        Command::new(peer("openssl"))
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(ip_dir.join("cert.pem")),
    );
    assert!(text(&out.stdout).contains("IP Address:127.0.0.1"), "{}", text(&out.stdout));
    // Pebble has no ARI: the renewal is due when a third of the 6 days
    // issued remains, 2 days before the end (not a fixed 30 days).
    let (status, cert) = admin_api(&pki, &server, "GET", "/certificates/loopback", None);
    assert_eq!(status, 200, "{cert}");
    let expires = time::OffsetDateTime::parse(
        cert["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    let before_end = expires - cert["next_attempt"].as_i64().unwrap();
    assert!((2 * 86400 - 120..=2 * 86400 + 120).contains(&before_end), "renews {before_end} s before the end: {cert}");
    wait_until(Duration::from_secs(10), "the edge serves it", || {
        let out = run(Command::new(peer("curl"))
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert"])
            .arg(pebble.root())
            .arg(format!("https://127.0.0.1:{edge_https}/")));
        text(&out.stdout) == "200"
    });
}

/// An `ask` endpoint (the app's "may this name have a certificate?"): 200
/// for every `domain` but those starting with `denied.`, after 3 s for
/// those starting with `slow.`; it records every name it was asked about.
fn ask_endpoint() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = asked.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let domain = request.split("domain=").nth(1).and_then(|r| r.split([' ', '&']).next()).unwrap_or("");
                seen.lock().unwrap().push(domain.to_owned());
                if domain.starts_with("slow.") {
                    std::thread::sleep(Duration::from_secs(3));
                }
                let status = if domain.starts_with("denied.") { "403 Forbidden" } else { "200 OK" };
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = (&conn).write_all(reply.as_bytes());
            });
        }
    });
    (addr, asked)
}

/// The subjectAltName of the certificate the edge on `port` serves for `name`.
fn served_names(port: u16, name: &str) -> String {
    let out = run(Command::new(peer("openssl"))
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", name])
        .stdin(std::process::Stdio::null()));
    let pem = text(&out.stdout);
    let mut x509 = Command::new(peer("openssl"))
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(x509.stdin.as_mut().unwrap(), pem.as_bytes()).unwrap();
    let out = x509.wait_with_output().unwrap();
    assert!(out.status.success(), "{name}: no certificate from the edge: {pem}");
    text(&out.stdout)
}

/// On-demand issuance against Pebble: a new allowed name gets its
/// certificate on its first handshake, concurrent first handshakes order
/// once, names refused by `allow` or `ask` never order and get the
/// fallback, a failed order backs off, and unused names are removed while
/// names in use stay.
#[test]
fn on_demand_names_are_ordered_on_their_first_handshake() {
    let pki = Pki::new(&[]);
    let (ca_http, edge_http, edge_https, tls_alpn) = (free_port(), free_port(), free_port(), free_port());
    let pebble = Pebble::start(pki.tmp.path(), edge_http, edge_https, 24 * 3600, &[]);
    let (ask, asked) = ask_endpoint();
    let dir = pki.state().join("on-demand");
    let on_demand = format!(
        "[on_demand]\nallow = [\"*.apps.example.test\"]\nask = \"http://{ask}/allowed\"\nemail = \"ops@example.test\"\n\
         directory_url = \"{}\"\nidle = \"6s\"\n",
        pebble.directory()
    );
    let server = ca_with_public(&pki, &pebble, ca_http, tls_alpn, &on_demand);
    let app = http_upstream();
    let edge = Sidecar::start(
        &[
            "--mode",
            "edge",
            "--cert-dir",
            pki.path("unused").to_str().unwrap(),
            "--on-demand-dir",
            dir.to_str().unwrap(),
            "--on-demand-report",
            "1s",
            "--listen",
            &format!("127.0.0.1:{edge_https}"),
            "--http-listen",
            &format!("127.0.0.1:{edge_http}"),
            "--acme-forward",
            &format!("127.0.0.1:{ca_http}"),
            "--upstream",
            &app.to_string(),
        ],
        pki.path("edge.log"),
    );
    let root = pebble.root();
    let logs = || format!("CA:\n{}\nedge:\n{}", server.log_text(), edge.log_text());
    let ca_metric = |sample: &str| -> f64 {
        let (_, metrics) = curl_api(&pki, "GET", &server.url("/metrics"), None, None);
        let line = metrics.lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')));
        line.unwrap_or_else(|| panic!("no {sample} in\n{metrics}")).trim().parse().unwrap()
    };

    // The first handshake waits for the order and verifies against Pebble's root.
    let (status, head) = edge_get(edge_https, "shop.apps.example.test", &root, &["--max-time", "20"]);
    assert_eq!(status, 200, "{head}\n{}", logs());
    assert!(head.to_lowercase().contains("strict-transport-security"), "{head}");
    assert!(dir.join("shop.apps.example.test/cert.pem").exists(), "{}", logs());

    // Six concurrent first handshakes for one name: one order, six verified answers.
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let root = root.clone();
            std::thread::spawn(move || edge_get(edge_https, "burst.apps.example.test", &root, &["--max-time", "20"]))
        })
        .collect();
    for handshake in burst {
        let (status, head) = handshake.join().unwrap();
        assert_eq!(status, 200, "{head}\n{}", logs());
    }
    assert_eq!(ca_metric("lanyard_ca_acme_orders_total{result=\"success\"}"), 2.0, "{}", logs());
    assert_eq!(server.log_text().matches("on-demand: ordering a new name").count(), 2, "{}", logs());

    // Refused by `allow`: the fallback, no order, and `ask` is not even asked.
    assert!(served_names(edge_https, "evil.example.test").contains("lanyard-edge-fallback"), "{}", logs());
    assert!(!asked.lock().unwrap().iter().any(|d| d == "evil.example.test"), "{:?}", asked.lock().unwrap());
    // Refused by `ask`: the fallback and no order.
    assert!(served_names(edge_https, "denied.apps.example.test").contains("lanyard-edge-fallback"), "{}", logs());
    assert!(asked.lock().unwrap().iter().any(|d| d == "denied.apps.example.test"), "{:?}", asked.lock().unwrap());
    assert_eq!(ca_metric("lanyard_ca_on_demand_requests_total{result=\"refused_policy\"}"), 1.0);
    assert_eq!(ca_metric("lanyard_ca_on_demand_requests_total{result=\"refused_ask\"}"), 1.0);
    // Retried at once, the refusal is remembered: the app is not asked again.
    assert!(served_names(edge_https, "denied.apps.example.test").contains("lanyard-edge-fallback"), "{}", logs());
    assert_eq!(asked.lock().unwrap().iter().filter(|d| *d == "denied.apps.example.test").count(), 1);
    assert_eq!(ca_metric("lanyard_ca_on_demand_requests_total{result=\"refused_ask\"}"), 2.0);
    assert!(!dir.join("denied.apps.example.test").exists() && !dir.join("evil.example.test").exists());

    // An order that cannot validate: the fallback with the reason, and the
    // next handshake does not order again while the name backs off.
    pebble.set_a("broken.apps.example.test", "127.0.0.2");
    assert!(served_names(edge_https, "broken.apps.example.test").contains("lanyard-edge-fallback"), "{}", logs());
    assert!(served_names(edge_https, "broken.apps.example.test").contains("lanyard-edge-fallback"));
    assert_eq!(ca_metric("lanyard_ca_acme_orders_total{result=\"failure\"}"), 1.0, "{}", logs());
    assert!(edge.log_text().contains("no on-demand certificate: the CA answered 503"), "{}", logs());

    // `idle = 6s`: shop is no longer used and goes, with its cert dir; burst
    // is used throughout and stays.
    poll_until_ok(Duration::from_secs(40), Duration::from_millis(500), "shop removed as unused", || {
        let (status, head) = edge_get(edge_https, "burst.apps.example.test", &root, &[]);
        assert_eq!(status, 200, "burst is in use and must stay: {head}\n{}", logs());
        if dir.join("shop.apps.example.test").exists() {
            return Err(logs());
        }
        Ok(())
    });
    assert!(dir.join("burst.apps.example.test/cert.pem").exists(), "{}", logs());
    assert!(ca_metric("lanyard_ca_on_demand_removed_total{reason=\"idle\"}") >= 1.0);
    wait_until(Duration::from_secs(10), "the edge forgets shop", || {
        edge.log_text().lines().any(|l| l.contains("removed by the CA") && l.contains("shop.apps.example.test"))
    });
    // Asked for again, it is ordered again.
    let (status, head) = edge_get(edge_https, "shop.apps.example.test", &root, &["--max-time", "20"]);
    assert_eq!(status, 200, "{head}\n{}", logs());
    assert_eq!(ca_metric("lanyard_ca_acme_orders_total{result=\"success\"}"), 3.0, "{}", logs());

    // A second edge reading the same cert dirs, waiting at most 1 s: it
    // serves what the first one had ordered without a new order, and a name
    // whose `ask` takes 3 s gets the fallback at once, then its certificate
    // once the order the CA went on with is done.
    let impatient_https = free_port();
    let impatient = Sidecar::start(
        &[
            "--mode",
            "edge",
            "--cert-dir",
            pki.path("unused").to_str().unwrap(),
            "--on-demand-dir",
            dir.to_str().unwrap(),
            "--on-demand-wait",
            "1s",
            "--listen",
            &format!("127.0.0.1:{impatient_https}"),
            "--acme-forward",
            &format!("127.0.0.1:{ca_http}"),
            "--upstream",
            &app.to_string(),
        ],
        pki.path("impatient.log"),
    );
    let (status, head) = edge_get(impatient_https, "burst.apps.example.test", &root, &[]);
    assert_eq!(status, 200, "{head}\n{}", impatient.log_text());
    assert!(served_names(impatient_https, "slow.apps.example.test").contains("lanyard-edge-fallback"));
    assert!(impatient.log_text().contains("no on-demand certificate within 1s"), "{}", impatient.log_text());
    poll_until_ok(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "slow ordered after the bound",
        || match edge_get(impatient_https, "slow.apps.example.test", &root, &[]) {
            (200, _) => Ok(()),
            (_, head) => Err(format!("{head}\n{}\nsecond edge:\n{}", logs(), impatient.log_text())),
        },
    );
    assert_eq!(ca_metric("lanyard_ca_acme_orders_total{result=\"success\"}"), 4.0, "{}", logs());
}
