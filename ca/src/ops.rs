//! Operator commands over the store: `ca token`, `ca status`, `ca check`,
//! `ca backup` and `ca restore`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use lanyard_sidecar::certdir::CertDir;
use lanyard_sidecar::certinfo::rfc3339;
use lanyard_sidecar::identity::{DnsName, SpiffeId};
use lanyard_sidecar::span::Span;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::authority::Authority;
use crate::issue::{KeySource, LeafRequest};
use crate::keys::KeyType;
use crate::state::ADMIN_NAME;
use crate::state::{write_file, CaState, InitOptions};
use crate::store::{Dump, ScheduleRow, SqliteStore, Store, StoreSpec, DB_FILE};
use crate::token::secret_hash;
use crate::CaError;

/// Lifetime of the admin client certificate `ca init` makes.
const ADMIN_TTL: time::Duration = time::Duration::days(90);

/// `ca init`: creates the root and intermediate in `dir`, then the admin
/// client certificate in `dir/admin`, recorded in `store`. Returns the CA
/// and, with an offline root, the root key PEM that was not stored.
pub fn init_ca(dir: &Path, opts: &InitOptions, store: Arc<dyn Store>) -> Result<(CaState, Option<String>), CaError> {
    let (ca, offline_key) = CaState::init(dir, opts)?;
    let authority = Authority::open_with(dir, store)?;
    let admin = admin_request(None, opts.intermediate_lifetime)?;
    CertDir::new(dir.join("admin")).write(&authority.issue(&admin, "admin")?.pem)?;
    Ok((ca, offline_key))
}

/// An admin client certificate: `spiffe://<td>/lanyard-admin` (the one in
/// `STATE/admin`, renewed by `ca serve`), or `.../lanyard-admin/<operator>`
/// for each further operator or tool (`ca admin issue`). It lives 90 days,
/// or half the intermediate's lifetime when that is shorter.
pub fn admin_request(
    operator: Option<(&DnsName, SpiffeId)>,
    intermediate: time::Duration,
) -> Result<LeafRequest, CaError> {
    let ttl = ADMIN_TTL.min(intermediate / 2).try_into().ok().and_then(Span::new).expect("positive");
    let (name, spiffe) = match operator {
        None => (ADMIN_NAME.parse()?, None),
        Some((operator, id)) => (format!("{ADMIN_NAME}-{operator}").parse()?, Some(id)),
    };
    Ok(LeafRequest {
        name,
        dns: Some(Vec::new()),
        ips: Vec::new(),
        spiffe,
        ttl,
        key: KeySource::Generate(KeyType::EcdsaP256),
    })
}

/// `ca status`, public part: one line per ACME or uploaded certificate with
/// its last error and next attempt. Empty when there are none.
pub fn public_table(certs: &[crate::acme::PublicCert], now: i64) -> String {
    if certs.is_empty() {
        return String::new();
    }
    let mut out =
        String::from("\nPUBLIC      STATUS    EXPIRES               FAILURES  NEXT ATTEMPT  DOMAINS / LAST ERROR\n");
    for c in certs {
        let next = match c.next_attempt {
            i64::MAX => "-".to_owned(),
            t if t <= now => "now".to_owned(),
            t => format!("in {}s", t - now),
        };
        let _ = writeln!(
            out,
            "{:<11} {:<9} {:<21} {:<9} {:<13} {}{}{}",
            c.cert_name,
            c.status,
            c.expires_at.as_deref().unwrap_or("-"),
            c.failures,
            next,
            c.domains.join(","),
            c.last_error.as_deref().map(|e| format!("  error: {e}")).unwrap_or_default(),
            c.held_back.as_deref().map(|h| format!("  holding back: {h}")).unwrap_or_default(),
        );
    }
    out
}

/// Creates a single-use bootstrap token for `identity`, valid for `ttl`.
pub fn new_token(authority: &Authority, identity: &str, ttl: Span) -> Result<String, CaError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG is available");
    let token = lanyard_sidecar::certinfo::hex(&bytes);
    let expires = OffsetDateTime::now_utc() + ttl.get();
    authority.store().add_token(&secret_hash(&token), identity, expires.unix_timestamp())?;
    Ok(token)
}

fn time_of(t: Option<i64>) -> String {
    t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()).map(rfc3339).unwrap_or_else(|| "-".into())
}

