//! `ca serve` replicas on a real redis-server: one leads, every one
//! answers, a dead or partitioned leader is replaced without a lost
//! record, Redis itself may crash, and a CA moves between stores.

use super::*;

/// A replica's config: `pki`'s state, `store`, a 3 s lease, `extra` TOML.
fn replica(pki: &Pki, store: &str, extra: &str) -> CaServer {
    let (https, http) = (free_port(), free_port());
    replica_on(pki, store, https, http, extra)
}

fn replica_on(pki: &Pki, store: &str, https: u16, http: u16, extra: &str) -> CaServer {
    replica_in(pki, &pki.state(), store, https, http, extra)
}

/// A replica with its own state directory `state`.
fn replica_in(pki: &Pki, state: &Path, store: &str, https: u16, http: u16, extra: &str) -> CaServer {
    let config = pki.path(&format!("replica-{https}.toml"));
    std::fs::write(
        &config,
        format!(
            "state = {state:?}\nhttps_listen = \"127.0.0.1:{https}\"\nhttp_listen = \"127.0.0.1:{http}\"\nstore = \"{store}\"\nlease_ttl = \"3s\"\n{extra}"
        ),
    )
    .unwrap();
    CaServer::start_with(pki, config, https, http)
}

fn health(pki: &Pki, server: &CaServer) -> Value {
    let (_, body) = curl_api(pki, "GET", &server.url("/health"), None, None);
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

fn role(pki: &Pki, server: &CaServer) -> String {
    health(pki, server)["role"].as_str().unwrap_or("unreachable").to_owned()
}

/// `ca token` against the Redis store, from 4 threads.
fn redis_tokens(pki: &Pki, url: &str, n: usize) -> Vec<String> {
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (state, url) = (pki.state(), url.to_owned());
            std::thread::spawn(move || {
                (0..n / 4)
                    .map(|_| {
                        let out = run_ok(
                            ca().args(["token", "burst", "--ttl", "10m", "--store", &url, "--state"]).arg(&state),
                        );
                        text(&out.stdout).trim().to_owned()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
}

/// One POST /v1/sign; the serial when it was answered with 200.
fn sign(root: &Path, url: &str, token: &str, csr_pem: &str) -> Option<String> {
    let body = json!({"token": token, "csr": csr_pem}).to_string();
    let out = run(Command::new("curl")
        .args(["-s", "--max-time", "5", "--cacert"])
        .arg(root)
        .args(["-XPOST", "--data", &body])
        .arg(url));
    let reply: Value = serde_json::from_slice(&out.stdout).ok()?;
    reply["serial"].as_str().map(str::to_owned)
}

/// Time of the first log line containing `needle` (tracing's RFC 3339 prefix).
fn logged_at(log: &str, needle: &str) -> Option<time::OffsetDateTime> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let stamp = line.split_whitespace().next()?;
    let plain = String::from_utf8(strip_ansi(stamp.as_bytes())).ok()?;
    time::OffsetDateTime::parse(&plain, &time::format_description::well_known::Rfc3339).ok()
}

fn strip_ansi(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0x1b {
            while i < bytes.len() && bytes[i] != b'm' {
                i += 1;
            }
        } else {
            out.push(bytes[i]);
        }
        i += 1;
    }
    out
}

/// Two replicas on one Redis with a fleet rotating 10 s certificates under
/// traffic. The leader is killed with -9 in the middle of 1 000 signings
/// spread over both: the other takes over, every answered signing is
/// recorded, no serial appears twice, every cert dir stays valid, rotation
/// goes on, and not one request through the sidecars fails.
#[test]
fn a_killed_leader_is_replaced_and_nothing_answered_is_lost() {
    let pki = Pki::new(&[]);
    let redis = RedisServer::start(&pki.path("redis"));
    let (api, web) = (pki.path("certs/api"), pki.path("certs/web"));
    let ids = identity("api", "10s", &api, "dns = [\"api\", \"localhost\"]") + &identity("web", "10s", &web, "");
    let a = replica(&pki, &redis.url(), &ids);
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "a leads", || role(&pki, &a) == "leader");
    let b = replica(&pki, &redis.url(), &ids);
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "b follows", || role(&pki, &b) == "follower");
    assert_eq!(health(&pki, &b)["redis"], "healthy");
    wait_until(Duration::from_secs(20), "first issue", || serial_of(&api).is_some() && serial_of(&web).is_some());
    let Mesh { inbound: _, inb: _inb, out: _out, addr } = Mesh::start(&pki, &api, &web);
    let traffic = Traffic::start(addr);

    let work = pki.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let csr_pem = csr(&work, "burst", "DNS:burst");
    let tokens = redis_tokens(&pki, &redis.url(), 1000);
    let urls = [a.url("/v1/sign"), b.url("/v1/sign")];
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let handles: Vec<_> = tokens
        .chunks(250)
        .enumerate()
        .map(|(i, chunk)| {
            let (chunk, urls, csr_pem, answered, root) =
                (chunk.to_vec(), urls.clone(), csr_pem.clone(), answered.clone(), pki.state().join("root.pem"));
            std::thread::spawn(move || {
                for (j, t) in chunk.iter().enumerate() {
                    if let Some(serial) = sign(&root, &urls[(i + j) % 2], t, &csr_pem) {
                        answered.lock().unwrap().push(serial);
                    }
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(120), "burst under way", || answered.lock().unwrap().len() >= 300);
    let killed_at = std::time::Instant::now();
    run_ok(Command::new("kill").args(["-9", &a.pid().to_string()]));
    poll_until(Duration::from_secs(30), Duration::from_millis(50), "b takes over", || role(&pki, &b) == "leader");
    let takeover = killed_at.elapsed();
    for h in handles {
        h.join().unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let unique: HashSet<&String> = answered.iter().collect();
    assert_eq!(unique.len(), answered.len(), "no serial answered twice");
    let recorded: HashSet<String> = redis.cli(&["ZRANGE", "issued", "0", "-1"]).lines().map(str::to_owned).collect();
    let missing: Vec<&String> = answered.iter().filter(|s| !recorded.contains(*s)).collect();
    assert!(missing.is_empty(), "every answered signing is recorded; missing: {missing:?}");

    // Rotation goes on under b, and the cert dirs stay valid sets.
    let before = (serial_of(&api), serial_of(&web));
    wait_until(Duration::from_secs(30), "rotation continues under the new leader", || {
        serial_of(&api).is_some_and(|s| Some(&s) != before.0.as_ref())
            && serial_of(&web).is_some_and(|s| Some(&s) != before.1.as_ref())
    });
    let requests = traffic.finish();
    assert!(b.log_text().contains("became leader"), "{}", b.log_text());
    eprintln!(
        "{} signings answered across the kill ({} by the survivor's store), b led {:.1} s after the kill (lease 3 s), {requests} requests through the sidecars, none failed",
        answered.len(),
        recorded.len(),
        takeover.as_secs_f64()
    );
}

/// An order placed by replica A is validated through replica B: Pebble's
/// HTTP-01 request goes to B, which answers from the store. While the
/// order is pending, `challenge:TOKEN` has a TTL of at most 3600 s; it is
/// gone afterwards. The certificate object and the sealed ACME account are
/// what the documents say.
#[test]
fn an_order_placed_by_one_replica_is_validated_through_another() {
    let pki = Pki::new(&[]);
    let redis = RedisServer::start(&pki.path("redis"));
    let (b_https, b_http) = (free_port(), free_port());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, i64)>::new()));
    let (seen_hook, redis_port) = (seen.clone(), redis.port);
    // Pebble validates on `validation_port`: a proxy that, before it lets
    // each validation through to B, reads the challenge keys in Redis.
    let _to_b = Proxy::start(SocketAddr::from(([127, 0, 0, 1], b_http)), move || {
        let cli = |args: &[&str]| {
            text(&run(Command::new("redis-cli").args(["-p", &redis_port.to_string(), "--raw"]).args(args)).stdout)
        };
        for key in cli(&["KEYS", "challenge:*"]).lines() {
            // -2: removed between KEYS and TTL (the order completed).
            let ttl: i64 = cli(&["TTL", key]).trim().parse().unwrap_or(-3);
            if ttl != -2 {
                seen_hook.lock().unwrap().push((key.to_owned(), ttl));
            }
        }
    });
    let proxy_listen = _to_b.addr.port();
    let pebble = Pebble::start(pki.tmp.path(), proxy_listen, free_port(), 3600, &[]);
    let out = pki.state().join("public/www");
    let acme = format!(
        "[acme]\ndirectory_roots = {:?}\n[[public]]\nname = \"www\"\ndomains = [\"www.example.test\"]\nemail = \"ops@example.test\"\ndirectory_url = \"{}\"\nchallenge = \"http-01\"\n",
        pebble.tls_ca(),
        pebble.directory()
    );
    let a = replica(&pki, &redis.url(), &acme);
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "a leads", || role(&pki, &a) == "leader");
    let b = replica_on(&pki, &redis.url(), b_https, b_http, &acme);
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "b follows", || role(&pki, &b) == "follower");
    wait_until(Duration::from_secs(90), "the certificate is issued", || serial_of(&out).is_some());

    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "a validation reached B while its challenge was pending");
    for (key, ttl) in &seen {
        assert!((1..=3600).contains(ttl), "{key} has TTL {ttl} while pending");
    }
    assert!(redis.cli(&["KEYS", "challenge:*"]).trim().is_empty(), "challenges are gone after the order");
    assert!(a.log_text().contains("became leader"), "{}", a.log_text());
    let cert: Value = serde_json::from_str(&redis.cli(&["GET", "cert:www"])).unwrap();
    for field in ["cert_name", "domains", "status", "expires_at", "fingerprint", "next_attempt"] {
        assert!(cert.get(field).is_some(), "cert:www has {field}: {cert}");
    }
    assert_eq!(cert["status"], "valid");
    let accounts = redis.cli(&["KEYS", "account:*"]);
    let account_key = accounts.lines().next().expect("an account key");
    assert!(account_key.ends_with(":ops@example.test"), "{account_key}");
    let account = redis.cli(&["GET", account_key]);
    assert!(account.starts_with("sealed:v1:") && !account.contains("PRIVATE"), "the account key is sealed: {account}");
}

