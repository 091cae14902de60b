//! Hostile load against the serving layer: thousands of connections that
//! send nothing, or dribble a ClientHello or request headers a byte at a
//! time, against the edge (HTTPS and HTTP), the CA's API and HTTP
//! listeners, and a mesh listener. A normal client keeps being served, the
//! slow connections are closed once their timeout passes, and memory stays
//! bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard_sidecar::certdir::CertDir;
use lanyard_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connections per listener.
const CONNECTIONS: usize = 2000;
/// Handshake and header-read timeout of every server in this test.
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long the test waits for the servers to close every slow connection.
const PATIENCE: Duration = Duration::from_secs(40);

/// The first bytes of a TLS ClientHello (a record of 512 bytes announced).
const CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03lanyard-slowloris-random-bytes-32";
/// A request head that never ends.
const SLOW_HEAD: &[u8] =
    b"GET / HTTP/1.1\r\nHost: www.example.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// How an attacking connection behaves.
#[derive(Clone, Copy)]
enum Attack {
    /// Connects and sends nothing.
    Silent,
    /// Sends these bytes one every 200 ms.
    Dribble(&'static [u8]),
    /// Completes a TLS handshake, then dribbles a request head.
    TlsThenDribble,
}

/// What one flood against one listener came to.
struct Outcome {
    closed: usize,
    /// Seconds from connect to the server closing, per closed connection.
    lifetimes: Vec<f64>,
    normal_ok: usize,
    normal_failed: Vec<String>,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    /// Connections the server had not closed after `PATIENCE`, by kind of attack.
    still_open: Vec<usize>,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// One attacking connection: how long until the server closed it, or
/// `None` when it was still open after `PATIENCE`.
async fn attacker(addr: SocketAddr, attack: Attack, tls: Option<Arc<rustls::ClientConfig>>) -> Option<f64> {
    let start = Instant::now();
    let tcp = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => break tcp,
            Err(_) if start.elapsed() < PATIENCE => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("connect to {addr}: {e}"),
        }
    };
    let opened = Instant::now();
    let mut stream: Box<dyn Stream> = match (attack, tls) {
        (Attack::TlsThenDribble, Some(config)) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
                Ok(tls) => Box::new(tls),
                Err(e) => panic!("TLS handshake with {addr}: {e}"),
            }
        }
        _ => Box::new(tcp),
    };
    let bytes: &[u8] = match attack {
        Attack::Silent => b"",
        Attack::Dribble(b) => b,
        Attack::TlsThenDribble => SLOW_HEAD,
    };
    let mut sent = 0;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::from_std(opened + PATIENCE);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(opened.elapsed().as_secs_f64()),
                // An alert or an error page before closing is fine.
                Ok(_) => {}
            },
            _ = tick.tick(), if sent < bytes.len() => {
                if stream.write_all(&bytes[sent..sent + 1]).await.is_err() {
                    return Some(opened.elapsed().as_secs_f64());
                }
                sent += 1;
            }
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Floods `addr` with `CONNECTIONS` connections split over `attacks`,
/// while `normal` is called every 200 ms; samples `pid`'s memory.
fn flood(
    addr: SocketAddr,
    attacks: &[Attack],
    tls: Option<Arc<rustls::ClientConfig>>,
    pid: u32,
    normal: &(dyn Fn() -> Result<(), String> + Sync),
) -> Outcome {
    let rss_before_kib = rss_kib(pid);
    let done = AtomicBool::new(false);
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let (outcome_normal, peak, lifetimes) = std::thread::scope(|s| {
        let normal_calls = s.spawn(|| {
            let (mut ok, mut failed) = (0, Vec::new());
            while !done.load(Ordering::Relaxed) {
                match normal() {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
                calls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
            (ok, failed)
        });
        let memory = s.spawn(|| {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let lifetimes: Vec<(usize, Option<f64>)> = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..CONNECTIONS {
                let (kind, tls) = (i % attacks.len(), tls.clone());
                let attack = attacks[kind];
                set.spawn(async move { (kind, attacker(addr, attack, tls).await) });
            }
            let mut all = Vec::new();
            while let Some(r) = set.join_next().await {
                all.push(r.expect("attacker task"));
            }
            all
        });
        // A normal call that began after the flood ended (the one in flight may not have), then stop.
        let after_flood = calls.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(20), "a normal call after the flood", || {
            calls.load(Ordering::Relaxed) > after_flood + 1
        });
        done.store(true, Ordering::Relaxed);
        (normal_calls.join().unwrap(), memory.join().unwrap(), lifetimes)
    });
    let closed: Vec<f64> = lifetimes.iter().filter_map(|(_, l)| *l).collect();
    let still_open: Vec<usize> =
        (0..attacks.len()).map(|k| lifetimes.iter().filter(|(kind, l)| *kind == k && l.is_none()).count()).collect();
    Outcome {
        closed: closed.len(),
        lifetimes: closed,
        normal_ok: outcome_normal.0,
        normal_failed: outcome_normal.1,
        rss_before_kib,
        rss_peak_kib: peak,
        still_open,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn check(what: &str, mut o: Outcome) {
    let grown = o.rss_peak_kib.saturating_sub(o.rss_before_kib);
    let max = o.lifetimes.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "{what}: {}/{CONNECTIONS} slow connections closed by the server, median {:.1} s, max {max:.1} s; \
         normal client {} ok, {} failed; RSS {} KiB -> peak {} KiB (+{grown} KiB)",
        o.closed,
        median(&mut o.lifetimes),
        o.normal_ok,
        o.normal_failed.len(),
        o.rss_before_kib,
        o.rss_peak_kib,
    );
    assert_eq!(
        o.closed, CONNECTIONS,
        "{what}: every slow connection is closed by the server; still open by kind of attack: {:?}",
        o.still_open
    );
    assert!(o.normal_failed.is_empty(), "{what}: the normal client failed: {:?}", &o.normal_failed[..1]);
    assert!(o.normal_ok >= 5, "{what}: only {} normal calls", o.normal_ok);
    assert!(grown < 256 * 1024, "{what}: memory grew by {grown} KiB under {CONNECTIONS} slow connections");
}

/// The value of one sample in a Prometheus text body; fails when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn curl_ok(args: &[&str], url: &str) -> Result<(), String> {
    let out = run(Command::new(peer("curl"))
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .args(args)
        .arg(url));
    match text(&out.stdout).as_str() {
        "200" | "308" => Ok(()),
        code => Err(format!("{url}: HTTP {code:?} {}", text(&out.stderr))),
    }
}

fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    lanyard_sidecar::install_crypto_provider();
    let set = CertDir::new(dir).load(time::OffsetDateTime::now_utc()).unwrap();
    Arc::new(lanyard_sidecar::tls::client_config(&set, &lanyard_sidecar::tls::ServerCheck::ChainOnly).unwrap())
}

