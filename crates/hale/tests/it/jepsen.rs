//! The Jepsen-style test (`scripts/jepsen.py`): three real nodes behind a fault-injecting
//! proxy, clients checkpointing and working tasks while a seeded nemesis SIGKILLs the
//! leader and a follower, pauses a node past the election timeout and cuts one off; then
//! a checker over the recorded history and the committed log. Here a short run (20 s;
//! every kind of fault still happens); a long one (`--duration 60` or more) is run by
//! hand and its figures are in the README. A failing run prints its seed, and its
//! history is kept under `target/jepsen-failures/`. `HALE_JEPSEN_SEED` replays a seed.

use crate::support::HALE;
use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/jepsen.py")
}

/// The checker is shown broken histories of every kind (a lost acknowledged write, two
/// states at one version, a task completed twice, a fenced write accepted, …) and must
/// catch each.
#[test]
fn the_checker_catches_every_kind_of_broken_history() {
    let output = Command::new("python3").arg(script()).arg("--self-test").output().expect("running python3");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{text}");
    assert!(text.contains("catches every broken one"), "{text}");
}

#[test]
fn a_short_jepsen_run_finds_every_acknowledged_write_and_no_double_or_fenced_one() {
    let seed: u64 = std::env::var("HALE_JEPSEN_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    let work = tempfile::tempdir().unwrap();
    let history = work.path().join("history.jsonl");
    let output = Command::new("python3")
        .arg(script())
        .arg(HALE)
        .args(["--duration", "20", "--seed", &seed.to_string(), "--clients", "5"])
        .arg("--history")
        .arg(&history)
        .arg("--workdir")
        .arg(work.path().join("nodes"))
        .output()
        .expect("running python3");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        let kept = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../../target/jepsen-failures/seed-{seed}"));
        let _ = std::fs::create_dir_all(&kept);
        for entry in std::fs::read_dir(work.path()).into_iter().flatten().flatten() {
            if entry.path().is_file() {
                let _ = std::fs::copy(entry.path(), kept.join(entry.file_name()));
            }
        }
        panic!("the Jepsen run with seed {seed} failed (history kept in {}):\n{text}", kept.display());
    }
}
