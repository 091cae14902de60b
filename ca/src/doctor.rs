//! `ca doctor`: checks a deployment end to end, from the `ca serve` config,
//! and prints one finding per line with what to do.
//!
//! Checks: the state directory's permissions, the root's and the
//! intermediate's expiry, the store, `ca serve` itself (and its clock),
//! every managed cert dir (chain, key and its mode, renewal window, CRL
//! age), every known sidecar's `/readyz` (and its clock), and every ACME
//! directory the public certificates use.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lanyard_sidecar::certdir::{CertDir, CRL_FILE, KEY_FILE};
use lanyard_sidecar::certinfo::rfc3339;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::serve::config::ServeConfig;
use crate::serve::sidecars::{self, KnownSidecar};
use crate::state::CaState;
use crate::store::Store;

/// A clock this far from ours is worth a warning.
const CLOCK_WARN: time::Duration = time::Duration::seconds(30);
/// Beyond this, fresh certificates look not-yet-valid to the other side
/// (leaves are backdated by at most 5 minutes).
const CLOCK_ERROR: time::Duration = time::Duration::minutes(5);
/// How long one remote check may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Checked and fine.
    Ok,
    /// Works now, but needs attention.
    Warn,
    /// Broken, or about to break.
    Error,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Finding {
    /// How bad.
    pub level: Level,
    /// What was checked: `state`, `store`, `cert dir api`, `sidecar api`...
    pub subject: String,
    /// What was found.
    pub text: String,
    /// What to do, for warnings and errors.
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Ok => "ok   ",
            Level::Warn => "warn ",
            Level::Error => "error",
        };
        write!(f, "{level} {}: {}", self.subject, self.text)?;
        match &self.fix {
            Some(fix) => write!(f, " -> {fix}"),
            None => Ok(()),
        }
    }
}

/// Everything `ca doctor` found.
#[derive(Debug, Default)]
pub struct Report {
    /// In the order checked.
    pub findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, subject: impl Into<String>, text: impl Into<String>) {
        self.push(Level::Ok, subject, text, None::<String>);
    }

    fn warn(&mut self, subject: impl Into<String>, text: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warn, subject, text, Some(fix));
    }

    fn error(&mut self, subject: impl Into<String>, text: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Error, subject, text, Some(fix));
    }

    fn push(
        &mut self,
        level: Level,
        subject: impl Into<String>,
        text: impl Into<String>,
        fix: Option<impl Into<String>>,
    ) {
        self.findings.push(Finding { level, subject: subject.into(), text: text.into(), fix: fix.map(Into::into) });
    }

    /// Whether any finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Error)
    }

    /// One line per finding.
    pub fn render(&self) -> String {
        self.findings.iter().map(|f| format!("{f}\n")).collect()
    }
}

/// Runs every check against the deployment `config` describes.
pub async fn diagnose(config: &ServeConfig, now: OffsetDateTime) -> Report {
    let mut report = Report::default();
    let dir = config.state_dir();
    state_permissions(dir, &mut report);
    let ca = match CaState::load(dir) {
        Ok(ca) => ca,
        Err(e) => {
            report.error("state", e.to_string(), "run `ca init` or point `state` at the CA's directory");
            return report;
        }
    };
    for e in ca.expiry(now) {
        let subject = format!("{} CA", e.role);
        let text = format!("expires {} (in {} days)", rfc3339(e.not_after), (e.not_after - now).whole_days());
        match &e.alarm {
            Some(alarm) => report.error(
                subject,
                format!("{text}: {alarm}"),
                "see `ca intermediate roll` and `ca root rotate` in the README",
            ),
            None => report.ok(subject, text),
        }
    }
    let store = match crate::store::open(&config.store_spec(), dir, config.store_key.as_deref()) {
        Ok(store) => match store.check() {
            Ok(()) => {
                report.ok("store", format!("{} answers", store.backend()));
                Some(store)
            }
            Err(e) => {
                report.error("store", format!("{} does not answer: {e}", store.backend()), store_fix(config));
                None
            }
        },
        Err(e) => {
            report.error("store", e.to_string(), store_fix(config));
            None
        }
    };
    // The roots every TLS check here trusts: the CA's current bundle.
    let roots = lanyard_sidecar::certdir::parse_certs(dir, ca.bundle_pem().as_bytes()).unwrap_or_default();
    ca_service(config, &roots, now, &mut report).await;
    for id in &config.identities {
        cert_dir(id.name.as_str(), &CertDir::new(&id.out_dir), &ca, store.as_deref(), now, &mut report);
    }
    if let Some(store) = &store {
        other_identities(config, store.as_ref(), now, &mut report);
    }
    match crate::serve::known_sidecars(config, ca.trust_domain()) {
        Ok(known) => {
            for s in &known {
                sidecar(s, config, &roots, now, &mut report).await;
            }
        }
        Err(e) => report.error("sidecars", e.to_string(), "fix `sidecar_admin` or `spiffe` in the config"),
    }
    acme_directories(config, store.as_ref(), &mut report).await;
    report
}