fn left(not_after: Option<i64>, now: i64) -> String {
    match not_after {
        None => "-".into(),
        Some(t) if t <= now => "EXPIRED".into(),
        Some(t) => {
            let s = t - now;
            format!("{}d{}h{}m", s / 86_400, s / 3600 % 24, s / 60 % 60)
        }
    }
}

/// Why an identity is in trouble, if it is.
pub fn trouble(row: &ScheduleRow, now: i64) -> Option<String> {
    match row.not_after {
        None => Some(row.last_error.clone().unwrap_or_else(|| "never issued".into())),
        Some(t) if t <= now => Some("certificate expired".into()),
        Some(_) if row.failures > 0 => {
            Some(format!("{} failed renewals: {}", row.failures, row.last_error.clone().unwrap_or_default()))
        }
        Some(_) if row.next_renewal + 60 < now => Some("renewal overdue".into()),
        _ => None,
    }
}

/// `ca status`: one table of every managed identity.
pub fn status_table(rows: &[ScheduleRow], now: i64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<34} {:<21} {:<11} {:<21} {:<21} LAST ERROR",
        "IDENTITY", "SERIAL", "NOT AFTER", "LEFT", "LAST RENEWAL", "NEXT RENEWAL"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<16} {:<34} {:<21} {:<11} {:<21} {:<21} {}",
            r.identity,
            r.serial.as_deref().unwrap_or("-"),
            time_of(r.not_after),
            left(r.not_after, now),
            time_of(r.last_renewal),
            time_of(Some(r.next_renewal)),
            r.last_error.as_deref().unwrap_or("-"),
        );
        let _ = writeln!(out, "{:<16} SANs: {}", "", r.sans.as_deref().unwrap_or("-"));
    }
    out
}

/// A backup: every state file and a consistent copy of the store: the
/// SQLite database itself, or every record of a shared store.
#[derive(Serialize, Deserialize)]
struct Backup {
    format: String,
    files: BTreeMap<String, String>,
    /// The SQLite database (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<String>,
    /// Every record of a shared store (key material in the clear, like
    /// the CA keys beside it: the file is 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    records: Option<Dump>,
}

const BACKUP_FORMAT: &str = "lanyard-backup-1";
/// The state files a backup must hold.
const STATE_FILES: [&str; 4] = ["ca.json", "root.pem", "intermediate.pem", "intermediate-key.pem"];
/// State files a backup holds when they exist.
const OPTIONAL_STATE_FILES: [&str; 10] = [
    "root-key.pem",
    "intermediate-previous.pem",
    "intermediate-previous-key.pem",
    crate::state::ROTATION_FILE,
    "root-next.pem",
    "root-next-key.pem",
    "intermediate-next.pem",
    "intermediate-next-key.pem",
    "root-previous.pem",
    "store.key",
];

/// `ca backup FILE`: keys, certificates and the store, taken consistently
/// (SQLite's online backup, or every record of a shared store) while the
/// CA runs. Written with mode 0600.
pub fn backup(state: &Path, file: &Path, store: &dyn Store) -> Result<(), CaError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = BTreeMap::new();
    for name in STATE_FILES.iter().chain(&OPTIONAL_STATE_FILES) {
        match std::fs::read(state.join(name)) {
            Ok(bytes) => {
                files.insert((*name).to_owned(), b64.encode(bytes));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && OPTIONAL_STATE_FILES.contains(name) => {}
            Err(source) => return Err(CaError::ReadState { path: state.join(name), source }),
        }
    }
    let (db, records) = if store.backend() == "sqlite" {
        let tmp = tempfile_in(state)?;
        SqliteStore::open(state)?.backup_to(&tmp)?;
        let db = std::fs::read(&tmp).map_err(|source| CaError::ReadState { path: tmp.clone(), source });
        let _ = std::fs::remove_file(&tmp);
        (Some(b64.encode(db?)), None)
    } else {
        (None, Some(store.export()?))
    };
    let doc = Backup { format: BACKUP_FORMAT.into(), files, store: db, records };
    write_file(file, &serde_json::to_string(&doc).expect("serializes"), 0o600)
}

/// `ca store copy`: every record of `from` into the empty store `to`,
/// checked by counting and hashing both afterwards. Returns the summary.
pub fn copy_store(from: &dyn Store, to: &dyn Store) -> Result<String, CaError> {
    import_checked(&from.export()?, to)
}

