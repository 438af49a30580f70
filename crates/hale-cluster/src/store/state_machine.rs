//! The state machine: hale's core folding the records of committed entries, and its
//! snapshots.
//!
//! Applying a Normal entry decodes each hale record of its [`Batch`](crate::Batch)
//! (checksum first, then the body, opened with the [`Keyring`] when one is configured) and
//! folds it into the [`Core`] with `apply_owned`, as replay does; the answer is the last
//! hale sequence number folded ([`Applied`]). Blank and Membership entries only move the
//! last applied log id (and the membership). A record that fails its checksum or does not
//! decode, or whose sequence number does not follow the last one folded, is a
//! `StorageError`: the log is damaged or inconsistent, and openraft stops the node rather
//! than fold around it.
//!
//! The folded state sits behind a lock shared with [`CommittedView`]s, because openraft
//! owns the state machine once the node runs (0.9 has no call to reach it): a view gives
//! the committed state (to rebuild the engine after a leadership loss) and the watch of the
//! last applied hale sequence number (what the engine's durability follows). The lock is
//! never held across an await.
//!
//! Snapshots. A Raft snapshot is a hale-store snapshot (`hale_store::snapshot::encode_with`
//! of the committed state at its last hale sequence number, sealed when a keyring is
//! configured) behind a small header carrying openraft's `SnapshotMeta`:
//!
//! ```text
//! "HALERAFT"  format u32  meta length u32  hale snapshot length u64
//! crc32c u32 over everything before it, the meta and the hale snapshot
//! meta (JSON: last log id, last membership, snapshot id)
//! hale snapshot (its own header and checksum)
//! ```
//!
//! The current snapshot is kept in `DIR/raft-snapshot.bin` (written to a temporary file,
//! fsync'd, renamed, the directory fsync'd), so `get_current_snapshot` answers after a
//! restart, and the node starts from it: openraft then re-applies the entries after it up
//! to the saved committed log id. A snapshot older than the current one (a build that
//! finished after a newer install) is not persisted.
//!
//! With [`StateMachineOptions::snapshots_kept`] above 0, a copy of the hale snapshot also
//! goes to `DIR/snapshots/` as `snapshot-<seq>.bin` (newest `snapshots_kept` kept). Off by
//! default: `hale verify` and recovery compare those files with the `events` table, and
//! as long as a cluster node does not also write its committed records there, a copy
//! would be reported as covering events the log does not hold.

use super::{RaftStoreError, blocking};
use crate::types::{Applied, NodeId, TypeConfig};
use hale_core::{Core, Limits, State, Timestamp};
use hale_store::{DataDir, Keyring};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StoredMembership,
};
use std::fs::File;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;

type Meta = SnapshotMeta<NodeId, BasicNode>;
type Membership = StoredMembership<NodeId, BasicNode>;

const MAGIC: &[u8; 8] = b"HALERAFT";
const FORMAT: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 4;
const CRC_AT: usize = HEADER_LEN - 4;
const RAFT_SNAPSHOT: &str = "raft-snapshot.bin";
const RAFT_SNAPSHOT_TEMPORARY: &str = ".raft-snapshot.tmp";
/// The state of a single node's log brought in by `hale cluster init` (see
/// [`CommittedView::import`]): the base the first entries fold onto, until the first
/// Raft snapshot replaces it.
const IMPORTED: &str = "raft-imported.bin";
const IMPORTED_TEMPORARY: &str = ".raft-imported.tmp";

/// How the state machine folds and keeps snapshots. The default: the core's default
/// limits, no keyring, no hale snapshot copies.
#[derive(Clone, Debug, Default)]
pub struct StateMachineOptions {
    /// The core's limits (they shape how much version history a fold keeps).
    pub limits: Limits,
    /// Opens sealed records and snapshots, and seals the snapshots written.
    pub keys: Option<Arc<Keyring>>,
    /// hale snapshot copies kept in `snapshots/` (0, the default: write none; see the
    /// module documentation).
    pub snapshots_kept: usize,
    /// Copy the committed records into the data directory's `events` table
    /// ([`super::mirror`]).
    pub copy_events: bool,
}

/// openraft's state machine for hale.
pub struct StateMachine {
    shared: Arc<Shared>,
}

