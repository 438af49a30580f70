//! Recovery: the newest snapshot that verifies, then every event after it.

use crate::crypt::Keyring;
use crate::data_dir::DataDir;
use crate::error::StoreError;
use crate::log::Log;
use crate::record::{ENCRYPTED, FORMAT, RecordError};
use crate::snapshot;
use hale_core::{Core, Event, Limits, State, Timestamp};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

/// How to recover.
#[derive(Clone, Debug, Default)]
pub struct RecoveryOptions {
    pub limits: Limits,
    /// Set damaged or missing records aside (into `damaged_events`, kept whole) instead of
    /// refusing to start. Each one is reported.
    pub repair: bool,
    /// The time to record on records set aside.
    pub now: Timestamp,
    /// The keys sealed records and snapshots are opened with (encryption at rest). A
    /// missing or wrong key stops recovery with an error naming the key; it is never
    /// taken for damage.
    pub keys: Option<Arc<Keyring>>,
}

/// A snapshot that recovery could not use, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedSnapshot {
    pub seq: u64,
    pub path: PathBuf,
    pub reason: String,
    /// Written by an older hale, not damaged: expected once after an upgrade.
    pub older: bool,
}

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The snapshot recovery started from, if any.
    pub snapshot_seq: Option<u64>,
    /// Newer snapshots that were damaged or unusable, newest first.
    pub skipped_snapshots: Vec<SkippedSnapshot>,
    /// Events replayed after the snapshot.
    pub replayed: u64,
    /// Records set aside by this recovery (`--repair`), with the reason for each.
    pub set_aside: Vec<(u64, String)>,
    /// Records set aside by an earlier `--repair`, still kept in `damaged_events`.
    pub previously_set_aside: Vec<u64>,
}

/// The result of recovery: the core at the end of the log, and the log to append to.
pub struct Recovered {
    pub core: Core,
    pub log: Log,
    pub last_seq: u64,
    pub report: RecoveryReport,
}

/// Rebuilds the core from `dir`.
pub fn recover(dir: &DataDir, options: &RecoveryOptions) -> Result<Recovered, StoreError> {
    let log = Log::open(&dir.log_path())?;
    let log_last = log.last_seq()?;
    let previously_set_aside = log.damaged_seqs()?;
    let mut report = RecoveryReport { previously_set_aside: previously_set_aside.clone(), ..Default::default() };
    let keys = options.keys.as_deref();
    check_keys(&log, keys)?;

    snapshot::remove_partial(&dir.snapshot_dir())?;
    let mut start = (0, State::default());
    for file in snapshot::list(&dir.snapshot_dir())? {
        if file.seq > log_last {
            let reason = format!("it covers event {} but the log ends at {log_last}", file.seq);
            report.skipped_snapshots.push(SkippedSnapshot { seq: file.seq, path: file.path, reason, older: false });
            continue;
        }
        match snapshot::read_with(&file, keys) {
            Ok(found) => {
                start = (found.seq, found.state);
                report.snapshot_seq = Some(found.seq);
                break;
            }
            Err(error) => {
                if let Some(fatal) = snapshot_key_error(&file, &error) {
                    return Err(fatal);
                }
                let reason = error.to_string();
                let older = matches!(error, snapshot::SnapshotError::Older(_));
                if older {
                    tracing::info!(path = %file.path.display(), %reason, "skipping a snapshot of an older hale");
                } else {
                    tracing::warn!(path = %file.path.display(), %reason, "skipping damaged snapshot");
                }
                report.skipped_snapshots.push(SkippedSnapshot { seq: file.seq, path: file.path, reason, older });
            }
        }
    }

    let (snapshot_seq, state) = start;
    let mut core = Core::from_state(state, options.limits.clone());
    let known_gaps: BTreeSet<u64> = previously_set_aside.into_iter().collect();
    let mut problems: Vec<(u64, String)> = Vec::new();
    let mut expected = snapshot_seq + 1;
    let mut last_seq = snapshot_seq;
    // Reading, checksumming and decoding run on a second thread while this one folds.
    let (chunks, reader) = read_ahead(log, snapshot_seq, options.keys.clone());
    let mut fatal = None;
    'replay: for chunk in chunks.iter() {
        for decoded in chunk {
            while expected < decoded.seq {
                if !known_gaps.contains(&expected) {
                    if !options.repair {
                        fatal =
                            Some(StoreError::MissingRecord { seq: expected, prev: expected - 1, next: decoded.seq });
                        break 'replay;
                    }
                    problems.push((expected, "missing from the log".to_string()));
                }
                expected += 1;
            }
            match decoded.event {
                Ok(event) => {
                    core.apply_owned(decoded.at, event);
                    report.replayed += 1;
                }
                // A newer hale wrote this record: it is not damage, and --repair must
                // never set it aside.
                Err(RecordError::Format(found)) if found & !ENCRYPTED > FORMAT => {
                    fatal = Some(StoreError::NewerFormat { found: found & !ENCRYPTED, supported: FORMAT });
                    break 'replay;
                }
                // A key problem is not damage either: never set aside, hale does not start.
                Err(error) if error.is_key_problem() => {
                    fatal = Some(record_key_error(decoded.seq, error));
                    break 'replay;
                }
                Err(error) if options.repair => problems.push((decoded.seq, error.to_string())),
                Err(error) => {
                    fatal = Some(StoreError::CorruptRecord { seq: decoded.seq, reason: error.to_string() });
                    break 'replay;
                }
            }
            last_seq = decoded.seq;
            expected = decoded.seq + 1;
        }
    }
    drop(chunks);
    let (mut log, read) = reader.join().expect("the log reader does not panic");
    if let Some(error) = fatal {
        return Err(error);
    }
    read?;

    for (seq, reason) in problems {
        tracing::error!(seq, %reason, "--repair: setting log record aside into damaged_events; its effect is missing from the state");
        log.set_aside(seq, &reason, options.now)?;
        report.set_aside.push((seq, reason));
    }
    Ok(Recovered { core, log, last_seq: last_seq.max(log_last), report })
}

