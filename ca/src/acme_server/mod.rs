//! An RFC 8555 ACME server in `ca serve`, at `/acme/directory`, for the
//! fleet's own ACME clients (certbot, lego, Caddy, Traefik, Lanyard's own
//! client) to get internal certificates signed by the fleet's CA.
//!
//! - accounts (with optional external account binding), key change and
//!   deactivation;
//! - orders for the names `[acme_server] allow` admits, with `meta.profiles`
//!   (draft-ietf-acme-profiles) choosing the lifetime;
//! - HTTP-01 and TLS-ALPN-01 validation against the fleet (`validate`);
//! - finalize, certificate download, revocation by the account or the
//!   certificate's key;
//! - ARI (RFC 9773): `renewalInfo` suggests a window at 2/3 of the
//!   lifetime, pulled into the past when the certificate is revoked or its
//!   issuer is no longer the CA's current intermediate (after `ca rotate`).
//!
//! Every piece of state (nonces, accounts, orders, authorizations,
//! certificates) is a document in the CA's store, so replicas sharing a
//! Redis store serve one ACME server. Issued certificates carry no SPIFFE
//! ID and no clientAuth EKU: they can never pass as a mesh identity.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};
use lanyard_sidecar::certinfo::rfc3339;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::authority::Authority;
use crate::store::Store;

pub mod config;
pub mod jws;
mod problem;
mod validate;

pub use config::{AcmeServerConfig, Identifier, Policy};
use jws::{Jwk, Jws, Signer};
pub use problem::Problem;
use validate::Reach;

/// Where the ACME server lives in the API.
pub const PREFIX: &str = "/acme/";

const KIND_NONCE: &str = "acme_server_nonce";
const KIND_ACCOUNT: &str = "acme_server_account";
const KIND_ACCOUNT_KEY: &str = "acme_server_account_key";
const KIND_ORDER: &str = "acme_server_order";
const KIND_AUTHZ: &str = "acme_server_authz";
const KIND_CERT: &str = "acme_server_cert";

const NONCE_TTL: Duration = Duration::from_secs(3600);
/// How long a pending order and its authorizations may wait.
const ORDER_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an order's documents are kept after it expires.
const ORDER_KEEP: Duration = Duration::from_secs(8 * 24 * 3600);

type Reply = Response<Full<Bytes>>;