/// What the state machine and its views share.
struct Shared {
    committed: RwLock<Committed>,
    applied: watch::Sender<u64>,
    /// Where committed records are copied, with `copy_events`.
    mirror: Option<super::mirror::Mirror>,
    snapshots: Snapshots,
    keys: Option<Arc<Keyring>>,
    limits: Limits,
}

/// The fold of the committed entries.
struct Committed {
    core: Core,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    last_seq: u64,
}

/// The snapshot files, and the meta of the current one (held while they are written).
struct Snapshots {
    dir: PathBuf,
    hale_dir: PathBuf,
    kept: usize,
    current: Mutex<Option<Meta>>,
}

/// A view of the committed state, usable while openraft owns the state machine.
#[derive(Clone)]
pub struct CommittedView {
    shared: Arc<Shared>,
}

/// Builds a snapshot of the state as it was when the builder was made.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    state: State,
    last_seq: u64,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
}

impl StateMachine {
    /// The state machine of the data directory `dir`: from its current Raft snapshot if it
    /// has one (a damaged one is an error: the entries before it may be purged), empty
    /// otherwise.
    pub fn open(dir: &DataDir, options: StateMachineOptions) -> Result<StateMachine, RaftStoreError> {
        let mirror = match options.copy_events {
            true => Some(super::mirror::Mirror::open(&dir.log_path())?),
            false => None,
        };
        StateMachine::open_path(dir.path(), &dir.snapshot_dir(), options, mirror)
    }

    fn open_path(
        dir: &Path,
        hale_dir: &Path,
        options: StateMachineOptions,
        mirror: Option<super::mirror::Mirror>,
    ) -> Result<StateMachine, RaftStoreError> {
        let path = dir.join(RAFT_SNAPSHOT);
        let (committed, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let (meta, last_seq, state) = decode(&bytes, options.keys.as_deref()).map_err(|reason| {
                    RaftStoreError::Snapshot {
                        what: path.display().to_string(),
                        reason: format!(
                            "{reason}. The node cannot start from it: restore the data directory from a backup, or remove the node from the cluster and add it back empty"
                        ),
                    }
                })?;
                let committed = Committed {
                    core: Core::from_state(state, options.limits.clone()),
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership.clone(),
                    last_seq,
                };
                (committed, Some(meta))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let imported = dir.join(IMPORTED);
                let (last_seq, state) = match std::fs::read(&imported) {
                    Ok(bytes) => {
                        let (_, last_seq, state) = decode(&bytes, options.keys.as_deref()).map_err(|reason| {
                            RaftStoreError::Snapshot { what: imported.display().to_string(), reason }
                        })?;
                        (last_seq, state)
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => (0, State::default()),
                    Err(error) => return Err(RaftStoreError::io("read", &imported)(error)),
                };
                let committed = Committed {
                    core: Core::from_state(state, options.limits.clone()),
                    last_applied: None,
                    membership: Membership::default(),
                    last_seq,
                };
                (committed, None)
            }
            Err(error) => return Err(RaftStoreError::io("read", &path)(error)),
        };
        let (applied, _) = watch::channel(committed.last_seq);
        let snapshots = Snapshots {
            dir: dir.to_path_buf(),
            hale_dir: hale_dir.to_path_buf(),
            kept: options.snapshots_kept,
            current: Mutex::new(current),
        };
        let shared = Shared {
            committed: RwLock::new(committed),
            applied,
            mirror,
            snapshots,
            keys: options.keys,
            limits: options.limits,
        };
        Ok(StateMachine { shared: Arc::new(shared) })
    }

    /// The last hale sequence number applied, as it moves.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// The committed state and the last hale sequence number folded into it.
    pub fn state(&self) -> (u64, State) {
        self.view().state()
    }

    /// A view of the committed state that stays usable once openraft owns the machine.
    pub fn view(&self) -> CommittedView {
        CommittedView { shared: self.shared.clone() }
    }
}

impl CommittedView {
    /// The last hale sequence number applied, as it moves.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// A copy of the committed state and the last hale sequence number folded into it.
    pub fn state(&self) -> (u64, State) {
        self.with_state(|last_seq, state| (last_seq, state.clone()))
    }

