//! `loadgen`: the benchmarks' TLS load generator (tokio-rustls, aws-lc-rs,
//! one thread: pin it to the load CPU with `taskset`).
//!
//! Every mode takes `--connect ADDR`, and for TLS `--server-name NAME
//! --cert-dir DIR`: it presents the cert dir's chain and verifies the
//! server against its `ca.pem`, over TLS 1.3 with resumption off unless
//! `--resume` is given (`--no-client-cert` presents none). Without
//! `--cert-dir` it speaks plain TCP (the bare backend). `--groups pq|classical` offers only X25519MLKEM768 or X25519.
//!
//! - `handshakes [--seconds S] [--concurrency C]`: full handshakes on new
//!   connections; each must negotiate the group asked for.
//!   Prints `handshakes=N errors=E seconds=S group=G`.
//! - `keepalive [--path P] [--seconds S] [--connections C]`: HTTP/1.1 GETs
//!   on C keep-alive connections. Prints `requests=N errors=E seconds=S
//!   rps=R p50_ms= p99_ms= p999_ms= body_mbps=`.
//! - `hold --connections N --ready FILE`: opens N connections, writes how
//!   many are open to FILE, then holds them until killed.
//! - `probe [--path P]`: one GET; exit 0 on a 200. Prints the status line
//!   and the negotiated version and group.
//! - `crypto --server-dir DIR`: the crypto bound of the same handshake on
//!   this core, as the server does it with aws-lc-rs: the key exchange
//!   (`--groups`), the server's CertificateVerify signature (`--server-dir`'s
//!   key), the client chain (`--cert-dir`'s leaf → intermediate → root, and
//!   the leaf alone from an intermediate verified before) and the client's
//!   CertificateVerify. Prints `kx_us= sign_us= chain_us= leaf_us=
//!   client_verify_us= total_us= bound_hs_per_s=`; the total counts the leaf
//!   alone, as the sidecar verifies peers of its own intermediate.
//! - `reload --ca-bin CA --state STATE --out DIR [--times N]`: N times runs
//!   `ca issue server` into DIR, handshaking meanwhile until a new
//!   certificate is served. Prints `p50_ms= p99_ms= max_ms= n=` of (the end
//!   of the first handshake serving it − the `..data` swap, from the swapped
//!   link's mtime). `ca issue` goes on after its swap (old generations
//!   removed, the process torn down) for 4 to 60 ms here, so timing from its
//!   exit measured `ca issue`, not the reload.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use lanyard_sidecar::certdir::CertDir;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const USAGE: &str = "usage: loadgen handshakes|keepalive|hold|probe|reload|crypto --connect ADDR \
    [--server-name NAME --cert-dir DIR] [--groups pq|classical] [--resume] [--no-client-cert] [--seconds S] \
    [--concurrency C] [--connections C] [--path P] [--ready FILE] [--ca-bin CA --state DIR --out DIR --times N] [--server-dir DIR]";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Handshakes,
    Keepalive,
    Hold,
    Probe,
    Reload,
    Crypto,
}

