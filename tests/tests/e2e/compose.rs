//! `ca inject` on a real engine: the example fleet in `compose/examples`
//! is injected, brought up with docker-compose (v1) and probed from the host
//! and from a rogue container; certificates rotate under traffic, the CA
//! restarts, and identities survive `down`/`up`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lanyard_tests::*;

mod swarm;

/// Image tag for the test build, so a user's `lanyard:latest` is not replaced.
const TAG: &str = "e2e";
const TRUST_DOMAIN: &str = "fleet.internal";

fn build_images() {
    require_dockerd();
    let target = bin("ca").parent().unwrap().to_owned();
    run_ok(Command::new(workspace_root().join("scripts/build-images")).arg("--from").arg(&target).args([
        "--tag",
        TAG,
        "--testapp",
    ]));
}

/// Held by the tests that probe network isolation with a rogue container,
/// and by the Swarm test: `docker swarm init` and `leave` rewrite dockerd's
/// iptables chains, and a rogue probe meanwhile once reached an app across
/// bridge networks.
fn networks_alone() -> std::sync::MutexGuard<'static, ()> {
    static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A docker-compose project, taken down with its volumes on drop.
struct Project {
    name: String,
    file: PathBuf,
    env: Vec<(String, String)>,
}

impl Project {
    fn cmd(&self) -> Command {
        let mut c = Command::new(peer("docker-compose"));
        c.args(["--no-ansi", "-p", &self.name, "-f"]).arg(&self.file);
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn up(&self) {
        run_ok(self.cmd().args(["up", "-d"]));
    }

    /// The container of `service` (from the engine's labels: cheaper than
    /// `docker-compose ps`, which parses the whole file each time).
    fn id(&self, service: &str) -> String {
        let project = format!("label=com.docker.compose.project={}", self.name);
        let service_label = format!("label=com.docker.compose.service={service}");
        let out = run_ok(docker().args(["ps", "-q", "--filter", &project, "--filter", &service_label]));
        let id = text(&out.stdout).trim().to_owned();
        assert!(!id.is_empty() && !id.contains('\n'), "no single container for {service}: {id:?}");
        id
    }

    fn exec(&self, service: &str, args: &[&str]) -> std::process::Output {
        run(docker().arg("exec").arg(self.id(service)).args(args))
    }

    fn logs(&self, service: &str) -> String {
        text(&run(self.cmd().args(["logs", "--no-color", service])).stdout)
    }

    /// The project's containers (from the engine's labels: cheaper than
    /// `docker-compose ps`, which parses the whole file each time).
    fn containers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.name);
        text(&run_ok(docker().args(["ps", "-aq", "--filter", &label])).stdout).lines().map(str::to_owned).collect()
    }

    fn inspect(&self, id: &str, format: &str) -> String {
        text(&run_ok(docker().args(["inspect", "--format", format, id])).stdout).trim().to_owned()
    }

    /// Waits until at least `containers` exist and every one with a
    /// healthcheck is healthy; returns how many have one.
    fn wait_healthy_n(&self, containers: usize, within: Duration) -> usize {
        let mut checked = 0;
        poll_until(within, Duration::from_secs(2), "every container healthy", || {
            let ids = self.containers();
            if ids.len() < containers {
                return false;
            }
            let format = "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}";
            let out = run(docker().args(["inspect", "--format", format]).args(&ids));
            let states: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
            checked = states.iter().filter(|s| !s.ends_with(" none")).count();
            let bad: Vec<_> = states.iter().filter(|s| !s.ends_with(" healthy") && !s.ends_with(" none")).collect();
            if bad.iter().any(|s| s.ends_with(" unhealthy")) {
                panic!(
                    "unhealthy: {bad:?}\n{}",
                    text(&run(self.cmd().args(["logs", "--no-color", "--tail", "30"])).stdout)
                );
            }
            bad.is_empty() && states.len() == ids.len()
        });
        checked
    }

    /// The example fleet's wait: its nine containers.
    fn wait_healthy(&self) -> usize {
        self.wait_healthy_n(9, Duration::from_secs(180))
    }
}

impl Project {
    /// Brings the project up after removing what an earlier run of the same
    /// test left behind (a killed run keeps its networks, whose subnets
    /// would overlap this run's).
    fn up_clean(&self, prefix: &str) {
        remove_projects(|p| p.starts_with(prefix) && p != self.name);
        self.up();
    }
}

