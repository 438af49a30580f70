//! Online backup and offline restore of the log.
//!
//! A backup is the whole `hale.db` copied with SQLite's online backup API, a few hundred
//! pages per step, from a connection of its own that holds one read transaction from the
//! first step to the last. In WAL mode a reader never blocks the writer, so hale keeps
//! committing while the backup runs, and the read transaction pins the snapshot the backup
//! copies: the copy is the log exactly as it was committed when the backup began (WAL
//! frames included), never a mix of two moments. Without that transaction SQLite would
//! restart the copy after every commit of the writer and, under steady load, never finish.
//!
//! The copy is a plain SQLite file in rollback-journal mode (no `-wal` beside it), written
//! to a hidden temporary file in the target's directory, fsync'd, linked into place (never
//! over an existing file) and the directory fsync'd: a backup exists whole or not at all.
//! It is copied page by page, whatever the tables hold, so a log whose bodies are sealed
//! (encryption at rest) is backed up as it is. Snapshots are not part of a backup: the log
//! alone replays to the state, and a restored hale writes new snapshots as it goes.

use crate::data_dir::DataDir;
use crate::error::StoreError;
use crate::verify::{VerifyReport, verify_log};
use hale_core::Limits;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Pages copied per step: 1 MiB of 4 KiB pages, a few milliseconds of work, between which
/// progress is reported and a cancel is noticed.
pub const PAGES_PER_STEP: i32 = 256;

/// How far a copy has come, in database pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyProgress {
    pub pages_done: u64,
    pub pages_total: u64,
}

/// A finished backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub pages: u64,
    /// Records in the backup, and the last one's sequence number (0 for an empty log).
    pub records: u64,
    pub last_seq: u64,
}

/// Copies the log database at `log_path` into a new file `target`, online. `progress` is
/// called after every step; returning `false` cancels the backup (nothing is left behind).
/// Refuses to replace an existing `target`.
pub fn backup(
    log_path: &Path,
    target: &Path,
    pages_per_step: i32,
    progress: impl FnMut(CopyProgress) -> bool,
) -> Result<BackupReport, StoreError> {
    if target.exists() {
        return Err(StoreError::BackupExists { path: target.to_path_buf() });
    }
    let partial = partial_path(target)?;
    let result = (|| {
        let (pages, records, last_seq) = copy(log_path, &partial, pages_per_step, progress)?;
        install(&partial, target)?;
        let bytes = std::fs::metadata(target).map_err(StoreError::io("stat", target))?.len();
        Ok(BackupReport { path: target.to_path_buf(), bytes, pages, records, last_seq })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Checks a backup file read-only: every record's checksum and decoding, and the sequence
/// for gaps (as `verify` does for a data directory).
pub fn verify_backup(path: &Path, limits: &Limits, progress: impl FnMut(u64, u64)) -> Result<VerifyReport, StoreError> {
    if !path.is_file() {
        return Err(StoreError::Io {
            action: "open",
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such backup file"),
        });
    }
    verify_log(path, None, limits, None, progress)
}

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub limits: Limits,
    /// Restore into a directory that already holds a log: its `hale.db` and snapshots are
    /// moved aside into `DIR/replaced-<ms>/`, never deleted. Never allowed while a hale runs
    /// on the directory.
    pub force: bool,
    /// Names the directory the replaced files are moved into.
    pub now_ms: u64,
}

/// What `restore` is doing, for a progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreProgress {
    Copying(CopyProgress),
    Verifying { records_done: u64, records_total: u64 },
}

/// What `restore` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreReport {
    pub records: u64,
    pub last_seq: u64,
    pub agents: usize,
    /// Where the files the restore replaced went (with `force`).
    pub replaced: Option<PathBuf>,
}

