//! The Raft log, vote and committed log id, in hale's SQLite database.
//!
//! Two tables of `hale.db`, beside hale's `events`:
//!
//! - `raft_log (log_index, term, leader, payload, crc)`: one row per entry. `payload` is
//!   the whole `openraft::Entry<TypeConfig>` encoded as JSON (serde_json, as hale's own
//!   records are; a binary encoding can come later under a new table or a format column),
//!   `crc` the crc32c of the payload. `term` and `leader` repeat the entry's log id so a
//!   row can be read without decoding it.
//! - `raft_meta (key, value, crc)`: the vote (`vote`), the committed log id (`committed`)
//!   and the last purged log id (`last_purged`), each JSON with the crc32c of the value.
//!
//! Every read checks the checksum, and that the entry decoded is the one its row says; a
//! mismatch is an error naming the index (openraft then stops the node), never a row
//! skipped. Every write is one transaction on a connection in WAL mode with
//! `synchronous = FULL`, so it has been fsync'd when it returns; [`LogStore::append`]
//! tells openraft (`LogFlushed::log_io_completed`) only then. openraft calls the store
//! from one task and waits for each call, so writes are serialized; the connection sits
//! behind a mutex only so that the blocking pool can borrow it.
//!
//! [`LogReader`]s (one per replication stream) open their own connection on first use:
//! in WAL mode readers do not wait for the writer, and they never see a transaction that
//! has not committed. Purging is done at once, in the same transaction that records the
//! new last purged log id.

