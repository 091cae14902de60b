//! `ca`: the Lanyard control plane command. Thin over `lanyard_ca`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lanyard_sidecar::cli;
use std::collections::HashMap;

use lanyard_ca::authority::Authority;
use lanyard_ca::inspect::inspect;
use lanyard_ca::issue::{KeySource, LeafRequest};
use lanyard_ca::keys::KeyType;
use lanyard_ca::ops::{backup, init_ca, new_token, restore, status_table, trouble};
use lanyard_ca::serve::config::ServeConfig;
use lanyard_ca::state::{write_file, CaState, InitOptions, DEFAULT_TRUST_DOMAIN};
use lanyard_ca::store::{Store, StoreSpec};
use lanyard_ca::CaError;
use lanyard_sidecar::certdir::CertDir;
use lanyard_sidecar::certinfo::rfc3339;
use lanyard_sidecar::identity::{DnsName, SpiffeId, TrustDomain};
use lanyard_sidecar::span::Span;
use std::sync::Arc;
use time::OffsetDateTime;

/// Lanyard control plane: a private CA for mTLS between services.
#[derive(Parser)]
#[command(name = "ca", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: cli::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Create a root and an intermediate CA in the state directory.
    Init(InitArgs),
    /// Issue a service certificate into a cert dir.
    Issue(IssueArgs),
    /// Show a PEM file or cert dir, and whether it is usable.
    Inspect(InspectArgs),
    /// Run the CA service: rotation, signing API, health and metrics.
    Serve(ServeArgs),
    /// Print a single-use bootstrap token for POST /v1/sign.
    Token(TokenArgs),
    /// Make an enrolment credential for one identity (`sidecar run --enrol FILE`);
    /// list or revoke them.
    Enrol(EnrolArgs),
    /// Show every managed identity: serial, expiry, renewals, last error.
    Status(StatusArgs),
    /// Exit non-zero when an identity is in trouble.
    Check(CheckArgs),
    /// Check a deployment end to end (same config as `serve`): one line per
    /// finding, with what to do; exits non-zero on any error.
    Doctor(ServeArgs),
    /// Write a consistent backup of the keys and the store.
    Backup(BackupArgs),
    /// Recreate the state directory from a backup.
    Restore(RestoreArgs),
    /// Rewrite a docker-compose file so every service sits behind a sidecar.
    Inject(InjectArgs),
    /// Trust the fleet's root on this machine (system bundle and browsers' NSS databases).
    Trust(TrustArgs),
    /// Admin credentials for operators and tools.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// The intermediate CA.
    #[command(subcommand)]
    Intermediate(IntermediateCommand),
    /// The root CA.
    #[command(subcommand)]
    Root(RootCommand),
    /// Serve a public certificate from another provider (validated, then watched).
    Upload(UploadArgs),
    /// The store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Give volumes to the image's unprivileged user: run once as root
    /// before `ca serve` (`ca inject` adds it as the lanyard-volumes service).
    PrepareVolumes(PrepareVolumesArgs),
    /// Print the shell completion script (bash, zsh, fish, ...).
    Completion(cli::CompletionArgs),
    /// Write the manual pages into a directory.
    Man(cli::ManArgs),
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy every record from one store into another, empty one (SQLite to
    /// Redis and back), checked by a count and a checksum of every record.
    Copy(CopyArgs),
}

#[derive(Args)]
struct CopyArgs {
    /// The store to copy from: sqlite (STATE/lanyard.db) or redis://HOST:PORT[/DB].
    #[arg(long, value_name = "STORE")]
    from: StoreSpec,
    /// The store to copy into; it must be empty.
    #[arg(long, value_name = "STORE")]
    to: StoreSpec,
    /// The CA's state directory (its SQLite store, and the store key).
    #[arg(long, env = "LANYARD_STATE", value_name = "DIR")]
    state: PathBuf,
    /// The key that seals key material in a shared store (default STATE/store.key).
    #[arg(long, env = "LANYARD_STORE_KEY", value_name = "FILE")]
    store_key: Option<PathBuf>,
}

