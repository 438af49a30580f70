//! Encryption at rest, end to end: with a key, no payload is readable in hale.db, its WAL
//! or a snapshot (after a SIGKILL and after a clean stop); the same key brings the state
//! back; a wrong key or no key is refused at start with a message naming the key, and
//! changes nothing; rotation keeps older records readable and seals new ones with the
//! new key.

use crate::support::{self, HALE, Hale, serve_with, wait_with_timeout};
use hale_client::AgentOptions;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const AGENT: &str = "writer-7731";
const SECRETS: [&str; 4] = ["SECRET-PAYLOAD-4711", "TASK-PAYLOAD-9133", AGENT, "secret-role-5150"];

/// `hale keygen --id ID`, written to a file of its own (mode 0600).
fn key_line(id: &str) -> String {
    let (code, out, err) = support::hale(&["keygen", "--id", id]);
    assert_eq!(code, 0, "{err}");
    let line = out.trim().to_string();
    assert!(line.starts_with(&format!("{id}:")) && line.len() == id.len() + 1 + 44, "{line}");
    line
}

fn key_file(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("# hale encryption keys, current first\n{}\n", lines.join("\n"))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `hale serve` with nothing about keys inherited from the test's environment.
fn command() -> Command {
    let mut command = Command::new(HALE);
    command.env_remove("HALE_ENCRYPTION_KEY").env_remove("HALE_ENCRYPTION_KEY_FILE");
    command
}

fn serve_keyed(data: &Path, keys: &Path) -> Hale {
    let keys = keys.to_str().unwrap();
    serve_with(command(), data, &["--encryption-key-file", keys, "--snapshot-every-events", "4"])
        .unwrap_or_else(|stderr| panic!("hale did not start:\n{stderr}"))
}

/// Starts hale expecting it to refuse: its exit code and stderr.
fn refused(mut command: Command, data: &Path, extra: &[&str]) -> (i32, String) {
    command.args(["serve", "--data"]).arg(data).args(["--listen", "127.0.0.1:0"]).args(extra);
    command.env("HALE_ADMIN_TOKEN", support::ADMIN).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let Some(status) = wait_with_timeout(&mut child, Duration::from_secs(30)) else {
        let _ = child.kill();
        panic!("hale started although it should have refused");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status.code().unwrap_or(-1), stderr)
}

/// The stored files: hale.db, its WAL, and every snapshot.
fn stored_files(data: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for name in ["hale.db", "hale.db-wal"] {
        let path = data.join(name);
        if let Ok(bytes) = std::fs::read(&path) {
            files.push((path, bytes));
        }
    }
    let mut snapshots: Vec<PathBuf> =
        std::fs::read_dir(data.join("snapshots")).unwrap().map(|entry| entry.unwrap().path()).collect();
    snapshots.sort();
    for path in snapshots {
        let bytes = std::fs::read(&path).unwrap();
        files.push((path, bytes));
    }
    files
}

/// Path, length and hash of each non-empty file (an empty WAL that opening the
/// database left is no change).
fn digest(files: &[(PathBuf, Vec<u8>)]) -> Vec<(PathBuf, usize, u64)> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    files
        .iter()
        .filter(|(_, bytes)| !bytes.is_empty())
        .map(|(path, bytes)| {
            let mut hasher = DefaultHasher::new();
            bytes.hash(&mut hasher);
            (path.clone(), bytes.len(), hasher.finish())
        })
        .collect()
}

fn is_snapshot(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "bin")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// No secret in any stored byte; the key id (stored in the clear beside each record) is
/// found, which shows the scan reads the files the records are in.
fn assert_nothing_readable(data: &Path, key_id: &str) {
    let files = stored_files(data);
    assert!(files.iter().any(|(path, _)| is_snapshot(path)), "no snapshot in {}", data.display());
    for (path, bytes) in &files {
        for secret in SECRETS {
            assert!(!contains(bytes, secret.as_bytes()), "{secret:?} is readable in {}", path.display());
        }
    }
    let db: Vec<u8> = files.iter().filter(|(path, _)| !is_snapshot(path)).flat_map(|(_, b)| b.clone()).collect();
    assert!(contains(&db, key_id.as_bytes()), "key id {key_id:?} not found: the scan missed the records");
}

