//! Lanyard's own servers under test: `sidecar run` and `ca serve`, and curl against the CA API.

use super::*;

/// A running `sidecar run`, killed on drop, with its admin endpoint at hand.
pub struct Sidecar {
    guard: ChildGuard,
    /// Its log file.
    pub log: PathBuf,
    /// The admin endpoint.
    pub admin: SocketAddr,
}

impl Sidecar {
    /// Starts `sidecar run --admin <free port> <args>`, logging to `log`.
    pub fn start(args: &[&str], log: PathBuf) -> Self {
        Self::start_at(format!("127.0.0.1:{}", free_port()).parse().expect("addr"), args, log)
    }

    /// Starts `sidecar run --admin ADMIN <args>`, logging to `log`.
    pub fn start_at(admin: SocketAddr, args: &[&str], log: PathBuf) -> Self {
        let mut cmd = Command::new(bin("sidecar"));
        cmd.arg("run").arg("--admin").arg(admin.to_string()).args(args).env("RUST_LOG", "info");
        let mut guard = ChildGuard::spawn(cmd, &log);
        guard.wait_for_port(admin, &log);
        Self { guard, log, admin }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// The child handle.
    pub fn child(&mut self) -> &mut Child {
        self.guard.child()
    }

    /// Fetches an admin path with curl (`-k`: the admin cert is checked
    /// elsewhere); the status and body, or curl's error when nothing answered.
    pub fn try_get(&self, path: &str) -> Result<(u16, String), String> {
        let out = run(Command::new(peer("curl"))
            .args(["-sSk", "-w", "\n%{http_code}"])
            .arg(format!("https://{}{path}", self.admin)));
        let body = text(&out.stdout);
        match body.rsplit_once('\n').map(|(b, c)| (b, c.trim().parse::<u16>())) {
            Some((body, Ok(code))) if code != 0 => Ok((code, body.to_owned())),
            _ => Err(format!("nothing answered https://{}{path}: {}", self.admin, text(&out.stderr).trim())),
        }
    }

    /// [`Sidecar::try_get`] for an endpoint that must answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The value of one metric sample line (`name{labels}`). A sample of a
    /// family the sidecar exposes but has not counted yet is 0; a family it
    /// does not expose at all (a renamed metric) fails the test.
    pub fn metric(&self, sample: &str) -> f64 {
        let (code, body) = self.get("/metrics");
        assert_eq!(code, 200, "/metrics answered {code}: {body}");
        let value = body
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap_or_else(|e| panic!("{sample} has a non-numeric value {v:?}: {e}")));
        let family = sample.split('{').next().unwrap_or(sample);
        match value {
            Some(v) => v,
            None if body.contains(&format!("# TYPE {family} ")) => 0.0,
            None => panic!("the sidecar exposes no metric {family} (renamed?):\n{body}"),
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A running `ca serve` on free loopback ports, killed on drop.
pub struct CaServer {
    guard: ChildGuard,
    /// Its log file.
    pub log: PathBuf,
    /// The HTTPS API port.
    pub https_port: u16,
    /// The plain HTTP port.
    pub http_port: u16,
    /// The config file.
    pub config: PathBuf,
}

impl CaServer {
    /// Writes a config with `identities` (TOML `[[identity]]` tables) for
    /// `pki`'s state and starts `ca serve`, waiting for `/health`.
    pub fn start(pki: &Pki, identities: &str) -> Self {
        let (https_port, http_port) = (free_port(), free_port());
        let config = pki.path("lanyard.toml");
        std::fs::write(
            &config,
            format!(
                "state = {:?}\nhttps_listen = \"127.0.0.1:{https_port}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n{identities}",
                pki.state()
            ),
        )
        .expect("write config");
        Self::start_with(pki, config, https_port, http_port)
    }

    /// Starts `ca serve` with an existing config, on the given ports
    /// (through the `HTTPS_PORT` and `HTTP_PORT` overrides).
    pub fn start_with(pki: &Pki, config: PathBuf, https_port: u16, http_port: u16) -> Self {
        Self::start_with_args(pki, config, https_port, http_port, &[])
    }

    /// [`CaServer::start_with`], with `args` after `ca serve`.
    pub fn start_with_args(pki: &Pki, config: PathBuf, https_port: u16, http_port: u16, args: &[&str]) -> Self {
        let log = pki.path(&format!("ca-serve-{https_port}.log"));
        let mut cmd = ca();
        cmd.arg("serve")
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("HTTPS_PORT", https_port.to_string())
            .env("HTTP_PORT", http_port.to_string());
        let mut guard = ChildGuard::spawn(cmd, &log);
        guard.wait_for_port(SocketAddr::from(([127, 0, 0, 1], https_port)), &log);
        Self { guard, log, https_port, http_port, config }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// The child handle.
    pub fn child(&mut self) -> &mut Child {
        self.guard.child()
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https_port)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A curl call against the CA API trusting `pki`'s root; `client` is a cert
/// dir to authenticate with. Returns (status, body).
pub fn curl_api(pki: &Pki, method: &str, url: &str, body: Option<&str>, client: Option<&Path>) -> (u16, String) {
    let mut cmd = Command::new(peer("curl"));
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "-X", method, "--cacert"])
        .arg(pki.state().join("root.pem"));
    if let Some(dir) = client {
        cmd.arg("--cert").arg(dir.join("cert.pem")).arg("--key").arg(dir.join("key.pem"));
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", "@-"]);
        cmd.stdin(Stdio::piped());
        let mut child = cmd.arg(url).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("curl");
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(b.as_bytes()).expect("write body");
        let out = child.wait_with_output().expect("curl output");
        return split_status(&out);
    }
    split_status(&run(cmd.arg(url)))
}

/// Splits curl's `-w "\n%{http_code}"` output; on a transport failure (code
/// 0) the body is curl's error, for the assertion message.
fn split_status(out: &Output) -> (u16, String) {
    let stdout = text(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    let code = code.trim().parse().unwrap_or(0);
    if code == 0 {
        return (0, format!("curl failed ({}): {}", out.status, text(&out.stderr)));
    }
    (code, body.to_owned())
}
