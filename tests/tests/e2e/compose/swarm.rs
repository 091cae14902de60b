//! The fleet on Docker Swarm (`ca inject --target swarm`, `docker stack
//! deploy`) on the test's dockerd: sidecars enrol over the network with
//! credentials from secrets, two CA replicas share Redis, services are
//! reached by DNS round robin (IPVS is not available on these machines).

use super::*;

/// Swarm mode on the test's dockerd; left again on drop when this test turned it on.
struct Swarm {
    joined_here: bool,
}

impl Swarm {
    fn join() -> Self {
        let state = text(&run_ok(docker().args(["info", "--format", "{{.Swarm.LocalNodeState}}"])).stdout);
        if state.trim() == "active" {
            return Self { joined_here: false };
        }
        run_ok(docker().args(["swarm", "init", "--advertise-addr", "172.17.0.1"]));
        Self { joined_here: true }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.joined_here {
            let _ = run(docker().args(["swarm", "leave", "--force"]));
        }
    }
}

/// A deployed stack, removed with its networks and secrets on drop (also
/// when the test fails).
struct Stack(String);

impl Stack {
    fn deploy(name: &str, file: &Path) -> Self {
        Self::remove(name);
        let stack = Self(name.to_owned());
        run_ok(docker().args(["stack", "deploy", "--resolve-image", "never", "-c"]).arg(file).arg(name));
        stack
    }

    /// `docker stack rm`, then the stack's volumes (which it leaves behind:
    /// an old Redis volume would hold another CA).
    fn remove(name: &str) {
        let _ = run(docker().args(["stack", "rm", name]));
        let label = format!("label=com.docker.stack.namespace={name}");
        poll_until(
            Duration::from_secs(60),
            Duration::from_millis(500),
            "the stack's containers and networks are gone",
            || {
                let containers = text(&run(docker().args(["ps", "-aq", "--filter", &label])).stdout);
                let networks = text(&run(docker().args(["network", "ls", "-q", "--filter", &label])).stdout);
                containers.trim().is_empty() && networks.trim().is_empty()
            },
        );
        for volume in text(&run(docker().args(["volume", "ls", "-q", "--filter", &label])).stdout).lines() {
            run_ok(docker().args(["volume", "rm", "-f", volume]));
        }
    }

    /// Every service's `RUNNING/DESIRED`.
    fn replicas(&self) -> Vec<(String, String)> {
        let out = run(docker().args(["stack", "services", &self.0, "--format", "{{.Name}} {{.Replicas}}"]));
        text(&out.stdout).lines().filter_map(|l| l.split_once(' ')).map(|(a, b)| (a.to_owned(), b.to_owned())).collect()
    }

    /// The running containers of service `service`.
    fn containers(&self, service: &str) -> Vec<String> {
        let filter = format!("label=com.docker.swarm.service.name={}_{service}", self.0);
        text(&run(docker().args(["ps", "-q", "--filter", &filter])).stdout).lines().map(str::to_owned).collect()
    }

    /// The logs of every container `service` has run, exited ones too
    /// (`docker service logs` can hang on dockerd 20.10).
    fn logs(&self, service: &str) -> String {
        let filter = format!("label=com.docker.swarm.service.name={}_{service}", self.0);
        let ids = text(&run(docker().args(["ps", "-aq", "--filter", &filter])).stdout);
        ids.lines()
            .map(|id| {
                let out = run(docker().args(["logs", id]));
                text(&out.stdout) + &text(&out.stderr)
            })
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        Self::remove(&self.0);
    }
}

/// A call from the frontend's app: GET `path` on its own HTTP port; the body.
fn call(stack: &Stack, path: &str) -> Result<String, String> {
    let c = stack.containers("frontend").into_iter().next().ok_or("no frontend container")?;
    let out = run(docker().args(["exec", &c, "/testapp", "get", &format!("http://127.0.0.1:8080{path}")]));
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
    }
}

