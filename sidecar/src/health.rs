//! `sidecar health`: an HTTPS readiness probe for compose healthchecks in
//! images without curl. Verifies the admin endpoint against the cert dir's
//! `ca.pem` and presents the sidecar's own certificate when it is valid.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use time::OffsetDateTime;
use tokio::net::TcpStream;

use crate::certdir::{self, CertDir, CA_FILE};
use crate::tls::{self, ServerCheck};

/// Largest answer body read.
const MAX_BODY: usize = 1 << 20;

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The URL is not `https://host:port/path`.
    #[error("invalid --url {0:?}: expected https://HOST[:PORT]/PATH")]
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
    let (host, port, path) = parse_url(url)?;

    let ca_path = cert_dir.file(CA_FILE);
    let raw = cert_dir.read_raw().map_err(|e| HealthError::Bundle(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for root in certdir::parse_certs(&ca_path, &raw.ca).map_err(|e| HealthError::Bundle(e.to_string()))? {
        roots.add(root).map_err(|e| HealthError::Bundle(format!("{}: {e}", ca_path.display())))?;
    }
    let own = raw.validate(OffsetDateTime::now_utc()).ok();
    let config = tls::client_config_with(roots, &ServerCheck::ChainOnly, own.as_ref())
        .map_err(|e| HealthError::Bundle(e.to_string()))?;

    let Answer { status, body, .. } = get(&host, port, &path, Arc::new(config), limit).await?;
    if status == "200" {
        return Ok(body);
    }
    let reason = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or(if body.is_empty() { format!("HTTP status {status:?}") } else { body });
    Err(HealthError::NotReady(reason))
}

/// The host (an IPv6 address without its brackets), port (443 when none
/// is given) and path of an `https://` URL.
fn parse_url(url: &str) -> Result<(String, u16, String), HealthError> {
    let bad_url = || HealthError::Url(url.to_owned());
    let uri: http::Uri = url.parse().map_err(|_| bad_url())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad_url());
    }
    let authority = uri.authority().ok_or_else(bad_url)?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok((host, authority.port_u16().unwrap_or(443), path))
}

/// What a server answered, whatever the status.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: String,
    /// The body, trimmed.
    pub body: String,
    /// The server's clock, from its `Date` header.
    pub date: Option<OffsetDateTime>,
}

/// An HTTP `Date` header (IMF-fixdate, RFC 9110).
fn http_date(value: &str) -> Option<OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(value, &format).ok().map(|t| t.assume_utc())
}

/// GETs `path` from `host:port` over TLS with `config` within `limit`.
pub async fn get(
    host: &str,
    port: u16,
    path: &str,
    config: Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Result<Answer, HealthError> {
    request(host, port, "GET", path, None, config, limit).await
}

/// One HTTP/1.1 request (`body` as JSON) to `host:port` over TLS with
/// `config` within `limit`.
pub async fn request(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    config: Arc<rustls::ClientConfig>,
    limit: Duration,
) -> Result<Answer, HealthError> {
    let authority = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|_| HealthError::Url(format!("https://{authority}{path}")))?;
    let fetch = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| HealthError::Unreachable(format!("cannot connect to {authority}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await.map_err(|e| {
            HealthError::Unreachable(format!(
                "TLS to {authority} failed: {e} (the sidecar may still be serving its fallback certificate)"
            ))
        })?;
        let failed = |e: &dyn std::fmt::Display| HealthError::Unreachable(format!("https://{authority}{path}: {e}"));
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| failed(&e))?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header(HOST, &authority);
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned()))).map_err(|e| failed(&e))?;
        let response = sender.send_request(req).await.map_err(|e| failed(&e))?;
        let status = response.status().as_u16().to_string();
        let date = response.headers().get(hyper::header::DATE).and_then(|v| v.to_str().ok()).and_then(http_date);
        let bytes = Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(|e| failed(&e))?.to_bytes();
        Ok(Answer { status, body: String::from_utf8_lossy(&bytes).trim().to_owned(), date })
    };
    tokio::time::timeout(limit, fetch)
        .await
        .map_err(|_| HealthError::Unreachable(format!("no answer from https://{authority}{path} within {limit:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse() {
        assert_eq!(http_date("Tue, 01 Dec 2026 18:24:13 GMT"), Some(time::macros::datetime!(2026-12-01 18:24:13 UTC)));
        assert_eq!(http_date("Tue, 01 Dec 2026 18:24:13 +0000"), None);
    }

    #[test]
    fn urls_parse_with_and_without_ports_and_brackets() {
        let parsed = |url: &str| parse_url(url).map_err(|e| e.to_string());
        assert_eq!(parsed("https://127.0.0.1:9901/readyz"), Ok(("127.0.0.1".into(), 9901, "/readyz".into())));
        assert_eq!(parsed("https://[::1]:9901/readyz"), Ok(("::1".into(), 9901, "/readyz".into())));
        assert_eq!(parsed("https://[::1]/readyz"), Ok(("::1".into(), 443, "/readyz".into())));
        assert_eq!(parsed("https://web"), Ok(("web".into(), 443, "/".into())));
        assert_eq!(parsed("https://web:9901/readyz?x=1"), Ok(("web".into(), 9901, "/readyz?x=1".into())));
        for bad in ["http://web:9901/readyz", "web:9901", "https://", "https://[::1/readyz"] {
            assert!(parsed(bad).unwrap_err().contains("expected https://HOST[:PORT]/PATH"), "{bad}");
        }
    }
}
