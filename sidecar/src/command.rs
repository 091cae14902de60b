//! The `sidecar` command line: parsed here, run by the library. The
//! `sidecar` binary is this alone; `ca` runs it too when it is started as
//! `sidecar` (the image holds one binary, with `/sidecar` a link to `/ca`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::certdir::CertDir;
use crate::cli;
use crate::config::{Config, HostPort, Limits, ListenerConfig, Mode};
use crate::config::{EdgeConfig, Profile, SecurityHeaders};
use crate::identity::PeerId;
use crate::span::Span;
use clap::{Args, Parser, Subcommand};

/// Lanyard sidecar: mTLS in front of one service, with hot certificate reload.
#[derive(Parser)]
#[command(name = "sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: cli::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Probe the admin endpoint over HTTPS; exit 0 only when ready.
    Health(HealthArgs),
    /// Print the shell completion script (bash, zsh, fish, ...).
    Completion(cli::CompletionArgs),
    /// Write the manual pages into a directory.
    Man(cli::ManArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Cert dir to serve from and watch (cert.pem, key.pem, ca.pem).
    #[arg(long, env = "LANYARD_CERT_DIR", value_name = "DIR", required_unless_present_any = ["config", "config_toml"])]
    cert_dir: Option<PathBuf>,
    /// Address to accept on (IP:PORT, or a name resolved once at start).
    #[arg(long, value_name = "ADDR", requires = "upstream", conflicts_with_all = ["config", "config_toml"])]
    listen: Option<HostPort>,
    /// HOST:PORT to forward to.
    #[arg(long, value_name = "ADDR", requires = "listen")]
    upstream: Option<HostPort>,
    /// Inbound (mTLS in), outbound (mTLS out) or edge (public HTTPS to the app's HTTP port).
    #[arg(long, value_enum, default_value_t = RunMode::Inbound)]
    mode: RunMode,
    /// Key exchange: prefer the post-quantum hybrid X25519MLKEM768, or require it.
    #[arg(long, value_enum, default_value_t)]
    kx: crate::tls::KxPolicy,
    /// Edge: a cert dir of a public certificate, chosen by SNI; repeatable (default: --cert-dir).
    #[arg(long, value_name = "DIR")]
    public_cert_dir: Vec<PathBuf>,
    /// Edge: plain-HTTP address that redirects to HTTPS and forwards ACME challenges.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<HostPort>,
    /// Edge: where /.well-known/acme-challenge/ goes (the CA's HTTP listener).
    #[arg(long, value_name = "HOST:PORT")]
    acme_forward: Option<HostPort>,
    /// Edge: on-demand certificates, one cert dir per name in DIR (the CA's
    /// `[on_demand] out_dir`); a new name asks the CA at --acme-forward.
    #[arg(long, value_name = "DIR", requires = "acme_forward")]
    on_demand_dir: Option<PathBuf>,
    /// Edge: how long a handshake waits for an on-demand certificate.
    #[arg(long, value_name = "SPAN", requires = "on_demand_dir")]
    on_demand_wait: Option<Span>,
    /// Edge: how often names in use are reported to the CA (its idle clean-up).
    #[arg(long, value_name = "SPAN", requires = "on_demand_dir")]
    on_demand_report: Option<Span>,
    /// Edge: Mozilla TLS profile.
    #[arg(long, value_enum, default_value_t = Profile::Intermediate)]
    profile: Profile,
    /// Inbound: allowed client identity (SPIFFE ID or DNS name); repeatable.
    #[arg(long, value_name = "ID")]
    allow: Vec<PeerId>,
    /// Outbound: identity the upstream must present (DNS name or SPIFFE ID).
    #[arg(long, value_name = "ID")]
    server_name: Option<PeerId>,
    /// HTTPS admin endpoint address.
    #[arg(long, env = "LANYARD_ADMIN", value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Inbound: send a PROXY v2 header with the verified identity upstream.
    #[arg(long)]
    proxy_protocol: bool,
    /// Inbound: proxy HTTP/1.1 and add a sanitized X-Forwarded-Client-Cert header.
    #[arg(long)]
    http: bool,
    /// ALPN protocol the upstream speaks (h2, http/1.1); repeatable.
    #[arg(long, value_name = "PROTO")]
    alpn: Vec<String>,
    /// TOML file declaring several listeners.
    #[arg(long, value_name = "FILE", conflicts_with = "config_toml")]
    config: Option<PathBuf>,
    /// Enrol over the network with this credential (`ca enrol NAME`): the
    /// key is made here, and the cert dir is kept current through the CA.
    #[arg(long, value_name = "FILE")]
    enrol: Option<PathBuf>,
    /// With --enrol: the CA's URL, instead of the one in the credential.
    #[arg(long, value_name = "URL", requires = "enrol")]
    ca: Option<String>,
    /// The same TOML as text, for containers configured through the environment.
    #[arg(long, env = "LANYARD_SIDECAR_CONFIG", value_name = "TOML", hide_env_values = true)]
    config_toml: Option<String>,
}

