//! Backups: `hale backup` while agents checkpoint flat out gives a log that is a prefix of
//! the live one and restores to a consistent moment; `hale restore` refuses a data
//! directory in use and checks a backup before installing it; `[backup]` in hale.toml
//! takes backups on a schedule and keeps the newest N.

use crate::support::{self, ADMIN};
use hale_client::{Agent, AgentOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const AGENTS: usize = 6;

/// The padding of checkpoint `n`: about 4 KiB, so the log grows past several backup steps.
fn pad(n: u64) -> String {
    format!("{n:08}{}", "x".repeat(4096))
}

/// The state after checkpoints 1..=version of the load below.
fn expected_state(version: u64) -> serde_json::Value {
    let mut state = serde_json::Map::new();
    for n in 1..=version {
        state.insert(format!("c{n}"), json!(n));
    }
    if version > 0 {
        state.insert("pad".into(), json!(pad(version)));
    }
    serde_json::Value::Object(state)
}

/// Every record of a log database: (seq, crc, body), in order.
fn records(db: &Path) -> Vec<(i64, i64, Vec<u8>)> {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut select = conn.prepare("SELECT seq, crc, body FROM events ORDER BY seq").unwrap();
    select.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?))).unwrap().map(Result::unwrap).collect()
}

fn size_of_log(data: &Path) -> u64 {
    ["hale.db", "hale.db-wal"].iter().filter_map(|name| std::fs::metadata(data.join(name)).ok()).map(|m| m.len()).sum()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn a_backup_under_write_load_restores_to_one_consistent_moment() {
    let temp = tempfile::tempdir().unwrap();
    let live = temp.path().join("live");
    let hale = support::serve(&live, &[]);
    let running = Arc::new(AtomicBool::new(true));
    // Per agent: the last version acknowledged, and the last checkpoint sent.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..AGENTS).map(|_| AtomicU64::new(0)).collect());
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..AGENTS).map(|_| AtomicU64::new(0)).collect());
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..AGENTS {
        let agent = Agent::connect(&hale.ws_url(), AgentOptions::new(format!("loaded-{index}"), "r").token(ADMIN))
            .await
            .unwrap();
        agent.resume().await.unwrap();
        let (running, acked, sent) = (running.clone(), acked.clone(), sent.clone());
        workers.spawn(async move {
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) {
                n += 1;
                sent[index].store(n, Ordering::SeqCst);
                let version = agent.checkpoint(json!({ format!("c{n}"): n, "pad": pad(n) })).await.unwrap();
                assert_eq!(version, n, "loaded-{index}: checkpoint {n} made version {version}");
                acked[index].store(n, Ordering::SeqCst);
            }
        });
    }
    // Enough log that the backup takes several steps of 256 pages while the load goes on.
    support::eventually("the log grows past 8 MiB", 60, || async { (size_of_log(&live) > 8 << 20).then_some(()) })
        .await;

    let backup = temp.path().join("backups/live.db");
    std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
    let acked_before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let args = ["backup", path_str(&backup), "--server", &hale.http_url()].map(str::to_string);
    let (code, out, err) =
        tokio::task::spawn_blocking(move || support::hale(&args.each_ref().map(String::as_str))).await.unwrap();
    let sent_after: Vec<u64> = sent.iter().map(|s| s.load(Ordering::SeqCst)).collect();
    assert_eq!(code, 0, "hale backup failed:\n{out}\n{err}");
    assert!(out.contains("backup written"), "{out}");
    assert!(err.contains("backing up [") && err.contains("100%"), "no progress bar on stderr: {err}");
    assert!(std::fs::metadata(&backup).unwrap().len() > 4 * 256 * 4096, "the backup takes few steps");
    assert!(!backup.with_file_name("live.db-wal").exists(), "a backup is one file");
    // The load goes on after the backup: every agent has a checkpoint acknowledged that it
    // sent after the backup ended, so the live log holds more than the backup.
    support::eventually("a checkpoint of every agent acknowledged after the backup", 30, || async {
        sent_after.iter().zip(acked.iter()).all(|(sent, acked)| acked.load(Ordering::SeqCst) > *sent).then_some(())
    })
    .await;
    running.store(false, Ordering::Relaxed);
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    assert!(hale.terminate().success());

    // The backup is a prefix of the live log, record for record.
    let backed_up = records(&backup);
    let all = records(&live.join("hale.db"));
    assert!(!backed_up.is_empty() && backed_up.len() < all.len(), "{} of {}", backed_up.len(), all.len());
    assert_eq!(backed_up[..], all[..backed_up.len()], "the backup is not a prefix of the live log");
    assert_eq!(backed_up.last().unwrap().0 as usize, backed_up.len(), "sequence numbers 1..=n");

    let (code, out, err) = support::hale(&["verify", "--file", path_str(&backup)]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verdict: clean"), "{out}");

    let restored = temp.path().join("restored");
    let (code, out, err) = support::hale(&["restore", path_str(&backup), "--data", path_str(&restored)]);
    assert_eq!(code, 0, "hale restore failed:\n{out}\n{err}");
    assert!(out.contains(&format!("{} records", backed_up.len())), "{out}");

    let hale = support::serve(&restored, &[]);
    let admin = hale.admin();
    let mut committed_during = 0;
    for index in 0..AGENTS {
        let state = admin.state(&format!("loaded-{index}"), None).await.unwrap();
        let (low, high) = (acked_before[index], sent_after[index]);
        assert!(
            (low..=high).contains(&state.version),
            "loaded-{index}: restored version {} is not between {low} (acknowledged before the backup) and {high} (sent by its end)",
            state.version
        );
        assert_eq!(state.state, expected_state(state.version), "loaded-{index}: state at version {}", state.version);
        println!(
            "loaded-{index}: acknowledged {low} before the backup, sent {high} by its end, restored {}",
            state.version
        );
        // One checkpoint in flight per agent: sent two past the restored version means the
        // one after it was acknowledged while the backup ran.
        committed_during += u64::from(high > state.version + 1);
    }
    assert!(committed_during > 0, "no agent's write went through while the backup ran: was the writer blocked?");
    assert!(hale.terminate().success());
}

