//! The embedded store: SQLite in `STATE/lanyard.db`, WAL mode.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{DocRecord, IssuedRecord, ScheduleRow, Store, StoreError, TokenRecord, TokenRefusal};

/// The store's file in the state directory.
pub const DB_FILE: &str = "lanyard.db";

/// Embedded SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    source TEXT NOT NULL,
    revoked_at INTEGER,
    root TEXT
);
CREATE INDEX IF NOT EXISTS certificates_identity ON certificates(identity);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS schedule (
    identity TEXT PRIMARY KEY,
    serial TEXT,
    not_after INTEGER,
    next_renewal INTEGER NOT NULL,
    last_renewal INTEGER,
    last_error TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    sans TEXT
);
CREATE TABLE IF NOT EXISTS docs (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    json TEXT NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (kind, key)
);
";

impl SqliteStore {
    /// Opens (creating if needed) the store in the state directory.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let path = state_dir.join(DB_FILE);
        let err = |source| StoreError::Sqlite { path: path.clone(), source };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        // Stores made by earlier versions lack these columns.
        for (table, column) in [("certificates", "root TEXT"), ("docs", "expires_at INTEGER")] {
            let name = column.split(' ').next().expect("a column name");
            let has: bool = conn
                .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = '{name}'"))
                .and_then(|mut s| s.exists([]))
                .map_err(err)?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column}")).map_err(err)?;
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Self { path, conn: Mutex::new(conn) })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).map_err(|source| StoreError::Sqlite { path: self.path.clone(), source })
    }
}

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<IssuedRecord> {
    Ok(IssuedRecord {
        serial: row.get(0)?,
        identity: row.get(1)?,
        not_before: row.get(2)?,
        not_after: row.get(3)?,
        source: row.get(4)?,
        revoked_at: row.get(5)?,
        root: row.get(6)?,
    })
}

fn schedule_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ScheduleRow> {
    Ok(ScheduleRow {
        identity: row.get(0)?,
        serial: row.get(1)?,
        not_after: row.get(2)?,
        next_renewal: row.get(3)?,
        last_renewal: row.get(4)?,
        last_error: row.get(5)?,
        failures: row.get(6)?,
        sans: row.get(7)?,
    })
}

