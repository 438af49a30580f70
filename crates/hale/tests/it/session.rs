//! The session protocol through the Rust client and over HTTP, fencing, graceful shutdown.

use crate::support::{self, serve};
use hale_client::{AgentOptions, RollbackTo};
use serde_json::json;

#[tokio::test]
async fn checkpoint_recovery_point_rollback_and_resume_after_restart() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let agent = hale.connect(AgentOptions::new("writer-1", "writer").label("zone", "eu")).await;
    let welcome = agent.resume().await.unwrap();
    assert_eq!((welcome.incarnation, welcome.version, welcome.resumed), (1, 0, false));
    assert_eq!(welcome.state, json!({}));

    assert_eq!(agent.checkpoint(json!({"plan": "outline", "files": {"a.rs": 1}})).await.unwrap(), 1);
    let point = agent.recovery_point("planned").await.unwrap();
    assert_eq!(point.version, 1);
    assert_eq!(agent.checkpoint(json!({"plan": null, "files": {"b.rs": 2}})).await.unwrap(), 2);
    let back = agent.rollback(RollbackTo::Point("planned".into())).await.unwrap();
    assert_eq!((back.version, back.target_version), (3, 1));
    assert_eq!(back.state, json!({"plan": "outline", "files": {"a.rs": 1}}));
    let conflict = agent.checkpoint_expecting(json!({"x": 1}), 1).await.unwrap_err();
    assert_eq!(conflict.code(), Some("version_conflict"));
    // The deepest patch accepted must still decode from the log and from snapshots.
    let deepest = crate::bad_input::nested(hale_core::PATCH_DEPTH_MAX);
    assert_eq!(agent.checkpoint(json!({"deep": deepest["d"].clone()})).await.unwrap(), 4);
    agent.checkpoint(json!({"deep": null})).await.unwrap();

    let admin = hale.admin();
    let agents = admin.agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert!(agents[0].attached);
    assert_eq!(admin.state("writer-1", Some(2)).await.unwrap().state, json!({"files": {"a.rs": 1, "b.rs": 2}}));

    // Graceful stop: exit 0, final snapshot; a new run resumes the state.
    drop(agent);
    let status = hale.terminate();
    assert!(status.success(), "{status:?}");
    let snapshots = std::fs::read_dir(temp.path().join("snapshots")).unwrap().count();
    assert!(snapshots >= 1, "SIGTERM must leave a snapshot");

    let hale = serve(temp.path(), &[]);
    let agent = hale.connect(AgentOptions::new("writer-1", "writer").label("zone", "eu")).await;
    let welcome = agent.resume().await.unwrap();
    assert_eq!((welcome.incarnation, welcome.version, welcome.resumed), (2, 5, false));
    assert_eq!(welcome.state, json!({"plan": "outline", "files": {"a.rs": 1}}));
    assert_eq!(welcome.recovery_points.len(), 1);
    assert_eq!(welcome.history, [0, 1, 2, 3, 4, 5]);
    // verify replays the whole log, deep patch included.
    let (code, out, _) = support::hale(&["verify", "--data", temp.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(hale.stderr_shows("hale is ready"));
}

#[tokio::test]
async fn a_new_incarnation_fences_the_old_one() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let old = hale.connect(AgentOptions::new("a", "r")).await;
    assert_eq!(old.resume().await.unwrap().incarnation, 1);
    old.checkpoint(json!({"by": "old"})).await.unwrap();

    let new = hale.connect(AgentOptions::new("a", "r")).await;
    assert_eq!(new.resume().await.unwrap().incarnation, 2);
    // The old session is told it was fenced and closed; its writes go nowhere.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), old.ended()).await.unwrap();
    assert!(ended.contains("fenced: incarnation 1"), "{ended}");
    assert!(old.checkpoint(json!({"by": "zombie"})).await.is_err());
    // A zombie write that goes around the session (HTTP) is refused too.
    let (status, body) = hale.post("/v1/agents/a/checkpoint", &json!({"incarnation": 1, "patch": {"by": "zombie"}}));
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("stale_incarnation"), "{body}");
    assert_eq!(new.checkpoint(json!({"by": "new"})).await.unwrap(), 2);

    // A session that names the current incarnation resumes it; an older one is refused.
    let again = hale.connect(AgentOptions::new("a", "r").incarnation(2)).await;
    let welcome = again.resume().await.unwrap();
    assert!(welcome.resumed);
    assert_eq!(welcome.state, json!({"by": "new"}));
    let stale = hale.connect(AgentOptions::new("a", "r").incarnation(1)).await;
    assert_eq!(stale.resume().await.unwrap_err().code(), Some("stale_incarnation"));
}

