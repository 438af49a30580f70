//! Membership and status: how a node joins, and what `hale cluster status` shows.
//!
//! Joining is node to node, under the cluster secret: the new node asks a member to add
//! it (`POST /v1/cluster/raft/join`); the leader adds it as a learner, waits until it has
//! caught up, then makes it a voter: one node at a time, as Raft's single-step changes
//! want. A member that is not the leader answers with the leader's address, and the new
//! node asks there.

use crate::network::{ClusterSecret, JOIN_PATH, LEAVE_PATH, PeerClient};
use crate::types::{NodeId, TypeConfig};
use hale_proto::{ClusterInfo, ClusterMember};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// `POST /v1/cluster/raft/leave`: remove a member.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaveRequest {
    pub node_id: NodeId,
}

/// `POST /v1/cluster/raft/join`: add this node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub node_id: NodeId,
    /// The address its peers reach it at.
    pub address: String,
}

/// The answer to a join or a leave.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinAnswer {
    /// Done: the voters now.
    Joined { members: BTreeSet<NodeId> },
    /// Ask the leader instead (its address, if known).
    NotLeader { leader: Option<String> },
    /// Refused, with why.
    Refused { reason: String },
}

/// Makes this node a cluster of one (`hale cluster init`). With `import` (the last event
/// and the state of a single node's log, recovered from this node's data directory), the
/// cluster starts from that state: it becomes the base the entries fold onto, and once
/// the first entry is applied a Raft snapshot is taken and the log purged behind it, so a
/// node that joins is sent the snapshot and has the state too.
pub async fn init(
    raft: &Raft<TypeConfig>,
    committed: &crate::store::CommittedView,
    members: BTreeMap<NodeId, BasicNode>,
    import: Option<(u64, hale_core::State)>,
) -> Result<(), String> {
    let importing = import.is_some();
    if let Some((last_seq, state)) = import {
        committed.import(last_seq, state).map_err(|error| format!("cannot bring in this node's log: {error}"))?;
    }
    raft.initialize(members).await.map_err(|error| {
        format!("this node cannot start a cluster ({error}); it has a log or is a member already: `hale cluster status` shows which")
    })?;
    if !importing {
        return Ok(());
    }
    let deadline = std::time::Duration::from_secs(30);
    let applied = raft
        .wait(Some(deadline))
        .metrics(|metrics| metrics.last_applied.is_some(), "the first entry applied")
        .await
        .map_err(|error| format!("the cluster started, but its first entry was not applied: {error}"))?
        .last_applied
        .expect("waited for");
    raft.trigger().snapshot().await.map_err(|error| error.to_string())?;
    raft.wait(Some(deadline))
        .metrics(|metrics| metrics.snapshot.is_some_and(|snapshot| snapshot.index >= applied.index), "a snapshot")
        .await
        .map_err(|error| format!("the cluster started, but the snapshot of the imported log failed: {error}"))?;
    raft.trigger().purge_log(applied.index).await.map_err(|error| error.to_string())?;
    // Until the log is purged, a joining node would be sent the entries instead of the
    // snapshot, and miss the imported state.
    raft.wait(Some(deadline))
        .metrics(|metrics| metrics.purged.is_some_and(|purged| purged.index >= applied.index), "the log purged")
        .await
        .map_err(|error| format!("the cluster started, but its log was not purged behind the snapshot: {error}"))?;
    Ok(())
}

/// Adds `request`'s node: as a learner (waiting until it has caught up), then as a voter.
pub async fn add_member(raft: &Raft<TypeConfig>, request: JoinRequest) -> JoinAnswer {
    let metrics = raft.metrics().borrow().clone();
    if let Some(existing) = metrics.membership_config.membership().get_node(&request.node_id)
        && existing.addr != request.address
    {
        return JoinAnswer::Refused {
            reason: format!(
                "node id {} is already a member at {}; give the new node an id of its own ([cluster] node_id)",
                request.node_id, existing.addr
            ),
        };
    }
    let node = BasicNode::new(request.address.clone());
    if let Err(error) = raft.add_learner(request.node_id, node, true).await {
        return refusal(error);
    }
    let voters = BTreeSet::from([request.node_id]);
    match raft.change_membership(ChangeMembers::AddVoterIds(voters), false).await {
        Ok(written) => {
            let members = written.membership.map(|membership| membership.voter_ids().collect()).unwrap_or_default();
            JoinAnswer::Joined { members }
        }
        Err(error) => refusal(error),
    }
}

