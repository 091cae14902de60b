//! Helpers for Lanyard's end-to-end tests: locate the built binaries, run
//! them loudly, build PKI fixtures, and tear child processes down on drop.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

/// Path of a binary built from this workspace (`ca`, `sidecar`).
///
/// Panics with a clear message when it was not built: `scripts/test` runs
/// `cargo build --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// Path of a tool installed in the project's Python venv (`.venv/bin`).
pub fn venv_tool(name: &str) -> PathBuf {
    let path = workspace_root().join(".venv/bin").join(name);
    assert!(path.exists(), "{} is missing: run scripts/test, which installs the venv", path.display());
    path
}

/// Asserts that an external peer program is on PATH and returns its name.
pub fn peer(name: &str) -> &str {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false);
    assert!(found, "required peer `{name}` is not installed: run scripts/test, which installs it");
    name
}

/// Runs a command and returns its output, without judging it.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Runs a command that must succeed; dumps its output otherwise.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Runs a command that must fail; returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

/// Lossy UTF-8.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `ca` command.
pub fn ca() -> Command {
    Command::new(bin("ca"))
}

/// A child process killed when dropped.
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr going to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Self {
        let out = std::fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log handle");
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self { child, what }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The inner child.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits until `addr` accepts TCP, failing with the log if the process exits
    /// or 20 s pass.
    pub fn wait_for_port(&mut self, addr: SocketAddr, log: &Path) {
        wait_until(Duration::from_secs(20), &format!("{} to listen on {addr}", self.what), || {
            self.assert_running(log);
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        });
    }

    /// Asserts the process is still running.
    pub fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early with {status}; log:\n{}",
                self.what,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port on loopback that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind port 0").port()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    poll_until(timeout, Duration::from_millis(20), what, cond);
}

/// Polls `cond` every `every` until it holds or `timeout` passes.
pub fn poll_until(timeout: Duration, every: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    poll_until_ok(timeout, every, what, || if cond() { Ok(()) } else { Err("not yet".into()) });
}

/// Polls `check` every `every` until it returns `Ok`, or panics after
/// `timeout` with what `what` was waiting for and the last `Err` seen.
pub fn poll_until_ok(timeout: Duration, every: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(last) => {
                assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}; last: {last}")
            }
        }
        std::thread::sleep(every);
    }
}

/// A `docker` command; fails loudly when no engine answers.
pub fn docker() -> Command {
    Command::new(peer("docker"))
}

/// Asserts that a Docker engine answers (`scripts/test` starts dockerd).
pub fn require_dockerd() {
    let out = run(docker().arg("info"));
    assert!(out.status.success(), "dockerd is not running (scripts/test starts it): {}", text(&out.stderr));
}

/// A container removed on drop.
pub struct Container(pub String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker().args(["rm", "-f", &self.0]).output();
    }
}

/// Waits until something accepts TCP on `addr`.
pub fn wait_for_port(addr: SocketAddr) {
    wait_until(Duration::from_secs(15), &format!("a listener on {addr}"), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
}

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

/// Waits until the log file at `path` contains `needle`.
pub fn wait_for_log(path: &Path, needle: &str) {
    wait_until(Duration::from_secs(15), &format!("{needle:?} in {}", path.display()), || {
        std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
    });
}

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
        let log = pki.path(&format!("ca-serve-{https_port}.log"));
        let mut cmd = ca();
        cmd.arg("serve")
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

/// A line-echo TCP server on background threads (a stand-in app); returns its address.
pub fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let local = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let Ok(read_half) = conn.try_clone() else { return };
                let mut reader = std::io::BufReader::new(read_half);
                let mut writer = conn;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if writer.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    local
}

/// A tiny HTTP server answering 200 "hello" to every request (the app).
pub fn http_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("loopback");
    let local = listener.local_addr().expect("loopback");
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().expect("loopback"));
                let mut writer = conn;
                loop {
                    let mut line = String::new();
                    let (mut saw_request, mut close) = (false, false);
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        saw_request = true;
                        close |= line.eq_ignore_ascii_case("connection: close\r\n");
                        if line == "\r\n" {
                            break;
                        }
                        line.clear();
                    }
                    if !saw_request {
                        return;
                    }
                    let ok = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhello\n").is_ok();
                    if !ok || close {
                        return;
                    }
                }
            });
        }
    });
    local
}

/// A port on 127.0.0.1 free for both UDP and TCP at the time of asking.
pub fn free_udp_and_tcp_port() -> u16 {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP port 0");
        let port = udp.local_addr().expect("UDP local address").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port on 127.0.0.1 was free for both UDP and TCP in 50 tries");
}