/// Redis killed with -9 mid-run and restarted from its AOF: nothing
/// acknowledged before the kill is lost. While it is down, health is
/// degraded, a signing gets 503, and the sidecars serve on; afterwards
/// everything recovers by itself.
#[test]
fn redis_crashing_loses_nothing_acknowledged_and_sidecars_serve_on() {
    let pki = Pki::new(&[]);
    let mut redis = RedisServer::start(&pki.path("redis"));
    let (api, web) = (pki.path("certs/api"), pki.path("certs/web"));
    let ids = identity("api", "20s", &api, "dns = [\"api\", \"localhost\"]") + &identity("web", "20s", &web, "");
    let server = replica(&pki, &redis.url(), &ids);
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "leader", || role(&pki, &server) == "leader");
    wait_until(Duration::from_secs(20), "first issue", || serial_of(&api).is_some() && serial_of(&web).is_some());
    let Mesh { inbound: _, inb: _inb, out: _out, addr } = Mesh::start(&pki, &api, &web);
    let traffic = Traffic::start(addr);
    let work = pki.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let csr_pem = csr(&work, "burst", "DNS:burst");
    let tokens = redis_tokens(&pki, &redis.url(), 40);
    let root = pki.state().join("root.pem");
    let url = server.url("/v1/sign");
    let acked: Vec<String> = tokens[..20].iter().filter_map(|t| sign(&root, &url, t, &csr_pem)).collect();
    assert_eq!(acked.len(), 20, "signings before the crash");

    redis.kill();
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "health degraded", || {
        let h = health(&pki, &server);
        h["status"] == "degraded" && h["redis"] == "unhealthy"
    });
    let body = json!({"token": tokens[20], "csr": csr_pem}).to_string();
    let (status, reply) = curl_api(&pki, "POST", &url, Some(&body), None);
    assert_eq!(status, 503, "a write while Redis is down: {reply}");
    assert!(reply.contains("redis"), "the refusal says why: {reply}");
    // The sidecars serve on while Redis is down (requests keep flowing).
    let (during, _) = (ping(addr).unwrap(), ());
    assert_eq!(during, "ping\n");

    redis.restart();
    poll_until(Duration::from_secs(30), Duration::from_millis(100), "health recovers", || {
        health(&pki, &server)["redis"] == "healthy"
    });
    let recorded: HashSet<String> = redis.cli(&["ZRANGE", "issued", "0", "-1"]).lines().map(str::to_owned).collect();
    for s in &acked {
        assert!(recorded.contains(s), "acknowledged serial {s} survived the crash");
    }
    assert!(sign(&root, &url, &tokens[21], &csr_pem).is_some(), "signing works again");
    let before = serial_of(&api);
    wait_until(Duration::from_secs(30), "rotation resumes", || {
        serial_of(&api).is_some_and(|s| Some(&s) != before.as_ref())
    });
    traffic.finish();
}

