//! The ACME server of `ca serve` (`/acme/directory`) against real ACME
//! clients: certbot (PyPI), lego and Caddy (Debian). Each gets, renews and
//! uses certificates that verify against the fleet root; names outside
//! `[acme_server] allow` are refused with `rejectedIdentifier`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use lanyard_tests::*;

/// A `ca serve` with `[acme_server]`, and the ports its validations use.
struct Fleet {
    pki: Pki,
    ca: CaServer,
    http01: u16,
    tls_alpn01: u16,
}

impl Fleet {
    /// `extra` goes at the end of `[acme_server]` (more keys, or tables).
    fn start(extra: &str) -> Self {
        Self::start_with(|_, _| extra.to_owned(), false)
    }

    /// `extra(https_port, fleet_root)` goes at the end; with `self_validating`, HTTP-01
    /// validations go to the CA's own HTTP listener, where its ACME client
    /// publishes its answers.
    fn start_with(extra: impl Fn(u16, &Path) -> String, self_validating: bool) -> Self {
        let pki = Pki::new(&[]);
        let (https, http, tls_alpn01) = (free_port(), free_port(), free_port());
        let http01 = if self_validating { http } else { free_port() };
        let extra = extra(https, &pki.state().join("root.pem"));
        let config = pki.path("acme-server.toml");
        std::fs::write(
            &config,
            format!(
                "state = {:?}\nhttps_listen = \"127.0.0.1:{https}\"\nhttp_listen = \"127.0.0.1:{http}\"\n\
                 [acme_server]\nallow = [\"*.internal\", \"127.0.0.1\"]\nhttp01_port = {http01}\ntls_alpn01_port = {tls_alpn01}\n\
                 hosts = {{ \"web.internal\" = \"127.0.0.1\", \"api.internal\" = \"127.0.0.1\", \"site.internal\" = \"127.0.0.1\" }}\n{extra}\n",
                pki.state()
            ),
        )
        .unwrap();
        let ca = CaServer::start_with(&pki, config, https, http);
        Self { pki, ca, http01, tls_alpn01 }
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/acme/directory", self.ca.https_port)
    }

    fn root(&self) -> PathBuf {
        self.pki.state().join("root.pem")
    }

    /// A counter of `/metrics`, e.g. `lanyard_ca_acme_server_requests_total{resource="renewal-info"}`.
    fn metric(&self, sample: &str) -> f64 {
        let (status, text) = curl_api(&self.pki, "GET", &self.ca.url("/metrics"), None, None);
        assert_eq!(status, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no sample {sample} in /metrics:\n{text}"))
    }

    /// `openssl verify` of `cert` against the fleet root, with `chain` as intermediates.
    fn verify(&self, cert: &Path, chain: &Path) {
        run_ok(
            Command::new(peer("openssl"))
                .arg("verify")
                .arg("-CAfile")
                .arg(self.root())
                .arg("-untrusted")
                .arg(chain)
                .arg(cert),
        );
    }

    /// Revokes `serial` through the admin API (as `ca revoke` does).
    fn revoke(&self, serial: &str) {
        let body = format!("{{\"serial\":\"{serial}\"}}");
        let (status, text) =
            curl_api(&self.pki, "POST", &self.ca.url("/v1/revoke"), Some(&body), Some(&self.pki.state().join("admin")));
        assert_eq!(status, 200, "{text}");
    }

    /// The ARI window (RFC 9773) the server suggests for `cert`, unix seconds.
    fn renewal_window(&self, cert: &Path) -> (i64, i64) {
        use base64::Engine;
        let hex_bytes = |hex: &str| -> Vec<u8> {
            let hex: String = hex.chars().filter(char::is_ascii_hexdigit).collect();
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
        };
        let out = run_ok(
            Command::new(peer("openssl")).args(["x509", "-noout", "-ext", "authorityKeyIdentifier", "-in"]).arg(cert),
        );
        let aki = hex_bytes(text(&out.stdout).lines().nth(1).expect("an authority key identifier"));
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let id = format!("{}.{}", b64(&aki), b64(&hex_bytes(&serial(cert))));
        let url = format!("https://127.0.0.1:{}/acme/renewal-info/{id}", self.ca.https_port);
        let (status, body) = curl_api(&self.pki, "GET", &url, None, None);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let at = |k: &str| {
            let t = v["suggestedWindow"][k].as_str().unwrap_or_else(|| panic!("no suggestedWindow.{k}: {body}"));
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap().unix_timestamp()
        };
        (at("start"), at("end"))
    }

    fn revoked(&self, serial: &str) -> bool {
        let (status, text) =
            curl_api(&self.pki, "GET", &self.ca.url("/v1/certificates"), None, Some(&self.pki.state().join("admin")));
        assert_eq!(status, 200, "{text}");
        let list: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rec = list["certificates"].as_array().unwrap().iter().find(|c| c["serial"] == serial);
        rec.unwrap_or_else(|| panic!("serial {serial} is not in the store: {text}"))["revoked_at"].is_number()
    }
}

fn serial(cert: &Path) -> String {
    let out = run_ok(Command::new(peer("openssl")).args(["x509", "-noout", "-serial", "-in"]).arg(cert));
    text(&out.stdout).trim().trim_start_matches("serial=").to_ascii_lowercase().trim_start_matches("00").to_owned()
}

/// The certificate is a TLS server certificate for exactly `san` and
/// nothing of the mesh: no SPIFFE URI, no clientAuth.
fn assert_server_only(cert: &Path, san: &str) {
    let out = run_ok(
        Command::new(peer("openssl"))
            .args(["x509", "-noout", "-ext", "subjectAltName,extendedKeyUsage", "-in"])
            .arg(cert),
    );
    let exts = text(&out.stdout);
    assert!(exts.contains(san), "{exts}");
    assert!(!exts.contains("URI:"), "an ACME certificate must carry no SPIFFE ID: {exts}");
    assert!(exts.contains("TLS Web Server Authentication") && !exts.contains("Client"), "{exts}");
}

fn ok(out: Output, what: &str) -> String {
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{all}");
    all
}

struct Certbot<'a> {
    fleet: &'a Fleet,
    dir: PathBuf,
}