#[test]
fn slow_and_silent_connections_are_cut_off_while_normal_clients_are_served() {
    let pki = Pki::new(&[]);
    let api = pki.issue("api", &["--dns", "localhost", "--ip", "127.0.0.1"]);
    let web = pki.issue("web", &[]);
    let app = http_upstream();
    let (mesh, edge_https, edge_http, admin) = (free_port(), free_port(), free_port(), free_port());
    let limits = format!("[limits]\nhandshake_timeout = \"{0}s\"\nheader_timeout = \"{0}s\"\n", TIMEOUT.as_secs());
    let config = pki.path("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "cert_dir = {api:?}\nadmin = \"127.0.0.1:{admin}\"\n{limits}\n\
             [[listener]]\nname = \"mesh\"\nmode = \"inbound\"\nlisten = \"127.0.0.1:{mesh}\"\nupstream = \"{app}\"\n\n\
             [[edge]]\nname = \"www\"\nhttps_listen = \"127.0.0.1:{edge_https}\"\nhttp_listen = \"127.0.0.1:{edge_http}\"\n\
             upstream = \"{app}\"\ncert_dirs = [{api:?}]\n"
        ),
    )
    .unwrap();
    let mut sidecar = Sidecar::start_at(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        &["--config", config.to_str().unwrap()],
        pki.path("sidecar.log"),
    );
    let ca_server = CaServer::start(&pki, &limits);
    let root = pki.state().join("root.pem");
    let root = root.to_str().unwrap();
    let tls = Some(client_config(&web));
    let at = |port: u16| -> SocketAddr { format!("127.0.0.1:{port}").parse().unwrap() };
    let hello = [Attack::Silent, Attack::Dribble(CLIENT_HELLO), Attack::TlsThenDribble];
    let plain = [Attack::Silent, Attack::Dribble(SLOW_HEAD)];

    let edge_url = format!("https://localhost:{edge_https}/");
    let o = flood(at(edge_https), &hello, tls.clone(), sidecar.pid(), &|| curl_ok(&["--cacert", root], &edge_url));
    check("edge HTTPS", o);
    let http_url = format!("http://127.0.0.1:{edge_http}/");
    let o = flood(at(edge_http), &plain, None, sidecar.pid(), &|| curl_ok(&[], &http_url));
    check("edge HTTP", o);
    let mesh_url = format!("https://localhost:{mesh}/");
    let cert = web.join("cert.pem");
    let key = web.join("key.pem");
    let client = ["--cacert", root, "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
    // The mesh pipes bytes after the handshake: the TLS-level attacks apply.
    let o = flood(at(mesh), &hello[..2], None, sidecar.pid(), &|| curl_ok(&client, &mesh_url));
    check("mesh listener", o);

    let health = ca_server.url("/health");
    let o = flood(at(ca_server.https_port), &hello, tls, ca_server.pid(), &|| curl_ok(&["--cacert", root], &health));
    check("CA API", o);
    let ca_http = format!("http://127.0.0.1:{}/", ca_server.http_port);
    let o = flood(at(ca_server.http_port), &plain, None, ca_server.pid(), &|| curl_ok(&[], &ca_http));
    check("CA HTTP", o);

    let (_, metrics) = sidecar.get("/metrics");
    let timed_out = |listener: &str| {
        sample(
            &metrics,
            &format!(
                "lanyard_sidecar_handshakes_total{{listener=\"{listener}\",result=\"rejected\",reason=\"timeout\"}}"
            ),
        )
    };
    // Every silent or dribbling TLS connection timed out in its handshake.
    assert!(timed_out("mesh") >= CONNECTIONS as f64, "{metrics}");
    assert!(timed_out("edge-www") >= (CONNECTIONS * 2 / 3) as f64, "{metrics}");
    // The edge's HTTP timeouts: a third over TLS, and all of the plain listener's.
    let header = sample(&metrics, "lanyard_sidecar_connection_timeouts_total{listener=\"edge-www\"}");
    assert!(header >= (CONNECTIONS + CONNECTIONS / 3) as f64, "{metrics}");
    sidecar.child().kill().ok();
}