#[derive(Args)]
struct EnrolArgs {
    /// The identity the credential may enrol.
    #[arg(required_unless_present_any = ["list", "revoke"])]
    name: Option<DnsName>,
    /// How long the credential works (the certificates it gets live as the identity's TTL).
    #[arg(long, default_value = "30d")]
    ttl: Span,
    /// The CA's API as the sidecars reach it.
    #[arg(long, value_name = "URL", default_value = "https://ca:8443")]
    ca_url: String,
    /// Write the credential here (mode 0600) instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// List the credentials: id, identity, expiry, uses, last caller.
    #[arg(long, conflicts_with_all = ["name", "revoke"])]
    list: bool,
    /// Revoke the credential with this id (or a unique prefix of it).
    #[arg(long, value_name = "ID", conflicts_with = "name")]
    revoke: Option<String>,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Args)]
struct UploadArgs {
    /// The certificate's name (its cert dir is STATE/public/NAME).
    name: String,
    /// The chain, leaf first (PEM).
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The leaf's private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Args)]
struct InjectArgs {
    /// The compose file to read (`-` for standard input).
    input: PathBuf,
    /// Where to write the result; standard output when absent.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Certificate lifetime; overrides x-lanyard.ttl.
    #[arg(long)]
    ttl: Option<Span>,
    /// The Lanyard image; overrides x-lanyard.image.
    #[arg(long)]
    image: Option<String>,
    /// Print what every call between services and every published port becomes.
    #[arg(long)]
    explain: bool,
    /// Fail (exit 3) when a call between services stays in plaintext.
    #[arg(long)]
    strict: bool,
    /// The Docker engine asked for the ports of images the file does not describe.
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    docker_socket: String,
    /// `compose` (the default) or `swarm`: a stack for `docker stack deploy`,
    /// with its secrets in `lanyard-secrets/` beside the output; needs --output
    /// and --state (the CA the stack starts from, made when missing).
    #[arg(long, value_enum, default_value_t = Target::Compose)]
    target: Target,
    /// With --target swarm: the CA's state directory.
    #[arg(long, env = "LANYARD_STATE", value_name = "DIR")]
    state: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    /// A docker-compose file.
    Compose,
    /// A Docker Swarm stack.
    Swarm,
}

#[derive(Subcommand)]
enum IntermediateCommand {
    /// Replace the intermediate now (a running `ca serve` picks it up within
    /// seconds, then re-issues every identity from it). With an offline
    /// root, give its key with --root-key; it is not stored.
    Roll(RollArgs),
}

#[derive(Args)]
struct RollArgs {
    /// The root key (PEM), for a CA created with --offline-root.
    #[arg(long, value_name = "FILE")]
    root_key: Option<PathBuf>,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Subcommand)]
enum RootCommand {
    /// Replace the root with no downtime, in phases a running `ca serve`
    /// follows within seconds; each phase is kept in the state directory.
    #[command(subcommand)]
    Rotate(RotateCommand),
}

#[derive(Subcommand)]
enum RotateCommand {
    /// Make a new root and intermediate: every trust bundle becomes old +
    /// new; issuance stays on the old root. With an offline root, the new
    /// root's key goes to --root-key-out and is not stored.
    Start(StartArgs),
    /// Show the phase and which known sidecars serve the new root.
    Status(StateArgs),
    /// Move issuance to the new root and re-issue every identity; refused
    /// while a known sidecar lacks the new root. The old root leaves the
    /// bundles once its last leaf has expired or been replaced.
    Finish(FinishArgs),
    /// Before finish: return to the old root alone.
    Abort(StateArgs),
}

#[derive(Args)]
struct StateArgs {
    #[command(flatten)]
    state: StateArg,
}

#[derive(Args)]
struct StartArgs {
    /// With an offline root: where to write the new root's key (mode 0600).
    #[arg(long, value_name = "FILE")]
    root_key_out: Option<PathBuf>,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Args)]
struct FinishArgs {
    /// Spread the re-issue of every identity over this long.
    #[arg(long, default_value = "1m")]
    window: Span,
    /// Finish even while sidecars lack the new root (they are cut off).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Issue an admin credential for one operator or tool
    /// (`spiffe://<td>/lanyard-admin/NAME`), revocable on its own with /v1/revoke.
    Issue(AdminIssueArgs),
}

