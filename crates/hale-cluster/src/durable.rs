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

/// The engine's log on a Raft node.
pub struct RaftLog {
    raft: Raft<TypeConfig>,
    durability: Arc<watch::Sender<Durability>>,
    /// The last sequence number proposed.
    proposed: Arc<AtomicU64>,
    watcher: tokio::task::JoinHandle<()>,
}

/// Hands leadership to the engine of a [`RaftLog`] (see [`Leadership::lead`]).
#[derive(Clone)]
pub struct Leadership {
    durability: Arc<watch::Sender<Durability>>,
    metrics: watch::Receiver<RaftMetrics<NodeId, openraft::BasicNode>>,
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
        RaftLog { raft, durability, proposed: Arc::new(AtomicU64::new(start)), watcher }
    }

    /// The handle that gives the engine leadership.
    pub fn leadership(&self) -> Leadership {
        Leadership { durability: self.durability.clone(), metrics: self.raft.metrics() }
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
        let batch = Batch::of(&records);
        let last = batch.last_seq();
        let answer = match self.raft.client_write_ff(batch).await {
            Ok(answer) => answer,
            Err(fatal) => {
                let reason = format!("this node's Raft stopped: {fatal}");
                RaftLog::fail(&self.durability, reason.clone());
                return Err(WriteError::Failed(Arc::from(reason.as_str())));
            }
        };
        if let Some(last) = last {
            self.proposed.fetch_max(last, Ordering::SeqCst);
        }
        let durability = self.durability.clone();
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
        });
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
    }
}

/// Hands the engine leadership each time this node is elected, for as long as `raft`
/// runs: waits until the entries of earlier terms are committed and applied here (a
/// read index, `ensure_linearizable`), has `rebuild` rebuild the engine's core from the
/// committed state (the last record's sequence number and the state), then leads.
/// Deposition needs nothing from here: the log's own watch refuses appends at once.
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
        let elected = metrics.borrow_and_update().state == ServerState::Leader;
        if elected && !leadership.leads() && raft.ensure_linearizable().await.is_ok() {
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