#[test]
fn the_fleet_runs_on_swarm_with_enrolled_sidecars_and_two_ca_replicas() {
    let _alone = networks_alone();
    build_images();
    build_peer_images();
    let _swarm = Swarm::join();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.yml");
    // Modelled on the example fleet, with a backend of two replicas.
    std::fs::write(
        &input,
        format!(
            r#"x-lanyard:
  trust_domain: fleet.internal
  image: lanyard:{TAG}
  redis_image: lanyard-peer-redis:{TAG}
  endpoint_mode: dnsrr
  ttl: 20s
services:
  frontend:
    image: lanyard-testapp:{TAG}
    command: ["/testapp", "http", "8080"]
    environment:
      BACKEND_URL: http://backend:3000/call/USERS_URL
      USERS_URL: http://users:4000/whoami
  backend:
    image: lanyard-testapp:{TAG}
    command: ["/testapp", "http", "3000"]
    environment:
      - USERS_URL=http://users:4000/whoami
    deploy:
      replicas: 2
  users:
    image: lanyard-testapp:{TAG}
    command: ["/testapp", "http", "4000"]
    expose: ["4000"]
    x-lanyard:
      allow: [backend]
"#
        ),
    )
    .unwrap();
    let stack_file = tmp.path().join("stack.yml");
    run_ok(
        ca().args(["inject", "--target", "swarm"])
            .arg(&input)
            .arg("-o")
            .arg(&stack_file)
            .arg("--state")
            .arg(tmp.path().join("state")),
    );
    let stack = Stack::deploy("lyt-e2e", &stack_file);

    poll_until(Duration::from_secs(240), Duration::from_secs(2), "every task of the stack running", || {
        let r = stack.replicas();
        r.len() == 8 && r.iter().all(|(_, n)| n.split_once('/').is_some_and(|(a, b)| a == b && a != "0"))
    });
    poll_until_ok(Duration::from_secs(120), Duration::from_secs(1), "frontend -> backend -> users", || {
        call(&stack, "/call/BACKEND_URL").map(drop)
    });
    let reply = call(&stack, "/call/BACKEND_URL").unwrap();
    assert!(reply.contains("URI=spiffe://fleet.internal/backend"), "users saw the backend's identity: {reply}");
    assert!(stack.logs("lanyard-ca").contains("enrolment identity=backend"), "the backend's sidecars enrolled");
    let enrolled = stack.logs("lanyard-backend").matches("enrolled identity=spiffe://fleet.internal/backend").count();
    assert!(enrolled >= 2, "each backend replica enrols on its own: {enrolled}");
    // users admits only backend: the frontend's own call is refused.
    assert!(call(&stack, "/call/USERS_URL").is_err(), "users refuses the frontend");

    // A rogue container on the fleet's network gets nothing: no app is on
    // it, and the sidecars want a client certificate.
    let rogue = |args: &[&str]| {
        run(docker()
            .args(["run", "--rm", "--network", "lyt-e2e_default", &format!("lanyard-testapp:{TAG}"), "/testapp"])
            .args(args))
    };
    assert!(
        !rogue(&["tls", "backend:3000"]).status.success(),
        "the backend's sidecar refuses a client without a certificate"
    );
    assert!(
        !rogue(&["get", "http://lanyard-app-backend:3000/health"]).status.success(),
        "the app is not on the shared network"
    );

    // Rotation (20 s certificates) and a CA replica killed, under traffic.
    let (mut ok, mut failures) = (0, Vec::new());
    let started = std::time::Instant::now();
    let mut killed = false;
    while started.elapsed() < Duration::from_secs(50) {
        match call(&stack, "/call/BACKEND_URL") {
            Ok(r) if r.contains("URI=spiffe://fleet.internal/backend") => ok += 1,
            other => failures.push(format!("{other:?}")),
        }
        if !killed && started.elapsed() > Duration::from_secs(15) {
            let ca = stack.containers("lanyard-ca");
            run_ok(docker().args(["kill", &ca[0]]));
            killed = true;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} calls failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(3)]
    );
    let renewed = stack.logs("lanyard-backend").matches("renewed identity=spiffe://fleet.internal/backend").count();
    assert!(renewed >= 2, "the backend's certificates rotated under traffic: {renewed} renewals");
    eprintln!(
        "{ok} calls through the stack with rotation and a CA replica killed, none failed; {renewed} backend renewals"
    );
}
