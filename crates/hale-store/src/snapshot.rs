//! Snapshots of the whole core state, one file each: `snapshots/snapshot-<seq>.bin`.
//!
//! Layout (little endian): `HALESNAP` magic, format `u32`, the sequence number of the last
//! event folded in `u64`, creation time `u64` (ms), body length `u64`, crc32c `u32` over
//! everything before it and the body, then the body (the state as JSON). Written to a
//! temporary file, fsync'd, renamed into place, and the directory fsync'd, so a snapshot
//! either exists whole or not at all; a damaged one fails its checksum and is skipped.
//!
//! Sealed (encryption at rest): the format has [`ENCRYPTED`] set and the body is the key
//! id's length `u8`, the key id, then `nonce || ciphertext || tag` (see [`crate::crypt`])
//! with everything before the checksum and the key id as associated data. The checksum
//! covers the stored bytes, so `verify` finds damage without the key.

use crate::crypt::{Key, Keyring, NONCE_LEN, TAG_LEN};
use crate::error::StoreError;
use crate::record::ENCRYPTED;
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
    /// The key it was sealed with, if it was.
    pub key_id: Option<String>,
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
    /// Sealed with a key that is not configured. Not damage.
    #[error("it is encrypted with key '{0}', which is not configured")]
    KeyNotConfigured(String),
    /// The key configured under its key id does not open it (its checksum matched).
    #[error("key '{0}' does not decrypt it: wrong key")]
    WrongKey(String),
}

impl SnapshotError {
    /// A key problem, not damage: recovery must stop rather than pass the snapshot over.
    pub fn key_problem(&self) -> Option<(&str, bool)> {
        match self {
            SnapshotError::KeyNotConfigured(id) => Some((id, false)),
            SnapshotError::WrongKey(id) => Some((id, true)),
            _ => None,
        }
    }
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

/// Serializes `state` (everything up to event `seq`) to its file format, sealed with `key`
/// if one is given.
pub fn encode_with(seq: u64, created: Timestamp, state: &State, key: Option<&Key>) -> Vec<u8> {
    let Some(key) = key else { return encode(seq, created, state) };
    sealed(seq, created, key, 4096, |bytes| serde_json::to_writer(bytes, state).expect("states always serialize"))
}

/// A snapshot file with `plain` (any bytes, not necessarily a state) sealed under `key` as
/// [`encode_with`] seals a state (for fuzzing and tests: what the decoder does with a body
/// that decrypts but does not decode).
pub fn seal_bytes(seq: u64, created: Timestamp, plain: &[u8], key: &Key) -> Vec<u8> {
    sealed(seq, created, key, plain.len(), |bytes| bytes.extend_from_slice(plain))
}

/// A sealed snapshot of what `write` appends as the plaintext body.
fn sealed(seq: u64, created: Timestamp, key: &Key, capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let id = key.id().as_bytes();
    let start = HEADER_LEN + 1 + id.len();
    let mut bytes = Vec::with_capacity(start + NONCE_LEN + capacity + TAG_LEN);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(SNAPSHOT_FORMAT | ENCRYPTED).to_le_bytes());
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&created.0.to_le_bytes());
    bytes.extend_from_slice(&[0; 8 + 4]); // length and checksum, below
    bytes.push(id.len() as u8);
    bytes.extend_from_slice(id);
    bytes.resize(start + NONCE_LEN, 0);
    write(&mut bytes);
    let length = (bytes.len() + TAG_LEN - HEADER_LEN) as u64;
    bytes[28..36].copy_from_slice(&length.to_le_bytes());
    let associated = snapshot_associated(&bytes[..36], id);
    key.seal_in_place(&associated, &mut bytes, start);
    fix_header(&mut bytes);
    bytes
}

/// Sets the body length and the checksum in a snapshot's header to match its body (for
/// fuzzing and tests: inputs that get past the checksum; the encoders end with it too).
/// Bytes shorter than a header are left as they are.
pub fn fix_header(bytes: &mut [u8]) {
    if bytes.len() < HEADER_LEN {
        return;
    }
    let length = (bytes.len() - HEADER_LEN) as u64;
    bytes[28..36].copy_from_slice(&length.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..36]), &bytes[HEADER_LEN..]);
    bytes[36..40].copy_from_slice(&crc.to_le_bytes());
}

fn snapshot_associated(header: &[u8], key_id: &[u8]) -> Vec<u8> {
    [b"hale-snapshot", header, key_id].concat()
}

/// Serializes `state` (everything up to event `seq`) to its file format, in plaintext.
pub fn encode(seq: u64, created: Timestamp, state: &State) -> Vec<u8> {
    let body = serde_json::to_vec(state).expect("states always serialize");
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&created.0.to_le_bytes());
    bytes.extend_from_slice(&[0; 8 + 4]); // length and checksum, below
    bytes.extend_from_slice(&body);
    fix_header(&mut bytes);
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

/// Reads and verifies one plaintext snapshot file.
pub fn read(file: &SnapshotFile) -> Result<Snapshot, SnapshotError> {
    read_with(file, None)
}

