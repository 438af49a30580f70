//! Snapshots of the whole core state, one file each: `snapshots/snapshot-<seq>.bin`.
//!
//! Layout (little endian): `HALESNAP` magic, format `u32`, the sequence number of the last
//! event folded in `u64`, creation time `u64` (ms), body length `u64`, crc32c `u32` over
//! everything before it and the body, then the body (the state as JSON). Written to a
//! temporary file, fsync'd, renamed into place, and the directory fsync'd, so a snapshot
//! either exists whole or not at all; a damaged one fails its checksum and is skipped.

use crate::error::StoreError;
use hale_core::{State, Timestamp};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"HALESNAP";
/// 2: tasks with the indexes of shadowing, retries and ladders, budgets, the mode (the
/// state of format 1 no longer decodes; such a snapshot is passed over and the log
/// replayed, which gives the same state).
const SNAPSHOT_FORMAT: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 8 + 4;

/// A snapshot file found in the directory, not yet read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub seq: u64,
    pub path: PathBuf,
}

/// A snapshot read back and verified.
#[derive(Debug)]
pub struct Snapshot {
    pub seq: u64,
    pub created: Timestamp,
    pub state: State,
    pub bytes: u64,
}

/// Why a snapshot file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read it: {0}")]
    Read(#[from] std::io::Error),
    #[error("too short for a snapshot header ({0} bytes)")]
    Short(usize),
    #[error("not a hale snapshot (bad magic)")]
    Magic,
    #[error("format {0} is not known to this hale")]
    Format(u32),
    #[error("written by an older hale (format {0}); the log is replayed instead")]
    Older(u32),
    #[error("the body is {found} bytes but the header says {expected}")]
    Length { expected: u64, found: u64 },
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("the header says it covers event {header} but its name says {name}")]
    Misnamed { header: u64, name: u64 },
    #[error("undecodable state: {0}")]
    Body(String),
}

/// The snapshot files in `dir`, newest (highest sequence number) first.
pub fn list(dir: &Path) -> Result<Vec<SnapshotFile>, StoreError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        entries => entries.map_err(StoreError::io("list", dir))?,
    };
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|name| name.strip_prefix("snapshot-"))
            .and_then(|rest| rest.strip_suffix(".bin"))
            .and_then(|seq| seq.parse::<u64>().ok())
        else {
            continue;
        };
        found.push(SnapshotFile { seq, path: entry.path() });
    }
    found.sort_by_key(|file| std::cmp::Reverse(file.seq));
    Ok(found)
}

/// Serializes `state` (everything up to event `seq`) to its file format.
pub fn encode(seq: u64, created: Timestamp, state: &State) -> Vec<u8> {
    let body = serde_json::to_vec(state).expect("states always serialize");
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&created.0.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes), &body);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&body);
    bytes
}

/// Writes an encoded snapshot atomically into `dir`; returns its path. The caller must
/// only snapshot state whose events are all durable.
pub fn write(dir: &Path, seq: u64, encoded: &[u8]) -> Result<PathBuf, StoreError> {
    let path = dir.join(format!("snapshot-{seq:020}.bin"));
    let temporary = dir.join(format!(".snapshot-{seq:020}.tmp"));
    let mut file = File::create(&temporary).map_err(StoreError::io("create", &temporary))?;
    file.write_all(encoded).map_err(StoreError::io("write", &temporary))?;
    file.sync_all().map_err(StoreError::io("fsync", &temporary))?;
    drop(file);
    std::fs::rename(&temporary, &path).map_err(StoreError::io("rename", &temporary))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(StoreError::io("fsync", dir))?;
    Ok(path)
}

/// Reads and verifies one snapshot file.
pub fn read(file: &SnapshotFile) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(&file.path)?;
    let (seq, created, state) = decode(&bytes)?;
    if seq != file.seq {
        return Err(SnapshotError::Misnamed { header: seq, name: file.seq });
    }
    Ok(Snapshot { seq, created, state, bytes: bytes.len() as u64 })
}

/// Verifies and decodes a snapshot's bytes.
pub fn decode(bytes: &[u8]) -> Result<(u64, Timestamp, State), SnapshotError> {
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Short(bytes.len()));
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let format = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let seq = u64_at(12);
    let created = Timestamp(u64_at(20));
    let length = u64_at(28);
    let stored = u32::from_le_bytes(header[36..40].try_into().expect("4 bytes"));
    if length != body.len() as u64 {
        return Err(SnapshotError::Length { expected: length, found: body.len() as u64 });
    }
    let computed = crc32c::crc32c_append(crc32c::crc32c(&header[..36]), body);
    if computed != stored {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    if format < SNAPSHOT_FORMAT {
        return Err(SnapshotError::Older(format));
    }
    if format != SNAPSHOT_FORMAT {
        return Err(SnapshotError::Format(format));
    }
    let state = serde_json::from_slice(body).map_err(|error| SnapshotError::Body(error.to_string()))?;
    Ok((seq, created, state))
}

/// Deletes temporary files of snapshots whose writing was interrupted by a crash.
pub fn remove_partial(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(StoreError::io("list", dir))? {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|name| name.starts_with(".snapshot-") && name.ends_with(".tmp")) {
            std::fs::remove_file(entry.path()).map_err(StoreError::io("remove", entry.path()))?;
        }
    }
    Ok(())
}

/// Deletes all but the `keep` newest snapshots (never fewer than one).
pub fn prune(dir: &Path, keep: usize) -> Result<(), StoreError> {
    for old in list(dir)?.into_iter().skip(keep.max(1)) {
        std::fs::remove_file(&old.path).map_err(StoreError::io("remove", &old.path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_byte_matters() {
        let dir = tempfile::tempdir().unwrap();
        let encoded = encode(42, Timestamp(7), &State::default());
        let path = write(dir.path(), 42, &encoded).unwrap();
        let files = list(dir.path()).unwrap();
        assert_eq!(files, vec![SnapshotFile { seq: 42, path }]);
        let snapshot = read(&files[0]).unwrap();
        assert_eq!((snapshot.seq, snapshot.created, snapshot.state), (42, Timestamp(7), State::default()));
        for index in 0..encoded.len() {
            let mut damaged = encoded.clone();
            damaged[index] ^= 0x40;
            assert!(decode(&damaged).is_err(), "flipping byte {index} went unnoticed");
        }
    }

    #[test]
    fn a_snapshot_of_an_older_format_is_told_apart_from_a_damaged_one() {
        let mut encoded = encode(42, Timestamp(7), &State::default());
        encoded[8..12].copy_from_slice(&(SNAPSHOT_FORMAT - 1).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&encoded[..36]), &encoded[HEADER_LEN..]);
        encoded[36..40].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&encoded), Err(SnapshotError::Older(format)) if format == SNAPSHOT_FORMAT - 1));
        encoded[8..12].copy_from_slice(&(SNAPSHOT_FORMAT + 1).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&encoded[..36]), &encoded[HEADER_LEN..]);
        encoded[36..40].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&encoded), Err(SnapshotError::Format(_))));
    }

    #[test]
    fn a_missing_directory_holds_no_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(list(&dir.path().join("absent")).unwrap(), vec![]);
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for seq in [5, 10, 15, 20] {
            write(dir.path(), seq, &encode(seq, Timestamp(0), &State::default())).unwrap();
        }
        prune(dir.path(), 2).unwrap();
        let seqs: Vec<u64> = list(dir.path()).unwrap().iter().map(|file| file.seq).collect();
        assert_eq!(seqs, [20, 15]);
    }
}