/// Removes `request`'s node from the cluster (a voter, then from the nodes replicated
/// to): one node at a time, never the last voter. The leader may remove itself; it steps
/// down once the change is committed, and the others elect a new one.
pub async fn remove_member(raft: &Raft<TypeConfig>, request: LeaveRequest) -> JoinAnswer {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    if membership.get_node(&request.node_id).is_none() {
        let members: Vec<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        return JoinAnswer::Refused {
            reason: format!("node {} is not a member (the members are {members:?})", request.node_id),
        };
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if voters.len() == 1 && voters.contains(&request.node_id) {
        return JoinAnswer::Refused {
            reason: format!("node {} is the cluster's only voter: a cluster cannot leave itself", request.node_id),
        };
    }
    let change = if voters.contains(&request.node_id) {
        ChangeMembers::RemoveVoters(BTreeSet::from([request.node_id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([request.node_id]))
    };
    match raft.change_membership(change, false).await {
        Ok(written) => {
            let members = written.membership.map(|membership| membership.voter_ids().collect()).unwrap_or_default();
            JoinAnswer::Joined { members }
        }
        Err(error) => refusal(error),
    }
}

fn refusal(error: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> JoinAnswer {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            JoinAnswer::NotLeader { leader: forward.leader_node.map(|node| node.addr) }
        }
        other => JoinAnswer::Refused { reason: other.to_string() },
    }
}

/// Asks the member at `address` (and then the leader it names) to add this node. Tries
/// the leader at most a few hops away; `Err` says why it did not join.
pub async fn join(
    address: &str,
    peers: &PeerClient,
    secret: &ClusterSecret,
    request: &JoinRequest,
) -> Result<BTreeSet<NodeId>, String> {
    ask_leader(address, peers, secret, JOIN_PATH, "join", request).await
}

/// Asks the member at `address` (and then the leader it names) to remove a node; the
/// voters afterwards.
pub async fn leave(
    address: &str,
    peers: &PeerClient,
    secret: &ClusterSecret,
    request: &LeaveRequest,
) -> Result<BTreeSet<NodeId>, String> {
    ask_leader(address, peers, secret, LEAVE_PATH, "leave", request).await
}

/// Sends a membership change to the member at `address`, following it to the leader.
async fn ask_leader(
    address: &str,
    peers: &PeerClient,
    secret: &ClusterSecret,
    path: &str,
    what: &str,
    request: &impl Serialize,
) -> Result<BTreeSet<NodeId>, String> {
    let mut target = address.to_string();
    for _ in 0..5 {
        let answer = peers
            .client()
            .post(peers.url(&target, path))
            .timeout(std::time::Duration::from_secs(60))
            .bearer_auth(secret.expose())
            .json(request)
            .send()
            .await
            .map_err(|error| format!("cannot reach {target}: {error}; is a node of the cluster listening there?"))?;
        if !answer.status().is_success() {
            let status = answer.status();
            let body = answer.text().await.unwrap_or_default();
            return Err(format!("{target} refused the {what} ({status}): {body}"));
        }
        match answer.json::<JoinAnswer>().await.map_err(|error| error.to_string())? {
            JoinAnswer::Joined { members } => return Ok(members),
            JoinAnswer::NotLeader { leader: Some(leader) } => target = leader,
            JoinAnswer::NotLeader { leader: None } => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            JoinAnswer::Refused { reason } => return Err(format!("{target} refused the {what}: {reason}")),
        }
    }
    Err(format!("no leader accepted the {what} after asking {address} and the leaders it named"))
}

/// This node's view of the cluster, as `GET /v1/cluster` answers it: on the leader,
/// each member's matched index and how far it lags behind the leader's log.
pub fn status(raft: &Raft<TypeConfig>) -> ClusterInfo {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let matched: BTreeMap<NodeId, Option<u64>> = metrics
        .replication
        .as_ref()
        .map(|replication| {
            replication.iter().map(|(id, log_id)| (*id, log_id.as_ref().map(|log_id| log_id.index))).collect()
        })
        .unwrap_or_default();
    let last = metrics.last_log_index;
    let members = membership
        .nodes()
        .map(|(id, node)| {
            let matched_index = matched.get(id).copied().flatten();
            ClusterMember {
                node_id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
                matched_index,
                lag: matched.contains_key(id).then(|| last.unwrap_or(0).saturating_sub(matched_index.unwrap_or(0))),
            }
        })
        .collect();
    let role = match metrics.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shut down",
    };
    ClusterInfo {
        node_id: metrics.id,
        role: role.to_string(),
        term: metrics.current_term,
        leader: metrics.current_leader,
        last_log_index: metrics.last_log_index,
        last_applied_index: metrics.last_applied.map(|log_id| log_id.index),
        members,
    }
}