/// Removes the containers, networks and volumes of every compose project whose name `matches`.
fn remove_projects(matches: impl Fn(&str) -> bool) {
    let label = "{{.Label \"com.docker.compose.project\"}} {{.ID}}";
    for (kind, rm) in
        [("ps", &["rm", "-f"][..]), ("network", &["network", "rm"][..]), ("volume", &["volume", "rm", "-f"][..])]
    {
        let list = match kind {
            "ps" => run(docker().args(["ps", "-a", "--format", label])),
            other => run(docker().args([other, "ls", "--format", label])),
        };
        let ids: Vec<String> = text(&list.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(project, _)| matches(project))
            .map(|(_, id)| id.to_owned())
            .collect();
        if !ids.is_empty() {
            let _ = run(docker().args(rm).args(&ids));
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", text(&run(self.cmd().args(["logs", "--no-color", "--tail", "40"])).stdout));
        }
        let _ = run(self.cmd().args(["down", "-v", "--remove-orphans", "-t", "2"]));
        // What `down` could not remove (a container stuck in removal keeps its networks).
        remove_projects(|p| p == self.name);
    }
}

/// A free loopback port below the kernel's ephemeral range. The fleet's
/// published ports are released during `down` and bound again by `up`;
/// another test's port-0 listener or outgoing connection could take an
/// ephemeral port in between, but never one of these.
fn stable_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 8_000) as u16;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 4_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Runs the test app image as a rogue container on `network`.
fn rogue(network: &str, args: &[&str]) -> std::process::Output {
    run(docker()
        .args(["run", "--rm", "--network", network])
        .arg(format!("lanyard-testapp:{TAG}"))
        .arg("/testapp")
        .args(args))
}

/// A rogue container on `network` reaches no app's address on its port,
/// gets only TLS from each service name, and is refused without a certificate.
fn rogue_gets_nothing(project: &Project, network: &str, services: &[(&str, u16)]) {
    for (service, port) in services {
        let app_ips =
            project.inspect(&project.id(service), "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}");
        for ip in app_ips.split_whitespace() {
            let out = rogue(network, &["tcp", &format!("{ip}:{port}")]);
            assert!(!out.status.success(), "rogue reached the {service} app at {ip}:{port}: {out:?}");
        }
        let out = rogue(network, &["tcp", &format!("{service}:{port}")]);
        assert!(text(&out.stderr).contains("TLS"), "{service}:{port} answered plaintext: {out:?}");
        let out = rogue(network, &["tls", &format!("{service}:{port}")]);
        assert!(text(&out.stderr).contains("CertificateRequired"), "{service}:{port} without a cert: {out:?}");
    }
}

/// curl from the host through the frontend's published port, with mTLS.
fn curl_frontend(admin: &Path, port: u16, path: &str) -> Result<String, String> {
    let out = run(Command::new(peer("curl"))
        .args(["-sS", "--max-time", "10", "--fail-with-body", "--resolve"])
        .arg(format!("frontend:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(admin.join("ca.pem"))
        .arg("--cert")
        .arg(admin.join("cert.pem"))
        .arg("--key")
        .arg(admin.join("key.pem"))
        .arg(format!("https://frontend:{port}{path}")));
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("{} {}", text(&out.stdout), text(&out.stderr)))
    }
}

fn rotations(project: &Project, identity: &str) -> usize {
    project.logs("lanyard-ca").matches(&format!("rotated identity={identity} ")).count()
}

