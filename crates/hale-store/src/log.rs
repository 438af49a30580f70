use crate::error::StoreError;
use crate::record::Record;
use hale_core::Timestamp;
use rusqlite::{Connection, OpenFlags, params};
use std::path::Path;

/// The log table of the SQLite database.
///
/// Opened in WAL mode with `synchronous = FULL`: every commit fsyncs the WAL, so a
/// transaction that returned has survived power loss (`NORMAL` would only survive a crash
/// of the process). A torn WAL tail from a crash mid-commit is discarded by SQLite's own
/// frame checksums, and it only ever holds transactions nobody was told about.
pub struct Log {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    format INTEGER NOT NULL,
    body   BLOB    NOT NULL,
    crc    INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS damaged_events (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER,
    format    INTEGER,
    body      BLOB,
    crc       INTEGER,
    reason    TEXT NOT NULL,
    set_aside_at_ms INTEGER NOT NULL
) STRICT;
";

impl Log {
    /// Opens (creating if needed) the log database at `path` for reading and writing.
    pub fn open(path: &Path) -> Result<Log, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Log { conn })
    }

    /// Opens an existing log database read-only (for `verify`).
    pub fn open_read_only(path: &Path) -> Result<Log, StoreError> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        Ok(Log { conn })
    }

    /// Appends `records` in one transaction; returns once it is committed and fsync'd.
    /// Every record's checksum is verified before it is written.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO events (seq, at_ms, format, body, crc) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            for record in records {
                if let Err(error) = record.check() {
                    return Err(StoreError::CorruptRecord {
                        seq: record.seq,
                        reason: format!("before writing: {error}"),
                    });
                }
                insert.execute(params![
                    record.seq as i64,
                    record.at.0 as i64,
                    record.format,
                    record.body,
                    record.crc
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
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

    /// Calls `visit` with every record after `after`, in sequence order, until it returns
    /// an error.
    pub fn scan<E: From<StoreError>>(
        &self,
        after: u64,
        mut visit: impl FnMut(Record) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut select = self
            .conn
            .prepare_cached("SELECT seq, at_ms, format, body, crc FROM events WHERE seq > ?1 ORDER BY seq")
            .map_err(StoreError::from)?;
        let mut rows = select.query([after as i64]).map_err(StoreError::from)?;
        while let Some(row) = rows.next().map_err(StoreError::from)? {
            let record = Record {
                seq: row.get::<_, i64>(0).map_err(StoreError::from)? as u64,
                at: Timestamp(row.get::<_, i64>(1).map_err(StoreError::from)? as u64),
                format: row.get(2).map_err(StoreError::from)?,
                body: row.get(3).map_err(StoreError::from)?,
                crc: row.get(4).map_err(StoreError::from)?,
            };
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
            "INSERT INTO damaged_events (seq, at_ms, format, body, crc, reason, set_aside_at_ms)
             SELECT seq, at_ms, format, body, crc, ?2, ?3 FROM events WHERE seq = ?1",
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
