//! Network enrolment on loopback: sidecars make their own keys, enrol with a
//! credential that pins the CA's root, renew over mTLS, and ride out a CA
//! outage; credentials are bound to one identity and revocable.

use super::*;

/// `ca enrol NAME` into `file`, naming the CA at `server`; the credential's id.
fn enrol_credential(pki: &Pki, server: &CaServer, name: &str, file: &Path) -> String {
    let out = run_ok(
        ca().args(["enrol", name, "--ca-url", &format!("https://localhost:{}", server.https_port), "-o"])
            .arg(file)
            .arg("--state")
            .arg(pki.state()),
    );
    let said = text(&out.stderr);
    said.split_whitespace().nth(2).expect("the credential id").to_owned()
}

/// An inbound sidecar that enrols with `credential` into `dir`.
fn enrolled_inbound(pki: &Pki, credential: &Path, dir: &Path, port: u16, app: SocketAddr, log: &str) -> Sidecar {
    Sidecar::start(
        &[
            "--enrol",
            credential.to_str().unwrap(),
            "--cert-dir",
            dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &app.to_string(),
            "--allow",
            "spiffe://lanyard.internal/web",
        ],
        pki.path(log),
    )
}

fn readyz(sidecar: &Sidecar) -> Value {
    serde_json::from_str(&sidecar.get("/readyz").1).unwrap_or(Value::Null)
}

/// Every file under `root` (symlinks not followed) whose text contains `needle`.
fn files_containing(root: &Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t)
                    if t.is_file()
                        && std::fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) =>
                {
                    found.push(path)
                }
                _ => {}
            }
        }
    }
    found
}

/// A sidecar enrols with its own key, serves mTLS, renews three times,
/// serves on through a CA outage longer than a third of its certificate's
/// life (degraded, still ready), and recovers when the CA returns. Its key
/// never appears outside its own cert dir.
#[test]
fn a_sidecar_enrols_with_its_own_key_renews_and_rides_out_a_ca_outage() {
    let pki = Pki::new(&[]);
    let server = CaServer::start(&pki, "leaf_ttl = \"24s\"\n");
    let credential = pki.path("credentials/api.toml");
    std::fs::create_dir_all(credential.parent().unwrap()).unwrap();
    enrol_credential(&pki, &server, "api", &credential);
    let cred_text = std::fs::read_to_string(&credential).unwrap();
    for key in ["ca = ", "fingerprint = ", "secret = "] {
        assert!(cred_text.contains(key), "{cred_text}");
    }
    assert_eq!(cred_text.lines().filter(|l| !l.trim().is_empty()).count(), 3, "the credential holds nothing else");

    let dir = pki.path("sidecar-api");
    let port = free_port();
    let inbound = enrolled_inbound(&pki, &credential, &dir, port, echo_upstream(), "enrolled.log");
    wait_until(Duration::from_secs(20), "the sidecar enrols", || serial_of(&dir).is_some());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is private to the sidecar");
    // The log line follows the cert dir's swap: wait for it, do not race it.
    wait_for_log(&inbound.log, "enrolled");

    let web = pki.issue("web", &[]);
    let outbound = free_port();
    let _out = Sidecar::start(
        &[
            "--cert-dir",
            web.to_str().unwrap(),
            "--mode",
            "outbound",
            "--listen",
            &format!("127.0.0.1:{outbound}"),
            "--upstream",
            &format!("localhost:{port}"),
            "--server-name",
            "spiffe://lanyard.internal/api",
        ],
        pki.path("out.log"),
    );
    let traffic = Traffic::start(format!("127.0.0.1:{outbound}").parse().unwrap());

    let mut serials = vec![serial_of(&dir).unwrap()];
    while serials.len() < 4 {
        let last = serials.last().unwrap().clone();
        wait_until(Duration::from_secs(30), "a renewal", || serial_of(&dir).is_some_and(|s| s != last));
        serials.push(serial_of(&dir).unwrap());
    }
    let keys: HashSet<String> = files_containing(&dir, "PRIVATE KEY").iter().map(|p| p.display().to_string()).collect();
    assert!(!keys.is_empty());

    // The CA stops right after a renewal, for longer than a third of the life.
    let last = serials.last().unwrap().clone();
    wait_until(Duration::from_secs(30), "a fresh renewal", || serial_of(&dir).is_some_and(|s| s != last));
    let config = server.config.clone();
    let https_port = server.https_port;
    drop(server);
    poll_until(Duration::from_secs(30), Duration::from_millis(200), "degraded while the CA is away", || {
        readyz(&inbound)["degraded"] == true
    });
    let ready = readyz(&inbound);
    assert_eq!(ready["ready"], true, "degraded, still ready: {ready}");
    assert!(ready["reason"].as_str().unwrap_or_default().contains("last sixth"), "{ready}");
    let during = serial_of(&dir);
    let _back = CaServer::start_with(&pki, config, https_port, free_port());
    wait_until(Duration::from_secs(30), "renewed once the CA is back", || {
        serial_of(&dir).is_some() && serial_of(&dir) != during
    });
    poll_until(Duration::from_secs(10), Duration::from_millis(200), "healthy again", || {
        readyz(&inbound)["degraded"] == false
    });

    let requests = traffic.finish();
    let key = std::fs::read_to_string(dir.join("key.pem")).unwrap();
    let body = key.lines().nth(1).unwrap();
    let outside: Vec<_> = files_containing(pki.tmp.path(), body).into_iter().filter(|p| !p.starts_with(&dir)).collect();
    assert!(outside.is_empty(), "the key appears outside the sidecar's cert dir: {outside:?}");
    eprintln!("enrolled, {} renewals, an outage ridden out; {requests} requests, none failed", serials.len() + 1);
}

