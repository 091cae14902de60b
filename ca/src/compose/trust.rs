//! `ca trust`: installs the fleet's root in the system bundle and, when
//! `certutil` is there, in the NSS databases browsers read (as `caddy
//! trust` does); `--remove` takes it out again.

use std::path::{Path, PathBuf};
use std::process::Command;

use lanyard_sidecar::certinfo::CertInfo;

/// Why the root could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The root file is missing or not one PEM certificate.
    #[error("{path}: {message}")]
    Root {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A trust store could not be changed.
    #[error("{store}: {message}")]
    Store {
        /// The store (a directory or NSS database).
        store: String,
        /// What failed and what to do.
        message: String,
    },
}

/// Where the system bundle takes extra roots, and the command that rebuilds it.
const SYSTEM_STORES: &[(&str, &str)] = &[
    ("/usr/local/share/ca-certificates", "update-ca-certificates"),
    ("/etc/pki/ca-trust/source/anchors", "update-ca-trust"),
];

/// The root to trust, with the names it is installed under.
pub struct Root {
    pem: String,
    /// The file name in the system store and the NSS nickname.
    pub nickname: String,
}

impl Root {
    /// Reads one root certificate from `path`.
    pub fn read(path: &Path) -> Result<Self, TrustError> {
        let err = |message: String| TrustError::Root { path: path.to_owned(), message };
        let pem = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| err(format!("no PEM certificate: {e}")))?;
        let info = CertInfo::from_der(&der).map_err(|e| err(format!("not a certificate: {e}")))?;
        let short: String = info.sha256.chars().filter(char::is_ascii_hexdigit).take(12).collect();
        Ok(Self { pem, nickname: format!("lanyard-root-{}", short.to_ascii_lowercase()) })
    }
}

/// What one store did, for the user.
pub type Done = Vec<String>;

/// Installs `root` (or removes it, with `remove`) in the system bundle and every NSS database found.
pub fn apply(root: &Root, remove: bool, home: Option<&Path>) -> Result<Done, TrustError> {
    let mut done = Vec::new();
    let (dir, update) = SYSTEM_STORES.iter().find(|(d, _)| Path::new(d).is_dir()).copied().ok_or_else(|| {
        TrustError::Store {
            store: "system bundle".into(),
            message: "neither /usr/local/share/ca-certificates nor /etc/pki/ca-trust/source/anchors exists; install the ca-certificates package".into(),
        }
    })?;
    let file = Path::new(dir).join(format!("{}.crt", root.nickname));
    let store_err = |message: String| TrustError::Store { store: dir.to_owned(), message };
    if remove {
        match std::fs::remove_file(&file) {
            Ok(()) => done.push(format!("removed {}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                done.push(format!("{} was not installed", file.display()))
            }
            Err(e) => return Err(store_err(format!("cannot remove {}: {e} (run as root)", file.display()))),
        }
    } else {
        std::fs::write(&file, &root.pem)
            .map_err(|e| store_err(format!("cannot write {}: {e} (run as root)", file.display())))?;
        done.push(format!("installed {}", file.display()));
    }
    let mut rebuild = Command::new(update);
    if remove && update == "update-ca-certificates" {
        rebuild.arg("--fresh");
    }
    run(&mut rebuild).map_err(store_err)?;
    done.push(format!("ran {update}"));

    if which("certutil").is_none() {
        done.push("certutil not found: browsers' NSS databases left alone (install libnss3-tools)".into());
        return Ok(done);
    }
    for db in nss_databases(home) {
        let spec = format!("sql:{}", db.display());
        let nss_err = |message: String| TrustError::Store { store: db.display().to_string(), message };
        if remove {
            let out = Command::new("certutil").args(["-D", "-d", &spec, "-n", &root.nickname]).output();
            match out {
                Ok(o) if o.status.success() => done.push(format!("removed from {}", db.display())),
                _ => done.push(format!("not in {}", db.display())),
            }
            continue;
        }
        if !db.join("cert9.db").exists() {
            std::fs::create_dir_all(&db).map_err(|e| nss_err(format!("cannot create: {e}")))?;
            run(Command::new("certutil").args(["-N", "--empty-password", "-d", &spec])).map_err(nss_err)?;
        }
        let staged = std::env::temp_dir().join(format!("{}-{}.pem", root.nickname, std::process::id()));
        std::fs::write(&staged, &root.pem).map_err(|e| nss_err(format!("cannot stage the root: {e}")))?;
        let add = Command::new("certutil")
            .args(["-A", "-d", &spec, "-t", "C,,", "-n", &root.nickname, "-i"])
            .arg(&staged)
            .output();
        let _ = std::fs::remove_file(&staged);
        match add {
            Ok(o) if o.status.success() => done.push(format!("installed in {}", db.display())),
            Ok(o) => return Err(nss_err(String::from_utf8_lossy(&o.stderr).trim().to_owned())),
            Err(e) => return Err(nss_err(e.to_string())),
        }
    }
    Ok(done)
}

/// The shared NSS database (Chromium's) and every Firefox profile under `home`.
fn nss_databases(home: Option<&Path>) -> Vec<PathBuf> {
    let Some(home) = home else { return Vec::new() };
    let mut dbs = vec![home.join(".pki/nssdb")];
    for profiles in [home.join(".mozilla/firefox"), home.join("snap/firefox/common/.mozilla/firefox")] {
        if let Ok(entries) = std::fs::read_dir(profiles) {
            dbs.extend(entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.join("cert9.db").exists()));
        }
    }
    dbs
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| format!("cannot run {name}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