/// The leader cut off from Redis (through a proxy the test controls) steps
/// down before its lease could be taken over: its "stepping down" comes
/// before the other replica's "became leader", and the new lease's fencing
/// token is greater, so a late write with the old one would be refused.
#[test]
fn a_partitioned_leader_steps_down_before_another_takes_over() {
    let pki = Pki::new(&[]);
    let redis = RedisServer::start(&pki.path("redis"));
    let to_redis = Proxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port)), || {});
    let a = replica(&pki, &format!("redis://{}", to_redis.addr), "");
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "a leads", || role(&pki, &a) == "leader");
    let first_token: u64 = redis.cli(&["GET", "leader:token"]).trim().parse().unwrap();
    let b = replica(&pki, &redis.url(), "");
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "b follows", || role(&pki, &b) == "follower");

    to_redis.cut();
    poll_until(Duration::from_secs(30), Duration::from_millis(100), "b takes over", || role(&pki, &b) == "leader");
    let stepped_down = logged_at(&a.log_text(), "stepping down").expect("a logs that it steps down");
    let took_over = logged_at(&b.log_text(), "became leader").expect("b logs that it leads");
    assert!(stepped_down < took_over, "a stepped down at {stepped_down}, before b led at {took_over}");
    let token: u64 = redis.cli(&["GET", "leader:token"]).trim().parse().unwrap();
    assert!(token > first_token, "the new lease's fencing token {token} is greater than {first_token}");
    assert_eq!(role(&pki, &a), "follower");
    assert_eq!(health(&pki, &a)["status"], "degraded", "a cannot reach Redis: {}", health(&pki, &a));

    to_redis.heal();
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "a reaches Redis again", || {
        health(&pki, &a)["redis"] == "healthy"
    });
    assert_eq!(role(&pki, &a), "follower", "b keeps the lease");
    eprintln!("a stepped down {} ms before b led", (took_over - stepped_down).whole_milliseconds());
}

