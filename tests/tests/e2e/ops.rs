//! Operator conventions: `ca doctor` against real faults, JSON logs with
//! stable certificate-event fields, shell completion in a real bash, and
//! the shipped dashboard and alert rules against the metrics a real
//! `ca serve` and `sidecar` expose.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lanyard_tests::*;
use serde_json::Value;

const TRUST_DOMAIN: &str = "ops.test";

fn doctor(config: &Path) -> Output {
    run(ca().arg("doctor").arg("--config").arg(config))
}

/// The doctor's lines that start with `level` and mention every one of `needles`.
fn findings(out: &Output, level: &str, needles: &[&str]) -> Vec<String> {
    text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(level) && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

fn assert_fault(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "doctor exited 0 despite the fault {needles:?}:\n{}", text(&out.stdout));
    assert_eq!(
        findings(out, "error", needles).len(),
        1,
        "want one error line with {needles:?}:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Copies a cert dir's files (through its symlinks) into a plain directory.
fn copy_cert_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["cert.pem", "key.pem", "ca.pem", "crl.pem"] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
}

/// A CRL whose nextUpdate passed on 2025-01-02, signed by a throwaway CA
/// with real openssl (`ca -gencrl -crl_nextupdate`).
fn expired_crl(dir: &Path) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    run_ok(
        Command::new(peer("openssl"))
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
            .args(["-keyout", "k.pem", "-out", "c.pem", "-subj", "/CN=old", "-days", "1"])
            .current_dir(dir),
    );
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("ca.cnf"), "[ca]\ndefault_ca=x\n[x]\ndatabase=index.txt\ndefault_md=sha256\n").unwrap();
    run_ok(
        Command::new(peer("openssl"))
            .args(["ca", "-config", "ca.cnf", "-gencrl", "-keyfile", "k.pem", "-cert", "c.pem", "-out", "crl.pem"])
            .args(["-crl_lastupdate", "20250101000000Z", "-crl_nextupdate", "20250102000000Z"])
            .current_dir(dir),
    );
    std::fs::read(dir.join("crl.pem")).unwrap()
}

#[test]
fn doctor_passes_a_healthy_deployment_and_finds_each_fault() {
    let pki = Pki::new(&["--trust-domain", TRUST_DOMAIN]);
    let admin = free_port();
    let api = pki.path("api");
    let server = CaServer::start(
        &pki,
        &format!(
            "[[identity]]\nname = \"api\"\nttl = \"1h\"\nout_dir = {api:?}\nsidecar_admin = \"127.0.0.1:{admin}\"\n"
        ),
    );
    wait_until(Duration::from_secs(15), "api's first certificate", || api.join("cert.pem").exists());
    // The sidecar serves a copy, so a new certificate in api's cert dir is
    // one it never sees: "serving an old serial".
    let served = pki.path("api-served");
    copy_cert_dir(&api, &served);
    let (listen, upstream) = (free_port(), echo_upstream().port());
    let _sidecar = Sidecar::start_at(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        &[
            "--cert-dir",
            served.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--upstream",
            &format!("127.0.0.1:{upstream}"),
        ],
        pki.path("sidecar.log"),
    );

    let healthy = doctor(&server.config);
    let report = text(&healthy.stdout);
    assert!(healthy.status.success(), "a healthy deployment failed the doctor:\n{report}{}", text(&healthy.stderr));
    for subject in ["state", "root CA", "intermediate CA", "store", "ca serve", "cert dir api", "sidecar api"] {
        assert!(
            !findings(&healthy, "ok", &[&format!(" {subject}: ")]).is_empty(),
            "no ok line for {subject}:\n{report}"
        );
    }
    assert!(report.lines().all(|l| l.starts_with("ok ")), "{report}");

    // A private key readable by others.
    let key = api.join("key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_fault(&doctor(&server.config), &["cert dir api", "key.pem is mode 0644", "chmod 600"]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A state directory others can enter.
    let state = pki.state();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_fault(&doctor(&server.config), &["state", "mode 0755", "chmod 700"]);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

    // An expired CRL.
    let crl = api.join("crl.pem");
    let current = std::fs::read(&crl).unwrap();
    std::fs::write(&crl, expired_crl(&pki.path("old-ca"))).unwrap();
    assert_fault(&doctor(&server.config), &["cert dir api", "crl.pem expired at 2025-01-02T00:00:00Z"]);
    std::fs::write(&crl, current).unwrap();
    assert!(doctor(&server.config).status.success(), "the deployment is healthy again");

    // A sidecar serving an old serial: api's cert dir gets a new certificate.
    let old = text(&run_ok(ca().args(["inspect", "--json"]).arg(&served)).stdout);
    let old: Value = serde_json::from_str(&old).unwrap();
    let old = old["certificates"][0]["serial"].as_str().unwrap().to_owned();
    pki.issue_into("api", &api, &[]);
    let out = doctor(&server.config);
    assert_fault(&out, &["sidecar api", &format!("serves serial {old}, but its cert dir holds")]);
}

#[test]
fn doctor_finds_a_stopped_store() {
    let pki = Pki::new(&["--trust-domain", TRUST_DOMAIN]);
    let mut redis = RedisServer::start(&pki.path("redis"));
    let (https, http) = (free_port(), free_port());
    let config = pki.path("redis.toml");
    std::fs::write(
        &config,
        format!(
            "state = {:?}\nhttps_listen = \"127.0.0.1:{https}\"\nhttp_listen = \"127.0.0.1:{http}\"\nstore = \"{}\"\n",
            pki.state(),
            redis.url()
        ),
    )
    .unwrap();
    let _server = CaServer::start_with(&pki, config.clone(), https, http);
    let up = doctor(&config);
    assert!(up.status.success(), "{}{}", text(&up.stdout), text(&up.stderr));
    assert_eq!(findings(&up, "ok", &["store: redis answers"]).len(), 1, "{}", text(&up.stdout));

    redis.kill();
    let down = doctor(&config);
    assert!(!down.status.success(), "{}", text(&down.stdout));
    assert!(
        !findings(&down, "error", &[" store: ", &format!("start the Redis server (127.0.0.1:{})", redis.port)])
            .is_empty(),
        "{}",
        text(&down.stdout)
    );
}

/// Every line of `path`, parsed: a line that is not a JSON object fails.
fn json_lines(path: &Path) -> Vec<Value> {
    let log = std::fs::read_to_string(path).unwrap();
    log.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: a line that is no JSON ({e}): {line}", path.display()));
            for field in ["timestamp", "level", "target", "message"] {
                assert!(v.get(field).is_some(), "{}: no {field:?} in {line}", path.display());
            }
            v
        })
        .collect()
}