impl Certbot<'_> {
    fn run(&self, args: &[&str]) -> Output {
        run(Command::new(venv_tool_of(".venv-certbot", "certbot"))
            .args(["--non-interactive", "--config-dir"])
            .arg(self.dir.join("config"))
            .arg("--work-dir")
            .arg(self.dir.join("work"))
            .arg("--logs-dir")
            .arg(self.dir.join("logs"))
            .env("REQUESTS_CA_BUNDLE", self.fleet.root())
            .args(args))
    }

    fn live(&self, name: &str, file: &str) -> PathBuf {
        self.dir.join("config/live").join(name).join(file)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/letsencrypt.log")).unwrap_or_default()
    }
}

#[test]
fn certbot_issues_renews_on_ari_and_revokes() {
    let fleet = Fleet::start("");
    let certbot = Certbot { fleet: &fleet, dir: fleet.pki.path("certbot") };
    let http01 = fleet.http01.to_string();
    let server = fleet.directory();
    let common = ["--agree-tos", "--register-unsafely-without-email", "--server", server.as_str()];
    let standalone = ["certonly", "--standalone", "--http-01-address", "127.0.0.1", "--http-01-port", http01.as_str()];

    // certonly --standalone: certbot answers HTTP-01 itself.
    let args = [&standalone[..], &common[..], &["-d", "web.internal"]].concat();
    ok(certbot.run(&args), "certbot certonly --standalone");
    let (cert, chain) = (certbot.live("web.internal", "cert.pem"), certbot.live("web.internal", "chain.pem"));
    fleet.verify(&cert, &chain);
    assert_server_only(&cert, "DNS:web.internal");
    let first = serial(&cert);

    // Not due: certbot asks ARI (RFC 9773), which says 2/3 of the lifetime, and keeps the certificate.
    let renew =
        ["renew", "--no-random-sleep-on-renew", "--http-01-address", "127.0.0.1", "--http-01-port", http01.as_str()];
    let quiet = fleet.metric("lanyard_ca_acme_server_requests_total{resource=\"renewal-info\"}");
    let out = ok(certbot.run(&renew), "certbot renew");
    assert!(out.contains("not due for renewal"), "{out}");
    assert_eq!(serial(&cert), first);
    assert!(fleet.metric("lanyard_ca_acme_server_requests_total{resource=\"renewal-info\"}") > quiet);

    // Revoked by the operator: ARI pulls the window into the past and the next
    // `certbot renew` renews. certbot keeps ARI's Retry-After between runs, so
    // this is a fresh lineage that has not asked yet.
    let args = [&standalone[..], &common[..], &["-d", "api.internal"]].concat();
    ok(certbot.run(&args), "certbot certonly --standalone (api.internal)");
    let api = certbot.live("api.internal", "cert.pem");
    let before = serial(&api);
    fleet.revoke(&before);
    let out = ok(certbot.run(&renew), "certbot renew after a revocation");
    assert!(out.contains("api.internal/fullchain.pem (success)"), "{out}");
    assert_ne!(serial(&api), before, "ARI pulled forward, so certbot renewed");
    assert_eq!(serial(&cert), first, "web.internal was not pulled forward");
    fleet.verify(&api, &certbot.live("api.internal", "chain.pem"));

    // certonly --webroot: a separate web server (python's) serves the token files certbot writes.
    let webroot = fleet.pki.path("webroot");
    std::fs::create_dir_all(&webroot).unwrap();
    let mut web = Command::new("python3");
    web.args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"]).arg(&webroot).arg(&http01);
    let web_log = fleet.pki.path("webroot.log");
    let mut web = ChildGuard::spawn(web, &web_log);
    web.wait_for_port(std::net::SocketAddr::from(([127, 0, 0, 1], fleet.http01)), &web_log);
    let webroot_arg = webroot.display().to_string();
    let args =
        [&["certonly", "--webroot", "-w", webroot_arg.as_str()][..], &common[..], &["-d", "site.internal"]].concat();
    ok(certbot.run(&args), "certbot certonly --webroot");
    let site = certbot.live("site.internal", "cert.pem");
    fleet.verify(&site, &certbot.live("site.internal", "chain.pem"));
    assert_server_only(&site, "DNS:site.internal");
    drop(web);

    // An IP identifier (RFC 8738), proven by HTTP-01 at the address.
    let args = [&standalone[..], &common[..], &["--ip-address", "127.0.0.1"]].concat();
    ok(certbot.run(&args), "certbot certonly --ip-address");
    let ip = certbot.live("127.0.0.1", "cert.pem");
    fleet.verify(&ip, &certbot.live("127.0.0.1", "chain.pem"));
    assert_server_only(&ip, "IP Address:127.0.0.1");

    // A new intermediate (`ca intermediate roll`) moves every window of a
    // certificate it did not sign into the past: renew now.
    let now = || time::OffsetDateTime::now_utc().unix_timestamp();
    let (start, end) = fleet.renewal_window(&cert);
    assert!(start > now() && end > start, "a fresh certificate renews later: {start}..{end}");
    run_ok(ca().args(["intermediate", "roll", "--state"]).arg(fleet.pki.state()));
    poll_until(Duration::from_secs(20), Duration::from_millis(200), "ARI says renew now after the roll", || {
        fleet.renewal_window(&cert).1 < now()
    });

    // revoke: signed by the account; the store and the CRL have it.
    let site_serial = serial(&site);
    ok(certbot.run(&["revoke", "--cert-name", "site.internal", "--no-delete-after-revoke"]), "certbot revoke");
    assert!(fleet.revoked(&site_serial), "certbot revoke reached the store");

    // A name outside `allow` is refused before any validation.
    let args = [&standalone[..], &common[..], &["-d", "www.example.com"]].concat();
    let out = certbot.run(&args);
    assert!(!out.status.success());
    assert!(certbot.log().contains("urn:ietf:params:acme:error:rejectedIdentifier"), "{}", certbot.log());
    assert!(text(&out.stderr).contains("www.example.com is not allowed"), "{}", text(&out.stderr));
}