/// Installs the backup `from` as the log of the data directory `data`, offline.
///
/// Refused while a hale holds the directory (its lock), even with `force`; refused for a
/// directory that holds anything but an unused lock and an empty `snapshots/`, unless
/// `force`. The backup is copied next to the log, and the copy checked record by record
/// before it becomes `hale.db`: a damaged backup changes nothing and names its records.
pub fn restore(
    from: &Path,
    data: &Path,
    options: &RestoreOptions,
    mut progress: impl FnMut(RestoreProgress),
) -> Result<RestoreReport, StoreError> {
    if !from.is_file() {
        return Err(StoreError::Io {
            action: "open",
            path: from.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such backup file"),
        });
    }
    // Whether a hale runs on it, before anything is created there.
    probe_lock(data)?;
    let occupied = occupants(data)?;
    if !occupied.is_empty() && !options.force {
        return Err(StoreError::NotEmpty { dir: data.to_path_buf(), entries: occupied.join(", ") });
    }
    // Held until the restore is done: a hale starting meanwhile is refused.
    let dir = DataDir::open(data)?;
    let log_path = dir.log_path();
    let restoring = dir.path().join(".hale.db.restoring");
    let _ = std::fs::remove_file(&restoring);
    let result = (|| {
        copy(from, &restoring, PAGES_PER_STEP, |done| {
            progress(RestoreProgress::Copying(done));
            true
        })?;
        let report = verify_log(&restoring, None, &options.limits, None, |records_done, records_total| {
            progress(RestoreProgress::Verifying { records_done, records_total })
        })?;
        if !report.is_clean() {
            return Err(StoreError::DamagedBackup { path: from.to_path_buf(), problems: describe(&report) });
        }
        let replaced = if occupied.is_empty() { None } else { Some(move_aside(&dir, options.now_ms)?) };
        install(&restoring, &log_path)?;
        Ok(RestoreReport {
            records: report.records,
            last_seq: report.last_seq.unwrap_or(0),
            agents: report.agents,
            replaced,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&restoring);
    }
    result
}

/// The problems of a report, one per record, for an error message.
fn describe(report: &VerifyReport) -> String {
    const SHOWN: usize = 10;
    let mut problems: Vec<String> =
        report.corrupt.iter().map(|(seq, reason)| format!("record {seq} is corrupt: {reason}")).collect();
    problems.extend(report.missing.iter().map(|seq| format!("record {seq} is missing")));
    let more = problems.len().saturating_sub(SHOWN);
    problems.truncate(SHOWN);
    if more > 0 {
        problems.push(format!("and {more} more"));
    }
    problems.join("; ")
}

/// Fails with `Locked` if a process holds `data`'s lock; creates nothing.
fn probe_lock(data: &Path) -> Result<(), StoreError> {
    let lock_path = data.join("LOCK");
    let mut lock = match OpenOptions::new().read(true).write(true).open(&lock_path) {
        Ok(lock) => lock,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(StoreError::Io { action: "open", path: lock_path, source: error }),
    };
    match lock.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = std::io::Read::read_to_string(&mut lock, &mut holder);
            let holder = if holder.trim().is_empty() { "pid unknown".to_string() } else { holder.trim().to_string() };
            Err(StoreError::Locked { dir: data.to_path_buf(), holder })
        }
        Err(TryLockError::Error(source)) => Err(StoreError::Io { action: "lock", path: lock_path, source }),
    }
}