/// Whether a DNS server answers an A query on UDP 127.0.0.1:`port` within 3 s.
fn answers_dns(port: u16) -> bool {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP port 0");
    socket.connect(("127.0.0.1", port)).expect("connect UDP");
    socket.set_read_timeout(Some(Duration::from_millis(300))).expect("UDP read timeout");
    // ID 0x4c59, recursion desired, one question: probe.test. A IN.
    let query = b"\x4c\x59\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05probe\x04test\x00\x00\x01\x00\x01";
    let mut answer = [0u8; 512];
    (0..10).any(|_| {
        let _ = socket.send(query);
        matches!(socket.recv(&mut answer), Ok(n) if n >= 12 && answer[..2] == query[..2])
    })
}

/// Starts pebble-challtestsrv in `work`; returns (DNS port, management port,
/// guard). A DNS port taken meanwhile by someone else is not fatal to
/// challtestsrv (it logs and serves on without DNS, so Pebble would ask the
/// port's holder), so that case is detected and retried on other ports.
fn start_challtestsrv(work: &Path) -> (u16, u16, ChildGuard) {
    for attempt in 1..=5 {
        let (dns, dns_mgmt) = (free_udp_and_tcp_port(), free_port());
        let dns_log = work.join(format!("challtestsrv-{attempt}.log"));
        let mut cts = Command::new(peer("pebble-challtestsrv"));
        cts.args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .arg("-dns01")
            .arg(format!("127.0.0.1:{dns}"))
            .arg("-management")
            .arg(format!("127.0.0.1:{dns_mgmt}"));
        let mut guard = ChildGuard::spawn(cts, &dns_log);
        guard.wait_for_port(SocketAddr::from(([127, 0, 0, 1], dns_mgmt)), &dns_log);
        let answers = answers_dns(dns);
        let log = std::fs::read_to_string(&dns_log).unwrap_or_default();
        if answers && !log.contains("address already in use") {
            return (dns, dns_mgmt, guard);
        }
        eprintln!("challtestsrv could not bind DNS port {dns} (attempt {attempt}), trying another");
    }
    panic!("pebble-challtestsrv could not bind a DNS port in 5 attempts; see {}", work.display());
}

/// Pebble plus pebble-challtestsrv as its DNS (every name -> 127.0.0.1),
/// on free ports, killed on drop.
pub struct Pebble {
    server: Option<ChildGuard>,
    _dns: ChildGuard,
    /// One Pebble at a time in this process: concurrent ones shared ports
    /// (the TCP probe of `free_port` says nothing of the mock DNS's UDP
    /// port) and so each other's DNS answers.
    _alone: std::sync::MutexGuard<'static, ()>,
    work: PathBuf,
    listen: String,
    acme: u16,
    mgmt: u16,
    dns_mgmt: u16,
    http_port: u16,
    tls_port: u16,
    validity: u64,
    env: Vec<(String, String)>,
    resolver: u16,
    /// External account binding: (key ID, base64url HMAC key), when required.
    eab: Option<(String, String)>,
}

impl Pebble {
    /// Starts Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on
    /// `tls_port`, issuing certificates valid for `validity` seconds.
    pub fn start(work: &Path, http_port: u16, tls_port: u16, validity: u64, env: &[(&str, &str)]) -> Self {
        Self::start_at(work, "127.0.0.1", http_port, tls_port, validity, env)
    }