/// One request to `/acme/...`, its body read.
pub struct AcmeRequest<'a> {
    /// The method.
    pub method: &'a Method,
    /// The `Host` header: the server's URLs are built from it.
    pub host: Option<&'a str>,
    /// The path.
    pub path: &'a str,
    /// The `Content-Type` header.
    pub content_type: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Account {
    id: String,
    key: Value,
    status: String,
    contact: Vec<String>,
    eab_kid: Option<String>,
    created_at: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct OrderDoc {
    id: String,
    account: String,
    identifiers: Vec<Identifier>,
    authzs: Vec<String>,
    profile: String,
    expires: i64,
    /// The issued certificate's serial.
    cert: Option<String>,
    replaces: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct AuthzDoc {
    id: String,
    account: String,
    identifier: Identifier,
    status: String,
    expires: i64,
    challenges: Vec<ChallengeDoc>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChallengeDoc {
    #[serde(rename = "type")]
    kind: String,
    token: String,
    status: String,
    validated: Option<i64>,
    error: Option<Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CertDoc {
    serial: String,
    account: String,
    chain: String,
}

/// A document that belongs to one account.
trait Owned {
    /// What it is called in messages.
    const WHAT: &'static str;
    /// The account's ID.
    fn owner(&self) -> &str;
}

macro_rules! owned {
    ($($doc:ty => $what:literal),*) => {
        $(impl Owned for $doc {
            const WHAT: &'static str = $what;
            fn owner(&self) -> &str {
                &self.account
            }
        })*
    };
}
owned!(OrderDoc => "order", AuthzDoc => "authorization", CertDoc => "certificate");

/// A successful answer before the common headers.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    headers: Vec<(HeaderName, String)>,
}

impl Answer {
    fn json(status: StatusCode, v: Value) -> Self {
        Self { status, content_type: "application/json", body: v.to_string().into(), headers: Vec::new() }
    }

    fn empty(status: StatusCode) -> Self {
        Self { status, content_type: "application/json", body: Bytes::new(), headers: Vec::new() }
    }

    fn with(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// The server's URLs for one request's `Host`.
struct Urls {
    base: String,
}

impl Urls {
    fn url(&self, rest: &str) -> String {
        format!("{}/acme/{rest}", self.base)
    }
}

/// A request whose JWS verified.
struct Signed {
    jws: Jws,
    /// The account, for `kid` requests.
    account: Option<Account>,
    key: Jwk,
}

impl Signed {
    fn account(&self) -> Result<&Account, Problem> {
        self.account.as_ref().ok_or_else(|| Problem::malformed("this request must be signed by an account (kid)"))
    }
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn time_text(at: i64) -> String {
    OffsetDateTime::from_unix_timestamp(at).map(rfc3339).unwrap_or_default()
}

fn random_id() -> String {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG is available");
    B64.encode(bytes)
}

/// The ACME server.
pub struct AcmeServer {
    policy: Policy,
    reach: Reach,
    store: Arc<dyn Store>,
    authority: Arc<Authority>,
    runtime: tokio::runtime::Handle,
    /// Requests by resource.
    requests: Mutex<BTreeMap<&'static str, u64>>,
    /// Validations that succeeded, and that failed.
    validations: [AtomicU64; 2],
}

impl AcmeServer {
    /// The server for `policy`, validating from `runtime`.
    pub fn new(
        policy: Policy,
        store: Arc<dyn Store>,
        authority: Arc<Authority>,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        let reach = Reach {
            http01_port: policy.config.http01_port,
            tls_alpn01_port: policy.config.tls_alpn01_port,
            hosts: policy.config.hosts.clone(),
            timeout: policy.config.validation_timeout.get(),
        };
        Arc::new(Self {
            policy,
            reach,
            store,
            authority,
            runtime,
            requests: Mutex::new(RESOURCES.iter().map(|r| (*r, 0)).collect()),
            validations: Default::default(),
        })
    }

    /// Answers one request under [`PREFIX`]. Runs off the async runtime (it reads the store).
    pub fn handle(self: &Arc<Self>, req: &AcmeRequest<'_>) -> Reply {
        let rest = req.path.strip_prefix(PREFIX).unwrap_or_default();
        let parts: Vec<&str> = rest.split('/').collect();
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(resource_name(&parts)).or_default() += 1;
        let Some(host) = req.host else {
            return problem_reply(&Problem::malformed("the request has no Host header"));
        };
        let urls = Urls { base: format!("https://{host}") };
        let answer = self.route(&urls, req, &parts);
        let mut reply = match answer {
            Ok(a) => {
                let mut r = Response::new(Full::new(a.body));
                *r.status_mut() = a.status;
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static(a.content_type));
                for (name, value) in a.headers {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        r.headers_mut().append(name, v);
                    }
                }
                r
            }
            Err(p) => {
                if p.kind == "serverInternal" {
                    tracing::warn!(problem = %p, path = req.path, "ACME server error");
                }
                problem_reply(&p)
            }
        };
        let headers = reply.headers_mut();
        // A nonce for every POST answer and newNonce (RFC 8555 §6.5), not for
        // the unauthenticated GETs: each one is a document in the store.
        if req.method == Method::POST || parts == ["new-nonce"] {
            match self.new_nonce() {
                Ok(nonce) => {
                    headers.insert("replay-nonce", HeaderValue::from_str(&nonce).expect("base64url is header text"));
                }
                Err(e) => tracing::warn!(error = %e, "cannot store an ACME nonce"),
            }
        }
        if let Ok(link) = HeaderValue::from_str(&format!("<{}>;rel=\"index\"", urls.url("directory"))) {
            headers.append(hyper::header::LINK, link);
        }
        headers.insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        reply
    }

    fn route(self: &Arc<Self>, urls: &Urls, req: &AcmeRequest<'_>, parts: &[&str]) -> Result<Answer, Problem> {
        let post = req.method == Method::POST;
        if post
            && req.content_type.map(|c| c.split(';').next().unwrap_or_default().trim()) != Some("application/jose+json")
        {
            let mut p = Problem::malformed("ACME requests are application/jose+json");
            p.status = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return Err(p);
        }
        match (req.method, parts) {
            (&Method::GET, ["directory"]) => Ok(self.directory(urls)),
            (&Method::HEAD, ["new-nonce"]) => Ok(Answer::empty(StatusCode::OK)),
            (&Method::GET, ["new-nonce"]) => Ok(Answer::empty(StatusCode::NO_CONTENT)),
            (&Method::GET, ["renewal-info", id]) => self.renewal_info(id),
            (&Method::POST, ["new-account"]) => self.new_account(urls, &self.authenticate(urls, req, true)?),
            (&Method::POST, ["account", id]) => self.account(urls, &self.authenticate(urls, req, false)?, id),
            (&Method::POST, ["account", id, "orders"]) => self.orders(urls, &self.authenticate(urls, req, false)?, id),
            (&Method::POST, ["new-order"]) => self.new_order(urls, &self.authenticate(urls, req, false)?),
            (&Method::POST, ["order", id]) => {
                let signed = self.authenticate(urls, req, false)?;
                let order = self.owned_order(&signed, id)?;
                Ok(Answer::json(StatusCode::OK, self.order_json(urls, &order)?))
            }
            (&Method::POST, ["order", id, "finalize"]) => {
                self.finalize(urls, &self.authenticate(urls, req, false)?, id)
            }
            (&Method::POST, ["authz", id]) => {
                let signed = self.authenticate(urls, req, false)?;
                let authz = self.owned_authz(&signed, id)?;
                let answer = Answer::json(StatusCode::OK, authz_json(urls, &authz));
                Ok(if authz.status == "pending" { answer.with(hyper::header::RETRY_AFTER, "1") } else { answer })
            }
            (&Method::POST, ["chall", authz, index]) => {
                self.challenge(urls, &self.authenticate(urls, req, false)?, authz, index)
            }
            (&Method::POST, ["cert", serial]) => self.certificate(&self.authenticate(urls, req, false)?, serial),
            (&Method::POST, ["revoke-cert"]) => self.revoke(&self.authenticate(urls, req, true)?),
            (&Method::POST, ["key-change"]) => self.key_change(urls, &self.authenticate(urls, req, false)?),
            (m, p) if resource_name(p) != "unknown" => {
                let mut problem = Problem::malformed(format!("{m} is not allowed on {}", req.path));
                problem.status = StatusCode::METHOD_NOT_ALLOWED;
                Err(problem)
            }
            _ => Err(Problem::not_found(format!("no ACME resource {}", req.path))),
        }
    }

    fn directory(&self, urls: &Urls) -> Answer {
        let profiles: serde_json::Map<String, Value> = self
            .policy
            .profiles
            .iter()
            .map(|(name, life)| (name.clone(), json!(format!("serverAuth certificates valid for {life}"))))
            .collect();
        Answer::json(
            StatusCode::OK,
            json!({
                "newNonce": urls.url("new-nonce"),
                "newAccount": urls.url("new-account"),
                "newOrder": urls.url("new-order"),
                "revokeCert": urls.url("revoke-cert"),
                "keyChange": urls.url("key-change"),
                "renewalInfo": urls.url("renewal-info"),
                "meta": {
                    "profiles": profiles,
                    "externalAccountRequired": self.policy.config.eab_required,
                },
            }),
        )
    }

    fn new_nonce(&self) -> Result<String, crate::store::StoreError> {
        let nonce = random_id();
        self.store.put_expiring(KIND_NONCE, &nonce, "{}", NONCE_TTL)?;
        Ok(nonce)
    }

    /// Parses and checks the JWS: url, nonce (once), signer, signature.
    fn authenticate(&self, urls: &Urls, req: &AcmeRequest<'_>, jwk_allowed: bool) -> Result<Signed, Problem> {
        let jws = Jws::parse(req.body)?;
        let expected = format!("{}{}", urls.base, req.path);
        if jws.url != expected {
            return Err(Problem::unauthorized(format!(
                "the JWS url {:?} is not this request's URL {expected}",
                jws.url
            )));
        }
        let nonce = jws.nonce.as_deref().ok_or_else(|| Problem::bad_nonce("the JWS has no nonce"))?;
        if !self.store.delete_doc(KIND_NONCE, nonce)? {
            return Err(Problem::bad_nonce("the nonce is unknown, used or expired: fetch a new one"));
        }
        match &jws.signer {
            Signer::Jwk(key) if jwk_allowed => {
                jws.verify(key)?;
                let key = key.clone();
                Ok(Signed { jws, account: None, key })
            }
            Signer::Jwk(_) => Err(Problem::malformed("this request must be signed with the account's kid, not a jwk")),
            Signer::Kid(kid) => {
                let id = kid.rsplit_once("/acme/account/").map(|(_, id)| id).ok_or_else(|| {
                    Problem::account_does_not_exist(format!("kid {kid:?} is not an account URL of this server"))
                })?;
                let account = self
                    .load::<Account>(KIND_ACCOUNT, id)?
                    .ok_or_else(|| Problem::account_does_not_exist(format!("no account {kid}")))?;
                let key = Jwk::from_json(&account.key)?;
                jws.verify(&key)?;
                if account.status != "valid" {
                    return Err(Problem::unauthorized(format!("account {kid} is {}", account.status)));
                }
                Ok(Signed { jws, account: Some(account), key })
            }
        }
    }

    fn load<T: serde::de::DeserializeOwned>(&self, kind: &str, key: &str) -> Result<Option<T>, Problem> {
        match self.store.doc(kind, key)? {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Problem::server_internal(format!("the stored {kind} {key:?} is corrupt: {e}"))),
        }
    }

    fn save<T: Serialize>(&self, kind: &str, key: &str, doc: &T, ttl: Option<Duration>) -> Result<(), Problem> {
        let text = serde_json::to_string(doc).map_err(|e| Problem::server_internal(e.to_string()))?;
        match ttl {
            Some(ttl) => self.store.put_expiring(kind, key, &text, ttl)?,
            None => self.store.put_doc(kind, key, &text)?,
        }
        Ok(())
    }

    fn account_json(urls: &Urls, account: &Account) -> Value {
        json!({
            "status": account.status,
            "contact": account.contact,
            "orders": urls.url(&format!("account/{}/orders", account.id)),
            "key": account.key,
        })
    }

    fn new_account(&self, urls: &Urls, signed: &Signed) -> Result<Answer, Problem> {
        let payload = signed.jws.json()?;
        let thumbprint = signed.key.thumbprint();
        let location = |id: &str| urls.url(&format!("account/{id}"));
        if let Some(id) = self.store.doc(KIND_ACCOUNT_KEY, &thumbprint)? {
            if let Some(account) = self.load::<Account>(KIND_ACCOUNT, &id)? {
                return Ok(Answer::json(StatusCode::OK, Self::account_json(urls, &account))
                    .with(hyper::header::LOCATION, location(&id)));
            }
        }
        if payload.get("onlyReturnExisting").and_then(Value::as_bool) == Some(true) {
            return Err(Problem::account_does_not_exist("no account has this key"));
        }
        let contact = contacts(&payload)?;
        let eab_kid = match payload.get("externalAccountBinding") {
            Some(eab) => Some(jws::verify_eab(eab, &signed.key, &urls.url("new-account"), &self.policy.config.eab)?),
            None if self.policy.config.eab_required => {
                return Err(Problem::external_account_required(
                    "this server needs an external account binding: ask the CA's operator for a key ID and HMAC key",
                ))
            }
            None => None,
        };
        let account = Account {
            id: random_id(),
            key: signed.key.to_json(),
            status: "valid".into(),
            contact,
            eab_kid,
            created_at: now(),
        };
        self.save(KIND_ACCOUNT, &account.id, &account, None)?;
        self.store.put_doc(KIND_ACCOUNT_KEY, &thumbprint, &account.id)?;
        tracing::info!(account = %account.id, event = "acme_account", "ACME account created");
        Ok(Answer::json(StatusCode::CREATED, Self::account_json(urls, &account))
            .with(hyper::header::LOCATION, location(&account.id)))
    }

    fn account(&self, urls: &Urls, signed: &Signed, id: &str) -> Result<Answer, Problem> {
        let mut account = signed.account()?.clone();
        if account.id != id {
            return Err(Problem::unauthorized("the request is signed by another account"));
        }
        if !signed.jws.payload.is_empty() {
            let payload = signed.jws.json()?;
            if payload.get("contact").is_some() {
                account.contact = contacts(&payload)?;
            }
            match payload.get("status").and_then(Value::as_str) {
                Some("deactivated") => account.status = "deactivated".into(),
                Some(other) => {
                    return Err(Problem::malformed(format!("an account can only be deactivated, not {other:?}")))
                }
                None => {}
            }
            self.save(KIND_ACCOUNT, &account.id, &account, None)?;
        }
        Ok(Answer::json(StatusCode::OK, Self::account_json(urls, &account)))
    }

    fn orders(&self, urls: &Urls, signed: &Signed, id: &str) -> Result<Answer, Problem> {
        if signed.account()?.id != id {
            return Err(Problem::unauthorized("the request is signed by another account"));
        }
        let mut list = Vec::new();
        for (key, text) in self.store.docs(KIND_ORDER)? {
            if serde_json::from_str::<OrderDoc>(&text).is_ok_and(|o| o.account == id && o.expires > now()) {
                list.push(urls.url(&format!("order/{key}")));
            }
        }
        Ok(Answer::json(StatusCode::OK, json!({ "orders": list })))
    }

    fn new_order(&self, urls: &Urls, signed: &Signed) -> Result<Answer, Problem> {
        let account = signed.account()?;
        let payload = signed.jws.json()?;
        if payload.get("notBefore").is_some() || payload.get("notAfter").is_some() {
            return Err(Problem::malformed("notBefore and notAfter are not supported: choose a profile instead"));
        }
        let raw = payload
            .get("identifiers")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| Problem::malformed("the order has no identifiers"))?;
        let mut identifiers = Vec::new();
        for id in raw {
            let id = Identifier::from_json(id)?;
            self.policy.admit(&id)?;
            if !identifiers.contains(&id) {
                identifiers.push(id);
            }
        }
        let (profile, _) = self.policy.lifetime(payload.get("profile").and_then(Value::as_str))?;
        let expires = now() + ORDER_TTL.as_secs() as i64;
        let mut authzs = Vec::new();
        for identifier in &identifiers {
            let authz = AuthzDoc {
                id: random_id(),
                account: account.id.clone(),
                identifier: identifier.clone(),
                status: "pending".into(),
                expires,
                challenges: ["http-01", "tls-alpn-01"]
                    .iter()
                    .map(|kind| ChallengeDoc {
                        kind: (*kind).into(),
                        token: random_id(),
                        status: "pending".into(),
                        validated: None,
                        error: None,
                    })
                    .collect(),
            };
            self.save(KIND_AUTHZ, &authz.id, &authz, Some(ORDER_KEEP))?;
            authzs.push(authz.id);
        }
        let order = OrderDoc {
            id: random_id(),
            account: account.id.clone(),
            identifiers,
            authzs,
            profile,
            expires,
            cert: None,
            replaces: payload.get("replaces").and_then(Value::as_str).map(str::to_owned),
        };
        self.save(KIND_ORDER, &order.id, &order, Some(ORDER_KEEP))?;
        let location = urls.url(&format!("order/{}", order.id));
        Ok(Answer::json(StatusCode::CREATED, self.order_json(urls, &order)?).with(hyper::header::LOCATION, location))
    }

    /// The `kind` document `id`, if it belongs to the signing account.
    fn owned<T: serde::de::DeserializeOwned + Owned>(
        &self,
        signed: &Signed,
        kind: &str,
        id: &str,
    ) -> Result<T, Problem> {
        let doc = self.load::<T>(kind, id)?.ok_or_else(|| Problem::not_found(format!("no {} {id}", T::WHAT)))?;
        if doc.owner() != signed.account()?.id {
            return Err(Problem::unauthorized(format!("this {} belongs to another account", T::WHAT)));
        }
        Ok(doc)
    }

    fn owned_order(&self, signed: &Signed, id: &str) -> Result<OrderDoc, Problem> {
        self.owned(signed, KIND_ORDER, id)
    }

    fn owned_authz(&self, signed: &Signed, id: &str) -> Result<AuthzDoc, Problem> {
        self.owned(signed, KIND_AUTHZ, id)
    }

    /// The order's status, from its certificate, its expiry and its authorizations.
    fn order_status(&self, order: &OrderDoc) -> Result<(&'static str, Option<Value>), Problem> {
        if order.cert.is_some() {
            return Ok(("valid", None));
        }
        if order.expires <= now() {
            return Ok(("invalid", Some(Problem::malformed("the order expired").to_json())));
        }
        let mut all_valid = true;
        for id in &order.authzs {
            let authz = self.load::<AuthzDoc>(KIND_AUTHZ, id)?;
            match authz.as_ref().map(|a| a.status.as_str()) {
                Some("valid") => {}
                Some("pending") => all_valid = false,
                _ => {
                    let error = authz.and_then(|a| a.challenges.into_iter().find_map(|c| c.error));
                    return Ok(("invalid", error));
                }
            }
        }
        Ok((if all_valid { "ready" } else { "pending" }, None))
    }

    fn order_json(&self, urls: &Urls, order: &OrderDoc) -> Result<Value, Problem> {
        let (status, error) = self.order_status(order)?;
        let mut v = json!({
            "status": status,
            "expires": time_text(order.expires),
            "identifiers": order.identifiers,
            "authorizations": order.authzs.iter().map(|a| urls.url(&format!("authz/{a}"))).collect::<Vec<_>>(),
            "finalize": urls.url(&format!("order/{}/finalize", order.id)),
            "profile": order.profile,
        });
        if let Some(replaces) = &order.replaces {
            v["replaces"] = json!(replaces);
        }
        if let Some(serial) = &order.cert {
            v["certificate"] = json!(urls.url(&format!("cert/{serial}")));
        }
        if let Some(error) = error {
            v["error"] = error;
        }
        Ok(v)
    }

    fn challenge(
        self: &Arc<Self>,
        urls: &Urls,
        signed: &Signed,
        authz_id: &str,
        index: &str,
    ) -> Result<Answer, Problem> {
        let mut authz = self.owned_authz(signed, authz_id)?;
        let i: usize = index
            .parse()
            .ok()
            .filter(|i| *i < authz.challenges.len())
            .ok_or_else(|| Problem::not_found(format!("authorization {authz_id} has no challenge {index}")))?;
        // One challenge per authorization is tried (as Boulder does): a second
        // one while the first validates would race it for the authorization's status.
        let start = !signed.jws.payload.is_empty()
            && authz.status == "pending"
            && authz.challenges.iter().all(|c| c.status == "pending");
        if start {
            if authz.expires <= now() {
                return Err(Problem::unauthorized("the authorization expired: place a new order"));
            }
            authz.challenges[i].status = "processing".into();
            self.save(KIND_AUTHZ, &authz.id, &authz, Some(ORDER_KEEP))?;
            let key_auth = format!("{}.{}", authz.challenges[i].token, signed.key.thumbprint());
            let (server, kind, identifier, token) = (
                self.clone(),
                authz.challenges[i].kind.clone(),
                authz.identifier.clone(),
                authz.challenges[i].token.clone(),
            );
            let authz_id = authz.id.clone();
            self.runtime.spawn(async move {
                let result = match kind.as_str() {
                    "http-01" => server.reach.http01(&identifier, &token, &key_auth).await,
                    _ => server.reach.tls_alpn01(&identifier, &key_auth).await,
                };
                let record = tokio::task::spawn_blocking(move || server.record_validation(&authz_id, i, result));
                if let Ok(Err(e)) = record.await {
                    tracing::warn!(problem = %e, "cannot record an ACME validation");
                }
            });
        }
        let up = format!("<{}>;rel=\"up\"", urls.url(&format!("authz/{}", authz.id)));
        // Validations take milliseconds on a fleet's network: poll again in a second, not a client's default five.
        Ok(Answer::json(StatusCode::OK, challenge_json(urls, &authz, i))
            .with(hyper::header::LINK, up)
            .with(hyper::header::RETRY_AFTER, "1"))
    }

    fn record_validation(&self, authz_id: &str, i: usize, result: Result<(), Problem>) -> Result<(), Problem> {
        let Some(mut authz) = self.load::<AuthzDoc>(KIND_AUTHZ, authz_id)? else { return Ok(()) };
        let challenge = &mut authz.challenges[i];
        match &result {
            Ok(()) => {
                challenge.status = "valid".into();
                challenge.validated = Some(now());
                authz.status = "valid".into();
            }
            Err(p) => {
                challenge.status = "invalid".into();
                challenge.error = Some(p.to_json());
                authz.status = "invalid".into();
            }
        }
        self.validations[usize::from(result.is_err())].fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            identifier = %authz.identifier.value(),
            challenge = %authz.challenges[i].kind,
            result = %result.as_ref().map(|_| "valid".to_owned()).unwrap_or_else(|p| p.to_string()),
            event = "acme_validation",
            "ACME validation"
        );
        self.save(KIND_AUTHZ, &authz.id, &authz, Some(ORDER_KEEP))
    }

    fn finalize(&self, urls: &Urls, signed: &Signed, id: &str) -> Result<Answer, Problem> {
        let mut order = self.owned_order(signed, id)?;
        let (status, _) = self.order_status(&order)?;
        if status != "ready" {
            return Err(Problem::order_not_ready(format!(
                "the order is {status}: finalize once every authorization is valid, and only once"
            )));
        }
        let payload = signed.jws.json()?;
        let csr_b64 =
            payload.get("csr").and_then(Value::as_str).ok_or_else(|| Problem::malformed("finalize needs a csr"))?;
        let der =
            B64.decode(csr_b64.trim_end_matches('=')).map_err(|_| Problem::bad_csr("the csr is not base64url"))?;
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der.into())
            .map_err(|e| Problem::bad_csr(format!("the CSR does not parse or its signature does not verify: {e}")))?;
        let mut asked = Vec::new();
        for san in &csr.params.subject_alt_names {
            asked.push(match san {
                rcgen::SanType::DnsName(d) => Identifier::Dns(d.as_str().to_ascii_lowercase()),
                rcgen::SanType::IpAddress(ip) => Identifier::Ip(*ip),
                other => return Err(Problem::bad_csr(format!("the CSR asks for {other:?}; only DNS names and IPs"))),
            });
        }
        let cn = match csr.params.distinguished_name.get(&rcgen::DnType::CommonName) {
            Some(rcgen::DnValue::Utf8String(s)) => Some(s.clone()),
            Some(rcgen::DnValue::PrintableString(s)) => Some(s.as_str().to_owned()),
            Some(rcgen::DnValue::Ia5String(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        if let Some(cn) = cn {
            let id = cn.parse().map(Identifier::Ip).unwrap_or_else(|_| Identifier::Dns(cn.to_ascii_lowercase()));
            if !asked.contains(&id) {
                return Err(Problem::bad_csr(format!(
                    "the CSR's common name {cn:?} is not among its DNS and IP names"
                )));
            }
        }
        asked.sort();
        asked.dedup();
        let mut ordered = order.identifiers.clone();
        ordered.sort();
        if asked != ordered {
            let list = |ids: &[Identifier]| ids.iter().map(Identifier::value).collect::<Vec<_>>().join(", ");
            return Err(Problem::bad_csr(format!(
                "the CSR names [{}], the order [{}]: they must be the same",
                list(&asked),
                list(&ordered)
            )));
        }
        let (_, ttl) = self.policy.lifetime(Some(&order.profile))?;
        let dns: Vec<String> = order
            .identifiers
            .iter()
            .filter_map(|i| match i {
                Identifier::Dns(d) => Some(d.clone()),
                Identifier::Ip(_) => None,
            })
            .collect();
        let ips: Vec<std::net::IpAddr> = order
            .identifiers
            .iter()
            .filter_map(|i| match i {
                Identifier::Ip(ip) => Some(*ip),
                Identifier::Dns(_) => None,
            })
            .collect();
        let request = crate::issue::TlsServerRequest { csr: &csr, dns: &dns, ips: &ips, ttl };
        let label = format!("acme:{}", order.identifiers[0].value());
        let issued = self
            .authority
            .issue_tls_server(&request, &label, "acme-server")
            .map_err(|e| Problem::server_internal(format!("cannot sign: {e}")))?;
        let keep = Duration::from_secs((issued.info.not_after.unix_timestamp() - now()).max(0) as u64) + ORDER_KEEP;
        let doc =
            CertDoc { serial: issued.info.serial.clone(), account: order.account.clone(), chain: issued.pem.cert };
        self.save(KIND_CERT, &doc.serial, &doc, Some(keep))?;
        order.cert = Some(doc.serial.clone());
        self.save(KIND_ORDER, &order.id, &order, Some(ORDER_KEEP))?;
        tracing::info!(
            serial = %doc.serial,
            names = %dns.iter().cloned().chain(ips.iter().map(ToString::to_string)).collect::<Vec<_>>().join(","),
            profile = %order.profile,
            not_after = %rfc3339(issued.info.not_after),
            replaces = order.replaces.as_deref().unwrap_or(""),
            event = "acme_issued",
            "ACME certificate issued"
        );
        let location = urls.url(&format!("order/{}", order.id));
        Ok(Answer::json(StatusCode::OK, self.order_json(urls, &order)?).with(hyper::header::LOCATION, location))
    }

    fn certificate(&self, signed: &Signed, serial: &str) -> Result<Answer, Problem> {
        let doc: CertDoc = self.owned(signed, KIND_CERT, serial)?;
        Ok(Answer {
            status: StatusCode::OK,
            content_type: "application/pem-certificate-chain",
            body: doc.chain.into(),
            headers: Vec::new(),
        })
    }

    fn revoke(&self, signed: &Signed) -> Result<Answer, Problem> {
        let payload = signed.jws.json()?;
        let der = payload
            .get("certificate")
            .and_then(Value::as_str)
            .and_then(|c| B64.decode(c.trim_end_matches('=')).ok())
            .ok_or_else(|| Problem::malformed("revokeCert needs the certificate, base64url DER"))?;
        if let Some(reason) = payload.get("reason").and_then(Value::as_u64) {
            if reason > 10 || reason == 7 {
                return Err(Problem::bad_revocation_reason(format!("reason {reason} is not an RFC 5280 reason code")));
            }
        }
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| Problem::malformed(format!("the certificate does not parse: {e}")))?;
        let serial = lanyard_sidecar::certinfo::CertInfo::from_der(&der)
            .map_err(|e| Problem::malformed(format!("the certificate does not parse: {e}")))?
            .serial;
        let doc = self
            .load::<CertDoc>(KIND_CERT, &serial)?
            .ok_or_else(|| Problem::not_found(format!("certificate {serial} was not issued by this ACME server")))?;
        let authorised = match &signed.account {
            Some(account) => account.id == doc.account,
            None => signed.key.matches_spki(cert.public_key()),
        };
        if !authorised {
            return Err(Problem::unauthorized(
                "revoke with the account that ordered the certificate, or sign with the certificate's own key",
            ));
        }
        if !self.store.revoke_serial(&serial, now())? {
            return Err(Problem::already_revoked(format!("certificate {serial} is already revoked")));
        }
        tracing::info!(serial = %serial, event = "acme_revoked", "ACME certificate revoked");
        Ok(Answer::empty(StatusCode::OK))
    }

    fn key_change(&self, urls: &Urls, signed: &Signed) -> Result<Answer, Problem> {
        let mut account = signed.account()?.clone();
        let inner = Jws::from_value(&signed.jws.json()?)?;
        let Signer::Jwk(new_key) = &inner.signer else {
            return Err(Problem::malformed("the inner key-change JWS must carry the new key as jwk"));
        };
        inner.verify(new_key)?;
        if inner.url != signed.jws.url {
            return Err(Problem::malformed("the inner key-change JWS must name the same url as the outer one"));
        }
        let body = inner.json()?;
        let names_account = body
            .get("account")
            .and_then(Value::as_str)
            .is_some_and(|a| a.ends_with(&format!("/acme/account/{}", account.id)));
        let old = body.get("oldKey").map(Jwk::from_json).transpose()?;
        if !names_account || old.as_ref() != Some(&signed.key) {
            return Err(Problem::malformed(
                "the key-change payload must name this account and its current key as oldKey",
            ));
        }
        let thumbprint = new_key.thumbprint();
        if let Some(other) = self.store.doc(KIND_ACCOUNT_KEY, &thumbprint)? {
            let p = Problem::conflict("the new key belongs to an account already");
            return Ok(Answer::json(p.status, p.to_json())
                .with(hyper::header::LOCATION, urls.url(&format!("account/{other}"))));
        }
        self.store.put_doc(KIND_ACCOUNT_KEY, &thumbprint, &account.id)?;
        self.store.delete_doc(KIND_ACCOUNT_KEY, &signed.key.thumbprint())?;
        account.key = new_key.to_json();
        self.save(KIND_ACCOUNT, &account.id, &account, None)?;
        Ok(Answer::json(StatusCode::OK, Self::account_json(urls, &account)))
    }

    /// RFC 9773 `renewalInfo`: a window at 2/3 to 3/4 of the lifetime, or
    /// in the past (renew now) when the certificate is revoked or its
    /// issuer or root is no longer current.
    fn renewal_info(&self, cert_id: &str) -> Result<Answer, Problem> {
        let (aki, serial) = cert_id
            .split_once('.')
            .and_then(|(a, s)| {
                Some((B64.decode(a.trim_end_matches('=')).ok()?, B64.decode(s.trim_end_matches('=')).ok()?))
            })
            .ok_or_else(|| {
                Problem::malformed(format!("{cert_id:?} is not a certificate identifier (base64url AKI . serial)"))
            })?;
        let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
        let serial = hex.trim_start_matches("00").to_owned();
        let rec = self
            .store
            .certificate(&serial)?
            .ok_or_else(|| Problem::not_found(format!("no certificate with serial {serial}")))?;
        let ca = self.authority.ca();
        let current_issuer = current_key_id(ca.intermediate_pem()).is_some_and(|k| k == aki);
        let current_root = rec.root.as_deref().is_none_or(|r| r == ca.root().sha256);
        let (nb, na) = (rec.not_before, rec.not_after);
        let life = (na - nb).max(1);
        let (start, end, why) = if rec.revoked_at.is_some() || !current_issuer || !current_root {
            let why =
                if rec.revoked_at.is_some() { "revoked" } else { "issued by a CA key that has since been rotated" };
            (now() - 120, now() - 60, Some(why))
        } else {
            (nb + life * 2 / 3, nb + life * 3 / 4, None)
        };
        let mut body = json!({ "suggestedWindow": { "start": time_text(start), "end": time_text(end) } });
        if let Some(why) = why {
            body["explanation"] = json!(format!("renew now: the certificate is {why}"));
        }
        // Asked again after a twentieth of the lifetime: a 24 h certificate every 72 minutes.
        let retry = (life / 20).clamp(10, 6 * 3600);
        Ok(Answer::json(StatusCode::OK, body).with(hyper::header::RETRY_AFTER, retry.to_string()))
    }

    /// Requests, validations: Prometheus families.
    pub fn encode_metrics(&self, enc: &mut prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use lanyard_sidecar::metrics::counters;
        let requests = self.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
        counters(
            enc,
            "acme_server_requests",
            "Requests to the ACME server, by resource.",
            requests.iter().map(|(resource, n)| ([("resource", *resource)], *n)),
        )?;
        let validations = ["valid", "invalid"]
            .iter()
            .zip(&self.validations)
            .map(|(result, n)| ([("result", *result)], n.load(Ordering::Relaxed)));
        counters(enc, "acme_server_validations", "Challenge validations by the ACME server, by result.", validations)
    }
}

/// The Subject Key Identifier of the first certificate in `pem`.
fn current_key_id(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
        _ => None,
    })
}