#[derive(Args)]
struct AdminIssueArgs {
    /// The operator or tool.
    name: DnsName,
    /// Where to write the cert dir; default STATE/admin-NAME.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Args)]
struct TrustArgs {
    /// The root certificate (PEM); default: the root of --state.
    #[arg(long, value_name = "FILE", conflicts_with = "state")]
    root: Option<PathBuf>,
    /// The CA state directory whose root to trust.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Take the root out again.
    #[arg(long)]
    remove: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// The service configuration (lanyard.toml).
    #[arg(long, value_name = "FILE", required_unless_present = "config_toml", conflicts_with = "config_toml")]
    config: Option<PathBuf>,
    /// The same TOML as text, for containers configured through the environment.
    #[arg(long, env = "LANYARD_CONFIG", value_name = "TOML", hide_env_values = true)]
    config_toml: Option<String>,
}

#[derive(Args)]
struct PrepareVolumesArgs {
    /// The owner, UID:GID.
    #[arg(long, default_value = lanyard_compose::inject::IMAGE_USER, value_parser = owner)]
    owner: (u32, u32),
    /// The volumes' mount points.
    #[arg(required = true, value_name = "DIR")]
    dirs: Vec<PathBuf>,
}

fn owner(text: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{text:?}: give the owner as UID:GID, for example 65532:65532");
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    Ok((uid.parse().map_err(|_| bad())?, gid.parse().map_err(|_| bad())?))
}

impl ServeArgs {
    /// The config, with the environment's overrides.
    fn load(&self) -> anyhow::Result<ServeConfig> {
        let env: HashMap<String, String> = ["LANYARD_STATE", "HTTPS_PORT", "HTTP_PORT", "REDIS_URL"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        Ok(match (&self.config, &self.config_toml) {
            (Some(path), _) => ServeConfig::load(path, &env)?,
            (None, Some(text)) => ServeConfig::parse(text, "$LANYARD_CONFIG", &env)?,
            (None, None) => anyhow::bail!("give --config FILE or set LANYARD_CONFIG"),
        })
    }
}

#[derive(Args)]
struct TokenArgs {
    /// The identity the token may obtain a certificate for.
    name: DnsName,
    #[command(flatten)]
    state: StateArg,
    /// How long the token stays usable.
    #[arg(long, default_value = "5m")]
    ttl: Span,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    state: StateArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CheckArgs {
    /// The identity to check; the CA's own certificates are always checked.
    name: Option<String>,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Args)]
struct BackupArgs {
    /// Where to write the backup (mode 0600).
    file: PathBuf,
    #[command(flatten)]
    state: StateArg,
}

#[derive(Args)]
struct RestoreArgs {
    /// The backup to restore.
    file: PathBuf,
    #[command(flatten)]
    state: StateArg,
    /// Replace an existing CA.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct StateArg {
    /// The CA's state directory.
    #[arg(long, env = "LANYARD_STATE", value_name = "DIR")]
    state: Option<PathBuf>,
    /// The store: sqlite (the default, in the state directory) or redis://HOST:PORT[/DB].
    #[arg(long, env = "REDIS_URL", value_name = "URL", default_value = "sqlite")]
    store: StoreSpec,
    /// The key that seals key material in a shared store (default STATE/store.key).
    #[arg(long, env = "LANYARD_STORE_KEY", value_name = "FILE")]
    store_key: Option<PathBuf>,
}

impl StateArg {
    fn dir(&self) -> Result<&PathBuf, CaError> {
        self.state.as_ref().ok_or(CaError::NoStateDir)
    }

    /// The store this command works on.
    fn store(&self) -> Result<Arc<dyn Store>, CaError> {
        Ok(lanyard_ca::store::open(&self.store, self.dir()?, self.store_key.as_deref())?)
    }

    /// The CA with its store.
    fn authority(&self) -> Result<Authority, CaError> {
        Authority::open_with(self.dir()?, self.store()?)
    }