/// The scheduled identities the config does not list (the CA's own,
/// discovered Docker containers): each renewed on time.
fn other_identities(config: &ServeConfig, store: &dyn Store, now: OffsetDateTime, report: &mut Report) {
    let rows = match store.schedules() {
        Ok(rows) => rows,
        Err(e) => return report.error("store", format!("cannot read the schedule: {e}"), store_fix(config)),
    };
    let others: Vec<_> =
        rows.iter().filter(|r| !config.identities.iter().any(|id| id.name.as_str() == r.identity)).collect();
    let mut fine = 0;
    for row in &others {
        match crate::ops::trouble(row, now.unix_timestamp()) {
            Some(why) => {
                report.error(format!("identity {}", row.identity), why, "see `ca status` and the log of `ca serve`")
            }
            None => fine += 1,
        }
    }
    if fine > 0 {
        report.ok(
            "identities",
            format!("{fine} more scheduled identities renewed on time (the CA's own, discovered containers)"),
        );
    }
}

fn store_fix(config: &ServeConfig) -> String {
    match config.store_spec() {
        crate::store::StoreSpec::Sqlite => "check the state directory's disk and permissions".into(),
        crate::store::StoreSpec::Redis(url) => {
            // Never print a password from the URL.
            let server = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
            let server = server.rsplit_once('@').map_or(server, |(_, host)| host);
            format!("start the Redis server ({server}), or fix `store` / REDIS_URL")
        }
    }
}

/// The state directory is 0700 and every key in it 0600.
fn state_permissions(dir: &Path, report: &mut Report) {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    let mut private = true;
    match mode(dir) {
        Ok(m) if m & 0o077 != 0 => {
            private = false;
            report.error(
                "state",
                format!("{} is mode {m:04o}: other users can reach the CA's keys", dir.display()),
                format!("chmod 700 {}", dir.display()),
            );
        }
        Ok(_) => {}
        Err(e) => {
            return report.error("state", format!("cannot read {}: {e}", dir.display()), "check `state` in the config")
        }
    }
    let mut keys = Vec::new();
    collect_keys(dir, 2, &mut keys);
    keys.sort();
    for key in &keys {
        if let Ok(m) = mode(key) {
            if m & 0o077 != 0 {
                private = false;
                report.error(
                    "state",
                    format!("{} is mode {m:04o}: a private key readable by others", key.display()),
                    format!("chmod 600 {}", key.display()),
                );
            }
        }
    }
    if private {
        report.ok("state", format!("{} and its {} key files are private", dir.display(), keys.len()));
    }
}

/// Private keys under `dir`, `depth` levels down: `*.key` and `key.pem`.
fn collect_keys(dir: &Path, depth: u8, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() && depth > 0 {
            collect_keys(&path, depth - 1, out);
        } else if kind.is_file() && (name.ends_with(".key") || name == KEY_FILE) {
            out.push(path);
        }
    }
}

