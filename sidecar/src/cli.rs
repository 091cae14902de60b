//! Plumbing shared by the `sidecar` and `ca` binaries: one-line argument
//! errors, logging, completions and manual pages, and the shutdown signal.

use std::process::ExitCode;

/// Parses the command line; a bad argument prints clap's first line (which
/// names the argument and value) and gives exit code 2.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    match C::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let first = e.to_string().lines().next().unwrap_or("error: invalid arguments").to_owned();
            let valid = match e.get(clap::error::ContextKind::ValidValue) {
                Some(clap::error::ContextValue::Strings(values)) => format!(" (give one of: {})", values.join(", ")),
                _ => String::new(),
            };
            eprintln!("{first}{valid}");
            Err(ExitCode::from(2))
        }
    }
}

/// How the long-running commands (`ca serve`, `sidecar run`) write their log.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, colored only on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's
    /// fields (`message`, `event`, `identity`, `serial`, ...) at the top level,
    /// and the enclosing spans' fields.
    Json,
}

/// `--log-format`, for both binaries' command lines.
#[derive(clap::Args)]
pub struct LogArgs {
    /// Log (`ca serve`, `sidecar run`) as text or as one JSON object per line.
    #[arg(long, global = true, env = "LANYARD_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// What is logged when `RUST_LOG` is not set.
const DEFAULT_LOG: &str = "info,notify=warn";

/// Logs to stderr at `RUST_LOG` (default `info`) in `format`.
///
/// `RUST_LOG` is a list of `LEVEL` and `TARGET=LEVEL` directives
/// (`warn,lanyard_sidecar::reload=debug`); a value that is not one is
/// reported and [`DEFAULT_LOG`] used. This is `Targets`, not `EnvFilter`:
/// without span and field filters it needs no regex engine, and the
/// sidecar's binary is 0.4 MB smaller.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref()).unwrap_or_else(|refusal| {
        eprintln!("warning: {refusal}");
        DEFAULT_LOG.parse().expect("the default log directives parse")
    });
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(layer.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))).init(),
        LogFormat::Json => {
            registry.with(layer.json().flatten_event(true).with_current_span(true).with_span_list(true)).init()
        }
    }
}

/// The filter `RUST_LOG` asks for, [`DEFAULT_LOG`] when it is unset; the
/// warning to print when it is not a list of directives.
fn log_filter(rust_log: Option<&str>) -> Result<tracing_subscriber::filter::Targets, String> {
    let value = rust_log.unwrap_or(DEFAULT_LOG);
    value.parse().map_err(|e| {
        format!("RUST_LOG={value:?} is not a list of LEVEL or TARGET=LEVEL directives ({e}); logging at {DEFAULT_LOG}")
    })
}

/// `completion SHELL`: the shell's completion script for a command.
#[derive(clap::Args)]
pub struct CompletionArgs {
    /// The shell to write the script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Prints `C`'s completion script for the shell in `args`.
pub fn print_completion<C: clap::CommandFactory>(args: &CompletionArgs) {
    let mut command = C::command();
    let name = command.get_name().to_owned();
    clap_complete::generate(args.shell, &mut command, name, &mut std::io::stdout());
}

/// `man DIR`: the manual pages of a command.
#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory to write NAME.1 and one NAME-SUBCOMMAND.1 per subcommand into.
    pub out_dir: std::path::PathBuf,
}

/// Writes `C`'s manual pages (roff) into the directory in `args`.
pub fn write_man_pages<C: clap::CommandFactory>(args: &ManArgs) -> std::io::Result<()> {
    std::fs::create_dir_all(&args.out_dir)?;
    clap_mangen::generate_to(C::command(), &args.out_dir)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Serde helpers for fields written as strings and parsed with `FromStr`
/// (durations, identities, addresses), so errors carry the parser's message.
pub mod serde_str {
    use std::str::FromStr;

    use serde::Deserialize;

    /// One value.
    pub fn one<'de, D: serde::Deserializer<'de>, T: FromStr>(d: D) -> Result<T, D::Error>
    where
        T::Err: std::fmt::Display,
    {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }

    /// An optional value.
    pub fn opt<'de, D: serde::Deserializer<'de>, T: FromStr>(d: D) -> Result<Option<T>, D::Error>
    where
        T::Err: std::fmt::Display,
    {
        Option::<String>::deserialize(d)?.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
    }

    /// A list of values.
    pub fn vec<'de, D: serde::Deserializer<'de>, T: FromStr>(d: D) -> Result<Vec<T>, D::Error>
    where
        T::Err: std::fmt::Display,
    {
        Vec::<String>::deserialize(d)?.iter().map(|s| s.parse().map_err(serde::de::Error::custom)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::level_filters::LevelFilter;

    #[test]
    fn rust_log_takes_levels_and_targets_and_names_what_it_refuses() {
        let filter = log_filter(Some("warn,lanyard_sidecar::reload=debug")).unwrap();
        assert!(filter.would_enable("lanyard_sidecar::reload", &tracing::Level::DEBUG));
        assert!(!filter.would_enable("lanyard_sidecar::proxy", &tracing::Level::INFO));
        let default = log_filter(None).unwrap();
        assert!(default.would_enable("lanyard_sidecar::proxy", &tracing::Level::INFO));
        assert!(!default.would_enable("notify::inotify", &tracing::Level::INFO));
        assert_eq!(default.default_level(), Some(LevelFilter::INFO));
        let refused = log_filter(Some("lanyard=loud")).unwrap_err();
        assert!(refused.contains("RUST_LOG=\"lanyard=loud\""), "{refused}");
    }
}