/// `ca store copy` moves a CA with 1 000 issued certificates, revocations
/// and a public certificate from SQLite to Redis and back, checked by
/// count and checksum; a sidecar keeps verifying across the move.
#[test]
fn a_ca_moves_between_sqlite_and_redis_without_reissuing() {
    let pki = Pki::new(&[]);
    let redis = RedisServer::start(&pki.path("redis"));
    let names: Vec<String> = (0..1000).map(|i| format!("svc{i}")).collect();
    let out = pki.path("issued");
    run_ok(ca().arg("issue").args(&names).arg("--state").arg(pki.state()).arg("--out").arg(&out));
    let (api, web) = (pki.path("certs/api"), pki.path("certs/web"));
    let ids = identity("api", "20s", &api, "dns = [\"api\", \"localhost\"]") + &identity("web", "20s", &web, "");
    let embedded = CaServer::start(&pki, &ids);
    wait_until(Duration::from_secs(20), "first issue", || serial_of(&api).is_some() && serial_of(&web).is_some());
    for name in ["svc1", "svc2", "svc3"] {
        let body = json!({"identity": name}).to_string();
        let (status, reply) =
            curl_api(&pki, "POST", &embedded.url("/v1/revoke"), Some(&body), Some(&pki.state().join("admin")));
        assert_eq!(status, 200, "{reply}");
    }
    let www = pki.issue("www", &["--dns", "www.example.test"]);
    run_ok(
        ca().args(["upload", "www", "--cert"])
            .arg(www.join("cert.pem"))
            .arg("--key")
            .arg(www.join("key.pem"))
            .arg("--state")
            .arg(pki.state()),
    );
    let Mesh { inbound: _, inb: _inb, out: _out, addr } = Mesh::start(&pki, &api, &web);
    let traffic = Traffic::start(addr);
    drop(embedded);

    let copied = text(
        &run_ok(ca().args(["store", "copy", "--from", "sqlite", "--to", &redis.url(), "--state"]).arg(pki.state()))
            .stdout,
    );
    let counts = |s: &str| s.split(": ").nth(1).unwrap_or_default().trim().to_owned();
    let certificates: usize = counts(&copied).split(' ').next().unwrap_or_default().parse().unwrap_or(0);
    assert!(certificates >= 1000, "{copied}");
    assert!(copied.contains("(3 revoked)"), "{copied}");
    let on_redis = replica(&pki, &redis.url(), &ids);
    let before = serial_of(&api);
    wait_until(Duration::from_secs(30), "rotation on Redis", || {
        serial_of(&api).is_some_and(|s| Some(&s) != before.as_ref())
    });
    let (_, list) = curl_api(&pki, "GET", &on_redis.url("/certificates"), None, Some(&pki.state().join("admin")));
    assert!(list.contains("\"www\""), "the public certificate moved: {list}");
    drop(on_redis);

    // And back, into an empty SQLite store of a copy of the state.
    let back = pki.path("back");
    std::fs::create_dir_all(&back).unwrap();
    for f in ["ca.json", "root.pem", "root-key.pem", "intermediate.pem", "intermediate-key.pem", "store.key"] {
        std::fs::copy(pki.state().join(f), back.join(f)).unwrap();
    }
    let redis_now = text(
        &run_ok(ca().args(["store", "copy", "--from", &redis.url(), "--to", "sqlite", "--state"]).arg(&back)).stdout,
    );
    let fresh = RedisServer::start(&pki.path("redis2"));
    let round = text(
        &run_ok(ca().args(["store", "copy", "--from", "sqlite", "--to", &fresh.url(), "--state"]).arg(&back)).stdout,
    );
    assert_eq!(
        counts(&round),
        counts(&redis_now),
        "SQLite -> Redis -> SQLite -> Redis keeps every record and checksum"
    );
    traffic.finish();
    eprintln!("copied: {copied}");
}