/// One agent with 40 checkpoints marked `MARK-nnnn`; a backup of it in `file`. Leaves
/// hale running.
async fn populate_and_back_up(data: &Path, file: &Path) -> (support::Hale, serde_json::Value) {
    let hale = support::serve(data, &[]);
    let agent = hale.connect(AgentOptions::new("kept", "r")).await;
    agent.resume().await.unwrap();
    for n in 1..=40 {
        agent.checkpoint(json!({ "marker": format!("MARK-{n:04}"), format!("k{}", n % 5): n })).await.unwrap();
    }
    let (code, out, err) = support::hale(&["backup", path_str(file), "--server", &hale.http_url()]);
    assert_eq!(code, 0, "{out}\n{err}");
    let state = hale.admin().state("kept", None).await.unwrap().state;
    (hale, state)
}

/// Every file under `dir` (relative), sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            found.push(path.strip_prefix(root).unwrap().to_path_buf());
            if path.is_dir() {
                walk(root, &path, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found);
    found.sort();
    found
}

#[tokio::test]
async fn restore_is_refused_on_a_live_data_directory_and_needs_force_on_a_used_one() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let file = temp.path().join("kept.db");
    let (hale, state) = populate_and_back_up(&data, &file).await;
    let before = listing(&data);
    let log_before = records(&data.join("hale.db"));

    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec!["restore", path_str(&file), "--data", path_str(&data)];
        args.extend_from_slice(extra);
        let (code, out, err) = support::hale(&args);
        assert_eq!(code, 1, "restore onto a live directory {extra:?} must fail:\n{out}\n{err}");
        assert!(err.contains("is in use by another hale process") && err.contains("pid "), "{err}");
    }
    assert_eq!(listing(&data), before, "a refused restore changed the directory");
    assert_eq!(records(&data.join("hale.db")), log_before);
    // hale still serves and writes.
    let agent = hale.connect(AgentOptions::new("kept", "r")).await;
    agent.resume().await.unwrap();
    agent.checkpoint(json!({"after": true})).await.unwrap();
    drop(agent);
    assert!(hale.terminate().success());

    // Stopped, but holding a log: only with --force, and the old log is kept aside.
    let (code, _, err) = support::hale(&["restore", path_str(&file), "--data", path_str(&data)]);
    assert_eq!(code, 1);
    assert!(err.contains("is not empty") && err.contains("--force"), "{err}");
    let (code, out, err) = support::hale(&["restore", path_str(&file), "--data", path_str(&data), "--force"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("moved to"), "{out}");
    let aside: Vec<PathBuf> = listing(&data).into_iter().filter(|p| p.ends_with("hale.db")).collect();
    assert_eq!(aside.len(), 2, "the old log is kept beside the new one: {aside:?}");

    let hale = support::serve(&data, &[]);
    assert_eq!(hale.admin().state("kept", None).await.unwrap().state, state, "the state at the backup");
    assert!(hale.terminate().success());
}

