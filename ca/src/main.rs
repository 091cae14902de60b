//! `ca`: the Lanyard control plane command. Thin over `lanyard_ca`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lanyard_ca::inspect::inspect;
use lanyard_ca::issue::{KeySource, LeafRequest};
use lanyard_ca::keys::KeyType;
use lanyard_ca::state::{write_file, CaState, InitOptions, DEFAULT_TRUST_DOMAIN};
use lanyard_ca::CaError;
use lanyard_sidecar::certdir::CertDir;
use lanyard_sidecar::certinfo::rfc3339;
use lanyard_sidecar::identity::{DnsName, SpiffeId, TrustDomain};
use lanyard_sidecar::span::Span;
use time::OffsetDateTime;

/// Lanyard control plane: a private CA for mTLS between services.
#[derive(Parser)]
#[command(name = "ca", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a root and an intermediate CA in the state directory.
    Init(InitArgs),
    /// Issue a service certificate into a cert dir.
    Issue(IssueArgs),
    /// Show a PEM file or cert dir, and whether it is usable.
    Inspect(InspectArgs),
}

#[derive(Args)]
struct StateArg {
    /// The CA's state directory.
    #[arg(long, env = "LANYARD_STATE", value_name = "DIR")]
    state: Option<PathBuf>,
}

impl StateArg {
    fn dir(&self) -> Result<&PathBuf, CaError> {
        self.state.as_ref().ok_or(CaError::NoStateDir)
    }
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    state: StateArg,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: TrustDomain,
    /// Constrain the intermediate to this DNS suffix (RFC 5280); repeatable.
    #[arg(long = "permit-dns", value_name = "SUFFIX")]
    permit_dns: Vec<DnsName>,
    /// Do not keep the root key in the state directory; print it (or write it to --root-key-out).
    #[arg(long)]
    offline_root: bool,
    /// Where to write the offline root key (mode 0600) instead of stdout.
    #[arg(long, requires = "offline_root", value_name = "FILE")]
    root_key_out: Option<PathBuf>,
    /// Replace an existing CA.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct IssueArgs {
    /// Service name: the CN, the SPIFFE path and the default DNS SAN. With
    /// several names, each is issued into OUTDIR/NAME with its defaults.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<DnsName>,
    #[command(flatten)]
    state: StateArg,
    /// Cert dir to write (cert.pem, key.pem, ca.pem), swapped in atomically.
    #[arg(long, value_name = "OUTDIR")]
    out: PathBuf,
    /// DNS SAN; repeatable. Replaces the default (NAME).
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    dns: Vec<DnsName>,
    /// IP SAN; repeatable.
    #[arg(long, value_name = "ADDR")]
    ip: Vec<IpAddr>,
    /// SPIFFE ID; defaults to spiffe://<trust-domain>/<NAME>.
    #[arg(long, value_name = "URI")]
    spiffe: Option<SpiffeId>,
    /// Lifetime, such as 24h, 90m or 7d.
    #[arg(long, default_value = "24h", allow_hyphen_values = true)]
    ttl: Span,
    /// Key algorithm of the generated key.
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256, conflicts_with = "csr")]
    key_type: KeyType,
    /// Sign this PEM CSR instead of generating a key; no key.pem is written.
    #[arg(long, value_name = "FILE")]
    csr: Option<PathBuf>,
}

#[derive(Args)]
struct InspectArgs {
    /// A PEM file or a cert dir.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    lanyard_sidecar::install_crypto_provider();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let rendered = e.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init(a) => {
            let dir = a.state.dir()?;
            let opts = InitOptions {
                trust_domain: a.trust_domain,
                permit_dns: a.permit_dns,
                offline_root: a.offline_root,
                force: a.force,
            };
            let (ca, offline_key) = CaState::init(dir, &opts)?;
            if let Some(key) = offline_key {
                match &a.root_key_out {
                    Some(path) => write_file(path, &key, 0o600)?,
                    None => stdout(&key),
                }
            }
            eprintln!(
                "created CA in {} (trust domain {}, intermediate valid until {})",
                dir.display(),
                ca.trust_domain(),
                rfc3339(ca.intermediate().not_after)
            );
        }
        Command::Issue(a) => {
            let ca = CaState::load(a.state.dir()?)?;
            if a.names.len() > 1 && (!a.dns.is_empty() || !a.ip.is_empty() || a.spiffe.is_some() || a.csr.is_some()) {
                anyhow::bail!(
                    "--dns, --ip, --spiffe and --csr describe one identity; issue names one at a time to use them"
                );
            }
            let key = match &a.csr {
                Some(path) => KeySource::Csr {
                    origin: path.clone(),
                    pem: std::fs::read_to_string(path)
                        .map_err(|e| CaError::Csr { path: path.clone(), what: format!("cannot read it: {e}") })?,
                },
                None => KeySource::Generate(a.key_type),
            };
            let single = a.names.len() == 1;
            for name in a.names {
                let out = if single { a.out.clone() } else { a.out.join(name.as_str()) };
                let req = LeafRequest {
                    name,
                    dns: a.dns.clone(),
                    ips: a.ip.clone(),
                    spiffe: a.spiffe.clone(),
                    ttl: a.ttl,
                    key: key.clone(),
                };
                let issued = ca.issue(&req)?;
                CertDir::new(&out).write(&issued.pem)?;
                eprintln!(
                    "issued {} serial {} valid until {} into {}",
                    req.name,
                    issued.info.serial,
                    rfc3339(issued.info.not_after),
                    out.display()
                );
            }
        }
        Command::Inspect(a) => {
            let report = inspect(&a.path, OffsetDateTime::now_utc())?;
            if a.json {
                stdout(&(serde_json::to_string_pretty(&report)? + "\n"));
            } else {
                stdout(&report.render());
            }
            if !report.ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a closed pipe (`ca inspect | head`) is not an error.
fn stdout(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
