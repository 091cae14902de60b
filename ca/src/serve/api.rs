//! The HTTPS API of `ca serve`.
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /health`, `GET /metrics` | anyone | status and Prometheus text |
//! | `GET /v1/roots`, `GET /v1/crl` | anyone | trust bundle, CRL (PEM) |
//! | `POST /v1/sign` | bootstrap token | `{"token","csr"}` → chain for the token's identity |
//! | `POST /v1/renew` | client certificate | `{"csr"}` → new chain for the caller's identity |
//! | `POST /v1/revoke` | admin certificate | `{"serial"}` or `{"identity"}` |
//! | `GET /v1/certificates`, `GET /v1/status` | admin certificate | issued certificates, schedule |
//! | `GET /.well-known/acme-challenge/{token}` | anyone | ACME HTTP-01 answers |
//! | `GET /.well-known/lanyard-on-demand/{name}` | edges (plain-HTTP listener only) | order `name` on demand ([`on_demand`]) |
//! | `/acme/...` | ACME clients (JWS) | the ACME server, with `[acme_server]` (`crate::acme_server`) |
//! | `GET, POST /certificates` | admin certificate | public (ACME) certificates: list, create |
//! | `GET, PUT /certificates/{name}` | admin certificate | one certificate; upload one from another provider |
//! | `POST /certificates/{name}/renew` | admin certificate | order again now |
//! | `DELETE /certificates/{name}/domains/{domain}` | admin certificate | re-issue without a domain |
//! | `GET /openapi.yaml` | anyone | this table as an OpenAPI document (`ca/openapi.yaml`) |
//!
//! A known path asked with another method gets 405 with `Allow`.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use lanyard_sidecar::certinfo::{rfc3339, CertInfo};
use serde_json::json;
use time::OffsetDateTime;

use crate::issue::{KeySource, LeafRequest};
use crate::keys::KeyType;
use crate::serve::bodies::{self, BodyError, EnrolBody, NewPublic, RenewBody, RevokeTarget, SignBody, UploadPublic};
use crate::serve::Service;
use crate::state::ADMIN_NAME;
use crate::store::TokenRefusal;
use crate::CaError;

/// This API's OpenAPI document, served at `/openapi.yaml`.
const OPENAPI: &str = include_str!("../../openapi.yaml");

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, kind.parse().expect("valid header"));
    r
}

fn json_reply(status: StatusCode, value: serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string() + "\n")
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Reply {
    json_reply(status, json!({ "error": message.to_string() }))
}

/// Most bytes read (and dropped) from an oversized body before answering 413,
/// so that the client sees the answer instead of a reset connection.
const MAX_DRAIN: usize = 8 * 1024 * 1024;

/// Reads a request body of at most `MAX_BODY` bytes; 413 beyond.
async fn read_body(mut body: Incoming) -> Result<Vec<u8>, Reply> {
    let (mut bytes, mut seen) = (Vec::new(), 0usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen <= MAX_BODY {
            bytes.extend_from_slice(&data);
        } else if seen > MAX_DRAIN {
            break;
        }
    }
    if seen > MAX_BODY {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {MAX_BODY} bytes")));
    }
    Ok(bytes)
}

/// A body parsed by `parse`, or the 400 that names what is wrong.
fn body_of<T>(body: &[u8], parse: fn(&[u8]) -> Result<T, BodyError>) -> Result<T, Box<Reply>> {
    parse(body).map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e)))
}

/// The answer to an ACME HTTP-01 validation, when `path` asks for one.
pub fn acme_challenge(svc: &Service, path: &str) -> Option<Reply> {
    let token = path.strip_prefix(lanyard_sidecar::edge::ACME_CHALLENGE_PREFIX)?;
    Some(match svc.acme.http01(token) {
        Some(key_auth) => reply(StatusCode::OK, "application/octet-stream", key_auth),
        None => error(StatusCode::NOT_FOUND, "no pending challenge with this token"),
    })
}

/// A TLS-ALPN-01 validation certificate for an edge sidecar, when `path` asks
/// for one (plain-HTTP listener only).
pub fn tls_alpn_challenge(svc: &Service, path: &str) -> Option<Reply> {
    let name = path.strip_prefix(lanyard_sidecar::edge::TLS_ALPN_PREFIX)?;
    Some(match svc.acme.tls_alpn01(name) {
        Some(pem) => reply(StatusCode::OK, "application/x-pem-file", pem),
        None => error(StatusCode::NOT_FOUND, "no pending TLS-ALPN-01 challenge for this name"),
    })
}

/// `GET /.well-known/lanyard-on-demand/{name}` (plain-HTTP listener): an
/// edge asks for a certificate for `name`. 200 once it is in its cert dir,
/// 403 when refused, 503 with `Retry-After` when not yet (pending, limited,
/// backing off), 404 without `[on_demand]`.
pub async fn on_demand(svc: &Service, name: &str) -> Reply {
    use crate::acme::OnDemandAnswer;
    let Some(on_demand) = svc.on_demand.clone() else {
        return error(StatusCode::NOT_FOUND, "this CA orders nothing on demand: add [on_demand] to lanyard.toml");
    };
    // Spawned: an edge that stops waiting does not cancel the order.
    let answer = tokio::spawn(on_demand.request(name.to_owned())).await;
    match answer.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())) {
        OnDemandAnswer::Ready(dir) => json_reply(StatusCode::OK, json!({ "name": name, "cert_dir": dir })),
        OnDemandAnswer::Refused(_, why) => error(StatusCode::FORBIDDEN, why),
        OnDemandAnswer::NotYet(why, at) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
            let after = (at - crate::acme::now()).max(1);
            r.headers_mut().insert(hyper::header::RETRY_AFTER, after.into());
            r
        }
    }
}

fn public_reply(result: Result<serde_json::Value, crate::acme::PublicError>, ok: StatusCode) -> Reply {
    use crate::acme::PublicError;
    match result {
        Ok(v) => json_reply(ok, v),
        Err(e @ PublicError::Unknown(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e @ PublicError::Invalid(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e @ PublicError::Exists(_)) => error(StatusCode::CONFLICT, e),
        Err(e @ PublicError::Store(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e @ PublicError::Corrupt { .. }) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn to_json<T: serde::Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// `/certificates...`: public certificates, for the admin only.
fn public_certificates(svc: &Service, method: &Method, rest: &str, body: &[u8]) -> Reply {
    use crate::acme::PublicError;
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    let not_found = |name: &str| Err::<serde_json::Value, _>(PublicError::Unknown(name.to_owned()));
    match (method, parts.as_slice()) {
        (&Method::GET, []) => public_reply(svc.acme.list().map(|l| json!({ "certificates": l })), StatusCode::OK),
        (&Method::POST, []) => {
            let body = match body_of(body, NewPublic::parse) {
                Ok(b) => b,
                Err(r) => return *r,
            };
            let created =
                svc.acme.create(&body.cert_name, body.domains, body.email, body.acme_directory_url, body.profile);
            public_reply(created.map(to_json), StatusCode::CREATED)
        }
        (&Method::GET, [name]) => public_reply(
            svc.acme.get(name).and_then(|c| c.map(to_json).map_or_else(|| not_found(name), Ok)),
            StatusCode::OK,
        ),
        (&Method::PUT, [name]) => {
            let body: UploadPublic = match body_of(body, bodies::parse) {
                Ok(b) => b,
                Err(r) => return *r,
            };
            public_reply(svc.acme.upload(name, &body.certificate, &body.key).map(to_json), StatusCode::OK)
        }
        (&Method::POST, [name, "renew"]) => public_reply(svc.acme.renew_now(name).map(to_json), StatusCode::ACCEPTED),
        (&Method::DELETE, [name, "domains", domain]) => public_reply(
            svc.acme.remove_domain(name, domain).map(|rest| match rest {
                Some(c) => to_json(c),
                None => json!({ "cert_name": name, "status": "removed" }),
            }),
            StatusCode::OK,
        ),
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} /certificates{rest}")),
    }
}

/// Handles one request from `remote`; `peer` is the verified client
/// certificate, if any. The body is read here; everything after it (store
/// reads and writes, signing, cert-dir checks) runs off the async runtime.
pub async fn handle(
    svc: Arc<Service>,
    peer: Option<Arc<CertInfo>>,
    remote: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if path.starts_with(crate::acme_server::PREFIX) {
        return Ok(acme_server(svc, req).await);
    }
    if let Some(allowed) = allowed_methods(&path).filter(|allowed| !allowed.contains(&method)) {
        let list = allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ");
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, format!("{path} accepts {list} only"));
        r.headers_mut().insert(hyper::header::ALLOW, list.parse().expect("method names are valid header text"));
        return Ok(r);
    }
    let body = match method {
        Method::POST | Method::PUT => match read_body(req.into_body()).await {
            Ok(body) => body,
            Err(r) => return Ok(r),
        },
        _ => Vec::new(),
    };
    let routed = tokio::task::spawn_blocking(move || route(&svc, peer.as_deref(), remote, &method, &path, &body));
    Ok(routed.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
}

/// `/acme/...`: the ACME server, or 404 naming `[acme_server]` when there is none.
async fn acme_server(svc: Arc<Service>, req: Request<Incoming>) -> Reply {
    let Some(server) = svc.acme_server.clone() else {
        return error(StatusCode::NOT_FOUND, "this CA runs no ACME server: add [acme_server] to lanyard.toml");
    };
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (host, content_type) = (header(hyper::header::HOST), header(hyper::header::CONTENT_TYPE));
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body = match method {
        Method::POST => match read_body(req.into_body()).await {
            Ok(body) => body,
            Err(r) => return r,
        },
        _ => Vec::new(),
    };
    let answered = tokio::task::spawn_blocking(move || {
        server.handle(&crate::acme_server::AcmeRequest {
            method: &method,
            host: host.as_deref(),
            path: &path,
            content_type: content_type.as_deref(),
            body: &body,
        })
    });
    answered.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Answers one request whose body was read.
fn route(
    svc: &Arc<Service>,
    peer: Option<&CertInfo>,
    remote: std::net::SocketAddr,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Reply {
    match (method, path) {
        (&Method::GET, "/health") => json_reply(StatusCode::OK, serde_json::to_value(svc.health()).unwrap_or_default()),
        (&Method::GET, "/metrics") => reply(StatusCode::OK, lanyard_sidecar::metrics::CONTENT_TYPE, svc.metrics_text()),
        (&Method::GET, "/openapi.yaml") => reply(StatusCode::OK, "application/yaml", OPENAPI),
        (&Method::GET, "/v1/roots") => {
            reply(StatusCode::OK, "application/x-pem-file", svc.authority.ca().bundle_pem().to_owned())
        }
        (&Method::GET, "/v1/crl") => reply(StatusCode::OK, "application/x-pem-file", svc.scheduler.crl()),
        (&Method::POST, "/v1/sign") => sign(svc, body),
        (&Method::POST, "/v1/enrol") => enrol(svc, remote, body),
        (&Method::POST, "/v1/renew") => renew(svc, peer, body),
        (&Method::POST, "/v1/revoke") => admin_refusal(svc, peer).unwrap_or_else(|| revoke(svc, body)),
        (&Method::GET, "/v1/certificates") => {
            admin_refusal(svc, peer).unwrap_or_else(|| match svc.authority.store().certificates() {
                Ok(list) => json_reply(StatusCode::OK, json!({ "certificates": list })),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            })
        }
        (&Method::GET, "/v1/status") => {
            admin_refusal(svc, peer).unwrap_or_else(|| match svc.authority.store().schedules() {
                Ok(rows) => json_reply(StatusCode::OK, json!({ "identities": rows })),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            })
        }
        (&Method::GET, p) if p.starts_with(lanyard_sidecar::edge::ACME_CHALLENGE_PREFIX) => {
            acme_challenge(svc, p).unwrap_or_else(|| error(StatusCode::NOT_FOUND, "no such challenge"))
        }
        (m, p) if p == "/certificates" || p.starts_with("/certificates/") => {
            admin_refusal(svc, peer).unwrap_or_else(|| public_certificates(svc, m, &p["/certificates".len()..], body))
        }
        _ => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
    }
}

/// The methods a known path answers (for 405 and its `Allow` header);
/// `None` for a path no method answers.
fn allowed_methods(path: &str) -> Option<&'static [Method]> {
    const GET: &[Method] = &[Method::GET];
    const POST: &[Method] = &[Method::POST];
    match path {
        "/health" | "/metrics" | "/openapi.yaml" | "/v1/roots" | "/v1/crl" | "/v1/certificates" | "/v1/status" => {
            Some(GET)
        }
        "/v1/sign" | "/v1/enrol" | "/v1/renew" | "/v1/revoke" => Some(POST),
        p if p.starts_with(lanyard_sidecar::edge::ACME_CHALLENGE_PREFIX) => Some(GET),
        p if p == "/certificates" || p.starts_with("/certificates/") => {
            let parts: Vec<&str> = p["/certificates".len()..].split('/').filter(|p| !p.is_empty()).collect();
            match parts.as_slice() {
                [] => Some(&[Method::GET, Method::POST]),
                [_] => Some(&[Method::GET, Method::PUT]),
                [_, "renew"] => Some(POST),
                [_, "domains", _] => Some(&[Method::DELETE]),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The refusal for a caller that is not the (unrevoked) admin, if it is not.
fn admin_refusal(svc: &Service, peer: Option<&CertInfo>) -> Option<Reply> {
    let Some(peer) = peer else {
        return Some(error(StatusCode::UNAUTHORIZED, "this endpoint needs the admin client certificate (STATE/admin)"));
    };
    let admin_id = svc.authority.ca().trust_domain().id(ADMIN_NAME).map(|id| id.to_string()).unwrap_or_default();
    let operators = format!("{admin_id}/");
    if !peer.uris.iter().any(|u| *u == admin_id || u.starts_with(&operators)) {
        return Some(error(StatusCode::FORBIDDEN, format!("{} is not the admin identity {admin_id}", peer_name(peer))));
    }
    if svc.is_revoked(&peer.serial) {
        return Some(error(StatusCode::FORBIDDEN, "the admin certificate is revoked"));
    }
    None
}

fn peer_name(peer: &CertInfo) -> String {
    lanyard_sidecar::verify::peer_identity(peer)
}

fn issued_reply(
    svc: &Service,
    result: Result<crate::issue::IssuedLeaf, CaError>,
    started: std::time::Instant,
) -> Reply {
    svc.metrics.observe_signing(started.elapsed());
    match result {
        Ok(issued) => {
            svc.metrics.issued(true);
            tracing::info!(
                identity = %lanyard_sidecar::verify::peer_identity(&issued.info),
                serial = %issued.info.serial,
                not_after = %rfc3339(issued.info.not_after),
                event = "issued",
                "signed through the API"
            );
            json_reply(
                StatusCode::OK,
                json!({
                    "certificate": issued.pem.cert,
                    "ca": issued.pem.ca,
                    "serial": issued.info.serial,
                    "not_after": rfc3339(issued.info.not_after),
                }),
            )
        }
        Err(e) => {
            svc.metrics.issued(false);
            let status = match &e {
                CaError::Csr { .. } | CaError::Name(_) | CaError::DuplicateName(_) | CaError::TtlTooLong { .. } => {
                    StatusCode::BAD_REQUEST
                }
                CaError::CsrNameNotAllowed { .. } | CaError::NotPermitted { .. } => StatusCode::FORBIDDEN,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, e)
        }
    }
}

/// Signs `csr` for identity `name` off the runtime, recorded as `source`,
/// and answers with the chain.
fn sign_csr(svc: &Arc<Service>, name: lanyard_sidecar::identity::DnsName, csr: String, source: &'static str) -> Reply {
    let request = csr_request(svc, name, csr);
    let started = std::time::Instant::now();
    issued_reply(svc, svc.authority.issue(&request, source), started)
}

/// The issuance template for `name` with the requester's CSR.
fn csr_request(svc: &Service, name: lanyard_sidecar::identity::DnsName, csr: String) -> LeafRequest {
    let mut req = svc.template(&name).unwrap_or(LeafRequest {
        name,
        dns: None,
        ips: Vec::new(),
        spiffe: None,
        ttl: svc.leaf_ttl,
        key: KeySource::Generate(KeyType::EcdsaP256),
    });
    req.key = KeySource::Csr { origin: "request body".into(), pem: csr };
    req
}

fn sign(svc: &Arc<Service>, body: &[u8]) -> Reply {
    let body: SignBody = match body_of(body, bodies::parse) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let identity = match svc.authority.store().use_token(&crate::token::secret_hash(&body.token), now) {
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Ok(Err(TokenRefusal::Unknown)) => return error(StatusCode::UNAUTHORIZED, "unknown token"),
        Ok(Err(TokenRefusal::Used)) => {
            return error(StatusCode::UNAUTHORIZED, "token already used; tokens are single use")
        }
        Ok(Err(TokenRefusal::Expired)) => {
            return error(StatusCode::UNAUTHORIZED, "token expired; create a new one with `ca token`")
        }
        Ok(Ok(identity)) => identity,
    };
    let Ok(name) = identity.parse() else {
        return error(StatusCode::BAD_REQUEST, format!("token identity {identity:?} is not a valid name"));
    };
    sign_csr(svc, name, body.csr, "sign")
}

/// `POST /v1/enrol`: a CSR for a key the caller made, authorized by an
/// enrolment credential for exactly one identity (`ca enrol NAME`).
fn enrol(svc: &Arc<Service>, remote: std::net::SocketAddr, body: &[u8]) -> Reply {
    let body: EnrolBody = match body_of(body, bodies::parse) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let store = svc.authority.store().clone();
    let caller = remote.to_string();
    let admitted = match crate::enrol::admit(store.as_ref(), &body.secret, &caller, now) {
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Ok(Err(refusal)) => {
            tracing::warn!(caller = %caller, "enrolment refused: {refusal}");
            return error(StatusCode::UNAUTHORIZED, refusal);
        }
        Ok(Ok(record)) => record,
    };
    tracing::info!(identity = %admitted.identity, credential = %admitted.id, caller = %caller, uses = admitted.uses, "enrolment");
    let Ok(name) = admitted.identity.parse() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("credential identity {:?} is not a valid name", admitted.identity),
        );
    };
    sign_csr(svc, name, body.csr, "enrol")
}

fn renew(svc: &Arc<Service>, peer: Option<&CertInfo>, body: &[u8]) -> Reply {
    let Some(peer) = peer else {
        return error(
            StatusCode::UNAUTHORIZED,
            "renew is authenticated by your current client certificate; present it",
        );
    };
    if svc.is_revoked(&peer.serial) {
        return error(StatusCode::FORBIDDEN, format!("certificate {} is revoked", peer.serial));
    }
    let prefix = format!("spiffe://{}/", svc.authority.ca().trust_domain());
    let Some(name) = peer.uris.iter().find_map(|u| u.strip_prefix(&prefix)).and_then(|n| n.parse().ok()) else {
        return error(StatusCode::FORBIDDEN, format!("{} has no SPIFFE ID in trust domain {prefix}", peer_name(peer)));
    };
    let body: RenewBody = match body_of(body, bodies::parse) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    sign_csr(svc, name, body.csr, "renew")
}

fn revoke(svc: &Arc<Service>, body: &[u8]) -> Reply {
    let target = match body_of(body, RevokeTarget::parse) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let store = svc.authority.store();
    let revoked = match target {
        RevokeTarget::Serial(serial) => match store.revoke_serial(&serial, now) {
            Ok(true) => vec![serial],
            Ok(false) => return error(StatusCode::NOT_FOUND, format!("no certificate with serial {serial}")),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        RevokeTarget::Identity(identity) => match store.revoke_identity(&identity, now) {
            Ok(list) if list.is_empty() => {
                return error(StatusCode::NOT_FOUND, format!("identity {identity:?} has no unexpired certificate"))
            }
            Ok(list) => list,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
    };
    // A managed identity whose served certificate was revoked gets a new key and certificate now.
    let refreshed = svc.scheduler.reissue_if_serving(&revoked).and_then(|()| svc.scheduler.refresh_crl());
    match refreshed {
        Ok(()) => json_reply(StatusCode::OK, json!({ "revoked": revoked })),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("revoked, but the CRL could not be written: {e}")),
    }
}
