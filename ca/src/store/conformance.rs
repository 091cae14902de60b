//! The same cases against every backend: the embedded SQLite store and a
//! real `redis-server` (Debian's), started here on its own port and killed
//! on drop. A missing redis-server fails the test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// A redis-server of our own, in a temporary directory, with AOF on.
pub(crate) struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub(crate) fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed: scripts/test installs it");
        let server = Self { child, url: format!("redis://127.0.0.1:{port}"), _dir: dir };
        let client = ::redis::Client::open(server.url.as_str()).unwrap();
        for _ in 0..200 {
            if client.get_connection().is_ok_and(|mut c| ::redis::cmd("PING").query::<String>(&mut c).is_ok()) {
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {port} did not answer PING");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rec(serial: &str, identity: &str, not_after: i64) -> IssuedRecord {
    IssuedRecord {
        serial: serial.into(),
        identity: identity.into(),
        not_before: 0,
        not_after,
        source: "cli".into(),
        revoked_at: None,
        root: Some("r".into()),
    }
}

/// Every behaviour the control plane relies on.
fn conforms(store: &dyn Store) {
    store.record_issued(&rec("aa", "web", 100)).unwrap();
    assert!(matches!(store.record_issued(&rec("aa", "web", 100)), Err(StoreError::DuplicateSerial(_))));
    store.record_issued(&rec("bb", "web", 100)).unwrap();
    store.record_issued(&rec("cc", "api", 100)).unwrap();
    assert_eq!(store.certificate("cc").unwrap(), Some(rec("cc", "api", 100)));
    assert_eq!(store.certificate("zz").unwrap(), None);
    assert_eq!(store.certificates().unwrap().len(), 3);
    records_concurrently(store);
    assert_eq!(store.revoke_identity("web", 10).unwrap(), ["aa", "bb"]);
    assert!(store.revoke_serial("cc", 11).unwrap());
    assert!(store.revoke_serial("cc", 12).unwrap(), "revoking twice keeps the first time");
    assert_eq!(store.certificate("cc").unwrap().unwrap().revoked_at, Some(11));
    assert!(!store.revoke_serial("zz", 11).unwrap());
    assert_eq!(store.revoked(50).unwrap(), [("aa".into(), 10), ("bb".into(), 10), ("cc".into(), 11)]);
    assert!(store.revoked(100).unwrap().is_empty(), "expired entries leave the CRL");

    store.add_token("h1", "web", 100).unwrap();
    assert_eq!(store.use_token("h1", 50).unwrap(), Ok("web".into()));
    assert_eq!(store.use_token("h1", 51).unwrap(), Err(TokenRefusal::Used));
    store.add_token("h2", "web", 100).unwrap();
    assert_eq!(store.use_token("h2", 100).unwrap(), Err(TokenRefusal::Expired));
    assert_eq!(store.use_token("nope", 1).unwrap(), Err(TokenRefusal::Unknown));
    assert_eq!(store.tokens().unwrap().len(), 2);

    let row = ScheduleRow { identity: "web".into(), next_renewal: 5, ..Default::default() };
    store.put_schedule(&row, None).unwrap();
    store.put_schedule(&ScheduleRow { failures: 2, ..row.clone() }, None).unwrap();
    assert_eq!(store.schedule("web").unwrap().unwrap().failures, 2);
    store.put_schedule(&ScheduleRow { identity: "api".into(), ..row.clone() }, None).unwrap();
    store.retain_schedule(&["api".into()]).unwrap();
    assert_eq!(store.schedules().unwrap().iter().map(|r| r.identity.as_str()).collect::<Vec<_>>(), ["api"]);
    // More rows than one Redis MGET carries (500), listed in name order.
    let many: Vec<String> = (0..1200).map(|i| format!("svc-{i:04}")).collect();
    for id in &many {
        store.put_schedule(&ScheduleRow { identity: id.clone(), ..row.clone() }, None).unwrap();
    }
    let listed: Vec<String> = store.schedules().unwrap().into_iter().map(|r| r.identity).collect();
    assert_eq!(listed, std::iter::once("api".to_owned()).chain(many).collect::<Vec<_>>());
    store.retain_schedule(&["api".into()]).unwrap();

    store.put_doc("public_cert", "www", "{\"cert_name\":\"www\"}").unwrap();
    store.put_doc("acme_account", "https://acme.test/dir|ops@example.test", "{\"key\":\"secret\"}").unwrap();
    assert_eq!(
        store.doc("acme_account", "https://acme.test/dir|ops@example.test").unwrap().unwrap(),
        "{\"key\":\"secret\"}"
    );
    assert_eq!(store.docs("public_cert").unwrap(), [("www".into(), "{\"cert_name\":\"www\"}".into())]);
    assert_eq!(
        store.docs("acme_account").unwrap(),
        [("https://acme.test/dir|ops@example.test".into(), "{\"key\":\"secret\"}".into())],
        "a sealed kind is listed opened"
    );
    store.put_expiring("challenge", "tok", "auth", Duration::from_secs(3600)).unwrap();
    assert_eq!(store.doc("challenge", "tok").unwrap().as_deref(), Some("auth"));
    assert_eq!(store.all_docs().unwrap().len(), 2, "expiring documents are not lasting ones");
    assert!(store.delete_doc("public_cert", "www").unwrap());
    assert!(!store.delete_doc("public_cert", "www").unwrap());
    store.check().unwrap();
}

/// Many signings at once, as `ca serve` records them from its blocking
/// threads: each new serial is recorded, and of two at once with one
/// serial exactly one is. Adds 20 rows of identity `con`.
fn records_concurrently(store: &dyn Store) {
    let before = store.certificates().unwrap().len();
    let outcomes: Vec<(String, bool)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..24)
            .map(|i| {
                // Threads 0 and 1, 2 and 3, ... share a serial for the first 8.
                let serial = if i < 8 { format!("con-{:02}", i / 2) } else { format!("con-{i:02}") };
                s.spawn(move || {
                    let recorded = store.record_issued(&rec(&serial, "con", 100));
                    assert!(matches!(recorded, Ok(()) | Err(StoreError::DuplicateSerial(_))), "{serial}: {recorded:?}");
                    (serial, recorded.is_ok())
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for pair in outcomes[..8].chunks(2) {
        assert_ne!(pair[0].1, pair[1].1, "of two recordings of {} exactly one succeeds", pair[0].0);
    }
    assert!(outcomes[8..].iter().all(|(_, ok)| *ok));
    assert_eq!(store.certificates().unwrap().len(), before + 4 + 16);
    assert_eq!(store.certificate("con-03").unwrap(), Some(rec("con-03", "con", 100)));
}

/// What `ca store copy` relies on: an export imported elsewhere is equal.
fn copies_into(from: &dyn Store, to: &dyn Store) {
    let dump = from.export().unwrap();
    to.import(&dump).unwrap();
    let copy = to.export().unwrap();
    assert_eq!(copy.clone().normalized(), dump.clone().normalized());
    assert_eq!(copy.summary(), dump.summary());
}

#[test]
fn sqlite_and_redis_behave_alike_and_copy_into_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(dir.path()).unwrap();
    conforms(&sqlite);
    let server = RedisServer::start();
    let key = StoreKey::load_or_create(&dir.path().join("store.key")).unwrap();
    let redis = RedisStore::open(&server.url, key, None).unwrap();
    conforms(&redis);

    let other = tempfile::tempdir().unwrap();
    let back = SqliteStore::open(other.path()).unwrap();
    copies_into(&redis, &back);
    let again = RedisServer::start();
    let key = StoreKey::load_or_create(&dir.path().join("store.key")).unwrap();
    copies_into(&sqlite, &RedisStore::open(&again.url, key, None).unwrap());
}

#[test]
fn redis_seals_key_material_and_fences_a_stale_leader() {
    let dir = tempfile::tempdir().unwrap();
    let server = RedisServer::start();
    let store = RedisStore::open(&server.url, StoreKey::load_or_create(&dir.path().join("k")).unwrap(), None).unwrap();
    store.put_doc("acme_account", "dir|ops@example.test", "{\"key\":\"secret\"}").unwrap();
    let mut raw = ::redis::Client::open(server.url.as_str()).unwrap().get_connection().unwrap();
    let stored: String = ::redis::cmd("GET").arg("account:dir:ops@example.test").query(&mut raw).unwrap();
    assert!(stored.starts_with("sealed:v1:") && !stored.contains("secret"), "{stored}");
    let other = RedisStore::open(&server.url, StoreKey::load_or_create(&dir.path().join("k2")).unwrap(), None).unwrap();
    let err = other.doc("acme_account", "dir|ops@example.test").unwrap_err().to_string();
    assert!(err.contains("sealed with another key"), "{err}");

    let ttl = Duration::from_millis(300);
    let a = store.lease("a", ttl).unwrap().expect("a takes the free lease");
    assert_eq!(store.lease("b", ttl).unwrap(), None, "b waits while a holds it");
    assert_eq!(store.lease("a", ttl).unwrap(), Some(a), "a renews with the same token");
    let row = ScheduleRow { identity: "web".into(), ..Default::default() };
    let fence_a = Fence { holder: "a".into(), token: a };
    store.put_schedule(&row, Some(&fence_a)).unwrap();
    std::thread::sleep(ttl * 2);
    let b = store.lease("b", ttl).unwrap().expect("b takes the lapsed lease");
    assert!(b > a, "a new lease gets a greater token");
    assert!(matches!(store.put_schedule(&row, Some(&fence_a)), Err(StoreError::Fenced(t)) if t == a));
    store.put_schedule(&row, Some(&Fence { holder: "b".into(), token: b })).unwrap();
    store.release("a").unwrap();
    assert_eq!(store.lease("b", ttl).unwrap(), Some(b), "a cannot release b's lease");
}