/// Reads and verifies one snapshot file, opening it with `keys` if it is sealed.
pub fn read_with(file: &SnapshotFile, keys: Option<&Keyring>) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(&file.path)?;
    let (seq, created, state, key_id) = decode_sealed(&bytes, keys)?;
    if seq != file.seq {
        return Err(SnapshotError::Misnamed { header: seq, name: file.seq });
    }
    Ok(Snapshot { seq, created, state, bytes: bytes.len() as u64, key_id })
}

/// Verifies and decodes a plaintext snapshot's bytes.
pub fn decode(bytes: &[u8]) -> Result<(u64, Timestamp, State), SnapshotError> {
    let (seq, created, state, _) = decode_sealed(bytes, None)?;
    Ok((seq, created, state))
}

/// Verifies and decodes a snapshot's bytes, opening them with `keys` if they are sealed;
/// also says which key sealed them.
pub fn decode_sealed(
    bytes: &[u8],
    keys: Option<&Keyring>,
) -> Result<(u64, Timestamp, State, Option<String>), SnapshotError> {
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
    let sealed = format & ENCRYPTED != 0;
    let base = format & !ENCRYPTED;
    if base < SNAPSHOT_FORMAT {
        return Err(SnapshotError::Older(format));
    }
    if base != SNAPSHOT_FORMAT {
        return Err(SnapshotError::Format(format));
    }
    let (plain, key_id);
    let body = if sealed {
        let Some((&id_len, rest)) = body.split_first() else {
            return Err(SnapshotError::Body("no key id".into()));
        };
        let Some((id, sealed_body)) = rest.split_at_checked(id_len as usize) else {
            return Err(SnapshotError::Body("key id cut short".into()));
        };
        let id = std::str::from_utf8(id).map_err(|_| SnapshotError::Body("key id not UTF-8".into()))?;
        let key = keys.and_then(|keys| keys.get(id)).ok_or_else(|| SnapshotError::KeyNotConfigured(id.into()))?;
        plain = key
            .open(&snapshot_associated(&header[..36], id.as_bytes()), sealed_body)
            .map_err(|_| SnapshotError::WrongKey(id.into()))?;
        key_id = Some(id.to_string());
        &plain[..]
    } else {
        key_id = None;
        body
    };
    let state = serde_json::from_slice(body).map_err(|error| SnapshotError::Body(error.to_string()))?;
    Ok((seq, created, state, key_id))
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

    fn ring(pairs: &[(&str, u8)]) -> Keyring {
        let mut keys = pairs.iter().map(|(id, byte)| Key::new(id, &[*byte; 32]).unwrap());
        let current = keys.next().unwrap();
        Keyring::new(current, keys).unwrap()
    }

    #[test]
    fn a_sealed_snapshot_round_trips_names_its_key_and_every_byte_matters() {
        let keys = ring(&[("k1", 1)]);
        let mut core = hale_core::Core::new(hale_core::Limits::default());
        let hello = hale_core::Hello {
            agent: hale_core::AgentName::new("SECRET-AGENT-4711").unwrap(),
            role: hale_core::RoleName::new("worker").unwrap(),
            labels: Default::default(),
            incarnation: None,
        };
        core.execute(&hello.into(), Timestamp(1)).unwrap();
        let state = core.into_state();
        let encoded = encode_with(42, Timestamp(7), &state, Some(keys.current()));
        assert!(!encoded.windows(11).any(|w| w == b"SECRET-AGEN"), "plaintext in a sealed snapshot");
        let (seq, created, decoded, key_id) = decode_sealed(&encoded, Some(&keys)).unwrap();
        assert_eq!((seq, created, key_id.as_deref()), (42, Timestamp(7), Some("k1")));
        assert_eq!(decoded, state);
        assert!(matches!(decode_sealed(&encoded, None), Err(SnapshotError::KeyNotConfigured(id)) if id == "k1"));
        assert!(matches!(decode(&encoded), Err(SnapshotError::KeyNotConfigured(_))));
        let wrong = ring(&[("k1", 2)]);
        assert!(matches!(decode_sealed(&encoded, Some(&wrong)), Err(SnapshotError::WrongKey(id)) if id == "k1"));
        // An older key in the ring still opens it.
        assert!(decode_sealed(&encoded, Some(&ring(&[("k2", 2), ("k1", 1)]))).is_ok());
        for index in 0..encoded.len() {
            let mut damaged = encoded.clone();
            damaged[index] ^= 0x40;
            assert!(
                matches!(decode_sealed(&damaged, Some(&keys)), Err(error) if error.key_problem().is_none()),
                "flipping byte {index} went unnoticed, or was taken for a key problem"
            );
        }
        // A plaintext snapshot still reads with a ring.
        let plain = encode_with(42, Timestamp(7), &state, None);
        assert_eq!(decode_sealed(&plain, Some(&keys)).unwrap().3, None);
    }

    #[test]
    fn a_sealed_snapshot_of_an_older_format_is_still_older() {
        let keys = ring(&[("k1", 1)]);
        let mut encoded = encode_with(42, Timestamp(7), &State::default(), Some(keys.current()));
        encoded[8..12].copy_from_slice(&((SNAPSHOT_FORMAT - 1) | ENCRYPTED).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&encoded[..36]), &encoded[HEADER_LEN..]);
        encoded[36..40].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode_sealed(&encoded, Some(&keys)), Err(SnapshotError::Older(_))));
    }
}
