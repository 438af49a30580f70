//! [`RaftLog`]: the engine's [`DurableLog`] on a Raft node.
//!
//! The engine appends a batch of records; the batch becomes one Raft entry, proposed
//! without waiting (`client_write_ff`), so the engine goes on deciding while a quorum
//! stores it, as it does with writes not yet fsync'd on a single node. A record is durable
//! once its entry is committed by a quorum and applied here: the durable position moves
//! with the answers to this node's own proposals (each carries the last hale sequence
//! number its entry applied), never with entries another leader committed, which may
//! number their records the same.
//!
//! Leadership: a `RaftLog` starts not leading. While this node does not lead (Raft's
//! metrics say so, or a proposal is answered "forward to the leader"), its
//! [`Durability`] says `not_leader`, naming the leader's address if it is known: the
//! engine refuses writes and fails what it held. Whoever hands leadership to the engine
//! rebuilds its core from the committed state first and then calls [`Leadership::lead`].

use crate::store::CommittedView;
use crate::types::{Batch, NodeId, TypeConfig};
use hale_store::{Durability, DurableLog, NotLeader, Record, WriteError};
use openraft::error::ClientWriteError;
use openraft::{Raft, RaftMetrics, ServerState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// How long [`RaftLog::shutdown`] waits for what was proposed to be committed.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Entries proposed and not yet answered, at most: while they are in flight, what the
/// engine appends waits and goes out together in the next entry (group commit), so a
/// quorum round carries every record that arrived during the previous one.
pub const PROPOSALS_IN_FLIGHT: usize = 2;

/// Records in one entry, at most (about what a single node's writer puts in one commit).
const RECORDS_PER_ENTRY_MAX: usize = 4_096;

/// The engine's log on a Raft node.
pub struct RaftLog {
    durability: Arc<watch::Sender<Durability>>,
    /// The last sequence number queued to be proposed.
    proposed: Arc<AtomicU64>,
    /// Records waiting to be proposed, with the leadership they were decided under.
    queue: tokio::sync::mpsc::Sender<(u64, Vec<Record>)>,
    /// Counts the times this node was handed leadership: records decided under an earlier
    /// one are never proposed under a later one (the engine was rebuilt in between).
    term: Arc<AtomicU64>,
    watcher: tokio::task::JoinHandle<()>,
    proposer: tokio::task::JoinHandle<()>,
    raft: Raft<TypeConfig>,
}

/// Hands leadership to the engine of a [`RaftLog`] (see [`Leadership::lead`]).
#[derive(Clone)]
pub struct Leadership {
    durability: Arc<watch::Sender<Durability>>,
    metrics: watch::Receiver<RaftMetrics<NodeId, openraft::BasicNode>>,
    term: Arc<AtomicU64>,
}

impl Leadership {
    /// This node leads, and the engine's core was rebuilt from the committed state whose
    /// last record is `last_seq`: appends are taken again, numbered after it. Refused
    /// (`false`) if Raft's metrics no longer say this node leads: the metrics and the
    /// deposing watch agree, so a lost leadership is never handed back by mistake.
    pub fn lead(&self, last_seq: u64) -> bool {
        let metrics = self.metrics.borrow();
        if metrics.state != ServerState::Leader {
            return false;
        }
        self.term.fetch_add(1, Ordering::SeqCst);
        self.durability.send_modify(|durability| {
            durability.durable_seq = durability.durable_seq.max(last_seq);
            durability.not_leader = None;
        });
        true
    }

    /// Whether the log takes appends now.
    pub fn leads(&self) -> bool {
        self.durability.borrow().not_leader.is_none()
    }
}

impl RaftLog {
    /// The log of `raft`, whose state machine `committed` views, not leading yet.
    pub fn new(raft: Raft<TypeConfig>, committed: &CommittedView) -> RaftLog {
        let (start, _) = committed.state();
        let durability = Durability { not_leader: Some(NotLeader::default()), ..Durability::at(start) };
        let durability = Arc::new(watch::channel(durability).0);
        let watcher = tokio::spawn(watch_leadership(raft.metrics(), durability.clone()));
        let term = Arc::new(AtomicU64::new(0));
        let (queue, queued) = tokio::sync::mpsc::channel(1024);
        let proposer = tokio::spawn(propose(raft.clone(), durability.clone(), term.clone(), queued));
        RaftLog { raft, durability, proposed: Arc::new(AtomicU64::new(start)), queue, term, watcher, proposer }
    }

    /// The handle that gives the engine leadership.
    pub fn leadership(&self) -> Leadership {
        Leadership { durability: self.durability.clone(), metrics: self.raft.metrics(), term: self.term.clone() }
    }

    fn fail(durability: &watch::Sender<Durability>, reason: String) {
        durability.send_if_modified(|durability| {
            if durability.failed.is_some() {
                return false;
            }
            durability.failed = Some(Arc::from(reason.as_str()));
            true
        });
    }
}

/// The address of `node` in the membership `metrics` know.
fn address_of(metrics: &RaftMetrics<NodeId, openraft::BasicNode>, node: NodeId) -> Option<Arc<str>> {
    metrics.membership_config.membership().get_node(&node).map(|found| Arc::from(found.addr.as_str()))
}

fn depose(durability: &watch::Sender<Durability>, leader: Option<Arc<str>>) {
    durability.send_if_modified(|durability| {
        let changed = durability.not_leader.as_ref().is_none_or(|known| known.leader != leader);
        durability.not_leader = Some(NotLeader { leader: leader.clone() });
        changed
    });
}

/// Marks the log not leading as soon as Raft's metrics say this node does not lead.
async fn watch_leadership(
    mut metrics: watch::Receiver<RaftMetrics<NodeId, openraft::BasicNode>>,
    durability: Arc<watch::Sender<Durability>>,
) {
    loop {
        let seen = metrics.borrow_and_update().clone();
        if seen.state != ServerState::Leader {
            let leader = seen.current_leader.filter(|leader| *leader != seen.id);
            depose(&durability, leader.and_then(|leader| address_of(&seen, leader)));
        }
        if metrics.changed().await.is_err() {
            depose(&durability, None);
            return;
        }
    }
}

impl DurableLog for RaftLog {
    async fn append(&self, records: Vec<Record>) -> Result<(), WriteError> {
        {
            let durability = self.durability.borrow();
            if let Some(reason) = &durability.failed {
                return Err(WriteError::Failed(reason.clone()));
            }
            if let Some(not_leader) = &durability.not_leader {
                return Err(WriteError::NotLeader { leader: not_leader.leader.clone() });
            }
        }
        let Some(last) = records.last().map(|record| record.seq) else {
            return Ok(());
        };
        let term = self.term.load(Ordering::SeqCst);
        if self.queue.send((term, records)).await.is_err() {
            return Err(WriteError::Stopped);
        }
        self.proposed.fetch_max(last, Ordering::SeqCst);
        Ok(())
    }

    fn durability(&self) -> watch::Receiver<Durability> {
        self.durability.subscribe()
    }

    /// Raft's read index: a heartbeat round confirms this node still leads, and the
    /// entries committed by then are applied. Refused `not_leader` otherwise.
    fn read_barrier(&self) -> Option<hale_store::ReadBarrier> {
        let (raft, durability) = (self.raft.clone(), self.durability.clone());
        Some(Arc::new(move || {
            let (raft, durability) = (raft.clone(), durability.clone());
            Box::pin(async move {
                if let Some(not_leader) = &durability.borrow().not_leader {
                    return Err(WriteError::NotLeader { leader: not_leader.leader.clone() });
                }
                match raft.ensure_linearizable().await {
                    Ok(_) => Ok(()),
                    Err(openraft::error::RaftError::APIError(
                        openraft::error::CheckIsLeaderError::ForwardToLeader(forward),
                    )) => Err(WriteError::NotLeader {
                        leader: forward.leader_node.map(|node| Arc::from(node.addr.as_str())),
                    }),
                    Err(openraft::error::RaftError::APIError(
                        openraft::error::CheckIsLeaderError::QuorumNotEnough(_),
                    )) => Err(WriteError::NotLeader { leader: None }),
                    Err(openraft::error::RaftError::Fatal(fatal)) => {
                        Err(WriteError::Failed(Arc::from(format!("this node's Raft stopped: {fatal}").as_str())))
                    }
                }
            })
        }))
    }

    fn shutdown(self) {
        let target = self.proposed.load(Ordering::SeqCst);
        let mut durability = self.durability.subscribe();
        let settled = move |durability: &Durability| {
            durability.durable_seq >= target || durability.failed.is_some() || durability.not_leader.is_some()
        };
        let waited = tokio::runtime::Handle::current().block_on(async {
            tokio::time::timeout(SHUTDOWN_WAIT, durability.wait_for(settled)).await.map(|found| found.is_ok())
        });
        if !matches!(waited, Ok(true)) {
            tracing::warn!(proposed = target, "stopping with entries a quorum has not committed");
        }
        self.watcher.abort();
        self.proposer.abort();
    }
}

/// Proposes what the engine appends: each entry carries every record queued while the
/// entries before it were in flight (at most [`PROPOSALS_IN_FLIGHT`] at a time). The
/// durable position moves with the answers to these proposals, each carrying the last
/// hale sequence number its entry applied.
async fn propose(
    raft: Raft<TypeConfig>,
    durability: Arc<watch::Sender<Durability>>,
    term: Arc<AtomicU64>,
    mut queued: tokio::sync::mpsc::Receiver<(u64, Vec<Record>)>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT));
    while let Some(first) = queued.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batches = vec![first];
        let mut count = batches[0].1.len();
        while count < RECORDS_PER_ENTRY_MAX
            && let Ok(more) = queued.try_recv()
        {
            count += more.1.len();
            batches.push(more);
        }
        // Records decided under an earlier leadership, or while this node does not lead,
        // are dropped: the engine failed their answers when it lost leadership.
        let now = term.load(Ordering::SeqCst);
        let records: Vec<Record> = {
            let leading = durability.borrow().not_leader.is_none() && durability.borrow().failed.is_none();
            batches.into_iter().filter(|(at, _)| leading && *at == now).flat_map(|(_, records)| records).collect()
        };
        if records.is_empty() {
            continue;
        }
        let answer = match raft.client_write_ff(Batch::of(&records)).await {
            Ok(answer) => answer,
            Err(fatal) => {
                RaftLog::fail(&durability, format!("this node's Raft stopped: {fatal}"));
                return;
            }
        };
        let durability = durability.clone();
        tokio::spawn(async move {
            match answer.await {
                // Committed and applied: entries apply in log order, so everything this
                // node proposed before it is applied too.
                Ok(Ok(written)) => {
                    durability.send_if_modified(|durability| {
                        let moved = written.data.last_seq > durability.durable_seq;
                        durability.durable_seq = durability.durable_seq.max(written.data.last_seq);
                        moved
                    });
                }
                Ok(Err(ClientWriteError::ForwardToLeader(forward))) => {
                    let leader = forward.leader_node.map(|node| Arc::from(node.addr.as_str()));
                    depose(&durability, leader);
                }
                Ok(Err(error)) => RaftLog::fail(&durability, format!("the entry was not committed: {error}")),
                Err(_) => RaftLog::fail(&durability, "this node's Raft stopped before the entry was committed".into()),
            }
            drop(slot);
        });
    }
}

