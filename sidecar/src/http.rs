//! HTTP mode for inbound listeners: HTTP/1.1 is proxied request by request
//! so that each request carries the verified client identity in a sanitized
//! `X-Forwarded-Client-Cert` header (Envoy's format). Any such header the
//! client sent is removed first. Upgrades (WebSocket) pass: the upgrade
//! request carries the header, and the upgraded stream is that request's.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::certinfo::CertInfo;

/// The header carrying the verified identity.
pub const XFCC: &str = "x-forwarded-client-cert";

/// The header value for a verified `peer`, as seen by the sidecar whose own
/// identity is `by`: `By=...;Hash=...;Subject="...";URI=...;DNS=...`.
/// A subject or SAN in UTF-8, or with separators or control characters in
/// it, is percent-encoded, so every certificate gets a header (the
/// `xfcc` fuzz target checks that `None` never happens).
pub fn xfcc_value(by: Option<&str>, peer: &CertInfo) -> Option<HeaderValue> {
    let clean = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if (c.is_ascii_graphic() || c == ' ') && !matches!(c, ';' | ',' | '"' | '%' | '\\') {
                out.push(c);
            } else {
                let mut utf8 = [0u8; 4];
                c.encode_utf8(&mut utf8).bytes().for_each(|b| out.push_str(&format!("%{b:02X}")));
            }
        }
        out
    };
    let mut parts = Vec::new();
    if let Some(by) = by {
        parts.push(format!("By={}", clean(by)));
    }
    parts.push(format!("Hash={}", peer.sha256));
    parts.push(format!("Subject=\"{}\"", clean(&peer.subject)));
    parts.extend(peer.uris.iter().map(|u| format!("URI={}", clean(u))));
    parts.extend(peer.dns.iter().map(|d| format!("DNS={}", clean(d))));
    HeaderValue::from_str(&parts.join(";")).ok()
}

/// Serves HTTP/1.1 on `downstream`, forwarding each request over one
/// upstream connection with the XFCC header set to `identity` (removed
/// when the client sent no certificate).
pub async fn proxy<S>(downstream: S, upstream: TcpStream, identity: Option<HeaderValue>) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, upstream_conn) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    let sender = Arc::new(Mutex::new(sender));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (sender, identity) = (sender.clone(), identity.clone());
        async move {
            let headers = req.headers_mut();
            while headers.remove(XFCC).is_some() {}
            if let Some(identity) = identity {
                headers.insert(XFCC, identity);
            }
            let client_upgrade = headers.contains_key(UPGRADE).then(|| hyper::upgrade::on(&mut req));
            let mut sender = sender.lock().await;
            sender.ready().await?;
            let mut response: Response<Incoming> = sender.send_request(req).await?;
            if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_upgrade)) = (response.status(), client_upgrade) {
                let app_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    if let (Ok(client), Ok(app)) = tokio::join!(client_upgrade, app_upgrade) {
                        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(app)).await;
                    }
                });
            }
            Ok::<_, hyper::Error>(response)
        }
    });
    let server =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(downstream), service).with_upgrades();
    let (served, _) = tokio::join!(server, upstream_conn.with_upgrades());
    served
}