    /// Calls `read` with the last hale sequence number and the committed state (under the
    /// state machine's lock: keep it short).
    pub fn with_state<R>(&self, read: impl FnOnce(u64, &State) -> R) -> R {
        let committed = self.shared.committed.read().expect("the state machine panicked while folding");
        read(committed.last_seq, committed.core.state())
    }

    /// How far the committed records are copied into the `events` table, if they are.
    pub fn events_copied(&self) -> Option<watch::Receiver<u64>> {
        self.shared.mirror.as_ref().map(super::mirror::Mirror::copied)
    }

    /// The last Raft log id applied.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.shared.committed.read().expect("the state machine panicked while folding").last_applied
    }

    /// Makes `state`, whose last event is `last_seq` (a single node's log, recovered), the
    /// state the first entries fold onto; durable (fsync'd) before it returns. Only on a
    /// state machine that has applied nothing: `hale cluster init` on a node converted
    /// from a single node, before it initializes the cluster.
    pub fn import(&self, last_seq: u64, state: State) -> Result<(), RaftStoreError> {
        let mut committed = self.shared.committed.write().map_err(|_| poisoned())?;
        if committed.last_applied.is_some() || committed.last_seq != 0 {
            return Err(RaftStoreError::Task(format!(
                "this node's state machine has applied entries already (to event {}): only a new node can bring in a single node's log",
                committed.last_seq
            )));
        }
        let hale = hale_store::snapshot::encode_with(
            last_seq,
            now(),
            &state,
            self.shared.keys.as_deref().map(Keyring::current),
        );
        let bytes = encode(&Meta { snapshot_id: format!("imported-{last_seq}"), ..Meta::default() }, &hale);
        let dir = &self.shared.snapshots.dir;
        let (temporary, path) = (dir.join(IMPORTED_TEMPORARY), dir.join(IMPORTED));
        let mut file = File::create(&temporary).map_err(RaftStoreError::io("create", &temporary))?;
        file.write_all(&bytes).map_err(RaftStoreError::io("write", &temporary))?;
        file.sync_all().map_err(RaftStoreError::io("fsync", &temporary))?;
        drop(file);
        std::fs::rename(&temporary, &path).map_err(RaftStoreError::io("rename", &temporary))?;
        File::open(dir).and_then(|dir| dir.sync_all()).map_err(RaftStoreError::io("fsync", dir))?;
        committed.core = Core::from_state(state, self.shared.limits.clone());
        committed.last_seq = last_seq;
        drop(committed);
        self.shared.applied.send_replace(last_seq);
        Ok(())
    }
}

fn poisoned() -> RaftStoreError {
    RaftStoreError::Task("the state machine panicked while folding".into())
}