/// Writes `dump` into the empty store `to` and checks what it reads back.
fn import_checked(dump: &Dump, to: &dyn Store) -> Result<String, CaError> {
    let existing = to.export()?;
    if !existing.certificates.is_empty() || !existing.docs.is_empty() || !existing.schedules.is_empty() {
        return Err(CaError::Config {
            origin: format!("the {} store", to.backend()),
            what: format!("is not empty ({}); copy into an empty one", existing.summary()),
        });
    }
    to.import(dump)?;
    let (want, got) = (dump.summary(), to.export()?.summary());
    if want != got {
        return Err(CaError::Config {
            origin: format!("the {} store", to.backend()),
            what: format!("the copy differs: wrote {want}, read back {got}"),
        });
    }
    Ok(got)
}

fn tempfile_in(dir: &Path) -> Result<std::path::PathBuf, CaError> {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).expect("the system RNG is available");
    Ok(dir.join(format!(".backup-{}.db", lanyard_sidecar::certinfo::hex(&b))))
}

/// `ca restore FILE`: recreates the state directory from a backup, and the
/// records of a shared store's backup in the `target` store (which must be
/// empty). Refuses to replace an existing CA without `force`.
pub fn restore(
    state: &Path,
    file: &Path,
    force: bool,
    target: &StoreSpec,
    store_key: Option<&Path>,
) -> Result<(), CaError> {
    if let Some(records) = restore_files(state, file, force)? {
        let store = crate::store::open(target, state, store_key)?;
        import_checked(&records, store.as_ref())?;
    }
    CaState::load(state).map(|_| ())
}

/// Writes a backup's files into `state`; returns a shared store's records.
fn restore_files(state: &Path, file: &Path, force: bool) -> Result<Option<Dump>, CaError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = std::fs::read_to_string(file).map_err(|source| CaError::ReadState { path: file.to_owned(), source })?;
    let corrupt = |what: String| CaError::CorruptState { path: file.to_owned(), what };
    let doc: Backup = serde_json::from_str(&text).map_err(|e| corrupt(format!("not a Lanyard backup ({e})")))?;
    if doc.format != BACKUP_FORMAT {
        return Err(corrupt(format!("unknown backup format {:?}", doc.format)));
    }
    if state.join("ca.json").exists() && !force {
        return Err(CaError::AlreadyExists(state.to_owned()));
    }
    let decode = |name: &str, v: &str| b64.decode(v).map_err(|e| corrupt(format!("{name}: {e}")));
    let mut decoded = Vec::new();
    for (name, value) in &doc.files {
        if !STATE_FILES.contains(&name.as_str()) && !OPTIONAL_STATE_FILES.contains(&name.as_str()) {
            return Err(corrupt(format!("unexpected file {name:?}")));
        }
        decoded.push((name.clone(), decode(name, value)?));
    }
    let db = doc.store.as_deref().map(|db| decode("store", db)).transpose()?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state)
            .map_err(|source| CaError::WriteState { path: state.to_owned(), source })?;
    }
    if let Some(db) = db {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(state.join(format!("{DB_FILE}{suffix}")));
        }
        let db_path = state.join(DB_FILE);
        std::fs::write(&db_path, db).map_err(|source| CaError::WriteState { path: db_path.clone(), source })?;
    }
    // ca.json last: it marks the state as complete.
    decoded.sort_by_key(|(name, _)| name == "ca.json");
    for (name, bytes) in decoded {
        let mode = if name.ends_with("key.pem") || name.ends_with(".key") { 0o600 } else { 0o644 };
        let text = String::from_utf8(bytes).map_err(|_| corrupt(format!("{name} is not text")))?;
        write_file(&state.join(&name), &text, mode)?;
    }
    Ok(doc.records)
}

/// Seeds an empty shared store from a backup (`ca stack` writes one as the
/// `lanyard-ca-seed` secret): the CA's files into `state`, the records into
/// `store`.
pub fn seed(state: &Path, file: &Path, store: &dyn Store) -> Result<(), CaError> {
    if let Some(records) = restore_files(state, file, true)? {
        store.import(&records)?;
    }
    CaState::load(state).map(|_| ())
}