/// The corpus of compose files modelled on public projects
/// (`compose/tests/corpus`, see its README): each is injected by the real
/// `ca inject`, and an independent checker (`compose/tests/check_inject.py`,
/// written from the compose model, not from the transform) asserts that
/// `docker-compose config` and the compose-spec schema accept the output,
/// that PyYAML and a YAML 1.2 reader read it alike and read the input's
/// values unchanged, and that every call the input allowed still resolves
/// and reaches a listener (mTLS between sidecars, or plaintext it names).
#[test]
fn corpus_of_public_project_patterns_keeps_every_call() {
    peer("docker-compose");
    peer("npm");
    let python = venv_tool("python");
    let checker = workspace_root().join("compose/tests/check_inject.py");
    let selftest = run(Command::new(&python).arg(&checker).arg("--selftest"));
    assert!(selftest.status.success(), "the checker's self-test: {}{}", text(&selftest.stdout), text(&selftest.stderr));
    let corpus = workspace_root().join("compose/tests/corpus");
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(&corpus).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    assert!(dirs.len() >= 40, "the corpus has only {} projects", dirs.len());
    let out = run(Command::new(&python).arg(&checker).arg("--ca").arg(bin("ca")).args(&dirs));
    let report = text(&out.stdout) + &text(&out.stderr);
    eprintln!("{report}");
    assert!(out.status.success(), "the checker failed:\n{report}");
    let summary = report.lines().rev().find(|l| l.ends_with(" failed")).unwrap_or_default();
    assert_eq!(summary, format!("{} passed, 0 failed", dirs.len()), "{report}");

    // --strict refuses a file where a call stays in plaintext, and names it.
    let opt_out = workspace_root().join("compose/tests/golden/opt-out.in.yml");
    let strict = run(ca().arg("inject").arg(&opt_out).arg("--strict"));
    assert_eq!(strict.status.code(), Some(3), "{strict:?}");
    let said = text(&strict.stderr);
    assert!(said.contains("warning: plaintext: app -> legacy-db:1521"), "{said}");
    let lenient = run(ca().arg("inject").arg(&opt_out));
    assert!(lenient.status.success(), "{lenient:?}");
}