fn lego(fleet: &Fleet, dir: &Path, args: &[&str]) -> Output {
    run(Command::new(peer("lego"))
        .env("LEGO_CA_CERTIFICATES", fleet.root())
        .arg("--server")
        .arg(fleet.directory())
        .args(["--email", "ops@example.test", "--accept-tos", "--path"])
        .arg(dir)
        .args(args))
}

#[test]
fn lego_issues_over_tls_alpn01_and_renews_over_http01() {
    let fleet = Fleet::start("");
    let dir = fleet.pki.path("lego");
    let tls = format!("127.0.0.1:{}", fleet.tls_alpn01);
    let http = format!("127.0.0.1:{}", fleet.http01);
    ok(lego(&fleet, &dir, &["--domains", "api.internal", "--tls", "--tls.port", &tls, "run"]), "lego run --tls");
    let (cert, issuer) = (dir.join("certificates/api.internal.crt"), dir.join("certificates/api.internal.issuer.crt"));
    fleet.verify(&cert, &issuer);
    assert_server_only(&cert, "DNS:api.internal");
    let first = serial(&cert);
    let args =
        ["--domains", "api.internal", "--http", "--http.port", &http, "renew", "--days", "9999", "--no-random-sleep"];
    ok(lego(&fleet, &dir, &args), "lego renew --http");
    assert_ne!(serial(&cert), first, "lego renewed");
    fleet.verify(&cert, &issuer);

    let out = lego(&fleet, &dir, &["--domains", "db.example.com", "--http", "--http.port", &http, "run"]);
    assert!(!out.status.success());
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("rejectedIdentifier") && all.contains("db.example.com is not allowed"), "{all}");
}