    /// The same, with the ACME endpoint on `listen` (an address containers
    /// reach, such as the Docker bridge gateway) under the name
    /// `host.docker.internal` as well as `localhost`.
    pub fn start_at(
        work: &Path,
        listen: &str,
        http_port: u16,
        tls_port: u16,
        validity: u64,
        env: &[(&str, &str)],
    ) -> Self {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let work = work.join(format!("pebble-{}", free_port()));
        std::fs::create_dir_all(&work).expect("pebble dir");
        // Debian's package ships no test certificates: make a CA and a localhost cert.
        let openssl = |args: &str| run_ok(Command::new(peer("openssl")).current_dir(&work).args(args.split(' ')));
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(&format!(
            "req -x509 {new_key} -keyout ca.key -out ca.pem -days 30 -subj /CN=pebble-test-ca \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
        openssl(&format!("req {new_key} -keyout key.pem -out srv.csr -subj /CN=localhost"));
        std::fs::write(
            work.join("ext.cnf"),
            format!("subjectAltName=DNS:localhost,DNS:host.docker.internal,IP:127.0.0.1,IP:{listen}\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write ext.cnf");
        openssl(
            "x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -out cert.pem -extfile ext.cnf",
        );
        let (dns, dns_mgmt, dns_guard) = start_challtestsrv(&work);
        let mut p = Self {
            server: None,
            _dns: dns_guard,
            _alone: alone,
            work,
            listen: listen.to_owned(),
            acme: free_port(),
            mgmt: free_port(),
            dns_mgmt,
            http_port,
            tls_port,
            validity,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            resolver: dns,
            eab: None,
        };
        p.restart();
        p
    }

    /// (Re)starts the ACME server on the same ports; it forgets accounts and
    /// makes a new root, as a real outage would.
    pub fn restart(&mut self) {
        self.server = None;
        let config = format!(
            r#"{{"pebble": {{"listenAddress": "{}:{}", "managementListenAddress": "127.0.0.1:{}", "certificate": {:?}, "privateKey": {:?}, "httpPort": {}, "tlsPort": {}, "ocspResponderURL": "http://127.0.0.1:4002", "certificateValidityPeriod": {}, {}}}}}"#,
            self.listen,
            self.acme,
            self.mgmt,
            self.work.join("cert.pem"),
            self.work.join("key.pem"),
            self.http_port,
            self.tls_port,
            self.validity,
            match &self.eab {
                Some((kid, key)) =>
                    format!(r#""externalAccountBindingRequired": true, "externalAccountMACKeys": {{"{kid}": "{key}"}}"#),
                None => r#""externalAccountBindingRequired": false"#.to_owned(),
            }
        );
        let path = self.work.join("pebble.json");
        std::fs::write(&path, config).expect("write pebble.json");
        let log = self.work.join(format!("pebble-{}.log", free_port()));
        let mut cmd = Command::new(peer("pebble"));
        cmd.arg("-config")
            .arg(&path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.resolver))
            .arg("-strict=false");
        cmd.env("PEBBLE_VA_NOSLEEP", "1").envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut guard = ChildGuard::spawn(cmd, &log);
        let addr = format!("{}:{}", self.listen, self.acme).parse().expect("listen address");
        guard.wait_for_port(addr, &log);
        self.server = Some(guard);
    }

    /// Requires external account binding with this key from now on.
    pub fn require_eab(&mut self, kid: &str, hmac_key_b64url: &str) {
        self.eab = Some((kid.to_owned(), hmac_key_b64url.to_owned()));
        self.restart();
    }

    /// Validates names through another DNS server from now on.
    pub fn use_resolver(&mut self, port: u16) {
        self.resolver = port;
        self.restart();
    }

    /// Stops the ACME server (an outage); `restart` brings it back.
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// The directory URL on loopback.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme)
    }

    /// The directory as containers see it, through `host.docker.internal`.
    pub fn directory_for_containers(&self) -> String {
        format!("https://host.docker.internal:{}/dir", self.acme)
    }

    /// The CA that signs Pebble's own HTTPS (for `[acme] directory_roots`).
    pub fn tls_ca(&self) -> PathBuf {
        self.work.join("ca.pem")
    }

    /// Pebble's current issuing root, written to a file.
    pub fn root(&self) -> PathBuf {
        let path = self.work.join(format!("root-{}.pem", free_port()));
        let out = run_ok(
            Command::new(peer("curl"))
                .args(["-sS", "--fail", "--cacert"])
                .arg(self.tls_ca())
                .arg(format!("https://127.0.0.1:{}/roots/0", self.mgmt)),
        );
        std::fs::write(&path, out.stdout).expect("write root");
        path
    }

    /// Points `host` at `ip` in the DNS Pebble validates with.
    pub fn set_a(&self, host: &str, ip: &str) {
        let post = |path: &str, body: String| {
            run_ok(
                Command::new(peer("curl"))
                    .args(["-sS", "--fail", "-d", &body])
                    .arg(format!("http://127.0.0.1:{}/{path}", self.dns_mgmt)),
            );
        };
        post("clear-a", format!(r#"{{"host": "{host}"}}"#));
        post("add-a", format!(r#"{{"host": "{host}", "addresses": ["{ip}"]}}"#));
    }
}

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

/// A TCP proxy on loopback that the test can cut (every open connection
/// closed, new ones refused) and heal: a network partition it controls.
/// `on_connect` runs before each connection is forwarded.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    /// Forwards connections to `target`.
    pub fn start(target: SocketAddr, on_connect: impl Fn() + Send + 'static) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                on_connect();
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                let mut tracked = o.lock().unwrap_or_else(|e| e.into_inner());
                for s in [&client, &server] {
                    if let Ok(s) = s.try_clone() {
                        tracked.push(s);
                    }
                }
                for (mut from, mut to) in [(client.try_clone(), server.try_clone()), (Ok(server), Ok(client))]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Self { addr, cut, open }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
