use crate::error::StoreError;
use crate::record::Record;
use hale_core::Timestamp;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::Path;
use std::sync::Arc;

/// The log table of the SQLite database.
///
/// Opened in WAL mode with `synchronous = FULL`: every commit fsyncs the WAL, so a
/// transaction that returned has survived power loss (`NORMAL` would only survive a crash
/// of the process). A torn WAL tail from a crash mid-commit is discarded by SQLite's own
/// frame checksums, and it only ever holds transactions nobody was told about.
pub struct Log {
    conn: Connection,
    /// Whether `events` has the `key_id` column (a read-only log of an older hale may not).
    has_key_id: bool,
    /// Key ids already in `encryption_keys`.
    known_keys: Vec<Arc<str>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    format INTEGER NOT NULL,
    body   BLOB    NOT NULL,
    crc    INTEGER NOT NULL,
    key_id TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS damaged_events (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER,
    format    INTEGER,
    body      BLOB,
    crc       INTEGER,
    reason    TEXT NOT NULL,
    set_aside_at_ms INTEGER NOT NULL,
    key_id    TEXT
) STRICT;
CREATE TABLE IF NOT EXISTS encryption_keys (
    key_id    TEXT PRIMARY KEY,
    first_seq INTEGER NOT NULL
) STRICT;
";

/// `key_id` (encryption at rest) came after the first logs were written: such a log gets
/// the column, NULL (plaintext) in every row it already holds.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    for table in ["events", "damaged_events"] {
        if !has_column(conn, table, "key_id")? {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN key_id TEXT"))?;
        }
    }
    Ok(())
}

/// The key that sealed `record`, if neither `known` nor `new_keys` holds it yet.
fn new_key(known: &[Arc<str>], record: &Record, new_keys: &[Arc<str>]) -> Option<Arc<str>> {
    record.key_id.as_ref().filter(|key_id| !known.contains(*key_id) && !new_keys.contains(*key_id)).cloned()
}

/// Refuses a record whose checksum does not match: what is written must read back.
fn checked_before_writing(record: &Record) -> Result<(), StoreError> {
    record
        .check()
        .map_err(|error| StoreError::CorruptRecord { seq: record.seq, reason: format!("before writing: {error}") })
}

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    let mut info = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = info.query_map([], |row| row.get::<_, String>(1))?.collect::<Result<Vec<_>, _>>()?;
    Ok(names.iter().any(|name| name == column))
}

fn has_table(conn: &Connection, table: &str) -> Result<bool, StoreError> {
    let found: Option<i64> = conn
        .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |row| row.get(0))
        .optional()?;
    Ok(found.is_some())
}

