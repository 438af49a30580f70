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
//! Safety does not rest on any of this: Raft's votes decide, and reads confirm leadership
//! with a quorum (the read index). The lease only keeps a node that was cut off from
//! deposing a leader the others still hear.

use crate::node::Timeouts;
use crate::types::TypeConfig;
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

    fn quiet(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Stands for election when the leader has been quiet for a random election timeout;
/// returns when Raft has shut down.
pub async fn run(raft: Raft<TypeConfig>, heard: Arc<Heard>, timeouts: Timeouts) {
    let draw = || {
        use rand::Rng;
        let (min, max) = (timeouts.election_min.as_millis() as u64, timeouts.election_max.as_millis() as u64);
        Duration::from_millis(rand::rng().random_range(min..=max.max(min)))
    };
    let tick = (timeouts.heartbeat / 4).max(Duration::from_millis(5));
    let mut timeout = draw();
    let mut stood: Option<Instant> = None;
    loop {
        tokio::time::sleep(tick).await;
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
            if raft.trigger().elect().await.is_err() {
                return;
            }
            stood = Some(Instant::now());
            timeout = draw();
        }
    }
}