/// What `data` holds besides an unused lock and an empty `snapshots/`.
fn occupants(data: &Path) -> Result<Vec<String>, StoreError> {
    let entries = match std::fs::read_dir(data) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        entries => entries.map_err(StoreError::io("list", data))?,
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", data))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let empty_snapshots = name == "snapshots"
            && std::fs::read_dir(entry.path()).map(|mut entries| entries.next().is_none()).unwrap_or(false);
        if name != "LOCK" && !empty_snapshots {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// Moves the log and the snapshots of `dir` into `replaced-<ms>/` (other files, such as
/// the secrets and the agents' logs, stay: they are not part of a backup).
fn move_aside(dir: &DataDir, now_ms: u64) -> Result<PathBuf, StoreError> {
    let aside = dir.path().join(format!("replaced-{now_ms}"));
    std::fs::create_dir(&aside).map_err(StoreError::io("create", &aside))?;
    for name in ["hale.db", "hale.db-wal", "hale.db-shm", "snapshots"] {
        let path = dir.path().join(name);
        if path.exists() {
            std::fs::rename(&path, aside.join(name)).map_err(StoreError::io("move aside", &path))?;
        }
    }
    std::fs::create_dir_all(dir.snapshot_dir()).map_err(StoreError::io("create", dir.snapshot_dir()))?;
    sync_dir(dir.path())?;
    Ok(aside)
}

/// `.NAME.partial` beside `target`, in the same directory so it can be linked into place.
fn partial_path(target: &Path) -> Result<PathBuf, StoreError> {
    let name = target.file_name().ok_or_else(|| StoreError::Io {
        action: "write",
        path: target.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "a backup needs a file name"),
    })?;
    Ok(target.with_file_name(format!(".{}.partial", name.to_string_lossy())))
}

/// Copies the database at `source` into a new file `target` with the online backup API,
/// inside one read transaction of the source. Returns the pages copied, and the records
/// and last sequence number of the snapshot copied.
fn copy(
    source: &Path,
    target: &Path,
    pages_per_step: i32,
    mut progress: impl FnMut(CopyProgress) -> bool,
) -> Result<(u64, u64, u64), StoreError> {
    let from = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    from.busy_timeout(Duration::from_secs(5))?;
    // Begins the read transaction that every step reads through: the snapshot is fixed here.
    from.execute_batch("BEGIN DEFERRED")?;
    let (records, last_seq): (i64, Option<i64>) =
        from.query_row("SELECT count(*), max(seq) FROM events", [], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let _ = std::fs::remove_file(target);
    let mut to = Connection::open(target)?;
    let pages = {
        let backup = Backup::new(&from, &mut to)?;
        loop {
            let step = backup.step(pages_per_step.max(1))?;
            let done = backup.progress();
            let total = done.pagecount.max(0) as u64;
            let copied =
                CopyProgress { pages_done: total - (done.remaining.max(0) as u64).min(total), pages_total: total };
            match step {
                StepResult::Done => {
                    progress(CopyProgress { pages_done: total, pages_total: total });
                    break total;
                }
                StepResult::More => {
                    if !progress(copied) {
                        return Err(StoreError::Cancelled);
                    }
                }
                // Busy or Locked (the enum is non-exhaustive): the destination is private and
                // the source is read inside a transaction already open, so this is rare;
                // wait as rusqlite's own loop does.
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    from.execute_batch("COMMIT")?;
    drop(from);
    to.close().map_err(|(_, error)| error)?;
    // The copied first page still says WAL (the source's mode); make the file a plain
    // rollback-journal database, one file with nothing beside it, readable read-only.
    let to = Connection::open(target)?;
    let mode: String = to.query_row("PRAGMA journal_mode = DELETE", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(StoreError::Sqlite(rusqlite::Error::InvalidQuery));
    }
    to.close().map_err(|(_, error)| error)?;
    File::open(target).and_then(|file| file.sync_all()).map_err(StoreError::io("fsync", target))?;
    Ok((pages, records as u64, last_seq.unwrap_or(0) as u64))
}

/// Links the finished `partial` to `target` (failing if `target` exists: never replaces
/// a file), removes `partial`, and fsyncs the directory.
fn install(partial: &Path, target: &Path) -> Result<(), StoreError> {
    std::fs::hard_link(partial, target).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            StoreError::BackupExists { path: target.to_path_buf() }
        } else {
            StoreError::Io { action: "link", path: target.to_path_buf(), source: error }
        }
    })?;
    std::fs::remove_file(partial).map_err(StoreError::io("remove", partial))?;
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|file| file.sync_all()).map_err(StoreError::io("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Log;
    use crate::record::Record;
    use hale_core::{AgentName, Event, Timestamp};

    fn record(seq: u64) -> Record {
        let event = Event::IncarnationStarted { agent: AgentName::new(format!("a{seq}")).unwrap(), incarnation: 1 };
        Record::encode(seq, Timestamp(seq), &event)
    }

    fn log_with(path: &Path, records: u64) -> Log {
        let mut log = Log::open(path).unwrap();
        let all: Vec<Record> = (1..=records).map(record).collect();
        log.append(&all).unwrap();
        log
    }

    #[test]
    fn a_backup_taken_while_the_writer_commits_is_the_log_as_it_was_when_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("hale.db");
        let mut log = log_with(&db, 20_000);
        let target = dir.path().join("copy.db");
        let mut next = 20_001;
        let mut steps = 0;
        // A commit of the writer between every step: without the read transaction the
        // copy would restart after each and never end.
        let report = backup(&db, &target, 8, |_| {
            steps += 1;
            log.append(&[record(next)]).unwrap();
            next += 1;
            true
        })
        .unwrap();
        assert!(steps > 10, "copied in {steps} steps");
        assert_eq!((report.records, report.last_seq), (20_000, 20_000));
        assert!(!dir.path().join("copy.db-wal").exists() && !dir.path().join(".copy.db.partial").exists());
        let copied = Log::open_read_only(&target).unwrap();
        assert_eq!((copied.count().unwrap(), copied.last_seq().unwrap()), (20_000, 20_000));
        let report = verify_backup(&target, &Limits::default(), |_, _| {}).unwrap();
        assert!(report.is_clean() && report.records == 20_000, "{report:?}");
        // Never over an existing file.
        assert!(matches!(backup(&db, &target, 8, |_| true), Err(StoreError::BackupExists { .. })));
        // Cancelled: nothing is left.
        let cancelled = dir.path().join("cancelled.db");
        assert!(matches!(backup(&db, &cancelled, 8, |_| false), Err(StoreError::Cancelled)));
        assert!(!cancelled.exists() && !dir.path().join(".cancelled.db.partial").exists());
    }

    #[test]
    fn restore_refuses_a_locked_or_occupied_directory_and_moves_the_old_log_aside_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("source.db");
        drop(log_with(&db, 50));
        let file = dir.path().join("b.db");
        backup(&db, &file, PAGES_PER_STEP, |_| true).unwrap();

        let data = dir.path().join("data");
        let options = RestoreOptions::default();
        let report = restore(&file, &data, &options, |_| {}).unwrap();
        assert_eq!((report.records, report.last_seq, report.replaced), (50, 50, None));

        let held = DataDir::open(&data).unwrap();
        let forced = RestoreOptions { force: true, ..Default::default() };
        assert!(matches!(restore(&file, &data, &forced, |_| {}), Err(StoreError::Locked { .. })));
        drop(held);
        assert!(matches!(restore(&file, &data, &options, |_| {}), Err(StoreError::NotEmpty { .. })));
        let forced = RestoreOptions { force: true, now_ms: 7, ..Default::default() };
        let report = restore(&file, &data, &forced, |_| {}).unwrap();
        assert_eq!(report.replaced, Some(data.join("replaced-7")));
        assert!(data.join("replaced-7/hale.db").exists() && data.join("hale.db").exists());
    }
}
