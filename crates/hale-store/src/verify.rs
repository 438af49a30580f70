//! `hale verify`: an offline check of a data directory.

use crate::crypt::Keyring;
use crate::error::StoreError;
use crate::log::Log;
use crate::recovery::{check_keys, record_key_error, snapshot_key_error};
use crate::snapshot;
use hale_core::{Core, Limits};
use std::path::{Path, PathBuf};

/// Records between two calls of `progress`.
const PROGRESS_EVERY: u64 = 1_000;

/// What `verify` found about one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCheck {
    pub seq: u64,
    pub path: PathBuf,
    /// `None` if the snapshot verified and equals the replay of the log up to its seq.
    pub problem: Option<String>,
    /// Written by an older hale (not a problem: recovery replays the log instead).
    pub older: Option<String>,
    /// Why it was checksummed but not compared with the log (encrypted, and no key given).
    pub not_compared: Option<String>,
}

/// Everything `verify` checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records whose checksum or body failed, with the reason.
    pub corrupt: Vec<(u64, String)>,
    /// Sequence numbers missing from the log (and not set aside by `--repair`).
    pub missing: Vec<u64>,
    /// Records set aside by `--repair`, kept in `damaged_events`.
    pub set_aside: Vec<u64>,
    pub snapshots: Vec<SnapshotCheck>,
    pub agents: usize,
    /// Records stored encrypted (their checksums are checked with or without a key).
    pub encrypted: u64,
    /// Encrypted records not decrypted, for want of the key: their events were not
    /// checked, and no state after the first of them was compared.
    pub not_decrypted: u64,
    /// The key ids the log's records are sealed with, sorted.
    pub key_ids: Vec<String>,
}

impl VerifyReport {
    /// Whether anything was wrong.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.snapshots.iter().all(|s| s.problem.is_none())
    }

    /// Records with problems, each at most once, sorted.
    pub fn bad_seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.corrupt.iter().map(|(seq, _)| *seq).chain(self.missing.iter().copied()).collect();
        seqs.sort_unstable();
        seqs
    }
}

/// Checks every record's checksum and decoding, the sequence for gaps, and every snapshot
/// against a replay of the log from scratch. `progress(done, total)` is called as records
/// are read. Reads only: the data directory is not changed. Encrypted records and
/// snapshots are only checksummed: see [`verify_with`].
pub fn verify(data_dir: &Path, limits: &Limits, progress: impl FnMut(u64, u64)) -> Result<VerifyReport, StoreError> {
    verify_with(data_dir, limits, None, progress)
}

/// [`verify`], decrypting encrypted records and snapshots with `keys`. With keys, a key
/// the data needs that is missing or wrong is an error, as at start; without, encrypted
/// data is checked by its checksums alone.
pub fn verify_with(
    data_dir: &Path,
    limits: &Limits,
    keys: Option<&Keyring>,
    progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, StoreError> {
    verify_log(&data_dir.join("hale.db"), Some(&data_dir.join("snapshots")), limits, keys, progress)
}

/// [`verify_with`] of the log database at `log_path`, and of the snapshots in
/// `snapshot_dir` if given (a backup file has none).
pub(crate) fn verify_log(
    log_path: &Path,
    snapshot_dir: Option<&Path>,
    limits: &Limits,
    keys: Option<&Keyring>,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, StoreError> {
    let log = Log::open_read_only(log_path)?;
    if keys.is_some() {
        check_keys(&log, keys)?;
    }
    let total = log.count()?;
    let mut report = VerifyReport { set_aside: log.damaged_seqs()?, ..Default::default() };
    let mut snapshots = match snapshot_dir {
        Some(dir) => snapshot::list(dir)?,
        None => Vec::new(),
    };
    snapshots.reverse(); // oldest first, in replay order
    let mut next_snapshot = snapshots.into_iter().peekable();

    let mut core = Core::new(limits.clone());
    let mut expected = 1;
    // Set once an encrypted record could not be decrypted: the fold is incomplete from there.
    let mut incomplete = false;
    let check_snapshots_up_to = |seq: u64,
                                 core: &Core,
                                 incomplete: bool,
                                 report: &mut VerifyReport,
                                 next: &mut std::iter::Peekable<_>|
     -> Result<(), StoreError> {
        while let Some(file) = next.next_if(|file: &snapshot::SnapshotFile| file.seq <= seq) {
            let (mut older, mut not_compared) = (None, None);
            let problem = match snapshot::read_with(&file, keys) {
                Err(error @ snapshot::SnapshotError::Older(_)) => {
                    older = Some(error.to_string());
                    None
                }
                Err(error) if keys.is_none() && error.key_problem().is_some() => {
                    let key_id = error.key_problem().map(|(id, _)| id).unwrap_or_default();
                    not_compared = Some(format!("encrypted with key '{key_id}', and no key was given"));
                    None
                }
                Err(error) => match snapshot_key_error(&file, &error) {
                    Some(fatal) => return Err(fatal),
                    None => Some(error.to_string()),
                },
                Ok(_) if incomplete => {
                    not_compared = Some("encrypted records before it were not decrypted".to_string());
                    None
                }
                Ok(found) if &found.state != core.state() => {
                    Some(format!("differs from the replay of the log up to event {}", found.seq))
                }
                Ok(_) => None,
            };
            report.snapshots.push(SnapshotCheck { seq: file.seq, path: file.path, problem, older, not_compared });
        }
        Ok(())
    };
    let mut key_ids = std::collections::BTreeSet::new();
    log.scan(0, |record| -> Result<(), StoreError> {
        check_snapshots_up_to(record.seq.saturating_sub(1), &core, incomplete, &mut report, &mut next_snapshot)?;
        while expected < record.seq {
            if !report.set_aside.contains(&expected) {
                report.missing.push(expected);
            }
            expected += 1;
        }
        expected = record.seq + 1;
        report.first_seq.get_or_insert(record.seq);
        report.last_seq = Some(record.seq);
        report.records += 1;
        if let Some(key_id) = &record.key_id {
            report.encrypted += 1;
            if !key_ids.contains(&**key_id) {
                key_ids.insert(key_id.to_string());
            }
        }
        match record.open(keys) {
            Ok(event) => core.apply(record.at, &event),
            Err(error) if error.is_key_problem() && keys.is_none() => {
                report.not_decrypted += 1;
                incomplete = true;
            }
            Err(error) if error.is_key_problem() => return Err(record_key_error(record.seq, error)),
            Err(error) => report.corrupt.push((record.seq, error.to_string())),
        }
        if report.records.is_multiple_of(PROGRESS_EVERY) {
            progress(report.records, total);
        }
        Ok(())
    })?;
    check_snapshots_up_to(u64::MAX, &core, incomplete, &mut report, &mut next_snapshot)?;
    report.key_ids = key_ids.into_iter().collect();
    // A snapshot past the end of the log claims events the log does not hold.
    let last = report.last_seq.unwrap_or(0);
    for check in &mut report.snapshots {
        if check.seq > last && check.problem.is_none() {
            check.problem = Some(format!("covers event {} but the log ends at {last}", check.seq));
        }
    }
    progress(report.records, total);
    report.agents = core.state().agents().len();
    Ok(report)
}