/// The first event `event` whose fields include every pair in `with`.
fn find_event(lines: &[Value], event: &str, with: &[(&str, &str)]) -> Option<Value> {
    lines.iter().find(|v| v["event"] == event && with.iter().all(|(k, want)| v[*k].as_str() == Some(*want))).cloned()
}

fn wait_for_event(path: &Path, event: &str, with: &[(&str, &str)]) -> Value {
    let mut found = None;
    wait_until(Duration::from_secs(20), &format!("event {event} {with:?} in {}", path.display()), || {
        found = find_event(&json_lines(path), event, with);
        found.is_some()
    });
    found.unwrap()
}

/// The demo's job (`ca serve` keeping api current, api behind an inbound
/// sidecar that admits only web) with `--log-format json`: every line of
/// both logs is JSON, and the certificate events are found by their fields.
#[test]
fn json_logs_carry_certificate_events_by_stable_fields() {
    let pki = Pki::new(&["--trust-domain", TRUST_DOMAIN]);
    let api = pki.path("api");
    let (https, http) = (free_port(), free_port());
    let config = pki.path("lanyard.toml");
    std::fs::write(
        &config,
        format!(
            "state = {:?}\nhttps_listen = \"127.0.0.1:{https}\"\nhttp_listen = \"127.0.0.1:{http}\"\n[[identity]]\nname = \"api\"\nttl = \"6s\"\nout_dir = {api:?}\n",
            pki.state()
        ),
    )
    .unwrap();
    let server = CaServer::start_with_args(&pki, config, https, http, &["--log-format", "json"]);
    let issued = wait_for_event(&server.log, "issued", &[("identity", "api")]);
    let listen = format!("127.0.0.1:{}", free_port());
    let sidecar = Sidecar::start(
        &[
            "--log-format",
            "json",
            "--cert-dir",
            api.to_str().unwrap(),
            "--listen",
            &listen,
            "--upstream",
            &format!("127.0.0.1:{}", free_port()),
            "--allow",
            &format!("spiffe://{TRUST_DOMAIN}/web"),
        ],
        pki.path("sidecar.log"),
    );
    let spiffe = format!("spiffe://{TRUST_DOMAIN}/api");
    wait_for_event(&sidecar.log, "reloaded", &[("identity", &spiffe)]);

    let intruder = pki.issue("intruder", &[]);
    let _ = openssl_classical(
        &listen,
        &[
            "-cert".as_ref(),
            intruder.join("cert.pem").as_os_str(),
            "-key".as_ref(),
            intruder.join("key.pem").as_os_str(),
            "-CAfile".as_ref(),
            intruder.join("ca.pem").as_os_str(),
        ],
    );
    let refused = wait_for_event(&sidecar.log, "refused", &[]);
    assert!(refused["listener"].is_string(), "{refused}");
    assert!(refused["reason"].as_str().is_some_and(|r| !r.is_empty()), "{refused}");

    let renewed = wait_for_event(&server.log, "renewed", &[("identity", "api")]);
    let serial = renewed["serial"].as_str().unwrap();
    assert_ne!(Some(serial), issued["serial"].as_str(), "{renewed}");
    assert!(renewed["not_after"].as_str().is_some_and(|t| t.ends_with('Z')), "{renewed}");
    let reloaded = wait_for_event(&sidecar.log, "reloaded", &[("serial", serial)]);
    assert_eq!(reloaded["identity"], spiffe.as_str(), "{reloaded}");
    assert_eq!(reloaded["level"], "INFO", "{reloaded}");
}

