//! The state machine: committed entries folded as the core folds the same events, and
//! snapshots that carry that state to another node and across a restart.

use crate::support::{blank, data_dir, log_id, membership, normal};
use hale_cluster::{Applied, StateMachine, StateMachineOptions};
use hale_core::{AgentName, Core, Event, Limits, RoleName, Timestamp};
use hale_store::{DataDir, Key, Keyring, Record};
use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// An agent's hello and two checkpoints, another agent's hello: the events in log order.
fn events() -> Vec<Event> {
    let a = AgentName::new("alpha").unwrap();
    let b = AgentName::new("beta").unwrap();
    let role = RoleName::new("worker").unwrap();
    vec![
        Event::AgentRegistered { agent: a.clone(), role: role.clone(), labels: BTreeMap::new() },
        Event::IncarnationStarted { agent: a.clone(), incarnation: 1 },
        Event::Checkpointed { agent: a.clone(), incarnation: 1, version: 1, patch: json!({"x": 1}) },
        Event::Checkpointed { agent: a.clone(), incarnation: 1, version: 2, patch: json!({"y": 2}) },
        Event::AgentRegistered { agent: b.clone(), role, labels: BTreeMap::from([("zone".into(), "b".into())]) },
        Event::IncarnationStarted { agent: b, incarnation: 1 },
    ]
}

fn records(key: Option<&Key>) -> Vec<Record> {
    events()
        .iter()
        .enumerate()
        .map(|(i, event)| Record::encode_with(i as u64 + 1, Timestamp(10_000 + i as u64), event, key))
        .collect()
}

/// The state the core reaches folding the events directly.
fn folded() -> hale_core::State {
    let mut core = Core::new(Limits::default());
    for (i, event) in events().into_iter().enumerate() {
        core.apply_owned(Timestamp(10_000 + i as u64), event);
    }
    core.into_state()
}

fn options(keys: Option<Arc<Keyring>>) -> StateMachineOptions {
    StateMachineOptions { keys, ..StateMachineOptions::default() }
}

/// Applies the events as four entries: a membership, three records, a blank, three records.
async fn apply_all(machine: &mut StateMachine, records: &[Record]) -> Vec<Applied> {
    let entries =
        vec![membership(1, 1, &[1, 2, 3]), normal(1, 2, &records[..3]), blank(2, 3), normal(2, 4, &records[3..])];
    machine.apply(entries).await.unwrap()
}

#[tokio::test]
async fn committed_entries_fold_to_the_state_of_the_same_events_and_a_snapshot_carries_it() {
    let (_leader_temporary, leader_dir) = data_dir();
    let copies = StateMachineOptions { snapshots_kept: 2, ..StateMachineOptions::default() };
    let mut leader = StateMachine::open(&leader_dir, copies.clone()).unwrap();
    let applied = leader.applied();
    let answers = apply_all(&mut leader, &records(None)).await;
    let seqs: Vec<u64> = answers.iter().map(|answer| answer.last_seq).collect();
    assert_eq!(seqs, [0, 3, 3, 6]);
    assert_eq!(*applied.borrow(), 6);

    let (last_seq, state) = leader.state();
    assert_eq!(last_seq, 6);
    assert_eq!(state, folded());
    let alpha = state.agent("alpha").expect("alpha was registered");
    assert_eq!((alpha.version(), &**alpha.state()), (2, &json!({"x": 1, "y": 2})));
    let (last_applied, members) = leader.applied_state().await.unwrap();
    assert_eq!(last_applied, Some(log_id(2, 4)));
    assert_eq!(members.log_id(), &Some(log_id(1, 1)));

    let snapshot = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(2, 4)));

    // Another node, empty, receives it.
    let (_follower_temporary, follower_dir) = data_dir();
    let mut follower = StateMachine::open(&follower_dir, options(None)).unwrap();
    let follower_applied = follower.view().applied();
    let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
    *receiving = *snapshot.snapshot.clone();
    follower.install_snapshot(&snapshot.meta, receiving).await.unwrap();
    assert_eq!(follower.state(), (6, folded()));
    assert_eq!(*follower_applied.borrow(), 6);
    assert_eq!(follower.applied_state().await.unwrap(), leader.applied_state().await.unwrap());
    let current = follower.get_current_snapshot().await.unwrap().expect("the installed snapshot is current");
    assert_eq!(current.meta, snapshot.meta);

    // The follower's next entry continues from the snapshot.
    let next = Record::encode(7, Timestamp(20_000), &Event::Released { agent: AgentName::new("alpha").unwrap() });
    assert_eq!(follower.apply([normal(2, 5, &[next])]).await.unwrap(), [Applied { last_seq: 7 }]);

    // Both restart from their persisted snapshots.
    let leader_path = leader_dir.path().to_path_buf();
    drop((leader, leader_dir));
    let leader_dir = DataDir::open(&leader_path).unwrap();
    let mut leader = StateMachine::open(&leader_dir, copies).unwrap();
    assert_eq!(leader.state(), (6, folded()));
    assert_eq!(*leader.applied().borrow(), 6);
    assert_eq!(leader.applied_state().await.unwrap().0, Some(log_id(2, 4)));
    assert_eq!(leader.get_current_snapshot().await.unwrap().expect("a current snapshot").meta, snapshot.meta);

    // Asked for, a copy as a hale snapshot file (the follower, with the default, has none).
    let files = hale_store::snapshot::list(&leader_dir.snapshot_dir()).unwrap();
    assert_eq!(files.iter().map(|file| file.seq).collect::<Vec<_>>(), [6]);
    let hale_snapshot = hale_store::snapshot::read(&files[0]).unwrap();
    assert_eq!(hale_snapshot.state, folded());
    assert_eq!(hale_store::snapshot::list(&follower_dir.snapshot_dir()).unwrap(), []);
}

