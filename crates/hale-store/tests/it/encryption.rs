//! Encryption at rest against real SQLite files and snapshot files: what is stored is
//! unreadable without the key, a missing or wrong key stops recovery with its name (never
//! taken for damage), rotation keeps older records readable, and older logs migrate.

use super::{T, flip_byte_in_file, options, workload, write_log};
use hale_core::{Core, Limits};
use hale_store::{DataDir, Key, Keyring, Record, RecoveryOptions, StoreError, recover, snapshot, verify, verify_with};
use std::sync::Arc;

fn key(id: &str, byte: u8) -> Key {
    Key::new(id, &[byte; 32]).unwrap()
}

fn ring(keys: &[(&str, u8)]) -> Arc<Keyring> {
    let mut keys = keys.iter().map(|(id, byte)| key(id, *byte));
    let current = keys.next().unwrap();
    Arc::new(Keyring::new(current, keys).unwrap())
}

fn with_keys(keys: &Arc<Keyring>) -> RecoveryOptions {
    RecoveryOptions { keys: Some(keys.clone()), ..options() }
}

/// `records` sealed with `key` (or plaintext for `None`).
fn sealed(records: &[Record], key: Option<&Key>) -> Vec<Record> {
    records.iter().map(|r| Record::encode_with(r.seq, r.at, &r.decode().unwrap(), key)).collect()
}

fn plain(records: &[Record], keys: &Keyring) -> Vec<Record> {
    records.iter().map(|r| Record::encode(r.seq, r.at, &r.open(Some(keys)).unwrap())).collect()
}

fn snapshot_sealed(dir: &DataDir, records: &[Record], seq: u64, keys: &Keyring, key: Option<&Key>) {
    let mut core = Core::new(Limits::default());
    for record in &records[..seq as usize] {
        core.apply(record.at, &record.open(Some(keys)).unwrap());
    }
    let encoded = snapshot::encode_with(seq, T, core.state(), key);
    snapshot::write(&dir.snapshot_dir(), seq, &encoded).unwrap();
}

/// Every byte of the database, its WAL and the snapshot files.
fn stored_bytes(dir: &DataDir) -> Vec<u8> {
    let mut all = Vec::new();
    for name in ["hale.db", "hale.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(name)) {
            all.extend(bytes);
        }
    }
    for file in snapshot::list(&dir.snapshot_dir()).unwrap() {
        all.extend(std::fs::read(file.path).unwrap());
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[test]
fn a_sealed_log_and_snapshot_recover_and_hide_their_payloads() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let keys = ring(&[("k1", 1)]);
    let (live, records) = workload(300);
    let records = sealed(&records, Some(keys.current()));
    write_log(&dir, &records);
    snapshot_sealed(&dir, &records, 200, &keys, Some(keys.current()));
    // The workload's patches hold keys "key0".."key6" and agent names "a", "b".
    let bytes = stored_bytes(&dir);
    for needle in [&b"key3"[..], b"checkpointed", b"worker", b"incarnation"] {
        assert!(!contains(&bytes, needle), "{:?} is readable in the stored bytes", String::from_utf8_lossy(needle));
    }
    let recovered = recover(&dir, &with_keys(&keys)).unwrap();
    assert_eq!(recovered.report.snapshot_seq, Some(200));
    assert_eq!(recovered.core.state(), &live);
    drop(recovered);

    let report = verify_with(temp.path(), &Limits::default(), Some(&keys), |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.encrypted, report.not_decrypted, report.key_ids.clone()), (304, 0, vec!["k1".into()]));
    assert!(report.snapshots.iter().all(|s| s.not_compared.is_none()), "{report:?}");
    // Without a key, verify still checks every checksum, and says what it could not compare.
    let report = verify(temp.path(), &Limits::default(), |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.not_decrypted, 304);
    assert!(report.snapshots.iter().all(|s| s.problem.is_none() && s.not_compared.is_some()), "{report:?}");
}

