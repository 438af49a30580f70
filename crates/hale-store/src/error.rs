use std::path::PathBuf;

/// What can go wrong opening, reading or recovering a data directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("log database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Another process holds the data directory.
    #[error(
        "data directory {dir} is in use by another hale process ({holder}); stop it first, or use another --data directory"
    )]
    Locked { dir: PathBuf, holder: String },
    /// A log record failed its checksum or could not be decoded.
    #[error(
        "log record {seq} is corrupt: {reason}. hale will not start on a damaged log: run `hale verify --data DIR` to see the damage, restore a backup, or start with --repair to set the record aside (it is kept in the damaged_events table, never deleted)"
    )]
    CorruptRecord { seq: u64, reason: String },
    /// A sequence number is missing from the log.
    #[error(
        "log record {seq} is missing (the log jumps from {prev} to {next}). Run `hale verify --data DIR`; start with --repair to accept the gap"
    )]
    MissingRecord { seq: u64, prev: u64, next: u64 },
    /// Records or a snapshot are sealed with a key that is not configured. Not damage:
    /// nothing is set aside, hale does not start.
    #[error(
        "{what} is encrypted with key '{key_id}', which is not configured: give it in [server] encryption_key_file or HALE_ENCRYPTION_KEY (keep every key the data directory was written with, the one for new writes first). Nothing was changed"
    )]
    KeyNotConfigured { what: String, key_id: String },
    /// The key configured under a key id does not open what that id sealed.
    #[error(
        "key '{key_id}' does not decrypt {what}: wrong key. The key configured as '{key_id}' is not the one this data directory was written with; configure the right one. Nothing was changed"
    )]
    WrongKey { what: String, key_id: String },
    /// The log was written by a newer hale.
    #[error("the log was written in format {found}, newer than this hale understands ({supported}); upgrade hale")]
    NewerFormat { found: u32, supported: u32 },
    /// A backup would replace a file that exists.
    #[error("{path} exists; a backup never replaces a file: name a new one, or move the old one away")]
    BackupExists { path: PathBuf },
    /// A backup was cancelled before it finished (nothing was left behind).
    #[error("the backup was cancelled before it finished; no file was written")]
    Cancelled,
    /// A restore into a directory that already holds a data directory's files.
    #[error(
        "{dir} is not empty (it holds {entries}); restore into a new directory, or pass --force to move its log and snapshots aside (into {dir}/replaced-<time>/) first"
    )]
    NotEmpty { dir: PathBuf, entries: String },
    /// A backup whose records fail their checks; nothing was restored.
    #[error("the backup {path} is damaged: {problems}. Nothing was restored; use another backup")]
    DamagedBackup { path: PathBuf, problems: String },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { action, path, source }
    }
}
