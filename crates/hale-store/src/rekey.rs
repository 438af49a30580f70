//! `hale rekey`: seals every record and snapshot of a data directory with the current key,
//! so the keys before it (or plaintext written before encryption was turned on) can be
//! retired.
//!
//! It runs with hale stopped (it takes the data directory's lock). Records are resealed
//! in batches, each one transaction: a crash part way leaves some records under the new
//! key and the rest under the old ones, all readable with the key list it was given, and
//! running it again finishes the job. Each event is decoded and encoded again, so a
//! damaged record is left as it is and reported (recovery and `hale verify` say more).
//! Snapshots are rewritten atomically. At the end the database is rebuilt (VACUUM) and
//! its WAL emptied, so no old copy of a record is left in the files SQLite manages (the
//! file system's own free blocks are another matter). Backups taken before keep the old
//! keys.

use crate::Keyring;
use crate::data_dir::DataDir;
use crate::error::StoreError;
use crate::log::Log;
use crate::record::Record;
use crate::recovery::check_keys;
use crate::snapshot;

/// Records resealed per transaction.
const BATCH: usize = 1024;

/// What `rekey` did.
#[derive(Debug, Default)]
pub struct RekeyReport {
    /// The key everything is now sealed with.
    pub key_id: String,
    /// Records in the log.
    pub records: u64,
    /// Records sealed anew (plaintext or under an older key before).
    pub resealed: u64,
    /// Snapshots sealed anew.
    pub snapshots: u64,
    /// Keys that seal nothing any more: they may be removed from the key list.
    pub retired: Vec<String>,
    /// Records that could not be read, left as they were, with why.
    pub unreadable: Vec<(u64, String)>,
    /// Snapshots that could not be read, left as they were, with why.
    pub unreadable_snapshots: Vec<(u64, String)>,
}

/// Reseals every record and snapshot in `dir` with `keys.current()`; `progress` gets
/// (records done, records in the log).
pub fn rekey(dir: &DataDir, keys: &Keyring, mut progress: impl FnMut(u64, u64)) -> Result<RekeyReport, StoreError> {
    let mut log = Log::open(&dir.log_path())?;
    // Every key the log names must be here and right before anything is rewritten.
    check_keys(&log, Some(keys))?;
    let current = keys.current();
    let mut report = RekeyReport { key_id: current.id().to_string(), records: log.count()?, ..RekeyReport::default() };
    let last_seq = log.last_seq()?;
    let mut after = 0;
    loop {
        let batch = log.not_sealed_with(current.id(), after, BATCH)?;
        let Some(last) = batch.last() else { break };
        after = last.seq;
        let mut resealed = Vec::with_capacity(batch.len());
        for record in &batch {
            match record.open(Some(keys)) {
                Ok(event) => resealed.push(Record::encode_with(record.seq, record.at, &event, Some(current))),
                Err(error) => report.unreadable.push((record.seq, error.to_string())),
            }
        }
        log.replace(&resealed)?;
        report.resealed += resealed.len() as u64;
        progress(after, last_seq);
    }
    progress(last_seq, last_seq);
    for file in snapshot::list(&dir.snapshot_dir())? {
        match snapshot::read_with(&file, Some(keys)) {
            Ok(found) if found.key_id.as_deref() == Some(current.id()) => {}
            Ok(found) => {
                let bytes = snapshot::encode_with(found.seq, found.created, &found.state, Some(current));
                snapshot::write(&dir.snapshot_dir(), found.seq, &bytes)?;
                report.snapshots += 1;
            }
            Err(error) => report.unreadable_snapshots.push((file.seq, error.to_string())),
        }
    }
    report.retired = log.forget_unused_keys()?;
    if report.resealed > 0 {
        // Old copies of the rewritten rows would otherwise linger in free pages and the WAL.
        log.scrub()?;
    }
    Ok(report)
}