impl Log {
    /// Opens (creating if needed) the log database at `path` for reading and writing.
    pub fn open(path: &Path) -> Result<Log, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Log::with(conn, true)
    }

    fn with(conn: Connection, has_key_id: bool) -> Result<Log, StoreError> {
        let mut log = Log { conn, has_key_id, known_keys: Vec::new() };
        log.known_keys = log.key_uses()?.into_iter().map(|(id, _)| Arc::from(id)).collect();
        Ok(log)
    }

    /// Opens an existing log database read-only (for `verify`).
    pub fn open_read_only(path: &Path) -> Result<Log, StoreError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let has_key_id = has_column(&conn, "events", "key_id")?;
        Log::with(conn, has_key_id)
    }

    /// Opens (creating if needed) the log database at `path` to keep a copy of records
    /// that are durable elsewhere (a cluster node's committed Raft entries): its commits
    /// are not fsync'd, and [`copy`](Log::copy) skips records it holds already.
    pub fn open_copy(path: &Path) -> Result<Log, StoreError> {
        let log = Log::open(path)?;
        log.conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(log)
    }

    /// Appends `records` in one transaction; returns once it is committed and fsync'd.
    /// Every record's checksum is verified before it is written.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.insert(records, "INSERT")
    }

    /// Like [`append`](Log::append), but a record whose sequence number the log holds
    /// already is skipped (the copy a cluster node keeps: entries are applied again after
    /// a restart).
    pub fn copy(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.insert(records, "INSERT OR IGNORE")
    }

    fn insert(&mut self, records: &[Record], verb: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let mut new_keys: Vec<Arc<str>> = Vec::new();
        {
            let mut insert = tx.prepare_cached(&format!(
                "{verb} INTO events (seq, at_ms, format, body, crc, key_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))?;
            for record in records {
                checked_before_writing(record)?;
                insert.execute(params![
                    record.seq as i64,
                    record.at.0 as i64,
                    record.format,
                    record.body,
                    record.crc,
                    record.key_id.as_deref()
                ])?;
                if let Some(key_id) = new_key(&self.known_keys, record, &new_keys) {
                    // The first record a key sealed: where start checks that key.
                    tx.execute(
                        "INSERT OR IGNORE INTO encryption_keys (key_id, first_seq) VALUES (?1, ?2)",
                        params![&*key_id, record.seq as i64],
                    )?;
                    new_keys.push(key_id);
                }
            }
        }
        tx.commit()?;
        self.known_keys.extend(new_keys);
        Ok(())
    }

    /// Up to `limit` records after `after` not sealed with `key_id` (plaintext or another
    /// key), in seq order: what `rekey` reseals next.
    pub fn not_sealed_with(&self, key_id: &str, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let mut select = self.conn.prepare_cached(
            "SELECT seq, at_ms, format, body, crc, key_id FROM events
             WHERE seq > ?1 AND (key_id IS NULL OR key_id != ?2) ORDER BY seq LIMIT ?3",
        )?;
        let mut last_key = None;
        let records = select
            .query_map(params![after as i64, key_id, limit as i64], |row| read_record(row, &mut last_key))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(records)
    }

    /// Replaces records already in the log (same seq, same event, sealed anew) in one
    /// transaction; returns once it is committed and fsync'd. Every checksum is verified
    /// first.
    pub fn replace(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let mut new_keys: Vec<Arc<str>> = Vec::new();
        {
            let mut update =
                tx.prepare_cached("UPDATE events SET format = ?2, body = ?3, crc = ?4, key_id = ?5 WHERE seq = ?1")?;
            for record in records {
                checked_before_writing(record)?;
                update.execute(params![
                    record.seq as i64,
                    record.format,
                    record.body,
                    record.crc,
                    record.key_id.as_deref()
                ])?;
                if let Some(key_id) = new_key(&self.known_keys, record, &new_keys) {
                    new_keys.push(key_id);
                }
            }
            // The first record each key seals, for the check at start.
            for key_id in &new_keys {
                tx.execute(
                    "INSERT OR REPLACE INTO encryption_keys (key_id, first_seq)
                     SELECT ?1, min(seq) FROM events WHERE key_id = ?1",
                    params![&**key_id],
                )?;
            }
        }
        tx.commit()?;
        self.known_keys.extend(new_keys);
        Ok(())
    }

    /// Forgets the keys that seal no record any more (after `rekey`), and corrects the
    /// first record of those that do; returns the ids forgotten.
    pub fn forget_unused_keys(&mut self) -> Result<Vec<String>, StoreError> {
        let tx = self.conn.transaction()?;
        let unused: Vec<String> = {
            let mut select = tx.prepare(
                "SELECT key_id FROM encryption_keys
                 WHERE key_id NOT IN (SELECT DISTINCT key_id FROM events WHERE key_id IS NOT NULL)",
            )?;
            select.query_map([], |row| row.get(0))?.collect::<Result<Vec<_>, _>>()?
        };
        for key_id in &unused {
            tx.execute("DELETE FROM encryption_keys WHERE key_id = ?1", [key_id])?;
        }
        tx.execute(
            "UPDATE encryption_keys SET first_seq = (SELECT min(seq) FROM events WHERE events.key_id = encryption_keys.key_id)",
            [],
        )?;
        tx.commit()?;
        self.known_keys.retain(|known| !unused.iter().any(|gone| **gone == **known));
        Ok(unused)
    }

    /// Rebuilds the database file from its live rows and empties the WAL, so no old copy
    /// of a rewritten row is left in free pages or WAL frames (after `rekey`). Needs free
    /// disk space about the size of the log.
    pub fn scrub(&mut self) -> Result<(), StoreError> {
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        self.conn.execute_batch("VACUUM")?;
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Every key id that sealed records, with the first record it sealed.
    pub fn key_uses(&self) -> Result<Vec<(String, u64)>, StoreError> {
        if !has_table(&self.conn, "encryption_keys")? {
            return Ok(Vec::new());
        }
        let mut select = self.conn.prepare("SELECT key_id, first_seq FROM encryption_keys ORDER BY first_seq")?;
        let uses = select
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(uses)
    }

    /// The first record at or after `from` sealed with `key_id`.
    pub fn first_sealed_with(&self, key_id: &str, from: u64) -> Result<Option<Record>, StoreError> {
        if !self.has_key_id {
            return Ok(None);
        }
        let record = self
            .conn
            .query_row(
                "SELECT seq, at_ms, format, body, crc, key_id FROM events WHERE seq >= ?1 AND key_id = ?2 ORDER BY seq LIMIT 1",
                params![from as i64, key_id],
                |row| read_record(row, &mut None),
            )
            .optional()?;
        Ok(record)
    }

    /// The highest sequence number in the log, 0 if it is empty.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let last: Option<i64> = self.conn.query_row("SELECT max(seq) FROM events", [], |row| row.get(0))?;
        Ok(last.unwrap_or(0) as u64)
    }

    /// How many records the log holds.
    pub fn count(&self) -> Result<u64, StoreError> {
        let count: i64 = self.conn.query_row("SELECT count(*) FROM events", [], |row| row.get(0))?;
        Ok(count as u64)
    }

    /// The seq before the first record after `after` logged at or after `at_ms`: every
    /// record from `after` up to it was logged earlier (the last seq if none was logged
    /// since). It walks the rows in seq order without decoding a body, so a reader asking
    /// for recent events skips the old ones cheaply.
    pub fn seq_before_time(&self, after: u64, at_ms: u64) -> Result<u64, StoreError> {
        // One statement, so both answers come from the same view of a growing log.
        let seq: i64 = self.conn.query_row(
            "SELECT COALESCE(
                 (SELECT seq FROM events WHERE seq > ?1 AND at_ms >= ?2 ORDER BY seq LIMIT 1) - 1,
                 MAX((SELECT MAX(seq) FROM events), ?1),
                 ?1)",
            [after as i64, i64::try_from(at_ms).unwrap_or(i64::MAX)],
            |row| row.get(0),
        )?;
        Ok((seq as u64).max(after))
    }

    /// Calls `visit` with every record after `after`, in sequence order, until it returns
    /// an error.
    pub fn scan<E: From<StoreError>>(
        &self,
        after: u64,
        mut visit: impl FnMut(Record) -> Result<(), E>,
    ) -> Result<(), E> {
        let sql = if self.has_key_id {
            "SELECT seq, at_ms, format, body, crc, key_id FROM events WHERE seq > ?1 ORDER BY seq"
        } else {
            "SELECT seq, at_ms, format, body, crc, NULL FROM events WHERE seq > ?1 ORDER BY seq"
        };
        let mut select = self.conn.prepare_cached(sql).map_err(StoreError::from)?;
        let mut rows = select.query([after as i64]).map_err(StoreError::from)?;
        // Records of one key share its id: one allocation per run of the same key.
        let mut last_key: Option<Arc<str>> = None;
        while let Some(row) = rows.next().map_err(StoreError::from)? {
            let record = read_record(row, &mut last_key).map_err(StoreError::from)?;
            visit(record)?;
        }
        Ok(())
    }

    /// Sequence numbers already set aside by `--repair`.
    pub fn damaged_seqs(&self) -> Result<Vec<u64>, StoreError> {
        let mut select = self.conn.prepare("SELECT seq FROM damaged_events ORDER BY seq")?;
        let seqs = select.query_map([], |row| row.get::<_, i64>(0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(seqs.into_iter().map(|seq| seq as u64).collect())
    }

    /// Moves record `seq` (which may be absent, for a gap) into `damaged_events` with
    /// `reason`, in one transaction. Nothing is deleted that is not also kept there.
    pub fn set_aside(&mut self, seq: u64, reason: &str, now: Timestamp) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let moved = tx.execute(
            "INSERT INTO damaged_events (seq, at_ms, format, body, crc, key_id, reason, set_aside_at_ms)
             SELECT seq, at_ms, format, body, crc, key_id, ?2, ?3 FROM events WHERE seq = ?1",
            params![seq as i64, reason, now.0 as i64],
        )?;
        if moved == 0 {
            tx.execute(
                "INSERT INTO damaged_events (seq, reason, set_aside_at_ms) VALUES (?1, ?2, ?3)",
                params![seq as i64, reason, now.0 as i64],
            )?;
        }
        tx.execute("DELETE FROM events WHERE seq = ?1", [seq as i64])?;
        tx.commit()?;
        Ok(())
    }
}

/// One row of `seq, at_ms, format, body, crc, key_id`; `last_key` is reused while
/// consecutive rows name the same key.
fn read_record(row: &rusqlite::Row<'_>, last_key: &mut Option<Arc<str>>) -> rusqlite::Result<Record> {
    let key_id = match row.get_ref(5)? {
        rusqlite::types::ValueRef::Null => None,
        value => {
            let text = value.as_str()?;
            match last_key {
                Some(last) if &**last == text => Some(last.clone()),
                _ => {
                    let key: Arc<str> = Arc::from(text);
                    *last_key = Some(key.clone());
                    Some(key)
                }
            }
        }
    };
    Ok(Record {
        seq: row.get::<_, i64>(0)? as u64,
        at: Timestamp(row.get::<_, i64>(1)? as u64),
        format: row.get(2)?,
        body: row.get(3)?,
        crc: row.get(4)?,
        key_id,
    })
}