fn contacts(payload: &Value) -> Result<Vec<String>, Problem> {
    let list: Vec<String> = match payload.get("contact") {
        None => Vec::new(),
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|_| Problem::malformed("contact must be a list of strings"))?
        }
    };
    if let Some(bad) = list.iter().find(|c| !c.starts_with("mailto:") || c.contains(',')) {
        let mut p = Problem::invalid_contact(format!("contact {bad:?}: give mailto:address"));
        p.kind = "unsupportedContact";
        return Err(p);
    }
    Ok(list)
}

fn challenge_json(urls: &Urls, authz: &AuthzDoc, i: usize) -> Value {
    let c = &authz.challenges[i];
    let mut v = json!({
        "type": c.kind,
        "url": urls.url(&format!("chall/{}/{i}", authz.id)),
        "token": c.token,
        "status": c.status,
    });
    if let Some(at) = c.validated {
        v["validated"] = json!(time_text(at));
    }
    if let Some(e) = &c.error {
        v["error"] = e.clone();
    }
    v
}

fn authz_json(urls: &Urls, authz: &AuthzDoc) -> Value {
    let status = if authz.status == "pending" && authz.expires <= now() { "expired" } else { authz.status.as_str() };
    json!({
        "identifier": authz.identifier,
        "status": status,
        "expires": time_text(authz.expires),
        "challenges": (0..authz.challenges.len()).map(|i| challenge_json(urls, authz, i)).collect::<Vec<_>>(),
    })
}

/// Every resource, so that each counter exists from the start.
const RESOURCES: [&str; 15] = [
    "directory",
    "new-nonce",
    "new-account",
    "account",
    "orders",
    "new-order",
    "order",
    "finalize",
    "authz",
    "challenge",
    "certificate",
    "revoke-cert",
    "key-change",
    "renewal-info",
    "unknown",
];

/// The resource a path names, for metrics and 405s.
fn resource_name(parts: &[&str]) -> &'static str {
    match parts {
        ["directory"] => "directory",
        ["new-nonce"] => "new-nonce",
        ["new-account"] => "new-account",
        ["account", _] => "account",
        ["account", _, "orders"] => "orders",
        ["new-order"] => "new-order",
        ["order", _] => "order",
        ["order", _, "finalize"] => "finalize",
        ["authz", _] => "authz",
        ["chall", _, _] => "challenge",
        ["cert", _] => "certificate",
        ["revoke-cert"] => "revoke-cert",
        ["key-change"] => "key-change",
        ["renewal-info", _] => "renewal-info",
        _ => "unknown",
    }
}

fn problem_reply(p: &Problem) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(p.to_json().to_string())));
    *r.status_mut() = p.status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    r
}
