//! `hale verify`: an offline check of a data directory.

use crate::error::StoreError;
use crate::log::Log;
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
/// are read. Reads only: the data directory is not changed.
pub fn verify(data_dir: &Path, limits: &Limits, progress: impl FnMut(u64, u64)) -> Result<VerifyReport, StoreError> {
    verify_log(&data_dir.join("hale.db"), Some(&data_dir.join("snapshots")), limits, progress)
}

/// [`verify`] of the log database at `log_path`, and of the snapshots in `snapshot_dir`
/// if given (a backup file has none).
pub(crate) fn verify_log(
    log_path: &Path,
    snapshot_dir: Option<&Path>,
    limits: &Limits,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport, StoreError> {
    let log = Log::open_read_only(log_path)?;
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
    let check_snapshots_up_to =
        |seq: u64, core: &Core, report: &mut VerifyReport, next: &mut std::iter::Peekable<_>| {
            while let Some(file) = next.next_if(|file: &snapshot::SnapshotFile| file.seq <= seq) {
                let mut older = None;
                let problem = match snapshot::read(&file) {
                    Err(error @ snapshot::SnapshotError::Older(_)) => {
                        older = Some(error.to_string());
                        None
                    }
                    Err(error) => Some(error.to_string()),
                    Ok(found) if &found.state != core.state() => {
                        Some(format!("differs from the replay of the log up to event {}", found.seq))
                    }
                    Ok(_) => None,
                };
                report.snapshots.push(SnapshotCheck { seq: file.seq, path: file.path, problem, older });
            }
        };
    log.scan(0, |record| -> Result<(), StoreError> {
        check_snapshots_up_to(record.seq.saturating_sub(1), &core, &mut report, &mut next_snapshot);
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
        match record.decode() {
            Ok(event) => core.apply(record.at, &event),
            Err(error) => report.corrupt.push((record.seq, error.to_string())),
        }
        if report.records.is_multiple_of(PROGRESS_EVERY) {
            progress(report.records, total);
        }
        Ok(())
    })?;
    check_snapshots_up_to(u64::MAX, &core, &mut report, &mut next_snapshot);
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
