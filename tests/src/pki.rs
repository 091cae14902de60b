//! PKI fixtures: a CA in a temporary state directory, and clients that check what it issued.

use super::*;

/// A CA in a temporary state directory, with helpers to issue into cert dirs.
pub struct Pki {
    /// Holds every file of the fixture.
    pub tmp: tempfile::TempDir,
}

impl Pki {
    /// Creates a CA with `extra` init arguments.
    pub fn new(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = Self { tmp };
        run_ok(ca().arg("init").arg("--state").arg(pki.state()).args(extra));
        pki
    }

    /// The CA state directory.
    pub fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    /// A path inside the fixture.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `ca issue NAME --out <tmp>/NAME <extra>`; returns the cert dir.
    pub fn issue(&self, name: &str, extra: &[&str]) -> PathBuf {
        let out = self.path(name);
        self.issue_into(name, &out, extra);
        out
    }

    /// `ca issue NAME --out OUT <extra>`.
    pub fn issue_into(&self, name: &str, out: &Path, extra: &[&str]) {
        run_ok(ca().arg("issue").arg(name).arg("--state").arg(self.state()).arg("--out").arg(out).args(extra));
    }

    /// A `ca issue NAME` command against this CA, without `--out`.
    pub fn issue_cmd(&self, name: &str) -> Command {
        let mut cmd = ca();
        cmd.arg("issue").arg(name).arg("--state").arg(self.state());
        cmd
    }
}

/// An OpenSSL 3.0 handshake with classical key exchange only (X25519 and
/// P-256, no ML-KEM) to `addr`, with `extra` s_client arguments; its output.
pub fn openssl_classical(addr: &str, extra: &[&std::ffi::OsStr]) -> Output {
    run(Command::new(peer("openssl"))
        .args(["s_client", "-connect", addr, "-groups", "X25519:P-256", "-brief"])
        .args(extra)
        .stdin(Stdio::null()))
}

/// GETs `url` with `sidecar health` (rustls, post-quantum hybrid first),
/// trusting `cert_dir`'s bundle; the body, or the probe's error.
pub fn sidecar_get(url: &str, cert_dir: &Path) -> String {
    let out = run(Command::new(bin("sidecar")).args(["health", "--url", url, "--cert-dir"]).arg(cert_dir));
    if out.status.success() {
        text(&out.stdout)
    } else {
        format!("sidecar health --url {url} failed: {}", text(&out.stderr))
    }
}