/// `ca serve` answers `/health` on its API, with a clock close to ours.
async fn ca_service(config: &ServeConfig, roots: &[CertificateDer<'static>], now: OffsetDateTime, report: &mut Report) {
    let mut addr = config.https_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let subject = "ca serve";
    let tls = match client_config(roots) {
        Ok(tls) => tls,
        Err(e) => return report.error(subject, e, "check the state's root.pem"),
    };
    let host = addr.ip().to_string();
    match lanyard_sidecar::health::get(&host, addr.port(), "/health", tls, ANSWER_WITHIN).await {
        Ok(answer) => {
            clock(subject, answer.date, now, report);
            if answer.status == "200" {
                report.ok(subject, format!("answers https://{addr}/health"));
            } else {
                report.error(
                    subject,
                    format!("/health answered {}: {}", answer.status, answer.body),
                    "see `ca status` and its log",
                );
            }
        }
        Err(e) => report.error(subject, e.to_string(), format!("start `ca serve`, or fix `https_listen` ({addr})")),
    }
}

fn client_config(roots: &[CertificateDer<'static>]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut store = rustls::RootCertStore::empty();
    for der in roots {
        store.add(der.clone()).map_err(|e| e.to_string())?;
    }
    lanyard_sidecar::tls::client_config_with(store, &lanyard_sidecar::tls::ServerCheck::ChainOnly, None)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// A remote clock against ours.
fn clock(subject: &str, theirs: Option<OffsetDateTime>, now: OffsetDateTime, report: &mut Report) {
    let Some(theirs) = theirs else {
        return report.warn(
            subject,
            "sent no Date header, so its clock is unchecked",
            "nothing, unless it is not Lanyard",
        );
    };
    // Date has whole seconds, and the answer took a moment.
    let skew = theirs - now;
    let text = format!("clock {:+} s from this machine's", skew.whole_seconds());
    if skew.abs() > CLOCK_ERROR {
        report.error(
            subject,
            text,
            "sync the clocks (chrony or systemd-timesyncd): certificates look expired or not yet valid",
        );
    } else if skew.abs() > CLOCK_WARN {
        report.warn(subject, text, "sync the clocks (chrony or systemd-timesyncd)");
    } else {
        report.ok(subject, text);
    }
}

/// One managed cert dir: it verifies, its key is private, it is renewed on
/// schedule, and its CRL and bundle are current.
fn cert_dir(
    name: &str,
    dir: &CertDir,
    ca: &CaState,
    store: Option<&dyn Store>,
    now: OffsetDateTime,
    report: &mut Report,
) {
    let subject = format!("cert dir {name}");
    let path = dir.path().display().to_string();
    let inspection = match crate::inspect::inspect(dir.path(), now) {
        Ok(i) => i,
        Err(e) => {
            return report.error(subject, e.to_string(), format!("is `ca serve` managing {name}? see `ca status`"))
        }
    };
    if !inspection.ok() {
        report.error(
            &subject,
            format!("{path}: {}", inspection.problems.join("; ")),
            "see `ca status` and `ca inspect`",
        );
    }
    let key = dir.file(KEY_FILE);
    if let Ok(m) = std::fs::metadata(&key).map(|m| m.permissions().mode() & 0o777) {
        if m & 0o077 != 0 {
            report.error(
                &subject,
                format!("{} is mode {m:04o}", key.display()),
                format!("chmod 600 {}", key.display()),
            );
        }
    }
    let served = inspection.certificates.first().map(|c| c.info.serial.clone());
    match store.map(|s| s.schedule(name)) {
        Some(Ok(Some(row))) => {
            if let Some(why) = crate::ops::trouble(&row, now.unix_timestamp()) {
                report.error(&subject, why, "see `ca status` and the log of `ca serve`");
            }
            if row.serial.is_some() && row.serial != served {
                report.error(
                    &subject,
                    format!(
                        "holds serial {}, but the CA last issued {}",
                        served.as_deref().unwrap_or("none"),
                        row.serial.as_deref().unwrap_or("none")
                    ),
                    format!("check that `ca serve` can write {path}"),
                );
            }
        }
        Some(Ok(None)) => report.warn(&subject, "not in the schedule", "start `ca serve` with this config"),
        Some(Err(e)) => report.error(&subject, format!("cannot read its schedule: {e}"), "see the store finding above"),
        None => {}
    }
    if let Ok(ca_pem) = std::fs::read_to_string(dir.file(lanyard_sidecar::certdir::CA_FILE)) {
        if ca_pem.trim() != ca.bundle_pem().trim() {
            report.warn(
                &subject,
                "ca.pem is not the CA's current trust bundle",
                "`ca serve` rewrites it within seconds; is it running?",
            );
        }
    }
    match crl_next_update(&dir.file(CRL_FILE)) {
        Ok(Some(next)) if next <= now => report.error(
            &subject,
            format!("crl.pem expired at {}", rfc3339(next)),
            "`ca serve` re-signs the CRL every `crl_refresh`; is it running?",
        ),
        Ok(_) => {}
        Err(e) => report.error(&subject, e, "`ca serve` rewrites crl.pem; is it running?"),
    }
    if report.findings.iter().all(|f| f.subject != subject) {
        report.ok(&subject, format!("{path}: serial {}, valid", served.unwrap_or_default()));
    }
}

/// When the CRL at `path` must be replaced; `None` when there is none.
fn crl_next_update(path: &Path) -> Result<Option<OffsetDateTime>, String> {
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let unreadable = |e: &dyn fmt::Display| format!("{} is no CRL: {e}", path.display());
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| unreadable(&e))?;
    let (_, crl) =
        <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(
            &block.contents,
        )
        .map_err(|e| unreadable(&e))?;
    Ok(crl.next_update().map(|t| t.to_datetime()))
}

/// A known sidecar is ready, serves the serial in its cert dir, and has a
/// clock close to ours.
async fn sidecar(
    s: &KnownSidecar,
    config: &ServeConfig,
    roots: &[CertificateDer<'static>],
    now: OffsetDateTime,
    report: &mut Report,
) {
    let subject = format!("sidecar {}", s.identity);
    let (readiness, date) = match sidecars::readiness(s, roots).await {
        Ok(answer) => answer,
        Err(e) => {
            return report.error(
                subject,
                format!("{}/readyz: {e}", s.admin),
                "is it running, and is its admin port reachable from here?",
            )
        }
    };
    clock(&subject, date, now, report);
    let on_disk = config
        .identities
        .iter()
        .find(|id| id.name.as_str() == s.identity)
        .and_then(|id| CertDir::new(&id.out_dir).read_raw().ok())
        .and_then(|raw| raw.validate(now).ok())
        .map(|set| set.leaf.serial);
    if !readiness.ready {
        report.error(&subject, format!("not ready: {}", readiness.reason), "see its log and `ca status`");
    } else if readiness.degraded {
        report.warn(&subject, format!("degraded: {}", readiness.reason), "see `ca status`");
    }
    match (&readiness.serial, &on_disk) {
        (Some(served), Some(disk)) if served != disk => report.error(
            &subject,
            format!("serves serial {served}, but its cert dir holds {disk}"),
            "it did not reload: check that it mounts the cert dir, and its log for reload errors",
        ),
        _ => {}
    }
    if let Some(e) = &readiness.last_reload_error {
        report.error(&subject, format!("last reload failed: {e}"), "see its log");
    }
    if report.findings.iter().all(|f| f.subject != subject || f.level == Level::Ok) {
        report.ok(&subject, format!("ready, serving serial {}", readiness.serial.unwrap_or_default()));
    }
}

/// Every ACME directory that a public certificate uses answers.
async fn acme_directories(config: &ServeConfig, store: Option<&Arc<dyn Store>>, report: &mut Report) {
    let mut urls: Vec<String> = config.public.iter().map(|p| p.directory()).collect();
    if let Some(store) = store {
        let certs = crate::acme::PublicCerts::new(store.clone()).scan().unwrap_or_default();
        urls.extend(certs.into_iter().flatten().map(|c| c.acme_directory_url));
    }
    urls.sort();
    urls.dedup();
    for url in urls {
        let subject = format!("acme {url}");
        match crate::acme::probe_directory(&config.acme, &url, ANSWER_WITHIN).await {
            Ok(()) => report.ok(subject, "the directory answers"),
            Err(e) => report.error(subject, e, "check the URL, `directory_roots`, and the network to the ACME server"),
        }
    }
}
