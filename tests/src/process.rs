//! Locating binaries, running commands loudly, child processes killed on drop, and waiting on events.

use super::*;

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
    venv_tool_of(".venv", name)
}

/// Path of a tool installed in the venv `venv` of the workspace root.
pub fn venv_tool_of(venv: &str, name: &str) -> PathBuf {
    let path = workspace_root().join(venv).join("bin").join(name);
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

/// A loopback port for a server the test is about to start. It lies below
/// the kernel's ephemeral range (32768-60999), so no outgoing connection
/// takes it as its source port meanwhile, and below the compose tests'
/// published ports (20000 on); no port is handed out twice in one test
/// process, and it was free on TCP and UDP a moment ago.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 10_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id() % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % COUNT).expect("below 20000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port left in {FIRST}..{}", FIRST + COUNT);
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

/// Waits until the log file at `path` contains `needle`.
pub fn wait_for_log(path: &Path, needle: &str) {
    wait_until(Duration::from_secs(15), &format!("{needle:?} in {}", path.display()), || {
        std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
    });
}