#[tokio::test]
async fn pipelined_checkpoints_are_answered_in_order() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let agent = hale.connect(AgentOptions::new("p", "r")).await;
    agent.resume().await.unwrap();
    let futures: Vec<_> = (0..200).map(|n| agent.checkpoint(json!({ "n": n }))).collect();
    let versions: Vec<u64> = futures_util::future::join_all(futures).await.into_iter().map(Result::unwrap).collect();
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=200).collect::<Vec<_>>());
}

#[test]
fn the_same_operations_over_http() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &[]);
    let post = |path: &str, body: serde_json::Value| {
        let (status, body) = support::http(hale.addr, "POST", path, body.to_string().as_bytes());
        (status, serde_json::from_str::<serde_json::Value>(&body).unwrap_or(json!(body)))
    };
    let (status, welcome) = post("/v1/agents/h1/hello", json!({"role": "r"}));
    assert_eq!((status, &welcome["incarnation"]), (200, &json!(1)));
    let (status, body) = post("/v1/agents/h1/checkpoint", json!({"incarnation": 1, "patch": {"a": 1}}));
    assert_eq!((status, body), (200, json!({"version": 1})));
    let (status, body) = post("/v1/agents/h1/recovery-points", json!({"incarnation": 1, "name": "one"}));
    assert_eq!((status, &body["version"]), (200, &json!(1)));
    post("/v1/agents/h1/checkpoint", json!({"incarnation": 1, "patch": {"a": 2}}));
    let (status, body) = post("/v1/agents/h1/rollback", json!({"incarnation": 1, "to": {"version": 1}}));
    assert_eq!((status, &body["state"]), (200, &json!({"a": 1})));
    let (status, body) = post("/v1/agents/h1/checkpoint", json!({"incarnation": 0, "patch": {}}));
    assert_eq!((status, &body["error"]["code"]), (409, &json!("stale_incarnation")));
    let (status, body) = post("/v1/agents/nobody/checkpoint", json!({"incarnation": 1, "patch": {}}));
    assert_eq!((status, &body["error"]["code"]), (404, &json!("unknown_agent")));
    let (status, _) = hale.get("/readyz");
    assert_eq!(status, 200);

    let (code, out, _) = support::hale(&["agents", "--server", &hale.http_url()]);
    assert_eq!(code, 0);
    assert!(out.lines().any(|line| line.starts_with("h1 ") && line.contains(" r ")), "{out}");
    let (code, out, _) = support::hale(&["state", "h1", "--version", "2", "--server", &hale.http_url()]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["state"], json!({"a": 2}));
    let (code, _, err) = support::hale(&["state", "nobody", "--server", &hale.http_url()]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_agent"), "{err}");
}

#[test]
fn a_second_server_on_the_same_data_is_refused() {
    let temp = tempfile::tempdir().unwrap();
    let _first = serve(temp.path(), &[]);
    let refused = support::serve_with(std::process::Command::new(support::HALE), temp.path(), &[]).err().unwrap();
    assert!(refused.contains("in use by another hale process"), "{refused}");
}