/// Hands the engine leadership each time this node is elected, for as long as `raft`
/// runs: waits until the entries of earlier terms are committed and applied here (the
/// blank entry a new leader appends in its own term is applied, and Raft commits
/// in order), has `rebuild` rebuild the engine's core from the committed state (the last
/// record's sequence number and the state), then leads. Waiting for that entry rather
/// than for a read index saves the new leader a round trip to a quorum; reads still
/// take theirs. Deposition needs nothing from here: the log's own watch refuses appends
/// at once.
pub async fn follow_leadership<F, Fut>(
    raft: Raft<TypeConfig>,
    committed: CommittedView,
    leadership: Leadership,
    mut rebuild: F,
) where
    F: FnMut(u64, hale_core::State) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut metrics = raft.metrics();
    loop {
        let ready = {
            let seen = metrics.borrow_and_update();
            let own_term_applied = seen.last_applied.is_some_and(|applied| {
                applied.leader_id.term == seen.current_term && applied.leader_id.node_id == seen.id
            });
            seen.state == ServerState::Leader && own_term_applied
        };
        if ready && !leadership.leads() {
            let (last_seq, state) = committed.state();
            rebuild(last_seq, state).await;
            if leadership.lead(last_seq) {
                tracing::info!(last_seq, "this node leads: the engine continues from the committed state");
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