    /// With a shared store, runs `change` on the store's CA: the state
    /// directory is made a copy of it first, and what `change` wrote is
    /// published after, for every replica.
    fn change_ca<T>(&self, change: impl FnOnce(&Path) -> Result<T, CaError>) -> Result<T, CaError> {
        let dir = self.dir()?;
        if self.store == StoreSpec::Sqlite {
            return change(dir);
        }
        let store = self.store()?;
        lanyard_ca::mirror::pull(dir, store.as_ref())?;
        let out = change(dir)?;
        lanyard_ca::mirror::push(dir, store.as_ref())?;
        Ok(out)
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
    /// Lifetime of the intermediate; `ca serve` replaces it at 2/3 of it
    /// (short ones are for trying the rollover out).
    #[arg(long, value_name = "TTL", default_value = "365d")]
    intermediate_ttl: Span,
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
    // The image holds one binary: `/sidecar` is a link to `/ca`.
    if std::env::args_os().next().is_some_and(|arg0| Path::new(&arg0).file_name() == Some("sidecar".as_ref())) {
        return lanyard_sidecar::command::main();
    }
    lanyard_sidecar::install_crypto_provider();
    let cli: Cli = match cli::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
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
                intermediate_lifetime: time::Duration::try_from(a.intermediate_ttl.get())?,
            };
            let (ca, offline_key) = init_ca(dir, &opts, a.state.store()?)?;
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
            let authority = a.state.authority()?;
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
                    dns: (!a.dns.is_empty()).then(|| a.dns.clone()),
                    ips: a.ip.clone(),
                    spiffe: a.spiffe.clone(),
                    ttl: a.ttl,
                    key: key.clone(),
                };
                let issued = authority.issue(&req, "cli")?;
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
        Command::Serve(a) => {
            let config = a.load()?;
            cli::init_logging(cli.log.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(lanyard_ca::serve::blocking_threads())
                .build()?;
            runtime.block_on(lanyard_ca::serve::run(config, cli::shutdown_signal()))?;
        }
        Command::Doctor(a) => {
            let config = a.load()?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let report = runtime.block_on(lanyard_ca::doctor::diagnose(&config, OffsetDateTime::now_utc()));
            stdout(&report.render());
            if report.has_errors() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::PrepareVolumes(a) => {
            let (uid, gid) = a.owner;
            let changed = lanyard_ca::ops::own_tree(&a.dirs, uid, gid)?;
            let dirs: Vec<String> = a.dirs.iter().map(|d| d.display().to_string()).collect();
            eprintln!("gave {} to {uid}:{gid} ({changed} entries changed)", dirs.join(", "));
        }
        Command::Completion(a) => cli::print_completion::<Cli>(&a),
        Command::Man(a) => cli::write_man_pages::<Cli>(&a)
            .map_err(|e| anyhow::anyhow!("cannot write the manual pages into {}: {e}", a.out_dir.display()))?,
        Command::Upload(a) => {
            let dir = a.state.dir()?;
            let authority = a.state.authority()?;
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
            };
            let certs = lanyard_ca::acme::PublicCerts::new(authority.store().clone());
            let cert = certs.upload(dir, &a.name, &read(&a.cert)?, &read(&a.key)?)?;
            eprintln!(
                "uploaded {} ({}) valid until {} into {}",
                cert.cert_name,
                cert.domains.join(", "),
                cert.expires_at.unwrap_or_default(),
                cert.out_dir.display()
            );
        }
        Command::Inject(a) => {
            let (text, origin) = if a.input.as_os_str() == "-" {
                (std::io::read_to_string(std::io::stdin())?, "standard input".to_owned())
            } else {
                let text = std::fs::read_to_string(&a.input)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.input.display()))?;
                (text, a.input.display().to_string())
            };
            let project = if a.input.as_os_str() == "-" {
                lanyard_compose::Project::of_file(Path::new("./-"), std::env::vars())
            } else {
                lanyard_compose::Project::of_file(&a.input, std::env::vars())
            };
            let compose = lanyard_compose::Compose::parse_in(&text, &origin, &project)?;
            let images = lanyard_ca::compose::engine::EngineImages::inspect(
                &a.docker_socket,
                compose.services.iter().filter_map(|s| s.image.as_deref()),
            );
            let swarm = (a.target == Target::Swarm).then(|| {
                let now = OffsetDateTime::now_utc();
                format!(
                    "{:04}{:02}{:02}{:02}{:02}{:02}",
                    now.year(),
                    u8::from(now.month()),
                    now.day(),
                    now.hour(),
                    now.minute(),
                    now.second()
                )
            });
            let overrides = lanyard_compose::inject::Overrides { ttl: a.ttl, image: a.image, swarm };
            let injected = lanyard_compose::inject_with(&compose, &overrides, &images)?;
            if a.target == Target::Swarm {
                let (Some(out), Some(state)) = (&a.output, &a.state) else {
                    anyhow::bail!("--target swarm writes its secrets beside the stack and starts from a CA: give --output FILE and --state DIR");
                };
                let dir = out
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .join(lanyard_compose::inject::SWARM_SECRETS_DIR);
                let trust_domain = compose.defaults.trust_domain.clone();
                let lines = lanyard_ca::ops::swarm_secrets(state, &trust_domain, &injected.enrolled, &dir)?;
                for line in lines {
                    eprintln!("{line}");
                }
            }
            let yaml = injected.compose.to_yaml();
            match &a.output {
                Some(path) => {
                    std::fs::write(path, &yaml).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                    let report_path = path.with_extension("report");
                    std::fs::write(&report_path, injected.report_text())
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", report_path.display()))?;
                }
                None => stdout(&yaml),
            }
            for line in &injected.report {
                eprintln!("{line}");
            }
            if a.explain {
                eprint!("\n{}", injected.explain());
            }
            for w in &injected.warnings {
                eprintln!("warning: {w}");
            }
            if a.strict && injected.has_plain_calls() {
                eprintln!("error: --strict: some calls between services stay in plaintext (see the warnings above)");
                return Ok(ExitCode::from(3));
            }
        }
        Command::Intermediate(IntermediateCommand::Roll(a)) => {
            let key = match &a.root_key {
                Some(path) => Some((
                    path.as_path(),
                    std::fs::read_to_string(path)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
                )),
                None => None,
            };
            let (old, new) = a.state.change_ca(|dir| {
                let ca = CaState::load(dir)?;
                let new =
                    ca.roll_intermediate(OffsetDateTime::now_utc(), key.as_ref().map(|(p, k)| (*p, k.as_str())))?;
                Ok((ca.intermediate().serial.clone(), new))
            })?;
            println!(
                "intermediate {old} replaced by {}, expires {}",
                new.intermediate().serial,
                rfc3339(new.intermediate().not_after)
            );
        }
        Command::Root(RootCommand::Rotate(step)) => {
            use lanyard_ca::rotation;
            let now = OffsetDateTime::now_utc();
            let text = match step {
                RotateCommand::Start(a) => {
                    let (ca, offline_key) = a.state.change_ca(|dir| {
                        let ca = CaState::load(dir)?;
                        if !ca.root_key_online() && a.root_key_out.is_none() {
                            return Err(CaError::Rotation("the root key is offline, so the new root's key is not stored either: give --root-key-out FILE".into()));
                        }
                        rotation::start(&ca, now)
                    })?;
                    if let (Some(key), Some(path)) = (offline_key, &a.root_key_out) {
                        write_file(path, &key, 0o600)?;
                        eprintln!("the new root's key is in {}; keep it offline", path.display());
                    }
                    eprintln!("started: every trust bundle now carries the new root too; a running `ca serve` writes it to every cert dir within seconds");
                    rotation::status_text(&ca, a.state.authority()?.store().as_ref(), now)?
                }
                RotateCommand::Status(a) => {
                    let authority = a.state.authority()?;
                    rotation::status_text(&authority.ca(), authority.store().as_ref(), now)?
                }
                RotateCommand::Finish(a) => {
                    let ca = a
                        .state
                        .change_ca(|dir| rotation::finish(&CaState::load(dir)?, now, a.window.get(), a.force))?;
                    eprintln!("finished: issuance is on the new root; a running `ca serve` re-issues every identity within {}", a.window);
                    rotation::status_text(&ca, a.state.authority()?.store().as_ref(), now)?
                }
                RotateCommand::Abort(a) => {
                    let ca = a.state.change_ca(|dir| rotation::abort(&CaState::load(dir)?))?;
                    eprintln!("aborted: the bundles carry the old root alone again");
                    rotation::status_text(&ca, a.state.authority()?.store().as_ref(), now)?
                }
            };
            stdout(&text);
        }
        Command::Admin(AdminCommand::Issue(a)) => {
            let dir = a.state.dir()?;
            let authority = a.state.authority()?;
            let ca = authority.ca();
            let id = ca.trust_domain().id(&format!("lanyard-admin/{}", a.name))?;
            let window = ca.intermediate().not_after - ca.intermediate().not_before;
            let request = lanyard_ca::ops::admin_request(Some((&a.name, id.clone())), window)?;
            let issued = authority.issue(&request, "admin")?;
            let out = a.out.unwrap_or_else(|| dir.join(format!("admin-{}", a.name)));
            CertDir::new(&out).write(&issued.pem)?;
            println!(
                "{id}: serial {}, expires {} -> {}",
                issued.info.serial,
                rfc3339(issued.info.not_after),
                out.display()
            );
        }
        Command::Trust(a) => {
            use lanyard_ca::compose::trust;
            let path = match (a.root, a.state) {
                (Some(root), _) => root,
                (None, state) => {
                    let dir =
                        state.or_else(|| std::env::var_os("LANYARD_STATE").map(PathBuf::from)).ok_or_else(|| {
                            anyhow::anyhow!(
                                "give --root FILE (the fleet's root.pem) or --state DIR (a CA state directory)"
                            )
                        })?;
                    dir.join("root.pem")
                }
            };
            let root = trust::Root::read(&path)?;
            let home = std::env::var_os("HOME").map(PathBuf::from);
            for line in trust::apply(&root, a.remove, home.as_deref())? {
                println!("{line}");
            }
        }
        Command::Enrol(a) => {
            use lanyard_ca::enrol;
            let authority = a.state.authority()?;
            let store = authority.store().as_ref();
            let at = |t: i64| OffsetDateTime::from_unix_timestamp(t).map(rfc3339).unwrap_or_default();
            if a.list {
                println!(
                    "{:<13} {:<20} {:<21} {:>5}  {:<21} STATE",
                    "ID", "IDENTITY", "EXPIRES", "USES", "LAST CALLER"
                );
                for e in enrol::list(store)? {
                    let state = match e.revoked_at {
                        Some(t) => format!("revoked {}", at(t)),
                        None if e.expires_at <= OffsetDateTime::now_utc().unix_timestamp() => "expired".into(),
                        None => "active".into(),
                    };
                    println!(
                        "{:<13} {:<20} {:<21} {:>5}  {:<21} {state}",
                        e.id,
                        e.identity,
                        at(e.expires_at),
                        e.uses,
                        e.last_caller.as_deref().unwrap_or("-")
                    );
                }
            } else if let Some(id) = &a.revoke {
                match enrol::revoke(store, id)? {
                    Some(e) => eprintln!("revoked enrolment credential {} for {}: no new enrolment with it; certificates already issued stay valid until revoked", e.id, e.identity),
                    None => anyhow::bail!("no single enrolment credential has an id starting with {id:?}; see `ca enrol --list`"),
                }
            } else if let Some(name) = &a.name {
                let ttl = time::Duration::try_from(a.ttl.get())?;
                let fingerprint = authority.ca().root().sha256.clone();
                let (record, credential) = enrol::create(store, name, ttl, &a.ca_url, &fingerprint)?;
                match &a.output {
                    Some(path) => write_file(path, &credential.to_toml(), 0o600)?,
                    None => stdout(&credential.to_toml()),
                }
                eprintln!(
                    "enrolment credential {} for {name}, valid until {}; revoke it with `ca enrol --revoke {}`",
                    record.id,
                    at(record.expires_at),
                    record.id
                );
            }
        }
        Command::Token(a) => {
            let authority = a.state.authority()?;
            stdout(&(new_token(&authority, a.name.as_str(), a.ttl)? + "\n"));
        }
        Command::Status(a) => {
            let authority = a.state.authority()?;
            let rows = authority.store().schedules()?;
            let now = OffsetDateTime::now_utc().unix_timestamp();
            if a.json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).unwrap_or_default();
                        v["trouble"] = serde_json::to_value(trouble(r, now)).unwrap_or_default();
                        v
                    })
                    .collect();
                stdout(&(serde_json::to_string_pretty(&list)? + "\n"));
            } else {
                let ca = authority.ca();
                for e in ca.expiry(OffsetDateTime::now_utc()) {
                    let next = match (e.role, ca.rollover_at()) {
                        ("intermediate", Some(at)) => format!(", rolled over by ca serve at {}", rfc3339(at)),
                        ("intermediate", None) => ", root key offline: not rolled over automatically".into(),
                        _ => String::new(),
                    };
                    let alarm = e.alarm.map(|a| format!("  ALARM: {a}")).unwrap_or_default();
                    stdout(&format!("{} CA expires {}{next}{alarm}\n", e.role, rfc3339(e.not_after)));
                }
                if ca.rotation().is_some() {
                    stdout(&lanyard_ca::rotation::status_text(
                        &ca,
                        authority.store().as_ref(),
                        OffsetDateTime::now_utc(),
                    )?);
                }
                for (what, sub) in
                    [("this replica's API certificate", "api"), ("this replica's admin credential", "admin")]
                {
                    if let Ok(set) = CertDir::new(a.state.dir()?.join(sub)).load(OffsetDateTime::now_utc()) {
                        let id = set.leaf.uris.first().cloned().unwrap_or_default();
                        stdout(&format!(
                            "{what} {id} serial {} expires {}\n",
                            set.leaf.serial,
                            rfc3339(set.leaf.not_after)
                        ));
                    }
                }
                stdout(&status_table(&rows, now));
                let certs = lanyard_ca::acme::PublicCerts::new(authority.store().clone());
                stdout(&lanyard_ca::ops::public_table(&certs.list()?, now));
            }
        }
        Command::Check(a) => {
            let authority = a.state.authority()?;
            let alarms: Vec<String> =
                authority.ca().expiry(OffsetDateTime::now_utc()).into_iter().filter_map(|e| e.alarm).collect();
            if !alarms.is_empty() {
                anyhow::bail!("{}", alarms.join("; "));
            }
            let now = OffsetDateTime::now_utc().unix_timestamp();
            match &a.name {
                None => stdout("CA certificates: ok\n"),
                Some(name) => match authority.store().schedule(name)? {
                    None => anyhow::bail!("identity {name:?} is not managed by this CA (see `ca status`)"),
                    Some(row) => match trouble(&row, now) {
                        Some(why) => anyhow::bail!("{name}: {why}"),
                        None => stdout(&format!("{name}: ok\n")),
                    },
                },
            }
        }
        Command::Store(StoreCommand::Copy(a)) => {
            CaState::load(&a.state)?;
            let from = lanyard_ca::store::open(&a.from, &a.state, a.store_key.as_deref())?;
            let to = lanyard_ca::store::open(&a.to, &a.state, a.store_key.as_deref())?;
            let summary = lanyard_ca::ops::copy_store(from.as_ref(), to.as_ref())?;
            println!("copied from {} to {}: {summary}", from.backend(), to.backend());
        }
        Command::Backup(a) => {
            let dir = a.state.dir()?;
            CaState::load(dir)?;
            backup(dir, &a.file, a.state.store()?.as_ref())?;
            eprintln!("backed up {} to {}", dir.display(), a.file.display());
        }
        Command::Restore(a) => {
            let dir = a.state.dir()?;
            restore(dir, &a.file, a.force, &a.state.store, a.state.store_key.as_deref())?;
            eprintln!("restored {} from {}", dir.display(), a.file.display());
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