#[tokio::test]
async fn snapshots_are_taken_by_time_while_running() {
    let temp = tempfile::tempdir().unwrap();
    let hale = serve(temp.path(), &["--snapshot-every-secs", "1", "--snapshot-every-events", "1000000"]);
    let agent = hale.connect(AgentOptions::new("t", "r")).await;
    agent.resume().await.unwrap();
    agent.checkpoint(json!({"n": 1})).await.unwrap();
    let snapshot_dir = temp.path().join("snapshots");
    let snapshots = || -> Vec<String> {
        let names = std::fs::read_dir(&snapshot_dir).unwrap().map(|entry| entry.unwrap().file_name());
        let mut names: Vec<String> =
            names.filter_map(|name| name.into_string().ok()).filter(|name| name.ends_with(".bin")).collect();
        names.sort();
        names
    };
    // The snapshot by time that holds the checkpoint (on a slow machine an earlier one may
    // hold only the hello).
    let (_, events) = hale.get("/v1/events?kind=checkpointed");
    let last = serde_json::from_str::<serde_json::Value>(&events).unwrap()[0]["seq"].as_u64().unwrap();
    let file = format!("snapshot-{last:020}.bin");
    support::eventually("a snapshot by time at --snapshot-every-secs 1", 20, || async {
        snapshots().contains(&file).then_some(())
    })
    .await;
    let seen_at = tokio::time::Instant::now();
    // Nothing new was logged since: no further snapshot is taken. Taking one by time is
    // decided after every command and every tick, once a period has passed since the last.
    // So: let the period pass (the condition itself, not a guess), have hale decide once more
    // after a refused checkpoint (refused: it logs nothing), then stop hale, which waits for
    // a snapshot under way before it exits. Had it taken one, its "snapshot written" would
    // be in hale's stderr; the listing alone cannot tell, as a snapshot of the same seq
    // keeps the same file name.
    let taken = snapshots();
    tokio::time::sleep_until(seen_at + std::time::Duration::from_secs(1)).await;
    let refused = agent.checkpoint_expecting(json!({"n": 2}), 0).await.unwrap_err();
    assert_eq!(refused.code(), Some("version_conflict"));
    let (status, stderr) = hale.terminate_with_stderr();
    assert!(status.success(), "{status:?}");
    let written = stderr.lines().filter(|line| line.contains("snapshot written") && line.contains(&file)).count();
    assert_eq!(written, 1, "{stderr}");
    assert_eq!(taken, snapshots());
}

#[tokio::test]
async fn hale_toml_is_checked_and_applied_with_flags_on_top() {
    let temp = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../hale.example.toml");
    let (code, out, err) = support::hale(&["check", "-c", example]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (1 agents, 1 groups, 1 roles)"), "{out}");

    let bad = temp.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\npatch_bytes_max = 100\nhistory = 3\n").unwrap();
    let (code, _, err) = support::hale(&["check", "-c", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("line 3") && err.contains("history"), "{err}");

    let good = temp.path().join("hale.toml");
    std::fs::write(&good, "[server]\nlisten = \"127.0.0.1:1\"\n[limits]\npatch_bytes_max = 100\n").unwrap();
    // --listen (given by `serve`) overrides [server] listen; [limits] applies.
    let hale = serve(&temp.path().join("data"), &["-c", good.to_str().unwrap()]);
    let agent = hale.connect(AgentOptions::new("small", "r")).await;
    agent.resume().await.unwrap();
    agent.checkpoint(json!({"x": 1})).await.unwrap();
    let refused = agent.checkpoint(json!({"x": "y".repeat(200)})).await.unwrap_err();
    assert_eq!(refused.code(), Some("patch_too_large"));
}

/// A SIGTERM that arrives the moment hale says it listens is a clean stop (exit 0), not the
/// default action of a signal nobody handles yet.
#[test]
fn sigterm_right_after_listening_is_a_clean_stop() {
    for _ in 0..20 {
        let temp = tempfile::tempdir().unwrap();
        let hale = serve(temp.path(), &[]);
        let status = hale.terminate();
        assert!(status.success(), "{status:?}");
    }
}
