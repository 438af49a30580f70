//! openraft's storage for hale: the Raft log, the vote and the committed index in hale's
//! own SQLite database, and the state machine that folds committed entries into the core.
//!
//! - [`LogStore`] ([`log`]): `raft_log` and `raft_meta`, two tables of `hale.db` beside
//!   hale's `events`, written through a connection of its own in WAL mode with
//!   `synchronous = FULL`. Every stored entry and every metadata value carries a crc32c,
//!   checked on every read; a mismatch is an error naming what is damaged, never skipped.
//! - [`StateMachine`] ([`state_machine`]): a [`hale_core::Core`] fed the hale records of
//!   committed entries, the last applied log id and membership, and the snapshots
//!   (hale-store snapshots inside a small Raft header, kept in `raft-snapshot.bin`).
//! - [`mirror::Mirror`]: the committed records copied into `events`, for what reads
//!   hale's log.
//!
//! Blocking: SQLite and file calls run on tokio's blocking pool (`spawn_blocking`), not
//! with `block_in_place`: `block_in_place` panics on a current-thread runtime (the default
//! of `#[tokio::test]`, and what a caller may well run openraft on), and the hand-off
//! costs tens of microseconds against the milliseconds of the fsync it waits for.
//!
//! Architecture invariant: nothing here decides anything. The store keeps what openraft
//! hands it and gives it back checked; what the records mean is the core's business.

pub mod log;
pub mod mirror;
pub mod state_machine;

pub use log::{LogReader, LogStore};
pub use state_machine::{CommittedView, SnapshotBuilder, StateMachine, StateMachineOptions};

use crate::types::NodeId;
use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use std::path::PathBuf;

/// What can go wrong in the Raft storage. openraft sees it inside a [`StorageError`]
/// (and stops the node: its storage cannot be trusted); the message says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum RaftStoreError {
    /// SQLite refused an operation.
    #[error("raft log database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored Raft entry does not match its checksum.
    #[error(
        "raft log entry {index} is damaged: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}). This node's copy of the log cannot be trusted: restore the data directory from a backup, or remove the node from the cluster and add it back empty (its peers hold the entry)"
    )]
    EntryChecksum { index: u64, stored: u32, computed: u32 },
    /// A stored Raft entry matches its checksum but cannot be used.
    #[error("raft log entry {index} is damaged: {reason}")]
    EntryUndecodable { index: u64, reason: String },
    /// A stored vote, committed log id or purge mark is damaged.
    #[error(
        "raft metadata '{key}' is damaged: {reason}. Restore the data directory from a backup, or remove the node from the cluster and add it back empty"
    )]
    Meta { key: String, reason: String },
    /// A hale record inside a committed entry fails its checksum, or does not decode.
    #[error("hale record {seq} in raft log entry {index} cannot be applied: {source}")]
    Record {
        index: u64,
        seq: u64,
        #[source]
        source: hale_store::RecordError,
    },
    /// Committed records whose sequence numbers do not continue the state machine's.
    #[error(
        "hale record {seq} in raft log entry {index} does not follow record {last}: the records of committed entries must be numbered one after another"
    )]
    Sequence { index: u64, seq: u64, last: u64 },
    /// A Raft snapshot that cannot be used.
    #[error("raft snapshot {what}: {reason}")]
    Snapshot { what: String, reason: String },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// hale-store refused (a hale snapshot file).
    #[error(transparent)]
    Store(#[from] hale_store::StoreError),
    /// A blocking storage task panicked or was cancelled.
    #[error("a storage task failed: {0}")]
    Task(String),
}

impl RaftStoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RaftStoreError {
        let path = path.into();
        move |source| RaftStoreError::Io { action, path, source }
    }

    /// The error as openraft takes it, about `subject` and what was being done to it.
    pub(crate) fn storage(self, subject: ErrorSubject<NodeId>, verb: ErrorVerb) -> StorageError<NodeId> {
        StorageIOError::new(subject, verb, &self).into()
    }
}

/// Runs `work` on tokio's blocking pool and waits for it.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RaftStoreError> + Send + 'static,
) -> Result<T, RaftStoreError> {
    tokio::task::spawn_blocking(work).await.map_err(|error| RaftStoreError::Task(error.to_string()))?
}
