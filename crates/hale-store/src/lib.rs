//! hale's durable log.
//!
//! * [`DataDir`]: the data directory, held by one process at a time (an exclusive lock on
//!   `DIR/LOCK`); it holds `hale.db` (the log) and `snapshots/`.
//! * [`Log`]: the `events` table of an embedded SQLite database in WAL mode with
//!   `synchronous = FULL`, so a committed transaction has been fsync'd and survives power
//!   loss. Every row is a [`Record`]: sequence number, time, format version, body and a
//!   crc32c over all four (and the key id of a sealed record).
//! * [`crypt`]: encryption at rest. With a [`Keyring`], every record body and snapshot is
//!   sealed with XChaCha20-Poly1305 under the current key, and names its key by id.
//! * [`DurableLog`]: what the engine needs of a log: append batches in order, learn later
//!   up to which sequence number they are durable, or that the log failed.
//! * [`Writer`]: the single-node [`DurableLog`], one thread that appends. It drains every
//!   pending append, commits them in one transaction (one fsync), then publishes the new
//!   durable position; after a failed commit it writes nothing more, because memory is now
//!   ahead of disk.
//! * [`snapshot`]: whole-state snapshots in files, checksummed, written atomically.
//! * [`recover`]: newest valid snapshot plus replay of the events after it.
//! * [`verify`]: an offline check of every record and snapshot ([`verify_backup`]: of a
//!   backup file).
//! * [`backup()`]: an online, consistent copy of the log while the writer commits;
//!   [`restore`] installs one into a data directory no hale holds, after checking it.
//!
//! Architecture invariant: nothing here decides anything. The store persists and reads
//! back `hale_core::Event`s and `hale_core::State`s; what they mean is the core's business.

pub mod backup;
pub mod crypt;
mod data_dir;
mod durable;
mod error;
mod log;
mod record;
mod recovery;
mod rekey;
pub mod snapshot;
mod verify;
mod writer;

pub use backup::{
    BackupReport, CopyProgress, PAGES_PER_STEP, RestoreOptions, RestoreProgress, RestoreReport, backup, restore,
    verify_backup,
};
pub use crypt::{Key, KeyError, Keyring, generate_key_line};
pub use data_dir::DataDir;
pub use durable::{Durability, DurableLog, NotLeader, ReadBarrier, WriteError};
pub use error::StoreError;
pub use log::Log;
pub use record::{ENCRYPTED, FORMAT, Record, RecordError};
pub use recovery::{Recovered, RecoveryOptions, RecoveryReport, SkippedSnapshot, check_keys, recover};
pub use rekey::{RekeyReport, rekey};
pub use verify::{SnapshotCheck, VerifyReport, verify, verify_with};
pub use writer::{CommitHook, Writer, WriterOptions};
