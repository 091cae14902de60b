//! Plumbing shared by the `sidecar` and `ca` binaries: one-line argument
//! errors, logging, and the shutdown signal.

use std::process::ExitCode;

/// Parses the command line; a bad argument prints clap's first line (which
/// names the argument and value) and gives exit code 2.
pub fn parse_args<C: clap::Parser>() -> Result<C, ExitCode> {
    match C::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{}", e.to_string().lines().next().unwrap_or("error: invalid arguments"));
            Err(ExitCode::from(2))
        }
    }
}

/// Logs to stderr at `RUST_LOG` (default `info`), colored only on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,notify=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
