//! `loadgen`: the benchmarks' TLS load generator (tokio-rustls, aws-lc-rs).
//!
//! `loadgen handshakes --connect ADDR --server-name NAME --cert-dir DIR
//! [--groups pq|classical] [--seconds S] [--concurrency C]`: full mTLS
//! handshakes (resumption off) on new connections for S seconds, offering
//! only X25519MLKEM768 (`pq`) or only X25519 (`classical`), presenting the
//! cert dir's chain and verifying the server against its `ca.pem`. Every
//! handshake must negotiate the group asked for. Prints one line:
//! `handshakes=N errors=E seconds=S group=G`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanyard_sidecar::certdir::CertDir;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::pki_types::ServerName;

struct Args {
    connect: SocketAddr,
    server_name: ServerName<'static>,
    cert_dir: CertDir,
    group: &'static dyn rustls::crypto::SupportedKxGroup,
    seconds: u64,
    concurrency: usize,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let [mode, rest @ ..] = args else { return Err("usage: loadgen handshakes --connect ADDR ...".into()) };
    if mode != "handshakes" {
        return Err(format!("unknown mode {mode:?}: only `handshakes` exists"));
    }
    let (mut connect, mut name, mut dir, mut group, mut seconds, mut concurrency) =
        (None, None, None, kx_group::X25519MLKEM768, 5, 4);
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--connect" => connect = Some(value.parse().map_err(|e| format!("--connect {value:?}: {e}"))?),
            "--server-name" => {
                name = Some(ServerName::try_from(value.clone()).map_err(|e| format!("--server-name {value:?}: {e}"))?)
            }
            "--cert-dir" => dir = Some(CertDir::new(value)),
            "--groups" => {
                group = match value.as_str() {
                    "pq" => kx_group::X25519MLKEM768,
                    "classical" => kx_group::X25519,
                    other => return Err(format!("--groups {other:?}: pq or classical")),
                }
            }
            "--seconds" => seconds = value.parse().map_err(|e| format!("--seconds {value:?}: {e}"))?,
            "--concurrency" => concurrency = value.parse().map_err(|e| format!("--concurrency {value:?}: {e}"))?,
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(Args {
        connect: connect.ok_or("--connect is required")?,
        server_name: name.ok_or("--server-name is required")?,
        cert_dir: dir.ok_or("--cert-dir is required")?,
        group,
        seconds,
        concurrency,
    })
}

fn client_config(args: &Args) -> Result<rustls::ClientConfig, String> {
    let set = args.cert_dir.load(time::OffsetDateTime::now_utc()).map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for root in &set.roots {
        roots.add(root.clone()).map_err(|e| e.to_string())?;
    }
    let provider =
        rustls::crypto::CryptoProvider { kx_groups: vec![args.group], ..rustls::crypto::aws_lc_rs::default_provider() };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(set.chain.clone(), set.key.clone_key())
        .map_err(|e| e.to_string())?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
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
    let config = match client_config(&args) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("loadgen: {}: {e}", args.cert_dir.path().display());
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency {
            let (config, name, ok, errors, first_error) =
                (config.clone(), args.server_name.clone(), ok.clone(), errors.clone(), first_error.clone());
            let (addr, want) = (args.connect, args.group.name());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match handshake(addr, name.clone(), config.clone(), want).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().expect("not poisoned").get_or_insert(e);
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let group = lanyard_sidecar::tls::group_label(Some(args.group.name()));
    println!(
        "handshakes={} errors={} seconds={:.3} group={group}",
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if let Some(e) = first_error.lock().expect("not poisoned").take() {
        eprintln!("loadgen: first error: {e}");
    }
    if ok.load(Ordering::Relaxed) == 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// One full handshake on a new connection, then close_notify.
async fn handshake(
    addr: SocketAddr,
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    want: rustls::NamedGroup,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut tls =
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
    let got = tls.get_ref().1.negotiated_key_exchange_group().map(|g| g.name());
    if got != Some(want) {
        return Err(format!("negotiated {got:?}, not {want:?}"));
    }
    let _ = tls.shutdown().await;
    Ok(())
}