#[test]
fn a_missing_key_stops_recovery_naming_the_key_and_the_record() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let keys = ring(&[("k1", 1)]);
    let (_, records) = workload(20);
    // Plaintext first (written before encryption was turned on), then sealed.
    let mut mixed = records[..10].to_vec();
    mixed.extend(sealed(&records[10..], Some(keys.current())));
    write_log(&dir, &mixed);
    for missing in [None, Some(ring(&[("other", 1)]))] {
        let options = RecoveryOptions { keys: missing, ..options() };
        for repair in [false, true] {
            let refused = recover(&dir, &RecoveryOptions { repair, ..options.clone() }).err().expect("must refuse");
            assert!(
                matches!(&refused, StoreError::KeyNotConfigured { what, key_id } if what == "record 11" && key_id == "k1"),
                "{refused}"
            );
            let message = refused.to_string();
            assert!(message.contains("HALE_ENCRYPTION_KEY") && message.contains("encryption_key_file"), "{message}");
        }
    }
    // Nothing was set aside, and the right key reads all of it, plaintext included.
    let recovered = recover(&dir, &with_keys(&keys)).unwrap();
    assert!(recovered.report.set_aside.is_empty());
    assert_eq!(recovered.report.replayed, records.len() as u64);
}

#[test]
fn a_wrong_key_is_refused_before_replay_and_never_set_aside() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let keys = ring(&[("k1", 1)]);
    let (live, records) = workload(50);
    write_log(&dir, &sealed(&records, Some(keys.current())));
    let wrong = ring(&[("k1", 2)]);
    for repair in [false, true] {
        let refused = recover(&dir, &RecoveryOptions { repair, ..with_keys(&wrong) }).err().expect("must refuse");
        assert!(
            matches!(&refused, StoreError::WrongKey { what, key_id } if what == "record 1" && key_id == "k1"),
            "{refused}"
        );
        assert!(refused.to_string().contains("wrong key"), "{refused}");
    }
    let refused = verify_with(temp.path(), &Limits::default(), Some(&wrong), |_, _| {}).unwrap_err();
    assert!(matches!(refused, StoreError::WrongKey { .. }), "{refused}");
    let recovered = recover(&dir, &with_keys(&keys)).unwrap();
    assert!(recovered.report.set_aside.is_empty() && recovered.report.previously_set_aside.is_empty());
    assert_eq!(recovered.core.state(), &live);
}

#[test]
fn a_wrong_key_on_a_later_record_is_caught_in_replay_too() {
    // The key check at start reads the first record of each key; a record sealed with
    // another key under the same id (never written by hale) still stops replay.
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let keys = ring(&[("k1", 1)]);
    let (_, records) = workload(20);
    let mut mixed = sealed(&records[..15], Some(keys.current()));
    mixed.extend(sealed(&records[15..], Some(&key("k1", 9))));
    write_log(&dir, &mixed);
    let refused = recover(&dir, &RecoveryOptions { repair: true, ..with_keys(&keys) }).err().expect("must refuse");
    assert!(matches!(&refused, StoreError::WrongKey { what, .. } if what == "record 16"), "{refused}");
}

#[test]
fn a_sealed_snapshot_without_its_key_stops_recovery() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let keys = ring(&[("k1", 1)]);
    let (_, records) = workload(20);
    write_log(&dir, &records);
    snapshot_sealed(&dir, &records, 10, &keys, Some(keys.current()));
    let refused = recover(&dir, &options()).err().expect("must refuse");
    assert!(
        matches!(&refused, StoreError::KeyNotConfigured { what, key_id } if what.starts_with("snapshot 10") && key_id == "k1"),
        "{refused}"
    );
    let refused = recover(&dir, &with_keys(&ring(&[("k1", 3)]))).err().expect("must refuse");
    assert!(matches!(&refused, StoreError::WrongKey { .. }), "{refused}");
    assert_eq!(recover(&dir, &with_keys(&keys)).unwrap().report.snapshot_seq, Some(10));
}

