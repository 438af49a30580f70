//! The engine on a Raft log: three nodes on loopback, the engine on the leader. An answer
//! is given only once a quorum has committed what it depends on, every node folds the
//! same state, one node down changes nothing, and with two down nothing is acknowledged
//! until one comes back.

use hale_cluster::local::{LocalNode, agreed_leader, listeners, quick_timeouts};
use hale_cluster::network::ClusterSecret;
use hale_cluster::openraft;
use hale_cluster::{Leadership, RaftLog, follow_leadership};
use hale_core::{AgentCommand, AgentName, Answer, Core, Hello, Limits, RoleName};
use hale_server::Clock;
use hale_server::engine::{Engine, EngineError, EngineOptions, Response, SnapshotPolicy};
use hale_server::metrics::Metrics;
use hale_store::WriteError;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn secret() -> ClusterSecret {
    ClusterSecret::new("engine-test-cluster-secret-42").unwrap()
}

fn writer() -> AgentName {
    AgentName::new("writer").unwrap()
}

fn checkpoint(n: u64) -> AgentCommand {
    AgentCommand::Checkpoint { agent: writer(), incarnation: 1, patch: json!({ "n": n }), expected_version: None }
}

/// The engine over `node`'s Raft, from its committed state, and the handle that gives it
/// leadership (it does not lead yet).
fn engine_on(node: &LocalNode, snapshots: &std::path::Path) -> (Engine, Leadership) {
    let (last_seq, state) = node.committed.state();
    let (effects, _) = tokio::sync::mpsc::unbounded_channel();
    let options = EngineOptions {
        snapshots: SnapshotPolicy {
            dir: snapshots.to_path_buf(),
            every_events: 1_000_000,
            every: Duration::from_secs(3_600),
            kept: 1,
        },
        effects,
        key: None,
        metrics: Arc::new(Metrics::new(0, 0, snapshots.to_path_buf())),
        clock: Clock::system(),
        tick: None,
        unsnapshotted: 0,
    };
    let log = RaftLog::new(node.raft.clone(), &node.committed);
    let leadership = log.leadership();
    (Engine::start(Core::from_state(state, Limits::default()), last_seq, log, options), leadership)
}

/// Three nodes on loopback (not yet a cluster), their directories (the first is the
/// engine's snapshots') and the membership they would form.
async fn three_nodes() -> (Vec<tempfile::TempDir>, Vec<Option<LocalNode>>, BTreeMap<u64, openraft::BasicNode>) {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (bound, members) = listeners(3).await.unwrap();
    let mut nodes = Vec::new();
    for (id, listener) in (1..=3u64).zip(bound) {
        let secret = secret();
        let node = LocalNode::start(id, dirs[id as usize].path(), listener, &secret, quick_timeouts()).await;
        nodes.push(Some(node.unwrap()));
    }
    (dirs, nodes, members)
}

