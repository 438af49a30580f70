//! The seam between the engine and its log: what the engine needs from a log, whether the
//! log is one SQLite file ([`Writer`](crate::Writer)) or, later, a replicated one.
//!
//! The engine appends batches of records in sequence order and goes on at once; it learns
//! later, from [`DurableLog::durability`], the position up to which they are durable, or
//! that the log failed. It holds each answer and each effect back until the position of
//! the batch it depends on is durable.

use crate::record::Record;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// What is durable so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durability {
    /// Every record up to this sequence number is durable (committed and fsync'd; in a
    /// cluster, committed by a quorum).
    pub durable_seq: u64,
    /// Set once the log has failed; no later record will become durable.
    pub failed: Option<Arc<str>>,
    /// Set while this node does not lead a replicated log: what it appended since it last
    /// led is not this log's to make durable (another leader decides), and it takes no
    /// appends. `durable_seq` goes on following what the node applies. A single-node log
    /// always leads.
    pub not_leader: Option<NotLeader>,
}

/// Who leads instead, if this node knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotLeader {
    /// The leader's address, as the cluster's membership names it.
    pub leader: Option<Arc<str>>,
}

impl Durability {
    /// Everything up to `durable_seq` is durable; this node leads; nothing failed.
    pub fn at(durable_seq: u64) -> Durability {
        Durability { durable_seq, failed: None, not_leader: None }
    }
}

/// Why something appended was not made durable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// A commit failed (for example fsync returned EIO). Nothing after it is written: the
    /// process must restart and recover from the log.
    #[error(
        "the log could not be written ({0}); hale has stopped accepting writes. Fix the disk, then restart hale: it recovers every acknowledged write from the log"
    )]
    Failed(Arc<str>),
    /// The log has shut down.
    #[error("the log writer has stopped")]
    Stopped,
    /// This node does not lead the replicated log: the request must go to the leader.
    #[error("this node is not the leader{}; send the request to the leader", leader_hint(.leader))]
    NotLeader { leader: Option<Arc<str>> },
}

fn leader_hint(leader: &Option<Arc<str>>) -> String {
    match leader {
        Some(leader) => format!(" (the leader is {leader})"),
        None => " (no leader is known yet: an election is under way)".into(),
    }
}

/// See [`DurableLog::read_barrier`]: resolves `Ok` once a read started before it may be
/// answered.
pub type ReadBarrier =
    std::sync::Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<(), WriteError>> + Send>> + Send + Sync>;

/// A log the engine drives.
///
/// Records are appended with consecutive sequence numbers, each batch following the last,
/// and become durable in that order: when `durability` says `durable_seq` is `n`, every
/// record up to `n` is durable. A failure is final: `failed` is set, `durable_seq` stops,
/// and nothing appended after the failure is ever reported durable. When the log stops,
/// the sender behind `durability` is dropped.
pub trait DurableLog: Send + 'static {
    /// Queues `records` behind everything appended before. Waits while the log's queue is
    /// full (that is the engine's backpressure); fails only if the log has stopped.
    fn append(&self, records: Vec<Record>) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// What is durable now; `changed()` on the receiver waits for progress or failure.
    fn durability(&self) -> watch::Receiver<Durability>;

    /// What makes a read of the state linearizable, if a read needs more than this node's
    /// own view: a node of a cluster confirms with a quorum that it still leads before it
    /// answers (Raft's read index), so a deposed leader that has not noticed cannot answer
    /// from a stale state. `None` (the default, a single node): every read is.
    fn read_barrier(&self) -> Option<ReadBarrier> {
        None
    }

    /// Stops taking appends, makes durable what is queued (unless the log has failed), and
    /// returns once it is done. Blocks: call it off the async runtime.
    fn shutdown(self);
}