#[test]
fn rotation_keeps_older_records_readable_and_records_which_key_sealed_what() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let old = ring(&[("k1", 1)]);
    let new = ring(&[("k2", 2), ("k1", 1)]);
    let (live, records) = workload(40);
    let mut rotated = sealed(&records[..20], Some(old.current()));
    rotated.extend(sealed(&records[20..], Some(new.current())));
    write_log(&dir, &rotated);
    snapshot_sealed(&dir, &rotated, 10, &new, Some(old.current()));
    snapshot_sealed(&dir, &rotated, 30, &new, Some(new.current()));
    let recovered = recover(&dir, &with_keys(&new)).unwrap();
    assert_eq!(recovered.core.state(), &live);
    assert_eq!(recovered.log.key_uses().unwrap(), [("k1".to_string(), 1), ("k2".to_string(), 21)]);
    drop(recovered);
    let refused = recover(&dir, &with_keys(&ring(&[("k2", 2)]))).err().expect("k1 is still needed");
    assert!(matches!(&refused, StoreError::KeyNotConfigured { key_id, .. } if key_id == "k1"), "{refused}");
    let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
    let ids: Vec<(i64, Option<String>)> = conn
        .prepare("SELECT seq, key_id FROM events WHERE seq IN (1, 20, 21, 44) ORDER BY seq")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let k = |id: &str| Some(id.to_string());
    assert_eq!(ids, [(1, k("k1")), (20, k("k1")), (21, k("k2")), (44, k("k2"))]);
}

#[test]
fn rekey_seals_everything_with_the_current_key_so_older_keys_can_be_retired() {
    let temp = tempfile::tempdir().unwrap();
    let old = ring(&[("k1", 1)]);
    let new = ring(&[("k2", 2), ("k1", 1)]);
    let (live, records) = workload(40);
    // Plaintext from before encryption was on, then k1, then k2 after a rotation.
    let mut log = sealed(&records[..10], None);
    log.extend(sealed(&records[10..25], Some(old.current())));
    log.extend(sealed(&records[25..], Some(new.current())));
    {
        let dir = DataDir::open(temp.path()).unwrap();
        write_log(&dir, &log);
        snapshot_sealed(&dir, &log, 20, &new, Some(old.current()));
        snapshot_sealed(&dir, &log, 30, &new, Some(new.current()));
        let mut seen = Vec::new();
        let report = hale_store::rekey(&dir, &new, |done, total| seen.push((done, total))).unwrap();
        assert_eq!((report.key_id.as_str(), report.records, report.resealed), ("k2", 44, 25), "{report:?}");
        assert_eq!((report.snapshots, report.retired.as_slice()), (1, ["k1".to_string()].as_slice()), "{report:?}");
        assert!(report.unreadable.is_empty() && report.unreadable_snapshots.is_empty(), "{report:?}");
        assert_eq!(seen.last(), Some(&(44, 44)));
        // Nothing of k1 or plaintext is left in the files.
        let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
        let other: i64 = conn
            .query_row("SELECT count(*) FROM events WHERE key_id IS NULL OR key_id != 'k2'", [], |row| row.get(0))
            .unwrap();
        assert_eq!(other, 0);
        assert!(!contains(&stored_bytes(&dir), br#""checkpointed""#), "no plaintext event left in the files");
        // Running it again finds nothing to do.
        let again = hale_store::rekey(&dir, &new, |_, _| {}).unwrap();
        assert_eq!((again.resealed, again.snapshots), (0, 0), "{again:?}");
    }
    // k2 alone now opens everything, to the same state.
    let dir = DataDir::open(temp.path()).unwrap();
    let recovered = recover(&dir, &with_keys(&ring(&[("k2", 2)]))).unwrap();
    assert_eq!(recovered.core.state(), &live);
    assert_eq!(recovered.log.key_uses().unwrap(), [("k2".to_string(), 1)]);
    drop(recovered);
    for file in snapshot::list(&dir.snapshot_dir()).unwrap() {
        let found = snapshot::read_with(&file, Some(&ring(&[("k2", 2)]))).unwrap();
        assert_eq!(found.key_id.as_deref(), Some("k2"), "snapshot {}", file.seq);
    }
    // Without the key it would need (k1 gone from the list before the rekey), it refuses
    // and changes nothing.
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    write_log(&dir, &sealed(&records, Some(old.current())));
    let refused = hale_store::rekey(&dir, &ring(&[("k2", 2)]), |_, _| {}).unwrap_err();
    assert!(matches!(&refused, StoreError::KeyNotConfigured { key_id, .. } if key_id == "k1"), "{refused}");
    assert_eq!(recover(&dir, &with_keys(&old)).unwrap().core.state(), &live);
}

#[test]
fn damage_to_a_sealed_record_is_damage_not_a_key_problem() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let keys = ring(&[("k1", 1)]);
    let (_, records) = workload(30);
    write_log(&dir, &sealed(&records, Some(keys.current())));
    let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
    // A flipped bit in the ciphertext, below SQLite.
    let body: Vec<u8> = conn.query_row("SELECT body FROM events WHERE seq = 12", [], |row| row.get(0)).unwrap();
    let mut damaged = body.clone();
    damaged[30] ^= 0x04;
    conn.execute("UPDATE events SET body = ?1 WHERE seq = 12", [damaged]).unwrap();
    drop(conn);
    let refused = recover(&dir, &with_keys(&keys)).err().expect("must refuse");
    assert!(matches!(refused, StoreError::CorruptRecord { seq: 12, .. }), "{refused}");
    let report = verify(temp.path(), &Limits::default(), |_, _| {}).unwrap();
    assert_eq!(report.bad_seqs(), [12], "found without the key");
    let repaired = recover(&dir, &RecoveryOptions { repair: true, ..with_keys(&keys) }).unwrap();
    assert_eq!(repaired.report.set_aside.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [12]);
    drop(repaired);
    // The record set aside keeps its key id.
    let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
    let kept: Option<String> =
        conn.query_row("SELECT key_id FROM damaged_events WHERE seq = 12", [], |row| row.get(0)).unwrap();
    assert_eq!(kept.as_deref(), Some("k1"));
}

#[test]
fn a_sealed_snapshot_that_is_damaged_is_skipped_like_any_other() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let keys = ring(&[("k1", 1)]);
    let (live, records) = workload(40);
    let records = sealed(&records, Some(keys.current()));
    write_log(&dir, &records);
    snapshot_sealed(&dir, &records, 10, &keys, Some(keys.current()));
    snapshot_sealed(&dir, &records, 30, &keys, Some(keys.current()));
    flip_byte_in_file(&snapshot::list(&dir.snapshot_dir()).unwrap()[0].path, 20);
    let recovered = recover(&dir, &with_keys(&keys)).unwrap();
    assert_eq!(recovered.report.snapshot_seq, Some(10));
    assert!(recovered.report.skipped_snapshots[0].reason.contains("checksum"), "{:?}", recovered.report);
    assert_eq!(recovered.core.state(), &live);
}