/// Folds `entry` into `committed`; the answer to give for it.
fn apply_entry(
    committed: &mut Committed,
    keys: Option<&Keyring>,
    entry: Entry<TypeConfig>,
    copies: Option<&mut Vec<hale_store::Record>>,
) -> Result<Applied, RaftStoreError> {
    let mut copies = copies;
    let index = entry.log_id.index;
    match entry.payload {
        EntryPayload::Blank => {}
        EntryPayload::Normal(batch) => {
            for wire in batch.records {
                let record = wire.to_record();
                if record.seq != committed.last_seq + 1 {
                    return Err(RaftStoreError::Sequence { index, seq: record.seq, last: committed.last_seq });
                }
                let event =
                    record.open(keys).map_err(|source| RaftStoreError::Record { index, seq: record.seq, source })?;
                committed.core.apply_owned(record.at, event);
                committed.last_seq = record.seq;
                if let Some(copies) = copies.as_deref_mut() {
                    copies.push(record);
                }
            }
        }
        EntryPayload::Membership(membership) => {
            committed.membership = StoredMembership::new(Some(entry.log_id), membership);
        }
    }
    committed.last_applied = Some(entry.log_id);
    Ok(Applied { last_seq: committed.last_seq })
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let committed = self
            .shared
            .committed
            .read()
            .map_err(|_| poisoned().storage(ErrorSubject::StateMachine, ErrorVerb::Read))?;
        Ok((committed.last_applied, committed.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Folding is CPU work without I/O, as replay is: done here, not on the blocking pool.
        let shared = &self.shared;
        let mut answers = Vec::new();
        let mut copies = shared.mirror.as_ref().map(|_| Vec::new());
        let last_seq = {
            let mut committed = shared
                .committed
                .write()
                .map_err(|_| poisoned().storage(ErrorSubject::StateMachine, ErrorVerb::Write))?;
            for entry in entries {
                let log_id = entry.log_id;
                let answer = apply_entry(&mut committed, shared.keys.as_deref(), entry, copies.as_mut())
                    .map_err(|error| error.storage(ErrorSubject::Apply(log_id), ErrorVerb::Write));
                match answer {
                    Ok(answer) => answers.push(answer),
                    Err(error) => {
                        // What was folded before the damage stays announced.
                        shared.applied.send_replace(committed.last_seq);
                        return Err(error);
                    }
                }
            }
            committed.last_seq
        };
        shared.applied.send_replace(last_seq);
        if let (Some(mirror), Some(copies)) = (&shared.mirror, copies) {
            mirror.send(copies);
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        let committed = self.shared.committed.read().expect("the state machine panicked while folding");
        SnapshotBuilder {
            shared: self.shared.clone(),
            state: committed.core.state().clone(),
            last_seq: committed.last_seq,
            last_applied: committed.last_applied,
            membership: committed.membership.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let shared = self.shared.clone();
        let given = meta.clone();
        let failed =
            |error: RaftStoreError| error.storage(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write);
        let (last_seq, state) = blocking(move || {
            let bytes = snapshot.into_inner();
            let (found, last_seq, state) = decode(&bytes, shared.keys.as_deref()).map_err(|reason| {
                RaftStoreError::Snapshot { what: format!("{} received", given.snapshot_id), reason }
            })?;
            if found.last_log_id != given.last_log_id || found.last_membership != given.last_membership {
                return Err(RaftStoreError::Snapshot {
                    what: format!("{} received", given.snapshot_id),
                    reason: format!("it holds {found} but was sent as {given}"),
                });
            }
            shared.snapshots.persist(&given, &bytes, last_seq)?;
            Ok((last_seq, state))
        })
        .await
        .map_err(failed)?;
        {
            let mut committed = self.shared.committed.write().map_err(|_| failed(poisoned()))?;
            *committed = Committed {
                core: Core::from_state(state, self.shared.limits.clone()),
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
                last_seq,
            };
        }
        self.shared.applied.send_replace(last_seq);
        if let Some(mirror) = &self.shared.mirror {
            mirror.skip_to(last_seq);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let shared = self.shared.clone();
        blocking(move || shared.snapshots.current())
            .await
            .map_err(|error| error.storage(ErrorSubject::Snapshot(None), ErrorVerb::Read))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let shared = self.shared.clone();
        let state = std::mem::take(&mut self.state);
        let last_seq = self.last_seq;
        let created = now();
        let (term, index) = self.last_applied.map_or((0, 0), |log_id| (log_id.leader_id.term, log_id.index));
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{term}-{index}-{last_seq}-{}", created.0),
        };
        let failed_meta = meta.clone();
        let built = blocking(move || {
            let hale = hale_store::snapshot::encode_with(
                last_seq,
                created,
                &state,
                shared.keys.as_deref().map(Keyring::current),
            );
            let bytes = encode(&meta, &hale);
            shared.snapshots.persist(&meta, &bytes, last_seq)?;
            Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
        })
        .await
        .map_err(|error| error.storage(ErrorSubject::Snapshot(Some(failed_meta.signature())), ErrorVerb::Write))?;
        Ok(built)
    }
}

fn now() -> Timestamp {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp(since_epoch.as_millis() as u64)
}

impl Snapshots {
    /// Keeps `bytes` (the snapshot `meta` describes, at hale sequence number `last_seq`)
    /// as the current snapshot, unless the current one is newer.
    fn persist(&self, meta: &Meta, bytes: &[u8], last_seq: u64) -> Result<(), RaftStoreError> {
        let mut current = self.current.lock().map_err(|_| poisoned())?;
        if current.as_ref().is_some_and(|current| current.last_log_id > meta.last_log_id) {
            return Ok(());
        }
        let temporary = self.dir.join(RAFT_SNAPSHOT_TEMPORARY);
        let path = self.dir.join(RAFT_SNAPSHOT);
        let mut file = File::create(&temporary).map_err(RaftStoreError::io("create", &temporary))?;
        file.write_all(bytes).map_err(RaftStoreError::io("write", &temporary))?;
        file.sync_all().map_err(RaftStoreError::io("fsync", &temporary))?;
        drop(file);
        std::fs::rename(&temporary, &path).map_err(RaftStoreError::io("rename", &temporary))?;
        File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(RaftStoreError::io("fsync", &self.dir))?;
        *current = Some(meta.clone());
        // A snapshot holds whatever was imported: the import is no longer needed.
        match std::fs::remove_file(self.dir.join(IMPORTED)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(%error, "could not remove the imported state, which a snapshot now holds");
            }
            _ => {}
        }
        if self.kept > 0 {
            let hale = &bytes[HEADER_LEN + meta_len(bytes)..];
            hale_store::snapshot::write(&self.hale_dir, last_seq, hale)?;
            hale_store::snapshot::prune(&self.hale_dir, self.kept)?;
        }
        Ok(())
    }

    /// The current snapshot, read back and checked.
    fn current(&self) -> Result<Option<Snapshot<TypeConfig>>, RaftStoreError> {
        let current = self.current.lock().map_err(|_| poisoned())?;
        if current.is_none() {
            return Ok(None);
        }
        let path = self.dir.join(RAFT_SNAPSHOT);
        let bytes = std::fs::read(&path).map_err(RaftStoreError::io("read", &path))?;
        let meta =
            check(&bytes).map_err(|reason| RaftStoreError::Snapshot { what: path.display().to_string(), reason })?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}

/// A Raft snapshot of `meta` around the hale snapshot `hale`.
fn encode(meta: &Meta, hale: &[u8]) -> Vec<u8> {
    let meta = serde_json::to_vec(meta).expect("snapshot metas always serialize");
    let mut bytes = Vec::with_capacity(HEADER_LEN + meta.len() + hale.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT.to_le_bytes());
    bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(hale.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&meta);
    bytes.extend_from_slice(hale);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..CRC_AT]), &bytes[HEADER_LEN..]);
    bytes[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// The meta length of checked snapshot bytes.
fn meta_len(bytes: &[u8]) -> usize {
    u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize
}

/// Checks a Raft snapshot's header and checksum; returns its meta.
fn check(bytes: &[u8]) -> Result<Meta, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("too short for a snapshot header ({} bytes)", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("not a hale Raft snapshot (bad magic)".into());
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err(format!("format {format} is not known to this hale"));
    }
    let meta_len = meta_len(bytes) as u64;
    let hale_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let found = (bytes.len() - HEADER_LEN) as u64;
    if meta_len.checked_add(hale_len) != Some(found) {
        return Err(format!("the header says {meta_len} + {hale_len} bytes follow but {found} do"));
    }
    let stored = u32::from_le_bytes(bytes[CRC_AT..HEADER_LEN].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c_append(crc32c::crc32c(&bytes[..CRC_AT]), &bytes[HEADER_LEN..]);
    if stored != computed {
        return Err(format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"));
    }
    let meta = &bytes[HEADER_LEN..HEADER_LEN + meta_len as usize];
    serde_json::from_slice(meta).map_err(|error| format!("undecodable meta: {error}"))
}

/// Checks and decodes a Raft snapshot: its meta, the last hale sequence number and the state.
fn decode(bytes: &[u8], keys: Option<&Keyring>) -> Result<(Meta, u64, State), String> {
    let meta = check(bytes)?;
    let hale = &bytes[HEADER_LEN + meta_len(bytes)..];
    let (seq, _, state, _) = hale_store::snapshot::decode_sealed(hale, keys)
        .map_err(|error| format!("the hale snapshot inside: {error}"))?;
    Ok((meta, seq, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raft_snapshot_round_trips_and_every_byte_matters() {
        let meta = Meta { snapshot_id: "1-2-3-4".into(), ..Meta::default() };
        let hale = hale_store::snapshot::encode(3, Timestamp(4), &State::default());
        let bytes = encode(&meta, &hale);
        let (found, seq, state) = decode(&bytes, None).unwrap();
        assert_eq!((found, seq, state), (meta, 3, State::default()));
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(decode(&damaged, None).is_err(), "a flipped byte at {at} went unnoticed");
        }
        assert!(decode(&bytes[..bytes.len() - 1], None).is_err());
    }
}
