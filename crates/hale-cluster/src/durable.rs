//! [`RaftLog`]: the engine's [`DurableLog`] on a Raft node that leads.
//!
//! The engine appends a batch of records; the batch becomes one Raft entry, proposed
//! without waiting (`client_write_ff`), so the engine goes on deciding while a quorum
//! stores it, as it does with writes not yet fsync'd on a single node. A record is durable
//! once its entry is committed by a quorum and applied by this node's state machine: the
//! durable position is the state machine's last applied hale sequence number.
//!
//! Losing leadership is final for a `RaftLog`: a proposal answered with "forward to the
//! leader" (or a Raft that stopped) fails the log, so the engine stops acknowledging and
//! refuses writes, as after a failed fsync. Entries this node proposed may still be
//! committed by the next leader; nothing was acknowledged that was not committed. A node
//! that becomes leader again starts a new engine (and a new `RaftLog`) from the committed
//! state. (Handing the engine over without a restart is the next step of issue 12.)

use crate::store::CommittedView;
use crate::types::{Batch, TypeConfig};
use hale_store::{Durability, DurableLog, Record, WriteError};
use openraft::Raft;
use openraft::error::ClientWriteError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// How long [`RaftLog::shutdown`] waits for what was proposed to be committed.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// The engine's log on the Raft leader.
pub struct RaftLog {
    raft: Raft<TypeConfig>,
    durability: Arc<watch::Sender<Durability>>,
    /// The last sequence number proposed.
    proposed: Arc<AtomicU64>,
    follower: tokio::task::JoinHandle<()>,
}

impl RaftLog {
    /// The log of `raft`, whose state machine `committed` views; the durable position
    /// follows what the state machine applies.
    pub fn new(raft: Raft<TypeConfig>, committed: &CommittedView) -> RaftLog {
        let mut applied = committed.applied();
        let start = *applied.borrow_and_update();
        let durability = Arc::new(watch::channel(Durability { durable_seq: start, failed: None }).0);
        let publish = durability.clone();
        let follower = tokio::spawn(async move {
            loop {
                let seq = *applied.borrow_and_update();
                publish.send_if_modified(|durability| {
                    let moved = durability.failed.is_none() && seq > durability.durable_seq;
                    if moved {
                        durability.durable_seq = seq;
                    }
                    moved
                });
                if applied.changed().await.is_err() {
                    return;
                }
            }
        });
        RaftLog { raft, durability, proposed: Arc::new(AtomicU64::new(start)), follower }
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

impl DurableLog for RaftLog {
    async fn append(&self, records: Vec<Record>) -> Result<(), WriteError> {
        if let Some(reason) = &self.durability.borrow().failed {
            return Err(WriteError::Failed(reason.clone()));
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
            let reason = match answer.await {
                Ok(Ok(_)) => return,
                Ok(Err(ClientWriteError::ForwardToLeader(forward))) => match forward.leader_id {
                    Some(leader) => format!("this node is no longer the leader (node {leader} is)"),
                    None => "this node is no longer the leader".to_string(),
                },
                Ok(Err(error)) => format!("the entry was not committed: {error}"),
                Err(_) => "this node's Raft stopped before the entry was committed".to_string(),
            };
            RaftLog::fail(&durability, reason);
        });
        Ok(())
    }

    fn durability(&self) -> watch::Receiver<Durability> {
        self.durability.subscribe()
    }

    fn shutdown(self) {
        let target = self.proposed.load(Ordering::SeqCst);
        let mut durability = self.durability.subscribe();
        let settled = move |durability: &Durability| durability.durable_seq >= target || durability.failed.is_some();
        let waited = tokio::runtime::Handle::current().block_on(async {
            tokio::time::timeout(SHUTDOWN_WAIT, durability.wait_for(settled)).await.map(|found| found.is_ok())
        });
        if !matches!(waited, Ok(true)) {
            tracing::warn!(proposed = target, "stopping with entries a quorum has not committed");
        }
        self.follower.abort();
    }
}