#[test]
fn golden_outputs_pass_docker_compose_config() {
    let dir = workspace_root().join("compose/tests/golden");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".out.yml") {
            let out = run(Command::new(peer("docker-compose")).arg("-f").arg(&path).args(["config", "-q"]));
            assert!(out.status.success(), "docker-compose rejects {}: {}", path.display(), text(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} golden outputs");
}

#[test]
fn injected_fleet_is_mtls_on_every_hop() {
    let _alone = networks_alone();
    build_images();
    let tmp = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(workspace_root().join("compose/examples/fleet/docker-compose.yml")).unwrap();
    let input = tmp.path().join("in.yml");
    std::fs::write(&input, example.replace("image: lanyard-testapp", &format!("image: lanyard-testapp:{TAG}")))
        .unwrap();
    let file = tmp.path().join("docker-compose.yml");
    run_ok(ca().arg("inject").arg(&input).arg("-o").arg(&file).args([
        "--image",
        &format!("lanyard:{TAG}"),
        "--ttl",
        "20s",
    ]));

    // Pebble runs beside the fleet on the host, on the Docker bridge's
    // gateway address (host.docker.internal inside the CA), and validates
    // HTTP-01 on the edge's published port 80 stand-in.
    let (port, edge_http, edge_https) = (stable_port(), stable_port(), stable_port());
    // `host-gateway` is the address of docker0.
    let addrs = text(&run_ok(Command::new(peer("ip")).args(["-4", "-o", "addr", "show", "docker0"])).stdout);
    let gateway = addrs.split_whitespace().skip_while(|w| *w != "inet").nth(1).and_then(|a| a.split('/').next());
    let gateway = gateway.unwrap_or_else(|| panic!("no IPv4 address on docker0: {addrs}")).to_owned();
    let pebble =
        Pebble::start_at(tmp.path(), &gateway, edge_http, free_port(), 60 * 24 * 3600, &[("PEBBLE_AUTHZREUSE", "0")]);
    let project = Project {
        name: format!("lanyarde2e{port}"),
        file,
        env: vec![
            ("FRONTEND_PORT".into(), port.to_string()),
            ("EDGE_HTTP".into(), format!("127.0.0.1:{edge_http}")),
            ("EDGE_HTTPS".into(), format!("127.0.0.1:{edge_https}")),
            ("LANYARD_ACME_DIRECTORY".into(), pebble.directory_for_containers()),
            ("LANYARD_ACME_ROOTS".into(), pebble.tls_ca().display().to_string()),
        ],
    };
    project.up_clean("lanyarde2e");
    let with_health = project.wait_healthy();
    assert!(with_health >= 7, "ca + 4 sidecars + 2 apps have healthchecks, saw {with_health}");

    // No container has extra privileges but the one-shot lanyard-volumes
    // (root with CHOWN and DAC_READ_SEARCH), which has done its work.
    for id in project.containers() {
        let caps = project.inspect(&id, "{{.Name}} {{.HostConfig.Privileged}} {{.HostConfig.CapAdd}}");
        if caps.contains("_lanyard-volumes_") {
            assert!(caps.ends_with(" false [CHOWN DAC_READ_SEARCH]"), "{caps}");
            assert_eq!(project.inspect(&id, "{{.State.Status}} {{.State.ExitCode}}"), "exited 0");
        } else {
            assert!(caps.ends_with(" false []"), "extra privileges: {caps}");
        }
    }
    // Lanyard's own processes run as the image's unprivileged user, as the
    // kernel sees them.
    for service in ["lanyard-ca", "lanyard-frontend", "lanyard-backend", "lanyard-users", "lanyard-echo"] {
        let pid = project.inspect(&project.id(service), "{{.State.Pid}}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let ids = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap().split_whitespace().collect::<Vec<_>>();
        assert_eq!(ids, ["65532"; 4], "{service} (pid {pid}) runs as uids {ids:?}");
    }

    // The backend's unchanged calls travel over mTLS, and the callees see
    // its verified identity: XFCC for HTTP, PROXY v2 for plain TCP.
    let backend_id = format!("spiffe://{TRUST_DOMAIN}/backend");
    let users = project.exec("backend", &["/testapp", "get", "http://127.0.0.1:3000/call/USERS_URL"]);
    assert!(text(&users.stdout).contains(&format!("URI={backend_id}")), "{users:?}");
    let echo = project.exec("backend", &["/testapp", "get", "http://127.0.0.1:3000/call/ECHO_URL"]);
    assert_eq!(text(&echo.stdout), format!("{backend_id}: ping\n"), "{echo:?}");
    // users allows only backend: the frontend's sidecar is refused there.
    let denied = project.exec("frontend", &["/testapp", "get", "http://users:4000/whoami"]);
    assert!(!denied.status.success(), "frontend reached users: {denied:?}");

    // From the host: mTLS into the frontend, then frontend -> backend -> users.
    let admin = tmp.path().join("admin");
    run_ok(docker().arg("cp").arg(format!("{}:/state/admin", project.id("lanyard-ca"))).arg(&admin));
    let chain = curl_frontend(&admin, port, "/call/BACKEND_URL").unwrap();
    assert!(chain.contains(&format!("URI={backend_id}")), "{chain}");

    // The edge serves the public name with a certificate from Pebble, with
    // the security headers, and redirects plain HTTP.
    let root = pebble.root();
    let public_get = |extra: &[&str]| {
        run(Command::new(peer("curl"))
            .args(["-sS", "-D", "-", "-o", "/dev/null", "--max-time", "5", "--resolve"])
            .arg(format!("www.example.com:{edge_https}:127.0.0.1"))
            .arg("--cacert")
            .arg(&root)
            .args(extra)
            .arg(format!("https://www.example.com:{edge_https}/")))
    };
    poll_until_ok(Duration::from_secs(90), Duration::from_millis(500), "the public certificate on the edge", || {
        let out = public_get(&[]);
        let head = text(&out.stdout);
        if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/2 200") {
            Ok(())
        } else {
            Err(format!("{head}{}\n{}", text(&out.stderr), project.logs("lanyard-ca")))
        }
    });
    let head = text(&public_get(&[]).stdout).to_lowercase();
    assert!(head.contains("strict-transport-security: max-age=63072000"), "{head}");
    let redirect = text(
        &run_ok(
            Command::new("curl")
                .args(["-sS", "-D", "-", "-o", "/dev/null", "-H", "Host: www.example.com"])
                .arg(format!("http://127.0.0.1:{edge_http}/x")),
        )
        .stdout,
    );
    assert!(redirect.starts_with("HTTP/1.1 308"), "{redirect}");

    // A rogue container on the shared network gets nothing from any app port,
    // is refused by every sidecar without a certificate, and cannot reach
    // any sidecar's outbound listener.
    let network = format!("{}_default", project.name);
    rogue_gets_nothing(&project, &network, &[("frontend", 8080), ("backend", 3000), ("users", 4000), ("echo", 7000)]);
    for (service, outbound_ports) in [("frontend", &[3000][..]), ("backend", &[4000, 7000][..])] {
        let sidecar = project.id(&format!("lanyard-{service}"));
        let shared_ip =
            project.inspect(&sidecar, &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"));
        for p in outbound_ports {
            let out = rogue(&network, &["tcp", &format!("{shared_ip}:{p}")]);
            assert!(!out.status.success(), "rogue used {service}'s outbound listener {shared_ip}:{p}: {out:?}");
        }
    }

    // Traffic through three sidecars while 20 s certificates rotate and
    // the CA restarts: no request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let traffic = {
        let (stop, done, admin) = (stop.clone(), done.clone(), admin.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match curl_frontend(&admin, port, "/call/BACKEND_URL") {
                    Ok(_) => drop(done.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => failures.push(e),
                }
            }
            failures
        })
    };
    let before: Vec<usize> = ["frontend", "backend", "users"].iter().map(|i| rotations(&project, i)).collect();
    poll_until(Duration::from_secs(90), Duration::from_secs(1), "two rotations of each identity under traffic", || {
        ["frontend", "backend", "users"].iter().zip(&before).all(|(i, b)| rotations(&project, i) >= b + 2)
    });
    run_ok(project.cmd().args(["restart", "-t", "2", "lanyard-ca"]));
    project.wait_healthy();
    let after_restart = done.load(Ordering::Relaxed);
    poll_until(Duration::from_secs(30), Duration::from_millis(200), "traffic after the CA restart", || {
        done.load(Ordering::Relaxed) > after_restart + 20
    });
    stop.store(true, Ordering::Relaxed);
    let failures = traffic.join().unwrap();
    let total = done.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        total + failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!("{total} requests through three sidecars during rotations and a CA restart, none failed");

    // Identities survive down/up through the state volume.
    let root_before = std::fs::read_to_string(admin.join("ca.pem")).unwrap();
    run_ok(project.cmd().args(["down", "-t", "2"]));
    project.up();
    project.wait_healthy();
    let admin_after = tmp.path().join("admin-after");
    run_ok(docker().arg("cp").arg(format!("{}:/state/admin", project.id("lanyard-ca"))).arg(&admin_after));
    assert_eq!(
        std::fs::read_to_string(admin_after.join("ca.pem")).unwrap(),
        root_before,
        "the CA changed across down/up"
    );
    let chain = curl_frontend(&admin, port, "/call/BACKEND_URL").unwrap();
    assert!(chain.contains(&format!("URI={backend_id}")), "{chain}");
}

