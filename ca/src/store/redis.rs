//! The shared store: Redis, for several `ca serve` replicas.
//!
//! Keys (the product documents' names where they give one):
//! ```text
//! cert:{name}                 a public certificate object (the fields of GET /certificates)
//! account:{directory}:{email} an ACME account: credentials, sealed
//! challenge:{token}           an HTTP-01 answer, expiring by itself (TTL)
//! challenge-alpn:{name}       a TLS-ALPN-01 validation certificate and key, sealed, expiring
//! ca_file:{name}, ca_key:{name}  the CA's own files (keys sealed), see `mirror`
//! issued:{serial}             an issued certificate (JSON of `IssuedRecord`)
//! issued                      sorted set of serials by notBefore
//! identity:{name}:issued      set of an identity's serials
//! revoked                     sorted set of revoked serials by revocation time
//! token:{hash}                a bootstrap token (hashed), used atomically
//! schedule:{identity}         an identity's place in the renewal schedule
//! leader, leader:token        the leader's lease (holder, PX ttl) and its fencing token
//! docs:{kind}                 the keys of a kind's lasting documents
//! ```
//! Every multi-key change is one Lua script, so it is atomic. Key material
//! is sealed with a key only the CA replicas hold ([`StoreKey`]).

use std::sync::Mutex;
use std::time::Duration;

use redis::{Commands, Script};

use super::{DocRecord, Fence, IssuedRecord, ScheduleRow, Store, StoreError, StoreKey, TokenRecord, TokenRefusal};

/// How long one command may take before the connection is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections kept open (one command at a time on each).
const POOL: usize = 4;
/// Document kinds whose JSON carries key material.
const SEALED_KINDS: [&str; 3] = ["acme_account", "challenge_alpn", "ca_key"];

/// The Redis store.
pub struct RedisStore {
    client: redis::Client,
    /// The URL without credentials, for messages.
    url: String,
    pool: Vec<Mutex<Option<redis::Connection>>>,
    key: StoreKey,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.url).finish_non_exhaustive()
    }
}

/// The Redis key of a document.
fn doc_key(kind: &str, key: &str) -> String {
    match kind {
        "public_cert" => format!("cert:{key}"),
        "acme_account" => format!("account:{}", key.replacen('|', ":", 1)),
        "challenge" => format!("challenge:{key}"),
        "challenge_alpn" => format!("challenge-alpn:{key}"),
        other => format!("{other}:{key}"),
    }
}

/// `der` as a PEM block labelled `label`.
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap_or_default()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://`, or `rediss://` with rustls on
    /// aws-lc-rs, verifying the server against the system's roots and
    /// `fleet_roots`, PEM: a Redis with a certificate from this CA works
    /// as it is); fails when the server does not answer.
    pub fn open(url: &str, key: StoreKey, fleet_roots: Option<&str>) -> Result<Self, StoreError> {
        let shown = redact(url);
        let err = |source| StoreError::Redis { url: shown.clone(), source };
        let client = if url.starts_with("rediss://") {
            let mut roots = fleet_roots.unwrap_or_default().to_owned();
            for der in rustls_native_certs::load_native_certs().certs {
                roots.push_str(&pem("CERTIFICATE", der.as_ref()));
            }
            let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(roots.into_bytes()) };
            redis::Client::build_with_tls(url, certs).map_err(err)?
        } else {
            redis::Client::open(url).map_err(err)?
        };
        let store = Self { client, url: shown, pool: (0..POOL).map(|_| Mutex::new(None)).collect(), key };
        store.check()?;
        Ok(store)
    }

    /// Runs `f` on a pooled connection, connecting first when needed; a
    /// connection that failed is dropped, so the next call reconnects.
    fn with<T>(&self, f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>) -> Result<T, StoreError> {
        let slot = self
            .pool
            .iter()
            .find_map(|m| m.try_lock().ok())
            .unwrap_or_else(|| self.pool[0].lock().unwrap_or_else(|e| e.into_inner()));
        let mut slot = slot;
        let err = |source| StoreError::Redis { url: self.url.clone(), source };
        if slot.is_none() {
            let conn = self.client.get_connection_with_timeout(IO_TIMEOUT).map_err(err)?;
            conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
            conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
            *slot = Some(conn);
        }
        let conn = slot.as_mut().expect("connected above");
        let result = f(conn);
        if let Err(e) = &result {
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error() {
                *slot = None;
            }
        }
        result.map_err(err)
    }

    fn parse<T: serde::de::DeserializeOwned>(key: &str, json: &str) -> Result<T, StoreError> {
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt { key: key.to_owned(), what: e.to_string() })
    }

    /// The values of `keys`, in order, 500 to a round trip: a list of N
    /// rows costs N / 500 round trips, not N.
    fn mget(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            out.extend(self.with(|c| redis::cmd("MGET").arg(chunk).query::<Vec<Option<String>>>(c))?);
        }
        Ok(out)
    }

    /// The JSON rows at `keys` that exist, parsed, in order.
    fn rows<T: serde::de::DeserializeOwned>(&self, keys: &[String]) -> Result<Vec<T>, StoreError> {
        let values = self.mget(keys)?;
        keys.iter().zip(values).filter_map(|(key, value)| value.map(|json| Self::parse(key, &json))).collect()
    }

    fn records(&self, serials: &[String]) -> Result<Vec<IssuedRecord>, StoreError> {
        self.rows(&serials.iter().map(|s| format!("issued:{s}")).collect::<Vec<_>>())
    }

    fn seal_if_needed(&self, kind: &str, name: &str, json: &str) -> Result<String, StoreError> {
        if SEALED_KINDS.contains(&kind) {
            self.key.seal(name, json)
        } else {
            Ok(json.to_owned())
        }
    }

    fn open_if_needed(&self, kind: &str, name: &str, value: String) -> Result<String, StoreError> {
        if SEALED_KINDS.contains(&kind) {
            self.key.open(name, &value)
        } else {
            Ok(value)
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("store records serialize")
}

const RECORD: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[3])
  return 1