#[tokio::test]
async fn sealed_records_and_snapshots_need_the_keyring() {
    let key = Key::new("k1", &[7; 32]).unwrap();
    let keys = Arc::new(Keyring::new(key.clone(), []).unwrap());
    let (_temporary, dir) = data_dir();
    let mut machine = StateMachine::open(&dir, options(Some(keys.clone()))).unwrap();
    apply_all(&mut machine, &records(Some(&key))).await;
    assert_eq!(machine.state(), (6, folded()));
    let snapshot = machine.get_snapshot_builder().await.build_snapshot().await.unwrap();

    let (_other_temporary, other_dir) = data_dir();
    let mut without_keys = StateMachine::open(&other_dir, options(None)).unwrap();
    let message =
        without_keys.install_snapshot(&snapshot.meta, snapshot.snapshot.clone()).await.unwrap_err().to_string();
    assert!(message.contains("encrypted with key 'k1'"), "{message}");
    let message = without_keys.apply([normal(1, 1, &records(Some(&key))[..1])]).await.unwrap_err().to_string();
    assert!(message.contains("hale record 1 in raft log entry 1 cannot be applied"), "{message}");

    let mut with_keys = StateMachine::open(&other_dir, options(Some(keys))).unwrap();
    with_keys.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
    assert_eq!(with_keys.state(), (6, folded()));
}

#[tokio::test]
async fn a_damaged_or_out_of_sequence_record_stops_the_fold() {
    let (_temporary, dir) = data_dir();
    let mut machine = StateMachine::open(&dir, options(None)).unwrap();
    let mut damaged = records(None);
    damaged[1].body[3] ^= 0x20;
    let message = machine.apply([normal(1, 1, &damaged[..3])]).await.unwrap_err().to_string();
    assert!(message.contains("hale record 2 in raft log entry 1 cannot be applied: checksum mismatch"), "{message}");
    assert_eq!(*machine.applied().borrow(), 1, "record 1 was folded before the damage");

    let (_temporary, dir) = data_dir();
    let mut machine = StateMachine::open(&dir, options(None)).unwrap();
    let records = records(None);
    let message = machine.apply([normal(1, 1, &records[1..2])]).await.unwrap_err().to_string();
    assert!(message.contains("hale record 2 in raft log entry 1 does not follow record 0"), "{message}");
    assert_eq!(machine.state(), (0, hale_core::State::default()));
}

#[tokio::test]
async fn a_damaged_raft_snapshot_file_is_refused_at_open() {
    let (_temporary, dir) = data_dir();
    {
        let mut machine = StateMachine::open(&dir, options(None)).unwrap();
        apply_all(&mut machine, &records(None)).await;
        machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
    }
    let path = dir.path().join("raft-snapshot.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let Err(error) = StateMachine::open(&dir, options(None)) else { panic!("a damaged snapshot was accepted") };
    let message = error.to_string();
    assert!(message.contains("raft-snapshot.bin: checksum mismatch"), "{message}");
}

#[tokio::test]
async fn a_restarted_node_starts_from_its_snapshot_and_openraft_reapplies_the_committed_rest() {
    let (_temporary, dir) = data_dir();
    let records = records(None);
    let entries = vec![
        membership(0, 0, &[1]),
        normal(1, 1, &records[..2]),
        normal(1, 2, &records[2..4]),
        normal(1, 3, &records[4..5]),
        normal(1, 4, &records[5..]),
    ];
    {
        let mut log = hale_cluster::LogStore::open(&dir).unwrap();
        let mut machine = StateMachine::open(&dir, options(None)).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        machine.apply(entries[..3].to_vec()).await.unwrap();
        machine.get_snapshot_builder().await.build_snapshot().await.unwrap();
        machine.apply(entries[3..].to_vec()).await.unwrap();
        // Entry 4 is not known committed: a restart must not apply it.
        log.save_committed(Some(log_id(1, 3))).await.unwrap();
    }
    let path = dir.path().to_path_buf();
    drop(dir);

    let dir = DataDir::open(&path).unwrap();
    let mut log = hale_cluster::LogStore::open(&dir).unwrap();
    let mut machine = StateMachine::open(&dir, options(None)).unwrap();
    assert_eq!(machine.state().0, 4, "the state machine starts from its snapshot");
    let initial = openraft::StorageHelper::new(&mut log, &mut machine).get_initial_state().await.unwrap();
    assert_eq!(initial.committed, Some(log_id(1, 3)));
    let mut expected = Core::new(Limits::default());
    for (i, event) in events().into_iter().take(5).enumerate() {
        expected.apply_owned(Timestamp(10_000 + i as u64), event);
    }
    assert_eq!(machine.state(), (5, expected.into_state()));
    assert_eq!(machine.applied_state().await.unwrap().0, Some(log_id(1, 3)));
}
