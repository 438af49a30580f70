//! The Raft log in SQLite: what was written is there after a reopen, and damage is found.

use crate::support::{blank, data_dir, log_id, membership, normal};
use hale_cluster::LogStore;
use hale_core::{AgentName, Event, Timestamp};
use hale_store::{DataDir, Record};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{RaftLogReader, Vote};

fn started(seq: u64, agent: &str) -> Record {
    let event = Event::IncarnationStarted { agent: AgentName::new(agent).unwrap(), incarnation: seq };
    Record::encode(seq, Timestamp(1_000 + seq), &event)
}

#[tokio::test]
async fn entries_vote_and_committed_survive_a_reopen() {
    let (temporary, dir) = data_dir();
    let entries = vec![
        blank(1, 1),
        membership(1, 2, &[1, 2, 3]),
        normal(1, 3, &[started(1, "a"), started(2, "b")]),
        normal(2, 4, &[started(3, "a")]),
        blank(2, 5),
        normal(2, 6, &[started(4, "c")]),
    ];
    let vote = Vote::new_committed(2, 3);
    {
        let mut log = LogStore::open(&dir).unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_vote(&vote).await.unwrap();
        log.save_committed(Some(log_id(2, 4))).await.unwrap();
        log.purge(log_id(1, 2)).await.unwrap();
        log.truncate(log_id(2, 6)).await.unwrap();
    }
    let path = dir.path().to_path_buf();
    drop(dir);

    let dir = DataDir::open(&path).unwrap();
    let mut log = LogStore::open(&dir).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 4)));
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[2..5].to_vec());
    let mut reader = log.get_log_reader().await;
    assert_eq!(reader.try_get_log_entries(3..=4).await.unwrap(), entries[2..4].to_vec());
    // The records inside came back as they were written, checksums and all.
    let read = log.try_get_log_entries(3..4).await.unwrap();
    let openraft::EntryPayload::Normal(batch) = &read[0].payload else { panic!("entry 3 is not normal: {read:?}") };
    assert_eq!(batch.records[1].to_record(), started(2, "b"));
    drop(temporary);
}

#[tokio::test]
async fn a_flipped_byte_in_a_stored_entry_fails_the_read_naming_the_entry() {
    let (_temporary, dir) = data_dir();
    {
        let mut log = LogStore::open(&dir).unwrap();
        let entries =
            vec![normal(1, 1, &[started(1, "a")]), normal(1, 2, &[started(2, "b")]), normal(1, 3, &[started(3, "c")])];
        log.blocking_append(entries).await.unwrap();
    }
    {
        let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
        let mut payload: Vec<u8> =
            conn.query_row("SELECT payload FROM raft_log WHERE log_index = 2", [], |row| row.get(0)).unwrap();
        let middle = payload.len() / 2;
        payload[middle] ^= 0x01;
        let changed = conn.execute("UPDATE raft_log SET payload = ?1 WHERE log_index = 2", [&payload]).unwrap();
        assert_eq!(changed, 1);
    }

    let mut log = LogStore::open(&dir).unwrap();
    assert_eq!(log.try_get_log_entries(1..2).await.unwrap().len(), 1, "entry 1 is intact");
    assert_eq!(log.try_get_log_entries(3..4).await.unwrap().len(), 1, "entry 3 is intact");
    for error in [
        log.try_get_log_entries(2..3).await.unwrap_err(),
        log.try_get_log_entries(..).await.unwrap_err(),
        log.get_log_reader().await.try_get_log_entries(1..=3).await.unwrap_err(),
    ] {
        let message = error.to_string();
        assert!(message.contains("raft log entry 2 is damaged: checksum mismatch"), "{message}");
        assert!(message.contains("LogIndex(2)"), "{message}");
    }
}

#[tokio::test]
async fn a_damaged_vote_is_an_error_not_a_missing_vote() {
    let (_temporary, dir) = data_dir();
    {
        let mut log = LogStore::open(&dir).unwrap();
        log.save_vote(&Vote::new(4, 2)).await.unwrap();
    }
    let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
    conn.execute(
        "UPDATE raft_meta SET value = CAST(replace(CAST(value AS TEXT), '4', '5') AS BLOB) WHERE key = 'vote'",
        [],
    )
    .unwrap();
    let mut log = LogStore::open(&dir).unwrap();
    let message = log.read_vote().await.unwrap_err().to_string();
    assert!(message.contains("raft metadata 'vote' is damaged"), "{message}");
}
