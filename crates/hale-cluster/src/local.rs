//! Nodes of a cluster in one process, each on its own loopback listener and data
//! directory, talking over real sockets: for tests (and benchmarks) of what is built on
//! the cluster. A node here is a whole node ([`node::open`]); only the process is shared.

use crate::network::ClusterSecret;
use crate::node::{self, NodeError, Timeouts};
use crate::store::{CommittedView, StateMachineOptions};
use crate::types::{NodeId, TypeConfig};
use hale_store::DataDir;
use openraft::{BasicNode, Raft};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// A running node.
pub struct LocalNode {
    pub id: NodeId,
    pub addr: String,
    pub raft: Raft<TypeConfig>,
    pub committed: CommittedView,
    server: tokio::task::JoinHandle<()>,
    _dir: DataDir,
}

/// The tests' timeouts: 100 ms heartbeats and 1–2 s elections, so that a test machine
/// too busy to send heartbeats for a while does not see leaders change under it, while a
/// dead leader is still replaced within two seconds.
pub fn quick_timeouts() -> Timeouts {
    Timeouts {
        heartbeat: Duration::from_millis(100),
        election_min: Duration::from_millis(1_000),
        election_max: Duration::from_millis(2_000),
    }
}

impl LocalNode {
    /// Starts node `id` on `listener` from the data directory `path`.
    pub async fn start(
        id: NodeId,
        path: &Path,
        listener: tokio::net::TcpListener,
        secret: &ClusterSecret,
        timeouts: Timeouts,
    ) -> Result<LocalNode, NodeError> {
        let dir = DataDir::open(path).map_err(|error| NodeError::Raft(error.to_string()))?;
        let parts = node::open(id, &dir, timeouts, secret.clone(), None, StateMachineOptions::default()).await?;
        let addr = listener.local_addr().map_err(|error| NodeError::Raft(error.to_string()))?.to_string();
        let router = parts.routes;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(LocalNode { id, addr, raft: parts.raft, committed: parts.committed, server, _dir: dir })
    }

    /// Stops Raft and the listener (the data directory stays).
    pub async fn stop(self) {
        let _ = self.raft.shutdown().await;
        self.server.abort();
        let _ = self.server.await;
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }
}

/// Binds `count` loopback listeners; returns them with the membership they make.
pub async fn listeners(count: u64) -> std::io::Result<(Vec<tokio::net::TcpListener>, BTreeMap<NodeId, BasicNode>)> {
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        members.insert(id, BasicNode::new(listener.local_addr()?.to_string()));
        listeners.push(listener);
    }
    Ok((listeners, members))
}

/// The leader that every one of `nodes` agrees on and that is among them, once there is
/// one; `None` after `within`.
pub async fn agreed_leader(nodes: &[&LocalNode], within: Duration) -> Option<NodeId> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let leaders: Vec<Option<NodeId>> = nodes.iter().map(|node| node.leader()).collect();
        if let Some(Some(leader)) = leaders.first()
            && leaders.iter().all(|seen| *seen == Some(*leader))
            && nodes.iter().any(|node| node.id == *leader)
        {
            return Some(*leader);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