/// Checks, before anything is read or replayed, that every key the log was sealed with is
/// configured and opens the first record it sealed: a missing or wrong key is told at
/// once, naming the key and the record, and nothing is changed.
pub fn check_keys(log: &Log, keys: Option<&Keyring>) -> Result<(), StoreError> {
    for (key_id, first_seq) in log.key_uses()? {
        if keys.and_then(|keys| keys.get(&key_id)).is_none() {
            return Err(StoreError::KeyNotConfigured { what: format!("record {first_seq}"), key_id });
        }
        // A record that fails its checksum is damage, for replay (and --repair) to handle.
        if let Some(record) = log.first_sealed_with(&key_id, first_seq)?
            && record.check().is_ok()
            && let Err(error) = record.open(keys)
            && error.is_key_problem()
        {
            return Err(record_key_error(record.seq, error));
        }
    }
    Ok(())
}

pub(crate) fn record_key_error(seq: u64, error: RecordError) -> StoreError {
    let what = format!("record {seq}");
    match error {
        RecordError::KeyNotConfigured(key_id) => StoreError::KeyNotConfigured { what, key_id },
        RecordError::WrongKey(key_id) => StoreError::WrongKey { what, key_id },
        other => StoreError::CorruptRecord { seq, reason: other.to_string() },
    }
}

/// The error that stops recovery, if reading the snapshot failed for want of its key.
pub(crate) fn snapshot_key_error(file: &snapshot::SnapshotFile, error: &snapshot::SnapshotError) -> Option<StoreError> {
    let (key_id, wrong) = error.key_problem()?;
    let what = format!("snapshot {} ({})", file.seq, file.path.display());
    let key_id = key_id.to_string();
    Some(if wrong { StoreError::WrongKey { what, key_id } } else { StoreError::KeyNotConfigured { what, key_id } })
}

/// One record as the reader thread decoded it.
struct Decoded {
    seq: u64,
    at: Timestamp,
    event: Result<Event, RecordError>,
}

const CHUNK: usize = 4096;

/// The reader thread; it gives the log back, and says whether reading failed.
type Reader = JoinHandle<(Log, Result<(), StoreError>)>;

/// Reads, checks and decodes every record after `after` on a thread of its own, handing
/// them over in chunks through a bounded channel; the thread gives the log back when done
/// (early, if the receiver is dropped).
fn read_ahead(log: Log, after: u64, keys: Option<Arc<Keyring>>) -> (Receiver<Vec<Decoded>>, Reader) {
    let (sender, chunks) = sync_channel::<Vec<Decoded>>(8);
    let reader = std::thread::Builder::new()
        .name("hale-replay".into())
        .spawn(move || {
            enum Stop {
                Store(StoreError),
                Receiver,
            }
            impl From<StoreError> for Stop {
                fn from(error: StoreError) -> Stop {
                    Stop::Store(error)
                }
            }
            let mut chunk = Vec::with_capacity(CHUNK);
            let scanned = log.scan(after, |record| -> Result<(), Stop> {
                chunk.push(Decoded { seq: record.seq, at: record.at, event: record.open(keys.as_deref()) });
                if chunk.len() == CHUNK {
                    sender
                        .send(std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK)))
                        .map_err(|_| Stop::Receiver)?;
                }
                Ok(())
            });
            let result = match scanned {
                Ok(()) => {
                    let _ = sender.send(chunk);
                    Ok(())
                }
                Err(Stop::Receiver) => Ok(()),
                Err(Stop::Store(error)) => Err(error),
            };
            (log, result)
        })
        .expect("spawning the replay reader");
    (chunks, reader)
}