#[tokio::test]
async fn scheduled_backups_appear_and_only_the_newest_are_kept() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("auto");
    let config = temp.path().join("hale.toml");
    std::fs::write(&config, format!("[backup]\ndir = {:?}\nevery_s = 1\nkeep = 2\n", path_str(&dir))).unwrap();
    let data = temp.path().join("data");
    let hale = support::serve(&data, &["-c", path_str(&config)]);
    let agent = hale.connect(AgentOptions::new("ticking", "r")).await;
    agent.resume().await.unwrap();
    let written = |hale: &support::Hale| hale.stderr().matches("scheduled backup written").count();
    let mut n = 0;
    support::eventually("four scheduled backups", 30, || {
        n += 1;
        let agent = agent.clone();
        let count = written(&hale);
        async move {
            agent.checkpoint(json!({ "n": n })).await.unwrap();
            (count >= 4).then_some(())
        }
    })
    .await;
    assert!(hale.stderr_shows("old backup removed"), "{}", hale.stderr());
    // Stopped before looking: the schedule goes on writing a backup every second (a
    // partial file beside the others) and rotating after it (removing the oldest, maybe
    // one being verified), and the rotation after the fourth may not have run yet. A stop
    // cancels the backup under way (its partial file goes) and waits for the schedule.
    drop(agent);
    assert!(hale.terminate().success());
    let files: Vec<PathBuf> = listing(&dir);
    assert_eq!(files.len(), 2, "keep = 2: {files:?}");
    for file in &files {
        let name = file.to_str().unwrap();
        assert!(name.starts_with("hale-backup-") && name.ends_with(".db"), "{name}");
        let (code, out, err) = support::hale(&["verify", "--file", path_str(&dir.join(file))]);
        assert_eq!(code, 0, "{out}\n{err}");
    }
}

#[tokio::test]
async fn a_damaged_backup_is_refused_by_verify_and_restore_naming_the_record() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("kept.db");
    let (hale, _) = populate_and_back_up(&temp.path().join("data"), &file).await;
    assert!(hale.terminate().success());
    let seq: i64 = rusqlite::Connection::open_with_flags(&file, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap()
        .query_row("SELECT seq FROM events WHERE CAST(body AS TEXT) LIKE '%MARK-0017%'", [], |row| row.get(0))
        .unwrap();
    // Flip a byte of the record's body in the file, under SQLite, as a failing disk would
    // (every copy: free pages may hold stale ones).
    let mut bytes = std::fs::read(&file).unwrap();
    let marker = b"MARK-0017";
    let copies: Vec<usize> =
        bytes.windows(marker.len()).enumerate().filter(|(_, w)| w == marker).map(|(at, _)| at).collect();
    assert!(!copies.is_empty());
    for at in copies {
        bytes[at + 5] ^= 0x04;
    }
    std::fs::write(&file, bytes).unwrap();

    let (code, out, _) = support::hale(&["verify", "--file", path_str(&file)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("CORRUPT record {seq}")), "{out}");

    let fresh = temp.path().join("fresh");
    let (code, out, err) = support::hale(&["restore", path_str(&file), "--data", path_str(&fresh)]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains(&format!("record {seq} is corrupt")) && err.contains("Nothing was restored"), "{err}");
    assert!(!fresh.join("hale.db").exists() && !fresh.join(".hale.db.restoring").exists());
}
