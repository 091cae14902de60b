//! `sidecar health`: an HTTPS readiness probe for compose healthchecks in
//! images without curl. Verifies the admin endpoint against the cert dir's
//! `ca.pem` and presents the sidecar's own certificate when it is valid.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::certdir::{self, CertDir, CA_FILE};
use crate::tls::{self, ServerCheck};

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The URL is not `https://host:port/path`.
    #[error("invalid --url {0:?}: expected https://HOST:PORT/PATH")]
    Url(String),
    /// The trust bundle could not be read.
    #[error("cannot load the trust bundle: {0}")]
    Bundle(String),
    /// The endpoint could not be reached or verified in time.
    #[error("not ready: {0}")]
    Unreachable(String),
    /// The endpoint answered, but not with 200.
    #[error("not ready: {0}")]
    NotReady(String),
}

/// Probes `url`; returns the body on HTTP 200.
pub async fn probe(url: &str, cert_dir: &CertDir, limit: Duration) -> Result<String, HealthError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| HealthError::Url(url.to_owned()))?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let (host, port) = authority.rsplit_once(':').ok_or_else(|| HealthError::Url(url.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port: u16 = port.parse().map_err(|_| HealthError::Url(url.to_owned()))?;

    let ca_path = cert_dir.file(CA_FILE);
    let raw = cert_dir.read_raw().map_err(|e| HealthError::Bundle(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for root in certdir::parse_certs(&ca_path, &raw.ca).map_err(|e| HealthError::Bundle(e.to_string()))? {
        roots.add(root).map_err(|e| HealthError::Bundle(format!("{}: {e}", ca_path.display())))?;
    }
    let own = raw.validate(OffsetDateTime::now_utc()).ok();
    let config = tls::client_config_with(roots, &ServerCheck::ChainOnly, own.as_ref())
        .map_err(|e| HealthError::Bundle(e.to_string()))?;

    let (status, body) = get(&host, port, &path, Arc::new(config), limit).await?;
    if status == "200" {
        return Ok(body);
    }
    let reason = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or(if body.is_empty() { format!("HTTP status {status:?}") } else { body });
    Err(HealthError::NotReady(reason))
}

/// GETs `path` from `host:port` over TLS with `config` within `limit`;
/// returns the status code and the body, whatever the status.
pub async fn get(
    host: &str,
    port: u16,
    path: &str,
    config: Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Result<(String, String), HealthError> {
    request(host, port, "GET", path, None, config, limit).await
}

/// One HTTP/1.1 request (`body` as JSON) to `host:port` over TLS with
/// `config` within `limit`; the status code and the body, whatever the status.
pub async fn request(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    config: Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Result<(String, String), HealthError> {
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| HealthError::Url(format!("https://{authority}{path}")))?;
    let fetch = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| HealthError::Unreachable(format!("cannot connect to {authority}: {e}")))?;
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await.map_err(|e| {
            HealthError::Unreachable(format!(
                "TLS to {authority} failed: {e} (the sidecar may still be serving its fallback certificate)"
            ))
        })?;
        let body = body.unwrap_or_default();
        let head = if method == "GET" {
            format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n")
        } else {
            format!(
                "{method} {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
        };
        tls.write_all((head + body).as_bytes()).await.map_err(|e| HealthError::Unreachable(e.to_string()))?;
        let mut response = Vec::new();
        let _ = (&mut tls).take(1 << 20).read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response.split_whitespace().nth(1).unwrap_or("").to_owned();
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_owned()).unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(limit, fetch)
        .await
        .map_err(|_| HealthError::Unreachable(format!("no answer from https://{authority}{path} within {limit:?}")))?
}
