//! One node of a cluster, put together: its Raft on the data directory's log store and
//! state machine, the network to its peers, and the routes its peers call. The server
//! merges [`NodeParts::routes`] into its own router, so node-to-node traffic shares the
//! node's listener (and its TLS when configured).

use crate::network::{self, ClusterSecret, NetworkFactory, PeerClient};
use crate::store::{CommittedView, LogStore, RaftStoreError, StateMachine, StateMachineOptions};
use crate::types::{NodeId, TypeConfig};
use hale_store::DataDir;
use openraft::{Config, Raft};
use std::sync::Arc;
use std::time::Duration;

/// Raft's timing, `[cluster]` in hale.toml.
///
/// What failover costs: a voter that hears nothing from a leader for a random time
/// between `election_min` and `election_max` (drawn afresh each time) stands for
/// election ([`crate::elector`]), and the others vote once their leader lease
/// (`election_min` since they last heard the leader) has run out. With the defaults (as
/// etcd's: 100 ms heartbeats, elections after 0.5–1 s of silence) a dead leader is
/// replaced 500–1000 ms after its last heartbeat, and a leader must be silent for 500 ms
/// (five heartbeats) before anyone stands against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How often the leader sends heartbeats (default 100 ms).
    pub heartbeat: Duration,
    /// The range of the random election timeout (default 500–1000 ms); `election_min` is
    /// also the leader lease.
    pub election_min: Duration,
    pub election_max: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1_000),
        }
    }
}

impl Timeouts {
    /// openraft's configuration for these timeouts; `Err` says what is inconsistent.
    pub fn config(&self, cluster_name: &str) -> Result<Arc<Config>, String> {
        let millis = |duration: Duration| duration.as_millis() as u64;
        if self.election_min <= self.heartbeat * 2 {
            return Err(format!(
                "the election timeout ({} ms) must be more than twice the heartbeat interval ({} ms), or followers start elections while the leader is fine",
                millis(self.election_min),
                millis(self.heartbeat)
            ));
        }
        if self.election_max < self.election_min {
            return Err(format!(
                "the election timeout's maximum ({} ms) is below its minimum ({} ms)",
                millis(self.election_max),
                millis(self.election_min)
            ));
        }
        // openraft's lease is its maximum: `election_min`; the elector draws the rest.
        let config = Config {
            cluster_name: cluster_name.to_string(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_min),
            election_timeout_max: millis(self.election_min) + 1,
            snapshot_max_chunk_size: network::SNAPSHOT_CHUNK_BYTES,
            // openraft's default (200 ms) is less than a chunk takes to encode, send and
            // decode on a slow machine: a large snapshot then never installs, its chunk
            // timing out again and again.
            install_snapshot_timeout: network::SNAPSHOT_CHUNK_TIMEOUT.as_millis() as u64,
            ..Config::default()
        };
        config.validate().map(Arc::new).map_err(|error| error.to_string())
    }
}

/// A node's Raft and what goes with it.
pub struct NodeParts {
    pub raft: Raft<TypeConfig>,
    /// The committed state, readable while Raft owns the state machine.
    pub committed: CommittedView,
    /// The node-to-node routes, for the node's router.
    pub routes: axum::Router,
    /// How this node reaches its peers (joining and leaving go through it too).
    pub peers: PeerClient,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] RaftStoreError),
    #[error("cannot start Raft: {0}")]
    Raft(String),
}

/// Opens node `id` on `dir`: its log store and state machine, Raft over them at
/// `timeouts`, and the elector that decides when it stands. With `peer_ca` (PEM), the
/// nodes serve TLS and peers are verified against it.
pub async fn open(
    id: NodeId,
    dir: &DataDir,
    timeouts: Timeouts,
    secret: ClusterSecret,
    peer_ca: Option<&[u8]>,
    options: StateMachineOptions,
) -> Result<NodeParts, NodeError> {
    let config = timeouts.config("hale").map_err(NodeError::Raft)?;
    let peers = PeerClient::new(peer_ca).map_err(NodeError::Raft)?;
    let log = LogStore::open(dir)?;
    let machine = StateMachine::open(dir, options)?;
    let committed = machine.view();
    let raft = Raft::new(id, config, NetworkFactory::new(id, peers.clone(), secret.clone()), log, machine)
        .await
        .map_err(|error| NodeError::Raft(error.to_string()))?;
    let heard = crate::elector::Heard::new();
    tokio::spawn(crate::elector::run(raft.clone(), heard.clone(), timeouts, peers.clone(), secret.clone()));
    let routes = network::routes(raft.clone(), secret, heard, timeouts.election_min);
    Ok(NodeParts { raft, committed, routes, peers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_an_election_shorter_than_two_heartbeats_is_refused() {
        // openraft's lease is the minimum: the elector draws the rest of the range.
        let config = Timeouts::default().config("hale").unwrap();
        assert_eq!(
            (config.heartbeat_interval, config.election_timeout_min, config.election_timeout_max),
            (100, 500, 501)
        );
        let backwards = Timeouts { election_max: Duration::from_millis(450), ..Timeouts::default() };
        assert!(backwards.config("hale").unwrap_err().contains("below its minimum"));
        let hasty = Timeouts {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(150),
            election_max: Duration::from_millis(300),
        };
        assert!(hasty.config("hale").unwrap_err().contains("more than twice the heartbeat"));
    }
}