/// `rediss://`: a Redis serving a certificate from the fleet's own CA is
/// trusted as it is (rustls on aws-lc-rs; no ring in the build), by the
/// CLI and by `ca serve`; a Redis whose certificate the CA does not trust
/// is refused with a clear error.
#[test]
fn rediss_with_a_certificate_from_the_fleet_ca() {
    let pki = Pki::new(&[]);
    let certs = pki.issue("redis", &["--dns", "localhost", "--ip", "127.0.0.1"]);
    let redis = RedisServer::start_tls(&pki.path("redis"), &certs);
    let token = text(&run_ok(ca().args(["token", "web", "--store", &redis.url(), "--state"]).arg(pki.state())).stdout);
    assert!(!token.trim().is_empty());
    let server = replica(&pki, &redis.url(), "");
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "it leads over TLS", || {
        role(&pki, &server) == "leader"
    });
    assert_eq!(health(&pki, &server)["redis"], "healthy");

    let stranger = Pki::new(&[]);
    let err = run_err(ca().args(["token", "web", "--store", &redis.url(), "--state"]).arg(stranger.state()));
    assert!(err.contains("redis store rediss://localhost") && err.contains("certificate"), "{err}");
}

/// Replicas on different hosts share no state directory: the store holds
/// the CA (keys sealed), a new replica copies it, and an intermediate
/// rolled over through one replica reaches the others.
#[test]
fn replicas_without_a_shared_directory_share_the_ca_through_the_store() {
    let pki = Pki::new(&[]);
    let redis = RedisServer::start(&pki.path("redis"));
    let a = replica(&pki, &redis.url(), "");
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "a leads", || role(&pki, &a) == "leader");
    let elsewhere = pki.path("host-b/state");
    // The one thing the replicas share besides Redis: the store key (a secret).
    let key = format!("store_key = {:?}\n", pki.state().join("store.key"));
    let b = replica_in(&pki, &elsewhere, &redis.url(), free_port(), free_port(), &key);
    poll_until(Duration::from_secs(20), Duration::from_millis(100), "b follows", || role(&pki, &b) == "follower");
    let read = |dir: &Path, f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    assert_eq!(read(&elsewhere, "root.pem"), read(&pki.state(), "root.pem"), "b copied the CA");
    assert_eq!(read(&elsewhere, "intermediate-key.pem"), read(&pki.state(), "intermediate-key.pem"));
    let sealed = redis.cli(&["GET", "ca_key:intermediate-key.pem"]);
    assert!(sealed.starts_with("sealed:v1:") && !sealed.contains("PRIVATE"), "the CA's keys are sealed: {sealed}");

    run_ok(ca().args(["intermediate", "roll", "--store", &redis.url(), "--state"]).arg(pki.state()));
    let rolled = read(&pki.state(), "intermediate.pem");
    wait_until(Duration::from_secs(30), "the new intermediate reaches b", || {
        read(&elsewhere, "intermediate.pem") == rolled
    });
    let work = pki.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let token =
        text(&run_ok(ca().args(["token", "burst", "--store", &redis.url(), "--state"]).arg(pki.state())).stdout);
    let csr_pem = csr(&work, "burst", "DNS:burst");
    let (status, body) = curl_api(
        &pki,
        "POST",
        &b.url("/v1/sign"),
        Some(&json!({"token": token.trim(), "csr": csr_pem}).to_string()),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    let chain = reply["certificate"].as_str().unwrap();
    assert!(chain.contains(rolled.trim().lines().nth(1).unwrap()), "b signs from the rolled intermediate");
}
