//! hale-store against a real SQLite database and real snapshot files in a temporary
//! directory: group commit, recovery, damaged snapshots and records, repair, verify.

use hale_core::{AgentCommand, AgentName, Command, Core, Event, Hello, Limits, RoleName, State, Timestamp};
use hale_store::{
    DataDir, DurableLog, Record, RecoveryOptions, StoreError, Writer, WriterOptions, recover, snapshot, verify,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

const T: Timestamp = Timestamp(1_700_000_000_000);

/// Runs `commands` through a fresh core and returns the events, numbered from 1.
fn workload(checkpoints: u64) -> (State, Vec<Record>) {
    let mut core = Core::new(Limits::default());
    let mut records = Vec::new();
    let mut push = |core: &mut Core, command: Command| {
        for event in core.execute(&command, T).unwrap().events {
            records.push(Record::encode(records.len() as u64 + 1, T, &event));
        }
    };
    for name in ["a", "b"] {
        let hello = Hello {
            agent: AgentName::new(name).unwrap(),
            role: RoleName::new("worker").unwrap(),
            labels: BTreeMap::new(),
            incarnation: None,
        };
        push(&mut core, Command::Agent(AgentCommand::Hello(hello)));
    }
    for n in 0..checkpoints {
        let agent = AgentName::new(if n % 2 == 0 { "a" } else { "b" }).unwrap();
        let patch = json!({"n": n, "k": {format!("key{}", n % 7): n}});
        push(
            &mut core,
            Command::Agent(AgentCommand::Checkpoint { agent, incarnation: 1, patch, expected_version: None }),
        );
    }
    (core.into_state(), records)
}

fn write_log(dir: &DataDir, records: &[Record]) {
    let mut log = hale_store::Log::open(&dir.log_path()).unwrap();
    log.append(records).unwrap();
}

fn options() -> RecoveryOptions {
    RecoveryOptions { limits: Limits::default(), repair: false, now: T, keys: None }
}

/// Snapshot of the fold of `records[..seq]`.
fn snapshot_at(dir: &DataDir, records: &[Record], seq: u64) {
    let mut core = Core::new(Limits::default());
    for record in &records[..seq as usize] {
        core.apply(record.at, &record.decode().unwrap());
    }
    snapshot::write(&dir.snapshot_dir(), seq, &snapshot::encode(seq, T, core.state())).unwrap();
}

fn flip_byte_in_file(path: &Path, offset_from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let index = bytes.len() - offset_from_end;
    bytes[index] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_makes_every_append_durable_in_order() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (_, records) = workload(2_000);
    let log = hale_store::Log::open(&dir.log_path()).unwrap();
    let committed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = committed.clone();
    let on_commit = hale_store::CommitHook(std::sync::Arc::new(move |records, _| {
        counter.fetch_add(records, std::sync::atomic::Ordering::Relaxed);
    }));
    let writer = Writer::start(log, 0, WriterOptions { on_commit: Some(on_commit), ..WriterOptions::default() });
    let mut durability = writer.durability();
    let mut seen = Vec::new();
    for record in records.iter().cloned() {
        writer.append(vec![record]).await.unwrap();
    }
    // Durability only moves forward, one group commit at a time, and reaches the end.
    let last = records.len() as u64;
    loop {
        let now = durability.borrow_and_update().clone();
        assert_eq!(now.failed, None);
        seen.push(now.durable_seq);
        if now.durable_seq == last {
            break;
        }
        durability.changed().await.unwrap();
    }
    assert!(seen.windows(2).all(|pair| pair[0] < pair[1]), "durable positions go up: {seen:?}");
    assert_eq!(committed.load(std::sync::atomic::Ordering::Relaxed), records.len(), "each record committed once");
    writer.shutdown();

    let recovered = recover(&dir, &options()).unwrap();
    assert_eq!(recovered.last_seq, records.len() as u64);
    assert_eq!(recovered.report.replayed, records.len() as u64);
}

#[test]
fn recovery_from_snapshot_plus_tail_equals_the_live_state() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (live, records) = workload(500);
    write_log(&dir, &records);

    let cold = recover(&dir, &options()).unwrap();
    assert_eq!(cold.report.snapshot_seq, None);
    assert_eq!(cold.core.state(), &live);

    snapshot_at(&dir, &records, 300);
    let warm = recover(&dir, &options()).unwrap();
    assert_eq!(warm.report.snapshot_seq, Some(300));
    assert_eq!(warm.report.replayed, records.len() as u64 - 300);
    assert_eq!(warm.core.state(), &live);
}

#[test]
fn a_damaged_snapshot_is_skipped_for_an_older_one() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (live, records) = workload(500);
    write_log(&dir, &records);
    snapshot_at(&dir, &records, 200);
    snapshot_at(&dir, &records, 400);
    let newest = &snapshot::list(&dir.snapshot_dir()).unwrap()[0];
    assert_eq!(newest.seq, 400);
    flip_byte_in_file(&newest.path, 10);

    let recovered = recover(&dir, &options()).unwrap();
    assert_eq!(recovered.report.snapshot_seq, Some(200));
    assert_eq!(recovered.report.skipped_snapshots.len(), 1);
    assert!(recovered.report.skipped_snapshots[0].reason.contains("checksum"), "{:?}", recovered.report);
    assert_eq!(recovered.core.state(), &live);

    let report = verify(temp.path(), &Limits::default(), |_, _| {}).unwrap();
    assert!(!report.is_clean());
    let problems: Vec<_> = report.snapshots.iter().map(|s| (s.seq, s.problem.is_some())).collect();
    assert_eq!(problems, [(200, false), (400, true)]);
}