const CERT_COLUMNS: &str = "serial, identity, not_before, not_after, source, revoked_at, root";
const SCHEDULE_COLUMNS: &str = "identity, serial, not_after, next_renewal, last_renewal, last_error, failures, sans";

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT hash, identity, expires_at, used_at FROM tokens ORDER BY hash")?;
            let rows = stmt.query_map([], |r| {
                Ok(TokenRecord { hash: r.get(0)?, identity: r.get(1)?, expires_at: r.get(2)?, used_at: r.get(3)? })
            })?;
            rows.collect()
        })
    }

    fn put_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO tokens (hash, identity, expires_at, used_at) VALUES (?1, ?2, ?3, ?4)",
                params![t.hash, t.identity, t.expires_at, t.used_at],
            )
            .map(drop)
        })
    }

    fn put_expiring(&self, kind: &str, key: &str, json: &str, ttl: std::time::Duration) -> Result<(), StoreError> {
        let expires_at = now() + ttl.as_secs() as i64;
        self.with(|c| {
            c.execute("DELETE FROM docs WHERE expires_at IS NOT NULL AND expires_at <= ?1", [now()])?;
            c.execute(
                "INSERT OR REPLACE INTO docs (kind, key, json, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![kind, key, json, expires_at],
            )
            .map(drop)
        })
    }

    fn all_docs(&self) -> Result<Vec<DocRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT kind, key, json FROM docs WHERE expires_at IS NULL ORDER BY kind, key")?;
            let rows = stmt.query_map([], |r| Ok(DocRecord { kind: r.get(0)?, key: r.get(1)?, json: r.get(2)? }))?;
            rows.collect()
        })
    }

    fn lease(&self, _holder: &str, _ttl: std::time::Duration) -> Result<Option<u64>, StoreError> {
        Ok(Some(0))
    }

    fn release(&self, _holder: &str) -> Result<(), StoreError> {
        Ok(())
    }

    fn record_issued(&self, rec: &IssuedRecord) -> Result<(), StoreError> {
        let inserted = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO certificates (serial, identity, not_before, not_after, source, root) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![rec.serial, rec.identity, rec.not_before, rec.not_after, rec.source, rec.root],
            )
        })?;
        if inserted == 0 {
            return Err(StoreError::DuplicateSerial(rec.serial.clone()));
        }
        Ok(())
    }

    fn certificate(&self, serial: &str) -> Result<Option<IssuedRecord>, StoreError> {
        self.with(|c| {
            c.query_row(&format!("SELECT {CERT_COLUMNS} FROM certificates WHERE serial = ?1"), [serial], record)
                .optional()
        })
    }

    fn certificates(&self) -> Result<Vec<IssuedRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {CERT_COLUMNS} FROM certificates ORDER BY not_before DESC"))?;
            let rows = stmt.query_map([], record)?;
            rows.collect()
        })
    }

    fn revoke_serial(&self, serial: &str, at: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE certificates SET revoked_at = COALESCE(revoked_at, ?2) WHERE serial = ?1",
                params![serial, at],
            )
        })
        .map(|n| n > 0)
    }

    fn revoke_identity(&self, identity: &str, at: i64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let serials: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT serial FROM certificates WHERE identity = ?1 AND revoked_at IS NULL AND not_after > ?2",
                )?;
                let rows = stmt.query_map(params![identity, at], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            tx.execute(
                "UPDATE certificates SET revoked_at = ?2 WHERE identity = ?1 AND revoked_at IS NULL AND not_after > ?2",
                params![identity, at],
            )?;
            tx.commit()?;
            Ok(serials)
        })
    }

    fn revoked(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL AND not_after > ?1 ORDER BY serial",
            )?;
            let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    fn add_token(&self, hash: &str, identity: &str, expires_at: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (hash, identity, expires_at) VALUES (?1, ?2, ?3)",
                params![hash, identity, expires_at],
            )
        })
        .map(|_| ())
    }

    fn use_token(&self, hash: &str, now: i64) -> Result<Result<String, TokenRefusal>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let row: Option<(String, i64, Option<i64>)> = tx
                .query_row("SELECT identity, expires_at, used_at FROM tokens WHERE hash = ?1", [hash], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let outcome = match row {
                None => Err(TokenRefusal::Unknown),
                Some((_, _, Some(_))) => Err(TokenRefusal::Used),
                Some((_, expires, None)) if expires <= now => Err(TokenRefusal::Expired),
                Some((identity, _, None)) => {
                    tx.execute(
                        "UPDATE tokens SET used_at = ?2 WHERE hash = ?1 AND used_at IS NULL",
                        params![hash, now],
                    )?;
                    Ok(identity)
                }
            };
            tx.commit()?;
            Ok(outcome)
        })
    }

    fn schedule(&self, identity: &str) -> Result<Option<ScheduleRow>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {SCHEDULE_COLUMNS} FROM schedule WHERE identity = ?1"),
                [identity],
                schedule_row,
            )
            .optional()
        })
    }

    fn put_schedule(&self, r: &ScheduleRow, _fence: Option<&super::Fence>) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO schedule (identity, serial, not_after, next_renewal, last_renewal, last_error, failures, sans)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(identity) DO UPDATE SET serial = ?2, not_after = ?3, next_renewal = ?4,
                   last_renewal = ?5, last_error = ?6, failures = ?7, sans = ?8",
                params![r.identity, r.serial, r.not_after, r.next_renewal, r.last_renewal, r.last_error, r.failures, r.sans],
            )
        })
        .map(|_| ())
    }

    fn retain_schedule(&self, identities: &[String]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let existing: Vec<String> = {
                let mut stmt = tx.prepare("SELECT identity FROM schedule")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for id in existing.iter().filter(|id| !identities.contains(id)) {
                tx.execute("DELETE FROM schedule WHERE identity = ?1", [id])?;
            }
            tx.commit()
        })
    }

    fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {SCHEDULE_COLUMNS} FROM schedule ORDER BY identity"))?;
            let rows = stmt.query_map([], schedule_row)?;
            rows.collect()
        })
    }

    fn put_doc(&self, kind: &str, key: &str, json: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO docs (kind, key, json, expires_at) VALUES (?1, ?2, ?3, NULL)",
                params![kind, key, json],
            )
            .map(drop)
        })
    }

    fn doc(&self, kind: &str, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT json FROM docs WHERE kind = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
                params![kind, key, now()],
                |r| r.get(0),
            )
            .optional()
        })
    }

    fn docs(&self, kind: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT key, json FROM docs WHERE kind = ?1 AND (expires_at IS NULL OR expires_at > ?2) ORDER BY key",
            )?;
            let rows = stmt.query_map(params![kind, now()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    fn delete_doc(&self, kind: &str, key: &str) -> Result<bool, StoreError> {
        self.with(|c| c.execute("DELETE FROM docs WHERE kind = ?1 AND key = ?2", params![kind, key]).map(|n| n > 0))
    }

    fn check(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT count(*) FROM certificates", [], |r| r.get::<_, i64>(0))).map(|_| ())
    }
}

impl SqliteStore {
    /// A consistent copy of the database, taken while it is in use.
    pub fn backup_to(&self, path: &Path) -> Result<(), StoreError> {
        self.with(|c| {
            let mut dst = Connection::open(path)?;
            let backup = rusqlite::backup::Backup::new(c, &mut dst)?;
            backup.run_to_completion(256, std::time::Duration::from_millis(0), None)
        })
    }
}