/// Builds the peers' images (redis, PostgreSQL, nginx from Debian's binaries).
fn build_peer_images() {
    require_dockerd();
    run_ok(Command::new(workspace_root().join("scripts/build-peer-images")).args(["--tag", TAG]));
}

/// `ca trust` done for the test: the fleet root is in the system bundle and
/// in the NSS database under `home`; removed again on drop.
struct Trusted {
    root: PathBuf,
    home: PathBuf,
}

impl Trusted {
    fn install(root: PathBuf, home: PathBuf) -> Self {
        let out = run_ok(ca().args(["trust", "--root"]).arg(&root).env("HOME", &home));
        let said = text(&out.stdout);
        assert!(said.contains("installed /usr/local/share/ca-certificates/"), "{said}");
        assert!(said.contains(&format!("installed in {}", home.join(".pki/nssdb").display())), "{said}");
        Self { root, home }
    }
}

impl Drop for Trusted {
    fn drop(&mut self) {
        let out = run(ca().args(["trust", "--remove", "--root"]).arg(&self.root).env("HOME", &self.home));
        assert!(out.status.success() || std::thread::panicking(), "ca trust --remove: {out:?}");
    }
}

/// Real protocol peers behind sidecars: an nginx whose own nginx.conf calls
/// the backend, a backend that names PostgreSQL and Redis by bare variables,
/// and ports that only the images' EXPOSE declares. After `ca inject` every
/// call is mTLS (the callees' sidecars log the caller's identity), the
/// published web port answers curl and headless Chromium over HTTPS once
/// `ca trust` ran, `psql` from the host reaches the published Postgres as
/// before, and a rogue container gets nothing.
#[test]
fn real_peers_keep_working_behind_sidecars_and_people_get_https() {
    let _alone = networks_alone();
    build_images();
    build_peer_images();
    peer("chromium");
    peer("psql");
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("stack");
    std::fs::create_dir(&work).unwrap();
    for f in ["docker-compose.yml", "nginx.conf"] {
        std::fs::copy(workspace_root().join("tests/data/stack").join(f), work.join(f)).unwrap();
    }
    let file = work.join("lanyard.yml");
    let out = run_ok(ca().arg("inject").arg(work.join("docker-compose.yml")).arg("-o").arg(&file).args([
        "--image",
        &format!("lanyard:{TAG}"),
        "--explain",
    ]));
    let said = text(&out.stderr);
    // The engine's EXPOSE gave the database's and the cache's ports; nginx.conf gave the backend's.
    for line in [
        "postgres: sidecar lanyard-postgres in [5432/tcp]",
        "redis: sidecar lanyard-redis in [6379/tcp]",
        "backend: sidecar lanyard-backend in [3000/http]",
        "proxy -> backend:3000",
        "backend -> postgres:5432",
    ] {
        assert!(said.contains(line), "{line:?} not in\n{said}");
    }
    assert!(!said.contains("plain:"), "a call stays plaintext:\n{said}");

    let (web, pg) = (stable_port(), stable_port());
    let project = Project {
        name: format!("lanyardstack{web}"),
        file,
        env: vec![("WEB_PORT".into(), web.to_string()), ("PG_PORT".into(), pg.to_string())],
    };
    project.up_clean("lanyardstack");
    // ca + 4 sidecars + postgres + redis have healthchecks; 9 containers in all.
    let with_health = project.wait_healthy_n(9, Duration::from_secs(180));
    assert!(with_health >= 7, "saw {with_health} healthchecks");

    // People: HTTPS on the published port; untrusted until `ca trust`.
    let url = format!("https://localhost:{web}/");
    let curl = || run(Command::new(peer("curl")).args(["-sS", "--max-time", "10", "--fail-with-body"]).arg(&url));
    let untrusted = curl();
    assert!(!untrusted.status.success() && text(&untrusted.stderr).contains("certificate"), "{untrusted:?}");
    let root = tmp.path().join("root.pem");
    run_ok(docker().arg("cp").arg(format!("{}:/state/root.pem", project.id("lanyard-ca"))).arg(&root));
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let _trusted = Trusted::install(root, home.clone());
    let page = poll_ok(|| {
        let out = curl();
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(format!("{out:?}"))
        }
    });
    assert!(page.contains("redis says PONG") && page.contains("postgres says 42"), "{page}");
    let redirect = text(
        &run_ok(
            Command::new(peer("curl"))
                .args(["-sS", "-D", "-", "-o", "/dev/null"])
                .arg(format!("http://localhost:{web}/x")),
        )
        .stdout,
    );
    assert!(
        redirect.starts_with("HTTP/1.1 308") && redirect.contains(&format!("https://localhost:{web}/x")),
        "{redirect}"
    );

    // A person's browser: headless Chromium with the root in its NSS database.
    let chromium = |extra: &[&str]| {
        run(Command::new(peer("chromium"))
            .env("HOME", &home)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            .args(["--disable-component-update", "--disable-sync", "--window-size=800,600"])
            .arg(format!("--user-data-dir={}", tmp.path().join("chromium").display()))
            .args(extra)
            .arg(&url))
    };
    let dom = chromium(&["--dump-dom"]);
    assert!(text(&dom.stdout).contains("postgres says 42"), "Chromium: {dom:?}");
    let shot = tmp.path().join("page.png");
    let shot_arg = format!("--screenshot={}", shot.display());
    let out = chromium(&[&shot_arg]);
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 2_000, "no screenshot ({size} bytes): {out:?}");
    let kept = workspace_root().join("target/e2e-stack-page.png");
    let _ = std::fs::copy(&shot, &kept);
    eprintln!("Chromium's screenshot of {url}: {}", kept.display());

    // psql from the host on the published Postgres port, as before injection.
    let psql = run_ok(
        Command::new(peer("psql"))
            .args(["-h", "127.0.0.1", "-p", &pg.to_string(), "-U", "app", "-d", "app", "-tAc", "select 6 * 7"])
            .env("PGCONNECT_TIMEOUT", "5"),
    );
    assert_eq!(text(&psql.stdout).trim(), "42");

    // Every call was mTLS: the callees' sidecars saw the callers' identities.
    for (callee, caller) in [("backend", "proxy"), ("postgres", "backend"), ("redis", "backend")] {
        let logs = project.logs(&format!("lanyard-{callee}"));
        let id = format!("identity=spiffe://stack.internal/{caller}");
        assert!(logs.contains(&id), "lanyard-{callee} never saw {id}:\n{logs}");
    }

    // A rogue container on the shared network: no app address answers, the
    // service names answer only TLS, and without a certificate nothing.
    let network = format!("{}_default", project.name);
    rogue_gets_nothing(&project, &network, &[("backend", 3000), ("postgres", 5432), ("redis", 6379), ("proxy", 80)]);
}

