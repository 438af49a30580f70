//! When a follower stands for election.
//!
//! openraft 0.9 makes a follower wait its leader lease (`election_timeout_max`) plus its
//! own election timeout (drawn once per process) before it stands, and voters refuse
//! while their lease runs: a dead leader is replaced only after about
//! `election_max + election_min..election_max`, twice what Raft's election timeout
//! promises. So hale gives openraft a lease of `election_min` (its range is then
//! `election_min..election_min + 1`), and stands by itself: a voter that has heard nothing
//! from a leader (no append, no vote request) for a timeout drawn afresh each time
//! between `election_min` and `election_max` asks openraft to elect. That is Raft's own
//! rule, and etcd's. openraft's timer stays as a backstop (about twice `election_min`).
//!
//! Before it stands, a node asks the other voters whether they too have heard no leader
//! for `election_min` (a pre-vote, `POST /v1/cluster/raft/prevote`), and stands only if a
//! majority, itself included, says so. A node that was cut off or paused and comes back
//! therefore does not bump the term and depose a leader the others still hear (openraft
//! 0.9 has no pre-vote of its own); openraft's own election timer is turned off so that
//! every election goes through this.
//!
//! Safety does not rest on any of this: Raft's votes decide, and reads confirm leadership
//! with a quorum (the read index).

use crate::network::{ClusterSecret, PREVOTE_PATH, PeerClient};
use crate::node::Timeouts;
use crate::types::{NodeId, TypeConfig};
use openraft::{Raft, ServerState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When this node last heard from a leader or a candidate.
#[derive(Debug)]
pub struct Heard {
    epoch: Instant,
    /// Milliseconds after `epoch`.
    last: AtomicU64,
}

impl Heard {
    pub fn new() -> Arc<Heard> {
        Arc::new(Heard { epoch: Instant::now(), last: AtomicU64::new(0) })
    }

    /// Something came from a leader or a candidate now.
    pub fn now(&self) {
        self.last.fetch_max(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since something came from a leader or a candidate.
    pub fn quiet(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// The answer to a pre-vote: whether this node would vote for someone else now.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PreVote {
    pub grant: bool,
}

/// This node's answer to a pre-vote: yes unless it leads or has heard a leader (or a
/// candidate) within `election_min`.
pub fn pre_vote(raft: &Raft<TypeConfig>, heard: &Heard, election_min: Duration) -> PreVote {
    let leads = raft.metrics().borrow().state == ServerState::Leader;
    PreVote { grant: !leads && heard.quiet() >= election_min }
}

/// Whether a majority of the voters, this node included, has heard no leader either.
async fn majority_agrees(
    raft: &Raft<TypeConfig>,
    peers: &PeerClient,
    secret: &ClusterSecret,
    timeouts: &Timeouts,
) -> bool {
    let (me, voters): (NodeId, Vec<(NodeId, String)>) = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|node| (id, node.addr.clone())))
            .collect();
        (metrics.id, voters)
    };
    let needed = voters.len() / 2 + 1;
    let mut asks = tokio::task::JoinSet::new();
    for (id, addr) in voters.into_iter().filter(|(id, _)| *id != me) {
        let request = peers
            .client()
            .post(peers.url(&addr, PREVOTE_PATH))
            .timeout(timeouts.election_min / 2)
            .bearer_auth(secret.expose())
            .header(crate::network::FROM_HEADER, me);
        asks.spawn(async move {
            let answer = request.send().await.ok()?;
            let vote: PreVote = answer.json().await.ok()?;
            tracing::debug!(peer = id, grant = vote.grant, "pre-vote");
            Some(vote.grant)
        });
    }
    let mut granted = 1;
    while let Some(answer) = asks.join_next().await {
        if matches!(answer, Ok(Some(true))) {
            granted += 1;
            if granted >= needed {
                return true;
            }
        }
    }
    granted >= needed
}

/// Stands for election when the leader has been quiet for a random election timeout and
/// a majority agrees; returns when Raft has shut down.
pub async fn run(
    raft: Raft<TypeConfig>,
    heard: Arc<Heard>,
    timeouts: Timeouts,
    peers: PeerClient,
    secret: ClusterSecret,
) {
    // Every election goes through the pre-vote: openraft's own timer would skip it.
    raft.runtime_config().elect(false);
    let draw = || {
        use rand::Rng;
        let (min, max) = (timeouts.election_min.as_millis() as u64, timeouts.election_max.as_millis() as u64);
        Duration::from_millis(rand::rng().random_range(min..=max.max(min)))
    };
    // How often a leader or a learner looks whether it became a follower; a follower
    // sleeps until its timeout would run out, and stands the moment it does.
    let tick = (timeouts.heartbeat / 4).max(Duration::from_millis(5));
    let mut timeout = draw();
    let mut stood: Option<Instant> = None;
    let mut wait = tick;
    loop {
        tokio::time::sleep(wait).await;
        wait = tick;
        let (state, voter) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            (metrics.state, metrics.membership_config.membership().voter_ids().any(|id| id == metrics.id))
        };
        match state {
            ServerState::Shutdown => return,
            ServerState::Leader | ServerState::Learner => {
                stood = None;
                continue;
            }
            ServerState::Follower | ServerState::Candidate if !voter => continue,
            ServerState::Follower | ServerState::Candidate => {}
        }
        let quiet = stood.map_or(heard.quiet(), |at| heard.quiet().min(at.elapsed()));
        if quiet >= timeout {
            if majority_agrees(&raft, &peers, &secret, &timeouts).await && raft.trigger().elect().await.is_err() {
                return;
            }
            stood = Some(Instant::now());
            timeout = draw();
        } else {
            wait = timeout - quiet;
        }
    }
}