/// The secrets of a stack from `ca inject --target swarm`, written into
/// `dir` (mode 0700, files 0600): the store key, the seed (the CA in
/// `state`, made for `trust_domain` when missing, with the credentials'
/// records), and one enrolment credential per service of `enrolled`.
/// Returns what was done, for the operator.
pub fn swarm_secrets(
    state: &Path,
    trust_domain: &lanyard_sidecar::identity::TrustDomain,
    enrolled: &[String],
    dir: &Path,
) -> Result<Vec<String>, CaError> {
    let mut said = Vec::new();
    let store = crate::store::open(&StoreSpec::Sqlite, state, None)?;
    if !state.join(crate::state::META_FILE).exists() {
        let opts = InitOptions::new(trust_domain.clone());
        init_ca(state, &opts, store.clone())?;
        said.push(format!("created a CA for {trust_domain} in {}", state.display()));
    }
    let ca = CaState::load(state)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::WriteState { path: dir.to_owned(), source })?;
    }
    crate::store::StoreKey::load_or_create(&state.join("store.key"))?;
    let key = std::fs::read_to_string(state.join("store.key"))
        .map_err(|source| CaError::ReadState { path: state.join("store.key"), source })?;
    write_file(&dir.join("store.key"), &key, 0o600)?;
    let ca_url = format!("https://{}:8443", lanyard_compose::inject::CA_SERVICE);
    let mut docs = Vec::new();
    for name in enrolled {
        let identity: DnsName = name.parse()?;
        let (record, credential) =
            crate::enrol::create(store.as_ref(), &identity, time::Duration::days(365), &ca_url, &ca.root().sha256)?;
        write_file(&dir.join(format!("enrol-{name}.toml")), &credential.to_toml(), 0o600)?;
        said.push(format!(
            "{name}: enrolment credential {} (revoke with `ca enrol --revoke {} --state {}` and the store's URL)",
            record.id,
            record.id,
            state.display()
        ));
    }
    for d in store.all_docs()?.into_iter().filter(|d| d.kind == "enrolment") {
        docs.push(d);
    }
    let seed = dir.join("ca-seed.json");
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = BTreeMap::new();
    for name in STATE_FILES.iter().chain(&OPTIONAL_STATE_FILES).filter(|n| **n != "store.key") {
        if let Ok(bytes) = std::fs::read(state.join(name)) {
            files.insert((*name).to_owned(), b64.encode(bytes));
        }
    }
    let doc =
        Backup { format: BACKUP_FORMAT.into(), files, store: None, records: Some(Dump { docs, ..Dump::default() }) };
    write_file(&seed, &serde_json::to_string(&doc).expect("serializes"), 0o600)?;
    said.push(format!("secrets in {}: deploy with `docker stack deploy -c STACK NAME`", dir.display()));
    Ok(said)
}

/// Adds the records of the seed backup `file` that `store` lacks (the
/// enrolment credentials of a re-run `ca inject --target swarm`).
pub fn merge_seed_records(file: &Path, store: &dyn Store) -> Result<usize, CaError> {
    let text = std::fs::read_to_string(file).map_err(|source| CaError::ReadState { path: file.to_owned(), source })?;
    let doc: Backup = serde_json::from_str(&text)
        .map_err(|e| CaError::CorruptState { path: file.to_owned(), what: format!("not a Lanyard backup ({e})") })?;
    let mut added = 0;
    for d in doc.records.map(|r| r.docs).unwrap_or_default() {
        if store.doc(&d.kind, &d.key)?.is_none() {
            store.put_doc(&d.kind, &d.key, &d.json)?;
            added += 1;
        }
    }
    Ok(added)
}

/// `ca prepare-volumes`: gives each of `dirs`, and everything in them, to
/// `uid:gid` (a symlink itself, not its target). Returns how many entries
/// changed owner; a path that is missing is an error, so a typo shows.
pub fn own_tree(dirs: &[std::path::PathBuf], uid: u32, gid: u32) -> Result<usize, CaError> {
    use std::os::unix::fs::MetadataExt;
    fn walk(path: &Path, uid: u32, gid: u32, changed: &mut usize) -> Result<(), CaError> {
        let meta =
            std::fs::symlink_metadata(path).map_err(|source| CaError::ReadState { path: path.to_owned(), source })?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .map_err(|source| CaError::WriteState { path: path.to_owned(), source })?;
            *changed += 1;
        }
        if meta.is_dir() {
            let entries =
                std::fs::read_dir(path).map_err(|source| CaError::ReadState { path: path.to_owned(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| CaError::ReadState { path: path.to_owned(), source })?;
                walk(&entry.path(), uid, gid, changed)?;
            }
        }
        Ok(())
    }
    let mut changed = 0;
    for dir in dirs {
        walk(dir, uid, gid, &mut changed)?;
    }
    Ok(changed)
}