/// A credential enrols only its identity; a revoked one is refused at once;
/// a credential pinning another root is refused before its secret is sent.
#[test]
fn credentials_are_bound_revocable_and_pinned() {
    let pki = Pki::new(&[]);
    let server = CaServer::start(&pki, "");
    let credential = pki.path("a.toml");
    let id = enrol_credential(&pki, &server, "a", &credential);
    let secret = std::fs::read_to_string(&credential)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("secret = ").map(|s| s.trim_matches('"').to_owned()))
        .unwrap();
    let work = pki.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let url = server.url("/v1/enrol");
    let post = |csr_pem: &str| {
        curl_api(&pki, "POST", &url, Some(&json!({"secret": secret, "csr": csr_pem}).to_string()), None)
    };
    let (status, body) = post(&csr(&work, "b", "DNS:b"));
    assert_eq!(status, 403, "a credential for a cannot get b: {body}");
    let (status, body) = post(&csr(&work, "a", "DNS:a"));
    assert_eq!(status, 200, "{body}");

    // A wrong pin: the sidecar refuses the CA before sending anything.
    let wrong = pki.path("wrong.toml");
    let text_a = std::fs::read_to_string(&credential).unwrap();
    let pinned = text_a.lines().find_map(|l| l.strip_prefix("fingerprint = ")).unwrap().trim_matches('"').to_owned();
    std::fs::write(&wrong, text_a.replace(&pinned, &"0".repeat(64))).unwrap();
    let uses_before = server.log_text().matches("enrolment").count();
    let pinned_off = enrolled_inbound(&pki, &wrong, &pki.path("wrong-dir"), free_port(), echo_upstream(), "wrong.log");
    wait_for_log(&pinned_off.log, "serves no root with the pinned fingerprint");
    assert!(pinned_off.log_text().contains("nothing was sent"), "{}", pinned_off.log_text());
    assert_eq!(server.log_text().matches("enrolment").count(), uses_before, "the CA saw no enrolment attempt");
    assert!(serial_of(&pki.path("wrong-dir")).is_none());

    // Revoked: refused at once, over the API and by a sidecar.
    let list = text(&run_ok(ca().args(["enrol", "--list", "--state"]).arg(pki.state())).stdout);
    assert!(list.contains(&id) && list.contains("active") && list.contains("127.0.0.1"), "{list}");
    run_ok(ca().args(["enrol", "--revoke", &id, "--state"]).arg(pki.state()));
    let (status, body) = post(&csr(&work, "a", "DNS:a"));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    let refused =
        enrolled_inbound(&pki, &credential, &pki.path("revoked-dir"), free_port(), echo_upstream(), "revoked.log");
    wait_for_log(&refused.log, "revoked");
    assert!(serial_of(&pki.path("revoked-dir")).is_none());
    let list = text(&run_ok(ca().args(["enrol", "--list", "--state"]).arg(pki.state())).stdout);
    assert!(list.contains("revoked"), "{list}");
}