end
return 0";

const REVOKE: &str = r"
local j = redis.call('GET', KEYS[1])
if not j then return 0 end
local r = cjson.decode(j)
if r.revoked_at == nil or r.revoked_at == cjson.null then
  r.revoked_at = tonumber(ARGV[1])
  redis.call('SET', KEYS[1], cjson.encode(r))
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
end
return 1";

const USE_TOKEN: &str = r"
local j = redis.call('GET', KEYS[1])
if not j then return 'unknown' end
local t = cjson.decode(j)
if t.used_at ~= nil and t.used_at ~= cjson.null then return 'used' end
if tonumber(t.expires_at) <= tonumber(ARGV[1]) then return 'expired' end
t.used_at = tonumber(ARGV[1])
redis.call('SET', KEYS[1], cjson.encode(t))
return 'ok:' .. t.identity";

const FENCED_SET: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[2] or redis.call('GET', KEYS[3]) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[4])
return 1";

const LEASE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
end
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return -1";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn record_issued(&self, rec: &IssuedRecord) -> Result<(), StoreError> {
        let inserted: i64 = self.with(|c| {
            Script::new(RECORD)
                .key(format!("issued:{}", rec.serial))
                .key("issued")
                .key(format!("identity:{}:issued", rec.identity))
                .arg(to_json(rec))
                .arg(rec.not_before)
                .arg(&rec.serial)
                .invoke(c)
        })?;
        if inserted == 0 {
            return Err(StoreError::DuplicateSerial(rec.serial.clone()));
        }
        Ok(())
    }

    fn certificate(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        let key = format!("issued:{serial}");
        let json: Option<String> = self.with(|c| c.get(&key))?;
        json.map(|j| Self::parse(&key, &j)).transpose()
    }

    fn certificates(&self) -> Result<Vec<IssuedRecord>, StoreError> {
        let serials: Vec<String> = self.with(|c| c.zrevrange("issued", 0, -1))?;
        self.records(&serials)
    }

    fn revoke_serial(&self, serial: &str, at: i64) -> Result<bool, StoreError> {
        let found: i64 = self.with(|c| {
            Script::new(REVOKE).key(format!("issued:{serial}")).key("revoked").arg(at).arg(serial).invoke(c)
        })?;
        Ok(found == 1)
    }

    fn revoke_identity(&self, identity: &str, at: i64) -> Result<Vec<String>, StoreError> {
        let serials: Vec<String> = self.with(|c| c.smembers(format!("identity:{identity}:issued")))?;
        let mut revoked = Vec::new();
        for rec in self.records(&serials)? {
            if rec.revoked_at.is_none() && rec.not_after > at {
                self.revoke_serial(&rec.serial, at)?;
                revoked.push(rec.serial);
            }
        }
        revoked.sort();
        Ok(revoked)
    }

    fn revoked(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let serials: Vec<String> = self.with(|c| c.zrange("revoked", 0, -1))?;
        let mut out: Vec<(String, i64)> = self
            .records(&serials)?
            .into_iter()
            .filter(|r| r.not_after > now)
            .filter_map(|r| Some((r.serial, r.revoked_at?)))
            .collect();
        out.sort();
        Ok(out)
    }

    fn add_token(&self, hash: &str, identity: &str, expires_at: i64) -> Result<(), StoreError> {
        self.put_token(&TokenRecord { hash: hash.into(), identity: identity.into(), expires_at, used_at: None })
    }

    fn use_token(&self, hash: &str, now: i64) -> Result<Result<String, TokenRefusal>, StoreError> {
        let outcome: String = self.with(|c| Script::new(USE_TOKEN).key(format!("token:{hash}")).arg(now).invoke(c))?;
        Ok(match outcome.as_str() {
            "unknown" => Err(TokenRefusal::Unknown),
            "used" => Err(TokenRefusal::Used),
            "expired" => Err(TokenRefusal::Expired),
            ok => Ok(ok.strip_prefix("ok:").unwrap_or(ok).to_owned()),
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let hashes: Vec<String> = self.with(|c| c.smembers("tokens"))?;
        let mut out = Vec::new();
        for h in hashes {
            let key = format!("token:{h}");
            if let Some(json) = self.with(|c| c.get::<_, Option<String>>(&key))? {
                out.push(Self::parse(&key, &json)?);
            }
        }
        out.sort_by(|a: &TokenRecord, b| a.hash.cmp(&b.hash));
        Ok(out)
    }

    fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.with(|c| {
            redis::pipe().atomic().set(format!("token:{}", t.hash), to_json(t)).sadd("tokens", &t.hash).query::<()>(c)
        })
    }

    fn schedule(&self, identity: &str) -> Result<Option<ScheduleRow>, StoreError> {
        let key = format!("schedule:{identity}");
        let json: Option<String> = self.with(|c| c.get(&key))?;
        json.map(|j| Self::parse(&key, &j)).transpose()
    }

    fn put_schedule(&self, row: &ScheduleRow, fence: Option<&Fence>) -> Result<(), StoreError> {
        let key = format!("schedule:{}", row.identity);
        match fence {
            None => self.with(|c| {
                redis::pipe().atomic().set(&key, to_json(row)).sadd("schedules", &row.identity).query::<()>(c)
            }),
            Some(fence) => {
                let written: i64 = self.with(|c| {
                    Script::new(FENCED_SET)
                        .key(&key)
                        .key("leader:token")
                        .key("leader")
                        .key("schedules")
                        .arg(to_json(row))
                        .arg(fence.token)
                        .arg(&fence.holder)
                        .arg(&row.identity)
                        .invoke(c)
                })?;
                if written == 1 {
                    Ok(())
                } else {
                    Err(StoreError::Fenced(fence.token))
                }
            }
        }
    }

    fn retain_schedule(&self, identities: &[String]) -> Result<(), StoreError> {
        let existing: Vec<String> = self.with(|c| c.smembers("schedules"))?;
        for id in existing.iter().filter(|id| !identities.contains(id)) {
            self.with(|c| redis::pipe().atomic().del(format!("schedule:{id}")).srem("schedules", id).query::<()>(c))?;
        }
        Ok(())
    }

    fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let mut ids: Vec<String> = self.with(|c| c.smembers("schedules"))?;
        ids.sort();
        self.rows(&ids.iter().map(|id| format!("schedule:{id}")).collect::<Vec<_>>())
    }

    fn put_doc(&self, kind: &str, key: &str, json: &str) -> Result<(), StoreError> {
        let name = doc_key(kind, key);
        let value = self.seal_if_needed(kind, &name, json)?;
        self.with(|c| redis::pipe().atomic().set(&name, value).sadd(format!("docs:{kind}"), key).query::<()>(c))
    }

    fn put_expiring(&self, kind: &str, key: &str, json: &str, ttl: Duration) -> Result<(), StoreError> {
        let name = doc_key(kind, key);
        let value = self.seal_if_needed(kind, &name, json)?;
        self.with(|c| c.set_ex::<_, _, ()>(&name, value, ttl.as_secs().max(1)))
    }

    fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        let name = doc_key(kind, key);
        let value: Option<String> = self.with(|c| c.get(&name))?;
        value.map(|v| self.open_if_needed(kind, &name, v)).transpose()
    }

    fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut keys: Vec<String> = self.with(|c| c.smembers(format!("docs:{kind}")))?;
        keys.sort();
        let names: Vec<String> = keys.iter().map(|key| doc_key(kind, key)).collect();
        let values = self.mget(&names)?;
        let found = keys.into_iter().zip(names).zip(values);
        found
            .filter_map(|((key, name), value)| {
                value.map(|v| self.open_if_needed(kind, &name, v).map(|json| (key, json)))
            })
            .collect()
    }

    fn all_docs(&self) -> Result<Vec<DocRecord>, StoreError> {
        let index: Vec<String> = self.with(|c| redis::cmd("KEYS").arg("docs:*").query(c))?;
        let mut out = Vec::new();
        for kind in index.iter().filter_map(|k| k.strip_prefix("docs:")) {
            for (key, json) in self.docs(kind)? {
                out.push(DocRecord { kind: kind.to_owned(), key, json });
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, StoreError> {
        let name = doc_key(kind, key);
        let (deleted, _): (i64, i64) =
            self.with(|c| redis::pipe().atomic().del(&name).srem(format!("docs:{kind}"), key).query(c))?;
        Ok(deleted > 0)
    }

    fn check(&self) -> Result<(), StoreError> {
        self.with(|c| redis::cmd("PING").query::<String>(c)).map(drop)
    }

    fn lease(&self, holder: &str, ttl: Duration) -> Result<Option<u64>, StoreError> {
        let token: i64 = self.with(|c| {
            Script::new(LEASE).key("leader").key("leader:token").arg(holder).arg(ttl.as_millis() as u64).invoke(c)
        })?;
        Ok(u64::try_from(token).ok())
    }

    fn release(&self, holder: &str) -> Result<(), StoreError> {
        self.with(|c| Script::new(RELEASE).key("leader").arg(holder).invoke::<i64>(c)).map(drop)
    }
}