#[test]
fn a_snapshot_ahead_of_the_log_is_never_used() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (_, records) = workload(100);
    write_log(&dir, &records[..50]);
    snapshot_at(&dir, &records, 80);
    let recovered = recover(&dir, &options()).unwrap();
    assert_eq!(recovered.report.snapshot_seq, None);
    assert_eq!(recovered.last_seq, 50);
}

#[test]
fn a_damaged_record_stops_recovery_and_repair_sets_it_aside() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (_, mut records) = workload(100);
    let last = records.len() - 1;
    records[40].body[5] ^= 0x01; // damaged on the way to disk: the writer must refuse it
    let mut log = hale_store::Log::open(&dir.log_path()).unwrap();
    let refused = log.append(&records).unwrap_err();
    assert!(matches!(refused, StoreError::CorruptRecord { seq: 41, .. }), "{refused}");
    records[40].body[5] ^= 0x01;
    log.append(&records).unwrap();
    drop(log);

    // Damage record 41 in place, below SQLite, as a failing disk would.
    let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
    conn.execute(
        "UPDATE events SET body = CAST(replace(CAST(body AS TEXT), '\"n\"', '\"m\"') AS BLOB) WHERE seq = 41",
        [],
    )
    .unwrap();
    drop(conn);

    let refused = recover(&dir, &options()).err().expect("recovery must refuse a damaged log");
    assert!(matches!(refused, StoreError::CorruptRecord { seq: 41, .. }), "{refused}");
    assert!(refused.to_string().contains("log record 41"), "{refused}");

    let report = verify(temp.path(), &Limits::default(), |_, _| {}).unwrap();
    assert_eq!(report.bad_seqs(), [41]);

    let repaired = recover(&dir, &RecoveryOptions { repair: true, ..options() }).unwrap();
    assert_eq!(repaired.report.set_aside.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [41]);
    assert_eq!(repaired.last_seq, last as u64 + 1);
    drop(repaired);

    // The record is kept, and later starts accept the gap it leaves.
    let again = recover(&dir, &options()).unwrap();
    assert_eq!(again.report.previously_set_aside, [41]);
    let report = verify(temp.path(), &Limits::default(), |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.set_aside, [41]);
    let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
    let kept: Vec<u8> = conn.query_row("SELECT body FROM damaged_events WHERE seq = 41", [], |row| row.get(0)).unwrap();
    assert!(!kept.is_empty());
}

#[test]
fn a_missing_record_is_named() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (_, records) = workload(20);
    write_log(&dir, &records);
    rusqlite::Connection::open(dir.log_path()).unwrap().execute("DELETE FROM events WHERE seq = 7", []).unwrap();
    let refused = recover(&dir, &options()).err().unwrap();
    assert!(matches!(refused, StoreError::MissingRecord { seq: 7, .. }), "{refused}");
    assert_eq!(verify(temp.path(), &Limits::default(), |_, _| {}).unwrap().missing, [7]);
}

#[test]
fn events_decode_as_written() {
    let (_, records) = workload(3);
    let kinds: Vec<&str> = records.iter().map(|r| r.decode().unwrap()).map(|e: Event| e.kind()).collect();
    assert_eq!(kinds[..3], ["agent_registered", "incarnation_started", "agent_registered"]);
}

#[test]
fn a_record_from_a_newer_hale_is_refused_even_with_repair() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (_, mut records) = workload(3);
    let last = records.len() - 1;
    let old = records[last].clone();
    records[last] = Record::new(old.seq, old.at, hale_store::FORMAT + 1, old.body);
    write_log(&dir, &records);
    for repair in [false, true] {
        let refused = recover(&dir, &RecoveryOptions { repair, ..options() }).err().expect("must refuse");
        assert!(matches!(refused, StoreError::NewerFormat { .. }), "{refused}");
        assert!(refused.to_string().contains("upgrade hale"), "{refused}");
    }
}

#[test]
fn a_reader_skips_to_the_first_record_logged_at_or_after_a_time() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (_, records) = workload(8);
    // Times 100, 110, 120, …, except record 6, logged after a clock step back (to 105).
    let timed: Vec<Record> = records
        .iter()
        .map(|record| {
            let at = if record.seq == 6 { 105 } else { 90 + 10 * record.seq };
            Record::encode(record.seq, Timestamp(at), &record.decode().unwrap())
        })
        .collect();
    write_log(&dir, &timed);
    let log = hale_store::Log::open_read_only(&dir.log_path()).unwrap();
    let last = timed.len() as u64;
    assert_eq!(log.seq_before_time(0, 0).unwrap(), 0, "everything is at or after 0");
    assert_eq!(log.seq_before_time(0, 120).unwrap(), 2, "record 3 is the first at 120");
    assert_eq!(log.seq_before_time(0, 125).unwrap(), 3, "the first at or after: not fooled by the step back");
    assert_eq!(log.seq_before_time(5, 105).unwrap(), 5, "record 6, at 105, is the first after 5");
    assert_eq!(log.seq_before_time(0, 10_000).unwrap(), last, "nothing that late: past the end");
    assert_eq!(log.seq_before_time(last + 3, 0).unwrap(), last + 3, "never before `after`");
}

mod encryption;
