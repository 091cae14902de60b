//! A real redis-server for the shared-store tests.

use super::*;

/// A real redis-server (Debian's) on its own port and directory, with AOF
/// persistence (`appendfsync always`), killed on drop.
pub struct RedisServer {
    guard: Option<ChildGuard>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    /// TLS only, with the certificate in this cert dir.
    tls: Option<PathBuf>,
}

impl RedisServer {
    /// Starts one keeping its data in `dir`.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("redis dir");
        let mut server = Self { guard: None, port: free_port(), dir: dir.to_owned(), tls: None };
        server.restart();
        server
    }

    /// Starts one that speaks TLS only (`rediss://`), serving the
    /// certificate in `cert_dir`.
    pub fn start_tls(dir: &Path, cert_dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("redis dir");
        let mut server = Self { guard: None, port: free_port(), dir: dir.to_owned(), tls: Some(cert_dir.to_owned()) };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://localhost:PORT` with TLS.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut g) = self.guard.take() {
            let _ = g.child().kill();
            let _ = g.child().wait();
        }
    }

    /// Starts it again on the same port and data (it replays its AOF).
    pub fn restart(&mut self) {
        self.kill();
        let log = self.dir.join(format!("redis-{}.log", free_port()));
        let mut cmd = Command::new(peer("redis-server"));
        let port = self.port.to_string();
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(certs) => cmd
                .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no", "--tls-cert-file"])
                .arg(certs.join("cert.pem"))
                .arg("--tls-key-file")
                .arg(certs.join("key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("ca.pem")),
        };
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(&self.dir);
        let mut guard = ChildGuard::spawn(cmd, &log);
        guard.wait_for_port(SocketAddr::from(([127, 0, 0, 1], self.port)), &log);
        if self.tls.is_none() {
            poll_until(Duration::from_secs(10), Duration::from_millis(20), "redis-server loads its data", || {
                !self.cli_on(&["PING"]).contains("LOADING")
            });
        }
        self.guard = Some(guard);
    }

    fn cli_on(&self, args: &[&str]) -> String {
        text(&run(Command::new(peer("redis-cli")).args(["-p", &self.port.to_string(), "--raw"]).args(args)).stdout)
    }

    /// `redis-cli --raw ARGS`; its output (panics when redis-cli is missing).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = run_ok(Command::new(peer("redis-cli")).args(["-p", &self.port.to_string(), "--raw"]).args(args));
        text(&out.stdout)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