#[test]
fn a_full_connection_cap_is_logged_and_frees_up_after_the_timeout() {
    let pki = Pki::new(&[]);
    let ca_server = CaServer::start(&pki, "[limits]\nmax_connections = 50\nhandshake_timeout = \"3s\"\n");
    let addr: SocketAddr = format!("127.0.0.1:{}", ca_server.https_port).parse().unwrap();
    let root = pki.state().join("root.pem");
    let health = ca_server.url("/health");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut silent = Vec::new();
        for _ in 0..80 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        wait_for_log(&ca_server.log, "connection cap reached");
        // Refused ones are closed at once; admitted ones at the handshake timeout.
        let mut buf = [0u8; 1];
        for mut s in silent {
            let _ = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await.expect("closed by the server");
        }
    });
    assert_eq!(curl_ok(&["--cacert", root.to_str().unwrap()], &health), Ok(()), "served again once the cap frees up");
    let (_, metrics) = curl_api(&pki, "GET", &ca_server.url("/metrics"), None, None);
    assert!(sample(&metrics, "lanyard_ca_connections_over_cap_total{listener=\"api\"}") >= 30.0, "{metrics}");
}

#[test]
fn a_full_mesh_listener_cap_is_logged_and_the_admin_counts_its_own_connections() {
    let pki = Pki::new(&[]);
    let api = pki.issue("api", &["--dns", "localhost", "--ip", "127.0.0.1"]);
    let web = pki.issue("web", &[]);
    let app = http_upstream();
    let (mesh, admin) = (free_port(), free_port());
    let config = pki.path("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "cert_dir = {api:?}\nadmin = \"127.0.0.1:{admin}\"\n\
             [limits]\nmax_connections = 50\nhandshake_timeout = \"3s\"\n\n\
             [[listener]]\nname = \"mesh\"\nmode = \"inbound\"\nlisten = \"127.0.0.1:{mesh}\"\nupstream = \"{app}\"\n"
        ),
    )
    .unwrap();
    let sidecar = Sidecar::start_at(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        &["--config", config.to_str().unwrap()],
        pki.path("sidecar.log"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{mesh}").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut silent = Vec::new();
        for _ in 0..80 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        wait_for_log(&pki.path("sidecar.log"), "connection cap reached");
        let mut buf = [0u8; 1];
        for mut s in silent {
            let _ = tokio::time::timeout(PATIENCE, s.read(&mut buf)).await.expect("closed by the sidecar");
        }
    });
    let log = sidecar.log_text();
    let line = log.lines().find(|l| l.contains("connection cap reached")).unwrap();
    assert!(line.contains("listener=mesh") && line.contains("cap=50"), "{line}");
    let root = pki.state().join("root.pem");
    let (cert, key) = (web.join("cert.pem"), web.join("key.pem"));
    let client = ["--cacert", root.to_str().unwrap(), "--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
    assert_eq!(curl_ok(&client, &format!("https://localhost:{mesh}/")), Ok(()), "served again once the cap frees up");
    let (_, metrics) = sidecar.get("/metrics");
    let over = "lanyard_sidecar_connections_over_cap_total{listener=\"mesh\"}";
    assert!(sample(&metrics, over) >= 30.0, "{metrics}");
    // The scrape itself is an open connection of the admin listener.
    assert!(sample(&metrics, "lanyard_sidecar_active_connections{listener=\"admin\"}") >= 1.0, "{metrics}");
}