#[test]
fn bash_completes_ca_subcommands() {
    let script = text(&run_ok(ca().args(["completion", "bash"])).stdout);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    let out = run_ok(Command::new("bash").arg("-c").arg(format!(
        "source {:?} && COMP_WORDS=(ca i) && COMP_CWORD=1 && COMP_LINE='ca i' && COMP_POINT=4 && _ca ca i ca && printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        file.path()
    )));
    let mut offered: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    offered.sort();
    assert_eq!(offered, ["init", "inject", "inspect", "intermediate", "issue"], "{}", text(&out.stderr));
}

#[test]
fn man_pages_cover_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(ca().arg("man").arg(dir.path()));
    run_ok(Command::new(bin("sidecar")).arg("man").arg(dir.path()));
    for page in ["ca.1", "ca-doctor.1", "ca-root-rotate-finish.1", "sidecar.1", "sidecar-run.1"] {
        let roff = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(roff.contains(".TH ") && roff.contains(".SH OPTIONS"), "{page}:\n{roff}");
    }
}

/// Metric names in PromQL text: identifiers that start with `lanyard_`.
fn metric_names(promql: &str, into: &mut Vec<String>) {
    let mut rest = promql;
    while let Some(at) = rest.find("lanyard_") {
        let preceded = rest[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let len =
            rest[at..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len() - at);
        if !preceded {
            into.push(rest[at..at + len].to_owned());
        }
        rest = &rest[at + len..];
    }
}

/// Every `expr` and templating `query` in the dashboard.
fn dashboard_queries(v: &Value, into: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => into.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        into.extend(q.get("query").and_then(Value::as_str).map(str::to_owned))
                    }
                    _ => dashboard_queries(v, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, into)),
        _ => {}
    }
}

fn exposes(metrics: &str, name: &str) -> bool {
    if metrics.contains(&format!("# TYPE {name} ")) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix).is_some_and(|base| metrics.contains(&format!("# TYPE {base} histogram")))
    })
}

/// The dashboard and the alert rules name only metrics that a real
/// `ca serve` and a real `sidecar` expose: renaming a metric fails here.
#[test]
fn dashboard_and_alerts_use_only_exposed_metrics() {
    let root = workspace_root();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("ca/grafana/lanyard.json")).unwrap()).unwrap();
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let alerts = std::fs::read_to_string(root.join("ca/alerts.yml")).unwrap();
    let exprs: Vec<&str> = alerts.lines().filter_map(|l| l.trim().strip_prefix("expr:")).collect();
    assert_eq!(exprs.len(), alerts.matches("- alert:").count(), "every alert has a one-line expr");
    let mut names = Vec::new();
    for q in queries.iter().map(String::as_str).chain(exprs.iter().copied()) {
        metric_names(q, &mut names);
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 30, "too few metric names found, is the extraction broken? {names:?}");

    let pki = Pki::new(&["--trust-domain", TRUST_DOMAIN]);
    let api = pki.path("api");
    let server = CaServer::start(&pki, &format!("[[identity]]\nname = \"api\"\nttl = \"1h\"\nout_dir = {api:?}\n"));
    wait_until(Duration::from_secs(15), "api's first certificate", || api.join("cert.pem").exists());
    let (code, ca_metrics) = curl_api(&pki, "GET", &server.url("/metrics"), None, None);
    assert_eq!(code, 200, "{ca_metrics}");
    let sidecar = Sidecar::start(
        &[
            "--cert-dir",
            api.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--upstream",
            &format!("127.0.0.1:{}", free_port()),
        ],
        pki.path("sidecar.log"),
    );
    let (code, sidecar_metrics) = sidecar.get("/metrics");
    assert_eq!(code, 200, "{sidecar_metrics}");

    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            let metrics = if n.starts_with("lanyard_sidecar_") { &sidecar_metrics } else { &ca_metrics };
            !exposes(metrics, n)
        })
        .collect();
    assert!(missing.is_empty(), "named by the dashboard or the alerts, exposed by nothing: {missing:?}");
}