/// What `sidecar run` without `--config` sets up.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RunMode {
    /// Accept mTLS, forward plaintext TCP to the app.
    Inbound,
    /// Accept plaintext from the app, open mTLS to the upstream.
    Outbound,
    /// Public HTTPS (with redirects and security headers) to the app's HTTP port.
    Edge,
}

#[derive(Args)]
struct HealthArgs {
    /// Readiness URL of the admin endpoint.
    #[arg(long, env = "LANYARD_HEALTH_URL", default_value = "https://127.0.0.1:9901/readyz")]
    url: String,
    /// Cert dir whose ca.pem verifies the endpoint (and whose cert is presented).
    #[arg(long, env = "LANYARD_CERT_DIR", value_name = "DIR")]
    cert_dir: PathBuf,
    /// Give up after this long.
    #[arg(long, default_value = "3s")]
    timeout: Span,
}

/// Runs the `sidecar` command with this process's arguments.
pub fn main() -> ExitCode {
    crate::install_crypto_provider();
    let cli: Cli = match cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            let args = *args;
            cli::init_logging(cli.log.log_format);
            let config = match config_from(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime.block_on(crate::run(config, cli::shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completion(args) => {
            cli::print_completion::<Cli>(&args);
            ExitCode::SUCCESS
        }
        Command::Man(args) => match cli::write_man_pages::<Cli>(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write the manual pages into {}: {e}", args.out_dir.display());
                ExitCode::FAILURE
            }
        },
        Command::Health(args) => {
            let dir = CertDir::new(&args.cert_dir);
            match runtime.block_on(crate::health::probe(&args.url, &dir, args.timeout.get())) {
                Ok(body) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_from(mut a: RunArgs) -> Result<Config, crate::config::ConfigError> {
    let enrol = a.enrol.take().map(|credential| crate::enrol::EnrolConfig { credential, ca: a.ca.take() });
    let mut config = config_from_args(a)?;
    if enrol.is_some() {
        config.enrol = enrol;
    }
    Ok(config)
}

fn config_from_args(a: RunArgs) -> Result<Config, crate::config::ConfigError> {
    let from_toml = match (&a.config, &a.config_toml) {
        (Some(path), _) => Some(Config::from_file(path)?),
        (None, Some(text)) => Some(Config::from_toml(text, Path::new("$LANYARD_SIDECAR_CONFIG"))?),
        (None, None) => None,
    };
    if let Some(mut config) = from_toml {
        if let Some(dir) = a.cert_dir {
            config.cert_dir = dir;
        }
        if a.admin.is_some() {
            config.admin = a.admin;
        }
        return Ok(config);
    }
    let cert_dir = a.cert_dir.unwrap_or_default();
    if a.mode == RunMode::Edge {
        let (Some(https_listen), Some(upstream)) = (a.listen, a.upstream) else {
            return Config {
                cert_dir,
                admin: a.admin,
                limits: Limits::default(),
                listeners: vec![],
                edges: vec![],
                kx: a.kx,
                enrol: None,
            }
            .checked("command line");
        };
        let on_demand = a.on_demand_dir.map(|dir| {
            let mut od = crate::config::OnDemandEdge::in_dir(dir);
            od.wait = a.on_demand_wait.unwrap_or(od.wait);
            od.report_every = a.on_demand_report.unwrap_or(od.report_every);
            od
        });
        // An on-demand edge serves only what it ordered unless told otherwise.
        let cert_dirs = match (a.public_cert_dir.is_empty(), &on_demand) {
            (false, _) => a.public_cert_dir,
            (true, Some(_)) => Vec::new(),
            (true, None) => vec![cert_dir.clone()],
        };
        let edge = EdgeConfig {
            name: "edge".into(),
            https_listen,
            http_listen: a.http_listen,
            upstream,
            cert_dirs,
            acme_forward: a.acme_forward,
            profile: a.profile,
            headers: SecurityHeaders::default(),
            on_demand,
        };
        return Config {
            cert_dir,
            admin: a.admin,
            limits: Limits::default(),
            listeners: vec![],
            edges: vec![edge],
            kx: a.kx,
            enrol: None,
        }
        .checked("command line");
    }
    let mode = if a.mode == RunMode::Outbound { Mode::Outbound } else { Mode::Inbound };
    let listeners = match (a.listen, a.upstream) {
        (Some(listen), Some(upstream)) => vec![ListenerConfig {
            name: String::new(),
            mode,
            listen,
            upstream: Some(upstream),
            allow: a.allow,
            server_name: a.server_name,
            proxy_protocol: a.proxy_protocol,
            http: a.http,
            alpn: a.alpn,
            tls: Default::default(),
            plain_from: vec![],
            routes: vec![],
        }],
        _ => Vec::new(),
    };
    Config { cert_dir, admin: a.admin, limits: Limits::default(), listeners, edges: vec![], kx: a.kx, enrol: None }
        .checked("command line")
}