#[test]
fn caddy_serves_a_site_with_a_fleet_certificate_and_renews_it() {
    // A one-minute profile, so that Caddy's own rule (renew with a third of
    // the lifetime left) comes due within the test.
    let fleet = Fleet::start("default_profile = \"minute\"\n[acme_server.profiles]\nminute = \"1m\"");
    let home = fleet.pki.path("caddy");
    std::fs::create_dir_all(&home).unwrap();
    let caddyfile = home.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tadmin off\n\thttp_port {}\n\thttps_port {}\n\tacme_ca {}\n\tacme_ca_root {}\n\tstorage file_system {}\n\
             \tskip_install_trust\n\trenew_interval 2s\n}}\nweb.internal {{\n\trespond \"hello from caddy\"\n}}\n",
            fleet.http01,
            fleet.tls_alpn01,
            fleet.directory(),
            fleet.root().display(),
            home.join("data").display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(peer("caddy"));
    cmd.args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&caddyfile)
        .env("HOME", &home)
        .env("XDG_DATA_HOME", &home);
    let log = home.join("caddy.log");
    let _caddy = ChildGuard::spawn(cmd, &log);
    let port = fleet.tls_alpn01;
    let says_hello = || {
        let out = run(Command::new(peer("curl"))
            .args(["-sS", "--max-time", "5", "--resolve"])
            .arg(format!("web.internal:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(fleet.root())
            .arg(format!("https://web.internal:{port}/")));
        out.status.success() && text(&out.stdout) == "hello from caddy"
    };
    let served = home.join("served.pem");
    let served_serial = || -> Option<String> {
        let out = run(Command::new(peer("openssl"))
            .args(["s_client", "-servername", "web.internal", "-connect"])
            .arg(format!("127.0.0.1:{port}")));
        std::fs::write(&served, &out.stdout).unwrap();
        text(&out.stdout).contains("BEGIN CERTIFICATE").then(|| serial(&served))
    };
    let mut first = None;
    poll_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "Caddy serves web.internal with a fleet certificate",
        || {
            first = served_serial().filter(|_| says_hello());
            first.is_some()
        },
    );
    poll_until(Duration::from_secs(90), Duration::from_secs(1), "Caddy renews its one-minute certificate", || {
        served_serial().is_some_and(|s| Some(&s) != first.as_ref())
    });
    assert!(fleet.metric("lanyard_ca_acme_server_validations_total{result=\"valid\"}") >= 2.0);
}

/// `ca serve`'s own ACME client ordering from its own ACME server: the
/// profile chosen is the one issued, an unoffered one is refused naming the
/// offered ones, and a revocation pulls the ARI window forward so that the
/// client renews at once (Pebble 2.4.0 has neither profiles nor ARI).
#[test]
fn lanyard_orders_profiles_and_follows_ari_from_lanyard() {
    let fleet = Fleet::start_with(
        |https, root| {
            let directory = format!("https://127.0.0.1:{https}/acme/directory");
            let public = |name: &str, domain: &str, profile: &str| {
                format!(
                    "[[public]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\nemail = \"ops@example.test\"\n\
                     directory_url = \"{directory}\"\nprofile = \"{profile}\"\n"
                )
            };
            format!(
                "[acme_server.profiles]\nshortlived = \"3m\"\ntlsserver = \"2h\"\n[acme]\ndirectory_roots = {root:?}\n{}{}{}",
                public("short", "web.internal", "shortlived"),
                public("long", "api.internal", "tlsserver"),
                public("wrong", "site.internal", "classic"),
            )
        },
        true,
    );
    let admin = fleet.pki.state().join("admin");
    let get = |name: &str| -> serde_json::Value {
        let (status, text) =
            curl_api(&fleet.pki, "GET", &fleet.ca.url(&format!("/certificates/{name}")), None, Some(&admin));
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    let lifetime = |name: &str| {
        let c = get(name);
        let at = |k: &str| {
            time::OffsetDateTime::parse(c[k].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
        };
        (at("expires_at") - at("issued_at")).whole_seconds()
    };
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(200), "both profiles issued", || {
        let (short, long) = (get("short"), get("long"));
        if short["status"] == "valid" && long["status"] == "valid" {
            return Ok(());
        }
        Err(format!(
            "short: {} {}; long: {} {}",
            short["status"], short["last_error"], long["status"], long["last_error"]
        ))
    });
    // notBefore is backdated by a tenth of the lifetime.
    assert!((180..=200).contains(&lifetime("short")), "shortlived: {}", lifetime("short"));
    assert!((7200..=7920).contains(&lifetime("long")), "tlsserver: {}", lifetime("long"));
    assert_eq!(get("short")["profile"], "shortlived");
    assert!(get("short")["ari_check_at"].is_number(), "ARI is offered, so the client asks it again");
    poll_until(Duration::from_secs(30), Duration::from_millis(200), "the unoffered profile fails", || {
        get("wrong")["last_error"].is_string()
    });
    let error = get("wrong")["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("profile \"classic\" is not offered") && error.contains("shortlived, tlsserver"), "{error}");

    // A revocation pulls ARI's window into the past; the client's next ARI
    // check (after the server's Retry-After, ~10 s) renews at once, long before 2/3 of 3 minutes.
    let before = get("short")["fingerprint"].clone();
    let serial = lanyard_sidecar::certdir::CertDir::new(fleet.pki.state().join("public/short"))
        .load(time::OffsetDateTime::now_utc())
        .unwrap()
        .leaf
        .serial;
    fleet.revoke(&serial);
    poll_until_ok(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "the client renews after ARI moved the window",
        || {
            if get("short")["fingerprint"] != before {
                return Ok(());
            }
            let log = fleet.ca.log_text();
            Err(log.lines().filter(|l| l.contains("ARI") || l.contains("short")).collect::<Vec<_>>().join("\n"))
        },
    );
    assert!(fleet.ca.log_text().contains("ARI moved the renewal forward"), "{}", fleet.ca.log_text());
    assert_eq!(get("short")["profile"], "shortlived", "the renewal kept the profile");
    assert!((180..=200).contains(&lifetime("short")));
}

/// `eab_required`: the directory says so (certbot then stops without a
/// binding), an account bound with a wrong key is refused, and one bound
/// with the configured key issues.
#[test]
fn external_account_binding_is_required_when_configured() {
    // An HMAC key is base64url, as `openssl rand 32 | basenc --base64url` prints one.
    let key = "c2VjcmV0LWhtYWMta2V5LWZvci10aGUtZmxlZXQtMDE";
    let fleet = Fleet::start(&format!("eab_required = true\neab = {{ \"fleet-1\" = \"{key}\" }}"));
    let certbot = Certbot { fleet: &fleet, dir: fleet.pki.path("certbot") };
    let (http01, server) = (fleet.http01.to_string(), fleet.directory());
    let order = |eab: &[&str]| {
        let base = ["certonly", "--standalone", "--http-01-address", "127.0.0.1", "--http-01-port", http01.as_str()];
        let common =
            ["--agree-tos", "--register-unsafely-without-email", "--server", server.as_str(), "-d", "web.internal"];
        certbot.run(&[&base[..], &common[..], eab].concat())
    };
    let out = order(&[]);
    assert!(!out.status.success());
    // certbot reads `meta.externalAccountRequired` and stops before asking.
    assert!(certbot.log().contains("Server requires external account binding"), "{}", certbot.log());
    let out = order(&["--eab-kid", "fleet-1", "--eab-hmac-key", "d3JvbmctaG1hYy1rZXktZm9yLXRoZS1mbGVldC0wMQ"]);
    assert!(!out.status.success());
    assert!(certbot.log().contains("does not verify with key"), "{}", certbot.log());
    ok(order(&["--eab-kid", "fleet-1", "--eab-hmac-key", key]), "certbot with the configured EAB key");
    fleet.verify(&certbot.live("web.internal", "cert.pem"), &certbot.live("web.internal", "chain.pem"));
}

/// Lanyard's own client against `eab_required` (instant-acme sends the
/// request, unlike certbot): without a binding the server's
/// `externalAccountRequired` reaches `last_error`; with the configured key
/// (`eab_kid`, `eab_hmac_key`) the certificate issues.
#[test]
fn lanyard_is_told_a_binding_is_required_and_issues_with_one() {
    let key = "c2VjcmV0LWhtYWMta2V5LWZvci10aGUtZmxlZXQtMDE";
    let fleet = Fleet::start_with(
        |https, root| {
            let public = |name: &str, domain: &str, eab: &str| {
                format!(
                    "[[public]]\nname = \"{name}\"\ndomains = [\"{domain}\"]\nemail = \"{name}@example.test\"\n\
                     directory_url = \"https://127.0.0.1:{https}/acme/directory\"\n{eab}"
                )
            };
            format!(
                "eab_required = true\neab = {{ \"fleet-1\" = \"{key}\" }}\n[acme]\ndirectory_roots = {root:?}\n{}{}",
                public("unbound", "web.internal", ""),
                public("bound", "api.internal", &format!("eab_kid = \"fleet-1\"\neab_hmac_key = \"{key}\"\n")),
            )
        },
        true,
    );
    let admin = fleet.pki.state().join("admin");
    let get = |name: &str| -> serde_json::Value {
        let (status, text) =
            curl_api(&fleet.pki, "GET", &fleet.ca.url(&format!("/certificates/{name}")), None, Some(&admin));
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(200), "bound issued, unbound refused", || {
        let (bound, unbound) = (get("bound"), get("unbound"));
        if bound["status"] == "valid" && unbound["last_error"].is_string() {
            return Ok(());
        }
        Err(format!("bound: {bound}\nunbound: {unbound}"))
    });
    let error = get("unbound")["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("externalAccountRequired") || error.contains("external account binding"), "{error}");
    assert_eq!(get("unbound")["status"], "failed");
    let dir = fleet.pki.state().join("public/bound");
    fleet.verify(&dir.join("cert.pem"), &dir.join("cert.pem"));
}

/// Account resources through instant-acme, a client library we did not
/// write: key change (the old key is refused afterwards, the new one
/// orders), a contact update, and deactivation (the account then orders
/// nothing).
#[test]
fn accounts_change_keys_update_contacts_and_deactivate_from_instant_acme() {
    use instant_acme::{Account, Identifier, NewAccount, NewOrder};
    let fleet = Fleet::start("");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let builder = || Account::builder_with_root(fleet.root()).unwrap();
        let new = NewAccount {
            contact: &["mailto:a@example.test"],
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (mut account, old_key) = builder().create(&new, fleet.directory(), None).await.unwrap();
        let (id, thumbprint) = (account.id().to_owned(), account.key_thumbprint().to_owned());
        let identifiers = [Identifier::Dns("web.internal".into())];
        let order = || NewOrder::new(&identifiers);

        let new_key = account.update_key().await.unwrap();
        assert_eq!(account.id(), id, "the account keeps its URL");
        assert_ne!(account.key_thumbprint(), thumbprint);
        account.new_order(&order()).await.expect("the new key orders");
        let old = builder().from_credentials(old_key).await.unwrap();
        let refused = old.new_order(&order()).await.err().expect("the old key is refused").to_string();
        // As Boulder answers: the account's key is the new one, so the signature fails.
        assert!(refused.contains("signature does not verify") && refused.contains("malformed"), "old key: {refused}");

        account.update_contacts(&["mailto:b@example.test"]).await.unwrap();
        account.deactivate().await.unwrap();
        let again = builder().from_credentials(new_key).await.unwrap();
        let refused = again.new_order(&order()).await.err().expect("a deactivated account is refused").to_string();
        assert!(refused.contains("deactivated"), "a deactivated account: {refused}");
    });
    assert!(fleet.metric("lanyard_ca_acme_server_requests_total{resource=\"key-change\"}") >= 1.0);
}

/// Two `ca serve` replicas on one real redis-server serve one ACME server:
/// through instant-acme, an account registered at A orders at A, the
/// order's authorization is fetched and validated at B, A sees it ready and
/// finalizes it, and B hands out the certificate, which verifies against
/// the fleet root.
#[test]
fn replicas_on_redis_serve_one_acme_server() {
    use instant_acme::{Account, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy};
    let pki = Pki::new(&[]);
    let redis = RedisServer::start(&pki.path("redis"));
    let answers = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, String>::new()));
    let http01 = {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answers = answers.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut request = String::new();
                let _ = std::io::BufReader::new(&conn).read_line(&mut request);
                let token = request.split_whitespace().nth(1).and_then(|p| p.rsplit('/').next()).unwrap_or("");
                let reply = match answers.lock().unwrap().get(token) {
                    Some(a) => {
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{a}", a.len())
                    }
                    None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
                };
                let _ = (&conn).write_all(reply.as_bytes());
            }
        });
        port
    };
    let replica = |name: &str| {
        let (https, http) = (free_port(), free_port());
        let config = pki.path(&format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "state = {:?}\nhttps_listen = \"127.0.0.1:{https}\"\nhttp_listen = \"127.0.0.1:{http}\"\nstore = \"{}\"\n\
                 [acme_server]\nallow = [\"*.internal\"]\nhttp01_port = {http01}\nhosts = {{ \"web.internal\" = \"127.0.0.1\" }}\n",
                pki.state(),
                redis.url()
            ),
        )
        .unwrap();
        CaServer::start_with(&pki, config, https, http)
    };
    let (a, b) = (replica("a"), replica("b"));
    let (at_a, at_b) = (format!("127.0.0.1:{}", a.https_port), format!("127.0.0.1:{}", b.https_port));
    let root = pki.state().join("root.pem");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let chain = runtime.block_on(async {
        let builder = || Account::builder_with_root(&root).unwrap();
        let new = NewAccount { contact: &[], terms_of_service_agreed: true, only_return_existing: false };
        let (account_a, credentials) =
            builder().create(&new, format!("https://{at_a}/acme/directory"), None).await.unwrap();
        // The same account, talking to B.
        let moved = serde_json::to_string(&credentials).unwrap().replace(&at_a, &at_b);
        let account_b = builder().from_credentials(serde_json::from_str(&moved).unwrap()).await.unwrap();
        let identifiers = [Identifier::Dns("web.internal".into())];
        let mut order_a = account_a.new_order(&NewOrder::new(&identifiers)).await.unwrap();
        let mut order_b = account_b.order(order_a.url().replace(&at_a, &at_b)).await.expect("B knows A's order");
        let mut authorizations = order_b.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.unwrap();
            let mut challenge = authorization.challenge(ChallengeType::Http01).expect("an http-01 challenge");
            answers.lock().unwrap().insert(challenge.token.clone(), challenge.key_authorization().as_str().to_owned());
            challenge.set_ready().await.unwrap();
        }
        let retry = RetryPolicy::new().initial_delay(Duration::from_millis(50)).timeout(Duration::from_secs(20));
        assert_eq!(order_a.poll_ready(&retry).await.unwrap(), OrderStatus::Ready, "A sees B's validation");
        let key = pki.path("web.key");
        let csr = run_ok(
            Command::new(peer("openssl"))
                .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"])
                .arg(&key)
                .args(["-subj", "/CN=web.internal", "-addext", "subjectAltName=DNS:web.internal", "-outform", "DER"]),
        )
        .stdout;
        order_a.finalize_csr(&csr).await.unwrap();
        order_b.poll_certificate(&retry).await.expect("B hands out the certificate A finalized")
    });
    let cert = pki.path("web.pem");
    std::fs::write(&cert, &chain).unwrap();
    run_ok(
        Command::new(peer("openssl")).arg("verify").arg("-CAfile").arg(&root).arg("-untrusted").arg(&cert).arg(&cert),
    );
    assert!(redis.cli(&["KEYS", "*"]).contains("acme_server_order"), "the order is in Redis");
}
