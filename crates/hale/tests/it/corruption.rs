//! Damaged files: a flipped byte in the newest snapshot makes hale start from an older one
//! with the same state; a flipped byte in a log record makes hale refuse to start, naming
//! the record, until told --repair; `hale verify` reports both.

use crate::support::{self, serve, serve_with};
use hale_client::AgentOptions;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

fn snapshots(data: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data.join("snapshots"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .collect();
    files.sort();
    files
}

/// Writes 60 checkpoints with unique markers, snapshotting every 25 events, and stops
/// cleanly (which snapshots again). Returns the final state.
async fn populate(data: &Path) -> serde_json::Value {
    let hale = serve(data, &["--snapshot-every-events", "25"]);
    let agent = hale.connect(AgentOptions::new("victim", "r")).await;
    agent.resume().await.unwrap();
    for n in 1..=60 {
        agent.checkpoint(json!({ "marker": format!("MARK-{n:04}"), format!("k{}", n % 5): n })).await.unwrap();
        // The hello logged two events and each checkpoint logs one: a snapshot is due at
        // every 25th event. Wait for each before going on (a snapshot still being written
        // delays the next, which then covers more), so several snapshots exist: those at
        // events 25 and 50, and the one the stop takes.
        let events = n + 2;
        if events % 25 == 0 {
            let due = events / 25;
            support::eventually(&format!("snapshot {due} of victim"), 30, || async {
                (snapshots(data).len() >= due).then_some(())
            })
            .await;
        }
    }
    let state = hale.admin().state("victim", None).await.unwrap().state;
    drop(agent);
    assert!(hale.terminate().success());
    state
}

fn flip(path: &Path, index: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[index] ^= 0x04;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_damaged_newest_snapshot_falls_back_to_an_older_one() {
    let temp = tempfile::tempdir().unwrap();
    let expected = populate(temp.path()).await;
    let files = snapshots(temp.path());
    assert!(files.len() >= 2, "need an older snapshot to fall back to: {files:?}");
    let newest = files.last().unwrap();
    let length = std::fs::metadata(newest).unwrap().len() as usize;
    flip(newest, length - 20); // inside the body
    let (code, out, _) = support::hale(&["verify", "--data", temp.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DAMAGED snapshot"), "{out}");

    let hale = serve(temp.path(), &[]);
    let state = hale.admin().state("victim", None).await.unwrap().state;
    assert_eq!(state, expected);
    assert!(hale.stderr_shows("skipping damaged snapshot"), "{}", hale.stderr());
    assert!(hale.terminate().success());
    // The clean stop snapshotted the tail it replayed: a sound snapshot of that point now
    // stands where the damaged one was.
    let (code, out, _) = support::hale(&["verify", "--data", temp.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn a_damaged_log_record_is_refused_by_number_until_repair() {
    let temp = tempfile::tempdir().unwrap();
    populate(temp.path()).await;
    // Without snapshots recovery must replay (and so read) every record.
    for file in snapshots(temp.path()) {
        std::fs::remove_file(file).unwrap();
    }
    // After a clean stop SQLite has folded its WAL into hale.db: damage the record there,
    // under SQLite, as a failing disk would. Checkpoint 17 is event 19 (hello made 1 and 2).
    // Every copy: free pages left by B-tree splits may hold stale ones.
    let db = temp.path().join("hale.db");
    let bytes = std::fs::read(&db).unwrap();
    let marker = b"MARK-0017";
    let copies: Vec<usize> =
        bytes.windows(marker.len()).enumerate().filter(|(_, w)| w == marker).map(|(at, _)| at).collect();
    assert!(!copies.is_empty(), "marker not found in hale.db");
    for at in copies {
        flip(&db, at + 5);
    }

    let refused = serve_with(Command::new(support::HALE), temp.path(), &[]).err().expect("hale must refuse to start");
    assert!(refused.contains("log record 19 is corrupt"), "{refused}");
    assert!(refused.contains("--repair"), "{refused}");

    let (code, out, _) = support::hale(&["verify", "--data", temp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("CORRUPT record 19"), "{out}");

    let hale = serve(temp.path(), &["--repair"]);
    assert!(hale.stderr_shows("set a damaged log record aside"), "{}", hale.stderr());
    let state = hale.admin().state("victim", None).await.unwrap();
    assert_eq!(state.state["marker"], json!("MARK-0060"));
    assert!(hale.terminate().success());

    let (code, out, _) = support::hale(&["verify", "--data", temp.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("set aside by --repair: record 19"), "{out}");
}