fn version_on(node: &LocalNode) -> u64 {
    node.committed.with_state(|_, state| state.agent("writer").map_or(0, |record| record.version()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_wait_for_a_quorum_and_every_node_folds_the_same_state() {
    let (dirs, mut nodes, members) = three_nodes().await;
    nodes[0].as_ref().unwrap().raft.initialize(members).await.unwrap();
    let live: Vec<&LocalNode> = nodes.iter().flatten().collect();
    let leader = agreed_leader(&live, Duration::from_secs(20)).await.expect("a leader");
    let index = leader as usize - 1;
    let (engine, leadership) = engine_on(nodes[index].as_ref().unwrap(), dirs[0].path());
    assert!(leadership.lead(nodes[index].as_ref().unwrap().committed.state().0), "the elected node leads");

    let role = RoleName::new("writer").unwrap();
    let hello = Hello { agent: writer(), role, labels: BTreeMap::new(), incarnation: None };
    assert!(matches!(engine.execute(hello).await.unwrap(), Response::Welcome(_)));
    for n in 1..=20 {
        match engine.execute(checkpoint(n)).await.unwrap() {
            Response::Answer(Answer::Checkpointed { version }) => assert_eq!(version, n),
            other => panic!("{other:?}"),
        }
    }
    // Answered means committed by a quorum: the leader has applied the entry, and at least
    // two nodes' logs hold it (a follower applies it once it hears of the commit).
    let leader_node = nodes[index].as_ref().unwrap();
    assert_eq!(version_on(leader_node), 20);
    let entry = leader_node.raft.metrics().borrow().last_applied.expect("applied").index;
    let holding =
        nodes.iter().flatten().filter(|node| node.raft.metrics().borrow().last_log_index >= Some(entry)).count();
    assert!(holding >= 2, "only {holding} nodes' logs held entry {entry} when it was answered");
    for node in nodes.iter().flatten() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while version_on(node) != 20 {
            assert!(tokio::time::Instant::now() < deadline, "node {} did not fold version 20", node.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let reference = nodes[index].as_ref().unwrap().committed.state();
    for node in nodes.iter().flatten() {
        assert_eq!(node.committed.state(), reference, "node {} folded something else", node.id);
    }

    // One follower down: a quorum is left, writes go on.
    let followers: Vec<usize> = (0..3).filter(|i| *i != index).collect();
    nodes[followers[0]].take().unwrap().stop().await;
    for n in 21..=25 {
        engine.execute(checkpoint(n)).await.unwrap();
    }

    // Both down: nothing is acknowledged...
    let second = nodes[followers[1]].take().unwrap();
    let second_dir = dirs[followers[1] + 1].path().to_path_buf();
    let (second_id, second_addr) = (second.id, second.addr.clone());
    second.stop().await;
    let pending = tokio::spawn({
        let engine = engine.clone();
        async move { engine.execute(checkpoint(26)).await }
    });
    // A read is not answered from the leader's own state either: it cannot confirm it
    // still leads (a partitioned leader would answer stale data).
    let read = tokio::spawn({
        let engine = engine.clone();
        async move { engine.read(|state| state.agent("writer").map_or(0, |record| record.version())).await }
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!pending.is_finished(), "a checkpoint was acknowledged without a quorum");
    let read = if read.is_finished() {
        let refused = read.await.unwrap();
        assert!(
            matches!(refused, Err(EngineError::Log(WriteError::NotLeader { .. }))),
            "a read without a quorum: {refused:?}"
        );
        None
    } else {
        Some(read)
    };
    // ...until one comes back, and then it is.
    let listener = tokio::net::TcpListener::bind(&second_addr).await.unwrap();
    let secret = secret();
    let back = LocalNode::start(second_id, &second_dir, listener, &secret, quick_timeouts()).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), pending).await.expect("answered once a quorum is back");
    match answer.unwrap().unwrap() {
        Response::Answer(Answer::Checkpointed { version }) => assert_eq!(version, 26),
        other => panic!("{other:?}"),
    }
    if let Some(read) = read {
        let version = tokio::time::timeout(Duration::from_secs(20), read).await.expect("read once a quorum is back");
        assert!(version.unwrap().unwrap() >= 25);
    }
    nodes[followers[1]] = Some(back);
    for node in nodes.into_iter().flatten() {
        node.stop().await;
    }
}

/// Starts an engine on every node, each handed leadership whenever its node is elected.
fn engines_following(nodes: &[Option<LocalNode>], dirs: &[tempfile::TempDir]) -> Vec<Engine> {
    nodes
        .iter()
        .flatten()
        .map(|node| {
            let (engine, leadership) = engine_on(node, dirs[node.id as usize].path());
            let rebuilt = engine.clone();
            tokio::spawn(follow_leadership(
                node.raft.clone(),
                node.committed.clone(),
                leadership,
                move |seq, state| {
                    let engine = rebuilt.clone();
                    async move {
                        engine.rebuild(Core::from_state(state, Limits::default()), seq).await.unwrap();
                    }
                },
            ));
            engine
        })
        .collect()
}

/// The engine that takes writes, once one does, with its node's id.
async fn leading_engine(engines: &[Engine], ids: &[u64]) -> (u64, Engine) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        for (engine, id) in engines.iter().zip(ids) {
            match engine.execute(checkpoint(0)).await {
                // Taken (the agent may not exist yet: then the core refused it, which only
                // a leader's engine decides).
                Ok(_) | Err(hale_server::engine::EngineError::Rejected(_)) => return (*id, engine.clone()),
                Err(_) => {}
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no engine took writes within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_continues_from_the_committed_state_and_a_deposed_one_says_not_leader() {
    let (dirs, nodes, members) = three_nodes().await;
    let engines = engines_following(&nodes, &dirs);
    nodes[0].as_ref().unwrap().raft.initialize(members.clone()).await.unwrap();
    let (first, engine) = leading_engine(&engines, &[1, 2, 3]).await;
    let role = RoleName::new("writer").unwrap();
    let hello = Hello { agent: writer(), role, labels: BTreeMap::new(), incarnation: None };
    engine.execute(hello).await.unwrap();
    for n in 1..=10 {
        engine.execute(checkpoint(n)).await.unwrap();
    }
    // The others refuse writes, naming the leader.
    for (index, other) in engines.iter().enumerate().filter(|(index, _)| *index as u64 + 1 != first) {
        let error = other.execute(checkpoint(99)).await.unwrap_err();
        let text = error.to_string();
        assert!(text.contains("not the leader"), "node {}: {text}", index + 1);
    }

    // A follower forces an election: the leader is deposed while it runs.
    let follower = (1..=3u64).find(|id| *id != first).unwrap();
    nodes[follower as usize - 1].as_ref().unwrap().raft.trigger().elect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match engines[first as usize - 1].execute(checkpoint(11)).await {
            Err(error) if error.to_string().contains("not the leader") => break error,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "the old leader kept taking writes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = refused.to_string();
    assert!(text.contains("not the leader"), "{text}");

    // The new leader's engine continues from what was committed: no version is lost or
    // repeated, whatever the deposed one had in flight.
    let (second, engine) = leading_engine(&engines, &[1, 2, 3]).await;
    let committed = nodes[second as usize - 1].as_ref().unwrap().committed.state().1;
    let before = committed.agent("writer").unwrap().version();
    assert!(before >= 10, "committed version {before}");
    match engine.execute(checkpoint(12)).await.unwrap() {
        Response::Answer(Answer::Checkpointed { version }) => assert_eq!(version, before + 1),
        other => panic!("{other:?}"),
    }
    for node in nodes.into_iter().flatten() {
        node.stop().await;
    }
}