struct Args {
    mode: Mode,
    connect: SocketAddr,
    server_name: Option<ServerName<'static>>,
    cert_dir: Option<CertDir>,
    group: &'static dyn rustls::crypto::SupportedKxGroup,
    resume: bool,
    client_cert: bool,
    seconds: f64,
    concurrency: usize,
    path: String,
    ready: Option<std::path::PathBuf>,
    ca_bin: Option<String>,
    state: Option<String>,
    out: Option<CertDir>,
    server_dir: Option<CertDir>,
    times: usize,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let [mode, rest @ ..] = args else { return Err(USAGE.into()) };
    let mode = match mode.as_str() {
        "handshakes" => Mode::Handshakes,
        "keepalive" => Mode::Keepalive,
        "hold" => Mode::Hold,
        "probe" => Mode::Probe,
        "reload" => Mode::Reload,
        "crypto" => Mode::Crypto,
        other => return Err(format!("unknown mode {other:?}\n{USAGE}")),
    };
    let mut a = Args {
        mode,
        connect: "0.0.0.0:0".parse().expect("valid"),
        server_name: None,
        cert_dir: None,
        group: kx_group::X25519MLKEM768,
        resume: false,
        client_cert: true,
        seconds: 5.0,
        concurrency: 4,
        path: "/".into(),
        ready: None,
        ca_bin: None,
        state: None,
        out: None,
        server_dir: None,
        times: 20,
    };
    let mut connect = None;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--resume" => {
                a.resume = true;
                continue;
            }
            "--no-client-cert" => {
                a.client_cert = false;
                continue;
            }
            _ => {}
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |what: &str| format!("{flag} {value:?}: not a {what}");
        match flag.as_str() {
            "--connect" => connect = Some(value.parse().map_err(|e| format!("--connect {value:?}: {e}"))?),
            "--server-name" => {
                a.server_name =
                    Some(ServerName::try_from(value.clone()).map_err(|e| format!("--server-name {value:?}: {e}"))?)
            }
            "--cert-dir" => a.cert_dir = Some(CertDir::new(value)),
            "--groups" => {
                a.group = match value.as_str() {
                    "pq" => kx_group::X25519MLKEM768,
                    "classical" => kx_group::X25519,
                    other => return Err(format!("--groups {other:?}: pq or classical")),
                }
            }
            "--seconds" => a.seconds = value.parse().map_err(|_| number("number of seconds"))?,
            "--concurrency" | "--connections" => a.concurrency = value.parse().map_err(|_| number("count"))?,
            "--times" => a.times = value.parse().map_err(|_| number("count"))?,
            "--path" => a.path = value.clone(),
            "--ready" => a.ready = Some(value.into()),
            "--ca-bin" => a.ca_bin = Some(value.clone()),
            "--state" => a.state = Some(value.clone()),
            "--out" => a.out = Some(CertDir::new(value)),
            "--server-dir" => a.server_dir = Some(CertDir::new(value)),
            other => return Err(format!("unknown flag {other:?}\n{USAGE}")),
        }
    }
    if a.mode == Mode::Crypto {
        if a.cert_dir.is_none() || a.server_dir.is_none() {
            return Err("crypto needs --cert-dir (the client's) and --server-dir".into());
        }
        return Ok(a);
    }
    a.connect = connect.ok_or("--connect is required")?;
    if a.cert_dir.is_some() != a.server_name.is_some() {
        return Err("--cert-dir and --server-name go together (neither: plain TCP)".into());
    }
    if matches!(a.mode, Mode::Handshakes | Mode::Reload) && a.cert_dir.is_none() {
        return Err("handshakes and reload need --cert-dir and --server-name".into());
    }
    if a.mode == Mode::Hold && a.ready.is_none() {
        return Err("hold needs --ready FILE".into());
    }
    if a.mode == Mode::Reload && (a.ca_bin.is_none() || a.state.is_none() || a.out.is_none()) {
        return Err("reload needs --ca-bin, --state and --out".into());
    }
    Ok(a)
}

fn client_config(args: &Args, dir: &CertDir) -> Result<rustls::ClientConfig, String> {
    let set = dir.load(time::OffsetDateTime::now_utc()).map_err(|e| format!("{}: {e}", dir.path().display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for root in &set.roots {
        roots.add(root.clone()).map_err(|e| e.to_string())?;
    }
    let provider =
        rustls::crypto::CryptoProvider { kx_groups: vec![args.group], ..rustls::crypto::aws_lc_rs::default_provider() };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = if args.client_cert {
        builder.with_client_auth_cert(set.chain.clone(), set.key.clone_key()).map_err(|e| e.to_string())?
    } else {
        builder.with_no_client_auth()
    };
    if !args.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

/// Where and how to connect: plain TCP, or TLS with a client certificate.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    /// The `Host` header: the server name, or `localhost` over plain TCP.
    host: String,
    tls: Option<(ServerName<'static>, Arc<rustls::ClientConfig>)>,
}

/// A connection, plain or TLS, so the modes are written once.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One established connection and what its handshake negotiated.
struct Connection {
    stream: Box<dyn Stream>,
    group: Option<rustls::NamedGroup>,
    version: Option<rustls::ProtocolVersion>,
    /// The server's leaf certificate (TLS only).
    leaf: Option<Vec<u8>>,
}

impl Target {
    async fn connect(&self) -> Result<Connection, String> {
        let tcp = TcpStream::connect(self.addr).await.map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let Some((name, config)) = &self.tls else {
            return Ok(Connection { stream: Box::new(tcp), group: None, version: None, leaf: None });
        };
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let state = tls.get_ref().1;
        Ok(Connection {
            group: state.negotiated_key_exchange_group().map(|g| g.name()),
            version: state.protocol_version(),
            leaf: state.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()),
            stream: Box::new(tls),
        })
    }
}

/// Sends `request`, reads one whole response (by `Content-Length`) into
/// `buf`; returns the status and the body's length.
async fn exchange(stream: &mut dyn Stream, request: &[u8], buf: &mut [u8]) -> Result<(u16, usize), String> {
    stream.write_all(request).await.map_err(|e| format!("send: {e}"))?;
    let mut filled = 0;
    let (status, head, length) = loop {
        let n = stream.read(&mut buf[filled..]).await.map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf[..filled]).map_err(|e| format!("malformed response: {e}"))? {
            httparse::Status::Complete(head) => {
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                    .ok_or("the response has no Content-Length: keep-alive needs one")?;
                break (response.code.unwrap_or(0), head, length);
            }
            httparse::Status::Partial if filled == buf.len() => return Err("response headers too large".into()),
            httparse::Status::Partial => {}
        }
    };
    let mut rest = length.saturating_sub(filled - head);
    while rest > 0 {
        let want = rest.min(buf.len());
        let n = stream.read(&mut buf[..want]).await.map_err(|e| format!("receive body: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection mid-body".into());
        }
        rest -= n;
    }
    Ok((status, length))
}

/// A GET of `path` for `host` (a virtual host must match it: Caddy answers others with an empty 200).
fn request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes()
}

