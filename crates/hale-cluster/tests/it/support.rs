//! Entries and data directories for the store tests.

use hale_cluster::{Batch, NodeId, TypeConfig};
use hale_store::{DataDir, Record};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};
use std::collections::BTreeSet;

/// A fresh data directory (held: its lock is taken) in a temporary directory.
pub fn data_dir() -> (tempfile::TempDir, DataDir) {
    let temporary = tempfile::tempdir().expect("a temporary directory");
    let dir = DataDir::open(temporary.path().join("data")).expect("a data directory");
    (temporary, dir)
}

pub fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

pub fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
}

pub fn normal(term: u64, index: u64, records: &[Record]) -> Entry<TypeConfig> {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(Batch::of(records)) }
}

pub fn membership(term: u64, index: u64, voters: &[NodeId]) -> Entry<TypeConfig> {
    let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
    Entry { log_id: log_id(term, index), payload: EntryPayload::Membership(Membership::new(vec![voters], ())) }
}