#[test]
fn a_log_of_an_older_hale_gains_the_key_id_column_and_reads_as_before() {
    let temp = tempfile::tempdir().unwrap();
    let dir = DataDir::open(temp.path()).unwrap();
    let (live, all) = workload(25);
    let (records, later) = all.split_at(20);
    // The schema before encryption at rest.
    let conn = rusqlite::Connection::open(dir.log_path()).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE events (seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, format INTEGER NOT NULL,
                              body BLOB NOT NULL, crc INTEGER NOT NULL) STRICT;
         CREATE TABLE damaged_events (seq INTEGER PRIMARY KEY, at_ms INTEGER, format INTEGER, body BLOB,
                              crc INTEGER, reason TEXT NOT NULL, set_aside_at_ms INTEGER NOT NULL) STRICT;",
    )
    .unwrap();
    for r in records {
        conn.execute(
            "INSERT INTO events (seq, at_ms, format, body, crc) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![r.seq as i64, r.at.0 as i64, r.format, r.body, r.crc],
        )
        .unwrap();
    }
    drop(conn);
    // verify opens it read-only, without migrating it.
    let report = verify(temp.path(), &Limits::default(), |_, _| {}).unwrap();
    assert!(report.is_clean() && report.records == records.len() as u64, "{report:?}");
    // Starting with a key: the old records still read, new ones are sealed.
    let keys = ring(&[("k1", 1)]);
    let mut recovered = recover(&dir, &with_keys(&keys)).unwrap();
    assert_eq!(recovered.last_seq, 20);
    let next = sealed(later, Some(keys.current()));
    recovered.log.append(&next).unwrap();
    drop(recovered);
    let recovered = recover(&dir, &with_keys(&keys)).unwrap();
    assert_eq!(recovered.core.state(), &live);
    drop(recovered);
    let report = verify_with(temp.path(), &Limits::default(), Some(&keys), |_, _| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.records, report.encrypted), (all.len() as u64, later.len() as u64));
    // Opened, the sealed records give back the very events they were made from.
    assert_eq!(plain(&next, &keys), later);
}