use super::{RaftStoreError, blocking};
use crate::types::{NodeId, TypeConfig};
use hale_store::DataDir;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raft_log (
    log_index INTEGER PRIMARY KEY,
    term      INTEGER NOT NULL,
    leader    INTEGER NOT NULL,
    payload   BLOB    NOT NULL,
    crc       INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS raft_meta (
    key   TEXT PRIMARY KEY,
    value BLOB    NOT NULL,
    crc   INTEGER NOT NULL
) STRICT;
";

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// How long a statement waits for another connection's write lock (hale's own writer
/// shares the file) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// openraft's log storage on `hale.db`: entries, vote, committed and purged log ids.
pub struct LogStore {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

/// Reads entries for openraft's replication, on a connection of its own.
pub struct LogReader {
    path: PathBuf,
    conn: Option<Arc<Mutex<Connection>>>,
}

fn open_connection(path: &Path) -> Result<Connection, RaftStoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn lock(conn: &Mutex<Connection>) -> Result<std::sync::MutexGuard<'_, Connection>, RaftStoreError> {
    conn.lock().map_err(|_| RaftStoreError::Task("the log connection was poisoned by a panic".into()))
}

impl LogStore {
    /// Opens (creating its tables if needed) the Raft log in the data directory's
    /// `hale.db`.
    pub fn open(dir: &DataDir) -> Result<LogStore, RaftStoreError> {
        LogStore::open_database(&dir.log_path())
    }

    /// Opens (creating its tables if needed) the Raft log in the SQLite database at `path`.
    pub fn open_database(path: &Path) -> Result<LogStore, RaftStoreError> {
        let conn = open_connection(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(LogStore { path: path.to_path_buf(), conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs `work` on the store's connection, on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, RaftStoreError> + Send + 'static,
    ) -> Result<T, RaftStoreError> {
        let conn = self.conn.clone();
        blocking(move || work(&mut *lock(&conn)?)).await
    }
}

/// The rows `range` covers, as SQLite's `log_index >= start AND log_index < end`.
fn index_bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let to_sql = |index: u64| i64::try_from(index).unwrap_or(i64::MAX);
    let start = match range.start_bound() {
        Bound::Included(&index) => to_sql(index),
        Bound::Excluded(&index) => to_sql(index.saturating_add(1)),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&index) => to_sql(index.saturating_add(1)),
        Bound::Excluded(&index) => to_sql(index),
        Bound::Unbounded => i64::MAX,
    };
    (start, end)
}

/// The entries with `start <= index < end`, checked.
fn read_entries(conn: &Connection, start: i64, end: i64) -> Result<Vec<Entry<TypeConfig>>, RaftStoreError> {
    let mut select = conn.prepare_cached(
        "SELECT log_index, term, leader, payload, crc FROM raft_log
         WHERE log_index >= ?1 AND log_index < ?2 ORDER BY log_index",
    )?;
    let mut rows = select.query(params![start, end])?;
    let mut entries = Vec::new();
    while let Some(row) = rows.next()? {
        let index = row.get::<_, i64>(0)? as u64;
        let term = row.get::<_, i64>(1)? as u64;
        let leader = row.get::<_, i64>(2)? as u64;
        let payload: Vec<u8> = row.get(3)?;
        let stored = row.get::<_, i64>(4)? as u32;
        entries.push(checked_entry(index, term, leader, &payload, stored)?);
    }
    Ok(entries)
}

/// The entry stored in row `index`, if its checksum matches and it is the entry the row
/// says it is.
fn checked_entry(
    index: u64,
    term: u64,
    leader: u64,
    payload: &[u8],
    stored: u32,
) -> Result<Entry<TypeConfig>, RaftStoreError> {
    let computed = crc32c::crc32c(payload);
    if computed != stored {
        return Err(RaftStoreError::EntryChecksum { index, stored, computed });
    }
    let entry: Entry<TypeConfig> = serde_json::from_slice(payload)
        .map_err(|error| RaftStoreError::EntryUndecodable { index, reason: format!("undecodable: {error}") })?;
    let log_id = &entry.log_id;
    if log_id.index != index || log_id.leader_id.term != term || log_id.leader_id.node_id != leader {
        return Err(RaftStoreError::EntryUndecodable {
            index,
            reason: format!("the row says term {term} leader {leader} but it holds entry {log_id}"),
        });
    }
    Ok(entry)
}

/// The value stored under `key`, if any, checked.
fn read_meta<T: DeserializeOwned>(conn: &Connection, key: &str) -> Result<Option<T>, RaftStoreError> {
    let found: Option<(Vec<u8>, i64)> = conn
        .prepare_cached("SELECT value, crc FROM raft_meta WHERE key = ?1")?
        .query_row([key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((value, stored)) = found else { return Ok(None) };
    let (stored, computed) = (stored as u32, crc32c::crc32c(&value));
    if computed != stored {
        let reason = format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})");
        return Err(RaftStoreError::Meta { key: key.into(), reason });
    }
    serde_json::from_slice(&value)
        .map(Some)
        .map_err(|error| RaftStoreError::Meta { key: key.into(), reason: format!("undecodable: {error}") })
}

/// Stores `value` under `key` (in the caller's transaction, or committed at once).
fn write_meta<T: Serialize>(conn: &Connection, key: &str, value: &T) -> Result<(), RaftStoreError> {
    let value = serde_json::to_vec(value).expect("raft metadata always serializes");
    let crc = crc32c::crc32c(&value);
    conn.prepare_cached("INSERT OR REPLACE INTO raft_meta (key, value, crc) VALUES (?1, ?2, ?3)")?
        .execute(params![key, value, crc])?;
    Ok(())
}

/// The subject openraft reports a read failure under: the damaged entry when there is one.
fn read_subject(error: &RaftStoreError) -> ErrorSubject<NodeId> {
    match error {
        RaftStoreError::EntryChecksum { index, .. } | RaftStoreError::EntryUndecodable { index, .. } => {
            ErrorSubject::LogIndex(*index)
        }
        _ => ErrorSubject::Logs,
    }
}

fn read_failed(error: RaftStoreError) -> StorageError<NodeId> {
    let subject = read_subject(&error);
    error.storage(subject, ErrorVerb::Read)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (start, end) = index_bounds(&range);
        self.with_conn(move |conn| read_entries(conn, start, end)).await.map_err(read_failed)
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (start, end) = index_bounds(&range);
        let conn = self.conn.clone();
        let path = self.path.clone();
        let (conn, entries) = blocking(move || {
            let conn = match conn {
                Some(conn) => conn,
                None => Arc::new(Mutex::new(open_connection(&path)?)),
            };
            let entries = read_entries(&*lock(&conn)?, start, end)?;
            Ok((conn, entries))
        })
        .await
        .map_err(read_failed)?;
        self.conn = Some(conn);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        self.with_conn(|conn| {
            let last_purged_log_id: Option<LogId<NodeId>> = read_meta(conn, LAST_PURGED)?;
            let last: Option<(i64, i64, i64, Vec<u8>, i64)> = conn
                .query_row(
                    "SELECT log_index, term, leader, payload, crc FROM raft_log ORDER BY log_index DESC LIMIT 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
                )
                .optional()?;
            let last_log_id = match last {
                Some((index, term, leader, payload, crc)) => {
                    Some(checked_entry(index as u64, term as u64, leader as u64, &payload, crc as u32)?.log_id)
                }
                None => last_purged_log_id,
            };
            Ok(LogState { last_purged_log_id, last_log_id })
        })
        .await
        .map_err(read_failed)
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader { path: self.path.clone(), conn: None }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.with_conn(move |conn| write_meta(conn, VOTE, &vote))
            .await
            .map_err(|error| error.storage(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.with_conn(|conn| read_meta(conn, VOTE))
            .await
            .map_err(|error| error.storage(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        self.with_conn(move |conn| write_meta(conn, COMMITTED, &committed))
            .await
            .map_err(|error| error.storage(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.with_conn(|conn| Ok(read_meta::<Option<LogId<NodeId>>>(conn, COMMITTED)?.flatten()))
            .await
            .map_err(|error| error.storage(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encoded here, so the blocking task only writes.
        let rows: Vec<(u64, u64, u64, Vec<u8>)> = entries
            .into_iter()
            .map(|entry| {
                let payload = serde_json::to_vec(&entry).expect("entries always serialize");
                let log_id = entry.log_id;
                (log_id.index, log_id.leader_id.term, log_id.leader_id.node_id, payload)
            })
            .collect();
        let written = self
            .with_conn(move |conn| {
                let tx = conn.transaction()?;
                {
                    let mut insert = tx.prepare_cached(
                        "INSERT OR REPLACE INTO raft_log (log_index, term, leader, payload, crc)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for (index, term, leader, payload) in &rows {
                        let crc = crc32c::crc32c(payload);
                        insert.execute(params![*index as i64, *term as i64, *leader as i64, payload, crc])?;
                    }
                }
                // Committed with synchronous = FULL: fsync'd before this returns.
                tx.commit()?;
                Ok(())
            })
            .await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(error.storage(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.with_conn(move |conn| {
            conn.execute("DELETE FROM raft_log WHERE log_index >= ?1", [log_id.index as i64])?;
            Ok(())
        })
        .await
        .map_err(|error| error.storage(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            write_meta(&tx, LAST_PURGED, &log_id)?;
            tx.execute("DELETE FROM raft_log WHERE log_index <= ?1", [log_id.index as i64])?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|error| error.storage(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_half_open_index_bounds() {
        assert_eq!(index_bounds(&(3..7)), (3, 7));
        assert_eq!(index_bounds(&(3..=7)), (3, 8));
        assert_eq!(index_bounds(&(..)), (0, i64::MAX));
        assert_eq!(index_bounds(&(5..)), (5, i64::MAX));
        assert_eq!(index_bounds(&(..=u64::MAX)), (0, i64::MAX));
        assert_eq!(index_bounds(&(Bound::Excluded(4), Bound::Excluded(6))), (5, 6));
    }
}