fn latency_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// What one keep-alive connection measured.
struct Measured {
    latency_us: Histogram<u64>,
    body_bytes: u64,
    error: Option<String>,
}

async fn keepalive_one(target: Target, path: String, until: Instant) -> Measured {
    let mut m = Measured { latency_us: latency_histogram(), body_bytes: 0, error: None };
    let mut conn = match target.connect().await {
        Ok(c) => c,
        Err(e) => {
            m.error = Some(e);
            return m;
        }
    };
    let (request, mut buf) = (request(&target.host, &path), vec![0u8; 256 * 1024]);
    while Instant::now() < until {
        let started = Instant::now();
        match exchange(conn.stream.as_mut(), &request, &mut buf).await {
            Ok((200, length)) => {
                m.latency_us.saturating_record(started.elapsed().as_micros() as u64);
                m.body_bytes += length as u64;
            }
            Ok((status, _)) => {
                m.error = Some(format!("GET {path} answered {status}"));
                break;
            }
            Err(e) => {
                m.error = Some(e);
                break;
            }
        }
    }
    m
}

async fn keepalive(args: &Args, target: Target) -> Result<String, String> {
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> =
        (0..args.concurrency).map(|_| tokio::spawn(keepalive_one(target.clone(), args.path.clone(), until))).collect();
    let (mut latency, mut body, mut errors, mut first_error) = (latency_histogram(), 0, 0, None);
    for task in tasks {
        let m = task.await.map_err(|e| e.to_string())?;
        latency.add(&m.latency_us).map_err(|e| e.to_string())?;
        body += m.body_bytes;
        if let Some(e) = m.error {
            errors += 1;
            first_error.get_or_insert(e);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(e) = &first_error {
        eprintln!("loadgen: first error: {e}");
    }
    if latency.is_empty() {
        return Err("no request was answered".into());
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e3;
    Ok(format!(
        "requests={} errors={errors} seconds={seconds:.3} rps={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} body_mbps={:.1}",
        latency.len(),
        latency.len() as f64 / seconds,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        body as f64 / seconds / 1e6
    ))
}

async fn handshakes(args: &Args, target: Target) -> Result<String, String> {
    let want = args.group.name();
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
                while Instant::now() < until {
                    let done = target.connect().await.and_then(|c| match c.group {
                        Some(g) if g == want => Ok(c),
                        got => Err(format!("negotiated {got:?}, not {want:?}")),
                    });
                    match done {
                        Ok(mut c) => {
                            ok += 1;
                            let _ = c.stream.shutdown().await;
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (ok, errors, first_error)
            })
        })
        .collect();
    let (mut ok, mut errors, mut first_error) = (0, 0, None);
    for task in tasks {
        let (o, e, f) = task.await.map_err(|e| e.to_string())?;
        (ok, errors) = (ok + o, errors + e);
        first_error = first_error.or(f);
    }
    if let Some(e) = &first_error {
        eprintln!("loadgen: first error: {e}");
    }
    if ok == 0 {
        return Err("no handshake completed".into());
    }
    let group = lanyard_sidecar::tls::group_label(Some(want));
    Ok(format!("handshakes={ok} errors={errors} seconds={:.3} group={group}", started.elapsed().as_secs_f64()))
}

async fn hold(args: &Args, target: Target) -> Result<String, String> {
    let ready = args.ready.as_ref().expect("checked by parse");
    let mut held = Vec::with_capacity(args.concurrency);
    let mut first_error = None;
    // 16 handshakes at a time, as a client fleet would open them.
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..args.concurrency {
        if i >= 16 {
            if let Some(done) = pending.join_next().await {
                match done.map_err(|e| e.to_string())? {
                    Ok(c) => held.push(c),
                    Err(e) => drop(first_error.get_or_insert(e)),
                }
            }
        }
        let target = target.clone();
        pending.spawn(async move { target.connect().await });
    }
    while let Some(done) = pending.join_next().await {
        match done.map_err(|e| e.to_string())? {
            Ok(c) => held.push(c),
            Err(e) => drop(first_error.get_or_insert(e)),
        }
    }
    if let Some(e) = &first_error {
        eprintln!(
            "loadgen: {} of {} connections failed; first error: {e}",
            args.concurrency - held.len(),
            args.concurrency
        );
    }
    let tmp = ready.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", held.len())).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, ready).map_err(|e| format!("{}: {e}", ready.display()))?;
    // Held until killed.
    let _held = held;
    std::future::pending().await
}

async fn probe(args: &Args, target: Target) -> Result<String, String> {
    let mut conn = target.connect().await?;
    let mut buf = vec![0u8; 4 * 1024 * 1024];
    let (status, length) = exchange(conn.stream.as_mut(), &request(&target.host, &args.path), &mut buf).await?;
    let tls = match (conn.version, conn.group) {
        (Some(v), g) => format!(" [{v:?} {}]", lanyard_sidecar::tls::group_label(g)),
        _ => String::new(),
    };
    if status != 200 {
        return Err(format!("GET {} answered {status}{tls}", args.path));
    }
    Ok(format!("status={status} body={length}{tls}"))
}

async fn reload(args: &Args, target: Target) -> Result<String, String> {
    let (ca, state, out) = (
        args.ca_bin.as_deref().expect("checked"),
        args.state.as_deref().expect("checked"),
        args.out.as_ref().expect("checked"),
    );
    let mut latency = latency_histogram();
    let link = out.path().join("..data");
    for _ in 0..args.times {
        let old = target.connect().await?.leaf;
        let mut issue = std::process::Command::new(ca)
            .args(["issue", "server", "--state", state, "--out"])
            .arg(out.path())
            .args(["--dns", "localhost", "--ip", "127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("{ca}: {e}"))?;
        let started = Instant::now();
        let (served, served_at) = loop {
            let conn = target.connect().await?;
            if conn.leaf != old {
                break (conn.leaf, std::time::SystemTime::now());
            }
            if issue.try_wait().map_err(|e| e.to_string())?.is_some_and(|s| !s.success()) {
                break (None, std::time::SystemTime::now());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("no new certificate was served within 10 s".into());
            }
        };
        // Nothing else runs on this thread meanwhile: waiting for `ca issue` blocks nothing.
        let issued = issue.wait_with_output().map_err(|e| format!("{ca}: {e}"))?;
        if !issued.status.success() {
            return Err(format!("ca issue failed: {}", String::from_utf8_lossy(&issued.stderr)));
        }
        let new = out.load(time::OffsetDateTime::now_utc()).map_err(|e| e.to_string())?.chain[0].to_vec();
        if served.as_deref() != Some(new.as_slice()) {
            return Err("the certificate served after the swap is not the one `ca issue` wrote".into());
        }
        let swapped = std::fs::symlink_metadata(&link)
            .and_then(|m| m.modified())
            .map_err(|e| format!("{}: {e}", link.display()))?;
        let waited = served_at.duration_since(swapped).unwrap_or_default();
        latency.saturating_record(waited.as_micros() as u64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e3;
    Ok(format!(
        "p50_ms={:.1} p99_ms={:.1} max_ms={:.1} n={}",
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1e3,
        latency.len()
    ))
}

/// Microseconds per call of `op`, over about `seconds` of calls.
fn cost_us(seconds: f64, mut op: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let (started, mut calls) = (Instant::now(), 0u64);
    while started.elapsed().as_secs_f64() < seconds || calls < 10 {
        op()?;
        calls += 1;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / calls as f64)
}

/// What one server-side mTLS handshake costs in crypto alone.
fn crypto(args: &Args) -> Result<String, String> {
    use rustls::crypto::aws_lc_rs as provider;
    let now = time::OffsetDateTime::now_utc();
    let load = |dir: &CertDir| dir.load(now).map_err(|e| format!("{}: {e}", dir.path().display()));
    let client = load(args.cert_dir.as_ref().expect("checked"))?;
    let server = load(args.server_dir.as_ref().expect("checked"))?;
    let each = args.seconds / 4.0;
    let err = |e: rustls::Error| e.to_string();

    let client_share = args.group.start().map_err(err)?;
    let kx = cost_us(each, || args.group.start_and_complete(client_share.pub_key()).map(drop).map_err(err))?;

    let key = provider::default_provider().key_provider.load_private_key(server.key.clone_key()).map_err(err)?;
    let schemes = [rustls::SignatureScheme::ECDSA_NISTP256_SHA256, rustls::SignatureScheme::ED25519];
    let signer = key.choose_scheme(&schemes).ok_or("the server key is neither P-256 nor Ed25519")?;
    // TLS 1.3's CertificateVerify input: 64 spaces, the context, 0, a SHA-256 transcript hash.
    let message = [&[0x20; 64][..], b"TLS 1.3, server CertificateVerify\0", &[0xab; 32]].concat();
    let sign = cost_us(each, || signer.sign(&message).map(drop).map_err(err))?;

    let verifier = |anchors: &[rustls::pki_types::CertificateDer<'static>]| {
        let mut roots = rustls::RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor.clone()).map_err(err)?;
        }
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(provider::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())
    };
    let (leaf, intermediates) = client.chain.split_first().ok_or("the client cert dir has no certificate")?;
    let at = rustls::pki_types::UnixTime::now();
    let full = verifier(&client.roots)?;
    let chain = cost_us(each, || full.verify_client_cert(leaf, intermediates, at).map(drop).map_err(err))?;
    // From an intermediate verified before, as the sidecar does for its own.
    let from_known = verifier(&[client.roots.clone(), intermediates.to_vec()].concat())?;
    let leaf_only = cost_us(each, || from_known.verify_client_cert(leaf, &[], at).map(drop).map_err(err))?;

    let client_key = provider::default_provider().key_provider.load_private_key(client.key.clone_key()).map_err(err)?;
    let client_signer = client_key.choose_scheme(&schemes).ok_or("the client key is neither P-256 nor Ed25519")?;
    let signature = client_signer.sign(&message).map_err(err)?;
    let algorithm: &dyn rustls::pki_types::SignatureVerificationAlgorithm = match client_signer.scheme() {
        rustls::SignatureScheme::ED25519 => webpki::aws_lc_rs::ED25519,
        _ => webpki::aws_lc_rs::ECDSA_P256_SHA256,
    };
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
    let client_verify =
        cost_us(each, || end_entity.verify_signature(algorithm, &message, &signature).map_err(|e| e.to_string()))?;

    let total = kx + sign + leaf_only + client_verify;
    Ok(format!(
        "kx_us={kx:.1} sign_us={sign:.1} chain_us={chain:.1} leaf_us={leaf_only:.1} client_verify_us={client_verify:.1} \
         total_us={total:.1} bound_hs_per_s={:.0} group={}",
        1e6 / total,
        lanyard_sidecar::tls::group_label(Some(args.group.name()))
    ))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the mode on one thread.
fn run(args: &Args) -> Result<String, String> {
    let tls = match (&args.server_name, &args.cert_dir) {
        (Some(name), Some(dir)) => Some((name.clone(), Arc::new(client_config(args, dir)?))),
        _ => None,
    };
    let host = args.server_name.as_ref().map_or_else(|| "localhost".to_owned(), |n| n.to_str().into_owned());
    let target = Target { addr: args.connect, host, tls };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        match args.mode {
            Mode::Handshakes => handshakes(args, target).await,
            Mode::Keepalive => keepalive(args, target).await,
            Mode::Hold => hold(args, target).await,
            Mode::Probe => probe(args, target).await,
            Mode::Reload => reload(args, target).await,
            // Synchronous: it measures this thread's crypto, nothing else runs.
            Mode::Crypto => crypto(args),
        }
    })
}