/// Polls `check` for up to 30 s; its value once it succeeds.
fn poll_ok<T>(mut check: impl FnMut() -> Result<T, String>) -> T {
    let mut value = None;
    poll_until_ok(Duration::from_secs(30), Duration::from_millis(500), "the published port", || {
        value = Some(check()?);
        Ok(())
    });
    value.expect("poll_until_ok returned, so the check passed")
}

/// A generated project of 100 services, each calling two others, on a
/// default dockerd: the private networks' small subnets come from the
/// project's pool, every service becomes healthy (its healthcheck calls the
/// first callee through the mesh) and reaches its second callee too.
#[test]
fn a_hundred_services_come_up_and_reach_their_callees() {
    build_images();
    const N: usize = 100;
    let mut yaml = String::from(
        "# Generated: 100 services, each calling the next two (testapp).\nx-lanyard:\n  subnet_pool: 10.215.0.0/16\nservices:\n",
    );
    for i in 0..N {
        let call = |k: usize| format!("http://svc{:03}:8080/health", (i + k) % N);
        yaml += &format!(
            "  svc{i:03}:\n    image: lanyard-testapp:{TAG}\n    command: [/testapp, http, \"8080\"]\n    environment:\n      CALL1: {}\n      CALL2: {}\n    healthcheck:\n      test: [CMD, /testapp, get, \"http://127.0.0.1:8080/call/CALL1\"]\n      interval: 15s\n      timeout: 10s\n      retries: 40\n",
            call(1),
            call(2)
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("docker-compose.yml");
    std::fs::write(&input, yaml).unwrap();
    let file = tmp.path().join("lanyard.yml");
    let out = run_ok(ca().arg("inject").arg(&input).arg("-o").arg(&file).args(["--image", &format!("lanyard:{TAG}")]));
    // 202 services: 100 apps, 100 sidecars, the CA and lanyard-volumes.
    assert!(text(&out.stderr).contains("COMPOSE_PARALLEL_LIMIT=404"), "{}", text(&out.stderr));
    let injected = std::fs::read_to_string(&file).unwrap();
    let subnets = injected.matches("subnet: \"10.215.").count();
    assert_eq!(subnets, N + 1, "one small subnet per private network and the control network");

    // docker-compose v1 deadlocks with more services ready at once than its
    // thread budget (`ca inject` warns and says this).
    // Its API calls time out after 60 s by default, which a busy dockerd
    // creating 200 containers at once can exceed.
    let env = vec![
        ("COMPOSE_PARALLEL_LIMIT".to_owned(), (4 * N + 4).to_string()),
        ("COMPOSE_HTTP_TIMEOUT".to_owned(), "300".to_owned()),
    ];
    let project = Project { name: format!("lanyardscale{}", std::process::id()), file, env };
    project.up_clean("lanyardscale");
    let with_health = project.wait_healthy_n(2 * N + 1, Duration::from_secs(600));
    assert_eq!(with_health, 2 * N + 1, "every app, sidecar and the CA has a healthcheck");
    let mut failed = Vec::new();
    for i in 0..N {
        let out = project.exec(&format!("svc{i:03}"), &["/testapp", "get", "http://127.0.0.1:8080/call/CALL2"]);
        if !out.status.success() {
            failed.push(format!("svc{i:03}: {}", text(&out.stdout)));
        }
    }
    assert!(failed.is_empty(), "{} of {N} services could not reach their second callee: {failed:?}", failed.len());
}