/// (key_id, records) of the events table, and the key id of the newest record.
fn key_ids(data: &Path) -> (Vec<(Option<String>, i64)>, Option<String>) {
    let conn = rusqlite::Connection::open_with_flags(data.join("hale.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let counts = conn
        .prepare("SELECT key_id, count(*) FROM events GROUP BY key_id ORDER BY key_id")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let newest = conn.query_row("SELECT key_id FROM events ORDER BY seq DESC LIMIT 1", [], |row| row.get(0)).unwrap();
    (counts, newest)
}

/// The key id in the header of the newest snapshot.
fn newest_snapshot_key(data: &Path) -> String {
    let (_, bytes) = stored_files(data).into_iter().rfind(|(path, _)| is_snapshot(path)).unwrap();
    let len = bytes[40] as usize;
    String::from_utf8(bytes[41..41 + len].to_vec()).unwrap()
}

#[tokio::test]
async fn payloads_are_unreadable_at_rest_and_a_wrong_or_missing_key_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let k1 = key_line("k1");
    let keys = key_file(temp.path(), "keys", &[&k1]);

    // 1. Write secrets with a key, then SIGKILL: the WAL holds the latest records.
    let hale = serve_keyed(&data, &keys);
    assert!(hale.stderr_shows("encryption at rest"), "{}", hale.stderr());
    let agent = hale.connect(AgentOptions::new(AGENT, "secret-role-5150")).await;
    agent.resume().await.unwrap();
    agent.checkpoint(json!({"note": "SECRET-PAYLOAD-4711", "n": 1})).await.unwrap();
    for n in 2..=12 {
        agent.checkpoint(json!({"n": n})).await.unwrap();
    }
    agent.recovery_point("after-twelve").await.unwrap();
    let (status, submitted) = support::http(
        hale.addr,
        "POST",
        "/v1/tasks",
        json!({"role": "nobody", "payload": {"spec": "TASK-PAYLOAD-9133"}}).to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{submitted}");
    let task: u64 = serde_json::from_str::<serde_json::Value>(&submitted).unwrap()["task"].as_u64().unwrap();
    let expected = hale.admin().state(AGENT, None).await.unwrap();
    assert_eq!(expected.state["note"], "SECRET-PAYLOAD-4711");
    // Snapshots are taken every 4 events: let one be written.
    support::eventually("a snapshot", 10, || async {
        stored_files(&data).iter().any(|(path, _)| is_snapshot(path)).then_some(())
    })
    .await;
    drop(agent);
    hale.kill();
    assert!(data.join("hale.db-wal").exists());
    assert_nothing_readable(&data, "k1");

    // 2. The same key brings everything back; a clean stop writes a final sealed snapshot.
    let hale = serve_keyed(&data, &keys);
    let state = hale.admin().state(AGENT, None).await.unwrap();
    assert_eq!((state.state.clone(), state.version), (expected.state.clone(), expected.version));
    let info = hale.admin().task(task).await.unwrap();
    assert_eq!(info.payload, json!({"spec": "TASK-PAYLOAD-9133"}));
    // The audit trail opens sealed records with the key: no record reads as damaged.
    let (status, _, events) =
        crate::support::http_as(hale.addr, Some(crate::support::ADMIN), "GET", "/v1/events?kind=checkpointed", b"");
    assert_eq!(status, 200, "{events}");
    assert!(events.contains("SECRET-PAYLOAD-4711") && !events.contains("damaged"), "{events}");
    assert!(hale.terminate().success());
    assert_nothing_readable(&data, "k1");
    assert_eq!(newest_snapshot_key(&data), "k1");

    // 3. `hale verify` checks the checksums without the key, and everything with it.
    let data_arg = data.to_str().unwrap();
    let (code, out, err) = support::hale(&["verify", "--data", data_arg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verdict: clean") && out.contains("not decrypted (no key given)"), "{out}");
    let (code, out, err) =
        support::hale(&["verify", "--data", data_arg, "--encryption-key-file", keys.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verdict: clean") && !out.contains("not decrypted") && out.contains("agents: 1"), "{out}");

    // 4. A wrong key under the same id: refused, clearly, and nothing changes.
    let before = stored_files(&data);
    let wrong = key_file(temp.path(), "wrong", &[&key_line("k1")]);
    let (code, stderr) = refused(command(), &data, &["--encryption-key-file", wrong.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("key 'k1' does not decrypt record 1: wrong key"), "{stderr}");
    let (code, out, _) =
        support::hale(&["verify", "--data", data_arg, "--encryption-key-file", wrong.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");

    // 5. No key at all: refused, naming the key and where to give it.
    let (code, stderr) = refused(command(), &data, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("record 1 is encrypted with key 'k1', which is not configured"), "{stderr}");
    assert!(stderr.contains("HALE_ENCRYPTION_KEY"), "{stderr}");
    // A malformed key is a configuration error naming the file.
    let bad = key_file(temp.path(), "bad", &["k1:not-a-key"]);
    let (code, stderr) = refused(command(), &data, &["--encryption-key-file", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(bad.to_str().unwrap()) && stderr.contains("line 2"), "{stderr}");
    assert_eq!(digest(&before), digest(&stored_files(&data)), "a refused start changed the data directory");

    // 6. Rotation: a new current key, the old one kept for reading.
    let k2 = key_line("k2");
    let rotated = key_file(temp.path(), "rotated", &[&k2, &k1]);
    let hale = serve_keyed(&data, &rotated);
    let state = hale.admin().state(AGENT, None).await.unwrap();
    assert_eq!(state.state, expected.state);
    let agent = hale.connect(AgentOptions::new(AGENT, "secret-role-5150")).await;
    agent.resume().await.unwrap();
    agent.checkpoint(json!({"n": 13})).await.unwrap();
    drop(agent);
    assert!(hale.terminate().success());
    let (counts, newest) = key_ids(&data);
    let ids: Vec<Option<String>> = counts.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, [Some("k1".to_string()), Some("k2".to_string())], "{counts:?}");
    assert_eq!(newest.as_deref(), Some("k2"));
    assert_eq!(newest_snapshot_key(&data), "k2");
    assert_nothing_readable(&data, "k2");

    // The keys can also come from HALE_ENCRYPTION_KEY: without k1 the old records are
    // refused; with both, hale starts.
    let mut only_new = command();
    only_new.env("HALE_ENCRYPTION_KEY", &k2);
    let (code, stderr) = refused(only_new, &data, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("encrypted with key 'k1', which is not configured"), "{stderr}");
    let mut both = command();
    both.env("HALE_ENCRYPTION_KEY", format!("{k2},{k1}"));
    let hale = serve_with(both, &data, &[]).unwrap_or_else(|stderr| panic!("hale did not start:\n{stderr}"));
    let state = hale.admin().state(AGENT, None).await.unwrap();
    assert_eq!(state.state["n"], 13);
    assert_eq!(state.state["note"], "SECRET-PAYLOAD-4711");

    // 7. `hale rekey` retires k1: refused while hale runs, then everything is sealed with
    // k2, and k2 alone opens the data directory.
    let rekey = |keys: &Path| {
        let output = Command::new(HALE)
            .args(["rekey", "--data"])
            .arg(&data)
            .arg("--encryption-key-file")
            .arg(keys)
            .env_remove("HALE_ENCRYPTION_KEY")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.code().unwrap_or(-1), text)
    };
    let (code, text) = rekey(&rotated);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("stop hale before rekeying"), "{text}");
    let without_keys = Command::new(HALE)
        .args(["rekey", "--data"])
        .arg(&data)
        .env_remove("HALE_ENCRYPTION_KEY")
        .env_remove("HALE_ENCRYPTION_KEY_FILE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&without_keys.stderr);
    assert!(!without_keys.status.success() && text.contains("hale rekey needs the keys"), "{text}");
    assert!(hale.terminate().success());
    let (code, text) = rekey(&rotated);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("with key k2") && text.contains("no longer needed: k1"), "{text}");
    let (counts, _) = key_ids(&data);
    assert_eq!(counts.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), [Some("k2".to_string())], "{counts:?}");
    assert_nothing_readable(&data, "k2");
    let only_k2 = key_file(temp.path(), "only-k2", &[&k2]);
    let hale = serve_keyed(&data, &only_k2);
    let state = hale.admin().state(AGENT, None).await.unwrap();
    assert_eq!((state.state["n"].as_u64(), state.version), (Some(13), expected.version + 1));
    assert_eq!(state.state["note"], "SECRET-PAYLOAD-4711");
    assert!(hale.terminate().success());
}
