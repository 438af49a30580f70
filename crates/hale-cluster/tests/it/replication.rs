//! Three nodes on loopback, each with its own data directory and HTTP listener: a leader
//! is elected, batches of real hale records are committed and folded on every node, the
//! leader is stopped and another takes over with nothing lost, and the stopped node comes
//! back from its directory and catches up. Raft is openraft's; what is tested here is
//! hale's adapter (storage, network, the fold).

use hale_cluster::local::{LocalNode, agreed_leader, listeners, quick_timeouts};
use hale_cluster::network::{self, ClusterSecret};
use hale_cluster::{Batch, NodeId};
use hale_core::{AgentName, Event, RoleName, Timestamp};
use hale_store::Record;
use std::collections::BTreeMap;
use std::time::Duration;

const SECRET: &str = "test-cluster-secret-0123456789";

fn secret() -> ClusterSecret {
    ClusterSecret::new(SECRET).unwrap()
}

/// Waits up to `seconds` for `probe` to hold, polling every 20 ms.
async fn until(what: &str, seconds: u64, mut probe: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    while !probe() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {seconds} s waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn leader_of(nodes: &[Option<LocalNode>]) -> NodeId {
    let live: Vec<&LocalNode> = nodes.iter().flatten().collect();
    agreed_leader(&live, Duration::from_secs(20)).await.expect("a leader within 20 s")
}

/// `count` records, from `first_seq` on: an agent registers and checkpoints.
fn records(first_seq: u64, count: u64) -> Vec<Record> {
    let agent = AgentName::new("writer").unwrap();
    (first_seq..first_seq + count)
        .map(|seq| {
            let event = if seq == 1 {
                Event::AgentRegistered {
                    agent: agent.clone(),
                    role: RoleName::new("writer").unwrap(),
                    labels: BTreeMap::new(),
                }
            } else if seq == 2 {
                Event::IncarnationStarted { agent: agent.clone(), incarnation: 1 }
            } else {
                let patch = serde_json::json!({ "n": seq });
                Event::Checkpointed { agent: agent.clone(), incarnation: 1, version: seq - 2, patch }
            };
            Record::encode(seq, Timestamp(1_000 + seq), &event)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_survive_the_leaders_stop_and_catch_up_a_returning_node() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (bound, members) = listeners(3).await.unwrap();
    let mut nodes = Vec::new();
    for (id, listener) in (1..=3u64).zip(bound) {
        let secret = secret();
        let node = LocalNode::start(id, dirs[id as usize - 1].path(), listener, &secret, quick_timeouts()).await;
        nodes.push(Some(node.unwrap()));
    }
    nodes[0].as_ref().unwrap().raft.initialize(members.clone()).await.unwrap();
    let leader = leader_of(&nodes).await;

    // Ten batches through the leader: each answered once a quorum has it, folded everywhere.
    let first = nodes[leader as usize - 1].as_ref().unwrap();
    let mut seq = 1;
    for _ in 0..10 {
        let batch = Batch::of(&records(seq, 3));
        seq += 3;
        let written = first.raft.client_write(batch).await.unwrap();
        assert_eq!(written.data.last_seq, seq - 1);
    }
    for node in nodes.iter().flatten() {
        let applied = node.committed.applied();
        until(&format!("node {} to apply seq {}", node.id, seq - 1), 10, || *applied.borrow() == seq - 1).await;
    }
    let reference = first.committed.state().1;
    for node in nodes.iter().flatten() {
        assert_eq!(node.committed.state().1, reference, "node {} folded something else", node.id);
    }

    // The leader stops; the two others elect one of themselves and go on.
    let stopped = nodes[leader as usize - 1].take().unwrap();
    let stopped_dir = dirs[leader as usize - 1].path().to_path_buf();
    let stopped_addr = stopped.addr.clone();
    stopped.stop().await;
    let next = leader_of(&nodes).await;
    assert_ne!(next, leader);
    let second = nodes[next as usize - 1].as_ref().unwrap();
    for _ in 0..5 {
        let batch = Batch::of(&records(seq, 3));
        seq += 3;
        second.raft.client_write(batch).await.unwrap();
    }
    assert_eq!(*second.committed.applied().borrow(), seq - 1);

    // The stopped node comes back from its directory, on its address, and catches up.
    let listener = tokio::net::TcpListener::bind(&stopped_addr).await.unwrap();
    let back = LocalNode::start(leader, &stopped_dir, listener, &secret(), quick_timeouts()).await.unwrap();
    let applied = back.committed.applied();
    until("the returning node to catch up", 20, || *applied.borrow() == seq - 1).await;
    assert_eq!(back.committed.state().1, second.committed.state().1);
    nodes[leader as usize - 1] = Some(back);
    for node in nodes.into_iter().flatten() {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_cluster_secret_never_reaches_raft() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = LocalNode::start(1, dir.path(), listener, &secret(), quick_timeouts()).await.unwrap();
    let client = reqwest::Client::new();
    for token in [None, Some("wrong-secret-0123456789")] {
        let vote = serde_json::json!({
            "vote": {"leader_id": {"term": 99, "node_id": 7}, "committed": false},
            "last_log_id": null
        });
        let mut request = client.post(format!("http://{}{}", node.addr, network::VOTE_PATH)).json(&vote);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), 401);
        let body = answer.text().await.unwrap();
        assert!(body.contains("cluster secret"), "{body}");
    }
    // Raft never saw term 99.
    assert!(node.raft.metrics().borrow().current_term < 99);
    node.stop().await;
}

/// A follower that was down while the leader snapshotted and purged its log catches up
/// from the snapshot, sent in chunks over the node's listener, although the snapshot is
/// many times larger than an ordinary request may be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_purged_log_catches_up_from_a_large_snapshot() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (bound, members) = listeners(3).await.unwrap();
    let mut nodes = Vec::new();
    for (id, listener) in (1..=3u64).zip(bound) {
        let node = LocalNode::start(id, dirs[id as usize - 1].path(), listener, &secret(), quick_timeouts()).await;
        nodes.push(Some(node.unwrap()));
    }
    nodes[0].as_ref().unwrap().raft.initialize(members.clone()).await.unwrap();
    let leader = leader_of(&nodes).await;
    let behind = (1..=3u64).find(|id| *id != leader).unwrap();
    let stopped = nodes[behind as usize - 1].take().unwrap();
    let stopped_addr = stopped.addr.clone();
    stopped.stop().await;

    // About 3 MB of state (far more as JSON), written while the follower is down.
    let first = nodes[leader as usize - 1].as_ref().unwrap();
    let mut batch = records(1, 2);
    let agent = AgentName::new("writer").unwrap();
    let blob = "x".repeat(100_000);
    for seq in 3..=32u64 {
        let patch = serde_json::json!({ format!("k{seq}"): blob });
        let event = Event::Checkpointed { agent: agent.clone(), incarnation: 1, version: seq - 2, patch };
        batch.push(Record::encode(seq, Timestamp(1_000 + seq), &event));
    }
    let mut written = None;
    for chunk in batch.chunks(4) {
        written = Some(first.raft.client_write(Batch::of(chunk)).await.unwrap().log_id);
    }
    // The metrics may not show the last write applied yet when it returns: wait for a
    // snapshot at or past it, then purge up to that snapshot.
    let written = written.unwrap();
    first.raft.trigger().snapshot().await.unwrap();
    let metrics = first
        .raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(|metrics| metrics.snapshot.is_some_and(|snapshot| snapshot.index >= written.index), "the snapshot")
        .await
        .unwrap();
    let applied = metrics.snapshot.unwrap();
    first.raft.trigger().purge_log(applied.index).await.unwrap();
    first
        .raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(|metrics| metrics.purged == Some(applied), "the log purged")
        .await
        .unwrap();

    let listener = tokio::net::TcpListener::bind(&stopped_addr).await.unwrap();
    let back = LocalNode::start(behind, dirs[behind as usize - 1].path(), listener, &secret(), quick_timeouts())
        .await
        .unwrap();
    let seen = back.committed.applied();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while *seen.borrow() != 32 {
        let (applied, leader_applied) = (*seen.borrow(), *first.committed.applied().borrow());
        let metrics = back.raft.metrics().borrow().clone();
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 30 s waiting for the returning node to install the snapshot: it applied {applied} \
             (the leader {leader_applied}); its Raft metrics: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(back.committed.state().1, first.committed.state().1);
    nodes[behind as usize - 1] = Some(back);
    for node in nodes.into_iter().flatten() {
        node.stop().await;
    }
}
